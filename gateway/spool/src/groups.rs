//! HL7 message groups: the journal write path and the checkpointer behind it.
//!
//! [`Spool::store_messages`] seals a group of messages in memory, appends them to the
//! journal as one frame and `fdatasync`s it: one disk flush acknowledges the whole group
//! (docs/adr/0004, docs/adr/0006). The checkpointer thread then indexes the group's records
//! behind the answer; [`Spool::settle`] waits for it. At open, the journal is replayed into
//! the index for what a crash kept from it, and a segment is deleted once the writer has
//! left it and no record needs its bytes.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Weak, mpsc};
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
/// are in the journal already).
pub(crate) type CheckpointJob = Vec<(ObjectId, Record, usage::Reservation)>;

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
        let mut keys_seen = BTreeSet::new();
        let newest = journal::for_each_segment(&self.journal_dir, |entries| {
            total += entries.len();
            let mut todo = Vec::new();
            for entry in entries {
                // Stored means an `objects` row, which [`Index::insert_all`] writes last.
                let mut stored = self.index.contains(&entry.id)?;
                for id in self.index.ids_for_uid(&entry.record.uid_mac)? {
                    stored = stored || self.index.contains(&id)?;
                }
                if !stored && keys_seen.insert(entry.record.uid_mac) {
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
        if indexed > 0 {
            info!(
                journaled = total,
                indexed,
                "indexed HL7 messages the journal held from the last run (all were acknowledged)"
            );
        }
        Ok(newest)
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
    let mut backlog: CheckpointJob = Vec::new();
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
            backlog.extend(job);
        }
        let Some(inner) = spool.upgrade() else {
            return;
        };
        let started = Instant::now();
        if let Err(e) = inner
            .index
            .insert_all(backlog.iter().map(|(id, record, _)| (id, record)), false)
        {
            warn!(messages = backlog.len(), error = %e,
                "cannot index journaled HL7 messages yet; retrying (they are safe in the journal)");
            continue;
        }
        inner.usage.observe(Step::Index, started);
        let count = backlog.len() as u64;
        {
            let mut pending = lock(&inner.pending);
            for (_, record, mut reservation) in backlog.drain(..) {
                pending.remove(&record.uid_mac);
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
        let started = Instant::now();
        let appended = lock(&inner.journal).append(&mut entries);
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
        *lock(&inner.live).entry(appended.generation).or_insert(0) += entries.len() as u64;
        if let Some(closed) = appended.closed {
            inner.remove_segment_if_left(closed);
        }
        {
            let mut pending = lock(&inner.pending);
            for entry in &entries {
                pending.insert(entry.record.uid_mac, entry.id);
            }
        }
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
        let job: CheckpointJob = entries
            .into_iter()
            .zip(reservations)
            .map(|(e, r)| (e.id, e.record, r))
            .collect();
        if let Some(tx) = lock(&inner.checkpoint).as_ref() {
            // If the thread were gone the messages stay journaled and are indexed at the
            // next open; they are durable either way.
            let _ = tx.send(job);
        }
        Ok(results)
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

    fn open(dir: &Path) -> Spool {
        let limits = Limits {
            max_bytes: 1 << 40,
            min_free_bytes: 0,
        };
        let master = MasterKey::from_bytes([7; KEY_LEN]);
        let routes = vec![Route::new("ris", ObjectKind::Hl7)];
        Spool::open(dir, Some(master), limits, routes).unwrap()
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
