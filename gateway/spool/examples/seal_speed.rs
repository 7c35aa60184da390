//! How fast the spool's crypto is, per object: sealing through `seal::Sealer` (the real
//! write path, into a `Vec`, the data-key wrap included), opening through `seal::open`,
//! and the content MAC (HMAC-SHA-256 of the plaintext under the index key, as
//! `Keys::mac` computes it), next to the raw primitives of both implementations in the
//! tree (RustCrypto `aes-gcm`/`hmac`+`sha2` and `aws-lc-rs`) on the same data. Prints
//! MB/s (10^6 bytes of plaintext per second), best of several runs, for a 0.5 MiB object
//! (a typical small DICOM object or large HL7 message) and a 64 MiB one.
//!
//!     cargo run --release -p gateway-spool --example seal_speed
//!
//! Only meaningful in release: the RustCrypto primitives are generic code that is not
//! optimised in a debug build.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_spool::seal;
use hmac::Mac as _;

/// Timed runs per measure; the fastest counts.
const RUNS: usize = 7;
/// Plaintext bytes one run of the small size processes (the object, repeated).
const SMALL_RUN_BYTES: usize = 64 << 20;

fn main() {
    let master = MasterKey::from_bytes([7; KEY_LEN]);
    let mac_key = [9u8; 32];
    println!(
        "{:<46} {:>10} {:>10}",
        "operation (MB/s, best of 7)", "0.5 MiB", "64 MiB"
    );
    let sizes = [512 << 10, 64 << 20];
    let plains: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| (0..n).map(|i| (i * 31 % 251) as u8).collect())
        .collect();

    row("seal::Sealer (spool path, into Vec)", &plains, |p| {
        let mut s = seal::Sealer::new(&master, &[3; 16]).unwrap();
        let sealed_len = usize::try_from(seal::sealed_len(p.len() as u64)).unwrap();
        let mut out = Vec::with_capacity(sealed_len);
        out.extend_from_slice(s.header());
        s.update(p, &mut out).unwrap();
        s.finish(&mut out).unwrap();
        let _ = black_box(out);
    });

    // The same into a buffer kept between objects: at 64 MiB a fresh `Vec` costs its
    // page faults (the first touch of every page), which the row above includes.
    let mut reused = Vec::with_capacity(usize::try_from(seal::sealed_len(64 << 20)).unwrap());
    row("seal::Sealer (into a reused Vec)", &plains, |p| {
        let mut s = seal::Sealer::new(&master, &[3; 16]).unwrap();
        reused.clear();
        reused.extend_from_slice(s.header());
        s.update(p, &mut reused).unwrap();
        s.finish(&mut reused).unwrap();
        let _ = black_box(reused.len());
    });

    let blobs: Vec<Vec<u8>> = plains
        .iter()
        .map(|p| {
            let mut s = seal::Sealer::new(&master, &[3; 16]).unwrap();
            let mut out = s.header().to_vec();
            s.update(p, &mut out).unwrap();
            s.finish(&mut out).unwrap();
            out
        })
        .collect();
    let mut sink = Vec::with_capacity(64 << 20);
    row_with("seal::open (spool path, into Vec)", &plains, |i, _| {
        sink.clear();
        let blob = &blobs[i];
        let n = seal::open(&master, blob.as_slice(), blob.len() as u64, &mut sink).unwrap();
        let _ = black_box(n);
    });

    row("HMAC-SHA-256 RustCrypto hmac+sha2", &plains, |p| {
        let mut m = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&mac_key).unwrap();
        m.update(p);
        let _ = black_box(m.finalize().into_bytes());
    });

    let lc_mac_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &mac_key);
    row("HMAC-SHA-256 aws-lc-rs hmac", &plains, |p| {
        let mut m = aws_lc_rs::hmac::Context::with_key(&lc_mac_key);
        m.update(p);
        let _ = black_box(m.sign());
    });

    // The raw AEADs on 64 KiB chunks, in place over a copy of the plaintext, with the
    // spool's nonce layout and a header-sized AAD: what the sealer costs without its
    // buffering.
    let aad = [5u8; seal::HEADER_LEN];
    let mut work: Vec<Vec<u8>> = plains.clone();
    let rc = aes_gcm::Aes256Gcm::new_from_slice(&[1; 32]).unwrap();
    row_with("AES-256-GCM RustCrypto aes-gcm, 64 KiB", &plains, |i, _| {
        for (n, chunk) in work[i].chunks_mut(seal::CHUNK).enumerate() {
            let nonce = nonce(n);
            let tag = rc
                .encrypt_in_place_detached(aes_gcm::Nonce::from_slice(&nonce), &aad, chunk)
                .unwrap();
            let _ = black_box(tag);
        }
    });
    let lc = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[1; 32]).unwrap());
    row_with(
        "AES-256-GCM aws-lc-rs seal_in_place, 64 KiB",
        &plains,
        |i, _| {
            for (n, chunk) in work[i].chunks_mut(seal::CHUNK).enumerate() {
                let tag = lc
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce(n)),
                        Aad::from(&aad),
                        chunk,
                    )
                    .unwrap();
                let _ = black_box(tag);
            }
        },
    );
    println!("keyed BLAKE3: not measured (the blake3 crate is not in Cargo.lock)");
}

fn nonce(n: usize) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[7..11].copy_from_slice(&u32::try_from(n).unwrap().to_be_bytes());
    nonce
}

fn row(name: &str, plains: &[Vec<u8>], mut f: impl FnMut(&[u8])) {
    row_with(name, plains, |_, p| f(p));
}

/// Times `f` on each plaintext (by index, for measures that keep per-size state) and
/// prints the best rate of `RUNS` runs. A run of the small size repeats the object until
/// it has processed `SMALL_RUN_BYTES`, so per-object costs (key setup, the data-key wrap,
/// allocation) count once per object, as they do in the spool.
fn row_with(name: &str, plains: &[Vec<u8>], mut f: impl FnMut(usize, &[u8])) {
    let mut rates = Vec::new();
    for (i, p) in plains.iter().enumerate() {
        let reps = (SMALL_RUN_BYTES / p.len()).max(1);
        f(i, p); // warm-up: page in buffers, fill caches
        let mut best = Duration::MAX;
        for _ in 0..RUNS {
            let started = Instant::now();
            for _ in 0..reps {
                f(i, p);
            }
            best = best.min(started.elapsed());
        }
        rates.push((reps * p.len()) as f64 / best.as_secs_f64() / 1e6);
    }
    println!("{name:<46} {:>10.0} {:>10.0}", rates[0], rates[1]);
}
