//! X-Ray Radiation Dose SR reader (CT: TID 10011 "CT Radiation Dose"): the irradiation
//! events and accumulated totals of a dose report, read from a stored Part 10 object.
//!
//! Input is untrusted (any modality can send any SR): every length is checked, nesting and
//! item counts are bounded, and a malformed object is an [`RdsrError`] naming the problem in
//! DICOM terms (tag, concept), never a panic. An object that is not a dose report (another
//! SR template, not an SR at all) is `Ok(None)`.
//!
//! Values are the scanner's output (CTDIvol in mGy, DLP in mGy·cm, converted from the units
//! the report declares), never the patient's dose.
//!
//! How it reads:
//! - [`crate::part10::read`] finds the data set and its transfer syntax: Explicit VR LE,
//!   Implicit VR LE and Explicit VR BE are read; a deflated data set is refused
//!   (`Malformed` at (0002,0010)). A SOP class outside the SR storage classes
//!   (`1.2.840.10008.5.1.4.1.1.88.*`) is `Ok(None)` before anything else is read; both the
//!   X-Ray Radiation Dose SR class and the Enhanced SR class (GE's CT reports) are read.
//! - The data set is walked into a tree of elements with the crate's one header reader
//!   (`element`), defined and undefined lengths for sequences and items, at most
//!   [`MAX_DEPTH`] nested sequences and [`MAX_ELEMENTS`] headers. In Implicit VR a value of
//!   undefined length, or one of the SR sequences read here, is a sequence; a UN value of
//!   undefined length is a sequence in Implicit VR LE (PS3.5 6.2.2); other values are kept
//!   as bytes and only the ones named below are interpreted.
//! - The root concept (0040,A043) must be 113701 "X-Ray Radiation Dose Report" (DCM), else
//!   `Ok(None)`. CT Acquisition (113819) and the first CT Accumulated Dose Data (113811)
//!   containers are found at any depth under the root. A report with neither (a projection
//!   X-ray report: TID 10001 with TID 10002/10003 content) is `Ok(None)`: only CT dose is
//!   recorded.
//! - Per event: Irradiation Event UID (113769, required: its absence is a `Content` error, as
//!   the UID is what de-duplicates events), Acquisition Protocol (125203), Target Region
//!   (123014), CT Acquisition Type (113820), DateTime Started (111526, else the report's
//!   113809), and in CT Dose (113829) Mean CTDIvol (113830) and DLP (113838). An event
//!   without CT Dose (a localizer) has no values. A NUM takes the first value of its DS
//!   (some scanners send several) and must be a finite non-negative number in a dose unit.
//! - Concept names are compared on (code value, scheme) with scheme `DCM` (trimmed, ASCII
//!   case-insensitive); code meanings are never compared (real reports spell them
//!   differently, e.g. "Start of X-ray Irradiation").
//! - Text is decoded in the data set's Specific Character Set ([`crate::charset`]; other
//!   single-byte sets through dicom-encoding). An identifier that cannot be decoded is a
//!   `Content` error; an undecodable Patient Name is left out (`None`), as it is not needed
//!   to match the report and the dose should not be lost to it.
//!
//! Quirks of real reports (OpenREM's sample set, see hw-tests/test_safety_rdsr.py):
//! - Units are compared by code value only (GE's fluoroscopy reports write the scheme `UCM`);
//!   `mGycm` is read as `mGy.cm` (Siemens Definition Flash, GE Enhanced SR). Known units:
//!   mGy, Gy, cGy, uGy; mGy.cm, Gy.cm, cGy.cm, uGy.cm, mGy.mm, Gy.m. Anything else is a
//!   `Content` error, never a guess.
//! - Target Region as a CODE item with no Concept Code Sequence (GE via PixelMed, Toshiba) or
//!   an empty one (Philips Big Bore) is `None`; a private code (GE VCT: `00001`, `99GEMS`,
//!   "Unknown") is passed on as sent.

use dicom_encoding::text::{SpecificCharacterSet, TextCodec};

use crate::charset::{self, SpecificCharset};
use crate::element::{self, ElementHeader, Encoding};
use crate::part10;

/// A coded concept as sent (code value, scheme, meaning).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Code {
    pub value: String,
    pub scheme: String,
    pub meaning: String,
}

/// One CT irradiation event (TID 10013 "CT Irradiation Event Data").
#[derive(Clone, PartialEq, Default)]
pub struct IrradiationEvent {
    /// Irradiation Event UID (113769).
    pub event_uid: String,
    /// Acquisition protocol (125203), as sent.
    pub protocol: Option<String>,
    /// Target region (123014).
    pub target_region: Option<Code>,
    /// CT acquisition type (113820), e.g. `Spiral Acquisition`.
    pub acquisition_type: Option<Code>,
    /// Mean CTDIvol (113830), mGy.
    pub ctdivol_mgy: Option<f64>,
    /// DLP (113838), mGy·cm.
    pub dlp_mgy_cm: Option<f64>,
    /// Irradiation event date-time (DICOM DT as sent, e.g. the event's 111526 DateTime
    /// Started), when present.
    pub datetime: Option<String>,
}

impl std::fmt::Debug for IrradiationEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrradiationEvent")
            .field("ctdivol_mgy", &self.ctdivol_mgy)
            .field("dlp_mgy_cm", &self.dlp_mgy_cm)
            .finish_non_exhaustive()
    }
}

/// CT Accumulated Dose Data (113811).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Accumulated {
    /// Total Number of Irradiation Events (113812).
    pub total_events: Option<u64>,
    /// CT Dose Length Product Total (113813), mGy·cm.
    pub total_dlp_mgy_cm: Option<f64>,
}

/// A CT dose report as read.
#[derive(Clone, PartialEq, Default)]
pub struct DoseReport {
    pub sop_instance_uid: String,
    pub study_instance_uid: Option<String>,
    pub accession_number: Option<String>,
    /// Patient module (decoded with the Specific Character Set), for matching the patient.
    pub patient_id: Option<String>,
    /// Issuer of Patient ID (0010,0021).
    pub issuer_of_patient_id: Option<String>,
    pub patient_name: Option<String>,
    pub birth_date: Option<String>,
    pub sex: Option<String>,
    pub manufacturer: Option<String>,
    /// The report's start of irradiation (113809) or, failing that, Study Date/Time.
    pub datetime: Option<String>,
    /// The CT irradiation events, in document order.
    pub events: Vec<IrradiationEvent>,
    /// CT Accumulated Dose Data, when present.
    pub accumulated: Option<Accumulated>,
}

