//! The core gateway's booking ledger: every request decided once, durably.
//!
//! [`Ledger`] is the state and its rules, with blocking file I/O (every change is sealed and
//! written with `fsync` before the call returns). In the daemon one thread owns it
//! ([`crate::service::LedgerService`]); everyone else talks to that thread through a
//! [`crate::service::LedgerHandle`], so no async worker ever waits on its disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use gateway_durable as durable;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::schedule::Schedule;
use crate::sealed::SealKey;

const FILE: &str = "ledger.sealed";
/// Additional data of the sealed file.
const ROLE: &str = "booking ledger";

/// FHIR R4 AppointmentStatus, the subset this service moves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppointmentStatus {
    Proposed,
    Pending,
    Booked,
    Cancelled,
    Fulfilled,
    Noshow,
}

impl AppointmentStatus {
    /// The FHIR code (`booked`, `pending`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proposed => "proposed",
            Self::Pending => "pending",
            Self::Booked => "booked",
            Self::Cancelled => "cancelled",
            Self::Fulfilled => "fulfilled",
            Self::Noshow => "noshow",
        }
    }

    /// Whether the appointment still holds its slot.
    pub fn holds_slot(self) -> bool {
        matches!(self, Self::Proposed | Self::Pending | Self::Booked)
    }

    fn may_become(self, next: Self) -> bool {
        use AppointmentStatus::*;
        matches!(
            (self, next),
            (Proposed, Pending | Booked | Cancelled)
                | (Pending, Booked | Cancelled)
                | (Booked, Cancelled | Fulfilled | Noshow)
        )
    }
}

/// A clinic's request, as it reaches the core (decrypted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingRequest {
    /// Made by the clinic; a retry carries the same one.
    pub request_id: String,
    pub clinic: String,
    pub slot_id: String,
    /// `hold` (tentative, expires) or `book`.
    pub hold: bool,
    /// The patient as the clinic identifies them, kept on the core for the worklist.
    pub patient: PatientRef,
    /// Requested procedure, free text from the kiosk's list.
    pub procedure: String,
    /// The contrast reactions acknowledged for this booking (kept with the appointment).
    #[serde(default)]
    pub alerts: Vec<crate::safety::SafetyWarning>,
}

/// Patient identity carried to the core (only ever inside sealed booking messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PatientRef {
    pub id: String,
    /// DICOM PN, e.g. `YAMADA^TARO=山田^太郎=やまだ^たろう`.
    pub name: String,
    /// `YYYYMMDD`.
    pub birth_date: String,
    pub sex: String,
}

/// Why a request was refused (FHIR OperationOutcome issue codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// The slot is taken by another request.
    Conflict,
    /// No such slot in any schedule.
    NotFound,
    /// The slot has started or passed.
    Expired,
    /// The request itself is malformed.
    Invalid,
    /// A change named a version the appointment no longer has.
    VersionMismatch,
    /// Safety warnings (contrast reactions, cumulative dose) must be acknowledged by a
    /// physician first; the decision carries them. Nothing was recorded.
    NeedsAcknowledgement,
    /// The core could not decide now (its safety check did not answer); nothing was
    /// recorded: the request may be sent again. Never a booking made unchecked.
    Unavailable,
}

/// The core's answer to a request; the same request always gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Decision {
    Booked {
        appointment_id: String,
        accession: String,
        status: AppointmentStatus,
    },
    Refused {
        code: Refusal,
        reason: String,
    },
}

/// One appointment on the core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appointment {
    pub id: String,
    pub slot_id: String,
    pub schedule: String,
    pub start: String,
    pub end: String,
    pub clinic: String,
    pub request_id: String,
    pub patient: PatientRef,
    pub procedure: String,
    /// Accession number for the worklist (16 characters at most, DICOM SH).
    pub accession: String,
    pub status: AppointmentStatus,
    /// A hold's expiry (Unix seconds); None for booked appointments.
    pub hold_expires_unix: Option<i64>,
    /// Changes with every status change (the kiosk's ETag, `W/"{version}"`).
    #[serde(default = "first_version")]
    pub version: u64,
    /// The contrast reactions the booking was acknowledged with: the RIS order carries them
    /// as AL1 segments and the worklist item as Medical Alerts / Contrast Allergies.
    #[serde(default)]
    pub alerts: Vec<crate::safety::SafetyWarning>,
}

