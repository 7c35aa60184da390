//! The development key store: the spool master key in a 0600 file.
//!
//! It exists so that the gateway can be developed and tested without a TPM. It protects
//! nothing against someone who can read the data folder, which is why `gateway-config`
//! refuses it in production mode.
//!
//! Its firmware version floor is a file twin of the TPM counter, `keys/version-floor` (one
//! decimal number): same rules (starts at 0, only rises, outlives `keys wipe`), no protection.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use gateway_durable::{self as durable, Context};
use zeroize::Zeroize;

use crate::{KEY_LEN, KeyStore, KeyStoreError, MasterKey, Status};

const FILE_MAGIC: &[u8; 8] = b"GWSWKEY1";
const FLOOR_FILE: &str = "version-floor";

/// The software back end.
#[derive(Debug)]
pub struct SoftwareKeyStore {
    path: PathBuf,
}

impl SoftwareKeyStore {
    /// Where the key file of a data folder lives.
    pub fn key_path(data_dir: &Path) -> PathBuf {
        data_dir.join("keys").join("spool-master.key")
    }

    /// Where the version floor file of a data folder lives (kept by `wipe`).
    pub fn floor_path(data_dir: &Path) -> PathBuf {
        data_dir.join("keys").join(FLOOR_FILE)
    }

    /// Opens an initialised store (checks the file now, so a bad file fails at start).
    pub fn open(data_dir: &Path) -> Result<Self, KeyStoreError> {
        let store = Self {
            path: Self::key_path(data_dir),
        };
        store.read_key()?;
        Ok(store)
    }

    /// Creates a fresh random master key. Refuses to overwrite an existing one.
    pub fn init(data_dir: &Path) -> Result<Self, KeyStoreError> {
        let path = Self::key_path(data_dir);
        let dir = data_dir.join("keys");
        durable::ensure_private_dir(&dir).map_err(io_err)?;
        let mut key = [0u8; KEY_LEN];
        getrandom::getrandom(&mut key).map_err(KeyStoreError::Random)?;
        let mut file = match durable::create_new_private(&path) {
            Ok(f) => f,
            Err(e) if e.source.kind() == ErrorKind::AlreadyExists => {
                key.zeroize();
                return Err(KeyStoreError::AlreadyInitialised { path });
            }
            Err(e) => return Err(io_err(e)),
        };
        let mut body = Vec::with_capacity(FILE_MAGIC.len() + KEY_LEN);
        body.extend_from_slice(FILE_MAGIC);
        body.extend_from_slice(&key);
        key.zeroize();
        let written = file
            .write_all(&body)
            .and_then(|()| file.sync_all())
            .ctx("write", &path);
        body.zeroize();
        written.map_err(io_err)?;
        durable::sync_dir(&dir).map_err(io_err)?;
        let store = Self { path };
        store.version_floor()?;
        Ok(store)
    }

    /// Reports whether a key exists and its fingerprint.
    pub fn status_at(data_dir: &Path) -> Result<Status, KeyStoreError> {
        let store = Self {
            path: Self::key_path(data_dir),
        };
        match store.read_key() {
            Ok(key) => Ok(Status {
                backend: "software",
                initialised: true,
                master_key_id: Some(key.id()),
                version_floor: read_floor(&Self::floor_path(data_dir))?,
            }),
            Err(KeyStoreError::NotInitialised { .. }) => Ok(Status {
                backend: "software",
                initialised: false,
                master_key_id: None,
                version_floor: read_floor(&Self::floor_path(data_dir))?,
            }),
            Err(e) => Err(e),
        }
    }

    /// Status of this open store.
    pub fn status(&self) -> Result<Status, KeyStoreError> {
        let key = self.read_key()?;
        Ok(Status {
            backend: "software",
            initialised: true,
            master_key_id: Some(key.id()),
            version_floor: read_floor(&self.floor_file())?,
        })
    }

