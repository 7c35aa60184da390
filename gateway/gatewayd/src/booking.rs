//! The booking service of `gatewayd run`: the kiosk (HTTPS, staff login, audit trail) and,
//! through `[exchange]`, the regional exchange (a clinic books with its core; a core
//! publishes its slots and decides).
//!
//! Keys: staff TOTP secrets, the audit chain, the booking files at rest and the exchange's
//! X25519 key are all derived from the key store's master key ([`Derived`]), so a
//! crypto-shred takes every one of them.
//!
//! No file work on an async worker: the stores are opened, the certificates read and the
//! broker's TLS files loaded on `spawn_blocking` at start; afterwards the ledger has its own
//! thread, the RIS orders theirs (`booking-orders`), and the kiosk and the clinic exchange
//! put their audit appends and sealed writes on blocking threads.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use gateway_audit::{AuditKey, AuditLog};
use gateway_booking::{BookingBackend, SlotSource};
use gateway_booking::{Ledger, LedgerHandle, LedgerService, SealKey};
use gateway_config::{Booking, Exchange, Role, Settings};
use gateway_exchange::{ExchangeKey, PeerKey};
use gateway_keystore::MasterKey;
use gateway_kiosk::Kiosk;
use gateway_regional::Connection;
use gateway_regional::clinic::{ClinicExchange, ClinicSettings};
use gateway_regional::core::CoreExchange;
use gateway_regional::local::{LocalCore, NoCore};
use gateway_regional::wire::Keys;
use gateway_registry::RegistryHandle;
use gateway_staff::{Staff, StaffKey};
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

/// A task of the booking service.
pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Keys derived from the master key (kept as a copy of the master key, zeroed on drop).
pub(crate) struct Derived(MasterKey);

impl Derived {
    pub(crate) fn new(master: &[u8; gateway_keystore::KEY_LEN]) -> Self {
        Self(MasterKey::from_bytes(*master))
    }

    pub(crate) fn staff(&self) -> StaffKey {
        StaffKey::new(&self.0)
    }

    pub(crate) fn audit(&self) -> AuditKey {
        AuditKey::new(&self.0)
    }

    fn seal(&self) -> SealKey {
        SealKey::derive(&self.0)
    }

    fn exchange(&self) -> ExchangeKey {
        ExchangeKey::derive(&self.0)
    }

    fn master(&self) -> &MasterKey {
        &self.0
    }
}

/// What the booking service starts, and on the core what the DICOM and HL7 listeners
/// share with it.
pub(crate) struct Started {
    pub tasks: Vec<Task>,
    pub core: Option<CoreParts>,
    /// `[safety]` (core): answers `gatewayd safety show` on the control socket.
    pub control: Option<Arc<dyn gateway_admin::control::ControlExtension>>,
}

/// `gatewayd safety show` through the control socket: the person's safety record, audited
/// by the safety service with the actor `operator`.
#[derive(Debug)]
struct SafetyControl(gateway_safety::Safety);

impl gateway_admin::control::ControlExtension for SafetyControl {
    fn handle(
        &self,
        request: &gateway_admin::control::Request,
    ) -> Option<
        std::pin::Pin<
            Box<dyn std::future::Future<Output = gateway_admin::control::Response> + Send>,
        >,
    > {
        use gateway_admin::control::{Request, Response};
        let Request::SafetyShow { person } = request else {
            return None;
        };
        let id = person.strip_prefix("person:").unwrap_or(person).to_owned();
        let show = self.0.show(gateway_registry::PersonId(id), "operator");
        Some(Box::pin(async move {
            match show.await {
                Ok(record) => match serde_json::to_value(&record) {
                    Ok(value) => Response::Json { value },
                    Err(e) => Response::Error {
                        message: format!("safety record not serialisable: {e}"),
                    },
                },
                Err(e) => Response::Error {
                    message: format!("safety: {e}"),
                },
            }
        }))
    }
}

/// The core's ledger (a handle on its service thread); `changed` makes the exchange
/// republish the slots.
pub(crate) struct CoreParts {
    pub ledger: LedgerHandle,
    pub changed: Arc<Notify>,
    /// `[identity]`: the registry the HL7 listener's ADT messages feed.
    pub identity: Option<RegistryHandle>,
    /// `[safety]`: the store the HL7 listener's allergy messages feed.
    pub safety: Option<gateway_safety::SafetyHandle>,
}

