//! Signed A/B firmware updates, the box's side: the fleet `update` command's state machine,
//! persisted across restarts and power cuts, the resumable mutual-TLS bundle download, the
//! boundary to RAUC, the RAUC pre-install check and the health check of a trial boot.
//!
//! | module | role |
//! |---|---|
//! | [`record`] | `<data_dir>/update/record.json`: the update's phase, slots, attempts, outcome; [`UpdatePaths`] |
//! | [`machine`] | [`Updater`]: `begin` (busy, size cap, free space), `verify_and_install` (hash, signature, compatible, version, floor, data format, space, then install and the reboot request), `decide_at_start` (every power-cut case), `record_health` (mark good, raise the floor) |
//! | [`download`] | HTTP Range resume from `bundle.part`, bounded by size and deadline, paced, SHA-256 over the whole file before anything else |
//! | [`installer`] | [`Installer`] trait, [`RaucCli`] (the `rauc` CLI with timeouts, JSON output), [`FakeInstaller`] (the twin for tests) |
//! | [`manifest`] | `gateway-update.json` in the bundle and the pre-install decision |
//! | [`health`] | the health check loop over the daemon's probes |
//!
//! Everything here blocks except [`download::download`]: the daemon calls it from
//! `spawn_blocking` or a dedicated thread. Nothing here logs or returns patient data: the
//! record and every failure reason hold ids, versions, slot names, sizes and hashes only.

pub mod download;
pub mod health;
pub mod installer;
pub mod machine;
pub mod manifest;
pub mod record;

#[cfg(test)]
mod tests;

pub use download::{DownloadError, DownloadSettings};
pub use installer::{
    BundleInfo, FakeInstaller, Installer, InstallerError, InstallerStatus, RaucCli,
};
pub use machine::{FloorError, HealthVerdict, StartAction, Updater, UpdaterSettings, VersionFloor};
pub use manifest::BundleMeta;
pub use record::{Outcome, Phase, RecordStore, RollbackReason, UpdatePaths, UpdateRecord};

/// The RAUC `compatible` of this product.
pub const COMPATIBLE: &str = "clinic-gateway-x86_64";

/// Errors of the record store and the state machine's bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Io(#[from] gateway_durable::Error),
    #[error("{path} is not a readable update record ({reason}); it is kept for inspection")]
    CorruptRecord {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("cannot encode the update record: {reason}")]
    Encode { reason: String },
    #[error(transparent)]
    Installer(#[from] InstallerError),
}

/// Why an update ended `failed`: the stable `code` of the state message and a reason safe
/// to publish (no patient data, at most 256 characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Failure {
    pub code: String,
    pub reason: String,
}

impl Failure {
    pub fn new(code: &str, reason: impl Into<String>) -> Failure {
        Failure {
            code: code.to_owned(),
            reason: clip_to(&reason.into(), 256),
        }
    }

    /// A bookkeeping error (the record could not be written, ...).
    pub fn internal(e: UpdateError) -> Failure {
        Failure::new("install-failed", e.to_string())
    }
}

/// Every `failed` code an update can end with (besides the command's own `bad-args`).
pub const FAILURE_CODES: [&str; 12] = [
    "bundle-signature",
    "hash-mismatch",
    "version-mismatch",
    "incompatible",
    "downgrade",
    "data-format",
    "download-failed",
    "no-space",
    "install-failed",
    "install-interrupted",
    "busy",
    "bad-args",
];

/// A peer-supplied text (rauc's compatible or version string) cut to 64 printable chars.
pub(crate) fn clip(text: &str) -> String {
    clip_to(text, 64)
}

fn clip_to(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}
