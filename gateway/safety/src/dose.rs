//! The dose reports' path into the store: [`run`] drains the spool's virtual destination
//! [`crate::DOSE_ROUTE`].
//!
//! Each queued object is read from the spool and given to
//! [`gateway_dicom::rdsr::read`] (on a blocking thread: the spool's reads and the parse):
//! - not a CT dose report (`Ok(None)`): passed (`mark_sent`), counted `not_dose`;
//! - unreadable (`Err`): dead-lettered on this route with the reader's reason (DICOM terms,
//!   never content); the object stays stored; counted `malformed`;
//! - a dose report: filed under a source record: the booked exam's (clinic, clinic patient
//!   id) when its Accession Number (0008,0050) is an appointment's in the ledger, else (the
//!   core's hospital id, its Patient ID (0010,0020)); neither: dead-lettered, `malformed`.
//!   Its events are recorded ([`crate::SafetyHandle::record_dose`], durable before it
//!   answers), and only then is the object marked sent: `recorded` when an event was new,
//!   else `duplicate`.
//!
//! A store or ledger that cannot answer leaves the object queued for the next pass. Wakes
//! on the spool's notifications and every [`TICK`].
//!
//! On a clinic ([`forward`]) the same reading files each dose report under the clinic's own
//! Patient ID and carries its events to the core over the regional exchange
//! (`gateway_regional::dose`): the object is marked sent only once the core has acknowledged
//! that the events are durable there, so a report is retried until it arrives and counted
//! once (the core de-duplicates by Irradiation Event UID). On the core, [`from_clinics`]
//! takes those reports: the patient goes into the identity registry as the clinic knows them
//! (as a booking does), the events into the store, and only then is the acknowledgement sent.

use std::time::Duration;

use gateway_booking::service::LedgerHandle;
use gateway_booking::{DoseEventView, PatientRef};
use gateway_dicom::rdsr::{DoseReport, RdsrError};
use gateway_regional::clinic::ClinicExchange;
use gateway_regional::dose::{DoseIn, WireDose};
use gateway_registry::{RegistryHandle, SourceKey};
use gateway_spool::{ObjectId, Spool};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{DOSE_ROUTE, DoseEvent, SafetyHandle};

/// Objects per pass.
const BATCH: usize = 64;
/// The pass interval when no notification comes.
pub const TICK: Duration = Duration::from_secs(30);

/// What one object turned out to be.
enum Read {
    NotDose,
    Malformed(String),
    Report(Box<DoseReport>),
    /// The spool could not read it (retried).
    Unreadable,
}

/// Where the reports read here go.
enum Filing {
    /// The core: its own store, booked exams found in its ledger.
    Core {
        store: SafetyHandle,
        ledger: LedgerHandle,
        hospital_id: String,
    },
    /// A clinic: to the core over the exchange.
    Clinic {
        exchange: ClinicExchange,
        clinic_id: String,
        metrics: crate::Metrics,
    },
}

impl Filing {
    fn metrics(&self) -> &crate::Metrics {
        match self {
            Filing::Core { store, .. } => &store.metrics,
            Filing::Clinic { metrics, .. } => metrics,
        }
    }
}

/// Drains [`crate::DOSE_ROUTE`] on the core until `shutdown` (see the module docs).
pub async fn run(
    spool: Spool,
    store: SafetyHandle,
    ledger: LedgerHandle,
    hospital_id: String,
    shutdown: watch::Receiver<bool>,
) {
    let filing = Filing::Core {
        store,
        ledger,
        hospital_id,
    };
    drain(spool, filing, shutdown).await;
}

/// Drains [`crate::DOSE_ROUTE`] on a clinic until `shutdown`: each CT dose report's events
/// go to the core (see the module docs).
pub async fn forward(
    spool: Spool,
    exchange: ClinicExchange,
    clinic_id: String,
    metrics: crate::Metrics,
    shutdown: watch::Receiver<bool>,
) {
    let filing = Filing::Clinic {
        exchange,
        clinic_id,
        metrics,
    };
    drain(spool, filing, shutdown).await;
}

async fn drain(spool: Spool, filing: Filing, mut shutdown: watch::Receiver<bool>) {
    info!("safety dose reader started");
    let mut wake = spool.subscribe();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = wake.changed() => {}
            _ = tick.tick() => {}
        }
        // Drain: a full batch means more may wait.
        loop {
            match pass(&spool, &filing).await {
                Some(n) if n >= BATCH => continue,
                _ => break,
            }
        }
    }
    info!("safety dose reader stopped");
}

