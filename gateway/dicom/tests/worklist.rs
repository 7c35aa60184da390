//! The Modality Worklist C-FIND SCP against dicom-ul's own client on 127.0.0.1:0, with a
//! static worklist of four items.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, DicomValue, Length, PrimitiveValue, VR, dicom_value};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};
use gateway_booking::WorklistItem;
use gateway_dicom::{DicomService, DicomSettings, PolicySettings, WorklistSource};
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_spool::{Limits, Spool};
use tokio::sync::watch;

const MWL: &str = "1.2.840.10008.5.1.4.31";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

#[derive(Debug)]
struct StaticWorklist {
    items: Vec<WorklistItem>,
    delay: Duration,
}

impl WorklistSource for StaticWorklist {
    fn items(&self) -> Vec<WorklistItem> {
        std::thread::sleep(self.delay);
        self.items.clone()
    }
}

#[allow(clippy::too_many_arguments)]
fn item(
    name: &str,
    id: &str,
    accession: &str,
    date: &str,
    time: &str,
    ae: &str,
    modality: &str,
) -> WorklistItem {
    WorklistItem {
        patient_name: name.into(),
        patient_id: id.into(),
        birth_date: "19700101".into(),
        sex: "F".into(),
        accession: accession.into(),
        requested_procedure_id: accession.into(),
        requested_procedure_description: "Chest".into(),
        modality: modality.into(),
        station_ae: ae.into(),
        start_date: date.into(),
        start_time: time.into(),
        step_id: format!("step-{id}"),
        step_description: "Chest".into(),
        medical_alerts: Vec::new(),
        contrast_allergies: Vec::new(),
    }
}

fn items() -> Vec<WorklistItem> {
    vec![
        item(
            "YAMADA^TARO=山田^太郎=やまだ^たろう",
            "P1",
            "RB20270112000001",
            "20270112",
            "093000",
            "CT01",
            "CT",
        ),
        item(
            "SATO^HANAKO=佐藤^花子=さとう^はなこ",
            "P2",
            "RB20270112000002",
            "20270112",
            "140000",
            "CT01",
            "CT",
        ),
        item(
            "YAMAMOTO^JIRO",
            "P3",
            "RB20270113000003",
            "20270113",
            "090000",
            "CT02",
            "CT",
        ),
        item(
            "SMITH^ANNE",
            "P4",
            "XR20270115000004",
            "20270115",
            "100000",
            "MR01",
            "MR",
        ),
    ]
}

struct Gateway {
    addr: SocketAddr,
    registry: prometheus_client::registry::Registry,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    async fn start(worklist: Option<StaticWorklist>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(
            dir.path(),
            Some(MasterKey::from_bytes([3; KEY_LEN])),
            Limits {
                max_bytes: 1 << 30,
                min_free_bytes: 0,
            },
            vec![],
        )
        .unwrap();
        let settings = DicomSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            policy: PolicySettings {
                ae_title: "GATEWAY".into(),
                max_associations: 8,
                max_associations_per_peer: 8,
                peers: vec![],
            },
            max_pdu_length: 16384,
            artim_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
            tls: None,
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let mut service = DicomService::bind(settings, spool, &mut registry)
            .await
            .unwrap();
        if let Some(w) = worklist {
            service = service.with_worklist(Arc::new(w));
        }
        let addr = service.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(service.run(rx));
        Self {
            addr,
            registry,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn with_items() -> Self {
        Self::start(Some(StaticWorklist {
            items: items(),
            delay: Duration::ZERO,
        }))
        .await
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    async fn shutdown(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

type Assoc = dicom_ul::association::AsyncClientAssociation<tokio::net::TcpStream>;

async fn associate(addr: SocketAddr, ts: &str) -> Assoc {
    ClientAssociationOptions::new()
        .calling_ae_title("CT01")
        .called_ae_title("GATEWAY")
        .with_presentation_context(MWL, vec![ts])
        .with_presentation_context(uids::CT_IMAGE_STORAGE, vec![EXPLICIT_LE])
        .establish_async(addr)
        .await
        .unwrap()
}

fn pc_of(assoc: &Assoc, abstract_syntax: &str) -> u8 {
    assoc
        .presentation_contexts()
        .iter()
        .find(|pc| {
            pc.abstract_syntax.trim_end_matches('\0') == abstract_syntax
                && pc.reason == PresentationContextResultReason::Acceptance
        })
        .expect("context accepted")
        .id
}

fn command(obj: InMemDicomObject) -> Vec<u8> {
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

fn find_rq(message_id: u16, class: &str) -> Vec<u8> {
    let mut class = class.to_string();
    if class.len() % 2 == 1 {
        class.push('\0');
    }
    command(InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(class),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x0020])),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0000]),
        ),
    ]))
}

