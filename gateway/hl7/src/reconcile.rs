//! Patient ID reconciliation of returned reports (IHE IRWF): the ORU^R01 a core sends back
//! to the referring clinic gets the clinic's Patient ID in PID-3, the core's IDs kept after
//! it. Pure: bytes or text in, bytes or text out.
//!
//! The rewrite ([`rewrite_pid`], [`rewrite_pid_text`]):
//! - PID-3 becomes `{clinic id}^^^{clinic issuer}` as its first repetition, followed by the
//!   original repetitions byte for byte. An original repetition without an assigning
//!   authority (PID-3.4 empty) gets `core_issuer` there, so the core's ID stays qualified
//!   (an empty `core_issuer` leaves it as it was). Empty original repetitions, and one that
//!   already is the clinic's ID and issuer, are dropped.
//! - Every other byte of the message is unchanged: the frame is split at its delimiters in
//!   the raw bytes (outside ISO-2022-JP double-byte and katakana runs and Shift_JIS
//!   double-byte characters, where a `|` or `^` byte is part of a character), the new values
//!   are escaped with [`crate::parse::escape`] and encoded in the frame's character set, and
//!   the result is decoded again and checked against the same rewrite done on the decoded
//!   text ([`ReconcileError::NotRepresentable`] when they differ, e.g. a clinic ID with
//!   kanji in an ASCII frame).
//! - A message whose first PID-3 repetition already is the clinic's ID and issuer is returned
//!   unchanged.
//! - No PID segment, or more than one (several patients in one ORU), is an error.
//!
//! [`result_keys`] reads what matches a report to its booking: accession numbers (OBR-18,
//! IPC-1, OBR-3), placer order numbers (ORC-2, OBR-2: the appointment id the core's OMG^O19
//! carried) and whether a result is final (OBR-25 = `F`).
//!
//! Errors and `Debug` carry no message content.

use std::fmt;

use crate::charset::{self, Charset, CharsetOverride, DecodeError};
use crate::parse::{self, Delimiters, ParseError};

const ESC: u8 = 0x1B;

/// The clinic's Patient ID and its assigning authority (PID-3.1 and PID-3.4). `Debug` does
/// not show the Patient ID.
#[derive(Clone, PartialEq, Eq)]
pub struct ClinicIdentity {
    pub patient_id: String,
    pub issuer: String,
}

impl fmt::Debug for ClinicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClinicIdentity")
            .field("patient_id", &"<redacted>")
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// Why a report cannot be rewritten. No message content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconcileError {
    #[error("the clinic's {field} is empty")]
    EmptyClinicIdentity { field: &'static str },
    #[error("the report does not decode: {source}")]
    Decode {
        #[source]
        source: DecodeError,
    },
    #[error("the report does not parse: {source}")]
    Parse {
        #[source]
        source: ParseError,
    },
    #[error("the report has no PID segment")]
    MissingPid,
    #[error("the report has {count} PID segments (one patient expected)")]
    SeveralPid { count: usize },
    #[error("the new patient identifiers cannot be written in {charset}")]
    NotRepresentable { charset: Charset },
}

/// Rewrites PID-3 of an HL7 v2 message given as the frame bytes (see the module docs). The
/// character set is chosen as the listener does (`over`: MSH-18 or a fixed set); the result
/// is in the same set.
pub fn rewrite_pid(
    frame: &[u8],
    over: CharsetOverride,
    clinic: &ClinicIdentity,
    core_issuer: &str,
) -> Result<Vec<u8>, ReconcileError> {
    let decoded =
        charset::decode(frame, over).map_err(|source| ReconcileError::Decode { source })?;
    let expected = rewrite_pid_text(&decoded.text, clinic, core_issuer)?;
    if expected == decoded.text {
        return Ok(frame.to_vec());
    }
    let message = parse::parse(&decoded.text).map_err(|source| ReconcileError::Parse { source })?;
    let out = splice(
        frame,
        decoded.charset,
        message.delimiters(),
        clinic,
        core_issuer,
    )?;
    // The byte splice must mean exactly the text rewrite.
    let not_representable = ReconcileError::NotRepresentable {
        charset: decoded.charset,
    };
    match charset::decode_as(&out, decoded.charset) {
        Ok(back) if back == expected => Ok(out),
        _ => Err(not_representable),
    }
}

