//! The progress of one command, published on `gw/{d}/cmd/{op}/{cmd_id}/state`:
//!
//! ```json
//! {"cmd_id":"c-42","op":"wipe","state":"init","at":1767225600}
//! {"cmd_id":"c-42","op":"wipe","state":"executing","at":1767225600}
//! {"cmd_id":"c-42","op":"wipe","state":"successful","at":1767225601}
//! {"cmd_id":"c-42","op":"wipe","state":"failed","code":"replayed","reason":"sequence 3 is not greater than the last accepted 7","at":1767225600}
//! ```
//!
//! Lifecycle: `init` when the request arrives, then either `failed` (verification refused
//! it: nothing changed) or `executing` once the sequence number is persisted, then
//! `successful` or `failed` (execution failed). An `update` reports its own progress instead
//! of `executing`: `downloading`, `installing`, `rebooting`, then (after the reboot, once
//! connected again) `successful`, `failed` or `rolled-back` (with a `reason`:
//! `health-failed`, `interrupted` or `boot-failed`). `cmd_id` and `op` come from the request
//! topic (already validated by [`crate::topics::parse_command_topic`]); `code` and `reason`
//! appear only with `failed`. Reasons are cut to 256 characters and lose control characters;
//! they must never carry patient data (rejections never do; execution errors are the
//! service's to word).

use serde::{Deserialize, Serialize};

use crate::command::{MAX_REASON_CHARS, Rejection};

/// The state of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommandState {
    Init,
    Executing,
    Successful,
    Failed,
    /// `update`: the bundle is being downloaded.
    Downloading,
    /// `update`: the bundle is being verified and written to the inactive slot.
    Installing,
    /// `update`: the slot is written; the box reboots into it once.
    Rebooting,
    /// `update`: the new firmware did not prove healthy; the box is back on the old one.
    RolledBack,
}

/// One state message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMessage {
    pub cmd_id: String,
    pub op: String,
    pub state: CommandState,
    /// Machine-readable failure code ([`Rejection::code`] or the service's own, e.g.
    /// `config-invalid`); only with `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Human-readable failure reason; only with `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix seconds.
    pub at: u64,
}

impl StateMessage {
    fn new(cmd_id: &str, op: &str, state: CommandState, at: u64) -> Self {
        StateMessage {
            cmd_id: cmd_id.to_owned(),
            op: op.to_owned(),
            state,
            code: None,
            reason: None,
            at,
        }
    }

    pub fn init(cmd_id: &str, op: &str, at: u64) -> Self {
        StateMessage::new(cmd_id, op, CommandState::Init, at)
    }

    pub fn executing(cmd_id: &str, op: &str, at: u64) -> Self {
        StateMessage::new(cmd_id, op, CommandState::Executing, at)
    }

    pub fn successful(cmd_id: &str, op: &str, at: u64) -> Self {
        StateMessage::new(cmd_id, op, CommandState::Successful, at)
    }

    /// An `update` progress state (`downloading`, `installing`, `rebooting`).
    pub fn progress(cmd_id: &str, op: &str, state: CommandState, at: u64) -> Self {
        StateMessage::new(cmd_id, op, state, at)
    }

    /// `rolled-back` with the reason (`health-failed`, `interrupted`, `boot-failed`) as both
    /// `code` and `reason`.
    pub fn rolled_back(cmd_id: &str, op: &str, reason: &str, at: u64) -> Self {
        StateMessage {
            code: Some(crate::bounded_text(reason, 64)),
            reason: Some(crate::bounded_text(reason, MAX_REASON_CHARS)),
            ..StateMessage::new(cmd_id, op, CommandState::RolledBack, at)
        }
    }

    /// `failed` with the rejection's code and reason.
    pub fn rejected(cmd_id: &str, op: &str, rejection: &Rejection, at: u64) -> Self {
        StateMessage::failed(cmd_id, op, rejection.code(), &rejection.reason(), at)
    }

    /// `failed` during execution, with the service's own code and reason.
    pub fn failed(cmd_id: &str, op: &str, code: &str, reason: &str, at: u64) -> Self {
        let clean: String = reason.chars().filter(|c| !c.is_control()).collect();
        StateMessage {
            code: Some(crate::bounded_text(code, 64)),
            reason: Some(crate::bounded_text(&clean, MAX_REASON_CHARS)),
            ..StateMessage::new(cmd_id, op, CommandState::Failed, at)
        }
    }

    /// JSON bytes of the message.
    pub fn to_json(&self) -> Vec<u8> {
        // Strings, integers and unit enums always serialise.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_messages_have_no_code_or_reason() {
        assert_eq!(
            StateMessage::init("c-1", "wipe", 10).to_json(),
            br#"{"cmd_id":"c-1","op":"wipe","state":"init","at":10}"#
        );
        assert_eq!(
            StateMessage::executing("c-1", "wipe", 11).to_json(),
            br#"{"cmd_id":"c-1","op":"wipe","state":"executing","at":11}"#
        );
        assert_eq!(
            StateMessage::successful("c-1", "wipe", 12).to_json(),
            br#"{"cmd_id":"c-1","op":"wipe","state":"successful","at":12}"#
        );
    }

    #[test]
    fn update_states_are_kebab_case_with_the_same_shape() {
        for (state, name) in [
            (CommandState::Downloading, "downloading"),
            (CommandState::Installing, "installing"),
            (CommandState::Rebooting, "rebooting"),
        ] {
            assert_eq!(
                StateMessage::progress("u-1", "update", state, 5).to_json(),
                format!(r#"{{"cmd_id":"u-1","op":"update","state":"{name}","at":5}}"#).into_bytes()
            );
        }
        let m = StateMessage::rolled_back("u-1", "update", "health-failed", 6);
        assert_eq!(
            m.to_json(),
            br#"{"cmd_id":"u-1","op":"update","state":"rolled-back","code":"health-failed","reason":"health-failed","at":6}"#.to_vec()
        );
        let back: StateMessage = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn rejected_carries_code_and_reason() {
        let r = Rejection::Replayed { seq: 3, last: 7 };
        let m = StateMessage::rejected("c-1", "wipe", &r, 10);
        assert_eq!(
            m.to_json(),
            br#"{"cmd_id":"c-1","op":"wipe","state":"failed","code":"replayed","reason":"sequence 3 is not greater than the last accepted 7","at":10}"#.to_vec()
        );
    }

    #[test]
    fn failed_reason_is_bounded_and_single_line() {
        let m = StateMessage::failed(
            "c",
            "config-update",
            "config-invalid",
            &"a\n".repeat(500),
            1,
        );
        let reason = m.reason.unwrap();
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS);
        assert!(!reason.contains('\n'));
    }
}
