//! `gatewayd run`: builds every configured service from the settings, starts them as tokio
//! tasks sharing one shutdown signal, and drains them on SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use gateway_admin::control::ControlServer;
use gateway_admin::http::{AdminHttp, Health};
use gateway_config::UplinkKind;
use gateway_config::{ConfigFile, KeystoreBackend, Mode, Settings, UpdateCommit};
use gateway_dicom::{DicomService, DicomSettings, Peer, PolicySettings};
use gateway_fleet::FleetState;
use gateway_fleet::telemetry::KeyBackend;
use gateway_fleet_agent::{ExitRequest, WipeFn};
use gateway_keystore::{KeyStore, KeyStoreError};
use gateway_mllp::{Hl7Service, Hl7Settings};
use gateway_spool::Spool;
use gateway_uplink::mllp::{MllpSettings, MllpUplinkService};
use gateway_uplink::syslog::{SyslogSettings, SyslogUplinkService};
use gateway_uplink::{Metrics as UplinkMetrics, UplinkService, UplinkSettings};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::cli::RunArgs;
use crate::ops;
use crate::telemetry;

pub fn main(args: &RunArgs) -> ExitCode {
    init_logging();
    // An update a power cut or crash interrupted is picked up here (tried again or reported
    // failed; see gateway_config::update).
    let mut config = match ConfigFile::open(args.config.clone()) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            eprintln!("gatewayd: {e}");
            return ExitCode::FAILURE;
        }
    };
    if config.path().is_none() {
        info!("no --config given: running the embedded development default");
    }
    let mut settings = match first_settings(&mut config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    loop {
        let config_path = config.path().map(Path::to_path_buf);
        let outcome = config
            .take_outcome()
            .map(|o| (o.cmd_id, o.failure.map_or(Ok(()), Err)));
        let commit = config.pending_commit();
        let started = runtime.block_on(serve(settings, config_path, outcome, commit));
        let next = match started {
            Ok(Ending::Stopped) => return ExitCode::SUCCESS,
            Ok(Ending::Restart) => {
                info!("restarting every service (signed fleet command)");
                config.restart()
            }
            Ok(Ending::ApplyConfig { cmd_id, toml }) => {
                let applied = config.apply(&cmd_id, &toml);
                if config.is_trying_update()
                    && let Some(path) = config.path()
                {
                    warn!(cmd_id, path = %path.display(), "configuration replaced by a signed fleet command: starting every service with it");
                }
                applied
            }
            Err(message) => {
                if config.is_trying_update() {
                    error!(error = %message, "the new configuration cannot start its services: restoring the previous one");
                }
                config.start_failed(message)
            }
        };
        settings = match next {
            Ok(s) => s,
            Err(e) => {
                let message = e.to_string();
                error!("{message}");
                eprintln!("gatewayd: {message}");
                return ExitCode::FAILURE;
            }
        };
    }
}

/// The settings of the first start. What does not load, or what this build cannot serve (a
/// back end compiled out), is refused like a config problem before anything is created on
/// disk; while an update interrupted by a power cut or crash is tried, it is rolled back
/// instead and the previous file is checked the same way.
fn first_settings(config: &mut ConfigFile) -> Result<Settings, ExitCode> {
    // (problems, whether to log them too: a build problem is logged, a config file problem
    // only printed, as `check-config` does)
    let (problems, log): (Vec<String>, bool) = match config.load() {
        Ok(settings) => {
            let unavailable = ops::build_problems(&settings);
            if unavailable.is_empty() {
                return Ok(settings);
            }
            (unavailable.iter().map(ToString::to_string).collect(), true)
        }
        Err(problems) => (
            problems.problems.iter().map(ToString::to_string).collect(),
            false,
        ),
    };
    if config.is_trying_update() {
        let message = problems.join("; ");
        error!(error = %message, "the configuration being tried cannot start: restoring the previous one");
        if let Err(e) = config.start_failed(message) {
            error!("{e}");
            eprintln!("gatewayd: {e}");
            return Err(ExitCode::from(2));
        }
        return first_settings(config);
    }
    for p in &problems {
        if log {
            error!("{p}");
        }
        eprintln!("{p}");
    }
    Err(ExitCode::from(2))
}

