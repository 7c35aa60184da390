//! The wire format of a remote command and its verification.
//!
//! The MQTT payload published on `gw/{device_id}/cmd/{op}/{cmd_id}` is a JSON *envelope*:
//!
//! ```json
//! {"alg": "ed25519", "payload": "<base64 of the signed bytes>", "signature": "<base64>"}
//! ```
//!
//! `alg` is `"ed25519"` (64 raw signature bytes, `openssl pkeyutl -sign -rawin`) or
//! `"ecdsa-p256-sha256"` (DER signature, `openssl dgst -sha256 -sign`) and must be the
//! algorithm of the installed vendor key. The signature covers exactly the bytes that
//! `payload` decodes to, so there is no canonical form to agree on. Those bytes are
//! themselves a JSON object:
//!
//! ```json
//! {"device_id": "clinic-001", "cmd_id": "c-42", "op": "log-upload", "seq": 42,
//!  "expires_at": 1767225600, "args": {"lines": 500}}
//! ```
//!
//! [`VendorKey::verify`] checks, in this order, stopping at the first failure:
//!
//! | step | [`Rejection::code`] |
//! |---|---|
//! | payload at most [`MAX_PAYLOAD_BYTES`] | `too-large` |
//! | envelope is a JSON object | `malformed` |
//! | it has a non-empty `signature` | `unsigned` |
//! | `alg`, `payload`, `signature` present, base64, no other fields | `malformed` |
//! | `alg` is the vendor key's algorithm | `wrong-algorithm` |
//! | the signature verifies over the payload bytes | `bad-signature` |
//! | the signed bytes are a JSON object with exactly the six fields, typed | `malformed` |
//! | `device_id` is this gateway's | `other-device` |
//! | `op` and `cmd_id` equal the topic's | `topic-mismatch` |
//! | `now < expires_at` | `expired` |
//! | `seq` greater than the last accepted one | `replayed` |
//! | `op` is a known operation | `unknown-op` |
//! | `args` fit the operation | `bad-args` |
//!
//! Nothing inside the signed bytes is parsed before the signature is checked. Verification
//! is pure: it changes nothing. The caller persists the sequence number
//! ([`crate::state::FleetState::accept`]) before executing the command.
//!
//! Operations and their `args` (unknown argument names are `bad-args`):
//!
//! | `op` | `args` |
//! |---|---|
//! | `config-update` | `{"toml": "<the whole gateway TOML document>"}` (non-empty) |
//! | `disable` | `{}` or `{"reason": "<at most 256 characters, no control characters>"}` |
//! | `enable`, `wipe`, `restart`, `status` | `{}` |
//! | `log-upload` | `{"lines": N}` with 1 <= N <= 10000 |
//! | `provision` | `{"device_id": "<id>", "certificate": "<PEM chain, leaf first>"}`: the answer to a claim's CSR ([`crate::provision`]) |
//! | `staff-invite` | `{"name": "<id>", "role": "clerk" \| "physician" \| "admin"}`: a kiosk account completed with a one-time enrolment code, returned on `.../result` |
//! | `staff-disable` | `{"name": "<id>"}`: the kiosk account can no longer log in |
//! | `update` | `{"url": "https://…", "sha256": "<64 lowercase hex>", "version": N, "size": B}`: download, verify and install a signed firmware bundle; N >= 1, 0 < B <= [`MAX_UPDATE_BYTES`] (the box also checks B against its own `update.max_bundle_bytes`) |
//!
//! A staff account `name` is checked with the gateway's one id rule (`gateway-id`, so it
//! can never inject anything where it is echoed); the account store applies its own,
//! narrower rule (lower case) and a name it refuses ends `failed`.

use std::fmt;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::{Map, Value};

use crate::key::{Algorithm, VendorKey};
use crate::topics::{DeviceId, is_valid_id};
use gateway_id::Id;

/// Largest MQTT payload looked at; anything bigger is refused before parsing.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Largest `lines` of `log-upload`.
pub const MAX_LOG_LINES: u32 = 10_000;
/// Longest `reason` of `disable`, in characters.
pub const MAX_DISABLE_REASON_CHARS: usize = 256;
/// Largest `certificate` of `provision`, in bytes.
pub const MAX_CERTIFICATE_BYTES: usize = 64 * 1024;
/// Largest `size` of `update` the wire format accepts (16 GiB); each box applies its own,
/// smaller `update.max_bundle_bytes` when it executes the command.
pub const MAX_UPDATE_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// Longest `url` of `update`, in bytes.
pub const MAX_UPDATE_URL_BYTES: usize = 2048;
/// Longest [`Rejection::reason`], in characters.
pub const MAX_REASON_CHARS: usize = 256;

