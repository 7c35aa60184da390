//! Results delivery to the clinic PACS: the queued objects of a `[[results.deliver]]`
//! kind = "dicom" destination go by C-STORE ([`gateway_dicom::scu`]) to the PACS or
//! viewer, oldest first. The DICOM sibling of [`crate::mllp`].
//!
//! One [`DimseDeliveryService`] per destination. It takes up to `batch` of the oldest
//! queued objects (and at most [`BATCH_MAX_BYTES`] of them, at least one), unseals them on a
//! blocking thread, opens ONE association proposing the batch's presentation contexts (one
//! per SOP class and transfer syntax; the gateway never transcodes) and sends them in queue
//! order. While a batch is sent the next one is read (so at most two batches are in
//! memory), and the outcomes are recorded in the spool in groups (one index flush each)
//! while the next objects are sent; a batch counts only once all its outcomes are
//! durable.
//!
//! The association is kept open while objects keep coming and released once the queue
//! has been empty for `idle_release` (default 2 s), so a study arriving instance by
//! instance from the pull does not open an association per instance. A batch that needs a
//! context the open association did not propose gets a new association (the old one is
//! released first). If a kept-open association turns out dead at its first use (the PACS
//! dropped it while idle), the object is sent once more on a new association before the
//! destination counts as failing.
//!
//! What each answer means:
//! - Success (0000) or Warning (0001, 0107, 0116, Bxxx): delivered. The object is marked
//!   sent in the spool (durable, on a blocking thread) only after the PACS's C-STORE-RSP.
//! - A failure a resend cannot fix ([`ScuError::retryable`] false: 0122 SOP class not
//!   supported, A9xx data set does not match, Cxxx cannot understand, a presentation
//!   context the PACS did not accept): dead letter, with the status code or the refused
//!   SOP class and transfer syntax as the reason. The rest of the queue goes on.
//! - Anything else (A7xx out of resources, 0213, connection refused, timeouts, an aborted
//!   or rejected association, a broken connection): the destination is failing. Nothing
//!   leaves the queue, the reason shows in `spool status`, and the next attempt waits with
//!   exponential backoff and jitter (`backoff_initial` .. `backoff_max`, forever).
//! - A stored object that cannot be unsealed or is not a storable Part 10 object: dead
//!   letter (as in [`crate::mllp`]).
//!
//! Delivery is at least once per destination: an object leaves the queue only after its
//! C-STORE-RSP said stored, so a crash between the response and the spool's record sends it
//! once more after the restart. A PACS keeps one copy per SOP Instance UID (a resend of the
//! same instance replaces or is ignored), which makes that resend harmless: exactly one
//! instance arrives at the PACS.
//!
//! Pause (the gateway disabled) and shutdown: the object in hand is finished (its C-STORE
//! is bounded by the SCU's DIMSE timeout), its outcome recorded, the association released
//! (bounded by the association timeout); the rest stays queued. Storage commitment
//! (N-ACTION/N-EVENT-REPORT) is not implemented: delivery ends at the C-STORE-RSP.
//!
//! No patient data in logs or errors: objects are named by their spool id only, the PACS by
//! AE title and address; reasons carry status codes and standard UIDs (SOP class, transfer
//! syntax), never instance UIDs.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use gateway_dicom::scu::{ObjectContext, ScuLink, ScuTls};
use gateway_dicom::{Scu, ScuError, ScuSettings, ScuTarget, StoreObject, StoreOutcome};
use gateway_spool::{ObjectId, Spool, SpoolError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    Backoff, Idle, Metrics, RecordError, hold_while_paused, sleep_unless_shutdown, wait_for_work,
};

/// Most objects one batch holds, whatever `batch` says (an association carries at most
/// 128 presentation contexts; one object needs at most one).
pub const BATCH_MAX_OBJECTS: usize = 128;
/// Unsealed bytes one batch holds at most (the object that crosses it is the last one).
pub const BATCH_MAX_BYTES: u64 = 64 << 20;