/// What the results and identity services get from the daemon: the clinic's pull source
/// (the `results.source` uplink with its identity) and the metric handles.
pub(crate) struct FeatureParts {
    pub results_source: Option<gateway_uplink::UplinkSettings>,
    pub results_metrics: gateway_results::Metrics,
    pub identity_metrics: gateway_registry::Metrics,
    pub safety_metrics: gateway_safety::Metrics,
}

/// Builds the booking service; every problem is a start-up error naming the key.
pub(crate) async fn start(
    settings: &Settings,
    booking: &Booking,
    spool: &gateway_spool::Spool,
    derived: &Derived,
    identity: Option<Arc<dyn gateway_keystore::DeviceIdentity>>,
    parts: FeatureParts,
    shutdown: &watch::Receiver<bool>,
) -> Result<Started, String> {
    let FeatureParts {
        results_source,
        results_metrics,
        identity_metrics,
        safety_metrics,
    } = parts;
    let data_dir = &settings.node.data_dir;
    let me = settings.node.id.as_str().to_owned();
    let booking_dir = data_dir.join("booking");
    let (staff, audit) = {
        let (staff_dir, staff_key) = (data_dir.join("staff"), derived.staff());
        let (audit_dir, audit_key) = (crate::ops::audit_dir(settings), derived.audit());
        blocking(move || {
            let staff = Staff::open(&staff_dir, staff_key).map_err(|e| format!("booking: {e}"))?;
            let audit = AuditLog::open(&audit_dir, audit_key)
                .map_err(|e| format!("booking: audit trail: {e}"))?;
            Ok((Arc::new(staff), Arc::new(audit)))
        })
        .await?
    };
    let mut tasks: Vec<Task> = Vec::new();
    let exchange = settings.exchange.as_ref();
    let mut core_parts = None;
    let mut results_view: Option<Arc<dyn gateway_booking::ResultsSource>> = None;
    let mut identity_view: Option<(RegistryHandle, String)> = None;
    let mut safety_view: Option<gateway_safety::Safety> = None;
    let (slots, backend): (Arc<dyn SlotSource>, Arc<dyn BookingBackend>) = match settings.node.role
    {
        Role::Core => {
            let ledger = {
                let (dir, seal) = (booking_dir.clone(), derived.seal());
                blocking(move || Ledger::open(&dir, seal).map_err(|e| format!("booking: {e}")))
                    .await?
            };
            let schedules = Arc::new(booking.schedules.clone());
            let (service, ledger) = LedgerService::new(ledger, Arc::clone(&schedules));
            service
                .spawn()
                .map_err(|e| format!("booking: cannot start the ledger thread: {e}"))?;
            let changed = Arc::new(Notify::new());
            let mut local = LocalCore::new(
                me.clone(),
                ledger.clone(),
                derived.seal(),
                Arc::clone(&changed),
            );
            let to_ris = match ris_orders(settings, spool, &schedules)? {
                Some((f, orders)) => {
                    tasks.push(Box::pin(drain_orders(orders, shutdown.clone())));
                    Some(f)
                }
                None => None,
            };
            let registry = match &settings.identity {
                Some(i) => Some(
                    open_identity(settings, i, derived, Arc::clone(&audit), identity_metrics)
                        .await?,
                ),
                None => None,
            };
            // Every booking also puts its patient (as the booking clinic knows them) in the
            // registry; the RIS orders get them after that, as before.
            let to_ris = match &registry {
                Some(r) => {
                    let (tee, task) = booked_to_registry(r.clone(), to_ris);
                    tasks.push(task);
                    Some(tee)
                }
                None => to_ris,
            };
            if let (Some(r), Some(i)) = (&registry, &settings.identity) {
                identity_view = Some((r.clone(), i.hospital_id.clone()));
            }
            // `[safety]` (needs `[identity]`): the store, the check every booking path asks
            // before the ledger decides, and the dose reports' path into the store.
            let safety = match (&settings.safety, &registry, &settings.identity) {
                (Some(s), Some(r), Some(i)) => {
                    let store = open_safety(
                        settings,
                        &i.hospital_id,
                        derived,
                        Arc::clone(&audit),
                        safety_metrics,
                    )
                    .await?;
                    tasks.push(Box::pin(gateway_safety::dose::run(
                        spool.clone(),
                        store.clone(),
                        ledger.clone(),
                        i.hospital_id.clone(),
                        shutdown.clone(),
                    )));
                    let options = gateway_safety::Options {
                        window_days: s.dose_window_days,
                        dlp_threshold_mgy_cm: s.dlp_threshold_mgy_cm,
                        hospital_id: i.hospital_id.clone(),
                    };
                    let check = gateway_safety::Safety::new(store.clone(), r.clone(), options);
                    safety_view = Some(check.clone());
                    Some((
                        store,
                        Arc::new(check) as Arc<dyn gateway_booking::SafetyCheck>,
                    ))
                }
                _ => None,
            };
            let check = safety.as_ref().map(|(_, check)| Arc::clone(check));
            local = local.with_safety(check.clone());
            if let Some(f) = &to_ris {
                local = local.with_on_booked(f.clone());
            }
            // Orders the ledger decided but a crash kept out of the spool are made now; the
            // ones already stored are repeats of their message key, stored once.
            match local.reoffer_booked().await {
                Ok(0) => {}
                Ok(n) => info!(
                    appointments = n,
                    "booked appointments re-offered to the RIS order path"
                ),
                Err(e) => {
                    warn!(error = %e, "booking ledger cannot list the booked appointments to re-offer")
                }
            }
            let local = Arc::new(local);
            core_parts = Some(CoreParts {
                ledger: ledger.clone(),
                changed: Arc::clone(&changed),
                identity: registry.clone(),
                safety: safety.as_ref().map(|(store, _)| store.clone()),
            });
            if let Some(x) = exchange {
                let core = CoreExchange::new(
                    connection(&me, x, identity.clone(), data_dir).await?,
                    Arc::new(keys(&me, x, derived)?),
                    ledger.clone(),
                    booking.publish_interval.get(),
                    changed,
                );
                let core = match to_ris {
                    Some(f) => core.with_on_booked(f),
                    None => core,
                };
                let core = core.with_safety(check);
                // Clinics' dose reports (`[safety]` on a clinic) into the store.
                let core = match (&safety, &registry) {
                    (Some((store, _)), Some(r)) => {
                        let (tx, rx) = tokio::sync::mpsc::channel(64);
                        tasks.push(Box::pin(gateway_safety::dose::from_clinics(
                            rx,
                            store.clone(),
                            r.clone(),
                        )));
                        core.with_dose(tx)
                    }
                    _ => core,
                };
                let core = match &settings.results {
                    Some(r) => {
                        let (service, link) = core_results(
                            settings,
                            r,
                            spool,
                            ledger,
                            derived,
                            results_metrics.clone(),
                        )
                        .await?;
                        let service = match &registry {
                            Some(r) => service.with_disclosures(Arc::new(r.clone())),
                            None => service,
                        };
                        tasks.push(Box::pin(service.run(shutdown.clone())));
                        core.with_results(link)
                    }
                    None => core,
                };
                tasks.push(Box::pin(core.run(shutdown.clone())));
            } else {
                info!("no [exchange]: the core's slots are bookable from its own kiosk only");
            }
            (
                local.clone() as Arc<dyn SlotSource>,
                local as Arc<dyn BookingBackend>,
            )
        }
        Role::Clinic => match (&booking.core, exchange) {
            (Some(core), Some(x)) => {
                let clinic_settings = ClinicSettings {
                    connection: connection(&me, x, identity.clone(), data_dir).await?,
                    core: core.clone(),
                    request_timeout: booking.request_timeout.get(),
                    stale_after: booking.stale_after.get(),
                };
                let (keys, seal, dir) = (keys(&me, x, derived)?, derived.seal(), booking_dir);
                let (handle, task) = blocking(move || {
                    ClinicExchange::open(clinic_settings, keys, &dir, seal)
                        .map_err(|e| format!("booking: {e}"))
                })
                .await?;
                tasks.push(Box::pin(task.run(shutdown.clone())));
                // `[safety]` on a clinic: its CT dose reports go to the core.
                if settings.safety.is_some() {
                    tasks.push(Box::pin(gateway_safety::dose::forward(
                        spool.clone(),
                        handle.clone(),
                        me.clone(),
                        safety_metrics,
                        shutdown.clone(),
                    )));
                }
                if let (Some(r), Some(source)) = (&settings.results, results_source) {
                    let (service, link, view) = clinic_results(
                        settings,
                        r,
                        core,
                        source,
                        spool,
                        derived,
                        results_metrics.clone(),
                    )
                    .await?;
                    handle.set_results(link);
                    tasks.push(Box::pin(service.run(shutdown.clone())));
                    results_view = Some(Arc::new(view));
                }
                let handle = Arc::new(handle);
                (
                    handle.clone() as Arc<dyn SlotSource>,
                    handle as Arc<dyn BookingBackend>,
                )
            }
            _ => {
                warn!("booking.core is not set: the kiosk shows no slots and refuses bookings");
                let none = Arc::new(NoCore);
                (
                    none.clone() as Arc<dyn SlotSource>,
                    none as Arc<dyn BookingBackend>,
                )
            }
        },
    };
    let tls = {
        let (files, listen) = (booking.tls_files.clone(), booking.listen);
        let dir = settings.node.data_dir.join("booking");
        blocking(move || kiosk_tls(files, listen, &dir)).await?
    };
    let tcp = tokio::net::TcpListener::bind(booking.listen)
        .await
        .map_err(|e| format!("booking.listen {}: {e}", booking.listen))?;
    let listener = gateway_kiosk::tls::TlsListener::new(tcp, tls)
        .map_err(|e| format!("booking.listen {}: {e}", booking.listen))?;
    info!(listen = %booking.listen, role = settings.node.role.as_str(), "kiosk (booking) listening over HTTPS");
    let mut kiosk = Kiosk::new(staff, audit, slots, backend)
        .with_issuer(&format!("gatewayd {}", settings.node.id.as_str()));
    if let Some(view) = results_view {
        kiosk = kiosk.with_results(view);
    }
    if let Some((registry, hospital_id)) = identity_view {
        kiosk = kiosk.with_identity(Arc::new(registry), &hospital_id);
    }
    let app = kiosk.service();
    let mut rx = shutdown.clone();
    tasks.push(Box::pin(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = rx.wait_for(|s| *s).await;
        });
        if let Err(e) = serve.await {
            error!(error = %e, "kiosk stopped");
        }
    }));
    Ok(Started {
        tasks,
        core: core_parts,
        control: safety_view.map(|s| {
            Arc::new(SafetyControl(s)) as Arc<dyn gateway_admin::control::ControlExtension>
        }),
    })
}

