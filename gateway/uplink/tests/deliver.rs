//! The C-STORE delivery service against a real PACS: DCMTK `storescp`, started by each test
//! on 127.0.0.1 with a port the test picks, writing into a temp dir, and killed (by its PID)
//! when the test ends. A missing `storescp` is a failure naming the package to install.
//!
//! Objects are built in the test (Explicit VR Little Endian data sets written by
//! dicom-object behind the tree's own Part 10 header), stored in a sealed spool on a temp
//! dir queued for the destination `pacs`, and delivered by a `DimseDeliveryService`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_object::InMemDicomObject;
use gateway_dicom::{ScuSettings, ScuTarget, part10};
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_spool::{
    Committed, DeliveryState, DestinationCounts, Limits, MessageIn, ObjectId, ObjectKind,
    ObjectMeta, Route, Spool,
};
use gateway_uplink::{DeliverSettings, DimseDeliveryService, Metrics};
use tokio::sync::watch;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const STUDY: &str = "1.2.826.0.1.3680043.8.498.900";
const DEST: &str = "pacs";
/// A SOP class no storage SCP knows (a UID under the dicomlab test root).
const UNKNOWN_CLASS: &str = "1.2.826.0.1.3680043.8.498.77";

/// A port on 127.0.0.1 that nothing listens on (bound by the OS, then let go).
fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// A Part 10 file: the tree's file meta group, then an Explicit VR LE data set whose SOP
/// Instance UID is `data_set_uid` (the meta group's is `uid`; they differ only on purpose).
fn part10_file(class: &str, uid: &str, data_set_uid: &str, pixels: usize) -> Vec<u8> {
    let mut ds = InMemDicomObject::new_empty();
    let mut put = |group, element, vr, value: PrimitiveValue| {
        ds.put(DataElement::new(Tag(group, element), vr, value));
    };
    put(0x0008, 0x0016, VR::UI, class.into());
    put(0x0008, 0x0018, VR::UI, data_set_uid.into());
    put(0x0008, 0x0050, VR::SH, "ACC0001".into());
    put(0x0010, 0x0010, VR::PN, "ZZTEST^Deliver".into());
    put(0x0010, 0x0020, VR::LO, "ZZ-0001".into());
    put(0x0020, 0x000D, VR::UI, STUDY.into());
    let pixel_data: Vec<u8> = (0..pixels).map(|i| (i % 241) as u8).collect();
    put(0x7FE0, 0x0010, VR::OB, PrimitiveValue::from(pixel_data));
    let mut bytes = part10::header(class, uid, EXPLICIT_LE).unwrap();
    let ts = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
    ds.write_dataset_with_ts(&mut bytes, &ts).unwrap();
    bytes
}

fn uid(test: u32, i: u32) -> String {
    format!("1.2.826.0.1.3680043.8.498.{test}.{i}")
}

