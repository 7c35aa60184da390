//! Acknowledgements (ACK messages) in original and enhanced mode.
//!
//! Mode ([`ack_mode`]): original when MSH-15 and MSH-16 are both empty; enhanced otherwise,
//! with MSH-15 (accept acknowledgement) deciding whether the gateway answers: `AL` always,
//! `NE` never, `ER` only CE/CR, `SU` only CA; an empty or unknown MSH-15 in enhanced mode
//! counts as `AL` (answering is the safe side). MSH-16 is recorded in the policy for the
//! downstream application; the gateway itself only sends accept acknowledgements.
//!
//! Layout ([`build_ack`]), segments ended by CR, in the received message's delimiters:
//! ```text
//! MSH|^~\&|<MSH-5>|<MSH-6>|<MSH-3>|<MSH-4>|<timestamp>||ACK^<trigger>^ACK|<control id>|<MSH-11>|<MSH-12>[||||||<MSH-18>]
//! MSA|<code>|<original MSH-10>
//! [ERR||<segment^sequence^field^^component>|<code>^<table text>^HL70357|E]
//! ```
//! The caller supplies the ACK's own control ID and timestamp (`YYYYMMDDHHMMSS`): this crate
//! has no clock and no ID generator. Error texts are the fixed table 0357 texts, never
//! message content; every value written is escaped for the delimiters.
//! [`encode_ack`] turns the text into bytes in the received message's character set (ASCII
//! is a subset of all four sets; copied MSH fields are re-encoded faithfully).

use crate::charset::Charset;
use crate::parse::{Delimiters, ErrorCode, Location, ParseError, escape};
use crate::record::Header;

/// MSA-1 acknowledgement code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// Original mode: application accept.
    AA,
    /// Original mode: application error.
    AE,
    /// Original mode: application reject.
    AR,
    /// Enhanced mode: commit accept.
    CA,
    /// Enhanced mode: commit error.
    CE,
    /// Enhanced mode: commit reject.
    CR,
}

impl AckCode {
    /// The code as written in MSA-1.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AA => "AA",
            Self::AE => "AE",
            Self::AR => "AR",
            Self::CA => "CA",
            Self::CE => "CE",
            Self::CR => "CR",
        }
    }
}

/// What happened to the received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored (committed to the spool).
    Accepted,
    /// Content error (e.g. table 0357 1xx, undecodable text): sender should fix the message.
    Error,
    /// Rejected as a whole (2xx, or the gateway cannot take it now, e.g. spool full).
    Rejected,
}

impl Outcome {
    /// Error for 1xx codes, Rejected for 2xx.
    pub fn for_error(code: ErrorCode) -> Self {
        if code.is_rejection() {
            Self::Rejected
        } else {
            Self::Error
        }
    }
}

/// When an enhanced-mode acknowledgement is wanted (HL7 table 0155).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCondition {
    /// `AL`.
    Always,
    /// `NE`.
    Never,
    /// `ER`: only on error or reject.
    OnError,
    /// `SU`: only on success.
    OnSuccess,
}

impl AckCondition {
    fn parse(raw: &str) -> Self {
        match raw {
            "NE" => Self::Never,
            "ER" => Self::OnError,
            "SU" => Self::OnSuccess,
            _ => Self::Always,
        }
    }

    fn wants(self, outcome: Outcome) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::OnError => outcome != Outcome::Accepted,
            Self::OnSuccess => outcome == Outcome::Accepted,
        }
    }
}

/// How the sender wants to be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPolicy {
    /// Original mode: always AA / AE / AR.
    Original,
    /// Enhanced mode: CA / CE / CR as MSH-15 asks.
    Enhanced {
        /// MSH-15.
        accept: AckCondition,
        /// MSH-16 (for the application that finally processes the message).
        application: AckCondition,
    },
}

/// The acknowledgement mode a header asks for.
pub fn ack_mode(header: &Header) -> AckPolicy {
    let accept = header.accept_ack.trim();
    let app = header.app_ack.trim();
    if accept.is_empty() && app.is_empty() {
        AckPolicy::Original
    } else {
        AckPolicy::Enhanced {
            accept: AckCondition::parse(accept),
            application: AckCondition::parse(app),
        }
    }
}

impl AckPolicy {
    /// The MSA-1 code to send for an outcome, or `None` when no acknowledgement is wanted.
    pub fn code_for(&self, outcome: Outcome) -> Option<AckCode> {
        match self {
            Self::Original => Some(match outcome {
                Outcome::Accepted => AckCode::AA,
                Outcome::Error => AckCode::AE,
                Outcome::Rejected => AckCode::AR,
            }),
            Self::Enhanced { accept, .. } => accept.wants(outcome).then_some(match outcome {
                Outcome::Accepted => AckCode::CA,
                Outcome::Error => AckCode::CE,
                Outcome::Rejected => AckCode::CR,
            }),
        }
    }
}