fn first_version() -> u64 {
    1
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    appointments: BTreeMap<String, Appointment>,
    /// clinic '|' request id -> decision.
    decisions: BTreeMap<String, Decision>,
    next_number: u64,
    /// Time the hospital itself booked (its RIS's SIU^S12..S15), by its source key.
    #[serde(default)]
    blocks: BTreeMap<String, Block>,
}

/// A span of a schedule taken by the hospital itself (not bookable by clinics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub schedule: String,
    /// Unix seconds, `[start, end)`.
    pub start: i64,
    pub end: i64,
}

impl Block {
    fn overlaps(&self, schedule: &Schedule, slot: &crate::schedule::Slot) -> bool {
        let slot_end = slot.start_ts.as_second() + i64::from(schedule.slot_minutes()) * 60;
        self.schedule == schedule.id()
            && slot.start_ts.as_second() < self.end
            && slot_end > self.start
    }
}

/// Ledger failures (storage).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Io(#[from] durable::Error),
    #[error(transparent)]
    Sealed(#[from] crate::sealed::SealError),
    #[error("booking ledger {path} is unreadable: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("no appointment {0}")]
    NoSuchAppointment(String),
    #[error("appointment {id} changed (now version {current})")]
    VersionMismatch { id: String, current: u64 },
    #[error("appointment {id} cannot go from {from:?} to {to:?}")]
    Transition {
        id: String,
        from: AppointmentStatus,
        to: AppointmentStatus,
    },
    /// The ledger service's thread is gone (only at shutdown, or after it panicked).
    #[error("the booking ledger service has stopped")]
    Stopped,
}

/// The core's appointments, in `<data_dir>/booking/ledger.sealed` (sealed: it holds
/// patient identity).
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    key: SealKey,
    state: Mutex<State>,
}

