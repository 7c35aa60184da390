//! HL7 v2 message structure on already-decoded text (see [`crate::charset`]).
//!
//! [`parse`] borrows the text and splits it once into segments and fields; repetitions,
//! components and sub-components are split on access. Values are raw (still escaped) until
//! [`unescape`]d, so the text can be re-serialised exactly ([`Message::serialize`]).
//!
//! Rules:
//! - The text must start with `MSH`. MSH-1 is the character after `MSH` (the field
//!   separator); MSH-2 holds 4 encoding characters (component, repetition, escape,
//!   sub-component) and optionally a 5th, the v2.7 truncation character (kept, otherwise
//!   ignored). All must be distinct ASCII punctuation (not alphanumeric, not CR/LF/space or
//!   another control, and never a non-ASCII character: the acknowledgement repeats them in
//!   the message's character set, where only ASCII is sure to read back the same). A frame
//!   with other delimiters is refused (answered with the minimal NAK). MSH-1 and MSH-2 are
//!   never split into components.
//! - Segments end at CR (the standard), and leniently at LF or CR LF; empty lines are kept
//!   for re-serialisation but are not segments. Segment IDs are 3 upper-case letters or
//!   digits. A second MSH (batches) is an error.
//! - Addresses are 1-based everywhere: field numbers as in the standard (MSH-3 is
//!   `field(3)` of MSH), repetition 1 is the first, component 1 the first.
//! - Errors carry an HL7 table 0357 [`ErrorCode`] and a [`Location`], never content.

use std::fmt;

/// HL7 table 0357 (message error condition codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 100
    SegmentSequenceError,
    /// 101
    RequiredFieldMissing,
    /// 102
    DataTypeError,
    /// 103
    TableValueNotFound,
    /// 200
    UnsupportedMessageType,
    /// 201
    UnsupportedEventCode,
    /// 202
    UnsupportedProcessingId,
    /// 203
    UnsupportedVersionId,
    /// 204
    UnknownKeyIdentifier,
    /// 205
    DuplicateKeyIdentifier,
    /// 206
    ApplicationRecordLocked,
    /// 207
    ApplicationInternalError,
}

impl ErrorCode {
    /// The numeric code (ERR-3.1).
    pub fn code(self) -> u16 {
        match self {
            Self::SegmentSequenceError => 100,
            Self::RequiredFieldMissing => 101,
            Self::DataTypeError => 102,
            Self::TableValueNotFound => 103,
            Self::UnsupportedMessageType => 200,
            Self::UnsupportedEventCode => 201,
            Self::UnsupportedProcessingId => 202,
            Self::UnsupportedVersionId => 203,
            Self::UnknownKeyIdentifier => 204,
            Self::DuplicateKeyIdentifier => 205,
            Self::ApplicationRecordLocked => 206,
            Self::ApplicationInternalError => 207,
        }
    }

    /// The table's fixed text (ERR-3.2). Never patient data.
    pub fn text(self) -> &'static str {
        match self {
            Self::SegmentSequenceError => "Segment sequence error",
            Self::RequiredFieldMissing => "Required field missing",
            Self::DataTypeError => "Data type error",
            Self::TableValueNotFound => "Table value not found",
            Self::UnsupportedMessageType => "Unsupported message type",
            Self::UnsupportedEventCode => "Unsupported event code",
            Self::UnsupportedProcessingId => "Unsupported processing id",
            Self::UnsupportedVersionId => "Unsupported version id",
            Self::UnknownKeyIdentifier => "Unknown key identifier",
            Self::DuplicateKeyIdentifier => "Duplicate key identifier",
            Self::ApplicationRecordLocked => "Application record locked",
            Self::ApplicationInternalError => "Application internal error",
        }
    }

    /// True for codes about the message as a whole rather than its content (2xx), which the
    /// original acknowledgement mode answers with AR rather than AE.
    pub fn is_rejection(self) -> bool {
        self.code() >= 200
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.text())
    }
}

