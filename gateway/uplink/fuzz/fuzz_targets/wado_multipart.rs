//! Untrusted WADO-RS responses: a `Content-Type` line and a body, the body fed in chunks
//! whose size the input picks. Must never panic; the same body must give the same result
//! whatever the chunking, and a body that parses yields at most the bytes it holds.
#![no_main]

use gateway_uplink::multipart::{Limits, boundary, parse_all};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Layout: [chunk size][Content-Type up to the first LF][body].
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let (header, body) = match rest.iter().position(|&c| c == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(b) = boundary(&String::from_utf8_lossy(header)) else {
        return;
    };
    let limits = Limits {
        max_preamble_bytes: 4096,
        max_header_bytes: 1024,
        max_part_bytes: 1 << 20,
    };
    let whole = parse_all(body, &b, limits, body.len().max(1));
    let chunked = parse_all(body, &b, limits, usize::from(chunk).max(1));
    assert_eq!(whole, chunked);
    if let Ok(part) = whole {
        assert!(part.len() <= body.len());
        assert_eq!(part.get(128..132), Some(&b"DICM"[..]));
    }
});
