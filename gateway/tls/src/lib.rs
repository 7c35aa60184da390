//! TLS client identity of the gateway.
//!
//! Every outbound mutual-TLS connection (the cloud uplink, later the fleet broker) is made
//! with a rustls `ClientConfig` from [`client_config`]. In `keystore` mode the client
//! certificate's private key never leaves the key store: [`IdentitySigningKey`] implements
//! rustls' `SigningKey` by asking the key store (the TPM) to sign each handshake.
//!
//! - [`csr_pem`]: a PKCS#10 request signed by the device identity (`gatewayd keys csr`).
//! - [`install_certificate`]: stores the issued certificate (chain) after checking it
//!   certifies the device identity's public key (`gatewayd keys install-cert`).
//! - [`server_config`] (certificate and key files, optional client CA: the MLLP listener)
//!   and [`server_config_pem`] (PEM bytes and ALPN: the kiosk's HTTPS) build every rustls
//!   server configuration of the gateway; no other crate builds one.
//! - [`check`]: a handshake and one HTTP request (`gatewayd keys check-tls`), so an
//!   installer can prove the box can authenticate to its cloud before leaving the site.
//!
//! - [`server_config_identity`]: a listener whose certificate is the installed device
//!   certificate and whose key is the device identity (the TPM signs each handshake): the
//!   DICOM TLS listener without certificate files.
//! - [`peer_names`]: a verified client certificate's names (DNS SANs, then the subject CN),
//!   the peer identity allow lists match against.
//!
//! Invariants: every configuration uses [`provider`]: TLS 1.3, and TLS 1.2 only with
//! [`PROFILE_CIPHER_SUITES`] (ECDHE with AEAD: the PS3.15 "BCP 195 RFC 8996" profile, RFC
//! 9325: no TLS 1.0/1.1, no CBC, no RSA key exchange, no static DH); the server is verified
//! against the configured CA file only.

// The one crate allowed to build rustls configurations (see clippy.toml `disallowed-methods`).
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gateway_keystore::DeviceIdentity;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::cipher_suite;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{
    ClientConfig, RootCertStore, SignatureAlgorithm, SignatureScheme, SupportedCipherSuite,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The cipher suites of every TLS configuration the gateway builds: the PS3.15 "BCP 195
/// RFC 8996" profile (RFC 9325 section 4.2): TLS 1.3's AEAD suites, and for TLS 1.2 only
/// ECDHE key exchange with AES-GCM or ChaCha20-Poly1305. No CBC, no RSA key exchange, no
/// static DH, no NULL/EXPORT/RC4/3DES (rustls implements none of them either).
pub static PROFILE_CIPHER_SUITES: &[SupportedCipherSuite] = &[
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// The protocol versions of every configuration: TLS 1.3 and 1.2 (RFC 8996: no 1.0/1.1).
static PROFILE_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The crypto provider of every configuration: aws-lc-rs with [`PROFILE_CIPHER_SUITES`].
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: PROFILE_CIPHER_SUITES.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

/// Where the installed device certificate (PEM chain, leaf first) lives.
pub fn certificate_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("device.crt")
}

/// TLS identity failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("the key store has no device identity key (keystore.backend = \"tpm\" has one)")]
    NoIdentity,
    #[error(
        "no device certificate at {path}: run `gatewayd keys csr`, have it signed, then \
         `gatewayd keys install-cert`"
    )]
    NoCertificate { path: PathBuf },
    #[error("the certificate does not certify this device's identity key")]
    WrongKey,
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("CSR: {0}")]
    Csr(String),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("bad URL {url:?}: {reason}")]
    Url { url: String, reason: &'static str },
    #[error("{stage} {host}:{port}: {detail}")]
    Connect {
        stage: &'static str,
        host: String,
        port: u16,
        detail: String,
    },
}

/// How the client authenticates.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// The key store's device identity with the installed certificate chain.
    Identity {
        identity: Arc<dyn DeviceIdentity>,
        chain: Vec<CertificateDer<'static>>,
    },
    /// Development: a certificate and private key from files.
    Files {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

/// rustls signing key backed by the device identity (ECDSA P-256, SHA-256).
#[derive(Debug)]
pub struct IdentitySigningKey(Arc<dyn DeviceIdentity>);

impl SigningKey for IdentitySigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(IdentitySigner(Arc::clone(&self.0))) as Box<dyn Signer>)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct IdentitySigner(Arc<dyn DeviceIdentity>);

