//! Invitations: the way to an account without a console.
//!
//! A box in a clinic has no shell, so its first administrator cannot be made with
//! `gatewayd users add`. Instead the vendor (fleet op `staff-invite`), an administrator at
//! the kiosk, or `gatewayd users invite` on a development machine calls
//! [`Staff::invite`]: it creates the account in the state *invited* (no usable password,
//! no second factor: it cannot log in) and returns a one-time enrolment code, once. The person
//! who receives the code completes the account at the kiosk's enrolment page:
//!
//! 1. [`Staff::enrol`]`(code, password)`: the code is checked and spent, the password is
//!    checked against [`check_password`] and hashed, and a new TOTP secret is returned to
//!    be shown (QR code and text). Nothing of this is usable yet.
//! 2. [`Staff::confirm_enrolment`]`(code, totp_code)` within [`CONFIRM_WINDOW_SECS`]: a
//!    valid code from the authenticator proves it holds the secret; only then do password
//!    and secret become the account's, and it can log in (with the next TOTP code: a code
//!    is accepted once).
//!
//! The code: [`CODE_CHARS`] characters of the RFC 4648 base32 alphabet from `getrandom`
//! (100 bits), shown in groups of five for reading aloud (`ABCDE-FGHIJ-KLMNO-PQRST`);
//! typed in any case, with or without separators, `0`/`1`/`8` read as `O`/`I`/`B`. The
//! accounts file holds only its SHA-256, compared in constant time against every pending
//! invitation. A code expires [`INVITE_TTL_SECS`] after the invitation; re-inviting an
//! invited account replaces its code (the old one is refused) and any half-done enrolment.
//! An unknown, spent, expired or replaced code, or one of a disabled account, gets the one
//! answer [`EnrolError::InvalidCode`]: nothing tells them apart. An account that has
//! completed its enrolment cannot be invited again (`StaffError::Exists`): to replace a
//! lost administrator, disable the account and invite a new name.
//!
//! Everything is saved through the crate's locked read-modify-write before it is returned,
//! like every other change.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{
    Account, Enrollment, File, LoggedIn, MIN_PASSWORD_CHARS, Role, Staff, StaffError,
    accepted_step, hash_password, valid_name,
};

/// How long an enrolment code is valid after the invitation: 72 hours (a weekend plus a
/// day, for a box delivered on a Friday).
pub const INVITE_TTL_SECS: u64 = 72 * 3600;
/// How long after [`Staff::enrol`] the first TOTP code may confirm the enrolment.
pub const CONFIRM_WINDOW_SECS: u64 = 30 * 60;
/// Characters of an enrolment code (base32: 5 bits each, 100 bits in all).
pub const CODE_CHARS: usize = 20;
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const GROUP: usize = 5;

/// A one-time enrolment code, grouped for reading aloud. Shown once; `Debug` hides it.
pub struct InviteCode(Zeroizing<String>);

impl InviteCode {
    /// The code as the person types it, e.g. `ABCDE-FGHIJ-KLMNO-PQRST`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InviteCode(..)")
    }
}

/// A new invitation: the account and its code.
#[derive(Debug)]
pub struct Invited {
    pub name: String,
    pub role: Role,
    pub code: InviteCode,
    /// When the code stops being accepted (Unix seconds).
    pub expires_unix: u64,
}

/// An enrolment started with a valid code: the second factor to show once.
#[derive(Debug)]
pub struct PendingEnrolment {
    /// The account the code was for (for the audit trail and the page).
    pub name: String,
    pub role: Role,
    pub enrollment: Enrollment,
}

/// Which password rule was broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PasswordRule {
    #[error("passwords need at least {MIN_PASSWORD_CHARS} characters")]
    TooShort,
    #[error("a password must not contain the account name")]
    ContainsName,
    #[error("a password must not be one character repeated")]
    OneCharacter,
}

impl PasswordRule {
    /// A stable code for APIs (`too-short`, `contains-name`, `one-character`).
    pub fn code(self) -> &'static str {
        match self {
            PasswordRule::TooShort => "too-short",
            PasswordRule::ContainsName => "contains-name",
            PasswordRule::OneCharacter => "one-character",
        }
    }
}

