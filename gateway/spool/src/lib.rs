//! The spool: the only writer of patient data to disk, and it writes only ciphertext.
//!
//! Every inbound object (DICOM today; HL7 and booking later) is streamed into an [`Ingest`],
//! sealed chunk by chunk with AES-256-GCM under a fresh per-object data key ([`seal`]), and
//! committed with [`Ingest::commit`]. Outbound workers drain it by destination.
//!
//! Module map (one `impl Spool` block per concern; this file holds the handle, its shared
//! state, [`Spool::open`] and the read path every concern uses):
//! - `ingest`: the write path of one DICOM object ([`Spool::begin`], [`Ingest`]).
//! - `groups`: HL7 and audit message groups: journal append, group commit, the
//!   checkpointer and the journal replay at open ([`Spool::store_messages`],
//!   [`Spool::store_audit_messages`], [`Spool::settle`]).
//! - `delivery`: per-destination queues, confirmations, dead letters and their retry
//!   ([`Spool::queued`], [`Spool::mark_sent`], [`Spool::mark_failed`],
//!   [`Spool::retry_failed`]).
//! - `retention`: `keep_sent_for`, blob deletion and eviction under disk pressure.
//! - `maintenance`: crash recovery, verify, status and export ([`Spool::recover`],
//!   [`Spool::verify`], [`Spool::status`]).
//! - [`seal`]: the sealed blob format (chunked AES-256-GCM, STREAM construction).
//! - [`index`]: object records and delivery state in sled, behind a small interface.
//! - `ids`: [`ObjectId`] and the keyed MACs [`UidMac`], [`ContentMac`], [`StudyMac`]: one
//!   type each, encoded as the bare bytes they always were.
//! - `usage`: byte accounting and the disk-pressure guard.
//! - `journal`: the on-disk format of the journal (segments and frames) of HL7 and audit
//!   messages and of DICOM objects up to [`JOURNAL_MAX_SEALED`] sealed.
//!
//! On disk, under `<data_dir>/spool/`:
//! - `tmp/<id>.part`: an object being received (deleted at start if a crash left it);
//! - `blobs/<id>.blob`: committed sealed DICOM objects over [`JOURNAL_MAX_SEALED`], and dead
//!   letters moved out of the journal;
//! - `index/`: the sled database, with the journal checkpoint mark;
//! - `journal/<generation>.wal`: HL7 and audit messages and small DICOM objects, in the
//!   groups they were acknowledged in (their records point there; what follows the
//!   checkpoint mark is replayed into `index/` when the spool opens); `journal/*.spare`: the
//!   next segment, being zero-filled.
//!
//! Invariants (the kill -9 tests in hw-tests pin them):
//! - [`Ingest::commit`] returns only after the object is durable: for one held in memory,
//!   the journal frame of its group (every object waiting for the journal when it was
//!   free) is appended and fdatasync'd (indexed behind, as HL7 groups are); for
//!   a streamed one, the blob is fsync'd, renamed into `blobs/`, the directory is fsync'd,
//!   and the index entry is committed and flushed. The caller sends its success status only
//!   after that (docs/adr/0015).
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

mod delivery;
mod groups;
mod ids;
pub mod index;
mod ingest;
mod journal;
mod maintenance;
mod retention;
pub mod seal;
mod tally;
mod usage;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway_durable::{self as durable, Context};
use gateway_keystore::{DerivedKey, KeyPurpose, MasterKey};
use hmac::{Hmac, Mac as _};
use prometheus_client::registry::Registry;
use sha2::Sha256;

pub use delivery::{Origin, Route};
pub use groups::{AuditIn, AuditStored, MessageIn};
use groups::{CheckpointJob, run_checkpointer};
pub use ids::{ContentMac, ObjectId, StudyMac, UidMac};
use index::Index;
pub use index::{DeliveryState, Destination, IndexError, Inserted, ObjectKind, Record};
pub use ingest::{GROUP_MAX_SEALED, Ingest, JOURNAL_MAX_SEALED, ObjectMeta};
pub use maintenance::{DestinationCounts, Recovered, Status, VerifyReport};
pub use usage::Limits;
use usage::Usage;

type HmacSha256 = Hmac<Sha256>;

