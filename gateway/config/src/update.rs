//! A fleet `config-update` applied to the daemon's config file, and its rollback.
//!
//! The daemon serves from one config file ([`ConfigFile`]); on the appliance that is the
//! effective config on the state partition (`/var/lib/gatewayd/config/gatewayd.toml`, see
//! docs/adr/0007), elsewhere whatever `--config FILE` names. A signed update is first checked
//! like `check-config` plus the rule on what cannot change remotely
//! ([`check_remote_update`]); the daemon then drains, and [`ConfigFile::apply`] replaces the
//! file, keeping the previous version on disk. If the services cannot start from the new
//! settings, [`ConfigFile::start_failed`] puts the previous file back and the daemon serves
//! from it again. The outcome of the update is kept until the next start hands it to the
//! fleet agent ([`ConfigFile::take_outcome`]), which reports it once everything started.
//!
//! Beside the file `F` (all written with `gateway_durable::write_atomic`, in this order):
//! - `F.previous`: the bytes `F` had before the last update, byte for byte. It stays after
//!   the update (the version kept for a rollback).
//! - `F.update`: the update being tried (its command id on the first line, then the new
//!   text). Written before `F` is replaced; removed ([`UpdateCommit::commit`]) once every
//!   service started from the new file, or after a rollback.
//! - `F` itself, last.
//!
//! So a power cut at any moment of an update leaves enough on disk to finish it:
//! [`ConfigFile::open`] finds `F.update` at the next start. If `F` holds its text, the new
//! file is tried again like right after the update (a failure to start restores
//! `F.previous`); if not, the cut came before `F` was replaced (or during a rollback), `F`
//! is the previous version and the update's outcome is a failure.
//!
//! Invariants:
//! - `F` on disk is always a complete file: the old one or the new one.
//! - `F.previous` is complete and durable before `F` is replaced; `F.update` exists whenever
//!   `F` holds a text that has not yet started its services.
//! - A rollback is attempted only for a start from an update not yet committed; any other
//!   start failure is the daemon's error.
//! - Outcome texts name keys and paths only (they are published to the vendor).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::{ConfigErrors, Problem};
use crate::settings::Settings;

/// Why a config-update or its rollback failed. `Display` is the text reported to the vendor
/// as the update's outcome.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The daemon was started without `--config` (the embedded default): no file to write.
    #[error("gatewayd runs without --config: nothing to {action}")]
    NoConfigFile { action: &'static str },
    /// The new (or restored) text does not parse or check.
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// The current file cannot be read (to keep it for a rollback).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file cannot be written, read or removed durably.
    #[error("{0}")]
    Write(gateway_durable::Error),
    /// The update marker left by an interrupted update is not one this daemon wrote.
    #[error("{}: not an update marker (command id line missing or not UTF-8)", path.display())]
    BadMarker { path: PathBuf },
    /// A command id that cannot be kept on one line of the update marker.
    #[error("config-update command id contains a line break")]
    BadCommandId,
    /// The services could not start, and there was no update to roll back.
    #[error("{message}")]
    StartFailed { message: String },
}

/// What became of a config-update, for the fleet agent to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateOutcome {
    /// The command's id.
    pub cmd_id: String,
    /// `None`: the services run from the new file; otherwise why not (published to the
    /// vendor: keys and paths only).
    pub failure: Option<String>,
}

impl UpdateOutcome {
    fn new(cmd_id: &str, failure: Option<String>) -> Self {
        Self {
            cmd_id: cmd_id.to_owned(),
            failure,
        }
    }
}

/// The outcome text of an update that a power cut or a crash interrupted before the new file
/// was in place (or while it was being rolled back).
pub const INTERRUPTED: &str = "the update was interrupted (power loss or restart) before the new \
                               configuration was in force; the previous configuration is in force";

/// Removes the update marker once the services started from the new file: from then on a
/// failure to start is no longer the update's (see the module docs). Blocking file work.
#[derive(Debug)]
pub struct UpdateCommit {
    marker: PathBuf,
}

impl UpdateCommit {
    /// Removes the marker durably.
    pub fn commit(self) -> Result<(), UpdateError> {
        gateway_durable::remove_durably(&self.marker)
            .map(|_| ())
            .map_err(UpdateError::Write)
    }
}

/// The config file of a running daemon across restarts and fleet config-updates.
#[derive(Debug)]
pub struct ConfigFile {
    /// `None`: the embedded development default.
    path: Option<PathBuf>,
    /// While a new file is being tried: its command id and the previous file's bytes.
    trying: Option<(String, Vec<u8>)>,
    /// The last update's outcome, for the next start to report.
    outcome: Option<UpdateOutcome>,
}

