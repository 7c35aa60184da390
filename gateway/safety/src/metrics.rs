//! The safety metrics (counts only, no patient data; labels from fixed words):
//!
//! - `gateway_safety_reactions`: allergies and reactions held (all source records).
//! - `gateway_safety_dose_events`: CT irradiation events held (each UID once).
//! - `gateway_safety_dose_reports_total{outcome}`: objects of the dose route read:
//!   `recorded` (at least one new event), `duplicate` (every event already held),
//!   `malformed` (an unreadable dose report, or one without a patient to file it under),
//!   `not_dose` (not a CT dose report: passed).
//! - `gateway_safety_warnings_total{kind}`: warnings produced by checks and operator views:
//!   `contrast-reaction`, `cumulative-dose`.
//! - `gateway_safety_hl7_total{outcome}`: HL7 messages applied: `al1`, `iam`, `moved`,
//!   `ignored`, `failed` (not made durable).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The handles of the safety metrics (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    reactions: Gauge,
    dose_events: Gauge,
    dose_reports: Family<OutcomeLabels, Counter>,
    warnings: Family<KindLabels, Counter>,
    hl7: Family<OutcomeLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "gateway_safety_reactions",
            "Allergies and contrast reactions held by the safety store",
            m.reactions.clone(),
        );
        registry.register(
            "gateway_safety_dose_events",
            "CT irradiation events held by the safety store (each UID once)",
            m.dose_events.clone(),
        );
        registry.register(
            "gateway_safety_dose_reports",
            "Objects of the dose route read, by outcome",
            m.dose_reports.clone(),
        );
        registry.register(
            "gateway_safety_warnings",
            "Safety warnings produced, by kind",
            m.warnings.clone(),
        );
        registry.register(
            "gateway_safety_hl7",
            "HL7 messages applied to the safety store, by outcome",
            m.hl7.clone(),
        );
        m
    }

    pub(crate) fn set_counts(&self, reactions: usize, dose_events: usize) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.reactions.set(n(reactions));
        self.dose_events.set(n(dose_events));
    }

    pub(crate) fn dose_report(&self, outcome: &'static str) {
        self.dose_reports
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn warning(&self, kind: &'static str) {
        self.warnings.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn hl7(&self, outcome: &'static str) {
        self.hl7.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// `(reactions, dose_events)` as last set (tests, telemetry).
    pub fn counts(&self) -> (i64, i64) {
        (self.reactions.get(), self.dose_events.get())
    }

    /// Dose reports so far with `outcome`.
    pub fn dose_reports(&self, outcome: &'static str) -> u64 {
        self.dose_reports
            .get(&OutcomeLabels { outcome })
            .map_or(0, |c| c.get())
    }

    /// Warnings so far of `kind`.
    pub fn warnings(&self, kind: &'static str) -> u64 {
        self.warnings
            .get(&KindLabels { kind })
            .map_or(0, |c| c.get())
    }

    /// HL7 messages so far with `outcome`.
    pub fn hl7_messages(&self, outcome: &'static str) -> u64 {
        self.hl7
            .get(&OutcomeLabels { outcome })
            .map_or(0, |c| c.get())
    }
}
