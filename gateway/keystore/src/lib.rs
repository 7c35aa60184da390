//! Key store of the clinic gateway.
//!
//! Every secret the gateway uses comes from here. The rest of the firmware sees only the
//! narrow [`KeyStore`] trait, so a real TPM 2.0 back end and the development software twin
//! are interchangeable (CONVENTIONS 7).
//!
//! Module map:
//! - [`master`]: [`MasterKey`], the spool master key handed to the spool once at start.
//! - [`software`]: the development back end, a 0600 key file under `data_dir/keys/`.
//! - `tpm` (cargo feature `tpm`, links libtss2): the TPM 2.0 back end. Without the
//!   feature, [`ensure_available`] and every entry point refuse `Backend::Tpm` with
//!   [`KeyStoreError::BackendUnavailable`], naming the feature.
//! - [`judge_tpm`]: the rule on software TPMs (production refuses swtpm unless
//!   `keystore.allow_software_tpm`); the daemon only logs its [`TpmVerdict`].
//!
//! Invariants:
//! - Key material is zeroized on drop and never printed (`Debug` shows only the key id).
//! - The TPM is never on the per-object path: the spool master key is obtained once at
//!   start and per-object data keys are wrapped in software with it.
//! - `wipe` is a crypto-shred: once the master key is gone, every sealed blob is noise.
//! - The firmware version floor ([`KeyStore::version_floor`]) only rises and outlives
//!   `wipe` (TPM: an NV counter minus a base recorded once, docs/adr/0013).
//! - The software back end is refused in `mode = "production"` by `gateway-config`.

mod master;
mod software;
#[cfg(feature = "tpm")]
pub mod tpm;

pub use master::{DerivedKey, KEY_LEN, KeyId, KeyPurpose, MasterKey};
pub use software::SoftwareKeyStore;

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error(
        "keystore.backend = \"{backend}\" is not available in this build: gatewayd was built \
         without the cargo feature `{backend}` (build it with `--features {backend}`)"
    )]
    BackendUnavailable { backend: &'static str },
    /// A TPM command failed.
    #[error("TPM: {action}: {detail}")]
    Tpm {
        action: &'static str,
        detail: String,
    },
    /// The TPM is not the one the keys were made in (cleared or swapped): refuse to start.
    #[error("TPM tamper check failed: {detail}")]
    Tamper { detail: String },
    /// The PCR values differ from those the spool master key was sealed to.
    #[error(
        "the spool master key is sealed to PCRs {pcrs:?} and their current values do not \
         satisfy the policy (boot chain or firmware changed?): {detail}"
    )]
    PcrPolicy { pcrs: Vec<u8>, detail: String },
    /// The TPM worker thread is gone.
    #[error("the TPM worker thread stopped")]
    TpmGone,
    /// The back end keeps no firmware version floor.
    #[error("the {backend} key store keeps no firmware version floor")]
    NoVersionFloor { backend: &'static str },
    /// A raise of the floor by more steps than [`MAX_FLOOR_STEP`]: a version number that far
    /// ahead is a mistake, and a TPM counter could never be brought back down.
    #[error(
        "refusing to raise the firmware version floor from {floor} to {to}: more than {max} \
         versions at once"
    )]
    FloorRaiseTooLarge { floor: u64, to: u64, max: u64 },
    /// A TPM NV index of the version floor is not the one this firmware defines (another
    /// program owns that handle) or its values are inconsistent.
    #[error("TPM NV index {index:#010x} of the firmware version floor: {detail}")]
    FloorIndex { index: u32, detail: String },
}

/// The largest raise of the firmware version floor in one call ([`KeyStore::raise_version_floor`]).
pub const MAX_FLOOR_STEP: u64 = 1000;

/// The versions a raise of the floor from `floor` to `to` adds: 0 when `to` is not above the
/// floor (a raise never lowers it), an error above [`MAX_FLOOR_STEP`]. The one rule of both
/// back ends.
pub(crate) fn floor_raise_steps(floor: u64, to: u64) -> Result<u64, KeyStoreError> {
    let steps = to.saturating_sub(floor);
    if steps > MAX_FLOOR_STEP {
        return Err(KeyStoreError::FloorRaiseTooLarge {
            floor,
            to,
            max: MAX_FLOOR_STEP,
        });
    }
    Ok(steps)
}