    fn floor_file(&self) -> PathBuf {
        self.path.with_file_name(FLOOR_FILE)
    }

    /// Crypto-shred: overwrites the key file with zeros, syncs, and removes it. The version
    /// floor file stays (the floor outlives a wipe, like the TPM counter).
    pub fn wipe(data_dir: &Path) -> Result<bool, KeyStoreError> {
        let path = Self::key_path(data_dir);
        match fs::OpenOptions::new().write(true).open(&path) {
            Ok(mut f) => {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0) as usize;
                f.write_all(&vec![0u8; len.max(FILE_MAGIC.len() + KEY_LEN)])
                    .and_then(|()| f.sync_all())
                    .ctx("overwrite", &path)
                    .map_err(io_err)?;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(io_err(durable::Error {
                    action: "open",
                    path,
                    source: e,
                }));
            }
        }
        durable::remove_durably(&path).map_err(io_err)
    }

    fn read_key(&self) -> Result<MasterKey, KeyStoreError> {
        let path = &self.path;
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(KeyStoreError::NotInitialised { path: path.clone() });
            }
            Err(e) => {
                return Err(io_err(durable::Error {
                    action: "stat",
                    path: path.clone(),
                    source: e,
                }));
            }
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyStoreError::InsecurePermissions {
                path: path.clone(),
                mode,
            });
        }
        let mut body = fs::read(path).ctx("read", path).map_err(io_err)?;
        let result = if body.len() != FILE_MAGIC.len() + KEY_LEN {
            Err(KeyStoreError::Corrupt {
                path: path.clone(),
                reason: "wrong length",
            })
        } else if &body[..FILE_MAGIC.len()] != FILE_MAGIC {
            Err(KeyStoreError::Corrupt {
                path: path.clone(),
                reason: "bad magic",
            })
        } else {
            let mut key = [0u8; KEY_LEN];
            key.copy_from_slice(&body[FILE_MAGIC.len()..]);
            let master = MasterKey::from_bytes(key);
            key.zeroize();
            Ok(master)
        };
        body.zeroize();
        result
    }
}

impl KeyStore for SoftwareKeyStore {
    fn backend(&self) -> &'static str {
        "software"
    }

    fn spool_master_key(&self) -> Result<MasterKey, KeyStoreError> {
        self.read_key()
    }

    fn identity(&self) -> Option<std::sync::Arc<dyn crate::DeviceIdentity>> {
        // Development identities come from cert_file/key_file, not from this store.
        None
    }

    fn version_floor(&self) -> Result<u64, KeyStoreError> {
        let path = self.floor_file();
        match read_floor(&path)? {
            Some(floor) => Ok(floor),
            None => {
                durable::write_atomic(&path, b"0\n").map_err(io_err)?;
                Ok(0)
            }
        }
    }

    fn raise_version_floor(&self, to: u64) -> Result<u64, KeyStoreError> {
        let floor = self.version_floor()?;
        if crate::floor_raise_steps(floor, to)? == 0 {
            return Ok(floor);
        }
        durable::write_atomic(&self.floor_file(), format!("{to}\n").as_bytes()).map_err(io_err)?;
        Ok(to)
    }
}

/// The floor recorded in `path`, `None` when there is no file yet.
fn read_floor(path: &Path) -> Result<Option<u64>, KeyStoreError> {
    let Some(bytes) = durable::read_if_exists(path).map_err(io_err)? else {
        return Ok(None);
    };
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| KeyStoreError::Corrupt {
            path: path.to_path_buf(),
            reason: "not a version floor number",
        })
}

