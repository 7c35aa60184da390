//! The HL7 listener's acknowledgements never wait on the booking ledger: the core's RIS
//! feed (SIU^S12 blocking a scanner's time) goes through the listener's observer channel to
//! `ris::run`, and only that task waits on the ledger service.
//!
//! Real pieces on 127.0.0.1:0: the MLLP listener with a spool in a temporary folder, a real
//! MLLP client socket, the ledger service and the RIS task. The ledger service is stalled
//! (created, not yet running: every request to it waits unanswered) while N SIU messages are
//! sent one after the other; each AA must come back within a bound. Then the service is
//! started and every slot must end up blocked.
//!
//! This test fails if the ledger is put back on the ACK path: if the listener called the
//! ledger (or waited for the observer to apply the message, or waited for room in the
//! observer queue with `send().await` instead of `try_send`), the first AAs (or the ones
//! after the queue filled) would wait for the stalled ledger and miss the bound. Checked by
//! temporarily making the listener wait for room (`send().await`) in a one-message queue:
//! the test failed with an AA missing the bound.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_booking::{Ledger, LedgerService, SealKey};
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_mllp::{Hl7Service, Hl7Settings, OBSERVER_QUEUE, Observer};
use gateway_spool::{Limits, Spool};
use jiff::Timestamp;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

/// SIU messages sent while the ledger is stalled.
const N: usize = 12;
/// Longest an AA may take (it needs one spool commit, a few milliseconds).
const BOUND: Duration = Duration::from_secs(3);

mod common;
use common::ct;

/// SIU^S12 number `i`: the RIS's appointment `A{i}` on CT01, the `i`-th half hour from 09:00
/// local time on 2027-01-12 (a Tuesday).
fn siu(i: usize) -> Vec<u8> {
    let minutes = 9 * 60 + 30 * i;
    let (h, m) = (minutes / 60, minutes % 60);
    let (eh, em) = ((minutes + 30) / 60, (minutes + 30) % 60);
    format!(
        "MSH|^~\\&|RIS|HOSP|GW|CORE|20270110120000||SIU^S12^SIU_S12|C{i}|P|2.5.1\r\
         SCH|A{i}^RIS||||||||||^^^20270112{h:02}{m:02}^20270112{eh:02}{em:02}\r\
         PID|1||ZZPID{i}||ZZTEST^TARO\r\
         RGS|1\r\
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

async fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    loop {
        if let Some(end) = buf.iter().position(|&b| b == 0x1C) {
            let start = buf.iter().position(|&b| b == 0x0B).expect("frame start");
            let text = String::from_utf8_lossy(&buf[start + 1..end]).into_owned();
            buf.drain(..(end + 2).min(buf.len()));
            return text;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the listener closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn ack_code(ack: &str) -> String {
    let msa = ack
        .split('\r')
        .find(|s| s.starts_with("MSA|"))
        .expect("MSA");
    msa.split('|').nth(1).unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siu_acks_do_not_wait_for_a_stalled_ledger_and_the_slots_are_blocked_once_it_runs() {
    let spool_dir = tempfile::tempdir().unwrap();
    let booking_dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(
        spool_dir.path(),
        Some(MasterKey::from_bytes([7; KEY_LEN])),
        Limits {
            max_bytes: 1 << 40,
            min_free_bytes: 0,
        },
        vec![],
    )
    .unwrap();
    let ledger = Ledger::open(
        booking_dir.path(),
        SealKey::derive(&MasterKey::from_bytes([9; KEY_LEN])),
    )
    .unwrap();
    // The ledger service exists but does not run yet: every request to it waits.
    let (stalled, ledger) = LedgerService::new(ledger, Arc::new(vec![ct()]));

    let (observer, observed) = Observer::channel(OBSERVER_QUEUE);
    let changed = Arc::new(Notify::new());
    tokio::spawn(gateway_regional::ris::run(
        observed,
        ledger.clone(),
        Arc::clone(&changed),
    ));
    let mut settings = Hl7Settings::new("127.0.0.1:0".parse().unwrap());
    settings.shutdown_grace = Duration::from_secs(1);
    let service = Hl7Service::bind(settings, spool, &mut Registry::default())
        .await
        .unwrap()
        .with_observer(observer);
    let addr = service.local_addr().unwrap();
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(service.run(shutdown));

    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..N {
        let sent = Instant::now();
        client.write_all(&frame(&siu(i))).await.unwrap();
        let ack = tokio::time::timeout(BOUND, read_frame(&mut client, &mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!("no AA for SIU {i} within {BOUND:?}: it waited on the ledger")
            });
        assert_eq!(ack_code(&ack), "AA", "SIU {i}: {ack}");
        assert!(sent.elapsed() < BOUND, "SIU {i}");
    }
    // Nothing reached the ledger's file while it was stalled.
    assert!(
        !booking_dir.path().join("ledger.sealed").exists(),
        "the ledger ran while it should have been stalled"
    );

    // Release the ledger: the queued SIUs are applied, every slot they name is blocked.
    stalled.spawn().unwrap();
    let now: Timestamp = "2027-01-11T00:00:00Z".parse().unwrap();
    let day: (Timestamp, Timestamp) = (
        "2027-01-12T00:00:00Z".parse().unwrap(),
        "2027-01-12T09:00:00Z".parse().unwrap(),
    );
    let blocked = |free: &[gateway_booking::Slot]| {
        (0..N)
            .filter(|i| {
                let minutes = 9 * 60 + 30 * i;
                let id = format!("ct-1.20270112T{:02}{:02}", minutes / 60, minutes % 60);
                !free.iter().any(|s| s.id == id)
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let free = ledger.free_slots("ct-1", day.0, day.1, now).await.unwrap();
        if blocked(&free) == N {
            // 16 half hours from 09:00 to 17:00; N of them are the hospital's.
            assert_eq!(free.len(), 16 - N);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {N} slots blocked after the ledger ran",
            blocked(&free)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(booking_dir.path().join("ledger.sealed").exists());
    let _ = shutdown_tx.send(true);
}
