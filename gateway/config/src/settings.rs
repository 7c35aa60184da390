//! Typed settings, built once from the raw schema.
//!
//! [`Settings::from_toml_str`] runs two passes. The serde pass (`raw`) stops at
//! the first structural problem (syntax, unknown key, wrong type, missing key). The
//! semantic pass below parses every field into its newtype, applies defaults, checks the
//! cross-field rules and the production refusals, and collects **every** problem before
//! returning, so an operator fixes a file in one round.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use crate::error::{ConfigErrors, Problem};
use crate::raw;
use gateway_schedule::{Schedule, ScheduleSpec};

use crate::types::{
    AeTitle, BrokerUrl, ByteSize, Charset, ClientAuth, Duration, Hl7MessageType, KeystoreBackend,
    Mode, NodeId, Role, Tcti, UplinkKind, UplinkName, UplinkUrl, ValueError, parse_ip_addr,
    parse_path, parse_socket_addr,
};

/// The text of `config/gatewayd.dev.toml`, the development default compiled into the binary.
pub const EMBEDDED_DEFAULT_TOML: &str = include_str!("../../../config/gatewayd.dev.toml");

/// Defaults applied when a key is omitted.
pub mod defaults {
    use super::*;

    pub const ROLE: Role = Role::Clinic;
    /// Secure by default: a file that does not say `development` gets the refusals.
    pub const MODE: Mode = Mode::Production;
    pub const DICOM_LISTEN: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 11112));
    pub const DICOM_AE_TITLE: &str = "GATEWAY";
    pub const DICOM_MAX_ASSOCIATIONS: u32 = 32;
    pub const DICOM_MAX_ASSOCIATIONS_PER_PEER: u32 = 8;
    pub const DICOM_MAX_PDU_LENGTH: ByteSize = ByteSize::kib(256);
    /// The smallest `dicom.max_pdu_length` accepted.
    pub const DICOM_MIN_PDU_LENGTH: ByteSize = ByteSize::from_bytes(4096);
    /// The largest `dicom.max_pdu_length` accepted.
    pub const DICOM_MAX_PDU_LENGTH_LIMIT: ByteSize = ByteSize::mib(16);
    pub const DICOM_ARTIM_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DICOM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    pub const DICOM_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    pub const HL7_LISTEN: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 2575));
    pub const HL7_CHARSET: Charset = Charset::Auto;
    pub const SPOOL_MAX_BYTES: ByteSize = ByteSize::gib(20);
    pub const SPOOL_MIN_FREE_BYTES: ByteSize = ByteSize::gib(1);
    /// `spool.index_cache_bytes`: the appliance has 1 GiB of RAM and runs for years.
    pub const SPOOL_INDEX_CACHE_BYTES: ByteSize = ByteSize::mib(8);
    /// `spool.dedupe_window`: a week of resends deduplicated.
    pub const SPOOL_DEDUPE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
    pub const KEYSTORE_BACKEND: KeystoreBackend = KeystoreBackend::Tpm;
    /// `keystore.tcti` default; see also `Tcti::default()`.
    pub const KEYSTORE_TCTI: &str = "device:/dev/tpmrm0";
    pub const UPLINK_KIND: UplinkKind = UplinkKind::DicomWeb;
    pub const UPLINK_CLIENT_AUTH: ClientAuth = ClientAuth::Keystore;
    pub const FLEET_TELEMETRY_INTERVAL: Duration = Duration::from_secs(60);
    /// The longest `fleet.telemetry_interval` accepted.
    pub const FLEET_TELEMETRY_INTERVAL_MAX: Duration = Duration::from_secs(24 * 3600);
    pub const ADMIN_LISTEN: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));
    pub const BOOKING_LISTEN: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8443));
    pub const BOOKING_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    pub const BOOKING_STALE_AFTER: Duration = Duration::from_secs(180);
    pub const BOOKING_PUBLISH_INTERVAL: Duration = Duration::from_secs(60);
    pub const RESULTS_COMPLETE_AFTER: Duration = Duration::from_secs(600);
}

/// The whole configuration. A service runs iff its section is present (`Some`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub node: Node,
    pub dicom: Option<Dicom>,
    pub hl7: Option<Hl7>,
    pub spool: Spool,
    pub keystore: Keystore,
    pub uplinks: Vec<Uplink>,
    pub fleet: Option<Fleet>,
    pub admin: Option<Admin>,
    pub booking: Option<Booking>,
    pub exchange: Option<Exchange>,
    pub results: Option<Results>,
    pub identity: Option<Identity>,
    pub safety: Option<Safety>,
    /// `[update]` (defaults when the section is absent).
    pub update: Update,
}

/// `[update]`: signed A/B firmware updates (the fleet `update` command).
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The largest bundle this box downloads (1 MiB..=16 GiB, default 1 GiB); a command
    /// with a larger `size` is refused `bad-args`.
    pub max_bundle_bytes: ByteSize,
    /// The trial boot's health check bound (10s..=1h, default 300s).
    pub health_timeout: Duration,
    /// The whole download's bound, every resume included (1m..=24h, default 1h).
    pub download_deadline: Duration,
    /// Bandwidth limit of the download (at least 1 KiB; default none).
    pub max_bytes_per_sec: Option<ByteSize>,
    /// Trust anchors (PEM) of the bundle server; `None`: `fleet.ca_file`.
    pub ca_file: Option<PathBuf>,
    /// The file whose creation asks the system to reboot (default `/run/gatewayd/reboot`).
    pub reboot_request_file: PathBuf,
    /// The `rauc` command (default `rauc`, found on PATH).
    pub rauc_command: PathBuf,
}

/// `[safety]`: on the core (needs `[identity]`): contrast reactions and cumulative CT dose
/// across linked hospitals, shown before a booking; on a clinic (needs `[exchange]`): the CT
/// dose reports it receives are carried to the core.
#[derive(Debug, Clone, PartialEq)]
pub struct Safety {
    /// The cumulative dose window in days (default 365; at most 36500, a lifetime).
    pub dose_window_days: u32,
    /// Warn when the window's total DLP (mGy·cm, scanner output) passes this; `None`: the
    /// total is shown with each CT booking but never warned about.
    pub dlp_threshold_mgy_cm: Option<f64>,
}

/// `[identity]`: the core's patient identity registry (名寄せ) and consent (公開同意).
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The id the core's own records (its RIS, its own ADT) carry in the registry, and the
    /// requester id of its kiosk (default: `node.id`).
    pub hospital_id: String,
    /// A matcher model (JSON, `gatewayd identity learn --out`); `None`: the built-in one.
    pub model: Option<PathBuf>,
}

/// `[results]`: results returned to the referring clinic.
#[derive(Debug, Clone, PartialEq)]
pub struct Results {
    /// A `kind = "dicomweb"` uplink: on a clinic, the archive results are pulled from (with
    /// that uplink's URL and identity); on the core, the archive whose confirmation of an
    /// instance releases a notice to the booking clinic.
    pub source: UplinkName,
    /// Clinic: delivered objects and reports carry the clinic's Patient ID (IHE IRWF).
    pub rewrite_patient_id: bool,
    /// Clinic: the Issuer of Patient ID written with the clinic's Patient ID (default: the
    /// node id).
    pub patient_id_issuer: String,
    /// Core: a study is announced complete after this long without a new instance.
    pub complete_after: Duration,
    /// Clinic: where returned results go.
    pub deliver: Vec<Deliver>,
}

/// `[[results.deliver]]`: one destination of returned results at the clinic.
#[derive(Debug, Clone, PartialEq)]
pub enum Deliver {
    /// `kind = "dicom"`: C-STORE to the clinic's PACS or viewer.
    Dicom {
        name: UplinkName,
        host: String,
        port: u16,
        called_ae: AeTitle,
        calling_ae: AeTitle,
        /// `tls_ca_file` set: DICOM over TLS, the PACS verified against that CA.
        tls: Option<DeliverTls>,
    },
    /// `kind = "hl7"`: reports through a `kind = "mllp-tls"` uplink (the EMR).
    Hl7 {
        name: UplinkName,
        uplink: UplinkName,
    },
}

impl Deliver {
    pub fn name(&self) -> &UplinkName {
        match self {
            Self::Dicom { name, .. } | Self::Hl7 { name, .. } => name,
        }
    }
}

/// `[[results.deliver]] kind = "dicom"` over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverTls {
    /// `tls_ca_file`: the PACS's certificate must chain to this CA (PEM).
    pub ca_file: PathBuf,
    /// `tls_cert_file` + `tls_key_file`; `None`: the device identity (key store) with its
    /// installed certificate.
    pub files: Option<TlsFiles>,
}

/// A certificate chain and its private key, PEM files (`tls_cert_file` + `tls_key_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `[dicom] tls_listen` and its keys: DICOM over TLS on its own port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DicomTls {
    pub listen: SocketAddr,
    /// `tls_cert_file` + `tls_key_file`; `None`: the device identity (key store) with its
    /// installed certificate.
    pub files: Option<TlsFiles>,
    /// `tls_client_ca_file`: clients must present a certificate issued by this CA (PEM).
    pub client_ca_file: Option<PathBuf>,
}

/// `[node]`: who this box is.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: NodeId,
    pub role: Role,
    /// Where the spool and key files live; a relative path is relative to the working
    /// directory and kept as written.
    pub data_dir: PathBuf,
    pub mode: Mode,
}

/// `[dicom]`: the DIMSE listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Dicom {
    pub listen: SocketAddr,
    pub ae_title: AeTitle,
    /// Concurrent associations in total; at least 1.
    pub max_associations: u32,
    /// Concurrent associations per peer (calling AE title + IP); 1..=`max_associations`.
    pub max_associations_per_peer: u32,
    /// Within 4096 bytes..=16MiB.
    pub max_pdu_length: ByteSize,
    pub artim_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// When non-empty, only these peers may associate.
    pub peers: Vec<DicomPeer>,
    /// The TLS listener (`tls_listen`), same policy and limits as the plain one.
    pub tls: Option<DicomTls>,
}

/// `[[dicom.peers]]`: one allowed calling AE title at one address.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomPeer {
    pub ae_title: AeTitle,
    pub host: IpAddr,
    /// Overrides `dicom.max_associations_per_peer` for this peer.
    pub max_associations: Option<u32>,
    /// `tls_client_name`: the entry matches only a TLS association whose verified client
    /// certificate carries this name (DNS SAN or subject CN).
    pub tls_client_name: Option<String>,
}

