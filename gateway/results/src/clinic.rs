//! The clinic's side: what came back for each of its appointments, pulling the announced
//! studies into the spool, storing the reports for the EMR, and the kiosk's view.
//!
//! [`ClinicResults::run`] owns the work; the state is shared (behind a mutex) with the
//! kiosk's [`ClinicResultsView`]. Every change is sealed to disk (a blocking thread) before
//! it counts: a notice or report is acknowledged to the core only after that, so the core
//! sends again whatever a crash lost.
//!
//! - notice: the highest `seq` wins; announced studies are pulled again whenever a newer
//!   notice than the last pulled one arrived (so late instances come too) and after a failed
//!   pull (backoff 5 s doubling to 5 min).
//! - pull: QIDO-RS lists each study; an instance whose SOP Instance UID the spool already
//!   holds is counted and skipped; the others are retrieved by WADO-RS (at most the
//!   uplink's `max_concurrent_requests` at once) and streamed through the Patient ID
//!   rewriter (`gateway_dicom::reconcile`, IHE IRWF; off with `rewrite_patient_id = false`)
//!   into a spool ingest as a result (`Spool::begin_result`): sealed and durable before it
//!   is counted, and queued only for the results destinations. Nothing is in clear on disk.
//! - report: PID-3 rewritten the same way (`gateway_hl7::reconcile`), encoded back in the
//!   set it came in, stored as an HL7 result (`Spool::store_result_messages`, deduplicated
//!   by the core's report id) for the EMR uplink; its status, issue time and OBX text kept
//!   in the sealed state for physicians at the kiosk (the spool deletes it once delivered).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use gateway_booking::{
    AppointmentResults, AppointmentView, BoxFuture, ReportState, ReportText, ResultsSource,
    ResultsUnavailable, SealKey,
};
use gateway_regional::results::{ClinicLink, Incoming, WireNotice, WireReport};
use gateway_spool::{Committed, DeliveryState, MessageIn, ObjectId, ObjectMeta, Spool};
use gateway_uplink::pull::{InstanceRef, Piece, PullClient};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::state::StateFile;
use crate::{ResultsError, now_unix};

const STATE_FILE: &str = "clinic.sealed";
const STATE_ROLE: &str = "clinic results";
/// Bytes of a retrieved object buffered until its file meta group is read.
const MAX_META_BYTES: usize = 1 << 20;
const RETRY_INITIAL: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How often the instance gauges are refreshed when nothing else happens.
const GAUGES_EVERY: Duration = Duration::from_secs(30);
/// The instance gauges cover the appointments changed within this window.
const GAUGES_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// What the clinic's results service needs from the configuration.
#[derive(Debug, Clone)]
pub struct ClinicSettings {
    /// The core results come from (`booking.core`).
    pub core: String,
    /// Write the clinic's Patient ID into returned objects and reports.
    pub rewrite_patient_id: bool,
    /// The Issuer of Patient ID written with it.
    pub issuer: String,
    /// The `[[results.deliver]]` kind = "dicom" destinations (for the delivered count).
    pub image_destinations: Vec<String>,
    /// The mllp-tls uplinks reports go to (for the delivered state).
    pub report_destinations: Vec<String>,
    /// Instances retrieved at once (the source uplink's `max_concurrent_requests`): no
    /// more retrievals, writer threads or buffers than that are alive at a time.
    pub pull_concurrency: usize,
}

/// The report as kept for the kiosk (sealed with the rest).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ReportKept {
    report_id: String,
    object: String,
    status: String,
    issued: Option<String>,
    titles: Vec<String>,
    text: Vec<String>,
}

/// What came back for one appointment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Returned {
    accession: String,
    patient_id: String,
    study_uids: BTreeSet<String>,
    announced: u64,
    complete: bool,
    notice_seq: u64,
    pulled_seq: u64,
    /// Spool ids (hex) of the instances stored for it.
    objects: BTreeSet<String>,
    report: Option<ReportKept>,
    updated_unix: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ClinicState {
    appointments: BTreeMap<String, Returned>,
}

type Shared = Arc<Mutex<ClinicState>>;

