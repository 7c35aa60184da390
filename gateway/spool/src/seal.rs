//! The sealed blob format: chunked AES-256-GCM under a per-object data key.
//!
//! ```text
//! header (HEADER_LEN bytes, authenticated as AAD of every chunk)
//!   0..4    magic "GWS1"
//!   4..12   master key id (which key wrapped the data key)
//!   12..28  object id
//!   28..40  wrap nonce
//!   40..88  data key wrapped with AES-256-GCM under the master key (32 + 16 tag)
//!   88..95  stream nonce prefix (random)
//! chunks
//!   each: ciphertext of up to CHUNK plaintext bytes, then its 16-byte tag;
//!   nonce = prefix (7) || chunk counter (u32 BE) || last-chunk flag (1)
//! ```
//!
//! This is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): chunks
//! cannot be reordered (counter), dropped at the end (last flag) or moved to another
//! object (header as AAD). Every chunk before the last is exactly `CHUNK` bytes, so a
//! reader knows the last chunk from the file length alone.
//!
//! AES-256-GCM comes from `aws-lc-rs` (AWS-LC, the library rustls already links): its
//! VAES/AVX-512 and AES-NI code seals several times faster than RustCrypto's `aes-gcm`,
//! which was the larger part of the per-object ingest cost
//! (`examples/seal_speed.rs` measures both). The bytes are the same as ever: GCM is
//! standard and the nonces and AAD are unchanged (`sealed_bytes_are_pinned`).

use std::io::{Read, Write};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use gateway_keystore::{KEY_LEN, KeyId, MasterKey};
use zeroize::Zeroizing;

/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
/// GCM tag length.
pub const TAG: usize = 16;
/// Bytes of the blob header.
pub const HEADER_LEN: usize = 95;
const MAGIC: &[u8; 4] = b"GWS1";
const WRAP_AAD: &[u8] = b"gatewayd spool data key v1";

/// Why a blob could not be opened. Says nothing about the content.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("not a sealed blob (bad magic)")]
    BadMagic,
    #[error("blob is truncated")]
    Truncated,
    #[error("blob was sealed under master key {blob} but the key store holds {current}")]
    WrongKey { blob: KeyId, current: KeyId },
    #[error("data key does not unwrap (tampered header or wrong key)")]
    Unwrap,
    #[error("chunk {index} failed authentication (tampered or corrupt)")]
    Chunk { index: u32 },
    #[error("blob has more than 2^32 chunks")]
    TooLong,
    #[error("random source failed")]
    Random,
}

/// Builds the header and the chunk sealer of a new object.
pub struct Sealer {
    /// The data key's AES-GCM context. AWS-LC keeps it in memory from its own allocator,
    /// which zeroes it when freed (the key schedule does not outlive the sealer).
    cipher: LessSafeKey,
    header: [u8; HEADER_LEN],
    prefix: [u8; 7],
    counter: u32,
    pending: Vec<u8>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A fresh random data key, wrapped under `master`, bound to `object_id`.
    pub fn new(master: &MasterKey, object_id: &[u8; 16]) -> Result<Self, SealError> {
        let mut dek = Zeroizing::new([0u8; KEY_LEN]);
        let mut wrap_nonce = [0u8; 12];
        let mut prefix = [0u8; 7];
        getrandom::getrandom(dek.as_mut()).map_err(|_| SealError::Random)?;
        getrandom::getrandom(&mut wrap_nonce).map_err(|_| SealError::Random)?;
        getrandom::getrandom(&mut prefix).map_err(|_| SealError::Random)?;
        Self::with_secrets(master, object_id, dek, wrap_nonce, prefix)
    }

