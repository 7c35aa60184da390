//! `gateway_hl7_*` metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AckLabel {
    ack: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Every `ack` label value of `gateway_hl7_messages_total`.
const ACKS: [&str; 7] = ["AA", "AE", "AR", "CA", "CE", "CR", "none"];

/// `gateway_hl7_messages_total{ack}`, `gateway_hl7_connections_active`,
/// `gateway_hl7_connections_rejected_total{reason}`, `gateway_hl7_discarded_total{reason}`,
/// `gateway_hl7_observer_dropped_total{reason}`, `gateway_hl7_refused_total{reason}`.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    messages: Family<AckLabel, Counter>,
    connections_active: Gauge,
    connections_rejected: Family<ReasonLabel, Counter>,
    discarded: Family<ReasonLabel, Counter>,
    observer_dropped: Family<ReasonLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "gateway_hl7_messages",
            "HL7 messages answered, by acknowledgement code (none: MSH-15/16 asked for none)",
            m.messages.clone(),
        );
        registry.register(
            "gateway_hl7_connections_active",
            "MLLP connections currently open",
            m.connections_active.clone(),
        );
        registry.register(
            "gateway_hl7_connections_rejected",
            "MLLP connections closed at once, by reason",
            m.connections_rejected.clone(),
        );
        registry.register(
            "gateway_hl7_discarded",
            "Bytes sequences discarded by the MLLP framing, by reason (garbage, oversized)",
            m.discarded.clone(),
        );
        registry.register(
            "gateway_hl7_observer_dropped",
            "Durable messages not handed to an observer (e.g. the booking ledger), by reason (full, closed)",
            m.observer_dropped.clone(),
        );
        registry.register(
            "gateway_hl7_refused",
            "HL7 messages refused with AR because their sender is not on hl7.peers, by reason (address, certificate, sending_application, sending_facility)",
            m.refused.clone(),
        );
        for refusal in crate::allow::Refusal::ALL {
            // Every reason shows from the start (at 0), so a dashboard sees the family.
            let _ = m.refused.get_or_create(&ReasonLabel {
                reason: refusal.reason(),
            });
        }
        m
    }

    /// HL7 messages answered since start with one of `acks` (`AA`, `AE`, `AR`, `CA`, `CE`,
    /// `CR`, or `none` when MSH-15/16 asked for no acknowledgement).
    pub fn messages_with(&self, acks: &[&'static str]) -> u64 {
        acks.iter()
            .filter_map(|&ack| self.messages.get(&AckLabel { ack }).map(|c| c.get()))
            .sum()
    }

    /// HL7 messages answered since start, every acknowledgement code.
    pub fn messages_total(&self) -> u64 {
        self.messages_with(&ACKS)
    }

    /// MLLP connections open now.
    pub fn connections_active(&self) -> i64 {
        self.connections_active.get()
    }

    pub(crate) fn message(&self, ack: &'static str) {
        self.messages.get_or_create(&AckLabel { ack }).inc();
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_active.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_active.dec();
    }

    pub(crate) fn connection_rejected(&self, reason: &'static str) {
        self.connections_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub(crate) fn discarded(&self, reason: &'static str) {
        self.discarded.get_or_create(&ReasonLabel { reason }).inc();
    }
}

impl Metrics {
    pub(crate) fn observer_dropped(&self, reason: &'static str) {
        self.observer_dropped
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

impl Metrics {
    pub(crate) fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// HL7 messages refused since start because their sender is not on `hl7.peers`, for
    /// one reason (`address`, `certificate`, `sending_application`, `sending_facility`).
    pub fn refused_with(&self, reason: &'static str) -> u64 {
        self.refused
            .get(&ReasonLabel { reason })
            .map_or(0, |c| c.get())
    }
}
