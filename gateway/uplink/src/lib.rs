//! The uplink: drains the spool to cloud DICOMweb archives with STOW-RS over mutual TLS (and
//! pulls studies back from them, [`pull`]).
//!
//! One [`UplinkService`] per `[[uplink]]` destination. It takes the oldest queued object of
//! its destination from the spool and the queued objects of the same study behind it (up to
//! the batch limits), unseals them in memory, POSTs them as one
//! `multipart/related; type="application/dicom"` request to `{url}/studies`, and marks each
//! instance on its own from the STOW response. Up to `max_concurrent_requests` requests are
//! in flight at once (each its own task), so unsealing the next batch overlaps the archive
//! storing the last one.
//!
//! Module map: [`stow`] (body, response and [`stow::StowError`]), `pace` (bandwidth limit),
//! [`mllp`] (HL7 v2 forwarding over MLLP/TLS for `kind = "mllp-tls"` destinations, and
//! [`mllp::MllpError`]), [`deliver`] (results to the clinic PACS by C-STORE, one
//! [`DimseDeliveryService`] per `[[results.deliver]]` kind = "dicom"), [`pull`] (the other direction: a study listed by QIDO-RS and
//! retrieved by WADO-RS from a destination's archive, [`pull::PullClient`]) and
//! [`multipart`] (the streaming `multipart/related` parser of WADO-RS responses), [`syslog`]
//! (audit messages to `kind = "syslog-tls"` audit repositories: RFC 5425, one
//! [`syslog::SyslogUplinkService`] each) and `link` (the TCP and TLS connection set-up
//! the MLLP and syslog workers share, [`LinkError`]).
//!
//! Retry rules:
//! - network errors, 408, 429, 5xx, and authentication refusals (401, 403, 495, 496) are
//!   destination errors: the batch stays queued and is retried with exponential backoff and
//!   jitter (capped, forever; `Retry-After` honoured). The reason shows in `spool status`.
//! - an instance the archive names in FailedSOPSequence is dead-lettered with its reason,
//!   unless the reason is A7xx (out of resources: retried). Instances the response does not
//!   mention stay queued.
//! - a response without any per-instance result (a proxy's plain 400, an archive that stopped
//!   reading): nothing is dead-lettered; the batch is split and sent one by one, an instance
//!   still unconfirmed is held back with its own backoff so the rest of the queue flows, and
//!   if none goes through the destination is failing (backoff, reason in `spool status`).
//! - an instance the archive already holds comes back as stored: resends are idempotent.
//!
//! Invariants: nothing leaves the queue without the archive's confirmation or an explicit
//! dead letter; a dead destination never makes the spool drop or overwrite anything; several
//! destinations never block each other (each has its own task); no patient data in logs.

// Responses, acknowledgements and headers come from the network: no indexing or slicing
// that could panic on them (test code indexes what it built itself).
#![deny(clippy::indexing_slicing, clippy::string_slice)]
#![cfg_attr(test, allow(clippy::indexing_slicing, clippy::string_slice))]

pub mod deliver;
mod link;
pub mod mllp;
pub mod multipart;
mod pace;
pub mod pull;
pub mod stow;
pub mod syslog;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_spool::{ObjectId, Spool, SpoolError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub use crate::deliver::{DeliverSettings, DimseDeliveryService};
pub use crate::link::LinkError;
pub use crate::pace::Pacer;
use crate::stow::{InstanceResult, Part, StowError};

/// Settings of one destination, built by `gatewayd` from `[[uplink]]`.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    pub name: String,
    /// DICOMweb base URL; requests go to `{url}/studies`.
    pub url: String,
    /// rustls configuration (server CA and client identity); `None` for plain `http://`
    /// (refused in production by the config).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub batch_max_instances: usize,
    pub batch_max_bytes: u64,
    /// Requests in flight at once.
    pub max_concurrent_requests: usize,
    /// Bandwidth limit of request bodies.
    pub max_bytes_per_sec: Option<u64>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub request_timeout: Duration,
    /// `deidentify = "basic"`: every object is de-identified as it leaves (the stored one
    /// never changes); one it cannot be is a dead letter with the reason.
    pub deidentify: Option<Arc<gateway_deid::Destination>>,
}

