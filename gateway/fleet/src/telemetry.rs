//! The telemetry payload published on `gw/{device_id}/telemetry` (and as the result of a
//! `status` command). Only versions, durations, counts, byte sizes, configured names
//! (destination names, key store backend) and states: no patient data, no UIDs, no peer
//! addresses.
//!
//! ```json
//! {"version":"0.1.0","at":1767225600,"uptime_secs":3600,"disk_free_bytes":52428800000,
//!  "last_upload_at":1767225590,
//!  "destinations":[{"name":"cloud-archive","kind":"dicomweb","queued":12,
//!                   "oldest_age_secs":40,"last_success_at":1767225590,"failing":false}],
//!  "dicom":{"associations_active":1,"associations_total":120,"associations_rejected_total":2,
//!           "stored_total":4000,"store_failures_total":1},
//!  "hl7":{"connections_active":0,"messages_total":310,"accepted_total":305,
//!         "errors_total":3,"rejected_total":2},
//!  "keystore":{"backend":"tpm","tamper":"intact"},
//!  "spool":{"objects":4310,"bytes":1073741824,"oldest_age_secs":40}}
//! ```
//!
//! Fields are added, never renamed or removed; consumers must ignore unknown fields.

use serde::{Deserialize, Serialize};

/// One telemetry sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Telemetry {
    /// Firmware version (`CARGO_PKG_VERSION` of gatewayd).
    pub version: String,
    /// Unix seconds when the sample was taken.
    pub at: u64,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Free bytes on the file system holding `node.data_dir`.
    pub disk_free_bytes: u64,
    /// Last time any destination confirmed an object (unix seconds), if ever.
    pub last_upload_at: Option<u64>,
    /// Spool queue per configured destination.
    pub destinations: Vec<DestinationTelemetry>,
    pub dicom: DicomCounters,
    pub hl7: Hl7Counters,
    pub keystore: KeyStoreTelemetry,
    /// Whole-spool totals (added after the first release: absent = zeros).
    #[serde(default)]
    pub spool: SpoolTelemetry,
}

/// The spool as a whole: objects in the index, sealed bytes on disk, and the age of the
/// oldest object not yet sent everywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolTelemetry {
    pub objects: u64,
    pub bytes: u64,
    pub oldest_age_secs: Option<u64>,
}

/// The spool queue of one `[[uplink]]` destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationTelemetry {
    /// The configured `uplink.name`.
    pub name: String,
    /// The configured `uplink.kind` (`dicomweb`, `mllp-tls`).
    pub kind: String,
    /// Objects queued for this destination (spool depth).
    pub queued: u64,
    /// Age in seconds of the oldest queued object; `None` when the queue is empty.
    pub oldest_age_secs: Option<u64>,
    /// Last time this destination confirmed an object (unix seconds), if ever.
    pub last_success_at: Option<u64>,
    /// True while the destination is in back-off after an error.
    pub failing: bool,
}

/// DICOM association and storage counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DicomCounters {
    pub associations_active: u64,
    pub associations_total: u64,
    pub associations_rejected_total: u64,
    /// C-STORE answered 0000.
    pub stored_total: u64,
    /// C-STORE answered with a failure status.
    pub store_failures_total: u64,
}

/// HL7 listener counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hl7Counters {
    pub connections_active: u64,
    pub messages_total: u64,
    /// Answered AA/CA.
    pub accepted_total: u64,
    /// Answered AE/CE.
    pub errors_total: u64,
    /// Answered AR/CR.
    pub rejected_total: u64,
}

/// The key store back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyBackend {
    Software,
    Tpm,
}

/// The key store's tamper check (pinned storage key Name, see docs/adr/0003).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TamperState {
    /// The TPM storage key is present and its Name matches the pinned one.
    Intact,
    /// Missing storage key or Name mismatch.
    Tampered,
    /// No check possible (software key store) or not checked yet.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStoreTelemetry {
    pub backend: KeyBackend,
    pub tamper: TamperState,
}

impl Telemetry {
    /// JSON bytes of the sample.
    pub fn to_json(&self) -> Vec<u8> {
        // Strings, integers, options, vectors and unit enums always serialise.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Telemetry {
        Telemetry {
            version: "0.1.0".into(),
            at: 1_767_225_600,
            uptime_secs: 3600,
            disk_free_bytes: 52_428_800_000,
            last_upload_at: Some(1_767_225_590),
            destinations: vec![DestinationTelemetry {
                name: "cloud-archive".into(),
                kind: "dicomweb".into(),
                queued: 12,
                oldest_age_secs: Some(40),
                last_success_at: Some(1_767_225_590),
                failing: false,
            }],
            dicom: DicomCounters {
                associations_active: 1,
                associations_total: 120,
                associations_rejected_total: 2,
                stored_total: 4000,
                store_failures_total: 1,
            },
            hl7: Hl7Counters {
                connections_active: 0,
                messages_total: 310,
                accepted_total: 305,
                errors_total: 3,
                rejected_total: 2,
            },
            keystore: KeyStoreTelemetry {
                backend: KeyBackend::Tpm,
                tamper: TamperState::Intact,
            },
            spool: SpoolTelemetry {
                objects: 4310,
                bytes: 1_073_741_824,
                oldest_age_secs: Some(40),
            },
        }
    }

    #[test]
    fn telemetry_serialises_to_the_documented_field_names() {
        let v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        let expected = serde_json::json!({
            "version":"0.1.0","at":1767225600u64,"uptime_secs":3600,"disk_free_bytes":52428800000u64,
            "last_upload_at":1767225590u64,
            "destinations":[{"name":"cloud-archive","kind":"dicomweb","queued":12,
                             "oldest_age_secs":40,"last_success_at":1767225590u64,"failing":false}],
            "dicom":{"associations_active":1,"associations_total":120,"associations_rejected_total":2,
                     "stored_total":4000,"store_failures_total":1},
            "hl7":{"connections_active":0,"messages_total":310,"accepted_total":305,
                   "errors_total":3,"rejected_total":2},
            "keystore":{"backend":"tpm","tamper":"intact"},
            "spool":{"objects":4310,"bytes":1073741824u64,"oldest_age_secs":40}
        });
        assert_eq!(v, expected);
    }

    #[test]
    fn telemetry_round_trips() {
        let t = sample();
        let back: Telemetry = serde_json::from_slice(&t.to_json()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn telemetry_without_the_spool_field_reads_as_zeros() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v.as_object_mut().unwrap().remove("spool");
        let back: Telemetry = serde_json::from_value(v).unwrap();
        assert_eq!(back.spool, SpoolTelemetry::default());
    }
}
