//! The service: one task owning the MQTT event loop, the fleet state and the vendor key.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gateway_fleet::command::MAX_PAYLOAD_BYTES;
use gateway_fleet::telemetry::{KeyBackend, KeyStoreTelemetry, TamperState};
use gateway_fleet::topics::{command_subscription, result_topic, state_topic, status_topic};
use gateway_fleet::{
    Command, DeviceId, FleetState, Op, StaffRole, StateMessage, StatusMessage, Telemetry,
    VendorKey, last_will, parse_command_topic, topics::telemetry_topic,
};
use gateway_mqtt::{
    Backoff, Broker, Flow, Handler, Publisher, Session, SessionConfig, SessionError, StatusEvent,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

/// First wait after a failed connection; doubled per failure up to [`BACKOFF_MAX`].
pub(crate) const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(60);
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Requests queued towards the event loop; publishing never waits on a full queue.
pub(crate) const REQUEST_CAPACITY: usize = 64;
/// Largest packet sent or accepted: a command envelope at its limit, plus the topic.
pub(crate) const MAX_PACKET_BYTES: usize = MAX_PAYLOAD_BYTES + 4096;

/// An error of a callback the daemon provides (its own error type, kept whole for the local
/// log; what reaches the vendor is described at each callback).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct CallbackError(Box<dyn std::error::Error + Send + Sync>);

impl CallbackError {
    /// Wraps the daemon's error.
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> CallbackError {
        CallbackError(error.into())
    }
}

/// Crypto-shred of the key store, provided by the daemon (blocking; called once per `wipe`).
/// The error stays in the local log; the vendor gets a fixed reason.
pub type WipeFn = Arc<dyn Fn() -> Result<(), CallbackError> + Send + Sync>;

/// The problems `check-config` finds in a document: one `key: message` line each (no
/// document content beyond clipped values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct ConfigProblems(pub Vec<String>);

impl std::ops::Deref for ConfigProblems {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

/// Validates a `config-update` document the way `gatewayd check-config` does.
pub type ValidateFn = Arc<dyn Fn(&str) -> Result<(), ConfigProblems> + Send + Sync>;

/// What became of a `config-update` the daemon applied before this start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOutcome {
    /// Every service started from the new configuration.
    Applied,
    /// The new configuration could not start its services (`why`, the daemon's start
    /// error, no document content); the previous one was restored.
    RolledBack { why: String },
}

/// The last `n` lines of the daemon's own log, oldest first (for `log-upload`).
pub type LogFn = Arc<dyn Fn(usize) -> Vec<String> + Send + Sync>;

/// A kiosk staff change asked for by `staff-invite` / `staff-disable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaffRequest {
    Invite { name: String, role: StaffRole },
    Disable { name: String },
}

/// Why the daemon refused a staff change: a stable `code` and a reason safe to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaffRefused {
    pub code: &'static str,
    pub reason: String,
}

/// Does a staff change (blocking: the account file and the audit trail; the agent runs it
/// on a blocking thread). `Ok` is the body published on `.../result` (for `staff-invite`
/// the one-time code: only the vendor sees it, nothing logs it).
pub type StaffFn =
    Arc<dyn Fn(StaffRequest) -> Result<serde_json::Value, StaffRefused> + Send + Sync>;

/// A verified `update` command handed to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateJob {
    pub cmd_id: String,
    pub url: String,
    pub sha256: [u8; 32],
    pub version: u64,
    pub size: u64,
}

/// Why the daemon refused to start an update (`busy`, `bad-args`, `no-space`, ...): a stable
/// code and a reason safe to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRefused {
    pub code: String,
    pub reason: String,
}

/// Starts an update (blocking: it writes the update record; the agent runs it on a blocking
/// thread). `Ok`: the daemon runs the update on its own and reports every state through the
/// channel of [`FleetAgent::with_update`].
pub type UpdateFn = Arc<dyn Fn(UpdateJob) -> Result<(), UpdateRefused> + Send + Sync>;

/// Called once the state message was queued (QoS 1): the daemon archives a final record.
pub type PublishedFn = Box<dyn FnOnce() + Send + Sync>;