/// Settings of one `[[results.deliver]]` kind = "dicom" destination, built by `gatewayd`.
#[derive(Debug, Clone)]
pub struct DeliverSettings {
    /// The destination's name, also its spool queue.
    pub name: String,
    /// The PACS: host, port, called and calling AE titles.
    pub target: ScuTarget,
    /// The SCU's timeouts and PDU size.
    pub scu: ScuSettings,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Objects sent per association round (1 ..= [`BATCH_MAX_OBJECTS`]).
    pub batch: usize,
    /// How long an association stays open once the queue is empty.
    pub idle_release: Duration,
    /// DICOM over TLS (`tls_ca_file` set); `None`: plain DIMSE.
    pub tls: Option<ScuTls>,
}

impl DeliverSettings {
    /// Defaults for everything but the name and the PACS: the SCU's default timeouts,
    /// backoff 1 s .. 300 s, batches of 64, release after 2 s idle.
    pub fn new(name: String, target: ScuTarget) -> Self {
        Self {
            name,
            target,
            scu: ScuSettings::default(),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            batch: 64,
            idle_release: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// A batch being read from the spool (dropping it lets the read finish unused).
type ReadAhead = tokio::task::JoinHandle<Result<Vec<Item>, SpoolError>>;

/// Outcomes on their way to the spool: those waiting, and one record in flight (with one
/// index flush for all it holds) that the next C-STOREs overlap.
#[derive(Default)]
struct Records {
    /// Spool id and outcome: `None` stored, `Some(reason)` dead letter.
    waiting: Vec<(ObjectId, Option<String>)>,
    flight: Option<tokio::task::JoinHandle<Result<(), RecordError>>>,
    /// The stored objects of `waiting`, per study, for the audit trail.
    sent: gateway_dicom::Tally,
}

/// One queued object, unsealed and ready to send.
struct Item {
    id: ObjectId,
    object: StoreObject,
    /// What it is for the audit trail (read on the blocking thread that read the batch,
    /// only when the service has a transfer sink).
    audit: Option<gateway_dicom::transfers::Part10Identity>,
}

/// An open association and the contexts it was proposed with.
struct Open {
    association: ScuLink,
    proposed: HashSet<ObjectContext>,
}

/// What became of a batch.
enum Round {
    /// Every object was delivered or dead-lettered (or a pause cut the batch short).
    Progress,
    /// The destination is failing: back off, the reason goes to `spool status`.
    Backoff(String),
    /// Shutdown: the object in hand was finished.
    Stopped,
}

/// The worker of one `[[results.deliver]]` kind = "dicom" destination.
pub struct DimseDeliveryService {
    settings: DeliverSettings,
    scu: Scu,
    spool: Spool,
    metrics: Metrics,
    open: Option<Open>,
    /// `true` while the gateway is disabled: nothing is sent.
    paused: watch::Receiver<bool>,
    /// Where delivered studies go for the audit trail (DICOM instances transferred).
    transfers: Option<gateway_dicom::TransferSink>,
}

impl std::fmt::Debug for DimseDeliveryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DimseDeliveryService")
            .field("settings", &self.settings)
            .field("associated", &self.open.is_some())
            .finish_non_exhaustive()
    }
}

impl DimseDeliveryService {
    pub fn new(settings: DeliverSettings, spool: Spool, metrics: Metrics) -> Self {
        let mut scu = Scu::new(settings.target.clone(), settings.scu.clone());
        if let Some(tls) = &settings.tls {
            scu = scu.with_tls(tls.clone());
        }
        Self {
            settings,
            scu,
            spool,
            metrics,
            open: None,
            paused: watch::channel(false).1,
            transfers: None,
        }
    }

    /// Hands the studies of each group of delivered objects to `sink` for the audit
    /// trail, once their delivery is recorded in the spool.
    #[must_use]
    pub fn with_transfer_audit(mut self, sink: gateway_dicom::TransferSink) -> Self {
        self.transfers = Some(sink);
        self
    }

    /// Sends nothing while `paused` holds `true` (the object in hand is finished and the
    /// association released); objects stay queued. Without this call it never pauses.
    #[must_use]
    pub fn with_paused(mut self, paused: watch::Receiver<bool>) -> Self {
        self.paused = paused;
        self
    }

