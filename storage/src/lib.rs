//! `shardmq-storage`: the durable, append-only log of one shard.
//!
//! What it does: stores opaque records (a one-byte [`RecordType`] and a byte payload) in fixed-size,
//! preallocated, memory-mapped segment files, hands every valid record back on [`Log::open`], commits
//! groups of records with one flush ([`Log::commit`]), reclaims space by rewriting the live records of the
//! oldest segment ([`Log::compact_step`]) and reports on a data directory without touching it
//! ([`inspect`]).
//!
//! What it does not do: MQTT. Sessions, offline queues, in-flight QoS state and retained messages are the
//! shard's business; it decides what a payload means and which records are still live. A [`Log`] is
//! synchronous and single-threaded: the shard thread that owns it calls it from its event loop; nothing
//! here spawns threads or takes locks besides one `flock` on the directory that keeps a second process out.
//!
//! # Durability
//!
//! [`Log::append`] copies a record into the mapping of the current segment: from then on it survives a
//! crash of the process (the page cache belongs to the kernel), whatever the policy. Surviving a power
//! failure or kernel crash needs a flush (msync) of those pages, which [`Log::commit`] does according to
//! the [`FsyncPolicy`]:
//!
//! - [`FsyncPolicy::Always`]: `commit` flushes everything appended so far before it returns; every record
//!   whose [`Lsn`] is below the returned durable bound survives power loss. Acknowledge clients only up to
//!   that bound; batch many appends per commit (group commit) to amortise the flush.
//! - [`FsyncPolicy::Interval`]: `commit` flushes only when the interval has passed since the last flush
//!   ([`Log::poll_timeout`] says when). A shard that acknowledges at [`Log::written_lsn`] loses at most the
//!   last interval of acknowledged records on power failure (provided it calls `commit` when
//!   `poll_timeout` fires), and none on a process crash.
//! - [`FsyncPolicy::Never`]: the OS writes pages back when it likes (on Linux typically within 30 s). A
//!   process crash loses nothing written to the mapping; power loss may lose anything since the last OS
//!   writeback.
//!
//! Whatever the policy, three flushes are not optional, because skipping them would turn a power failure
//! into an unreadable log rather than a shorter one: sealing a full segment flushes its tail before the
//! next segment gets its name; compaction flushes the relocated records before it deletes their old
//! segment; recovery flushes the truncated tail before anything new is written over it.
//!
//! # Format, and why not rkyv
//!
//! Each segment starts with a 32-byte header (magic, format version, segment id, CRC) and holds records
//! framed as `length u32 | CRC32C u32 | type u8 | payload`, 9 bytes of overhead, no padding; a full
//! segment ends with a seal frame (see `format.rs` for the exact layout). The log only frames opaque bytes:
//! what it needs is a length to find the next record and a checksum to tell a torn or rotted write from a
//! good one. rkyv (0.8 was suggested) solves a different problem, zero-copy access to structured data; as
//! the framing it would add a schema and alignment padding to every record, tie the on-disk format to a
//! library's version, and still need a CRC of our own for torn-write detection (its validation checks
//! structure, not content). What goes inside a payload is the caller's choice: the shard can encode
//! payloads with rkyv if zero-copy reads of its records pay off (payloads here are not aligned, so it would
//! have to copy into an aligned buffer or use rkyv's unaligned feature).
//!
//! CRC32C (Castagnoli, via the `crc32c` crate) rather than CRC32 (IEEE, `crc32fast`): both run at several
//! GB/s with hardware support, but CRC32C has the better error-detection distance for record-sized inputs
//! and is what ext4, iSCSI, Kafka and RocksDB use for the same job. The CRC covers the length as well as
//! the type and payload, so a damaged length cannot make a shorter or longer frame validate.

mod compact;
mod error;
mod flusher;
mod format;
mod inspect;
mod log;
mod recovery;
mod segment;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use compact::{CompactProgress, Keep, Relocation};
pub use error::{Fault, StorageError};
pub use flusher::WakeFn;
pub use format::{FORMAT_VERSION, RECORD_OVERHEAD};
pub use inspect::{inspect, inspect_records, InspectProblem, InspectReport, SegmentReport};
pub use log::{Log, LogStats, SegmentInfo, FLUSH_BUCKETS_US};
pub use recovery::{Cut, Records, Recovery, RecoveryReport};

/// When [`Log::commit`] flushes; see the crate documentation for what each one guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every `commit` flushes all appended records before returning: a record is durable (survives power
    /// loss) once `commit` returns a durable bound above its [`Lsn`].
    Always,
    /// `commit` flushes only once this long has passed since the previous flush. If the shard calls
    /// `commit` when [`Log::poll_timeout`] says, at most this much of the records acknowledged at
    /// [`Log::written_lsn`] can be lost on power failure, and none on a process crash (the page cache
    /// survives a process kill).
    Interval(Duration),
    /// `commit` never flushes; the OS writes back when it decides. A process crash loses nothing written
    /// to the mapping; power loss may lose anything since the last OS writeback.
    Never,
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// `always`, `never` or `interval:<milliseconds>` (at least 1).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => {
                let ms = s.strip_prefix("interval:").ok_or_else(|| {
                    format!("unknown fsync policy {s:?}: use always, interval:<ms> or never")
                })?;
                match ms.parse::<u64>() {
                    Ok(ms) if ms > 0 => Ok(FsyncPolicy::Interval(Duration::from_millis(ms))),
                    _ => Err(format!("invalid interval {ms:?} in {s:?}: milliseconds, at least 1")),
                }
            }
        }
    }
}

/// Where and how a [`Log`] keeps its segments.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub dir: PathBuf,
    /// Size of each segment file, allocated up front. The largest record is a little smaller than this.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
}

impl LogConfig {
    pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
    /// Small enough for tests that want many segments; a header, one small record and the seal fit.
    pub const MIN_SEGMENT_BYTES: u64 = 1024;

    pub fn new(dir: impl Into<PathBuf>) -> LogConfig {
        LogConfig { dir: dir.into(), segment_bytes: Self::DEFAULT_SEGMENT_BYTES, fsync: FsyncPolicy::Always }
    }
}

/// Position of a record: the segment it is in and its byte offset there. Ordered by segment, then offset,
/// which is the order records were appended in (relocated records included: they are appended anew).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn {
    pub segment: u64,
    pub offset: u64,
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// The caller's tag for a record; the log counts records by type and otherwise ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordType(pub u8);

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_prints() {
        for s in ["always", "never", "interval:5", "interval:1000"] {
            let p: FsyncPolicy = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert_eq!("interval:25".parse(), Ok(FsyncPolicy::Interval(Duration::from_millis(25))));
        for bad in ["", "Always", "interval:", "interval:0", "interval:x", "sometimes"] {
            assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn lsn_orders_by_segment_then_offset() {
        let a = Lsn { segment: 1, offset: 900 };
        let b = Lsn { segment: 2, offset: 32 };
        assert!(a < b);
        assert_eq!(b.to_string(), "2:32");
    }
}
