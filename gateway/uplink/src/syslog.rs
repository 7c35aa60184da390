//! Audit messages to audit repositories (`kind = "syslog-tls"`): the spool's queued audit
//! messages of one destination (RFC 5424 syslog messages, rendered by the audit export)
//! go, oldest first (chain order), over one kept-open connection in mutual TLS (RFC 5425),
//! framed by octet counting (`MSG-LEN SP SYSLOG-MSG`), in batches.
//!
//! Syslog has no acknowledgement, so what "sent" means is this worker's rule. A message is
//! marked sent only when
//! 1. its batch was written and flushed to the connection;
//! 2. the socket's send queue then drained (`SIOCOUTQ` = 0, [`unacked_bytes`]): the
//!    repository's TCP acknowledged every byte written so far; and
//! 3. the connection stayed healthy for `confirm_after` after that while the worker kept
//!    writing or reading it (a repository that stops with unread data resets the
//!    connection; one that fails a client certificate after a TLS 1.3 handshake sends an
//!    alert): nothing only in a buffer, or in flight when the connection broke, is marked.
//!
//! The wait in 3 covers a repository (or a proxy before it) that reads its socket late: a
//! batch its TCP acknowledged but that it had not read when it stopped or the connection was
//! reset is lost to it, and the wait is what lets the worker see the reset first. Measured
//! with hw-tests/test_audit_syslog.py (rsyslog behind a resetting proxy, 10,000 messages,
//! nine faults): without the wait 34 messages were lost in a run; with 1 s, one in a run
//! where the test's proxy also closed every idle connection; with 2 s, one in 9 runs while
//! a timer could win over a failed connection in the watch (now the connection is read
//! first, and once more right before a confirmation), none in 10 runs since. A repository
//! that keeps the connection, acknowledges at TCP level and reads later than the wait, or
//! never, cannot be told from a healthy one: the sequenceId gap shows such a loss there,
//! and the audit trail on the box still has the record.
//!
//! Any connection error, or a send queue that does not drain within `write_timeout`, drops
//! the connection; after a backoff (bounded, with jitter) the worker reconnects and sends
//! again everything not marked sent, oldest first. A repeat carries the same
//! `[meta sequenceId="N"]` (the chain position) and the same bytes, so the repository can
//! tell it from a new message; a kill -9 of the gateway repeats the same way.
//!
//! Metrics: `gateway_uplink_sent_total{destination,result}` (sent; retry = messages that
//! were on a connection that failed before they were marked, or that could not be sent),
//! `gateway_uplink_queued{destination}`, `gateway_uplink_up{destination}`.

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_spool::{ObjectId, Spool, SpoolError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};

use crate::link::{self, LinkError};
use crate::{Backoff, Idle, Metrics, hold_while_paused, sleep_unless_shutdown, wait_for_work};

