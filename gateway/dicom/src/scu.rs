//! C-STORE SCU: delivers Part 10 objects to a PACS or viewer over one association,
//! several objects in a row, for tokio callers.
//!
//! ```text
//! let scu = Scu::new(target, ScuSettings::default());
//! let objects = [StoreObject::open(path).await?, ...];
//! let mut association = scu.connect(objects.iter().map(StoreObject::context)).await?;
//! for object in &objects { association.store(object).await?; }
//! association.release().await?;
//! ```
//!
//! - Presentation contexts are proposed from the objects' SOP Class and their own
//!   Transfer Syntax (one context per distinct pair); the gateway never transcodes. An
//!   object whose context the peer did not accept gets [`ScuError::ContextNotAccepted`]
//!   and the association goes on.
//! - The command set is encoded by [`crate::dimse::store_request`] and the response decoded
//!   by [`crate::dimse::decode_response`]; the file meta group is read by
//!   [`crate::part10::read`]. There is no second codec.
//! - dicom-ul's client is async (feature `async`): all socket work runs on the caller's
//!   tokio task; reading a file ([`StoreObject::open`]) runs on a blocking thread.
//! - Statuses (PS3.4 Annex B, PS3.7 Annex C): 0000 is [`StoreOutcome::Success`]; 0001,
//!   0107, 0116 and Bxxx (B000 coercion, B006 elements discarded, B007 data set does not
//!   match the SOP class) are [`StoreOutcome::Warning`]: delivered. Anything else is
//!   [`ScuError::Failed`] with the code; [`ScuError::retryable`] says whether sending
//!   again later can help (A7xx out of resources, 0213 resource limitation: yes; 0122 SOP
//!   class not supported, A9xx data set does not match, Cxxx cannot understand: no).
//! - Timeouts ([`ScuSettings`]): TCP connect, association response (ARTIM: A-ASSOCIATE-AC
//!   and A-RELEASE-RP) and DIMSE (each PDU written: [`ScuError::SendTimeout`], and the wait
//!   for a C-STORE-RSP: [`ScuError::ResponseTimeout`]). A
//!   timeout, an abort or a closed connection leaves the association unusable
//!   ([`ScuError::Unusable`] after that); a failure status does not.
//! - No patient data in logs or errors: objects are named by nothing at all (UIDs are
//!   patient-adjacent); peers by AE title and address; errors carry status codes, the SOP
//!   class and transfer syntax UIDs (standard identifiers) and fixed reasons. dicom-ul's
//!   own error texts (which may print a whole PDU) are never passed on.
//! - TLS: [`ScuAssociation`] is generic over its stream; [`Scu::connect`] makes a plain
//!   TCP one, [`Scu::connect_tls`] one over dicom-ul's `AsyncTlsStream` (feature
//!   `async-tls`) with a rustls configuration from `gateway_tls::client_config` (the
//!   PS3.15 BCP 195 profile, the PACS verified against its CA, the client certificate from
//!   the device identity or files; the name verified is the target's host). The store and
//!   release paths are the same. [`Scu::open`] picks one as [`Scu::with_tls`] said and
//!   returns a [`ScuLink`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::ClientAssociationOptions;
use dicom_ul::association::client::AsyncTlsStream;
use dicom_ul::association::{AsyncClientAssociation, Error as UlError};
use dicom_ul::pdu::{AssociationRJResult, PDataValue, PDataValueType, Pdu};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::dimse::{self, field};
use crate::part10::{self, Part10Error, Part10Meta};

/// Largest C-STORE-RSP command set accepted (real ones are under 200 bytes).
const MAX_RESPONSE_LEN: usize = 64 * 1024;
/// Presentation context ids are the odd numbers 1..=255.
const MAX_CONTEXTS: usize = 128;

/// Where to deliver: the `[[results.deliver]]` kind = "dicom" keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScuTarget {
    pub host: String,
    pub port: u16,
    pub called_ae: String,
    pub calling_ae: String,
}

