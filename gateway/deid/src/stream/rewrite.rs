//! The data set stage: a push-mode state machine over the element framing, writing the
//! de-identified data set as it goes, and the inflate/deflate wrapper around it.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use gateway_dicom::element::{self, Encoding, ITEM_GROUP, UNDEFINED_LENGTH};

use super::{
    Action, Ctx, DeidError, HoldReason, MAX_DEPTH, MAX_HELD_VALUE, ProfileOption, scan, values,
};

const SPECIFIC_CHARSET: u32 = 0x0008_0005;
const SOP_INSTANCE: u32 = 0x0008_0018;
const PATIENT_NAME: u32 = 0x0010_0010;
const PATIENT_ID: u32 = 0x0010_0020;
const STUDY_UID: u32 = 0x0020_000D;
const IDENTITY_REMOVED: u32 = 0x0012_0062;
const METHOD: u32 = 0x0012_0063;
const METHOD_CODES: u32 = 0x0012_0064;
const BURNED_IN: u32 = 0x0028_0301;
const LONGITUDINAL: u32 = 0x0028_0303;
const PIXEL_DATA: u32 = 0x7FE0_0010;
/// Overlay Data of the first repeating overlay group: its row decides the whole overlay.
const OVERLAY_DATA: u32 = 0x6000_3000;
const TRAILING_PADDING: u32 = 0xFFFC_FFFC;
const ITEM: u16 = 0xE000;
const ITEM_END: u16 = 0xE00D;
const SEQUENCE_END: u16 = 0xE0DD;

/// Plain bytes handed to the deflater at a time (fixed, so the deflated output does not
/// depend on how the input was split).
const BLOCK: usize = 64 * 1024;
/// Largest inflated data set rewritten (a deflate bomb costs CPU, never memory).
const MAX_INFLATED: u64 = 8 << 30;

fn malformed(offset: u64, problem: &'static str) -> DeidError {
    DeidError::Malformed { offset, problem }
}

fn split(tag: u32) -> (u16, u16) {
    ((tag >> 16) as u16, tag as u16)
}

fn put_u16(out: &mut Vec<u8>, enc: Encoding, v: u16) {
    out.extend_from_slice(&if enc.big_endian {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    });
}

fn put_u32(out: &mut Vec<u8>, enc: Encoding, v: u32) {
    out.extend_from_slice(&if enc.big_endian {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    });
}

/// Writes an element header (an item or delimiter when the group is FFFE).
fn write_header(
    out: &mut Vec<u8>,
    enc: Encoding,
    tag: u32,
    vr: Option<[u8; 2]>,
    len: u32,
) -> Result<(), DeidError> {
    let (group, elem) = split(tag);
    put_u16(out, enc, group);
    put_u16(out, enc, elem);
    match vr {
        Some(vr) if enc.explicit_vr && group != ITEM_GROUP => {
            out.extend_from_slice(&vr);
            if element::is_long_vr(vr) {
                out.extend_from_slice(&[0, 0]);
                put_u32(out, enc, len);
            } else {
                let short = u16::try_from(len).map_err(|_| DeidError::ValueTooLarge {
                    group,
                    element: elem,
                    len,
                })?;
                put_u16(out, enc, short);
            }
        }
        _ => put_u32(out, enc, len),
    }
    Ok(())
}

/// Writes a whole element with a defined-length value.
pub(super) fn write_element(
    out: &mut Vec<u8>,
    enc: Encoding,
    tag: u32,
    vr: Option<[u8; 2]>,
    value: &[u8],
) -> Result<(), DeidError> {
    let (group, element) = split(tag);
    let len = u32::try_from(value.len()).map_err(|_| DeidError::ValueTooLarge {
        group,
        element,
        len: u32::MAX,
    })?;
    write_header(out, enc, tag, vr, len)?;
    out.extend_from_slice(value);
    Ok(())
}

fn text_value(vr: [u8; 2], text: &str) -> Vec<u8> {
    let mut v = text.as_bytes().to_vec();
    values::pad(vr, &mut v);
    v
}

