//! Who may send HL7: the allow list of `[[hl7.peers]]`, checked per message once its MSH
//! is read.
//!
//! A message is allowed when some entry matches it: every key the entry sets must match
//! (`host`: the connection's source address; `tls_client_name`: a name of the client
//! certificate the TLS listener verified; `sending_application` / `sending_facility`: the
//! namespace id, i.e. the first component, of MSH-3 / MSH-4, compared exactly as sent). An
//! empty list allows everyone (development).
//!
//! A refusal names the first check no entry passed, in the order address, certificate,
//! MSH-3, MSH-4, so that an operator reading the metric or the audit trail sees what to
//! fix; the sender gets AR with ERR-3 = 103 (table value not found: MSH-3 and MSH-4 are
//! HL7's application and facility tables 0361 / 0362), ERR-2 at MSH-3 or MSH-4 when that is
//! what failed, and a fixed ERR-8 text.

use std::net::IpAddr;

use gateway_hl7::ack::AckError;
use gateway_hl7::parse::{ErrorCode, Location};
use gateway_hl7::record::Header;

/// ERR-8 of a refusal (fixed: never message content).
pub(crate) const NOT_ALLOWED: &str = "sender not on this gateway's allow list";

/// One allowed sender (`[[hl7.peers]]`); `None` keys match anything. `gatewayd` refuses an
/// entry with neither `host` nor `tls_client_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hl7Peer {
    /// The connection's source address (an IPv4-mapped IPv6 address matches its IPv4 form).
    pub host: Option<IpAddr>,
    /// MSH-3's namespace id (first component), exact.
    pub sending_application: Option<String>,
    /// MSH-4's namespace id (first component), exact.
    pub sending_facility: Option<String>,
    /// A DNS subject alternative name or the subject CN of the verified client certificate
    /// (ASCII case-insensitive, as DNS names are).
    pub tls_client_name: Option<String>,
}

/// Why a message was refused: the first check no entry passed. `reason()` is the metric
/// label and the audit record's detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No entry is for the connection's address.
    Address,
    /// Entries are for the address, but none for the client certificate (none presented,
    /// or none of its names listed).
    Certificate,
    /// No entry for the connection takes this MSH-3.
    SendingApplication,
    /// No entry for the connection and MSH-3 takes this MSH-4.
    SendingFacility,
}

impl Refusal {
    /// Every refusal, in check order.
    pub const ALL: [Refusal; 4] = [
        Self::Address,
        Self::Certificate,
        Self::SendingApplication,
        Self::SendingFacility,
    ];

    /// The fixed label of `gateway_hl7_refused_total{reason}` and the audit detail.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::Certificate => "certificate",
            Self::SendingApplication => "sending_application",
            Self::SendingFacility => "sending_facility",
        }
    }

    /// A bit of its own, for "already audited on this connection".
    pub(crate) fn bit(self) -> u8 {
        match self {
            Self::Address => 1,
            Self::Certificate => 2,
            Self::SendingApplication => 4,
            Self::SendingFacility => 8,
        }
    }

    /// The ERR segment of the AR.
    pub(crate) fn ack_error(self) -> AckError {
        let field = match self {
            Self::SendingApplication => Some(3),
            Self::SendingFacility => Some(4),
            Self::Address | Self::Certificate => None,
        };
        AckError {
            location: field.map(|field| Location {
                segment: "MSH".into(),
                sequence: 1,
                field,
                component: 1,
            }),
            ..AckError::new(ErrorCode::TableValueNotFound).with_user_message(NOT_ALLOWED)
        }
    }
}

/// Who is sending on one connection: its address and the verified client certificate's
/// names (empty without TLS or without a client certificate).
#[derive(Debug, Clone)]
pub(crate) struct Sender {
    pub ip: IpAddr,
    pub names: Vec<String>,
}

/// Checks one message's sender against `peers` (empty: everyone allowed).
pub fn check(
    peers: &[Hl7Peer],
    ip: IpAddr,
    names: &[String],
    header: &Header,
) -> Result<(), Refusal> {
    if peers.is_empty() {
        return Ok(());
    }
    let ip = ip.to_canonical();
    let component = header.delimiters.component;
    let application = namespace_id(&header.sending_app, component);
    let facility = namespace_id(&header.sending_facility, component);
    let passes = |check: Refusal, p: &Hl7Peer| match check {
        Refusal::Address => p.host.is_none_or(|h| h.to_canonical() == ip),
        Refusal::Certificate => p
            .tls_client_name
            .as_deref()
            .is_none_or(|want| names.iter().any(|n| n.eq_ignore_ascii_case(want))),
        Refusal::SendingApplication => p
            .sending_application
            .as_deref()
            .is_none_or(|want| want == application),
        Refusal::SendingFacility => p
            .sending_facility
            .as_deref()
            .is_none_or(|want| want == facility),
    };
    let mut left: Vec<&Hl7Peer> = peers.iter().collect();
    for check in Refusal::ALL {
        left.retain(|p| passes(check, p));
        if left.is_empty() {
            return Err(check);
        }
    }
    Ok(())
}

