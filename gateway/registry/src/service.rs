//! The registry as a service: one thread (`identity-registry`) owns the [`State`] and the
//! files; everyone else holds a [`RegistryHandle`] and sends typed requests over a tokio
//! channel, awaiting each answer on a oneshot (the model is `gateway_booking`'s ledger
//! service).
//!
//! Every change is written to the sealed journal and `fdatasync`'d, then applied, then
//! audited, then answered: an acknowledged change survives a crash. Audit appends (blocking:
//! file lock, `fdatasync`) run on this thread too. An audit that cannot be written makes a
//! lookup or a disclosure decision fail ([`RegistryError::Unavailable`]: no unaudited
//! disclosure); a change already durable stays made and the failure is logged.
//!
//! Linking (a new or changed record, [`Registry::upsert`]):
//! - the record is prepared, its blocking candidates compared; candidates declared
//!   `NotSame` with it (by a reviewer, or by an unlink) and candidates whose person holds
//!   such a record are skipped; the best remaining score decides;
//! - `link`: the record joins the candidate's person, unless that person already holds a
//!   record of the same hospital with another patient id (then: review), or the record is
//!   already linked to others (a changed, linked record is never moved automatically: the
//!   new match goes to review);
//! - `review`: a review item (one open item per pair); the record stays in (or gets) a
//!   person of its own;
//! - `distinct`: a person of its own (an update keeps its person).
//!
//! A changed record stays in its person even if it no longer matches the others: only a
//! person unlinks. Person ids are random (16 bytes, hex); manual links keep the first
//! record's person id; an unlinked record gets a new one.
//!
//! Lifetime: the thread ends when the last handle is dropped (after answering what is
//! queued). A handle whose thread is gone answers [`RegistryError::Unavailable`].

use std::path::Path;
use std::sync::Arc;

use gateway_audit::{Action, AuditLog, Event, Outcome};
use gateway_identity::{Comparison, Decision, Matcher, Prepared, Record};
use gateway_keystore::MasterKey;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::adt;
use crate::api::*;
use crate::journal::SealKey;
use crate::metrics::Metrics;
use crate::state::{Op, Review, State};
use crate::store::{self, OpenError, Store};

/// Requests waiting for the registry thread before senders wait for room.
const QUEUE: usize = 256;

/// Tuning of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Compact when the journal holds at least this many frames and at least as many as
    /// there are records (default 10 000).
    pub compact_min_frames: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            compact_min_frames: 10_000,
        }
    }
}

/// How a new or changed record was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    /// It joined another record's person (the matcher decided `link`).
    Linked,
    /// A pair went to the review queue.
    Review,
    /// Not linked by this change (a person of its own; a record already linked stays so).
    Distinct,
    /// The record was already held exactly so: nothing changed.
    Unchanged,
}

/// What an ADT event did to the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordEvent {
    /// A01/A04/A08/A28/A31: created or updated.
    Upserted,
    /// A40: the prior record merged into the survivor.
    Merged,
    /// A47: the record's patient id changed.
    IdChanged,
}

/// What [`RegistryHandle::apply_hl7`] made of a message (fixed words only: loggable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Not used by the registry; why.
    Ignored(&'static str),
    /// The message's patient record.
    Record {
        event: RecordEvent,
        outcome: LinkOutcome,
        /// A consent was recorded from its CON segments.
        consent_recorded: bool,
        /// Active consents revoked by a refusing or rescinding CON segment.
        consents_revoked: usize,
    },
}

type Reply<T> = oneshot::Sender<Result<T, RegistryError>>;

/// One typed request to the registry thread, with where its answer goes.
enum Request {
    Search {
        query: Record,
        requester: String,
        actor: String,
        limit: usize,
        reply: Reply<Vec<MatchCandidate>>,
    },
    Members {
        key: SourceKey,
        reply: Reply<(PersonId, Vec<SourceKey>)>,
    },
    PersonMembers {
        person: PersonId,
        reply: Reply<Vec<SourceKey>>,
    },
    Linked {
        key: SourceKey,
        requester: String,
        actor: String,
        reply: Reply<Linked>,
    },
    ReviewQueue {
        reply: Reply<Vec<ReviewItem>>,
    },
    Decide {
        id: String,
        verdict: Verdict,
        actor: String,
        reply: Reply<()>,
    },
    Link {
        a: SourceKey,
        b: SourceKey,
        actor: String,
        reply: Reply<PersonId>,
    },
    Unlink {
        key: SourceKey,
        actor: String,
        reply: Reply<()>,
    },
    Consents {
        key: SourceKey,
        reply: Reply<Vec<Consent>>,
    },
    RecordConsent {
        consent: NewConsent,
        actor: String,
        reply: Reply<Consent>,
    },
    RevokeConsent {
        id: String,
        actor: String,
        reply: Reply<Consent>,
    },
    MayDisclose {
        disclosure: Disclosure,
        actor: String,
        reply: Reply<Result<Permit, Refused>>,
    },
    Hl7 {
        text: String,
        reply: Reply<Applied>,
    },
    Booking {
        hospital: String,
        record: Record,
        reply: Reply<LinkOutcome>,
    },
}

