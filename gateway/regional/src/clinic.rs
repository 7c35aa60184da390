//! The clinic gateway's side: the cache of the core's free slots and the booking client the
//! kiosk uses ([`gateway_booking::SlotSource`] and [`gateway_booking::BookingBackend`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use gateway_booking::{
    AppointmentRequest, AppointmentView, BookingBackend, BookingRefused, BoxFuture, Decision,
    PatientRef, SealKey, SlotAnswer, SlotQuery, SlotSource, SlotView,
};
use gateway_mqtt::{Flow, Handler, Publisher, Session};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::dose::{DoseNotSent, KIND_DOSE, KIND_DOSE_ACK, WireDose, WireDoseAck};
use crate::results::{ClinicLink, Incoming, KIND_ACK, KIND_NOTICE, KIND_REPORT, WireAck};
use crate::wire::{
    KIND_CANCEL, KIND_DECISION, KIND_REQUEST, Keys, MAX_SLOTS_BYTES, SlotsMessage, WireCancel,
    WireDecision, WireRequest,
};
use crate::{Connection, message_id, now_unix, topics};

const BOOK_FILE: &str = "clinic.sealed";
const BOOK_ROLE: &str = "clinic appointments";
/// Requests whose decision never came are forgotten after this long.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// The clinic's settings from `[booking]`.
#[derive(Debug, Clone)]
pub struct ClinicSettings {
    pub connection: Connection,
    /// The core gateway's id.
    pub core: String,
    pub request_timeout: Duration,
    pub stale_after: Duration,
}

/// Errors opening the clinic's side.
#[derive(Debug, thiserror::Error)]
pub enum ClinicError {
    #[error(transparent)]
    Sealed(#[from] gateway_booking::sealed::SealError),
    #[error(transparent)]
    Io(#[from] gateway_durable::Error),
    #[error("clinic appointments file {0} is unreadable")]
    Corrupt(PathBuf),
    #[error("booking exchange (clinic): {0}")]
    Session(#[from] gateway_mqtt::SessionError),
}

/// The clinic's copy of one appointment (sealed on disk: it names the patient).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    id: String,
    request_id: String,
    slot_id: String,
    status: String,
    start: String,
    end: String,
    accession: Option<String>,
    patient_id: String,
    procedure: String,
    #[serde(default = "first_version")]
    version: u64,
}

fn first_version() -> u64 {
    1
}

impl Stored {
    fn view(&self, created: bool) -> AppointmentView {
        AppointmentView {
            safety: None,
            id: self.id.clone(),
            request_id: self.request_id.clone(),
            slot_id: self.slot_id.clone(),
            status: self.status.clone(),
            start: self.start.clone(),
            end: self.end.clone(),
            accession: self.accession.clone(),
            patient_id: self.patient_id.clone(),
            procedure: self.procedure.clone(),
            created,
            version: self.version,
        }
    }
}

/// What a request on its way to the core asked for.
enum Asked {
    Book(AppointmentRequest),
    /// Cancel the appointment stored under this request id.
    Cancel {
        request_id: String,
    },
}

/// A request on its way to the core.
struct Pending {
    asked: Asked,
    sent: Instant,
    /// `None` once the kiosk stopped waiting (a late decision is still recorded).
    reply: Option<oneshot::Sender<Result<AppointmentView, BookingRefused>>>,
}

#[derive(Default)]
struct State {
    connected: bool,
    core_online: bool,
    slots: BTreeMap<String, SlotsMessage>,
    pending: HashMap<String, Pending>,
    book: BTreeMap<String, Stored>,
    /// Dose reports waiting for their acknowledgement: report id -> (waiter, its wake-up).
    doses: HashMap<String, Vec<(u64, oneshot::Sender<()>)>>,
    next_waiter: u64,
}

struct Inner {
    settings: ClinicSettings,
    keys: Keys,
    publisher: Publisher,
    seal: SealKey,
    book_path: PathBuf,
    state: Mutex<State>,
    /// The results task, once [`ClinicExchange::set_results`] named it.
    results: OnceLock<ClinicLink>,
}

/// The clinic's exchange: a cheap handle for the kiosk, plus [`ClinicTask`] to run.
#[derive(Clone)]
pub struct ClinicExchange {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClinicExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClinicExchange")
            .field("core", &self.inner.settings.core)
            .finish_non_exhaustive()
    }
}

/// The MQTT session of a [`ClinicExchange`]; spawn [`ClinicTask::run`].
pub struct ClinicTask {
    inner: Arc<Inner>,
    session: Session,
}

impl std::fmt::Debug for ClinicTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClinicTask")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl ClinicExchange {
    /// Opens the clinic's sealed appointment copies in `dir` and prepares the connection.
    pub fn open(
        settings: ClinicSettings,
        keys: Keys,
        dir: &Path,
        seal: SealKey,
    ) -> Result<(ClinicExchange, ClinicTask), ClinicError> {
        gateway_durable::ensure_private_dir(dir)?;
        let book_path = dir.join(BOOK_FILE);
        let book = match seal.read(&book_path, BOOK_ROLE)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|_| ClinicError::Corrupt(book_path.clone()))?,
            None => BTreeMap::new(),
        };
        let (me, core) = (&keys.me, &settings.core);
        let session = Session::new(
            settings
                .connection
                .session("regional clinic")
                .subscribe(topics::status(core))?
                .subscribe(format!("{}/{core}/slots/+", topics::PREFIX))?
                .subscribe(format!("{}/{me}/resp/{core}/+", topics::PREFIX))?,
        )?;
        let publisher = session.publisher();
        let inner = Arc::new(Inner {
            settings,
            keys,
            publisher,
            seal,
            book_path,
            state: Mutex::new(State {
                book,
                ..State::default()
            }),
            results: OnceLock::new(),
        });
        Ok((
            ClinicExchange {
                inner: Arc::clone(&inner),
            },
            ClinicTask { inner, session },
        ))
    }
}