fn cancel_rq(message_id: u16) -> Vec<u8> {
    command(InMemDicomObject::command_from_element_iter([
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x0FFF])),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [message_id]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0101]),
        ),
    ]))
}

fn raw(bytes: &[u8]) -> PrimitiveValue {
    let mut b = bytes.to_vec();
    if b.len() % 2 == 1 {
        b.push(b' ');
    }
    PrimitiveValue::U8(b.into())
}

/// The matching keys of a query; values are raw bytes (already in the character set).
#[derive(Default)]
struct Keys<'a> {
    charset: Option<&'a [u8]>,
    name: &'a [u8],
    accession: &'a [u8],
    date: &'a [u8],
    /// Ask for Medical Alerts (0010,2000) and Contrast Allergies (0010,2110).
    alerts: bool,
}

fn identifier(keys: &Keys<'_>, ts: &str) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    if let Some(cs) = keys.charset {
        obj.put(DataElement::new(
            tags::SPECIFIC_CHARACTER_SET,
            VR::CS,
            raw(cs),
        ));
    }
    obj.put(DataElement::new(tags::PATIENT_NAME, VR::PN, raw(keys.name)));
    obj.put(DataElement::new(
        tags::PATIENT_ID,
        VR::LO,
        PrimitiveValue::Empty,
    ));
    obj.put(DataElement::new(
        tags::ACCESSION_NUMBER,
        VR::SH,
        raw(keys.accession),
    ));
    if keys.alerts {
        for tag in [tags::MEDICAL_ALERTS, tags::ALLERGIES] {
            obj.put(DataElement::new(tag, VR::LO, PrimitiveValue::Empty));
        }
    }
    let mut step = InMemDicomObject::new_empty();
    step.put(DataElement::new(
        tags::MODALITY,
        VR::CS,
        PrimitiveValue::Empty,
    ));
    step.put(DataElement::new(
        tags::SCHEDULED_PROCEDURE_STEP_START_DATE,
        VR::DA,
        raw(keys.date),
    ));
    step.put(DataElement::new(
        tags::SCHEDULED_PROCEDURE_STEP_START_TIME,
        VR::TM,
        PrimitiveValue::Empty,
    ));
    obj.put(DataElement::new(
        tags::SCHEDULED_PROCEDURE_STEP_SEQUENCE,
        VR::SQ,
        DicomValue::from(DataSetSequence::new(vec![step], Length::UNDEFINED)),
    ));
    let mut out = Vec::new();
    let ts = if ts == IMPLICIT_LE {
        IMPLICIT_VR_LITTLE_ENDIAN.erased()
    } else {
        EXPLICIT_VR_LITTLE_ENDIAN.erased()
    };
    obj.write_dataset_with_ts(&mut out, &ts).unwrap();
    out
}

async fn send(assoc: &mut Assoc, pc: u8, value_type: PDataValueType, data: Vec<u8>) {
    let pdv = PDataValue {
        presentation_context_id: pc,
        value_type,
        is_last: true,
        data,
    };
    assoc.send(&Pdu::PData { data: vec![pdv] }).await.unwrap();
}

