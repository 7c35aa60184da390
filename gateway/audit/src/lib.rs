//! The audit trail: who logged in, who read or changed which patient's booking, and what the
//! vendor commanded, kept so that an edited, reordered or deleted record is detected.
//!
//! On disk, under `<data_dir>/audit/`:
//! - `audit.jsonl`: one JSON object per line, appended and `fdatasync`'d before
//!   [`AuditLog::append`] returns;
//! - `head`: the sequence number and MAC of the last record, replaced atomically after each
//!   append, so that deleting records at the end is detected too.
//!
//! Each record carries `seq` (1, 2, ...), `prev` (the MAC of the record before it, or 64
//! zeros) and `mac` = HMAC-SHA-256 under the audit key over the record's JSON without `mac`.
//! The key is derived from the spool master key ([`AuditKey::new`], `KeyPurpose::Audit`),
//! so it lives in the TPM where the master key does, and a record cannot be forged or
//! re-chained without it. [`verify`] names the first record that is not what the chain
//! says, and how.
//!
//! Locking: the daemon and `gatewayd users ...` append to the same trail. An append holds
//! the exclusive lock `audit.lock` ([`gateway_durable::LockedFile`] on the head, bounded
//! wait) from reading the head to replacing it, and continues the chain from the head on
//! disk. A lock that cannot be taken, or a head that cannot be read, parsed or checked
//! against the key, is an error and nothing is appended. [`AuditLog::append`] writes and
//! syncs files: callers on an async runtime run it on a blocking thread.
//!
//! What a record holds: time, actor (a staff account name, `vendor`, or `system`), action
//! and outcome from fixed vocabularies, and a subject reference chosen by the caller (an
//! appointment id, a keyed MAC of a patient id): the caller keeps patient names and ids out.
//!
//! Sealed participants: an event whose standard audit message must name the patient and
//! the study (DICOM instances transferred) is appended with
//! [`AuditLog::append_with_participants`]. Those values are sealed (AES-256-GCM under
//! [`ParticipantsKey`], `KeyPurpose::AuditParticipants`, the record's `seq` as additional
//! data) and stored base64 in the record's `participants` field, which the MAC covers; the
//! chain never holds them in clear. A record without that field is byte-for-byte what
//! older versions wrote, so old trails verify unchanged. [`a5`] opens them to render the
//! record as a DICOM PS3.15 A.5 audit message.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub mod a5;
mod sealed;

pub use sealed::{Participants, ParticipantsKey, SopClassCount};

use gateway_durable::{self as durable, Context, LockedFile};
use gateway_keystore::{DerivedKey, KEY_LEN, KeyPurpose, MasterKey};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const LOG_FILE: &str = "audit.jsonl";
const HEAD_FILE: &str = "head";
/// Held ([`LockedFile`]) while appending, across processes.
const LOCK_FILE: &str = "audit.lock";
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The key records are MAC'd with, and the key their sealed participants are sealed with.
#[derive(Clone)]
pub struct AuditKey(DerivedKey, ParticipantsKey);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

impl AuditKey {
    /// The audit key derived from the spool master key for [`KeyPurpose::Audit`] (its own
    /// label keeps it apart from every other derived key).
    pub fn new(master: &MasterKey) -> Self {
        Self(
            master.derive(KeyPurpose::Audit),
            ParticipantsKey::new(master),
        )
    }

    /// The key that opens the records' sealed participants (for the A.5 rendering).
    pub fn participants_key(&self) -> &ParticipantsKey {
        &self.1
    }

    /// [`AuditKey::new`] from the master key's raw bytes.
    pub fn derive(master: &[u8; KEY_LEN]) -> Self {
        Self::new(&MasterKey::from_bytes(*master))
    }

    fn mac(&self, body: &[u8]) -> String {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(self.0.expose())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }
}