/// Where an error lies (HL7 ERL: segment ID, segment sequence, field, component).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// Segment ID (validated: 3 upper-case letters/digits), empty if the segment had none.
    pub segment: String,
    /// 1-based occurrence of that segment ID in the message (or line number when `segment`
    /// is empty).
    pub sequence: usize,
    /// Field number (0 = the segment as a whole).
    pub field: usize,
    /// Component number (0 = the field as a whole).
    pub component: usize,
}

impl Location {
    /// A whole segment.
    pub fn segment(segment: &str, sequence: usize) -> Self {
        Self::field(segment, sequence, 0)
    }

    /// A field.
    pub fn field(segment: &str, sequence: usize, field: usize) -> Self {
        Self::component(segment, sequence, field, 0)
    }

    /// A component.
    pub fn component(segment: &str, sequence: usize, field: usize, component: usize) -> Self {
        Self {
            segment: segment.chars().take(3).collect(),
            sequence,
            field,
            component,
        }
    }
}

/// `PID-5.2` style, with the sequence in brackets when > 1: `IAM[2]-3`.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segment.is_empty() {
            write!(f, "line {}", self.sequence)?;
        } else {
            f.write_str(&self.segment)?;
            if self.sequence > 1 {
                write!(f, "[{}]", self.sequence)?;
            }
        }
        if self.field > 0 {
            write!(f, "-{}", self.field)?;
            if self.component > 0 {
                write!(f, ".{}", self.component)?;
            }
        }
        Ok(())
    }
}

/// A structural or content error, with its HL7 code and location. Never holds content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (HL7 {code}{})", .location.as_ref().map(|l| format!(" at {l}")).unwrap_or_default())]
pub struct ParseError {
    /// HL7 table 0357 code.
    pub code: ErrorCode,
    /// Where, when known.
    pub location: Option<Location>,
    /// A fixed explanation.
    pub reason: &'static str,
}

impl ParseError {
    /// Builds an error.
    pub fn new(code: ErrorCode, location: Option<Location>, reason: &'static str) -> Self {
        Self {
            code,
            location,
            reason,
        }
    }
}

/// The delimiters of one message, from MSH-1 and MSH-2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delimiters {
    /// MSH-1, usually `|`.
    pub field: char,
    /// Usually `^`.
    pub component: char,
    /// Usually `~`.
    pub repetition: char,
    /// Usually `\`.
    pub escape: char,
    /// Usually `&`.
    pub subcomponent: char,
    /// v2.7 truncation character, usually `#`, when MSH-2 has a 5th character.
    pub truncation: Option<char>,
}

impl Default for Delimiters {
    fn default() -> Self {
        Self {
            field: '|',
            component: '^',
            repetition: '~',
            escape: '\\',
            subcomponent: '&',
            truncation: None,
        }
    }
}

impl Delimiters {
    /// MSH-2 as it would be written.
    pub fn encoding_characters(&self) -> String {
        let mut s = String::with_capacity(5);
        s.push(self.component);
        s.push(self.repetition);
        s.push(self.escape);
        s.push(self.subcomponent);
        if let Some(t) = self.truncation {
            s.push(t);
        }
        s
    }

    fn is_delimiter(&self, c: char) -> bool {
        c == self.field
            || c == self.component
            || c == self.repetition
            || c == self.escape
            || c == self.subcomponent
    }
}

/// One line of the text: a segment's fields (empty for a blank line) and its terminator.
#[derive(Clone, PartialEq, Eq)]
struct Line<'a> {
    /// fields[0] is the segment ID; for MSH, fields[1] is the field separator and fields[2]
    /// MSH-2, so that fields[n] is always field n.
    fields: Vec<&'a str>,
    terminator: &'a str,
}

/// A parsed message borrowing its decoded text.
#[derive(Clone, PartialEq, Eq)]
pub struct Message<'a> {
    text: &'a str,
    delimiters: Delimiters,
    lines: Vec<Line<'a>>,
}

