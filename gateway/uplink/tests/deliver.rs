//! The C-STORE delivery service against a real PACS: DCMTK `storescp`, started by each test
//! on 127.0.0.1 with a port the test picks, writing into a temp dir, and killed (by its PID)
//! when the test ends. A missing `storescp` is a failure naming the package to install.
//!
//! Objects are built in the test (Explicit VR Little Endian data sets written by
//! dicom-object behind the tree's own Part 10 header), stored in a sealed spool on a temp
//! dir queued for the destination `pacs`, and delivered by a `DimseDeliveryService`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_object::InMemDicomObject;
use gateway_dicom::{ScuSettings, ScuTarget, part10};
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_spool::{
    Committed, DestinationCounts, Limits, ObjectId, ObjectKind, ObjectMeta, Route, Spool,
};
use gateway_uplink::{DeliverSettings, DimseDeliveryService, Metrics};
use tokio::sync::watch;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const STUDY: &str = "1.2.826.0.1.3680043.8.498.900";
const DEST: &str = "pacs";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
            vec![Route::new(DEST, ObjectKind::Dicom)],
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
    task: tokio::task::JoinHandle<()>,
    metrics: Metrics,
}

impl Running {
    fn start(spool: &Spool, port: u16) -> Self {
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
        let metrics = Metrics::default();
        let (stop, stopped) = watch::channel(false);
        let service = DimseDeliveryService::new(settings, spool.clone(), metrics.clone());
        let task = tokio::spawn(service.run(stopped));
        Self {
            stop,
            task,
            metrics,
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
    out: PathBuf,
}

impl StoreScp {
    /// `storescp -aet PACS +xa +uf -od OUT [args] PORT` (unique file names: a resend shows
    /// as a second file), once it listens.
    fn start(port: u16, out: &Path, args: &[&str]) -> Self {
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
            out: out.to_path_buf(),
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
    let out = tempfile::tempdir().unwrap();
    let port = free_port();
    let pacs = StoreScp::start(port, out.path(), &["+B"]);
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
