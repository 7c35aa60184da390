//! A sealed store in a folder: a snapshot, a journal and a head, all [`crate::journal`]
//! frame files, replayed into a state at open. One home for the sealed stores of the
//! workspace (the identity registry, the safety store); each names its files, magics and
//! roles in a [`Layout`] and replays through [`Replay`].
//!
//! - snapshot (generation *g*): frames of ops that rebuild the state (`{"frame":"ops",...}`),
//!   then an end frame with the count (a truncated snapshot is refused). Absent until the
//!   first compaction (*g* = 0 then).
//! - journal (generation *g*): one frame per acknowledged change (a `Vec<Op>`), appended and
//!   `fdatasync`'d before the change is applied or answered.
//! - head (generation *g*): the sealed count of the journal's frames, replaced after each
//!   append, so that frames cut off the journal's end are told apart from a torn last append.
//!
//! The folder is held under an exclusive lock ([`Layout::lock_file`]) while open: one store
//! per folder, across processes.
//!
//! Open: the snapshot is replayed, then the journal if its generation is the snapshot's; a
//! journal one generation behind is what a crash between the two steps of a compaction
//! leaves (its changes are in the snapshot) and is replaced by an empty one; a journal ahead
//! of the snapshot, or none beside a snapshot, is refused. A torn last journal frame (a crash
//! mid-append: never acknowledged) is cut off; any other damage fails the open with the file
//! and frame named ([`StoreError`]). The journal must then hold at least the frames its head
//! of the same generation counts; no head (or an earlier generation's: a crash right after
//! a compaction) is accepted only while the journal has at most one frame.
//!
//! Compaction ([`FrameStore::compact`]): the state is written as snapshot *g*+1 (temp file,
//! fsync, rename, fsync of the folder), then an empty journal *g*+1 replaces the old one
//! (atomically). [`FrameStore::maybe_compact`] does it once the journal holds at least as
//! many frames as the state is large, so its cost is amortised over the changes that grew
//! the journal.
//!
//! Nothing here logs content; errors name the store, file and frame.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::journal::{self, Appender, JournalError, SealKey};

/// How long an open waits for a previous holder of the folder (e.g. a store thread that is
/// finishing its queue) before it fails.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// One frame file of a store: its name in the folder, the magic of its header and the role
/// its frames are sealed with (see [`crate::journal`]).
#[derive(Debug, Clone, Copy)]
pub struct FileKind {
    pub file: &'static str,
    pub magic: &'static [u8; 5],
    pub role: &'static str,
}

/// What one store's folder looks like on disk.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Names the store in errors and logs (e.g. "identity registry").
    pub name: &'static str,
    /// The lock file held while the store is open.
    pub lock_file: &'static str,
    pub journal: FileKind,
    pub snapshot: FileKind,
    pub head: FileKind,
    /// Ops per snapshot frame.
    pub snapshot_chunk: usize,
}

/// The state a store replays into and compacts from.
pub trait Replay {
    /// One change, as journalled (serde JSON in each frame).
    type Op: Serialize + DeserializeOwned;
    /// Applies one op (the same code path live and at replay).
    fn apply(&mut self, op: Self::Op);
    /// The ops that rebuild the state, in chunks of at most `chunk` ops.
    fn snapshot(&self, chunk: usize) -> impl Iterator<Item = Vec<Self::Op>> + '_;
}

/// A store could not be opened. Names the store, files and frames, never content.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{store}: {source}")]
    Journal {
        store: &'static str,
        source: JournalError,
    },
    /// Another holder (another process, or a store thread not yet stopped) has the folder.
    #[error("{store}: {source}")]
    Locked {
        store: &'static str,
        source: gateway_durable::LockError,
    },
    #[error("{store} {path}: frame {frame} opens but does not decode")]
    Decode {
        store: &'static str,
        path: PathBuf,
        frame: u64,
    },
    #[error("{store} {path}: the snapshot has no end mark (truncated or altered)")]
    Truncated { store: &'static str, path: PathBuf },
    #[error("{store} {path}: {problem}")]
    Head {
        store: &'static str,
        path: PathBuf,
        problem: &'static str,
    },
    #[error(
        "{store} {path}: journal generation {journal} does not follow snapshot generation {snapshot} (a file was replaced or removed)"
    )]
    Generation {
        store: &'static str,
        path: PathBuf,
        journal: u64,
        snapshot: u64,
    },
}

