//! HL7 v2 forwarding: queued messages of an `kind = "mllp-tls"` destination go, oldest
//! first and one at a time, over one kept-open MLLP connection (in TLS with the device
//! identity, or plain `mllp://` in development), each answered by the peer's ACK.
//!
//! What the peer's acknowledgement means (MSA-1, ERR-3 from HL7 table 0357):
//! - AA / CA: delivered; the message leaves the queue.
//! - AE / CE: the peer refuses the content: dead letter with the code, unless ERR-3 says
//!   206 (record locked) or 207 (application internal error), which pass: retried.
//! - AR / CR: the peer cannot take messages now (e.g. its system is down): retried with
//!   backoff, unless ERR-3 is 200..=205 (unsupported type, event, processing id, version,
//!   unknown or duplicate key), which a resend cannot fix: dead letter.
//! - no answer in `ack_timeout`, an answer for another MSH-10, a broken connection: the
//!   connection is dropped and the message is sent again after a backoff. Delivery is at
//!   least once; the receiver recognises a resend by MSH-3/MSH-4/MSH-10 (as this gateway's
//!   own listener does).
//!
//! Invariants: one message in flight per destination, queue order kept; nothing leaves the
//! queue without the peer's AA/CA or an explicit dead letter; no message content in logs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_hl7::charset::{self, CharsetOverride};
use gateway_hl7::mllp::{MllpDecoder, MllpEvent, encode_frame};
use gateway_hl7::record::Header;
use gateway_spool::{ObjectId, Spool, SpoolError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::link::{self, LinkError};
use crate::{
    Backoff, Idle, Metrics, RecordError, hold_while_paused, sleep_unless_shutdown, wait_for_work,
};

/// Settings of one HL7 destination, built by `gatewayd` from `[[uplink]]`.
#[derive(Debug, Clone)]
pub struct MllpSettings {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// TLS configuration (server CA and client identity); `None` for plain `mllp://`
    /// (refused in production by the config).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    /// How long the peer has to acknowledge a message.
    pub ack_timeout: Duration,
    /// Largest acknowledgement accepted.
    pub max_ack_bytes: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl MllpSettings {
    /// Defaults for everything but name, address and TLS.
    pub fn new(
        name: String,
        host: String,
        port: u16,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        Self {
            name,
            host,
            port,
            tls,
            connect_timeout: Duration::from_secs(15),
            ack_timeout: Duration::from_secs(30),
            max_ack_bytes: 64 * 1024,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// Why a message got no acknowledgement from the peer: the connection is dropped and the
/// message sent again after a backoff. `Display` is what `spool status` shows.
#[derive(Debug, thiserror::Error)]
pub enum MllpError {
    /// The connection could not be opened (TCP or TLS).
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("send failed: {source}")]
    Send {
        peer: String,
        source: std::io::Error,
    },
    #[error("receive failed: {source}")]
    Receive {
        peer: String,
        source: std::io::Error,
    },
    #[error("acknowledgement of {bytes} bytes is too large")]
    OversizedAck { peer: String, bytes: usize },
    #[error("the peer closed the connection without acknowledging")]
    Closed { peer: String },
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

/// The outcome of one delivery attempt.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Delivered,
    Refused(String),
    Retry(String),
}

/// The worker of one HL7 destination.
pub struct MllpUplinkService {
    settings: MllpSettings,
    spool: Spool,
    metrics: Metrics,
    conn: Option<(Box<dyn Stream>, MllpDecoder)>,
    /// Whether the open connection has carried an acknowledged message yet.
    proven: bool,
    /// `true` while the gateway is disabled: nothing is sent.
    paused: watch::Receiver<bool>,
}

impl std::fmt::Debug for MllpUplinkService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MllpUplinkService")
            .field("settings", &self.settings)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl MllpUplinkService {
    pub fn new(settings: MllpSettings, spool: Spool, metrics: Metrics) -> Self {
        Self {
            settings,
            spool,
            metrics,
            conn: None,
            proven: false,
            paused: watch::channel(false).1,
        }
    }

    /// Sends nothing while `paused` holds `true` (the message in hand is finished);
    /// messages stay queued. Without this call it never pauses.
    #[must_use]
    pub fn with_paused(mut self, paused: watch::Receiver<bool>) -> Self {
        self.paused = paused;
        self
    }

    /// Forwards the destination's queue until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let name = self.settings.name.clone();
        info!(destination = %name, peer = %format!("{}:{}", self.settings.host, self.settings.port), "HL7 forwarding started");
        let mut wake = self.spool.subscribe();
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let mut paused = self.paused.clone();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if *paused.borrow() {
                // The peer sees no half-used connection while the box is disabled.
                self.conn = None;
                if !hold_while_paused("HL7 forwarding", &name, &mut paused, &mut shutdown).await {
                    break;
                }
                continue;
            }
            let next = match self.next().await {
                Ok(next) => next,
                Err(e) => {
                    warn!(destination = %name, error = %e, "cannot read queued messages");
                    None
                }
            };
            let Some((id, message, control_id)) = next else {
                let idle = Duration::from_secs(30);
                if wait_for_work(&mut wake, &mut paused, &mut shutdown, idle).await
                    == Idle::Shutdown
                {
                    break;
                }
                continue;
            };
            let size = message.len() as u64;
            let answer = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                answer = self.deliver(&message, &control_id) => answer,
            };
            let failure = match answer {
                Answer::Delivered => {
                    self.metrics.count(&name, "sent", 1, size);
                    backoff.reset();
                    self.spool.set_destination_error(&name, None);
                    self.mark(id, None).await
                }
                Answer::Refused(reason) => {
                    warn!(destination = %name, object = %hex::encode(id), reason, "peer refused the message: dead letter");
                    self.metrics.count(&name, "failed", 1, size);
                    self.mark(id, Some(reason)).await
                }
                Answer::Retry(reason) => {
                    self.conn = None;
                    self.metrics.count(&name, "retry", 1, size);
                    warn!(destination = %name, reason, retry_in = ?backoff.step(), "forwarding failed; will retry");
                    self.spool.set_destination_error(&name, Some(reason));
                    if !sleep_unless_shutdown(backoff.failed(), &mut shutdown).await {
                        break;
                    }
                    Ok(())
                }
            };
            if let Err(e) = failure {
                warn!(destination = %name, error = %e, "cannot record delivery state");
            }
        }
        info!(destination = %name, "HL7 forwarding stopped");
    }

    /// The oldest queued message with its MSH-10 (a message without a readable header is
    /// dead-lettered: it cannot be matched to an acknowledgement).
    async fn next(&self) -> Result<Option<(ObjectId, Vec<u8>, String)>, SpoolError> {
        let spool = self.spool.clone();
        let name = self.settings.name.clone();
        tokio::task::spawn_blocking(move || {
            loop {
                let Some(id) = spool.queued(&name, 1)?.into_iter().next() else {
                    return Ok(None);
                };
                let (_, message) = match spool.read(&id) {
                    Ok(x) => x,
                    Err(e) => {
                        spool.mark_failed(&id, &name, &format!("unreadable in the spool: {e}"))?;
                        continue;
                    }
                };
                match Header::from_raw_frame(&message).map(|h| h.control_id) {
                    Some(control_id) if !control_id.is_empty() => {
                        return Ok(Some((id, message, control_id)));
                    }
                    _ => spool.mark_failed(&id, &name, "stored message has no readable MSH-10")?,
                }
            }
        })
        .await
        .unwrap_or(Ok(None))
    }

    async fn mark(&self, id: ObjectId, failure: Option<String>) -> Result<(), RecordError> {
        crate::record(&self.spool, &self.settings.name, id, failure).await
    }

    /// Sends one message and reads its acknowledgement.
    async fn deliver(&mut self, message: &[u8], control_id: &str) -> Answer {
        if self.conn.is_none() {
            match self.connect().await {
                Ok(conn) => {
                    self.conn = Some(conn);
                    self.proven = false;
                }
                Err(reason) => return Answer::Retry(reason.to_string()),
            }
        }
        let Some((stream, decoder)) = self.conn.as_mut() else {
            return Answer::Retry("not connected".into());
        };
        let started = Instant::now();
        let ack_timeout = self.settings.ack_timeout;
        let peer = || format!("{}:{}", self.settings.host, self.settings.port);
        let exchange = async {
            stream
                .write_all(&encode_frame(message))
                .await
                .map_err(|source| MllpError::Send {
                    peer: peer(),
                    source,
                })?;
            stream.flush().await.map_err(|source| MllpError::Send {
                peer: peer(),
                source,
            })?;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                while let Some(event) = decoder.next_event() {
                    match event {
                        MllpEvent::Frame(ack) => return Ok(ack),
                        MllpEvent::Garbage { .. } => {}
                        MllpEvent::Oversized { bytes } => {
                            return Err(MllpError::OversizedAck {
                                peer: peer(),
                                bytes,
                            });
                        }
                    }
                }
                let n = stream
                    .read(&mut buf)
                    .await
                    .map_err(|source| MllpError::Receive {
                        peer: peer(),
                        source,
                    })?;
                if n == 0 {
                    return Err(MllpError::Closed { peer: peer() });
                }
                decoder.feed(buf.get(..n).unwrap_or_default());
            }
        };
        let tls = self.settings.tls.is_some();
        let first = !self.proven;
        let ack = match tokio::time::timeout(ack_timeout, exchange).await {
            Ok(Ok(ack)) => ack,
            // In TLS 1.3 the client's handshake completes before the server has checked
            // the client certificate: a refusal shows as the first read failing.
            Ok(Err(reason)) if tls && first => {
                return Answer::Retry(format!(
                    "{reason} (first message on a new TLS connection: the peer may not trust this device's client certificate)"
                ));
            }
            Ok(Err(reason)) => return Answer::Retry(reason.to_string()),
            Err(_) => {
                return Answer::Retry(format!("no acknowledgement within {ack_timeout:?}"));
            }
        };
        debug!(destination = %self.settings.name, took = ?started.elapsed(), "acknowledgement received");
        self.proven = true;
        judge(&ack, control_id)
    }

    async fn connect(&self) -> Result<(Box<dyn Stream>, MllpDecoder), MllpError> {
        let s = &self.settings;
        let tcp = link::connect_tcp(&s.host, s.port, s.connect_timeout).await?;
        let decoder = MllpDecoder::new(s.max_ack_bytes);
        let Some(tls) = &s.tls else {
            return Ok((Box::new(tcp), decoder));
        };
        let stream = link::handshake(tls, &s.host, s.port, tcp, s.connect_timeout).await?;
        info!(destination = %s.name, "HL7 forwarding connected (TLS)");
        Ok((Box::new(stream), decoder))
    }
}

