//! Character sets: the whole frame is decoded to Unicode *before* any parsing, because
//! multi-byte text can contain delimiter bytes (in ISO-2022-JP, 放 is JIS X 0208 `0x4A 0x7C`
//! and holds `|`; in Shift_JIS, 表 is `0x95 0x5C` and ends in `\`).
//!
//! Supported: ASCII, UTF-8, ISO-2022-JP (JIS X 0208 via `ESC $ B` / `ESC $ @`, JIS X 0201
//! Roman and katakana) and Shift_JIS, the last two through `encoding_rs` (WHATWG decoders)
//! *without replacement*: a byte sequence that is not valid in the chosen set is a
//! [`DecodeError::Malformed`] naming the set and the byte offset, never U+FFFD mojibake.
//! JIS X 0212 (`ESC $ ( D`, HL7 `ISO IR159`) is not decodable and is rejected that way.
//!
//! Choice of character set ([`CharsetOverride`], per listener `hl7.charset`):
//! - `Fixed(c)`: always `c`, whatever MSH-18 says.
//! - `Auto`: MSH-18 is read from the raw bytes (see [`msh18_raw`]) and mapped by
//!   [`Charset::from_msh18`]: HL7 table 0211 values plus the spellings Japanese systems use.
//!   `~ISO IR87` (empty first repetition = ASCII default, then JIS X 0208 by ISO 2022 code
//!   extension, the JAHIS form), `ISO IR87`, `ISO IR13`, `ISO IR159`, `ISO 2022-1994` and
//!   `ISO-2022-JP` select ISO-2022-JP; `UNICODE UTF-8`/`UTF-8` select UTF-8; `SHIFT_JIS`,
//!   `SHIFT-JIS`, `SJIS`, `MS_KANJI`, `CP932`, `WINDOWS-31J` select Shift_JIS (Shift_JIS is
//!   not in table 0211; these are vendor spellings); `ASCII`, `ISO IR6`, `ISO IR14` select
//!   ASCII. Anything else is [`DecodeError::Unsupported`] (HL7 error 103 at MSH-18).
//! - `Auto` with MSH-18 empty or absent (HL7 default: ASCII), leniently: a frame containing
//!   `ESC` is decoded as ISO-2022-JP (senders that forget MSH-18), else pure 7-bit ASCII is
//!   ASCII, else valid UTF-8 is UTF-8 (a superset of ASCII, so nothing is misread), else it is
//!   [`DecodeError::Malformed`] (configure a fixed `hl7.charset` for such a sender).
//! - ASCII and UTF-8 decoding reject the `ESC` byte: it only appears in ISO 2022 text, and
//!   forwarding its escape sequences as characters would be mojibake.
//!
//! Errors name charsets and offsets only, never message content.

use std::fmt;
use std::str::FromStr;

use encoding_rs::{DecoderResult, Encoding, ISO_2022_JP, SHIFT_JIS};

const ESC: u8 = 0x1B;

/// A character set the gateway can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Charset {
    /// 7-bit ASCII (HL7 default, table 0211 `ASCII` / empty MSH-18).
    Ascii,
    /// UTF-8 (`UNICODE UTF-8`).
    Utf8,
    /// ISO-2022-JP (`~ISO IR87`: JIS X 0208 by ISO 2022 code extension).
    Iso2022Jp,
    /// Shift_JIS (Windows-31J as specified by WHATWG).
    ShiftJis,
}

