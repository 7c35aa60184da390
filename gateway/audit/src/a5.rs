//! Audit records as DICOM PS3.15 A.5 audit messages in RFC 5424 syslog messages.
//!
//! [`syslog_message`] renders one chain [`Record`] as one RFC 5424 message (without the
//! RFC 5425 octet count) whose MSG is the record's audit message in the DICOM audit message
//! schema (PS3.15 A.5.1, RFC 3881 lineage), UTF-8 XML:
//!
//! ```text
//! <85>1 2026-01-02T03:04:05.678Z gw-01 gatewayd - IHE+RFC-3881 [meta sequenceId="42"] <?xml ...><AuditMessage>...
//! ```
//!
//! - PRI `<85>` (authpriv.notice), `<84>` (authpriv.warning) for failure outcomes;
//! - TIMESTAMP: the record's time, RFC 3339 UTC with milliseconds;
//! - HOSTNAME: the node id; APP-NAME `gatewayd`; PROCID `-`; MSGID `IHE+RFC-3881`;
//! - `[meta sequenceId="N"]` (RFC 5424 7.3.1): N is the record's chain position, so a
//!   repository sees gaps and recognises repeats.
//!
//! Every [`Action`] maps to an A.5.3 event ([`event_of`]; the table is in the crate
//! README): EventID (`DCM`), EventActionCode, EventTypeCode where A.5.3 or CID 403 gives
//! one, EventOutcomeIndicator 0 for success and 4 (8 for a failed DICOM transfer) for
//! failure. Active participants: the actor (UserIsRequestor) and the gateway application
//! (UserID = node id); AuditSourceIdentification: AuditSourceID = node id, type code 4
//! (application server process). The record's subject becomes a participant object typed
//! by its kind (`person:`, `appointment:`, `account:` ...) with a local ID type code of
//! the private coding scheme `99GWD`: these are the gateway's opaque references, never
//! patient data. A DICOM transfer's Study and Patient participant objects come from the
//! record's sealed participants, opened with the [`ParticipantsKey`] passed in.
//!
//! Everything written into the XML is escaped; nothing here fails or panics on any record.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::{Action, Outcome, Participants, ParticipantsKey, Record};

/// Who is reporting: the gateway as the audit source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSource {
    /// `node.id`: AuditSourceID and the syslog HOSTNAME.
    pub node_id: String,
}

/// The RFC 5424 MSGID of every message (the IHE ATNA convention).
pub const MSGID: &str = "IHE+RFC-3881";
/// The private coding scheme of the gateway's local codes (DICOM PS3.16 8.2: `99` prefix).
pub const LOCAL_SCHEME: &str = "99GWD";

/// A coded value: code, coding scheme, meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    pub code: &'static str,
    pub scheme: &'static str,
    pub meaning: &'static str,
}

const fn dcm(code: &'static str, meaning: &'static str) -> Code {
    Code {
        code,
        scheme: "DCM",
        meaning,
    }
}

const fn local(code: &'static str, meaning: &'static str) -> Code {
    Code {
        code,
        scheme: LOCAL_SCHEME,
        meaning,
    }
}

// A.5.3 event IDs (CID 400).
const USER_AUTHENTICATION: Code = dcm("110114", "User Authentication");
const SECURITY_ALERT: Code = dcm("110113", "Security Alert");
const PATIENT_RECORD: Code = dcm("110110", "Patient Record");
const ORDER_RECORD: Code = dcm("110109", "Order Record");
const QUERY: Code = dcm("110112", "Query");
const EXPORT: Code = dcm("110106", "Export");
const INSTANCES_TRANSFERRED: Code = dcm("110104", "DICOM Instances Transferred");

// Event type codes (A.5.3.11 and CID 403 Security Alert types).
const LOGIN: Code = dcm("110122", "Login");
const LOGOUT: Code = dcm("110123", "Logout");
const NODE_AUTHENTICATION: Code = dcm("110126", "Node Authentication");
const RESTRICTED_FUNCTION: Code = dcm("110132", "Use of Restricted Function");
const USER_SECURITY_ATTRIBUTES: Code = dcm("110137", "User Security Attributes Changed");
const REMOTE_SERVICE_STARTED: Code = dcm("110139", "Remote Service Operation Started");

