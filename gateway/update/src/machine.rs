//! The update state machine: what runs at each phase, in which order, and what a (re)start
//! of the daemon does with the record it finds.
//!
//! Every transition is written to the record *before* the step it announces, so a power
//! cut at any point is one of the cases of [`Updater::decide_at_start`]:
//!
//! | record | booted | decision |
//! |---|---|---|
//! | none | any | nothing to do |
//! | `final` | any | publish the outcome ([`StartAction::Publish`]) |
//! | `downloading` | any | resume the download from `bundle.part`'s length |
//! | `installing` | the old slot | re-verify the bundle's hash and install again (at most [`MAX_INSTALL_ATTEMPTS`] in all), then `failed` `install-interrupted` |
//! | `installing`/`rebooting` | the old slot, same boot id as the reboot request | ask for the reboot again |
//! | `installing`/`rebooting`/`trial` | the new slot | trial boot: the health check decides ([`StartAction::AwaitHealth`]); a good slot finishes `successful` |
//! | `rebooting` | the old slot, another boot | `rolled-back` `boot-failed` (the new slot never reached its health check) |
//! | `trial` | the old slot | `rolled-back` `health-failed` if the check failed, else `interrupted` |
//!
//! Before any slot write ([`Updater::verify_and_install`]), in this order: the bundle's
//! SHA-256, `rauc info` (signature -> `bundle-signature`; compatible -> `incompatible`;
//! version equal to the command's -> `version-mismatch`), the version floor
//! (`downgrade`), the data format (`data-format`), free space (`no-space`); only then
//! `rauc install`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::installer::{Installer, InstallerError};
use crate::record::{Outcome, Phase, RecordStore, RollbackReason, UpdateRecord};
use crate::{Failure, UpdateError};

/// `rauc install` runs for one command, the interrupted ones included.
pub const MAX_INSTALL_ATTEMPTS: u32 = 3;

/// The anti-downgrade floor (the TPM NV counter in production; gatewayd adapts the key
/// store to this).
pub trait VersionFloor: Send + Sync + std::fmt::Debug {
    fn floor(&self) -> Result<u64, FloorError>;
    /// Raises the floor to `to` (never lowers it); returns the floor after the call.
    fn raise(&self, to: u64) -> Result<u64, FloorError>;
}

/// The floor could not be read or raised (the key store's error, without secrets).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("version floor: {reason}")]
pub struct FloorError {
    pub reason: String,
}

/// Free bytes of the file system holding a path (statvfs).
pub fn free_bytes(path: &Path) -> Result<u64, UpdateError> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(|e| {
        UpdateError::Io(gateway_durable::Error {
            action: "statvfs",
            path: path.to_path_buf(),
            source: std::io::Error::from(e),
        })
    })?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

/// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`).
pub fn current_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// What the daemon does with the record it finds at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAction {
    Nothing,
    /// Publish this final outcome, then [`RecordStore::archive`].
    Publish(UpdateRecord),
    ResumeDownload(UpdateRecord),
    /// Verify and install again (an install was cut).
    Reinstall(UpdateRecord),
    /// The reboot asked for has not happened: ask again.
    RequestReboot(UpdateRecord),
    /// A trial boot of the new slot: the health check unit decides; watch the record.
    AwaitHealth(UpdateRecord),
}

/// The settings the state machine needs.
#[derive(Debug, Clone)]
pub struct UpdaterSettings {
    pub data_dir: PathBuf,
    /// RAUC `compatible` of this product.
    pub compatible: String,
    /// The file whose creation asks the system to reboot.
    pub reboot_request_file: PathBuf,
    /// Free bytes the data partition keeps beyond the bundle.
    pub reserve_bytes: u64,
}

/// The state machine, over an installer and a floor. Every method blocks (file I/O,
/// `rauc`, the TPM): call from `spawn_blocking` or a dedicated thread.
#[derive(Debug, Clone)]
pub struct Updater {
    settings: UpdaterSettings,
    store: RecordStore,
    installer: Arc<dyn Installer>,
    floor: Arc<dyn VersionFloor>,
}

impl Updater {
    pub fn new(
        settings: UpdaterSettings,
        installer: Arc<dyn Installer>,
        floor: Arc<dyn VersionFloor>,
    ) -> Updater {
        let store = RecordStore::new(&settings.data_dir);
        Updater {
            settings,
            store,
            installer,
            floor,
        }
    }

