use super::*;

const NOW: u64 = 1_800_000_000;
const PW: &str = "correct horse battery";

fn staff(dir: &Path) -> Staff {
    Staff::open(dir, StaffKey::derive(&[9; 32])).unwrap()
}

fn enrolled(dir: &Path, name: &str) -> (Staff, String) {
    let s = staff(dir);
    s.add(name, Role::Clerk, PW).unwrap();
    let e = s.enroll_totp(name, "Clinic GW").unwrap();
    assert!(
        e.otpauth_uri.starts_with("otpauth://totp/"),
        "{}",
        e.otpauth_uri.as_str()
    );
    assert!(e.otpauth_uri.contains("issuer=Clinic"));
    (s, e.secret_base32.to_string())
}

#[test]
fn rfc6238_sha1_vector() {
    // RFC 6238 appendix B, SHA-1 seed "12345678901234567890", T = 59 s: 94287082 (8 digits);
    // the 6-digit code is its last six digits.
    let secret = totp_rs::Secret::Raw(b"12345678901234567890".to_vec()).to_encoded();
    let totp_rs::Secret::Encoded(b32) = secret else {
        panic!()
    };
    assert_eq!(code_at(&b32, 59).unwrap(), "287082");
    assert_eq!(code_at(&b32, 1_111_111_109).unwrap(), "081804");
}

#[test]
fn both_factors_log_in_and_a_code_works_once() {
    let dir = tempfile::tempdir().unwrap();
    let (s, secret) = enrolled(dir.path(), "clerk.sato");
    let code = code_at(&secret, NOW).unwrap();
    let ok = s.login("clerk.sato", PW, &code, NOW).unwrap();
    assert_eq!(
        ok,
        LoggedIn {
            name: "clerk.sato".into(),
            role: Role::Clerk
        }
    );
    assert_eq!(
        s.login("clerk.sato", PW, &code, NOW + 5),
        Err(LoginError::BadSecondFactor),
        "replay"
    );
    // The next step's code, and one step of skew.
    let next = code_at(&secret, NOW + 30).unwrap();
    assert!(s.login("clerk.sato", PW, &next, NOW + 40).is_ok());
    let later = code_at(&secret, NOW + 90).unwrap();
    assert!(
        s.login("clerk.sato", PW, &later, NOW + 60).is_ok(),
        "one step early is accepted"
    );
    let far = code_at(&secret, NOW + 300).unwrap();
    assert_eq!(
        s.login("clerk.sato", PW, &far, NOW + 150),
        Err(LoginError::BadSecondFactor)
    );
    // The state (last step) survives a reopen.
    drop(s);
    let s = staff(dir.path());
    assert_eq!(
        s.login("clerk.sato", PW, &later, NOW + 61),
        Err(LoginError::BadSecondFactor)
    );
}

#[test]
fn wrong_password_unknown_name_and_missing_factor_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (s, secret) = enrolled(dir.path(), "dr.ito");
    let code = code_at(&secret, NOW).unwrap();
    assert_eq!(
        s.login("dr.ito", "wrong password!!", &code, NOW),
        Err(LoginError::WrongPassword)
    );
    assert_eq!(
        s.login("nobody", PW, &code, NOW),
        Err(LoginError::UnknownAccount)
    );
    assert_eq!(
        s.login("dr.ito", PW, "12345", NOW),
        Err(LoginError::BadSecondFactor)
    );
    assert_eq!(
        s.login("dr.ito", PW, "abcdef", NOW),
        Err(LoginError::BadSecondFactor)
    );
    s.add("new.clerk", Role::Clerk, PW).unwrap();
    assert_eq!(
        s.login("new.clerk", PW, &code, NOW),
        Err(LoginError::NoSecondFactor)
    );
    s.disable("dr.ito").unwrap();
    assert_eq!(s.login("dr.ito", PW, &code, NOW), Err(LoginError::Disabled));
}

