//! How this box authenticates as a TLS client, one rule for every outgoing mutual-TLS
//! connection (uplinks, DICOM delivery, the update download, `keys check-tls`): the device
//! identity in the key store with the certificate chain installed for it, or a certificate
//! and key from files. Errors name the configuration `what` they are about.

use std::path::{Path, PathBuf};

use gateway_keystore::KeyStore;
use gateway_tls::ClientAuth;

/// The device identity and its installed certificate chain.
pub(crate) fn identity(
    keys: &dyn KeyStore,
    data_dir: &Path,
    what: &str,
) -> Result<ClientAuth, String> {
    let identity = keys.identity().ok_or_else(|| {
        format!(
            "{what}: the device identity needs a key store with one (keystore.backend = \"tpm\")"
        )
    })?;
    let chain = gateway_tls::installed_chain(data_dir).map_err(|e| format!("{what}: {e}"))?;
    Ok(ClientAuth::Identity { identity, chain })
}

/// A certificate and its key from files; both must be set.
pub(crate) fn files(
    cert_file: Option<&PathBuf>,
    key_file: Option<&PathBuf>,
    what: &str,
) -> Result<ClientAuth, String> {
    match (cert_file, key_file) {
        (Some(cert_file), Some(key_file)) => Ok(ClientAuth::Files {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        }),
        _ => Err(format!(
            "{what}: client_auth = \"files\" needs cert_file and key_file"
        )),
    }
}

/// A section's `client_auth` choice (`keystore` or `files`).
pub(crate) fn configured(
    choice: gateway_config::ClientAuth,
    cert_file: Option<&PathBuf>,
    key_file: Option<&PathBuf>,
    keys: &dyn KeyStore,
    data_dir: &Path,
    what: &str,
) -> Result<ClientAuth, String> {
    match choice {
        gateway_config::ClientAuth::Keystore => identity(keys, data_dir, what),
        gateway_config::ClientAuth::Files => files(cert_file, key_file, what),
    }
}
