//! Sealed frame files: an append-only sequence of AES-256-GCM frames, so that a change of a
//! large store costs one small append (and one `fdatasync`), never a rewrite of the whole file.
//!
//! File layout: a 13-byte header, the 5-byte magic of the file's kind then its *generation*
//! (u64, little endian), then frames. A frame is `len` (u32 LE, length of the ciphertext with
//! its tag), `!len` (u32 LE, so a damaged length is told apart from a torn write), a 12-byte
//! random nonce, and the ciphertext. The additional data of frame `n` (0-based) is
//! `role 0x00 generation n` (both u64 LE): a frame cannot be moved within its file, copied
//! into another generation, or passed off as another file's.
//!
//! Reading ([`read`]): frames are opened in order and handed to the caller. The file ends
//! either exactly after a frame or, where `torn_tail_ok` (the journal), inside a frame whose
//! header is short or whose declared length runs past the end: that is an append a crash
//! interrupted, reported as [`ReadOutcome::good_len`] for the caller to truncate. A frame
//! that is whole but does not open, or a length whose check does not match, is
//! [`JournalError::Damaged`]: never truncated, never skipped.
//!
//! Nothing here logs; errors name the file and frame number, never content.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use gateway_durable::{self as durable, Context};
use gateway_keystore::{KeyPurpose, MasterKey};
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;
/// The file header: magic (5 bytes) and generation (8).
pub const HEADER_LEN: u64 = 13;
/// A frame's header: `len`, `!len`, nonce.
const FRAME_HEADER_LEN: usize = 8 + NONCE_LEN;
/// The largest ciphertext a frame may declare (a larger one is damage, not data).
const MAX_FRAME: u32 = 256 * 1024 * 1024;

/// The key a store's frame files are sealed with ([`KeyPurpose::IdentityAtRest`] for the
/// registry, another purpose through [`SealKey::derive_for`]).
pub struct SealKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// Derives the key from the master key ([`KeyPurpose::IdentityAtRest`]).
    pub fn derive(master: &MasterKey) -> Self {
        Self::derive_for(master, KeyPurpose::IdentityAtRest)
    }

    /// Derives the key of another store kept in frame files (e.g.
    /// [`KeyPurpose::SafetyAtRest`]).
    pub fn derive_for(master: &MasterKey, purpose: KeyPurpose) -> Self {
        Self(Zeroizing::new(*master.derive(purpose).expose()))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.as_ref().into())
    }
}

/// A frame file could not be read or written; names the file (and frame), never content.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Io(#[from] durable::Error),
    /// The file is not what it should be: altered, sealed under another key, or of
    /// another kind. Nothing is truncated or skipped.
    #[error(
        "{path}: frame {frame}: {problem} (altered, sealed under another key, or not a file of this store)"
    )]
    Damaged {
        path: PathBuf,
        /// The frame number (0-based; the header is reported as frame 0 too).
        frame: u64,
        problem: &'static str,
    },
    #[error("no randomness for a nonce")]
    Random,
}

fn aad(role: &str, generation: u64, seq: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(role.len() + 17);
    aad.extend_from_slice(role.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&generation.to_le_bytes());
    aad.extend_from_slice(&seq.to_le_bytes());
    aad
}