impl Ledger {
    pub fn open(dir: &Path, key: SealKey) -> Result<Self, LedgerError> {
        durable::ensure_private_dir(dir)?;
        let path = dir.join(FILE);
        let state = match key.read(&path, ROLE)? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| LedgerError::Corrupt {
                path: path.clone(),
                detail: e.to_string(),
            })?,
            None => State::default(),
        };
        Ok(Self {
            path,
            key,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, state: &State) -> Result<(), LedgerError> {
        let bytes = serde_json::to_vec(state).map_err(|e| LedgerError::Corrupt {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        let bytes = zeroize::Zeroizing::new(bytes);
        self.key.write(&self.path, ROLE, &bytes)?;
        Ok(())
    }

    /// Decides a request at `now` against `schedules`. A repeat of a decided request (same
    /// clinic and request id) gets the first answer, except that a hold followed by a
    /// `book` with the same id confirms the hold. New decisions are saved before return.
    pub fn decide(
        &self,
        req: &BookingRequest,
        schedules: &[Schedule],
        now: Timestamp,
        hold_for_secs: i64,
    ) -> Result<Decision, LedgerError> {
        let key = format!("{}|{}", req.clinic, req.request_id);
        let mut state = self.lock();
        expire_holds(&mut state, now);
        if let Some(done) = state.decisions.get(&key).cloned() {
            return self.repeat(&mut state, &key, done, req);
        }
        let refuse = |code, reason: &str| Decision::Refused {
            code,
            reason: reason.to_string(),
        };
        let decision =
            if !gateway_id::is_valid(&req.request_id) || !gateway_id::is_valid(&req.clinic) {
                refuse(
                    Refusal::Invalid,
                    "request and clinic ids are 1-64 of A-Z a-z 0-9 - _ .",
                )
            } else if let Some((schedule, slot)) = schedules
                .iter()
                .find_map(|s| s.slot(&req.slot_id).map(|slot| (s, slot)))
            {
                if slot.start_ts <= now {
                    refuse(Refusal::Expired, "the slot has already begun")
                } else if state.blocks.values().any(|b| b.overlaps(schedule, &slot)) {
                    refuse(
                        Refusal::Conflict,
                        "the slot is taken by the hospital's own schedule",
                    )
                } else if state
                    .appointments
                    .values()
                    .any(|a| a.slot_id == slot.id && a.status.holds_slot())
                {
                    refuse(Refusal::Conflict, "the slot was booked by another request")
                } else {
                    state.next_number += 1;
                    let number = state.next_number;
                    let id = format!("apt-{number:08}");
                    // RB + local date of the slot + ledger number: 16 characters (DICOM SH).
                    let date = slot
                        .id
                        .get(slot.id.len().saturating_sub(13)..)
                        .and_then(|stamp| stamp.get(..8))
                        .unwrap_or("00000000");
                    let accession = format!("RB{date}{number:06}");
                    let status = if req.hold {
                        AppointmentStatus::Pending
                    } else {
                        AppointmentStatus::Booked
                    };
                    state.appointments.insert(
                        id.clone(),
                        Appointment {
                            id: id.clone(),
                            slot_id: slot.id.clone(),
                            schedule: schedule.id().to_string(),
                            start: slot.start.clone(),
                            end: slot.end.clone(),
                            clinic: req.clinic.clone(),
                            request_id: req.request_id.clone(),
                            patient: req.patient.clone(),
                            procedure: req.procedure.chars().take(64).collect(),
                            accession: accession.clone(),
                            status,
                            hold_expires_unix: req.hold.then(|| now.as_second() + hold_for_secs),
                            version: 1,
                            alerts: req.alerts.clone(),
                        },
                    );
                    Decision::Booked {
                        appointment_id: id,
                        accession,
                        status,
                    }
                }
            } else {
                refuse(Refusal::NotFound, "no schedule has that slot")
            };
        state.decisions.insert(key, decision.clone());
        self.save(&state)?;
        Ok(decision)
    }

    /// The decision recorded for `request_id` of `clinic`, if it was decided before (the
    /// core asks its safety check only for requests that are not: a repeat gets its first
    /// answer, a `book` confirming a hold keeps the alerts the hold was acknowledged with).
    pub fn decided(&self, clinic: &str, request_id: &str) -> Option<Decision> {
        self.lock()
            .decisions
            .get(&format!("{clinic}|{request_id}"))
            .cloned()
    }

    /// A request decided before: the same answer, or a hold confirmed by `book`.
    fn repeat(
        &self,
        state: &mut State,
        key: &str,
        done: Decision,
        req: &BookingRequest,
    ) -> Result<Decision, LedgerError> {
        let Decision::Booked { appointment_id, .. } = &done else {
            return Ok(done);
        };
        let Some(a) = state.appointments.get_mut(appointment_id) else {
            return Ok(done);
        };
        if req.hold || a.status != AppointmentStatus::Pending {
            return Ok(Decision::Booked {
                appointment_id: a.id.clone(),
                accession: a.accession.clone(),
                status: a.status,
            });
        }
        a.status = AppointmentStatus::Booked;
        a.hold_expires_unix = None;
        a.version += 1;
        // The hold's acknowledged alerts stay; a confirmation that carries alerts of its own
        // (acknowledged again) replaces them.
        if !req.alerts.is_empty() {
            a.alerts.clone_from(&req.alerts);
        }
        let now = Decision::Booked {
            appointment_id: a.id.clone(),
            accession: a.accession.clone(),
            status: a.status,
        };
        state.decisions.insert(key.to_string(), now.clone());
        self.save(state)?;
        Ok(now)
    }

    /// Moves an appointment to `to` if FHIR's workflow allows it.
    pub fn set_status(&self, id: &str, to: AppointmentStatus) -> Result<Appointment, LedgerError> {
        let mut state = self.lock();
        let a = state
            .appointments
            .get_mut(id)
            .ok_or_else(|| LedgerError::NoSuchAppointment(id.to_string()))?;
        if !a.status.may_become(to) {
            return Err(LedgerError::Transition {
                id: id.to_string(),
                from: a.status,
                to,
            });
        }
        a.status = to;
        a.hold_expires_unix = None;
        a.version += 1;
        let out = a.clone();
        self.save(&state)?;
        Ok(out)
    }

    /// Cancels `id` for `clinic` (only the clinic that booked it may). With `if_match`, the
    /// appointment must still be at that version (else [`LedgerError::VersionMismatch`]).
    /// Cancelling a cancelled appointment again is the same answer (idempotent).
    pub fn cancel(
        &self,
        clinic: &str,
        id: &str,
        if_match: Option<u64>,
    ) -> Result<Appointment, LedgerError> {
        let mut state = self.lock();
        let a = state
            .appointments
            .get_mut(id)
            .filter(|a| a.clinic == clinic)
            .ok_or_else(|| LedgerError::NoSuchAppointment(id.to_string()))?;
        if a.status == AppointmentStatus::Cancelled {
            return Ok(a.clone());
        }
        if let Some(expected) = if_match
            && expected != a.version
        {
            return Err(LedgerError::VersionMismatch {
                id: id.to_string(),
                current: a.version,
            });
        }
        if !a.status.may_become(AppointmentStatus::Cancelled) {
            return Err(LedgerError::Transition {
                id: id.to_string(),
                from: a.status,
                to: AppointmentStatus::Cancelled,
            });
        }
        a.status = AppointmentStatus::Cancelled;
        a.hold_expires_unix = None;
        a.version += 1;
        let out = a.clone();
        self.save(&state)?;
        Ok(out)
    }

    /// Appointments that hold their slot, for the free-slot list and the worklist.
    pub fn live(&self, now: Timestamp) -> Vec<Appointment> {
        let mut state = self.lock();
        expire_holds(&mut state, now);
        state
            .appointments
            .values()
            .filter(|a| a.status.holds_slot())
            .cloned()
            .collect()
    }

    /// The slots of `schedule` starting in `[from, to)` that have not begun at `now` and
    /// that no live appointment holds: what the core publishes to the clinics.
    pub fn free_slots(
        &self,
        schedule: &Schedule,
        from: Timestamp,
        to: Timestamp,
        now: Timestamp,
    ) -> Vec<crate::schedule::Slot> {
        let taken: std::collections::BTreeSet<String> =
            self.live(now).into_iter().map(|a| a.slot_id).collect();
        let blocks: Vec<Block> = self.lock().blocks.values().cloned().collect();
        schedule
            .slots_between(from.max(now), to)
            .into_iter()
            .filter(|s| {
                s.start_ts > now
                    && !taken.contains(&s.id)
                    && !blocks.iter().any(|b| b.overlaps(schedule, s))
            })
            .collect()
    }

    /// Records (or moves) a span the hospital booked itself, under its source's key (e.g.
    /// `ris|{placer appointment id}`). Saved before return.
    pub fn block(&self, key: &str, block: Block) -> Result<(), LedgerError> {
        let mut state = self.lock();
        if state.blocks.get(key) == Some(&block) {
            return Ok(());
        }
        state.blocks.insert(key.to_owned(), block);
        self.save(&state)
    }

    /// Frees a span recorded by [`Ledger::block`]; false if there was none.
    pub fn unblock(&self, key: &str) -> Result<bool, LedgerError> {
        let mut state = self.lock();
        if state.blocks.remove(key).is_none() {
            return Ok(false);
        }
        self.save(&state)?;
        Ok(true)
    }

    /// Every appointment, whatever its status (holds past expiry as cancelled).
    pub fn all(&self, now: Timestamp) -> Vec<Appointment> {
        let mut state = self.lock();
        expire_holds(&mut state, now);
        state.appointments.values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Option<Appointment> {
        self.lock().appointments.get(id).cloned()
    }

    /// The appointment whose study carries this accession number (accession numbers are
    /// given by the ledger, one per appointment); only that one is copied out.
    pub fn by_accession(&self, accession: &str) -> Option<Appointment> {
        self.lock()
            .appointments
            .values()
            .find(|a| a.accession == accession)
            .cloned()
    }
}

/// Holds past their expiry give their slot back (in memory; saved with the next change).
fn expire_holds(state: &mut State, now: Timestamp) {
    for a in state.appointments.values_mut() {
        if a.status == AppointmentStatus::Pending
            && a.hold_expires_unix.is_some_and(|t| t <= now.as_second())
        {
            a.status = AppointmentStatus::Cancelled;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleSpec;

    fn schedules() -> Vec<Schedule> {
        vec![
            Schedule::new(&ScheduleSpec {
                id: "ct-1".into(),
                modality: "CT".into(),
                station_ae: "CT01".into(),
                ..ScheduleSpec::default()
            })
            .unwrap(),
        ]
    }

    fn now() -> Timestamp {
        "2027-01-12T00:00:00Z".parse().unwrap() // 09:00 in Tokyo
    }

    fn req(clinic: &str, id: &str, slot: &str, hold: bool) -> BookingRequest {
        BookingRequest {
            alerts: Vec::new(),
            request_id: id.into(),
            clinic: clinic.into(),
            slot_id: slot.into(),
            hold,
            patient: PatientRef {
                id: "ZZPID0001".into(),
                name: "ZZTEST^TARO".into(),
                birth_date: "19700101".into(),
                sex: "M".into(),
            },
            procedure: "CT chest".into(),
        }
    }

    #[test]
    fn one_request_wins_a_slot_and_retries_get_the_same_answer() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(
            dir.path(),
            SealKey::derive(&gateway_keystore::MasterKey::from_bytes([9; 32])),
        )
        .unwrap();
        let s = schedules();
        let slot = "ct-1.20270112T1000";
        let a = ledger
            .decide(&req("clinic-a", "r1", slot, false), &s, now(), 300)
            .unwrap();
        let Decision::Booked {
            appointment_id,
            accession,
            status,
        } = &a
        else {
            panic!("{a:?}")
        };
        assert_eq!(*status, AppointmentStatus::Booked);
        assert_eq!(accession, "RB20270112000001");
        let found = ledger.by_accession(accession).unwrap();
        assert_eq!(&found.id, appointment_id);
        assert!(ledger.by_accession("RB20270112000002").is_none());
        let b = ledger
            .decide(&req("clinic-b", "r1", slot, false), &s, now(), 300)
            .unwrap();
        assert!(
            matches!(
                b,
                Decision::Refused {
                    code: Refusal::Conflict,
                    ..
                }
            ),
            "{b:?}"
        );
        // Retries, also after a restart: same answers, nothing booked twice.
        drop(ledger);
        let ledger = Ledger::open(
            dir.path(),
            SealKey::derive(&gateway_keystore::MasterKey::from_bytes([9; 32])),
        )
        .unwrap();
        assert_eq!(
            ledger
                .decide(&req("clinic-a", "r1", slot, false), &s, now(), 300)
                .unwrap(),
            a
        );
        assert_eq!(
            ledger
                .decide(&req("clinic-b", "r1", slot, false), &s, now(), 300)
                .unwrap(),
            b
        );
        assert_eq!(ledger.live(now()).len(), 1);
        assert_eq!(
            ledger.get(appointment_id).unwrap().patient.name,
            "ZZTEST^TARO"
        );
    }

    #[test]
    fn unknown_past_and_malformed_requests_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(
            dir.path(),
            SealKey::derive(&gateway_keystore::MasterKey::from_bytes([9; 32])),
        )
        .unwrap();
        let s = schedules();
        let cases = [
            (
                req("c", "r1", "ct-1.20270112T1015", false),
                Refusal::NotFound,
            ),
            (
                req("c", "r2", "ct-9.20270112T1000", false),
                Refusal::NotFound,
            ),
            (
                req("c", "r3", "ct-1.20270112T0900", false),
                Refusal::Expired,
            ),
            (
                req("c", "bad id!", "ct-1.20270112T1000", false),
                Refusal::Invalid,
            ),
            (req("", "r4", "ct-1.20270112T1000", false), Refusal::Invalid),
        ];
        for (r, code) in cases {
            let d = ledger.decide(&r, &s, now(), 300).unwrap();
            assert!(
                matches!(&d, Decision::Refused { code: c, .. } if *c == code),
                "{r:?} -> {d:?}"
            );
        }
        assert!(ledger.live(now()).is_empty());
        assert!(matches!(
            ledger
                .decide(&req("c", "r5", "ct-1.20270112T1000", false), &s, now(), 300)
                .unwrap(),
            Decision::Booked { .. }
        ));
    }

    #[test]
    fn a_hold_expires_or_is_confirmed_by_book_with_the_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(
            dir.path(),
            SealKey::derive(&gateway_keystore::MasterKey::from_bytes([9; 32])),
        )
        .unwrap();
        let s = schedules();
        let slot = "ct-1.20270112T1100";
        let held = ledger
            .decide(&req("a", "h1", slot, true), &s, now(), 300)
            .unwrap();
        assert!(matches!(
            held,
            Decision::Booked {
                status: AppointmentStatus::Pending,
                ..
            }
        ));
        let other = ledger
            .decide(&req("b", "x1", slot, false), &s, now(), 300)
            .unwrap();
        assert!(matches!(
            other,
            Decision::Refused {
                code: Refusal::Conflict,
                ..
            }
        ));
        let booked = ledger
            .decide(&req("a", "h1", slot, false), &s, now(), 300)
            .unwrap();
        assert!(matches!(
            booked,
            Decision::Booked {
                status: AppointmentStatus::Booked,
                ..
            }
        ));
        // An unconfirmed hold gives its slot back when it expires.
        let slot2 = "ct-1.20270112T1130";
        ledger
            .decide(&req("a", "h2", slot2, true), &s, now(), 300)
            .unwrap();
        let later = now() + jiff::SignedDuration::from_secs(301);
        let taken = ledger
            .decide(&req("b", "x2", slot2, false), &s, later, 300)
            .unwrap();
        assert!(
            matches!(
                taken,
                Decision::Booked {
                    status: AppointmentStatus::Booked,
                    ..
                }
            ),
            "{taken:?}"
        );
        let late = ledger
            .decide(&req("a", "h2", slot2, false), &s, later, 300)
            .unwrap();
        assert!(
            matches!(
                late,
                Decision::Booked {
                    status: AppointmentStatus::Cancelled,
                    ..
                }
            ),
            "{late:?}"
        );
    }

    #[test]
    fn free_slots_leave_out_the_past_and_every_live_appointment() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(
            dir.path(),
            SealKey::derive(&gateway_keystore::MasterKey::from_bytes([9; 32])),
        )
        .unwrap();
        let s = schedules();
        let now: Timestamp = "2027-01-12T01:10:00Z".parse().unwrap(); // 10:10 in Tokyo
        let day_end: Timestamp = "2027-01-12T09:00:00Z".parse().unwrap();
        let free =
            |now| ledger.free_slots(&s[0], "2027-01-12T00:00:00Z".parse().unwrap(), day_end, now);
        let all = free(now);
        assert_eq!(
            all.first().unwrap().id,
            "ct-1.20270112T1030",
            "10:00 has begun"
        );
        assert_eq!(all.len(), 13);
        ledger
            .decide(&req("a", "r1", "ct-1.20270112T1100", false), &s, now, 300)
            .unwrap();
        ledger
            .decide(&req("a", "h1", "ct-1.20270112T1130", true), &s, now, 300)
            .unwrap();
        let ids: Vec<String> = free(now).into_iter().map(|x| x.id).collect();
        assert_eq!(ids.len(), 11);
        assert!(!ids.contains(&"ct-1.20270112T1100".to_string()));
        assert!(!ids.contains(&"ct-1.20270112T1130".to_string()), "held");
        let later = now + jiff::SignedDuration::from_secs(301);
        assert!(
            free(later).iter().any(|x| x.id == "ct-1.20270112T1130"),
            "the hold expired"
        );
    }

    #[test]
    fn status_changes_follow_the_fhir_workflow() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(
            dir.path(),
            SealKey::derive(&gateway_keystore::MasterKey::from_bytes([9; 32])),
        )
        .unwrap();
        let d = ledger
            .decide(
                &req("a", "r1", "ct-1.20270112T1000", false),
                &schedules(),
                now(),
                300,
            )
            .unwrap();
        let Decision::Booked {
            appointment_id: id, ..
        } = d
        else {
            panic!()
        };
        assert!(matches!(
            ledger.set_status(&id, AppointmentStatus::Pending),
            Err(LedgerError::Transition { .. })
        ));
        assert_eq!(
            ledger
                .set_status(&id, AppointmentStatus::Fulfilled)
                .unwrap()
                .status,
            AppointmentStatus::Fulfilled
        );
        assert!(
            ledger
                .set_status(&id, AppointmentStatus::Cancelled)
                .is_err()
        );
        assert!(matches!(
            ledger.set_status("apt-x", AppointmentStatus::Cancelled),
            Err(LedgerError::NoSuchAppointment(_))
        ));
        assert!(ledger.live(now()).is_empty());
    }
}

