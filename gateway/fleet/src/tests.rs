//! Verification of signed commands end to end: every rejection code, acceptance of every
//! operation with both key types, check order, the replay guard across a reload, key file
//! loading, and keys and signatures made by the `openssl` command line.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command as Process;

use serde_json::json;

use crate::command::{MAX_PAYLOAD_BYTES, MAX_REASON_CHARS, Op, OpKind, Rejection, StaffRole};
use crate::key::{Algorithm, KeyError, KeyProblem, VendorKey};
use crate::state::FleetState;
use crate::testutil::{DEVICE, NOW, Signer, pem, signed};
use crate::{StateMessage, encode_envelope};

fn verify(
    key: &VendorKey,
    payload: &[u8],
    op: &str,
    cmd_id: &str,
) -> Result<crate::Command, Rejection> {
    key.verify(payload, DEVICE, op, cmd_id, NOW, Some(10))
}

fn code_of(r: Result<crate::Command, Rejection>) -> &'static str {
    match r {
        Ok(c) => panic!("accepted {c:?}"),
        Err(e) => e.code(),
    }
}

// --- acceptance --------------------------------------------------------------------------

#[test]
fn every_operation_is_accepted_with_both_key_types() {
    for signer in [Signer::ed25519(), Signer::p256()] {
        let key = signer.vendor_key();
        assert_eq!(key.algorithm(), signer.alg());
        let cases = [
            (
                "config-update",
                json!({"toml": "[node]\nid = \"x\"\n"}),
                Op::ConfigUpdate {
                    toml: "[node]\nid = \"x\"\n".into(),
                },
            ),
            ("disable", json!({}), Op::Disable { reason: None }),
            (
                "disable",
                json!({"reason": null}),
                Op::Disable { reason: None },
            ),
            (
                "disable",
                json!({"reason": "contract ended"}),
                Op::Disable {
                    reason: Some("contract ended".into()),
                },
            ),
            ("enable", json!({}), Op::Enable),
            ("wipe", json!({}), Op::Wipe),
            ("restart", json!({}), Op::Restart),
            ("status", json!({}), Op::Status),
            (
                "log-upload",
                json!({"lines": 1}),
                Op::LogUpload { lines: 1 },
            ),
            (
                "log-upload",
                json!({"lines": 10000}),
                Op::LogUpload { lines: 10000 },
            ),
            (
                "provision",
                json!({"device_id": "gw-0001", "certificate": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"}),
                Op::Provision {
                    device_id: crate::DeviceId::new("gw-0001").unwrap(),
                    certificate: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
                        .into(),
                },
            ),
            (
                "staff-invite",
                json!({"name": "admin.tanaka", "role": "admin"}),
                Op::StaffInvite {
                    name: gateway_id::Id::parse("admin.tanaka", "name").unwrap(),
                    role: StaffRole::Admin,
                },
            ),
            (
                "staff-invite",
                json!({"name": "clerk-1", "role": "clerk"}),
                Op::StaffInvite {
                    name: gateway_id::Id::parse("clerk-1", "name").unwrap(),
                    role: StaffRole::Clerk,
                },
            ),
            (
                "staff-disable",
                json!({"name": "dr.ito"}),
                Op::StaffDisable {
                    name: gateway_id::Id::parse("dr.ito", "name").unwrap(),
                },
            ),
            (
                "update",
                json!({"url": "https://updates.example:8443/gw/42.raucb?x=1", "sha256": "abababababababababababababababababababababababababababababababab", "version": 42, "size": 123_456_789}),
                Op::Update {
                    url: crate::UpdateUrl::parse("https://updates.example:8443/gw/42.raucb?x=1")
                        .unwrap(),
                    sha256: [0xab; 32],
                    version: 42,
                    size: 123_456_789,
                },
            ),
            (
                "update",
                json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 1, "size": crate::command::MAX_UPDATE_BYTES}),
                Op::Update {
                    url: crate::UpdateUrl::parse("https://h/b").unwrap(),
                    sha256: [0xab; 32],
                    version: 1,
                    size: crate::command::MAX_UPDATE_BYTES,
                },
            ),
        ];
        for (i, (op, args, expected)) in cases.into_iter().enumerate() {
            let seq = 11 + i as u64;
            let payload = signer.envelope(&signed(op, "c-1", seq, args));
            let cmd = verify(&key, &payload, op, "c-1").unwrap();
            assert_eq!(cmd.op, expected);
            assert_eq!(cmd.op.kind().as_str(), op);
            assert_eq!(cmd.seq, seq);
            assert_eq!(cmd.cmd_id, "c-1");
            assert_eq!(cmd.expires_at, NOW + 3600);
        }
    }
}

#[test]
fn first_command_is_accepted_when_no_sequence_was_ever_accepted() {
    let signer = Signer::ed25519();
    let payload = signer.envelope(&signed("status", "c-1", 0, json!({})));
    let cmd = signer
        .vendor_key()
        .verify(&payload, DEVICE, "status", "c-1", NOW, None)
        .unwrap();
    assert_eq!(cmd.seq, 0);
}

