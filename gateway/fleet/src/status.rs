//! The retained presence message on `gw/{device_id}/status`.
//!
//! ```json
//! {"state":"online","version":"0.1.0","at":1767225600}
//! {"state":"disabled","version":"0.1.0","reason":"contract ended","at":1767225600}
//! {"state":"wiped","version":"0.1.0","at":1767225600}
//! {"state":"offline","reason":"shutdown","at":1767225600}
//! {"state":"offline","reason":"connection-lost"}            <- last will (no time: it is
//!                                                              registered at connect)
//! ```
//!
//! Publish every one of them with `retain = true` (QoS 1) so a vendor subscribing later sees
//! the current presence; register [`last_will`] as the MQTT last will on the same topic.

use serde::{Deserialize, Serialize};

use crate::command::MAX_DISABLE_REASON_CHARS;

/// Presence states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Presence {
    Online,
    Offline,
    Disabled,
    Wiped,
}

/// The retained status payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusMessage {
    pub state: Presence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
}

impl StatusMessage {
    /// The presence for a connected gateway: `presence` is usually
    /// [`crate::FleetState::presence`]; `reason` is the disable reason, used only with
    /// [`Presence::Disabled`] (bounded to 256 characters, control characters dropped).
    pub fn connected(presence: Presence, version: &str, reason: Option<&str>, at: u64) -> Self {
        let reason = match presence {
            Presence::Disabled => reason.map(|r| {
                let clean: String = r.chars().filter(|c| !c.is_control()).collect();
                crate::bounded_text(&clean, MAX_DISABLE_REASON_CHARS)
            }),
            _ => None,
        };
        StatusMessage {
            state: presence,
            version: Some(version.to_owned()),
            reason,
            at: Some(at),
        }
    }

    /// Published (retained) just before a clean disconnect.
    pub fn shutdown(at: u64) -> Self {
        StatusMessage {
            state: Presence::Offline,
            version: None,
            reason: Some("shutdown".to_owned()),
            at: Some(at),
        }
    }

    /// JSON bytes of the message.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, integers and unit enums always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The MQTT last-will payload for `gw/{device_id}/status` (retain it):
/// `{"state":"offline","reason":"connection-lost"}`.
pub fn last_will() -> Vec<u8> {
    StatusMessage {
        state: Presence::Offline,
        version: None,
        reason: Some("connection-lost".to_owned()),
        at: None,
    }
    .to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_will_is_offline_connection_lost_without_time() {
        assert_eq!(
            last_will(),
            br#"{"state":"offline","reason":"connection-lost"}"#
        );
    }

    #[test]
    fn connected_payloads_have_the_documented_shape() {
        let on = StatusMessage::connected(Presence::Online, "0.1.0", Some("ignored"), 5);
        assert_eq!(
            on.to_json(),
            br#"{"state":"online","version":"0.1.0","at":5}"#
        );
        let off = StatusMessage::connected(Presence::Disabled, "0.1.0", Some("end\u{7}"), 5);
        assert_eq!(
            off.to_json(),
            br#"{"state":"disabled","version":"0.1.0","reason":"end","at":5}"#
        );
        let wiped = StatusMessage::connected(Presence::Wiped, "0.1.0", None, 5);
        assert_eq!(
            wiped.to_json(),
            br#"{"state":"wiped","version":"0.1.0","at":5}"#
        );
        assert_eq!(
            StatusMessage::shutdown(9).to_json(),
            br#"{"state":"offline","reason":"shutdown","at":9}"#
        );
    }

    #[test]
    fn disabled_reason_is_bounded() {
        let long = "x".repeat(1000);
        let m = StatusMessage::connected(Presence::Disabled, "0.1.0", Some(&long), 1);
        assert_eq!(m.reason.unwrap().chars().count(), 256);
    }
}
