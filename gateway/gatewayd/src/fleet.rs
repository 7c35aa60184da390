//! The fleet service of `gatewayd run`: the agent from `[fleet]`, and provisioning by
//! claim before it when the box has no device id yet (`gateway_fleet::provision`).
//!
//! `staff-invite` and `staff-disable` run here too ([`StaffParts`]): the account store and
//! the audit trail are opened on a blocking thread when the agent starts, and each change
//! is audited (actor `vendor`) before its result goes back; the one-time code is published
//! on the command's result topic only, never logged or audited.
//!
//! Every problem found here before the task starts is a configuration problem reported at
//! start; the broker itself is only contacted by the task, so an unreachable broker never
//! stops the gateway (DICOM and HL7 serve while a box claims or reconnects).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gateway_audit::{Action, AuditKey, AuditLog, Event, Outcome};
use gateway_config::{Claim, Settings};
use gateway_fleet::{DeviceId, FleetState, VendorKey};
use gateway_fleet_agent::{
    AgentSettings, CallbackError, ClaimSettings, ConfigOutcome, ConfigProblems, ExitRequest,
    FleetAgent, InstallFn, StaffFn, StaffRefused, StaffRequest, TelemetrySource, ValidateFn,
    WipeFn, provision_by_claim,
};
use gateway_keystore::{DeviceIdentity, KeyStore};
use gateway_mqtt::{Broker, BrokerTls};
use gateway_staff::{Role, Staff, StaffError, StaffKey};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// What the agent is made of, besides its device id and TLS client configuration.
pub(crate) struct Parts {
    pub state: FleetState,
    pub disabled: watch::Sender<bool>,
    pub telemetry: Arc<dyn TelemetrySource>,
    pub wipe: WipeFn,
    pub exit: mpsc::UnboundedSender<ExitRequest>,
    /// The daemon has a config file a `config-update` can replace.
    pub can_apply_config: bool,
    pub config_outcome: Option<(String, Result<(), String>)>,
    /// The staff account store and audit trail for `staff-invite` / `staff-disable`.
    pub staff: Option<StaffParts>,
    /// The key store (the update service's version floor and client identity).
    pub keys: Arc<dyn KeyStore>,
}

/// What `staff-invite` and `staff-disable` work on: `<data_dir>/staff` and the audit trail.
pub(crate) struct StaffParts {
    pub staff_dir: PathBuf,
    pub staff_key: StaffKey,
    pub audit_dir: PathBuf,
    pub audit_key: AuditKey,
}

impl StaffParts {
    /// Both stores under `data_dir`, with keys derived from the master key.
    pub(crate) fn new(data_dir: &Path, staff_key: StaffKey, audit_key: AuditKey) -> Self {
        Self {
            staff_dir: data_dir.join("staff"),
            staff_key,
            audit_dir: data_dir.join("audit"),
            audit_key,
        }
    }

    /// Opens both (blocking) and returns the agent's staff callback.
    fn open(self) -> Result<StaffFn, String> {
        let staff = Staff::open(&self.staff_dir, self.staff_key).map_err(|e| e.to_string())?;
        let audit = AuditLog::open(&self.audit_dir, self.audit_key).map_err(|e| e.to_string())?;
        Ok(Arc::new(move |request| {
            staff_change(&staff, &audit, request)
        }))
    }
}