impl ClinicExchange {
    /// Hands every notice and report of this clinic's own appointments to the results task
    /// (without it they are refused: not acknowledged, so the core sends them again). A
    /// second call is ignored.
    pub fn set_results(&self, link: ClinicLink) {
        let _ = self.inner.results.set(link);
    }

    /// Seals one dose report to the core (`bk/{core}/req/{me}/{msg}`, QoS 1, `{msg}` random)
    /// and waits, at most `booking.request_timeout` in all, for the core's acknowledgement
    /// naming its `report_id` ([`crate::dose`]). Not connected, not sealed, not published
    /// or not acknowledged in time: [`DoseNotSent`] (the caller keeps the report queued).
    /// Several reports may be on their way at once, the same report too: one
    /// acknowledgement answers every send of its `report_id` waiting then.
    pub fn send_dose(&self, dose: WireDose) -> BoxFuture<'static, Result<(), DoseNotSent>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let core = &inner.settings.core;
            let msg = message_id();
            let body = zeroize::Zeroizing::new(serde_json::to_vec(&dose).unwrap_or_default());
            let sealed = match inner.keys.seal(core, KIND_DOSE, &msg, &body) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "dose report cannot be sealed");
                    return Err(DoseNotSent);
                }
            };
            let (tx, rx) = oneshot::channel();
            let waiter = {
                let mut state = inner.lock();
                if !state.connected {
                    return Err(DoseNotSent);
                }
                state.next_waiter = state.next_waiter.wrapping_add(1);
                let waiter = state.next_waiter;
                state
                    .doses
                    .entry(dose.report_id.clone())
                    .or_default()
                    .push((waiter, tx));
                waiter
            };
            let topic = topics::request(core, &inner.keys.me, &msg);
            let sent = tokio::time::timeout(inner.settings.request_timeout, async {
                inner
                    .publisher
                    .publish_waiting(topic, false, sealed)
                    .await
                    .map_err(|_| DoseNotSent)?;
                rx.await.map_err(|_| DoseNotSent)
            })
            .await;
            match sent {
                Ok(Ok(())) => Ok(()),
                failed => {
                    inner.forget_dose(&dose.report_id, waiter);
                    if failed.is_err() {
                        info!(
                            "the core did not acknowledge a dose report in time: it stays queued"
                        );
                    } else {
                        warn!("dose report not published: it stays queued");
                    }
                    Err(DoseNotSent)
                }
            }
        })
    }

    /// The clinic's copy of the appointment `id`, if this clinic booked it.
    pub fn appointment(&self, id: &str) -> Option<AppointmentView> {
        self.inner.appointment(id)
    }
}

