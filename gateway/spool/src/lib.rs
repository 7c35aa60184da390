//! The spool: the only writer of patient data to disk, and it writes only ciphertext.
//!
//! Every inbound object (DICOM today; HL7 and booking later) is streamed into an [`Ingest`],
//! sealed chunk by chunk with AES-256-GCM under a fresh per-object data key ([`seal`]), and
//! committed with [`Ingest::commit`]. Outbound workers drain it by destination.
//!
//! Module map:
//! - [`seal`]: the sealed blob format (chunked AES-256-GCM, STREAM construction).
//! - [`index`]: object records and delivery state in sled, behind a small interface.
//! - `usage`: byte accounting and the disk-pressure guard.
//! - `journal`: the write-ahead journal of HL7 message groups and its checkpointer.
//!
//! On disk, under `<data_dir>/spool/`:
//! - `tmp/<id>.part`: an object being received (deleted at start if a crash left it);
//! - `blobs/<id>.blob`: committed sealed objects;
//! - `index/`: the sled database;
//! - `journal/<generation>.wal`: HL7 messages, in the groups they were acknowledged in
//!   (their records point there; replayed into `index/` when the spool opens).
//!
//! Invariants (the kill -9 tests in hw-tests pin them):
//! - [`Ingest::commit`] returns only after the blob is fsync'd, renamed into `blobs/`, the
//!   directory is fsync'd, and the index entry is committed and flushed. The caller sends its
//!   success status only after that.
//! - [`Spool::store_messages`] returns only after the group's frame (sealed bytes and index
//!   records) is appended to the journal and fdatasync'd; the messages' bytes stay in that
//!   segment. The checkpointer indexes them behind the answer; [`Spool::open`] indexes what
//!   it had not, so an acknowledged message is never lost and a replay never stores a
//!   message twice (an entry whose id or key has an `objects` row is skipped). A segment is
//!   deleted only once the writer has left it and no record needs its bytes.
//! - A blob in `blobs/` without an index entry is the trace of a crash between rename and
//!   index commit; its sender never got success. [`Spool::recover`] deletes such orphans.
//!   An index entry without its blob must never exist; [`Spool::verify`] reports it.
//! - No patient data in the index or file names: SOP Instance UIDs and content hashes are
//!   kept as HMAC-SHA-256 under a key derived from the master key.
//! - A resend of the same SOP instance with the same content is a success that stores nothing.
//! - When the spool would pass `max_bytes`, or free disk would drop below `min_free_bytes`,
//!   [`Ingest::write`] fails with [`SpoolError::Full`] and nothing stored is touched.

pub mod index;
mod journal;
pub mod seal;
mod usage;

use std::collections::BTreeMap;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gateway_durable::{self as durable, Context};
use gateway_keystore::MasterKey;
use hmac::{Hmac, Mac as _};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tracing::{info, warn};
use zeroize::Zeroizing;

pub use index::{DeliveryState, Destination, IndexError, Inserted, ObjectId, ObjectKind, Record};
use index::{Index, Mac};
pub use usage::Limits;
use usage::{Step, Usage};

type HmacSha256 = Hmac<Sha256>;

/// How long reads that must see every acknowledged message (status, export, verify) wait
/// for the checkpointer.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// Spool failures. `Display` names local paths and ids only, never object content.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full: {reason}")]
    Full { reason: String },
    #[error(transparent)]
    Io(#[from] durable::Error),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("object {id}: {source}")]
    Open { id: String, source: seal::OpenError },
    #[error("cannot start sealing: {0}")]
    Seal(#[from] seal::SealError),
    #[error("the spool master key is not available; run `gatewayd keys init`")]
    NoKey,
    #[error("no stored object has that SOP Instance UID or HL7 message key")]
    NotFound,
    #[error("the group of messages could not be made durable: {detail}")]
    GroupCommit { detail: String },
    #[error("object {id} was uploaded to every destination and its local copy deleted")]
    Reclaimed { id: String },
    #[error("object {id} is in the index but its blob {path} is missing")]
    MissingBlob { id: String, path: PathBuf },
}

/// What the sender said about an incoming object.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax_uid: String,
    pub source: String,
}

/// An upload destination and the kind of objects queued for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub kind: ObjectKind,
}

impl Route {
    pub fn new(name: impl Into<String>, kind: ObjectKind) -> Self {
        Self {
            name: name.into(),
            kind,
        }
    }
}

/// A DICOM destination.
impl From<&str> for Route {
    fn from(name: &str) -> Self {
        Self::new(name, ObjectKind::Dicom)
    }
}

/// A DICOM destination.
impl From<String> for Route {
    fn from(name: String) -> Self {
        Self::new(name, ObjectKind::Dicom)
    }
}

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

/// The outcome of a commit: both mean the object is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Stored(ObjectId),
    Duplicate(ObjectId),
}

