//! JSON lines of record pairs as `gatewayd identity match --pairs` reads them (odd Unicode,
//! dates, addresses, digits of every width): never a panic; every good line gets a result.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let matcher = gateway_identity::Matcher::new(gateway_identity::Model::default());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let _ = gateway_identity::cli::match_pairs(data, &mut out, &mut err, &matcher);
    for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        assert!(std::str::from_utf8(line).is_ok());
    }
});