/// One `staff-invite` / `staff-disable`, audited under the actor `vendor`. Blocking.
fn staff_change(
    staff: &Staff,
    audit: &AuditLog,
    request: StaffRequest,
) -> Result<serde_json::Value, StaffRefused> {
    let (name, action, detail) = match &request {
        StaffRequest::Invite { name, role } => {
            (name.clone(), Action::AccountInvited, Some(role.as_str()))
        }
        StaffRequest::Disable { name } => (name.clone(), Action::AccountDisabled, None),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let result = match request {
        StaffRequest::Invite { name, role } => role
            .as_str()
            .parse::<Role>()
            .and_then(|role| staff.invite(&name, role, now))
            .map(|invited| {
                serde_json::json!({
                    "name": invited.name,
                    "role": invited.role.as_str(),
                    "code": invited.code.as_str(),
                    "expires_at": invited.expires_unix,
                })
            }),
        StaffRequest::Disable { name } => staff
            .disable(&name)
            .map(|()| serde_json::json!({"name": name, "disabled": true})),
    };
    let outcome = match &result {
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    };
    let refused = result.as_ref().err().map(staff_refusal);
    let recorded = audit.append(Event {
        actor: "vendor".into(),
        action,
        outcome,
        subject: Some(format!("account:{name}")),
        detail: refused
            .as_ref()
            .map_or(detail.map(str::to_owned), |r| Some(r.code.to_owned())),
    });
    if let Err(e) = recorded {
        warn!(error = %e, "audit record of a staff change could not be written");
        return Err(StaffRefused {
            code: "audit-write",
            reason: "the audit trail could not be written; the result is withheld".into(),
        });
    }
    match (result, refused) {
        (Ok(body), _) => Ok(body),
        (Err(_), Some(refused)) => Err(refused),
        (Err(_), None) => Err(StaffRefused {
            code: "internal",
            reason: "the staff change failed".into(),
        }),
    }
}

/// A refusal safe to publish; storage details stay in the local log.
fn staff_refusal(e: &StaffError) -> StaffRefused {
    let (code, reason) = match e {
        StaffError::BadName => ("bad-name", e.to_string()),
        StaffError::BadRole => ("bad-role", e.to_string()),
        StaffError::Exists => (
            "exists",
            "an account with that name has completed its enrolment; disable it and invite \
             another name"
                .to_owned(),
        ),
        StaffError::NoSuchAccount => ("no-such-account", e.to_string()),
        other => {
            warn!(error = %other, "a staff change could not be stored");
            (
                "storage",
                "the staff accounts could not be changed; see the gateway's local log".to_owned(),
            )
        }
    };
    StaffRefused { code, reason }
}

/// The fleet task: claim first if needed, then the agent until `shutdown`.
pub(crate) fn service(
    settings: &Settings,
    fleet: &gateway_config::Fleet,
    keys: &dyn KeyStore,
    parts: Parts,
    shutdown: watch::Receiver<bool>,
) -> Result<impl Future<Output = ()> + Send + 'static, String> {
    let key =
        VendorKey::from_pem_file(&fleet.vendor_public_key).map_err(|e| format!("fleet: {e}"))?;
    let data_dir = settings.node.data_dir.clone();
    let claim = match (&fleet.claim, parts.state.device_id()) {
        (Some(claim), None) => Some(claim_settings(fleet, claim, keys)?),
        (Some(claim), Some(device)) => {
            // Provisioned, but the claim files survived (a crash right after): finish.
            delete_claim(claim, &device);
            None
        }
        (None, _) => None,
    };
    let identity = keys.identity();
    let device_tls = DeviceTls {
        fleet: fleet.clone(),
        data_dir: data_dir.clone(),
        identity: identity.clone(),
    };
    let node_id = settings.node.id.as_str().to_owned();
    let validate = config_validator(settings);
    let interval = fleet.telemetry_interval.get();
    let (agent_update, update_service) =
        crate::update::service(settings, fleet, Arc::clone(&parts.keys), shutdown.clone());
    // Without a claim the TLS configuration must be buildable now (a configuration error).
    let ready_tls = match claim {
        None => Some(device_tls.build().map_err(|e| e.to_string())?),
        Some(_) => None,
    };
    Ok(async move {
        let mut shutdown = shutdown;
        let mut parts = parts;
        let (device, broker) = match (claim, ready_tls) {
            (Some((claim_settings, claim_files)), _) => {
                let Some(identity) = identity else { return };
                let install = installer(data_dir, identity);
                let Some(device) = provision_by_claim(
                    &claim_settings,
                    &key,
                    &mut parts.state,
                    &install,
                    &mut shutdown,
                )
                .await
                else {
                    return;
                };
                delete_claim(&claim_files, &device);
                match device_tls.build() {
                    Ok(broker) => (device.as_str().to_owned(), broker),
                    Err(e) => {
                        error!(error = %e, "provisioned, but the device TLS identity cannot be built: the fleet agent does not run");
                        return;
                    }
                }
            }
            (None, Some(broker)) => (
                parts
                    .state
                    .device_id()
                    .map_or(node_id, |d| d.as_str().to_owned()),
                broker,
            ),
            (None, None) => return,
        };
        let mut agent_settings = match AgentSettings::new(&device, broker) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "the fleet agent does not run");
                return;
            }
        };
        agent_settings.telemetry_interval = interval;
        let mut agent = FleetAgent::new(
            agent_settings,
            key,
            parts.state,
            parts.disabled,
            parts.telemetry,
        )
        .with_wipe(parts.wipe, parts.exit)
        .with_config_validation(validate)
        .with_logs(Arc::new(crate::logring::tail))
        .with_update(agent_update.start, agent_update.events)
        .with_connected_hook(agent_update.connected);
        tokio::spawn(update_service);
        if let Some(staff) = parts.staff.take() {
            match tokio::task::spawn_blocking(move || staff.open()).await {
                Ok(Ok(staff)) => agent = agent.with_staff(staff),
                Ok(Err(e)) => {
                    error!(error = %e, "staff accounts cannot be opened: staff-invite and staff-disable are refused");
                }
                Err(e) => error!(error = %e, "staff accounts: the opening task failed"),
            }
        }
        if parts.can_apply_config {
            agent = agent.with_config_apply();
        }
        if let Some((cmd_id, outcome)) = parts.config_outcome {
            let outcome = match outcome {
                Ok(()) => ConfigOutcome::Applied,
                Err(why) => ConfigOutcome::RolledBack { why },
            };
            agent = agent.with_config_outcome(cmd_id, outcome);
        }
        agent.run(shutdown).await;
    })
}