/// The core's results service (`[results]` on a core with `[exchange]`): notices and reports
/// of booked exams for the booking clinics, its state sealed under `<data_dir>/results`.
async fn core_results(
    settings: &Settings,
    results: &gateway_config::Results,
    spool: &gateway_spool::Spool,
    ledger: LedgerHandle,
    derived: &Derived,
    metrics: gateway_results::Metrics,
) -> Result<
    (
        gateway_results::core::CoreResults,
        gateway_regional::results::CoreLink,
    ),
    String,
> {
    let core_settings = gateway_results::core::CoreSettings {
        me: settings.node.id.as_str().to_owned(),
        source: results.source.as_str().to_owned(),
        complete_after: results.complete_after.get(),
        resend_after: RESULTS_RESEND_AFTER,
        tick: RESULTS_TICK,
    };
    let (spool, seal) = (spool.clone(), Arc::new(derived.seal()));
    let dir = settings.node.data_dir.join(gateway_results::DIR);
    blocking(move || {
        gateway_results::core::CoreResults::open(core_settings, spool, ledger, seal, &dir, metrics)
            .map_err(|e| format!("results: {e}"))
    })
    .await
}

/// The clinic's results service (`[results]` on a clinic with `booking.core`): pulls what
/// its core announces from `results.source` and answers the kiosk.
async fn clinic_results(
    settings: &Settings,
    results: &gateway_config::Results,
    core: &str,
    source: gateway_uplink::UplinkSettings,
    spool: &gateway_spool::Spool,
    derived: &Derived,
    metrics: gateway_results::Metrics,
) -> Result<
    (
        gateway_results::clinic::ClinicResults,
        gateway_regional::results::ClinicLink,
        gateway_results::clinic::ClinicResultsView,
    ),
    String,
