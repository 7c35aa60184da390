//! Value newtypes: each parses once from its TOML string form (`FromStr`) and prints back
//! in a form that parses to the same value (`Display`).
//!
//! A value of one of these types is valid by construction; code that receives a
//! [`NodeId`] or an [`AeTitle`] never checks it again. Every parse failure is a
//! [`ValueError`] whose message names the offending value in quotes (clipped to a few
//! dozen characters) and says what would be accepted.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

/// Longest excerpt of an offending value that an error message repeats.
const CLIP_CHARS: usize = 64;

/// Keeps error messages short: a value longer than [`CLIP_CHARS`] is cut and marked.
fn clip(value: &str) -> String {
    if value.chars().count() <= CLIP_CHARS {
        value.to_owned()
    } else {
        let mut clipped: String = value.chars().take(CLIP_CHARS).collect();
        clipped.push('…');
        clipped
    }
}

/// Why a config value did not parse. The `Display` text is the problem message shown
/// after the key, e.g. `invalid socket address "x" (use e.g. "0.0.0.0:11112")`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    #[error("invalid node id {value:?} (use 1 to 64 characters of A-Z a-z 0-9 . _ -)")]
    NodeId { value: String },
    #[error("unknown role {value:?} (use \"clinic\" or \"core\")")]
    Role { value: String },
    #[error("unknown mode {value:?} (use \"development\" or \"production\")")]
    Mode { value: String },
    #[error("invalid AE title {value:?}: {reason}")]
    AeTitle { value: String, reason: &'static str },
    #[error("invalid size {value:?} (use e.g. \"20GiB\" or a byte count)")]
    ByteSize { value: String },
    #[error("size {value:?} is too large (at most 2^64 - 1 bytes)")]
    ByteSizeOverflow { value: String },
    #[error(
        "invalid duration {value:?} (use a whole number and a unit: \"500ms\", \"30s\", \"5m\", \"1h\")"
    )]
    Duration { value: String },
    #[error("duration {value:?} is too large")]
    DurationOverflow { value: String },
    #[error(
        "unknown charset {value:?} (use \"auto\", \"iso-2022-jp\", \"shift_jis\" or \"utf-8\")"
    )]
    Charset { value: String },
    #[error("unknown key store backend {value:?} (use \"tpm\" or \"software\")")]
    KeystoreBackend { value: String },
    #[error(
        "invalid TCTI {value:?} (use \"device:PATH\", \"swtpm:host=H,port=P\", \"mssim:host=H,port=P\", \"tabrmd\" or \"tabrmd:CONF\")"
    )]
    Tcti { value: String },
    #[error("invalid uplink name {value:?} (use 1 to 32 characters of a-z 0-9 -)")]
    UplinkName { value: String },
    #[error("unknown uplink kind {value:?} (use \"dicomweb\", \"mllp-tls\" or \"syslog-tls\")")]
    UplinkKind { value: String },
    #[error(
        "invalid url {value:?} (must start with \"https://\", \"http://\", \"mllps://\", \"mllp://\" or \"syslog-tls://\" and name a host)"
    )]
    UplinkUrl { value: String },
    #[error("unknown client_auth {value:?} (use \"keystore\" or \"files\")")]
    ClientAuth { value: String },
    #[error(
        "invalid broker url {value:?} (must start with \"mqtts://\" or \"mqtt://\" and name a host)"
    )]
    BrokerUrl { value: String },
    /// The value is deliberately not repeated: it may hold a password.
    #[error("credentials in a url are not accepted (the device authenticates with its key)")]
    UrlCredentials,
    #[error("invalid socket address {value:?} (use e.g. \"0.0.0.0:11112\" or \"[::1]:11112\")")]
    SocketAddr { value: String },
    #[error("invalid IP address {value:?} (host must be an IP address literal, not a hostname)")]
    IpAddr { value: String },
    #[error("must not be empty")]
    EmptyPath,
    #[error(
        "invalid HL7 message type {value:?} (use CODE^EVENT such as \"ORU^R01\", or CODE alone such as \"ADT\": 3 upper-case letters or digits each)"
    )]
    Hl7MessageType { value: String },
}

