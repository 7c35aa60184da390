//! The ledger as a service: one thread owns the [`Ledger`], everyone else holds a
//! [`LedgerHandle`].
//!
//! Every change of the ledger seals and rewrites its whole file with `fsync` before it is
//! answered. That is blocking work, so it runs on the ledger's own thread
//! (`booking-ledger`), never on an async worker: the regional exchange, the core's kiosk, the
//! RIS feed (SIU) and the worklist send typed requests over a tokio channel and await the
//! answer on a oneshot. The thread takes requests one at a time, in arrival order, so the
//! ledger's rules see one caller at a time exactly as before; an answer to a change is sent
//! only after the change is on disk.
//!
//! Lifetime: the thread ends when the last handle is dropped (after answering everything
//! already queued). A handle whose thread is gone answers [`LedgerError::Stopped`].

use std::sync::Arc;

use jiff::Timestamp;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::ledger::{
    Appointment, AppointmentStatus, Block, BookingRequest, Decision, Ledger, LedgerError,
};
use crate::schedule::{Schedule, Slot};

/// Requests waiting for the ledger thread before senders wait for room.
const QUEUE: usize = 256;

/// One typed request to the ledger thread, with where its answer goes.
enum Request {
    Decide {
        request: BookingRequest,
        now: Timestamp,
        hold_for_secs: i64,
        reply: oneshot::Sender<Result<Decision, LedgerError>>,
    },
    SetStatus {
        id: String,
        to: AppointmentStatus,
        reply: oneshot::Sender<Result<Appointment, LedgerError>>,
    },
    Cancel {
        clinic: String,
        id: String,
        if_match: Option<u64>,
        reply: oneshot::Sender<Result<Appointment, LedgerError>>,
    },
    Live {
        now: Timestamp,
        reply: oneshot::Sender<Vec<Appointment>>,
    },
    FreeSlots {
        schedule: String,
        from: Timestamp,
        to: Timestamp,
        now: Timestamp,
        reply: oneshot::Sender<Vec<Slot>>,
    },
    Block {
        key: String,
        block: Block,
        reply: oneshot::Sender<Result<(), LedgerError>>,
    },
    Unblock {
        key: String,
        reply: oneshot::Sender<Result<bool, LedgerError>>,
    },
    All {
        now: Timestamp,
        reply: oneshot::Sender<Vec<Appointment>>,
    },
    ByAccession {
        accession: String,
        reply: oneshot::Sender<Option<Appointment>>,
    },
    Get {
        id: String,
        reply: oneshot::Sender<Option<Appointment>>,
    },
    Decided {
        clinic: String,
        request_id: String,
        reply: oneshot::Sender<Option<Decision>>,
    },
}

/// The owner of the [`Ledger`]; run it with [`LedgerService::spawn`] (or
/// [`LedgerService::run`] on a thread of your own).
pub struct LedgerService {
    ledger: Ledger,
    schedules: Arc<Vec<Schedule>>,
    rx: mpsc::Receiver<Request>,
}

impl std::fmt::Debug for LedgerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerService")
            .field("schedules", &self.schedules.len())
            .finish_non_exhaustive()
    }
}

/// A cheap, cloneable way to the ledger thread.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: mpsc::Sender<Request>,
    schedules: Arc<Vec<Schedule>>,
}

impl std::fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHandle")
            .field("schedules", &self.schedules.len())
            .field("stopped", &self.tx.is_closed())
            .finish()
    }
}