// Role ID codes of active participants (CID 402).
const APPLICATION: Code = dcm("110150", "Application");
const DESTINATION_ROLE: Code = dcm("110152", "Destination Role ID");
const SOURCE_ROLE: Code = dcm("110153", "Source Role ID");

/// EventActionCode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionCode {
    Create,
    Read,
    Update,
    Delete,
    Execute,
}

impl ActionCode {
    fn letter(self) -> &'static str {
        match self {
            ActionCode::Create => "C",
            ActionCode::Read => "R",
            ActionCode::Update => "U",
            ActionCode::Delete => "D",
            ActionCode::Execute => "E",
        }
    }
}

/// The A.5.3 event an action is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventCodes {
    pub id: Code,
    pub action: ActionCode,
    pub type_code: Option<Code>,
}

/// The A.5.3 event of each action (the one mapping; the crate README shows it as a table).
pub fn event_of(action: Action) -> EventCodes {
    use ActionCode::{Create, Delete, Execute, Read, Update};
    let (id, action, type_code) = match action {
        Action::Login => (USER_AUTHENTICATION, Execute, Some(LOGIN)),
        Action::Logout => (USER_AUTHENTICATION, Execute, Some(LOGOUT)),
        Action::TotpEnrolled => (SECURITY_ALERT, Update, Some(USER_SECURITY_ATTRIBUTES)),
        Action::AccountAdded => (SECURITY_ALERT, Create, Some(USER_SECURITY_ATTRIBUTES)),
        Action::AccountDisabled => (SECURITY_ALERT, Update, Some(USER_SECURITY_ATTRIBUTES)),
        Action::AccountInvited => (SECURITY_ALERT, Create, Some(USER_SECURITY_ATTRIBUTES)),
        Action::EnrolmentCodeUsed => (SECURITY_ALERT, Execute, Some(USER_SECURITY_ATTRIBUTES)),
        Action::EnrolmentCompleted => (SECURITY_ALERT, Update, Some(USER_SECURITY_ATTRIBUTES)),
        Action::PatientRecordRead => (PATIENT_RECORD, Read, None),
        Action::AppointmentHeld => (ORDER_RECORD, Create, None),
        Action::AppointmentBooked => (ORDER_RECORD, Create, None),
        Action::AppointmentCancelled => (ORDER_RECORD, Delete, None),
        Action::RemoteCommand => (SECURITY_ALERT, Execute, Some(REMOTE_SERVICE_STARTED)),
        Action::IdentityLinked => (PATIENT_RECORD, Update, None),
        Action::IdentityUnlinked => (PATIENT_RECORD, Update, None),
        Action::IdentityReviewDecided => (PATIENT_RECORD, Update, None),
        Action::ConsentRecorded => (PATIENT_RECORD, Create, None),
        Action::ConsentRevoked => (PATIENT_RECORD, Update, None),
        Action::DisclosureAllowed => (EXPORT, Read, None),
        Action::DisclosureRefused => (EXPORT, Read, None),
        Action::PatientLookup => (QUERY, Execute, None),
        Action::SafetyWarningsShown => (PATIENT_RECORD, Read, None),
        Action::SafetyShown => (PATIENT_RECORD, Read, None),
        Action::SafetyAcknowledged => (ORDER_RECORD, Update, None),
        Action::DeidReidentified => (SECURITY_ALERT, Execute, Some(RESTRICTED_FUNCTION)),
        Action::Hl7SenderRefused => (SECURITY_ALERT, Execute, Some(NODE_AUTHENTICATION)),
        Action::DicomInstancesReceived => (INSTANCES_TRANSFERRED, Create, None),
        Action::DicomInstancesSent => (INSTANCES_TRANSFERRED, Read, None),
    };
    EventCodes {
        id,
        action,
        type_code,
    }
}