/// A sealed spool on a temp dir with the one DICOM destination `pacs`.
struct Fixture {
    spool: Spool,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(
            dir.path(),
            Some(MasterKey::from_bytes([7; KEY_LEN])),
            Limits {
                max_bytes: 1 << 32,
                min_free_bytes: 0,
            },
            // An HL7 destination too: its messages wake the service without work for it.
            vec![
                Route::new(DEST, ObjectKind::Dicom),
                Route::new("emr", ObjectKind::Hl7),
            ],
        )
        .unwrap();
        spool.recover().unwrap();
        Self { spool, _dir: dir }
    }

    /// Stores a Part 10 file as the DICOM listener does; returns its spool id.
    fn store(&self, class: &str, uid: &str, file: &[u8]) -> ObjectId {
        let mut ingest = self
            .spool
            .begin(ObjectMeta {
                sop_instance_uid: uid.into(),
                sop_class_uid: class.into(),
                transfer_syntax_uid: EXPLICIT_LE.into(),
                source: "CLOUD".into(),
            })
            .unwrap();
        ingest.set_study_instance_uid(STUDY);
        for piece in file.chunks(50_000) {
            ingest.write(piece).unwrap();
        }
        match ingest.commit().unwrap() {
            Committed::Stored(id) => id,
            Committed::Duplicate(_) => panic!("{uid} stored twice"),
        }
    }

    fn counts(&self) -> DestinationCounts {
        self.spool.status().unwrap().by_destination[DEST].clone()
    }

    /// The state of one object towards `pacs`.
    fn state(&self, id: &ObjectId) -> DeliveryState {
        let (record, _) = self.spool.read(id).unwrap();
        record
            .destinations
            .into_iter()
            .find(|d| d.name == DEST)
            .unwrap()
            .state
    }

    /// Stores `n` small CT objects of test `test`; returns their UIDs.
    fn store_cts(&self, test: u32, range: std::ops::Range<u32>) -> BTreeSet<String> {
        range
            .map(|i| {
                let u = uid(test, i);
                self.store(CT, &u, &part10_file(CT, &u, &u, 4_000));
                u
            })
            .collect()
    }

    /// Waits (up to `within`) until `done` holds for the destination's counts.
    async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&DestinationCounts) -> bool,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let counts = self.counts();
            if done(&counts) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not reached within {within:?}: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A running delivery service and the switch that stops it.
struct Running {
    stop: watch::Sender<bool>,
    /// The gateway's disabled flag as the service sees it.
    pause: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    metrics: Metrics,
    registry: prometheus_client::registry::Registry,
}

impl Running {
    fn start(spool: &Spool, port: u16) -> Self {
        Self::start_with(spool, port, |_| {})
    }

    /// The test's quick timeouts and backoff, then `adjust`.
    fn start_with(spool: &Spool, port: u16, adjust: impl FnOnce(&mut DeliverSettings)) -> Self {
        let mut settings = DeliverSettings::new(
            DEST.into(),
            ScuTarget {
                host: "127.0.0.1".into(),
                port,
                called_ae: "PACS".into(),
                calling_ae: "CLINICGW".into(),
            },
        );
        settings.scu = ScuSettings {
            connect_timeout: Duration::from_secs(2),
            association_timeout: Duration::from_secs(3),
            dimse_timeout: Duration::from_secs(10),
            max_pdu_length: 65_536,
        };
        settings.backoff_initial = Duration::from_millis(100);
        settings.backoff_max = Duration::from_millis(400);
        settings.batch = 8;
        settings.idle_release = Duration::from_millis(500);
        adjust(&mut settings);
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let (stop, stopped) = watch::channel(false);
        let (pause, paused) = watch::channel(false);
        let service =
            DimseDeliveryService::new(settings, spool.clone(), metrics.clone()).with_paused(paused);
        let task = tokio::spawn(service.run(stopped));
        Self {
            stop,
            pause,
            task,
            metrics,
            registry,
        }
    }

    /// Stops the service; returns how long it took to end.
    async fn stop(self) -> Duration {
        let started = Instant::now();
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the delivery service ends after shutdown")
            .unwrap();
        started.elapsed()
    }
}

/// DCMTK storescp, killed and reaped when dropped.
struct StoreScp {
    child: Child,
    port: u16,
    out: PathBuf,
    /// The output folder when the PACS made its own.
    _dir: Option<tempfile::TempDir>,
}

impl StoreScp {
    /// On a free port, writing into a temp dir of its own.
    fn start(args: &[&str]) -> Self {
        Self::start_on(free_port(), args)
    }

    /// On `port`, writing into a temp dir of its own.
    fn start_on(port: u16, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut pacs = Self::start_in(port, dir.path(), args);
        pacs._dir = Some(dir);
        pacs
    }

