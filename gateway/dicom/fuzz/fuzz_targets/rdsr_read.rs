//! The dose report reader must never panic on any input (a modality can send anything as
//! an SR), and what it returns must hold its invariants: every event has its Irradiation
//! Event UID, every dose value is a finite non-negative number, an error names no patient
//! data. Any prefix of the input is read without a panic too (a truncated upload).
#![no_main]

use gateway_dicom::rdsr::{self, RdsrError};
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    match rdsr::read(data) {
        Ok(Some(report)) => {
            assert!(!report.events.is_empty() || report.accumulated.is_some());
            for event in &report.events {
                assert!(!event.event_uid.is_empty());
                for v in [event.ctdivol_mgy, event.dlp_mgy_cm].into_iter().flatten() {
                    assert!(v.is_finite() && v >= 0.0, "dose value {v}");
                }
            }
            if let Some(total) = report.accumulated.and_then(|a| a.total_dlp_mgy_cm) {
                assert!(total.is_finite() && total >= 0.0, "total {total}");
            }
        }
        Ok(None) => {}
        Err(e) => {
            // Errors are built from static text and tags only.
            let shown = e.to_string();
            assert!(!shown.is_empty());
            if let RdsrError::Malformed { reason, .. } = e {
                assert!(!reason.is_empty());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&data[..data.len() / 2]);
});