/// The owner of the registry's state and files (runs on its own thread).
pub struct Registry {
    state: State,
    store: Store,
    audit: Arc<AuditLog>,
    metrics: Metrics,
    hospital_id: String,
    options: Options,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// A cheap, cloneable way to the registry thread; implements [`IdentityService`].
#[derive(Clone)]
pub struct RegistryHandle {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for RegistryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryHandle")
            .field("stopped", &self.tx.is_closed())
            .finish()
    }
}

/// Now, RFC 3339 UTC with milliseconds (fixed width: the strings sort as the times).
fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// 16 random bytes, hex.
fn random_id() -> Result<String, RegistryError> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|_| {
        warn!("identity registry: no randomness for an id");
        RegistryError::Unavailable
    })?;
    Ok(hex::encode(b))
}

fn person_ref(p: &PersonId) -> String {
    format!("person:{}", p.0)
}

fn finite(score: f64) -> f64 {
    if score.is_finite() { score } else { 0.0 }
}

fn kind_name(kind: DataKind) -> &'static str {
    match kind {
        DataKind::Identity => "identity",
        DataKind::Results => "results",
        DataKind::Reactions => "reactions",
        DataKind::Dose => "dose",
        DataKind::Images => "images",
    }
}

impl Registry {
    /// Opens (creating if needed) the registry in `dir` (the core's
    /// `<data_dir>/identity`), sealed under a key derived from `master`
    /// ([`gateway_keystore::KeyPurpose::IdentityAtRest`]); replays it, and starts its
    /// thread. `hospital_id` is the core's own (`[identity] hospital_id`): the hospital of
    /// ADT messages that name no sender. Blocking (reads the whole registry): call it before
    /// the runtime starts or in `spawn_blocking`.
    pub fn open(
        dir: &Path,
        master: &MasterKey,
        matcher: Matcher,
        hospital_id: String,
        audit: Arc<AuditLog>,
        metrics: Metrics,
    ) -> Result<RegistryHandle, OpenError> {
        Self::open_with(
            dir,
            master,
            matcher,
            hospital_id,
            audit,
            metrics,
            Options::default(),
        )
    }

    /// [`Registry::open`] with [`Options`].
    pub fn open_with(
        dir: &Path,
        master: &MasterKey,
        matcher: Matcher,
        hospital_id: String,
        audit: Arc<AuditLog>,
        metrics: Metrics,
        options: Options,
    ) -> Result<RegistryHandle, OpenError> {
        let mut state = State::new(matcher);
        let store = store::open(dir, SealKey::derive(master), &mut state)?;
        let mut registry = Self {
            state,
            store,
            audit,
            metrics,
            hospital_id,
            options,
        };
        registry.maybe_compact();
        registry.update_gauges();
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("identity-registry".into())
            .spawn(move || registry.run(rx))
            .map_err(OpenError::Thread)?;
        Ok(RegistryHandle { tx })
    }

