//! The fleet agent's persistent state, `<data_dir>/fleet/state.json` (mode 0600 in a 0700
//! folder): the replay guard (last accepted sequence number), the disabled flag and reason,
//! the wiped flag, and the device id the vendor assigned when the box was provisioned by
//! claim (absent otherwise: the device id is then `node.id`).
//!
//! ```json
//! {"format": 1, "last_seq": 42, "disabled": true, "disabled_reason": "contract ended", "wiped": false,
//!  "device_id": "gw-000123"}
//! ```
//!
//! Invariants:
//! - Every change is written with [`gateway_durable::write_atomic`] (temp file, fsync,
//!   rename, fsync of the folder) *before* the in-memory state changes; a failed write
//!   leaves both the file and the value as they were.
//! - [`FleetState::accept`] is called before a command executes, so a crash during the
//!   command cannot make the same signed command acceptable again.
//! - A missing file is a fresh gateway (no sequence accepted yet). A file that exists but
//!   cannot be read or parsed is an error, never a silent reset: resetting the sequence would
//!   make every old signed command replayable.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::command::MAX_DISABLE_REASON_CHARS;
use crate::status::Presence;
use crate::topics::DeviceId;

/// Folder under `node.data_dir`.
pub const DIR_NAME: &str = "fleet";
/// File name inside [`DIR_NAME`].
pub const FILE_NAME: &str = "state.json";
/// The only format written and read.
pub const FORMAT: u32 = 1;
/// A state file is a few hundred bytes; anything above this is corrupt.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// Loading or saving the state failed; names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Io(#[from] gateway_durable::Error),
    #[error(
        "fleet state {} is corrupt ({reason}); refusing to start with a reset replay guard: \
         restore the file or re-provision the gateway",
        path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("sequence {seq} is not greater than the last accepted {last}")]
    NotIncreasing { seq: u64, last: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    format: u32,
    last_seq: Option<u64>,
    disabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disabled_reason: Option<String>,
    wiped: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_id: Option<String>,
}

/// The persisted replay guard and device flags, with the file they live in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetState {
    path: PathBuf,
    disk: OnDisk,
}