/// The attributes that say how the object was de-identified, in tag order, encoded in
/// `enc`.
fn de_identification_attributes(
    enc: Encoding,
    ctx: &Ctx,
) -> Result<Vec<(u32, Vec<u8>)>, DeidError> {
    let mut inserts = Vec::new();
    let mut e = Vec::new();
    write_element(&mut e, enc, IDENTITY_REMOVED, Some(*b"CS"), b"YES ")?;
    inserts.push((IDENTITY_REMOVED, e));

    let options = ctx.profile.options();
    let mut method = String::from("PS3.15 E.1-1 Basic Profile");
    for o in options {
        method.push('\\');
        method.push_str(o.code().1);
    }
    let mut e = Vec::new();
    write_element(
        &mut e,
        enc,
        METHOD,
        Some(*b"LO"),
        &text_value(*b"LO", &method),
    )?;
    inserts.push((METHOD, e));

    let mut e = Vec::new();
    write_header(&mut e, enc, METHOD_CODES, Some(*b"SQ"), UNDEFINED_LENGTH)?;
    let codes = std::iter::once(("113100", "Basic Application Confidentiality Profile"))
        .chain(options.iter().map(|o| o.code()));
    for (code, meaning) in codes {
        write_header(&mut e, enc, 0xFFFE_E000, None, UNDEFINED_LENGTH)?;
        write_element(
            &mut e,
            enc,
            0x0008_0100,
            Some(*b"SH"),
            &text_value(*b"SH", code),
        )?;
        write_element(
            &mut e,
            enc,
            0x0008_0102,
            Some(*b"SH"),
            &text_value(*b"SH", "DCM"),
        )?;
        write_element(
            &mut e,
            enc,
            0x0008_0104,
            Some(*b"LO"),
            &text_value(*b"LO", meaning),
        )?;
        write_header(&mut e, enc, 0xFFFE_E00D, None, 0)?;
    }
    write_header(&mut e, enc, 0xFFFE_E0DD, None, 0)?;
    inserts.push((METHOD_CODES, e));

    let longitudinal = if ctx.profile.shifts_dates() {
        Some("MODIFIED")
    } else if ctx
        .profile
        .has(ProfileOption::RetainLongitudinalTemporalInformationFullDates)
    {
        Some("UNMODIFIED")
    } else {
        None
    };
    if let Some(v) = longitudinal {
        let mut e = Vec::new();
        write_element(
            &mut e,
            enc,
            LONGITUDINAL,
            Some(*b"CS"),
            &text_value(*b"CS", v),
        )?;
        inserts.push((LONGITUDINAL, e));
    }
    Ok(inserts)
}

/// The data set stage: plain, or inflated and deflated again.
pub(super) enum Body {
    Plain(Core),
    Deflated(Deflated),
}

impl Body {
    pub(super) fn new(enc: Encoding, ctx: &Ctx) -> Result<Self, DeidError> {
        let core = Core::new(enc, ctx)?;
        Ok(if enc.deflated {
            Self::Deflated(Deflated {
                core,
                inflate: flate2::Decompress::new(false),
                compress: flate2::Compress::new(flate2::Compression::fast(), false),
                scratch: vec![0; BLOCK],
                plain: Vec::with_capacity(2 * BLOCK),
                ended: false,
            })
        } else {
            Self::Plain(core)
        })
    }

    pub(super) fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        ctx: &mut Ctx,
    ) -> Result<(), DeidError> {
        match self {
            Self::Plain(core) => core.feed(input, out, ctx),
            Self::Deflated(d) => d.feed(input, out, ctx),
        }
    }

    pub(super) fn finish(self, out: &mut Vec<u8>, ctx: &mut Ctx) -> Result<(), DeidError> {
        match self {
            Self::Plain(mut core) => core.finish(out, ctx),
            Self::Deflated(d) => d.finish(out, ctx),
        }
    }
}

/// Inflate, rewrite, deflate.
pub(super) struct Deflated {
    core: Core,
    inflate: flate2::Decompress,
    compress: flate2::Compress,
    scratch: Vec<u8>,
    /// Rewritten plain bytes not yet deflated (less than [`BLOCK`] between calls).
    plain: Vec<u8>,
    ended: bool,
}

