//! The core's side: which confirmed instances and which reports belong to a clinic's
//! booking, and telling that clinic until it acknowledges.
//!
//! One task ([`CoreResults::run`]) owns the state. A pass (on every spool change, every
//! acknowledgement and every few seconds):
//! 1. images: the objects queued for [`IMAGES_ROUTE`](crate::IMAGES_ROUTE) whose cloud
//!    destination (`[results] source`) is `sent` (or `failed`, or absent: nothing to
//!    announce) are read on a blocking thread, their Accession Number and Study Instance UID
//!    matched against the ledger's appointments (accession first, then the study UID the
//!    worklist gave); a booked appointment of a clinic gets them counted (the state is saved
//!    before the spool marks them handled, so a crash repeats a pass and the object set
//!    keeps the count exact). Objects still queued at the cloud wait.
//! 2. reports: each ORU^R01 queued for [`REPORTS_ROUTE`](crate::REPORTS_ROUTE) is decoded
//!    and matched by OBR-18 / OBR-3 (accession) or OBR-2 (the appointment id the OMG^O19
//!    carried as placer order number); a match stays queued until the clinic acknowledges
//!    it; anything else is marked handled. A final report (OBR-25 `F`) completes the study.
//! 3. a study without a new instance for `complete_after` is complete.
//! 4. every notice newer than the clinic acknowledged, and every unacknowledged report, is
//!    handed to the exchange, again every `resend_after` until acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_booking::{Appointment, AppointmentStatus, LedgerHandle, SealKey};
use gateway_regional::results::{CoreLink, Outgoing, WireAck, WireNotice, WireReport};
use gateway_registry::{DataKind, Disclosure, IdentityService, SourceKey};
use gateway_spool::{DeliveryState, ObjectId, Spool};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::state::StateFile;
use crate::{IMAGES_ROUTE, REPORTS_ROUTE, ResultsError, now_unix};

const STATE_FILE: &str = "core.sealed";
const STATE_ROLE: &str = "core results";
/// Objects looked at per pass.
const BATCH: usize = 256;
/// A newer notice of one appointment goes out at most this often.
const NOTICE_GAP: Duration = Duration::from_secs(2);

/// What the core's results service needs from the configuration.
#[derive(Debug, Clone)]
pub struct CoreSettings {
    /// This core's node id (its own kiosk's bookings get no notice).
    pub me: String,
    /// The cloud uplink whose confirmation releases a notice.
    pub source: String,
    /// A study with no new instance for this long is complete.
    pub complete_after: Duration,
    /// Unacknowledged notices and reports are sent again after this long.
    pub resend_after: Duration,
    /// How often a pass runs without a spool change.
    pub tick: Duration,
}

/// One booked appointment with results (sealed on disk: accession and study UIDs).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Tracked {
    clinic: String,
    accession: String,
    study_uids: BTreeSet<String>,
    /// Spool ids (hex) of the instances counted.
    objects: BTreeSet<String>,
    last_new_unix: u64,
    complete: bool,
    seq: u64,
    acked_seq: u64,
    /// Report spool id (hex) -> acknowledged.
    reports: BTreeMap<String, bool>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CoreState {
    appointments: BTreeMap<String, Tracked>,
}

/// What a pass found about one queued object.
enum Seen {
    /// Not for results (not a booked exam, or the cloud never took it): mark handled.
    Done(ObjectId),
    /// An image the cloud confirmed, with its identifiers.
    Image {
        id: ObjectId,
        accession: Option<String>,
        study: Option<String>,
    },
    /// A report with its match keys.
    Report { id: ObjectId, keys: ReportKeys },
}

#[derive(Debug, Default)]
struct ReportKeys {
    accessions: Vec<String>,
    placers: Vec<String>,
    is_final: bool,
}

/// The core's results service.
pub struct CoreResults {
    settings: CoreSettings,
    spool: Spool,
    ledger: LedgerHandle,
    file: StateFile,
    state: CoreState,
    outgoing: mpsc::Sender<Outgoing>,
    acks: mpsc::Receiver<(String, WireAck)>,
    /// When each notice / report was last handed over (appointment or report id), and for
    /// a notice its `seq`.
    sent_at: HashMap<String, (Instant, u64)>,
    metrics: crate::Metrics,
    /// `[identity]`: where each referral disclosure is recorded ([`Self::with_disclosures`]).
    disclosures: Option<Arc<dyn IdentityService>>,
}

impl std::fmt::Debug for CoreResults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreResults")
            .field("settings", &self.settings)
            .field("appointments", &self.state.appointments.len())
            .finish_non_exhaustive()
    }
}

