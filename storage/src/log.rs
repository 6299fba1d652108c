use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use memmap2::MmapMut;

use crate::compact::CompactCursor;
use crate::error::StorageError;
use crate::flusher::{Done, Flusher, Job, WakeFn};
use crate::format::{self, check_segment_header, scan, Stop, RECORD_OVERHEAD, SEAL_LEN, SEGMENT_HEADER_LEN};
use crate::recovery::{Cut, RecoveredSegment, Recovery, RecoveryReport};
use crate::segment::{self, Prepared};
use crate::{FsyncPolicy, LogConfig, Lsn, RecordType};

/// One segment as [`Log::segments`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub id: u64,
    pub path: PathBuf,
    /// Allocated size of the file.
    pub file_bytes: u64,
    /// Header and records (not the seal): where the next append would go if this were the active segment.
    pub used_bytes: u64,
    /// The segment appends go to; it is never compacted.
    pub active: bool,
}

pub(crate) struct SealedSegment {
    pub id: u64,
    pub path: PathBuf,
    /// Offset just past the last record (the seal sits here).
    pub end: usize,
    pub file_bytes: u64,
}

struct Active {
    id: u64,
    path: PathBuf,
    /// Kept open for the lifetime of the mapping (the mapping does not need it, but an open descriptor
    /// makes the file visibly in use while we write it) and shared with the flusher, which syncs it.
    file: Arc<File>,
    map: MmapMut,
    /// Where the next record goes.
    write: usize,
    /// A seal has been written at `write`: the segment takes no more records.
    sealed: bool,
}

impl Active {
    fn check(&self) {
        debug_assert!(self.write >= SEGMENT_HEADER_LEN, "records start after the header");
        debug_assert!(self.write + SEAL_LEN <= self.map.len(), "room for the seal is always kept");
    }

    /// Bytes that must reach the disk for everything written so far to be durable.
    fn written_end(&self) -> usize {
        self.write + if self.sealed { SEAL_LEN } else { 0 }
    }
}

/// Upper bounds (µs) of the flush-latency buckets of [`LogStats`]; a last bucket takes the rest.
pub const FLUSH_BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];

/// What a log wrote and how long its flushes took, for metrics (plain integers: the owner copies them).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogStats {
    /// Bytes of records appended (headers included), relocated ones too.
    pub bytes_appended: u64,
    pub flushes: u64,
    pub flush_us_sum: u64,
    /// Flushes per latency bucket ([`FLUSH_BUCKETS_US`], then the rest); not cumulative.
    pub flush_buckets: [u64; FLUSH_BUCKETS_US.len() + 1],
}

impl LogStats {
    fn record_flush(&mut self, took: std::time::Duration) {
        let us = took.as_micros().min(u64::MAX as u128) as u64;
        self.flushes += 1;
        self.flush_us_sum = self.flush_us_sum.saturating_add(us);
        let i = FLUSH_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(FLUSH_BUCKETS_US.len());
        self.flush_buckets[i] += 1;
    }
}

/// The durable log of one shard. See the crate documentation.
pub struct Log {
    dir: PathBuf,
    segment_bytes: u64,
    fsync: FsyncPolicy,
    /// Holds the directory's `flock` for as long as the log is open.
    _lock: File,
    /// Segments before the active one, oldest first, ids consecutive; sealed and never written again.
    pub(crate) sealed: VecDeque<SealedSegment>,
    /// `None` only for a log that has never had a segment (created lazily by the first append).
    active: Option<Active>,
    next_id: u64,
    /// Bytes of the active segment before this offset have been flushed. `flushed <= active.written_end()`.
    flushed: usize,
    /// Every record below this position is durable; never ahead of `written_lsn()`.
    durable: Lsn,
    /// A segment was created or deleted since the directory was last synced: until it is, records in a new
    /// segment are not durable (their file name could vanish with a power failure).
    pub(crate) dir_sync_pending: bool,
    last_flush: Instant,
    poisoned: Option<String>,
    pub(crate) compact: Option<CompactCursor>,
    /// Set by [`Log::start_background_flush`]: flushes and segment creation run on a thread of their own.
    background: Option<Background>,
    stats: LogStats,
    /// When the background flush in flight was handed over, for its latency.
    flush_started: Option<Instant>,
}

