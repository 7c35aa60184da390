//! MLLP framing (HL7 v2 Minimal Lower Layer Protocol, release 1/2 block format):
//! `0x0B payload 0x1C 0x0D`.
//!
//! [`MllpDecoder`] is push-mode and sans-IO: [`MllpDecoder::feed`] bytes as they arrive, then
//! drain [`MllpDecoder::next_event`] until it returns `None`; call [`MllpDecoder::finish`] at
//! end of stream and drain again.
//!
//! Rules (every one is independent of how the input is split into `feed` calls; a unit test
//! and the `mllp_split` fuzz target check that):
//! - Bytes outside a frame (before a `0x0B`) are skipped and reported once, as
//!   [`MllpEvent::Garbage`], when the next `0x0B` arrives or at [`MllpDecoder::finish`]. A lone
//!   `0x0D` or `0x0A` after a complete frame counts as garbage too (it is not part of a frame).
//! - A frame ends at `0x1C`. The end is accepted when the `0x1C` is followed by `0x0D` (the
//!   standard trailer, consumed), by `0x0B` (missing CR tolerated: the `0x0B` starts the next
//!   frame) or by end of stream ([`MllpDecoder::finish`]). A `0x1C` that is the last buffered
//!   byte therefore waits for the next byte or for `finish`.
//! - A `0x1C` followed by any other byte is a broken trailer: the frame is *not* delivered; its
//!   bytes (with `0x0B` and `0x1C`), the offending byte and whatever follows up to the next
//!   `0x0B` are reported as one [`MllpEvent::Garbage`].
//! - A `0x0B` inside a frame means the sender started over: the partial frame (with its
//!   `0x0B`) is reported as [`MllpEvent::Garbage`] and a new frame starts.
//! - A payload longer than `max_frame` bytes is discarded (never buffered past `max_frame`)
//!   up to its `0x1C` (trailer rules as above) or the next `0x0B`, and reported once as
//!   [`MllpEvent::Oversized`] with the payload length seen, when it ends.
//! - At [`MllpDecoder::finish`], a frame without its `0x1C` is reported as
//!   [`MllpEvent::Garbage`] (payload + `0x0B`); an oversized one as [`MllpEvent::Oversized`].
//!
//! Memory: the frame buffer never exceeds `max_frame` bytes; input given to `feed` is kept only
//! until `next_event` has consumed it, so a caller that drains events after every `feed`
//! holds at most `max_frame` + one read buffer.

use std::fmt;

/// Start of block (VT).
pub const START_BLOCK: u8 = 0x0B;
/// End of block (FS).
pub const END_BLOCK: u8 = 0x1C;
/// Trailer after the end of block (CR).
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// What the decoder found in the byte stream.
#[derive(Clone, PartialEq, Eq)]
pub enum MllpEvent {
    /// One complete payload, without `0x0B`, `0x1C` and `0x0D`.
    Frame(Vec<u8>),
    /// Bytes skipped outside any acceptable frame (resynchronised at the next `0x0B`).
    Garbage {
        /// How many bytes of the stream were skipped.
        bytes: usize,
    },
    /// A payload longer than the maximum, discarded.
    Oversized {
        /// Payload bytes seen (without `0x0B`, `0x1C`, `0x0D`).
        bytes: usize,
    },
}

/// Never prints the payload (patient data): only its length.
impl fmt::Debug for MllpEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Frame(p) => write!(f, "Frame({} bytes)", p.len()),
            Self::Garbage { bytes } => write!(f, "Garbage {{ bytes: {bytes} }}"),
            Self::Oversized { bytes } => write!(f, "Oversized {{ bytes: {bytes} }}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Outside a frame; `garbage` bytes skipped since the last event.
    Idle { garbage: usize },
    /// Inside a frame; payload in `buf`.
    InFrame,
    /// Saw `0x1C`; payload in `buf`.
    AfterEnd,
    /// Inside an oversized frame; `seen` payload bytes so far.
    Discarding { seen: usize },
    /// Saw `0x1C` ending an oversized frame.
    DiscardAfterEnd { seen: usize },
}

/// Push-mode MLLP decoder. See the module docs for the framing rules.
pub struct MllpDecoder {
    max_frame: usize,
    state: State,
    buf: Vec<u8>,
    pending: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl fmt::Debug for MllpDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MllpDecoder")
            .field("max_frame", &self.max_frame)
            .field("state", &self.state)
            .field("buffered", &self.buf.len())
            .field("pending", &(self.pending.len() - self.pos))
            .field("eof", &self.eof)
            .finish()
    }
}