/// One state of an update, from the daemon: published on the command's state topic while
/// connected (the channel holds it while the broker is away, so a final state after a
/// reboot goes out once connected).
pub struct UpdateEvent {
    pub message: StateMessage,
    /// With a final state: the command's result body (JSON), published on `.../result`
    /// before the state, as every op with a result does.
    pub result: Option<Vec<u8>>,
    pub published: Option<PublishedFn>,
}

impl fmt::Debug for UpdateEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateEvent")
            .field("message", &self.message)
            .field("result", &self.result.is_some())
            .field("published", &self.published.is_some())
            .finish()
    }
}

/// Called (on a blocking thread) each time the agent connected to the broker.
pub type ConnectedFn = Arc<dyn Fn() + Send + Sync>;

/// What the agent asks the daemon to do after a command completed.
#[derive(Clone, PartialEq, Eq)]
pub enum ExitRequest {
    /// A validated `config-update`: drain, write `toml` as the config file, start every
    /// service from it; if they cannot start, restore the previous file and start again
    /// from it. The outcome comes back through [`FleetAgent::with_config_outcome`].
    ApplyConfig { cmd_id: String, toml: String },
    /// The key store was wiped: stop every service and exit (the spool master key still in
    /// memory must go with the process).
    Wiped,
    /// `restart`: drain every service and start them again from the config file.
    Restart,
}

/// The document is printed as its length only.
impl fmt::Debug for ExitRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitRequest::ApplyConfig { cmd_id, toml } => f
                .debug_struct("ApplyConfig")
                .field("cmd_id", cmd_id)
                .field("toml_bytes", &toml.len())
                .finish(),
            ExitRequest::Wiped => f.write_str("Wiped"),
            ExitRequest::Restart => f.write_str("Restart"),
        }
    }
}

/// Errors that stop the agent from being built (the daemon reports them at start).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("node.id {id:?} cannot be an MQTT device id: {source}")]
    DeviceId {
        id: String,
        source: gateway_fleet::InvalidId,
    },
    #[error("fleet: {0}")]
    Session(#[from] SessionError),
}

/// Where and how to connect; built once by the daemon from `[fleet]`.
#[derive(Clone)]
pub struct AgentSettings {
    pub device: DeviceId,
    /// The fleet broker and the TLS client configuration (none: development `mqtt://`).
    pub broker: Broker,
    pub telemetry_interval: Duration,
    /// Firmware version reported in status and telemetry.
    pub version: String,
}

impl fmt::Debug for AgentSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentSettings")
            .field("device", &self.device)
            .field("broker", &self.broker)
            .field("telemetry_interval", &self.telemetry_interval)
            .finish()
    }
}

impl AgentSettings {
    /// Settings for `device_id` at `broker`; telemetry every 60 s, crate version.
    pub fn new(device_id: &str, broker: Broker) -> Result<AgentSettings, AgentError> {
        let device = DeviceId::new(device_id).map_err(|source| AgentError::DeviceId {
            id: device_id.to_owned(),
            source,
        })?;
        Ok(AgentSettings {
            device,
            broker,
            telemetry_interval: Duration::from_secs(60),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })
    }
}

/// What the daemon knows about itself, sampled for telemetry and `status`. The agent
/// fills `version`, `at` and `uptime_secs`. Must be cheap: it runs on the agent's task.
pub trait TelemetrySource: Send + Sync + fmt::Debug {
    fn sample(&self) -> Telemetry;
}

/// A source that always reports the same sample (tests, or a daemon without metrics).
#[derive(Debug, Clone)]
pub struct StaticTelemetry(pub Telemetry);

impl StaticTelemetry {
    /// An empty sample: no destinations, zero counters, the given key store back end.
    pub fn empty(backend: KeyBackend) -> StaticTelemetry {
        StaticTelemetry(Telemetry {
            version: String::new(),
            at: 0,
            uptime_secs: 0,
            disk_free_bytes: 0,
            last_upload_at: None,
            destinations: Vec::new(),
            dicom: Default::default(),
            hl7: Default::default(),
            keystore: KeyStoreTelemetry {
                backend,
                tamper: TamperState::Unknown,
            },
            spool: Default::default(),
        })
    }
}

