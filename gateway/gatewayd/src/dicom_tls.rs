//! DICOM over TLS glue: the `[dicom]` TLS listener's and a `[[results.deliver]]` kind =
//! "dicom" destination's rustls configurations, from certificate files or the device
//! identity (the key store's key with the installed certificate, `gatewayd keys
//! install-cert`). Every configuration comes from `gateway_tls` (the PS3.15 BCP 195
//! profile).

use std::path::Path;
use std::sync::Arc;

use gateway_dicom::{ScuTls, TlsListenerSettings};
use gateway_keystore::KeyStore;

/// The TLS listener of `[dicom]`, when `tls_listen` is set.
pub(crate) fn listener(
    dicom: &gateway_config::Dicom,
    data_dir: &Path,
    keys: &dyn KeyStore,
) -> Result<Option<TlsListenerSettings>, String> {
    let Some(tls) = &dicom.tls else {
        return Ok(None);
    };
    let client_ca = tls.client_ca_file.as_deref();
    let config = match &tls.files {
        Some(files) => gateway_tls::server_config(&files.cert_file, &files.key_file, client_ca),
        None => {
            let identity = keys.identity().ok_or_else(|| {
                "dicom.tls_listen without dicom.tls_cert_file/tls_key_file uses the device identity: \
                 it needs a key store with one (keystore.backend = \"tpm\")"
                    .to_string()
            })?;
            gateway_tls::installed_chain(data_dir).and_then(|chain| {
                gateway_tls::server_config_identity(identity, chain, client_ca)
            })
        }
    }
    .map_err(|e| format!("dicom.tls_listen: {e}"))?;
    Ok(Some(TlsListenerSettings {
        listen: tls.listen,
        config,
    }))
}

/// The TLS client configuration of a `[[results.deliver]]` kind = "dicom" destination.
pub(crate) fn deliver(
    name: &str,
    tls: &gateway_config::DeliverTls,
    data_dir: &Path,
    keys: &dyn KeyStore,
) -> Result<ScuTls, String> {
    let auth = match &tls.files {
        Some(files) => gateway_tls::ClientAuth::Files {
            cert_file: files.cert_file.clone(),
            key_file: files.key_file.clone(),
        },
        // TLS without tls_cert_file/tls_key_file: the device identity.
        None => crate::tls_auth::identity(keys, data_dir, &format!("results.deliver {name}"))?,
    };
    let config = gateway_tls::client_config(&tls.ca_file, auth)
        .map_err(|e| format!("results.deliver {name}: {e}"))?;
    Ok(ScuTls {
        config: Arc::clone(&config),
    })
}
