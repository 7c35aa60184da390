//! The audit export: the local hash chain (`<data_dir>/audit/audit.jsonl`, the source of
//! truth) to the audit repositories (`[[uplink]] kind = "syslog-tls"`), through the spool.
//!
//! A dedicated thread reads the chain records after a durable cursor
//! (`<data_dir>/audit/export.cursor`, the last chain position handed to the spool), renders
//! each as an RFC 5424 message carrying its PS3.15 A.5 audit message ([`render`], the one
//! call of `gateway_audit::a5`), stores them in the spool as one group
//! ([`Spool::store_audit_messages`]: keyed by chain position, so a crash between the store
//! and the cursor write stores nothing twice) and then replaces the cursor atomically.
//! The spool queues them for every syslog-tls uplink; their workers send them.
//!
//! The chain grows from this process and from others (`gatewayd users ...`): the thread
//! looks every [`POLL`]. A repository whose queue is full (`max_queued`) does not get the
//! newer messages: counted in `gateway_audit_export_dropped_total{destination}` and logged
//! once per burst; the chain keeps them and the sequenceId gap shows the repository.
//!
//! Metrics: `gateway_audit_exported_total` (messages newly stored for export),
//! `gateway_audit_export_dropped_total{destination}`, `gateway_audit_export_backlog` (chain
//! records not yet handed to the spool, as last seen).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway_audit::a5::AuditSource;
use gateway_audit::{AuditKey, AuditLog, Record};
use gateway_config::{Settings, UplinkKind};
use gateway_spool::{AuditIn, Committed, Spool};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

/// How often the chain is looked at for new records.
const POLL: Duration = Duration::from_millis(300);
/// The wait after a failure (the spool full, the trail unreadable).
const RETRY: Duration = Duration::from_secs(3);
/// Chain records read, rendered and stored as one spool group at most.
const BATCH: usize = 1000;
/// The cursor file, in the audit folder.
const CURSOR_FILE: &str = "export.cursor";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabel {
    destination: String,
}

/// The export's metrics.
#[derive(Debug, Clone, Default)]
struct Metrics {
    exported: Counter,
    dropped: Family<DestinationLabel, Counter>,
    backlog: Gauge,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "gateway_audit_exported",
            "Audit chain records rendered and stored in the spool for the audit repositories (not counting positions stored before, nor those no repository had room for)",
            m.exported.clone(),
        );
        registry.register(
            "gateway_audit_export_dropped",
            "Audit messages not queued for a repository because its queue was full (max_queued); the chain keeps them",
            m.dropped.clone(),
        );
        registry.register(
            "gateway_audit_export_backlog",
            "Audit chain records not yet handed to the spool, as the export last saw",
            m.backlog.clone(),
        );
        m
    }
}

/// Renders one chain record as the syslog message the repositories get, its sealed
/// participants (Patient ID, Study UID of a DICOM transfer) opened with the audit key. The
/// one place the A.5 rendering is called.
fn render(record: &Record, source: &AuditSource, key: &AuditKey) -> Vec<u8> {
    gateway_audit::a5::syslog_message(record, source, Some(key.participants_key()))
}

/// Whether any `[[uplink]]` is an audit repository.
pub fn wanted(settings: &Settings) -> bool {
    settings
        .uplinks
        .iter()
        .any(|u| u.kind == UplinkKind::SyslogTls)
}