impl FleetState {
    /// The state file of `data_dir`: `<data_dir>/fleet/state.json`.
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join(DIR_NAME).join(FILE_NAME)
    }

    /// Reads the state of `data_dir`. A missing file gives the fresh state (nothing is
    /// written until the first change); an unreadable or corrupt file is an error.
    pub fn load(data_dir: &Path) -> Result<FleetState, StateError> {
        let path = FleetState::path_in(data_dir);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(FleetState {
                    path,
                    disk: OnDisk {
                        format: FORMAT,
                        ..OnDisk::default()
                    },
                });
            }
            Err(source) => {
                return Err(gateway_durable::Error {
                    action: "open",
                    path,
                    source,
                }
                .into());
            }
        };
        let mut bytes = Vec::new();
        if let Err(source) = file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes) {
            return Err(gateway_durable::Error {
                action: "read",
                path,
                source,
            }
            .into());
        }
        let corrupt = |reason: String| StateError::Corrupt {
            path: path.clone(),
            reason,
        };
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(corrupt(format!("larger than {MAX_FILE_BYTES} bytes")));
        }
        let disk: OnDisk = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if disk.format != FORMAT {
            return Err(corrupt(format!("unknown format {}", disk.format)));
        }
        Ok(FleetState { path, disk })
    }

    /// The file this state is saved to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last accepted sequence number; pass it to [`crate::VendorKey::verify`].
    pub fn last_seq(&self) -> Option<u64> {
        self.disk.last_seq
    }

    pub fn is_disabled(&self) -> bool {
        self.disk.disabled
    }

    pub fn disabled_reason(&self) -> Option<&str> {
        self.disk.disabled_reason.as_deref()
    }

    pub fn is_wiped(&self) -> bool {
        self.disk.wiped
    }

    /// The device id assigned by provisioning by claim, if the box was provisioned so. A
    /// stored id that is not a valid id is treated as absent (it was checked when stored).
    pub fn device_id(&self) -> Option<DeviceId> {
        self.disk
            .device_id
            .as_deref()
            .and_then(|id| DeviceId::new(id).ok())
    }

    /// Records the device id the vendor assigned (after its certificate was installed).
    pub fn set_device_id(&mut self, device: &DeviceId) -> Result<(), StateError> {
        let id = device.as_str().to_owned();
        self.update(|d| d.device_id = Some(id))
    }

    /// What the retained status topic should say while connected.
    pub fn presence(&self) -> Presence {
        if self.disk.wiped {
            Presence::Wiped
        } else if self.disk.disabled {
            Presence::Disabled
        } else {
            Presence::Online
        }
    }

    /// Records `seq` as accepted, durably, before the command runs. Refuses a `seq` not
    /// greater than the last accepted one (verification already checked it; this keeps the
    /// guard monotonic even if a caller forgets).
    pub fn accept(&mut self, seq: u64) -> Result<(), StateError> {
        if let Some(last) = self.disk.last_seq
            && seq <= last
        {
            return Err(StateError::NotIncreasing { seq, last });
        }
        self.update(|d| d.last_seq = Some(seq))
    }

    /// Sets the disabled flag with an optional reason (cut to 256 characters, control
    /// characters dropped).
    pub fn set_disabled(&mut self, reason: Option<&str>) -> Result<(), StateError> {
        let reason = reason.map(|r| {
            let clean: String = r.chars().filter(|c| !c.is_control()).collect();
            crate::bounded_text(&clean, MAX_DISABLE_REASON_CHARS)
        });
        self.update(|d| {
            d.disabled = true;
            d.disabled_reason = reason;
        })
    }

    /// Clears the disabled flag and reason.
    pub fn set_enabled(&mut self) -> Result<(), StateError> {
        self.update(|d| {
            d.disabled = false;
            d.disabled_reason = None;
        })
    }

    /// Records that the key store was wiped (set after the wipe succeeded). There is no way
    /// back: a wiped gateway is re-provisioned, which starts with a new data folder.
    pub fn set_wiped(&mut self) -> Result<(), StateError> {
        self.update(|d| d.wiped = true)
    }

    /// Applies `change` to a copy, writes it, then adopts it.
    fn update(&mut self, change: impl FnOnce(&mut OnDisk)) -> Result<(), StateError> {
        let mut next = self.disk.clone();
        change(&mut next);
        if let Some(dir) = self.path.parent() {
            gateway_durable::ensure_private_dir(dir)?;
        }
        let mut bytes = serde_json::to_vec(&next).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        gateway_durable::write_atomic(&self.path, &bytes)?;
        self.disk = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn missing_file_is_a_fresh_state_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = FleetState::load(dir.path()).unwrap();
        assert_eq!(s.last_seq(), None);
        assert!(!s.is_disabled() && !s.is_wiped());
        assert_eq!(s.presence(), Presence::Online);
        assert!(!dir.path().join("fleet").exists());
    }

    #[test]
    fn accept_persists_across_reload_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FleetState::load(dir.path()).unwrap();
        s.accept(7).unwrap();
        let again = FleetState::load(dir.path()).unwrap();
        assert_eq!(again.last_seq(), Some(7));
        let file = dir.path().join("fleet/state.json");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(dir.path().join("fleet"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
    }

    #[test]
    fn accept_refuses_equal_or_lower_sequence_after_reload() {
        let dir = tempfile::tempdir().unwrap();
        FleetState::load(dir.path()).unwrap().accept(10).unwrap();
        let mut s = FleetState::load(dir.path()).unwrap();
        for seq in [10, 9, 0] {
            assert!(matches!(
                s.accept(seq),
                Err(StateError::NotIncreasing { last: 10, .. })
            ));
        }
        s.accept(11).unwrap();
        assert_eq!(FleetState::load(dir.path()).unwrap().last_seq(), Some(11));
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FleetState::load(dir.path()).unwrap();
        s.accept(3).unwrap();
        let file = FleetState::path_in(dir.path());
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"{\"format\":1}",
            b"{\"format\":2,\"last_seq\":3,\"disabled\":false,\"wiped\":false}",
            b"{\"format\":1,\"last_seq\":-1,\"disabled\":false,\"wiped\":false}",
            b"{\"format\":1,\"last_seq\":3,\"disabled\":false,\"wiped\":false,\"x\":1}",
        ] {
            std::fs::write(&file, bad).unwrap();
            let err = FleetState::load(dir.path()).unwrap_err();
            assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains("state.json"), "{err}");
        }
    }

    #[test]
    fn unreadable_state_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(FleetState::path_in(dir.path())).unwrap();
        let err = FleetState::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");
    }

    #[test]
    fn disabled_and_wiped_flags_persist_and_set_presence() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FleetState::load(dir.path()).unwrap();
        s.set_disabled(Some("contract\nended")).unwrap();
        let mut s = FleetState::load(dir.path()).unwrap();
        assert!(s.is_disabled());
        assert_eq!(s.disabled_reason(), Some("contractended"));
        assert_eq!(s.presence(), Presence::Disabled);
        s.set_enabled().unwrap();
        let mut s = FleetState::load(dir.path()).unwrap();
        assert!(!s.is_disabled());
        assert_eq!(s.disabled_reason(), None);
        s.set_wiped().unwrap();
        let s = FleetState::load(dir.path()).unwrap();
        assert!(s.is_wiped());
        assert_eq!(s.presence(), Presence::Wiped);
    }

    #[test]
    fn failed_write_changes_nothing_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FleetState::load(dir.path()).unwrap();
        s.accept(1).unwrap();
        // Make the folder unwritable by replacing it with a file.
        let fleet = dir.path().join("fleet");
        std::fs::remove_dir_all(&fleet).unwrap();
        std::fs::write(&fleet, b"not a folder").unwrap();
        assert!(s.accept(2).is_err());
        assert_eq!(s.last_seq(), Some(1));
    }
}
