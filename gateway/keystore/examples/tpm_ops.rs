//! TPM operation rates of the key store, for BENCHMARKS.md:
//!
//!     cargo run --release -p gateway-keystore --features tpm --example tpm_ops -- \
//!         swtpm:host=127.0.0.1,port=2321 /tmp/data 100
//!
//! The data folder must have been initialised with `gatewayd keys init` for that TCTI.
//! Measures unsealing the spool master key (load + unseal + flush: what `run` does once at
//! start) and identity signatures (load + sign + flush: one per mutual-TLS handshake).

// A benchmark on a prepared TPM: a failure is worth a loud stop.
#![allow(clippy::expect_used)]

use std::path::PathBuf;
use std::time::Instant;

use gateway_keystore::tpm::TpmKeyStore;
use gateway_keystore::{DeviceIdentity, KeyStore};

fn main() {
    let mut args = std::env::args().skip(1);
    let tcti = args.next().expect("usage: tpm_ops TCTI DATA_DIR [N]");
    let data = PathBuf::from(args.next().expect("usage: tpm_ops TCTI DATA_DIR [N]"));
    let n: u32 = args
        .next()
        .map_or(100, |s| s.parse().expect("N is a number"));

    let t = Instant::now();
    let store = TpmKeyStore::open(&tcti, &data).expect("open (run gatewayd keys init first)");
    let open = t.elapsed().as_secs_f64();

    let t = Instant::now();
    for _ in 0..n {
        store.spool_master_key().expect("unseal");
    }
    let unseal = t.elapsed().as_secs_f64() / f64::from(n);

    let identity = store.identity().expect("identity");
    let t = Instant::now();
    for i in 0..n {
        identity.sign_sha256(&i.to_le_bytes()).expect("sign");
    }
    let sign = t.elapsed().as_secs_f64() / f64::from(n);

    println!("open + storage key check: {:.1} ms", open * 1e3);
    println!(
        "unseal spool master key:  {:.2} ms/op ({:.0} ops/s)",
        unseal * 1e3,
        1.0 / unseal
    );
    println!(
        "identity ECDSA signature: {:.2} ms/op ({:.0} ops/s)",
        sign * 1e3,
        1.0 / sign
    );
    println!(
        "transient objects left:   {}",
        store.transient_objects().expect("handles")
    );
}
