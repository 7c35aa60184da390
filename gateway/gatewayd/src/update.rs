//! The fleet `update` command's glue: the key store as the version floor, the update
//! service task (download, install, reboot request, final states after a restart), and the
//! `gatewayd update health-check | pre-install | status` commands. The logic is
//! `gateway_update`'s.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use gateway_config::Settings;
use gateway_fleet::{CommandState, StateMessage};
use gateway_fleet_agent::{ConnectedFn, UpdateEvent, UpdateFn, UpdateJob, UpdateRefused};
use gateway_keystore::KeyStore;
use gateway_update::download::{self, DownloadSettings};
use gateway_update::health::{self, Check, HealthProbe};
use gateway_update::{
    BundleMeta, FloorError, HealthVerdict, Outcome, RaucCli, StartAction, UpdatePaths,
    UpdateRecord, Updater, UpdaterSettings, VersionFloor,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

const OP: &str = "update";

/// The key store's version floor (the TPM NV counter) as gateway-update's floor.
#[derive(Debug)]
pub(crate) struct KeyFloor(pub Arc<dyn KeyStore>);

impl VersionFloor for KeyFloor {
    fn floor(&self) -> Result<u64, FloorError> {
        self.0.version_floor().map_err(|e| FloorError {
            reason: e.to_string(),
        })
    }

    fn raise(&self, to: u64) -> Result<u64, FloorError> {
        self.0.raise_version_floor(to).map_err(|e| FloorError {
            reason: e.to_string(),
        })
    }
}

/// A floor that cannot be read (the key store did not open): every check fails closed.
#[derive(Debug)]
struct NoFloor(String);

impl VersionFloor for NoFloor {
    fn floor(&self) -> Result<u64, FloorError> {
        Err(FloorError {
            reason: self.0.clone(),
        })
    }

    fn raise(&self, _to: u64) -> Result<u64, FloorError> {
        self.floor()
    }
}

/// The state machine over `rauc` and the key store.
pub(crate) fn updater(settings: &Settings, keys: Arc<dyn KeyStore>) -> Updater {
    updater_with_floor(settings, Arc::new(KeyFloor(keys)))
}

fn updater_with_floor(settings: &Settings, floor: Arc<dyn VersionFloor>) -> Updater {
    Updater::new(
        UpdaterSettings {
            data_dir: settings.node.data_dir.clone(),
            compatible: gateway_update::COMPATIBLE.to_owned(),
            reboot_request_file: settings.update.reboot_request_file.clone(),
            reserve_bytes: 64 << 20,
        },
        Arc::new(RaucCli::new(settings.update.rauc_command.clone())),
        floor,
    )
}

/// What the fleet agent gets for `update`, and the task that runs updates.
pub(crate) struct AgentUpdate {
    pub start: UpdateFn,
    pub events: mpsc::UnboundedReceiver<UpdateEvent>,
    pub connected: ConnectedFn,
}

/// Builds the agent's update parts and the service task (spawn it beside the agent).
pub(crate) fn service(
    settings: &Settings,
    fleet: &gateway_config::Fleet,
    keys: Arc<dyn KeyStore>,
    shutdown: watch::Receiver<bool>,
) -> (AgentUpdate, impl Future<Output = ()> + Send + 'static) {
    let updater = updater(settings, Arc::clone(&keys));
    let (events_tx, events) = mpsc::unbounded_channel();
    let (jobs_tx, jobs) = mpsc::unbounded_channel::<UpdateRecord>();
    let max_bundle_bytes = settings.update.max_bundle_bytes.bytes();
    let start_updater = updater.clone();
    let start: UpdateFn = Arc::new(move |job: UpdateJob| {
        let record = start_updater
            .begin(
                &job.cmd_id,
                &job.url,
                &job.sha256,
                job.version,
                job.size,
                max_bundle_bytes,
            )
            .map_err(|f| UpdateRefused {
                code: f.code,
                reason: f.reason,
            })?;
        jobs_tx.send(record).map_err(|_| UpdateRefused {
            code: "not-supported".into(),
            reason: "the update service is not running; nothing was changed".into(),
        })
    });
    let data_dir = settings.node.data_dir.clone();
    let connected: ConnectedFn = Arc::new(move || broker_reached(&data_dir));
    let runner = Runner {
        updater,
        events: events_tx,
        settings: settings.clone(),
        fleet: fleet.clone(),
        keys,
        firmware_version: None,
    };
    (
        AgentUpdate {
            start,
            events,
            connected,
        },
        runner.run(jobs, shutdown),
    )
}

/// Writes this boot's id to `update/broker-reached` (the health check's "broker reached").
fn broker_reached(data_dir: &Path) {
    let paths = UpdatePaths::new(data_dir);
    let Some(boot_id) = gateway_update::machine::current_boot_id() else {
        return;
    };
    let written = gateway_durable::ensure_private_dir(&paths.dir)
        .and_then(|()| gateway_durable::write_atomic(&paths.broker_reached(), boot_id.as_bytes()));
    if let Err(e) = written {
        warn!(error = %e, "cannot record that the fleet broker was reached");
    }
}

struct Runner {
    updater: Updater,
    events: mpsc::UnboundedSender<UpdateEvent>,
    settings: Settings,
    fleet: gateway_config::Fleet,
    keys: Arc<dyn KeyStore>,
    /// IMAGE_VERSION of the firmware running (read once, when the task starts).
    firmware_version: Option<u64>,
}

impl Runner {
    async fn run(
        mut self,
        mut jobs: mpsc::UnboundedReceiver<UpdateRecord>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.firmware_version = tokio::task::spawn_blocking(running_firmware_version)
            .await
            .ok()
            .flatten();
        let work = async {
            self.at_start().await;
            while let Some(record) = jobs.recv().await {
                self.update(record).await;
            }
        };
        tokio::select! {
            () = work => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Updater) -> T + Send + 'static,
    ) -> Option<T> {
        let updater = self.updater.clone();
        match tokio::task::spawn_blocking(move || f(updater)).await {
            Ok(v) => Some(v),
            Err(e) => {
                error!(error = %e, "update task failed");
                None
            }
        }
    }

    /// The record found at start: resume, reinstall, ask for the reboot again, wait for
    /// the health check, or publish a final outcome.
    async fn at_start(&self) {
        let boot_id = gateway_update::machine::current_boot_id();
        let decided = self
            .blocking(move |u| u.decide_at_start(boot_id.as_deref()))
            .await;
        let action = match decided {
            Some(Ok(action)) => action,
            Some(Err(e)) => {
                error!(error = %e, "the update record cannot be read: no update runs until it is fixed");
                return;
            }
            None => return,
        };
        match action {
            StartAction::Nothing => {}
            StartAction::Publish(record) => self.publish_final(&record),
            StartAction::ResumeDownload(record) => {
                info!(cmd_id = %record.cmd_id, "resuming the update download");
                self.update(record).await;
            }
            StartAction::Reinstall(record) => {
                info!(cmd_id = %record.cmd_id, attempts = record.install_attempts, "the update install was cut: installing again");
                self.install(record).await;
            }
            StartAction::RequestReboot(mut record) => {
                self.progress(&record, CommandState::Rebooting).await;
                if let Some(Err(e)) = self.blocking(move |u| u.request_reboot(&mut record)).await {
                    error!(error = %e, "cannot request the reboot");
                }
            }
            StartAction::AwaitHealth(record) => {
                info!(cmd_id = %record.cmd_id, "trial boot of the new firmware: waiting for the health check");
                self.await_health().await;
            }
        }
    }

    /// Downloads, verifies, installs and asks for the reboot.
    async fn update(&self, mut record: UpdateRecord) {
        self.progress(&record, CommandState::Downloading).await;
        if let Err(failure) = self.download(&record).await {
            self.fail(record, failure).await;
            return;
        }
        let done = self
            .blocking(move |u| u.downloaded(&mut record).map(|()| record))
            .await;
        match done {
            Some(Ok(record)) => self.install(record).await,
            Some(Err(e)) => error!(error = %e, "cannot record the finished download"),
            None => {}
        }
    }

    async fn download(&self, record: &UpdateRecord) -> Result<(), gateway_update::Failure> {
        let failure = |reason: String| gateway_update::Failure::new("download-failed", reason);
        let tls = self.client_tls().map_err(failure)?;
        let client = download::http_client(tls).map_err(|e| failure(e.to_string()))?;
        let sha256 = record
            .sha256_bytes()
            .ok_or_else(|| failure("the record's SHA-256 is not 64 hex digits".into()))?;
        let settings = DownloadSettings {
            url: record.url.clone(),
            size: record.size,
            sha256,
            deadline: self.settings.update.download_deadline.get(),
            max_attempts: 20,
            retry_wait: Duration::from_secs(5),
            pacer: self
                .settings
                .update
                .max_bytes_per_sec
                .map(|b| gateway_uplink::Pacer::new(b.bytes())),
        };
        let paths = UpdatePaths::new(&self.settings.node.data_dir);
        download::download(&client, &paths, &settings)
            .await
            .map_err(|e| gateway_update::Failure::new(e.code(), e.to_string()))
    }

    /// The bundle server's TLS client configuration: `update.ca_file` (default
    /// `fleet.ca_file`) and the fleet's client authentication (the device identity).
    fn client_tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let ca_file = self
            .settings
            .update
            .ca_file
            .as_ref()
            .or(self.fleet.ca_file.as_ref())
            .ok_or("no CA for the bundle server: set update.ca_file or fleet.ca_file")?;
        let auth = crate::tls_auth::configured(
            self.fleet.client_auth,
            self.fleet.cert_file.as_ref(),
            self.fleet.key_file.as_ref(),
            self.keys.as_ref(),
            &self.settings.node.data_dir,
            "the bundle server (the [fleet] section's client_auth)",
        )?;
        gateway_tls::client_config(ca_file, auth).map_err(|e| e.to_string())
    }

    /// `installing`, every check, `rauc install`, `rebooting`, the reboot request.
    async fn install(&self, record: UpdateRecord) {
        self.progress(&record, CommandState::Installing).await;
        let result = self
            .blocking(move |u| {
                let mut record = record;
                let result = u.verify_and_install(&mut record);
                (record, result)
            })
            .await;
        let Some((mut record, result)) = result else {
            return;
        };
        if let Err(failure) = result {
            self.fail(record, failure).await;
            return;
        }
        self.progress(&record, CommandState::Rebooting).await;
        if let Some(Err(e)) = self.blocking(move |u| u.request_reboot(&mut record)).await {
            error!(error = %e, "cannot request the reboot");
        }
    }

    async fn fail(&self, mut record: UpdateRecord, failure: gateway_update::Failure) {
        warn!(cmd_id = %record.cmd_id, code = %failure.code, reason = %failure.reason, "update failed");
        let saved = self
            .blocking(move |u| u.fail(&mut record, &failure).map(|()| record))
            .await;
        match saved {
            Some(Ok(record)) => self.publish_final(&record),
            Some(Err(e)) => error!(error = %e, "cannot record the update's failure"),
            None => {}
        }
    }

    /// Polls the record until the health check (a separate process) decides.
    async fn await_health(&self) {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            match self.blocking(|u| u.store().load()).await {
                Some(Ok(Some(record))) if record.is_final() => {
                    self.publish_final(&record);
                    return;
                }
                Some(Ok(Some(_))) => {}
                Some(Ok(None)) | None => return,
                Some(Err(e)) => {
                    error!(error = %e, "the update record cannot be read");
                    return;
                }
            }
        }
    }

    /// Queues a progress state and waits (at most 10 s) until the agent published it, so
    /// `rebooting` goes out before the box reboots.
    async fn progress(&self, record: &UpdateRecord, state: CommandState) {
        let (tx, rx) = oneshot::channel::<()>();
        let event = UpdateEvent {
            message: StateMessage::progress(&record.cmd_id, OP, state, now_unix()),
            result: None,
            published: Some(Box::new(move || {
                let _ = tx.send(());
            })),
        };
        if self.events.send(event).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
    }

    /// The final state; once the agent queued it the record is archived (`last.json`).
    fn publish_final(&self, record: &UpdateRecord) {
        let Some(message) = final_message(record) else {
            return;
        };
        let store = self.updater.store().clone();
        let event = UpdateEvent {
            message,
            result: Some(result_body(record, self.firmware_version)),
            published: Some(Box::new(move || {
                if let Err(e) = store.archive() {
                    warn!(error = %e, "cannot archive the published update record");
                }
            })),
        };
        let _ = self.events.send(event);
    }
}

