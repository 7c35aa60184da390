//! Reading a Part 10 file meta group (the SCU reads objects pulled from the cloud archive)
//! must never panic; what it accepts points inside the input, and `StoreObject` takes
//! exactly the objects whose data set has even length.
#![no_main]

use gateway_dicom::StoreObject;
use gateway_dicom::part10;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = part10::read(data) {
        assert!(meta.data_set_offset >= 132 && meta.data_set_offset <= data.len());
        let data_set_len = data.len() - meta.data_set_offset;
        match StoreObject::from_part10(data.to_vec()) {
            Ok(object) => assert_eq!(object.data_set().len(), data_set_len),
            Err(_) => assert_eq!(data_set_len % 2, 1),
        }
    } else {
        assert!(StoreObject::from_part10(data.to_vec()).is_err());
    }
});
