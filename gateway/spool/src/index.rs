//! The spool's index: object metadata and per-destination state, kept in sled.
//!
//! sled is hidden behind this small interface so that it can be replaced without touching
//! the rest of the spool (DESIGN.md, notes for implementers). The index never holds patient
//! data: UIDs and content hashes are stored only as keyed MACs (see `crate::Keys`).
//!
//! Trees:
//! - `objects`: object id (16 bytes) -> [`Record`]: `0xFF 0x03` then postcard (format 3);
//!   records of format 2 (`0xFF 0x02`, before journal-resident messages) and format 1 (bare
//!   postcard, before study batching) are read and upgraded on write
//! - `by_uid`: uid MAC (32) || object id (16) -> empty, for lookups by SOP Instance UID
//! - `by_content`: uid MAC (32) || content MAC (32) -> object id, for dedupe
//! - `queue`: destination || 0x00 || received ms (u64 BE) || sequence (u64 BE) || object id
//!   -> empty: the objects still queued for each destination, in arrival order (keys written
//!   before the sequence was added lack it and are still read and removed)
//!
//! Invariant: a stored record is changed only by reading, changing and writing it back in
//! one transaction over `objects` and `queue` (`Index::update_record`): the workers of
//! several destinations confirm the same object at the same moment, and a record read
//! outside the transaction would be written back stale, undoing another destination's
//! state while its queue key is already gone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

pub use crate::ids::{ContentMac, ObjectId, StudyMac, UidMac};
use crate::tally::{Counts, Tally};

/// Delivery state of one object towards one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryState {
    Queued,
    Sent,
    /// Refused by the destination for a reason a resend cannot fix (dead letter); kept until
    /// an operator runs `gatewayd spool retry`.
    Failed {
        reason: String,
    },
}

/// One destination of one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub name: String,
    pub state: DeliveryState,
}

/// What kind of object a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ObjectKind {
    /// A DICOM Part 10 file.
    #[default]
    Dicom,
    /// An HL7 v2 message, its original bytes.
    Hl7,
    /// An audit message (an RFC 5424 syslog line carrying a PS3.15 A.5 audit message) for
    /// the audit repositories. Appended last: the index stores the variant's position, so
    /// records written before it existed read as they did.
    Audit,
}

/// Marks a record of format 2; a format-1 record starts with the length of its SOP Class
/// UID (a varint below 0x80), never with 0xFF.
const RECORD_V2: [u8; 2] = [0xFF, 0x02];
/// Marks a record of format 3 (adds [`Record::segment`]).
const RECORD_V3: [u8; 2] = [0xFF, 0x03];

/// The key, in the default tree, of [`Index::journal_checkpoint`].
const JOURNAL_CHECKPOINT: &[u8] = b"journal_checkpoint";

/// Where the sealed bytes of a journal-resident object (an HL7 message) are: a journal
/// segment and the offset of the sealed bytes in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    pub generation: u64,
    pub offset: u64,
}

/// What the index knows about one stored object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub kind: ObjectKind,
    pub sop_class_uid: String,
    pub transfer_syntax_uid: String,
    /// Calling AE title of the sender (a device name, not patient data).
    pub source: String,
    pub plain_len: u64,
    pub sealed_len: u64,
    pub received_unix_ms: u64,
    pub uid_mac: UidMac,
    pub content_mac: ContentMac,
    /// Empty when no uplink is configured: the object is held in state `received`.
    pub destinations: Vec<Destination>,
    /// The sealed blob was deleted after every destination confirmed it.
    pub blob_deleted: bool,
    /// Commit order (monotonic across restarts): the newest version of a UID wins.
    pub sequence: u64,
    /// Keyed MAC of the Study Instance UID (uploads batch instances of one study).
    pub study_mac: Option<StudyMac>,
    /// When the last destination confirmed the object (for `spool.keep_sent_for`).
    pub completed_unix_ms: Option<u64>,
    /// The sealed bytes live in a journal segment, not in `blobs/`.
    pub segment: Option<SegmentRef>,
}

/// Format 2 of [`Record`], as written before journal-resident messages.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct RecordV2 {
    kind: ObjectKind,
    sop_class_uid: String,
    transfer_syntax_uid: String,
    source: String,
    plain_len: u64,
    sealed_len: u64,
    received_unix_ms: u64,
    uid_mac: UidMac,
    content_mac: ContentMac,
    destinations: Vec<Destination>,
    blob_deleted: bool,
    sequence: u64,
    study_mac: Option<StudyMac>,
    completed_unix_ms: Option<u64>,
}