/// The password policy: at least [`MIN_PASSWORD_CHARS`] characters, not containing the
/// account name (in any case), not one character repeated.
pub fn check_password(name: &str, password: &str) -> Result<(), PasswordRule> {
    let mut chars = password.chars();
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(PasswordRule::TooShort);
    }
    if !name.is_empty() && password.to_lowercase().contains(&name.to_lowercase()) {
        return Err(PasswordRule::ContainsName);
    }
    if let Some(first) = chars.next()
        && chars.all(|c| c == first)
    {
        return Err(PasswordRule::OneCharacter);
    }
    Ok(())
}

/// Why an enrolment step was refused. The text is safe to show at the kiosk.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// Unknown, spent, expired or replaced code, or the account was disabled: one answer.
    #[error(
        "this enrolment code is not valid (it may have been used, replaced or expired); ask for a new one"
    )]
    InvalidCode,
    #[error("password refused: {0}")]
    WeakPassword(PasswordRule),
    /// The authenticator's code does not match the new secret (the enrolment stays open).
    #[error("the authenticator's code does not match; check the device's clock and try again")]
    BadTotp,
    /// The accounts file could not be read, locked or written; nothing was changed.
    #[error(transparent)]
    Storage(#[from] StaffError),
}

/// A pending invitation, as stored in the account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Invite {
    /// SHA-256 of the normalised code, hex. The code itself is never stored.
    code_sha256: String,
    expires_unix: u64,
    /// Set by [`Staff::enrol`]: the code is spent for `enrol` and now only confirms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enrolment: Option<Enrolling>,
}

/// What [`Staff::enrol`] prepared, waiting for the first TOTP code.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Enrolling {
    /// Argon2id PHC string of the chosen password.
    password: String,
    /// The new TOTP secret, sealed like `Account::totp_sealed`.
    totp_sealed: String,
    /// Until when a TOTP code may confirm (Unix seconds).
    confirm_until_unix: u64,
}

/// A fresh random code (normalised: 20 characters, no separators).
fn new_code() -> Result<Zeroizing<String>, StaffError> {
    let mut bytes = Zeroizing::new([0u8; CODE_CHARS]);
    getrandom::getrandom(bytes.as_mut()).map_err(|e| StaffError::Crypto(e.to_string()))?;
    // 256 is a multiple of 32: every character is uniform.
    Ok(Zeroizing::new(
        bytes
            .iter()
            .map(|b| char::from(ALPHABET[usize::from(b & 31)]))
            .collect(),
    ))
}

/// `ABCDEFGHIJ...` -> `ABCDE-FGHIJ-...`.
fn grouped(code: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(CODE_CHARS + CODE_CHARS / GROUP));
    for (i, c) in code.chars().enumerate() {
        if i > 0 && i % GROUP == 0 {
            out.push('-');
        }
        out.push(c);
    }
    out
}

/// The code as typed -> its canonical form, or `None` when it cannot be a code.
fn normalise(typed: &str) -> Option<Zeroizing<String>> {
    let mut out = Zeroizing::new(String::with_capacity(CODE_CHARS));
    for c in typed.chars() {
        let c = match c.to_ascii_uppercase() {
            '-' | ' ' | '\t' => continue,
            '0' => 'O',
            '1' => 'I',
            '8' => 'B',
            c => c,
        };
        if !c.is_ascii() || !ALPHABET.contains(&(c as u8)) || out.len() >= CODE_CHARS {
            return None;
        }
        out.push(c);
    }
    (out.len() == CODE_CHARS).then_some(out)
}

fn digest(normalised: &str) -> [u8; 32] {
    Sha256::digest(normalised.as_bytes()).into()
}

