//! The spool master key.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

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

impl MasterKey {
    /// A key for one purpose, derived from the master key: HMAC-SHA-256(master, label).
    /// Every purpose has its own label ([`KeyPurpose::label`]), so no two derived keys are
    /// the same, and each goes with the master key at a crypto-shred.
    pub fn derive(&self, purpose: KeyPurpose) -> DerivedKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(purpose.label());
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&mac.finalize().into_bytes());
        DerivedKey(key)
    }
}

/// What a key derived from the master key is for. This is the one list of derivation
/// labels in the gateway: a new store or protocol adds its purpose here, and the labels
/// stay distinct (a unit test checks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyPurpose {
    /// The spool index MACs (UIDs, studies, content).
    SpoolIndex,
    /// The audit trail's record MACs.
    Audit,
    /// The booking ledger and the clinic's appointment copy, sealed at rest.
    BookingAtRest,
    /// Staff TOTP secrets, sealed at rest.
    StaffTotp,
    /// The X25519 seed of the regional exchange (HPKE) key.
    ExchangeX25519,
    /// The identity registry (patient demographics, links, consents), sealed at rest.
    IdentityAtRest,
    /// The safety store (contrast reactions, dose events), sealed at rest.
    SafetyAtRest,
    /// De-identification: the root of each destination's pseudonym key (UIDs, patient
    /// pseudonyms, date shifts).
    DeidPseudonym,
    /// The re-identification map (pseudonym to real identity per destination), sealed at
    /// rest.
    DeidMapAtRest,
    /// The sealed participant objects of audit records (Patient ID, Study Instance UID of
    /// a DICOM transfer), opened only to render the record as an A.5 audit message.
    AuditParticipants,
}

impl KeyPurpose {
    /// Every purpose, for checks over all labels.
    pub const ALL: [KeyPurpose; 10] = [
        KeyPurpose::SpoolIndex,
        KeyPurpose::Audit,
        KeyPurpose::BookingAtRest,
        KeyPurpose::StaffTotp,
        KeyPurpose::ExchangeX25519,
        KeyPurpose::IdentityAtRest,
        KeyPurpose::SafetyAtRest,
        KeyPurpose::DeidPseudonym,
        KeyPurpose::DeidMapAtRest,
        KeyPurpose::AuditParticipants,
    ];

    /// The HMAC label (fixed forever: changing one makes existing sealed data unreadable).
    pub fn label(self) -> &'static [u8] {
        match self {
            KeyPurpose::SpoolIndex => b"gatewayd spool index key v1",
            KeyPurpose::Audit => b"gatewayd audit key v1",
            KeyPurpose::BookingAtRest => b"gatewayd booking at-rest key v1",
            KeyPurpose::StaffTotp => b"gatewayd staff totp key v1",
            KeyPurpose::ExchangeX25519 => b"gatewayd exchange x25519 key v1",
            KeyPurpose::IdentityAtRest => b"gatewayd identity at-rest key v1",
            KeyPurpose::SafetyAtRest => b"gatewayd safety at-rest key v1",
            KeyPurpose::DeidPseudonym => b"gatewayd deid pseudonym key v1",
            KeyPurpose::DeidMapAtRest => b"gatewayd deid map at-rest key v1",
            KeyPurpose::AuditParticipants => b"gatewayd audit participants key v1",
        }
    }
}

/// A 256-bit key derived from the master key for one [`KeyPurpose`]; zeroed on drop.
#[derive(Clone)]
pub struct DerivedKey(Zeroizing<[u8; KEY_LEN]>);

impl DerivedKey {
    /// The raw key, for building ciphers or MACs. Never log it.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DerivedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DerivedKey(..)")
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

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn derived_keys_match_the_labels_existing_stores_were_sealed_with() {
        // HMAC-SHA-256 over [0x11; 32], computed outside this code (Python's hmac module):
        // a change of label or construction would make every sealed store unreadable.
        let master = MasterKey::from_bytes([0x11; KEY_LEN]);
        let expected = [
            (
                KeyPurpose::SpoolIndex,
                "f7385b3d1dfdc3f519a0da55db036f4c1cd911e111c4d96664cd30501305afb8",
            ),
            (
                KeyPurpose::Audit,
                "6d406e49eb45e5a86ccddb74541e06db94597f4b3cc1386012aecd930e053ae1",
            ),
            (
                KeyPurpose::BookingAtRest,
                "a5d4c087aee9ab4da7a4dbaf027cc027b945d87edcd0c0acb3feda17657b6634",
            ),
            (
                KeyPurpose::StaffTotp,
                "4ebfddaffc785dc97b2e3a00dc2cfb8466220db32ea91f0069778e7154dd037b",
            ),
            (
                KeyPurpose::ExchangeX25519,
                "e57544caf96acfa91325c1aa8cb07d928a7a47d580087fb5e65dc38ace34d3db",
            ),
            (
                KeyPurpose::IdentityAtRest,
                "accb149e64f08ba8d4b6d9c9a0fa7453b02893aca5eea4fe1f4766706eb101d7",
            ),
            (
                KeyPurpose::SafetyAtRest,
                "b8539d4d048da8b19f9bc7dc6246c213304014df788f0400fca2be7445b2d6cd",
            ),
            (
                KeyPurpose::DeidPseudonym,
                "b481fbc65b82386cd1581f2061d092044509c5a98c0062982f98fc135d67b852",
            ),
            (
                KeyPurpose::DeidMapAtRest,
                "aeeae29bb951eeda44d001cf996b759b6122a6ca31d7c9f3c34f34236ec62abb",
            ),
            (
                KeyPurpose::AuditParticipants,
                "025dd7c30fdf025b8721c3af09a34658362c9876f1b2b97c3db7f4953d173f98",
            ),
        ];
        assert_eq!(expected.len(), KeyPurpose::ALL.len());
        for (purpose, want) in expected {
            assert_eq!(hex(master.derive(purpose).expose()), want, "{purpose:?}");
        }
    }

    #[test]
    fn every_purpose_has_its_own_label_and_key() {
        let master = MasterKey::from_bytes([0x22; KEY_LEN]);
        let mut labels = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for purpose in KeyPurpose::ALL {
            assert!(labels.insert(purpose.label()), "{purpose:?} label repeated");
            assert!(
                keys.insert(*master.derive(purpose).expose()),
                "{purpose:?} key repeated"
            );
        }
        assert!(!format!("{:?}", master.derive(KeyPurpose::Audit)).contains("22"));
    }

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
