//! The TPM 2.0 back end (cargo feature `tpm`), through tss-esapi.
//!
//! Hierarchy, all under the owner hierarchy:
//! - a storage root key (ECC P-256, restricted decryption) made persistent at
//!   [`SRK_HANDLE`]. Its template carries a random `unique` value that is never stored, so
//!   once the key is evicted (`keys wipe`) nobody can recreate it: every blob wrapped under
//!   it becomes noise. Its Name is recorded at `keys init` and compared at every start; a
//!   cleared or swapped TPM shows up as a missing key or a different Name (tamper).
//! - the device identity key (ECC P-256 signing, ECDSA-SHA256), created inside the TPM;
//!   only its public and TPM-wrapped private blobs are stored.
//! - the spool master key, a sealed data object (optionally bound to PCR values); it is
//!   unsealed once at start and wraps per-object data keys in software.
//!
//! The key blobs (not saved contexts) live in `data_dir/keys/`, so keys survive a TPM reset.
//! Every transient object and session is flushed after use.
//!
//! The firmware version floor (anti-downgrade) lives in two owner NV indices, not under the
//! storage root key, so `keys wipe` leaves it alone:
//! - [`FLOOR_COUNTER_INDEX`]: an NV counter (8 bytes, owner read/write, no DA). A counter
//!   can only be incremented, and a new one starts at the highest value the TPM has ever
//!   recorded for a counter, not at 0;
//! - [`FLOOR_BASE_INDEX`]: an ordinary 8-byte index written once with the counter's first
//!   value.
//!
//! floor = counter - base; raising the floor to `to` increments the counter `to - floor`
//! times. Both are defined by `keys init` and on first use, and an index at either handle
//! whose attributes differ from ours is refused, never used.
//!
//! tss-esapi's `Context` is not thread-safe: one thread owns it, and callers send it
//! closures ([`TpmKeyStore::call`]). The TPM is never on the per-byte path.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tss_esapi::attributes::{NvIndexAttributesBuilder, ObjectAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::{CapabilityType, NvIndexType, SessionType};
use tss_esapi::handles::{
    KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Digest, EccParameter, EccPoint, EccScheme, HashScheme, HashcheckTicket,
    KeyedHashScheme, MaxNvBuffer, NvPublic, NvPublicBuilder, PcrSelectionListBuilder, PcrSlot,
    Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters,
    SensitiveData, Signature, SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, Error as TssError};
use zeroize::Zeroize;

#[cfg(test)]
use crate::is_software_tpm;
use crate::{DeviceIdentity, KEY_LEN, KeyStore, KeyStoreError, MasterKey, Status};

/// Persistent handle of the storage root key (TCG provisioning guidance: the SRK's slot).
pub const SRK_HANDLE: u32 = 0x8100_0001;
/// NV index of the firmware version floor's counter (owner-defined range).
pub const FLOOR_COUNTER_INDEX: u32 = 0x0180_6701;
/// NV index holding the counter's value at floor 0 (written once).
pub const FLOOR_BASE_INDEX: u32 = 0x0180_6702;
/// TPMA_NV_WRITTEN: set by the TPM on the first write; not part of what we define.
const NV_WRITTEN: u32 = 1 << 29;
const STATE_FILE: &str = "tpm-state.json";
const IDENTITY_PUB: &str = "identity.pub";
const IDENTITY_PRIV: &str = "identity.priv";
const MASTER_PUB: &str = "spool-master.pub";
const MASTER_PRIV: &str = "spool-master.priv";
const FIRST_TRANSIENT: u32 = 0x8000_0000;

/// What `keys init` recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TpmState {
    srk_handle: u32,
    /// Name of the storage root key (hex), compared at every start.
    srk_name: String,
    /// PCRs (SHA-256 bank) the spool master key is sealed to; empty: no PCR policy.
    pcrs: Vec<u8>,
}

type Job = Box<dyn FnOnce(&mut Context) + Send>;

/// The TPM back end.
#[derive(Debug, Clone)]
pub struct TpmKeyStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    jobs: Mutex<mpsc::Sender<Job>>,
    keys_dir: PathBuf,
    state: Option<TpmState>,
}