    /// Answers requests until every handle is gone. Blocking.
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(request) = rx.blocking_recv() {
            self.answer(request);
        }
        debug!("identity registry stopped: no handle left");
    }

    /// One request. A caller that stopped waiting does not undo a change already made.
    fn answer(&mut self, request: Request) {
        match request {
            Request::Search {
                query,
                requester,
                actor,
                limit,
                reply,
            } => {
                let _ = reply.send(self.search(&query, &requester, &actor, limit));
            }
            Request::Members { key, reply } => {
                let _ = reply.send(
                    self.person(&key)
                        .map(|person| (person.clone(), self.state.members(&person))),
                );
            }
            Request::PersonMembers { person, reply } => {
                let members = self.state.members(&person);
                let _ = reply.send(if members.is_empty() {
                    Err(RegistryError::NotFound)
                } else {
                    Ok(members)
                });
            }
            Request::Linked {
                key,
                requester,
                actor,
                reply,
            } => {
                let _ = reply.send(self.linked(&key, &requester, &actor));
            }
            Request::ReviewQueue { reply } => {
                let _ = reply.send(Ok(self.review_queue()));
            }
            Request::Decide {
                id,
                verdict,
                actor,
                reply,
            } => {
                let _ = reply.send(self.decide(&id, verdict, &actor));
            }
            Request::Link { a, b, actor, reply } => {
                let _ = reply.send(self.link(&a, &b, &actor, "manual"));
            }
            Request::Unlink { key, actor, reply } => {
                let _ = reply.send(self.unlink(&key, &actor));
            }
            Request::Consents { key, reply } => {
                let _ = reply.send(self.consents(&key));
            }
            Request::RecordConsent {
                consent,
                actor,
                reply,
            } => {
                let _ = reply.send(self.record_consent(consent, &actor));
            }
            Request::RevokeConsent { id, actor, reply } => {
                let _ = reply.send(self.revoke_consent(&id, &actor, "revoked"));
            }
            Request::MayDisclose {
                disclosure,
                actor,
                reply,
            } => {
                let _ = reply.send(self.may_disclose(&disclosure, &actor));
            }
            Request::Hl7 { text, reply } => {
                let _ = reply.send(self.apply_hl7(&text));
            }
            Request::Booking {
                hospital,
                record,
                reply,
            } => {
                let _ = reply.send(self.record_booking(hospital, record));
            }
        }
    }

    // ---- plumbing -------------------------------------------------------------------

    /// Makes `ops` durable, then applies them.
    fn commit(&mut self, ops: Vec<Op>) -> Result<(), RegistryError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.store.commit(&ops).map_err(|e| {
            warn!(error = %e, "identity registry: a change could not be saved");
            RegistryError::Unavailable
        })?;
        for op in ops {
            self.state.apply(op);
        }
        self.maybe_compact();
        self.update_gauges();
        Ok(())
    }

    fn maybe_compact(&mut self) {
        let records = self.state.records.len() as u64;
        self.store
            .maybe_compact(&self.state, self.options.compact_min_frames, records);
    }

    fn update_gauges(&self) {
        self.metrics.set_counts(
            self.state.records.len(),
            self.state.persons.len(),
            self.state.pending_reviews(),
        );
    }

    /// Appends an audit record (blocking, on this thread). A refused disclosure is the one
    /// record with outcome `failure`; every other decision here is a `success`.
    fn audit(
        &self,
        actor: &str,
        action: Action,
        subject: Option<String>,
        detail: Option<String>,
    ) -> Result<(), RegistryError> {
        let outcome = if action == Action::DisclosureRefused {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        self.audit
            .append(Event {
                actor: actor.to_owned(),
                action,
                outcome,
                subject,
                detail,
            })
            .map(|_| ())
            .map_err(|e| {
                warn!(error = %e, ?action, "identity registry: audit record not written");
                RegistryError::Unavailable
            })
    }

    /// [`Registry::audit`] after a durable change: a failure is logged, not returned.
    fn audit_change(&self, actor: &str, action: Action, subject: String, detail: &str) {
        let _ = self.audit(actor, action, Some(subject), Some(detail.to_owned()));
    }

    fn person(&self, key: &SourceKey) -> Result<PersonId, RegistryError> {
        self.state
            .person_of(key)
            .cloned()
            .ok_or(RegistryError::NotFound)
    }

    fn source_record(&self, key: &SourceKey) -> Option<SourceRecord> {
        let e = self.state.records.get(key)?;
        Some(SourceRecord {
            key: key.clone(),
            person: e.person.clone(),
            record: e.record.clone(),
            updated: e.updated.clone(),
        })
    }

    // ---- linking --------------------------------------------------------------------

    /// The best candidate for `key` (prepared as `p`) outside `own` person that the matcher
    /// does not call distinct and no one declared not the same.
    fn best_candidate(
        &self,
        key: &SourceKey,
        p: &Prepared,
        own: Option<&PersonId>,
    ) -> Option<(SourceKey, Comparison)> {
        let matcher = self.state.matcher();
        let mut best: Option<(SourceKey, Comparison)> = None;
        for cand in self.state.index.candidates(p) {
            if &cand == key {
                continue;
            }
            let Some(e) = self.state.records.get(&cand) else {
                continue;
            };
            if own == Some(&e.person)
                || self.state.is_not_same(key, &cand)
                || self.state.not_same_as_person(key, &e.person)
            {
                continue;
            }
            let cmp = matcher.compare_prepared(p, &e.prepared);
            if cmp.decision == Decision::Distinct {
                continue;
            }
            let better = match &best {
                None => true,
                Some((_, b)) => {
                    cmp.score > b.score
                        || (cmp.score == b.score
                            && cmp.decision == Decision::Link
                            && b.decision != Decision::Link)
                }
            };
            if better {
                best = Some((cand, cmp));
            }
        }
        best
    }

    /// Whether `person` holds a record of `key`'s hospital with another patient id.
    fn same_hospital_other_id(&self, key: &SourceKey, person: &PersonId) -> bool {
        self.state.persons.get(person).is_some_and(|m| {
            m.iter()
                .any(|k| k.hospital_id == key.hospital_id && k.patient_id != key.patient_id)
        })
    }

    fn pending_review_between(&self, a: &SourceKey, b: &SourceKey) -> bool {
        self.state
            .reviews
            .values()
            .any(|r| r.decided.is_none() && ((&r.a == a && &r.b == b) || (&r.a == b && &r.b == a)))
    }

    /// Creates or updates a source record and places it (see the module docs).
    fn upsert(
        &mut self,
        key: SourceKey,
        mut record: Record,
        actor: &str,
    ) -> Result<LinkOutcome, RegistryError> {
        record.hospital_id = Some(key.hospital_id.clone());
        record.patient_id = Some(key.patient_id.clone());
        let existing = self
            .state
            .records
            .get(&key)
            .map(|e| (e.record == record, e.person.clone()));
        let own = match existing {
            Some((true, _)) => return Ok(LinkOutcome::Unchanged),
            Some((false, p)) => Some(p),
            None => None,
        };
        let linked = own
            .as_ref()
            .is_some_and(|p| self.state.persons.get(p).is_some_and(|m| m.len() > 1));
        let prepared = self.state.matcher().prepare(&record);
        let best = self.best_candidate(&key, &prepared, own.as_ref());
        let now = now();
        let mut extra = Vec::new();
        let (person, outcome) = match best {
            Some((cand, cmp)) => {
                let cand_person = self.person(&cand)?;
                if cmp.decision == Decision::Link
                    && !linked
                    && !self.same_hospital_other_id(&key, &cand_person)
                {
                    (cand_person, LinkOutcome::Linked)
                } else {
                    if !self.pending_review_between(&key, &cand) {
                        extra.push(Op::PutReview(Review {
                            id: random_id()?,
                            a: key.clone(),
                            b: cand,
                            score: finite(cmp.score),
                            queued: now.clone(),
                            decided: None,
                        }));
                    }
                    let person = match own {
                        Some(p) => p,
                        None => PersonId(random_id()?),
                    };
                    (person, LinkOutcome::Review)
                }
            }
            None => {
                let person = match own {
                    Some(p) => p,
                    None => PersonId(random_id()?),
                };
                (person, LinkOutcome::Distinct)
            }
        };
        let mut ops = vec![Op::PutRecord {
            key,
            record: Box::new(record),
            updated: now,
            person: person.clone(),
        }];
        ops.extend(extra);
        self.commit(ops)?;
        self.metrics.matched(match outcome {
            LinkOutcome::Linked => "link",
            LinkOutcome::Review => "review",
            _ => "distinct",
        });
        if outcome == LinkOutcome::Linked {
            self.audit_change(
                actor,
                Action::IdentityLinked,
                person_ref(&person),
                "matcher",
            );
        }
        Ok(outcome)
    }

    /// The ops that make `a`'s and `b`'s persons one (`a`'s id), clear a `NotSame` between
    /// them and close the open reviews the link answers.
    fn link_ops(&self, a: &SourceKey, b: &SourceKey) -> Result<(PersonId, Vec<Op>), RegistryError> {
        let pa = self.person(a)?;
        let pb = self.person(b)?;
        let mut ops = Vec::new();
        if pa != pb {
            for k in self.state.members(&pb) {
                ops.push(Op::SetPerson {
                    key: k,
                    person: pa.clone(),
                });
            }
        }
        if self.state.is_not_same(a, b) {
            ops.push(Op::ClearNotSame {
                a: a.clone(),
                b: b.clone(),
            });
        }
        let members: Vec<SourceKey> = self
            .state
            .members(&pa)
            .into_iter()
            .chain(self.state.members(&pb))
            .collect();
        for r in self.state.reviews.values() {
            if r.decided.is_none() && members.contains(&r.a) && members.contains(&r.b) {
                ops.push(Op::DecideReview {
                    id: r.id.clone(),
                    verdict: Verdict::Same,
                });
            }
        }
        Ok((pa, ops))
    }

    fn link(
        &mut self,
        a: &SourceKey,
        b: &SourceKey,
        actor: &str,
        how: &str,
    ) -> Result<PersonId, RegistryError> {
        let (person, ops) = self.link_ops(a, b)?;
        self.commit(ops)?;
        self.audit_change(actor, Action::IdentityLinked, person_ref(&person), how);
        Ok(person)
    }

    fn unlink(&mut self, key: &SourceKey, actor: &str) -> Result<(), RegistryError> {
        let person = self.person(key)?;
        let others: Vec<SourceKey> = self
            .state
            .members(&person)
            .into_iter()
            .filter(|k| k != key)
            .collect();
        if others.is_empty() {
            self.audit_change(
                actor,
                Action::IdentityUnlinked,
                person_ref(&person),
                "not linked",
            );
            return Ok(());
        }
        let new = PersonId(random_id()?);
        let mut ops = vec![Op::SetPerson {
            key: key.clone(),
            person: new.clone(),
        }];
        ops.extend(others.into_iter().map(|k| Op::NotSame {
            a: key.clone(),
            b: k,
        }));
        self.commit(ops)?;
        self.audit_change(actor, Action::IdentityUnlinked, person_ref(&new), "manual");
        Ok(())
    }

    fn review_queue(&self) -> Vec<ReviewItem> {
        let mut open: Vec<&Review> = self
            .state
            .reviews
            .values()
            .filter(|r| r.decided.is_none())
            .collect();
        open.sort_by(|x, y| x.queued.cmp(&y.queued).then(x.id.cmp(&y.id)));
        open.into_iter()
            .filter_map(|r| {
                Some(ReviewItem {
                    id: r.id.clone(),
                    a: self.source_record(&r.a)?,
                    b: self.source_record(&r.b)?,
                    score: r.score,
                    queued: r.queued.clone(),
                })
            })
            .collect()
    }

    fn decide(&mut self, id: &str, verdict: Verdict, actor: &str) -> Result<(), RegistryError> {
        let review = self
            .state
            .reviews
            .get(id)
            .cloned()
            .ok_or(RegistryError::NotFound)?;
        if review.decided.is_some() {
            return Err(RegistryError::Conflict("review already decided"));
        }
        let decided = Op::DecideReview {
            id: id.to_owned(),
            verdict,
        };
        let subject = format!("review:{id}");
        match verdict {
            Verdict::Same => {
                let (person, mut ops) = self.link_ops(&review.a, &review.b)?;
                ops.retain(|op| !matches!(op, Op::DecideReview { id: other, .. } if other == id));
                ops.push(decided);
                self.commit(ops)?;
                self.audit_change(actor, Action::IdentityReviewDecided, subject, "same");
                self.audit_change(actor, Action::IdentityLinked, person_ref(&person), "review");
            }
            Verdict::NotSame => {
                // Linked meanwhile (by hand or another review): `b` leaves `a`'s person.
                let mut ops = Vec::new();
                if self.person(&review.a)? == self.person(&review.b)? {
                    ops.push(Op::SetPerson {
                        key: review.b.clone(),
                        person: PersonId(random_id()?),
                    });
                }
                ops.push(Op::NotSame {
                    a: review.a,
                    b: review.b,
                });
                ops.push(decided);
                self.commit(ops)?;
                self.audit_change(actor, Action::IdentityReviewDecided, subject, "not_same");
            }
        }
        Ok(())
    }

    // ---- consent and disclosure ---------------------------------------------------

    fn consents(&self, key: &SourceKey) -> Result<Vec<Consent>, RegistryError> {
        let person = self.person(key)?;
        let mut all: Vec<Consent> = self
            .state
            .person_consents(&person)
            .into_iter()
            .cloned()
            .collect();
        all.reverse();
        Ok(all)
    }

    fn record_consent(&mut self, new: NewConsent, actor: &str) -> Result<Consent, RegistryError> {
        let person = self.person(&new.patient)?;
        let now = now();
        let replaced: Vec<Consent> = self
            .state
            .active_consents(&person)
            .into_iter()
            .filter(|c| c.source == new.source)
            .map(|c| Consent {
                status: ConsentStatus::Revoked,
                revoked_by: Some(actor.to_owned()),
                revoked_at: Some(now.clone()),
                ..c.clone()
            })
            .collect();
        let consent = Consent {
            id: random_id()?,
            patient: new.patient,
            grants: new.grants,
            status: ConsentStatus::Active,
            source: new.source,
            recorded_by: actor.to_owned(),
            recorded_at: now,
            revoked_by: None,
            revoked_at: None,
        };
        let mut ops: Vec<Op> = replaced.iter().cloned().map(Op::PutConsent).collect();
        ops.push(Op::PutConsent(consent.clone()));
        self.commit(ops)?;
        for old in &replaced {
            self.audit_change(
                actor,
                Action::ConsentRevoked,
                format!("consent:{}", old.id),
                "replaced",
            );
        }
        let source = match consent.source {
            ConsentSource::Kiosk => "kiosk",
            ConsentSource::Hl7 => "hl7",
        };
        self.audit_change(
            actor,
            Action::ConsentRecorded,
            format!("consent:{}", consent.id),
            source,
        );
        Ok(consent)
    }

    fn revoke_consent(
        &mut self,
        id: &str,
        actor: &str,
        why: &str,
    ) -> Result<Consent, RegistryError> {
        let consent = self
            .state
            .consents
            .get(id)
            .cloned()
            .ok_or(RegistryError::NotFound)?;
        if consent.status == ConsentStatus::Revoked {
            return Err(RegistryError::Conflict("consent already revoked"));
        }
        let revoked = Consent {
            status: ConsentStatus::Revoked,
            revoked_by: Some(actor.to_owned()),
            revoked_at: Some(now()),
            ..consent
        };
        self.commit(vec![Op::PutConsent(revoked.clone())])?;
        self.audit_change(actor, Action::ConsentRevoked, format!("consent:{id}"), why);
        Ok(revoked)
    }

    /// The active consent of `person` that lets `to_hospital` see `kind`.
    fn consent_for(&self, person: &PersonId, to_hospital: &str, kind: DataKind) -> Option<String> {
        self.state
            .active_consents(person)
            .into_iter()
            .rev()
            .find(|c| {
                c.grants.iter().any(|g| {
                    g.kinds.contains(&kind)
                        && match &g.grantee {
                            Grantee::Region => true,
                            Grantee::Hospital(h) => h == to_hospital,
                        }
                })
            })
            .map(|c| c.id.clone())
    }

    /// Audits a disclosure decision and counts it. Fails closed.
    fn audit_disclosure(
        &self,
        actor: &str,
        person: Option<&PersonId>,
        kind: DataKind,
        outcome: &'static str,
    ) -> Result<(), RegistryError> {
        let action = if outcome == "refused" {
            Action::DisclosureRefused
        } else {
            Action::DisclosureAllowed
        };
        self.audit(
            actor,
            action,
            person.map(person_ref),
            Some(format!("{}: {outcome}", kind_name(kind))),
        )?;
        self.metrics.disclosed(outcome);
        Ok(())
    }

    fn may_disclose(
        &self,
        d: &Disclosure,
        actor: &str,
    ) -> Result<Result<Permit, Refused>, RegistryError> {
        let person = self.state.person_of(&d.owner).cloned();
        // The referral first: results returned to the clinic that booked are recorded as
        // such even though the owner named is the clinic's own record of the patient.
        let (answer, outcome) = if d.referral && d.kind == DataKind::Results {
            (Ok(Permit::Referral), "referral")
        } else if d.owner.hospital_id == d.to_hospital {
            (Ok(Permit::SameHospital), "same_hospital")
        } else if let Some(id) = person
            .as_ref()
            .and_then(|p| self.consent_for(p, &d.to_hospital, d.kind))
        {
            (Ok(Permit::Consent(id)), "consent")
        } else {
            (Err(Refused), "refused")
        };
        self.audit_disclosure(actor, person.as_ref(), d.kind, outcome)?;
        Ok(answer)
    }

    /// Whether `requester` may see `key`'s identity: its own hospital's, or with consent.
    fn identity_visible(
        &self,
        key: &SourceKey,
        person: &PersonId,
        requester: &str,
    ) -> Option<&'static str> {
        if key.hospital_id == requester {
            Some("same_hospital")
        } else if self
            .consent_for(person, requester, DataKind::Identity)
            .is_some()
        {
            Some("consent")
        } else {
            None
        }
    }

    fn search(
        &self,
        query: &Record,
        requester: &str,
        actor: &str,
        limit: usize,
    ) -> Result<Vec<MatchCandidate>, RegistryError> {
        let matcher = self.state.matcher();
        let p = matcher.prepare(query);
        let mut scored: Vec<(SourceKey, Comparison)> = self
            .state
            .index
            .candidates(&p)
            .into_iter()
            .filter_map(|k| {
                let e = self.state.records.get(&k)?;
                let cmp = matcher.compare_prepared(&p, &e.prepared);
                (cmp.decision != Decision::Distinct).then_some((k, cmp))
            })
            .collect();
        scored.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then(a.0.cmp(&b.0)));
        let mut shown = Vec::new();
        let mut refused: Vec<PersonId> = Vec::new();
        let mut allowed: Vec<PersonId> = Vec::new();
        for (key, cmp) in scored {
            let Some(record) = self.source_record(&key) else {
                continue;
            };
            match self.identity_visible(&key, &record.person, requester) {
                Some(why) => {
                    if shown.len() >= limit {
                        continue;
                    }
                    if why == "consent" && !allowed.contains(&record.person) {
                        allowed.push(record.person.clone());
                    }
                    shown.push(MatchCandidate {
                        record,
                        score: cmp.score,
                        decision: cmp.decision,
                    });
                }
                None => {
                    if !refused.contains(&record.person) {
                        refused.push(record.person);
                    }
                }
            }
        }
        self.audit(
            actor,
            Action::PatientLookup,
            None,
            Some(format!(
                "pdqm search: {} shown, {} persons withheld",
                shown.len(),
                refused.len()
            )),
        )?;
        for p in &allowed {
            self.audit_disclosure(actor, Some(p), DataKind::Identity, "consent")?;
        }
        for p in &refused {
            self.audit_disclosure(actor, Some(p), DataKind::Identity, "refused")?;
        }
        Ok(shown)
    }

    fn linked(
        &self,
        key: &SourceKey,
        requester: &str,
        actor: &str,
    ) -> Result<Linked, RegistryError> {
        let person = self.person(key)?;
        let mut identifiers = Vec::new();
        let mut withheld = 0;
        let mut by_consent = false;
        for k in self.state.members(&person) {
            match self.identity_visible(&k, &person, requester) {
                Some(why) => {
                    by_consent |= why == "consent";
                    identifiers.push(k);
                }
                None => withheld += 1,
            }
        }
        self.audit(
            actor,
            Action::PatientLookup,
            Some(person_ref(&person)),
            Some(format!(
                "pixm linked: {} shown, {withheld} withheld",
                identifiers.len()
            )),
        )?;
        if by_consent {
            self.audit_disclosure(actor, Some(&person), DataKind::Identity, "consent")?;
        }
        if withheld > 0 {
            self.audit_disclosure(actor, Some(&person), DataKind::Identity, "refused")?;
        }
        Ok(Linked {
            person,
            identifiers,
            withheld,
        })
    }

    // ---- feeds ----------------------------------------------------------------------

    fn record_booking(
        &mut self,
        hospital: String,
        record: Record,
    ) -> Result<LinkOutcome, RegistryError> {
        let patient_id = record
            .patient_id
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .ok_or(RegistryError::Conflict("the booking names no patient id"))?
            .to_owned();
        let actor = format!("booking:{hospital}");
        self.upsert(
            SourceKey {
                hospital_id: hospital,
                patient_id,
            },
            record,
            &actor,
        )
    }

    /// A40 (and an A47 onto an id that exists): `prior` goes into `survivor`.
    fn merge(
        &mut self,
        prior: SourceKey,
        survivor: SourceKey,
        record: Record,
        actor: &str,
    ) -> Result<LinkOutcome, RegistryError> {
        if prior == survivor || !self.state.records.contains_key(&prior) {
            return self.upsert(survivor, record, actor);
        }
        if !self.state.records.contains_key(&survivor) {
            return self.change_id(prior, survivor, record, actor);
        }
        let (person, mut ops) = self.link_ops(&survivor, &prior)?;
        ops.push(Op::Retire {
            prior,
            survivor: survivor.clone(),
        });
        self.commit(ops)?;
        self.audit_change(actor, Action::IdentityLinked, person_ref(&person), "merge");
        self.upsert(survivor, record, actor)
    }

    /// A47: `old` becomes `new`.
    fn change_id(
        &mut self,
        old: SourceKey,
        new: SourceKey,
        record: Record,
        actor: &str,
    ) -> Result<LinkOutcome, RegistryError> {
        if old == new || !self.state.records.contains_key(&old) {
            return self.upsert(new, record, actor);
        }
        if self.state.records.contains_key(&new) {
            return self.merge(old, new, record, actor);
        }
        self.commit(vec![Op::Rekey {
            old,
            new: new.clone(),
        }])?;
        self.upsert(new, record, actor)
    }

    fn apply_hl7(&mut self, text: &str) -> Result<Applied, RegistryError> {
        let adt = match adt::read(text) {
            Ok(adt) => adt,
            Err(why) => return Ok(Applied::Ignored(why)),
        };
        let hospital = adt.hospital.unwrap_or_else(|| self.hospital_id.clone());
        let actor = format!("hl7:{hospital}");
        let key = SourceKey {
            hospital_id: hospital.clone(),
            patient_id: adt.patient_id,
        };
        let (event, outcome) = match adt.event {
            adt::Event::Upsert => (
                RecordEvent::Upserted,
                self.upsert(key.clone(), adt.record, &actor)?,
            ),
            adt::Event::Merge { prior } => {
                let prior = SourceKey {
                    hospital_id: hospital.clone(),
                    patient_id: prior,
                };
                (
                    RecordEvent::Merged,
                    self.merge(prior, key.clone(), adt.record, &actor)?,
                )
            }
            adt::Event::ChangeId { old } => {
                let old = SourceKey {
                    hospital_id: hospital.clone(),
                    patient_id: old,
                };
                (
                    RecordEvent::IdChanged,
                    self.change_id(old, key.clone(), adt.record, &actor)?,
                )
            }
        };
        let mut consents_revoked = 0;
        if adt.revoke {
            let person = self.person(&key)?;
            let active: Vec<String> = self
                .state
                .active_consents(&person)
                .into_iter()
                .map(|c| c.id.clone())
                .collect();
            for id in active {
                self.revoke_consent(&id, &actor, "hl7 refused or rescinded")?;
                consents_revoked += 1;
            }
        }
        let consent_recorded = !adt.grants.is_empty();
        if consent_recorded {
            self.record_consent(
                NewConsent {
                    patient: key,
                    grants: adt.grants,
                    source: ConsentSource::Hl7,
                },
                &actor,
            )?;
        }
        Ok(Applied::Record {
            event,
            outcome,
            consent_recorded,
            consents_revoked,
        })
    }
}