/// Parses `host:port` (IPv6 in brackets). No name resolution happens here.
pub fn parse_socket_addr(value: &str) -> Result<SocketAddr, ValueError> {
    value
        .parse()
        .map_err(|_| ValueError::SocketAddr { value: clip(value) })
}

/// Parses an IP address literal; a hostname is refused because allow lists match the
/// peer's address, and resolving names at start would make them depend on DNS.
pub fn parse_ip_addr(value: &str) -> Result<IpAddr, ValueError> {
    value
        .parse()
        .map_err(|_| ValueError::IpAddr { value: clip(value) })
}

/// Parses a file path that must not be empty. Relative paths are kept as given.
pub fn parse_path(value: &str) -> Result<PathBuf, ValueError> {
    if value.is_empty() {
        Err(ValueError::EmptyPath)
    } else {
        Ok(PathBuf::from(value))
    }
}

/// Implements `FromStr` and `Display` for a fieldless enum spelled by fixed strings.
macro_rules! keyword_enum {
    ($(#[$meta:meta])* $name:ident, $err:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// The spelling used in the config file.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = ValueError;
            fn from_str(value: &str) -> Result<Self, ValueError> {
                match value {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(ValueError::$err { value: clip(value) }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keyword_enum!(
    /// `node.role`: which side of the regional booking exchange this box is.
    Role, Role {
        /// A referring clinic (the default).
        Clinic => "clinic",
        /// The regional core hospital.
        Core => "core",
    }
);

keyword_enum!(
    /// `node.mode`: production (the default) refuses insecure settings at start.
    Mode, Mode {
        /// Allows the software key store, plaintext uplinks and an open DICOM listener.
        Development => "development",
        /// Secure by default.
        Production => "production",
    }
);

impl Mode {
    /// Whether the production refusals apply.
    pub const fn is_production(self) -> bool {
        matches!(self, Self::Production)
    }
}

keyword_enum!(
    /// `hl7.charset`: how inbound HL7 v2 text is decoded.
    Charset, Charset {
        /// Use MSH-18 of each message.
        Auto => "auto",
        /// ISO-2022-JP (ISO IR 87 with escape sequences).
        Iso2022Jp => "iso-2022-jp",
        /// Shift_JIS.
        ShiftJis => "shift_jis",
        /// UTF-8.
        Utf8 => "utf-8",
        /// US-ASCII only.
        Ascii => "ascii",
    }
);

keyword_enum!(
    /// `keystore.backend`: where keys live.
    KeystoreBackend, KeystoreBackend {
        /// Keys in files under the data directory; development only.
        Software => "software",
        /// Keys in a TPM 2.0 (the default).
        Tpm => "tpm",
    }
);

keyword_enum!(
    /// `uplink.kind`: the protocol an uplink speaks.
    UplinkKind, UplinkKind {
        /// DICOMweb STOW-RS.
        DicomWeb => "dicomweb",
        /// HL7 v2 messages forwarded over MLLP in TLS (`mllps://host:port`).
        MllpTls => "mllp-tls",
        /// Audit messages to an audit repository: RFC 5424 syslog over TLS (RFC 5425,
        /// `syslog-tls://host[:port]`, port 6514 by default).
        SyslogTls => "syslog-tls",
    }
);

keyword_enum!(
    /// `uplink.client_auth`: which identity the uplink presents in its TLS handshake.
    ClientAuth, ClientAuth {
        /// The device identity key in the key store (the default).
        Keystore => "keystore",
        /// A PEM certificate and key from `cert_file` / `key_file`; development only.
        Files => "files",
    }
);

/// `node.id`: 1 to 64 characters of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeId(String);

impl NodeId {
    /// The id as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        if gateway_id::is_valid(value) {
            Ok(Self(value.to_owned()))
        } else {
            Err(ValueError::NodeId { value: clip(value) })
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A DICOM Application Entity title: 1 to 16 characters of printable ASCII other than
/// backslash, not only spaces. Leading and trailing spaces are insignificant in DICOM and
/// are trimmed off on parse.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AeTitle(String);

impl AeTitle {
    /// The title, trimmed.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AeTitle {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let fail = |reason| ValueError::AeTitle {
            value: clip(value),
            reason,
        };
        if !value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'\\')
        {
            return Err(fail("only printable ASCII other than backslash is allowed"));
        }
        let trimmed = value.trim_matches(' ');
        if trimmed.is_empty() {
            return Err(fail("must not be empty or only spaces"));
        }
        if trimmed.len() > 16 {
            return Err(fail("must be at most 16 characters"));
        }
        Ok(Self(trimmed.to_owned()))
    }
}

impl fmt::Display for AeTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An amount of bytes. Parses a plain byte count (`"1048576"`) or a whole number and a
/// unit with an optional space: `B`, `KB`/`MB`/`GB`/`TB` (powers of 1000) or
/// `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024); units are case-sensitive. Prints with the
/// largest binary unit that divides it exactly (`20GiB`), else in bytes (`1000B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

impl ByteSize {
    /// `n` bytes.
    pub const fn from_bytes(n: u64) -> Self {
        Self(n)
    }

    /// `n` KiB (saturating).
    pub const fn kib(n: u64) -> Self {
        Self(n.saturating_mul(1 << 10))
    }

    /// `n` MiB (saturating).
    pub const fn mib(n: u64) -> Self {
        Self(n.saturating_mul(1 << 20))
    }

    /// `n` GiB (saturating).
    pub const fn gib(n: u64) -> Self {
        Self(n.saturating_mul(1 << 30))
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

const SIZE_UNITS: [(&str, u64); 9] = [
    ("B", 1),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];

/// Splits `"20 GiB"` into `("20", "GiB")`: leading ASCII digits, then at most one space,
/// then the rest. `None` when there are no digits, or a space is not followed by a unit.
fn split_number_unit(value: &str) -> Option<(&str, &str)> {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, rest) = value.split_at(digits_end);
    if digits.is_empty() {
        return None;
    }
    let unit = match rest.strip_prefix(' ') {
        Some("") => return None,
        Some(unit) => unit,
        None => rest,
    };
    Some((digits, unit))
}

impl FromStr for ByteSize {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let invalid = || ValueError::ByteSize { value: clip(value) };
        let overflow = || ValueError::ByteSizeOverflow { value: clip(value) };
        let (digits, unit) = split_number_unit(value).ok_or_else(invalid)?;
        let multiplier = if unit.is_empty() {
            1
        } else {
            SIZE_UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, m)| *m)
                .ok_or_else(invalid)?
        };
        // Only digits remain, so the parse fails only on overflow.
        let number: u64 = digits.parse().map_err(|_| overflow())?;
        number
            .checked_mul(multiplier)
            .map(Self)
            .ok_or_else(overflow)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 != 0 && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A span of time written as a whole number and a unit: `ms`, `s`, `m` or `h`, with an
/// optional space (`"500ms"`, `"30s"`, `"5m"`, `"1h"`). A bare number is refused because
/// its unit would be a guess. Always a whole number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

impl Duration {
    /// `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    /// `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(std::time::Duration::from_millis(millis))
    }

    /// The span as a `std::time::Duration`.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    /// Whether the span is zero.
    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(value: Duration) -> Self {
        value.0
    }
}

impl FromStr for Duration {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let invalid = || ValueError::Duration { value: clip(value) };
        let overflow = || ValueError::DurationOverflow { value: clip(value) };
        let (digits, unit) = split_number_unit(value).ok_or_else(invalid)?;
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(invalid()),
        };
        let number: u64 = digits.parse().map_err(|_| overflow())?;
        number
            .checked_mul(millis_per_unit)
            .map(Self::from_millis)
            .ok_or_else(overflow)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000)] {
            if millis != 0 && millis.is_multiple_of(size) {
                return write!(f, "{}{unit}", millis / size);
            }
        }
        write!(f, "{millis}ms")
    }
}

