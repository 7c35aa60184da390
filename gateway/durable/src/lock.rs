//! The one file lock of the gateway: an exclusive advisory lock (`flock`) held for a
//! read-modify-write of a small state file that two processes share (the daemon and
//! `gatewayd users ...`, say).
//!
//! [`LockedFile::lock`] takes the lock with a bounded wait, [`LockedFile::read`] gives the
//! file as it is on disk now, and [`LockedFile::replace`] writes the new content with
//! [`write_atomic`](crate::write_atomic). The lock is released when the [`LockedFile`] is
//! dropped.
//!
//! It fails closed: a lock file that cannot be opened, a lock that cannot be taken within
//! the wait ([`LockError::Busy`], naming the file) and a state file that cannot be read are
//! errors, never a silent carry-on with a copy held in memory. The caller parses what
//! [`LockedFile::read`] returns and must treat a file it cannot parse the same way.
//!
//! The lock lives in its own file (e.g. `accounts.lock` beside `accounts.json`), because
//! the atomic replace puts a new inode under the state file's name at every write: a lock
//! on the state file itself would be a lock on an old inode.
//!
//! Blocking: taking the lock may sleep up to the wait, and the write syncs to disk. Call it
//! on a blocking thread (`tokio::task::spawn_blocking` or a dedicated thread), never on an
//! async worker.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::{Context, Error};

/// How long [`LockedFile::lock`] waits for another holder by default: longer than any
/// holder keeps it (one Argon2 verification and one durable write), short enough that an
/// operator sees an error instead of a hang.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Pause between two attempts while someone else holds the lock.
const RETRY: Duration = Duration::from_millis(10);

/// Why a state file could not be locked, read or written.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Opening the lock file, reading or writing the state file failed (step and path).
    #[error(transparent)]
    Io(#[from] Error),
    /// Another process or thread held the lock for the whole wait.
    #[error(
        "{path} is locked by another process (waited {waited:?}); nothing was changed, try again"
    )]
    Busy { path: PathBuf, waited: Duration },
}

/// A state file under its exclusive lock; the lock is released on drop.
#[derive(Debug)]
pub struct LockedFile {
    path: PathBuf,
    _lock: Flock<File>,
}

impl LockedFile {
    /// Takes the exclusive lock on `lock_path` (created 0600 if missing) for the state file
    /// `path`, waiting at most `wait` for another holder to let go.
    pub fn lock(path: &Path, lock_path: &Path, wait: Duration) -> Result<Self, LockError> {
        let start = Instant::now();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(lock_path)
            .ctx("open lock file", lock_path)?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    return Ok(Self {
                        path: path.to_path_buf(),
                        _lock: lock,
                    });
                }
                Err((back, Errno::EWOULDBLOCK | Errno::EINTR)) => {
                    let waited = start.elapsed();
                    if waited >= wait {
                        return Err(LockError::Busy {
                            path: lock_path.to_path_buf(),
                            waited,
                        });
                    }
                    file = back;
                    std::thread::sleep(RETRY.min(wait.saturating_sub(waited)));
                }
                Err((_, errno)) => {
                    return Err(Error {
                        action: "lock",
                        path: lock_path.to_path_buf(),
                        source: std::io::Error::from(errno),
                    }
                    .into());
                }
            }
        }
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state file as it is on disk now, or `None` if it does not exist yet. A file that
    /// exists but cannot be read is an error.
    pub fn read(&self) -> Result<Option<Vec<u8>>, LockError> {
        Ok(crate::read_if_exists(&self.path)?)
    }

    /// Replaces the state file atomically and durably (temp file, fsync, rename, fsync of
    /// the folder) while the lock is held.
    pub fn replace(&self, bytes: &[u8]) -> Result<(), LockError> {
        Ok(crate::write_atomic(&self.path, bytes)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join("state.json"), dir.join("state.lock"))
    }

    #[test]
    fn a_missing_file_reads_as_none_and_replace_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lock) = paths(dir.path());
        let locked = LockedFile::lock(&path, &lock, DEFAULT_LOCK_WAIT).unwrap();
        assert_eq!(locked.read().unwrap(), None);
        locked.replace(b"one").unwrap();
        assert_eq!(locked.read().unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(locked.path(), path);
    }

    #[test]
    fn a_lock_held_past_the_wait_is_a_busy_error_naming_the_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lock) = paths(dir.path());
        let held = LockedFile::lock(&path, &lock, DEFAULT_LOCK_WAIT).unwrap();
        let started = Instant::now();
        let err = LockedFile::lock(&path, &lock, Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(
            matches!(&err, LockError::Busy { path, .. } if *path == lock),
            "{err}"
        );
        assert!(err.to_string().contains("state.lock"), "{err}");
        drop(held);
        LockedFile::lock(&path, &lock, Duration::from_millis(200)).unwrap();
    }

    #[test]
    fn a_waiter_gets_the_lock_once_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lock) = paths(dir.path());
        let held = LockedFile::lock(&path, &lock, DEFAULT_LOCK_WAIT).unwrap();
        let waiter = {
            let (path, lock) = (path.clone(), lock.clone());
            std::thread::spawn(move || {
                let l = LockedFile::lock(&path, &lock, Duration::from_secs(5)).unwrap();
                l.read().unwrap()
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        held.replace(b"written while held").unwrap();
        drop(held);
        assert_eq!(
            waiter.join().unwrap().as_deref(),
            Some(&b"written while held"[..])
        );
    }

    #[test]
    fn an_unopenable_lock_file_or_unreadable_state_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir");
        let err = LockedFile::lock(
            &missing.join("state.json"),
            &missing.join("state.lock"),
            DEFAULT_LOCK_WAIT,
        )
        .unwrap_err();
        assert!(matches!(err, LockError::Io(_)), "{err}");
        assert!(err.to_string().contains("state.lock"), "{err}");
        // A directory where the state file should be cannot be read: an error, not None.
        let (path, lock) = paths(dir.path());
        std::fs::create_dir(&path).unwrap();
        let locked = LockedFile::lock(&path, &lock, DEFAULT_LOCK_WAIT).unwrap();
        let err = locked.read().unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");
    }

    #[test]
    fn concurrent_read_modify_writes_lose_no_update() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lock) = paths(dir.path());
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (path, lock) = (path.clone(), lock.clone());
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        let l = LockedFile::lock(&path, &lock, DEFAULT_LOCK_WAIT).unwrap();
                        let n: u32 = l
                            .read()
                            .unwrap()
                            .map_or(0, |b| String::from_utf8(b).unwrap().parse().unwrap());
                        l.replace((n + 1).to_string().as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "100");
    }
}