/// What an acknowledgement says about the message with `control_id`.
fn judge(ack: &[u8], control_id: &str) -> Answer {
    let Ok(decoded) = charset::decode(ack, CharsetOverride::Auto) else {
        return Answer::Retry("the acknowledgement cannot be decoded".into());
    };
    let Ok(msg) = gateway_hl7::parse(&decoded.text) else {
        return Answer::Retry("the acknowledgement is not an HL7 message".into());
    };
    let code = msg.get("MSA", 1, 1, 1, 1).unwrap_or_default().to_string();
    let acked = msg.get("MSA", 2, 1, 1, 1).unwrap_or_default();
    if acked != control_id {
        return Answer::Retry("the acknowledgement names another message (MSA-2)".into());
    }
    let err: Option<u16> = msg.get("ERR", 3, 1, 1, 1).and_then(|c| c.parse().ok());
    let with_err = |what: &str| match err {
        Some(e) => format!("{what} (MSA-1 {code}, ERR-3 {e})"),
        None => format!("{what} (MSA-1 {code})"),
    };
    match code.as_str() {
        "AA" | "CA" => Answer::Delivered,
        "AE" | "CE" if matches!(err, Some(206 | 207)) => {
            Answer::Retry(with_err("the peer could not take the message now"))
        }
        "AE" | "CE" => Answer::Refused(with_err("refused by the peer")),
        "AR" | "CR" if matches!(err, Some(200..=205)) => {
            Answer::Refused(with_err("rejected by the peer"))
        }
        "AR" | "CR" => Answer::Retry(with_err("the peer rejected the message for now")),
        _ => Answer::Retry("the acknowledgement has no valid MSA-1".into()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn ack(code: &str, control: &str, err: Option<&str>) -> Vec<u8> {
        let mut s = format!(
            "MSH|^~\\&|PEER|FAC|GW|CL|20261201000000||ACK^A08^ACK|X1|P|2.5\rMSA|{code}|{control}\r"
        );
        if let Some(e) = err {
            s.push_str(&format!("ERR|||{e}^text^HL70357|E\r"));
        }
        s.into_bytes()
    }

    #[test]
    fn acknowledgement_codes_decide_delivered_dead_letter_or_retry() {
        assert_eq!(judge(&ack("AA", "M1", None), "M1"), Answer::Delivered);
        assert_eq!(judge(&ack("CA", "M1", None), "M1"), Answer::Delivered);
        assert!(matches!(
            judge(&ack("AE", "M1", Some("101")), "M1"),
            Answer::Refused(r) if r.contains("ERR-3 101")
        ));
        assert!(matches!(
            judge(&ack("AE", "M1", Some("207")), "M1"),
            Answer::Retry(_)
        ));
        assert!(matches!(
            judge(&ack("AR", "M1", Some("200")), "M1"),
            Answer::Refused(_)
        ));
        assert!(matches!(
            judge(&ack("AR", "M1", None), "M1"),
            Answer::Retry(_)
        ));
        assert!(matches!(
            judge(&ack("CR", "M1", Some("207")), "M1"),
            Answer::Retry(_)
        ));
    }

    /// `spool status` shows these texts: they read as they did when they were strings.
    #[test]
    fn connection_errors_name_the_peer_as_before() {
        let peer = || "ris.example:2575".to_string();
        assert_eq!(
            MllpError::from(LinkError::ConnectTimeout { peer: peer() }).to_string(),
            "connecting to ris.example:2575 timed out"
        );
        assert_eq!(
            MllpError::from(LinkError::Connect {
                peer: peer(),
                source: std::io::ErrorKind::ConnectionRefused.into()
            })
            .to_string(),
            format!(
                "cannot connect to ris.example:2575: {}",
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
            )
        );
        assert_eq!(
            MllpError::OversizedAck {
                peer: peer(),
                bytes: 70_000
            }
            .to_string(),
            "acknowledgement of 70000 bytes is too large"
        );
        assert_eq!(
            MllpError::Closed { peer: peer() }.to_string(),
            "the peer closed the connection without acknowledging"
        );
    }

    #[test]
    fn acknowledgement_for_another_message_or_garbage_is_retried() {
        assert!(matches!(
            judge(&ack("AA", "M2", None), "M1"),
            Answer::Retry(_)
        ));
        assert!(matches!(judge(b"not hl7", "M1"), Answer::Retry(_)));
        assert!(matches!(
            judge(&ack("ZZ", "M1", None), "M1"),
            Answer::Retry(_)
        ));
    }

    /// Real MLLP peers on 127.0.0.1 for the worker, in mutual TLS with certificates from
    /// a throw-away CA and the same `gateway-tls` configurations the daemon builds.
    /// Also the syslog worker's tests' PKI ([`peers::Pki`]).
    pub(crate) mod peers {
        #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

        use std::path::Path;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        use std::time::{Duration, Instant};

        use gateway_hl7::mllp::{MllpDecoder, MllpEvent, encode_frame};
        use gateway_hl7::record::Header;
        use gateway_keystore::{KEY_LEN, MasterKey};
        use gateway_spool::{Committed, Limits, MessageIn, ObjectKind, Route, Spool};
        use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
        use tokio::sync::watch;

        use crate::Metrics;
        use crate::mllp::{MllpSettings, MllpUplinkService};

        /// PEM files of a CA, a server certificate for 127.0.0.1 and a client certificate.
        pub struct Pki {
            pub dir: tempfile::TempDir,
        }

        impl Pki {
            pub fn new() -> Self {
                let dir = tempfile::tempdir().unwrap();
                let ca_key = rcgen::KeyPair::generate().unwrap();
                let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                ca.distinguished_name
                    .push(rcgen::DnType::CommonName, "test CA");
                let ca_cert = ca.self_signed(&ca_key).unwrap();
                std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
                let issuer = rcgen::Issuer::new(ca, &ca_key);
                for (name, san, usage) in [
                    (
                        "server",
                        "127.0.0.1",
                        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                    ),
                    (
                        "client",
                        "gateway.test",
                        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
                    ),
                ] {
                    let key = rcgen::KeyPair::generate().unwrap();
                    let mut params = rcgen::CertificateParams::new(vec![san.to_string()]).unwrap();
                    params.extended_key_usages = vec![usage];
                    let cert = params.signed_by(&key, &issuer).unwrap();
                    std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
                    std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem())
                        .unwrap();
                }
                Self { dir }
            }

            fn path(&self, file: &str) -> std::path::PathBuf {
                self.dir.path().join(file)
            }

            pub fn server(&self) -> Arc<rustls::ServerConfig> {
                gateway_tls::server_config(
                    &self.path("server.pem"),
                    &self.path("server.key"),
                    Some(&self.path("ca.pem")),
                )
                .unwrap()
            }

            pub fn client(&self) -> Arc<rustls::ClientConfig> {
                gateway_tls::client_config(
                    &self.path("ca.pem"),
                    gateway_tls::ClientAuth::Files {
                        cert_file: self.path("client.pem"),
                        key_file: self.path("client.key"),
                    },
                )
                .unwrap()
            }
        }

        #[derive(Debug, Clone, Copy)]
        pub enum Mode {
            /// Acknowledges every message AA.
            Ack,
            /// Reads everything, answers nothing (not even a TLS handshake when plain).
            Silent,
        }

        /// An MLLP server on 127.0.0.1: the MSH-10s it received and how many connections
        /// it accepted. Stops with the test's runtime.
        pub struct Peer {
            pub port: u16,
            pub received: Arc<Mutex<Vec<String>>>,
            pub connections: Arc<AtomicUsize>,
        }

        impl Peer {
            pub async fn start(tls: Option<Arc<rustls::ServerConfig>>, mode: Mode) -> Self {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let port = listener.local_addr().unwrap().port();
                let received = Arc::new(Mutex::new(Vec::new()));
                let connections = Arc::new(AtomicUsize::new(0));
                let (r, c) = (Arc::clone(&received), Arc::clone(&connections));
                tokio::spawn(async move {
                    while let Ok((tcp, _)) = listener.accept().await {
                        c.fetch_add(1, Ordering::SeqCst);
                        let (r, tls) = (Arc::clone(&r), tls.clone());
                        tokio::spawn(async move {
                            match tls {
                                None => serve(tcp, mode, r).await,
                                Some(config) => {
                                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                                    if let Ok(stream) = acceptor.accept(tcp).await {
                                        serve(stream, mode, r).await;
                                    }
                                }
                            }
                        });
                    }
                });
                Self {
                    port,
                    received,
                    connections,
                }
            }

            pub fn received(&self) -> Vec<String> {
                self.received.lock().unwrap().clone()
            }
        }

        async fn serve(
            mut stream: impl AsyncRead + AsyncWrite + Unpin,
            mode: Mode,
            received: Arc<Mutex<Vec<String>>>,
        ) {
            let mut decoder = MllpDecoder::new(1 << 20);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                decoder.feed(&buf[..n]);
                while let Some(event) = decoder.next_event() {
                    let MllpEvent::Frame(frame) = event else {
                        continue;
                    };
                    let cid = Header::from_raw_frame(&frame).unwrap().control_id;
                    received.lock().unwrap().push(cid.clone());
                    if let Mode::Ack = mode {
                        let ack = format!(
                            "MSH|^~\\&|PEER|FAC|GW|CL|20261201000000||ACK|A{cid}|P|2.5\rMSA|AA|{cid}\r"
                        );
                        if stream
                            .write_all(&encode_frame(ack.as_bytes()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }

        /// A spool on `dir` with one HL7 route per name and `n` ORU^R01 messages queued
        /// for all of them; returns the spool and the messages' MSH-10s in order.
        pub fn spool_with_messages(dir: &Path, routes: &[&str], n: usize) -> (Spool, Vec<String>) {
            let routes = routes
                .iter()
                .map(|r| Route::new(*r, ObjectKind::Hl7))
                .collect();
            let limits = Limits {
                max_bytes: 1 << 40,
                min_free_bytes: 0,
            };
            let spool = Spool::open(
                dir,
                Some(MasterKey::from_bytes([7; KEY_LEN])),
                limits,
                routes,
            )
            .unwrap();
            let ids: Vec<String> = (0..n).map(|i| format!("ZZM{i:04}")).collect();
            let messages: Vec<MessageIn> = ids
                .iter()
                .map(|cid| MessageIn {
                    key: format!("ZZHIS|ZZHOSP|{cid}"),
                    message_type: "ORU^R01".into(),
                    charset: "ascii".into(),
                    source: "127.0.0.1".into(),
                    bytes: format!(
                        "MSH|^~\\&|ZZHIS|ZZHOSP|GATEWAY|ZZCLINIC|20261201120000||ORU^R01^ORU_R01|{cid}|P|2.5\rPID|1||ZZPID01\r"
                    )
                    .into_bytes(),
                })
                .collect();
            for r in spool.store_messages(&messages) {
                assert!(matches!(r, Ok(Committed::Stored(_))), "{r:?}");
            }
            assert!(spool.settle(Duration::from_secs(5)));
            (spool, ids)
        }

        pub fn settings(
            name: &str,
            port: u16,
            tls: Option<Arc<rustls::ClientConfig>>,
        ) -> MllpSettings {
            let mut s = MllpSettings::new(name.into(), "127.0.0.1".into(), port, tls);
            s.backoff_initial = Duration::from_millis(50);
            s.backoff_max = Duration::from_millis(200);
            s
        }

        /// Runs one worker per settings until `done` holds for the spool (or `limit`
        /// passes), then stops them; returns whether `done` held.
        pub async fn run_until(
            spool: &Spool,
            workers: Vec<MllpSettings>,
            limit: Duration,
            done: impl Fn(&gateway_spool::Status) -> bool,
        ) -> bool {
            let (stop, shutdown) = watch::channel(false);
            let handles: Vec<_> = workers
                .into_iter()
                .map(|s| {
                    let service = MllpUplinkService::new(s, spool.clone(), Metrics::default());
                    tokio::spawn(service.run(shutdown.clone()))
                })
                .collect();
            let deadline = Instant::now() + limit;
            let mut ok = false;
            while Instant::now() < deadline {
                let status = {
                    let spool = spool.clone();
                    tokio::task::spawn_blocking(move || spool.status())
                        .await
                        .unwrap()
                        .unwrap()
                };
                if done(&status) {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stop.send(true).unwrap();
            for h in handles {
                tokio::time::timeout(Duration::from_secs(10), h)
                    .await
                    .expect("the worker stops on shutdown")
                    .unwrap();
            }
            ok
        }
    }

    /// Three HL7 destinations take the same messages and their peers acknowledge them at
    /// the same moment: each destination ends with every message sent and nothing queued
    /// (a confirmation recorded by one worker must not undo another's: that left a message
    /// queued for good, with no error and no worker ever sending it again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn destinations_acknowledging_the_same_messages_together_all_finish() {
        use peers::*;
        const DESTS: [&str; 3] = ["emr", "ris", "archive"];
        const N: u64 = 300;
        let pki = Pki::new();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (spool, ids) = spool_with_messages(dir.path(), &DESTS, N as usize);
        let mut peers = Vec::new();
        let mut workers = Vec::new();
        for name in DESTS {
            let peer = Peer::start(Some(pki.server()), Mode::Ack).await;
            workers.push(settings(name, peer.port, Some(pki.client())));
            peers.push(peer);
        }
        let finished = |s: &gateway_spool::Status| {
            DESTS.iter().all(|d| {
                s.by_destination
                    .get(*d)
                    .is_some_and(|c| (c.sent, c.queued) == (N, 0))
            })
        };
        let ok = run_until(&spool, workers, Duration::from_secs(20), finished).await;
        let status = spool.status().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            ok,
            "not every message sent everywhere: {:?}",
            status.by_destination
        );
        for (name, peer) in DESTS.iter().zip(&peers) {
            assert_eq!(peer.received(), ids, "{name}: each message once, in order");
        }
        assert_eq!(status.by_state.get("sent"), Some(&N));
    }

    /// A peer that takes the connection and the message but never acknowledges: the worker
    /// gives up after `ack_timeout`, says so in `spool status`, reconnects and sends again;
    /// the message stays queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_never_acknowledges_is_given_up_on_after_the_ack_timeout() {
        use peers::*;
        let pki = Pki::new();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let peer = Peer::start(Some(pki.server()), Mode::Silent).await;
        let (spool, ids) = spool_with_messages(dir.path(), &["emr"], 1);
        let mut s = settings("emr", peer.port, Some(pki.client()));
        s.ack_timeout = Duration::from_millis(300);
        let started = Instant::now();
        let retried = |s: &gateway_spool::Status| {
            s.by_destination.get("emr").is_some_and(|c| {
                c.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("no acknowledgement within 300ms"))
            })
        };
        let ok = run_until(&spool, vec![s], Duration::from_secs(10), retried).await;
        assert!(ok, "no ack timeout reported");
        assert!(started.elapsed() >= Duration::from_millis(300));
        let status = spool.status().unwrap_or_else(|e| panic!("{e}"));
        let emr = status.by_destination.get("emr").map(|c| (c.queued, c.sent));
        assert_eq!(emr, Some((1, 0)), "the message stays queued");
        assert_eq!(peer.received().first(), ids.first(), "it was sent");
    }

    /// A peer that accepts the TCP connection but never answers the TLS handshake: the
    /// worker gives up after `connect_timeout` and retries on a new connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_never_finishes_the_tls_handshake_is_given_up_on() {
        use peers::*;
        let pki = Pki::new();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let peer = Peer::start(None, Mode::Silent).await;
        let (spool, _) = spool_with_messages(dir.path(), &["emr"], 1);
        let mut s = settings("emr", peer.port, Some(pki.client()));
        s.connect_timeout = Duration::from_millis(300);
        let connections = std::sync::Arc::clone(&peer.connections);
        let retried = move |s: &gateway_spool::Status| {
            connections.load(std::sync::atomic::Ordering::SeqCst) >= 2
                && s.by_destination.get("emr").is_some_and(|c| {
                    c.last_error.as_deref()
                        == Some(&*format!(
                            "TLS handshake with 127.0.0.1:{} timed out",
                            peer.port
                        ))
                })
        };
        let ok = run_until(&spool, vec![s], Duration::from_secs(10), retried).await;
        let status = spool.status().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            ok,
            "no handshake timeout and reconnect: {:?}",
            status.by_destination
        );
        let emr = status.by_destination.get("emr").map(|c| (c.queued, c.sent));
        assert_eq!(emr, Some((1, 0)));
    }
}
