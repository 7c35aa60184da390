//! The MLLP listener and the per-connection loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gateway_audit::{Action, AuditLog, Event};
use gateway_hl7::ack::{self, AckError, AckPolicy, Outcome};
use gateway_hl7::charset::{self, Charset, CharsetOverride};
use gateway_hl7::mllp::{MllpDecoder, MllpEvent, encode_frame};
use gateway_hl7::parse::{self, ErrorCode};
use gateway_hl7::record::{self, Header};
use gateway_spool::{Committed, MessageIn, Spool, SpoolError};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::allow::{self, Hl7Peer, Refusal, Sender};
use crate::clock::{self, ControlIds};
use crate::commit::Committer;
use crate::metrics::Metrics;
use crate::observe::Observer;

/// ERR-8 texts (fixed: never message content).
const SPOOL_FULL: &str = "gateway storage full: message not accepted, send it again later";
const SPOOL_FAILED: &str = "gateway could not store the message durably: send it again later";

/// Settings of the listener, built by `gatewayd` from `[hl7]`.
#[derive(Debug, Clone)]
pub struct Hl7Settings {
    pub listen: SocketAddr,
    /// `hl7.charset`: MSH-18 (`Auto`) or a fixed character set for every message.
    pub charset: CharsetOverride,
    /// Largest frame accepted; a larger one is answered with a reject and the connection
    /// closed.
    pub max_frame_bytes: usize,
    /// A connection with nothing received for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// On shutdown, connections get this long to finish the message in hand.
    pub shutdown_grace: Duration,
    /// MLLP in TLS (with or without client certificates, as the configuration says);
    /// `None`: plain MLLP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `[[hl7.peers]]`: when non-empty, only messages from these senders are stored (see
    /// [`crate::allow`]); others get AR.
    pub peers: Vec<Hl7Peer>,
}

impl Hl7Settings {
    /// Defaults for everything but the address.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            charset: CharsetOverride::Auto,
            max_frame_bytes: 1 << 20,
            idle_timeout: Duration::from_secs(600),
            max_connections: 32,
            shutdown_grace: Duration::from_secs(10),
            tls: None,
            peers: Vec::new(),
        }
    }
}

/// Failures at start.
#[derive(Debug, thiserror::Error)]
pub enum Hl7Error {
    #[error("hl7: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("hl7: cannot start the committer thread: {0}")]
    Committer(std::io::Error),
}

/// What every connection shares.
struct Context {
    settings: Hl7Settings,
    committer: Committer,
    metrics: Metrics,
    ids: ControlIds,
    observer: Option<Observer>,
    /// Where refusals of senders not on the allow list are recorded.
    audit: Option<Arc<AuditLog>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("observer", &self.observer.is_some())
            .field("audit", &self.audit.is_some())
            .finish_non_exhaustive()
    }
}

/// The listener of `hl7.listen`.
#[derive(Debug)]
pub struct Hl7Service {
    listener: TcpListener,
    ctx: Arc<Context>,
    /// `true` while the gateway is disabled: new connections are closed unread.
    disabled: watch::Receiver<bool>,
}

