//! Regional exam booking, without I/O beyond the core's ledger file: schedules and their
//! slots, and the core gateway's ledger that decides every booking request. This is the
//! domain: the kiosk (HTTP) and the regional exchange (MQTT) both depend on it, never the
//! other way round.
//!
//! - [`schedule`]: the `gateway-schedule` crate, re-exported: a scanner's opening hours in
//!   its time zone (Asia/Tokyo by default), slot length and holidays; the slots of a day
//!   with stable ids (`{schedule}.{YYYYMMDDTHHMM}` in local time). Its rules have one home
//!   there, shared with `gateway-config`; [`Schedule`], [`ScheduleSpec`],
//!   [`ScheduleProblem`] and [`Slot`] are re-exported here too.
//! - [`ledger`]: the core's appointments. Every request carries a client-made id and is
//!   decided once: the same request gets the same answer again, a contested slot goes to
//!   exactly one request, and the decision is on disk before it is returned. Appointment
//!   states follow FHIR R4 (`proposed -> pending -> booked -> cancelled | fulfilled |
//!   noshow`); a hold (`pending`) keeps its slot until it expires.
//! - [`service`]: the ledger as a service: one thread (`booking-ledger`) owns the
//!   [`Ledger`] and does its file work; everyone else holds a cloneable [`LedgerHandle`] and
//!   awaits typed requests over a channel, so no async worker waits on the ledger's `fsync`.
//! - [`backend`]: what a kiosk asks of the domain ([`SlotSource`], [`BookingBackend`]) and
//!   the answers ([`SlotAnswer`], [`AppointmentView`], [`BookingRefused`], ...).
//! - [`results`]: what a kiosk asks about the results of a booked exam ([`ResultsSource`]):
//!   images and report received/delivered ([`AppointmentResults`]) and, for a physician, the
//!   report's text ([`ReportText`]); [`NoResults`] where none come back.
//! - [`order`]: the OMG^O19 a booked exam becomes for the core's RIS, and its spool message
//!   key ([`order::ris_order`]).
//! - [`safety`]: what the core's safety service reports before a booking ([`SafetyCheck`]):
//!   contrast reactions to acknowledge and the cumulative CT dose ([`SafetyReport`]).
//! - [`sealed`]: booking files at rest, sealed with AES-256-GCM under a key derived from the
//!   key store's master key (they hold patient identity).
//! - [`worklist`]: Modality Worklist items of booked appointments and the C-FIND matching
//!   rules (universal, single value, wildcard, DA/TM ranges, PN by component group).
//!
//! Invariants: no panic on any input (ids and times come from the network); the ledger
//! never holds two live appointments for one slot; a refusal changes nothing.

// Worklist matching (C-FIND identifiers) and order building read network input: no indexing
// or string slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]
#![cfg_attr(test, allow(clippy::indexing_slicing, clippy::string_slice))]

pub mod backend;
pub mod ledger;
pub mod order;
pub mod results;
pub mod safety;
pub mod sealed;
pub mod service;
pub mod worklist;

pub use backend::{
    AppointmentRequest, AppointmentView, BookingBackend, BookingRefused, BoxFuture, SlotAnswer,
    SlotQuery, SlotSource, SlotView,
};
/// The schedule rules and calendar (`gateway-schedule`), so that `crate::schedule::..` and
/// `gateway_booking::schedule::..` name the one definition.
pub use gateway_schedule as schedule;
pub use gateway_schedule::{Schedule, ScheduleProblem, ScheduleSpec, Slot};
pub use ledger::{
    Appointment, AppointmentStatus, Block, BookingRequest, Decision, Ledger, LedgerError,
    PatientRef, Refusal,
};
pub use results::{
    AppointmentResults, NoResults, ReportState, ReportText, ResultsSource, ResultsUnavailable,
};
pub use safety::{
    ContrastClass, DoseEventView, DoseSummary, SafetyCheck, SafetyReport, SafetyUnavailable,
    SafetyWarning, WarningKind,
};
pub use sealed::SealKey;
pub use service::{LedgerHandle, LedgerService};
pub use worklist::{WorklistItem, WorklistQuery};
