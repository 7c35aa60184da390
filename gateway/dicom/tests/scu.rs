//! The C-STORE SCU against real peers: DCMTK `storescp` (a missing binary is a failure),
//! the gateway's own SCP with a real spool, and hand-made misbehaving peers on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, dataset, even, exported};
use dicom_dictionary_std::uids;
use dicom_ul::Pdu;
use dicom_ul::ServerAssociationOptions;
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, PDataValue, PDataValueType};
use gateway_dicom::scu::{ObjectContext, ScuAssociation};
use gateway_dicom::{Scu, ScuError, ScuSettings, ScuTarget, StoreObject, StoreOutcome};
use gateway_dicom::{dimse, part10};
use gateway_spool::Limits;
use tokio::net::{TcpListener, TcpStream};

const CT: &str = uids::CT_IMAGE_STORAGE;
const MR: &str = uids::MR_IMAGE_STORAGE;
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
/// A SOP class no storage SCP knows (a UID under the dicomlab test root).
const UNKNOWN_CLASS: &str = "1.2.826.0.1.3680043.8.498.77";

/// A Part 10 object around `dataset`.
fn object(class: &str, instance: &str, ts: &str, data_set: &[u8]) -> StoreObject {
    let mut bytes = part10::header(class, instance, ts).unwrap();
    bytes.extend_from_slice(data_set);
    StoreObject::from_part10(bytes).unwrap()
}

/// A small Implicit VR Little Endian data set.
fn implicit_dataset(class: &str, instance: &str, pixels: usize) -> Vec<u8> {
    let mut d = Vec::new();
    for (tag, value) in [
        ((0x0008u16, 0x0016u16), even(class)),
        ((0x0008, 0x0018), even(instance)),
    ] {
        d.extend(tag.0.to_le_bytes());
        d.extend(tag.1.to_le_bytes());
        d.extend((value.len() as u32).to_le_bytes());
        d.extend(value);
    }
    d.extend([0xE0, 0x7F, 0x10, 0x00]);
    d.extend((pixels as u32).to_le_bytes());
    d.extend((0..pixels).map(|i| (i % 251) as u8));
    d
}

fn target(addr: SocketAddr, called: &str) -> ScuTarget {
    ScuTarget {
        host: addr.ip().to_string(),
        port: addr.port(),
        called_ae: called.into(),
        calling_ae: "CLINICGW".into(),
    }
}

fn quick() -> ScuSettings {
    ScuSettings {
        connect_timeout: Duration::from_secs(2),
        association_timeout: Duration::from_secs(1),
        dimse_timeout: Duration::from_secs(1),
        max_pdu_length: 16_384,
    }
}

async fn connect(
    addr: SocketAddr,
    called: &str,
    settings: ScuSettings,
    objects: &[&StoreObject],
) -> Result<ScuAssociation<TcpStream>, ScuError> {
    Scu::new(target(addr, called), settings)
        .connect(objects.iter().map(|o| o.context()))
        .await
}

/// DCMTK storescp on a port of the test's choosing, writing into a temp dir; killed on drop.
struct StoreScp {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl StoreScp {
    fn start(ae: &str) -> Self {
        Self::start_with(ae, &[])
    }

