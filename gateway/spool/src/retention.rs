//! Retention: how long the local copy of an object every destination confirmed stays.
//!
//! `spool.keep_sent_for` keeps such blobs as a local cache ([`Spool::set_keep_sent_for`]);
//! [`Spool::run_retention`] deletes them as it passes, and disk pressure evicts the whole
//! cache before a new object is refused ([`SpoolError::Full`]). With no cache configured a
//! blob goes as soon as the last destination confirms it. Deleting unlinks the blobs, syncs
//! `blobs/` once, then marks the records (journal-resident messages release their segment).

use std::collections::BTreeMap;
use std::fs;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gateway_durable::{self as durable, Context};
use tracing::{info, warn};

use crate::{ObjectId, Spool, SpoolError, unix_ms};

impl Spool {
    /// Keeps blobs of objects every destination confirmed for `keep` (a local cache),
    /// deleted by [`Spool::reclaim_expired`] or, under disk pressure, at once.
    pub fn set_keep_sent_for(&self, keep: Duration) {
        let ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        self.inner.keep_sent_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn keep_sent_ms(&self) -> u64 {
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
    pub(crate) fn check_free_or_evict(&self) -> Result<(), SpoolError> {
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
    pub(crate) fn evict_cached(&self) -> Result<u64, SpoolError> {
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

    pub(crate) fn reclaim_cached(&self, expired: impl Fn(u64) -> bool) -> Result<u64, SpoolError> {
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
    pub(crate) fn delete_blobs(&self, done: &[(ObjectId, u64)]) -> Result<(), SpoolError> {
        if done.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        // The index says "deleted" (flushed) before any file goes: a crash in between leaves
        // a blob its record no longer needs, which `recover` removes at the next start. The
        // other order left records pointing at removed files (`verify`: dangling entries).
        let mut segments: BTreeMap<u64, u64> = BTreeMap::new();
        let mut files = Vec::new();
        for (id, sealed_len) in done {
            if let Some(at) = inner.index.get(id)?.and_then(|r| r.segment) {
                // Journal-resident: its segment goes when no object needs it any more.
                *segments.entry(at.generation).or_default() += 1;
            } else {
                files.push(self.blob_path(id));
            }
            inner.index.set_blob_deleted(id)?;
            inner.usage.release_stored(*sealed_len);
        }
        inner.index.flush()?;
        for path in &files {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => Err::<(), _>(e).ctx("remove", path)?,
            }
        }
        if !files.is_empty() {
            durable::sync_dir(&inner.blobs)?;
        }
        for (generation, n) in segments {
            inner.release_segment(generation, n);
        }
        Ok(())
    }
}
