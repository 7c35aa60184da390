//! The session: one rumqttc client and event loop, driven by [`Session::run`] on the
//! owner's task until shutdown, delivering what arrives to the owner's [`Handler`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use gateway_id::Id;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::broker::Broker;
use crate::topics::{InvalidFilter, TopicSet, check_topic};

/// How long closing may take to deliver the last status and the DISCONNECT.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// A session that cannot be configured.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("MQTT session {label}: keep-alive {keep_alive:?} is under a second (and not zero)")]
    KeepAlive {
        label: &'static str,
        keep_alive: Duration,
    },
    #[error("MQTT session {label}: {source}")]
    Topic {
        label: &'static str,
        source: InvalidFilter,
    },
}

/// A publish that was not queued: the session's request queue is full or closed. Carries
/// nothing of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("MQTT publish not queued: the session's request queue is full or closed")]
pub struct PublishError;

/// The retained status topic of a session and its last will.
#[derive(Clone)]
struct StatusTopic {
    topic: String,
    will: Vec<u8>,
}

/// Everything a session is made of; build with [`SessionConfig::new`] and the setters.
#[derive(Clone)]
pub struct SessionConfig {
    label: &'static str,
    client_id: Id,
    broker: Broker,
    clean_session: bool,
    keep_alive: Duration,
    max_packet_bytes: usize,
    request_capacity: usize,
    backoff: Backoff,
    subscriptions: TopicSet,
    status: Option<StatusTopic>,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("label", &self.label)
            .field("client_id", &self.client_id)
            .field("broker", &self.broker)
            .field("clean_session", &self.clean_session)
            .field("keep_alive", &self.keep_alive)
            .field("subscriptions", &self.subscriptions)
            .field("status", &self.status.as_ref().map(|s| &s.topic))
            .finish_non_exhaustive()
    }
}

impl SessionConfig {
    /// A session named `label` in logs (e.g. `fleet`, `regional core`), connecting as
    /// `client_id`. Defaults: persistent session (`clean_session = false`), keep-alive
    /// 30 s, packets up to 1 MiB, 64 queued requests, reconnect after 1 s doubling to
    /// 60 s, no subscriptions, no status topic.
    pub fn new(label: &'static str, client_id: Id, broker: Broker) -> SessionConfig {
        SessionConfig {
            label,
            client_id,
            broker,
            clean_session: false,
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: 1024 * 1024,
            request_capacity: 64,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            subscriptions: TopicSet::new(),
            status: None,
        }
    }

    /// `true`: the broker forgets the session at each connection (no queued QoS 1 messages
    /// survive a disconnection).
    #[must_use]
    pub fn clean_session(mut self, clean: bool) -> Self {
        self.clean_session = clean;
        self
    }

    /// MQTT keep-alive: whole seconds, at least 1 s (or zero: none).
    #[must_use]
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// Largest packet sent or accepted.
    #[must_use]
    pub fn max_packet_bytes(mut self, bytes: usize) -> Self {
        self.max_packet_bytes = bytes;
        self
    }

    /// Requests (publishes, subscriptions) queued towards the event loop.
    #[must_use]
    pub fn request_capacity(mut self, capacity: usize) -> Self {
        self.request_capacity = capacity.max(1);
        self
    }

    /// The reconnection schedule.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Subscribes to `filter` (QoS 1) on every ConnAck, after the filters added before it.
    pub fn subscribe(mut self, filter: impl Into<String>) -> Result<Self, SessionError> {
        let label = self.label;
        self.subscriptions
            .add(filter)
            .map_err(|source| SessionError::Topic { label, source })?;
        Ok(self)
    }

    /// A retained status on `topic` (QoS 1): `will` is the last will the broker publishes
    /// when the connection is lost; [`Handler::status`] gives the payload published after
    /// every ConnAck and when the session closes.
    pub fn status(mut self, topic: impl Into<String>, will: Vec<u8>) -> Result<Self, SessionError> {
        let topic = topic.into();
        check_topic(&topic).map_err(|source| SessionError::Topic {
            label: self.label,
            source,
        })?;
        self.status = Some(StatusTopic { topic, will });
        Ok(self)
    }

