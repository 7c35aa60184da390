//! The DICOM listeners: accept connections (plain TCP, and DICOM over TLS on its own port
//! when configured), apply the association policy before negotiation, hand admitted
//! associations to their own task, and drain on shutdown.
//!
//! Over TLS the handshake comes first, bounded by the ARTIM timeout; a failed one (a plain
//! client, a certificate from another CA, TLS 1.0) is logged with the peer address only,
//! counted as `gateway_dicom_associations_rejected{reason="tls_handshake"}`, and the
//! listener goes on. Then the same policy (with the verified client certificate's names),
//! limits, statuses and association loop as the plain listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource};
use dicom_ul::{Pdu, ServerAssociationOptions};
use gateway_spool::Spool;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::association;
use crate::context::{Context, Options};
use crate::link::{Link, Syntaxes, TlsAssociation};
use crate::metrics::Metrics;
use crate::policy::{Gatekeeper, Permit, PolicySettings, Refusal};
use crate::storage_classes::STORAGE_SOP_CLASSES;
use crate::worklist::{MODALITY_WORKLIST_FIND, WorklistSource};

/// The largest A-ASSOCIATE-RQ accepted (128 presentation contexts with many transfer
/// syntaxes fit well within it).
const MAX_ASSOCIATE_RQ: usize = 128 * 1024;
/// Connections beyond the association limit that may be open while being refused.
const CONNECTION_SLACK: usize = 16;

/// Settings of the DICOM service, built by `gatewayd` from `[dicom]`.
#[derive(Debug, Clone)]
pub struct DicomSettings {
    pub listen: SocketAddr,
    pub policy: PolicySettings,
    pub max_pdu_length: u32,
    /// Time allowed for a peer to complete association negotiation.
    pub artim_timeout: Duration,
    /// An association silent for this long is aborted.
    pub idle_timeout: Duration,
    /// How long in-flight associations may continue after shutdown starts.
    pub shutdown_grace: Duration,
    /// DICOM over TLS on its own port (`[dicom] tls_listen`).
    pub tls: Option<TlsListenerSettings>,
}

/// The TLS listener: its address and the rustls configuration (from `gateway_tls`: the
/// profile's suites, certificate files or the device identity, optional client CA).
#[derive(Debug, Clone)]
pub struct TlsListenerSettings {
    pub listen: SocketAddr,
    pub config: Arc<rustls::ServerConfig>,
}

/// Service failures (only at bind time: after that, failures are per connection).
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    #[error("cannot listen for DICOM on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The C-ECHO/C-STORE SCP, and Modality Worklist C-FIND SCP when given a worklist.
#[derive(Debug)]
pub struct DicomService {
    listener: TcpListener,
    tls_listener: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    settings: DicomSettings,
    ctx: Arc<Context>,
    gatekeeper: Gatekeeper,
    /// `true` while the gateway is disabled: new associations get A-ASSOCIATE-RJ.
    disabled: watch::Receiver<bool>,
}