#[test]
fn unpadded_base64_is_accepted() {
    let signer = Signer::ed25519();
    let body = signed("status", "c-1", 11, json!({}));
    let payload = String::from_utf8(signer.envelope(&body))
        .unwrap()
        .replace('=', "");
    assert!(verify(&signer.vendor_key(), payload.as_bytes(), "status", "c-1").is_ok());
}

// --- every rejection code ----------------------------------------------------------------

#[test]
fn oversized_payload_is_refused_before_parsing() {
    let key = Signer::ed25519().vendor_key();
    let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
    let err = verify(&key, &big, "status", "c-1").unwrap_err();
    assert_eq!(err.code(), "too-large");
    assert_eq!(
        err,
        Rejection::TooLarge {
            len: MAX_PAYLOAD_BYTES + 1,
            max: MAX_PAYLOAD_BYTES
        }
    );
}

#[test]
fn malformed_envelopes_are_refused() {
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let good = signed("status", "c-1", 11, json!({}));
    let sig = signer.sign(&good);
    let b64 = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    let cases: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"not json".to_vec(),
        b"[1,2]".to_vec(),
        b"\"text\"".to_vec(),
        json!({"alg": "ed25519", "payload": b64(&good), "signature": 5})
            .to_string()
            .into_bytes(),
        json!({"payload": b64(&good), "signature": b64(&sig)})
            .to_string()
            .into_bytes(),
        json!({"alg": "ed25519", "signature": b64(&sig)})
            .to_string()
            .into_bytes(),
        json!({"alg": 1, "payload": b64(&good), "signature": b64(&sig)})
            .to_string()
            .into_bytes(),
        json!({"alg": "ed25519", "payload": "!!!", "signature": b64(&sig)})
            .to_string()
            .into_bytes(),
        json!({"alg": "ed25519", "payload": b64(&good), "signature": "%%%"})
            .to_string()
            .into_bytes(),
        json!({"alg": "ed25519", "payload": b64(&good), "signature": b64(&sig), "extra": 1})
            .to_string()
            .into_bytes(),
    ];
    for raw in cases {
        let err = verify(&key, &raw, "status", "c-1").unwrap_err();
        assert_eq!(
            err.code(),
            "malformed",
            "{} -> {err}",
            String::from_utf8_lossy(&raw)
        );
    }
}

#[test]
fn malformed_signed_commands_are_refused_after_the_signature_verified() {
    let signer = Signer::p256();
    let key = signer.vendor_key();
    let base = json!({"device_id": DEVICE, "cmd_id": "c-1", "op": "status", "seq": 11,
                      "expires_at": NOW + 60, "args": {}});
    let mut cases: Vec<Vec<u8>> = vec![b"not json".to_vec(), b"[]".to_vec(), b"{}".to_vec()];
    for field in ["device_id", "cmd_id", "op", "seq", "expires_at", "args"] {
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove(field);
        cases.push(v.to_string().into_bytes());
    }
    for (field, value) in [
        ("seq", json!(-1)),
        ("seq", json!(1.5)),
        ("seq", json!("11")),
        ("seq", json!(18446744073709551616.0)),
        ("expires_at", json!(null)),
        ("args", json!([])),
        ("device_id", json!(7)),
        ("cmd_id", json!("a/b")),
        ("cmd_id", json!("")),
        ("op", json!("status#")),
        ("unexpected", json!(true)),
    ] {
        let mut v = base.clone();
        v.as_object_mut().unwrap().insert(field.into(), value);
        cases.push(v.to_string().into_bytes());
    }
    for body in cases {
        let err = verify(&key, &signer.envelope(&body), "status", "c-1").unwrap_err();
        assert_eq!(
            err.code(),
            "malformed",
            "{} -> {err}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn envelope_without_signature_is_unsigned() {
    let key = Signer::ed25519().vendor_key();
    let body = signed("wipe", "c-1", 11, json!({}));
    let payload = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&body)
    };
    for raw in [
        json!({"alg": "ed25519", "payload": payload})
            .to_string()
            .into_bytes(),
        json!({"alg": "ed25519", "payload": payload, "signature": ""})
            .to_string()
            .into_bytes(),
        json!({"alg": "ed25519", "payload": payload, "signature": null})
            .to_string()
            .into_bytes(),
        // the bare command, not wrapped at all
        body.clone(),
    ] {
        assert_eq!(code_of(verify(&key, &raw, "wipe", "c-1")), "unsigned");
    }
}