    pub fn store(&self) -> &RecordStore {
        &self.store
    }

    pub fn installer(&self) -> &Arc<dyn Installer> {
        &self.installer
    }

    /// Accepts a new update: refuses `busy` while another is in progress, `bad-args` above
    /// `max_bundle_bytes`, `no-space` when the bundle would not fit; otherwise the record
    /// is written in `downloading` (durably) and returned.
    pub fn begin(
        &self,
        cmd_id: &str,
        url: &str,
        sha256: &[u8; 32],
        version: u64,
        size: u64,
        max_bundle_bytes: u64,
    ) -> Result<UpdateRecord, Failure> {
        match self.store.load() {
            Ok(Some(r)) if !r.is_final() => {
                return Err(Failure::new(
                    "busy",
                    format!("update {} is in progress (phase {:?})", r.cmd_id, r.phase),
                ));
            }
            Ok(Some(_)) => self.store.archive().map_err(Failure::internal)?,
            Ok(None) => {}
            Err(e) => return Err(Failure::internal(e)),
        }
        if size > max_bundle_bytes {
            return Err(Failure::new(
                "bad-args",
                format!(
                    "size {size} is above this box's update.max_bundle_bytes {max_bundle_bytes}"
                ),
            ));
        }
        gateway_durable::ensure_private_dir(&self.store.paths().dir)
            .map_err(|e| Failure::internal(e.into()))?;
        let free = free_bytes(&self.store.paths().dir).map_err(Failure::internal)?;
        if free < size.saturating_add(self.settings.reserve_bytes) {
            return Err(Failure::new(
                "no-space",
                format!(
                    "the data partition has {free} bytes free; the bundle needs {size} plus a reserve of {}",
                    self.settings.reserve_bytes
                ),
            ));
        }
        let mut record = UpdateRecord::new(cmd_id, url, sha256, version, size);
        record.from_slot = self.installer.status().ok().and_then(|s| s.booted);
        // A partial download of another bundle must not be resumed into this one.
        for path in [self.store.paths().part(), self.store.paths().bundle()] {
            gateway_durable::remove_durably(&path).map_err(|e| Failure::internal(e.into()))?;
        }
        self.store.save(&record).map_err(Failure::internal)?;
        Ok(record)
    }

    /// Persists a failure as the record's final outcome (the agent publishes it).
    pub fn fail(&self, record: &mut UpdateRecord, failure: &Failure) -> Result<(), UpdateError> {
        record.fail(&failure.code, &failure.reason);
        self.store.save(record)?;
        let _ = gateway_durable::remove_durably(&self.store.paths().trial());
        for path in [self.store.paths().part(), self.store.paths().bundle()] {
            let _ = gateway_durable::remove_durably(&path);
        }
        Ok(())
    }

    /// The downloaded bundle is complete: the record moves to `installing`.
    pub fn downloaded(&self, record: &mut UpdateRecord) -> Result<(), UpdateError> {
        record.phase = Phase::Installing;
        record.at = crate::record::now_unix();
        self.store.save(record)
    }