/// The state of a log's flusher thread and of what it is doing.
struct Background {
    flusher: Flusher,
    /// A flush job is outstanding. Invariant: while it is, the active segment is neither replaced nor
    /// unmapped, and no other flush starts (its completion names a byte offset of this segment).
    flush_in_flight: bool,
    prepare_in_flight: bool,
    /// The next segment, created and synced ahead of need; its id is `next_id` when it is used.
    prepared: Option<Prepared>,
}

impl Drop for Background {
    fn drop(&mut self) {
        // A segment prepared but never installed is only a temporary file: remove it now rather than
        // leave it to the next recovery.
        while self.flush_in_flight || self.prepare_in_flight {
            match self.flusher.wait_done() {
                Some(Done::Prepared(p)) => {
                    self.prepare_in_flight = false;
                    p.abandon();
                }
                Some(Done::PrepareFailed(_)) => self.prepare_in_flight = false,
                Some(_) => self.flush_in_flight = false,
                None => break,
            }
        }
        if let Some(p) = self.prepared.take() {
            p.abandon();
        }
    }
}

impl Log {
    /// Opens (or creates) the log in `cfg.dir` and recovers it; see [`Recovery`] for how records come back.
    ///
    /// A torn or corrupt tail of the last segment is cut off (zeroed, reported in
    /// [`RecoveryReport::cut`] and logged with `tracing::warn!`); damage anywhere else is
    /// [`StorageError::Corrupt`], and a segment from a newer format is
    /// [`StorageError::UnsupportedVersion`]: the caller must not start on a log it cannot fully read.
    pub fn open(cfg: LogConfig) -> Result<(Log, Recovery), StorageError> {
        let min = LogConfig::MIN_SEGMENT_BYTES;
        if cfg.segment_bytes < min || cfg.segment_bytes > (1 << 40) {
            return Err(StorageError::InvalidConfig(format!(
                "segment_bytes {} outside {min}..=2^40",
                cfg.segment_bytes
            )));
        }
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir)
            .map_err(|e| StorageError::DirNotWritable { path: dir.clone(), source: e })?;
        let lock = segment::lock_dir(&dir)?;
        probe_writable(&dir)?;

        let listing = segment::list(&dir)?;
        let mut report = RecoveryReport::default();
        for pair in listing.segments.windows(2) {
            if pair[1].0 != pair[0].0 + 1 {
                return Err(StorageError::Corrupt {
                    file: pair[1].1.clone(),
                    offset: 0,
                    reason: format!("segments {}..{} are missing before this one", pair[0].0 + 1, pair[1].0),
                });
            }
        }

        let mut by_type = [0u64; 256];
        let (mut records, mut payload_bytes) = (0u64, 0u64);
        let mut recovered = Vec::with_capacity(listing.segments.len());
        let mut sealed = VecDeque::new();
        let mut active = None;
        let count = listing.segments.len();
        for (i, (id, path)) in listing.segments.into_iter().enumerate() {
            let mut visit = |_: usize, t: u8, p: &[u8]| {
                by_type[t as usize] += 1;
                records += 1;
                payload_bytes += p.len() as u64;
            };
            if i + 1 < count {
                let file = File::open(&path).map_err(|e| StorageError::io(&path, e))?;
                check_length(&file, &path)?;
                let map = segment::map_ro(&file, &path)?;
                check_segment_header(&map, id, &path)?;
                let s = scan(&map, id, &mut visit);
                if let Stop::End { reason, .. } = s.stop {
                    return Err(StorageError::Corrupt {
                        file: path,
                        offset: s.end as u64,
                        reason: reason.unwrap_or_else(|| {
                            "segment ends without a seal but a later segment exists (its tail was lost)"
                                .into()
                        }),
                    });
                }
                report.log_bytes += (s.end + SEAL_LEN) as u64;
                sealed.push_back(SealedSegment { id, path, end: s.end, file_bytes: map.len() as u64 });
                recovered.push(RecoveredSegment { id, map, end: s.end });
            } else {
                let (a, r) = open_last(id, path, cfg.segment_bytes, &mut visit, &mut report)?;
                report.log_bytes += a.written_end() as u64;
                recovered.push(r);
                active = Some(a);
            }
        }
        // Only now that the log is known to be readable: a directory we refuse stays as it was.
        for tmp in listing.temp_files {
            tracing::info!(file = %tmp.display(), "log: removing an unfinished segment creation");
            fs::remove_file(&tmp).map_err(|e| StorageError::io(&tmp, e))?;
            report.removed_temp_files.push(tmp);
        }
        report.segments = count;
        report.records = records;
        report.payload_bytes = payload_bytes;
        report.by_type = (0..=255u8)
            .filter(|&t| by_type[t as usize] > 0)
            .map(|t| (RecordType(t), by_type[t as usize]))
            .collect();
        // The temp-file removals and any rename the previous run had not synced yet.
        segment::sync_dir(&dir)?;