/// The first component of an HD field (MSH-3 / MSH-4) as sent.
fn namespace_id(field: &str, component: char) -> &str {
    field.split(component).next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;

    fn header(app: &str, facility: &str) -> Header {
        Header {
            sending_app: app.into(),
            sending_facility: facility.into(),
            ..Header::default()
        }
    }

    fn peer(
        host: Option<&str>,
        app: Option<&str>,
        fac: Option<&str>,
        name: Option<&str>,
    ) -> Hl7Peer {
        Hl7Peer {
            host: host.map(|h| h.parse().unwrap()),
            sending_application: app.map(Into::into),
            sending_facility: fac.map(Into::into),
            tls_client_name: name.map(Into::into),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_list_allows_everyone() {
        assert_eq!(check(&[], ip("10.0.0.9"), &[], &header("X", "Y")), Ok(()));
    }

    #[test]
    fn host_application_and_facility_must_all_match_one_entry() {
        let peers = [peer(Some("10.0.0.1"), Some("HIS"), Some("CLINIC"), None)];
        let h = header("HIS^1.2.3^ISO", "CLINIC");
        assert_eq!(check(&peers, ip("10.0.0.1"), &[], &h), Ok(()));
        assert_eq!(
            check(&peers, ip("10.0.0.2"), &[], &h),
            Err(Refusal::Address)
        );
        assert_eq!(
            check(&peers, ip("10.0.0.1"), &[], &header("LIS", "CLINIC")),
            Err(Refusal::SendingApplication)
        );
        assert_eq!(
            check(&peers, ip("10.0.0.1"), &[], &header("HIS", "OTHER")),
            Err(Refusal::SendingFacility)
        );
        // Exact: no case folding, no prefix match.
        assert_eq!(
            check(&peers, ip("10.0.0.1"), &[], &header("his", "CLINIC")),
            Err(Refusal::SendingApplication)
        );
        assert_eq!(
            check(&peers, ip("10.0.0.1"), &[], &header("HISX", "CLINIC")),
            Err(Refusal::SendingApplication)
        );
    }

    #[test]
    fn application_of_one_entry_and_facility_of_another_is_refused() {
        let peers = [
            peer(Some("10.0.0.1"), Some("HIS"), Some("A"), None),
            peer(Some("10.0.0.1"), Some("LIS"), Some("B"), None),
        ];
        assert_eq!(
            check(&peers, ip("10.0.0.1"), &[], &header("HIS", "B")),
            Err(Refusal::SendingFacility)
        );
        assert_eq!(
            check(&peers, ip("10.0.0.1"), &[], &header("LIS", "B")),
            Ok(())
        );
    }

    #[test]
    fn ipv4_mapped_address_matches_its_ipv4_entry() {
        let peers = [peer(Some("192.168.10.5"), None, None, None)];
        assert_eq!(
            check(&peers, ip("::ffff:192.168.10.5"), &[], &header("A", "B")),
            Ok(())
        );
    }

    #[test]
    fn certificate_name_entries_need_a_verified_name() {
        let peers = [peer(None, None, Some("CLINIC"), Some("emr.clinic.example"))];
        let h = header("HIS", "CLINIC");
        let names = vec!["EMR.clinic.example".to_owned()];
        assert_eq!(check(&peers, ip("10.0.0.7"), &names, &h), Ok(()));
        assert_eq!(
            check(&peers, ip("10.0.0.7"), &[], &h),
            Err(Refusal::Certificate)
        );
        assert_eq!(
            check(&peers, ip("10.0.0.7"), &["other".to_owned()], &h),
            Err(Refusal::Certificate)
        );
    }

    #[test]
    fn certificate_names_are_dns_sans_then_the_subject_cn() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![
            "emr.clinic.example".to_owned(),
            "emr2.clinic.example".to_owned(),
        ])
        .unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "EMR server");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            gateway_tls::peer_names(cert.der()),
            ["emr.clinic.example", "emr2.clinic.example", "EMR server"]
        );
        assert!(
            gateway_tls::peer_names(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_empty()
        );
    }

    #[test]
    fn ack_error_points_at_the_field_that_failed() {
        let e = Refusal::SendingFacility.ack_error();
        assert_eq!(e.code, ErrorCode::TableValueNotFound);
        assert_eq!(
            e.location.map(|l| (l.segment, l.field)),
            Some(("MSH".into(), 4))
        );
        assert_eq!(e.user_message, Some(NOT_ALLOWED));
        assert!(Refusal::Address.ack_error().location.is_none());
    }
}
