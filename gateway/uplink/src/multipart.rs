//! A streaming parser of the `multipart/related; type="application/dicom"` body of a WADO-RS
//! instance retrieval (RFC 2046 5.1, RFC 2387, PS3.18 8.7.3), for untrusted bytes.
//!
//! The body is fed in chunks as they arrive ([`Multipart::feed`]); the bytes of the one part
//! it must hold come out as soon as they cannot be the start of a delimiter, so a whole
//! instance is never held in memory. What it enforces:
//! - the boundary comes from the response's `Content-Type` ([`boundary`]: media type
//!   `multipart/related`, `boundary` parameter quoted or not, 1-70 characters of RFC 2046's
//!   `bchars`);
//! - a delimiter is `CRLF--boundary` (at the very start the CRLF may be absent: preamble
//!   optional), followed by optional transport padding (spaces, tabs) and CRLF, or by `--`
//!   (the close delimiter), after which the epilogue is ignored;
//! - exactly one part; its header block (lines ending in CRLF, ended by an empty line) holds
//!   `Content-Type: application/dicom` and is at most [`Limits::max_header_bytes`]; its body
//!   starts with a Part 10 preamble and `DICM` and is at most [`Limits::max_part_bytes`];
//! - the preamble is at most [`Limits::max_preamble_bytes`];
//! - the body ends with the close delimiter: [`Multipart::finish`] says truncated otherwise.
//!
//! Errors never quote the body (it is patient data); at most a shortened, printable form of a
//! header value.

/// Offset of `DICM` in a Part 10 file (after the 128-byte preamble).
const DICM_AT: usize = 128;

/// Size bounds of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes before the first delimiter.
    pub max_preamble_bytes: u64,
    /// The part's header block.
    pub max_header_bytes: usize,
    /// The part's body (the DICOM file).
    pub max_part_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_preamble_bytes: 64 << 10,
            max_header_bytes: 16 << 10,
            max_part_bytes: 4 << 30,
        }
    }
}

/// Why a multipart body (or its `Content-Type`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    /// The response's `Content-Type` is not `multipart/related` with a usable boundary.
    #[error("response Content-Type {content_type:?}: {reason}")]
    ContentType {
        /// The header value, shortened and printable.
        content_type: String,
        reason: &'static str,
    },
    /// More than `limit` bytes before the first delimiter (or no delimiter at all).
    #[error("no multipart boundary within the first {limit} bytes")]
    PreambleTooLarge { limit: u64 },
    /// A delimiter line is followed by something other than padding and CRLF, or `--`.
    #[error("malformed multipart delimiter line: {reason}")]
    Delimiter { reason: &'static str },
    /// The header block of the part is malformed.
    #[error("malformed part headers: {reason}")]
    Headers { reason: &'static str },
    /// The header block of the part is longer than `limit` bytes.
    #[error("part headers longer than {limit} bytes")]
    HeadersTooLarge { limit: usize },
    /// The part is not a DICOM Part 10 object.
    #[error("the part is not a DICOM file: {reason}")]
    NotDicom {
        reason: &'static str,
        /// The part's Content-Type, shortened and printable (empty when absent).
        content_type: String,
    },
    /// The part's body is longer than `limit` bytes.
    #[error("part larger than {limit} bytes")]
    PartTooLarge { limit: u64 },
    /// The body holds no part (a close delimiter first).
    #[error("the multipart body holds no part")]
    NoPart,
    /// The body holds more than the one part expected.
    #[error("the multipart body holds more than one part")]
    TooManyParts,
    /// The body ended before its close delimiter.
    #[error("the multipart body ended early ({at})")]
    Truncated { at: &'static str },
}

/// The boundary of a `multipart/related` `Content-Type` value.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let refuse = |reason| MultipartError::ContentType {
        content_type: printable(content_type),
        reason,
    };
    let mut params = split_params(content_type).ok_or_else(|| refuse("unbalanced quotes"))?;
    let media = params.next().unwrap_or_default();
    if !media.trim().eq_ignore_ascii_case("multipart/related") {
        return Err(refuse("not multipart/related"));
    }
    let mut found = None;
    for param in params {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let (name, value) = param
            .split_once('=')
            .ok_or_else(|| refuse("a parameter without a value"))?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            continue;
        }
        if found.is_some() {
            return Err(refuse("two boundary parameters"));
        }
        found = Some(unquote(value.trim()).ok_or_else(|| refuse("a malformed quoted boundary"))?);
    }
    let b = found.ok_or_else(|| refuse("no boundary parameter"))?;
    // RFC 2046: 1-70 bchars, not ending in a space.
    let valid = !b.is_empty()
        && b.len() <= 70
        && !b.ends_with(' ')
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c));
    if !valid {
        return Err(refuse("a boundary that is not 1-70 RFC 2046 characters"));
    }
    Ok(b)
}