/// Why [`serve`] returned without an error.
enum Ending {
    /// A validated signed `config-update`: write it and serve from it (rollback on failure).
    ApplyConfig { cmd_id: String, toml: String },
    /// SIGTERM/SIGINT, or the key store was wiped: exit.
    Stopped,
    /// A signed `restart`: serve again.
    Restart,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAYD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::logring::TeeWriter::default)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

async fn serve(
    settings: Settings,
    config_path: Option<PathBuf>,
    config_outcome: Option<(String, Result<(), String>)>,
    commit: Option<UpdateCommit>,
) -> Result<Ending, String> {
    let data_dir = settings.node.data_dir.clone();
    info!(node = %settings.node.id.as_str(), role = settings.node.role.as_str(), mode = settings.node.mode.as_str(), "gatewayd starting");
    // The data folder, the fleet state, the key store (TPM unseal) and the spool (open,
    // crash recovery) are file and device work: a blocking thread, not an async worker.
    // The data format is checked first: a newer one (written by a newer firmware this box
    // rolled back from) is refused before anything under the data folder is opened.
    let opened = {
        let (settings, data_dir) = (settings.clone(), data_dir.clone());
        tokio::task::spawn_blocking(move || {
            gateway_durable::ensure_private_dir(&data_dir).map_err(|e| e.to_string())?;
            let format = gateway_durable::data_format::check_or_init(&data_dir)
                .map_err(|e| e.to_string())?;
            info!(data_format = format, "data format checked");
            let fleet = fleet_state(&data_dir)?;
            let keys: Arc<dyn KeyStore> = Arc::from(open_keystore(&settings)?);
            let master = keys.spool_master_key().map_err(|e| e.to_string())?;
            let derived = crate::booking::Derived::new(master.expose());
            let deid = crate::deid::open(&settings, &master)?;
            let spool = open_spool(&settings, master)?;
            Ok::<_, String>((fleet, keys, derived, deid, spool))
        })
        .await
        .map_err(|e| format!("start-up thread: {e}"))??
    };
    let ((fleet_state, disabled_tx, disabled), keys, derived, deid, spool) = opened;

    let mut registry = Registry::default();
    spool.register_metrics(&mut registry);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<ExitRequest>();
    let mut services = JoinSet::new();
    let transfer_audit = crate::transfer_audit::TransferAudit::start(
        crate::ops::audit_dir(&settings),
        derived.audit(),
    )?;
    let ctx = Wiring {
        settings: &settings,
        spool: &spool,
        disabled: &disabled,
        shutdown: &shutdown,
        transfer_audit: transfer_audit.sink(),
    };

    let mut control = ControlServer::bind(&data_dir, spool.clone()).map_err(|e| e.to_string())?;
    let booking = start_booking(&ctx, &derived, keys.as_ref(), &mut registry).await?;
    if let Some(extension) = booking.as_ref().and_then(|b| b.control.clone()) {
        control = control.with_extension(extension);
    }
    if let Some(map) = &deid.map {
        control = control.with_extension(Arc::new(crate::deid::DeidControl::new(
            map.clone(),
            crate::ops::audit_dir(&settings),
            derived.audit(),
        )));
    }
    let staff = crate::fleet::StaffParts::new(&data_dir, derived.staff(), derived.audit());
    let hl7_audit = derived.audit();
    start_audit_export(&ctx, derived.audit(), &mut registry, &mut services)?;
    drop(derived);
    let core = booking.as_ref().and_then(|b| b.core.as_ref());
    let dicom_metrics =
        start_dicom(&ctx, core, keys.as_ref(), &mut registry, &mut services).await?;
    let hl7_metrics = start_hl7(&ctx, core, hl7_audit, &mut registry, &mut services).await?;
    services.spawn(spool.clone().run_housekeeping(shutdown.clone()));
    if let Some(started) = booking {
        for task in started.tasks {
            services.spawn(task);
        }
    }
    let uplink_metrics = start_uplinks(&ctx, keys.as_ref(), &deid, &mut registry, &mut services)?;
    let metrics = telemetry::MetricSources {
        dicom: dicom_metrics,
        hl7: hl7_metrics,
        uplink: uplink_metrics,
    };
    let health = Health::default();
    let registry = Arc::new(registry);
    start_admin(&ctx, &registry, &health, &mut services).await?;
    // Last: the agent reports a config-update's outcome only once everything else started.
    let fleet = FleetParts {
        state: fleet_state,
        disabled: disabled_tx,
        exit: exit_tx.clone(),
        config_path,
        config_outcome,
        staff,
        keys: Arc::clone(&keys),
    };
    start_fleet(&ctx, fleet, keys.as_ref(), metrics, &mut services)?;
    services.spawn(control.run(shutdown.clone()));
    let notifier = start_watchdog(&shutdown, &mut services);
    // Every service started from the file being tried: it is no longer an update to roll
    // back at the next start. Before READY=1, so a clean stop after it keeps the new file.
    if let Some(commit) = commit {
        tokio::task::spawn_blocking(move || commit.commit())
            .await
            .map_err(|e| format!("config commit thread: {e}"))?
            .map_err(|e| e.to_string())?;
    }
    health.set_ready(true);
    notifier.notify_logged("READY=1\nSTATUS=serving");
    info!("gatewayd ready");

    drop(exit_tx);
    let ending = tokio::select! {
        signalled = wait_for_signal() => { signalled?; Ending::Stopped }
        Some(request) = exit_rx.recv() => match request {
            ExitRequest::Wiped => {
                warn!("the key store was wiped by a signed fleet command: stopping every service");
                Ending::Stopped
            }
            ExitRequest::Restart => Ending::Restart,
            ExitRequest::ApplyConfig { cmd_id, toml } => Ending::ApplyConfig { cmd_id, toml },
        },
    };
    info!("shutdown requested: draining");
    // A signed restart or config-update serves again in this process: systemd hears
    // RELOADING=1 now and READY=1 when the services are back, not STOPPING=1 (which
    // would start its stop timeout).
    notifier.notify_logged(match ending {
        Ending::Stopped => "STOPPING=1\nSTATUS=draining",
        Ending::Restart | Ending::ApplyConfig { .. } => "RELOADING=1\nSTATUS=restarting",
    });
    health.set_ready(false);
    let _ = shutdown_tx.send(true);
    while let Some(joined) = services.join_next().await {
        if let Err(e) = joined {
            error!(error = %e, "a service task failed");
        }
    }
    drop(spool);
    transfer_audit.finish().await;
    info!("gatewayd stopped");
    Ok(ending)
}

