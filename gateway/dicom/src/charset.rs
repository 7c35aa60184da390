//! Specific Character Set (0008,0005) for the worklist SCP: the Japanese ISO 2022 code
//! extensions of PS3.5 section 6.1.2.5 and Annex H, UTF-8, and the default repertoire.
//!
//! Why not dicom-rs's text codecs: dicom-encoding 0.10 decodes a value with the codec named
//! by value 1 of (0008,0005) only, so `\ISO 2022 IR 87` (value 1 empty, as Annex H writes
//! it) is not recognised; it maps ISO 2022 IR 13 to Windows-31J (Shift_JIS) instead of the
//! 8-bit ISO 2022 form; it splits values on byte 05/12 before decoding, and 05/12 is a
//! valid byte of a JIS X 0208 character; and it writes the term back as `ISO_IR 87`, which
//! is not a defined term. So the code extension state machine lives here, and
//! `encoding_rs` (its WHATWG ISO-2022-JP codec) serves only as the JIS X 0208 table: one
//! run of two-byte characters at a time, between escape sequences this module checks.
//!
//! Supported: ISO-IR 6 (ASCII) and JIS X 0201 Romaji in G0, JIS X 0208 (ISO 2022 IR 87,
//! `ESC $ B`) in G0, JIS X 0201 katakana (ISO 2022 IR 13, `ESC ) I`) in G1 as 8-bit bytes.
//! JIS X 0212 (ISO 2022 IR 159) and every other code extension are refused.
//!
//! Invariants:
//! - Decoding never panics; an escape sequence that is unknown, truncated or names a
//!   character set that (0008,0005) does not declare is an error, as is a byte outside the
//!   active set and a value ending inside a two-byte character.
//! - The code extension state returns to the initial one (value 1 of (0008,0005)) at the
//!   delimiters `^`, `=`, `\`, CR and LF (PS3.5 6.1.2.5.3). The encoder always switches
//!   back before them and at the end of the value, so the Annex H example encodes to its
//!   exact bytes.
//! - `decode(encode(s)) == s` for every string `encode` accepts: a character the encoder
//!   could only write as a different one (WHATWG's half-width to full-width katakana,
//!   U+2212 to U+FF0D, Yen sign to Romaji) is `Unrepresentable`, never silently replaced.

use std::borrow::Cow;

const ESC: u8 = 0x1B;

/// Why text cannot be decoded or encoded. Carries offsets, never text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CharsetError {
    #[error("Specific Character Set not supported")]
    Unsupported,
    #[error("invalid or undeclared escape sequence at byte {0}")]
    InvalidEscape(usize),
    #[error("byte {0} is not valid in the active character set")]
    InvalidByte(usize),
    #[error("value ends inside a two-byte character")]
    Truncated,
    #[error("character not representable in the character set")]
    Unrepresentable,
}

/// The Japanese repertoires of (0008,0005).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Japanese {
    /// Value 1 is ISO 2022 IR 13 (or ISO_IR 13): G0 starts as JIS X 0201 Romaji and G1
    /// as JIS X 0201 katakana. Otherwise G0 starts as ISO-IR 6 and G1 is empty.
    pub jis_x0201_initial: bool,
    /// An `ISO 2022 ...` term: escape sequences are allowed.
    pub extensions: bool,
    /// ISO 2022 IR 13 is declared (`ESC ) I`, `ESC ( J`).
    pub ir13: bool,
    /// ISO 2022 IR 87 is declared (`ESC $ B`).
    pub ir87: bool,
}

/// A Specific Character Set as far as this module understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecificCharset {
    /// No (0008,0005), or empty: the default repertoire (ISO-IR 6).
    Default,
    /// `ISO_IR 192`.
    Utf8,
    Japanese(Japanese),
    /// Another single-byte term (e.g. `ISO_IR 100`); dicom-rs decodes it.
    Other(String),
}