> {
    let pull =
        gateway_uplink::pull::PullClient::new(&source, gateway_uplink::pull::PullLimits::default())
            .map_err(|e| format!("results.source: {e}"))?;
    let image_destinations = results
        .deliver
        .iter()
        .filter(|d| matches!(d, gateway_config::Deliver::Dicom { .. }))
        .map(|d| d.name().as_str().to_owned())
        .collect();
    let report_destinations = results
        .deliver
        .iter()
        .filter_map(|d| match d {
            gateway_config::Deliver::Hl7 { uplink, .. } => Some(uplink.as_str().to_owned()),
            gateway_config::Deliver::Dicom { .. } => None,
        })
        .collect();
    let clinic_settings = gateway_results::clinic::ClinicSettings {
        pull_concurrency: source.max_concurrent_requests,
        core: core.to_owned(),
        rewrite_patient_id: results.rewrite_patient_id,
        issuer: results.patient_id_issuer.clone(),
        image_destinations,
        report_destinations,
    };
    let (spool, seal) = (spool.clone(), Arc::new(derived.seal()));
    let dir = settings.node.data_dir.join(gateway_results::DIR);
    blocking(move || {
        gateway_results::clinic::ClinicResults::open(
            clinic_settings,
            spool,
            pull,
            seal,
            &dir,
            metrics,
        )
        .map_err(|e| format!("results: {e}"))
    })
    .await
}

