//! Whole-pipeline tests: Japanese character sets, typed records, privacy of `Debug`, and a
//! seeded mutation run through decoder + parser + acknowledgement.

use crate::ack::{AckCode, AckError, Outcome, ack_mode, build_ack, build_minimal_nak, encode_ack};
use crate::charset::{Charset, CharsetOverride, DecodeError, decode};
use crate::mllp::{MllpDecoder, MllpEvent, encode_frame};
use crate::parse::{ErrorCode, Location, parse};
use crate::record::{AdtEvent, Clinical, Header, NameRepresentation, OrderMessage, extract};
use crate::testutil::XorShift;

const A08_TEMPLATE: &str = "MSH|^~\\&|HIS|HOSP|GW|CLINIC|20240101120000||ADT^A08^ADT_A01|MSG0001|P|2.5|||||JPN|{MSH18}\r\
EVN|A08|20240101120000\r\
PID|1||123456^^^HOSP^PI~9876543^^^NATION^NI||放射線^造影剤^^^^^L^I~ホウシャセン^ゾウエイザイ^^^^^L^P||19700101|M|||東京都千代田区^^東京^^100-0001^JPN\r";

const SJIS_TEMPLATE: &str = "MSH|^~\\&|HIS|HOSP|GW|CLINIC|20240101120000||ADT^A08^ADT_A01|MSG0002|P|2.5|||||JPN|SHIFT_JIS\r\
EVN|A08|20240101120000\r\
PID|1||123456^^^HOSP^PI||表^造影剤^^^^^L^I~ソウエイ^ゾウエイザイ^^^^^L^P||19700101|F|||東京都港区表参道^^東京^^107-0061^JPN\r";

fn iso2022_a08() -> (String, Vec<u8>) {
    let text = A08_TEMPLATE.replace("{MSH18}", "~ISO IR87");
    let (bytes, _, had_errors) = encoding_rs::ISO_2022_JP.encode(&text);
    assert!(!had_errors);
    let bytes = bytes.into_owned();
    (text, bytes)
}

fn sjis_a08() -> (String, Vec<u8>) {
    let (bytes, _, had_errors) = encoding_rs::SHIFT_JIS.encode(SJIS_TEMPLATE);
    assert!(!had_errors);
    (SJIS_TEMPLATE.to_owned(), bytes.into_owned())
}

#[test]
fn iso2022jp_a08_decodes_and_parses_into_exact_field_counts() {
    let (text, bytes) = iso2022_a08();
    let decoded = decode(&bytes, CharsetOverride::Auto).unwrap();
    assert_eq!(decoded.charset, Charset::Iso2022Jp);
    assert_eq!(decoded.text, text);

    let m = parse(&decoded.text).unwrap();
    let counts: Vec<(&str, usize)> = m.segments().map(|s| (s.name(), s.field_count())).collect();
    assert_eq!(counts, [("MSH", 18), ("EVN", 2), ("PID", 11)]);
    let pid = m.segment("PID").unwrap();
    assert_eq!(pid.field(5).unwrap().repetitions().count(), 2);
    assert_eq!(m.get("PID", 5, 1, 1, 1), Some("放射線"));
    assert_eq!(m.get("PID", 5, 1, 2, 1), Some("造影剤"));
    assert_eq!(m.get("PID", 5, 2, 1, 1), Some("ホウシャセン"));
    assert_eq!(m.get("PID", 11, 1, 1, 1), Some("東京都千代田区"));
    assert_eq!(m.get("PID", 11, 1, 3, 1), Some("東京"));
    assert_eq!(m.get("PID", 11, 1, 6, 1), Some("JPN"));
    assert_eq!(m.serialize(), decoded.text);
}

#[test]
fn naive_byte_splitting_of_iso2022jp_on_pipe_gets_it_wrong() {
    let (text, bytes) = iso2022_a08();
    // 放 is JIS X 0208 0x4A7C: its second byte is `|`.
    let (hou, _, _) = encoding_rs::ISO_2022_JP.encode("放");
    assert_eq!(&hou[..], b"\x1b$BJ|\x1b(B");
    let pipes_in_text = text.matches('|').count();
    let pipes_in_bytes = bytes.iter().filter(|&&b| b == b'|').count();
    assert!(
        pipes_in_bytes > pipes_in_text,
        "{pipes_in_bytes} vs {pipes_in_text}"
    );
    // Splitting the raw PID segment on 0x7C yields more than the 12 parts (ID + 11 fields).
    let pid_start = bytes.windows(4).position(|w| w == b"\rPID").unwrap() + 1;
    let pid_raw = &bytes[pid_start..bytes.len() - 1];
    assert!(pid_raw.split(|&b| b == b'|').count() > 12);
    // 京 is 0x357E: its second byte is `~`, so naive repetition splitting fails too.
    let (kyo, _, _) = encoding_rs::ISO_2022_JP.encode("京");
    assert_eq!(&kyo[..], b"\x1b$B5~\x1b(B");
}

