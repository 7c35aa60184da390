//! The core's own kiosk: slots and bookings straight from its ledger (never stale; the
//! core's staff book for its own patients, `clinic` = the core's node id).
//!
//! Its bookings go to the [`OnBooked`] channel like the exchange's, once the ledger has made
//! them durable. [`LocalCore::reoffer_booked`] hands every live booked appointment to the
//! channel again at start-up: an order lost between the ledger's decision and the order's
//! own storage (a crash in that window) is made again, and one already stored is a repeat
//! of the same message key, stored once.

use std::sync::Arc;

use gateway_booking::{
    Appointment, AppointmentRequest, AppointmentStatus, AppointmentView, BookingBackend,
    BookingRefused, BookingRequest, BoxFuture, Decision, LedgerError, LedgerHandle, PatientRef,
    SealKey, SlotAnswer, SlotQuery, SlotSource, SlotView,
};
use jiff::Timestamp;
use tokio::sync::Notify;
use tracing::warn;

use crate::core::{HOLD_FOR_SECS, HORIZON_DAYS};
use crate::{Gate, OnBooked, Safety, now_unix};

/// Booking on the core's ledger directly.
pub struct LocalCore {
    me: String,
    ledger: LedgerHandle,
    seal: SealKey,
    changed: Arc<Notify>,
    on_booked: Option<OnBooked>,
    /// Asked before every new request is decided (`[safety]`); none: decided unchecked.
    safety: Option<Safety>,
}

impl std::fmt::Debug for LocalCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCore")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl LocalCore {
    /// `changed` is notified after every booking (the exchange republishes the slots).
    pub fn new(me: String, ledger: LedgerHandle, seal: SealKey, changed: Arc<Notify>) -> Self {
        Self {
            me,
            ledger,
            seal,
            changed,
            on_booked: None,
            safety: None,
        }
    }

    /// Asks `safety` before deciding every new request, as the exchange does for the
    /// clinics' (see [`crate::Safety`]); the staff member asking is the check's actor.
    #[must_use]
    pub fn with_safety(mut self, safety: Option<Safety>) -> Self {
        self.safety = safety;
        self
    }

    /// Where every new booking is sent (e.g. to become the OMG^O19 for the RIS).
    #[must_use]
    pub fn with_on_booked(mut self, f: OnBooked) -> Self {
        self.on_booked = Some(f);
        self
    }

    /// Hands every live `booked` appointment of the ledger to `on_booked` again (none
    /// without one), and says how many. Called at start-up, so that an order the core
    /// decided but did not store before a crash is made after all; the order path stores a
    /// repeat of an order once (its message key comes from the appointment id).
    pub async fn reoffer_booked(&self) -> Result<usize, LedgerError> {
        let Some(on_booked) = &self.on_booked else {
            return Ok(0);
        };
        let mut offered = 0;
        for a in self.ledger.live(Timestamp::now()).await? {
            if a.status == AppointmentStatus::Booked {
                crate::booked(Some(on_booked), a);
                offered += 1;
            }
        }
        Ok(offered)
    }
}

impl SlotSource for LocalCore {
    fn free_slots(&self, query: &SlotQuery) -> BoxFuture<'static, SlotAnswer> {
        let ledger = self.ledger.clone();
        let query = query.clone();
        Box::pin(async move {
            let now = Timestamp::now();
            let horizon = now
                .checked_add(jiff::SignedDuration::from_hours(24 * HORIZON_DAYS))
                .unwrap_or(now);
            let from = query
                .start_ge
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok())
                .unwrap_or(now);
            let to = query
                .start_lt
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok())
                .unwrap_or(horizon);
            let mut slots = Vec::new();
            for schedule in ledger
                .schedules()
                .iter()
                .filter(|s| query.schedule.as_deref().is_none_or(|q| q == s.id()))
            {
                match ledger.free_slots(schedule.id(), from, to, now).await {
                    Ok(free) => slots.extend(free.into_iter().map(|s| SlotView {
                        id: s.id,
                        schedule: s.schedule,
                        start: s.start,
                        end: s.end,
                    })),
                    Err(e) => warn!(error = %e, "booking ledger cannot list free slots"),
                }
            }
            SlotAnswer {
                slots,
                as_of_unix: now_unix(),
                stale: false,
            }
        })
    }

    fn schedules(&self) -> BoxFuture<'static, Vec<String>> {
        let mut ids: Vec<String> = self
            .ledger
            .schedules()
            .iter()
            .map(|s| s.id().to_string())
            .collect();
        ids.sort();
        Box::pin(std::future::ready(ids))
    }
}