/// `[hl7]`: the MLLP listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Hl7 {
    pub listen: SocketAddr,
    pub charset: Charset,
    /// Largest MLLP frame accepted (default 1 MiB).
    pub max_frame_bytes: ByteSize,
    /// An MLLP connection with nothing received for this long is closed (default 600 s).
    pub idle_timeout: Duration,
    /// MLLP connections open at once (default 32).
    pub max_connections: u32,
    /// MLLP in TLS: the listener's certificate chain and key (PEM), both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// With TLS: clients must present a certificate issued by this CA (PEM).
    pub tls_client_ca_file: Option<PathBuf>,
    /// When non-empty, only messages from these senders are accepted (others get AR).
    pub peers: Vec<Hl7Peer>,
}

/// `[[hl7.peers]]`: one allowed HL7 sender. A message is allowed when every key the entry
/// sets matches; an entry sets `host` or `tls_client_name` (or both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hl7Peer {
    /// The connection's source address.
    pub host: Option<IpAddr>,
    /// MSH-3's namespace id (its first component), compared exactly; `None`: any.
    pub sending_application: Option<String>,
    /// MSH-4's namespace id (its first component), compared exactly; `None`: any.
    pub sending_facility: Option<String>,
    /// A name (DNS subject alternative name or subject CN) of the client certificate
    /// verified by the TLS listener against `hl7.tls_client_ca_file`.
    pub tls_client_name: Option<String>,
}

/// `[spool]`: the durable store's limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Spool {
    pub max_bytes: ByteSize,
    /// Below this much free disk space, new objects are refused in protocol terms.
    pub min_free_bytes: ByteSize,
    /// How long a blob every destination has confirmed stays as a local cache (0: deleted
    /// at once). Cached blobs are the first to go under disk pressure.
    pub keep_sent_for: Duration,
    /// At most this much of the index (sled's page cache) is held in memory.
    pub index_cache_bytes: ByteSize,
    /// How long the record of an object every destination confirmed stays in the index
    /// after its blob is gone: a resend inside the window is deduplicated, one after it is
    /// stored again.
    pub dedupe_window: Duration,
}

impl Default for Spool {
    fn default() -> Self {
        Self {
            max_bytes: defaults::SPOOL_MAX_BYTES,
            min_free_bytes: defaults::SPOOL_MIN_FREE_BYTES,
            keep_sent_for: Duration::from_secs(0),
            index_cache_bytes: defaults::SPOOL_INDEX_CACHE_BYTES,
            dedupe_window: defaults::SPOOL_DEDUPE_WINDOW,
        }
    }
}

/// `[keystore]`: where keys live.
#[derive(Debug, Clone, PartialEq)]
pub struct Keystore {
    pub backend: KeystoreBackend,
    /// Used by the `tpm` backend only.
    pub tcti: Tcti,
    /// PCRs (SHA-256 bank, 0..=23, no duplicates) the spool master key is sealed to at
    /// `keys init`; empty: no PCR policy.
    pub pcrs: Vec<u8>,
    /// Production mode refuses a software TPM (swtpm) unless this is set; every start with
    /// it set logs a warning.
    pub allow_software_tpm: bool,
}

impl Default for Keystore {
    fn default() -> Self {
        Self {
            backend: defaults::KEYSTORE_BACKEND,
            tcti: Tcti::default(),
            pcrs: Vec::new(),
            allow_software_tpm: false,
        }
    }
}

/// `[[uplink]]`: one upload destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Uplink {
    /// Unique across uplinks.
    pub name: UplinkName,
    pub kind: UplinkKind,
    pub url: UplinkUrl,
    /// Trust anchors (PEM) the server is verified against; required for `https://`
    /// (the platform roots are never trusted implicitly).
    pub ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// Both `Some` iff `client_auth` is `Files`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Bandwidth limit for uploads to this destination.
    pub max_bytes_per_sec: Option<ByteSize>,
    /// Instances per STOW-RS request (1..=1000, default 16); one request holds one study.
    pub batch_max_instances: u32,
    /// Requests in flight at once to this destination (1..=16, default 2).
    pub max_concurrent_requests: u32,
    /// `kind = "mllp-tls"` only: the HL7 message types queued for this destination
    /// (`None`: every type). Never empty, no duplicates.
    pub message_types: Option<Vec<Hl7MessageType>>,
    /// `kind = "dicomweb"` only: the PS3.15 Annex E profile applied as objects leave
    /// (`deidentify = "basic"`); `None` for `"none"` (objects go as stored).
    pub deidentify: Option<Deidentify>,
    /// `kind = "syslog-tls"` only (`Some`, 1..=10 000 000, default 100 000): audit messages
    /// queued for this repository at most; newer ones are not queued while it is full
    /// (counted in `gateway_audit_export_dropped_total`). `None` for other kinds.
    pub max_queued: Option<u64>,
}

/// `uplink.deidentify = "basic"` with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deidentify {
    /// `deidentify_options`: options of PS3.15 Table E.1-1 (each once; the two date
    /// options exclude each other; `retain_safe_private` is refused).
    pub options: Vec<gateway_deid::ProfileOption>,
    /// `deidentify_burned_in = "send"`: objects that may carry identity in their pixels are
    /// sent (de-identified) instead of held as dead letters (`"hold"`, the default).
    pub send_burned_in: bool,
}

/// `[fleet]`: remote management by the vendor.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    pub broker: BrokerUrl,
    /// The key every remote command must be signed with.
    pub vendor_public_key: PathBuf,
    /// Trust anchors (PEM) the broker is verified against; required for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// How the gateway authenticates to the broker (default: the key store's identity).
    pub client_auth: ClientAuth,
    /// Both `Some` iff `client_auth` is `Files` (development only).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The factory claim credential (certificate and key, PEM), both or neither: while the
    /// gateway has no provisioned device id it connects with it, publishes a CSR made by its
    /// identity key and waits for the vendor's signed certificate; then deletes both files.
    pub claim: Option<Claim>,
    /// How often telemetry is published (1s..=24h, default 60s).
    pub telemetry_interval: Duration,
}

/// `fleet.claim_cert_file` / `fleet.claim_key_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `[admin]`: `/healthz` and `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub listen: SocketAddr,
}

/// `[booking]`: the kiosk's HTTPS endpoint and, on the core, the scanners' schedules.
#[derive(Debug, Clone, PartialEq)]
pub struct Booking {
    pub listen: SocketAddr,
    /// The kiosk's TLS certificate chain and key (PEM), both or neither; without them (in
    /// development only) a self-signed certificate is made at first start.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Clinic: the core gateway's id (an `[[exchange.peers]]` entry).
    pub core: Option<String>,
    /// Clinic: how long a booking waits for the core's decision before it is refused.
    pub request_timeout: Duration,
    /// Clinic: cached slots older than this are served marked stale.
    pub stale_after: Duration,
    /// Core: how often the free slots are republished (they also are on every change).
    pub publish_interval: Duration,
    /// `[[booking.schedule]]`, parsed (core): the schedules the booking service books from.
    pub schedules: Vec<Schedule>,
}

/// `[exchange]`: the regional MQTT broker the clinic and core gateways book through.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub broker: BrokerUrl,
    pub ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The other gateways: id and X25519 public key (base64, `gatewayd keys exchange-public`).
    pub peers: Vec<Peer>,
}

/// `[[exchange.peers]]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    pub public_key: String,
}

impl Settings {
    /// Parses and checks a whole config file's text.
    pub fn from_toml_str(text: &str) -> Result<Settings, ConfigErrors> {
        let raw = raw::parse(text).map_err(ConfigErrors::one)?;
        let mut c = Collector::default();
        let settings = build(&mut c, raw);
        match settings {
            Some(settings) if c.problems.is_empty() => Ok(settings),
            _ => Err(ConfigErrors {
                problems: c.problems,
            }),
        }
    }

    /// Reads and parses the file at `path`. A read failure is one problem keyed `config`
    /// naming the path.
    pub fn load(path: &Path) -> Result<Settings, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::one(Problem::new(
                "config",
                format!("cannot read {:?}: {e}", path.display().to_string()),
            ))
        })?;
        Self::from_toml_str(&text)
    }

    /// The development default compiled in from `config/gatewayd.dev.toml`.
    #[allow(
        clippy::expect_used,
        reason = "the embedded text is a compile-time constant; a unit test proves it parses"
    )]
    pub fn embedded_default() -> Settings {
        // Invariant: EMBEDDED_DEFAULT_TOML is valid (unit test
        // `embedded_default_parses` and the config_dir integration test prove it).
        Self::from_toml_str(EMBEDDED_DEFAULT_TOML)
            .expect("config/gatewayd.dev.toml is valid (checked by tests)")
    }
}

/// Collects problems while the semantic pass goes on.
#[derive(Default)]
struct Collector {
    problems: Vec<Problem>,
}

impl Collector {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(key, message));
    }

    /// Parses a required value, recording a problem on failure.
    fn parse<T>(
        &mut self,
        key: impl Into<String>,
        value: &str,
        parse: impl FnOnce(&str) -> Result<T, ValueError>,
    ) -> Option<T> {
        match parse(value) {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(key, e.to_string());
                None
            }
        }
    }

    /// Parses an optional value, or returns `default` when it is absent.
    fn parse_or<T>(
        &mut self,
        key: impl Into<String>,
        value: Option<&str>,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, ValueError>,
    ) -> Option<T> {
        match value {
            Some(value) => self.parse(key, value, parse),
            None => Some(default),
        }
    }

    /// Parses an optional value that stays optional.
    fn parse_opt<T>(
        &mut self,
        key: impl Into<String>,
        value: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, ValueError>,
    ) -> Option<Option<T>> {
        match value {
            Some(value) => self.parse(key, value, parse).map(Some),
            None => Some(None),
        }
    }

    /// Records a problem unless `n >= 1`.
    fn at_least_one(&mut self, key: &str, n: Option<u32>) -> Option<u32> {
        match n {
            Some(0) => {
                self.push(key, "must be at least 1");
                None
            }
            other => other,
        }
    }
}