/// Rewrites PID-3 of a message given as decoded text (see the module docs).
pub fn rewrite_pid_text(
    text: &str,
    clinic: &ClinicIdentity,
    core_issuer: &str,
) -> Result<String, ReconcileError> {
    for (field, value) in [
        ("patient_id", &clinic.patient_id),
        ("issuer", &clinic.issuer),
    ] {
        if value.trim().is_empty() {
            return Err(ReconcileError::EmptyClinicIdentity { field });
        }
    }
    let message = parse::parse(text).map_err(|source| ReconcileError::Parse { source })?;
    let d = message.delimiters();
    let mut pids = message.segments_named("PID");
    let Some(pid) = pids.next() else {
        return Err(ReconcileError::MissingPid);
    };
    let others = pids.count();
    if others > 0 {
        return Err(ReconcileError::SeveralPid { count: others + 1 });
    }
    if let Some(first) = pid.field(3).and_then(|f| f.repetition(1)) {
        let authority = first.component(4).map(|c| c.value()).unwrap_or_default();
        if first.value(1) == clinic.patient_id && authority == clinic.issuer {
            return Ok(text.to_string());
        }
    }
    let out = splice(text.as_bytes(), Charset::Utf8, d, clinic, core_issuer)?;
    String::from_utf8(out).map_err(|_| ReconcileError::NotRepresentable {
        charset: Charset::Utf8,
    })
}

/// What matches a report to its booking. `Debug` shows counts only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ResultKeys {
    /// Candidate accession numbers in the order to try them: OBR-18, IPC-1, then OBR-3
    /// (filler order number, which some RIS use as the accession); unescaped, non-empty,
    /// without duplicates.
    pub accession_numbers: Vec<String>,
    /// ORC-2.1 and OBR-2.1, unescaped, non-empty, without duplicates.
    pub placer_order_numbers: Vec<String>,
    /// Some OBR-25 (result status) is `F`.
    pub final_result: bool,
}

impl fmt::Debug for ResultKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResultKeys")
            .field("accession_numbers", &self.accession_numbers.len())
            .field("placer_order_numbers", &self.placer_order_numbers.len())
            .field("final_result", &self.final_result)
            .finish()
    }
}

/// The booking keys of a parsed report (any message type: segments that are absent give
/// empty lists).
pub fn result_keys(message: &parse::Message<'_>) -> ResultKeys {
    let value = |seg: &parse::Segment<'_>, n: usize| {
        seg.field(n)
            .and_then(|f| f.repetition(1))
            .map(|r| r.value(1).trim().to_string())
            .unwrap_or_default()
    };
    let push = |list: &mut Vec<String>, v: String| {
        if !v.is_empty() && !list.contains(&v) {
            list.push(v);
        }
    };
    let mut keys = ResultKeys::default();
    let mut fillers = Vec::new();
    for seg in message.segments() {
        match seg.name() {
            "OBR" => {
                push(&mut keys.accession_numbers, value(&seg, 18));
                push(&mut fillers, value(&seg, 3));
                push(&mut keys.placer_order_numbers, value(&seg, 2));
                keys.final_result |= value(&seg, 25) == "F";
            }
            "IPC" => push(&mut keys.accession_numbers, value(&seg, 1)),
            "ORC" => push(&mut keys.placer_order_numbers, value(&seg, 2)),
            _ => {}
        }
    }
    for f in fillers {
        push(&mut keys.accession_numbers, f);
    }
    keys
}

