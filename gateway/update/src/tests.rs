//! The state machine through every power-cut point of the design (section 4 "Power cuts")
//! and every refusal before a slot write, with the installer twin and a floor twin.

use std::sync::{Arc, Mutex};

use crate::installer::{BundleInfo, FakeInstaller};
use crate::machine::{
    FloorError, HealthVerdict, StartAction, Updater, UpdaterSettings, VersionFloor,
};
use crate::record::{Outcome, Phase, RollbackReason, UpdateRecord};
use crate::{COMPATIBLE, Failure};

#[derive(Debug, Default)]
struct Floor(Mutex<u64>);

impl VersionFloor for Floor {
    fn floor(&self) -> Result<u64, FloorError> {
        Ok(*self.0.lock().unwrap())
    }
    fn raise(&self, to: u64) -> Result<u64, FloorError> {
        let mut f = self.0.lock().unwrap();
        *f = (*f).max(to);
        Ok(*f)
    }
}

struct Box_ {
    dir: tempfile::TempDir,
    fake: FakeInstaller,
    floor: Arc<Floor>,
    updater: Updater,
}

const BUNDLE: &[u8] = b"a signed bundle, as far as the twin knows";

fn sha(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn new_box(floor: u64) -> Box_ {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeInstaller::new("7");
    fake.with(|s| {
        s.info = Some(BundleInfo {
            compatible: COMPATIBLE.into(),
            version: "8".into(),
        })
    });
    let floor = Arc::new(Floor(Mutex::new(floor)));
    let updater = Updater::new(
        UpdaterSettings {
            data_dir: dir.path().to_path_buf(),
            compatible: COMPATIBLE.into(),
            reboot_request_file: dir.path().join("run/reboot"),
            reserve_bytes: 0,
        },
        Arc::new(fake.clone()),
        floor.clone(),
    );
    Box_ {
        dir,
        fake,
        floor,
        updater,
    }
}

impl Box_ {
    /// Accepts the command and "downloads" `bytes` as the bundle.
    fn downloaded(&self, bytes: &[u8]) -> UpdateRecord {
        let mut r = self
            .updater
            .begin(
                "u-1",
                "https://h/b",
                &sha(BUNDLE),
                8,
                BUNDLE.len() as u64,
                1 << 20,
            )
            .unwrap();
        assert_eq!(r.phase, Phase::Downloading);
        std::fs::write(self.updater.store().paths().bundle(), bytes).unwrap();
        self.updater.downloaded(&mut r).unwrap();
        r
    }

    fn pre_install_meta(&self, min_version: u64) {
        std::fs::write(
            self.updater.store().paths().bundle_meta(),
            format!(r#"{{"version":8,"min_version":{min_version},"data_format":1}}"#),
        )
        .unwrap();
    }

    fn decide(&self, boot_id: &str) -> StartAction {
        self.updater.decide_at_start(Some(boot_id)).unwrap()
    }

    fn record(&self) -> UpdateRecord {
        self.updater.store().load().unwrap().unwrap()
    }

    fn slot1_written(&self) -> bool {
        self.fake.with(|s| s.slots.contains_key("system1"))
    }
}

fn outcome(action: StartAction) -> Outcome {
    match action {
        StartAction::Publish(r) => {
            assert_eq!(r.phase, Phase::Final);
            r.outcome.unwrap()
        }
        other => panic!("expected a final outcome, got {other:?}"),
    }
}

// --- the whole way -------------------------------------------------------------------------

#[test]
fn update_goes_downloading_installing_rebooting_trial_successful_and_raises_the_floor() {
    let b = new_box(7);
    let mut r = b.downloaded(BUNDLE);
    b.pre_install_meta(8);
    b.updater.verify_and_install(&mut r).unwrap();
    b.updater.request_reboot(&mut r).unwrap();
    let r = b.record();
    assert_eq!(r.phase, Phase::Rebooting);
    assert_eq!(r.from_slot.as_deref(), Some("system0"));
    assert_eq!(r.target_slot.as_deref(), Some("system1"));
    assert!(b.updater.store().paths().trial().exists());
    assert!(b.dir.path().join("run/reboot").exists());
    assert_eq!(b.fake.with(|s| s.installs), 1);
    // the reboot: BootNext = system1, once
    b.fake.reboot();
    assert!(matches!(b.decide("boot-2"), StartAction::AwaitHealth(_)));
    assert!(b.updater.trial_started().unwrap());
    assert_eq!(
        b.updater.record_health(true).unwrap(),
        HealthVerdict::MarkedGood
    );
    assert_eq!(*b.floor.0.lock().unwrap(), 8);
    assert_eq!(
        b.fake.with(|s| s.boot_order.clone()),
        vec!["system1", "system0"]
    );
    assert!(!b.updater.store().paths().trial().exists());
    assert_eq!(outcome(b.decide("boot-2")), Outcome::Successful);
    b.updater.store().archive().unwrap();
    assert_eq!(
        b.updater.decide_at_start(Some("boot-3")).unwrap(),
        StartAction::Nothing
    );
    // a later reboot stays on the new slot
    b.fake.reboot();
    assert_eq!(b.fake.booted_version().as_deref(), Some("8"));
}

// --- refusals before any slot write --------------------------------------------------------

fn refused(b: &Box_, bytes: &[u8]) -> Failure {
    let mut r = b.downloaded(bytes);
    let failure = b.updater.verify_and_install(&mut r).unwrap_err();
    assert!(!b.slot1_written(), "{failure:?} wrote the slot");
    assert_eq!(b.fake.with(|s| s.installs), 0);
    assert!(!b.updater.store().paths().trial().exists());
    b.updater.fail(&mut r, &failure).unwrap();
    assert_eq!(
        b.record().outcome,
        Some(Outcome::Failed {
            code: failure.code.clone(),
            reason: failure.reason.clone()
        })
    );
    failure
}

#[test]
fn every_refusal_happens_before_any_slot_write_with_its_code() {
    assert_eq!(refused(&new_box(7), b"other bytes").code, "hash-mismatch");
    let b = new_box(7);
    b.fake.with(|s| s.info = None);
    assert_eq!(refused(&b, BUNDLE).code, "bundle-signature");
    let b = new_box(7);
    b.fake
        .with(|s| s.info.as_mut().unwrap().compatible = "toaster".into());
    assert_eq!(refused(&b, BUNDLE).code, "incompatible");
    let b = new_box(7);
    b.fake
        .with(|s| s.info.as_mut().unwrap().version = "9".into());
    assert_eq!(refused(&b, BUNDLE).code, "version-mismatch");
    let b = new_box(9);
    let f = refused(&b, BUNDLE);
    assert_eq!(f.code, "downgrade");
    assert_eq!(f.reason, "version 8 is below this box's floor 9");
    let b = new_box(7);
    std::fs::write(b.dir.path().join("FORMAT"), "2\n").unwrap();
    assert_eq!(refused(&b, BUNDLE).code, "data-format");
    // the pre-install check inside rauc install refuses: the code comes through
    let b = new_box(7);
    b.fake
        .with(|s| s.refuse_install = Some("data-format".into()));
    let mut r = b.downloaded(BUNDLE);
    assert_eq!(
        b.updater.verify_and_install(&mut r).unwrap_err().code,
        "data-format"
    );
    assert!(!b.updater.store().paths().trial().exists());
}

#[test]
fn begin_refuses_busy_too_large_and_no_space_without_touching_the_running_update() {
    let b = new_box(7);
    let r = b.downloaded(BUNDLE);
    let f = b
        .updater
        .begin("u-2", "https://h/c", &[1; 32], 9, 10, 1 << 20)
        .unwrap_err();
    assert_eq!(f.code, "busy");
    assert_eq!(b.record(), r);
    let fresh = new_box(7);
    assert_eq!(
        fresh
            .updater
            .begin("u-2", "https://h/c", &[1; 32], 9, 2 << 20, 1 << 20)
            .unwrap_err()
            .code,
        "bad-args"
    );
    assert_eq!(
        fresh
            .updater
            .begin("u-2", "https://h/c", &[1; 32], 9, u64::MAX / 2, u64::MAX)
            .unwrap_err()
            .code,
        "no-space"
    );
    assert_eq!(fresh.updater.store().load().unwrap(), None);
}

// --- power cuts ----------------------------------------------------------------------------

#[test]
fn cut_during_download_resumes_the_download() {
    let b = new_box(7);
    b.updater
        .begin("u-1", "https://h/b", &sha(BUNDLE), 8, 10, 1 << 20)
        .unwrap();
    std::fs::write(b.updater.store().paths().part(), b"half").unwrap();
    match b.decide("boot-2") {
        StartAction::ResumeDownload(r) => assert_eq!(r.cmd_id, "u-1"),
        other => panic!("{other:?}"),
    }
    assert!(
        b.updater.store().paths().part().exists(),
        "the partial file is kept for the resume"
    );
}

#[test]
fn cut_during_install_reinstalls_at_most_three_times_then_install_interrupted() {
    let b = new_box(7);
    let mut r = b.downloaded(BUNDLE);
    // the cut: rauc never finished; the record says installing, attempt 1
    r.install_attempts = 1;
    r.target_slot = Some("system1".into());
    r.from_slot = Some("system0".into());
    b.updater.store().save(&r).unwrap();
    b.fake.reboot();
    assert_eq!(b.fake.with(|s| s.booted.clone()), "system0");
    let StartAction::Reinstall(mut again) = b.decide("boot-2") else {
        panic!("expected a reinstall")
    };
    // the reinstall re-verifies the hash first
    std::fs::write(b.updater.store().paths().bundle(), b"changed on disk").unwrap();
    assert_eq!(
        b.updater.verify_and_install(&mut again).unwrap_err().code,
        "hash-mismatch"
    );
    let mut r = b.record();
    r.install_attempts = 3;
    b.updater.store().save(&r).unwrap();
    match outcome(b.decide("boot-3")) {
        Outcome::Failed { code, .. } => assert_eq!(code, "install-interrupted"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cut_after_the_install_wrote_boot_next_but_before_the_record_said_rebooting_is_a_trial_boot() {
    let b = new_box(7);
    let mut r = b.downloaded(BUNDLE);
    b.pre_install_meta(8);
    b.updater.verify_and_install(&mut r).unwrap();
    b.updater.request_reboot(&mut r).unwrap();
    // roll the record back to what it said while rauc ran
    let mut r = b.record();
    r.phase = Phase::Installing;
    b.updater.store().save(&r).unwrap();
    assert!(
        b.updater.store().paths().trial().exists(),
        "the marker predates the install"
    );
    b.fake.reboot();
    assert!(matches!(b.decide("boot-2"), StartAction::AwaitHealth(_)));
}

#[test]
fn daemon_restart_before_the_reboot_asks_for_the_reboot_again() {
    let b = new_box(7);
    let mut r = b.downloaded(BUNDLE);
    b.updater.verify_and_install(&mut r).unwrap();
    b.updater.request_reboot(&mut r).unwrap();
    let boot_id = b.record().reboot_boot_id.unwrap();
    std::fs::remove_file(b.dir.path().join("run/reboot")).unwrap();
    let StartAction::RequestReboot(mut r) = b.decide(&boot_id) else {
        panic!("expected the reboot request again")
    };
    b.updater.request_reboot(&mut r).unwrap();
    assert!(b.dir.path().join("run/reboot").exists());
}

#[test]
fn a_new_slot_that_never_reaches_its_health_check_rolls_back_boot_failed() {
    let b = new_box(7);
    let mut r = b.downloaded(BUNDLE);
    b.updater.verify_and_install(&mut r).unwrap();
    b.updater.request_reboot(&mut r).unwrap();
    b.fake.reboot(); // into system1, which panics before gatewayd starts
    b.fake.reboot(); // BootNext consumed: BootOrder = system0
    assert_eq!(b.fake.with(|s| s.booted.clone()), "system0");
    assert_eq!(
        outcome(b.decide("boot-3")),
        Outcome::RolledBack {
            reason: RollbackReason::BootFailed
        }
    );
    assert!(!b.updater.store().paths().trial().exists());
    assert_eq!(*b.floor.0.lock().unwrap(), 7);
}

#[test]
fn cut_during_the_health_window_rolls_back_interrupted() {
    let b = new_box(7);
    let mut r = b.downloaded(BUNDLE);
    b.updater.verify_and_install(&mut r).unwrap();
    b.updater.request_reboot(&mut r).unwrap();
    b.fake.reboot();
    assert!(b.updater.trial_started().unwrap());
    b.fake.reboot(); // power cut mid-check
    assert_eq!(
        outcome(b.decide("boot-3")),
        Outcome::RolledBack {
            reason: RollbackReason::Interrupted
        }
    );
}

#[test]
fn failed_health_check_rolls_back_health_failed_and_never_marks_good() {
    let b = new_box(7);
    let mut r = b.downloaded(BUNDLE);
    b.pre_install_meta(8);
    b.updater.verify_and_install(&mut r).unwrap();
    b.updater.request_reboot(&mut r).unwrap();
    b.fake.reboot();
    b.updater.trial_started().unwrap();
    assert_eq!(
        b.updater.record_health(false).unwrap(),
        HealthVerdict::Failed
    );
    assert_eq!(b.fake.with(|s| s.mark_goods), 0);
    b.fake.reboot(); // the unit's FailureAction=reboot
    assert_eq!(b.fake.booted_version().as_deref(), Some("7"));
    assert_eq!(
        outcome(b.decide("boot-3")),
        Outcome::RolledBack {
            reason: RollbackReason::HealthFailed
        }
    );
    assert_eq!(
        *b.floor.0.lock().unwrap(),
        7,
        "no floor raise after a rollback"
    );
}

#[test]
fn cut_after_mark_good_before_the_record_finishes_successful_at_the_next_start() {
    let b = new_box(7);
    let mut r = b.downloaded(BUNDLE);
    b.pre_install_meta(8);
    b.updater.verify_and_install(&mut r).unwrap();
    b.updater.request_reboot(&mut r).unwrap();
    b.fake.reboot();
    b.updater.trial_started().unwrap();
    use crate::installer::Installer;
    b.fake.mark_good().unwrap(); // then the power goes
    b.fake.reboot();
    assert_eq!(b.fake.with(|s| s.booted.clone()), "system1");
    assert_eq!(outcome(b.decide("boot-3")), Outcome::Successful);
    assert_eq!(*b.floor.0.lock().unwrap(), 8);
}

#[test]
fn health_check_on_a_normal_boot_or_the_old_slot_does_nothing() {
    let b = new_box(7);
    assert_eq!(
        b.updater.record_health(true).unwrap(),
        HealthVerdict::NotATrial
    );
    let mut r = b.downloaded(BUNDLE);
    b.updater.verify_and_install(&mut r).unwrap();
    b.updater.request_reboot(&mut r).unwrap();
    // still on system0 (before the reboot): not a trial
    assert_eq!(
        b.updater.record_health(true).unwrap(),
        HealthVerdict::NotATrial
    );
    assert_eq!(b.fake.with(|s| s.mark_goods), 0);
}

#[test]
fn a_final_record_is_published_again_after_a_cut_before_it_was_archived() {
    let b = new_box(7);
    let mut r = b.downloaded(b"other bytes");
    let f = b.updater.verify_and_install(&mut r).unwrap_err();
    b.updater.fail(&mut r, &f).unwrap();
    for boot in ["boot-2", "boot-3"] {
        match outcome(b.decide(boot)) {
            Outcome::Failed { code, .. } => assert_eq!(code, "hash-mismatch"),
            other => panic!("{other:?}"),
        }
    }
    // a new command after the final one was published starts afresh
    b.updater.store().archive().unwrap();
    assert!(
        b.updater
            .begin(
                "u-2",
                "https://h/b",
                &sha(BUNDLE),
                8,
                BUNDLE.len() as u64,
                1 << 20
            )
            .is_ok()
    );
}
