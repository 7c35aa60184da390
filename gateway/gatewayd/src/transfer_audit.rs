//! Glue: the audit trail's "DICOM instances transferred" records. The DICOM service hands
//! each association's stored studies, and senders their confirmed batches, over one
//! channel ([`gateway_dicom::TransferSink`]); a dedicated thread appends one record per
//! study with the Patient ID, Study UID and SOP classes sealed
//! ([`AuditLog::append_with_participants`]): [`Action::DicomInstancesReceived`] (actor the
//! calling AE title, subject `peer:{address}`) or [`Action::DicomInstancesSent`] (actor
//! `system`, subject `destination:{name}`). Transfers arriving within [`GATHER`] of each
//! other are merged per direction, peer or destination, and study first, so a study that
//! leaves in many small batches is one record per second, not one per instance. The
//! appends fsync, so they never run on an async worker; at shutdown `serve` waits for
//! the thread to write what it holds. Failures are logged without patient data. Not
//! durable before the DICOM status: a crash in the gathering window (or before the
//! association's end) loses those records.

use std::path::PathBuf;
use std::time::Duration;

use gateway_audit::{Action, AuditKey, AuditLog, Event, Outcome, Participants, SopClassCount};
use gateway_dicom::{Direction, StudyTransfer, Transfer, TransferSink};
use tracing::warn;

/// Transfers waiting for the audit thread (each is one association's studies, or one
/// confirmed batch).
const DEPTH: usize = 64;
/// After a transfer arrives, how long the thread lets more gather before it writes: a
/// study sent in many small batches (an uplink draining instance by instance) becomes one
/// record per window, not one record (and one fsync) per instance.
const GATHER: Duration = Duration::from_secs(1);

/// The audit thread and the sink that feeds it.
#[derive(Debug)]
pub(crate) struct TransferAudit {
    sink: TransferSink,
    thread: std::thread::JoinHandle<()>,
}

impl TransferAudit {
    /// Starts the audit thread. It ends when every clone of the sink is dropped (the
    /// services stopped), after writing what it still holds.
    pub(crate) fn start(dir: PathBuf, key: AuditKey) -> Result<Self, String> {
        let (sink, mut rx) = tokio::sync::mpsc::channel::<Transfer>(DEPTH);
        let thread = std::thread::Builder::new()
            .name("audit-transfers".into())
            .spawn(move || {
                let mut log: Option<AuditLog> = None;
                while let Some(first) = rx.blocking_recv() {
                    std::thread::sleep(GATHER);
                    let mut gathered = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        gathered.push(more);
                    }
                    let transfers = merge(gathered);
                    if log.is_none() {
                        match AuditLog::open(&dir, key.clone()) {
                            Ok(opened) => log = Some(opened),
                            Err(e) => {
                                warn!(error = %e, transfers = transfers.len(), "DICOM transfers not audited: the audit trail does not open");
                                continue;
                            }
                        }
                    }
                    if let Some(log) = &log {
                        for transfer in &transfers {
                            record(log, transfer);
                        }
                    }
                }
            })
            .map_err(|e| format!("audit thread: {e}"))?;
        Ok(Self { sink, thread })
    }

    /// The sink for the DICOM service and the senders.
    pub(crate) fn sink(&self) -> &TransferSink {
        &self.sink
    }

    /// Once the services have stopped (their clones of the sink dropped): lets the thread
    /// write what it holds and waits for it, on a blocking thread.
    pub(crate) async fn finish(self) {
        let Self { sink, thread } = self;
        drop(sink);
        if tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_or(true, |joined| joined.is_err())
        {
            warn!("the transfer audit thread ended abnormally");
        }
    }
}

/// One transfer per direction (and peer or destination), with the studies of all that
/// were gathered summed per study and SOP class.
fn merge(transfers: Vec<Transfer>) -> Vec<Transfer> {
    let mut out: Vec<Transfer> = Vec::new();
    for t in transfers {
        match out.iter_mut().find(|o| o.direction == t.direction) {
            Some(o) => merge_studies(&mut o.studies, t.studies),
            None => out.push(t),
        }
    }
    out
}

fn merge_studies(into: &mut Vec<StudyTransfer>, more: Vec<StudyTransfer>) {
    for study in more {
        match into.iter_mut().find(|s| s.study_uid == study.study_uid) {
            Some(s) => {
                for (class, n) in study.sop_classes {
                    match s.sop_classes.iter_mut().find(|(c, _)| *c == class) {
                        Some((_, m)) => *m += n,
                        None => s.sop_classes.push((class, n)),
                    }
                }
            }
            None => into.push(study),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn study(uid: &str, classes: &[(&str, u64)]) -> StudyTransfer {
        StudyTransfer {
            patient_id: format!("P-{uid}"),
            study_uid: uid.into(),
            sop_classes: classes
                .iter()
                .map(|(c, n)| ((*c).to_string(), *n))
                .collect(),
        }
    }

    fn sent(to: &str, studies: Vec<StudyTransfer>) -> Transfer {
        Transfer {
            direction: Direction::Sent {
                destination: to.into(),
            },
            studies,
        }
    }

    #[test]
    fn gathered_batches_merge_per_destination_and_study() {
        let merged = merge(vec![
            sent("cloud", vec![study("1.1", &[("CT", 1)])]),
            sent("pacs", vec![study("1.1", &[("CT", 2)])]),
            sent(
                "cloud",
                vec![
                    study("1.1", &[("CT", 3), ("MR", 1)]),
                    study("1.2", &[("CT", 1)]),
                ],
            ),
        ]);
        assert_eq!(
            merged,
            vec![
                sent(
                    "cloud",
                    vec![
                        study("1.1", &[("CT", 4), ("MR", 1)]),
                        study("1.2", &[("CT", 1)])
                    ]
                ),
                sent("pacs", vec![study("1.1", &[("CT", 2)])]),
            ]
        );
    }
}