/// `keystore.tcti`: how to reach the TPM, in the TCTI name-conf syntax tss-esapi accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Tcti {
    /// `device:PATH`, a TPM character device (normally the resource manager `/dev/tpmrm0`).
    Device(PathBuf),
    /// `swtpm:host=H,port=P`, a software TPM simulator over TCP.
    Swtpm { host: String, port: u16 },
    /// `mssim:host=H,port=P`, the Microsoft/IBM TPM simulator over TCP.
    Mssim { host: String, port: u16 },
    /// `tabrmd` or `tabrmd:CONF`, the D-Bus access broker and resource manager.
    Tabrmd(Option<String>),
}

impl Default for Tcti {
    fn default() -> Self {
        Self::Device(PathBuf::from("/dev/tpmrm0"))
    }
}

/// Parses `host=H,port=P` (in either order, each exactly once).
fn parse_host_port(params: &str) -> Option<(String, u16)> {
    let mut host = None;
    let mut port = None;
    for pair in params.split(',') {
        let (key, val) = pair.split_once('=')?;
        match key {
            "host" if host.is_none() && !val.is_empty() => host = Some(val.to_owned()),
            "port" if port.is_none() => port = Some(val.parse::<u16>().ok().filter(|p| *p != 0)?),
            _ => return None,
        }
    }
    Some((host?, port?))
}