#[test]
fn algorithm_other_than_the_keys_is_wrong_algorithm() {
    let ed = Signer::ed25519();
    let ec = Signer::p256();
    let body = signed("wipe", "c-1", 11, json!({}));
    // an Ed25519 signature labelled as ECDSA, and the reverse
    let mislabelled = encode_envelope(Algorithm::EcdsaP256Sha256, &body, &ed.sign(&body));
    let err = verify(&ed.vendor_key(), &mislabelled, "wipe", "c-1").unwrap_err();
    assert_eq!(err.code(), "wrong-algorithm");
    assert_eq!(
        err.to_string(),
        "signature algorithm ecdsa-p256-sha256 is not the vendor key's ed25519"
    );
    let mislabelled = encode_envelope(Algorithm::Ed25519, &body, &ec.sign(&body));
    assert_eq!(
        code_of(verify(&ec.vendor_key(), &mislabelled, "wipe", "c-1")),
        "wrong-algorithm"
    );
    // unknown names, including ones that are not plain identifiers, are not echoed
    let raw = String::from_utf8(ed.envelope(&body)).unwrap();
    for alg in ["rsa-sha256", "ED25519", "none", "Yamada^Taro"] {
        let swapped = raw.replace("\"ed25519\"", &format!("\"{alg}\""));
        let err = verify(&ed.vendor_key(), swapped.as_bytes(), "wipe", "c-1").unwrap_err();
        assert_eq!(err.code(), "wrong-algorithm");
        assert!(!err.to_string().contains("Yamada"), "{err}");
    }
}

#[test]
fn signature_by_another_key_or_over_other_bytes_is_bad_signature() {
    for (signer, other) in [
        (Signer::ed25519(), Signer::ed25519()),
        (Signer::p256(), Signer::p256()),
    ] {
        let key = signer.vendor_key();
        let body = signed("wipe", "c-1", 11, json!({}));
        // signed by a key that is not the vendor's
        assert_eq!(
            code_of(verify(&key, &other.envelope(&body), "wipe", "c-1")),
            "bad-signature"
        );
        // signature of one command moved onto another
        let sig = signer.sign(&body);
        let tampered = signed("wipe", "c-1", 12, json!({}));
        let moved = encode_envelope(signer.alg(), &tampered, &sig);
        assert_eq!(
            code_of(verify(&key, &moved, "wipe", "c-1")),
            "bad-signature"
        );
        // truncated and empty-but-present signatures
        let cut = encode_envelope(signer.alg(), &body, &sig[..sig.len() - 1]);
        assert_eq!(code_of(verify(&key, &cut, "wipe", "c-1")), "bad-signature");
        let zero = encode_envelope(signer.alg(), &body, &[0]);
        assert_eq!(code_of(verify(&key, &zero, "wipe", "c-1")), "bad-signature");
        // whitespace added to the signed bytes is a different message
        let mut spaced = body.clone();
        spaced.push(b' ');
        let spaced = encode_envelope(signer.alg(), &spaced, &sig);
        assert_eq!(
            code_of(verify(&key, &spaced, "wipe", "c-1")),
            "bad-signature"
        );
    }
}

#[test]
fn command_for_another_device_is_refused() {
    let signer = Signer::ed25519();
    let body = signed("wipe", "c-1", 11, json!({}));
    let payload = signer.envelope(&body);
    let err = signer
        .vendor_key()
        .verify(&payload, "clinic-002", "wipe", "c-1", NOW, Some(10))
        .unwrap_err();
    assert_eq!(err.code(), "other-device");
    assert!(!err.to_string().contains("clinic"), "{err}");
}

#[test]
fn op_or_cmd_id_differing_from_the_topic_is_topic_mismatch() {
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let payload = signer.envelope(&signed("status", "c-1", 11, json!({})));
    let err = verify(&key, &payload, "wipe", "c-1").unwrap_err();
    assert_eq!(err, Rejection::TopicMismatch { field: "op" });
    let err = verify(&key, &payload, "status", "c-2").unwrap_err();
    assert_eq!(err, Rejection::TopicMismatch { field: "cmd_id" });
}

#[test]
fn command_at_or_after_its_expiry_is_expired() {
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let payload = signer.envelope(&signed("status", "c-1", 11, json!({})));
    let at = |now| key.verify(&payload, DEVICE, "status", "c-1", now, Some(10));
    assert!(at(NOW + 3599).is_ok());
    assert_eq!(
        at(NOW + 3600).unwrap_err(),
        Rejection::Expired {
            expires_at: NOW + 3600,
            now: NOW + 3600
        }
    );
    assert_eq!(code_of(at(NOW + 100_000)), "expired");
}

#[test]
fn sequence_not_above_the_last_accepted_is_replayed() {
    let signer = Signer::p256();
    let key = signer.vendor_key();
    for seq in [0, 9, 10] {
        let payload = signer.envelope(&signed("status", "c-1", seq, json!({})));
        assert_eq!(
            verify(&key, &payload, "status", "c-1").unwrap_err(),
            Rejection::Replayed { seq, last: 10 }
        );
    }
    let payload = signer.envelope(&signed("status", "c-1", 11, json!({})));
    assert!(verify(&key, &payload, "status", "c-1").is_ok());
}

#[test]
fn replayed_update_envelope_is_refused_replayed_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let payload = signer.envelope(&signed(
        "update",
        "u-1",
        11,
        json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
    ));
    let mut state = FleetState::load(dir.path()).unwrap();
    state.accept(10).unwrap();
    let cmd = key
        .verify(&payload, DEVICE, "update", "u-1", NOW, state.last_seq())
        .unwrap();
    state.accept(cmd.seq).unwrap();
    let before = std::fs::read(state.path()).unwrap();
    // the same signed envelope again, also after a reload (a restart of the box)
    let reloaded = FleetState::load(dir.path()).unwrap();
    for last in [state.last_seq(), reloaded.last_seq()] {
        let err = key
            .verify(&payload, DEVICE, "update", "u-1", NOW, last)
            .unwrap_err();
        assert_eq!(err, Rejection::Replayed { seq: 11, last: 11 });
        assert_eq!(err.code(), "replayed");
    }
    assert_eq!(std::fs::read(state.path()).unwrap(), before);
}

