use super::*;
use crate::{Body, SopClassCount};

const ALL: [Action; 28] = [
    Action::Login,
    Action::Logout,
    Action::TotpEnrolled,
    Action::AccountAdded,
    Action::AccountDisabled,
    Action::AccountInvited,
    Action::EnrolmentCodeUsed,
    Action::EnrolmentCompleted,
    Action::PatientRecordRead,
    Action::AppointmentHeld,
    Action::AppointmentBooked,
    Action::AppointmentCancelled,
    Action::RemoteCommand,
    Action::IdentityLinked,
    Action::IdentityUnlinked,
    Action::IdentityReviewDecided,
    Action::ConsentRecorded,
    Action::ConsentRevoked,
    Action::DisclosureAllowed,
    Action::DisclosureRefused,
    Action::PatientLookup,
    Action::SafetyWarningsShown,
    Action::SafetyShown,
    Action::SafetyAcknowledged,
    Action::DeidReidentified,
    Action::Hl7SenderRefused,
    Action::DicomInstancesReceived,
    Action::DicomInstancesSent,
];

/// Every action and the EventID it must render as (A.5.3), written out independently of
/// [`event_of`] so that a change of the mapping shows here.
const EXPECTED: [(Action, &str, &str); 28] = [
    (Action::Login, "110114", "E"),
    (Action::Logout, "110114", "E"),
    (Action::TotpEnrolled, "110113", "U"),
    (Action::AccountAdded, "110113", "C"),
    (Action::AccountDisabled, "110113", "U"),
    (Action::AccountInvited, "110113", "C"),
    (Action::EnrolmentCodeUsed, "110113", "E"),
    (Action::EnrolmentCompleted, "110113", "U"),
    (Action::PatientRecordRead, "110110", "R"),
    (Action::AppointmentHeld, "110109", "C"),
    (Action::AppointmentBooked, "110109", "C"),
    (Action::AppointmentCancelled, "110109", "D"),
    (Action::RemoteCommand, "110113", "E"),
    (Action::IdentityLinked, "110110", "U"),
    (Action::IdentityUnlinked, "110110", "U"),
    (Action::IdentityReviewDecided, "110110", "U"),
    (Action::ConsentRecorded, "110110", "C"),
    (Action::ConsentRevoked, "110110", "U"),
    (Action::DisclosureAllowed, "110106", "R"),
    (Action::DisclosureRefused, "110106", "R"),
    (Action::PatientLookup, "110112", "E"),
    (Action::SafetyWarningsShown, "110110", "R"),
    (Action::SafetyShown, "110110", "R"),
    (Action::SafetyAcknowledged, "110109", "U"),
    (Action::DeidReidentified, "110113", "E"),
    (Action::Hl7SenderRefused, "110113", "E"),
    (Action::DicomInstancesReceived, "110104", "C"),
    (Action::DicomInstancesSent, "110104", "R"),
];

fn source() -> AuditSource {
    AuditSource {
        node_id: "gw-01".into(),
    }
}

fn key() -> ParticipantsKey {
    ParticipantsKey::derive(&[7; 32])
}

fn record(
    seq: u64,
    actor: &str,
    action: Action,
    outcome: Outcome,
    subject: Option<&str>,
) -> Record {
    Record {
        body: Body {
            seq,
            time_unix_ms: 1_767_323_045_678,
            actor: actor.into(),
            action,
            outcome,
            subject: subject.map(str::to_string),
            detail: None,
            participants: None,
            prev: crate::GENESIS.into(),
        },
        mac: "00".into(),
    }
}

fn transfer_participants() -> Participants {
    Participants {
        patient_id: "PAT<&>001".into(),
        study_uid: "1.2.826.0.1.3680043.8.498.1".into(),
        sop_classes: vec![
            SopClassCount {
                uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                count: 3,
            },
            SopClassCount {
                uid: "1.2.840.10008.5.1.4.1.1.7".into(),
                count: 1,
            },
        ],
    }
}

fn with_participants(mut r: Record, p: &Participants) -> Record {
    r.body.participants = Some(key().seal(r.body.seq, p).unwrap());
    r
}

/// A parsed element: name and attributes (attribute values unescaped).
#[derive(Debug)]
struct El {
    name: String,
    attrs: Vec<(String, String)>,
    depth: usize,
}

impl El {
    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#9;", "\t")
        .replace("&#10;", "\n")
        .replace("&#13;", "\r")
        .replace("&amp;", "&")
}