impl ScuTarget {
    /// `CALLED@host:port`, how logs and errors name the peer.
    pub fn peer(&self) -> String {
        format!("{}@{}:{}", self.called_ae, self.host, self.port)
    }
}

/// Timeouts and the PDU size this end receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScuSettings {
    /// TCP connect.
    pub connect_timeout: Duration,
    /// Wait for A-ASSOCIATE-AC/RJ and for A-RELEASE-RP (the ARTIM timer).
    pub association_timeout: Duration,
    /// Each PDU written, and the wait for each C-STORE-RSP.
    pub dimse_timeout: Duration,
    /// Maximum PDU length proposed for what the peer sends us.
    pub max_pdu_length: u32,
}

impl Default for ScuSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            association_timeout: Duration::from_secs(30),
            dimse_timeout: Duration::from_secs(60),
            max_pdu_length: 65_536,
        }
    }
}

/// The presentation context an object needs: its SOP class in its own transfer syntax.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectContext {
    pub sop_class_uid: String,
    pub transfer_syntax_uid: String,
}

/// One Part 10 object to send: its file meta group read, the bytes held.
#[derive(Debug, Clone)]
pub struct StoreObject {
    meta: Part10Meta,
    bytes: Vec<u8>,
}

impl StoreObject {
    /// An object from the bytes of a Part 10 file.
    pub fn from_part10(bytes: Vec<u8>) -> Result<Self, ScuError> {
        let meta = part10::read(&bytes).map_err(ScuError::InvalidObject)?;
        // Every element value has even length, so does a data set; PDV fragments must be
        // even too (PS3.8 9.3.5.1; DCMTK aborts on an odd one).
        if bytes.len().saturating_sub(meta.data_set_offset) % 2 == 1 {
            return Err(ScuError::InvalidObject(Part10Error::Read {
                reason: "data set of odd length",
            }));
        }
        Ok(Self { meta, bytes })
    }

    /// Reads a Part 10 file on a blocking thread.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self, ScuError> {
        let path = path.into();
        let read_path = path.clone();
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(read_path))
            .await
            .map_err(|e| ScuError::ReadFile {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| ScuError::ReadFile {
                path: path.clone(),
                source,
            })?;
        Self::from_part10(bytes)
    }

    /// The presentation context this object is sent on.
    pub fn context(&self) -> ObjectContext {
        ObjectContext {
            sop_class_uid: self.meta.sop_class_uid.clone(),
            transfer_syntax_uid: self.meta.transfer_syntax_uid.clone(),
        }
    }

    /// The file meta group's UIDs.
    pub fn meta(&self) -> &Part10Meta {
        &self.meta
    }

    /// The data set as sent: everything after the file meta group.
    pub fn data_set(&self) -> &[u8] {
        self.bytes
            .get(self.meta.data_set_offset..)
            .unwrap_or_default()
    }
}

/// A delivered object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Status 0000.
    Success,
    /// Stored with a warning (0001, 0107, 0116, Bxxx): delivered.
    Warning { status: u16 },
}