/// Standard alphabet; padding optional (both `openssl base64 -A` and unpadded encoders work).
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The operations a vendor can request, by their wire name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    ConfigUpdate,
    Disable,
    Enable,
    Wipe,
    Restart,
    Status,
    LogUpload,
    Provision,
    StaffInvite,
    StaffDisable,
    Update,
}

impl OpKind {
    /// Every operation, in documentation order.
    pub const ALL: [OpKind; 11] = [
        OpKind::ConfigUpdate,
        OpKind::Disable,
        OpKind::Enable,
        OpKind::Wipe,
        OpKind::Restart,
        OpKind::Status,
        OpKind::LogUpload,
        OpKind::Provision,
        OpKind::StaffInvite,
        OpKind::StaffDisable,
        OpKind::Update,
    ];

    /// The wire name (`op` field and topic level).
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::ConfigUpdate => "config-update",
            OpKind::Disable => "disable",
            OpKind::Enable => "enable",
            OpKind::Wipe => "wipe",
            OpKind::Restart => "restart",
            OpKind::Status => "status",
            OpKind::LogUpload => "log-upload",
            OpKind::Provision => "provision",
            OpKind::StaffInvite => "staff-invite",
            OpKind::StaffDisable => "staff-disable",
            OpKind::Update => "update",
        }
    }

    /// Parses a wire name; exact, case-sensitive.
    pub fn from_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kiosk staff role, as `staff-invite` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StaffRole {
    Clerk,
    Physician,
    Admin,
}

impl StaffRole {
    /// Every role, as the account store knows them.
    pub const ALL: [StaffRole; 3] = [StaffRole::Clerk, StaffRole::Physician, StaffRole::Admin];

    /// The wire name (`clerk`, `physician`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            StaffRole::Clerk => "clerk",
            StaffRole::Physician => "physician",
            StaffRole::Admin => "admin",
        }
    }

    /// Parses a wire name; exact, case-sensitive.
    pub fn from_name(name: &str) -> Option<StaffRole> {
        StaffRole::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for StaffRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verified operation with its typed arguments.
#[derive(Clone, PartialEq, Eq)]
pub enum Op {
    /// Replace the gateway's configuration with this TOML document (validated by the
    /// service with `gateway-config` before anything is written).
    ConfigUpdate {
        toml: String,
    },
    /// Stop serving (listeners refuse) until `enable`; the reason is shown in `status`.
    Disable {
        reason: Option<String>,
    },
    Enable,
    /// Crypto-shred: evict the key store's keys (`gatewayd keys wipe`).
    Wipe,
    Restart,
    /// Publish a telemetry snapshot on the result topic.
    Status,
    /// Publish the last `lines` log lines on the result topic.
    LogUpload {
        lines: u32,
    },
    /// The vendor's answer to a claim: the device id this box is from now on and its
    /// certificate (PEM, leaf first). Acted on only while provisioning by claim.
    Provision {
        device_id: DeviceId,
        certificate: String,
    },
    /// Create (or re-invite) a kiosk account completed only through a one-time enrolment
    /// code; the code goes back on `.../result`.
    StaffInvite {
        name: Id,
        role: StaffRole,
    },
    /// Disable a kiosk account: it can no longer log in.
    StaffDisable {
        name: Id,
    },
    /// Download the firmware bundle at `url` (mutual TLS, resumable, paced), check that it
    /// is `size` bytes with this SHA-256, that its signed version is `version`, install it
    /// into the inactive slot and boot into it once.
    Update {
        url: UpdateUrl,
        sha256: [u8; 32],
        version: u64,
        size: u64,
    },
}

/// The `url` of an `update`: `https://host[:port]/path`, at most [`MAX_UPDATE_URL_BYTES`]
/// bytes of printable ASCII, no user info, no fragment. Checked as text here; the
/// download parses it again with its HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateUrl(String);

impl UpdateUrl {
    /// Checks `url`; the error never echoes it.
    pub fn parse(url: &str) -> Result<UpdateUrl, &'static str> {
        if url.len() > MAX_UPDATE_URL_BYTES {
            return Err("url is longer than 2048 bytes");
        }
        if !url.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("url must be printable ASCII without spaces");
        }
        let Some(rest) = url.strip_prefix("https://") else {
            return Err("url must start with https://");
        };
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        if authority.is_empty() || authority.starts_with(':') {
            return Err("url has no host");
        }
        if authority.contains('@') {
            return Err("url must not carry user info");
        }
        if url.contains('#') {
            return Err("url must not carry a fragment");
        }
        Ok(UpdateUrl(url.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UpdateUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses 64 lowercase hex digits.
pub fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
        let hi = lower_hex_digit(*pair.first()?)?;
        let lo = lower_hex_digit(*pair.get(1)?)?;
        *out.get_mut(i)? = (hi << 4) | lo;
    }
    Some(out)
}

fn lower_hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

impl Op {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::ConfigUpdate { .. } => OpKind::ConfigUpdate,
            Op::Disable { .. } => OpKind::Disable,
            Op::Enable => OpKind::Enable,
            Op::Wipe => OpKind::Wipe,
            Op::Restart => OpKind::Restart,
            Op::Status => OpKind::Status,
            Op::LogUpload { .. } => OpKind::LogUpload,
            Op::Provision { .. } => OpKind::Provision,
            Op::StaffInvite { .. } => OpKind::StaffInvite,
            Op::StaffDisable { .. } => OpKind::StaffDisable,
            Op::Update { .. } => OpKind::Update,
        }
    }
}

