//! Maintenance: crash recovery at start, consistency checks, status and export.
//!
//! [`Spool::recover`] deletes what a crash left (partial files, orphan blobs whose sender
//! never got a success status, blobs of fully sent objects not yet deleted);
//! [`Spool::verify`] checks that index and blobs agree and that every blob unseals to the
//! content MAC its record holds, changing nothing; [`Spool::status`] counts objects by
//! state and destination; [`Spool::export`] writes a stored DICOM object back out.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;

use gateway_durable::{self as durable, Context};
use hmac::Mac as _;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::tally::{Counts, STATES};
use crate::{HmacSha256, Keys, ObjectId, Record, SETTLE_WAIT, Spool, SpoolError, unix_ms};

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

impl Spool {
    /// Cleans what a crash left behind: partial files and orphan blobs (blobs whose index
    /// entry was never committed, so whose sender never got a success status, and blobs
    /// whose entry already says deleted).
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
            // letter that a crash interrupted before the index said so; one whose record says
            // deleted is a deletion a crash interrupted after the index said so.
            let needed = match id {
                Some(id) => inner
                    .index
                    .get(&id)?
                    .is_some_and(|r| r.segment.is_none() && !r.blob_deleted),
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

    /// Counts by state and destination, bytes and oldest age, from the counts the index
    /// keeps and the head of each queue: no scan, however many records the index holds.
    /// Objects stored but not yet in the index (HL7 messages behind the checkpointer)
    /// are waited for first.
    pub fn status(&self) -> Result<Status, SpoolError> {
        self.settle(SETTLE_WAIT);
        let index = &self.inner.index;
        let counts = index.tally().counts();
        let by_state: BTreeMap<String, u64> = STATES
            .into_iter()
            .map(|s| {
                let n = counts.by_state.get(s).copied().unwrap_or(0);
                (s.to_string(), Counts::get(n))
            })
            .collect();
        let mut by_destination: BTreeMap<String, DestinationCounts> = self
            .inner
            .destinations
            .iter()
            .map(|d| (d.name.clone(), DestinationCounts::default()))
            .collect();
        for (name, t) in &counts.by_destination {
            let c = by_destination.entry(name.clone()).or_default();
            (c.queued, c.sent, c.failed) = (
                Counts::get(t.queued),
                Counts::get(t.sent),
                Counts::get(t.failed),
            );
        }
        // Every queued object is in the queue of each destination it waits for, so the
        // oldest of them heads one of those queues.
        let mut oldest_queued: BTreeMap<String, u64> = BTreeMap::new();
        for (name, c) in &by_destination {
            if c.queued > 0
                && let Some(ms) = index.oldest_queued_ms(name)?
            {
                oldest_queued.insert(name.clone(), ms);
            }
        }
        let oldest = oldest_queued
            .values()
            .copied()
            .chain(counts.oldest_received_ms)
            .min();
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
            objects: Counts::get(counts.objects),
            bytes: self.inner.usage.stored(),
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
        self.settle(SETTLE_WAIT);
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
                Ok(()) if Keys::content_mac(sink.0) == record.content_mac => report.ok += 1,
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