#[test]
fn shift_jis_trail_bytes_0x5c_do_not_trigger_escape_handling() {
    let (text, bytes) = sjis_a08();
    // 表 = 0x95 0x5C and ソ = 0x83 0x5C end in the escape character.
    assert!(bytes.windows(2).any(|w| w == [0x95, 0x5C]));
    assert!(bytes.windows(2).any(|w| w == [0x83, 0x5C]));
    let backslashes_in_text = text.matches('\\').count();
    let backslashes_in_bytes = bytes.iter().filter(|&&b| b == b'\\').count();
    assert!(backslashes_in_bytes > backslashes_in_text);

    let decoded = decode(&bytes, CharsetOverride::Auto).unwrap();
    assert_eq!(decoded.charset, Charset::ShiftJis);
    let m = parse(&decoded.text).unwrap();
    let pid = m.segment("PID").unwrap();
    assert_eq!(pid.field_count(), 11);
    let name = pid.field(5).unwrap();
    assert_eq!(name.repetition(1).unwrap().value(1), "表");
    assert_eq!(name.repetition(2).unwrap().value(1), "ソウエイ");
    assert_eq!(
        pid.field(11).unwrap().repetition(1).unwrap().value(1),
        "東京都港区表参道"
    );
    // Same with the listener override instead of MSH-18.
    let fixed = decode(&bytes, CharsetOverride::Fixed(Charset::ShiftJis)).unwrap();
    assert_eq!(fixed.text, text);
}

#[test]
fn iso_ir159_content_is_a_decode_error_answered_with_ae_and_err() {
    let (_, mut bytes) = iso2022_a08();
    // Append a JIS X 0212 (ISO IR159) run to PID-11.
    let at = bytes.len() - 1;
    bytes.splice(at..at, b"\x1b$(D\x30\x21\x1b(B".iter().copied());
    let err = decode(&bytes, CharsetOverride::Auto).unwrap_err();
    let DecodeError::Malformed { charset, offset } = err.clone() else {
        panic!("{err:?}")
    };
    assert_eq!(charset, Charset::Iso2022Jp);
    assert_eq!(offset, at);
    // Nothing of the message in the error.
    assert!(!err.to_string().contains("PID"));

    // The header is plain ASCII, so the sender still gets an AE for its own control ID.
    let header = Header::from_raw_frame(&bytes).unwrap();
    assert_eq!(header.control_id, "MSG0001");
    let code = ack_mode(&header).code_for(Outcome::for_error(err.error_code()));
    assert_eq!(code, Some(AckCode::AE));
    let ack = build_ack(
        &header,
        AckCode::AE,
        Some(&AckError::from(&err)),
        "GW1",
        "20240101",
    );
    assert_eq!(
        ack,
        "MSH|^~\\&|GW|CLINIC|HIS|HOSP|20240101||ACK^A08^ACK|GW1|P|2.5||||||~ISO IR87\rMSA|AE|MSG0001\rERR|||102^Data type error^HL70357|E\r"
    );
}

#[test]
fn a08_extracts_ids_kanji_and_kana_names_birth_date_and_sex() {
    let (_, bytes) = iso2022_a08();
    let decoded = decode(&bytes, CharsetOverride::Auto).unwrap();
    let m = parse(&decoded.text).unwrap();
    let header = Header::read(&m);
    header.validate().unwrap();
    assert_eq!(header.message_type, "ADT");
    assert_eq!(header.trigger, "A08");
    assert_eq!(header.structure, "ADT_A01");
    let Some(Clinical::Patient { event, patient, .. }) = extract(&m).unwrap() else {
        panic!("not a patient record")
    };
    assert_eq!(event, AdtEvent::A08);
    assert_eq!(patient.ids.len(), 2);
    assert_eq!(patient.ids[0].id, "123456");
    assert_eq!(patient.ids[0].assigning_authority, "HOSP");
    assert_eq!(patient.ids[0].id_type, "PI");
    assert_eq!(patient.ids[1].id_type, "NI");
    let kanji = patient.name(NameRepresentation::Ideographic).unwrap();
    assert_eq!(
        (kanji.family.as_str(), kanji.given.as_str()),
        ("放射線", "造影剤")
    );
    let kana = patient.name(NameRepresentation::Phonetic).unwrap();
    assert_eq!(kana.family, "ホウシャセン");
    assert_eq!(kana.name_type, "L");
    assert_eq!(patient.birth_date, "19700101");
    assert_eq!(patient.sex, "M");
}