impl TpmKeyStore {
    /// Connects to the TPM through `tcti` (e.g. `device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`) without checking any key.
    fn connect(tcti: &str, data_dir: &Path) -> Result<Self, KeyStoreError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| tpm_err("parse TCTI", e))?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("tpm".into())
            .spawn(move || {
                let mut context = match Context::new(conf) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(tpm_err("open TPM", e)));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(&mut context);
                }
            })
            .map_err(|source| KeyStoreError::Io {
                action: "start TPM thread",
                path: PathBuf::new(),
                source,
            })?;
        ready_rx.recv().map_err(|_| KeyStoreError::TpmGone)??;
        let keys_dir = data_dir.join("keys");
        let state = read_state(&keys_dir)?;
        Ok(Self {
            inner: Arc::new(Inner {
                jobs: Mutex::new(jobs),
                keys_dir,
                state,
            }),
        })
    }

    /// Runs `f` on the TPM thread and waits for its result.
    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Context) -> Result<R, KeyStoreError> + Send + 'static,
    ) -> Result<R, KeyStoreError> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| KeyStoreError::TpmGone)?;
        rx.recv().map_err(|_| KeyStoreError::TpmGone)?
    }

    /// Opens an initialised store and checks that the TPM is the one `keys init` saw.
    pub fn open(tcti: &str, data_dir: &Path) -> Result<Self, KeyStoreError> {
        let store = Self::connect(tcti, data_dir)?;
        let state = store.state()?.clone();
        store.call(move |ctx| check_srk(ctx, &state))?;
        Ok(store)
    }

    fn state(&self) -> Result<&TpmState, KeyStoreError> {
        self.inner
            .state
            .as_ref()
            .ok_or_else(|| KeyStoreError::NotInitialised {
                path: self.inner.keys_dir.join(STATE_FILE),
            })
    }

    /// `keys init`: makes the storage root key persistent, creates the identity key and
    /// seals a fresh spool master key (to `pcrs` when not empty).
    pub fn init(tcti: &str, data_dir: &Path, pcrs: &[u8]) -> Result<Status, KeyStoreError> {
        let keys_dir = data_dir.join("keys");
        if keys_dir.join(STATE_FILE).exists() {
            return Err(KeyStoreError::AlreadyInitialised {
                path: keys_dir.join(STATE_FILE),
            });
        }
        gateway_durable::ensure_private_dir(&keys_dir).map_err(io_err)?;
        let store = Self::connect(tcti, data_dir)?;
        // The floor first: a foreign index at its handles refuses init before any key exists.
        store.call(|ctx| floor(ctx, true))?;
        let pcrs = pcrs.to_vec();
        let dir = keys_dir.clone();
        let state = store.call(move |ctx| provision(ctx, &dir, pcrs))?;
        let json = serde_json::to_vec_pretty(&state).map_err(|e| KeyStoreError::Tpm {
            action: "encode state",
            detail: e.to_string(),
        })?;
        gateway_durable::write_atomic(&keys_dir.join(STATE_FILE), &json).map_err(io_err)?;
        let store = Self::open(tcti, data_dir)?;
        let master = store.spool_master_key()?;
        Ok(Status {
            backend: "tpm",
            initialised: true,
            master_key_id: Some(master.id()),
            version_floor: store.call(|ctx| floor(ctx, false))?,
        })
    }

    /// `keys status` (reads the floor without defining it).
    pub fn status_at(tcti: &str, data_dir: &Path) -> Result<Status, KeyStoreError> {
        match Self::open(tcti, data_dir) {
            Ok(store) => Ok(Status {
                backend: "tpm",
                initialised: true,
                master_key_id: Some(store.spool_master_key()?.id()),
                version_floor: store.call(|ctx| floor(ctx, false))?,
            }),
            Err(KeyStoreError::NotInitialised { .. }) => {
                let store = Self::connect(tcti, data_dir)?;
                Ok(Status {
                    backend: "tpm",
                    initialised: false,
                    master_key_id: None,
                    version_floor: store.call(|ctx| floor(ctx, false))?,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// `keys wipe`: evicts the storage root key and deletes every key blob. The version floor's
    /// NV indices stay: the floor outlives a wipe.
    pub fn wipe(tcti: &str, data_dir: &Path) -> Result<bool, KeyStoreError> {
        let store = Self::connect(tcti, data_dir)?;
        let had_state = store.inner.state.is_some();
        let evicted = store.call(evict_srk)?;
        let mut removed = false;
        for name in [
            STATE_FILE,
            IDENTITY_PUB,
            IDENTITY_PRIV,
            MASTER_PUB,
            MASTER_PRIV,
        ] {
            removed |= gateway_durable::remove_durably(&store.inner.keys_dir.join(name))
                .map_err(io_err)?;
        }
        Ok(had_state || evicted || removed)
    }

    /// The TPM's vendor string (e.g. "SW TPM" for swtpm).
    pub fn vendor(&self) -> Result<String, KeyStoreError> {
        self.call(|ctx| {
            tss_esapi::utils::get_tpm_vendor(ctx).map_err(|e| tpm_err("read vendor", e))
        })
    }

    /// Transient objects currently loaded in the TPM (should be 0 between operations).
    pub fn transient_objects(&self) -> Result<usize, KeyStoreError> {
        self.call(|ctx| {
            let (data, _) = ctx
                .get_capability(CapabilityType::Handles, FIRST_TRANSIENT, 64)
                .map_err(|e| tpm_err("list handles", e))?;
            Ok(match data {
                CapabilityData::Handles(list) => list.len(),
                _ => 0,
            })
        })
    }

    /// The device identity key.
    pub fn identity(&self) -> Result<TpmIdentity, KeyStoreError> {
        let public = read_public_blob(&self.inner.keys_dir.join(IDENTITY_PUB))?;
        let point = ecc_point(&public)?;
        Ok(TpmIdentity {
            store: self.clone(),
            point,
        })
    }
}

impl KeyStore for TpmKeyStore {
    fn backend(&self) -> &'static str {
        "tpm"
    }

    fn spool_master_key(&self) -> Result<MasterKey, KeyStoreError> {
        let pcrs = self.state()?.pcrs.clone();
        let dir = self.inner.keys_dir.clone();
        self.call(move |ctx| unseal_master(ctx, &dir, &pcrs))
    }

    fn identity(&self) -> Option<Arc<dyn DeviceIdentity>> {
        TpmIdentity::try_from(self)
            .ok()
            .map(|i| Arc::new(i) as Arc<dyn DeviceIdentity>)
    }

    fn tpm_vendor(&self) -> Option<Result<String, KeyStoreError>> {
        Some(self.vendor())
    }

    fn version_floor(&self) -> Result<u64, KeyStoreError> {
        self.call(|ctx| floor(ctx, true))?
            .ok_or(KeyStoreError::FloorIndex {
                index: FLOOR_COUNTER_INDEX,
                detail: "not defined after defining it".into(),
            })
    }

    fn raise_version_floor(&self, to: u64) -> Result<u64, KeyStoreError> {
        self.call(move |ctx| raise_floor(ctx, to))
    }
}

impl TryFrom<&TpmKeyStore> for TpmIdentity {
    type Error = KeyStoreError;
    fn try_from(store: &TpmKeyStore) -> Result<Self, KeyStoreError> {
        store.identity()
    }
}

/// The TPM-held device identity key.
#[derive(Debug, Clone)]
pub struct TpmIdentity {
    store: TpmKeyStore,
    point: Vec<u8>,
}

impl DeviceIdentity for TpmIdentity {
    fn public_key(&self) -> Vec<u8> {
        self.point.clone()
    }

    fn sign_sha256(&self, message: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(message).to_vec();
        let dir = self.store.inner.keys_dir.clone();
        self.store.call(move |ctx| sign_digest(ctx, &dir, digest))
    }
}

// ---- operations on the TPM thread ------------------------------------------------

/// Whether a persistent object or NV index exists at `handle` (asked without provoking an
/// error).
fn persistent_exists(ctx: &mut Context, handle: u32) -> Result<bool, KeyStoreError> {
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, handle, 1)
        .map_err(|e| tpm_err("list handles", e))?;
    Ok(match data {
        CapabilityData::Handles(list) => list.iter().any(|h| u32::from(*h) == handle),
        _ => false,
    })
}

fn srk_handle() -> Result<PersistentTpmHandle, KeyStoreError> {
    PersistentTpmHandle::new(SRK_HANDLE).map_err(|e| tpm_err("persistent handle", e))
}

/// The attributes every key of ours made in this TPM shares: bound to this TPM and its
/// parent, generated inside it, used with its (empty) authValue, and `noDA` (see
/// [`identity_template`]).
fn own_key_attributes() -> ObjectAttributesBuilder {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
}

fn srk_template() -> Result<Public, KeyStoreError> {
    let attributes = own_key_attributes()
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(|e| tpm_err("SRK attributes", e))?;
    let mut x = [0u8; 32];
    let mut y = [0u8; 32];
    getrandom::getrandom(&mut x).map_err(KeyStoreError::Random)?;
    getrandom::getrandom(&mut y).map_err(KeyStoreError::Random)?;
    let unique = EccPoint::new(
        EccParameter::try_from(x.to_vec()).map_err(|e| tpm_err("SRK unique", e))?,
        EccParameter::try_from(y.to_vec()).map_err(|e| tpm_err("SRK unique", e))?,
    );
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(|e| tpm_err("SRK parameters", e))?,
        )
        .with_ecc_unique_identifier(unique)
        .build()
        .map_err(|e| tpm_err("SRK template", e))
}

/// The device identity: an unrestricted ECDSA P-256 signing key under the SRK, with
/// `noDA` like every object of ours. Its authValue is empty, not a secret to guess, and a TPM
/// counts every start after a non-orderly shutdown (a power cut) as a failed authorisation:
/// under dictionary-attack protection a box that lost power a few times could not sign its
/// TLS handshakes (fleet, uplinks, bundle downloads) until the TPM's recovery time passed
/// (seen in the QEMU power-cut test: TPM_RC_LOCKOUT after four cuts with swtpm's defaults).
fn identity_template() -> Result<Public, KeyStoreError> {
    let attributes = own_key_attributes()
        .with_decrypt(false)
        .with_sign_encrypt(true)
        .with_restricted(false)
        .build()
        .map_err(|e| tpm_err("identity attributes", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()
            .map_err(|e| tpm_err("identity parameters", e))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(|e| tpm_err("identity template", e))
}

fn sealed_template(policy: Option<Digest>) -> Result<Public, KeyStoreError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        // With a PCR policy, only the policy authorises unsealing.
        .with_user_with_auth(policy.is_none())
        .build()
        .map_err(|e| tpm_err("sealed attributes", e))?;
    let mut builder = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default());
    if let Some(policy) = policy {
        builder = builder.with_auth_policy(policy);
    }
    builder.build().map_err(|e| tpm_err("sealed template", e))
}

fn pcr_selection(pcrs: &[u8]) -> Result<tss_esapi::structures::PcrSelectionList, KeyStoreError> {
    let slots = pcrs
        .iter()
        .map(|&n| PcrSlot::try_from(1u32 << u32::from(n)).map_err(|e| tpm_err("PCR index", e)))
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| tpm_err("PCR selection", e))
}