/// A strict little well-formedness check for the writer's own output: one root, every
/// tag closed in order, attributes quoted, no raw `<` or `&` outside markup and entities.
fn parse(xml: &str) -> Vec<El> {
    let xml = xml
        .strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\"?>")
        .expect("XML declaration");
    let mut els = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    let mut rest = xml;
    let mut roots = 0;
    while !rest.is_empty() {
        let lt = rest.find('<').unwrap_or(rest.len());
        let text = &rest[..lt];
        assert!(
            !stack.is_empty() || text.is_empty(),
            "text outside the root"
        );
        for (i, _) in text.match_indices('&') {
            let ent = &text[i..];
            assert!(
                [
                    "&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#9;", "&#10;", "&#13;"
                ]
                .iter()
                .any(|e| ent.starts_with(e)),
                "raw & in text"
            );
        }
        rest = &rest[lt..];
        if rest.is_empty() {
            break;
        }
        let gt = rest.find('>').expect("unclosed tag");
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name), "mismatched close");
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let (name, mut attrs_src) = tag.split_once(' ').unwrap_or((tag, ""));
        assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()));
        let mut attrs = Vec::new();
        while !attrs_src.trim().is_empty() {
            let s = attrs_src.trim_start();
            let (k, v) = s.split_once("=\"").expect("attribute without quoted value");
            let end = v.find('"').expect("unterminated attribute");
            let raw = &v[..end];
            assert!(!raw.contains('<'), "raw < in attribute");
            attrs.push((k.to_string(), unescape(raw)));
            attrs_src = &v[end + 1..];
        }
        if stack.is_empty() {
            roots += 1;
        }
        els.push(El {
            name: name.to_string(),
            attrs,
            depth: stack.len(),
        });
        if !self_closing {
            stack.push(name.to_string());
        }
    }
    assert!(stack.is_empty(), "unclosed elements {stack:?}");
    assert_eq!(roots, 1);
    els
}

fn xml_of(message: &[u8]) -> &str {
    let s = std::str::from_utf8(message).unwrap();
    &s[s.find("<?xml").unwrap()..]
}

#[test]
fn the_expected_table_names_every_action() {
    assert_eq!(ALL.len(), EXPECTED.len());
    for (a, (b, _, _)) in ALL.iter().zip(EXPECTED.iter()) {
        assert_eq!(a, b);
    }
}

#[test]
fn every_action_renders_well_formed_xml_with_its_event_id() {
    for (action, id, letter) in EXPECTED {
        for outcome in [Outcome::Success, Outcome::Failure] {
            let mut r = record(9, "clerk<1>", action, outcome, Some("person:42"));
            if matches!(
                action,
                Action::DicomInstancesReceived | Action::DicomInstancesSent
            ) {
                r.body.subject = Some("peer:127.0.0.1:4242".into());
                r = with_participants(r, &transfer_participants());
            }
            r.body.detail = Some("why & how".into());
            let msg = syslog_message(&r, &source(), Some(&key()));
            let els = parse(xml_of(&msg));
            assert_eq!(els[0].name, "AuditMessage", "{action:?}");
            let ev = &els[1];
            assert_eq!(ev.name, "EventIdentification");
            assert_eq!(ev.attr("EventActionCode"), Some(letter), "{action:?}");
            let want_outcome = match (outcome, action) {
                (Outcome::Success, _) => "0",
                (_, Action::DicomInstancesReceived | Action::DicomInstancesSent) => "8",
                _ => "4",
            };
            assert_eq!(ev.attr("EventOutcomeIndicator"), Some(want_outcome));
            let event_id = &els[2];
            assert_eq!(event_id.name, "EventID");
            assert_eq!(event_id.attr("csd-code"), Some(id), "{action:?}");
            assert_eq!(event_id.attr("codeSystemName"), Some("DCM"));
            assert!(event_id.attr("originalText").is_some());
            // At least one requestor, the gateway as a participant, one audit source.
            let parts: Vec<_> = els
                .iter()
                .filter(|e| e.name == "ActiveParticipant")
                .collect();
            assert!(
                parts
                    .iter()
                    .any(|p| p.attr("UserIsRequestor") == Some("true"))
            );
            assert!(parts.iter().any(|p| p.attr("UserID") == Some("gw-01")));
            let src: Vec<_> = els
                .iter()
                .filter(|e| e.name == "AuditSourceIdentification")
                .collect();
            assert_eq!(src.len(), 1);
            assert_eq!(src[0].attr("AuditSourceID"), Some("gw-01"));
            assert!(els.iter().all(|e| e.depth > 0 || e.name == "AuditMessage"));
            let text = std::str::from_utf8(&msg).unwrap();
            let pri = if outcome == Outcome::Failure {
                "<84>"
            } else {
                "<85>"
            };
            assert!(text.starts_with(pri), "{text}");
        }
    }
}