fn lock(state: &Shared) -> MutexGuard<'_, ClinicState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The clinic's results service.
pub struct ClinicResults {
    settings: ClinicSettings,
    spool: Spool,
    pull: PullClient,
    file: StateFile,
    state: Shared,
    incoming: mpsc::Receiver<Incoming>,
    view: ClinicResultsView,
    metrics: crate::Metrics,
}

impl std::fmt::Debug for ClinicResults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClinicResults")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The kiosk's view of the results (cheap to clone).
#[derive(Clone)]
pub struct ClinicResultsView {
    settings: Arc<ClinicSettings>,
    spool: Spool,
    state: Shared,
}

impl std::fmt::Debug for ClinicResultsView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClinicResultsView").finish_non_exhaustive()
    }
}

impl ClinicResults {
    /// Opens the state in `dir` (blocking) and returns the service, the link the clinic's
    /// exchange hands notices and reports to, and the kiosk's view.
    pub fn open(
        settings: ClinicSettings,
        spool: Spool,
        pull: PullClient,
        seal: Arc<SealKey>,
        dir: &Path,
        metrics: crate::Metrics,
    ) -> Result<(Self, ClinicLink, ClinicResultsView), ResultsError> {
        let file = StateFile::new(seal, dir, STATE_FILE, STATE_ROLE)?;
        let state: Shared = Arc::new(Mutex::new(file.load()?));
        let (tx, rx) = mpsc::channel(64);
        let view = ClinicResultsView {
            settings: Arc::new(settings.clone()),
            spool: spool.clone(),
            state: Arc::clone(&state),
        };
        Ok((
            Self {
                settings,
                spool,
                pull,
                file,
                state,
                incoming: rx,
                view: view.clone(),
                metrics,
            },
            ClinicLink { incoming: tx },
            view,
        ))
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        info!(core = %self.settings.core, "results (clinic) started");
        let mut retry = RETRY_INITIAL;
        let mut next_pull = tokio::time::Instant::now();
        loop {
            self.update_gauges().await;
            let due = self.pull_due();
            let message = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                Some(message) = self.incoming.recv() => Some(message),
                () = tokio::time::sleep_until(next_pull), if due => None,
                () = tokio::time::sleep(GAUGES_EVERY), if !due => continue,
            };
            if let Some(message) = message {
                self.on_incoming(message).await;
                continue;
            }
            let pulled = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                pulled = self.pull_due_studies() => pulled,
            };
            match pulled {
                Ok(()) => retry = RETRY_INITIAL,
                Err(e) => {
                    self.metrics.pull_failed();
                    warn!(error = %e, retry_in = ?retry, "results (clinic): pull failed; will retry");
                    next_pull = tokio::time::Instant::now() + retry;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
        info!("results (clinic) stopped");
    }

    /// `gateway_results_instances{state}` over the appointments changed in the last
    /// [`GAUGES_WINDOW`] (reads the spool's records on a blocking thread).
    async fn update_gauges(&self) {
        let (view, metrics) = (self.view.clone(), self.metrics.clone());
        let since = now_unix().saturating_sub(GAUGES_WINDOW.as_secs());
        let _ = tokio::task::spawn_blocking(move || {
            let ids: Vec<String> = lock(&view.state)
                .appointments
                .iter()
                .filter(|(_, r)| r.updated_unix >= since)
                .map(|(id, _)| id.clone())
                .collect();
            let (mut a, mut r, mut d, mut f) = (0, 0, 0, 0);
            for s in ids.iter().filter_map(|id| view.summary(id)) {
                a += s.images_announced;
                r += s.images_received;
                d += s.images_delivered;
                f += s.images_failed;
            }
            metrics.set_instances(a, r, d, f);
        })
        .await;
    }

    fn pull_due(&self) -> bool {
        lock(&self.state)
            .appointments
            .values()
            .any(|r| r.notice_seq > r.pulled_seq)
    }

    async fn save(&self) -> Result<(), ResultsError> {
        let value =
            serde_json::to_value(&*lock(&self.state)).map_err(|_| ResultsError::Corrupt {
                path: STATE_FILE.into(),
            })?;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.save(&value)).await?
    }

