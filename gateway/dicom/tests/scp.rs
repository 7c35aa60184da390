//! The SCP against dicom-ul's own client on 127.0.0.1:0, with a real spool in a temp dir.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Gateway, dataset, element, even, exported};
use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use dicom_ul::association::Error as UlError;
use dicom_ul::pdu::{
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, PDataValue, PDataValueType,
};
use dicom_ul::{ClientAssociationOptions, Pdu};
use gateway_dicom::Peer;
use gateway_spool::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CT: &str = uids::CT_IMAGE_STORAGE;
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

fn client(calling: &str) -> ClientAssociationOptions<'static> {
    ClientAssociationOptions::new()
        .calling_ae_title(calling.to_string())
        .called_ae_title("GATEWAY")
        .with_presentation_context(CT, vec![EXPLICIT_LE])
        .with_presentation_context(uids::VERIFICATION, vec!["1.2.840.10008.1.2"])
}

fn store_rq(message_id: u16, class: &str, instance: &str) -> Vec<u8> {
    gateway_dicom::dimse::store_request(message_id, class, instance)
}

fn echo_rq(message_id: u16) -> Vec<u8> {
    let obj = InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(String::from_utf8(even(uids::VERIFICATION)).unwrap()),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x0030])),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0101]),
        ),
    ]);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

type Assoc = dicom_ul::association::AsyncClientAssociation<tokio::net::TcpStream>;

fn pc_of(assoc: &Assoc, abstract_syntax: &str) -> u8 {
    assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.abstract_syntax.trim_end_matches('\0') == abstract_syntax)
        .expect("context negotiated")
        .id
}

/// Sends a C-STORE in PDVs of `fragment` bytes and returns (status, message id responded to).
async fn store(
    assoc: &mut Assoc,
    pc: u8,
    message_id: u16,
    class: &str,
    instance: &str,
    data: &[u8],
) -> (u16, u16) {
    let cmd = PDataValue {
        presentation_context_id: pc,
        value_type: PDataValueType::Command,
        is_last: true,
        data: store_rq(message_id, class, instance),
    };
    assoc.send(&Pdu::PData { data: vec![cmd] }).await.unwrap();
    let chunks: Vec<&[u8]> = data.chunks(8000).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let pdv = PDataValue {
            presentation_context_id: pc,
            value_type: PDataValueType::Data,
            is_last: i + 1 == chunks.len(),
            data: chunk.to_vec(),
        };
        assoc.send(&Pdu::PData { data: vec![pdv] }).await.unwrap();
    }
    response(assoc).await
}

async fn response(assoc: &mut Assoc) -> (u16, u16) {
    let pdu = tokio::time::timeout(Duration::from_secs(10), assoc.receive())
        .await
        .unwrap()
        .unwrap();
    let Pdu::PData { data } = pdu else {
        panic!("expected a response, got {pdu:?}")
    };
    let obj = InMemDicomObject::read_dataset_with_ts(
        data[0].data.as_slice(),
        &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
    )
    .unwrap();
    let status = obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap();
    let id = obj
        .element(tags::MESSAGE_ID_BEING_RESPONDED_TO)
        .unwrap()
        .to_int::<u16>()
        .unwrap();
    (status, id)
}

