//! A push-mode structural check of a DICOM data set, fed with the bytes as they arrive.
//!
//! The C-STORE SCP streams each data set straight into the spool and never holds it whole
//! in memory, so it cannot parse it into an object. This walker instead follows the element
//! framing (tags, VRs, lengths, undefined-length sequences and items, encapsulated pixel
//! data) over any split of the input, keeping only a few bytes of state. A data set that
//! ends mid-element, nests too deep, or uses undefined length where the encoding forbids it
//! is refused before the sender hears "success". On the way it captures the top-level
//! SOP Class UID and SOP Instance UID, which must match the C-STORE command.
//!
//! Values are skipped, never interpreted; errors name offsets and tags, never values.

pub use crate::element::Encoding;
use crate::element::{self, ITEM_GROUP, UNDEFINED_LENGTH as UNDEFINED};

/// Largest inflated data set walked (a deflate bomb costs CPU only, never memory, but it
/// must end).
const MAX_INFLATED: u64 = 8 << 30;

/// Why a data set is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("data set ends inside an element or sequence (at byte {offset})")]
    Truncated { offset: u64 },
    #[error(
        "element ({group:04X},{element:04X}) at byte {offset} has undefined length, which its VR does not allow"
    )]
    UndefinedLength {
        group: u16,
        element: u16,
        offset: u64,
    },
    #[error(
        "unexpected ({group:04X},{element:04X}) at byte {offset} inside a sequence (expected an item)"
    )]
    NotAnItem {
        group: u16,
        element: u16,
        offset: u64,
    },
    #[error("delimiter ({group:04X},{element:04X}) at byte {offset} closes nothing")]
    StrayDelimiter {
        group: u16,
        element: u16,
        offset: u64,
    },
    #[error("sequences nested deeper than {max} levels at byte {offset}")]
    TooDeep { max: usize, offset: u64 },
    #[error("invalid VR bytes at byte {offset}")]
    BadVr { offset: u64 },
    #[error("deflated data set does not inflate (at inflated byte {offset})")]
    Inflate { offset: u64 },
}

/// What the walk found. `Debug` leaves the Patient ID out.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    /// Study Instance UID (0020,000D), when the data set has one: uploads batch by study.
    pub study_instance_uid: Option<String>,
    /// Patient ID (0010,0020), when the data set has one: for the audit trail's sealed
    /// record of what was received, never logged.
    pub patient_id: Option<String>,
    pub bytes: u64,
}

impl std::fmt::Debug for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Summary")
            .field("sop_class_uid", &self.sop_class_uid)
            .field("sop_instance_uid", &self.sop_instance_uid)
            .field("study_instance_uid", &self.study_instance_uid)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

const MAX_DEPTH: usize = 64;
const CAPTURE_MAX: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Inside an undefined-length sequence or encapsulated pixel data: items or a
    /// sequence delimiter come next.
    Sequence,
    /// Inside an undefined-length item: elements or an item delimiter come next.
    Item,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    SopClass,
    SopInstance,
    Study,
    Patient,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Header,
    Skip(u64),
    Capture(Capture, u32),
}

/// The walker. Feed it with [`Walker::feed`], close it with [`Walker::finish`].
#[derive(Debug)]
pub struct Walker {
    framing: Framing,
    inflater: Option<Box<Inflater>>,
}

impl Walker {
    pub fn new(enc: Encoding) -> Self {
        Self {
            framing: Framing::new(enc),
            inflater: enc.deflated.then(|| Box::new(Inflater::new())),
        }
    }

    /// Consumes the next bytes of the data set (as sent, deflated or not).
    pub fn feed(&mut self, data: &[u8]) -> Result<(), WalkError> {
        match self.inflater.as_mut() {
            None => self.framing.feed(data),
            Some(inflater) => inflater.feed(data, &mut self.framing),
        }
    }

    /// Ends the data set: it must end on an element boundary with every sequence closed
    /// (and, when deflated, with the end of the deflate stream).
    pub fn finish(mut self) -> Result<Summary, WalkError> {
        if let Some(inflater) = self.inflater.as_mut() {
            inflater.finish(&mut self.framing)?;
        }
        self.framing.finish()
    }
}

