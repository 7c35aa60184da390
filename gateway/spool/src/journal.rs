//! The message journal: where HL7 messages are made durable, and where they stay.
//!
//! A group of messages is acknowledged after one `fdatasync` of one append to a journal
//! segment (docs/adr/0006). Each append is a frame holding, for every message of the
//! group, its object id, its encoded index [`Record`] and its sealed bytes. The index
//! record of a message then names the segment and offset of its sealed bytes
//! ([`Record::segment`]): no blob file is written for it. The spool's checkpointer thread
//! indexes the records behind the acknowledgement; [`read_all`] gives the spool what a
//! crash kept from the index when it opens. The spool deletes a segment once the writer has
//! left it and no record needs it.
//!
//! On disk, `<spool>/journal/<generation, 16 hex digits>.wal`. A segment is created full of
//! zeros and synced before its first frame, so appending to it overwrites allocated blocks
//! and `fdatasync` flushes data only. A frame is:
//!
//! ```text
//! magic "GWJ1" | payload length u32 LE | payload | SHA-256(generation || offset || length || payload)[..16]
//! payload = entries, each: object id (16) | record length u32 LE | record | sealed length u32 LE | sealed
//! ```
//!
//! Reading a segment stops at the first frame that is not whole and intact: a frame torn by
//! a crash belonged to a group whose senders were never answered. The digest binds a frame
//! to its segment and position, so a frame can never be mistaken for another one.
//! Nothing in the journal is patient data in the clear: sealed bytes are AES-256-GCM
//! ciphertext and records hold keyed MACs only, as in the index and `blobs/`.

use std::fs::{self, File};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use gateway_durable::{self as durable, Context};
use sha2::{Digest as _, Sha256};

use crate::index::{ObjectId, Record, SegmentRef, decode_record, encode_record};

const MAGIC: &[u8; 4] = b"GWJ1";
const HEADER: usize = 8;
const DIGEST: usize = 16;
/// Size of a new segment (larger if one group needs more).
pub(crate) const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
const SUFFIX: &str = ".wal";

/// One message as the journal holds it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub id: ObjectId,
    pub record: Record,
    pub sealed: Vec<u8>,
}

/// The segment being appended to.
#[derive(Debug)]
pub(crate) struct Writer {
    dir: PathBuf,
    generation: u64,
    file: Option<File>,
    offset: u64,
    capacity: u64,
    /// A segment left after a failed append, reported as closed at the next rotation.
    abandoned: Option<u64>,
}

/// Where a group went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    pub generation: u64,
    /// The segment the writer left for this one, if it moved on: no frame will be added
    /// to it again.
    pub closed: Option<u64>,
}