impl TelemetrySource for StaticTelemetry {
    fn sample(&self) -> Telemetry {
        self.0.clone()
    }
}

/// The fleet agent. Build with [`FleetAgent::new`], then spawn [`FleetAgent::run`].
pub struct FleetAgent {
    settings: AgentSettings,
    key: VendorKey,
    state: FleetState,
    disabled: watch::Sender<bool>,
    telemetry: Arc<dyn TelemetrySource>,
    started: Instant,
    wipe: Option<WipeFn>,
    validate: Option<ValidateFn>,
    logs: Option<LogFn>,
    staff: Option<StaffFn>,
    exit: Option<mpsc::UnboundedSender<ExitRequest>>,
    /// Set by a successful `wipe`: sent to `exit` once `successful` is queued.
    pending_exit: Option<ExitRequest>,
    /// Applying a config-update is enabled (the daemon knows its config file).
    can_apply_config: bool,
    /// The outcome of a config-update applied before this start, published on connect.
    config_outcome: Option<(String, ConfigOutcome)>,
    /// The telemetry timer, made when the agent runs.
    telemetry_tick: Option<tokio::time::Interval>,
    /// `update`: the daemon's start function and its state messages.
    update: Option<UpdateFn>,
    update_events: Option<mpsc::UnboundedReceiver<UpdateEvent>>,
    /// An update state received by `wake`, published by `on_wake`.
    woke_update: Option<UpdateEvent>,
    connected_hook: Option<ConnectedFn>,
}

impl fmt::Debug for FleetAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetAgent")
            .field("settings", &self.settings)
            .field("key", &self.key)
            .field("state", &self.state)
            .field("wipe", &self.wipe.is_some())
            .finish_non_exhaustive()
    }
}

/// What one command did, for the final state message.
enum Outcome {
    Done,
    Failed {
        code: &'static str,
        reason: String,
    },
    /// The daemon finishes it (config-update): no final state now.
    Deferred,
}

impl FleetAgent {
    /// `disabled` is the channel the listeners and uplinks watch; the daemon creates it
    /// from `state` (`is_disabled() || is_wiped()`) before starting them.
    pub fn new(
        settings: AgentSettings,
        key: VendorKey,
        state: FleetState,
        disabled: watch::Sender<bool>,
        telemetry: Arc<dyn TelemetrySource>,
    ) -> FleetAgent {
        FleetAgent {
            settings,
            key,
            state,
            disabled,
            telemetry,
            started: Instant::now(),
            wipe: None,
            validate: None,
            logs: None,
            staff: None,
            exit: None,
            pending_exit: None,
            can_apply_config: false,
            config_outcome: None,
            telemetry_tick: None,
            update: None,
            update_events: None,
            woke_update: None,
            connected_hook: None,
        }
    }

    /// Enables `update`: `start` accepts or refuses the command (blocking, on a blocking
    /// thread); every later state (`downloading`, `installing`, `rebooting`, the final one,
    /// also one from before a restart) comes on `events` and is published on the command's
    /// state topic once connected. Without this call `update` ends `failed` /
    /// `not-supported`.
    #[must_use]
    pub fn with_update(
        mut self,
        start: UpdateFn,
        events: mpsc::UnboundedReceiver<UpdateEvent>,
    ) -> Self {
        self.update = Some(start);
        self.update_events = Some(events);
        self
    }

    /// Runs `hook` on a blocking thread each time the agent is connected (the update health
    /// check's "broker reached").
    #[must_use]
    pub fn with_connected_hook(mut self, hook: ConnectedFn) -> Self {
        self.connected_hook = Some(hook);
        self
    }

    /// Enables `log-upload`: the last `lines` lines of the daemon's log (which by the
    /// project's rules carries no patient data) on `.../result` as `{"lines": [...]}`,
    /// oldest lines dropped first to stay under the payload limit.
    #[must_use]
    pub fn with_logs(mut self, logs: LogFn) -> Self {
        self.logs = Some(logs);
        self
    }

