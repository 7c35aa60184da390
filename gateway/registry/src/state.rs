//! The registry's state in memory and the one way it changes: [`Op`]s.
//!
//! Every change is a list of ops written as one journal frame before it is applied, and
//! [`State::apply`] is the same code at open (replay) and live, so what is on disk and what
//! is in memory cannot drift apart. Ops record outcomes (which person a record joined), not
//! inputs to the matcher: a replay with another matcher model rebuilds exactly the state that
//! was acknowledged.
//!
//! Held: source records (with their prepared form and the blocking [`Index`]), persons (sets
//! of source keys), `NotSame` pairs, review items (decided ones are kept, marked) and
//! consents (indexed by the source record they were recorded against).

use std::collections::{HashMap, HashSet};

use gateway_identity::{Index, Matcher, Prepared, Record};
use serde::{Deserialize, Serialize};

use crate::api::{Consent, ConsentStatus, PersonId, SourceKey, Verdict};

/// One source record as held (`Debug` shows no identity: `Record` and `Prepared` are
/// redacted).
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub record: Record,
    pub person: PersonId,
    pub updated: String,
    pub prepared: Prepared,
}

/// A review item as held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Review {
    pub id: String,
    pub a: SourceKey,
    pub b: SourceKey,
    pub score: f64,
    pub queued: String,
    pub decided: Option<Verdict>,
}

/// One change of the state. A journal frame is a `Vec<Op>` applied as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    /// Creates or replaces a source record, as a member of `person`.
    PutRecord {
        key: SourceKey,
        record: Box<Record>,
        updated: String,
        person: PersonId,
    },
    /// Moves a source record to `person`.
    SetPerson { key: SourceKey, person: PersonId },
    /// A40: `prior` is merged into `survivor` (same hospital): `prior` goes, its consents and
    /// `NotSame` pairs follow `survivor`, its open reviews are dropped.
    Retire {
        prior: SourceKey,
        survivor: SourceKey,
    },
    /// A47: `old` is now called `new`; everything follows.
    Rekey { old: SourceKey, new: SourceKey },
    /// Queues a review item.
    PutReview(Review),
    /// Decides a review item (kept, marked).
    DecideReview { id: String, verdict: Verdict },
    /// A person said `a` and `b` are not the same person: never linked automatically.
    NotSame { a: SourceKey, b: SourceKey },
    /// A person linked `a` and `b` by hand: an earlier `NotSame` no longer holds.
    ClearNotSame { a: SourceKey, b: SourceKey },
    /// Records or replaces (same id) a consent.
    PutConsent(Consent),
}

fn pair(a: &SourceKey, b: &SourceKey) -> (SourceKey, SourceKey) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

/// Everything the registry knows.
pub(crate) struct State {
    matcher: Matcher,
    /// Boxed: a table slot stays small (the table doubles as it grows, and at a million
    /// records unboxed slots cost about a gigabyte of mostly empty table).
    pub records: HashMap<SourceKey, Box<Entry>>,
    /// Each person's source keys, sorted (a `Vec`: most persons hold one to three records,
    /// and a tree node per person would cost hundreds of bytes at a million persons).
    pub persons: HashMap<PersonId, Vec<SourceKey>>,
    pub index: Index<SourceKey>,
    not_same: HashSet<(SourceKey, SourceKey)>,
    pub reviews: HashMap<String, Review>,
    pub consents: HashMap<String, Consent>,
    /// Consent ids by the source record they were recorded against, oldest first.
    consents_by_key: HashMap<SourceKey, Vec<String>>,
    /// Each consent's place in recording order.
    consent_pos: HashMap<String, usize>,
    consent_order: Vec<String>,
}

/// Counts only: the state holds patient identity.
impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("records", &self.records.len())
            .field("persons", &self.persons.len())
            .field("reviews", &self.reviews.len())
            .field("consents", &self.consents.len())
            .finish_non_exhaustive()
    }
}

