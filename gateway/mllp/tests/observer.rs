//! The listener's observer channel on 127.0.0.1:0: every durable message reaches the
//! observer, an observer that does not keep up never delays an AA, and what does not fit in
//! its queue is counted (`gateway_hl7_observer_dropped_total{reason="full"}`), not lost
//! silently.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_mllp::{Hl7Service, Hl7Settings, Observer};
use gateway_spool::{Limits, Spool};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

fn siu(control: usize) -> Vec<u8> {
    format!(
        "MSH|^~\\&|RIS|HOSP|GW|CORE|20270110120000||SIU^S12^SIU_S12|C{control}|P|2.5.1\r\
         SCH|A{control}^RIS||||||||||^^^202701121000^202701121030\r\
         PID|1||ZZPID1||ZZTEST^TARO\r\
         AIG|1||CT01^^L\r"
    )
    .into_bytes()
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x0B];
    f.extend_from_slice(payload);
    f.extend_from_slice(&[0x1C, 0x0D]);
    f
}

async fn read_ack(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    loop {
        if let Some(end) = buf.iter().position(|&b| b == 0x1C) {
            let text = String::from_utf8_lossy(&buf[1..end]).into_owned();
            buf.drain(..(end + 2).min(buf.len()));
            return text;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("an ACK within 5 s")
            .unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn metric(registry: &Registry, name_and_labels: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_observer_queue_never_delays_an_aa_and_every_drop_is_counted() {
    let dir = tempfile::tempdir().unwrap();
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
    // Room for two messages and a consumer that reads nothing until the end.
    let (observer, mut observed) = Observer::channel(2);
    let mut registry = Registry::default();
    let service = Hl7Service::bind(
        Hl7Settings::new("127.0.0.1:0".parse().unwrap()),
        spool,
        &mut registry,
    )
    .await
    .unwrap()
    .with_observer(observer);
    let addr = service.local_addr().unwrap();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let running = tokio::spawn(service.run(shutdown));

    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..5 {
        client.write_all(&frame(&siu(i))).await.unwrap();
        let ack = read_ack(&mut client, &mut buf).await;
        assert!(ack.contains("MSA|AA|"), "message {i}: {ack}");
    }
    // The first two were handed over in order, as decoded text with their type.
    let first = observed.recv().await.unwrap();
    assert_eq!(first.message_type(), "SIU^S12");
    assert!(first.text().contains("|C0|"));
    assert!(observed.recv().await.unwrap().text().contains("|C1|"));
    assert!(observed.try_recv().is_err(), "only two fitted");
    drop(client);
    let _ = shutdown_tx.send(true);
    running.await.unwrap();
    // The other three were stored and acknowledged, and counted as dropped.
    assert_eq!(
        metric(
            &registry,
            "gateway_hl7_observer_dropped_total{reason=\"full\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(&registry, "gateway_hl7_messages_total{ack=\"AA\"}"),
        5.0
    );
}