/// The ERR segment content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    /// ERR-3 code (table 0357).
    pub code: ErrorCode,
    /// ERR-2 location, when known.
    pub location: Option<Location>,
    /// ERR-4: `E` (error) unless `warning`.
    pub warning: bool,
    /// ERR-8 user message: a fixed text of the gateway's (never message content), e.g.
    /// why a well-formed message could not be accepted durably.
    pub user_message: Option<&'static str>,
}

impl AckError {
    /// An error without location.
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            location: None,
            warning: false,
            user_message: None,
        }
    }

    /// The same error with an ERR-8 user message.
    pub fn with_user_message(mut self, text: &'static str) -> Self {
        self.user_message = Some(text);
        self
    }
}

impl From<&ParseError> for AckError {
    fn from(e: &ParseError) -> Self {
        Self {
            code: e.code,
            location: e.location.clone(),
            warning: false,
            user_message: None,
        }
    }
}

impl From<&crate::charset::DecodeError> for AckError {
    fn from(e: &crate::charset::DecodeError) -> Self {
        Self {
            code: e.error_code(),
            location: e.location(),
            warning: false,
            user_message: None,
        }
    }
}

/// Builds the acknowledgement text for a received header (see the module docs for the
/// layout). `control_id` is the ACK's own MSH-10, `timestamp` its MSH-7.
pub fn build_ack(
    header: &Header,
    code: AckCode,
    error: Option<&AckError>,
    control_id: &str,
    timestamp: &str,
) -> String {
    let d = &header.delimiters;
    let f = d.field;
    let mut out = String::with_capacity(256);
    out.push_str("MSH");
    out.push(f);
    out.push_str(&d.encoding_characters());
    for value in [
        header.receiving_app.as_str(),
        &header.receiving_facility,
        &header.sending_app,
        &header.sending_facility,
    ] {
        out.push(f);
        out.push_str(value);
    }
    out.push(f);
    out.push_str(&escape(timestamp, d));
    out.push(f); // MSH-8
    out.push(f);
    out.push_str("ACK");
    if !header.trigger.is_empty() {
        out.push(d.component);
        out.push_str(&header.trigger);
        out.push(d.component);
        out.push_str("ACK");
    }
    out.push(f);
    out.push_str(&escape(control_id, d));
    out.push(f);
    out.push_str(&header.processing_id);
    out.push(f);
    out.push_str(&header.version);
    if !header.charset.is_empty() {
        for _ in 13..=18 {
            out.push(f);
        }
        out.push_str(&header.charset);
    }
    out.push('\r');
    out.push_str("MSA");
    out.push(f);
    out.push_str(code.as_str());
    out.push(f);
    out.push_str(&header.control_id);
    out.push('\r');
    if let Some(e) = error {
        push_err(&mut out, d, e);
    }
    out
}

/// A reject for a frame whose header could not be read at all (not HL7, no usable MSH):
/// default delimiters, processing ID `P`, version `2.5`, MSA-1 `AR`, MSA-2 empty.
pub fn build_minimal_nak(error: &AckError, control_id: &str, timestamp: &str) -> String {
    let header = Header {
        processing_id: "P".into(),
        version: "2.5".into(),
        ..Header::default()
    };
    build_ack(&header, AckCode::AR, Some(error), control_id, timestamp)
}

fn push_err(out: &mut String, d: &Delimiters, e: &AckError) {
    let f = d.field;
    let c = d.component;
    out.push_str("ERR");
    out.push(f);
    out.push(f);
    if let Some(l) = &e.location {
        // ERL: segment ^ sequence ^ field ^ field repetition ^ component
        out.push_str(&escape(&l.segment, d));
        if l.sequence > 0 || l.field > 0 {
            out.push(c);
            out.push_str(&l.sequence.to_string());
        }
        if l.field > 0 {
            out.push(c);
            out.push_str(&l.field.to_string());
            if l.component > 0 {
                out.push(c);
                out.push(c);
                out.push_str(&l.component.to_string());
            }
        }
    }
    out.push(f);
    out.push_str(&e.code.code().to_string());
    out.push(c);
    out.push_str(&escape(e.code.text(), d));
    out.push(c);
    out.push_str("HL70357");
    out.push(f);
    out.push(if e.warning { 'W' } else { 'E' });
    if let Some(text) = e.user_message {
        // ERR-5 .. ERR-7 empty, ERR-8 user message.
        for _ in 0..4 {
            out.push(f);
        }
        out.push_str(&escape(text, d));
    }
    out.push('\r');
}