#[test]
fn max_failures_lock_the_account_across_a_restart_and_the_lock_time_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (s, secret) = enrolled(dir.path(), "clerk.kato");
    for i in 0..MAX_FAILURES {
        assert_eq!(
            s.login(
                "clerk.kato",
                "not the password",
                "000000",
                NOW + u64::from(i)
            ),
            Err(LoginError::WrongPassword)
        );
    }
    let code = code_at(&secret, NOW + 10).unwrap();
    let locked = Err(LoginError::Locked {
        until_unix: NOW + u64::from(MAX_FAILURES - 1) + LOCKOUT_SECS,
    });
    assert_eq!(s.login("clerk.kato", PW, &code, NOW + 10), locked);
    drop(s);
    let s = staff(dir.path());
    assert_eq!(s.login("clerk.kato", PW, &code, NOW + 10), locked);
    let info = &s.accounts(NOW + 10).unwrap()[0];
    assert!(info.locked);
    assert_eq!(
        info.locked_until_unix,
        Some(NOW + u64::from(MAX_FAILURES - 1) + LOCKOUT_SECS)
    );
    // Even the right password costs its Argon2 work while locked and is refused alike.
    assert_eq!(
        s.login("clerk.kato", "not the password", &code, NOW + 10),
        locked
    );
    let t = NOW + u64::from(MAX_FAILURES) + LOCKOUT_SECS;
    let code = code_at(&secret, t).unwrap();
    assert!(
        s.login("clerk.kato", PW, &code, t).is_ok(),
        "the lockout ends"
    );
}

#[test]
fn account_rules_and_no_secret_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = staff(dir.path());
    assert!(matches!(
        s.add("Bad Name", Role::Clerk, PW),
        Err(StaffError::BadName)
    ));
    assert!(matches!(
        s.add("clerk", Role::Clerk, "short"),
        Err(StaffError::WeakPassword(_))
    ));
    assert!(matches!(
        s.add("clerk", Role::Clerk, "my clerk password"),
        Err(StaffError::WeakPassword(_))
    ));
    s.add("clerk", Role::Admin, PW).unwrap();
    assert!(matches!(
        s.add("clerk", Role::Clerk, PW),
        Err(StaffError::Exists)
    ));
    assert!(matches!(
        s.enroll_totp("ghost", "x"),
        Err(StaffError::NoSuchAccount)
    ));
    let e = s.enroll_totp("clerk", "Clinic GW").unwrap();
    let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
    assert!(text.contains("$argon2id$v=19$m=19456,t=2,p=1$"), "{text}");
    assert!(!text.contains(PW));
    assert!(!text.contains(e.secret_base32.as_str()));
    let raw = totp_rs::Secret::Encoded(e.secret_base32.to_string())
        .to_bytes()
        .unwrap();
    assert!(!text.contains(&hex::encode(&raw)));
    // Another box's key cannot open the secret: the second factor fails, never panics.
    let other = Staff::open(dir.path(), StaffKey::derive(&[1; 32])).unwrap();
    let code = code_at(&e.secret_base32, NOW).unwrap();
    assert_eq!(
        other.login("clerk", PW, &code, NOW),
        Err(LoginError::BadSecondFactor)
    );
    assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
    assert!("root".parse::<Role>().is_err());
}

#[test]
fn an_account_added_by_another_handle_is_seen_and_kept() {
    // `gatewayd users add` runs beside the daemon: both hold a Staff on the same folder.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Staff::open(dir.path(), StaffKey::derive(&[3; 32])).unwrap();
    let cli = Staff::open(dir.path(), StaffKey::derive(&[3; 32])).unwrap();
    daemon
        .add("clerk.a", Role::Clerk, "correct horse battery")
        .unwrap();
    cli.add("clerk.b", Role::Clerk, "correct horse battery")
        .unwrap();
    let enrolled = cli.enroll_totp("clerk.b", "gatewayd").unwrap();
    let code = code_at(&enrolled.secret_base32, 1_800_000_000).unwrap();
    assert!(
        daemon
            .login("clerk.b", "correct horse battery", &code, 1_800_000_000)
            .is_ok()
    );
    // The daemon's save (the login) kept the account the other handle added, and v.v.
    let names: Vec<String> = cli
        .accounts(0)
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["clerk.a", "clerk.b"]);
    daemon.disable("clerk.a").unwrap();
    assert!(cli.accounts(0).unwrap()[0].disabled);
}

