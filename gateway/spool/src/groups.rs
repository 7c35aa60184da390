//! HL7 message groups and DICOM objects held in memory: the journal write path and the
//! checkpointer behind it.
//!
//! [`Spool::store_messages`] seals a group of messages in memory, appends them to the
//! journal as one frame and `fdatasync`s it: one disk flush acknowledges the whole group
//! (docs/adr/0004, docs/adr/0006). DICOM objects up to 256 KiB that arrive while the
//! journal is busy wait, and the next commit to hold it appends them all as one frame
//! (docs/adr/0015). The checkpointer thread then indexes the group's records behind the
//! answer; [`Spool::settle`] waits for it. At open, the journal is replayed into the index
//! for what a crash kept from it, and a segment is deleted once the writer has left it and
//! no record needs its bytes.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};
use std::time::{Duration, Instant};

use gateway_durable::Context;
use hmac::Mac as _;
use tracing::{info, warn};

use crate::Origin;
use crate::index::UidMac;
use crate::usage::{self, Step};
use crate::{
    Committed, Inner, Keys, ObjectId, ObjectKind, Record, SETTLE_WAIT, Spool, SpoolError, journal,
    lock, seal, unix_ms,
};

/// One HL7 v2 message to store (see [`Spool::store_messages`]).
#[derive(Clone)]
pub struct MessageIn {
    /// Identifies the message for dedupe: sending application, facility and MSH-10.
    /// Kept only as a keyed MAC.
    pub key: String,
    /// Message type and trigger, e.g. `ADT^A08` (no patient data).
    pub message_type: String,
    /// The character set it was decoded with.
    pub charset: String,
    /// The peer that sent it (an address, not patient data).
    pub source: String,
    /// The original bytes of the frame.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for MessageIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageIn")
            .field("message_type", &self.message_type)
            .field("len", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// One audit message to store (see [`Spool::store_audit_messages`]).
#[derive(Clone)]
pub struct AuditIn {
    /// Its position in the audit chain: the dedupe key is `audit:{seq}`.
    pub seq: u64,
    /// The syslog message as it goes to the repositories.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for AuditIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditIn")
            .field("seq", &self.seq)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// What became of one message given to [`Spool::store_audit_messages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditStored {
    /// Stored (durable), or already stored under its key; `None`: every destination's
    /// queue was full, so nothing was stored.
    pub committed: Option<Committed>,
    /// The capped routes ([`crate::Route::with_max_queued`]) whose queue was full: the
    /// message is not queued for them.
    pub dropped: Vec<String>,
}

/// Work for the checkpointer thread: one journaled group's index records (the sealed bytes
/// are in the journal already) and where the journal's next frame starts. Jobs are sent in
/// append order, so once a job is indexed everything before its `end` is.
pub(crate) struct CheckpointJob {
    items: Vec<(ObjectId, Record, usage::Reservation)>,
    end: crate::index::SegmentRef,
}

/// Where the journal's group commit writes what became of a waiting object.
type Outcome = Arc<Mutex<Option<Result<Committed, SpoolError>>>>;

/// A DICOM object waiting to be appended to the journal
/// ([`Spool::store_journaled_object`]).
pub(crate) struct Waiting {
    entry: journal::Entry,
    reservation: usage::Reservation,
    outcome: Outcome,
}

impl Inner {
    /// Whether a capped route's queue has room for one more message, counting what the
    /// group being stored added already (`added`, updated when it has). Uncapped: always.
    fn admit(&self, destination: &str, added: &mut HashMap<String, u64>) -> bool {
        let Some(max) = self.max_queued(destination) else {
            return true;
        };
        let queued = lock(&self.capped).get(destination).copied().unwrap_or(0);
        let mine = added.entry(destination.to_string()).or_insert(0);
        if queued.saturating_add(*mine) >= max {
            return false;
        }
        *mine += 1;
        true
    }

    /// Indexes what the journal holds from the last run and the index lacks (an
    /// acknowledged message whose index entry was not yet flushed), skipping anything
    /// already indexed by id or by key. Returns the newest generation seen, so new segments
    /// sort after it. The segments stay: they hold the messages' sealed bytes.
    pub(crate) fn replay_journal(&self) -> Result<u64, SpoolError> {
        let (mut total, mut indexed) = (0, 0);
        let mut keys_seen = HashSet::new();
        let mark = self.index.journal_checkpoint()?;
        let newest = journal::for_each_segment(&self.journal_dir, mark, |entries| {
            total += entries.len();
            let mut todo = Vec::new();
            for entry in entries {
                if !self.replayed_is_stored(&entry)? && keys_seen.insert(replay_key(&entry)) {
                    todo.push((entry.id, entry.record));
                }
            }
            indexed += todo.len();
            if !todo.is_empty() {
                self.index
                    .insert_all(todo.iter().map(|(id, r)| (id, r)), true)?;
            }
            Ok(())
        })?;
        // Everything in the segments there are is indexed now; new frames go to newer ones.
        let next = crate::index::SegmentRef {
            generation: newest.saturating_add(1),
            offset: 0,
        };
        if mark != Some(next) {
            self.index.set_journal_checkpoint(next, true)?;
        }
        if indexed > 0 {
            info!(
                journaled = total,
                indexed,
                "indexed objects the journal held from the last run (all were acknowledged)"
            );
        }
        Ok(newest)
    }

    /// The DICOM object with this UID and content, journaled (not indexed yet) or indexed.
    pub(crate) fn stored_or_journaled(
        &self,
        uid_mac: &UidMac,
        content_mac: &crate::ContentMac,
    ) -> Result<Option<ObjectId>, SpoolError> {
        if let Some(id) = lock(&self.pending_content).get(&(*uid_mac, *content_mac)) {
            return Ok(Some(*id));
        }
        Ok(self.index.find_duplicate(uid_mac, content_mac)?)
    }

    /// Whether a journal entry is indexed already: its id, or (HL7, audit) any message
    /// under its key, or (DICOM) an object with the same UID and content. Stored means an
    /// `objects` row, which [`Index::insert_all`](crate::index::Index::insert_all) writes
    /// last.
    fn replayed_is_stored(&self, entry: &journal::Entry) -> Result<bool, SpoolError> {
        if self.index.contains(&entry.id)? {
            return Ok(true);
        }
        let record = &entry.record;
        let others = if record.kind == ObjectKind::Dicom {
            self.index
                .find_duplicate(&record.uid_mac, &record.content_mac)?
                .into_iter()
                .collect()
        } else {
            self.index.ids_for_uid(&record.uid_mac)?
        };
        for id in others {
            if self.index.contains(&id)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `n` fewer objects need segment `generation`; deletes it if none does and the writer
    /// has left it.
    pub(crate) fn release_segment(&self, generation: u64, n: u64) {
        let empty = {
            let mut live = lock(&self.live);
            let left = live.get_mut(&generation).map(|c| {
                *c = c.saturating_sub(n);
                *c
            });
            if left == Some(0) {
                live.remove(&generation);
            }
            left.is_none_or(|c| c == 0)
        };
        if empty {
            self.remove_segment_if_left(generation);
        }
    }

    /// Deletes a segment no object needs, unless the writer still appends to it.
    fn remove_segment_if_left(&self, generation: u64) {
        if lock(&self.journal).generation() == generation
            || lock(&self.live).contains_key(&generation)
        {
            return;
        }
        if let Err(e) = journal::remove_segment(&self.journal_dir, generation) {
            warn!(error = %e, "cannot delete an unneeded journal segment; the next start does");
        }
    }
}

/// The checkpointer: takes every journaled group waiting and indexes them in one batch
/// per tree, without a flush (the journal is the durable copy; replay covers a crash). A
/// failed insert is retried every second; the messages stay journaled meanwhile. Ends when
/// the spool is dropped.
pub(crate) fn run_checkpointer(spool: &Weak<Inner>, rx: &mpsc::Receiver<CheckpointJob>) {
    let mut backlog: Vec<(ObjectId, Record, usage::Reservation)> = Vec::new();
    let mut end = None;
    loop {
        let first = if backlog.is_empty() {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        for job in first.into_iter().chain(rx.try_iter()) {
            backlog.extend(job.items);
            end = Some(job.end);
        }
        let Some(inner) = spool.upgrade() else {
            return;
        };
        let started = Instant::now();
        let indexed = inner
            .index
            .insert_all(backlog.iter().map(|(id, record, _)| (id, record)), false)
            .and_then(|()| match end {
                Some(at) => inner.index.set_journal_checkpoint(at, false),
                None => Ok(()),
            });
        if let Err(e) = indexed {
            warn!(objects = backlog.len(), error = %e,
                "cannot index journaled objects yet; retrying (they are safe in the journal)");
            continue;
        }
        inner.usage.observe(Step::Index, started);
        let count = backlog.len() as u64;
        {
            let mut pending = lock(&inner.pending);
            let mut pending_content = lock(&inner.pending_content);
            for (_, record, mut reservation) in backlog.drain(..) {
                if record.kind == ObjectKind::Dicom {
                    pending_content.remove(&(record.uid_mac, record.content_mac));
                } else {
                    pending.remove(&record.uid_mac);
                }
                inner.usage.commit(&mut reservation, record.sealed_len);
            }
        }
        {
            let (done, cv) = &inner.checkpointed;
            *lock(done) += count;
            cv.notify_all();
        }
        inner.committed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Spool {
    /// Stores HL7 messages as one group: each is sealed in memory, then one frame holding
    /// all of them (sealed bytes and index records) is appended to the journal and
    /// fdatasync'd. Only after this returns `Ok` for a message may its sender be told
    /// "accepted"; the checkpointer thread writes the blobs and index entries soon after
    /// ([`Spool::settle`] waits for it). A message whose key is already stored, journaled or
    /// earlier in the group is a [`Committed::Duplicate`] and stores nothing.
    pub fn store_messages(&self, items: &[MessageIn]) -> Vec<Result<Committed, SpoolError>> {
        self.store_messages_from(items, Origin::Local)
    }

    /// [`Spool::store_messages`] for results returned from the cloud (reports for this
    /// clinic): they queue only for routes that take results ([`crate::Route::with_results`]).
    pub fn store_result_messages(&self, items: &[MessageIn]) -> Vec<Result<Committed, SpoolError>> {
        self.store_messages_from(items, Origin::Result)
    }

    /// Stores audit messages (rendered from the audit chain) as one group, exactly as
    /// [`Spool::store_messages`] does (one journal frame, one `fdatasync`), keyed
    /// `audit:{seq}` so that storing the same chain position again stores nothing. They
    /// queue for every [`ObjectKind::Audit`] route, except a capped route
    /// ([`crate::Route::with_max_queued`]) whose queue is full: that one is named in
    /// [`AuditStored::dropped`] (the oldest queued messages are kept). A message no route
    /// takes any more is not stored at all.
    pub fn store_audit_messages(
        &self,
        items: Vec<AuditIn>,
    ) -> Vec<Result<AuditStored, SpoolError>> {
        let items: Vec<MessageIn> = items
            .into_iter()
            .map(|a| MessageIn {
                key: format!("audit:{}", a.seq),
                message_type: "audit".into(),
                charset: "utf-8".into(),
                source: "audit".into(),
                bytes: a.bytes,
            })
            .collect();
        self.store_group_or_fail(&items, Origin::Local, ObjectKind::Audit)
    }

    fn store_messages_from(
        &self,
        items: &[MessageIn],
        origin: Origin,
    ) -> Vec<Result<Committed, SpoolError>> {
        self.store_group_or_fail(items, origin, ObjectKind::Hl7)
            .into_iter()
            .map(|r| {
                r.and_then(|s| {
                    s.committed.ok_or_else(|| SpoolError::Full {
                        reason: "every destination's queue is full".into(),
                    })
                })
            })
            .collect()
    }

    /// [`Spool::store_group`], with a failed group commit turned into one error per item.
    fn store_group_or_fail(
        &self,
        items: &[MessageIn],
        origin: Origin,
        kind: ObjectKind,
    ) -> Vec<Result<AuditStored, SpoolError>> {
        match self.store_group(items, origin, kind) {
            Ok(results) => results,
            Err(e) => {
                let text = e.to_string();
                warn!(messages = items.len(), kind = ?kind, error = %text, "group commit failed");
                items
                    .iter()
                    .map(|_| {
                        Err(match &e {
                            SpoolError::Full { reason } => SpoolError::Full {
                                reason: reason.clone(),
                            },
                            _ => SpoolError::GroupCommit {
                                detail: text.clone(),
                            },
                        })
                    })
                    .collect()
            }
        }
    }

    fn store_group(
        &self,
        items: &[MessageIn],
        origin: Origin,
        kind: ObjectKind,
    ) -> Result<Vec<Result<AuditStored, SpoolError>>, SpoolError> {
        let inner = &self.inner;
        let keys = inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        self.check_free_or_evict()?;
        let mut results: Vec<Result<AuditStored, SpoolError>> = Vec::with_capacity(items.len());
        let mut entries: Vec<journal::Entry> = Vec::new();
        let mut reservations: Vec<usage::Reservation> = Vec::new();
        let stored = |c: Committed, dropped: Vec<String>| {
            Ok(AuditStored {
                committed: Some(c),
                dropped,
            })
        };
        // What this group adds to each capped queue so far.
        let mut added: HashMap<String, u64> = HashMap::new();
        for item in items {
            let uid_mac = keys.journaled_key_mac(kind, &item.key);
            if let Some(e) = entries.iter().find(|e| e.record.uid_mac == uid_mac) {
                results.push(stored(Committed::Duplicate(e.id), Vec::new()));
                continue;
            }
            if let Some(id) = self.stored_message(&uid_mac)? {
                results.push(stored(Committed::Duplicate(id), Vec::new()));
                continue;
            }
            let mut destinations = inner.queue_for(origin, kind, Some(&item.message_type));
            let mut dropped = Vec::new();
            if kind == ObjectKind::Audit {
                destinations.retain(|d| {
                    let admitted = inner.admit(&d.name, &mut added);
                    if !admitted {
                        dropped.push(d.name.clone());
                    }
                    admitted
                });
                if destinations.is_empty() && !dropped.is_empty() {
                    results.push(Ok(AuditStored {
                        committed: None,
                        dropped,
                    }));
                    continue;
                }
            }
            match self.seal_message(keys, item, uid_mac, kind, destinations) {
                Ok((entry, reservation)) => {
                    results.push(stored(Committed::Stored(entry.id), dropped));
                    entries.push(entry);
                    reservations.push(reservation);
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if entries.is_empty() {
            return Ok(results);
        }
        let mut journal = lock(&inner.journal);
        let closed = self.journal_group(&mut journal, entries, reservations)?;
        drop(journal);
        if let Some(closed) = closed {
            inner.remove_segment_if_left(closed);
        }
        Ok(results)
    }

    /// Stores one DICOM object sealed in memory ([`crate::Ingest::commit`]) through the
    /// journal, with every other object waiting for it at that moment (group commit,
    /// docs/adr/0015): the object joins the waiting list, then whoever holds the journal
    /// next appends the whole list as one frame with one `fdatasync`, skipping objects
    /// with the same UID and content as one stored or journaled already. Returns once this
    /// object's group is durable (or failed); the checkpointer indexes it behind.
    /// `held`: the journal, when the caller holds it already.
    pub(crate) fn store_journaled_object(
        &self,
        entry: journal::Entry,
        reservation: usage::Reservation,
        held: Option<MutexGuard<'_, journal::Writer>>,
    ) -> Result<Committed, SpoolError> {
        let inner = &self.inner;
        let outcome: Outcome = Arc::default();
        lock(&inner.waiting).push(Waiting {
            entry,
            reservation,
            outcome: Arc::clone(&outcome),
        });
        let mut journal = held.unwrap_or_else(|| lock(&inner.journal));
        // Whoever held the journal since this object joined took it in its group, and
        // wrote its outcome before letting go; if not, the object is still waiting.
        if let Some(done) = lock(&outcome).take() {
            return done;
        }
        let group = std::mem::take(&mut *lock(&inner.waiting));
        let closed = self.journal_waiting(&mut journal, group);
        drop(journal);
        if let Some(closed) = closed {
            inner.remove_segment_if_left(closed);
        }
        lock(&outcome).take().unwrap_or_else(|| {
            Err(SpoolError::GroupCommit {
                detail: "the object was not in the group written".into(),
            })
        })
    }

    /// Appends the waiting objects that are not duplicates as one frame (the caller holds
    /// the journal) and writes every object's outcome. Returns the segment the writer left.
    fn journal_waiting(&self, journal: &mut journal::Writer, group: Vec<Waiting>) -> Option<u64> {
        let inner = &self.inner;
        let mut entries = Vec::with_capacity(group.len());
        let mut reservations = Vec::with_capacity(group.len());
        let mut outcomes = Vec::with_capacity(group.len());
        let mut in_group: HashMap<(UidMac, crate::ContentMac), ObjectId> = HashMap::new();
        for mut waiting in group {
            let r = &waiting.entry.record;
            let key = (r.uid_mac, r.content_mac);
            let existing = match in_group.get(&key) {
                Some(id) => Ok(Some(*id)),
                None => inner.stored_or_journaled(&key.0, &key.1),
            };
            let done = match existing {
                Ok(None) => {
                    in_group.insert(key, waiting.entry.id);
                    outcomes.push((waiting.entry.id, waiting.outcome));
                    entries.push(waiting.entry);
                    reservations.push(waiting.reservation);
                    continue;
                }
                Ok(Some(id)) => Ok(Committed::Duplicate(id)),
                Err(e) => Err(e),
            };
            inner.usage.release(&mut waiting.reservation);
            *lock(&waiting.outcome) = Some(done);
        }
        if entries.is_empty() {
            return None;
        }
        match self.journal_group(journal, entries, reservations) {
            Ok(closed) => {
                for (id, outcome) in outcomes {
                    *lock(&outcome) = Some(Ok(Committed::Stored(id)));
                }
                closed
            }
            Err(e) => {
                let detail = e.to_string();
                warn!(objects = outcomes.len(), error = %detail, "group commit failed");
                for (_, outcome) in outcomes {
                    *lock(&outcome) = Some(Err(SpoolError::GroupCommit {
                        detail: detail.clone(),
                    }));
                }
                None
            }
        }
    }

    /// Appends `entries` to the journal as one frame with one `fdatasync`, then, still
    /// holding the journal (so that the checkpointer gets groups in append order): notes
    /// them as pending (dedupe), counts them in their segment and in capped queues, and
    /// hands their records to the checkpointer. On error their space is released. Returns
    /// the segment the writer left for a new one, for the caller to delete once it lets
    /// go of the journal if nothing needs it.
    fn journal_group(
        &self,
        journal: &mut journal::Writer,
        mut entries: Vec<journal::Entry>,
        mut reservations: Vec<usage::Reservation>,
    ) -> Result<Option<u64>, SpoolError> {
        let inner = &self.inner;
        let started = Instant::now();
        let appended = journal.append(&mut entries);
        inner.usage.observe(Step::Journal, started);
        let appended = match appended {
            Ok(a) => a,
            Err(e) => {
                for reservation in &mut reservations {
                    inner.usage.release(reservation);
                }
                return Err(e.into());
            }
        };
        {
            let mut pending = lock(&inner.pending);
            let mut pending_content = lock(&inner.pending_content);
            for entry in &entries {
                let r = &entry.record;
                if r.kind == ObjectKind::Dicom {
                    pending_content.insert((r.uid_mac, r.content_mac), entry.id);
                } else {
                    pending.insert(r.uid_mac, entry.id);
                }
            }
        }
        *lock(&inner.live).entry(appended.generation).or_insert(0) += entries.len() as u64;
        // Before the checkpointer can index them (and a worker confirm them).
        for entry in &entries {
            for d in &entry.record.destinations {
                inner.note_queued(&d.name, 1, 0);
            }
        }
        inner
            .journaled
            .fetch_add(entries.len() as u64, Ordering::SeqCst);
        // The checkpointer needs the records only: the sealed bytes are on disk.
        let job = CheckpointJob {
            items: entries
                .into_iter()
                .zip(reservations)
                .map(|(e, r)| (e.id, e.record, r))
                .collect(),
            end: appended.end,
        };
        if let Some(tx) = lock(&inner.checkpoint).as_ref() {
            // If the thread were gone the objects stay journaled and are indexed at the
            // next open; they are durable either way.
            let _ = tx.send(job);
        }
        Ok(appended.closed)
    }

    /// The id of a message already journaled or stored under this key MAC. The journal is
    /// asked first: the checkpointer indexes a message before it leaves `pending`.
    fn stored_message(&self, uid_mac: &UidMac) -> Result<Option<ObjectId>, SpoolError> {
        if let Some(id) = lock(&self.inner.pending).get(uid_mac) {
            return Ok(Some(*id));
        }
        Ok(self.inner.index.ids_for_uid(uid_mac)?.first().copied())
    }

    /// Seals one message of `kind` (HL7 or audit) in memory, queued for `destinations`,
    /// and reserves its space.
    fn seal_message(
        &self,
        keys: &Keys,
        item: &MessageIn,
        uid_mac: UidMac,
        kind: ObjectKind,
        destinations: Vec<crate::Destination>,
    ) -> Result<(journal::Entry, usage::Reservation), SpoolError> {
        let inner = &self.inner;
        let plain_len = item.bytes.len() as u64;
        let sealed_len = seal::sealed_len(plain_len);
        let mut reservation = match inner.usage.reserve(sealed_len) {
            Ok(r) => r,
            Err(full) => {
                if self.evict_cached()? == 0 {
                    return Err(full);
                }
                inner.usage.reserve(sealed_len)?
            }
        };
        let sealed = (|| {
            let id = ObjectId::random().map_err(|_| seal::SealError::Random)?;
            let mut sealer = seal::Sealer::new(&keys.master, id.as_bytes())?;
            let mut sealed = Vec::with_capacity(usize::try_from(sealed_len).unwrap_or(0));
            sealed.extend_from_slice(sealer.header());
            let label = inner.journal_dir.as_path();
            sealer.update(&item.bytes, &mut sealed).ctx("seal", label)?;
            sealer.finish(&mut sealed).ctx("seal", label)?;
            Ok::<_, SpoolError>((id, sealed))
        })();
        let (id, sealed) = match sealed {
            Ok(v) => v,
            Err(e) => {
                inner.usage.release(&mut reservation);
                return Err(e);
            }
        };
        let mut mac = keys.mac();
        mac.update(&item.bytes);
        let record = Record {
            kind,
            sop_class_uid: item.message_type.chars().take(32).collect(),
            transfer_syntax_uid: item.charset.clone(),
            source: item.source.clone(),
            plain_len,
            sealed_len,
            received_unix_ms: unix_ms(),
            uid_mac,
            content_mac: Keys::content_mac(mac),
            destinations,
            blob_deleted: false,
            sequence: inner.index.next_sequence()?,
            study_mac: None,
            completed_unix_ms: None,
            segment: None,
        };
        Ok((journal::Entry { id, record, sealed }, reservation))
    }

    /// Waits (at most `timeout`) until every message journaled so far is in the index and
    /// `blobs/`; false if the checkpointer did not get there in time.
    pub fn settle(&self, timeout: Duration) -> bool {
        let target = self.inner.journaled.load(Ordering::SeqCst);
        let (done, cv) = &self.inner.checkpointed;
        let deadline = Instant::now() + timeout;
        let mut applied = lock(done);
        while *applied < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            applied = match cv.wait_timeout(applied, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Writes the stored HL7 message with `key` (sending application|facility|MSH-10,
    /// as given to [`Spool::store_messages`]) to `out`.
    pub fn export_message<W: Write>(&self, key: &str, out: &mut W) -> Result<Record, SpoolError> {
        self.settle(SETTLE_WAIT);
        let keys = self.inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        let uid_mac = keys.message_key_mac(key);
        let id = *self
            .inner
            .index
            .ids_for_uid(&uid_mac)?
            .first()
            .ok_or(SpoolError::NotFound)?;
        let record = self.inner.index.get(&id)?.ok_or(SpoolError::NotFound)?;
        self.unseal(&id, &record, out)?;
        Ok(record)
    }
}

/// What one replayed journal entry is deduplicated by among the others: an HL7 or audit
/// message's key, or a DICOM object's UID and content.
fn replay_key(entry: &journal::Entry) -> (UidMac, Option<crate::ContentMac>) {
    let r = &entry.record;
    let content = (r.kind == ObjectKind::Dicom).then_some(r.content_mac);
    (r.uid_mac, content)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use gateway_keystore::{KEY_LEN, MasterKey};

    use super::*;
    use crate::{Limits, Recovered, Route};

    fn message(key: &str, body: &str) -> MessageIn {
        MessageIn {
            key: key.into(),
            message_type: "ORU^R01".into(),
            charset: "ascii".into(),
            source: "127.0.0.1".into(),
            bytes: body.as_bytes().to_vec(),
        }
    }

    /// A spool in `dir` with room to spare, a fixed key and `routes`.
    fn open_with(dir: &Path, routes: Vec<Route>) -> Spool {
        let limits = Limits {
            max_bytes: 1 << 40,
            min_free_bytes: 0,
        };
        let master = MasterKey::from_bytes([7; KEY_LEN]);
        Spool::open(dir, Some(master), limits, routes).unwrap()
    }

    fn open(dir: &Path) -> Spool {
        open_with(dir, vec![Route::new("ris", ObjectKind::Hl7)])
    }

    fn segment_generations(spool: &Spool) -> Vec<u64> {
        journal::segments(&spool.inner.journal_dir)
            .unwrap()
            .into_iter()
            .map(|(g, _)| g)
            .collect()
    }

    /// A crash after the journal append and before the checkpointer ran: the messages were
    /// acknowledged, so the next open must index them, once each.
    #[test]
    fn acknowledged_messages_only_in_the_journal_are_indexed_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        // Stall the checkpointer: groups are journaled and never indexed in this run.
        drop(lock(&spool.inner.checkpoint).take());
        let first =
            spool.store_messages(&[message("A|F|1", "MSH|one"), message("A|F|2", "MSH|two")]);
        assert!(first.iter().all(|r| matches!(r, Ok(Committed::Stored(_)))));
        let again =
            spool.store_messages(&[message("A|F|2", "MSH|two"), message("A|F|3", "MSH|three")]);
        let Ok(Committed::Stored(id3)) = again[1] else {
            panic!("{again:?}")
        };
        assert!(
            matches!((&first[1], &again[0]), (Ok(Committed::Stored(a)), Ok(Committed::Duplicate(b))) if a == b),
            "a key still only in the journal is a duplicate: {first:?} {again:?}"
        );
        assert!(
            !spool.settle(Duration::from_millis(50)),
            "nothing indexed yet"
        );
        assert!(spool.inner.index.get(&id3).unwrap().is_none());
        drop(spool);

        let spool = open(dir.path());
        assert!(spool.settle(Duration::ZERO));
        assert_eq!(spool.recover().unwrap(), Recovered::default());
        let status = spool.status().unwrap();
        assert_eq!(status.objects, 3);
        assert_eq!(status.by_destination["ris"].queued, 3);
        let queued = spool.queued("ris", 10).unwrap();
        assert_eq!(queued.len(), 3);
        let mut out = Vec::new();
        spool.export_message("A|F|3", &mut out).unwrap();
        assert_eq!(out, b"MSH|three");
        assert!(spool.verify().unwrap().is_consistent());
        // The segment holds the queued messages' sealed bytes; new ones go to a newer one.
        assert_eq!(segment_generations(&spool), [1]);
        let later = spool.store_messages(&[message("A|F|4", "MSH|four")]);
        assert!(matches!(later[0], Ok(Committed::Stored(_))));
        assert!(spool.settle(Duration::from_secs(5)));
        assert_eq!(segment_generations(&spool), [1, 2]);
        // Once the uplink confirmed everything in segment 1, it is deleted.
        spool.mark_sent_all(&queued, "ris").unwrap();
        assert_eq!(segment_generations(&spool), [2]);
        drop(spool);
        let spool = open(dir.path());
        assert_eq!(spool.status().unwrap().objects, 4);
        assert_eq!(spool.queued("ris", 10).unwrap().len(), 1);
        assert!(spool.verify().unwrap().is_consistent());
    }

    fn store_dicom(spool: &Spool, uid: &str, body: &[u8]) -> Committed {
        let mut ingest = spool
            .begin(crate::ObjectMeta {
                sop_instance_uid: uid.into(),
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
                source: "CT01".into(),
            })
            .unwrap();
        ingest.write(body).unwrap();
        ingest.commit().unwrap()
    }

    /// A crash after DICOM objects were journaled (and answered "success") and before the
    /// checkpointer indexed them: the next open indexes each once, deduplicated by UID and
    /// content (a second version of an instance is its own object), and what the
    /// checkpointer had indexed before the mark is not read again.
    #[test]
    fn acknowledged_dicom_objects_only_in_the_journal_are_indexed_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let open = || open_with(dir.path(), vec![Route::new("cloud", ObjectKind::Dicom)]);
        let spool = open();
        let Committed::Stored(indexed) = store_dicom(&spool, "1.1", b"indexed before") else {
            panic!()
        };
        assert!(spool.settle(Duration::from_secs(5)));
        let mark = spool.inner.index.journal_checkpoint().unwrap().unwrap();
        assert_eq!(mark.generation, 1);
        // Stall the checkpointer: what follows is journaled, never indexed in this run.
        drop(lock(&spool.inner.checkpoint).take());
        let Committed::Stored(v1) = store_dicom(&spool, "1.2", b"version one") else {
            panic!()
        };
        assert_eq!(
            store_dicom(&spool, "1.2", b"version one"),
            Committed::Duplicate(v1),
            "a resend still only in the journal is a duplicate"
        );
        let Committed::Stored(v2) = store_dicom(&spool, "1.2", b"version two") else {
            panic!()
        };
        assert_eq!(
            store_dicom(&spool, "1.1", b"indexed before"),
            Committed::Duplicate(indexed)
        );
        assert!(spool.inner.index.get(&v1).unwrap().is_none());
        // The indexed object is delivered and its record pruned: it must not come back.
        spool.mark_sent(&indexed, "cloud").unwrap();
        spool.set_dedupe_window(Duration::ZERO);
        assert_eq!(spool.prune_delivered().unwrap(), 1);
        drop(spool);

        let spool = open();
        assert!(spool.settle(Duration::ZERO));
        assert_eq!(spool.recover().unwrap(), Recovered::default());
        let status = spool.status().unwrap();
        assert_eq!(
            status.objects, 2,
            "v1 and v2; the pruned record stays pruned"
        );
        assert_eq!(spool.queued("cloud", 10).unwrap().len(), 2);
        for (id, body) in [(v1, &b"version one"[..]), (v2, &b"version two"[..])] {
            assert_eq!(spool.read(&id).unwrap().1, body);
        }
        assert!(spool.verify().unwrap().is_consistent());
        assert_eq!(
            store_dicom(&spool, "1.2", b"version two"),
            Committed::Duplicate(v2)
        );
        // Everything is indexed now: a third open reads no segment before the mark.
        let mark = spool.inner.index.journal_checkpoint().unwrap().unwrap();
        assert!(
            segment_generations(&spool)
                .iter()
                .all(|g| *g < mark.generation)
        );
    }

    /// How many frames the journal took: the `journal` step's count in `/metrics`.
    fn journal_frames(spool: &Spool) -> u64 {
        let mut registry = prometheus_client::registry::Registry::default();
        spool.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix("gateway_spool_commit_step_seconds_count{step=\"journal\"} ")
            })
            .map_or(0, |n| n.trim().parse().unwrap())
    }

    /// Objects that arrive while another commit holds the journal wait, and the next
    /// holder appends them all as one frame with one sync (group commit); a resend in the
    /// same group, or of an object still only in the journal, is a duplicate.
    #[test]
    fn commits_that_find_the_journal_busy_share_one_frame() {
        let dir = tempfile::tempdir().unwrap();
        let open = || open_with(dir.path(), vec![Route::new("cloud", ObjectKind::Dicom)]);
        let spool = open();
        // Stall the checkpointer: every object stays only in the journal.
        drop(lock(&spool.inner.checkpoint).take());
        let Committed::Stored(first) = store_dicom(&spool, "2.1", b"journaled") else {
            panic!()
        };
        assert_eq!(journal_frames(&spool), 1);
        let busy = lock(&spool.inner.journal);
        let senders: Vec<_> = [
            ("2.2", &b"two"[..]),
            ("2.3", b"three"),
            ("2.3", b"three"),
            ("2.1", b"journaled"),
        ]
        .into_iter()
        .map(|(uid, body)| {
            let other = spool.clone();
            std::thread::spawn(move || store_dicom(&other, uid, body))
        })
        .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&spool.inner.waiting).len() < 4 {
            assert!(
                Instant::now() < deadline,
                "the commits did not wait for the journal"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(busy);
        let outcomes: Vec<Committed> = senders.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            journal_frames(&spool),
            2,
            "one frame for the four waiting: {outcomes:?}"
        );
        let Committed::Stored(two) = outcomes[0] else {
            panic!("{outcomes:?}")
        };
        let threes = (outcomes[1], outcomes[2]);
        let three = match threes {
            (Committed::Stored(a), Committed::Duplicate(b))
            | (Committed::Duplicate(b), Committed::Stored(a))
                if a == b =>
            {
                a
            }
            _ => panic!("one of two identical objects in a group is stored: {threes:?}"),
        };
        assert_eq!(outcomes[3], Committed::Duplicate(first));
        for id in [first, two, three] {
            assert!(
                !spool.blob_path(&id).exists(),
                "in the journal, not in blobs/"
            );
        }
        drop(spool);
        let spool = open();
        assert_eq!(spool.status().unwrap().objects, 3);
        assert_eq!(spool.read(&first).unwrap().1, b"journaled");
        assert_eq!(spool.read(&two).unwrap().1, b"two");
        assert_eq!(spool.read(&three).unwrap().1, b"three");
        assert_eq!(spool.queued("cloud", 10).unwrap().len(), 3);
        assert!(spool.verify().unwrap().is_consistent());
    }

    /// An object over `GROUP_MAX_SEALED` that finds the journal busy does not wait: it
    /// takes the blob path, and a resend of it is a duplicate.
    #[test]
    fn a_larger_commit_that_finds_the_journal_busy_takes_the_blob_path() {
        let dir = tempfile::tempdir().unwrap();
        let open = || open_with(dir.path(), vec![Route::new("cloud", ObjectKind::Dicom)]);
        let spool = open();
        let body: Vec<u8> = (0..crate::ingest::GROUP_MAX_SEALED + 1)
            .map(|i| (i % 251) as u8)
            .collect();
        let busy = lock(&spool.inner.journal);
        let other = spool.clone();
        let sent = body.clone();
        let (tx, rx) = mpsc::channel();
        let sender = std::thread::spawn(move || tx.send(store_dicom(&other, "3.1", &sent)));
        let stored = rx.recv_timeout(Duration::from_secs(10));
        drop(busy);
        sender.join().unwrap().ok();
        let stored = stored.expect("a larger object waited for the busy journal");
        let Committed::Stored(id) = stored else {
            panic!("{stored:?}")
        };
        assert!(spool.blob_path(&id).exists(), "took the blob path");
        assert_eq!(journal_frames(&spool), 0);
        assert_eq!(store_dicom(&spool, "3.1", &body), Committed::Duplicate(id));
        drop(spool);
        let spool = open();
        assert_eq!(spool.read(&id).unwrap().1, body);
        assert!(spool.verify().unwrap().is_consistent());
    }

    /// Segments live while a message in them is queued; the one being appended to stays.
    #[test]
    fn segments_go_when_every_message_in_them_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        let big = "x".repeat(3 * 1024 * 1024);
        for i in 0..7 {
            let r = spool.store_messages(&[message(&format!("A|F|{i}"), &big)]);
            assert!(matches!(r[0], Ok(Committed::Stored(_))), "{r:?}");
        }
        assert!(spool.settle(Duration::from_secs(10)));
        // 7 x ~3 MiB fill more than one 16 MiB segment.
        assert_eq!(segment_generations(&spool), [1, 2]);
        let queued = spool.queued("ris", 10).unwrap();
        spool.mark_sent_all(&queued[..3], "ris").unwrap();
        assert_eq!(
            segment_generations(&spool),
            [1, 2],
            "segment 1 still needed"
        );
        spool.mark_sent_all(&queued[3..], "ris").unwrap();
        assert_eq!(
            segment_generations(&spool),
            [2],
            "segment 2 is still written to"
        );
        assert_eq!(spool.status().unwrap().by_state["sent"], 7);
        drop(spool);
        // At the next start nothing needs segment 2 either.
        let spool = open(dir.path());
        assert!(segment_generations(&spool).is_empty());
        assert!(spool.verify().unwrap().is_consistent());
    }

    fn audit(seq: u64) -> AuditIn {
        AuditIn {
            seq,
            bytes: format!("<85>1 seq {seq}").into_bytes(),
        }
    }

    fn open_audit(dir: &Path) -> Spool {
        let limits = Limits {
            max_bytes: 1 << 40,
            min_free_bytes: 0,
        };
        let master = MasterKey::from_bytes([7; KEY_LEN]);
        let routes = vec![
            Route::new("ris", ObjectKind::Hl7),
            Route::new("arr", ObjectKind::Audit).with_max_queued(3),
            Route::new("siem", ObjectKind::Audit),
        ];
        Spool::open(dir, Some(master), limits, routes).unwrap()
    }

    /// Audit messages: one group commit, keyed by chain position (a second store of the
    /// same seq stores nothing), queued for the audit routes only; a capped route's full
    /// queue keeps its oldest and names itself in `dropped`; the count survives a restart
    /// and shrinks as messages are confirmed.
    #[test]
    fn audit_messages_dedupe_by_seq_and_a_full_capped_queue_keeps_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open_audit(dir.path());
        let r = spool.store_audit_messages((1..=5).map(audit).collect());
        let dropped: Vec<Vec<String>> = r
            .iter()
            .map(|x| x.as_ref().unwrap().dropped.clone())
            .collect();
        assert_eq!(
            dropped,
            [
                vec![],
                vec![],
                vec![],
                vec!["arr".to_string()],
                vec!["arr".to_string()]
            ]
        );
        assert!(
            r.iter()
                .all(|x| matches!(x.as_ref().unwrap().committed, Some(Committed::Stored(_))))
        );
        assert_eq!(spool.queued_count("arr"), Some(3));
        assert_eq!(spool.queued_count("siem"), None, "uncapped: not counted");
        assert!(spool.settle(Duration::from_secs(5)));
        let arr = spool.queued("arr", 10).unwrap();
        assert_eq!(arr.len(), 3);
        let (record, bytes) = spool.read(&arr[0]).unwrap();
        assert_eq!(
            (record.kind, bytes.as_slice()),
            (ObjectKind::Audit, &b"<85>1 seq 1"[..])
        );
        assert_eq!(spool.read(&arr[2]).unwrap().1, b"<85>1 seq 3");
        assert_eq!(spool.queued("siem", 10).unwrap().len(), 5);
        assert!(
            spool.queued("ris", 10).unwrap().is_empty(),
            "an HL7 route takes no audit"
        );
        // The same chain positions again: duplicates, nothing stored, nothing dropped.
        let again = spool.store_audit_messages(vec![audit(2), audit(5)]);
        assert!(again.iter().all(|x| {
            let x = x.as_ref().unwrap();
            matches!(x.committed, Some(Committed::Duplicate(_))) && x.dropped.is_empty()
        }));
        // An HL7 message with the same text as a key is not an audit duplicate.
        assert!(matches!(
            spool.store_messages(&[message("audit:2", "MSH|x")])[0],
            Ok(Committed::Stored(_))
        ));
        drop(spool);

        let spool = open_audit(dir.path());
        assert_eq!(spool.queued_count("arr"), Some(3), "counted again at open");
        let arr = spool.queued("arr", 10).unwrap();
        spool.mark_sent_all(&arr[..2], "arr").unwrap();
        spool.mark_sent(&arr[0], "arr").unwrap();
        assert_eq!(
            spool.queued_count("arr"),
            Some(1),
            "a repeated confirmation counts once"
        );
        // Room for two: seq 6 and 7 queue, 8 does not; a message no route takes any more
        // is not stored.
        let r = spool.store_audit_messages(vec![audit(6), audit(7), audit(8)]);
        assert!(r[1].as_ref().unwrap().dropped.is_empty());
        assert_eq!(r[2].as_ref().unwrap().dropped, ["arr"]);
        assert!(
            matches!(r[2].as_ref().unwrap().committed, Some(Committed::Stored(_))),
            "siem took it"
        );
        assert_eq!(spool.queued_count("arr"), Some(3));
        spool.mark_failed(&arr[2], "arr", "test").unwrap();
        assert_eq!(spool.queued_count("arr"), Some(2));
        assert_eq!(spool.retry_failed(Some("arr")).unwrap(), 1);
        assert_eq!(spool.queued_count("arr"), Some(3));
        assert!(spool.settle(Duration::from_secs(5)));
        assert!(spool.verify().unwrap().is_consistent());
    }

    /// A capped route alone: a message it cannot take is not stored at all.
    #[test]
    fn an_audit_message_no_route_can_take_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_bytes: 1 << 40,
            min_free_bytes: 0,
        };
        let master = MasterKey::from_bytes([7; KEY_LEN]);
        let routes = vec![Route::new("arr", ObjectKind::Audit).with_max_queued(1)];
        let spool = Spool::open(dir.path(), Some(master), limits, routes).unwrap();
        let r = spool.store_audit_messages(vec![audit(1), audit(2)]);
        assert_eq!(
            r[1].as_ref().unwrap(),
            &AuditStored {
                committed: None,
                dropped: vec!["arr".into()]
            }
        );
        assert!(spool.settle(Duration::from_secs(5)));
        assert_eq!(spool.status().unwrap().objects, 1);
    }

    /// A dead letter leaves the journal for `blobs/` and still exports and retries.
    #[test]
    fn a_dead_letter_moves_out_of_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        let r =
            spool.store_messages(&[message("A|F|1", "MSH|refused"), message("A|F|2", "MSH|ok")]);
        let (Ok(Committed::Stored(bad)), Ok(Committed::Stored(good))) = (&r[0], &r[1]) else {
            panic!("{r:?}")
        };
        assert!(spool.settle(Duration::from_secs(5)));
        spool
            .mark_failed(bad, "ris", "AR: unknown patient")
            .unwrap();
        let record = spool.inner.index.get(bad).unwrap().unwrap();
        assert_eq!(record.segment, None);
        assert!(spool.blob_path(bad).exists());
        spool.mark_sent(good, "ris").unwrap();
        // Segment 1 is still the one being written to, so it stays; at the next open
        // nothing needs it.
        drop(spool);
        let spool = open(dir.path());
        assert!(segment_generations(&spool).is_empty());
        assert_eq!(spool.recover().unwrap(), Recovered::default());
        let mut out = Vec::new();
        spool.export_message("A|F|1", &mut out).unwrap();
        assert_eq!(out, b"MSH|refused");
        assert_eq!(spool.retry_failed(None).unwrap(), 1);
        assert_eq!(spool.queued("ris", 10).unwrap(), [*bad]);
        assert!(spool.verify().unwrap().is_consistent());
    }
}