/// Never prints content: only the segment IDs.
impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("delimiters", &self.delimiters)
            .field(
                "segments",
                &self.segments().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Parses decoded text. See the module docs for the rules.
pub fn parse(text: &str) -> Result<Message<'_>, ParseError> {
    let msh = || Some(Location::segment("MSH", 1));
    if !text.starts_with("MSH") {
        return Err(ParseError::new(
            ErrorCode::SegmentSequenceError,
            None,
            "message does not start with an MSH segment",
        ));
    }
    let after = text.get(3..).unwrap_or_default();
    let Some(field) = after.chars().next() else {
        return Err(ParseError::new(
            ErrorCode::RequiredFieldMissing,
            Some(Location::field("MSH", 1, 1)),
            "MSH-1 field separator missing",
        ));
    };
    if !valid_delimiter(field) {
        return Err(ParseError::new(
            ErrorCode::DataTypeError,
            Some(Location::field("MSH", 1, 1)),
            "MSH-1 is not a usable field separator",
        ));
    }
    let fs_len = field.len_utf8();
    let msh2: &str = {
        let rest = after.get(fs_len..).unwrap_or_default();
        let end = rest.find([field, '\r', '\n']).unwrap_or(rest.len());
        rest.get(..end).unwrap_or_default()
    };
    let enc: Vec<char> = msh2.chars().collect();
    if enc.len() < 4 || enc.len() > 5 {
        return Err(ParseError::new(
            ErrorCode::DataTypeError,
            Some(Location::field("MSH", 1, 2)),
            "MSH-2 must hold 4 or 5 encoding characters",
        ));
    }
    for (i, &c) in enc.iter().enumerate() {
        if !valid_delimiter(c) || c == field || enc.get(..i).is_some_and(|p| p.contains(&c)) {
            return Err(ParseError::new(
                ErrorCode::DataTypeError,
                Some(Location::field("MSH", 1, 2)),
                "MSH-2 encoding characters are not distinct usable delimiters",
            ));
        }
    }
    let delimiters = Delimiters {
        field,
        component: enc.first().copied().unwrap_or('^'),
        repetition: enc.get(1).copied().unwrap_or('~'),
        escape: enc.get(2).copied().unwrap_or('\\'),
        subcomponent: enc.get(3).copied().unwrap_or('&'),
        truncation: enc.get(4).copied(),
    };

    let mut lines = Vec::new();
    let mut rest = text;
    let mut line_no = 0usize;
    while !rest.is_empty() {
        line_no += 1;
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        let content = rest.get(..end).unwrap_or_default();
        let tail = rest.get(end..).unwrap_or_default();
        let term_len = if tail.starts_with("\r\n") {
            2
        } else if tail.is_empty() {
            0
        } else {
            1
        };
        let terminator = tail.get(..term_len).unwrap_or_default();
        rest = tail.get(term_len..).unwrap_or_default();

        let fields = if content.is_empty() {
            Vec::new()
        } else if line_no == 1 {
            // "MSH" fs MSH-2 fs MSH-3 ...
            let mut fields = vec![
                content.get(..3).unwrap_or_default(),
                content.get(3..3 + fs_len).unwrap_or_default(),
            ];
            fields.extend(content.get(3 + fs_len..).unwrap_or_default().split(field));
            fields
        } else {
            let fields: Vec<&str> = content.split(field).collect();
            let name = fields.first().copied().unwrap_or_default();
            if name.len() != 3
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            {
                return Err(ParseError::new(
                    ErrorCode::SegmentSequenceError,
                    Some(Location::segment("", line_no)),
                    "segment ID is not 3 upper-case letters or digits",
                ));
            }
            if name == "MSH" {
                return Err(ParseError::new(
                    ErrorCode::SegmentSequenceError,
                    Some(Location::segment("MSH", 2)),
                    "more than one MSH segment in a frame",
                ));
            }
            fields
        };
        lines.push(Line { fields, terminator });
    }
    let message = Message {
        text,
        delimiters,
        lines,
    };
    if message.segments().next().is_none() {
        return Err(ParseError::new(
            ErrorCode::SegmentSequenceError,
            msh(),
            "empty MSH segment",
        ));
    }
    Ok(message)
}