/// Whether `addr` only accepts connections from this host.
fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

fn from_str<T: std::str::FromStr<Err = ValueError>>(value: &str) -> Result<T, ValueError> {
    value.parse()
}

/// The semantic pass. Returns `None` when some field failed (the problem is recorded).
fn build(c: &mut Collector, raw: raw::RawConfig) -> Option<Settings> {
    // A missing `[node]` is one problem among the others: every section present is still
    // checked.
    let node = match raw.node {
        Some(raw_node) => node(c, raw_node),
        None => {
            c.push("node", "missing required key");
            None
        }
    };
    // Production refusals need the mode; if it did not parse (or `[node]` is missing), that
    // problem is reported and the refusals are skipped rather than guessed.
    let production = node.as_ref().map(|n| n.mode.is_production());
    let dicom = raw.dicom.map(|d| dicom(c, d, production));
    let hl7 = raw.hl7.map(|h| hl7(c, h, production));
    let spool = spool(c, raw.spool);
    let keystore = keystore(c, raw.keystore, production);
    let uplinks = uplinks(c, raw.uplink, production);
    let fleet = raw.fleet.map(|f| fleet(c, f, production));
    let admin = raw.admin.map(|a| admin(c, a, production));
    let booking = raw.booking.map(|b| booking(c, b, production));
    let exchange = raw.exchange.map(|e| exchange(c, e, production));
    if let (Some(node), Some(Some(b))) = (&node, &booking) {
        booking_roles(c, node.role, b, exchange.as_ref().and_then(Option::as_ref));
    }
    let results = raw.results.map(|r| {
        results(
            c,
            r,
            node.as_ref(),
            uplinks.as_deref(),
            booking.as_ref().and_then(Option::as_ref),
        )
    });
    let identity = raw.identity.map(|i| identity(c, i, node.as_ref()));
    if identity.is_some() && booking.is_none() {
        c.push(
            "identity",
            "needs [booking]: the registry is reviewed at the core's kiosk and audited in its trail",
        );
    }
    let safety = raw.safety.map(|s| safety(c, s, node.as_ref()));
    let update = update(c, raw.update);
    let is_core = node.as_ref().is_some_and(|n| n.role == Role::Core);
    if safety.is_some() && is_core && identity.is_none() {
        c.push(
            "safety",
            "needs [identity]: warnings follow the patient's linked records and consent",
        );
    }
    if safety.is_some() && !is_core && exchange.is_none() {
        c.push(
            "safety",
            "on a clinic it carries dose reports to the core: it needs [exchange] and booking.core",
        );
    }
    Some(Settings {
        node: node?,
        dicom: dicom.map_or(Some(None), |d| d.map(Some))?,
        hl7: hl7.map_or(Some(None), |h| h.map(Some))?,
        spool: spool?,
        keystore: keystore?,
        uplinks: uplinks?,
        fleet: fleet.map_or(Some(None), |f| f.map(Some))?,
        admin: admin.map_or(Some(None), |a| a.map(Some))?,
        booking: booking.map_or(Some(None), |b| b.map(Some))?,
        exchange: exchange.map_or(Some(None), |e| e.map(Some))?,
        results: results.map_or(Some(None), |r| r.map(Some))?,
        identity: identity.map_or(Some(None), |i| i.map(Some))?,
        safety: safety.map_or(Some(None), |s| s.map(Some))?,
        update: update?,
    })
}

/// `[update]`, with every key's bound.
fn update(c: &mut Collector, raw: Option<raw::RawUpdate>) -> Option<Update> {
    let raw = raw.unwrap_or(raw::RawUpdate {
        max_bundle_bytes: None,
        health_timeout: None,
        download_deadline: None,
        max_bytes_per_sec: None,
        ca_file: None,
        reboot_request_file: None,
        rauc_command: None,
    });
    let max_bundle_bytes = c
        .parse_or(
            "update.max_bundle_bytes",
            raw.max_bundle_bytes.as_deref(),
            ByteSize::gib(1),
            from_str::<ByteSize>,
        )
        .and_then(|b| {
            if b.bytes() < ByteSize::mib(1).bytes() || b.bytes() > ByteSize::gib(16).bytes() {
                c.push(
                    "update.max_bundle_bytes",
                    format!("{b} is outside 1MiB..=16GiB"),
                );
                None
            } else {
                Some(b)
            }
        });
    let mut bounded =
        |key: &str, value: Option<&str>, default: u64, min: u64, max: u64, text: &str| {
            c.parse_or(
                key.to_owned(),
                value,
                Duration::from_secs(default),
                from_str::<Duration>,
            )
            .and_then(|d| {
                let (min, max) = (
                    std::time::Duration::from_secs(min),
                    std::time::Duration::from_secs(max),
                );
                if d.get() < min || d.get() > max {
                    c.push(key.to_owned(), format!("{d} is outside {text}"));
                    None
                } else {
                    Some(d)
                }
            })
        };
    let health_timeout = bounded(
        "update.health_timeout",
        raw.health_timeout.as_deref(),
        300,
        10,
        3600,
        "10s..=1h",
    );
    let download_deadline = bounded(
        "update.download_deadline",
        raw.download_deadline.as_deref(),
        3600,
        60,
        86_400,
        "1m..=24h",
    );
    let max_bytes_per_sec = c
        .parse_opt(
            "update.max_bytes_per_sec",
            raw.max_bytes_per_sec.as_deref(),
            from_str::<ByteSize>,
        )
        .and_then(|b| match b {
            Some(b) if b.bytes() < 1024 => {
                c.push("update.max_bytes_per_sec", format!("{b} is below 1KiB"));
                None
            }
            other => Some(other),
        });
    let ca_file = c.parse_opt("update.ca_file", raw.ca_file.as_deref(), parse_path);
    let reboot_request_file = c.parse_or(
        "update.reboot_request_file",
        raw.reboot_request_file.as_deref(),
        PathBuf::from("/run/gatewayd/reboot"),
        parse_path,
    );
    let rauc_command = c.parse_or(
        "update.rauc_command",
        raw.rauc_command.as_deref(),
        PathBuf::from("rauc"),
        parse_path,
    );
    Some(Update {
        max_bundle_bytes: max_bundle_bytes?,
        health_timeout: health_timeout?,
        download_deadline: download_deadline?,
        max_bytes_per_sec: max_bytes_per_sec?,
        ca_file: ca_file?,
        reboot_request_file: reboot_request_file?,
        rauc_command: rauc_command?,
    })
}

/// `[safety]`: on the core a window of 1..=36500 days and a positive finite threshold; on a
/// clinic (which only carries its dose reports to the core) neither key.
fn safety(c: &mut Collector, raw: raw::RawSafety, node: Option<&Node>) -> Option<Safety> {
    if node.is_some_and(|n| n.role != Role::Core)
        && (raw.dose_window_days.is_some() || raw.dlp_threshold_mgy_cm.is_some())
    {
        c.push(
            "safety",
            "dose_window_days and dlp_threshold_mgy_cm are the core's (it shows the warnings); \
             a clinic only carries its dose reports to the core",
        );
    }
    let dose_window_days = match raw.dose_window_days {
        None => Some(365),
        Some(d @ 1..=36500) => Some(d),
        Some(_) => {
            c.push("safety.dose_window_days", "must be 1 to 36500 days");
            None
        }
    };
    let dlp_threshold_mgy_cm = match raw.dlp_threshold_mgy_cm {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            c.push(
                "safety.dlp_threshold_mgy_cm",
                "must be a positive number of mGy·cm",
            );
            None
        }
        t => Some(t),
    };
    Some(Safety {
        dose_window_days: dose_window_days?,
        dlp_threshold_mgy_cm: dlp_threshold_mgy_cm?,
    })
}

/// `[identity]`: only on the core; `hospital_id` defaults to `node.id`.
fn identity(c: &mut Collector, raw: raw::RawIdentity, node: Option<&Node>) -> Option<Identity> {
    if node.is_some_and(|n| n.role != Role::Core) {
        c.push(
            "identity",
            "only the core keeps the identity registry (node.role = \"core\")",
        );
    }
    let hospital_id = match raw.hospital_id {
        Some(h)
            if h.is_empty()
                || h.chars().count() > 64
                || h.chars().any(|ch| ch.is_control() || "\\^&~|".contains(ch)) =>
        {
            c.push(
                "identity.hospital_id",
                "must be 1 to 64 characters without control characters or \\ ^ & ~ |",
            );
            None
        }
        Some(h) => Some(h),
        None => node.map(|n| n.id.as_str().to_owned()),
    };
    let model = c.parse_opt("identity.model", raw.model.as_deref(), parse_path);
    Some(Identity {
        hospital_id: hospital_id?,
        model: model?,
    })
}