impl UplinkSettings {
    /// Defaults for everything but name, URL and TLS.
    pub fn new(name: String, url: String, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self {
            name,
            url,
            tls,
            batch_max_instances: 16,
            batch_max_bytes: 32 << 20,
            max_concurrent_requests: 2,
            max_bytes_per_sec: None,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            request_timeout: Duration::from_secs(300),
            deidentify: None,
        }
    }
}

/// Why a delivery state could not be recorded in the spool (logged; the object stays
/// queued and is sent again).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The blocking task that writes the spool did not finish (the runtime shuts down).
    #[error("the spool task did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Failures at start.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The HTTP client (TLS configuration, timeouts) could not be built.
    #[error("uplink {name}: cannot build the HTTP client: {source}")]
    Client {
        /// The destination (`[[uplink]]` name).
        name: String,
        source: reqwest::Error,
    },
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SentLabels {
    destination: String,
    result: &'static str,
}

/// `gateway_uplink_sent_total{destination,result}`: result = sent | failed | retry (for a
/// syslog-tls destination, retry counts messages written on a connection that then failed
/// before they were marked sent: they go again);
/// `gateway_uplink_deidentified_total{destination,result}`: result = rewritten | held |
/// failed (objects of a `deidentify = "basic"` destination).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabel {
    destination: String,
}

