//! The HL7 v2 listener: MLLP over TCP on `hl7.listen`, every accepted message made durable in
//! the spool before its sender gets AA/CA.
//!
//! Module map:
//! - [`service`]: the listener, connection limit, idle timeout, drain on shutdown, and the
//!   per-connection loop (MLLP framing -> charset -> parse -> store -> acknowledgement, all
//!   protocol logic from `gateway-hl7`).
//! - `commit`: the group committer, one thread that takes every message waiting (from all
//!   connections) and stores them with one journal append and `fdatasync`
//!   ([`gateway_spool::Spool::store_messages`]), so durable acknowledgement costs one disk
//!   flush per group, not per message.
//! - [`allow`]: who may send: the `[[hl7.peers]]` allow list checked per message once its
//!   MSH is read; a refused message gets AR with ERR 103 and is not stored, the refusal is
//!   counted and audited (once per connection and reason, on a blocking thread).
//! - `clock`: the acknowledgement's MSH-7 timestamp and MSH-10 control ids.
//! - [`observe`]: observers of durable messages (the core's booking ledger reads SIU from
//!   its RIS) behind a bounded channel: the listener `try_send`s and never waits on them; a
//!   message that does not fit is counted and logged, never silently lost.
//!
//! Invariants:
//! - AA/CA go out only after the spool reported the message stored (or already stored: a
//!   duplicate MSH-10 from the same sender gets the same answer and is stored once).
//! - A full or failing spool is answered AE/CE with ERR 207 and a fixed reason, never AA.
//! - No acknowledgement waits on an observer: they get the message over a bounded channel
//!   without waiting (drops counted in `gateway_hl7_observer_dropped_total{reason}`).
//! - Frames on one connection are answered in order; one bad frame or connection never
//!   affects another; no panics on input; memory per connection is bounded by
//!   `max_frame_bytes`.
//! - With a non-empty allow list, a message from a sender not on it is never stored: it
//!   gets AR (ERR-3 103, ERR-8 a fixed text) before its content is checked.
//! - No patient data in logs or metrics: peers by address, messages by type and length.

// The listener reads network input: no indexing or string slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]
#![cfg_attr(test, allow(clippy::indexing_slicing, clippy::string_slice))]

pub mod allow;
mod clock;
mod commit;
mod metrics;
pub mod observe;
pub mod service;

pub use allow::{Hl7Peer, Refusal};
pub use metrics::Metrics;
pub use observe::{OBSERVER_QUEUE, Observed, Observer};
pub use service::{Hl7Error, Hl7Service, Hl7Settings};