/// The shift state of the raw bytes while looking for delimiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shift {
    /// ASCII or JIS X 0201 Roman: delimiter bytes are delimiters.
    Single,
    /// ISO-2022-JP double-byte set or JIS X 0201 katakana: no byte is a delimiter.
    Multi,
}

/// Offsets of the bytes of `raw` that are `delimiter` (an ASCII byte) in the text, not part
/// of a multi-byte character. `raw` starts in the single-byte state.
fn delimiter_offsets(raw: &[u8], charset: Charset, delimiter: u8) -> Vec<usize> {
    let mut out = Vec::new();
    let mut shift = Shift::Single;
    let mut i = 0usize;
    while let Some(&b) = raw.get(i) {
        match charset {
            Charset::Iso2022Jp if b == ESC => {
                // ESC $ B, ESC $ @, ESC $ ( D: double-byte; ESC ( I: katakana; ESC ( B/J: single.
                match (raw.get(i + 1), raw.get(i + 2)) {
                    (Some(b'$'), Some(b'(' | b')')) => {
                        shift = Shift::Multi;
                        i += 4;
                    }
                    (Some(b'$'), Some(_)) => {
                        shift = Shift::Multi;
                        i += 3;
                    }
                    (Some(b'('), Some(b'I')) => {
                        shift = Shift::Multi;
                        i += 3;
                    }
                    (Some(b'('), Some(_)) => {
                        shift = Shift::Single;
                        i += 3;
                    }
                    _ => i += 1,
                }
                continue;
            }
            Charset::ShiftJis if matches!(b, 0x81..=0x9F | 0xE0..=0xFC) => {
                i += 2;
                continue;
            }
            _ => {}
        }
        if shift == Shift::Single && b == delimiter {
            out.push(i);
        }
        i += 1;
    }
    out
}

/// `raw` cut at the delimiter offsets (like `split`, but multi-byte aware).
fn split_raw(raw: &[u8], charset: Charset, delimiter: u8) -> Vec<&[u8]> {
    let mut pieces = Vec::new();
    let mut start = 0usize;
    for at in delimiter_offsets(raw, charset, delimiter) {
        pieces.push(raw.get(start..at).unwrap_or_default());
        start = at + 1;
    }
    pieces.push(raw.get(start..).unwrap_or_default());
    pieces
}

/// Byte ranges of the segments of a frame (CR, LF and CR LF end a segment, as in the
/// parser). CR and LF bytes never occur inside a character of the supported sets.
fn segment_ranges(frame: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0usize;
    let mut i = 0usize;
    while let Some(&b) = frame.get(i) {
        if b == b'\r' || b == b'\n' {
            out.push((start, i));
            i += if b == b'\r' && frame.get(i + 1) == Some(&b'\n') {
                2
            } else {
                1
            };
            start = i;
        } else {
            i += 1;
        }
    }
    if start < frame.len() {
        out.push((start, frame.len()));
    }
    out
}

fn ascii_byte(c: char) -> Result<u8, ReconcileError> {
    u8::try_from(c).map_err(|_| ReconcileError::NotRepresentable {
        charset: Charset::Ascii,
    })
}