/// Why an association or a C-STORE did not succeed. No variant carries patient data.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    #[error("invalid C-STORE target {peer}: {reason}")]
    InvalidTarget { peer: String, reason: &'static str },
    #[error("not a storable object: {0}")]
    InvalidObject(#[source] Part10Error),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{count} presentation contexts needed, at most {MAX_CONTEXTS} fit an association")]
    TooManyContexts { count: usize },
    #[error("cannot connect to {peer}: {source}")]
    Connect {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no TCP connection to {peer} within {after:?}")]
    ConnectTimeout { peer: String, after: Duration },
    #[error("{peer} did not answer the association request within {after:?}")]
    AssociationTimeout { peer: String, after: Duration },
    #[error("{peer} rejected the association ({}: {reason})", if *.permanent { "permanent" } else { "transient" })]
    Rejected {
        peer: String,
        permanent: bool,
        /// Rejection source and reason, e.g. `ServiceUser(CalledAETitleNotRecognized)`.
        reason: String,
    },
    #[error("{peer} accepted none of the {proposed} proposed presentation contexts")]
    NoContextAccepted { peer: String, proposed: usize },
    #[error(
        "{peer} did not accept SOP class {sop_class_uid} in transfer syntax {transfer_syntax_uid}"
    )]
    ContextNotAccepted {
        peer: String,
        sop_class_uid: String,
        transfer_syntax_uid: String,
    },
    #[error("{peer} refused the object with status {status:04X}")]
    Failed { peer: String, status: u16 },
    #[error("{peer} aborted the association")]
    Aborted { peer: String },
    #[error("{peer} closed the connection")]
    Closed { peer: String },
    #[error("connection to {peer} failed: {source}")]
    Io {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no C-STORE response from {peer} within {after:?}")]
    ResponseTimeout { peer: String, after: Duration },
    #[error("{peer} took no data for {after:?}")]
    SendTimeout { peer: String, after: Duration },
    #[error("association with {peer} failed: {reason}")]
    Protocol { peer: String, reason: &'static str },
    #[error("association with {peer} is unusable after an earlier error")]
    Unusable { peer: String },
}

impl ScuError {
    /// Whether sending the same object again later can succeed: network trouble, timeouts,
    /// rejections and aborts (the peer may be restarting or busy), out-of-resources
    /// statuses. Not: bad objects, refused contexts, other failure statuses.
    pub fn retryable(&self) -> bool {
        match self {
            Self::InvalidTarget { .. }
            | Self::InvalidObject(_)
            | Self::ReadFile { .. }
            | Self::TooManyContexts { .. }
            | Self::NoContextAccepted { .. }
            | Self::ContextNotAccepted { .. } => false,
            Self::Failed { status, .. } => retryable_status(*status),
            Self::Connect { .. }
            | Self::ConnectTimeout { .. }
            | Self::AssociationTimeout { .. }
            | Self::Rejected { .. }
            | Self::Aborted { .. }
            | Self::Closed { .. }
            | Self::Io { .. }
            | Self::ResponseTimeout { .. }
            | Self::SendTimeout { .. }
            | Self::Protocol { .. }
            | Self::Unusable { .. } => true,
        }
    }

    /// The DIMSE status of a refused object.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Failed { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How a C-STORE-RSP status reads: delivered (with the outcome) or not.
pub fn classify_status(status: u16) -> Option<StoreOutcome> {
    match status {
        0x0000 => Some(StoreOutcome::Success),
        0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => Some(StoreOutcome::Warning { status }),
        _ => None,
    }
}

/// Failure statuses worth a later retry: A7xx (Refused: out of resources) and 0213
/// (resource limitation).
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 0xA700..=0xA7FF | 0x0213)
}

/// A C-STORE SCU for one destination.
/// DICOM over TLS for [`Scu::with_tls`]: the rustls client configuration, built by
/// `gateway_tls::client_config`.
#[derive(Debug, Clone)]
pub struct ScuTls {
    pub config: Arc<rustls::ClientConfig>,
}

#[derive(Debug, Clone)]
pub struct Scu {
    target: ScuTarget,
    settings: ScuSettings,
    tls: Option<ScuTls>,
}

/// An association [`Scu::open`] made: plain TCP or TLS.
#[derive(Debug)]
pub enum ScuLink {
    Plain(Box<ScuAssociation<TcpStream>>),
    Tls(Box<ScuAssociation<AsyncTlsStream>>),
}

impl ScuLink {
    /// See [`ScuAssociation::accepts`].
    pub fn accepts(&self, context: &ObjectContext) -> bool {
        match self {
            Self::Plain(a) => a.accepts(context),
            Self::Tls(a) => a.accepts(context),
        }
    }

    /// See [`ScuAssociation::is_usable`].
    pub fn is_usable(&self) -> bool {
        match self {
            Self::Plain(a) => a.is_usable(),
            Self::Tls(a) => a.is_usable(),
        }
    }

    /// See [`ScuAssociation::store`].
    pub async fn store(&mut self, object: &StoreObject) -> Result<StoreOutcome, ScuError> {
        match self {
            Self::Plain(a) => a.store(object).await,
            Self::Tls(a) => a.store(object).await,
        }
    }

    /// See [`ScuAssociation::delivered`].
    pub fn delivered(&self) -> u64 {
        match self {
            Self::Plain(a) => a.delivered(),
            Self::Tls(a) => a.delivered(),
        }
    }

    /// See [`ScuAssociation::release`].
    pub async fn release(self) -> Result<(), ScuError> {
        match self {
            Self::Plain(a) => (*a).release().await,
            Self::Tls(a) => (*a).release().await,
        }
    }

    /// See [`ScuAssociation::abort`].
    pub async fn abort(self) {
        match self {
            Self::Plain(a) => (*a).abort().await,
            Self::Tls(a) => (*a).abort().await,
        }
    }
}

impl Scu {
    pub fn new(target: ScuTarget, settings: ScuSettings) -> Self {
        Self {
            target,
            settings,
            tls: None,
        }
    }

    /// [`Scu::open`] connects over TLS with `tls`.
    #[must_use]
    pub fn with_tls(mut self, tls: ScuTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// [`Scu::connect`], or [`Scu::connect_tls`] after [`Scu::with_tls`].
    pub async fn open(
        &self,
        contexts: impl IntoIterator<Item = ObjectContext>,
    ) -> Result<ScuLink, ScuError> {
        match &self.tls {
            None => self
                .connect(contexts)
                .await
                .map(|a| ScuLink::Plain(Box::new(a))),
            Some(tls) => self
                .connect_tls(contexts, Arc::clone(&tls.config))
                .await
                .map(|a| ScuLink::Tls(Box::new(a))),
        }
    }

    /// Opens an association over TLS (handshake within the connect timeout's bound with
    /// the association timeout), the server's certificate verified for the target's host.
    pub async fn connect_tls(
        &self,
        contexts: impl IntoIterator<Item = ObjectContext>,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<ScuAssociation<AsyncTlsStream>, ScuError> {
        let (options, peer, proposed) = self.options(contexts)?;
        let host = &self.target.host;
        let address = if host.contains(':') {
            format!("[{host}]:{}", self.target.port)
        } else {
            format!("{host}:{}", self.target.port)
        };
        let options = options.tls_config(config).server_name(host);
        let establishing = options.establish_with_async_tls(&address);
        let mut inner = self.bounded(establishing, &peer, proposed).await?;
        let nodelay = inner.inner_stream().get_ref().0.set_nodelay(true);
        Ok(self.established(inner, nodelay, peer, proposed, "tls"))
    }

    /// Opens an association proposing one presentation context per distinct
    /// (SOP class, transfer syntax) of `contexts`.
    pub async fn connect(
        &self,
        contexts: impl IntoIterator<Item = ObjectContext>,
    ) -> Result<ScuAssociation<TcpStream>, ScuError> {
        let (options, peer, proposed) = self.options(contexts)?;
        let address = (self.target.host.clone(), self.target.port);
        let establishing = options.establish_async(address);
        let mut inner = self.bounded(establishing, &peer, proposed).await?;
        let nodelay = inner.inner_stream().set_nodelay(true);
        Ok(self.established(inner, nodelay, peer, proposed, "tcp"))
    }

    /// Awaits an association's establishment within the connect timeout plus the association
    /// timeout (dicom-ul bounds the connect only; the whole exchange is bounded here).
    async fn bounded<S>(
        &self,
        establishing: impl std::future::Future<Output = Result<AsyncClientAssociation<S>, UlError>>,
        peer: &str,
        proposed: usize,
    ) -> Result<AsyncClientAssociation<S>, ScuError> {
        let s = &self.settings;
        let bound = s.connect_timeout.saturating_add(s.association_timeout);
        match tokio::time::timeout(bound, establishing).await {
            Err(_) => Err(ScuError::AssociationTimeout {
                peer: peer.to_string(),
                after: s.association_timeout,
            }),
            Ok(Err(e)) => Err(establish_error(e, peer.to_string(), s, proposed)),
            Ok(Ok(inner)) => Ok(inner),
        }
    }

    /// The established association, logged. Each C-STORE ends with a short segment; with
    /// Nagle on it would wait for the PACS's delayed ACK (tens of ms per object), so the
    /// caller sets TCP_NODELAY: a failure to set it (`nodelay`) only costs speed.
    fn established<S>(
        &self,
        inner: AsyncClientAssociation<S>,
        nodelay: std::io::Result<()>,
        peer: String,
        proposed: usize,
        transport: &'static str,
    ) -> ScuAssociation<S> {
        if let Err(e) = nodelay {
            debug!(peer = %peer, error = %e, "TCP_NODELAY not set on the C-STORE connection");
        }
        info!(
            peer = %peer,
            calling_ae = %self.target.calling_ae,
            proposed,
            accepted = inner.presentation_contexts().len(),
            transport,
            "C-STORE association established"
        );
        ScuAssociation {
            inner: Some(inner),
            peer,
            settings: self.settings.clone(),
            message_id: 0,
            delivered: 0,
        }
    }

    /// The association request's options for `contexts`, the peer's name and how many
    /// contexts are proposed.
    fn options(
        &self,
        contexts: impl IntoIterator<Item = ObjectContext>,
    ) -> Result<(ClientAssociationOptions<'static>, String, usize), ScuError> {
        let peer = self.target.peer();
        for ae in [&self.target.called_ae, &self.target.calling_ae] {
            if !valid_ae_title(ae) {
                return Err(ScuError::InvalidTarget {
                    peer,
                    reason: "AE titles are 1 to 16 printable ASCII characters, no backslash",
                });
            }
        }
        let mut contexts: Vec<ObjectContext> = contexts.into_iter().collect();
        contexts.sort();
        contexts.dedup();
        if contexts.is_empty() {
            return Err(ScuError::InvalidTarget {
                peer,
                reason: "no objects to propose presentation contexts for",
            });
        }
        if contexts.len() > MAX_CONTEXTS {
            return Err(ScuError::TooManyContexts {
                count: contexts.len(),
            });
        }
        let s = &self.settings;
        let mut options = ClientAssociationOptions::new()
            .calling_ae_title(self.target.calling_ae.clone())
            .called_ae_title(self.target.called_ae.clone())
            .max_pdu_length(s.max_pdu_length)
            .connection_timeout(s.connect_timeout)
            .write_timeout(s.dimse_timeout);
        for c in &contexts {
            options = options.with_presentation_context(
                c.sop_class_uid.clone(),
                vec![c.transfer_syntax_uid.clone()],
            );
        }
        Ok((options, peer, contexts.len()))
    }
}

fn valid_ae_title(ae: &str) -> bool {
    let trimmed = ae.trim();
    !trimmed.is_empty()
        && ae.len() <= 16
        && ae.bytes().all(|b| (0x20..0x7F).contains(&b) && b != b'\\')
}

fn establish_error(e: UlError, peer: String, s: &ScuSettings, proposed: usize) -> ScuError {
    match e {
        UlError::Rejected { association_rj, .. } => ScuError::Rejected {
            peer,
            permanent: association_rj.result == AssociationRJResult::Permanent,
            reason: format!("{:?}", association_rj.source),
        },
        UlError::NoAcceptedPresentationContexts { .. } => {
            ScuError::NoContextAccepted { peer, proposed }
        }
        UlError::Timeout { .. } => ScuError::ConnectTimeout {
            peer,
            after: s.connect_timeout,
        },
        UlError::Connect { source, .. }
        | UlError::ToAddress { source, .. }
        | UlError::TlsHandshake { source, .. } => ScuError::Connect { peer, source },
        UlError::InvalidServerName { .. } => ScuError::InvalidTarget {
            peer,
            reason: "the host is not a name or address a TLS certificate can be checked for",
        },
        UlError::UnexpectedPdu { pdu, .. } if matches!(*pdu, Pdu::AbortRQ { .. }) => {
            ScuError::Aborted { peer }
        }
        // dicom-ul (async-tls) reports any failure to read the answer after a TLS
        // handshake this way, e.g. a PACS that refused our client certificate.
        UlError::TlsNotSupported => ScuError::Protocol {
            peer,
            reason: "the peer ended the TLS session without answering the association request (client certificate refused?)",
        },
        other => link_error(other, peer),
    }
}

/// Errors of an established link; dicom-ul's texts are not passed on.
fn link_error(e: UlError, peer: String) -> ScuError {
    match e {
        UlError::ConnectionClosed { .. } => ScuError::Closed { peer },
        UlError::WireSend { source, .. } | UlError::WireRead { source, .. } => {
            use std::io::ErrorKind::{
                BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof,
            };
            if matches!(
                source.kind(),
                BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
            ) {
                ScuError::Closed { peer }
            } else {
                ScuError::Io { peer, source }
            }
        }
        UlError::Aborted { .. } => ScuError::Aborted { peer },
        UlError::ReceivePdu { .. } => ScuError::Protocol {
            peer,
            reason: "malformed PDU from the peer",
        },
        UlError::SendPdu { .. } | UlError::SendTooLongPdu { .. } => ScuError::Protocol {
            peer,
            reason: "PDU does not encode within the peer's maximum length",
        },
        _ => ScuError::Protocol {
            peer,
            reason: "unexpected answer from the peer",
        },
    }
}

/// An established association with a storage SCP.
#[derive(Debug)]
pub struct ScuAssociation<S> {
    /// `None` once the association broke (timeout, abort, closed connection).
    inner: Option<AsyncClientAssociation<S>>,
    peer: String,
    settings: ScuSettings,
    message_id: u16,
    delivered: u64,
}

impl<S> ScuAssociation<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Whether the peer accepted the presentation context `context`.
    pub fn accepts(&self, context: &ObjectContext) -> bool {
        self.context_id(context).is_some()
    }

    /// Whether the association can still carry objects.
    pub fn is_usable(&self) -> bool {
        self.inner.is_some()
    }

    fn context_id(&self, context: &ObjectContext) -> Option<u8> {
        self.inner.as_ref().and_then(|inner| {
            inner
                .presentation_contexts()
                .iter()
                .find(|pc| {
                    trim_uid(&pc.abstract_syntax) == context.sop_class_uid
                        && trim_uid(&pc.transfer_syntax) == context.transfer_syntax_uid
                })
                .map(|pc| pc.id)
        })
    }

    /// Sends one object and waits for its C-STORE-RSP.
    pub async fn store(&mut self, object: &StoreObject) -> Result<StoreOutcome, ScuError> {
        if self.inner.is_none() {
            return Err(ScuError::Unusable {
                peer: self.peer.clone(),
            });
        }
        let context = object.context();
        let Some(pc_id) = self.context_id(&context) else {
            return Err(ScuError::ContextNotAccepted {
                peer: self.peer.clone(),
                sop_class_uid: context.sop_class_uid,
                transfer_syntax_uid: context.transfer_syntax_uid,
            });
        };
        self.message_id = self.message_id.wrapping_add(1).max(1);
        let message_id = self.message_id;
        let result = self.exchange(pc_id, message_id, object).await;
        let status = match result {
            Ok(status) => status,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "C-STORE association broken");
                self.break_off().await;
                return Err(e);
            }
        };
        match classify_status(status) {
            Some(outcome) => {
                self.delivered += 1;
                debug!(peer = %self.peer, status = format!("{status:04X}"), "object delivered");
                Ok(outcome)
            }
            None => {
                warn!(peer = %self.peer, status = format!("{status:04X}"), "object refused");
                Err(ScuError::Failed {
                    peer: self.peer.clone(),
                    status,
                })
            }
        }
    }

    /// Command, data set, response; returns the response status.
    async fn exchange(
        &mut self,
        pc_id: u8,
        message_id: u16,
        object: &StoreObject,
    ) -> Result<u16, ScuError> {
        let peer = self.peer.clone();
        let dimse_timeout = self.settings.dimse_timeout;
        let Some(inner) = self.inner.as_mut() else {
            return Err(ScuError::Unusable { peer });
        };
        let meta = object.meta();
        let command = dimse::store_request(message_id, &meta.sop_class_uid, &meta.sop_instance_uid);
        if command.is_empty() {
            return Err(ScuError::Protocol {
                peer,
                reason: "C-STORE-RQ does not encode",
            });
        }
        send_pdv(inner, pc_id, PDataValueType::Command, true, command, &peer).await?;
        // The PDV item header (length, context id, control) takes 6 bytes of the PDU.
        // Fragments of even length (PS3.8 9.3.5.1).
        let chunk = (inner.acceptor_max_pdu_length() as usize)
            .saturating_sub(6)
            .max(2)
            & !1;
        let data = object.data_set();
        if data.is_empty() {
            send_pdv(inner, pc_id, PDataValueType::Data, true, Vec::new(), &peer).await?;
        }
        let mut parts = data.chunks(chunk).peekable();
        while let Some(part) = parts.next() {
            let last = parts.peek().is_none();
            send_pdv(
                inner,
                pc_id,
                PDataValueType::Data,
                last,
                part.to_vec(),
                &peer,
            )
            .await?;
        }
        let response = tokio::time::timeout(dimse_timeout, receive_response(inner, &peer))
            .await
            .map_err(|_| ScuError::ResponseTimeout {
                peer: peer.clone(),
                after: dimse_timeout,
            })??;
        if response.command_field != field::C_STORE_RSP
            || response.message_id_being_responded_to != message_id
        {
            return Err(ScuError::Protocol {
                peer,
                reason: "response does not answer the C-STORE-RQ",
            });
        }
        if response
            .sop_instance_uid
            .as_deref()
            .is_some_and(|uid| uid != meta.sop_instance_uid)
        {
            return Err(ScuError::Protocol {
                peer,
                reason: "response names another SOP instance",
            });
        }
        Ok(response.status)
    }

    /// Ends a broken association with an A-ABORT (best effort, bounded).
    async fn break_off(&mut self) {
        if let Some(inner) = self.inner.take() {
            let _ = tokio::time::timeout(self.settings.association_timeout, inner.abort()).await;
        }
    }

    /// Objects delivered (success or warning) on this association.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// A-RELEASE, waiting at most the association timeout for the A-RELEASE-RP.
    pub async fn release(mut self) -> Result<(), ScuError> {
        let peer = self.peer.clone();
        let Some(inner) = self.inner.take() else {
            return Err(ScuError::Unusable { peer });
        };
        let after = self.settings.association_timeout;
        match tokio::time::timeout(after, inner.release()).await {
            Ok(Ok(())) => {
                info!(peer = %peer, delivered = self.delivered, "C-STORE association released");
                Ok(())
            }
            Ok(Err(e)) => Err(link_error(e, peer)),
            Err(_) => Err(ScuError::AssociationTimeout { peer, after }),
        }
    }

    /// A-ABORT.
    pub async fn abort(mut self) {
        self.break_off().await;
    }
}