    /// `storescp -aet AE +B [args] -od DIR PORT`.
    fn start_with(ae: &str, args: &[&std::ffi::OsStr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("storescp")
            .args(["-aet", ae, "+B"])
            .args(args)
            .arg("-od")
            .arg(dir.path())
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start DCMTK storescp ({e}); this test needs it: apt-get install dcmtk"
                )
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("storescp exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "storescp not listening on {port} after 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port, dir }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SOP Instance UID -> (SOP Class, Transfer Syntax, data set) of every file received.
    fn received(&self) -> BTreeMap<String, (String, String, Vec<u8>)> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|entry| {
                let bytes = std::fs::read(entry.unwrap().path()).unwrap();
                let meta = part10::read(&bytes).unwrap();
                let data = bytes[meta.data_set_offset..].to_vec();
                (
                    meta.sop_instance_uid,
                    (meta.sop_class_uid, meta.transfer_syntax_uid, data),
                )
            })
            .collect()
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn storescp_receives_every_object_of_one_association_unchanged() {
    let pacs = StoreScp::start("PACS");
    let mut objects = vec![
        object(
            CT,
            "1.2.826.0.1.3680043.8.498.1.1",
            EXPLICIT_LE,
            &dataset(CT, "1.2.826.0.1.3680043.8.498.1.1", "ZZTEST^One", 64),
        ),
        object(
            CT,
            "1.2.826.0.1.3680043.8.498.1.2",
            EXPLICIT_LE,
            &dataset(CT, "1.2.826.0.1.3680043.8.498.1.2", "ZZTEST^Two", 200_000),
        ),
        object(
            CT,
            "1.2.826.0.1.3680043.8.498.1.3",
            EXPLICIT_LE,
            &dataset(CT, "1.2.826.0.1.3680043.8.498.1.3", "ZZTEST^Three", 65_444),
        ),
        object(
            MR,
            "1.2.826.0.1.3680043.8.498.1.4",
            EXPLICIT_LE,
            &dataset(MR, "1.2.826.0.1.3680043.8.498.1.4", "ZZTEST^Four", 70_000),
        ),
        object(
            CT,
            "1.2.826.0.1.3680043.8.498.1.5",
            IMPLICIT_LE,
            &implicit_dataset(CT, "1.2.826.0.1.3680043.8.498.1.5", 40_000),
        ),
    ];
    // One object comes from a file, as the spool's export would give it.
    let file_dir = tempfile::tempdir().unwrap();
    let path = file_dir.path().join("object.dcm");
    let mut file = part10::header(CT, "1.2.826.0.1.3680043.8.498.1.6", EXPLICIT_LE).unwrap();
    file.extend(dataset(
        CT,
        "1.2.826.0.1.3680043.8.498.1.6",
        "ZZTEST^Six",
        5_000,
    ));
    std::fs::write(&path, &file).unwrap();
    objects.push(StoreObject::open(&path).await.unwrap());

    let refs: Vec<&StoreObject> = objects.iter().collect();
    let mut assoc = connect(pacs.addr(), "PACS", ScuSettings::default(), &refs)
        .await
        .unwrap();
    for o in &objects {
        assert_eq!(assoc.store(o).await.unwrap(), StoreOutcome::Success);
    }
    assert_eq!(assoc.delivered(), 6);
    assoc.release().await.unwrap();

    let received = pacs.received();
    assert_eq!(received.len(), objects.len(), "one file per object");
    for o in &objects {
        let m = o.meta();
        let (class, ts, data) = received
            .get(&m.sop_instance_uid)
            .unwrap_or_else(|| panic!("object {} not received", m.sop_instance_uid));
        assert_eq!((class, ts), (&m.sop_class_uid, &m.transfer_syntax_uid));
        assert!(
            data == o.data_set(),
            "data set of {} differs",
            m.sop_instance_uid
        );
    }
}

#[tokio::test]
async fn own_scp_stores_durably_and_refuses_per_object() {
    let gw = Gateway::default().await;
    let good: Vec<StoreObject> = (1..=3)
        .map(|i| {
            let uid = format!("1.2.826.0.1.3680043.8.498.2.{i}");
            object(
                CT,
                &uid,
                EXPLICIT_LE,
                &dataset(CT, &uid, "ZZTEST^Own", 30_000 * i),
            )
        })
        .collect();
    let unknown = object(
        UNKNOWN_CLASS,
        "1.2.826.0.1.3680043.8.498.2.9",
        EXPLICIT_LE,
        &dataset(
            UNKNOWN_CLASS,
            "1.2.826.0.1.3680043.8.498.2.9",
            "ZZTEST^Own",
            10,
        ),
    );
    // The file meta group names one instance, the data set another: the SCP answers A900.
    let mismatched = object(
        CT,
        "1.2.826.0.1.3680043.8.498.2.10",
        EXPLICIT_LE,
        &dataset(CT, "1.2.826.0.1.3680043.8.498.2.11", "ZZTEST^Own", 10),
    );
    let mut refs: Vec<&StoreObject> = good.iter().collect();
    refs.push(&unknown);
    let mut assoc = connect(gw.addr, "GATEWAY", quick(), &refs).await.unwrap();
    assert!(!assoc.accepts(&unknown.context()));

    let err = assoc.store(&unknown).await.unwrap_err();
    assert!(
        matches!(&err, ScuError::ContextNotAccepted { sop_class_uid, .. } if sop_class_uid == UNKNOWN_CLASS),
        "{err:?}"
    );
    assert!(!err.retryable());
    assert!(
        assoc.is_usable(),
        "a refused context leaves the association usable"
    );

    let err = assoc.store(&mismatched).await.unwrap_err();
    assert_eq!(err.status(), Some(0xA900), "{err:?}");
    assert!(!err.retryable());

    for o in &good {
        assert_eq!(assoc.store(o).await.unwrap(), StoreOutcome::Success);
    }
    assoc.release().await.unwrap();
    // Success came only after the spool commit: every object can be exported, unchanged.
    assert_eq!(gw.spool.status().unwrap().objects, 3);
    for o in &good {
        assert!(exported(&gw.spool, &o.meta().sop_instance_uid).ends_with(o.data_set()));
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn out_of_resources_is_a_retryable_failure_and_the_association_goes_on() {
    let gw = Gateway::start(
        |_| {},
        Limits {
            max_bytes: 150_000,
            min_free_bytes: 0,
        },
    )
    .await;
    let big = |i: u32| {
        let uid = format!("1.2.826.0.1.3680043.8.498.3.{i}");
        object(
            CT,
            &uid,
            EXPLICIT_LE,
            &dataset(CT, &uid, "ZZTEST^Full", 100_000),
        )
    };
    let (first, second) = (big(1), big(2));
    let mut assoc = connect(gw.addr, "GATEWAY", quick(), &[&first])
        .await
        .unwrap();
    assert_eq!(assoc.store(&first).await.unwrap(), StoreOutcome::Success);
    let err = assoc.store(&second).await.unwrap_err();
    assert!(
        matches!(err, ScuError::Failed { status: 0xA700, .. }),
        "{err:?}"
    );
    assert!(err.retryable());
    assert!(assoc.is_usable());
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn rejections_are_typed() {
    let gw = Gateway::default().await;
    let ct = object(
        CT,
        "1.2.826.0.1.3680043.8.498.4.1",
        EXPLICIT_LE,
        &dataset(CT, "1.2.826.0.1.3680043.8.498.4.1", "ZZ^R", 10),
    );
    let err = connect(gw.addr, "NOTME", quick(), &[&ct])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ScuError::Rejected { permanent: true, reason, .. } if reason.contains("CalledAETitleNotRecognized")),
        "{err:?}"
    );
    assert!(err.retryable());

    let unknown = object(
        UNKNOWN_CLASS,
        "1.2.826.0.1.3680043.8.498.4.2",
        EXPLICIT_LE,
        &dataset(UNKNOWN_CLASS, "1.2.826.0.1.3680043.8.498.4.2", "ZZ^R", 10),
    );
    let err = connect(gw.addr, "GATEWAY", quick(), &[&unknown])
        .await
        .unwrap_err();
    assert!(
        matches!(err, ScuError::NoContextAccepted { proposed: 1, .. }),
        "{err:?}"
    );
    assert!(!err.retryable());

    // Nothing listens on a port just released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = connect(closed, "PACS", quick(), &[&ct]).await.unwrap_err();
    assert!(matches!(err, ScuError::Connect { .. }), "{err:?}");
    assert!(err.retryable());

    let err = connect(gw.addr, "A_TITLE_TOO_LONG_X", quick(), &[&ct])
        .await
        .unwrap_err();
    assert!(matches!(err, ScuError::InvalidTarget { .. }), "{err:?}");
    gw.shutdown().await;
}

/// What a hand-made peer does once it has the association.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Accepts the TCP connection and never answers the A-ASSOCIATE-RQ.
    SilentAtAssociation,
    /// Accepts the association, reads everything, answers nothing.
    NeverResponds,
    /// Accepts the association, then reads nothing more.
    StopsReading,
    /// Closes the connection on the first P-DATA.
    ClosesMidway,
    /// Sends an A-ABORT once a data set is in.
    Aborts,
    /// Answers every C-STORE with this status (encoded by the SCP's own encoder).
    Answers(u16),
}

async fn misbehaving_peer(how: Misbehaviour) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        if let Misbehaviour::SilentAtAssociation = how {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
            return;
        }
        let mut assoc = ServerAssociationOptions::new()
            .accept_any()
            .with_abstract_syntax(CT)
            .establish_async(socket)
            .await
            .unwrap();
        if let Misbehaviour::StopsReading = how {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(assoc);
            return;
        }
        let mut command = None;
        loop {
            match assoc.receive().await {
                Ok(Pdu::PData { data }) => match how {
                    Misbehaviour::NeverResponds
                    | Misbehaviour::SilentAtAssociation
                    | Misbehaviour::StopsReading => {}
                    Misbehaviour::Answers(status) => {
                        for pdv in data {
                            if pdv.value_type == PDataValueType::Command {
                                let Ok(dimse::Request::Store(req)) = dimse::decode(&pdv.data)
                                else {
                                    panic!("not a C-STORE-RQ")
                                };
                                command = Some(req);
                            } else if pdv.is_last {
                                let req = command.take().expect("data set after a command");
                                let rsp = dimse::store_response(&req, status, None);
                                let pdu = Pdu::PData {
                                    data: vec![PDataValue {
                                        presentation_context_id: pdv.presentation_context_id,
                                        value_type: PDataValueType::Command,
                                        is_last: true,
                                        data: rsp,
                                    }],
                                };
                                assoc.send(&pdu).await.unwrap();
                            }
                        }
                    }
                    Misbehaviour::ClosesMidway => return,
                    Misbehaviour::Aborts => {
                        // Once the data set is in, an A-ABORT instead of the response,
                        // and the connection held open so that the A-ABORT is read.
                        if data
                            .iter()
                            .any(|pdv| pdv.is_last && pdv.value_type == PDataValueType::Data)
                        {
                            let abort = Pdu::AbortRQ {
                                source: AbortRQSource::ServiceProvider(
                                    AbortRQServiceProviderReason::ReasonNotSpecified,
                                ),
                            };
                            assoc.send(&abort).await.unwrap();
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            return;
                        }
                    }
                },
                _ => return,
            }
        }
    });
    addr
}