/// A usable delimiter: ASCII punctuation (printable, not a letter, digit or space). Not
/// ASCII is refused: a delimiter decoded from e.g. a Shift_JIS user-defined or
/// half-width/full-width character does not survive the ACK's re-encoding.
fn valid_delimiter(c: char) -> bool {
    c.is_ascii_punctuation()
}

impl<'a> Message<'a> {
    /// The text this message was parsed from.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// The delimiters from MSH-1/MSH-2.
    pub fn delimiters(&self) -> &Delimiters {
        &self.delimiters
    }

    /// All segments in order (blank lines skipped).
    pub fn segments(&self) -> impl Iterator<Item = Segment<'_>> + '_ {
        self.lines
            .iter()
            .filter(|l| !l.fields.is_empty())
            .map(|l| Segment {
                fields: &l.fields,
                delimiters: &self.delimiters,
            })
    }

    /// All segments with this ID, in order.
    pub fn segments_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = Segment<'s>> + 's {
        self.segments().filter(move |s| s.name() == name)
    }

    /// The first segment with this ID.
    pub fn segment(&self, name: &str) -> Option<Segment<'_>> {
        self.segments().find(|s| s.name() == name)
    }

    /// The MSH segment.
    pub fn msh(&self) -> Option<Segment<'_>> {
        self.segments().next()
    }

    /// Raw (escaped) value at `segment-field(rep).component.sub` of the first segment with
    /// that ID; all positions 1-based. `None` if absent.
    pub fn get(
        &self,
        segment: &str,
        field: usize,
        rep: usize,
        component: usize,
        sub: usize,
    ) -> Option<&str> {
        self.segment(segment)?
            .field(field)?
            .repetition(rep)?
            .component(component)?
            .subcomponent(sub)
            .map(|s| s.raw())
    }

    /// Re-serialises the message from its parsed tree (fields, repetitions, components and
    /// sub-components joined by the message's delimiters, original segment terminators).
    /// Equal to the parsed text for every message `parse` accepts.
    pub fn serialize(&self) -> String {
        let d = &self.delimiters;
        let mut out = String::with_capacity(self.text.len());
        for line in &self.lines {
            let segment = Segment {
                fields: &line.fields,
                delimiters: d,
            };
            if let Some(name) = line.fields.first() {
                out.push_str(name);
                let is_msh = segment.is_msh();
                for n in 1..line.fields.len() {
                    if !(is_msh && n == 2) {
                        out.push(d.field);
                    }
                    if let Some(f) = segment.field(n) {
                        if f.literal {
                            // MSH-1 is the separator itself, MSH-2 is not split.
                            if n == 2 {
                                out.push_str(f.raw);
                            }
                        } else {
                            f.write_to(&mut out);
                        }
                    }
                }
            }
            out.push_str(line.terminator);
        }
        out
    }
}

/// One segment.
#[derive(Clone, Copy)]
pub struct Segment<'m> {
    fields: &'m [&'m str],
    delimiters: &'m Delimiters,
}

impl fmt::Debug for Segment<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Segment({}, {} fields)", self.name(), self.field_count())
    }
}

