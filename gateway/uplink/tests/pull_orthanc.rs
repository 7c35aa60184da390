//! The pull client against a real cloud archive: Orthanc with its DICOMweb plugin behind
//! nginx terminating mutual TLS (as hw-tests/mtls.py runs them), both started by the test
//! with their state in a temp dir and stopped by their PIDs at the end. A missing Orthanc,
//! DICOMweb plugin or nginx is a failure naming the package to install.
//!
//! Every server binds a port picked by binding 127.0.0.1:0; nginx listens on 127.0.0.1 only;
//! Orthanc binds 0.0.0.0 whatever it is told, so its ports are picked the same way and it
//! refuses remote access (`RemoteAccessAllowed: false`). The test's PKI is made with rcgen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway_uplink::UplinkSettings;
use gateway_uplink::pull::{InstanceRef, Piece, PullClient, PullError, PullLimits};

const DICOMWEB_PLUGIN: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";
const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn find_binary(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found (PATH, /usr/sbin): {install}"))
}

/// A child process killed (by its PID) and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// PEM files of one certificate and its key.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
}

struct Pki {
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_file: PathBuf,
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let ca_file = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_file, cert.pem()).unwrap();
        Self {
            ca: rcgen::Issuer::new(params, key),
            ca_file,
            dir: dir.to_path_buf(),
        }
    }

    fn issue(&self, name: &str, server: bool) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = if server {
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap()
        } else {
            rcgen::CertificateParams::default()
        };
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let issued = Issued {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }
}

/// Orthanc (plain HTTP on loopback) behind nginx (mutual TLS against `client_ca`).
struct Cloud {
    orthanc_url: String,
    dicomweb_url: String,
    nginx_access_log: PathBuf,
    http: reqwest::Client,
    // Dropped in this order: nginx, then Orthanc.
    _nginx: Proc,
    _orthanc: Proc,
}