/// Unacknowledged notices and reports go to the clinic again after this long.
const RESULTS_RESEND_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// The core's results pass runs at least this often.
const RESULTS_TICK: std::time::Duration = std::time::Duration::from_secs(5);

/// Booked exams as OMG^O19 to the RIS (`gateway_booking::order::ris_order`): stored in the
/// spool as HL7 messages (durable, and forwarded by every `mllp-tls` uplink like any other
/// HL7 message) by a thread of their own (`booking-orders`), fed by the exchange's
/// [`gateway_regional::OnBooked`] channel, so no decision waits on the spool's `fsync`.
/// `None` without an HL7 destination. A repeat of the same booking is the same message key:
/// stored once ([`store_order`]); that is what lets the core re-offer every live booking at
/// start-up ([`LocalCore::reoffer_booked`]) to close the window between the ledger's
/// decision and the order's storage. The thread ends when every sender is gone (see
/// [`drain_orders`]).
fn ris_orders(
    settings: &Settings,
    spool: &gateway_spool::Spool,
    schedules: &Arc<Vec<gateway_booking::Schedule>>,
) -> Result<Option<(gateway_regional::OnBooked, std::thread::JoinHandle<()>)>, String> {
    if !settings
        .uplinks
        .iter()
        .any(|u| u.kind == gateway_config::UplinkKind::MllpTls)
    {
        return Ok(None);
    }
    let spool = spool.clone();
    let schedules = Arc::clone(schedules);
    let facility = settings.node.id.as_str().to_owned();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<gateway_booking::Appointment>();
    let thread = std::thread::Builder::new()
        .name("booking-orders".into())
        .spawn(move || {
            while let Some(a) = rx.blocking_recv() {
                match store_order(&spool, &schedules, &facility, &a) {
                    Some(Ok(gateway_spool::Committed::Stored(_))) => {
                        info!(appointment = %a.id, "OMG^O19 for the RIS stored");
                    }
                    Some(Ok(gateway_spool::Committed::Duplicate(_))) => {
                        debug!(appointment = %a.id, "OMG^O19 for the RIS was stored before");
                    }
                    Some(Err(e)) => {
                        error!(appointment = %a.id, error = %e, "OMG^O19 for the RIS could not be stored");
                    }
                    None => {}
                }
            }
        })
        .map_err(|e| format!("booking: cannot start the RIS order thread: {e}"))?;
    Ok(Some((tx, thread)))
}

/// Stores the OMG^O19 of `a` in the spool (blocking: the spool commits with `fsync`).
/// `None` when `a` makes no order (not `booked`, or on no known schedule). The message key
/// is the sender, the facility and the control id `OMG-{appointment id}`, so storing the
/// order of the same appointment again is [`gateway_spool::Committed::Duplicate`] and adds
/// nothing (the re-offer at start-up relies on it).
fn store_order(
    spool: &gateway_spool::Spool,
    schedules: &[gateway_booking::Schedule],
    facility: &str,
    a: &gateway_booking::Appointment,
) -> Option<Result<gateway_spool::Committed, gateway_spool::SpoolError>> {
    let order = gateway_booking::order::ris_order(a, schedules, facility, jiff::Timestamp::now())?;
    let item = gateway_spool::MessageIn {
        key: order.key,
        message_type: order.message_type.into(),
        charset: order.charset.into(),
        source: "booking".into(),
        bytes: order.text.into_bytes(),
    };
    spool.store_messages(std::slice::from_ref(&item)).pop()
}