    async fn on_incoming(&mut self, message: Incoming) {
        let (done, recorded) = match message {
            Incoming::Notice {
                appointment,
                notice,
                done,
            } => ((done, "notice"), self.on_notice(&appointment, notice).await),
            Incoming::Report {
                appointment,
                report,
                done,
            } => ((done, "report"), self.on_report(&appointment, report).await),
        };
        let (done, kind) = done;
        if let Err(e) = &recorded {
            self.metrics.message(kind, "failed");
            warn!(error = %e, "results (clinic): not recorded; the core sends it again");
        } else {
            self.metrics.message(kind, "recorded");
        }
        let _ = done.send(recorded.is_ok());
    }

    async fn on_notice(
        &mut self,
        appointment: &AppointmentView,
        notice: WireNotice,
    ) -> Result<(), ResultsError> {
        {
            let mut state = lock(&self.state);
            let r = entry(&mut state, appointment);
            if notice.seq <= r.notice_seq {
                return Ok(());
            }
            r.notice_seq = notice.seq;
            r.accession = notice.accession;
            r.study_uids.extend(
                notice
                    .study_uids
                    .into_iter()
                    .filter(|u| gateway_id::dicom_uid(u).is_some()),
            );
            r.announced = r.announced.max(notice.instances);
            r.complete |= notice.complete;
            r.updated_unix = now_unix();
        }
        self.save().await?;
        info!(appointment = %appointment.id, instances = notice.instances, complete = notice.complete, "results notice recorded");
        Ok(())
    }

    async fn on_report(
        &mut self,
        appointment: &AppointmentView,
        report: WireReport,
    ) -> Result<(), ResultsError> {
        if lock(&self.state)
            .appointments
            .get(&appointment.id)
            .and_then(|r| r.report.as_ref())
            .is_some_and(|k| k.report_id == report.report_id)
        {
            return Ok(());
        }
        let kept = read_report(&report.hl7);
        let text = if self.settings.rewrite_patient_id {
            let clinic = gateway_hl7::reconcile::ClinicIdentity {
                patient_id: appointment.patient_id.clone(),
                issuer: self.settings.issuer.clone(),
            };
            gateway_hl7::reconcile::rewrite_pid_text(&report.hl7, &clinic, &self.settings.core)
                .map_err(|e| ResultsError::Report {
                    reason: e.to_string(),
                })?
        } else {
            report.hl7.clone()
        };
        let charset = match report.charset.parse() {
            Ok(gateway_hl7::charset::CharsetOverride::Fixed(c)) => c,
            _ => gateway_hl7::charset::Charset::Utf8,
        };
        let item = MessageIn {
            key: format!("results|{}|{}", self.settings.core, report.report_id),
            message_type: "ORU^R01".into(),
            charset: charset.name().into(),
            source: self.settings.core.clone(),
            bytes: charset.encode(&text),
        };
        let spool = self.spool.clone();
        let stored = tokio::task::spawn_blocking(move || {
            spool
                .store_result_messages(std::slice::from_ref(&item))
                .pop()
        })
        .await?;
        let id = match stored {
            Some(Ok(Committed::Stored(id) | Committed::Duplicate(id))) => id,
            Some(Err(e)) => return Err(e.into()),
            None => {
                return Err(ResultsError::Report {
                    reason: "the spool returned no outcome".into(),
                });
            }
        };
        {
            let mut state = lock(&self.state);
            let r = entry(&mut state, appointment);
            r.accession = report.accession;
            r.report = Some(ReportKept {
                report_id: report.report_id,
                object: hex::encode(id),
                ..kept
            });
            r.updated_unix = now_unix();
        }
        self.save().await?;
        info!(appointment = %appointment.id, "report stored for the EMR");
        Ok(())
    }