#[test]
fn names_without_xpn8_follow_the_jahis_order() {
    let text =
        "MSH|^~\\&|A|B|C|D|2024||ADT^A04|1|P|2.5\rPID|1||7||山田^太郎~ヤマダ^タロウ~YAMADA^TARO\r";
    let m = parse(text).unwrap();
    let Some(Clinical::Patient { event, patient, .. }) = extract(&m).unwrap() else {
        panic!()
    };
    assert_eq!(event, AdtEvent::A04);
    let reps: Vec<_> = patient.names.iter().map(|n| n.representation).collect();
    assert_eq!(
        reps,
        [
            NameRepresentation::Ideographic,
            NameRepresentation::Phonetic,
            NameRepresentation::Alphabetic
        ]
    );
}

#[test]
fn a40_extracts_prior_ids_from_mrg1() {
    let text = "MSH|^~\\&|A|B|C|D|2024||ADT^A40^ADT_A39|1|P|2.5\rEVN|A40\rPID|1||NEW1^^^HOSP^PI\rMRG|OLD1^^^HOSP^PI~OLD2^^^HOSP^PI\r";
    let m = parse(text).unwrap();
    let Some(Clinical::Merge { merges }) = extract(&m).unwrap() else {
        panic!()
    };
    assert_eq!(merges.len(), 1);
    assert_eq!(merges[0].0.ids[0].id, "NEW1");
    let prior: Vec<_> = merges[0].1.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(prior, ["OLD1", "OLD2"]);

    let e =
        extract(&parse("MSH|^~\\&|A|B|C|D|2024||ADT^A40|1|P|2.5\rPID|1||NEW1\rMRG|\r").unwrap())
            .unwrap_err();
    assert_eq!(e.code, ErrorCode::RequiredFieldMissing);
    assert_eq!(e.location, Some(Location::field("MRG", 1, 1)));
}

#[test]
fn a60_extracts_allergies_from_iam_segments() {
    let text = "MSH|^~\\&|A|B|C|D|2024||ADT^A60^ADT_A60|1|P|2.5\rEVN|A60\rPID|1||P1\r\
IAM|1|DA^Drug allergy^HL70127|1100001^造影剤^JHSD0001|SV^Severe^HL70128|蕁麻疹~呼吸困難|A\r\
IAM|2|FA|F01^卵|MI||A\r";
    let m = parse(text).unwrap();
    let Some(Clinical::Allergies { patient, allergies }) = extract(&m).unwrap() else {
        panic!()
    };
    assert_eq!(patient.ids[0].id, "P1");
    assert_eq!(allergies.len(), 2);
    assert_eq!(allergies[0].allergen_type.code, "DA");
    assert_eq!(allergies[0].allergen.code, "1100001");
    assert_eq!(allergies[0].allergen.text, "造影剤");
    assert_eq!(allergies[0].allergen.system, "JHSD0001");
    assert_eq!(allergies[0].severity.code, "SV");
    assert_eq!(allergies[0].reactions, ["蕁麻疹", "呼吸困難"]);
    assert_eq!(allergies[0].action, "A");
    assert_eq!(allergies[1].allergen.text, "卵");
    assert!(allergies[1].reactions.is_empty());
}

#[test]
fn a60_reads_unique_id_onset_and_reported_date() {
    let text = "MSH|^~\\&|A|B|C|D|2024||ADT^A60|1|P|2.5\rPID|1||P1\r\
IAM|1|DA|C01^イオヘキソール|SV|anaphylaxis|U|IAM-77^HIS||||20240301||202403011200\r";
    let Some(Clinical::Allergies { allergies, .. }) = extract(&parse(text).unwrap()).unwrap()
    else {
        panic!()
    };
    assert_eq!(allergies[0].action, "U");
    assert_eq!(allergies[0].unique_id, "IAM-77");
    assert_eq!(allergies[0].onset_date, "20240301");
    assert_eq!(allergies[0].reported, "202403011200");
    assert_eq!(allergies[0].allergen.text, "イオヘキソール");
    let printed = format!("{:?}", allergies[0]);
    assert!(
        !printed.contains("IAM-77") && !printed.contains("2024"),
        "{printed}"
    );
}