    /// [`Sealer::new`] with its random parts given: tests pin the on-disk bytes with it.
    fn with_secrets(
        master: &MasterKey,
        object_id: &[u8; 16],
        dek: Zeroizing<[u8; KEY_LEN]>,
        wrap_nonce: [u8; 12],
        prefix: [u8; 7],
    ) -> Result<Self, SealError> {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(MAGIC);
        header[4..12].copy_from_slice(&master.id().0);
        header[12..28].copy_from_slice(object_id);
        header[28..40].copy_from_slice(&wrap_nonce);
        // Holds the data key until it is encrypted in place: zeroed on drop, so no copy is
        // left should the wrap fail.
        let mut wrapped = Zeroizing::new([0u8; KEY_LEN]);
        wrapped.copy_from_slice(dek.as_ref());
        let tag = aead_key(master.expose())?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(wrap_nonce),
                Aad::from(wrap_aad(object_id)),
                wrapped.as_mut(),
            )
            .map_err(|_| SealError::Unwrap)?;
        header[40..72].copy_from_slice(wrapped.as_ref());
        header[72..88].copy_from_slice(tag.as_ref());
        header[88..95].copy_from_slice(&prefix);

        Ok(Self {
            cipher: aead_key(&dek)?,
            header,
            prefix,
            counter: 0,
            pending: Vec::with_capacity(CHUNK + TAG),
        })
    }

    /// The header, to be written before the first chunk.
    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    /// Adds plaintext; writes every chunk that is known not to be the last.
    pub fn update<W: Write>(&mut self, mut data: &[u8], out: &mut W) -> std::io::Result<()> {
        while !data.is_empty() {
            if self.pending.len() == CHUNK {
                // More data follows, so the pending full chunk is not the last one.
                self.seal_pending(false, out)?;
            }
            let take = (CHUNK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Seals and writes the final chunk (possibly empty).
    pub fn finish<W: Write>(mut self, out: &mut W) -> std::io::Result<()> {
        self.seal_pending(true, out)
    }

    fn seal_pending<W: Write>(&mut self, last: bool, out: &mut W) -> std::io::Result<()> {
        let nonce = chunk_nonce(&self.prefix, self.counter, last);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&self.header),
                &mut self.pending,
            )
            .map_err(|_| std::io::Error::other("chunk encryption failed"))?;
        self.pending.extend_from_slice(tag.as_ref());
        out.write_all(&self.pending)?;
        self.pending.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| std::io::Error::other(SealError::TooLong))?;
        Ok(())
    }
}

/// Size of the sealed blob for `plain_len` plaintext bytes.
pub fn sealed_len(plain_len: u64) -> u64 {
    let chunks = if plain_len == 0 {
        1
    } else {
        plain_len.div_ceil(CHUNK as u64)
    };
    HEADER_LEN as u64 + plain_len + chunks * TAG as u64
}

/// Reads a sealed blob of known total length and writes its plaintext to `out`.
/// Returns the plaintext length. Nothing is written for a chunk that fails authentication.
pub fn open<R: Read, W: Write>(
    master: &MasterKey,
    mut blob: R,
    blob_len: u64,
    out: &mut W,
) -> Result<u64, OpenError> {
    let mut header = [0u8; HEADER_LEN];
    blob.read_exact(&mut header)
        .map_err(|e| read_err(e, SealError::Truncated))?;
    if &header[0..4] != MAGIC {
        return Err(SealError::BadMagic.into());
    }
    let mut blob_key = [0u8; 8];
    blob_key.copy_from_slice(&header[4..12]);
    if blob_key != master.id().0 {
        return Err(SealError::WrongKey {
            blob: KeyId(blob_key),
            current: master.id(),
        }
        .into());
    }
    let mut object_id = [0u8; 16];
    object_id.copy_from_slice(&header[12..28]);
    let mut wrap_nonce = [0u8; 12];
    wrap_nonce.copy_from_slice(&header[28..40]);
    // The wrapped key and its tag, contiguous in the header; decrypted in place, so this
    // buffer holds the data key once it unwraps.
    let mut wrapped = Zeroizing::new([0u8; KEY_LEN + TAG]);
    wrapped.copy_from_slice(&header[40..88]);
    let unwrapped = aead_key(master.expose())?
        .open_in_place(
            Nonce::assume_unique_for_key(wrap_nonce),
            Aad::from(wrap_aad(&object_id)),
            wrapped.as_mut(),
        )
        .map_err(|_| SealError::Unwrap)?;
    let mut dek = Zeroizing::new([0u8; KEY_LEN]);
    dek.copy_from_slice(unwrapped);
    let cipher = aead_key(&dek)?;
    let mut prefix = [0u8; 7];
    prefix.copy_from_slice(&header[88..95]);

    let mut remaining = blob_len
        .checked_sub(HEADER_LEN as u64)
        .ok_or(SealError::Truncated)?;
    if remaining < TAG as u64 {
        return Err(SealError::Truncated.into());
    }
    let mut buf = vec![0u8; CHUNK + TAG];
    let mut counter: u32 = 0;
    let mut total = 0u64;
    loop {
        let this = remaining.min((CHUNK + TAG) as u64) as usize;
        let last = this as u64 == remaining;
        if this < TAG || (!last && this != CHUNK + TAG) {
            return Err(SealError::Truncated.into());
        }
        let chunk = &mut buf[..this];
        blob.read_exact(chunk)
            .map_err(|e| read_err(e, SealError::Truncated))?;
        let nonce = chunk_nonce(&prefix, counter, last);
        // The chunk is ciphertext then tag, as `open_in_place` takes it; `body` is the
        // plaintext, in place, and only exists once the tag checked.
        let body = cipher
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header),
                chunk,
            )
            .map_err(|_| SealError::Chunk { index: counter })?;
        out.write_all(body).map_err(OpenError::Write)?;
        total += body.len() as u64;
        remaining -= this as u64;
        if last {
            return Ok(total);
        }
        counter = counter.checked_add(1).ok_or(SealError::TooLong)?;
    }
}

