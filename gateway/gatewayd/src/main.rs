//! `gatewayd`: the clinic edge gateway daemon and its operator commands.
//!
//! This crate is glue (CONVENTIONS 1): it parses arguments, turns the typed settings of
//! `gateway-config` into each service's settings, starts the services and wires their
//! shutdown. Behaviour lives in the library crates.
//!
//! - `cli`: the command line.
//! - `run`: `gatewayd run`: one start function per service (dicom, hl7, uplinks, admin,
//!   fleet, booking, watchdog) called from a short `serve`, and the restart / config-update
//!   loop around it (its rules are `gateway_config::ConfigFile`).
//! - `ops`: `check-config`, `spool ...`, `keys ...`, `audit ...` and `users ...`;
//!   `identity ...` is dispatched here to `gateway_identity::cli`.
//! - `fleet`: the fleet agent of `[fleet]`, and provisioning by claim before it.
//! - `booking`: the kiosk, staff, audit trail and regional exchange of `[booking]`.
//! - `telemetry`: the fleet agent's telemetry snapshot, from the spool and the services'
//!   metric handles.
//! - `logring`: the log's last lines, for the fleet's `log-upload`.
//! - `notify`: `sd_notify` for the systemd unit (READY, WATCHDOG, STOPPING).
//! - `dicom_tls`: the rustls configurations of the DICOM TLS listener and of TLS results
//!   delivery (certificate files or the device identity).
//! - `update`: the fleet `update` command (the service task, the key store as the version
//!   floor) and `update health-check | pre-install | status`; the logic is gateway-update's.
//! - `transfer_audit`: the audit records of DICOM instances received (a thread fed by
//!   the DICOM service at each association's end).
//!
//! Features: `tpm` (off by default) builds the TPM 2.0 key store (links libtss2); without
//! it `keystore.backend = "tpm"` is refused by `check-config` and `run`.

mod audit_export;
mod booking;
mod cli;
mod deid;
mod dicom_tls;
mod fleet;
mod logring;
mod notify;
mod ops;
mod run;
mod safety_cli;
mod telemetry;
mod tls_auth;
mod transfer_audit;
mod update;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tune_allocator();
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run(args) => run::main(&args),
        cli::Command::CheckConfig(args) => ops::check_config(&args),
        cli::Command::Spool(cmd) => ops::spool(&cmd),
        cli::Command::Keys(cmd) => ops::keys(&cmd),
        cli::Command::Audit(cmd) => ops::audit(&cmd),
        cli::Command::Users(cmd) => ops::users(&cmd),
        cli::Command::Identity(cmd) => identity(&cmd),
        cli::Command::Safety(cmd) => safety_cli::main(&cmd),
        cli::Command::Update(cmd) => match cmd {
            cli::UpdateCommand::HealthCheck { config, timeout } => {
                update::health_check(&config, timeout)
            }
            cli::UpdateCommand::PreInstall { config } => update::pre_install(&config),
            cli::UpdateCommand::Status { config } => update::status(&config),
        },
        cli::Command::Deid(cli::DeidCommand::Reidentify {
            config,
            destination,
            study,
            patient,
        }) => deid::reidentify_cli(&config, &destination, study.as_deref(), patient.as_deref()),
    }
}

/// glibc's allocator keeps what a thread frees in that thread's arena (up to 8 per core) and,
/// after each large free, raises the size from which it maps memory directly, so buffers of
/// a few hundred KiB (objects held in memory until their journal append, upload bodies)
/// end up in arenas that never shrink: gatewayd's RSS climbed by ~1 MiB every 10 s of a
/// mixed soak (BENCHMARKS.md, issue 22). Two arenas and a fixed 128 KiB threshold give
/// such buffers back to the kernel when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    use nix::libc::{M_ARENA_MAX, M_MMAP_THRESHOLD, mallopt};
    // SAFETY: mallopt only sets parameters of the allocator; it is called first thing in
    // main, before any other thread exists. A refused setting (return 0) leaves glibc's
    // default, which is safe.
    unsafe {
        mallopt(M_ARENA_MAX, 2);
        mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// `gatewayd identity ...`: opens the files and prints; the logic is `gateway_identity::cli`.
fn identity(cmd: &cli::IdentityCommand) -> ExitCode {
    use gateway_identity::{Model, cli as id};
    use std::io::BufReader;
    let open = |p: &std::path::Path| {
        std::fs::File::open(p)
            .map(BufReader::new)
            .map_err(|e| eprintln!("gatewayd: {}: {e}", p.display()))
    };
    let model = |p: &Option<std::path::PathBuf>| match p {
        Some(p) => Model::load(p).map_err(|e| eprintln!("gatewayd: {e}")),
        None => Ok(Model::default()),
    };
    let result = match cmd {
        cli::IdentityCommand::Match {
            pairs,
            config,
            model: m,
        } => (|| {
            let configured = match (m, config) {
                (None, Some(c)) => ops::load(c).map_err(drop)?.identity.and_then(|i| i.model),
                _ => m.clone(),
            };
            let matcher = gateway_identity::Matcher::new(model(&configured)?);
            let out = std::io::BufWriter::new(std::io::stdout().lock());
            id::match_pairs(open(pairs)?, out, std::io::stderr(), &matcher)
                .map(drop)
                .map_err(|e| eprintln!("gatewayd: {e}"))
        })(),
        cli::IdentityCommand::Learn { records, out } => (|| {
            let learnt =
                id::learn_records(open(records)?).map_err(|e| eprintln!("gatewayd: {e}"))?;
            learnt.save(out).map_err(|e| eprintln!("gatewayd: {e}"))
        })(),
        cli::IdentityCommand::Search {
            records,
            queries,
            model: m,
            learn,
            brute_force,
        } => (|| {
            let opts = id::SearchOptions {
                learn: *learn,
                brute_force: *brute_force,
            };
            let report = id::search(open(records)?, open(queries)?, model(m)?, opts)
                .map_err(|e| eprintln!("gatewayd: {e}"))?;
            serde_json::to_writer(std::io::stdout().lock(), &report)
                .map_err(|e| eprintln!("gatewayd: writing the report: {e}"))?;
            println!();
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(()) => ExitCode::from(1),
    }
}
