//! The core asks its safety check before the ledger decides a new booking: warnings a
//! physician has not acknowledged refuse the request with the report and record nothing; a
//! check that fails refuses it as unavailable (never booked unchecked); with every warning
//! acknowledged the appointment keeps the contrast reactions as alerts and the answer
//! carries the report (the CT dose summary too). A request the ledger decided before is not
//! checked again.
//!
//! Real pieces: the ledger service on a temporary folder and the `LocalCore` the core's
//! kiosk uses (the exchange's `CoreExchange` goes through the same gate); the safety check
//! is a fake that counts its calls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use gateway_booking::safety::DOSE_LABEL;
use gateway_booking::{
    AppointmentRequest, AppointmentStatus, BookingBackend, BookingRefused, BoxFuture,
    ContrastClass, DoseSummary, Ledger, LedgerHandle, LedgerService, PatientRef, SafetyCheck,
    SafetyReport, SafetyUnavailable, SafetyWarning, SealKey, WarningKind,
};
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_regional::local::LocalCore;
use jiff::{SignedDuration, Timestamp};
use tokio::sync::{Notify, mpsc};

mod common;
use common::ct;

fn request(request_id: &str, slot_id: &str, hold: bool, ack: &[&str]) -> AppointmentRequest {
    AppointmentRequest {
        acknowledged: ack.iter().map(|s| (*s).to_string()).collect(),
        request_id: request_id.into(),
        slot_id: slot_id.into(),
        hold,
        patient_id: "ZZPID1".into(),
        patient_name: "ZZTEST^HANAKO".into(),
        birth_date: "19610402".into(),
        sex: "F".into(),
        procedure: "CT chest".into(),
        staff: "dr.tanaka".into(),
    }
}

fn reaction() -> SafetyWarning {
    SafetyWarning {
        id: "w-react-1".into(),
        kind: WarningKind::ContrastReaction,
        contrast: Some(ContrastClass::Iodinated),
        agent: Some("C0000001^Iopamidol".into()),
        severity: Some("SV".into()),
        reactions: vec!["蕁麻疹".into()],
        when: Some("20240105".into()),
        hospital: "hosp-a".into(),
        text_en: "Severe reaction to iodinated contrast (hosp-a, 2024-01-05)".into(),
        text_ja: "ヨード造影剤に重度の反応 (hosp-a, 2024-01-05)".into(),
    }
}

fn dose_warning() -> SafetyWarning {
    SafetyWarning {
        id: "w-dose-365".into(),
        kind: WarningKind::CumulativeDose,
        contrast: None,
        agent: None,
        severity: None,
        reactions: Vec::new(),
        when: None,
        hospital: "core-1".into(),
        text_en: "Cumulative DLP 2400 mGy·cm in 365 days passes 2000".into(),
        text_ja: "365日間の累積DLP 2400 mGy·cm が閾値 2000 を超えています".into(),
    }
}

fn report() -> SafetyReport {
    SafetyReport {
        warnings: vec![reaction(), dose_warning()],
        dose: Some(DoseSummary {
            window_days: 365,
            total_dlp_mgy_cm: 2400.0,
            threshold_dlp_mgy_cm: Some(2000.0),
            events: Vec::new(),
            label: DOSE_LABEL.into(),
        }),
    }
}

/// Answers `answer` (never, when `hang`) and records what it was asked.
#[derive(Debug)]
struct FakeSafety {
    answer: Mutex<Result<SafetyReport, SafetyUnavailable>>,
    hang: bool,
    calls: AtomicUsize,
    asked: Mutex<Vec<(String, String, String, String)>>,
}

impl FakeSafety {
    fn new(answer: Result<SafetyReport, SafetyUnavailable>) -> Arc<Self> {
        Arc::new(Self {
            answer: Mutex::new(answer),
            hang: false,
            calls: AtomicUsize::new(0),
            asked: Mutex::new(Vec::new()),
        })
    }
}