impl ConfigFile {
    /// The file at `path`, or the embedded default without one. Does not look for an
    /// interrupted update: [`ConfigFile::open`] does.
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            trying: None,
            outcome: None,
        }
    }

    /// The file at `path` as the daemon starts: an update a power cut or crash interrupted
    /// (its marker is still there) is picked up again. If the file holds the update's text,
    /// the start tries it (a failure rolls back, success is reported as applied); otherwise
    /// the previous file is in force and the outcome is [`INTERRUPTED`]. Without a marker
    /// nothing is read or written.
    pub fn open(path: Option<PathBuf>) -> Result<Self, UpdateError> {
        let mut file = Self::new(path);
        let Some(path) = file.path.clone() else {
            return Ok(file);
        };
        let marker = sibling(&path, "update");
        let Some(staged) = gateway_durable::read_if_exists(&marker).map_err(UpdateError::Write)?
        else {
            return Ok(file);
        };
        let (cmd_id, text) = parse_marker(&staged).ok_or(UpdateError::BadMarker {
            path: marker.clone(),
        })?;
        let current = gateway_durable::read_if_exists(&path).map_err(UpdateError::Write)?;
        let previous = gateway_durable::read_if_exists(&sibling(&path, "previous"))
            .map_err(UpdateError::Write)?;
        match (current, previous) {
            (Some(current), Some(previous)) if current == text => {
                file.trying = Some((cmd_id.to_owned(), previous));
                file.outcome = Some(UpdateOutcome::new(cmd_id, None));
            }
            _ => {
                // The new text never replaced the file (or a rollback had put the previous
                // one back): the file in place is what runs, and the update failed.
                file.outcome = Some(UpdateOutcome::new(cmd_id, Some(INTERRUPTED.to_owned())));
                gateway_durable::remove_durably(&marker).map_err(UpdateError::Write)?;
            }
        }
        Ok(file)
    }

    /// The config file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The settings in the file now (or the embedded default).
    pub fn load(&self) -> Result<Settings, ConfigErrors> {
        match &self.path {
            Some(path) => Settings::load(path),
            None => Ok(Settings::embedded_default()),
        }
    }

    /// The outcome of the last update, once: the start it is handed to reports it.
    pub fn take_outcome(&mut self) -> Option<UpdateOutcome> {
        self.outcome.take()
    }

    /// Whether the services now starting run from an update not yet committed (a failure to
    /// start rolls it back).
    pub fn is_trying_update(&self) -> bool {
        self.trying.is_some()
    }

    /// What the start must do once every service runs, while an update is tried: remove its
    /// marker ([`UpdateCommit::commit`], blocking file work).
    pub fn pending_commit(&self) -> Option<UpdateCommit> {
        let path = self.path.as_ref()?;
        self.trying.as_ref().map(|_| UpdateCommit {
            marker: sibling(path, "update"),
        })
    }

    /// The services stopped for a restart: the file again.
    pub fn restart(&mut self) -> Result<Settings, UpdateError> {
        self.trying = None;
        self.load().map_err(UpdateError::Invalid)
    }

    /// The services stopped for a validated update: keeps the current file's bytes as
    /// `F.previous`, writes the marker, then `toml` over the file (each atomically and
    /// durably), and returns the new settings. When the update cannot be written, its
    /// failure is the outcome and the current file is read again.
    pub fn apply(&mut self, cmd_id: &str, toml: &str) -> Result<Settings, UpdateError> {
        self.trying = None;
        match self.write(cmd_id, toml) {
            Ok((settings, previous)) => {
                self.trying = Some((cmd_id.to_owned(), previous));
                self.outcome = Some(UpdateOutcome::new(cmd_id, None));
                Ok(settings)
            }
            Err(why) => {
                self.outcome = Some(UpdateOutcome::new(cmd_id, Some(why.to_string())));
                self.restart()
            }
        }
    }

    /// The services could not start (`message`): while an update is tried, restores the
    /// previous file, removes the marker and returns the previous settings (the update's
    /// outcome is `message`); otherwise there is nothing to fall back to.
    pub fn start_failed(&mut self, message: String) -> Result<Settings, UpdateError> {
        let Some((cmd_id, previous)) = self.trying.take() else {
            return Err(UpdateError::StartFailed { message });
        };
        let restored = self.restore(&previous);
        if restored.is_ok() {
            self.outcome = Some(UpdateOutcome::new(&cmd_id, Some(message)));
        }
        restored
    }

    fn write(&self, cmd_id: &str, toml: &str) -> Result<(Settings, Vec<u8>), UpdateError> {
        let path = self
            .path
            .as_ref()
            .ok_or(UpdateError::NoConfigFile { action: "update" })?;
        if cmd_id.contains(['\n', '\r']) {
            return Err(UpdateError::BadCommandId);
        }
        let settings = Settings::from_toml_str(toml).map_err(UpdateError::Invalid)?;
        let previous = std::fs::read(path).map_err(|source| UpdateError::Read {
            path: path.clone(),
            source,
        })?;
        let write = |p: &Path, bytes: &[u8]| {
            gateway_durable::write_atomic(p, bytes).map_err(UpdateError::Write)
        };
        write(&sibling(path, "previous"), &previous)?;
        let mut marker = Vec::with_capacity(cmd_id.len() + 1 + toml.len());
        marker.extend_from_slice(cmd_id.as_bytes());
        marker.push(b'\n');
        marker.extend_from_slice(toml.as_bytes());
        write(&sibling(path, "update"), &marker)?;
        write(path, toml.as_bytes())?;
        Ok((settings, previous))
    }

    fn restore(&self, previous: &[u8]) -> Result<Settings, UpdateError> {
        let path = self
            .path
            .as_ref()
            .ok_or(UpdateError::NoConfigFile { action: "restore" })?;
        gateway_durable::write_atomic(path, previous).map_err(UpdateError::Write)?;
        gateway_durable::remove_durably(&sibling(path, "update")).map_err(UpdateError::Write)?;
        let text = String::from_utf8_lossy(previous);
        Settings::from_toml_str(&text).map_err(UpdateError::Invalid)
    }
}

