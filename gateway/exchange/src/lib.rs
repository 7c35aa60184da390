//! The regional exchange's message sealing: booking messages carry patient identity, so each
//! is encrypted to the recipient gateway and authenticated as its sender's, on top of the
//! broker's TLS. The broker operator sees routing ids and ciphertext only.
//!
//! HPKE (RFC 9180) in Auth mode: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305,
//! `info` = `gatewayd exchange v1`. Each gateway has one static X25519 key pair
//! ([`ExchangeKey`]); peers' public keys come from config ([`PeerKey`], base64). The
//! routing header (sender, recipient, kind, message id) is the AEAD's associated data, so a
//! sealed body cannot be re-addressed, relabelled or replayed under another id without
//! failing to open.
//!
//! The wire form is [`Envelope`], JSON: `{"v":1,"from","to","kind","id","enc","ct"}` with
//! `enc` and `ct` base64. [`Envelope::parse`] takes untrusted bytes (fuzzed).
//!
//! Every routing field is a topic-safe id (`gateway-id`), checked when sealing, parsing and
//! opening. The key pair is derived from the key store's master key
//! ([`ExchangeKey::derive`], `KeyPurpose::ExchangeX25519`).

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use gateway_keystore::{KeyPurpose, MasterKey};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use rand_core::TryRngCore as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

type Kem = X25519HkdfSha256;
const INFO: &[u8] = b"gatewayd exchange v1";
/// Largest envelope accepted from the wire.
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;

/// Exchange failures; none of them carries message content.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExchangeError {
    #[error("exchange key: {0}")]
    Key(&'static str),
    #[error("envelope: {0}")]
    Malformed(String),
    #[error("envelope addressed to {to}, this gateway is {me}")]
    NotForUs { to: String, me: String },
    #[error("envelope does not open: not sealed by the named sender for this gateway, or altered")]
    Open,
    #[error("cannot seal: {0}")]
    Seal(&'static str),
}

/// This gateway's key pair; the secret is kept as the 32-byte seed it is derived from.
pub struct ExchangeKey {
    seed: Zeroizing<[u8; 32]>,
    sk: <Kem as hpke::Kem>::PrivateKey,
    pk: <Kem as hpke::Kem>::PublicKey,
}

impl std::fmt::Debug for ExchangeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeKey")
            .field("public", &self.public().to_base64())
            .finish_non_exhaustive()
    }
}

impl ExchangeKey {
    /// A fresh key pair from the OS's random source.
    pub fn generate() -> Result<Self, ExchangeError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(seed.as_mut()).map_err(|_| ExchangeError::Key("no randomness"))?;
        Ok(Self::from_seed(*seed))
    }

    /// The key pair derived from a stored seed (RFC 9180 DeriveKeyPair).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let (sk, pk) = Kem::derive_keypair(&seed);
        Self {
            seed: Zeroizing::new(seed),
            sk,
            pk,
        }
    }

    /// The gateway's exchange key, derived from the key store's master key (so it is held
    /// by the key store like every other key, needs no file of its own, and goes with a
    /// crypto-shred): the seed is [`MasterKey::derive`] for
    /// [`KeyPurpose::ExchangeX25519`], so it is apart from every other derived key.
    pub fn derive(master: &MasterKey) -> Self {
        Self::from_seed(*master.derive(KeyPurpose::ExchangeX25519).expose())
    }

    /// The seed to store (sealed by the key store).
    pub fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    pub fn public(&self) -> PeerKey {
        PeerKey(self.pk.clone())
    }
}

/// A peer gateway's public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerKey(<Kem as hpke::Kem>::PublicKey);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerKey({})", self.to_base64())
    }
}

impl PeerKey {
    /// From the base64 of its 32 bytes, as `gatewayd` prints it and config holds it.
    pub fn from_base64(text: &str) -> Result<Self, ExchangeError> {
        let bytes = B64
            .decode(text.trim())
            .map_err(|_| ExchangeError::Key("public key is not base64"))?;
        <Kem as hpke::Kem>::PublicKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| ExchangeError::Key("public key is not 32 bytes of X25519"))
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_bytes())
    }
}