impl FromStr for Tcti {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let invalid = || ValueError::Tcti { value: clip(value) };
        if value == "tabrmd" {
            return Ok(Self::Tabrmd(None));
        }
        let (name, conf) = value.split_once(':').ok_or_else(invalid)?;
        if conf.is_empty() {
            return Err(invalid());
        }
        match name {
            "device" => Ok(Self::Device(PathBuf::from(conf))),
            "tabrmd" => Ok(Self::Tabrmd(Some(conf.to_owned()))),
            "swtpm" => parse_host_port(conf)
                .map(|(host, port)| Self::Swtpm { host, port })
                .ok_or_else(invalid),
            "mssim" => parse_host_port(conf)
                .map(|(host, port)| Self::Mssim { host, port })
                .ok_or_else(invalid),
            _ => Err(invalid()),
        }
    }
}

impl fmt::Display for Tcti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device(path) => write!(f, "device:{}", path.display()),
            Self::Swtpm { host, port } => write!(f, "swtpm:host={host},port={port}"),
            Self::Mssim { host, port } => write!(f, "mssim:host={host},port={port}"),
            Self::Tabrmd(None) => f.write_str("tabrmd"),
            Self::Tabrmd(Some(conf)) => write!(f, "tabrmd:{conf}"),
        }
    }
}

/// `uplink.name`: 1 to 32 characters of `[a-z0-9-]`; used in metrics labels and spool
/// destinations, so it is kept short and plain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UplinkName(String);

impl UplinkName {
    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UplinkName {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let ok = (1..=32).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(ValueError::UplinkName { value: clip(value) })
        }
    }
}

impl fmt::Display for UplinkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `uplink.message_types` entry: an HL7 v2 message code (MSH-9.1) and, optionally, its
/// trigger event (MSH-9.2). `ORU^R01` takes that type only; `ADT` alone takes every event
/// of the code. Each part is 3 upper-case letters or digits. Displayed as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hl7MessageType(String);

impl Hl7MessageType {
    /// The entry as written, e.g. `ORU^R01` or `ADT`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Hl7MessageType {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let part = |p: &str| {
            p.len() == 3
                && p.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        };
        let mut parts = value.split('^');
        let ok = parts.next().is_some_and(part)
            && parts.next().is_none_or(part)
            && parts.next().is_none();
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(ValueError::Hl7MessageType { value: clip(value) })
        }
    }
}

impl fmt::Display for Hl7MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks `value` starts with one of `schemes`, names a host, and carries no
/// `user:password@`. Returns whether the matched scheme is the first (secure) one.
fn check_url(
    value: &str,
    secure: &str,
    plain: &str,
    invalid: impl Fn() -> ValueError,
) -> Result<bool, ValueError> {
    let (is_secure, rest) = if let Some(rest) = value.strip_prefix(secure) {
        (true, rest)
    } else if let Some(rest) = value.strip_prefix(plain) {
        (false, rest)
    } else {
        return Err(invalid());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(ValueError::UrlCredentials);
    }
    if authority.is_empty() || value.chars().any(char::is_whitespace) {
        return Err(invalid());
    }
    Ok(is_secure)
}