impl State {
    pub fn new(matcher: Matcher) -> Self {
        Self {
            matcher,
            records: HashMap::new(),
            persons: HashMap::new(),
            index: Index::new(),
            not_same: HashSet::new(),
            reviews: HashMap::new(),
            consents: HashMap::new(),
            consents_by_key: HashMap::new(),
            consent_pos: HashMap::new(),
            consent_order: Vec::new(),
        }
    }

    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    pub fn person_of(&self, key: &SourceKey) -> Option<&PersonId> {
        self.records.get(key).map(|e| &e.person)
    }

    /// The source keys of `person` (none for an unknown person).
    pub fn members(&self, person: &PersonId) -> Vec<SourceKey> {
        self.persons.get(person).cloned().unwrap_or_default()
    }

    pub fn is_not_same(&self, a: &SourceKey, b: &SourceKey) -> bool {
        self.not_same.contains(&pair(a, b))
    }

    /// Whether `key` was declared not the same as any member of `person`.
    pub fn not_same_as_person(&self, key: &SourceKey, person: &PersonId) -> bool {
        !self.not_same.is_empty()
            && self
                .persons
                .get(person)
                .is_some_and(|m| m.iter().any(|k| self.is_not_same(key, k)))
    }

    /// Undecided review items.
    pub fn pending_reviews(&self) -> usize {
        self.reviews
            .values()
            .filter(|r| r.decided.is_none())
            .count()
    }

    /// The consents of `person` (recorded against any of its source records), oldest first.
    pub fn person_consents(&self, person: &PersonId) -> Vec<&Consent> {
        let mut out: Vec<&Consent> = self
            .persons
            .get(person)
            .into_iter()
            .flatten()
            .filter_map(|k| self.consents_by_key.get(k))
            .flatten()
            .filter_map(|id| self.consents.get(id))
            .collect();
        out.sort_by_key(|c| self.consent_pos.get(&c.id).copied().unwrap_or(usize::MAX));
        out
    }

    /// Active consents of `person`.
    pub fn active_consents(&self, person: &PersonId) -> Vec<&Consent> {
        self.person_consents(person)
            .into_iter()
            .filter(|c| c.status == ConsentStatus::Active)
            .collect()
    }

    fn join(&mut self, key: &SourceKey, person: &PersonId) {
        let members = self.persons.entry(person.clone()).or_default();
        if let Err(at) = members.binary_search(key) {
            members.insert(at, key.clone());
        }
    }

    fn leave(&mut self, key: &SourceKey, person: &PersonId) {
        if let Some(m) = self.persons.get_mut(person) {
            if let Ok(at) = m.binary_search(key) {
                m.remove(at);
            }
            if m.is_empty() {
                self.persons.remove(person);
            }
        }
    }

    fn move_consents(&mut self, from: &SourceKey, to: &SourceKey) {
        if let Some(ids) = self.consents_by_key.remove(from) {
            for id in &ids {
                if let Some(c) = self.consents.get_mut(id) {
                    c.patient = to.clone();
                }
            }
            self.consents_by_key
                .entry(to.clone())
                .or_default()
                .extend(ids);
        }
    }

    fn move_not_same(&mut self, from: &SourceKey, to: &SourceKey) {
        if self.not_same.is_empty() {
            return;
        }
        let moved: Vec<(SourceKey, SourceKey)> = self
            .not_same
            .iter()
            .filter(|(a, b)| a == from || b == from)
            .cloned()
            .collect();
        for (a, b) in moved {
            self.not_same.remove(&(a.clone(), b.clone()));
            let other = if &a == from { b } else { a };
            if &other != to {
                self.not_same.insert(pair(to, &other));
            }
        }
    }