/// A policy session bound to the current values of `pcrs` (trial: to compute the digest).
fn pcr_policy_session(
    ctx: &mut Context,
    pcrs: &[u8],
    trial: bool,
) -> Result<PolicySession, KeyStoreError> {
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            if trial {
                SessionType::Trial
            } else {
                SessionType::Policy
            },
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(|e| tpm_err("start policy session", e))?
        .ok_or(KeyStoreError::Tpm {
            action: "start policy session",
            detail: "no session returned".into(),
        })?;
    let policy = PolicySession::try_from(session).map_err(|e| tpm_err("policy session", e))?;
    let selection = pcr_selection(pcrs)?;
    if let Err(e) = ctx.policy_pcr(policy, Digest::default(), selection) {
        flush_session(ctx, policy);
        return Err(tpm_err("bind policy to PCRs", e));
    }
    Ok(policy)
}

fn flush_session(ctx: &mut Context, session: PolicySession) {
    let handle: tss_esapi::handles::SessionHandle = session.into();
    let _ = ctx.flush_context(ObjectHandle::from(handle));
}

fn flush(ctx: &mut Context, handle: impl Into<ObjectHandle>) {
    let _ = ctx.flush_context(handle.into());
}

fn provision(ctx: &mut Context, dir: &Path, pcrs: Vec<u8>) -> Result<TpmState, KeyStoreError> {
    let persistent = srk_handle()?;
    if persistent_exists(ctx, SRK_HANDLE)? {
        return Err(KeyStoreError::Tpm {
            action: "keys init",
            detail: format!(
                "persistent handle {SRK_HANDLE:#x} is already in use by another key; \
                 run `gatewayd keys wipe` first if it is this gateway's"
            ),
        });
    }
    let template = srk_template()?;
    let primary = ctx
        .execute_with_nullauth_session(|ctx| {
            ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
        })
        .map_err(|e| tpm_err("create storage root key", e))?;
    let made = ctx.execute_with_nullauth_session(|ctx| {
        ctx.evict_control(
            Provision::Owner,
            primary.key_handle.into(),
            Persistent::Persistent(persistent),
        )
    });
    flush(ctx, primary.key_handle);
    let srk = KeyHandle::from(made.map_err(|e| tpm_err("make storage root key persistent", e))?);
    let (_, name, _) = ctx
        .read_public(srk)
        .map_err(|e| tpm_err("read storage root key", e))?;

    let identity = ctx.execute_with_nullauth_session(|ctx| {
        ctx.create(srk, identity_template()?, None, None, None, None)
            .map_err(KeyStoreError::from)
    })?;
    write_blobs(
        dir,
        IDENTITY_PUB,
        IDENTITY_PRIV,
        &identity.out_public,
        &identity.out_private,
    )?;

    let policy = if pcrs.is_empty() {
        None
    } else {
        let trial = pcr_policy_session(ctx, &pcrs, true)?;
        let digest = ctx.policy_get_digest(trial);
        flush_session(ctx, trial);
        Some(digest.map_err(|e| tpm_err("policy digest", e))?)
    };
    let mut key = [0u8; KEY_LEN];
    getrandom::getrandom(&mut key).map_err(KeyStoreError::Random)?;
    let secret = SensitiveData::try_from(key.to_vec()).map_err(|e| tpm_err("seal", e));
    key.zeroize();
    let secret = secret?;
    let sealed = ctx.execute_with_nullauth_session(|ctx| {
        ctx.create(
            srk,
            sealed_template(policy)?,
            None,
            Some(secret),
            None,
            None,
        )
        .map_err(KeyStoreError::from)
    })?;
    write_blobs(
        dir,
        MASTER_PUB,
        MASTER_PRIV,
        &sealed.out_public,
        &sealed.out_private,
    )?;
    Ok(TpmState {
        srk_handle: SRK_HANDLE,
        srk_name: hex::encode(name.value()),
        pcrs,
    })
}