impl RegistryHandle {
    /// Sends a request and awaits its answer.
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, RegistryError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| RegistryError::Unavailable)?;
        answer.await.map_err(|_| RegistryError::Unavailable)?
    }

    /// Applies one HL7 message (ADT; anything else is [`Applied::Ignored`]). The listener
    /// already acknowledged it: nothing is answered on the wire.
    pub fn apply_hl7(&self, text: String) -> BoxFuture<'static, Result<Applied, RegistryError>> {
        let this = self.clone();
        Box::pin(async move { this.ask(|reply| Request::Hl7 { text, reply }).await })
    }

    /// The person of `key` and every source record linked to it (`key` among them), with
    /// no consent check and nothing audited: for services on the core that gate each
    /// disclosure themselves with [`IdentityService::may_disclose`] (the safety service).
    /// Never answer a user with this list.
    pub fn members(
        &self,
        key: SourceKey,
    ) -> BoxFuture<'static, Result<(PersonId, Vec<SourceKey>), RegistryError>> {
        let this = self.clone();
        Box::pin(async move { this.ask(|reply| Request::Members { key, reply }).await })
    }

    /// Every source record of `person` ([`RegistryError::NotFound`] when it has none), with
    /// no consent check and nothing audited, like [`RegistryHandle::members`]: for the
    /// core's operator views that audit themselves (`gatewayd safety show`).
    pub fn person_members(
        &self,
        person: PersonId,
    ) -> BoxFuture<'static, Result<Vec<SourceKey>, RegistryError>> {
        let this = self.clone();
        Box::pin(async move {
            this.ask(|reply| Request::PersonMembers { person, reply })
                .await
        })
    }

    /// A clinic's booking: the patient as clinic `hospital_id` knows them (`record.patient_id`
    /// is the clinic's patient id; a record without one is [`RegistryError::Conflict`]).
    pub fn record_booking(
        &self,
        hospital_id: String,
        record: Record,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let this = self.clone();
        Box::pin(async move {
            this.ask(|reply| Request::Booking {
                hospital: hospital_id,
                record,
                reply,
            })
            .await
            .map(|_: LinkOutcome| ())
        })
    }
}

