//! The transport under one established association: dicom-ul's own association over
//! plain TCP, or this crate's over TLS.
//!
//! dicom-ul negotiates only on a `TcpStream` it reads itself, so it cannot take a TLS
//! stream whose A-ASSOCIATE-RQ this crate has already read for the association policy
//! (the policy needs the client certificate, which exists only after the handshake). Over
//! TLS, [`negotiate`] answers the request as dicom-ul's acceptor does with the service's
//! options (same abstract syntaxes, first proposed transfer syntax this service accepts,
//! same user information), and [`TlsAssociation`] frames PDUs with dicom-ul's own reader
//! and writer. The association loop (`association`) sees one [`Link`] either way.

use std::fmt;

use bytes::BytesMut;
use dicom_ul::association::AsyncServerAssociation;
use dicom_ul::association::server::is_supported;
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationAC, AssociationRJ, AssociationRJResult,
    AssociationRJServiceUserReason, AssociationRJSource, AssociationRQ,
    PresentationContextNegotiated, PresentationContextResult, PresentationContextResultReason,
    UserVariableItem,
};
use dicom_ul::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, Pdu};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// The DICOM application context (PS3.7 Annex A.2.1).
const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
/// Implicit VR Little Endian: the transfer syntax named in a refused context.
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// The read buffer's first size is capped here (dicom-ul's `LARGE_PDU_SIZE`).
const LARGE_PDU_SIZE: u32 = 262_144 - 6;
/// The largest PDU dicom-ul accepts from a peer (its `MAXIMUM_PDU_SIZE`).
const MAXIMUM_PDU_SIZE: u32 = 131_072 * 1024;

/// A failure on an established link (never carries patient data: dicom-ul's receive
/// errors name the PDU kind and lengths).
#[derive(Debug)]
pub(crate) struct LinkError(String);

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the service accepts in negotiation (the same lists dicom-ul's options hold).
#[derive(Debug)]
pub(crate) struct Syntaxes {
    pub abstract_syntaxes: Vec<String>,
    pub transfer_syntaxes: Vec<String>,
    /// This service's maximum PDU length (sent as the acceptor's).
    pub max_pdu_length: u32,
}

/// One established association over either transport.
#[derive(Debug)]
pub(crate) enum Link {
    Plain(Box<AsyncServerAssociation<TcpStream>>),
    Tls(Box<TlsAssociation>),
}

impl Link {
    /// The next PDU. Cancel-safe: a partly received PDU stays buffered.
    pub async fn receive(&mut self) -> Result<Pdu, LinkError> {
        match self {
            Self::Plain(a) => a.receive().await.map_err(|e| LinkError(e.to_string())),
            Self::Tls(a) => a.receive().await,
        }
    }

    pub async fn send(&mut self, pdu: &Pdu) -> Result<(), LinkError> {
        match self {
            Self::Plain(a) => a.send(pdu).await.map_err(|e| LinkError(e.to_string())),
            Self::Tls(a) => a.send(pdu).await,
        }
    }

    /// Sends an A-ABORT (service provider) and closes the connection.
    pub async fn abort(self) -> Result<(), LinkError> {
        match self {
            Self::Plain(a) => (*a).abort().await.map_err(|e| LinkError(e.to_string())),
            Self::Tls(mut a) => {
                let pdu = Pdu::AbortRQ {
                    source: AbortRQSource::ServiceProvider(
                        AbortRQServiceProviderReason::ReasonNotSpecified,
                    ),
                };
                let sent = a.send(&pdu).await;
                let _ = a.stream.shutdown().await;
                sent
            }
        }
    }

    pub fn presentation_contexts(&self) -> &[PresentationContextNegotiated] {
        match self {
            Self::Plain(a) => a.presentation_contexts(),
            Self::Tls(a) => &a.contexts,
        }
    }

    /// The largest PDU the requestor accepts.
    pub fn requestor_max_pdu_length(&self) -> u32 {
        match self {
            Self::Plain(a) => a.requestor_max_pdu_length(),
            Self::Tls(a) => a.requestor_max_pdu_length,
        }
    }
}

/// An association over TLS, negotiated by [`negotiate`].
#[derive(Debug)]
pub(crate) struct TlsAssociation {
    stream: TlsStream<TcpStream>,
    read_buffer: BytesMut,
    write_buffer: Vec<u8>,
    max_pdu_length: u32,
    requestor_max_pdu_length: u32,
    contexts: Vec<PresentationContextNegotiated>,
}

impl TlsAssociation {
    /// `received` holds what was read after the A-ASSOCIATE-RQ (normally nothing).
    pub fn new(
        stream: TlsStream<TcpStream>,
        received: &[u8],
        negotiated: Negotiated,
        max_pdu_length: u32,
    ) -> Self {
        // As dicom-ul sizes its own: one whole PDU (capped) without growing.
        let mut read_buffer =
            BytesMut::with_capacity(max_pdu_length.min(LARGE_PDU_SIZE) as usize + 6);
        read_buffer.extend_from_slice(received);
        Self {
            stream,
            read_buffer,
            write_buffer: Vec::new(),
            max_pdu_length,
            requestor_max_pdu_length: negotiated.requestor_max_pdu_length,
            contexts: negotiated.contexts,
        }
    }

    async fn receive(&mut self) -> Result<Pdu, LinkError> {
        dicom_ul::association::read_pdu_from_wire_async(
            &mut self.stream,
            &mut self.read_buffer,
            self.max_pdu_length,
            true,
        )
        .await
        .map_err(|e| LinkError(e.to_string()))
    }

    async fn send(&mut self, pdu: &Pdu) -> Result<(), LinkError> {
        self.write_buffer.clear();
        dicom_ul::write_pdu(&mut self.write_buffer, pdu).map_err(|e| LinkError(e.to_string()))?;
        self.stream
            .write_all(&self.write_buffer)
            .await
            .map_err(|e| LinkError(format!("send: {e}")))?;
        self.stream
            .flush()
            .await
            .map_err(|e| LinkError(format!("send: {e}")))
    }
}

/// The outcome of a negotiation this service accepts.
#[derive(Debug)]
pub(crate) struct Negotiated {
    pub ac: Pdu,
    pub contexts: Vec<PresentationContextNegotiated>,
    pub requestor_max_pdu_length: u32,
}

fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(|c: char| c.is_whitespace() || c == '\0')
}