    /// Delivers the destination's queue until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let name = self.settings.name.clone();
        info!(destination = %name, peer = %self.settings.target.peer(), "C-STORE delivery started");
        let mut wake = self.spool.subscribe();
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let mut paused = self.paused.clone();
        // The next batch, read while the current one is sent.
        let mut ahead: Option<ReadAhead> = None;
        // Since when the queue is empty under an open association.
        let mut idle_since: Option<Instant> = None;
        while !*shutdown.borrow() {
            if *paused.borrow() {
                ahead = None;
                self.close().await;
                if hold_while_paused("C-STORE delivery", &name, &mut paused, &mut shutdown).await {
                    continue;
                }
                break;
            }
            let mut batch = match ahead.take() {
                Some(task) => task.await.unwrap_or_else(|_| Ok(Vec::new())),
                None => Ok(Vec::new()),
            };
            if batch.as_ref().is_ok_and(Vec::is_empty) {
                // Seen before the queue is read: an object committed after the read wakes
                // us. (A batch read ahead may predate a commit: an empty one is read again.)
                wake.borrow_and_update();
                batch = self
                    .read_batch(HashSet::new())
                    .await
                    .unwrap_or_else(|_| Ok(Vec::new()));
            }
            let batch = batch.unwrap_or_else(|e| {
                warn!(destination = %name, error = %e, "cannot read queued objects");
                Vec::new()
            });
            if batch.is_empty() {
                // An open association is kept for `idle_release` of empty queue (counted
                // from the first empty look: commits for other destinations wake us too).
                let mut wait = Duration::from_secs(30);
                if self.open.is_some() {
                    let idle = idle_since.get_or_insert_with(Instant::now).elapsed();
                    match self.settings.idle_release.checked_sub(idle) {
                        Some(left) if !left.is_zero() => wait = left,
                        _ => {
                            idle_since = None;
                            self.close().await;
                        }
                    }
                }
                if wait_for_work(&mut wake, &mut paused, &mut shutdown, wait).await
                    == Idle::Shutdown
                {
                    break;
                }
                continue;
            }
            idle_since = None;
            ahead = Some(self.read_batch(batch.iter().map(|item| item.id).collect()));
            match self.deliver(batch, &shutdown, &paused).await {
                Round::Progress => backoff.reset(),
                Round::Stopped => break,
                Round::Backoff(reason) => {
                    // Read again after the wait, in queue order.
                    ahead = None;
                    self.close().await;
                    warn!(destination = %name, reason, retry_in = ?backoff.step(), "delivery failed; will retry");
                    self.spool.set_destination_error(&name, Some(reason));
                    if !sleep_unless_shutdown(backoff.failed(), &mut shutdown).await {
                        break;
                    }
                }
            }
        }
        self.close().await;
        info!(destination = %name, "C-STORE delivery stopped");
    }

    /// Starts reading the oldest queued objects but those in `skip` (the batch being sent),
    /// unsealed, up to the batch limits, on a blocking thread. An object that cannot be
    /// unsealed or is no storable Part 10 object is dead-lettered on the way.
    fn read_batch(&self, skip: HashSet<ObjectId>) -> ReadAhead {
        let spool = self.spool.clone();
        let name = self.settings.name.clone();
        let limit = self.settings.batch.clamp(1, BATCH_MAX_OBJECTS);
        let audit = self.transfers.is_some();
        tokio::task::spawn_blocking(move || {
            let mut batch = Vec::new();
            let mut bytes = 0u64;
            let queued = spool.queued(&name, limit.saturating_add(skip.len()))?;
            for id in queued
                .into_iter()
                .filter(|id| !skip.contains(id))
                .take(limit)
            {
                let plain = match spool.read(&id) {
                    Ok((_, plain)) => plain,
                    Err(e) => {
                        warn!(destination = %name, object = %id.to_hex(), error = %e, "queued object unreadable: dead letter");
                        spool.mark_failed(&id, &name, &format!("unreadable in the spool: {e}"))?;
                        continue;
                    }
                };
                let size = plain.len() as u64;
                let identity = audit
                    .then(|| gateway_dicom::transfers::identify_part10(&plain))
                    .flatten();
                match StoreObject::from_part10(plain) {
                    Ok(object) => batch.push(Item {
                        id,
                        object,
                        audit: identity,
                    }),
                    Err(e) => {
                        warn!(destination = %name, object = %id.to_hex(), error = %e, "queued object cannot be sent: dead letter");
                        spool.mark_failed(&id, &name, &e.to_string())?;
                        continue;
                    }
                }
                bytes = bytes.saturating_add(size);
                if bytes >= BATCH_MAX_BYTES {
                    break;
                }
            }
            Ok(batch)
        })
    }