/// `;`-separated pieces of a header value, `;` inside quotes kept; `None` if a quote is open.
fn split_params(value: &str) -> Option<impl Iterator<Item = &str>> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                pieces.push(value.get(start..i)?);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return None;
    }
    pieces.push(value.get(start..)?);
    Some(pieces.into_iter())
}

/// A parameter value: a token as is, or a quoted string with its escapes undone.
fn unquote(v: &str) -> Option<String> {
    let Some(inner) = v.strip_prefix('"') else {
        return Some(v.to_string());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// A header value for an error message: printable ASCII, at most 100 characters.
fn printable(s: &str) -> String {
    s.chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for the first delimiter.
    Preamble,
    /// Just after a delimiter: padding and CRLF (a part follows) or `--` (the end).
    AfterDelimiter,
    /// In the part's header block.
    Headers,
    /// In the part's body.
    Body,
    /// After the close delimiter: everything is ignored.
    Epilogue,
}

/// The streaming parser of one response body.
#[derive(Debug)]
pub struct Multipart {
    /// `CRLF--boundary`.
    delimiter: Vec<u8>,
    limits: Limits,
    state: State,
    /// Input not yet consumed (at most a delimiter's length plus the last chunk, or a header
    /// block).
    pending: Vec<u8>,
    preamble: u64,
    parts: usize,
    body: u64,
    /// The first bytes of the body, up to `DICM`, to check the Part 10 signature.
    head: Vec<u8>,
    content_type: String,
}

impl Multipart {
    /// A parser for a body whose boundary is `boundary` (see [`boundary`]).
    pub fn new(boundary: &str, limits: Limits) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        Self {
            delimiter,
            limits,
            state: State::Preamble,
            // The CRLF that lets a delimiter at the very start match like any other.
            pending: b"\r\n".to_vec(),
            preamble: 0,
            parts: 0,
            body: 0,
            head: Vec::with_capacity(DICM_AT + 4),
            content_type: String::new(),
        }
    }

    /// Parses the next chunk of the body; appends the part's body bytes that are certain to
    /// `out`. After an error the parser must not be used again.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), MultipartError> {
        self.pending.extend_from_slice(input);
        loop {
            let progressed = match self.state {
                State::Preamble => self.preamble()?,
                State::AfterDelimiter => self.after_delimiter()?,
                State::Headers => self.headers()?,
                State::Body => self.body(out)?,
                State::Epilogue => {
                    self.pending.clear();
                    false
                }
            };
            if !progressed {
                return Ok(());
            }
        }
    }

    /// The end of the body: `Ok` only after the close delimiter of a body with one part.
    pub fn finish(&self) -> Result<(), MultipartError> {
        let at = match self.state {
            State::Epilogue => return Ok(()),
            State::Preamble => "no boundary",
            State::AfterDelimiter => "after a boundary",
            State::Headers => "in the part headers",
            State::Body => "in the part body, no closing boundary",
        };
        Err(MultipartError::Truncated { at })
    }

    /// The part's `Content-Type` (empty before its headers were read).
    pub fn part_content_type(&self) -> &str {
        &self.content_type
    }

    fn preamble(&mut self) -> Result<bool, MultipartError> {
        if let Some(i) = find(&self.pending, &self.delimiter) {
            self.preamble = self.preamble.saturating_add(i as u64);
            self.check_preamble()?;
            self.pending.drain(..i + self.delimiter.len());
            self.state = State::AfterDelimiter;
            return Ok(true);
        }
        let keep = self.delimiter.len() - 1;
        if self.pending.len() > keep {
            let n = self.pending.len() - keep;
            self.preamble = self.preamble.saturating_add(n as u64);
            self.pending.drain(..n);
        }
        self.check_preamble()?;
        Ok(false)
    }

    /// The same bound whether the delimiter came in the same chunk or later (the count
    /// includes the 2 bytes of the virtual CRLF).
    fn check_preamble(&self) -> Result<(), MultipartError> {
        if self.preamble > self.limits.max_preamble_bytes.saturating_add(2) {
            return Err(MultipartError::PreambleTooLarge {
                limit: self.limits.max_preamble_bytes,
            });
        }
        Ok(())
    }

    fn after_delimiter(&mut self) -> Result<bool, MultipartError> {
        if self.pending.starts_with(b"--") {
            if self.parts == 0 {
                return Err(MultipartError::NoPart);
            }
            self.pending.clear();
            self.state = State::Epilogue;
            return Ok(true);
        }
        let padding = self
            .pending
            .iter()
            .take_while(|c| **c == b' ' || **c == b'\t')
            .count();
        if padding > 256 {
            return Err(MultipartError::Delimiter {
                reason: "more than 256 bytes of padding",
            });
        }
        let rest = self.pending.get(padding..).unwrap_or_default();
        match rest {
            [] | [b'\r'] => return Ok(false),
            [b'-'] if padding == 0 => return Ok(false),
            [b'\r', b'\n', ..] => {}
            _ => {
                return Err(MultipartError::Delimiter {
                    reason: "a boundary not followed by CRLF or \"--\"",
                });
            }
        }
        if self.parts >= 1 {
            return Err(MultipartError::TooManyParts);
        }
        self.pending.drain(..padding + 2);
        self.state = State::Headers;
        Ok(true)
    }

    fn headers(&mut self) -> Result<bool, MultipartError> {
        // No headers at all: the empty line comes first.
        let (block_len, consumed) = if self.pending.starts_with(b"\r\n") {
            (0, 2)
        } else if let Some(i) = find(&self.pending, b"\r\n\r\n") {
            (i, i + 4)
        } else {
            // Without the empty line yet, the block is at least all but the last 3 bytes.
            if self.pending.len() > self.limits.max_header_bytes.saturating_add(3) {
                return Err(MultipartError::HeadersTooLarge {
                    limit: self.limits.max_header_bytes,
                });
            }
            return Ok(false);
        };
        if block_len > self.limits.max_header_bytes {
            return Err(MultipartError::HeadersTooLarge {
                limit: self.limits.max_header_bytes,
            });
        }
        let block = self.pending.get(..block_len).unwrap_or_default();
        let content_type = part_content_type(block)?;
        let media = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        self.content_type = printable(&content_type);
        if media != "application/dicom" {
            return Err(MultipartError::NotDicom {
                reason: "its Content-Type is not application/dicom",
                content_type: self.content_type.clone(),
            });
        }
        self.pending.drain(..consumed);
        self.state = State::Body;
        self.parts += 1;
        Ok(true)
    }

    fn body(&mut self, out: &mut Vec<u8>) -> Result<bool, MultipartError> {
        let (emit, end) = match find(&self.pending, &self.delimiter) {
            Some(i) => (i, true),
            None => (
                self.pending
                    .len()
                    .saturating_sub(self.delimiter.len().saturating_sub(1)),
                false,
            ),
        };
        let bytes = self.pending.get(..emit).unwrap_or_default();
        // The signature first, then the size: the same error however the body is chunked.
        if self.head.len() < DICM_AT + 4 {
            let take = (DICM_AT + 4 - self.head.len()).min(bytes.len());
            self.head
                .extend_from_slice(bytes.get(..take).unwrap_or_default());
            if self.head.len() == DICM_AT + 4 && self.head.get(DICM_AT..) != Some(b"DICM") {
                return Err(self.not_dicom("no DICM signature at offset 128"));
            }
        }
        self.body = self.body.saturating_add(emit as u64);
        if self.body > self.limits.max_part_bytes {
            return Err(MultipartError::PartTooLarge {
                limit: self.limits.max_part_bytes,
            });
        }
        out.extend_from_slice(bytes);
        if end {
            if self.head.len() < DICM_AT + 4 {
                return Err(self.not_dicom("shorter than a Part 10 preamble and signature"));
            }
            self.pending.drain(..emit + self.delimiter.len());
            self.state = State::AfterDelimiter;
            return Ok(true);
        }
        self.pending.drain(..emit);
        Ok(false)
    }

    fn not_dicom(&self, reason: &'static str) -> MultipartError {
        MultipartError::NotDicom {
            reason,
            content_type: self.content_type.clone(),
        }
    }
}