/// Settings of one audit repository, built by `gatewayd` from `[[uplink]]`.
#[derive(Debug, Clone)]
pub struct SyslogSettings {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Server CA and client identity (always TLS: there is no plaintext syslog uplink).
    pub tls: Arc<rustls::ClientConfig>,
    pub connect_timeout: Duration,
    /// How long a written batch may wait for the repository to take it (the send queue
    /// to drain) before the connection counts as broken.
    pub write_timeout: Duration,
    /// How long a connection must stay healthy after a batch drained before the batch is
    /// marked sent.
    pub confirm_after: Duration,
    /// Messages per batch (one write and flush).
    pub batch_max_messages: usize,
    /// Bytes per batch (a larger single message still goes, alone).
    pub batch_max_bytes: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl SyslogSettings {
    /// Defaults for everything but name, address and TLS.
    pub fn new(name: String, host: String, port: u16, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            name,
            host,
            port,
            tls,
            connect_timeout: Duration::from_secs(15),
            write_timeout: Duration::from_secs(30),
            confirm_after: Duration::from_secs(2),
            batch_max_messages: 500,
            batch_max_bytes: 4 * 1024 * 1024,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Why messages in flight were not confirmed: the connection is dropped and they are sent
/// again after a backoff. `Display` is what `spool status` shows (addresses only).
#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("send to {peer} failed: {source}")]
    Send {
        peer: String,
        source: std::io::Error,
    },
    /// `Display` has the cause chain: a TLS alert (e.g. a refused client certificate).
    #[error("connection to {peer} failed: {}", crate::describe(error))]
    Receive { peer: String, error: std::io::Error },
    #[error("the repository {peer} closed the connection")]
    Closed { peer: String },
    #[error("the repository {peer} did not take {bytes} written bytes within {waited:?}")]
    Stalled {
        peer: String,
        bytes: u64,
        waited: Duration,
    },
    #[error("cannot read the send queue of the connection to {peer}: {source}")]
    SendQueue {
        peer: String,
        source: std::io::Error,
    },
}

/// How many bytes written to `tcp` its peer has not acknowledged yet (`SIOCOUTQ`, the
/// unacknowledged part of the kernel's send queue; 0 when the peer's TCP has every byte).
#[allow(unsafe_code)]
pub fn unacked_bytes(tcp: &TcpStream) -> std::io::Result<u64> {
    // SIOCOUTQ is TIOCOUTQ on Linux (linux/sockios.h).
    nix::ioctl_read_bad!(siocoutq, nix::libc::TIOCOUTQ, nix::libc::c_int);
    let mut n: nix::libc::c_int = 0;
    // SAFETY: the descriptor is the open socket `tcp` borrows for this call, and `n` is a
    // valid `c_int` the kernel writes the count to.
    unsafe { siocoutq(tcp.as_fd().as_raw_fd(), &raw mut n) }.map_err(std::io::Error::from)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// One stored message ready to go: its id, its RFC 5425 frame.
struct Framed {
    id: ObjectId,
    frame: Vec<u8>,
}

/// Messages on the open connection, not yet marked sent.
#[derive(Default)]
struct InFlight {
    /// Written and flushed; the send queue has not drained since.
    written: Vec<(ObjectId, u64)>,
    /// When it was written (for `write_timeout`).
    written_at: Option<Instant>,
    /// Drained (all acknowledged by the repository's TCP) at that instant: marked sent
    /// once the connection stayed healthy for `confirm_after`.
    drained: VecDeque<(Instant, Vec<(ObjectId, u64)>)>,
}

impl InFlight {
    fn ids(&self) -> HashSet<ObjectId> {
        self.written
            .iter()
            .chain(self.drained.iter().flat_map(|(_, b)| b))
            .map(|(id, _)| *id)
            .collect()
    }

    fn len(&self) -> usize {
        self.written.len() + self.drained.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batches drained at least `after` ago.
    fn confirmed(&mut self, now: Instant, after: Duration) -> Vec<(ObjectId, u64)> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.drained.front() {
            if now.saturating_duration_since(*at) < after {
                break;
            }
            if let Some((_, batch)) = self.drained.pop_front() {
                out.extend(batch);
            }
        }
        out
    }

    /// When the oldest drained batch becomes due.
    fn next_due(&self, after: Duration) -> Option<Instant> {
        self.drained.front().map(|(at, _)| *at + after)
    }
}

/// The open connection and what is in flight on it.
struct Connection {
    stream: TlsStream<TcpStream>,
    in_flight: InFlight,
    /// Whether a batch was confirmed on it: the repository took this device's client
    /// certificate (in TLS 1.3 it may refuse it only after the client's handshake ended).
    proven: bool,
}

/// The worker of one audit repository.
pub struct SyslogUplinkService {
    settings: SyslogSettings,
    spool: Spool,
    metrics: Metrics,
    /// `true` while the gateway is disabled: nothing is sent.
    paused: watch::Receiver<bool>,
}

impl std::fmt::Debug for SyslogUplinkService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyslogUplinkService")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What one turn of the loop ended with.
enum Turn {
    /// Keep going at once.
    Again,
    /// Nothing to send or confirm: wait for a commit.
    Idle,
    /// The connection failed: `in_flight` messages go again after a backoff. `proven`:
    /// whether the connection had carried a confirmed batch.
    Failed {
        error: SyslogError,
        in_flight: usize,
        proven: bool,
    },
}

impl SyslogUplinkService {
    pub fn new(settings: SyslogSettings, spool: Spool, metrics: Metrics) -> Self {
        Self {
            settings,
            spool,
            metrics,
            paused: watch::channel(false).1,
        }
    }

    /// Sends nothing while `paused` holds `true` (the connection is closed; messages stay
    /// queued). Without this call it never pauses.
    #[must_use]
    pub fn with_paused(mut self, paused: watch::Receiver<bool>) -> Self {
        self.paused = paused;
        self
    }

    fn peer(&self) -> String {
        link::peer(&self.settings.host, self.settings.port)
    }

    /// Sends the destination's queue until `shutdown` turns true. What is in flight at
    /// shutdown is not marked: it goes again at the next start (same sequenceId).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.settings.name.clone();
        info!(destination = %name, peer = %self.peer(), "audit export to the repository started");
        let mut wake = self.spool.subscribe();
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let mut paused = self.paused.clone();
        let mut conn: Option<Connection> = None;
        self.metrics.set_up(&name, false);
        loop {
            if *shutdown.borrow() {
                break;
            }
            if *paused.borrow() {
                conn = None;
                self.metrics.set_up(&name, false);
                if !hold_while_paused("audit export", &name, &mut paused, &mut shutdown).await {
                    break;
                }
                continue;
            }
            let turn = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                turn = self.turn(&mut conn, &mut wake) => turn,
            };
            match turn {
                Turn::Again => {}
                Turn::Idle => {
                    let idle = Duration::from_secs(30);
                    if wait_for_work(&mut wake, &mut paused, &mut shutdown, idle).await
                        == Idle::Shutdown
                    {
                        break;
                    }
                }
                Turn::Failed {
                    error,
                    in_flight,
                    proven,
                } => {
                    conn = None;
                    self.metrics.set_up(&name, false);
                    self.metrics.count(&name, "retry", in_flight as u64, 0);
                    let reason = if proven || matches!(error, SyslogError::Link(_)) {
                        error.to_string()
                    } else {
                        format!(
                            "{error} (before anything was confirmed on a new TLS connection: the repository may not trust this device's client certificate)"
                        )
                    };
                    warn!(destination = %name, reason, in_flight, retry_in = ?backoff.step(),
                        "audit export failed; messages not yet confirmed go again");
                    self.spool.set_destination_error(&name, Some(reason));
                    if !sleep_unless_shutdown(backoff.failed(), &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            }
            if conn.as_ref().is_some_and(|c| c.proven) {
                backoff.reset();
            }
        }
        self.metrics.set_up(&name, false);
        info!(destination = %name, "audit export to the repository stopped");
    }

    /// One turn: mark what is confirmed, write the next batch when the last one drained,
    /// then watch the connection until the batch drains, a confirmation is due or the
    /// spool has something new.
    async fn turn(&self, conn: &mut Option<Connection>, wake: &mut watch::Receiver<u64>) -> Turn {
        let s = &self.settings;
        let now = Instant::now();
        if let Some(c) = conn.as_mut() {
            let due = c.in_flight.confirmed(now, s.confirm_after);
            if !due.is_empty() {
                // The connection must still be healthy now: a reset or alert that arrived
                // since the last look fails the batches instead of confirming them.
                if let Err(error) = self.check_now(c).await {
                    return Turn::Failed {
                        error,
                        in_flight: c.in_flight.len() + due.len(),
                        proven: c.proven,
                    };
                }
                c.proven = true;
                self.confirm(due).await;
            }
        }
        let written_pending = conn
            .as_ref()
            .is_some_and(|c| !c.in_flight.written.is_empty());
        if !written_pending {
            let exclude = conn.as_ref().map(|c| c.in_flight.ids()).unwrap_or_default();
            let batch = match self.next_batch(exclude).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(destination = %s.name, error = %e, "cannot read queued audit messages");
                    Vec::new()
                }
            };
            if batch.is_empty() && conn.as_ref().is_none_or(|c| c.in_flight.is_empty()) {
                return Turn::Idle;
            }
            if !batch.is_empty() {
                let n = batch.len();
                if conn.is_none() {
                    match self.connect().await {
                        Ok(c) => *conn = Some(c),
                        Err(error) => {
                            return Turn::Failed {
                                error,
                                in_flight: n,
                                proven: false,
                            };
                        }
                    }
                }
                let Some(c) = conn.as_mut() else {
                    return Turn::Idle;
                };
                if let Err(error) = self.write(c, batch).await {
                    return Turn::Failed {
                        error,
                        in_flight: c.in_flight.len() + n,
                        proven: c.proven,
                    };
                }
            }
        }
        let Some(c) = conn.as_mut() else {
            return Turn::Idle;
        };
        match self.watch(c, wake).await {
            Ok(()) => Turn::Again,
            Err(error) => Turn::Failed {
                error,
                in_flight: c.in_flight.len(),
                proven: c.proven,
            },
        }
    }

    /// Marks confirmed messages sent (on a blocking thread).
    async fn confirm(&self, due: Vec<(ObjectId, u64)>) {
        let name = self.settings.name.clone();
        let bytes: u64 = due.iter().map(|(_, b)| b).sum();
        let n = due.len() as u64;
        let ids: Vec<ObjectId> = due.into_iter().map(|(id, _)| id).collect();
        let spool = self.spool.clone();
        let marked = tokio::task::spawn_blocking(move || spool.mark_sent_all(&ids, &name))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match marked {
            Ok(()) => {
                self.metrics.count(&self.settings.name, "sent", n, bytes);
                self.spool.set_destination_error(&self.settings.name, None);
            }
            // They stay queued and go again (same sequenceId): a repeat, not a loss.
            Err(e) => warn!(destination = %self.settings.name, error = %e,
                "cannot record audit messages as sent; they will be sent again"),
        }
        if let Some(q) = self.spool.queued_count(&self.settings.name) {
            self.metrics.set_queued(&self.settings.name, q);
        }
    }

    /// The oldest queued messages not already on the connection, framed, up to the batch
    /// limits. An unreadable one is dead-lettered (it cannot be sent).
    async fn next_batch(&self, exclude: HashSet<ObjectId>) -> Result<Vec<Framed>, SpoolError> {
        let spool = self.spool.clone();
        let name = self.settings.name.clone();
        let (max_messages, max_bytes) = (
            self.settings.batch_max_messages.max(1),
            self.settings.batch_max_bytes,
        );
        let batch = tokio::task::spawn_blocking(move || {
            let ids = spool.queued(&name, exclude.len() + max_messages)?;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            let mut dead = 0u64;
            for id in ids.into_iter().filter(|id| !exclude.contains(id)) {
                let message = match spool.read(&id) {
                    Ok((_, m)) => m,
                    Err(e) => {
                        spool.mark_failed(&id, &name, &format!("unreadable in the spool: {e}"))?;
                        dead += 1;
                        continue;
                    }
                };
                if !out.is_empty() && bytes + message.len() > max_bytes {
                    break;
                }
                bytes += message.len();
                out.push(Framed {
                    id,
                    frame: frame(&message),
                });
                if out.len() >= max_messages {
                    break;
                }
            }
            Ok::<_, SpoolError>((out, dead))
        })
        .await
        .unwrap_or(Ok((Vec::new(), 0)))?;
        let (batch, dead) = batch;
        if dead > 0 {
            warn!(destination = %self.settings.name, messages = dead,
                "audit messages unreadable in the spool: dead letters");
            self.metrics.count(&self.settings.name, "failed", dead, 0);
        }
        if let Some(q) = self.spool.queued_count(&self.settings.name) {
            self.metrics.set_queued(&self.settings.name, q);
        }
        Ok(batch)
    }

    async fn connect(&self) -> Result<Connection, SyslogError> {
        let s = &self.settings;
        let tcp = link::connect_tcp(&s.host, s.port, s.connect_timeout).await?;
        let stream = link::handshake(&s.tls, &s.host, s.port, tcp, s.connect_timeout).await?;
        info!(destination = %s.name, "audit export connected (TLS)");
        self.metrics.set_up(&s.name, true);
        Ok(Connection {
            stream,
            in_flight: InFlight::default(),
            proven: false,
        })
    }

    /// Writes and flushes one batch (within `write_timeout`).
    async fn write(&self, c: &mut Connection, batch: Vec<Framed>) -> Result<(), SyslogError> {
        let mut buf = Vec::with_capacity(batch.iter().map(|f| f.frame.len()).sum());
        let mut ids = Vec::with_capacity(batch.len());
        for f in batch {
            buf.extend_from_slice(&f.frame);
            ids.push((f.id, f.frame.len() as u64));
        }
        let peer = || self.peer();
        let written = async {
            c.stream.write_all(&buf).await?;
            c.stream.flush().await
        };
        match tokio::time::timeout(self.settings.write_timeout, written).await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                return Err(SyslogError::Send {
                    peer: peer(),
                    source,
                });
            }
            Err(_) => {
                return Err(SyslogError::Stalled {
                    peer: peer(),
                    bytes: buf.len() as u64,
                    waited: self.settings.write_timeout,
                });
            }
        }
        c.in_flight.written.extend(ids);
        c.in_flight.written_at = Some(Instant::now());
        Ok(())
    }

    /// Reads what the connection has right now, without waiting: a close, a reset or a TLS
    /// alert is an error; anything else (the repository sends nothing) is ignored.
    async fn check_now(&self, c: &mut Connection) -> Result<(), SyslogError> {
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                biased;
                read = c.stream.read(&mut buf) => match read {
                    Ok(0) => return Err(SyslogError::Closed { peer: self.peer() }),
                    Ok(_) => {}
                    Err(error) => return Err(SyslogError::Receive { peer: self.peer(), error }),
                },
                () = std::future::ready(()) => return Ok(()),
            }
        }
    }

    /// Watches the connection for a short while: reads it (an alert, a reset or a close
    /// is an error; the repository sends nothing else), checks whether the written batch
    /// drained, and returns when it did, when a confirmation is due, when the spool
    /// committed something, or after a tick.
    async fn watch(
        &self,
        c: &mut Connection,
        wake: &mut watch::Receiver<u64>,
    ) -> Result<(), SyslogError> {
        let s = &self.settings;
        let peer = || self.peer();
        let tick = Duration::from_millis(5);
        let started = Instant::now();
        loop {
            let outq =
                unacked_bytes(c.stream.get_ref().0).map_err(|source| SyslogError::SendQueue {
                    peer: peer(),
                    source,
                })?;
            if !c.in_flight.written.is_empty() {
                if outq == 0 {
                    let batch = std::mem::take(&mut c.in_flight.written);
                    c.in_flight.written_at = None;
                    c.in_flight.drained.push_back((Instant::now(), batch));
                    return Ok(());
                }
                if let Some(at) = c.in_flight.written_at
                    && at.elapsed() > s.write_timeout
                {
                    return Err(SyslogError::Stalled {
                        peer: peer(),
                        bytes: outq,
                        waited: s.write_timeout,
                    });
                }
            }
            let until = if c.in_flight.written.is_empty() {
                match c.in_flight.next_due(s.confirm_after) {
                    Some(due) => due,
                    None => return Ok(()),
                }
            } else {
                Instant::now() + tick
            };
            let mut byte = [0u8; 512];
            tokio::select! {
                // The connection first: when it failed and a timer is due at once, the
                // failure wins (nothing is confirmed on a broken connection).
                biased;
                read = c.stream.read(&mut byte) => match read {
                    Ok(0) => return Err(SyslogError::Closed { peer: peer() }),
                    // RFC 5425: the server sends nothing; whatever it is, it is ignored.
                    Ok(_) => {}
                    Err(error) => return Err(SyslogError::Receive { peer: peer(), error }),
                },
                () = tokio::time::sleep_until(until.into()) => {
                    if c.in_flight.written.is_empty() {
                        return Ok(());
                    }
                }
                // Something new to send behind the batch that is draining: it waits for
                // this batch; a new batch once this one drained.
                _ = wake.changed(), if c.in_flight.written.is_empty() => return Ok(()),
            }
            if c.in_flight.written.is_empty() && started.elapsed() > s.confirm_after {
                return Ok(());
            }
        }
    }
}