/// A source of the gateway's keys.
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// Short back end name for logs and `keys status`.
    fn backend(&self) -> &'static str;
    /// The spool master key. Called once at start; the spool keeps it in memory.
    fn spool_master_key(&self) -> Result<MasterKey, KeyStoreError>;
    /// The non-exportable device identity key, when the back end has one (the TPM).
    fn identity(&self) -> Option<Arc<dyn DeviceIdentity>>;
    /// The TPM's vendor string, for back ends that are a TPM.
    fn tpm_vendor(&self) -> Option<Result<String, KeyStoreError>> {
        None
    }
    /// The firmware version floor (anti-downgrade): the lowest firmware version this box may
    /// install. Kept where an attacker with the disk cannot lower it (a TPM NV counter).
    /// Starts at 0 (defined on first use); it outlives `keys wipe`. Blocking (TPM or file I/O):
    /// call it from a blocking thread.
    fn version_floor(&self) -> Result<u64, KeyStoreError> {
        Err(KeyStoreError::NoVersionFloor {
            backend: self.backend(),
        })
    }
    /// Raises the floor to `to`; never lowers it (a lower `to` is a no-op). Returns the floor
    /// after the call. Refuses a raise of more than [`MAX_FLOOR_STEP`] versions. Blocking.
    fn raise_version_floor(&self, to: u64) -> Result<u64, KeyStoreError> {
        let _ = to;
        Err(KeyStoreError::NoVersionFloor {
            backend: self.backend(),
        })
    }
}

/// The device identity: an ECDSA P-256 key whose private part never leaves the key store.
/// Used to sign CSRs and every mutual-TLS client handshake.
pub trait DeviceIdentity: Send + Sync + std::fmt::Debug {
    /// The public key as an uncompressed SEC1 point (65 bytes).
    fn public_key(&self) -> Vec<u8>;
    /// ECDSA P-256 signature over SHA-256(`message`), DER-encoded.
    fn sign_sha256(&self, message: &[u8]) -> Result<Vec<u8>, KeyStoreError>;
}

/// Is this TPM vendor string a software TPM (swtpm, IBM's simulator)?
pub fn is_software_tpm(vendor: &str) -> bool {
    let v = vendor.to_ascii_uppercase();
    v.contains("SW") && v.contains("TPM")
}

/// What the key store makes of the TPM it found ([`judge_tpm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpmVerdict {
    /// A TPM that is not a known software TPM.
    Hardware,
    /// A software TPM outside production mode (development, lab).
    Software,
    /// A software TPM in production mode, allowed by `keystore.allow_software_tpm`: to be
    /// logged as a warning on every start.
    SoftwareAllowed,
}

/// Production mode found a software TPM and `keystore.allow_software_tpm` is not set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the TPM reports vendor {vendor:?}, a software TPM that protects nothing; production mode \
     refuses it (set keystore.allow_software_tpm = true only for a lab box)"
)]
pub struct SoftwareTpmRefused {
    /// The vendor string, trimmed.
    pub vendor: String,
}

/// The rule on software TPMs: production refuses a software TPM (swtpm) unless
/// `allow_software_tpm` is set; any other mode takes it.
pub fn judge_tpm(
    vendor: &str,
    production: bool,
    allow_software_tpm: bool,
) -> Result<TpmVerdict, SoftwareTpmRefused> {
    if !is_software_tpm(vendor) {
        return Ok(TpmVerdict::Hardware);
    }
    match (production, allow_software_tpm) {
        (true, false) => Err(SoftwareTpmRefused {
            vendor: vendor.trim().to_owned(),
        }),
        (true, true) => Ok(TpmVerdict::SoftwareAllowed),
        (false, _) => Ok(TpmVerdict::Software),
    }
}

/// `keys status` report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub backend: &'static str,
    pub initialised: bool,
    /// Fingerprint of the spool master key, when initialised.
    pub master_key_id: Option<KeyId>,
    /// The firmware version floor, when the back end keeps one and it is defined.
    pub version_floor: Option<u64>,
}

/// Which back end to use (built by `gatewayd` from `[keystore]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Software,
    /// A TPM 2.0 reached through the given TCTI string; the spool master key is sealed to
    /// `pcrs` (SHA-256 bank) when not empty.
    Tpm {
        tcti: String,
        pcrs: Vec<u8>,
    },
}

impl Backend {
    /// Short name, as in `keystore.backend`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Software => "software",
            Backend::Tpm { .. } => "tpm",
        }
    }
}