impl MllpDecoder {
    /// A decoder that accepts payloads of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            state: State::Idle { garbage: 0 },
            buf: Vec::new(),
            pending: Vec::new(),
            pos: 0,
            eof: false,
        }
    }

    /// The maximum payload size.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Bytes held by the decoder: the partial frame plus input not yet consumed by
    /// [`Self::next_event`].
    pub fn buffered(&self) -> usize {
        self.buf.len() + (self.pending.len() - self.pos)
    }

    /// Adds received bytes. Drain [`Self::next_event`] afterwards. Bytes fed after
    /// [`Self::finish`] start a new stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.eof = false;
        if self.pos == self.pending.len() {
            self.pending.clear();
        } else {
            self.pending.drain(..self.pos);
        }
        self.pos = 0;
        self.pending.extend_from_slice(data);
    }

    /// Marks the end of the stream: pending partial state is reported by the next calls to
    /// [`Self::next_event`].
    pub fn finish(&mut self) {
        self.eof = true;
    }

    /// The next event, or `None` when more input (or [`Self::finish`]) is needed.
    pub fn next_event(&mut self) -> Option<MllpEvent> {
        while self.pos < self.pending.len() {
            if let Some(ev) = self.step() {
                return Some(ev);
            }
        }
        if self.eof {
            return self.flush();
        }
        None
    }

    /// Consumes at least one pending byte; returns an event if one completed.
    fn step(&mut self) -> Option<MllpEvent> {
        let rest = self.pending.get(self.pos..).unwrap_or_default();
        let &b = rest.first()?;
        match self.state {
            State::Idle { garbage } => {
                // Skip everything up to the next start block in one go.
                match rest.iter().position(|&x| x == START_BLOCK) {
                    Some(i) => {
                        self.pos += i + 1;
                        let garbage = garbage.saturating_add(i);
                        self.start_frame();
                        (garbage > 0).then_some(MllpEvent::Garbage { bytes: garbage })
                    }
                    None => {
                        self.pos += rest.len();
                        self.state = State::Idle {
                            garbage: garbage.saturating_add(rest.len()),
                        };
                        None
                    }
                }
            }
            State::InFrame => {
                let stop = rest
                    .iter()
                    .position(|&x| x == START_BLOCK || x == END_BLOCK)
                    .unwrap_or(rest.len());
                let room = self.max_frame.saturating_sub(self.buf.len());
                if stop > room {
                    // Oversized: stop buffering, free the memory, count from here on.
                    let seen = self.buf.len().saturating_add(stop);
                    self.buf = Vec::new();
                    self.pos += stop;
                    self.state = State::Discarding { seen };
                    return None;
                }
                self.buf
                    .extend_from_slice(rest.get(..stop).unwrap_or_default());
                self.pos += stop;
                match rest.get(stop) {
                    Some(&START_BLOCK) => {
                        self.pos += 1;
                        let bytes = self.buf.len().saturating_add(1);
                        self.start_frame();
                        Some(MllpEvent::Garbage { bytes })
                    }
                    Some(&END_BLOCK) => {
                        self.pos += 1;
                        self.state = State::AfterEnd;
                        None
                    }
                    _ => None,
                }
            }
            State::AfterEnd => match b {
                CARRIAGE_RETURN => {
                    self.pos += 1;
                    self.state = State::Idle { garbage: 0 };
                    Some(MllpEvent::Frame(std::mem::take(&mut self.buf)))
                }
                START_BLOCK => {
                    self.pos += 1;
                    let frame = std::mem::take(&mut self.buf);
                    self.start_frame();
                    Some(MllpEvent::Frame(frame))
                }
                _ => {
                    // Broken trailer: the whole block is garbage, and so is this byte.
                    self.pos += 1;
                    let garbage = self.buf.len().saturating_add(3);
                    self.buf.clear();
                    self.state = State::Idle { garbage };
                    None
                }
            },
            State::Discarding { seen } => {
                match rest
                    .iter()
                    .position(|&x| x == START_BLOCK || x == END_BLOCK)
                {
                    Some(i) => {
                        self.pos += i + 1;
                        let seen = seen.saturating_add(i);
                        if rest.get(i) == Some(&START_BLOCK) {
                            self.start_frame();
                            Some(MllpEvent::Oversized { bytes: seen })
                        } else {
                            self.state = State::DiscardAfterEnd { seen };
                            None
                        }
                    }
                    None => {
                        self.pos += rest.len();
                        self.state = State::Discarding {
                            seen: seen.saturating_add(rest.len()),
                        };
                        None
                    }
                }
            }
            State::DiscardAfterEnd { seen } => {
                self.pos += 1;
                match b {
                    CARRIAGE_RETURN => self.state = State::Idle { garbage: 0 },
                    START_BLOCK => self.start_frame(),
                    _ => self.state = State::Idle { garbage: 1 },
                }
                Some(MllpEvent::Oversized { bytes: seen })
            }
        }
    }

    fn start_frame(&mut self) {
        self.buf.clear();
        self.state = State::InFrame;
    }

    /// End of stream with no pending input left.
    fn flush(&mut self) -> Option<MllpEvent> {
        let state = std::mem::replace(&mut self.state, State::Idle { garbage: 0 });
        match state {
            State::Idle { garbage: 0 } => None,
            State::Idle { garbage } => Some(MllpEvent::Garbage { bytes: garbage }),
            State::InFrame => {
                let bytes = self.buf.len().saturating_add(1);
                self.buf = Vec::new();
                Some(MllpEvent::Garbage { bytes })
            }
            State::AfterEnd => Some(MllpEvent::Frame(std::mem::take(&mut self.buf))),
            State::Discarding { seen } | State::DiscardAfterEnd { seen } => {
                Some(MllpEvent::Oversized { bytes: seen })
            }
        }
    }
}