#[test]
fn a60_refuses_an_unknown_action_or_an_allergen_without_code_and_text() {
    let msg = |iam: &str| format!("MSH|^~\\&|A|B|C|D|2024||ADT^A60|1|P|2.5\rPID|1||P1\r{iam}\r");
    for action in ["A", "U", "D", "X"] {
        let ok = msg(&format!("IAM|1|DA|C01|SV||{action}"));
        assert!(extract(&parse(&ok).unwrap()).is_ok(), "{action}");
    }
    let bad = msg("IAM|1|DA|C01|SV||A\rIAM|2|DA|C02|SV||Q");
    let e = extract(&parse(&bad).unwrap()).unwrap_err();
    assert_eq!(e.code, ErrorCode::TableValueNotFound);
    assert_eq!(e.code.code(), 103);
    assert_eq!(e.location, Some(Location::field("IAM", 2, 6)));
    let e = extract(&parse(&msg("IAM|1|DA|C01|SV||")).unwrap()).unwrap_err();
    assert_eq!(e.code, ErrorCode::RequiredFieldMissing);
    assert_eq!(e.location, Some(Location::field("IAM", 1, 6)));
    let e = extract(&parse(&msg("IAM|1|DA|^^L|SV||A")).unwrap()).unwrap_err();
    assert_eq!(e.code, ErrorCode::RequiredFieldMissing);
    assert_eq!(e.location, Some(Location::field("IAM", 1, 3)));
    // The error names the place, never the content.
    assert!(!e.to_string().contains("DA"));
}

#[test]
fn an_unknown_iam_action_is_answered_ae_with_err_103_at_iam_6_as_the_listener_does() {
    let text = "MSH|^~\\&|HIS|HOSP-A|GW|CORE|2024||ADT^A60|C77|P|2.5\rPID|1||P1\r\
IAM|1|DA|C01^iohexol|SV||A\rIAM|2|DA|C02^iopamidol|SV||Z\r";
    let m = parse(text).unwrap();
    let header = Header::read(&m);
    // The listener's check: header, then the typed record.
    let e = header
        .validate()
        .and_then(|()| extract(&m).map(drop))
        .unwrap_err();
    let err = AckError::from(&e);
    assert_eq!(Outcome::for_error(err.code), Outcome::Error);
    let ack = build_ack(&header, crate::AckCode::AE, Some(&err), "GW1", "20240101");
    let segs: Vec<&str> = ack.split('\r').collect();
    assert!(segs[1].starts_with("MSA|AE|C77"), "{ack}");
    let err_seg = segs.iter().find(|s| s.starts_with("ERR|")).unwrap();
    assert!(err_seg.contains("IAM^2^6"), "{err_seg}");
    assert!(err_seg.contains("|103^"), "{err_seg}");
    assert!(!ack.contains("iopamidol"));
}