/// What happened, from a fixed vocabulary (kept small so that records stay comparable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Login,
    Logout,
    TotpEnrolled,
    AccountAdded,
    AccountDisabled,
    /// A staff account was invited (fleet `staff-invite`, the kiosk, `gatewayd users
    /// invite`); the one-time code is never in the record.
    AccountInvited,
    /// An enrolment code was presented at the kiosk (success: spent; failure: refused).
    EnrolmentCodeUsed,
    /// The first TOTP code confirmed an enrolment: the account can log in.
    EnrolmentCompleted,
    PatientRecordRead,
    AppointmentHeld,
    AppointmentBooked,
    AppointmentCancelled,
    RemoteCommand,
    /// Two source records were linked as one person (subject `person:{id}`; by the matcher:
    /// detail `matcher`, by a person: `manual` or `review`).
    IdentityLinked,
    /// A source record was taken out of its person (subject `person:{id}`, the new person).
    IdentityUnlinked,
    /// A queued pair was decided (subject `review:{id}`, detail `same` or `not_same`).
    IdentityReviewDecided,
    /// A consent to share (公開同意) was recorded (subject `consent:{id}`).
    ConsentRecorded,
    /// A consent was revoked (subject `consent:{id}`).
    ConsentRevoked,
    /// One hospital's data was disclosed to another (subject `person:{id}`, detail: why).
    DisclosureAllowed,
    /// A disclosure was refused for want of consent (subject `person:{id}`).
    DisclosureRefused,
    /// A patient lookup (PDQm search or PIXm linked identifiers) was answered.
    PatientLookup,
    /// Safety warnings (contrast reactions, cumulative CT dose) were shown for a booking
    /// (subject `person:{id}`, detail: counts only).
    SafetyWarningsShown,
    /// An operator was shown a person's safety record (`gatewayd safety show`; subject
    /// `person:{id}`, detail: counts only).
    SafetyShown,
    /// A physician acknowledged a booking's safety warnings (contrast reactions, cumulative
    /// dose) and the booking proceeded (subject: the kiosk's patient reference; detail
    /// `warnings={n}`).
    SafetyAcknowledged,
    /// An operator turned a destination's pseudonym back into the real patient or study
    /// (`gatewayd deid reidentify`; subject `destination:{name}`, detail `study` or
    /// `patient`; outcome failure when the pseudonym is unknown). No value is recorded.
    DeidReidentified,
    /// An HL7 message from a sender not on `[[hl7.peers]]` was refused with AR and not
    /// stored (subject `peer:{address}`, detail: why, from fixed texts).
    Hl7SenderRefused,
    /// DICOM instances of one study were received (C-STORE to the gateway's SCP), recorded
    /// at the end of the association: actor the calling AE title, subject `peer:{address}`,
    /// sealed participants the Patient ID, Study Instance UID and SOP classes with counts
    /// ([`AuditLog::append_with_participants`]).
    DicomInstancesReceived,
    /// DICOM instances of one study were sent and confirmed by the receiver (a STOW batch
    /// to an uplink, a C-STORE of results delivery): actor `system`, subject
    /// `destination:{name}`, sealed participants as for [`Action::DicomInstancesReceived`].
    DicomInstancesSent,
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
}

/// One event to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub actor: String,
    pub action: Action,
    pub outcome: Outcome,
    /// What was touched: an opaque reference chosen by the caller, never a name.
    pub subject: Option<String>,
    /// A short reason from the caller's fixed texts (e.g. `wrong second factor`).
    pub detail: Option<String>,
}

/// The MAC'd part of a record, in the order it is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Body {
    seq: u64,
    time_unix_ms: u64,
    actor: String,
    action: Action,
    outcome: Outcome,
    subject: Option<String>,
    detail: Option<String>,
    /// Sealed [`Participants`] (base64 of nonce and AES-256-GCM ciphertext); absent in
    /// records without them, so that older records serialise exactly as they were MAC'd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    participants: Option<String>,
    prev: String,
}

/// A record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    body: Body,
    mac: String,
}

