//! The regional broker connection both roles share: where to connect and as whom, and the
//! session settings common to the core and the clinic (`gateway-mqtt` runs the session).

use std::time::Duration;

use gateway_id::Id;
use gateway_mqtt::{Backoff, Broker, SessionConfig};

/// First wait after a failed connection; doubled per failure up to [`BACKOFF_MAX`].
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const KEEP_ALIVE: Duration = Duration::from_secs(10);
const REQUEST_CAPACITY: usize = 256;
const MAX_PACKET_BYTES: usize = 1024 * 1024;

/// Where and how to reach the regional broker.
#[derive(Clone, Debug)]
pub struct Connection {
    /// MQTT client id: the gateway's node id.
    pub client_id: Id,
    /// The regional broker with the TLS client configuration (none: development `mqtt://`).
    pub broker: Broker,
}

impl Connection {
    /// Persistent session (queued QoS 1 messages survive a disconnection), keep-alive 10 s,
    /// packets up to 1 MiB, reconnect after 0.5 s doubling to 30 s.
    pub(crate) fn session(&self, label: &'static str) -> SessionConfig {
        SessionConfig::new(label, self.client_id.clone(), self.broker.clone())
            .clean_session(false)
            .keep_alive(KEEP_ALIVE)
            .max_packet_bytes(MAX_PACKET_BYTES)
            .request_capacity(REQUEST_CAPACITY)
            .backoff(Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX))
    }
}
