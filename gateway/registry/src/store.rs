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
//! of the snapshot, or none beside a snapshot, is refused. A torn last journal frame (a crash mid-append: never
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
/// The sealed count of the journal's frames, replaced after each append, so that frames cut
/// off the journal's end are told apart from a torn last append.
pub(crate) const HEAD_FILE: &str = "head.sealed";
/// Held ([`gateway_durable::LockedFile`]) for as long as the registry is open.
pub(crate) const LOCK_FILE: &str = "registry.lock";
/// How long an open waits for a previous holder of the folder (e.g. a registry thread that
/// is finishing its queue) before it fails.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const JOURNAL_MAGIC: &[u8; 5] = b"GWIJ\x01";
const SNAPSHOT_MAGIC: &[u8; 5] = b"GWIS\x01";
const JOURNAL_ROLE: &str = "identity-journal";
const SNAPSHOT_ROLE: &str = "identity-snapshot";
const HEAD_MAGIC: &[u8; 5] = b"GWIH\x01";
const HEAD_ROLE: &str = "identity-head";
/// Ops per snapshot frame.
const SNAPSHOT_CHUNK: usize = 1024;

#[derive(Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
enum SnapshotFrame {
    Ops { ops: Vec<Op> },
    End { frames: u64 },
}

/// The head: how many frames the journal of its generation had after the last append.
#[derive(Serialize, Deserialize)]
struct Head {
    frames: u64,
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
    #[error("identity registry {path}: {problem}")]
    Head {
        path: PathBuf,
        problem: &'static str,
    },
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
            // A journal is replaced atomically, never removed: none beside a snapshot means
            // a file was deleted (and the changes since the snapshot with it).
            None if snapshot.is_some() => {
                return Err(OpenError::Generation {
                    path,
                    journal: 0,
                    snapshot: generation,
                });
            }
            None => Appender::create(&path, JOURNAL_MAGIC, JOURNAL_ROLE, generation)?,
        };
        check_head(dir, &key, &journal)?;
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
        self.journal.append(&self.key, &plain)?;
        self.write_head_after_change();
        Ok(())
    }

    /// Replaces the head after a durable change. The change stands if this fails (the
    /// journal is the record); only the check of a cut-off end is weaker until the next one.
    fn write_head_after_change(&self) {
        if let Err(e) = write_head(&self.dir, &self.key, &self.journal) {
            tracing::warn!(error = %e, "identity registry: journal head not replaced");
        }
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
fn write_head(dir: &Path, key: &SealKey, journal: &Appender) -> Result<(), JournalError> {
    let plain = serde_json::to_vec(&Head {
        frames: journal.frames(),
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

/// The journal as opened must hold at least the frames its head last recorded. No head, or
/// the head of an earlier generation (a crash right after a compaction), is accepted only
/// while the journal has at most one frame: the head is replaced after every append, so
/// a crash leaves at most one frame it does not count.
fn check_head(dir: &Path, key: &SealKey, journal: &Appender) -> Result<(), OpenError> {
    let path = dir.join(HEAD_FILE);
    let mut counted = None;
    let head = journal::read(&path, key, HEAD_MAGIC, HEAD_ROLE, false, |frame, plain| {
        let h: Head = serde_json::from_slice(&plain).map_err(|_| OpenError::Decode {
            path: path.clone(),
            frame,
        })?;
        counted = Some(h.frames);
        Ok::<(), OpenError>(())
    })?;
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
        Some(problem) => Err(OpenError::Head { path, problem }),
        None => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::{PersonId, SourceKey};
    use gateway_identity::{Matcher, Model, Record};
    use gateway_keystore::MasterKey;
    use std::time::Instant;

    fn key() -> SealKey {
        SealKey::derive(&MasterKey::from_bytes([3; 32]))
    }

    fn vm_hwm_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn synthetic(i: u64) -> Record {
        Record {
            hospital_id: Some(format!("H{}", i % 20)),
            patient_id: Some(format!("{i:08}")),
            family_name: Some(format!("姓{}", i % 5000)),
            given_name: Some(format!("名{}", i % 3000)),
            family_kana: Some(format!("セイ{}", i % 5000)),
            given_kana: Some(format!("メイ{}", i % 3000)),
            sex: Some(if i.is_multiple_of(2) { "M" } else { "F" }.into()),
            birth_date: Some(format!(
                "{}{:02}{:02}",
                1930 + i % 90,
                1 + i % 12,
                1 + (i / 12) % 28
            )),
            address: Some(format!("東京都港区芝{}-{}-{}", i % 9, i % 30, i % 17)),
            postal_code: Some(format!("{:07}", i % 9_999_999)),
            phone: Some(format!("03{:08}", i)),
            insurer_number: Some(format!("{:08}", i % 4000)),
            ..Record::default()
        }
    }

    /// How the store scales: `REGISTRY_SCALE_N` records (default 100 000) written as a
    /// journal, then open (replay), compaction, reopen from the snapshot. Prints timings and
    /// the peak RSS; run with `cargo test --release -p gateway-registry -- --ignored scale
    /// --nocapture`.
    #[test]
    #[ignore = "a measurement, minutes at 1M records"]
    fn scale_replay_and_compaction() {
        let n: u64 = std::env::var("REGISTRY_SCALE_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let dir = tempfile::tempdir().unwrap();
        let matcher = || Matcher::new(Model::default());
        let mut state = State::new(matcher());
        let mut store = Store::open(dir.path(), key(), &mut state).unwrap();
        let t = Instant::now();
        for chunk in 0..n.div_ceil(1000) {
            let ops: Vec<Op> = (chunk * 1000..((chunk + 1) * 1000).min(n))
                .map(|i| {
                    let r = synthetic(i);
                    Op::PutRecord {
                        key: SourceKey {
                            hospital_id: r.hospital_id.clone().unwrap(),
                            patient_id: r.patient_id.clone().unwrap(),
                        },
                        record: Box::new(r),
                        updated: "2027-01-01T00:00:00.000Z".into(),
                        person: PersonId(format!("{i:032x}")),
                    }
                })
                .collect();
            store.commit(&ops).unwrap();
        }
        let write_ms = t.elapsed().as_millis();
        drop(store);
        drop(state);
        let journal_bytes = std::fs::metadata(dir.path().join(JOURNAL_FILE))
            .unwrap()
            .len();
        let mut state = State::new(matcher());
        let t = Instant::now();
        let mut store = Store::open(dir.path(), key(), &mut state).unwrap();
        let replay_ms = t.elapsed().as_millis();
        assert_eq!(state.records.len() as u64, n);
        let t = Instant::now();
        store.compact(&state).unwrap();
        let compact_ms = t.elapsed().as_millis();
        drop(store);
        drop(state);
        let snapshot_bytes = std::fs::metadata(dir.path().join(SNAPSHOT_FILE))
            .unwrap()
            .len();
        let mut state = State::new(matcher());
        let t = Instant::now();
        let _store = Store::open(dir.path(), key(), &mut state).unwrap();
        let reopen_ms = t.elapsed().as_millis();
        assert_eq!(state.records.len() as u64, n);
        println!(
            "records {n}: journal written {write_ms} ms ({journal_bytes} B), replay {replay_ms} ms, \
             compaction {compact_ms} ms ({snapshot_bytes} B), open from snapshot {reopen_ms} ms, \
             peak RSS {} KiB",
            vm_hwm_kib()
        );
    }
}