#[test]
fn a01_a04_a08_read_al1_allergies_with_japanese_text() {
    let text = "MSH|^~\\&|HIS|HOSP-A|GW|CORE|2024||ADT^A01^ADT_A01|1|P|2.5|||||JPN|~ISO IR87\r\
PID|1||P1^^^HOSP-A^PI\r\
AL1|1|DA^薬剤^HL70127|620000^オムニパーク^YJ|SV|蕁麻疹~呼吸困難|20230105\r\
AL1|2|FA|^卵|MI\r";
    // Through the listener's path: ISO-2022-JP bytes decoded, then parsed.
    let (bytes, _, had_errors) = encoding_rs::ISO_2022_JP.encode(text);
    assert!(!had_errors);
    let decoded = decode(&bytes, CharsetOverride::Auto).unwrap();
    assert_eq!(decoded.charset, Charset::Iso2022Jp);
    let m = parse(&decoded.text).unwrap();
    let Some(Clinical::Patient {
        event,
        patient,
        allergies,
    }) = extract(&m).unwrap()
    else {
        panic!()
    };
    assert_eq!(event, AdtEvent::A01);
    assert_eq!(patient.ids[0].id, "P1");
    assert_eq!(allergies.len(), 2);
    assert_eq!(allergies[0].allergen.code, "620000");
    assert_eq!(allergies[0].allergen.text, "オムニパーク");
    assert_eq!(allergies[0].allergen.system, "YJ");
    assert_eq!(allergies[0].severity.code, "SV");
    assert_eq!(allergies[0].reactions, ["蕁麻疹", "呼吸困難"]);
    assert_eq!(allergies[0].identified, "20230105");
    assert!(allergies[0].action.is_empty());
    assert_eq!(allergies[1].allergen.text, "卵");
    // No AL1: an empty list; an AL1 without allergen: 101 at AL1-3.
    let none = "MSH|^~\\&|A|B|C|D|2024||ADT^A04|1|P|2.5\rPID|1||P1\r";
    let Some(Clinical::Patient { allergies, .. }) = extract(&parse(none).unwrap()).unwrap() else {
        panic!()
    };
    assert!(allergies.is_empty());
    let bad = "MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5\rPID|1||P1\rAL1|1|DA||SV\r";
    let e = extract(&parse(bad).unwrap()).unwrap_err();
    assert_eq!(e.code, ErrorCode::RequiredFieldMissing);
    assert_eq!(e.location, Some(Location::field("AL1", 1, 3)));
}

#[test]
fn omg_and_omi_extract_order_numbers_accession_procedure_and_modality() {
    let omg = "MSH|^~\\&|A|B|C|D|2024||OMG^O19^OMG_O19|1|P|2.5\rPID|1||P1\rORC|NW|PL100^HIS|FI200^RIS\r\
OBR|1|||CT001^胸部CT^LOCAL||||||||||||||ACC300||||||CT\r";
    let m = parse(omg).unwrap();
    let Some(Clinical::Orders {
        message,
        patient,
        orders,
    }) = extract(&m).unwrap()
    else {
        panic!()
    };
    assert_eq!(message, OrderMessage::OmgO19);
    assert!(patient.is_some());
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].order_control, "NW");
    assert_eq!(orders[0].placer_order_number, "PL100");
    assert_eq!(orders[0].filler_order_number, "FI200");
    assert_eq!(orders[0].accession_number, "ACC300");
    assert_eq!(orders[0].requested_procedure.code, "CT001");
    assert_eq!(orders[0].requested_procedure.text, "胸部CT");
    assert_eq!(orders[0].modality, "CT");

    let omi = "MSH|^~\\&|A|B|C|D|2024||OMI^O23^OMI_O23|1|P|2.5\rPID|1||P1\rORC|NW|PL1\rOBR|1|PL1||MR01^Head MRI||||||||||||||OBR18\r\
IPC|ACC9|RP1|1.2.392.200036.1|SPS1|MR^MR^DCM\rORC|NW|PL2\rOBR|1|PL2||XR01\rIPC|ACC10||||CR\r";
    let m = parse(omi).unwrap();
    let Some(Clinical::Orders {
        message, orders, ..
    }) = extract(&m).unwrap()
    else {
        panic!()
    };
    assert_eq!(message, OrderMessage::OmiO23);
    assert_eq!(orders.len(), 2);
    assert_eq!(orders[0].accession_number, "ACC9");
    assert_eq!(orders[0].study_instance_uid, "1.2.392.200036.1");
    assert_eq!(orders[0].modality, "MR");
    assert_eq!(orders[1].placer_order_number, "PL2");
    assert_eq!(orders[1].accession_number, "ACC10");
    assert_eq!(orders[1].modality, "CR");

    let e = extract(&parse("MSH|^~\\&|A|B|C|D|2024||OMI^O23|1|P|2.5\rPID|1||P1\r").unwrap())
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::SegmentSequenceError);
}

#[test]
fn oru_extracts_accession_filler_number_and_result_statuses() {
    let text = "MSH|^~\\&|A|B|C|D|2024||ORU^R01^ORU_R01|1|P|2.5\rPID|1||P1\r\
OBR|1|PL1|FI1|CT001||||||||||||||ACC1|||||||F\rOBX|1|TX|REPORT||所見なし||||||F\rOBX|2|TX|IMPRESSION||異常なし||||||P\r";
    let m = parse(text).unwrap();
    let Some(Clinical::Reports { patient, reports }) = extract(&m).unwrap() else {
        panic!()
    };
    assert!(patient.is_some());
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].filler_order_number, "FI1");
    assert_eq!(reports[0].placer_order_number, "PL1");
    assert_eq!(reports[0].accession_number, "ACC1");
    assert_eq!(reports[0].result_status, "F");
    assert_eq!(reports[0].observation_statuses, ["F", "P"]);
}