    /// Enables `staff-invite` and `staff-disable` (without it both end `failed` /
    /// `not-supported`).
    #[must_use]
    pub fn with_staff(mut self, staff: StaffFn) -> Self {
        self.staff = Some(staff);
        self
    }

    /// Lets a valid `config-update` be applied ([`ExitRequest::ApplyConfig`] on the exit
    /// channel of [`FleetAgent::with_wipe`]); needs [`FleetAgent::with_config_validation`].
    #[must_use]
    pub fn with_config_apply(mut self) -> Self {
        self.can_apply_config = true;
        self
    }

    /// The outcome of the `config-update` `cmd_id` that the daemon applied (or rolled back,
    /// [`ConfigOutcome::RolledBack`]) before this start: published as its final state once
    /// connected.
    #[must_use]
    pub fn with_config_outcome(mut self, cmd_id: String, outcome: ConfigOutcome) -> Self {
        self.config_outcome = Some((cmd_id, outcome));
        self
    }

    /// Enables validation of `config-update` documents: an invalid one ends `failed` /
    /// `config-invalid` with the problems (reason, and all of them on `.../result`). A valid
    /// one is not applied by this build: `failed` / `not-supported`, nothing changed.
    #[must_use]
    pub fn with_config_validation(mut self, validate: ValidateFn) -> Self {
        self.validate = Some(validate);
        self
    }

    /// Enables the `wipe` operation: `wipe` crypto-shreds the key store; afterwards the
    /// agent sends [`ExitRequest::Wiped`] on `exit` and the daemon stops. Also enables
    /// `restart` ([`ExitRequest::Restart`] once `successful` is queued). Without this call
    /// both end `failed` / `not-supported`.
    #[must_use]
    pub fn with_wipe(mut self, wipe: WipeFn, exit: mpsc::UnboundedSender<ExitRequest>) -> Self {
        self.wipe = Some(wipe);
        self.exit = Some(exit);
        self
    }