impl Writer {
    /// A writer whose first segment will be `after + 1`; the segment is created at the first
    /// append.
    pub(crate) fn new(dir: &Path, after: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            generation: after,
            file: None,
            offset: 0,
            capacity: 0,
            abandoned: None,
        }
    }

    /// The segment appended to now (0 before the first append).
    pub(crate) fn generation(&self) -> u64 {
        if self.file.is_some() {
            self.generation
        } else {
            0
        }
    }

    /// Appends one frame and makes it durable, then sets each entry's
    /// [`Record::segment`] to where its sealed bytes are. After an error the writer starts a
    /// new segment at the next append (the state of the failed one's cache is unknown).
    pub(crate) fn append(&mut self, entries: &mut [Entry]) -> Result<Appended, durable::Error> {
        let (payload, positions) = encode_entries(entries).map_err(|source| durable::Error {
            action: "encode journal frame",
            path: self.dir.clone(),
            source,
        })?;
        let frame_len = (HEADER + payload.len() + DIGEST) as u64;
        let mut closed = None;
        if self.file.is_none() || self.offset + frame_len > self.capacity {
            closed = self
                .file
                .take()
                .map(|_| self.generation)
                .or(self.abandoned.take());
            self.generation += 1;
            self.capacity = SEGMENT_BYTES.max(frame_len);
            self.offset = 0;
            self.file = Some(create_segment(&self.dir, self.generation, self.capacity)?);
        }
        let frame = frame(self.generation, self.offset, &payload);
        let path = segment_path(&self.dir, self.generation);
        let written = match &self.file {
            Some(file) => file
                .write_all_at(&frame, self.offset)
                .and_then(|()| file.sync_data()),
            None => Err(std::io::ErrorKind::NotFound.into()),
        };
        if let Err(source) = written {
            // Leave this segment: the state of its cached pages is unknown. A frame that
            // reached the disk anyway is harmless: replay skips messages already stored.
            if self.file.take().is_some() {
                self.abandoned = Some(self.generation);
            }
            tracing::warn!(
                generation = self.generation,
                "journal segment abandoned after a failed append"
            );
            return Err(durable::Error {
                action: "append to journal",
                path,
                source,
            });
        }
        for (entry, position) in entries.iter_mut().zip(positions) {
            entry.record.segment = Some(SegmentRef {
                generation: self.generation,
                offset: self.offset + (HEADER + position) as u64,
            });
        }
        self.offset += frame_len;
        Ok(Appended {
            generation: self.generation,
            closed,
        })
    }
}

pub(crate) fn segment_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:016x}{SUFFIX}"))
}

/// Creates a zero-filled, synced segment and syncs the directory.
fn create_segment(dir: &Path, generation: u64, capacity: u64) -> Result<File, durable::Error> {
    let path = segment_path(dir, generation);
    let mut file = durable::create_new_private(&path)?;
    let zeros = vec![0u8; 1024 * 1024];
    let mut left = capacity;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n]).ctx("preallocate", &path)?;
        left -= n as u64;
    }
    file.sync_all().ctx("fsync", &path)?;
    durable::sync_dir(dir)?;
    Ok(file)
}

fn frame(generation: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER + payload.len() + DIGEST);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&digest(generation, offset, len, payload));
    out
}

fn digest(generation: u64, offset: u64, len: u32, payload: &[u8]) -> [u8; DIGEST] {
    let mut h = Sha256::new();
    h.update(generation.to_le_bytes());
    h.update(offset.to_le_bytes());
    h.update(len.to_le_bytes());
    h.update(payload);
    let full = h.finalize();
    let mut out = [0u8; DIGEST];
    out.copy_from_slice(&full[..DIGEST]);
    out
}

/// The payload of a frame, and where in it each entry's sealed bytes start.
fn encode_entries(entries: &[Entry]) -> std::io::Result<(Vec<u8>, Vec<usize>)> {
    let too_big = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "entry over 4 GiB");
    let mut out = Vec::new();
    let mut positions = Vec::with_capacity(entries.len());
    for e in entries {
        let record = encode_record(&e.record).map_err(std::io::Error::other)?;
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(
            &u32::try_from(record.len())
                .map_err(|_| too_big())?
                .to_le_bytes(),
        );
        out.extend_from_slice(&record);
        out.extend_from_slice(
            &u32::try_from(e.sealed.len())
                .map_err(|_| too_big())?
                .to_le_bytes(),
        );
        positions.push(out.len());
        out.extend_from_slice(&e.sealed);
    }
    if out.len() > u32::MAX as usize {
        return Err(too_big());
    }
    Ok((out, positions))
}

/// Splits `n` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