/// The configuration document is printed as its length only.
impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::ConfigUpdate { toml } => f
                .debug_struct("ConfigUpdate")
                .field("toml_bytes", &toml.len())
                .finish(),
            Op::Disable { reason } => f.debug_struct("Disable").field("reason", reason).finish(),
            Op::LogUpload { lines } => f.debug_struct("LogUpload").field("lines", lines).finish(),
            Op::Provision {
                device_id,
                certificate,
            } => f
                .debug_struct("Provision")
                .field("device_id", device_id)
                .field("certificate_bytes", &certificate.len())
                .finish(),
            Op::StaffInvite { name, role } => f
                .debug_struct("StaffInvite")
                .field("name", name)
                .field("role", role)
                .finish(),
            Op::StaffDisable { name } => {
                f.debug_struct("StaffDisable").field("name", name).finish()
            }
            Op::Update { version, size, .. } => f
                .debug_struct("Update")
                .field("version", version)
                .field("size", size)
                .finish_non_exhaustive(),
            other => f.write_str(other.kind().as_str()),
        }
    }
}

/// A command that passed every check of [`VendorKey::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub cmd_id: String,
    pub seq: u64,
    pub op: Op,
    pub expires_at: u64,
}

/// Why a command was refused. [`Rejection::code`] is stable and machine-readable; the
/// `Display` text (and [`Rejection::reason`]) is safe to publish: it echoes only numbers,
/// algorithm/operation names and identifiers that pass [`is_valid_id`], never payload
/// content, and is at most [`MAX_REASON_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("payload of {len} bytes is larger than {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed command: {0}")]
    Malformed(String),
    #[error("command is not signed")]
    Unsigned,
    #[error("signature algorithm {got} is not the vendor key's {expected}")]
    WrongAlgorithm { got: String, expected: Algorithm },
    #[error("signature does not verify with the vendor key")]
    BadSignature,
    #[error("command is for another device")]
    OtherDevice,
    #[error("signed {field} does not match the topic")]
    TopicMismatch { field: &'static str },
    #[error("command expired at {expires_at} (gateway time {now})")]
    Expired { expires_at: u64, now: u64 },
    #[error("sequence {seq} is not greater than the last accepted {last}")]
    Replayed { seq: u64, last: u64 },
    #[error("unknown operation {op}")]
    UnknownOp { op: String },
    #[error("bad arguments for {op}: {problem}")]
    BadArgs { op: OpKind, problem: String },
}

impl Rejection {
    /// Every code [`Rejection::code`] can return.
    pub const CODES: [&'static str; 11] = [
        "too-large",
        "malformed",
        "unsigned",
        "wrong-algorithm",
        "bad-signature",
        "other-device",
        "topic-mismatch",
        "expired",
        "replayed",
        "unknown-op",
        "bad-args",
    ];

