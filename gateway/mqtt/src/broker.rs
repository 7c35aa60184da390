//! Where a session connects: the broker's host and port from its `mqtt://` / `mqtts://`
//! URL, and the gateway's rustls client configuration for `mqtts://` ([`Broker`]); and the
//! one place that turns a `[fleet]` or `[exchange]` section into that configuration
//! ([`BrokerTls`]: the broker checked against `ca_file` only, the gateway authenticated
//! with the key store's device identity and its installed certificate, or certificate
//! files in development).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gateway_config::{BrokerUrl, ClientAuth};
use gateway_keystore::DeviceIdentity;
use tracing::warn;

/// A broker URL that cannot be connected to as configured.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{url}: no host:port")]
    NoHostPort { url: String },
    #[error("{url}: an mqtts:// broker needs a TLS client configuration")]
    TlsRequired { url: String },
    #[error("{url}: a plaintext mqtt:// broker takes no TLS client configuration")]
    TlsOnPlaintext { url: String },
}

/// The broker of one session: host, port and (for `mqtts://`) the TLS client configuration
/// made by `gateway-tls`.
#[derive(Clone)]
pub struct Broker {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Broker {
    /// The broker at `url` (port 8883 for `mqtts://`, 1883 for `mqtt://` unless given).
    /// `mqtts://` needs `tls`; plaintext `mqtt://` (development only) must not have one.
    pub fn new(
        url: &BrokerUrl,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Broker, BrokerError> {
        let (host, port) = url.host_port().ok_or_else(|| BrokerError::NoHostPort {
            url: url.to_string(),
        })?;
        match (url.is_plaintext(), tls.is_some()) {
            (false, false) => Err(BrokerError::TlsRequired {
                url: url.to_string(),
            }),
            (true, true) => Err(BrokerError::TlsOnPlaintext {
                url: url.to_string(),
            }),
            _ => Ok(Broker { host, port, tls }),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the connection is TLS (`mqtts://`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub(crate) fn tls(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.tls.as_ref()
    }
}

/// `host:port`.
impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A `[fleet]` / `[exchange]` broker that cannot be set up; each message starts with the
/// configuration key it is about.
#[derive(Debug, thiserror::Error)]
pub enum BrokerTlsError {
    #[error("{section}.ca_file: required for an mqtts:// broker")]
    CaFileMissing { section: &'static str },
    #[error(
        "{section}: client_auth = \"keystore\" needs a key store with a device identity (keystore.backend = \"tpm\")"
    )]
    NoIdentity { section: &'static str },
    #[error("{section}: client_auth = \"files\" needs cert_file and key_file")]
    FilesMissing { section: &'static str },
    #[error("{section}: {source}")]
    Tls {
        section: &'static str,
        source: gateway_tls::TlsError,
    },
    #[error("{section}.broker {source}")]
    Broker {
        section: &'static str,
        source: BrokerError,
    },
}

/// One section's broker settings, as parsed (`[fleet]` or `[exchange]`).
#[derive(Debug, Clone, Copy)]
pub struct BrokerTls<'a> {
    /// `fleet` or `exchange`, for messages.
    pub section: &'static str,
    pub broker: &'a BrokerUrl,
    pub ca_file: Option<&'a PathBuf>,
    pub client_auth: ClientAuth,
    pub cert_file: Option<&'a PathBuf>,
    pub key_file: Option<&'a PathBuf>,
}

impl<'a> BrokerTls<'a> {
    /// The broker of `[fleet]`.
    pub fn fleet(fleet: &'a gateway_config::Fleet) -> BrokerTls<'a> {
        BrokerTls {
            section: "fleet",
            broker: &fleet.broker,
            ca_file: fleet.ca_file.as_ref(),
            client_auth: fleet.client_auth,
            cert_file: fleet.cert_file.as_ref(),
            key_file: fleet.key_file.as_ref(),
        }
    }

    /// The regional broker of `[exchange]`.
    pub fn exchange(exchange: &'a gateway_config::Exchange) -> BrokerTls<'a> {
        BrokerTls {
            section: "exchange",
            broker: &exchange.broker,
            ca_file: exchange.ca_file.as_ref(),
            client_auth: exchange.client_auth,
            cert_file: exchange.cert_file.as_ref(),
            key_file: exchange.key_file.as_ref(),
        }
    }

    /// The TLS client configuration; `None` for a development `mqtt://` broker (with a
    /// warning). Reads the CA, the certificate chain or the key files: call it at start,
    /// not on an async worker in steady state.
    pub fn client_config(
        &self,
        identity: Option<Arc<dyn DeviceIdentity>>,
        data_dir: &Path,
    ) -> Result<Option<Arc<rustls::ClientConfig>>, BrokerTlsError> {
        let section = self.section;
        if self.broker.is_plaintext() {
            warn!(section, broker = %self.broker, "MQTT broker over plaintext mqtt:// (development mode only)");
            return Ok(None);
        }
        let ca_file = self
            .ca_file
            .ok_or(BrokerTlsError::CaFileMissing { section })?;
        let tls = |source| BrokerTlsError::Tls { section, source };
        let auth = match self.client_auth {
            ClientAuth::Keystore => {
                let identity = identity.ok_or(BrokerTlsError::NoIdentity { section })?;
                let chain = gateway_tls::installed_chain(data_dir).map_err(tls)?;
                gateway_tls::ClientAuth::Identity { identity, chain }
            }
            ClientAuth::Files => match (self.cert_file, self.key_file) {
                (Some(cert_file), Some(key_file)) => gateway_tls::ClientAuth::Files {
                    cert_file: cert_file.clone(),
                    key_file: key_file.clone(),
                },
                _ => return Err(BrokerTlsError::FilesMissing { section }),
            },
        };
        gateway_tls::client_config(ca_file, auth)
            .map(Some)
            .map_err(tls)
    }

    /// The broker with its TLS client configuration ([`BrokerTls::client_config`]).
    pub fn broker(
        &self,
        identity: Option<Arc<dyn DeviceIdentity>>,
        data_dir: &Path,
    ) -> Result<Broker, BrokerTlsError> {
        self.at(self.client_config(identity, data_dir)?)
    }

    /// This section's broker with a TLS configuration made elsewhere (the fleet's claim
    /// credential).
    pub fn at(&self, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Broker, BrokerTlsError> {
        Broker::new(self.broker, tls).map_err(|source| BrokerTlsError::Broker {
            section: self.section,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> BrokerUrl {
        s.parse().unwrap()
    }

    /// A client configuration for tests only (the gateway's come from `gateway-tls`).
    #[allow(clippy::disallowed_methods)]
    fn any_tls() -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    }

    #[test]
    fn urls_give_host_and_port_with_the_scheme_default() {
        let b = Broker::new(&url("mqtts://broker.example:8884"), Some(any_tls())).unwrap();
        assert_eq!(
            (b.host(), b.port(), b.is_tls()),
            ("broker.example", 8884, true)
        );
        let b = Broker::new(&url("mqtts://broker.example"), Some(any_tls())).unwrap();
        assert_eq!(b.port(), 8883);
        let b = Broker::new(&url("mqtt://127.0.0.1"), None).unwrap();
        assert_eq!(
            (b.to_string(), b.is_tls()),
            ("127.0.0.1:1883".to_owned(), false)
        );
        let b = Broker::new(&url("mqtt://[::1]:1884/path"), None).unwrap();
        assert_eq!((b.host(), b.port()), ("::1", 1884));
    }

    #[test]
    fn mqtts_needs_tls_and_plaintext_takes_none() {
        assert!(matches!(
            Broker::new(&url("mqtts://b:8883"), None),
            Err(BrokerError::TlsRequired { .. })
        ));
        assert!(matches!(
            Broker::new(&url("mqtt://b:1883"), Some(any_tls())),
            Err(BrokerError::TlsOnPlaintext { .. })
        ));
        assert!(matches!(
            Broker::new(&url("mqtt://b:0"), None),
            Err(BrokerError::NoHostPort { .. })
        ));
        assert!(
            format!(
                "{:?}",
                Broker::new(&url("mqtts://b"), Some(any_tls())).unwrap()
            )
            .contains("tls: true")
        );
    }

    #[test]
    fn section_problems_name_their_configuration_key() {
        let broker = url("mqtts://b:8883");
        let mut t = BrokerTls {
            section: "exchange",
            broker: &broker,
            ca_file: None,
            client_auth: ClientAuth::Files,
            cert_file: None,
            key_file: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let e = t.broker(None, dir.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "exchange.ca_file: required for an mqtts:// broker"
        );
        let ca = dir.path().join("ca.pem");
        t.ca_file = Some(&ca);
        let e = t.broker(None, dir.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "exchange: client_auth = \"files\" needs cert_file and key_file"
        );
        t.client_auth = ClientAuth::Keystore;
        let e = t.broker(None, dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("exchange: client_auth = \"keystore\" needs")
        );
        let plain = url("mqtt://b:0");
        t.broker = &plain;
        let e = t.broker(None, dir.path()).unwrap_err();
        assert_eq!(e.to_string(), "exchange.broker mqtt://b:0: no host:port");
    }
}
