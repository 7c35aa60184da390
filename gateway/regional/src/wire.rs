//! The payloads of the exchange, and sealing them between peers.

use std::collections::BTreeMap;

use gateway_booking::{Decision, PatientRef};
use gateway_exchange::{Envelope, ExchangeError, ExchangeKey, PeerKey, Routing};
use serde::{Deserialize, Serialize};

/// `kind` of a sealed booking request.
pub const KIND_REQUEST: &str = "booking-request";
/// `kind` of a sealed cancel request.
pub const KIND_CANCEL: &str = "booking-cancel";
/// `kind` of a sealed decision.
pub const KIND_DECISION: &str = "booking-decision";
/// Largest slots publication read.
pub const MAX_SLOTS_BYTES: usize = 512 * 1024;

/// One free slot as published (times RFC 3339 with the schedule's offset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSlot {
    pub id: String,
    pub start: String,
    pub end: String,
}

/// The free slots of one schedule (`bk/{core}/slots/{schedule}`, retained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotsMessage {
    pub v: u32,
    pub core: String,
    pub schedule: String,
    pub modality: String,
    /// When the core made this list (Unix seconds).
    pub as_of: u64,
    pub slots: Vec<WireSlot>,
}

/// A clinic's booking request, sealed to the core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireRequest {
    pub request_id: String,
    pub slot_id: String,
    pub hold: bool,
    pub patient: PatientRef,
    pub procedure: String,
    /// The clinic stops waiting at this time (Unix seconds); the core refuses it afterwards
    /// without recording anything.
    pub expires_at: u64,
    /// Safety warnings a physician acknowledged (their ids).
    #[serde(default)]
    pub acknowledged: Vec<String>,
}

/// A clinic's cancel of one of its appointments, sealed to the core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireCancel {
    pub appointment_id: String,
    /// The version the clinic last saw (its ETag).
    pub if_match: u64,
    pub expires_at: u64,
}

/// The core's decision, sealed to the clinic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireDecision {
    pub request_id: String,
    pub slot_id: String,
    pub decision: Decision,
    /// The slot's times, when it exists.
    pub start: Option<String>,
    pub end: Option<String>,
    /// The appointment's version after the decision (for a version mismatch: its current).
    #[serde(default)]
    pub version: u64,
    /// The core's safety report for this request (warnings to acknowledge, CT dose).
    #[serde(default)]
    pub safety: Option<gateway_booking::SafetyReport>,
}

/// This gateway's exchange identity and its peers' keys.
#[derive(Debug)]
pub struct Keys {
    pub me: String,
    pub key: ExchangeKey,
    pub peers: BTreeMap<String, PeerKey>,
}