#[test]
fn update_bad_args_never_echo_the_url() {
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let secret = "https://user:Yamada-Taro@h/b";
    let payload = signer.envelope(&signed(
        "update",
        "u-1",
        11,
        json!({"url": secret, "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
    ));
    let err = verify(&key, &payload, "update", "u-1").unwrap_err();
    assert_eq!(err.code(), "bad-args");
    assert!(!err.reason().contains("Yamada"), "{err}");
    let ok = signer.envelope(&signed(
        "update",
        "u-2",
        12,
        json!({"url": "https://h/Yamada", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
    ));
    let cmd = verify(&key, &ok, "update", "u-2").unwrap();
    assert!(!format!("{cmd:?}").contains("Yamada"));
}

#[test]
fn operation_not_in_the_list_is_unknown_op() {
    let signer = Signer::ed25519();
    let payload = signer.envelope(&signed("reboot-now", "c-1", 11, json!({})));
    let err = verify(&signer.vendor_key(), &payload, "reboot-now", "c-1").unwrap_err();
    assert_eq!(
        err,
        Rejection::UnknownOp {
            op: "reboot-now".into()
        }
    );
    assert_eq!(err.to_string(), "unknown operation reboot-now");
    // names are case-sensitive
    let payload = signer.envelope(&signed("WIPE", "c-1", 11, json!({})));
    assert_eq!(
        code_of(verify(&signer.vendor_key(), &payload, "WIPE", "c-1")),
        "unknown-op"
    );
}

#[test]
fn arguments_that_do_not_fit_the_operation_are_bad_args() {
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let cases = [
        ("config-update", json!({})),
        ("config-update", json!({"toml": ""})),
        ("config-update", json!({"toml": 5})),
        ("config-update", json!({"toml": "[node]", "restart": true})),
        ("disable", json!({"reason": 5})),
        ("disable", json!({"reason": "x".repeat(257)})),
        ("disable", json!({"reason": "line\nbreak"})),
        ("disable", json!({"why": "x"})),
        ("enable", json!({"now": true})),
        ("wipe", json!({"force": true})),
        ("restart", json!({"delay": 5})),
        ("status", json!({"full": true})),
        ("log-upload", json!({})),
        ("log-upload", json!({"lines": 0})),
        ("log-upload", json!({"lines": 10001})),
        ("log-upload", json!({"lines": -1})),
        ("log-upload", json!({"lines": 1.5})),
        ("log-upload", json!({"lines": "10"})),
        ("log-upload", json!({"lines": 4294967297u64})),
        ("log-upload", json!({"lines": 10, "grep": "x"})),
        ("provision", json!({})),
        ("provision", json!({"device_id": "gw-1"})),
        (
            "provision",
            json!({"device_id": "gw/+", "certificate": "-----BEGIN CERTIFICATE-----"}),
        ),
        (
            "provision",
            json!({"device_id": 5, "certificate": "-----BEGIN CERTIFICATE-----"}),
        ),
        (
            "provision",
            json!({"device_id": "gw-1", "certificate": "not pem"}),
        ),
        ("provision", json!({"device_id": "gw-1", "certificate": 7})),
        (
            "provision",
            json!({"device_id": "gw-1", "certificate": format!("-----BEGIN CERTIFICATE-----{}", "A".repeat(70_000))}),
        ),
        (
            "provision",
            json!({"device_id": "gw-1", "certificate": "-----BEGIN CERTIFICATE-----", "ca": "x"}),
        ),
        ("staff-invite", json!({})),
        ("staff-invite", json!({"name": "admin.a"})),
        ("staff-invite", json!({"role": "admin"})),
        ("staff-invite", json!({"name": "admin a", "role": "admin"})),
        ("staff-invite", json!({"name": "a/+/#", "role": "admin"})),
        ("staff-invite", json!({"name": "", "role": "admin"})),
        (
            "staff-invite",
            json!({"name": "x".repeat(65), "role": "admin"}),
        ),
        ("staff-invite", json!({"name": "佐藤", "role": "admin"})),
        ("staff-invite", json!({"name": 5, "role": "admin"})),
        ("staff-invite", json!({"name": "admin.a", "role": "root"})),
        ("staff-invite", json!({"name": "admin.a", "role": "Admin"})),
        ("staff-invite", json!({"name": "admin.a", "role": 1})),
        (
            "staff-invite",
            json!({"name": "admin.a", "role": "admin", "password": "x"}),
        ),
        ("staff-disable", json!({})),
        ("staff-disable", json!({"name": "a b"})),
        ("staff-disable", json!({"name": null})),
        ("staff-disable", json!({"name": "a", "reason": "x"})),
        (
            "update",
            json!({"sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "http://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "ftp://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https:///b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://:443/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://u:p@h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b c", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b#f", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/é", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": 5, "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "ababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab00", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "gbababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": 5, "version": 2, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 0, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": -1, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": "2", "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2.5, "size": 10}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 0}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 17_179_869_185u64}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": "10"}),
        ),
        (
            "update",
            json!({"url": "https://h/b", "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10, "force": true}),
        ),
        (
            "update",
            json!({"url": format!("https://h/{}", "a".repeat(2048)), "sha256": "abababababababababababababababababababababababababababababababab", "version": 2, "size": 10}),
        ),
    ];
    for (op, args) in cases {
        let payload = signer.envelope(&signed(op, "c-1", 11, args.clone()));
        let err = verify(&key, &payload, op, "c-1").unwrap_err();
        assert_eq!(err.code(), "bad-args", "{op} {args} -> {err}");
        assert!(
            err.to_string()
                .starts_with(&format!("bad arguments for {op}: ")),
            "{err}"
        );
    }
    // a 256-character reason is the longest accepted
    let payload = signer.envelope(&signed(
        "disable",
        "c-1",
        11,
        json!({"reason": "é".repeat(256)}),
    ));
    assert!(verify(&key, &payload, "disable", "c-1").is_ok());
}

#[test]
fn every_rejection_code_is_reachable_and_listed() {
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let other = Signer::ed25519();
    let env = |op: &str, seq, args| signer.envelope(&signed(op, "c-1", seq, args));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![b'{'; MAX_PAYLOAD_BYTES + 1], "status"),
        (b"{".to_vec(), "status"),
        (br#"{"alg":"ed25519","payload":"e30="}"#.to_vec(), "status"),
        (
            encode_envelope(Algorithm::EcdsaP256Sha256, b"{}", b"x"),
            "status",
        ),
        (
            other.envelope(&signed("status", "c-1", 11, json!({}))),
            "status",
        ),
        (
            signer.envelope(
                &json!({"device_id": "x", "cmd_id": "c-1", "op": "status", "seq": 11,
            "expires_at": NOW + 5, "args": {}})
                .to_string()
                .into_bytes(),
            ),
            "status",
        ),
        (env("status", 11, json!({})), "restart"),
        (
            signer.envelope(
                &json!({"device_id": DEVICE, "cmd_id": "c-1", "op": "status", "seq": 11,
            "expires_at": NOW, "args": {}})
                .to_string()
                .into_bytes(),
            ),
            "status",
        ),
        (env("status", 10, json!({})), "status"),
        (env("fly", 11, json!({})), "fly"),
        (env("status", 11, json!({"x": 1})), "status"),
    ];
    let mut seen = BTreeSet::new();
    for (raw, op) in cases {
        let err = verify(&key, &raw, op, "c-1").unwrap_err();
        let reason = err.reason();
        assert!(reason.chars().count() <= MAX_REASON_CHARS);
        assert!(!reason.is_empty());
        seen.insert(err.code());
    }
    let listed: BTreeSet<&str> = Rejection::CODES.into_iter().collect();
    assert_eq!(seen, listed);
}

// --- check order ---------------------------------------------------------------------------

#[test]
fn checks_run_in_the_documented_order() {
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    // for another device, wrong topic, expired, replayed, unknown op, bad args: all at once
    let everything_wrong = json!({"device_id": "clinic-999", "cmd_id": "c-9", "op": "fly",
        "seq": 1, "expires_at": 1, "args": {"x": 1}})
    .to_string()
    .into_bytes();
    let other = Signer::ed25519();
    // signature is checked before anything inside the signed bytes
    assert_eq!(
        code_of(verify(
            &key,
            &other.envelope(&everything_wrong),
            "status",
            "c-1"
        )),
        "bad-signature"
    );
    let payload = signer.envelope(&everything_wrong);
    assert_eq!(
        code_of(verify(&key, &payload, "status", "c-1")),
        "other-device"
    );
    let strip = |v: serde_json::Value, k: &str, nv: serde_json::Value| {
        let mut v = v;
        v.as_object_mut().unwrap().insert(k.into(), nv);
        v
    };
    let v: serde_json::Value = serde_json::from_slice(&everything_wrong).unwrap();
    let v = strip(v, "device_id", json!(DEVICE));
    let p = signer.envelope(v.to_string().as_bytes());
    assert_eq!(code_of(verify(&key, &p, "status", "c-1")), "topic-mismatch");
    let p = signer.envelope(v.to_string().as_bytes());
    assert_eq!(code_of(verify(&key, &p, "fly", "c-9")), "expired");
    let v = strip(v, "expires_at", json!(NOW + 10));
    let p = signer.envelope(v.to_string().as_bytes());
    assert_eq!(code_of(verify(&key, &p, "fly", "c-9")), "replayed");
    let v = strip(v, "seq", json!(11));
    let p = signer.envelope(v.to_string().as_bytes());
    assert_eq!(code_of(verify(&key, &p, "fly", "c-9")), "unknown-op");
    let v = strip(v, "op", json!("status"));
    let p = signer.envelope(v.to_string().as_bytes());
    assert_eq!(code_of(verify(&key, &p, "status", "c-9")), "bad-args");
    let v = strip(v, "args", json!({}));
    let p = signer.envelope(v.to_string().as_bytes());
    assert!(verify(&key, &p, "status", "c-9").is_ok());
}

// --- privacy -------------------------------------------------------------------------------

#[test]
fn reasons_never_echo_payload_content() {
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let secret = "Yamada^Taro";
    let bodies = [
        json!({"device_id": secret, "cmd_id": "c-1", "op": "status", "seq": 11, "expires_at": NOW + 5, "args": {}}),
        json!({"device_id": DEVICE, "cmd_id": "c-1", "op": "status", "seq": 11, "expires_at": NOW + 5, "args": {}, secret: 1}),
        json!({"device_id": DEVICE, "cmd_id": "c-1", "op": "status", "seq": secret, "expires_at": NOW + 5, "args": {}}),
        json!({"device_id": DEVICE, "cmd_id": "c-1", "op": "status", "seq": 11, "expires_at": NOW + 5, "args": {secret: secret}}),
        json!({"device_id": DEVICE, "cmd_id": "c-1", "op": "config-update", "seq": 11, "expires_at": NOW + 5, "args": {"toml": 5, secret: 1}}),
        json!({"device_id": DEVICE, "cmd_id": "c-1", "op": "disable", "seq": 11, "expires_at": NOW + 5, "args": {"reason": format!("{secret}\n")}}),
    ];
    for body in bodies {
        let op = body["op"].as_str().unwrap().to_owned();
        let err = verify(
            &key,
            &signer.envelope(body.to_string().as_bytes()),
            &op,
            "c-1",
        )
        .unwrap_err();
        assert!(!err.to_string().contains("Yamada"), "{err}");
        assert!(!format!("{err:?}").contains("Yamada"), "{err:?}");
    }
    // not JSON at all, with the name in it
    let err = verify(
        &key,
        format!("{{\"alg\": {secret}}}").as_bytes(),
        "status",
        "c-1",
    )
    .unwrap_err();
    assert!(!err.to_string().contains("Yamada"), "{err}");
}

#[test]
fn debug_of_a_config_update_shows_its_length_only() {
    let op = Op::ConfigUpdate {
        toml: "[fleet]\nbroker = \"secret\"\n".into(),
    };
    let text = format!("{op:?}");
    assert!(!text.contains("secret"), "{text}");
    assert!(text.contains("toml_bytes"), "{text}");
    assert_eq!(format!("{:?}", Op::Wipe), "wipe");
}

#[test]
fn staff_arguments_are_never_echoed_when_they_are_not_plain_names() {
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let payload = signer.envelope(&signed(
        "staff-invite",
        "c-1",
        11,
        json!({"name": "山田 太郎", "role": "admin"}),
    ));
    let err = verify(&key, &payload, "staff-invite", "c-1").unwrap_err();
    assert_eq!(err.code(), "bad-args");
    assert!(!err.reason().contains("山田"), "{err}");
    assert_eq!(
        err.reason(),
        "bad arguments for staff-invite: name must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
    );
    for role in StaffRole::ALL {
        assert_eq!(StaffRole::from_name(role.as_str()), Some(role));
    }
}

#[test]
fn op_kind_names_round_trip() {
    for kind in OpKind::ALL {
        assert_eq!(OpKind::from_name(kind.as_str()), Some(kind));
    }
    assert_eq!(OpKind::from_name("Wipe"), None);
}

// --- the replay guard with verification ------------------------------------------------

#[test]
fn accepted_sequence_is_replayed_after_reload() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let mut state = FleetState::load(dir.path()).unwrap();
    let first = signer.envelope(&signed("restart", "c-5", 5, json!({})));
    let cmd = key
        .verify(&first, DEVICE, "restart", "c-5", NOW, state.last_seq())
        .unwrap();
    state.accept(cmd.seq).unwrap();
    drop(state);

    // after a restart (e.g. the very restart the command asked for)
    let state = FleetState::load(dir.path()).unwrap();
    assert_eq!(
        key.verify(&first, DEVICE, "restart", "c-5", NOW, state.last_seq())
            .unwrap_err(),
        Rejection::Replayed { seq: 5, last: 5 }
    );
    let lower = signer.envelope(&signed("restart", "c-4", 4, json!({})));
    assert_eq!(
        code_of(key.verify(&lower, DEVICE, "restart", "c-4", NOW, state.last_seq())),
        "replayed"
    );
    let next = signer.envelope(&signed("restart", "c-6", 6, json!({})));
    assert!(
        key.verify(&next, DEVICE, "restart", "c-6", NOW, state.last_seq())
            .is_ok()
    );
}

#[test]
fn rejected_command_leaves_the_state_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let mut state = FleetState::load(dir.path()).unwrap();
    state.accept(3).unwrap();
    let before = std::fs::read(state.path()).unwrap();
    let stale = signer.envelope(&signed("disable", "c-2", 2, json!({})));
    let err = key
        .verify(&stale, DEVICE, "disable", "c-2", NOW, state.last_seq())
        .unwrap_err();
    let msg = StateMessage::rejected("c-2", "disable", &err, NOW);
    assert_eq!(msg.code.as_deref(), Some("replayed"));
    assert_eq!(std::fs::read(state.path()).unwrap(), before);
    assert!(!state.is_disabled());
}

// --- key loading ---------------------------------------------------------------------------

#[test]
fn key_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("vendor-cmd.pub");
    let err = VendorKey::from_pem_file(&missing).unwrap_err();
    assert!(matches!(err, KeyError::Read { .. }));
    assert!(err.to_string().contains("vendor-cmd.pub"), "{err}");

    let garbage = dir.path().join("garbage.pub");
    std::fs::write(&garbage, "hello").unwrap();
    let err = VendorKey::from_pem_file(&garbage).unwrap_err();
    assert!(
        matches!(
            err,
            KeyError::Invalid {
                problem: KeyProblem::NotPem,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("garbage.pub"), "{err}");

    let huge = dir.path().join("huge.pub");
    std::fs::write(&huge, vec![b'A'; 70_000]).unwrap();
    let err = VendorKey::from_pem_file(&huge).unwrap_err();
    assert!(
        matches!(
            err,
            KeyError::Invalid {
                problem: KeyProblem::TooLarge,
                ..
            }
        ),
        "{err}"
    );

    let good = dir.path().join("good.pub");
    let signer = Signer::p256();
    std::fs::write(&good, signer.public_pem()).unwrap();
    let key = VendorKey::from_pem_file(&good).unwrap();
    assert_eq!(key.algorithm(), Algorithm::EcdsaP256Sha256);
}

#[test]
fn private_key_pem_is_not_a_public_key() {
    let der = [0x30, 0x03, 0x02, 0x01, 0x00];
    assert_eq!(
        VendorKey::from_pem(pem("PRIVATE KEY", &der).as_bytes()).unwrap_err(),
        KeyProblem::NotPem
    );
}

#[test]
fn malformed_spki_der_is_refused() {
    let signer = Signer::ed25519();
    let mut der = signer.spki_der();
    der.push(0);
    assert_eq!(
        VendorKey::from_spki_der(&der).unwrap_err(),
        KeyProblem::BadDer
    );
    assert_eq!(
        VendorKey::from_spki_der(&[0x30, 0x00]).unwrap_err(),
        KeyProblem::BadDer
    );
    assert_eq!(
        VendorKey::from_spki_der(b"").unwrap_err(),
        KeyProblem::BadDer
    );
}

#[test]
fn ed25519_key_of_wrong_length_is_invalid() {
    // SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING (31 bytes) }
    let mut der = vec![
        0x30, 0x29, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x20, 0x00,
    ];
    der.extend([7u8; 31]);
    assert_eq!(
        VendorKey::from_spki_der(&der).unwrap_err(),
        KeyProblem::InvalidKey {
            alg: Algorithm::Ed25519
        }
    );
}

#[test]
fn p256_point_off_the_curve_is_invalid() {
    let mut der = Signer::p256().spki_der();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    assert_eq!(
        VendorKey::from_spki_der(&der).unwrap_err(),
        KeyProblem::InvalidKey {
            alg: Algorithm::EcdsaP256Sha256
        }
    );
}

#[test]
fn x25519_key_is_an_unsupported_algorithm() {
    // SEQUENCE { SEQUENCE { OID 1.3.101.110 (X25519) } BIT STRING (32 bytes) }
    let mut der = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
    ];
    der.extend([9u8; 32]);
    assert_eq!(
        VendorKey::from_spki_der(&der).unwrap_err(),
        KeyProblem::UnsupportedAlgorithm {
            oid: "1.3.101.110".into()
        }
    );
}

#[test]
fn fingerprint_is_the_sha256_of_the_spki_der() {
    let signer = Signer::ed25519();
    let key = signer.vendor_key();
    let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &signer.spki_der());
    let hex: String = expected
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(key.fingerprint(), hex);
    assert!(!format!("{key:?}").is_empty());
}

// --- the openssl command line ------------------------------------------------------------

/// Runs `openssl` with `args` in `dir`; fails the test (never skips) when openssl is missing.
fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Process::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "this test needs the `openssl` command line on PATH (apt-get install openssl): {e}"
            )
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Builds the envelope exactly as the README's shell example does.
fn openssl_envelope(dir: &Path, alg: &str) -> Vec<u8> {
    let payload = openssl(dir, &["base64", "-A", "-in", "payload.json"]);
    let signature = openssl(dir, &["base64", "-A", "-in", "sig.bin"]);
    format!(
        "{{\"alg\":\"{alg}\",\"payload\":\"{}\",\"signature\":\"{}\"}}",
        String::from_utf8(payload).unwrap().trim(),
        String::from_utf8(signature).unwrap().trim()
    )
    .into_bytes()
}

#[test]
fn commands_signed_with_the_openssl_command_line_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("payload.json"),
        signed("log-upload", "c-77", 77, json!({"lines": 200})),
    )
    .unwrap();

    // Ed25519
    openssl(d, &["genpkey", "-algorithm", "ed25519", "-out", "ed.key"]);
    openssl(d, &["pkey", "-in", "ed.key", "-pubout", "-out", "ed.pub"]);
    openssl(
        d,
        &[
            "pkeyutl",
            "-sign",
            "-rawin",
            "-inkey",
            "ed.key",
            "-in",
            "payload.json",
            "-out",
            "sig.bin",
        ],
    );
    assert_eq!(std::fs::read(d.join("sig.bin")).unwrap().len(), 64);
    let key = VendorKey::from_pem_file(&d.join("ed.pub")).unwrap();
    assert_eq!(key.algorithm(), Algorithm::Ed25519);
    let envelope = openssl_envelope(d, "ed25519");
    let cmd = key
        .verify(&envelope, DEVICE, "log-upload", "c-77", NOW, Some(76))
        .unwrap();
    assert_eq!(cmd.op, Op::LogUpload { lines: 200 });
    assert_eq!(
        code_of(key.verify(&envelope, DEVICE, "log-upload", "c-77", NOW, Some(77))),
        "replayed"
    );
    // fingerprint matches `openssl pkey -pubin -outform DER | sha256`
    let der = openssl(d, &["pkey", "-pubin", "-in", "ed.pub", "-outform", "DER"]);
    std::fs::write(d.join("ed.der"), der).unwrap();
    let dgst = String::from_utf8(openssl(d, &["dgst", "-sha256", "-r", "ed.der"])).unwrap();
    assert_eq!(dgst.split_whitespace().next(), Some(key.fingerprint()));

    // ECDSA P-256
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.key",
        ],
    );
    openssl(d, &["pkey", "-in", "ec.key", "-pubout", "-out", "ec.pub"]);
    openssl(
        d,
        &[
            "dgst",
            "-sha256",
            "-sign",
            "ec.key",
            "-out",
            "sig.bin",
            "payload.json",
        ],
    );
    let key = VendorKey::from_pem_file(&d.join("ec.pub")).unwrap();
    assert_eq!(key.algorithm(), Algorithm::EcdsaP256Sha256);
    let envelope = openssl_envelope(d, "ecdsa-p256-sha256");
    let cmd = key
        .verify(&envelope, DEVICE, "log-upload", "c-77", NOW, None)
        .unwrap();
    assert_eq!(cmd.seq, 77);
    // the Ed25519 key does not accept the P-256 signature
    let ed = VendorKey::from_pem_file(&d.join("ed.pub")).unwrap();
    assert_eq!(
        code_of(ed.verify(&envelope, DEVICE, "log-upload", "c-77", NOW, None)),
        "wrong-algorithm"
    );
}

