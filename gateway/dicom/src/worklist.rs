//! Modality Worklist Information Model – FIND (1.2.840.10008.5.1.4.31): the C-FIND
//! identifier turned into a [`WorklistQuery`] of `gateway-booking`, and each matching
//! [`WorklistItem`] turned into the identifier of a pending C-FIND-RSP.
//!
//! Matching itself is `gateway_booking::worklist` (PS3.4 C.2.2.2); this module only reads
//! the matching keys and writes the return keys:
//! - matching keys: Patient's Name (0010,0010), Patient ID (0010,0020), Accession Number
//!   (0008,0050), and in the first item of Scheduled Procedure Step Sequence (0040,0100):
//!   Modality (0008,0060), Scheduled Station AE Title (0040,0001), Scheduled Procedure Step
//!   Start Date (0040,0002) and Start Time (0040,0003);
//! - return keys: every attribute of the request identifier, filled from the item when the
//!   SCP knows it, zero length otherwise (a sequence key with no item returns the six
//!   Scheduled Procedure Step attributes the SCP knows);
//! - safety alerts (Patient Medical module, return keys only: a value given in the query
//!   is not matched on, universal matching): Medical Alerts (0010,2000) and Contrast
//!   Allergies (0010,2110, "Allergies" in current DICOM), both LO with one value per alert
//!   (values separated by `\`), encoded like every other text of the response; zero
//!   length when the exam has no alerts.
//!
//! Character sets (see [`crate::charset`]): the request's text is decoded with its
//! Specific Character Set, so a kanji query `=山田*` in `\ISO 2022 IR 87` matches the
//! ideographic group. A response is written in the request's character set when the
//! request declared ISO 2022 IR 87 and every value of the response is representable in
//! it; otherwise (no character set, ISO_IR 192, any other term, or a character outside
//! JIS X 0208) it is written in UTF-8 with `ISO_IR 192`, and without (0008,0005) when all
//! of it is ASCII. Returning a Specific Character Set other than the request's is allowed
//! to a C-FIND SCP; dropping the ideographic and phonetic groups of a name for a
//! default-repertoire request would instead return a different name, so all three groups
//! are always returned.
//!
//! Invariants:
//! - An identifier is at most [`MAX_IDENTIFIER_LEN`] bytes and is checked by the
//!   [`Walker`] (framing) and `check_values` (numeric lengths fit their VR, known VRs,
//!   undefined length only for sequences, nesting depth) before dicom-object reads it, so
//!   no length it claims is ever allocated beyond the bytes received.
//! - dicom-object never decodes its text: (0008,0005) is taken out first, every value is
//!   read as ISO-8859-1 (byte = code point) and decoded by [`crate::charset`].
//! - Nothing here panics on any input; every failure is an [`IdentifierError`] that maps to
//!   a DIMSE status (A900 or C000).
//! - Errors and logs carry no patient data.

use std::borrow::Cow;

use dicom_core::header::Header;
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, DicomValue, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::text::{SpecificCharacterSet, TextCodec};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use gateway_booking::worklist::{WorklistItem, WorklistQuery};

use crate::charset::{self, CharsetError, SpecificCharset};
use crate::element::{self, Encoding, ITEM_GROUP, SHORT_HEADER, UNDEFINED_LENGTH};
use crate::walker::Walker;

/// The SOP class served.
pub const MODALITY_WORKLIST_FIND: &str =
    dicom_dictionary_std::uids::MODALITY_WORKLIST_INFORMATION_MODEL_FIND;

/// Largest C-FIND identifier accepted (real ones are well under a kilobyte).
pub const MAX_IDENTIFIER_LEN: usize = 64 * 1024;

/// Where the worklist comes from (on the core gateway: the booking ledger).
pub trait WorklistSource: Send + Sync + std::fmt::Debug {
    /// The Scheduled Procedure Steps currently on the worklist. Called once per C-FIND, on
    /// a blocking thread, so it may read from disk.
    fn items(&self) -> Vec<WorklistItem>;
}

/// Why a C-FIND identifier cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    #[error("identifier larger than {MAX_IDENTIFIER_LEN} bytes")]
    TooLarge,
    #[error("identifier is not a well-formed data set")]
    Malformed,
    #[error("transfer syntax not supported for C-FIND identifiers")]
    TransferSyntax,
    #[error("identifier does not match the worklist model: {0}")]
    Mismatch(&'static str),
    #[error("identifier text: {0}")]
    Charset(CharsetError),
}

impl IdentifierError {
    /// The DIMSE status that answers it.
    pub fn status(&self) -> u16 {
        match self {
            IdentifierError::Mismatch(_) => crate::dimse::status::DATASET_MISMATCH,
            IdentifierError::Charset(e) if *e != CharsetError::Unsupported => {
                crate::dimse::status::DATASET_MISMATCH
            }
            _ => crate::dimse::status::CANNOT_UNDERSTAND,
        }
    }

    /// Metric label and error comment (no patient data).
    pub fn label(&self) -> &'static str {
        match self {
            IdentifierError::TooLarge => "too_large",
            IdentifierError::Malformed => "malformed",
            IdentifierError::TransferSyntax => "transfer_syntax",
            IdentifierError::Mismatch(_) => "mismatch",
            IdentifierError::Charset(CharsetError::Unsupported) => "charset_unsupported",
            IdentifierError::Charset(_) => "charset_invalid",
        }
    }
}

/// A parsed C-FIND request identifier.
#[derive(Debug, Clone)]
pub struct FindQuery {
    query: WorklistQuery,
    charset: SpecificCharset,
    /// The values of (0008,0005) as received (trimmed).
    charset_terms: Vec<String>,
    /// The request has (0008,0005), so the response has it too.
    asked_charset: bool,
    keys: InMemDicomObject,
    encoding: Encoding,
}