/// The state message of a final record.
pub(crate) fn final_message(record: &UpdateRecord) -> Option<StateMessage> {
    let at = now_unix();
    Some(match record.outcome.as_ref()? {
        Outcome::Successful => StateMessage::successful(&record.cmd_id, OP, at),
        Outcome::Failed { code, reason } => {
            StateMessage::failed(&record.cmd_id, OP, code, reason, at)
        }
        Outcome::RolledBack { reason } => {
            StateMessage::rolled_back(&record.cmd_id, OP, reason.as_str(), at)
        }
    })
}

/// The body on the command's `.../result` topic with its final state: the outcome, the
/// bundle's version, the slots, and the firmware version this box runs now
/// (`firmware_version`: IMAGE_VERSION of /usr/lib/os-release; null where there is none,
/// e.g. outside the image).
fn result_body(record: &UpdateRecord, firmware_version: Option<u64>) -> Vec<u8> {
    let (state, code, reason) = match &record.outcome {
        Some(Outcome::Successful) => ("successful", None, None),
        Some(Outcome::Failed { code, reason }) => {
            ("failed", Some(code.as_str()), Some(reason.clone()))
        }
        Some(Outcome::RolledBack { reason }) => (
            "rolled-back",
            Some(reason.as_str()),
            Some(reason.as_str().to_owned()),
        ),
        None => ("unknown", None, None),
    };
    serde_json::json!({
        "state": state,
        "code": code,
        "reason": reason,
        "bundle_version": record.version,
        "from_slot": record.from_slot,
        "target_slot": record.target_slot,
        "firmware_version": firmware_version,
    })
    .to_string()
    .into_bytes()
}