    /// The fleet session: client id = device id, persistent, keep-alive 30 s, retained
    /// status with the `offline` last will, commands subscribed on every connection.
    fn session(&self) -> Result<Session, SessionError> {
        let s = &self.settings;
        let config = SessionConfig::new("fleet", s.device.as_id().clone(), s.broker.clone())
            .clean_session(false)
            .keep_alive(KEEP_ALIVE)
            .max_packet_bytes(MAX_PACKET_BYTES)
            .request_capacity(REQUEST_CAPACITY)
            .backoff(Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX))
            .subscribe(command_subscription(&s.device))?
            .status(status_topic(&s.device), last_will())?;
        Session::new(config)
    }

    /// Runs until `shutdown` turns true: connects, reconnects with backoff, handles
    /// commands and publishes telemetry. On shutdown it publishes the retained
    /// `offline`/`shutdown` status (best effort, at most 2 s) and disconnects.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) {
        let session = match self.session() {
            Ok(session) => session,
            Err(e) => {
                error!(error = %e, "the fleet agent does not run");
                return;
            }
        };
        info!(
            broker = %self.settings.broker,
            device = %self.settings.device,
            tls = self.settings.broker.is_tls(),
            presence = ?self.state.presence(),
            "fleet agent started"
        );
        let mut telemetry = tokio::time::interval(self.settings.telemetry_interval);
        telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.telemetry_tick = Some(telemetry);
        session.run(&mut self, shutdown).await;
        info!("fleet agent stopped");
    }

    /// After the command subscription and the status: telemetry, then the outcome of a
    /// config-update applied before this start.
    fn on_connected(&mut self, client: &Publisher) {
        self.publish_telemetry(client);
        if let Some(hook) = self.connected_hook.clone() {
            tokio::task::spawn_blocking(move || hook());
        }
        if let Some((cmd_id, outcome)) = self.config_outcome.take() {
            let op = "config-update";
            let Ok(topic) = state_topic(&self.settings.device, op, &cmd_id) else {
                return;
            };
            let message = match outcome {
                ConfigOutcome::Applied => StateMessage::successful(&cmd_id, op, now_unix()),
                ConfigOutcome::RolledBack { why } => StateMessage::failed(
                    &cmd_id,
                    op,
                    "config-rollback",
                    &format!(
                        "the new configuration could not start its services ({why}); the \
                         previous configuration was restored"
                    ),
                    now_unix(),
                ),
            };
            publish(client, topic, false, message.to_json());
        }
    }

    /// The retained status while connected: `online`, `disabled` or `wiped`.
    fn connected_status(&self) -> Vec<u8> {
        StatusMessage::connected(
            self.state.presence(),
            &self.settings.version,
            self.state.disabled_reason(),
            now_unix(),
        )
        .to_json()
    }

    fn publish_status(&self, client: &Publisher) {
        publish(
            client,
            status_topic(&self.settings.device),
            true,
            self.connected_status(),
        );
    }

    fn telemetry_sample(&self) -> Telemetry {
        let mut sample = self.telemetry.sample();
        sample.version = self.settings.version.clone();
        sample.at = now_unix();
        sample.uptime_secs = self.started.elapsed().as_secs();
        sample
    }

    fn publish_telemetry(&self, client: &Publisher) {
        let sample = self.telemetry_sample();
        publish(
            client,
            telemetry_topic(&self.settings.device),
            false,
            sample.to_json(),
        );
    }

    /// One incoming publish: a command, or something this agent ignores.
    async fn on_publish(&mut self, client: &Publisher, topic: &str, payload: &[u8]) {
        let device = self.settings.device.clone();
        let Some((op, cmd_id)) = parse_command_topic(&device, topic) else {
            debug!(
                bytes = payload.len(),
                "ignored a publish outside the command topics"
            );
            return;
        };
        let (op, cmd_id) = (op.to_owned(), cmd_id.to_owned());
        // Ids passed `is_valid_id`: the state topic can always be built.
        let Ok(state_topic) = state_topic(&device, &op, &cmd_id) else {
            return;
        };
        let send =
            |message: StateMessage| publish(client, state_topic.clone(), false, message.to_json());
        send(StateMessage::init(&cmd_id, &op, now_unix()));
        let verified = self.key.verify(
            payload,
            device.as_str(),
            &op,
            &cmd_id,
            now_unix(),
            self.state.last_seq(),
        );
        let command = match verified {
            Ok(command) => command,
            Err(rejection) => {
                warn!(%op, %cmd_id, code = rejection.code(), reason = %rejection.reason(), "fleet command rejected");
                send(StateMessage::rejected(&cmd_id, &op, &rejection, now_unix()));
                return;
            }
        };
        // Durable before anything runs: the same signed command can never run twice.
        if let Err(e) = self.state.accept(command.seq) {
            warn!(%op, %cmd_id, error = %e, "cannot persist the fleet sequence: command not run");
            send(StateMessage::failed(
                &cmd_id,
                &op,
                "state-write",
                "the gateway could not persist the command sequence; nothing was changed",
                now_unix(),
            ));
            return;
        }
        info!(%op, %cmd_id, seq = command.seq, "fleet command accepted");
        // An update reports its own progress (downloading, installing, rebooting).
        if !matches!(command.op, Op::Update { .. }) {
            send(StateMessage::executing(&cmd_id, &op, now_unix()));
        }
        let outcome = self.execute(client, &command).await;
        match outcome {
            Outcome::Done => {
                info!(%op, %cmd_id, "fleet command successful");
                send(StateMessage::successful(&cmd_id, &op, now_unix()));
                if let (Some(request), Some(exit)) = (self.pending_exit.take(), &self.exit) {
                    let _ = exit.send(request);
                }
            }
            Outcome::Deferred => {
                info!(%op, %cmd_id, "fleet command handed to the daemon");
                if let (Some(request), Some(exit)) = (self.pending_exit.take(), &self.exit) {
                    let _ = exit.send(request);
                }
            }
            Outcome::Failed { code, reason } => {
                warn!(%op, %cmd_id, code, %reason, "fleet command failed");
                send(StateMessage::failed(
                    &cmd_id,
                    &op,
                    code,
                    &reason,
                    now_unix(),
                ));
            }
        }
    }

    async fn execute(&mut self, client: &Publisher, command: &Command) -> Outcome {
        match &command.op {
            Op::StaffInvite { name, role } => {
                let request = StaffRequest::Invite {
                    name: name.as_str().to_owned(),
                    role: *role,
                };
                self.staff_change(client, command, request).await
            }
            Op::StaffDisable { name } => {
                let request = StaffRequest::Disable {
                    name: name.as_str().to_owned(),
                };
                self.staff_change(client, command, request).await
            }
            Op::Disable { reason } => {
                if let Err(e) = self.state.set_disabled(reason.as_deref()) {
                    warn!(error = %e, "cannot persist the disabled flag");
                    return state_write_failed();
                }
                self.disabled.send_replace(true);
                warn!(
                    "gateway DISABLED by a signed fleet command: listeners refuse, uploads pause"
                );
                self.publish_status(client);
                Outcome::Done
            }
            Op::Enable => {
                if self.state.is_wiped() {
                    return Outcome::Failed {
                        code: "wiped",
                        reason: "the gateway was wiped; it cannot be enabled again".into(),
                    };
                }
                if let Err(e) = self.state.set_enabled() {
                    warn!(error = %e, "cannot persist the enabled flag");
                    return state_write_failed();
                }
                self.disabled.send_replace(false);
                info!("gateway enabled by a signed fleet command");
                self.publish_status(client);
                Outcome::Done
            }
            Op::Status => {
                let Ok(topic) = result_topic(
                    &self.settings.device,
                    command.op.kind().as_str(),
                    &command.cmd_id,
                ) else {
                    return Outcome::Failed {
                        code: "internal",
                        reason: "no result topic".into(),
                    };
                };
                let body = serde_json::json!({
                    "state": self.state.presence(),
                    "disabled_reason": self.state.disabled_reason(),
                    "last_seq": self.state.last_seq(),
                    "telemetry": self.telemetry_sample(),
                });
                publish(client, topic, false, body.to_string().into_bytes());
                Outcome::Done
            }
            Op::Wipe if self.wipe.is_some() => self.wipe(client),
            Op::LogUpload { lines } if self.logs.is_some() => {
                self.log_upload(client, &command.cmd_id, *lines)
            }
            Op::Restart if self.exit.is_some() => {
                info!("restart requested by a signed fleet command");
                self.pending_exit = Some(ExitRequest::Restart);
                Outcome::Done
            }
            Op::ConfigUpdate { toml } if self.validate.is_some() => {
                self.config_update(client, &command.cmd_id, toml)
            }
            Op::Update {
                url,
                sha256,
                version,
                size,
            } if self.update.is_some() => {
                let job = UpdateJob {
                    cmd_id: command.cmd_id.clone(),
                    url: url.as_str().to_owned(),
                    sha256: *sha256,
                    version: *version,
                    size: *size,
                };
                self.start_update(job).await
            }
            Op::Provision { .. } => Outcome::Failed {
                code: "already-provisioned",
                reason: "this gateway is provisioned; provision is accepted only on its claim \
                         topics before that"
                    .into(),
            },
            Op::ConfigUpdate { .. }
            | Op::Wipe
            | Op::Restart
            | Op::LogUpload { .. }
            | Op::Update { .. } => Outcome::Failed {
                code: "not-supported",
                reason: format!(
                    "operation {} is not supported by this firmware yet; nothing was changed",
                    command.op.kind()
                ),
            },
        }
    }
}

