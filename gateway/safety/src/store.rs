//! The safety store on disk: one sealed journal of ops and its sealed head, both
//! [`gateway_registry::journal`] frame files (sealed under
//! [`gateway_keystore::KeyPurpose::SafetyAtRest`]), in the store's folder under an
//! exclusive lock (`safety.lock`).
//!
//! - `journal.sealed` (generation *g*): one frame per acknowledged change (a `Vec<Op>`),
//!   appended and `fdatasync`'d before the change is applied or answered. A compaction
//!   writes the whole state as journal *g*+1 (temp file, fsync, rename, fsync of the
//!   folder): the journal is its own snapshot, so there is no second file whose generation
//!   could disagree with it.
//! - `head.sealed` (generation *g*): the journal's frame count, replaced after each append,
//!   so frames cut off the journal's end are told apart from a torn last append.
//!
//! Open: the journal is replayed; a torn last frame (a crash mid-append: never answered)
//! is cut off; any other damage fails the open naming the file and frame. A head of the
//! journal's generation that counts more frames than the journal has, or a head of a later
//! generation, fails the open; no head (or an earlier generation's: a crash right after a
//! compaction) is accepted only while the journal holds at most one frame beyond the
//! compaction's.
//!
//! Why not the registry's `store.rs` (snapshot + journal + head): it is written for the
//! registry's `State` and `Op` and names the identity registry in its errors; making it
//! generic touches every path of the registry's open. The safety store is small (reactions
//! and dose events, not demographics), so a journal that is rewritten whole at compaction
//! is enough, and it reuses the registry's frame files, key derivation and lock.

use std::path::{Path, PathBuf};