impl LedgerService {
    /// The service owning `ledger` (deciding against `schedules`) and a handle on it. Nothing
    /// is answered until the service runs.
    pub fn new(ledger: Ledger, schedules: Arc<Vec<Schedule>>) -> (Self, LedgerHandle) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let handle = LedgerHandle {
            tx,
            schedules: Arc::clone(&schedules),
        };
        (
            Self {
                ledger,
                schedules,
                rx,
            },
            handle,
        )
    }

    /// Runs the service on its own thread, `booking-ledger`.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("booking-ledger".into())
            .spawn(move || self.run())
    }

    /// Answers requests until every handle is gone. Blocking: call it on a thread of its own,
    /// never on an async worker.
    pub fn run(mut self) {
        while let Some(request) = self.rx.blocking_recv() {
            self.answer(request);
        }
        debug!("booking ledger service stopped: no handle left");
    }

    /// One request. A caller that stopped waiting (its reply dropped) does not undo a change
    /// already made: it is on disk, and a retry gets the same answer.
    fn answer(&self, request: Request) {
        let ledger = &self.ledger;
        match request {
            Request::Decide {
                request,
                now,
                hold_for_secs,
                reply,
            } => {
                let _ = reply.send(ledger.decide(&request, &self.schedules, now, hold_for_secs));
            }
            Request::SetStatus { id, to, reply } => {
                let _ = reply.send(ledger.set_status(&id, to));
            }
            Request::Cancel {
                clinic,
                id,
                if_match,
                reply,
            } => {
                let _ = reply.send(ledger.cancel(&clinic, &id, if_match));
            }
            Request::Live { now, reply } => {
                let _ = reply.send(ledger.live(now));
            }
            Request::FreeSlots {
                schedule,
                from,
                to,
                now,
                reply,
            } => {
                let slots = self
                    .schedules
                    .iter()
                    .find(|s| s.id() == schedule)
                    .map(|s| ledger.free_slots(s, from, to, now))
                    .unwrap_or_default();
                let _ = reply.send(slots);
            }
            Request::Block { key, block, reply } => {
                let _ = reply.send(ledger.block(&key, block));
            }
            Request::Unblock { key, reply } => {
                let _ = reply.send(ledger.unblock(&key));
            }
            Request::All { now, reply } => {
                let _ = reply.send(ledger.all(now));
            }
            Request::ByAccession { accession, reply } => {
                let _ = reply.send(ledger.by_accession(&accession));
            }
            Request::Get { id, reply } => {
                let _ = reply.send(ledger.get(&id));
            }
            Request::Decided {
                clinic,
                request_id,
                reply,
            } => {
                let _ = reply.send(ledger.decided(&clinic, &request_id));
            }
        }
    }
}

impl LedgerHandle {
    /// The schedules the ledger decides against.
    pub fn schedules(&self) -> &Arc<Vec<Schedule>> {
        &self.schedules
    }

