//! `VendorKey::verify` never panics on any MQTT payload, and whatever it accepts satisfies
//! the checks it promises (device, topic, expiry, sequence, op).
//!
//! The first byte selects the mode:
//! - even: the rest is the raw MQTT payload, verified against a fixed Ed25519 and a fixed
//!   P-256 key (exercises the envelope parser and both signature checks);
//! - odd: the rest is the *signed bytes*, wrapped in an envelope signed by the fixed
//!   Ed25519 key (exercises everything after the signature: the command parser, the
//!   device/topic/expiry/sequence checks and the argument parsers).
//!
//! Every rejection must have a listed code and a reason of at most 256 characters.
#![no_main]

use std::sync::OnceLock;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use gateway_fleet::command::{MAX_REASON_CHARS, encode_envelope};
use gateway_fleet::{Algorithm, Rejection, VendorKey};
use libfuzzer_sys::fuzz_target;

const DEVICE: &str = "clinic-001";
const NOW: u64 = 1_767_225_600;
const LAST: u64 = 10;

struct Keys {
    ed_signer: Ed25519KeyPair,
    ed: VendorKey,
    ec: VendorKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let ed_signer = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("fixed seed");
        let ed_der = ed_signer.public_key().as_der().expect("Ed25519 SPKI");
        let ec_signer =
            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).expect("P-256 key");
        let ec_der = ec_signer.public_key().as_der().expect("P-256 SPKI");
        Keys {
            ed: VendorKey::from_spki_der(ed_der.as_ref()).expect("Ed25519 vendor key"),
            ec: VendorKey::from_spki_der(ec_der.as_ref()).expect("P-256 vendor key"),
            ed_signer,
        }
    })
}

fn check(key: &VendorKey, payload: &[u8], last: Option<u64>) {
    // Topic values the fuzzer can hit: a fixed op/cmd_id pair and the ones it signs.
    for (op, cmd_id) in [
        ("status", "c-1"),
        ("log-upload", "1"),
        ("config-update", "c"),
        ("update", "u-1"),
    ] {
        match key.verify(payload, DEVICE, op, cmd_id, NOW, last) {
            Ok(cmd) => {
                assert_eq!(cmd.op.kind().as_str(), op, "accepted with another op");
                assert_eq!(cmd.cmd_id, cmd_id, "accepted with another cmd_id");
                assert!(NOW < cmd.expires_at, "accepted an expired command");
                if let Some(last) = last {
                    assert!(cmd.seq > last, "accepted a replayed sequence");
                }
                let _ = format!("{cmd:?}");
            }
            Err(rejection) => {
                assert!(Rejection::CODES.contains(&rejection.code()));
                assert!(rejection.reason().chars().count() <= MAX_REASON_CHARS);
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, rest)) = input.split_first() else {
        return;
    };
    let keys = keys();
    let last = (selector & 2 == 0).then_some(LAST);
    if selector & 1 == 0 {
        check(&keys.ed, rest, last);
        check(&keys.ec, rest, last);
    } else {
        let signature = keys.ed_signer.sign(rest);
        let envelope = encode_envelope(Algorithm::Ed25519, rest, signature.as_ref());
        check(&keys.ed, &envelope, last);
    }
});