impl Inner {
    /// Drops one waiter of a dose report (it gave up).
    fn forget_dose(&self, report_id: &str, waiter: u64) {
        let mut state = self.lock();
        if let Some(waiters) = state.doses.get_mut(report_id) {
            waiters.retain(|(w, _)| *w != waiter);
            if waiters.is_empty() {
                state.doses.remove(report_id);
            }
        }
    }

    /// The core's acknowledgement of a dose report: wakes every send of that report
    /// waiting now. A late, repeated or unknown one is ignored.
    fn on_dose_ack(&self, from: &str, msg: &str, payload: &[u8]) {
        if from != self.settings.core {
            warn!(%from, "dose acknowledgement from a gateway that is not our core: ignored");
            return;
        }
        let ack: WireDoseAck = match self
            .keys
            .open(from, KIND_DOSE_ACK, msg, payload)
            .map_err(|e| e.to_string())
            .and_then(|p| serde_json::from_slice(&p).map_err(|e| e.to_string()))
        {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "dose acknowledgement refused: it does not open");
                return;
            }
        };
        let waiters = self.lock().doses.remove(&ack.report_id);
        match waiters {
            Some(waiters) => {
                for (_, tx) in waiters {
                    let _ = tx.send(());
                }
            }
            None => {
                debug!("dose acknowledgement for no report waiting now (late or repeated): ignored")
            }
        }
    }

    fn appointment(&self, id: &str) -> Option<AppointmentView> {
        self.lock()
            .book
            .values()
            .find(|s| s.id == id)
            .map(|s| s.view(false))
    }

    /// A notice or report from the core: opened, checked against this clinic's own
    /// appointments, handed to the results task; acknowledged once that task recorded it.
    fn on_result(self: &Arc<Self>, from: &str, kind: &str, msg: &str, payload: &[u8]) {
        if from != self.settings.core {
            warn!(%from, kind, "result from a gateway that is not our core: refused");
            return;
        }
        let plain = match self.keys.open(from, kind, msg, payload) {
            Ok(p) => zeroize::Zeroizing::new(p),
            Err(e) => {
                warn!(kind, error = %e, "result refused: it does not open");
                return;
            }
        };
        let Some(link) = self.results.get() else {
            warn!(kind, "result refused: this clinic has no [results] section");
            return;
        };
        let (done, answer) = oneshot::channel();
        /// The body as `T` and this clinic's copy of the appointment it names.
        fn read<T: serde::de::DeserializeOwned>(
            inner: &Inner,
            kind: &str,
            plain: &[u8],
            appointment_of: impl Fn(&T) -> &str,
        ) -> Option<(T, AppointmentView)> {
            let body: T = match serde_json::from_slice(plain) {
                Ok(b) => b,
                Err(e) => {
                    warn!(
                        kind,
                        line = e.line(),
                        column = e.column(),
                        "result refused: not readable"
                    );
                    return None;
                }
            };
            let Some(appointment) = inner.appointment(appointment_of(&body)) else {
                warn!(
                    kind,
                    "result refused: not an appointment this clinic booked"
                );
                return None;
            };
            Some((body, appointment))
        }
        let (incoming, ack) = if kind == KIND_NOTICE {
            let Some((notice, appointment)) =
                read(self, kind, &plain, |n: &crate::results::WireNotice| {
                    &n.appointment_id
                })
            else {
                return;
            };
            let ack = WireAck {
                appointment_id: notice.appointment_id.clone(),
                notice_seq: Some(notice.seq),
                report_id: None,
            };
            let incoming = Incoming::Notice {
                appointment,
                notice,
                done,
            };
            (incoming, ack)
        } else {
            let Some((report, appointment)) =
                read(self, kind, &plain, |r: &crate::results::WireReport| {
                    &r.appointment_id
                })
            else {
                return;
            };
            let ack = WireAck {
                appointment_id: report.appointment_id.clone(),
                notice_seq: None,
                report_id: Some(report.report_id.clone()),
            };
            let incoming = Incoming::Report {
                appointment,
                report,
                done,
            };
            (incoming, ack)
        };
        if link.incoming.try_send(incoming).is_err() {
            warn!(
                kind,
                "result not taken now: the results task is busy (the core sends it again)"
            );
            return;
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            if answer.await != Ok(true) {
                return;
            }
            let core = &inner.settings.core;
            let msg = message_id();
            let body = serde_json::to_vec(&ack).unwrap_or_default();
            match inner.keys.seal(core, KIND_ACK, &msg, &body) {
                Ok(sealed) => {
                    let topic = topics::request(core, &inner.keys.me, &msg);
                    if let Err(e) = inner.publisher.publish(topic, false, sealed) {
                        warn!(error = %e, "result acknowledgement not sent (the core sends the result again)");
                    }
                }
                Err(e) => warn!(error = %e, "result acknowledgement cannot be sealed"),
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records an appointment in the sealed copy: the whole copy with `stored` in it is
    /// sealed and written (with `fsync`) on a blocking thread, and only then is `stored`
    /// put in the in-memory copy the kiosk reads. Decisions come one at a time from the
    /// session (its handler awaits each), so the writes keep their order.
    async fn remember(self: &Arc<Self>, stored: Stored) {
        let bytes = {
            let state = self.lock();
            let mut book: BTreeMap<&str, &Stored> =
                state.book.iter().map(|(k, v)| (k.as_str(), v)).collect();
            book.insert(stored.request_id.as_str(), &stored);
            serde_json::to_vec(&book).map(zeroize::Zeroizing::new)
        };
        match bytes {
            Ok(bytes) => {
                let inner = Arc::clone(self);
                let written = tokio::task::spawn_blocking(move || {
                    inner.seal.write(&inner.book_path, BOOK_ROLE, &bytes)
                })
                .await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "clinic appointments could not be saved"),
                    Err(e) => {
                        warn!(error = %e, "clinic appointments could not be saved: the task failed");
                    }
                }
            }
            Err(e) => warn!(error = %e, "clinic appointments could not be encoded"),
        }
        self.lock().book.insert(stored.request_id.clone(), stored);
    }
}

