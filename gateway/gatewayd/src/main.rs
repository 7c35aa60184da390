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
//! - `ops`: `check-config`, `spool ...`, `keys ...`, `audit ...` and `users ...`.
//! - `fleet`: the fleet agent of `[fleet]`, and provisioning by claim before it.
//! - `booking`: the kiosk, staff, audit trail and regional exchange of `[booking]`.
//! - `telemetry`: the fleet agent's telemetry snapshot, from the spool and the services'
//!   metric handles.
//! - `logring`: the log's last lines, for the fleet's `log-upload`.
//! - `notify`: `sd_notify` for the systemd unit (READY, WATCHDOG, STOPPING).
//!
//! Features: `tpm` (off by default) builds the TPM 2.0 key store (links libtss2); without
//! it `keystore.backend = "tpm"` is refused by `check-config` and `run`.

mod booking;
mod cli;
mod fleet;
mod logring;
mod notify;
mod ops;
mod run;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run(args) => run::main(&args),
        cli::Command::CheckConfig(args) => ops::check_config(&args),
        cli::Command::Spool(cmd) => ops::spool(&cmd),
        cli::Command::Keys(cmd) => ops::keys(&cmd),
        cli::Command::Audit(cmd) => ops::audit(&cmd),
        cli::Command::Users(cmd) => ops::users(&cmd),
    }
}