/// What every service is started with: the settings, the spool, the vendor's disabled
/// flag and the shutdown signal.
struct Wiring<'a> {
    settings: &'a Settings,
    spool: &'a Spool,
    disabled: &'a watch::Receiver<bool>,
    shutdown: &'a watch::Receiver<bool>,
    /// The audit trail's sink for DICOM instances received.
    transfer_audit: &'a gateway_dicom::TransferSink,
}

/// The service tasks of one `serve`.
type Services = JoinSet<()>;

/// The fleet state, read before any listener starts, and the disabled flag handed to the
/// services.
fn fleet_state(
    data_dir: &Path,
) -> Result<(FleetState, watch::Sender<bool>, watch::Receiver<bool>), String> {
    // The disabled flag is honoured whether or not [fleet] is configured: removing the
    // section from the config must not revive a box the vendor disabled.
    let fleet_state = FleetState::load(data_dir).map_err(|e| e.to_string())?;
    if fleet_state.is_wiped() {
        return Err(format!(
            "this gateway was wiped by a signed vendor command ({}): its keys are gone and it \
             refuses service; re-provision it",
            fleet_state.path().display()
        ));
    }
    let (disabled_tx, disabled) =
        watch::channel(fleet_state.is_disabled() || fleet_state.is_wiped());
    if *disabled.borrow() {
        warn!(
            presence = ?fleet_state.presence(),
            "the gateway is DISABLED by the vendor (fleet state): listeners refuse new \
             associations and connections, uploads are paused"
        );
    }
    Ok((fleet_state, disabled_tx, disabled))
}