/// `[results]`: checked against the role and the uplinks it names.
fn results(
    c: &mut Collector,
    raw: raw::RawResults,
    node: Option<&Node>,
    uplinks: Option<&[Uplink]>,
    booking: Option<&Booking>,
) -> Option<Results> {
    let uplink_named = |name: &UplinkName| uplinks.and_then(|u| u.iter().find(|u| &u.name == name));
    let source = c.parse("results.source", &raw.source, from_str::<UplinkName>);
    if let (Some(source), Some(_)) = (&source, uplinks) {
        match uplink_named(source) {
            Some(u) if u.kind == UplinkKind::DicomWeb && u.deidentify.is_some() => c.push(
                "results.source",
                "must name an uplink with deidentify = \"none\": results are announced and pulled by their real UIDs",
            ),
            Some(u) if u.kind == UplinkKind::DicomWeb => {}
            Some(_) => c.push("results.source", "must name a kind = \"dicomweb\" uplink"),
            None => c.push(
                "results.source",
                format!("no [[uplink]] is named {:?}", source.as_str()),
            ),
        }
    }
    if booking.is_none() {
        c.push(
            "results",
            "needs [booking]: results return to the clinic that booked the exam",
        );
    }
    let role = node.map(|n| n.role);
    let issuer = match raw.patient_id_issuer {
        Some(i)
            if i.is_empty()
                || i.len() > 64
                || i.chars().any(|ch| ch.is_control() || "\\^&~|".contains(ch)) =>
        {
            c.push(
                "results.patient_id_issuer",
                "must be 1 to 64 characters without control characters or \\ ^ & ~ |",
            );
            None
        }
        Some(i) => Some(i),
        None => node.map(|n| n.id.as_str().to_owned()),
    };
    let complete_after = c
        .parse_or(
            "results.complete_after",
            raw.complete_after.as_deref(),
            defaults::RESULTS_COMPLETE_AFTER,
            from_str::<Duration>,
        )
        .and_then(|d| {
            if d.get().is_zero() {
                c.push("results.complete_after", "must be greater than zero");
                None
            } else {
                Some(d)
            }
        });
    if role == Some(Role::Core) && !raw.deliver.is_empty() {
        c.push(
            "results.deliver",
            "only a clinic delivers returned results (node.role = \"clinic\")",
        );
    }
    let mut deliver = Some(Vec::with_capacity(raw.deliver.len()));
    let mut names: Vec<UplinkName> = Vec::new();
    for (i, d) in raw.deliver.into_iter().enumerate() {
        let key = |field: &str| format!("results.deliver[{i}].{field}");
        let name = c.parse(key("name"), &d.name, from_str::<UplinkName>);
        if let Some(name) = &name {
            if names.contains(name) || uplink_named(name).is_some() {
                c.push(
                    key("name"),
                    format!(
                        "{:?} is already the name of another destination or uplink",
                        name.as_str()
                    ),
                );
            }
            names.push(name.clone());
        }
        let entry = match d.kind.as_str() {
            "dicom" => {
                let tls = deliver_tls(c, &d, i);
                for (field, present) in [("uplink", d.uplink.is_some())] {
                    if present {
                        c.push(key(field), "not a key of kind = \"dicom\"");
                    }
                }
                let host = match d.host {
                    Some(h)
                        if !h.is_empty()
                            && !h.chars().any(|ch| ch.is_whitespace() || ch.is_control()) =>
                    {
                        Some(h)
                    }
                    Some(_) => {
                        c.push(key("host"), "must be a host name or address");
                        None
                    }
                    None => {
                        c.push(key("host"), "missing required key for kind = \"dicom\"");
                        None
                    }
                };
                let port = match d.port {
                    Some(0) | None => {
                        c.push(key("port"), "required for kind = \"dicom\": 1 to 65535");
                        None
                    }
                    Some(p) => Some(p),
                };
                let called = c.parse(
                    key("called_ae"),
                    d.called_ae.as_deref().unwrap_or(""),
                    from_str::<AeTitle>,
                );
                let calling = c.parse(
                    key("calling_ae"),
                    d.calling_ae.as_deref().unwrap_or(""),
                    from_str::<AeTitle>,
                );
                match (name, host, port, called, calling, tls) {
                    (
                        Some(name),
                        Some(host),
                        Some(port),
                        Some(called_ae),
                        Some(calling_ae),
                        Some(tls),
                    ) => Some(Deliver::Dicom {
                        name,
                        host,
                        port,
                        called_ae,
                        calling_ae,
                        tls,
                    }),
                    _ => None,
                }
            }
            "hl7" => {
                for (field, present) in [
                    ("host", d.host.is_some()),
                    ("port", d.port.is_some()),
                    ("called_ae", d.called_ae.is_some()),
                    ("calling_ae", d.calling_ae.is_some()),
                    ("tls_ca_file", d.tls_ca_file.is_some()),
                    ("tls_cert_file", d.tls_cert_file.is_some()),
                    ("tls_key_file", d.tls_key_file.is_some()),
                ] {
                    if present {
                        c.push(
                            key(field),
                            "not a key of kind = \"hl7\" (the uplink it names says where)",
                        );
                    }
                }
                let uplink = match d.uplink.as_deref() {
                    Some(u) => c.parse(key("uplink"), u, from_str::<UplinkName>),
                    None => {
                        c.push(
                            key("uplink"),
                            "missing required key for kind = \"hl7\": a kind = \"mllp-tls\" uplink",
                        );
                        None
                    }
                };
                if let (Some(u), Some(_)) = (&uplink, uplinks) {
                    match uplink_named(u) {
                        Some(up) if up.kind == UplinkKind::MllpTls => {}
                        Some(_) => c.push(key("uplink"), "must name a kind = \"mllp-tls\" uplink"),
                        None => c.push(
                            key("uplink"),
                            format!("no [[uplink]] is named {:?}", u.as_str()),
                        ),
                    }
                }
                match (name, uplink) {
                    (Some(name), Some(uplink)) => Some(Deliver::Hl7 { name, uplink }),
                    _ => None,
                }
            }
            other => {
                c.push(
                    key("kind"),
                    format!("{other:?} is not one of \"dicom\", \"hl7\""),
                );
                None
            }
        };
        match (entry, deliver.as_mut()) {
            (Some(e), Some(list)) => list.push(e),
            _ => deliver = None,
        }
    }
    Some(Results {
        source: source?,
        rewrite_patient_id: raw.rewrite_patient_id.unwrap_or(true),
        patient_id_issuer: issuer?,
        complete_after: complete_after?,
        deliver: deliver?,
    })
}

fn node(c: &mut Collector, raw: raw::RawNode) -> Option<Node> {
    let id = c.parse("node.id", &raw.id, from_str::<NodeId>);
    let role = c.parse_or("node.role", raw.role.as_deref(), defaults::ROLE, from_str);
    let data_dir = c.parse("node.data_dir", &raw.data_dir, parse_path);
    let mode = c.parse_or("node.mode", raw.mode.as_deref(), defaults::MODE, from_str);
    Some(Node {
        id: id?,
        role: role?,
        data_dir: data_dir?,
        mode: mode?,
    })
}

fn dicom(c: &mut Collector, raw: raw::RawDicom, production: Option<bool>) -> Option<Dicom> {
    let raw_tls = RawDicomTls {
        listen: raw.tls_listen.clone(),
        cert_file: raw.tls_cert_file.clone(),
        key_file: raw.tls_key_file.clone(),
        client_ca_file: raw.tls_client_ca_file.clone(),
    };
    let listen = c.parse_or(
        "dicom.listen",
        raw.listen.as_deref(),
        defaults::DICOM_LISTEN,
        parse_socket_addr,
    );
    let ae_title = c.parse(
        "dicom.ae_title",
        raw.ae_title.as_deref().unwrap_or(defaults::DICOM_AE_TITLE),
        from_str::<AeTitle>,
    );
    let max_associations = c.at_least_one(
        "dicom.max_associations",
        Some(
            raw.max_associations
                .unwrap_or(defaults::DICOM_MAX_ASSOCIATIONS),
        ),
    );
    let per_peer = c.at_least_one(
        "dicom.max_associations_per_peer",
        Some(
            raw.max_associations_per_peer
                .unwrap_or(defaults::DICOM_MAX_ASSOCIATIONS_PER_PEER),
        ),
    );
    if let (Some(max), Some(pp)) = (max_associations, per_peer)
        && pp > max
    {
        c.push(
            "dicom.max_associations_per_peer",
            format!("{pp} is more than dicom.max_associations ({max})"),
        );
    }
    let max_pdu_length = c
        .parse_or(
            "dicom.max_pdu_length",
            raw.max_pdu_length.as_deref(),
            defaults::DICOM_MAX_PDU_LENGTH,
            from_str::<ByteSize>,
        )
        .and_then(|len| {
            let range = defaults::DICOM_MIN_PDU_LENGTH..=defaults::DICOM_MAX_PDU_LENGTH_LIMIT;
            if range.contains(&len) {
                Some(len)
            } else {
                c.push(
                    "dicom.max_pdu_length",
                    format!(
                        "{:?} is out of range (must be within {} bytes and {})",
                        raw.max_pdu_length.as_deref().unwrap_or_default(),
                        defaults::DICOM_MIN_PDU_LENGTH.bytes(),
                        defaults::DICOM_MAX_PDU_LENGTH_LIMIT
                    ),
                );
                None
            }
        });
    let mut duration = |key: &str, value: Option<&str>, default: Duration, nonzero: bool| {
        let d = c.parse_or(key, value, default, from_str::<Duration>)?;
        if nonzero && d.is_zero() {
            c.push(
                key,
                format!("{:?} must be more than zero", value.unwrap_or_default()),
            );
            return None;
        }
        Some(d)
    };
    let artim_timeout = duration(
        "dicom.artim_timeout",
        raw.artim_timeout.as_deref(),
        defaults::DICOM_ARTIM_TIMEOUT,
        true,
    );
    let idle_timeout = duration(
        "dicom.idle_timeout",
        raw.idle_timeout.as_deref(),
        defaults::DICOM_IDLE_TIMEOUT,
        true,
    );
    let shutdown_grace = duration(
        "dicom.shutdown_grace",
        raw.shutdown_grace.as_deref(),
        defaults::DICOM_SHUTDOWN_GRACE,
        false,
    );

    let mut peers = Some(Vec::with_capacity(raw.peers.len()));
    for (i, peer) in raw.peers.into_iter().enumerate() {
        let ae_title = c.parse(
            format!("dicom.peers[{i}].ae_title"),
            &peer.ae_title,
            from_str::<AeTitle>,
        );
        let host = c.parse(format!("dicom.peers[{i}].host"), &peer.host, parse_ip_addr);
        let key = format!("dicom.peers[{i}].max_associations");
        let peer_max = match peer.max_associations {
            Some(n) => c.at_least_one(&key, Some(n)).map(Some),
            None => Some(None),
        };
        if let (Some(Some(n)), Some(max)) = (peer_max, max_associations)
            && n > max
        {
            c.push(
                key,
                format!("{n} is more than dicom.max_associations ({max})"),
            );
        }
        let tls_client_name = dicom_peer_tls_name(c, peer.tls_client_name, i);
        let peer = (|| {
            Some(DicomPeer {
                ae_title: ae_title?,
                host: host?,
                max_associations: peer_max?,
                tls_client_name: tls_client_name?,
            })
        })();
        if let (Some(peer), Some(list)) = (&peer, &peers)
            && let Some(first) = list.iter().position(|p: &DicomPeer| {
                p.ae_title == peer.ae_title
                    && p.host == peer.host
                    && p.tls_client_name == peer.tls_client_name
            })
        {
            c.push(
                format!("dicom.peers[{i}]"),
                format!(
                    "duplicate peer {:?} at {} (already dicom.peers[{first}])",
                    peer.ae_title.as_str(),
                    peer.host
                ),
            );
        }
        match (peer, &mut peers) {
            (Some(peer), Some(list)) => list.push(peer),
            _ => peers = None,
        }
    }

    if production == Some(true)
        && let (Some(listen), Some([])) = (listen, peers.as_deref())
        && !is_loopback(&listen)
    {
        c.push(
            "dicom.peers",
            "production mode needs an allow list of calling AE title + address for plain DIMSE on a non-loopback address",
        );
    }

    let tls = dicom_tls(c, &raw_tls, production, peers.as_deref(), listen);
    Some(Dicom {
        tls: tls?,
        listen: listen?,
        ae_title: ae_title?,
        max_associations: max_associations?,
        max_associations_per_peer: per_peer?,
        max_pdu_length: max_pdu_length?,
        artim_timeout: artim_timeout?,
        idle_timeout: idle_timeout?,
        shutdown_grace: shutdown_grace?,
        peers: peers?,
    })
}