impl ClinicTask {
    /// Runs until `shutdown`, reconnecting with backoff.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let inner = self.inner;
        info!(core = %inner.settings.core, broker = %inner.settings.connection.broker, "booking exchange (clinic) started");
        self.session
            .run(&mut Running(Arc::clone(&inner)), shutdown)
            .await;
        info!("booking exchange (clinic) stopped");
    }
}

/// The clinic on its session: keeps the connected flag the slot answers and requests read.
struct Running(Arc<Inner>);

impl Handler for Running {
    async fn on_connect(&mut self, _out: &Publisher, _session_present: bool) {
        self.0.lock().connected = true;
    }

    async fn on_message(&mut self, _out: &Publisher, topic: &str, payload: &[u8]) -> Flow {
        self.0.on_publish(topic, payload).await;
        Flow::Continue
    }

    fn on_connection_lost(&mut self) {
        self.0.lock().connected = false;
    }
}

impl Inner {
    async fn on_publish(self: &Arc<Self>, topic: &str, payload: &[u8]) {
        let (me, core) = (&self.keys.me, &self.settings.core);
        if topic == topics::status(core) {
            let online = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .is_some_and(|v| v.get("state").is_some_and(|s| s == "online"));
            self.lock().core_online = online;
            info!(online, "core booking status");
        } else if let Some(schedule) = topics::parse_slots(core, topic) {
            if payload.len() > MAX_SLOTS_BYTES {
                warn!(bytes = payload.len(), "slot publication too large: ignored");
                return;
            }
            match serde_json::from_slice::<SlotsMessage>(payload) {
                Ok(m) if m.schedule == schedule && &m.core == core => {
                    self.lock().slots.insert(schedule.to_owned(), m);
                }
                Ok(_) => warn!("slot publication does not match its topic: ignored"),
                Err(_) if payload.is_empty() => {
                    self.lock().slots.remove(schedule);
                }
                Err(e) => {
                    warn!(
                        line = e.line(),
                        column = e.column(),
                        "slot publication is not valid: ignored"
                    );
                }
            }
        } else if let Some((from, msg)) = topics::parse_inbox(me, "resp", topic) {
            match Keys::kind_of(payload).as_deref() {
                Some(kind @ (KIND_NOTICE | KIND_REPORT)) => {
                    self.on_result(from, kind, msg, payload);
                }
                Some(KIND_DOSE_ACK) => self.on_dose_ack(from, msg, payload),
                _ => self.on_decision(from, msg, payload).await,
            }
        } else {
            debug!(
                bytes = payload.len(),
                "ignored a publish outside the booking topics"
            );
        }
    }

