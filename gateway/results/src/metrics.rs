//! The results metrics (no patient data: kinds, states and counts only).
//!
//! - `gateway_results_messages_total{kind,outcome}`: notices and reports. Core: `sent`
//!   (handed to the exchange, repeats included) and `acknowledged`; clinic: `recorded` and
//!   `failed` (not recorded: the core sends it again).
//! - `gateway_results_instances{state}` (clinic): instances of the appointments with results,
//!   by state: `announced` (the core's count), `received` (sealed in the spool), `delivered`
//!   (every PACS destination confirmed), `failed` (dead letter at a PACS).
//! - `gateway_results_pending{kind}` (core): notices and reports not yet acknowledged.
//! - `gateway_results_pull_failures_total` (clinic): pulls that failed and are retried.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MessageLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The handles of the results metrics (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    messages: Family<MessageLabels, Counter>,
    instances: Family<StateLabels, Gauge>,
    pending: Family<KindLabels, Gauge>,
    pull_failures: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "gateway_results_messages",
            "Results notices and reports, by kind and outcome",
            m.messages.clone(),
        );
        registry.register(
            "gateway_results_instances",
            "Instances of returned results, by state (clinic)",
            m.instances.clone(),
        );
        registry.register(
            "gateway_results_pending",
            "Notices and reports the booking clinic has not acknowledged yet (core)",
            m.pending.clone(),
        );
        registry.register(
            "gateway_results_pull_failures",
            "Pulls from the cloud archive that failed and are retried (clinic)",
            m.pull_failures.clone(),
        );
        m
    }

    pub(crate) fn message(&self, kind: &'static str, outcome: &'static str) {
        self.messages
            .get_or_create(&MessageLabels { kind, outcome })
            .inc();
    }

    /// `(kind, outcome)` counts so far (for tests and telemetry).
    pub fn messages(&self, kind: &'static str, outcome: &'static str) -> u64 {
        self.messages
            .get(&MessageLabels { kind, outcome })
            .map_or(0, |c| c.get())
    }

    pub(crate) fn set_instances(&self, announced: u64, received: u64, delivered: u64, failed: u64) {
        for (state, n) in [
            ("announced", announced),
            ("received", received),
            ("delivered", delivered),
            ("failed", failed),
        ] {
            self.instances
                .get_or_create(&StateLabels { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn set_pending(&self, notices: u64, reports: u64) {
        for (kind, n) in [("notice", notices), ("report", reports)] {
            self.pending
                .get_or_create(&KindLabels { kind })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn pull_failed(&self) {
        self.pull_failures.inc();
    }
}