#[test]
fn openssl_keys_of_other_types_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "secp384r1",
            "-genkey",
            "-noout",
            "-out",
            "p384.key",
        ],
    );
    openssl(
        d,
        &["pkey", "-in", "p384.key", "-pubout", "-out", "p384.pub"],
    );
    let err = VendorKey::from_pem_file(&d.join("p384.pub")).unwrap_err();
    assert!(
        matches!(&err, KeyError::Invalid { problem: KeyProblem::UnsupportedCurve { curve }, .. } if curve == "1.3.132.0.34"),
        "{err}"
    );
    assert!(err.to_string().contains("p384.pub"), "{err}");

    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "rsa",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.key",
        ],
    );
    openssl(d, &["pkey", "-in", "rsa.key", "-pubout", "-out", "rsa.pub"]);
    let err = VendorKey::from_pem_file(&d.join("rsa.pub")).unwrap_err();
    assert!(
        matches!(&err, KeyError::Invalid { problem: KeyProblem::UnsupportedAlgorithm { oid }, .. } if oid == "1.2.840.113549.1.1.1"),
        "{err}"
    );
    assert!(err.to_string().contains("rsa.pub"), "{err}");

    // the private key file instead of the public one
    let err = VendorKey::from_pem_file(&d.join("rsa.key")).unwrap_err();
    assert!(
        matches!(
            &err,
            KeyError::Invalid {
                problem: KeyProblem::NotPem,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn provisioned_device_id_survives_reload_next_to_the_other_flags() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = FleetState::load(dir.path()).unwrap();
    assert_eq!(state.device_id(), None);
    state.accept(3).unwrap();
    let id = crate::DeviceId::new("gw-000123").unwrap();
    state.set_device_id(&id).unwrap();
    state.set_disabled(Some("contract ended")).unwrap();
    let state = FleetState::load(dir.path()).unwrap();
    assert_eq!(state.device_id(), Some(id));
    assert_eq!(state.last_seq(), Some(3));
    assert!(state.is_disabled());
    // A file without the field (written before provisioning existed) still loads.
    std::fs::write(
        FleetState::path_in(dir.path()),
        br#"{"format":1,"last_seq":4,"disabled":false,"wiped":false}"#,
    )
    .unwrap();
    let state = FleetState::load(dir.path()).unwrap();
    assert_eq!((state.device_id(), state.last_seq()), (None, Some(4)));
}