impl Signer for IdentitySigner {
    /// rustls signs inside the handshake, on whatever thread polls it: a tokio worker for
    /// every listener and client of the gateway. The key store's signature is blocking I/O
    /// (the TPM), so on a multi-threaded runtime the worker hands its other tasks over while
    /// it waits (`block_in_place`); elsewhere (a current-thread runtime, no runtime) it signs
    /// directly.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let sign = || {
            self.0
                .sign_sha256(message)
                .map_err(|e| rustls::Error::General(format!("device identity signature: {e}")))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(sign)
            }
            _ => sign(),
        }
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

#[derive(Debug)]
struct IdentityResolver(Arc<CertifiedKey>);

impl ResolvesClientCert for IdentityResolver {
    fn resolve(&self, _hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        schemes
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The rustls client configuration: server verified against `ca_file` only.
pub fn client_config(ca_file: &Path, auth: ClientAuth) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: ca_file.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROFILE_VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let config = match auth {
        ClientAuth::Identity { identity, chain } => {
            let key: Arc<dyn SigningKey> = Arc::new(IdentitySigningKey(identity));
            builder.with_client_cert_resolver(Arc::new(IdentityResolver(Arc::new(
                CertifiedKey::new(chain, key),
            ))))
        }
        ClientAuth::Files {
            cert_file,
            key_file,
        } => {
            let chain = read_certs(&cert_file)?;
            let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| TlsError::Pem {
                path: key_file.clone(),
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(e.to_string()))?
        }
    };
    Ok(Arc::new(config))
}

/// A rustls server configuration for the gateway's own TLS listeners (e.g. MLLP): the
/// certificate chain and key from PEM files; with `client_ca`, every client must present a
/// certificate issued by it. TLS 1.3, and 1.2 with rustls' AEAD/ECDHE suites only.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Pem {
        path: key_file.to_path_buf(),
        reason: e.to_string(),
    })?;
    let config = server_builder(client_ca)?
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A rustls server configuration whose certificate is the installed device certificate
/// chain (`chain`, leaf first, see [`installed_chain`]) and whose private key is the device
/// identity: the key store (the TPM) signs each handshake, ECDSA P-256 with SHA-256 (so TLS
/// 1.2 clients get the ECDHE_ECDSA suites). With `client_ca`, as [`server_config`].
pub fn server_config_identity(
    identity: Arc<dyn DeviceIdentity>,
    chain: Vec<CertificateDer<'static>>,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let key: Arc<dyn SigningKey> = Arc::new(IdentitySigningKey(identity));
    let certified = Arc::new(CertifiedKey::new(chain, key));
    let config =
        server_builder(client_ca)?.with_cert_resolver(Arc::new(IdentityServerResolver(certified)));
    Ok(Arc::new(config))
}

/// The profile's server builder up to the certificate: no client authentication, or client
/// certificates REQUIRED and verified against `client_ca` only.
fn server_builder(
    client_ca: Option<&Path>,
) -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>, TlsError>
{
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(PROFILE_VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    path: ca.to_path_buf(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    })
}

#[derive(Debug)]
struct IdentityServerResolver(Arc<CertifiedKey>);

impl ResolvesServerCert for IdentityServerResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .signature_schemes()
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Arc::clone(&self.0))
    }
}

/// The names of a (verified) peer certificate, as allow lists match them: its DNS subject
/// alternative names in order, then its subject common name(s). Empty for a certificate that
/// does not parse or names nothing.
pub fn peer_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_string());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str()
            && !names.iter().any(|n| n == cn)
        {
            names.push(cn.to_string());
        }
    }
    names
}

/// A rustls server configuration from PEM bytes held in memory (the kiosk's certificate:
/// `booking.cert_file` or the development one), without client authentication and with
/// the given ALPN protocols (e.g. `http/1.1`). `origin` names the PEM in errors. TLS 1.3,
/// and 1.2 with rustls' AEAD/ECDHE suites only.
pub fn server_config_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    origin: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = parse_certs(cert_pem, origin)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        path: origin.to_path_buf(),
        reason: format!("private key: {e}"),
    })?;
    let mut config = server_builder(None)?
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = fs::read(path).map_err(|source| TlsError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    parse_certs(&bytes, path)
}

