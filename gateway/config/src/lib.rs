//! Configuration for `gatewayd`: the TOML file read once at start, turned into typed
//! [`Settings`] or a list of every [`Problem`] found.
//!
//! "Parse, don't validate": the file is read into a raw serde schema, then each value is
//! parsed exactly once into a newtype ([`NodeId`], [`AeTitle`], [`ByteSize`], [`Tcti`], …).
//! The rest of the firmware receives `Settings` and never re-checks a value.
//!
//! ```
//! let settings = gateway_config::Settings::from_toml_str(
//!     "[node]\nid = \"clinic-001\"\ndata_dir = \"/var/lib/gatewayd\"\n",
//! )?;
//! assert!(settings.node.mode.is_production()); // secure by default
//! assert!(settings.dicom.is_none()); // a service runs iff its section is present
//! # Ok::<(), gateway_config::ConfigErrors>(())
//! ```
//!
//! # Module map
//!
//! - `raw`: the serde schema (every struct `deny_unknown_fields`; fallible values as
//!   strings) and the translation of TOML/serde errors into problems keyed by TOML path.
//! - [`types`]: the value newtypes with `FromStr`/`Display` and their [`ValueError`].
//! - [`settings`]: the typed [`Settings`], the [`defaults`], and the semantic pass:
//!   field parses, cross-field rules and production-mode refusals.
//! - `[[booking.schedule]]` is parsed into `gateway_schedule::Schedule`, the one home of the
//!   schedule rules (a value crate, like `gateway-id`; this crate depends on no service
//!   crate), and its problems are reported as `booking.schedule[{i}].{field}`.
//! - [`update`]: the daemon's [`ConfigFile`] across restarts and fleet `config-update`s
//!   (durable write, rollback when the new file cannot start its services) and
//!   [`check_remote_update`], the keys that cannot change remotely.
//! - `error`: [`Problem`] and [`ConfigErrors`].
//!
//! # Invariants
//!
//! - Unknown keys are errors, never ignored.
//! - The semantic pass reports **every** problem in one go, a missing `[node]` section
//!   among them (the sections present are still checked; the production refusals, which
//!   need `node.mode`, are then skipped rather than guessed); only a structural problem
//!   (TOML syntax, unknown key, wrong type, missing key inside a table) stops early,
//!   because nothing reliable can be read past it.
//! - A problem's key is the TOML path (`dicom.peers[0].host`, `uplink[1].url`, or
//!   `config` for the file as a whole); its message quotes only the offending value,
//!   clipped, never the surrounding config text. URL credentials are never repeated.
//! - `node.mode` defaults to `production`, which refuses the software key store,
//!   plaintext uplinks and fleet broker, file-based client certificates, a non-loopback
//!   admin listener and a non-loopback DICOM listener without a peer allow list.
//! - [`EMBEDDED_DEFAULT_TOML`] is `config/gatewayd.dev.toml` and always parses (tested);
//!   every `*.toml` in the repository's `config/` folder parses (tested).
//! - Nothing here touches the network or resolves names; addresses are literals.

mod error;
mod raw;
pub mod settings;
pub mod types;
pub mod update;

pub use error::{ConfigErrors, Problem};
pub use settings::{
    Admin, Booking, Claim, Deidentify, Deliver, DeliverTls, Dicom, DicomPeer, DicomTls,
    EMBEDDED_DEFAULT_TOML, Exchange, Fleet, Hl7, Hl7Peer, Identity, Keystore, Node, Peer, Results,
    Safety, Settings, Spool, TlsFiles, Uplink, defaults,
};
pub use types::{
    AeTitle, BrokerUrl, ByteSize, Charset, ClientAuth, Duration, Hl7MessageType, KeystoreBackend,
    Mode, NodeId, Role, Tcti, UplinkKind, UplinkName, UplinkUrl, ValueError,
};
pub use update::{
    ConfigFile, INTERRUPTED, UpdateCommit, UpdateError, UpdateOutcome, check_remote_update,
};