#[cfg(test)]
mod cancel_tests {
    use super::*;
    use crate::schedule::ScheduleSpec;
    use crate::sealed::SealKey;

    #[test]
    fn cancel_checks_owner_and_version_frees_the_slot_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(
            dir.path(),
            SealKey::derive(&gateway_keystore::MasterKey::from_bytes([9; 32])),
        )
        .unwrap();
        let schedules = vec![
            Schedule::new(&ScheduleSpec {
                id: "ct-1".into(),
                modality: "CT".into(),
                station_ae: "CT01".into(),
                ..ScheduleSpec::default()
            })
            .unwrap(),
        ];
        let now: Timestamp = "2027-01-12T00:00:00Z".parse().unwrap();
        let req = BookingRequest {
            alerts: Vec::new(),
            request_id: "r1".into(),
            clinic: "clinic-a".into(),
            slot_id: "ct-1.20270112T1000".into(),
            hold: false,
            patient: PatientRef::default(),
            procedure: "CT".into(),
        };
        let Decision::Booked { appointment_id, .. } =
            ledger.decide(&req, &schedules, now, 600).unwrap()
        else {
            panic!("not booked")
        };
        assert_eq!(ledger.get(&appointment_id).unwrap().version, 1);
        assert!(matches!(
            ledger.cancel("clinic-b", &appointment_id, None),
            Err(LedgerError::NoSuchAppointment(_))
        ));
        assert!(matches!(
            ledger.cancel("clinic-a", &appointment_id, Some(7)),
            Err(LedgerError::VersionMismatch { current: 1, .. })
        ));
        let a = ledger.cancel("clinic-a", &appointment_id, Some(1)).unwrap();
        assert_eq!((a.status, a.version), (AppointmentStatus::Cancelled, 2));
        assert_eq!(
            ledger
                .cancel("clinic-a", &appointment_id, Some(1))
                .unwrap()
                .version,
            2
        );
        // The slot is free again for another request.
        let again = BookingRequest {
            request_id: "r2".into(),
            ..req
        };
        assert!(matches!(
            ledger.decide(&again, &schedules, now, 600).unwrap(),
            Decision::Booked { .. }
        ));
    }
}

