//! The bundle download against a real HTTPS server on 127.0.0.1 (rustls through
//! gateway-tls, client certificate required, HTTP Range): complete, resumed after the
//! connection is cut midway, a wrong hash, a body larger than the command's size, and a
//! client without a certificate.

#![allow(clippy::unwrap_used)] // test helpers: a failed assumption is a failed test

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_update::download::{DownloadSettings, download, http_client};
use gateway_update::{DownloadError, UpdatePaths};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "update test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        for (name, san, usage) in [
            (
                "server",
                "127.0.0.1",
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            ),
            (
                "client",
                "gateway.test",
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![san.to_string()]).unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, f: &str) -> std::path::PathBuf {
        self.dir.path().join(f)
    }

    fn client(&self) -> Arc<rustls::ClientConfig> {
        gateway_tls::client_config(
            &self.path("ca.pem"),
            gateway_tls::ClientAuth::Files {
                cert_file: self.path("client.pem"),
                key_file: self.path("client.key"),
            },
        )
        .unwrap()
    }
}

#[derive(Clone, Default)]
struct Plan {
    /// Per connection (in order): cut the body after this many bytes.
    cuts: Vec<usize>,
    /// Extra bytes appended to every body (a server sending more than announced size).
    extra: usize,
}

/// The server: serves `body` with Range support; records each request's Range start.
struct Server {
    port: u16,
    ranges: Arc<Mutex<Vec<Option<u64>>>>,
    handshakes_failed: Arc<Mutex<u32>>,
}

async fn serve(pki: &Pki, body: Vec<u8>, plan: Plan) -> Server {
    let config = gateway_tls::server_config(
        &pki.path("server.pem"),
        &pki.path("server.key"),
        Some(&pki.path("ca.pem")),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let handshakes_failed = Arc::new(Mutex::new(0));
    let (r, h) = (ranges.clone(), handshakes_failed.clone());
    let body = Arc::new(body);
    tokio::spawn(async move {
        let mut n = 0usize;
        // Bounded: a test never needs more than 20 connections.
        while n < 20 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                *h.lock().unwrap() += 1;
                continue;
            };
            let cut = plan.cuts.get(n).copied();
            n += 1;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let Ok(k) = tls.read(&mut buf).await else {
                    break;
                };
                if k == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..k]);
            }
            let text = String::from_utf8_lossy(&head).to_lowercase();
            let start = text
                .lines()
                .find_map(|l| l.strip_prefix("range: bytes="))
                .and_then(|v| v.trim().trim_end_matches('-').parse::<u64>().ok());
            r.lock().unwrap().push(start);
            let mut out = body[start.unwrap_or(0) as usize..].to_vec();
            out.extend(std::iter::repeat_n(b'x', plan.extra));
            let header = match start {
                Some(s) => format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {s}-{}/{}\r\nConnection: close\r\n\r\n",
                    out.len(),
                    body.len() - 1,
                    body.len()
                ),
                None => format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    out.len()
                ),
            };
            let _ = tls.write_all(header.as_bytes()).await;
            let send = cut.map_or(out.len(), |c| c.min(out.len()));
            let _ = tls.write_all(&out[..send]).await;
            let _ = tls.flush().await;
            if cut.is_some() {
                // A cut connection: no close_notify, just the socket going away.
                let (tcp, _) = tls.into_inner();
                drop(tcp);
            } else {
                let _ = tls.shutdown().await;
            }
        }
    });
    Server {
        port,
        ranges,
        handshakes_failed,
    }
}