impl Charset {
    /// The configuration spelling (`hl7.charset`), also used in errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ascii => "ascii",
            Self::Utf8 => "utf-8",
            Self::Iso2022Jp => "iso-2022-jp",
            Self::ShiftJis => "shift_jis",
        }
    }

    /// Maps an MSH-18 value (raw, all repetitions) to a character set. `Ok(None)` when every
    /// repetition is empty (HL7 default, see [`decode`] for what `Auto` makes of it).
    /// `repetition` and `component` are the message's MSH-2 characters.
    pub fn from_msh18(
        value: &str,
        repetition: char,
        component: char,
    ) -> Result<Option<Self>, DecodeError> {
        let mut first: Option<Option<Self>> = None;
        let mut iso2022_extension = false;
        for rep in value.split(repetition) {
            let term = rep.split(component).next().unwrap_or_default();
            let key: String = term
                .chars()
                .filter(|c| !matches!(c, ' ' | '_' | '-' | '.'))
                .map(|c| c.to_ascii_uppercase())
                .collect();
            let this = match key.as_str() {
                "" => None,
                "ASCII" | "USASCII" | "ISOIR6" | "ISOIR14" => Some(Self::Ascii),
                "ISOIR87" | "ISOIR13" | "ISOIR159" | "ISO20221994" | "ISO2022JP" => {
                    iso2022_extension = true;
                    Some(Self::Iso2022Jp)
                }
                "UNICODEUTF8" | "UTF8" => Some(Self::Utf8),
                "SHIFTJIS" | "SJIS" | "MSKANJI" | "CP932" | "WINDOWS31J" => Some(Self::ShiftJis),
                _ => {
                    return Err(DecodeError::Unsupported {
                        value: sanitize(term),
                    });
                }
            };
            if first.is_none() {
                first = Some(this);
            }
        }
        Ok(match first.flatten() {
            // ISO 2022 code extension on top of the ASCII default.
            None | Some(Self::Ascii) if iso2022_extension => Some(Self::Iso2022Jp),
            other => other,
        })
    }

    /// Encodes text (an acknowledgement) in this character set. Characters the set cannot
    /// represent become `?` (the acknowledgement builder only copies text that was decoded
    /// from this set, so this does not happen in practice).
    pub fn encode(self, text: &str) -> Vec<u8> {
        match self {
            Self::Ascii => text
                .chars()
                .map(|c| if c.is_ascii() { c as u8 } else { b'?' })
                .collect(),
            Self::Utf8 => text.as_bytes().to_vec(),
            Self::Iso2022Jp => encode_with(ISO_2022_JP, text),
            Self::ShiftJis => encode_with(SHIFT_JIS, text),
        }
    }
}

impl fmt::Display for Charset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn encode_with(enc: &'static Encoding, text: &str) -> Vec<u8> {
    let mut encoder = enc.new_encoder();
    let mut out = Vec::with_capacity(text.len() + 16);
    let mut rest = text;
    loop {
        out.reserve(rest.len() * 4 + 16);
        let (result, read) =
            encoder.encode_from_utf8_to_vec_without_replacement(rest, &mut out, true);
        rest = rest.get(read..).unwrap_or_default();
        match result {
            encoding_rs::EncoderResult::InputEmpty => return out,
            encoding_rs::EncoderResult::OutputFull => {}
            encoding_rs::EncoderResult::Unmappable(_) => out.push(b'?'),
        }
    }
}

/// Keeps only a short, harmless rendering of an unsupported MSH-18 term for error messages.
fn sanitize(term: &str) -> String {
    term.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '_' | '-' | '/' | '.'))
        .take(24)
        .collect()
}

/// How a listener chooses the character set (`hl7.charset` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CharsetOverride {
    /// From MSH-18 (see the module docs).
    #[default]
    Auto,
    /// Always this set.
    Fixed(Charset),
}

/// A `hl7.charset` value that is none of `auto`, `iso-2022-jp`, `shift_jis`, `utf-8`, `ascii`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hl7.charset (expected auto, iso-2022-jp, shift_jis, utf-8 or ascii)")]
pub struct UnknownCharsetName;

impl FromStr for CharsetOverride {
    type Err = UnknownCharsetName;

