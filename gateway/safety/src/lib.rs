//! Safety before the exam, on the core gateway: contrast reactions and allergies recorded by
//! any connected hospital (HL7 AL1 / ADT^A60 IAM) and CT dose events from X-Ray Radiation
//! Dose SRs (de-duplicated by Irradiation Event UID), kept sealed per source record
//! (`hospital_id`, `patient_id`) and shown before a booking to the hospitals the patient's
//! consent allows ([`Safety`] implements [`gateway_booking::SafetyCheck`]).
//!
//! SKELETON: the bodies are placeholders; the public names below are the contract the
//! daemon codes against.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod contrast;

use std::path::Path;
use std::sync::Arc;

use gateway_booking::{BoxFuture, PatientRef, SafetyCheck, SafetyReport, SafetyUnavailable};
use gateway_registry::{PersonId, RegistryHandle, SourceKey};

/// Where the safety store lives under the data directory.
pub const DIR: &str = "safety";
/// The spool's virtual destination of every DICOM object, drained by [`dose::run`]
/// (dose reports are read and recorded, everything else is passed).
pub const DOSE_ROUTE: &str = "safety-dose";

/// How the warnings are made (`[safety]`).
#[derive(Debug, Clone)]
pub struct Options {
    /// The cumulative dose window (days; default 365).
    pub window_days: u32,
    /// Warn when the window's total DLP passes this (mGy·cm); `None`: report, never warn.
    pub dlp_threshold_mgy_cm: Option<f64>,
    /// The core's own hospital id (dose reports of its scanners for its own patients).
    pub hospital_id: String,
}

/// A store or service error (no patient data).
#[derive(Debug, thiserror::Error)]
pub enum SafetyError {
    #[error("safety store unavailable")]
    Unavailable,
    #[error("safety store: {0}")]
    Store(String),
}

/// One CT irradiation event as recorded (from [`gateway_dicom::rdsr`]).
#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DoseEvent {
    pub event_uid: String,
    pub datetime: Option<String>,
    pub ctdivol_mgy: Option<f64>,
    pub dlp_mgy_cm: Option<f64>,
    pub target_region: Option<String>,
    pub protocol: Option<String>,
}

impl std::fmt::Debug for DoseEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoseEvent").finish_non_exhaustive()
    }
}

/// What recording a dose report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DoseRecorded {
    pub new: usize,
    pub duplicate: usize,
}

/// What the store holds for one person, as `gatewayd safety show` prints it (JSON).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PatientSafety {
    pub person: String,
    pub report: SafetyReport,
}

/// The safety store's owner thread and its handle.
#[derive(Debug, Clone)]
pub struct SafetyHandle {}

impl SafetyHandle {
    /// Opens (or creates) the sealed store in `dir` and starts its thread.
    pub fn open(
        dir: &Path,
        master: &gateway_keystore::MasterKey,
        audit: Arc<gateway_audit::AuditLog>,
        metrics: Metrics,
    ) -> Result<Self, SafetyError> {
        let _ = (dir, master, audit, metrics);
        Ok(Self {})
    }

    /// Applies one HL7 message (AL1 in ADT A01/A04/A08, IAM in ADT^A60, A40/A47 rekeying);
    /// others are ignored. The listener already acknowledged it.
    pub fn apply_hl7(&self, text: String) -> BoxFuture<'static, Result<(), SafetyError>> {
        let _ = text;
        Box::pin(async { Ok(()) })
    }

    /// Records the events of one dose report for `source`, each Irradiation Event UID once.
    pub fn record_dose(
        &self,
        source: SourceKey,
        events: Vec<DoseEvent>,
    ) -> BoxFuture<'static, Result<DoseRecorded, SafetyError>> {
        let _ = (source, events);
        Box::pin(async { Ok(DoseRecorded::default()) })
    }
}

/// The metrics (`gateway_safety_*`).
#[derive(Debug, Clone, Default)]
pub struct Metrics {}

impl Metrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let _ = registry;
        Self {}
    }
}

/// The safety check the core's booking paths call, and the operator's view.
#[derive(Debug, Clone)]
pub struct Safety {
    store: SafetyHandle,
    registry: RegistryHandle,
    options: Options,
}

impl Safety {
    pub fn new(store: SafetyHandle, registry: RegistryHandle, options: Options) -> Self {
        Self {
            store,
            registry,
            options,
        }
    }

    /// Everything recorded for person `person` (an opaque `person:` reference), for the
    /// operator (`gatewayd safety show`); audited with `actor`.
    pub fn show(
        &self,
        person: PersonId,
        actor: &str,
    ) -> BoxFuture<'static, Result<PatientSafety, SafetyError>> {
        let _ = (person, actor, &self.store, &self.registry, &self.options);
        Box::pin(async { Err(SafetyError::Unavailable) })
    }
}

impl SafetyCheck for Safety {
    fn check(
        &self,
        clinic: &str,
        patient: &PatientRef,
        modality: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<SafetyReport, SafetyUnavailable>> {
        let _ = (clinic, patient, modality, actor);
        Box::pin(async { Ok(SafetyReport::default()) })
    }
}

/// The dose reports' path into the store.
pub mod dose {
    /// Drains [`crate::DOSE_ROUTE`]: each DICOM object that is a CT dose report is read
    /// ([`gateway_dicom::rdsr::read`]) and its events recorded under the patient's source
    /// record (a booked exam's clinic and patient id by Accession Number, else the core's
    /// own hospital and the object's Patient ID); others are passed. A malformed report stays
    /// stored, is counted and logged (no content), and is dead-lettered on this route.
    pub async fn run(
        spool: gateway_spool::Spool,
        store: crate::SafetyHandle,
        ledger: gateway_booking::service::LedgerHandle,
        hospital_id: String,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let _ = (spool, store, ledger, hospital_id, shutdown);
    }
}
