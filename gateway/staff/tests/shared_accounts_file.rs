//! The daemon and `gatewayd users ...` write one accounts file: accounts added or changed by
//! either side are never lost, and a lock that cannot be taken or a file that cannot be
//! parsed is an error that leaves the file as it was (never a silent pass).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway_durable::{LockError, LockedFile};
use gateway_staff::{LoginError, Role, Staff, StaffError, StaffKey, code_at};

const PW: &str = "correct horse battery";
const NOW: u64 = 1_800_000_000;
/// Set for the second process of [`two_processes_adding_and_changing_accounts_lose_nothing`].
const CHILD_DIR: &str = "GATEWAY_STAFF_TEST_CHILD_DIR";
// Two writers' failed logins together reach `MAX_FAILURES` (20) exactly.
const ROUNDS: usize = 10;

fn open(dir: &Path) -> Staff {
    Staff::open(dir, StaffKey::derive(&[7; 32])).unwrap()
}

fn names(staff: &Staff) -> Vec<String> {
    let mut names: Vec<String> = staff
        .accounts(0)
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    names.sort();
    names
}

/// One writer's work: adds `<prefix>.<i>`, disables every odd one, and fails a login of
/// `busy` each round (every failure is a save of the whole file).
fn writer(staff: &Staff, prefix: &str) {
    for i in 0..ROUNDS {
        let name = format!("{prefix}.{i}");
        staff.add(&name, Role::Clerk, PW).unwrap();
        if i % 2 == 1 {
            staff.disable(&name).unwrap();
        }
        match staff.login("busy", "not the password", "000000", NOW) {
            Err(LoginError::WrongPassword | LoginError::Locked { .. }) => {}
            other => panic!("{prefix}: failed login of busy: {other:?}"),
        }
    }
}

fn expect_every_account(staff: &Staff, prefixes: &[&str]) {
    let mut want = vec!["busy".to_string()];
    for p in prefixes {
        want.extend((0..ROUNDS).map(|i| format!("{p}.{i}")));
    }
    want.sort();
    assert_eq!(names(staff), want);
    for a in staff.accounts(NOW).unwrap() {
        let odd = a
            .name
            .rsplit_once('.')
            .and_then(|(_, i)| i.parse::<usize>().ok())
            .is_some_and(|i| i % 2 == 1);
        assert_eq!(a.disabled, odd && a.name != "busy", "{}", a.name);
    }
    // 2 x ROUNDS failures in a row, none lost: the account is locked.
    assert!(
        staff
            .accounts(NOW)
            .unwrap()
            .iter()
            .any(|a| a.name == "busy" && a.locked)
    );
}

#[test]
fn two_threads_adding_and_changing_accounts_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).add("busy", Role::Clerk, PW).unwrap();
    std::thread::scope(|s| {
        for prefix in ["daemon", "cli"] {
            let dir = dir.path();
            // Each thread has its own handle, as the daemon and the CLI do.
            s.spawn(move || writer(&open(dir), prefix));
        }
    });
    expect_every_account(&open(dir.path()), &["daemon", "cli"]);
}

#[test]
fn two_processes_adding_and_changing_accounts_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).add("busy", Role::Clerk, PW).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "second_process_writer",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writer(&open(dir.path()), "daemon");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "second process failed: {out:?}");
    expect_every_account(&open(dir.path()), &["daemon", "cli"]);
}

/// The second process of [`two_processes_adding_and_changing_accounts_lose_nothing`].
#[test]
#[ignore = "run as a second process by two_processes_adding_and_changing_accounts_lose_nothing"]
fn second_process_writer() {
    let dir = std::env::var_os(CHILD_DIR).expect("started by the two-process test");
    writer(&open(Path::new(&dir)), "cli");
}

#[test]
fn a_lock_held_elsewhere_past_the_wait_is_an_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wait = Duration::from_millis(300);
    let staff = open(dir.path()).with_lock_wait(wait);
    staff.add("clerk.a", Role::Clerk, PW).unwrap();
    let secret = staff
        .enroll_totp("clerk.a", "gatewayd")
        .unwrap()
        .secret_base32;
    let file = dir.path().join("accounts.json");
    let before = std::fs::read(&file).unwrap();

    let held = LockedFile::lock(
        &file,
        &dir.path().join("accounts.lock"),
        Duration::from_secs(1),
    )
    .unwrap();
    let started = Instant::now();
    let err = staff.add("clerk.b", Role::Clerk, PW).unwrap_err();
    assert!(started.elapsed() >= wait, "gave up before the wait");
    assert!(
        matches!(err, StaffError::Lock(LockError::Busy { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("accounts.lock"), "{err}");
    assert!(matches!(
        staff.disable("clerk.a"),
        Err(StaffError::Lock(LockError::Busy { .. }))
    ));
    assert!(matches!(
        staff.enroll_totp("clerk.a", "gatewayd"),
        Err(StaffError::Lock(LockError::Busy { .. }))
    ));
    // A login that cannot record its outcome is refused, right password and code or not.
    let code = code_at(&secret, NOW).unwrap();
    assert!(matches!(
        staff.login("clerk.a", PW, &code, NOW),
        Err(LoginError::Storage(_))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), before, "file changed");

    drop(held);
    staff.add("clerk.b", Role::Clerk, PW).unwrap();
    assert!(staff.login("clerk.a", PW, &code, NOW).is_ok());
    assert_eq!(names(&staff), ["clerk.a", "clerk.b"]);
}

#[test]
fn a_corrupt_accounts_file_is_an_error_and_left_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let staff = open(dir.path());
    staff.add("clerk.a", Role::Clerk, PW).unwrap();
    let file = dir.path().join("accounts.json");
    let garbage = b"{\"accounts\": [ {\"name\": \"clerk.a\", \"role\": \"clerk\" truncated";
    std::fs::write(&file, garbage).unwrap();

    for err in [
        staff.add("clerk.b", Role::Clerk, PW).unwrap_err(),
        staff.disable("clerk.a").unwrap_err(),
        staff.enroll_totp("clerk.a", "gatewayd").unwrap_err(),
        staff.accounts(0).unwrap_err(),
        Staff::open(dir.path(), StaffKey::derive(&[7; 32])).unwrap_err(),
    ] {
        assert!(matches!(err, StaffError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("accounts.json"), "{err}");
    }
    assert!(matches!(
        staff.login("clerk.a", PW, "000000", NOW),
        Err(LoginError::Storage(_))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), garbage, "file replaced");
}