/// How long the drain waits, at shutdown, for the RIS orders already handed over.
const ORDERS_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// At shutdown, waits (at most [`ORDERS_DRAIN`]) for the `booking-orders` thread to store
/// the orders already handed over: it ends once the exchange and the kiosk, which hold its
/// senders, have stopped.
async fn drain_orders(orders: std::thread::JoinHandle<()>, mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
    let joined = tokio::time::timeout(
        ORDERS_DRAIN,
        tokio::task::spawn_blocking(move || orders.join()),
    )
    .await;
    if joined.is_err() {
        warn!("RIS orders still being stored at shutdown: not waited for");
    }
}

/// The core's HL7 feeds: the listener's observer channel, dispatched by message type to the
/// task that applies SIU messages to the ledger (`gateway_regional::ris::run`) and, with
/// `[identity]`, to the one that applies ADT messages to the registry
/// (`gateway_registry::feed`). The listener never waits on either.
pub(crate) fn core_observer(core: &CoreParts) -> (gateway_mllp::Observer, Vec<Task>) {
    use tokio::sync::mpsc;
    let (observer, mut observed) = gateway_mllp::Observer::channel(gateway_mllp::OBSERVER_QUEUE);
    let (to_ris, ris) = mpsc::channel::<gateway_mllp::Observed>(gateway_mllp::OBSERVER_QUEUE);
    let mut tasks: Vec<Task> = vec![Box::pin(gateway_regional::ris::run(
        ris,
        core.ledger.clone(),
        Arc::clone(&core.changed),
    ))];
    let to_registry = core.identity.clone().map(|registry| {
        let (tx, rx) = mpsc::channel::<gateway_mllp::Observed>(gateway_mllp::OBSERVER_QUEUE);
        tasks.push(Box::pin(gateway_registry::feed(rx, registry)));
        tx
    });
    let to_safety = core.safety.clone().map(|store| {
        let (tx, rx) = mpsc::channel::<gateway_mllp::Observed>(gateway_mllp::OBSERVER_QUEUE);
        tasks.push(Box::pin(gateway_safety::feed(rx, store)));
        tx
    });
    tasks.push(Box::pin(async move {
        while let Some(message) = observed.recv().await {
            // Bounded sends: a slow consumer holds this task, and the listener's own
            // observer queue counts what it then drops.
            if message.message_type().starts_with("SIU^") {
                let _ = to_ris.send(message).await;
            } else if message.message_type().starts_with("ADT^") {
                // ADT feeds the registry (identities) and the safety store (AL1, IAM).
                if let Some(to) = &to_safety {
                    let _ = to.send(message.clone()).await;
                }
                if let Some(to) = &to_registry {
                    let _ = to.send(message).await;
                }
            }
        }
    }));
    (observer, tasks)
}

/// `[safety]` (core): the sealed safety store, opened on a blocking thread; it runs on a
/// thread of its own afterwards.
async fn open_safety(
    settings: &Settings,
    hospital_id: &str,
    derived: &Derived,
    audit: Arc<AuditLog>,
    metrics: gateway_safety::Metrics,
) -> Result<gateway_safety::SafetyHandle, String> {
    let dir = settings.node.data_dir.join(gateway_safety::DIR);
    let master = MasterKey::from_bytes(*derived.master().expose());
    let hospital_id = hospital_id.to_owned();
    blocking(move || {
        gateway_safety::SafetyHandle::open_with(&dir, &master, audit, metrics, Some(hospital_id))
            .map_err(|e| format!("safety: {e}"))
    })
    .await
}

/// `[identity]` (core): the registry, its matcher (the built-in model or `identity.model`),
/// opened on a blocking thread; it runs on a thread of its own afterwards.
async fn open_identity(
    settings: &Settings,
    identity: &gateway_config::Identity,
    derived: &Derived,
    audit: Arc<AuditLog>,
    metrics: gateway_registry::Metrics,
) -> Result<RegistryHandle, String> {
    let dir = settings.node.data_dir.join("identity");
    let (model_path, hospital_id) = (identity.model.clone(), identity.hospital_id.clone());
    let master = MasterKey::from_bytes(*derived.master().expose());
    blocking(move || {
        let model = match &model_path {
            Some(p) => {
                gateway_identity::Model::load(p).map_err(|e| format!("identity.model: {e}"))?
            }
            None => gateway_identity::Model::default(),
        };
        gateway_registry::Registry::open(
            &dir,
            &master,
            gateway_identity::Matcher::new(model),
            hospital_id,
            audit,
            metrics,
        )
        .map_err(|e| format!("identity: {e}"))
    })
    .await
}

