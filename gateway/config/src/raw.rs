//! The raw TOML schema: exactly what serde reads, nothing more.
//!
//! Every struct denies unknown keys, so a typo is an error rather than a silently ignored
//! setting. Fields whose typed parse can fail with a useful message (addresses, sizes,
//! durations, keywords) are read as strings here and parsed in [`crate::settings`], so one
//! bad value does not hide the others. Fields that are plain numbers stay numbers: serde
//! reports a wrong type with the key path.

use serde::Deserialize;

use crate::error::Problem;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// Required: its absence is a problem of the semantic pass, so that the sections
    /// present are still checked.
    pub node: Option<RawNode>,
    pub dicom: Option<RawDicom>,
    pub hl7: Option<RawHl7>,
    pub spool: Option<RawSpool>,
    pub keystore: Option<RawKeystore>,
    #[serde(default)]
    pub uplink: Vec<RawUplink>,
    pub fleet: Option<RawFleet>,
    pub admin: Option<RawAdmin>,
    pub booking: Option<RawBooking>,
    pub exchange: Option<RawExchange>,
    pub results: Option<RawResults>,
    pub identity: Option<RawIdentity>,
    pub safety: Option<RawSafety>,
    pub update: Option<RawUpdate>,
}

/// `[update]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpdate {
    pub max_bundle_bytes: Option<String>,
    pub health_timeout: Option<String>,
    pub download_deadline: Option<String>,
    pub max_bytes_per_sec: Option<String>,
    pub ca_file: Option<String>,
    pub reboot_request_file: Option<String>,
    pub rauc_command: Option<String>,
}

/// `[node]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    pub id: String,
    pub role: Option<String>,
    pub data_dir: String,
    pub mode: Option<String>,
}

/// `[dicom]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDicom {
    pub listen: Option<String>,
    pub ae_title: Option<String>,
    pub max_associations: Option<u32>,
    pub max_associations_per_peer: Option<u32>,
    pub max_pdu_length: Option<String>,
    pub artim_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub shutdown_grace: Option<String>,
    pub tls_listen: Option<String>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub tls_client_ca_file: Option<String>,
    #[serde(default)]
    pub peers: Vec<RawDicomPeer>,
}

/// `[[dicom.peers]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDicomPeer {
    pub ae_title: String,
    pub host: String,
    pub max_associations: Option<u32>,
    pub tls_client_name: Option<String>,
}

/// `[hl7]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHl7 {
    pub listen: Option<String>,
    pub charset: Option<String>,
    pub max_frame_bytes: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<u32>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub tls_client_ca_file: Option<String>,
    #[serde(default)]
    pub peers: Vec<RawHl7Peer>,
}

/// `[[hl7.peers]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHl7Peer {
    pub host: Option<String>,
    pub sending_application: Option<String>,
    pub sending_facility: Option<String>,
    pub tls_client_name: Option<String>,
}

/// `[spool]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSpool {
    pub max_bytes: Option<String>,
    pub min_free_bytes: Option<String>,
    pub keep_sent_for: Option<String>,
    pub index_cache_bytes: Option<String>,
    pub dedupe_window: Option<String>,
}

/// `[keystore]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKeystore {
    pub backend: Option<String>,
    pub tcti: Option<String>,
    pub pcrs: Option<Vec<i64>>,
    pub allow_software_tpm: Option<bool>,
}

/// `[[uplink]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUplink {
    pub name: String,
    pub kind: Option<String>,
    pub url: String,
    pub ca_file: Option<String>,
    pub client_auth: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub max_bytes_per_sec: Option<String>,
    pub batch_max_instances: Option<u32>,
    pub max_concurrent_requests: Option<u32>,
    pub message_types: Option<Vec<String>>,
    pub deidentify: Option<String>,
    pub deidentify_options: Option<Vec<String>>,
    pub deidentify_burned_in: Option<String>,
    pub max_queued: Option<u64>,
}

/// `[fleet]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFleet {
    pub broker: String,
    pub vendor_public_key: String,
    pub ca_file: Option<String>,
    pub client_auth: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub claim_cert_file: Option<String>,
    pub claim_key_file: Option<String>,
    pub telemetry_interval: Option<String>,
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub listen: Option<String>,
}