/// Starts the export thread (call only when [`wanted`]); the returned future ends when the
/// thread has stopped after `shutdown`.
pub fn start(
    settings: &Settings,
    spool: Spool,
    key: AuditKey,
    registry: &mut Registry,
    shutdown: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, String> {
    let metrics = Metrics::register(registry);
    let dir = crate::ops::audit_dir(settings);
    let source = AuditSource {
        node_id: settings.node.id.as_str().to_string(),
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("audit-export".into())
        .spawn(move || {
            let export = Export {
                cursor_path: dir.join(CURSOR_FILE),
                dir,
                key,
                source,
                spool,
                metrics,
                dropping: BTreeMap::new(),
            };
            export.run(&shutdown);
            let _ = done_tx.send(());
        })
        .map_err(|e| format!("cannot start the audit export thread: {e}"))?;
    Ok(async move {
        let _ = done_rx.await;
    })
}

struct Export {
    dir: PathBuf,
    cursor_path: PathBuf,
    key: AuditKey,
    source: AuditSource,
    spool: Spool,
    metrics: Metrics,
    /// Repositories whose queue is full, with how many were not queued for them in this
    /// burst (one warning when it starts, one line when it ends).
    dropping: BTreeMap<String, u64>,
}

impl Export {
    fn run(mut self, shutdown: &watch::Receiver<bool>) {
        let mut log: Option<AuditLog> = None;
        let mut cursor = read_cursor(&self.cursor_path);
        info!(cursor, "audit export started");
        while !*shutdown.borrow() {
            let opened = match log.take() {
                Some(l) => Ok(l),
                None => AuditLog::open(&self.dir, self.key.clone()),
            };
            let wait = match opened {
                Ok(l) => {
                    let wait = match self.step(&l, &mut cursor) {
                        Ok(true) => Duration::ZERO,
                        Ok(false) => POLL,
                        Err(e) => {
                            warn!(error = %e, retry_in = ?RETRY, "audit export: will try again");
                            RETRY
                        }
                    };
                    log = Some(l);
                    wait
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?RETRY, "audit export: cannot open the audit trail; will try again");
                    RETRY
                }
            };
            if !wait.is_zero() {
                wait_unless_shutdown(shutdown, wait);
            }
        }
        info!(cursor, "audit export stopped");
    }

    /// Exports one batch after `cursor`; true if the batch was full (more may wait).
    fn step(&mut self, log: &AuditLog, cursor: &mut u64) -> Result<bool, String> {
        let records = log
            .records_after(*cursor, BATCH)
            .map_err(|e| e.to_string())?;
        let Some(last) = records.last().map(Record::seq) else {
            self.metrics.backlog.set(0);
            return Ok(false);
        };
        self.metrics
            .backlog
            .set(i64::try_from(last.saturating_sub(*cursor)).unwrap_or(i64::MAX));
        let full = records.len() >= BATCH;
        let items: Vec<AuditIn> = records
            .iter()
            .map(|r| AuditIn {
                seq: r.seq(),
                bytes: render(r, &self.source, &self.key),
            })
            .collect();
        let results = self.spool.store_audit_messages(items);
        // The cursor moves past the records stored (or refused for a full queue, which the
        // drop metric counts), up to the first that failed.
        let mut done = *cursor;
        let mut failure = None;
        let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
        let mut stored_new = 0u64;
        for (record, result) in records.iter().zip(results) {
            match result {
                Ok(stored) => {
                    if matches!(stored.committed, Some(Committed::Stored(_))) {
                        stored_new += 1;
                    }
                    for d in stored.dropped {
                        *dropped.entry(d).or_default() += 1;
                    }
                    done = record.seq();
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        self.note_drops(&dropped);
        self.metrics.exported.inc_by(stored_new);
        if done > *cursor {
            gateway_durable::write_atomic(&self.cursor_path, done.to_string().as_bytes())
                .map_err(|e| e.to_string())?;
            *cursor = done;
        }
        self.metrics
            .backlog
            .set(i64::try_from(last.saturating_sub(*cursor)).unwrap_or(i64::MAX));
        match failure {
            Some(e) => Err(format!("cannot store audit messages in the spool: {e}")),
            None => Ok(full),
        }
    }

    /// Counts the drops and logs a full queue once per burst.
    fn note_drops(&mut self, dropped: &BTreeMap<String, u64>) {
        for (destination, n) in dropped {
            self.metrics
                .dropped
                .get_or_create(&DestinationLabel {
                    destination: destination.clone(),
                })
                .inc_by(*n);
            let seen = self.dropping.entry(destination.clone()).or_insert(0);
            if *seen == 0 {
                warn!(destination = %destination,
                    "audit repository queue is full (max_queued): newer audit messages are not queued for it until it takes some; the audit trail keeps them");
            }
            *seen += n;
        }
        let ended: Vec<String> = self
            .dropping
            .keys()
            .filter(|d| !dropped.contains_key(*d))
            .cloned()
            .collect();
        for destination in ended {
            if let Some(n) = self.dropping.remove(&destination) {
                info!(destination = %destination, not_queued = n,
                    "audit repository queue has room again");
            }
        }
    }
}

/// Sleeps `wait`, in short steps so that a shutdown is seen soon.
fn wait_unless_shutdown(shutdown: &watch::Receiver<bool>, wait: Duration) {
    let step = Duration::from_millis(100);
    let mut left = wait;
    while !left.is_zero() && !*shutdown.borrow() {
        let now = left.min(step);
        std::thread::sleep(now);
        left = left.saturating_sub(now);
    }
}

/// The last exported chain position; 0 when there is none yet. An unreadable cursor starts
/// again from 0 (with a warning): the spool's key per chain position keeps what it still
/// holds from being stored twice, the rest goes again with its sequenceId.
fn read_cursor(path: &Path) -> u64 {
    match gateway_durable::read_if_exists(path) {
        Ok(None) => 0,
        Ok(Some(bytes)) => match std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            Some(n) => n,
            None => {
                warn!(path = %path.display(), "the audit export cursor is not a number: exporting again from the start of the chain");
                0
            }
        },
        Err(e) => {
            warn!(error = %e, "the audit export cursor is unreadable: exporting again from the start of the chain");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn export(dir: &Path, spool: &Spool) -> Export {
        let audit = dir.join("audit");
        Export {
            cursor_path: audit.join(CURSOR_FILE),
            dir: audit,
            key: AuditKey::derive(&[3; gateway_keystore::KEY_LEN]),
            source: AuditSource {
                node_id: "gw-1".into(),
            },
            spool: spool.clone(),
            metrics: Metrics::default(),
            dropping: BTreeMap::new(),
        }
    }

    fn event(n: u64) -> gateway_audit::Event {
        gateway_audit::Event {
            actor: format!("clerk.{n}"),
            action: gateway_audit::Action::Login,
            outcome: gateway_audit::Outcome::Success,
            subject: None,
            detail: None,
        }
    }

    /// Chain records go to the spool rendered, keyed by position; the cursor is durable
    /// and a cursor that fell behind (a crash before its write) stores nothing twice; a
    /// full capped queue is counted per destination.
    #[test]
    fn records_after_the_cursor_are_stored_once_and_the_cursor_persists() {
        let dir = tempfile::tempdir().unwrap();
        let routes = vec![
            gateway_spool::Route::new("arr", gateway_spool::ObjectKind::Audit).with_max_queued(3),
        ];
        let spool = Spool::open(
            dir.path(),
            Some(gateway_keystore::MasterKey::from_bytes(
                [7; gateway_keystore::KEY_LEN],
            )),
            gateway_spool::Limits {
                max_bytes: 1 << 40,
                min_free_bytes: 0,
            },
            routes,
        )
        .unwrap();
        let mut ex = export(dir.path(), &spool);
        let log = AuditLog::open(&ex.dir, ex.key.clone()).unwrap();
        for n in 0..5 {
            log.append(event(n)).unwrap();
        }
        let mut cursor = read_cursor(&ex.cursor_path);
        assert!(!ex.step(&log, &mut cursor).unwrap());
        assert_eq!(cursor, 5);
        assert_eq!(read_cursor(&ex.cursor_path), 5);
        assert_eq!(ex.metrics.exported.get(), 3, "two had no room");
        assert_eq!(ex.metrics.backlog.get(), 0);
        let dropped = |ex: &Export| {
            ex.metrics
                .dropped
                .get_or_create(&DestinationLabel {
                    destination: "arr".into(),
                })
                .get()
        };
        assert_eq!(dropped(&ex), 2, "the cap kept the oldest 3");
        assert!(spool.settle(Duration::from_secs(5)));
        let queued = spool.queued("arr", 10).unwrap();
        let (_, first) = spool.read(&queued[0]).unwrap();
        let records = log.records().unwrap();
        assert_eq!(first, render(&records[0], &ex.source, &ex.key));
        // A crash before the cursor write: the same records again store nothing.
        let mut behind = 0;
        assert!(!ex.step(&log, &mut behind).unwrap());
        assert_eq!(behind, 5);
        assert_eq!(spool.status().unwrap().objects, 3);
        assert_eq!(ex.metrics.exported.get(), 3, "nothing new stored");
        assert_eq!(
            dropped(&ex),
            4,
            "stored ones are duplicates; the two that never fitted are refused again"
        );
    }

    #[test]
    fn the_cursor_reads_back_and_a_damaged_one_starts_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CURSOR_FILE);
        assert_eq!(read_cursor(&path), 0);
        gateway_durable::write_atomic(&path, b"42").unwrap();
        assert_eq!(read_cursor(&path), 42);
        std::fs::write(&path, b"forty-two").unwrap();
        assert_eq!(read_cursor(&path), 0);
    }
}