impl std::fmt::Debug for DoseReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoseReport")
            .field("events", &self.events.len())
            .field("accumulated", &self.accumulated)
            .finish_non_exhaustive()
    }
}

/// Why a dose report cannot be read (DICOM terms; never patient data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RdsrError {
    /// The object's structure is broken (bad length, truncated, nesting too deep).
    #[error("malformed data set at ({group:04X},{element:04X}): {reason}")]
    Malformed {
        group: u16,
        element: u16,
        reason: &'static str,
    },
    /// A dose report whose content breaks the template (e.g. an event without its UID, a
    /// numeric value that is not a number, units that are not a dose).
    #[error("dose report content: {0}")]
    Content(&'static str),
    /// Not a Part 10 object.
    #[error("not a DICOM Part 10 object: {0}")]
    NotPart10(&'static str),
}

/// Deepest sequence nesting followed (a dose report nests about 6 deep).
pub const MAX_DEPTH: usize = 64;
/// Most element, item and delimiter headers read from one object.
pub const MAX_ELEMENTS: usize = 1 << 20;

/// SOP Class UIDs of the structured report storage classes share this root (PS3.4 B.5).
const SR_CLASS_ROOT: &str = "1.2.840.10008.5.1.4.1.1.88.";

const SPECIFIC_CHARSET: Tag = (0x0008, 0x0005);
const SOP_INSTANCE: Tag = (0x0008, 0x0018);
const STUDY_DATE: Tag = (0x0008, 0x0020);
const STUDY_TIME: Tag = (0x0008, 0x0030);
const ACCESSION: Tag = (0x0008, 0x0050);
const MANUFACTURER: Tag = (0x0008, 0x0070);
const CODE_VALUE: Tag = (0x0008, 0x0100);
const CODING_SCHEME: Tag = (0x0008, 0x0102);
const CODE_MEANING: Tag = (0x0008, 0x0104);
const LONG_CODE_VALUE: Tag = (0x0008, 0x0119);
const MEASUREMENT_UNITS: Tag = (0x0040, 0x08EA);
const PATIENT_NAME: Tag = (0x0010, 0x0010);
const PATIENT_ID: Tag = (0x0010, 0x0020);
const ISSUER: Tag = (0x0010, 0x0021);
const BIRTH_DATE: Tag = (0x0010, 0x0030);
const SEX: Tag = (0x0010, 0x0040);
const STUDY_INSTANCE: Tag = (0x0020, 0x000D);
const CONCEPT_NAME: Tag = (0x0040, 0xA043);
const DATETIME: Tag = (0x0040, 0xA120);
const UID: Tag = (0x0040, 0xA124);
const TEXT_VALUE: Tag = (0x0040, 0xA160);
const CONCEPT_CODE: Tag = (0x0040, 0xA168);
const MEASURED_VALUE: Tag = (0x0040, 0xA300);
const NUMERIC_VALUE: Tag = (0x0040, 0xA30A);
const CONTENT: Tag = (0x0040, 0xA730);

/// The sequences this reader descends into: in Implicit VR a defined-length value of one of
/// these tags is read as a sequence (every other defined-length value is skipped whole).
const SEQUENCES: [Tag; 5] = [
    CONCEPT_NAME,
    CONCEPT_CODE,
    MEASURED_VALUE,
    MEASUREMENT_UNITS,
    CONTENT,
];

// DICOM (DCM) concepts of TID 10001 / 10011 / 10012 / 10013 / 10014.
const X_RAY_RADIATION_DOSE_REPORT: &str = "113701";
const START_OF_IRRADIATION: &str = "113809";
const CT_ACCUMULATED: &str = "113811";
const TOTAL_EVENTS: &str = "113812";
const CT_DLP_TOTAL: &str = "113813";
const CT_ACQUISITION: &str = "113819";
const CT_ACQUISITION_TYPE: &str = "113820";
const CT_DOSE: &str = "113829";
const MEAN_CTDIVOL: &str = "113830";
const DLP: &str = "113838";
const IRRADIATION_EVENT_UID: &str = "113769";
const DATETIME_STARTED: &str = "111526";
const TARGET_REGION: &str = "123014";
const ACQUISITION_PROTOCOL: &str = "125203";

type Tag = (u16, u16);

/// A value as read: the bytes of a primitive value, or the items of a sequence.
enum Value<'a> {
    Bytes(&'a [u8]),
    Items(Vec<DataSet<'a>>),
}

struct Element<'a> {
    tag: Tag,
    value: Value<'a>,
}

/// The elements of a data set or item, in order.
struct DataSet<'a>(Vec<Element<'a>>);

impl<'a> DataSet<'a> {
    fn get(&self, tag: Tag) -> Option<&Value<'a>> {
        self.0.iter().find(|e| e.tag == tag).map(|e| &e.value)
    }

    fn bytes(&self, tag: Tag) -> Option<&'a [u8]> {
        match self.get(tag) {
            Some(Value::Bytes(b)) => Some(b),
            _ => None,
        }
    }

    fn items(&self, tag: Tag) -> &[DataSet<'a>] {
        match self.get(tag) {
            Some(Value::Items(items)) => items,
            _ => &[],
        }
    }

    fn first_item(&self, tag: Tag) -> Option<&DataSet<'a>> {
        self.items(tag).first()
    }
}

fn malformed(tag: Tag, reason: &'static str) -> RdsrError {
    RdsrError::Malformed {
        group: tag.0,
        element: tag.1,
        reason,
    }
}

/// Where a data set ends: at the end of the input (the top level), at a defined offset
/// (an item of defined length), or at an Item Delimitation Item.
#[derive(Clone, Copy)]
enum End {
    Input,
    At(usize),
    Delimiter,
}

/// A bounded recursive reader of one data set, every header through [`element::read_header_at`].
struct Parser<'a> {
    bytes: &'a [u8],
    elements: usize,
}