/// IMAGE_VERSION of /usr/lib/os-release (the image's firmware version), if any.
fn running_firmware_version() -> Option<u64> {
    let text = std::fs::read_to_string("/usr/lib/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("IMAGE_VERSION="))
        .and_then(|v| v.trim().trim_matches('"').parse().ok())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// --- the commands ----------------------------------------------------------------------------

fn open_keys(settings: &Settings) -> Result<Arc<dyn KeyStore>, String> {
    gateway_keystore::open(&crate::ops::backend(settings), &settings.node.data_dir)
        .map(Arc::from)
        .map_err(|e| e.to_string())
}

/// `gatewayd update status`: the record in progress, else the last one, as JSON.
pub(crate) fn status(config: &Path) -> ExitCode {
    let settings = match crate::ops::load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let store = gateway_update::RecordStore::new(&settings.node.data_dir);
    let shown = match store.load() {
        Ok(Some(r)) => Ok(serde_json::json!({"in_progress": true, "record": r})),
        Ok(None) => store
            .load_last()
            .map(|r| serde_json::json!({"in_progress": false, "record": r})),
        Err(e) => Err(e),
    };
    match shown {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatewayd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `gatewayd update pre-install` (RAUC's pre-install handler): checks the bundle's signed
/// `gateway-update.json` against the floor and the data format; a refusal prints the
/// marker and the code and exits 1, which fails `rauc install` before any slot write.
pub(crate) fn pre_install(config: &Path) -> ExitCode {
    // The exit code is what reaches `rauc install`; the line goes to the rauc service's log.
    let refuse = |code: &str, reason: &str| {
        eprintln!(
            "{} {code} ({reason})",
            gateway_update::installer::REFUSAL_MARKER
        );
        ExitCode::from(gateway_update::installer::pre_install_exit_code(code))
    };
    let settings = match crate::ops::load(config) {
        Ok(s) => s,
        Err(_) => return refuse("install-failed", "the gateway configuration cannot be read"),
    };
    let (Some(mount), Some(mf_version)) = (
        std::env::var_os("RAUC_BUNDLE_MOUNT_POINT"),
        std::env::var("RAUC_MF_VERSION").ok(),
    ) else {
        return refuse(
            "install-failed",
            "RAUC_BUNDLE_MOUNT_POINT and RAUC_MF_VERSION must be set (run by rauc install)",
        );
    };
    let meta_path = PathBuf::from(mount).join(gateway_update::manifest::FILE_NAME);
    let meta = match BundleMeta::load(&meta_path) {
        Ok(Some(m)) => m,
        Ok(None) => return refuse("install-failed", "the bundle has no gateway-update.json"),
        Err(f) => return refuse(&f.code, &f.reason),
    };
    let floor =
        match open_keys(&settings).and_then(|k| KeyFloor(k).floor().map_err(|e| e.to_string())) {
            Ok(f) => f,
            Err(e) => {
                return refuse(
                    "install-failed",
                    &format!("cannot read the version floor: {e}"),
                );
            }
        };
    let box_format = match gateway_durable::data_format::read(&settings.node.data_dir) {
        Ok(f) => f,
        Err(e) => return refuse("data-format", &e.to_string()),
    };
    if let Err(f) = gateway_update::manifest::check(&meta, &mf_version, floor, box_format) {
        return refuse(&f.code, &f.reason);
    }
    let paths = UpdatePaths::new(&settings.node.data_dir);
    let copied = serde_json::to_vec(&meta)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            gateway_durable::ensure_private_dir(&paths.dir)
                // Run as root by RAUC: the file must stay readable by the health check,
                // which runs as the service user that owns the folder.
                .and_then(|()| {
                    gateway_durable::write_atomic_as_dir_owner(&paths.bundle_meta(), &bytes)
                })
                .map_err(|e| e.to_string())
        });
    if let Err(e) = copied {
        return refuse("install-failed", &e);
    }
    println!(
        "gatewayd: bundle version {} (min {}, data format {}) accepted; floor {floor}",
        meta.version, meta.min_version, meta.data_format
    );
    ExitCode::SUCCESS
}

/// `gatewayd update health-check`: on a trial boot, READY + spool verify + broker reached
/// within the bound, then mark good and raise the floor; exit 1 when unhealthy (the unit's
/// FailureAction reboots into the old slot). On any other boot: nothing, exit 0.
pub(crate) fn health_check(config: &Path, timeout: Option<u64>) -> ExitCode {
    let settings = match crate::ops::load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    // A key store that does not open is an unhealthy firmware, recorded as such.
    let (floor, keys_problem): (Arc<dyn VersionFloor>, Option<String>) = match open_keys(&settings)
    {
        Ok(k) => (Arc::new(KeyFloor(k)), None),
        Err(e) => (Arc::new(NoFloor(e.clone())), Some(e)),
    };
    let updater = updater_with_floor(&settings, Arc::clone(&floor));
    match updater.trial_started() {
        Ok(true) => {}
        Ok(false) => {
            println!("gatewayd: not a trial boot of an update: nothing to check");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("gatewayd: {e}");
            return ExitCode::from(1);
        }
    }
    let bound = timeout.map_or(settings.update.health_timeout.get(), Duration::from_secs);
    let mut probe = Probe {
        settings: &settings,
    };
    let mut report = health::run(&mut probe, bound, Duration::from_secs(2));
    if let Some(problem) = keys_problem {
        report.healthy = false;
        report.failing.push(("keys", problem));
    }
    for (check, problem) in &report.failing {
        eprintln!("gatewayd: health check {check}: {problem}");
    }
    match updater.record_health(report.healthy) {
        Ok(HealthVerdict::MarkedGood) => {
            // The floor is raised after mark-good; say where it stands (a floor that could
            // not be raised leaves downgrades to it possible: the vendor must know).
            let floor = floor
                .floor()
                .map_or_else(|e| format!("unreadable: {}", e.reason), |f| f.to_string());
            println!(
                "gatewayd: the new firmware is healthy ({} s): slot marked good; version floor {floor}",
                report.elapsed.as_secs()
            );
            ExitCode::SUCCESS
        }
        Ok(HealthVerdict::NotATrial) => ExitCode::SUCCESS,
        Ok(HealthVerdict::Failed) => {
            eprintln!("gatewayd: the new firmware is not healthy: the next boot is the old slot");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("gatewayd: {e}");
            ExitCode::from(1)
        }
    }
}

struct Probe<'a> {
    settings: &'a Settings,
}

impl HealthProbe for Probe<'_> {
    fn ready(&mut self) -> Check {
        let admin = self
            .settings
            .admin
            .as_ref()
            .ok_or("no [admin] section: READY cannot be checked")?;
        healthz(admin.listen)
    }

    fn spool(&mut self) -> Check {
        use gateway_admin::control::{Request, Response};
        match crate::ops::send_or_execute(self.settings, &Request::Verify)? {
            Response::Verify(report) if report.is_consistent() => Ok(()),
            Response::Verify(_) => Err("the spool index does not verify".into()),
            _ => Err("unexpected answer to spool verify".into()),
        }
    }

    fn broker(&mut self) -> Check {
        let paths = UpdatePaths::new(&self.settings.node.data_dir);
        let boot_id = gateway_update::machine::current_boot_id().ok_or("no boot id")?;
        match std::fs::read_to_string(paths.broker_reached()) {
            Ok(s) if s.trim() == boot_id => Ok(()),
            Ok(_) => Err("the fleet broker was not reached in this boot yet".into()),
            Err(_) => Err("the fleet broker was not reached yet".into()),
        }
    }
}

/// `GET /healthz` on the admin listener: 200 is READY.
fn healthz(listen: std::net::SocketAddr) -> Check {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("/healthz: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| format!("/healthz: {e}"))?;
    let mut head = [0u8; 32];
    let n = stream
        .read(&mut head)
        .map_err(|e| format!("/healthz: {e}"))?;
    let line = String::from_utf8_lossy(head.get(..n).unwrap_or_default()).into_owned();
    if line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err("/healthz is not ready".into())
    }
}
