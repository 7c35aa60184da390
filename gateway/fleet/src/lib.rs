//! The fleet agent's logic, sans-IO: verification of the vendor's signed remote commands,
//! the persisted replay guard, the MQTT topic scheme and every payload the gateway
//! publishes. No MQTT client, no runtime, no sockets; the only disk access is the small
//! state file, through `gateway-durable`. The MQTT service (rumqttc, `gateway-fleet-agent`)
//! moves bytes between the broker and this crate.
//!
//! One command, as the service handles it:
//!
//! 1. A publish arrives on `gw/{device}/cmd/{op}/{cmd_id}`:
//!    [`topics::parse_command_topic`] gives `(op, cmd_id)` or `None` (ignore and log).
//! 2. Publish [`StateMessage::init`] on [`topics::state_topic`].
//! 3. [`VendorKey::verify`]`(payload, device, op, cmd_id, now, state.last_seq())`.
//!    `Err(rejection)`: publish [`StateMessage::rejected`]; nothing else happens.
//! 4. `Ok(command)`: [`FleetState::accept`]`(command.seq)` (durable), *then* publish
//!    [`StateMessage::executing`] and run [`Command::op`]; finally
//!    [`StateMessage::successful`] or [`StateMessage::failed`].
//!
//! Module map:
//! - [`command`]: the envelope and signed-command wire format, [`Op`], [`Command`],
//!   [`Rejection`] and [`VendorKey::verify`] with its check order.
//! - [`key`]: [`VendorKey`] from the PEM SubjectPublicKeyInfo file
//!   (`fleet.vendor_public_key`): Ed25519 or ECDSA P-256, nothing else.
//! - [`state`]: [`FleetState`], `<data_dir>/fleet/state.json`: last accepted sequence,
//!   disabled flag and reason, wiped flag.
//! - [`topics`]: `gw/{device_id}/...` builders and the command topic parser; ids are
//!   1..=64 of `[A-Za-z0-9._-]`.
//! - [`state_message`]: `init -> executing -> successful | failed{code, reason}`.
//! - [`status`]: the retained presence (`online`, `offline`, `disabled`, `wiped`) and the
//!   last will.
//! - [`telemetry`]: the periodic telemetry sample.
//! - [`provision`]: provisioning by claim (the `prov/{claim}/...` exchange).
//!
//! Invariants:
//! - **Every rejection changes nothing.** [`VendorKey::verify`] is a pure function; only an
//!   accepted command reaches [`FleetState::accept`].
//! - **Sequence persisted before execution.** [`FleetState::accept`] writes the state file
//!   atomically and durably before returning, so a crash mid-command cannot make the same
//!   signed command acceptable again; a corrupt state file is an error, never a reset.
//! - **Nothing unauthenticated is interpreted.** The signed bytes are parsed only after the
//!   signature verified over exactly those bytes; payloads over 1 MiB are refused unparsed.
//! - **No panic on any input** (fuzzed: `fuzz/`, target `command_verify`).
//! - **No patient data** in any topic or payload: topics hold validated ids only; rejection
//!   reasons echo numbers, algorithm and operation names and validated ids, at most 256
//!   characters; telemetry holds counts, ages, sizes and configured names.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod command;
pub mod key;
pub mod provision;
pub mod state;
pub mod state_message;
pub mod status;
pub mod telemetry;
pub mod topics;

pub use command::{Command, Op, OpKind, Rejection, StaffRole, UpdateUrl, encode_envelope};
pub use key::{Algorithm, KeyError, KeyProblem, VendorKey};
pub use state::{FleetState, StateError};
pub use state_message::{CommandState, StateMessage};
pub use status::{Presence, StatusMessage, last_will};
pub use telemetry::Telemetry;
pub use topics::{DeviceId, InvalidId, parse_command_topic, parse_provision_topic};

/// `text` cut to at most `max` characters (on a character boundary).
pub(crate) fn bounded_text(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => text.get(..end).unwrap_or(text).to_owned(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod tests;