impl<'m> Segment<'m> {
    /// The segment ID.
    pub fn name(&self) -> &'m str {
        self.fields.first().copied().unwrap_or_default()
    }

    fn is_msh(&self) -> bool {
        self.name() == "MSH"
    }

    /// The number of fields present (the highest field number), not counting the ID.
    pub fn field_count(&self) -> usize {
        self.fields.len().saturating_sub(1)
    }

    /// Field `n` (1-based, as in the standard); `None` beyond the last field present.
    pub fn field(&self, n: usize) -> Option<Field<'m>> {
        if n == 0 {
            return None;
        }
        let raw = *self.fields.get(n)?;
        Some(Field {
            raw,
            delimiters: self.delimiters,
            literal: self.is_msh() && n <= 2,
        })
    }

    /// Raw field text, or `""` when absent.
    pub fn raw(&self, n: usize) -> &'m str {
        self.field(n).map(|f| f.raw).unwrap_or_default()
    }
}

/// One field: repetitions separated by the repetition character.
#[derive(Clone, Copy)]
pub struct Field<'m> {
    raw: &'m str,
    delimiters: &'m Delimiters,
    literal: bool,
}

impl fmt::Debug for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Field(<{} bytes>)", self.raw.len())
    }
}

impl<'m> Field<'m> {
    /// Raw (escaped) text.
    pub fn raw(&self) -> &'m str {
        self.raw
    }

    /// True when the field is empty.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The repetitions, in order (one, possibly empty, for a field without repetition).
    pub fn repetitions(&self) -> impl Iterator<Item = Repetition<'m>> + 'm {
        let d = self.delimiters;
        let literal = self.literal;
        let raw = self.raw;
        let mut parts = raw.split(d.repetition);
        let mut literal_done = false;
        std::iter::from_fn(move || {
            if literal {
                if literal_done {
                    return None;
                }
                literal_done = true;
                return Some(Repetition {
                    raw,
                    delimiters: d,
                    literal,
                });
            }
            parts.next().map(|raw| Repetition {
                raw,
                delimiters: d,
                literal,
            })
        })
    }

    /// Repetition `n` (1-based).
    pub fn repetition(&self, n: usize) -> Option<Repetition<'m>> {
        self.repetitions().nth(n.checked_sub(1)?)
    }

    /// Unescaped text of the whole field.
    pub fn value(&self) -> String {
        if self.literal {
            return self.raw.to_owned();
        }
        unescape(self.raw, self.delimiters)
    }

    fn write_to(&self, out: &mut String) {
        for (i, rep) in self.repetitions().enumerate() {
            if i > 0 {
                out.push(self.delimiters.repetition);
            }
            for (j, comp) in rep.components().enumerate() {
                if j > 0 {
                    out.push(self.delimiters.component);
                }
                for (k, sub) in comp.subcomponents().enumerate() {
                    if k > 0 {
                        out.push(self.delimiters.subcomponent);
                    }
                    out.push_str(sub.raw());
                }
            }
        }
    }
}

/// One repetition of a field: components.
#[derive(Clone, Copy)]
pub struct Repetition<'m> {
    raw: &'m str,
    delimiters: &'m Delimiters,
    literal: bool,
}

impl fmt::Debug for Repetition<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Repetition(<{} bytes>)", self.raw.len())
    }
}

impl<'m> Repetition<'m> {
    /// Raw text.
    pub fn raw(&self) -> &'m str {
        self.raw
    }

    /// The components, in order.
    pub fn components(&self) -> impl Iterator<Item = Component<'m>> + 'm {
        let d = self.delimiters;
        let literal = self.literal;
        split_literal(self.raw, d.component, literal).map(move |raw| Component {
            raw,
            delimiters: d,
            literal,
        })
    }

    /// Component `n` (1-based).
    pub fn component(&self, n: usize) -> Option<Component<'m>> {
        self.components().nth(n.checked_sub(1)?)
    }

    /// Unescaped text of component `n`, `""` if absent.
    pub fn value(&self, n: usize) -> String {
        self.component(n).map(|c| c.value()).unwrap_or_default()
    }
}

/// One component: sub-components.
#[derive(Clone, Copy)]
pub struct Component<'m> {
    raw: &'m str,
    delimiters: &'m Delimiters,
    literal: bool,
}