    /// `storescp -aet PACS +xa +uf -od OUT [args] PORT` (unique file names: a resend shows
    /// as a second file), once it listens.
    fn start_in(port: u16, out: &Path, args: &[&str]) -> Self {
        std::fs::create_dir_all(out).unwrap();
        let mut child = Command::new("storescp")
            .args(["-aet", "PACS", "+xa", "+uf", "-od"])
            .arg(out)
            .args(args)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start DCMTK storescp ({e}): this test needs it (apt-get install dcmtk)"
                )
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("storescp exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "storescp not listening after 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            out: out.to_path_buf(),
            _dir: None,
        }
    }

    /// SOP Instance UID -> (files received for it, data set of the last one).
    fn received(&self) -> BTreeMap<String, (usize, Vec<u8>)> {
        let mut got: BTreeMap<String, (usize, Vec<u8>)> = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&self.out) else {
            return got;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let meta = part10::read(&bytes).unwrap();
            let slot = got.entry(meta.sop_instance_uid).or_default();
            slot.0 += 1;
            slot.1 = bytes[meta.data_set_offset..].to_vec();
        }
        got
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The data set of a Part 10 file (what the PACS stores bit-preserving).
fn data_set(file: &[u8]) -> Vec<u8> {
    let meta = part10::read(file).unwrap();
    file[meta.data_set_offset..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_object_arrives_once_unchanged_and_is_marked_sent() {
    let fx = Fixture::new();
    let pacs = StoreScp::start(&["+B"]);
    let port = pacs.port;
    let mut sent = BTreeMap::new();
    for i in 0..20u32 {
        let (class, pixels) = if i % 4 == 3 {
            (MR, 3_000)
        } else {
            (CT, 10_000 + 9_000 * i as usize)
        };
        let u = uid(1, i);
        let file = part10_file(class, &u, &u, pixels);
        fx.store(class, &u, &file);
        sent.insert(u, data_set(&file));
    }
    assert_eq!(fx.counts().queued, 20);

    let service = Running::start(&fx.spool, port);
    fx.wait_for(Duration::from_secs(60), "20 sent", |c| c.sent == 20)
        .await;
    let counts = fx.counts();
    assert_eq!((counts.queued, counts.failed), (0, 0), "{counts:?}");
    assert_eq!(counts.last_error, None);
    assert_eq!(service.metrics.sent_to(DEST), 20);

    let received = pacs.received();
    assert_eq!(received.len(), 20, "one instance per object");
    for (u, expected) in &sent {
        let (copies, got) = received
            .get(u)
            .unwrap_or_else(|| panic!("{u} did not arrive"));
        assert_eq!(*copies, 1, "{u} arrived {copies} times");
        assert!(got == expected, "data set of {u} differs");
    }

    // More objects later: the service was woken by the commit, nothing is sent twice.
    let late = uid(1, 100);
    let file = part10_file(CT, &late, &late, 2_000);
    fx.store(CT, &late, &file);
    fx.wait_for(Duration::from_secs(20), "the late object sent", |c| {
        c.sent == 21
    })
    .await;
    let elapsed = service.stop().await;
    assert!(elapsed < Duration::from_secs(5), "stop took {elapsed:?}");
    let received = pacs.received();
    assert_eq!(received.len(), 21);
    assert!(received.values().all(|(copies, _)| *copies == 1));
    assert!(received[&late].1 == data_set(&file));
}

/// `gateway_uplink_sent_total{destination="pacs",result}` as `/metrics` shows it.
fn metric(metrics: &prometheus_client::registry::Registry, result: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, metrics).unwrap();
    let series =
        format!("gateway_uplink_sent_total{{destination=\"{DEST}\",result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn uids(received: &BTreeMap<String, (usize, Vec<u8>)>) -> BTreeSet<String> {
    received.keys().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_objects_are_handed_to_the_audit_per_study_once_recorded() {
    let fx = Fixture::new();
    let pacs = StoreScp::start(&["+B"]);
    fx.store_cts(40, 0..5);
    let u = uid(40, 9);
    fx.store(MR, &u, &part10_file(MR, &u, &u, 2_000));
    let (sink, mut audit) = tokio::sync::mpsc::channel(16);
    let (stop, stopped) = watch::channel(false);
    let mut registry = prometheus_client::registry::Registry::default();
    let mut settings = DeliverSettings::new(
        DEST.into(),
        ScuTarget {
            host: "127.0.0.1".into(),
            port: pacs.port,
            called_ae: "PACS".into(),
            calling_ae: "CLINICGW".into(),
        },
    );
    settings.batch = 4;
    let service =
        DimseDeliveryService::new(settings, fx.spool.clone(), Metrics::register(&mut registry))
            .with_transfer_audit(sink);
    let task = tokio::spawn(service.run(stopped));
    fx.wait_for(Duration::from_secs(60), "6 sent", |c| c.sent == 6)
        .await;
    // Every delivered object is counted once, under its study and patient, for `pacs`.
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    while counted.values().sum::<u64>() < 6 {
        let t = tokio::time::timeout(Duration::from_secs(10), audit.recv())
            .await
            .expect("a transfer for the audit")
            .expect("the sink stays open while the service runs");
        assert_eq!(
            t.direction,
            gateway_dicom::Direction::Sent {
                destination: DEST.into()
            }
        );
        for study in t.studies {
            assert_eq!(
                (study.study_uid.as_str(), study.patient_id.as_str()),
                (STUDY, "ZZ-0001")
            );
            for (class, n) in study.sop_classes {
                *counted.entry(class).or_default() += n;
            }
        }
    }
    assert_eq!(
        counted,
        BTreeMap::from([(CT.to_string(), 5), (MR.to_string(), 1)])
    );
    stop.send(true).unwrap();
    task.await.unwrap();
    assert!(audit.try_recv().is_err(), "nothing counted twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacs_down_at_start_keeps_objects_queued_then_delivers_them() {
    let fx = Fixture::new();
    let expected = fx.store_cts(2, 0..6);
    // Nothing listens on this port yet.
    let port = free_port();
    let service = Running::start(&fx.spool, port);
    fx.wait_for(Duration::from_secs(10), "a connection error", |c| {
        c.last_error.is_some()
    })
    .await;
    // Several attempts, each backing off, none losing anything.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counts = fx.counts();
    assert_eq!((counts.queued, counts.sent, counts.failed), (6, 0, 0));
    let reason = counts.last_error.unwrap();
    assert!(
        reason.contains(&format!("PACS@127.0.0.1:{port}")) && reason.contains("connect"),
        "{reason}"
    );
    let retries = metric(&service.registry, "retry");
    assert!(
        retries >= 3,
        "only {retries} attempts in 1.5 s of 100..400 ms backoff"
    );
    assert!(retries <= 40, "{retries} attempts: no backoff");

    // The PACS comes up: the same service delivers, without a restart.
    let pacs = StoreScp::start_on(port, &["+B"]);
    fx.wait_for(Duration::from_secs(20), "6 sent", |c| c.sent == 6)
        .await;
    assert_eq!(
        fx.counts().last_error,
        None,
        "the reason clears once it works"
    );
    assert_eq!(uids(&pacs.received()), expected);
    assert!(pacs.received().values().all(|(copies, _)| *copies == 1));
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_objects_are_dead_letters_and_the_rest_is_delivered() {
    let fx = Fixture::new();
    // Not bit-preserving: storescp checks the data set against the request (A900).
    let pacs = StoreScp::start(&[]);
    let port = pacs.port;
    let mut expected = fx.store_cts(3, 0..3);
    let unknown_uid = uid(3, 50);
    let unknown = fx.store(
        UNKNOWN_CLASS,
        &unknown_uid,
        &part10_file(UNKNOWN_CLASS, &unknown_uid, &unknown_uid, 100),
    );
    // The file meta group (and so the C-STORE-RQ) names one instance, the data set another.
    let mismatched_uid = uid(3, 51);
    let mismatched = fx.store(
        CT,
        &mismatched_uid,
        &part10_file(CT, &mismatched_uid, &uid(3, 52), 100),
    );
    expected.extend(fx.store_cts(3, 3..6));
    let service = Running::start(&fx.spool, port);
    fx.wait_for(Duration::from_secs(20), "6 sent, 2 dead letters", |c| {
        c.sent == 6 && c.failed == 2
    })
    .await;
    let DeliveryState::Failed { reason } = fx.state(&unknown) else {
        panic!("{:?}", fx.state(&unknown))
    };
    assert!(
        reason.contains("did not accept SOP class 1.2.826.0.1.3680043.8.498.77"),
        "{reason}"
    );
    let DeliveryState::Failed { reason } = fx.state(&mismatched) else {
        panic!("{:?}", fx.state(&mismatched))
    };
    assert!(reason.contains("status A900"), "{reason}");
    // Reasons name codes and standard UIDs, never the instance.
    assert!(!reason.contains(&mismatched_uid) && !reason.contains("ZZTEST"));

    // An association whose every context is refused: dead letter too.
    let alone_uid = uid(3, 60);
    let alone = fx.store(
        UNKNOWN_CLASS,
        &alone_uid,
        &part10_file(UNKNOWN_CLASS, &alone_uid, &alone_uid, 100),
    );
    fx.wait_for(Duration::from_secs(20), "3 dead letters", |c| c.failed == 3)
        .await;
    assert!(matches!(
        fx.state(&alone),
        DeliveryState::Failed { reason } if reason.contains(UNKNOWN_CLASS)
    ));
    let counts = fx.counts();
    assert_eq!(
        (counts.queued, counts.sent, counts.last_error),
        (0, 6, None)
    );
    assert_eq!(metric(&service.registry, "failed"), 3);
    assert_eq!(metric(&service.registry, "retry"), 0);
    service.stop().await;
    // storescp writes the file before it checks it, and keeps the one it answered A900.
    expected.insert(uid(3, 52));
    assert_eq!(uids(&pacs.received()), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_resources_keeps_the_object_queued_and_retries() {
    let fx = Fixture::new();
    let base = tempfile::tempdir().unwrap();
    let out = base.path().join("store");
    let port = free_port();
    let pacs = StoreScp::start_in(port, &out, &[]);
    // storescp answers A700 (out of resources) when it cannot write the file.
    std::fs::remove_dir(&out).unwrap();
    let expected = fx.store_cts(4, 0..3);
    let service = Running::start(&fx.spool, port);
    fx.wait_for(Duration::from_secs(10), "an A700", |c| {
        c.last_error.as_deref().is_some_and(|e| e.contains("A700"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let counts = fx.counts();
    assert_eq!((counts.queued, counts.sent, counts.failed), (3, 0, 0));
    assert!(metric(&service.registry, "retry") >= 2, "retried");

    std::fs::create_dir(&out).unwrap();
    fx.wait_for(Duration::from_secs(20), "3 sent", |c| c.sent == 3)
        .await;
    assert_eq!(fx.counts().last_error, None);
    assert_eq!(uids(&pacs.received()), expected);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_queue_finishes_the_object_in_hand_and_stops() {
    let fx = Fixture::new();
    // Each C-STORE takes a second at this PACS.
    let pacs = StoreScp::start(&["+B", "--sleep-after", "1"]);
    let port = pacs.port;
    let expected = fx.store_cts(5, 0..10);
    let service = Running::start(&fx.spool, port);
    fx.wait_for(Duration::from_secs(20), "2 sent", |c| c.sent >= 2)
        .await;
    let took = service.stop().await;
    // The object in hand (1 s at this PACS) and the release, no more.
    assert!(took < Duration::from_secs(4), "stop took {took:?}");
    let counts = fx.counts();
    assert!(counts.queued > 0, "stopped mid-queue: {counts:?}");
    assert_eq!(counts.sent + counts.queued, 10);
    // Everything marked sent is at the PACS; nothing at the PACS is still queued.
    let received = pacs.received();
    assert_eq!(received.len() as u64, counts.sent, "{counts:?}");

    // A new service delivers the rest, each object once.
    let service = Running::start(&fx.spool, port);
    fx.wait_for(Duration::from_secs(30), "10 sent", |c| c.sent == 10)
        .await;
    service.stop().await;
    let received = pacs.received();
    assert_eq!(uids(&received), expected);
    assert!(received.values().all(|(copies, _)| *copies == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn association_dropped_while_idle_is_reopened_without_backoff() {
    let fx = Fixture::new();
    let out = tempfile::tempdir().unwrap();
    let port = free_port();
    let pacs = StoreScp::start_in(port, out.path(), &["+B"]);
    let mut expected = fx.store_cts(6, 0..2);
    // The association stays open long after the queue is empty.
    let service = Running::start_with(&fx.spool, port, |s| {
        s.idle_release = Duration::from_secs(60);
        s.backoff_initial = Duration::from_secs(30);
        s.backoff_max = Duration::from_secs(30);
    });
    fx.wait_for(Duration::from_secs(20), "2 sent", |c| c.sent == 2)
        .await;
    // The PACS restarts: the kept-open association is gone.
    drop(pacs);
    let pacs = StoreScp::start_in(port, out.path(), &["+B"]);
    expected.extend(fx.store_cts(6, 2..4));
    // Well within the 30 s backoff: it reconnected at once.
    fx.wait_for(Duration::from_secs(10), "4 sent", |c| c.sent == 4)
        .await;
    assert_eq!(metric(&service.registry, "retry"), 0);
    service.stop().await;
    assert_eq!(uids(&pacs.received()), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_before_the_response_leaves_the_object_queued() {
    let fx = Fixture::new();
    // This PACS takes the C-STORE-RQ and aborts instead of answering.
    let aborting = StoreScp::start(&["--abort-after"]);
    let port = aborting.port;
    let expected = fx.store_cts(7, 0..3);
    let service = Running::start(&fx.spool, port);
    fx.wait_for(Duration::from_secs(10), "an abort", |c| {
        c.last_error
            .as_deref()
            .is_some_and(|e| e.contains("aborted"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let counts = fx.counts();
    // No C-STORE-RSP, no mark: nothing counts as delivered.
    assert_eq!((counts.queued, counts.sent, counts.failed), (3, 0, 0));
    assert!(metric(&service.registry, "retry") >= 2);
    assert_eq!(metric(&service.registry, "sent"), 0);

    drop(aborting);
    let pacs = StoreScp::start_on(port, &["+B"]);
    fx.wait_for(Duration::from_secs(20), "3 sent", |c| c.sent == 3)
        .await;
    service.stop().await;
    assert_eq!(uids(&pacs.received()), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_gateway_sends_nothing_until_enabled() {
    let fx = Fixture::new();
    // Each C-STORE takes a second at this PACS.
    let pacs = StoreScp::start(&["+B", "--sleep-after", "1"]);
    let port = pacs.port;
    let service = Running::start(&fx.spool, port);
    service.pause.send(true).unwrap();
    let expected = fx.store_cts(8, 0..4);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fx.counts().queued, 4);
    assert!(pacs.received().is_empty(), "sent while disabled");

    // Enabled: delivery starts; disabled again mid-queue: the object in hand is finished
    // and nothing more goes.
    service.pause.send(false).unwrap();
    fx.wait_for(Duration::from_secs(10), "1 sent", |c| c.sent >= 1)
        .await;
    service.pause.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = fx.counts();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fx.counts().sent, held.sent, "still sending while disabled");
    assert!(held.queued > 0, "{held:?}");
    assert_eq!(pacs.received().len() as u64, held.sent);

    service.pause.send(false).unwrap();
    fx.wait_for(Duration::from_secs(20), "4 sent", |c| c.sent == 4)
        .await;
    service.stop().await;
    assert_eq!(uids(&pacs.received()), expected);
}

/// Everything every test of this binary logs from the moment it is installed, at every
/// level (the SCU's and dicom-ul's own events included).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_name_no_patient_data_whatever_happens() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();

    let fx = Fixture::new();
    let port = free_port();
    let mut uids: Vec<String> = fx.store_cts(9, 0..3).into_iter().collect();
    for (i, class, data_set_uid) in [(50, UNKNOWN_CLASS, uid(9, 50)), (51, CT, uid(9, 52))] {
        let u = uid(9, i);
        fx.store(class, &u, &part10_file(class, &u, &data_set_uid, 100));
        uids.extend([u, data_set_uid]);
    }
    // PACS down first (connection refused), then up without bit preserving (A900).
    let service = Running::start(&fx.spool, port);
    fx.wait_for(Duration::from_secs(10), "a connection error", |c| {
        c.last_error.is_some()
    })
    .await;
    let _pacs = StoreScp::start_on(port, &[]);
    fx.wait_for(Duration::from_secs(20), "3 sent, 2 dead letters", |c| {
        c.sent == 3 && c.failed == 2
    })
    .await;
    service.stop().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // The capture works: the failures and deliveries of this test are in it.
    for expected in [
        "cannot connect to PACS@127.0.0.1",
        "status A900",
        "dead letter",
    ] {
        assert!(logs.contains(expected), "{expected:?} not logged:\n{logs}");
    }
    for secret in ["ZZTEST", "ZZ-0001", "ACC0001", STUDY]
        .into_iter()
        .chain(uids.iter().map(String::as_str))
    {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
}

/// Established TCP connections whose local port is `port` (the PACS's side of each open
/// association), from /proc/net/tcp.
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields[1].ends_with(&local) && fields[3] == "01"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_association_is_released_while_other_traffic_wakes_the_service() {
    let fx = Fixture::new();
    let pacs = StoreScp::start(&["+B"]);
    let port = pacs.port;
    let expected = fx.store_cts(10, 0..2);
    let service = Running::start_with(&fx.spool, port, |s| {
        s.idle_release = Duration::from_millis(1500);
    });
    fx.wait_for(Duration::from_secs(20), "2 sent", |c| c.sent == 2)
        .await;
    assert_eq!(
        connections_to(port),
        1,
        "the association stays open a while"
    );
    // HL7 messages for another destination, every 100 ms: each wakes the service.
    for i in 0..30 {
        let message =
            format!("MSH|^~\\&|RIS|CORE|GW|CLINIC|20261206000000||ADT^A08|IDLE{i}|P|2.5\r");
        let stored = fx.spool.store_messages(&[MessageIn {
            key: format!("RIS|CORE|IDLE{i}"),
            message_type: "ADT^A08".into(),
            charset: "ASCII".into(),
            source: "127.0.0.1".into(),
            bytes: message.into_bytes(),
        }]);
        assert!(stored[0].is_ok());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(connections_to(port), 0, "released after 1.5 s without work");
    assert_eq!(metric(&service.registry, "retry"), 0);
    service.stop().await;
    assert_eq!(uids(&pacs.received()), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_cut_off_mid_queue_loses_nothing_and_resends_at_most_once() {
    let fx = Fixture::new();
    let pacs = StoreScp::start(&["+B"]);
    let port = pacs.port;
    let expected = fx.store_cts(11, 0..60);
    for cut_after in [5u64, 25, 45] {
        let service = Running::start(&fx.spool, port);
        fx.wait_for(Duration::from_secs(30), "more sent", |c| {
            c.sent >= cut_after
        })
        .await;
        // As a crash would: the task is dropped at whatever await it is in, no release.
        service.task.abort();
        let _ = service.task.await;
    }
    let service = Running::start(&fx.spool, port);
    fx.wait_for(Duration::from_secs(30), "60 sent", |c| c.sent == 60)
        .await;
    service.stop().await;
    let received = pacs.received();
    // Nothing lost; an object whose response came in just before a cut may come twice
    // (the PACS keeps one instance per SOP Instance UID), never more.
    assert_eq!(uids(&received), expected);
    assert!(
        received
            .values()
            .all(|(copies, _)| (1..=2).contains(copies)),
        "{:?}",
        received.values().map(|(c, _)| c).collect::<Vec<_>>()
    );
}