impl SpecificCharset {
    /// The character set named by the values of (0008,0005).
    pub fn from_terms<S: AsRef<str>>(terms: &[S]) -> Result<Self, CharsetError> {
        let terms: Vec<&str> = terms
            .iter()
            .map(|t| t.as_ref().trim_matches([' ', '\0']))
            .collect();
        if terms.iter().all(|t| t.is_empty()) {
            return Ok(Self::Default);
        }
        let first = terms.first().copied().unwrap_or("");
        let iso2022 = first.is_empty() || terms.iter().any(|t| t.starts_with("ISO 2022 "));
        if !iso2022 {
            return match (first, terms.len()) {
                ("ISO_IR 192", 1) => Ok(Self::Utf8),
                ("ISO_IR 6", 1) => Ok(Self::Default),
                ("ISO_IR 13", 1) => Ok(Self::Japanese(Japanese {
                    jis_x0201_initial: true,
                    extensions: false,
                    ir13: true,
                    ir87: false,
                })),
                (other, 1) => Ok(Self::Other(other.to_string())),
                _ => Err(CharsetError::Unsupported),
            };
        }
        let mut j = Japanese {
            jis_x0201_initial: false,
            extensions: true,
            ir13: false,
            ir87: false,
        };
        for (i, term) in terms.iter().enumerate() {
            match *term {
                "" | "ISO 2022 IR 6" => {}
                "ISO 2022 IR 13" => {
                    j.ir13 = true;
                    if i == 0 {
                        j.jis_x0201_initial = true;
                    }
                }
                "ISO 2022 IR 87" => j.ir87 = true,
                _ => return Err(CharsetError::Unsupported),
            }
        }
        if !j.ir13 && !j.ir87 {
            return Ok(Self::Default);
        }
        Ok(Self::Japanese(j))
    }

    /// True when text in this set is written with ISO 2022 IR 87 (kanji) escapes.
    pub fn has_kanji(&self) -> bool {
        matches!(self, Self::Japanese(j) if j.ir87 && j.extensions)
    }
}

/// Decodes the bytes of one text value (all its values, delimiters included).
pub fn decode(bytes: &[u8], charset: &SpecificCharset) -> Result<String, CharsetError> {
    match charset {
        SpecificCharset::Default => {
            if let Some(i) = bytes.iter().position(|b| *b == ESC) {
                return Err(CharsetError::InvalidEscape(i));
            }
            if let Some(i) = bytes.iter().position(|b| !b.is_ascii()) {
                return Err(CharsetError::InvalidByte(i));
            }
            Ok(bytes.iter().map(|b| char::from(*b)).collect())
        }
        SpecificCharset::Utf8 => match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(CharsetError::InvalidByte(e.valid_up_to())),
        },
        SpecificCharset::Japanese(j) => decode_japanese(bytes, *j),
        SpecificCharset::Other(_) => Err(CharsetError::Unsupported),
    }
}