impl SafetyCheck for FakeSafety {
    fn check(
        &self,
        clinic: &str,
        patient: &PatientRef,
        modality: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<SafetyReport, SafetyUnavailable>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.asked.lock().unwrap().push((
            clinic.into(),
            patient.id.clone(),
            modality.into(),
            actor.into(),
        ));
        let answer = self.answer.lock().unwrap().clone();
        if self.hang {
            return Box::pin(std::future::pending());
        }
        Box::pin(async move { answer })
    }
}

async fn ledger(dir: &std::path::Path) -> (LedgerHandle, Vec<String>, SealKey) {
    let seal = || SealKey::derive(&MasterKey::from_bytes([9; KEY_LEN]));
    let ledger = Ledger::open(dir, seal()).unwrap();
    let (service, ledger) = LedgerService::new(ledger, Arc::new(vec![ct()]));
    service.spawn().unwrap();
    let now = Timestamp::now();
    let free = ledger
        .free_slots(
            "ct-1",
            now,
            now.checked_add(SignedDuration::from_hours(24 * 14))
                .unwrap(),
            now,
        )
        .await
        .unwrap();
    assert!(
        free.len() >= 3,
        "two weeks of a weekday schedule have slots"
    );
    (ledger, free.into_iter().map(|s| s.id).collect(), seal())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_warnings_refuse_and_record_nothing_then_acknowledged_books_with_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, free, seal) = ledger(dir.path()).await;
    let safety = FakeSafety::new(Ok(report()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let local = LocalCore::new(
        "core-1".into(),
        ledger.clone(),
        seal,
        Arc::new(Notify::new()),
    )
    .with_on_booked(tx)
    .with_safety(Some(safety.clone() as Arc<dyn SafetyCheck>));
    let slot = &free[0];

    // Nothing acknowledged: refused with the whole report; nothing on the ledger.
    let refused = local
        .request(request("r1", slot, false, &[]))
        .await
        .unwrap_err();
    let BookingRefused::NeedsAcknowledgement(got) = refused else {
        panic!("expected NeedsAcknowledgement, got {refused:?}");
    };
    assert_eq!(*got, report());
    assert_eq!(
        safety.asked.lock().unwrap().first().cloned(),
        Some((
            "core-1".to_string(),
            "ZZPID1".to_string(),
            "CT".to_string(),
            "dr.tanaka".to_string()
        )),
        "the check is asked with the booking clinic, the patient, the schedule's modality and the staff"
    );
    assert_eq!(ledger.decided("core-1", "r1").await.unwrap(), None);
    assert!(ledger.all(Timestamp::now()).await.unwrap().is_empty());
    assert!(rx.try_recv().is_err(), "nothing handed to the order path");

    // One of two acknowledged: still refused, still nothing recorded.
    let refused = local
        .request(request("r1", slot, false, &["w-react-1"]))
        .await
        .unwrap_err();
    assert!(matches!(refused, BookingRefused::NeedsAcknowledgement(_)));
    assert_eq!(ledger.decided("core-1", "r1").await.unwrap(), None);

    // Both acknowledged, same request id: decided anew and booked; the appointment keeps the
    // contrast reaction (not the dose warning) and the answer carries the report.
    let booked = local
        .request(request("r1", slot, false, &["w-react-1", "w-dose-365"]))
        .await
        .unwrap();
    assert_eq!(booked.status, "booked");
    assert_eq!(booked.safety, Some(report()));
    let stored = ledger.get(&booked.id).await.unwrap().unwrap();
    assert_eq!(stored.alerts, vec![reaction()]);
    assert_eq!(rx.try_recv().unwrap().alerts, vec![reaction()]);
    assert_eq!(safety.calls.load(Ordering::SeqCst), 3);

    // A repeat of the decided request is answered by the ledger, not checked again (even
    // with nothing acknowledged).
    let again = local
        .request(request("r1", slot, false, &[]))
        .await
        .unwrap();
    assert_eq!(again.id, booked.id);
    assert_eq!(safety.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_acknowledged_keeps_its_alerts_when_the_book_confirms_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, free, seal) = ledger(dir.path()).await;
    let safety = FakeSafety::new(Ok(report()));
    let local = LocalCore::new(
        "core-1".into(),
        ledger.clone(),
        seal,
        Arc::new(Notify::new()),
    )
    .with_safety(Some(safety.clone() as Arc<dyn SafetyCheck>));
    let slot = &free[1];
    let held = local
        .request(request("h1", slot, true, &["w-react-1", "w-dose-365"]))
        .await
        .unwrap();
    assert_eq!(held.status, "pending");
    // The confirmation (same id, book) is the ledger's repeat: not checked, alerts kept.
    let confirmed = local
        .request(request("h1", slot, false, &[]))
        .await
        .unwrap();
    assert_eq!(confirmed.id, held.id);
    assert_eq!(confirmed.status, "booked");
    let stored = ledger.get(&held.id).await.unwrap().unwrap();
    assert_eq!(stored.status, AppointmentStatus::Booked);
    assert_eq!(stored.alerts, vec![reaction()]);
    assert_eq!(safety.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_check_refuses_as_unavailable_and_books_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, free, seal) = ledger(dir.path()).await;
    let safety = FakeSafety::new(Err(SafetyUnavailable));
    let local = LocalCore::new(
        "core-1".into(),
        ledger.clone(),
        seal,
        Arc::new(Notify::new()),
    )
    .with_safety(Some(safety.clone() as Arc<dyn SafetyCheck>));
    let refused = local
        .request(request("u1", &free[2], false, &["anything"]))
        .await
        .unwrap_err();
    assert_eq!(refused, BookingRefused::Unavailable);
    assert_eq!(ledger.decided("core-1", "u1").await.unwrap(), None);
    assert!(ledger.all(Timestamp::now()).await.unwrap().is_empty());

    // Once the check answers (nothing to warn about) the same request is booked, with the
    // empty report and no alerts.
    *safety.answer.lock().unwrap() = Ok(SafetyReport::default());
    let booked = local
        .request(request("u1", &free[2], false, &[]))
        .await
        .unwrap();
    assert_eq!(booked.safety, Some(SafetyReport::default()));
    assert!(
        ledger
            .get(&booked.id)
            .await
            .unwrap()
            .unwrap()
            .alerts
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_safety_check_bookings_are_decided_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, free, seal) = ledger(dir.path()).await;
    let local =
        LocalCore::new("core-1".into(), ledger, seal, Arc::new(Notify::new())).with_safety(None);
    let booked = local
        .request(request("n1", &free[0], false, &[]))
        .await
        .unwrap();
    assert_eq!(booked.status, "booked");
    assert_eq!(booked.safety, None);
}

#[tokio::test(start_paused = true)]
async fn a_check_that_does_not_answer_refuses_as_unavailable_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, free, seal) = ledger(dir.path()).await;
    let safety = Arc::new(FakeSafety {
        answer: Mutex::new(Ok(SafetyReport::default())),
        hang: true,
        calls: AtomicUsize::new(0),
        asked: Mutex::new(Vec::new()),
    });
    let local = LocalCore::new(
        "core-1".into(),
        ledger.clone(),
        seal,
        Arc::new(Notify::new()),
    )
    .with_safety(Some(safety as Arc<dyn SafetyCheck>));
    let started = tokio::time::Instant::now();
    let refused = local
        .request(request("t1", &free[0], false, &[]))
        .await
        .unwrap_err();
    assert_eq!(refused, BookingRefused::Unavailable);
    assert!(started.elapsed() >= gateway_regional::SAFETY_CHECK_TIMEOUT);
    assert_eq!(ledger.decided("core-1", "t1").await.unwrap(), None);
}