/// `[dicom]`'s TLS keys, taken out of [`raw::RawDicom`] before its peers are consumed.
struct RawDicomTls {
    listen: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    client_ca_file: Option<String>,
}

/// `tls_cert_file` + `tls_key_file` under `prefix`: both or neither (`Some(None)`).
fn tls_files(
    c: &mut Collector,
    prefix: &str,
    cert: Option<&str>,
    key: Option<&str>,
) -> Option<Option<TlsFiles>> {
    let cert_file = c.parse_opt(format!("{prefix}tls_cert_file"), cert, parse_path);
    let key_file = c.parse_opt(format!("{prefix}tls_key_file"), key, parse_path);
    match (cert_file?, key_file?) {
        (Some(cert_file), Some(key_file)) => Some(Some(TlsFiles {
            cert_file,
            key_file,
        })),
        (None, None) => Some(None),
        (Some(_), None) => {
            c.push(
                format!("{prefix}tls_key_file"),
                format!("is required with {prefix}tls_cert_file (both, or neither for the device identity)"),
            );
            None
        }
        (None, Some(_)) => {
            c.push(
                format!("{prefix}tls_cert_file"),
                format!("is required with {prefix}tls_key_file (both, or neither for the device identity)"),
            );
            None
        }
    }
}

/// `[dicom] tls_listen`, `tls_cert_file`/`tls_key_file`, `tls_client_ca_file`, and the
/// rules tying them to `[[dicom.peers]]` and production mode. `Some(None)`: no TLS listener.
fn dicom_tls(
    c: &mut Collector,
    raw: &RawDicomTls,
    production: Option<bool>,
    peers: Option<&[DicomPeer]>,
    plain_listen: Option<SocketAddr>,
) -> Option<Option<DicomTls>> {
    let listen = c.parse_opt("dicom.tls_listen", raw.listen.as_deref(), parse_socket_addr);
    let files = tls_files(
        c,
        "dicom.",
        raw.cert_file.as_deref(),
        raw.key_file.as_deref(),
    );
    let client_ca_file = c.parse_opt(
        "dicom.tls_client_ca_file",
        raw.client_ca_file.as_deref(),
        parse_path,
    );
    let tls_listen_given = raw.listen.is_some();
    if !tls_listen_given {
        for (key, present) in [
            ("dicom.tls_cert_file", raw.cert_file.is_some()),
            ("dicom.tls_key_file", raw.key_file.is_some()),
            ("dicom.tls_client_ca_file", raw.client_ca_file.is_some()),
        ] {
            if present {
                c.push(
                    key,
                    "needs dicom.tls_listen (the TLS listener's own address)",
                );
            }
        }
    }
    let named = peers
        .unwrap_or_default()
        .iter()
        .position(|p| p.tls_client_name.is_some());
    if let Some(i) = named
        && raw.client_ca_file.is_none()
    {
        c.push(
            format!("dicom.peers[{i}].tls_client_name"),
            "needs dicom.tls_listen and dicom.tls_client_ca_file (a name is only known from a verified client certificate)",
        );
    }
    let listen = listen?;
    if let Some(l) = listen {
        if Some(l) == plain_listen {
            c.push(
                "dicom.tls_listen",
                format!("{l} is also dicom.listen: the TLS listener needs its own port"),
            );
        }
        if production == Some(true)
            && raw.client_ca_file.is_none()
            && peers.is_some_and(<[DicomPeer]>::is_empty)
            && !is_loopback(&l)
        {
            c.push(
                "dicom.peers",
                "production mode needs an allow list of calling AE title + address for a DICOM TLS listener without dicom.tls_client_ca_file on a non-loopback address",
            );
        }
    }
    let files = files?;
    let client_ca_file = client_ca_file?;
    Some(listen.map(|listen| DicomTls {
        listen,
        files,
        client_ca_file,
    }))
}

/// `[[dicom.peers]] tls_client_name`: a non-empty name without control characters.
fn dicom_peer_tls_name(
    c: &mut Collector,
    name: Option<String>,
    i: usize,
) -> Option<Option<String>> {
    match name {
        None => Some(None),
        Some(n) if !n.trim().is_empty() && !n.chars().any(char::is_control) => Some(Some(n)),
        Some(_) => {
            c.push(
                format!("dicom.peers[{i}].tls_client_name"),
                "must be a certificate name (DNS name or common name), not empty",
            );
            None
        }
    }
}

/// `[[results.deliver]] kind = "dicom"` TLS keys: `tls_ca_file` switches TLS on;
/// `tls_cert_file`/`tls_key_file` (both or neither) need it. `Some(None)`: plain DIMSE.
fn deliver_tls(c: &mut Collector, d: &raw::RawDeliver, i: usize) -> Option<Option<DeliverTls>> {
    let prefix = format!("results.deliver[{i}].");
    let ca_file = c.parse_opt(
        format!("{prefix}tls_ca_file"),
        d.tls_ca_file.as_deref(),
        parse_path,
    );
    let files = tls_files(
        c,
        &prefix,
        d.tls_cert_file.as_deref(),
        d.tls_key_file.as_deref(),
    );
    let ca_file = ca_file?;
    let files = files?;
    match (ca_file, files) {
        (Some(ca_file), files) => Some(Some(DeliverTls { ca_file, files })),
        (None, None) => Some(None),
        (None, Some(_)) => {
            c.push(
                format!("{prefix}tls_ca_file"),
                "is required with tls_cert_file/tls_key_file (the CA the PACS's certificate is verified against)",
            );
            None
        }
    }
}

fn hl7(c: &mut Collector, raw: raw::RawHl7, production: Option<bool>) -> Option<Hl7> {
    let listen = c.parse_or(
        "hl7.listen",
        raw.listen.as_deref(),
        defaults::HL7_LISTEN,
        parse_socket_addr,
    );
    let charset = c.parse_or(
        "hl7.charset",
        raw.charset.as_deref(),
        defaults::HL7_CHARSET,
        from_str,
    );
    let max_frame_bytes = c.parse_or(
        "hl7.max_frame_bytes",
        raw.max_frame_bytes.as_deref(),
        ByteSize::mib(1),
        from_str::<ByteSize>,
    );
    let max_frame_bytes = max_frame_bytes.and_then(|b| {
        if (1024..=64 << 20).contains(&b.bytes()) {
            Some(b)
        } else {
            c.push(
                "hl7.max_frame_bytes",
                format!("{} is out of range (1KiB to 64MiB)", b.bytes()),
            );
            None
        }
    });
    let idle_timeout = c.parse_or(
        "hl7.idle_timeout",
        raw.idle_timeout.as_deref(),
        Duration::from_secs(600),
        from_str::<Duration>,
    );
    let idle_timeout = idle_timeout.and_then(|d| {
        if d.is_zero() {
            c.push("hl7.idle_timeout", "must be more than zero");
            None
        } else {
            Some(d)
        }
    });
    let max_connections = raw.max_connections.unwrap_or(32);
    if !(1..=1024).contains(&max_connections) {
        c.push(
            "hl7.max_connections",
            format!("{max_connections} is outside 1..=1024"),
        );
    }
    let tls_cert_file = c.parse_opt(
        "hl7.tls_cert_file",
        raw.tls_cert_file.as_deref(),
        parse_path,
    );
    let tls_key_file = c.parse_opt("hl7.tls_key_file", raw.tls_key_file.as_deref(), parse_path);
    let tls_client_ca_file = c.parse_opt(
        "hl7.tls_client_ca_file",
        raw.tls_client_ca_file.as_deref(),
        parse_path,
    );
    match (&raw.tls_cert_file, &raw.tls_key_file) {
        (Some(_), None) => c.push("hl7.tls_key_file", "is required with hl7.tls_cert_file"),
        (None, Some(_)) => c.push("hl7.tls_cert_file", "is required with hl7.tls_key_file"),
        _ => {}
    }
    if raw.tls_client_ca_file.is_some() && raw.tls_cert_file.is_none() {
        c.push(
            "hl7.tls_client_ca_file",
            "needs hl7.tls_cert_file and hl7.tls_key_file (client certificates are checked in TLS only)",
        );
    }
    let peers = hl7_peers(c, raw.peers, raw.tls_client_ca_file.is_some());
    if production == Some(true)
        && raw.tls_cert_file.is_none()
        && let (Some(listen), Some([])) = (listen, peers.as_deref())
        && !is_loopback(&listen)
    {
        c.push(
            "hl7.peers",
            "production mode needs an allow list of sender address / client certificate name (+ MSH-3/MSH-4) for plain MLLP on a non-loopback address",
        );
    }
    Some(Hl7 {
        listen: listen?,
        charset: charset?,
        max_frame_bytes: max_frame_bytes?,
        idle_timeout: idle_timeout?,
        max_connections,
        tls_cert_file: tls_cert_file?,
        tls_key_file: tls_key_file?,
        tls_client_ca_file: tls_client_ca_file?,
        peers: peers?,
    })
}