/// Wraps a payload in an MLLP block: `0x0B payload 0x1C 0x0D`.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 3);
    out.push(START_BLOCK);
    out.extend_from_slice(payload);
    out.push(END_BLOCK);
    out.push(CARRIAGE_RETURN);
    out
}

/// Feeds `data` cut at `cuts` (positions, clamped and made monotonic), finishes, and returns
/// every event. Used by the split-invariance tests and the `mllp_split` fuzz target.
pub fn decode_all(max_frame: usize, data: &[u8], cuts: &[usize]) -> Vec<MllpEvent> {
    let mut d = MllpDecoder::new(max_frame);
    let mut events = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        let end = cut.clamp(start, data.len());
        d.feed(data.get(start..end).unwrap_or_default());
        while let Some(ev) = d.next_event() {
            events.push(ev);
        }
        start = end;
    }
    d.feed(data.get(start..).unwrap_or_default());
    d.finish();
    while let Some(ev) = d.next_event() {
        events.push(ev);
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(p: &[u8]) -> MllpEvent {
        MllpEvent::Frame(p.to_vec())
    }

    /// Every single cut point and every pair of cut points give the same events as one feed.
    fn assert_split_invariant(max: usize, data: &[u8]) -> Vec<MllpEvent> {
        let whole = decode_all(max, data, &[]);
        for i in 0..=data.len() {
            assert_eq!(decode_all(max, data, &[i]), whole, "cut at {i}");
        }
        for i in 0..=data.len() {
            for j in i..=data.len() {
                assert_eq!(decode_all(max, data, &[i, j]), whole, "cuts at {i},{j}");
            }
        }
        let bytewise: Vec<usize> = (0..=data.len()).collect();
        assert_eq!(decode_all(max, data, &bytewise), whole, "byte by byte");
        whole
    }

    #[test]
    fn standard_frame_is_delivered_without_framing_bytes() {
        let ev = assert_split_invariant(100, b"\x0bMSH|^~\\&|A\r\x1c\x0d");
        assert_eq!(ev, vec![frame(b"MSH|^~\\&|A\r")]);
    }

    #[test]
    fn pipelined_frames_on_one_stream_come_out_in_order() {
        let mut data = encode_frame(b"one");
        data.extend(encode_frame(b"two"));
        data.extend(encode_frame(b""));
        data.extend(encode_frame(b"three"));
        let ev = assert_split_invariant(100, &data);
        assert_eq!(
            ev,
            vec![frame(b"one"), frame(b"two"), frame(b""), frame(b"three")]
        );
    }

    #[test]
    fn missing_trailing_cr_is_tolerated_before_next_frame_and_at_eof() {
        let ev = assert_split_invariant(100, b"\x0bone\x1c\x0btwo\x1c");
        assert_eq!(ev, vec![frame(b"one"), frame(b"two")]);
    }

    #[test]
    fn end_block_at_end_of_buffer_waits_for_more_input_or_finish() {
        let mut d = MllpDecoder::new(100);
        d.feed(b"\x0bone\x1c");
        assert_eq!(d.next_event(), None);
        d.feed(b"\x0d");
        assert_eq!(d.next_event(), Some(frame(b"one")));
        d.feed(b"\x0btwo\x1c");
        assert_eq!(d.next_event(), None);
        d.finish();
        assert_eq!(d.next_event(), Some(frame(b"two")));
        assert_eq!(d.next_event(), None);
    }

    #[test]
    fn garbage_before_a_frame_is_reported_once_and_skipped() {
        let ev = assert_split_invariant(100, b"GET / HTTP/1.0\r\n\x0bone\x1c\x0d");
        assert_eq!(ev, vec![MllpEvent::Garbage { bytes: 16 }, frame(b"one")]);
    }

    #[test]
    fn stray_line_feed_after_a_frame_is_garbage_and_the_next_frame_survives() {
        let ev = assert_split_invariant(100, b"\x0bone\x1c\x0d\x0a\x0btwo\x1c\x0d");
        assert_eq!(
            ev,
            vec![
                frame(b"one"),
                MllpEvent::Garbage { bytes: 1 },
                frame(b"two")
            ]
        );
    }

    #[test]
    fn broken_trailer_discards_the_block_and_resynchronises() {
        let ev = assert_split_invariant(100, b"\x0bone\x1cXY\x0btwo\x1c\x0d");
        // 0x0B + "one" + 0x1C + "X" + "Y"
        assert_eq!(ev, vec![MllpEvent::Garbage { bytes: 7 }, frame(b"two")]);
    }

    #[test]
    fn start_block_inside_a_frame_restarts_it() {
        let ev = assert_split_invariant(100, b"\x0bpart\x0bwhole\x1c\x0d");
        assert_eq!(ev, vec![MllpEvent::Garbage { bytes: 5 }, frame(b"whole")]);
    }

    #[test]
    fn oversized_frame_is_reported_once_and_the_next_frame_survives() {
        let mut data = encode_frame(&[b'x'; 25]);
        data.extend(encode_frame(b"ok"));
        let ev = assert_split_invariant(10, &data);
        assert_eq!(ev, vec![MllpEvent::Oversized { bytes: 25 }, frame(b"ok")]);
    }

    #[test]
    fn frame_of_exactly_max_size_is_accepted() {
        let ev = assert_split_invariant(10, &encode_frame(&[b'x'; 10]));
        assert_eq!(ev, vec![frame(&[b'x'; 10])]);
        let ev = assert_split_invariant(10, &encode_frame(&[b'x'; 11]));
        assert_eq!(ev, vec![MllpEvent::Oversized { bytes: 11 }]);
    }

    #[test]
    fn oversized_frame_ended_by_start_block_or_eof() {
        let ev = assert_split_invariant(4, b"\x0b0123456789\x0bok\x1c\x0d\x0bxxxxxxx");
        assert_eq!(
            ev,
            vec![
                MllpEvent::Oversized { bytes: 10 },
                frame(b"ok"),
                MllpEvent::Oversized { bytes: 7 }
            ]
        );
    }

    #[test]
    fn unterminated_frame_at_eof_is_garbage() {
        let ev = assert_split_invariant(100, b"\x0bMSH|half");
        assert_eq!(ev, vec![MllpEvent::Garbage { bytes: 9 }]);
    }

    #[test]
    fn memory_stays_bounded_while_an_endless_frame_streams_in() {
        let mut d = MllpDecoder::new(1000);
        d.feed(&[START_BLOCK]);
        for _ in 0..10_000 {
            d.feed(&[b'a'; 512]);
            assert_eq!(d.next_event(), None);
            assert!(d.buffered() <= 1000, "buffered {}", d.buffered());
        }
        d.feed(&[END_BLOCK, CARRIAGE_RETURN]);
        assert_eq!(
            d.next_event(),
            Some(MllpEvent::Oversized { bytes: 5_120_000 })
        );
    }

    #[test]
    fn random_streams_are_split_invariant() {
        let mut rng = crate::testutil::XorShift::new(7);
        let alphabet = [START_BLOCK, END_BLOCK, CARRIAGE_RETURN, b'a', b'|', 0x0a];
        for _ in 0..300 {
            let len = rng.below(24);
            let data: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let max = rng.below(6);
            let whole = decode_all(max, &data, &[]);
            for i in 0..=data.len() {
                assert_eq!(decode_all(max, &data, &[i]), whole);
            }
            let bytewise: Vec<usize> = (0..=data.len()).collect();
            assert_eq!(decode_all(max, &data, &bytewise), whole);
        }
    }

    #[test]
    fn debug_never_prints_the_payload() {
        let s = format!("{:?}", frame(b"YAMADA^TARO"));
        assert_eq!(s, "Frame(11 bytes)");
    }
}