/// `gateway_uplink_queued{destination}` and `gateway_uplink_up{destination}` (1 while the
/// worker holds a working connection): kept by the syslog-tls workers.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    sent: Family<SentLabels, Counter>,
    bytes: Family<SentLabels, Counter>,
    deidentified: Family<SentLabels, Counter>,
    queued: Family<DestinationLabel, Gauge>,
    up: Family<DestinationLabel, Gauge>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "gateway_uplink_sent",
            "Instances handled by the uplink, by destination and result (sent, failed = dead letter, retry)",
            m.sent.clone(),
        );
        registry.register(
            "gateway_uplink_body_bytes",
            "Request body bytes sent by the uplink, by destination and result",
            m.bytes.clone(),
        );
        registry.register(
            "gateway_uplink_deidentified",
            "Objects rewritten for a de-identifying destination, or held back (burned-in identity) or failed (dead letters), by destination",
            m.deidentified.clone(),
        );
        registry.register(
            "gateway_uplink_queued",
            "Messages queued for a destination (audit repositories), as the worker last saw",
            m.queued.clone(),
        );
        registry.register(
            "gateway_uplink_up",
            "1 while the worker of a destination (audit repositories) holds a working connection, else 0",
            m.up.clone(),
        );
        m
    }

    /// `gateway_uplink_queued{destination}`.
    pub(crate) fn set_queued(&self, destination: &str, n: u64) {
        self.queued
            .get_or_create(&DestinationLabel {
                destination: destination.to_string(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `gateway_uplink_up{destination}`.
    pub(crate) fn set_up(&self, destination: &str, up: bool) {
        self.up
            .get_or_create(&DestinationLabel {
                destination: destination.to_string(),
            })
            .set(i64::from(up));
    }

    /// Objects of a de-identifying destination: `rewritten`, `held` or `failed`.
    pub(crate) fn deidentified(&self, destination: &str, result: &'static str, n: u64) {
        self.deidentified
            .get_or_create(&SentLabels {
                destination: destination.to_string(),
                result,
            })
            .inc_by(n);
    }

    /// Instances confirmed by `destination` since start (`result = "sent"`).
    pub fn sent_to(&self, destination: &str) -> u64 {
        self.sent
            .get(&SentLabels {
                destination: destination.to_string(),
                result: "sent",
            })
            .map_or(0, |c| c.get())
    }

    pub(crate) fn count(
        &self,
        destination: &str,
        result: &'static str,
        instances: u64,
        bytes: u64,
    ) {
        let labels = SentLabels {
            destination: destination.to_string(),
            result,
        };
        self.sent.get_or_create(&labels).inc_by(instances);
        self.bytes.get_or_create(&labels).inc_by(bytes);
    }
}

/// Outcome of one request, for the loop.
enum Round {
    /// Something was confirmed or dead-lettered: keep going.
    Progress,
    /// The destination is unwell: back off (at least this long).
    Backoff {
        reason: String,
        at_least: Option<Duration>,
    },
}

/// The worker of one destination.
#[derive(Debug)]
pub struct UplinkService {
    settings: UplinkSettings,
    spool: Spool,
    client: reqwest::Client,
    metrics: Metrics,
    /// Instances held back after an unconfirmed attempt: next try, current wait.
    deferred: HashMap<ObjectId, (Instant, Duration)>,
    /// `max_bytes_per_sec`, shared by every request in flight.
    pacer: Option<pace::Pacer>,
    /// `true` while the gateway is disabled: no new request starts.
    paused: watch::Receiver<bool>,
    /// Where confirmed batches go for the audit trail (DICOM instances transferred).
    transfers: Option<gateway_dicom::TransferSink>,
}

impl UplinkService {
    pub fn new(
        settings: UplinkSettings,
        spool: Spool,
        metrics: Metrics,
    ) -> Result<Self, UplinkError> {
        let client = http_client(&settings)?;
        let pacer = settings.max_bytes_per_sec.map(pace::Pacer::new);
        Ok(Self {
            settings,
            spool,
            client,
            metrics,
            deferred: HashMap::new(),
            pacer,
            paused: watch::channel(false).1,
            transfers: None,
        })
    }

    /// Hands each confirmed batch's studies (read from the Part 10 bytes sent, so the
    /// pseudonyms where the destination de-identifies) to `sink` for the audit trail, one
    /// entry per study, after the batch is marked sent.
    #[must_use]
    pub fn with_transfer_audit(mut self, sink: gateway_dicom::TransferSink) -> Self {
        self.transfers = Some(sink);
        self
    }

    /// Starts no new request while `paused` holds `true` (requests already in flight
    /// finish and are settled); objects stay queued. Without this call it never pauses.
    #[must_use]
    pub fn with_paused(mut self, paused: watch::Receiver<bool>) -> Self {
        self.paused = paused;
        self
    }

    /// Drains the destination's queue until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let name = self.settings.name.clone();
        info!(destination = %name, "uplink started");
        let mut wake = self.spool.subscribe();
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let mut resume_at: Option<Instant> = None;
        let mut inflight: JoinSet<Posted> = JoinSet::new();
        let mut busy: HashSet<ObjectId> = HashSet::new();
        let limit = self.settings.max_concurrent_requests.max(1);
        let mut paused = self.paused.clone();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if inflight.is_empty() && *paused.borrow() {
                if !hold_while_paused("uplink", &name, &mut paused, &mut shutdown).await {
                    break;
                }
                continue;
            }
            // Fill the request slots with the next batches, unless backing off or paused.
            // Afterwards the slots are full, the queue has nothing ready, or a backoff runs.
            while inflight.len() < limit
                && !*paused.borrow()
                && resume_at.is_none_or(|t| t <= Instant::now())
            {
                resume_at = None;
                let batch = match self.next_batch(&busy).await {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(destination = %name, error = %e, "cannot read queued objects");
                        Vec::new()
                    }
                };
                if batch.is_empty() {
                    break;
                }
                busy.extend(batch.iter().map(|(id, _)| *id));
                let request = self.request();
                inflight.spawn(async move {
                    let outcome = request.post(&batch).await;
                    Posted { batch, outcome }
                });
            }
            if inflight.is_empty() {
                let idle = resume_at.map_or(Duration::from_secs(30), |t| {
                    t.saturating_duration_since(Instant::now())
                });
                tokio::select! {
                    () = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                    _ = wake.changed(), if resume_at.is_none() => {}
                    Ok(_) = paused.wait_for(|p| *p) => {}
                    () = tokio::time::sleep(idle) => {}
                }
                continue;
            }
            let posted = tokio::select! {
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                _ = wake.changed(), if inflight.len() < limit && resume_at.is_none() => continue,
                joined = inflight.join_next() => joined,
            };
            let Some(joined) = posted else { continue };
            let Ok(Posted { batch, outcome }) = joined else {
                // A request task cannot panic on input (no unwraps); if it was cancelled,
                // its objects simply stay queued. They are busy until the set drains.
                continue;
            };
            for (id, _) in &batch {
                busy.remove(id);
            }
            match self.settle(batch, outcome).await {
                Round::Progress => {
                    backoff.reset();
                    let held = (!self.deferred.is_empty()).then(|| {
                        format!(
                            "{} object(s) held back: the archive answered without confirming them",
                            self.deferred.len()
                        )
                    });
                    self.spool.set_destination_error(&name, held);
                }
                Round::Backoff { reason, at_least } => {
                    warn!(destination = %name, reason, retry_in = ?backoff.step(), "upload failed; will retry");
                    self.spool.set_destination_error(&name, Some(reason));
                    let wait = backoff.failed().max(at_least.unwrap_or_default());
                    resume_at = Some(Instant::now() + wait);
                }
            }
        }
        inflight.abort_all();
        info!(destination = %name, "uplink stopped");
    }

    /// What a request task needs (the client is a cheap handle on one connection pool).
    fn request(&self) -> Request {
        Request {
            client: self.client.clone(),
            url: self.settings.url.clone(),
            pacer: self.pacer.clone(),
        }
    }

    /// The oldest queued object that is not busy or held back, and the queued objects of
    /// the same study behind it, up to the batch limits. An object without a Study
    /// Instance UID goes alone.
    async fn next_batch(
        &mut self,
        busy: &HashSet<ObjectId>,
    ) -> Result<Vec<(ObjectId, Part)>, SpoolError> {
        let now = Instant::now();
        let mut skip: HashSet<ObjectId> = self
            .deferred
            .iter()
            .filter(|(_, (at, _))| *at > now)
            .map(|(id, _)| *id)
            .collect();
        skip.extend(busy.iter().copied());
        let spool = self.spool.clone();
        let name = self.settings.name.clone();
        let (max_n, max_bytes) = (
            self.settings.batch_max_instances.max(1),
            self.settings.batch_max_bytes,
        );
        // How far down the queue to look for more instances of the oldest one's study.
        let window = max_n * 8 + skip.len();
        let deid = self.settings.deidentify.clone();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let mut batch = Vec::new();
            let mut bytes = 0u64;
            let mut study = None;
            let mut records: Vec<(ObjectId, gateway_deid::Applied)> = Vec::new();
            for id in spool
                .queued(&name, window)?
                .into_iter()
                .filter(|id| !skip.contains(id))
            {
                if batch.len() >= max_n {
                    break;
                }
                let key = spool.study_key(&id)?;
                match (&study, batch.is_empty()) {
                    (_, true) => study = Some(key),
                    (Some(Some(s)), false) if key.as_ref() == Some(s) => {}
                    (Some(None), false) => break,
                    _ => continue,
                }
                let (_, plain) = match spool.read(&id) {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(object = %hex::encode(id), error = %e, "queued object unreadable: dead-lettered");
                        spool.mark_failed(&id, &name, &format!("unreadable in the spool: {e}"))?;
                        if batch.is_empty() {
                            study = None;
                        }
                        continue;
                    }
                };
                // De-identified as it leaves (the batch's pseudonyms are recorded before it
                // is returned); the stored object stays as it came.
                let plain = match &deid {
                    None => plain,
                    Some(d) => match d.apply(&plain) {
                        Ok(mut applied) => {
                            let bytes = gateway_deid::Destination::take_bytes(&mut applied);
                            records.push((id, applied));
                            bytes
                        }
                        Err(e) => {
                            let held = matches!(e, gateway_deid::DeidError::Held(_));
                            metrics.deidentified(&name, if held { "held" } else { "failed" }, 1);
                            warn!(object = %hex::encode(id), error = %e, "object not de-identified: dead letter");
                            spool.mark_failed(&id, &name, &e.to_string())?;
                            if batch.is_empty() {
                                study = None;
                            }
                            continue;
                        }
                    },
                };
                let Some(uid) = sop_instance_uid(&plain) else {
                    spool.mark_failed(&id, &name, "stored object has no file meta SOP Instance UID")?;
                    if batch.is_empty() {
                        study = None;
                    }
                    continue;
                };
                if !batch.is_empty() && bytes + plain.len() as u64 > max_bytes {
                    break;
                }
                bytes += plain.len() as u64;
                batch.push((id, Part { sop_instance_uid: uid, bytes: bytes::Bytes::from(plain) }));
            }
            if let Some(d) = &deid {
                // Only what goes out needs its pseudonyms kept: one durable write for all.
                let sent: HashSet<ObjectId> = batch.iter().map(|(id, _)| *id).collect();
                let going = records.iter().filter(|(id, _)| sent.contains(id)).map(|(_, a)| a);
                if let Err(e) = d.record(going) {
                    warn!(error = %e, "re-identification map not written: the batch is dead-lettered");
                    for (id, _) in &batch {
                        spool.mark_failed(id, &name, &format!("not sent: {e}"))?;
                    }
                    return Ok(Vec::new());
                }
                metrics.deidentified(&name, "rewritten", batch.len() as u64);
            }
            Ok(batch)
        })
        .await
        .unwrap_or_else(|_| Ok(Vec::new()))
    }

    /// Posts a batch and settles it (the one-by-one retry path).
    async fn send(&mut self, batch: Vec<(ObjectId, Part)>) -> Round {
        let outcome = self.request().post(&batch).await;
        self.settle(batch, outcome).await
    }

    /// Records what the archive said about each instance of a posted batch.
    async fn settle(
        &mut self,
        batch: Vec<(ObjectId, Part)>,
        outcome: Result<Response, StowError>,
    ) -> Round {
        let name = self.settings.name.clone();
        let total: u64 = batch.iter().map(|(_, p)| p.bytes.len() as u64).sum();
        let n = batch.len() as u64;
        let (status, retry_after, body) = match outcome {
            Ok(x) => x,
            Err(e) => {
                self.metrics.count(&name, "retry", n, total);
                return Round::Backoff {
                    reason: e.to_string(),
                    at_least: None,
                };
            }
        };
        let code = status.as_u16();
        if matches!(code, 408 | 429 | 401 | 403 | 407 | 495 | 496) || status.is_server_error() {
            self.metrics.count(&name, "retry", n, total);
            return Round::Backoff {
                reason: format!("HTTP {code} from {}", self.settings.url),
                at_least: retry_after,
            };
        }
        let uids: Vec<String> = batch
            .iter()
            .map(|(_, p)| p.sop_instance_uid.clone())
            .collect();
        let results = stow::parse_response(&body, &uids);
        if results.values().all(|r| *r == InstanceResult::Unconfirmed) {
            // No per-instance answer (a proxy's plain 400, an archive that stopped reading):
            // nothing is dead-lettered on that. Try the instances one by one, so one object
            // cannot hold back the rest; if none goes through, the destination is failing.
            if batch.len() > 1 {
                debug!(destination = %name, code, "no per-instance result: sending one by one");
                let mut progressed = false;
                let mut last = None;
                for item in batch {
                    match Box::pin(self.send(vec![item])).await {
                        Round::Progress => progressed = true,
                        backoff => last = Some(backoff),
                    }
                }
                return match (progressed, last) {
                    (true, _) | (false, None) => Round::Progress,
                    (false, Some(backoff)) => backoff,
                };
            }
            self.metrics.count(&name, "retry", n, total);
            for (id, _) in &batch {
                self.defer(*id);
            }
            return Round::Backoff {
                reason: format!(
                    "HTTP {code} from {} without a per-instance result",
                    self.settings.url
                ),
                at_least: retry_after,
            };
        }
        let mut progressed = false;
        let mut stored = Vec::new();
        let mut stored_parts = Vec::new();
        for (id, part) in &batch {
            let size = part.bytes.len() as u64;
            let result = results
                .get(&part.sop_instance_uid)
                .cloned()
                .unwrap_or(InstanceResult::Unconfirmed);
            let marked = match result {
                InstanceResult::Stored => {
                    self.metrics.count(&name, "sent", 1, size);
                    self.deferred.remove(id);
                    stored.push(*id);
                    if self.transfers.is_some() {
                        stored_parts.push(part.bytes.clone());
                    }
                    continue;
                }
                InstanceResult::Failed {
                    reason,
                    retry: false,
                } => {
                    warn!(destination = %name, object = %hex::encode(id), reason = format!("{reason:#06x}"), "archive refused the object: dead letter");
                    self.metrics.count(&name, "failed", 1, size);
                    self.mark_failed(
                        *id,
                        format!(
                            "refused by the archive (HTTP {code}, failure reason {reason:#06x})"
                        ),
                    )
                    .await
                }
                InstanceResult::Failed { retry: true, .. } | InstanceResult::Unconfirmed => {
                    self.metrics.count(&name, "retry", 1, size);
                    self.defer(*id);
                    continue;
                }
            };
            self.deferred.remove(id);
            match marked {
                Ok(()) => progressed = true,
                Err(e) => warn!(destination = %name, error = %e, "cannot record delivery state"),
            }
        }
        if !stored.is_empty() {
            let spool = self.spool.clone();
            let dest = name.clone();
            let transfers = self.transfers.clone();
            let marked = tokio::task::spawn_blocking(move || {
                spool.mark_sent_all(&stored, &dest)?;
                if let Some(sink) = transfers {
                    // Off the settle path: the next request does not wait for the walk.
                    tokio::task::spawn_blocking(move || audit_sent(&sink, dest, &stored_parts));
                }
                Ok::<(), SpoolError>(())
            })
            .await
            .map_err(RecordError::from)
            .and_then(|r| r.map_err(RecordError::from));
            match marked {
                Ok(()) => progressed = true,
                Err(e) => warn!(destination = %name, error = %e, "cannot record delivery state"),
            }
        }
        if progressed {
            Round::Progress
        } else {
            Round::Backoff {
                reason: format!("HTTP {code}: no instance confirmed"),
                at_least: None,
            }
        }
    }

    /// Holds an unconfirmed instance back (doubling, 1 s .. backoff_max) so the instances
    /// behind it in the queue still flow.
    fn defer(&mut self, id: ObjectId) {
        let wait = match self.deferred.get(&id) {
            Some((_, last)) => last.saturating_mul(2).min(self.settings.backoff_max),
            None => self.settings.backoff_initial,
        };
        self.deferred
            .insert(id, (Instant::now() + jitter(wait), wait));
    }

    async fn mark_failed(&self, id: ObjectId, reason: String) -> Result<(), RecordError> {
        record(&self.spool, &self.settings.name, id, Some(reason)).await
    }
}

