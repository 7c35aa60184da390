//! The booking service of `gatewayd run`: the kiosk (HTTPS, staff login, audit trail) and,
//! through `[exchange]`, the regional exchange (a clinic books with its core; a core
//! publishes its slots and decides).
//!
//! Keys: staff TOTP secrets, the audit chain, the booking files at rest and the exchange's
//! X25519 key are all derived from the key store's master key ([`Derived`]), so a
//! crypto-shred takes every one of them.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use gateway_audit::{AuditKey, AuditLog};
use gateway_booking::{Ledger, SealKey};
use gateway_config::{Booking, Exchange, Role, Settings};
use gateway_exchange::{ExchangeKey, PeerKey};
use gateway_kiosk::appointment::BookingBackend;
use gateway_kiosk::{Kiosk, SlotSource};
use gateway_regional::Connection;
use gateway_regional::clinic::{ClinicExchange, ClinicSettings};
use gateway_regional::core::CoreExchange;
use gateway_regional::local::{LocalCore, NoCore};
use gateway_regional::wire::Keys;
use gateway_staff::{Staff, StaffKey};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};
use zeroize::Zeroizing;

/// A task of the booking service.
pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Keys derived from the master key (kept as the master's bytes, zeroed on drop).
pub(crate) struct Derived(Zeroizing<Vec<u8>>);

impl Derived {
    pub(crate) fn new(master: &[u8]) -> Self {
        Self(Zeroizing::new(master.to_vec()))
    }

    fn staff(&self) -> StaffKey {
        StaffKey::derive(&self.0)
    }

    fn audit(&self) -> AuditKey {
        AuditKey::derive(&self.0)
    }

    fn seal(&self) -> SealKey {
        SealKey::derive(&self.0)
    }

    fn exchange(&self) -> ExchangeKey {
        ExchangeKey::derive(&self.0)
    }
}

/// What the booking service starts, and on the core what the DICOM and HL7 listeners
/// share with it.
pub(crate) struct Started {
    pub tasks: Vec<Task>,
    pub core: Option<CoreParts>,
}

/// The core's ledger and schedules; `changed` makes the exchange republish the slots.
pub(crate) struct CoreParts {
    pub ledger: Arc<Ledger>,
    pub schedules: Arc<Vec<gateway_booking::Schedule>>,
    pub changed: Arc<Notify>,
}

/// Builds the booking service; every problem is a start-up error naming the key.
pub(crate) async fn start(
    settings: &Settings,
    booking: &Booking,
    spool: &gateway_spool::Spool,
    derived: &Derived,
    identity: Option<Arc<dyn gateway_keystore::DeviceIdentity>>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Started, String> {
    let data_dir = &settings.node.data_dir;
    let me = settings.node.id.as_str().to_owned();
    let booking_dir = data_dir.join("booking");
    let staff = Arc::new(
        Staff::open(&data_dir.join("staff"), derived.staff())
            .map_err(|e| format!("booking: {e}"))?,
    );
    let audit = Arc::new(
        AuditLog::open(&crate::ops::audit_dir(settings), derived.audit())
            .map_err(|e| format!("booking: audit trail: {e}"))?,
    );
    let mut tasks: Vec<Task> = Vec::new();
    let exchange = settings.exchange.as_ref();
    let mut core_parts = None;
    let (slots, backend): (Arc<dyn SlotSource>, Arc<dyn BookingBackend>) = match settings.node.role
    {
        Role::Core => {
            let ledger = Arc::new(
                Ledger::open(&booking_dir, derived.seal()).map_err(|e| format!("booking: {e}"))?,
            );
            let schedules = Arc::new(crate::run::schedules(booking)?);
            let changed = Arc::new(Notify::new());
            let mut local = LocalCore::new(
                me.clone(),
                Arc::clone(&ledger),
                Arc::clone(&schedules),
                derived.seal(),
                Arc::clone(&changed),
            );
            let to_ris = ris_orders(settings, spool, &schedules);
            if let Some(f) = &to_ris {
                local = local.with_on_booked(Arc::clone(f));
            }
            let local = Arc::new(local);
            core_parts = Some(CoreParts {
                ledger: Arc::clone(&ledger),
                schedules: Arc::clone(&schedules),
                changed: Arc::clone(&changed),
            });
            if let Some(x) = exchange {
                let core = CoreExchange::new(
                    connection(&me, x, identity.clone(), data_dir)?,
                    Arc::new(keys(&me, x, derived)?),
                    Arc::clone(&ledger),
                    Arc::clone(&schedules),
                    booking.publish_interval.get(),
                    changed,
                );
                let core = match to_ris {
                    Some(f) => core.with_on_booked(f),
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
                    connection: connection(&me, x, identity.clone(), data_dir)?,
                    core: core.clone(),
                    request_timeout: booking.request_timeout.get(),
                    stale_after: booking.stale_after.get(),
                };
                let (handle, task) = ClinicExchange::open(
                    clinic_settings,
                    keys(&me, x, derived)?,
                    &booking_dir,
                    derived.seal(),
                )
                .map_err(|e| format!("booking: {e}"))?;
                tasks.push(Box::pin(task.run(shutdown.clone())));
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
    let tls = kiosk_tls(settings, booking)?;
    let tcp = tokio::net::TcpListener::bind(booking.listen)
        .await
        .map_err(|e| format!("booking.listen {}: {e}", booking.listen))?;
    let listener = gateway_kiosk::tls::TlsListener::new(tcp, tls)
        .map_err(|e| format!("booking.listen {}: {e}", booking.listen))?;
    info!(listen = %booking.listen, role = settings.node.role.as_str(), "kiosk (booking) listening over HTTPS");
    let app = Kiosk::new(staff, audit, slots, backend).router();
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
    })
}

/// Booked exams as OMG^O19 to the RIS: stored in the spool as HL7 messages (durable, and
/// forwarded by every `mllp-tls` uplink like any other HL7 message). `None` without an HL7
/// destination. A repeat of the same booking is the same message key: stored once.
fn ris_orders(
    settings: &Settings,
    spool: &gateway_spool::Spool,
    schedules: &Arc<Vec<gateway_booking::Schedule>>,
) -> Option<gateway_regional::core::OnBooked> {
    if !settings
        .uplinks
        .iter()
        .any(|u| u.kind == gateway_config::UplinkKind::MllpTls)
    {
        return None;
    }
    let spool = spool.clone();
    let schedules = Arc::clone(schedules);
    let facility = settings.node.id.as_str().to_owned();
    Some(Arc::new(move |a: &gateway_booking::Appointment| {
        if a.status != gateway_booking::AppointmentStatus::Booked {
            return;
        }
        let Some(schedule) = schedules.iter().find(|s| s.id() == a.schedule) else {
            return;
        };
        let control_id = format!("OMG-{}", a.id);
        let text = gateway_booking::order::omg_o19(
            a,
            schedule,
            &facility,
            &control_id,
            jiff::Timestamp::now(),
        );
        let item = gateway_spool::MessageIn {
            key: format!("GATEWAYD|{facility}|{control_id}"),
            message_type: "OMG^O19".into(),
            charset: "UTF-8".into(),
            source: "booking".into(),
            bytes: text.into_bytes(),
        };
        match spool.store_messages(std::slice::from_ref(&item)).pop() {
            Some(Ok(_)) => info!(appointment = %a.id, "OMG^O19 for the RIS stored"),
            Some(Err(e)) => {
                error!(appointment = %a.id, error = %e, "OMG^O19 for the RIS could not be stored")
            }
            None => {}
        }
    }))
}

/// The kiosk's TLS: the configured files, or (development only) a self-signed certificate.
fn kiosk_tls(settings: &Settings, booking: &Booking) -> Result<Arc<rustls::ServerConfig>, String> {
    let (cert, key) = match &booking.tls_files {
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
            let names = vec!["localhost".to_string(), booking.listen.ip().to_string()];
            gateway_kiosk::tls::development_certificate(
                &settings.node.data_dir.join("booking"),
                &names,
            )
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

/// The regional broker connection: TLS like the fleet's (broker CA, client identity).
fn connection(
    me: &str,
    x: &Exchange,
    identity: Option<Arc<dyn gateway_keystore::DeviceIdentity>>,
    data_dir: &std::path::Path,
) -> Result<Connection, String> {
    let (host, port) = x
        .broker
        .host_port()
        .ok_or_else(|| format!("exchange.broker {}: no host:port", x.broker))?;
    let tls = crate::mqtt::BrokerTls {
        section: "exchange",
        broker: &x.broker,
        ca_file: x.ca_file.as_ref(),
        client_auth: x.client_auth,
        cert_file: x.cert_file.as_ref(),
        key_file: x.key_file.as_ref(),
    }
    .client_config(identity, data_dir)?;
    Ok(Connection {
        client_id: me.to_owned(),
        host,
        port,
        tls,
    })
}

/// The core's worklist: its booked appointments as Scheduled Procedure Steps, read from the
/// ledger at each C-FIND (`items` runs on a blocking thread).
#[derive(Debug)]
pub(crate) struct LedgerWorklist {
    ledger: Arc<Ledger>,
    schedules: Arc<Vec<gateway_booking::Schedule>>,
}

impl LedgerWorklist {
    pub(crate) fn new(core: &CoreParts) -> Self {
        Self {
            ledger: Arc::clone(&core.ledger),
            schedules: Arc::clone(&core.schedules),
        }
    }
}

impl gateway_dicom::WorklistSource for LedgerWorklist {
    fn items(&self) -> Vec<gateway_booking::WorklistItem> {
        self.ledger
            .live(jiff::Timestamp::now())
            .iter()
            .filter_map(|a| {
                let s = self.schedules.iter().find(|s| s.id() == a.schedule)?;
                gateway_booking::WorklistItem::from_appointment(a, s.modality(), s.station_ae())
            })
            .collect()
    }
}
