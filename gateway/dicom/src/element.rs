//! The one reader of DICOM element headers (PS3.5 section 7.1): tag, VR (explicit VR only)
//! and value length, in the byte order of the transfer syntax.
//!
//! - Implicit VR: tag (4 bytes) and a 4-byte length: 8 bytes.
//! - Explicit VR: tag, VR, and a 2-byte length (8 bytes), or, for the long-form VRs
//!   ([`is_long_vr`]: OB, OW, OF, SQ, UT, UN, ...), two reserved bytes and a 4-byte length
//!   (12 bytes).
//! - Items and delimiters (group FFFE) have a tag and a 4-byte length in every encoding.
//!
//! The walker (streaming framing check) and the worklist identifier checks read every
//! header through [`read_header`]; nothing here interprets values, and nothing panics on
//! any input (short input is `None`).

/// How a data set is encoded (from the presentation context's transfer syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    pub explicit_vr: bool,
    pub big_endian: bool,
    /// The whole data set is a raw deflate (RFC 1951) stream of Explicit VR LE.
    pub deflated: bool,
}

impl Encoding {
    pub const IMPLICIT_LE: Self = Self {
        explicit_vr: false,
        big_endian: false,
        deflated: false,
    };
    pub const EXPLICIT_LE: Self = Self {
        explicit_vr: true,
        big_endian: false,
        deflated: false,
    };

    /// The encoding of a transfer syntax UID. Every transfer syntax other than the native
    /// ones below encodes its data set as Explicit VR Little Endian (compressed pixel data
    /// sits in encapsulated fragments, which the walker follows).
    pub fn of_transfer_syntax(uid: &str) -> Self {
        match uid.trim_end_matches(['\0', ' ']) {
            "1.2.840.10008.1.2" => Self::IMPLICIT_LE,
            "1.2.840.10008.1.2.2" => Self {
                big_endian: true,
                ..Self::EXPLICIT_LE
            },
            "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.4.95" => Self {
                deflated: true,
                ..Self::EXPLICIT_LE
            },
            _ => Self::EXPLICIT_LE,
        }
    }

    fn u16(self, b: [u8; 2]) -> u16 {
        if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32(self, b: [u8; 4]) -> u32 {
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }
}

/// The group of items and delimiters (FFFE,E000), (FFFE,E00D), (FFFE,E0DD).
pub const ITEM_GROUP: u16 = 0xFFFE;
/// The undefined length (FFFFFFFFH).
pub const UNDEFINED_LENGTH: u32 = 0xFFFF_FFFF;
/// Bytes of a header with a 2-byte length, of an implicit VR header, and of an item or
/// delimiter.
pub const SHORT_HEADER: usize = 8;
/// Bytes of an explicit VR header of a long-form VR.
pub const LONG_HEADER: usize = 12;

/// One element (or item, or delimiter) header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElementHeader {
    pub group: u16,
    pub element: u16,
    /// The VR bytes as sent (explicit VR, and not an item or delimiter); not checked.
    pub vr: Option<[u8; 2]>,
    /// The value length, [`UNDEFINED_LENGTH`] included.
    pub len: u32,
    /// Bytes of the header: [`SHORT_HEADER`] or [`LONG_HEADER`].
    pub header_len: usize,
}

/// Whether an explicit VR has the long form (2 reserved bytes, 4-byte length).
pub fn is_long_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

fn pair(b: &[u8], at: usize) -> Option<[u8; 2]> {
    b.get(at..at.checked_add(2)?)?.try_into().ok()
}

fn quad(b: &[u8], at: usize) -> Option<[u8; 4]> {
    b.get(at..at.checked_add(4)?)?.try_into().ok()
}

