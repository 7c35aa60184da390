//! The MQTT topic scheme. Every topic starts with `gw/{device_id}/`:
//!
//! | topic | direction | retained | payload |
//! |---|---|---|---|
//! | `gw/{d}/status` | gateway -> vendor | yes | [`crate::status::StatusMessage`] (also the last will) |
//! | `gw/{d}/telemetry` | gateway -> vendor | no | [`crate::telemetry::Telemetry`] |
//! | `gw/{d}/cmd/{op}/{cmd_id}` | vendor -> gateway | no | signed envelope ([`crate::command`]) |
//! | `gw/{d}/cmd/{op}/{cmd_id}/state` | gateway -> vendor | no | [`crate::state_message::StateMessage`] |
//! | `gw/{d}/cmd/{op}/{cmd_id}/result` | gateway -> vendor | no | output of `status` / `log-upload` |
//!
//! Before it has a device id, a box provisioned by claim uses the same shapes under
//! `prov/{claim_id}/` (its claim certificate's CN): `prov/{c}/csr` (gateway -> vendor,
//! retained, [`crate::provision::CsrMessage`]), `prov/{c}/cmd/provision/{cmd_id}` (the
//! vendor's signed answer) and its `.../state` ([`crate::provision`]).
//!
//! The gateway subscribes to [`command_subscription`] (`gw/{d}/cmd/+/+`): exactly five
//! levels, so its own `.../state` and `.../result` publications (six levels) never come back
//! to it as commands.
//!
//! Device ids, operation names and command ids are identifiers of 1 to 64 characters from
//! `[A-Za-z0-9._-]` ([`is_valid_id`]): no `/`, `+`, `#`, spaces, NUL or non-ASCII can be
//! injected into a topic, and every id is safe to log and to echo in a reason.

use std::fmt;

use gateway_id::Id;

/// Longest device id, operation name or command id.
pub const MAX_ID_LEN: usize = gateway_id::MAX_LEN;

/// Topic prefix of every fleet topic.
pub const PREFIX: &str = "gw";
/// Topic prefix of the provisioning-by-claim topics.
pub const PROVISION_PREFIX: &str = "prov";

/// True for 1..=64 characters of `[A-Za-z0-9._-]` (the gateway's one id rule, `gateway-id`).
pub use gateway_id::is_valid as is_valid_id;

/// An identifier that is not 1..=64 of `[A-Za-z0-9._-]`. Does not echo the value.
pub use gateway_id::InvalidId;

/// A validated device id (the gateway's `node.id`, or a claim certificate's CN): a
/// [`gateway_id::Id`] that names a device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceId(Id);

