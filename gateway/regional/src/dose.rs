//! CT dose reports read at a clinic's gateway, carried to the core's safety store: the
//! clinic's sealed `dose-report` (the events of one report and the patient as the clinic
//! knows them) and the core's sealed `dose-ack` once the events are durable there.
//!
//! Topics: reports go to `bk/{core}/req/{clinic}/{msg}`, acknowledgements to
//! `bk/{clinic}/resp/{core}/{msg}` (the booking inboxes), `{msg}` random per message. The
//! clinic's dose task sends a report and waits for its acknowledgement
//! ([`crate::clinic::ClinicExchange::send_dose`]); without one it keeps the report queued in
//! its spool and sends it again later, so a report is never lost and, the events being
//! de-duplicated by Irradiation Event UID at the core, never counted twice.
//! Nothing here is kept on disk.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use gateway_booking::{DoseEventView, PatientRef};

/// `kind` of a sealed dose report (clinic -> core).
pub const KIND_DOSE: &str = "dose-report";
/// `kind` of a sealed acknowledgement of a dose report (core -> clinic).
pub const KIND_DOSE_ACK: &str = "dose-ack";

/// The CT events of one dose report received at a clinic.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireDose {
    /// The report's SOP Instance UID (no patient data); its acknowledgement names it.
    pub report_id: String,
    /// The patient as the clinic knows them (its own patient id).
    pub patient: PatientRef,
    /// The report's Accession Number, when it has one.
    #[serde(default)]
    pub accession: Option<String>,
    /// The events (`hospital` = the clinic).
    pub events: Vec<DoseEventView>,
}

impl std::fmt::Debug for WireDose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireDose")
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

/// The core has the report's events durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireDoseAck {
    pub report_id: String,
}

/// A report a clinic sent, as the core's exchange hands it to the safety task: the clinic's
/// id, the report, and `done` (`true` once the events are durable: then the acknowledgement
/// goes back).
#[derive(Debug)]
pub struct DoseIn {
    pub clinic: String,
    pub dose: WireDose,
    pub done: oneshot::Sender<bool>,
}

/// A dose report was not acknowledged by the core (not connected, no answer in time): it
/// stays queued at the clinic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the core did not acknowledge the dose report; it stays queued")]
pub struct DoseNotSent;