impl BookingBackend for LocalCore {
    fn request(
        &self,
        req: AppointmentRequest,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>> {
        let mut booking = BookingRequest {
            alerts: Vec::new(),
            request_id: req.request_id.clone(),
            clinic: self.me.clone(),
            slot_id: req.slot_id.clone(),
            hold: req.hold,
            patient: PatientRef {
                id: req.patient_id.clone(),
                name: req.patient_name.clone(),
                birth_date: req.birth_date.clone(),
                sex: req.sex.clone(),
            },
            procedure: req.procedure.clone(),
        };
        let ledger = self.ledger.clone();
        let changed = Arc::clone(&self.changed);
        let on_booked = self.on_booked.clone();
        let safety = self.safety.clone();
        let me = self.me.clone();
        Box::pin(async move {
            let gate = crate::safety_gate(
                safety.as_ref(),
                &ledger,
                &me,
                &booking,
                &req.acknowledged,
                &req.staff,
            )
            .await;
            let report = match gate {
                Ok(Gate::Decide { alerts, report }) => {
                    booking.alerts = alerts;
                    report
                }
                Ok(Gate::Refuse {
                    decision: Decision::Refused { code, reason },
                    report,
                }) => return Err(BookingRefused::from_refusal(code, reason, 0, report)),
                Ok(Gate::Refuse { .. }) => return Err(BookingRefused::Unavailable),
                Err(e) => {
                    warn!(error = %e, "booking ledger cannot be asked about a request");
                    return Err(BookingRefused::Unavailable);
                }
            };
            match ledger
                .decide(booking, Timestamp::now(), HOLD_FOR_SECS)
                .await
            {
                Ok(Decision::Booked { appointment_id, .. }) => {
                    changed.notify_one();
                    match ledger.get(&appointment_id).await {
                        // Like the exchange's decisions: durable on the ledger, then handed
                        // to `on_booked` (a hold is not an order; the order path skips it).
                        Ok(Some(a)) => {
                            crate::booked(on_booked.as_ref(), a.clone());
                            let mut v = view(a, true);
                            v.safety = report;
                            Ok(v)
                        }
                        Ok(None) => Err(BookingRefused::Unavailable),
                        Err(e) => {
                            warn!(error = %e, "booking ledger cannot read a decision back");
                            Err(BookingRefused::Unavailable)
                        }
                    }
                }
                Ok(Decision::Refused { code, reason }) => {
                    Err(BookingRefused::from_refusal(code, reason, 0, None))
                }
                Err(e) => {
                    warn!(error = %e, "booking ledger cannot record a decision");
                    Err(BookingRefused::Unavailable)
                }
            }
        })
    }

    fn cancel(
        &self,
        id: String,
        if_match: u64,
        _staff: String,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>> {
        let ledger = self.ledger.clone();
        let changed = Arc::clone(&self.changed);
        let me = self.me.clone();
        Box::pin(async move {
            match ledger.cancel(&me, &id, Some(if_match)).await {
                Ok(a) => {
                    changed.notify_one();
                    Ok(view(a, false))
                }
                Err(e) => match crate::cancel_decision(Err(e)) {
                    Ok((Decision::Refused { code, reason }, version)) => {
                        Err(BookingRefused::from_refusal(code, reason, version, None))
                    }
                    Ok(_) => Err(BookingRefused::Unavailable),
                    Err(e) => {
                        warn!(error = %e, "booking ledger cannot record a cancel");
                        Err(BookingRefused::Unavailable)
                    }
                },
            }
        })
    }

    fn appointments_of(&self, patient_id: &str) -> BoxFuture<'static, Vec<AppointmentView>> {
        let ledger = self.ledger.clone();
        let patient_id = patient_id.to_owned();
        Box::pin(async move {
            match ledger.all(Timestamp::now()).await {
                Ok(all) => all
                    .into_iter()
                    .filter(|a| a.patient.id == patient_id)
                    .map(|a| view(a, false))
                    .collect(),
                Err(e) => {
                    warn!(error = %e, "booking ledger cannot list appointments");
                    Vec::new()
                }
            }
        })
    }

    fn patient_ref(&self, patient_id: &str) -> String {
        self.seal.patient_ref(patient_id)
    }
}

fn view(a: Appointment, created: bool) -> AppointmentView {
    AppointmentView {
        safety: None,
        id: a.id,
        request_id: a.request_id,
        slot_id: a.slot_id,
        status: a.status.as_str().to_owned(),
        start: a.start,
        end: a.end,
        accession: Some(a.accession),
        patient_id: a.patient.id,
        procedure: a.procedure,
        created,
        version: a.version,
    }
}

/// A clinic kiosk without `booking.core`: no slots (stale), every booking refused (503).
#[derive(Debug, Default)]
pub struct NoCore;

impl SlotSource for NoCore {
    fn free_slots(&self, _query: &SlotQuery) -> BoxFuture<'static, SlotAnswer> {
        Box::pin(std::future::ready(SlotAnswer {
            slots: Vec::new(),
            as_of_unix: 0,
            stale: true,
        }))
    }

    fn schedules(&self) -> BoxFuture<'static, Vec<String>> {
        Box::pin(std::future::ready(Vec::new()))
    }
}

impl BookingBackend for NoCore {
    fn request(
        &self,
        _req: AppointmentRequest,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>> {
        Box::pin(async { Err(BookingRefused::Unavailable) })
    }

    fn cancel(
        &self,
        _id: String,
        _if_match: u64,
        _staff: String,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>> {
        Box::pin(async { Err(BookingRefused::Unavailable) })
    }

    fn appointments_of(&self, _patient_id: &str) -> BoxFuture<'static, Vec<AppointmentView>> {
        Box::pin(std::future::ready(Vec::new()))
    }

    fn patient_ref(&self, _patient_id: &str) -> String {
        "-".into()
    }
}
