//! The core's own kiosk: slots and bookings straight from its ledger (never stale; the
//! core's staff book for its own patients, `clinic` = the core's node id).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use gateway_booking::{
    Appointment, BookingRequest, Decision, Ledger, PatientRef, Schedule, SealKey,
};
use gateway_kiosk::appointment::{
    AppointmentRequest, AppointmentView, BookingBackend, BookingRefused,
};
use gateway_kiosk::{SlotAnswer, SlotQuery, SlotSource, SlotView};
use jiff::Timestamp;
use tokio::sync::Notify;
use tracing::warn;

use crate::core::{HOLD_FOR_SECS, HORIZON_DAYS};
use crate::now_unix;

/// Booking on the core's ledger directly.
pub struct LocalCore {
    me: String,
    ledger: Arc<Ledger>,
    schedules: Arc<Vec<Schedule>>,
    seal: SealKey,
    changed: Arc<Notify>,
    on_booked: Option<crate::core::OnBooked>,
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
    pub fn new(
        me: String,
        ledger: Arc<Ledger>,
        schedules: Arc<Vec<Schedule>>,
        seal: SealKey,
        changed: Arc<Notify>,
    ) -> Self {
        Self {
            me,
            ledger,
            schedules,
            seal,
            changed,
            on_booked: None,
        }
    }

    /// Called for every booked appointment (e.g. the OMG^O19 to the RIS).
    #[must_use]
    pub fn with_on_booked(mut self, f: crate::core::OnBooked) -> Self {
        self.on_booked = Some(f);
        self
    }
}

impl SlotSource for LocalCore {
    fn free_slots(&self, query: &SlotQuery) -> SlotAnswer {
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
        let slots = self
            .schedules
            .iter()
            .filter(|s| query.schedule.as_deref().is_none_or(|q| q == s.id()))
            .flat_map(|s| self.ledger.free_slots(s, from, to, now))
            .map(|s| SlotView {
                id: s.id,
                schedule: s.schedule,
                start: s.start,
                end: s.end,
            })
            .collect();
        SlotAnswer {
            slots,
            as_of_unix: now_unix(),
            stale: false,
        }
    }
}

impl BookingBackend for LocalCore {
    fn request(
        &self,
        req: AppointmentRequest,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>> {
        let booking = BookingRequest {
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
        let answer =
            match self
                .ledger
                .decide(&booking, &self.schedules, Timestamp::now(), HOLD_FOR_SECS)
            {
                Ok(Decision::Booked { appointment_id, .. }) => {
                    self.changed.notify_one();
                    self.ledger
                        .get(&appointment_id)
                        .map(|a| view(a, true))
                        .ok_or(BookingRefused::Unavailable)
                }
                Ok(Decision::Refused { code, reason }) => Err(crate::refused(code, reason, 0)),
                Err(e) => {
                    warn!(error = %e, "booking ledger cannot record a decision");
                    Err(BookingRefused::Unavailable)
                }
            };
        Box::pin(async move { answer })
    }

    fn cancel(
        &self,
        id: String,
        if_match: u64,
        _staff: String,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>> {
        let answer = match self.ledger.cancel(&self.me, &id, Some(if_match)) {
            Ok(a) => {
                self.changed.notify_one();
                Ok(view(a, false))
            }
            Err(e) => match crate::cancel_decision(Err(e)) {
                Ok((Decision::Refused { code, reason }, version)) => {
                    Err(crate::refused(code, reason, version))
                }
                Ok(_) => Err(BookingRefused::Unavailable),
                Err(e) => {
                    warn!(error = %e, "booking ledger cannot record a cancel");
                    Err(BookingRefused::Unavailable)
                }
            },
        };
        Box::pin(async move { answer })
    }

    fn appointments_of(&self, patient_id: &str) -> Vec<AppointmentView> {
        self.ledger
            .all(Timestamp::now())
            .into_iter()
            .filter(|a| a.patient.id == patient_id)
            .map(|a| view(a, false))
            .collect()
    }

    fn patient_ref(&self, patient_id: &str) -> String {
        self.seal.patient_ref(patient_id)
    }
}

fn view(a: Appointment, created: bool) -> AppointmentView {
    AppointmentView {
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
    fn free_slots(&self, _query: &SlotQuery) -> SlotAnswer {
        SlotAnswer {
            slots: Vec::new(),
            as_of_unix: 0,
            stale: true,
        }
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

    fn appointments_of(&self, _patient_id: &str) -> Vec<AppointmentView> {
        Vec::new()
    }

    fn patient_ref(&self, _patient_id: &str) -> String {
        "-".into()
    }
}
