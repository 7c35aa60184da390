//! The registry on disk: a sealed snapshot and a sealed journal (both [`crate::journal`]
//! frame files) in the registry's folder.
//!
//! - `snapshot.sealed` (generation *g*): frames of [`Op`]s that rebuild the state, then an
//!   end frame with the count (a truncated snapshot is refused). Absent until the first
//!   compaction (*g* = 0 then).
//! - `journal.sealed` (generation *g*): one frame per acknowledged change (a `Vec<Op>`),
//!   appended and `fdatasync`'d before the change is applied or answered.
//!
//! The folder is held under an exclusive lock (`registry.lock`) while open: one registry
//! per folder, across processes.
//!
//! Open: the snapshot is replayed, then the journal if its generation is the snapshot's; a
//! journal one generation behind is what a crash between the two steps of a compaction
//! leaves (its changes are in the snapshot) and is replaced by an empty one; a journal ahead
//! of the snapshot is refused. A torn last journal frame (a crash mid-append: never
//! acknowledged) is cut off; any other damage fails the open with the file and frame named.
//!
//! Compaction (when the journal holds at least as many frames as there are records, and at
//! least [`crate::Options::compact_min_frames`]): the state is written as snapshot *g*+1
//! (temp file, fsync, rename, fsync of the folder), then an empty journal *g*+1 replaces the
//! old one (atomically). Its cost is amortised over the changes that grew the journal.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::journal::{self, Appender, JournalError, SealKey};
use crate::state::{Op, State};

pub(crate) const JOURNAL_FILE: &str = "journal.sealed";
pub(crate) const SNAPSHOT_FILE: &str = "snapshot.sealed";
/// Held ([`gateway_durable::LockedFile`]) for as long as the registry is open.
pub(crate) const LOCK_FILE: &str = "registry.lock";
/// How long an open waits for a previous holder of the folder (e.g. a registry thread that
/// is finishing its queue) before it fails.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const JOURNAL_MAGIC: &[u8; 5] = b"GWIJ\x01";
const SNAPSHOT_MAGIC: &[u8; 5] = b"GWIS\x01";
const JOURNAL_ROLE: &str = "identity-journal";
const SNAPSHOT_ROLE: &str = "identity-snapshot";
/// Ops per snapshot frame.
const SNAPSHOT_CHUNK: usize = 1024;

#[derive(Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
enum SnapshotFrame {
    Ops { ops: Vec<Op> },
    End { frames: u64 },
}

/// The registry could not be opened. Names files and frames, never content.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("identity registry: {0}")]
    Journal(#[from] JournalError),
    #[error("identity registry {path}: frame {frame} opens but does not decode")]
    Decode { path: PathBuf, frame: u64 },
    #[error("identity registry {path}: the snapshot has no end mark (truncated or altered)")]
    Truncated { path: PathBuf },
    #[error(
        "identity registry {path}: journal generation {journal} does not follow snapshot generation {snapshot} (a file was replaced or removed)"
    )]
    Generation {
        path: PathBuf,
        journal: u64,
        snapshot: u64,
    },
    /// Another registry (another process, or a handle not yet stopped) holds the folder.
    #[error("identity registry: {0}")]
    Locked(#[from] gateway_durable::LockError),
    #[error("identity registry: cannot start its thread: {0}")]
    Thread(std::io::Error),
}

/// The files; owned by the registry thread.
#[derive(Debug)]
pub(crate) struct Store {
    dir: PathBuf,
    key: SealKey,
    journal: Appender,
    /// A compaction wrote the new snapshot but could not start its journal: appending to
    /// the old one would be lost at the next open, so nothing is accepted any more.
    broken: bool,
    _lock: gateway_durable::LockedFile,
}

impl Store {
    /// Opens (creating if needed) the registry in `dir`, replaying it into `state`.
    pub fn open(dir: &Path, key: SealKey, state: &mut State) -> Result<Self, OpenError> {
        gateway_durable::ensure_private_dir(dir).map_err(JournalError::from)?;
        let lock = gateway_durable::LockedFile::lock(
            &dir.join(JOURNAL_FILE),
            &dir.join(LOCK_FILE),
            LOCK_WAIT,
        )?;
        let snap_path = dir.join(SNAPSHOT_FILE);
        let mut ended = false;
        let snapshot = journal::read(
            &snap_path,
            &key,
            SNAPSHOT_MAGIC,
            SNAPSHOT_ROLE,
            false,
            |frame, plain| {
                let decode = || OpenError::Decode {
                    path: snap_path.clone(),
                    frame,
                };
                if ended {
                    return Err(decode());
                }
                match serde_json::from_slice::<SnapshotFrame>(&plain).map_err(|_| decode())? {
                    SnapshotFrame::Ops { ops } => ops.into_iter().for_each(|op| state.apply(op)),
                    SnapshotFrame::End { frames } if frames == frame => ended = true,
                    SnapshotFrame::End { .. } => return Err(decode()),
                }
                Ok(())
            },
        )?;
        if snapshot.is_some() && !ended {
            return Err(OpenError::Truncated { path: snap_path });
        }
        let generation = snapshot.map_or(0, |s| s.generation);
        let path = dir.join(JOURNAL_FILE);
        // The journal's generation is known from its header only: read it first, replay only
        // a journal of the snapshot's generation.
        let journal = match journal::generation(&path, JOURNAL_MAGIC)? {
            Some(g) if g == generation => {
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
                match read {
                    Some(r) => Appender::open(&path, JOURNAL_ROLE, g, r.frames, r.good_len)?,
                    None => Appender::create(&path, JOURNAL_MAGIC, JOURNAL_ROLE, generation)?,
                }
            }
            Some(g) if g + 1 == generation => {
                Appender::create(&path, JOURNAL_MAGIC, JOURNAL_ROLE, generation)?
            }
            Some(g) => {
                return Err(OpenError::Generation {
                    path,
                    journal: g,
                    snapshot: generation,
                });
            }
            None => Appender::create(&path, JOURNAL_MAGIC, JOURNAL_ROLE, generation)?,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            journal,
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
                problem: "the journal could not be restarted after a compaction",
            });
        }
        let plain = Zeroizing::new(serde_json::to_vec(ops).map_err(|_| JournalError::Random)?);
        self.journal.append(&self.key, &plain)
    }

    /// Frames in the journal.
    pub fn journal_frames(&self) -> u64 {
        self.journal.frames()
    }

    /// Writes `state` as the next snapshot and starts an empty journal (see module docs).
    pub fn compact(&mut self, state: &State) -> Result<(), JournalError> {
        let next = self.journal.generation() + 1;
        let mut count = 0u64;
        let frames = state
            .snapshot_ops(SNAPSHOT_CHUNK)
            .map(|ops| SnapshotFrame::Ops { ops })
            .chain(std::iter::once_with(|| SnapshotFrame::End { frames: 0 }))
            .map(|frame| {
                let frame = match frame {
                    SnapshotFrame::End { .. } => SnapshotFrame::End { frames: count },
                    f => f,
                };
                count += 1;
                serde_json::to_vec(&frame)
                    .map(Zeroizing::new)
                    .map_err(|_| JournalError::Random)
            });
        journal::write_new(
            &self.dir.join(SNAPSHOT_FILE),
            &self.key,
            SNAPSHOT_MAGIC,
            SNAPSHOT_ROLE,
            next,
            frames,
        )?;
        match Appender::create(
            &self.dir.join(JOURNAL_FILE),
            JOURNAL_MAGIC,
            JOURNAL_ROLE,
            next,
        ) {
            Ok(journal) => {
                self.journal = journal;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }
}
