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
/// A spare segment being made ([`Writer`]); never read.
const SPARE_SUFFIX: &str = ".spare";

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
    /// The next segment, zero-filled and synced by a background thread while this one
    /// fills, so that a rotation costs a rename instead of writing 16 MiB on the hot path.
    spare: Option<std::thread::JoinHandle<Result<(PathBuf, File), durable::Error>>>,
}

/// Where a group went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    pub generation: u64,
    /// The segment the writer left for this one, if it moved on: no frame will be added
    /// to it again.
    pub closed: Option<u64>,
    /// Where the next frame goes: everything before it is written.
    pub end: SegmentRef,
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
            spare: None,
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
        let (frame_body, positions) = encode_entries(entries).map_err(|source| durable::Error {
            action: "encode journal frame",
            path: self.dir.clone(),
            source,
        })?;
        let frame_len = (frame_body.len() + DIGEST) as u64;
        let mut closed = None;
        if self.file.is_none() || self.offset + frame_len > self.capacity {
            closed = self
                .file
                .take()
                .map(|_| self.generation)
                .or(self.abandoned.take());
            self.generation += 1;
            self.offset = 0;
            let (file, capacity) = self.next_segment(frame_len)?;
            self.capacity = capacity;
            self.file = Some(file);
        }
        let frame = seal_frame(self.generation, self.offset, frame_body);
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
                offset: self.offset + position as u64,
            });
        }
        self.offset += frame_len;
        Ok(Appended {
            generation: self.generation,
            closed,
            end: SegmentRef {
                generation: self.generation,
                offset: self.offset,
            },
        })
    }
}

impl Writer {
    /// The file of the new segment `self.generation`, and its capacity: the spare made
    /// in the background when there is one and the frame fits, else a new one made now.
    /// Then starts making the next spare.
    fn next_segment(&mut self, frame_len: u64) -> Result<(File, u64), durable::Error> {
        let path = segment_path(&self.dir, self.generation);
        let spare = self.spare.take().and_then(|h| match h.join() {
            Ok(Ok(spare)) => Some(spare),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "spare journal segment not made; making one now");
                None
            }
            Err(_) => None,
        });
        let made = match spare {
            Some((spare, file)) if frame_len <= SEGMENT_BYTES => {
                fs::rename(&spare, &path).ctx("rename spare segment", &path)?;
                durable::sync_dir(&self.dir)?;
                (file, SEGMENT_BYTES)
            }
            other => {
                if let Some((spare, _)) = other {
                    let _ = fs::remove_file(spare);
                }
                let capacity = SEGMENT_BYTES.max(frame_len);
                (create_segment(&path, capacity)?, capacity)
            }
        };
        let dir = self.dir.clone();
        self.spare = std::thread::Builder::new()
            .name("spool-spare-segment".into())
            .spawn(move || {
                let name = format!("spare-{:016x}{SPARE_SUFFIX}", rand_suffix());
                let path = dir.join(name);
                create_segment(&path, SEGMENT_BYTES).map(|file| (path, file))
            })
            .ok();
        Ok(made)
    }
}

/// Removes spare segments a previous run left (never named like a segment, never read).
pub(crate) fn remove_spares(dir: &Path) -> Result<(), durable::Error> {
    for entry in fs::read_dir(dir).ctx("list", dir)? {
        let path = entry.ctx("list", dir)?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(SPARE_SUFFIX))
        {
            fs::remove_file(&path).ctx("remove spare segment", &path)?;
        }
    }
    Ok(())
}

/// A name part no other spare (of this process or an earlier one) uses.
fn rand_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (u64::from(std::process::id()) << 32) ^ n
}

pub(crate) fn segment_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:016x}{SUFFIX}"))
}

/// Creates a zero-filled, synced segment at `path` and syncs its directory.
fn create_segment(path: &Path, capacity: u64) -> Result<File, durable::Error> {
    let mut file = durable::create_new_private(path)?;
    let zeros = vec![0u8; 1024 * 1024];
    let mut left = capacity;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n]).ctx("preallocate", path)?;
        left -= n as u64;
    }
    file.sync_all().ctx("fsync", path)?;
    if let Some(dir) = path.parent() {
        durable::sync_dir(dir)?;
    }
    Ok(file)
}

