//! The re-identification map: for each destination, the real patient behind each
//! pseudonymous Patient ID and the real study behind each pseudonymous Study Instance UID
//! it was sent. Sealed at rest ([`KeyPurpose::DeidMapAtRest`]) in a
//! [`gateway_registry::framestore`] store, every new entry `fdatasync`'d before the object
//! that carries the pseudonym is sent. Nothing of it leaves the box; a crypto-shred
//! (`keys wipe`) makes it unreadable.
//!
//! One owner: the map (its state and store behind one mutex). Every call blocks on the
//! disk: callers run it on a blocking thread.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use gateway_keystore::{KeyPurpose, MasterKey};
use gateway_registry::framestore::{FileKind, FrameStore, Layout, Replay, StoreError};
use gateway_registry::journal::{JournalError, SealKey};
use serde::{Deserialize, Serialize};

use crate::stream::{Deidentified, Subject};

static LAYOUT: Layout = Layout {
    name: "re-identification map",
    lock_file: "deid-map.lock",
    journal: FileKind {
        file: "journal.sealed",
        magic: b"GWDJ\x01",
        role: "deid-map-journal",
    },
    snapshot: FileKind {
        file: "snapshot.sealed",
        magic: b"GWDS\x01",
        role: "deid-map-snapshot",
    },
    head: FileKind {
        file: "head.sealed",
        magic: b"GWDH\x01",
        role: "deid-map-head",
    },
    snapshot_chunk: 1024,
};

/// Compact once the journal holds this many frames (and as many as the state has ops).
const COMPACT_MIN_FRAMES: u64 = 4096;

/// One journalled entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum MapOp {
    Patient {
        destination: String,
        pseudo: String,
        id: String,
        issuer: String,
    },
    Study {
        destination: String,
        pseudo: String,
        uid: String,
        pseudo_patient: String,
    },
}

/// The real patient behind a pseudonymous Patient ID.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct RealPatient {
    pub patient_id: String,
    /// Issuer of Patient ID; empty when the object had none.
    pub issuer: String,
}

/// The real study behind a pseudonymous Study Instance UID.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct RealStudy {
    pub study_uid: String,
    pub patient: RealPatient,
}

impl std::fmt::Debug for RealPatient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealPatient").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RealStudy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealStudy").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    /// (destination, pseudonymous Patient ID) -> real patient.
    patients: HashMap<(String, String), RealPatient>,
    /// (destination, pseudonymous Study Instance UID) -> (real UID, pseudonymous patient).
    studies: HashMap<(String, String), (String, String)>,
}

impl Replay for State {
    type Op = MapOp;
    fn apply(&mut self, op: MapOp) {
        match op {
            MapOp::Patient {
                destination,
                pseudo,
                id,
                issuer,
            } => {
                self.patients.insert(
                    (destination, pseudo),
                    RealPatient {
                        patient_id: id,
                        issuer,
                    },
                );
            }
            MapOp::Study {
                destination,
                pseudo,
                uid,
                pseudo_patient,
            } => {
                self.studies
                    .insert((destination, pseudo), (uid, pseudo_patient));
            }
        }
    }

    fn snapshot(&self, chunk: usize) -> impl Iterator<Item = Vec<MapOp>> + '_ {
        let patients = self.patients.iter().map(|((d, p), r)| MapOp::Patient {
            destination: d.clone(),
            pseudo: p.clone(),
            id: r.patient_id.clone(),
            issuer: r.issuer.clone(),
        });
        let studies = self.studies.iter().map(|((d, p), (uid, pp))| MapOp::Study {
            destination: d.clone(),
            pseudo: p.clone(),
            uid: uid.clone(),
            pseudo_patient: pp.clone(),
        });
        let all: Vec<MapOp> = patients.chain(studies).collect();
        let chunks: Vec<Vec<MapOp>> = all.chunks(chunk.max(1)).map(<[_]>::to_vec).collect();
        chunks.into_iter()
    }
}

impl State {
    fn size(&self) -> u64 {
        (self.patients.len() + self.studies.len()) as u64
    }
}

/// The map could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error(transparent)]
    Open(#[from] StoreError),
    #[error("re-identification map: {0}")]
    Write(#[from] JournalError),
    #[error("re-identification map: a thread panicked while holding it")]
    Poisoned,
}

struct Inner {
    store: FrameStore<MapOp>,
    state: State,
}

/// The sealed re-identification map (see the module docs).
pub struct ReidMap {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for ReidMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReidMap").finish_non_exhaustive()
    }
}

impl ReidMap {
    /// Opens (creating if needed) the map in `dir` (held under a lock: one per folder).
    pub fn open(dir: &Path, master: &MasterKey) -> Result<Self, MapError> {
        let mut state = State::default();
        let key = SealKey::derive_for(master, KeyPurpose::DeidMapAtRest);
        let store = FrameStore::open(dir, &LAYOUT, key, &mut state)?;
        Ok(Self {
            inner: Mutex::new(Inner { store, state }),
        })
    }

    /// Records what an object about to be sent to `destination` carries (the entries
    /// that are new; durable on return). Nothing is written when the map already has them.
    pub fn record(
        &self,
        destination: &str,
        subject: &Subject,
        done: &Deidentified,
    ) -> Result<(), MapError> {
        self.record_all(destination, [(subject, done)])
    }