/// `uplink.url`: an `https://` or `http://` URL naming a host (DICOMweb), or
/// `mllps://host:port` / `mllp://host:port` (HL7 over MLLP). Kept as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UplinkUrl(String);

impl UplinkUrl {
    /// The URL as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the URL is plaintext `http://` or `mllp://`.
    pub fn is_plaintext(&self) -> bool {
        self.0.starts_with("http://") || self.0.starts_with("mllp://")
    }

    /// Whether the URL is `syslog-tls://`.
    pub fn is_syslog(&self) -> bool {
        self.0.starts_with("syslog-tls://")
    }

    /// `host` and `port` of a `syslog-tls://host[:port]` URL (port 6514, RFC 5425, when
    /// absent); `None` for other URLs or a port that is not a number.
    pub fn syslog_host_port(&self) -> Option<(String, u16)> {
        let rest = self.0.strip_prefix("syslog-tls://")?;
        let authority = rest.split(['/', '?', '#']).next()?;
        let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
            (authority, 6514)
        } else {
            let (host, port) = authority.rsplit_once(':')?;
            (host, port.parse().ok().filter(|p| *p != 0)?)
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then(|| (host.to_string(), port))
    }

    /// Whether the URL is `mllps://` or `mllp://`.
    pub fn is_mllp(&self) -> bool {
        self.0.starts_with("mllps://") || self.0.starts_with("mllp://")
    }

    /// Whether the URL asks for TLS (`https://`, `mllps://`).
    pub fn is_tls(&self) -> bool {
        !self.is_plaintext()
    }

    /// `host` and `port` of an `mllp(s)://host:port` URL (None without an explicit port).
    pub fn host_port(&self) -> Option<(String, u16)> {
        let rest = self
            .0
            .strip_prefix("mllps://")
            .or_else(|| self.0.strip_prefix("mllp://"))?;
        let authority = rest.split(['/', '?', '#']).next()?;
        let (host, port) = authority.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse().ok()?;
        (!host.is_empty()).then(|| (host.to_string(), port))
    }
}

impl FromStr for UplinkUrl {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let invalid = || ValueError::UplinkUrl { value: clip(value) };
        if value.starts_with("syslog") {
            // TLS only: there is no plaintext syslog uplink.
            if !check_url(value, "syslog-tls://", "syslog-tls://", invalid)? {
                return Err(invalid());
            }
        } else if value.starts_with("mllp") {
            check_url(value, "mllps://", "mllp://", invalid)?;
        } else {
            check_url(value, "https://", "http://", invalid)?;
        }
        Ok(Self(value.to_owned()))
    }
}

impl fmt::Display for UplinkUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `fleet.broker`: an `mqtts://` or `mqtt://` URL naming a host (and usually a port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    /// The URL as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the URL is plaintext `mqtt://`.
    pub fn is_plaintext(&self) -> bool {
        self.0.starts_with("mqtt://")
    }

    /// Host and port; the port defaults to 8883 (`mqtts://`) or 1883 (`mqtt://`).
    /// `None` when the authority has no host or a port that is not a number.
    pub fn host_port(&self) -> Option<(String, u16)> {
        let (rest, default_port) = match self.0.strip_prefix("mqtts://") {
            Some(rest) => (rest, 8883),
            None => (self.0.strip_prefix("mqtt://")?, 1883),
        };
        let authority = rest.split(['/', '?', '#']).next()?;
        let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
            (authority, default_port)
        } else {
            let (host, port) = authority.rsplit_once(':')?;
            (host, port.parse().ok().filter(|p| *p != 0)?)
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then(|| (host.to_string(), port))
    }
}

impl FromStr for BrokerUrl {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        check_url(value, "mqtts://", "mqtt://", || ValueError::BrokerUrl {
            value: clip(value),
        })?;
        Ok(Self(value.to_owned()))
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    /// Asserts each accepted input parses and prints back to `shown`, and each rejected
    /// input fails with a message that quotes it.
    fn check_table<T>(accept: &[(&str, &str)], reject: &[&str])
    where
        T: FromStr<Err = ValueError> + fmt::Display + fmt::Debug + PartialEq,
    {
        for (input, shown) in accept {
            let parsed: T = input
                .parse()
                .unwrap_or_else(|e| panic!("{input:?} should parse: {e}"));
            assert_eq!(parsed.to_string(), *shown, "display of {input:?}");
            let again: T = parsed.to_string().parse().unwrap();
            assert_eq!(again, parsed, "round trip of {input:?}");
        }
        for input in reject {
            let err = input
                .parse::<T>()
                .err()
                .unwrap_or_else(|| panic!("{input:?} should be rejected"));
            let quoted = format!("{:?}", clip(input));
            assert!(
                err.to_string().contains(&quoted),
                "message for {input:?} should quote it: {err}"
            );
        }
    }