    /// Pulls every study announced since its last pull; stops at the first failure.
    async fn pull_due_studies(&mut self) -> Result<(), ResultsError> {
        let due: Vec<(String, u64, Vec<String>, String)> = lock(&self.state)
            .appointments
            .iter()
            .filter(|(_, r)| r.notice_seq > r.pulled_seq)
            .map(|(id, r)| {
                (
                    id.clone(),
                    r.notice_seq,
                    r.study_uids.iter().cloned().collect(),
                    r.patient_id.clone(),
                )
            })
            .collect();
        for (appointment, seq, studies, patient_id) in due {
            for study in studies {
                let stored = self.pull_study(&study, &patient_id).await?;
                let mut state = lock(&self.state);
                if let Some(r) = state.appointments.get_mut(&appointment) {
                    r.objects.extend(stored.iter().map(hex::encode));
                    r.updated_unix = now_unix();
                }
            }
            if let Some(r) = lock(&self.state).appointments.get_mut(&appointment) {
                r.pulled_seq = r.pulled_seq.max(seq);
            }
            self.save().await?;
            info!(%appointment, "announced results pulled into the spool");
        }
        Ok(())
    }

    /// Lists one study and brings every instance into the spool; the ids of all of them.
    async fn pull_study(
        &self,
        study: &str,
        patient_id: &str,
    ) -> Result<Vec<ObjectId>, ResultsError> {
        let refs = self
            .pull
            .instances_of_study(study)
            .await
            .map_err(|e| ResultsError::Pull {
                reason: e.to_string(),
            })?;
        let mut ids = Vec::with_capacity(refs.len());
        let mut tasks = tokio::task::JoinSet::new();
        for r in refs {
            let spool = self.spool.clone();
            let sop = r.sop_instance_uid.clone();
            let have = tokio::task::spawn_blocking(move || spool.stored_instance(&sop)).await??;
            if let Some(id) = have.first() {
                ids.push(*id);
                continue;
            }
            let identity = self.settings.rewrite_patient_id.then(|| {
                gateway_dicom::reconcile::ClinicIdentity {
                    patient_id: patient_id.to_owned(),
                    issuer: self.settings.issuer.clone(),
                }
            });
            while tasks.len() >= self.settings.pull_concurrency.max(1) {
                if let Some(done) = tasks.join_next().await {
                    ids.push(done??);
                }
            }
            let (pull, spool) = (self.pull.clone(), self.spool.clone());
            tasks.spawn(async move { pull_one(&pull, &spool, r, identity).await });
        }
        while let Some(done) = tasks.join_next().await {
            ids.push(done??);
        }
        Ok(ids)
    }
}

fn entry<'s>(state: &'s mut ClinicState, appointment: &AppointmentView) -> &'s mut Returned {
    state
        .appointments
        .entry(appointment.id.clone())
        .or_insert_with(|| Returned {
            patient_id: appointment.patient_id.clone(),
            ..Returned::default()
        })
}

/// Retrieves one instance into the spool: the WADO-RS bytes go through the rewriter into a
/// result ingest on a blocking thread, committed only after [`Piece::Done`].
async fn pull_one(
    pull: &PullClient,
    spool: &Spool,
    r: InstanceRef,
    identity: Option<gateway_dicom::reconcile::ClinicIdentity>,
) -> Result<ObjectId, ResultsError> {
    let (tx, rx) = mpsc::channel::<Piece>(8);
    let spool = spool.clone();
    let study = r.study_uid.clone();
    let writer = tokio::task::spawn_blocking(move || store_pieces(&spool, rx, identity, &study));
    let fetched = pull.retrieve_into(&r, &tx).await;
    drop(tx);
    let stored = writer.await?;
    fetched.map_err(|e| ResultsError::Pull {
        reason: e.to_string(),
    })?;
    stored
}