    /// Case-insensitive; `_` and `-` are interchangeable (`shift-jis`, `utf_8`, `sjis` too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = s.trim().to_ascii_lowercase().replace('_', "-");
        Ok(match key.as_str() {
            "auto" => Self::Auto,
            "iso-2022-jp" => Self::Fixed(Charset::Iso2022Jp),
            "shift-jis" | "sjis" => Self::Fixed(Charset::ShiftJis),
            "utf-8" | "utf8" => Self::Fixed(Charset::Utf8),
            "ascii" | "us-ascii" => Self::Fixed(Charset::Ascii),
            _ => return Err(UnknownCharsetName),
        })
    }
}

/// Why a frame could not be decoded. Carries no message content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// MSH-18 names a set the gateway does not decode (HL7 error 103 at MSH-18).
    /// The value stays out of `Display`: MSH-18 of a garbled message may hold anything,
    /// patient data included, and `Display` reaches logs.
    #[error("MSH-18 names a character set this gateway does not decode")]
    Unsupported {
        /// The offending MSH-18 term, reduced to at most 24 harmless ASCII characters.
        value: String,
    },
    /// Bytes that are not valid in the chosen set (HL7 error 102).
    #[error("bytes at offset {offset} are not valid {charset}")]
    Malformed {
        /// The set the frame was decoded as.
        charset: Charset,
        /// Offset of the first offending byte in the frame.
        offset: usize,
    },
}

impl DecodeError {
    /// The HL7 table 0357 code to answer with.
    pub fn error_code(&self) -> crate::parse::ErrorCode {
        match self {
            Self::Unsupported { .. } => crate::parse::ErrorCode::TableValueNotFound,
            Self::Malformed { .. } => crate::parse::ErrorCode::DataTypeError,
        }
    }

    /// Where the error lies, for ERR-2 (MSH-18 for an unsupported set, none otherwise).
    pub fn location(&self) -> Option<crate::parse::Location> {
        match self {
            Self::Unsupported { .. } => Some(crate::parse::Location::field("MSH", 1, 18)),
            Self::Malformed { .. } => None,
        }
    }
}

/// A frame decoded to Unicode. Forward the original frame bytes, parse `text`.
#[derive(Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The whole message as Unicode.
    pub text: String,
    /// The set it was decoded from (acknowledgements are encoded in it).
    pub charset: Charset,
}

/// Never prints the text (patient data).
impl fmt::Debug for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoded")
            .field("text", &format_args!("<{} bytes>", self.text.len()))
            .field("charset", &self.charset)
            .finish()
    }
}

/// Decodes a whole frame (see the module docs for how the set is chosen).
pub fn decode(frame: &[u8], over: CharsetOverride) -> Result<Decoded, DecodeError> {
    let charset = match over {
        CharsetOverride::Fixed(c) => c,
        CharsetOverride::Auto => match detect_declared(frame)? {
            Some(c) => c,
            None if frame.contains(&ESC) => Charset::Iso2022Jp,
            None if frame.is_ascii() => Charset::Ascii,
            None => Charset::Utf8,
        },
    };
    let text = decode_as(frame, charset)?;
    Ok(Decoded { text, charset })
}

/// The character set MSH-18 declares, if any (`Ok(None)`: no MSH, or MSH-18 empty).
fn detect_declared(frame: &[u8]) -> Result<Option<Charset>, DecodeError> {
    let Some(raw) = msh18_raw(frame) else {
        return Ok(None);
    };
    // MSH-18 itself is ASCII in any sane message; anything else is not a table 0211 value.
    let Ok(value) = std::str::from_utf8(raw) else {
        return Err(DecodeError::Unsupported {
            value: String::new(),
        });
    };
    let component = frame.get(4).map_or('^', |&b| char::from(b));
    let repetition = frame.get(5).map_or('~', |&b| char::from(b));
    Charset::from_msh18(value, repetition, component)
}