/// Every certificate of PEM bytes; at least one. `origin` names them in errors.
fn parse_certs(bytes: &[u8], origin: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: origin.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: origin.to_path_buf(),
            reason: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

/// The installed device certificate chain.
pub fn installed_chain(data_dir: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = certificate_path(data_dir);
    if !path.exists() {
        return Err(TlsError::NoCertificate { path });
    }
    read_certs(&path)
}

struct CsrKey {
    identity: Arc<dyn DeviceIdentity>,
    point: Vec<u8>,
}

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for CsrKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.identity
            .sign_sha256(msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// A PKCS#10 certificate request for the device identity, subject CN = `common_name`.
pub fn csr_pem(identity: Arc<dyn DeviceIdentity>, common_name: &str) -> Result<String, TlsError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let point = identity.public_key();
    let key = CsrKey { identity, point };
    params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| TlsError::Csr(e.to_string()))
}

/// Stores an issued certificate (PEM, leaf first) after checking that its public key is
/// the device identity's.
pub fn install_certificate(
    data_dir: &Path,
    identity: &dyn DeviceIdentity,
    pem_file: &Path,
) -> Result<(), TlsError> {
    let bytes = fs::read(pem_file).map_err(|source| TlsError::Io {
        action: "read",
        path: pem_file.to_path_buf(),
        source,
    })?;
    install_certificate_pem(data_dir, identity, &bytes, pem_file, None)
}

/// [`install_certificate`] from PEM bytes (`origin` names them in errors). With
/// `expected_cn`, the leaf's subject common name must also be exactly that (a certificate
/// received by provisioning must name the device id the broker will know it by).
pub fn install_certificate_pem(
    data_dir: &Path,
    identity: &dyn DeviceIdentity,
    pem: &[u8],
    origin: &Path,
    expected_cn: Option<&str>,
) -> Result<(), TlsError> {
    let chain = parse_certs(pem, origin)?;
    let leaf = chain.first().ok_or(TlsError::WrongKey)?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if cert.public_key().subject_public_key.data.as_ref() != identity.public_key().as_slice() {
        return Err(TlsError::WrongKey);
    }
    if let Some(expected) = expected_cn {
        let cn = subject_cn(&cert);
        if cn.as_deref() != Some(expected) {
            return Err(TlsError::Certificate(format!(
                "the certificate's subject CN is not the device id {expected}"
            )));
        }
    }
    let path = certificate_path(data_dir);
    let io = |e: gateway_durable::Error| TlsError::Io {
        action: e.action,
        path: e.path,
        source: e.source,
    };
    if let Some(dir) = path.parent() {
        gateway_durable::ensure_private_dir(dir).map_err(io)?;
    }
    gateway_durable::write_atomic(&path, pem).map_err(io)
}

/// The subject common name of the first certificate in a PEM file (e.g. the claim id of a
/// claim certificate).
pub fn certificate_common_name(path: &Path) -> Result<String, TlsError> {
    let chain = read_certs(path)?;
    let leaf = chain.first().ok_or_else(|| TlsError::Pem {
        path: path.to_path_buf(),
        reason: "no certificate".into(),
    })?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    subject_cn(&cert).ok_or_else(|| TlsError::Pem {
        path: path.to_path_buf(),
        reason: "the certificate's subject has no common name".into(),
    })
}

fn subject_cn(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let mut names = cert.subject().iter_common_name();
    let cn = names.next()?.as_str().ok()?.to_owned();
    names.next().is_none().then_some(cn)
}

/// Connects to an `https://host:port/path` URL, completes the handshake and one `GET`,
/// and returns the HTTP status line.
pub async fn check(
    url: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<String, TlsError> {
    let (host, port, path) = parse_https(url)?;
    let connect_err = |stage: &'static str, detail: String| TlsError::Connect {
        stage,
        host: host.clone(),
        port,
        detail,
    };
    let name = ServerName::try_from(host.clone()).map_err(|_| TlsError::Url {
        url: url.into(),
        reason: "bad host name",
    })?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| connect_err("connect", e.to_string()))?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| connect_err("TLS handshake with", e.to_string()))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| connect_err("send to", e.to_string()))?;
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        while !response.contains(&b'\n') && response.len() < 16 * 1024 {
            match tls.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
                Err(e) => return Err(connect_err("read from", e.to_string())),
            }
        }
        let line = String::from_utf8_lossy(&response);
        Ok(line.lines().next().unwrap_or_default().trim().to_string())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| TlsError::Connect {
            stage: "timeout talking to",
            host: host.clone(),
            port,
            detail: format!("{timeout:?}"),
        })?
}

