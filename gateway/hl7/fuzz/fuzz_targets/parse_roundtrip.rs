//! Decoding, parsing, header reading, record extraction and acknowledgement building never
//! panic; a parsed message re-serialises to exactly its text; every acknowledgement we
//! would send parses again and decodes in the character set it was encoded in.
#![no_main]

use gateway_hl7::ack::{AckError, Outcome, ack_mode, build_ack, build_minimal_nak, encode_ack};
use gateway_hl7::charset::{Charset, CharsetOverride, decode, decode_as};
use gateway_hl7::parse::{ErrorCode, parse};
use gateway_hl7::record::{Header, extract};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&selector, frame)) = input.split_first() else {
        return;
    };
    let over = match selector % 5 {
        0 => CharsetOverride::Auto,
        1 => CharsetOverride::Fixed(Charset::Ascii),
        2 => CharsetOverride::Fixed(Charset::Utf8),
        3 => CharsetOverride::Fixed(Charset::Iso2022Jp),
        _ => CharsetOverride::Fixed(Charset::ShiftJis),
    };
    let decoded = match decode(frame, over) {
        Ok(d) => d,
        Err(e) => {
            let _ = e.to_string();
            let err = AckError::from(&e);
            let text = match Header::from_raw_frame(frame) {
                Some(h) => build_ack(&h, gateway_hl7::AckCode::AE, Some(&err), "GW1", "2024"),
                None => build_minimal_nak(&err, "GW1", "2024"),
            };
            assert!(parse(&text).is_ok(), "NAK does not parse");
            return;
        }
    };
    let message = match parse(&decoded.text) {
        Ok(m) => m,
        Err(e) => {
            let nak = build_minimal_nak(&AckError::from(&e), "GW1", "2024");
            assert!(parse(&nak).is_ok(), "minimal NAK does not parse");
            return;
        }
    };
    assert_eq!(message.serialize(), decoded.text, "serialize is not the inverse of parse");
    let header = Header::read(&message);
    let outcome = match header.validate().and_then(|()| extract(&message)) {
        Ok(record) => {
            let _ = format!("{record:?}");
            Outcome::Accepted
        }
        Err(e) => Outcome::for_error(e.code),
    };
    if let Some(code) = ack_mode(&header).code_for(outcome) {
        let err = AckError::new(ErrorCode::ApplicationInternalError);
        let ack = build_ack(&header, code, Some(&err), "GW1", "20240101");
        let bytes = encode_ack(&ack, decoded.charset);
        let back = decode_as(&bytes, decoded.charset).expect("ACK must decode in its charset");
        let parsed = parse(&back).expect("ACK must parse");
        assert_eq!(parsed.segments().nth(1).map(|s| s.name()), Some("MSA"));
    }
});