impl CoreResults {
    /// Opens the state in `dir` (blocking: reads and opens the sealed file) and returns the
    /// link the core's exchange carries.
    pub fn open(
        settings: CoreSettings,
        spool: Spool,
        ledger: LedgerHandle,
        seal: Arc<SealKey>,
        dir: &Path,
        metrics: crate::Metrics,
    ) -> Result<(Self, CoreLink), ResultsError> {
        let file = StateFile::new(seal, dir, STATE_FILE, STATE_ROLE)?;
        let state: CoreState = file.load()?;
        let (out_tx, out_rx) = mpsc::channel(256);
        let (ack_tx, ack_rx) = mpsc::channel(256);
        Ok((
            Self {
                settings,
                spool,
                ledger,
                file,
                state,
                outgoing: out_tx,
                acks: ack_rx,
                sent_at: HashMap::new(),
                metrics,
                disclosures: None,
            },
            CoreLink {
                outgoing: out_rx,
                acks: ack_tx,
            },
        ))
    }

    /// Records each referral disclosure in the identity registry (its audit trail): the
    /// first results of an appointment and each of its reports, for the booking clinic's
    /// patient, as `results` by `referral` (a clinic gets the results of the exams it
    /// booked without a consent; the registry records that it did).
    pub fn with_disclosures(mut self, registry: Arc<dyn IdentityService>) -> Self {
        self.disclosures = Some(registry);
        self
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        info!(source = %self.settings.source, "results (core) started");
        let mut wake = self.spool.subscribe();
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ack = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                _ = wake.changed() => None,
                _ = tick.tick() => None,
                Some(ack) = self.acks.recv() => Some(ack),
            };
            if let Some((clinic, ack)) = ack {
                self.on_ack(&clinic, ack).await;
            }
            if let Err(e) = self.pass().await {
                warn!(error = %e, "results (core): pass failed; retried");
            }
        }
        info!("results (core) stopped");
    }

    async fn save(&self) -> Result<(), ResultsError> {
        let bytes = serde_json::to_value(&self.state).map_err(|_| ResultsError::Corrupt {
            path: STATE_FILE.into(),
        })?;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.save(&bytes)).await?
    }

    async fn on_ack(&mut self, clinic: &str, ack: WireAck) {
        let Some(t) = self.state.appointments.get_mut(&ack.appointment_id) else {
            debug!(%clinic, "acknowledgement for no tracked appointment");
            return;
        };
        if t.clinic != clinic {
            warn!(%clinic, "acknowledgement from a clinic that did not book: ignored");
            return;
        }
        let mut report_done = None;
        if let Some(seq) = ack.notice_seq {
            t.acked_seq = t.acked_seq.max(seq.min(t.seq));
            self.metrics.message("notice", "acknowledged");
        }
        if let Some(report) = ack.report_id
            && let Some(acked) = t.reports.get_mut(&report)
            && !*acked
        {
            *acked = true;
            report_done = Some(report);
        }
        if let Err(e) = self.save().await {
            warn!(error = %e, "results (core): acknowledgement not recorded; the clinic gets it again");
            return;
        }
        if let Some(report) = report_done {
            self.metrics.message("report", "acknowledged");
            self.sent_at.remove(&report);
            info!(%clinic, appointment = %ack.appointment_id, "report acknowledged by the booking clinic");
            if let Some(id) = parse_id(&report) {
                let spool = self.spool.clone();
                let done =
                    tokio::task::spawn_blocking(move || spool.mark_sent(&id, REPORTS_ROUTE)).await;
                if !matches!(done, Ok(Ok(()))) {
                    warn!("results (core): acknowledged report not marked in the spool");
                }
            }
        }
    }

    async fn pass(&mut self) -> Result<(), ResultsError> {
        let spool = self.spool.clone();
        let source = self.settings.source.clone();
        let seen = tokio::task::spawn_blocking(move || look(&spool, &source)).await??;
        if !seen.is_empty() {
            let appointments =
                self.ledger
                    .all(jiff::Timestamp::now())
                    .await
                    .map_err(|e| ResultsError::Io {
                        path: "ledger".into(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
            self.apply(seen, &appointments).await?;
        }
        self.complete_quiet().await?;
        self.send_due().await;
        let (notices, reports) = self.state.appointments.values().fold((0, 0), |(n, r), t| {
            (
                n + u64::from(t.seq > t.acked_seq),
                r + t.reports.values().filter(|acked| !**acked).count() as u64,
            )
        });
        self.metrics.set_pending(notices, reports);
        Ok(())
    }

    /// Counts matched images, records matched reports, saves, then marks handled.
    async fn apply(
        &mut self,
        seen: Vec<Seen>,
        appointments: &[Appointment],
    ) -> Result<(), ResultsError> {
        let now = now_unix();
        let mut handled = Vec::new();
        let mut changed = false;
        let mut referrals: Vec<Disclosure> = Vec::new();
        for s in seen {
            match s {
                Seen::Done(id) => handled.push(id),
                Seen::Image {
                    id,
                    accession,
                    study,
                } => {
                    handled.push(id);
                    let Some(a) = appointments.iter().find(|a| {
                        image_matches(a, accession.as_deref(), study.as_deref())
                            && self.for_a_clinic(a)
                    }) else {
                        continue;
                    };
                    let disclosure = referral(a);
                    let t = self.tracked(a);
                    if let Some(study) = study {
                        t.study_uids.insert(study);
                    }
                    if t.objects.is_empty() {
                        referrals.push(disclosure);
                    }
                    if t.objects.insert(hex::encode(id)) {
                        t.last_new_unix = now;
                        t.complete = false;
                        t.seq += 1;
                        changed = true;
                    }
                }
                Seen::Report { id, keys } => {
                    let Some(a) = appointments
                        .iter()
                        .find(|a| report_matches(a, &keys) && self.for_a_clinic(a))
                    else {
                        handled.push(id);
                        continue;
                    };
                    let disclosure = referral(a);
                    let t = self.tracked(a);
                    if let std::collections::btree_map::Entry::Vacant(e) =
                        t.reports.entry(hex::encode(id))
                    {
                        e.insert(false);
                        changed = true;
                        referrals.push(disclosure);
                    }
                    if keys.is_final && !t.complete {
                        t.complete = true;
                        t.seq += 1;
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.save().await?;
        }
        self.record_referrals(referrals).await;
        if !handled.is_empty() {
            let spool = self.spool.clone();
            tokio::task::spawn_blocking(move || {
                spool.mark_sent_all(&handled, IMAGES_ROUTE)?;
                Ok::<_, ResultsError>(())
            })
            .await??;
        }
        Ok(())
    }

    /// Hands each referral to the registry to record (audited there); a registry that cannot
    /// record it is logged and the results still go (the referral is what allows them).
    async fn record_referrals(&self, referrals: Vec<Disclosure>) {
        let Some(registry) = &self.disclosures else {
            return;
        };
        for d in referrals {
            match registry.may_disclose(d, REFERRAL_ACTOR).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => warn!("identity registry refused a referral disclosure"),
                Err(e) => {
                    warn!(error = %e, "referral disclosure not recorded in the identity registry")
                }
            }
        }
    }

    fn for_a_clinic(&self, a: &Appointment) -> bool {
        a.clinic != self.settings.me && a.status != AppointmentStatus::Cancelled
    }

    fn tracked(&mut self, a: &Appointment) -> &mut Tracked {
        self.state
            .appointments
            .entry(a.id.clone())
            .or_insert_with(|| Tracked {
                clinic: a.clinic.clone(),
                accession: a.accession.clone(),
                ..Tracked::default()
            })
    }

    async fn complete_quiet(&mut self) -> Result<(), ResultsError> {
        let now = now_unix();
        let quiet = self.settings.complete_after.as_secs();
        let mut changed = false;
        for t in self.state.appointments.values_mut() {
            if !t.complete && !t.objects.is_empty() && now.saturating_sub(t.last_new_unix) >= quiet
            {
                t.complete = true;
                t.seq += 1;
                changed = true;
            }
        }
        if changed {
            self.save().await?;
        }
        Ok(())
    }

    /// Hands every due notice and report to the exchange.
    async fn send_due(&mut self) {
        let resend = self.settings.resend_after;
        // A newer notice goes out at most every NOTICE_GAP; the same one again after
        // `resend_after`; a report again after `resend_after`.
        let due = |sent_at: &HashMap<String, (Instant, u64)>, key: &str, seq: u64| {
            sent_at.get(key).is_none_or(|(at, sent)| {
                at.elapsed() >= resend || (*sent < seq && at.elapsed() >= NOTICE_GAP)
            })
        };
        let mut out = Vec::new();
        let mut reports = Vec::new();
        for (id, t) in &self.state.appointments {
            if t.seq > t.acked_seq && due(&self.sent_at, id, t.seq) {
                out.push((
                    id.clone(),
                    Outgoing::Notice {
                        clinic: t.clinic.clone(),
                        notice: WireNotice {
                            appointment_id: id.clone(),
                            accession: t.accession.clone(),
                            study_uids: t.study_uids.iter().cloned().collect(),
                            instances: t.objects.len() as u64,
                            complete: t.complete,
                            seq: t.seq,
                        },
                    },
                ));
            }
            for (report, acked) in &t.reports {
                if !acked && due(&self.sent_at, report, 0) {
                    reports.push((
                        id.clone(),
                        t.clinic.clone(),
                        t.accession.clone(),
                        report.clone(),
                    ));
                }
            }
        }
        for (appointment_id, clinic, accession, report) in reports {
            let Some(id) = parse_id(&report) else {
                continue;
            };
            let spool = self.spool.clone();
            let read = tokio::task::spawn_blocking(move || read_report(&spool, &id)).await;
            match read {
                Ok(Some((hl7, charset))) => out.push((
                    report.clone(),
                    Outgoing::Report {
                        clinic,
                        report: WireReport {
                            appointment_id,
                            accession,
                            report_id: report,
                            hl7,
                            charset,
                        },
                    },
                )),
                _ => warn!("results (core): a matched report cannot be read from the spool"),
            }
        }
        for (key, message) in out {
            let (kind, seq) = match &message {
                Outgoing::Notice { notice, .. } => ("notice", notice.seq),
                Outgoing::Report { .. } => ("report", 0),
            };
            match self.outgoing.try_send(message) {
                Ok(()) => {
                    self.metrics.message(kind, "sent");
                    self.sent_at.insert(key, (Instant::now(), seq));
                }
                Err(_) => {
                    debug!("results (core): the exchange is busy; sent at a later pass");
                    break;
                }
            }
        }
    }
}

/// The actor the audit trail names for results returned by referral.
const REFERRAL_ACTOR: &str = "results";

/// The booking clinic's patient's results, to that clinic, by referral.
fn referral(a: &Appointment) -> Disclosure {
    Disclosure {
        owner: SourceKey {
            hospital_id: a.clinic.clone(),
            patient_id: a.patient.id.clone(),
        },
        to_hospital: a.clinic.clone(),
        kind: DataKind::Results,
        referral: true,
    }
}

fn parse_id(hex_id: &str) -> Option<ObjectId> {
    let bytes = hex::decode(hex_id).ok()?;
    ObjectId::try_from(bytes.as_slice()).ok()
}

fn image_matches(a: &Appointment, accession: Option<&str>, study: Option<&str>) -> bool {
    match accession {
        Some(acc) if !acc.is_empty() => acc == a.accession,
        _ => study.is_some_and(|s| s == gateway_booking::order::study_uid(a)),
    }
}

fn report_matches(a: &Appointment, keys: &ReportKeys) -> bool {
    keys.accessions.iter().any(|x| x == &a.accession) || keys.placers.iter().any(|p| p == &a.id)
}

/// Blocking: what the queued objects of both routes are, as far as they are ready.
fn look(spool: &Spool, source: &str) -> Result<Vec<Seen>, ResultsError> {
    let mut seen = Vec::new();
    for id in spool.queued(IMAGES_ROUTE, BATCH)? {
        let Some(record) = spool.record(&id)? else {
            continue;
        };
        match record.destinations.iter().find(|d| d.name == source) {
            Some(d) if d.state == DeliveryState::Queued => continue,
            Some(d) if d.state == DeliveryState::Sent => {}
            // Dead-lettered at the cloud, or never meant for it: nothing to announce.
            _ => {
                seen.push(Seen::Done(id));
                continue;
            }
        }
        match spool.read(&id) {
            Ok((_, bytes)) => match gateway_dicom::reconcile::read_identifiers(&bytes) {
                Ok(ids) => seen.push(Seen::Image {
                    id,
                    accession: ids.accession_number,
                    study: ids.study_instance_uid,
                }),
                Err(_) => seen.push(Seen::Done(id)),
            },
            Err(e) => {
                warn!(object = %hex::encode(id), error = %e, "results (core): object unreadable; not announced");
                seen.push(Seen::Done(id));
            }
        }
    }
    for id in spool.queued(REPORTS_ROUTE, BATCH)? {
        match read_report(spool, &id).and_then(|(text, _)| report_keys(&text)) {
            Some(keys) => seen.push(Seen::Report { id, keys }),
            None => {
                spool.mark_sent(&id, REPORTS_ROUTE)?;
            }
        }
    }
    Ok(seen)
}

/// Blocking: a stored HL7 message decoded with the set it was received in.
fn read_report(spool: &Spool, id: &ObjectId) -> Option<(String, String)> {
    let (record, bytes) = spool.read(id).ok()?;
    // An HL7 record keeps the set the message was decoded with in this field.
    let over: gateway_hl7::charset::CharsetOverride = record.transfer_syntax_uid.parse().ok()?;
    let decoded = gateway_hl7::charset::decode(&bytes, over).ok()?;
    Some((decoded.text, decoded.charset.name().to_owned()))
}

/// The match keys of an ORU^R01 (`None`: not a readable report, or no key to match by).
fn report_keys(text: &str) -> Option<ReportKeys> {
    let message = gateway_hl7::parse::parse(text).ok()?;
    let keys = gateway_hl7::reconcile::result_keys(&message);
    let matchable = !keys.accession_numbers.is_empty() || !keys.placer_order_numbers.is_empty();
    matchable.then_some(ReportKeys {
        accessions: keys.accession_numbers,
        placers: keys.placer_order_numbers,
        is_final: keys.final_result,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_booking::PatientRef;

    fn appointment() -> Appointment {
        Appointment {
            alerts: Vec::new(),
            id: "apt-00000007".into(),
            slot_id: "ct-1.20270112T0930".into(),
            schedule: "ct-1".into(),
            start: "2027-01-12T09:30:00+09:00".into(),
            end: "2027-01-12T10:00:00+09:00".into(),
            clinic: "clinic-a".into(),
            request_id: "r1".into(),
            patient: PatientRef {
                id: "ZZPID1".into(),
                name: "ZZTEST^HANAKO".into(),
                birth_date: "19610402".into(),
                sex: "F".into(),
            },
            procedure: "CT chest".into(),
            accession: "RB20270112000007".into(),
            status: AppointmentStatus::Booked,
            hold_expires_unix: None,
            version: 1,
        }
    }

    #[test]
    fn an_image_matches_by_accession_first_then_by_the_worklist_study_uid() {
        let a = appointment();
        let worklist_study = gateway_booking::order::study_uid(&a);
        assert!(image_matches(&a, Some("RB20270112000007"), Some("1.2.3")));
        assert!(
            !image_matches(&a, Some("RB20270112000008"), Some(&worklist_study)),
            "another accession wins over a matching study UID"
        );
        assert!(image_matches(&a, None, Some(&worklist_study)));
        assert!(image_matches(&a, Some(""), Some(&worklist_study)));
        assert!(!image_matches(&a, None, Some("1.2.3")));
        assert!(!image_matches(&a, None, None));
    }

    #[test]
    fn a_report_matches_by_accession_or_by_the_orders_placer_number() {
        let a = appointment();
        let oru = |obr2: &str, obr3: &str, obr18: &str, status: &str| {
            format!(
                "MSH|^~\\&|RIS|CORE|GW|CORE|20270112103000||ORU^R01|M1|P|2.5.1\r\
                 PID|1||ZZPID1^^^CORE||ZZTEST^HANAKO\r\
                 OBR|1|{obr2}|{obr3}|CT^CT chest||||||||||||||{obr18}|||||||{status}\r\
                 OBX|1|TX|IMP^Impression||No finding||||||F\r"
            )
        };
        let keys = report_keys(&oru("", "", "RB20270112000007", "F")).unwrap();
        assert!(report_matches(&a, &keys) && keys.is_final);
        let keys = report_keys(&oru("", "RB20270112000007", "", "P")).unwrap();
        assert!(
            report_matches(&a, &keys) && !keys.is_final,
            "OBR-3 as accession"
        );
        let keys = report_keys(&oru("apt-00000007^GATEWAYD", "", "", "F")).unwrap();
        assert!(report_matches(&a, &keys), "OBR-2 placer = appointment id");
        let keys = report_keys(&oru("apt-00000008", "X", "RB20270112000008", "F")).unwrap();
        assert!(!report_matches(&a, &keys));
        assert!(
            report_keys(&oru("", "", "", "F")).is_none(),
            "nothing to match by"
        );
        assert!(report_keys("not hl7").is_none());
    }

    #[test]
    fn a_hex_spool_id_round_trips_and_garbage_is_none() {
        let id = ObjectId::from_bytes([7; 16]);
        assert_eq!(parse_id(&hex::encode(id)), Some(id));
        assert_eq!(parse_id("zz"), None);
        assert_eq!(parse_id("0102"), None);
    }
}
