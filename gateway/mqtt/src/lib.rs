//! One MQTT session for the whole gateway: the fleet agent, provisioning by claim and both
//! roles of the regional booking exchange all connect through [`Session`], so connecting,
//! reconnecting, subscribing and the retained status are written once.
//!
//! - [`Broker`]: host and port from an `mqtt://` / `mqtts://` URL, and for `mqtts://` the
//!   gateway's own rustls `ClientConfig` made by `gateway-tls` (device identity through the
//!   key store, or files in development). [`BrokerTls`] builds it from a `[fleet]` or
//!   `[exchange]` section, so the daemon only calls it.
//! - [`SessionConfig`]: client id (a topic-safe [`gateway_id::Id`]), clean or persistent
//!   session, keep-alive, packet size, request queue, [`Backoff`], the subscriptions
//!   ([`TopicSet`]) and an optional retained status topic with its last will.
//! - [`Session::run`]: one loop on the owner's task until the `watch::Receiver<bool>`
//!   shutdown signal turns true: connect; after every ConnAck subscribe to every filter
//!   (QoS 1, in order), publish the retained status ([`Handler::status`]) and call
//!   [`Handler::on_connect`]; deliver each incoming publish to [`Handler::on_message`];
//!   after a connection error wait the backoff (reset by the next ConnAck) and reconnect.
//!   At the end, if connected: the closing status, DISCONNECT, at most 2 s to flush.
//! - [`Publisher`]: QoS 1 publishes, never waiting on the session's task
//!   ([`Publisher::publish`]), or waiting for queue room from other tasks
//!   ([`Publisher::publish_waiting`]).
//!
//! Invariants: this crate is the only one that constructs rumqttc clients (`clippy.toml`
//! forbids `AsyncClient::new` / `MqttOptions::new` elsewhere); nothing the broker sends can
//! panic the loop; payloads are never logged (only sizes, topics carry ids); a dead broker
//! blocks nothing but its own session, and shutdown never waits more than the flush.
//!
//! Tests: the pieces testable without a broker are unit-tested here (URL to broker, TLS
//! presence, backoff schedule, topic set, rumqttc options, shutdown while unreachable);
//! the connection itself is tested against a real mosquitto in `hw-tests/test_fleet.py` and
//! `hw-tests/test_booking.py`.

// The one crate allowed to build MQTT clients (see clippy.toml `disallowed-methods`).
#![allow(clippy::disallowed_methods)]
#![deny(clippy::indexing_slicing, clippy::string_slice)]

mod backoff;
mod broker;
mod session;
mod topics;

pub use backoff::Backoff;
pub use broker::{Broker, BrokerError, BrokerTls, BrokerTlsError};
pub use session::Publisher;
pub use session::{
    Ended, Flow, Handler, PublishError, SHUTDOWN_FLUSH, Session, SessionConfig, SessionError,
    StatusEvent,
};
pub use topics::{InvalidFilter, TopicSet, check_filter, check_topic};