impl DicomService {
    /// Binds the listener and registers the service's metrics.
    pub async fn bind(
        settings: DicomSettings,
        spool: Spool,
        registry: &mut Registry,
    ) -> Result<Self, DicomError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| DicomError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let tls_listener = match &settings.tls {
            None => None,
            Some(tls) => {
                let listener =
                    TcpListener::bind(tls.listen)
                        .await
                        .map_err(|source| DicomError::Bind {
                            addr: tls.listen,
                            source,
                        })?;
                Some((listener, Arc::clone(&tls.config)))
            }
        };
        let metrics = Metrics::register(registry);
        let gatekeeper = Gatekeeper::new(settings.policy.clone());
        let ctx = Arc::new(Context {
            options: build_options(&settings, false),
            syntaxes: build_syntaxes(&settings, false),
            spool,
            metrics,
            idle_timeout: settings.idle_timeout,
            worklist: None,
            transfers: None,
        });
        Ok(Self {
            listener,
            tls_listener,
            settings,
            ctx,
            gatekeeper,
            disabled: watch::channel(false).1,
        })
    }

    /// The service's metric handles (for the fleet telemetry).
    pub fn metrics(&self) -> Metrics {
        self.ctx.metrics.clone()
    }

    /// Refuses every new association (A-ASSOCIATE-RJ, rejected-transient, service user, no
    /// reason given; metric label `disabled`) while `disabled` holds `true`. Open
    /// associations continue. Without this call the service is never disabled.
    #[must_use]
    pub fn with_disabled(mut self, disabled: watch::Receiver<bool>) -> Self {
        self.disabled = disabled;
        self
    }

    /// Serves Modality Worklist C-FIND (1.2.840.10008.5.1.4.31) from `source`: the SOP
    /// class is accepted in negotiation alongside the storage classes, and each C-FIND is
    /// matched against `source.items()` (called on a blocking thread, once per request).
    /// Without this call that SOP class is refused at negotiation.
    #[must_use]
    pub fn with_worklist(mut self, source: Arc<dyn WorklistSource>) -> Self {
        self.ctx = Arc::new(Context {
            options: build_options(&self.settings, true),
            syntaxes: build_syntaxes(&self.settings, true),
            worklist: Some(source),
            ..(*self.ctx).clone()
        });
        self
    }

    /// Hands each association's stored studies (calling AE title, peer address, and per
    /// study the Patient ID, Study UID and SOP classes with counts) to `sink` when the
    /// association ends, for the audit trail's "DICOM instances transferred" records. The
    /// association waits for room in the channel, never for the audit write.
    #[must_use]
    pub fn with_transfer_audit(mut self, sink: crate::transfers::TransferSink) -> Self {
        self.ctx = Arc::new(Context {
            transfers: Some(sink),
            ..(*self.ctx).clone()
        });
        self
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The TLS listener's bound address, when there is one.
    pub fn local_tls_addr(&self) -> Option<SocketAddr> {
        self.tls_listener
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` turns true, then stops accepting, lets open associations
    /// finish for up to `shutdown_grace`, and aborts what is left.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Self {
            listener,
            tls_listener,
            settings,
            ctx,
            gatekeeper,
            disabled,
        } = self;
        info!(listen = %settings.listen, ae_title = %gatekeeper.ae_title(), "DICOM service listening");
        if let Some(tls) = &settings.tls {
            info!(listen = %tls.listen, "DICOM over TLS listening");
        }
        let (hard_stop_tx, hard_stop) = watch::channel(false);
        let connections = Connections {
            max: settings.policy.max_associations as usize + CONNECTION_SLACK,
            ctx: Arc::clone(&ctx),
            gatekeeper: gatekeeper.clone(),
            hard_stop: hard_stop.clone(),
            artim: settings.artim_timeout,
        };
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => connections.spawn(&mut tasks, stream, addr, None, *disabled.borrow()),
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                accepted = accept_tls(tls_listener.as_ref()) => match accepted {
                    Ok((stream, addr, acceptor)) => connections.spawn(&mut tasks, stream, addr, Some(acceptor), *disabled.borrow()),
                    Err(e) => {
                        warn!(error = %e, "TLS accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        drop(tls_listener);
        info!(open = tasks.len(), grace = ?settings.shutdown_grace, "DICOM service draining");
        let grace = tokio::time::sleep(settings.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                joined = tasks.join_next() => if joined.is_none() { break },
                _ = &mut grace => {
                    warn!(open = tasks.len(), "shutdown grace elapsed: aborting open associations");
                    let _ = hard_stop_tx.send(true);
                    let drained = tokio::time::timeout(Duration::from_secs(5), async {
                        while tasks.join_next().await.is_some() {}
                    })
                    .await;
                    if drained.is_err() {
                        tasks.abort_all();
                    }
                    break;
                }
            }
        }
        info!("DICOM service stopped");
    }
}

/// What every accepted connection's task needs, shared by both listeners.
struct Connections {
    max: usize,
    ctx: Arc<Context>,
    gatekeeper: Gatekeeper,
    hard_stop: watch::Receiver<bool>,
    artim: Duration,
}

impl Connections {
    /// Serves an accepted connection in its own task (TLS when `tls` is given), or refuses
    /// it when `max` connections are already open.
    fn spawn(
        &self,
        tasks: &mut JoinSet<()>,
        stream: TcpStream,
        addr: SocketAddr,
        tls: Option<TlsAcceptor>,
        disabled: bool,
    ) {
        if tasks.len() >= self.max {
            debug!(peer = %addr, tls = tls.is_some(), "connection refused: too many open connections");
            self.ctx.metrics.rejected("connections");
            return;
        }
        let ctx = Arc::clone(&self.ctx);
        let gatekeeper = self.gatekeeper.clone();
        let hard_stop = self.hard_stop.clone();
        let artim = self.artim;
        tasks.spawn(async move {
            match tls {
                None => {
                    handle_connection(stream, addr, ctx, gatekeeper, artim, hard_stop, disabled)
                        .await;
                }
                Some(tls) => {
                    let (g, h) = (gatekeeper, hard_stop);
                    handle_tls_connection(stream, addr, tls, ctx, g, artim, h, disabled).await;
                }
            }
        });
    }
}

/// Accepts on the TLS listener; never ready without one.
async fn accept_tls(
    listener: Option<&(TcpListener, Arc<rustls::ServerConfig>)>,
) -> std::io::Result<(TcpStream, SocketAddr, TlsAcceptor)> {
    match listener {
        Some((listener, config)) => {
            let (stream, addr) = listener.accept().await?;
            Ok((stream, addr, TlsAcceptor::from(Arc::clone(config))))
        }
        None => std::future::pending().await,
    }
}

/// The abstract and transfer syntaxes [`build_options`] gives dicom-ul, for the TLS
/// listener's own negotiation (`link::negotiate`).
fn build_syntaxes(settings: &DicomSettings, worklist: bool) -> Arc<Syntaxes> {
    let mut abstract_syntaxes = vec![dicom_dictionary_std::uids::VERIFICATION.to_string()];
    abstract_syntaxes.extend(STORAGE_SOP_CLASSES.iter().map(|uid| uid.to_string()));
    if worklist {
        abstract_syntaxes.push(MODALITY_WORKLIST_FIND.to_string());
    }
    Arc::new(Syntaxes {
        abstract_syntaxes,
        transfer_syntaxes: TransferSyntaxRegistry
            .iter()
            .map(|ts| ts.uid().to_string())
            .collect(),
        max_pdu_length: settings.max_pdu_length,
    })
}

fn build_options(settings: &DicomSettings, worklist: bool) -> Arc<Options> {
    let mut options = ServerAssociationOptions::new()
        .accept_called_ae_title()
        .ae_title(settings.policy.ae_title.clone())
        .max_pdu_length(settings.max_pdu_length)
        .strict(true)
        .with_abstract_syntax(dicom_dictionary_std::uids::VERIFICATION);
    for uid in STORAGE_SOP_CLASSES {
        options = options.with_abstract_syntax(*uid);
    }
    if worklist {
        options = options.with_abstract_syntax(MODALITY_WORKLIST_FIND);
    }
    // Every transfer syntax the registry knows: data sets are stored as they come.
    for ts in TransferSyntaxRegistry.iter() {
        options = options.with_transfer_syntax(ts.uid());
    }
    Arc::new(options)
}

async fn handle_connection(
    stream: TcpStream,
    addr: SocketAddr,
    ctx: Arc<Context>,
    gatekeeper: Gatekeeper,
    artim: Duration,
    hard_stop: watch::Receiver<bool>,
    disabled: bool,
) {
    let _ = stream.set_nodelay(true);
    let first = first_request(peek_associate_rq(&stream), &ctx, addr, artim, "tcp").await;
    let Some((calling, called, rq_len)) = first else {
        abort_raw(stream).await;
        return;
    };
    let permit = match admit(
        &ctx,
        &gatekeeper,
        disabled,
        &calling,
        &called,
        addr,
        None,
        "tcp",
    ) {
        Ok(p) => p,
        Err(refusal) => {
            reject_raw(stream, rq_len, Pdu::AssociationRJ(refusal.pdu()), artim).await;
            return;
        }
    };
    let association = match tokio::time::timeout(artim, ctx.options.establish_async(stream)).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            info!(peer = %addr, calling_ae = %calling, error = %e, "association negotiation failed");
            return;
        }
        Err(_) => {
            info!(peer = %addr, calling_ae = %calling, "ARTIM timeout during negotiation");
            return;
        }
    };
    let link = Link::Plain(Box::new(association));
    serve_admitted(link, &ctx, &calling, addr, hard_stop, permit).await;
}

/// One connection on the TLS listener: handshake (bounded by ARTIM), then the same
/// steps as [`handle_connection`] ([`first_request`], [`admit`] with the client
/// certificate's names, [`serve_admitted`]), with our own negotiation
/// (`link::negotiate`) in place of dicom-ul's, which reads only a `TcpStream`.
#[allow(clippy::too_many_arguments)]
async fn handle_tls_connection(
    stream: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<Context>,
    gatekeeper: Gatekeeper,
    artim: Duration,
    hard_stop: watch::Receiver<bool>,
    disabled: bool,
) {
    let _ = stream.set_nodelay(true);
    let mut tls = match tokio::time::timeout(artim, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // rustls' errors name the protocol failure (alerts, versions, certificate
            // checks), never application data.
            info!(peer = %addr, error = %e, "TLS handshake failed");
            ctx.metrics.rejected("tls_handshake");
            return;
        }
        Err(_) => {
            info!(peer = %addr, "ARTIM timeout during the TLS handshake");
            ctx.metrics.rejected("tls_handshake");
            return;
        }
    };
    let cert_names: Option<Vec<String>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(gateway_tls::peer_names);
    let mut received = Vec::new();
    let first = first_request(
        read_associate_rq(&mut tls, &mut received),
        &ctx,
        addr,
        artim,
        "tls",
    );
    let Some((calling, called, rq_len)) = first.await else {
        abort_raw(tls).await;
        return;
    };
    let names = cert_names.as_deref();
    let permit = match admit(
        &ctx,
        &gatekeeper,
        disabled,
        &calling,
        &called,
        addr,
        names,
        "tls",
    ) {
        Ok(p) => p,
        Err(refusal) => {
            reject_raw(tls, 0, Pdu::AssociationRJ(refusal.pdu()), artim).await;
            return;
        }
    };
    let request = received.get(..rq_len).unwrap_or_default();
    let rq = match dicom_ul::read_pdu(request, MAX_ASSOCIATE_RQ as u32, false) {
        Ok(Some(Pdu::AssociationRQ(rq))) => rq,
        _ => {
            ctx.metrics.rejected("protocol");
            abort_raw(tls).await;
            return;
        }
    };
    let negotiated = match crate::link::negotiate(rq, &ctx.syntaxes) {
        Ok(n) => n,
        Err(rj) => {
            info!(peer = %addr, calling_ae = %calling, "association negotiation failed: protocol version or application context");
            reject_raw(tls, 0, Pdu::AssociationRJ(rj), artim).await;
            return;
        }
    };
    let mut ac = Vec::new();
    if dicom_ul::write_pdu(&mut ac, &negotiated.ac).is_err() {
        abort_raw(tls).await;
        return;
    }
    let sent = tokio::time::timeout(artim, async {
        tls.write_all(&ac).await?;
        tls.flush().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        info!(peer = %addr, calling_ae = %calling, "association negotiation failed: A-ASSOCIATE-AC not sent");
        return;
    }
    let rest = received.get(rq_len..).unwrap_or_default();
    let association = TlsAssociation::new(tls, rest, negotiated, ctx.syntaxes.max_pdu_length);
    let link = Link::Tls(Box::new(association));
    serve_admitted(link, &ctx, &calling, addr, hard_stop, permit).await;
}

/// Waits (bounded by ARTIM) for the first PDU to be an A-ASSOCIATE-RQ and returns its calling
/// and called AE titles and length; `None` (counted, logged) when the peer must be aborted.
async fn first_request<F>(
    read: F,
    ctx: &Context,
    addr: SocketAddr,
    artim: Duration,
    transport: &'static str,
) -> Option<(String, String, usize)>
where
    F: std::future::Future<Output = Result<(String, String, usize), &'static str>>,
{
    match tokio::time::timeout(artim, read).await {
        Ok(Ok(found)) => Some(found),
        Ok(Err(reason)) => {
            debug!(peer = %addr, reason, transport, "not an association request: aborting");
            ctx.metrics.rejected("protocol");
            None
        }
        Err(_) => {
            debug!(peer = %addr, transport, "ARTIM timeout before association request");
            ctx.metrics.rejected("artim");
            None
        }
    }
}

/// The association policy, one place for both listeners: a disabled service refuses, else the
/// gatekeeper decides with the AE titles, the address and (TLS) the client certificate's
/// names. A refusal is logged and counted here; the caller sends the A-ASSOCIATE-RJ.
#[allow(clippy::too_many_arguments)]
fn admit(
    ctx: &Context,
    gatekeeper: &Gatekeeper,
    disabled: bool,
    calling: &str,
    called: &str,
    addr: SocketAddr,
    cert_names: Option<&[String]>,
    transport: &'static str,
) -> Result<Permit, Refusal> {
    let admitted = if disabled {
        Err(Refusal::Disabled)
    } else {
        gatekeeper.admit_as(calling, called, addr.ip(), cert_names)
    };
    if let Err(refusal) = &admitted {
        info!(peer = %addr, calling_ae = %calling, reason = refusal.label(), transport, "association rejected");
        ctx.metrics.rejected(refusal.label());
    }
    admitted
}

/// Serves an admitted, negotiated association to its end, counted as active meanwhile; the
/// permit (the per-peer and total association counts) is released after.
async fn serve_admitted(
    link: Link,
    ctx: &Context,
    calling: &str,
    addr: SocketAddr,
    hard_stop: watch::Receiver<bool>,
    permit: Permit,
) {
    ctx.metrics.associations_active.inc();
    ctx.metrics.associations_accepted.inc();
    association::serve(link, ctx, calling, addr, hard_stop).await;
    ctx.metrics.associations_active.dec();
    drop(permit);
}

/// Reads until `buf` holds a whole first PDU and, if it is an A-ASSOCIATE-RQ, returns
/// calling and called AE titles and its length (bytes after it stay in `buf`).
async fn read_associate_rq<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<(String, String, usize), &'static str> {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match classify_first_pdu(buf) {
            FirstPdu::AssociateRq {
                calling,
                called,
                len,
            } => return Ok((calling, called, len)),
            FirstPdu::Invalid(reason) => return Err(reason),
            FirstPdu::Incomplete => {}
        }
        let n = stream.read(&mut chunk).await.map_err(|_| "read error")?;
        if n == 0 {
            return Err("connection closed");
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPdu {
    /// More bytes are needed to decide.
    Incomplete,
    /// A complete A-ASSOCIATE-RQ of `len` bytes (header included).
    AssociateRq {
        calling: String,
        called: String,
        len: usize,
    },
    /// Not an association request: the connection is aborted.
    Invalid(&'static str),
}

/// Classifies the bytes buffered so far on a new connection. Pure, so it is fuzzed
/// (`fuzz/fuzz_targets/associate_rq.rs`).
pub fn classify_first_pdu(buf: &[u8]) -> FirstPdu {
    let Some(&pdu_type) = buf.first() else {
        return FirstPdu::Incomplete;
    };
    if pdu_type != 0x01 {
        return FirstPdu::Invalid("first PDU is not an A-ASSOCIATE-RQ");
    }
    let Some(&[_, _, l0, l1, l2, l3]) = buf.get(..6) else {
        return FirstPdu::Incomplete;
    };
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if len > MAX_ASSOCIATE_RQ {
        return FirstPdu::Invalid("A-ASSOCIATE-RQ too large");
    }
    let Some(pdu) = buf.get(..len + 6) else {
        return FirstPdu::Incomplete;
    };
    match dicom_ul::read_pdu(pdu, MAX_ASSOCIATE_RQ as u32, false) {
        Ok(Some(Pdu::AssociationRQ(rq))) => FirstPdu::AssociateRq {
            calling: rq.calling_ae_title,
            called: rq.called_ae_title,
            len: len + 6,
        },
        _ => FirstPdu::Invalid("malformed A-ASSOCIATE-RQ"),
    }
}

/// Waits until a whole first PDU is buffered and, if it is an A-ASSOCIATE-RQ, returns
/// calling and called AE titles and its length, without consuming it (dicom-ul reads it).
async fn peek_associate_rq(stream: &TcpStream) -> Result<(String, String, usize), &'static str> {
    let mut buf = vec![0u8; MAX_ASSOCIATE_RQ + 6];
    loop {
        let n = stream.peek(&mut buf).await.map_err(|_| "read error")?;
        if n == 0 {
            return Err("connection closed");
        }
        match classify_first_pdu(buf.get(..n).unwrap_or_default()) {
            FirstPdu::AssociateRq {
                calling,
                called,
                len,
            } => return Ok((calling, called, len)),
            FirstPdu::Invalid(reason) => return Err(reason),
            // Part of the request is still in flight.
            FirstPdu::Incomplete => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Consumes the request and answers with `pdu`. As PS3.8 (state Sta13) asks, the
/// requestor closes the connection after reading the rejection; we close only when it has,
/// or when ARTIM expires, so the answer never races a close of our own.
async fn reject_raw<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    rq_len: usize,
    pdu: Pdu,
    artim: Duration,
) {
    let mut discard = vec![0u8; rq_len];
    if stream.read_exact(&mut discard).await.is_err() {
        return;
    }
    let mut out = Vec::new();
    if dicom_ul::write_pdu(&mut out, &pdu).is_err()
        || stream.write_all(&out).await.is_err()
        || stream.flush().await.is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(artim, async {
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Sends an A-ABORT on a connection that never became an association, and closes it.
async fn abort_raw<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let pdu = Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(AbortRQServiceProviderReason::UnexpectedPdu),
    };
    let mut out = Vec::new();
    if dicom_ul::write_pdu(&mut out, &pdu).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(&out).await?;
            stream.flush().await
        })
        .await;
    }
    // Drain what the peer already sent so that closing does not turn into a reset.
    let _ = tokio::time::timeout(Duration::from_millis(100), async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < 1 << 20 {
            match stream.read(&mut sink).await {
                Ok(n) if n > 0 => total += n,
                _ => break,
            }
        }
    })
    .await;
    let _ = stream.shutdown().await;
}