/// Streaming raw-deflate decoder in front of the framing check.
struct Inflater {
    state: flate2::Decompress,
    out: Vec<u8>,
    ended: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Inflater {
    fn new() -> Self {
        Self {
            state: flate2::Decompress::new(false),
            out: vec![0; 64 * 1024],
            ended: false,
        }
    }

    fn feed(&mut self, mut data: &[u8], framing: &mut Framing) -> Result<(), WalkError> {
        self.run(&mut data, flate2::FlushDecompress::None, framing)
    }

    fn finish(&mut self, framing: &mut Framing) -> Result<(), WalkError> {
        self.run(&mut &[][..], flate2::FlushDecompress::Finish, framing)?;
        if self.ended {
            Ok(())
        } else {
            Err(WalkError::Truncated {
                offset: framing.offset,
            })
        }
    }

    fn run(
        &mut self,
        data: &mut &[u8],
        flush: flate2::FlushDecompress,
        framing: &mut Framing,
    ) -> Result<(), WalkError> {
        loop {
            if self.ended {
                // Bytes after the end of the stream are padding (an even-length PDV).
                return Ok(());
            }
            let (before_in, before_out) = (self.state.total_in(), self.state.total_out());
            let status = self
                .state
                .decompress(data, &mut self.out, flush)
                .map_err(|_| WalkError::Inflate {
                    offset: framing.offset,
                })?;
            let consumed = (self.state.total_in() - before_in) as usize;
            let produced = (self.state.total_out() - before_out) as usize;
            *data = data.get(consumed..).unwrap_or_default();
            if self.state.total_out() > MAX_INFLATED {
                return Err(WalkError::Inflate {
                    offset: framing.offset,
                });
            }
            framing.feed(self.out.get(..produced).unwrap_or_default())?;
            if status == flate2::Status::StreamEnd {
                self.ended = true;
            }
            // Done with this input only once it is all consumed and the inflater had no
            // more output than fits (it may hand out buffered output without consuming
            // input: that is progress, not the end).
            if data.is_empty() && produced < self.out.len() {
                return Ok(());
            }
            if consumed == 0 && produced == 0 {
                // No progress with input left and room for output: the stream is stuck.
                return Err(WalkError::Inflate {
                    offset: framing.offset,
                });
            }
        }
    }
}

/// The framing state machine over plain (inflated) bytes.
#[derive(Debug, Clone)]
struct Framing {
    enc: Encoding,
    state: State,
    header: [u8; 12],
    have: usize,
    stack: Vec<Frame>,
    offset: u64,
    element_offset: u64,
    captured: Vec<u8>,
    summary: Summary,
}

impl Framing {
    fn new(enc: Encoding) -> Self {
        Self {
            enc,
            state: State::Header,
            header: [0; 12],
            have: 0,
            stack: Vec::new(),
            offset: 0,
            element_offset: 0,
            captured: Vec::new(),
            summary: Summary::default(),
        }
    }