/// Decodes `frame` as `charset`, without replacement.
pub fn decode_as(frame: &[u8], charset: Charset) -> Result<String, DecodeError> {
    let malformed = |offset| DecodeError::Malformed { charset, offset };
    match charset {
        Charset::Ascii => match frame.iter().position(|&b| b >= 0x80 || b == ESC) {
            Some(offset) => Err(malformed(offset)),
            None => Ok(String::from_utf8_lossy(frame).into_owned()),
        },
        Charset::Utf8 => match std::str::from_utf8(frame) {
            Ok(text) => match frame.iter().position(|&b| b == ESC) {
                Some(offset) => Err(malformed(offset)),
                None => Ok(text.to_owned()),
            },
            Err(e) => Err(malformed(e.valid_up_to())),
        },
        Charset::Iso2022Jp => decode_with(ISO_2022_JP, frame).map_err(malformed),
        Charset::ShiftJis => decode_with(SHIFT_JIS, frame).map_err(malformed),
    }
}

/// Returns the offset of the first malformed byte on failure.
fn decode_with(enc: &'static Encoding, bytes: &[u8]) -> Result<String, usize> {
    let mut decoder = enc.new_decoder_without_bom_handling();
    let cap = decoder
        .max_utf8_buffer_length_without_replacement(bytes.len())
        .ok_or(0usize)?;
    let mut out = String::with_capacity(cap);
    let (result, read) = decoder.decode_to_string_without_replacement(bytes, &mut out, true);
    match result {
        DecoderResult::InputEmpty => Ok(out),
        DecoderResult::Malformed(bad, extra) => {
            Err(read.saturating_sub(usize::from(bad) + usize::from(extra)))
        }
        // Cannot happen with the worst-case capacity reserved above; report as malformed
        // at the point reached rather than panic.
        DecoderResult::OutputFull => Err(read),
    }
}