    /// A decision from the core: the sealed copy is written before the kiosk gets its answer.
    async fn on_decision(self: &Arc<Self>, from: &str, msg: &str, payload: &[u8]) {
        if from != self.settings.core {
            warn!(%from, "booking decision from a gateway that is not our core: ignored");
            return;
        }
        let mut decision: WireDecision = match self
            .keys
            .open(from, KIND_DECISION, msg, payload)
            .map_err(|e| e.to_string())
            .and_then(|p| serde_json::from_slice(&p).map_err(|e| e.to_string()))
        {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "booking decision refused: it does not open");
                return;
            }
        };
        let report = decision.safety.take();
        let (pending, to_remember) = {
            let mut state = self.lock();
            let Some(pending) = state.pending.remove(msg) else {
                debug!("booking decision for no pending request (answered twice?)");
                return;
            };
            let to_remember = match (&pending.asked, decision.decision) {
                (Asked::Book(request), _) if request.request_id != decision.request_id => {
                    warn!("booking decision names another request: ignored");
                    return;
                }
                (
                    Asked::Book(request),
                    Decision::Booked {
                        appointment_id,
                        accession,
                        status,
                    },
                ) => Ok(Stored {
                    id: appointment_id,
                    request_id: request.request_id.clone(),
                    slot_id: decision.slot_id,
                    status: status.as_str().to_owned(),
                    start: decision.start.unwrap_or_default(),
                    end: decision.end.unwrap_or_default(),
                    accession: Some(accession),
                    patient_id: request.patient_id.clone(),
                    procedure: request.procedure.clone(),
                    version: decision.version.max(1),
                }),
                (Asked::Cancel { request_id }, Decision::Booked { status, .. }) => {
                    match state.book.get(request_id).cloned() {
                        Some(mut stored) => {
                            stored.status = status.as_str().to_owned();
                            stored.version = decision.version;
                            Ok(stored)
                        }
                        None => Err(BookingRefused::NotFound),
                    }
                }
                (_, Decision::Refused { code, reason }) => Err(BookingRefused::from_refusal(
                    code,
                    reason,
                    decision.version,
                    report.clone(),
                )),
            };
            (pending, to_remember)
        };
        let answer = match to_remember {
            Ok(stored) => {
                let mut view = stored.view(matches!(pending.asked, Asked::Book(_)));
                // The report is shown with this answer only (a repeat read has none).
                view.safety = report;
                self.remember(stored).await;
                Ok(view)
            }
            Err(refused) => Err(refused),
        };
        if let Some(reply) = pending.reply {
            let _ = reply.send(answer);
        } else {
            info!(
                "a late booking decision was recorded; the kiosk had been told the core did not answer"
            );
        }
    }
}