/// How many bytes the header starting with `prefix` has: [`LONG_HEADER`] once the prefix
/// (6 bytes or more) shows an explicit long-form VR, [`SHORT_HEADER`] otherwise. For a
/// reader that gets the header piecewise.
pub fn header_len(prefix: &[u8], enc: Encoding) -> usize {
    let long = enc.explicit_vr
        && pair(prefix, 0).is_some_and(|g| enc.u16(g) != ITEM_GROUP)
        && pair(prefix, 4).is_some_and(is_long_vr);
    if long { LONG_HEADER } else { SHORT_HEADER }
}

/// The header at the start of `bytes`; `None` when `bytes` is shorter than the header.
pub fn read_header(bytes: &[u8], enc: Encoding) -> Option<ElementHeader> {
    let group = enc.u16(pair(bytes, 0)?);
    let element = enc.u16(pair(bytes, 2)?);
    let vr = pair(bytes, 4)?;
    let (vr, len, header_len) = if group == ITEM_GROUP || !enc.explicit_vr {
        (None, enc.u32(quad(bytes, 4)?), SHORT_HEADER)
    } else if is_long_vr(vr) {
        (Some(vr), enc.u32(quad(bytes, 8)?), LONG_HEADER)
    } else {
        (Some(vr), u32::from(enc.u16(pair(bytes, 6)?)), SHORT_HEADER)
    };
    Some(ElementHeader {
        group,
        element,
        vr,
        len,
        header_len,
    })
}

/// The header at `pos` of `bytes` (see [`read_header`]).
pub fn read_header_at(bytes: &[u8], pos: usize, enc: Encoding) -> Option<ElementHeader> {
    read_header(bytes.get(pos..)?, enc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_short_and_long_forms() {
        let short = [0x10, 0x00, 0x10, 0x00, b'P', b'N', 0x04, 0x00];
        let h = read_header(&short, Encoding::EXPLICIT_LE).unwrap();
        assert_eq!(
            (h.group, h.element, h.vr, h.len),
            (0x10, 0x10, Some(*b"PN"), 4)
        );
        assert_eq!(h.header_len, SHORT_HEADER);
        assert_eq!(header_len(&short[..6], Encoding::EXPLICIT_LE), SHORT_HEADER);

        let long = [0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 1, 0, 0, 0];
        assert_eq!(header_len(&long[..5], Encoding::EXPLICIT_LE), SHORT_HEADER);
        assert_eq!(header_len(&long[..6], Encoding::EXPLICIT_LE), LONG_HEADER);
        assert_eq!(read_header(&long[..11], Encoding::EXPLICIT_LE), None);
        let h = read_header(&long, Encoding::EXPLICIT_LE).unwrap();
        assert_eq!((h.vr, h.len, h.header_len), (Some(*b"OB"), 1, LONG_HEADER));
    }

    #[test]
    fn items_and_implicit_vr_have_a_4_byte_length() {
        let item = [0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF];
        for enc in [Encoding::EXPLICIT_LE, Encoding::IMPLICIT_LE] {
            let h = read_header(&item, enc).unwrap();
            assert_eq!((h.group, h.element, h.vr), (ITEM_GROUP, 0xE000, None));
            assert_eq!((h.len, h.header_len), (UNDEFINED_LENGTH, SHORT_HEADER));
            assert_eq!(header_len(&item, enc), SHORT_HEADER);
        }
        let implicit = [0x08, 0x00, 0x18, 0x00, 6, 0, 0, 0];
        let h = read_header(&implicit, Encoding::IMPLICIT_LE).unwrap();
        assert_eq!((h.vr, h.len), (None, 6));
    }

    #[test]
    fn big_endian_is_read_big_endian() {
        let be = Encoding::of_transfer_syntax("1.2.840.10008.1.2.2");
        let h = read_header(&[0x00, 0x08, 0x00, 0x18, b'U', b'I', 0x00, 0x04], be).unwrap();
        assert_eq!((h.group, h.element, h.len), (0x0008, 0x0018, 4));
        assert_eq!(read_header_at(&[0; 8], 9, be), None);
    }
}