/// How a subject reference of a given kind is typed as a participant object.
struct SubjectType {
    id_type: Code,
    /// ParticipantObjectTypeCode.
    type_code: &'static str,
    /// ParticipantObjectTypeCodeRole.
    role: Option<&'static str>,
}

fn subject_type(kind: &str) -> SubjectType {
    let (id_type, type_code, role) = match kind {
        // A person of the identity registry (the gateway's own number, not a patient id).
        "person" => (
            local("GWD-PERSON", "Gateway person reference"),
            "2",
            Some("1"),
        ),
        "appointment" | "appt" => (
            local("GWD-APPOINTMENT", "Gateway appointment reference"),
            "2",
            Some("18"),
        ),
        "consent" => (local("GWD-CONSENT", "Gateway consent reference"), "2", None),
        "review" => (
            local("GWD-REVIEW", "Gateway review reference"),
            "2",
            Some("20"),
        ),
        "account" => (
            local("GWD-ACCOUNT", "Gateway staff account"),
            "2",
            Some("11"),
        ),
        "destination" => (
            local("GWD-DESTINATION", "Gateway destination name"),
            "2",
            Some("16"),
        ),
        "peer" => (local("GWD-PEER", "Network peer address"), "2", Some("25")),
        _ => (local("GWD-REF", "Gateway reference"), "2", None),
    };
    SubjectType {
        id_type,
        type_code,
        role,
    }
}

/// Splits `kind:value`; a reference without a known-looking kind is all value.
fn split_subject(subject: &str) -> (&str, &str) {
    match subject.split_once(':') {
        Some((kind, value))
            if !kind.is_empty()
                && kind.len() <= 16
                && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') =>
        {
            (kind, value)
        }
        _ => ("", subject),
    }
}

/// One RFC 5424 message (without the RFC 5425 octet count): the record's chain position is
/// `[meta sequenceId="{seq}"]`, the MSG its A.5 audit message (UTF-8 XML).
///
/// `participants_key` opens the record's sealed participants (a DICOM transfer's Patient
/// and Study). Without the key, or when the sealed part does not open (another box's key,
/// damage), the message is still rendered: the event, outcome indicator and active
/// participants are as recorded, the Patient and Study participant objects are left out,
/// and EventOutcomeDescription says `participant objects withheld: sealed part not opened`
/// so that a reviewer sees why.
pub fn syslog_message(
    record: &Record,
    source: &AuditSource,
    participants_key: Option<&ParticipantsKey>,
) -> Vec<u8> {
    let failed = record.outcome() == Outcome::Failure;
    let pri = if failed { 84 } else { 85 };
    let hostname = header_field(&source.node_id);
    let mut out = format!(
        "<{pri}>1 {} {hostname} gatewayd - {MSGID} [meta sequenceId=\"{}\"] ",
        rfc3339_ms(record.time_unix_ms()),
        record.seq()
    );
    out.push_str(&audit_message(record, source, participants_key));
    out.into_bytes()
}