/// Reads responses until a final one: (pending identifiers as raw bytes, final status).
async fn responses(assoc: &mut Assoc, message_id: u16) -> (Vec<Vec<u8>>, u16) {
    let mut identifiers = Vec::new();
    let mut data = Vec::new();
    let mut command_bytes = Vec::new();
    loop {
        let pdu = tokio::time::timeout(Duration::from_secs(10), assoc.receive())
            .await
            .unwrap()
            .unwrap();
        let Pdu::PData { data: pdvs } = pdu else {
            panic!("expected P-DATA, got {pdu:?}")
        };
        for pdv in pdvs {
            match pdv.value_type {
                PDataValueType::Data => {
                    data.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        identifiers.push(std::mem::take(&mut data));
                    }
                }
                PDataValueType::Command => {
                    command_bytes.extend_from_slice(&pdv.data);
                    if !pdv.is_last {
                        continue;
                    }
                    let cmd = InMemDicomObject::read_dataset_with_ts(
                        command_bytes.as_slice(),
                        &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                    )
                    .unwrap();
                    command_bytes.clear();
                    let field = cmd.element(tags::COMMAND_FIELD).unwrap().to_int::<u16>();
                    assert_eq!(field.unwrap(), 0x8020);
                    let id = cmd
                        .element(tags::MESSAGE_ID_BEING_RESPONDED_TO)
                        .unwrap()
                        .to_int::<u16>()
                        .unwrap();
                    assert_eq!(id, message_id);
                    let status = cmd.element(tags::STATUS).unwrap().to_int::<u16>().unwrap();
                    let dataset_type = cmd
                        .element(tags::COMMAND_DATA_SET_TYPE)
                        .unwrap()
                        .to_int::<u16>()
                        .unwrap();
                    if status != 0xFF00 && status != 0xFF01 {
                        assert_eq!(dataset_type, 0x0101, "final response carries no data set");
                        return (identifiers, status);
                    }
                    assert_ne!(
                        dataset_type, 0x0101,
                        "pending response carries an identifier"
                    );
                }
            }
        }
    }
}

async fn find(
    assoc: &mut Assoc,
    message_id: u16,
    keys: &Keys<'_>,
    ts: &str,
) -> (Vec<InMemDicomObject>, Vec<Vec<u8>>, u16) {
    let pc = pc_of(assoc, MWL);
    send(assoc, pc, PDataValueType::Command, find_rq(message_id, MWL)).await;
    send(assoc, pc, PDataValueType::Data, identifier(keys, ts)).await;
    let (raw, status) = responses(assoc, message_id).await;
    let ts = if ts == IMPLICIT_LE {
        IMPLICIT_VR_LITTLE_ENDIAN.erased()
    } else {
        EXPLICIT_VR_LITTLE_ENDIAN.erased()
    };
    let objs = raw
        .iter()
        .map(|b| InMemDicomObject::read_dataset_with_ts(b.as_slice(), &ts).unwrap())
        .collect();
    (objs, raw, status)
}

fn ids(objs: &[InMemDicomObject]) -> Vec<String> {
    objs.iter()
        .map(|o| {
            o.element(tags::PATIENT_ID)
                .unwrap()
                .to_str()
                .unwrap()
                .into_owned()
        })
        .collect()
}

/// The bytes of a text element as received (dicom-rs keeps unknown character sets as
/// ISO-8859-1, byte for code point).
fn raw_value(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Vec<u8> {
    obj.element(tag)
        .unwrap()
        .value()
        .to_raw_str()
        .unwrap()
        .chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap())
        .collect()
}

