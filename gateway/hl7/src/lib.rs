//! HL7 v2 over MLLP for the clinic gateway: pure logic, sans-IO (no sockets, no disk, no
//! clock, no async runtime). The MLLP listener in the daemon feeds received bytes in and
//! writes the acknowledgement bytes it gets back.
//!
//! Pipeline for one connection:
//! 1. [`mllp::MllpDecoder`]: bytes -> frames (garbage, oversized frames and resynchronisation
//!    reported as events).
//! 2. [`charset::decode`]: frame -> Unicode text, character set from MSH-18 or the listener's
//!    `hl7.charset` override. Undecodable bytes are an error, never mojibake. The original
//!    frame bytes are what gets forwarded/stored; the text is for parsing only.
//! 3. [`parse::parse`]: text -> [`parse::Message`] (segments, fields, repetitions,
//!    components, sub-components; [`parse::unescape`]).
//! 4. [`record::Header::read`] + [`record::Header::validate`], then [`record::extract`] for
//!    the typed [`record::Clinical`] record of recognised message types.
//! 5. [`ack::ack_mode`] / [`ack::AckPolicy::code_for`] / [`ack::build_ack`] /
//!    [`ack::encode_ack`]: the acknowledgement, in the message's character set.
//!    [`ack::build_minimal_nak`] when not even a header could be read
//!    ([`record::Header::from_raw_frame`] first, to answer with the right MSA-2 when only the
//!    body is undecodable).
//!
//! Module map:
//! - [`mllp`]: framing decoder and [`mllp::encode_frame`].
//! - [`charset`]: [`charset::Charset`], [`charset::CharsetOverride`], decoding, MSH-18 sniffing.
//! - [`parse`](mod@parse): the message tree, escapes, [`parse::ErrorCode`] (HL7 table 0357),
//!   [`parse::ParseError`], [`parse::Location`].
//! - [`record`]: [`record::Header`] and the typed clinical records.
//! - [`ack`]: acknowledgement policy and layout.
//! - [`reconcile`]: returned reports (IHE IRWF): PID-3 rewrite to the clinic's Patient ID and
//!   the keys that match a report to its booking.
//!
//! Invariants:
//! - No panic, hang or unbounded allocation on any input (fuzzed: `fuzz/`; a 10,000-message
//!   seeded mutation test runs in `cargo test`).
//! - The MLLP decoder holds at most `max_frame` bytes of frame plus the input not yet
//!   consumed, and its events do not depend on how the input is split.
//! - No patient data in `Debug` output or error messages: payloads, texts, names, IDs, birth
//!   dates, codes and order numbers print as lengths, counts or `<redacted>`; errors carry
//!   table codes, locations, charset names and byte offsets only.
//! - Network input is never indexed or sliced unchecked (`clippy::indexing_slicing` and
//!   `clippy::string_slice` are denied outside tests).

#![deny(clippy::indexing_slicing, clippy::string_slice)]
#![cfg_attr(test, allow(clippy::indexing_slicing, clippy::string_slice))]

pub mod ack;
pub mod charset;
pub mod mllp;
pub mod parse;
pub mod reconcile;
pub mod record;

pub use ack::{
    AckCode, AckCondition, AckError, AckPolicy, Outcome, ack_mode, build_ack, build_minimal_nak,
    encode_ack,
};
pub use charset::{Charset, CharsetOverride, DecodeError, Decoded, decode};
pub use mllp::{MllpDecoder, MllpEvent, encode_frame};
pub use parse::{Delimiters, ErrorCode, Location, Message, ParseError, parse};
pub use record::{Clinical, Header, extract};

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod tests;
