//! What a kiosk asks of the booking domain, and the answers it gets: the free slots
//! ([`SlotSource`]) and the appointments ([`BookingBackend`]).
//!
//! The kiosk (HTTP, `gateway-kiosk`) serves these; the regional exchange
//! (`gateway-regional`: the clinic's side of the exchange, the core's own ledger) implements
//! them. Both depend on this crate, so the exchange never depends on the HTTP face.
//!
//! Every method that may wait on the network or on the core's ledger returns a future
//! ([`BoxFuture`]); none blocks the caller's thread.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future (what the traits' async methods return).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A free slot as the clinic knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotView {
    pub id: String,
    pub schedule: String,
    pub start: String,
    pub end: String,
}

/// The slots answer and how fresh it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAnswer {
    pub slots: Vec<SlotView>,
    /// When the core last published them (Unix seconds).
    pub as_of_unix: u64,
    /// True when the core has not refreshed them recently (WAN down).
    pub stale: bool,
}

/// A free-slot search (`GET /fhir/Slot`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotQuery {
    pub schedule: Option<String>,
    /// RFC 3339 lower (inclusive) and upper (exclusive) bounds on the start.
    pub start_ge: Option<String>,
    pub start_lt: Option<String>,
}

/// Where the kiosk gets free slots from (the clinic's cache of the core's publications, or
/// the core's own ledger).
pub trait SlotSource: Send + Sync + std::fmt::Debug {
    fn free_slots(&self, query: &SlotQuery) -> BoxFuture<'static, SlotAnswer>;
    /// The ids of the schedules (scanners) that can be booked, sorted: whether or not any of
    /// them has a free slot on a given day (`GET /fhir/Schedule`).
    fn schedules(&self) -> BoxFuture<'static, Vec<String>>;
}

/// What the kiosk asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppointmentRequest {
    pub request_id: String,
    pub slot_id: String,
    pub hold: bool,
    pub patient_id: String,
    pub patient_name: String,
    /// `YYYYMMDD`.
    pub birth_date: String,
    /// DICOM sex: `M`, `F`, `O`.
    pub sex: String,
    pub procedure: String,
    /// The staff member asking.
    pub staff: String,
    /// Ids of the safety warnings a physician has acknowledged for this request
    /// ([`crate::SafetyWarning::id`]).
    pub acknowledged: Vec<String>,
}

/// An appointment as the clinic knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppointmentView {
    pub id: String,
    pub request_id: String,
    pub slot_id: String,
    /// FHIR status: `pending`, `booked`, `cancelled`, ...
    pub status: String,
    pub start: String,
    pub end: String,
    pub accession: Option<String>,
    pub patient_id: String,
    pub procedure: String,
    /// True when this is the first answer to the request (201), false for a repeat (200).
    pub created: bool,
    /// Changes with every status change: `meta.versionId` and the ETag `W/"{version}"`.
    pub version: u64,
    /// What the core's safety check reported with this decision (acknowledged warnings,
    /// the cumulative dose for CT); `None` when it was not asked (e.g. a repeat read).
    pub safety: Option<crate::SafetyReport>,
}

/// How a request ended when it did not give an appointment.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BookingRefused {
    #[error("the slot was booked by another request")]
    Conflict,
    #[error("no such slot")]
    NotFound,
    #[error("the slot has already begun")]
    Expired,
    #[error("the request was refused: {0}")]
    Invalid(String),
    #[error("the core hospital cannot be reached; nothing was changed, try again later")]
    Unavailable,
    #[error("the appointment changed since it was read (now version {current}); read it again")]
    VersionMismatch { current: u64 },
    /// Safety warnings a physician must acknowledge (re-send with their ids); nothing was
    /// booked.
    #[error("safety warnings must be acknowledged by a physician before booking")]
    NeedsAcknowledgement(Box<crate::SafetyReport>),
}

impl BookingRefused {
    /// The kiosk's refusal for the core's refusal code (`version`: the appointment's current
    /// version, for a version mismatch; `safety`: the report a `NeedsAcknowledgement`
    /// refusal came with).
    pub fn from_refusal(
        code: crate::Refusal,
        reason: String,
        version: u64,
        safety: Option<crate::SafetyReport>,
    ) -> Self {
        use crate::Refusal;
        match code {
            Refusal::Conflict => Self::Conflict,
            Refusal::NotFound => Self::NotFound,
            Refusal::Expired => Self::Expired,
            Refusal::Invalid => Self::Invalid(reason),
            Refusal::VersionMismatch => Self::VersionMismatch { current: version },
            Refusal::Unavailable => Self::Unavailable,
            Refusal::NeedsAcknowledgement => {
                Self::NeedsAcknowledgement(Box::new(safety.unwrap_or_default()))
            }
        }
    }
}

/// The clinic side of the booking exchange.
pub trait BookingBackend: Send + Sync + std::fmt::Debug {
    fn request(
        &self,
        req: AppointmentRequest,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>>;

    /// Cancels the appointment `id` if it is still at version `if_match`; cancelling a
    /// cancelled appointment again gives it back unchanged.
    fn cancel(
        &self,
        id: String,
        if_match: u64,
        staff: String,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>>;

    /// The clinic's appointments of one patient.
    fn appointments_of(&self, patient_id: &str) -> BoxFuture<'static, Vec<AppointmentView>>;

    /// An opaque reference to a patient for the audit trail (e.g. a keyed MAC of the id).
    fn patient_ref(&self, patient_id: &str) -> String;
}
