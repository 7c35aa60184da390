//! How `spool status` and opening the spool scale with the index: fills a spool with N
//! HL7 messages (default 1,000,000; groups of 1,000, as the MLLP listener stores them),
//! confirms every other one, then times `status` on the open spool and a reopen (which
//! counts every record once). Prints one line per measure and peak RSS.
//!
//!     cargo run --release -p gateway-spool --example status_scale -- [N] [DIR]
//!     cargo run --release -p gateway-spool --example status_scale -- reopen DIR
//!
//! DIR (default: a temp dir) should be on the disk the spool lives on. `reopen` times,
//! on a spool filled before, a bare scan of the index's records and then a whole open.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_spool::{Committed, Limits, MessageIn, ObjectKind, Route, Spool};

const GROUP: usize = 1_000;
const ROOMY: Limits = Limits {
    max_bytes: 1 << 40,
    min_free_bytes: 0,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, dir] = &args[..]
        && mode == "reopen"
    {
        return reopen(std::path::Path::new(dir));
    }
    let mut args = args.into_iter();
    let n: usize = args.next().map_or(1_000_000, |a| a.parse().expect("N"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = args
        .next()
        .map_or_else(|| tmp.path().to_path_buf(), Into::into);
    let limits = ROOMY;
    let routes = vec![Route::new("ris", ObjectKind::Hl7)];
    let key = || Some(MasterKey::from_bytes([7; KEY_LEN]));
    let spool = Spool::open(&dir, key(), limits, routes.clone()).unwrap();
    let started = Instant::now();
    for g in 0..n.div_ceil(GROUP) {
        let group: Vec<MessageIn> = (g * GROUP..((g + 1) * GROUP).min(n))
            .map(|i| MessageIn {
                key: format!("APP|FAC|{i}"),
                message_type: "ORU^R01".into(),
                charset: "ascii".into(),
                source: "127.0.0.1".into(),
                bytes: format!("MSH|^~\\&|APP|FAC|||20261207||ORU^R01|{i}|P|2.5\r").into_bytes(),
            })
            .collect();
        let ids: Vec<_> = spool
            .store_messages(&group)
            .into_iter()
            .filter_map(|r| match r.unwrap() {
                Committed::Stored(id) => Some(id),
                Committed::Duplicate(_) => None,
            })
            .collect();
        assert!(spool.settle(Duration::from_secs(60)));
        let sent: Vec<_> = ids.iter().step_by(2).copied().collect();
        spool.mark_sent_all(&sent, "ris").unwrap();
    }
    println!(
        "filled {n} records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let status = spool.status().unwrap();
        times.push(t.elapsed());
        assert_eq!(status.objects, n as u64);
    }
    times.sort();
    println!(
        "status on the open spool: median {:?}, max {:?}",
        times[2], times[4]
    );
    drop(spool);
    let t = Instant::now();
    let spool = Spool::open(&dir, key(), limits, routes).unwrap();
    println!("reopen (counts every record): {:?}", t.elapsed());
    let t = Instant::now();
    let status = spool.status().unwrap();
    println!(
        "status after reopen: {:?} ({} objects, {} queued)",
        t.elapsed(),
        status.objects,
        status.by_state["queued"]
    );
    let hwm = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ?")
        .to_string();
    println!("peak RSS {hwm}");
}

/// Times a bare scan of the index, then a whole [`Spool::open`] (journal replay and count).
fn reopen(dir: &std::path::Path) {
    let t = Instant::now();
    let index = gateway_spool::index::Index::open(
        &dir.join("spool/index"),
        gateway_spool::DEFAULT_INDEX_CACHE_BYTES,
    )
    .unwrap();
    let n = index.records().count();
    println!("index open + scan of {n} records: {:?}", t.elapsed());
    drop(index);
    let limits = ROOMY;
    let t = Instant::now();
    let routes = vec![Route::new("ris", ObjectKind::Hl7)];
    let spool = Spool::open(
        dir,
        Some(MasterKey::from_bytes([7; KEY_LEN])),
        limits,
        routes,
    )
    .unwrap();
    println!("whole open: {:?}", t.elapsed());
    drop(spool);
}