impl FleetAgent {
    /// Hands an `update` to the daemon; its states come back on the update channel.
    async fn start_update(&mut self, job: UpdateJob) -> Outcome {
        let Some(start) = self.update.clone() else {
            return Outcome::Failed {
                code: "not-supported",
                reason: "update is not available in this daemon; nothing was changed".into(),
            };
        };
        match tokio::task::spawn_blocking(move || start(job)).await {
            Ok(Ok(())) => Outcome::Deferred,
            Ok(Err(refused)) => Outcome::Failed {
                code: leak_code(&refused.code),
                reason: refused.reason,
            },
            Err(e) => {
                warn!(error = %e, "the update start task failed");
                Outcome::Failed {
                    code: "internal",
                    reason: "the update could not start; nothing was changed".into(),
                }
            }
        }
    }

    /// Publishes one update state on its command's state topic.
    fn publish_update(&self, client: &Publisher, event: UpdateEvent) {
        let m = &event.message;
        let Ok(topic) = state_topic(&self.settings.device, &m.op, &m.cmd_id) else {
            warn!("an update state with an invalid command id was dropped");
            return;
        };
        info!(cmd_id = %m.cmd_id, state = ?m.state, code = ?m.code, "update state");
        if let Some(body) = event.result {
            match result_topic(&self.settings.device, &m.op, &m.cmd_id) {
                Ok(result) => publish(client, result, false, body),
                Err(_) => warn!("an update result with an invalid command id was dropped"),
            }
        }
        publish(client, topic, false, m.to_json());
        if let Some(published) = event.published {
            tokio::task::spawn_blocking(published);
        }
    }

