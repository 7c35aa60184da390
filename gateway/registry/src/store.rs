//! The registry on disk: a [`crate::framestore`] store (sealed snapshot, journal and head)
//! in the registry's folder, laid out as [`LAYOUT`].
//!
//! - `snapshot.sealed` (`GWIS`, role `identity-snapshot`): the state as of the last
//!   compaction; absent before the first.
//! - `journal.sealed` (`GWIJ`, role `identity-journal`): one frame per acknowledged change.
//! - `head.sealed` (`GWIH`, role `identity-head`): the journal's frame count.
//! - `registry.lock`: held for as long as the registry is open.
//!
//! Open, replay, the torn tail, damage and compaction are the generic store's (see
//! [`crate::framestore`]); this module names the files and maps its errors to the
//! registry's [`OpenError`].

use std::path::{Path, PathBuf};

use crate::framestore::{FileKind, FrameStore, Layout, Replay, StoreError};
use crate::journal::{JournalError, SealKey};
use crate::state::{Op, State};

pub(crate) const JOURNAL_FILE: &str = "journal.sealed";
pub(crate) const SNAPSHOT_FILE: &str = "snapshot.sealed";

/// The registry's folder.
pub(crate) static LAYOUT: Layout = Layout {
    name: "identity registry",
    lock_file: "registry.lock",
    journal: FileKind {
        file: JOURNAL_FILE,
        magic: b"GWIJ\x01",
        role: "identity-journal",
    },
    snapshot: FileKind {
        file: SNAPSHOT_FILE,
        magic: b"GWIS\x01",
        role: "identity-snapshot",
    },
    head: FileKind {
        file: "head.sealed",
        magic: b"GWIH\x01",
        role: "identity-head",
    },
    snapshot_chunk: 1024,
};

/// The registry's files; owned by the registry thread.
pub(crate) type Store = FrameStore<Op>;

impl Replay for State {
    type Op = Op;

    fn apply(&mut self, op: Op) {
        State::apply(self, op);
    }

    fn snapshot(&self, chunk: usize) -> impl Iterator<Item = Vec<Op>> + '_ {
        self.snapshot_ops(chunk)
    }
}

/// Opens (creating if needed) the registry in `dir`, replaying it into `state`.
pub(crate) fn open(dir: &Path, key: SealKey, state: &mut State) -> Result<Store, OpenError> {
    Ok(FrameStore::open(dir, &LAYOUT, key, state)?)
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

/// The registry's errors keep their variants (callers and tests match on them).
impl From<StoreError> for OpenError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Journal { source, .. } => Self::Journal(source),
            StoreError::Locked { source, .. } => Self::Locked(source),
            StoreError::Decode { path, frame, .. } => Self::Decode { path, frame },
            StoreError::Truncated { path, .. } => Self::Truncated { path },
            StoreError::Head { path, problem, .. } => Self::Head { path, problem },
            StoreError::Generation {
                path,
                journal,
                snapshot,
                ..
            } => Self::Generation {
                path,
                journal,
                snapshot,
            },
        }
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
        let mut store = open(dir.path(), key(), &mut state).unwrap();
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
        let mut store = open(dir.path(), key(), &mut state).unwrap();
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
        let _store = open(dir.path(), key(), &mut state).unwrap();
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
