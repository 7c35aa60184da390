//! Operator commands: `check-config`, `spool ...`, `keys ...`, `audit ...`, `users ...`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use gateway_admin::control::{self, Request, Response};
use gateway_config::{KeystoreBackend, Problem, Settings};
use gateway_keystore::Backend;
use gateway_spool::{Limits, ObjectKind, Route, Spool};

use crate::cli::{AuditCommand, ConfigArg, KeysCommand, SpoolCommand, UsersCommand};

pub fn check_config(args: &ConfigArg) -> ExitCode {
    let problems = match Settings::load(&args.config) {
        Ok(settings) => build_problems(&settings),
        Err(errors) => errors.problems,
    };
    if problems.is_empty() {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    ExitCode::from(2)
}

/// What a valid config asks of this build and it does not have: `keystore.backend = "tpm"`
/// in a gatewayd built without the cargo feature `tpm`.
pub fn build_problems(settings: &Settings) -> Vec<Problem> {
    match gateway_keystore::ensure_available(&backend(settings)) {
        Ok(()) => Vec::new(),
        Err(gateway_keystore::KeyStoreError::BackendUnavailable { backend }) => {
            vec![Problem::new(
                "keystore.backend",
                format!(
                    "{backend:?} is not available in this build: gatewayd was built without \
                     the cargo feature `{backend}` (build it with `--features {backend}`)"
                ),
            )]
        }
        Err(e) => vec![Problem::new("keystore.backend", e.to_string())],
    }
}

/// The spool's destinations: every `[[uplink]]` with the kind of objects it carries and,
/// for an HL7 one, the message types it takes (`message_types`).
pub fn routes(settings: &Settings) -> Vec<Route> {
    let results = settings.results.as_ref();
    // The mllp-tls uplinks a `[[results.deliver]] kind = "hl7"` names also take returned
    // reports.
    let takes_reports = |name: &str| {
        results.is_some_and(|r| {
            r.deliver.iter().any(|d| {
                matches!(d, gateway_config::Deliver::Hl7 { uplink, .. } if uplink.as_str() == name)
            })
        })
    };
    let mut routes: Vec<Route> = settings
        .uplinks
        .iter()
        .map(|u| {
            let kind = match u.kind {
                gateway_config::UplinkKind::DicomWeb => ObjectKind::Dicom,
                gateway_config::UplinkKind::MllpTls => ObjectKind::Hl7,
                gateway_config::UplinkKind::SyslogTls => ObjectKind::Audit,
            };
            let route = Route::new(u.name.as_str(), kind);
            let route = match u.max_queued {
                Some(max) => route.with_max_queued(max),
                None => route,
            };
            let route = match &u.message_types {
                Some(types) => route.with_message_types(types.iter().map(|t| t.as_str())),
                None => route,
            };
            if takes_reports(u.name.as_str()) {
                route.with_results()
            } else {
                route
            }
        })
        .collect();
    if let Some(r) = results {
        match settings.node.role {
            gateway_config::Role::Core => routes.extend(gateway_results::core_routes()),
            gateway_config::Role::Clinic => routes.extend(
                r.deliver
                    .iter()
                    .filter(|d| matches!(d, gateway_config::Deliver::Dicom { .. }))
                    .map(|d| Route::new(d.name().as_str(), ObjectKind::Dicom).results_only()),
            ),
        }
    }
    // `[safety]`: every DICOM object passes the dose reader once, after it is durable (on a
    // clinic, to carry dose reports to the core).
    if settings.safety.is_some() {
        routes.push(Route::new(gateway_safety::DOSE_ROUTE, ObjectKind::Dicom));
    }
    routes
}

pub fn limits(settings: &Settings) -> Limits {
    Limits {
        max_bytes: settings.spool.max_bytes.bytes(),
        min_free_bytes: settings.spool.min_free_bytes.bytes(),
    }
}

pub fn backend(settings: &Settings) -> Backend {
    match settings.keystore.backend {
        KeystoreBackend::Software => Backend::Software,
        KeystoreBackend::Tpm => Backend::Tpm {
            tcti: settings.keystore.tcti.to_string(),
            pcrs: settings.keystore.pcrs.clone(),
        },
    }
}

pub(crate) fn master_key(settings: &Settings) -> Result<gateway_keystore::MasterKey, String> {
    gateway_keystore::open(&backend(settings), &settings.node.data_dir)
        .and_then(|s| s.spool_master_key())
        .map_err(|e| e.to_string())
}

/// The audit key of this box (derived from the spool master key in its key store).
pub fn audit_key(settings: &Settings) -> Result<gateway_audit::AuditKey, String> {
    master_key(settings).map(|m| gateway_audit::AuditKey::derive(m.expose()))
}

/// Where the audit trail lives.
pub fn audit_dir(settings: &Settings) -> PathBuf {
    settings.node.data_dir.join("audit")
}

pub fn audit(cmd: &AuditCommand) -> ExitCode {
    let (config, json) = match cmd {
        AuditCommand::Verify { config, json } => (config, json),
        AuditCommand::Export {
            config,
            format: crate::cli::AuditFormat::A5,
            from,
        } => return audit_export(config, *from),
    };
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let report = audit_key(&settings).and_then(|key| {
        gateway_audit::verify(&audit_dir(&settings), &key).map_err(|e| e.to_string())
    });
    match report {
        Err(e) => {
            eprintln!("gatewayd: {e}");
            ExitCode::from(2)
        }
        Ok(report) => {
            if *json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                match &report.problem {
                    None => println!("audit log: {} records, intact", report.records),
                    Some(p) => println!(
                        "audit log: {p} ({} records intact before it)",
                        report.records
                    ),
                }
            }
            if report.problem.is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// `gatewayd audit export --format a5 --from SEQ`: the records after `from` as the syslog
/// messages the audit export sends, one per line (an XML message holds no raw newline).
fn audit_export(config: &Path, from: u64) -> ExitCode {
    use std::io::Write as _;
    const BATCH: usize = 10_000;
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let source = gateway_audit::a5::AuditSource {
        node_id: settings.node.id.as_str().to_string(),
    };
    let dir = audit_dir(&settings);
    if !dir.join("audit.jsonl").exists() {
        // No trail yet: nothing to print, and nothing created by looking.
        return ExitCode::SUCCESS;
    }
    let result = audit_key(&settings).and_then(|key| {
        // Opening checks the whole chain: a damaged trail is named, not exported.
        let log = gateway_audit::AuditLog::open(&dir, key.clone()).map_err(|e| e.to_string())?;
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let mut after = from;
        loop {
            let batch = log.records_after(after, BATCH).map_err(|e| e.to_string())?;
            for record in &batch {
                let message = gateway_audit::a5::syslog_message(
                    record,
                    &source,
                    Some(key.participants_key()),
                );
                out.write_all(&message)
                    .and_then(|()| out.write_all(b"\n"))
                    .map_err(|e| format!("writing the export: {e}"))?;
                after = record.seq();
            }
            if batch.len() < BATCH {
                break;
            }
        }
        out.flush().map_err(|e| format!("writing the export: {e}"))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatewayd: {e}");
            ExitCode::from(2)
        }
    }
}

pub fn users(cmd: &UsersCommand) -> ExitCode {
    let config = match cmd {
        UsersCommand::Add { config, .. }
        | UsersCommand::Invite { config, .. }
        | UsersCommand::EnrollTotp { config, .. }
        | UsersCommand::Disable { config, .. }
        | UsersCommand::List { config, .. } => config,
    };
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match users_action(cmd, &settings) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatewayd: {e}");
            ExitCode::from(1)
        }
    }
}

fn users_action(cmd: &UsersCommand, settings: &Settings) -> Result<String, String> {
    use gateway_audit::{Action, AuditLog, Event, Outcome};
    use gateway_staff::{Role, Staff, StaffKey};
    let master = master_key(settings)?;
    let staff = Staff::open(
        &settings.node.data_dir.join("staff"),
        StaffKey::derive(master.expose()),
    )
    .map_err(|e| e.to_string())?;
    let audit = || {
        AuditLog::open(
            &audit_dir(settings),
            gateway_audit::AuditKey::derive(master.expose()),
        )
        .map_err(|e| e.to_string())
    };
    let record_with = |action: Action, name: &str, detail: Option<&str>| {
        audit()?
            .append(Event {
                actor: "local-admin".into(),
                action,
                outcome: Outcome::Success,
                subject: Some(format!("account:{name}")),
                detail: detail.map(str::to_owned),
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let record = |action: Action, name: &str| record_with(action, name, None);
    match cmd {
        UsersCommand::Invite {
            name, role, json, ..
        } => {
            let role: Role = role
                .parse()
                .map_err(|e: gateway_staff::StaffError| e.to_string())?;
            audit()?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let invited = staff.invite(name, role, now).map_err(|e| e.to_string())?;
            record_with(Action::AccountInvited, name, Some(role.as_str()))?;
            if *json {
                return Ok(serde_json::json!({
                    "name": invited.name,
                    "role": invited.role.as_str(),
                    "code": invited.code.as_str(),
                    "expires_at": invited.expires_unix,
                })
                .to_string()
                    + "\n");
            }
            Ok(format!(
                "invited {name} ({}); enrolment code (once, valid for {} hours): {}\n\
                 complete the account at the kiosk's enrolment page\n",
                role.as_str(),
                gateway_staff::INVITE_TTL_SECS / 3600,
                invited.code.as_str()
            ))
        }
        UsersCommand::Add { name, role, .. } => {
            let role: Role = role
                .parse()
                .map_err(|e: gateway_staff::StaffError| e.to_string())?;
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
            let password = password.trim_end_matches(['\r', '\n']);
            // Check that the trail can be written before changing anything.
            audit()?;
            staff.add(name, role, password).map_err(|e| e.to_string())?;
            record(Action::AccountAdded, name)?;
            Ok(format!(
                "added {name} ({}); enrol a second factor with `gatewayd users enroll-totp`\n",
                role.as_str()
            ))
        }
        UsersCommand::EnrollTotp { name, .. } => {
            audit()?;
            let issuer = format!("gatewayd {}", settings.node.id);
            let e = staff
                .enroll_totp(name, &issuer)
                .map_err(|e| e.to_string())?;
            record(Action::TotpEnrolled, name)?;
            Ok(format!(
                "secret: {}\nuri: {}\n",
                e.secret_base32.as_str(),
                e.otpauth_uri.as_str()
            ))
        }
        UsersCommand::Disable { name, .. } => {
            audit()?;
            staff.disable(name).map_err(|e| e.to_string())?;
            record(Action::AccountDisabled, name)?;
            Ok(format!("disabled {name}\n"))
        }
        UsersCommand::List { json, .. } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let accounts = staff.accounts(now).map_err(|e| e.to_string())?;
            if *json {
                serde_json::to_string(&accounts)
                    .map(|s| s + "\n")
                    .map_err(|e| e.to_string())
            } else {
                Ok(accounts
                    .iter()
                    .map(|a| {
                        format!(
                            "{} {} totp={} disabled={} locked={} invited={}\n",
                            a.name,
                            a.role.as_str(),
                            a.totp_enrolled,
                            a.disabled,
                            a.locked,
                            a.invited
                        )
                    })
                    .collect())
            }
        }
    }
}

pub(crate) fn load(path: &Path) -> Result<Settings, ExitCode> {
    Settings::load(path).map_err(|errors| {
        for problem in &errors.problems {
            eprintln!("{problem}");
        }
        ExitCode::from(2)
    })
}

pub fn spool(cmd: &SpoolCommand) -> ExitCode {
    let (config, request, json) = match cmd {
        SpoolCommand::Status { config, json } => (config, Request::Status, *json),
        SpoolCommand::Verify { config, json } => (config, Request::Verify, *json),
        SpoolCommand::Retry {
            config,
            destination,
        } => (
            config,
            Request::Retry {
                destination: destination.clone(),
            },
            false,
        ),
        SpoolCommand::Export {
            config,
            sop_instance_uid,
            hl7_message,
            out,
        } => {
            let out = match absolute(out) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("gatewayd: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let request = match (sop_instance_uid, hl7_message) {
                (Some(uid), _) => Request::Export {
                    sop_instance_uid: uid.clone(),
                    out,
                },
                (None, Some(key)) => Request::ExportMessage {
                    key: key.clone(),
                    out,
                },
                (None, None) => {
                    eprintln!("gatewayd: give --sop-instance-uid or --hl7-message");
                    return ExitCode::FAILURE;
                }
            };
            (config, request, false)
        }
    };
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let response = match send_or_execute(&settings, &request) {
        Ok(r) => r,
        Err(message) => {
            eprintln!("gatewayd: {message}");
            return ExitCode::FAILURE;
        }
    };
    print_response(&response, json)
}

/// Asks a running daemon over the control socket; with none running, opens the spool here.
pub(crate) fn send_or_execute(settings: &Settings, request: &Request) -> Result<Response, String> {
    let data_dir = &settings.node.data_dir;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    match runtime.block_on(control::request(data_dir, request)) {
        Ok(response) => return Ok(response),
        Err(control::ControlError::NoDaemon { .. }) => {}
        Err(e) => return Err(e.to_string()),
    }
    let master = match request {
        // Counting needs no key: status works even on a wiped box.
        Request::Status => None,
        _ => Some(
            gateway_keystore::open(&backend(settings), data_dir)
                .and_then(|s| s.spool_master_key())
                .map_err(|e| e.to_string())?,
        ),
    };
    let spool = open_spool(settings, master)?;
    Ok(control::execute(&spool, request))
}

/// The spool of `[node] data_dir` with the `[spool]` limits and index cache and the
/// routes of `[[uplink]]`.
pub fn open_spool(
    settings: &Settings,
    master: Option<gateway_keystore::MasterKey>,
) -> Result<Spool, String> {
    Spool::open_with_cache(
        &settings.node.data_dir,
        master,
        limits(settings),
        routes(settings),
        settings.spool.index_cache_bytes.bytes(),
    )
    .map_err(|e| e.to_string())
}

fn print_response(response: &Response, json: bool) -> ExitCode {
    let to_json = |v: &dyn erased::Json| v.json();
    match response {
        Response::Status(status) => {
            if json {
                println!("{}", to_json(status));
            } else {
                println!("objects: {}", status.objects);
                println!("bytes: {}", status.bytes);
                for (state, n) in &status.by_state {
                    println!("state {state}: {n}");
                }
                for (dest, c) in &status.by_destination {
                    println!(
                        "destination {dest}: queued {} sent {} failed {}",
                        c.queued, c.sent, c.failed
                    );
                    if let Some(error) = &c.last_error {
                        println!("destination {dest}: last error: {error}");
                    }
                }
                match status.oldest_age_seconds {
                    Some(age) => println!("oldest unsent: {age:.1} s"),
                    None => println!("oldest unsent: none"),
                }
            }
            ExitCode::SUCCESS
        }
        Response::Verify(report) => {
            if json {
                println!("{}", to_json(report));
            } else {
                println!(
                    "objects {} ok {} orphan_blobs {} dangling_entries {} unseal_failures {} partial_files {}",
                    report.objects,
                    report.ok,
                    report.orphan_blobs,
                    report.dangling_entries,
                    report.unseal_failures,
                    report.partial_files
                );
            }
            if report.is_consistent() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Response::Requeued { objects } => {
            println!("requeued {objects} dead letter(s)");
            ExitCode::SUCCESS
        }
        Response::Exported { bytes } => {
            eprintln!("exported {bytes} bytes");
            ExitCode::SUCCESS
        }
        Response::NotFound => {
            eprintln!("gatewayd: no stored object has that SOP Instance UID or HL7 message key");
            ExitCode::FAILURE
        }
        Response::Error { message } => {
            eprintln!("gatewayd: {message}");
            ExitCode::FAILURE
        }
        Response::Json { value } => {
            println!("{value}");
            ExitCode::SUCCESS
        }
    }
}

/// `gatewayd safety show --config F --patient person:ID`: asks the running core gateway
/// (its safety store and registry are open there, under their locks) for one person's
/// safety record; printed as one JSON object. Audited by the daemon.
pub fn safety_show(config: &Path, person: &str) -> ExitCode {
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if settings.safety.is_none() {
        eprintln!("gatewayd: safety: this configuration has no [safety] section");
        return ExitCode::FAILURE;
    }
    let request = Request::SafetyShow {
        person: person.to_owned(),
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
    match runtime.block_on(control::request(&settings.node.data_dir, &request)) {
        Ok(response) => print_response(&response, true),
        Err(control::ControlError::NoDaemon { path }) => {
            eprintln!(
                "gatewayd: safety show needs the running core gateway (no daemon on {})",
                path.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("gatewayd: {e}");
            ExitCode::FAILURE
        }
    }
}

mod erased {
    /// Serializes report types for `--json` output.
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        }
    }
}

fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn keys(cmd: &KeysCommand) -> ExitCode {
    let config = match cmd {
        KeysCommand::Init(a)
        | KeysCommand::Status(a)
        | KeysCommand::Csr(a)
        | KeysCommand::ExchangePublic(a) => &a.config,
        KeysCommand::InstallCert { config, .. } | KeysCommand::CheckTls { config, .. } => config,
        KeysCommand::Wipe(a) => {
            if !a.yes {
                eprintln!(
                    "gatewayd: keys wipe makes every stored object unreadable; add --yes to confirm"
                );
                return ExitCode::from(2);
            }
            &a.config
        }
    };
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match keys_action(cmd, &settings) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("gatewayd: {message}");
            ExitCode::FAILURE
        }
    }
}

fn keys_action(cmd: &KeysCommand, settings: &Settings) -> Result<String, String> {
    let data_dir = &settings.node.data_dir;
    let backend = backend(settings);
    let identity = || -> Result<_, String> {
        let store = gateway_keystore::open(&backend, data_dir).map_err(|e| e.to_string())?;
        store
            .identity()
            .ok_or_else(|| gateway_tls::TlsError::NoIdentity.to_string())
    };
    match cmd {
        KeysCommand::Init(_) => {
            gateway_durable::ensure_private_dir(data_dir).map_err(|e| e.to_string())?;
            let s = gateway_keystore::init(&backend, data_dir).map_err(|e| e.to_string())?;
            Ok(format!(
                "initialised {} key store; spool master key {}",
                s.backend,
                fingerprint(&s)
            ))
        }
        KeysCommand::Status(_) => {
            let s = gateway_keystore::status(&backend, data_dir).map_err(|e| e.to_string())?;
            Ok(if s.initialised {
                format!(
                    "backend {}: initialised; spool master key {} (firmware version floor {})",
                    s.backend,
                    fingerprint(&s),
                    s.version_floor
                        .map_or_else(|| "not defined".into(), |f| f.to_string())
                )
            } else {
                format!(
                    "backend {}: not initialised (run `gatewayd keys init`)",
                    s.backend
                )
            })
        }
        KeysCommand::Csr(_) => {
            let pem = gateway_tls::csr_pem(identity()?, settings.node.id.as_str())
                .map_err(|e| e.to_string())?;
            Ok(pem.trim_end().to_string())
        }
        KeysCommand::InstallCert { cert, .. } => {
            gateway_tls::install_certificate(data_dir, identity()?.as_ref(), cert)
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "installed {}",
                gateway_tls::certificate_path(data_dir).display()
            ))
        }
        KeysCommand::CheckTls { url, ca_file, .. } => {
            let store = gateway_keystore::open(&backend, data_dir).map_err(|e| e.to_string())?;
            let auth = crate::tls_auth::identity(store.as_ref(), data_dir, "keys check-tls")?;
            let config = gateway_tls::client_config(ca_file, auth).map_err(|e| e.to_string())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start runtime: {e}"))?;
            runtime
                .block_on(gateway_tls::check(
                    url,
                    config,
                    std::time::Duration::from_secs(20),
                ))
                .map_err(|e| e.to_string())
        }
        KeysCommand::ExchangePublic(_) => {
            let master = master_key(settings)?;
            Ok(gateway_exchange::ExchangeKey::derive(&master)
                .public()
                .to_base64())
        }
        KeysCommand::Wipe(_) => {
            let wiped = gateway_keystore::wipe(&backend, data_dir).map_err(|e| e.to_string())?;
            Ok(if wiped {
                "key store wiped: sealed objects can no longer be opened; run `gatewayd keys init` before `run`".into()
            } else {
                "nothing to wipe: the key store was not initialised".into()
            })
        }
    }
}

fn fingerprint(status: &gateway_keystore::Status) -> String {
    status
        .master_key_id
        .map_or_else(|| "-".into(), |id| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_carry_each_mllp_uplinks_message_types() {
        let text = "[node]\nid = \"t\"\ndata_dir = \"d\"\nmode = \"development\"\n\
             [[uplink]]\nname = \"archive\"\nurl = \"http://127.0.0.1:8042\"\n\
             [[uplink]]\nname = \"emr\"\nkind = \"mllp-tls\"\nurl = \"mllp://127.0.0.1:2575\"\n\
             message_types = [\"ORU^R01\", \"ADT\"]\n\
             [[uplink]]\nname = \"all\"\nkind = \"mllp-tls\"\nurl = \"mllp://127.0.0.1:2576\"\n";
        let settings = Settings::from_toml_str(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            routes(&settings),
            [
                Route::new("archive", ObjectKind::Dicom),
                Route::new("emr", ObjectKind::Hl7).with_message_types(["ORU^R01", "ADT"]),
                Route::new("all", ObjectKind::Hl7),
            ]
        );
    }
}