impl Record {
    pub fn seq(&self) -> u64 {
        self.body.seq
    }
    pub fn actor(&self) -> &str {
        &self.body.actor
    }
    pub fn action(&self) -> Action {
        self.body.action
    }
    pub fn outcome(&self) -> Outcome {
        self.body.outcome
    }
    pub fn subject(&self) -> Option<&str> {
        self.body.subject.as_deref()
    }
    pub fn time_unix_ms(&self) -> u64 {
        self.body.time_unix_ms
    }
    pub fn detail(&self) -> Option<&str> {
        self.body.detail.as_deref()
    }
    /// Whether the record carries sealed participants.
    pub fn has_participants(&self) -> bool {
        self.body.participants.is_some()
    }
    /// Opens the record's sealed participants: `Ok(None)` when it has none, an error when
    /// they do not open under `key` (another box's key, or altered).
    pub fn participants(&self, key: &ParticipantsKey) -> Result<Option<Participants>, AuditError> {
        self.body
            .participants
            .as_deref()
            .map(|sealed| key.open(self.body.seq, sealed))
            .transpose()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Head {
    seq: u64,
    mac: String,
    /// MAC of `seq` and `mac` under the audit key.
    seal: String,
}

impl Head {
    fn new(key: &AuditKey, seq: u64, mac: String) -> Self {
        let seal = key.mac(format!("head {seq} {mac}").as_bytes());
        Self { seq, mac, seal }
    }
}

/// Audit failures; they name paths and record numbers, never record content.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Io(#[from] durable::Error),
    /// The trail's lock could not be taken (or the head read or written under it).
    #[error("audit trail: {0}")]
    Lock(#[from] durable::LockError),
    #[error(
        "audit log {path}: {problem}; not appending to a damaged log (run `gatewayd audit verify`)"
    )]
    Damaged { path: PathBuf, problem: Problem },
    #[error("audit record does not encode: {0}")]
    Encode(#[from] serde_json::Error),
    /// A record's sealed participants could not be sealed or opened (names the record,
    /// never the content).
    #[error("audit record {seq}: sealed participants {problem}")]
    Sealed { seq: u64, problem: &'static str },
}

/// The first thing wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// A line is not a record.
    Malformed { line: u64 },
    /// A record's content does not match its MAC.
    Edited { line: u64, seq: u64 },
    /// A record is not the one the chain expects next (moved or duplicated).
    OutOfOrder { line: u64, seq: u64, expected: u64 },
    /// Records are missing before this line.
    Missing {
        line: u64,
        from_seq: u64,
        to_seq: u64,
    },
    /// The log ends before the last record the head names (records deleted at the end).
    Truncated { last_seq: u64, head_seq: u64 },
    /// The head file is missing, unreadable or not sealed by the audit key.
    BadHead,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Malformed { line } => write!(f, "line {line} is not an audit record"),
            Problem::Edited { line, seq } => {
                write!(
                    f,
                    "record {seq} (line {line}) was changed after it was written"
                )
            }
            Problem::OutOfOrder {
                line,
                seq,
                expected,
            } => write!(
                f,
                "line {line} holds record {seq} where record {expected} belongs (moved or copied)"
            ),
            Problem::Missing {
                line,
                from_seq,
                to_seq,
            } => write!(
                f,
                "records {from_seq} to {to_seq} were deleted before line {line}"
            ),
            Problem::Truncated { last_seq, head_seq } => write!(
                f,
                "the log ends at record {last_seq} but record {head_seq} was written (records deleted at the end)"
            ),
            Problem::BadHead => {
                f.write_str("the head file is missing or not sealed by this box's key")
            }
        }
    }
}

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub records: u64,
    pub problem: Option<Problem>,
}

/// The open log; appends are serialised.
#[derive(Debug)]
pub struct AuditLog {
    dir: PathBuf,
    key: AuditKey,
    state: Mutex<Tail>,
    lock_wait: Duration,
    /// Where [`AuditLog::records_after`] stopped: the seq of the last whole record line it
    /// read and the byte offset after that line, so the export's next poll reads only what
    /// was appended since, not the whole trail again.
    read_mark: Mutex<Option<(u64, u64)>>,
}

#[derive(Debug)]
struct Tail {
    file: File,
    seq: u64,
    mac: String,
}

