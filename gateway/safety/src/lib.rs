//! Safety before the exam, on the core gateway: contrast reactions and allergies recorded by
//! any connected hospital (HL7 AL1 / ADT^A60 IAM) and CT dose events from X-Ray Radiation
//! Dose SRs (de-duplicated by Irradiation Event UID), kept sealed per source record
//! (`hospital_id`, `patient_id`) and shown before a booking to the hospitals the patient's
//! consent allows ([`Safety`] implements [`gateway_booking::SafetyCheck`]).
//!
//! # Module map
//!
//! - [`contrast`]: the one table of contrast agents (iodinated, gadolinium) by name.
//! - `service`: the `safety-store` thread that owns state and files, [`SafetyHandle`], the
//!   HL7 reading (AL1 replace, IAM add/update/delete, A40/A47 moves) and [`feed`].
//! - `state`: the state in memory and its ops (one code path live and at replay).
//! - `store`: the folder, laid out on the registry's generic sealed store
//!   (`gateway_registry::framestore`: snapshot, journal, head).
//! - `check`: [`Safety`], the check before a booking and the operator's view.
//! - [`dose`]: drains the spool's [`DOSE_ROUTE`] into the store.
//! - [`metrics`]: the `gateway_safety_*` metrics.
//!
//! # Invariants
//!
//! - Nothing of a patient is on disk in clear: every frame is sealed under the key derived
//!   for [`gateway_keystore::KeyPurpose::SafetyAtRest`].
//! - A change is answered only after its journal frame is `fdatasync`'d; a dose report is
//!   marked sent only after its events are.
//! - An Irradiation Event UID is counted once, whatever report and record it came with.
//! - Another hospital's data reaches a booking clinic only when the registry's
//!   `may_disclose` permits it (audited there); what is shown is audited here (counts).
//! - Logs, metrics, errors and audit records carry no patient data.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

mod check;
pub mod contrast;
pub mod dose;
pub mod metrics;
mod service;
mod state;
mod store;

pub use check::Safety;
pub use gateway_booking::BoxFuture;
pub use metrics::Metrics;
pub use service::{Hl7Applied, SafetyHandle, feed};
pub use state::{Origin, Reaction};
pub use store::OpenError;

use gateway_booking::SafetyReport;

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
    /// The store's thread is gone, a change could not be made durable, or an audit record
    /// could not be written (details in the local log).
    #[error("safety store unavailable")]
    Unavailable,
    /// The store could not be opened (names the file and frame).
    #[error(transparent)]
    Open(#[from] OpenError),
    /// `show`: the registry knows no such person.
    #[error("no such person in the identity registry")]
    UnknownPerson,
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
    /// Events recorded now.
    pub new: usize,
    /// Events whose UID was already held (under any source record) or repeated.
    pub duplicate: usize,
    /// Events without an Irradiation Event UID (not recorded).
    pub refused: usize,
}

/// What the store holds for one person, as `gatewayd safety show` prints it (JSON).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PatientSafety {
    /// `person:{id}`.
    pub person: String,
    pub report: SafetyReport,
}

#[cfg(test)]
mod tests;