impl<'a> Parser<'a> {
    fn count(&mut self, tag: Tag) -> Result<(), RdsrError> {
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            return Err(malformed(tag, "too many elements"));
        }
        Ok(())
    }

    fn header(&self, pos: usize, enc: Encoding, parent: Tag) -> Result<ElementHeader, RdsrError> {
        element::read_header_at(self.bytes, pos, enc)
            .ok_or_else(|| malformed(parent, "truncated element header"))
    }

    /// The value bytes `[start, start + len)`, checked against the input.
    fn span(&self, start: usize, len: u32, tag: Tag) -> Result<(usize, &'a [u8]), RdsrError> {
        let end = start
            .checked_add(len as usize)
            .ok_or_else(|| malformed(tag, "value length past the end of the object"))?;
        let value = self
            .bytes
            .get(start..end)
            .ok_or_else(|| malformed(tag, "value length past the end of the object"))?;
        Ok((end, value))
    }

    /// Reads the data set starting at `pos`; returns it and the offset after it (after the
    /// Item Delimitation Item for [`End::Delimiter`]).
    fn data_set(
        &mut self,
        mut pos: usize,
        end: End,
        enc: Encoding,
        depth: usize,
        parent: Tag,
    ) -> Result<(DataSet<'a>, usize), RdsrError> {
        let mut elements = Vec::new();
        loop {
            match end {
                End::Input if pos >= self.bytes.len() => return Ok((DataSet(elements), pos)),
                End::At(at) if pos == at => return Ok((DataSet(elements), pos)),
                End::At(at) if pos > at => {
                    return Err(malformed(parent, "element runs past the end of its item"));
                }
                _ => {}
            }
            let h = self.header(pos, enc, parent)?;
            let tag = (h.group, h.element);
            self.count(tag)?;
            let start = pos + h.header_len;
            if h.group == element::ITEM_GROUP {
                if h.element == 0xE00D && matches!(end, End::Delimiter) {
                    return Ok((DataSet(elements), start));
                }
                return Err(malformed(tag, "item or delimiter where an element belongs"));
            }
            let undefined = h.len == element::UNDEFINED_LENGTH;
            let un_sequence = h.vr == Some(*b"UN") && undefined;
            let sequence = match h.vr {
                Some(vr) => &vr == b"SQ" || un_sequence,
                None => undefined || SEQUENCES.contains(&tag),
            };
            let (value, next) = if sequence {
                if depth >= MAX_DEPTH {
                    return Err(malformed(tag, "sequences nested too deep"));
                }
                // PS3.5 6.2.2: a UN value of undefined length is a sequence in Implicit VR LE.
                let inner = if un_sequence {
                    Encoding::IMPLICIT_LE
                } else {
                    enc
                };
                let (items, next) = self.sequence(start, h.len, inner, depth + 1, tag)?;
                (Value::Items(items), next)
            } else if undefined {
                // Encapsulated fragments (e.g. pixel data): skipped.
                (Value::Bytes(&[]), self.fragments(start, enc, tag)?)
            } else {
                let (next, value) = self.span(start, h.len, tag)?;
                (Value::Bytes(value), next)
            };
            elements.push(Element { tag, value });
            pos = next;
        }
    }

    fn sequence(
        &mut self,
        mut pos: usize,
        len: u32,
        enc: Encoding,
        depth: usize,
        tag: Tag,
    ) -> Result<(Vec<DataSet<'a>>, usize), RdsrError> {
        let end = if len == element::UNDEFINED_LENGTH {
            None
        } else {
            Some(self.span(pos, len, tag)?.0)
        };
        let mut items = Vec::new();
        loop {
            if let Some(end) = end {
                if pos == end {
                    return Ok((items, pos));
                }
                if pos > end {
                    return Err(malformed(tag, "item runs past the end of its sequence"));
                }
            }
            let h = self.header(pos, enc, tag)?;
            self.count(tag)?;
            let start = pos + h.header_len;
            match (h.group, h.element) {
                (element::ITEM_GROUP, 0xE0DD) if end.is_none() => return Ok((items, start)),
                (element::ITEM_GROUP, 0xE000) => {
                    let (item, next) = if h.len == element::UNDEFINED_LENGTH {
                        self.data_set(start, End::Delimiter, enc, depth, tag)?
                    } else {
                        let (item_end, _) = self.span(start, h.len, tag)?;
                        self.data_set(start, End::At(item_end), enc, depth, tag)?
                    };
                    items.push(item);
                    pos = next;
                }
                _ => return Err(malformed(tag, "sequence holds something other than items")),
            }
        }
    }

    /// Skips the items of an encapsulated value up to its Sequence Delimitation Item.
    fn fragments(&mut self, mut pos: usize, enc: Encoding, tag: Tag) -> Result<usize, RdsrError> {
        loop {
            let h = self.header(pos, enc, tag)?;
            self.count(tag)?;
            let start = pos + h.header_len;
            match (h.group, h.element) {
                (element::ITEM_GROUP, 0xE0DD) => return Ok(start),
                (element::ITEM_GROUP, 0xE000) if h.len != element::UNDEFINED_LENGTH => {
                    pos = self.span(start, h.len, tag)?.0;
                }
                _ => {
                    return Err(malformed(
                        tag,
                        "undefined length value that is not a sequence",
                    ));
                }
            }
        }
    }
}

/// Text values decoded in the data set's Specific Character Set, trimmed of padding.
struct Text {
    charset: Option<SpecificCharset>,
}

impl Text {
    fn of(ds: &DataSet<'_>) -> Self {
        let charset = match ds.bytes(SPECIFIC_CHARSET) {
            None => Some(SpecificCharset::Default),
            Some(v) => std::str::from_utf8(v).ok().and_then(|s| {
                let terms: Vec<&str> = s.split('\\').collect();
                SpecificCharset::from_terms(&terms).ok()
            }),
        };
        Self { charset }
    }

    /// The whole value (every value of a multi-valued element, with its backslashes).
    fn decode(&self, ds: &DataSet<'_>, tag: Tag) -> Result<Option<String>, RdsrError> {
        let Some(v) = ds.bytes(tag) else {
            return Ok(None);
        };
        let decoded = if v.is_ascii() {
            Some(v.iter().map(|b| char::from(*b)).collect::<String>())
        } else {
            match &self.charset {
                Some(SpecificCharset::Other(term)) => {
                    SpecificCharacterSet::from_code(term).and_then(|cs| cs.decode(v).ok())
                }
                Some(cs) => charset::decode(v, cs).ok(),
                None => None,
            }
        };
        let Some(s) = decoded else {
            return Err(RdsrError::Content(
                "a text value cannot be decoded in the Specific Character Set",
            ));
        };
        let s = s.trim_matches([' ', '\0']);
        Ok((!s.is_empty()).then(|| s.to_string()))
    }
}

/// A coded entry: the first item of `seq` in `ds`.
fn code(text: &Text, ds: &DataSet<'_>, seq: Tag) -> Result<Option<Code>, RdsrError> {
    let Some(item) = ds.first_item(seq) else {
        return Ok(None);
    };
    let value = match text.decode(item, CODE_VALUE)? {
        Some(v) => Some(v),
        None => text.decode(item, LONG_CODE_VALUE)?,
    };
    Ok(Some(Code {
        value: value.unwrap_or_default(),
        scheme: text.decode(item, CODING_SCHEME)?.unwrap_or_default(),
        meaning: text.decode(item, CODE_MEANING)?.unwrap_or_default(),
    }))
}

