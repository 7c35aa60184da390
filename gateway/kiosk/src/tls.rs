//! HTTPS for the kiosk: a rustls listener that `axum::serve` can drive, and the development
//! certificate.
//!
//! Handshakes run in their own tasks with a time limit, so a client that never finishes one
//! holds up nobody else; only completed TLS connections reach the HTTP server. Accepted
//! connections have `TCP_NODELAY` set, so an answer never waits for a delayed ACK (which
//! made equal login refusals take 18 or 44 ms at random).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use gateway_durable as durable;

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted TLS connections, for `axum::serve`.
#[derive(Debug)]
pub struct TlsListener {
    local: SocketAddr,
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    /// Starts accepting on `listener`; the accept task ends with the listener's owner.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(error = %e, "kiosk accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                // Small answers (a login's 401) go out at once: with Nagle, a small write
                // after an unacknowledged one waits for the client's delayed ACK (40 ms).
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "kiosk TLS handshake failed"),
                        Err(_) => debug!(%peer, "kiosk TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { local, rx })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task is gone: no connection will ever come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Kiosk certificate problems.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Io(#[from] durable::Error),
    #[error(transparent)]
    Tls(#[from] gateway_tls::TlsError),
    #[error("kiosk certificate: {0}")]
    Bad(String),
}

/// A server config for `cert_pem` / `key_pem` (PKCS#8 or any key rustls reads), with ALPN
/// `http/1.1`; built by [`gateway_tls::server_config_pem`].
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, CertError> {
    Ok(gateway_tls::server_config_pem(
        cert_pem,
        key_pem,
        Path::new("kiosk certificate"),
        &[b"http/1.1"],
    )?)
}

/// Development mode without `booking.cert_file`: a self-signed certificate for `names`,
/// made at first start in `dir` (`kiosk-cert.pem`, `kiosk-key.pem`, 0600) and reused after.
pub fn development_certificate(
    dir: &Path,
    names: &[String],
) -> Result<(Vec<u8>, Vec<u8>), CertError> {
    durable::ensure_private_dir(dir)?;
    let cert_path = dir.join("kiosk-cert.pem");
    let key_path = dir.join("kiosk-key.pem");
    if let (Ok(c), Ok(k)) = (std::fs::read(&cert_path), std::fs::read(&key_path)) {
        return Ok((c, k));
    }
    let made = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| CertError::Bad(e.to_string()))?;
    let cert = made.cert.pem().into_bytes();
    let key = made.signing_key.serialize_pem().into_bytes();
    durable::write_atomic(&key_path, &key)?;
    durable::write_atomic(&cert_path, &cert)?;
    Ok((cert, key))
}

/// Parses a PKCS#8 DER key (for tests that build configs in memory).
pub fn pkcs8(der: Vec<u8>) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))
}
