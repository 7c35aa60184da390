//! Dose reports across the exchange: a clinic's `send_dose` reaches the core through a real
//! mosquitto (plaintext on 127.0.0.1, a port the test picks), the core hands exactly that
//! report to its safety task, and the clinic's send resolves once the task says the events
//! are durable (`done(true)`); `done(false)` leaves it unacknowledged until the timeout. A
//! report sealed under another clinic's name, or one that opens but is not a valid report,
//! is refused without an answer, and the core goes on serving.
//!
//! A missing `mosquitto` / `mosquitto_pub` binary is a failure that says what to install,
//! never a skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_booking::{
    DoseEventView, Ledger, LedgerService, PatientRef, SealKey, SlotQuery, SlotSource,
};
use gateway_exchange::ExchangeKey;
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_regional::clinic::{ClinicExchange, ClinicSettings, ClinicTask};
use gateway_regional::core::CoreExchange;
use gateway_regional::dose::{DoseIn, DoseNotSent, KIND_DOSE, MAX_EVENTS, WireDose};
use gateway_regional::topics;
use gateway_regional::wire::Keys;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

mod common;
use common::{Mosquitto, ct};

const TIMEOUT: Duration = Duration::from_secs(3);
const CORE_SEED: [u8; 32] = [1; 32];
const CLINIC_SEED: [u8; 32] = [2; 32];
const FORGER_SEED: [u8; 32] = [3; 32];