impl IdentityService for RegistryHandle {
    fn search(
        &self,
        query: Record,
        requester_hospital: &str,
        actor: &str,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<MatchCandidate>, RegistryError>> {
        let (this, requester, actor) = (
            self.clone(),
            requester_hospital.to_owned(),
            actor.to_owned(),
        );
        Box::pin(async move {
            this.ask(|reply| Request::Search {
                query,
                requester,
                actor,
                limit,
                reply,
            })
            .await
        })
    }

    fn linked(
        &self,
        key: SourceKey,
        requester_hospital: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<Linked, RegistryError>> {
        let (this, requester, actor) = (
            self.clone(),
            requester_hospital.to_owned(),
            actor.to_owned(),
        );
        Box::pin(async move {
            this.ask(|reply| Request::Linked {
                key,
                requester,
                actor,
                reply,
            })
            .await
        })
    }

    fn review_queue(&self) -> BoxFuture<'static, Result<Vec<ReviewItem>, RegistryError>> {
        let this = self.clone();
        Box::pin(async move { this.ask(|reply| Request::ReviewQueue { reply }).await })
    }

    fn decide(
        &self,
        review_id: &str,
        verdict: Verdict,
        actor: &str,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let (this, id, actor) = (self.clone(), review_id.to_owned(), actor.to_owned());
        Box::pin(async move {
            this.ask(|reply| Request::Decide {
                id,
                verdict,
                actor,
                reply,
            })
            .await
        })
    }

    fn link(
        &self,
        a: SourceKey,
        b: SourceKey,
        actor: &str,
    ) -> BoxFuture<'static, Result<PersonId, RegistryError>> {
        let (this, actor) = (self.clone(), actor.to_owned());
        Box::pin(async move { this.ask(|reply| Request::Link { a, b, actor, reply }).await })
    }