/// Blocking: rewrite and seal the streamed pieces; commit at `Done`.
fn store_pieces(
    spool: &Spool,
    mut rx: mpsc::Receiver<Piece>,
    identity: Option<gateway_dicom::reconcile::ClinicIdentity>,
    study: &str,
) -> Result<ObjectId, ResultsError> {
    let bad = |reason: String| ResultsError::Pull { reason };
    let mut rewriter = identity.map(gateway_dicom::reconcile::Rewriter::new);
    let mut ingest: Option<gateway_spool::Ingest> = None;
    let mut head: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let put = |bytes: &[u8],
               ingest: &mut Option<gateway_spool::Ingest>,
               head: &mut Vec<u8>|
     -> Result<(), ResultsError> {
        if let Some(i) = ingest.as_mut() {
            return Ok(i.write(bytes)?);
        }
        head.extend_from_slice(bytes);
        match gateway_dicom::part10::read(head) {
            Ok(meta) => {
                let mut i = spool.begin_result(ObjectMeta {
                    sop_instance_uid: meta.sop_instance_uid,
                    sop_class_uid: meta.sop_class_uid,
                    transfer_syntax_uid: meta.transfer_syntax_uid,
                    source: "results".into(),
                })?;
                i.set_study_instance_uid(study);
                i.write(head)?;
                head.clear();
                *ingest = Some(i);
                Ok(())
            }
            Err(_) if head.len() < MAX_META_BYTES => Ok(()),
            Err(e) => Err(bad(format!(
                "retrieved object has no readable file meta: {e}"
            ))),
        }
    };
    while let Some(piece) = rx.blocking_recv() {
        match piece {
            Piece::Bytes(bytes) => {
                out.clear();
                match rewriter.as_mut() {
                    Some(r) => r
                        .feed(&bytes, &mut out)
                        .map_err(|e| bad(format!("patient id rewrite: {e}")))?,
                    None => out.extend_from_slice(&bytes),
                }
                put(&out, &mut ingest, &mut head)?;
            }
            Piece::Done => {
                out.clear();
                if let Some(r) = rewriter.take() {
                    r.finish(&mut out)
                        .map_err(|e| bad(format!("patient id rewrite: {e}")))?;
                }
                put(&out, &mut ingest, &mut head)?;
                let Some(i) = ingest.take() else {
                    return Err(bad("retrieved object ended before its file meta".into()));
                };
                return match i.commit()? {
                    Committed::Stored(id) | Committed::Duplicate(id) => Ok(id),
                };
            }
        }
    }
    Err(bad("the retrieval ended early".into()))
}

/// Status, issue time and OBX text of an ORU^R01 (for the kiosk).
fn read_report(text: &str) -> ReportKept {
    let mut kept = ReportKept::default();
    let Ok(message) = gateway_hl7::parse::parse(text) else {
        return kept;
    };
    for seg in message.segments() {
        let field = |n: usize| seg.field(n).map(|f| f.value()).unwrap_or_default();
        match seg.name() {
            "OBR" => {
                kept.status = match field(25).trim() {
                    "F" => "final",
                    "C" => "corrected",
                    "A" => "amended",
                    _ => "preliminary",
                }
                .into();
                kept.issued = hl7_time(&field(22));
            }
            "OBX" => {
                let title = seg
                    .field(3)
                    .and_then(|f| f.repetition(1))
                    .map(|r| {
                        let t = r.value(2);
                        if t.is_empty() { r.value(1) } else { t }
                    })
                    .unwrap_or_default();
                kept.titles.push(title);
                kept.text.push(
                    seg.field(5)
                        .map(|f| {
                            f.repetitions()
                                .map(|r| r.value(1))
                                .collect::<Vec<_>>()
                                .join("\n")
                        })
                        .unwrap_or_default(),
                );
            }
            _ => {}
        }
    }
    if kept.status.is_empty() {
        kept.status = "preliminary".into();
    }
    kept
}

/// `YYYYMMDDHHMM[SS]` as RFC 3339 without offset (`None` when it is not that).
fn hl7_time(ts: &str) -> Option<String> {
    let digits: String = ts.chars().take_while(char::is_ascii_digit).collect();
    let part = |a: usize, b: usize| digits.get(a..b);
    Some(format!(
        "{}-{}-{}T{}:{}:{}",
        part(0, 4)?,
        part(4, 6)?,
        part(6, 8)?,
        part(8, 10).unwrap_or("00"),
        part(10, 12).unwrap_or("00"),
        part(12, 14).unwrap_or("00"),
    ))
}