fn small_ct(i: u32) -> StoreObject {
    let uid = format!("1.2.826.0.1.3680043.8.498.5.{i}");
    object(CT, &uid, EXPLICIT_LE, &dataset(CT, &uid, "ZZ^Peer", 1000))
}

#[tokio::test]
async fn silent_peer_is_an_association_timeout_within_the_bound() {
    let addr = misbehaving_peer(Misbehaviour::SilentAtAssociation).await;
    let started = Instant::now();
    let err = connect(addr, "PACS", quick(), &[&small_ct(1)])
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, ScuError::AssociationTimeout { .. }),
        "{err:?}"
    );
    assert!(err.retryable());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "took {took:?}"
    );
}

#[tokio::test]
async fn missing_c_store_response_is_a_timeout_and_ends_the_association() {
    let addr = misbehaving_peer(Misbehaviour::NeverResponds).await;
    let o = small_ct(2);
    let mut assoc = connect(addr, "PACS", quick(), &[&o]).await.unwrap();
    let started = Instant::now();
    let err = assoc.store(&o).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, ScuError::ResponseTimeout { .. }), "{err:?}");
    assert!(err.retryable());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "took {took:?}"
    );
    assert!(!assoc.is_usable());
    let err = assoc.store(&o).await.unwrap_err();
    assert!(matches!(err, ScuError::Unusable { .. }), "{err:?}");
}