/// RFC 5425 octet-counting framing: `MSG-LEN SP SYSLOG-MSG`.
fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = format!("{} ", message.len()).into_bytes();
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_octet_counted() {
        assert_eq!(frame(b"<85>1 - h a - - - x"), b"19 <85>1 - h a - - - x");
        let long = vec![b'x'; 70_000];
        let f = frame(&long);
        assert!(f.starts_with(b"70000 "));
        assert_eq!(f.len(), 70_006);
    }

    /// Real TLS repositories on 127.0.0.1 (rustls, mutual TLS with a throw-away CA: the
    /// MLLP tests' [`Pki`]) for the worker.
    mod peers {
        #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        use std::time::{Duration, Instant};

        use gateway_keystore::{KEY_LEN, MasterKey};
        use gateway_spool::{AuditIn, Limits, ObjectKind, Route, Spool};
        use tokio::io::{AsyncRead, AsyncReadExt};
        use tokio::sync::watch;

        use crate::Metrics;
        use crate::mllp::tests::peers::Pki;
        use crate::syslog::{SyslogSettings, SyslogUplinkService};

        /// What a repository connection does.
        #[derive(Debug, Clone, Copy)]
        enum Mode {
            /// Reads every frame.
            Read,
            /// The first connection reads `n` frames, then closes with unread data (a
            /// reset); later connections read everything.
            ResetFirstAfter(usize),
        }

        /// A syslog-over-TLS repository: the frames it read, in order.
        struct Repository {
            port: u16,
            received: Arc<Mutex<Vec<Vec<u8>>>>,
            connections: Arc<AtomicUsize>,
        }

        impl Repository {
            async fn start(tls: Arc<rustls::ServerConfig>, mode: Mode) -> Self {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let port = listener.local_addr().unwrap().port();
                let received = Arc::new(Mutex::new(Vec::new()));
                let connections = Arc::new(AtomicUsize::new(0));
                let (r, c) = (Arc::clone(&received), Arc::clone(&connections));
                tokio::spawn(async move {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let nth = c.fetch_add(1, Ordering::SeqCst);
                        let limit = match mode {
                            Mode::ResetFirstAfter(n) if nth == 0 => Some(n),
                            _ => None,
                        };
                        let (r, tls) = (Arc::clone(&r), Arc::clone(&tls));
                        tokio::spawn(async move {
                            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve(stream, limit, r).await;
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

            fn received(&self) -> Vec<Vec<u8>> {
                self.received.lock().unwrap().clone()
            }
        }

        /// Reads RFC 5425 frames (`LEN SP MSG`) until the end, or until `limit` frames,
        /// then drops the connection with whatever it has not read.
        async fn serve(
            mut stream: impl AsyncRead + Unpin,
            limit: Option<usize>,
            received: Arc<Mutex<Vec<Vec<u8>>>>,
        ) {
            let mut buf: Vec<u8> = Vec::new();
            let mut chunk = vec![0u8; 4096];
            let mut frames = 0;
            loop {
                while let Some(sp) = buf.iter().position(|b| *b == b' ') {
                    let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
                    if buf.len() < sp + 1 + len {
                        break;
                    }
                    let msg = buf[sp + 1..sp + 1 + len].to_vec();
                    buf.drain(..sp + 1 + len);
                    received.lock().unwrap().push(msg);
                    frames += 1;
                    if limit.is_some_and(|l| frames >= l) {
                        return;
                    }
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        }

        fn message(seq: u64) -> Vec<u8> {
            format!("<85>1 2026-12-06T00:00:00.000Z gw gatewayd - IHE+RFC-3881 [meta sequenceId=\"{seq}\"] <AuditMessage>{}</AuditMessage>", "x".repeat(300)).into_bytes()
        }

        fn spool_with_audit(dir: &std::path::Path, n: u64) -> Spool {
            let limits = Limits {
                max_bytes: 1 << 40,
                min_free_bytes: 0,
            };
            let routes = vec![Route::new("arr", ObjectKind::Audit).with_max_queued(1_000_000)];
            let spool = Spool::open(
                dir,
                Some(MasterKey::from_bytes([7; KEY_LEN])),
                limits,
                routes,
            )
            .unwrap();
            let items = (1..=n)
                .map(|seq| AuditIn {
                    seq,
                    bytes: message(seq),
                })
                .collect();
            assert!(spool.store_audit_messages(items).iter().all(Result::is_ok));
            assert!(spool.settle(Duration::from_secs(10)));
            spool
        }

        fn settings(pki: &Pki, port: u16) -> SyslogSettings {
            let mut s = SyslogSettings::new("arr".into(), "127.0.0.1".into(), port, pki.client());
            s.confirm_after = Duration::from_millis(200);
            s.batch_max_messages = 50;
            s.backoff_initial = Duration::from_millis(50);
            s.backoff_max = Duration::from_millis(200);
            s
        }

        /// Until the queue is empty and the worker counted all `n` sent.
        async fn until_sent(spool: &Spool, metrics: &Metrics, n: u64, within: Duration) {
            let deadline = Instant::now() + within;
            while spool.queued_count("arr") != Some(0) || metrics.sent_to("arr") < n {
                assert!(
                    Instant::now() < deadline,
                    "still queued: {:?}, sent {}",
                    spool.queued_count("arr"),
                    metrics.sent_to("arr")
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// 300 messages over one connection: each arrives once, octet-counted, in chain
        /// order; the queue ends empty and the metrics count them sent.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn messages_arrive_once_in_order_and_leave_the_queue() {
            let pki = Pki::new();
            let repo = Repository::start(pki.server(), Mode::Read).await;
            let dir = tempfile::tempdir().unwrap();
            let spool = spool_with_audit(dir.path(), 300);
            let metrics = Metrics::default();
            let (stop, shutdown) = watch::channel(false);
            let worker = tokio::spawn(
                SyslogUplinkService::new(settings(&pki, repo.port), spool.clone(), metrics.clone())
                    .run(shutdown),
            );
            until_sent(&spool, &metrics, 300, Duration::from_secs(20)).await;
            let got = repo.received();
            assert_eq!(got, (1..=300).map(message).collect::<Vec<_>>());
            assert_eq!(repo.connections.load(Ordering::SeqCst), 1);
            assert_eq!(metrics.sent_to("arr"), 300);
            assert!(spool.queued("arr", 10).unwrap().is_empty());
            stop.send(true).unwrap();
            worker.await.unwrap();
        }

        /// The repository drops the first connection with data unread (a reset): nothing
        /// it did not read was marked sent; everything arrives, repeats byte-identical,
        /// the first connection's frames a prefix of the chain.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_reset_connection_sends_everything_unconfirmed_again() {
            let pki = Pki::new();
            let repo = Repository::start(pki.server(), Mode::ResetFirstAfter(70)).await;
            let dir = tempfile::tempdir().unwrap();
            let spool = spool_with_audit(dir.path(), 300);
            let metrics = Metrics::default();
            let (stop, shutdown) = watch::channel(false);
            let worker = tokio::spawn(
                SyslogUplinkService::new(settings(&pki, repo.port), spool.clone(), metrics.clone())
                    .run(shutdown),
            );
            until_sent(&spool, &metrics, 300, Duration::from_secs(20)).await;
            let got = repo.received();
            assert!(repo.connections.load(Ordering::SeqCst) >= 2);
            assert_eq!(&got[..70], (1..=70).map(message).collect::<Vec<_>>());
            // After the reset the second connection starts again at the oldest message
            // not marked sent (at or before 71) and goes on in order to the end.
            let rest = &got[70..];
            let first = rest[0].clone();
            let start = (1..=300u64).find(|s| message(*s) == first).unwrap();
            assert!(start <= 71, "nothing unread was marked: resumed at {start}");
            assert_eq!(rest, (start..=300).map(message).collect::<Vec<_>>());
            assert_eq!(metrics.sent_to("arr"), 300);
            stop.send(true).unwrap();
            worker.await.unwrap();
        }
    }

    #[test]
    fn in_flight_batches_are_confirmed_only_after_the_wait() {
        let mut f = InFlight::default();
        let a = ObjectId::from_bytes([1; 16]);
        let b = ObjectId::from_bytes([2; 16]);
        let t0 = Instant::now();
        f.drained.push_back((t0, vec![(a, 10)]));
        f.drained
            .push_back((t0 + Duration::from_millis(500), vec![(b, 20)]));
        assert!(f.confirmed(t0, Duration::from_secs(1)).is_empty());
        assert_eq!(
            f.confirmed(t0 + Duration::from_secs(1), Duration::from_secs(1)),
            [(a, 10)]
        );
        assert_eq!(f.len(), 1);
        assert!(f.ids().contains(&b));
        assert_eq!(
            f.next_due(Duration::from_secs(1)),
            Some(t0 + Duration::from_millis(1500))
        );
    }
}