    /// A staff change through the daemon, on a blocking thread; its body on `.../result`.
    async fn staff_change(
        &mut self,
        client: &Publisher,
        command: &Command,
        request: StaffRequest,
    ) -> Outcome {
        let op = command.op.kind().as_str();
        let (Some(staff), Ok(topic)) = (
            self.staff.clone(),
            result_topic(&self.settings.device, op, &command.cmd_id),
        ) else {
            return Outcome::Failed {
                code: "not-supported",
                reason: format!("{op} is not available in this daemon; nothing was changed"),
            };
        };
        match tokio::task::spawn_blocking(move || staff(request)).await {
            Ok(Ok(body)) => {
                publish(client, topic, false, body.to_string().into_bytes());
                Outcome::Done
            }
            Ok(Err(refused)) => Outcome::Failed {
                code: refused.code,
                reason: refused.reason,
            },
            Err(e) => {
                warn!(error = %e, "the staff change task failed");
                Outcome::Failed {
                    code: "internal",
                    reason: "the staff change could not run; nothing was changed".into(),
                }
            }
        }
    }

    fn log_upload(&mut self, client: &Publisher, cmd_id: &str, lines: u32) -> Outcome {
        let (Some(logs), Ok(topic)) = (
            self.logs.clone(),
            result_topic(&self.settings.device, "log-upload", cmd_id),
        ) else {
            return Outcome::Failed {
                code: "not-supported",
                reason: "log-upload is not available in this daemon".into(),
            };
        };
        let mut tail = logs(lines as usize);
        // Stay well under the broker's and the agent's packet limit.
        let budget = MAX_PAYLOAD_BYTES / 2;
        let mut size: usize = tail.iter().map(|l| l.len() + 4).sum();
        let mut dropped = 0usize;
        while size > budget && !tail.is_empty() {
            size -= tail.remove(0).len() + 4;
            dropped += 1;
        }
        let body = serde_json::json!({ "lines": tail, "dropped_for_size": dropped });
        publish(client, topic, false, body.to_string().into_bytes());
        Outcome::Done
    }

    /// Validates the document; publishes every problem on the result topic.
    fn config_update(&mut self, client: &Publisher, cmd_id: &str, toml: &str) -> Outcome {
        let Some(validate) = self.validate.clone() else {
            return Outcome::Failed {
                code: "not-supported",
                reason: "config-update is not available in this daemon".into(),
            };
        };
        match validate(toml) {
            Err(problems) => {
                if let Ok(topic) = result_topic(&self.settings.device, "config-update", cmd_id) {
                    let body = serde_json::json!({ "problems": problems.0 });
                    publish(client, topic, false, body.to_string().into_bytes());
                }
                Outcome::Failed {
                    code: "config-invalid",
                    reason: problems.join("; "),
                }
            }
            Ok(()) if self.can_apply_config && self.exit.is_some() => {
                info!(%cmd_id, "valid configuration: restarting every service with it");
                self.pending_exit = Some(ExitRequest::ApplyConfig {
                    cmd_id: cmd_id.to_owned(),
                    toml: toml.to_owned(),
                });
                Outcome::Deferred
            }
            Ok(()) => Outcome::Failed {
                code: "not-supported",
                reason: "the configuration is valid, but this daemon cannot apply a \
                         configuration remotely (no config file); nothing was changed"
                    .into(),
            },
        }
    }