/// Builds the agent's broker with its TLS client configuration (none for a development
/// `mqtt://`).
struct DeviceTls {
    fleet: gateway_config::Fleet,
    data_dir: PathBuf,
    identity: Option<Arc<dyn DeviceIdentity>>,
}

impl DeviceTls {
    fn build(&self) -> Result<Broker, gateway_mqtt::BrokerTlsError> {
        BrokerTls::fleet(&self.fleet).broker(self.identity.clone(), &self.data_dir)
    }
}

/// The claim connection: the claim certificate's CN, its TLS configuration and the CSR of
/// the identity key.
fn claim_settings(
    fleet: &gateway_config::Fleet,
    claim: &Claim,
    keys: &dyn KeyStore,
) -> Result<(ClaimSettings, Claim), String> {
    let identity = keys.identity().ok_or_else(|| {
        "fleet.claim_cert_file: provisioning by claim needs a key store with a device identity \
         (keystore.backend = \"tpm\")"
            .to_string()
    })?;
    let ca_file = fleet
        .ca_file
        .as_ref()
        .ok_or_else(|| "fleet.ca_file: required for an mqtts:// broker".to_string())?;
    let cn = gateway_tls::certificate_common_name(&claim.cert_file)
        .map_err(|e| format!("fleet.claim_cert_file: {e}"))?;
    let claim_id = DeviceId::new(&cn)
        .map_err(|e| format!("fleet.claim_cert_file: the certificate's CN as claim id: {e}"))?;
    let tls = gateway_tls::client_config(
        ca_file,
        gateway_tls::ClientAuth::Files {
            cert_file: claim.cert_file.clone(),
            key_file: claim.key_file.clone(),
        },
    )
    .map_err(|e| format!("fleet (claim credential): {e}"))?;
    let broker = BrokerTls::fleet(fleet)
        .at(Some(tls))
        .map_err(|e| e.to_string())?;
    let csr_pem =
        gateway_tls::csr_pem(identity, claim_id.as_str()).map_err(|e| format!("fleet: {e}"))?;
    Ok((
        ClaimSettings {
            claim: claim_id,
            broker,
            csr_pem,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
        claim.clone(),
    ))
}

/// Installs the vendor's certificate after checking it certifies the identity key and
/// names the device id.
fn installer(data_dir: PathBuf, identity: Arc<dyn DeviceIdentity>) -> InstallFn {
    Arc::new(move |device: &DeviceId, pem: &str| {
        gateway_tls::install_certificate_pem(
            &data_dir,
            identity.as_ref(),
            pem.as_bytes(),
            Path::new("the provisioning answer"),
            Some(device.as_str()),
        )
        .map_err(CallbackError::new)
    })
}

/// Deletes the claim credential (both files); a file already gone is fine.
fn delete_claim(claim: &Claim, device: &DeviceId) {
    for path in [&claim.cert_file, &claim.key_file] {
        match gateway_durable::remove_durably(path) {
            Ok(true) => info!(%device, path = %path.display(), "claim credential deleted"),
            Ok(false) => {}
            Err(e) => {
                warn!(%device, error = %e, "cannot delete the claim credential: remove it by hand");
            }
        }
    }
}

/// `config-update` validation: exactly `check-config`'s problems (those of
/// `gateway_config::check_remote_update`, which adds the keys that cannot change remotely
/// from the running `settings`, and those of this build), one `key: message` line each.
fn config_validator(settings: &Settings) -> ValidateFn {
    let current = settings.clone();
    Arc::new(move |toml: &str| {
        let lines = |problems: &[gateway_config::Problem]| {
            problems.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        let settings = gateway_config::check_remote_update(&current, toml)
            .map_err(|errors| ConfigProblems(lines(&errors.problems)))?;
        let problems = crate::ops::build_problems(&settings);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigProblems(lines(&problems)))
        }
    })
}
