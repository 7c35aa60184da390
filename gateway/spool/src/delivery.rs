//! The delivery queues: which destinations an object is queued for, and what they said.
//!
//! Each [`Route`] (a destination and the kind of object it takes) has its own queue in the
//! index, oldest first ([`Spool::queued`]). Uplink workers read an object
//! ([`Spool::read`]), then confirm it ([`Spool::mark_sent`], [`Spool::mark_sent_all`]) or
//! dead-letter it ([`Spool::mark_failed`]); an operator puts dead letters back in the queue
//! with [`Spool::retry_failed`]. A dead letter's sealed bytes leave their journal segment
//! for `blobs/`, so that one refused message does not keep a whole segment on disk.

use std::fs;
use std::io::Write;

use gateway_durable::{self as durable, Context};

use crate::index::StudyMac;
use crate::{
    DeliveryState, Destination, Inner, ObjectId, ObjectKind, Record, Spool, SpoolError, journal,
    unix_ms,
};

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

impl Inner {
    /// The destinations a new object of `kind` is queued for.
    pub(crate) fn queue_for(&self, kind: ObjectKind) -> Vec<Destination> {
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

impl Spool {
    /// Up to `limit` objects queued for `destination`, oldest first.
    pub fn queued(&self, destination: &str, limit: usize) -> Result<Vec<ObjectId>, SpoolError> {
        Ok(self.inner.index.queued(destination, limit)?)
    }

    /// The keyed MAC of an object's Study Instance UID (None: unknown or without one).
    /// Objects with equal keys belong to one study.
    pub fn study_key(&self, id: &ObjectId) -> Result<Option<StudyMac>, SpoolError> {
        Ok(self.inner.index.study_of(id)?)
    }

    /// A stored object's record and plaintext (for upload: the whole object in memory).
    pub fn read(&self, id: &ObjectId) -> Result<(Record, Vec<u8>), SpoolError> {
        let record = self
            .inner
            .index
            .get(id)?
            .ok_or(SpoolError::UnknownObject { id: *id })?;
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
                return Err(SpoolError::NoDelivery {
                    id: *id,
                    destination: destination.to_string(),
                });
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
            return Err(SpoolError::NoDelivery {
                id: *id,
                destination: destination.to_string(),
            });
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
}
