//! Test keys and signed commands, made with aws-lc-rs.

use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use base64::Engine;

use crate::command::encode_envelope;
use crate::key::{Algorithm, VendorKey};

pub const DEVICE: &str = "clinic-001";
pub const NOW: u64 = 1_767_225_600;

/// A vendor signing key of either algorithm.
pub enum Signer {
    Ed(Ed25519KeyPair),
    Ec(EcdsaKeyPair),
}

impl Signer {
    pub fn ed25519() -> Signer {
        Signer::Ed(Ed25519KeyPair::generate().unwrap())
    }

    pub fn p256() -> Signer {
        Signer::Ec(EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap())
    }

    pub fn alg(&self) -> Algorithm {
        match self {
            Signer::Ed(_) => Algorithm::Ed25519,
            Signer::Ec(_) => Algorithm::EcdsaP256Sha256,
        }
    }

    pub fn spki_der(&self) -> Vec<u8> {
        let der: PublicKeyX509Der<'_> = match self {
            Signer::Ed(k) => k.public_key().as_der().unwrap(),
            Signer::Ec(k) => k.public_key().as_der().unwrap(),
        };
        der.as_ref().to_vec()
    }

    /// `-----BEGIN PUBLIC KEY-----` PEM, as `openssl pkey -pubout` writes it.
    pub fn public_pem(&self) -> String {
        pem("PUBLIC KEY", &self.spki_der())
    }

    pub fn vendor_key(&self) -> VendorKey {
        VendorKey::from_pem(self.public_pem().as_bytes()).unwrap()
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            Signer::Ed(k) => k.sign(msg).as_ref().to_vec(),
            Signer::Ec(k) => k.sign(&SystemRandom::new(), msg).unwrap().as_ref().to_vec(),
        }
    }

    /// The MQTT payload: envelope around `signed`, signed by this key.
    pub fn envelope(&self, signed: &[u8]) -> Vec<u8> {
        encode_envelope(self.alg(), signed, &self.sign(signed))
    }
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The signed bytes of a command for [`DEVICE`], valid for an hour after [`NOW`].
pub fn signed(op: &str, cmd_id: &str, seq: u64, args: serde_json::Value) -> Vec<u8> {
    serde_json::json!({
        "device_id": DEVICE,
        "cmd_id": cmd_id,
        "op": op,
        "seq": seq,
        "expires_at": NOW + 3600,
        "args": args,
    })
    .to_string()
    .into_bytes()
}
