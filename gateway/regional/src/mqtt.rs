//! The MQTT connection both roles share.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, TlsConfiguration, Transport};

/// First wait after a failed connection; doubled per failure up to [`BACKOFF_MAX`].
pub(crate) const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(30);
const KEEP_ALIVE: Duration = Duration::from_secs(10);
pub(crate) const REQUEST_CAPACITY: usize = 256;

/// Where and how to reach the regional broker.
#[derive(Clone)]
pub struct Connection {
    /// MQTT client id: the gateway's node id.
    pub client_id: String,
    pub host: String,
    pub port: u16,
    /// `None`: plain TCP (development `mqtt://` only).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("client_id", &self.client_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connection {
    /// Persistent session (queued QoS 1 messages survive a disconnection), keep-alive 10 s.
    pub(crate) fn options(&self, will: Option<LastWill>) -> MqttOptions {
        let mut o = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        o.set_clean_session(false)
            .set_keep_alive(KEEP_ALIVE)
            .set_max_packet_size(1024 * 1024, 1024 * 1024);
        if let Some(will) = will {
            o.set_last_will(will);
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::clone(tls),
            )));
        }
        o
    }
}
