//! `gatewayd`: the clinic edge gateway daemon and its operator commands.
//!
//! This crate is glue (CONVENTIONS 1): it parses arguments, turns the typed settings of
//! `gateway-config` into each service's settings, starts the services and wires their
//! shutdown. Behaviour lives in the library crates.
//!
//! - `cli`: the command line.
//! - `run`: `gatewayd run`, the wiring of all services.
//! - `ops`: `check-config`, `spool ...` and `keys ...`.
//! - `notify`: `sd_notify` for the systemd unit (READY, WATCHDOG, STOPPING).

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