/// One pass over up to [`BATCH`] queued objects; answers how many were queued, `None` when
/// the queue could not be read or nothing could be settled (the next wake-up retries).
async fn pass(spool: &Spool, filing: &Filing) -> Option<usize> {
    let s = spool.clone();
    let ids = match tokio::task::spawn_blocking(move || s.queued(DOSE_ROUTE, BATCH)).await {
        Ok(Ok(ids)) => ids,
        Ok(Err(e)) => {
            warn!(error = %e, "safety dose reader: spool queue unreadable; retried");
            return None;
        }
        Err(_) => return None,
    };
    let queued = ids.len();
    let mut progressed = 0;
    for id in ids {
        if one(spool, filing, id).await {
            progressed += 1;
        }
    }
    // Nothing could be settled: do not spin on the same batch.
    if progressed == 0 && queued > 0 {
        return None;
    }
    Some(queued)
}

/// Settles one object; `false` when it stays queued (retried later).
async fn one(spool: &Spool, filing: &Filing, id: ObjectId) -> bool {
    let s = spool.clone();
    let read = tokio::task::spawn_blocking(move || match s.read(&id) {
        Ok((_, bytes)) => match gateway_dicom::rdsr::read(&bytes) {
            Ok(None) => Read::NotDose,
            Ok(Some(report)) => Read::Report(Box::new(report)),
            Err(e) => Read::Malformed(reason(&e)),
        },
        Err(e) => {
            warn!(error = %e, "safety dose reader: object unreadable in the spool; retried");
            Read::Unreadable
        }
    })
    .await
    .unwrap_or(Read::Unreadable);
    let report = match read {
        Read::Unreadable => return false,
        Read::NotDose => {
            filing.metrics().dose_report("not_dose");
            return settle(spool, id, None).await;
        }
        Read::Malformed(why) => {
            warn!(reason = %why, "safety dose reader: malformed dose report; dead-lettered");
            filing.metrics().dose_report("malformed");
            return settle(spool, id, Some(why)).await;
        }
        Read::Report(report) => report,
    };
    let (store, ledger, hospital_id) = match filing {
        Filing::Core {
            store,
            ledger,
            hospital_id,
        } => (store, ledger, hospital_id.as_str()),
        Filing::Clinic {
            exchange,
            clinic_id,
            metrics,
        } => return to_core(spool, exchange, clinic_id, metrics, id, &report).await,
    };
    let source = match source_of(&report, ledger, hospital_id).await {
        Ok(Some(source)) => source,
        Ok(None) => {
            let why = "dose report without Patient ID (0010,0020) or a booked Accession Number (0008,0050)";
            warn!(
                reason = why,
                "safety dose reader: dose report not filed; dead-lettered"
            );
            store.metrics.dose_report("malformed");
            return settle(spool, id, Some(why.to_owned())).await;
        }
        Err(LedgerDown) => return false,
    };
    match store.record_dose(source, events_of(&report)).await {
        Ok(recorded) => {
            store.metrics.dose_report(if recorded.new > 0 {
                "recorded"
            } else {
                "duplicate"
            });
            info!(
                new = recorded.new,
                duplicate = recorded.duplicate,
                refused = recorded.refused,
                "safety dose reader: dose report recorded"
            );
            settle(spool, id, None).await
        }
        Err(e) => {
            warn!(error = %e, "safety dose reader: events not recorded; retried");
            false
        }
    }
}

/// The events of a report as the store keeps them.
fn events_of(report: &DoseReport) -> Vec<DoseEvent> {
    report
        .events
        .iter()
        .map(|e| DoseEvent {
            event_uid: e.event_uid.clone(),
            datetime: e.datetime.clone().or_else(|| report.datetime.clone()),
            ctdivol_mgy: e.ctdivol_mgy,
            dlp_mgy_cm: e.dlp_mgy_cm,
            target_region: e
                .target_region
                .as_ref()
                .map(|c| {
                    if c.meaning.is_empty() {
                        c.value.clone()
                    } else {
                        c.meaning.clone()
                    }
                })
                .filter(|s| !s.is_empty()),
            protocol: e.protocol.clone(),
        })
        .collect()
}