/// `[[hl7.peers]]`. `client_ca`: whether `hl7.tls_client_ca_file` is set (a
/// `tls_client_name` means nothing without verified client certificates).
fn hl7_peers(
    c: &mut Collector,
    raw: Vec<raw::RawHl7Peer>,
    client_ca: bool,
) -> Option<Vec<Hl7Peer>> {
    let mut peers = Some(Vec::with_capacity(raw.len()));
    for (i, peer) in raw.into_iter().enumerate() {
        let host = c.parse_opt(
            format!("hl7.peers[{i}].host"),
            peer.host.as_deref(),
            parse_ip_addr,
        );
        let mut text = |key: &str, value: Option<String>, what: &str| match value {
            Some(v) => match hl7_peer_text(&v) {
                Ok(()) => Some(Some(v)),
                Err(why) => {
                    c.push(format!("hl7.peers[{i}].{key}"), format!("{what} {why}"));
                    None
                }
            },
            None => Some(None),
        };
        let (has_host, has_name) = (peer.host.is_some(), peer.tls_client_name.is_some());
        let application = text(
            "sending_application",
            peer.sending_application,
            "an MSH-3 namespace id",
        );
        let facility = text(
            "sending_facility",
            peer.sending_facility,
            "an MSH-4 namespace id",
        );
        let tls_client_name = text(
            "tls_client_name",
            peer.tls_client_name,
            "a certificate name",
        );
        if !has_host && !has_name {
            c.push(
                format!("hl7.peers[{i}]"),
                "needs host or tls_client_name (MSH-3/MSH-4 alone can be claimed by any sender)",
            );
        }
        if has_name && !client_ca {
            c.push(
                format!("hl7.peers[{i}].tls_client_name"),
                "needs hl7.tls_client_ca_file (client certificates are verified only then)",
            );
        }
        let peer = (|| {
            Some(Hl7Peer {
                host: host?,
                sending_application: application?,
                sending_facility: facility?,
                tls_client_name: tls_client_name?,
            })
        })();
        if let (Some(peer), Some(list)) = (&peer, &peers)
            && let Some(first) = list.iter().position(|p: &Hl7Peer| p == peer)
        {
            c.push(
                format!("hl7.peers[{i}]"),
                format!("duplicate peer (already hl7.peers[{first}])"),
            );
        }
        match (peer, &mut peers) {
            (Some(peer), Some(list)) => list.push(peer),
            _ => peers = None,
        }
    }
    peers
}

/// Why a `[[hl7.peers]]` text (an HL7 namespace id or a certificate name) is refused:
/// empty, over 227 characters (HL7's HD length), surrounding spaces, control characters or
/// HL7's delimiters (`|^~\&`), which could never match a field as sent.
fn hl7_peer_text(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        Err("must not be empty")
    } else if value.chars().count() > 227 {
        Err("is longer than 227 characters")
    } else if value.trim() != value {
        Err("must not start or end with spaces")
    } else if value
        .chars()
        .any(|ch| ch.is_control() || matches!(ch, '|' | '^' | '~' | '\\' | '&'))
    {
        Err("must not hold control characters or HL7 delimiters (| ^ ~ \\ &)")
    } else {
        Ok(())
    }
}

fn spool(c: &mut Collector, raw: Option<raw::RawSpool>) -> Option<Spool> {
    let Some(raw) = raw else {
        return Some(Spool::default());
    };
    let max_bytes = c.parse_or(
        "spool.max_bytes",
        raw.max_bytes.as_deref(),
        defaults::SPOOL_MAX_BYTES,
        from_str,
    );
    let min_free_bytes = c.parse_or(
        "spool.min_free_bytes",
        raw.min_free_bytes.as_deref(),
        defaults::SPOOL_MIN_FREE_BYTES,
        from_str,
    );
    let keep_sent_for = c.parse_or(
        "spool.keep_sent_for",
        raw.keep_sent_for.as_deref(),
        Duration::from_secs(0),
        from_str::<Duration>,
    );
    let index_cache_bytes = c.parse_or(
        "spool.index_cache_bytes",
        raw.index_cache_bytes.as_deref(),
        defaults::SPOOL_INDEX_CACHE_BYTES,
        from_str,
    );
    let dedupe_window = c.parse_or(
        "spool.dedupe_window",
        raw.dedupe_window.as_deref(),
        defaults::SPOOL_DEDUPE_WINDOW,
        from_str::<Duration>,
    );
    Some(Spool {
        max_bytes: max_bytes?,
        min_free_bytes: min_free_bytes?,
        keep_sent_for: keep_sent_for?,
        index_cache_bytes: index_cache_bytes?,
        dedupe_window: dedupe_window?,
    })
}

fn keystore(
    c: &mut Collector,
    raw: Option<raw::RawKeystore>,
    production: Option<bool>,
) -> Option<Keystore> {
    let Some(raw) = raw else {
        return Some(Keystore::default());
    };
    let backend = c.parse_or(
        "keystore.backend",
        raw.backend.as_deref(),
        defaults::KEYSTORE_BACKEND,
        from_str,
    );
    let tcti = c.parse(
        "keystore.tcti",
        raw.tcti.as_deref().unwrap_or(defaults::KEYSTORE_TCTI),
        from_str::<Tcti>,
    );
    if production == Some(true) && backend == Some(KeystoreBackend::Software) {
        c.push(
            "keystore.backend",
            "the software key store is refused in production mode (use \"tpm\")",
        );
    }
    let mut pcrs = Vec::new();
    let mut pcrs_ok = true;
    for (i, &n) in raw.pcrs.as_deref().unwrap_or_default().iter().enumerate() {
        match u8::try_from(n) {
            Ok(pcr) if pcr <= 23 && !pcrs.contains(&pcr) => pcrs.push(pcr),
            Ok(pcr) if pcr <= 23 => {
                pcrs_ok = false;
                c.push(
                    format!("keystore.pcrs[{i}]"),
                    format!("PCR {pcr} is listed twice"),
                );
            }
            _ => {
                pcrs_ok = false;
                c.push(
                    format!("keystore.pcrs[{i}]"),
                    format!("{n} is not a PCR index (0..=23)"),
                );
            }
        }
    }
    Some(Keystore {
        backend: backend?,
        tcti: tcti?,
        pcrs: pcrs_ok.then_some(pcrs)?,
        allow_software_tpm: raw.allow_software_tpm.unwrap_or(false),
    })
}

fn uplinks(
    c: &mut Collector,
    raw: Vec<raw::RawUplink>,
    production: Option<bool>,
) -> Option<Vec<Uplink>> {
    let mut out = Some(Vec::with_capacity(raw.len()));
    let mut names: Vec<(UplinkName, usize)> = Vec::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("uplink[{i}].{field}");
        let name = c.parse(key("name"), &raw.name, from_str::<UplinkName>);
        if let Some(name) = &name {
            if let Some((_, first)) = names.iter().find(|(n, _)| n == name) {
                c.push(
                    key("name"),
                    format!(
                        "duplicate uplink name {:?} (already uplink[{first}])",
                        name.as_str()
                    ),
                );
            } else {
                names.push((name.clone(), i));
            }
        }
        let kind = c.parse_or(
            key("kind"),
            raw.kind.as_deref(),
            defaults::UPLINK_KIND,
            from_str,
        );
        let url = c.parse(key("url"), &raw.url, from_str::<UplinkUrl>);
        let ca_file = c.parse_opt(key("ca_file"), raw.ca_file.as_deref(), parse_path);
        let max_bytes_per_sec = c.parse_opt(
            key("max_bytes_per_sec"),
            raw.max_bytes_per_sec.as_deref(),
            from_str::<ByteSize>,
        );
        let batch_max_instances = raw.batch_max_instances.unwrap_or(16);
        if !(1..=1000).contains(&batch_max_instances) {
            c.push(
                key("batch_max_instances"),
                format!("{batch_max_instances} is outside 1..=1000"),
            );
        }
        let max_concurrent_requests = raw.max_concurrent_requests.unwrap_or(2);
        if !(1..=16).contains(&max_concurrent_requests) {
            c.push(
                key("max_concurrent_requests"),
                format!("{max_concurrent_requests} is outside 1..=16"),
            );
        }
        if raw.ca_file.is_none()
            && (raw.url.starts_with("https://")
                || raw.url.starts_with("mllps://")
                || raw.url.starts_with("syslog-tls://"))
        {
            c.push(
                key("ca_file"),
                "required for a TLS url: the CA the destination's certificate is checked against",
            );
        }
        if let (Some(kind), Some(url)) = (&kind, &url) {
            match kind {
                UplinkKind::DicomWeb if url.is_mllp() || url.is_syslog() => {
                    c.push(
                        key("url"),
                        "kind = \"dicomweb\" needs an https:// (or development http://) url",
                    );
                }
                UplinkKind::MllpTls if !url.is_mllp() || url.host_port().is_none() => {
                    c.push(
                        key("url"),
                        "kind = \"mllp-tls\" needs an mllps://host:port (or development mllp://host:port) url",
                    );
                }
                UplinkKind::SyslogTls if url.syslog_host_port().is_none() => {
                    c.push(
                        key("url"),
                        "kind = \"syslog-tls\" needs a syslog-tls://host[:port] url (port 6514 when absent)",
                    );
                }
                _ => {}
            }
        }
        let client_auth = c.parse_or(
            key("client_auth"),
            raw.client_auth.as_deref(),
            defaults::UPLINK_CLIENT_AUTH,
            from_str,
        );
        let cert_file = c.parse_opt(key("cert_file"), raw.cert_file.as_deref(), parse_path);
        let key_file = c.parse_opt(key("key_file"), raw.key_file.as_deref(), parse_path);

        match client_auth {
            Some(ClientAuth::Files) => {
                for (field, value) in [("cert_file", &raw.cert_file), ("key_file", &raw.key_file)] {
                    if value.is_none() {
                        c.push(key(field), "is required when client_auth = \"files\"");
                    }
                }
                if production == Some(true) {
                    c.push(
                        key("client_auth"),
                        "client_auth = \"files\" is refused in production mode (use \"keystore\")",
                    );
                }
            }
            Some(ClientAuth::Keystore) => {
                for (field, value) in [("cert_file", &raw.cert_file), ("key_file", &raw.key_file)] {
                    if value.is_some() {
                        c.push(key(field), "is only used with client_auth = \"files\"");
                    }
                }
            }
            None => {}
        }
        if production == Some(true) && url.as_ref().is_some_and(UplinkUrl::is_plaintext) {
            c.push(
                key("url"),
                "plaintext (http://, mllp://) is refused in production mode",
            );
        }
        let max_queued = syslog_keys(c, &key, &raw, kind);
        let message_types = message_types(c, &key("message_types"), raw.message_types, kind);
        let deidentify = deidentify(
            c,
            &key,
            raw.deidentify.as_deref(),
            raw.deidentify_options,
            raw.deidentify_burned_in.as_deref(),
            kind,
        );

        let uplink = (|| {
            Some(Uplink {
                name: name?,
                kind: kind?,
                url: url?,
                ca_file: ca_file?,
                client_auth: client_auth?,
                cert_file: cert_file?,
                key_file: key_file?,
                max_bytes_per_sec: max_bytes_per_sec?,
                batch_max_instances,
                max_concurrent_requests,
                message_types: message_types?,
                deidentify: deidentify?,
                max_queued: max_queued?,
            })
        })();
        match (uplink, &mut out) {
            (Some(uplink), Some(list)) => list.push(uplink),
            _ => out = None,
        }
    }
    out
}

