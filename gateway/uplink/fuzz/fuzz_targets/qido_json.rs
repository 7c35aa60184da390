//! Untrusted QIDO-RS responses (DICOM JSON model). Must never panic; every instance it
//! returns carries valid UIDs (they become URL path segments and file names).
#![no_main]

use gateway_id::dicom_uid;
use gateway_uplink::pull::parse_instances;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(refs) = parse_instances(data, "1.2.3") {
        for r in refs {
            assert_eq!(r.study_uid, "1.2.3");
            assert_eq!(dicom_uid(&r.series_uid), Some(r.series_uid.as_str()));
            assert_eq!(dicom_uid(&r.sop_instance_uid), Some(r.sop_instance_uid.as_str()));
        }
    }
});