/// `[booking]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBooking {
    pub listen: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub core: Option<String>,
    pub request_timeout: Option<String>,
    pub stale_after: Option<String>,
    pub publish_interval: Option<String>,
    pub schedule: Option<Vec<RawSchedule>>,
}

/// `[exchange]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExchange {
    pub broker: String,
    pub ca_file: Option<String>,
    pub client_auth: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
}

/// `[[exchange.peers]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPeer {
    pub id: String,
    pub public_key: String,
}

/// `[[booking.schedule]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchedule {
    pub id: String,
    pub modality: String,
    pub station_ae: String,
    pub time_zone: Option<String>,
    pub slot_minutes: Option<u32>,
    pub hours: Option<std::collections::BTreeMap<String, String>>,
    pub holidays: Option<Vec<String>>,
}

/// Longest structural error message repeated back; serde messages quote the bad value.
const MAX_MESSAGE_CHARS: usize = 200;

/// Reads `text` into the raw schema. A TOML syntax error becomes one problem keyed
/// `config` with its line and column; a serde error (unknown key, wrong type, missing
/// key) becomes one problem keyed by its TOML path.
pub(crate) fn parse(text: &str) -> Result<RawConfig, Problem> {
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| syntax_problem(text, &e))?;
    serde_path_to_error::deserialize(deserializer)
        .map_err(|e| structural_problem(e.path(), e.inner()))
}

fn syntax_problem(text: &str, error: &toml::de::Error) -> Problem {
    let message = clip_message(error.message());
    let position = error
        .span()
        .and_then(|span| text.get(..span.start))
        .map(|before| {
            let line = before.matches('\n').count() + 1;
            let column = before
                .rsplit('\n')
                .next()
                .unwrap_or_default()
                .chars()
                .count()
                + 1;
            format!(" at line {line}, column {column}")
        })
        .unwrap_or_default();
    Problem::new("config", format!("TOML syntax error{position}: {message}"))
}

fn structural_problem(path: &serde_path_to_error::Path, error: &toml::de::Error) -> Problem {
    let mut key = key_path(path);
    let message = error.message();
    let message = if let Some(rest) = message.strip_prefix("unknown field `") {
        // "unknown field `foo`, expected one of `a`, `b`". serde_path_to_error has
        // already recorded `foo` as the last segment; add it only if it has not.
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let recorded = matches!(
            path.iter().next_back(),
            Some(serde_path_to_error::Segment::Map { key: last }) if last == field
        );
        if !recorded {
            push_key(&mut key, field);
        }
        let expected = expected.trim_start_matches(", ").replace('`', "");
        if expected.is_empty() {
            "unknown key".to_owned()
        } else {
            format!("unknown key ({expected})")
        }
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest);
        push_key(&mut key, field);
        "missing required key".to_owned()
    } else {
        message.to_owned()
    };
    if key.is_empty() {
        key.push_str("config");
    }
    Problem::new(key, clip_message(&message))
}

/// `dicom.peers[0].host` from serde's path segments.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                push_key(&mut key, name)
            }
            Segment::Unknown => push_key(&mut key, "?"),
        }
    }
    key
}

fn push_key(key: &mut String, name: &str) {
    if !key.is_empty() {
        key.push('.');
    }
    key.push_str(&clip_message(name));
}

fn clip_message(message: &str) -> String {
    if message.chars().count() <= MAX_MESSAGE_CHARS {
        message.to_owned()
    } else {
        let mut clipped: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
        clipped.push('…');
        clipped
    }
}

/// `[results]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResults {
    pub source: String,
    pub rewrite_patient_id: Option<bool>,
    pub patient_id_issuer: Option<String>,
    pub complete_after: Option<String>,
    #[serde(default)]
    pub deliver: Vec<RawDeliver>,
}

/// `[[results.deliver]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeliver {
    pub name: String,
    pub kind: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub called_ae: Option<String>,
    pub calling_ae: Option<String>,
    pub uplink: Option<String>,
    pub tls_ca_file: Option<String>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
}

/// `[identity]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentity {
    pub hospital_id: Option<String>,
    pub model: Option<String>,
}

/// `[safety]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSafety {
    pub dose_window_days: Option<u32>,
    pub dlp_threshold_mgy_cm: Option<f64>,
}
