//! The first bytes of every connection are classified before the association policy runs:
//! arbitrary input gives a verdict, never a panic, and a recognised request never claims
//! more bytes than were given; a verdict on a prefix that is already final stays final.
#![no_main]

use gateway_dicom::service::{FirstPdu, classify_first_pdu};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match classify_first_pdu(data) {
        FirstPdu::AssociateRq { len, .. } => {
            assert!(len <= data.len());
            // Trailing bytes (the next PDU) do not change the verdict.
            let mut more = data.to_vec();
            more.extend_from_slice(&[0x04, 0x00]);
            assert!(matches!(classify_first_pdu(&more), FirstPdu::AssociateRq { .. }));
        }
        FirstPdu::Invalid(_) | FirstPdu::Incomplete => {}
    }
});