    /// The client id.
    pub fn client_id(&self) -> &Id {
        &self.client_id
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The subscriptions, in order.
    pub fn subscriptions(&self) -> &TopicSet {
        &self.subscriptions
    }

    /// rumqttc's options for this session (MQTT 3.1.1).
    fn options(&self) -> Result<MqttOptions, SessionError> {
        if !self.keep_alive.is_zero() && self.keep_alive < Duration::from_secs(1) {
            return Err(SessionError::KeepAlive {
                label: self.label,
                keep_alive: self.keep_alive,
            });
        }
        // `Id` is never empty, so a persistent session is allowed for it.
        let mut options = MqttOptions::new(
            self.client_id.as_str(),
            self.broker.host(),
            self.broker.port(),
        );
        options
            .set_clean_session(self.clean_session)
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(self.max_packet_bytes, self.max_packet_bytes);
        if let Some(status) = &self.status {
            options.set_last_will(LastWill::new(
                status.topic.clone(),
                status.will.clone(),
                QoS::AtLeastOnce,
                true,
            ));
        }
        if let Some(tls) = self.broker.tls() {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::clone(tls),
            )));
        }
        Ok(options)
    }
}

/// When [`Handler::status`] is asked for the retained status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusEvent {
    /// After every ConnAck (after the subscriptions are queued).
    Connected,
    /// The session closes while connected (shutdown, or the handler stopped it).
    Closing,
}

/// Whether the session goes on after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Close the session (last status, DISCONNECT) and return from [`Session::run`].
    Stop,
}

/// Why [`Session::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The shutdown signal turned true.
    Shutdown,
    /// The handler returned [`Flow::Stop`].
    Stopped,
}

/// The owner of a session: everything runs on the session's task, so a handler must not
/// block (disk writes go to a blocking thread or a service it awaits, e.g. the booking
/// ledger); publishing never waits. The callbacks are async so that a handler can await
/// such a service; the session reads no further packet until a callback returns.
pub trait Handler: Send {
    /// The retained status payload at `event` (only asked when the session has a status
    /// topic); `None` publishes nothing.
    fn status(&self, event: StatusEvent) -> Option<Vec<u8>> {
        let _ = event;
        None
    }

    /// After every ConnAck, once the subscriptions and the status are queued.
    fn on_connect(
        &mut self,
        out: &Publisher,
        session_present: bool,
    ) -> impl Future<Output = ()> + Send {
        let _ = (out, session_present);
        std::future::ready(())
    }

    /// One incoming publish (QoS 1: the broker may deliver it again after a reconnection).
    fn on_message(
        &mut self,
        out: &Publisher,
        topic: &str,
        payload: &[u8],
    ) -> impl Future<Output = Flow> + Send;

    /// The connection failed or was lost; the session reconnects after its backoff.
    fn on_connection_lost(&mut self) {}

    /// Resolves when the owner has something of its own to publish (a timer, a
    /// notification); polled only while connected, and must be cancel-safe. Default:
    /// never.
    fn wake(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// After [`Handler::wake`] resolved.
    fn on_wake(&mut self, out: &Publisher) -> impl Future<Output = ()> + Send {
        let _ = out;
        std::future::ready(())
    }
}

/// Publishes QoS 1 on a session; cheap to clone, usable from any task.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Publisher")
    }
}

impl Publisher {
    /// Queues a QoS 1 publish without waiting (the event loop may run on this same task).
    pub fn publish(
        &self,
        topic: impl Into<String>,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), PublishError> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .map_err(|_| PublishError)
    }

    /// Queues a QoS 1 publish, waiting for room in the queue. Only for tasks other than
    /// the session's own (the session's task must keep polling for room to appear).
    pub async fn publish_waiting(
        &self,
        topic: impl Into<String>,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), PublishError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|_| PublishError)
    }
}