    /// [`ReidMap::record`] for several objects (e.g. one upload batch): every new entry in
    /// one journal frame, one `fdatasync`.
    pub fn record_all<'a>(
        &self,
        destination: &str,
        objects: impl IntoIterator<Item = (&'a Subject, &'a Deidentified)>,
    ) -> Result<(), MapError> {
        let mut inner = self.inner.lock().map_err(|_| MapError::Poisoned)?;
        let mut ops = Vec::new();
        let mut patients = std::collections::HashSet::new();
        let mut studies = std::collections::HashSet::new();
        for (subject, done) in objects {
            let pkey = (destination.to_string(), done.pseudo_patient_id.clone());
            if !done.pseudo_patient_id.is_empty()
                && !inner.state.patients.contains_key(&pkey)
                && patients.insert(pkey)
            {
                ops.push(MapOp::Patient {
                    destination: destination.to_string(),
                    pseudo: done.pseudo_patient_id.clone(),
                    id: subject.patient_id.clone(),
                    issuer: subject.issuer.clone(),
                });
            }
            let skey = (destination.to_string(), done.pseudo_study_uid.clone());
            if !done.pseudo_study_uid.is_empty()
                && !subject.study_uid.is_empty()
                && !inner.state.studies.contains_key(&skey)
                && studies.insert(skey)
            {
                ops.push(MapOp::Study {
                    destination: destination.to_string(),
                    pseudo: done.pseudo_study_uid.clone(),
                    uid: subject.study_uid.clone(),
                    pseudo_patient: done.pseudo_patient_id.clone(),
                });
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        inner.store.commit(&ops)?;
        for op in ops {
            inner.state.apply(op);
        }
        let Inner { store, state } = &mut *inner;
        let size = state.size();
        store.maybe_compact(state, COMPACT_MIN_FRAMES, size);
        Ok(())
    }

    /// The real patient behind `pseudo_patient_id` at `destination`.
    pub fn patient(
        &self,
        destination: &str,
        pseudo_patient_id: &str,
    ) -> Result<Option<RealPatient>, MapError> {
        let inner = self.inner.lock().map_err(|_| MapError::Poisoned)?;
        Ok(inner
            .state
            .patients
            .get(&(destination.to_string(), pseudo_patient_id.to_string()))
            .cloned())
    }

    /// The real study behind `pseudo_study_uid` at `destination`.
    pub fn study(
        &self,
        destination: &str,
        pseudo_study_uid: &str,
    ) -> Result<Option<RealStudy>, MapError> {
        let inner = self.inner.lock().map_err(|_| MapError::Poisoned)?;
        let Some((uid, pseudo_patient)) = inner
            .state
            .studies
            .get(&(destination.to_string(), pseudo_study_uid.to_string()))
        else {
            return Ok(None);
        };
        let patient = inner
            .state
            .patients
            .get(&(destination.to_string(), pseudo_patient.clone()))
            .cloned()
            .unwrap_or(RealPatient {
                patient_id: String::new(),
                issuer: String::new(),
            });
        Ok(Some(RealStudy {
            study_uid: uid.clone(),
            patient,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject {
        Subject {
            patient_id: "P-123".into(),
            issuer: "HOSP".into(),
            identifying: vec![],
            study_uid: "1.2.3.4".into(),
        }
    }

    fn done() -> Deidentified {
        Deidentified {
            pseudo_patient_id: "ANON0011223344556677".into(),
            pseudo_study_uid: "2.25.42".into(),
            pseudo_sop_instance_uid: "2.25.43".into(),
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_another_key_cannot_read_them() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::from_bytes([3; 32]);
        {
            let map = ReidMap::open(dir.path(), &master).unwrap();
            map.record("research", &subject(), &done()).unwrap();
            map.record("research", &subject(), &done()).unwrap();
        }
        let map = ReidMap::open(dir.path(), &master).unwrap();
        let study = map.study("research", "2.25.42").unwrap().unwrap();
        assert_eq!(study.study_uid, "1.2.3.4");
        assert_eq!(study.patient.patient_id, "P-123");
        assert_eq!(study.patient.issuer, "HOSP");
        assert!(map.study("teaching", "2.25.42").unwrap().is_none());
        assert_eq!(
            map.patient("research", "ANON0011223344556677")
                .unwrap()
                .unwrap()
                .patient_id,
            "P-123"
        );
        // Several objects at once: one frame for every new entry, repeats written once.
        let (s2, d2) = (
            Subject {
                study_uid: "1.2.3.5".into(),
                ..subject()
            },
            Deidentified {
                pseudo_study_uid: "2.25.44".into(),
                ..done()
            },
        );
        map.record_all("research", [(&s2, &d2), (&s2, &d2), (&subject(), &done())])
            .unwrap();
        drop(map);
        let map = ReidMap::open(dir.path(), &master).unwrap();
        assert_eq!(
            map.study("research", "2.25.44").unwrap().unwrap().study_uid,
            "1.2.3.5"
        );
        drop(map);
        // After a crypto-shred the master key is another one: the map does not open.
        assert!(ReidMap::open(dir.path(), &MasterKey::from_bytes([4; 32])).is_err());
        // Nothing of the identity is in clear on disk.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains("P-123") && !text.contains("1.2.3.4"));
        }
    }
}