/// The spool with its `[spool]` retention, recovered after a crash.
fn open_spool(settings: &Settings, master: gateway_keystore::MasterKey) -> Result<Spool, String> {
    let spool = ops::open_spool(settings, Some(master))?;
    spool.set_keep_sent_for(settings.spool.keep_sent_for.get());
    spool.set_dedupe_window(settings.spool.dedupe_window.get());
    spool.recover().map_err(|e| e.to_string())?;
    Ok(spool)
}

/// `[booking]`: the kiosk and the regional exchange (their tasks are spawned by `serve`).
async fn start_booking(
    ctx: &Wiring<'_>,
    derived: &crate::booking::Derived,
    keys: &dyn KeyStore,
    registry: &mut Registry,
) -> Result<Option<crate::booking::Started>, String> {
    let settings = ctx.settings;
    let results_metrics = match &settings.results {
        Some(_) => gateway_results::Metrics::register(registry),
        None => gateway_results::Metrics::default(),
    };
    let identity_metrics = match &settings.identity {
        Some(_) => gateway_registry::Metrics::register(registry),
        None => gateway_registry::Metrics::default(),
    };
    let safety_metrics = match &settings.safety {
        Some(_) => gateway_safety::Metrics::register(registry),
        None => gateway_safety::Metrics::default(),
    };
    // A clinic pulls returned results with the identity and URL of `results.source`.
    let results_source = match (&settings.results, settings.node.role) {
        (Some(r), gateway_config::Role::Clinic) => settings
            .uplinks
            .iter()
            .find(|u| u.name == r.source)
            .map(|u| uplink_settings(u, &settings.node.data_dir, keys))
            .transpose()?,
        _ => None,
    };
    let booking = match &settings.booking {
        Some(booking) => Some(
            crate::booking::start(
                settings,
                booking,
                ctx.spool,
                derived,
                keys.identity(),
                crate::booking::FeatureParts {
                    results_source,
                    results_metrics,
                    identity_metrics,
                    safety_metrics,
                },
                ctx.shutdown,
            )
            .await?,
        ),
        None => None,
    };
    Ok(booking)
}

/// `[dicom]`: the DIMSE listener (with the core's worklist); its metric handles.
async fn start_dicom(
    ctx: &Wiring<'_>,
    core: Option<&crate::booking::CoreParts>,
    keys: &dyn KeyStore,
    registry: &mut Registry,
    services: &mut Services,
) -> Result<Option<gateway_dicom::metrics::Metrics>, String> {
    let mut metrics = None;
    if let Some(dicom) = &ctx.settings.dicom {
        let mut settings = dicom_settings(dicom);
        settings.tls = crate::dicom_tls::listener(dicom, &ctx.settings.node.data_dir, keys)?;
        let mut service = DicomService::bind(settings, ctx.spool.clone(), registry)
            .await
            .map_err(|e| e.to_string())?
            .with_disabled(ctx.disabled.clone())
            .with_transfer_audit(ctx.transfer_audit.clone());
        if let Some(core) = core {
            service = service.with_worklist(Arc::new(crate::booking::LedgerWorklist::new(core)));
        }
        metrics = Some(service.metrics());
        services.spawn(service.run(ctx.shutdown.clone()));
    }
    Ok(metrics)
}