#[tokio::test]
async fn universal_query_returns_every_item_then_success() {
    let gw = Gateway::with_items().await;
    for ts in [EXPLICIT_LE, IMPLICIT_LE] {
        let mut assoc = associate(gw.addr, ts).await;
        let (objs, _, status) = find(&mut assoc, 1, &Keys::default(), ts).await;
        assert_eq!(status, 0x0000);
        assert_eq!(ids(&objs), ["P1", "P2", "P3", "P4"]);
        // Return keys: filled from the item, also inside the step sequence.
        let DicomValue::Sequence(seq) = objs[3]
            .element(tags::SCHEDULED_PROCEDURE_STEP_SEQUENCE)
            .unwrap()
            .value()
        else {
            panic!("no step sequence")
        };
        let step = &seq.items()[0];
        assert_eq!(
            step.element(tags::MODALITY).unwrap().to_str().unwrap(),
            "MR"
        );
        assert_eq!(
            step.element(tags::SCHEDULED_PROCEDURE_STEP_START_TIME)
                .unwrap()
                .to_str()
                .unwrap(),
            "100000"
        );
        // Non-ASCII names of a default-repertoire query come back in UTF-8.
        assert_eq!(
            objs[0]
                .element(tags::SPECIFIC_CHARACTER_SET)
                .unwrap()
                .to_str()
                .unwrap(),
            "ISO_IR 192"
        );
        assert_eq!(
            objs[0]
                .element(tags::PATIENT_NAME)
                .unwrap()
                .to_str()
                .unwrap(),
            "YAMADA^TARO=山田^太郎=やまだ^たろう"
        );
        assert!(
            objs[3]
                .element_opt(tags::SPECIFIC_CHARACTER_SET)
                .unwrap()
                .is_none()
        );
        assoc.release().await.unwrap();
    }
    // Counts and statuses only.
    let metrics = gw.metrics();
    assert!(
        metrics.contains("gateway_dicom_worklist_find_total{status=\"success\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("gateway_dicom_worklist_matches_total 8"));
    assert!(!metrics.contains("YAMADA"));
    gw.shutdown().await;
}

#[tokio::test]
async fn date_ranges_and_wildcards_select_exactly_the_expected_items() {
    let gw = Gateway::with_items().await;
    let mut assoc = associate(gw.addr, EXPLICIT_LE).await;
    let cases: [(Keys<'_>, &[&str]); 6] = [
        (
            Keys {
                date: b"20270112-20270113",
                ..Keys::default()
            },
            &["P1", "P2", "P3"],
        ),
        (
            Keys {
                date: b"20270113-",
                ..Keys::default()
            },
            &["P3", "P4"],
        ),
        (
            Keys {
                date: b"20270114",
                ..Keys::default()
            },
            &[],
        ),
        (
            Keys {
                name: b"YAMA*",
                ..Keys::default()
            },
            &["P1", "P3"],
        ),
        (
            Keys {
                name: b"S?T*",
                ..Keys::default()
            },
            &["P2"],
        ),
        (
            Keys {
                accession: b"RB20270112*",
                ..Keys::default()
            },
            &["P1", "P2"],
        ),
    ];
    for (i, (keys, expected)) in cases.iter().enumerate() {
        let id = 10 + i as u16;
        let (objs, _, status) = find(&mut assoc, id, keys, EXPLICIT_LE).await;
        assert_eq!(status, 0x0000, "case {i}");
        assert_eq!(ids(&objs), *expected, "case {i}");
    }
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn kanji_query_in_iso_2022_ir_87_returns_the_name_iso_2022_encoded() {
    let gw = Gateway::with_items().await;
    let mut assoc = associate(gw.addr, EXPLICIT_LE).await;
    // "=山田*": ideographic group only.
    let keys = Keys {
        charset: Some(b"\\ISO 2022 IR 87"),
        name: b"=\x1b$B;3ED\x1b(B*",
        ..Keys::default()
    };
    let (objs, raw, status) = find(&mut assoc, 3, &keys, EXPLICIT_LE).await;
    assert_eq!(status, 0x0000);
    assert_eq!(ids(&objs), ["P1"]);
    assert_eq!(
        raw_value(&objs[0], tags::SPECIFIC_CHARACTER_SET),
        b"\\ISO 2022 IR 87 "
    );
    let name: &[u8] =
        b"YAMADA^TARO=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B";
    let mut padded = name.to_vec();
    padded.push(b' ');
    assert_eq!(raw_value(&objs[0], tags::PATIENT_NAME), padded);
    // The bytes are on the wire as they are: tag, VR PN, length, value.
    let mut element = vec![0x10, 0x00, 0x10, 0x00, b'P', b'N'];
    element.extend((padded.len() as u16).to_le_bytes());
    element.extend(&padded);
    assert!(raw[0].windows(element.len()).any(|w| w == element));

    // Phonetic group, kana.
    let keys = Keys {
        charset: Some(b"\\ISO 2022 IR 87"),
        name: b"==\x1b$B$5$H$&\x1b(B*",
        ..Keys::default()
    };
    let (objs, _, status) = find(&mut assoc, 4, &keys, EXPLICIT_LE).await;
    assert_eq!((ids(&objs), status), (vec!["P2".to_string()], 0x0000));
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn alerts_are_returned_as_asked_in_the_requests_character_set() {
    let mut with_alerts = items();
    with_alerts[0].medical_alerts = vec![
        "Contrast reaction: iohexol (SV)".into(),
        "Contrast reaction: 造影剤".into(),
    ];
    with_alerts[0].contrast_allergies = vec!["iohexol".into(), "造影剤".into()];
    let gw = Gateway::start(Some(StaticWorklist {
        items: with_alerts,
        delay: Duration::ZERO,
    }))
    .await;
    let mut assoc = associate(gw.addr, EXPLICIT_LE).await;
    let keys = Keys {
        charset: Some(b"\\ISO 2022 IR 87"),
        alerts: true,
        ..Keys::default()
    };
    let (objs, _, status) = find(&mut assoc, 5, &keys, EXPLICIT_LE).await;
    assert_eq!(
        (ids(&objs), status),
        (
            vec!["P1".into(), "P2".into(), "P3".into(), "P4".into()],
            0x0000
        )
    );
    assert_eq!(
        raw_value(&objs[0], tags::ALLERGIES),
        b"iohexol\\\x1b$BB$1F:^\x1b(B"
    );
    assert_eq!(
        raw_value(&objs[0], tags::MEDICAL_ALERTS),
        b"Contrast reaction: iohexol (SV)\\Contrast reaction: \x1b$BB$1F:^\x1b(B "
    );
    // Items without alerts: present, zero length.
    for obj in &objs[1..] {
        assert!(raw_value(obj, tags::MEDICAL_ALERTS).is_empty());
        assert!(raw_value(obj, tags::ALLERGIES).is_empty());
    }
    // Not asked for: absent.
    let (objs, _, _) = find(&mut assoc, 6, &Keys::default(), EXPLICIT_LE).await;
    assert!(objs[0].element_opt(tags::ALLERGIES).unwrap().is_none());
    assert!(objs[0].element_opt(tags::MEDICAL_ALERTS).unwrap().is_none());
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_identifiers_get_error_statuses_and_the_association_goes_on() {
    let gw = Gateway::with_items().await;
    let mut assoc = associate(gw.addr, EXPLICIT_LE).await;
    let pc = pc_of(&assoc, MWL);
    // Not a data set: an element claiming more bytes than sent.
    send(&mut assoc, pc, PDataValueType::Command, find_rq(1, MWL)).await;
    send(
        &mut assoc,
        pc,
        PDataValueType::Data,
        vec![0x10, 0x00, 0x10, 0x00, b'P', b'N', 0xFF, 0x7F, b'A'],
    )
    .await;
    assert_eq!(responses(&mut assoc, 1).await, (vec![], 0xC000));
    // An invalid escape sequence in the name.
    let keys = Keys {
        charset: Some(b"\\ISO 2022 IR 87"),
        name: b"\x1b$(D!!",
        ..Keys::default()
    };
    send(&mut assoc, pc, PDataValueType::Command, find_rq(2, MWL)).await;
    send(
        &mut assoc,
        pc,
        PDataValueType::Data,
        identifier(&keys, EXPLICIT_LE),
    )
    .await;
    assert_eq!(responses(&mut assoc, 2).await, (vec![], 0xA900));
    // Too large: sent in fragments, drained, refused.
    send(&mut assoc, pc, PDataValueType::Command, find_rq(3, MWL)).await;
    for i in 0..6 {
        let pdv = PDataValue {
            presentation_context_id: pc,
            value_type: PDataValueType::Data,
            is_last: i == 5,
            data: vec![0u8; 16000],
        };
        assoc.send(&Pdu::PData { data: vec![pdv] }).await.unwrap();
    }
    assert_eq!(responses(&mut assoc, 3).await, (vec![], 0xC000));
    // C-FIND of the worklist class on a storage context: SOP class not supported.
    let ct = pc_of(&assoc, uids::CT_IMAGE_STORAGE);
    send(&mut assoc, ct, PDataValueType::Command, find_rq(4, MWL)).await;
    send(
        &mut assoc,
        ct,
        PDataValueType::Data,
        identifier(&Keys::default(), EXPLICIT_LE),
    )
    .await;
    assert_eq!(responses(&mut assoc, 4).await, (vec![], 0x0122));
    // Still serving.
    let (objs, _, status) = find(&mut assoc, 5, &Keys::default(), EXPLICIT_LE).await;
    assert_eq!((objs.len(), status), (4, 0x0000));
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn cancel_ends_the_find_with_fe00() {
    let gw = Gateway::start(Some(StaticWorklist {
        items: items(),
        delay: Duration::from_millis(300),
    }))
    .await;
    let mut assoc = associate(gw.addr, EXPLICIT_LE).await;
    let pc = pc_of(&assoc, MWL);
    send(&mut assoc, pc, PDataValueType::Command, find_rq(9, MWL)).await;
    send(
        &mut assoc,
        pc,
        PDataValueType::Data,
        identifier(&Keys::default(), EXPLICIT_LE),
    )
    .await;
    // Arrives while the worklist is being read.
    send(&mut assoc, pc, PDataValueType::Command, cancel_rq(9)).await;
    let (identifiers, status) = responses(&mut assoc, 9).await;
    assert_eq!(status, 0xFE00);
    assert!(identifiers.len() < 4);
    // The association goes on.
    let (objs, _, status) = find(&mut assoc, 10, &Keys::default(), EXPLICIT_LE).await;
    assert_eq!((objs.len(), status), (4, 0x0000));
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn without_a_worklist_the_abstract_syntax_is_refused_at_negotiation() {
    let gw = Gateway::start(None).await;
    let assoc = associate(gw.addr, EXPLICIT_LE).await;
    let accepted: Vec<String> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| pc.abstract_syntax.trim_end_matches('\0').to_string())
        .collect();
    assert!(!accepted.iter().any(|a| a == MWL), "{accepted:?}");
    assert!(accepted.iter().any(|a| a == uids::CT_IMAGE_STORAGE));
    assoc.release().await.unwrap();
    gw.shutdown().await;

    let gw = Gateway::with_items().await;
    let assoc = associate(gw.addr, EXPLICIT_LE).await;
    assert!(
        assoc
            .presentation_contexts()
            .iter()
            .any(|pc| pc.abstract_syntax.trim_end_matches('\0') == MWL
                && pc.reason == PresentationContextResultReason::Acceptance)
    );
    assoc.release().await.unwrap();
    gw.shutdown().await;
}
