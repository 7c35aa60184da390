//! The fleet agent's [`TelemetrySource`]: a snapshot refreshed off the agent's task.
//!
//! Sources, all already kept by the running daemon (no new bookkeeping in the services):
//! - the spool: `Spool::status()` (one index scan, on a blocking thread, once per
//!   `fleet.telemetry_interval`): queued count and failing state per destination, object
//!   and byte totals, age of the oldest unsent object (overall and per destination);
//! - the metric handles the services register for `/metrics` ([`MetricSources`]), read
//!   through their accessors: DICOM associations and C-STORE outcomes, HL7 connections and
//!   acknowledgement codes, uplink `sent` counts, from which the last successful upload
//!   time is derived (the moment a destination's `sent` counter was seen to grow);
//! - `statvfs` of `node.data_dir` for free disk space;
//! - the configured key store back end. The tamper state is `intact` once the key store
//!   opened (a tamper error stops `run` before any service starts).
//!
//! Only counts, sizes, ages and configured names: no patient data.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway_fleet::Telemetry;
use gateway_fleet::telemetry::{
    DestinationTelemetry, DicomCounters, Hl7Counters, KeyBackend, KeyStoreTelemetry,
    SpoolTelemetry, TamperState,
};
use gateway_fleet_agent::TelemetrySource;
use gateway_spool::Spool;
use tokio::sync::watch;
use tracing::warn;

/// The metric handles of the services that run (`None`: the section is absent).
#[derive(Debug, Clone, Default)]
pub struct MetricSources {
    pub dicom: Option<gateway_dicom::metrics::Metrics>,
    pub hl7: Option<gateway_mllp::Metrics>,
    pub uplink: gateway_uplink::Metrics,
}

/// Refreshes a telemetry snapshot; the agent reads the latest one.
#[derive(Debug)]
pub struct Collector {
    spool: Spool,
    metrics: MetricSources,
    data_dir: PathBuf,
    /// Configured destinations: name and kind.
    destinations: Vec<(String, String)>,
    backend: KeyBackend,
    latest: Mutex<Telemetry>,
    /// Per destination: last `sent` count seen and when it last grew.
    progress: Mutex<BTreeMap<String, (u64, Option<u64>)>>,
}

impl Collector {
    pub fn new(
        spool: Spool,
        metrics: MetricSources,
        data_dir: PathBuf,
        destinations: Vec<(String, String)>,
        backend: KeyBackend,
    ) -> Arc<Collector> {
        let empty = Telemetry {
            version: String::new(),
            at: 0,
            uptime_secs: 0,
            disk_free_bytes: 0,
            last_upload_at: None,
            destinations: Vec::new(),
            dicom: DicomCounters::default(),
            hl7: Hl7Counters::default(),
            keystore: KeyStoreTelemetry {
                backend,
                tamper: TamperState::Intact,
            },
            spool: SpoolTelemetry::default(),
        };
        Arc::new(Collector {
            spool,
            metrics,
            data_dir,
            destinations,
            backend,
            latest: Mutex::new(empty),
            progress: Mutex::new(BTreeMap::new()),
        })
    }

    /// Refreshes the snapshot now and then every `interval` until shutdown.
    pub async fn run(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                _ = tick.tick() => {
                    let me = Arc::clone(&self);
                    if let Err(e) = tokio::task::spawn_blocking(move || me.refresh()).await {
                        warn!(error = %e, "telemetry refresh task failed");
                    }
                }
            }
        }
    }

    fn refresh(&self) {
        let now = unix_now();
        let dicom = self
            .metrics
            .dicom
            .as_ref()
            .map_or_else(DicomCounters::default, |m| DicomCounters {
                associations_active: u64::try_from(m.associations_active.get()).unwrap_or(0),
                associations_total: m.associations_accepted.get(),
                associations_rejected_total: m.rejected_total(),
                stored_total: m.stored_ok_total(),
                store_failures_total: m.stored_failed_total(),
            });
        let hl7 = self
            .metrics
            .hl7
            .as_ref()
            .map_or_else(Hl7Counters::default, |m| Hl7Counters {
                connections_active: u64::try_from(m.connections_active()).unwrap_or(0),
                messages_total: m.messages_total(),
                accepted_total: m.messages_with(&["AA", "CA"]),
                errors_total: m.messages_with(&["AE", "CE"]),
                rejected_total: m.messages_with(&["AR", "CR"]),
            });
        let status = match self.spool.status() {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "telemetry: cannot read the spool status");
                None
            }
        };
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let mut destinations = Vec::with_capacity(self.destinations.len());
        for (name, kind) in &self.destinations {
            let sent = self.metrics.uplink.sent_to(name);
            let entry = progress.entry(name.clone()).or_insert((0, None));
            if sent > entry.0 {
                *entry = (sent, Some(now));
            }
            let counts = status.as_ref().and_then(|s| s.by_destination.get(name));
            destinations.push(DestinationTelemetry {
                name: name.clone(),
                kind: kind.clone(),
                queued: counts.map_or(0, |c| c.queued),
                oldest_age_secs: counts
                    .and_then(|c| c.oldest_queued_age_seconds)
                    .map(|a| a as u64),
                last_success_at: entry.1,
                failing: counts.is_some_and(|c| c.last_error.is_some()),
            });
        }
        let last_upload_at = progress.values().filter_map(|(_, at)| *at).max();
        drop(progress);
        let sample = Telemetry {
            version: String::new(),
            at: now,
            uptime_secs: 0,
            disk_free_bytes: free_bytes(&self.data_dir),
            last_upload_at,
            destinations,
            dicom,
            hl7,
            keystore: KeyStoreTelemetry {
                backend: self.backend,
                tamper: TamperState::Intact,
            },
            spool: status.map_or_else(SpoolTelemetry::default, |s| SpoolTelemetry {
                objects: s.objects,
                bytes: s.bytes,
                oldest_age_secs: s.oldest_age_seconds.map(|a| a as u64),
            }),
        };
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = sample;
    }
}

impl TelemetrySource for Collector {
    fn sample(&self) -> Telemetry {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn free_bytes(dir: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).map_or(0, |s| {
        s.blocks_available().saturating_mul(s.fragment_size())
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_come_from_the_services_metric_handles() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let spool = Spool::open(
            dir.path(),
            None,
            gateway_spool::Limits {
                max_bytes: 1 << 30,
                min_free_bytes: 0,
            },
            Vec::new(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut registry = prometheus_client::registry::Registry::default();
        let dicom = gateway_dicom::metrics::Metrics::register(&mut registry);
        dicom.stored("success");
        dicom.stored("duplicate");
        dicom.stored("invalid");
        dicom.rejected("artim");
        dicom.associations_accepted.inc();
        let sources = MetricSources {
            dicom: Some(dicom),
            hl7: Some(gateway_mllp::Metrics::register(&mut registry)),
            uplink: gateway_uplink::Metrics::register(&mut registry),
        };
        let collector = Collector::new(
            spool,
            sources,
            dir.path().to_path_buf(),
            vec![("pacs".into(), "dicomweb".into())],
            KeyBackend::Software,
        );
        collector.refresh();
        let t = collector.sample();
        assert_eq!(
            (
                t.dicom.stored_total,
                t.dicom.store_failures_total,
                t.dicom.associations_rejected_total,
                t.dicom.associations_total
            ),
            (2, 1, 1, 1)
        );
        assert_eq!((t.hl7.messages_total, t.hl7.accepted_total), (0, 0));
        assert_eq!(t.destinations.len(), 1);
        assert_eq!(t.destinations[0].last_success_at, None);
    }
}