/// `[hl7]`: the MLLP listener (on the core, RIS messages update the ledger); its metric
/// handles. With `[[hl7.peers]]`, refusals are recorded in the audit trail (`audit_key`
/// opens it).
async fn start_hl7(
    ctx: &Wiring<'_>,
    core: Option<&crate::booking::CoreParts>,
    audit_key: gateway_audit::AuditKey,
    registry: &mut Registry,
    services: &mut Services,
) -> Result<Option<gateway_mllp::Metrics>, String> {
    let mut metrics = None;
    if let Some(hl7) = &ctx.settings.hl7 {
        let mut service = Hl7Service::bind(hl7_settings(hl7)?, ctx.spool.clone(), registry)
            .await
            .map_err(|e| e.to_string())?
            .with_disabled(ctx.disabled.clone());
        if !hl7.peers.is_empty() {
            let dir = crate::ops::audit_dir(ctx.settings);
            let audit = tokio::task::spawn_blocking(move || {
                gateway_audit::AuditLog::open(&dir, audit_key)
                    .map_err(|e| format!("hl7: audit trail: {e}"))
            })
            .await
            .map_err(|e| format!("hl7: audit trail thread: {e}"))??;
            service = service.with_audit(Arc::new(audit));
        }
        if let Some(core) = core {
            let (observer, tasks) = crate::booking::core_observer(core);
            for task in tasks {
                services.spawn(task);
            }
            service = service.with_observer(observer);
        }
        metrics = Some(service.metrics());
        services.spawn(service.run(ctx.shutdown.clone()));
    }
    Ok(metrics)
}

/// `[[uplink]]`: one worker per destination; their metric handles.
fn start_uplinks(
    ctx: &Wiring<'_>,
    keys: &dyn KeyStore,
    deid: &crate::deid::DeidParts,
    registry: &mut Registry,
    services: &mut Services,
) -> Result<UplinkMetrics, String> {
    let settings = ctx.settings;
    let data_dir = &settings.node.data_dir;
    let uplink_metrics = UplinkMetrics::register(registry);
    for uplink in &settings.uplinks {
        match uplink.kind {
            UplinkKind::DicomWeb => {
                let mut uplink_settings = uplink_settings(uplink, data_dir, keys)?;
                uplink_settings.deidentify = deid.destinations.get(uplink.name.as_str()).cloned();
                let service =
                    UplinkService::new(uplink_settings, ctx.spool.clone(), uplink_metrics.clone())
                        .map_err(|e| e.to_string())?
                        .with_paused(ctx.disabled.clone())
                        .with_transfer_audit(ctx.transfer_audit.clone());
                services.spawn(service.run(ctx.shutdown.clone()));
            }
            UplinkKind::MllpTls => {
                let service = MllpUplinkService::new(
                    mllp_settings(uplink, data_dir, keys)?,
                    ctx.spool.clone(),
                    uplink_metrics.clone(),
                )
                .with_paused(ctx.disabled.clone());
                services.spawn(service.run(ctx.shutdown.clone()));
            }
            UplinkKind::SyslogTls => {
                let service = SyslogUplinkService::new(
                    syslog_settings(uplink, data_dir, keys)?,
                    ctx.spool.clone(),
                    uplink_metrics.clone(),
                )
                .with_paused(ctx.disabled.clone());
                services.spawn(service.run(ctx.shutdown.clone()));
            }
        }
    }
    // `[[results.deliver]] kind = "dicom"`: returned results to the clinic's PACS.
    for deliver in settings.results.iter().flat_map(|r| &r.deliver) {
        if let gateway_config::Deliver::Dicom {
            name,
            host,
            port,
            called_ae,
            calling_ae,
            tls,
        } = deliver
        {
            let target = gateway_dicom::scu::ScuTarget {
                host: host.clone(),
                port: *port,
                called_ae: called_ae.as_str().to_owned(),
                calling_ae: calling_ae.as_str().to_owned(),
            };
            let mut deliver_settings =
                gateway_uplink::DeliverSettings::new(name.as_str().to_owned(), target);
            if let Some(tls) = tls {
                deliver_settings.tls = Some(crate::dicom_tls::deliver(
                    name.as_str(),
                    tls,
                    data_dir,
                    keys,
                )?);
            }
            let service = gateway_uplink::DimseDeliveryService::new(
                deliver_settings,
                ctx.spool.clone(),
                uplink_metrics.clone(),
            )
            .with_paused(ctx.disabled.clone())
            .with_transfer_audit(ctx.transfer_audit.clone());
            services.spawn(service.run(ctx.shutdown.clone()));
        }
    }
    Ok(uplink_metrics)
}

