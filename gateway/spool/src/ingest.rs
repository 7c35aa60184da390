//! Ingest: the write path of one DICOM object.
//!
//! [`Spool::begin`] reserves space; [`Ingest::write`] seals the plaintext chunk by chunk as
//! it arrives, in memory while the sealed object stays within [`JOURNAL_MAX_SEALED`], else
//! streamed to `tmp/<id>.part`. [`Ingest::commit`] seals the last chunk and makes the
//! object durable (docs/adr/0015):
//!
//! - an object held in memory is appended to the journal as one frame and `fdatasync`'d
//!   (one disk flush; the checkpointer indexes it behind the answer, as for HL7), with
//!   every object up to [`GROUP_MAX_SEALED`] that waited for the journal meanwhile; a
//!   larger one that finds the journal busy takes the blob path below;
//! - a streamed one is fsync'd, renamed into `blobs/`, the directory fsync'd and its index
//!   entry committed and flushed.
//!
//! Only then may the sender be told "success". An identical resend (same SOP Instance UID
//! and content) is a [`Committed::Duplicate`] that stores nothing. Dropping an [`Ingest`]
//! discards it.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, TryLockError};
use std::time::Instant;

use gateway_durable::{self as durable, Context};
use hmac::Mac as _;
use tracing::warn;

use crate::Origin;
use crate::usage::{self, Step};
use crate::{
    Committed, HmacSha256, Inserted, Keys, ObjectId, ObjectKind, Record, Spool, SpoolError,
    journal, seal, unix_ms,
};

/// By default, an object whose sealed bytes stay within this size is held in memory while
/// it arrives and goes to the journal at commit; a larger one streams to `tmp/` and
/// `blobs/`, so that no association holds more than this much of an object in memory.
pub const JOURNAL_MAX_SEALED: u64 = 2 * 1024 * 1024;

/// A journaled object up to this size (sealed) that finds the journal busy waits for it and
/// shares the next frame (group commit); a larger one takes the blob path instead. Measured
/// with four non-stalling associations (docs/adr/0015): 16x16 objects (~2 KiB) went 30 %
/// faster grouped, 0.5 MB ones 12 % slower (the journal hashes a group's bytes in turn).
pub const GROUP_MAX_SEALED: u64 = 256 * 1024;

/// Where an object's sealed bytes go while it arrives.
enum Sink {
    Memory(Vec<u8>),
    File(BufWriter<File>),
}

/// What the sender said about an incoming object.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax_uid: String,
    pub source: String,
}

impl Spool {
    /// Objects whose sealed bytes stay within `bytes` go through the journal (default
    /// [`JOURNAL_MAX_SEALED`]); larger ones stream to `blobs/`. 0: every object does.
    pub fn set_journal_max_sealed(&self, bytes: u64) {
        self.inner
            .journal_max_sealed
            .store(bytes, Ordering::Relaxed);
    }

    /// Starts receiving one object. Fails with [`SpoolError::Full`] under disk pressure.
    pub fn begin(&self, meta: ObjectMeta) -> Result<Ingest, SpoolError> {
        self.begin_from(meta, Origin::Local)
    }

    /// Starts receiving one result returned from the cloud: it queues only for the
    /// results destinations ([`Route::results_only`](crate::Route::results_only)).
    pub fn begin_result(&self, meta: ObjectMeta) -> Result<Ingest, SpoolError> {
        self.begin_from(meta, Origin::Result)
    }

    fn begin_from(&self, meta: ObjectMeta, origin: Origin) -> Result<Ingest, SpoolError> {
        let inner = &self.inner;
        let keys = inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        self.check_free_or_evict()?;
        let id = ObjectId::random().map_err(|_| seal::SealError::Random)?;
        let sealer = seal::Sealer::new(&keys.master, id.as_bytes())?;
        let tmp_path = inner.tmp.join(format!("{}.part", hex::encode(id)));
        let out = Sink::Memory(sealer.header().to_vec());
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
            origin,
        })
    }
}