/// Puts each booked appointment's patient in the registry (under the booking clinic's id),
/// then hands the appointment on to the RIS orders (if any). Returns the sender the
/// exchange and the core's kiosk report bookings to, and the task that drains it.
fn booked_to_registry(
    registry: RegistryHandle,
    then: Option<gateway_regional::OnBooked>,
) -> (gateway_regional::OnBooked, Task) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<gateway_booking::Appointment>();
    let task = Box::pin(async move {
        while let Some(a) = rx.recv().await {
            let p = &a.patient;
            let record =
                gateway_registry::booked_patient(&a.clinic, &p.id, &p.name, &p.birth_date, &p.sex);
            if let Err(e) = registry.record_booking(a.clinic.clone(), record).await {
                warn!(appointment = %a.id, error = %e, "booked patient not recorded in the identity registry");
            }
            if let Some(then) = &then {
                let _ = then.send(a);
            }
        }
    });
    (tx, task)
}

/// Runs start-up file work (opening the stores, which verify and `fsync`, reading or making
/// certificates) on a blocking thread, not on the async worker that runs `start`.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("booking: a start-up task failed: {e}"))?
}

/// The kiosk's TLS: the configured files, or (development only) a self-signed certificate
/// kept in `dir`.
fn kiosk_tls(
    files: Option<(std::path::PathBuf, std::path::PathBuf)>,
    listen: std::net::SocketAddr,
    dir: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let (cert, key) = match &files {
        Some((cert, key)) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| format!("booking: cannot read {}: {e}", p.display()))
            };
            (read(cert)?, read(key)?)
        }
        None => {
            warn!(
                "booking: no cert_file/key_file: using a self-signed certificate (development mode only)"
            );
            let names = vec!["localhost".to_string(), listen.ip().to_string()];
            gateway_kiosk::tls::development_certificate(dir, &names)
                .map_err(|e| format!("booking: {e}"))?
        }
    };
    gateway_kiosk::tls::server_config(&cert, &key).map_err(|e| format!("booking: {e}"))
}

/// This gateway's exchange key and its peers' public keys.
fn keys(me: &str, x: &Exchange, derived: &Derived) -> Result<Keys, String> {
    let mut peers = BTreeMap::new();
    for (i, p) in x.peers.iter().enumerate() {
        let key = PeerKey::from_base64(&p.public_key)
            .map_err(|e| format!("exchange.peers[{i}].public_key: {e}"))?;
        peers.insert(p.id.clone(), key);
    }
    Ok(Keys {
        me: me.to_owned(),
        key: derived.exchange(),
        peers,
    })
}

/// The regional broker connection: TLS like the fleet's (broker CA, client identity), its
/// files read on a blocking thread.
async fn connection(
    me: &str,
    x: &Exchange,
    identity: Option<Arc<dyn gateway_keystore::DeviceIdentity>>,
    data_dir: &std::path::Path,
) -> Result<Connection, String> {
    let (x, data_dir) = (x.clone(), data_dir.to_path_buf());
    let broker = blocking(move || {
        gateway_mqtt::BrokerTls::exchange(&x)
            .broker(identity, &data_dir)
            .map_err(|e| e.to_string())
    })
    .await?;
    let client_id = gateway_id::Id::parse(me, "node.id").map_err(|e| e.to_string())?;
    Ok(Connection { client_id, broker })
}

/// The core's worklist: its booked appointments as Scheduled Procedure Steps, read from the
/// ledger at each C-FIND (`items` runs on a blocking thread, so it waits on the ledger's
/// thread with a blocking call).
#[derive(Debug)]
pub(crate) struct LedgerWorklist {
    ledger: LedgerHandle,
}

impl LedgerWorklist {
    pub(crate) fn new(core: &CoreParts) -> Self {
        Self {
            ledger: core.ledger.clone(),
        }
    }
}

