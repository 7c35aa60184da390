//! Command set decoding must never panic, and a decoded C-STORE request must survive the
//! round trip through the response encoder (the response names the same message id).
#![no_main]

use gateway_dicom::dimse::{self, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Request::Store(req)) = dimse::decode(data) {
        let rsp = dimse::store_response(&req, dimse::status::SUCCESS, Some("x"));
        match dimse::decode(&rsp) {
            Ok(Request::Other { command_field, .. }) => assert_eq!(command_field, dimse::field::C_STORE_RSP),
            other => panic!("response did not decode back: {other:?}"),
        }
    }
});