fn bundle(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn settings(port: u16, body: &[u8]) -> DownloadSettings {
    DownloadSettings {
        url: format!("https://127.0.0.1:{port}/bundles/8.raucb"),
        size: body.len() as u64,
        sha256: sha2::Sha256::digest(body).into(),
        deadline: Duration::from_secs(30),
        max_attempts: 5,
        retry_wait: Duration::from_millis(50),
        pacer: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_cut_midway_resumes_with_range_and_verifies_the_whole_file() {
    let pki = Pki::new();
    let body = bundle(300_000);
    let server = serve(
        &pki,
        body.clone(),
        Plan {
            cuts: vec![100_000, 50_000],
            extra: 0,
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let paths = UpdatePaths::new(dir.path());
    let client = http_client(pki.client()).unwrap();
    download(&client, &paths, &settings(server.port, &body))
        .await
        .unwrap();
    assert_eq!(std::fs::read(paths.bundle()).unwrap(), body);
    assert!(!paths.part().exists());
    let ranges = server.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(ranges[0], None);
    // the resumes start where the partial file ended (at least what was received)
    let (r1, r2) = (ranges[1].unwrap(), ranges[2].unwrap());
    assert!(r1 > 0 && r1 <= 100_000, "{ranges:?}");
    assert!(r2 > r1 && r2 <= r1 + 50_000, "{ranges:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_file_from_before_a_restart_is_resumed_not_refetched() {
    let pki = Pki::new();
    let body = bundle(120_000);
    let server = serve(&pki, body.clone(), Plan::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let paths = UpdatePaths::new(dir.path());
    std::fs::create_dir_all(&paths.dir).unwrap();
    std::fs::write(paths.part(), &body[..70_000]).unwrap();
    let client = http_client(pki.client()).unwrap();
    download(&client, &paths, &settings(server.port, &body))
        .await
        .unwrap();
    assert_eq!(std::fs::read(paths.bundle()).unwrap(), body);
    assert_eq!(*server.ranges.lock().unwrap(), vec![Some(70_000)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_hash_is_hash_mismatch_and_leaves_no_bundle() {
    let pki = Pki::new();
    let body = bundle(50_000);
    let server = serve(&pki, body.clone(), Plan::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let paths = UpdatePaths::new(dir.path());
    let mut s = settings(server.port, &body);
    s.sha256 = [0u8; 32];
    let client = http_client(pki.client()).unwrap();
    let err = download(&client, &paths, &s).await.unwrap_err();
    assert!(matches!(err, DownloadError::HashMismatch), "{err}");
    assert_eq!(err.code(), "hash-mismatch");
    assert!(!paths.bundle().exists());
    assert!(
        !paths.part().exists(),
        "a mismatching file is not resumed later"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_the_commands_size_is_refused() {
    let pki = Pki::new();
    let body = bundle(40_000);
    let server = serve(
        &pki,
        body.clone(),
        Plan {
            cuts: vec![],
            extra: 10,
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let paths = UpdatePaths::new(dir.path());
    let client = http_client(pki.client()).unwrap();
    let err = download(&client, &paths, &settings(server.port, &body))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DownloadError::TooLarge { size: 40_000 }),
        "{err}"
    );
    assert_eq!(err.code(), "download-failed");
    assert!(!paths.bundle().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_device_certificate_is_refused_by_the_server() {
    let pki = Pki::new();
    let body = bundle(1000);
    let server = serve(&pki, body.clone(), Plan::default()).await;
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for c in gateway_tls::read_certs(&pki.path("ca.pem")).unwrap() {
            roots.add(c).unwrap();
        }
        roots
    };
    #[allow(clippy::disallowed_methods)] // a client the gateway never builds: no identity
    let anonymous = rustls::ClientConfig::builder_with_provider(gateway_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let dir = tempfile::tempdir().unwrap();
    let paths = UpdatePaths::new(dir.path());
    let client = http_client(Arc::new(anonymous)).unwrap();
    let mut s = settings(server.port, &body);
    s.max_attempts = 2;
    let err = download(&client, &paths, &s).await.unwrap_err();
    assert_eq!(err.code(), "download-failed", "{err}");
    assert!(*server.handshakes_failed.lock().unwrap() >= 1);
    assert!(!paths.bundle().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_download_keeps_to_the_pacer_rate() {
    let pki = Pki::new();
    let body = bundle(200_000);
    let server = serve(&pki, body.clone(), Plan::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let paths = UpdatePaths::new(dir.path());
    let mut s = settings(server.port, &body);
    s.pacer = Some(gateway_uplink::Pacer::new(400_000));
    let client = http_client(pki.client()).unwrap();
    let started = Instant::now();
    download(&client, &paths, &s).await.unwrap();
    // 200 kB at 400 kB/s: at least ~0.5 s (the first slice is free)
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}
