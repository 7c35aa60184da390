//! Object ids and the keyed MACs the index stores instead of identifiers.
//!
//! Each is its own type, so that an object id cannot stand where a MAC is meant, nor a
//! content MAC where a UID MAC is meant (the index keys concatenate them). The encodings
//! are the bare byte arrays of before (`#[serde(transparent)]`, raw bytes in sled keys and
//! the journal): spools written by earlier builds open unchanged.
//!
//! `Debug` of a MAC prints its type only: a MAC is a stable pseudonym of a patient's
//! study or instance, and logs must not let anyone link records across systems.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Object id: 16 random bytes, shown as 32 hex digits (the blob's file name).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId([u8; 16]);

impl ObjectId {
    /// Length in bytes.
    pub const LEN: usize = 16;

    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// 32 lowercase hex digits, as in file names and logs.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A fresh random id.
    pub(crate) fn random() -> Result<Self, getrandom::Error> {
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id)?;
        Ok(Self(id))
    }
}

impl TryFrom<&[u8]> for ObjectId {
    type Error = std::array::TryFromSliceError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        <[u8; 16]>::try_from(bytes).map(Self)
    }
}

impl AsRef<[u8]> for ObjectId {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", self.to_hex())
    }
}

macro_rules! keyed_mac {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name([u8; 32]);

        impl $name {
            pub(crate) const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        /// Redacted: a MAC is a pseudonym of patient data.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }
    };
}

keyed_mac! {
    /// HMAC-SHA-256 of what identifies an object for dedupe and lookup: a DICOM object's
    /// SOP Instance UID, or an HL7 message's sending application, facility and MSH-10.
    UidMac
}

keyed_mac! {
    /// HMAC-SHA-256 of an object's plaintext (dedupe of identical resends, `verify`).
    ContentMac
}

keyed_mac! {
    /// HMAC-SHA-256 of a DICOM object's Study Instance UID: equal keys, one study (the
    /// uplink batches a study's instances).
    StudyMac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_ids_but_never_macs() {
        let id = ObjectId::from_bytes([0xab; 16]);
        assert_eq!(format!("{id:?}"), format!("ObjectId({})", "ab".repeat(16)));
        assert_eq!(id.to_string(), "ab".repeat(16));
        let mac = UidMac::from_bytes([0xcd; 32]);
        assert_eq!(format!("{mac:?}"), "UidMac(..)");
        assert_eq!(
            format!("{:?}", Some(StudyMac::from_bytes([0xcd; 32]))),
            "Some(StudyMac(..))"
        );
        assert_eq!(
            format!("{:?}", ContentMac::from_bytes([1; 32])),
            "ContentMac(..)"
        );
    }
}