/// Replaces PID-3 in the raw bytes of `frame` (in `charset`).
fn splice(
    frame: &[u8],
    charset: Charset,
    d: &Delimiters,
    clinic: &ClinicIdentity,
    core_issuer: &str,
) -> Result<Vec<u8>, ReconcileError> {
    let fs = ascii_byte(d.field)?;
    let comp = ascii_byte(d.component)?;
    let rep = ascii_byte(d.repetition)?;
    let mut pid_head = b"PID".to_vec();
    pid_head.push(fs);
    let (seg_start, seg_end) = segment_ranges(frame)
        .into_iter()
        .find(|(s, e)| {
            frame
                .get(*s..*e)
                .is_some_and(|seg| seg.starts_with(&pid_head))
        })
        .ok_or(ReconcileError::MissingPid)?;
    let segment = frame.get(seg_start..seg_end).unwrap_or_default();
    // Separators after the segment ID, PID-1 and PID-2 open PID-3; the next one closes it.
    let seps = delimiter_offsets(segment, charset, fs);
    let field_start = seps.get(2).map(|s| s + 1);
    let field_end = seps.get(3).copied().unwrap_or(segment.len());
    let encode = |text: &str| charset.encode(&parse::escape(text, d));

    let mut field = encode(&clinic.patient_id);
    field.extend([comp, comp, comp]);
    field.extend(encode(&clinic.issuer));
    let original = field_start
        .and_then(|s| segment.get(s..field_end))
        .unwrap_or_default();
    let clinic_id = encode(&clinic.patient_id);
    let clinic_issuer = encode(&clinic.issuer);
    for repetition in split_raw(original, charset, rep) {
        let comps = split_raw(repetition, charset, comp);
        let is_clinic = comps.first().is_some_and(|c| **c == *clinic_id)
            && comps.get(3).is_some_and(|c| **c == *clinic_issuer);
        if repetition.is_empty() || is_clinic {
            continue;
        }
        field.push(rep);
        let has_authority = comps.get(3).is_some_and(|c| !c.is_empty());
        if has_authority || core_issuer.is_empty() {
            field.extend_from_slice(repetition);
            continue;
        }
        for n in 0..comps.len().max(4) {
            if n > 0 {
                field.push(comp);
            }
            if n == 3 {
                field.extend(encode(core_issuer));
            } else {
                field.extend_from_slice(comps.get(n).copied().unwrap_or_default());
            }
        }
    }

    let mut out = Vec::with_capacity(frame.len() + field.len());
    out.extend_from_slice(frame.get(..seg_start).unwrap_or_default());
    match field_start {
        Some(s) => {
            out.extend_from_slice(segment.get(..s).unwrap_or_default());
            out.extend_from_slice(&field);
            out.extend_from_slice(segment.get(field_end..).unwrap_or_default());
        }
        None => {
            // PID has fewer than 3 fields: add the missing separators.
            out.extend_from_slice(segment);
            for _ in seps.len()..3 {
                out.push(fs);
            }
            out.extend_from_slice(&field);
        }
    }
    out.extend_from_slice(frame.get(seg_end..).unwrap_or_default());
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use crate::testutil::XorShift;

    fn clinic() -> ClinicIdentity {
        ClinicIdentity {
            patient_id: "CL-0042".into(),
            issuer: "CLINIC-A".into(),
        }
    }

    const ORU: &str = "MSH|^~\\&|RIS|CORE|GW|CLINIC|20261206||ORU^R01^ORU_R01|M1|P|2.5\r\
PID|1||12345^^^CORE^MR~999^^^OTHER^PI||DOE^JANE||19700101|F\r\
ORC|RE|APT-1\r\
OBR|1|APT-1|F-9|||||||||||||||ACC-1|||||||F\r\
OBX|1|TX|||No acute findings.||||||F\r";

    fn pid3(text: &str) -> String {
        parse(text)
            .unwrap()
            .segment("PID")
            .unwrap()
            .raw(3)
            .to_string()
    }

    #[test]
    fn pid3_gets_the_clinic_id_first_and_keeps_the_core_ids_after_it() {
        let out = rewrite_pid(ORU.as_bytes(), CharsetOverride::Auto, &clinic(), "CORE").unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            pid3(&text),
            "CL-0042^^^CLINIC-A~12345^^^CORE^MR~999^^^OTHER^PI"
        );
        // Everything else is byte-identical.
        assert_eq!(
            text,
            ORU.replace(
                "12345^^^CORE^MR~999",
                "CL-0042^^^CLINIC-A~12345^^^CORE^MR~999"
            )
        );
        assert_eq!(rewrite_pid_text(ORU, &clinic(), "CORE").unwrap(), text);
        // Rewriting again changes nothing.
        assert_eq!(
            rewrite_pid(&out, CharsetOverride::Auto, &clinic(), "CORE").unwrap(),
            out
        );
    }

    #[test]
    fn the_core_issuer_fills_an_empty_assigning_authority() {
        let text = ORU.replace("12345^^^CORE^MR~999^^^OTHER^PI", "12345^^^^MR~777~~888^^^X");
        let out = rewrite_pid_text(&text, &clinic(), "CORE-HOSP").unwrap();
        assert_eq!(
            pid3(&out),
            "CL-0042^^^CLINIC-A~12345^^^CORE-HOSP^MR~777^^^CORE-HOSP~888^^^X"
        );
        // A repetition that already is the clinic's is not repeated.
        let known = ORU.replace("~999^^^OTHER^PI", "~CL-0042^^^CLINIC-A~999^^^OTHER^PI");
        assert_eq!(
            pid3(&rewrite_pid_text(&known, &clinic(), "C").unwrap()),
            "CL-0042^^^CLINIC-A~12345^^^CORE^MR~999^^^OTHER^PI"
        );
        // Without a core issuer the original repetitions stay as they were.
        let out = rewrite_pid_text(&text, &clinic(), "").unwrap();
        assert_eq!(pid3(&out), "CL-0042^^^CLINIC-A~12345^^^^MR~777~888^^^X");
    }

    #[test]
    fn new_values_are_escaped_with_the_message_delimiters() {
        let odd = ClinicIdentity {
            patient_id: "A^B|C".into(),
            issuer: "X&Y".into(),
        };
        let out = rewrite_pid_text(ORU, &odd, "CORE").unwrap();
        assert!(pid3(&out).starts_with("A\\S\\B\\F\\C^^^X\\T\\Y~12345"));
        let msg = parse(&out).unwrap();
        let first = msg.segment("PID").unwrap().field(3).unwrap();
        assert_eq!(first.repetition(1).unwrap().value(1), "A^B|C");
        assert_eq!(first.repetition(1).unwrap().value(4), "X&Y");
    }

    #[test]
    fn crlf_terminators_and_a_short_pid_are_handled() {
        let text = "MSH|^~\\&|A|B|C|D|2024||ORU^R01|1|P|2.5\r\nPID|1\r\nOBR|1|APT-1\r\n";
        let out = rewrite_pid_text(text, &clinic(), "CORE").unwrap();
        assert_eq!(
            out,
            "MSH|^~\\&|A|B|C|D|2024||ORU^R01|1|P|2.5\r\nPID|1||CL-0042^^^CLINIC-A\r\nOBR|1|APT-1\r\n"
        );
        let empty = "MSH|^~\\&|A|B|C|D|2024||ORU^R01|1|P|2.5\rPID|1|||X";
        assert_eq!(
            rewrite_pid_text(empty, &clinic(), "CORE").unwrap(),
            "MSH|^~\\&|A|B|C|D|2024||ORU^R01|1|P|2.5\rPID|1||CL-0042^^^CLINIC-A|X"
        );
    }

    const JA_ORU: &str = "MSH|^~\\&|RIS|CORE|GW|CLINIC|20261206||ORU^R01^ORU_R01|M2|P|2.5|||||JPN|{MSH18}\r\
PID|1||123456^^^HOSP^PI~9876543^^^^NI||放射線^造影剤^^^^^L^I~ホウシャセン^ゾウエイザイ^^^^^L^P||19700101|M\r\
OBR|1|APT-2|F-2|||||||||||||||ACC-2|||||||F\r\
OBX|1|TX|||表参道の放射線科: 異常なし||||||F\r";

    #[test]
    fn utf8_japanese_report_is_rewritten_with_a_japanese_issuer() {
        let text = JA_ORU.replace("{MSH18}", "UNICODE UTF-8");
        let ja = ClinicIdentity {
            patient_id: "CL-7".into(),
            issuer: "山田クリニック".into(),
        };
        let out = rewrite_pid(text.as_bytes(), CharsetOverride::Auto, &ja, "中央病院").unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            text.replace(
                "123456^^^HOSP^PI~9876543^^^^NI",
                "CL-7^^^山田クリニック~123456^^^HOSP^PI~9876543^^^中央病院^NI"
            )
        );
        // The same identity cannot be written into an ASCII report.
        let ascii = ORU.as_bytes();
        assert_eq!(
            rewrite_pid(ascii, CharsetOverride::Auto, &ja, "CORE"),
            Err(ReconcileError::NotRepresentable {
                charset: Charset::Ascii
            })
        );
    }

    #[test]
    fn iso2022jp_report_keeps_every_other_byte_including_its_own_escapes() {
        let text = JA_ORU.replace("{MSH18}", "~ISO IR87");
        let (encoded, _, bad) = encoding_rs::ISO_2022_JP.encode(&text);
        assert!(!bad);
        // The sender uses ESC $ @ (JIS C 6226) where encoding_rs would write ESC $ B: those
        // bytes must survive, so the frame cannot simply be decoded and re-encoded.
        let frame: Vec<u8> = encoded
            .windows(3)
            .enumerate()
            .flat_map(|(i, w)| {
                let b = w[0];
                if i > 0 && encoded[i - 1] == ESC && w[0] == b'$' && w[1] == b'B' {
                    vec![b'$']
                } else if i > 1 && encoded[i - 2] == ESC && encoded[i - 1] == b'$' && b == b'B' {
                    vec![b'@']
                } else {
                    vec![b]
                }
            })
            .chain(encoded[encoded.len() - 2..].iter().copied())
            .collect();
        assert!(frame.windows(3).any(|w| w == b"\x1b$@"));
        let ja = ClinicIdentity {
            patient_id: "CL-7".into(),
            issuer: "山田クリニック".into(),
        };
        let out = rewrite_pid(&frame, CharsetOverride::Auto, &ja, "中央病院").unwrap();
        let decoded = charset::decode_as(&out, Charset::Iso2022Jp).unwrap();
        assert_eq!(
            decoded,
            text.replace(
                "123456^^^HOSP^PI~9876543^^^^NI",
                "CL-7^^^山田クリニック~123456^^^HOSP^PI~9876543^^^中央病院^NI"
            )
        );
        // Bytes before PID-3 and from PID-4 on are the sender's.
        let head = frame.windows(4).position(|w| w == b"1234").unwrap();
        assert_eq!(out[..head], frame[..head]);
        let tail = frame.len() - frame.windows(4).position(|w| w == b"||\x1b$").unwrap();
        assert_eq!(out[out.len() - tail..], frame[frame.len() - tail..]);
    }

    #[test]
    fn shift_jis_trail_bytes_are_not_taken_for_delimiters() {
        // 表 is 0x95 0x5C in Shift_JIS; ソ is 0x83 0x5C. PID-2 holds 表 so a naive byte
        // split would miscount the fields.
        let text = JA_ORU
            .replace("{MSH18}", "SHIFT_JIS")
            .replace("PID|1||", "PID|1|表ソ|");
        let (frame, _, bad) = encoding_rs::SHIFT_JIS.encode(&text);
        assert!(!bad);
        let out = rewrite_pid(&frame, CharsetOverride::Auto, &clinic(), "中央病院").unwrap();
        let decoded = charset::decode_as(&out, Charset::ShiftJis).unwrap();
        assert_eq!(
            pid3(&decoded),
            "CL-0042^^^CLINIC-A~123456^^^HOSP^PI~9876543^^^中央病院^NI"
        );
        assert_eq!(
            parse(&decoded).unwrap().segment("PID").unwrap().raw(2),
            "表ソ"
        );
        let at = frame.windows(6).position(|w| w == b"123456").unwrap();
        assert_eq!(out[..at], frame[..at]);
    }

    #[test]
    fn result_keys_list_accessions_placer_numbers_and_finality() {
        let keys = result_keys(&parse(ORU).unwrap());
        assert_eq!(keys.accession_numbers, ["ACC-1", "F-9"]);
        assert_eq!(keys.placer_order_numbers, ["APT-1"]);
        assert!(keys.final_result);
        let prelim = "MSH|^~\\&|A|B|C|D|2024||ORU^R01|1|P|2.5\rPID|1||P\rORC|RE|APT\\T\\9\r\
OBR|1|APT-9|||||||||||||||||||||||P\rIPC|ACC-IPC\r";
        let keys = result_keys(&parse(prelim).unwrap());
        assert_eq!(keys.accession_numbers, ["ACC-IPC"]);
        assert_eq!(keys.placer_order_numbers, ["APT&9", "APT-9"]);
        assert!(!keys.final_result);
        assert!(!format!("{keys:?}").contains("APT"));
    }

    #[test]
    fn missing_or_several_pid_segments_and_bad_input_are_typed_errors() {
        let no_pid = "MSH|^~\\&|A|B|C|D|2024||ORU^R01|1|P|2.5\rOBR|1|X\r";
        assert_eq!(
            rewrite_pid(no_pid.as_bytes(), CharsetOverride::Auto, &clinic(), "C"),
            Err(ReconcileError::MissingPid)
        );
        let two = format!("{ORU}PID|1||555^^^CORE\r");
        assert_eq!(
            rewrite_pid_text(&two, &clinic(), "C"),
            Err(ReconcileError::SeveralPid { count: 2 })
        );
        assert!(matches!(
            rewrite_pid(b"garbage", CharsetOverride::Auto, &clinic(), "C"),
            Err(ReconcileError::Parse { .. })
        ));
        assert!(matches!(
            rewrite_pid(b"MSH|^~\\&|\xff", CharsetOverride::Auto, &clinic(), "C"),
            Err(ReconcileError::Decode { .. })
        ));
        let blank = ClinicIdentity {
            patient_id: " ".into(),
            issuer: "X".into(),
        };
        assert_eq!(
            rewrite_pid_text(ORU, &blank, "C"),
            Err(ReconcileError::EmptyClinicIdentity {
                field: "patient_id"
            })
        );
        // No content in errors or Debug.
        let e = rewrite_pid_text(&two, &clinic(), "C").unwrap_err();
        let shown = format!("{e} {e:?} {:?}", clinic());
        assert!(!shown.contains("555") && !shown.contains("CL-0042"));
    }

    #[test]
    fn seeded_mutations_never_panic_and_text_and_bytes_agree() {
        let mut rng = XorShift::new(16);
        let bases = [ORU.to_string(), JA_ORU.replace("{MSH18}", "UNICODE UTF-8")];
        for i in 0..5000 {
            let mut m = bases[i % 2].clone().into_bytes();
            for _ in 0..=rng.below(3) {
                let at = rng.below(m.len());
                match rng.below(3) {
                    0 => m[at] = b"|^~\\&\r\nPID"[rng.below(10)],
                    1 => {
                        m.remove(at);
                    }
                    _ => m.insert(at, (rng.next_u64() & 0x7F) as u8),
                }
            }
            let bytes = rewrite_pid(&m, CharsetOverride::Fixed(Charset::Utf8), &clinic(), "C");
            // The text path takes what decodes; ESC does not decode as UTF-8.
            if let (Ok(text), false) = (std::str::from_utf8(&m), m.contains(&ESC)) {
                let by_text = rewrite_pid_text(text, &clinic(), "C");
                match (&bytes, &by_text) {
                    (Ok(b), Ok(t)) => assert_eq!(b, t.as_bytes()),
                    (Err(_), Err(_)) => {}
                    _ => panic!("bytes and text disagree: {bytes:?} vs {by_text:?}"),
                }
            }
        }
    }
}
