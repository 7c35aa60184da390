//! The MLLP listener on 127.0.0.1:0 with a spool in a temporary folder.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_mllp::{Hl7Service, Hl7Settings};
use gateway_spool::{Limits, Spool};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

fn message(control: &str, accept_ack: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|HIS|HOSP|GW|CL|20261201120000||ADT^A08^ADT_A01|{control}|P|2.5|||{accept_ack}\r\
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

async fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.iter().position(|&b| b == 0x1C) {
            let start = buf.iter().position(|&b| b == 0x0B)?;
            let text = String::from_utf8_lossy(&buf[start + 1..end]).into_owned();
            let mut cut = end + 1;
            if buf.get(cut) == Some(&0x0D) {
                cut += 1;
            }
            buf.drain(..cut);
            return Some(text);
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("answer within 10 s")
            .unwrap();
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn msa(ack: &str) -> (String, String) {
    let seg = ack
        .split('\r')
        .find(|s| s.starts_with("MSA|"))
        .expect("MSA");
    let f: Vec<&str> = seg.split('|').collect();
    (f[1].to_string(), f.get(2).unwrap_or(&"").to_string())
}

async fn start(dir: &std::path::Path) -> (SocketAddr, Spool, watch::Sender<bool>) {
    let spool = Spool::open(
        dir,
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
    let service = Hl7Service::bind(settings, spool.clone(), &mut Registry::default())
        .await
        .unwrap();
    let addr = service.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(service.run(rx));
    (addr, spool, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pipelined_senders_each_get_their_own_acks_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, spool, shutdown) = start(dir.path()).await;
    let mut tasks = Vec::new();
    for sender in 0..6 {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut all = Vec::new();
            for i in 0..20 {
                all.extend(frame(&message(&format!("S{sender}M{i}"), "")));
            }
            s.write_all(&all).await.unwrap();
            let mut buf = Vec::new();
            for i in 0..20 {
                let ack = read_frame(&mut s, &mut buf).await.expect("an answer");
                assert_eq!(msa(&ack), ("AA".into(), format!("S{sender}M{i}")));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(spool.status().unwrap().objects, 120);
    let mut out = Vec::new();
    spool.export_message("HIS|HOSP|S3M7", &mut out).unwrap();
    assert_eq!(out, message("S3M7", ""));
    shutdown.send(true).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_mode_and_duplicates_and_bad_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, spool, shutdown) = start(dir.path()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(&frame(&message("E1", "AL"))).await.unwrap();
    assert_eq!(msa(&read_frame(&mut s, &mut buf).await.unwrap()).0, "CA");
    // NE: stored, not acknowledged; the next message's answer comes first.
    s.write_all(&frame(&message("E2", "NE"))).await.unwrap();
    s.write_all(&frame(&message("E3", ""))).await.unwrap();
    assert_eq!(
        msa(&read_frame(&mut s, &mut buf).await.unwrap()),
        ("AA".into(), "E3".into())
    );
    // The same MSH-10 again: the same answer, no second copy.
    s.write_all(&frame(&message("E3", ""))).await.unwrap();
    assert_eq!(
        msa(&read_frame(&mut s, &mut buf).await.unwrap()),
        ("AA".into(), "E3".into())
    );
    // Not a message: a reject without MSA-2; the connection stays usable.
    s.write_all(&frame(b"garbage without header"))
        .await
        .unwrap();
    assert_eq!(
        msa(&read_frame(&mut s, &mut buf).await.unwrap()),
        ("AR".into(), String::new())
    );
    s.write_all(&frame(&message("E4", ""))).await.unwrap();
    assert_eq!(msa(&read_frame(&mut s, &mut buf).await.unwrap()).0, "AA");
    assert_eq!(spool.status().unwrap().objects, 4);
    shutdown.send(true).unwrap();
    // Shutdown closes the idle connection.
    assert_eq!(read_frame(&mut s, &mut buf).await, None);
}