fn srk(ctx: &mut Context) -> Result<KeyHandle, KeyStoreError> {
    if !persistent_exists(ctx, SRK_HANDLE)? {
        return Err(KeyStoreError::Tamper {
            detail: format!(
                "the storage root key at {SRK_HANDLE:#x} is missing: the TPM was cleared or \
                 replaced since `gatewayd keys init`"
            ),
        });
    }
    ctx.tr_from_tpm_public(TpmHandle::Persistent(srk_handle()?))
        .map(KeyHandle::from)
        .map_err(|e| tpm_err("open storage root key", e))
}

fn check_srk(ctx: &mut Context, state: &TpmState) -> Result<(), KeyStoreError> {
    let handle = srk(ctx)?;
    let (_, name, _) = ctx
        .read_public(handle)
        .map_err(|e| tpm_err("read storage root key", e))?;
    let found = hex::encode(name.value());
    if found != state.srk_name {
        return Err(KeyStoreError::Tamper {
            detail: format!(
                "storage root key Name mismatch (recorded {}, TPM has {found}): the TPM was \
                 cleared or replaced since `gatewayd keys init`",
                state.srk_name
            ),
        });
    }
    Ok(())
}

fn load(
    ctx: &mut Context,
    dir: &Path,
    public: &str,
    private: &str,
) -> Result<KeyHandle, KeyStoreError> {
    let public = read_public_blob(&dir.join(public))?;
    let private_path = dir.join(private);
    let bytes = fs::read(&private_path).map_err(|source| KeyStoreError::Io {
        action: "read",
        path: private_path.clone(),
        source,
    })?;
    let private = Private::try_from(bytes).map_err(|e| tpm_err("decode private blob", e))?;
    let parent = srk(ctx)?;
    ctx.execute_with_nullauth_session(|ctx| ctx.load(parent, private, public))
        .map_err(|e| tpm_err("load key", e))
}