    #[test]
    fn node_id_accepts_1_to_64_of_alnum_dot_underscore_dash() {
        let long = "a".repeat(64);
        check_table::<NodeId>(
            &[
                ("clinic-001", "clinic-001"),
                ("A.b_C-9", "A.b_C-9"),
                ("x", "x"),
                (&long, &long),
            ],
            &[
                "",
                "clinic 001",
                "clinic/001",
                "クリニック",
                &"a".repeat(65),
                "a:b",
            ],
        );
    }

    #[test]
    fn role_mode_and_charset_accept_only_their_spellings() {
        check_table::<Role>(
            &[("clinic", "clinic"), ("core", "core")],
            &["Clinic", "", "hub"],
        );
        check_table::<Mode>(
            &[("development", "development"), ("production", "production")],
            &["dev", "prod", "Production", ""],
        );
        check_table::<Charset>(
            &[
                ("auto", "auto"),
                ("iso-2022-jp", "iso-2022-jp"),
                ("shift_jis", "shift_jis"),
                ("utf-8", "utf-8"),
            ],
            &["utf8", "sjis", "ISO-2022-JP", ""],
        );
        check_table::<KeystoreBackend>(
            &[("tpm", "tpm"), ("software", "software")],
            &["soft", "TPM"],
        );
        check_table::<UplinkKind>(&[("dicomweb", "dicomweb")], &["stow", "DICOMweb"]);
        check_table::<ClientAuth>(
            &[("keystore", "keystore"), ("files", "files")],
            &["file", ""],
        );
    }

    #[test]
    fn ae_title_is_trimmed_printable_ascii_up_to_16() {
        check_table::<AeTitle>(
            &[
                ("GATEWAY", "GATEWAY"),
                ("  CT01 ", "CT01"),
                ("A B", "A B"),
                ("ABCDEFGHIJKLMNOP", "ABCDEFGHIJKLMNOP"),
                (" ABCDEFGHIJKLMNOP ", "ABCDEFGHIJKLMNOP"),
                ("x!~", "x!~"),
            ],
            &[
                "",
                "   ",
                "ABCDEFGHIJKLMNOPQ",
                "CT\\01",
                "CT\t01",
                "CTé",
                "CT\n",
            ],
        );
    }

    #[test]
    fn byte_size_parses_counts_and_units_and_prints_binary_units() {
        check_table::<ByteSize>(
            &[
                ("0", "0B"),
                ("1048576", "1MiB"),
                ("1000", "1000B"),
                ("512B", "512B"),
                ("1KB", "1000B"),
                ("2 MB", "2000000B"),
                ("1GB", "1000000000B"),
                ("1TB", "976562500KiB"),
                ("256KiB", "256KiB"),
                ("16MiB", "16MiB"),
                ("20GiB", "20GiB"),
                ("20 GiB", "20GiB"),
                ("1024GiB", "1TiB"),
                ("3TiB", "3TiB"),
                ("1536KiB", "1536KiB"),
            ],
            &[
                "",
                "GiB",
                "20 gigs",
                "20gib",
                "20GIB",
                "1.5GiB",
                "-1",
                "20  GiB",
                "20 ",
                " 20",
                "20GiB ",
                "99999999999999999999",
                "16777216TiB",
                "1e9",
            ],
        );
    }

    #[test]
    fn byte_size_overflow_says_too_large() {
        let err = "16777216TiB".parse::<ByteSize>().unwrap_err();
        assert!(matches!(err, ValueError::ByteSizeOverflow { .. }), "{err}");
        let max = "18446744073709551615".parse::<ByteSize>().unwrap();
        assert_eq!(max.bytes(), u64::MAX);
        assert_eq!(ByteSize::gib(20).to_string(), "20GiB");
    }

