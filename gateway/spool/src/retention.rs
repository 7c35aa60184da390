//! Retention: how long the local copy, and then the record, of an object every destination
//! confirmed stays.
//!
//! `spool.keep_sent_for` keeps such blobs as a local cache ([`Spool::set_keep_sent_for`]);
//! [`Spool::run_housekeeping`] deletes them as it passes, and disk pressure evicts the whole
//! cache before a new object is refused ([`SpoolError::Full`]). With no cache configured a
//! blob goes as soon as the last destination confirms it. Deleting unlinks the blobs, syncs
//! `blobs/` once, then marks the records (journal-resident messages release their segment).
//!
//! The record stays for `spool.dedupe_window` after the last confirmation
//! ([`Spool::set_dedupe_window`]), so a resend inside the window is still a duplicate; then
//! [`Spool::prune_delivered`] removes it with its lookup keys, and the index stops growing
//! with everything ever received. A resend after the window is stored again.

use std::collections::BTreeMap;
use std::fs;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gateway_durable::{self as durable, Context};
use tracing::{info, warn};

use crate::index::prunable;
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

    /// Keeps the record of an object every destination confirmed for `window` after the
    /// last confirmation (and at least as long as its kept blob), then
    /// [`Spool::prune_delivered`] removes it. Until this is called nothing is pruned.
    pub fn set_dedupe_window(&self, window: Duration) {
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX - 1);
        self.inner.dedupe_window_ms.store(ms, Ordering::Relaxed);
    }

    fn dedupe_window(&self) -> Option<Duration> {
        match self.inner.dedupe_window_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Removes the records of objects every destination confirmed more than
    /// `dedupe_window` ago and whose blob is gone, with their lookup and dedupe keys, in one
    /// pass over the index. Returns how many went.
    pub fn prune_delivered(&self) -> Result<u64, SpoolError> {
        let Some(window) = self.dedupe_window() else {
            return Ok(0);
        };
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let cutoff = unix_ms().saturating_sub(window_ms);
        let index = &self.inner.index;
        let mut pruned = 0;
        for entry in index.records() {
            let (id, record) = entry?;
            if prunable(&record, cutoff) && index.prune(&id, cutoff)? {
                pruned += 1;
            }
        }
        if pruned > 0 {
            index.flush()?;
        }
        Ok(pruned)
    }

    /// The spool's upkeep, until `shutdown` turns true: deletes kept blobs as their
    /// `keep_sent_for` passes (checked every quarter of it, 1 s .. 60 s), prunes delivered
    /// records as `dedupe_window` passes (every eighth of it, 1 s .. 1 h, and once at
    /// start) and refreshes `gateway_spool_index_bytes` (every minute at most). The work
    /// runs on the blocking pool.
    pub async fn run_housekeeping(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let keep = Duration::from_millis(self.keep_sent_ms());
        let second = Duration::from_secs(1);
        let mut tick = Duration::from_secs(60);
        if !keep.is_zero() {
            tick = tick.min((keep / 4).max(second));
        }
        let prune_every = self
            .dedupe_window()
            .map(|w| (w / 8).clamp(second, Duration::from_secs(3600)));
        if let Some(every) = prune_every {
            tick = tick.min(every);
        }
        let mut last_prune: Option<Instant> = None;
        loop {
            let prune =
                prune_every.is_some_and(|every| last_prune.is_none_or(|at| at.elapsed() >= every));
            if prune {
                last_prune = Some(Instant::now());
            }
            let spool = self.clone();
            match tokio::task::spawn_blocking(move || spool.upkeep(!keep.is_zero(), prune)).await {
                Ok(Ok((reclaimed, pruned))) => {
                    if reclaimed > 0 {
                        info!(
                            blobs = reclaimed,
                            "deleted local copies past spool.keep_sent_for"
                        );
                    }
                    if pruned > 0 {
                        info!(
                            records = pruned,
                            "pruned records of objects delivered before spool.dedupe_window"
                        );
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "spool housekeeping failed; retrying"),
                Err(_) => {}
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                () = tokio::time::sleep(tick) => {}
            }
        }
    }

    /// One round of [`Spool::run_housekeeping`]: (blobs reclaimed, records pruned).
    fn upkeep(&self, reclaim: bool, prune: bool) -> Result<(u64, u64), SpoolError> {
        let reclaimed = if reclaim { self.reclaim_expired()? } else { 0 };
        let pruned = if prune { self.prune_delivered()? } else { 0 };
        self.refresh_index_size()?;
        Ok((reclaimed, pruned))
    }

    /// Sets `gateway_spool_index_bytes` from the index's size on disk (done at open and by
    /// [`Spool::run_housekeeping`]).
    pub fn refresh_index_size(&self) -> Result<(), SpoolError> {
        let index = &self.inner.index;
        index.tally().set_index_bytes(index.size_on_disk()?);
        Ok(())
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
