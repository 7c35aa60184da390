//! Prometheus metrics of the DICOM service. Labels carry no patient data.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Handles to the DICOM metrics; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub associations_active: Gauge,
    /// Associations admitted since start.
    pub associations_accepted: Counter,
    pub associations_rejected: Family<ReasonLabel, Counter>,
    pub stored: Family<StatusLabel, Counter>,
    /// Modality Worklist C-FIND requests answered, by outcome.
    pub worklist_find: Family<StatusLabel, Counter>,
    /// Pending C-FIND responses sent (one per matching worklist item).
    pub worklist_matches: Counter,
    /// Totals over the labels above, for the fleet telemetry (not exported).
    totals: Totals,
}

#[derive(Debug, Clone, Default)]
struct Totals {
    rejected: Counter,
    stored_ok: Counter,
    stored_failed: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "gateway_dicom_associations_active",
            "DICOM associations currently open",
            m.associations_active.clone(),
        );
        registry.register(
            "gateway_dicom_associations_accepted",
            "DICOM associations admitted",
            m.associations_accepted.clone(),
        );
        registry.register(
            "gateway_dicom_associations_rejected",
            "DICOM association requests refused, by reason",
            m.associations_rejected.clone(),
        );
        registry.register(
            "gateway_dicom_stored",
            "C-STORE requests answered, by outcome",
            m.stored.clone(),
        );
        registry.register(
            "gateway_dicom_worklist_find",
            "Modality Worklist C-FIND requests answered, by outcome",
            m.worklist_find.clone(),
        );
        registry.register(
            "gateway_dicom_worklist_matches",
            "Modality Worklist C-FIND pending responses sent (matching items)",
            m.worklist_matches.clone(),
        );
        m
    }

    pub fn worklist_find(&self, status: &'static str) {
        self.worklist_find
            .get_or_create(&StatusLabel { status })
            .inc();
    }

    pub fn stored(&self, status: &'static str) {
        self.stored.get_or_create(&StatusLabel { status }).inc();
        match status {
            "success" | "duplicate" => self.totals.stored_ok.inc(),
            _ => self.totals.stored_failed.inc(),
        };
    }

    /// An association request refused (or a connection closed before one), by reason.
    pub fn rejected(&self, reason: &'static str) {
        self.associations_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
        self.totals.rejected.inc();
    }

    /// Association requests refused since start, every reason.
    pub fn rejected_total(&self) -> u64 {
        self.totals.rejected.get()
    }

    /// C-STORE requests answered with success (stored or a duplicate) since start.
    pub fn stored_ok_total(&self) -> u64 {
        self.totals.stored_ok.get()
    }

    /// C-STORE requests answered with a failure status since start.
    pub fn stored_failed_total(&self) -> u64 {
        self.totals.stored_failed.get()
    }
}