/// One content item, as far as this reader needs it.
struct Item<'d, 'a> {
    ds: &'d DataSet<'a>,
    concept: Option<Code>,
}

impl<'d, 'a> Item<'d, 'a> {
    /// Whether the concept name is the DICOM (DCM) code `value` (scheme trimmed, compared
    /// ASCII case-insensitively).
    fn is(&self, value: &str) -> bool {
        self.concept
            .as_ref()
            .is_some_and(|c| c.value == value && c.scheme.eq_ignore_ascii_case("DCM"))
    }
}

/// The children of a content item (its Content Sequence), with their concept names.
fn children<'d, 'a>(text: &Text, ds: &'d DataSet<'a>) -> Result<Vec<Item<'d, 'a>>, RdsrError> {
    ds.items(CONTENT)
        .iter()
        .map(|item| {
            Ok(Item {
                ds: item,
                concept: code(text, item, CONCEPT_NAME)?,
            })
        })
        .collect()
}

/// The first number of a NUM content item in its units: `Ok(None)` when the item has no
/// measured value (allowed by the templates when the value is unknown).
fn number(text: &Text, item: &Item<'_, '_>) -> Result<Option<(f64, Code)>, RdsrError> {
    let Some(mv) = item.ds.first_item(MEASURED_VALUE) else {
        return Ok(None);
    };
    let Some(raw) = text.decode(mv, NUMERIC_VALUE)? else {
        return Ok(None);
    };
    // DS: VM may be more than one (a few scanners send it so); the first value is the
    // measurement.
    let first = raw
        .split('\\')
        .next()
        .unwrap_or("")
        .trim_matches([' ', '\0']);
    let n: f64 = first
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .ok_or(RdsrError::Content("a numeric value (DS) is not a number"))?;
    let units = code(text, mv, MEASUREMENT_UNITS)?.unwrap_or_default();
    Ok(Some((n, units)))
}

/// Scale to mGy of a UCUM absorbed-dose unit.
fn mgy_scale(units: &str) -> Option<f64> {
    match units {
        "mGy" => Some(1.0),
        "Gy" => Some(1000.0),
        "cGy" => Some(10.0),
        "uGy" => Some(0.001),
        _ => None,
    }
}

/// Scale to mGy·cm of a dose-length unit. `mGycm` (no dot) is how Siemens Definition Flash
/// and GE Enhanced SR reports write mGy.cm.
fn mgy_cm_scale(units: &str) -> Option<f64> {
    match units {
        "mGy.cm" | "mGycm" | "mGy*cm" => Some(1.0),
        "Gy.cm" | "Gycm" => Some(1000.0),
        "cGy.cm" => Some(10.0),
        "uGy.cm" => Some(0.001),
        "mGy.mm" => Some(0.1),
        "Gy.m" => Some(100_000.0),
        _ => None,
    }
}

/// A dose value: the NUM's number in mGy (`scale`), refused when negative or in units that
/// are not a dose of that kind.
fn dose(
    text: &Text,
    item: &Item<'_, '_>,
    scale: fn(&str) -> Option<f64>,
    what: &'static str,
) -> Result<Option<f64>, RdsrError> {
    let Some((n, units)) = number(text, item)? else {
        return Ok(None);
    };
    let Some(factor) = scale(&units.value) else {
        return Err(RdsrError::Content(what));
    };
    if n < 0.0 {
        return Err(RdsrError::Content("a dose value is negative"));
    }
    Ok(Some(n * factor))
}

fn ctdivol(text: &Text, item: &Item<'_, '_>) -> Result<Option<f64>, RdsrError> {
    dose(
        text,
        item,
        mgy_scale,
        "Mean CTDIvol (113830) in units that are not a dose (Gy)",
    )
}

fn dlp(text: &Text, item: &Item<'_, '_>) -> Result<Option<f64>, RdsrError> {
    dose(
        text,
        item,
        mgy_cm_scale,
        "DLP in units that are not a dose-length product (Gy.cm)",
    )
}

/// The CT Acquisition (113819) containers and the first CT Accumulated Dose Data (113811)
/// container anywhere under `ds`, in document order (a report may nest them in other
/// containers).
fn collect<'d, 'a>(
    text: &Text,
    ds: &'d DataSet<'a>,
    events: &mut Vec<&'d DataSet<'a>>,
    accumulated: &mut Option<&'d DataSet<'a>>,
) -> Result<(), RdsrError> {
    for child in children(text, ds)? {
        if child.is(CT_ACQUISITION) {
            events.push(child.ds);
        } else if child.is(CT_ACCUMULATED) {
            if accumulated.is_none() {
                *accumulated = Some(child.ds);
            }
        } else {
            collect(text, child.ds, events, accumulated)?;
        }
    }
    Ok(())
}

fn read_event(
    text: &Text,
    ds: &DataSet<'_>,
    report_datetime: Option<&String>,
) -> Result<IrradiationEvent, RdsrError> {
    let mut event = IrradiationEvent::default();
    let mut uid = None;
    for child in children(text, ds)? {
        if child.is(IRRADIATION_EVENT_UID) {
            uid = text.decode(child.ds, UID)?;
        } else if child.is(ACQUISITION_PROTOCOL) {
            event.protocol = text.decode(child.ds, TEXT_VALUE)?;
        } else if child.is(TARGET_REGION) {
            event.target_region = code(text, child.ds, CONCEPT_CODE)?;
        } else if child.is(CT_ACQUISITION_TYPE) {
            event.acquisition_type = code(text, child.ds, CONCEPT_CODE)?;
        } else if child.is(DATETIME_STARTED) {
            event.datetime = text.decode(child.ds, DATETIME)?;
        } else if child.is(CT_DOSE) {
            for d in children(text, child.ds)? {
                if d.is(MEAN_CTDIVOL) {
                    event.ctdivol_mgy = ctdivol(text, &d)?;
                } else if d.is(DLP) {
                    event.dlp_mgy_cm = dlp(text, &d)?;
                }
            }
        }
    }
    event.event_uid = uid.ok_or(RdsrError::Content(
        "a CT Acquisition without its Irradiation Event UID (113769)",
    ))?;
    if event.datetime.is_none() {
        event.datetime = report_datetime.cloned();
    }
    Ok(event)
}