/// The `Content-Type` of a part's header block (lines separated by CRLF; folded lines
/// continue the previous one). Absent: the RFC 2046 default, `text/plain`.
fn part_content_type(block: &[u8]) -> Result<String, MultipartError> {
    let text = std::str::from_utf8(block).map_err(|_| MultipartError::Headers {
        reason: "not UTF-8",
    })?;
    let mut found: Option<String> = None;
    let mut last_was_content_type = false;
    for line in text.split("\r\n").filter(|_| !text.is_empty()) {
        if line.contains(['\r', '\n']) {
            return Err(MultipartError::Headers {
                reason: "a bare CR or LF in a header line",
            });
        }
        if line.starts_with([' ', '\t']) {
            if last_was_content_type && let Some(v) = found.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        let (name, value) = line.split_once(':').ok_or(MultipartError::Headers {
            reason: "a line without a colon",
        })?;
        if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(MultipartError::Headers {
                reason: "a malformed header name",
            });
        }
        last_was_content_type = name.eq_ignore_ascii_case("content-type");
        if last_was_content_type {
            if found.is_some() {
                return Err(MultipartError::Headers {
                    reason: "two Content-Type headers",
                });
            }
            found = Some(value.trim().to_string());
        }
    }
    Ok(found.unwrap_or_else(|| "text/plain".to_string()))
}