fn unseal_master(ctx: &mut Context, dir: &Path, pcrs: &[u8]) -> Result<MasterKey, KeyStoreError> {
    let handle = load(ctx, dir, MASTER_PUB, MASTER_PRIV)?;
    let unsealed = if pcrs.is_empty() {
        ctx.execute_with_nullauth_session(|ctx| ctx.unseal(handle.into()))
            .map_err(|e| tpm_err("unseal spool master key", e))
    } else {
        match pcr_policy_session(ctx, pcrs, false) {
            Ok(policy) => {
                let result =
                    ctx.execute_with_session(Some(policy.into()), |ctx| ctx.unseal(handle.into()));
                flush_session(ctx, policy);
                result.map_err(|e| KeyStoreError::PcrPolicy {
                    pcrs: pcrs.to_vec(),
                    detail: e.to_string(),
                })
            }
            Err(e) => Err(e),
        }
    };
    flush(ctx, handle);
    let unsealed = unsealed?;
    let bytes = unsealed.value();
    if bytes.len() != KEY_LEN {
        return Err(KeyStoreError::Tpm {
            action: "unseal spool master key",
            detail: format!("unsealed {} bytes, expected {KEY_LEN}", bytes.len()),
        });
    }
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(bytes);
    let master = MasterKey::from_bytes(key);
    key.zeroize();
    Ok(master)
}