    /// Stop serving, crypto-shred, record it, then (after `successful`) ask the daemon to
    /// exit. If the shred fails nothing is recorded and the previous serving state returns.
    fn wipe(&mut self, client: &Publisher) -> Outcome {
        let Some(wipe) = self.wipe.clone() else {
            return Outcome::Failed {
                code: "not-supported",
                reason: "wipe is not available in this daemon".into(),
            };
        };
        let was_disabled = *self.disabled.borrow();
        self.disabled.send_replace(true);
        warn!(
            "WIPE requested by a signed fleet command: listeners refuse, crypto-shredding the key store"
        );
        if let Err(e) = wipe() {
            warn!(error = %e, "the key store could not be wiped");
            self.disabled.send_replace(was_disabled);
            return Outcome::Failed {
                code: "wipe-failed",
                reason: "the key store could not be wiped; see the gateway's local log".into(),
            };
        }
        if let Err(e) = self.state.set_wiped() {
            // The keys are gone whatever this file says: the daemon cannot open the spool.
            warn!(error = %e, "key store wiped, but the wiped flag could not be persisted");
        }
        warn!("key store WIPED: every sealed spool object is unreadable; the gateway stops");
        self.publish_status(client);
        self.pending_exit = Some(ExitRequest::Wiped);
        Outcome::Done
    }
}

impl Handler for FleetAgent {
    fn status(&self, event: StatusEvent) -> Option<Vec<u8>> {
        Some(match event {
            StatusEvent::Connected => self.connected_status(),
            // A wiped box stays `wiped` for the vendor, not `offline`.
            StatusEvent::Closing if self.state.is_wiped() => StatusMessage::connected(
                self.state.presence(),
                &self.settings.version,
                None,
                now_unix(),
            )
            .to_json(),
            StatusEvent::Closing => StatusMessage::shutdown(now_unix()).to_json(),
        })
    }

    async fn on_connect(&mut self, out: &Publisher, _session_present: bool) {
        self.on_connected(out);
    }

    async fn on_message(&mut self, out: &Publisher, topic: &str, payload: &[u8]) -> Flow {
        self.on_publish(out, topic, payload).await;
        Flow::Continue
    }

    async fn wake(&mut self) {
        if self.woke_update.is_some() {
            return;
        }
        let tick = async {
            match &mut self.telemetry_tick {
                Some(tick) => {
                    tick.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let update = async {
            match &mut self.update_events {
                Some(events) => events.recv().await,
                None => std::future::pending().await,
            }
        };
        // Both are cancel-safe (an interval tick, an mpsc receive).
        tokio::select! {
            () = tick => {}
            event = update => match event {
                Some(event) => self.woke_update = Some(event),
                // The daemon's update task ended: no more states.
                None => self.update_events = None,
            },
        }
    }

    async fn on_wake(&mut self, out: &Publisher) {
        match self.woke_update.take() {
            Some(event) => self.publish_update(out, event),
            None => self.publish_telemetry(out),
        }
    }
}

/// The `code` of a refusal as the `'static` text the outcome carries: the known codes, else
/// a generic one (the daemon's own reason still goes out).
fn leak_code(code: &str) -> &'static str {
    const KNOWN: [&str; 6] = [
        "busy",
        "bad-args",
        "no-space",
        "install-failed",
        "download-failed",
        "not-supported",
    ];
    KNOWN
        .into_iter()
        .find(|k| *k == code)
        .unwrap_or("update-refused")
}

fn state_write_failed() -> Outcome {
    Outcome::Failed {
        code: "state-write",
        reason: "the gateway could not persist its fleet state; nothing was changed".into(),
    }
}

/// Queues a QoS 1 publish without waiting (the event loop runs on this same task).
pub(crate) fn publish(client: &Publisher, topic: String, retain: bool, payload: Vec<u8>) {
    if let Err(e) = client.publish(topic, retain, payload) {
        warn!(error = %e, "fleet publish dropped: request queue full or closed");
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
