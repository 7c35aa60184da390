//! Regional exam booking, without I/O beyond the core's ledger file: schedules and their
//! slots, and the core gateway's ledger that decides every booking request.
//!
//! - [`schedule`]: a scanner's opening hours in its time zone (Asia/Tokyo by default),
//!   slot length and holidays; the slots of a day with stable ids
//!   (`{schedule}.{YYYYMMDDTHHMM}` in local time).
//! - [`ledger`]: the core's appointments. Every request carries a client-made id and is
//!   decided once: the same request gets the same answer again, a contested slot goes to
//!   exactly one request, and the decision is on disk before it is returned. Appointment
//!   states follow FHIR R4 (`proposed -> pending -> booked -> cancelled | fulfilled |
//!   noshow`); a hold (`pending`) keeps its slot until it expires.
//! - [`order`]: the OMG^O19 a booked exam becomes for the core's RIS.
//! - [`sealed`]: booking files at rest, sealed with AES-256-GCM under a key derived from the
//!   key store's master key (they hold patient identity).
//! - [`worklist`]: Modality Worklist items of booked appointments and the C-FIND matching
//!   rules (universal, single value, wildcard, DA/TM ranges, PN by component group).
//!
//! Invariants: no panic on any input (ids and times come from the network); the ledger
//! never holds two live appointments for one slot; a refusal changes nothing.

pub mod ledger;
pub mod order;
pub mod schedule;
pub mod sealed;
pub mod worklist;

pub use ledger::{
    Appointment, AppointmentStatus, Block, BookingRequest, Decision, Ledger, LedgerError,
    PatientRef, Refusal,
};
pub use schedule::{Schedule, ScheduleProblem, ScheduleSpec, Slot};
pub use sealed::SealKey;
pub use worklist::{WorklistItem, WorklistQuery};
