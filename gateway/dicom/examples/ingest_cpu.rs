//! CPU cost of the per-byte ingest work, without network or disk: the structural walk of a
//! data set and its sealing (AES-256-GCM chunks + the content MAC), as the C-STORE path
//! does them. Run by hw-tests/bench (see BENCHMARKS.md):
//!
//!     cargo run --release -p gateway-dicom --example ingest_cpu

// A benchmark on fixed, well-formed input: a failure is a bug worth a loud stop.
#![allow(clippy::expect_used)]

use std::time::Instant;

use gateway_dicom::walker::{Encoding, Walker};
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_spool::seal::Sealer;

/// One CT-sized Explicit VR LE data set: a few header elements and 512x512x16-bit pixels.
fn ct_dataset() -> Vec<u8> {
    let mut d = Vec::new();
    for (group, element, value) in [
        (0x0008u16, 0x0016u16, &b"1.2.840.10008.5.1.4.1.1.2\0"[..]),
        (0x0008, 0x0018, b"1.2.3.4.5.6.7.8"),
    ] {
        d.extend(group.to_le_bytes());
        d.extend(element.to_le_bytes());
        d.extend(b"UI");
        d.extend((value.len() as u16).to_le_bytes());
        d.extend(value);
    }
    let pixels = 512 * 512 * 2;
    d.extend([0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0]);
    d.extend((pixels as u32).to_le_bytes());
    d.extend((0..pixels).map(|i| (i % 251) as u8));
    d
}

fn main() {
    let data = ct_dataset();
    let objects = 400;
    let pdu = 16 * 1024; // DCMTK's default PDU payload size
    let total = (data.len() * objects) as f64 / 1e6;

    let t = Instant::now();
    for _ in 0..objects {
        let mut w = Walker::new(Encoding::EXPLICIT_LE);
        for piece in data.chunks(pdu) {
            w.feed(piece).expect("well-formed");
        }
        w.finish().expect("complete");
    }
    let walk = t.elapsed().as_secs_f64();

    let key = MasterKey::from_bytes([7; KEY_LEN]);
    let t = Instant::now();
    for i in 0..objects {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let mut sealer = Sealer::new(&key, &id).expect("sealer");
        let mut sink = std::io::sink();
        for piece in data.chunks(pdu) {
            sealer.update(piece, &mut sink).expect("seal");
        }
        sealer.finish(&mut sink).expect("seal");
    }
    let seal = t.elapsed().as_secs_f64();

    let t = Instant::now();
    for _ in 0..objects {
        use hmac::Mac;
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&[1; 32]).expect("any key length");
        for piece in data.chunks(pdu) {
            mac.update(piece);
        }
        std::hint::black_box(mac.finalize());
    }
    let hash = t.elapsed().as_secs_f64();

    println!(
        "data: {objects} x {:.2} MB = {total:.0} MB in {} KiB PDVs",
        data.len() as f64 / 1e6,
        pdu / 1024
    );
    println!(
        "walker:        {:7.0} MB/s ({:.3} ms per CT object)",
        total / walk,
        1e3 * walk / objects as f64
    );
    println!(
        "seal AES-GCM:  {:7.0} MB/s ({:.3} ms per CT object)",
        total / seal,
        1e3 * seal / objects as f64
    );
    println!(
        "content MAC:   {:7.0} MB/s ({:.3} ms per CT object)",
        total / hash,
        1e3 * hash / objects as f64
    );
}
