//! Glue: the audit trail's "DICOM instances transferred" records. The DICOM service hands
//! each association's stored studies, and senders their confirmed batches, over one
//! channel ([`gateway_dicom::TransferSink`]); a dedicated thread appends one record per
//! study with the Patient ID, Study UID and SOP classes sealed
//! ([`AuditLog::append_with_participants`]): [`Action::DicomInstancesReceived`] (actor the
//! calling AE title, subject `peer:{address}`) or [`Action::DicomInstancesSent`] (actor
//! `system`, subject `destination:{name}`). The appends fsync, so they never run on an
//! async worker. Failures are logged without patient data.

use std::path::PathBuf;

use gateway_audit::{Action, AuditKey, AuditLog, Event, Outcome, Participants, SopClassCount};
use gateway_dicom::{Direction, Transfer, TransferSink};
use tracing::warn;

/// Transfers waiting for the audit thread (each is one association's studies).
const DEPTH: usize = 64;

/// Starts the audit thread and returns the sink for the DICOM service. The thread ends
/// when every clone of the sink is dropped (the service stopped).
pub(crate) fn start(dir: PathBuf, key: AuditKey) -> Result<TransferSink, String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Transfer>(DEPTH);
    std::thread::Builder::new()
        .name("audit-transfers".into())
        .spawn(move || {
            let mut log: Option<AuditLog> = None;
            while let Some(transfer) = rx.blocking_recv() {
                if log.is_none() {
                    match AuditLog::open(&dir, key.clone()) {
                        Ok(opened) => log = Some(opened),
                        Err(e) => {
                            warn!(error = %e, studies = transfer.studies.len(), "DICOM transfer not audited: the audit trail does not open");
                            continue;
                        }
                    }
                }
                if let Some(log) = &log {
                    record(log, &transfer);
                }
            }
        })
        .map_err(|e| format!("audit thread: {e}"))?;
    Ok(tx)
}

fn record(log: &AuditLog, transfer: &Transfer) {
    let (actor, action, subject) = match &transfer.direction {
        Direction::Received { calling_ae, peer } => (
            calling_ae.clone(),
            Action::DicomInstancesReceived,
            format!("peer:{peer}"),
        ),
        Direction::Sent { destination } => (
            "system".to_string(),
            Action::DicomInstancesSent,
            format!("destination:{destination}"),
        ),
    };
    for study in &transfer.studies {
        let participants = Participants {
            patient_id: study.patient_id.clone(),
            study_uid: study.study_uid.clone(),
            sop_classes: study
                .sop_classes
                .iter()
                .map(|(uid, count)| SopClassCount {
                    uid: uid.clone(),
                    count: *count,
                })
                .collect(),
        };
        let event = Event {
            actor: actor.clone(),
            action,
            outcome: Outcome::Success,
            subject: Some(subject.clone()),
            detail: None,
        };
        if let Err(e) = log.append_with_participants(event, &participants) {
            warn!(error = %e, actor = %actor, "DICOM transfer not audited");
        }
    }
}
