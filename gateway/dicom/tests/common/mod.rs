//! What the integration tests share: the gateway's SCP on 127.0.0.1:0 with a real spool
//! in a temp dir, and builders of small test data sets (no real patient data).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use gateway_dicom::{DicomService, DicomSettings, PolicySettings, TlsListenerSettings};
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_spool::{Limits, Spool};
use tokio::sync::watch;

pub struct Gateway {
    pub idle_timeout: Duration,
    pub addr: SocketAddr,
    /// The TLS listener's address, when started with one.
    pub tls_addr: Option<SocketAddr>,
    pub spool: Spool,
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    pub async fn start(policy: impl FnOnce(&mut PolicySettings), limits: Limits) -> Self {
        Self::start_with(policy, limits, Duration::from_secs(10)).await
    }

    pub async fn start_with(
        policy: impl FnOnce(&mut PolicySettings),
        limits: Limits,
        idle_timeout: Duration,
    ) -> Self {
        Self::start_full(policy, limits, idle_timeout, None).await
    }

    /// With a TLS listener on 127.0.0.1:0 using `config`.
    pub async fn start_tls(
        policy: impl FnOnce(&mut PolicySettings),
        config: std::sync::Arc<rustls::ServerConfig>,
    ) -> Self {
        let tls = TlsListenerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            config,
        };
        let limits = Limits {
            max_bytes: 1 << 40,
            min_free_bytes: 0,
        };
        Self::start_full(policy, limits, Duration::from_secs(10), Some(tls)).await
    }

    async fn start_full(
        policy: impl FnOnce(&mut PolicySettings),
        limits: Limits,
        idle_timeout: Duration,
        tls: Option<TlsListenerSettings>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(
            dir.path(),
            Some(MasterKey::from_bytes([3; KEY_LEN])),
            limits,
            vec![],
        )
        .unwrap();
        let mut p = PolicySettings {
            ae_title: "GATEWAY".into(),
            max_associations: 8,
            max_associations_per_peer: 8,
            peers: vec![],
        };
        policy(&mut p);
        let settings = DicomSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            policy: p,
            max_pdu_length: 16384,
            artim_timeout: Duration::from_secs(2),
            idle_timeout,
            shutdown_grace: Duration::from_secs(2),
            tls,
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let service = DicomService::bind(settings, spool.clone(), &mut registry)
            .await
            .unwrap();
        let addr = service.local_addr().unwrap();
        let tls_addr = service.local_tls_addr();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(service.run(rx));
        Self {
            idle_timeout,
            addr,
            tls_addr,
            spool,
            stop,
            task,
            _dir: dir,
        }
    }

    pub async fn default() -> Self {
        Self::start(
            |_| {},
            Limits {
                max_bytes: 1 << 40,
                min_free_bytes: 0,
            },
        )
        .await
    }

    pub async fn shutdown(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

pub fn element(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(tag.0.to_le_bytes());
    v.extend(tag.1.to_le_bytes());
    v.extend(vr);
    v.extend((value.len() as u16).to_le_bytes());
    v.extend(value);
    v
}

pub fn even(s: &str) -> Vec<u8> {
    let mut b = s.as_bytes().to_vec();
    if b.len() % 2 == 1 {
        b.push(0);
    }
    b
}

/// A small Explicit VR Little Endian CT data set.
pub fn dataset(class: &str, instance: &str, patient: &str, pixels: usize) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend(element((0x0008, 0x0016), b"UI", &even(class)));
    d.extend(element((0x0008, 0x0018), b"UI", &even(instance)));
    d.extend(element((0x0010, 0x0010), b"PN", &even(patient)));
    // Pixel Data, OW, long form.
    d.extend([0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0]);
    d.extend((pixels as u32).to_le_bytes());
    d.extend((0..pixels).map(|i| (i % 199) as u8));
    d
}

/// The Part 10 file the spool exports for `uid`.
pub fn exported(spool: &Spool, uid: &str) -> Vec<u8> {
    let mut out = Vec::new();
    spool.export(uid, &mut out).unwrap();
    out
}
