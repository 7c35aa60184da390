//! The registry's metrics (counts only, no patient data; labels from fixed words):
//!
//! - `gateway_identity_records`: source records held.
//! - `gateway_identity_persons`: persons (sets of linked records).
//! - `gateway_identity_review_pending`: pairs waiting for a person's decision.
//! - `gateway_identity_matches_total{decision}`: placements of a new or changed record by
//!   the matcher: `link`, `review` or `distinct`.
//! - `gateway_identity_disclosures_total{outcome}`: disclosure decisions (lookups included):
//!   `same_hospital`, `referral`, `consent` or `refused`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The handles of the registry metrics (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    records: Gauge,
    persons: Gauge,
    review_pending: Gauge,
    matches: Family<DecisionLabels, Counter>,
    disclosures: Family<OutcomeLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "gateway_identity_records",
            "Source records in the identity registry",
            m.records.clone(),
        );
        registry.register(
            "gateway_identity_persons",
            "Persons (linked source records) in the identity registry",
            m.persons.clone(),
        );
        registry.register(
            "gateway_identity_review_pending",
            "Record pairs waiting for a person's decision",
            m.review_pending.clone(),
        );
        registry.register(
            "gateway_identity_matches",
            "New or changed records placed by the matcher, by decision",
            m.matches.clone(),
        );
        registry.register(
            "gateway_identity_disclosures",
            "Disclosure decisions across hospitals, by outcome",
            m.disclosures.clone(),
        );
        m
    }

    pub(crate) fn set_counts(&self, records: usize, persons: usize, pending: usize) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.records.set(n(records));
        self.persons.set(n(persons));
        self.review_pending.set(n(pending));
    }

    pub(crate) fn matched(&self, decision: &'static str) {
        self.matches
            .get_or_create(&DecisionLabels { decision })
            .inc();
    }

    pub(crate) fn disclosed(&self, outcome: &'static str) {
        self.disclosures
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Matches so far with `decision` (tests, telemetry).
    pub fn matches(&self, decision: &'static str) -> u64 {
        self.matches
            .get(&DecisionLabels { decision })
            .map_or(0, |c| c.get())
    }

    /// Disclosure decisions so far with `outcome` (tests, telemetry).
    pub fn disclosures(&self, outcome: &'static str) -> u64 {
        self.disclosures
            .get(&OutcomeLabels { outcome })
            .map_or(0, |c| c.get())
    }

    /// `(records, persons, review_pending)` as last set.
    pub fn counts(&self) -> (i64, i64, i64) {
        (
            self.records.get(),
            self.persons.get(),
            self.review_pending.get(),
        )
    }
}