impl AuditLog {
    /// Opens (creating if needed) the log in `dir` and checks its whole chain first: a log
    /// that does not verify is not appended to.
    pub fn open(dir: &Path, key: AuditKey) -> Result<Self, AuditError> {
        durable::ensure_private_dir(dir)?;
        let path = dir.join(LOG_FILE);
        // Under the trail's lock: two processes opening a trail that does not exist yet
        // (two `gatewayd users ...` runs on a new box) must not see each other's log file
        // before its head is written (that read as a damaged head).
        let locked = LockedFile::lock(
            &dir.join(HEAD_FILE),
            &dir.join(LOCK_FILE),
            durable::DEFAULT_LOCK_WAIT,
        )?;
        let fresh = !path.exists() && !dir.join(HEAD_FILE).exists();
        let (seq, mac) = if fresh {
            (0, GENESIS.to_string())
        } else {
            let (report, last) = check(dir, &key)?;
            if let Some(problem) = report.problem {
                return Err(AuditError::Damaged { path, problem });
            }
            last
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .ctx("open", &path)?;
        if fresh {
            durable::sync_dir(dir)?;
            let head = Head::new(&key, 0, GENESIS.to_string());
            locked.replace(&serde_json::to_vec(&head)?)?;
        }
        drop(locked);
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            state: Mutex::new(Tail { file, seq, mac }),
            lock_wait: durable::DEFAULT_LOCK_WAIT,
            read_mark: Mutex::new(None),
        })
    }

    /// How long an append waits for another holder of the lock (default
    /// [`durable::DEFAULT_LOCK_WAIT`]) before it fails with [`durable::LockError::Busy`].
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// Appends one record durably (line written and `fdatasync`'d, then the head replaced)
    /// and returns it.
    ///
    /// Another process (`gatewayd users ...` beside the daemon) may append to the same log:
    /// appends hold the exclusive lock on `audit.lock`, and the chain continues from the
    /// sealed head on disk when it is ahead of this handle's. A busy lock, or a head that is
    /// missing, unreadable or not sealed by the key, is an error and nothing is appended.
    pub fn append(&self, event: Event) -> Result<Record, AuditError> {
        self.append_inner(event, None)
    }

    /// [`AuditLog::append`] with participants that the record carries sealed (Patient ID,
    /// Study Instance UID: values the standard audit message must name but the chain must
    /// not hold in clear). Sealed under the key's [`ParticipantsKey`] with the record's
    /// `seq` as additional data, stored base64, covered by the MAC.
    pub fn append_with_participants(
        &self,
        event: Event,
        participants: &Participants,
    ) -> Result<Record, AuditError> {
        self.append_inner(event, Some(participants))
    }

    fn append_inner(
        &self,
        event: Event,
        participants: Option<&Participants>,
    ) -> Result<Record, AuditError> {
        let mut tail = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let head_path = self.dir.join(HEAD_FILE);
        let locked = LockedFile::lock(&head_path, &self.dir.join(LOCK_FILE), self.lock_wait)?;
        let head = locked
            .read()?
            .and_then(|bytes| serde_json::from_slice::<Head>(&bytes).ok())
            .filter(|h| Head::new(&self.key, h.seq, h.mac.clone()).seal == h.seal)
            .ok_or_else(|| AuditError::Damaged {
                path: head_path.clone(),
                problem: Problem::BadHead,
            })?;
        if head.seq > tail.seq {
            tail.seq = head.seq;
            tail.mac = head.mac;
        }
        let seq = tail.seq + 1;
        let participants = participants.map(|p| self.key.1.seal(seq, p)).transpose()?;
        let body = Body {
            seq,
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            actor: event.actor,
            action: event.action,
            outcome: event.outcome,
            subject: event.subject,
            detail: event.detail,
            participants,
            prev: tail.mac.clone(),
        };
        let mac = self.key.mac(&serde_json::to_vec(&body)?);
        let record = Record { body, mac };
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        let path = self.dir.join(LOG_FILE);
        tail.file.write_all(&line).ctx("append", &path)?;
        tail.file.sync_data().ctx("sync", &path)?;
        let head = Head::new(&self.key, record.body.seq, record.mac.clone());
        locked.replace(&serde_json::to_vec(&head)?)?;
        tail.seq = record.body.seq;
        tail.mac.clone_from(&record.mac);
        Ok(record)
    }

    /// The records after `seq` (all of them for 0), oldest first, at most `limit`: what the
    /// audit export has not handed on yet. Lines that are not records are skipped here;
    /// [`verify`] names them.
    pub fn records_after(&self, seq: u64, limit: usize) -> Result<Vec<Record>, AuditError> {
        let path = self.dir.join(LOG_FILE);
        let mut file = File::open(&path).ctx("open", &path)?;
        let len = file.metadata().ctx("stat", &path)?.len();
        let mut mark = self
            .read_mark
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Start after the last line read before when it is not past `seq` (and the file has
        // not been replaced by a shorter one); otherwise from the beginning.
        let (mut at, mut last) = match *mark {
            Some((s, off)) if s <= seq && off <= len => (off, s),
            _ => (0, 0),
        };
        file.seek(SeekFrom::Start(at)).ctx("seek", &path)?;
        let mut reader = BufReader::new(file);
        let mut out = Vec::new();
        let mut line = Vec::new();
        while out.len() < limit {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).ctx("read", &path)?;
            if n == 0 || line.last() != Some(&b'\n') {
                // The end, or a line still being written: read again next time.
                break;
            }
            at += n as u64;
            if let Ok(r) = serde_json::from_slice::<Record>(&line) {
                last = last.max(r.body.seq);
                if r.body.seq > seq {
                    out.push(r);
                }
            }
        }
        *mark = Some((last, at));
        Ok(out)
    }

    /// Every record, oldest first (for review tools and tests).
    pub fn records(&self) -> Result<Vec<Record>, AuditError> {
        let path = self.dir.join(LOG_FILE);
        let file = File::open(&path).ctx("open", &path)?;
        let mut out = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.ctx("read", &path)?;
            if let Ok(r) = serde_json::from_str::<Record>(&line) {
                out.push(r);
            }
        }
        Ok(out)
    }
}