    /// Applies one op. Ops naming a record that is not there are no-ops (they cannot be
    /// produced live; a replay stays total).
    pub fn apply(&mut self, op: Op) {
        match op {
            Op::PutRecord {
                key,
                record,
                updated,
                person,
            } => {
                let record = *record;
                let prepared = self.matcher.prepare(&record);
                if let Some(old) = self.records.remove(&key) {
                    self.index.remove(&key, &old.prepared);
                    self.leave(&key, &old.person);
                }
                self.index.insert(key.clone(), &prepared);
                self.join(&key, &person);
                self.records.insert(
                    key,
                    Box::new(Entry {
                        record,
                        person,
                        updated,
                        prepared,
                    }),
                );
            }
            Op::SetPerson { key, person } => {
                let Some(old) = self.records.get(&key).map(|e| e.person.clone()) else {
                    return;
                };
                self.leave(&key, &old);
                self.join(&key, &person);
                if let Some(e) = self.records.get_mut(&key) {
                    e.person = person;
                }
            }
            Op::Retire { prior, survivor } => {
                if let Some(old) = self.records.remove(&prior) {
                    self.index.remove(&prior, &old.prepared);
                    self.leave(&prior, &old.person);
                }
                self.move_consents(&prior, &survivor);
                self.move_not_same(&prior, &survivor);
                self.reviews
                    .retain(|_, r| r.decided.is_some() || (r.a != prior && r.b != prior));
            }
            Op::Rekey { old, new } => {
                if let Some(mut e) = self.records.remove(&old) {
                    self.index.remove(&old, &e.prepared);
                    self.leave(&old, &e.person);
                    e.record.hospital_id = Some(new.hospital_id.clone());
                    e.record.patient_id = Some(new.patient_id.clone());
                    e.prepared = self.matcher.prepare(&e.record);
                    self.index.insert(new.clone(), &e.prepared);
                    self.join(&new, &e.person);
                    self.records.insert(new.clone(), e);
                }
                self.move_consents(&old, &new);
                self.move_not_same(&old, &new);
                for r in self.reviews.values_mut() {
                    if r.a == old {
                        r.a = new.clone();
                    }
                    if r.b == old {
                        r.b = new.clone();
                    }
                }
            }
            Op::PutReview(review) => {
                self.reviews.insert(review.id.clone(), review);
            }
            Op::DecideReview { id, verdict } => {
                if let Some(r) = self.reviews.get_mut(&id) {
                    r.decided = Some(verdict);
                }
            }
            Op::NotSame { a, b } => {
                if a != b {
                    self.not_same.insert(pair(&a, &b));
                }
            }
            Op::ClearNotSame { a, b } => {
                self.not_same.remove(&pair(&a, &b));
            }
            Op::PutConsent(consent) => {
                let known = self.consents.contains_key(&consent.id);
                if !known {
                    self.consent_pos
                        .insert(consent.id.clone(), self.consent_order.len());
                    self.consent_order.push(consent.id.clone());
                    self.consents_by_key
                        .entry(consent.patient.clone())
                        .or_default()
                        .push(consent.id.clone());
                }
                self.consents.insert(consent.id.clone(), consent);
            }
        }
    }

    /// The ops that rebuild this state from nothing (for a snapshot), in chunks of `chunk`.
    pub fn snapshot_ops(&self, chunk: usize) -> impl Iterator<Item = Vec<Op>> + '_ {
        let records = self.records.iter().map(|(key, e)| Op::PutRecord {
            key: key.clone(),
            record: Box::new(e.record.clone()),
            updated: e.updated.clone(),
            person: e.person.clone(),
        });
        let not_same = self.not_same.iter().map(|(a, b)| Op::NotSame {
            a: a.clone(),
            b: b.clone(),
        });
        let reviews = self.reviews.values().cloned().map(Op::PutReview);
        let consents = self
            .consent_order
            .iter()
            .filter_map(|id| self.consents.get(id))
            .cloned()
            .map(Op::PutConsent);
        let mut all = records.chain(not_same).chain(reviews).chain(consents);
        std::iter::from_fn(move || {
            let part: Vec<Op> = all.by_ref().take(chunk.max(1)).collect();
            (!part.is_empty()).then_some(part)
        })
    }
}