#[tokio::test]
async fn peer_that_stops_reading_is_a_send_timeout() {
    let addr = misbehaving_peer(Misbehaviour::StopsReading).await;
    // Far more than the loopback socket buffers hold.
    let uid = "1.2.826.0.1.3680043.8.498.5.20";
    let big = object(CT, uid, EXPLICIT_LE, &dataset(CT, uid, "ZZ^Big", 64 << 20));
    let mut assoc = connect(addr, "PACS", quick(), &[&big]).await.unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), assoc.store(&big))
        .await
        .expect("store returns once the peer stops reading")
        .unwrap_err();
    assert!(matches!(err, ScuError::SendTimeout { .. }), "{err:?}");
    assert!(err.retryable());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(!assoc.is_usable());
}

#[tokio::test]
async fn peer_closing_or_aborting_mid_association_is_typed() {
    let o = small_ct(3);
    let addr = misbehaving_peer(Misbehaviour::ClosesMidway).await;
    let mut assoc = connect(addr, "PACS", quick(), &[&o]).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), assoc.store(&o))
        .await
        .expect("store returns after the peer closed")
        .unwrap_err();
    assert!(matches!(err, ScuError::Closed { .. }), "{err:?}");
    assert!(err.retryable());
    assert!(!assoc.is_usable());

    let addr = misbehaving_peer(Misbehaviour::Aborts).await;
    let mut assoc = connect(addr, "PACS", quick(), &[&o]).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), assoc.store(&o))
        .await
        .expect("store returns after the peer aborted")
        .unwrap_err();
    assert!(matches!(err, ScuError::Aborted { .. }), "{err:?}");
    assert!(err.retryable());
}