async fn send_pdv<S>(
    inner: &mut AsyncClientAssociation<S>,
    pc_id: u8,
    value_type: PDataValueType,
    is_last: bool,
    data: Vec<u8>,
    peer: &str,
) -> Result<(), ScuError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let pdu = Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc_id,
            value_type,
            is_last,
            data,
        }],
    };
    inner.send(&pdu).await.map_err(|e| match e {
        UlError::Timeout { .. } => ScuError::SendTimeout {
            peer: peer.to_string(),
            after: inner.write_timeout().unwrap_or_default(),
        },
        other => link_error(other, peer.to_string()),
    })
}

/// Reads PDUs until a complete response command set.
async fn receive_response<S>(
    inner: &mut AsyncClientAssociation<S>,
    peer: &str,
) -> Result<dimse::Response, ScuError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut command = Vec::new();
    loop {
        let pdu = inner
            .receive()
            .await
            .map_err(|e| link_error(e, peer.to_string()))?;
        let values = match pdu {
            Pdu::PData { data } => data,
            Pdu::AbortRQ { .. } => {
                return Err(ScuError::Aborted {
                    peer: peer.to_string(),
                });
            }
            _ => {
                return Err(ScuError::Protocol {
                    peer: peer.to_string(),
                    reason: "unexpected PDU instead of a C-STORE-RSP",
                });
            }
        };
        for pdv in values {
            if pdv.value_type != PDataValueType::Command {
                return Err(ScuError::Protocol {
                    peer: peer.to_string(),
                    reason: "data set fragment instead of a C-STORE-RSP",
                });
            }
            if command.len() + pdv.data.len() > MAX_RESPONSE_LEN {
                return Err(ScuError::Protocol {
                    peer: peer.to_string(),
                    reason: "response command set too large",
                });
            }
            command.extend_from_slice(&pdv.data);
            if pdv.is_last {
                return dimse::decode_response(&command).map_err(|_| ScuError::Protocol {
                    peer: peer.to_string(),
                    reason: "response command set does not decode",
                });
            }
        }
    }
}

fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(['\0', ' '])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn statuses_classify_per_ps3_4_annex_b() {
        assert_eq!(classify_status(0x0000), Some(StoreOutcome::Success));
        for w in [0xB000, 0xB006, 0xB007, 0x0001] {
            assert_eq!(
                classify_status(w),
                Some(StoreOutcome::Warning { status: w })
            );
        }
        for f in [0xA700, 0xA7FF, 0xA900, 0xC000, 0xC123, 0x0122, 0x0211] {
            assert_eq!(classify_status(f), None, "{f:04X}");
        }
        assert!(retryable_status(0xA700) && retryable_status(0xA7FF) && retryable_status(0x0213));
        for f in [0xA900, 0xA9FF, 0xC000, 0x0122, 0x0117] {
            assert!(!retryable_status(f), "{f:04X}");
        }
    }

    #[test]
    fn ae_titles_are_checked() {
        assert!(valid_ae_title("PACS"));
        assert!(valid_ae_title("SIXTEEN_CHARS_AE"));
        for bad in ["", "   ", "SEVENTEEN_CHARS_A", "A\\B", "A\u{e9}", "A\nB"] {
            assert!(!valid_ae_title(bad), "{bad:?}");
        }
    }

    #[test]
    fn non_part10_bytes_are_a_typed_error() {
        let err = StoreObject::from_part10(vec![0; 200]).unwrap_err();
        assert!(matches!(err, ScuError::InvalidObject(_)));
        assert!(!err.retryable());
        let mut odd =
            part10::header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1").unwrap();
        odd.extend([0x08, 0x00, 0x18, 0x00, b'U', b'I', 2, 0, b'1', 0, 0]);
        let err = StoreObject::from_part10(odd.clone()).unwrap_err();
        assert!(err.to_string().contains("odd length"), "{err}");
        odd.pop();
        let object = StoreObject::from_part10(odd).unwrap();
        assert_eq!(object.data_set().len(), 10);
        assert_eq!(object.meta().sop_instance_uid, "1.2.3");
    }
}