impl From<RecordV2> for Record {
    fn from(r: RecordV2) -> Self {
        Self {
            kind: r.kind,
            sop_class_uid: r.sop_class_uid,
            transfer_syntax_uid: r.transfer_syntax_uid,
            source: r.source,
            plain_len: r.plain_len,
            sealed_len: r.sealed_len,
            received_unix_ms: r.received_unix_ms,
            uid_mac: r.uid_mac,
            content_mac: r.content_mac,
            destinations: r.destinations,
            blob_deleted: r.blob_deleted,
            sequence: r.sequence,
            study_mac: r.study_mac,
            completed_unix_ms: r.completed_unix_ms,
            segment: None,
        }
    }
}

/// Format 1 of [`Record`], as written before study batching and retention.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct RecordV1 {
    sop_class_uid: String,
    transfer_syntax_uid: String,
    source: String,
    plain_len: u64,
    sealed_len: u64,
    received_unix_ms: u64,
    uid_mac: UidMac,
    content_mac: ContentMac,
    destinations: Vec<Destination>,
    blob_deleted: bool,
    sequence: u64,
}

impl From<RecordV1> for Record {
    fn from(r: RecordV1) -> Self {
        Self {
            kind: ObjectKind::Dicom,
            sop_class_uid: r.sop_class_uid,
            transfer_syntax_uid: r.transfer_syntax_uid,
            source: r.source,
            plain_len: r.plain_len,
            sealed_len: r.sealed_len,
            received_unix_ms: r.received_unix_ms,
            uid_mac: r.uid_mac,
            content_mac: r.content_mac,
            destinations: r.destinations,
            blob_deleted: r.blob_deleted,
            sequence: r.sequence,
            study_mac: None,
            completed_unix_ms: None,
            segment: None,
        }
    }
}

/// Encodes a record in the current format.
pub(crate) fn encode_record(record: &Record) -> Result<Vec<u8>, postcard::Error> {
    let mut out = RECORD_V3.to_vec();
    out.extend_from_slice(&postcard::to_stdvec(record)?);
    Ok(out)
}

/// Decodes a record of any known format.
pub(crate) fn decode_record(bytes: &[u8]) -> Result<Record, postcard::Error> {
    if let Some(v3) = bytes.strip_prefix(&RECORD_V3) {
        postcard::from_bytes(v3)
    } else if let Some(v2) = bytes.strip_prefix(&RECORD_V2) {
        postcard::from_bytes::<RecordV2>(v2).map(Record::from)
    } else {
        postcard::from_bytes::<RecordV1>(bytes).map(Record::from)
    }
}

impl Record {
    /// Overall state: `received` (held, no uplink), `queued` (some destination pending),
    /// `failed` (some destination dead-lettered it, none pending) or `sent`.
    pub fn state(&self) -> &'static str {
        let any = |f: fn(&DeliveryState) -> bool| self.destinations.iter().any(|d| f(&d.state));
        if self.destinations.is_empty() {
            "received"
        } else if any(|s| *s == DeliveryState::Queued) {
            "queued"
        } else if any(|s| matches!(s, DeliveryState::Failed { .. })) {
            "failed"
        } else {
            "sent"
        }
    }
}

/// What [`Index::set_delivery`] changed.
#[derive(Debug, Clone)]
pub struct DeliveryChange {
    /// Whether the destination had the object queued before the change.
    pub was_queued: bool,
    /// The updated record.
    pub record: Record,
}

/// An index failure, naming the database path.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("spool index {path}: {source}")]
    Db { path: PathBuf, source: sled::Error },
    #[error("spool index {path}: record of object {id} is unreadable: {source}")]
    Decode {
        path: PathBuf,
        id: String,
        source: postcard::Error,
    },
    #[error("spool index {path}: record does not encode: {source}")]
    Encode {
        path: PathBuf,
        source: postcard::Error,
    },
}

/// Result of inserting a new object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// The same SOP instance with the same content is already stored under this id.
    Duplicate(ObjectId),
}

#[derive(Debug)]
pub struct Index {
    path: PathBuf,
    db: sled::Db,
    objects: sled::Tree,
    by_uid: sled::Tree,
    by_content: sled::Tree,
    queue: sled::Tree,
    /// sled's log file, synced after every flush (docs/adr/0005).
    log: std::fs::File,
    /// The records counted, kept as each is written or removed here.
    tally: Tally,
}