impl gateway_dicom::WorklistSource for LedgerWorklist {
    fn items(&self) -> Vec<gateway_booking::WorklistItem> {
        let live = match self.ledger.live_blocking(jiff::Timestamp::now()) {
            Ok(live) => live,
            Err(e) => {
                warn!(error = %e, "booking ledger cannot list the worklist");
                return Vec::new();
            }
        };
        let schedules = self.ledger.schedules();
        live.iter()
            .filter_map(|a| {
                let s = schedules.iter().find(|s| s.id() == a.schedule)?;
                gateway_booking::WorklistItem::from_appointment(a, s.modality(), s.station_ae())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use gateway_booking::{AppointmentRequest, Schedule, ScheduleSpec};
    use gateway_keystore::KEY_LEN;
    use gateway_spool::{Committed, Limits, Spool};
    use jiff::{SignedDuration, Timestamp};
    use tokio::sync::mpsc;

    fn ct() -> Schedule {
        Schedule::new(&ScheduleSpec {
            id: "ct-1".into(),
            modality: "CT".into(),
            station_ae: "CT01".into(),
            ..ScheduleSpec::default()
        })
        .unwrap()
    }

    /// A booking whose order was lost (the process died after the ledger's decision, before
    /// the `booking-orders` thread stored it) is stored by the re-offer at the next start;
    /// re-offering an order already stored adds nothing (same message key).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reoffer_at_start_stores_a_lost_order_once() {
        let spool_dir = tempfile::tempdir().unwrap();
        let booking_dir = tempfile::tempdir().unwrap();
        let open_spool = || {
            Spool::open(
                spool_dir.path(),
                Some(MasterKey::from_bytes([7; KEY_LEN])),
                Limits {
                    max_bytes: 1 << 40,
                    min_free_bytes: 0,
                },
                vec![],
            )
            .unwrap()
        };
        let spool = open_spool();
        let seal = || SealKey::derive(&MasterKey::from_bytes([9; KEY_LEN]));
        let schedules = Arc::new(vec![ct()]);
        let (service, ledger) = LedgerService::new(
            Ledger::open(booking_dir.path(), seal()).unwrap(),
            Arc::clone(&schedules),
        );
        service.spawn().unwrap();
        let now = Timestamp::now();
        let to = now
            .checked_add(SignedDuration::from_hours(24 * 14))
            .unwrap();
        let slot = ledger.free_slots("ct-1", now, to, now).await.unwrap()[0]
            .id
            .clone();
        let local = |tx| {
            LocalCore::new(
                "core-1".into(),
                ledger.clone(),
                seal(),
                Arc::new(Notify::new()),
            )
            .with_on_booked(tx)
        };

        // First run: booked on the ledger, then "crashed" before the order was stored (the
        // order path's receiver is gone with what it was handed).
        let (tx, rx) = mpsc::unbounded_channel();
        let booked = local(tx)
            .request(AppointmentRequest {
                acknowledged: Vec::new(),
                request_id: "r1".into(),
                slot_id: slot,
                hold: false,
                patient_id: "ZZPID1".into(),
                patient_name: "ZZTEST^HANAKO".into(),
                birth_date: "19610402".into(),
                sex: "F".into(),
                procedure: "CT chest".into(),
                staff: "clerk.sato".into(),
            })
            .await
            .unwrap();
        drop(rx);

        // Next start: the re-offer hands the booking on and its order is stored.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let restarted = local(tx);
        assert_eq!(restarted.reoffer_booked().await.unwrap(), 1);
        let a = rx.recv().await.unwrap();
        assert_eq!(a.id, booked.id);
        let facility = "core-1";
        let first = tokio::task::block_in_place(|| store_order(&spool, &schedules, facility, &a));
        assert!(matches!(first, Some(Ok(Committed::Stored(_)))), "{first:?}");

        // Another start (or the same booking handed on twice): the same message, not stored
        // again, although the order's text (MSH-7) is made at another time.
        assert_eq!(restarted.reoffer_booked().await.unwrap(), 1);
        let again = rx.recv().await.unwrap();
        let second =
            tokio::task::block_in_place(|| store_order(&spool, &schedules, facility, &again));
        match (first, second) {
            (Some(Ok(Committed::Stored(id))), Some(Ok(Committed::Duplicate(dup)))) => {
                assert_eq!(id, dup);
            }
            other => panic!("a re-offered order was stored again: {other:?}"),
        }

        // After a restart of the spool too (the key is found in its index, not only in
        // memory).
        drop(spool);
        let spool = open_spool();
        spool.recover().unwrap();
        let third =
            tokio::task::block_in_place(|| store_order(&spool, &schedules, facility, &again));
        assert!(
            matches!(third, Some(Ok(Committed::Duplicate(_)))),
            "{third:?}"
        );
    }
}
