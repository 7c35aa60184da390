//! Key store of the clinic gateway.
//!
//! Every secret the gateway uses comes from here. The rest of the firmware sees only the
//! narrow [`KeyStore`] trait, so a real TPM 2.0 back end and the development software twin
//! are interchangeable (CONVENTIONS 7).
//!
//! Module map:
//! - [`master`]: [`MasterKey`], the spool master key handed to the spool once at start.
//! - [`software`]: the development back end, a 0600 key file under `data_dir/keys/`.
//!
//! Invariants:
//! - Key material is zeroized on drop and never printed (`Debug` shows only the key id).
//! - The TPM is never on the per-object path: the spool master key is obtained once at
//!   start and per-object data keys are wrapped in software with it.
//! - `wipe` is a crypto-shred: once the master key is gone, every sealed blob is noise.
//! - The software back end is refused in `mode = "production"` by `gateway-config`.

mod master;
mod software;

pub use master::{KEY_LEN, KeyId, MasterKey};
pub use software::SoftwareKeyStore;

use std::path::{Path, PathBuf};

/// What went wrong in the key store. Details stay on the box (they name local paths only).
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// The key store has not been initialised (or was wiped).
    #[error(
        "no spool master key at {path}: the key store is not initialised or was wiped; \
         run `gatewayd keys init` (objects sealed under a wiped key cannot be recovered)"
    )]
    NotInitialised { path: PathBuf },
    /// `keys init` on an initialised store.
    #[error(
        "key store already initialised at {path}; run `gatewayd keys wipe` first to replace it"
    )]
    AlreadyInitialised { path: PathBuf },
    /// A key file exists but is unusable.
    #[error("key file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: &'static str },
    /// A key file is readable by others than the gateway.
    #[error("key file {path} has mode {mode:o}; it must be 0600")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    /// File system failure on a named path.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(getrandom::Error),
    /// The configured back end is not part of this build.
    #[error("keystore.backend = \"{backend}\" is not available in this build")]
    BackendUnavailable { backend: &'static str },
}

/// A source of the gateway's keys.
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// Short back end name for logs and `keys status`.
    fn backend(&self) -> &'static str;
    /// The spool master key. Called once at start; the spool keeps it in memory.
    fn spool_master_key(&self) -> Result<MasterKey, KeyStoreError>;
}

/// `keys status` report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub backend: &'static str,
    pub initialised: bool,
    /// Fingerprint of the spool master key, when initialised.
    pub master_key_id: Option<KeyId>,
}

/// Which back end to use (built by `gatewayd` from `[keystore]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Software,
    /// A TPM 2.0 reached through the given TCTI string.
    Tpm {
        tcti: String,
    },
}

/// Opens the configured key store. Fails when it is not initialised.
pub fn open(backend: &Backend, data_dir: &Path) -> Result<Box<dyn KeyStore>, KeyStoreError> {
    match backend {
        Backend::Software => Ok(Box::new(SoftwareKeyStore::open(data_dir)?)),
        Backend::Tpm { .. } => Err(KeyStoreError::BackendUnavailable { backend: "tpm" }),
    }
}

/// `gatewayd keys init`: creates the keys of a new box.
pub fn init(backend: &Backend, data_dir: &Path) -> Result<Status, KeyStoreError> {
    match backend {
        Backend::Software => SoftwareKeyStore::init(data_dir)?.status(),
        Backend::Tpm { .. } => Err(KeyStoreError::BackendUnavailable { backend: "tpm" }),
    }
}

/// `gatewayd keys status`.
pub fn status(backend: &Backend, data_dir: &Path) -> Result<Status, KeyStoreError> {
    match backend {
        Backend::Software => SoftwareKeyStore::status_at(data_dir),
        Backend::Tpm { .. } => Err(KeyStoreError::BackendUnavailable { backend: "tpm" }),
    }
}

/// `gatewayd keys wipe`: crypto-shred. Returns whether there was anything to wipe.
pub fn wipe(backend: &Backend, data_dir: &Path) -> Result<bool, KeyStoreError> {
    match backend {
        Backend::Software => SoftwareKeyStore::wipe(data_dir),
        Backend::Tpm { .. } => Err(KeyStoreError::BackendUnavailable { backend: "tpm" }),
    }
}
