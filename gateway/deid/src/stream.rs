//! The streaming de-identifier: a Part 10 object in, its de-identified Part 10 object out,
//! fed in chunks of any size, holding only element headers, the file meta group and the
//! few values it must rewrite (bounded), never the whole object.
//!
//! SKELETON: the engine is being written (see the crate README for the rules).

use crate::profile::Profile;
use crate::pseudonym::DestinationKey;

/// Largest value the rewriter holds to rewrite it (UIDs, dates, text to clean); a larger
/// value with such an action is an error ([`DeidError::ValueTooLarge`]).
pub const MAX_HELD_VALUE: u32 = 64 * 1024;

/// What the rewriter must know of the object's subject before it starts, read from the
/// top-level data set by [`Subject::scan`] (Patient ID comes after the dates and names it
/// shifts and replaces, so a stream cannot learn it on the way).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Subject {
    /// Patient ID (0010,0020), trimmed; empty when absent.
    pub patient_id: String,
    /// Issuer of Patient ID (0010,0021), trimmed; empty when absent.
    pub issuer: String,
    /// Values that identify the subject (each component of Patient's Name and of other
    /// names, Patient ID, Other Patient IDs, birth date, Accession Number, institution and
    /// physician names): a cleaned text that contains one of them (case-insensitive) is
    /// replaced. Only strings of at least 2 characters.
    pub identifying: Vec<String>,
    /// Study Instance UID (0020,000D), trimmed; empty when absent.
    pub study_uid: String,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject").finish_non_exhaustive()
    }
}

impl Subject {
    /// Reads the subject from a Part 10 object or a prefix of it (the top-level data set
    /// up to (0020,000D) at least, or the whole object).
    pub fn scan(_part10: &[u8]) -> Result<Self, DeidError> {
        Err(DeidError::Unsupported {
            what: "not implemented yet",
        })
    }
}

/// Why an object is held back from a destination (a dead letter with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldReason {
    /// Burned In Annotation (0028,0301) is YES.
    #[error("Burned In Annotation (0028,0301) is YES: identity may be in the pixels")]
    BurnedInAnnotation,
    /// A SOP class that usually carries text in its pixels (secondary capture, ultrasound),
    /// unless Burned In Annotation says NO.
    #[error(
        "SOP class {sop_class} often carries identity in its pixels and Burned In Annotation (0028,0301) is not NO"
    )]
    PixelText { sop_class: String },
    /// An encapsulated document (PDF, CDA, ...): its content is not de-identified.
    #[error("SOP class {sop_class} encapsulates a document whose content cannot be de-identified")]
    EncapsulatedDocument { sop_class: String },
}

/// Why an object could not be de-identified. Names tags and offsets, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeidError {
    #[error("held for de-identification: {0}")]
    Held(HoldReason),
    #[error("malformed object at byte {offset}: {problem}")]
    Malformed { offset: u64, problem: &'static str },
    #[error(
        "({group:04X},{element:04X}) is {len} bytes, longer than a value the de-identifier rewrites"
    )]
    ValueTooLarge { group: u16, element: u16, len: u32 },
    #[error("cannot de-identify: {what}")]
    Unsupported { what: &'static str },
}

/// What the rewriter did, for the re-identification map.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Deidentified {
    /// The pseudonymous Patient ID written (also as Patient's Name).
    pub pseudo_patient_id: String,
    /// The pseudonymous Study Instance UID written (empty when the object had none or the
    /// profile keeps UIDs).
    pub pseudo_study_uid: String,
    /// The pseudonymous SOP Instance UID written.
    pub pseudo_sop_instance_uid: String,
}

impl std::fmt::Debug for Deidentified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deidentified").finish_non_exhaustive()
    }
}

/// The streaming rewriter of one object.
#[derive(Debug)]
pub struct Deidentifier {
    _profile: Profile,
    _key: DestinationKey,
    _subject: Subject,
    _accept_burned_in: bool,
}

impl Deidentifier {
    /// A rewriter for one object. `accept_burned_in`: the destination takes objects with
    /// text in their pixels (no [`HoldReason`] is raised).
    pub fn new(
        profile: Profile,
        key: DestinationKey,
        subject: Subject,
        accept_burned_in: bool,
    ) -> Self {
        Self {
            _profile: profile,
            _key: key,
            _subject: subject,
            _accept_burned_in: accept_burned_in,
        }
    }

    /// Takes the next bytes of the Part 10 object and appends what can be written so far.
    pub fn feed(&mut self, _input: &[u8], _out: &mut Vec<u8>) -> Result<(), DeidError> {
        Err(DeidError::Unsupported {
            what: "not implemented yet",
        })
    }

    /// The input ended: appends the rest, or fails if it ended inside an element.
    pub fn finish(self, _out: &mut Vec<u8>) -> Result<Deidentified, DeidError> {
        Err(DeidError::Unsupported {
            what: "not implemented yet",
        })
    }
}

/// De-identifies a whole Part 10 object held in memory: [`Subject::scan`], then the
/// rewriter fed in chunks.
pub fn deidentify(
    part10: &[u8],
    profile: &Profile,
    key: &DestinationKey,
    accept_burned_in: bool,
) -> Result<(Vec<u8>, Deidentified), DeidError> {
    let subject = Subject::scan(part10)?;
    let mut d = Deidentifier::new(profile.clone(), key.clone(), subject, accept_burned_in);
    let mut out = Vec::with_capacity(part10.len());
    for chunk in part10.chunks(256 * 1024) {
        d.feed(chunk, &mut out)?;
    }
    let done = d.finish(&mut out)?;
    Ok((out, done))
}