impl Hl7Service {
    /// Binds the listener and starts the committer.
    pub async fn bind(
        settings: Hl7Settings,
        spool: Spool,
        registry: &mut Registry,
    ) -> Result<Self, Hl7Error> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| Hl7Error::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let committer = Committer::start(spool).map_err(Hl7Error::Committer)?;
        Ok(Self {
            listener,
            ctx: Arc::new(Context {
                settings,
                committer,
                metrics: Metrics::register(registry),
                ids: ControlIds::new(),
                observer: None,
                audit: None,
            }),
            disabled: watch::channel(false).1,
        })
    }

    /// The service's metric handles (for the fleet telemetry).
    pub fn metrics(&self) -> Metrics {
        self.ctx.metrics.clone()
    }

    /// Closes every new connection unread (metric `gateway_hl7_connections_rejected_total
    /// {reason="disabled"}`) while `disabled` holds `true`; open connections continue.
    /// Without this call the service is never disabled.
    #[must_use]
    pub fn with_disabled(mut self, disabled: watch::Receiver<bool>) -> Self {
        self.disabled = disabled;
        self
    }

    /// Hands every durable message to `observer` without waiting (see [`crate::observe`]).
    #[must_use]
    pub fn with_observer(mut self, observer: Observer) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.observer = Some(observer);
        }
        self
    }

    /// Records every refusal of a sender not on `[[hl7.peers]]` in `audit` (action
    /// `hl7_sender_refused`, subject `peer:{address}`, detail the refusal's reason), at most
    /// once per connection and reason, before the AR goes out.
    #[must_use]
    pub fn with_audit(mut self, audit: Arc<AuditLog>) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.audit = Some(audit);
        }
        self
    }

    /// The bound address (the port is the OS's choice when configured as 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown` turns true, then lets open connections finish
    /// the message in hand (up to `shutdown_grace`) and returns.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let addr = self.local_addr().ok();
        info!(listen = ?addr, tls = self.ctx.settings.tls.is_some(), "HL7 MLLP service listening");
        let slots = Arc::new(Semaphore::new(self.ctx.settings.max_connections));
        let mut connections = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "HL7 accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if *self.disabled.borrow() {
                info!(%peer, "HL7 connection refused: the gateway is disabled");
                self.ctx.metrics.connection_rejected("disabled");
                drop(stream);
                continue;
            }
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                warn!(%peer, limit = self.ctx.settings.max_connections, "HL7 connection refused: hl7.max_connections reached");
                self.ctx.metrics.connection_rejected("limit");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let ctx = Arc::clone(&self.ctx);
            let rx = shutdown.clone();
            connections.spawn(async move {
                ctx.metrics.connection_opened();
                debug!(%peer, "HL7 connection opened");
                let end = match accept_tls(stream, &ctx.settings).await {
                    Ok((stream, names)) => {
                        Connection::new(stream, peer, names, &ctx).serve(rx).await
                    }
                    Err(e) => {
                        warn!(%peer, error = %e, "HL7 TLS handshake failed: connection closed");
                        ctx.metrics.connection_rejected("tls");
                        "TLS handshake failed"
                    }
                };
                debug!(%peer, end, "HL7 connection closed");
                ctx.metrics.connection_closed();
                drop(permit);
            });
        }
        let grace = self.ctx.settings.shutdown_grace;
        if tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!(
                open = connections.len(),
                "HL7 connections still open after the shutdown grace: closing them"
            );
            connections.abort_all();
        }
        info!("HL7 MLLP service stopped");
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

/// The TLS handshake (bounded by the idle timeout) when the listener is in TLS, with the
/// names of the client certificate it verified (none without TLS or a client certificate).
async fn accept_tls(
    stream: TcpStream,
    settings: &Hl7Settings,
) -> Result<(Box<dyn Stream>, Vec<String>), std::io::Error> {
    let Some(tls) = &settings.tls else {
        return Ok((Box::new(stream), Vec::new()));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(tls));
    match tokio::time::timeout(settings.idle_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let names = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(<[_]>::first)
                .map(gateway_tls::peer_names)
                .unwrap_or_default();
            Ok((Box::new(tls_stream), names))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no TLS handshake within hl7.idle_timeout",
        )),
    }
}

struct Connection<'a> {
    stream: Box<dyn Stream>,
    peer: SocketAddr,
    /// The address and verified certificate names the allow list is checked against.
    sender: Sender,
    ctx: &'a Context,
    decoder: MllpDecoder,
    /// The refusals already audited (and logged at warn) on this connection, one bit per
    /// [`Refusal`]: a flood of refused messages costs one audit fsync per reason.
    refusals_seen: u8,
}

/// What the connection loop does after a frame or event.
enum Next {
    Continue,
    Close(&'static str),
}

impl<'a> Connection<'a> {
    fn new(
        stream: Box<dyn Stream>,
        peer: SocketAddr,
        names: Vec<String>,
        ctx: &'a Context,
    ) -> Self {
        Self {
            stream,
            peer,
            sender: Sender {
                ip: peer.ip(),
                names,
            },
            ctx,
            decoder: MllpDecoder::new(ctx.settings.max_frame_bytes),
            refusals_seen: 0,
        }
    }