impl DeviceId {
    /// Validates `id` with [`gateway_id::Id::parse`].
    pub fn new(id: &str) -> Result<DeviceId, InvalidId> {
        Id::parse(id, "device id").map(DeviceId)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The id, e.g. as an MQTT client id.
    pub fn as_id(&self) -> &Id {
        &self.0
    }
}

impl From<Id> for DeviceId {
    fn from(id: Id) -> DeviceId {
        DeviceId(id)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// `gw/{d}/status`: retained presence ([`crate::status`]); also the last-will topic.
pub fn status_topic(device: &DeviceId) -> String {
    format!("{PREFIX}/{device}/status")
}

/// `gw/{d}/telemetry`.
pub fn telemetry_topic(device: &DeviceId) -> String {
    format!("{PREFIX}/{device}/telemetry")
}

/// `gw/{d}/cmd/+/+`: the subscription filter for command requests.
pub fn command_subscription(device: &DeviceId) -> String {
    format!("{PREFIX}/{device}/cmd/+/+")
}

/// `gw/{d}/cmd/{op}/{cmd_id}`: where the vendor publishes a command.
pub fn command_topic(device: &DeviceId, op: &str, cmd_id: &str) -> Result<String, InvalidId> {
    check_op_and_id(op, cmd_id)?;
    Ok(format!("{PREFIX}/{device}/cmd/{op}/{cmd_id}"))
}

/// `gw/{d}/cmd/{op}/{cmd_id}/state`: the command's progress ([`crate::state_message`]).
pub fn state_topic(device: &DeviceId, op: &str, cmd_id: &str) -> Result<String, InvalidId> {
    check_op_and_id(op, cmd_id)?;
    Ok(format!("{PREFIX}/{device}/cmd/{op}/{cmd_id}/state"))
}

/// `prov/{c}/csr`: where a claiming gateway publishes its certificate request (retained).
pub fn csr_topic(claim: &DeviceId) -> String {
    format!("{PROVISION_PREFIX}/{claim}/csr")
}

/// `prov/{c}/cmd/+/+`: the subscription filter for the vendor's answer to a claim.
pub fn provision_subscription(claim: &DeviceId) -> String {
    format!("{PROVISION_PREFIX}/{claim}/cmd/+/+")
}

/// `prov/{c}/cmd/{op}/{cmd_id}/state`: progress of the vendor's answer to a claim.
pub fn provision_state_topic(
    claim: &DeviceId,
    op: &str,
    cmd_id: &str,
) -> Result<String, InvalidId> {
    check_op_and_id(op, cmd_id)?;
    Ok(format!(
        "{PROVISION_PREFIX}/{claim}/cmd/{op}/{cmd_id}/state"
    ))
}

/// `gw/{d}/cmd/{op}/{cmd_id}/result`: output of `status` and `log-upload`.
pub fn result_topic(device: &DeviceId, op: &str, cmd_id: &str) -> Result<String, InvalidId> {
    check_op_and_id(op, cmd_id)?;
    Ok(format!("{PREFIX}/{device}/cmd/{op}/{cmd_id}/result"))
}

fn check_op_and_id(op: &str, cmd_id: &str) -> Result<(), InvalidId> {
    if !is_valid_id(op) {
        return Err(InvalidId { what: "operation" });
    }
    if !is_valid_id(cmd_id) {
        return Err(InvalidId { what: "command id" });
    }
    Ok(())
}

/// Splits a command request topic `gw/{device}/cmd/{op}/{cmd_id}` into `(op, cmd_id)`.
///
/// `None` when the topic is for another device, has another shape (including `.../state`),
/// or `op`/`cmd_id` are not valid ids. The op is not checked against the known operations
/// here: an unknown op still gets a `failed` state (`unknown-op`) on its state topic.
pub fn parse_command_topic<'t>(device: &DeviceId, topic: &'t str) -> Option<(&'t str, &'t str)> {
    parse_cmd(PREFIX, device, topic)
}

/// [`parse_command_topic`] for `prov/{claim}/cmd/{op}/{cmd_id}`.
pub fn parse_provision_topic<'t>(claim: &DeviceId, topic: &'t str) -> Option<(&'t str, &'t str)> {
    parse_cmd(PROVISION_PREFIX, claim, topic)
}

fn parse_cmd<'t>(
    want_prefix: &str,
    device: &DeviceId,
    topic: &'t str,
) -> Option<(&'t str, &'t str)> {
    let mut levels = topic.split('/');
    let (Some(prefix), Some(dev), Some(cmd), Some(op), Some(cmd_id), None) = (
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
    ) else {
        return None;
    };
    (prefix == want_prefix
        && dev == device.as_str()
        && cmd == "cmd"
        && is_valid_id(op)
        && is_valid_id(cmd_id))
    .then_some((op, cmd_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> DeviceId {
        DeviceId::new("clinic-001").unwrap()
    }

    #[test]
    fn ids_accept_1_to_64_of_alnum_dot_underscore_dash() {
        for ok in ["a", "clinic-001", "A.b_c-9", &"x".repeat(64)] {
            assert!(is_valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            "a/b",
            "+",
            "#",
            "a b",
            "a\0",
            "é",
            "a+",
            "$SYS",
        ] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn device_id_refuses_wildcards_and_separators() {
        for bad in ["gw/x", "+", "#", "", "a\nb"] {
            let err = DeviceId::new(bad).unwrap_err();
            assert_eq!(err.what, "device id");
        }
    }

    #[test]
    fn builders_produce_the_documented_scheme() {
        let d = dev();
        assert_eq!(status_topic(&d), "gw/clinic-001/status");
        assert_eq!(telemetry_topic(&d), "gw/clinic-001/telemetry");
        assert_eq!(command_subscription(&d), "gw/clinic-001/cmd/+/+");
        assert_eq!(
            command_topic(&d, "wipe", "c-1").unwrap(),
            "gw/clinic-001/cmd/wipe/c-1"
        );
        assert_eq!(
            state_topic(&d, "wipe", "c-1").unwrap(),
            "gw/clinic-001/cmd/wipe/c-1/state"
        );
        assert_eq!(
            result_topic(&d, "status", "c-2").unwrap(),
            "gw/clinic-001/cmd/status/c-2/result"
        );
    }

    #[test]
    fn builders_refuse_injected_levels_and_wildcards() {
        let d = dev();
        assert_eq!(
            state_topic(&d, "wipe/x", "c").unwrap_err().what,
            "operation"
        );
        assert_eq!(state_topic(&d, "wipe", "#").unwrap_err().what, "command id");
        assert!(command_topic(&d, "+", "c").is_err());
        assert!(result_topic(&d, "status", "").is_err());
    }

    #[test]
    fn parse_command_topic_returns_op_and_cmd_id() {
        let d = dev();
        assert_eq!(
            parse_command_topic(&d, "gw/clinic-001/cmd/config-update/42"),
            Some(("config-update", "42"))
        );
        // unknown ops are returned so that they can be answered with unknown-op
        assert_eq!(
            parse_command_topic(&d, "gw/clinic-001/cmd/reboot-now/1"),
            Some(("reboot-now", "1"))
        );
    }

    #[test]
    fn provisioning_topics_live_under_prov_and_do_not_cross_with_gw() {
        let c = DeviceId::new("claim-7").unwrap();
        assert_eq!(csr_topic(&c), "prov/claim-7/csr");
        assert_eq!(provision_subscription(&c), "prov/claim-7/cmd/+/+");
        assert_eq!(
            provision_state_topic(&c, "provision", "p-1").unwrap(),
            "prov/claim-7/cmd/provision/p-1/state"
        );
        assert!(provision_state_topic(&c, "provision", "#").is_err());
        assert_eq!(
            parse_provision_topic(&c, "prov/claim-7/cmd/provision/p-1"),
            Some(("provision", "p-1"))
        );
        for t in [
            "gw/claim-7/cmd/provision/p-1",
            "prov/claim-8/cmd/provision/p-1",
            "prov/claim-7/cmd/provision/p-1/state",
            "prov/claim-7/csr",
        ] {
            assert_eq!(parse_provision_topic(&c, t), None, "{t}");
        }
        assert_eq!(
            parse_command_topic(&c, "prov/claim-7/cmd/provision/p-1"),
            None
        );
    }

    #[test]
    fn parse_command_topic_refuses_other_shapes_and_devices() {
        let d = dev();
        for t in [
            "gw/clinic-002/cmd/wipe/1",
            "gw/clinic-001/cmd/wipe/1/state",
            "gw/clinic-001/cmd/wipe",
            "gw/clinic-001/cmd/wipe/",
            "gw/clinic-001/cmd//1",
            "gw/clinic-001/status",
            "xx/clinic-001/cmd/wipe/1",
            "/gw/clinic-001/cmd/wipe/1",
            "gw/clinic-001/cmd/wipe/a b",
            "gw/clinic-001/cmd/wi+pe/1",
            "gw/clinic-001/command/wipe/1",
            "",
        ] {
            assert_eq!(parse_command_topic(&d, t), None, "{t}");
        }
        let long = format!("gw/clinic-001/cmd/wipe/{}", "x".repeat(65));
        assert_eq!(parse_command_topic(&d, &long), None);
    }
}