    #[test]
    fn duration_parses_ms_s_m_h_and_refuses_bare_numbers() {
        check_table::<Duration>(
            &[
                ("500ms", "500ms"),
                ("1500ms", "1500ms"),
                ("1000ms", "1s"),
                ("30s", "30s"),
                ("30 s", "30s"),
                ("300s", "5m"),
                ("5m", "5m"),
                ("90m", "90m"),
                ("1h", "1h"),
                ("0s", "0ms"),
            ],
            &[
                "",
                "30",
                "s",
                "1.5s",
                "30sec",
                "30S",
                "-1s",
                "1d",
                "1h30m",
                "99999999999999999999h",
            ],
        );
        assert_eq!(
            "5m".parse::<Duration>().unwrap().get(),
            std::time::Duration::from_secs(300)
        );
        let err = "18446744073709551615h".parse::<Duration>().unwrap_err();
        assert!(matches!(err, ValueError::DurationOverflow { .. }), "{err}");
    }

    #[test]
    fn tcti_accepts_device_swtpm_mssim_tabrmd() {
        check_table::<Tcti>(
            &[
                ("device:/dev/tpmrm0", "device:/dev/tpmrm0"),
                (
                    "swtpm:host=127.0.0.1,port=2321",
                    "swtpm:host=127.0.0.1,port=2321",
                ),
                (
                    "swtpm:port=2321,host=localhost",
                    "swtpm:host=localhost,port=2321",
                ),
                (
                    "mssim:host=10.0.0.5,port=2321",
                    "mssim:host=10.0.0.5,port=2321",
                ),
                ("tabrmd", "tabrmd"),
                ("tabrmd:bus_type=session", "tabrmd:bus_type=session"),
            ],
            &[
                "",
                "device:",
                "device",
                "/dev/tpmrm0",
                "swtpm:",
                "swtpm:host=127.0.0.1",
                "swtpm:port=2321",
                "swtpm:host=,port=2321",
                "swtpm:host=a,port=99999",
                "swtpm:host=a,port=0",
                "swtpm:host=a,port=1,host=b",
                "swtpm:host=a,port=1,extra=2",
                "tabrmd:",
                "libtpms:x",
            ],
        );
        assert_eq!(Tcti::default().to_string(), "device:/dev/tpmrm0");
    }

    #[test]
    fn tcti_error_lists_the_accepted_forms() {
        let msg = "tpm0".parse::<Tcti>().unwrap_err().to_string();
        for form in [
            "device:PATH",
            "swtpm:host=H,port=P",
            "mssim:host=H,port=P",
            "tabrmd",
        ] {
            assert!(msg.contains(form), "{msg}");
        }
    }

    #[test]
    fn uplink_name_is_lowercase_alnum_dash_up_to_32() {
        check_table::<UplinkName>(
            &[
                ("cloud-archive", "cloud-archive"),
                ("a", "a"),
                ("x1-2", "x1-2"),
            ],
            &[
                "",
                "Cloud",
                "cloud_archive",
                "cloud archive",
                &"a".repeat(33),
            ],
        );
    }

    #[test]
    fn hl7_message_type_is_code_caret_event_or_code_alone() {
        check_table::<Hl7MessageType>(
            &[
                ("ORU^R01", "ORU^R01"),
                ("DFT^P03", "DFT^P03"),
                ("ADT", "ADT"),
                ("Z01^Z99", "Z01^Z99"),
            ],
            &[
                "",
                "oru^r01",
                "ORU^R1",
                "ORUX^R01",
                "ORU^",
                "^R01",
                "ORU^R01^ORU_R01",
                " ORU^R01",
                "ORU^R01 ",
                "ORU R01",
                "ÖRU^R01",
            ],
        );
    }

