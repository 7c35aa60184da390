//! Staff accounts for the kiosk: two factors (MHLW guideline v6.0), roles, lockout.
//!
//! - Passwords are stored only as Argon2id PHC strings (19 MiB, 2 passes, 1 lane: the
//!   OWASP baseline), at least [`MIN_PASSWORD_CHARS`] characters and not containing the
//!   account name.
//! - The second factor is TOTP (RFC 6238: HMAC-SHA-1, 6 digits, 30 s steps, one step of
//!   clock skew). Its 160-bit secret is stored sealed with AES-256-GCM under a key derived
//!   from the spool master key ([`StaffKey::new`], `KeyPurpose::StaffTotp`), bound to the
//!   account name; a code is accepted once (a replay within its validity window is refused).
//! - [`MAX_FAILURES`] failed logins in a row (from any addresses) lock the account for
//!   [`LOCKOUT_SECS`]; a success resets the count. This is the second line of defence: the
//!   kiosk throttles each client address after far fewer failures, so one address alone can
//!   never lock an account. Every outcome (unknown name, wrong password, wrong code, locked,
//!   disabled) costs exactly one Argon2 verification, so a caller that answers them all
//!   alike leaks nothing through timing either; [`LoginError`] still tells them apart for the
//!   audit trail.
//! - State is one JSON file, `<data_dir>/staff/accounts.json`, replaced atomically and
//!   durably on every change (including each failed attempt, so a restart does not lift a
//!   lockout).
//! - Locking: `gatewayd users ...` changes the file while the daemon runs. Every change
//!   takes the exclusive lock `accounts.lock` ([`gateway_durable::LockedFile`], bounded
//!   wait), re-reads the file under it and applies its change to what is on disk, so an
//!   account another process added is kept. A lock that cannot be taken, or a file that
//!   cannot be read or parsed, is an error and the file is left as it is: nothing is ever
//!   written from a copy held in memory. Every public method does blocking file I/O (and
//!   Argon2): callers on an async runtime run it with `spawn_blocking`.
//!
//! - Invitations ([`invite`]): an account can be created "invited", with no password and
//!   no second factor, completed only through a one-time enrolment code (stored as its
//!   SHA-256 only, single use, [`INVITE_TTL_SECS`]): [`Staff::invite`], [`Staff::enrol`],
//!   [`Staff::confirm_enrolment`]. This is how a box with no console gets its first
//!   administrator (the fleet op `staff-invite`, the kiosk's enrolment page).
//!
//! Account names are staff identifiers (1-64 of `a-z 0-9 . _ -`), never patient data.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use gateway_durable::{self as durable, LockedFile};
use gateway_keystore::{DerivedKey, KEY_LEN, KeyPurpose, MasterKey};
use serde::{Deserialize, Serialize};
use totp_rs::TOTP;
use zeroize::Zeroizing;

pub mod invite;

pub use invite::{
    CONFIRM_WINDOW_SECS, EnrolError, INVITE_TTL_SECS, InviteCode, Invited, PasswordRule,
    PendingEnrolment, check_password,
};

const FILE: &str = "accounts.json";
/// Held (`flock`) for every read-modify-write of [`FILE`], across processes.
const LOCK_FILE: &str = "accounts.lock";
/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Failed logins in a row, from any addresses, that lock an account. Well above the
/// kiosk's per-address throttle, so one address is throttled long before it could lock.
pub const MAX_FAILURES: u32 = 20;
/// How long a lockout lasts.
pub const LOCKOUT_SECS: u64 = 15 * 60;
const STEP: u64 = 30;
const DIGITS: usize = 6;

/// What an account may do at the kiosk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Clerk,
    Physician,
    Admin,
}

impl std::str::FromStr for Role {
    type Err = StaffError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "clerk" => Ok(Role::Clerk),
            "physician" => Ok(Role::Physician),
            "admin" => Ok(Role::Admin),
            _ => Err(StaffError::BadRole),
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Clerk => "clerk",
            Role::Physician => "physician",
            Role::Admin => "admin",
        }
    }
}

