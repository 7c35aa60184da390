//! How much anonymous memory (heap) sled 0.34 keeps per record, and whether its
//! `cache_capacity` bounds it: the question behind the spool index's memory in the soak
//! (BENCHMARKS.md, "Soak").
//!
//! Inserts `records` rounds of one record into each of `trees` trees, with random 32-byte
//! keys and 120-byte values (`VALUE_LEN` in the environment changes it), in sled's
//! high-throughput mode as the spool opens it, flushing every 500 rounds (`FLUSH_EVERY`). With
//! `keep`, the oldest records are removed so that at most `keep` per tree stay, as the
//! spool prunes after `spool.dedupe_window` (their keys, 32 bytes each, are held here and
//! count in the RSS). With `updates`, each record is written again that many times, 64
//! rounds apart. Prints RssAnon and sled's size on disk ten times.
//!
//! `sled-memory CACHE_BYTES RECORDS TREES [KEEP [UPDATES]]` (KEEP 0: no pruning)

use std::collections::VecDeque;
use std::error::Error;

/// Rounds between an insert and each rewrite of the same record.
const LAG: u64 = 64;

fn rss_anon_kib() -> Result<u64, Box<dyn Error>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .ok_or("no RssAnon in /proc/self/status")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .ok_or("RssAnon without a value")?;
    Ok(kib.parse()?)
}

/// Argument `i` as a number; `None` when absent (only the optional ones may be).
fn arg(args: &[String], i: usize, name: &str) -> Result<Option<u64>, Box<dyn Error>> {
    args.get(i)
        .map(|raw| {
            raw.parse()
                .map_err(|e| format!("{name} {raw:?}: {e}").into())
        })
        .transpose()
}

fn required(args: &[String], i: usize, name: &str) -> Result<u64, Box<dyn Error>> {
    let usage = "usage: sled-memory CACHE_BYTES RECORDS TREES [KEEP [UPDATES]]";
    arg(args, i, name)?.ok_or_else(|| format!("{usage}: {name} missing").into())
}

/// A number from the environment, or `default` when unset.
fn env_or(name: &str, default: u64) -> Result<u64, Box<dyn Error>> {
    match std::env::var(name) {
        Ok(raw) => Ok(raw.parse().map_err(|e| format!("{name}={raw:?}: {e}"))?),
        Err(_) => Ok(default),
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let cache = required(&args, 1, "CACHE_BYTES")?;
    let records = required(&args, 2, "RECORDS")?.max(10);
    let trees = required(&args, 3, "TREES")?.max(1);
    let keep = match arg(&args, 4, "KEEP")? {
        None | Some(0) => u64::MAX,
        Some(n) => n,
    };
    let updates = arg(&args, 5, "UPDATES")?.unwrap_or(0);
    let value = vec![7u8; usize::try_from(env_or("VALUE_LEN", 120)?)?];
    let rewritten = vec![8u8; value.len()];
    let flush_every = env_or("FLUSH_EVERY", 500)?.max(1);
    let dir = std::env::temp_dir().join(format!("sled-memory-{}", std::process::id()));
    let db = sled::Config::new()
        .path(&dir)
        .mode(sled::Mode::HighThroughput)
        .cache_capacity(cache)
        .open()?;
    let trees = (0..trees)
        .map(|i| db.open_tree(format!("t{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut held: Vec<VecDeque<[u8; 32]>> = vec![VecDeque::new(); trees.len()];
    let mut recent: Vec<VecDeque<[u8; 32]>> = vec![VecDeque::new(); trees.len()];
    // xorshift64: the same keys in every run, spread like MACs and random ids.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    println!("records_per_tree,rss_anon_kib,disk_bytes");
    for round in 0..records {
        for ((tree, held), recent) in trees.iter().zip(held.iter_mut()).zip(recent.iter_mut()) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&x.to_le_bytes());
            key[8..16].copy_from_slice(&round.to_le_bytes());
            tree.insert(key, value.as_slice())?;
            if updates > 0 {
                // Each record written again `updates` times, LAG rounds apart (the spool
                // rewrites a record when a destination confirms it, when its bytes go).
                recent.push_back(key);
                if recent.len() as u64 > LAG * updates {
                    recent.pop_front();
                }
                for u in 1..=updates {
                    let back = usize::try_from(LAG * u)?;
                    if let Some(old) = recent
                        .len()
                        .checked_sub(back + 1)
                        .and_then(|i| recent.get(i))
                    {
                        tree.insert(old, rewritten.as_slice())?;
                    }
                }
            }
            if keep == u64::MAX {
                continue;
            }
            held.push_back(key);
            if held.len() as u64 > keep
                && let Some(old) = held.pop_front()
            {
                tree.remove(old)?;
            }
        }
        if round % flush_every == 0 {
            db.flush()?;
        }
        if (round + 1) % (records / 10) == 0 {
            println!("{},{},{}", round + 1, rss_anon_kib()?, db.size_on_disk()?);
        }
    }
    drop(trees);
    drop(db);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
