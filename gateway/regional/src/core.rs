//! The core gateway's side: slot publications and the decision of every clinic request.

use std::sync::Arc;
use std::time::Duration;

use gateway_booking::{BookingRequest, Decision, LedgerHandle, Refusal, Schedule};
use gateway_mqtt::{Flow, Handler, Publisher, Session, SessionError, StatusEvent};
use jiff::Timestamp;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::dose::{DoseIn, KIND_DOSE, KIND_DOSE_ACK, WireDose, WireDoseAck};
use crate::results::{CoreLink, KIND_ACK, KIND_NOTICE, KIND_REPORT, Outgoing, WireAck};
use crate::wire::{
    KIND_CANCEL, KIND_DECISION, KIND_REQUEST, Keys, SlotsMessage, WireCancel, WireDecision,
    WireRequest, WireSlot,
};
use crate::{Connection, Gate, Safety, now_unix, topics};

/// How far ahead free slots are published.
pub const HORIZON_DAYS: i64 = 14;
/// How long a hold (`$hold`) keeps its slot.
pub const HOLD_FOR_SECS: i64 = 600;
/// Longest the core waits for the safety task to record a clinic's dose report; then no
/// acknowledgement goes back (the clinic has long stopped waiting and sends it again).
const DOSE_RECORD_WAIT: Duration = Duration::from_secs(120);

/// Where every new booked appointment is sent (e.g. to become the OMG^O19 for the RIS).
pub use crate::OnBooked;

/// The core's exchange service.
pub struct CoreExchange {
    connection: Connection,
    keys: Arc<Keys>,
    ledger: LedgerHandle,
    schedules: Arc<Vec<Schedule>>,
    publish_interval: Duration,
    changed: Arc<Notify>,
    on_booked: Option<OnBooked>,
    /// Where acknowledgements of results go (the core's results task).
    result_acks: Option<mpsc::Sender<(String, WireAck)>>,
    result_outgoing: Option<mpsc::Receiver<Outgoing>>,
    /// Asked before every new request is decided (`[safety]`); none: decided unchecked.
    safety: Option<Safety>,
    /// Where clinics' dose reports go (the core's safety task); none: not acknowledged.
    dose: Option<mpsc::Sender<DoseIn>>,
}

impl std::fmt::Debug for CoreExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreExchange")
            .field("connection", &self.connection)
            .field("schedules", &self.schedules.len())
            .finish_non_exhaustive()
    }
}

fn status_json(state: &str) -> Vec<u8> {
    serde_json::json!({"state": state, "at": now_unix()})
        .to_string()
        .into_bytes()
}

impl CoreExchange {
    /// `changed` is notified by whoever else books on the ledger (the core's own kiosk), so
    /// the publications follow.
    pub fn new(
        connection: Connection,
        keys: Arc<Keys>,
        ledger: LedgerHandle,
        publish_interval: Duration,
        changed: Arc<Notify>,
    ) -> Self {
        Self {
            connection,
            keys,
            schedules: Arc::clone(ledger.schedules()),
            ledger,
            publish_interval,
            changed,
            on_booked: None,
            result_acks: None,
            result_outgoing: None,
            safety: None,
            dose: None,
        }
    }

    /// Asks `safety` before deciding every new request (see [`crate::Safety`]): warnings a
    /// physician has not acknowledged refuse it with the report, a check that fails refuses
    /// it as unavailable; neither is recorded. `None` decides unchecked.
    #[must_use]
    pub fn with_safety(mut self, safety: Option<Safety>) -> Self {
        self.safety = safety;
        self
    }

    /// Hands every clinic's dose report to the safety task ([`DoseIn`]);
    /// without it dose reports are not acknowledged. A report is handed on with `try_send`
    /// (a full or closed channel: dropped, not acknowledged, so the clinic sends it again);
    /// its acknowledgement goes back once the task answers `done(true)`.
    #[must_use]
    pub fn with_dose(mut self, to_safety: mpsc::Sender<DoseIn>) -> Self {
        self.dose = Some(to_safety);
        self
    }

