//! The ORU Patient ID rewrite never panics on any frame in any character set; when it
//! succeeds the result decodes in the frame's set, parses, carries the clinic's ID first in
//! PID-3, and a second rewrite leaves it unchanged.
#![no_main]

use gateway_hl7::charset::{Charset, CharsetOverride, decode};
use gateway_hl7::parse::parse;
use gateway_hl7::reconcile::{ClinicIdentity, result_keys, rewrite_pid};
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
    let clinic = if selector & 0x80 == 0 {
        ClinicIdentity {
            patient_id: "CL-0042".into(),
            issuer: "CLINIC-A".into(),
        }
    } else {
        ClinicIdentity {
            patient_id: "A^B|C~D\\E&F".into(),
            issuer: "山田クリニック".into(),
        }
    };
    if let Ok(decoded) = decode(frame, over) {
        if let Ok(message) = parse(&decoded.text) {
            let _ = format!("{:?}", result_keys(&message));
        }
    }
    let Ok(out) = rewrite_pid(frame, over, &clinic, "CORE") else {
        return;
    };
    let decoded = decode(
        &out,
        CharsetOverride::Fixed(decode(frame, over).expect("input decoded").charset),
    )
    .expect("the rewritten frame decodes in its set");
    let message = parse(&decoded.text).expect("the rewritten frame parses");
    let pid3 = message
        .segment("PID")
        .and_then(|s| s.field(3))
        .expect("PID-3 is there");
    let first = pid3.repetition(1).expect("a first repetition");
    assert_eq!(first.value(1), clinic.patient_id);
    assert_eq!(first.value(4), clinic.issuer);
    let again = rewrite_pid(&out, over, &clinic, "CORE").expect("a rewritten frame rewrites again");
    assert_eq!(again, out, "the rewrite is not idempotent");
});