impl ClinicResultsView {
    /// Blocking: the kiosk's summary of one appointment.
    fn summary(&self, appointment_id: &str) -> Option<AppointmentResults> {
        let r = lock(&self.state)
            .appointments
            .get(appointment_id)
            .cloned()?;
        let confirmed = |hex_id: &str, destinations: &[String]| -> (bool, bool) {
            let Some(id) = hex::decode(hex_id)
                .ok()
                .and_then(|b| ObjectId::try_from(b.as_slice()).ok())
            else {
                return (false, false);
            };
            match self.spool.record(&id) {
                Ok(Some(record)) => {
                    let mine = record
                        .destinations
                        .iter()
                        .filter(|d| destinations.contains(&d.name));
                    let states: Vec<&DeliveryState> = mine.map(|d| &d.state).collect();
                    (
                        !states.is_empty() && states.iter().all(|s| **s == DeliveryState::Sent),
                        states
                            .iter()
                            .any(|s| matches!(s, DeliveryState::Failed { .. })),
                    )
                }
                _ => (false, false),
            }
        };
        let (mut delivered, mut failed) = (0u64, 0u64);
        for o in &r.objects {
            let (d, f) = confirmed(o, &self.settings.image_destinations);
            delivered += u64::from(d);
            failed += u64::from(f);
        }
        let report = r.report.as_ref().map(|k| ReportState {
            status: k.status.clone(),
            issued: k.issued.clone(),
            received: true,
            delivered: confirmed(&k.object, &self.settings.report_destinations).0,
        });
        let updated = jiff::Timestamp::from_second(i64::try_from(r.updated_unix).unwrap_or(0))
            .map(|t| t.to_string())
            .unwrap_or_default();
        Some(AppointmentResults {
            appointment_id: appointment_id.to_owned(),
            accession: (!r.accession.is_empty()).then(|| r.accession.clone()),
            study_uids: r.study_uids.iter().cloned().collect(),
            images_announced: r.announced,
            images_received: r.objects.len() as u64,
            images_delivered: delivered,
            images_failed: failed,
            complete: r.complete,
            report,
            updated,
        })
    }
}

impl ResultsSource for ClinicResultsView {
    fn results_of(
        &self,
        appointment_id: &str,
    ) -> BoxFuture<'static, Result<Option<AppointmentResults>, ResultsUnavailable>> {
        let (view, id) = (self.clone(), appointment_id.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || view.summary(&id))
                .await
                .map_err(|_| ResultsUnavailable::Unavailable)
        })
    }

    fn report_text(
        &self,
        appointment_id: &str,
    ) -> BoxFuture<'static, Result<Option<ReportText>, ResultsUnavailable>> {
        let kept = lock(&self.state)
            .appointments
            .get(appointment_id)
            .and_then(|r| r.report.clone());
        Box::pin(async move {
            Ok(kept.map(|k| ReportText {
                status: k.status,
                issued: k.issued,
                text: k.text,
                titles: k.titles,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kiosk_copy_of_a_report_has_its_status_time_and_text() {
        let text = "MSH|^~\\&|RIS|CORE|GW|CORE|20270112103000||ORU^R01|M1|P|2.5.1|||||JPN||UNICODE UTF-8\r\
                    PID|1||ZZPID1^^^CORE\r\
                    OBR|1|apt-1|RB1|CT^CT chest||||||||||||||RB1||||20270112102500|||F\r\
                    OBX|1|TX|FND^所見||肺野に異常なし~縦隔正常||||||F\r\
                    OBX|2|TX|IMP||異常なし \\T\\ 経過観察不要||||||F\r";
        let kept = read_report(text);
        assert_eq!(kept.status, "final");
        assert_eq!(kept.issued.as_deref(), Some("2027-01-12T10:25:00"));
        assert_eq!(kept.titles, ["所見", "IMP"]);
        assert_eq!(
            kept.text,
            ["肺野に異常なし\n縦隔正常", "異常なし & 経過観察不要"]
        );
        let preliminary = read_report(&text.replace("|||F\rOBX|1", "|||P\rOBX|1"));
        assert_eq!(preliminary.status, "preliminary");
        assert_eq!(read_report("garbage").status, "");
    }

    #[test]
    fn hl7_times_become_rfc3339_or_nothing() {
        assert_eq!(hl7_time("20270112").as_deref(), Some("2027-01-12T00:00:00"));
        assert_eq!(
            hl7_time("202701121025+0900").as_deref(),
            Some("2027-01-12T10:25:00")
        );
        assert_eq!(hl7_time("2027"), None);
        assert_eq!(hl7_time(""), None);
    }
}