/// One sealed frame (header and ciphertext) ready to write.
fn seal_frame(
    key: &SealKey,
    role: &str,
    generation: u64,
    seq: u64,
    plain: &[u8],
) -> Result<Vec<u8>, JournalError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut nonce).map_err(|_| JournalError::Random)?;
    let ct = key
        .cipher()
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: &aad(role, generation, seq),
            },
        )
        .map_err(|_| JournalError::Random)?;
    let len = u32::try_from(ct.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or(JournalError::Random)?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + ct.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn header(magic: &[u8; 5], generation: u64) -> Vec<u8> {
    let mut h = magic.to_vec();
    h.extend_from_slice(&generation.to_le_bytes());
    h
}

/// Writes a whole new frame file at `path` durably and atomically: `path.tmp`, each frame,
/// fsync, rename, fsync of the folder. `frames` yields plaintexts (or the caller's error).
pub fn write_new<E: From<JournalError>>(
    path: &Path,
    key: &SealKey,
    magic: &[u8; 5],
    role: &str,
    generation: u64,
    frames: impl IntoIterator<Item = Result<Zeroizing<Vec<u8>>, E>>,
) -> Result<(), E> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let file = durable::create_new_private(&tmp).map_err(JournalError::from)?;
    let mut out = BufWriter::new(file);
    out.write_all(&header(magic, generation))
        .ctx("write", &tmp)
        .map_err(JournalError::from)?;
    for (seq, plain) in frames.into_iter().enumerate() {
        let plain = plain?;
        let frame = seal_frame(key, role, generation, seq as u64, &plain)?;
        out.write_all(&frame)
            .ctx("write", &tmp)
            .map_err(JournalError::from)?;
    }
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .ctx("write", &tmp)
        .map_err(JournalError::from)?;
    file.sync_all()
        .ctx("sync", &tmp)
        .map_err(JournalError::from)?;
    drop(file);
    std::fs::rename(&tmp, path)
        .ctx("rename into place", path)
        .map_err(JournalError::from)?;
    durable::sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(JournalError::from)?;
    Ok(())
}

/// What [`read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOutcome {
    pub generation: u64,
    /// Whole frames read.
    pub frames: u64,
    /// The length of the file up to the end of the last whole frame.
    pub good_len: u64,
    /// A partial frame followed (a crash mid-append); the caller truncates to `good_len`.
    pub torn: bool,
}

/// The generation in the header of the frame file at `path`; `None` when the file does not
/// exist, [`JournalError::Damaged`] when its header is not one of `magic`'s kind.
pub fn generation(path: &Path, magic: &[u8; 5]) -> Result<Option<u64>, JournalError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error("open", path, source)),
    };
    let mut head = [0u8; HEADER_LEN as usize];
    let got = read_full(&mut file, &mut head, path)?;
    match head.strip_prefix(magic.as_slice()) {
        Some(g) if got == head.len() => Ok(Some(u64::from_le_bytes(
            <[u8; 8]>::try_from(g).unwrap_or_default(),
        ))),
        _ => Err(JournalError::Damaged {
            path: path.to_path_buf(),
            frame: 0,
            problem: "no sealed file header of this kind",
        }),
    }
}

/// Reads up to `buf.len()` bytes; fewer only at the end of the file.
fn read_full(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<usize, JournalError> {
    let mut got = 0;
    while let Some(rest) = buf.get_mut(got..) {
        if rest.is_empty() {
            break;
        }
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(io_error("read", path, source)),
        }
    }
    Ok(got)
}

/// Reads the frame file at `path` (`None` when it does not exist), handing each opened
/// frame to `each` in order. See the module docs for what is damage and what a torn tail.
pub fn read<E: From<JournalError>>(
    path: &Path,
    key: &SealKey,
    magic: &[u8; 5],
    role: &str,
    torn_tail_ok: bool,
    mut each: impl FnMut(u64, Zeroizing<Vec<u8>>) -> Result<(), E>,
) -> Result<Option<ReadOutcome>, E> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error("open", path, source).into()),
    };
    let damaged = |frame: u64, problem: &'static str| JournalError::Damaged {
        path: path.to_path_buf(),
        frame,
        problem,
    };
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut head = [0u8; HEADER_LEN as usize];
    if read_full(&mut r, &mut head, path)? != head.len() || !head.starts_with(magic) {
        return Err(damaged(0, "no sealed file header of this kind").into());
    }
    let generation = u64::from_le_bytes(
        head.get(5..)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .unwrap_or_default(),
    );
    let cipher = key.cipher();
    let mut out = ReadOutcome {
        generation,
        frames: 0,
        good_len: HEADER_LEN,
        torn: false,
    };
    loop {
        let seq = out.frames;
        let mut fh = [0u8; FRAME_HEADER_LEN];
        let got = read_full(&mut r, &mut fh, path)?;
        if got == 0 {
            return Ok(Some(out));
        }
        let torn = |out: ReadOutcome| -> Result<Option<ReadOutcome>, E> {
            if torn_tail_ok {
                Ok(Some(ReadOutcome { torn: true, ..out }))
            } else {
                Err(damaged(seq, "the file ends inside a frame").into())
            }
        };
        if got < 8 {
            return torn(out);
        }
        let (len_b, rest) = fh.split_at(4);
        let (not_b, nonce) = rest.split_at(4);
        let len = u32::from_le_bytes(<[u8; 4]>::try_from(len_b).unwrap_or_default());
        let not = u32::from_le_bytes(<[u8; 4]>::try_from(not_b).unwrap_or_default());
        if not != !len || !(16..=MAX_FRAME).contains(&len) {
            return Err(damaged(seq, "a frame length does not check").into());
        }
        if got < FRAME_HEADER_LEN {
            return torn(out);
        }
        let mut ct = vec![0u8; len as usize];
        if read_full(&mut r, &mut ct, path)? != ct.len() {
            return torn(out);
        }
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: &ct,
                    aad: &aad(role, generation, seq),
                },
            )
            .map_err(|_| damaged(seq, "a frame does not open"))?;
        each(seq, Zeroizing::new(plain))?;
        out.frames += 1;
        out.good_len += (FRAME_HEADER_LEN + ct.len()) as u64;
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> JournalError {
    JournalError::Io(durable::Error {
        action,
        path: path.to_path_buf(),
        source,
    })
}