/// One object being received. Dropping it without [`Ingest::commit`] discards it.
pub struct Ingest {
    spool: Spool,
    id: ObjectId,
    meta: ObjectMeta,
    tmp_path: PathBuf,
    out: Option<Sink>,
    sealer: Option<seal::Sealer>,
    mac: HmacSha256,
    plain_len: u64,
    reservation: usage::Reservation,
    study: Option<String>,
    origin: Origin,
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
        match out {
            Sink::Memory(sealed) => {
                sealer.update(data, sealed).ctx("seal", &self.tmp_path)?;
                let max = self.spool.inner.journal_max_sealed.load(Ordering::Relaxed);
                if sealed.len() as u64 > max {
                    // Too big to hold: stream the rest to tmp/.
                    *out = Sink::File(spill(&self.tmp_path, sealed)?);
                }
            }
            Sink::File(w) => sealer.update(data, w).ctx("write", &self.tmp_path)?,
        }
        Ok(())
    }

    /// Bytes of plaintext written so far.
    pub fn len(&self) -> u64 {
        self.plain_len
    }

    pub fn is_empty(&self) -> bool {
        self.plain_len == 0
    }

    /// Makes the object durable: seal the last chunk, then append it to the journal with
    /// one `fdatasync`, or (streamed) fsync, rename, fsync the directory, commit and flush
    /// the index. Only after `Ok` may the sender be told "success".
    pub fn commit(mut self) -> Result<Committed, SpoolError> {
        let inner = Arc::clone(&self.spool.inner);
        let keys = inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        let (Some(out), Some(sealer)) = (self.out.take(), self.sealer.take()) else {
            return Err(SpoolError::NoKey);
        };
        let out = match out {
            Sink::Memory(mut sealed) => {
                sealer.finish(&mut sealed).ctx("seal", &self.tmp_path)?;
                // Through the journal, in one group with every object waiting for it. A
                // larger object that finds the journal busy takes the blob path instead,
                // whose syncs run side by side: the journal hashes and writes a group's
                // bytes in turn (docs/adr/0015).
                if sealed.len() as u64 <= GROUP_MAX_SEALED {
                    return self.commit_journaled(keys, sealed, None);
                }
                match inner.journal.try_lock() {
                    Ok(journal) => return self.commit_journaled(keys, sealed, Some(journal)),
                    Err(TryLockError::Poisoned(p)) => {
                        return self.commit_journaled(keys, sealed, Some(p.into_inner()));
                    }
                    Err(TryLockError::WouldBlock) => spill(&self.tmp_path, &sealed)?,
                }
            }
            Sink::File(mut w) => {
                sealer.finish(&mut w).ctx("write", &self.tmp_path)?;
                w
            }
        };
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx("write", &self.tmp_path)?;
        let content_mac = Keys::content_mac(self.mac.clone());
        let uid_mac = keys.uid_mac(&self.meta.sop_instance_uid);
        if let Some(existing) = inner.stored_or_journaled(&uid_mac, &content_mac)? {
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
        let record = self.record(keys, uid_mac, content_mac, sealed_len)?;
        let started = Instant::now();
        let inserted = inner.index.insert_durable(&self.id, &record);
        inner.usage.observe(Step::Index, started);
        match inserted {
            Ok(Inserted::New) => {
                inner.usage.commit(&mut self.reservation, sealed_len);
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

impl Ingest {
    /// The index record of this object.
    fn record(
        &self,
        keys: &Keys,
        uid_mac: crate::index::UidMac,
        content_mac: crate::index::ContentMac,
        sealed_len: u64,
    ) -> Result<Record, SpoolError> {
        let inner = &self.spool.inner;
        Ok(Record {
            kind: ObjectKind::Dicom,
            sop_class_uid: self.meta.sop_class_uid.clone(),
            transfer_syntax_uid: self.meta.transfer_syntax_uid.clone(),
            source: self.meta.source.clone(),
            plain_len: self.plain_len,
            sealed_len,
            received_unix_ms: unix_ms(),
            uid_mac,
            content_mac,
            destinations: inner.queue_for(self.origin, ObjectKind::Dicom, None),
            blob_deleted: false,
            sequence: inner.index.next_sequence()?,
            study_mac: self.study.as_deref().map(|uid| keys.study_mac(uid)),
            completed_unix_ms: None,
            segment: None,
        })
    }

    /// Commits an object held in memory through the journal (one frame and one
    /// `fdatasync` for the group it joins); the checkpointer indexes it behind the answer.
    /// `held`: the journal, when the caller holds it already.
    fn commit_journaled(
        mut self,
        keys: &Keys,
        sealed: Vec<u8>,
        held: Option<MutexGuard<'_, journal::Writer>>,
    ) -> Result<Committed, SpoolError> {
        let content_mac = Keys::content_mac(self.mac.clone());
        let uid_mac = keys.uid_mac(&self.meta.sop_instance_uid);
        let record = self.record(keys, uid_mac, content_mac, sealed.len() as u64)?;
        let entry = journal::Entry {
            id: self.id,
            record,
            sealed,
        };
        let reservation = std::mem::take(&mut self.reservation);
        self.spool.store_journaled_object(entry, reservation, held)
    }
}

/// Creates `tmp_path` and writes the sealed bytes held so far to it: the object continues
/// on the blob path.
fn spill(tmp_path: &std::path::Path, sealed: &[u8]) -> Result<BufWriter<File>, SpoolError> {
    let file = durable::create_new_private(tmp_path)?;
    let mut w = BufWriter::with_capacity(256 * 1024, file);
    w.write_all(sealed).ctx("write", tmp_path)?;
    Ok(w)
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if matches!(self.out.take(), Some(Sink::File(_)))
            && let Err(e) = fs::remove_file(&self.tmp_path)
        {
            warn!(path = %self.tmp_path.display(), error = %e, "could not remove partial object");
        }
        self.spool.inner.usage.release(&mut self.reservation);
    }
}
