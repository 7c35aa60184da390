//! Keyed, deterministic pseudonyms of one destination: UIDs, the patient's ID and the
//! per-patient date shift. The key is derived from the master key (purpose
//! [`KeyPurpose::DeidPseudonym`]) and the destination's name, so the same study always maps
//! to the same pseudonymous UIDs for one destination, two destinations cannot link their
//! pseudonyms, and a crypto-shred (`keys wipe`) destroys the mapping.

use gateway_keystore::{KeyPurpose, MasterKey};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// The pseudonym key of one destination. Never logged.
#[derive(Clone)]
pub struct DestinationKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for DestinationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DestinationKey(..)")
    }
}

/// Days a shifted date moves back, at least.
pub const SHIFT_MIN_DAYS: u32 = 365;
/// Days a shifted date moves back, at most.
pub const SHIFT_MAX_DAYS: u32 = 3650;

impl DestinationKey {
    /// HMAC-SHA-256(derive(DeidPseudonym), "destination\0" || name).
    pub fn derive(master: &MasterKey, destination: &str) -> Self {
        let purpose = master.derive(KeyPurpose::DeidPseudonym);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(purpose.expose())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"destination\0");
        mac.update(destination.as_bytes());
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&mac.finalize().into_bytes());
        Self(key)
    }

    /// A key from raw bytes (tests, fuzzing).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    fn mac(&self, domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(domain);
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// The pseudonymous UID of `uid` (trailing NUL/space padding ignored): `2.25.` and the
    /// decimal of 128 bits of HMAC (at most 44 characters, a valid UID).
    pub fn uid(&self, uid: &str) -> String {
        let uid = uid.trim_end_matches(['\0', ' ']);
        let h = self.mac(b"uid", &[uid.as_bytes()]);
        let mut n = [0u8; 16];
        n.copy_from_slice(h.get(..16).unwrap_or(&[0u8; 16]));
        format!("2.25.{}", u128::from_be_bytes(n))
    }

    /// The pseudonymous Patient ID of a patient (`issuer` is Issuer of Patient ID, empty
    /// when absent): `ANON` and 16 upper-case hex digits.
    pub fn patient_id(&self, issuer: &str, id: &str) -> String {
        let h = self.mac(b"patient", &[issuer.as_bytes(), id.as_bytes()]);
        format!("ANON{}", hex::encode_upper(h.get(..8).unwrap_or(&[])))
    }

    /// Days every date of this patient moves back ([`SHIFT_MIN_DAYS`]..=[`SHIFT_MAX_DAYS`]).
    pub fn day_shift(&self, issuer: &str, id: &str) -> u32 {
        let h = self.mac(b"date shift", &[issuer.as_bytes(), id.as_bytes()]);
        let mut n = [0u8; 4];
        n.copy_from_slice(h.get(..4).unwrap_or(&[0u8; 4]));
        SHIFT_MIN_DAYS + u32::from_be_bytes(n) % (SHIFT_MAX_DAYS - SHIFT_MIN_DAYS + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_deterministic_per_destination_and_valid() {
        let master = MasterKey::from_bytes([7; 32]);
        let a = DestinationKey::derive(&master, "research");
        let a2 = DestinationKey::derive(&master, "research");
        let b = DestinationKey::derive(&master, "teaching");
        let uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320";
        assert_eq!(a.uid(uid), a2.uid(&format!("{uid}\0")));
        assert_ne!(a.uid(uid), b.uid(uid));
        let p = a.uid(uid);
        assert!(p.len() <= 64 && p.starts_with("2.25."));
        assert!(p[5..].bytes().all(|c| c.is_ascii_digit()));
        assert!(!p[5..].starts_with('0') || p.len() == 6);
        assert_eq!(a.patient_id("", "P1"), a2.patient_id("", "P1"));
        assert_ne!(a.patient_id("", "P1"), a.patient_id("HOSP", "P1"));
        assert_eq!(a.patient_id("", "P1").len(), 20);
        let shift = a.day_shift("", "P1");
        assert!((SHIFT_MIN_DAYS..=SHIFT_MAX_DAYS).contains(&shift));
        // Another master key (after a crypto-shred) maps nothing the same.
        let other = DestinationKey::derive(&MasterKey::from_bytes([8; 32]), "research");
        assert_ne!(other.uid(uid), a.uid(uid));
    }
}