#[test]
fn the_header_carries_the_chain_position_and_the_record_time() {
    let r = record(42, "alice", Action::Login, Outcome::Success, None);
    let msg = String::from_utf8(syslog_message(&r, &source(), None)).unwrap();
    assert!(
        msg.starts_with(
            "<85>1 2026-01-02T03:04:05.678Z gw-01 gatewayd - IHE+RFC-3881 [meta sequenceId=\"42\"] <?xml "
        ),
        "{msg}"
    );
}

#[test]
fn golden_login() {
    let r = record(
        7,
        "alice",
        Action::Login,
        Outcome::Success,
        Some("account:alice"),
    );
    let msg = String::from_utf8(syslog_message(&r, &source(), None)).unwrap();
    let want = concat!(
        "<85>1 2026-01-02T03:04:05.678Z gw-01 gatewayd - IHE+RFC-3881 [meta sequenceId=\"7\"] ",
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
        "<AuditMessage>",
        "<EventIdentification EventActionCode=\"E\" EventDateTime=\"2026-01-02T03:04:05.678Z\" EventOutcomeIndicator=\"0\">",
        "<EventID csd-code=\"110114\" codeSystemName=\"DCM\" originalText=\"User Authentication\"/>",
        "<EventTypeCode csd-code=\"110122\" codeSystemName=\"DCM\" originalText=\"Login\"/>",
        "</EventIdentification>",
        "<ActiveParticipant UserID=\"alice\" UserIsRequestor=\"true\"/>",
        "<ActiveParticipant UserID=\"gw-01\" AlternativeUserID=\"gatewayd\" UserIsRequestor=\"false\">",
        "<RoleIDCode csd-code=\"110150\" codeSystemName=\"DCM\" originalText=\"Application\"/>",
        "</ActiveParticipant>",
        "<AuditSourceIdentification AuditSourceID=\"gw-01\"><AuditSourceTypeCode csd-code=\"4\"/></AuditSourceIdentification>",
        "<ParticipantObjectIdentification ParticipantObjectID=\"alice\" ParticipantObjectTypeCode=\"2\" ParticipantObjectTypeCodeRole=\"11\">",
        "<ParticipantObjectIDTypeCode csd-code=\"GWD-ACCOUNT\" codeSystemName=\"99GWD\" originalText=\"Gateway staff account\"/>",
        "<ParticipantObjectName>account</ParticipantObjectName>",
        "</ParticipantObjectIdentification>",
        "</AuditMessage>",
    );
    assert_eq!(msg, want);
}

#[test]
fn golden_dicom_instances_received() {
    let r = with_participants(
        record(
            8,
            "CT01",
            Action::DicomInstancesReceived,
            Outcome::Success,
            Some("peer:192.0.2.7:51000"),
        ),
        &transfer_participants(),
    );
    let msg = String::from_utf8(syslog_message(&r, &source(), Some(&key()))).unwrap();
    let want = concat!(
        "<85>1 2026-01-02T03:04:05.678Z gw-01 gatewayd - IHE+RFC-3881 [meta sequenceId=\"8\"] ",
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
        "<AuditMessage>",
        "<EventIdentification EventActionCode=\"C\" EventDateTime=\"2026-01-02T03:04:05.678Z\" EventOutcomeIndicator=\"0\">",
        "<EventID csd-code=\"110104\" codeSystemName=\"DCM\" originalText=\"DICOM Instances Transferred\"/>",
        "</EventIdentification>",
        "<ActiveParticipant UserID=\"CT01\" UserIsRequestor=\"true\" NetworkAccessPointID=\"192.0.2.7\" NetworkAccessPointTypeCode=\"2\">",
        "<RoleIDCode csd-code=\"110153\" codeSystemName=\"DCM\" originalText=\"Source Role ID\"/>",
        "</ActiveParticipant>",
        "<ActiveParticipant UserID=\"gw-01\" AlternativeUserID=\"gatewayd\" UserIsRequestor=\"false\">",
        "<RoleIDCode csd-code=\"110152\" codeSystemName=\"DCM\" originalText=\"Destination Role ID\"/>",
        "</ActiveParticipant>",
        "<AuditSourceIdentification AuditSourceID=\"gw-01\"><AuditSourceTypeCode csd-code=\"4\"/></AuditSourceIdentification>",
        "<ParticipantObjectIdentification ParticipantObjectID=\"1.2.826.0.1.3680043.8.498.1\" ParticipantObjectTypeCode=\"2\" ParticipantObjectTypeCodeRole=\"3\">",
        "<ParticipantObjectIDTypeCode csd-code=\"110180\" codeSystemName=\"DCM\" originalText=\"Study Instance UID\"/>",
        "<ParticipantObjectName></ParticipantObjectName>",
        "<ParticipantObjectDescription>",
        "<SOPClass UID=\"1.2.840.10008.5.1.4.1.1.2\" NumberOfInstances=\"3\"/>",
        "<SOPClass UID=\"1.2.840.10008.5.1.4.1.1.7\" NumberOfInstances=\"1\"/>",
        "</ParticipantObjectDescription>",
        "</ParticipantObjectIdentification>",
        "<ParticipantObjectIdentification ParticipantObjectID=\"PAT&lt;&amp;&gt;001\" ParticipantObjectTypeCode=\"1\" ParticipantObjectTypeCodeRole=\"1\">",
        "<ParticipantObjectIDTypeCode csd-code=\"2\" codeSystemName=\"RFC-3881\" originalText=\"Patient Number\"/>",
        "<ParticipantObjectName></ParticipantObjectName>",
        "</ParticipantObjectIdentification>",
        "</AuditMessage>",
    );
    assert_eq!(msg, want);
}