/// A snapshot frame.
#[derive(Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
enum SnapshotFrame<O> {
    Ops { ops: Vec<O> },
    End { frames: u64 },
}

/// The head: how many frames the journal of its generation had after the last append.
#[derive(Serialize, Deserialize)]
struct Head {
    frames: u64,
}

/// What a replay callback fails with, before the store and path are known.
enum Replayed {
    Journal(JournalError),
    Decode(u64),
}

impl From<JournalError> for Replayed {
    fn from(e: JournalError) -> Self {
        Self::Journal(e)
    }
}

impl Replayed {
    fn at(self, store: &'static str, path: &Path) -> StoreError {
        match self {
            Self::Journal(source) => StoreError::Journal { store, source },
            Self::Decode(frame) => StoreError::Decode {
                store,
                path: path.to_path_buf(),
                frame,
            },
        }
    }
}

/// An open store of ops `O`; owned by the store's thread (every call blocks on the disk).
pub struct FrameStore<O> {
    layout: &'static Layout,
    dir: PathBuf,
    key: SealKey,
    journal: Appender,
    /// A compaction wrote the new snapshot but could not start its journal: appending to
    /// the old one would be lost at the next open, so nothing is accepted any more.
    broken: bool,
    _lock: gateway_durable::LockedFile,
    _ops: PhantomData<fn(&O)>,
}