    /// Carries the results task's notices and reports to the booking clinics, and their
    /// acknowledgements back.
    #[must_use]
    pub fn with_results(mut self, link: CoreLink) -> Self {
        self.result_acks = Some(link.acks);
        self.result_outgoing = Some(link.outgoing);
        self
    }

    /// Sends every appointment this exchange books to `f` (without waiting on it).
    #[must_use]
    pub fn with_on_booked(mut self, f: OnBooked) -> Self {
        self.on_booked = Some(f);
        self
    }

    /// The core's session: requests subscribed on every connection, retained status with
    /// the `offline` last will.
    fn session(&self) -> Result<Session, SessionError> {
        let me = &self.keys.me;
        let config = self
            .connection
            .session("regional core")
            .subscribe(format!("{}/{me}/req/+/+", topics::PREFIX))?
            .status(topics::status(me), status_json("offline"))?;
        Session::new(config)
    }

    /// Runs until `shutdown`: reconnects with backoff; on shutdown marks the core offline.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let session = match self.session() {
            Ok(session) => session,
            Err(e) => {
                error!(error = %e, "booking exchange (core) does not run");
                return;
            }
        };
        info!(broker = %self.connection.broker, schedules = self.schedules.len(), "booking exchange (core) started");
        let mut tick = tokio::time::interval(self.publish_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut core = self;
        let outgoing = core.result_outgoing.take();
        session
            .run(
                &mut Running {
                    core,
                    tick,
                    outgoing,
                    ready: Vec::new(),
                    slots_due: false,
                },
                shutdown,
            )
            .await;
        info!("booking exchange (core) stopped");
    }

    /// The free slots of every schedule, retained.
    async fn publish_all(&self, client: &Publisher) {
        for schedule in self.schedules.iter() {
            self.publish_schedule(client, schedule).await;
        }
    }

    async fn publish_schedule(&self, client: &Publisher, schedule: &Schedule) {
        let now = Timestamp::now();
        let until = now
            .checked_add(jiff::SignedDuration::from_hours(24 * HORIZON_DAYS))
            .unwrap_or(now);
        let free = match self.ledger.free_slots(schedule.id(), now, until, now).await {
            Ok(free) => free,
            Err(e) => {
                warn!(error = %e, "booking ledger cannot list free slots: not published");
                return;
            }
        };
        let slots = free
            .into_iter()
            .map(|s| WireSlot {
                id: s.id,
                start: s.start,
                end: s.end,
            })
            .collect();
        let message = SlotsMessage {
            v: 1,
            core: self.keys.me.clone(),
            schedule: schedule.id().to_owned(),
            modality: schedule.modality().to_owned(),
            as_of: now_unix(),
            slots,
        };
        let payload = serde_json::to_vec(&message).unwrap_or_default();
        if let Err(e) = client.publish(topics::slots(&self.keys.me, schedule.id()), true, payload) {
            warn!(error = %e, "slot publication dropped: request queue full");
        }
    }

    /// One sealed request: open, decide (durably), seal the answer back.
    async fn on_request(&self, client: &Publisher, topic: &str, payload: &[u8]) {
        let me = &self.keys.me;
        let Some((clinic, msg)) = topics::parse_inbox(me, "req", topic) else {
            debug!(
                bytes = payload.len(),
                "ignored a publish outside the request topics"
            );
            return;
        };
        match Keys::kind_of(payload).as_deref() {
            Some(KIND_CANCEL) => {
                self.on_cancel(client, clinic, msg, payload).await;
                return;
            }
            Some(KIND_ACK) => {
                self.on_result_ack(clinic, msg, payload);
                return;
            }
            Some(KIND_DOSE) => {
                self.on_dose(client, clinic, msg, payload);
                return;
            }
            _ => {}
        }
        let plain = match self.keys.open(clinic, KIND_REQUEST, msg, payload) {
            Ok(p) => zeroize::Zeroizing::new(p),
            Err(e) => {
                warn!(%clinic, error = %e, "booking request refused: it does not open");
                return;
            }
        };
        let request: WireRequest = match serde_json::from_slice(&plain) {
            Ok(r) => r,
            Err(e) => {
                warn!(%clinic, line = e.line(), column = e.column(), "booking request refused: not a request");
                return;
            }
        };
        let mut report = None;
        let decision = if now_unix() >= request.expires_at {
            info!(%clinic, "booking request arrived after its expiry: refused, nothing recorded");
            Decision::Refused {
                code: Refusal::Invalid,
                reason: "the request expired before the core received it; nothing was booked"
                    .into(),
            }
        } else {
            let mut booking = BookingRequest {
                alerts: Vec::new(),
                request_id: request.request_id.clone(),
                clinic: clinic.to_owned(),
                slot_id: request.slot_id.clone(),
                hold: request.hold,
                patient: request.patient.clone(),
                procedure: request.procedure.clone(),
            };
            let gate = crate::safety_gate(
                self.safety.as_ref(),
                &self.ledger,
                clinic,
                &booking,
                &request.acknowledged,
                &format!("clinic:{clinic}"),
            )
            .await;
            match gate {
                Ok(Gate::Refuse {
                    decision,
                    report: r,
                }) => {
                    report = r;
                    decision
                }
                // The check took time: a request that expired meanwhile is refused like
                // one that arrived late (its clinic has stopped waiting).
                Ok(Gate::Decide { .. }) if now_unix() >= request.expires_at => {
                    info!(%clinic, "booking request expired during its safety check: refused, nothing recorded");
                    Decision::Refused {
                        code: Refusal::Invalid,
                        reason:
                            "the request expired before the core decided it; nothing was booked"
                                .into(),
                    }
                }
                Ok(Gate::Decide { alerts, report: r }) => {
                    report = r;
                    booking.alerts = alerts;
                    match self
                        .ledger
                        .decide(booking, Timestamp::now(), HOLD_FOR_SECS)
                        .await
                    {
                        Ok(d) => d,
                        Err(e) => {
                            warn!(%clinic, error = %e, "booking ledger cannot record a decision: no answer sent");
                            return;
                        }
                    }
                }
                Err(e) => {
                    warn!(%clinic, error = %e, "booking ledger cannot be asked about a request: no answer sent");
                    return;
                }
            }
        };
        let slot = self.schedules.iter().find_map(|s| s.slot(&request.slot_id));
        let appointment = match &decision {
            Decision::Booked { appointment_id, .. } => {
                self.ledger.get(appointment_id).await.ok().flatten()
            }
            Decision::Refused { .. } => None,
        };
        let version = match &decision {
            Decision::Booked { .. } => appointment.as_ref().map_or(1, |a| a.version),
            Decision::Refused { .. } => 0,
        };
        if let Decision::Booked { appointment_id, .. } = &decision {
            info!(%clinic, appointment = %appointment_id, "booking request decided: booked");
            if let Some(schedule) = self
                .schedules
                .iter()
                .find(|s| slot.as_ref().is_some_and(|slot| slot.schedule == s.id()))
            {
                self.publish_schedule(client, schedule).await;
            }
            if let Some(a) = appointment {
                crate::booked(self.on_booked.as_ref(), a);
            }
        } else if let Decision::Refused { code, .. } = &decision {
            info!(%clinic, ?code, "booking request decided: refused");
        }
        let answer = WireDecision {
            safety: report,
            request_id: request.request_id,
            slot_id: request.slot_id,
            decision,
            start: slot.as_ref().map(|s| s.start.clone()),
            end: slot.as_ref().map(|s| s.end.clone()),
            version,
        };
        self.answer(client, clinic, msg, &answer);
    }

    /// A sealed cancel: only the clinic that booked may cancel, at the version it saw.
    async fn on_cancel(&self, client: &Publisher, clinic: &str, msg: &str, payload: &[u8]) {
        let cancel: WireCancel = match self
            .keys
            .open(clinic, KIND_CANCEL, msg, payload)
            .map_err(|e| e.to_string())
            .and_then(|p| serde_json::from_slice(&p).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                warn!(%clinic, error = %e, "cancel request refused: it does not open");
                return;
            }
        };
        let (decision, version) = if now_unix() >= cancel.expires_at {
            (
                Decision::Refused {
                    code: Refusal::Invalid,
                    reason: "the request expired before the core received it; nothing was changed"
                        .into(),
                },
                0,
            )
        } else {
            match crate::cancel_decision(
                self.ledger
                    .cancel(clinic, &cancel.appointment_id, Some(cancel.if_match))
                    .await,
            ) {
                Ok(d) => d,
                Err(e) => {
                    warn!(%clinic, error = %e, "booking ledger cannot record a cancel: no answer sent");
                    return;
                }
            }
        };
        let appointment = self.ledger.get(&cancel.appointment_id).await.ok().flatten();
        if matches!(decision, Decision::Booked { .. }) {
            info!(%clinic, appointment = %cancel.appointment_id, "appointment cancelled by its clinic");
            self.changed.notify_one();
        }
        let answer = WireDecision {
            safety: None,
            request_id: appointment
                .as_ref()
                .map(|a| a.request_id.clone())
                .unwrap_or_default(),
            slot_id: appointment
                .as_ref()
                .map(|a| a.slot_id.clone())
                .unwrap_or_default(),
            decision,
            start: appointment.as_ref().map(|a| a.start.clone()),
            end: appointment.as_ref().map(|a| a.end.clone()),
            version,
        };
        self.answer(client, clinic, msg, &answer);
    }

    /// A clinic's acknowledgement of a notice or report, for the results task.
    fn on_result_ack(&self, clinic: &str, msg: &str, payload: &[u8]) {
        let ack: WireAck = match self
            .keys
            .open(clinic, KIND_ACK, msg, payload)
            .map_err(|e| e.to_string())
            .and_then(|p| serde_json::from_slice(&p).map_err(|e| e.to_string()))
        {
            Ok(a) => a,
            Err(e) => {
                warn!(%clinic, error = %e, "result acknowledgement refused: it does not open");
                return;
            }
        };
        match &self.result_acks {
            Some(acks) => {
                if acks.try_send((clinic.to_owned(), ack)).is_err() {
                    warn!(%clinic, "result acknowledgement dropped: the results task is busy or stopped (the result is sent again)");
                }
            }
            None => debug!(%clinic, "result acknowledgement on a core without [results]: ignored"),
        }
    }

    /// A clinic's dose report: opened with that clinic's key, checked, handed to the safety
    /// task without waiting on it; a task of its own waits for `done` and seals the
    /// acknowledgement back (to `bk/{clinic}/resp/{core}/{msg}`). Anything refused is
    /// logged without content and not answered.
    fn on_dose(&self, client: &Publisher, clinic: &str, msg: &str, payload: &[u8]) {
        let plain = match self.keys.open(clinic, KIND_DOSE, msg, payload) {
            Ok(p) => zeroize::Zeroizing::new(p),
            Err(e) => {
                warn!(%clinic, error = %e, "dose report refused: it does not open");
                return;
            }
        };
        let dose: WireDose = match serde_json::from_slice(&plain) {
            Ok(d) => d,
            Err(e) => {
                warn!(%clinic, line = e.line(), column = e.column(), "dose report refused: not a dose report");
                return;
            }
        };
        if let Some(problem) = dose.problem() {
            warn!(%clinic, problem, "dose report refused");
            return;
        }
        let Some(to_safety) = &self.dose else {
            debug!(%clinic, "dose report on a core without [safety]: not acknowledged");
            return;
        };
        let ack = WireDoseAck {
            report_id: dose.report_id.clone(),
        };
        let events = dose.events.len();
        let (done, answer) = tokio::sync::oneshot::channel();
        let handed = to_safety.try_send(DoseIn {
            clinic: clinic.to_owned(),
            dose,
            done,
        });
        if handed.is_err() {
            warn!(%clinic, "dose report not taken now: the safety task is busy or stopped (the clinic sends it again)");
            return;
        }
        debug!(%clinic, events, "dose report handed to the safety task");
        let (keys, client) = (Arc::clone(&self.keys), client.clone());
        let (clinic, msg) = (clinic.to_owned(), msg.to_owned());
        tokio::spawn(async move {
            if !matches!(
                tokio::time::timeout(DOSE_RECORD_WAIT, answer).await,
                Ok(Ok(true))
            ) {
                info!(%clinic, "dose report not recorded by the safety task: not acknowledged (the clinic sends it again)");
                return;
            }
            let body = serde_json::to_vec(&ack).unwrap_or_default();
            match keys.seal(&clinic, KIND_DOSE_ACK, &msg, &body) {
                Ok(sealed) => {
                    let topic = topics::decision(&clinic, &keys.me, &msg);
                    if let Err(e) = client.publish(topic, false, sealed) {
                        warn!(%clinic, error = %e, "dose acknowledgement not sent: request queue full (the clinic sends the report again)");
                    }
                }
                Err(e) => warn!(%clinic, error = %e, "dose acknowledgement cannot be sealed"),
            }
        });
    }

    /// Seals and publishes a notice or report for its clinic (a fresh message id each).
    fn send_result(&self, client: &Publisher, message: &Outgoing) {
        let me = &self.keys.me;
        let (clinic, kind, body) = match message {
            Outgoing::Notice { clinic, notice } => {
                (clinic, KIND_NOTICE, serde_json::to_vec(notice))
            }
            Outgoing::Report { clinic, report } => {
                (clinic, KIND_REPORT, serde_json::to_vec(report))
            }
        };
        let body = zeroize::Zeroizing::new(body.unwrap_or_default());
        let msg = crate::message_id();
        match self.keys.seal(clinic, kind, &msg, &body) {
            Ok(sealed) => {
                if let Err(e) = client.publish(topics::decision(clinic, me, &msg), false, sealed) {
                    warn!(%clinic, kind, error = %e, "result not sent now: request queue full (sent again later)");
                }
            }
            Err(e) => warn!(%clinic, kind, error = %e, "result cannot be sealed for this clinic"),
        }
    }

    /// Seals and sends a decision to `clinic`.
    fn answer(&self, client: &Publisher, clinic: &str, msg: &str, answer: &WireDecision) {
        let me = &self.keys.me;
        let body = serde_json::to_vec(answer).unwrap_or_default();
        match self.keys.seal(clinic, KIND_DECISION, msg, &body) {
            Ok(sealed) => {
                if let Err(e) = client.publish(topics::decision(clinic, me, msg), false, sealed) {
                    warn!(error = %e, "booking decision dropped: request queue full");
                }
            }
            Err(e) => warn!(%clinic, error = %e, "booking decision cannot be sealed"),
        }
    }
}

