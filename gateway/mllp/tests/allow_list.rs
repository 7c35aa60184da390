//! `[[hl7.peers]]` on a real socket (127.0.0.1:0): a sender not on the list gets AR with
//! ERR 103 and nothing is stored; the refusal is counted per message and audited once per
//! connection and reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gateway_audit::{Action, AuditKey, AuditLog, Outcome};
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_mllp::{Hl7Peer, Hl7Service, Hl7Settings, Metrics};
use gateway_spool::{Limits, Spool};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

fn message(app: &str, facility: &str, control: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|{app}|{facility}|GW|CL|20261201120000||ADT^A08^ADT_A01|{control}|P|2.5\r\
         EVN|A08\rPID|1||P1^^^HOSP^PI||ZZTEST^TARO\r"
    )
    .into_bytes()
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x0B];
    f.extend_from_slice(payload);
    f.extend_from_slice(&[0x1C, 0x0D]);
    f
}

/// Sends one message and reads its answer.
async fn request(s: &mut TcpStream, payload: &[u8]) -> String {
    s.write_all(&frame(payload)).await.unwrap();
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.iter().position(|&b| b == 0x1C) {
            let start = buf.iter().position(|&b| b == 0x0B).expect("start block");
            return String::from_utf8_lossy(&buf[start + 1..end]).into_owned();
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("answer within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "the gateway closed the connection instead of answering"
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn segment<'a>(ack: &'a str, name: &str) -> Vec<&'a str> {
    ack.split('\r')
        .find(|s| s.starts_with(&format!("{name}|")))
        .unwrap_or_else(|| panic!("no {name} in {ack:?}"))
        .split('|')
        .collect()
}

struct Gateway {
    addr: SocketAddr,
    spool: Spool,
    metrics: Metrics,
    audit_dir: tempfile::TempDir,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

fn audit_key() -> AuditKey {
    AuditKey::derive(&[9; 32])
}

async fn start(peers: Vec<Hl7Peer>) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let audit_dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(
        dir.path(),
        Some(MasterKey::from_bytes([7; KEY_LEN])),
        Limits {
            max_bytes: 1 << 40,
            min_free_bytes: 0,
        },
        vec![],
    )
    .unwrap();
    let mut settings = Hl7Settings::new("127.0.0.1:0".parse().unwrap());
    settings.shutdown_grace = Duration::from_secs(2);
    settings.peers = peers;
    let audit = AuditLog::open(audit_dir.path(), audit_key()).unwrap();
    let service = Hl7Service::bind(settings, spool.clone(), &mut Registry::default())
        .await
        .unwrap()
        .with_audit(Arc::new(audit));
    let addr = service.local_addr().unwrap();
    let metrics = service.metrics();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(service.run(rx));
    Gateway {
        addr,
        spool,
        metrics,
        audit_dir,
        _dir: dir,
        _shutdown: tx,
    }
}

fn peer(host: &str, app: Option<&str>, facility: Option<&str>) -> Hl7Peer {
    Hl7Peer {
        host: Some(host.parse().unwrap()),
        sending_application: app.map(Into::into),
        sending_facility: facility.map(Into::into),
        tls_client_name: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_sender_is_stored_and_wrong_facility_gets_ar_at_msh4_and_is_not_stored() {
    let g = start(vec![peer("127.0.0.1", Some("HIS"), Some("HOSP"))]).await;
    let mut s = TcpStream::connect(g.addr).await.unwrap();

    let ack = request(&mut s, &message("HIS^1.2.3^ISO", "HOSP", "OK1")).await;
    assert_eq!(segment(&ack, "MSA")[1..3], ["AA", "OK1"]);

    let ack = request(&mut s, &message("HIS", "OTHER", "BAD1")).await;
    assert_eq!(segment(&ack, "MSA")[1..3], ["AR", "BAD1"]);
    let err = segment(&ack, "ERR");
    assert_eq!(err[2], "MSH^1^4^^1", "ERR-2 points at MSH-4: {ack:?}");
    assert!(err[3].starts_with("103^"), "ERR-3 103: {ack:?}");
    assert_eq!(err[8], "sender not on this gateway's allow list");

    let ack = request(&mut s, &message("LIS", "HOSP", "BAD2")).await;
    assert_eq!(segment(&ack, "MSA")[1], "AR");
    assert_eq!(segment(&ack, "ERR")[2], "MSH^1^3^^1");

    assert_eq!(
        g.spool.status().unwrap().objects,
        1,
        "only the allowed message is stored"
    );
    let mut out = Vec::new();
    assert!(g.spool.export_message("HIS|OTHER|BAD1", &mut out).is_err());
    assert_eq!(g.metrics.refused_with("sending_facility"), 1);
    assert_eq!(g.metrics.refused_with("sending_application"), 1);
    assert_eq!(g.metrics.messages_with(&["AR"]), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_address_is_refused_counted_per_message_and_audited_once_per_connection() {
    let g = start(vec![peer("192.0.2.10", None, None)]).await;
    for connection in 0..2 {
        let mut s = TcpStream::connect(g.addr).await.unwrap();
        for i in 0..5 {
            let ack = request(
                &mut s,
                &message("HIS", "HOSP", &format!("C{connection}M{i}")),
            )
            .await;
            let msa = segment(&ack, "MSA");
            assert_eq!(msa[1], "AR", "{ack:?}");
            let err = segment(&ack, "ERR");
            assert_eq!(err[2], "", "an address refusal has no field location");
            assert!(err[3].starts_with("103^"));
        }
    }
    assert_eq!(g.spool.status().unwrap().objects, 0, "nothing stored");
    assert_eq!(g.metrics.refused_with("address"), 10);

    let log = AuditLog::open(g.audit_dir.path(), audit_key()).unwrap();
    let records = log.records().unwrap();
    assert_eq!(records.len(), 2, "one record per connection and reason");
    for r in &records {
        assert_eq!(r.action(), Action::Hl7SenderRefused);
        assert_eq!(r.outcome(), Outcome::Failure);
        assert_eq!(r.subject(), Some("peer:127.0.0.1"));
    }
    let report = gateway_audit::verify(g.audit_dir.path(), &audit_key()).unwrap();
    assert!(report.problem.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_without_application_or_facility_takes_any() {
    let g = start(vec![peer("127.0.0.1", None, None)]).await;
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    let ack = request(&mut s, &message("ANY", "WHERE", "ANY1")).await;
    assert_eq!(segment(&ack, "MSA")[1..3], ["AA", "ANY1"]);
    assert_eq!(g.spool.status().unwrap().objects, 1);
    assert_eq!(g.metrics.refused_with("address"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_message_from_an_unlisted_sender_gets_the_refusal_not_the_content_error() {
    let g = start(vec![peer("192.0.2.10", None, None)]).await;
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    // MSH-18 says UTF-8, the PID holds a byte that is not: AE with ERR 102 for a listed
    // sender (tests/listener.rs), the refusal for anyone else.
    let mut bad = b"MSH|^~\\&|HIS|HOSP|GW|CL|20261201120000||ADT^A08^ADT_A01|U1|P|2.5|||||JPN|UNICODE UTF-8\r\
                    PID|1||P1^^^HOSP^PI||ZZ"
        .to_vec();
    bad.extend_from_slice(&[0xFF, 0xFE, b'\r']);
    let ack = request(&mut s, &bad).await;
    assert_eq!(segment(&ack, "MSA")[1..3], ["AR", "U1"], "{ack:?}");
    assert!(segment(&ack, "ERR")[3].starts_with("103^"), "{ack:?}");
    assert_eq!(g.metrics.refused_with("address"), 1);
    assert_eq!(g.spool.status().unwrap().objects, 0);

    let listed = start(vec![peer("127.0.0.1", None, None)]).await;
    let mut s = TcpStream::connect(listed.addr).await.unwrap();
    let ack = request(&mut s, &bad).await;
    assert_eq!(segment(&ack, "MSA")[1], "AE", "{ack:?}");
    assert!(segment(&ack, "ERR")[3].starts_with("102^"), "{ack:?}");
}