fn sign_digest(ctx: &mut Context, dir: &Path, digest: Vec<u8>) -> Result<Vec<u8>, KeyStoreError> {
    let handle = load(ctx, dir, IDENTITY_PUB, IDENTITY_PRIV)?;
    let result = (|| {
        let digest = Digest::try_from(digest).map_err(|e| tpm_err("digest", e))?;
        let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(|e| tpm_err("hashcheck ticket", e))?;
        let signature = ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.sign(
                    handle,
                    digest,
                    SignatureScheme::EcDsa {
                        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                    },
                    ticket,
                )
            })
            .map_err(|e| tpm_err("sign", e))?;
        match signature {
            Signature::EcDsa(sig) => Ok(ecdsa_der(
                sig.signature_r().value(),
                sig.signature_s().value(),
            )),
            _ => Err(KeyStoreError::Tpm {
                action: "sign",
                detail: "TPM returned a non-ECDSA signature".into(),
            }),
        }
    })();
    flush(ctx, handle);
    result
}

fn evict_srk(ctx: &mut Context) -> Result<bool, KeyStoreError> {
    let persistent = srk_handle()?;
    if !persistent_exists(ctx, SRK_HANDLE)? {
        return Ok(false);
    }
    let handle = ctx
        .tr_from_tpm_public(TpmHandle::Persistent(persistent))
        .map_err(|e| tpm_err("open storage root key", e))?;
    ctx.execute_with_nullauth_session(|ctx| {
        ctx.evict_control(Provision::Owner, handle, Persistent::Persistent(persistent))
    })
    .map_err(|e| tpm_err("evict storage root key", e))?;
    Ok(true)
}

// ---- the firmware version floor (NV counter + base) ------------------------------

/// The floor's two indices, opened (ESYS handles closed by [`FloorIndices::close`]).
struct FloorIndices {
    counter: NvIndexHandle,
    base: NvIndexHandle,
}

impl FloorIndices {
    fn close(self, ctx: &mut Context) {
        close_nv(ctx, self.counter);
        close_nv(ctx, self.base);
    }
}

fn close_nv(ctx: &mut Context, handle: NvIndexHandle) {
    let mut handle = ObjectHandle::from(handle);
    let _ = ctx.tr_close(&mut handle);
}

fn floor_public(index: u32, kind: NvIndexType) -> Result<NvPublic, KeyStoreError> {
    let attributes = NvIndexAttributesBuilder::new()
        .with_nv_index_type(kind)
        .with_owner_write(true)
        .with_owner_read(true)
        .with_no_da(true)
        .build()
        .map_err(|e| tpm_err("floor index attributes", e))?;
    NvPublicBuilder::new()
        .with_nv_index(NvIndexTpmHandle::new(index).map_err(|e| tpm_err("NV index", e))?)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(8)
        .build()
        .map_err(|e| tpm_err("floor index template", e))
}

fn attribute_bits(public: &NvPublic) -> Result<u32, KeyStoreError> {
    tss_esapi::tss2_esys::TPMA_NV::try_from(public.attributes())
        .map_err(|e| tpm_err("NV attributes", e))
}

/// Opens the index at `index` (defining it from `template` when absent and `define`), and
/// checks that it is ours: same type, attributes, size, name algorithm and no policy.
/// Returns the handle and whether the index has been written.
fn open_floor_index(
    ctx: &mut Context,
    index: u32,
    template: NvPublic,
    define: bool,
) -> Result<Option<(NvIndexHandle, bool)>, KeyStoreError> {
    let handle = if persistent_exists(ctx, index)? {
        let tpm_handle = NvIndexTpmHandle::new(index).map_err(|e| tpm_err("NV index", e))?;
        ctx.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle))
            .map(NvIndexHandle::from)
            .map_err(|e| tpm_err("open floor index", e))?
    } else if define {
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.nv_define_space(Provision::Owner, None, template.clone())
        })
        .map_err(|e| tpm_err("define floor index", e))?
    } else {
        return Ok(None);
    };
    let found = match ctx.nv_read_public(handle) {
        Ok((public, _)) => public,
        Err(e) => {
            close_nv(ctx, handle);
            return Err(tpm_err("read floor index", e));
        }
    };
    let checked = (|| {
        let want = attribute_bits(&template)?;
        let have = attribute_bits(&found)?;
        let mut differences = Vec::new();
        if have & !NV_WRITTEN != want {
            differences.push(format!(
                "attributes {:#010x}, expected {want:#010x}",
                have & !NV_WRITTEN
            ));
        }
        if found.data_size() != template.data_size() {
            differences.push(format!("size {} bytes, expected 8", found.data_size()));
        }
        if found.name_algorithm() != HashingAlgorithm::Sha256 {
            differences.push("name algorithm is not SHA-256".into());
        }
        if !found.authorization_policy().value().is_empty() {
            differences.push("it has an authorisation policy".into());
        }
        if differences.is_empty() {
            Ok(have & NV_WRITTEN != 0)
        } else {
            Err(KeyStoreError::FloorIndex {
                index,
                detail: format!(
                    "the handle holds an index this firmware did not define ({}); refusing to \
                     use it (free the handle with tpm2_nvundefine if it is not needed)",
                    differences.join(", ")
                ),
            })
        }
    })();
    match checked {
        Ok(written) => Ok(Some((handle, written))),
        Err(e) => {
            close_nv(ctx, handle);
            Err(e)
        }
    }
}

