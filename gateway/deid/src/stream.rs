//! The streaming de-identifier: a Part 10 object in, its de-identified Part 10 object out,
//! fed in chunks of any size, holding only element headers, the file meta group and the
//! few values it must rewrite (bounded), never the whole object.
//!
//! - The file meta group is buffered whole (at most 64 KiB) and rewritten: Media Storage
//!   SOP Instance UID mapped like (0008,0018), Source/Sending/Receiving AE Titles and
//!   private information removed, group length recomputed, preamble zeroed.
//! - The data set (Implicit VR LE, Explicit VR LE or BE, deflated, or any encapsulated
//!   syntax) goes through a push-mode state machine: each element header is read, the
//!   profile decides, and the value is passed through (kept: copied once, never held),
//!   skipped (removed), or held (at most [`MAX_HELD_VALUE`]) and rewritten (UIDs, dates,
//!   text to clean). Sequences and items are followed 64 levels deep; those written are
//!   written with undefined length. A deflated data set is inflated, rewritten and
//!   deflated again in fixed-size blocks, so the output never depends on the split.
//! - The de-identification attributes (0012,0062/0063/0064) and (0028,0303) are written
//!   at their place in tag order.
//!
//! The crate README lists the rules and the choices made where the standard leaves room.
//! Nothing panics on any input; errors name tags and offsets, never values.

mod rewrite;
mod scan;
mod values;

use std::collections::HashMap;

use gateway_dicom::charset::SpecificCharset;
use gateway_dicom::element::Encoding;

use crate::profile::{Action, Profile, ProfileOption};
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

/// Deepest nesting of sequences and items followed.
const MAX_DEPTH: usize = 64;

/// What the rewriter knows and decides for one object, shared by the file meta group and
/// the data set stages.
struct Ctx {
    profile: Profile,
    key: DestinationKey,
    accept_burned_in: bool,
    /// Days dates move back (the modified-dates option).
    days: u32,
    /// [`Subject::identifying`], lower-cased.
    identifying: Vec<String>,
    /// The data set's Specific Character Set, once read (`None`: not decodable here).
    charset: Option<SpecificCharset>,
    /// The pseudonymous Patient ID (also written as Patient's Name).
    pseudo_patient_id: String,
    /// UIDs are mapped (SOP Instance UID is not kept by an option).
    map_uids: bool,
    /// The SOP class of the file meta group usually carries text in its pixels: held
    /// unless Burned In Annotation says NO.
    pixel_text: Option<String>,
    done: Deidentified,
    actions: HashMap<(u32, bool), Option<Action>>,
}

impl Ctx {
    fn action(&mut self, tag: u32, is_uid: bool) -> Option<Action> {
        let profile = &self.profile;
        *self
            .actions
            .entry((tag, is_uid))
            .or_insert_with(|| profile.action(tag, is_uid))
    }
}

/// The SOP classes held unless Burned In Annotation is NO: secondary capture and
/// ultrasound.
const PIXEL_TEXT_CLASSES: [&str; 8] = [
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
    "1.2.840.10008.5.1.4.1.1.6.1",
    "1.2.840.10008.5.1.4.1.1.6.2",
    "1.2.840.10008.5.1.4.1.1.3.1",
];
/// Encapsulated documents (PDF, CDA, STL, OBJ, MTL): always held.
const ENCAPSULATED_DOCUMENT_ROOT: &str = "1.2.840.10008.5.1.4.1.1.104.";

enum Phase {
    /// Buffering the preamble and the file meta group.
    Meta(Vec<u8>),
    /// Rewriting the data set.
    Data(Box<rewrite::Body>),
}

/// The streaming rewriter of one object. After an error it only repeats that error.
pub struct Deidentifier {
    ctx: Ctx,
    phase: Phase,
    failed: Option<DeidError>,
}

