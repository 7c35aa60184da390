//! Untrusted exchange envelopes: parse, then open with fixed keys. Must never panic; a
//! random input must never open.
#![no_main]

use gateway_exchange::{Envelope, ExchangeKey, open};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let core = ExchangeKey::from_seed([1; 32]);
    let clinic = ExchangeKey::from_seed([2; 32]);
    if let Ok(env) = Envelope::parse(data) {
        let _ = env.to_bytes();
        assert!(open(&core, "core-01", &clinic.public(), &env).is_err());
    }
});