/// Status, `Retry-After` and body of a STOW response.
type Response = (reqwest::StatusCode, Option<Duration>, bytes::Bytes);

/// A batch and what became of its request.
struct Posted {
    batch: Vec<(ObjectId, Part)>,
    outcome: Result<Response, StowError>,
}

/// Everything a request task needs.
struct Request {
    client: reqwest::Client,
    url: String,
    pacer: Option<pace::Pacer>,
}

impl Request {
    /// POSTs the batch; `Err` for transport failures (no HTTP status, or a body cut short).
    async fn post(&self, batch: &[(ObjectId, Part)]) -> Result<Response, StowError> {
        let parts: Vec<Part> = batch.iter().map(|(_, p)| p.clone()).collect();
        let boundary = stow::boundary();
        let pieces = stow::body_pieces(&parts, &boundary);
        let length: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let body = match &self.pacer {
            Some(pacer) => reqwest::Body::wrap_stream(pace::paced(pieces, pacer.clone())),
            None => reqwest::Body::from(pieces.concat()),
        };
        let url = format!("{}/studies", self.url.trim_end_matches('/'));
        let response = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, stow::content_type(&boundary))
            .header(reqwest::header::ACCEPT, "application/dicom+json")
            .header(reqwest::header::CONTENT_LENGTH, length)
            .body(body)
            .send()
            .await
            .map_err(|error| StowError::Send {
                url: url.clone(),
                error,
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(3600)));
        let body = response
            .bytes()
            .await
            .map_err(|error| StowError::ReadBody {
                url,
                status: status.as_u16(),
                error,
            })?;
        Ok((status, retry_after, body))
    }
}