impl std::fmt::Debug for Deidentifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deidentifier")
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
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
        let days = key.day_shift(&subject.issuer, &subject.patient_id);
        let pseudo_patient_id = key.patient_id(&subject.issuer, &subject.patient_id);
        let map_uids = profile.action(0x0008_0018, true) == Some(Action::Uid);
        let identifying = subject
            .identifying
            .iter()
            .map(|s| s.to_lowercase())
            .filter(|s| s.chars().count() >= 2)
            .collect();
        let done = Deidentified {
            pseudo_patient_id: pseudo_patient_id.clone(),
            ..Deidentified::default()
        };
        Self {
            ctx: Ctx {
                profile,
                key,
                accept_burned_in,
                days,
                identifying,
                charset: Some(SpecificCharset::Default),
                pseudo_patient_id,
                map_uids,
                pixel_text: None,
                done,
                actions: HashMap::new(),
            },
            phase: Phase::Meta(Vec::new()),
            failed: None,
        }
    }

    /// Takes the next bytes of the Part 10 object and appends what can be written so far.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), DeidError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.feed_inner(input, out, false);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    fn feed_inner(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        at_end: bool,
    ) -> Result<(), DeidError> {
        match &mut self.phase {
            Phase::Data(body) => body.feed(input, out, &mut self.ctx),
            Phase::Meta(buf) => {
                buf.extend_from_slice(input);
                let meta = match scan::parse_meta(buf, at_end)? {
                    scan::MetaProgress::NeedMore => return Ok(()),
                    scan::MetaProgress::Done(meta) => meta,
                };
                let buf = std::mem::take(buf);
                self.start_data(&meta, &buf, out)?;
                let rest = buf.get(meta.end..).unwrap_or_default();
                match &mut self.phase {
                    Phase::Data(body) => body.feed(rest, out, &mut self.ctx),
                    Phase::Meta(_) => Ok(()),
                }
            }
        }
    }

    /// Writes the rewritten preamble and file meta group, decides the SOP class holds, and
    /// starts the data set stage.
    fn start_data(
        &mut self,
        meta: &scan::Meta,
        buf: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), DeidError> {
        let class = meta.sop_class.as_str();
        if !self.ctx.accept_burned_in {
            if class.starts_with(ENCAPSULATED_DOCUMENT_ROOT) {
                return Err(DeidError::Held(HoldReason::EncapsulatedDocument {
                    sop_class: class.chars().take(64).collect(),
                }));
            }
            if PIXEL_TEXT_CLASSES.contains(&class) {
                self.ctx.pixel_text = Some(class.to_string());
            }
        }
        out.extend_from_slice(&[0u8; 128]);
        out.extend_from_slice(b"DICM");
        let mut group = Vec::with_capacity(meta.end);
        for e in &meta.elements {
            match e.element {
                // Group length (recomputed); Source, Sending and Receiving AE Titles;
                // Private Information Creator UID and Private Information.
                0x0000 | 0x0016 | 0x0017 | 0x0018 | 0x0100 | 0x0102 => {}
                0x0003 if self.ctx.map_uids => {
                    let value = values::map_uids(
                        buf.get(e.value..e.end).unwrap_or_default(),
                        &self.ctx.key,
                    );
                    rewrite::write_element(
                        &mut group,
                        Encoding::EXPLICIT_LE,
                        0x0002_0003,
                        Some(*b"UI"),
                        &value,
                    )?;
                }
                _ => group.extend_from_slice(buf.get(e.start..e.end).unwrap_or_default()),
            }
        }
        let len = u32::try_from(group.len()).map_err(|_| DeidError::Unsupported {
            what: "file meta group longer than 64 KiB",
        })?;
        rewrite::write_element(
            out,
            Encoding::EXPLICIT_LE,
            0x0002_0000,
            Some(*b"UL"),
            &len.to_le_bytes(),
        )?;
        out.extend_from_slice(&group);
        let enc = Encoding::of_transfer_syntax(&meta.transfer_syntax);
        self.phase = Phase::Data(Box::new(rewrite::Body::new(enc, &self.ctx)?));
        Ok(())
    }

    /// The input ended: appends the rest, or fails if it ended inside an element.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<Deidentified, DeidError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if matches!(self.phase, Phase::Meta(_)) {
            self.feed_inner(&[], out, true)?;
        }
        let Phase::Data(body) = self.phase else {
            return Err(DeidError::Malformed {
                offset: 0,
                problem: "object ends inside the file meta group",
            });
        };
        body.finish(out, &mut self.ctx)?;
        if let Some(sop_class) = self.ctx.pixel_text.take() {
            return Err(DeidError::Held(HoldReason::PixelText { sop_class }));
        }
        Ok(self.ctx.done)
    }
}

impl Deidentifier {
    /// Rewrites a whole object held in memory, fed in chunks as a stream would be.
    pub fn rewrite_all(mut self, part10: &[u8]) -> Result<(Vec<u8>, Deidentified), DeidError> {
        let mut out = Vec::with_capacity(part10.len().saturating_add(1024));
        for chunk in part10.chunks(256 * 1024) {
            self.feed(chunk, &mut out)?;
        }
        let done = self.finish(&mut out)?;
        Ok((out, done))
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
    Deidentifier::new(profile.clone(), key.clone(), subject, accept_burned_in).rewrite_all(part10)
}
