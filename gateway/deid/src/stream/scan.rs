//! Reading before rewriting: the file meta group (buffered whole, bounded) and the
//! subject's identifying values of the top-level data set ([`Subject::scan`]).

use gateway_dicom::charset::{self, SpecificCharset};
use gateway_dicom::element::{self, Encoding, ITEM_GROUP, UNDEFINED_LENGTH};

use super::{DeidError, MAX_DEPTH, Subject};

/// Bytes of the preamble and `DICM`.
pub(super) const PREAMBLE: usize = 132;
/// Largest file meta group buffered.
pub(super) const MAX_META: usize = 64 * 1024;
/// Largest inflated prefix [`Subject::scan`] reads of a deflated data set.
const SCAN_INFLATED: usize = 4 << 20;

/// One element of the file meta group: its tag, and where its header and value are.
#[derive(Debug, Clone)]
pub(super) struct MetaElement {
    pub element: u16,
    pub start: usize,
    pub value: usize,
    pub end: usize,
}

/// The file meta group of a Part 10 object.
#[derive(Debug, Clone)]
pub(super) struct Meta {
    /// The first byte of the data set.
    pub end: usize,
    pub elements: Vec<MetaElement>,
    pub transfer_syntax: String,
    pub sop_class: String,
}

pub(super) enum MetaProgress {
    NeedMore,
    Done(Meta),
}

fn malformed(offset: usize, problem: &'static str) -> DeidError {
    DeidError::Malformed {
        offset: offset as u64,
        problem,
    }
}

pub(super) fn trimmed(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_matches(['\0', ' '])
        .to_string()
}

/// The file meta group at the start of `buf`, once `buf` reaches past it (the first
/// bytes of an element of another group) or, with `at_end`, the whole input is `buf`.
pub(super) fn parse_meta(buf: &[u8], at_end: bool) -> Result<MetaProgress, DeidError> {
    let need_more = |offset: usize, problem: &'static str| {
        if at_end {
            Err(malformed(offset, problem))
        } else {
            Ok(MetaProgress::NeedMore)
        }
    };
    let Some(magic) = buf.get(128..PREAMBLE) else {
        return need_more(buf.len(), "object ends inside the preamble");
    };
    if magic != b"DICM" {
        return Err(malformed(128, "no DICM prefix after the preamble"));
    }
    let mut pos = PREAMBLE;
    let mut elements = Vec::new();
    loop {
        if pos > PREAMBLE + MAX_META {
            return Err(DeidError::Unsupported {
                what: "file meta group longer than 64 KiB",
            });
        }
        if pos == buf.len() && at_end {
            break;
        }
        let Some(group) = buf.get(pos..pos + 2) else {
            return need_more(pos, "object ends inside the file meta group");
        };
        if group != [2, 0] {
            break;
        }
        let Some(h) = element::read_header_at(buf, pos, Encoding::EXPLICIT_LE) else {
            return need_more(pos, "object ends inside the file meta group");
        };
        if h.len == UNDEFINED_LENGTH {
            return Err(malformed(pos, "file meta element of undefined length"));
        }
        let value = pos + h.header_len;
        let end = value + h.len as usize;
        if end > PREAMBLE + MAX_META {
            return Err(DeidError::Unsupported {
                what: "file meta group longer than 64 KiB",
            });
        }
        if end > buf.len() {
            return need_more(pos, "object ends inside the file meta group");
        }
        elements.push(MetaElement {
            element: h.element,
            start: pos,
            value,
            end,
        });
        pos = end;
    }
    let text = |el: u16| {
        elements
            .iter()
            .find(|e| e.element == el)
            .and_then(|e| buf.get(e.value..e.end))
            .map(trimmed)
    };
    let Some(transfer_syntax) = text(0x0010).filter(|t| !t.is_empty()) else {
        return Err(malformed(
            PREAMBLE,
            "file meta group has no Transfer Syntax UID",
        ));
    };
    let sop_class = text(0x0002).unwrap_or_default();
    Ok(MetaProgress::Done(Meta {
        end: pos,
        elements,
        transfer_syntax,
        sop_class,
    }))
}

/// The character set of a (0008,0005) value; `None` when this gateway cannot decode it
/// (values are then read byte for byte as Latin-1).
pub(super) fn charset_of(value: &[u8]) -> Option<SpecificCharset> {
    let text = String::from_utf8_lossy(value);
    let terms: Vec<&str> = text.split('\\').collect();
    SpecificCharset::from_terms(&terms).ok()
}

/// Text of a value, decoded in the data set's character set, lower-cased.
pub(super) fn decode_lower(value: &[u8], charset: Option<&SpecificCharset>) -> String {
    let decoded = if value.is_ascii() {
        None
    } else {
        charset.and_then(|c| charset::decode(value, c).ok())
    };
    match decoded {
        Some(s) => s.to_lowercase(),
        None => value
            .iter()
            .map(|b| char::from(*b))
            .collect::<String>()
            .to_lowercase(),
    }
}

/// Tags whose values identify the subject; `true`: a person name (split into components).
const IDENTIFYING: [(u32, bool); 15] = [
    (0x0008_0050, false), // Accession Number
    (0x0008_0080, false), // Institution Name
    (0x0008_0081, false), // Institution Address
    (0x0008_0090, true),  // Referring Physician's Name
    (0x0008_1048, true),  // Physician(s) of Record
    (0x0008_1050, true),  // Performing Physician's Name
    (0x0008_1060, true),  // Name of Physician(s) Reading Study
    (0x0008_1070, true),  // Operators' Name
    (0x0010_0010, true),  // Patient's Name
    (0x0010_0020, false), // Patient ID
    (0x0010_0030, false), // Patient's Birth Date
    (0x0010_1000, false), // Other Patient IDs
    (0x0010_1001, true),  // Other Patient Names
    (0x0010_1060, true),  // Patient's Mother's Birth Name
    (0x0010_2297, true),  // Responsible Person
];

