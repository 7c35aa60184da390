//! Provisioning by claim: how a factory-fresh box becomes a named device.
//!
//! The box leaves the factory with a *claim credential* (a certificate and key shared by
//! nothing else, CN = the claim id, `fleet.claim_cert_file` / `fleet.claim_key_file`) and
//! a TPM whose identity key has no certificate yet. While `<data_dir>/fleet/state.json`
//! holds no device id:
//!
//! 1. The gateway connects to the broker with the claim credential (clean session, client id
//!    = claim id), subscribes to `prov/{claim}/cmd/+/+` and publishes, retained and QoS 1,
//!    a [`CsrMessage`] on `prov/{claim}/csr`: a PKCS#10 request signed by its identity key.
//! 2. The vendor's provisioning service picks a device id, issues a client certificate for
//!    the CSR's key with CN = that id, and publishes a signed command (the envelope of
//!    [`crate::command`], `device_id` = the claim id, `op` = `provision`, `args` =
//!    `{"device_id", "certificate"}`) on `prov/{claim}/cmd/provision/{cmd_id}`.
//! 3. The gateway verifies it like any command (signature, claim id, expiry, sequence),
//!    persists the sequence, checks that the certificate certifies *its* identity key and
//!    names the device id, installs it, records the device id, reports `successful` on
//!    `.../state`, clears its retained CSR, deletes the claim credential, and reconnects as
//!    the device (`gw/{device_id}/...`, authenticated by the TPM key).
//!
//! Everything on these topics is an identifier, a public key or a certificate: no patient
//! data, and nothing secret (the identity key never leaves the TPM).

use serde::Serialize;

/// The CSR a claiming gateway publishes on [`crate::topics::csr_topic`] (retained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CsrMessage {
    /// Format of this message: 1.
    pub v: u32,
    /// The claim id (the claim certificate's CN, also in the topic).
    pub claim: String,
    /// PKCS#10, PEM, signed by the device identity key.
    pub csr: String,
    /// Firmware version.
    pub version: String,
    /// Unix seconds when it was made.
    pub at: u64,
}

impl CsrMessage {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_message_is_flat_json() {
        let m = CsrMessage {
            v: 1,
            claim: "claim-1".into(),
            csr: "-----BEGIN CERTIFICATE REQUEST-----\n".into(),
            version: "0.1.0".into(),
            at: 5,
        };
        let v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["claim"], "claim-1");
        assert_eq!(v["at"], 5);
        assert!(v["csr"].as_str().unwrap().starts_with("-----BEGIN"));
    }
}