    fn feed(&mut self, mut data: &[u8]) -> Result<(), WalkError> {
        while !data.is_empty() {
            match self.state {
                State::Skip(n) => {
                    let take = n.min(data.len() as u64);
                    self.take(take as usize, &mut data);
                    self.state = if n == take {
                        State::Header
                    } else {
                        State::Skip(n - take)
                    };
                }
                State::Capture(which, n) => {
                    let piece = self.take(n as usize, &mut data);
                    let take = piece.len();
                    self.captured.extend_from_slice(piece);
                    if take == n as usize {
                        let text = String::from_utf8_lossy(&self.captured)
                            .trim_end_matches(['\0', ' '])
                            .to_string();
                        match which {
                            Capture::SopClass => self.summary.sop_class_uid = Some(text),
                            Capture::SopInstance => self.summary.sop_instance_uid = Some(text),
                            Capture::Study => self.summary.study_instance_uid = Some(text),
                            Capture::Patient => self.summary.patient_id = Some(text),
                        }
                        self.captured.clear();
                        self.state = State::Header;
                    } else {
                        self.state = State::Capture(which, n - take as u32);
                    }
                }
                State::Header => {
                    if self.have == 0 {
                        self.element_offset = self.offset;
                    }
                    let need = self.header_len();
                    let piece = self.take(need.saturating_sub(self.have), &mut data);
                    let Some(slot) = self.header.get_mut(self.have..self.have + piece.len()) else {
                        // Not reached: a header is at most as long as the buffer.
                        return Err(WalkError::Truncated {
                            offset: self.offset,
                        });
                    };
                    slot.copy_from_slice(piece);
                    self.have += piece.len();
                    if self.have == need && need == self.header_len() {
                        self.have = 0;
                        self.on_header()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Summary, WalkError> {
        if self.state != State::Header || self.have != 0 || !self.stack.is_empty() {
            return Err(WalkError::Truncated {
                offset: self.offset,
            });
        }
        let mut summary = self.summary;
        summary.bytes = self.offset;
        Ok(summary)
    }

    /// Takes up to `n` bytes off the front of `data`, counting them.
    fn take<'d>(&mut self, n: usize, data: &mut &'d [u8]) -> &'d [u8] {
        let (head, rest) = data.split_at_checked(n).unwrap_or((data, &[]));
        self.offset += head.len() as u64;
        *data = rest;
        head
    }

    /// Bytes of the header being read: 8, or 12 once an explicit long-form VR is seen.
    fn header_len(&self) -> usize {
        element::header_len(self.header.get(..self.have).unwrap_or_default(), self.enc)
    }

    fn on_header(&mut self) -> Result<(), WalkError> {
        let offset = self.element_offset;
        let Some(header) = element::read_header(&self.header, self.enc) else {
            // Not reached: `feed` calls this with the whole header buffered.
            return Err(WalkError::Truncated { offset });
        };
        let (group, element) = (header.group, header.element);
        if group == ITEM_GROUP {
            return self.on_delimitation(element, header.len, offset);
        }
        if self.stack.last() == Some(&Frame::Sequence) {
            return Err(WalkError::NotAnItem {
                group,
                element,
                offset,
            });
        }
        let len = header.len;
        let may_be_undefined = match header.vr {
            Some(vr) => {
                if !vr.iter().all(u8::is_ascii_uppercase) {
                    return Err(WalkError::BadVr { offset });
                }
                element::is_long_vr(vr) && matches!(&vr, b"SQ" | b"OB" | b"OW" | b"UN")
            }
            None => true,
        };
        if len == UNDEFINED {
            if !may_be_undefined {
                return Err(WalkError::UndefinedLength {
                    group,
                    element,
                    offset,
                });
            }
            return self.push(Frame::Sequence, offset);
        }
        let capture = match (self.stack.is_empty(), group, element) {
            (true, 0x0008, 0x0016) => Some(Capture::SopClass),
            (true, 0x0008, 0x0018) => Some(Capture::SopInstance),
            (true, 0x0020, 0x000D) => Some(Capture::Study),
            (true, 0x0010, 0x0020) => Some(Capture::Patient),
            _ => None,
        };
        self.state = match capture {
            Some(which) if len <= CAPTURE_MAX && len > 0 => State::Capture(which, len),
            _ if len == 0 => State::Header,
            _ => State::Skip(u64::from(len)),
        };
        Ok(())
    }

    fn on_delimitation(&mut self, element: u16, len: u32, offset: u64) -> Result<(), WalkError> {
        let stray = WalkError::StrayDelimiter {
            group: 0xFFFE,
            element,
            offset,
        };
        match (element, self.stack.last()) {
            // Item start, inside a sequence.
            (0xE000, Some(Frame::Sequence)) => {
                if len == UNDEFINED {
                    self.push(Frame::Item, offset)
                } else {
                    self.state = if len == 0 {
                        State::Header
                    } else {
                        State::Skip(u64::from(len))
                    };
                    Ok(())
                }
            }
            // Item delimitation, closing an undefined-length item.
            (0xE00D, Some(Frame::Item)) => {
                self.stack.pop();
                Ok(())
            }
            // Sequence delimitation, closing an undefined-length sequence.
            (0xE0DD, Some(Frame::Sequence)) => {
                self.stack.pop();
                Ok(())
            }
            _ => Err(stray),
        }
    }

    fn push(&mut self, frame: Frame, offset: u64) -> Result<(), WalkError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(WalkError::TooDeep {
                max: MAX_DEPTH,
                offset,
            });
        }
        self.stack.push(frame);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const EXPLICIT_LE: Encoding = Encoding::EXPLICIT_LE;
    const IMPLICIT_LE: Encoding = Encoding::IMPLICIT_LE;

    fn short(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(tag.0.to_le_bytes());
        v.extend(tag.1.to_le_bytes());
        v.extend(vr);
        v.extend((value.len() as u16).to_le_bytes());
        v.extend(value);
        v
    }

    fn long(tag: (u16, u16), vr: &[u8; 2], len: u32, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(tag.0.to_le_bytes());
        v.extend(tag.1.to_le_bytes());
        v.extend(vr);
        v.extend([0, 0]);
        v.extend(len.to_le_bytes());
        v.extend(value);
        v
    }

    fn delim(element: u16, len: u32) -> Vec<u8> {
        let mut v = vec![0xFE, 0xFF];
        v.extend(element.to_le_bytes());
        v.extend(len.to_le_bytes());
        v
    }

    fn sample() -> Vec<u8> {
        let mut d = Vec::new();
        d.extend(short(
            (0x0008, 0x0016),
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.2\0",
        ));
        d.extend(short((0x0008, 0x0018), b"UI", b"1.2.3.4.5.6"));
        d.extend(short((0x0010, 0x0010), b"PN", b"DOE^JANE"));
        d.extend(short((0x0010, 0x0020), b"LO", b"PID-0042"));
        d.extend(short((0x0020, 0x000D), b"UI", b"1.2.3.9\0"));
        // Undefined-length sequence with one undefined-length item holding two elements
        // (a nested Study Instance UID must not be taken for the data set's own).
        d.extend(long((0x0040, 0x0275), b"SQ", UNDEFINED, &[]));
        d.extend(delim(0xE000, UNDEFINED));
        d.extend(short((0x0020, 0x000D), b"UI", b"9.9\0"));
        d.extend(short((0x0040, 0x0007), b"LO", b"ABDOMEN "));
        d.extend(delim(0xE00D, 0));
        d.extend(delim(0xE0DD, 0));
        // Encapsulated pixel data: empty offset table, one fragment.
        d.extend(long((0x7FE0, 0x0010), b"OB", UNDEFINED, &[]));
        d.extend(delim(0xE000, 0));
        d.extend(delim(0xE000, 4));
        d.extend([1, 2, 3, 4]);
        d.extend(delim(0xE0DD, 0));
        d
    }

    fn walk(enc: Encoding, data: &[u8], split: usize) -> Result<Summary, WalkError> {
        let mut w = Walker::new(enc);
        for piece in data.chunks(split.max(1)) {
            w.feed(piece)?;
        }
        w.finish()
    }

    #[test]
    fn well_formed_data_set_passes_under_every_split_and_captures_uids() {
        let d = sample();
        for split in [1, 2, 3, 7, 11, 64, d.len()] {
            let s = walk(EXPLICIT_LE, &d, split).unwrap();
            assert_eq!(
                s.sop_class_uid.as_deref(),
                Some("1.2.840.10008.5.1.4.1.1.2")
            );
            assert_eq!(s.sop_instance_uid.as_deref(), Some("1.2.3.4.5.6"));
            assert_eq!(s.study_instance_uid.as_deref(), Some("1.2.3.9"));
            assert_eq!(s.patient_id.as_deref(), Some("PID-0042"));
            assert!(!format!("{s:?}").contains("PID-0042"));
            assert_eq!(s.bytes, d.len() as u64);
        }
    }

    #[test]
    fn every_strict_prefix_is_refused() {
        let d = sample();
        for cut in 1..d.len() {
            // A prefix ending on a top-level element boundary (after the UIDs, the name, the
            // patient id, the study, the closed sequence) is a valid shorter data set.
            let boundary = [34, 53, 69, 85, 101, 165].contains(&cut);
            let r = walk(EXPLICIT_LE, &d[..cut], 5);
            assert_eq!(r.is_ok(), boundary, "prefix of {cut} bytes: {r:?}");
        }
    }

    #[test]
    fn huge_declared_length_with_short_body_is_truncated() {
        let mut d = short((0x0008, 0x0018), b"UI", b"1.2.3");
        d.extend(long((0x7FE0, 0x0010), b"OB", 0x7FFF_0000, &[0; 10]));
        assert!(matches!(
            walk(EXPLICIT_LE, &d, 4096),
            Err(WalkError::Truncated { .. })
        ));
    }

    #[test]
    fn undefined_length_on_a_short_vr_is_refused() {
        let mut d = long((0x0010, 0x0010), b"UT", UNDEFINED, &[]);
        d.extend(delim(0xE0DD, 0));
        assert!(matches!(
            walk(EXPLICIT_LE, &d, 3),
            Err(WalkError::UndefinedLength { .. })
        ));
    }

    #[test]
    fn stray_delimiters_and_non_items_in_sequences_are_refused() {
        assert!(matches!(
            walk(EXPLICIT_LE, &delim(0xE0DD, 0), 8),
            Err(WalkError::StrayDelimiter { .. })
        ));
        let mut d = long((0x0040, 0x0275), b"SQ", UNDEFINED, &[]);
        d.extend(short((0x0010, 0x0010), b"PN", b"X "));
        assert!(matches!(
            walk(EXPLICIT_LE, &d, 8),
            Err(WalkError::NotAnItem { .. })
        ));
    }

    #[test]
    fn garbage_vr_is_refused() {
        let d = [0x08, 0x00, 0x18, 0x00, 0x01, 0x02, 0x00, 0x00];
        assert!(matches!(
            walk(EXPLICIT_LE, &d, 8),
            Err(WalkError::BadVr { .. })
        ));
    }

    #[test]
    fn nesting_is_bounded() {
        let mut d = Vec::new();
        for _ in 0..40 {
            d.extend(long((0x0040, 0x0275), b"SQ", UNDEFINED, &[]));
            d.extend(delim(0xE000, UNDEFINED));
        }
        assert!(matches!(
            walk(EXPLICIT_LE, &d, 100),
            Err(WalkError::TooDeep { .. })
        ));
    }

    #[test]
    fn implicit_vr_sequences_are_followed() {
        let mut d = Vec::new();
        d.extend([0x08, 0x00, 0x18, 0x00]);
        d.extend(6u32.to_le_bytes());
        d.extend(b"1.2.3\0");
        d.extend([0x40, 0x00, 0x75, 0x02]);
        d.extend(UNDEFINED.to_le_bytes());
        d.extend(delim(0xE000, 8));
        d.extend([0x10, 0x00, 0x10, 0x00, 0, 0, 0, 0]);
        d.extend(delim(0xE0DD, 0));
        let s = walk(IMPLICIT_LE, &d, 3).unwrap();
        assert_eq!(s.sop_instance_uid.as_deref(), Some("1.2.3"));
        assert!(walk(IMPLICIT_LE, &d[..d.len() - 8], 3).is_err());
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn deflated_data_set_is_inflated_and_walked_under_every_split() {
        let enc = Encoding::of_transfer_syntax("1.2.840.10008.1.2.1.99");
        let mut plain = sample();
        plain.extend(long((0x7FE1, 0x0010), b"OB", 200_000, &[7; 200_000]));
        let mut z = deflate(&plain);
        z.push(0); // even-length padding after the end of the stream
        for split in [1, 7, 1000, z.len()] {
            let s = walk(enc, &z, split).unwrap();
            assert_eq!(s.sop_instance_uid.as_deref(), Some("1.2.3.4.5.6"));
            assert_eq!(s.bytes, plain.len() as u64);
        }
    }

    #[test]
    fn deflated_data_set_that_barely_compresses_is_walked_in_large_feeds() {
        // 12-bit noise compresses about 2:1: a 64 KiB feed inflates to more than the
        // inflater's buffer, and the inflater may hand out buffered output without
        // consuming input. Every split must still walk the whole data set.
        let enc = Encoding::of_transfer_syntax("1.2.840.10008.1.2.1.99");
        let mut noise = Vec::with_capacity(512 * 1024);
        let mut x: u32 = 12345;
        while noise.len() < 512 * 1024 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            noise.extend_from_slice(&(((x >> 16) & 0x0FFF) as u16).to_le_bytes());
        }
        let mut plain = sample();
        plain.extend(long((0x7FE1, 0x0010), b"OB", noise.len() as u32, &noise));
        let z = deflate(&plain);
        for split in [64 * 1024, 65_000, 16 * 1024, 4096, z.len()] {
            let s = walk(enc, &z, split).unwrap_or_else(|e| panic!("split {split}: {e}"));
            assert_eq!(s.bytes, plain.len() as u64, "split {split}");
        }
    }

    #[test]
    fn truncated_or_corrupt_deflate_stream_is_refused() {
        let enc = Encoding::of_transfer_syntax("1.2.840.10008.1.2.1.99");
        let z = deflate(&sample());
        assert!(walk(enc, &z[..z.len() / 2], 16).is_err());
        assert!(walk(enc, &[0xFF; 64], 16).is_err());
        // Well-formed deflate of a malformed data set is still refused.
        let bad = deflate(&long((0x7FE0, 0x0010), b"OB", 1000, &[0; 10]));
        assert!(matches!(
            walk(enc, &bad, 16),
            Err(WalkError::Truncated { .. })
        ));
    }

    #[test]
    fn big_endian_lengths_are_read_big_endian() {
        let d = [
            0x00, 0x08, 0x00, 0x18, b'U', b'I', 0x00, 0x04, b'1', b'.', b'2', 0,
        ];
        let s = walk(Encoding::of_transfer_syntax("1.2.840.10008.1.2.2"), &d, 5).unwrap();
        assert_eq!(s.sop_instance_uid.as_deref(), Some("1.2"));
    }
}