impl Deflated {
    fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        ctx: &mut Ctx,
    ) -> Result<(), DeidError> {
        loop {
            if self.ended {
                // Bytes after the end of the deflate stream are padding.
                return Ok(());
            }
            let (before_in, before_out) = (self.inflate.total_in(), self.inflate.total_out());
            let status =
                self.inflate
                    .decompress(input, &mut self.scratch, flate2::FlushDecompress::None);
            let used = (self.inflate.total_in() - before_in) as usize;
            let produced = (self.inflate.total_out() - before_out) as usize;
            input = input.get(used..).unwrap_or_default();
            if self.inflate.total_out() > MAX_INFLATED {
                return Err(DeidError::Unsupported {
                    what: "deflated data set inflates beyond 8 GiB",
                });
            }
            // What inflated before a deflate error is rewritten first, so the verdict
            // does not depend on how the input was split.
            self.core.feed(
                self.scratch.get(..produced).unwrap_or_default(),
                &mut self.plain,
                ctx,
            )?;
            let status = status
                .map_err(|_| malformed(self.core.offset, "deflated data set does not inflate"))?;
            self.deflate_blocks(out)?;
            if status == flate2::Status::StreamEnd {
                // Bytes after the end of the deflate stream are padding.
                self.ended = true;
                return Ok(());
            }
            // Done when the input is used up and nothing is pending; an inflater that
            // flushes what it holds may consume nothing in a call, so a call without
            // input used is not the end while it still produces.
            if input.is_empty() && produced < self.scratch.len() {
                return Ok(());
            }
            if used == 0 && produced == 0 {
                return Err(malformed(
                    self.core.offset,
                    "deflated data set does not inflate",
                ));
            }
        }
    }

    /// Deflates every whole [`BLOCK`] of rewritten bytes.
    fn deflate_blocks(&mut self, out: &mut Vec<u8>) -> Result<(), DeidError> {
        let mut at = 0;
        while let Some(block) = self.plain.get(at..at + BLOCK) {
            deflate(&mut self.compress, block, out, flate2::FlushCompress::None)?;
            at += BLOCK;
        }
        if at > 0 {
            self.plain.drain(..at);
        }
        Ok(())
    }

    fn finish(mut self, out: &mut Vec<u8>, ctx: &mut Ctx) -> Result<(), DeidError> {
        if !self.ended {
            return Err(malformed(
                self.core.offset,
                "deflated data set ends before its deflate stream does",
            ));
        }
        self.core.finish(&mut self.plain, ctx)?;
        self.deflate_blocks(out)?;
        deflate(
            &mut self.compress,
            &self.plain,
            out,
            flate2::FlushCompress::Finish,
        )
    }
}