fn io_err(e: durable::Error) -> KeyStoreError {
    KeyStoreError::Io {
        action: e.action,
        path: e.path,
        source: e.source,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::MAX_FLOOR_STEP;

    #[test]
    fn open_before_init_says_to_run_keys_init() {
        let dir = tempfile::tempdir().unwrap();
        let err = SoftwareKeyStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, KeyStoreError::NotInitialised { .. }));
        assert!(err.to_string().contains("gatewayd keys init"), "{err}");
    }

    #[test]
    fn init_then_open_yields_the_same_key_and_a_0600_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = SoftwareKeyStore::init(dir.path())
            .unwrap()
            .spool_master_key()
            .unwrap();
        let b = SoftwareKeyStore::open(dir.path())
            .unwrap()
            .spool_master_key()
            .unwrap();
        assert_eq!(a.expose(), b.expose());
        let mode = fs::metadata(SoftwareKeyStore::key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn init_twice_is_refused_and_keeps_the_first_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = SoftwareKeyStore::init(dir.path())
            .unwrap()
            .spool_master_key()
            .unwrap();
        assert!(matches!(
            SoftwareKeyStore::init(dir.path()).unwrap_err(),
            KeyStoreError::AlreadyInitialised { .. }
        ));
        let b = SoftwareKeyStore::open(dir.path())
            .unwrap()
            .spool_master_key()
            .unwrap();
        assert_eq!(a.expose(), b.expose());
    }

    #[test]
    fn wipe_removes_the_key_and_a_new_init_gives_a_different_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = SoftwareKeyStore::init(dir.path())
            .unwrap()
            .spool_master_key()
            .unwrap();
        assert!(SoftwareKeyStore::wipe(dir.path()).unwrap());
        assert!(!SoftwareKeyStore::key_path(dir.path()).exists());
        assert!(!SoftwareKeyStore::wipe(dir.path()).unwrap());
        let b = SoftwareKeyStore::init(dir.path())
            .unwrap()
            .spool_master_key()
            .unwrap();
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn the_floor_starts_at_0_only_rises_and_outlives_a_wipe() {
        let dir = tempfile::tempdir().unwrap();
        let store = SoftwareKeyStore::init(dir.path()).unwrap();
        assert_eq!(store.version_floor().unwrap(), 0);
        assert_eq!(
            SoftwareKeyStore::status_at(dir.path())
                .unwrap()
                .version_floor,
            Some(0)
        );
        assert_eq!(store.raise_version_floor(3).unwrap(), 3);
        assert_eq!(store.raise_version_floor(2).unwrap(), 3, "never lowered");
        assert_eq!(store.version_floor().unwrap(), 3);
        let err = store
            .raise_version_floor(3 + MAX_FLOOR_STEP + 1)
            .unwrap_err();
        assert!(
            matches!(err, KeyStoreError::FloorRaiseTooLarge { floor: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("more than 1000 versions"), "{err}");
        assert_eq!(
            store.raise_version_floor(3 + MAX_FLOOR_STEP).unwrap(),
            3 + MAX_FLOOR_STEP
        );
        assert!(SoftwareKeyStore::wipe(dir.path()).unwrap());
        assert_eq!(
            SoftwareKeyStore::status_at(dir.path())
                .unwrap()
                .version_floor,
            Some(3 + MAX_FLOOR_STEP)
        );
        let again = SoftwareKeyStore::init(dir.path()).unwrap();
        assert_eq!(again.version_floor().unwrap(), 3 + MAX_FLOOR_STEP);
    }

    #[test]
    fn a_garbled_floor_file_is_corrupt_not_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = SoftwareKeyStore::init(dir.path()).unwrap();
        fs::write(SoftwareKeyStore::floor_path(dir.path()), "seven\n").unwrap();
        assert!(matches!(
            store.version_floor().unwrap_err(),
            KeyStoreError::Corrupt { .. }
        ));
        assert!(matches!(
            store.raise_version_floor(9).unwrap_err(),
            KeyStoreError::Corrupt { .. }
        ));
    }

    #[test]
    fn world_readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        SoftwareKeyStore::init(dir.path()).unwrap();
        let p = SoftwareKeyStore::key_path(dir.path());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SoftwareKeyStore::open(dir.path()).unwrap_err(),
            KeyStoreError::InsecurePermissions { .. }
        ));
    }
}