/// The record's A.5 audit message alone (the XML of [`syslog_message`]'s MSG).
pub fn audit_message(
    record: &Record,
    source: &AuditSource,
    participants_key: Option<&ParticipantsKey>,
) -> String {
    let action = record.action();
    let codes = event_of(action);
    let failed = record.outcome() == Outcome::Failure;
    let transfer = matches!(
        action,
        Action::DicomInstancesReceived | Action::DicomInstancesSent
    );
    let participants: Result<Option<Participants>, ()> = if record.has_participants() {
        match participants_key.map(|k| record.participants(k)) {
            Some(Ok(p)) => Ok(p),
            _ => Err(()),
        }
    } else {
        Ok(None)
    };
    let subject = record.subject().map(split_subject);
    let mut x = Xml::default();
    x.raw("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    x.open("AuditMessage", &[]);

    // Event identification.
    let outcome = match (failed, transfer) {
        (false, _) => "0",
        (true, false) => "4",
        (true, true) => "8",
    };
    let time = rfc3339_ms(record.time_unix_ms());
    x.open(
        "EventIdentification",
        &[
            ("EventActionCode", codes.action.letter()),
            ("EventDateTime", &time),
            ("EventOutcomeIndicator", outcome),
        ],
    );
    x.code("EventID", codes.id);
    if let Some(t) = codes.type_code {
        x.code("EventTypeCode", t);
    }
    let description = match (&participants, failed, record.detail(), subject) {
        (Err(()), ..) => Some("participant objects withheld: sealed part not opened"),
        (Ok(_), true, Some(detail), _) | (Ok(_), _, Some(detail), None) => Some(detail),
        _ => None,
    };
    if let Some(d) = description {
        x.text_element("EventOutcomeDescription", d);
    }
    x.close("EventIdentification");

    // Active participants.
    let peer = subject
        .filter(|(kind, _)| *kind == "peer")
        .map(|(_, v)| peer_host(v));
    let gateway = |x: &mut Xml, requestor: bool, role: Code| {
        x.open(
            "ActiveParticipant",
            &[
                ("UserID", &source.node_id),
                ("AlternativeUserID", "gatewayd"),
                ("UserIsRequestor", bool_str(requestor)),
            ],
        );
        x.code("RoleIDCode", role);
        x.close("ActiveParticipant");
    };
    match action {
        Action::DicomInstancesReceived => {
            // The sender (calling AE title) is the source and the requestor.
            let mut attrs = vec![("UserID", record.actor()), ("UserIsRequestor", "true")];
            if let Some(p) = peer {
                attrs.push(("NetworkAccessPointID", p));
                attrs.push(("NetworkAccessPointTypeCode", nap_type(p)));
            }
            x.open("ActiveParticipant", &attrs);
            x.code("RoleIDCode", SOURCE_ROLE);
            x.close("ActiveParticipant");
            gateway(&mut x, false, DESTINATION_ROLE);
        }
        Action::DicomInstancesSent => {
            gateway(&mut x, true, SOURCE_ROLE);
            let dest = subject.map_or("unknown", |(_, v)| v);
            x.open(
                "ActiveParticipant",
                &[("UserID", dest), ("UserIsRequestor", "false")],
            );
            x.code("RoleIDCode", DESTINATION_ROLE);
            x.close("ActiveParticipant");
        }
        _ => {
            let mut attrs = vec![("UserID", record.actor()), ("UserIsRequestor", "true")];
            if let Some(p) = peer {
                attrs.push(("NetworkAccessPointID", p));
                attrs.push(("NetworkAccessPointTypeCode", nap_type(p)));
            }
            x.empty("ActiveParticipant", &attrs);
            gateway(&mut x, false, APPLICATION);
        }
    }

    // Audit source.
    x.open(
        "AuditSourceIdentification",
        &[("AuditSourceID", &source.node_id)],
    );
    x.empty("AuditSourceTypeCode", &[("csd-code", "4")]);
    x.close("AuditSourceIdentification");

    // Participant objects.
    if transfer {
        if let Ok(Some(p)) = &participants {
            study_object(&mut x, p);
            patient_object(&mut x, &p.patient_id);
        }
    } else if let Some((kind, value)) = subject {
        let t = subject_type(kind);
        let mut attrs = vec![
            ("ParticipantObjectID", value),
            ("ParticipantObjectTypeCode", t.type_code),
        ];
        if let Some(role) = t.role {
            attrs.push(("ParticipantObjectTypeCodeRole", role));
        }
        if matches!(
            action,
            Action::DisclosureAllowed | Action::DisclosureRefused
        ) {
            attrs.push(("ParticipantObjectDataLifeCycle", "11"));
        }
        x.open("ParticipantObjectIdentification", &attrs);
        x.code("ParticipantObjectIDTypeCode", t.id_type);
        x.text_element(
            "ParticipantObjectName",
            if kind.is_empty() { "reference" } else { kind },
        );
        if let (Some(detail), false) = (record.detail(), failed) {
            let value = B64.encode(detail.as_bytes());
            x.empty(
                "ParticipantObjectDetail",
                &[("type", "detail"), ("value", &value)],
            );
        }
        x.close("ParticipantObjectIdentification");
    }
    x.close("AuditMessage");
    x.out
}

/// A.5.3 DICOM Instances Transferred, Study: type 2 (system object), role 3 (report), ID
/// type (110180, DCM, "Study Instance UID"), the SOP classes with instance counts.
fn study_object(x: &mut Xml, p: &Participants) {
    x.open(
        "ParticipantObjectIdentification",
        &[
            ("ParticipantObjectID", &p.study_uid),
            ("ParticipantObjectTypeCode", "2"),
            ("ParticipantObjectTypeCodeRole", "3"),
        ],
    );
    x.code(
        "ParticipantObjectIDTypeCode",
        dcm("110180", "Study Instance UID"),
    );
    // The schema requires a name or a query; a study has no name to give.
    x.text_element("ParticipantObjectName", "");
    if !p.sop_classes.is_empty() {
        x.open("ParticipantObjectDescription", &[]);
        for c in &p.sop_classes {
            let n = c.count.to_string();
            x.empty("SOPClass", &[("UID", &c.uid), ("NumberOfInstances", &n)]);
        }
        x.close("ParticipantObjectDescription");
    }
    x.close("ParticipantObjectIdentification");
}

/// A.5.3 DICOM Instances Transferred, Patient: type 1 (person), role 1 (patient), ID type
/// (2, RFC-3881, "Patient Number"); no name (the schema's required name element is empty).
fn patient_object(x: &mut Xml, patient_id: &str) {
    x.open(
        "ParticipantObjectIdentification",
        &[
            ("ParticipantObjectID", patient_id),
            ("ParticipantObjectTypeCode", "1"),
            ("ParticipantObjectTypeCodeRole", "1"),
        ],
    );
    x.code(
        "ParticipantObjectIDTypeCode",
        Code {
            code: "2",
            scheme: "RFC-3881",
            meaning: "Patient Number",
        },
    );
    x.text_element("ParticipantObjectName", "");
    x.close("ParticipantObjectIdentification");
}

fn bool_str(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// The host part of `host:port`, `[v6]:port` or a bare address.
fn peer_host(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => addr,
    }
}

/// NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name.
fn nap_type(host: &str) -> &'static str {
    if host.parse::<std::net::IpAddr>().is_ok() {
        "2"
    } else {
        "1"
    }
}