/// The acknowledgement as bytes in the received message's character set.
pub fn encode_ack(text: &str, charset: Charset) -> Vec<u8> {
    charset.encode(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;

    fn header(text: &str) -> Header {
        Header::read(&parse(text).unwrap())
    }

    const MSG: &str = "MSH|^~\\&|HIS|HOSP|GW|CLINIC|20240101120000||ADT^A08^ADT_A01|MSG0001|P|2.5|||||JPN|~ISO IR87\rPID|1||1\r";

    #[test]
    fn accept_ack_has_the_exact_original_mode_layout() {
        let ack = build_ack(&header(MSG), AckCode::AA, None, "GW0001", "20240102030405");
        assert_eq!(
            ack,
            "MSH|^~\\&|GW|CLINIC|HIS|HOSP|20240102030405||ACK^A08^ACK|GW0001|P|2.5||||||~ISO IR87\rMSA|AA|MSG0001\r"
        );
    }

    #[test]
    fn error_ack_has_the_exact_err_segment() {
        let err = AckError {
            code: ErrorCode::RequiredFieldMissing,
            location: Some(Location::field("PID", 1, 3)),
            warning: false,
            user_message: None,
        };
        let text = "MSH|^~\\&|HIS|HOSP|GW|CLINIC|20240101120000||ADT^A08|MSG0002|P|2.3.1\rPID|1\r";
        let ack = build_ack(
            &header(text),
            AckCode::AE,
            Some(&err),
            "GW0002",
            "20240102030405",
        );
        assert_eq!(
            ack,
            "MSH|^~\\&|GW|CLINIC|HIS|HOSP|20240102030405||ACK^A08^ACK|GW0002|P|2.3.1\rMSA|AE|MSG0002\rERR||PID^1^3|101^Required field missing^HL70357|E\r"
        );
        let parsed = parse(&ack).unwrap();
        assert_eq!(parsed.get("ERR", 3, 1, 1, 1), Some("101"));
    }

    #[test]
    fn user_message_goes_to_err_8_escaped() {
        let err = AckError::new(ErrorCode::ApplicationInternalError)
            .with_user_message("spool full | try later");
        let ack = build_ack(
            &header(MSG),
            AckCode::AE,
            Some(&err),
            "GW0004",
            "20240102030405",
        );
        let parsed = parse(&ack).unwrap();
        assert_eq!(parsed.get("ERR", 3, 1, 1, 1), Some("207"));
        assert_eq!(parsed.get("ERR", 4, 1, 1, 1), Some("E"));
        assert_eq!(
            parsed.get("ERR", 8, 1, 1, 1),
            Some("spool full \\F\\ try later")
        );
    }

    #[test]
    fn minimal_nak_has_empty_msa2() {
        let nak = build_minimal_nak(
            &AckError::new(ErrorCode::SegmentSequenceError),
            "GW0003",
            "20240102030405",
        );
        assert_eq!(
            nak,
            "MSH|^~\\&|||||20240102030405||ACK|GW0003|P|2.5\rMSA|AR|\rERR|||100^Segment sequence error^HL70357|E\r"
        );
        assert!(parse(&nak).is_ok());
    }

    #[test]
    fn ack_uses_the_senders_delimiters_and_escapes_caller_values() {
        let h = header("MSH$%*!@$A$B$C$D$$$ADT%A04$1$P$2.5");
        let ack = build_ack(&h, AckCode::AA, None, "x$y", "2024");
        assert!(
            ack.starts_with("MSH$%*!@$C$D$A$B$2024$$ACK%A04%ACK$x!F!y$P$2.5\r"),
            "{ack}"
        );
    }

    #[test]
    fn enhanced_mode_follows_msh15() {
        let with = |accept: &str, app: &str| {
            ack_mode(&Header {
                accept_ack: accept.into(),
                app_ack: app.into(),
                ..Header::default()
            })
        };
        assert_eq!(with("", ""), AckPolicy::Original);
        assert_eq!(with("", "").code_for(Outcome::Error), Some(AckCode::AE));
        let al = with("AL", "NE");
        assert_eq!(al.code_for(Outcome::Accepted), Some(AckCode::CA));
        assert_eq!(al.code_for(Outcome::Error), Some(AckCode::CE));
        assert_eq!(al.code_for(Outcome::Rejected), Some(AckCode::CR));
        assert_eq!(with("NE", "AL").code_for(Outcome::Accepted), None);
        assert_eq!(with("NE", "AL").code_for(Outcome::Rejected), None);
        assert_eq!(with("ER", "").code_for(Outcome::Accepted), None);
        assert_eq!(with("ER", "").code_for(Outcome::Error), Some(AckCode::CE));
        assert_eq!(
            with("SU", "").code_for(Outcome::Accepted),
            Some(AckCode::CA)
        );
        assert_eq!(with("SU", "").code_for(Outcome::Rejected), None);
        assert_eq!(
            with("", "AL").code_for(Outcome::Accepted),
            Some(AckCode::CA)
        );
        assert_eq!(
            Outcome::for_error(ErrorCode::UnsupportedVersionId),
            Outcome::Rejected
        );
        assert_eq!(Outcome::for_error(ErrorCode::DataTypeError), Outcome::Error);
    }

    #[test]
    fn ack_is_encoded_in_the_message_charset() {
        let h = header("MSH|^~\\&|放射線|東京|GW||2024||ADT^A08|1|P|2.5|||||JPN|~ISO IR87");
        let ack = build_ack(&h, AckCode::AA, None, "1", "2024");
        let bytes = encode_ack(&ack, Charset::Iso2022Jp);
        assert!(bytes.windows(3).any(|w| w == b"\x1b$B"));
        assert_eq!(
            crate::charset::decode_as(&bytes, Charset::Iso2022Jp).unwrap(),
            ack
        );
    }
}
