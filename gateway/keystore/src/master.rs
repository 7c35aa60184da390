//! The spool master key.

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of every symmetric key in the gateway (AES-256).
pub const KEY_LEN: usize = 32;

/// Public fingerprint of a key: the first 8 bytes of SHA-256 over a domain tag and the key.
/// Stored in every sealed blob so that a blob sealed under another key fails with a clear
/// "wrong key" error instead of a tag mismatch.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The spool master key: wraps per-object data keys and keys the index MACs.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey {
    bytes: [u8; KEY_LEN],
}

impl MasterKey {
    /// Wraps raw key bytes (from the TPM unseal or the software key file).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self { bytes }
    }

    /// The raw key, for building ciphers. Never log it.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// The key's public fingerprint.
    pub fn id(&self) -> KeyId {
        let digest = Sha256::new()
            .chain_update(b"gatewayd master key id v1")
            .chain_update(self.bytes)
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey").field("id", &self.id()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_contains_key_bytes() {
        let key = MasterKey::from_bytes([0xAB; KEY_LEN]);
        let shown = format!("{key:?}");
        assert!(
            !shown.contains("ab, ab") && !shown.contains("171"),
            "{shown}"
        );
        assert!(shown.contains("KeyId("));
    }

    #[test]
    fn key_id_depends_on_key() {
        let a = MasterKey::from_bytes([1; KEY_LEN]).id();
        let b = MasterKey::from_bytes([2; KEY_LEN]).id();
        assert_ne!(a, b);
        assert_eq!(a, MasterKey::from_bytes([1; KEY_LEN]).id());
    }
}