/// `[admin]`: `/healthz` and `/metrics`.
async fn start_admin(
    ctx: &Wiring<'_>,
    registry: &Arc<Registry>,
    health: &Health,
    services: &mut Services,
) -> Result<(), String> {
    if let Some(admin) = &ctx.settings.admin {
        let http = AdminHttp::bind(admin.listen, Arc::clone(registry), health.clone())
            .await
            .map_err(|e| e.to_string())?;
        let rx = ctx.shutdown.clone();
        services.spawn(async move {
            if let Err(e) = http.run(rx).await {
                error!(error = %e, "admin HTTP stopped");
            }
        });
    }
    Ok(())
}

/// What the fleet service takes over from `serve`.
struct FleetParts {
    state: FleetState,
    disabled: watch::Sender<bool>,
    exit: mpsc::UnboundedSender<ExitRequest>,
    config_path: Option<PathBuf>,
    config_outcome: Option<(String, Result<(), String>)>,
    staff: crate::fleet::StaffParts,
    /// The key store, shared with the update service (the version floor).
    keys: Arc<dyn KeyStore>,
}

/// `[fleet]`: the telemetry collector and the fleet agent (or provisioning by claim).
fn start_fleet(
    ctx: &Wiring<'_>,
    parts: FleetParts,
    keys: &dyn KeyStore,
    metrics: telemetry::MetricSources,
    services: &mut Services,
) -> Result<(), String> {
    let settings = ctx.settings;
    let data_dir = &settings.node.data_dir;
    let spool = ctx.spool;
    let shutdown = ctx.shutdown;
    let FleetParts {
        state: fleet_state,
        disabled: disabled_tx,
        exit: exit_tx,
        config_path,
        config_outcome,
        staff,
        keys: shared_keys,
    } = parts;
    match &settings.fleet {
        Some(fleet) => {
            let collector = telemetry::Collector::new(
                spool.clone(),
                metrics,
                data_dir.clone(),
                settings
                    .uplinks
                    .iter()
                    .map(|u| (u.name.as_str().to_owned(), u.kind.as_str().to_owned()))
                    .collect(),
                key_backend(settings),
            );
            services.spawn(
                Arc::clone(&collector).run(fleet.telemetry_interval.get(), shutdown.clone()),
            );
            let backend = ops::backend(settings);
            let wipe_dir = data_dir.clone();
            let wipe: WipeFn = Arc::new(move || {
                gateway_keystore::wipe(&backend, &wipe_dir)
                    .map(|_| ())
                    .map_err(gateway_fleet_agent::CallbackError::new)
            });
            let parts = crate::fleet::Parts {
                state: fleet_state,
                disabled: disabled_tx,
                telemetry: collector,
                wipe,
                exit: exit_tx,
                can_apply_config: config_path.is_some(),
                config_outcome,
                staff: Some(staff),
                keys: shared_keys,
            };
            services.spawn(crate::fleet::service(
                settings,
                fleet,
                keys,
                parts,
                shutdown.clone(),
            )?);
        }
        None => drop(disabled_tx),
    }
    Ok(())
}

/// The systemd notifier, and the watchdog task when the unit asks for one.
fn start_watchdog(
    shutdown: &watch::Receiver<bool>,
    services: &mut Services,
) -> crate::notify::Notifier {
    let notifier = crate::notify::Notifier::from_env();
    if let Some(interval) = crate::notify::watchdog_interval().filter(|_| notifier.is_enabled()) {
        services.spawn(crate::notify::run_watchdog(
            notifier.clone(),
            interval,
            shutdown.clone(),
        ));
    }
    notifier
}

