//! De-identification per destination (PS3.15 Annex E): what a destination may see.
//!
//! - [`profile`]: the Basic Application Level Confidentiality Profile and its options,
//!   from [`table`] (Table E.1-1, generated from the standard's table by
//!   `tools/gen-profile-table.py`), resolved to one [`Action`] per attribute.
//! - [`pseudonym`]: the destination's keyed pseudonyms (UIDs, Patient ID, date shift),
//!   derived from the master key.
//! - [`stream`]: the streaming rewriter applied as an object leaves
//!   ([`Deidentifier`]); the stored object never changes.
//! - [`map`]: the sealed re-identification map kept on the box ([`ReidMap`]).
//! - [`destination`]: one de-identifying destination ([`Destination::apply`]: rewrite,
//!   record the pseudonyms, then the object may go).
//!
//! Nothing here logs or returns values of the object: errors name tags and offsets.

// The rewriter reads untrusted bytes: no indexing or slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]
#![cfg_attr(test, allow(clippy::indexing_slicing, clippy::string_slice))]

pub mod destination;
pub mod map;
pub mod profile;
pub mod pseudonym;
pub mod stream;
pub mod table;

pub use destination::{Applied, Destination};
pub use map::{MapError, RealPatient, RealStudy, ReidMap};
pub use profile::{Action, OptionError, Profile, ProfileOption};
pub use pseudonym::DestinationKey;
pub use stream::{DeidError, Deidentified, Deidentifier, HoldReason, Subject, deidentify};