    /// Sends a batch in queue order on one association (opened if needed). Outcomes are
    /// recorded while the next objects are sent; all of them before this returns.
    async fn deliver(
        &mut self,
        batch: Vec<Item>,
        shutdown: &watch::Receiver<bool>,
        paused: &watch::Receiver<bool>,
    ) -> Round {
        let mut records = Records::default();
        let round = self.send(batch, shutdown, paused, &mut records).await;
        match (self.record(&mut records, true).await, round) {
            (Err(reason), Round::Progress) => Round::Backoff(reason),
            (_, round) => round,
        }
    }

    /// The C-STOREs of [`Self::deliver`]; outcomes are noted in `records`.
    async fn send(
        &mut self,
        batch: Vec<Item>,
        shutdown: &watch::Receiver<bool>,
        paused: &watch::Receiver<bool>,
        records: &mut Records,
    ) -> Round {
        let needed: HashSet<ObjectContext> = batch.iter().map(|i| i.object.context()).collect();
        let unfit = self
            .open
            .as_ref()
            .is_some_and(|open| !open.association.is_usable() || !needed.is_subset(&open.proposed));
        if unfit {
            self.close().await;
        }
        // A kept-open association may have been dropped by the PACS while idle: its first
        // failure gets one more try on a new association.
        let mut unproven = self.open.is_some();
        let mut items = batch.into_iter();
        let mut next = items.next();
        while let Some(item) = next.take() {
            if *shutdown.borrow() {
                return Round::Stopped;
            }
            if *paused.borrow() {
                return Round::Progress;
            }
            let open = match self.open.as_mut() {
                Some(open) => open,
                None => {
                    let mut stop = shutdown.clone();
                    let connected = tokio::select! {
                        _ = stop.wait_for(|s| *s) => return Round::Stopped,
                        c = self.scu.open(needed.iter().cloned()) => c,
                    };
                    match connected {
                        Ok(association) => self.open.insert(Open {
                            association,
                            proposed: needed.clone(),
                        }),
                        Err(ScuError::NoContextAccepted { peer, .. }) => {
                            // The PACS takes none of these SOP classes in these transfer
                            // syntaxes: a resend cannot change that.
                            for item in std::iter::once(item).chain(items) {
                                let context = item.object.context();
                                let refused = ScuError::ContextNotAccepted {
                                    peer: peer.clone(),
                                    sop_class_uid: context.sop_class_uid,
                                    transfer_syntax_uid: context.transfer_syntax_uid,
                                };
                                self.settle(records, &item, Some(&refused));
                            }
                            return Round::Progress;
                        }
                        Err(e) => return self.retry(&item, e),
                    }
                }
            };
            match open.association.store(&item.object).await {
                Ok(outcome) => {
                    unproven = false;
                    if let StoreOutcome::Warning { status } = outcome {
                        debug!(destination = %self.settings.name, object = %item.id.to_hex(), status = format!("{status:04X}"), "stored with a warning");
                    }
                    self.settle(records, &item, None);
                }
                Err(e) if !e.retryable() => {
                    unproven = false;
                    self.settle(records, &item, Some(&e));
                }
                Err(e) if unproven && !open.association.is_usable() => {
                    debug!(destination = %self.settings.name, error = %e, "kept-open association is gone: reconnecting");
                    unproven = false;
                    self.open = None;
                    next = Some(item);
                    continue;
                }
                Err(e) => return self.retry(&item, e),
            };
            // Outcomes so far go to the spool while the next object is sent.
            if let Err(reason) = self.record(records, false).await {
                return Round::Backoff(reason);
            }
            next = items.next();
        }
        Round::Progress
    }