/// `spool status` report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub objects: u64,
    /// Sealed bytes on disk.
    pub bytes: u64,
    pub by_state: BTreeMap<String, u64>,
    pub by_destination: BTreeMap<String, DestinationCounts>,
    /// Age of the oldest object not yet sent everywhere.
    pub oldest_age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DestinationCounts {
    pub queued: u64,
    pub sent: u64,
    /// Dead letters: refused by the destination, waiting for `gatewayd spool retry`.
    pub failed: u64,
    /// Why the last upload attempt failed, while the destination is failing (running
    /// daemon only).
    pub last_error: Option<String>,
    /// Age of the oldest object still queued for this destination.
    #[serde(default)]
    pub oldest_queued_age_seconds: Option<f64>,
}

/// `spool verify` report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub objects: u64,
    pub ok: u64,
    pub orphan_blobs: u64,
    pub dangling_entries: u64,
    pub unseal_failures: u64,
    pub partial_files: u64,
}

impl VerifyReport {
    pub fn is_consistent(&self) -> bool {
        self.orphan_blobs == 0 && self.dangling_entries == 0 && self.unseal_failures == 0
    }
}

/// What recovery found at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    pub partial_files_removed: u64,
    pub orphan_blobs_removed: u64,
    /// Blobs of objects every destination had confirmed, left by a crash before deletion.
    pub sent_blobs_reclaimed: u64,
}

/// Keys derived from the master key.
struct Keys {
    master: MasterKey,
    index_key: Zeroizing<[u8; 32]>,
}

impl Keys {
    fn new(master: MasterKey) -> Self {
        let mut mac = <HmacSha256 as hmac::Mac>::new_from_slice(master.expose())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"gatewayd spool index key v1");
        let mut index_key = Zeroizing::new([0u8; 32]);
        index_key.copy_from_slice(&mac.finalize().into_bytes());
        Self { master, index_key }
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as hmac::Mac>::new_from_slice(self.index_key.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    fn uid_mac(&self, uid: &str) -> Mac {
        self.labelled_mac(b"uid\0", uid)
    }

    fn study_mac(&self, uid: &str) -> Mac {
        self.labelled_mac(b"study\0", uid)
    }

    fn labelled_mac(&self, label: &[u8], uid: &str) -> Mac {
        let mut m = self.mac();
        m.update(label);
        m.update(uid.trim_end_matches(['\0', ' ']).as_bytes());
        m.finalize().into_bytes().into()
    }
}

/// A handle on the spool; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    dir: PathBuf,
    blobs: PathBuf,
    tmp: PathBuf,
    index: Index,
    keys: Option<Keys>,
    destinations: Vec<Route>,
    usage: Usage,
    committed: tokio::sync::watch::Sender<u64>,
    destination_errors: std::sync::Mutex<BTreeMap<String, String>>,
    /// `spool.keep_sent_for` in milliseconds: 0 deletes a blob once every destination has it.
    keep_sent_ms: AtomicU64,
    journal_dir: PathBuf,
    journal: Mutex<journal::Writer>,
    /// Messages in the journal, not yet in the index: key MAC -> object id (dedupe).
    pending: Mutex<HashMap<Mac, ObjectId>>,
    /// Hands journaled groups to the checkpointer thread.
    checkpoint: Mutex<Option<mpsc::Sender<CheckpointJob>>>,
    /// Messages journaled / checkpointed since open ([`Spool::settle`]).
    journaled: AtomicU64,
    checkpointed: (Mutex<u64>, Condvar),
    /// Journal segment -> how many objects still need their sealed bytes there (not yet
    /// reclaimed). A segment the writer has left is deleted when its count reaches 0.
    live: Mutex<BTreeMap<u64, u64>>,
}

/// Work for the checkpointer thread: one journaled group's index records (the sealed bytes
/// are in the journal already).
type CheckpointJob = Vec<(ObjectId, Record, usage::Reservation)>;

impl Inner {
    /// The destinations a new object of `kind` is queued for.
    fn queue_for(&self, kind: ObjectKind) -> Vec<Destination> {
        self.destinations
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| Destination {
                name: r.name.clone(),
                state: DeliveryState::Queued,
            })
            .collect()
    }
}

impl Inner {
    fn blob_path(&self, id: &ObjectId) -> PathBuf {
        self.blobs.join(format!("{}.blob", hex::encode(id)))
    }