/// The raw bytes of MSH-18 (all repetitions), read without decoding the frame.
///
/// The frame must start with `MSH`; byte 3 is the field separator. Fields are counted up to
/// the end of the MSH segment (CR or LF) while skipping bytes that cannot be separators:
/// the double-byte runs of ISO-2022-JP (between `ESC $ ...` and `ESC ( ...`) and, when the
/// MSH segment is not valid UTF-8, the trail byte of each Shift_JIS double-byte character.
/// `None` when there is no MSH segment or it has fewer than 18 fields.
pub fn msh18_raw(frame: &[u8]) -> Option<&[u8]> {
    if !frame.starts_with(b"MSH") {
        return None;
    }
    let fs = *frame.get(3)?;
    if fs >= 0x80 || fs == b'\r' || fs == b'\n' || fs == ESC {
        return None;
    }
    let seg_end = msh_segment_end(frame);
    let segment = frame.get(..seg_end)?;
    let sjis_aware = std::str::from_utf8(segment).is_err();
    // `field` is the number of the field that starts at `start`; MSH-2 starts at byte 4.
    let mut field = 2usize;
    let mut start = 4usize;
    let mut double = false;
    let mut i = 4usize;
    while let Some(&b) = segment.get(i) {
        if b == ESC {
            match segment.get(i + 1) {
                Some(b'$') => double = true,
                Some(b'(') => double = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if double {
            i += 1;
            continue;
        }
        if sjis_aware && matches!(b, 0x81..=0x9F | 0xE0..=0xFC) {
            i += 2;
            continue;
        }
        if b == fs {
            if field == 18 {
                return segment.get(start..i);
            }
            field += 1;
            start = i + 1;
        }
        i += 1;
    }
    if field == 18 {
        segment.get(start..)
    } else {
        None
    }
}

/// End of the MSH segment: the first CR or LF outside an ISO-2022 double-byte run.
fn msh_segment_end(frame: &[u8]) -> usize {
    let mut double = false;
    let mut i = 0;
    while let Some(&b) = frame.get(i) {
        match b {
            ESC => match frame.get(i + 1) {
                Some(b'$') => double = true,
                Some(b'(') => double = false,
                _ => {}
            },
            b'\r' | b'\n' if !double => return i,
            _ => {}
        }
        i += 1;
    }
    frame.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_parses_every_documented_spelling() {
        assert_eq!("auto".parse(), Ok(CharsetOverride::Auto));
        assert_eq!(
            "ISO-2022-JP".parse(),
            Ok(CharsetOverride::Fixed(Charset::Iso2022Jp))
        );
        assert_eq!(
            "shift_jis".parse(),
            Ok(CharsetOverride::Fixed(Charset::ShiftJis))
        );
        assert_eq!("utf-8".parse(), Ok(CharsetOverride::Fixed(Charset::Utf8)));
        assert_eq!("ascii".parse(), Ok(CharsetOverride::Fixed(Charset::Ascii)));
        assert_eq!("latin1".parse::<CharsetOverride>(), Err(UnknownCharsetName));
    }

    #[test]
    fn msh18_values_map_to_charsets() {
        let m = |v| Charset::from_msh18(v, '~', '^');
        assert_eq!(m("~ISO IR87"), Ok(Some(Charset::Iso2022Jp)));
        assert_eq!(m("ISO IR87"), Ok(Some(Charset::Iso2022Jp)));
        assert_eq!(m("ISO 2022-1994"), Ok(Some(Charset::Iso2022Jp)));
        assert_eq!(m("~ISO IR87~ISO IR159"), Ok(Some(Charset::Iso2022Jp)));
        assert_eq!(m("ASCII~ISO IR87"), Ok(Some(Charset::Iso2022Jp)));
        assert_eq!(m("UNICODE UTF-8"), Ok(Some(Charset::Utf8)));
        assert_eq!(m("SHIFT_JIS"), Ok(Some(Charset::ShiftJis)));
        assert_eq!(m("Shift-JIS"), Ok(Some(Charset::ShiftJis)));
        assert_eq!(m("SJIS"), Ok(Some(Charset::ShiftJis)));
        assert_eq!(m("ASCII"), Ok(Some(Charset::Ascii)));
        assert_eq!(m(""), Ok(None));
        assert_eq!(m("~"), Ok(None));
        assert!(matches!(m("8859/1"), Err(DecodeError::Unsupported { .. })));
    }

    #[test]
    fn msh18_is_found_in_raw_bytes() {
        let msg = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A08|1|P|2.5|||||JPN|~ISO IR87|ja\rPID|";
        assert_eq!(msh18_raw(msg), Some(&b"~ISO IR87"[..]));
        let msg = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A08|1|P|2.5|||||JPN|UNICODE UTF-8";
        assert_eq!(msh18_raw(msg), Some(&b"UNICODE UTF-8"[..]));
        assert_eq!(msh18_raw(b"MSH|^~\\&|A|B\rPID|||||||||||||||||||X"), None);
        assert_eq!(msh18_raw(b"PID|"), None);
    }

    #[test]
    fn msh18_reader_skips_separator_bytes_inside_double_byte_text() {
        // MSH-4 holds 放 in ISO-2022-JP (ESC $ B 0x4A 0x7C ESC ( B): the 0x7C is not a separator.
        let mut msg =
            b"MSH|^~\\&|A|\x1b$BJ|\x1b(B|C|D|20240101||ADT^A08|1|P|2.5|||||JPN|~ISO IR87\r"
                .to_vec();
        assert_eq!(msh18_raw(&msg), Some(&b"~ISO IR87"[..]));
        // MSH-4 holds 表 in Shift_JIS (0x95 0x5C) and a trail byte 0x7C (0x81 0x7C).
        msg = b"MSH|^~\\&|A|\x95\x5c\x81\x7c|C|D|20240101||ADT^A08|1|P|2.5|||||JPN|SHIFT_JIS\r"
            .to_vec();
        assert_eq!(msh18_raw(&msg), Some(&b"SHIFT_JIS"[..]));
    }

    #[test]
    fn jis_x0212_escape_is_a_decode_error_with_offset_not_mojibake() {
        let msg = b"MSH|^~\\&|||||||ADT^A08|1|P|2.5|||||JPN|~ISO IR87~ISO IR159\rPID|||1||\x1b$(D\x30\x21\x1b(B\r";
        let err = decode(msg, CharsetOverride::Auto).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Malformed {
                charset: Charset::Iso2022Jp,
                offset: 68
            }
        );
        assert_eq!(&msg[68..72], b"\x1b$(D");
        assert_eq!(err.error_code().code(), 102);
        assert_eq!(
            err.to_string(),
            "bytes at offset 68 are not valid iso-2022-jp"
        );
    }

    #[test]
    fn invalid_shift_jis_and_utf8_report_offsets() {
        let err = decode_as(b"MSH|\x81\x20", Charset::ShiftJis).unwrap_err();
        assert!(
            matches!(err, DecodeError::Malformed { offset: 4, .. }),
            "{err:?}"
        );
        let err = decode_as(b"MSH|ab\xff", Charset::Utf8).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Malformed {
                charset: Charset::Utf8,
                offset: 6
            }
        );
        let err = decode_as(b"MSH|\xc3\xa9", Charset::Ascii).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Malformed {
                charset: Charset::Ascii,
                offset: 4
            }
        );
    }

    #[test]
    fn empty_msh18_is_lenient_ascii_utf8_or_iso2022() {
        let d = decode(b"MSH|^~\\&|A", CharsetOverride::Auto).unwrap();
        assert_eq!(d.charset, Charset::Ascii);
        let d = decode("MSH|^~\\&|é".as_bytes(), CharsetOverride::Auto).unwrap();
        assert_eq!(d.charset, Charset::Utf8);
        let d = decode(b"MSH|^~\\&|\x1b$BJ|\x1b(B", CharsetOverride::Auto).unwrap();
        assert_eq!(d.charset, Charset::Iso2022Jp);
        assert_eq!(d.text, "MSH|^~\\&|放");
        assert!(decode(b"MSH|^~\\&|\x95\x5c", CharsetOverride::Auto).is_err());
    }

    #[test]
    fn fixed_override_wins_over_msh18() {
        let msg = b"MSH|^~\\&|\x95\x5c|||||ADT^A08|1|P|2.5|||||JPN|UNICODE UTF-8";
        let d = decode(msg, CharsetOverride::Fixed(Charset::ShiftJis)).unwrap();
        assert!(d.text.starts_with("MSH|^~\\&|表|"));
        assert!(decode(msg, CharsetOverride::Auto).is_err());
    }

    #[test]
    fn escape_byte_is_never_accepted_as_ascii_or_utf8() {
        assert!(decode_as(b"MSH|\x1b$B", Charset::Ascii).is_err());
        assert!(decode_as(b"MSH|\x1b$B", Charset::Utf8).is_err());
    }

    #[test]
    fn unsupported_charset_error_is_sanitised() {
        let err = Charset::from_msh18("8859/1<script>", '~', '^').unwrap_err();
        assert_eq!(
            err,
            DecodeError::Unsupported {
                value: "8859/1script".into()
            }
        );
    }

    #[test]
    fn encode_round_trips_japanese_text() {
        for cs in [Charset::Iso2022Jp, Charset::ShiftJis, Charset::Utf8] {
            let bytes = cs.encode("ACK|放射線|表");
            assert_eq!(decode_as(&bytes, cs).unwrap(), "ACK|放射線|表");
        }
        assert_eq!(Charset::Ascii.encode("AB放"), b"AB?");
    }

    #[test]
    fn debug_of_decoded_hides_text() {
        let d = decode(b"MSH|^~\\&|YAMADA", CharsetOverride::Auto).unwrap();
        assert!(!format!("{d:?}").contains("YAMADA"));
    }
}