    /// Every check before a slot write, then `rauc install`. On `Ok` the slot is written and
    /// is the next boot (once), the trial marker is written and the record still says
    /// `installing`: the caller publishes `rebooting`, then calls
    /// [`Updater::request_reboot`]. On `Err` nothing was written to a slot unless the installer itself failed
    /// (`install-failed`), and the caller ends the record with the failure.
    pub fn verify_and_install(&self, record: &mut UpdateRecord) -> Result<(), Failure> {
        let paths = self.store.paths().clone();
        let expected = record.sha256_bytes().ok_or_else(|| {
            Failure::new("hash-mismatch", "the record's SHA-256 is not 64 hex digits")
        })?;
        let actual = crate::download::sha256_file(&paths.bundle())
            .map_err(|e| Failure::new("install-failed", format!("cannot read the bundle: {e}")))?;
        if actual != expected {
            return Err(Failure::new(
                "hash-mismatch",
                "the bundle's SHA-256 is not the command's",
            ));
        }
        let info = self.installer.info(&paths.bundle()).map_err(|e| {
            Failure::new(
                "bundle-signature",
                format!("the bundle did not verify: {e}"),
            )
        })?;
        if info.compatible != self.settings.compatible {
            return Err(Failure::new(
                "incompatible",
                format!(
                    "the bundle is for {}, this box is {}",
                    crate::clip(&info.compatible),
                    self.settings.compatible
                ),
            ));
        }
        if info.version.trim().parse::<u64>().ok() != Some(record.version) {
            return Err(Failure::new(
                "version-mismatch",
                format!(
                    "the bundle's signed version {} is not the command's {}",
                    crate::clip(&info.version),
                    record.version
                ),
            ));
        }
        let floor = self.floor.floor().map_err(|e| {
            Failure::new(
                "install-failed",
                format!("cannot read the version floor: {e}"),
            )
        })?;
        if record.version < floor {
            return Err(Failure::new(
                "downgrade",
                format!(
                    "version {} is below this box's floor {floor}",
                    record.version
                ),
            ));
        }
        match gateway_durable::data_format::read(&self.settings.data_dir) {
            Ok(Some(f)) if f > gateway_durable::data_format::CURRENT => {
                return Err(Failure::new(
                    "data-format",
                    format!("the box's data format {f} is newer than this firmware knows"),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::new("data-format", e.to_string())),
        }
        let free = free_bytes(&paths.dir).map_err(Failure::internal)?;
        if free < self.settings.reserve_bytes {
            return Err(Failure::new(
                "no-space",
                format!(
                    "the data partition has {free} bytes free, below the reserve of {}",
                    self.settings.reserve_bytes
                ),
            ));
        }
        let status = self
            .installer
            .status()
            .map_err(|e| Failure::new("install-failed", e.to_string()))?;
        record.target_slot = status.other_bootname();
        if record.from_slot.is_none() {
            record.from_slot = status.booted.clone();
        }
        record.phase = Phase::Installing;
        record.install_attempts += 1;
        record.at = crate::record::now_unix();
        self.store.save(record).map_err(Failure::internal)?;
        // The trial marker exists before the slot can become the next boot: whichever
        // boot follows, the new slot's health check runs.
        gateway_durable::write_atomic(&paths.trial(), record.cmd_id.as_bytes())
            .map_err(|e| Failure::internal(e.into()))?;
        info!(version = record.version, target = ?record.target_slot, "installing the update bundle");
        if let Err(e) = self.installer.install(&paths.bundle()) {
            let _ = gateway_durable::remove_durably(&paths.trial());
            return Err(match e {
                InstallerError::Refused { code } => {
                    let reason = format!("the pre-install check refused the bundle ({code})");
                    Failure::new(&code, reason)
                }
                other => Failure::new("install-failed", other.to_string()),
            });
        }
        Ok(())
    }

    /// Records `rebooting` with this boot's id and writes the reboot request.
    pub fn request_reboot(&self, record: &mut UpdateRecord) -> Result<(), UpdateError> {
        record.phase = Phase::Rebooting;
        record.reboot_boot_id = current_boot_id();
        record.at = crate::record::now_unix();
        self.store.save(record)?;
        let path = &self.settings.reboot_request_file;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| gateway_durable::Error {
                action: "create",
                path: parent.to_path_buf(),
                source,
            })?;
        }
        gateway_durable::write_atomic(path, record.cmd_id.as_bytes())?;
        info!(request = %path.display(), "reboot requested to boot the new slot once");
        Ok(())
    }