/// `spool.index_cache_bytes` when none is given: sled's page cache for the index.
pub const DEFAULT_INDEX_CACHE_BYTES: u64 = 8 * 1024 * 1024;

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
    /// An object id (from a queue) without a record.
    #[error("object {id} is not in the spool")]
    UnknownObject { id: ObjectId },
    /// A delivery state change for an object that is unknown or not routed to
    /// `destination`.
    #[error("object {id} has no delivery to destination {destination}")]
    NoDelivery { id: ObjectId, destination: String },
    #[error("the group of messages could not be made durable: {detail}")]
    GroupCommit { detail: String },
    #[error("object {id} was uploaded to every destination and its local copy deleted")]
    Reclaimed { id: String },
    #[error("object {id} is in the index but its blob {path} is missing")]
    MissingBlob { id: String, path: PathBuf },
}

/// The outcome of a commit: both mean the object is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Stored(ObjectId),
    Duplicate(ObjectId),
}

/// Keys derived from the master key.
struct Keys {
    master: MasterKey,
    index_key: DerivedKey,
}

impl Keys {
    fn new(master: MasterKey) -> Self {
        let index_key = master.derive(KeyPurpose::SpoolIndex);
        Self { master, index_key }
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as hmac::Mac>::new_from_slice(self.index_key.expose())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    /// The MAC a DICOM object is looked up and deduplicated by.
    fn uid_mac(&self, uid: &str) -> UidMac {
        UidMac::from_bytes(self.labelled_mac(b"uid\0", uid))
    }

    /// The MAC an HL7 message is looked up and deduplicated by (its key: sending
    /// application, facility and MSH-10).
    fn message_key_mac(&self, key: &str) -> UidMac {
        UidMac::from_bytes(self.labelled_mac(b"hl7\0", key))
    }

    /// The MAC a journaled message of `kind` is deduplicated by: an HL7 message's key, or
    /// an audit message's `audit:{seq}`.
    fn journaled_key_mac(&self, kind: ObjectKind, key: &str) -> UidMac {
        match kind {
            ObjectKind::Audit => UidMac::from_bytes(self.labelled_mac(b"audit\0", key)),
            ObjectKind::Hl7 | ObjectKind::Dicom => self.message_key_mac(key),
        }
    }

    fn study_mac(&self, uid: &str) -> StudyMac {
        StudyMac::from_bytes(self.labelled_mac(b"study\0", uid))
    }

    /// The MAC of an object's plaintext, fed to `mac` (from [`Keys::mac`]).
    fn content_mac(mac: HmacSha256) -> ContentMac {
        ContentMac::from_bytes(mac.finalize().into_bytes().into())
    }

    fn labelled_mac(&self, label: &[u8], uid: &str) -> [u8; 32] {
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
    /// `spool.dedupe_window` in milliseconds: how long the record of an object every
    /// destination confirmed stays (a resend inside it is deduplicated).
    dedupe_window_ms: AtomicU64,
    journal_dir: PathBuf,
    journal: Mutex<journal::Writer>,
    /// Messages in the journal, not yet in the index: key MAC -> object id (dedupe).
    pending: Mutex<HashMap<UidMac, ObjectId>>,
    /// [`Spool::set_journal_max_sealed`]: the largest sealed DICOM object held in memory
    /// and committed through the journal.
    journal_max_sealed: AtomicU64,
    /// DICOM objects in the journal, not yet in the index: (UID MAC, content MAC) ->
    /// object id (dedupe; several versions of one instance may be stored).
    pending_content: Mutex<HashMap<(UidMac, ContentMac), ObjectId>>,
    /// DICOM objects waiting for the journal: the next commit to hold it appends them
    /// all as one frame ([`Spool::store_journaled_object`]).
    waiting: Mutex<Vec<groups::Waiting>>,
    /// Hands journaled groups to the checkpointer thread.
    checkpoint: Mutex<Option<mpsc::Sender<CheckpointJob>>>,
    /// Messages journaled / checkpointed since open ([`Spool::settle`]).
    journaled: AtomicU64,
    checkpointed: (Mutex<u64>, Condvar),
    /// Journal segment -> how many objects still need their sealed bytes there (not yet
    /// reclaimed). A segment the writer has left is deleted when its count reaches 0.
    live: Mutex<BTreeMap<u64, u64>>,
    /// Capped audit routes ([`Route::with_max_queued`]) -> how many objects they have
    /// queued (counted at open, then kept as objects are queued and leave the queue).
    capped: Mutex<HashMap<String, u64>>,
}

impl Inner {
    fn blob_path(&self, id: &ObjectId) -> PathBuf {
        self.blobs.join(format!("{}.blob", hex::encode(id)))
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

impl Spool {
    /// Opens (creating if needed) the spool under `data_dir/spool`, first applying any HL7
    /// messages the journal holds that a crash kept from reaching `blobs/` and the index
    /// (they were acknowledged). Call [`Spool::recover`] before accepting objects.
    /// Without a master key, only status and verify of structure are possible.
    /// The index cache is [`DEFAULT_INDEX_CACHE_BYTES`]; see [`Spool::open_with_cache`].
    pub fn open(
        data_dir: &Path,
        master: Option<MasterKey>,
        limits: Limits,
        destinations: Vec<Route>,
    ) -> Result<Self, SpoolError> {
        Self::open_with_cache(
            data_dir,
            master,
            limits,
            destinations,
            DEFAULT_INDEX_CACHE_BYTES,
        )
    }

    /// [`Spool::open`] with at most `index_cache_bytes` of page cache for the index
    /// (`spool.index_cache_bytes`): what the index holds in memory, whatever its size.
    pub fn open_with_cache(
        data_dir: &Path,
        master: Option<MasterKey>,
        limits: Limits,
        destinations: Vec<Route>,
        index_cache_bytes: u64,
    ) -> Result<Self, SpoolError> {
        let dir = data_dir.join("spool");
        let blobs = dir.join("blobs");
        let tmp = dir.join("tmp");
        for d in [&dir, &blobs, &tmp] {
            durable::ensure_private_dir(d)?;
        }
        let journal_dir = dir.join("journal");
        durable::ensure_private_dir(&journal_dir)?;
        journal::remove_spares(&journal_dir)?;
        let index = Index::open(&dir.join("index"), index_cache_bytes)?;
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
            dedupe_window_ms: AtomicU64::new(u64::MAX),
            journal: Mutex::new(journal::Writer::new(&journal_dir, 0)),
            journal_dir,
            dir,
            pending: Mutex::default(),
            pending_content: Mutex::default(),
            journal_max_sealed: AtomicU64::new(ingest::JOURNAL_MAX_SEALED),
            waiting: Mutex::default(),
            checkpoint: Mutex::new(None),
            journaled: AtomicU64::new(0),
            checkpointed: (Mutex::new(0), Condvar::new()),
            live: Mutex::default(),
            capped: Mutex::default(),
        };
        let newest = inner.replay_journal()?;
        inner.journal = Mutex::new(journal::Writer::new(&inner.journal_dir, newest));
        let mut sealed = 0;
        let mut live = BTreeMap::new();
        let mut capped: HashMap<String, u64> = inner
            .destinations
            .iter()
            .filter(|r| inner.max_queued(&r.name).is_some())
            .map(|r| (r.name.clone(), 0))
            .collect();
        inner.index.recount(|_, r| {
            for d in &r.destinations {
                if d.state == DeliveryState::Queued
                    && let Some(n) = capped.get_mut(&d.name)
                {
                    *n += 1;
                }
            }
            if !r.blob_deleted {
                sealed += r.sealed_len;
                if let Some(at) = r.segment {
                    *live.entry(at.generation).or_insert(0u64) += 1;
                }
            }
        })?;
        inner.usage.set_stored(sealed);
        // Segments of the last run that no object needs any more.
        for (generation, _) in journal::segments(&inner.journal_dir)? {
            if !live.contains_key(&generation) {
                journal::remove_segment(&inner.journal_dir, generation)?;
            }
        }
        inner.live = Mutex::new(live);
        let index_bytes = inner.index.size_on_disk()?;
        inner.index.tally().set_index_bytes(index_bytes);
        inner.capped = Mutex::new(capped);
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

    /// Registers `gateway_spool_objects{state}`, `gateway_spool_bytes`, the commit step
    /// histogram and the index's `gateway_spool_index_records` and
    /// `gateway_spool_index_bytes`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.usage.register(registry);
        self.inner.index.tally().register(registry);
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
}

/// Whether `data_dir` holds sealed objects (blob files or journal segments), without
/// opening the spool.
pub fn holds_sealed_objects(data_dir: &Path) -> bool {
    let spool = data_dir.join("spool");
    let blobs = std::fs::read_dir(spool.join("blobs")).is_ok_and(|mut d| d.next().is_some());
    blobs || journal::segments(&spool.join("journal")).is_ok_and(|s| !s.is_empty())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