/// Answers an A-ASSOCIATE-RQ the policy admitted: an A-ASSOCIATE-AC, or an
/// A-ASSOCIATE-RJ (permanent, service user) for a protocol version or application context
/// this service does not speak. Mirrors dicom-ul's acceptor: per presentation context the
/// first proposed transfer syntax that is both accepted and supported; no extended or role
/// negotiation (dicom-ul's default negotiation answers none either).
pub(crate) fn negotiate(
    rq: AssociationRQ,
    syntaxes: &Syntaxes,
) -> Result<Negotiated, AssociationRJ> {
    let rj = |reason| AssociationRJ {
        result: AssociationRJResult::Permanent,
        source: AssociationRJSource::ServiceUser(reason),
    };
    if rq.protocol_version != 1 {
        return Err(rj(AssociationRJServiceUserReason::NoReasonGiven));
    }
    if trim_uid(&rq.application_context_name) != APPLICATION_CONTEXT {
        return Err(rj(
            AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
        ));
    }
    let mut requestor_max_pdu_length = dicom_ul::pdu::DEFAULT_MAX_PDU;
    for item in &rq.user_variables {
        if let UserVariableItem::MaxLength(len) = item {
            requestor_max_pdu_length = if *len == 0 {
                MAXIMUM_PDU_SIZE
            } else {
                (*len).min(MAXIMUM_PDU_SIZE)
            };
        }
    }
    let contexts: Vec<PresentationContextNegotiated> = rq
        .presentation_contexts
        .into_iter()
        .map(|pc| {
            let abstract_syntax = trim_uid(&pc.abstract_syntax).to_string();
            if !syntaxes.abstract_syntaxes.contains(&abstract_syntax) {
                return PresentationContextNegotiated {
                    id: pc.id,
                    reason: PresentationContextResultReason::AbstractSyntaxNotSupported,
                    transfer_syntax: IMPLICIT_VR_LE.to_string(),
                    abstract_syntax,
                };
            }
            let chosen = pc.transfer_syntaxes.iter().find(|ts| {
                let ts = trim_uid(ts);
                syntaxes.transfer_syntaxes.iter().any(|t| t == ts) && is_supported(ts)
            });
            let (transfer_syntax, reason) = match chosen {
                Some(ts) => (
                    trim_uid(ts).to_string(),
                    PresentationContextResultReason::Acceptance,
                ),
                None => (
                    IMPLICIT_VR_LE.to_string(),
                    PresentationContextResultReason::TransferSyntaxesNotSupported,
                ),
            };
            PresentationContextNegotiated {
                id: pc.id,
                reason,
                transfer_syntax,
                abstract_syntax,
            }
        })
        .collect();
    let ac = Pdu::AssociationAC(AssociationAC {
        protocol_version: 1,
        application_context_name: rq.application_context_name,
        presentation_contexts: contexts
            .iter()
            .map(|pc| PresentationContextResult {
                id: pc.id,
                reason: pc.reason.clone(),
                transfer_syntax: pc.transfer_syntax.clone(),
            })
            .collect(),
        calling_ae_title: rq.calling_ae_title,
        called_ae_title: rq.called_ae_title,
        user_variables: vec![
            UserVariableItem::MaxLength(syntaxes.max_pdu_length),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
        ],
    });
    Ok(Negotiated {
        ac,
        contexts,
        requestor_max_pdu_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    fn syntaxes() -> Syntaxes {
        Syntaxes {
            abstract_syntaxes: vec![
                "1.2.840.10008.1.1".into(),
                "1.2.840.10008.5.1.4.1.1.2".into(),
            ],
            transfer_syntaxes: vec!["1.2.840.10008.1.2.1".into(), "1.2.840.10008.1.2".into()],
            max_pdu_length: 65536,
        }
    }

    fn rq(contexts: Vec<PresentationContextProposed>) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "CT01".into(),
            called_ae_title: "GATEWAY".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: contexts,
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    #[test]
    fn contexts_are_answered_like_dicom_ul_does() {
        let n = negotiate(
            rq(vec![
                PresentationContextProposed {
                    id: 1,
                    abstract_syntax: "1.2.840.10008.5.1.4.1.1.2\0".into(),
                    transfer_syntaxes: vec!["9.9".into(), "1.2.840.10008.1.2.1".into()],
                },
                PresentationContextProposed {
                    id: 3,
                    abstract_syntax: "1.2.3.4".into(),
                    transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
                },
                PresentationContextProposed {
                    id: 5,
                    abstract_syntax: "1.2.840.10008.1.1".into(),
                    transfer_syntaxes: vec!["1.2.840.10008.1.2.4.50".into()],
                },
            ]),
            &syntaxes(),
        )
        .unwrap();
        assert_eq!(n.requestor_max_pdu_length, 16384);
        let got: Vec<_> = n
            .contexts
            .iter()
            .map(|c| (c.id, c.reason.clone(), c.transfer_syntax.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    1,
                    PresentationContextResultReason::Acceptance,
                    "1.2.840.10008.1.2.1"
                ),
                (
                    3,
                    PresentationContextResultReason::AbstractSyntaxNotSupported,
                    IMPLICIT_VR_LE
                ),
                (
                    5,
                    PresentationContextResultReason::TransferSyntaxesNotSupported,
                    IMPLICIT_VR_LE
                ),
            ]
        );
        let Pdu::AssociationAC(ac) = n.ac else {
            panic!("not an AC")
        };
        assert!(
            ac.user_variables
                .contains(&UserVariableItem::MaxLength(65536))
        );
        let mut bytes = Vec::new();
        dicom_ul::write_pdu(&mut bytes, &Pdu::AssociationAC(ac)).unwrap();
    }

    #[test]
    fn unknown_protocol_or_application_context_is_rejected_permanently() {
        let mut bad = rq(vec![]);
        bad.application_context_name = "1.2.3".into();
        let rj = negotiate(bad, &syntaxes()).unwrap_err();
        assert_eq!(rj.result, AssociationRJResult::Permanent);
        assert_eq!(
            rj.source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported
            )
        );
        let mut bad = rq(vec![]);
        bad.protocol_version = 2;
        assert!(negotiate(bad, &syntaxes()).is_err());
    }
}