/// Position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, _) = needle.split_first()?;
    let mut from = 0;
    while let Some(rest) = hay.get(from..) {
        let i = from + rest.iter().position(|&c| c == first)?;
        if hay.get(i..i + needle.len())? == needle {
            return Some(i);
        }
        from = i + 1;
    }
    None
}

/// Parses a whole body at once, for tests and the fuzz target: the part's bytes.
pub fn parse_all(
    body: &[u8],
    boundary: &str,
    limits: Limits,
    chunk: usize,
) -> Result<Vec<u8>, MultipartError> {
    let mut parser = Multipart::new(boundary, limits);
    let mut out = Vec::new();
    for piece in body.chunks(chunk.max(1)) {
        parser.feed(piece, &mut out)?;
    }
    parser.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dicom(len: usize) -> Vec<u8> {
        let mut f = vec![0u8; DICM_AT];
        f.extend_from_slice(b"DICM");
        f.extend((0..len).map(|i| (i % 251) as u8));
        f
    }

    fn body(b: &str, part: &[u8]) -> Vec<u8> {
        let mut v = format!("--{b}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
        v.extend_from_slice(part);
        v.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
        v
    }

    #[test]
    fn the_part_comes_out_whole_whatever_the_chunking() {
        // The part holds CR, LF, "--" and a near-delimiter so the holdback is exercised.
        let mut part = dicom(300);
        part.extend_from_slice(b"\r\n--XYZ\r\n-\r\n--XY\r\r\n--X");
        part.extend_from_slice(&dicom(10));
        let b = body("XYZ1", &part);
        for chunk in 1..=b.len() {
            assert_eq!(
                parse_all(&b, "XYZ1", Limits::default(), chunk).unwrap(),
                part,
                "chunk {chunk}"
            );
        }
        // Split in two at every point.
        for at in 0..=b.len() {
            let mut p = Multipart::new("XYZ1", Limits::default());
            let mut out = Vec::new();
            p.feed(&b[..at], &mut out).unwrap();
            p.feed(&b[at..], &mut out).unwrap();
            p.finish().unwrap();
            assert_eq!(out, part, "split at {at}");
        }
    }

    #[test]
    fn preamble_epilogue_padding_and_headers_are_skipped() {
        let part = dicom(50);
        let mut b = b"This is a preamble.\r\n--B  \t\r\ncontent-type:  Application/DICOM ; transfer-syntax=1.2.840.10008.1.2.1\r\nContent-Length: 182\r\n X-Folded: x\r\n\r\n".to_vec();
        b.extend_from_slice(&part);
        b.extend_from_slice(b"\r\n--B-- \r\nan epilogue\r\n--B\r\nignored");
        assert_eq!(parse_all(&b, "B", Limits::default(), 7).unwrap(), part);
    }

    #[test]
    fn quoted_and_odd_boundary_parameters() {
        assert_eq!(
            boundary("multipart/related; type=\"application/dicom\"; boundary=abc").unwrap(),
            "abc"
        );
        assert_eq!(
            boundary("Multipart/Related;boundary=\"a b:c\";type=\"appl;ication/dicom\"").unwrap(),
            "a b:c"
        );
        assert_eq!(
            boundary("multipart/related; BOUNDARY=\"q\\=x\"").unwrap(),
            "q=x"
        );
        for bad in [
            "application/dicom",
            "multipart/related",
            "multipart/related; type=\"application/dicom\"",
            "multipart/related; boundary=",
            "multipart/related; boundary=\"\"",
            "multipart/related; boundary=\"abc",
            "multipart/related; boundary=a; boundary=b",
            "multipart/related; boundary=\"ends with space \"",
            "multipart/related; boundary=bad{char}",
            &format!("multipart/related; boundary={}", "x".repeat(71)),
        ] {
            assert!(
                matches!(boundary(bad), Err(MultipartError::ContentType { .. })),
                "{bad}"
            );
        }
        // A quoted boundary with a space works end to end.
        let part = dicom(5);
        assert_eq!(
            parse_all(&body("a b:c", &part), "a b:c", Limits::default(), 3).unwrap(),
            part
        );
    }

    #[test]
    fn crlf_rules() {
        let part = dicom(20);
        // LF-only line ends are not a delimiter line or a header block.
        let mut lf = b"--B\nContent-Type: application/dicom\n\n".to_vec();
        lf.extend_from_slice(&part);
        lf.extend_from_slice(b"\n--B--\n");
        assert!(parse_all(&lf, "B", Limits::default(), 64).is_err());
        // A delimiter must be preceded by CRLF: "--B" inside a line is content, so the
        // closing one is missing.
        let mut no_crlf = b"--B\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
        no_crlf.extend_from_slice(&part);
        no_crlf.extend_from_slice(b"--B--\r\n");
        assert_eq!(
            parse_all(&no_crlf, "B", Limits::default(), 64),
            Err(MultipartError::Truncated {
                at: "in the part body, no closing boundary"
            })
        );
        // A boundary followed by other text is refused.
        let mut glued = b"--Bx\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
        glued.extend_from_slice(&part);
        assert!(matches!(
            parse_all(&glued, "B", Limits::default(), 64),
            Err(MultipartError::Delimiter { .. })
        ));
        // A bare CR inside the header block.
        let bare = b"--B\r\nContent-Type: application/dicom\rX: y\r\n\r\n".to_vec();
        assert!(matches!(
            parse_all(&bare, "B", Limits::default(), 64),
            Err(MultipartError::Headers { .. })
        ));
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        let b = body("B", &dicom(40));
        for cut in 0..b.len() - 2 {
            let r = parse_all(&b[..cut], "B", Limits::default(), 5);
            assert!(
                matches!(r, Err(MultipartError::Truncated { .. })),
                "cut {cut}: {r:?}"
            );
        }
    }

    #[test]
    fn wrong_boundary_no_part_two_parts() {
        let b = body("B", &dicom(40));
        assert!(matches!(
            parse_all(&b, "C", Limits::default(), 5),
            Err(MultipartError::Truncated { at: "no boundary" })
        ));
        assert_eq!(
            parse_all(b"--B--\r\n", "B", Limits::default(), 5),
            Err(MultipartError::NoPart)
        );
        let mut two = b"--B\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
        two.extend_from_slice(&dicom(3));
        two.extend_from_slice(b"\r\n--B\r\nContent-Type: application/dicom\r\n\r\n");
        two.extend_from_slice(&dicom(3));
        two.extend_from_slice(b"\r\n--B--\r\n");
        assert_eq!(
            parse_all(&two, "B", Limits::default(), 5),
            Err(MultipartError::TooManyParts)
        );
    }

    #[test]
    fn non_dicom_parts_are_refused() {
        let json = b"--B\r\nContent-Type: application/dicom+json\r\n\r\n[]\r\n--B--\r\n";
        assert!(matches!(
            parse_all(json, "B", Limits::default(), 5),
            Err(MultipartError::NotDicom { content_type, .. }) if content_type == "application/dicom+json"
        ));
        let no_type = b"--B\r\n\r\nhello\r\n--B--\r\n";
        let r = parse_all(no_type, "B", Limits::default(), 5);
        assert!(matches!(r, Err(MultipartError::NotDicom { .. })), "{r:?}");
        let mut no_dicm = vec![0u8; 200];
        no_dicm[128..132].copy_from_slice(b"DICN");
        assert!(matches!(
            parse_all(&body("B", &no_dicm), "B", Limits::default(), 5),
            Err(MultipartError::NotDicom { .. })
        ));
        assert!(matches!(
            parse_all(&body("B", b"short"), "B", Limits::default(), 5),
            Err(MultipartError::NotDicom { .. })
        ));
    }

    #[test]
    fn oversize_is_refused() {
        let small = Limits {
            max_preamble_bytes: 10,
            max_header_bytes: 40,
            max_part_bytes: 200,
        };
        assert!(parse_all(&body("B", &dicom(60)), "B", small, 3).is_ok());
        assert_eq!(
            parse_all(&body("B", &dicom(100)), "B", small, 3),
            Err(MultipartError::PartTooLarge { limit: 200 })
        );
        let mut long_preamble = vec![b'x'; 11];
        long_preamble.extend_from_slice(&body("B", &dicom(1)));
        for chunk in [1, 4, long_preamble.len()] {
            assert_eq!(
                parse_all(&long_preamble, "B", small, chunk),
                Err(MultipartError::PreambleTooLarge { limit: 10 }),
                "chunk {chunk}"
            );
        }
        // An endless preamble without any boundary is cut at the limit, not buffered.
        let mut p = Multipart::new("B", small);
        let mut out = Vec::new();
        let r = (0..100).try_for_each(|_| p.feed(&[b'y'; 7], &mut out));
        assert_eq!(r, Err(MultipartError::PreambleTooLarge { limit: 10 }));
        let mut long_headers = b"--B\r\nContent-Type: application/dicom\r\nX-Pad: ".to_vec();
        long_headers.extend_from_slice(&[b'p'; 30]);
        long_headers.extend_from_slice(b"\r\n\r\n");
        long_headers.extend_from_slice(&dicom(1));
        long_headers.extend_from_slice(b"\r\n--B--\r\n");
        for chunk in [1, 5, long_headers.len()] {
            assert_eq!(
                parse_all(&long_headers, "B", small, chunk),
                Err(MultipartError::HeadersTooLarge { limit: 40 }),
                "chunk {chunk}"
            );
        }
        // A block of exactly the limit passes however it is chunked.
        let mut exact = b"--B\r\nContent-Type: application/dicom\r\nX: ".to_vec();
        exact.extend_from_slice(&[b'p'; 4]);
        exact.extend_from_slice(b"\r\n\r\n");
        exact.extend_from_slice(&dicom(1));
        exact.extend_from_slice(b"\r\n--B--\r\n");
        for chunk in 1..exact.len() {
            assert!(
                parse_all(&exact, "B", small, chunk).is_ok(),
                "chunk {chunk}"
            );
        }
    }
}