/// The HTTP client of a DICOMweb destination (STOW-RS pushes and the QIDO/WADO-RS pulls of
/// [`pull`]): the destination's rustls configuration (server CA, the box's client
/// identity), connect and request timeouts, no proxy.
pub(crate) fn http_client(settings: &UplinkSettings) -> Result<reqwest::Client, UplinkError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .timeout(settings.request_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .no_proxy();
    if let Some(tls) = &settings.tls {
        builder = builder.tls_backend_preconfigured((**tls).clone());
    }
    builder.build().map_err(|source| UplinkError::Client {
        name: settings.name.clone(),
        source,
    })
}

/// A transport error with its causes (TLS alerts say why a handshake failed).
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Hands the studies of a confirmed batch (read from the Part 10 bytes posted) to the
/// audit sink. Runs on a blocking thread.
fn audit_sent(sink: &gateway_dicom::TransferSink, destination: String, parts: &[bytes::Bytes]) {
    let mut tally = gateway_dicom::Tally::default();
    for part in parts {
        tally.add_part10(part);
    }
    if let Some(t) = tally.take_as(gateway_dicom::Direction::Sent { destination }) {
        let _ = sink.blocking_send(t);
    }
}

/// SOP Instance UID from the file meta group of a stored Part 10 object.
fn sop_instance_uid(part10: &[u8]) -> Option<String> {
    let meta = dicom_object::FileMetaTable::from_reader(part10.get(128..)?).ok()?;
    let uid = meta
        .media_storage_sop_instance_uid()
        .trim_end_matches(['\0', ' ']);
    (!uid.is_empty()).then(|| uid.to_string())
}