    /// Serves frames until the peer closes, goes idle, sends an oversized frame, or
    /// shutdown. Returns why it ended (for the log).
    async fn serve(mut self, mut shutdown: watch::Receiver<bool>) -> &'static str {
        let mut buf = vec![0u8; 64 * 1024];
        let idle = self.ctx.settings.idle_timeout;
        loop {
            while let Some(event) = self.decoder.next_event() {
                if let Next::Close(why) = self.on_event(event).await {
                    return why;
                }
            }
            if *shutdown.borrow() {
                return "shutdown";
            }
            let read = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return "shutdown",
                read = tokio::time::timeout(idle, self.stream.read(&mut buf)) => read,
            };
            match read {
                Err(_) => {
                    info!(peer = %self.peer, "HL7 connection idle past hl7.idle_timeout: closed");
                    return "idle";
                }
                Ok(Err(e)) => {
                    debug!(peer = %self.peer, error = %e, "HL7 read failed");
                    return "read error";
                }
                Ok(Ok(0)) => {
                    self.decoder.finish();
                    while let Some(event) = self.decoder.next_event() {
                        if let Next::Close(why) = self.on_event(event).await {
                            return why;
                        }
                    }
                    return "peer closed";
                }
                Ok(Ok(n)) => self.decoder.feed(buf.get(..n).unwrap_or_default()),
            }
        }
    }

    async fn on_event(&mut self, event: MllpEvent) -> Next {
        match event {
            MllpEvent::Frame(frame) => match self.answer(frame).await {
                Some(reply) => self.send(&reply).await,
                None => Next::Continue,
            },
            MllpEvent::Garbage { bytes } => {
                debug!(peer = %self.peer, bytes, "HL7: bytes outside an MLLP frame skipped");
                self.ctx.metrics.discarded("garbage");
                Next::Continue
            }
            MllpEvent::Oversized { bytes } => {
                warn!(peer = %self.peer, bytes, limit = self.ctx.settings.max_frame_bytes, "HL7 frame larger than hl7.max_frame_bytes: rejected, connection closed");
                self.ctx.metrics.discarded("oversized");
                self.ctx.metrics.message("AR");
                let nak = ack::build_minimal_nak(
                    &AckError::new(ErrorCode::ApplicationInternalError)
                        .with_user_message("message larger than this gateway accepts"),
                    &self.ctx.ids.next(),
                    &clock::timestamp(),
                );
                let _ = self.send(nak.as_bytes()).await;
                Next::Close("oversized frame")
            }
        }
    }

    async fn send(&mut self, reply: &[u8]) -> Next {
        let framed = encode_frame(reply);
        let idle = self.ctx.settings.idle_timeout;
        match tokio::time::timeout(idle, self.stream.write_all(&framed)).await {
            Ok(Ok(())) => Next::Continue,
            Ok(Err(e)) => {
                debug!(peer = %self.peer, error = %e, "HL7 write failed");
                Next::Close("write error")
            }
            Err(_) => Next::Close("peer does not read its acknowledgements"),
        }
    }

    /// Decodes, parses, stores and acknowledges one frame. `None`: no acknowledgement
    /// (MSH-15/16 asked for none in this case).
    async fn answer(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        let ctx = self.ctx;
        let decoded = match charset::decode(&frame, ctx.settings.charset) {
            Ok(d) => d,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "HL7 message text cannot be decoded: answered with an error");
                let err = AckError::from(&e);
                return match Header::from_raw_frame(&frame) {
                    Some(h) => match self.refusal(&h, Charset::Ascii).await {
                        Some(refused) => refused,
                        None => {
                            self.reply(&h, Outcome::for_error(err.code), Some(&err), Charset::Ascii)
                        }
                    },
                    None => Some(self.nak(&err)),
                };
            }
        };
        let (header, checked) = match parse::parse(&decoded.text) {
            Ok(msg) => {
                let header = Header::read(&msg);
                let checked = header
                    .validate()
                    .and_then(|()| record::extract(&msg).map(drop));
                (header, checked)
            }
            Err(e) => {
                warn!(peer = %self.peer, code = e.code.code(), "HL7 frame is not a message: rejected");
                return Some(self.nak(&AckError::from(&e)));
            }
        };
        // The sender before the content: a sender not on the list learns nothing about
        // what the gateway would make of its message.
        if let Some(refused) = self.refusal(&header, decoded.charset).await {
            return refused;
        }
        if let Err(e) = checked {
            warn!(peer = %self.peer, code = e.code.code(), location = ?e.location, "HL7 message refused");
            let err = AckError::from(&e);
            return self.reply(
                &header,
                Outcome::for_error(err.code),
                Some(&err),
                decoded.charset,
            );
        }
        let item = MessageIn {
            key: format!(
                "{}|{}|{}",
                header.sending_app, header.sending_facility, header.control_id
            ),
            message_type: format!("{}^{}", header.message_type, header.trigger),
            charset: decoded.charset.name().to_string(),
            source: self.peer.ip().to_string(),
            bytes: frame,
        };
        let len = item.bytes.len();
        // Hands the durable message to the observer, never waiting on it.
        let observe = |message_type: String| {
            let Some(observer) = &ctx.observer else {
                return;
            };
            if let Err(dropped) = observer.offer(decoded.text.clone(), message_type.clone()) {
                ctx.metrics.observer_dropped(dropped.reason());
                warn!(peer = %self.peer, message_type, len, reason = dropped.reason(), "HL7 message stored and acknowledged but not handed to its observer (e.g. a SIU not applied to the booking ledger)");
            }
        };
        let message_type = item.message_type.clone();
        match ctx.committer.store(item).await {
            Ok(Committed::Stored(id)) => {
                debug!(peer = %self.peer, object = %hex(id.as_bytes()), len, "HL7 message stored");
                observe(message_type);
                self.reply(&header, Outcome::Accepted, None, decoded.charset)
            }
            Ok(Committed::Duplicate(id)) => {
                info!(peer = %self.peer, object = %hex(id.as_bytes()), "HL7 message already stored (same sender and MSH-10): acknowledged again, not stored twice");
                observe(message_type);
                self.reply(&header, Outcome::Accepted, None, decoded.charset)
            }
            Err(e) => {
                let text = match e {
                    SpoolError::Full { .. } => SPOOL_FULL,
                    _ => SPOOL_FAILED,
                };
                warn!(peer = %self.peer, error = %e, "HL7 message not accepted");
                let err =
                    AckError::new(ErrorCode::ApplicationInternalError).with_user_message(text);
                self.reply(&header, Outcome::Error, Some(&err), decoded.charset)
            }
        }
    }

    /// The allow list's answer for a message whose MSH was read: `None` when its sender is
    /// allowed, else the AR (or nothing, as MSH-15 asks) after counting and auditing.
    async fn refusal(&mut self, header: &Header, charset: Charset) -> Option<Option<Vec<u8>>> {
        let refusal = allow::check(
            &self.ctx.settings.peers,
            self.sender.ip,
            &self.sender.names,
            header,
        )
        .err()?;
        self.refused(refusal).await;
        Some(self.reply(
            header,
            Outcome::Rejected,
            Some(&refusal.ack_error()),
            charset,
        ))
    }

    /// Counts a refusal, and the first time on this connection for its reason, logs it and
    /// records it in the audit trail (on a blocking thread: the append syncs files).
    async fn refused(&mut self, refusal: Refusal) {
        let ctx = self.ctx;
        ctx.metrics.refused(refusal.reason());
        let first = self.refusals_seen & refusal.bit() == 0;
        self.refusals_seen |= refusal.bit();
        if !first {
            debug!(peer = %self.peer, reason = refusal.reason(), "HL7 message from a sender not on hl7.peers: AR, not stored");
            return;
        }
        warn!(peer = %self.peer, reason = refusal.reason(), "HL7 message from a sender not on hl7.peers: AR, not stored (further refusals on this connection are counted in gateway_hl7_refused_total only)");
        let Some(audit) = &ctx.audit else {
            return;
        };
        let audit = Arc::clone(audit);
        let event = Event {
            actor: "hl7-listener".into(),
            action: Action::Hl7SenderRefused,
            outcome: gateway_audit::Outcome::Failure,
            subject: Some(format!("peer:{}", self.peer.ip().to_canonical())),
            detail: Some(refusal.reason().into()),
        };
        let error = match tokio::task::spawn_blocking(move || audit.append(event)).await {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        warn!(peer = %self.peer, %error, "HL7 refusal not recorded in the audit trail");
    }

    fn reply(
        &self,
        header: &Header,
        outcome: Outcome,
        err: Option<&AckError>,
        charset: Charset,
    ) -> Option<Vec<u8>> {
        let policy: AckPolicy = ack::ack_mode(header);
        let Some(code) = policy.code_for(outcome) else {
            self.ctx.metrics.message("none");
            return None;
        };
        self.ctx.metrics.message(code.as_str());
        let text = ack::build_ack(header, code, err, &self.ctx.ids.next(), &clock::timestamp());
        Some(ack::encode_ack(&text, charset))
    }

    fn nak(&self, err: &AckError) -> Vec<u8> {
        self.ctx.metrics.message("AR");
        ack::build_minimal_nak(err, &self.ctx.ids.next(), &clock::timestamp()).into_bytes()
    }
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