/// Reads a C-FIND identifier received on a presentation context of `transfer_syntax`.
pub fn parse_identifier(bytes: &[u8], transfer_syntax: &str) -> Result<FindQuery, IdentifierError> {
    if bytes.len() > MAX_IDENTIFIER_LEN {
        return Err(IdentifierError::TooLarge);
    }
    let encoding = Encoding::of_transfer_syntax(transfer_syntax);
    if encoding.deflated {
        return Err(IdentifierError::TransferSyntax);
    }
    let mut walker = Walker::new(encoding);
    walker.feed(bytes).map_err(|_| IdentifierError::Malformed)?;
    walker.finish().map_err(|_| IdentifierError::Malformed)?;
    check_values(bytes, encoding).map_err(|()| IdentifierError::Malformed)?;
    // dicom-rs would pick its own codec from value 1 of (0008,0005) (and warn about the
    // empty value 1 of `\ISO 2022 IR 87`): the element is taken out first, so every text
    // value is read as ISO-8859-1, byte for code point, and decoded here.
    let (charset_value, rest) = take_charset(bytes, encoding);
    let keys = InMemDicomObject::read_dataset_with_ts(&*rest, &ts_of(encoding))
        .map_err(|_| IdentifierError::Malformed)?;
    let charset_terms: Vec<String> = match &charset_value {
        Some(value) if value.is_ascii() => value
            .split(|b| *b == b'\\')
            .map(|t| {
                String::from_utf8_lossy(t)
                    .trim_matches([' ', '\0'])
                    .to_string()
            })
            .collect(),
        Some(_) => return Err(IdentifierError::Mismatch("Specific Character Set")),
        None => Vec::new(),
    };
    let charset = SpecificCharset::from_terms(&charset_terms).map_err(IdentifierError::Charset)?;
    let text = |obj: &InMemDicomObject, tag: Tag| text_value(obj, tag, &charset);

    let mut query = WorklistQuery {
        patient_name: text(&keys, tags::PATIENT_NAME)?,
        patient_id: text(&keys, tags::PATIENT_ID)?,
        accession: text(&keys, tags::ACCESSION_NUMBER)?,
        ..WorklistQuery::default()
    };
    if let Some(step) = first_item(&keys, tags::SCHEDULED_PROCEDURE_STEP_SEQUENCE)? {
        query.modality = text(step, tags::MODALITY)?;
        query.station_ae = text(step, tags::SCHEDULED_STATION_AE_TITLE)?;
        query.start_date = text(step, tags::SCHEDULED_PROCEDURE_STEP_START_DATE)?;
        query.start_time = text(step, tags::SCHEDULED_PROCEDURE_STEP_START_TIME)?;
    }
    Ok(FindQuery {
        query,
        charset,
        charset_terms,
        asked_charset: charset_value.is_some(),
        keys,
        encoding,
    })
}

fn ts_of(encoding: Encoding) -> dicom_encoding::TransferSyntax {
    match (encoding.explicit_vr, encoding.big_endian) {
        (false, _) => IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        (true, false) => EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        (true, true) => EXPLICIT_VR_BIG_ENDIAN.erased(),
    }
}

/// Deepest sequence nesting accepted in an identifier (the worklist model uses one).
const MAX_DEPTH: u8 = 8;

/// Checks what the walker does not and dicom-object relies on: every numeric value's length
/// is a multiple of its VR's size (dicom-parser reads `len / size` numbers but skips `len`
/// bytes in its position count, so a UL of length 1 puts it out of step and the next
/// "length" it reads can claim gigabytes), VRs are known, and only sequences have
/// undefined length. VRs come from the bytes (explicit VR) or, as dicom-parser does, from
/// the standard dictionary (implicit VR).
fn check_values(bytes: &[u8], enc: Encoding) -> Result<(), ()> {
    let end = check_data_set(bytes, 0, Some(bytes.len()), enc, 0)?;
    if end == bytes.len() { Ok(()) } else { Err(()) }
}

/// Checks the elements from `pos` up to `end` (defined length) or up to and including an
/// item delimitation item (`end` None). Returns the position after them.
fn check_data_set(
    bytes: &[u8],
    mut pos: usize,
    end: Option<usize>,
    enc: Encoding,
    depth: u8,
) -> Result<usize, ()> {
    loop {
        if Some(pos) == end {
            return Ok(pos);
        }
        let header = element::read_header_at(bytes, pos, enc).ok_or(())?;
        let (group, element) = (header.group, header.element);
        if (group, element) == (ITEM_GROUP, 0xE00D) {
            return if end.is_none() && header.len == 0 {
                Ok(pos + SHORT_HEADER)
            } else {
                Err(())
            };
        }
        if group == ITEM_GROUP {
            return Err(());
        }
        let vr = match header.vr {
            Some(vr_bytes) => std::str::from_utf8(&vr_bytes)
                .ok()
                .and_then(|s| s.parse::<VR>().ok())
                .ok_or(())?,
            None => implicit_vr(group, element),
        };
        let (start, len) = (pos + header.header_len, header.len);
        pos = if vr == VR::SQ {
            if depth >= MAX_DEPTH {
                return Err(());
            }
            check_sequence(bytes, start, len, end, enc, depth + 1)?
        } else {
            let len = usize::try_from(len).map_err(|_| ())?;
            if len == usize::try_from(u32::MAX).map_err(|_| ())? || len % unit(vr) != 0 {
                return Err(());
            }
            let next = start.checked_add(len).ok_or(())?;
            if next > end.unwrap_or(bytes.len()) {
                return Err(());
            }
            next
        };
    }
}

