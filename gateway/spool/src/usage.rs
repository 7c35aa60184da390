//! Byte accounting and the disk-pressure guard.
//!
//! Objects in flight reserve the bytes they have written so far, so that concurrent
//! associations cannot together push the spool past `max_bytes`. Free disk space is read
//! with `statvfs` when an object starts and again every [`RECHECK_EVERY`] bytes.

use std::path::PathBuf;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::SpoolError;

const RECHECK_EVERY: u64 = 4 * 1024 * 1024;

/// Limits from `[spool]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub min_free_bytes: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: &'static str,
}

/// The durable steps of a commit, timed separately so operators (and BENCHMARKS.md) can
/// see where ingest time goes on their disk.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// fdatasync of the sealed blob.
    SyncBlob,
    /// rename into `blobs/` and fsync of that directory.
    Publish,
    /// sled transaction and flush.
    Index,
    /// Append of a group of messages to the journal, with its fdatasync.
    Journal,
}

impl Step {
    fn label(self) -> &'static str {
        match self {
            Step::SyncBlob => "sync_blob",
            Step::Publish => "publish",
            Step::Index => "index",
            Step::Journal => "journal",
        }
    }
}

#[derive(Debug, Default)]
struct Totals {
    stored: u64,
    reserved: u64,
}

/// Bytes held by one object in flight.
#[derive(Debug, Default)]
pub struct Reservation {
    bytes: u64,
    since_check: u64,
}

#[derive(Debug)]
pub struct Usage {
    limits: Limits,
    data_dir: PathBuf,
    totals: Mutex<Totals>,
    bytes: Gauge,
    steps: Family<StepLabel, Histogram>,
}

impl Usage {
    pub fn new(limits: Limits, data_dir: PathBuf) -> Self {
        Self {
            limits,
            data_dir,
            totals: Mutex::new(Totals::default()),
            bytes: Gauge::default(),
            // 50 us .. ~1.6 s
            steps: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00005, 2.0, 16))
            }),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gateway_spool_bytes",
            "Sealed bytes stored in the spool",
            self.bytes.clone(),
        );
        registry.register(
            "gateway_spool_commit_step_seconds",
            "Time spent in each durable step of committing an object",
            self.steps.clone(),
        );
    }

    /// Records how long a durable step took.
    pub fn observe(&self, step: Step, started: std::time::Instant) {
        self.steps
            .get_or_create(&StepLabel { step: step.label() })
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn set_stored(&self, bytes: u64) {
        self.lock().stored = bytes;
        self.bytes.set(bytes as i64);
    }

    /// Sealed bytes of the objects stored (not counting objects in flight).
    pub fn stored(&self) -> u64 {
        self.lock().stored
    }

    /// Fails when free disk is already below the floor.
    pub fn check_free(&self) -> Result<(), SpoolError> {
        let free = self.free_bytes()?;
        if free < self.limits.min_free_bytes {
            return Err(SpoolError::Full {
                reason: format!(
                    "{free} bytes free on the data disk, below spool.min_free_bytes = {}",
                    self.limits.min_free_bytes
                ),
            });
        }
        Ok(())
    }

    pub fn reserve(&self, bytes: u64) -> Result<Reservation, SpoolError> {
        let mut r = Reservation::default();
        self.grow(&mut r, bytes)?;
        Ok(r)
    }

    /// Accounts `more` bytes to an object in flight, refusing past the limits.
    pub fn grow(&self, r: &mut Reservation, more: u64) -> Result<(), SpoolError> {
        // Each chunk adds a tag; count it so max_bytes bounds what is really on disk.
        let more = more + more.div_ceil(crate::seal::CHUNK as u64) * crate::seal::TAG as u64;
        {
            let mut t = self.lock();
            let after = t.stored + t.reserved + more;
            if after > self.limits.max_bytes {
                return Err(SpoolError::Full {
                    reason: format!(
                        "the spool would exceed spool.max_bytes = {}",
                        self.limits.max_bytes
                    ),
                });
            }
            t.reserved += more;
        }
        r.bytes += more;
        r.since_check += more;
        if r.since_check >= RECHECK_EVERY {
            r.since_check = 0;
            self.check_free()?;
        }
        Ok(())
    }

    /// Turns a reservation into stored bytes of a committed object.
    pub fn commit(&self, r: &mut Reservation, sealed_len: u64) {
        let mut t = self.lock();
        t.reserved = t.reserved.saturating_sub(r.bytes);
        t.stored += sealed_len;
        self.bytes.set(t.stored as i64);
        r.bytes = 0;
    }

    /// A blob was deleted (its destinations all confirmed it).
    pub fn release_stored(&self, sealed_len: u64) {
        let mut t = self.lock();
        t.stored = t.stored.saturating_sub(sealed_len);
        self.bytes.set(t.stored as i64);
    }

    pub fn release(&self, r: &mut Reservation) {
        if r.bytes > 0 {
            let mut t = self.lock();
            t.reserved = t.reserved.saturating_sub(r.bytes);
            r.bytes = 0;
        }
    }

    fn free_bytes(&self) -> Result<u64, SpoolError> {
        let st = nix::sys::statvfs::statvfs(&self.data_dir).map_err(|e| {
            SpoolError::Io(gateway_durable::Error {
                action: "statvfs",
                path: self.data_dir.clone(),
                source: e.into(),
            })
        })?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Totals> {
        // A poisoned lock only means another thread panicked mid-update of two integers;
        // the numbers are still usable.
        self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }
}
