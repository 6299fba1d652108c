//! On-disk format: the segment header, the record frame and the seal, and the scanner that both recovery and
//! `inspect` use, so that the two can never disagree about where a log ends.
//!
//! ```text
//! segment file "<id:020>.seg", preallocated to segment_bytes, zero-filled past the last frame:
//!   header (32 bytes)
//!     0..8    magic   b"SHMQLOG\0"
//!     8..10   format version, u16 LE (FORMAT_VERSION)
//!     10..12  header length, u16 LE (32)
//!     12..16  reserved, zero
//!     16..24  segment id, u64 LE (must match the file name)
//!     24..28  reserved, zero
//!     28..32  CRC32C of bytes 0..28, u32 LE
//!   record frame (9-byte header + payload), repeated, no padding:
//!     0..4    payload length, u32 LE (u32::MAX is reserved for the seal)
//!     4..8    CRC32C over (length LE, type, payload), u32 LE
//!     8       record type
//!     9..     payload
//!   seal (9 bytes, written once when the log moves on to the next segment):
//!     length = u32::MAX, type = 0, CRC32C over (u32::MAX LE, 0, segment id LE)
//! ```
//!
//! All integers are little-endian. An all-zero frame header never validates (its CRC would be
//! CRC32C of five zero bytes, which is not zero), so zeroed preallocated space reads as "end of log".

use std::path::Path;

use crate::error::StorageError;

pub(crate) const MAGIC: [u8; 8] = *b"SHMQLOG\0";
/// The newest format this code reads and the one it writes.
pub const FORMAT_VERSION: u16 = 1;
pub(crate) const SEGMENT_HEADER_LEN: usize = 32;
/// Bytes a record costs on top of its payload.
pub const RECORD_OVERHEAD: usize = 9;
pub(crate) const SEAL_LEN: usize = RECORD_OVERHEAD;
const SEAL_MARK: u32 = u32::MAX;