impl Index {
    /// Opens the index with at most `cache_bytes` of sled's page cache (`spool.index_cache_bytes`).
    /// The counts stay empty until [`Index::recount`].
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, IndexError> {
        let err = |source| IndexError::Db {
            path: path.to_path_buf(),
            source,
        };
        // sled releases its file lock from a background thread after the last handle is
        // dropped; a reopen right after (a restart, the CLI after the daemon) may need a
        // moment. Retry lock-style I/O errors for up to a second.
        let mut attempts = 0;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput)
                .cache_capacity(cache_bytes)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if attempts < 20 => {
                    tracing::debug!(error = %e, "spool index busy, retrying");
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(err(e)),
            }
        };
        let log_path = path.join("db");
        let log = std::fs::File::open(&log_path).map_err(|e| err(sled::Error::Io(e)))?;
        Ok(Self {
            log,
            objects: db.open_tree("objects").map_err(err)?,
            by_uid: db.open_tree("by_uid").map_err(err)?,
            by_content: db.open_tree("by_content").map_err(err)?,
            queue: db.open_tree("queue").map_err(err)?,
            path: path.to_path_buf(),
            db,
            tally: Tally::default(),
        })
    }

    /// Counts every record afresh, showing each to `visit` (the spool's own accounting at
    /// open rides on this one scan).
    pub(crate) fn recount(
        &self,
        mut visit: impl FnMut(&ObjectId, &Record),
    ) -> Result<(), IndexError> {
        let mut counts = Counts::default();
        for entry in self.records() {
            let (id, record) = entry?;
            counts.add(&record);
            visit(&id, &record);
        }
        self.tally.reset(counts);
        Ok(())
    }

    pub(crate) fn tally(&self) -> &Tally {
        &self.tally
    }

    /// When the oldest object still queued for `destination` arrived (the first key of
    /// its queue: no scan).
    pub fn oldest_queued_ms(&self, destination: &str) -> Result<Option<u64>, IndexError> {
        let mut prefix = destination.as_bytes().to_vec();
        prefix.push(0);
        let first = self
            .queue
            .scan_prefix(&prefix)
            .keys()
            .next()
            .transpose()
            .map_err(|e| self.db_err(e))?;
        Ok(first.and_then(|k| {
            let ms = k.get(prefix.len()..prefix.len() + 8)?;
            Some(u64::from_be_bytes(ms.try_into().ok()?))
        }))
    }

    /// The index's size on disk, as sled counts it.
    pub fn size_on_disk(&self) -> Result<u64, IndexError> {
        self.db.size_on_disk().map_err(|e| self.db_err(e))
    }

    fn db_err(&self, source: sled::Error) -> IndexError {
        IndexError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// The id already stored for this (uid, content), if any.
    pub fn find_duplicate(
        &self,
        uid_mac: &UidMac,
        content_mac: &ContentMac,
    ) -> Result<Option<ObjectId>, IndexError> {
        let key = content_key(uid_mac, content_mac);
        Ok(self
            .by_content
            .get(key)
            .map_err(|e| self.db_err(e))?
            .and_then(|v| to_id(&v)))
    }

    /// The encoded record and its lookup and queue keys.
    fn row(&self, id: &ObjectId, record: &Record) -> Result<Row, IndexError> {
        let value = encode_record(record).map_err(|source| IndexError::Encode {
            path: self.path.clone(),
            source,
        })?;
        let mut uid_key = record.uid_mac.as_bytes().to_vec();
        uid_key.extend_from_slice(id.as_bytes());
        let queue_keys = record
            .destinations
            .iter()
            .filter(|d| d.state == DeliveryState::Queued)
            .map(|d| queue_key(&d.name, record, id))
            .collect();
        Ok(Row {
            id: *id,
            value,
            uid_key,
            content_key: content_key(&record.uid_mac, &record.content_mac),
            queue_keys,
        })
    }

    /// Inserts a new object atomically with its lookup keys and makes it durable
    /// ([`Index::flush`]) before returning.
    pub fn insert_durable(&self, id: &ObjectId, record: &Record) -> Result<Inserted, IndexError> {
        let row = self.row(id, record)?;
        let outcome =
            (&self.objects, &self.by_uid, &self.by_content, &self.queue).transaction(|trees| {
                if let Some(existing) = trees.2.get(row.content_key)? {
                    return Ok(to_id(&existing).map_or(Inserted::New, Inserted::Duplicate));
                }
                row.insert(trees)?;
                Ok::<_, ConflictableTransactionError<()>>(Inserted::New)
            });
        let inserted = match outcome {
            Ok(i) => i,
            Err(TransactionError::Storage(e)) => return Err(self.db_err(e)),
            Err(TransactionError::Abort(())) => Inserted::New,
        };
        if inserted == Inserted::New {
            self.tally.apply(None, Some(record));
            self.flush()?;
        }
        Ok(inserted)
    }

    /// Inserts new objects (already checked for duplicates by their caller) with their
    /// lookup and queue keys, then flushes if `flush`. Plain inserts, tree by tree with
    /// `objects` last: sled's log is replayed in order after a crash, so an object is
    /// either wholly indexed or has no `objects` row (and its journal entry is indexed
    /// again, rewriting the same keys). A transaction or `apply_batch` would seal sled's
    /// write buffer each time, one write and `sync_file_range` per call; the journal replay
    /// makes their atomicity unnecessary here.
    pub fn insert_all<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a ObjectId, &'a Record)>,
        flush: bool,
    ) -> Result<(), IndexError> {
        let items: Vec<_> = items.into_iter().collect();
        let rows = items
            .iter()
            .map(|(id, record)| self.row(id, record))
            .collect::<Result<Vec<_>, _>>()?;
        let err = |e| self.db_err(e);
        for row in &rows {
            for key in &row.queue_keys {
                self.queue.insert(key.as_slice(), &[][..]).map_err(err)?;
            }
            self.by_content
                .insert(row.content_key.as_slice(), row.id.as_bytes().as_slice())
                .map_err(err)?;
            self.by_uid
                .insert(row.uid_key.as_slice(), &[][..])
                .map_err(err)?;
        }
        for (row, (_, record)) in rows.iter().zip(&items) {
            let before = self
                .objects
                .insert(row.id.as_bytes().as_slice(), row.value.as_slice())
                .map_err(err)?;
            // A retry after a failed insert writes some rows again: count the change.
            let before = before.map(|b| self.decode(&row.id, &b)).transpose()?;
            self.tally.apply(before.as_ref(), Some(record));
        }
        if flush { self.flush() } else { Ok(()) }
    }

    /// A fresh, monotonically increasing sequence number.
    /// Records that everything the journal holds before `at` is indexed. Written after
    /// the records it covers: sled's log is replayed in order, so after a crash the mark
    /// never claims records that were lost. Flushed only if `flush`.
    pub fn set_journal_checkpoint(&self, at: SegmentRef, flush: bool) -> Result<(), IndexError> {
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&at.generation.to_le_bytes());
        value[8..].copy_from_slice(&at.offset.to_le_bytes());
        self.db
            .insert(JOURNAL_CHECKPOINT, &value[..])
            .map_err(|e| self.db_err(e))?;
        if flush {
            self.flush()?;
        }
        Ok(())
    }

    /// The last [`Index::set_journal_checkpoint`], if any (a spool from before it had none).
    pub fn journal_checkpoint(&self) -> Result<Option<SegmentRef>, IndexError> {
        let value = self
            .db
            .get(JOURNAL_CHECKPOINT)
            .map_err(|e| self.db_err(e))?;
        Ok(value.and_then(|v| {
            let generation = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
            let offset = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
            Some(SegmentRef { generation, offset })
        }))
    }

    pub fn next_sequence(&self) -> Result<u64, IndexError> {
        self.db.generate_id().map_err(|e| self.db_err(e))
    }

    /// Up to `limit` objects queued for `destination`, oldest first. Only objects whose
    /// record is written: [`Index::insert_all`] writes queue keys before the record, and a
    /// worker that took such a key would find no record to read (and dead-letter an
    /// acknowledged message as unreadable once the record landed).
    pub fn queued(&self, destination: &str, limit: usize) -> Result<Vec<ObjectId>, IndexError> {
        let mut prefix = destination.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for key in self.queue.scan_prefix(&prefix).keys() {
            if out.len() >= limit {
                break;
            }
            let key = key.map_err(|e| self.db_err(e))?;
            if let Some(id) = to_id(&key[key.len().saturating_sub(16)..])
                && self.contains(&id)?
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Replaces the delivery state of `id` towards `destination`, durably when `sync`
    /// (otherwise call [`Index::flush`] before relying on it). `now_ms` is recorded as the
    /// completion time when this was the last pending destination. Returns whether
    /// `destination` had it queued, and the updated record (None if the object or
    /// destination is unknown).
    ///
    /// Destinations confirm the same object concurrently (one worker each): the record is
    /// read and rewritten in one transaction (`Index::update_record`), so that one
    /// destination's change never overwrites another's with a stale copy.
    pub fn set_delivery(
        &self,
        id: &ObjectId,
        destination: &str,
        state: DeliveryState,
        now_ms: Option<u64>,
        sync: bool,
    ) -> Result<Option<DeliveryChange>, IndexError> {
        self.update_record(id, sync, |record, queue| {
            let Some(dest) = record
                .destinations
                .iter_mut()
                .find(|d| d.name == destination)
            else {
                return Ok(None);
            };
            let was_queued = dest.state == DeliveryState::Queued;
            dest.state = state.clone();
            let key = queue_key(destination, record, id);
            if state == DeliveryState::Queued {
                queue.insert(key.as_slice(), &[][..])?;
            } else {
                queue.remove(key.as_slice())?;
                let legacy = legacy_queue_key(destination, record.received_unix_ms, id);
                queue.remove(legacy.as_slice())?;
            }
            record.completed_unix_ms = match record.state() {
                "sent" => record.completed_unix_ms.or(now_ms),
                _ => None,
            };
            Ok(Some(DeliveryChange {
                was_queued,
                record: record.clone(),
            }))
        })
    }

    /// Records that the blob of `id` was deleted; durable after the next [`Index::flush`].
    pub fn set_blob_deleted(&self, id: &ObjectId) -> Result<(), IndexError> {
        self.update_record(id, false, |record, _| {
            record.blob_deleted = true;
            Ok(Some(()))
        })?;
        Ok(())
    }

    /// Records that the sealed bytes of `id` moved out of its journal segment into
    /// `blobs/`; flushed before returning.
    pub fn clear_segment(&self, id: &ObjectId) -> Result<(), IndexError> {
        self.update_record(id, true, |record, _| {
            record.segment = None;
            Ok(Some(()))
        })?;
        Ok(())
    }

    /// Makes every change so far durable: sled writes its log with `sync_file_range`,
    /// which neither commits the file's metadata nor flushes the disk's write cache, so the
    /// log file is `fdatasync`ed after it (docs/adr/0005).
    pub fn flush(&self) -> Result<(), IndexError> {
        self.db.flush().map_err(|e| self.db_err(e))?;
        self.log
            .sync_data()
            .map_err(|e| self.db_err(sled::Error::Io(e)))
    }

    /// The study MAC of a record, if the object is known and has one.
    pub fn study_of(&self, id: &ObjectId) -> Result<Option<StudyMac>, IndexError> {
        Ok(self.get(id)?.and_then(|r| r.study_mac))
    }

    /// Reads the record of `id`, lets `change` modify it (and the queue tree alongside),
    /// and writes it back, all in one sled transaction: sled's transactions are
    /// serializable, so a concurrent update of the same record is either seen here or
    /// retried after, never lost. `change` may run more than once and starts from the
    /// stored record each time; it returns `None` to leave everything as it is. Flushed
    /// before returning when `sync` and something changed. `None` if `id` is unknown.
    fn update_record<T>(
        &self,
        id: &ObjectId,
        sync: bool,
        change: impl Fn(
            &mut Record,
            &sled::transaction::TransactionalTree,
        ) -> Result<Option<T>, sled::transaction::UnabortableTransactionError>,
    ) -> Result<Option<T>, IndexError> {
        let outcome = (&self.objects, &self.queue).transaction(|(objects, queue)| {
            let Some(bytes) = objects.get(id.as_bytes())? else {
                return Ok(None);
            };
            let mut record = self
                .decode(id, &bytes)
                .map_err(ConflictableTransactionError::Abort)?;
            let before = record.clone();
            let Some(out) = change(&mut record, queue)? else {
                return Ok(None);
            };
            let value = encode_record(&record).map_err(|source| {
                ConflictableTransactionError::Abort(IndexError::Encode {
                    path: self.path.clone(),
                    source,
                })
            })?;
            objects.insert(id.as_bytes().as_slice(), value)?;
            Ok(Some((before, record, out)))
        });
        let out = match outcome {
            Ok(Some((before, after, out))) => {
                self.tally.apply(Some(&before), Some(&after));
                Some(out)
            }
            Ok(None) => None,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(self.db_err(e)),
        };
        if sync && out.is_some() {
            self.flush()?;
        }
        Ok(out)
    }

    /// Removes the record of `id` if it is still [`prunable`] at `cutoff_ms`, with its
    /// lookup and dedupe keys: a resend of the object after this is stored again. One
    /// transaction; durable after the next [`Index::flush`]. Whether it went.
    pub fn prune(&self, id: &ObjectId, cutoff_ms: u64) -> Result<bool, IndexError> {
        let outcome = (&self.objects, &self.by_uid, &self.by_content).transaction(
            |(objects, by_uid, by_content)| {
                let Some(bytes) = objects.get(id.as_bytes())? else {
                    return Ok(None);
                };
                let record = self
                    .decode(id, &bytes)
                    .map_err(ConflictableTransactionError::Abort)?;
                if !prunable(&record, cutoff_ms) {
                    return Ok(None);
                }
                objects.remove(id.as_bytes().as_slice())?;
                let mut uid_key = record.uid_mac.as_bytes().to_vec();
                uid_key.extend_from_slice(id.as_bytes());
                by_uid.remove(uid_key)?;
                let key = content_key(&record.uid_mac, &record.content_mac);
                if by_content
                    .get(key)?
                    .is_some_and(|v| v.as_ref() == id.as_bytes().as_slice())
                {
                    by_content.remove(key.as_slice())?;
                }
                Ok(Some(record))
            },
        );
        match outcome {
            Ok(Some(record)) => {
                self.tally.apply(Some(&record), None);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(self.db_err(e)),
        }
    }

    /// Ids stored under a uid MAC.
    pub fn ids_for_uid(&self, uid_mac: &UidMac) -> Result<Vec<ObjectId>, IndexError> {
        self.by_uid
            .scan_prefix(uid_mac.as_bytes())
            .keys()
            .map(|k| k.map(|k| to_id(&k[32..])).map_err(|e| self.db_err(e)))
            .filter_map(Result::transpose)
            .collect()
    }

    pub fn get(&self, id: &ObjectId) -> Result<Option<Record>, IndexError> {
        match self
            .objects
            .get(id.as_bytes())
            .map_err(|e| self.db_err(e))?
        {
            Some(v) => Ok(Some(self.decode(id, &v)?)),
            None => Ok(None),
        }
    }

    pub fn contains(&self, id: &ObjectId) -> Result<bool, IndexError> {
        self.objects
            .contains_key(id.as_bytes())
            .map_err(|e| self.db_err(e))
    }

    /// Every record, in id order.
    pub fn records(&self) -> impl Iterator<Item = Result<(ObjectId, Record), IndexError>> + '_ {
        self.objects.iter().filter_map(move |entry| {
            let (k, v) = match entry {
                Ok(kv) => kv,
                Err(e) => return Some(Err(self.db_err(e))),
            };
            let id = to_id(&k)?;
            Some(self.decode(&id, &v).map(|r| (id, r)))
        })
    }

    fn decode(&self, id: &ObjectId, bytes: &[u8]) -> Result<Record, IndexError> {
        decode_record(bytes).map_err(|source| IndexError::Decode {
            path: self.path.clone(),
            id: hex::encode(id),
            source,
        })
    }
}

/// Whether a record may leave the index at `cutoff_ms` (`spool.dedupe_window` ago): every
/// destination confirmed it at or before then and its sealed bytes are gone. Held,
/// queued and dead-lettered objects, and kept local copies, stay. A record from before
/// completion times were kept counts as completed at 0.
pub(crate) fn prunable(record: &Record, cutoff_ms: u64) -> bool {
    record.state() == "sent"
        && record.blob_deleted
        && record.completed_unix_ms.unwrap_or(0) <= cutoff_ms
}

/// One object's entries in the four trees.
struct Row {
    id: ObjectId,
    value: Vec<u8>,
    uid_key: Vec<u8>,
    content_key: [u8; 64],
    queue_keys: Vec<Vec<u8>>,
}

/// (objects, by_uid, by_content, queue) inside a transaction.
type Trees = (
    sled::transaction::TransactionalTree,
    sled::transaction::TransactionalTree,
    sled::transaction::TransactionalTree,
    sled::transaction::TransactionalTree,
);

impl Row {
    /// Inserts into (objects, by_uid, by_content, queue).
    fn insert(
        &self,
        (objects, by_uid, by_content, queue): &Trees,
    ) -> Result<(), sled::transaction::UnabortableTransactionError> {
        objects.insert(self.id.as_bytes().as_slice(), self.value.as_slice())?;
        by_uid.insert(self.uid_key.as_slice(), &[][..])?;
        by_content.insert(self.content_key.as_slice(), self.id.as_bytes().as_slice())?;
        for key in &self.queue_keys {
            queue.insert(key.as_slice(), &[][..])?;
        }
        Ok(())
    }
}

fn content_key(uid_mac: &UidMac, content_mac: &ContentMac) -> [u8; 64] {
    let mut key = [0u8; 64];
    key[..32].copy_from_slice(uid_mac.as_bytes());
    key[32..].copy_from_slice(content_mac.as_bytes());
    key
}

/// Objects received in the same millisecond (HL7 messages, one group) keep their arrival
/// order by sequence number.
fn queue_key(destination: &str, record: &Record, id: &ObjectId) -> Vec<u8> {
    let mut key = destination.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&record.received_unix_ms.to_be_bytes());
    key.extend_from_slice(&record.sequence.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// The queue key as written before it held the sequence number.
fn legacy_queue_key(destination: &str, received_ms: u64, id: &ObjectId) -> Vec<u8> {
    let mut key = destination.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&received_ms.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

fn to_id(bytes: &[u8]) -> Option<ObjectId> {
    ObjectId::try_from(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1() -> RecordV1 {
        RecordV1 {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            source: "CT01".into(),
            plain_len: 10,
            sealed_len: 200,
            received_unix_ms: 1_700_000_000_000,
            uid_mac: UidMac::from_bytes([1; 32]),
            content_mac: ContentMac::from_bytes([2; 32]),
            destinations: vec![Destination {
                name: "cloud".into(),
                state: DeliveryState::Sent,
            }],
            blob_deleted: true,
            sequence: 7,
        }
    }

    #[test]
    fn format_one_records_are_read_and_upgraded() {
        let old = postcard::to_stdvec(&v1()).unwrap();
        assert_ne!(
            old[0], 0xFF,
            "a format-1 record never starts with the v2 marker"
        );
        let r = decode_record(&old).unwrap();
        assert_eq!(r.kind, ObjectKind::Dicom);
        assert_eq!(r.source, "CT01");
        assert_eq!(r.sequence, 7);
        assert_eq!(r.study_mac, None);
        assert_eq!(r.state(), "sent");
        let again = decode_record(&encode_record(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }

    fn tree_hex(tree: &sled::Tree) -> Vec<(String, String)> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (hex::encode(k), hex::encode(v))
            })
            .collect()
    }

    /// The record encoding and every index key and value, pinned byte for byte: spools
    /// written by earlier builds must keep opening, whatever types hold ids and MACs.
    #[test]
    fn record_and_index_keys_are_byte_identical_on_disk() {
        let mut r = Record::from(v1());
        r.kind = ObjectKind::Hl7;
        r.blob_deleted = false;
        r.destinations[0].state = DeliveryState::Queued;
        r.study_mac = Some(StudyMac::from_bytes([9; 32]));
        r.completed_unix_ms = Some(42);
        r.segment = Some(SegmentRef {
            generation: 3,
            offset: 4096,
        });
        let id = ObjectId::from_bytes([5; 16]);
        let encoded = encode_record(&r).unwrap();
        assert_eq!(hex::encode(&encoded), GOLDEN_RECORD);
        let dir = tempfile::tempdir().unwrap();
        let index =
            Index::open(&dir.path().join("index"), crate::DEFAULT_INDEX_CACHE_BYTES).unwrap();
        index.insert_all([(&id, &r)], true).unwrap();
        assert_eq!(
            tree_hex(&index.objects),
            [(hex::encode(id), GOLDEN_RECORD.to_string())]
        );
        assert_eq!(
            tree_hex(&index.by_uid),
            [(
                format!("{}{}", "01".repeat(32), "05".repeat(16)),
                String::new()
            )]
        );
        assert_eq!(
            tree_hex(&index.by_content),
            [(
                format!("{}{}", "01".repeat(32), "02".repeat(32)),
                "05".repeat(16)
            )]
        );
        assert_eq!(
            tree_hex(&index.queue),
            [(
                format!(
                    "{}00{:016x}{:016x}{}",
                    hex::encode("cloud"),
                    r.received_unix_ms,
                    r.sequence,
                    "05".repeat(16)
                ),
                String::new()
            )]
        );
        assert_eq!(index.ids_for_uid(&r.uid_mac).unwrap(), [id]);
        assert_eq!(index.study_of(&id).unwrap(), r.study_mac);
        assert_eq!(
            index.find_duplicate(&r.uid_mac, &r.content_mac).unwrap(),
            Some(id)
        );
    }

    /// `0xFF 0x03`, then postcard: kind, the two UIDs, source, lengths, received ms, uid
    /// MAC and content MAC (32 bytes each, no length prefix), destinations, blob_deleted,
    /// sequence, study MAC, completed ms, segment. Written by the build before ids and MACs
    /// became their own types.
    const GOLDEN_RECORD: &str = concat!(
        "ff030119312e322e3834302e31303030382e352e312e342e312e312e3213312e322e3834302e3130",
        "3030382e312e322e3104435430310ac80180d095ffbc310101010101010101010101010101010101",
        "01010101010101010101010101010102020202020202020202020202020202020202020202020202",
        "020202020202020105636c6f75640000070109090909090909090909090909090909090909090909",
        "09090909090909090909012a01038020",
    );

    #[test]
    fn format_three_round_trips_new_fields() {
        let mut r = Record::from(v1());
        r.kind = ObjectKind::Hl7;
        r.study_mac = Some(StudyMac::from_bytes([9; 32]));
        r.completed_unix_ms = Some(42);
        r.segment = Some(SegmentRef {
            generation: 3,
            offset: 4096,
        });
        let bytes = encode_record(&r).unwrap();
        assert_eq!(&bytes[..2], &RECORD_V3);
        assert_eq!(decode_record(&bytes).unwrap(), r);
    }

    /// An empty index in a temp dir, and a record queued for "cloud" (not yet inserted).
    fn index_with_a_queued_record() -> (tempfile::TempDir, Index, Record) {
        let dir = tempfile::tempdir().unwrap();
        let index =
            Index::open(&dir.path().join("index"), crate::DEFAULT_INDEX_CACHE_BYTES).unwrap();
        let mut r = Record::from(v1());
        r.blob_deleted = false;
        r.destinations[0].state = DeliveryState::Queued;
        (dir, index, r)
    }

    #[test]
    fn queue_keeps_arrival_order_within_a_millisecond_and_drops_legacy_keys() {
        let (_dir, index, r) = index_with_a_queued_record();
        // Ids in descending order, sequence ascending, one millisecond.
        let items: Vec<(ObjectId, Record)> = (0..5u8)
            .map(|i| {
                let mut r = r.clone();
                r.sequence = 100 + u64::from(i);
                r.uid_mac = UidMac::from_bytes([i; 32]);
                (ObjectId::from_bytes([200 - i; 16]), r)
            })
            .collect();
        index
            .insert_all(items.iter().map(|(id, r)| (id, r)), true)
            .unwrap();
        let expect: Vec<ObjectId> = items.iter().map(|(id, _)| *id).collect();
        assert_eq!(index.queued("cloud", 10).unwrap(), expect);
        // A queue entry as written by the previous format is removed on delivery too.
        let old_id = ObjectId::from_bytes([1; 16]);
        let mut old = r.clone();
        old.received_unix_ms -= 1;
        index
            .objects
            .insert(old_id.as_bytes(), encode_record(&old).unwrap())
            .unwrap();
        index
            .queue
            .insert(
                legacy_queue_key("cloud", old.received_unix_ms, &old_id),
                &[][..],
            )
            .unwrap();
        assert_eq!(index.queued("cloud", 1).unwrap(), [old_id]);
        index
            .set_delivery(&old_id, "cloud", DeliveryState::Sent, Some(1), true)
            .unwrap();
        assert_eq!(index.queued("cloud", 10).unwrap(), expect);
    }

    /// A queue key whose record is not written yet (`insert_all` in progress) is not
    /// handed to a worker.
    #[test]
    fn queued_skips_objects_whose_record_is_not_written_yet() {
        let (_dir, index, r) = index_with_a_queued_record();
        let (early, late) = (ObjectId::from_bytes([1; 16]), ObjectId::from_bytes([2; 16]));
        index.insert_all([(&late, &r)], true).unwrap();
        let mut older = r.clone();
        older.received_unix_ms -= 1;
        let row = index.row(&early, &older).unwrap();
        for key in &row.queue_keys {
            index.queue.insert(key.as_slice(), &[][..]).unwrap();
        }
        assert_eq!(index.queued("cloud", 10).unwrap(), [late]);
        assert_eq!(
            index.queued("cloud", 1).unwrap(),
            [late],
            "the limit counts readable ids"
        );
        index.insert_all([(&early, &older)], true).unwrap();
        assert_eq!(index.queued("cloud", 10).unwrap(), [early, late]);
    }

    #[test]
    fn format_two_records_are_read_and_upgraded() {
        let mut old = RecordV2 {
            kind: ObjectKind::Hl7,
            study_mac: Some(StudyMac::from_bytes([9; 32])),
            completed_unix_ms: Some(42),
            ..RecordV2::from_v1(v1())
        };
        old.sequence = 8;
        let mut bytes = RECORD_V2.to_vec();
        bytes.extend_from_slice(&postcard::to_stdvec(&old).unwrap());
        let r = decode_record(&bytes).unwrap();
        assert_eq!(
            (r.kind, r.sequence, r.completed_unix_ms),
            (ObjectKind::Hl7, 8, Some(42))
        );
        assert_eq!(r.study_mac, Some(StudyMac::from_bytes([9; 32])));
        assert_eq!(r.segment, None);
        assert_eq!(decode_record(&encode_record(&r).unwrap()).unwrap(), r);
    }

    /// The index stores an [`ObjectKind`] as its position: the kinds written before
    /// `Audit` existed keep their bytes, and an audit record round-trips.
    #[test]
    fn object_kinds_keep_their_encoding_and_audit_comes_last() {
        let bytes = |k: ObjectKind| postcard::to_stdvec(&k).unwrap();
        assert_eq!(bytes(ObjectKind::Dicom), [0]);
        assert_eq!(bytes(ObjectKind::Hl7), [1]);
        assert_eq!(bytes(ObjectKind::Audit), [2]);
        let mut old = RecordV2::from_v1(v1());
        old.kind = ObjectKind::Hl7;
        let mut encoded = RECORD_V2.to_vec();
        encoded.extend_from_slice(&postcard::to_stdvec(&old).unwrap());
        assert_eq!(decode_record(&encoded).unwrap().kind, ObjectKind::Hl7);
        let mut audit = decode_record(&encoded).unwrap();
        audit.kind = ObjectKind::Audit;
        assert_eq!(
            decode_record(&encode_record(&audit).unwrap()).unwrap(),
            audit
        );
    }

    impl RecordV2 {
        fn from_v1(r: RecordV1) -> Self {
            let r = Record::from(r);
            Self {
                kind: r.kind,
                sop_class_uid: r.sop_class_uid,
                transfer_syntax_uid: r.transfer_syntax_uid,
                source: r.source,
                plain_len: r.plain_len,
                sealed_len: r.sealed_len,
                received_unix_ms: r.received_unix_ms,
                uid_mac: r.uid_mac,
                content_mac: r.content_mac,
                destinations: r.destinations,
                blob_deleted: r.blob_deleted,
                sequence: r.sequence,
                study_mac: r.study_mac,
                completed_unix_ms: r.completed_unix_ms,
            }
        }
    }
}
