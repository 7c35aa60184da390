//! Command set decoding must never panic, and a decoded C-STORE request must survive the
//! round trip through the response encoder (the response names the same message id).
//! Response decoding (the C-STORE SCU reads C-STORE-RSPs from a PACS) must never panic
//! either, and reads back the status and message id of an encoded response.
#![no_main]

use gateway_dicom::dimse::{self, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dimse::decode_response(data);
    if let Ok(Request::Store(req)) = dimse::decode(data) {
        let rsp = dimse::store_response(&req, dimse::status::SUCCESS, Some("x"));
        match dimse::decode(&rsp) {
            Ok(Request::Other { command_field, .. }) => assert_eq!(command_field, dimse::field::C_STORE_RSP),
            other => panic!("response did not decode back: {other:?}"),
        }
        let back = dimse::decode_response(&rsp).expect("encoded response decodes");
        assert_eq!((back.message_id_being_responded_to, back.status), (req.message_id, dimse::status::SUCCESS));
    }
});