/// `uplink.max_queued` (a `kind = "syslog-tls"` audit repository's queue cap, default
/// 100 000) and the keys a syslog-tls uplink does not use (de-identification, HL7 message
/// types, the STOW-RS batch keys): refused with a reason.
fn syslog_keys(
    c: &mut Collector,
    key: &dyn Fn(&str) -> String,
    raw: &raw::RawUplink,
    kind: Option<UplinkKind>,
) -> Option<Option<u64>> {
    if kind != Some(UplinkKind::SyslogTls) {
        if raw.max_queued.is_some() {
            c.push(
                key("max_queued"),
                "only an audit repository (kind = \"syslog-tls\") takes max_queued",
            );
            return None;
        }
        return Some(None);
    }
    let mut ok = true;
    let refused: [(&str, bool, &str); 6] = [
        (
            "deidentify",
            raw.deidentify.is_some(),
            "audit messages are not DICOM objects",
        ),
        (
            "deidentify_options",
            raw.deidentify_options.is_some(),
            "audit messages are not DICOM objects",
        ),
        (
            "deidentify_burned_in",
            raw.deidentify_burned_in.is_some(),
            "audit messages are not DICOM objects",
        ),
        (
            "message_types",
            raw.message_types.is_some(),
            "an audit repository takes every audit message",
        ),
        (
            "batch_max_instances",
            raw.batch_max_instances.is_some(),
            "a STOW-RS key",
        ),
        (
            "max_concurrent_requests",
            raw.max_concurrent_requests.is_some(),
            "a STOW-RS key",
        ),
    ];
    for (field, present, why) in refused {
        if present {
            c.push(
                key(field),
                format!("is not used by kind = \"syslog-tls\" ({why}); remove it"),
            );
            ok = false;
        }
    }
    if raw.max_bytes_per_sec.is_some() {
        c.push(
            key("max_bytes_per_sec"),
            "is not used by kind = \"syslog-tls\" (a STOW-RS key); remove it",
        );
        ok = false;
    }
    let max = raw.max_queued.unwrap_or(100_000);
    if !(1..=10_000_000).contains(&max) {
        c.push(key("max_queued"), format!("{max} is outside 1..=10000000"));
        ok = false;
    }
    ok.then_some(Some(max))
}

/// `uplink.deidentify`, `deidentify_options`, `deidentify_burned_in`: only on a dicomweb
/// uplink; the options only with `deidentify = "basic"`.
fn deidentify(
    c: &mut Collector,
    key: &dyn Fn(&str) -> String,
    mode: Option<&str>,
    options: Option<Vec<String>>,
    burned_in: Option<&str>,
    kind: Option<UplinkKind>,
) -> Option<Option<Deidentify>> {
    let basic = match mode {
        None | Some("none") => false,
        Some("basic") => true,
        Some(other) => {
            c.push(
                key("deidentify"),
                format!(
                    "{:?} is not a de-identification profile (\"none\" or \"basic\": PS3.15 Annex E Basic Profile)",
                    other.chars().take(40).collect::<String>()
                ),
            );
            return None;
        }
    };
    let mut ok = true;
    if basic && kind == Some(UplinkKind::MllpTls) {
        c.push(
            key("deidentify"),
            "only a DICOM destination (kind = \"dicomweb\") is de-identified",
        );
        ok = false;
    }
    if !basic && (options.is_some() || burned_in.is_some()) {
        c.push(
            key(if options.is_some() {
                "deidentify_options"
            } else {
                "deidentify_burned_in"
            }),
            "is only used with deidentify = \"basic\"",
        );
        ok = false;
    }
    let send_burned_in = match burned_in {
        None | Some("hold") => false,
        Some("send") => true,
        Some(_) => {
            c.push(
                key("deidentify_burned_in"),
                "must be \"hold\" (objects that may show identity in their pixels stay as dead letters) or \"send\"",
            );
            ok = false;
            false
        }
    };
    let mut parsed = Vec::new();
    for (j, value) in options.unwrap_or_default().iter().enumerate() {
        match value.parse::<gateway_deid::ProfileOption>() {
            Ok(o) if parsed.contains(&o) => {
                c.push(
                    format!("{}[{j}]", key("deidentify_options")),
                    format!("duplicate option {value:?}"),
                );
                ok = false;
            }
            Ok(o) => parsed.push(o),
            Err(e) => {
                c.push(format!("{}[{j}]", key("deidentify_options")), e.to_string());
                ok = false;
            }
        }
    }
    if ok
        && basic
        && let Err(e) = gateway_deid::Profile::new(&parsed)
    {
        c.push(key("deidentify_options"), e.to_string());
        ok = false;
    }
    ok.then(|| {
        basic.then_some(Deidentify {
            options: parsed,
            send_burned_in,
        })
    })
}

/// `uplink.message_types`: only on an mllp-tls uplink; not empty; each entry once.
fn message_types(
    c: &mut Collector,
    key: &str,
    raw: Option<Vec<String>>,
    kind: Option<UplinkKind>,
) -> Option<Option<Vec<Hl7MessageType>>> {
    let Some(raw) = raw else {
        return Some(None);
    };
    let mut ok = true;
    if kind == Some(UplinkKind::DicomWeb) {
        c.push(
            key,
            "only an HL7 destination (kind = \"mllp-tls\") takes message_types",
        );
        ok = false;
    }
    if raw.is_empty() {
        c.push(
            key,
            "must not be empty (remove the key for all message types)",
        );
        ok = false;
    }
    let mut out: Vec<Hl7MessageType> = Vec::with_capacity(raw.len());
    for (j, value) in raw.iter().enumerate() {
        let Some(t) = c.parse(format!("{key}[{j}]"), value, from_str::<Hl7MessageType>) else {
            ok = false;
            continue;
        };
        if let Some(first) = out.iter().position(|o| *o == t) {
            c.push(
                format!("{key}[{j}]"),
                format!(
                    "duplicate message type {:?} (already {key}[{first}])",
                    t.as_str()
                ),
            );
            ok = false;
        } else {
            out.push(t);
        }
    }
    ok.then_some(Some(out))
}

fn fleet(c: &mut Collector, raw: raw::RawFleet, production: Option<bool>) -> Option<Fleet> {
    let auth = mqtt_client_auth(
        c,
        "fleet",
        &raw.broker,
        MqttAuthRaw {
            ca_file: raw.ca_file.as_deref(),
            client_auth: raw.client_auth.as_deref(),
            cert_file: raw.cert_file.as_deref(),
            key_file: raw.key_file.as_deref(),
        },
        production,
    );
    let vendor_public_key = c.parse(
        "fleet.vendor_public_key",
        &raw.vendor_public_key,
        parse_path,
    );
    let client_auth = auth.as_ref().map(|a| a.2);
    let broker = auth.as_ref().map(|a| a.0.clone());
    let claim_cert = c.parse_opt(
        "fleet.claim_cert_file",
        raw.claim_cert_file.as_deref(),
        parse_path,
    );
    let claim_key = c.parse_opt(
        "fleet.claim_key_file",
        raw.claim_key_file.as_deref(),
        parse_path,
    );
    let claim = match (claim_cert, claim_key) {
        (Some(Some(cert_file)), Some(Some(key_file))) => Some(Some(Claim {
            cert_file,
            key_file,
        })),
        (Some(None), Some(None)) => Some(None),
        (Some(_), Some(_)) => {
            c.push(
                "fleet.claim_cert_file",
                "claim_cert_file and claim_key_file go together: set both or neither",
            );
            None
        }
        _ => None,
    };
    if matches!(claim, Some(Some(_))) {
        if client_auth == Some(ClientAuth::Files) {
            c.push(
                "fleet.claim_cert_file",
                "provisioning by claim obtains the key store identity's certificate: it needs \
                 client_auth = \"keystore\"",
            );
        }
        if broker.as_ref().is_some_and(BrokerUrl::is_plaintext) {
            c.push(
                "fleet.claim_cert_file",
                "provisioning by claim needs an mqtts:// broker (the claim certificate \
                 authenticates the gateway)",
            );
        }
    }
    let telemetry_interval = c
        .parse_or(
            "fleet.telemetry_interval",
            raw.telemetry_interval.as_deref(),
            defaults::FLEET_TELEMETRY_INTERVAL,
            from_str::<Duration>,
        )
        .and_then(|d| {
            if d.get() < std::time::Duration::from_secs(1)
                || d.get() > defaults::FLEET_TELEMETRY_INTERVAL_MAX.get()
            {
                c.push(
                    "fleet.telemetry_interval",
                    format!("{d} is outside 1s..=24h"),
                );
                None
            } else {
                Some(d)
            }
        });
    let (broker, ca_file, client_auth, cert_file, key_file) = auth?;
    Some(Fleet {
        broker,
        vendor_public_key: vendor_public_key?,
        ca_file,
        client_auth,
        cert_file,
        key_file,
        claim: claim?,
        telemetry_interval: telemetry_interval?,
    })
}

/// The TLS keys of an MQTT section (`fleet`, `exchange`), as written.
struct MqttAuthRaw<'a> {
    ca_file: Option<&'a str>,
    client_auth: Option<&'a str>,
    cert_file: Option<&'a str>,
    key_file: Option<&'a str>,
}