#[tokio::test]
async fn warnings_are_delivered_and_failures_keep_the_association() {
    let addr = misbehaving_peer(Misbehaviour::Answers(0xB007)).await;
    let o = small_ct(4);
    let mut assoc = connect(addr, "PACS", quick(), &[&o]).await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            assoc.store(&o).await.unwrap(),
            StoreOutcome::Warning { status: 0xB007 }
        );
    }
    assert_eq!(assoc.delivered(), 2);
    assoc.abort().await;

    let addr = misbehaving_peer(Misbehaviour::Answers(0xC211)).await;
    let mut assoc = connect(addr, "PACS", quick(), &[&o]).await.unwrap();
    for _ in 0..2 {
        let err = assoc.store(&o).await.unwrap_err();
        assert!(
            matches!(err, ScuError::Failed { status: 0xC211, .. }),
            "{err:?}"
        );
        assert!(!err.retryable());
        assert!(assoc.is_usable());
    }
    assert_eq!(assoc.delivered(), 0);
    assoc.abort().await;
}

#[test]
fn contexts_are_proposed_once_per_class_and_transfer_syntax() {
    let a = small_ct(10);
    let b = small_ct(11);
    assert_eq!(a.context(), b.context());
    assert_eq!(
        a.context(),
        ObjectContext {
            sop_class_uid: CT.into(),
            transfer_syntax_uid: EXPLICIT_LE.into()
        }
    );
}

/// A software stand-in for the key store's device identity (P-256): the TLS client key is
/// used only through `gateway_tls`'s signer, as the TPM's is.
#[derive(Debug)]
struct SoftIdentity(rcgen::KeyPair);

impl gateway_keystore::DeviceIdentity for SoftIdentity {
    fn public_key(&self) -> Vec<u8> {
        rcgen::PublicKeyData::der_bytes(&self.0).to_vec()
    }