/// Up to ±20% random jitter, so many boxes do not retry in lock step.
pub(crate) fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::getrandom(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        32768
    };
    let factor = 0.8 + 0.4 * f64::from(r) / f64::from(u16::MAX);
    d.mul_f64(factor)
}

/// The exponential backoff of a failing destination, shared by the delivery loops: each
/// failure waits the current step with jitter and doubles the next (up to `max`); a
/// success starts again at `initial`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            step: initial,
        }
    }

    /// The destination works: the next failure waits `initial` again.
    pub(crate) fn reset(&mut self) {
        self.step = self.initial;
    }

    /// The step the next failure waits (before jitter), for logs.
    pub(crate) fn step(&self) -> Duration {
        self.step
    }

    /// A failure: the wait before the next attempt (the step with jitter); the step doubles.
    pub(crate) fn failed(&mut self) -> Duration {
        let wait = jitter(self.step);
        self.step = self.step.saturating_mul(2).min(self.max);
        wait
    }
}

/// Records what became of a queued object on a blocking thread: `None` sent (the
/// destination confirmed it), `Some(reason)` dead letter.
pub(crate) async fn record(
    spool: &Spool,
    destination: &str,
    id: ObjectId,
    failure: Option<String>,
) -> Result<(), RecordError> {
    let spool = spool.clone();
    let destination = destination.to_string();
    tokio::task::spawn_blocking(move || match failure {
        None => spool.mark_sent(&id, &destination),
        Some(reason) => spool.mark_failed(&id, &destination, &reason),
    })
    .await??;
    Ok(())
}

