//! Booking state at rest: whole-file AES-256-GCM under a key derived from the key store's
//! master key. The ledger and the clinic's copy of its appointments carry patient identity,
//! so they are never written in clear.
//!
//! File format: `GWBK` `0x01`, a 12-byte random nonce, then the ciphertext and tag. The
//! additional data is the file's role (e.g. `ledger`), so one sealed file cannot be passed
//! off as another. Written with `gateway_durable::write_atomic` (temp file, fsync, rename,
//! fsync of the folder).

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use gateway_keystore::{KeyPurpose, MasterKey};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

const MAGIC: &[u8; 5] = b"GWBK\x01";
const NONCE_LEN: usize = 12;

/// The key booking files are sealed with.
pub struct SealKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// Sealing or opening failed; carries no content.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(transparent)]
    Io(#[from] gateway_durable::Error),
    #[error("{0}: not a sealed booking file, sealed under another key, or altered")]
    Open(String),
    #[error("no randomness for a nonce")]
    Random,
}

impl SealKey {
    /// Derives the key from the spool master key ([`KeyPurpose::BookingAtRest`]).
    pub fn derive(master: &MasterKey) -> Self {
        Self(Zeroizing::new(
            *master.derive(KeyPurpose::BookingAtRest).expose(),
        ))
    }

    /// An opaque, stable reference to a patient for the audit trail: a keyed MAC of the
    /// id (16 bytes, hex), so the trail names who was read without holding the id.
    pub fn patient_ref(&self, patient_id: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"patient-ref\0");
        mac.update(patient_id.as_bytes());
        let tag = mac.finalize().into_bytes();
        tag.iter().take(16).map(|b| format!("{b:02x}")).collect()
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.as_ref().into())
    }

    /// Seals `plain` and writes it durably to `path`.
    pub fn write(&self, path: &Path, role: &str, plain: &[u8]) -> Result<(), SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|_| SealError::Random)?;
        let ct = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: role.as_bytes(),
                },
            )
            .map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + ct.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        gateway_durable::write_atomic(path, &out)?;
        Ok(())
    }

    /// Reads and opens `path`; `None` when it does not exist.
    pub fn read(&self, path: &Path, role: &str) -> Result<Option<Zeroizing<Vec<u8>>>, SealError> {
        let Some(bytes) = gateway_durable::read_if_exists(path)? else {
            return Ok(None);
        };
        let bad = || SealError::Open(path.display().to_string());
        let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(bad)?;
        if rest.len() < NONCE_LEN {
            return Err(bad());
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let plain = self
            .cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: role.as_bytes(),
                },
            )
            .map_err(|_| bad())?;
        Ok(Some(Zeroizing::new(plain)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_tamper_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sealed");
        let key = SealKey::derive(&MasterKey::from_bytes([1; 32]));
        assert!(key.read(&path, "ledger").unwrap().is_none());
        key.write(&path, "ledger", b"YAMADA^TARO").unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"YAMADA"));
        assert_eq!(
            key.read(&path, "ledger").unwrap().unwrap().as_slice(),
            b"YAMADA^TARO"
        );
        assert!(key.read(&path, "clinic").is_err());
        assert!(
            SealKey::derive(&MasterKey::from_bytes([2; 32]))
                .read(&path, "ledger")
                .is_err()
        );
        let mut flipped = raw.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(key.read(&path, "ledger").is_err());
        std::fs::write(&path, b"GWBK").unwrap();
        assert!(key.read(&path, "ledger").is_err());
    }
}