fn take_u32(rest: &mut &[u8]) -> Option<usize> {
    let b = take(rest, 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// The entries of a payload that starts at `base` in segment `generation`.
fn decode_entries(payload: &[u8], generation: u64, base: u64) -> Option<Vec<Entry>> {
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let id = ObjectId::try_from(take(&mut rest, 16)?).ok()?;
        let n = take_u32(&mut rest)?;
        let mut record = decode_record(take(&mut rest, n)?).ok()?;
        let n = take_u32(&mut rest)?;
        let position = payload.len() - rest.len();
        let sealed = take(&mut rest, n)?.to_vec();
        record.segment = Some(SegmentRef {
            generation,
            offset: base + position as u64,
        });
        out.push(Entry { id, record, sealed });
    }
    Some(out)
}

/// The intact frames of one segment's bytes, in order; stops at the first that is not.
fn read_frames(generation: u64, bytes: &[u8]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut offset = 0usize;
    loop {
        let mut rest = &bytes[offset.min(bytes.len())..];
        let Some(header) = take(&mut rest, HEADER) else {
            break;
        };
        if &header[..4] != MAGIC {
            break;
        }
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(payload) = take(&mut rest, len as usize) else {
            break;
        };
        let Some(tag) = take(&mut rest, DIGEST) else {
            break;
        };
        if tag != digest(generation, offset as u64, len, payload) {
            break;
        }
        let Some(entries) = decode_entries(payload, generation, (offset + HEADER) as u64) else {
            tracing::warn!(
                generation,
                offset,
                "journal frame with a valid digest does not decode; replay stops there"
            );
            break;
        };
        out.extend(entries);
        offset += HEADER + len as usize + DIGEST;
    }
    out
}

/// The segments in `dir`, oldest first, with their generations.
pub(crate) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, durable::Error> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).ctx("list", dir)? {
        let path = entry.ctx("list", dir)?.path();
        let generation = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        if let Some(g) = generation {
            out.push((g, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Calls `each` with every segment's intact entries, oldest segment first (one segment in
/// memory at a time), and returns the newest generation seen (0 if none).
pub(crate) fn for_each_segment(
    dir: &Path,
    mut each: impl FnMut(Vec<Entry>) -> Result<(), crate::SpoolError>,
) -> Result<u64, crate::SpoolError> {
    let mut newest = 0;
    for (generation, path) in segments(dir)? {
        let bytes = fs::read(&path).ctx("read", &path)?;
        each(read_frames(generation, &bytes))?;
        newest = newest.max(generation);
    }
    Ok(newest)
}

/// Every entry still in the journal, oldest first, and the newest generation seen.
#[cfg(test)]
pub(crate) fn read_all(dir: &Path) -> Result<(Vec<Entry>, u64), crate::SpoolError> {
    let mut all = Vec::new();
    let newest = for_each_segment(dir, |entries| {
        all.extend(entries);
        Ok(())
    })?;
    Ok((all, newest))
}

/// The `len` sealed bytes at `at`.
pub(crate) fn read_sealed(dir: &Path, at: SegmentRef, len: u64) -> std::io::Result<Vec<u8>> {
    let file = File::open(segment_path(dir, at.generation))?;
    let mut out = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
    file.read_exact_at(&mut out, at.offset)?;
    Ok(out)
}

/// Deletes segment `generation` durably.
pub(crate) fn remove_segment(dir: &Path, generation: u64) -> Result<(), durable::Error> {
    durable::remove_durably(&segment_path(dir, generation)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{ContentMac, ObjectKind, Record, UidMac};

    fn record(n: u8) -> Record {
        Record {
            kind: ObjectKind::Hl7,
            sop_class_uid: "ADT^A08".into(),
            transfer_syntax_uid: "UNICODE UTF-8".into(),
            source: "127.0.0.1".into(),
            plain_len: 3,
            sealed_len: 40,
            received_unix_ms: 1,
            uid_mac: UidMac::from_bytes([n; 32]),
            content_mac: ContentMac::from_bytes([n; 32]),
            destinations: Vec::new(),
            blob_deleted: false,
            sequence: u64::from(n),
            study_mac: None,
            completed_unix_ms: None,
            segment: None,
        }
    }

    fn entry(n: u8) -> Entry {
        Entry {
            id: ObjectId::from_bytes([n; 16]),
            record: record(n),
            sealed: vec![n; 40 + usize::from(n)],
        }
    }

    fn ids(entries: &[Entry]) -> Vec<u8> {
        entries.iter().map(|e| e.id.as_bytes()[0]).collect()
    }

    #[test]
    fn frames_round_trip_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(dir.path(), 0);
        let mut group = [entry(1), entry(2)];
        let a = w.append(&mut group).unwrap();
        assert_eq!(
            a,
            Appended {
                generation: 1,
                closed: None
            }
        );
        let mut third = [entry(3)];
        w.append(&mut third).unwrap();
        let (entries, newest) = read_all(dir.path()).unwrap();
        assert_eq!(ids(&entries), [1, 2, 3]);
        assert_eq!(newest, 1);
        // Reading gives the records the writer located, and the location holds the bytes.
        assert_eq!(entries[1].record, group[1].record);
        assert_eq!(entries[2].record, third[0].record);
        assert_eq!(entries[1].sealed, entry(2).sealed);
        for e in group.iter().chain(&third) {
            let at = e.record.segment.unwrap();
            assert_eq!(at.generation, 1);
            let bytes = read_sealed(dir.path(), at, e.sealed.len() as u64).unwrap();
            assert_eq!(bytes, e.sealed);
        }
        // A segment starts full size, zero-filled.
        let len = fs::metadata(segment_path(dir.path(), 1)).unwrap().len();
        assert_eq!(len, SEGMENT_BYTES);
    }

    #[test]
    fn a_group_too_big_for_the_segment_moves_to_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(dir.path(), 6);
        w.append(&mut [entry(1)]).unwrap();
        w.offset = SEGMENT_BYTES - 10;
        let big = Entry {
            sealed: vec![9; SEGMENT_BYTES as usize + 5],
            ..entry(2)
        };
        let a = w.append(&mut [big]).unwrap();
        assert_eq!(
            a,
            Appended {
                generation: 8,
                closed: Some(7)
            }
        );
        let len = fs::metadata(segment_path(dir.path(), 8)).unwrap().len();
        assert!(len > SEGMENT_BYTES);
        let (entries, newest) = read_all(dir.path()).unwrap();
        assert_eq!(ids(&entries), [1, 2]);
        assert_eq!(newest, 8);
        remove_segment(dir.path(), 7).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn reading_stops_at_a_torn_or_altered_frame() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(dir.path(), 0);
        w.append(&mut [entry(1)]).unwrap();
        let second = w.offset;
        w.append(&mut [entry(2)]).unwrap();
        let end = w.offset;
        w.append(&mut [entry(3)]).unwrap();
        let path = segment_path(dir.path(), 1);
        let clean = fs::read(&path).unwrap();

        // Torn: the third frame's last bytes never reached the disk.
        let mut torn = clean.clone();
        let third_end = w.offset as usize;
        torn[third_end - 3..third_end].fill(0);
        assert_eq!(ids(&read_frames(1, &torn)), [1, 2]);

        // Altered: a flipped bit in the second frame ends the log before it.
        let mut altered = clean.clone();
        altered[second as usize + HEADER + 5] ^= 1;
        assert_eq!(ids(&read_frames(1, &altered)), [1]);

        // A frame read under another generation or at another offset does not verify.
        assert!(read_frames(2, &clean).is_empty());
        let moved = clean[second as usize..end as usize].to_vec();
        assert!(read_frames(1, &moved).is_empty());

        // A length pointing past the end of the segment.
        let mut long = clean;
        long[second as usize + 4..second as usize + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(ids(&read_frames(1, &long)), [1]);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..2000 {
            let mut bytes = frame(1, 0, &encode_entries(&[entry(1)]).unwrap().0);
            for _ in 0..(round % 7 + 1) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % bytes.len();
                bytes[i] = (seed >> 32) as u8;
            }
            let _ = read_frames(1, &bytes);
            let _ = decode_entries(&bytes[HEADER.min(bytes.len())..], 1, 8);
        }
    }
}
