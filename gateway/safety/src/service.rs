//! The store as a service: one thread (`safety-store`) owns the [`State`] and the files;
//! everyone else holds a [`SafetyHandle`] and sends typed requests over a tokio channel,
//! awaiting each answer on a oneshot (the house pattern: `gateway_registry`'s service).
//!
//! Every change is written to the sealed journal and `fdatasync`'d, then applied, then
//! answered. The thread ends when the last handle is dropped; a handle whose thread is gone
//! answers [`SafetyError::Unavailable`].
//!
//! HL7 ([`SafetyHandle::apply`]): the source record is (hospital, patient id) as the
//! registry reads them (`gateway_registry::adt::sender`: MSH-4.1 else MSH-3.1, else the
//! core's own hospital; `gateway_registry::adt::cx_id` for PID-3 and MRG-1), so that the
//! registry's `members` name the same keys.
//! - ADT A01/A04/A08 with at least one AL1: the AL1 list replaces the record's earlier
//!   AL1-sourced entries (an entry whose allergen is unchanged keeps its id, so a warning
//!   acknowledged stays acknowledged); no AL1: no change.
//! - ADT^A60: each IAM in order, identified by IAM-7 when sent, else by allergen (IAM-3
//!   code + system, else its text): `A` add (an identified entry is replaced), `U` update
//!   (added when unknown), `D` delete, `X` no change.
//! - ADT A40 / A47: the prior (MRG-1) record's reactions and dose events move to PID-3's.
//!
//! Logs name outcome classes only.

use std::path::Path;
use std::sync::Arc;

use gateway_audit::AuditLog;
use gateway_hl7::record::{Allergy, Clinical};
use gateway_registry::SourceKey;
use gateway_registry::adt::{cx_id, sender};
use gateway_registry::journal::SealKey;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::contrast;
use crate::metrics::Metrics;
use crate::state::{Held, Op, Origin, Reaction, State, StoredDose, allergen_key};
use crate::store::{self, OpenError, Store};
use crate::{BoxFuture, DoseEvent, DoseRecorded, SafetyError};

const QUEUE: usize = 256;

/// What one HL7 message did to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hl7Applied {
    /// Not used (a fixed reason, never content).
    Ignored(&'static str),
    /// AL1 list of an ADT A01/A04/A08: entries now held from AL1.
    Al1 { entries: usize },
    /// IAM segments of an ADT^A60.
    Iam {
        added: usize,
        updated: usize,
        deleted: usize,
        /// `D` for an entry not held, and `X`.
        unchanged: usize,
    },
    /// A40 / A47: the prior record's data moved to the survivor.
    Moved,
}

impl Hl7Applied {
    fn outcome(&self) -> &'static str {
        match self {
            Self::Ignored(_) => "ignored",
            Self::Al1 { .. } => "al1",
            Self::Iam { .. } => "iam",
            Self::Moved => "moved",
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, SafetyError>>;

pub(crate) enum Request {
    Hl7 {
        text: String,
        reply: Reply<Hl7Applied>,
    },
    Dose {
        source: SourceKey,
        events: Vec<DoseEvent>,
        reply: Reply<DoseRecorded>,
    },
    Held {
        keys: Vec<SourceKey>,
        reply: Reply<Vec<Held>>,
    },
}

struct Service {
    state: State,
    store: Store,
    metrics: Metrics,
    own_hospital: Option<String>,
}

/// The safety store's owner thread and its handle (cheap to clone).
#[derive(Clone)]
pub struct SafetyHandle {
    pub(crate) tx: mpsc::Sender<Request>,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) metrics: Metrics,
}

impl std::fmt::Debug for SafetyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetyHandle")
            .field("stopped", &self.tx.is_closed())
            .finish()
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

fn random_id() -> Result<String, SafetyError> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|_| {
        warn!("safety store: no randomness for an id");
        SafetyError::Unavailable
    })?;
    Ok(hex::encode(b))
}