/// One MQTT session; see the crate docs.
pub struct Session {
    label: &'static str,
    broker: String,
    client: AsyncClient,
    events: EventLoop,
    subscriptions: TopicSet,
    status_topic: Option<String>,
    backoff: Backoff,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("label", &self.label)
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

/// What the session does next (see [`Session::run`]).
enum Step {
    Shutdown,
    Wake,
    Event(Result<Event, rumqttc::ConnectionError>),
}

/// Resolves once `shutdown` is true (or its sender is gone), holding no guard of the watch.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

impl Session {
    /// Prepares the client; nothing connects before [`Session::run`]. Publishes queued on
    /// its [`Publisher`] before then go out after the first connection.
    pub fn new(config: SessionConfig) -> Result<Session, SessionError> {
        let options = config.options()?;
        let (client, events) = AsyncClient::new(options, config.request_capacity);
        Ok(Session {
            label: config.label,
            broker: config.broker.to_string(),
            client,
            events,
            subscriptions: config.subscriptions,
            status_topic: config.status.map(|s| s.topic),
            backoff: config.backoff,
        })
    }

    /// A handle to publish on this session.
    pub fn publisher(&self) -> Publisher {
        Publisher {
            client: self.client.clone(),
        }
    }

    /// Runs until `shutdown` turns true or the handler returns [`Flow::Stop`]: connects,
    /// and after a failure waits its backoff and connects again; after every ConnAck
    /// subscribes (QoS 1, in order), publishes the retained status and calls
    /// [`Handler::on_connect`]. When it ends while connected it publishes the closing
    /// status, disconnects and waits at most [`SHUTDOWN_FLUSH`] for both to go out.
    pub async fn run<H: Handler>(
        mut self,
        handler: &mut H,
        mut shutdown: watch::Receiver<bool>,
    ) -> Ended {
        let out = self.publisher();
        let label = self.label;
        info!(session = label, broker = %self.broker, "MQTT session started");
        let mut connected = false;
        let ended = loop {
            let mut retry_in = None;
            // The select only picks the next step; the handler is awaited after it, so no
            // temporary of the select (a watch guard, the event loop's future) lives across
            // the handler's awaits.
            let step = tokio::select! {
                () = stopped(&mut shutdown) => Step::Shutdown,
                () = handler.wake(), if connected => Step::Wake,
                event = self.events.poll() => Step::Event(event),
            };
            match step {
                Step::Shutdown => break Ended::Shutdown,
                Step::Wake => handler.on_wake(&out).await,
                Step::Event(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    info!(
                        session = label,
                        session_present = ack.session_present,
                        "MQTT broker connected"
                    );
                    connected = true;
                    self.backoff.reset();
                    self.subscribe_and_announce(handler, &out);
                    handler.on_connect(&out, ack.session_present).await;
                }
                Step::Event(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if handler.on_message(&out, &p.topic, &p.payload).await == Flow::Stop {
                        break Ended::Stopped;
                    }
                }
                Step::Event(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        warn!(session = label, "the broker refused a subscription (ACL?)");
                    }
                }
                Step::Event(Ok(_)) => {}
                Step::Event(Err(e)) => {
                    connected = false;
                    handler.on_connection_lost();
                    let wait = self.backoff.next_wait();
                    // rumqttc's text names no payload content.
                    warn!(session = label, error = %e, retry_in = ?wait, "MQTT broker connection failed");
                    retry_in = Some(wait);
                }
            }
            if let Some(wait) = retry_in {
                tokio::select! {
                    () = stopped(&mut shutdown) => break Ended::Shutdown,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        };
        if connected {
            self.close(handler).await;
        }
        info!(session = label, "MQTT session stopped");
        ended
    }

    /// After a ConnAck: the subscriptions, then the retained status (both queued).
    fn subscribe_and_announce<H: Handler>(&self, handler: &H, out: &Publisher) {
        for filter in self.subscriptions.iter() {
            if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
                warn!(session = self.label, error = %e, "cannot queue a subscription");
            }
        }
        if let (Some(topic), Some(payload)) =
            (&self.status_topic, handler.status(StatusEvent::Connected))
            && out.publish(topic.clone(), true, payload).is_err()
        {
            warn!(
                session = self.label,
                "status publish dropped: request queue full"
            );
        }
    }

