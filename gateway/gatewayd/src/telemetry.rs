//! The fleet agent's [`TelemetrySource`]: a snapshot refreshed off the agent's task.
//!
//! Sources, all already kept by the running daemon (no new bookkeeping in the services):
//! - the spool: `Spool::status()` (one index scan, on a blocking thread, once per
//!   `fleet.telemetry_interval`): queued count and failing state per destination, object
//!   and byte totals, age of the oldest unsent object (overall and per destination);
//! - the Prometheus registry that `/metrics` serves (the contract's metric names): DICOM
//!   associations and C-STORE outcomes, HL7 connections and acknowledgement codes, uplink
//!   `sent` results, from which the last successful upload time is derived (the moment a
//!   destination's `sent` counter was seen to grow);
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
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::warn;

/// Refreshes a telemetry snapshot; the agent reads the latest one.
#[derive(Debug)]
pub struct Collector {
    spool: Spool,
    registry: Arc<Registry>,
    data_dir: PathBuf,
    /// Configured destinations: name and kind.
    destinations: Vec<(String, String)>,
    backend: KeyBackend,
    latest: Mutex<Telemetry>,
    /// Per destination: last `sent` count seen and when it last grew.
    progress: Mutex<BTreeMap<String, (f64, Option<u64>)>>,
}

impl Collector {
    pub fn new(
        spool: Spool,
        registry: Arc<Registry>,
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
            registry,
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
        let metrics = scrape(&self.registry);
        let sum = |name: &str, keep: &dyn Fn(&str) -> bool| -> u64 {
            metrics
                .iter()
                .filter(|(n, labels, _)| n == name && keep(labels))
                .map(|(_, _, v)| *v)
                .sum::<f64>() as u64
        };
        let label_is = |key: &'static str, values: &'static [&'static str]| {
            move |labels: &str| {
                values
                    .iter()
                    .any(|v| labels.contains(&format!("{key}=\"{v}\"")))
            }
        };
        let all = |_: &str| true;
        let dicom = DicomCounters {
            associations_active: sum("gateway_dicom_associations_active", &all),
            associations_total: sum("gateway_dicom_associations_accepted_total", &all),
            associations_rejected_total: sum("gateway_dicom_associations_rejected_total", &all),
            stored_total: sum(
                "gateway_dicom_stored_total",
                &label_is("status", &["success", "duplicate"]),
            ),
            store_failures_total: sum("gateway_dicom_stored_total", &|l: &str| {
                !label_is("status", &["success", "duplicate"])(l)
            }),
        };
        let hl7 = Hl7Counters {
            connections_active: sum("gateway_hl7_connections_active", &all),
            messages_total: sum("gateway_hl7_messages_total", &all),
            accepted_total: sum(
                "gateway_hl7_messages_total",
                &label_is("ack", &["AA", "CA"]),
            ),
            errors_total: sum(
                "gateway_hl7_messages_total",
                &label_is("ack", &["AE", "CE"]),
            ),
            rejected_total: sum(
                "gateway_hl7_messages_total",
                &label_is("ack", &["AR", "CR"]),
            ),
        };
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
            let sent: f64 = metrics
                .iter()
                .filter(|(n, labels, _)| {
                    n == "gateway_uplink_sent_total"
                        && labels.contains(&format!("destination=\"{name}\""))
                        && labels.contains("result=\"sent\"")
                })
                .map(|(_, _, v)| *v)
                .sum();
            let entry = progress.entry(name.clone()).or_insert((0.0, None));
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

/// `(name, labels text, value)` of every sample in the registry's text exposition.
fn scrape(registry: &Registry) -> Vec<(String, String, f64)> {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        warn!(error = %e, "telemetry: cannot encode the metrics");
        return Vec::new();
    }
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name.to_owned(), labels.to_owned(), value))
        })
        .collect()
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
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    #[test]
    fn scrape_reads_names_labels_and_values() {
        let mut registry = Registry::default();
        let family: Family<Vec<(String, String)>, Counter> = Family::default();
        registry.register("gateway_hl7_messages", "test", family.clone());
        family
            .get_or_create(&vec![("ack".into(), "AA".into())])
            .inc_by(3);
        family
            .get_or_create(&vec![("ack".into(), "AE".into())])
            .inc();
        let samples = scrape(&registry);
        let aa = samples
            .iter()
            .find(|(n, l, _)| n == "gateway_hl7_messages_total" && l.contains("ack=\"AA\""))
            .map(|(_, _, v)| *v);
        assert_eq!(aa, Some(3.0));
        assert_eq!(samples.len(), 2);
    }
}