/// How a delivery loop's wait for work ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idle {
    /// `shutdown` turned true.
    Shutdown,
    /// Something was committed to the spool, or the gateway was disabled: look again.
    Woken,
    /// Nothing happened within the wait.
    Quiet,
}

/// Waits for a commit to the spool (`wake`), a pause, `shutdown` or the end of `wait`.
pub(crate) async fn wait_for_work(
    wake: &mut watch::Receiver<u64>,
    paused: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
    wait: Duration,
) -> Idle {
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => Idle::Shutdown,
        _ = wake.changed() => Idle::Woken,
        Ok(_) = paused.wait_for(|p| *p) => Idle::Woken,
        () = tokio::time::sleep(wait) => Idle::Quiet,
    }
}

/// Sleeps `wait` (a backoff); `false` if `shutdown` turned true first.
pub(crate) async fn sleep_unless_shutdown(
    wait: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => false,
        () = tokio::time::sleep(wait) => true,
    }
}

/// Holds a delivery loop while the gateway is disabled: logs the pause, waits for the
/// resume (`true`) or shutdown (`false`), logs the resume.
pub(crate) async fn hold_while_paused(
    service: &str,
    destination: &str,
    paused: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    info!(destination, "{service} paused: the gateway is disabled");
    let resumed = wait_unpaused(paused, shutdown).await;
    if resumed {
        info!(destination, "{service} resumed");
    }
    resumed
}