type MqttAuth = (
    BrokerUrl,
    Option<PathBuf>,
    ClientAuth,
    Option<PathBuf>,
    Option<PathBuf>,
);

/// `broker` (no plaintext in production), `ca_file` (required for `mqtts://`),
/// `client_auth` and the development files.
fn mqtt_client_auth(
    c: &mut Collector,
    section: &str,
    broker: &str,
    raw: MqttAuthRaw<'_>,
    production: Option<bool>,
) -> Option<MqttAuth> {
    let broker_url = c.parse(format!("{section}.broker"), broker, from_str::<BrokerUrl>);
    if production == Some(true) && broker_url.as_ref().is_some_and(BrokerUrl::is_plaintext) {
        c.push(
            format!("{section}.broker"),
            "plaintext mqtt is refused in production mode (use \"mqtts://\")",
        );
    }
    let ca_file = c.parse_opt(format!("{section}.ca_file"), raw.ca_file, parse_path);
    if raw.ca_file.is_none() && broker.starts_with("mqtts://") {
        c.push(
            format!("{section}.ca_file"),
            "required for an mqtts:// broker: the CA the broker's certificate is checked against",
        );
    }
    let client_auth = c.parse_or(
        format!("{section}.client_auth"),
        raw.client_auth,
        defaults::UPLINK_CLIENT_AUTH,
        from_str,
    );
    let cert_file = c.parse_opt(format!("{section}.cert_file"), raw.cert_file, parse_path);
    let key_file = c.parse_opt(format!("{section}.key_file"), raw.key_file, parse_path);
    match client_auth {
        Some(ClientAuth::Files) => {
            for (field, value) in [("cert_file", raw.cert_file), ("key_file", raw.key_file)] {
                if value.is_none() {
                    c.push(
                        format!("{section}.{field}"),
                        "is required when client_auth = \"files\"",
                    );
                }
            }
            if production == Some(true) {
                c.push(
                    format!("{section}.client_auth"),
                    "client_auth = \"files\" is refused in production mode (use \"keystore\")",
                );
            }
        }
        Some(ClientAuth::Keystore) => {
            for (field, value) in [("cert_file", raw.cert_file), ("key_file", raw.key_file)] {
                if value.is_some() {
                    c.push(
                        format!("{section}.{field}"),
                        "is only used with client_auth = \"files\"",
                    );
                }
            }
        }
        None => {}
    }
    Some((broker_url?, ca_file?, client_auth?, cert_file?, key_file?))
}

fn admin(c: &mut Collector, raw: raw::RawAdmin, production: Option<bool>) -> Option<Admin> {
    let listen = c.parse_or(
        "admin.listen",
        raw.listen.as_deref(),
        defaults::ADMIN_LISTEN,
        parse_socket_addr,
    )?;
    if production == Some(true) && !is_loopback(&listen) {
        c.push(
            "admin.listen",
            format!(
                "{:?} is refused in production mode (the admin endpoint is plaintext HTTP; use a loopback address)",
                listen.to_string()
            ),
        );
    }
    Some(Admin { listen })
}

fn booking(c: &mut Collector, raw: raw::RawBooking, production: Option<bool>) -> Option<Booking> {
    let listen = c.parse_or(
        "booking.listen",
        raw.listen.as_deref(),
        defaults::BOOKING_LISTEN,
        parse_socket_addr,
    );
    let mut schedules: Vec<Schedule> = Vec::new();
    let mut ok = true;
    for (i, s) in raw.schedule.unwrap_or_default().into_iter().enumerate() {
        let spec = ScheduleSpec {
            id: s.id,
            modality: s.modality,
            station_ae: s.station_ae,
            time_zone: s.time_zone,
            slot_minutes: s.slot_minutes,
            hours: s.hours,
            holidays: s.holidays.unwrap_or_default(),
        };
        match Schedule::new(&spec) {
            Ok(schedule) => {
                if schedules.iter().any(|other| other.id() == schedule.id()) {
                    c.push(
                        format!("booking.schedule[{i}].id"),
                        "another schedule has this id",
                    );
                    ok = false;
                }
                schedules.push(schedule);
            }
            Err(problems) => {
                ok = false;
                for p in problems {
                    c.push(format!("booking.schedule[{i}].{}", p.field), p.problem);
                }
            }
        }
    }
    let cert = c.parse_opt("booking.cert_file", raw.cert_file.as_deref(), parse_path);
    let key = c.parse_opt("booking.key_file", raw.key_file.as_deref(), parse_path);
    let tls_files = match (cert, key) {
        (Some(Some(cert)), Some(Some(key))) => Some(Some((cert, key))),
        (Some(None), Some(None)) => {
            if production == Some(true) {
                c.push(
                    "booking.cert_file",
                    "required in production mode (a self-signed certificate is made only in development)",
                );
            }
            Some(None)
        }
        (Some(_), Some(_)) => {
            c.push(
                "booking.cert_file",
                "cert_file and key_file go together: set both or neither",
            );
            None
        }
        _ => None,
    };
    let core = match raw.core {
        Some(id) if valid_peer_id(&id) => Some(Some(id)),
        Some(_) => {
            c.push("booking.core", "must be 1 to 64 of A-Z a-z 0-9 . _ -");
            None
        }
        None => Some(None),
    };
    let mut duration = |key: &str, value: Option<&str>, default: Duration| {
        c.parse_or(
            format!("booking.{key}"),
            value,
            default,
            from_str::<Duration>,
        )
        .and_then(|d| {
            if d.get().is_zero() {
                c.push(format!("booking.{key}"), "must be greater than zero");
                None
            } else {
                Some(d)
            }
        })
    };
    let request_timeout = duration(
        "request_timeout",
        raw.request_timeout.as_deref(),
        defaults::BOOKING_REQUEST_TIMEOUT,
    );
    let stale_after = duration(
        "stale_after",
        raw.stale_after.as_deref(),
        defaults::BOOKING_STALE_AFTER,
    );
    let publish_interval = duration(
        "publish_interval",
        raw.publish_interval.as_deref(),
        defaults::BOOKING_PUBLISH_INTERVAL,
    );
    let listen = listen?;
    ok.then_some(Booking {
        listen,
        tls_files: tls_files?,
        core: core?,
        request_timeout: request_timeout?,
        stale_after: stale_after?,
        publish_interval: publish_interval?,
        schedules,
    })
}

fn valid_peer_id(id: &str) -> bool {
    gateway_id::is_valid(id)
}

/// What each role needs: a clinic books with a core through the exchange; only a core has
/// schedules.
fn booking_roles(c: &mut Collector, role: Role, booking: &Booking, exchange: Option<&Exchange>) {
    match role {
        Role::Clinic => {
            if !booking.schedules.is_empty() {
                c.push(
                    "booking.schedule",
                    "schedules belong to the core (node.role = \"core\"); a clinic books from them",
                );
            }
            match (&booking.core, exchange) {
                (Some(_), None) => c.push(
                    "exchange",
                    "required on a clinic with booking.core: the regional broker it books through",
                ),
                (Some(core), Some(x)) if !x.peers.iter().any(|p| &p.id == core) => c.push(
                    "booking.core",
                    "must be one of the [[exchange.peers]] ids (its public key seals the requests)",
                ),
                _ => {}
            }
        }
        Role::Core => {
            if booking.core.is_some() {
                c.push("booking.core", "only a clinic names a core");
            }
        }
    }
}

fn exchange(
    c: &mut Collector,
    raw: raw::RawExchange,
    production: Option<bool>,
) -> Option<Exchange> {
    let auth = mqtt_client_auth(
        c,
        "exchange",
        &raw.broker,
        MqttAuthRaw {
            ca_file: raw.ca_file.as_deref(),
            client_auth: raw.client_auth.as_deref(),
            cert_file: raw.cert_file.as_deref(),
            key_file: raw.key_file.as_deref(),
        },
        production,
    );
    let mut peers: Vec<Peer> = Vec::new();
    let mut peers_ok = true;
    for (i, p) in raw.peers.into_iter().enumerate() {
        if !valid_peer_id(&p.id) {
            c.push(
                format!("exchange.peers[{i}].id"),
                "must be 1 to 64 of A-Z a-z 0-9 . _ -",
            );
            peers_ok = false;
        } else if peers.iter().any(|q| q.id == p.id) {
            c.push(
                format!("exchange.peers[{i}].id"),
                "another peer has this id",
            );
            peers_ok = false;
        }
        let key = p.public_key.trim();
        if key.len() != 44 || !key.ends_with('=') {
            c.push(
                format!("exchange.peers[{i}].public_key"),
                "must be the 44-character base64 X25519 key `gatewayd keys exchange-public` prints",
            );
            peers_ok = false;
        }
        peers.push(Peer {
            id: p.id,
            public_key: key.to_owned(),
        });
    }
    let (broker, ca_file, client_auth, cert_file, key_file) = auth?;
    Some(Exchange {
        broker,
        ca_file,
        client_auth,
        cert_file,
        key_file,
        peers: peers_ok.then_some(peers)?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let settings = Settings::from_toml_str(EMBEDDED_DEFAULT_TOML);
        assert!(
            settings.is_ok(),
            "{}",
            settings.err().map(|e| e.to_string()).unwrap_or_default()
        );
        let settings = Settings::embedded_default();
        assert_eq!(settings.node.id.as_str(), "dev-gateway");
        assert_eq!(settings.node.mode, Mode::Development);
        assert_eq!(settings.node.data_dir, PathBuf::from("gatewayd-data"));
        assert_eq!(settings.keystore.backend, KeystoreBackend::Software);
        assert_eq!(
            settings.dicom.unwrap().listen,
            "127.0.0.1:11112".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(settings.admin.unwrap().listen, defaults::ADMIN_LISTEN);
    }

    #[test]
    fn loopback_covers_v4_v6_and_v4_mapped() {
        for addr in [
            "127.0.0.1:1",
            "127.1.2.3:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(&addr.parse().unwrap()), "{addr}");
        }
        for addr in [
            "0.0.0.0:1",
            "[::]:1",
            "192.168.1.1:1",
            "[::ffff:10.0.0.1]:1",
        ] {
            assert!(!is_loopback(&addr.parse().unwrap()), "{addr}");
        }
    }
}