impl Cloud {
    async fn start(dir: &Path, server: &Issued, client_ca: &Path) -> Self {
        let orthanc_bin = find_binary(
            "Orthanc",
            "apt-get install -y --no-install-recommends orthanc orthanc-dicomweb",
        );
        assert!(
            Path::new(DICOMWEB_PLUGIN).is_file(),
            "Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} missing: apt-get install -y orthanc-dicomweb"
        );
        let nginx_bin = find_binary("nginx", "apt-get install -y --no-install-recommends nginx");

        let odir = dir.join("orthanc");
        std::fs::create_dir_all(&odir).unwrap();
        let http_port = free_port();
        let mut dicom_port = free_port();
        while dicom_port == http_port {
            dicom_port = free_port();
        }
        let config = serde_json::json!({
            "Name": "uplink-pull-test",
            "StorageDirectory": odir.join("storage"),
            "IndexDirectory": odir.join("index"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "SslEnabled": false,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": true, "Root": "/dicom-web/"},
        });
        let config_path = odir.join("orthanc.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = std::fs::File::create(odir.join("orthanc.log")).unwrap();
        let orthanc = Proc(
            Command::new(orthanc_bin)
                .arg(&config_path)
                .current_dir(&odir)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("cannot start Orthanc"),
        );
        let orthanc_url = format!("http://127.0.0.1:{http_port}");
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{orthanc_url}/system")).send().await
                && r.status() == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Orthanc {orthanc_url}/system not 200 within 60 s; log:\n{}",
                std::fs::read_to_string(odir.join("orthanc.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let ndir = dir.join("nginx");
        for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(ndir.join("temp").join(sub)).unwrap();
        }
        let port = free_port();
        // As root the workers would switch to `nobody`, who cannot enter the 0700 temp dir.
        let user = if nix_is_root() {
            format!("user {};\n", whoami())
        } else {
            String::new()
        };
        let d = ndir.display();
        let conf = format!(
            "{user}daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               log_format mtls '$status client_verify=$ssl_client_verify \"$request\"';\n\
               access_log {d}/access.log mtls;\n\
               client_body_temp_path {d}/temp/client_body;\n proxy_temp_path {d}/temp/proxy;\n\
               fastcgi_temp_path {d}/temp/fastcgi;\n uwsgi_temp_path {d}/temp/uwsgi;\n scgi_temp_path {d}/temp/scgi;\n\
               server {{\n\
                 listen 127.0.0.1:{port} ssl;\n server_name 127.0.0.1;\n\
                 ssl_certificate {cert};\n ssl_certificate_key {key};\n ssl_protocols TLSv1.2 TLSv1.3;\n\
                 ssl_client_certificate {ca};\n ssl_verify_client on;\n ssl_verify_depth 2;\n\
                 location / {{\n proxy_pass http://127.0.0.1:{http_port};\n proxy_http_version 1.1;\n\
                   proxy_set_header Host 127.0.0.1:{http_port};\n }}\n\
               }}\n\
             }}\n",
            cert = server.cert.display(),
            key = server.key.display(),
            ca = client_ca.display(),
        );
        let conf_path = ndir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let error_log = ndir.join("error.log");
        let args = |extra: &[&str]| {
            let mut c = Command::new(&nginx_bin);
            c.arg("-p")
                .arg(&ndir)
                .arg("-e")
                .arg(&error_log)
                .arg("-c")
                .arg(&conf_path)
                .args(extra)
                .stdin(Stdio::null());
            c
        };
        let check = args(&["-t"]).output().expect("cannot run nginx -t");
        assert!(
            check.status.success(),
            "nginx -t refused the config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let nginx = Proc(
            args(&[])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start nginx"),
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx not listening on 127.0.0.1:{port} within 15 s: {}",
                std::fs::read_to_string(&error_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            orthanc_url,
            dicomweb_url: format!("https://127.0.0.1:{port}/dicom-web"),
            nginx_access_log: ndir.join("access.log"),
            http,
            _nginx: nginx,
            _orthanc: orthanc,
        }
    }

    /// Stores a Part 10 file through Orthanc's REST API (loopback, no TLS).
    async fn store(&self, file: &[u8]) {
        let r = self
            .http
            .post(format!("{}/instances", self.orthanc_url))
            .body(file.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// The archive's own copy of an instance (`/instances/{id}/file`).
    async fn stored_file(&self, sop_instance_uid: &str) -> Vec<u8> {
        let r = self
            .http
            .post(format!("{}/tools/lookup", self.orthanc_url))
            .body(sop_instance_uid.to_string())
            .send()
            .await
            .unwrap();
        let hits: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let id = hits[0]["ID"].as_str().unwrap().to_string();
        self.http
            .get(format!("{}/instances/{id}/file", self.orthanc_url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec()
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(&self.nginx_access_log).unwrap_or_default()
    }

    /// The access log once `ready` holds for it (nginx writes a request's line after
    /// answering it), or as it is after 5 s.
    async fn access_log_when(&self, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.access_log();
            if ready(&log) || Instant::now() > deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn whoami() -> String {
    let o = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// One explicit VR little endian element (`value` padded to even length with `pad`).
fn element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8], pad: u8) {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(pad);
    }
    out.extend(group.to_le_bytes());
    out.extend(elem.to_le_bytes());
    out.extend(vr);
    if matches!(vr, b"OW" | b"OB" | b"SQ" | b"UN" | b"UT") {
        out.extend([0, 0]);
        out.extend((v.len() as u32).to_le_bytes());
    } else {
        out.extend((v.len() as u16).to_le_bytes());
    }
    out.extend(v);
}

/// A CT image Part 10 file of `rows` x `rows` 16-bit pixels.
fn ct_file(study: &str, series: &str, sop: &str, number: u32, rows: u16) -> Vec<u8> {
    let meta = dicom_object::FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(CT_IMAGE_STORAGE)
        .media_storage_sop_instance_uid(sop)
        .transfer_syntax(EXPLICIT_VR_LE)
        .implementation_class_uid("2.25.310057779101572763035698445821700708640")
        .build()
        .unwrap();
    let mut f = vec![0u8; 128];
    f.extend_from_slice(b"DICM");
    meta.write(&mut f).unwrap();
    let us = |v: u16| v.to_le_bytes();
    element(
        &mut f,
        0x0008,
        0x0016,
        b"UI",
        CT_IMAGE_STORAGE.as_bytes(),
        0,
    );
    element(&mut f, 0x0008, 0x0018, b"UI", sop.as_bytes(), 0);
    element(&mut f, 0x0008, 0x0050, b"SH", b"ACC-PULL-1", b' ');
    element(&mut f, 0x0008, 0x0060, b"CS", b"CT", b' ');
    element(&mut f, 0x0010, 0x0010, b"PN", b"PULL^TEST", b' ');
    element(&mut f, 0x0010, 0x0020, b"LO", b"PULL-0001", b' ');
    element(&mut f, 0x0020, 0x000D, b"UI", study.as_bytes(), 0);
    element(&mut f, 0x0020, 0x000E, b"UI", series.as_bytes(), 0);
    element(
        &mut f,
        0x0020,
        0x0013,
        b"IS",
        number.to_string().as_bytes(),
        b' ',
    );
    element(&mut f, 0x0028, 0x0002, b"US", &us(1), 0);
    element(&mut f, 0x0028, 0x0004, b"CS", b"MONOCHROME2", b' ');
    element(&mut f, 0x0028, 0x0010, b"US", &us(rows), 0);
    element(&mut f, 0x0028, 0x0011, b"US", &us(rows), 0);
    element(&mut f, 0x0028, 0x0100, b"US", &us(16), 0);
    element(&mut f, 0x0028, 0x0101, b"US", &us(16), 0);
    element(&mut f, 0x0028, 0x0102, b"US", &us(15), 0);
    element(&mut f, 0x0028, 0x0103, b"US", &us(0), 0);
    let pixels: Vec<u8> = (0..usize::from(rows) * usize::from(rows) * 2)
        .map(|i| ((i * 7 + usize::try_from(number).unwrap()) % 253) as u8)
        .collect();
    element(&mut f, 0x7FE0, 0x0010, b"OW", &pixels, 0);
    f
}

fn settings(cloud: &Cloud, ca_file: &Path, client: &Issued) -> UplinkSettings {
    let tls = gateway_tls::client_config(
        ca_file,
        gateway_tls::ClientAuth::Files {
            cert_file: client.cert.clone(),
            key_file: client.key.clone(),
        },
    )
    .unwrap();
    let mut s = UplinkSettings::new("cloud".into(), cloud.dicomweb_url.clone(), Some(tls));
    s.max_concurrent_requests = 3;
    s.request_timeout = Duration::from_secs(60);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_is_listed_and_retrieved_byte_identical_over_mutual_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "cloud-ca");
    let server = pki.issue("ingress", true);
    let client = pki.issue("clinic-gw", false);
    let cloud = Cloud::start(tmp.path(), &server, &pki.ca_file).await;

    // A study of 7 CT instances in 2 series, of mixed sizes (8 KiB to 512 KiB of pixels), and
    // another study that must not be listed with it.
    let study = "1.2.826.0.1.3680043.10.1234.1";
    let mut sent = BTreeMap::new();
    for i in 0..7u32 {
        let series = format!("{study}.{}", 1 + i % 2);
        let sop = format!("{series}.{}", 100 + i);
        let rows = [64, 256, 512, 128, 512, 96, 300][i as usize];
        let file = ct_file(study, &series, &sop, i, rows);
        cloud.store(&file).await;
        sent.insert(sop, (series, file));
    }
    let other = "1.2.826.0.1.3680043.10.1234.2";
    cloud
        .store(&ct_file(
            other,
            "1.2.826.0.1.3680043.10.1234.2.1",
            "1.2.826.0.1.3680043.10.1234.2.1.1",
            9,
            64,
        ))
        .await;

    // Pages of 3: the listing takes 3 requests.
    let limits = PullLimits {
        page_size: 3,
        ..PullLimits::default()
    };
    let pull = PullClient::new(&settings(&cloud, &pki.ca_file, &client), limits).unwrap();
    let listed = pull.instances_of_study(study).await.unwrap();

    let listed_set: BTreeSet<_> = listed.iter().map(|r| r.sop_instance_uid.clone()).collect();
    assert_eq!(listed.len(), 7, "{listed:?}");
    assert_eq!(listed_set, sent.keys().cloned().collect::<BTreeSet<_>>());
    for r in &listed {
        assert_eq!(r.study_uid, study);
        assert_eq!(r.series_uid, sent[&r.sop_instance_uid].0);
    }
    // Pages at offsets 0, 3 and 6 (the last one short).
    let log = cloud
        .access_log_when(|log| {
            log.lines()
                .filter(|l| l.contains("/instances?limit=3&offset="))
                .count()
                == 3
        })
        .await;
    assert!(log.contains("offset=6 "), "{log}");

    // The whole study into a folder: every file is the archive's Part 10 object, byte for byte.
    let dir = tmp.path().join("pulled");
    std::fs::create_dir_all(&dir).unwrap();
    let report = pull.pull_study(study, &dir).await.unwrap();
    assert_eq!((report.listed, report.retrieved, report.skipped), (7, 7, 0));
    for (sop, (_, file)) in &sent {
        let got = std::fs::read(dir.join(format!("{sop}.dcm"))).unwrap();
        assert!(
            got == *file,
            "{sop}: retrieved file differs from the one stored"
        );
        assert!(
            got == cloud.stored_file(sop).await,
            "{sop}: retrieved file differs from the archive's copy"
        );
    }
    let names: BTreeSet<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 7, "no .partial left behind: {names:?}");

    // Resuming: only the missing instances are fetched again.
    let gone: Vec<_> = sent.keys().take(2).cloned().collect();
    for sop in &gone {
        std::fs::remove_file(dir.join(format!("{sop}.dcm"))).unwrap();
    }
    let wado_before = wado_gets(&cloud.access_log_when(|l| wado_gets(l) == 7).await);
    let report = pull.pull_study(study, &dir).await.unwrap();
    assert_eq!((report.listed, report.retrieved, report.skipped), (7, 2, 5));
    assert_eq!(wado_before, 7);
    let log = cloud.access_log_when(|l| wado_gets(l) > 9).await;
    assert_eq!(wado_gets(&log), 9, "{log}");
    for sop in &gone {
        assert!(std::fs::read(dir.join(format!("{sop}.dcm"))).unwrap() == sent[sop].1);
    }

    // Streamed to a channel (the results path into the spool): the same bytes, then Done;
    // a missing instance ends without Done.
    for (sop, (series, file)) in sent.iter().take(3) {
        let r = InstanceRef {
            study_uid: study.into(),
            series_uid: series.clone(),
            sop_instance_uid: sop.clone(),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let collect = tokio::spawn(async move {
            let (mut bytes, mut done) = (Vec::new(), false);
            while let Some(piece) = rx.recv().await {
                match piece {
                    Piece::Bytes(b) => {
                        assert!(!done, "bytes after Done");
                        bytes.extend_from_slice(&b);
                    }
                    Piece::Done => done = true,
                }
            }
            (bytes, done)
        });
        let n = pull.retrieve_into(&r, &tx).await.unwrap();
        drop(tx);
        let (bytes, done) = collect.await.unwrap();
        assert!(done, "{sop}: no Done");
        assert_eq!(n as usize, file.len());
        assert!(
            bytes == *file,
            "{sop}: streamed bytes differ from the stored file"
        );
    }
    {
        let r = InstanceRef {
            study_uid: study.into(),
            series_uid: format!("{study}.1"),
            sop_instance_uid: format!("{study}.1.998"),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let e = pull.retrieve_into(&r, &tx).await.unwrap_err();
        assert!(matches!(e, PullError::Status { status: 404, .. }), "{e}");
        drop(tx);
        while let Some(piece) = rx.recv().await {
            assert!(
                !matches!(piece, Piece::Done),
                "Done after a failed retrieval"
            );
        }
    }

    // An instance the archive does not have: HTTP 404, and no file.
    let missing = InstanceRef {
        study_uid: study.into(),
        series_uid: format!("{study}.1"),
        sop_instance_uid: format!("{study}.1.999"),
    };
    let dest = dir.join("missing.dcm");
    let e = pull.retrieve_instance(&missing, &dest).await.unwrap_err();
    assert!(matches!(e, PullError::Status { status: 404, .. }), "{e}");
    assert!(!dest.exists());
    assert!(!dir.join("missing.dcm.partial").exists());
    // A study the archive does not have lists nothing.
    let none = pull.instances_of_study("1.2.3.4.5.6.7").await.unwrap();
    assert!(none.is_empty());

    // The errors name no UID.
    assert!(!e.to_string().contains(study), "{e}");

    // The bounds hold against the real archive: instances per study, bytes per QIDO page,
    // bytes per retrieved part (and a refused retrieval leaves no file).
    let s = settings(&cloud, &pki.ca_file, &client);
    let bounded = |limits| PullClient::new(&s, limits).unwrap();
    let e = bounded(PullLimits {
        page_size: 3,
        max_instances: 5,
        ..PullLimits::default()
    })
    .instances_of_study(study)
    .await
    .unwrap_err();
    assert!(
        matches!(e, PullError::TooManyInstances { limit: 5, .. }),
        "{e}"
    );
    let e = bounded(PullLimits {
        max_page_bytes: 1000,
        ..PullLimits::default()
    })
    .instances_of_study(study)
    .await
    .unwrap_err();
    assert!(
        matches!(e, PullError::ResponseTooLarge { limit: 1000, .. }),
        "{e}"
    );
    let mut small = PullLimits::default();
    small.multipart.max_part_bytes = 100_000;
    let big = listed
        .iter()
        .find(|r| sent[&r.sop_instance_uid].1.len() > 500_000)
        .unwrap();
    let dest = dir.join("big.dcm");
    let e = bounded(small)
        .retrieve_instance(big, &dest)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            PullError::Multipart {
                source: gateway_uplink::multipart::MultipartError::PartTooLarge { limit: 100_000 },
                ..
            }
        ),
        "{e}"
    );
    assert!(!dest.exists());
    assert!(!dir.join("big.dcm.partial").exists());
}

/// WADO-RS instance retrievals answered 200 in an access log.
fn wado_gets(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.starts_with("200 ") && l.contains("GET /dicom-web/studies/") && l.contains("/series/")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_certificate_gets_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "cloud-ca");
    let server = pki.issue("ingress", true);
    let cloud = Cloud::start(tmp.path(), &server, &pki.ca_file).await;
    let study = "1.2.826.0.1.3680043.10.1234.3";
    cloud
        .store(&ct_file(
            study,
            &format!("{study}.1"),
            &format!("{study}.1.1"),
            1,
            64,
        ))
        .await;

    // A client certificate from a CA the cloud does not trust: nginx finishes the handshake
    // and refuses the request (HTTP 400, client_verify=FAILED); nothing reaches Orthanc.
    let stranger = Pki::new(tmp.path(), "stranger-ca");
    let bad_client = stranger.issue("stranger-gw", false);
    let pull = PullClient::new(
        &settings(&cloud, &pki.ca_file, &bad_client),
        PullLimits::default(),
    )
    .unwrap();
    let e = pull.instances_of_study(study).await.unwrap_err();
    assert!(
        matches!(
            e,
            PullError::Status {
                status: 400,
                request: "QIDO-RS",
                ..
            }
        ),
        "{e}"
    );
    let log = cloud.access_log_when(|l| !l.is_empty()).await;
    assert!(
        !log.is_empty()
            && log
                .lines()
                .all(|l| l.starts_with("400 client_verify=FAILED")),
        "{log}"
    );
    let r = InstanceRef {
        study_uid: study.into(),
        series_uid: format!("{study}.1"),
        sop_instance_uid: format!("{study}.1.1"),
    };
    let dest = tmp.path().join("x.dcm");
    let e = pull.retrieve_instance(&r, &dest).await.unwrap_err();
    assert!(matches!(e, PullError::Status { status: 400, .. }), "{e}");
    assert!(!dest.exists());

    // A cloud whose server certificate the box does not trust: the TLS handshake fails
    // (a typed transport error whose text says why), before any request is sent.
    let good_client = pki.issue("clinic-gw", false);
    let pull = PullClient::new(
        &settings(&cloud, &stranger.ca_file, &good_client),
        PullLimits::default(),
    )
    .unwrap();
    let before = cloud
        .access_log_when(|l| l.lines().count() == 2)
        .await
        .lines()
        .count();
    assert_eq!(before, 2);
    let e = pull.instances_of_study(study).await.unwrap_err();
    assert!(matches!(e, PullError::Send { .. }), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    assert!(!e.to_string().contains(study), "{e}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cloud.access_log().lines().count(), before);
}