/// The key TOTP secrets are sealed with.
pub struct StaffKey(DerivedKey);

impl std::fmt::Debug for StaffKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaffKey(..)")
    }
}

impl StaffKey {
    /// The key derived from the spool master key for [`KeyPurpose::StaffTotp`].
    pub fn new(master: &MasterKey) -> Self {
        Self(master.derive(KeyPurpose::StaffTotp))
    }

    /// [`StaffKey::new`] from the master key's raw bytes.
    pub fn derive(master: &[u8; KEY_LEN]) -> Self {
        Self::new(&MasterKey::from_bytes(*master))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.expose().into())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Account {
    name: String,
    role: Role,
    /// Argon2id PHC string.
    password: String,
    /// Nonce (12) || AES-256-GCM ciphertext of the TOTP secret, hex.
    totp_sealed: Option<String>,
    disabled: bool,
    failures: u32,
    locked_until_unix: Option<u64>,
    /// The last TOTP step accepted (codes of that step or earlier are refused).
    last_totp_step: Option<u64>,
    /// Set while the account is invited: it has no password or second factor yet and
    /// cannot log in until [`Staff::confirm_enrolment`] completes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    invite: Option<invite::Invite>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    accounts: Vec<Account>,
}

/// A public view of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountInfo {
    pub name: String,
    pub role: Role,
    pub totp_enrolled: bool,
    pub disabled: bool,
    pub locked: bool,
    /// When the lock ends (Unix seconds), while the account is locked (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_until_unix: Option<u64>,
    /// Invited and not yet enrolled: cannot log in.
    pub invited: bool,
}

/// A second factor to hand to the staff member once (shown as text or a QR code).
#[derive(Debug)]
pub struct Enrollment {
    /// The secret, base32 (what authenticator apps take when typed in).
    pub secret_base32: Zeroizing<String>,
    /// `otpauth://totp/...` for a QR code.
    pub otpauth_uri: Zeroizing<String>,
}

/// Account management failures.
#[derive(Debug, thiserror::Error)]
pub enum StaffError {
    #[error(transparent)]
    Io(#[from] durable::Error),
    /// The accounts file's lock could not be taken (or the file read or written under it).
    #[error("staff accounts: {0}")]
    Lock(#[from] durable::LockError),
    #[error("staff accounts file {path} is unreadable: {detail}; nothing was changed")]
    Corrupt { path: PathBuf, detail: String },
    #[error("account names are 1-64 characters of a-z, 0-9, '.', '_' and '-'")]
    BadName,
    #[error("roles are clerk, physician and admin")]
    BadRole,
    #[error("an account with that name exists")]
    Exists,
    #[error("no account with that name")]
    NoSuchAccount,
    #[error("password refused: {0}")]
    WeakPassword(PasswordRule),
    #[error("cannot hash or seal: {0}")]
    Crypto(String),
}

/// Why a login was refused: the real reason, for the audit trail and the local log. A
/// client must not be told which one it was (see the kiosk's single refusal answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("unknown account")]
    UnknownAccount,
    #[error("wrong password")]
    WrongPassword,
    #[error("wrong or reused one-time code")]
    BadSecondFactor,
    #[error("this account has no second factor enrolled yet")]
    NoSecondFactor,
    #[error("account locked after repeated failures")]
    Locked { until_unix: u64 },
    #[error("account disabled")]
    Disabled,
    #[error("login could not be recorded: {0}")]
    Storage(String),
}

/// A successful login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedIn {
    pub name: String,
    pub role: Role,
}

/// The account store. It holds no copy of the accounts: each call reads the file.
#[derive(Debug)]
pub struct Staff {
    path: PathBuf,
    lock_path: PathBuf,
    key: StaffKey,
    lock_wait: Duration,
}

fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None)
        .unwrap_or_else(|_| unreachable!("fixed Argon2 parameters are valid"));
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

// The work a login did on this thread (tests only): Argon2 verifications and durable
// saves of the accounts file. Every outcome must cost exactly the same.
#[cfg(test)]
thread_local! {
    static ARGON2_VERIFICATIONS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    static SAVES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A hash to verify against when the name is unknown, so that both cost the same. Made
/// with the same parameters as every account's ([`argon2`]); [`Staff::open`] makes it, so
/// that the first unknown name after a start does not pay for it.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| hash_password("decoy password that never matches").unwrap_or_default())
}

fn hash_password(password: &str) -> Result<String, StaffError> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| StaffError::Crypto(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| StaffError::Crypto(e.to_string()))?;
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| StaffError::Crypto(e.to_string()))
}

fn password_matches(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            #[cfg(test)]
            ARGON2_VERIFICATIONS.with(|n| n.set(n.get() + 1));
            argon2().verify_password(password.as_bytes(), &h).is_ok()
        })
        .unwrap_or(false)
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn totp(secret: Vec<u8>, name: &str, issuer: &str) -> Result<TOTP, StaffError> {
    TOTP::new(
        totp_rs::Algorithm::SHA1,
        DIGITS,
        1,
        STEP,
        secret,
        Some(issuer.to_string()),
        name.to_string(),
    )
    .map_err(|e| StaffError::Crypto(e.to_string()))
}

impl Staff {
    /// Opens the account store in `dir` (creating the folder if needed). An accounts file
    /// that cannot be read or parsed is an error.
    pub fn open(dir: &Path, key: StaffKey) -> Result<Self, StaffError> {
        durable::ensure_private_dir(dir)?;
        let staff = Self {
            path: dir.join(FILE),
            lock_path: dir.join(LOCK_FILE),
            key,
            lock_wait: durable::DEFAULT_LOCK_WAIT,
        };
        staff.parse(durable::read_if_exists(&staff.path)?)?;
        let _ = decoy_hash();
        Ok(staff)
    }