/// The core on its session: the slot timer and the ledger's change notifications wake it.
struct Running {
    core: CoreExchange,
    tick: tokio::time::Interval,
    /// Notices and reports from the results task, and those taken but not yet published.
    outgoing: Option<mpsc::Receiver<Outgoing>>,
    ready: Vec<Outgoing>,
    /// The slot publications are due (timer or ledger change).
    slots_due: bool,
}

impl Handler for Running {
    fn status(&self, event: StatusEvent) -> Option<Vec<u8>> {
        Some(match event {
            StatusEvent::Connected => status_json("online"),
            StatusEvent::Closing => status_json("offline"),
        })
    }

    async fn on_connect(&mut self, out: &Publisher, _session_present: bool) {
        self.core.publish_all(out).await;
    }

    async fn on_message(&mut self, out: &Publisher, topic: &str, payload: &[u8]) -> Flow {
        self.core.on_request(out, topic, payload).await;
        Flow::Continue
    }

    async fn wake(&mut self) {
        let results = async {
            match self.outgoing.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.tick.tick() => self.slots_due = true,
            () = self.core.changed.notified() => self.slots_due = true,
            Some(message) = results => self.ready.push(message),
        }
    }

    async fn on_wake(&mut self, out: &Publisher) {
        if std::mem::take(&mut self.slots_due) {
            self.core.publish_all(out).await;
        }
        for message in std::mem::take(&mut self.ready) {
            self.core.send_result(out, &message);
        }
    }
}