    /// What to do with the record found at start (see the module docs' table).
    pub fn decide_at_start(&self, boot_id: Option<&str>) -> Result<StartAction, UpdateError> {
        let Some(mut record) = self.store.load()? else {
            return Ok(StartAction::Nothing);
        };
        let booted = match record.phase {
            Phase::Final | Phase::Downloading => None,
            _ => self.installer.status().ok().and_then(|s| s.booted),
        };
        let on_target = booted.is_some() && booted == record.target_slot;
        let same_boot = boot_id.is_some() && record.reboot_boot_id.as_deref() == boot_id;
        let action = match record.phase {
            Phase::Final => StartAction::Publish(record),
            Phase::Downloading => StartAction::ResumeDownload(record),
            Phase::Installing | Phase::Rebooting | Phase::Trial if on_target => {
                self.finish_if_good(&mut record)?;
                if record.is_final() {
                    StartAction::Publish(record)
                } else {
                    StartAction::AwaitHealth(record)
                }
            }
            Phase::Rebooting if same_boot => StartAction::RequestReboot(record),
            Phase::Installing if record.install_attempts < MAX_INSTALL_ATTEMPTS => {
                StartAction::Reinstall(record)
            }
            Phase::Installing => {
                let failure = Failure::new(
                    "install-interrupted",
                    format!("the install was cut {} times", record.install_attempts),
                );
                self.fail(&mut record, &failure)?;
                StartAction::Publish(record)
            }
            Phase::Rebooting | Phase::Trial => {
                let reason = if record.health_failed {
                    RollbackReason::HealthFailed
                } else if record.phase == Phase::Trial {
                    RollbackReason::Interrupted
                } else {
                    RollbackReason::BootFailed
                };
                warn!(
                    reason = reason.as_str(),
                    "the new firmware did not prove healthy: back on the old slot"
                );
                record.finish(Outcome::RolledBack { reason });
                self.store.save(&record)?;
                let _ = gateway_durable::remove_durably(&self.store.paths().trial());
                StartAction::Publish(record)
            }
        };
        Ok(action)
    }

    /// On the new slot: if it is already marked good (a cut after mark-good), raise the
    /// floor and finish `successful`.
    fn finish_if_good(&self, record: &mut UpdateRecord) -> Result<(), UpdateError> {
        let Some(target) = record.target_slot.clone() else {
            return Ok(());
        };
        let good = self
            .installer
            .status()
            .ok()
            .and_then(|s| s.is_good(&target))
            .unwrap_or(false);
        if good && record.phase == Phase::Trial {
            self.raise_floor(record);
            record.finish(Outcome::Successful);
            self.store.save(record)?;
            let _ = gateway_durable::remove_durably(&self.store.paths().trial());
        }
        Ok(())
    }

    /// Raises the floor to the bundle's `min_version` (copied by the pre-install check);
    /// idempotent. A failure is logged: the slot is good, the floor is retried at the next
    /// update's health check.
    pub fn raise_floor(&self, record: &UpdateRecord) {
        let min = crate::manifest::BundleMeta::load(&self.store.paths().bundle_meta())
            .ok()
            .flatten()
            .map(|m| m.min_version.min(record.version));
        let Some(min) = min else {
            warn!("no bundle metadata from the pre-install check: the version floor stays");
            return;
        };
        match self.floor.raise(min) {
            Ok(now) => info!(floor = now, "version floor raised"),
            Err(e) => warn!(error = %e, "the version floor could not be raised"),
        }
    }

    /// The health check's verdict on a trial boot (see [`crate::health`]).
    pub fn record_health(&self, healthy: bool) -> Result<HealthVerdict, UpdateError> {
        let Some(mut record) = self.store.load()? else {
            return Ok(HealthVerdict::NotATrial);
        };
        let booted = self.installer.status().ok().and_then(|s| s.booted);
        if record.is_final() || booted.is_none() || booted != record.target_slot {
            return Ok(HealthVerdict::NotATrial);
        }
        if !healthy {
            record.phase = Phase::Trial;
            record.health_failed = true;
            record.at = crate::record::now_unix();
            self.store.save(&record)?;
            return Ok(HealthVerdict::Failed);
        }
        self.installer.mark_good().map_err(UpdateError::Installer)?;
        self.raise_floor(&record);
        record.finish(Outcome::Successful);
        self.store.save(&record)?;
        gateway_durable::remove_durably(&self.store.paths().trial())?;
        Ok(HealthVerdict::MarkedGood)
    }

    /// The health check started on a trial boot: the record moves to `trial`.
    pub fn trial_started(&self) -> Result<bool, UpdateError> {
        let Some(mut record) = self.store.load()? else {
            return Ok(false);
        };
        let booted = self.installer.status().ok().and_then(|s| s.booted);
        if record.is_final() || booted.is_none() || booted != record.target_slot {
            return Ok(false);
        }
        record.phase = Phase::Trial;
        record.at = crate::record::now_unix();
        self.store.save(&record)?;
        Ok(true)
    }
}

/// What the health check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthVerdict {
    /// Not a trial boot of an update (normal boot, or back on the old slot): nothing done.
    NotATrial,
    MarkedGood,
    /// Recorded as failed; the caller exits non-zero so the unit reboots into the old slot.
    Failed,
}