/// Completes a frame whose header and payload [`encode_entries`] wrote: its length and
/// digest.
fn seal_frame(generation: u64, offset: u64, mut frame: Vec<u8>) -> Vec<u8> {
    let payload_len = frame.len().saturating_sub(HEADER);
    let len = u32::try_from(payload_len).unwrap_or(u32::MAX);
    if let Some(field) = frame.get_mut(4..HEADER) {
        field.copy_from_slice(&len.to_le_bytes());
    }
    let tag = digest(
        generation,
        offset,
        len,
        frame.get(HEADER..).unwrap_or_default(),
    );
    frame.extend_from_slice(&tag);
    frame
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

/// A frame's header (length not yet set) and payload, and where in it each entry's sealed
/// bytes start. Sealed bytes are copied once, into the frame.
fn encode_entries(entries: &[Entry]) -> std::io::Result<(Vec<u8>, Vec<usize>)> {
    let too_big = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "entry over 4 GiB");
    let records = entries
        .iter()
        .map(|e| encode_record(&e.record).map_err(std::io::Error::other))
        .collect::<std::io::Result<Vec<_>>>()?;
    let size = HEADER
        + DIGEST
        + entries
            .iter()
            .zip(&records)
            .map(|(e, r)| 16 + 4 + r.len() + 4 + e.sealed.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0; 4]);
    let mut positions = Vec::with_capacity(entries.len());
    for (e, record) in entries.iter().zip(&records) {
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(
            &u32::try_from(record.len())
                .map_err(|_| too_big())?
                .to_le_bytes(),
        );
        out.extend_from_slice(record);
        out.extend_from_slice(
            &u32::try_from(e.sealed.len())
                .map_err(|_| too_big())?
                .to_le_bytes(),
        );
        positions.push(out.len());
        out.extend_from_slice(&e.sealed);
    }
    if out.len() - HEADER > u32::MAX as usize {
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
/// Calls `each` with the intact entries of every segment, oldest first, skipping what
/// lies before `from` (the index's checkpoint: everything before it is indexed; a segment
/// wholly before it is not read). Returns the newest generation seen.
pub(crate) fn for_each_segment(
    dir: &Path,
    from: Option<SegmentRef>,
    mut each: impl FnMut(Vec<Entry>) -> Result<(), crate::SpoolError>,
) -> Result<u64, crate::SpoolError> {
    let mut newest = 0;
    for (generation, path) in segments(dir)? {
        newest = newest.max(generation);
        let skip_to = match from {
            Some(mark) if mark.generation > generation => continue,
            Some(mark) if mark.generation == generation => mark.offset,
            _ => 0,
        };
        let bytes = fs::read(&path).ctx("read", &path)?;
        let mut entries = read_frames(generation, &bytes);
        entries.retain(|e| e.record.segment.is_none_or(|at| at.offset >= skip_to));
        each(entries)?;
    }
    Ok(newest)
}

/// Every entry still in the journal, oldest first, and the newest generation seen.
#[cfg(test)]
pub(crate) fn read_all(dir: &Path) -> Result<(Vec<Entry>, u64), crate::SpoolError> {
    let mut all = Vec::new();
    let newest = for_each_segment(dir, None, |entries| {
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
        assert_eq!((a.generation, a.closed), (1, None));
        let mut third = [entry(3)];
        let b = w.append(&mut third).unwrap();
        assert_eq!(b.end.generation, 1);
        assert!(b.end.offset > a.end.offset);
        let (entries, newest) = read_all(dir.path()).unwrap();
        assert_eq!(ids(&entries), [1, 2, 3]);
        assert_eq!(newest, 1);
        // From a checkpoint, only what follows it is read.
        let mut after = Vec::new();
        for_each_segment(dir.path(), Some(a.end), |e| {
            after.extend(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(ids(&after), [3]);
        let mut none = Vec::new();
        let newest = for_each_segment(dir.path(), Some(b.end), |e| {
            none.extend(e);
            Ok(())
        })
        .unwrap();
        assert!(none.is_empty());
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

    /// A rotation takes the spare segment made in the background; a spare left by a run
    /// is removed at the next and never read as a segment.
    #[test]
    fn a_rotation_takes_the_spare_made_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(dir.path(), 0);
        w.append(&mut [entry(1)]).unwrap();
        assert!(w.spare.is_some(), "the next segment is being made");
        w.offset = SEGMENT_BYTES - 10;
        let a = w.append(&mut [entry(2)]).unwrap();
        assert_eq!((a.generation, a.closed), (2, Some(1)));
        let len = fs::metadata(segment_path(dir.path(), 2)).unwrap().len();
        assert_eq!(len, SEGMENT_BYTES);
        let (entries, newest) = read_all(dir.path()).unwrap();
        assert_eq!((ids(&entries), newest), (vec![1, 2], 2));
        let spare = w.spare.take().unwrap().join().unwrap().unwrap();
        assert_eq!(fs::metadata(&spare.0).unwrap().len(), SEGMENT_BYTES);
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
        remove_spares(dir.path()).unwrap();
        assert!(!spare.0.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
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
        assert_eq!((a.generation, a.closed), (8, Some(7)));
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
            let mut bytes = seal_frame(1, 0, encode_entries(&[entry(1)]).unwrap().0);
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