fn read_accumulated(text: &Text, ds: &DataSet<'_>) -> Result<Accumulated, RdsrError> {
    let mut acc = Accumulated::default();
    for child in children(text, ds)? {
        if child.is(TOTAL_EVENTS) {
            if let Some((n, _)) = number(text, &child)? {
                if n < 0.0 || n.fract() != 0.0 || n > 9_007_199_254_740_992.0 {
                    return Err(RdsrError::Content(
                        "Total Number of Irradiation Events (113812) is not a whole number",
                    ));
                }
                // Whole, non-negative and below 2^53: exact as u64.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let n = n as u64;
                acc.total_events = Some(n);
            }
        } else if child.is(CT_DLP_TOTAL) {
            acc.total_dlp_mgy_cm = dose(
                text,
                &child,
                mgy_cm_scale,
                "CT Dose Length Product Total (113813) in units that are not a dose-length product (Gy.cm)",
            )?;
        }
    }
    Ok(acc)
}

/// Reads a CT dose report from a Part 10 object (as the spool stores it). `Ok(None)`: not a
/// CT dose report (not an SR, another SR template, or a projection X-ray dose report).
pub fn read(bytes: &[u8]) -> Result<Option<DoseReport>, RdsrError> {
    let meta = part10::read(bytes).map_err(|e| match e {
        part10::Part10Error::Read { reason } => RdsrError::NotPart10(reason),
        _ => RdsrError::NotPart10("unreadable file meta group"),
    })?;
    if !meta.sop_class_uid.starts_with(SR_CLASS_ROOT) {
        return Ok(None);
    }
    let enc = Encoding::of_transfer_syntax(&meta.transfer_syntax_uid);
    if enc.deflated {
        return Err(malformed(
            (0x0002, 0x0010),
            "deflated transfer syntax is not supported",
        ));
    }
    let mut parser = Parser { bytes, elements: 0 };
    let (root, _) = parser.data_set(meta.data_set_offset, End::Input, enc, 0, (0x0002, 0x0010))?;
    let text = Text::of(&root);
    let root_item = Item {
        ds: &root,
        concept: code(&text, &root, CONCEPT_NAME)?,
    };
    if !root_item.is(X_RAY_RADIATION_DOSE_REPORT) {
        return Ok(None);
    }
    let mut start = None;
    for child in children(&text, &root)? {
        if child.is(START_OF_IRRADIATION) && start.is_none() {
            start = text.decode(child.ds, DATETIME)?;
        }
    }
    let datetime = match start {
        Some(s) => Some(s),
        None => match (
            text.decode(&root, STUDY_DATE)?,
            text.decode(&root, STUDY_TIME)?,
        ) {
            (Some(d), Some(t)) => Some(format!("{d}{t}")),
            (d, _) => d,
        },
    };
    let mut event_items = Vec::new();
    let mut accumulated = None;
    collect(&text, &root, &mut event_items, &mut accumulated)?;
    if event_items.is_empty() && accumulated.is_none() {
        return Ok(None);
    }
    let events = event_items
        .into_iter()
        .map(|ds| read_event(&text, ds, datetime.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let accumulated = accumulated
        .map(|ds| read_accumulated(&text, ds))
        .transpose()?;
    Ok(Some(DoseReport {
        sop_instance_uid: text
            .decode(&root, SOP_INSTANCE)?
            .unwrap_or(meta.sop_instance_uid),
        study_instance_uid: text.decode(&root, STUDY_INSTANCE)?,
        accession_number: text.decode(&root, ACCESSION)?,
        patient_id: text.decode(&root, PATIENT_ID)?,
        issuer_of_patient_id: text.decode(&root, ISSUER)?,
        // Not needed to match the report: a name in a character set the report does not
        // declare (seen in the field) leaves it out rather than losing the dose.
        patient_name: text.decode(&root, PATIENT_NAME).ok().flatten(),
        birth_date: text.decode(&root, BIRTH_DATE)?,
        sex: text.decode(&root, SEX)?,
        manufacturer: text.decode(&root, MANUFACTURER)?,
        datetime,
        events,
        accumulated,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const RDSR_CLASS: &str = "1.2.840.10008.5.1.4.1.1.88.67";
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
    const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";

    /// How the synthetic objects are encoded.
    #[derive(Clone, Copy)]
    pub(crate) struct Enc {
        pub implicit: bool,
        pub big_endian: bool,
        /// Sequences and items of undefined length.
        pub undefined: bool,
    }

    pub(crate) const EXPLICIT: Enc = Enc {
        implicit: false,
        big_endian: false,
        undefined: false,
    };

    impl Enc {
        fn ts(self) -> &'static str {
            match (self.implicit, self.big_endian) {
                (true, _) => IMPLICIT_LE,
                (false, true) => EXPLICIT_BE,
                (false, false) => EXPLICIT_LE,
            }
        }

        fn u16(self, v: u16) -> [u8; 2] {
            if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        }

        fn u32(self, v: u32) -> [u8; 4] {
            if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        }

        fn tag(self, out: &mut Vec<u8>, tag: Tag) {
            out.extend(self.u16(tag.0));
            out.extend(self.u16(tag.1));
        }

        pub(crate) fn el(self, tag: Tag, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
            let mut value = value.to_vec();
            if value.len() % 2 == 1 {
                value.push(if vr == b"UI" { 0 } else { b' ' });
            }
            let mut out = Vec::new();
            self.tag(&mut out, tag);
            if self.implicit {
                out.extend(self.u32(value.len() as u32));
            } else if element::is_long_vr(*vr) {
                out.extend(vr);
                out.extend([0, 0]);
                out.extend(self.u32(value.len() as u32));
            } else {
                out.extend(vr);
                out.extend(self.u16(value.len() as u16));
            }
            out.extend(value);
            out
        }

        pub(crate) fn sq(self, tag: Tag, items: &[Vec<u8>]) -> Vec<u8> {
            let mut body = Vec::new();
            for item in items {
                self.tag(&mut body, (0xFFFE, 0xE000));
                if self.undefined {
                    body.extend(self.u32(element::UNDEFINED_LENGTH));
                    body.extend(item);
                    self.tag(&mut body, (0xFFFE, 0xE00D));
                    body.extend(self.u32(0));
                } else {
                    body.extend(self.u32(item.len() as u32));
                    body.extend(item);
                }
            }
            let mut out = Vec::new();
            self.tag(&mut out, tag);
            if !self.implicit {
                out.extend(b"SQ\0\0");
            }
            if self.undefined {
                out.extend(self.u32(element::UNDEFINED_LENGTH));
                out.extend(body);
                self.tag(&mut out, (0xFFFE, 0xE0DD));
                out.extend(self.u32(0));
            } else {
                out.extend(self.u32(body.len() as u32));
                out.extend(body);
            }
            out
        }

        pub(crate) fn code_item(self, value: &str, scheme: &str, meaning: &str) -> Vec<u8> {
            [
                self.el(CODE_VALUE, b"SH", value.as_bytes()),
                self.el(CODING_SCHEME, b"SH", scheme.as_bytes()),
                self.el(CODE_MEANING, b"LO", meaning.as_bytes()),
            ]
            .concat()
        }

        /// A content item: relationship CONTAINS, its value type and DCM concept name, then
        /// `rest` (elements in tag order after (0040,A043)).
        fn item(self, value_type: &str, concept: &str, rest: &[Vec<u8>]) -> Vec<u8> {
            let mut out = [
                self.el((0x0040, 0xA010), b"CS", b"CONTAINS"),
                self.el((0x0040, 0xA040), b"CS", value_type.as_bytes()),
                self.sq(CONCEPT_NAME, &[self.code_item(concept, "DCM", "x")]),
            ]
            .concat();
            for r in rest {
                out.extend(r);
            }
            out
        }

        pub(crate) fn container(self, concept: &str, children: &[Vec<u8>]) -> Vec<u8> {
            self.item(
                "CONTAINER",
                concept,
                &[
                    self.el((0x0040, 0xA050), b"CS", b"SEPARATE"),
                    self.sq(CONTENT, children),
                ],
            )
        }

        pub(crate) fn num(self, concept: &str, value: &str, units: &str) -> Vec<u8> {
            let mv = [
                self.sq(MEASUREMENT_UNITS, &[self.code_item(units, "UCUM", units)]),
                self.el(NUMERIC_VALUE, b"DS", value.as_bytes()),
            ]
            .concat();
            self.item("NUM", concept, &[self.sq(MEASURED_VALUE, &[mv])])
        }

        pub(crate) fn uidref(self, concept: &str, uid: &str) -> Vec<u8> {
            self.item("UIDREF", concept, &[self.el(UID, b"UI", uid.as_bytes())])
        }

        pub(crate) fn text(self, concept: &str, text: &str) -> Vec<u8> {
            self.item(
                "TEXT",
                concept,
                &[self.el(TEXT_VALUE, b"UT", text.as_bytes())],
            )
        }

        pub(crate) fn datetime(self, concept: &str, dt: &str) -> Vec<u8> {
            self.item(
                "DATETIME",
                concept,
                &[self.el(DATETIME, b"DT", dt.as_bytes())],
            )
        }

        pub(crate) fn code(self, concept: &str, code: (&str, &str, &str)) -> Vec<u8> {
            self.item(
                "CODE",
                concept,
                &[self.sq(CONCEPT_CODE, &[self.code_item(code.0, code.1, code.2)])],
            )
        }

        /// A CT Acquisition with its UID, protocol, target region and CT Dose.
        pub(crate) fn event(self, uid: &str, ctdi: &str, dlp: &str) -> Vec<u8> {
            self.container(
                CT_ACQUISITION,
                &[
                    self.text(ACQUISITION_PROTOCOL, "Head"),
                    self.code(TARGET_REGION, ("T-D1100", "SRT", "Head")),
                    self.code(
                        CT_ACQUISITION_TYPE,
                        ("P5-08001", "SRT", "Spiral Acquisition"),
                    ),
                    self.uidref(IRRADIATION_EVENT_UID, uid),
                    self.container(
                        CT_DOSE,
                        &[
                            self.num(MEAN_CTDIVOL, ctdi, "mGy"),
                            self.num(DLP, dlp, "mGy.cm"),
                        ],
                    ),
                ],
            )
        }

        pub(crate) fn accumulated(self, events: &str, dlp: &str) -> Vec<u8> {
            self.container(
                CT_ACCUMULATED,
                &[
                    self.num(TOTAL_EVENTS, events, "{events}"),
                    self.num(CT_DLP_TOTAL, dlp, "mGy.cm"),
                ],
            )
        }

        /// A Part 10 SR of class `class` with root concept `root` and `content`.
        pub(crate) fn report(
            self,
            class: &str,
            root: (&str, &str),
            charset: &str,
            content: &[Vec<u8>],
        ) -> Vec<u8> {
            let mut out = part10::header(class, "1.2.3.4.5", self.ts()).unwrap();
            for el in [
                self.el(SPECIFIC_CHARSET, b"CS", charset.as_bytes()),
                self.el((0x0008, 0x0016), b"UI", class.as_bytes()),
                self.el(SOP_INSTANCE, b"UI", b"1.2.3.4.5"),
                self.el(STUDY_DATE, b"DA", b"20260102"),
                self.el(STUDY_TIME, b"TM", b"0930"),
                self.el(ACCESSION, b"SH", b"ACC-1"),
                self.el(MANUFACTURER, b"LO", b"ACME"),
                self.el(PATIENT_NAME, b"PN", "山田^太郎".as_bytes()),
                self.el(PATIENT_ID, b"LO", b"PID-7"),
                self.el(ISSUER, b"LO", b"HOSP-A"),
                self.el(BIRTH_DATE, b"DA", b"19700101"),
                self.el(SEX, b"CS", b"F"),
                self.el(STUDY_INSTANCE, b"UI", b"1.2.3.4"),
                self.el((0x0040, 0xA040), b"CS", b"CONTAINER"),
                self.sq(CONCEPT_NAME, &[self.code_item(root.0, root.1, "root")]),
                self.el((0x0040, 0xA050), b"CS", b"SEPARATE"),
                self.sq(CONTENT, content),
            ] {
                out.extend(el);
            }
            out
        }

        /// A CT dose report: start of irradiation, two events, the accumulated data.
        pub(crate) fn ct_report(self) -> Vec<u8> {
            self.report(
                RDSR_CLASS,
                (X_RAY_RADIATION_DOSE_REPORT, "DCM"),
                "ISO_IR 192",
                &[
                    self.datetime(START_OF_IRRADIATION, "20260102093000"),
                    self.accumulated("2", "608.2"),
                    self.event("1.2.3.100.1", "12.5", "250.0"),
                    self.container(
                        CT_ACQUISITION,
                        &[
                            self.uidref(IRRADIATION_EVENT_UID, "1.2.3.100.2"),
                            self.datetime(DATETIME_STARTED, "20260102093500"),
                            self.container(
                                CT_DOSE,
                                &[
                                    self.num(MEAN_CTDIVOL, "0.0154", "Gy"),
                                    self.num(DLP, "35.82", "cGy.cm"),
                                ],
                            ),
                        ],
                    ),
                ],
            )
        }
    }

    fn ct_events(report: &DoseReport) -> Vec<(&str, Option<f64>, Option<f64>)> {
        report
            .events
            .iter()
            .map(|e| (e.event_uid.as_str(), e.ctdivol_mgy, e.dlp_mgy_cm))
            .collect()
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn ct_events_and_totals_are_read_in_mgy() {
        let r = read(&EXPLICIT.ct_report()).unwrap().unwrap();
        assert_eq!(r.sop_instance_uid, "1.2.3.4.5");
        assert_eq!(r.study_instance_uid.as_deref(), Some("1.2.3.4"));
        assert_eq!(r.accession_number.as_deref(), Some("ACC-1"));
        assert_eq!(r.patient_id.as_deref(), Some("PID-7"));
        assert_eq!(r.issuer_of_patient_id.as_deref(), Some("HOSP-A"));
        assert_eq!(r.patient_name.as_deref(), Some("山田^太郎"));
        assert_eq!(r.birth_date.as_deref(), Some("19700101"));
        assert_eq!(r.sex.as_deref(), Some("F"));
        assert_eq!(r.manufacturer.as_deref(), Some("ACME"));
        assert_eq!(r.datetime.as_deref(), Some("20260102093000"));
        assert_eq!(r.events.len(), 2);
        let first = &r.events[0];
        assert_eq!(first.event_uid, "1.2.3.100.1");
        assert_eq!(first.protocol.as_deref(), Some("Head"));
        assert_eq!(
            first.target_region,
            Some(Code {
                value: "T-D1100".into(),
                scheme: "SRT".into(),
                meaning: "Head".into()
            })
        );
        assert_eq!(
            first.acquisition_type.as_ref().map(|c| c.meaning.as_str()),
            Some("Spiral Acquisition")
        );
        assert!(close(first.ctdivol_mgy, 12.5) && close(first.dlp_mgy_cm, 250.0));
        // The report's start, for an event without its own.
        assert_eq!(first.datetime.as_deref(), Some("20260102093000"));
        let second = &r.events[1];
        // Gy and cGy.cm converted.
        assert!(close(second.ctdivol_mgy, 15.4), "{:?}", second.ctdivol_mgy);
        assert!(close(second.dlp_mgy_cm, 358.2), "{:?}", second.dlp_mgy_cm);
        assert_eq!(second.datetime.as_deref(), Some("20260102093500"));
        assert_eq!(second.protocol, None);
        let acc = r.accumulated.unwrap();
        assert_eq!(acc.total_events, Some(2));
        assert!(close(acc.total_dlp_mgy_cm, 608.2));
    }

    #[test]
    fn every_encoding_and_length_form_reads_the_same() {
        let want = read(&EXPLICIT.ct_report()).unwrap().unwrap();
        for implicit in [false, true] {
            for big_endian in [false, true] {
                for undefined in [false, true] {
                    if implicit && big_endian {
                        continue;
                    }
                    let enc = Enc {
                        implicit,
                        big_endian,
                        undefined,
                    };
                    let got = read(&enc.ct_report()).unwrap().unwrap();
                    assert!(
                        got == want,
                        "implicit {implicit} be {big_endian} undef {undefined}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_debug_form_holds_no_patient_data() {
        let r = read(&EXPLICIT.ct_report()).unwrap().unwrap();
        let shown = format!("{r:?} {:?}", r.events);
        for secret in ["PID-7", "山田", "19700101", "1.2.3.100.1", "Head"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    fn single_event_report(enc: Enc, ctdi: (&str, &str), dlp: (&str, &str)) -> Vec<u8> {
        enc.report(
            RDSR_CLASS,
            (X_RAY_RADIATION_DOSE_REPORT, "DCM"),
            "",
            &[enc.container(
                CT_ACQUISITION,
                &[
                    enc.uidref(IRRADIATION_EVENT_UID, "1.2.9"),
                    enc.container(
                        CT_DOSE,
                        &[
                            enc.num(MEAN_CTDIVOL, ctdi.0, ctdi.1),
                            enc.num(DLP, dlp.0, dlp.1),
                        ],
                    ),
                ],
            )],
        )
    }

    #[test]
    fn units_are_converted_and_legacy_spellings_accepted() {
        for (ctdi, dlp, want) in [
            (("1.5", "mGy"), ("30", "mGycm"), (1.5, 30.0)),
            (("1500", "uGy"), ("0.03", "Gy.cm"), (1.5, 30.0)),
            (("0.15", "cGy"), ("300", "mGy.mm"), (1.5, 30.0)),
            // A multi-valued DS: the first value; padding trimmed.
            (("1.5\\2.5 ", "mGy"), (" +3.0E1", "mGy.cm"), (1.5, 30.0)),
        ] {
            let r = read(&single_event_report(EXPLICIT, ctdi, dlp))
                .unwrap()
                .unwrap();
            let got = ct_events(&r);
            assert!(
                close(got[0].1, want.0) && close(got[0].2, want.1),
                "{ctdi:?} {dlp:?} -> {got:?}"
            );
            assert_eq!(r.accumulated, None);
        }
    }

    #[test]
    fn units_that_are_not_a_dose_and_bad_numbers_are_content_errors() {
        for (ctdi, dlp) in [
            (("1.5", "mSv"), ("30", "mGy.cm")),
            (("1.5", "mGy"), ("30", "mGy")),
            (("1.5", "mGy.cm"), ("30", "mGy.cm")),
            (("abc", "mGy"), ("30", "mGy.cm")),
            (("NaN", "mGy"), ("30", "mGy.cm")),
            (("inf", "mGy"), ("30", "mGy.cm")),
            (("-1", "mGy"), ("30", "mGy.cm")),
        ] {
            let got = read(&single_event_report(EXPLICIT, ctdi, dlp));
            assert!(
                matches!(got, Err(RdsrError::Content(_))),
                "{ctdi:?} {dlp:?}: {got:?}"
            );
        }
    }

    #[test]
    fn events_nested_in_other_containers_are_found() {
        let e = EXPLICIT;
        let bytes = e.report(
            RDSR_CLASS,
            (X_RAY_RADIATION_DOSE_REPORT, "DCM"),
            "",
            &[e.container(
                "999999",
                &[
                    e.event("1.2.1", "1", "10"),
                    e.container("999998", &[e.event("1.2.2", "2", "20")]),
                ],
            )],
        );
        let r = read(&bytes).unwrap().unwrap();
        assert_eq!(
            ct_events(&r),
            vec![
                ("1.2.1", Some(1.0), Some(10.0)),
                ("1.2.2", Some(2.0), Some(20.0))
            ]
        );
        // Study Date and Time stand in for a missing Start of X-Ray Irradiation.
        assert_eq!(r.datetime.as_deref(), Some("202601020930"));
    }

    #[test]
    fn an_event_without_its_uid_is_a_content_error() {
        let e = EXPLICIT;
        let bytes = e.report(
            RDSR_CLASS,
            (X_RAY_RADIATION_DOSE_REPORT, "DCM"),
            "",
            &[e.container(
                CT_ACQUISITION,
                &[e.container(CT_DOSE, &[e.num(DLP, "10", "mGy.cm")])],
            )],
        );
        let err = read(&bytes).unwrap_err();
        assert!(
            matches!(err, RdsrError::Content(m) if m.contains("113769")),
            "{err:?}"
        );
    }

    #[test]
    fn an_event_without_ct_dose_has_no_values() {
        let e = EXPLICIT;
        let bytes = e.report(
            RDSR_CLASS,
            (X_RAY_RADIATION_DOSE_REPORT, "DCM"),
            "",
            &[e.container(CT_ACQUISITION, &[e.uidref(IRRADIATION_EVENT_UID, "1.2.3")])],
        );
        let r = read(&bytes).unwrap().unwrap();
        assert_eq!(ct_events(&r), vec![("1.2.3", None, None)]);
        // A UTF-8 name in a report declaring no Specific Character Set: left out, the
        // dose kept.
        assert_eq!(r.patient_name, None);
        assert_eq!(r.patient_id.as_deref(), Some("PID-7"));
    }

    #[test]
    fn other_srs_objects_and_projection_reports_are_not_ct_dose_reports() {
        let e = EXPLICIT;
        let ct = [e.event("1.2.1", "1", "10")];
        // Another SR template.
        let other = e.report(RDSR_CLASS, ("18748-4", "LN"), "", &ct);
        assert_eq!(read(&other).unwrap(), None);
        // The right code in another scheme.
        let other = e.report(RDSR_CLASS, (X_RAY_RADIATION_DOSE_REPORT, "LN"), "", &ct);
        assert_eq!(read(&other).unwrap(), None);
        // Not an SR class at all (a CT image).
        let image = e.report(
            "1.2.840.10008.5.1.4.1.1.2",
            (X_RAY_RADIATION_DOSE_REPORT, "DCM"),
            "",
            &ct,
        );
        assert_eq!(read(&image).unwrap(), None);
        // A projection X-ray dose report: accumulated X-ray data (113702), no CT content.
        let projection = e.report(
            RDSR_CLASS,
            (X_RAY_RADIATION_DOSE_REPORT, "DCM"),
            "",
            &[e.container("113702", &[e.num("113722", "0.5", "Gy.m2")])],
        );
        assert_eq!(read(&projection).unwrap(), None);
        // An SR with no content at all.
        let empty = e.report(RDSR_CLASS, (X_RAY_RADIATION_DOSE_REPORT, "DCM"), "", &[]);
        assert_eq!(read(&empty).unwrap(), None);
    }

    #[test]
    fn not_part10_and_deflate_are_refused() {
        assert!(matches!(read(b"hello"), Err(RdsrError::NotPart10(_))));
        let mut bytes = part10::header(RDSR_CLASS, "1.2.3", "1.2.840.10008.1.2.1.99").unwrap();
        bytes.extend([0x4B, 0x49, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00]);
        assert!(matches!(
            read(&bytes),
            Err(RdsrError::Malformed {
                group: 2,
                element: 0x10,
                ..
            })
        ));
    }

    #[test]
    fn every_truncation_inside_the_content_is_malformed_never_a_panic() {
        for enc in [
            EXPLICIT,
            Enc {
                implicit: true,
                big_endian: false,
                undefined: true,
            },
        ] {
            let whole = enc.ct_report();
            let content_at = whole
                .windows(4)
                .rposition(|w| w == [0x40, 0x00, 0x30, 0xA7])
                .unwrap();
            for cut in 0..whole.len() {
                let got = read(&whole[..cut]);
                if cut > content_at {
                    assert!(
                        matches!(got, Err(RdsrError::Malformed { .. })),
                        "cut at {cut}: {got:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn garbage_after_the_header_is_malformed() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for n in 0..200 {
            let mut bytes = part10::header(RDSR_CLASS, "1.2.3", EXPLICIT_LE).unwrap();
            for _ in 0..(n * 7 % 300 + 1) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            // Garbage may happen to read as elements; it must never panic nor be a report.
            assert!(!matches!(read(&bytes), Ok(Some(_))));
        }
        let mut bytes = part10::header(RDSR_CLASS, "1.2.3", EXPLICIT_LE).unwrap();
        bytes.extend([
            0x40, 0x00, 0x30, 0xA7, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0x7F,
        ]);
        assert!(matches!(
            read(&bytes),
            Err(RdsrError::Malformed {
                group: 0x0040,
                element: 0xA730,
                ..
            })
        ));
    }

    #[test]
    fn nesting_past_the_bound_is_malformed() {
        let e = EXPLICIT;
        let mut inner = e.event("1.2.1", "1", "10");
        for _ in 0..MAX_DEPTH {
            inner = e.container("999999", &[inner]);
        }
        let bytes = e.report(
            RDSR_CLASS,
            (X_RAY_RADIATION_DOSE_REPORT, "DCM"),
            "",
            &[inner],
        );
        assert!(matches!(
            read(&bytes),
            Err(RdsrError::Malformed {
                reason: "sequences nested too deep",
                ..
            })
        ));
    }

    #[test]
    fn error_messages_carry_no_patient_data() {
        let mut bytes = EXPLICIT.ct_report();
        bytes.truncate(bytes.len() - 3);
        let shown = read(&bytes).unwrap_err().to_string();
        assert!(
            !shown.contains("PID-7") && !shown.contains("ACC-1"),
            "{shown}"
        );
    }

    /// Writes the synthetic reports as fuzz seeds when RDSR_SEED_DIR is set.
    #[test]
    fn write_fuzz_seeds_when_asked() {
        let Some(dir) = std::env::var_os("RDSR_SEED_DIR") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let implicit = Enc {
            implicit: true,
            big_endian: false,
            undefined: true,
        };
        let be = Enc {
            implicit: false,
            big_endian: true,
            undefined: false,
        };
        let seeds = [
            ("ct_explicit_le", EXPLICIT.ct_report()),
            ("ct_implicit_undefined", implicit.ct_report()),
            ("ct_explicit_be", be.ct_report()),
            (
                "legacy_units",
                single_event_report(EXPLICIT, ("1", "mGy"), ("2", "mGycm")),
            ),
            (
                "not_dose",
                EXPLICIT.report(RDSR_CLASS, ("18748-4", "LN"), "", &[]),
            ),
        ];
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
