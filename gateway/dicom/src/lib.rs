//! DICOM upper layer service of the clinic gateway: a C-ECHO and C-STORE SCP on dicom-ul
//! (async) that streams every received data set into the spool, and, when given a
//! [`WorklistSource`] ([`DicomService::with_worklist`]), a Modality Worklist C-FIND SCP.
//!
//! Module map:
//! - [`service`]: [`DicomService`], the TCP listener and the DICOM-over-TLS listener
//!   (handshake bounded by ARTIM, then the same policy and association loop), connection
//!   limits and shutdown.
//! - `link`: the transport under an association: dicom-ul's over TCP, or this crate's
//!   over TLS with its own negotiation mirroring dicom-ul's (dicom-ul cannot take a TLS
//!   stream whose A-ASSOCIATE-RQ was already read for the policy).
//! - [`policy`]: who may associate (called/calling AE title, address) and how many at once.
//! - `context`: what the listener hands every association (options, spool, metrics,
//!   worklist); `service` -> `association` -> `context`, never back.
//! - `association`: one association: DIMSE message loop, C-STORE streaming into the spool.
//! - [`dimse`]: command set decoding and response encoding.
//! - `element`: the one DICOM element header reader (tag, VR, 2- or 4-byte length) and the
//!   [`walker::Encoding`] of a transfer syntax; used by `walker` and `worklist`.
//! - [`walker`]: push-mode structural check of a data set as it streams.
//! - [`part10`]: the Part 10 header stored in front of each data set.
//! - [`reconcile`]: IHE IRWF Patient ID reconciliation of returned results: a streaming
//!   Part 10 rewriter and the identifier reader that matches an object to its booking.
//! - [`rdsr`]: the X-Ray Radiation Dose SR reader (CT irradiation events and totals of a
//!   stored Part 10 object); reads headers through `element`.
//! - [`storage_classes`]: the storage SOP classes offered (generated from the dictionary).
//! - [`worklist`]: Modality Worklist C-FIND: identifier to `gateway_booking::WorklistQuery`,
//!   worklist items to response identifiers.
//! - [`charset`]: Specific Character Set codecs (Japanese ISO 2022, UTF-8) for worklist text.
//! - [`scu`]: the C-STORE SCU ([`Scu`]) that delivers Part 10 objects to a PACS; uses
//!   `dimse` and `part10`, nothing of the SCP side.
//!
//! Invariants:
//! - C-STORE status 0000 is sent only after `gateway_spool::Ingest::commit` returned, i.e.
//!   the object is sealed, fsync'd and indexed. Every failure has its own status:
//!   A700 (spool full or failing), A900 (data set does not match the command),
//!   C000 (malformed data set), 0122 (SOP class not on this presentation context).
//! - A data set is never held whole in memory: PDVs go to a per-object writer thread
//!   through a bounded channel.
//! - A malformed PDU or protocol violation ends that association with an A-ABORT; other
//!   associations are unaffected. No path reachable from the network panics.
//! - C-FIND answers one pending response per matching item, then 0000 (or FE00 after a
//!   C-CANCEL-RQ); a bad identifier gets A900 or C000 and the association goes on.
//! - Logs name peers by AE title and address and objects by spool id, never by patient data.
//! - Network input is never indexed or sliced unchecked (`clippy::indexing_slicing` and
//!   `clippy::string_slice` are denied outside tests).

#![deny(clippy::indexing_slicing, clippy::string_slice)]
#![cfg_attr(test, allow(clippy::indexing_slicing, clippy::string_slice))]

mod association;
pub mod charset;
mod context;
pub mod dimse;
pub mod element;
mod link;
pub mod metrics;
pub mod part10;
pub mod policy;
pub mod rdsr;
pub mod reconcile;
pub mod scu;
pub mod service;
pub mod storage_classes;
pub mod transfers;
pub mod walker;
pub mod worklist;

pub use policy::{Peer, PolicySettings};
pub use scu::{
    Scu, ScuAssociation, ScuError, ScuLink, ScuSettings, ScuTarget, ScuTls, StoreObject,
    StoreOutcome,
};
pub use service::{DicomError, DicomService, DicomSettings, TlsListenerSettings};
pub use transfers::{Direction, StudyTransfer, Tally, Transfer, TransferSink};
pub use worklist::WorklistSource;