    fn sign_sha256(&self, message: &[u8]) -> Result<Vec<u8>, gateway_keystore::KeyStoreError> {
        Ok(rcgen::SigningKey::sign(&self.0, message).unwrap())
    }
}

/// A CA and certificates it issues, as PEM files in a temp dir.
struct TestCa {
    key: rcgen::KeyPair,
    params: rcgen::CertificateParams,
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Leaves get other subjects: a leaf named like its issuer looks self-signed.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test clinic CA");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ca.pem"),
            params.self_signed(&key).unwrap().pem(),
        )
        .unwrap();
        Self { key, params, dir }
    }

    fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `key` with subject alternative names `sans`, PEM.
    fn issue(&self, key: &rcgen::KeyPair, sans: &[&str]) -> String {
        let issuer = rcgen::Issuer::new(self.params.clone(), &self.key);
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            sans.first().copied().unwrap_or("leaf"),
        );
        params.signed_by(key, &issuer).unwrap().pem()
    }

    fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// DCMTK storescp in TLS (its default BCP 195 profile), requiring a client certificate from
/// the clinic CA; the gateway delivers with its device identity.
#[tokio::test]
async fn tls_delivery_with_the_device_identity_to_storescp_requiring_client_certificates() {
    let clinic = TestCa::new();
    let pacs_key = rcgen::KeyPair::generate().unwrap();
    let pacs_cert = clinic.write("pacs.pem", &clinic.issue(&pacs_key, &["127.0.0.1"]));
    let pacs_key_file = clinic.write("pacs.key", &pacs_key.serialize_pem());
    let ca = clinic.ca_file();
    let pacs = StoreScp::start_with(
        "PACS",
        &[
            "+tls".as_ref(),
            pacs_key_file.as_os_str(),
            pacs_cert.as_os_str(),
            "+cf".as_ref(),
            ca.as_os_str(),
            "--require-peer-cert".as_ref(),
        ],
    );
    let device_key = rcgen::KeyPair::generate().unwrap();
    let device_pem = clinic.issue(&device_key, &["gw-1.clinic.example"]);
    let device_chain = rustls_chain(&device_pem);
    let identity: std::sync::Arc<dyn gateway_keystore::DeviceIdentity> =
        std::sync::Arc::new(SoftIdentity(device_key));
    let config = gateway_tls::client_config(
        &ca,
        gateway_tls::ClientAuth::Identity {
            identity,
            chain: device_chain,
        },
    )
    .unwrap();
    let uid = "1.2.826.0.1.3680043.8.498.9.1";
    let o = object(
        CT,
        uid,
        EXPLICIT_LE,
        &dataset(CT, uid, "ZZTEST^Tls", 70_000),
    );
    let scu = Scu::new(target(pacs.addr(), "PACS"), ScuSettings::default())
        .with_tls(gateway_dicom::ScuTls { config });
    let mut link = scu.open([o.context()]).await.unwrap();
    assert!(matches!(link, gateway_dicom::ScuLink::Tls(_)));
    assert_eq!(link.store(&o).await.unwrap(), StoreOutcome::Success);
    link.release().await.unwrap();
    let received = pacs.received();
    assert!(
        received
            .get(uid)
            .is_some_and(|(_, _, data)| data == o.data_set())
    );

    // A client certificate from another CA: storescp refuses the handshake.
    let other = TestCa::new();
    let stranger_key = rcgen::KeyPair::generate().unwrap();
    let stranger_pem = other.issue(&stranger_key, &["gw-1.clinic.example"]);
    let config = gateway_tls::client_config(
        &ca,
        gateway_tls::ClientAuth::Identity {
            identity: std::sync::Arc::new(SoftIdentity(stranger_key)),
            chain: rustls_chain(&stranger_pem),
        },
    )
    .unwrap();
    let refused = Scu::new(target(pacs.addr(), "PACS"), quick())
        .with_tls(gateway_dicom::ScuTls { config })
        .open([o.context()])
        .await;
    assert!(
        refused.is_err(),
        "another CA's client certificate was accepted"
    );

    // A PACS whose certificate is not from the CA we were given: we refuse it.
    let key = rcgen::KeyPair::generate().unwrap();
    let config = gateway_tls::client_config(
        &other.ca_file(),
        gateway_tls::ClientAuth::Files {
            cert_file: clinic.write("device2.pem", &clinic.issue(&key, &["gw-1"])),
            key_file: clinic.write("device2.key", &key.serialize_pem()),
        },
    )
    .unwrap();
    let err = Scu::new(target(pacs.addr(), "PACS"), quick())
        .with_tls(gateway_dicom::ScuTls { config })
        .open([o.context()])
        .await
        .unwrap_err();
    assert!(matches!(err, ScuError::Connect { .. }), "{err}");
    assert_eq!(pacs.received().len(), 1, "nothing more arrived");
}