/// Who a message is from and for, and what it is: sent in clear, bound to the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    /// Sender's node id.
    pub from: String,
    /// Recipient's node id.
    pub to: String,
    /// e.g. `booking-request`, `booking-decision`, `slots`.
    pub kind: String,
    /// Unique per message (the booking request id for requests and their decisions).
    pub id: String,
}

impl Routing {
    fn aad(&self) -> Vec<u8> {
        // Length-prefixed, so no two different headers give the same bytes.
        let mut out = b"v1".to_vec();
        for part in [&self.from, &self.to, &self.kind, &self.id] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out
    }

    fn check(&self) -> Result<(), ExchangeError> {
        if [&self.from, &self.to, &self.kind, &self.id]
            .iter()
            .all(|s| gateway_id::is_valid(s))
        {
            Ok(())
        } else {
            Err(ExchangeError::Malformed(
                "routing ids are 1-64 of A-Z a-z 0-9 - _ .".into(),
            ))
        }
    }
}

/// A sealed message as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub v: u8,
    pub from: String,
    pub to: String,
    pub kind: String,
    pub id: String,
    /// HPKE encapsulated key, base64.
    pub enc: String,
    /// Ciphertext with its tag, base64.
    pub ct: String,
}

impl Envelope {
    /// Parses untrusted bytes (size-capped, strict fields, valid routing ids).
    pub fn parse(bytes: &[u8]) -> Result<Self, ExchangeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(ExchangeError::Malformed(format!(
                "over {MAX_ENVELOPE_BYTES} bytes"
            )));
        }
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| {
            ExchangeError::Malformed(format!(
                "not an envelope: line {} column {}",
                e.line(),
                e.column()
            ))
        })?;
        if env.v != 1 {
            return Err(ExchangeError::Malformed(format!(
                "version {} unknown",
                env.v
            )));
        }
        env.routing().check()?;
        Ok(env)
    }

    /// The routing header.
    pub fn routing(&self) -> Routing {
        Routing {
            from: self.from.clone(),
            to: self.to.clone(),
            kind: self.kind.clone(),
            id: self.id.clone(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Seals `plaintext` from `me` to `peer` under `routing`.
pub fn seal(
    me: &ExchangeKey,
    peer: &PeerKey,
    routing: Routing,
    plaintext: &[u8],
) -> Result<Envelope, ExchangeError> {
    routing.check()?;
    let mode = OpModeS::<Kem>::Auth((me.sk.clone(), me.pk.clone()));
    let mut rng = rand_core::OsRng.unwrap_err();
    let aad = routing.aad();
    let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem, _>(
        &mode, &peer.0, INFO, plaintext, &aad, &mut rng,
    )
    .map_err(|_| ExchangeError::Seal("HPKE seal failed"))?;
    Ok(Envelope {
        v: 1,
        from: routing.from,
        to: routing.to,
        kind: routing.kind,
        id: routing.id,
        enc: B64.encode(enc.to_bytes()),
        ct: B64.encode(ct),
    })
}

/// Opens an envelope addressed to `me_id`, which must have been sealed by `sender`'s key.
pub fn open(
    me: &ExchangeKey,
    me_id: &str,
    sender: &PeerKey,
    envelope: &Envelope,
) -> Result<Vec<u8>, ExchangeError> {
    let routing = envelope.routing();
    routing.check()?;
    if routing.to != me_id {
        return Err(ExchangeError::NotForUs {
            to: routing.to.clone(),
            me: me_id.to_string(),
        });
    }
    let enc = B64
        .decode(&envelope.enc)
        .ok()
        .and_then(|b| <Kem as hpke::Kem>::EncappedKey::from_bytes(&b).ok())
        .ok_or_else(|| ExchangeError::Malformed("enc is not an X25519 encapsulated key".into()))?;
    let ct = B64
        .decode(&envelope.ct)
        .map_err(|_| ExchangeError::Malformed("ct is not base64".into()))?;
    let mode = OpModeR::<Kem>::Auth(sender.0.clone());
    hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &mode,
        &me.sk,
        &enc,
        INFO,
        &ct,
        &routing.aad(),
    )
    .map_err(|_| ExchangeError::Open)
}

#[cfg(test)]
mod tests;