/// Argon2 verifications and durable saves that `f` did on this thread.
fn cost_of<T>(f: impl FnOnce() -> T) -> (T, (u32, u32)) {
    let before = (ARGON2_VERIFICATIONS.get(), SAVES.get());
    let out = f();
    let after = (ARGON2_VERIFICATIONS.get(), SAVES.get());
    (out, (after.0 - before.0, after.1 - before.1))
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// The structural timing pin: every outcome of a login, refused or not, costs exactly one
/// Argon2 verification and one durable replacement of the accounts file (a new inode under
/// its name), so no refusal can be told from another, or from a success, by its cost.
#[test]
fn every_login_outcome_costs_one_argon2_verification_and_one_durable_write() {
    let dir = tempfile::tempdir().unwrap();
    let (s, secret) = enrolled(dir.path(), "clerk.ok");
    s.add("clerk.nofactor", Role::Clerk, PW).unwrap();
    s.add("clerk.locked", Role::Clerk, PW).unwrap();
    s.enroll_totp("clerk.locked", "Clinic GW").unwrap();
    s.add("clerk.off", Role::Clerk, PW).unwrap();
    s.enroll_totp("clerk.off", "Clinic GW").unwrap();
    s.disable("clerk.off").unwrap();
    for i in 0..MAX_FAILURES {
        let _ = s.login(
            "clerk.locked",
            "not the password",
            "000000",
            NOW + u64::from(i),
        );
    }
    let t = NOW + 100;
    let good = code_at(&secret, t).unwrap();
    let wrong = if good == "000000" { "111111" } else { "000000" };
    let path = dir.path().join(FILE);
    type Case<'a> = (&'a str, &'a str, &'a str, &'a str, Option<LoginError>);
    let cases: [Case; 7] = [
        (
            "unknown",
            "nobody.here",
            PW,
            &good,
            Some(LoginError::UnknownAccount),
        ),
        (
            "wrong password",
            "clerk.ok",
            "not the password",
            &good,
            Some(LoginError::WrongPassword),
        ),
        (
            "wrong code",
            "clerk.ok",
            PW,
            wrong,
            Some(LoginError::BadSecondFactor),
        ),
        (
            "no code",
            "clerk.ok",
            PW,
            "",
            Some(LoginError::BadSecondFactor),
        ),
        (
            "no second factor",
            "clerk.nofactor",
            PW,
            &good,
            Some(LoginError::NoSecondFactor),
        ),
        (
            "disabled",
            "clerk.off",
            PW,
            &good,
            Some(LoginError::Disabled),
        ),
        ("success", "clerk.ok", PW, &good, None),
    ];
    for (what, name, password, code, refused) in cases {
        let before = inode(&path);
        let (result, cost) = cost_of(|| s.login(name, password, code, t));
        assert_eq!(result.err(), refused, "{what}");
        assert_eq!(cost, (1, 1), "{what}: (Argon2 verifications, saves)");
        assert_ne!(inode(&path), before, "{what}: the file was not replaced");
    }
    let before = inode(&path);
    let (result, cost) = cost_of(|| s.login("clerk.locked", PW, "000000", t));
    assert!(
        matches!(result, Err(LoginError::Locked { .. })),
        "{result:?}"
    );
    assert_eq!(cost, (1, 1), "locked: (Argon2 verifications, saves)");
    assert_ne!(inode(&path), before, "locked: the file was not replaced");
}