fn check_sequence(
    bytes: &[u8],
    mut pos: usize,
    len: u32,
    outer_end: Option<usize>,
    enc: Encoding,
    depth: u8,
) -> Result<usize, ()> {
    let end = if len == u32::MAX {
        None
    } else {
        let end = pos
            .checked_add(usize::try_from(len).map_err(|_| ())?)
            .ok_or(())?;
        if end > outer_end.unwrap_or(bytes.len()) {
            return Err(());
        }
        Some(end)
    };
    loop {
        if Some(pos) == end {
            return Ok(pos);
        }
        let header = element::read_header_at(bytes, pos, enc).ok_or(())?;
        let item_len = header.len;
        match (header.group, header.element) {
            (ITEM_GROUP, 0xE0DD) if end.is_none() && item_len == 0 => {
                return Ok(pos + SHORT_HEADER);
            }
            (ITEM_GROUP, 0xE000) => {
                let start = pos + SHORT_HEADER;
                pos = if item_len == u32::MAX {
                    check_data_set(bytes, start, None, enc, depth)?
                } else {
                    let item_end = start
                        .checked_add(usize::try_from(item_len).map_err(|_| ())?)
                        .ok_or(())?;
                    if item_end > end.unwrap_or(bytes.len()) {
                        return Err(());
                    }
                    check_data_set(bytes, start, Some(item_end), enc, depth)?
                };
            }
            _ => return Err(()),
        }
    }
}

/// The VR dicom-parser gives an element in implicit VR (see its implicit_le decoder).
fn implicit_vr(group: u16, element: u16) -> VR {
    use dicom_core::DataDictionary;
    use dicom_core::dictionary::DataDictionaryEntry;
    let tag = Tag(group, element);
    if tag == Tag(0x7FE0, 0x0010) || (group >> 8 == 0x60 && element == 0x3000) {
        return VR::OW;
    }
    dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .map(|entry| entry.vr().relaxed())
        .unwrap_or(VR::UN)
}

/// Size of one value of a binary VR (1 for byte and text VRs).
fn unit(vr: VR) -> usize {
    match vr {
        VR::US | VR::SS | VR::OW => 2,
        VR::UL | VR::SL | VR::FL | VR::AT | VR::OL | VR::OF => 4,
        VR::FD | VR::SV | VR::UV | VR::OD | VR::OV => 8,
        _ => 1,
    }
}

/// Takes a top-level (0008,0005) out of a framing-checked data set: its value, and the
/// data set without it. Only the elements before it (none in practice, (0008,0000) at most)
/// are looked at; when it is not among them nothing is taken.
fn take_charset(bytes: &[u8], enc: Encoding) -> (Option<Vec<u8>>, Cow<'_, [u8]>) {
    let mut pos = 0;
    while let Some((group, element, start, len)) = element_header(bytes, pos, enc) {
        let Some(end) = start.checked_add(len).filter(|end| *end <= bytes.len()) else {
            break;
        };
        match (group, element).cmp(&(0x0008, 0x0005)) {
            std::cmp::Ordering::Less => pos = end,
            std::cmp::Ordering::Equal => {
                let (Some(before), Some(value), Some(after)) =
                    (bytes.get(..pos), bytes.get(start..end), bytes.get(end..))
                else {
                    break;
                };
                let mut rest = Vec::with_capacity(bytes.len());
                rest.extend_from_slice(before);
                rest.extend_from_slice(after);
                return (Some(value.to_vec()), Cow::Owned(rest));
            }
            std::cmp::Ordering::Greater => break,
        }
    }
    (None, Cow::Borrowed(bytes))
}

/// (group, element, value offset, value length) of the element at `pos`; None at the end,
/// on undefined length, or when the bytes are short.
fn element_header(bytes: &[u8], pos: usize, enc: Encoding) -> Option<(u16, u16, usize, usize)> {
    let header = element::read_header_at(bytes, pos, enc)?;
    if header.len == UNDEFINED_LENGTH {
        return None;
    }
    Some((
        header.group,
        header.element,
        pos.checked_add(header.header_len)?,
        usize::try_from(header.len).ok()?,
    ))
}

/// The text of `tag` in `obj`: None when absent, the decoded value (trailing padding
/// removed) otherwise. dicom-object read it as ISO-8859-1, so each char is one byte.
fn text_value(
    obj: &InMemDicomObject,
    tag: Tag,
    charset: &SpecificCharset,
) -> Result<Option<String>, IdentifierError> {
    let Ok(Some(element)) = obj.element_opt(tag) else {
        return Ok(None);
    };
    let raw: Cow<'_, str> = match element.value() {
        DicomValue::Primitive(PrimitiveValue::Empty) => Cow::Borrowed(""),
        DicomValue::Primitive(p) => p.to_raw_str(),
        _ => return Err(IdentifierError::Mismatch("text key holds a sequence")),
    };
    let bytes: Vec<u8> = raw
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<_>>()
        .ok_or(IdentifierError::Charset(CharsetError::InvalidByte(0)))?;
    let decoded = match charset {
        SpecificCharset::Other(term) => SpecificCharacterSet::from_code(term)
            .ok_or(IdentifierError::Charset(CharsetError::Unsupported))?
            .decode(&bytes)
            .map_err(|_| IdentifierError::Charset(CharsetError::InvalidByte(0)))?,
        charset => charset::decode(&bytes, charset).map_err(IdentifierError::Charset)?,
    };
    Ok(Some(decoded.trim_end_matches([' ', '\0']).to_string()))
}

