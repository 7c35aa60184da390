//! Safety warnings across the exchange: a clinic's booking reaches the core through a real
//! mosquitto (plaintext on 127.0.0.1, a port the test picks; the TLS and ACL setup is
//! `hw-tests/test_booking.py`'s), the core asks its safety check, the clinic gets
//! `NeedsAcknowledgement` with the whole report through the sealed decision, re-sends the
//! same request id with the ids acknowledged and gets the booking with the report; the
//! core's appointment keeps the contrast reaction as an alert. The check sees the booking
//! clinic and the actor `clinic:{id}`.
//!
//! A missing `mosquitto` binary is a failure that says what to install, never a skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_booking::{
    AppointmentRequest, BookingBackend, BookingRefused, BoxFuture, ContrastClass, Ledger,
    LedgerService, PatientRef, SafetyCheck, SafetyReport, SafetyUnavailable, SafetyWarning,
    SealKey, SlotQuery, SlotSource, WarningKind,
};
use gateway_exchange::ExchangeKey;
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_regional::clinic::{ClinicExchange, ClinicSettings};
use gateway_regional::core::CoreExchange;
use gateway_regional::wire::Keys;
use tokio::sync::{Notify, watch};

mod common;
use common::{Mosquitto, ct};

fn reaction() -> SafetyWarning {
    SafetyWarning {
        id: "w-react-1".into(),
        kind: WarningKind::ContrastReaction,
        contrast: Some(ContrastClass::Iodinated),
        agent: Some("Iopamidol".into()),
        severity: Some("SV".into()),
        reactions: vec!["蕁麻疹".into()],
        when: Some("20240105".into()),
        hospital: "hosp-a".into(),
        text_en: "Severe reaction to iodinated contrast".into(),
        text_ja: "ヨード造影剤に重度の反応".into(),
    }
}

#[derive(Debug)]
struct FakeSafety {
    calls: AtomicUsize,
    asked: Mutex<Vec<(String, String, String)>>,
}

impl SafetyCheck for FakeSafety {
    fn check(
        &self,
        clinic: &str,
        _patient: &PatientRef,
        modality: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<SafetyReport, SafetyUnavailable>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.asked
            .lock()
            .unwrap()
            .push((clinic.into(), modality.into(), actor.into()));
        Box::pin(async {
            Ok(SafetyReport {
                warnings: vec![reaction()],
                dose: None,
            })
        })
    }
}

fn request(slot: &str, ack: &[&str]) -> AppointmentRequest {
    AppointmentRequest {
        acknowledged: ack.iter().map(|s| (*s).to_string()).collect(),
        request_id: "req-x1".into(),
        slot_id: slot.into(),
        hold: false,
        patient_id: "ZZPID1".into(),
        patient_name: "ZZTEST^HANAKO".into(),
        birth_date: "19610402".into(),
        sex: "F".into(),
        procedure: "CT chest".into(),
        staff: "dr.tanaka".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clinic_booking_needs_the_acknowledgement_the_core_asks_for_through_the_exchange() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let seal = || SealKey::derive(&MasterKey::from_bytes([9; KEY_LEN]));
    let (core_key, clinic_key) = (
        ExchangeKey::from_seed([1; 32]),
        ExchangeKey::from_seed([2; 32]),
    );
    let (core_pub, clinic_pub) = (core_key.public(), clinic_key.public());
    let core_keys = Keys {
        me: "core-1".into(),
        key: core_key,
        peers: BTreeMap::from([("clinic-a".to_string(), clinic_pub)]),
    };
    let clinic_keys = Keys {
        me: "clinic-a".into(),
        key: clinic_key,
        peers: BTreeMap::from([("core-1".to_string(), core_pub)]),
    };

    let ledger = Ledger::open(&dir.path().join("core"), seal()).unwrap();
    let (service, ledger) = LedgerService::new(ledger, Arc::new(vec![ct()]));
    service.spawn().unwrap();
    let safety = Arc::new(FakeSafety {
        calls: AtomicUsize::new(0),
        asked: Mutex::new(Vec::new()),
    });
    let core = CoreExchange::new(
        broker.connection("core-1"),
        Arc::new(core_keys),
        ledger.clone(),
        Duration::from_secs(60),
        Arc::new(Notify::new()),
    )
    .with_safety(Some(safety.clone() as Arc<dyn SafetyCheck>));
    let (clinic, task) = ClinicExchange::open(
        ClinicSettings {
            connection: broker.connection("clinic-a"),
            core: "core-1".into(),
            request_timeout: Duration::from_secs(10),
            stale_after: Duration::from_secs(600),
        },
        clinic_keys,
        &dir.path().join("clinic"),
        seal(),
    )
    .unwrap();
    let (stop, shutdown) = watch::channel(false);
    let core_task = tokio::spawn(core.run(shutdown.clone()));
    let clinic_task = tokio::spawn(task.run(shutdown));

    // The clinic sees the core online and its slots.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let slot = loop {
        let answer = clinic.free_slots(&SlotQuery::default()).await;
        if !answer.stale
            && let Some(s) = answer.slots.first()
        {
            break s.id.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the clinic never saw the core's slots"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The scanners it offers are the schedules the core published.
    assert_eq!(clinic.schedules().await, ["ct-1"]);

    // Not acknowledged: refused with the report, sealed across the broker; nothing booked.
    let refused = clinic.request(request(&slot, &[])).await.unwrap_err();
    let BookingRefused::NeedsAcknowledgement(report) = refused else {
        panic!("expected NeedsAcknowledgement, got {refused:?}");
    };
    assert_eq!(report.warnings, vec![reaction()]);
    assert_eq!(ledger.decided("clinic-a", "req-x1").await.unwrap(), None);
    assert_eq!(
        safety.asked.lock().unwrap().first().cloned(),
        Some(("clinic-a".into(), "CT".into(), "clinic:clinic-a".into()))
    );

    // The same request id acknowledged: booked, the report with the answer, the alert kept.
    let booked = clinic
        .request(request(&slot, &["w-react-1"]))
        .await
        .unwrap();
    assert_eq!(booked.status, "booked");
    assert_eq!(
        booked.safety.as_ref().map(|r| r.warnings.clone()),
        Some(vec![reaction()])
    );
    let on_core = ledger.get(&booked.id).await.unwrap().unwrap();
    assert_eq!(on_core.alerts, vec![reaction()]);
    assert_eq!(safety.calls.load(Ordering::SeqCst), 2);

    stop.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), core_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), clinic_task).await;
}