/// Whether this build has the back end: the TPM needs the cargo feature `tpm`
/// ([`KeyStoreError::BackendUnavailable`] otherwise).
pub fn ensure_available(backend: &Backend) -> Result<(), KeyStoreError> {
    match backend {
        Backend::Software => Ok(()),
        Backend::Tpm { .. } if cfg!(feature = "tpm") => Ok(()),
        Backend::Tpm { .. } => Err(KeyStoreError::BackendUnavailable { backend: "tpm" }),
    }
}

/// Opens the configured key store. Fails when it is not initialised.
pub fn open(backend: &Backend, data_dir: &Path) -> Result<Box<dyn KeyStore>, KeyStoreError> {
    match backend {
        Backend::Software => Ok(Box::new(SoftwareKeyStore::open(data_dir)?)),
        #[cfg(feature = "tpm")]
        Backend::Tpm { tcti, .. } => Ok(Box::new(tpm::TpmKeyStore::open(tcti, data_dir)?)),
        #[cfg(not(feature = "tpm"))]
        Backend::Tpm { .. } => Err(KeyStoreError::BackendUnavailable { backend: "tpm" }),
    }
}

/// `gatewayd keys init`: creates the keys of a new box.
pub fn init(backend: &Backend, data_dir: &Path) -> Result<Status, KeyStoreError> {
    match backend {
        Backend::Software => SoftwareKeyStore::init(data_dir)?.status(),
        #[cfg(feature = "tpm")]
        Backend::Tpm { tcti, pcrs } => tpm::TpmKeyStore::init(tcti, data_dir, pcrs),
        #[cfg(not(feature = "tpm"))]
        Backend::Tpm { .. } => Err(KeyStoreError::BackendUnavailable { backend: "tpm" }),
    }
}

/// `gatewayd keys status`.
pub fn status(backend: &Backend, data_dir: &Path) -> Result<Status, KeyStoreError> {
    match backend {
        Backend::Software => SoftwareKeyStore::status_at(data_dir),
        #[cfg(feature = "tpm")]
        Backend::Tpm { tcti, .. } => tpm::TpmKeyStore::status_at(tcti, data_dir),
        #[cfg(not(feature = "tpm"))]
        Backend::Tpm { .. } => Err(KeyStoreError::BackendUnavailable { backend: "tpm" }),
    }
}

/// `gatewayd keys wipe`: crypto-shred. Returns whether there was anything to wipe.
pub fn wipe(backend: &Backend, data_dir: &Path) -> Result<bool, KeyStoreError> {
    match backend {
        Backend::Software => SoftwareKeyStore::wipe(data_dir),
        #[cfg(feature = "tpm")]
        Backend::Tpm { tcti, .. } => tpm::TpmKeyStore::wipe(tcti, data_dir),
        #[cfg(not(feature = "tpm"))]
        Backend::Tpm { .. } => Err(KeyStoreError::BackendUnavailable { backend: "tpm" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_refuses_a_software_tpm_unless_allowed() {
        let swtpm = " SW   TPM ";
        assert_eq!(
            judge_tpm(swtpm, true, false),
            Err(SoftwareTpmRefused {
                vendor: "SW   TPM".into()
            })
        );
        assert_eq!(
            judge_tpm(swtpm, true, true),
            Ok(TpmVerdict::SoftwareAllowed)
        );
        assert_eq!(judge_tpm(swtpm, false, false), Ok(TpmVerdict::Software));
        assert_eq!(judge_tpm("IFX", true, false), Ok(TpmVerdict::Hardware));
        assert!(
            judge_tpm(swtpm, true, false)
                .unwrap_err()
                .to_string()
                .contains("keystore.allow_software_tpm")
        );
    }

    #[test]
    fn the_tpm_back_end_is_available_iff_the_feature_is_built() {
        assert!(ensure_available(&Backend::Software).is_ok());
        let tpm = Backend::Tpm {
            tcti: "device:/dev/tpmrm0".into(),
            pcrs: Vec::new(),
        };
        let available = ensure_available(&tpm);
        #[cfg(feature = "tpm")]
        assert!(available.is_ok());
        #[cfg(not(feature = "tpm"))]
        assert!(
            available.is_err_and(|e| e.to_string().contains("the cargo feature `tpm`")
                && e.to_string().contains("--features tpm")),
        );
    }
}