type Reply = oneshot::Receiver<Result<AppointmentView, BookingRefused>>;

impl Inner {
    /// Publishes a sealed request and waits for its decision at most `request_timeout`.
    async fn send_and_wait(
        &self,
        msg: String,
        sealed: Vec<u8>,
        rx: Reply,
    ) -> Result<AppointmentView, BookingRefused> {
        let topic = topics::request(&self.settings.core, &self.keys.me, &msg);
        if self
            .publisher
            .publish_waiting(topic, false, sealed)
            .await
            .is_err()
        {
            self.lock().pending.remove(&msg);
            return Err(BookingRefused::Unavailable);
        }
        match tokio::time::timeout(self.settings.request_timeout, rx).await {
            Ok(Ok(answer)) => answer,
            _ => {
                if let Some(p) = self.lock().pending.get_mut(&msg) {
                    p.reply = None;
                }
                warn!("the core did not answer in time: refused (503)");
                Err(BookingRefused::Unavailable)
            }
        }
    }
}

impl SlotSource for ClinicExchange {
    fn free_slots(&self, query: &SlotQuery) -> BoxFuture<'static, SlotAnswer> {
        Box::pin(std::future::ready(self.cached_slots(query)))
    }

    /// The schedules the core has published slots for (the cache's keys, sorted).
    fn schedules(&self) -> BoxFuture<'static, Vec<String>> {
        let ids = self.inner.lock().slots.keys().cloned().collect();
        Box::pin(std::future::ready(ids))
    }
}

impl ClinicExchange {
    /// The cached publications matching `query`, and how fresh they are.
    fn cached_slots(&self, query: &SlotQuery) -> SlotAnswer {
        let inner = &self.inner;
        let state = inner.lock();
        let ge = query
            .start_ge
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok());
        let lt = query
            .start_lt
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok());
        let now = now_unix();
        let mut as_of = u64::MAX;
        let mut slots = Vec::new();
        for (schedule, message) in &state.slots {
            if query.schedule.as_deref().is_some_and(|q| q != schedule) {
                continue;
            }
            as_of = as_of.min(message.as_of);
            for s in &message.slots {
                let Ok(start) = s.start.parse::<Timestamp>() else {
                    continue;
                };
                if ge.is_some_and(|g| start < g) || lt.is_some_and(|l| start >= l) {
                    continue;
                }
                if start.as_second() <= i64::try_from(now).unwrap_or(i64::MAX) {
                    continue;
                }
                slots.push(SlotView {
                    id: s.id.clone(),
                    schedule: schedule.clone(),
                    start: s.start.clone(),
                    end: s.end.clone(),
                });
            }
        }
        let as_of = if as_of == u64::MAX { 0 } else { as_of };
        let stale = !state.connected
            || !state.core_online
            || as_of == 0
            || now.saturating_sub(as_of) > inner.settings.stale_after.as_secs();
        SlotAnswer {
            slots,
            as_of_unix: as_of,
            stale,
        }
    }
}

/// A decided request's repeat: its first outcome, unless a `book` confirms a hold.
fn local_repeat(state: &State, req: &AppointmentRequest) -> Option<AppointmentView> {
    let stored = state.book.get(&req.request_id)?;
    if !req.hold && stored.status == "pending" {
        return None;
    }
    Some(stored.view(false))
}

