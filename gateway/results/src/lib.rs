//! Results returned to the clinic that booked the exam (images and report).
//!
//! - [`core::CoreResults`] (the core gateway): drains two virtual spool destinations,
//!   [`IMAGES_ROUTE`] (every DICOM object) and [`REPORTS_ROUTE`] (every ORU^R01). An object
//!   whose cloud uplink (`[results] source`) has confirmed it is matched to a booked
//!   appointment by Accession Number (else Study Instance UID) and counted for it; the
//!   booking clinic gets a sealed notice (instances so far, `complete` after the quiet
//!   period or a final report), and each matched report sealed as it came. Both are sent
//!   again until the clinic acknowledges them. The state (what was counted, what was
//!   acknowledged) is a sealed file written before the spool is told, so a crash repeats
//!   work and never loses or double-counts it.
//! - [`clinic::ClinicResults`] (a clinic): records each notice and report of its own
//!   appointments (sealed file, before acknowledging), pulls the announced studies from the
//!   cloud archive (QIDO-RS, WADO-RS over the uplink's mutual TLS) straight into the spool
//!   through the IRWF Patient ID rewriter, as results (only the results destinations take
//!   them), stores each report (PID rewritten) as an HL7 result for the EMR uplink, and
//!   answers the kiosk ([`gateway_booking::ResultsSource`]).
//!
//! No patient data in logs or errors: appointments, spool ids and counts only.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod clinic;
pub mod core;
pub mod metrics;
mod state;

pub use metrics::Metrics;

use std::path::PathBuf;

use gateway_spool::{ObjectKind, Route};

/// The core's virtual destination of every DICOM object (drained by [`core::CoreResults`]).
pub const IMAGES_ROUTE: &str = "core-results";
/// The core's virtual destination of every ORU^R01 (drained by [`core::CoreResults`]).
pub const REPORTS_ROUTE: &str = "core-reports";
/// Where the results state lives under the data directory.
pub const DIR: &str = "results";

/// The spool routes a core with `[results]` adds to its uplinks.
pub fn core_routes() -> Vec<Route> {
    vec![
        Route::new(IMAGES_ROUTE, ObjectKind::Dicom),
        Route::new(REPORTS_ROUTE, ObjectKind::Hl7).with_message_types(["ORU^R01"]),
    ]
}

/// Failures of the results state (the spool's and the archive's are reported where they
/// happen and retried).
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error(transparent)]
    Sealed(#[from] gateway_booking::sealed::SealError),
    #[error("results state {path} is unreadable")]
    Corrupt { path: PathBuf },
    #[error("results state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] gateway_spool::SpoolError),
    /// Pulling from the cloud archive failed (no UID or patient data in the reason).
    #[error("pull from the cloud archive: {reason}")]
    Pull { reason: String },
    /// A returned report could not be stored.
    #[error("returned report: {reason}")]
    Report { reason: String },
    #[error("a blocking task of the results service failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Unix seconds now.
fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
