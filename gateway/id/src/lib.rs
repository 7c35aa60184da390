//! The topic-safe identifier: 1 to 64 characters of `[A-Za-z0-9._-]`.
//!
//! Node ids, device ids, fleet operation and command ids, exchange peer ids, slot,
//! appointment and request ids all follow this one rule, because each of them ends up in
//! an MQTT topic, a file name or a log line. Nothing that passes [`Id::parse`] can inject
//! `/`, `+`, `#`, a space, NUL or non-ASCII into a topic, and every [`Id`] is safe to log
//! and to echo in an error. A value that fails is never echoed back ([`InvalidId`] names
//! only which id was wrong).
//!
//! This crate is the one definition of the rule; every other crate parses ids through it.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

/// Longest identifier.
pub const MAX_LEN: usize = 64;

/// True for 1..=64 characters of `[A-Za-z0-9._-]`.
pub fn is_valid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `uid` without its DICOM padding (trailing NUL or space) if it is a valid DICOM UID:
/// 1 to 64 characters, numeric components separated by single dots. Such a value is safe
/// in a URL path, a file name and a log line, like an [`Id`]; it is the one UID check of
/// the gateway's wire formats (QIDO-RS answers, results notices, dose reports).
pub fn dicom_uid(uid: &str) -> Option<&str> {
    let uid = uid.trim_end_matches(['\0', ' ']);
    let ok = !uid.is_empty()
        && uid.len() <= 64
        && uid
            .split('.')
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()));
    ok.then_some(uid)
}

/// True if `s` is a valid DICOM UID as it stands, without padding ([`dicom_uid`]).
pub fn is_dicom_uid(s: &str) -> bool {
    dicom_uid(s) == Some(s)
}

/// An identifier that is not 1..=64 of `[A-Za-z0-9._-]`. Does not carry the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be 1 to 64 characters of A-Z a-z 0-9 . _ -")]
pub struct InvalidId {
    /// Which identifier, e.g. "device id", "node.id", "request id".
    pub what: &'static str,
}

/// A validated topic-safe identifier.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Id(String);

impl Id {
    /// Validates `s` with [`is_valid`]; `what` names the id in the error.
    pub fn parse(s: &str, what: &'static str) -> Result<Id, InvalidId> {
        if is_valid(s) {
            Ok(Id(s.to_owned()))
        } else {
            Err(InvalidId { what })
        }
    }

    /// Like [`Id::parse`], taking ownership of the string.
    pub fn from_string(s: String, what: &'static str) -> Result<Id, InvalidId> {
        if is_valid(&s) {
            Ok(Id(s))
        } else {
            Err(InvalidId { what })
        }
    }

    /// The id as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl FromStr for Id {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Id, InvalidId> {
        Id::parse(s, "identifier")
    }
}

impl TryFrom<String> for Id {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Id, InvalidId> {
        Id::from_string(s, "identifier")
    }
}

impl TryFrom<&str> for Id {
    type Error = InvalidId;
    fn try_from(s: &str) -> Result<Id, InvalidId> {
        Id::parse(s, "identifier")
    }
}

impl From<Id> for String {
    fn from(id: Id) -> String {
        id.0
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Id {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Id {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Id {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        let s = String::deserialize(d)?;
        Id::from_string(s, "identifier").map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dicom_uid_strips_padding_and_refuses_what_is_not_a_uid() {
        assert_eq!(super::dicom_uid("1.2.840.10008\0"), Some("1.2.840.10008"));
        assert_eq!(super::dicom_uid("1.2 "), Some("1.2"));
        assert!(super::is_dicom_uid("1.2") && !super::is_dicom_uid("1.2 "));
        let long = "1".repeat(65);
        for bad in [
            "",
            "1..2",
            ".1",
            "1.",
            "1.2a",
            "1/2",
            "1.2.\u{0663}",
            long.as_str(),
        ] {
            assert_eq!(super::dicom_uid(bad), None, "{bad}");
        }
    }

    use super::*;

    #[test]
    fn accepts_the_topic_safe_alphabet_up_to_64_characters() {
        for ok in ["a", "gw-0001", "clinic.a_1", &"x".repeat(64), "A.B-C_d9"] {
            assert!(is_valid(ok), "{ok}");
            assert_eq!(
                Id::parse(ok, "t").map(|i| i.to_string()).ok(),
                Some(ok.to_string())
            );
        }
    }

    #[test]
    fn refuses_topic_metacharacters_space_nul_non_ascii_empty_and_too_long() {
        for bad in [
            "",
            "a/b",
            "a+b",
            "#",
            "a b",
            "a\0b",
            "山田",
            "é",
            &"x".repeat(65),
            "a\nb",
        ] {
            assert!(!is_valid(bad), "{bad:?}");
            assert_eq!(
                Id::parse(bad, "device id"),
                Err(InvalidId { what: "device id" })
            );
        }
    }

    #[test]
    fn the_error_never_echoes_the_value() {
        let e = Id::parse("secret/山田", "request id").unwrap_err();
        let shown = e.to_string();
        assert!(
            !shown.contains("secret") && !shown.contains("山田"),
            "{shown}"
        );
        assert!(shown.starts_with("request id"), "{shown}");
    }

    #[test]
    fn deserialising_validates_and_serialising_is_the_plain_string() {
        let id: Id = serde_json::from_str("\"gw-1\"").unwrap();
        assert_eq!(id, "gw-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"gw-1\"");
        assert!(serde_json::from_str::<Id>("\"a/b\"").is_err());
    }
}