#[tokio::test]
async fn echo_answers_success_with_the_request_message_id() {
    let gw = Gateway::default().await;
    let mut assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    let pc = pc_of(&assoc, uids::VERIFICATION);
    for id in [1u16, 77, 65535] {
        let cmd = PDataValue {
            presentation_context_id: pc,
            value_type: PDataValueType::Command,
            is_last: true,
            data: echo_rq(id),
        };
        assoc.send(&Pdu::PData { data: vec![cmd] }).await.unwrap();
        assert_eq!(response(&mut assoc).await, (0x0000, id));
    }
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn stored_data_set_comes_back_as_part10_with_identical_bytes() {
    let gw = Gateway::default().await;
    let mut assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    let pc = pc_of(&assoc, CT);
    let data = dataset(CT, "1.2.826.0.1.1", "ZZTEST^One", 100_000);
    assert_eq!(
        store(&mut assoc, pc, 42, CT, "1.2.826.0.1.1", &data).await,
        (0x0000, 42)
    );
    assoc.release().await.unwrap();
    let file = exported(&gw.spool, "1.2.826.0.1.1");
    assert_eq!(&file[128..132], b"DICM");
    assert!(
        file.ends_with(&data),
        "data set bytes differ after unsealing"
    );
    let meta = dicom_object::FileMetaTable::from_reader(&file[128..]).unwrap();
    assert_eq!(meta.transfer_syntax().trim_end_matches('\0'), EXPLICIT_LE);
    assert_eq!(
        meta.media_storage_sop_instance_uid().trim_end_matches('\0'),
        "1.2.826.0.1.1"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn resend_is_success_without_a_second_copy() {
    let gw = Gateway::default().await;
    let mut assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    let pc = pc_of(&assoc, CT);
    let data = dataset(CT, "1.2.9", "ZZ^Dup", 1000);
    assert_eq!(store(&mut assoc, pc, 1, CT, "1.2.9", &data).await.0, 0x0000);
    assert_eq!(store(&mut assoc, pc, 2, CT, "1.2.9", &data).await.0, 0x0000);
    assoc.release().await.unwrap();
    assert_eq!(gw.spool.status().unwrap().objects, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn malformed_data_set_gets_c000_and_the_association_goes_on() {
    let gw = Gateway::default().await;
    let mut assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    let pc = pc_of(&assoc, CT);
    let mut bad = element((0x0008, 0x0018), b"UI", b"1.2.3\0");
    bad.extend([
        0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0x00, 0x00, 0xFF, 0x7F,
    ]);
    bad.extend([0u8; 10]);
    assert_eq!(
        store(&mut assoc, pc, 5, CT, "1.2.3", &bad).await,
        (0xC000, 5)
    );
    let good = dataset(CT, "1.2.4", "ZZ^Good", 64);
    assert_eq!(
        store(&mut assoc, pc, 6, CT, "1.2.4", &good).await,
        (0x0000, 6)
    );
    assoc.release().await.unwrap();
    assert_eq!(gw.spool.status().unwrap().objects, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn data_set_of_another_sop_instance_or_class_gets_a900() {
    let gw = Gateway::default().await;
    let mut assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    let pc = pc_of(&assoc, CT);
    let other_instance = dataset(CT, "9.9.9", "ZZ^X", 16);
    assert_eq!(
        store(&mut assoc, pc, 1, CT, "1.2.5", &other_instance)
            .await
            .0,
        0xA900
    );
    let other_class = dataset(uids::MR_IMAGE_STORAGE, "1.2.6", "ZZ^X", 16);
    assert_eq!(
        store(&mut assoc, pc, 2, CT, "1.2.6", &other_class).await.0,
        0xA900
    );
    assoc.release().await.unwrap();
    assert_eq!(gw.spool.status().unwrap().objects, 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn store_of_a_class_other_than_the_context_gets_0122() {
    let gw = Gateway::default().await;
    let mut assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    let pc = pc_of(&assoc, CT);
    let mr = dataset(uids::MR_IMAGE_STORAGE, "1.2.7", "ZZ^X", 16);
    assert_eq!(
        store(&mut assoc, pc, 3, uids::MR_IMAGE_STORAGE, "1.2.7", &mr).await,
        (0x0122, 3)
    );
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn unsupported_abstract_syntax_is_refused_at_negotiation() {
    let gw = Gateway::default().await;
    let assoc = ClientAssociationOptions::new()
        .calling_ae_title("CT01")
        .called_ae_title("GATEWAY")
        .with_presentation_context("1.2.840.10008.5.1.4.1.2.2.1", vec![EXPLICIT_LE])
        .with_presentation_context(uids::VERIFICATION, vec!["1.2.840.10008.1.2"])
        .establish_async(gw.addr)
        .await
        .unwrap();
    // dicom-ul's client keeps only the contexts the acceptor accepted.
    let accepted: Vec<_> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance)
        .map(|pc| pc.id)
        .collect();
    assert_eq!(
        accepted,
        vec![3],
        "only the Verification context may be accepted"
    );
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn full_spool_answers_a700_and_keeps_earlier_objects() {
    let gw = Gateway::start(
        |_| {},
        Limits {
            max_bytes: 150_000,
            min_free_bytes: 0,
        },
    )
    .await;
    let mut assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    let pc = pc_of(&assoc, CT);
    let first = dataset(CT, "1.3.1", "ZZ^A", 100_000);
    assert_eq!(
        store(&mut assoc, pc, 1, CT, "1.3.1", &first).await.0,
        0x0000
    );
    let second = dataset(CT, "1.3.2", "ZZ^B", 100_000);
    assert_eq!(
        store(&mut assoc, pc, 2, CT, "1.3.2", &second).await,
        (0xA700, 2)
    );
    // The association survives and small objects still fit.
    let small = dataset(CT, "1.3.3", "ZZ^C", 100);
    assert_eq!(
        store(&mut assoc, pc, 3, CT, "1.3.3", &small).await.0,
        0x0000
    );
    assoc.release().await.unwrap();
    assert!(exported(&gw.spool, "1.3.1").ends_with(&first));
    assert_eq!(gw.spool.status().unwrap().objects, 2);
    gw.shutdown().await;
}

fn rejection(err: UlError) -> AssociationRJSource {
    match err {
        UlError::Rejected { association_rj, .. } => association_rj.source,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn association_over_the_limit_is_rejected_with_local_limit_exceeded() {
    let gw = Gateway::start(
        |p| p.max_associations = 2,
        Limits {
            max_bytes: 1 << 30,
            min_free_bytes: 0,
        },
    )
    .await;
    let a = client("A").establish_async(gw.addr).await.unwrap();
    let b = client("B").establish_async(gw.addr).await.unwrap();
    let err = client("C").establish_async(gw.addr).await.unwrap_err();
    assert_eq!(
        rejection(err),
        AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded
        )
    );
    a.release().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = client("C").establish_async(gw.addr).await.unwrap();
    b.release().await.unwrap();
    c.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn peer_limit_and_allow_list_are_enforced() {
    let gw = Gateway::start(
        |p| {
            p.max_associations_per_peer = 1;
            p.peers = vec![Peer {
                ae_title: "CT01".into(),
                host: "127.0.0.1".parse().unwrap(),
                max_associations: None,
                tls_client_name: None,
            }];
        },
        Limits {
            max_bytes: 1 << 30,
            min_free_bytes: 0,
        },
    )
    .await;
    let err = client("EVIL").establish_async(gw.addr).await.unwrap_err();
    assert_eq!(
        rejection(err),
        AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CallingAETitleNotRecognized
        )
    );
    let a = client("CT01").establish_async(gw.addr).await.unwrap();
    let err = client("CT01").establish_async(gw.addr).await.unwrap_err();
    assert_eq!(
        rejection(err),
        AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded
        )
    );
    let err = ClientAssociationOptions::new()
        .calling_ae_title("CT01")
        .called_ae_title("NOTME")
        .with_presentation_context(uids::VERIFICATION, vec!["1.2.840.10008.1.2"])
        .establish_async(gw.addr)
        .await
        .unwrap_err();
    assert_eq!(
        rejection(err),
        AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CalledAETitleNotRecognized
        )
    );
    a.release().await.unwrap();
    gw.shutdown().await;
}

async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn garbage_truncated_and_oversized_pdus_are_dropped_and_service_goes_on() {
    let gw = Gateway::default().await;
    let mut garbage = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    garbage.write_all(&[0x42; 4096]).await.unwrap();
    assert!(
        closed_within(&mut garbage, Duration::from_secs(3)).await,
        "garbage connection left open"
    );

    let mut truncated = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    truncated
        .write_all(&[0x01, 0x00, 0x00, 0x00, 0x00, 200])
        .await
        .unwrap();
    truncated.write_all(&[0u8; 20]).await.unwrap();
    assert!(
        closed_within(&mut truncated, Duration::from_secs(5)).await,
        "truncated PDU outlived ARTIM"
    );

    let mut huge = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    huge.write_all(&[0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xF0])
        .await
        .unwrap();
    assert!(
        closed_within(&mut huge, Duration::from_secs(3)).await,
        "4 GiB PDU header not refused"
    );

    let mut assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    let pc = pc_of(&assoc, uids::VERIFICATION);
    let cmd = PDataValue {
        presentation_context_id: pc,
        value_type: PDataValueType::Command,
        is_last: true,
        data: echo_rq(9),
    };
    assoc.send(&Pdu::PData { data: vec![cmd] }).await.unwrap();
    assert_eq!(response(&mut assoc).await, (0x0000, 9));
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_aborts_an_idle_association_after_the_grace_period() {
    let gw = Gateway::default().await;
    let mut assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    let started = std::time::Instant::now();
    gw.stop.send(true).unwrap();
    let pdu = tokio::time::timeout(Duration::from_secs(8), assoc.receive())
        .await
        .unwrap();
    assert!(matches!(pdu, Ok(Pdu::AbortRQ { .. }) | Err(_)), "{pdu:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "aborted before the grace period"
    );
    tokio::time::timeout(Duration::from_secs(10), gw.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn negotiated_max_pdu_is_the_configured_one() {
    let gw = Gateway::default().await;
    let assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    assert_eq!(assoc.acceptor_max_pdu_length(), 16384);
    assoc.release().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn silent_association_is_aborted_after_the_idle_timeout() {
    let gw = Gateway::start_with(
        |_| {},
        Limits {
            max_bytes: 1 << 30,
            min_free_bytes: 0,
        },
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(gw.idle_timeout, Duration::from_millis(500));
    let mut assoc = client("CT01").establish_async(gw.addr).await.unwrap();
    let started = std::time::Instant::now();
    let pdu = tokio::time::timeout(Duration::from_secs(5), assoc.receive())
        .await
        .unwrap();
    assert!(matches!(pdu, Ok(Pdu::AbortRQ { .. }) | Err(_)), "{pdu:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "aborted before the idle timeout"
    );
    // The slot is free again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = client("CT01").establish_async(gw.addr).await.unwrap();
    again.release().await.unwrap();
    gw.shutdown().await;
}