fn deflate(
    z: &mut flate2::Compress,
    mut input: &[u8],
    out: &mut Vec<u8>,
    flush: flate2::FlushCompress,
) -> Result<(), DeidError> {
    let failed = DeidError::Unsupported {
        what: "deflating the rewritten data set failed",
    };
    loop {
        out.reserve(input.len() / 2 + 4096);
        let before = z.total_in();
        let status = z
            .compress_vec(input, out, flush)
            .map_err(|_| failed.clone())?;
        let used = (z.total_in() - before) as usize;
        input = input.get(used..).unwrap_or_default();
        match flush {
            flate2::FlushCompress::Finish if status == flate2::Status::StreamEnd => return Ok(()),
            flate2::FlushCompress::Finish => {}
            _ if input.is_empty() => return Ok(()),
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Items or a sequence delimiter come next.
    Sequence,
    /// Elements or an item delimiter come next.
    Item,
    /// Encapsulated pixel data: fragments (items) or a sequence delimiter come next.
    Fragments,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: Kind,
    /// Input offset of the end of a defined-length sequence or item.
    end: Option<u64>,
    /// Written to the output (false: inside something removed).
    emit: bool,
    /// Encoding of the content (Implicit VR LE inside an undefined-length UN).
    enc: Encoding,
    /// Inside a sequence whose action is Dummy (at any depth below it): values no table
    /// row names get their dummy too (see [`content_action`]).
    dummy: bool,
    /// A sequence the table itself names Dummy, or one of its items: the codes here are
    /// the identity (Institution Code Sequence, Person Identification Code Sequence) and
    /// get dummies too.
    named_dummy: bool,
    /// Inside a sequence whose action is Clean (and not in a Dummy subtree): text no
    /// table row names is cleaned too.
    clean: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Uids,
    /// UIDs inside a Dummy sequence that no row names: the standard's own are kept.
    ContentUids,
    Dates {
        dt: bool,
    },
    Text,
    Charset,
    BurnedIn,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    tag: u32,
    vr: [u8; 2],
    held: Held,
    remaining: u32,
    top: bool,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Pass(u64),
    Skip(u64),
    Hold(Job),
}

/// The framing state machine that rewrites.
pub(super) struct Core {
    enc: Encoding,
    state: State,
    header: [u8; 12],
    have: usize,
    offset: u64,
    element_offset: u64,
    stack: Vec<Frame>,
    held: Vec<u8>,
    /// The de-identification attributes not yet written (ascending tags).
    inserts: std::collections::VecDeque<(u32, Vec<u8>)>,
    /// Encoding of the content of the element being decided (Implicit VR LE for UN).
    content_enc: Encoding,
    /// VR of the element being decided as it is written when kept (UN stays UN).
    written_vr: Option<[u8; 2]>,
    /// The sequence being decided opens a Dummy subtree (its frame gets `dummy`).
    next_dummy: bool,
    /// The sequence being decided is named Dummy by the table (its frame gets
    /// `named_dummy`).
    next_named_dummy: bool,
    /// The sequence being decided opens a Clean subtree (its frame gets `clean`).
    next_clean: bool,
}

impl Core {
    fn new(enc: Encoding, ctx: &Ctx) -> Result<Self, DeidError> {
        Ok(Self {
            enc,
            state: State::Header,
            header: [0; 12],
            have: 0,
            offset: 0,
            element_offset: 0,
            stack: Vec::new(),
            held: Vec::new(),
            inserts: de_identification_attributes(enc, ctx)?.into(),
            content_enc: enc,
            written_vr: None,
            next_dummy: false,
            next_named_dummy: false,
            next_clean: false,
        })
    }

    fn enc(&self) -> Encoding {
        self.stack.last().map_or(self.enc, |f| f.enc)
    }

    /// Takes up to `n` bytes off the front of `data`.
    fn take<'d>(&mut self, n: u64, data: &mut &'d [u8]) -> &'d [u8] {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let (head, rest) = data.split_at_checked(n).unwrap_or((data, &[]));
        self.offset += head.len() as u64;
        *data = rest;
        head
    }

    fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>, ctx: &mut Ctx) -> Result<(), DeidError> {
        while !data.is_empty() {
            match self.state {
                State::Pass(n) => {
                    let head = self.take(n, &mut data);
                    out.extend_from_slice(head);
                    let left = n - head.len() as u64;
                    self.state = if left == 0 {
                        State::Header
                    } else {
                        State::Pass(left)
                    };
                }
                State::Skip(n) => {
                    let head = self.take(n, &mut data);
                    let left = n - head.len() as u64;
                    self.state = if left == 0 {
                        State::Header
                    } else {
                        State::Skip(left)
                    };
                }
                State::Hold(mut job) => {
                    let head = self.take(u64::from(job.remaining), &mut data);
                    self.held.extend_from_slice(head);
                    job.remaining -= head.len() as u32;
                    if job.remaining == 0 {
                        self.state = State::Header;
                        self.rewrite_held(job, out, ctx)?;
                    } else {
                        self.state = State::Hold(job);
                    }
                }
                State::Header => {
                    if self.have == 0 {
                        self.close_ended(out)?;
                        self.element_offset = self.offset;
                    }
                    let enc = self.enc();
                    let need =
                        element::header_len(self.header.get(..self.have).unwrap_or_default(), enc);
                    let piece = self.take(need.saturating_sub(self.have) as u64, &mut data);
                    let Some(slot) = self.header.get_mut(self.have..self.have + piece.len()) else {
                        return Err(malformed(self.offset, "element header"));
                    };
                    slot.copy_from_slice(piece);
                    self.have += piece.len();
                    let full =
                        element::header_len(self.header.get(..self.have).unwrap_or_default(), enc);
                    if self.have == full {
                        self.have = 0;
                        self.on_header(out, ctx)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>, ctx: &mut Ctx) -> Result<(), DeidError> {
        let between = matches!(self.state, State::Header | State::Pass(0) | State::Skip(0));
        if !between || self.have != 0 {
            return Err(malformed(self.offset, "data set ends inside an element"));
        }
        if self.offset == 0 {
            return Err(malformed(0, "object has no data set"));
        }
        self.close_ended(out)?;
        if !self.stack.is_empty() {
            return Err(malformed(self.offset, "data set ends inside a sequence"));
        }
        for (_, bytes) in self.inserts.drain(..) {
            out.extend_from_slice(&bytes);
        }
        let _ = ctx;
        Ok(())
    }

    /// Closes the defined-length items and sequences that end here (writing their
    /// delimiters), and refuses an element that would start at the end of an enclosing
    /// defined-length item while an undefined-length one is still open.
    fn close_ended(&mut self, out: &mut Vec<u8>) -> Result<(), DeidError> {
        while let Some(f) = self.stack.last().copied() {
            if f.end != Some(self.offset) {
                break;
            }
            self.stack.pop();
            if f.emit {
                let delimiter = if f.kind == Kind::Item {
                    ITEM_END
                } else {
                    SEQUENCE_END
                };
                write_header(out, f.enc, 0xFFFE_0000 | u32::from(delimiter), None, 0)?;
            }
        }
        if self.limit() == Some(self.offset) {
            return Err(malformed(
                self.offset,
                "an item or sequence of undefined length is not closed before its parent ends",
            ));
        }
        Ok(())
    }

    /// The end of the innermost defined-length item or sequence.
    fn limit(&self) -> Option<u64> {
        self.stack.iter().rev().find_map(|f| f.end)
    }

    fn push(&mut self, frame: Frame) -> Result<(), DeidError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(malformed(self.element_offset, "sequences nested too deep"));
        }
        self.stack.push(frame);
        Ok(())
    }

    fn on_header(&mut self, out: &mut Vec<u8>, ctx: &mut Ctx) -> Result<(), DeidError> {
        let offset = self.element_offset;
        let enc = self.enc();
        let Some(h) = element::read_header(&self.header, enc) else {
            return Err(malformed(offset, "element header"));
        };
        let tag = (u32::from(h.group) << 16) | u32::from(h.element);
        let undefined = h.len == UNDEFINED_LENGTH;
        let value_end = self.offset + if undefined { 0 } else { u64::from(h.len) };
        if self.limit().is_some_and(|limit| value_end > limit) {
            return Err(malformed(
                offset,
                "element runs past the end of its item or sequence",
            ));
        }
        let parent = self.stack.last().copied();
        self.next_dummy = false;
        self.next_named_dummy = false;
        self.next_clean = false;
        if h.group == ITEM_GROUP {
            return self.on_item(h.element, h.len, parent, out);
        }
        if parent.is_some_and(|f| f.kind != Kind::Item) {
            return Err(malformed(offset, "element where an item was expected"));
        }
        let vr = match h.vr {
            Some(vr) if !vr.iter().all(u8::is_ascii_uppercase) => {
                return Err(malformed(offset, "invalid VR"));
            }
            // UN: an undefined length is a sequence in Implicit VR LE (PS3.5 6.2.2); a
            // defined length is decided by the VR the dictionary knows for the tag (a
            // UN-encoded sequence is followed in Implicit VR LE, its items processed).
            Some(un) if &un == b"UN" && undefined => Some(*b"SQ"),
            Some(un) if &un == b"UN" => dictionary_vr(tag).filter(|vr| vr != b"UN").or(Some(un)),
            Some(vr) => Some(vr),
            None if undefined && tag != PIXEL_DATA => Some(*b"SQ"),
            None => dictionary_vr(tag),
        };
        self.content_enc = if h.vr == Some(*b"UN") {
            Encoding::IMPLICIT_LE
        } else {
            enc
        };
        self.written_vr = h.vr.or(vr);
        if undefined
            && h.vr
                .is_some_and(|vr| !matches!(&vr, b"SQ" | b"UN" | b"OB" | b"OW"))
        {
            return Err(malformed(
                offset,
                "undefined length where the VR allows none",
            ));
        }
        let emit = parent.is_none_or(|f| f.emit);
        if !emit
            || h.group % 2 == 1
            || (h.element == 0 && h.group != 0x0002)
            || tag == TRAILING_PADDING
        {
            // Inside something removed; private (creators too); group length; trailing
            // padding (it may hold what an editor left behind).
            return self.discard(h.len, vr, enc);
        }
        if is_overlay_group(h.group) && ctx.action(OVERLAY_DATA, false) == Some(Action::Remove) {
            // Overlay Data and Comments removed (X): the rest of the Overlay Plane module
            // goes with them, else the object keeps an overlay without its Type 1 data.
            return self.discard(h.len, vr, enc);
        }
        let top = parent.is_none();
        if top {
            while let Some((t, bytes)) = self.inserts.front() {
                if *t >= tag {
                    break;
                }
                out.extend_from_slice(bytes);
                self.inserts.pop_front();
            }
            match tag {
                IDENTITY_REMOVED | METHOD | METHOD_CODES | LONGITUDINAL => {
                    // Replaced by the rewriter's own (or removed: 0028,0303 without an
                    // option that keeps dates).
                    return self.discard(h.len, vr, enc);
                }
                PATIENT_NAME | PATIENT_ID => {
                    let vr = vr.unwrap_or(if tag == PATIENT_NAME { *b"PN" } else { *b"LO" });
                    let value = text_value(vr, &ctx.pseudo_patient_id);
                    write_element(out, enc, tag, Some(vr), &value)?;
                    return self.discard(h.len, Some(vr), enc);
                }
                SPECIFIC_CHARSET => {
                    return self.hold(tag, h.len, *b"CS", Held::Charset, out, ctx);
                }
                BURNED_IN => return self.hold(tag, h.len, *b"CS", Held::BurnedIn, out, ctx),
                _ => {}
            }
        }
        let is_sq = vr == Some(*b"SQ");
        let mut action = ctx.action(tag, is_sq || vr == Some(*b"UI"));
        let in_dummy = parent.is_some_and(|f| f.dummy);
        let named = action.is_some();
        self.next_named_dummy = is_sq && action == Some(Action::Dummy);
        if in_dummy && !named {
            let codes_kept = parent.is_some_and(|f| !f.named_dummy);
            action = content_action(tag, vr, ctx.map_uids, codes_kept);
        }
        // A Dummy sequence keeps its structure, not its content: everything below it is
        // in a Dummy subtree.
        self.next_dummy = is_sq && (in_dummy || action == Some(Action::Dummy));
        // A Clean sequence cleans its content: text no row names is cleaned at any depth.
        let in_clean = parent.is_some_and(|f| f.clean);
        if in_clean && !named && vr.is_some_and(values::is_text) {
            action = Some(Action::Clean);
        }
        self.next_clean = is_sq && !self.next_dummy && (in_clean || action == Some(Action::Clean));
        let Some(vr) = vr else {
            // No VR known (implicit VR, not in the dictionary): kept, or emptied when the
            // profile changes it (a dummy needs a VR).
            return match action {
                None | Some(Action::Keep) => self.keep(h.len, None, enc, out),
                Some(Action::Remove) => self.discard(h.len, None, enc),
                Some(_) => self.zero(tag, h.len, None, enc, out),
            };
        };
        match action {
            None | Some(Action::Keep) => self.keep(h.len, Some(vr), enc, out),
            Some(Action::Remove) => self.discard(h.len, Some(vr), enc),
            Some(Action::Zero) => self.zero(tag, h.len, Some(vr), enc, out),
            // A sequence replaced, cleaned or whose UIDs are replaced keeps its items,
            // and they are processed.
            Some(Action::Dummy | Action::Uid | Action::Clean) if is_sq => {
                self.keep(h.len, Some(vr), enc, out)
            }
            Some(Action::Dummy) if &vr == b"UI" && in_dummy && !named => {
                self.hold(tag, h.len, vr, Held::ContentUids, out, ctx)
            }
            Some(Action::Dummy | Action::Uid) if &vr == b"UI" => {
                self.hold(tag, h.len, vr, Held::Uids, out, ctx)
            }
            Some(Action::Dummy | Action::Uid) => self.replace(tag, h.len, vr, enc, out),
            Some(Action::Clean) => match &vr {
                b"DA" | b"DT" if ctx.profile.shifts_dates() => {
                    self.hold(tag, h.len, vr, Held::Dates { dt: &vr == b"DT" }, out, ctx)
                }
                b"DA" | b"DT" => self.replace(tag, h.len, vr, enc, out),
                _ if values::is_text(vr) => self.hold(tag, h.len, vr, Held::Text, out, ctx),
                _ => self.keep(h.len, Some(vr), enc, out),
            },
        }
    }

    fn on_item(
        &mut self,
        element: u16,
        len: u32,
        parent: Option<Frame>,
        out: &mut Vec<u8>,
    ) -> Result<(), DeidError> {
        let offset = self.element_offset;
        let undefined = len == UNDEFINED_LENGTH;
        let Some(parent) = parent else {
            return Err(malformed(offset, "item or delimiter outside a sequence"));
        };
        match (element, parent.kind) {
            (ITEM, Kind::Sequence) => {
                if !parent.emit && !undefined {
                    self.state = State::Skip(u64::from(len));
                    return Ok(());
                }
                if parent.emit {
                    write_header(out, parent.enc, 0xFFFE_E000, None, UNDEFINED_LENGTH)?;
                }
                self.push(Frame {
                    kind: Kind::Item,
                    end: (!undefined).then(|| self.offset + u64::from(len)),
                    emit: parent.emit,
                    enc: parent.enc,
                    dummy: parent.dummy,
                    named_dummy: parent.named_dummy,
                    clean: parent.clean,
                })
            }
            (ITEM, Kind::Fragments) => {
                if undefined {
                    return Err(malformed(offset, "fragment of undefined length"));
                }
                if parent.emit {
                    out.extend_from_slice(self.header.get(..8).unwrap_or_default());
                    self.state = State::Pass(u64::from(len));
                } else {
                    self.state = State::Skip(u64::from(len));
                }
                Ok(())
            }
            (ITEM_END, Kind::Item) | (SEQUENCE_END, Kind::Sequence | Kind::Fragments)
                if parent.end.is_none() =>
            {
                self.stack.pop();
                if parent.emit {
                    write_header(out, parent.enc, 0xFFFE_0000 | u32::from(element), None, 0)?;
                }
                Ok(())
            }
            _ => Err(malformed(offset, "item or delimiter out of place")),
        }
    }

    /// The frame an undefined-length element opens: a sequence (its items in the content
    /// encoding of the element), or encapsulated fragments.
    fn frame_of(&self, vr: Option<[u8; 2]>, enc: Encoding, emit: bool) -> Frame {
        let (kind, enc) = match vr.as_ref() {
            Some(b"SQ") => (Kind::Sequence, self.content_enc),
            _ => (Kind::Fragments, enc),
        };
        Frame {
            kind,
            end: None,
            emit,
            enc,
            dummy: emit && kind == Kind::Sequence && self.next_dummy,
            named_dummy: emit && kind == Kind::Sequence && self.next_named_dummy,
            clean: emit && kind == Kind::Sequence && self.next_clean,
        }
    }

    /// Drops the element's value (following the framing of an undefined-length one).
    fn discard(&mut self, len: u32, vr: Option<[u8; 2]>, enc: Encoding) -> Result<(), DeidError> {
        if len == UNDEFINED_LENGTH {
            return self.push(self.frame_of(vr, enc, false));
        }
        self.state = State::Skip(u64::from(len));
        Ok(())
    }

    /// Writes the element as it came (a sequence with undefined length, its items
    /// processed).
    fn keep(
        &mut self,
        len: u32,
        vr: Option<[u8; 2]>,
        enc: Encoding,
        out: &mut Vec<u8>,
    ) -> Result<(), DeidError> {
        let tag = self.header_tag(enc);
        let is_sq = vr == Some(*b"SQ");
        if len == UNDEFINED_LENGTH {
            let frame = self.frame_of(vr, enc, true);
            out.extend_from_slice(self.header_bytes(enc));
            return self.push(frame);
        }
        if is_sq {
            write_header(out, enc, tag, self.written_vr, UNDEFINED_LENGTH)?;
            return self.push(Frame {
                kind: Kind::Sequence,
                end: Some(self.offset + u64::from(len)),
                emit: true,
                enc: self.content_enc,
                dummy: self.next_dummy,
                named_dummy: self.next_named_dummy,
                clean: self.next_clean,
            });
        }
        out.extend_from_slice(self.header_bytes(enc));
        self.state = State::Pass(u64::from(len));
        Ok(())
    }

    /// Writes the element with an empty value.
    fn zero(
        &mut self,
        tag: u32,
        len: u32,
        vr: Option<[u8; 2]>,
        enc: Encoding,
        out: &mut Vec<u8>,
    ) -> Result<(), DeidError> {
        write_header(out, enc, tag, vr, 0)?;
        self.discard(len, vr, enc)
    }

    /// Writes the element with a dummy value of its VR.
    fn replace(
        &mut self,
        tag: u32,
        len: u32,
        vr: [u8; 2],
        enc: Encoding,
        out: &mut Vec<u8>,
    ) -> Result<(), DeidError> {
        write_element(out, enc, tag, Some(vr), values::dummy(vr))?;
        self.discard(len, Some(vr), enc)
    }

    fn hold(
        &mut self,
        tag: u32,
        len: u32,
        vr: [u8; 2],
        held: Held,
        out: &mut Vec<u8>,
        ctx: &mut Ctx,
    ) -> Result<(), DeidError> {
        let (group, element) = split(tag);
        if len == UNDEFINED_LENGTH {
            return Err(malformed(
                self.element_offset,
                "undefined length where the VR allows none",
            ));
        }
        if len > MAX_HELD_VALUE {
            return Err(DeidError::ValueTooLarge {
                group,
                element,
                len,
            });
        }
        self.held.clear();
        let job = Job {
            tag,
            vr,
            held,
            remaining: len,
            top: self.stack.is_empty(),
        };
        if len == 0 {
            return self.rewrite_held(job, out, ctx);
        }
        self.state = State::Hold(job);
        Ok(())
    }

    fn rewrite_held(
        &mut self,
        job: Job,
        out: &mut Vec<u8>,
        ctx: &mut Ctx,
    ) -> Result<(), DeidError> {
        let enc = self.enc();
        let held = std::mem::take(&mut self.held);
        let value = match job.held {
            Held::Uids => {
                let mapped = values::map_uids(&held, &ctx.key);
                if job.top {
                    let first = scan::trimmed(&mapped);
                    match job.tag {
                        SOP_INSTANCE => ctx.done.pseudo_sop_instance_uid = first,
                        STUDY_UID => ctx.done.pseudo_study_uid = first,
                        _ => {}
                    }
                }
                mapped
            }
            Held::ContentUids => values::map_instance_uids(&held, &ctx.key),
            Held::Dates { dt } => values::shift_dates(&held, dt, ctx.days),
            Held::Text => {
                let text = scan::decode_lower(&held, ctx.charset.as_ref());
                if ctx.identifying.iter().any(|i| text.contains(i.as_str())) {
                    values::dummy(job.vr).to_vec()
                } else {
                    held.clone()
                }
            }
            Held::Charset => {
                ctx.charset = scan::charset_of(&held);
                held.clone()
            }
            Held::BurnedIn => {
                match scan::trimmed(&held).to_ascii_uppercase().as_str() {
                    "YES" if !ctx.accept_burned_in => {
                        return Err(DeidError::Held(HoldReason::BurnedInAnnotation));
                    }
                    "NO" => ctx.pixel_text = None,
                    _ => {}
                }
                held.clone()
            }
        };
        write_element(out, enc, job.tag, Some(job.vr), &value)?;
        self.held = held;
        self.held.clear();
        Ok(())
    }

    fn header_tag(&self, enc: Encoding) -> u32 {
        element::read_header(&self.header, enc)
            .map_or(0, |h| (u32::from(h.group) << 16) | u32::from(h.element))
    }

    fn header_bytes(&self, enc: Encoding) -> &[u8] {
        let n = element::header_len(&self.header, enc);
        self.header.get(..n).unwrap_or_default()
    }
}

/// The action, inside a Dummy sequence, for an element no table row names: the dummy
/// for a value that may say who, when or what was found (PN, dates and times, text, numbers,
/// UIDs, the last only while UIDs are mapped); kept: the structure (sequences), coded
/// entries (the Code Sequence Macro, (0008,0100)-(0008,0122), unless `codes_kept` is false:
/// directly in an item of a sequence the table names D, where the code is the identity),
/// Value Type, Relationship Type, Continuity Of Content and the other VRs (CS, US, ...).
/// No VR known (implicit and not in the dictionary, or UN): emptied.
fn content_action(
    tag: u32,
    vr: Option<[u8; 2]>,
    map_uids: bool,
    codes_kept: bool,
) -> Option<Action> {
    const VALUE_TYPE: u32 = 0x0040_A040;
    const RELATIONSHIP_TYPE: u32 = 0x0040_A010;
    const CONTINUITY: u32 = 0x0040_A050;
    // Where in the referenced object a content item or annotation points (SCOORD, TCOORD,
    // IMAGE, graphic and text objects): image coordinates, frame numbers and time offsets
    // say nothing of the subject, and a dummy (one 0) would break the reference (a frame
    // 0, a point without its pair).
    const BOUNDING_BOX: [u32; 2] = [0x0070_0010, 0x0070_0011];
    const ANCHOR_POINT: u32 = 0x0070_0014;
    const GRAPHIC_DATA: u32 = 0x0070_0022;
    const REFERENCED_FRAMES: u32 = 0x0008_1160;
    const REFERENCED_TIME_OFFSETS: u32 = 0x0040_A138;
    let Some(vr) = vr else {
        return Some(Action::Zero);
    };
    let coded = codes_kept && (0x0008_0100..=0x0008_0122).contains(&tag);
    let pointer = BOUNDING_BOX.contains(&tag)
        || matches!(
            tag,
            ANCHOR_POINT | GRAPHIC_DATA | REFERENCED_FRAMES | REFERENCED_TIME_OFFSETS
        );
    if coded || pointer || matches!(tag, VALUE_TYPE | RELATIONSHIP_TYPE | CONTINUITY) {
        return None;
    }
    match &vr {
        b"UI" if !map_uids => None,
        // A tag the dictionary does not know, sent as UN: what it holds cannot be told.
        b"UN" => Some(Action::Zero),
        b"PN" | b"DA" | b"DT" | b"TM" | b"ST" | b"LT" | b"UT" | b"UC" | b"LO" | b"SH" | b"DS"
        | b"IS" | b"FL" | b"FD" | b"UI" => Some(Action::Dummy),
        _ => None,
    }
}

/// The repeating overlay groups 6000-601E (even: odd groups are private).
fn is_overlay_group(group: u16) -> bool {
    (0x6000..=0x601E).contains(&group) && group.is_multiple_of(2)
}

/// The VR of a tag from the standard dictionary (US for US-or-SS, OW for OB-or-OW).
fn dictionary_vr(tag: u32) -> Option<[u8; 2]> {
    let (group, element) = split(tag);
    let entry = StandardDataDictionary.by_tag(Tag(group, element))?;
    Some(match entry.vr() {
        VirtualVr::Exact(vr) => vr.to_bytes(),
        VirtualVr::Xs => VR::US.to_bytes(),
        VirtualVr::Ox | VirtualVr::Px | VirtualVr::Lt => VR::OW.to_bytes(),
        _ => return None,
    })
}