impl fmt::Debug for Component<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Component(<{} bytes>)", self.raw.len())
    }
}

impl<'m> Component<'m> {
    /// Raw text.
    pub fn raw(&self) -> &'m str {
        self.raw
    }

    /// The sub-components, in order.
    pub fn subcomponents(&self) -> impl Iterator<Item = Subcomponent<'m>> + 'm {
        let d = self.delimiters;
        split_literal(self.raw, d.subcomponent, self.literal)
            .map(move |raw| Subcomponent { raw, delimiters: d })
    }

    /// Sub-component `n` (1-based).
    pub fn subcomponent(&self, n: usize) -> Option<Subcomponent<'m>> {
        self.subcomponents().nth(n.checked_sub(1)?)
    }

    /// Unescaped text of the whole component.
    pub fn value(&self) -> String {
        if self.literal {
            return self.raw.to_owned();
        }
        unescape(self.raw, self.delimiters)
    }
}

/// One sub-component.
#[derive(Clone, Copy)]
pub struct Subcomponent<'m> {
    raw: &'m str,
    delimiters: &'m Delimiters,
}

impl fmt::Debug for Subcomponent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Subcomponent(<{} bytes>)", self.raw.len())
    }
}

impl<'m> Subcomponent<'m> {
    /// Raw text.
    pub fn raw(&self) -> &'m str {
        self.raw
    }

    /// Unescaped text.
    pub fn value(&self) -> String {
        unescape(self.raw, self.delimiters)
    }
}

fn split_literal(raw: &str, sep: char, literal: bool) -> impl Iterator<Item = &str> {
    let mut parts = raw.split(sep);
    let mut done = false;
    std::iter::from_fn(move || {
        if literal {
            if done {
                return None;
            }
            done = true;
            Some(raw)
        } else {
            parts.next()
        }
    })
}