/// Constant-time equality of a digest and a stored hex digest.
fn same_digest(a: &[u8; 32], stored_hex: &str) -> bool {
    let mut stored = [0u8; 32];
    if hex::decode_to_slice(stored_hex, &mut stored).is_err() {
        return false;
    }
    a.iter()
        .zip(stored.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The index of the account whose pending invitation `typed` is, comparing with every
/// invitation (no early exit), unless that account is disabled.
fn find(file: &File, typed: &str) -> Option<usize> {
    let code = normalise(typed)?;
    let d = digest(&code);
    let mut found = None;
    for (i, account) in file.accounts.iter().enumerate() {
        if let Some(invite) = &account.invite
            && same_digest(&d, &invite.code_sha256)
        {
            found = Some(i);
        }
    }
    let i = found?;
    let account = file.accounts.get(i)?;
    (!account.disabled).then_some(i)
}

impl Staff {
    /// Creates (or, for an account still invited, re-creates) the account `name` in the
    /// state invited and returns its one-time enrolment code, valid until `now_unix` +
    /// [`INVITE_TTL_SECS`]. Re-inviting replaces the earlier code and any half-done
    /// enrolment, sets the role and lifts a disable. An account that completed enrolment is
    /// [`StaffError::Exists`].
    pub fn invite(&self, name: &str, role: Role, now_unix: u64) -> Result<Invited, StaffError> {
        if !valid_name(name) {
            return Err(StaffError::BadName);
        }
        let code = new_code()?;
        // Until enrolment completes the account's password is the hash of a random one
        // nobody knows: a login attempt costs the same Argon2 work as for any account, so
        // timing does not tell an invited name from another.
        let placeholder = hash_password(&new_code()?)?;
        let invite = Invite {
            code_sha256: hex::encode(digest(&code)),
            expires_unix: now_unix.saturating_add(INVITE_TTL_SECS),
            enrolment: None,
        };
        let expires_unix = invite.expires_unix;
        let (locked, mut file) = self.lock()?;
        match file.accounts.iter_mut().find(|a| a.name == name) {
            Some(account) if account.invite.is_none() => return Err(StaffError::Exists),
            Some(account) => {
                account.role = role;
                account.password = placeholder;
                account.disabled = false;
                account.failures = 0;
                account.locked_until_unix = None;
                account.invite = Some(invite);
            }
            None => file.accounts.push(Account {
                name: name.to_string(),
                role,
                password: placeholder,
                totp_sealed: None,
                disabled: false,
                failures: 0,
                locked_until_unix: None,
                last_totp_step: None,
                invite: Some(invite),
            }),
        }
        self.save(&locked, &file)?;
        Ok(Invited {
            name: name.to_string(),
            role,
            code: InviteCode(grouped(&code)),
            expires_unix,
        })
    }

    /// The first step of an enrolment: spends `code` (valid, not expired, not yet used),
    /// checks `password` against [`check_password`] (a refused password does not spend the
    /// code) and returns a new TOTP secret to show. The account is still invited: it can
    /// log in only after [`Staff::confirm_enrolment`].
    pub fn enrol(
        &self,
        code: &str,
        password: &str,
        issuer: &str,
        now_unix: u64,
    ) -> Result<PendingEnrolment, EnrolError> {
        // Under the lock from check to save: the same code cannot be spent twice.
        let (locked, mut file) = self.lock()?;
        let index = find(&file, code).ok_or(EnrolError::InvalidCode)?;
        let Some(account) = file.accounts.get(index) else {
            return Err(EnrolError::InvalidCode);
        };
        match &account.invite {
            Some(invite) if invite.enrolment.is_none() && now_unix < invite.expires_unix => {}
            _ => return Err(EnrolError::InvalidCode),
        }
        let (name, role) = (account.name.clone(), account.role);
        check_password(&name, password).map_err(EnrolError::WeakPassword)?;
        let password = hash_password(password)?;
        let (enrollment, totp_sealed) = self.new_totp(&name, issuer)?;
        if let Some(invite) = file.accounts.get_mut(index).and_then(|a| a.invite.as_mut()) {
            invite.enrolment = Some(Enrolling {
                password,
                totp_sealed,
                confirm_until_unix: now_unix.saturating_add(CONFIRM_WINDOW_SECS),
            });
        }
        self.save(&locked, &file)?;
        Ok(PendingEnrolment {
            name,
            role,
            enrollment,
        })
    }

    /// The second step: `totp_code` from the authenticator must be valid for the secret
    /// [`Staff::enrol`] made (within [`CONFIRM_WINDOW_SECS`] of it). Then the password and
    /// secret become the account's, the invitation (and its code) is gone, and the account
    /// can log in. A wrong TOTP code is [`EnrolError::BadTotp`] and leaves the enrolment
    /// open; a code that was never enrolled, or is past its window, is
    /// [`EnrolError::InvalidCode`].
    pub fn confirm_enrolment(
        &self,
        code: &str,
        totp_code: &str,
        now_unix: u64,
    ) -> Result<LoggedIn, EnrolError> {
        let (locked, mut file) = self.lock()?;
        let index = find(&file, code).ok_or(EnrolError::InvalidCode)?;
        let Some(account) = file.accounts.get_mut(index) else {
            return Err(EnrolError::InvalidCode);
        };
        let Some(enrolling) = account
            .invite
            .as_ref()
            .and_then(|i| i.enrolment.as_ref())
            .filter(|e| now_unix < e.confirm_until_unix)
            .cloned()
        else {
            return Err(EnrolError::InvalidCode);
        };
        let secret = self
            .open_sealed(&enrolling.totp_sealed, &account.name)
            .ok_or(EnrolError::InvalidCode)?;
        let step = accepted_step(&secret, &account.name, totp_code, now_unix)
            .ok_or(EnrolError::BadTotp)?;
        account.password = enrolling.password;
        account.totp_sealed = Some(enrolling.totp_sealed);
        account.last_totp_step = Some(step);
        account.failures = 0;
        account.locked_until_unix = None;
        account.invite = None;
        let done = LoggedIn {
            name: account.name.clone(),
            role: account.role,
        };
        self.save(&locked, &file)?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoginError, StaffKey, code_at};
    use std::path::Path;

    const NOW: u64 = 1_800_000_000;
    const PW: &str = "correct horse battery";

    fn staff(dir: &Path) -> Staff {
        Staff::open(dir, StaffKey::derive(&[9; 32])).unwrap()
    }

    fn file_text(dir: &Path) -> String {
        std::fs::read_to_string(dir.join(crate::FILE)).unwrap()
    }

    /// Invite, enrol and confirm `name`; returns the TOTP secret.
    fn enrolled(s: &Staff, name: &str) -> String {
        let invited = s.invite(name, Role::Admin, NOW).unwrap();
        let pending = s.enrol(invited.code.as_str(), PW, "gw", NOW + 10).unwrap();
        let secret = pending.enrollment.secret_base32.to_string();
        let code = code_at(&secret, NOW + 20).unwrap();
        s.confirm_enrolment(invited.code.as_str(), &code, NOW + 20)
            .unwrap();
        secret
    }

    #[test]
    fn the_code_is_grouped_base32_with_100_bits_and_normalises_as_typed() {
        let dir = tempfile::tempdir().unwrap();
        let s = staff(dir.path());
        let a = s.invite("admin.a", Role::Admin, NOW).unwrap();
        let b = s.invite("admin.b", Role::Admin, NOW).unwrap();
        let code = a.code.as_str();
        assert_eq!(code.len(), 23, "{code}");
        assert_eq!(code.matches('-').count(), 3);
        assert!(
            code.chars()
                .all(|c| c == '-' || ALPHABET.contains(&(c as u8)))
        );
        assert_ne!(a.code.as_str(), b.code.as_str());
        assert_eq!(format!("{:?}", a.code), "InviteCode(..)");
        assert_eq!(a.expires_unix, NOW + INVITE_TTL_SECS);
        // Lower case, spaces for dashes: the same code.
        let typed = code.to_lowercase().replace('-', " ");
        assert!(s.enrol(&typed, PW, "gw", NOW + 1).is_ok());
        assert!(
            normalise("ABCDE-FGHIJ-KLMNO-PQRS0").is_some(),
            "0 reads as O"
        );
        assert!(normalise("ABCDE-FGHIJ-KLMNO-PQRS").is_none(), "too short");
        assert!(normalise("ABCDE-FGHIJ-KLMNO-PQRST-U").is_none(), "too long");
        assert!(
            normalise("ABCDE-FGHIJ-KLMNO-PQRS9").is_none(),
            "9 is no base32"
        );
        assert!(normalise("ABCDE-FGHIJ-KLMNO-PQRSé").is_none());
    }

    #[test]
    fn an_invited_account_cannot_log_in_until_its_first_totp_code_confirms() {
        let dir = tempfile::tempdir().unwrap();
        let s = staff(dir.path());
        let invited = s.invite("admin.first", Role::Admin, NOW).unwrap();
        let info = &s.accounts(NOW).unwrap()[0];
        assert!(info.invited && !info.totp_enrolled && !info.disabled);
        assert!(s.login("admin.first", "", "000000", NOW).is_err());
        // Its password is a real Argon2id hash of a random secret: a login costs what any
        // other costs, so timing does not single out invited names.
        assert!(
            file_text(dir.path()).contains("$argon2id$"),
            "{}",
            file_text(dir.path())
        );
        let pending = s.enrol(invited.code.as_str(), PW, "gw", NOW + 5).unwrap();
        assert_eq!(pending.name, "admin.first");
        assert_eq!(pending.role, Role::Admin);
        assert!(
            pending
                .enrollment
                .otpauth_uri
                .starts_with("otpauth://totp/")
        );
        let secret = pending.enrollment.secret_base32.to_string();
        // Password and secret are not the account's yet.
        let code = code_at(&secret, NOW + 5).unwrap();
        assert!(s.login("admin.first", PW, &code, NOW + 5).is_err());
        assert!(s.accounts(NOW).unwrap()[0].invited);
        // A wrong authenticator code keeps the enrolment open.
        let wrong = if code == "000000" { "111111" } else { "000000" };
        assert!(matches!(
            s.confirm_enrolment(invited.code.as_str(), wrong, NOW + 6),
            Err(EnrolError::BadTotp)
        ));
        let done = s
            .confirm_enrolment(invited.code.as_str(), &code, NOW + 7)
            .unwrap();
        assert_eq!(done.name, "admin.first");
        let info = &s.accounts(NOW).unwrap()[0];
        assert!(!info.invited && info.totp_enrolled);
        // The confirming code is spent; the next one logs in.
        assert_eq!(
            s.login("admin.first", PW, &code, NOW + 8),
            Err(LoginError::BadSecondFactor)
        );
        let next = code_at(&secret, NOW + 35).unwrap();
        assert!(s.login("admin.first", PW, &next, NOW + 36).is_ok());
    }

    #[test]
    fn a_code_is_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = staff(dir.path());
        let invited = s.invite("admin.x", Role::Admin, NOW).unwrap();
        let code = invited.code.as_str();
        s.enrol(code, PW, "gw", NOW).unwrap();
        assert!(matches!(
            s.enrol(code, "another good password", "gw", NOW + 1),
            Err(EnrolError::InvalidCode)
        ));
        let dir2 = tempfile::tempdir().unwrap();
        let s2 = staff(dir2.path());
        let secret = {
            let invited = s2.invite("admin.y", Role::Admin, NOW).unwrap();
            let c = invited.code.as_str().to_string();
            let p = s2.enrol(&c, PW, "gw", NOW).unwrap();
            let secret = p.enrollment.secret_base32.to_string();
            s2.confirm_enrolment(&c, &code_at(&secret, NOW).unwrap(), NOW)
                .unwrap();
            // After completion the code is unknown to both steps.
            assert!(matches!(
                s2.enrol(&c, PW, "gw", NOW + 1),
                Err(EnrolError::InvalidCode)
            ));
            assert!(matches!(
                s2.confirm_enrolment(&c, &code_at(&secret, NOW + 30).unwrap(), NOW + 30),
                Err(EnrolError::InvalidCode)
            ));
            secret
        };
        assert!(!secret.is_empty());
        // Confirming before enrolling is refused the same way.
        let fresh = s2.invite("admin.z", Role::Admin, NOW).unwrap();
        assert!(matches!(
            s2.confirm_enrolment(fresh.code.as_str(), "123456", NOW),
            Err(EnrolError::InvalidCode)
        ));
    }

    #[test]
    fn a_code_expires_at_the_boundary_and_the_confirmation_has_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = staff(dir.path());
        let invited = s.invite("admin.late", Role::Admin, NOW).unwrap();
        let code = invited.code.as_str();
        let at = NOW + INVITE_TTL_SECS;
        assert!(matches!(
            s.enrol(code, PW, "gw", at),
            Err(EnrolError::InvalidCode)
        ));
        let p = s.enrol(code, PW, "gw", at - 1).unwrap();
        let secret = p.enrollment.secret_base32.to_string();
        let end = at - 1 + CONFIRM_WINDOW_SECS;
        assert!(matches!(
            s.confirm_enrolment(code, &code_at(&secret, end).unwrap(), end),
            Err(EnrolError::InvalidCode)
        ));
        assert!(
            s.confirm_enrolment(code, &code_at(&secret, end - 1).unwrap(), end - 1)
                .is_ok()
        );
    }

    #[test]
    fn re_inviting_replaces_the_code_and_an_active_account_cannot_be_invited() {
        let dir = tempfile::tempdir().unwrap();
        let s = staff(dir.path());
        let first = s.invite("clerk.new", Role::Clerk, NOW).unwrap();
        let second = s.invite("clerk.new", Role::Physician, NOW + 1).unwrap();
        assert!(matches!(
            s.enrol(first.code.as_str(), PW, "gw", NOW + 2),
            Err(EnrolError::InvalidCode)
        ));
        let p = s.enrol(second.code.as_str(), PW, "gw", NOW + 2).unwrap();
        assert_eq!(p.role, Role::Physician);
        assert_eq!(s.accounts(NOW).unwrap().len(), 1);
        enrolled(&s, "admin.done");
        assert!(matches!(
            s.invite("admin.done", Role::Admin, NOW),
            Err(StaffError::Exists)
        ));
        s.add("clerk.cli", Role::Clerk, PW).unwrap();
        assert!(matches!(
            s.invite("clerk.cli", Role::Clerk, NOW),
            Err(StaffError::Exists)
        ));
        assert!(matches!(
            s.invite("Bad Name", Role::Clerk, NOW),
            Err(StaffError::BadName)
        ));
    }

    #[test]
    fn a_disabled_invitation_is_refused_like_an_unknown_code() {
        let dir = tempfile::tempdir().unwrap();
        let s = staff(dir.path());
        let invited = s.invite("clerk.gone", Role::Clerk, NOW).unwrap();
        s.disable("clerk.gone").unwrap();
        assert!(matches!(
            s.enrol(invited.code.as_str(), PW, "gw", NOW),
            Err(EnrolError::InvalidCode)
        ));
        assert!(matches!(
            s.enrol("AAAAA-AAAAA-AAAAA-AAAAA", PW, "gw", NOW),
            Err(EnrolError::InvalidCode)
        ));
        assert!(matches!(
            s.enrol("not a code", PW, "gw", NOW),
            Err(EnrolError::InvalidCode)
        ));
        // One text for every reason.
        assert_eq!(
            EnrolError::InvalidCode.to_string(),
            "this enrolment code is not valid (it may have been used, replaced or expired); ask for a new one"
        );
    }

    #[test]
    fn only_the_codes_hash_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let s = staff(dir.path());
        let invited = s.invite("admin.h", Role::Admin, NOW).unwrap();
        let code = invited.code.as_str().to_string();
        let canonical = code.replace('-', "");
        let text = file_text(dir.path());
        assert!(!text.contains(&code), "{text}");
        assert!(!text.contains(&canonical), "{text}");
        assert!(!text.contains(&canonical.to_lowercase()));
        assert!(!text.contains(&hex::encode(canonical.as_bytes())));
        assert!(text.contains(&hex::encode(digest(&canonical))));
        // Nor after enrolment (password and secret sealed / hashed).
        let p = s.enrol(&code, PW, "gw", NOW).unwrap();
        let text = file_text(dir.path());
        assert!(!text.contains(&canonical));
        assert!(!text.contains(PW));
        assert!(!text.contains(p.enrollment.secret_base32.as_str()));
    }

    #[test]
    fn the_password_policy_names_the_rule() {
        assert_eq!(
            check_password("admin.a", "short"),
            Err(PasswordRule::TooShort)
        );
        assert_eq!(
            check_password("sato", "my SATO password"),
            Err(PasswordRule::ContainsName)
        );
        assert_eq!(
            check_password("x.y", "aaaaaaaaaaaaaaaa"),
            Err(PasswordRule::OneCharacter)
        );
        assert_eq!(check_password("sato", PW), Ok(()));
        // Characters, not bytes: twelve kana are enough.
        assert_eq!(check_password("sato", "あいうえおかきくけこさし"), Ok(()));
        let dir = tempfile::tempdir().unwrap();
        let s = staff(dir.path());
        let invited = s.invite("admin.p", Role::Admin, NOW).unwrap();
        let code = invited.code.as_str();
        for (pw, rule) in [
            ("short", PasswordRule::TooShort),
            ("ADMIN.P-is-my-password", PasswordRule::ContainsName),
            ("zzzzzzzzzzzzzz", PasswordRule::OneCharacter),
        ] {
            match s.enrol(code, pw, "gw", NOW) {
                Err(EnrolError::WeakPassword(r)) => assert_eq!(r, rule),
                other => panic!("{pw}: {other:?}"),
            }
        }
        // A refused password does not spend the code.
        assert!(s.enrol(code, PW, "gw", NOW).is_ok());
    }
}