impl SafetyHandle {
    /// Opens (or creates) the sealed store in `dir` and starts its thread. HL7 messages
    /// that name no sending hospital are ignored; see [`SafetyHandle::open_with`]. Blocking
    /// (replays the journal): call it before the runtime starts or in `spawn_blocking`.
    pub fn open(
        dir: &Path,
        master: &gateway_keystore::MasterKey,
        audit: Arc<AuditLog>,
        metrics: Metrics,
    ) -> Result<Self, SafetyError> {
        Self::open_with(dir, master, audit, metrics, None)
    }

    /// [`SafetyHandle::open`], with the core's own hospital id for HL7 messages that name
    /// no sender (MSH-4 and MSH-3 empty: the core's own systems), as the registry reads them.
    pub fn open_with(
        dir: &Path,
        master: &gateway_keystore::MasterKey,
        audit: Arc<AuditLog>,
        metrics: Metrics,
        own_hospital: Option<String>,
    ) -> Result<Self, SafetyError> {
        let mut state = State::default();
        let key = SealKey::derive_for(master, gateway_keystore::KeyPurpose::SafetyAtRest);
        let store = store::open(dir, key, &mut state)?;
        let mut service = Service {
            state,
            store,
            metrics: metrics.clone(),
            own_hospital: own_hospital.filter(|h| !h.trim().is_empty()),
        };
        service.maintain();
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("safety-store".into())
            .spawn(move || service.run(rx))
            .map_err(OpenError::Thread)?;
        Ok(Self { tx, audit, metrics })
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, SafetyError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SafetyError::Unavailable)?;
        answer.await.map_err(|_| SafetyError::Unavailable)?
    }

    /// Applies one HL7 message (see the module docs) and says what it did. The listener
    /// already acknowledged it.
    pub fn apply(&self, text: String) -> BoxFuture<'static, Result<Hl7Applied, SafetyError>> {
        let this = self.clone();
        Box::pin(async move { this.ask(|reply| Request::Hl7 { text, reply }).await })
    }

    /// Applies one HL7 message (AL1 in ADT A01/A04/A08, IAM in ADT^A60, A40/A47 rekeying);
    /// others are ignored. The listener already acknowledged it.
    pub fn apply_hl7(&self, text: String) -> BoxFuture<'static, Result<(), SafetyError>> {
        let applied = self.apply(text);
        Box::pin(async move { applied.await.map(drop) })
    }

    /// Records the events of one dose report for `source`, each Irradiation Event UID once
    /// (a UID already held under any source record is a duplicate; an event without a UID
    /// is refused and counted).
    pub fn record_dose(
        &self,
        source: SourceKey,
        events: Vec<DoseEvent>,
    ) -> BoxFuture<'static, Result<DoseRecorded, SafetyError>> {
        let this = self.clone();
        Box::pin(async move {
            this.ask(|reply| Request::Dose {
                source,
                events,
                reply,
            })
            .await
        })
    }

    /// What the store holds of each of `keys` (no consent check: callers gate each
    /// disclosure themselves).
    pub(crate) fn held(
        &self,
        keys: Vec<SourceKey>,
    ) -> BoxFuture<'static, Result<Vec<Held>, SafetyError>> {
        let this = self.clone();
        Box::pin(async move { this.ask(|reply| Request::Held { keys, reply }).await })
    }

    /// The metrics this store counts in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl Service {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(request) = rx.blocking_recv() {
            match request {
                Request::Hl7 { text, reply } => {
                    let result = self.hl7(&text);
                    match &result {
                        Ok(applied) => self.metrics.hl7(applied.outcome()),
                        Err(_) => self.metrics.hl7("failed"),
                    }
                    let _ = reply.send(result);
                }
                Request::Dose {
                    source,
                    events,
                    reply,
                } => {
                    let _ = reply.send(self.dose(source, events));
                }
                Request::Held { keys, reply } => {
                    let _ = reply.send(Ok(self.state.of(&keys)));
                }
            }
        }
        debug!("safety store stopped: no handle left");
    }

    /// Makes `ops` durable, then applies them.
    fn commit(&mut self, ops: Vec<Op>) -> Result<(), SafetyError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.store.commit(&ops).map_err(|e| {
            warn!(error = %e, "safety store: change not made durable");
            SafetyError::Unavailable
        })?;
        for op in ops {
            self.state.apply(op);
        }
        self.maintain();
        Ok(())
    }

    fn maintain(&mut self) {
        let (reactions, doses) = (self.state.reaction_count(), self.state.doses.len());
        self.metrics.set_counts(reactions, doses);
        self.store.maybe_compact(
            &self.state,
            store::COMPACT_MIN_FRAMES,
            (reactions + doses) as u64,
        );
    }

    fn hl7(&mut self, text: &str) -> Result<Hl7Applied, SafetyError> {
        let Ok(msg) = gateway_hl7::parse::parse(text) else {
            return Ok(Hl7Applied::Ignored("not a parsable HL7 message"));
        };
        if msg.get("MSH", 9, 1, 1, 1) != Some("ADT") {
            return Ok(Hl7Applied::Ignored("not an ADT message"));
        }
        let trigger = msg.get("MSH", 9, 1, 2, 1).unwrap_or("").to_owned();
        let Some(hospital) = sender(&msg).or_else(|| self.own_hospital.clone()) else {
            return Ok(Hl7Applied::Ignored("no sending hospital"));
        };
        let Some(patient_id) = cx_id(&msg, "PID", 3) else {
            return Ok(Hl7Applied::Ignored("no patient id in PID-3"));
        };
        let key = SourceKey {
            hospital_id: hospital.clone(),
            patient_id,
        };
        match trigger.as_str() {
            "A01" | "A04" | "A08" => {
                let Ok(Some(Clinical::Patient { allergies, .. })) =
                    gateway_hl7::record::extract(&msg)
                else {
                    return Ok(Hl7Applied::Ignored("ADT whose PID or AL1 does not read"));
                };
                if allergies.is_empty() {
                    return Ok(Hl7Applied::Ignored("no AL1 segment"));
                }
                self.al1(key, &hospital, &allergies)
            }
            "A60" => {
                let Ok(Some(Clinical::Allergies { allergies, .. })) =
                    gateway_hl7::record::extract(&msg)
                else {
                    return Ok(Hl7Applied::Ignored("ADT^A60 whose IAM does not read"));
                };
                self.iam(key, &hospital, &allergies)
            }
            "A40" | "A47" => {
                let Some(prior) = cx_id(&msg, "MRG", 1) else {
                    return Ok(Hl7Applied::Ignored("no prior patient id in MRG-1"));
                };
                let from = SourceKey {
                    hospital_id: hospital,
                    patient_id: prior,
                };
                let holds = self.state.reactions.contains_key(&from)
                    || self.state.doses.values().any(|d| d.source == from);
                if from == key || !holds {
                    return Ok(Hl7Applied::Ignored("nothing held for the prior id"));
                }
                self.commit(vec![Op::Move { from, to: key }])?;
                Ok(Hl7Applied::Moved)
            }
            _ => Ok(Hl7Applied::Ignored(
                "an ADT event the safety store does not read",
            )),
        }
    }

    fn reaction(&self, id: String, hospital: &str, a: &Allergy, origin: Origin) -> Reaction {
        let when = [&a.onset_date, &a.identified, &a.reported]
            .into_iter()
            .find(|s| !s.trim().is_empty())
            .map(|s| s.trim().to_owned());
        Reaction {
            id,
            hospital: hospital.to_owned(),
            allergen_code: a.allergen.code.clone(),
            allergen_text: a.allergen.text.clone(),
            allergen_system: a.allergen.system.clone(),
            allergen_type: a.allergen_type.code.clone(),
            severity: a.severity.code.clone(),
            reactions: a.reactions.clone(),
            onset: when,
            recorded_at: now(),
            origin,
            iam_id: (!a.unique_id.trim().is_empty()).then(|| a.unique_id.trim().to_owned()),
            contrast: contrast::recognise(Some(&a.allergen.code), Some(&a.allergen.text)),
        }
    }

    fn al1(
        &mut self,
        key: SourceKey,
        hospital: &str,
        allergies: &[Allergy],
    ) -> Result<Hl7Applied, SafetyError> {
        let mut earlier: Vec<Reaction> = self
            .state
            .reactions
            .get(&key)
            .map(|l| {
                l.iter()
                    .filter(|r| r.origin == Origin::Al1)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let mut reactions = Vec::with_capacity(allergies.len());
        for a in allergies {
            let k = allergen_key(&a.allergen.code, &a.allergen.system, &a.allergen.text);
            let id = match earlier.iter().position(|r| r.allergen_key() == k) {
                Some(i) => earlier.swap_remove(i).id,
                None => random_id()?,
            };
            reactions.push(self.reaction(id, hospital, a, Origin::Al1));
        }
        let entries = reactions.len();
        self.commit(vec![Op::ReplaceAl1 { key, reactions }])?;
        Ok(Hl7Applied::Al1 { entries })
    }

    fn iam(
        &mut self,
        key: SourceKey,
        hospital: &str,
        allergies: &[Allergy],
    ) -> Result<Hl7Applied, SafetyError> {
        let mut working = self.state.reactions.get(&key).cloned().unwrap_or_default();
        let mut ops = Vec::new();
        let (mut added, mut updated, mut deleted, mut unchanged) = (0, 0, 0, 0);
        for a in allergies {
            let uid = a.unique_id.trim();
            let k = allergen_key(&a.allergen.code, &a.allergen.system, &a.allergen.text);
            let found = working.iter().position(|r| {
                if uid.is_empty() {
                    r.allergen_key() == k
                } else {
                    r.iam_id.as_deref() == Some(uid)
                }
            });
            match (a.action.as_str(), found) {
                ("A" | "U", Some(i)) => {
                    let id = working.get(i).map(|r| r.id.clone()).unwrap_or_default();
                    let r = self.reaction(id, hospital, a, Origin::Iam);
                    if let Some(slot) = working.get_mut(i) {
                        *slot = r.clone();
                    }
                    ops.push(Op::PutReaction {
                        key: key.clone(),
                        reaction: r,
                    });
                    updated += 1;
                }
                ("A" | "U", None) => {
                    let r = self.reaction(random_id()?, hospital, a, Origin::Iam);
                    working.push(r.clone());
                    ops.push(Op::PutReaction {
                        key: key.clone(),
                        reaction: r,
                    });
                    added += 1;
                }
                ("D", Some(i)) => {
                    let r = working.remove(i);
                    ops.push(Op::RemoveReaction {
                        key: key.clone(),
                        id: r.id,
                    });
                    deleted += 1;
                }
                // `D` of an entry not held, `X`, and (never past the listener's check)
                // any other action: no change.
                _ => unchanged += 1,
            }
        }
        self.commit(ops)?;
        Ok(Hl7Applied::Iam {
            added,
            updated,
            deleted,
            unchanged,
        })
    }

    fn dose(
        &mut self,
        source: SourceKey,
        events: Vec<DoseEvent>,
    ) -> Result<DoseRecorded, SafetyError> {
        let mut out = DoseRecorded::default();
        let mut ops = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let recorded_at = now();
        for event in events {
            let uid = event.event_uid.trim().to_owned();
            if uid.is_empty() {
                out.refused += 1;
            } else if self.state.doses.contains_key(&uid) || !seen.insert(uid.clone()) {
                out.duplicate += 1;
            } else {
                out.new += 1;
                ops.push(Op::PutDose {
                    uid,
                    dose: StoredDose {
                        source: source.clone(),
                        event,
                        recorded_at: recorded_at.clone(),
                    },
                });
            }
        }
        self.commit(ops)?;
        Ok(out)
    }
}

/// Applies the messages the HL7 listener hands over (`observed`: the decoded text of each
/// durable message, e.g. from `gateway_mllp::Observer::channel`) to the safety store, one
/// at a time and in order, until the channel closes. What cannot be used is logged by
/// class (never content) and dropped.
pub async fn feed<M: AsRef<str>>(mut observed: mpsc::Receiver<M>, handle: SafetyHandle) {
    while let Some(message) = observed.recv().await {
        match handle.apply(message.as_ref().to_owned()).await {
            Ok(Hl7Applied::Ignored(why)) => debug!(why, "HL7 message not used by the safety store"),
            Ok(applied) => info!(outcome = applied.outcome(), "safety store updated from HL7"),
            Err(e) => warn!(error = %e, "HL7 message not applied to the safety store"),
        }
    }
}