async fn wait_for_signal() -> Result<(), String> {
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch SIGINT: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// The key store. A development box with the software key store and an empty spool gets a
/// key made on first start; anything else needs `gatewayd keys init`.
fn open_keystore(settings: &Settings) -> Result<Box<dyn KeyStore>, String> {
    let data_dir = &settings.node.data_dir;
    let backend = ops::backend(settings);
    match gateway_keystore::open(&backend, data_dir) {
        Ok(store) => {
            check_tpm_vendor(settings, store.as_ref())?;
            Ok(store)
        }
        Err(KeyStoreError::NotInitialised { .. })
            if settings.node.mode == Mode::Development
                && settings.keystore.backend == KeystoreBackend::Software
                && !gateway_spool::holds_sealed_objects(data_dir) =>
        {
            warn!("development mode: creating a software key store for this new data folder");
            gateway_keystore::init(&backend, data_dir).map_err(|e| e.to_string())?;
            gateway_keystore::open(&backend, data_dir).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Logs the TPM found and applies `gateway_keystore::judge_tpm` (production refuses a
/// software TPM unless `keystore.allow_software_tpm`, which is then logged on every start).
fn check_tpm_vendor(
    settings: &Settings,
    store: &dyn gateway_keystore::KeyStore,
) -> Result<(), String> {
    let Some(vendor) = store.tpm_vendor() else {
        return Ok(());
    };
    let vendor = vendor.map_err(|e| e.to_string())?;
    info!(vendor = %vendor.trim(), "TPM found");
    let verdict = gateway_keystore::judge_tpm(
        &vendor,
        settings.node.mode == Mode::Production,
        settings.keystore.allow_software_tpm,
    )
    .map_err(|e| e.to_string())?;
    if verdict == gateway_keystore::TpmVerdict::SoftwareAllowed {
        warn!(vendor = %vendor.trim(), "production mode on a SOFTWARE TPM: keystore.allow_software_tpm is set");
    }
    Ok(())
}

/// The MLLP listener's settings from `[hl7]`.
fn hl7_settings(hl7: &gateway_config::Hl7) -> Result<Hl7Settings, String> {
    use gateway_config::Charset as C;
    use gateway_hl7::charset::{Charset, CharsetOverride};
    let mut s = Hl7Settings::new(hl7.listen);
    s.charset = match hl7.charset {
        C::Auto => CharsetOverride::Auto,
        C::Iso2022Jp => CharsetOverride::Fixed(Charset::Iso2022Jp),
        C::ShiftJis => CharsetOverride::Fixed(Charset::ShiftJis),
        C::Utf8 => CharsetOverride::Fixed(Charset::Utf8),
        C::Ascii => CharsetOverride::Fixed(Charset::Ascii),
    };
    s.max_frame_bytes = usize::try_from(hl7.max_frame_bytes.bytes()).unwrap_or(usize::MAX);
    s.idle_timeout = hl7.idle_timeout.get();
    s.max_connections = hl7.max_connections as usize;
    s.peers = hl7
        .peers
        .iter()
        .map(|p| gateway_mllp::Hl7Peer {
            host: p.host,
            sending_application: p.sending_application.clone(),
            sending_facility: p.sending_facility.clone(),
            tls_client_name: p.tls_client_name.clone(),
        })
        .collect();
    if let (Some(cert), Some(key)) = (&hl7.tls_cert_file, &hl7.tls_key_file) {
        s.tls = Some(
            gateway_tls::server_config(cert, key, hl7.tls_client_ca_file.as_deref())
                .map_err(|e| format!("hl7: {e}"))?,
        );
    }
    Ok(s)
}

/// One DICOMweb destination's settings, with its TLS client identity.
fn uplink_settings(
    uplink: &gateway_config::Uplink,
    data_dir: &Path,
    keys: &dyn KeyStore,
) -> Result<UplinkSettings, String> {
    let name = uplink.name.as_str().to_string();
    let tls = uplink_tls(uplink, data_dir, keys)?;
    let mut settings = UplinkSettings::new(name, uplink.url.as_str().to_string(), tls);
    settings.max_bytes_per_sec = uplink.max_bytes_per_sec.map(|b| b.bytes());
    settings.batch_max_instances = uplink.batch_max_instances as usize;
    settings.max_concurrent_requests = uplink.max_concurrent_requests as usize;
    Ok(settings)
}

/// One HL7 (MLLP) destination's settings, with its TLS client identity.
fn mllp_settings(
    uplink: &gateway_config::Uplink,
    data_dir: &Path,
    keys: &dyn KeyStore,
) -> Result<MllpSettings, String> {
    let name = uplink.name.as_str().to_string();
    let (host, port) = uplink
        .url
        .host_port()
        .ok_or_else(|| format!("uplink {name}: url has no host:port"))?;
    let tls = if uplink.url.is_tls() {
        uplink_tls(uplink, data_dir, keys)?
    } else {
        None
    };
    Ok(MllpSettings::new(name, host, port, tls))
}

/// One audit repository's settings (`kind = "syslog-tls"`), with its TLS client identity.
fn syslog_settings(
    uplink: &gateway_config::Uplink,
    data_dir: &Path,
    keys: &dyn KeyStore,
) -> Result<SyslogSettings, String> {
    let name = uplink.name.as_str().to_string();
    let (host, port) = uplink
        .url
        .syslog_host_port()
        .ok_or_else(|| format!("uplink {name}: url has no syslog-tls://host[:port]"))?;
    let tls = uplink_tls(uplink, data_dir, keys)?
        .ok_or_else(|| format!("uplink {name}: kind = \"syslog-tls\" needs ca_file"))?;
    Ok(SyslogSettings::new(name, host, port, tls))
}

/// `[[uplink]] kind = "syslog-tls"`: the audit export thread (the chain into the spool),
/// when there is an audit repository.
fn start_audit_export(
    ctx: &Wiring<'_>,
    key: gateway_audit::AuditKey,
    registry: &mut Registry,
    services: &mut Services,
) -> Result<(), String> {
    if crate::audit_export::wanted(ctx.settings) {
        let task = crate::audit_export::start(
            ctx.settings,
            ctx.spool.clone(),
            key,
            registry,
            ctx.shutdown.clone(),
        )?;
        services.spawn(task);
    }
    Ok(())
}

/// The rustls client configuration of a destination (None without `ca_file`).
fn uplink_tls(
    uplink: &gateway_config::Uplink,
    data_dir: &Path,
    keys: &dyn KeyStore,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    let name = uplink.name.as_str();
    Ok(match &uplink.ca_file {
        None => None,
        Some(ca_file) => {
            let auth = crate::tls_auth::configured(
                uplink.client_auth,
                uplink.cert_file.as_ref(),
                uplink.key_file.as_ref(),
                keys,
                data_dir,
                &format!("uplink {name}"),
            )?;
            Some(
                gateway_tls::client_config(ca_file, auth)
                    .map_err(|e| format!("uplink {name}: {e}"))?,
            )
        }
    })
}

fn key_backend(settings: &Settings) -> KeyBackend {
    match settings.keystore.backend {
        KeystoreBackend::Software => KeyBackend::Software,
        KeystoreBackend::Tpm => KeyBackend::Tpm,
    }
}

fn dicom_settings(dicom: &gateway_config::Dicom) -> DicomSettings {
    DicomSettings {
        listen: dicom.listen,
        policy: PolicySettings {
            ae_title: dicom.ae_title.as_str().to_string(),
            max_associations: dicom.max_associations,
            max_associations_per_peer: dicom.max_associations_per_peer,
            peers: dicom
                .peers
                .iter()
                .map(|p| Peer {
                    ae_title: p.ae_title.as_str().to_string(),
                    host: p.host,
                    max_associations: p.max_associations,
                    tls_client_name: p.tls_client_name.clone(),
                })
                .collect(),
        },
        max_pdu_length: u32::try_from(dicom.max_pdu_length.bytes()).unwrap_or(u32::MAX),
        artim_timeout: dicom.artim_timeout.get(),
        idle_timeout: dicom.idle_timeout.get(),
        shutdown_grace: dicom.shutdown_grace.get(),
        tls: None,
    }
}
