//! A fleet `config-update` applied to the daemon's config file, and its rollback.
//!
//! The daemon serves from one config file ([`ConfigFile`]). A signed update is first checked
//! like `check-config` plus the rule on what cannot change remotely
//! ([`check_remote_update`]); the daemon then drains, and [`ConfigFile::apply`] writes the
//! new text over the file atomically and durably, keeping the previous file's bytes. If the
//! services cannot start from the new settings, [`ConfigFile::start_failed`] puts the
//! previous file back (durably) and the daemon serves from it again. The outcome of the
//! update is kept until the next start hands it to the fleet agent
//! ([`ConfigFile::take_outcome`]), which reports it once everything started.
//!
//! Invariants:
//! - The file on disk is always a complete file: the old one or the new one
//!   (`gateway_durable::write_atomic`).
//! - A rollback is attempted only for the start right after an update; any other start
//!   failure is the daemon's error.
//! - Outcome texts name keys and paths only (they are published to the vendor).

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
    /// The file cannot be replaced durably.
    #[error("{0}")]
    Write(gateway_durable::Error),
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
    /// The file at `path`, or the embedded default without one.
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            trying: None,
            outcome: None,
        }
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

    /// Whether the services now starting run from an update just written (a failure to
    /// start rolls it back).
    pub fn is_trying_update(&self) -> bool {
        self.trying.is_some()
    }

    /// The services stopped for a restart: the file again.
    pub fn restart(&mut self) -> Result<Settings, UpdateError> {
        self.trying = None;
        self.load().map_err(UpdateError::Invalid)
    }

    /// The services stopped for a validated update: writes `toml` over the file (atomically,
    /// durably), keeps the previous bytes and returns the new settings. When the update
    /// cannot be written, its failure is the outcome and the current file is read again.
    pub fn apply(&mut self, cmd_id: &str, toml: &str) -> Result<Settings, UpdateError> {
        self.trying = None;
        match self.write(toml) {
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

    /// The services could not start (`message`): right after an update, restores the
    /// previous file and returns its settings (the update's outcome is `message`);
    /// otherwise there is nothing to fall back to.
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

    fn write(&self, toml: &str) -> Result<(Settings, Vec<u8>), UpdateError> {
        let path = self
            .path
            .as_ref()
            .ok_or(UpdateError::NoConfigFile { action: "update" })?;
        let settings = Settings::from_toml_str(toml).map_err(UpdateError::Invalid)?;
        let previous = std::fs::read(path).map_err(|source| UpdateError::Read {
            path: path.clone(),
            source,
        })?;
        gateway_durable::write_atomic(path, toml.as_bytes()).map_err(UpdateError::Write)?;
        Ok((settings, previous))
    }

    fn restore(&self, previous: &[u8]) -> Result<Settings, UpdateError> {
        let path = self
            .path
            .as_ref()
            .ok_or(UpdateError::NoConfigFile { action: "restore" })?;
        gateway_durable::write_atomic(path, previous).map_err(UpdateError::Write)?;
        let text = String::from_utf8_lossy(previous);
        Settings::from_toml_str(&text).map_err(UpdateError::Invalid)
    }
}

/// A `config-update` document checked exactly like `check-config`, plus the keys that
/// cannot change remotely: `node.id` (the gateway's identity towards the broker) and
/// `node.data_dir` (its spool, keys and fleet state).
pub fn check_remote_update(
    node_id: &str,
    data_dir: &Path,
    toml: &str,
) -> Result<Settings, ConfigErrors> {
    let settings = Settings::from_toml_str(toml)?;
    let mut problems = Vec::new();
    if settings.node.id.as_str() != node_id {
        problems.push(Problem::new(
            "node.id",
            format!("cannot change remotely (this gateway is {node_id:?})"),
        ));
    }
    if settings.node.data_dir != data_dir {
        problems.push(Problem::new(
            "node.data_dir",
            format!(
                "cannot change remotely (this gateway keeps its data in {})",
                data_dir.display()
            ),
        ));
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
        let check = |toml: &str| check_remote_update("gw-1", Path::new("/tmp/x"), toml);
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
}