/// Checks the log in `dir`: every record's MAC, sequence and link to the one before, and
/// that the last one is the one the head names.
pub fn verify(dir: &Path, key: &AuditKey) -> Result<Report, AuditError> {
    check(dir, key).map(|(report, _)| report)
}

/// The report and the last good (seq, mac).
fn check(dir: &Path, key: &AuditKey) -> Result<(Report, (u64, String)), AuditError> {
    let path = dir.join(LOG_FILE);
    let mut seq = 0u64;
    let mut mac = GENESIS.to_string();
    let mut before_last = GENESIS.to_string();
    let mut report = Report {
        records: 0,
        problem: None,
    };
    let file = match File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(durable::Error {
                action: "open",
                path,
                source,
            }
            .into());
        }
    };
    let lines = file.map(|f| BufReader::new(f).lines());
    for (n, line) in lines.into_iter().flatten().enumerate() {
        let line_no = n as u64 + 1;
        let line = line.ctx("read", &path)?;
        let problem = match serde_json::from_str::<Record>(&line) {
            Err(_) => Some(Problem::Malformed { line: line_no }),
            Ok(r) => {
                let body = serde_json::to_vec(&r.body)?;
                if key.mac(&body) != r.mac {
                    Some(Problem::Edited {
                        line: line_no,
                        seq: r.body.seq,
                    })
                } else if r.body.seq > seq + 1 {
                    Some(Problem::Missing {
                        line: line_no,
                        from_seq: seq + 1,
                        to_seq: r.body.seq - 1,
                    })
                } else if r.body.seq != seq + 1 || r.body.prev != mac {
                    Some(Problem::OutOfOrder {
                        line: line_no,
                        seq: r.body.seq,
                        expected: seq + 1,
                    })
                } else {
                    seq = r.body.seq;
                    before_last = std::mem::replace(&mut mac, r.mac);
                    report.records += 1;
                    None
                }
            }
        };
        if problem.is_some() {
            report.problem = problem;
            return Ok((report, (seq, mac)));
        }
    }
    let head = std::fs::read(dir.join(HEAD_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Head>(&b).ok())
        .filter(|h| key.mac(format!("head {} {}", h.seq, h.mac).as_bytes()) == h.seal);
    report.problem = match head {
        None => Some(Problem::BadHead),
        Some(h) if h.seq > seq => Some(Problem::Truncated {
            last_seq: seq,
            head_seq: h.seq,
        }),
        Some(h) if h.seq == seq && h.mac == mac => None,
        // One record behind: a crash between the line's sync and the head's replacement;
        // that record is whole and chained.
        Some(h) if h.seq + 1 == seq && h.mac == before_last => None,
        Some(_) => Some(Problem::BadHead),
    };
    Ok((report, (seq, mac)))
}

#[cfg(test)]
mod tests;