fn rustls_chain(pem: &str) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// The gateway's own SCP over TLS, driven by the SCU over TLS: the same statuses and the
/// spool as over TCP, and an allow-list entry with `tls_client_name` admitting only a
/// verified certificate carrying that name.
#[tokio::test]
async fn own_scp_over_tls_stores_and_matches_certificate_names() {
    let clinic = TestCa::new();
    let gw_key = rcgen::KeyPair::generate().unwrap();
    let gw_cert = clinic.write("gw.pem", &clinic.issue(&gw_key, &["127.0.0.1"]));
    let gw_key_file = clinic.write("gw.key", &gw_key.serialize_pem());
    let ca = clinic.ca_file();
    let server = gateway_tls::server_config(&gw_cert, &gw_key_file, Some(&ca)).unwrap();
    let gw = Gateway::start_tls(
        |p| {
            p.peers = vec![gateway_dicom::Peer {
                ae_title: "CLINICGW".into(),
                host: "127.0.0.1".parse().unwrap(),
                max_associations: None,
                tls_client_name: Some("ct01.clinic".into()),
            }];
        },
        server,
    )
    .await;
    let tls_addr = gw.tls_addr.unwrap();
    let client = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        gateway_dicom::ScuTls {
            config: gateway_tls::client_config(
                &ca,
                gateway_tls::ClientAuth::Files {
                    cert_file: clinic.write(&format!("{name}.pem"), &clinic.issue(&key, &[name])),
                    key_file: clinic.write(&format!("{name}.key"), &key.serialize_pem()),
                },
            )
            .unwrap(),
        }
    };
    let good: Vec<StoreObject> = (1..=3)
        .map(|i| {
            let uid = format!("1.2.826.0.1.3680043.8.498.3.{i}");
            object(
                CT,
                &uid,
                EXPLICIT_LE,
                &dataset(CT, &uid, "ZZTEST^Tls", 40_000 * i),
            )
        })
        .collect();
    let contexts = || good.iter().map(StoreObject::context);
    let mut link = Scu::new(target(tls_addr, "GATEWAY"), quick())
        .with_tls(client("ct01.clinic"))
        .open(contexts())
        .await
        .unwrap();
    for o in &good {
        assert_eq!(link.store(o).await.unwrap(), StoreOutcome::Success);
    }
    link.release().await.unwrap();
    assert_eq!(gw.spool.status().unwrap().objects, 3);

    // Same CA, another name: the allow list refuses (service user, calling AE title).
    let err = Scu::new(target(tls_addr, "GATEWAY"), quick())
        .with_tls(client("mr01.clinic"))
        .open(contexts())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ScuError::Rejected { permanent: true, reason, .. } if reason.contains("CallingAETitleNotRecognized")),
        "{err:?}"
    );
    // The same AE title and address over plain TCP has no certificate name.
    let err = connect(
        gw.addr,
        "GATEWAY",
        quick(),
        &good.iter().collect::<Vec<_>>(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ScuError::Rejected { .. }), "{err:?}");
    assert_eq!(gw.spool.status().unwrap().objects, 3);
    gw.shutdown().await;
}