/// The first item of sequence `tag`: None when the key is absent or has no item.
fn first_item(
    obj: &InMemDicomObject,
    tag: Tag,
) -> Result<Option<&InMemDicomObject>, IdentifierError> {
    let Ok(Some(element)) = obj.element_opt(tag) else {
        return Ok(None);
    };
    match element.value() {
        DicomValue::Sequence(seq) => Ok(seq.items().first()),
        DicomValue::Primitive(PrimitiveValue::Empty) => Ok(None),
        _ => Err(IdentifierError::Mismatch("sequence key is not a sequence")),
    }
}

/// Why a response identifier could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("response identifier does not encode")]
pub struct ResponseError;

/// The Scheduled Procedure Step attributes known to the SCP, with their VRs.
const STEP_KEYS: [(Tag, VR); 6] = [
    (tags::MODALITY, VR::CS),
    (tags::SCHEDULED_STATION_AE_TITLE, VR::AE),
    (tags::SCHEDULED_PROCEDURE_STEP_START_DATE, VR::DA),
    (tags::SCHEDULED_PROCEDURE_STEP_START_TIME, VR::TM),
    (tags::SCHEDULED_PROCEDURE_STEP_DESCRIPTION, VR::LO),
    (tags::SCHEDULED_PROCEDURE_STEP_ID, VR::SH),
];

fn top_level_value(item: &WorklistItem, tag: Tag) -> Option<(&str, VR)> {
    Some(match tag {
        tags::PATIENT_NAME => (item.patient_name.as_str(), VR::PN),
        tags::PATIENT_ID => (item.patient_id.as_str(), VR::LO),
        tags::PATIENT_BIRTH_DATE => (item.birth_date.as_str(), VR::DA),
        tags::PATIENT_SEX => (item.sex.as_str(), VR::CS),
        tags::ACCESSION_NUMBER => (item.accession.as_str(), VR::SH),
        tags::REQUESTED_PROCEDURE_ID => (item.requested_procedure_id.as_str(), VR::SH),
        tags::REQUESTED_PROCEDURE_DESCRIPTION => {
            (item.requested_procedure_description.as_str(), VR::LO)
        }
        _ => return None,
    })
}

/// The multi-valued LO return keys: the exam's safety alerts.
fn top_level_values(item: &WorklistItem, tag: Tag) -> Option<&[String]> {
    Some(match tag {
        tags::MEDICAL_ALERTS => &item.medical_alerts,
        tags::ALLERGIES => &item.contrast_allergies,
        _ => return None,
    })
}

fn step_value(item: &WorklistItem, tag: Tag) -> Option<&str> {
    Some(match tag {
        tags::MODALITY => item.modality.as_str(),
        tags::SCHEDULED_STATION_AE_TITLE => item.station_ae.as_str(),
        tags::SCHEDULED_PROCEDURE_STEP_START_DATE => item.start_date.as_str(),
        tags::SCHEDULED_PROCEDURE_STEP_START_TIME => item.start_time.as_str(),
        tags::SCHEDULED_PROCEDURE_STEP_DESCRIPTION => item.step_description.as_str(),
        tags::SCHEDULED_PROCEDURE_STEP_ID => item.step_id.as_str(),
        _ => return None,
    })
}

/// Text values are written as bytes so that the parser's codec never touches them.
struct Writer<'a> {
    charset: &'a SpecificCharset,
    /// Some value was not ASCII (UTF-8 output needs `ISO_IR 192` then).
    non_ascii: bool,
}

impl Writer<'_> {
    fn value(&mut self, text: &str, vr: VR) -> Result<PrimitiveValue, CharsetError> {
        let mut bytes = match vr {
            // Text in the request's character set.
            VR::PN | VR::LO | VR::SH | VR::LT | VR::ST | VR::UT | VR::UC => {
                if !text.is_ascii() {
                    self.non_ascii = true;
                }
                charset::encode(text, self.charset)?
            }
            // Default repertoire only: a value outside it is not returned.
            _ if text.is_ascii() => text.as_bytes().to_vec(),
            _ => Vec::new(),
        };
        if bytes.len() % 2 == 1 {
            bytes.push(if vr == VR::UI { 0 } else { b' ' });
        }
        Ok(PrimitiveValue::U8(bytes.into()))
    }

    /// A multi-valued LO: each value encoded on its own (so an ISO 2022 value returns to
    /// the initial code element before the separator) and joined by `\`; a backslash inside
    /// a value would split it, so it becomes `/`.
    fn values(&mut self, values: &[String]) -> Result<PrimitiveValue, CharsetError> {
        let mut bytes = Vec::new();
        for (i, text) in values.iter().enumerate() {
            if i > 0 {
                bytes.push(b'\\');
            }
            let text = text.replace('\\', "/");
            if !text.is_ascii() {
                self.non_ascii = true;
            }
            bytes.extend(charset::encode(&text, self.charset)?);
        }
        if bytes.len() % 2 == 1 {
            bytes.push(b' ');
        }
        Ok(PrimitiveValue::U8(bytes.into()))
    }

    fn step_item(
        &mut self,
        item: &WorklistItem,
        request: Option<&InMemDicomObject>,
    ) -> Result<InMemDicomObject, CharsetError> {
        let mut out = InMemDicomObject::new_empty();
        match request {
            Some(keys) => {
                for key in keys.iter() {
                    let tag = key.tag();
                    let element = match (step_value(item, tag), key.vr()) {
                        (Some(text), vr) => {
                            let vr = STEP_KEYS
                                .iter()
                                .find(|(t, _)| *t == tag)
                                .map_or(vr, |(_, vr)| *vr);
                            DataElement::new(tag, vr, self.value(text, vr)?)
                        }
                        (None, VR::SQ) => empty_sequence(tag),
                        (None, vr) => DataElement::new(tag, vr, PrimitiveValue::Empty),
                    };
                    out.put(element);
                }
            }
            None => {
                for (tag, vr) in STEP_KEYS {
                    let text = step_value(item, tag).unwrap_or("");
                    out.put(DataElement::new(tag, vr, self.value(text, vr)?));
                }
            }
        }
        Ok(out)
    }
}

