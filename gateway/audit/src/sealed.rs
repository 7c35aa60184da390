//! Sealed participants: the patient data an audit record needs for its standard audit
//! message (Patient ID, Study Instance UID, SOP classes of a DICOM transfer), kept in the
//! chain only sealed.
//!
//! Format of the record's `participants` field: base64 (standard alphabet, padded) of a
//! 12-byte random nonce followed by the AES-256-GCM ciphertext and tag of the JSON of
//! [`Participants`]. The additional data is `gatewayd audit participants v1` and the
//! record's `seq` (u64 LE), so a sealed part cannot be moved to another record unnoticed
//! even before the MAC is checked. The construction is the one the booking and registry
//! stores use for their sealed files (`aes-gcm` with a random nonce per seal).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use gateway_keystore::{DerivedKey, KEY_LEN, KeyPurpose, MasterKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::AuditError;

const NONCE_LEN: usize = 12;
const AAD_LABEL: &[u8] = b"gatewayd audit participants v1";

/// The key audit records' participants are sealed with ([`KeyPurpose::AuditParticipants`]).
#[derive(Clone)]
pub struct ParticipantsKey(DerivedKey);

impl std::fmt::Debug for ParticipantsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParticipantsKey(..)")
    }
}

/// One SOP class of a transfer and how many instances of it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SopClassCount {
    /// The SOP Class UID.
    pub uid: String,
    pub count: u64,
}

/// The participant objects of a DICOM transfer's audit message (PS3.15 A.5.3 DICOM
/// Instances Transferred): patient data, so only ever stored sealed. `Debug` shows counts,
/// never values.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participants {
    /// Patient ID (0010,0020) as received (may be empty).
    pub patient_id: String,
    /// Study Instance UID (0020,000D).
    pub study_uid: String,
    /// The SOP classes of the study's instances in this transfer, with counts.
    pub sop_classes: Vec<SopClassCount>,
}

impl std::fmt::Debug for Participants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participants")
            .field("sop_classes", &self.sop_classes.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SopClassCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SopClassCount")
            .field("uid", &self.uid)
            .field("count", &self.count)
            .finish()
    }
}

impl ParticipantsKey {
    /// The key derived from the spool master key for [`KeyPurpose::AuditParticipants`].
    pub fn new(master: &MasterKey) -> Self {
        Self(master.derive(KeyPurpose::AuditParticipants))
    }

    /// [`ParticipantsKey::new`] from the master key's raw bytes.
    pub fn derive(master: &[u8; KEY_LEN]) -> Self {
        Self::new(&MasterKey::from_bytes(*master))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.expose().into())
    }

    /// Seals `participants` for the record `seq`.
    pub(crate) fn seal(&self, seq: u64, participants: &Participants) -> Result<String, AuditError> {
        let plain = Zeroizing::new(serde_json::to_vec(participants)?);
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|_| AuditError::Sealed {
            seq,
            problem: "found no randomness for a nonce",
        })?;
        let ct = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad(seq),
                },
            )
            .map_err(|_| AuditError::Sealed {
                seq,
                problem: "could not be sealed",
            })?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(B64.encode(out))
    }

    /// Opens the sealed participants of the record `seq`.
    pub(crate) fn open(&self, seq: u64, sealed: &str) -> Result<Participants, AuditError> {
        let bad = |problem| AuditError::Sealed { seq, problem };
        let bytes = B64.decode(sealed).map_err(|_| bad("are not base64"))?;
        if bytes.len() < NONCE_LEN {
            return Err(bad("are truncated"));
        }
        let (nonce, ct) = bytes.split_at(NONCE_LEN);
        let plain = Zeroizing::new(
            self.cipher()
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: &aad(seq),
                    },
                )
                .map_err(|_| bad("do not open (another key, or altered)"))?,
        );
        serde_json::from_slice(&plain).map_err(|_| bad("do not decode"))
    }
}

fn aad(seq: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_LABEL.len() + 8);
    aad.extend_from_slice(AAD_LABEL);
    aad.extend_from_slice(&seq.to_le_bytes());
    aad
}