impl<O> std::fmt::Debug for FrameStore<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameStore")
            .field("store", &self.layout.name)
            .field("dir", &self.dir)
            .field("journal", &self.journal)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<O: Serialize + DeserializeOwned> FrameStore<O> {
    /// Opens (creating if needed) the store laid out as `layout` in `dir`, replaying it into
    /// `state` (see the module docs).
    pub fn open<R: Replay<Op = O>>(
        dir: &Path,
        layout: &'static Layout,
        key: SealKey,
        state: &mut R,
    ) -> Result<Self, StoreError> {
        let store = layout.name;
        let failed = |source: JournalError| StoreError::Journal { store, source };
        gateway_durable::ensure_private_dir(dir).map_err(|e| failed(e.into()))?;
        let lock = gateway_durable::LockedFile::lock(
            &dir.join(layout.journal.file),
            &dir.join(layout.lock_file),
            LOCK_WAIT,
        )
        .map_err(|source| StoreError::Locked { store, source })?;
        let snap_path = dir.join(layout.snapshot.file);
        let mut ended = false;
        let snapshot = journal::read(
            &snap_path,
            &key,
            layout.snapshot.magic,
            layout.snapshot.role,
            false,
            |frame, plain| {
                if ended {
                    return Err(Replayed::Decode(frame));
                }
                match serde_json::from_slice::<SnapshotFrame<O>>(&plain)
                    .map_err(|_| Replayed::Decode(frame))?
                {
                    SnapshotFrame::Ops { ops } => ops.into_iter().for_each(|op| state.apply(op)),
                    SnapshotFrame::End { frames } if frames == frame => ended = true,
                    SnapshotFrame::End { .. } => return Err(Replayed::Decode(frame)),
                }
                Ok(())
            },
        )
        .map_err(|e| e.at(store, &snap_path))?;
        if snapshot.is_some() && !ended {
            return Err(StoreError::Truncated {
                store,
                path: snap_path,
            });
        }
        let generation = snapshot.map_or(0, |s| s.generation);
        let kind = layout.journal;
        let path = dir.join(kind.file);
        let create = || Appender::create(&path, kind.magic, kind.role, generation);
        // The journal's generation is known from its header only: read it first, replay only
        // a journal of the snapshot's generation.
        let journal = match journal::generation(&path, kind.magic).map_err(failed)? {
            Some(g) if g == generation => {
                let read =
                    journal::read(&path, &key, kind.magic, kind.role, true, |frame, plain| {
                        let ops: Vec<O> =
                            serde_json::from_slice(&plain).map_err(|_| Replayed::Decode(frame))?;
                        ops.into_iter().for_each(|op| state.apply(op));
                        Ok::<(), Replayed>(())
                    })
                    .map_err(|e| e.at(store, &path))?;
                match read {
                    Some(r) => Appender::open(&path, kind.role, g, r.frames, r.good_len),
                    None => create(),
                }
            }
            Some(g) if g + 1 == generation => create(),
            Some(g) => {
                return Err(StoreError::Generation {
                    store,
                    path,
                    journal: g,
                    snapshot: generation,
                });
            }
            // A journal is replaced atomically, never removed: none beside a snapshot means
            // a file was deleted (and the changes since the snapshot with it).
            None if snapshot.is_some() => {
                return Err(StoreError::Generation {
                    store,
                    path,
                    journal: 0,
                    snapshot: generation,
                });
            }
            None => create(),
        }
        .map_err(failed)?;
        check_head(dir, layout, &key, &journal)?;
        Ok(Self {
            layout,
            dir: dir.to_path_buf(),
            key,
            journal,
            broken: false,
            _lock: lock,
            _ops: PhantomData,
        })
    }

    /// Makes one change durable (one journal frame, `fdatasync`).
    pub fn commit(&mut self, ops: &[O]) -> Result<(), JournalError> {
        if self.broken {
            return Err(JournalError::Damaged {
                path: self.dir.join(self.layout.journal.file),
                frame: self.journal.frames(),
                problem: "the journal could not be restarted after a compaction",
            });
        }
        let plain = Zeroizing::new(serde_json::to_vec(ops).map_err(|_| JournalError::Random)?);
        self.journal.append(&self.key, &plain)?;
        self.write_head_after_change();
        Ok(())
    }

    /// Replaces the head after a durable change. The change stands if this fails (the
    /// journal is the record); only the check of a cut-off end is weaker until the next one.
    fn write_head_after_change(&self) {
        if let Err(e) = write_head(&self.dir, self.layout, &self.key, &self.journal) {
            warn!(store = self.layout.name, error = %e, "journal head not replaced");
        }
    }

    /// Frames in the journal.
    pub fn journal_frames(&self) -> u64 {
        self.journal.frames()
    }

    /// Compacts when the journal holds at least `min_frames` frames and at least `size`
    /// (the state's size, in whatever unit its snapshot grows by); a failure is logged and
    /// the journal stands.
    pub fn maybe_compact<R: Replay<Op = O>>(&mut self, state: &R, min_frames: u64, size: u64) {
        let frames = self.journal.frames();
        if frames >= min_frames && frames >= size && frames > 0 {
            match self.compact(state) {
                Ok(()) => info!(store = self.layout.name, frames, "store compacted"),
                Err(e) => warn!(store = self.layout.name, error = %e, "compaction failed"),
            }
        }
    }

    /// Writes `state` as the next snapshot and starts an empty journal (see module docs).
    pub fn compact<R: Replay<Op = O>>(&mut self, state: &R) -> Result<(), JournalError> {
        let next = self.journal.generation() + 1;
        let mut count = 0u64;
        let frames = state
            .snapshot(self.layout.snapshot_chunk)
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
        let snapshot = self.layout.snapshot;
        journal::write_new(
            &self.dir.join(snapshot.file),
            &self.key,
            snapshot.magic,
            snapshot.role,
            next,
            frames,
        )?;
        let kind = self.layout.journal;
        match Appender::create(&self.dir.join(kind.file), kind.magic, kind.role, next) {
            Ok(journal) => {
                self.journal = journal;
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

/// Writes the head of `journal` (its generation and frame count), atomically and durably.
fn write_head(
    dir: &Path,
    layout: &Layout,
    key: &SealKey,
    journal: &Appender,
) -> Result<(), JournalError> {
    let plain = serde_json::to_vec(&Head {
        frames: journal.frames(),
    })
    .map(Zeroizing::new)
    .map_err(|_| JournalError::Random)?;
    journal::write_new::<JournalError>(
        &dir.join(layout.head.file),
        key,
        layout.head.magic,
        layout.head.role,
        journal.generation(),
        std::iter::once(Ok(plain)),
    )
}

/// The journal as opened must hold at least the frames its head last recorded. No head, or
/// the head of an earlier generation (a crash right after a compaction), is accepted only
/// while the journal has at most one frame: the head is replaced after every append, so
/// a crash leaves at most one frame it does not count.
fn check_head(
    dir: &Path,
    layout: &Layout,
    key: &SealKey,
    journal: &Appender,
) -> Result<(), StoreError> {
    let store = layout.name;
    let path = dir.join(layout.head.file);
    let mut counted = None;
    let head = journal::read(
        &path,
        key,
        layout.head.magic,
        layout.head.role,
        false,
        |frame, plain| {
            let h: Head = serde_json::from_slice(&plain).map_err(|_| Replayed::Decode(frame))?;
            counted = Some(h.frames);
            Ok::<(), Replayed>(())
        },
    )
    .map_err(|e| e.at(store, &path))?;
    let (generation, frames) = (journal.generation(), journal.frames());
    let problem = match (head, counted) {
        (Some(h), Some(n)) if h.generation == generation && frames < n => Some(
            "the journal has fewer frames than its sealed head records (frames were cut off its end)",
        ),
        (Some(h), Some(_)) if h.generation == generation => None,
        (Some(h), _) if h.generation > generation => Some(
            "the sealed head is of a later generation than the journal (an older journal was put back)",
        ),
        _ if frames > 1 => {
            Some("no sealed head for a journal of more than one frame (the head was removed)")
        }
        _ => None,
    };
    match problem {
        Some(problem) => Err(StoreError::Head {
            store,
            path,
            problem,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::journal::HEADER_LEN;
    use gateway_keystore::MasterKey;

    static TOY: Layout = Layout {
        name: "toy store",
        lock_file: "toy.lock",
        journal: FileKind {
            file: "j.sealed",
            magic: b"GWTJ\x01",
            role: "toy-journal",
        },
        snapshot: FileKind {
            file: "s.sealed",
            magic: b"GWTS\x01",
            role: "toy-snapshot",
        },
        head: FileKind {
            file: "h.sealed",
            magic: b"GWTH\x01",
            role: "toy-head",
        },
        snapshot_chunk: 2,
    };

    #[derive(Debug, Default, PartialEq)]
    struct Toy(Vec<u32>);

    impl Replay for Toy {
        type Op = u32;

        fn apply(&mut self, op: u32) {
            self.0.push(op);
        }

        fn snapshot(&self, chunk: usize) -> impl Iterator<Item = Vec<u32>> + '_ {
            self.0.chunks(chunk).map(<[u32]>::to_vec)
        }
    }

    fn key() -> SealKey {
        SealKey::derive(&MasterKey::from_bytes([9; 32]))
    }

    fn open(dir: &Path) -> Result<(FrameStore<u32>, Toy), StoreError> {
        let mut toy = Toy::default();
        let store = FrameStore::open(dir, &TOY, key(), &mut toy)?;
        Ok((store, toy))
    }

    /// Commits `ops` one change each and applies them, as a store's owner does.
    fn change(store: &mut FrameStore<u32>, toy: &mut Toy, ops: &[u32]) {
        for &op in ops {
            store.commit(&[op]).unwrap();
            Replay::apply(toy, op);
        }
    }

    #[test]
    fn a_compaction_starts_the_next_generation_and_a_reopen_replays_snapshot_then_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut toy) = open(dir.path()).unwrap();
        change(&mut store, &mut toy, &[1, 2, 3, 4, 5]);
        // Below the threshold, or fewer frames than the state is large: nothing happens.
        store.maybe_compact(&toy, 6, 0);
        store.maybe_compact(&toy, 0, 6);
        assert!(!dir.path().join(TOY.snapshot.file).exists());
        store.maybe_compact(&toy, 5, 5);
        assert_eq!(store.journal_frames(), 0);
        let journal = dir.path().join(TOY.journal.file);
        assert_eq!(
            journal::generation(&journal, TOY.journal.magic).unwrap(),
            Some(1)
        );
        change(&mut store, &mut toy, &[6]);
        drop(store);
        let (store, again) = open(dir.path()).unwrap();
        assert_eq!(again, Toy(vec![1, 2, 3, 4, 5, 6]));
        assert_eq!(store.journal_frames(), 1);
    }

    #[test]
    fn a_crash_between_the_snapshot_and_the_new_journal_replays_the_snapshot_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut toy) = open(dir.path()).unwrap();
        change(&mut store, &mut toy, &[1, 2, 3]);
        let journal = dir.path().join(TOY.journal.file);
        let head = dir.path().join(TOY.head.file);
        let (old_journal, old_head) = (
            std::fs::read(&journal).unwrap(),
            std::fs::read(&head).unwrap(),
        );
        store.compact(&toy).unwrap();
        drop(store);
        // The snapshot of generation 1 is in place, the journal and head still generation 0's.
        std::fs::write(&journal, &old_journal).unwrap();
        std::fs::write(&head, &old_head).unwrap();
        let (store, again) = open(dir.path()).unwrap();
        assert_eq!(
            again,
            Toy(vec![1, 2, 3]),
            "the old journal is not replayed on top"
        );
        assert_eq!(store.journal_frames(), 0);
        assert_eq!(
            journal::generation(&journal, TOY.journal.magic).unwrap(),
            Some(1)
        );
    }

    #[test]
    fn a_removed_journal_a_truncated_snapshot_or_cut_frames_fail_the_open_naming_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut toy) = open(dir.path()).unwrap();
        change(&mut store, &mut toy, &[1, 2, 3]);
        store.compact(&toy).unwrap();
        change(&mut store, &mut toy, &[4, 5]);
        drop(store);
        let journal = dir.path().join(TOY.journal.file);
        let snapshot = dir.path().join(TOY.snapshot.file);
        let (whole_journal, whole_snapshot) = (
            std::fs::read(&journal).unwrap(),
            std::fs::read(&snapshot).unwrap(),
        );

        std::fs::remove_file(&journal).unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Generation {
                    journal: 0,
                    snapshot: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("toy store "), "{err}");
        std::fs::write(&journal, &whole_journal).unwrap();

        // The end frame cut off whole (the last frame's length is in its header).
        let mut at = HEADER_LEN as usize;
        let mut last = at;
        while at < whole_snapshot.len() {
            last = at;
            let len = u32::from_le_bytes(whole_snapshot[at..at + 4].try_into().unwrap());
            at += 8 + 12 + len as usize;
        }
        std::fs::write(&snapshot, &whole_snapshot[..last]).unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Truncated { .. }), "{err}");
        // Cut inside a frame: a snapshot is never torn, it is damage.
        std::fs::write(&snapshot, &whole_snapshot[..last + 5]).unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Journal { .. }), "{err}");
        assert!(err.to_string().contains("s.sealed"), "{err}");
        std::fs::write(&snapshot, &whole_snapshot).unwrap();

        // The journal's last change cut off whole: the head still counts it.
        let first = HEADER_LEN as usize;
        let len = u32::from_le_bytes(whole_journal[first..first + 4].try_into().unwrap());
        std::fs::write(&journal, &whole_journal[..first + 20 + len as usize]).unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::Head { .. }) && err.to_string().contains("cut off"),
            "{err}"
        );
        std::fs::write(&journal, &whole_journal).unwrap();
        let (_, again) = open(dir.path()).unwrap();
        assert_eq!(again, Toy(vec![1, 2, 3, 4, 5]));
    }
}