fn read_u64(ctx: &mut Context, handle: NvIndexHandle, index: u32) -> Result<u64, KeyStoreError> {
    let data = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.nv_read(NvAuth::Owner, handle, 8, 0)
        })
        .map_err(|e| tpm_err("read floor index", e))?;
    let bytes: [u8; 8] = data
        .value()
        .try_into()
        .map_err(|_| KeyStoreError::FloorIndex {
            index,
            detail: format!("read {} bytes, expected 8", data.value().len()),
        })?;
    Ok(u64::from_be_bytes(bytes))
}

fn increment(ctx: &mut Context, counter: NvIndexHandle) -> Result<(), KeyStoreError> {
    ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        ctx.nv_increment(NvAuth::Owner, counter)
    })
    .map_err(|e| tpm_err("increment floor counter", e))
}

/// Opens (and, with `define`, completes: defines, gives the counter its first value, records
/// the base) both indices. `None` when they are not (fully) there and `define` is false.
/// Every step is idempotent, so a power cut between steps is finished by the next call.
fn open_floor(ctx: &mut Context, define: bool) -> Result<Option<FloorIndices>, KeyStoreError> {
    let counter_template = floor_public(FLOOR_COUNTER_INDEX, NvIndexType::Counter)?;
    let Some((counter, counter_written)) =
        open_floor_index(ctx, FLOOR_COUNTER_INDEX, counter_template, define)?
    else {
        return Ok(None);
    };
    let result = (|| {
        if !counter_written {
            if !define {
                return Ok(None);
            }
            increment(ctx, counter)?;
        }
        let base_template = floor_public(FLOOR_BASE_INDEX, NvIndexType::Ordinary)?;
        let Some((base, base_written)) =
            open_floor_index(ctx, FLOOR_BASE_INDEX, base_template, define)?
        else {
            return Ok(None);
        };
        if !base_written {
            let written = if define {
                read_u64(ctx, counter, FLOOR_COUNTER_INDEX).and_then(|value| {
                    let data = MaxNvBuffer::try_from(value.to_be_bytes().to_vec())
                        .map_err(|e| tpm_err("floor base value", e))?;
                    ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.nv_write(NvAuth::Owner, base, data, 0)
                    })
                    .map_err(|e| tpm_err("write floor base", e))
                })
            } else {
                close_nv(ctx, base);
                return Ok(None);
            };
            if let Err(e) = written {
                close_nv(ctx, base);
                return Err(e);
            }
        }
        Ok(Some(base))
    })();
    match result {
        Ok(Some(base)) => Ok(Some(FloorIndices { counter, base })),
        Ok(None) => {
            close_nv(ctx, counter);
            Ok(None)
        }
        Err(e) => {
            close_nv(ctx, counter);
            Err(e)
        }
    }
}

fn floor_value(ctx: &mut Context, indices: &FloorIndices) -> Result<u64, KeyStoreError> {
    let counter = read_u64(ctx, indices.counter, FLOOR_COUNTER_INDEX)?;
    let base = read_u64(ctx, indices.base, FLOOR_BASE_INDEX)?;
    counter
        .checked_sub(base)
        .ok_or_else(|| KeyStoreError::FloorIndex {
            index: FLOOR_BASE_INDEX,
            detail: format!(
                "the base {base} is above the counter {counter}: the base was rewritten \
                 (tampering); refusing to guess the floor"
            ),
        })
}

