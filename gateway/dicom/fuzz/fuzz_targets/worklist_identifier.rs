//! The C-FIND identifier parser and the Specific Character Set codec must never panic on
//! any input; a parsed identifier must give a response that encodes; and text the codec
//! decodes must come back unchanged through encode and decode.
#![no_main]

use gateway_booking::WorklistItem;
use gateway_dicom::charset::{self, SpecificCharset};
use gateway_dicom::worklist;
use libfuzzer_sys::fuzz_target;

const CHARSETS: [&[&str]; 5] = [
    &["", "ISO 2022 IR 87"],
    &["ISO 2022 IR 13", "ISO 2022 IR 87"],
    &["", "ISO 2022 IR 13", "ISO 2022 IR 87"],
    &["ISO_IR 13"],
    &["ISO_IR 192"],
];

fn item() -> WorklistItem {
    WorklistItem {
        patient_name: "YAMADA^TARO=山田^太郎=やまだ^たろう".into(),
        patient_id: "P1".into(),
        birth_date: "19700101".into(),
        sex: "M".into(),
        accession: "RB1".into(),
        requested_procedure_id: "RB1".into(),
        requested_procedure_description: "CT".into(),
        modality: "CT".into(),
        station_ae: "CT01".into(),
        start_date: "20270112".into(),
        start_time: "093000".into(),
        step_id: "s1".into(),
        step_description: "CT".into(),
        medical_alerts: vec![
            "Contrast reaction: iohexol (SV)".into(),
            "Contrast reaction: 造影剤".into(),
        ],
        contrast_allergies: vec!["iohexol".into(), "造影剤".into()],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 | 1 => {
            let ts = if selector % 4 == 0 {
                "1.2.840.10008.1.2"
            } else {
                "1.2.840.10008.1.2.1"
            };
            if let Ok(find) = worklist::parse_identifier(rest, ts) {
                let it = item();
                let _ = find.query().matches(&it);
                assert!(find.response(&it).is_ok(), "response did not encode");
            }
        }
        _ => {
            let terms = CHARSETS[usize::from(selector / 4) % CHARSETS.len()];
            let Ok(cs) = SpecificCharset::from_terms(terms) else {
                return;
            };
            if let Ok(text) = charset::decode(rest, &cs)
                && let Ok(bytes) = charset::encode(&text, &cs)
            {
                assert_eq!(charset::decode(&bytes, &cs).as_deref(), Ok(text.as_str()));
            }
        }
    }
});
