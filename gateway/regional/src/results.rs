//! Results returned to the booking clinic, as the exchange carries them: the core's sealed
//! notices (a booked study's instances confirmed by the cloud archive) and reports (the
//! ORU^R01 of a booked exam), and the clinic's sealed acknowledgements.
//!
//! The exchange only carries and checks: the core's results task (`gateway-results`) hands
//! it [`Outgoing`] messages and gets the clinic's [`WireAck`]s back; the clinic's exchange
//! opens a notice or report, refuses one for an appointment it did not book, and hands the
//! rest to the clinic's results task as [`Incoming`], whose answer (durably recorded or not)
//! decides whether the acknowledgement goes back. Nothing here is kept on disk.
//!
//! Topics: notices and reports go to `bk/{clinic}/resp/{core}/{msg}`, acknowledgements to
//! `bk/{core}/req/{clinic}/{msg}` (the booking inboxes), `{msg}` random per message; the
//! routing header names the kind (`result-notice`, `result-report`, `result-ack`).

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use gateway_booking::AppointmentView;

/// `kind` of a sealed notice (core -> clinic).
pub const KIND_NOTICE: &str = "result-notice";
/// `kind` of a sealed report (core -> clinic).
pub const KIND_REPORT: &str = "result-report";
/// `kind` of a sealed acknowledgement (clinic -> core).
pub const KIND_ACK: &str = "result-ack";

/// The cloud archive has confirmed instances of a booked exam.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireNotice {
    pub appointment_id: String,
    pub accession: String,
    /// The Study Instance UIDs the instances carry (usually one).
    pub study_uids: Vec<String>,
    /// Instances confirmed so far.
    pub instances: u64,
    /// The core considers the study complete (quiet period passed or the final report came).
    pub complete: bool,
    /// Increases with every notice of this appointment; the clinic keeps the highest.
    pub seq: u64,
}

/// The report of a booked exam: the ORU^R01 as the core received it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireReport {
    pub appointment_id: String,
    pub accession: String,
    /// Identifies this report at the core (no patient data); repeats carry the same id.
    pub report_id: String,
    /// The ORU^R01 decoded to Unicode (sent as UTF-8 JSON).
    pub hl7: String,
    /// The character set it came in (`utf-8`, `iso-2022-jp`, `shift_jis`, `ascii`): the
    /// clinic encodes it back in this set, which its MSH-18 declares.
    pub charset: String,
}

impl std::fmt::Debug for WireReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireReport")
            .field("appointment_id", &self.appointment_id)
            .field("report_id", &self.report_id)
            .field("len", &self.hl7.len())
            .finish_non_exhaustive()
    }
}

/// The clinic has durably recorded a notice or a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireAck {
    pub appointment_id: String,
    /// The notice acknowledged (its `seq`).
    #[serde(default)]
    pub notice_seq: Option<u64>,
    /// The report acknowledged.
    #[serde(default)]
    pub report_id: Option<String>,
}

/// A notice or a report for one clinic, to be sealed and published by the core's exchange.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Notice { clinic: String, notice: WireNotice },
    Report { clinic: String, report: WireReport },
}

/// What the clinic's exchange hands its results task: the opened message and the
/// appointment it belongs to (the clinic's own copy: its patient id).
#[derive(Debug)]
pub enum Incoming {
    Notice {
        appointment: AppointmentView,
        notice: WireNotice,
        /// `true` once the notice is durably recorded: then the acknowledgement goes back.
        done: oneshot::Sender<bool>,
    },
    Report {
        appointment: AppointmentView,
        report: WireReport,
        done: oneshot::Sender<bool>,
    },
}

/// The core's end: messages to send, acknowledgements received.
#[derive(Debug)]
pub struct CoreLink {
    pub outgoing: mpsc::Receiver<Outgoing>,
    pub acks: mpsc::Sender<(String, WireAck)>,
}

/// The clinic's end: opened notices and reports for the results task.
#[derive(Debug, Clone)]
pub struct ClinicLink {
    pub incoming: mpsc::Sender<Incoming>,
}