impl BookingBackend for ClinicExchange {
    fn request(
        &self,
        req: AppointmentRequest,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let msg = message_id();
            let (tx, rx) = oneshot::channel();
            let sealed = {
                let mut state = inner.lock();
                if let Some(view) = local_repeat(&state, &req) {
                    return Ok(view);
                }
                if !state.connected {
                    return Err(BookingRefused::Unavailable);
                }
                let wire = WireRequest {
                    acknowledged: req.acknowledged.clone(),
                    request_id: req.request_id.clone(),
                    slot_id: req.slot_id.clone(),
                    hold: req.hold,
                    patient: PatientRef {
                        id: req.patient_id.clone(),
                        name: req.patient_name.clone(),
                        birth_date: req.birth_date.clone(),
                        sex: req.sex.clone(),
                    },
                    procedure: req.procedure.clone(),
                    expires_at: now_unix() + inner.settings.request_timeout.as_secs().max(1),
                };
                let body = zeroize::Zeroizing::new(serde_json::to_vec(&wire).unwrap_or_default());
                let sealed = match inner
                    .keys
                    .seal(&inner.settings.core, KIND_REQUEST, &msg, &body)
                {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "booking request cannot be sealed");
                        return Err(BookingRefused::Unavailable);
                    }
                };
                state.pending.retain(|_, p| p.sent.elapsed() < FORGET_AFTER);
                state.pending.insert(
                    msg.clone(),
                    Pending {
                        asked: Asked::Book(req),
                        sent: Instant::now(),
                        reply: Some(tx),
                    },
                );
                sealed
            };
            inner.send_and_wait(msg, sealed, rx).await
        })
    }

    fn cancel(
        &self,
        id: String,
        if_match: u64,
        _staff: String,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let msg = message_id();
            let (tx, rx) = oneshot::channel();
            let sealed = {
                let mut state = inner.lock();
                let Some(stored) = state.book.values().find(|s| s.id == id).cloned() else {
                    return Err(BookingRefused::NotFound);
                };
                if stored.status == "cancelled" {
                    return Ok(stored.view(false));
                }
                if stored.version != if_match {
                    return Err(BookingRefused::VersionMismatch {
                        current: stored.version,
                    });
                }
                if !state.connected {
                    return Err(BookingRefused::Unavailable);
                }
                let wire = WireCancel {
                    appointment_id: id,
                    if_match,
                    expires_at: now_unix() + inner.settings.request_timeout.as_secs().max(1),
                };
                let body = serde_json::to_vec(&wire).unwrap_or_default();
                let Ok(sealed) = inner
                    .keys
                    .seal(&inner.settings.core, KIND_CANCEL, &msg, &body)
                else {
                    return Err(BookingRefused::Unavailable);
                };
                state.pending.insert(
                    msg.clone(),
                    Pending {
                        asked: Asked::Cancel {
                            request_id: stored.request_id,
                        },
                        sent: Instant::now(),
                        reply: Some(tx),
                    },
                );
                sealed
            };
            inner.send_and_wait(msg, sealed, rx).await
        })
    }

    fn appointments_of(&self, patient_id: &str) -> BoxFuture<'static, Vec<AppointmentView>> {
        let found = self
            .inner
            .lock()
            .book
            .values()
            .filter(|s| s.patient_id == patient_id)
            .map(|s| s.view(false))
            .collect();
        Box::pin(std::future::ready(found))
    }

    fn patient_ref(&self, patient_id: &str) -> String {
        self.inner.seal.patient_ref(patient_id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;
    use crate::results::{ClinicLink, KIND_NOTICE, WireNotice};
    use gateway_exchange::ExchangeKey;
    use gateway_keystore::MasterKey;
    use tokio::sync::mpsc;

    fn keys(me: &str, mine: u8, peer: &str, theirs: u8) -> Keys {
        let peer_key = ExchangeKey::from_seed([theirs; 32]).public();
        Keys {
            me: me.into(),
            key: ExchangeKey::from_seed([mine; 32]),
            peers: [(peer.to_string(), peer_key)].into(),
        }
    }

    fn notice(appointment_id: &str) -> Vec<u8> {
        serde_json::to_vec(&WireNotice {
            appointment_id: appointment_id.into(),
            accession: "RB20270112000001".into(),
            study_uids: vec!["1.2.3".into()],
            instances: 3,
            complete: false,
            seq: 1,
        })
        .unwrap()
    }

    /// A clinic whose sealed copy holds one appointment (`apt-1`), never connected.
    fn clinic(dir: &Path) -> (ClinicExchange, mpsc::Receiver<Incoming>) {
        let seal = SealKey::derive(&MasterKey::from_bytes([3; 32]));
        let stored = Stored {
            id: "apt-1".into(),
            request_id: "r1".into(),
            slot_id: "ct-1.20270112T0930".into(),
            status: "booked".into(),
            start: String::new(),
            end: String::new(),
            accession: Some("RB20270112000001".into()),
            patient_id: "A-0931".into(),
            procedure: "CT".into(),
            version: 1,
        };
        let book: BTreeMap<&str, &Stored> = [("r1", &stored)].into();
        seal.write(
            &dir.join(BOOK_FILE),
            BOOK_ROLE,
            &serde_json::to_vec(&book).unwrap(),
        )
        .unwrap();
        let url: gateway_config::BrokerUrl = "mqtt://127.0.0.1:9".parse().unwrap();
        let settings = ClinicSettings {
            connection: Connection {
                client_id: "clinic-a".parse().unwrap(),
                broker: gateway_mqtt::Broker::new(&url, None).unwrap(),
            },
            core: "core-1".into(),
            request_timeout: Duration::from_secs(1),
            stale_after: Duration::from_secs(1),
        };
        let (handle, _task) =
            ClinicExchange::open(settings, keys("clinic-a", 1, "core-1", 2), dir, seal).unwrap();
        let (tx, rx) = mpsc::channel(4);
        handle.set_results(ClinicLink { incoming: tx });
        (handle, rx)
    }

    #[tokio::test]
    async fn a_notice_reaches_the_results_task_only_for_an_appointment_this_clinic_booked() {
        let dir = tempfile::tempdir().unwrap();
        let (clinic, mut rx) = clinic(dir.path());
        let core = keys("core-1", 2, "clinic-a", 1);
        let topic = |msg: &str| topics::decision("clinic-a", "core-1", msg);

        // Not ours: refused, nothing handed on.
        let sealed = core
            .seal("clinic-a", KIND_NOTICE, "m1", &notice("apt-9"))
            .unwrap();
        clinic.inner.on_publish(&topic("m1"), &sealed).await;
        assert!(
            rx.try_recv().is_err(),
            "a notice for another clinic's appointment went on"
        );

        // Sealed by someone who is not our core (here: under another key): refused.
        let stranger = keys("core-1", 7, "clinic-a", 1);
        let forged = stranger
            .seal("clinic-a", KIND_NOTICE, "m2", &notice("apt-1"))
            .unwrap();
        clinic.inner.on_publish(&topic("m2"), &forged).await;
        assert!(
            rx.try_recv().is_err(),
            "a notice that does not open went on"
        );

        // Ours: handed on with the clinic's own copy of the appointment.
        let sealed = core
            .seal("clinic-a", KIND_NOTICE, "m3", &notice("apt-1"))
            .unwrap();
        clinic.inner.on_publish(&topic("m3"), &sealed).await;
        match rx.try_recv() {
            Ok(Incoming::Notice {
                appointment,
                notice,
                ..
            }) => {
                assert_eq!(appointment.id, "apt-1");
                assert_eq!(appointment.patient_id, "A-0931");
                assert_eq!((notice.instances, notice.seq), (3, 1));
            }
            other => panic!("expected the notice, got {other:?}"),
        }
    }
}
