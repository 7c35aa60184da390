//! The core gateway's patient identity registry (名寄せ) and consent to share (公開同意).
//!
//! Source records `(hospital_id, patient_id)` with demographics arrive from HL7 ADT (the
//! core's HL7 listener, [`feed`]), from clinics' bookings ([`RegistryHandle::record_booking`])
//! and from the core's own RIS; the matcher (`gateway-identity`) links the ones that are one
//! person, queues the doubtful pairs for review, and consents gate every disclosure of one
//! hospital's data to another. Users see the [`IdentityService`] trait ([`api`]);
//! [`Registry::open`] returns its implementation, a [`RegistryHandle`].
//!
//! # Module map
//!
//! - [`api`] is the contract (trait and types) the kiosk and later features use.
//! - `service`: the `identity-registry` thread that owns state and files, the handle, the
//!   linking rules, consent and disclosure decisions, auditing, the HL7 [`feed`].
//! - `state`: the state in memory and its ops (one code path live and at replay).
//! - `store`: the registry folder: its file names, magics and roles, and its [`OpenError`].
//! - [`framestore`]: the sealed store in a folder (snapshot, journal and head; replay, torn
//!   tail, compaction), generic over its ops; the safety store uses it too.
//! - [`journal`]: the sealed frame files (AES-256-GCM frames, torn-tail detection), generic.
//! - `adt`: what is read from an ADT message (fields documented there).
//! - [`metrics`]: the `gateway_identity_*` metrics.
//!
//! # Invariants
//!
//! - Nothing of a patient is on disk in clear: every frame is sealed under the key derived
//!   for [`gateway_keystore::KeyPurpose::IdentityAtRest`].
//! - A change is answered only after its journal frame is `fdatasync`'d.
//! - Damage other than a torn last journal frame fails the open, naming file and frame.
//! - Logs, metrics, errors and audit subjects carry no patient data: audit subjects are
//!   `person:{id}`, `review:{id}`, `consent:{id}` (random ids).
//! - An unlinked record is never linked again automatically to the records it left; a pair
//!   decided `NotSame` is never linked automatically.
//! - No cross-hospital disclosure without an active consent (the referral, results to the
//!   clinic that booked, excepted and recorded as such); every decision is audited.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod adt;
pub mod api;
pub mod booked;
pub mod framestore;
pub mod journal;
pub mod metrics;
mod service;
mod state;
mod store;

pub use api::*;
pub use booked::booked_patient;
pub use metrics::Metrics;
pub use service::{Applied, LinkOutcome, Options, RecordEvent, Registry, RegistryHandle, feed};
pub use store::OpenError;