const STUDY_UID: u32 = 0x0020_000D;

/// Past an undefined-length element or item whose value starts at `pos`: the position
/// after its closing delimiter.
fn skip_undefined(bytes: &[u8], mut pos: usize, enc: Encoding) -> Result<usize, DeidError> {
    let mut depth = 1usize;
    loop {
        let Some(h) = element::read_header_at(bytes, pos, enc) else {
            return Err(malformed(pos, "data set ends inside a sequence"));
        };
        let undefined = h.len == UNDEFINED_LENGTH;
        let at = pos;
        pos += h.header_len;
        if h.group == ITEM_GROUP && h.element != 0xE000 {
            depth -= 1;
            if depth == 0 {
                return Ok(pos);
            }
        } else if undefined {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(malformed(at, "sequences nested too deep"));
            }
        } else {
            pos = pos
                .checked_add(h.len as usize)
                .filter(|end| *end <= bytes.len())
                .ok_or(malformed(at, "data set ends inside an element"))?;
        }
    }
}

impl Subject {
    /// Reads the subject from a Part 10 object or a prefix of it (the top-level data set
    /// up to (0020,000D) at least, or the whole object).
    pub fn scan(part10: &[u8]) -> Result<Self, DeidError> {
        let MetaProgress::Done(meta) = parse_meta(part10, true)? else {
            return Err(malformed(
                part10.len(),
                "object ends inside the file meta group",
            ));
        };
        let enc = Encoding::of_transfer_syntax(&meta.transfer_syntax);
        let data = part10.get(meta.end..).unwrap_or_default();
        let inflated;
        let (data, complete) = if enc.deflated {
            let (bytes, complete) = inflate_prefix(data, meta.end)?;
            inflated = bytes;
            (inflated.as_slice(), complete)
        } else {
            (data, true)
        };
        let mut values: Vec<(u32, &[u8])> = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let Some(h) = element::read_header_at(data, pos, enc) else {
                if complete {
                    return Err(malformed(pos, "data set ends inside an element header"));
                }
                break;
            };
            let tag = (u32::from(h.group) << 16) | u32::from(h.element);
            if tag > STUDY_UID || h.group == ITEM_GROUP {
                break;
            }
            let value = pos + h.header_len;
            if h.len == UNDEFINED_LENGTH {
                match skip_undefined(data, value, enc) {
                    Ok(next) => pos = next,
                    Err(_) if !complete => break,
                    Err(e) => return Err(e),
                }
                continue;
            }
            let end = value.saturating_add(h.len as usize);
            let Some(bytes) = data.get(value..end) else {
                if complete {
                    return Err(malformed(pos, "data set ends inside an element"));
                }
                break;
            };
            if tag == 0x0008_0005
                || tag == STUDY_UID
                || tag == 0x0010_0021
                || IDENTIFYING.iter().any(|(t, _)| *t == tag)
            {
                values.push((tag, bytes));
            }
            pos = end;
        }
        let get = |tag: u32| values.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v);
        let charset = get(0x0008_0005).map_or(Some(SpecificCharset::Default), charset_of);
        let text = |tag: u32| {
            get(tag)
                .map(|v| {
                    let lossy = if v.is_ascii() {
                        None
                    } else {
                        charset.as_ref().and_then(|c| charset::decode(v, c).ok())
                    };
                    lossy.unwrap_or_else(|| v.iter().map(|b| char::from(*b)).collect())
                })
                .map(|s| s.trim_matches(['\0', ' ']).to_string())
                .unwrap_or_default()
        };
        let mut identifying: Vec<String> = Vec::new();
        for (tag, person) in IDENTIFYING {
            let Some(v) = get(tag) else { continue };
            let lower = decode_lower(v, charset.as_ref());
            let parts: Vec<&str> = if person {
                lower.split(['\\', '^', '=']).collect()
            } else {
                lower.split('\\').collect()
            };
            for p in parts {
                let p = p.trim_matches(['\0', ' ']);
                if p.chars().count() >= 2 && !identifying.iter().any(|i| i == p) {
                    identifying.push(p.to_string());
                }
            }
        }
        Ok(Subject {
            patient_id: text(0x0010_0020),
            issuer: text(0x0010_0021),
            identifying,
            study_uid: get(STUDY_UID).map(trimmed).unwrap_or_default(),
        })
    }
}

/// The start of an inflated data set (at most [`SCAN_INFLATED`] bytes) and whether it is
/// the whole data set.
fn inflate_prefix(data: &[u8], at: usize) -> Result<(Vec<u8>, bool), DeidError> {
    let mut z = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut input = data;
    loop {
        out.reserve(64 * 1024);
        let (before, grown) = (z.total_in(), out.len());
        let status = z
            .decompress_vec(input, &mut out, flate2::FlushDecompress::None)
            .map_err(|_| malformed(at, "deflated data set does not inflate"))?;
        let used = (z.total_in() - before) as usize;
        input = input.get(used..).unwrap_or_default();
        if status == flate2::Status::StreamEnd {
            return Ok((out, true));
        }
        if out.len() >= SCAN_INFLATED || (used == 0 && out.len() == grown) {
            return Ok((out, false));
        }
    }
}