/// Waits until `paused` turns `false` (`true`) or `shutdown` turns `true` (`false`). A
/// pause whose sender is gone stays in force until shutdown.
pub(crate) async fn wait_unpaused(
    paused: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        () = async { let _ = shutdown.wait_for(|s| *s).await; } => false,
        Ok(_) = paused.wait_for(|p| !*p) => true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A transport failure reads as the transport's whole cause chain (what `spool status`
    /// showed when it was a string), and keeps the URL it was for.
    #[tokio::test]
    async fn transport_failure_reads_as_its_cause_chain() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let request = Request {
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            url: format!("http://127.0.0.1:{port}/dicomweb/"),
            pacer: None,
        };
        let Err(e) = request.post(&[]).await else {
            panic!("nothing listens there")
        };
        let StowError::Send { url, error } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(url, &format!("http://127.0.0.1:{port}/dicomweb/studies"));
        assert_eq!(e.to_string(), describe(error));
        assert!(e.to_string().contains(": "), "{e}");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let steps: Vec<Duration> = (0..5)
            .map(|_| {
                let step = backoff.step();
                let wait = backoff.failed();
                assert!(
                    wait >= step.mul_f64(0.8) && wait <= step.mul_f64(1.2),
                    "{wait:?}"
                );
                step
            })
            .collect();
        assert_eq!(steps, [1, 2, 4, 5, 5].map(Duration::from_secs));
        backoff.reset();
        assert_eq!(backoff.step(), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(10));
            assert!(
                j >= Duration::from_secs(8) && j <= Duration::from_secs(12),
                "{j:?}"
            );
        }
    }
}
