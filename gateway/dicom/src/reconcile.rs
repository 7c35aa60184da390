//! Patient ID reconciliation of returned results (IHE IRWF): a push-mode rewriter over a
//! DICOM Part 10 byte stream, and a reader of the identifiers that match an object to its
//! booking.
//!
//! [`Rewriter`] sits between a WADO-RS response body and a spool ingest. It buffers the
//! preamble, the file meta group and the data set's top-level elements up to Other Patient
//! IDs Sequence (0010,1002) (at most [`MAX_PREFIX`] bytes, else
//! [`ReconcileError::PrefixTooLong`]), rewrites them, and from then on passes every byte
//! through unchanged, so a 500 MB object never sits in memory. The output does not depend on
//! how the input was split into chunks.
//!
//! The rewrite:
//! - Patient ID (0010,0020) := the clinic's ID; Issuer of Patient ID (0010,0021) := the
//!   clinic's issuer (both inserted when absent).
//! - Other Patient IDs Sequence (0010,1002) gets one more item after the ones it has (kept
//!   byte for byte, in the sequence's own length form): the core's Patient ID, the core's
//!   Issuer of Patient ID when it had one, Type of Patient ID (0010,0022) `TEXT`, and the
//!   core's Issuer of Patient ID Qualifiers Sequence (0010,0024) when it had one (it
//!   describes the core's issuer, so it moves into the item). No item is added when the
//!   object had no (or an empty) Patient ID.
//! - An object that already carries the clinic's ID and issuer passes through unchanged.
//! - A Group Length (0010,0000) is dropped (it would be stale; PS3.5 7.2 retires group
//!   lengths in data sets).
//! - Elements stay in ascending tag order; new values are padded to even length with a
//!   space (LO, CS). The clinic's values must be 1 to 64 printable ASCII characters without
//!   backslash or leading/trailing spaces (they are then valid in every character set).
//!
//! Encodings: Explicit VR Little Endian (and every encapsulated transfer syntax, whose data
//! set is Explicit VR LE) and Implicit VR Little Endian. Explicit VR Big Endian and the
//! deflated syntaxes are refused with [`ReconcileError::Unsupported`] (the caller dead-letters
//! the object). The file meta group and every element not named above are copied unchanged;
//! the bytes after the rewritten prefix are not checked here.
//!
//! [`read_identifiers`] reads a Part 10 object (whole, or a prefix reaching past Study
//! Instance UID (0020,000D)) and returns its top-level Patient ID, Issuer of Patient ID,
//! Accession Number, Study and SOP Instance UIDs.
//!
//! Element headers are read by the crate's one header reader (`element`). Nothing here
//! panics on any input, and no error or `Debug` output carries a value (errors name tags
//! and offsets only).

use crate::charset::{self, SpecificCharset};
use crate::element::{self, Encoding, ITEM_GROUP, SHORT_HEADER, UNDEFINED_LENGTH};

/// Largest prefix (preamble, file meta group and data set up to group 0010) the rewriter
/// buffers.
pub const MAX_PREFIX: usize = 1 << 20;
/// Deepest nesting of undefined-length sequences and items followed in the prefix.
const MAX_DEPTH: usize = 64;
/// Bytes of the preamble and the `DICM` prefix.
const PREAMBLE_AND_MAGIC: usize = 132;
/// Largest LO value (characters).
const LO_MAX: usize = 64;

const TRANSFER_SYNTAX: u32 = 0x0002_0010;
const MEDIA_SOP_INSTANCE: u32 = 0x0002_0003;
const SPECIFIC_CHARSET: u32 = 0x0008_0005;
const SOP_INSTANCE: u32 = 0x0008_0018;
const ACCESSION: u32 = 0x0008_0050;
const PATIENT_ID: u32 = 0x0010_0020;
const ISSUER: u32 = 0x0010_0021;
const TYPE_OF_PATIENT_ID: u32 = 0x0010_0022;
const ISSUER_QUALIFIERS: u32 = 0x0010_0024;
/// Group Length (0010,0000): retired in data sets, and stale once group 0010 changes.
const PATIENT_GROUP_LENGTH: u32 = 0x0010_0000;
const OTHER_PATIENT_IDS: u32 = 0x0010_1002;
const STUDY_INSTANCE: u32 = 0x0020_000D;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_END: u32 = 0xFFFE_E00D;
const SEQUENCE_END: u32 = 0xFFFE_E0DD;

/// Why an object cannot be reconciled or read. Names tags, offsets and transfer syntaxes,
/// never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconcileError {
    #[error(
        "clinic {field} is not a usable LO value (1 to 64 printable ASCII characters, no backslash, no leading or trailing space)"
    )]
    InvalidClinicIdentity { field: &'static str },
    #[error("not a DICOM Part 10 stream (no DICM prefix after the preamble)")]
    NotPart10,
    #[error("malformed file meta group at byte {offset}")]
    BadMeta { offset: u64 },
    #[error("transfer syntax {transfer_syntax} is not supported (big endian or deflated)")]
    Unsupported { transfer_syntax: String },
    #[error("object ends inside an element or sequence (at byte {offset})")]
    Truncated { offset: u64 },
    #[error("unexpected ({group:04X},{element:04X}) at byte {offset}")]
    Unexpected {
        group: u16,
        element: u16,
        offset: u64,
    },
    #[error("sequences nested deeper than {max} levels at byte {offset}")]
    TooDeep { max: usize, offset: u64 },
    #[error("the data set's elements up to group 0010 do not end within the first {max} bytes")]
    PrefixTooLong { max: usize },
    #[error("Other Patient IDs Sequence at byte {offset} is not encoded as a sequence")]
    NotASequence { offset: u64 },
    #[error("({group:04X},{element:04X}) would become too long")]
    TooLong { group: u16, element: u16 },
    #[error("value of ({group:04X},{element:04X}) cannot be decoded in its character set")]
    Text { group: u16, element: u16 },
}

/// The clinic's Patient ID and its issuer (assigning authority), written into returned
/// results. `Debug` does not show the Patient ID.
#[derive(Clone, PartialEq, Eq)]
pub struct ClinicIdentity {
    pub patient_id: String,
    pub issuer: String,
}

impl std::fmt::Debug for ClinicIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClinicIdentity")
            .field("patient_id", &"<redacted>")
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl ClinicIdentity {
    /// Checks that both values can be written as LO in any character set.
    pub fn validate(&self) -> Result<(), ReconcileError> {
        for (field, value) in [("patient_id", &self.patient_id), ("issuer", &self.issuer)] {
            let ok = !value.is_empty()
                && value.len() <= LO_MAX
                && value
                    .bytes()
                    .all(|b| (0x20..=0x7E).contains(&b) && b != b'\\')
                && !value.starts_with(' ')
                && !value.ends_with(' ');
            if !ok {
                return Err(ReconcileError::InvalidClinicIdentity { field });
            }
        }
        Ok(())
    }
}

/// What the rewriter did with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// Transfer Syntax UID of the file meta group.
    pub transfer_syntax: String,
    /// Media Storage SOP Instance UID (0002,0003) of the file meta group, if any.
    pub sop_instance_uid: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// False when the object already carried the clinic's ID and issuer.
    pub changed: bool,
    /// An Other Patient IDs item with the core's Patient ID was added.
    pub core_id_kept: bool,
}

/// The top-level identifiers of an object. `Debug` shows UIDs only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Identifiers {
    pub patient_id: Option<String>,
    pub issuer_of_patient_id: Option<String>,
    pub accession_number: Option<String>,
    pub study_instance_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    pub transfer_syntax: String,
}

impl std::fmt::Debug for Identifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("Identifiers")
            .field("patient_id", &shown(&self.patient_id))
            .field("issuer_of_patient_id", &shown(&self.issuer_of_patient_id))
            .field("accession_number", &shown(&self.accession_number))
            .field("study_instance_uid", &self.study_instance_uid)
            .field("sop_instance_uid", &self.sop_instance_uid)
            .field("transfer_syntax", &self.transfer_syntax)
            .finish()
    }
}

