//! The TLS client configuration of an MQTT broker connection (`[fleet]`, `[exchange]`): the
//! broker verified against `ca_file` only; the gateway authenticated with the key store's
//! device identity and its installed certificate, or (development) certificate files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gateway_config::{BrokerUrl, ClientAuth};
use gateway_keystore::DeviceIdentity;
use tracing::warn;

/// One section's broker settings, as parsed.
pub(crate) struct BrokerTls<'a> {
    /// `fleet` or `exchange`, for messages.
    pub section: &'static str,
    pub broker: &'a BrokerUrl,
    pub ca_file: Option<&'a PathBuf>,
    pub client_auth: ClientAuth,
    pub cert_file: Option<&'a PathBuf>,
    pub key_file: Option<&'a PathBuf>,
}

impl BrokerTls<'_> {
    /// `None` for a development `mqtt://` broker (with a warning).
    pub(crate) fn client_config(
        &self,
        identity: Option<Arc<dyn DeviceIdentity>>,
        data_dir: &Path,
    ) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        let section = self.section;
        if self.broker.is_plaintext() {
            warn!(section, broker = %self.broker, "MQTT broker over plaintext mqtt:// (development mode only)");
            return Ok(None);
        }
        let ca_file = self
            .ca_file
            .ok_or_else(|| format!("{section}.ca_file: required for an mqtts:// broker"))?;
        let auth = match self.client_auth {
            ClientAuth::Keystore => {
                let identity = identity.ok_or_else(|| {
                    format!(
                        "{section}: client_auth = \"keystore\" needs a key store with a device identity (keystore.backend = \"tpm\")"
                    )
                })?;
                let chain = gateway_tls::installed_chain(data_dir)
                    .map_err(|e| format!("{section}: {e}"))?;
                gateway_tls::ClientAuth::Identity { identity, chain }
            }
            ClientAuth::Files => match (self.cert_file, self.key_file) {
                (Some(cert_file), Some(key_file)) => gateway_tls::ClientAuth::Files {
                    cert_file: cert_file.clone(),
                    key_file: key_file.clone(),
                },
                _ => {
                    return Err(format!(
                        "{section}: client_auth = \"files\" needs cert_file and key_file"
                    ));
                }
            },
        };
        gateway_tls::client_config(ca_file, auth)
            .map(Some)
            .map_err(|e| format!("{section}: {e}"))
    }
}
