//! The fleet agent service: the gateway's MQTT connection to the vendor's fleet broker
//! (MQTT 3.1.1 through `gateway-mqtt`'s one session, whose [`gateway_mqtt::Handler`] the
//! agent is). It moves bytes between the broker and the sans-IO logic of `gateway-fleet`
//! and applies what a verified command asks for.
//!
//! - **Connection**: TLS through the gateway's own rustls `ClientConfig` (built by
//!   `gateway-tls`: the broker verified against `fleet.ca_file` only, the client
//!   authenticated with the device identity through the key store, or with files in
//!   development); plain TCP only for a development `mqtt://` broker. Client id = device
//!   id, persistent session (`clean_session = false`), QoS 1, keep-alive 30 s, retained
//!   `gw/{d}/status` (`online` / `disabled` / `wiped`) on every connection and a retained
//!   last will `offline`. After a connection error it waits 1 s, doubling up to 60 s, and
//!   reconnects; it never stops by itself, and nothing else in the gateway waits on it.
//! - **Commands** on `gw/{d}/cmd/+/+`, exactly as `gateway_fleet`'s crate docs describe:
//!   `init` -> verify -> [`FleetState::accept`] (durable) -> `executing` -> `successful` |
//!   `failed{code, reason}`, each on `gw/{d}/cmd/{op}/{cmd_id}/state`.
//! - **Service state**: one `watch::Sender<bool>` ("disabled") that the DICOM and HL7
//!   listeners and the uplinks read; `disable` sets it and persists the flag in
//!   `<data_dir>/fleet/state.json` first, `enable` clears both. `gatewayd` seeds the channel
//!   from the same file at start, so a disabled box stays disabled across restarts even
//!   while the broker is unreachable.
//! - **Telemetry**: every `fleet.telemetry_interval` while connected, from a
//!   [`TelemetrySource`] the daemon provides (counts, ages, sizes, names; no patient data).
//!
//! Operations implemented: `disable`, `enable`, `status` (telemetry snapshot and state on
//! `.../result`) and `wipe` (when the daemon provides [`FleetAgent::with_wipe`]: listeners
//! refuse, the key store is crypto-shredded, the wiped flag is persisted, status `wiped`,
//! then [`ExitRequest::Wiped`] asks the daemon to stop, so the spool master key held in
//! memory goes with the process; a wiped box refuses to start). `config-update` is
//! validated like `check-config` ([`FleetAgent::with_config_validation`]): an invalid
//! document ends `failed` / `config-invalid` with its problems; a valid one is handed to the
//! daemon ([`ExitRequest::ApplyConfig`], with [`FleetAgent::with_config_apply`]), which
//! restarts every service from it or rolls back, and the next agent publishes the outcome
//! ([`FleetAgent::with_config_outcome`]). `restart` sends [`ExitRequest::Restart`] once
//! `successful` is queued (the daemon drains and starts every service again). `log-upload`
//! ([`FleetAgent::with_logs`]) publishes the last N lines of the daemon's own log on
//! `.../result`. `staff-invite` and `staff-disable` ([`FleetAgent::with_staff`]) hand the
//! account change to the daemon on a blocking thread; `staff-invite`'s one-time enrolment
//! code goes back on `.../result` only (never in a state message or a log line).
//!
//! Provisioning by claim ([`provision_by_claim`]) runs before the agent on a box that has no
//! device id yet: with the factory claim credential it publishes a CSR made by its identity
//! key, installs the vendor's signed answer (certificate and device id) and returns the
//! device id; the daemon then deletes the claim credential and starts the agent as that
//! device. A `provision` command reaching a provisioned agent ends `failed` /
//! `already-provisioned`.
//!
//! Invariants:
//! - A command is acted on only after `VendorKey::verify` accepted it and its sequence
//!   number is durable; every rejection changes nothing.
//! - The disabled flag is durable before the listeners see it, and before `successful`.
//! - No `unwrap`/`expect` on anything the broker can send; payloads are never logged.
//! - Nothing published carries patient data: ids are validated, reasons are bounded codes.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

mod agent;
mod claim;

pub use agent::{
    AgentError, AgentSettings, CallbackError, ConfigOutcome, ConfigProblems, ConnectedFn,
    ExitRequest, FleetAgent, LogFn, PublishedFn, StaffFn, StaffRefused, StaffRequest,
    StaticTelemetry, TelemetrySource, UpdateEvent, UpdateFn, UpdateJob, UpdateRefused, ValidateFn,
    WipeFn,
};
pub use claim::{ClaimSettings, InstallFn, provision_by_claim};
pub use gateway_fleet::FleetState;
