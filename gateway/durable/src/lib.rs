//! File durability primitives shared by every crate that writes to disk.
//!
//! The gateway promises that a success status goes out only after the data is on stable
//! storage. That takes more than `write`: the file's data must be synced, and a newly created
//! or renamed directory entry is durable only once its directory is synced too. These helpers
//! do exactly those steps and name the path in every error.
//!
//! Invariants:
//! - Files made here are created with mode 0600 (owner only), never world readable.
//! - Directories made here are created with mode 0700.
//! - [`write_atomic`] leaves either the old file or the complete new file after a crash.
//! - A state file two processes change is changed only under its [`LockedFile`] lock, read
//!   from disk under that lock, and a lock that cannot be taken or a file that cannot be
//!   read is an error (it fails closed).
//!
//! Modules: this file (private files and folders, syncs, atomic replace), [`lock`]
//! (the file lock) and [`data_format`] (the data directory's format version, checked across
//! firmware updates).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub mod data_format;
pub mod lock;

pub use lock::{DEFAULT_LOCK_WAIT, LockError, LockedFile};

/// An I/O failure with the step and path it happened on.
#[derive(Debug)]
pub struct Error {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.action,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Attaches the step and path to an `io::Result`.
pub trait Context<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T, Error>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T, Error> {
        self.map_err(|source| Error {
            action,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Creates `dir` and its parents with mode 0700 (existing directories are left as they are).
pub fn create_private_dir(dir: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ctx("create directory", dir)
}

/// Creates `dir` (mode 0700, with parents) if missing and makes the new entries durable
/// by syncing each folder that gained one. An existing directory is left untouched.
pub fn ensure_private_dir(dir: &Path) -> Result<(), Error> {
    if dir.is_dir() {
        return Ok(());
    }
    // The nearest ancestor that exists gains the first new entry.
    let mut missing = vec![dir];
    let mut cursor = dir.parent();
    while let Some(p) = cursor {
        if p.as_os_str().is_empty() || p.is_dir() {
            break;
        }
        missing.push(p);
        cursor = p.parent();
    }
    create_private_dir(dir)?;
    for created in missing.iter().rev() {
        sync_dir(parent_of(created))?;
    }
    Ok(())
}

/// Creates a new file with mode 0600; fails if it exists.
pub fn create_new_private(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .ctx("create", path)
}

/// Makes directory entries in `dir` (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("sync directory", dir)
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_atomic_inner(path, bytes, false)
}

/// As [`write_atomic`], the file owned by the owner (user and group) of its folder: for a
/// helper run as root (e.g. RAUC's pre-install handler) writing where the service user must
/// read it. The owner is set before the rename, so the file never appears root-owned.
pub fn write_atomic_as_dir_owner(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_atomic_inner(path, bytes, true)
}

fn write_atomic_inner(path: &Path, bytes: &[u8], dir_owner: bool) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = parent_of(path);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut file = create_new_private(&tmp)?;
    if dir_owner {
        let owner = fs::metadata(dir).ctx("stat", dir)?;
        std::os::unix::fs::fchown(&file, Some(owner.uid()), Some(owner.gid()))
            .ctx("chown", &tmp)?;
    }
    file.write_all(bytes).ctx("write", &tmp)?;
    file.sync_all().ctx("sync", &tmp)?;
    drop(file);
    fs::rename(&tmp, path).ctx("rename into place", path)?;
    sync_dir(dir)
}

/// The whole file, or None if it does not exist.
pub fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx("read", path),
    }
}

/// Removes a file durably (its directory is synced). A missing file is not an error.
pub fn remove_durably(path: &Path) -> Result<bool, Error> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(parent_of(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).ctx("remove", path),
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_content_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.path().join("k.tmp").exists());
    }

    #[test]
    fn atomic_write_as_dir_owner_takes_the_folders_owner() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let owned = dir.path().join("service");
        fs::create_dir(&owned).unwrap();
        // As root (CI, the appliance's RAUC handler) the folder gets another owner, as the
        // service user's folder has; as anyone else the owner is oneself either way.
        let other = 4242;
        if is_root() {
            std::os::unix::fs::chown(&owned, Some(other), Some(other)).unwrap();
        }
        let p = owned.join("meta.json");
        write_atomic_as_dir_owner(&p, b"{}").unwrap();
        let (d, f) = (fs::metadata(&owned).unwrap(), fs::metadata(&p).unwrap());
        assert_eq!((f.uid(), f.gid()), (d.uid(), d.gid()));
        if is_root() {
            assert_eq!(f.uid(), other);
        }
        assert_eq!(f.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"{}");
    }

    /// Whether this process runs as root (its own files are owned by uid 0).
    fn is_root() -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let probe = tempfile::NamedTempFile::new().unwrap();
        fs::metadata(probe.path()).unwrap().uid() == 0
    }

    #[test]
    fn create_new_refuses_existing_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        create_new_private(&p).unwrap();
        let err = create_new_private(&p).unwrap_err();
        assert!(err.to_string().contains("x"), "{err}");
    }

    #[test]
    fn private_dir_mode_is_0700() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b");
        create_private_dir(&p).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn ensure_private_dir_creates_nested_folders_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/c");
        ensure_private_dir(&p).unwrap();
        assert!(p.is_dir());
        ensure_private_dir(&p).unwrap();
        let mode = fs::metadata(dir.path().join("a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn remove_durably_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gone");
        assert!(!remove_durably(&p).unwrap());
        fs::write(&p, b"x").unwrap();
        assert!(remove_durably(&p).unwrap());
    }
}