/// `F.suffix` beside the config file `F`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// The marker's command id and the update's text.
fn parse_marker(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let newline = bytes.iter().position(|b| *b == b'\n')?;
    let (id, rest) = bytes.split_at(newline);
    let cmd_id = std::str::from_utf8(id).ok()?;
    let text = rest.get(1..)?;
    (!cmd_id.is_empty()).then_some((cmd_id, text))
}

/// A `config-update` document checked exactly like `check-config`, plus the keys that
/// cannot change remotely: `node.id` (the gateway's identity towards the broker),
/// `node.data_dir` (its spool, keys and fleet state), and `update.rauc_command` and
/// `update.reboot_request_file` (what runs as the firmware installer and what reboots the box
/// stay as the factory set them: a configuration change must not become an install path).
pub fn check_remote_update(current: &Settings, toml: &str) -> Result<Settings, ConfigErrors> {
    let settings = Settings::from_toml_str(toml)?;
    let mut problems = Vec::new();
    let node_id = current.node.id.as_str();
    if settings.node.id.as_str() != node_id {
        problems.push(Problem::new(
            "node.id",
            format!("cannot change remotely (this gateway is {node_id:?})"),
        ));
    }
    if settings.node.data_dir != current.node.data_dir {
        problems.push(Problem::new(
            "node.data_dir",
            format!(
                "cannot change remotely (this gateway keeps its data in {})",
                current.node.data_dir.display()
            ),
        ));
    }
    let fixed = [
        (
            "update.rauc_command",
            &settings.update.rauc_command,
            &current.update.rauc_command,
        ),
        (
            "update.reboot_request_file",
            &settings.update.reboot_request_file,
            &current.update.reboot_request_file,
        ),
    ];
    for (key, new, now) in fixed {
        if new != now {
            problems.push(Problem::new(
                key,
                format!(
                    "cannot change remotely (this gateway's is {})",
                    now.display()
                ),
            ));
        }
    }
    if problems.is_empty() {
        Ok(settings)
    } else {
        Err(ConfigErrors { problems })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NODE: &str = "[node]\nid = \"gw-1\"\ndata_dir = \"/tmp/x\"\nmode = \"development\"\n";

    fn lines(result: Result<Settings, ConfigErrors>) -> Vec<String> {
        result
            .unwrap_err()
            .problems
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn config_update_validation_is_check_config_plus_a_fixed_node_id() {
        let current = Settings::from_toml_str(NODE).unwrap();
        let check = |toml: &str| check_remote_update(&current, toml);
        assert!(check(NODE).is_ok());
        let problems = lines(check(&format!("{NODE}[dicom]\nlisten = \"x\"\n")));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("dicom.listen: "), "{problems:?}");
        let problems = lines(check(&NODE.replace("gw-1", "gw-2")));
        assert_eq!(
            problems,
            ["node.id: cannot change remotely (this gateway is \"gw-1\")"]
        );
        assert!(check("not toml [").is_err());
        let problems = lines(check(&NODE.replace("/tmp/x", "/tmp/y")));
        assert!(problems[0].starts_with("node.data_dir: "), "{problems:?}");
        // The installer and the reboot request stay the factory's.
        let problems = lines(check(&format!(
            "{NODE}[update]\nrauc_command = \"/tmp/x/evil\"\nreboot_request_file = \"/tmp/r\"\n"
        )));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("update.rauc_command: cannot change remotely"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("update.reboot_request_file: cannot change remotely"),
            "{problems:?}"
        );
        assert!(check(&format!("{NODE}[update]\nhealth_timeout = \"60s\"\n")).is_ok());
    }

    #[test]
    fn an_update_is_written_durably_and_rolled_back_when_it_cannot_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatewayd.toml");
        std::fs::write(&path, NODE).unwrap();
        let mut file = ConfigFile::new(Some(path.clone()));
        assert_eq!(file.load().unwrap().node.id.as_str(), "gw-1");
        let new = NODE.replace("/tmp/x", "/tmp/y");
        let settings = file.apply("c1", &new).unwrap();
        assert_eq!(settings.node.data_dir, PathBuf::from("/tmp/y"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), new);
        assert!(file.is_trying_update());
        assert_eq!(file.take_outcome(), Some(UpdateOutcome::new("c1", None)));
        // The new file cannot start its services: the previous file comes back.
        let restored = file.start_failed("dicom.listen: in use".into()).unwrap();
        assert_eq!(restored.node.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), NODE);
        assert_eq!(
            file.take_outcome(),
            Some(UpdateOutcome::new(
                "c1",
                Some("dicom.listen: in use".into())
            ))
        );
        // A later failure has nothing to roll back.
        let err = file.start_failed("boom".into()).unwrap_err();
        assert_eq!(err.to_string(), "boom");
    }

    #[test]
    fn an_update_that_cannot_be_written_is_the_outcome_and_the_file_is_read_again() {
        let mut file = ConfigFile::new(None);
        let settings = file.apply("c2", NODE).unwrap();
        assert_eq!(settings, Settings::embedded_default());
        assert_eq!(
            file.take_outcome(),
            Some(UpdateOutcome::new(
                "c2",
                Some("gatewayd runs without --config: nothing to update".into())
            ))
        );
        assert!(!file.is_trying_update());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatewayd.toml");
        std::fs::write(&path, NODE).unwrap();
        let mut file = ConfigFile::new(Some(path.clone()));
        file.apply("c3", "[node]\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), NODE);
        let outcome = file.take_outcome().unwrap();
        assert_eq!(
            outcome.failure.as_deref(),
            Some("node.id: missing required key")
        );
    }

    fn sibling_text(path: &Path, suffix: &str) -> Option<String> {
        std::fs::read_to_string(sibling(path, suffix)).ok()
    }

    #[test]
    fn apply_keeps_the_previous_file_beside_the_new_one_and_a_marker_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatewayd.toml");
        // Not valid UTF-8 in a comment would not parse; odd bytes (CRLF, no final newline)
        // must come back as they were.
        let old = NODE.replace('\n', "\r\n") + "# kept";
        std::fs::write(&path, &old).unwrap();
        let mut file = ConfigFile::open(Some(path.clone())).unwrap();
        assert!(!file.is_trying_update());
        assert!(file.pending_commit().is_none());
        let new = NODE.replace("/tmp/x", "/tmp/y");
        file.apply("c1", &new).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), new);
        assert_eq!(
            sibling_text(&path, "previous").as_deref(),
            Some(old.as_str())
        );
        assert_eq!(sibling_text(&path, "update"), Some(format!("c1\n{new}")));
        file.pending_commit().unwrap().commit().unwrap();
        assert_eq!(sibling_text(&path, "update"), None);
        // The previous version stays after the commit.
        assert_eq!(
            sibling_text(&path, "previous").as_deref(),
            Some(old.as_str())
        );
        // A restart is no longer an update: nothing to roll back.
        file.restart().unwrap();
        assert!(file.pending_commit().is_none());
        assert!(file.start_failed("boom".into()).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), new);
    }

    #[test]
    fn a_rollback_restores_the_previous_bytes_and_clears_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatewayd.toml");
        let old = format!("# site config\n{NODE}\n\n");
        std::fs::write(&path, &old).unwrap();
        let mut file = ConfigFile::open(Some(path.clone())).unwrap();
        file.apply("c1", &NODE.replace("/tmp/x", "/tmp/y")).unwrap();
        let restored = file.start_failed("hl7.listen: in use".into()).unwrap();
        assert_eq!(restored.node.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(std::fs::read(&path).unwrap(), old.as_bytes());
        assert_eq!(sibling_text(&path, "update"), None);
        // The next start finds nothing to resume.
        let mut again = ConfigFile::open(Some(path.clone())).unwrap();
        assert!(!again.is_trying_update());
        assert_eq!(again.take_outcome(), None);
    }

    #[test]
    fn a_crash_while_trying_a_file_that_cannot_start_is_rolled_back_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatewayd.toml");
        std::fs::write(&path, NODE).unwrap();
        let new = NODE.replace("/tmp/x", "/tmp/y");
        let mut file = ConfigFile::open(Some(path.clone())).unwrap();
        file.apply("c7", &new).unwrap();
        // Power cut: the process and everything in memory are gone, the files stay.
        drop(file);
        let mut file = ConfigFile::open(Some(path.clone())).unwrap();
        assert!(file.is_trying_update());
        assert_eq!(file.load().unwrap().node.data_dir, PathBuf::from("/tmp/y"));
        let restored = file.start_failed("dicom.listen: in use".into()).unwrap();
        assert_eq!(restored.node.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), NODE);
        assert_eq!(
            file.take_outcome(),
            Some(UpdateOutcome::new(
                "c7",
                Some("dicom.listen: in use".into())
            ))
        );
        assert_eq!(sibling_text(&path, "update"), None);
    }

    #[test]
    fn a_crash_while_trying_a_file_that_starts_reports_it_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatewayd.toml");
        std::fs::write(&path, NODE).unwrap();
        let new = NODE.replace("/tmp/x", "/tmp/y");
        ConfigFile::open(Some(path.clone()))
            .unwrap()
            .apply("c8", &new)
            .unwrap();
        let mut file = ConfigFile::open(Some(path.clone())).unwrap();
        assert_eq!(file.take_outcome(), Some(UpdateOutcome::new("c8", None)));
        file.pending_commit().unwrap().commit().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), new);
        let mut file = ConfigFile::open(Some(path.clone())).unwrap();
        assert!(!file.is_trying_update());
        assert_eq!(file.take_outcome(), None);
    }

    #[test]
    fn a_crash_before_the_new_file_was_in_place_keeps_the_old_one_and_reports_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatewayd.toml");
        std::fs::write(&path, NODE).unwrap();
        // What apply leaves if the power goes after the marker and before the rename.
        std::fs::write(sibling(&path, "previous"), NODE).unwrap();
        std::fs::write(sibling(&path, "update"), format!("c9\n{NODE}# new\n")).unwrap();
        let mut file = ConfigFile::open(Some(path.clone())).unwrap();
        assert!(!file.is_trying_update());
        assert_eq!(
            file.take_outcome(),
            Some(UpdateOutcome::new("c9", Some(INTERRUPTED.into())))
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), NODE);
        assert_eq!(sibling_text(&path, "update"), None);
        // A marker this daemon did not write is an error, not a guess.
        std::fs::write(sibling(&path, "update"), "no line break").unwrap();
        let err = ConfigFile::open(Some(path.clone())).unwrap_err();
        assert!(matches!(err, UpdateError::BadMarker { .. }), "{err}");
    }

    #[test]
    fn a_config_file_without_update_files_opens_and_loads_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.toml");
        std::fs::write(&path, NODE).unwrap();
        let mut file = ConfigFile::open(Some(path.clone())).unwrap();
        assert_eq!(file.path(), Some(path.as_path()));
        assert_eq!(file.load().unwrap().node.id.as_str(), "gw-1");
        assert!(!file.is_trying_update());
        assert_eq!(file.take_outcome(), None);
        // Opening and loading write nothing beside the file.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["dev.toml"]);
        let mut none = ConfigFile::open(None).unwrap();
        assert_eq!(none.load().unwrap(), Settings::embedded_default());
        assert!(none.pending_commit().is_none());
        assert!(none.apply("c1", "x\ny").is_ok());
        let bad = ConfigFile::new(Some(path.clone()))
            .apply("a\nb", NODE)
            .unwrap();
        assert_eq!(bad.node.id.as_str(), "gw-1");
    }
}