/// Replaces HL7 escape sequences in a raw value:
/// `\F\` `\S\` `\T\` `\R\` `\E\` become the delimiters; `\P\` (v2.7 truncation) its
/// character; `\Xhh..\` the bytes `hh..` when they are UTF-8 (e.g. `\X0D\`), else the
/// sequence is kept; `\H\` and `\N\` (highlighting) are dropped; `\.br\` becomes a line feed;
/// other formatting commands (`\.sp\`, `\.in\`, ...), character set switches (`\C..\`,
/// `\M..\`), `\Z..\` and an escape character without its closing one are kept verbatim.
pub fn unescape(raw: &str, d: &Delimiters) -> String {
    let esc = d.escape;
    if !raw.contains(esc) {
        return raw.to_owned();
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find(esc) {
        out.push_str(rest.get(..start).unwrap_or_default());
        let after = rest.get(start + esc.len_utf8()..).unwrap_or_default();
        let Some(end) = after.find(esc) else {
            // Unterminated: keep the rest as is.
            out.push_str(rest.get(start..).unwrap_or_default());
            return out;
        };
        let body = after.get(..end).unwrap_or_default();
        let whole_len = esc.len_utf8() * 2 + end;
        let whole = rest.get(start..start + whole_len).unwrap_or_default();
        match body {
            "F" => out.push(d.field),
            "S" => out.push(d.component),
            "T" => out.push(d.subcomponent),
            "R" => out.push(d.repetition),
            "E" => out.push(esc),
            "P" => match d.truncation {
                Some(t) => out.push(t),
                None => out.push_str(whole),
            },
            "H" | "N" => {}
            ".br" => out.push('\n'),
            _ if body.len() >= 3 && body.starts_with('X') => {
                match hex_bytes(body.get(1..).unwrap_or_default()) {
                    Some(text) => out.push_str(&text),
                    None => out.push_str(whole),
                }
            }
            _ => out.push_str(whole),
        }
        rest = rest.get(start + whole_len..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

fn hex_bytes(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Escapes delimiter characters (and CR/LF as `\X0D\`/`\X0A\`) so `text` can be placed in a
/// field. Inverse of [`unescape`] for such text.
pub fn escape(text: &str, d: &Delimiters) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == d.field {
            push_escape(&mut out, d, "F");
        } else if c == d.component {
            push_escape(&mut out, d, "S");
        } else if c == d.subcomponent {
            push_escape(&mut out, d, "T");
        } else if c == d.repetition {
            push_escape(&mut out, d, "R");
        } else if c == d.escape {
            push_escape(&mut out, d, "E");
        } else if c == '\r' {
            push_escape(&mut out, d, "X0D");
        } else if c == '\n' {
            push_escape(&mut out, d, "X0A");
        } else {
            out.push(c);
        }
    }
    debug_assert!(!out.chars().any(|c| d.is_delimiter(c) && c != d.escape));
    out
}

fn push_escape(out: &mut String, d: &Delimiters, body: &str) {
    out.push(d.escape);
    out.push_str(body);
    out.push(d.escape);
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADT: &str = "MSH|^~\\&|HIS|HOSP|RIS|RAD|20240101120000||ADT^A08^ADT_A01|MSG0001|P|2.5\rEVN|A08|20240101120000\rPID|1||123456^^^HOSP^PI~987^^^NATION^NI||YAMADA^TARO^^^^^L^A||19700101|M\r";

    #[test]
    fn msh_fields_are_numbered_as_in_the_standard() {
        let m = parse(ADT).unwrap();
        let msh = m.msh().unwrap();
        assert_eq!(msh.raw(1), "|");
        assert_eq!(msh.raw(2), "^~\\&");
        assert_eq!(msh.raw(3), "HIS");
        assert_eq!(msh.raw(9), "ADT^A08^ADT_A01");
        assert_eq!(msh.raw(10), "MSG0001");
        assert_eq!(msh.raw(12), "2.5");
        assert_eq!(msh.field_count(), 12);
        assert_eq!(m.get("MSH", 9, 1, 2, 1), Some("A08"));
        // MSH-2 is never split although it contains ^ ~ &.
        assert_eq!(m.get("MSH", 2, 1, 1, 1), Some("^~\\&"));
        assert_eq!(m.get("MSH", 1, 1, 1, 1), Some("|"));
    }

    #[test]
    fn repetitions_components_and_subcomponents_are_addressable() {
        let m = parse(ADT).unwrap();
        let pid3 = m.segment("PID").unwrap().field(3).unwrap();
        assert_eq!(pid3.repetitions().count(), 2);
        assert_eq!(m.get("PID", 3, 2, 1, 1), Some("987"));
        assert_eq!(m.get("PID", 3, 2, 4, 1), Some("NATION"));
        assert_eq!(m.get("PID", 3, 3, 1, 1), None);
        assert_eq!(m.get("PID", 5, 1, 8, 1), Some("A"));
        assert_eq!(m.get("PID", 5, 0, 1, 1), None);
        assert_eq!(m.get("ZZZ", 1, 1, 1, 1), None);
        let s = parse("MSH|^~\\&|a&b^c\r").unwrap();
        assert_eq!(s.get("MSH", 3, 1, 1, 2), Some("b"));
        assert_eq!(s.get("MSH", 3, 1, 2, 1), Some("c"));
    }

    #[test]
    fn segments_split_on_cr_lf_and_crlf_and_serialize_back_exactly() {
        for text in [
            ADT,
            "MSH|^~\\&|A\nPID|1\r\nPV1|\r\rOBX|1|TX|||a^b&c~d\\F\\",
            "MSH|^~\\&#|A|||||||||||||||\r",
            "MSH$%*!@$A%B$C\rPID$1$x%y*z@w",
        ] {
            let m = parse(text).unwrap();
            assert_eq!(m.serialize(), text);
        }
        let m = parse("MSH|^~\\&|A\nPID|1\r\nPV1|\r\rOBX|1").unwrap();
        let names: Vec<_> = m.segments().map(|s| s.name()).collect();
        assert_eq!(names, ["MSH", "PID", "PV1", "OBX"]);
    }

    #[test]
    fn custom_delimiters_are_honoured() {
        let m = parse("MSH$%*!@$A%B$C\rPID$1$x%y*z@w").unwrap();
        assert_eq!(m.delimiters().field, '$');
        assert_eq!(m.get("PID", 2, 1, 2, 1), Some("y"));
        assert_eq!(m.get("PID", 2, 2, 1, 2), Some("w"));
    }

    #[test]
    fn truncation_character_is_tolerated() {
        let m = parse("MSH|^~\\&#|A\rNTE|1||x\\P\\y").unwrap();
        assert_eq!(m.delimiters().truncation, Some('#'));
        let nte = m.segment("NTE").unwrap().field(3).unwrap();
        assert_eq!(nte.value(), "x#y");
    }

    #[test]
    fn escapes_unescape_to_delimiters_and_bytes() {
        let d = Delimiters::default();
        assert_eq!(
            unescape("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f", &d),
            "a|b^c&d~e\\f"
        );
        assert_eq!(unescape("line\\X0D0A\\next", &d), "line\r\nnext");
        assert_eq!(unescape("\\XE694BE\\", &d), "放");
        assert_eq!(unescape("\\H\\bold\\N\\", &d), "bold");
        assert_eq!(unescape("a\\.br\\b", &d), "a\nb");
        assert_eq!(unescape("a\\.sp2\\b", &d), "a\\.sp2\\b");
        assert_eq!(unescape("\\XZZ\\", &d), "\\XZZ\\");
        assert_eq!(unescape("\\X0\\", &d), "\\X0\\");
        assert_eq!(unescape("trailing\\", &d), "trailing\\");
        assert_eq!(unescape("un\\Fterminated", &d), "un\\Fterminated");
        assert_eq!(unescape("\\\\", &d), "\\\\");
    }

    #[test]
    fn escape_is_inverse_of_unescape() {
        let d = Delimiters::default();
        let text = "a|b^c&d~e\\f\rg\nh 放";
        let escaped = escape(text, &d);
        assert_eq!(
            escaped,
            "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\X0D\\g\\X0A\\h 放"
        );
        assert_eq!(unescape(&escaped, &d), text);
    }

    #[test]
    fn structural_errors_carry_codes_and_locations() {
        let e = parse("PID|1").unwrap_err();
        assert_eq!(e.code.code(), 100);
        let e = parse("MSH").unwrap_err();
        assert_eq!(e.code.code(), 101);
        let e = parse("MSH|^~|A").unwrap_err();
        assert_eq!(e.code.code(), 102);
        assert_eq!(e.location, Some(Location::field("MSH", 1, 2)));
        let e = parse("MSH|^~\\^|A").unwrap_err();
        assert_eq!(e.code.code(), 102);
        let e = parse("MSHA^~\\&").unwrap_err();
        assert_eq!(e.code.code(), 102);
        let e = parse("MSH|^~\\&|A\rpid|1").unwrap_err();
        assert_eq!(e.code.code(), 100);
        assert_eq!(
            e.to_string(),
            "segment ID is not 3 upper-case letters or digits (HL7 100 Segment sequence error at line 2)"
        );
        let e = parse("MSH|^~\\&|A\rMSH|^~\\&|B").unwrap_err();
        assert_eq!(e.code.code(), 100);
    }

    #[test]
    fn debug_prints_structure_not_content() {
        let m = parse(ADT).unwrap();
        let s = format!("{m:?}");
        assert!(!s.contains("YAMADA"), "{s}");
        assert!(s.contains("PID"));
        let f = m.segment("PID").unwrap().field(5).unwrap();
        assert!(!format!("{f:?}").contains("YAMADA"));
    }
}