use gateway_registry::journal::{self, Appender, JournalError, SealKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::state::{Op, State};

pub(crate) const JOURNAL_FILE: &str = "journal.sealed";
pub(crate) const HEAD_FILE: &str = "head.sealed";
pub(crate) const LOCK_FILE: &str = "safety.lock";
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const JOURNAL_MAGIC: &[u8; 5] = b"GWSJ\x01";
const JOURNAL_ROLE: &str = "safety-journal";
const HEAD_MAGIC: &[u8; 5] = b"GWSH\x01";
const HEAD_ROLE: &str = "safety-head";
/// Ops per frame of a compacted journal.
const CHUNK: usize = 1024;
/// Compact when the journal has at least this many frames and more than the state's ops.
const COMPACT_MIN_FRAMES: u64 = 4096;

#[derive(Serialize, Deserialize)]
struct Head {
    frames: u64,
    /// Frames the journal had when its generation was written (a compaction's).
    #[serde(default)]
    base: u64,
}

/// The store could not be opened. Names files and frames, never content.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("safety store: {0}")]
    Journal(#[from] JournalError),
    #[error("safety store {path}: frame {frame} opens but does not decode")]
    Decode { path: PathBuf, frame: u64 },
    #[error("safety store {path}: {problem}")]
    Head {
        path: PathBuf,
        problem: &'static str,
    },
    #[error("safety store: {0}")]
    Locked(#[from] gateway_durable::LockError),
    #[error("safety store: cannot start its thread: {0}")]
    Thread(std::io::Error),
}

/// The files; owned by the store thread.
#[derive(Debug)]
pub(crate) struct Store {
    dir: PathBuf,
    key: SealKey,
    journal: Appender,
    /// Frames the current generation began with (a compaction's).
    base: u64,
    broken: bool,
    _lock: gateway_durable::LockedFile,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, replaying it into `state`.
    pub fn open(dir: &Path, key: SealKey, state: &mut State) -> Result<Self, OpenError> {
        gateway_durable::ensure_private_dir(dir).map_err(JournalError::from)?;
        let lock = gateway_durable::LockedFile::lock(
            &dir.join(JOURNAL_FILE),
            &dir.join(LOCK_FILE),
            LOCK_WAIT,
        )?;
        let path = dir.join(JOURNAL_FILE);
        let read = journal::read(
            &path,
            &key,
            JOURNAL_MAGIC,
            JOURNAL_ROLE,
            true,
            |frame, plain| {
                let ops: Vec<Op> =
                    serde_json::from_slice(&plain).map_err(|_| OpenError::Decode {
                        path: path.clone(),
                        frame,
                    })?;
                ops.into_iter().for_each(|op| state.apply(op));
                Ok::<(), OpenError>(())
            },
        )?;
        let head = read_head(dir, &key)?;
        let journal = match read {
            Some(r) => Appender::open(&path, JOURNAL_ROLE, r.generation, r.frames, r.good_len)?,
            None if head.is_some() => {
                return Err(OpenError::Head {
                    path,
                    problem: "a sealed head without its journal (the journal was removed)",
                });
            }
            None => Appender::create(&path, JOURNAL_MAGIC, JOURNAL_ROLE, 0)?,
        };
        let base = check_head(dir, head, &journal)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            journal,
            base,
            broken: false,
            _lock: lock,
        })
    }

    /// Makes one change durable (one journal frame, `fdatasync`).
    pub fn commit(&mut self, ops: &[Op]) -> Result<(), JournalError> {
        if self.broken {
            return Err(JournalError::Damaged {
                path: self.dir.join(JOURNAL_FILE),
                frame: self.journal.frames(),
                problem: "the journal could not be reopened after a compaction",
            });
        }
        let plain = Zeroizing::new(serde_json::to_vec(ops).map_err(|_| JournalError::Random)?);
        self.journal.append(&self.key, &plain)?;
        self.write_head_after_change();
        Ok(())
    }

    fn write_head_after_change(&self) {
        if let Err(e) = write_head(&self.dir, &self.key, &self.journal, self.base) {
            tracing::warn!(error = %e, "safety store: journal head not replaced");
        }
    }

    /// Compacts when the journal has grown well past the state (see the module docs).
    pub fn maybe_compact(&mut self, state: &State, ops_in_state: usize) {
        let frames = self.journal.frames();
        if frames < COMPACT_MIN_FRAMES || frames <= ops_in_state as u64 / CHUNK as u64 * 2 {
            return;
        }
        if let Err(e) = self.compact(state) {
            tracing::warn!(error = %e, "safety store: compaction failed; the journal stands");
        }
    }

    /// Rewrites the journal as the next generation holding the state.
    pub fn compact(&mut self, state: &State) -> Result<(), JournalError> {
        let next = self.journal.generation() + 1;
        let path = self.dir.join(JOURNAL_FILE);
        let ops = state.snapshot_ops();
        let chunks: Vec<&[Op]> = ops.chunks(CHUNK).collect();
        let frames = chunks.len() as u64;
        journal::write_new(
            &path,
            &self.key,
            JOURNAL_MAGIC,
            JOURNAL_ROLE,
            next,
            chunks.into_iter().map(|c| {
                serde_json::to_vec(c)
                    .map(Zeroizing::new)
                    .map_err(|_| JournalError::Random)
            }),
        )?;
        let len = std::fs::metadata(&path)
            .map_err(|source| {
                JournalError::Io(gateway_durable::Error {
                    action: "stat",
                    path: path.clone(),
                    source,
                })
            })?
            .len();
        match Appender::open(&path, JOURNAL_ROLE, next, frames, len) {
            Ok(j) => {
                self.journal = j;
                self.base = frames;
                self.write_head_after_change();
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }
}

fn write_head(
    dir: &Path,
    key: &SealKey,
    journal: &Appender,
    base: u64,
) -> Result<(), JournalError> {
    let plain = serde_json::to_vec(&Head {
        frames: journal.frames(),
        base,
    })
    .map(Zeroizing::new)
    .map_err(|_| JournalError::Random)?;
    journal::write_new::<JournalError>(
        &dir.join(HEAD_FILE),
        key,
        HEAD_MAGIC,
        HEAD_ROLE,
        journal.generation(),
        std::iter::once(Ok(plain)),
    )
}

/// The head file's generation and content, when there is one.
fn read_head(dir: &Path, key: &SealKey) -> Result<Option<(u64, Head)>, OpenError> {
    let path = dir.join(HEAD_FILE);
    let mut head = None;
    let read = journal::read(&path, key, HEAD_MAGIC, HEAD_ROLE, false, |frame, plain| {
        let h: Head = serde_json::from_slice(&plain).map_err(|_| OpenError::Decode {
            path: path.clone(),
            frame,
        })?;
        head = Some(h);
        Ok::<(), OpenError>(())
    })?;
    Ok(match (read, head) {
        (Some(r), Some(h)) => Some((r.generation, h)),
        _ => None,
    })
}

/// See the module docs; answers the frames the current generation began with.
fn check_head(dir: &Path, head: Option<(u64, Head)>, journal: &Appender) -> Result<u64, OpenError> {
    let path = dir.join(HEAD_FILE);
    let (generation, frames) = (journal.generation(), journal.frames());
    let problem = match &head {
        Some((g, h)) if *g == generation && frames < h.frames => Some(
            "the journal has fewer frames than its sealed head records (frames were cut off its end)",
        ),
        Some((g, h)) if *g == generation => return Ok(h.base),
        Some((g, _)) if *g > generation => Some(
            "the sealed head is of a later generation than the journal (an older journal was put back)",
        ),
        // No head of this generation: only a crash before the first head write after a
        // compaction (generation > 0) or the first append (generation 0) explains it.
        _ if generation == 0 && frames > 1 => {
            Some("no sealed head for a journal of more than one frame (the head was removed)")
        }
        _ => None,
    };
    match problem {
        Some(problem) => Err(OpenError::Head { path, problem }),
        None => Ok(if generation == 0 { 0 } else { frames }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::DoseEvent;
    use crate::state::StoredDose;
    use gateway_keystore::{KeyPurpose, MasterKey};
    use gateway_registry::SourceKey;

    fn key() -> SealKey {
        SealKey::derive_for(&MasterKey::from_bytes([5; 32]), KeyPurpose::SafetyAtRest)
    }

    fn dose(i: u32) -> Op {
        Op::PutDose {
            uid: format!("2.25.{i}"),
            dose: StoredDose {
                source: SourceKey {
                    hospital_id: "H".into(),
                    patient_id: format!("P{}", i % 7),
                },
                event: DoseEvent {
                    event_uid: format!("2.25.{i}"),
                    datetime: None,
                    ctdivol_mgy: Some(1.0),
                    dlp_mgy_cm: Some(f64::from(i)),
                    target_region: None,
                    protocol: None,
                },
                recorded_at: "2027-01-01T00:00:00.000Z".into(),
            },
        }
    }

    #[test]
    fn a_compaction_rewrites_the_journal_as_the_next_generation_and_replays_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::default();
        let mut store = Store::open(dir.path(), key(), &mut state).unwrap();
        for i in 0..1100 {
            let op = dose(i);
            store.commit(std::slice::from_ref(&op)).unwrap();
            state.apply(op);
        }
        let path = dir.path().join(JOURNAL_FILE);
        let before = std::fs::metadata(&path).unwrap().len();
        store.compact(&state).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < before);
        assert_eq!(journal::generation(&path, JOURNAL_MAGIC).unwrap(), Some(1));
        // Appends go on after the compaction.
        let op = dose(9999);
        store.commit(std::slice::from_ref(&op)).unwrap();
        state.apply(op);
        drop(store);
        let mut again = State::default();
        let _store = Store::open(dir.path(), key(), &mut again).unwrap();
        assert_eq!(again.doses, state.doses);
        assert_eq!(again.doses.len(), 1101);
    }
}
