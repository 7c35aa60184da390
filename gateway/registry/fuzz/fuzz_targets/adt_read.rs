//! An HL7 message from a hospital's system, as the registry reads an ADT (PID, MRG, CON,
//! IN1), then the record it yields prepared and compared by the matcher: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(adt) = gateway_registry::adt::read(&text) {
        let matcher = gateway_identity::Matcher::new(gateway_identity::Model::default());
        let p = matcher.prepare(&adt.record);
        let c = matcher.compare_prepared(&p, &p);
        assert!(c.score.is_finite());
    }
});