#[cfg(test)]
mod block_tests {
    use super::*;
    use crate::schedule::ScheduleSpec;
    use crate::sealed::SealKey;

    #[test]
    fn a_hospital_block_hides_overlapping_slots_and_refuses_them_until_freed() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(
            dir.path(),
            SealKey::derive(&gateway_keystore::MasterKey::from_bytes([9; 32])),
        )
        .unwrap();
        let ct = Schedule::new(&ScheduleSpec {
            id: "ct-1".into(),
            modality: "CT".into(),
            station_ae: "CT01".into(),
            ..ScheduleSpec::default()
        })
        .unwrap();
        let now: Timestamp = "2027-01-12T00:00:00Z".parse().unwrap(); // 09:00 Tokyo
        let day_end: Timestamp = "2027-01-12T09:00:00Z".parse().unwrap();
        let before = ledger.free_slots(&ct, now, day_end, now).len();
        // 10:15-11:00 local touches the 10:00, 10:30 slots.
        let block = Block {
            schedule: "ct-1".into(),
            start: "2027-01-12T01:15:00Z"
                .parse::<Timestamp>()
                .unwrap()
                .as_second(),
            end: "2027-01-12T02:00:00Z"
                .parse::<Timestamp>()
                .unwrap()
                .as_second(),
        };
        ledger.block("ris|A1", block.clone()).unwrap();
        let free: Vec<String> = ledger
            .free_slots(&ct, now, day_end, now)
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(free.len(), before - 2);
        assert!(!free.contains(&"ct-1.20270112T1000".to_string()));
        assert!(!free.contains(&"ct-1.20270112T1030".to_string()));
        assert!(free.contains(&"ct-1.20270112T1100".to_string()));
        let req = BookingRequest {
            alerts: Vec::new(),
            request_id: "r1".into(),
            clinic: "clinic-a".into(),
            slot_id: "ct-1.20270112T1030".into(),
            hold: false,
            patient: PatientRef::default(),
            procedure: "CT".into(),
        };
        assert!(matches!(
            ledger
                .decide(&req, std::slice::from_ref(&ct), now, 600)
                .unwrap(),
            Decision::Refused {
                code: Refusal::Conflict,
                ..
            }
        ));
        // Survives a reopen; freed by unblock.
        drop(ledger);
        let ledger = Ledger::open(
            dir.path(),
            SealKey::derive(&gateway_keystore::MasterKey::from_bytes([9; 32])),
        )
        .unwrap();
        assert_eq!(ledger.free_slots(&ct, now, day_end, now).len(), before - 2);
        assert!(ledger.unblock("ris|A1").unwrap());
        assert!(!ledger.unblock("ris|A1").unwrap());
        assert_eq!(ledger.free_slots(&ct, now, day_end, now).len(), before);
    }
}