#[test]
fn other_message_types_are_not_extracted() {
    let m = parse("MSH|^~\\&|A|B|C|D|2024||SIU^S12|1|P|2.5\rSCH|1\r").unwrap();
    assert_eq!(extract(&m).unwrap(), None);
}

#[test]
fn extracted_values_are_unescaped() {
    let m = parse("MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5\rPID|1||A\\F\\1||O\\T\\BRIEN^ANN\r")
        .unwrap();
    let Some(Clinical::Patient { patient, .. }) = extract(&m).unwrap() else {
        panic!()
    };
    assert_eq!(patient.ids[0].id, "A|1");
    assert_eq!(patient.names[0].family, "O&BRIEN");
}

#[test]
fn debug_of_records_never_prints_patient_data() {
    let (_, bytes) = iso2022_a08();
    let decoded = decode(&bytes, CharsetOverride::Auto).unwrap();
    let m = parse(&decoded.text).unwrap();
    let record = extract(&m).unwrap().unwrap();
    let oru = parse("MSH|^~\\&|A|B|C|D|2024||ORU^R01|1|P|2.5\rPID|1||P1\rOBR|1|PL1|FI1|||||||||||||||ACC777\rOBX|1|TX|||x||||||F\r").unwrap();
    let report = extract(&oru).unwrap().unwrap();
    let a60 = parse(
        "MSH|^~\\&|A|B|C|D|2024||ADT^A60|1|P|2.5\rPID|1||P1\rIAM|1|DA|SECRETDRUG^Iodine|SV|Rash|A|UID-SECRET||||20240301\r",
    )
    .unwrap();
    let allergies = extract(&a60).unwrap().unwrap();
    let printed = format!(
        "{record:?} {record:#?} {report:?} {allergies:?} {m:?} {decoded:?} {:?}",
        MllpEvent::Frame(bytes.clone())
    );
    for secret in [
        "放射線",
        "造影剤",
        "ホウシャセン",
        "123456",
        "9876543",
        "19700101",
        "東京",
        "ACC777",
        "PL1",
        "FI1",
        "SECRETDRUG",
        "UID-SECRET",
        "20240301",
        "Iodine",
        "Rash",
        "HOSP",
    ] {
        assert!(!printed.contains(secret), "{secret} leaked: {printed}");
    }
    assert!(printed.contains("<redacted>"));
}

#[test]
fn header_validation_codes() {
    let check = |text: &str| {
        Header::read(&parse(text).unwrap())
            .validate()
            .map_err(|e| e.code.code())
    };
    assert_eq!(check("MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5"), Ok(()));
    assert_eq!(
        check("MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|T^A|2.8.2^JPN"),
        Ok(())
    );
    assert_eq!(check("MSH|^~\\&|A|B|C|D|2024|||1|P|2.5"), Err(101));
    assert_eq!(check("MSH|^~\\&|A|B|C|D|2024||ADT^A08||P|2.5"), Err(101));
    assert_eq!(check("MSH|^~\\&|A|B|C|D|2024||ADT^A08|1||2.5"), Err(101));
    assert_eq!(check("MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P"), Err(101));
    assert_eq!(check("MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|X|2.5"), Err(202));
    assert_eq!(check("MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|3.0"), Err(203));
}

#[test]
fn full_pipeline_over_mllp_answers_each_pipelined_frame() {
    let (_, iso) = iso2022_a08();
    let (_, sjis) = sjis_a08();
    let mut stream = b"\r\n".to_vec();
    stream.extend(encode_frame(&iso));
    stream.extend(encode_frame(&sjis));
    stream.extend(encode_frame(b"garbage that is not HL7"));
    let mut decoder = MllpDecoder::new(1 << 20);
    decoder.feed(&stream);
    decoder.finish();
    let mut acks = Vec::new();
    while let Some(ev) = decoder.next_event() {
        let MllpEvent::Frame(frame) = ev else {
            continue;
        };
        let ack = match decode(&frame, CharsetOverride::Auto) {
            Ok(d) => match parse(&d.text) {
                Ok(m) => {
                    let h = Header::read(&m);
                    h.validate().unwrap();
                    let code = ack_mode(&h).code_for(Outcome::Accepted).unwrap();
                    encode_ack(&build_ack(&h, code, None, "GW", "2024"), d.charset)
                }
                Err(e) => build_minimal_nak(&AckError::from(&e), "GW", "2024").into_bytes(),
            },
            Err(e) => build_minimal_nak(&AckError::from(&e), "GW", "2024").into_bytes(),
        };
        acks.push(String::from_utf8(ack).unwrap());
    }
    assert_eq!(acks.len(), 3);
    assert!(acks[0].contains("MSA|AA|MSG0001\r"));
    assert!(acks[1].contains("MSA|AA|MSG0002\r"));
    assert!(acks[2].contains("MSA|AR|\rERR|||100^"));
}

