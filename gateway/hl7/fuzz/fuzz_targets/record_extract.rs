//! Any text through the parser and the typed record extraction (ADT with AL1, ADT^A60 IAM
//! with its action checks, merges, orders, reports) never panics; an error always carries an
//! HL7 code and, for the allergy checks, the segment and field it names; an extracted
//! allergy of ADT^A60 always has an action of table 0323 and an allergen.
#![no_main]

use gateway_hl7::parse::parse;
use gateway_hl7::record::{Clinical, extract};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(message) = parse(text) else {
        return;
    };
    match extract(&message) {
        Ok(Some(Clinical::Allergies { allergies, .. })) => {
            for a in &allergies {
                assert!(matches!(a.action.as_str(), "A" | "U" | "D" | "X"));
                assert!(!(a.allergen.code.is_empty() && a.allergen.text.is_empty()));
            }
            let _ = format!("{allergies:?}");
        }
        Ok(Some(Clinical::Patient { allergies, .. })) => {
            for a in &allergies {
                assert!(a.action.is_empty());
                assert!(!(a.allergen.code.is_empty() && a.allergen.text.is_empty()));
            }
        }
        Ok(other) => {
            let _ = format!("{other:?}");
        }
        Err(e) => {
            assert!((100..=207).contains(&e.code.code()));
            let _ = e.to_string();
        }
    }
});