/// A clinic's report to the core; `true` once the core acknowledged it (or it was
/// dead-lettered here for want of a Patient ID).
async fn to_core(
    spool: &Spool,
    exchange: &ClinicExchange,
    clinic_id: &str,
    metrics: &crate::Metrics,
    id: ObjectId,
    report: &DoseReport,
) -> bool {
    let Some(patient_id) = report
        .patient_id
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    else {
        let why = "dose report without Patient ID (0010,0020)";
        warn!(
            reason = why,
            "safety dose reader: dose report not sent; dead-lettered"
        );
        metrics.dose_report("malformed");
        return settle(spool, id, Some(why.to_owned())).await;
    };
    let dose = WireDose {
        report_id: report.sop_instance_uid.clone(),
        patient: PatientRef {
            id: patient_id.to_owned(),
            name: report.patient_name.clone().unwrap_or_default(),
            birth_date: report.birth_date.clone().unwrap_or_default(),
            sex: report.sex.clone().unwrap_or_default(),
        },
        accession: report.accession_number.clone(),
        events: events_of(report)
            .into_iter()
            .map(|e| DoseEventView {
                event_uid: e.event_uid,
                when: e.datetime,
                hospital: clinic_id.to_owned(),
                ctdivol_mgy: e.ctdivol_mgy,
                dlp_mgy_cm: e.dlp_mgy_cm,
                target_region: e.target_region,
                protocol: e.protocol,
            })
            .collect(),
    };
    match exchange.send_dose(dose).await {
        Ok(()) => {
            metrics.dose_report("forwarded");
            info!(
                events = report.events.len(),
                "safety dose reader: dose report acknowledged by the core"
            );
            settle(spool, id, None).await
        }
        Err(e) => {
            warn!(error = %e, "safety dose reader: dose report not acknowledged; retried");
            false
        }
    }
}

/// Takes the dose reports clinics send the core (`gateway_regional::dose`) until the
/// exchange stops: the patient into the registry as the clinic knows them, the events into
/// the store, then `done` (the acknowledgement goes back only when both are durable).
pub async fn from_clinics(
    mut reports: mpsc::Receiver<DoseIn>,
    store: SafetyHandle,
    registry: RegistryHandle,
) {
    while let Some(DoseIn { clinic, dose, done }) = reports.recv().await {
        let p = &dose.patient;
        let record =
            gateway_registry::booked_patient(&clinic, &p.id, &p.name, &p.birth_date, &p.sex);
        if let Err(e) = registry.record_booking(clinic.clone(), record).await {
            warn!(%clinic, error = %e, "clinic's dose report: patient not recorded in the identity registry; not acknowledged");
            let _ = done.send(false);
            continue;
        }
        let source = SourceKey {
            hospital_id: clinic.clone(),
            patient_id: p.id.clone(),
        };
        let events = dose
            .events
            .into_iter()
            .map(|e| DoseEvent {
                event_uid: e.event_uid,
                datetime: e.when,
                ctdivol_mgy: e.ctdivol_mgy,
                dlp_mgy_cm: e.dlp_mgy_cm,
                target_region: e.target_region,
                protocol: e.protocol,
            })
            .collect();
        match store.record_dose(source, events).await {
            Ok(recorded) => {
                store.metrics.dose_report(if recorded.new > 0 {
                    "recorded"
                } else {
                    "duplicate"
                });
                info!(%clinic, new = recorded.new, duplicate = recorded.duplicate, "clinic's dose report recorded");
                let _ = done.send(true);
            }
            Err(e) => {
                warn!(%clinic, error = %e, "clinic's dose report not recorded; not acknowledged");
                let _ = done.send(false);
            }
        }
    }
}

/// The reader's reason, cut to the spool's length (DICOM terms only).
fn reason(e: &RdsrError) -> String {
    format!("dose report unreadable: {e}")
}

/// The ledger did not answer (the object is retried).
struct LedgerDown;

/// The source record a report is filed under (see the module docs).
async fn source_of(
    report: &DoseReport,
    ledger: &LedgerHandle,
    hospital_id: &str,
) -> Result<Option<SourceKey>, LedgerDown> {
    if let Some(accession) = report
        .accession_number
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let found = ledger.by_accession(accession).await.map_err(|e| {
            warn!(error = %e, "safety dose reader: ledger unavailable; retried");
            LedgerDown
        })?;
        if let Some(a) = found {
            return Ok(Some(SourceKey {
                hospital_id: a.clinic,
                patient_id: a.patient.id,
            }));
        }
    }
    Ok(report
        .patient_id
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| SourceKey {
            hospital_id: hospital_id.to_owned(),
            patient_id: p.to_owned(),
        }))
}

/// Marks the object sent (`None`) or dead-lettered with `reason` on this route.
async fn settle(spool: &Spool, id: ObjectId, failed: Option<String>) -> bool {
    let s = spool.clone();
    let done = tokio::task::spawn_blocking(move || match failed {
        None => s.mark_sent(&id, DOSE_ROUTE),
        Some(why) => s.mark_failed(&id, DOSE_ROUTE, &why),
    })
    .await;
    match done {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            warn!(error = %e, "safety dose reader: spool state not saved; retried");
            false
        }
        Err(_) => false,
    }
}