    /// The closing status, then DISCONNECT; polls until the broker closes the connection
    /// (it does after a DISCONNECT) or [`SHUTDOWN_FLUSH`] passed.
    async fn close<H: Handler>(&mut self, handler: &H) {
        if let (Some(topic), Some(payload)) =
            (&self.status_topic, handler.status(StatusEvent::Closing))
        {
            let _ = self
                .client
                .try_publish(topic.clone(), QoS::AtLeastOnce, true, payload);
        }
        let _ = self.client.try_disconnect();
        let events = &mut self.events;
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, async {
            while events.poll().await.is_ok() {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker() -> Broker {
        Broker::new(&"mqtt://127.0.0.1:1883".parse().unwrap(), None).unwrap()
    }

    fn id(s: &str) -> Id {
        Id::parse(s, "client id").unwrap()
    }

    #[test]
    fn options_carry_client_id_session_keep_alive_packet_size_and_will() {
        let config = SessionConfig::new("core", id("core-1"), broker())
            .keep_alive(Duration::from_secs(10))
            .max_packet_bytes(4096)
            .status("bk/core-1/status", b"{\"state\":\"offline\"}".to_vec())
            .unwrap();
        let o = config.options().unwrap();
        assert_eq!(o.client_id(), "core-1");
        assert_eq!(o.broker_address(), ("127.0.0.1".to_owned(), 1883));
        assert!(!o.clean_session());
        assert_eq!(o.keep_alive(), Duration::from_secs(10));
        assert_eq!(o.max_packet_size(), 4096);
        let will = o.last_will().unwrap();
        assert_eq!(will.topic, "bk/core-1/status");
        assert_eq!(&will.message[..], b"{\"state\":\"offline\"}");
        assert!(will.retain && will.qos == QoS::AtLeastOnce);
        assert!(matches!(o.transport(), Transport::Tcp));
    }

    #[test]
    fn a_clean_session_without_status_has_no_will() {
        let o = SessionConfig::new("claim", id("claim-7"), broker())
            .clean_session(true)
            .options()
            .unwrap();
        assert!(o.clean_session() && o.last_will().is_none());
    }

    #[test]
    fn sub_second_keep_alive_and_bad_topics_are_configuration_errors() {
        let config = SessionConfig::new("x", id("x"), broker());
        assert!(matches!(
            config
                .clone()
                .keep_alive(Duration::from_millis(500))
                .options(),
            Err(SessionError::KeepAlive { .. })
        ));
        assert!(config.clone().keep_alive(Duration::ZERO).options().is_ok());
        assert!(config.clone().subscribe("a/#/b").is_err());
        assert!(config.clone().status("a/+/status", Vec::new()).is_err());
        let config = config.subscribe("a/+").unwrap().subscribe("b/#").unwrap();
        assert_eq!(
            config.subscriptions().iter().collect::<Vec<_>>(),
            ["a/+", "b/#"]
        );
    }

    /// Counts lost connections; never connected, so never asked for a status.
    #[derive(Default)]
    struct Quiet {
        lost: usize,
    }
    impl Handler for Quiet {
        fn status(&self, _: StatusEvent) -> Option<Vec<u8>> {
            panic!("no status without a connection")
        }
        async fn on_message(&mut self, _: &Publisher, _: &str, _: &[u8]) -> Flow {
            Flow::Continue
        }
        fn on_connection_lost(&mut self) {
            self.lost += 1;
        }
    }

    #[tokio::test]
    async fn an_unreachable_broker_waits_its_backoff_and_never_blocks_shutdown() {
        // A port nothing listens on: every attempt fails and the session waits its backoff.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let broker =
            Broker::new(&format!("mqtt://127.0.0.1:{port}").parse().unwrap(), None).unwrap();
        let session = Session::new(SessionConfig::new("test", id("t"), broker).backoff(
            Backoff::new(Duration::from_secs(30), Duration::from_secs(60)),
        ))
        .unwrap();
        let out = session.publisher();
        assert_eq!(out.publish("a/b", false, b"x".to_vec()), Ok(()));
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut handler = Quiet::default();
            let ended = session.run(&mut handler, rx).await;
            assert_eq!(handler.lost, 1, "one failed attempt, then the 30 s backoff");
            ended
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx.send_replace(true);
        let ended = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("run returns promptly on shutdown")
            .unwrap();
        assert_eq!(ended, Ended::Shutdown);
    }
}