fn empty_sequence(tag: Tag) -> dicom_object::mem::InMemElement {
    DataElement::new(
        tag,
        VR::SQ,
        DicomValue::from(DataSetSequence::<InMemDicomObject>::new(
            Vec::new(),
            Length::UNDEFINED,
        )),
    )
}

impl FindQuery {
    /// The matching keys.
    pub fn query(&self) -> &WorklistQuery {
        &self.query
    }

    /// The request's character set.
    pub fn charset(&self) -> &SpecificCharset {
        &self.charset
    }

    /// The identifier of the pending C-FIND-RSP for `item`, in the request's encoding.
    pub fn response(&self, item: &WorklistItem) -> Result<Vec<u8>, ResponseError> {
        if self.charset.has_kanji()
            && let Ok((mut obj, _)) = self.response_object(item, &self.charset)
        {
            let terms = self.charset_terms.join("\\");
            obj.put(DataElement::new(
                tags::SPECIFIC_CHARACTER_SET,
                VR::CS,
                padded(terms.into_bytes()),
            ));
            return self.write(&obj);
        }
        let (mut obj, non_ascii) = self
            .response_object(item, &SpecificCharset::Utf8)
            .map_err(|_| ResponseError)?;
        if non_ascii {
            obj.put(DataElement::new(
                tags::SPECIFIC_CHARACTER_SET,
                VR::CS,
                padded(b"ISO_IR 192".to_vec()),
            ));
        } else if self.asked_charset {
            obj.put(DataElement::new(
                tags::SPECIFIC_CHARACTER_SET,
                VR::CS,
                PrimitiveValue::Empty,
            ));
        }
        self.write(&obj)
    }

    fn write(&self, obj: &InMemDicomObject) -> Result<Vec<u8>, ResponseError> {
        let mut out = Vec::with_capacity(512);
        obj.write_dataset_with_ts(&mut out, &ts_of(self.encoding))
            .map_err(|_| ResponseError)?;
        Ok(out)
    }

    /// The return keys for `item` written in `charset`, and whether any value is not ASCII.
    fn response_object(
        &self,
        item: &WorklistItem,
        charset: &SpecificCharset,
    ) -> Result<(InMemDicomObject, bool), CharsetError> {
        let mut writer = Writer {
            charset,
            non_ascii: false,
        };
        let mut out = InMemDicomObject::new_empty();
        for key in self.keys.iter() {
            let tag = key.tag();
            if tag == tags::SPECIFIC_CHARACTER_SET || tag.group() <= 0x0002 {
                continue;
            }
            let element = if tag == tags::SCHEDULED_PROCEDURE_STEP_SEQUENCE {
                let request = match key.value() {
                    DicomValue::Sequence(seq) => seq.items().first(),
                    _ => None,
                };
                let step = writer.step_item(item, request)?;
                DataElement::new(
                    tag,
                    VR::SQ,
                    DicomValue::from(DataSetSequence::new(vec![step], Length::UNDEFINED)),
                )
            } else if let Some((text, vr)) = top_level_value(item, tag) {
                DataElement::new(tag, vr, writer.value(text, vr)?)
            } else if let Some(values) = top_level_values(item, tag) {
                DataElement::new(tag, VR::LO, writer.values(values)?)
            } else if key.vr() == VR::SQ {
                empty_sequence(tag)
            } else {
                DataElement::new(tag, key.vr(), PrimitiveValue::Empty)
            };
            out.put(element);
        }
        Ok((out, writer.non_ascii))
    }
}