    #[test]
    fn uplink_url_needs_http_or_https_and_a_host() {
        check_table::<UplinkUrl>(
            &[
                (
                    "https://dc.example.jp/dicom-web",
                    "https://dc.example.jp/dicom-web",
                ),
                (
                    "http://127.0.0.1:8042/dicom-web",
                    "http://127.0.0.1:8042/dicom-web",
                ),
            ],
            &[
                "",
                "ftp://x",
                "https://",
                "https:///path",
                "dc.example.jp",
                "HTTPS://x",
                "https://a b",
            ],
        );
        assert!(!"https://x".parse::<UplinkUrl>().unwrap().is_plaintext());
        assert!("http://x".parse::<UplinkUrl>().unwrap().is_plaintext());
        let mllp: UplinkUrl = "mllps://ris.example.jp:2576".parse().unwrap();
        assert!(mllp.is_mllp() && mllp.is_tls());
        assert_eq!(mllp.host_port(), Some(("ris.example.jp".into(), 2576)));
        let plain: UplinkUrl = "mllp://[::1]:2575".parse().unwrap();
        assert!(plain.is_plaintext());
        assert_eq!(plain.host_port(), Some(("::1".into(), 2575)));
        assert_eq!(
            "mllps://ris".parse::<UplinkUrl>().unwrap().host_port(),
            None
        );
        assert!("mllpx://ris:1".parse::<UplinkUrl>().is_err());
    }

    #[test]
    fn url_with_credentials_is_refused_without_echoing_them() {
        let err = "https://user:s3cret@dc.example.jp/"
            .parse::<UplinkUrl>()
            .unwrap_err();
        assert_eq!(err, ValueError::UrlCredentials);
        assert!(!err.to_string().contains("s3cret"));
        let err = "mqtts://u:s3cret@broker:8883"
            .parse::<BrokerUrl>()
            .unwrap_err();
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn broker_url_needs_mqtts_or_mqtt_and_a_host() {
        check_table::<BrokerUrl>(
            &[
                (
                    "mqtts://fleet.example.jp:8883",
                    "mqtts://fleet.example.jp:8883",
                ),
                ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883"),
            ],
            &[
                "",
                "https://fleet.example.jp",
                "mqtts://",
                "fleet.example.jp:8883",
            ],
        );
        assert!("mqtt://x".parse::<BrokerUrl>().unwrap().is_plaintext());
        assert!(!"mqtts://x".parse::<BrokerUrl>().unwrap().is_plaintext());
    }

    #[test]
    fn broker_host_port_defaults_by_scheme() {
        let cases = [
            (
                "mqtts://fleet.example.jp:8884",
                Some(("fleet.example.jp", 8884)),
            ),
            ("mqtts://fleet.example.jp", Some(("fleet.example.jp", 8883))),
            ("mqtt://127.0.0.1:1884/", Some(("127.0.0.1", 1884))),
            ("mqtt://[::1]", Some(("::1", 1883))),
            ("mqtt://[::1]:2000", Some(("::1", 2000))),
            ("mqtts://h:0", None),
            ("mqtts://h:x", None),
        ];
        for (url, want) in cases {
            let got = BrokerUrl(url.to_owned()).host_port();
            assert_eq!(got, want.map(|(h, p)| (h.to_owned(), p)), "{url}");
        }
    }

    #[test]
    fn socket_and_ip_addresses_parse_literals_only() {
        assert_eq!(
            parse_socket_addr("0.0.0.0:11112").unwrap().to_string(),
            "0.0.0.0:11112"
        );
        assert!(parse_socket_addr("[::1]:2575").unwrap().ip().is_loopback());
        for bad in ["x", "localhost:11112", "0.0.0.0", ":11112", "0.0.0.0:99999"] {
            let msg = parse_socket_addr(bad).unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("invalid socket address {bad:?}")),
                "{msg}"
            );
        }
        assert_eq!(
            parse_ip_addr("192.168.10.21").unwrap().to_string(),
            "192.168.10.21"
        );
        assert!(parse_ip_addr("fe80::1").is_ok());
        let msg = parse_ip_addr("ct01.local").unwrap_err().to_string();
        assert!(
            msg.contains("\"ct01.local\"") && msg.contains("not a hostname"),
            "{msg}"
        );
    }

    #[test]
    fn long_values_are_clipped_in_messages() {
        let long = "x".repeat(10_000);
        let msg = long.parse::<NodeId>().unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
        assert!(msg.contains('…'));
    }
}