    /// Sends a request and awaits its answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| LedgerError::Stopped)?;
        answer.await.map_err(|_| LedgerError::Stopped)
    }

    /// [`Ledger::decide`] against the service's schedules; answered once saved.
    pub async fn decide(
        &self,
        request: BookingRequest,
        now: Timestamp,
        hold_for_secs: i64,
    ) -> Result<Decision, LedgerError> {
        self.ask(|reply| Request::Decide {
            request,
            now,
            hold_for_secs,
            reply,
        })
        .await?
    }

    /// [`Ledger::set_status`]; answered once saved.
    pub async fn set_status(
        &self,
        id: &str,
        to: AppointmentStatus,
    ) -> Result<Appointment, LedgerError> {
        let id = id.to_owned();
        self.ask(|reply| Request::SetStatus { id, to, reply })
            .await?
    }

    /// [`Ledger::cancel`]; answered once saved.
    pub async fn cancel(
        &self,
        clinic: &str,
        id: &str,
        if_match: Option<u64>,
    ) -> Result<Appointment, LedgerError> {
        let (clinic, id) = (clinic.to_owned(), id.to_owned());
        self.ask(|reply| Request::Cancel {
            clinic,
            id,
            if_match,
            reply,
        })
        .await?
    }

    /// [`Ledger::live`].
    pub async fn live(&self, now: Timestamp) -> Result<Vec<Appointment>, LedgerError> {
        self.ask(|reply| Request::Live { now, reply }).await
    }

    /// [`Ledger::live`] from a blocking thread (e.g. the worklist's `spawn_blocking`). Must
    /// not be called on an async worker.
    pub fn live_blocking(&self, now: Timestamp) -> Result<Vec<Appointment>, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .blocking_send(Request::Live { now, reply })
            .map_err(|_| LedgerError::Stopped)?;
        answer.blocking_recv().map_err(|_| LedgerError::Stopped)
    }

    /// [`Ledger::free_slots`] of the schedule with id `schedule` (none for an unknown id).
    pub async fn free_slots(
        &self,
        schedule: &str,
        from: Timestamp,
        to: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<Slot>, LedgerError> {
        let schedule = schedule.to_owned();
        self.ask(|reply| Request::FreeSlots {
            schedule,
            from,
            to,
            now,
            reply,
        })
        .await
    }

    /// [`Ledger::block`]; answered once saved.
    pub async fn block(&self, key: &str, block: Block) -> Result<(), LedgerError> {
        let key = key.to_owned();
        self.ask(|reply| Request::Block { key, block, reply })
            .await?
    }

    /// [`Ledger::unblock`]; answered once saved.
    pub async fn unblock(&self, key: &str) -> Result<bool, LedgerError> {
        let key = key.to_owned();
        self.ask(|reply| Request::Unblock { key, reply }).await?
    }

    /// [`Ledger::all`].
    pub async fn all(&self, now: Timestamp) -> Result<Vec<Appointment>, LedgerError> {
        self.ask(|reply| Request::All { now, reply }).await
    }

    /// [`Ledger::by_accession`].
    pub async fn by_accession(&self, accession: &str) -> Result<Option<Appointment>, LedgerError> {
        let accession = accession.to_owned();
        self.ask(|reply| Request::ByAccession { accession, reply })
            .await
    }

    /// [`Ledger::get`].
    pub async fn get(&self, id: &str) -> Result<Option<Appointment>, LedgerError> {
        let id = id.to_owned();
        self.ask(|reply| Request::Get { id, reply }).await
    }

    /// [`Ledger::decided`].
    pub async fn decided(
        &self,
        clinic: &str,
        request_id: &str,
    ) -> Result<Option<Decision>, LedgerError> {
        let (clinic, request_id) = (clinic.to_owned(), request_id.to_owned());
        self.ask(|reply| Request::Decided {
            clinic,
            request_id,
            reply,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::PatientRef;
    use crate::schedule::ScheduleSpec;
    use crate::sealed::SealKey;
    use gateway_keystore::MasterKey;

    fn schedules() -> Arc<Vec<Schedule>> {
        Arc::new(vec![
            Schedule::new(&ScheduleSpec {
                id: "ct-1".into(),
                modality: "CT".into(),
                station_ae: "CT01".into(),
                ..ScheduleSpec::default()
            })
            .unwrap(),
        ])
    }

    fn req(id: &str) -> BookingRequest {
        BookingRequest {
            alerts: Vec::new(),
            request_id: id.into(),
            clinic: "clinic-a".into(),
            slot_id: "ct-1.20270112T1000".into(),
            hold: false,
            patient: PatientRef::default(),
            procedure: "CT".into(),
        }
    }

    #[tokio::test]
    async fn the_handle_decides_through_the_owning_thread_and_answers_after_saving() {
        let dir = tempfile::tempdir().unwrap();
        let key = || SealKey::derive(&MasterKey::from_bytes([9; 32]));
        let ledger = Ledger::open(dir.path(), key()).unwrap();
        let (service, handle) = LedgerService::new(ledger, schedules());
        let thread = service.spawn().unwrap();
        let now: Timestamp = "2027-01-12T00:00:00Z".parse().unwrap();
        let first = handle.decide(req("r1"), now, 600).await.unwrap();
        let Decision::Booked { appointment_id, .. } = &first else {
            panic!("{first:?}")
        };
        assert_eq!(handle.decide(req("r1"), now, 600).await.unwrap(), first);
        assert!(matches!(
            handle.decide(req("r2"), now, 600).await.unwrap(),
            Decision::Refused { .. }
        ));
        let day_end: Timestamp = "2027-01-12T09:00:00Z".parse().unwrap();
        let free = handle.free_slots("ct-1", now, day_end, now).await.unwrap();
        assert!(!free.iter().any(|s| s.id == "ct-1.20270112T1000"));
        assert!(
            handle
                .free_slots("nope", now, day_end, now)
                .await
                .unwrap()
                .is_empty()
        );
        let live = {
            let h = handle.clone();
            tokio::task::spawn_blocking(move || h.live_blocking(now))
                .await
                .unwrap()
                .unwrap()
        };
        assert_eq!(live.len(), 1);
        // Durable when answered: a second reader of the file sees the booking.
        let reread = Ledger::open(dir.path(), key()).unwrap();
        assert!(reread.get(appointment_id).is_some());
        drop(handle);
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn a_handle_without_its_thread_answers_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let ledger =
            Ledger::open(dir.path(), SealKey::derive(&MasterKey::from_bytes([9; 32]))).unwrap();
        let (service, handle) = LedgerService::new(ledger, schedules());
        drop(service);
        assert!(matches!(
            handle.get("apt-1").await,
            Err(LedgerError::Stopped)
        ));
    }
}