    fn unlink(&self, key: SourceKey, actor: &str) -> BoxFuture<'static, Result<(), RegistryError>> {
        let (this, actor) = (self.clone(), actor.to_owned());
        Box::pin(async move {
            this.ask(|reply| Request::Unlink { key, actor, reply })
                .await
        })
    }

    fn consents(&self, key: SourceKey) -> BoxFuture<'static, Result<Vec<Consent>, RegistryError>> {
        let this = self.clone();
        Box::pin(async move { this.ask(|reply| Request::Consents { key, reply }).await })
    }

    fn record_consent(
        &self,
        consent: NewConsent,
        actor: &str,
    ) -> BoxFuture<'static, Result<Consent, RegistryError>> {
        let (this, actor) = (self.clone(), actor.to_owned());
        Box::pin(async move {
            this.ask(|reply| Request::RecordConsent {
                consent,
                actor,
                reply,
            })
            .await
        })
    }

    fn revoke_consent(
        &self,
        consent_id: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<Consent, RegistryError>> {
        let (this, id, actor) = (self.clone(), consent_id.to_owned(), actor.to_owned());
        Box::pin(async move {
            this.ask(|reply| Request::RevokeConsent { id, actor, reply })
                .await
        })
    }

    fn may_disclose(
        &self,
        disclosure: Disclosure,
        actor: &str,
    ) -> BoxFuture<'static, Result<Result<Permit, Refused>, RegistryError>> {
        let (this, actor) = (self.clone(), actor.to_owned());
        Box::pin(async move {
            this.ask(|reply| Request::MayDisclose {
                disclosure,
                actor,
                reply,
            })
            .await
        })
    }
}