impl Keys {
    /// Seals `body` to `peer` as `kind`/`msg`.
    pub fn seal(
        &self,
        peer: &str,
        kind: &str,
        msg: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, ExchangeError> {
        let key = self
            .peers
            .get(peer)
            .ok_or(ExchangeError::Key("no public key for that peer"))?;
        let routing = Routing {
            from: self.me.clone(),
            to: peer.to_owned(),
            kind: kind.to_owned(),
            id: msg.to_owned(),
        };
        Ok(gateway_exchange::seal(&self.key, key, routing, body)?.to_bytes())
    }

    /// The `kind` an envelope claims (checked again when it is opened).
    pub fn kind_of(bytes: &[u8]) -> Option<String> {
        Envelope::parse(bytes).ok().map(|e| e.routing().kind)
    }

    /// Opens an envelope that must be from `peer`, of `kind`, with id `msg` (the topic's).
    pub fn open(
        &self,
        peer: &str,
        kind: &str,
        msg: &str,
        bytes: &[u8],
    ) -> Result<Vec<u8>, ExchangeError> {
        let key = self
            .peers
            .get(peer)
            .ok_or(ExchangeError::Key("sender is not a configured peer"))?;
        let envelope = Envelope::parse(bytes)?;
        let r = envelope.routing();
        if r.from != peer || r.kind != kind || r.id != msg {
            return Err(ExchangeError::Malformed(
                "routing header does not match the topic".into(),
            ));
        }
        gateway_exchange::open(&self.key, &self.me, key, &envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Keys, Keys) {
        let a = ExchangeKey::from_seed([1; 32]);
        let b = ExchangeKey::from_seed([2; 32]);
        let (pa, pb) = (a.public(), b.public());
        (
            Keys {
                me: "clinic-a".into(),
                key: a,
                peers: [("core-1".to_string(), pb)].into(),
            },
            Keys {
                me: "core-1".into(),
                key: b,
                peers: [("clinic-a".to_string(), pa)].into(),
            },
        )
    }

    #[test]
    fn sealed_request_opens_only_as_addressed() {
        let (clinic, core) = pair();
        let body = br#"{"patient":"YAMADA^TARO"}"#;
        let sealed = clinic.seal("core-1", KIND_REQUEST, "m1", body).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("YAMADA"));
        assert_eq!(
            core.open("clinic-a", KIND_REQUEST, "m1", &sealed).unwrap(),
            body
        );
        // Another topic id, kind or claimed sender: refused.
        assert!(core.open("clinic-a", KIND_REQUEST, "m2", &sealed).is_err());
        assert!(core.open("clinic-a", KIND_DECISION, "m1", &sealed).is_err());
        assert!(core.open("clinic-b", KIND_REQUEST, "m1", &sealed).is_err());
        assert!(core.open("clinic-a", KIND_REQUEST, "m1", b"{}").is_err());
        assert!(clinic.seal("core-2", KIND_REQUEST, "m1", body).is_err());
    }

    #[test]
    fn a_needs_acknowledgement_decision_carries_its_report_to_the_clinic() {
        use gateway_booking::{BookingRefused, Refusal, SafetyReport, SafetyWarning, WarningKind};
        let (clinic, core) = pair();
        let report = SafetyReport {
            warnings: vec![SafetyWarning {
                id: "w1".into(),
                kind: WarningKind::ContrastReaction,
                contrast: None,
                agent: Some("Iopamidol".into()),
                severity: Some("SV".into()),
                reactions: vec!["蕁麻疹".into()],
                when: Some("20240105".into()),
                hospital: "hosp-a".into(),
                text_en: "reaction".into(),
                text_ja: "反応".into(),
            }],
            dose: None,
        };
        let answer = WireDecision {
            request_id: "r1".into(),
            slot_id: "ct-1.20270112T1000".into(),
            decision: Decision::Refused {
                code: Refusal::NeedsAcknowledgement,
                reason: "acknowledge".into(),
            },
            start: None,
            end: None,
            version: 0,
            safety: Some(report.clone()),
        };
        let body = serde_json::to_vec(&answer).unwrap();
        let sealed = core.seal("clinic-a", KIND_DECISION, "m1", &body).unwrap();
        let opened: WireDecision =
            serde_json::from_slice(&clinic.open("core-1", KIND_DECISION, "m1", &sealed).unwrap())
                .unwrap();
        assert_eq!(opened, answer);
        let Decision::Refused { code, reason } = opened.decision else {
            panic!("refused")
        };
        assert_eq!(
            BookingRefused::from_refusal(code, reason, opened.version, opened.safety),
            BookingRefused::NeedsAcknowledgement(Box::new(report))
        );
        // An unavailable check is the kiosk's 503, never a booking.
        assert_eq!(
            BookingRefused::from_refusal(Refusal::Unavailable, String::new(), 0, None),
            BookingRefused::Unavailable
        );
        // A request from a clinic that predates acknowledgements still reads.
        let old: WireRequest = serde_json::from_str(
            r#"{"request_id":"r","slot_id":"s","hold":false,"patient":{"id":"p","name":"n","birth_date":"19600101","sex":"F"},"procedure":"CT","expires_at":1}"#,
        )
        .unwrap();
        assert!(old.acknowledged.is_empty());
    }
}