    /// The object in hand could not be delivered now: it stays queued, the destination
    /// is failing.
    fn retry(&self, item: &Item, error: ScuError) -> Round {
        self.metrics.count(
            &self.settings.name,
            "retry",
            1,
            item.object.data_set().len() as u64,
        );
        Round::Backoff(error.to_string())
    }

    /// Notes what the PACS said about an object (counted and logged now, recorded in the
    /// spool by [`Self::record`]): `None` stored (it leaves the queue), `Some(refusal)`
    /// refused for good (dead letter with the reason).
    fn settle(&self, records: &mut Records, item: &Item, refusal: Option<&ScuError>) {
        let name = &self.settings.name;
        // The PACS answers: `spool status` stops showing the last failure.
        self.spool.set_destination_error(name, None);
        let size = item.object.data_set().len() as u64;
        let reason = match refusal {
            None => {
                self.metrics.count(name, "sent", 1, size);
                if self.transfers.is_some() {
                    let sop_class = &item.object.meta().sop_class_uid;
                    match &item.audit {
                        Some(id) => records.sent.add(
                            id.study_uid.as_deref(),
                            id.patient_id.as_deref(),
                            sop_class,
                        ),
                        None => records.sent.add(None, None, sop_class),
                    }
                }
                None
            }
            Some(error) => {
                warn!(destination = %name, object = %item.id.to_hex(), reason = %error, "PACS refused the object: dead letter");
                self.metrics.count(name, "failed", 1, size);
                Some(error.to_string())
            }
        };
        records.waiting.push((item.id, reason));
    }

    /// Moves noted outcomes to the spool: collects a finished record in flight and starts
    /// one for everything waiting (dead letters one by one, the sent objects with one
    /// index flush). With `drain`, returns once all is durable. `Err` with the reason for
    /// `spool status` when the spool could not record: those objects stay queued and the
    /// destination backs off rather than resending them at once.
    async fn record(&self, records: &mut Records, drain: bool) -> Result<(), String> {
        loop {
            if let Some(flight) = records.flight.take_if(|f| drain || f.is_finished()) {
                flight
                    .await
                    .unwrap_or_else(|e| Err(RecordError::from(e)))
                    .map_err(|e| {
                        // Still queued: sent again later, which the PACS takes as the same
                        // instance.
                        warn!(destination = %self.settings.name, error = %e, "cannot record delivery state");
                        format!("cannot record the delivery state in the spool: {e}")
                    })?;
            }
            if records.flight.is_none() && !records.waiting.is_empty() {
                let (spool, name) = (self.spool.clone(), self.settings.name.clone());
                let outcomes = std::mem::take(&mut records.waiting);
                let delivered =
                    std::mem::take(&mut records.sent).take_as(gateway_dicom::Direction::Sent {
                        destination: name.clone(),
                    });
                let transfers = self.transfers.clone();
                records.flight = Some(tokio::task::spawn_blocking(move || {
                    let mut sent = Vec::with_capacity(outcomes.len());
                    for (id, failure) in outcomes {
                        match failure {
                            None => sent.push(id),
                            Some(reason) => spool.mark_failed(&id, &name, &reason)?,
                        }
                    }
                    if !sent.is_empty() {
                        spool.mark_sent_all(&sent, &name)?;
                    }
                    if let (Some(sink), Some(t)) = (transfers, delivered) {
                        let _ = sink.blocking_send(t);
                    }
                    Ok(())
                }));
            }
            if !drain || records.flight.is_none() {
                return Ok(());
            }
        }
    }

    /// Releases the open association (an unusable one is just dropped).
    async fn close(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        if open.association.is_usable()
            && let Err(e) = open.association.release().await
        {
            debug!(destination = %self.settings.name, error = %e, "association release failed");
        }
    }
}