/// The floor; `None` when not defined and `define` is false.
fn floor(ctx: &mut Context, define: bool) -> Result<Option<u64>, KeyStoreError> {
    let Some(indices) = open_floor(ctx, define)? else {
        return Ok(None);
    };
    let value = floor_value(ctx, &indices);
    indices.close(ctx);
    value.map(Some)
}

fn raise_floor(ctx: &mut Context, to: u64) -> Result<u64, KeyStoreError> {
    let indices = open_floor(ctx, true)?.ok_or(KeyStoreError::FloorIndex {
        index: FLOOR_COUNTER_INDEX,
        detail: "not defined after defining it".into(),
    })?;
    let result = (|| {
        let floor = floor_value(ctx, &indices)?;
        for _ in 0..crate::floor_raise_steps(floor, to)? {
            increment(ctx, indices.counter)?;
        }
        floor_value(ctx, &indices)
    })();
    indices.close(ctx);
    result
}

// ---- files and encodings ---------------------------------------------------------

fn read_state(keys_dir: &Path) -> Result<Option<TpmState>, KeyStoreError> {
    let path = keys_dir.join(STATE_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|_| KeyStoreError::Corrupt {
                path,
                reason: "unreadable TPM state",
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyStoreError::Io {
            action: "read",
            path,
            source,
        }),
    }
}

fn write_blobs(
    dir: &Path,
    public_name: &str,
    private_name: &str,
    public: &Public,
    private: &Private,
) -> Result<(), KeyStoreError> {
    let public_bytes = public
        .marshall()
        .map_err(|e| tpm_err("encode public blob", e))?;
    gateway_durable::write_atomic(&dir.join(public_name), &public_bytes).map_err(io_err)?;
    gateway_durable::write_atomic(&dir.join(private_name), private.value()).map_err(io_err)
}

fn read_public_blob(path: &Path) -> Result<Public, KeyStoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyStoreError::NotInitialised {
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(KeyStoreError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    Public::unmarshall(&bytes).map_err(|_| KeyStoreError::Corrupt {
        path: path.to_path_buf(),
        reason: "not a TPM2B_PUBLIC",
    })
}

/// Uncompressed SEC1 point of an ECC public area.
fn ecc_point(public: &Public) -> Result<Vec<u8>, KeyStoreError> {
    match public {
        Public::Ecc { unique, .. } => {
            let (x, y) = (unique.x().value(), unique.y().value());
            let mut point = vec![0x04];
            point.extend(std::iter::repeat_n(0, 32usize.saturating_sub(x.len())));
            point.extend_from_slice(x);
            point.extend(std::iter::repeat_n(0, 32usize.saturating_sub(y.len())));
            point.extend_from_slice(y);
            Ok(point)
        }
        _ => Err(KeyStoreError::Tpm {
            action: "identity public key",
            detail: "not an ECC key".into(),
        }),
    }
}

/// DER `ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }`.
pub fn ecdsa_der(r: &[u8], s: &[u8]) -> Vec<u8> {
    fn integer(v: &[u8]) -> Vec<u8> {
        let start = v
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(v.len().saturating_sub(1));
        let v = &v[start.min(v.len())..];
        let mut out = vec![0x02];
        let pad = v.first().is_none_or(|&b| b & 0x80 != 0);
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    }
    let (r, s) = (integer(r), integer(s));
    let mut out = vec![0x30, (r.len() + s.len()) as u8];
    out.extend(r);
    out.extend(s);
    out
}

fn tpm_err(action: &'static str, e: TssError) -> KeyStoreError {
    KeyStoreError::Tpm {
        action,
        detail: e.to_string(),
    }
}

impl From<TssError> for KeyStoreError {
    fn from(e: TssError) -> Self {
        tpm_err("TPM command", e)
    }
}

fn io_err(e: gateway_durable::Error) -> KeyStoreError {
    KeyStoreError::Io {
        action: e.action,
        path: e.path,
        source: e.source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_der_pads_high_bit_and_strips_leading_zeros() {
        let der = ecdsa_der(&[0x00, 0x80, 0x01], &[0x7f]);
        assert_eq!(
            der,
            vec![0x30, 0x08, 0x02, 0x03, 0x00, 0x80, 0x01, 0x02, 0x01, 0x7f]
        );
    }

    #[test]
    fn software_tpm_vendor_strings_are_recognised() {
        assert!(is_software_tpm("SW   TPM"));
        assert!(!is_software_tpm("IFX"));
        assert!(!is_software_tpm("NTC NPCT75x"));
    }
}
