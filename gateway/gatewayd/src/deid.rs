//! De-identification wiring (`[[uplink]] deidentify = "basic"`): each such destination's
//! profile and pseudonym key, the one re-identification map (`{data_dir}/deid-map`), and
//! `gatewayd deid reidentify` (through the running daemon's control socket, or on the map
//! itself when no daemon holds it). Every lookup is audited; no value is printed but to the
//! operator who asked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use gateway_admin::control::{self, ControlExtension, Request, Response};
use gateway_audit::{Action, AuditKey, AuditLog, Event, Outcome};
use gateway_config::Settings;
use gateway_deid::{Destination, DestinationKey, Profile, ReidMap};
use gateway_keystore::MasterKey;

/// The map's folder in a data folder.
pub(crate) fn map_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("deid-map")
}

/// What `run` opens for de-identification.
#[derive(Debug, Default)]
pub(crate) struct DeidParts {
    /// Open while any destination de-identifies (or a map from before is on disk).
    pub map: Option<Arc<ReidMap>>,
    /// By `[[uplink]]` name.
    pub destinations: HashMap<String, Arc<Destination>>,
}

/// Opens the map and builds each de-identifying destination (blocking: file work).
pub(crate) fn open(settings: &Settings, master: &MasterKey) -> Result<DeidParts, String> {
    let dir = map_dir(&settings.node.data_dir);
    let wanted = settings.uplinks.iter().any(|u| u.deidentify.is_some());
    if !wanted && !dir.exists() {
        return Ok(DeidParts::default());
    }
    let map = Arc::new(ReidMap::open(&dir, master).map_err(|e| e.to_string())?);
    let mut destinations = HashMap::new();
    for uplink in &settings.uplinks {
        let Some(d) = &uplink.deidentify else {
            continue;
        };
        let name = uplink.name.as_str().to_owned();
        let profile = Profile::new(&d.options).map_err(|e| format!("uplink {name}: {e}"))?;
        let key = DestinationKey::derive(master, &name);
        destinations.insert(
            name.clone(),
            Arc::new(Destination::new(
                name,
                profile,
                key,
                map.clone(),
                d.send_burned_in,
            )),
        );
    }
    Ok(DeidParts {
        map: Some(map),
        destinations,
    })
}

/// Looks a pseudonym up and audits the lookup (blocking).
fn reidentify(
    map: &ReidMap,
    audit: &AuditLog,
    destination: &str,
    study: Option<&str>,
    patient: Option<&str>,
) -> Response {
    let (kind, found) = match (study, patient) {
        (Some(uid), None) => (
            "study",
            map.study(destination, uid).map(|s| {
                s.map(|s| {
                    serde_json::json!({
                        "study_uid": s.study_uid,
                        "patient_id": s.patient.patient_id,
                        "issuer": s.patient.issuer,
                    })
                })
            }),
        ),
        (None, Some(id)) => (
            "patient",
            map.patient(destination, id).map(|p| {
                p.map(|p| {
                    serde_json::json!({
                        "patient_id": p.patient_id,
                        "issuer": p.issuer,
                    })
                })
            }),
        ),
        _ => {
            return Response::Error {
                message: "give exactly one of --study and --patient".into(),
            };
        }
    };
    let found = match found {
        Ok(found) => found,
        Err(e) => {
            return Response::Error {
                message: e.to_string(),
            };
        }
    };
    // Audited before anything is answered: no record, no answer.
    let event = Event {
        actor: "operator".into(),
        action: Action::DeidReidentified,
        outcome: if found.is_some() {
            Outcome::Success
        } else {
            Outcome::Failure
        },
        subject: Some(format!("destination:{destination}")),
        detail: Some(kind.into()),
    };
    if let Err(e) = audit.append(event) {
        return Response::Error {
            message: format!("not answered: the audit trail cannot be written: {e}"),
        };
    }
    match found {
        Some(value) => Response::Json { value },
        None => Response::NotFound,
    }
}

/// Answers [`Request::DeidReidentify`] in the daemon (the map is open there).
#[derive(Debug)]
pub(crate) struct DeidControl {
    map: Arc<ReidMap>,
    audit_dir: PathBuf,
    audit_key: AuditKey,
}

impl DeidControl {
    pub(crate) fn new(map: Arc<ReidMap>, audit_dir: PathBuf, audit_key: AuditKey) -> Self {
        Self {
            map,
            audit_dir,
            audit_key,
        }
    }
}

impl ControlExtension for DeidControl {
    fn handle(
        &self,
        request: &Request,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>> {
        let Request::DeidReidentify {
            destination,
            study,
            patient,
        } = request
        else {
            return None;
        };
        let (map, dir, key) = (
            self.map.clone(),
            self.audit_dir.clone(),
            self.audit_key.clone(),
        );
        let (destination, study, patient) = (destination.clone(), study.clone(), patient.clone());
        Some(Box::pin(async move {
            tokio::task::spawn_blocking(move || match AuditLog::open(&dir, key) {
                Ok(audit) => reidentify(
                    &map,
                    &audit,
                    &destination,
                    study.as_deref(),
                    patient.as_deref(),
                ),
                Err(e) => Response::Error {
                    message: format!("not answered: the audit trail cannot be opened: {e}"),
                },
            })
            .await
            .unwrap_or_else(|e| Response::Error {
                message: format!("re-identification task: {e}"),
            })
        }))
    }
}

/// `gatewayd deid reidentify --config F --destination NAME (--study UID | --patient ID)`.
pub fn reidentify_cli(
    config: &Path,
    destination: &str,
    study: Option<&str>,
    patient: Option<&str>,
) -> ExitCode {
    let settings = match crate::ops::load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let request = Request::DeidReidentify {
        destination: destination.to_owned(),
        study: study.map(str::to_owned),
        patient: patient.map(str::to_owned),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gatewayd: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let response = match runtime.block_on(control::request(&settings.node.data_dir, &request)) {
        Ok(response) => response,
        // No daemon: the map is not held; open it here (needs the key store: after a
        // crypto-shred this fails and nothing can be re-identified).
        Err(control::ControlError::NoDaemon { .. }) => {
            offline(&settings, destination, study, patient)
                .unwrap_or_else(|message| Response::Error { message })
        }
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    };
    match response {
        Response::Json { value } => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Response::NotFound => {
            eprintln!("gatewayd: deid reidentify: no such pseudonym for destination {destination}");
            ExitCode::from(1)
        }
        Response::Error { message } => {
            eprintln!("gatewayd: deid reidentify: {message}");
            ExitCode::from(1)
        }
        other => {
            eprintln!("gatewayd: deid reidentify: unexpected answer {other:?}");
            ExitCode::from(1)
        }
    }
}

fn offline(
    settings: &Settings,
    destination: &str,
    study: Option<&str>,
    patient: Option<&str>,
) -> Result<Response, String> {
    let dir = map_dir(&settings.node.data_dir);
    if !dir.exists() {
        return Err("this gateway has no re-identification map".into());
    }
    let master = crate::ops::master_key(settings)?;
    let map = ReidMap::open(&dir, &master).map_err(|e| e.to_string())?;
    let audit = AuditLog::open(&crate::ops::audit_dir(settings), AuditKey::new(&master))
        .map_err(|e| format!("not answered: the audit trail cannot be opened: {e}"))?;
    Ok(reidentify(&map, &audit, destination, study, patient))
}