/// An RFC 5424 header field: printable US-ASCII without spaces, at most 255 characters,
/// `-` when empty.
fn header_field(s: &str) -> String {
    let out: String = s
        .chars()
        .take(255)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    if out.is_empty() { "-".into() } else { out }
}

/// RFC 3339 UTC with milliseconds (`2026-01-02T03:04:05.678Z`).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let ts = i64::try_from(unix_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .unwrap_or(jiff::Timestamp::MAX);
    ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A small XML writer: elements, escaped attributes and text.
#[derive(Default)]
struct Xml {
    out: String,
}

impl Xml {
    fn raw(&mut self, s: &str) {
        self.out.push_str(s);
    }

    fn start(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.out.push('<');
        self.out.push_str(name);
        for (k, v) in attrs {
            let _ = write!(self.out, " {k}=\"");
            escape_into(&mut self.out, v);
            self.out.push('"');
        }
    }

    fn open(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.start(name, attrs);
        self.out.push('>');
    }

    fn empty(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.start(name, attrs);
        self.out.push_str("/>");
    }

    fn close(&mut self, name: &str) {
        let _ = write!(self.out, "</{name}>");
    }

    fn text_element(&mut self, name: &str, text: &str) {
        self.open(name, &[]);
        escape_into(&mut self.out, text);
        self.close(name);
    }

    fn code(&mut self, name: &str, c: Code) {
        self.empty(
            name,
            &[
                ("csd-code", c.code),
                ("codeSystemName", c.scheme),
                ("originalText", c.meaning),
            ],
        );
    }
}

/// Escapes text for an attribute value or element content. Characters XML 1.0 cannot
/// carry at all (controls other than tab, newline, carriage return) become U+FFFD.
fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests;