    /// Indexes what the journal holds from the last run and the index lacks (an
    /// acknowledged message whose index entry was not yet flushed), skipping anything
    /// already indexed by id or by key. Returns the newest generation seen, so new segments
    /// sort after it. The segments stay: they hold the messages' sealed bytes.
    fn replay_journal(&self) -> Result<u64, SpoolError> {
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
    fn release_segment(&self, generation: u64, n: u64) {
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

/// A stored object's bytes could not be read: missing (an index entry without its bytes)
/// or an I/O error.
fn unreadable(id: &ObjectId, action: &'static str, path: PathBuf, e: std::io::Error) -> SpoolError {
    if e.kind() == std::io::ErrorKind::NotFound {
        SpoolError::MissingBlob {
            id: hex::encode(id),
            path,
        }
    } else {
        durable::Error {
            action,
            path,
            source: e,
        }
        .into()
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The checkpointer: takes every journaled group waiting and indexes them in one batch
/// per tree, without a flush (the journal is the durable copy; replay covers a crash). A
/// failed insert is retried every second; the messages stay journaled meanwhile. Ends when
/// the spool is dropped.
fn run_checkpointer(spool: &Weak<Inner>, rx: &mpsc::Receiver<CheckpointJob>) {
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
                inner
                    .usage
                    .commit(&mut reservation, record.sealed_len, record.state());
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
    /// Opens (creating if needed) the spool under `data_dir/spool`, first applying any HL7
    /// messages the journal holds that a crash kept from reaching `blobs/` and the index
    /// (they were acknowledged). Call [`Spool::recover`] before accepting objects.
    /// Without a master key, only status and verify of structure are possible.
    pub fn open(
        data_dir: &Path,
        master: Option<MasterKey>,
        limits: Limits,
        destinations: Vec<Route>,
    ) -> Result<Self, SpoolError> {
        let dir = data_dir.join("spool");
        let blobs = dir.join("blobs");
        let tmp = dir.join("tmp");
        for d in [&dir, &blobs, &tmp] {
            durable::ensure_private_dir(d)?;
        }
        let journal_dir = dir.join("journal");
        durable::ensure_private_dir(&journal_dir)?;
        let index = Index::open(&dir.join("index"))?;
        let usage = Usage::new(limits, data_dir.to_path_buf());
        let mut inner = Inner {
            blobs,
            tmp,
            index,
            keys: master.map(Keys::new),
            destinations,
            usage,
            committed: tokio::sync::watch::Sender::new(0),
            destination_errors: std::sync::Mutex::default(),
            keep_sent_ms: AtomicU64::new(0),
            journal: Mutex::new(journal::Writer::new(&journal_dir, 0)),
            journal_dir,
            dir,
            pending: Mutex::default(),
            checkpoint: Mutex::new(None),
            journaled: AtomicU64::new(0),
            checkpointed: (Mutex::new(0), Condvar::new()),
            live: Mutex::default(),
        };
        let newest = inner.replay_journal()?;
        inner.journal = Mutex::new(journal::Writer::new(&inner.journal_dir, newest));
        let mut sealed = 0;
        let mut counts = BTreeMap::new();
        let mut live = BTreeMap::new();
        for entry in inner.index.records() {
            let (_, r) = entry?;
            if !r.blob_deleted {
                sealed += r.sealed_len;
                if let Some(at) = r.segment {
                    *live.entry(at.generation).or_insert(0u64) += 1;
                }
            }
            *counts.entry(r.state()).or_insert(0i64) += 1;
        }
        inner.usage.set_stored(sealed, &counts);
        // Segments of the last run that no object needs any more.
        for (generation, _) in journal::segments(&inner.journal_dir)? {
            if !live.contains_key(&generation) {
                journal::remove_segment(&inner.journal_dir, generation)?;
            }
        }
        inner.live = Mutex::new(live);
        let inner = Arc::new(inner);
        let (tx, rx) = mpsc::channel();
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("spool-checkpoint".into())
            .spawn(move || run_checkpointer(&weak, &rx))
            .ctx("start the checkpointer thread", &inner.journal_dir)?;
        *lock(&inner.checkpoint) = Some(tx);
        Ok(Self { inner })
    }

    /// Registers `gateway_spool_objects{state}` and `gateway_spool_bytes`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.usage.register(registry);
    }

    /// Cleans what a crash left behind: partial files and orphan blobs (blobs whose index
    /// entry was never committed, so whose sender never got a success status).
    pub fn recover(&self) -> Result<Recovered, SpoolError> {
        let inner = &self.inner;
        let mut rec = Recovered::default();
        for entry in fs::read_dir(&inner.tmp).ctx("list", &inner.tmp)? {
            let path = entry.ctx("list", &inner.tmp)?.path();
            fs::remove_file(&path).ctx("remove partial", &path)?;
            rec.partial_files_removed += 1;
        }
        for (path, id) in self.blob_files()? {
            // A blob whose record still points into the journal is a move-out of a dead
            // letter that a crash interrupted before the index said so.
            let needed = match id {
                Some(id) => inner.index.get(&id)?.is_some_and(|r| r.segment.is_none()),
                None => false,
            };
            match needed {
                true => {}
                false => {
                    fs::remove_file(&path).ctx("remove orphan", &path)?;
                    rec.orphan_blobs_removed += 1;
                }
            }
        }
        // A crash between "sent everywhere" and deleting the blob leaves the blob behind
        // (blobs kept on purpose by `keep_sent_for` stay until they expire).
        if self.keep_sent_ms() == 0 {
            rec.sent_blobs_reclaimed = self.reclaim_cached(|_| true)?;
        }
        if rec != Recovered::default() {
            durable::sync_dir(&inner.blobs)?;
            info!(
                partial_files = rec.partial_files_removed,
                orphan_blobs = rec.orphan_blobs_removed,
                sent_blobs = rec.sent_blobs_reclaimed,
                "spool recovery removed leftovers of an interrupted ingest (their senders got no success status)"
            );
        }
        Ok(rec)
    }

    /// Starts receiving one object. Fails with [`SpoolError::Full`] under disk pressure.
    pub fn begin(&self, meta: ObjectMeta) -> Result<Ingest, SpoolError> {
        let inner = &self.inner;
        let keys = inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        self.check_free_or_evict()?;
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).map_err(|_| seal::SealError::Random)?;
        let sealer = seal::Sealer::new(&keys.master, &id)?;
        let tmp_path = inner.tmp.join(format!("{}.part", hex::encode(id)));
        let file = durable::create_new_private(&tmp_path)?;
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        out.write_all(sealer.header()).ctx("write", &tmp_path)?;
        let reservation = inner.usage.reserve(seal::HEADER_LEN as u64)?;
        Ok(Ingest {
            spool: self.clone(),
            id,
            meta,
            tmp_path,
            out: Some(out),
            sealer: Some(sealer),
            mac: keys.mac(),
            plain_len: 0,
            reservation,
            study: None,
        })
    }

    /// Stores HL7 messages as one group: each is sealed in memory, then one frame holding
    /// all of them (sealed bytes and index records) is appended to the journal and
    /// fdatasync'd. Only after this returns `Ok` for a message may its sender be told
    /// "accepted"; the checkpointer thread writes the blobs and index entries soon after
    /// ([`Spool::settle`] waits for it). A message whose key is already stored, journaled or
    /// earlier in the group is a [`Committed::Duplicate`] and stores nothing.
    pub fn store_messages(&self, items: &[MessageIn]) -> Vec<Result<Committed, SpoolError>> {
        match self.store_group(items) {
            Ok(results) => results,
            Err(e) => {
                let text = e.to_string();
                warn!(messages = items.len(), error = %text, "HL7 group commit failed");
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
    ) -> Result<Vec<Result<Committed, SpoolError>>, SpoolError> {
        let inner = &self.inner;
        let keys = inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        self.check_free_or_evict()?;
        let mut results: Vec<Result<Committed, SpoolError>> = Vec::with_capacity(items.len());
        let mut entries: Vec<journal::Entry> = Vec::new();
        let mut reservations: Vec<usage::Reservation> = Vec::new();
        for item in items {
            let uid_mac = keys.labelled_mac(b"hl7\0", &item.key);
            if let Some(e) = entries.iter().find(|e| e.record.uid_mac == uid_mac) {
                results.push(Ok(Committed::Duplicate(e.id)));
                continue;
            }
            if let Some(id) = self.stored_message(&uid_mac)? {
                results.push(Ok(Committed::Duplicate(id)));
                continue;
            }
            match self.seal_message(keys, item, uid_mac) {
                Ok((entry, reservation)) => {
                    results.push(Ok(Committed::Stored(entry.id)));
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
    fn stored_message(&self, uid_mac: &Mac) -> Result<Option<ObjectId>, SpoolError> {
        if let Some(id) = lock(&self.inner.pending).get(uid_mac) {
            return Ok(Some(*id));
        }
        Ok(self.inner.index.ids_for_uid(uid_mac)?.first().copied())
    }

    /// Seals one message in memory and reserves its space.
    fn seal_message(
        &self,
        keys: &Keys,
        item: &MessageIn,
        uid_mac: Mac,
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
            let mut id = [0u8; 16];
            getrandom::getrandom(&mut id).map_err(|_| seal::SealError::Random)?;
            let mut sealer = seal::Sealer::new(&keys.master, &id)?;
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
            kind: ObjectKind::Hl7,
            sop_class_uid: item.message_type.chars().take(32).collect(),
            transfer_syntax_uid: item.charset.clone(),
            source: item.source.clone(),
            plain_len,
            sealed_len,
            received_unix_ms: unix_ms(),
            uid_mac,
            content_mac: mac.finalize().into_bytes().into(),
            destinations: inner.queue_for(ObjectKind::Hl7),
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
        let uid_mac = keys.labelled_mac(b"hl7\0", key);
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

    /// Counts by state and destination, bytes and oldest age. Scans the index.
    pub fn status(&self) -> Result<Status, SpoolError> {
        self.settle(SETTLE_WAIT);
        let mut by_state: BTreeMap<String, u64> = ["received", "queued", "sent", "failed"]
            .into_iter()
            .map(|s| (s.to_string(), 0))
            .collect();
        let mut by_destination: BTreeMap<String, DestinationCounts> = self
            .inner
            .destinations
            .iter()
            .map(|d| (d.name.clone(), DestinationCounts::default()))
            .collect();
        let (mut objects, mut bytes, mut oldest) = (0u64, 0u64, None::<u64>);
        let mut oldest_queued: BTreeMap<String, u64> = BTreeMap::new();
        for entry in self.inner.index.records() {
            let (_, r) = entry?;
            objects += 1;
            if !r.blob_deleted {
                bytes += r.sealed_len;
            }
            let state = r.state();
            *by_state.entry(state.to_string()).or_default() += 1;
            if state == "queued" || state == "received" {
                oldest = Some(oldest.map_or(r.received_unix_ms, |o| o.min(r.received_unix_ms)));
            }
            for d in &r.destinations {
                let c = by_destination.entry(d.name.clone()).or_default();
                match d.state {
                    DeliveryState::Queued => {
                        c.queued += 1;
                        let o = oldest_queued.entry(d.name.clone()).or_insert(u64::MAX);
                        *o = (*o).min(r.received_unix_ms);
                    }
                    DeliveryState::Sent => c.sent += 1,
                    DeliveryState::Failed { .. } => c.failed += 1,
                }
            }
        }
        let errors = self
            .inner
            .destination_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, error) in errors {
            by_destination.entry(name).or_default().last_error = Some(error);
        }
        let now = unix_ms();
        let age = |ms: u64| now.saturating_sub(ms) as f64 / 1000.0;
        for (name, ms) in oldest_queued {
            by_destination
                .entry(name)
                .or_default()
                .oldest_queued_age_seconds = Some(age(ms));
        }
        Ok(Status {
            objects,
            bytes,
            by_state,
            by_destination,
            oldest_age_seconds: oldest.map(age),
        })
    }

    /// Writes the newest object stored under `sop_instance_uid` to `out` (plaintext).
    pub fn export<W: Write>(
        &self,
        sop_instance_uid: &str,
        out: &mut W,
    ) -> Result<Record, SpoolError> {
        let keys = self.inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        let mut newest: Option<(ObjectId, Record)> = None;
        for id in self
            .inner
            .index
            .ids_for_uid(&keys.uid_mac(sop_instance_uid))?
        {
            if let Some(r) = self.inner.index.get(&id)?
                && newest.as_ref().is_none_or(|(_, n)| r.sequence > n.sequence)
            {
                newest = Some((id, r));
            }
        }
        let (id, record) = newest.ok_or(SpoolError::NotFound)?;
        self.unseal(&id, &record, out)?;
        Ok(record)
    }

    /// Checks that index and blobs agree and that every blob unseals to the content the
    /// index recorded. Changes nothing.
    pub fn verify(&self) -> Result<VerifyReport, SpoolError> {
        self.settle(SETTLE_WAIT);
        let inner = &self.inner;
        let keys = inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        let mut report = VerifyReport::default();
        for entry in inner.index.records() {
            let (id, record) = entry?;
            report.objects += 1;
            if record.blob_deleted {
                // Uploaded everywhere and reclaimed: nothing left to check.
                report.ok += 1;
                continue;
            }
            let mut sink = MacWriter(keys.mac());
            match self.unseal(&id, &record, &mut sink) {
                Ok(())
                    if <[u8; 32]>::from(sink.0.finalize().into_bytes()) == record.content_mac =>
                {
                    report.ok += 1
                }
                Ok(()) => {
                    warn!(object = %hex::encode(id), "blob content does not match its index entry");
                    report.unseal_failures += 1;
                }
                Err(SpoolError::MissingBlob { .. }) => {
                    warn!(object = %hex::encode(id), "index entry without blob");
                    report.dangling_entries += 1;
                }
                Err(e) => {
                    warn!(object = %hex::encode(id), error = %e, "blob does not unseal");
                    report.unseal_failures += 1;
                }
            }
        }
        for (path, id) in self.blob_files()? {
            let known = match id {
                Some(id) => inner.index.contains(&id)?,
                None => false,
            };
            if !known {
                warn!(path = %path.display(), "blob without index entry");
                report.orphan_blobs += 1;
            }
        }
        report.partial_files = fs::read_dir(&inner.tmp).ctx("list", &inner.tmp)?.count() as u64;
        Ok(report)
    }

    /// Up to `limit` objects queued for `destination`, oldest first.
    pub fn queued(&self, destination: &str, limit: usize) -> Result<Vec<ObjectId>, SpoolError> {
        Ok(self.inner.index.queued(destination, limit)?)
    }

    /// The keyed MAC of an object's Study Instance UID (None: unknown or without one).
    /// Objects with equal keys belong to one study.
    pub fn study_key(&self, id: &ObjectId) -> Result<Option<Mac>, SpoolError> {
        Ok(self.inner.index.study_of(id)?)
    }

    /// A stored object's record and plaintext (for upload: the whole object in memory).
    pub fn read(&self, id: &ObjectId) -> Result<(Record, Vec<u8>), SpoolError> {
        let record = self.inner.index.get(id)?.ok_or(SpoolError::NotFound)?;
        let mut plain = Vec::with_capacity(usize::try_from(record.plain_len).unwrap_or(0));
        self.unseal(id, &record, &mut plain)?;
        Ok((record, plain))
    }

    /// The destination confirmed the object. When every destination has, the blob is
    /// deleted (its record stays, for dedupe and status), or kept for `keep_sent_for`.
    pub fn mark_sent(&self, id: &ObjectId, destination: &str) -> Result<(), SpoolError> {
        self.mark_sent_all(std::slice::from_ref(id), destination)
    }

    /// [`Spool::mark_sent`] for several objects with one index flush for the states and
    /// one for the reclaimed blobs (the uplink confirms a whole STOW response at once).
    pub fn mark_sent_all(&self, ids: &[ObjectId], destination: &str) -> Result<(), SpoolError> {
        let inner = &self.inner;
        let now = unix_ms();
        let mut completed = Vec::new();
        for id in ids {
            let Some((before, record)) =
                inner
                    .index
                    .set_delivery(id, destination, DeliveryState::Sent, Some(now), false)?
            else {
                return Err(SpoolError::NotFound);
            };
            inner.usage.transition(before, record.state());
            if record.state() == "sent" && !record.blob_deleted {
                completed.push((*id, record.sealed_len));
            }
        }
        inner.index.flush()?;
        if self.keep_sent_ms() == 0 {
            self.delete_blobs(&completed)?;
        }
        Ok(())
    }

    /// Keeps blobs of objects every destination confirmed for `keep` (a local cache),
    /// deleted by [`Spool::reclaim_expired`] or, under disk pressure, at once.
    pub fn set_keep_sent_for(&self, keep: Duration) {
        let ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        self.inner.keep_sent_ms.store(ms, Ordering::Relaxed);
    }

    fn keep_sent_ms(&self) -> u64 {
        self.inner.keep_sent_ms.load(Ordering::Relaxed)
    }

    /// Deletes kept blobs whose `keep_sent_for` has passed. Returns how many.
    pub fn reclaim_expired(&self) -> Result<u64, SpoolError> {
        let now = unix_ms();
        let keep = self.keep_sent_ms();
        self.reclaim_cached(|done| done.saturating_add(keep) <= now)
    }

    /// Deletes kept blobs as their `keep_sent_for` passes, until `shutdown` turns true.
    /// Checks every quarter of `keep_sent_for` (1 s .. 60 s).
    pub async fn run_retention(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let keep = Duration::from_millis(self.keep_sent_ms());
        let period = (keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                () = tokio::time::sleep(period) => {}
            }
            let spool = self.clone();
            match tokio::task::spawn_blocking(move || spool.reclaim_expired()).await {
                Ok(Ok(0)) | Err(_) => {}
                Ok(Ok(n)) => info!(blobs = n, "deleted local copies past spool.keep_sent_for"),
                Ok(Err(e)) => warn!(error = %e, "cannot delete expired local copies"),
            }
        }
    }

    /// The free-space floor, after deleting cached copies if that is what it takes.
    fn check_free_or_evict(&self) -> Result<(), SpoolError> {
        let usage = &self.inner.usage;
        if let Err(full) = usage.check_free() {
            if self.evict_cached()? == 0 {
                return Err(full);
            }
            usage.check_free()?;
        }
        Ok(())
    }

    /// Disk pressure: deletes every kept blob (the cache yields to new objects). Without
    /// `keep_sent_for` there is no cache (`recover` removed any at start): no index scan.
    fn evict_cached(&self) -> Result<u64, SpoolError> {
        if self.keep_sent_ms() == 0 {
            return Ok(0);
        }
        let evicted = self.reclaim_cached(|_| true)?;
        if evicted > 0 {
            info!(
                blobs = evicted,
                "disk pressure: deleted locally cached copies of uploaded objects"
            );
        }
        Ok(evicted)
    }

    fn reclaim_cached(&self, expired: impl Fn(u64) -> bool) -> Result<u64, SpoolError> {
        let due: Vec<(ObjectId, u64)> = self
            .inner
            .index
            .records()
            .filter_map(Result::ok)
            .filter(|(_, r)| r.state() == "sent" && !r.blob_deleted)
            .filter(|(_, r)| expired(r.completed_unix_ms.unwrap_or(0)))
            .map(|(id, r)| (id, r.sealed_len))
            .collect();
        self.delete_blobs(&due)?;
        Ok(due.len() as u64)
    }

    /// Deletes the blobs of fully sent objects: unlink all, one directory fsync, then mark
    /// them deleted in the index. A crash in between leaves records whose blob is gone or
    /// still there; `recover` finishes either way.
    fn delete_blobs(&self, done: &[(ObjectId, u64)]) -> Result<(), SpoolError> {
        if done.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let mut segments: BTreeMap<u64, u64> = BTreeMap::new();
        let mut files = false;
        for (id, _) in done {
            if let Some(at) = inner.index.get(id)?.and_then(|r| r.segment) {
                // Journal-resident: its segment goes when no object needs it any more.
                *segments.entry(at.generation).or_default() += 1;
                continue;
            }
            files = true;
            let path = self.blob_path(id);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => Err::<(), _>(e).ctx("remove", &path)?,
            }
        }
        if files {
            durable::sync_dir(&inner.blobs)?;
        }
        for (id, sealed_len) in done {
            inner.index.set_blob_deleted(id)?;
            inner.usage.release_stored(*sealed_len);
        }
        inner.index.flush()?;
        for (generation, n) in segments {
            inner.release_segment(generation, n);
        }
        Ok(())
    }

    /// A dead letter may wait for an operator for weeks: its sealed bytes move out of their
    /// journal segment into `blobs/` (written, synced, then the index updated and flushed),
    /// so that it does not keep the whole segment on disk.
    fn move_out_of_journal(&self, id: &ObjectId) -> Result<(), SpoolError> {
        let inner = &self.inner;
        let Some(record) = inner.index.get(id)? else {
            return Ok(());
        };
        let Some(at) = record.segment.filter(|_| !record.blob_deleted) else {
            return Ok(());
        };
        let segment = journal::segment_path(&inner.journal_dir, at.generation);
        let sealed = journal::read_sealed(&inner.journal_dir, at, record.sealed_len)
            .ctx("read", &segment)?;
        let tmp_path = inner.tmp.join(format!("{}.part", hex::encode(id)));
        let _ = fs::remove_file(&tmp_path);
        let mut file = durable::create_new_private(&tmp_path)?;
        file.write_all(&sealed).ctx("write", &tmp_path)?;
        file.sync_data().ctx("sync", &tmp_path)?;
        drop(file);
        let final_path = self.blob_path(id);
        fs::rename(&tmp_path, &final_path).ctx("rename into place", &final_path)?;
        durable::sync_dir(&inner.blobs)?;
        inner.index.clear_segment(id)?;
        inner.release_segment(at.generation, 1);
        Ok(())
    }

    /// The destination refused the object for good: dead letter, with the reason.
    pub fn mark_failed(
        &self,
        id: &ObjectId,
        destination: &str,
        reason: &str,
    ) -> Result<(), SpoolError> {
        let reason: String = reason.chars().take(200).collect();
        self.set_delivery(id, destination, DeliveryState::Failed { reason })?;
        self.move_out_of_journal(id)
    }

    /// Puts dead letters (of one destination, or all) back in the queue. Returns how many.
    pub fn retry_failed(&self, destination: Option<&str>) -> Result<u64, SpoolError> {
        let mut moved = 0;
        let failed: Vec<(ObjectId, String)> = self
            .inner
            .index
            .records()
            .filter_map(Result::ok)
            .flat_map(|(id, r)| {
                r.destinations
                    .into_iter()
                    .filter(|d| matches!(d.state, DeliveryState::Failed { .. }))
                    .map(move |d| (id, d.name))
            })
            .filter(|(_, name)| destination.is_none_or(|want| want == name))
            .collect();
        for (id, name) in failed {
            self.set_delivery(&id, &name, DeliveryState::Queued)?;
            moved += 1;
        }
        Ok(moved)
    }

    fn set_delivery(
        &self,
        id: &ObjectId,
        destination: &str,
        state: DeliveryState,
    ) -> Result<(), SpoolError> {
        if state == DeliveryState::Sent {
            return self.mark_sent(id, destination);
        }
        let inner = &self.inner;
        let Some((before, record)) =
            inner
                .index
                .set_delivery(id, destination, state, None, true)?
        else {
            return Err(SpoolError::NotFound);
        };
        inner.usage.transition(before, record.state());
        Ok(())
    }

    /// Records (or clears) why uploads to `destination` are failing, for `spool status`.
    pub fn set_destination_error(&self, destination: &str, error: Option<String>) {
        let mut errors = self
            .inner
            .destination_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match error {
            Some(e) => errors.insert(destination.to_string(), e),
            None => errors.remove(destination),
        };
    }

    /// A receiver that changes whenever an object is committed (uplink workers wait on it).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.committed.subscribe()
    }

    /// The spool folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn blob_path(&self, id: &ObjectId) -> PathBuf {
        self.inner.blob_path(id)
    }

    fn unseal<W: Write>(
        &self,
        id: &ObjectId,
        record: &Record,
        out: &mut W,
    ) -> Result<(), SpoolError> {
        let keys = self.inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        if record.blob_deleted {
            return Err(SpoolError::Reclaimed {
                id: hex::encode(id),
            });
        }
        if let Some(at) = record.segment {
            let path = journal::segment_path(&self.inner.journal_dir, at.generation);
            let sealed = journal::read_sealed(&self.inner.journal_dir, at, record.sealed_len)
                .map_err(|e| unreadable(id, "read", path, e))?;
            return seal::open(&keys.master, sealed.as_slice(), record.sealed_len, out)
                .map(|_| ())
                .map_err(|source| SpoolError::Open {
                    id: hex::encode(id),
                    source,
                });
        }
        let path = self.blob_path(id);
        let file = File::open(&path).map_err(|e| unreadable(id, "open", path.clone(), e))?;
        let len = file.metadata().ctx("stat", &path)?.len();
        if len != record.sealed_len {
            return Err(SpoolError::Open {
                id: hex::encode(id),
                source: seal::SealError::Truncated.into(),
            });
        }
        seal::open(
            &keys.master,
            std::io::BufReader::with_capacity(256 * 1024, file),
            len,
            out,
        )
        .map(|_| ())
        .map_err(|source| SpoolError::Open {
            id: hex::encode(id),
            source,
        })
    }

    /// Every file in `blobs/` with the id its name encodes (None for a foreign name).
    fn blob_files(&self) -> Result<Vec<(PathBuf, Option<ObjectId>)>, SpoolError> {
        let dir = &self.inner.blobs;
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).ctx("list", dir)? {
            let path = entry.ctx("list", dir)?.path();
            let id = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".blob"))
                .and_then(|h| hex::decode(h).ok())
                .and_then(|v| ObjectId::try_from(v.as_slice()).ok());
            out.push((path, id));
        }
        Ok(out)
    }
}

/// One object being received. Dropping it without [`Ingest::commit`] discards it.
pub struct Ingest {
    spool: Spool,
    id: ObjectId,
    meta: ObjectMeta,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    sealer: Option<seal::Sealer>,
    mac: HmacSha256,
    plain_len: u64,
    reservation: usage::Reservation,
    study: Option<String>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("id", &hex::encode(self.id))
            .field("plain_len", &self.plain_len)
            .finish_non_exhaustive()
    }
}

impl Ingest {
    /// The object's Study Instance UID (kept only as a keyed MAC, to batch uploads).
    pub fn set_study_instance_uid(&mut self, uid: &str) {
        self.study = Some(uid.to_string());
    }

