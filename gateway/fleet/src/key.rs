//! The vendor's command key (`fleet.vendor_public_key`): a PEM `PUBLIC KEY`
//! (SubjectPublicKeyInfo, as `openssl pkey -pubout` writes it) holding exactly one of
//!
//! - Ed25519 (OID 1.3.101.112, no parameters): signatures are the 64 raw bytes of RFC 8032
//!   (`openssl pkeyutl -sign -rawin`);
//! - ECDSA P-256 (id-ecPublicKey 1.2.840.10045.2.1 with prime256v1 1.2.840.10045.3.1.7):
//!   signatures are ASN.1 DER `ECDSA-Sig-Value` over SHA-256 (`openssl dgst -sha256 -sign`).
//!
//! Any other key type, curve, or trailing data is an error that names the file. The key is
//! checked (point on the curve, length) when it is loaded, not at the first command.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ED25519, ParsedPublicKey, VerificationAlgorithm,
};
use rustls_pki_types::SubjectPublicKeyInfoDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Largest key file read (a P-256 or Ed25519 SPKI PEM is well under 300 bytes).
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// The signature algorithm of a vendor key, as named in the command envelope's `alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `"ed25519"`: 64-byte raw signature over the payload bytes.
    Ed25519,
    /// `"ecdsa-p256-sha256"`: DER ECDSA signature over SHA-256 of the payload bytes.
    EcdsaP256Sha256,
}

impl Algorithm {
    /// The envelope name (`alg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::EcdsaP256Sha256 => "ecdsa-p256-sha256",
        }
    }

    /// Parses an envelope name; exact, case-sensitive.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        match name {
            "ed25519" => Some(Algorithm::Ed25519),
            "ecdsa-p256-sha256" => Some(Algorithm::EcdsaP256Sha256),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a key could not be used (without the file name; see [`KeyError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("no PEM \"PUBLIC KEY\" block (expected the output of `openssl pkey -pubout`)")]
    NotPem,
    #[error("not a DER SubjectPublicKeyInfo")]
    BadDer,
    #[error(
        "unsupported key algorithm {oid} (expected Ed25519 1.3.101.112 or id-ecPublicKey 1.2.840.10045.2.1)"
    )]
    UnsupportedAlgorithm { oid: String },
    #[error("unsupported elliptic curve {curve} (expected prime256v1 1.2.840.10045.3.1.7)")]
    UnsupportedCurve { curve: String },
    #[error("invalid {alg} public key")]
    InvalidKey { alg: Algorithm },
    #[error("file larger than {MAX_KEY_FILE_BYTES} bytes")]
    TooLarge,
}

/// A vendor key file that could not be loaded, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("read vendor public key {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vendor public key {}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        problem: KeyProblem,
    },
}

/// The vendor's public command key, parsed and validated.
#[derive(Clone)]
pub struct VendorKey {
    alg: Algorithm,
    key: ParsedPublicKey,
    fingerprint: String,
}

impl fmt::Debug for VendorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VendorKey")
            .field("alg", &self.alg)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl VendorKey {
    /// Reads and parses `fleet.vendor_public_key`. Every error names `path`.
    pub fn from_pem_file(path: &Path) -> Result<VendorKey, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut pem = Vec::new();
        file.take(MAX_KEY_FILE_BYTES + 1)
            .read_to_end(&mut pem)
            .map_err(read_err)?;
        let invalid = |problem| KeyError::Invalid {
            path: path.to_path_buf(),
            problem,
        };
        if pem.len() as u64 > MAX_KEY_FILE_BYTES {
            return Err(invalid(KeyProblem::TooLarge));
        }
        VendorKey::from_pem(&pem).map_err(invalid)
    }

    /// Parses the first PEM `PUBLIC KEY` block in `pem` (other blocks are ignored).
    pub fn from_pem(pem: &[u8]) -> Result<VendorKey, KeyProblem> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem).map_err(|_| KeyProblem::NotPem)?;
        VendorKey::from_spki_der(der.as_ref())
    }

    /// Parses a DER SubjectPublicKeyInfo; accepts exactly Ed25519 and ECDSA P-256.
    pub fn from_spki_der(der: &[u8]) -> Result<VendorKey, KeyProblem> {
        let (rest, spki) = SubjectPublicKeyInfo::from_der(der).map_err(|_| KeyProblem::BadDer)?;
        if !rest.is_empty() {
            return Err(KeyProblem::BadDer);
        }
        let oid = &spki.algorithm.algorithm;
        let alg = if *oid == OID_SIG_ED25519 {
            // RFC 8410: the parameters MUST be absent.
            if spki.algorithm.parameters.is_some() {
                return Err(KeyProblem::BadDer);
            }
            Algorithm::Ed25519
        } else if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == OID_EC_P256 => Algorithm::EcdsaP256Sha256,
                Some(c) => {
                    return Err(KeyProblem::UnsupportedCurve {
                        curve: c.to_id_string(),
                    });
                }
                None => {
                    return Err(KeyProblem::UnsupportedCurve {
                        curve: "(not a named curve)".to_owned(),
                    });
                }
            }
        } else {
            return Err(KeyProblem::UnsupportedAlgorithm {
                oid: oid.to_id_string(),
            });
        };
        let raw: &[u8] = &spki.subject_public_key.data;
        let verification: &'static dyn VerificationAlgorithm = match alg {
            Algorithm::Ed25519 => &ED25519,
            Algorithm::EcdsaP256Sha256 => &ECDSA_P256_SHA256_ASN1,
        };
        let key =
            ParsedPublicKey::new(verification, raw).map_err(|_| KeyProblem::InvalidKey { alg })?;
        let fingerprint = hex(digest::digest(&digest::SHA256, der).as_ref());
        Ok(VendorKey {
            alg,
            key,
            fingerprint,
        })
    }

    /// The key's signature algorithm; the envelope's `alg` must name it.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Lower-case hex SHA-256 of the SubjectPublicKeyInfo DER, for the log line that says
    /// which key is installed (`openssl pkey -pubin -in K -outform DER | sha256sum`).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Checks `signature` over exactly `message`. No parsing of `message` happens here.
    pub fn verify_signature(&self, message: &[u8], signature: &[u8]) -> bool {
        self.key.verify_sig(message, signature).is_ok()
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}