/// `me`'s keys (from `seed`) with the peers' public keys (from their seeds).
fn keys(me: &str, seed: [u8; 32], peers: &[(&str, [u8; 32])]) -> Keys {
    Keys {
        me: me.into(),
        key: ExchangeKey::from_seed(seed),
        peers: peers
            .iter()
            .map(|(p, s)| ((*p).to_string(), ExchangeKey::from_seed(*s).public()))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn event(uid: &str) -> DoseEventView {
    DoseEventView {
        event_uid: uid.into(),
        when: Some("20270110093000".into()),
        hospital: "clinic-a".into(),
        ctdivol_mgy: Some(12.5),
        dlp_mgy_cm: Some(480.25),
        target_region: Some("Chest".into()),
        protocol: Some("CHEST ROUTINE".into()),
    }
}

fn dose(report_id: &str) -> WireDose {
    WireDose {
        report_id: report_id.into(),
        patient: PatientRef {
            id: "ZZPID1".into(),
            name: "ZZTEST^HANAKO".into(),
            birth_date: "19610402".into(),
            sex: "F".into(),
        },
        accession: Some("RB20270112000001".into()),
        events: vec![
            event(&format!("{report_id}.1")),
            event(&format!("{report_id}.2")),
        ],
    }
}

/// A core with a dose receiver and the clinic `clinic-a`, both on one broker, running.
struct World {
    broker: Mosquitto,
    dir: tempfile::TempDir,
    clinic: ClinicExchange,
    doses: mpsc::Receiver<DoseIn>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl World {
    async fn start() -> Self {
        let broker = Mosquitto::start();
        let dir = tempfile::tempdir().unwrap();
        let (to_safety, doses) = mpsc::channel(8);
        let core = core(&broker, dir.path()).with_dose(to_safety);
        let (clinic, task) = clinic(&broker, dir.path());
        let (stop, shutdown) = watch::channel(false);
        let mut world = World {
            tasks: vec![tokio::spawn(core.run(shutdown))],
            broker,
            dir,
            clinic,
            doses,
            stop,
        };
        world.run(task);
        world
    }

    /// Runs a clinic's session until the world stops.
    fn run(&mut self, task: ClinicTask) {
        self.tasks
            .push(tokio::spawn(task.run(self.stop.subscribe())));
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// The core `core-1` (ledger in `dir/core`, one CT schedule), not yet running.
fn core(broker: &Mosquitto, dir: &std::path::Path) -> CoreExchange {
    let seal = SealKey::derive(&MasterKey::from_bytes([9; KEY_LEN]));
    let ledger = Ledger::open(&dir.join("core"), seal).unwrap();
    let (service, ledger) = LedgerService::new(ledger, Arc::new(vec![ct()]));
    service.spawn().unwrap();
    CoreExchange::new(
        broker.connection("core-1"),
        Arc::new(keys("core-1", CORE_SEED, &[("clinic-a", CLINIC_SEED)])),
        ledger,
        Duration::from_secs(60),
        Arc::new(Notify::new()),
    )
}

/// The clinic `clinic-a` (state in `dir/clinic`), not yet running.
fn clinic(broker: &Mosquitto, dir: &std::path::Path) -> (ClinicExchange, ClinicTask) {
    ClinicExchange::open(
        settings(broker, "clinic-a"),
        keys("clinic-a", CLINIC_SEED, &[("core-1", CORE_SEED)]),
        &dir.join("clinic"),
        SealKey::derive(&MasterKey::from_bytes([9; KEY_LEN])),
    )
    .unwrap()
}

fn settings(broker: &Mosquitto, client_id: &str) -> ClinicSettings {
    ClinicSettings {
        connection: broker.connection(client_id),
        core: "core-1".into(),
        request_timeout: TIMEOUT,
        stale_after: Duration::from_secs(600),
    }
}

/// Waits until `clinic` sees the core online with its slots (so both sessions are up).
async fn until_ready(clinic: &ClinicExchange) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while clinic.free_slots(&SlotQuery::default()).await.stale {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the clinic never saw the core online"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next report the core hands its safety task (at most 10 s).
async fn next(doses: &mut mpsc::Receiver<DoseIn>) -> DoseIn {
    tokio::time::timeout(Duration::from_secs(10), doses.recv())
        .await
        .expect("the core handed no dose report on")
        .expect("the core's dose channel closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dose_report_is_acknowledged_only_once_the_core_recorded_it() {
    let mut world = World::start().await;
    until_ready(&world.clinic).await;

    // One report: the core's task gets exactly it, from clinic-a; done(true) -> Ok.
    let sent = dose("1.2.392.1");
    let sending = tokio::spawn(world.clinic.send_dose(sent.clone()));
    let got = next(&mut world.doses).await;
    assert_eq!(got.clinic, "clinic-a");
    assert_eq!(got.dose, sent);
    assert_eq!(got.dose.events.len(), 2);
    assert!(
        !sending.is_finished(),
        "acknowledged before the core recorded it"
    );
    got.done.send(true).unwrap();
    assert_eq!(sending.await.unwrap(), Ok(()));

    // Two at once, answered in the other order: each resolves on its own acknowledgement.
    let first = tokio::spawn(world.clinic.send_dose(dose("1.2.392.2")));
    let second = tokio::spawn(world.clinic.send_dose(dose("1.2.392.3")));
    let (a, b) = (next(&mut world.doses).await, next(&mut world.doses).await);
    let mut ids = [a.dose.report_id.clone(), b.dose.report_id.clone()];
    ids.sort();
    assert_eq!(ids, ["1.2.392.2".to_string(), "1.2.392.3".to_string()]);
    b.done.send(true).unwrap();
    a.done.send(true).unwrap();
    assert_eq!(first.await.unwrap(), Ok(()));
    assert_eq!(second.await.unwrap(), Ok(()));

    // Not recorded (done(false)): no acknowledgement, the send fails after its timeout.
    let started = Instant::now();
    let sending = tokio::spawn(world.clinic.send_dose(dose("1.2.392.4")));
    next(&mut world.doses).await.done.send(false).unwrap();
    assert_eq!(sending.await.unwrap(), Err(DoseNotSent));
    assert!(started.elapsed() >= TIMEOUT, "gave up before the timeout");

    // The task dropped `done`: the same.
    let sending = tokio::spawn(world.clinic.send_dose(dose("1.2.392.5")));
    drop(next(&mut world.doses).await);
    assert_eq!(sending.await.unwrap(), Err(DoseNotSent));

    // Sent again later and recorded: acknowledged (the clinic's retry).
    let sending = tokio::spawn(world.clinic.send_dose(dose("1.2.392.5")));
    let got = next(&mut world.doses).await;
    assert_eq!(got.dose.report_id, "1.2.392.5");
    got.done.send(true).unwrap();
    assert_eq!(sending.await.unwrap(), Ok(()));

    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_dose_reports_are_refused_and_the_core_goes_on() {
    let mut world = World::start().await;
    until_ready(&world.clinic).await;

    // Another party (its own key) claiming to be clinic-a: does not open at the core.
    let (forger, task) = ClinicExchange::open(
        settings(&world.broker, "clinic-x"),
        keys("clinic-a", FORGER_SEED, &[("core-1", CORE_SEED)]),
        &world.dir.path().join("forger"),
        SealKey::derive(&MasterKey::from_bytes([8; KEY_LEN])),
    )
    .unwrap();
    world.run(task);
    until_ready(&forger).await;
    assert_eq!(forger.send_dose(dose("1.2.392.66")).await, Err(DoseNotSent));
    assert!(
        world.doses.try_recv().is_err(),
        "a forged report reached the safety task"
    );

    // Sealed with clinic-a's real key but not a valid report: refused, nothing handed on.
    let clinic_keys = keys("clinic-a", CLINIC_SEED, &[("core-1", CORE_SEED)]);
    let mut bad_uid = dose("1.2.392.7");
    bad_uid.report_id = "../../etc".into();
    let mut bad_event = dose("1.2.392.8");
    bad_event.events.push(event("1.2.x"));
    let mut too_many = dose("1.2.392.9");
    // Bare events, so the message stays under the session's 1 MiB packet limit.
    let bare = DoseEventView {
        event_uid: "1.2.392.9.1".into(),
        when: None,
        hospital: "clinic-a".into(),
        ctdivol_mgy: None,
        dlp_mgy_cm: None,
        target_region: None,
        protocol: None,
    };
    too_many.events = vec![bare; MAX_EVENTS + 1];
    let mut unknown_field = serde_json::to_value(dose("1.2.392.10")).unwrap();
    unknown_field["extra"] = serde_json::json!("x");
    let bodies: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        b"{\"report_id\":\"1.2\"}".to_vec(),
        serde_json::to_vec(&unknown_field).unwrap(),
        serde_json::to_vec(&bad_uid).unwrap(),
        serde_json::to_vec(&bad_event).unwrap(),
        serde_json::to_vec(&too_many).unwrap(),
    ];
    for (n, body) in bodies.iter().enumerate() {
        let msg = format!("bad{n}");
        let sealed = clinic_keys.seal("core-1", KIND_DOSE, &msg, body).unwrap();
        assert!(
            sealed.len() < 1024 * 1024,
            "message {n} is over the packet limit"
        );
        world
            .broker
            .publish_raw(&topics::request("core-1", "clinic-a", &msg), &sealed);
    }
    // Garbage that is no envelope at all, under the dose kind's topic.
    world
        .broker
        .publish_raw(&topics::request("core-1", "clinic-a", "junk"), b"\x00\xff");

    // The core still serves: the next report it hands on is the honest one.
    let sending = tokio::spawn(world.clinic.send_dose(dose("1.2.392.11")));
    let got = next(&mut world.doses).await;
    assert_eq!(got.dose.report_id, "1.2.392.11", "a refused report went on");
    assert_eq!(got.clinic, "clinic-a");
    got.done.send(true).unwrap();
    assert_eq!(sending.await.unwrap(), Ok(()));
    assert!(world.doses.try_recv().is_err());

    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_without_a_dose_receiver_does_not_acknowledge() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let core = core(&broker, dir.path());
    let (clinic, task) = clinic(&broker, dir.path());
    // Not connected yet: refused at once.
    assert_eq!(clinic.send_dose(dose("1.2.392.12")).await, Err(DoseNotSent));
    let (stop, shutdown) = watch::channel(false);
    let tasks = [
        tokio::spawn(core.run(shutdown.clone())),
        tokio::spawn(task.run(shutdown)),
    ];
    until_ready(&clinic).await;
    assert_eq!(clinic.send_dose(dose("1.2.392.12")).await, Err(DoseNotSent));
    stop.send(true).unwrap();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
}