fn padded(mut bytes: Vec<u8>) -> PrimitiveValue {
    if bytes.len() % 2 == 1 {
        bytes.push(b' ');
    }
    PrimitiveValue::U8(bytes.into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const EXPLICIT: &str = "1.2.840.10008.1.2.1";
    const IMPLICIT: &str = "1.2.840.10008.1.2";

    fn raw(bytes: &[u8]) -> PrimitiveValue {
        padded(bytes.to_vec())
    }

    /// An identifier with the usual keys; `name` as raw bytes, `charset` as raw bytes.
    fn identifier(charset: Option<&[u8]>, name: &[u8], date: &str, ts: &str) -> Vec<u8> {
        let mut obj = InMemDicomObject::new_empty();
        if let Some(cs) = charset {
            obj.put(DataElement::new(
                tags::SPECIFIC_CHARACTER_SET,
                VR::CS,
                raw(cs),
            ));
        }
        obj.put(DataElement::new(tags::PATIENT_NAME, VR::PN, raw(name)));
        obj.put(DataElement::new(
            tags::PATIENT_ID,
            VR::LO,
            PrimitiveValue::Empty,
        ));
        obj.put(DataElement::new(
            tags::ACCESSION_NUMBER,
            VR::SH,
            PrimitiveValue::Empty,
        ));
        obj.put(DataElement::new(
            tags::PATIENT_BIRTH_DATE,
            VR::DA,
            PrimitiveValue::Empty,
        ));
        obj.put(DataElement::new(
            tags::PATIENT_WEIGHT,
            VR::DS,
            PrimitiveValue::Empty,
        ));
        let mut step = InMemDicomObject::new_empty();
        step.put(DataElement::new(tags::MODALITY, VR::CS, raw(b"CT")));
        step.put(DataElement::new(
            tags::SCHEDULED_PROCEDURE_STEP_START_DATE,
            VR::DA,
            raw(date.as_bytes()),
        ));
        step.put(DataElement::new(
            tags::SCHEDULED_PROCEDURE_STEP_ID,
            VR::SH,
            PrimitiveValue::Empty,
        ));
        obj.put(DataElement::new(
            tags::SCHEDULED_PROCEDURE_STEP_SEQUENCE,
            VR::SQ,
            DicomValue::from(DataSetSequence::new(vec![step], Length::UNDEFINED)),
        ));
        let mut out = Vec::new();
        let enc = Encoding::of_transfer_syntax(ts);
        obj.write_dataset_with_ts(&mut out, &ts_of(enc)).unwrap();
        out
    }

    fn item() -> WorklistItem {
        WorklistItem {
            patient_name: "YAMADA^TARO=山田^太郎=やまだ^たろう".into(),
            patient_id: "P1".into(),
            birth_date: "19700101".into(),
            sex: "M".into(),
            accession: "RB1".into(),
            requested_procedure_id: "RB1".into(),
            requested_procedure_description: "CT chest".into(),
            modality: "CT".into(),
            station_ae: "CT01".into(),
            start_date: "20270112".into(),
            start_time: "093000".into(),
            step_id: "apt-1".into(),
            step_description: "CT chest".into(),
            medical_alerts: Vec::new(),
            contrast_allergies: Vec::new(),
        }
    }

    fn read(bytes: &[u8], ts: &str) -> InMemDicomObject {
        InMemDicomObject::read_dataset_with_ts(bytes, &ts_of(Encoding::of_transfer_syntax(ts)))
            .unwrap()
    }

    fn raw_bytes(obj: &InMemDicomObject, tag: Tag) -> Vec<u8> {
        let s = obj
            .element(tag)
            .unwrap()
            .value()
            .to_raw_str()
            .unwrap()
            .into_owned();
        s.chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap())
            .collect()
    }

    #[test]
    fn keys_are_read_in_both_encodings() {
        for ts in [EXPLICIT, IMPLICIT] {
            let q =
                parse_identifier(&identifier(None, b"YAMA*", "20270112-20270113", ts), ts).unwrap();
            assert_eq!(q.query().patient_name.as_deref(), Some("YAMA*"));
            assert_eq!(q.query().patient_id.as_deref(), Some(""));
            assert_eq!(q.query().modality.as_deref(), Some("CT"));
            assert_eq!(q.query().start_date.as_deref(), Some("20270112-20270113"));
            assert_eq!(q.query().station_ae, None);
            assert!(q.query().matches(&item()));
        }
    }

    #[test]
    fn kanji_query_in_iso_2022_ir_87_is_decoded_and_answered_in_it() {
        let cs: &[u8] = b"\\ISO 2022 IR 87";
        let q = parse_identifier(
            &identifier(Some(cs), b"=\x1b$B;3ED\x1b(B*", "", EXPLICIT),
            EXPLICIT,
        )
        .unwrap();
        assert_eq!(q.query().patient_name.as_deref(), Some("=山田*"));
        assert!(q.query().matches(&item()));
        let rsp = read(&q.response(&item()).unwrap(), EXPLICIT);
        assert_eq!(
            raw_bytes(&rsp, tags::SPECIFIC_CHARACTER_SET),
            b"\\ISO 2022 IR 87 "
        );
        assert_eq!(
            raw_bytes(&rsp, tags::PATIENT_NAME),
            b"YAMADA^TARO=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B ",
            "Annex H bytes, padded to even length with a space"
        );
    }

    #[test]
    fn utf8_and_default_requests_get_utf8_with_iso_ir_192() {
        for cs in [None, Some(&b"ISO_IR 192"[..])] {
            let q = parse_identifier(&identifier(cs, b"", "", IMPLICIT), IMPLICIT).unwrap();
            let bytes = q.response(&item()).unwrap();
            let rsp = read(&bytes, IMPLICIT);
            assert_eq!(
                rsp.element(tags::SPECIFIC_CHARACTER_SET)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "ISO_IR 192"
            );
            assert_eq!(
                rsp.element(tags::PATIENT_NAME).unwrap().to_str().unwrap(),
                "YAMADA^TARO=山田^太郎=やまだ^たろう"
            );
        }
        // ASCII-only: no character set.
        let mut ascii = item();
        ascii.patient_name = "SMITH^JOHN".into();
        let q = parse_identifier(&identifier(None, b"", "", IMPLICIT), IMPLICIT).unwrap();
        let rsp = read(&q.response(&ascii).unwrap(), IMPLICIT);
        assert!(
            rsp.element_opt(tags::SPECIFIC_CHARACTER_SET)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn return_keys_are_exactly_the_requested_ones() {
        let q = parse_identifier(&identifier(None, b"", "", EXPLICIT), EXPLICIT).unwrap();
        let rsp = read(&q.response(&item()).unwrap(), EXPLICIT);
        assert_eq!(
            rsp.element(tags::PATIENT_ID).unwrap().to_str().unwrap(),
            "P1"
        );
        assert_eq!(
            rsp.element(tags::ACCESSION_NUMBER)
                .unwrap()
                .to_str()
                .unwrap(),
            "RB1"
        );
        assert_eq!(
            rsp.element(tags::PATIENT_BIRTH_DATE)
                .unwrap()
                .to_str()
                .unwrap(),
            "19700101"
        );
        // Unknown to the SCP: present and empty.
        assert!(
            rsp.element(tags::PATIENT_WEIGHT)
                .unwrap()
                .to_str()
                .unwrap()
                .is_empty()
        );
        // Not asked for: absent.
        assert!(rsp.element_opt(tags::PATIENT_SEX).unwrap().is_none());
        let DicomValue::Sequence(seq) = rsp
            .element(tags::SCHEDULED_PROCEDURE_STEP_SEQUENCE)
            .unwrap()
            .value()
        else {
            panic!("not a sequence")
        };
        let step = &seq.items()[0];
        assert_eq!(
            step.element(tags::MODALITY).unwrap().to_str().unwrap(),
            "CT"
        );
        assert_eq!(
            step.element(tags::SCHEDULED_PROCEDURE_STEP_ID)
                .unwrap()
                .to_str()
                .unwrap(),
            "apt-1"
        );
        assert!(
            step.element_opt(tags::SCHEDULED_STATION_AE_TITLE)
                .unwrap()
                .is_none()
        );
    }

    /// `identifier` with Medical Alerts and Contrast Allergies asked for (zero length).
    fn with_alert_keys(bytes: &[u8], ts: &str) -> Vec<u8> {
        let mut obj = read(bytes, ts);
        for tag in [tags::MEDICAL_ALERTS, tags::ALLERGIES] {
            obj.put(DataElement::new(tag, VR::LO, PrimitiveValue::Empty));
        }
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &ts_of(Encoding::of_transfer_syntax(ts)))
            .unwrap();
        out
    }

    fn alerted() -> WorklistItem {
        WorklistItem {
            medical_alerts: vec![
                "Contrast reaction: iohexol (SV)".into(),
                "Contrast reaction: イオパミドール".into(),
            ],
            contrast_allergies: vec!["iohexol".into(), "イオパミドール".into()],
            ..item()
        }
    }

    #[test]
    fn alerts_are_returned_when_asked_for_one_value_each() {
        for ts in [EXPLICIT, IMPLICIT] {
            let q =
                parse_identifier(&with_alert_keys(&identifier(None, b"", "", ts), ts), ts).unwrap();
            // Universal matching only: an item without alerts still matches.
            assert!(q.query().matches(&item()));
            let rsp = read(&q.response(&alerted()).unwrap(), ts);
            assert_eq!(
                rsp.element(tags::SPECIFIC_CHARACTER_SET)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "ISO_IR 192"
            );
            let values = |tag| {
                rsp.element(tag)
                    .unwrap()
                    .value()
                    .to_multi_str()
                    .unwrap()
                    .iter()
                    .map(|v| v.trim_end().to_owned())
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                values(tags::MEDICAL_ALERTS),
                [
                    "Contrast reaction: iohexol (SV)",
                    "Contrast reaction: イオパミドール"
                ]
            );
            assert_eq!(values(tags::ALLERGIES), ["iohexol", "イオパミドール"]);
            assert_eq!(rsp.element(tags::ALLERGIES).unwrap().vr(), VR::LO);
            // An exam without alerts: present and empty.
            let rsp = read(&q.response(&item()).unwrap(), ts);
            assert!(raw_bytes(&rsp, tags::MEDICAL_ALERTS).is_empty());
            assert!(raw_bytes(&rsp, tags::ALLERGIES).is_empty());
        }
        // Not asked for: absent.
        let q = parse_identifier(&identifier(None, b"", "", EXPLICIT), EXPLICIT).unwrap();
        let rsp = read(&q.response(&alerted()).unwrap(), EXPLICIT);
        assert!(rsp.element_opt(tags::MEDICAL_ALERTS).unwrap().is_none());
        assert!(rsp.element_opt(tags::ALLERGIES).unwrap().is_none());
    }

    #[test]
    fn alerts_are_written_in_iso_2022_ir_87_value_by_value() {
        let cs: &[u8] = b"\\ISO 2022 IR 87";
        let q = parse_identifier(
            &with_alert_keys(&identifier(Some(cs), b"", "", EXPLICIT), EXPLICIT),
            EXPLICIT,
        )
        .unwrap();
        let mut it = alerted();
        it.contrast_allergies = vec!["造影剤".into(), "iohexol".into()];
        let rsp = read(&q.response(&it).unwrap(), EXPLICIT);
        assert_eq!(
            raw_bytes(&rsp, tags::SPECIFIC_CHARACTER_SET),
            b"\\ISO 2022 IR 87 "
        );
        // Each value back in ASCII before the separator (PS3.5 6.1.2.5.3).
        assert_eq!(
            raw_bytes(&rsp, tags::ALLERGIES),
            b"\x1b$BB$1F:^\x1b(B\\iohexol"
        );
        let alerts = raw_bytes(&rsp, tags::MEDICAL_ALERTS);
        assert!(alerts.starts_with(b"Contrast reaction: iohexol (SV)\\Contrast reaction: \x1b$B"));
        // A backslash inside a value never splits it.
        it.contrast_allergies = vec!["a\\b".into()];
        let rsp = read(&q.response(&it).unwrap(), EXPLICIT);
        assert_eq!(raw_bytes(&rsp, tags::ALLERGIES), b"a/b ");
    }

    #[test]
    fn kanji_outside_jis_x_0208_falls_back_to_utf8() {
        let mut odd = item();
        odd.patient_name = "TEST=𠮷田".into();
        let q = parse_identifier(
            &identifier(Some(b"\\ISO 2022 IR 87"), b"", "", EXPLICIT),
            EXPLICIT,
        )
        .unwrap();
        let rsp = read(&q.response(&odd).unwrap(), EXPLICIT);
        assert_eq!(
            rsp.element(tags::SPECIFIC_CHARACTER_SET)
                .unwrap()
                .to_str()
                .unwrap(),
            "ISO_IR 192"
        );
        assert_eq!(
            rsp.element(tags::PATIENT_NAME).unwrap().to_str().unwrap(),
            "TEST=𠮷田"
        );
    }

    #[test]
    fn bad_identifiers_map_to_statuses() {
        let too_big = vec![0u8; MAX_IDENTIFIER_LEN + 2];
        assert_eq!(
            parse_identifier(&too_big, EXPLICIT).unwrap_err().status(),
            0xC000
        );
        // An element claiming 3 GB.
        let claim = [0x10, 0x00, 0x10, 0x00, b'P', b'N', 0xFF, 0xFF];
        assert_eq!(
            parse_identifier(&claim, EXPLICIT).unwrap_err(),
            IdentifierError::Malformed
        );
        // Invalid escape sequence in the name.
        let e = parse_identifier(
            &identifier(Some(b"\\ISO 2022 IR 87"), b"\x1b$(D!!", "", EXPLICIT),
            EXPLICIT,
        )
        .unwrap_err();
        assert_eq!(e.status(), 0xA900);
        // Unsupported character set with code extensions.
        let e = parse_identifier(
            &identifier(Some(b"\\ISO 2022 IR 149"), b"X", "", EXPLICIT),
            EXPLICIT,
        )
        .unwrap_err();
        assert_eq!(e.status(), 0xC000);
        assert!(parse_identifier(&[0xFF; 40], IMPLICIT).is_err());
        assert!(parse_identifier(b"", IMPLICIT).is_ok());
        assert_eq!(
            parse_identifier(b"", "1.2.840.10008.1.2.1.99").unwrap_err(),
            IdentifierError::TransferSyntax
        );
    }

    #[test]
    fn utf8_and_latin1_queries_are_decoded_from_their_bytes() {
        // UTF-8 continuation bytes include 0x80..0x9F: they must survive dicom-object.
        let q = parse_identifier(
            &identifier(Some(b"ISO_IR 192"), "=山田*".as_bytes(), "", IMPLICIT),
            IMPLICIT,
        )
        .unwrap();
        assert_eq!(q.query().patient_name.as_deref(), Some("=山田*"));
        assert!(q.query().matches(&item()));
        let q = parse_identifier(
            &identifier(Some(b"ISO_IR 100"), b"M\xdcLLER*", "", EXPLICIT),
            EXPLICIT,
        )
        .unwrap();
        assert_eq!(q.query().patient_name.as_deref(), Some("MÜLLER*"));
        // Bytes outside the default repertoire without a character set.
        assert_eq!(
            parse_identifier(&identifier(None, b"M\xdcLLER", "", EXPLICIT), EXPLICIT)
                .unwrap_err()
                .status(),
            0xA900
        );
    }

    #[test]
    fn charset_element_is_found_after_a_group_length() {
        let mut bytes = vec![0x08, 0x00, 0x00, 0x00, b'U', b'L', 4, 0, 0, 0, 0, 0];
        bytes.extend(identifier(
            Some(b"\\ISO 2022 IR 87"),
            b"=\x1b$B;3ED\x1b(B",
            "",
            EXPLICIT,
        ));
        let q = parse_identifier(&bytes, EXPLICIT).unwrap();
        assert_eq!(q.query().patient_name.as_deref(), Some("=山田"));
        assert!(q.charset().has_kanji());
    }

    #[test]
    fn numeric_value_of_a_length_its_vr_cannot_hold_is_malformed() {
        // Found by fuzzing: a group length (UL) of length 1 put dicom-parser out of step
        // and its next read claimed 3.7 GB.
        let mut implicit = vec![0x80, 0x00, 0x00, 0x00, 1, 0, 0, 0, 0];
        implicit.extend([0u8; 24]);
        assert_eq!(
            parse_identifier(&implicit, IMPLICIT).unwrap_err(),
            IdentifierError::Malformed
        );
        let explicit = [0x08, 0x00, 0x00, 0x00, b'U', b'L', 2, 0, 0, 0];
        assert_eq!(
            parse_identifier(&explicit, EXPLICIT).unwrap_err(),
            IdentifierError::Malformed
        );
        // Unknown VR bytes.
        let unknown = [0x10, 0x00, 0x10, 0x00, b'Z', b'Z', 0, 0];
        assert!(parse_identifier(&unknown, EXPLICIT).is_err());
        // Nesting deeper than the limit.
        let mut deep = InMemDicomObject::new_empty();
        for _ in 0..12 {
            let mut outer = InMemDicomObject::new_empty();
            outer.put(DataElement::new(
                tags::SCHEDULED_PROCEDURE_STEP_SEQUENCE,
                VR::SQ,
                DicomValue::from(DataSetSequence::new(vec![deep], Length::UNDEFINED)),
            ));
            deep = outer;
        }
        let mut bytes = Vec::new();
        deep.write_dataset_with_ts(&mut bytes, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        assert!(parse_identifier(&bytes, EXPLICIT).is_err());
    }

    #[test]
    fn katakana_query_with_iso_2022_ir_13_first() {
        let q = parse_identifier(
            &identifier(
                Some(b"ISO 2022 IR 13\\ISO 2022 IR 87"),
                b"\xd4\xcf\xc0\xde*=\x1b$B;3ED\x1b(J",
                "",
                EXPLICIT,
            ),
            EXPLICIT,
        )
        .unwrap();
        assert_eq!(q.query().patient_name.as_deref(), Some("ﾔﾏﾀﾞ*=山田"));
    }
}