pub(crate) fn encode_segment_header(id: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header. Magic first (is this our file at all?), then the version (a newer format may
/// lay out the rest differently, so its CRC means nothing to us), then the CRC, then the id.
pub(crate) fn check_segment_header(buf: &[u8], expected_id: u64, file: &Path) -> Result<(), StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt { file: file.to_path_buf(), offset: 0, reason };
    if buf.len() < SEGMENT_HEADER_LEN {
        return Err(corrupt(format!("file is {} bytes, shorter than the segment header", buf.len())));
    }
    if buf[0..8] != MAGIC {
        return Err(corrupt(format!("bad magic {:02x?}", &buf[0..8])));
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if version > FORMAT_VERSION {
        return Err(StorageError::UnsupportedVersion {
            file: file.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let stored = u32::from_le_bytes(buf[28..32].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&buf[0..28]);
    if stored != computed {
        return Err(corrupt(format!("header CRC mismatch (stored {stored:08x}, computed {computed:08x})")));
    }
    if version == 0 || usize::from(u16::from_le_bytes([buf[10], buf[11]])) != SEGMENT_HEADER_LEN {
        return Err(corrupt(format!("invalid header (version {version})")));
    }
    let id = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
    if id != expected_id {
        return Err(corrupt(format!("header says segment {id} but the file name says {expected_id}")));
    }
    Ok(())
}

pub(crate) fn record_crc(len: u32, rtype: u8, payload: &[u8]) -> u32 {
    let c = crc32c::crc32c(&len.to_le_bytes());
    let c = crc32c::crc32c_append(c, &[rtype]);
    crc32c::crc32c_append(c, payload)
}

fn seal_crc(segment_id: u64) -> u32 {
    let c = crc32c::crc32c(&SEAL_MARK.to_le_bytes());
    let c = crc32c::crc32c_append(c, &[0]);
    crc32c::crc32c_append(c, &segment_id.to_le_bytes())
}

/// Writes one frame at the start of `dst`, which must be exactly `RECORD_OVERHEAD + payload.len()` long.
pub(crate) fn write_record(dst: &mut [u8], rtype: u8, payload: &[u8]) {
    debug_assert_eq!(dst.len(), RECORD_OVERHEAD + payload.len());
    let len = u32::try_from(payload.len()).expect("caller checked the record size");
    debug_assert_ne!(len, SEAL_MARK);
    dst[0..4].copy_from_slice(&len.to_le_bytes());
    dst[4..8].copy_from_slice(&record_crc(len, rtype, payload).to_le_bytes());
    dst[8] = rtype;
    dst[RECORD_OVERHEAD..].copy_from_slice(payload);
}

pub(crate) fn write_seal(dst: &mut [u8], segment_id: u64) {
    dst[0..4].copy_from_slice(&SEAL_MARK.to_le_bytes());
    dst[4..8].copy_from_slice(&seal_crc(segment_id).to_le_bytes());
    dst[8] = 0;
}

/// Reads the frame at `off` without checking its CRC: only for bytes already validated by [`scan`] or
/// written by this process. Returns (type, payload, offset of the next frame).
pub(crate) fn read_validated(buf: &[u8], off: usize) -> (u8, &[u8], usize) {
    let len = u32::from_le_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
    let start = off + RECORD_OVERHEAD;
    (buf[off + 8], &buf[start..start + len], start + len)
}

/// Reads the frame at `off` of a region known to end at `end`, checking bounds and CRC again: for readers
/// that move the only copy of a record elsewhere (compaction), where re-checking costs little.
pub(crate) fn read_checked(buf: &[u8], off: usize, end: usize) -> Result<(u8, &[u8], usize), String> {
    if end - off < RECORD_OVERHEAD {
        return Err("partial record header".into());
    }
    let len = u32::from_le_bytes(buf[off..off + 4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(buf[off + 4..off + 8].try_into().expect("4 bytes"));
    if len as usize > end - off - RECORD_OVERHEAD {
        return Err(format!("record length {len} runs past the end of the records"));
    }
    let (rtype, payload, next) = read_validated(buf, off);
    let computed = record_crc(len, rtype, payload);
    if computed != crc {
        return Err(format!("CRC mismatch (stored {crc:08x}, computed {computed:08x})"));
    }
    Ok((rtype, payload, next))
}

/// How a scan of one segment stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// A valid seal sits at `Scan::end`: the writer moved on to the next segment.
    Sealed,
    /// No valid frame at `Scan::end`. `reason` is `None` for a clean end (only zeros follow); otherwise it
    /// says what was wrong, and non-zero bytes extend up to `garbage_end`.
    End { reason: Option<String>, garbage_end: usize },
}

#[derive(Debug)]
pub(crate) struct Scan {
    /// Offset just past the last valid record: where the seal is, or where the next append goes.
    pub end: usize,
    pub stop: Stop,
}

impl Scan {
    #[cfg(test)]
    pub(crate) fn is_clean_end(&self) -> bool {
        matches!(self.stop, Stop::End { reason: None, .. })
    }
}

/// Walks the frames of a segment whose header was already checked, calling `visit(offset, type, payload)`
/// for every valid record, and stops at the first frame that is not one.
pub(crate) fn scan(buf: &[u8], segment_id: u64, visit: &mut dyn FnMut(usize, u8, &[u8])) -> Scan {
    let n = buf.len();
    let mut off = SEGMENT_HEADER_LEN.min(n);
    loop {
        let bad = |reason: String, off: usize| {
            let garbage_end = nonzero_end(buf, off);
            Scan { end: off, stop: Stop::End { reason: Some(reason), garbage_end: garbage_end.max(off) } }
        };
        if n - off < RECORD_OVERHEAD {
            let garbage_end = nonzero_end(buf, off);
            if garbage_end == off {
                return Scan { end: off, stop: Stop::End { reason: None, garbage_end } };
            }
            return bad(format!("partial record header ({} bytes left in the file)", n - off), off);
        }
        let len = u32::from_le_bytes(buf[off..off + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(buf[off + 4..off + 8].try_into().expect("4 bytes"));
        let rtype = buf[off + 8];
        if len == 0 && crc == 0 && rtype == 0 {
            let garbage_end = nonzero_end(buf, off);
            if garbage_end == off {
                return Scan { end: off, stop: Stop::End { reason: None, garbage_end } };
            }
            return bad(format!("zero-filled gap followed by data up to offset {garbage_end}"), off);
        }
        if len == SEAL_MARK {
            if rtype == 0 && crc == seal_crc(segment_id) {
                return Scan { end: off, stop: Stop::Sealed };
            }
            return bad("invalid seal".to_string(), off);
        }
        // A writer always leaves room for the seal after a record, so a frame that eats into that room is
        // as invalid as one that runs past the end of the file.
        let room = n - off - RECORD_OVERHEAD;
        if len as usize > room.saturating_sub(SEAL_LEN) {
            return bad(
                format!("record length {len} runs past the end of the segment ({room} bytes left)"),
                off,
            );
        }
        let payload = &buf[off + RECORD_OVERHEAD..off + RECORD_OVERHEAD + len as usize];
        let computed = record_crc(len, rtype, payload);
        if computed != crc {
            return bad(format!("CRC mismatch (stored {crc:08x}, computed {computed:08x})"), off);
        }
        visit(off, rtype, payload);
        off += RECORD_OVERHEAD + len as usize;
    }
}

/// Offset just past the last non-zero byte at or after `from` (`from` itself when only zeros follow).
/// Reverse scan in page-sized chunks whose OR-reduction the compiler vectorises: recovery runs this over
/// up to a whole zero-filled segment.
pub(crate) fn nonzero_end(buf: &[u8], from: usize) -> usize {
    let tail = &buf[from..];
    let mut end = tail.len();
    for chunk in tail.rchunks(4096) {
        if chunk.iter().fold(0u8, |a, &b| a | b) != 0 {
            let last = chunk.iter().rposition(|&b| b != 0).expect("chunk has a non-zero byte");
            return from + end - chunk.len() + last + 1;
        }
        end -= chunk.len();
    }
    from
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(records: &[(u8, &[u8])], size: usize, seal: bool) -> Vec<u8> {
        let mut buf = vec![0u8; size];
        buf[..SEGMENT_HEADER_LEN].copy_from_slice(&encode_segment_header(7));
        let mut off = SEGMENT_HEADER_LEN;
        for (t, p) in records {
            write_record(&mut buf[off..off + RECORD_OVERHEAD + p.len()], *t, p);
            off += RECORD_OVERHEAD + p.len();
        }
        if seal {
            write_seal(&mut buf[off..off + SEAL_LEN], 7);
        }
        buf
    }

    fn collect(buf: &[u8]) -> (Vec<(usize, u8, Vec<u8>)>, Scan) {
        let mut v = Vec::new();
        let s = scan(buf, 7, &mut |o, t, p| v.push((o, t, p.to_vec())));
        (v, s)
    }

    #[test]
    fn header_round_trip_and_errors() {
        let p = Path::new("x.seg");
        let h = encode_segment_header(7);
        check_segment_header(&h, 7, p).unwrap();
        assert!(matches!(check_segment_header(&h, 8, p), Err(StorageError::Corrupt { .. })));
        let mut bad = h;
        bad[0] ^= 1;
        assert!(matches!(check_segment_header(&bad, 7, p), Err(StorageError::Corrupt { .. })));
        let mut newer = h;
        newer[8] = 9;
        assert!(matches!(
            check_segment_header(&newer, 7, p),
            Err(StorageError::UnsupportedVersion { found: 9, supported: FORMAT_VERSION, .. })
        ));
        let mut flipped = h;
        flipped[20] ^= 0x10;
        assert!(matches!(check_segment_header(&flipped, 7, p), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn zero_header_is_not_a_valid_record() {
        assert_ne!(record_crc(0, 0, &[]), 0);
    }

    #[test]
    fn scan_clean_sealed_and_torn() {
        let buf = segment(&[(1, b"hello"), (2, b""), (3, &[0u8; 100])], 4096, false);
        let (recs, s) = collect(&buf);
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[1], (SEGMENT_HEADER_LEN + 14, 2, vec![]));
        assert!(s.is_clean_end());
        assert_eq!(s.end, SEGMENT_HEADER_LEN + 14 + 9 + 109);

        let sealed = segment(&[(1, b"a")], 4096, true);
        let (recs, sealed_scan) = collect(&sealed);
        assert_eq!((recs.len(), sealed_scan.stop), (1, Stop::Sealed));

        let mut torn = buf.clone();
        torn[s.end - 3] ^= 0xff; // inside the last payload
        let (recs, t) = collect(&torn);
        assert_eq!(recs.len(), 2);
        match t.stop {
            Stop::End { reason: Some(r), garbage_end } => {
                assert!(r.contains("CRC"), "{r}");
                assert_eq!(garbage_end, s.end - 2); // the flipped byte is the last non-zero one
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nonzero_end_finds_last_byte() {
        let mut v = vec![0u8; 10_000];
        assert_eq!(nonzero_end(&v, 5), 5);
        v[7000] = 1;
        assert_eq!(nonzero_end(&v, 5), 7001);
        assert_eq!(nonzero_end(&v, 7001), 7001);
        v[9999] = 1;
        assert_eq!(nonzero_end(&v, 0), 10_000);
    }
}