/// Valid messages in every supported character set, as raw bytes.
fn corpus() -> Vec<Vec<u8>> {
    let mut v = vec![iso2022_a08().1, sjis_a08().1];
    v.push(
        A08_TEMPLATE
            .replace("{MSH18}", "UNICODE UTF-8")
            .into_bytes(),
    );
    for text in [
        "MSH|^~\\&|A|B|C|D|2024||ADT^A40^ADT_A39|1|P|2.5|||AL|NE\rEVN|A40\rPID|1||NEW1^^^HOSP^PI\rMRG|OLD1^^^HOSP^PI\r",
        "MSH|^~\\&|A|B|C|D|2024||ADT^A60|1|P|2.5\rPID|1||P1\rIAM|1|DA|X^Y^Z|SV|R1~R2|A\r",
        "MSH|^~\\&#|A|B|C|D|2024||OMI^O23|1|P|2.7\rPID|1||P1\rORC|NW|PL1\rOBR|1|PL1||MR01\rIPC|ACC9|RP1|1.2.3|SPS1|MR\r",
        "MSH|^~\\&|A|B|C|D|2024||ORU^R01|1|D|2.3.1|||ER|SU\rPID|1||P1\rOBR|1|PL1|FI1\rOBX|1|TX|||a\\F\\b\\X0D\\||||||F\r",
    ] {
        v.push(text.as_bytes().to_vec());
    }
    v
}

const INTERESTING: &[u8] = b"|^~\\&#\r\n\x0b\x1c\x1b$(BJD@\x80\x81\x95\x5c\xff\xe3MSHPIDX0";

fn mutate(rng: &mut XorShift, base: &[u8]) -> Vec<u8> {
    let mut data = base.to_vec();
    for _ in 0..=rng.below(4) {
        let len = data.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            1 => {
                let i = rng.below(len + 1);
                data.insert(i, INTERESTING[rng.below(INTERESTING.len())]);
            }
            2 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i + 1);
                data.drain(i..i + n);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below((len - i).min(64) + 1);
                let chunk = data[i..i + n].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, chunk);
            }
            4 => data.truncate(rng.below(len + 1)),
            _ => {
                let i = rng.below(len + 1);
                data.insert(i, rng.next_u64() as u8);
            }
        }
    }
    data
}

/// Runs one frame through everything the listener would do; returns whether it parsed.
fn exercise(frame: &[u8], over: CharsetOverride) -> bool {
    let Ok(decoded) = decode(frame, over) else {
        let _ = Header::from_raw_frame(frame);
        return false;
    };
    let Ok(m) = parse(&decoded.text) else {
        return false;
    };
    assert_eq!(m.serialize(), decoded.text, "serialize must round-trip");
    let h = Header::read(&m);
    let outcome = match h.validate().and_then(|()| extract(&m)) {
        Ok(record) => {
            let _ = format!("{record:?}");
            Outcome::Accepted
        }
        Err(e) => Outcome::for_error(e.code),
    };
    if let Some(code) = ack_mode(&h).code_for(outcome) {
        let err = AckError::new(ErrorCode::ApplicationInternalError);
        let ack = build_ack(&h, code, Some(&err), "GW1", "20240101");
        let bytes = encode_ack(&ack, decoded.charset);
        // The acknowledgement we send must itself be a well-formed message.
        let back = crate::charset::decode_as(&bytes, decoded.charset).unwrap();
        let parsed = parse(&back).unwrap();
        assert_eq!(parsed.segments().nth(1).map(|s| s.name()), Some("MSA"));
    }
    true
}

