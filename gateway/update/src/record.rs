//! The persisted update record: `<data_dir>/update/record.json`.
//!
//! One record per update command, written with `gateway_durable::write_atomic` (temp file,
//! fsync, rename, fsync of the folder) at every transition, so a power cut at any instant
//! leaves either the old or the new record. The record says where the update was; what the
//! box actually booted (the installer's status and the boot id) decides what happens next
//! ([`crate::machine::decide_at_start`]).
//!
//! Phases, in order: `downloading` -> `installing` -> `rebooting` -> `trial` -> `final`.
//! A final record keeps its outcome until the fleet agent has published it; then it moves to
//! `update/last.json` (kept for `gatewayd update status`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::UpdateError;

/// Record format written by this build.
pub const RECORD_FORMAT: u32 = 1;

/// Where things live under `<data_dir>/update/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatePaths {
    pub dir: PathBuf,
}

impl UpdatePaths {
    pub fn new(data_dir: &Path) -> UpdatePaths {
        UpdatePaths {
            dir: data_dir.join("update"),
        }
    }
    /// The record of the update in progress (or finished and not yet published).
    pub fn record(&self) -> PathBuf {
        self.dir.join("record.json")
    }
    /// The last published record.
    pub fn last(&self) -> PathBuf {
        self.dir.join("last.json")
    }
    /// The download in progress; its length is where a resumed download starts.
    pub fn part(&self) -> PathBuf {
        self.dir.join("bundle.part")
    }
    /// The complete bundle whose SHA-256 matched the command's.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.raucb")
    }
    /// Written just before the reboot request: the next boot is a trial boot and the health
    /// check unit runs (`ConditionPathExists=`).
    pub fn trial(&self) -> PathBuf {
        self.dir.join("trial")
    }
    /// The signed `gateway-update.json` of the bundle being installed, copied here by the
    /// RAUC pre-install handler (for the floor raise after the health check).
    pub fn bundle_meta(&self) -> PathBuf {
        self.dir.join("bundle-meta.json")
    }
    /// Written by the fleet agent when it is connected to the broker: the current boot id.
    pub fn broker_reached(&self) -> PathBuf {
        self.dir.join("broker-reached")
    }
}

/// Where an update is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Downloading,
    Installing,
    Rebooting,
    /// Booted into the new slot; the health check runs (or ran and the box rebooted).
    Trial,
    Final,
}

/// How an update ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Outcome {
    Successful,
    Failed { code: String, reason: String },
    RolledBack { reason: RollbackReason },
}

/// Why the box is back on the old slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackReason {
    /// The new firmware's health check failed or timed out.
    HealthFailed,
    /// The trial boot was cut (power, watchdog) before the health check decided.
    Interrupted,
    /// The new slot never got as far as the health check (kernel, initramfs, verity).
    BootFailed,
}

impl RollbackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackReason::HealthFailed => "health-failed",
            RollbackReason::Interrupted => "interrupted",
            RollbackReason::BootFailed => "boot-failed",
        }
    }
}

/// The persisted record of one `update` command. Holds no patient data: ids, a URL the
/// vendor chose, hashes, versions, slot names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRecord {
    pub format: u32,
    pub cmd_id: String,
    pub url: String,
    /// 64 lowercase hex digits.
    pub sha256: String,
    pub version: u64,
    pub size: u64,
    pub phase: Phase,
    /// Boot name of the slot the box ran when the update was accepted (`system0`).
    #[serde(default)]
    pub from_slot: Option<String>,
    /// Boot name of the slot written by the install.
    #[serde(default)]
    pub target_slot: Option<String>,
    /// `rauc install` runs started (an interrupted one is retried at most twice).
    #[serde(default)]
    pub install_attempts: u32,
    /// The kernel boot id when the reboot was requested: the same id at start means the
    /// reboot has not happened yet.
    #[serde(default)]
    pub reboot_boot_id: Option<String>,
    /// The health check ran in this boot (boot id) and failed.
    #[serde(default)]
    pub health_failed: bool,
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// Unix seconds of the last transition.
    pub at: u64,
}

impl UpdateRecord {
    /// A new record in `downloading`.
    pub fn new(cmd_id: &str, url: &str, sha256: &[u8; 32], version: u64, size: u64) -> Self {
        UpdateRecord {
            format: RECORD_FORMAT,
            cmd_id: cmd_id.to_owned(),
            url: url.to_owned(),
            sha256: hex::encode(sha256),
            version,
            size,
            phase: Phase::Downloading,
            from_slot: None,
            target_slot: None,
            install_attempts: 0,
            reboot_boot_id: None,
            health_failed: false,
            outcome: None,
            at: now_unix(),
        }
    }

    /// The command's SHA-256 as bytes.
    pub fn sha256_bytes(&self) -> Option<[u8; 32]> {
        let bytes = hex::decode(&self.sha256).ok()?;
        bytes.try_into().ok()
    }

    /// Ends the update with `outcome` (the agent publishes it).
    pub fn finish(&mut self, outcome: Outcome) {
        self.phase = Phase::Final;
        self.outcome = Some(outcome);
        self.at = now_unix();
    }