        let next_id = active.as_ref().map_or(1, |a: &Active| a.id + 1);
        let flushed = active.as_ref().map_or(0, |a| a.written_end());
        let mut log = Log {
            dir,
            segment_bytes: cfg.segment_bytes,
            fsync: cfg.fsync,
            _lock: lock,
            sealed,
            active,
            next_id,
            flushed,
            durable: Lsn::default(),
            dir_sync_pending: false,
            last_flush: Instant::now(),
            stats: LogStats::default(),
            flush_started: None,
            background: None,
            poisoned: None,
            compact: None,
        };
        log.durable = log.written_lsn();
        tracing::info!(dir = %log.dir.display(), "log: recovered {report}");
        Ok((log, Recovery { segments: recovered, report }))
    }

    /// The largest payload a record can have with this configuration.
    pub fn max_payload(&self) -> usize {
        let max = self.segment_bytes as usize - SEGMENT_HEADER_LEN - RECORD_OVERHEAD - SEAL_LEN;
        max.min(u32::MAX as usize - 1)
    }

    /// Copies a record into the log and returns its position. It survives a process crash from now on,
    /// and a power failure once [`Log::commit`] reports a durable bound above it.
    pub fn append(&mut self, rtype: RecordType, payload: &[u8]) -> Result<Lsn, StorageError> {
        self.check_poisoned()?;
        let max = self.max_payload();
        if payload.len() > max {
            return Err(StorageError::RecordTooLarge { size: payload.len(), max });
        }
        let need = RECORD_OVERHEAD + payload.len();
        self.ensure_room(need)?;
        let a = self.active.as_mut().expect("ensure_room leaves an active segment");
        let off = a.write;
        format::write_record(&mut a.map[off..off + need], rtype.0, payload);
        a.write += need;
        a.check();
        self.stats.bytes_appended += need as u64;
        Ok(Lsn { segment: a.id, offset: off as u64 })
    }

    /// Makes sure a frame of `need` bytes fits in the active segment, rolling to a new one if not.
    pub(crate) fn ensure_room(&mut self, need: usize) -> Result<(), StorageError> {
        let fits = matches!(&self.active, Some(a) if !a.sealed && a.write + need + SEAL_LEN <= a.map.len());
        if fits {
            Ok(())
        } else {
            self.roll()
        }
    }

    /// Seals the active segment and starts the next one. The order matters for crash safety: allocate the
    /// new file first (out of space changes nothing), then seal and flush the old one, and only then give
    /// the new one its name — so no crash can leave an unsealed segment followed by another.
    fn roll(&mut self) -> Result<(), StorageError> {
        self.check_poisoned()?;
        // The flush in flight names an offset of the segment being replaced: let it land first.
        self.wait_background()?;
        let ahead = self.background.as_mut().and_then(|b| b.prepared.take());
        let prepared = match ahead {
            Some(p) if p.id == self.next_id => p,
            other => {
                if let Some(p) = other {
                    p.abandon();
                }
                Prepared::create(&self.dir, self.next_id, self.segment_bytes)?
            }
        };
        if let Some(a) = self.active.as_mut() {
            if !a.sealed {
                let w = a.write;
                format::write_seal(&mut a.map[w..w + SEAL_LEN], a.id);
                a.sealed = true;
            }
        }
        if let Err(e) = self.flush_all() {
            prepared.abandon();
            return Err(e);
        }
        let id = prepared.id;
        let (file, map, path) = prepared.install()?;
        if let Some(old) = self.active.take() {
            self.sealed.push_back(SealedSegment {
                id: old.id,
                path: old.path,
                end: old.write,
                file_bytes: old.map.len() as u64,
            });
        }
        let a = Active { id, path, file: Arc::new(file), map, write: SEGMENT_HEADER_LEN, sealed: false };
        a.check();
        self.flushed = a.write;
        self.active = Some(a);
        self.next_id = id + 1;
        self.dir_sync_pending = true;
        debug_assert!(self.sealed.iter().zip(self.sealed.iter().skip(1)).all(|(x, y)| y.id == x.id + 1));
        Ok(())
    }

    /// Group commit: flushes what the policy says is due and returns the durable bound — every record whose
    /// [`Lsn`] is below it survives power loss. Call it once per event-loop iteration after the appends.
    ///
    /// With a background flusher ([`Log::start_background_flush`]) it never waits for the disk: it takes
    /// what the flusher completed, starts the next flush if one is due and none is running, and returns;
    /// the flusher wakes the owner when a flush completes, and the next `commit` returns the new bound.
    pub fn commit(&mut self, now: Instant) -> Result<Lsn, StorageError> {
        self.check_poisoned()?;
        self.take_completed()?;
        let due = match self.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(d) => now.saturating_duration_since(self.last_flush) >= d,
            FsyncPolicy::Never => false,
        };
        if due && self.has_unflushed() && !self.flush_in_flight() {
            if self.background.is_some() {
                self.start_flush();
            } else {
                self.flush_all()?;
            }
            self.last_flush = now;
        }
        self.prepare_ahead();
        Ok(self.durable)
    }

    /// Flushes everything now, whatever the policy (for shutdown), and returns the durable bound.
    pub fn flush(&mut self) -> Result<Lsn, StorageError> {
        self.flush_all()?;
        Ok(self.durable)
    }

    /// Moves flushes and the creation of segments to a thread of their own, which calls `wake` after
    /// each job (see [`crate::flusher`]). From then on [`Log::commit`] never waits for the disk; a roll
    /// to the next segment, compaction and [`Log::flush`] still flush inline, after waiting for the
    /// flusher (a roll finds its segment prepared ahead).
    pub fn start_background_flush(&mut self, wake: WakeFn) -> Result<(), StorageError> {
        if self.background.is_some() {
            return Ok(());
        }
        let name = format!("flush-{}", self.dir.file_name().and_then(|n| n.to_str()).unwrap_or("log"));
        let flusher = Flusher::start(&self.dir, name, wake)?;
        self.background =
            Some(Background { flusher, flush_in_flight: false, prepare_in_flight: false, prepared: None });
        self.prepare_ahead();
        Ok(())
    }

    fn flush_in_flight(&self) -> bool {
        self.background.as_ref().is_some_and(|b| b.flush_in_flight)
    }

    /// Hands the flush of everything written so far to the flusher.
    fn start_flush(&mut self) {
        let Some(bg) = self.background.as_mut() else { return };
        debug_assert!(!bg.flush_in_flight, "one flush at a time");
        let upto =
            self.active.as_ref().map_or(Lsn::default(), |a| Lsn { segment: a.id, offset: a.write as u64 });
        let (file, path, end) = match &self.active {
            Some(a) => (Some(a.file.clone()), a.path.clone(), a.written_end()),
            None => (None, self.dir.clone(), self.flushed),
        };
        let dir = std::mem::take(&mut self.dir_sync_pending).then(|| self.dir.clone());
        bg.flusher.submit(Job::Flush { file, path, dir, upto, end });
        bg.flush_in_flight = true;
        // The flusher's own clock would be more exact; this includes the hand-over, which the writer
        // waits for too.
        self.flush_started = Some(Instant::now());
    }

    /// Starts creating the next segment once the active one is half full, so that a roll only renames it.
    fn prepare_ahead(&mut self) {
        let Some(bg) = self.background.as_mut() else { return };
        let half_full = self.active.as_ref().is_some_and(|a| a.write * 2 >= a.map.len());
        if !half_full || bg.prepare_in_flight || bg.prepared.is_some() || self.poisoned.is_some() {
            return;
        }
        bg.flusher.submit(Job::Prepare { dir: self.dir.clone(), id: self.next_id, len: self.segment_bytes });
        bg.prepare_in_flight = true;
    }

    /// Applies the flusher's completed jobs, without waiting.
    fn take_completed(&mut self) -> Result<(), StorageError> {
        while let Some(done) = self.background.as_ref().and_then(|b| b.flusher.try_done()) {
            self.apply(done)?;
        }
        Ok(())
    }

    /// Waits until the flusher has nothing in flight (before the active segment changes).
    fn wait_background(&mut self) -> Result<(), StorageError> {
        let mut result = Ok(());
        while let Some(bg) = self.background.as_ref() {
            if !bg.flush_in_flight && !bg.prepare_in_flight {
                break;
            }
            let Some(done) = bg.flusher.wait_done() else { break };
            if let Err(e) = self.apply(done) {
                result = Err(e);
            }
        }
        result
    }

    fn apply(&mut self, done: Done) -> Result<(), StorageError> {
        let Some(bg) = self.background.as_mut() else { return Ok(()) };
        match done {
            Done::Flushed { upto, end } => {
                bg.flush_in_flight = false;
                if let Some(t) = self.flush_started.take() {
                    self.stats.record_flush(t.elapsed());
                }
                // The active segment did not change meanwhile (a roll waits for the flush).
                debug_assert!(self.active.as_ref().is_none_or(|a| end <= a.written_end()));
                self.flushed = self.flushed.max(end);
                self.durable = self.durable.max(upto);
                Ok(())
            }
            Done::Failed(e) => {
                bg.flush_in_flight = false;
                Err(self.poison(e))
            }
            Done::Prepared(p) => {
                bg.prepare_in_flight = false;
                if p.id == self.next_id {
                    bg.prepared = Some(p);
                } else {
                    p.abandon();
                }
                Ok(())
            }
            Done::PrepareFailed(e) => {
                // Not fatal: the roll creates the segment itself and reports what goes wrong then.
                bg.prepare_in_flight = false;
                tracing::warn!(dir = %self.dir.display(), error = %e, "preparing the next log segment failed");
                Ok(())
            }
        }
    }

    /// Every record below this is durable (see [`Log::commit`]).
    pub fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    /// Every record below this has been appended (and survives a process crash).
    pub fn written_lsn(&self) -> Lsn {
        self.active.as_ref().map_or(Lsn::default(), |a| Lsn { segment: a.id, offset: a.write as u64 })
    }

    /// When the shard should call [`Log::commit`] next even if nothing else happens: `None` when nothing
    /// is waiting for a flush the policy would do; an instant in the past means "now".
    pub fn poll_timeout(&self) -> Option<Instant> {
        // A flush in flight wakes the owner when it completes; the next one starts from that `commit`.
        if !self.has_unflushed() || self.flush_in_flight() {
            return None;
        }
        match self.fsync {
            FsyncPolicy::Always => Some(self.last_flush),
            FsyncPolicy::Interval(d) => Some(self.last_flush + d),
            FsyncPolicy::Never => None,
        }
    }

    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    pub fn fsync_policy(&self) -> FsyncPolicy {
        self.fsync
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All segments, oldest first; the last one is the active one.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let mut v: Vec<SegmentInfo> = self
            .sealed
            .iter()
            .map(|s| SegmentInfo {
                id: s.id,
                path: s.path.clone(),
                file_bytes: s.file_bytes,
                used_bytes: s.end as u64,
                active: false,
            })
            .collect();
        if let Some(a) = &self.active {
            v.push(SegmentInfo {
                id: a.id,
                path: a.path.clone(),
                file_bytes: a.map.len() as u64,
                used_bytes: a.write as u64,
                active: true,
            });
        }
        v
    }

    /// Sealed segments, the ones [`Log::compact_step`] can work on (cheap: for per-iteration checks).
    pub fn sealed_count(&self) -> usize {
        self.sealed.len()
    }

    /// The oldest segment: the next one [`Log::compact_step`] works on, unless it is the active one.
    pub fn oldest_segment(&self) -> Option<SegmentInfo> {
        self.segments().into_iter().next()
    }

    fn has_unflushed(&self) -> bool {
        self.dir_sync_pending || self.active.as_ref().is_some_and(|a| a.written_end() > self.flushed)
    }

    /// Flushes the dirty part of the active segment and, if a segment was created or removed, the directory.
    /// Earlier segments need nothing: each was flushed when it was sealed.
    pub(crate) fn flush_all(&mut self) -> Result<(), StorageError> {
        self.check_poisoned()?;
        self.wait_background()?;
        let started = Instant::now();
        let mut flushed_any = false;
        if let Some(a) = &self.active {
            let end = a.written_end();
            debug_assert!(self.flushed <= end, "flushed never passes what was written");
            if end > self.flushed {
                flushed_any = true;
                if let Err(e) = a.map.flush_range(self.flushed, end - self.flushed) {
                    let err = StorageError::io(&a.path, e);
                    return Err(self.poison(err));
                }
                self.flushed = end;
            }
        }
        if self.dir_sync_pending {
            if let Err(e) = segment::sync_dir(&self.dir) {
                return Err(self.poison(e));
            }
            self.dir_sync_pending = false;
            flushed_any = true;
        }
        if flushed_any {
            self.stats.record_flush(started.elapsed());
        }
        self.durable = self.written_lsn();
        Ok(())
    }

    /// Bytes appended and flush latencies so far.
    pub fn stats(&self) -> LogStats {
        self.stats
    }

    fn poison(&mut self, err: StorageError) -> StorageError {
        tracing::error!(dir = %self.dir.display(), "log: flush failed, refusing further writes: {err}");
        self.poisoned = Some(err.to_string());
        err
    }

    pub(crate) fn check_poisoned(&self) -> Result<(), StorageError> {
        match &self.poisoned {
            Some(reason) => Err(StorageError::Poisoned { reason: reason.clone() }),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.dir)
            .field("fsync", &self.fsync)
            .field("segments", &(self.sealed.len() + usize::from(self.active.is_some())))
            .field("written", &self.written_lsn())
            .field("durable", &self.durable)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// Creating the directory can succeed where writing into it later would not (read-only mount, a
/// directory owned by someone else): find out at open, with the directory's name in the error.
fn probe_writable(dir: &Path) -> Result<(), StorageError> {
    let probe = dir.join(".write-probe");
    let r = OpenOptions::new().write(true).create(true).truncate(true).open(&probe);
    match r {
        Ok(_) => {
            fs::remove_file(&probe).map_err(|e| StorageError::DirNotWritable { path: dir.into(), source: e })
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
            Err(StorageError::DiskFull { path: dir.into(), source: e })
        }
        Err(e) => Err(StorageError::DirNotWritable { path: dir.into(), source: e }),
    }
}

/// A file too short for a header is damage (it cannot come from a crash: segments get their name only
/// once allocated), and must be reported before mapping it, which would fail or read nothing.
fn check_length(file: &File, path: &Path) -> Result<u64, StorageError> {
    let len = file.metadata().map_err(|e| StorageError::io(path, e))?.len();
    if len < SEGMENT_HEADER_LEN as u64 {
        return Err(StorageError::Corrupt {
            file: path.to_path_buf(),
            offset: 0,
            reason: format!("file is {len} bytes, shorter than the segment header"),
        });
    }
    Ok(len)
}

/// Recovers the last segment, which becomes the active one: cuts a torn tail (zeroing it, so that a later
/// shorter record can never be followed by stale frames of the old tail), flushes what was recovered, and
/// restores its full allocation if the file was shortened.
fn open_last(
    id: u64,
    path: PathBuf,
    segment_bytes: u64,
    visit: &mut dyn FnMut(usize, u8, &[u8]),
    report: &mut RecoveryReport,
) -> Result<(Active, RecoveredSegment), StorageError> {
    let io = |e| StorageError::io(&path, e);
    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io)?;
    let len = check_length(&file, &path)?;
    let mut map = segment::map_mut(&file, &path)?;
    check_segment_header(&map, id, &path)?;
    let s = scan(&map, id, visit);
    if let Stop::End { reason: Some(reason), garbage_end } = &s.stop {
        let bytes = (garbage_end - s.end) as u64;
        tracing::warn!(
            file = %path.display(),
            offset = s.end,
            bytes,
            "log: cutting a torn or corrupt tail of the last segment ({reason}); appends continue at the cut"
        );
        map[s.end..*garbage_end].fill(0);
        map.flush_range(s.end, *garbage_end - s.end).map_err(io)?;
        report.cut = Some(Cut { file: path.clone(), offset: s.end as u64, bytes, reason: reason.clone() });
    }
    // Records a crashed process appended but never committed are in the page cache only: flush them so
    // that everything recovered is durable before new records go after it.
    map.flush_range(0, s.end).map_err(io)?;
    let sealed = s.stop == Stop::Sealed;
    if !sealed && (len < segment_bytes || (s.end + SEAL_LEN) as u64 > len) {
        drop(map);
        segment::allocate(&file, segment_bytes.max(len), &path)?;
        map = segment::map_mut(&file, &path)?;
    }
    let ro = segment::map_ro(&file, &path)?;
    let active = Active { id, path, file: Arc::new(file), map, write: s.end, sealed };
    active.check();
    Ok((active, RecoveredSegment { id, map: ro, end: s.end }))
}