#[test]
fn without_the_key_or_with_a_damaged_seal_the_participants_are_withheld_not_the_event() {
    let good = with_participants(
        record(
            3,
            "CT01",
            Action::DicomInstancesReceived,
            Outcome::Success,
            Some("peer:127.0.0.1:1"),
        ),
        &transfer_participants(),
    );
    let mut damaged = good.clone();
    let sealed = damaged.body.participants.clone().unwrap();
    let mut bytes = sealed.into_bytes();
    bytes[20] = if bytes[20] == b'A' { b'B' } else { b'A' };
    damaged.body.participants = Some(String::from_utf8(bytes).unwrap());
    let other_key = ParticipantsKey::derive(&[8; 32]);
    for (r, k) in [
        (&good, None),
        (&good, Some(&other_key)),
        (&damaged, Some(&key())),
    ] {
        let msg = String::from_utf8(syslog_message(r, &source(), k)).unwrap();
        let els = parse(xml_of(msg.as_bytes()));
        assert_eq!(els[1].attr("EventOutcomeIndicator"), Some("0"));
        assert_eq!(els[2].attr("csd-code"), Some("110104"));
        assert!(!msg.contains("PAT&lt;"), "{msg}");
        assert!(!msg.contains("1.2.826.0.1.3680043.8.498.1"), "{msg}");
        assert!(msg.contains("participant objects withheld"), "{msg}");
        assert!(
            !els.iter()
                .any(|e| e.name == "ParticipantObjectIdentification")
        );
    }
    // Moved to another position, the seal does not open either.
    let mut moved = good.clone();
    moved.body.seq = 4;
    assert!(moved.participants(&key()).is_err());
    assert_eq!(
        good.participants(&key()).unwrap(),
        Some(transfer_participants())
    );
}

#[test]
fn hostile_text_is_escaped_and_control_characters_replaced() {
    let mut r = record(
        5,
        "a\"b<c>&d'\u{1}",
        Action::Hl7SenderRefused,
        Outcome::Failure,
        Some("peer:[::1]:2575"),
    );
    r.body.detail = Some("</EventOutcomeDescription><x>".into());
    let msg = syslog_message(&r, &source(), None);
    let xml = xml_of(&msg);
    let els = parse(xml);
    let actor = els.iter().find(|e| e.name == "ActiveParticipant").unwrap();
    assert_eq!(actor.attr("UserID"), Some("a\"b<c>&d'\u{FFFD}"));
    assert_eq!(actor.attr("NetworkAccessPointID"), Some("::1"));
    assert!(!xml.contains("<x>"));
}

#[test]
fn participants_debug_shows_no_values() {
    let shown = format!("{:?}", transfer_participants());
    assert!(!shown.contains("PAT"));
    assert!(!shown.contains("3680043"));
}

#[test]
fn an_unusable_node_id_still_makes_a_valid_header() {
    let r = record(1, "x", Action::Logout, Outcome::Success, None);
    let s = AuditSource {
        node_id: String::new(),
    };
    let msg = String::from_utf8(syslog_message(&r, &s, None)).unwrap();
    assert!(msg.contains(" - gatewayd - IHE+RFC-3881 "), "{msg}");
    let s = AuditSource {
        node_id: "gw 01".into(),
    };
    let msg = String::from_utf8(syslog_message(&r, &s, None)).unwrap();
    assert!(msg.contains(" gw_01 gatewayd "), "{msg}");
}