/// Failure to open a blob: either the blob itself or the destination.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("read blob: {0}")]
    Read(std::io::Error),
    #[error("write plaintext: {0}")]
    Write(std::io::Error),
}

fn read_err(e: std::io::Error, eof: SealError) -> OpenError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        OpenError::Seal(eof)
    } else {
        OpenError::Read(e)
    }
}

/// An AES-256-GCM key (the master key, to wrap, or a data key). AWS-LC copies it into a
/// context that it zeroes when the key is dropped. It rejects only a key of the wrong
/// length, which a `[u8; KEY_LEN]` cannot be; were it ever to, that is reported as a key
/// that does not unwrap rather than a panic.
fn aead_key(key: &[u8; KEY_LEN]) -> Result<LessSafeKey, SealError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| SealError::Unwrap)
}

fn wrap_aad(object_id: &[u8; 16]) -> Vec<u8> {
    let mut aad = WRAP_AAD.to_vec();
    aad.extend_from_slice(object_id);
    aad
}

fn chunk_nonce(prefix: &[u8; 7], counter: u32, last: bool) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[..7].copy_from_slice(prefix);
    nonce[7..11].copy_from_slice(&counter.to_be_bytes());
    nonce[11] = u8::from(last);
    nonce
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(b: u8) -> MasterKey {
        MasterKey::from_bytes([b; KEY_LEN])
    }

    fn seal(master: &MasterKey, plain: &[u8], pieces: usize) -> Vec<u8> {
        let mut s = Sealer::new(master, &[7; 16]).unwrap();
        let mut out = s.header().to_vec();
        for piece in plain.chunks(pieces.max(1)) {
            s.update(piece, &mut out).unwrap();
        }
        s.finish(&mut out).unwrap();
        out
    }

    fn unseal(master: &MasterKey, blob: &[u8]) -> Result<Vec<u8>, OpenError> {
        let mut out = Vec::new();
        open(master, blob, blob.len() as u64, &mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_chunk_boundaries() {
        let k = key(1);
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for pieces in [1, 1000, CHUNK, 5 * CHUNK] {
                let blob = seal(&k, &plain, pieces);
                assert_eq!(blob.len() as u64, sealed_len(len as u64), "len {len}");
                assert_eq!(
                    unseal(&k, &blob).unwrap(),
                    plain,
                    "len {len} pieces {pieces}"
                );
            }
        }
    }

    #[test]
    fn ciphertext_does_not_contain_plaintext() {
        let plain = b"ZZTESTPAT^Hanako".repeat(1000);
        let blob = seal(&key(1), &plain, 4096);
        assert!(!blob.windows(16).any(|w| w == b"ZZTESTPAT^Hanako"));
    }

    #[test]
    fn truncation_at_a_chunk_boundary_is_detected() {
        let k = key(1);
        let plain = vec![5u8; 2 * CHUNK + 10];
        let blob = seal(&k, &plain, CHUNK);
        let cut = HEADER_LEN + CHUNK + TAG;
        let err = unseal(&k, &blob[..cut]).unwrap_err();
        assert!(
            matches!(err, OpenError::Seal(SealError::Chunk { index: 0 })),
            "{err}"
        );
        assert!(unseal(&k, &blob[..blob.len() - 1]).is_err());
        assert!(unseal(&k, &blob[..HEADER_LEN]).is_err());
    }

    #[test]
    fn flipped_bit_anywhere_is_detected() {
        let k = key(1);
        let blob = seal(&k, &vec![9u8; CHUNK + 100], CHUNK);
        for pos in [0, 5, 13, 30, 50, 90, HEADER_LEN + 3, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[pos] ^= 0x40;
            assert!(
                unseal(&k, &bad).is_err(),
                "bit flip at {pos} went unnoticed"
            );
        }
    }

    #[test]
    fn wrong_master_key_is_named() {
        let blob = seal(&key(1), b"x", 1);
        let err = unseal(&key(2), &blob).unwrap_err();
        assert!(
            matches!(err, OpenError::Seal(SealError::WrongKey { .. })),
            "{err}"
        );
    }

    /// The on-disk bytes, pinned: SHA-256 of blobs sealed with fixed secrets, computed
    /// with the RustCrypto `aes-gcm` implementation the format was first written with.
    /// Any implementation must produce these bytes and open them.
    #[test]
    fn sealed_bytes_are_pinned() {
        use sha2::{Digest as _, Sha256};
        let k = key(1);
        for (len, pieces, want) in PINNED {
            let plain: Vec<u8> = (0..*len).map(|i| (i * 31 % 251) as u8).collect();
            let mut s = Sealer::with_secrets(
                &k,
                &[7; 16],
                Zeroizing::new([0x42; KEY_LEN]),
                [0x24; 12],
                [0x11; 7],
            )
            .unwrap();
            let mut blob = s.header().to_vec();
            for piece in plain.chunks(*pieces) {
                s.update(piece, &mut blob).unwrap();
            }
            s.finish(&mut blob).unwrap();
            assert_eq!(hex::encode(Sha256::digest(&blob)), *want, "len {len}");
            assert_eq!(unseal(&k, &blob).unwrap(), plain, "len {len}");
        }
    }

    const PINNED: &[(usize, usize, &str)] = &[
        (
            0,
            1,
            "33ca5dd021c40e5107da61ab7b2be4652de18416dc89892015c4b9dc6d912d9b",
        ),
        (
            1,
            1,
            "6925a8c70142166ccb9a5b2612e1e9f93391712c54350824fe9e7a1503804e84",
        ),
        (
            CHUNK,
            1000,
            "b0ed81f6eb0de04c5de01624be54d0153d0830fc0a2f2bfa025ea71f7a91c229",
        ),
        (
            3 * CHUNK + 17,
            CHUNK,
            "6783bf104d5b09849e3491e2e3ff26b48c7f69cbee1bfdc550cc95bf48d98577",
        ),
    ];

    #[test]
    fn swapped_chunks_are_detected() {
        let k = key(1);
        let mut plain = vec![1u8; CHUNK];
        plain.extend(vec![2u8; CHUNK]);
        plain.extend(vec![3u8; 10]);
        let blob = seal(&k, &plain, CHUNK);
        let mut bad = blob.clone();
        let a = HEADER_LEN..HEADER_LEN + CHUNK + TAG;
        let b = HEADER_LEN + CHUNK + TAG..HEADER_LEN + 2 * (CHUNK + TAG);
        let first = blob[a.clone()].to_vec();
        bad[a].copy_from_slice(&blob[b.clone()]);
        bad[b].copy_from_slice(&first);
        assert!(unseal(&k, &bad).is_err());
    }
}