#[test]
fn ten_thousand_seeded_mutations_never_panic() {
    let corpus = corpus();
    let mut rng = XorShift::new(0x4C37);
    let overrides = [
        CharsetOverride::Auto,
        CharsetOverride::Fixed(Charset::Ascii),
        CharsetOverride::Fixed(Charset::Utf8),
        CharsetOverride::Fixed(Charset::Iso2022Jp),
        CharsetOverride::Fixed(Charset::ShiftJis),
    ];
    let mut parsed = 0;
    for round in 0..10_000 {
        let base = &corpus[rng.below(corpus.len())];
        let data = mutate(&mut rng, base);
        // Through MLLP, cut at a random point, then every resulting frame.
        let framed = encode_frame(&data);
        let cut = rng.below(framed.len() + 1);
        let events = crate::mllp::decode_all(64 * 1024, &framed, &[cut]);
        assert_eq!(
            events,
            crate::mllp::decode_all(64 * 1024, &framed, &[]),
            "round {round}"
        );
        for ev in events {
            if let MllpEvent::Frame(frame) = ev
                && exercise(&frame, overrides[round % overrides.len()])
            {
                parsed += 1;
            }
        }
        // And the raw mutated bytes as a stream (framing bytes may have been mutated in).
        let _ = crate::mllp::decode_all(256, &data, &[rng.below(data.len() + 1)]);
    }
    // The mutations must leave a fair share parseable, or the test exercises nothing deep.
    assert!(parsed > 2_000, "only {parsed} mutated messages parsed");
}

#[test]
fn location_and_codes_render_without_content() {
    let e = Header::read(&parse("MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|9.9").unwrap())
        .validate()
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "MSH-12 version is not an HL7 v2.x version (HL7 203 Unsupported version id at MSH-12)"
    );
}

/// Fuzz finding (`fuzz/corpus/parse_roundtrip/non_ascii_msh_delimiters`): a Shift_JIS frame
/// whose MSH-1/MSH-2 decode to non-ASCII characters. Delimiters must be ASCII: the frame is
/// refused like any other unusable MSH and answered with the minimal NAK (which parses),
/// never with an ACK that repeats an MSH-2 the receiver cannot read back.
#[test]
fn non_ascii_msh_delimiters_are_refused_with_the_minimal_nak() {
    let input: &[u8] = b"\xdbMSH\xf7\xef\xf1\x8b\x81\xe3\x81\xf3\x2c";
    let (&selector, frame) = input.split_first().unwrap();
    assert_eq!(
        selector % 5,
        4,
        "the fuzz target decodes this input as Shift_JIS"
    );
    let decoded = decode(frame, CharsetOverride::Fixed(Charset::ShiftJis)).unwrap();
    assert!(decoded.text.starts_with("MSH"));
    assert!(!decoded.text.is_ascii());

    let e = parse(&decoded.text).unwrap_err();
    assert_eq!(e.code, ErrorCode::DataTypeError);
    assert_eq!(e.location.as_ref().map(|l| l.segment.as_str()), Some("MSH"));
    assert!(Header::from_raw_frame(frame).is_none());
    let nak = build_minimal_nak(&AckError::from(&e), "GW1", "2024");
    let parsed = parse(&nak).unwrap();
    assert_eq!(parsed.delimiters().encoding_characters(), "^~\\&");
    assert_eq!(parsed.get("MSA", 1, 1, 1, 1), Some("AR"));
    // The same path as the listener and the fuzz target, under every override.
    for over in [
        CharsetOverride::Auto,
        CharsetOverride::Fixed(Charset::Ascii),
        CharsetOverride::Fixed(Charset::Utf8),
        CharsetOverride::Fixed(Charset::Iso2022Jp),
        CharsetOverride::Fixed(Charset::ShiftJis),
    ] {
        assert!(!exercise(frame, over), "{over:?}");
    }
}

#[test]
fn msh_delimiters_must_be_ascii_punctuation() {
    for text in [
        "MSH\u{a6}^~\\&|A\r",
        "MSH|^~\\\u{ff06}|A\r",
        "MSH|\u{2038}~\\&|A\r",
        "MSH|^~\\&\u{ff5e}|A\r",
    ] {
        let e = parse(text).unwrap_err();
        assert_eq!(e.code, ErrorCode::DataTypeError, "{text:?}");
    }
    // Every ASCII punctuation character other than those in use still works, e.g. `#`.
    let m = parse("MSH#^~\\&#A#B\r").unwrap();
    assert_eq!(m.delimiters().field, '#');
}