    /// Stable machine-readable code (the `code` of the `failed` state message).
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::TooLarge { .. } => "too-large",
            Rejection::Malformed(_) => "malformed",
            Rejection::Unsigned => "unsigned",
            Rejection::WrongAlgorithm { .. } => "wrong-algorithm",
            Rejection::BadSignature => "bad-signature",
            Rejection::OtherDevice => "other-device",
            Rejection::TopicMismatch { .. } => "topic-mismatch",
            Rejection::Expired { .. } => "expired",
            Rejection::Replayed { .. } => "replayed",
            Rejection::UnknownOp { .. } => "unknown-op",
            Rejection::BadArgs { .. } => "bad-args",
        }
    }

    /// The `Display` text, cut to [`MAX_REASON_CHARS`] characters.
    pub fn reason(&self) -> String {
        crate::bounded_text(&self.to_string(), MAX_REASON_CHARS)
    }
}

/// Echoes a peer-supplied name only when it is a plain identifier.
fn echo(name: &str) -> String {
    if is_valid_id(name) {
        name.to_owned()
    } else {
        "(not a plain name)".to_owned()
    }
}

fn malformed(what: impl Into<String>) -> Rejection {
    Rejection::Malformed(what.into())
}

/// Where a JSON syntax error is, without any of the text around it.
fn json_error(what: &str, e: &serde_json::Error) -> Rejection {
    malformed(format!(
        "{what} is not valid JSON (line {} column {})",
        e.line(),
        e.column()
    ))
}

/// The decoded envelope: algorithm name, signed bytes, signature bytes.
struct Envelope {
    alg: String,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

impl Envelope {
    fn parse(raw: &[u8]) -> Result<Envelope, Rejection> {
        let value: Value = serde_json::from_slice(raw).map_err(|e| json_error("envelope", &e))?;
        let Value::Object(mut map) = value else {
            return Err(malformed("envelope is not a JSON object"));
        };
        let signature = match map.remove("signature") {
            None | Some(Value::Null) => return Err(Rejection::Unsigned),
            Some(Value::String(s)) if s.is_empty() => return Err(Rejection::Unsigned),
            Some(Value::String(s)) => s,
            Some(_) => return Err(malformed("envelope signature is not a string")),
        };
        let alg = take_string(&mut map, "alg", "envelope")?;
        let payload = take_string(&mut map, "payload", "envelope")?;
        reject_unknown(&map, "envelope field").map_err(malformed)?;
        let signature = B64
            .decode(signature.as_bytes())
            .map_err(|_| malformed("envelope signature is not base64"))?;
        let payload = B64
            .decode(payload.as_bytes())
            .map_err(|_| malformed("envelope payload is not base64"))?;
        Ok(Envelope {
            alg,
            payload,
            signature,
        })
    }
}

/// Builds an envelope (for vendor tooling, tests and fuzzing): `{"alg","payload","signature"}`.
pub fn encode_envelope(alg: Algorithm, signed_bytes: &[u8], signature: &[u8]) -> Vec<u8> {
    let envelope = serde_json::json!({
        "alg": alg.as_str(),
        "payload": B64.encode(signed_bytes),
        "signature": B64.encode(signature),
    });
    envelope.to_string().into_bytes()
}

fn take_string(map: &mut Map<String, Value>, key: &str, what: &str) -> Result<String, Rejection> {
    match map.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(malformed(format!("{what} {key} is not a string"))),
        None => Err(malformed(format!("{what} has no {key}"))),
    }
}

fn take_u64(map: &mut Map<String, Value>, key: &str) -> Result<u64, Rejection> {
    match map.remove(key) {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| malformed(format!("{key} is not a non-negative integer"))),
        None => Err(malformed(format!("command has no {key}"))),
    }
}

fn reject_unknown(map: &Map<String, Value>, what: &str) -> Result<(), String> {
    match map.keys().next() {
        Some(k) => Err(format!("unknown {what} {}", echo(k))),
        None => Ok(()),
    }
}

/// The signed bytes, parsed (only after the signature verified).
struct Signed {
    device_id: String,
    cmd_id: String,
    op: String,
    seq: u64,
    expires_at: u64,
    args: Map<String, Value>,
}

