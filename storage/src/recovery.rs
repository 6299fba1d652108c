//! What [`crate::Log::open`] hands back: the recovered records and a report.
//!
//! Why an iterator over read-only mappings rather than a `Vec<(Lsn, RecordType, Vec<u8>)>`: the shard
//! decodes every record into its own state (sessions, queues) as it reads it, so a vector would hold every
//! payload twice at the peak, once in the vector and once decoded; for a 64 MiB-per-segment log that is
//! gigabytes at start-up. Here payloads are borrowed straight from the page cache, CRCs were already
//! checked by `open` (which must decide Corrupt-or-not before returning), and dropping the [`Recovery`]
//! unmaps everything. A callback passed to `open` would avoid the mappings too, but would force the shard to
//! build its state inside `open`'s stack frame and make errors in its decoding awkward to return.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use memmap2::Mmap;

use crate::format::{read_validated, SEGMENT_HEADER_LEN};
use crate::{Lsn, RecordType};

pub(crate) struct RecoveredSegment {
    pub id: u64,
    pub map: Mmap,
    /// Offset just past the last valid record; every frame before it passed its CRC check.
    pub end: usize,
}

/// The records found by [`crate::Log::open`], and what recovery did. Records are borrowed from read-only
/// mappings of the segment files, so rebuilding state from them copies each payload at most once (into the
/// caller's own structures); drop the `Recovery` when done to unmap.
pub struct Recovery {
    pub(crate) segments: Vec<RecoveredSegment>,
    pub report: RecoveryReport,
}

impl Recovery {
    /// Every valid record, in log order. Payloads borrow from the mapped segment files.
    pub fn records(&self) -> Records<'_> {
        Records { segments: &self.segments, seg: 0, off: SEGMENT_HEADER_LEN }
    }
}

impl fmt::Debug for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recovery").field("report", &self.report).finish_non_exhaustive()
    }
}

pub struct Records<'a> {
    segments: &'a [RecoveredSegment],
    seg: usize,
    off: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = (Lsn, RecordType, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let s = self.segments.get(self.seg)?;
            if self.off < s.end {
                let (rtype, payload, next) = read_validated(&s.map, self.off);
                debug_assert!(next <= s.end, "validated frames never cross the recovered end");
                let lsn = Lsn { segment: s.id, offset: self.off as u64 };
                self.off = next;
                return Some((lsn, RecordType(rtype), payload));
            }
            self.seg += 1;
            self.off = SEGMENT_HEADER_LEN;
        }
    }
}

/// The torn or corrupt tail that recovery cut off the last segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub file: PathBuf,
    /// Where the first invalid frame started; the next append goes here.
    pub offset: u64,
    /// Non-zero bytes from `offset` to the last non-zero byte of the file, now zeroed.
    pub bytes: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub by_type: BTreeMap<RecordType, u64>,
    /// Payload bytes of the valid records.
    pub payload_bytes: u64,
    /// Bytes of the segments in use: headers, frames and seals.
    pub log_bytes: u64,
    pub cut: Option<Cut>,
    /// Segment files from creations that a crash interrupted before their rename; deleted.
    pub removed_temp_files: Vec<PathBuf>,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} segments, {} records, {} payload bytes ({} log bytes)",
            self.segments, self.records, self.payload_bytes, self.log_bytes
        )?;
        for (t, n) in &self.by_type {
            write!(f, ", type {t}: {n}")?;
        }
        match &self.cut {
            Some(c) => {
                write!(f, "; cut {} bytes at {}:{} ({})", c.bytes, c.file.display(), c.offset, c.reason)
            }
            None => f.write_str("; nothing cut"),
        }
    }
}