    /// Ends it `failed` with `code` and `reason`.
    pub fn fail(&mut self, code: &str, reason: &str) {
        self.finish(Outcome::Failed {
            code: code.to_owned(),
            reason: reason.to_owned(),
        });
    }

    pub fn is_final(&self) -> bool {
        self.phase == Phase::Final
    }
}

/// Reads and writes the record.
#[derive(Debug, Clone)]
pub struct RecordStore {
    paths: UpdatePaths,
}

impl RecordStore {
    pub fn new(data_dir: &Path) -> RecordStore {
        RecordStore {
            paths: UpdatePaths::new(data_dir),
        }
    }

    pub fn paths(&self) -> &UpdatePaths {
        &self.paths
    }

    /// The record, `None` when no update is in progress. A record that cannot be parsed is
    /// an error naming the file (never silently dropped: the box may be mid-install).
    pub fn load(&self) -> Result<Option<UpdateRecord>, UpdateError> {
        load_from(&self.paths.record())
    }

    /// The last published record.
    pub fn load_last(&self) -> Result<Option<UpdateRecord>, UpdateError> {
        load_from(&self.paths.last())
    }

    /// Writes the record durably (0600 in a 0700 folder).
    pub fn save(&self, record: &UpdateRecord) -> Result<(), UpdateError> {
        gateway_durable::ensure_private_dir(&self.paths.dir)?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| UpdateError::Encode {
            reason: e.to_string(),
        })?;
        gateway_durable::write_atomic(&self.paths.record(), &bytes)?;
        Ok(())
    }

    /// After the final state was published: the record becomes `last.json` and the bundle,
    /// partial download, trial marker and bundle metadata go.
    pub fn archive(&self) -> Result<(), UpdateError> {
        if let Some(record) = self.load()? {
            let bytes = serde_json::to_vec_pretty(&record).map_err(|e| UpdateError::Encode {
                reason: e.to_string(),
            })?;
            gateway_durable::write_atomic(&self.paths.last(), &bytes)?;
        }
        for path in [
            self.paths.bundle(),
            self.paths.part(),
            self.paths.trial(),
            self.paths.bundle_meta(),
            self.paths.record(),
        ] {
            gateway_durable::remove_durably(&path)?;
        }
        Ok(())
    }
}

fn load_from(path: &Path) -> Result<Option<UpdateRecord>, UpdateError> {
    let Some(bytes) = gateway_durable::read_if_exists(path)? else {
        return Ok(None);
    };
    let record: UpdateRecord =
        serde_json::from_slice(&bytes).map_err(|e| UpdateError::CorruptRecord {
            path: path.to_path_buf(),
            reason: format!("line {} column {}", e.line(), e.column()),
        })?;
    if record.format != RECORD_FORMAT {
        return Err(UpdateError::CorruptRecord {
            path: path.to_path_buf(),
            reason: format!("unknown format {}", record.format),
        });
    }
    Ok(Some(record))
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        assert_eq!(store.load().unwrap(), None);
        let mut r = UpdateRecord::new("u-1", "https://h/b", &[7; 32], 3, 100);
        store.save(&r).unwrap();
        assert_eq!(
            RecordStore::new(dir.path()).load().unwrap(),
            Some(r.clone())
        );
        r.phase = Phase::Installing;
        r.install_attempts = 1;
        store.save(&r).unwrap();
        let back = RecordStore::new(dir.path()).load().unwrap().unwrap();
        assert_eq!(back.phase, Phase::Installing);
        assert_eq!(back.sha256_bytes(), Some([7; 32]));
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_the_file_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        std::fs::create_dir_all(&store.paths().dir).unwrap();
        std::fs::write(store.paths().record(), b"{\"format\":1,").unwrap();
        let err = store.load().unwrap_err();
        assert!(err.to_string().contains("record.json"), "{err}");
        std::fs::write(
            store.paths().record(),
            br#"{"format":9,"cmd_id":"u","url":"https://h/b","sha256":"","version":1,"size":1,"phase":"downloading","at":0}"#,
        )
        .unwrap();
        assert!(store.load().unwrap_err().to_string().contains("format 9"));
    }

    #[test]
    fn archive_keeps_the_last_record_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        let mut r = UpdateRecord::new("u-1", "https://h/b", &[7; 32], 3, 100);
        r.finish(Outcome::RolledBack {
            reason: RollbackReason::HealthFailed,
        });
        store.save(&r).unwrap();
        for p in [store.paths().bundle(), store.paths().trial()] {
            std::fs::write(p, b"x").unwrap();
        }
        store.archive().unwrap();
        assert_eq!(store.load().unwrap(), None);
        assert_eq!(store.load_last().unwrap(), Some(r));
        assert!(!store.paths().bundle().exists());
        assert!(!store.paths().trial().exists());
    }

    #[test]
    fn outcome_json_is_stable() {
        let o = Outcome::RolledBack {
            reason: RollbackReason::BootFailed,
        };
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"state":"rolled-back","reason":"boot-failed"}"#
        );
    }
}