    /// Seals and writes the next plaintext bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        let (Some(out), Some(sealer)) = (self.out.as_mut(), self.sealer.as_mut()) else {
            return Ok(());
        };
        let usage = &self.spool.inner.usage;
        if let Err(full) = usage.grow(&mut self.reservation, data.len() as u64) {
            if self.spool.evict_cached()? == 0 {
                return Err(full);
            }
            usage.grow(&mut self.reservation, data.len() as u64)?;
        }
        self.mac.update(data);
        self.plain_len += data.len() as u64;
        sealer.update(data, out).ctx("write", &self.tmp_path)?;
        Ok(())
    }

    /// Bytes of plaintext written so far.
    pub fn len(&self) -> u64 {
        self.plain_len
    }

    pub fn is_empty(&self) -> bool {
        self.plain_len == 0
    }

    /// Makes the object durable: seal the last chunk, fsync, rename, fsync the directory,
    /// commit and flush the index. Only after `Ok` may the sender be told "success".
    pub fn commit(mut self) -> Result<Committed, SpoolError> {
        let inner = Arc::clone(&self.spool.inner);
        let keys = inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        let (Some(mut out), Some(sealer)) = (self.out.take(), self.sealer.take()) else {
            return Err(SpoolError::NoKey);
        };
        sealer.finish(&mut out).ctx("write", &self.tmp_path)?;
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx("write", &self.tmp_path)?;
        let content_mac: Mac = self.mac.clone().finalize().into_bytes().into();
        let uid_mac = keys.uid_mac(&self.meta.sop_instance_uid);
        if let Some(existing) = inner.index.find_duplicate(&uid_mac, &content_mac)? {
            drop(file);
            fs::remove_file(&self.tmp_path).ctx("remove duplicate", &self.tmp_path)?;
            return Ok(Committed::Duplicate(existing));
        }
        let started = Instant::now();
        file.sync_data().ctx("sync", &self.tmp_path)?;
        drop(file);
        inner.usage.observe(Step::SyncBlob, started);
        let sealed_len = seal::sealed_len(self.plain_len);
        let final_path = self.spool.blob_path(&self.id);
        let started = Instant::now();
        fs::rename(&self.tmp_path, &final_path).ctx("rename into place", &final_path)?;
        durable::sync_dir(&inner.blobs)?;
        inner.usage.observe(Step::Publish, started);
        let record = Record {
            kind: ObjectKind::Dicom,
            sop_class_uid: self.meta.sop_class_uid.clone(),
            transfer_syntax_uid: self.meta.transfer_syntax_uid.clone(),
            source: self.meta.source.clone(),
            plain_len: self.plain_len,
            sealed_len,
            received_unix_ms: unix_ms(),
            uid_mac,
            content_mac,
            destinations: inner.queue_for(ObjectKind::Dicom),
            blob_deleted: false,
            sequence: inner.index.next_sequence()?,
            study_mac: self.study.as_deref().map(|uid| keys.study_mac(uid)),
            completed_unix_ms: None,
            segment: None,
        };
        let started = Instant::now();
        let inserted = inner.index.insert_durable(&self.id, &record);
        inner.usage.observe(Step::Index, started);
        match inserted {
            Ok(Inserted::New) => {
                inner
                    .usage
                    .commit(&mut self.reservation, sealed_len, record.state());
                inner.committed.send_modify(|n| *n = n.wrapping_add(1));
                Ok(Committed::Stored(self.id))
            }
            Ok(Inserted::Duplicate(existing)) => {
                // A concurrent identical ingest won the race; ours is redundant.
                durable::remove_durably(&final_path)?;
                Ok(Committed::Duplicate(existing))
            }
            Err(e) => {
                // Not indexed: the blob is an orphan; remove it now rather than at next start.
                let _ = fs::remove_file(&final_path);
                Err(e.into())
            }
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if self.out.take().is_some()
            && let Err(e) = fs::remove_file(&self.tmp_path)
        {
            warn!(path = %self.tmp_path.display(), error = %e, "could not remove partial object");
        }
        self.spool.inner.usage.release(&mut self.reservation);
    }
}

struct MacWriter(HmacSha256);

impl Write for MacWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_keystore::KEY_LEN;

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