/// Applies the messages the HL7 listener hands over (`observed`: the decoded text of each
/// durable message, e.g. from `gateway_mllp::Observer::channel`) to the registry, one at a
/// time and in order, until the channel closes. The listener acknowledged each message
/// before it got here; what cannot be used is logged by class (never content) and dropped.
pub async fn feed<M: AsRef<str>>(mut observed: mpsc::Receiver<M>, handle: RegistryHandle) {
    while let Some(message) = observed.recv().await {
        match handle.apply_hl7(message.as_ref().to_owned()).await {
            Ok(Applied::Ignored(why)) => {
                debug!(why, "HL7 message not used by the identity registry")
            }
            Ok(Applied::Record {
                event,
                outcome,
                consent_recorded,
                consents_revoked,
            }) => info!(
                ?event,
                ?outcome,
                consent_recorded,
                consents_revoked,
                "identity registry updated from an HL7 ADT"
            ),
            Err(e) => warn!(error = %e, "HL7 ADT not applied to the identity registry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_fixed_width_utc_so_they_sort_as_strings() {
        let t = now();
        assert_eq!(t.len(), "2027-01-01T00:00:00.000Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.get(19..20) == Some("."), "{t}");
        assert!(t.parse::<jiff::Timestamp>().is_ok(), "{t}");
    }
}