impl Signed {
    fn parse(bytes: &[u8]) -> Result<Signed, Rejection> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| json_error("signed command", &e))?;
        let Value::Object(mut map) = value else {
            return Err(malformed("signed command is not a JSON object"));
        };
        let device_id = take_string(&mut map, "device_id", "command")?;
        let cmd_id = take_string(&mut map, "cmd_id", "command")?;
        let op = take_string(&mut map, "op", "command")?;
        let seq = take_u64(&mut map, "seq")?;
        let expires_at = take_u64(&mut map, "expires_at")?;
        let args = match map.remove("args") {
            Some(Value::Object(args)) => args,
            Some(_) => return Err(malformed("args is not a JSON object")),
            None => return Err(malformed("command has no args")),
        };
        reject_unknown(&map, "command field").map_err(malformed)?;
        if !is_valid_id(&cmd_id) {
            return Err(malformed(
                "cmd_id must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        if !is_valid_id(&op) {
            return Err(malformed(
                "op must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        Ok(Signed {
            device_id,
            cmd_id,
            op,
            seq,
            expires_at,
            args,
        })
    }
}

fn parse_op(kind: OpKind, mut args: Map<String, Value>) -> Result<Op, Rejection> {
    let bad = |problem: String| Rejection::BadArgs { op: kind, problem };
    let op = match kind {
        OpKind::ConfigUpdate => match args.remove("toml") {
            Some(Value::String(toml)) if !toml.is_empty() => Op::ConfigUpdate { toml },
            Some(Value::String(_)) => return Err(bad("toml is empty".into())),
            Some(_) => return Err(bad("toml is not a string".into())),
            None => return Err(bad("toml is missing".into())),
        },
        OpKind::Disable => match args.remove("reason") {
            None | Some(Value::Null) => Op::Disable { reason: None },
            Some(Value::String(reason)) => {
                if reason.chars().count() > MAX_DISABLE_REASON_CHARS {
                    return Err(bad(format!(
                        "reason is longer than {MAX_DISABLE_REASON_CHARS} characters"
                    )));
                }
                if reason.chars().any(char::is_control) {
                    return Err(bad("reason contains control characters".into()));
                }
                Op::Disable {
                    reason: Some(reason),
                }
            }
            Some(_) => return Err(bad("reason is not a string".into())),
        },
        OpKind::Enable => Op::Enable,
        OpKind::Wipe => Op::Wipe,
        OpKind::Restart => Op::Restart,
        OpKind::Status => Op::Status,
        OpKind::LogUpload => {
            let lines = match args.remove("lines") {
                Some(v) => v.as_u64(),
                None => return Err(bad("lines is missing".into())),
            };
            match lines.and_then(|n| u32::try_from(n).ok()) {
                Some(n) if (1..=MAX_LOG_LINES).contains(&n) => Op::LogUpload { lines: n },
                _ => {
                    return Err(bad(format!(
                        "lines must be an integer from 1 to {MAX_LOG_LINES}"
                    )));
                }
            }
        }
        OpKind::Provision => {
            let device_id = match args.remove("device_id") {
                Some(Value::String(id)) => DeviceId::new(&id).map_err(|e| bad(e.to_string()))?,
                Some(_) => return Err(bad("device_id is not a string".into())),
                None => return Err(bad("device_id is missing".into())),
            };
            let certificate = match args.remove("certificate") {
                Some(Value::String(pem)) if pem.len() > MAX_CERTIFICATE_BYTES => {
                    return Err(bad(format!(
                        "certificate is larger than {MAX_CERTIFICATE_BYTES} bytes"
                    )));
                }
                Some(Value::String(pem)) if pem.contains("-----BEGIN CERTIFICATE-----") => pem,
                Some(Value::String(_)) => {
                    return Err(bad("certificate is not a PEM certificate".into()));
                }
                Some(_) => return Err(bad("certificate is not a string".into())),
                None => return Err(bad("certificate is missing".into())),
            };
            Op::Provision {
                device_id,
                certificate,
            }
        }
        OpKind::StaffInvite => {
            let name = staff_name(&mut args).map_err(bad)?;
            let role = match args.remove("role") {
                Some(Value::String(role)) => StaffRole::from_name(&role)
                    .ok_or_else(|| bad("role must be one of clerk, physician, admin".into()))?,
                Some(_) => return Err(bad("role is not a string".into())),
                None => return Err(bad("role is missing".into())),
            };
            Op::StaffInvite { name, role }
        }
        OpKind::StaffDisable => Op::StaffDisable {
            name: staff_name(&mut args).map_err(bad)?,
        },
        OpKind::Update => update_args(&mut args).map_err(|p| bad(p.into()))?,
    };
    reject_unknown(&args, "argument").map_err(bad)?;
    Ok(op)
}

/// The arguments of `update`; problems never echo the values.
fn update_args(args: &mut Map<String, Value>) -> Result<Op, &'static str> {
    let url = match args.remove("url") {
        Some(Value::String(url)) => UpdateUrl::parse(&url)?,
        Some(_) => return Err("url is not a string"),
        None => return Err("url is missing"),
    };
    let sha256 = match args.remove("sha256") {
        Some(Value::String(hex)) => {
            parse_sha256_hex(&hex).ok_or("sha256 must be 64 lowercase hex digits")?
        }
        Some(_) => return Err("sha256 is not a string"),
        None => return Err("sha256 is missing"),
    };
    let version = match args.remove("version").map(|v| v.as_u64()) {
        Some(Some(v)) if v >= 1 => v,
        Some(_) => return Err("version must be an integer of at least 1"),
        None => return Err("version is missing"),
    };
    let size = match args.remove("size").map(|v| v.as_u64()) {
        Some(Some(b)) if b > 0 && b <= MAX_UPDATE_BYTES => b,
        Some(_) => return Err("size must be an integer from 1 to 17179869184"),
        None => return Err("size is missing"),
    };
    Ok(Op::Update {
        url,
        sha256,
        version,
        size,
    })
}

