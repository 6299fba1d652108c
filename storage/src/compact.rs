//! Reclaiming space: the oldest sealed segment is walked a bounded number of bytes per call; records the
//! caller still needs are appended again at the head of the log, and the file is deleted once walked.
//!
//! Design: the caller owns liveness (only it knows that a session was deleted or a message acknowledged),
//! so it answers a yes/no per record through a callback, and learns where each kept record went from the
//! [`Relocation`] list of the step. Records are moved, never rewritten in place, so the append path stays
//! the only writer and recovery has no second format to understand. A relocated record gets a higher
//! [`Lsn`] than every record that existed when it moved; a crash after the copies are durable but before
//! the old file is deleted leaves both copies, and replaying in log order with last-writer-wins per key
//! (the natural way to rebuild keyed state) gives the same result as without the crash.

use std::fs::{self, File};
use std::path::PathBuf;

use memmap2::Mmap;

use crate::error::StorageError;
use crate::format::{read_checked, RECORD_OVERHEAD, SEGMENT_HEADER_LEN};
use crate::log::Log;
use crate::segment;
use crate::{Lsn, RecordType};

pub(crate) struct CompactCursor {
    id: u64,
    path: PathBuf,
    map: Mmap,
    /// Next frame to look at; `SEGMENT_HEADER_LEN <= pos <= end`.
    pos: usize,
    end: usize,
}

/// A kept record moved from `from` to `to`; the old position is gone once its segment is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relocation {
    pub from: Lsn,
    pub to: Lsn,
}

/// The caller's verdict on one record during compaction ([`Log::compact_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// Still needed as it is: appended again unchanged.
    Whole,
    /// Needed in part: this payload (no larger than the old one) is appended in its place, with the same
    /// type. For a record that describes several things of which some are gone (a message queued for
    /// several sessions, some of which have acknowledged it): copying it whole would revive those parts
    /// once the records that cancelled them are compacted away.
    Rewritten(Vec<u8>),
    /// Not needed: dropped.
    Drop,
}

/// What one [`Log::compact_step`] did.
#[derive(Debug, Default)]
pub struct CompactProgress {
    /// The segment worked on; `None` when there is no sealed segment to compact (only the active one).
    pub segment: Option<u64>,
    /// Bytes of the old segment walked in this step (frames, not counting the header).
    pub scanned_bytes: u64,
    /// Records kept (relocated) and dropped in this step.
    pub kept: u64,
    pub dropped: u64,
    /// Where every kept record went, in log order. Apply these before calling `compact_step` again.
    pub relocated: Vec<Relocation>,
    /// The segment was fully walked, the relocated copies flushed and the file deleted.
    pub deleted: bool,
}

impl Log {
    /// Walks up to `budget_bytes` (at least one record) of the oldest sealed segment, calling
    /// `live(lsn, type, payload)` for each record: `true` keeps it (it is appended again, see
    /// [`CompactProgress::relocated`]), `false` drops it. When the walk reaches the end of the segment, the
    /// relocated records are flushed (whatever the fsync policy: the old copy is about to disappear) and
    /// the file is deleted. Never touches the active segment.
    ///
    /// Each record is offered to `live` once. If a relocation cannot be appended (disk full) the step
    /// stops before offering that record: it returns the progress made so far, or the error if there was
    /// none, and the next call resumes at the same record.
    pub fn compact_step(
        &mut self,
        budget_bytes: usize,
        live: &mut dyn FnMut(Lsn, RecordType, &[u8]) -> bool,
    ) -> Result<CompactProgress, StorageError> {
        self.compact_with(budget_bytes, &mut |lsn, t, p| {
            if live(lsn, t, p) {
                Keep::Whole
            } else {
                Keep::Drop
            }
        })
    }

    /// [`Log::compact_step`] with a three-way verdict: a kept record may be rewritten smaller (see
    /// [`Keep::Rewritten`]). A rewritten payload larger than the original is a caller bug: it is kept
    /// whole instead (room was made for the original size only).
    pub fn compact_with(
        &mut self,
        budget_bytes: usize,
        live: &mut dyn FnMut(Lsn, RecordType, &[u8]) -> Keep,
    ) -> Result<CompactProgress, StorageError> {
        self.check_poisoned()?;
        let mut progress = CompactProgress::default();
        let mut cur = match self.compact.take() {
            Some(c) => c,
            None => {
                let Some(s) = self.sealed.front() else { return Ok(progress) };
                let file = File::open(&s.path).map_err(|e| StorageError::io(&s.path, e))?;
                let map = segment::map_ro(&file, &s.path)?;
                CompactCursor { id: s.id, path: s.path.clone(), map, pos: SEGMENT_HEADER_LEN, end: s.end }
            }
        };
        debug_assert_eq!(self.sealed.front().map(|s| s.id), Some(cur.id), "the cursor is on the oldest");
        progress.segment = Some(cur.id);
        let start = cur.pos;
        while cur.pos < cur.end && cur.pos - start < budget_bytes.max(1) {
            let (rtype, payload, next) = match read_checked(&cur.map, cur.pos, cur.end) {
                Ok(frame) => frame,
                Err(reason) => {
                    let err =
                        StorageError::Corrupt { file: cur.path.clone(), offset: cur.pos as u64, reason };
                    self.compact = Some(cur);
                    return Err(err);
                }
            };
            // Make room before asking, so that a record the caller said to keep is always kept.
            if let Err(e) = self.ensure_room(RECORD_OVERHEAD + payload.len()) {
                progress.scanned_bytes = (cur.pos - start) as u64;
                self.compact = Some(cur);
                return if progress.kept + progress.dropped == 0 { Err(e) } else { Ok(progress) };
            }
            let from = Lsn { segment: cur.id, offset: cur.pos as u64 };
            let verdict = live(from, RecordType(rtype), payload);
            let kept = match &verdict {
                Keep::Drop => None,
                Keep::Rewritten(p) if p.len() <= payload.len() => Some(&p[..]),
                Keep::Rewritten(_) => {
                    debug_assert!(false, "a rewritten record may not grow");
                    Some(payload)
                }
                Keep::Whole => Some(payload),
            };
            match kept {
                Some(p) => {
                    let to = self.append(RecordType(rtype), p)?;
                    progress.relocated.push(Relocation { from, to });
                    progress.kept += 1;
                }
                None => progress.dropped += 1,
            }
            cur.pos = next;
        }
        progress.scanned_bytes = (cur.pos - start) as u64;
        if cur.pos < cur.end {
            self.compact = Some(cur);
            return Ok(progress);
        }
        // The only other copy of each relocated record is about to go: make the new ones durable first.
        if let Err(e) = self.flush_all() {
            self.compact = Some(cur);
            return Err(e);
        }
        if let Err(e) = fs::remove_file(&cur.path) {
            let err = StorageError::io(&cur.path, e);
            self.compact = Some(cur);
            return Err(err);
        }
        let removed = self.sealed.pop_front().expect("the cursor's segment is the oldest sealed one");
        debug_assert_eq!(removed.id, cur.id);
        self.dir_sync_pending = true;
        progress.deleted = true;
        Ok(progress)
    }
}