/// Encodes one text value.
pub fn encode(text: &str, charset: &SpecificCharset) -> Result<Vec<u8>, CharsetError> {
    match charset {
        SpecificCharset::Default => {
            if text.is_ascii() && !text.contains('\u{1b}') {
                Ok(text.as_bytes().to_vec())
            } else {
                Err(CharsetError::Unrepresentable)
            }
        }
        SpecificCharset::Utf8 => Ok(text.as_bytes().to_vec()),
        SpecificCharset::Japanese(j) => encode_japanese(text, *j),
        SpecificCharset::Other(_) => Err(CharsetError::Unsupported),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum G0 {
    Ascii,
    Romaji,
    Kanji,
}

fn is_reset_delimiter(b: u8) -> bool {
    matches!(b, b'^' | b'=' | b'\\' | b'\r' | b'\n')
}

fn decode_japanese(bytes: &[u8], j: Japanese) -> Result<String, CharsetError> {
    let initial_g0 = if j.jis_x0201_initial {
        G0::Romaji
    } else {
        G0::Ascii
    };
    let initial_g1 = j.jis_x0201_initial;
    let (mut g0, mut g1) = (initial_g0, initial_g1);
    let mut out = String::with_capacity(bytes.len());
    // A run of JIS X 0208 bytes and the offset where it started.
    let mut run: Vec<u8> = Vec::new();
    let mut run_start = 0;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == ESC {
            flush_kanji(&mut run, run_start, &mut out)?;
            if !j.extensions {
                return Err(CharsetError::InvalidEscape(i));
            }
            match bytes.get(i + 1..i + 3) {
                Some(b"(B") => g0 = G0::Ascii,
                Some(b"(J") if j.ir13 => g0 = G0::Romaji,
                Some(b")I") if j.ir13 => g1 = true,
                Some(b"$B") if j.ir87 => g0 = G0::Kanji,
                _ => return Err(CharsetError::InvalidEscape(i)),
            }
            i += 3;
            continue;
        }
        if b >= 0x80 {
            // 8-bit: the G1 set, JIS X 0201 katakana.
            if g1 && (0xA1..=0xDF).contains(&b) && run.len().is_multiple_of(2) {
                flush_kanji(&mut run, run_start, &mut out)?;
                out.push(char::from_u32(0xFF61 + u32::from(b - 0xA1)).unwrap_or('\u{FFFD}'));
                i += 1;
                continue;
            }
            return Err(CharsetError::InvalidByte(i));
        }
        match g0 {
            G0::Kanji => {
                if !(0x21..=0x7E).contains(&b) {
                    return Err(CharsetError::InvalidByte(i));
                }
                if run.is_empty() {
                    run_start = i;
                }
                run.push(b);
            }
            G0::Ascii | G0::Romaji => {
                let c = match (g0, b) {
                    (G0::Romaji, 0x5C) => '\u{A5}',
                    (G0::Romaji, 0x7E) => '\u{203E}',
                    _ => char::from(b),
                };
                out.push(c);
                if is_reset_delimiter(b) {
                    g0 = initial_g0;
                    g1 = initial_g1;
                }
            }
        }
        i += 1;
    }
    if run.len() % 2 == 1 {
        return Err(CharsetError::Truncated);
    }
    flush_kanji(&mut run, run_start, &mut out)?;
    Ok(out)
}

/// Decodes a run of JIS X 0208 byte pairs (0x21..=0x7E each) into `out`.
fn flush_kanji(run: &mut Vec<u8>, start: usize, out: &mut String) -> Result<(), CharsetError> {
    if run.is_empty() {
        return Ok(());
    }
    if run.len() % 2 == 1 {
        return Err(CharsetError::Truncated);
    }
    let mut framed = Vec::with_capacity(run.len() + 6);
    framed.extend_from_slice(b"\x1b$B");
    framed.extend_from_slice(run);
    framed.extend_from_slice(b"\x1b(B");
    let decoded = encoding_rs::ISO_2022_JP
        .decode_without_bom_handling_and_without_replacement(&framed)
        .ok_or(CharsetError::InvalidByte(start))?;
    out.push_str(&decoded);
    run.clear();
    Ok(())
}

/// The JIS X 0208 code of `c`, if it has one that decodes back to `c`.
fn jis_x0208(c: char) -> Option<[u8; 2]> {
    if c.is_ascii() || ('\u{FF61}'..='\u{FF9F}').contains(&c) {
        return None;
    }
    let mut buf = [0u8; 4];
    let (bytes, _, had_errors) = encoding_rs::ISO_2022_JP.encode(c.encode_utf8(&mut buf));
    if had_errors {
        return None;
    }
    let [0x1B, b'$', b'B', hi, lo, 0x1B, b'(', b'B'] = *bytes else {
        return None;
    };
    let back = encoding_rs::ISO_2022_JP
        .decode_without_bom_handling_and_without_replacement(&bytes)
        .unwrap_or(Cow::Borrowed(""));
    let mut chars = back.chars();
    (chars.next() == Some(c) && chars.next().is_none()).then_some([hi, lo])
}

fn encode_japanese(text: &str, j: Japanese) -> Result<Vec<u8>, CharsetError> {
    let initial_g0 = if j.jis_x0201_initial {
        G0::Romaji
    } else {
        G0::Ascii
    };
    let initial_g1 = j.jis_x0201_initial;
    let (mut g0, mut g1) = (initial_g0, initial_g1);
    let mut out = Vec::with_capacity(text.len() * 2);
    let back_to_initial = |out: &mut Vec<u8>, g0: &mut G0| {
        if *g0 != initial_g0 {
            out.extend_from_slice(if initial_g0 == G0::Ascii {
                b"\x1b(B"
            } else {
                b"\x1b(J"
            });
            *g0 = initial_g0;
        }
    };
    for c in text.chars() {
        let single = match (initial_g0, c) {
            (_, '\u{1b}') => None,
            (G0::Romaji, '\\' | '~') => None,
            (G0::Romaji, '\u{A5}') => Some(0x5C),
            (G0::Romaji, '\u{203E}') => Some(0x7E),
            (_, c) if c.is_ascii() => u8::try_from(c).ok(),
            _ => None,
        };
        if let Some(b) = single {
            back_to_initial(&mut out, &mut g0);
            out.push(b);
            if is_reset_delimiter(b) {
                g1 = initial_g1;
            }
            continue;
        }
        if ('\u{FF61}'..='\u{FF9F}').contains(&c) && j.ir13 {
            if !g1 {
                if !j.extensions {
                    return Err(CharsetError::Unrepresentable);
                }
                out.extend_from_slice(b"\x1b)I");
                g1 = true;
            }
            out.push(0xA1 + (u32::from(c) - 0xFF61) as u8);
            continue;
        }
        match jis_x0208(c) {
            Some(pair) if j.ir87 && j.extensions => {
                if g0 != G0::Kanji {
                    out.extend_from_slice(b"\x1b$B");
                    g0 = G0::Kanji;
                }
                out.extend_from_slice(&pair);
            }
            _ => return Err(CharsetError::Unrepresentable),
        }
    }
    back_to_initial(&mut out, &mut g0);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cs(terms: &[&str]) -> SpecificCharset {
        SpecificCharset::from_terms(terms).unwrap()
    }

    /// PS3.5 Annex H.3.1, "Yamada^Tarou=山田^太郎=やまだ^たろう" with `\ISO 2022 IR 87`.
    const H31: &[u8] =
        b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B";
    const H31_TEXT: &str = "Yamada^Tarou=山田^太郎=やまだ^たろう";

    /// PS3.5 Annex H.3.2, "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう" with
    /// `ISO 2022 IR 13\ISO 2022 IR 87`.
    const H32: &[u8] = b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J=\x1b$B$d$^$@\x1b(J^\x1b$B$?$m$&\x1b(J";
    const H32_TEXT: &str = "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう";

    #[test]
    fn annex_h_3_1_decodes_and_encodes_to_the_exact_bytes() {
        let j = cs(&["", "ISO 2022 IR 87"]);
        assert_eq!(decode(H31, &j).unwrap(), H31_TEXT);
        assert_eq!(encode(H31_TEXT, &j).unwrap(), H31);
        // The same with value 1 spelled out.
        let j6 = cs(&["ISO 2022 IR 6", "ISO 2022 IR 87"]);
        assert_eq!(encode(H31_TEXT, &j6).unwrap(), H31);
    }

    #[test]
    fn annex_h_3_2_with_half_width_katakana_in_g1() {
        let j = cs(&["ISO 2022 IR 13", "ISO 2022 IR 87"]);
        assert_eq!(decode(H32, &j).unwrap(), H32_TEXT);
        assert_eq!(encode(H32_TEXT, &j).unwrap(), H32);
    }

    #[test]
    fn katakana_designated_by_escape_lasts_until_a_delimiter() {
        let j = cs(&["", "ISO 2022 IR 13", "ISO 2022 IR 87"]);
        let bytes = b"\x1b)I\xd4\xcf^\x1b)I\xc0";
        assert_eq!(decode(bytes, &j).unwrap(), "ﾔﾏ^ﾀ");
        assert_eq!(encode("ﾔﾏ^ﾀ", &j).unwrap(), bytes);
        // After `^` G1 is empty again: a bare 8-bit byte is refused.
        assert_eq!(
            decode(b"\x1b)I\xd4^\xc0", &j),
            Err(CharsetError::InvalidByte(5))
        );
    }

    #[test]
    fn round_trips() {
        let j = cs(&["", "ISO 2022 IR 87"]);
        for s in [
            "",
            "ASCII only ^ with = delimiters",
            "山田",
            "=山田*",
            "a山b田c",
            "佐藤^花子=さとう^はなこ",
            "表示\\能力",
        ] {
            let bytes = encode(s, &j).unwrap();
            assert_eq!(decode(&bytes, &j).unwrap(), s, "{s}");
        }
        let utf8 = cs(&["ISO_IR 192"]);
        assert_eq!(
            decode(&encode("山田", &utf8).unwrap(), &utf8).unwrap(),
            "山田"
        );
    }

    #[test]
    fn jis_byte_05_12_is_not_a_value_delimiter() {
        // Some JIS X 0208 characters have 0x5C (`\\`) or 0x5E (`^`) as one of their bytes.
        let j = cs(&["", "ISO 2022 IR 87"]);
        let c = (0x21u8..=0x7E)
            .filter_map(|hi| {
                let framed = [0x1B, b'$', b'B', hi, 0x5C, 0x1B, b'(', b'B'];
                encoding_rs::ISO_2022_JP
                    .decode_without_bom_handling_and_without_replacement(&framed)
                    .map(|s| s.into_owned())
            })
            .next()
            .unwrap();
        let bytes = encode(&c, &j).unwrap();
        assert!(bytes.contains(&0x5C));
        assert_eq!(decode(&bytes, &j).unwrap(), c);
    }

    #[test]
    fn invalid_input_is_an_error_not_a_panic() {
        let j = cs(&["", "ISO 2022 IR 87"]);
        // JIS X 0212 is not supported.
        assert_eq!(
            decode(b"a\x1b$(Dxx", &j),
            Err(CharsetError::InvalidEscape(1))
        );
        // Truncated escape sequences.
        assert_eq!(decode(b"\x1b", &j), Err(CharsetError::InvalidEscape(0)));
        assert_eq!(decode(b"\x1b$", &j), Err(CharsetError::InvalidEscape(0)));
        // Katakana not declared.
        assert_eq!(decode(b"\x1b)I", &j), Err(CharsetError::InvalidEscape(0)));
        // Odd number of kanji bytes.
        assert_eq!(decode(b"\x1b$B;3E", &j), Err(CharsetError::Truncated));
        assert_eq!(decode(b"\x1b$B;3E\x1b(B", &j), Err(CharsetError::Truncated));
        // Control byte inside kanji.
        assert_eq!(decode(b"\x1b$B;\n", &j), Err(CharsetError::InvalidByte(4)));
        // Unassigned JIS X 0208 code (row 9 is empty).
        assert!(matches!(
            decode(b"\x1b$B)!\x1b(B", &j),
            Err(CharsetError::InvalidByte(3))
        ));
        // 8-bit byte without a G1 set.
        assert_eq!(decode(b"\xb1", &j), Err(CharsetError::InvalidByte(0)));
        // Escapes in the default repertoire or in single-byte ISO_IR 13.
        assert_eq!(
            decode(b"\x1b$B;3\x1b(B", &SpecificCharset::Default),
            Err(CharsetError::InvalidEscape(0))
        );
        assert_eq!(
            decode(b"\x1b$B", &cs(&["ISO_IR 13"])),
            Err(CharsetError::InvalidEscape(0))
        );
        assert!(decode(&[0xFF, 0xFE], &cs(&["ISO_IR 192"])).is_err());
    }

    #[test]
    fn characters_outside_the_set_are_unrepresentable_not_replaced() {
        let j = cs(&["", "ISO 2022 IR 87"]);
        for s in ["ﾔﾏﾀﾞ", "\u{2212}", "\u{A5}", "😀", "\u{1b}$B"] {
            assert_eq!(encode(s, &j), Err(CharsetError::Unrepresentable), "{s}");
        }
        assert_eq!(
            encode("山田", &SpecificCharset::Default),
            Err(CharsetError::Unrepresentable)
        );
    }

    /// The fuzz target's property on a deterministic sample: no panic, and what decodes
    /// survives encode and decode.
    #[test]
    fn pseudo_random_bytes_never_panic_and_round_trip() {
        let sets = [
            cs(&["", "ISO 2022 IR 87"]),
            cs(&["ISO 2022 IR 13", "ISO 2022 IR 87"]),
            cs(&["ISO_IR 13"]),
            cs(&["ISO_IR 192"]),
        ];
        // Bytes biased towards escape sequences, JIS bytes and delimiters.
        let alphabet = b"\x1b$B(J)I;3ED^=\\~\xa1\xdf\xb1 \n!~\x80";
        let mut state = 0x2545_F491_u32;
        let mut decoded = 0;
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            for _ in 0..(state % 24) {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                bytes.push(alphabet[(state as usize) % alphabet.len()]);
            }
            for set in &sets {
                if let Ok(text) = decode(&bytes, set) {
                    decoded += 1;
                    if let Ok(again) = encode(&text, set) {
                        assert_eq!(decode(&again, set).as_deref(), Ok(text.as_str()));
                    }
                }
            }
        }
        assert!(decoded > 1000, "sample too weak: {decoded}");
    }

    #[test]
    fn terms() {
        assert_eq!(cs(&[]), SpecificCharset::Default);
        assert_eq!(cs(&[""]), SpecificCharset::Default);
        assert_eq!(cs(&["ISO_IR 192"]), SpecificCharset::Utf8);
        assert_eq!(
            cs(&["ISO_IR 100"]),
            SpecificCharset::Other("ISO_IR 100".into())
        );
        assert!(cs(&["", "ISO 2022 IR 87"]).has_kanji());
        assert!(cs(&["ISO 2022 IR 6", "ISO 2022 IR 87 "]).has_kanji());
        assert!(!cs(&["ISO_IR 13"]).has_kanji());
        assert_eq!(
            SpecificCharset::from_terms(&["", "ISO 2022 IR 159"]),
            Err(CharsetError::Unsupported)
        );
        assert_eq!(
            SpecificCharset::from_terms(&["ISO_IR 100", "ISO_IR 192"]),
            Err(CharsetError::Unsupported)
        );
    }
}
