//! Opening a kept-open TCP connection, in TLS when configured: the part the MLLP and
//! syslog workers share ([`connect_tcp`], [`handshake`], [`LinkError`]).

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::describe;

/// Why a connection could not be opened. `Display` is what `spool status` shows; it names
/// the peer's address, never message content.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connecting to {peer} timed out")]
    ConnectTimeout {
        /// `host:port` of the destination.
        peer: String,
    },
    #[error("cannot connect to {peer}: {source}")]
    Connect {
        peer: String,
        source: std::io::Error,
    },
    #[error("invalid server name {host}: {source}")]
    ServerName {
        host: String,
        source: rustls_pki_types::InvalidDnsNameError,
    },
    #[error("TLS handshake with {peer} timed out")]
    HandshakeTimeout { peer: String },
    /// `Display` is the whole cause chain: a TLS alert says why the handshake failed.
    #[error("TLS handshake failed: {}", describe(error))]
    Handshake { peer: String, error: std::io::Error },
}

/// `host:port`, for errors and logs.
pub(crate) fn peer(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

/// A TCP connection to `host:port` within `timeout`, with Nagle off (small frames go now).
pub(crate) async fn connect_tcp(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, LinkError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| LinkError::ConnectTimeout {
            peer: peer(host, port),
        })?
        .map_err(|source| LinkError::Connect {
            peer: peer(host, port),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The TLS handshake over `tcp` with `tls` (server CA and client identity), the server
/// checked against `host`, within `timeout`.
pub(crate) async fn handshake(
    tls: &Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, LinkError> {
    let server_name =
        ServerName::try_from(host.to_string()).map_err(|source| LinkError::ServerName {
            host: host.to_string(),
            source,
        })?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
    tokio::time::timeout(timeout, connector.connect(server_name, tcp))
        .await
        .map_err(|_| LinkError::HandshakeTimeout {
            peer: peer(host, port),
        })?
        .map_err(|error| LinkError::Handshake {
            peer: peer(host, port),
            error,
        })
}