    /// How long a change waits for another holder of the lock (default
    /// [`durable::DEFAULT_LOCK_WAIT`]) before it fails with [`durable::LockError::Busy`].
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    fn parse(&self, bytes: Option<Vec<u8>>) -> Result<File, StaffError> {
        match bytes {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| StaffError::Corrupt {
                path: self.path.clone(),
                detail: e.to_string(),
            }),
            None => Ok(File::default()),
        }
    }

    /// The accounts as they are on disk, under the exclusive lock (`accounts.lock`):
    /// `gatewayd users ...` changes them while the daemon runs, and each side's save must
    /// not undo the other's. Fails closed: no lock or no readable file, no change.
    fn lock(&self) -> Result<(LockedFile, File), StaffError> {
        let locked = LockedFile::lock(&self.path, &self.lock_path, self.lock_wait)?;
        let file = self.parse(locked.read()?)?;
        Ok((locked, file))
    }

    /// Replaces the file durably, even when nothing changed: [`Staff::login`] relies on
    /// every outcome paying for the same write and fsyncs.
    fn save(&self, locked: &LockedFile, file: &File) -> Result<(), StaffError> {
        let bytes = serde_json::to_vec_pretty(file).map_err(|e| StaffError::Corrupt {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        locked.replace(&bytes)?;
        #[cfg(test)]
        SAVES.with(|n| n.set(n.get() + 1));
        Ok(())
    }

    /// Adds an account (no second factor yet: it cannot log in until [`Staff::enroll_totp`]).
    pub fn add(&self, name: &str, role: Role, password: &str) -> Result<(), StaffError> {
        if !valid_name(name) {
            return Err(StaffError::BadName);
        }
        check_password(name, password).map_err(StaffError::WeakPassword)?;
        let hash = hash_password(password)?;
        let (locked, mut file) = self.lock()?;
        if file.accounts.iter().any(|a| a.name == name) {
            return Err(StaffError::Exists);
        }
        file.accounts.push(Account {
            name: name.to_string(),
            role,
            password: hash,
            totp_sealed: None,
            disabled: false,
            failures: 0,
            locked_until_unix: None,
            last_totp_step: None,
            invite: None,
        });
        self.save(&locked, &file)
    }

    /// Makes a new TOTP secret for `name` (replacing any earlier one) and returns it once.
    pub fn enroll_totp(&self, name: &str, issuer: &str) -> Result<Enrollment, StaffError> {
        let (enrollment, sealed) = self.new_totp(name, issuer)?;
        let (locked, mut file) = self.lock()?;
        let account = file
            .accounts
            .iter_mut()
            .find(|a| a.name == name)
            .ok_or(StaffError::NoSuchAccount)?;
        account.totp_sealed = Some(sealed);
        account.last_totp_step = None;
        self.save(&locked, &file)?;
        Ok(enrollment)
    }

    /// A new TOTP secret for `name`: what to show once, and the secret sealed for the file
    /// (nonce || AES-256-GCM ciphertext bound to the name, hex).
    fn new_totp(&self, name: &str, issuer: &str) -> Result<(Enrollment, String), StaffError> {
        let mut secret = Zeroizing::new([0u8; 20]);
        getrandom::getrandom(secret.as_mut()).map_err(|e| StaffError::Crypto(e.to_string()))?;
        let mut nonce = [0u8; 12];
        getrandom::getrandom(&mut nonce).map_err(|e| StaffError::Crypto(e.to_string()))?;
        let sealed = self
            .key
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_ref(),
                    aad: name.as_bytes(),
                },
            )
            .map_err(|e| StaffError::Crypto(e.to_string()))?;
        let t = totp(secret.to_vec(), name, issuer)?;
        let enrollment = Enrollment {
            secret_base32: Zeroizing::new(t.get_secret_base32()),
            otpauth_uri: Zeroizing::new(t.get_url()),
        };
        Ok((
            enrollment,
            hex::encode([nonce.as_slice(), &sealed].concat()),
        ))
    }

    /// Disables an account: it can no longer log in.
    pub fn disable(&self, name: &str) -> Result<(), StaffError> {
        let (locked, mut file) = self.lock()?;
        let account = file
            .accounts
            .iter_mut()
            .find(|a| a.name == name)
            .ok_or(StaffError::NoSuchAccount)?;
        account.disabled = true;
        self.save(&locked, &file)
    }

    /// Every account, without secrets, as the file on disk has them now (read without the
    /// lock: the file is only ever replaced whole, by an atomic rename). A file that cannot
    /// be read or parsed is an error.
    pub fn accounts(&self, now_unix: u64) -> Result<Vec<AccountInfo>, StaffError> {
        let file = self.parse(durable::read_if_exists(&self.path)?)?;
        Ok(file
            .accounts
            .iter()
            .map(|a| {
                let locked_until_unix = a.locked_until_unix.filter(|t| *t > now_unix);
                AccountInfo {
                    name: a.name.clone(),
                    role: a.role,
                    totp_enrolled: a.totp_sealed.is_some(),
                    disabled: a.disabled,
                    locked: locked_until_unix.is_some(),
                    locked_until_unix,
                    invited: a.invite.is_some(),
                }
            })
            .collect())
    }

    fn open_secret(&self, account: &Account) -> Option<Zeroizing<Vec<u8>>> {
        self.open_sealed(account.totp_sealed.as_deref()?, &account.name)
    }

    /// Opens a sealed TOTP secret (nonce || ciphertext, hex) bound to `name`.
    fn open_sealed(&self, sealed_hex: &str, name: &str) -> Option<Zeroizing<Vec<u8>>> {
        let sealed = hex::decode(sealed_hex).ok()?;
        if sealed.len() < 12 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(12);
        self.key
            .cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: name.as_bytes(),
                },
            )
            .ok()
            .map(Zeroizing::new)
    }

    /// Checks both factors at `now_unix`. Every path costs one Argon2 verification (an
    /// unknown name against a decoy hash, a locked or disabled account against its own) and
    /// one save of the file, so that the outcomes cannot be told apart by time. Every
    /// outcome is saved (failure count, lockout, last accepted TOTP step) before it is
    /// returned; if it cannot be (the lock is not free, the file cannot be read, parsed
    /// or written), the answer is [`LoginError::Storage`], never a login.
    pub fn login(
        &self,
        name: &str,
        password: &str,
        code: &str,
        now_unix: u64,
    ) -> Result<LoggedIn, LoginError> {
        let (locked, mut file) = self
            .lock()
            .map_err(|e| LoginError::Storage(e.to_string()))?;
        let result = match file.accounts.iter_mut().find(|a| a.name == name) {
            None => {
                let _ = password_matches(decoy_hash(), password);
                Err(LoginError::UnknownAccount)
            }
            Some(account) => self.check(account, password, code, now_unix),
        };
        // Saved on every path, changed or not, so that no outcome skips the write's cost.
        self.save(&locked, &file)
            .map_err(|e| LoginError::Storage(e.to_string()))?;
        result
    }

    /// One login attempt against `account`, updating its failure count, lock and last
    /// accepted TOTP step; exactly one Argon2 verification whatever the outcome.
    fn check(
        &self,
        account: &mut Account,
        password: &str,
        code: &str,
        now_unix: u64,
    ) -> Result<LoggedIn, LoginError> {
        let password_ok = password_matches(&account.password, password);
        if let Some(until) = account.locked_until_unix.filter(|t| *t > now_unix) {
            return Err(LoginError::Locked { until_unix: until });
        }
        if account.disabled {
            return Err(LoginError::Disabled);
        }
        let outcome = if !password_ok {
            Err(LoginError::WrongPassword)
        } else {
            match self.open_secret(account) {
                None if account.totp_sealed.is_none() => Err(LoginError::NoSecondFactor),
                None => Err(LoginError::BadSecondFactor),
                Some(secret) => match accepted_step(&secret, &account.name, code, now_unix) {
                    Some(step) if account.last_totp_step.is_none_or(|last| step > last) => Ok(step),
                    _ => Err(LoginError::BadSecondFactor),
                },
            }
        };
        match outcome {
            Ok(step) => {
                account.failures = 0;
                account.locked_until_unix = None;
                account.last_totp_step = Some(step);
                Ok(LoggedIn {
                    name: account.name.clone(),
                    role: account.role,
                })
            }
            Err(e) => {
                account.failures = account.failures.saturating_add(1);
                if account.failures >= MAX_FAILURES {
                    account.failures = 0;
                    account.locked_until_unix = Some(now_unix.saturating_add(LOCKOUT_SECS));
                }
                Err(e)
            }
        }
    }
}

/// The TOTP step `code` is valid for at `now_unix` (one step of skew either way).
fn accepted_step(secret: &[u8], name: &str, code: &str, now_unix: u64) -> Option<u64> {
    let t = totp(secret.to_vec(), name, "gatewayd").ok()?;
    let code = code.trim();
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now_step = now_unix / STEP;
    (now_step.saturating_sub(1)..=now_step + 1).find(|step| {
        let expected = t.generate(step * STEP);
        // Constant-time comparison of two 6-digit strings.
        expected
            .bytes()
            .zip(code.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    })
}

/// The code an authenticator shows at `time_unix` for a base32 secret (tests and tools).
pub fn code_at(secret_base32: &str, time_unix: u64) -> Option<String> {
    let secret = totp_rs::Secret::Encoded(secret_base32.to_string())
        .to_bytes()
        .ok()?;
    Some(totp(secret, "x", "gatewayd").ok()?.generate(time_unix))
}

#[cfg(test)]
mod tests;