/// The `name` argument of a staff operation, checked with the one id rule.
fn staff_name(args: &mut Map<String, Value>) -> Result<Id, String> {
    match args.remove("name") {
        Some(Value::String(name)) => Id::parse(&name, "name").map_err(|e| e.to_string()),
        Some(_) => Err("name is not a string".into()),
        None => Err("name is missing".into()),
    }
}

impl VendorKey {
    /// Verifies one MQTT command payload received on `gw/{expected_device}/cmd/{topic_op}/
    /// {topic_cmd_id}` at `now_unix`, given the last accepted sequence number (`None` on a
    /// gateway that never accepted one). Pure: it changes nothing, whatever the outcome.
    /// See the [module docs](self) for the order of the checks.
    pub fn verify(
        &self,
        raw_mqtt_payload: &[u8],
        expected_device: &str,
        topic_op: &str,
        topic_cmd_id: &str,
        now_unix: u64,
        last_seq: Option<u64>,
    ) -> Result<Command, Rejection> {
        if raw_mqtt_payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Rejection::TooLarge {
                len: raw_mqtt_payload.len(),
                max: MAX_PAYLOAD_BYTES,
            });
        }
        let envelope = Envelope::parse(raw_mqtt_payload)?;
        if Algorithm::from_name(&envelope.alg) != Some(self.algorithm()) {
            return Err(Rejection::WrongAlgorithm {
                got: echo(&envelope.alg),
                expected: self.algorithm(),
            });
        }
        if !self.verify_signature(&envelope.payload, &envelope.signature) {
            return Err(Rejection::BadSignature);
        }
        let signed = Signed::parse(&envelope.payload)?;
        if signed.device_id != expected_device {
            return Err(Rejection::OtherDevice);
        }
        if signed.op != topic_op {
            return Err(Rejection::TopicMismatch { field: "op" });
        }
        if signed.cmd_id != topic_cmd_id {
            return Err(Rejection::TopicMismatch { field: "cmd_id" });
        }
        if now_unix >= signed.expires_at {
            return Err(Rejection::Expired {
                expires_at: signed.expires_at,
                now: now_unix,
            });
        }
        if let Some(last) = last_seq
            && signed.seq <= last
        {
            return Err(Rejection::Replayed {
                seq: signed.seq,
                last,
            });
        }
        let Some(kind) = OpKind::from_name(&signed.op) else {
            // `op` passed is_valid_id in Signed::parse: safe to echo.
            return Err(Rejection::UnknownOp { op: signed.op });
        };
        let op = parse_op(kind, signed.args)?;
        Ok(Command {
            cmd_id: signed.cmd_id,
            seq: signed.seq,
            op,
            expires_at: signed.expires_at,
        })
    }
}