/// The journal open for appending: each [`Appender::append`] is durable (`fdatasync`) before
/// it returns.
#[derive(Debug)]
pub struct Appender {
    file: File,
    path: PathBuf,
    role: &'static str,
    generation: u64,
    next_seq: u64,
    len: u64,
    /// A failed append could not be undone: no further append is accepted.
    broken: bool,
}

impl Appender {
    /// Creates a fresh, empty frame file of `generation` at `path` (atomically, replacing
    /// any file there) and opens it for appending.
    pub fn create(
        path: &Path,
        magic: &[u8; 5],
        role: &'static str,
        generation: u64,
    ) -> Result<Self, JournalError> {
        durable::write_atomic(path, &header(magic, generation))?;
        Self::open(path, role, generation, 0, HEADER_LEN)
    }

    /// Opens an existing file whose first `len` bytes hold `frames` whole frames, cutting off
    /// anything after them (a torn tail) durably.
    pub fn open(
        path: &Path,
        role: &'static str,
        generation: u64,
        frames: u64,
        len: u64,
    ) -> Result<Self, JournalError> {
        let mut file = OpenOptions::new()
            .write(true)
            .open(path)
            .ctx("open", path)?;
        let on_disk = file.metadata().ctx("stat", path)?.len();
        if on_disk != len {
            file.set_len(len).ctx("truncate torn tail", path)?;
            file.sync_all().ctx("sync", path)?;
        }
        file.seek(SeekFrom::Start(len)).ctx("seek", path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            role,
            generation,
            next_seq: frames,
            len,
            broken: false,
        })
    }

    /// Frames in the file.
    pub fn frames(&self) -> u64 {
        self.next_seq
    }

    /// The file's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Seals `plain` as the next frame, writes it and `fdatasync`s. On failure the file is
    /// cut back to its last whole frame; if even that fails, the appender refuses from then on.
    pub fn append(&mut self, key: &SealKey, plain: &[u8]) -> Result<(), JournalError> {
        if self.broken {
            return Err(JournalError::Damaged {
                path: self.path.clone(),
                frame: self.next_seq,
                problem: "an earlier append failed and could not be undone",
            });
        }
        let frame = seal_frame(key, self.role, self.generation, self.next_seq, plain)?;
        let written = self
            .file
            .write_all(&frame)
            .and_then(|()| self.file.sync_data())
            .ctx("append", &self.path);
        if let Err(e) = written {
            let undone = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()))
                .and_then(|()| self.file.sync_data());
            if undone.is_err() {
                self.broken = true;
            }
            return Err(e.into());
        }
        self.next_seq += 1;
        self.len += frame.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 5] = b"GWTT\x01";

    fn key(b: u8) -> SealKey {
        SealKey::derive(&MasterKey::from_bytes([b; 32]))
    }

    fn all(
        path: &Path,
        key: &SealKey,
        torn_ok: bool,
    ) -> Result<(ReadOutcome, Vec<Vec<u8>>), JournalError> {
        let mut got = Vec::new();
        let out = read(path, key, MAGIC, "t", torn_ok, |_, p| {
            got.push(p.to_vec());
            Ok::<(), JournalError>(())
        })?
        .unwrap();
        Ok((out, got))
    }

    #[test]
    fn frames_round_trip_and_are_never_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let k = key(1);
        let mut a = Appender::create(&path, MAGIC, "t", 7).unwrap();
        a.append(&k, b"YAMADA TARO").unwrap();
        a.append(&k, b"second").unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"YAMADA"));
        let (out, got) = all(&path, &k, false).unwrap();
        assert_eq!(out.generation, 7);
        assert_eq!(out.frames, 2);
        assert!(!out.torn);
        assert_eq!(got, vec![b"YAMADA TARO".to_vec(), b"second".to_vec()]);
        // Reopened for appending, it continues the sequence.
        let mut a = Appender::open(&path, "t", 7, out.frames, out.good_len).unwrap();
        a.append(&k, b"third").unwrap();
        assert_eq!(all(&path, &k, false).unwrap().1.len(), 3);
        assert!(generation(&path, MAGIC).unwrap() == Some(7));
        assert!(
            read(&dir.path().join("none"), &k, MAGIC, "t", true, |_, _| Ok::<
                (),
                JournalError,
            >(
                ()
            ))
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn a_torn_tail_is_reported_and_cut_but_only_where_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let k = key(1);
        let mut a = Appender::create(&path, MAGIC, "t", 0).unwrap();
        a.append(&k, b"one").unwrap();
        a.append(&k, b"two").unwrap();
        let whole = std::fs::read(&path).unwrap();
        for cut in [1, 5, 9, 20, 25] {
            std::fs::write(&path, &whole[..whole.len() - cut]).unwrap();
            let (out, got) = all(&path, &k, true).unwrap();
            assert!(out.torn, "cut {cut}");
            assert_eq!(got, vec![b"one".to_vec()]);
            assert!(
                all(&path, &k, false).is_err(),
                "cut {cut}: a snapshot is never torn"
            );
            let mut a = Appender::open(&path, "t", 0, out.frames, out.good_len).unwrap();
            a.append(&k, b"again").unwrap();
            let (out, got) = all(&path, &k, false).unwrap();
            assert!(!out.torn);
            assert_eq!(got, vec![b"one".to_vec(), b"again".to_vec()]);
        }
    }

    #[test]
    fn a_flipped_byte_a_wrong_key_or_role_or_a_moved_frame_is_damage_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let k = key(1);
        let mut a = Appender::create(&path, MAGIC, "t", 0).unwrap();
        a.append(&k, b"one").unwrap();
        a.append(&k, b"two").unwrap();
        let whole = std::fs::read(&path).unwrap();
        for i in 0..whole.len() {
            let mut bad = whole.clone();
            bad[i] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            let got = all(&path, &k, true);
            assert!(
                matches!(got, Err(JournalError::Damaged { .. })),
                "byte {i}: {got:?}"
            );
        }
        std::fs::write(&path, &whole).unwrap();
        assert!(all(&path, &key(2), true).is_err());
        assert!(
            read(
                &path,
                &k,
                MAGIC,
                "other",
                true,
                |_, _| Ok::<(), JournalError>(())
            )
            .is_err()
        );
        // Frames swapped: the additional data names each frame's place.
        let frame_len = (whole.len() - HEADER_LEN as usize) / 2;
        let h = HEADER_LEN as usize;
        let mut swapped = whole[..h].to_vec();
        swapped.extend_from_slice(&whole[h + frame_len..]);
        swapped.extend_from_slice(&whole[h..h + frame_len]);
        std::fs::write(&path, &swapped).unwrap();
        assert!(all(&path, &k, true).is_err());
        let err = all(&path, &k, true).unwrap_err().to_string();
        assert!(err.contains("frame 0"), "{err}");
    }
}