fn parse_https(url: &str) -> Result<(String, u16, String), TlsError> {
    let bad = |reason| TlsError::Url {
        url: url.into(),
        reason,
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("must start with https://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse().map_err(|_| bad("bad port"))?)
        }
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((host.to_string(), port, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A software stand-in for the TPM identity (P-256), for certificate checks only.
    #[derive(Debug)]
    struct TestIdentity(rcgen::KeyPair);

    impl DeviceIdentity for TestIdentity {
        fn public_key(&self) -> Vec<u8> {
            rcgen::PublicKeyData::der_bytes(&self.0).to_vec()
        }

        fn sign_sha256(&self, message: &[u8]) -> Result<Vec<u8>, gateway_keystore::KeyStoreError> {
            Ok(rcgen::SigningKey::sign(&self.0, message).unwrap())
        }
    }

    /// A CA-issued certificate for `key` with subject CN = `cn`, PEM.
    fn issue(key: &rcgen::KeyPair, cn: &str) -> String {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let leaf = params.signed_by(key, &issuer).unwrap();
        format!("{}{}", leaf.pem(), ca_cert.pem())
    }

    #[test]
    fn provisioned_certificate_must_certify_the_identity_and_name_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let id = TestIdentity(rcgen::KeyPair::generate().unwrap());
        let other = rcgen::KeyPair::generate().unwrap();
        let origin = Path::new("provision");
        let wrong_key = issue(&other, "gw-1");
        assert!(matches!(
            install_certificate_pem(dir.path(), &id, wrong_key.as_bytes(), origin, Some("gw-1")),
            Err(TlsError::WrongKey)
        ));
        let wrong_cn = issue(&id.0, "gw-2");
        let err =
            install_certificate_pem(dir.path(), &id, wrong_cn.as_bytes(), origin, Some("gw-1"))
                .unwrap_err();
        assert!(err.to_string().contains("not the device id gw-1"), "{err}");
        assert!(!certificate_path(dir.path()).exists());
        assert!(install_certificate_pem(dir.path(), &id, b"junk", origin, None).is_err());

        let good = issue(&id.0, "gw-1");
        install_certificate_pem(dir.path(), &id, good.as_bytes(), origin, Some("gw-1")).unwrap();
        assert_eq!(installed_chain(dir.path()).unwrap().len(), 2);
        assert_eq!(
            certificate_common_name(&certificate_path(dir.path())).unwrap(),
            "gw-1"
        );
    }

    #[test]
    fn server_config_from_pem_sets_alpn_and_names_bad_input() {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = made.cert.pem();
        let key = made.signing_key.serialize_pem();
        let origin = Path::new("kiosk certificate");
        let config =
            server_config_pem(cert.as_bytes(), key.as_bytes(), origin, &[b"http/1.1"]).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        let err = server_config_pem(b"", key.as_bytes(), origin, &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("kiosk certificate: no certificate"),
            "{err}"
        );
        let err = server_config_pem(cert.as_bytes(), b"junk", origin, &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("kiosk certificate: private key"),
            "{err}"
        );
        // A key that is not the certificate's.
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(matches!(
            server_config_pem(cert.as_bytes(), other.as_bytes(), origin, &[]),
            Err(TlsError::Config(_))
        ));
    }

    /// A CA (key, params) and a leaf issued by it for `key` with `sans` and CN `cn`.
    fn ca() -> (rcgen::KeyPair, rcgen::CertificateParams, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = ca.self_signed(&ca_key).unwrap().pem();
        (ca_key, ca, pem)
    }

    fn leaf(
        ca: &(rcgen::KeyPair, rcgen::CertificateParams, String),
        key: &rcgen::KeyPair,
        sans: &[&str],
        cn: &str,
    ) -> rcgen::Certificate {
        let issuer = rcgen::Issuer::new(ca.1.clone(), &ca.0);
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.signed_by(key, &issuer).unwrap()
    }

    #[test]
    fn every_config_uses_the_profile_suites_only() {
        let names: Vec<String> = PROFILE_CIPHER_SUITES
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        for name in &names {
            assert!(
                name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"),
                "{name}"
            );
            assert!(
                name.contains("_GCM_") || name.contains("CHACHA20_POLY1305"),
                "{name}"
            );
        }
        assert_eq!(names.len(), 9);
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let config = server_config_pem(
            made.cert.pem().as_bytes(),
            made.signing_key.serialize_pem().as_bytes(),
            Path::new("x"),
            &[],
        )
        .unwrap();
        let suites: Vec<_> = config
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let profile: Vec<_> = PROFILE_CIPHER_SUITES.iter().map(|s| s.suite()).collect();
        assert_eq!(suites, profile);
        // The aws-lc-rs defaults hold more than the profile would allow if they grew; ours
        // are exactly the list.
        assert_eq!(provider().cipher_suites.len(), PROFILE_CIPHER_SUITES.len());
    }

    #[test]
    fn peer_names_are_dns_sans_then_the_common_name() {
        let ca = ca();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = leaf(&ca, &key, &["ct01.clinic.example", "ct01"], "CT01 modality");
        assert_eq!(
            peer_names(cert.der()),
            ["ct01.clinic.example", "ct01", "CT01 modality"]
        );
        let cert = leaf(&ca, &key, &[], "only-cn");
        assert_eq!(peer_names(cert.der()), ["only-cn"]);
        assert!(peer_names(&CertificateDer::from(vec![1u8, 2, 3])).is_empty());
    }

    /// Handshake of `client` against `server` over an in-memory pipe; the server's view of
    /// the client's certificate names.
    fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<Vec<String>, String> {
        // Multi-threaded, as gatewayd runs: the identity signs through `block_in_place`.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let accept = tokio_rustls::TlsAcceptor::from(server).accept(a);
            let name = ServerName::try_from("gw.clinic.example").unwrap();
            let connect = tokio_rustls::TlsConnector::from(client).connect(name, b);
            let (s, c) = tokio::join!(accept, connect);
            let mut s = s.map_err(|e| e.to_string())?;
            let mut c = c.map_err(|e| e.to_string())?;
            // TLS 1.3: the server reports a client certificate failure on first use.
            c.write_all(b"ping").await.map_err(|e| e.to_string())?;
            c.flush().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            let names = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(peer_names)
                .unwrap_or_default();
            Ok(names)
        })
    }

    #[test]
    fn identity_server_signs_with_the_identity_and_requires_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        // The device: its certificate from the clinic CA, its key only in the "key store".
        let clinic = ca();
        let id = TestIdentity(rcgen::KeyPair::generate().unwrap());
        let device = leaf(&clinic, &id.0, &["gw.clinic.example"], "gw-1");
        let identity: Arc<dyn DeviceIdentity> = Arc::new(id);
        let clinic_ca = write("clinic-ca.pem", &clinic.2);
        // Modalities: one from the clinic CA, one from another CA.
        let modality_key = rcgen::KeyPair::generate().unwrap();
        let modality = leaf(&clinic, &modality_key, &["ct01.clinic.example"], "CT01");
        let other = ca();
        let stranger = leaf(&other, &modality_key, &["ct01.clinic.example"], "CT01");
        let key_file = write("modality.key", &modality_key.serialize_pem());
        let good = write("modality.pem", &modality.pem());
        let bad = write("stranger.pem", &stranger.pem());

        let server = server_config_identity(
            Arc::clone(&identity),
            vec![device.der().clone()],
            Some(&clinic_ca),
        )
        .unwrap();
        let client = |cert: &Path| {
            client_config(
                &clinic_ca,
                ClientAuth::Files {
                    cert_file: cert.to_path_buf(),
                    key_file: key_file.clone(),
                },
            )
            .unwrap()
        };
        assert_eq!(
            handshake(Arc::clone(&server), client(&good)).unwrap(),
            ["ct01.clinic.example", "CT01"]
        );
        assert!(handshake(Arc::clone(&server), client(&bad)).is_err());
        // No client certificate at all.
        let mut roots = RootCertStore::empty();
        roots
            .add(read_certs(&clinic_ca).unwrap().remove(0))
            .unwrap();
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROFILE_VERSIONS)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        assert!(handshake(Arc::clone(&server), Arc::new(anonymous)).is_err());
        // A client that trusts another CA does not accept the device's certificate.
        let other_ca = write("other-ca.pem", &other.2);
        let wary = client_config(
            &other_ca,
            ClientAuth::Files {
                cert_file: good.clone(),
                key_file: key_file.clone(),
            },
        )
        .unwrap();
        assert!(handshake(server, wary).is_err());
    }

    #[test]
    fn https_urls_are_split_into_host_port_and_path() {
        assert_eq!(
            parse_https("https://127.0.0.1:8443/dicom-web").unwrap(),
            ("127.0.0.1".into(), 8443, "/dicom-web".into())
        );
        assert_eq!(
            parse_https("https://dc.example.jp").unwrap(),
            ("dc.example.jp".into(), 443, "/".into())
        );
        assert_eq!(
            parse_https("https://[::1]:9/x").unwrap(),
            ("::1".into(), 9, "/x".into())
        );
        assert!(parse_https("http://plain").is_err());
        assert!(parse_https("https://h:port/").is_err());
    }
}