/// Reads the top-level identifiers of a Part 10 object (preamble, `DICM`, file meta group,
/// data set). `bytes` is the whole object or a prefix of it reaching past Study Instance UID
/// (0020,000D); a prefix that ends inside an element before that is
/// [`ReconcileError::Truncated`], one that ends on an element boundary is taken as the whole
/// object (absent elements are `None`). Text values are decoded in the data set's Specific
/// Character Set and trimmed of padding; an empty value is `None`.
pub fn read_identifiers(bytes: &[u8]) -> Result<Identifiers, ReconcileError> {
    let mut scan = Scan::new(STUDY_INSTANCE);
    if scan.run(bytes)? == Progress::NeedMore {
        scan.at_end(bytes)?;
    }
    let charset = scan
        .value(bytes, SPECIFIC_CHARSET)
        .map(|v| {
            let terms: Vec<&str> = std::str::from_utf8(v).unwrap_or("").split('\\').collect();
            SpecificCharset::from_terms(&terms).ok()
        })
        .unwrap_or(Some(SpecificCharset::Default));
    let text = |tag: u32| -> Result<Option<String>, ReconcileError> {
        let Some(v) = scan.value(bytes, tag) else {
            return Ok(None);
        };
        let decoded = if v.is_ascii() {
            Some(v.iter().map(|b| char::from(*b)).collect::<String>())
        } else {
            charset.as_ref().and_then(|c| charset::decode(v, c).ok())
        };
        let Some(s) = decoded else {
            return Err(ReconcileError::Text {
                group: (tag >> 16) as u16,
                element: tag as u16,
            });
        };
        let s = s.trim_matches([' ', '\0']);
        Ok((!s.is_empty()).then(|| s.to_string()))
    };
    Ok(Identifiers {
        patient_id: text(PATIENT_ID)?,
        issuer_of_patient_id: text(ISSUER)?,
        accession_number: text(ACCESSION)?,
        study_instance_uid: text(STUDY_INSTANCE)?,
        sop_instance_uid: text(SOP_INSTANCE)?,
        transfer_syntax: scan.transfer_syntax.clone().unwrap_or_default(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Buffering the prefix.
    Prefix,
    /// The prefix was rewritten; bytes pass through.
    Pass,
}

/// The streaming Patient ID rewriter: [`Rewriter::feed`] the Part 10 bytes as they arrive,
/// then [`Rewriter::finish`]. Output bytes are appended to the `out` given to each call.
/// After an error the rewriter only repeats that error.
#[derive(Debug)]
pub struct Rewriter {
    clinic: ClinicIdentity,
    max_prefix: usize,
    buf: Vec<u8>,
    scan: Scan,
    phase: Phase,
    failed: Option<ReconcileError>,
    bytes_in: u64,
    bytes_out: u64,
    changed: bool,
    core_id_kept: bool,
}

impl Rewriter {
    /// A rewriter writing `clinic` into the object. An invalid identity (see
    /// [`ClinicIdentity::validate`]) is reported by the first `feed` or `finish`.
    pub fn new(clinic: ClinicIdentity) -> Self {
        Self::with_max_prefix(clinic, MAX_PREFIX)
    }

    /// As [`Rewriter::new`], buffering at most `max_prefix` bytes.
    pub fn with_max_prefix(clinic: ClinicIdentity, max_prefix: usize) -> Self {
        let failed = clinic.validate().err();
        Self {
            clinic,
            max_prefix,
            buf: Vec::new(),
            scan: Scan::new(OTHER_PATIENT_IDS),
            phase: Phase::Prefix,
            failed,
            bytes_in: 0,
            bytes_out: 0,
            changed: false,
            core_id_kept: false,
        }
    }

    /// Consumes the next bytes of the object.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), ReconcileError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.bytes_in += input.len() as u64;
        let result = self.feed_inner(input, out);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    fn feed_inner(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), ReconcileError> {
        if self.phase == Phase::Pass {
            out.extend_from_slice(input);
            self.bytes_out += input.len() as u64;
            return Ok(());
        }
        let room = self.max_prefix.saturating_sub(self.buf.len());
        let (head, rest) = input.split_at_checked(room).unwrap_or((input, &[]));
        self.buf.extend_from_slice(head);
        match self.scan.run(&self.buf)? {
            Progress::Stopped(at) => {
                self.emit(at, out)?;
                out.extend_from_slice(rest);
                self.bytes_out += rest.len() as u64;
                self.buf = Vec::new();
                self.phase = Phase::Pass;
                Ok(())
            }
            Progress::NeedMore if self.buf.len() >= self.max_prefix => {
                Err(ReconcileError::PrefixTooLong {
                    max: self.max_prefix,
                })
            }
            Progress::NeedMore => Ok(()),
        }
    }

    /// Writes the rewritten prefix (up to `at`) and the buffered bytes after it.
    fn emit(&mut self, at: usize, out: &mut Vec<u8>) -> Result<(), ReconcileError> {
        let before = out.len();
        let rewrite = rewrite(&self.scan, &self.buf, &self.clinic, out)?;
        out.extend_from_slice(self.buf.get(at..).unwrap_or_default());
        self.bytes_out += (out.len() - before) as u64;
        self.changed = rewrite.changed;
        self.core_id_kept = rewrite.core_id_kept;
        Ok(())
    }

    /// Ends the object: writes what is still buffered (an object that ends before its
    /// Other Patient IDs Sequence) and says what was done.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<Rewritten, ReconcileError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.phase == Phase::Prefix {
            self.scan.at_end(&self.buf)?;
            let end = self.buf.len();
            self.emit(end, out)?;
        }
        Ok(Rewritten {
            transfer_syntax: self.scan.transfer_syntax.unwrap_or_default(),
            sop_instance_uid: self.scan.media_sop_instance,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            changed: self.changed,
            core_id_kept: self.core_id_kept,
        })
    }
}

/// One complete top-level element of the scanned prefix (offsets into the buffer).
#[derive(Debug, Clone, Copy)]
struct Top {
    tag: u32,
    start: usize,
    value: usize,
    end: usize,
    vr: Option<[u8; 2]>,
    undefined: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameKind {
    /// Inside an undefined-length sequence (or encapsulated value): items or a sequence
    /// delimiter come next.
    Sequence,
    /// Inside an undefined-length item: elements or an item delimiter come next.
    Item,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: FrameKind,
    /// Content is Implicit VR LE (inside an undefined-length UN, PS3.5 6.2.2).
    implicit: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// A top-level element past the stop tag starts at this offset.
    Stopped(usize),
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaState {
    /// Waiting for the preamble and `DICM`.
    Preamble,
    /// Walking the group 0002 elements.
    Elements,
    Done,
}

/// Resumable walk over the buffered prefix: file meta group, then the data set's top-level
/// elements until the first one with a tag above `stop_after`. Each call continues where
/// the previous one stopped, so the whole prefix is walked once.
#[derive(Debug)]
struct Scan {
    stop_after: u32,
    meta: MetaState,
    enc: Encoding,
    transfer_syntax: Option<String>,
    media_sop_instance: Option<String>,
    data_start: usize,
    pos: usize,
    stack: Vec<Frame>,
    /// The undefined-length top-level element being walked: (tag, start, value, vr).
    open: Option<(u32, usize, usize, Option<[u8; 2]>)>,
    top: Vec<Top>,
    stopped: Option<usize>,
}

fn tag_of(group: u16, element: u16) -> u32 {
    (u32::from(group) << 16) | u32::from(element)
}

fn split_tag(tag: u32) -> (u16, u16) {
    ((tag >> 16) as u16, tag as u16)
}

fn u16_le(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn ascii_value(v: &[u8]) -> String {
    v.iter()
        .map(|b| char::from(*b))
        .collect::<String>()
        .trim_matches([' ', '\0'])
        .to_string()
}

impl Scan {
    fn new(stop_after: u32) -> Self {
        Self {
            stop_after,
            meta: MetaState::Preamble,
            enc: Encoding::EXPLICIT_LE,
            transfer_syntax: None,
            media_sop_instance: None,
            data_start: PREAMBLE_AND_MAGIC,
            pos: 0,
            stack: Vec::new(),
            open: None,
            top: Vec::new(),
            stopped: None,
        }
    }

    fn run(&mut self, buf: &[u8]) -> Result<Progress, ReconcileError> {
        if let Some(at) = self.stopped {
            return Ok(Progress::Stopped(at));
        }
        if self.meta != MetaState::Done && self.run_meta(buf)? == Progress::NeedMore {
            return Ok(Progress::NeedMore);
        }
        let progress = self.run_data_set(buf)?;
        if let Progress::Stopped(at) = progress {
            self.stopped = Some(at);
        }
        Ok(progress)
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn run_meta(&mut self, buf: &[u8]) -> Result<Progress, ReconcileError> {
        if self.meta == MetaState::Preamble {
            match buf.get(128..PREAMBLE_AND_MAGIC) {
                None => return Ok(Progress::NeedMore),
                Some(magic) if magic != b"DICM" => return Err(ReconcileError::NotPart10),
                Some(_) => {
                    self.meta = MetaState::Elements;
                    self.pos = PREAMBLE_AND_MAGIC;
                }
            }
        }
        loop {
            let Some(group) = u16_le(buf, self.pos) else {
                return Ok(Progress::NeedMore);
            };
            if group != 0x0002 {
                return self.end_meta().map(|()| Progress::Stopped(self.pos));
            }
            let Some(h) = element::read_header_at(buf, self.pos, Encoding::EXPLICIT_LE) else {
                return Ok(Progress::NeedMore);
            };
            let bad = ReconcileError::BadMeta {
                offset: self.offset(),
            };
            if h.len == UNDEFINED_LENGTH {
                return Err(bad);
            }
            let value = self.pos + h.header_len;
            let end = value.checked_add(h.len as usize).ok_or(bad)?;
            let Some(v) = buf.get(value..end) else {
                return Ok(Progress::NeedMore);
            };
            match tag_of(h.group, h.element) {
                TRANSFER_SYNTAX => self.transfer_syntax = Some(ascii_value(v)),
                MEDIA_SOP_INSTANCE => self.media_sop_instance = Some(ascii_value(v)),
                _ => {}
            }
            self.pos = end;
        }
    }

    /// The file meta group ended at `self.pos`: the data set's encoding follows from it.
    fn end_meta(&mut self) -> Result<(), ReconcileError> {
        let Some(ts) = self.transfer_syntax.clone() else {
            return Err(ReconcileError::BadMeta {
                offset: self.offset(),
            });
        };
        let enc = Encoding::of_transfer_syntax(&ts);
        if enc.big_endian || enc.deflated {
            return Err(ReconcileError::Unsupported {
                transfer_syntax: ts,
            });
        }
        self.enc = enc;
        self.data_start = self.pos;
        self.meta = MetaState::Done;
        Ok(())
    }

    fn push(&mut self, kind: FrameKind, implicit: bool) -> Result<(), ReconcileError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(ReconcileError::TooDeep {
                max: MAX_DEPTH,
                offset: self.offset(),
            });
        }
        self.stack.push(Frame { kind, implicit });
        Ok(())
    }

    fn run_data_set(&mut self, buf: &[u8]) -> Result<Progress, ReconcileError> {
        loop {
            let frame = self.stack.last().copied();
            let implicit = frame.map_or(!self.enc.explicit_vr, |f| f.implicit);
            let enc = if implicit {
                Encoding::IMPLICIT_LE
            } else {
                Encoding::EXPLICIT_LE
            };
            if frame.is_none() {
                let (Some(group), Some(element)) =
                    (u16_le(buf, self.pos), u16_le(buf, self.pos + 2))
                else {
                    return Ok(Progress::NeedMore);
                };
                if tag_of(group, element) > self.stop_after {
                    return Ok(Progress::Stopped(self.pos));
                }
            }
            let Some(h) = element::read_header_at(buf, self.pos, enc) else {
                return Ok(Progress::NeedMore);
            };
            let tag = tag_of(h.group, h.element);
            let unexpected = ReconcileError::Unexpected {
                group: h.group,
                element: h.element,
                offset: self.offset(),
            };
            let value = self.pos + h.header_len;
            let undefined = h.len == UNDEFINED_LENGTH;
            let end = value
                .checked_add(if undefined { 0 } else { h.len as usize })
                .ok_or_else(|| unexpected.clone())?;
            let nested_implicit = implicit || h.vr == Some(*b"UN");
            match frame.map(|f| f.kind) {
                None => {
                    if h.group == ITEM_GROUP {
                        return Err(unexpected);
                    }
                    if undefined {
                        self.push(FrameKind::Sequence, nested_implicit)?;
                        self.open = Some((tag, self.pos, value, h.vr));
                        self.pos = value;
                    } else {
                        if end > buf.len() {
                            return Ok(Progress::NeedMore);
                        }
                        self.top.push(Top {
                            tag,
                            start: self.pos,
                            value,
                            end,
                            vr: h.vr,
                            undefined: false,
                        });
                        self.pos = end;
                    }
                }
                Some(FrameKind::Sequence) => match tag {
                    ITEM if undefined => {
                        self.push(FrameKind::Item, implicit)?;
                        self.pos = value;
                    }
                    ITEM => {
                        if end > buf.len() {
                            return Ok(Progress::NeedMore);
                        }
                        self.pos = end;
                    }
                    SEQUENCE_END => {
                        self.stack.pop();
                        self.pos = value;
                        if self.stack.is_empty() {
                            let Some((tag, start, value, vr)) = self.open.take() else {
                                return Err(unexpected);
                            };
                            self.top.push(Top {
                                tag,
                                start,
                                value,
                                end: self.pos,
                                vr,
                                undefined: true,
                            });
                        }
                    }
                    _ => return Err(unexpected),
                },
                Some(FrameKind::Item) => match tag {
                    ITEM_END => {
                        self.stack.pop();
                        self.pos = value;
                    }
                    _ if h.group == ITEM_GROUP => return Err(unexpected),
                    _ if undefined => {
                        self.push(FrameKind::Sequence, nested_implicit)?;
                        self.pos = value;
                    }
                    _ => {
                        if end > buf.len() {
                            return Ok(Progress::NeedMore);
                        }
                        self.pos = end;
                    }
                },
            }
        }
    }

    /// The input ended with the scan waiting for more: fine only on an element boundary
    /// of the data set (or right after the file meta group).
    fn at_end(&mut self, buf: &[u8]) -> Result<(), ReconcileError> {
        if self.meta == MetaState::Preamble {
            return Err(ReconcileError::NotPart10);
        }
        if self.meta == MetaState::Elements && self.pos == buf.len() {
            self.end_meta()?;
        }
        if self.meta != MetaState::Done || !self.stack.is_empty() || self.pos != buf.len() {
            return Err(ReconcileError::Truncated {
                offset: buf.len() as u64,
            });
        }
        Ok(())
    }

    fn find(&self, tag: u32) -> Option<&Top> {
        self.top.iter().find(|t| t.tag == tag)
    }

    /// The value bytes of a defined-length top-level element.
    fn value<'b>(&self, buf: &'b [u8], tag: u32) -> Option<&'b [u8]> {
        let t = self.find(tag).filter(|t| !t.undefined)?;
        buf.get(t.value..t.end)
    }
}

fn trimmed(v: &[u8]) -> &[u8] {
    let pad = |b: &u8| *b == b' ' || *b == 0;
    let start = v.iter().position(|b| !pad(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !pad(b)).map_or(start, |i| i + 1);
    v.get(start..end).unwrap_or_default()
}

/// Appends one element with a short-form VR (explicit) or 4-byte length (implicit), its
/// value padded to even length with `pad`.
fn put_element(out: &mut Vec<u8>, explicit: bool, tag: u32, vr: &[u8; 2], value: &[u8], pad: u8) {
    let (group, element) = split_tag(tag);
    let len = value.len() + value.len() % 2;
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    if explicit {
        out.extend_from_slice(vr);
        // Values written here are at most 64 bytes, or the core's values, whose length
        // `rewrite` checked.
        out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_le_bytes());
    } else {
        out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    }
    out.extend_from_slice(value);
    if value.len() % 2 == 1 {
        out.push(pad);
    }
}

fn put_sequence_header(out: &mut Vec<u8>, explicit: bool, tag: u32, len: u32) {
    let (group, element) = split_tag(tag);
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    if explicit {
        out.extend_from_slice(b"SQ\0\0");
    }
    out.extend_from_slice(&len.to_le_bytes());
}

struct RewriteResult {
    changed: bool,
    core_id_kept: bool,
}

/// Writes the data set prefix of `buf` (meta group unchanged, then the scanned top-level
/// elements) with the clinic's identity.
fn rewrite(
    scan: &Scan,
    buf: &[u8],
    clinic: &ClinicIdentity,
    out: &mut Vec<u8>,
) -> Result<RewriteResult, ReconcileError> {
    out.extend_from_slice(buf.get(..scan.data_start).unwrap_or_default());
    let bytes = |t: &Top| buf.get(t.start..t.end).unwrap_or_default();
    let core_pid = scan.value(buf, PATIENT_ID).map(trimmed).unwrap_or_default();
    let core_issuer = scan.value(buf, ISSUER).map(trimmed).unwrap_or_default();
    if core_pid == clinic.patient_id.as_bytes() && core_issuer == clinic.issuer.as_bytes() {
        for t in &scan.top {
            out.extend_from_slice(bytes(t));
        }
        return Ok(RewriteResult {
            changed: false,
            core_id_kept: false,
        });
    }
    let explicit = scan.enc.explicit_vr;
    // The core's values are copied as LO into the item: in explicit VR they need a 2-byte
    // length (an original sent as UN could be longer).
    for tag in [PATIENT_ID, ISSUER] {
        let len = scan.value(buf, tag).map_or(0, <[u8]>::len);
        if explicit && len + len % 2 > usize::from(u16::MAX) {
            let (group, element) = split_tag(tag);
            return Err(ReconcileError::TooLong { group, element });
        }
    }

    // The item that keeps the core's identity.
    let item = (!core_pid.is_empty()).then(|| {
        let mut content = Vec::new();
        let raw = |tag| scan.value(buf, tag).unwrap_or_default();
        put_element(
            &mut content,
            explicit,
            PATIENT_ID,
            b"LO",
            raw(PATIENT_ID),
            b' ',
        );
        if !core_issuer.is_empty() {
            put_element(&mut content, explicit, ISSUER, b"LO", raw(ISSUER), b' ');
        }
        put_element(
            &mut content,
            explicit,
            TYPE_OF_PATIENT_ID,
            b"CS",
            b"TEXT",
            b' ',
        );
        if let Some(q) = scan.find(ISSUER_QUALIFIERS) {
            content.extend_from_slice(bytes(q));
        }
        content
    });
    let too_long = || {
        let (group, element) = split_tag(OTHER_PATIENT_IDS);
        ReconcileError::TooLong { group, element }
    };
    let mut item_bytes = Vec::new();
    if let Some(content) = &item {
        let len = u32::try_from(content.len()).map_err(|_| too_long())?;
        item_bytes.extend_from_slice(&0xFFFE_u16.to_le_bytes());
        item_bytes.extend_from_slice(&0xE000_u16.to_le_bytes());
        item_bytes.extend_from_slice(&len.to_le_bytes());
        item_bytes.extend_from_slice(content);
    }

    let new_pid = |out: &mut Vec<u8>| {
        put_element(
            out,
            explicit,
            PATIENT_ID,
            b"LO",
            clinic.patient_id.as_bytes(),
            b' ',
        )
    };
    let new_issuer = |out: &mut Vec<u8>| {
        put_element(out, explicit, ISSUER, b"LO", clinic.issuer.as_bytes(), b' ')
    };
    let new_other = |out: &mut Vec<u8>, old: Option<&Top>| -> Result<(), ReconcileError> {
        match old {
            None => {
                if item.is_some() {
                    let len = u32::try_from(item_bytes.len()).map_err(|_| too_long())?;
                    put_sequence_header(out, explicit, OTHER_PATIENT_IDS, len);
                    out.extend_from_slice(&item_bytes);
                }
            }
            Some(t) => {
                if explicit && t.vr != Some(*b"SQ") {
                    return Err(ReconcileError::NotASequence {
                        offset: t.start as u64,
                    });
                }
                if t.undefined {
                    // Header and old items as they were, the new item before the delimiter.
                    let delimiter = t.end.saturating_sub(SHORT_HEADER).max(t.value);
                    out.extend_from_slice(buf.get(t.start..delimiter).unwrap_or_default());
                    out.extend_from_slice(&item_bytes);
                    out.extend_from_slice(buf.get(delimiter..t.end).unwrap_or_default());
                } else {
                    let old = buf.get(t.value..t.end).unwrap_or_default();
                    let len = old
                        .len()
                        .checked_add(item_bytes.len())
                        .and_then(|l| u32::try_from(l).ok())
                        .filter(|l| *l != UNDEFINED_LENGTH)
                        .ok_or_else(too_long)?;
                    put_sequence_header(out, explicit, OTHER_PATIENT_IDS, len);
                    out.extend_from_slice(old);
                    out.extend_from_slice(&item_bytes);
                }
            }
        }
        Ok(())
    };

    let (mut pid_done, mut issuer_done, mut other_done) = (false, false, false);
    for t in &scan.top {
        if !pid_done && PATIENT_ID < t.tag {
            new_pid(out);
            pid_done = true;
        }
        if !issuer_done && ISSUER < t.tag {
            new_issuer(out);
            issuer_done = true;
        }
        if !other_done && OTHER_PATIENT_IDS < t.tag {
            new_other(out, None)?;
            other_done = true;
        }
        match t.tag {
            PATIENT_ID => {
                if !pid_done {
                    new_pid(out);
                    pid_done = true;
                }
            }
            ISSUER => {
                if !issuer_done {
                    new_issuer(out);
                    issuer_done = true;
                }
            }
            OTHER_PATIENT_IDS => {
                if !other_done {
                    new_other(out, Some(t))?;
                    other_done = true;
                }
            }
            // Describes the core's issuer: moved into the new item (dropped when there is
            // no core ID to keep).
            ISSUER_QUALIFIERS => {}
            // Would no longer match the group; group lengths are retired in data sets.
            PATIENT_GROUP_LENGTH => {}
            _ => out.extend_from_slice(bytes(t)),
        }
    }
    if !pid_done {
        new_pid(out);
    }
    if !issuer_done {
        new_issuer(out);
    }
    if !other_done {
        new_other(out, None)?;
    }
    Ok(RewriteResult {
        changed: true,
        core_id_kept: item.is_some(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use dicom_core::Tag;
    use dicom_object::{DefaultDicomObject, OpenFileOptions};

    const EXPLICIT: &str = "1.2.840.10008.1.2.1";
    const IMPLICIT: &str = "1.2.840.10008.1.2";
    const JPEG: &str = "1.2.840.10008.1.2.4.50";

    fn clinic() -> ClinicIdentity {
        ClinicIdentity {
            patient_id: "CL-0042".into(),
            issuer: "CLINIC-A".into(),
        }
    }

    /// Test data set builder in one encoding (little endian).
    #[derive(Clone, Copy)]
    struct Enc {
        explicit: bool,
    }

    impl Enc {
        fn el(self, tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
            let mut v = value.to_vec();
            if v.len() % 2 == 1 {
                v.push(if vr == b"UI" { 0 } else { b' ' });
            }
            let mut out = Vec::new();
            out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
            out.extend_from_slice(&(tag as u16).to_le_bytes());
            if self.explicit {
                out.extend_from_slice(vr);
                if element::is_long_vr(*vr) {
                    out.extend_from_slice(&[0, 0]);
                    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                } else {
                    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
                }
            } else {
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            }
            out.extend_from_slice(&v);
            out
        }

        fn seq_header(self, tag: u32, len: u32) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
            out.extend_from_slice(&(tag as u16).to_le_bytes());
            if self.explicit {
                out.extend_from_slice(b"SQ\0\0");
            }
            out.extend_from_slice(&len.to_le_bytes());
            out
        }

        /// A sequence of undefined length whose items have undefined length.
        fn seq_undefined(self, tag: u32, items: &[Vec<u8>]) -> Vec<u8> {
            let mut out = self.seq_header(tag, UNDEFINED_LENGTH);
            for item in items {
                out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
                out.extend_from_slice(item);
                out.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
            }
            out.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
            out
        }

        /// A sequence of defined length whose items have defined length.
        fn seq_defined(self, tag: u32, items: &[Vec<u8>]) -> Vec<u8> {
            let mut body = Vec::new();
            for item in items {
                body.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
                body.extend_from_slice(&(item.len() as u32).to_le_bytes());
                body.extend_from_slice(item);
            }
            let mut out = self.seq_header(tag, body.len() as u32);
            out.extend_from_slice(&body);
            out
        }
    }

    const E: Enc = Enc { explicit: true };
    const I: Enc = Enc { explicit: false };

    fn part10(ts: &str, data_set: &[u8]) -> Vec<u8> {
        let mut out = crate::part10::header("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5", ts).unwrap();
        out.extend_from_slice(data_set);
        out
    }

    /// The usual top-level elements around group 0010; `patient` is inserted in the middle.
    fn data_set(enc: Enc, before: &[Vec<u8>], patient: &[Vec<u8>], pixels: usize) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend(enc.el(0x0008_0005, b"CS", b"ISO_IR 192"));
        d.extend(enc.el(0x0008_0016, b"UI", b"1.2.840.10008.5.1.4.1.1.7"));
        d.extend(enc.el(0x0008_0018, b"UI", b"1.2.3.4.5"));
        d.extend(enc.el(0x0008_0050, b"SH", b"ACC-77"));
        for b in before {
            d.extend_from_slice(b);
        }
        d.extend(enc.el(0x0010_0010, b"PN", "山田^太郎".as_bytes()));
        for p in patient {
            d.extend_from_slice(p);
        }
        d.extend(enc.el(0x0010_0030, b"DA", b"19700101"));
        d.extend(enc.el(0x0010_0040, b"CS", b"F"));
        d.extend(enc.el(0x0020_000D, b"UI", b"1.2.3.100"));
        d.extend(enc.el(0x0020_000E, b"UI", b"1.2.3.100.1"));
        let pixel: Vec<u8> = (0..pixels).map(|i| (i * 7) as u8).collect();
        d.extend(enc.el(0x7FE0_0010, b"OW", &pixel));
        d
    }

    fn rewrite_chunks(
        input: &[u8],
        cuts: &[usize],
    ) -> Result<(Vec<u8>, Rewritten), ReconcileError> {
        let mut r = Rewriter::new(clinic());
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            let end = cut.clamp(start, input.len());
            r.feed(&input[start..end], &mut out)?;
            start = end;
        }
        r.feed(&input[start..], &mut out)?;
        let done = r.finish(&mut out)?;
        Ok((out, done))
    }

    fn rewrite_whole(input: &[u8]) -> Result<(Vec<u8>, Rewritten), ReconcileError> {
        rewrite_chunks(input, &[])
    }

    /// Every split into two pieces, plus pseudo-random chunkings, gives the whole-input
    /// result.
    fn assert_split_invariant(input: &[u8]) {
        let whole = rewrite_whole(input);
        for cut in 0..=input.len() {
            assert_eq!(rewrite_chunks(input, &[cut]), whole, "split at {cut}");
        }
        let mut seed = 0x2545_F491_4F6C_DD1D_u64;
        for _ in 0..200 {
            let mut cuts = Vec::new();
            let mut at = 0;
            while at < input.len() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                at += 1 + (seed % 97) as usize;
                cuts.push(at);
            }
            assert_eq!(rewrite_chunks(input, &cuts), whole);
        }
    }

    fn open(bytes: &[u8]) -> DefaultDicomObject {
        OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .from_reader(bytes)
            .unwrap()
    }

    fn text(obj: &InMemObj, tag: u32) -> Option<String> {
        obj.element(Tag((tag >> 16) as u16, tag as u16))
            .ok()
            .map(|e| {
                e.to_str()
                    .unwrap()
                    .trim_end_matches([' ', '\0'])
                    .to_string()
            })
    }

    type InMemObj = dicom_object::InMemDicomObject;

    fn other_ids(obj: &InMemObj) -> Vec<InMemObj> {
        obj.element(Tag(0x0010, 0x1002))
            .map(|e| e.items().unwrap().to_vec())
            .unwrap_or_default()
    }

    #[test]
    fn explicit_le_gets_the_clinic_id_and_keeps_the_core_id_in_other_patient_ids() {
        let input = part10(
            EXPLICIT,
            &data_set(
                E,
                &[],
                &[
                    E.el(PATIENT_ID, b"LO", b"CORE-1"),
                    E.el(ISSUER, b"LO", b"CORE"),
                ],
                300,
            ),
        );
        assert_split_invariant(&input);
        let (out, done) = rewrite_whole(&input).unwrap();
        assert!(done.changed && done.core_id_kept);
        assert_eq!(done.transfer_syntax, EXPLICIT);
        assert_eq!(done.sop_instance_uid.as_deref(), Some("1.2.3.4.5"));
        assert_eq!(
            (done.bytes_in, done.bytes_out),
            (input.len() as u64, out.len() as u64)
        );
        let obj = open(&out);
        assert_eq!(text(&obj, PATIENT_ID).as_deref(), Some("CL-0042"));
        assert_eq!(text(&obj, ISSUER).as_deref(), Some("CLINIC-A"));
        assert_eq!(text(&obj, 0x0010_0010).as_deref(), Some("山田^太郎"));
        assert_eq!(text(&obj, 0x0010_0030).as_deref(), Some("19700101"));
        let items = other_ids(&obj);
        assert_eq!(items.len(), 1);
        assert_eq!(text(&items[0], PATIENT_ID).as_deref(), Some("CORE-1"));
        assert_eq!(text(&items[0], ISSUER).as_deref(), Some("CORE"));
        assert_eq!(text(&items[0], TYPE_OF_PATIENT_ID).as_deref(), Some("TEXT"));
        // Everything from Study Instance UID on is byte for byte the input.
        let tail = |b: &[u8]| {
            let at = b
                .windows(4)
                .position(|w| w == [0x20, 0x00, 0x0D, 0x00])
                .unwrap();
            b[at..].to_vec()
        };
        assert_eq!(tail(&out), tail(&input));
        // The file meta group is unchanged.
        let meta_len = crate::part10::header("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5", EXPLICIT)
            .unwrap()
            .len();
        assert_eq!(out[..meta_len], input[..meta_len]);
    }

    #[test]
    fn implicit_le_is_rewritten_in_implicit_vr() {
        let input = part10(
            IMPLICIT,
            &data_set(I, &[], &[I.el(PATIENT_ID, b"LO", b"CORE-12")], 64),
        );
        assert_split_invariant(&input);
        let (out, done) = rewrite_whole(&input).unwrap();
        assert!(done.core_id_kept);
        let obj = open(&out);
        assert_eq!(text(&obj, PATIENT_ID).as_deref(), Some("CL-0042"));
        assert_eq!(text(&obj, ISSUER).as_deref(), Some("CLINIC-A"));
        let items = other_ids(&obj);
        assert_eq!(items.len(), 1);
        assert_eq!(text(&items[0], PATIENT_ID).as_deref(), Some("CORE-12"));
        assert_eq!(text(&items[0], ISSUER), None, "the core had no issuer");
        assert_eq!(text(&items[0], TYPE_OF_PATIENT_ID).as_deref(), Some("TEXT"));
        assert_eq!(text(&obj, 0x0020_000D).as_deref(), Some("1.2.3.100"));
    }

    fn existing_item(enc: Enc, id: &[u8]) -> Vec<u8> {
        let mut item = enc.el(PATIENT_ID, b"LO", id);
        item.extend(enc.el(ISSUER, b"LO", b"OLD"));
        item.extend(enc.el(TYPE_OF_PATIENT_ID, b"CS", b"TEXT"));
        item
    }

    #[test]
    fn existing_other_patient_ids_keep_their_items_in_both_length_forms() {
        for enc in [E, I] {
            let ts = if enc.explicit { EXPLICIT } else { IMPLICIT };
            let old = [existing_item(enc, b"OLD-1"), existing_item(enc, b"OLD-2")];
            for (undefined, seq) in [
                (true, enc.seq_undefined(OTHER_PATIENT_IDS, &old)),
                (false, enc.seq_defined(OTHER_PATIENT_IDS, &old)),
            ] {
                let input = part10(
                    ts,
                    &data_set(
                        enc,
                        &[],
                        &[
                            enc.el(PATIENT_ID, b"LO", b"CORE-1"),
                            enc.el(ISSUER, b"LO", b"CORE"),
                            seq.clone(),
                        ],
                        10,
                    ),
                );
                assert_split_invariant(&input);
                let (out, _) = rewrite_whole(&input).unwrap();
                // The old items are there byte for byte.
                let old_items = if undefined {
                    seq[seq.len() - (seq.len() - enc.seq_header(0, 0).len())..seq.len() - 8]
                        .to_vec()
                } else {
                    seq[enc.seq_header(0, 0).len()..].to_vec()
                };
                assert!(
                    out.windows(old_items.len())
                        .any(|w| w == old_items.as_slice())
                );
                let obj = open(&out);
                let items = other_ids(&obj);
                let ids: Vec<_> = items.iter().map(|i| text(i, PATIENT_ID).unwrap()).collect();
                assert_eq!(
                    ids,
                    ["OLD-1", "OLD-2", "CORE-1"],
                    "undefined length: {undefined}"
                );
                assert_eq!(text(&items[2], ISSUER).as_deref(), Some("CORE"));
                assert_eq!(text(&obj, PATIENT_ID).as_deref(), Some("CL-0042"));
            }
        }
    }

    #[test]
    fn undefined_length_sequences_before_group_0010_are_skipped_not_rewritten() {
        for enc in [E, I] {
            let ts = if enc.explicit { EXPLICIT } else { IMPLICIT };
            // A Referenced Study Sequence whose item holds a nested undefined-length
            // sequence and a decoy Patient ID; and a defined-length one after it.
            let inner = enc.seq_undefined(0x0040_A170, &[enc.el(0x0008_0100, b"SH", b"X")]);
            let mut decoy = enc.el(0x0008_1150, b"UI", b"1.2.840.10008.3.1.2.3.1");
            decoy.extend(enc.el(0x0008_1155, b"UI", b"1.2.3.9"));
            decoy.extend(inner);
            decoy.extend(enc.el(PATIENT_ID, b"LO", b"DECOY"));
            let studies = enc.seq_undefined(0x0008_1110, &[decoy.clone(), decoy]);
            let series = enc.seq_defined(0x0008_1115, &[enc.el(0x0008_1155, b"UI", b"1.2.3.10")]);
            let input = part10(
                ts,
                &data_set(
                    enc,
                    &[studies.clone(), series],
                    &[enc.el(PATIENT_ID, b"LO", b"CORE-1")],
                    4,
                ),
            );
            assert_split_invariant(&input);
            let (out, _) = rewrite_whole(&input).unwrap();
            assert!(out.windows(studies.len()).any(|w| w == studies.as_slice()));
            let obj = open(&out);
            assert_eq!(text(&obj, PATIENT_ID).as_deref(), Some("CL-0042"));
            let refs = obj
                .element(Tag(0x0008, 0x1110))
                .unwrap()
                .items()
                .unwrap()
                .to_vec();
            assert_eq!(text(&refs[1], PATIENT_ID).as_deref(), Some("DECOY"));
            assert_eq!(
                text(&other_ids(&obj)[0], PATIENT_ID).as_deref(),
                Some("CORE-1")
            );
        }
    }

    #[test]
    fn undefined_length_un_sequence_is_walked_as_implicit_vr() {
        // An explicit VR data set with a private sequence sent as UN of undefined length:
        // its content is Implicit VR LE.
        let mut un = vec![
            0x09, 0x00, 0x10, 0x10, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        un.extend(I.seq_undefined(0, &[]).get(..0).unwrap());
        un.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        un.extend(I.el(0x0009_1011, b"LO", b"AB"));
        un.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        un.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        let input = part10(
            EXPLICIT,
            &data_set(E, &[un], &[E.el(PATIENT_ID, b"LO", b"CORE-1")], 4),
        );
        assert_split_invariant(&input);
        let (out, _) = rewrite_whole(&input).unwrap();
        let ids = read_identifiers(&out).unwrap();
        assert_eq!(ids.patient_id.as_deref(), Some("CL-0042"));
    }

    #[test]
    fn missing_patient_id_and_issuer_are_inserted_without_an_other_ids_item() {
        for enc in [E, I] {
            let ts = if enc.explicit { EXPLICIT } else { IMPLICIT };
            let input = part10(ts, &data_set(enc, &[], &[], 8));
            assert_split_invariant(&input);
            let (out, done) = rewrite_whole(&input).unwrap();
            assert!(done.changed && !done.core_id_kept);
            let obj = open(&out);
            assert_eq!(text(&obj, PATIENT_ID).as_deref(), Some("CL-0042"));
            assert_eq!(text(&obj, ISSUER).as_deref(), Some("CLINIC-A"));
            assert!(other_ids(&obj).is_empty());
            // Tag order: the inserted elements sit between Patient's Name and Birth Date.
            let tags: Vec<Tag> = obj.iter().map(|e| e.header().tag).collect();
            let mut sorted = tags.clone();
            sorted.sort();
            assert_eq!(tags, sorted);
        }
    }

    #[test]
    fn empty_patient_id_is_replaced_and_no_item_is_added() {
        let input = part10(
            EXPLICIT,
            &data_set(E, &[], &[E.el(PATIENT_ID, b"LO", b"")], 8),
        );
        let (out, done) = rewrite_whole(&input).unwrap();
        assert!(!done.core_id_kept);
        assert_eq!(
            read_identifiers(&out).unwrap().patient_id.as_deref(),
            Some("CL-0042")
        );
        assert!(other_ids(&open(&out)).is_empty());
    }

    #[test]
    fn issuer_qualifiers_move_into_the_core_item() {
        let qualifiers = E.seq_defined(
            ISSUER_QUALIFIERS,
            &[E.el(0x0040_0032, b"UT", b"urn:oid:1.2.3")],
        );
        let input = part10(
            EXPLICIT,
            &data_set(
                E,
                &[],
                &[
                    E.el(PATIENT_ID, b"LO", b"CORE-1"),
                    E.el(ISSUER, b"LO", b"CORE"),
                    qualifiers,
                ],
                8,
            ),
        );
        assert_split_invariant(&input);
        let (out, _) = rewrite_whole(&input).unwrap();
        let obj = open(&out);
        assert!(
            obj.element(Tag(0x0010, 0x0024)).is_err(),
            "moved out of the top level"
        );
        let items = other_ids(&obj);
        let q = items[0]
            .element(Tag(0x0010, 0x0024))
            .unwrap()
            .items()
            .unwrap()
            .to_vec();
        assert_eq!(text(&q[0], 0x0040_0032).as_deref(), Some("urn:oid:1.2.3"));
    }

    #[test]
    fn a_core_patient_id_too_long_for_lo_is_refused() {
        let mut un = vec![0x10, 0x00, 0x20, 0x00, b'U', b'N', 0, 0];
        un.extend_from_slice(&70_000u32.to_le_bytes());
        un.extend(std::iter::repeat_n(b'7', 70_000));
        let input = part10(EXPLICIT, &data_set(E, &[], &[un], 8));
        assert_eq!(
            rewrite_whole(&input).map(|_| ()),
            Err(ReconcileError::TooLong {
                group: 0x0010,
                element: 0x0020
            })
        );
    }

    #[test]
    fn a_patient_group_length_is_dropped() {
        let mut d = data_set(E, &[], &[E.el(PATIENT_ID, b"LO", b"CORE-1")], 8);
        let at = d
            .windows(4)
            .position(|w| w == [0x10, 0x00, 0x10, 0x00])
            .unwrap();
        let group_length = E.el(PATIENT_GROUP_LENGTH, b"UL", &100u32.to_le_bytes());
        d.splice(at..at, group_length.clone());
        let input = part10(EXPLICIT, &d);
        assert_split_invariant(&input);
        let (out, _) = rewrite_whole(&input).unwrap();
        assert!(
            !out.windows(group_length.len())
                .any(|w| w == group_length.as_slice())
        );
        let obj = open(&out);
        assert!(obj.element(Tag(0x0010, 0x0000)).is_err());
        assert_eq!(text(&obj, PATIENT_ID).as_deref(), Some("CL-0042"));
    }

    #[test]
    fn an_object_already_carrying_the_clinic_identity_passes_unchanged() {
        let input = part10(
            EXPLICIT,
            &data_set(
                E,
                &[],
                &[
                    E.el(PATIENT_ID, b"LO", b"CL-0042"),
                    E.el(ISSUER, b"LO", b"CLINIC-A"),
                ],
                9,
            ),
        );
        let (out, done) = rewrite_whole(&input).unwrap();
        assert!(!done.changed);
        assert_eq!(out, input);
        // Rewriting the output again changes nothing either.
        let first = rewrite_whole(&part10(
            EXPLICIT,
            &data_set(E, &[], &[E.el(PATIENT_ID, b"LO", b"C")], 9),
        ))
        .unwrap()
        .0;
        assert_eq!(rewrite_whole(&first).unwrap().0, first);
    }

    #[test]
    fn encapsulated_transfer_syntax_is_explicit_le_and_the_fragments_pass_through() {
        let mut d = data_set(E, &[], &[E.el(PATIENT_ID, b"LO", b"CORE-1")], 0);
        // Replace the native pixel data with encapsulated fragments.
        let at = d
            .windows(4)
            .position(|w| w == [0xE0, 0x7F, 0x10, 0x00])
            .unwrap();
        d.truncate(at);
        let mut frags = vec![
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        frags.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
        frags.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 4, 0, 0, 0, 0xFF, 0xD8, 0xFF, 0xD9]);
        frags.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&frags);
        let input = part10(JPEG, &d);
        assert_split_invariant(&input);
        let (out, done) = rewrite_whole(&input).unwrap();
        assert_eq!(done.transfer_syntax, JPEG);
        assert!(out.ends_with(&frags));
        assert_eq!(
            read_identifiers(&out).unwrap().patient_id.as_deref(),
            Some("CL-0042")
        );
    }

    #[test]
    fn big_endian_and_deflated_are_unsupported() {
        for ts in ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"] {
            let input = part10(ts, &[0x08, 0x00, 0x18, 0x00, b'U', b'I', 0, 2, b'1', 0]);
            let err = rewrite_whole(&input).unwrap_err();
            assert_eq!(
                err,
                ReconcileError::Unsupported {
                    transfer_syntax: ts.into()
                }
            );
            assert_eq!(read_identifiers(&input).unwrap_err(), err);
        }
    }

    #[test]
    fn a_large_object_streams_with_a_bounded_buffer() {
        let input = part10(
            EXPLICIT,
            &data_set(E, &[], &[E.el(PATIENT_ID, b"LO", b"CORE-1")], 3 << 20),
        );
        let mut r = Rewriter::new(clinic());
        let mut out = Vec::new();
        for chunk in input.chunks(1000) {
            r.feed(chunk, &mut out).unwrap();
            assert!(r.buf.len() <= 4096, "only the prefix is buffered");
        }
        let done = r.finish(&mut out).unwrap();
        assert_eq!(done.bytes_in, input.len() as u64);
        // CORE-1 -> CL-0042 (+2), the issuer (+16), the sequence with one item (+46).
        assert_eq!(out.len(), input.len() + 2 + 16 + 46);
        assert!(out.ends_with(&input[input.len() - (3 << 20)..]));
    }

    #[test]
    fn a_prefix_over_the_limit_is_refused_under_any_split() {
        let big = E.el(0x0008_1030, b"LO", &[b'x'; 60]);
        let input = part10(
            EXPLICIT,
            &data_set(E, &[big.clone(), big.clone(), big], &[], 1),
        );
        let limit = 400;
        let run = |cuts: &[usize]| {
            let mut r = Rewriter::with_max_prefix(clinic(), limit);
            let mut out = Vec::new();
            let mut start = 0;
            for &c in cuts {
                r.feed(&input[start..c], &mut out)?;
                start = c;
            }
            r.feed(&input[start..], &mut out)?;
            r.finish(&mut out)
        };
        for cut in 0..input.len() {
            assert_eq!(
                run(&[cut]),
                Err(ReconcileError::PrefixTooLong { max: limit })
            );
        }
    }

    #[test]
    fn truncated_and_foreign_input_gives_typed_errors() {
        let input = part10(
            EXPLICIT,
            &data_set(E, &[], &[E.el(PATIENT_ID, b"LO", b"CORE-1")], 4),
        );
        assert_eq!(rewrite_whole(&input[..100]), Err(ReconcileError::NotPart10));
        let mut other = input.clone();
        other[128] = b'X';
        assert_eq!(rewrite_whole(&other), Err(ReconcileError::NotPart10));
        // Ends inside Patient's Name.
        let at = input
            .windows(4)
            .position(|w| w == [0x10, 0x00, 0x10, 0x00])
            .unwrap();
        assert!(matches!(
            rewrite_whole(&input[..at + 10]),
            Err(ReconcileError::Truncated { .. })
        ));
        assert!(matches!(
            read_identifiers(&input[..at + 10]),
            Err(ReconcileError::Truncated { .. })
        ));
        // An element where a sequence item belongs.
        let mut stray = input[..at].to_vec();
        stray.extend(E.seq_header(0x0008_1110, UNDEFINED_LENGTH));
        stray.extend(E.el(0x0008_1150, b"UI", b"1.2"));
        assert!(matches!(
            rewrite_whole(&stray),
            Err(ReconcileError::Unexpected { .. })
        ));
        // Errors name no values.
        let e = rewrite_whole(&input[..at + 10]).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("CORE"));
    }

    #[test]
    fn too_deep_nesting_is_refused() {
        let mut d = Vec::new();
        for _ in 0..70 {
            d.extend_from_slice(&[
                0x08, 0x00, 0x10, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
            ]);
            d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        let input = part10(EXPLICIT, &d);
        assert!(matches!(
            rewrite_whole(&input),
            Err(ReconcileError::TooDeep { .. })
        ));
    }

    #[test]
    fn invalid_clinic_identity_is_refused() {
        for (patient_id, issuer, field) in [
            ("", "A", "patient_id"),
            ("A\\B", "A", "patient_id"),
            ("A", " A", "issuer"),
            ("山田", "A", "patient_id"),
            ("A", &"x".repeat(65), "issuer"),
        ] {
            let mut r = Rewriter::new(ClinicIdentity {
                patient_id: patient_id.into(),
                issuer: issuer.into(),
            });
            assert_eq!(
                r.feed(b"", &mut Vec::new()),
                Err(ReconcileError::InvalidClinicIdentity { field })
            );
        }
        assert!(!format!("{:?}", clinic()).contains("CL-0042"));
    }

    #[test]
    fn read_identifiers_reads_the_top_level_ids_trimmed() {
        let ref_study = E.seq_undefined(0x0008_1110, &[E.el(0x0020_000D, b"UI", b"9.9.9")]);
        let input = part10(
            EXPLICIT,
            &data_set(
                E,
                &[ref_study],
                &[
                    E.el(PATIENT_ID, b"LO", b"CORE-1 "),
                    E.el(ISSUER, b"LO", "病院".as_bytes()),
                ],
                100,
            ),
        );
        let ids = read_identifiers(&input).unwrap();
        assert_eq!(ids.patient_id.as_deref(), Some("CORE-1"));
        assert_eq!(ids.issuer_of_patient_id.as_deref(), Some("病院"));
        assert_eq!(ids.accession_number.as_deref(), Some("ACC-77"));
        assert_eq!(ids.study_instance_uid.as_deref(), Some("1.2.3.100"));
        assert_eq!(ids.sop_instance_uid.as_deref(), Some("1.2.3.4.5"));
        assert_eq!(ids.transfer_syntax, EXPLICIT);
        // A prefix reaching past the Study Instance UID is enough.
        let at = input
            .windows(4)
            .position(|w| w == [0x20, 0x00, 0x0E, 0x00])
            .unwrap();
        assert_eq!(read_identifiers(&input[..at + 4]).unwrap(), ids);
        let shown = format!("{ids:?}");
        assert!(!shown.contains("CORE-1") && !shown.contains("ACC-77"));
        // Implicit VR, no accession number.
        let mut d = I.el(0x0008_0018, b"UI", b"1.2.3");
        d.extend(I.el(PATIENT_ID, b"LO", b"P"));
        let ids = read_identifiers(&part10(IMPLICIT, &d)).unwrap();
        assert_eq!(
            (ids.patient_id.as_deref(), ids.accession_number),
            (Some("P"), None)
        );
    }

    /// DICOM dump (dcmdump format) of a small secondary capture with a Referenced Study
    /// Sequence before group 0010 and an existing Other Patient IDs Sequence.
    const DUMP: &str = r#"
(0008,0005) CS [ISO_IR 100]
(0008,0016) UI [1.2.840.10008.5.1.4.1.1.7]
(0008,0018) UI [1.2.826.0.1.3680043.2.1125.77.1]
(0008,0020) DA [20261206]
(0008,0050) SH [ACC-DCMTK]
(0008,0060) CS [OT]
(0008,1110) SQ (Sequence with explicit length #=1)
  (fffe,e000) na (Item with explicit length #=2)
    (0008,1150) UI [1.2.840.10008.3.1.2.3.1]
    (0008,1155) UI [1.2.826.0.1.3680043.2.1125.77.2]
  (fffe,e00d) na (ItemDelimitationItem for re-encoding)
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.)
(0010,0010) PN [Doe^Jane]
(0010,0020) LO [CORE-DCMTK-9]
(0010,0021) LO [CORE]
(0010,0030) DA [19700101]
(0010,1002) SQ (Sequence with explicit length #=1)
  (fffe,e000) na (Item with explicit length #=2)
    (0010,0020) LO [OLD-7]
    (0010,0022) CS [TEXT]
  (fffe,e00d) na (ItemDelimitationItem for re-encoding)
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.)
(0020,000d) UI [1.2.826.0.1.3680043.2.1125.77.3]
(0020,000e) UI [1.2.826.0.1.3680043.2.1125.77.4]
(0028,0002) US 1
(0028,0004) CS [MONOCHROME2]
(0028,0010) US 4
(0028,0011) US 4
(0028,0100) US 8
(0028,0101) US 8
(0028,0102) US 7
(0028,0103) US 0
(7fe0,0010) OB 00\11\22\33\44\55\66\77\88\99\aa\bb\cc\dd\ee\ff
"#;

    fn run_tool(tool: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
        let out = std::process::Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "DCMTK peer `{tool}` cannot run ({e}): install dcmtk (apt-get install dcmtk)"
                )
            });
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Real peer: files written by DCMTK (explicit VR with undefined lengths, implicit VR
    /// with explicit lengths) are rewritten in small chunks, and dcmdump reads the result
    /// without an error or warning and shows the clinic's identity and the core's.
    #[test]
    fn dcmtk_reads_the_rewritten_file_with_the_clinic_id() {
        let dir = tempfile::tempdir().unwrap();
        let dump = dir.path().join("in.dump");
        std::fs::write(&dump, DUMP).unwrap();
        for (name, opts) in [
            ("explicit-undefined", &["+te", "-e"][..]),
            ("implicit", &["+ti"][..]),
        ] {
            let input = dir.path().join(format!("{name}.dcm"));
            let mut args: Vec<&std::ffi::OsStr> = opts.iter().map(|o| o.as_ref()).collect();
            args.extend([dump.as_os_str(), input.as_os_str()]);
            run_tool("dump2dcm", &args);
            let bytes = std::fs::read(&input).unwrap();
            let mut r = Rewriter::new(clinic());
            let mut out = Vec::new();
            for chunk in bytes.chunks(7) {
                r.feed(chunk, &mut out).unwrap();
            }
            let done = r.finish(&mut out).unwrap();
            assert!(done.core_id_kept, "{name}");
            let output = dir.path().join(format!("{name}-out.dcm"));
            std::fs::write(&output, &out).unwrap();

            let dumped = run_tool("dcmdump", &["-E".as_ref(), output.as_os_str()][..]);
            // run_tool also asserts that dcmdump printed no error or warning.
            run_tool("dcmdump", &["-E".as_ref(), output.as_os_str()][..]);
            let text = String::from_utf8_lossy(&dumped.stdout);
            let top: Vec<&str> = text.lines().filter(|l| l.starts_with('(')).collect();
            assert!(
                top.iter()
                    .any(|l| l.starts_with("(0010,0020) LO [CL-0042]")),
                "{name}: {text}"
            );
            assert!(
                top.iter()
                    .any(|l| l.starts_with("(0010,0021) LO [CLINIC-A]")),
                "{name}: {text}"
            );
            let found = run_tool(
                "dcmdump",
                &[
                    "-E",
                    "+P",
                    "0010,0020",
                    "+P",
                    "0010,0021",
                    "+P",
                    "0010,0022",
                    "+p",
                ]
                .map(std::ffi::OsStr::new)
                .into_iter()
                .chain([output.as_os_str()])
                .collect::<Vec<_>>(),
            );
            let found = String::from_utf8_lossy(&found.stdout);
            for want in [
                "(0010,0020) LO [CL-0042]",
                "(0010,1002).(0010,0020) LO [OLD-7]",
                "(0010,1002).(0010,0020) LO [CORE-DCMTK-9]",
                "(0010,1002).(0010,0021) LO [CORE]",
                "(0010,1002).(0010,0022) CS [TEXT]",
            ] {
                assert!(
                    found.lines().any(|l| l.starts_with(want)),
                    "{name}: no {want} in\n{found}"
                );
            }
            let ids = read_identifiers(&out).unwrap();
            assert_eq!(ids.accession_number.as_deref(), Some("ACC-DCMTK"));
            assert_eq!(ids.patient_id.as_deref(), Some("CL-0042"));
            assert_eq!(
                ids.study_instance_uid.as_deref(),
                Some("1.2.826.0.1.3680043.2.1125.77.3")
            );
        }
    }

    #[test]
    fn no_panic_on_mangled_input() {
        let input = part10(
            EXPLICIT,
            &data_set(
                E,
                &[E.seq_undefined(0x0008_1110, &[E.el(0x0008_1155, b"UI", b"1.2")])],
                &[E.el(PATIENT_ID, b"LO", b"CORE-1")],
                4,
            ),
        );
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        for _ in 0..3000 {
            let mut m = input.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = 128 + (seed as usize) % (m.len() - 128);
                m[at] = (seed >> 32) as u8;
            }
            let cut = (seed >> 40) as usize % m.len();
            let _ = read_identifiers(&m);
            assert_eq!(rewrite_chunks(&m, &[cut]), rewrite_whole(&m));
        }
    }
}
