//! The safety store on disk: a [`gateway_registry::framestore`] store (a sealed snapshot,
//! journal and head, the registry's frame files) sealed under
//! [`gateway_keystore::KeyPurpose::SafetyAtRest`], in the store's folder laid out as
//! [`LAYOUT`]:
//!
//! - `snapshot.sealed` (`GWSS`, role `safety-snapshot`): the state as of the last
//!   compaction; absent before the first.
//! - `journal.sealed` (`GWSJ`, role `safety-journal`): one frame per acknowledged change
//!   (a `Vec<Op>`), `fdatasync`'d before the change is applied or answered.
//! - `head.sealed` (`GWSH`, role `safety-head`): the journal's frame count, so frames cut
//!   off the journal's end are told apart from a torn last append.
//! - `safety.lock`: held for as long as the store is open.
//!
//! Open, replay (a torn last frame cut off, any other damage refused naming the file and
//! frame), the head check and compaction are the generic store's, as for the identity
//! registry: one home for sealed stores.

use std::path::Path;

use gateway_registry::framestore::{FileKind, FrameStore, Layout, Replay};
use gateway_registry::journal::SealKey;

use crate::state::{Op, State};

pub(crate) const JOURNAL_FILE: &str = "journal.sealed";
pub(crate) const HEAD_FILE: &str = "head.sealed";

/// The safety store's folder.
pub(crate) static LAYOUT: Layout = Layout {
    name: "safety store",
    lock_file: "safety.lock",
    journal: FileKind {
        file: JOURNAL_FILE,
        magic: b"GWSJ\x01",
        role: "safety-journal",
    },
    snapshot: FileKind {
        file: "snapshot.sealed",
        magic: b"GWSS\x01",
        role: "safety-snapshot",
    },
    head: FileKind {
        file: HEAD_FILE,
        magic: b"GWSH\x01",
        role: "safety-head",
    },
    snapshot_chunk: 1024,
};

/// Compact when the journal has at least this many frames and at least as many as the
/// state has ops.
pub(crate) const COMPACT_MIN_FRAMES: u64 = 4096;

/// The store's files; owned by the store thread.
pub(crate) type Store = FrameStore<Op>;

impl Replay for State {
    type Op = Op;

    fn apply(&mut self, op: Op) {
        State::apply(self, op);
    }

    fn snapshot(&self, chunk: usize) -> impl Iterator<Item = Vec<Op>> + '_ {
        let mut ops = self.snapshot_ops().into_iter();
        let chunk = chunk.max(1);
        std::iter::from_fn(move || {
            let next: Vec<Op> = ops.by_ref().take(chunk).collect();
            (!next.is_empty()).then_some(next)
        })
    }
}

/// The store could not be opened. Names files and frames, never content.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] gateway_registry::framestore::StoreError),
    #[error("safety store: cannot start its thread: {0}")]
    Thread(std::io::Error),
}

/// Opens (creating if needed) the store in `dir`, replaying it into `state`.
pub(crate) fn open(dir: &Path, key: SealKey, state: &mut State) -> Result<Store, OpenError> {
    Ok(FrameStore::open(dir, &LAYOUT, key, state)?)
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
    fn a_compaction_writes_the_next_generation_and_replays_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::default();
        let mut store = open(dir.path(), key(), &mut state).unwrap();
        for i in 0..1100 {
            let op = dose(i);
            store.commit(std::slice::from_ref(&op)).unwrap();
            state.apply(op);
        }
        let path = dir.path().join(JOURNAL_FILE);
        let before = std::fs::metadata(&path).unwrap().len();
        store.compact(&state).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < before);
        assert_eq!(
            gateway_registry::journal::generation(&path, LAYOUT.journal.magic).unwrap(),
            Some(1)
        );
        assert!(dir.path().join(LAYOUT.snapshot.file).exists());
        // Appends go on after the compaction.
        let op = dose(9999);
        store.commit(std::slice::from_ref(&op)).unwrap();
        state.apply(op);
        drop(store);
        let mut again = State::default();
        let _store = open(dir.path(), key(), &mut again).unwrap();
        assert_eq!(again.doses, state.doses);
        assert_eq!(again.doses.len(), 1101);
    }
}
