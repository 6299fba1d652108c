//! A node's data directory: one log per shard in `DIR/shard-<i>/`, and `DIR/META`, which records the
//! shard count (a client id's owner shard depends on it, so a directory only opens with the count it was
//! written with). Opening replays every shard's log before any shard starts, so that each shard boots
//! knowing the other shards' subscriptions and every retained message: a publish accepted right after
//! start-up cannot miss a persistent subscriber on another shard.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shardmq_storage::{FsyncPolicy, Log, LogConfig, Lsn, RecordType, StorageError};

use super::records::{type_name, WallClock};
use super::replay::{Recovered, Replay};
use super::{Boot, Store};
use crate::core::route::{split_shared, InterestDelta};
use crate::ShardId;

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("data directory {dir} was written by a node with {found} shards, and this one has {want}: start with --cores {found} (a data directory keeps its shard count)")]
    ShardCount { dir: PathBuf, found: u16, want: u16 },
    #[error("{file}: {reason}")]
    Meta { file: PathBuf, reason: String },
    #[error("data directory {dir} cannot be created or written: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("shard {shard}: {source}")]
    Storage { shard: u16, source: StorageError },
    #[error("shard {shard}: record at {lsn} (type {rtype}, {name}) does not decode: {reason}; the log was written by an incompatible build or is damaged (run `shardmq inspect`)")]
    Record { shard: u16, lsn: Lsn, rtype: RecordType, name: &'static str, reason: String },
}

impl BootError {
    /// Whether the data on disk is at fault (rather than the environment or configuration).
    pub fn is_data(&self) -> bool {
        match self {
            BootError::Storage { source, .. } => source.fault() == shardmq_storage::Fault::Data,
            BootError::Record { .. } | BootError::Meta { .. } => true,
            _ => false,
        }
    }
}

const META: &str = "META";
const META_HEADER: &str = "shardmq data directory";

fn shard_dir(dir: &Path, i: u16) -> PathBuf {
    dir.join(format!("shard-{i}"))
}

/// The shard count a data directory was written with (`None`: a new directory).
pub fn read_meta(dir: &Path) -> Result<Option<u16>, BootError> {
    let file = dir.join(META);
    let text = match fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(BootError::Meta { file, reason: e.to_string() }),
    };
    let bad = |reason: &str| BootError::Meta { file: file.clone(), reason: reason.to_string() };
    let mut lines = text.lines();
    if lines.next() != Some(META_HEADER) {
        return Err(bad("not a shardmq META file"));
    }
    let mut shards = None;
    for line in lines {
        match line.split_once(' ') {
            Some(("format", v)) if v != "1" => {
                return Err(bad(&format!("format {v} is newer than this build (1)")))
            }
            Some(("shards", v)) => shards = Some(v.parse::<u16>().map_err(|_| bad("invalid shard count"))?),
            _ => {}
        }
    }
    match shards {
        Some(n) if n > 0 => Ok(Some(n)),
        _ => Err(bad("no shard count")),
    }
}

fn write_meta(dir: &Path, shards: u16) -> Result<(), BootError> {
    let err = |source| BootError::Dir { dir: dir.to_path_buf(), source };
    let tmp = dir.join("META.tmp");
    let mut f = fs::File::create(&tmp).map_err(err)?;
    write!(f, "{META_HEADER}\nformat 1\nshards {shards}\n").map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, dir.join(META)).map_err(err)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// Opens (creating it if needed) the data directory of a node with `shards` shards, recovers every
/// shard's log and returns what each shard boots with, in shard order.
pub fn open_node(cfg: &StorageConfig, shards: u16, clock: WallClock) -> Result<Vec<Boot>, BootError> {
    let dir = &cfg.dir;
    fs::create_dir_all(dir).map_err(|source| BootError::Dir { dir: dir.clone(), source })?;
    match read_meta(dir)? {
        Some(found) if found != shards => {
            return Err(BootError::ShardCount { dir: dir.clone(), found, want: shards });
        }
        Some(_) => {}
        None => write_meta(dir, shards)?,
    }
    let mut opened = Vec::with_capacity(shards as usize);
    for i in 0..shards {
        let lc = LogConfig { dir: shard_dir(dir, i), segment_bytes: cfg.segment_bytes, fsync: cfg.fsync };
        let (log, recovery) = Log::open(lc).map_err(|source| BootError::Storage { shard: i, source })?;
        let rep = &recovery.report;
        tracing::info!(
            shard = i,
            segments = rep.segments,
            records = rep.records,
            log_bytes = rep.log_bytes,
            "log recovered"
        );
        let mut recovered = Store::replay(&recovery, clock).map_err(|(lsn, rtype, reason)| {
            BootError::Record { shard: i, lsn, rtype, name: type_name(rtype), reason }
        })?;
        drop(recovery);
        if !recovered.sessions.is_empty() || !recovered.retained.is_empty() {
            tracing::info!(
                shard = i,
                sessions = recovered.sessions.len(),
                queued_messages = recovered.queued_messages(),
                retained = recovered.retained.len(),
                "state restored"
            );
        }
        let retained = std::mem::take(&mut recovered.retained);
        opened.push((log, recovered, retained));
    }
    let counts: Vec<Vec<InterestDelta>> = opened.iter().map(|(_, r, _)| interest_of(r)).collect();
    let retained: Arc<Vec<_>> = Arc::new(opened.iter().flat_map(|(_, _, r)| r.iter().cloned()).collect());
    Ok(opened
        .into_iter()
        .enumerate()
        .map(|(i, (log, recovered, _))| {
            let interest = counts
                .iter()
                .enumerate()
                .filter(|(j, d)| *j != i && !d.is_empty())
                .map(|(j, d)| (ShardId(j as u16), d.clone()))
                .collect();
            let store = Store::new(log, clock, &recovered);
            Boot { store, recovered, interest, retained: retained.clone() }
        })
        .collect())
}

/// A shard's subscriber counts per (group, filter), as its interest announcements would carry them.
fn interest_of(r: &Recovered) -> Vec<InterestDelta> {
    let mut counts: BTreeMap<(Option<Arc<str>>, Arc<str>), u32> = BTreeMap::new();
    for s in &r.sessions {
        for (filter, _, _) in &s.session.subs {
            let (group, inner) = split_shared(filter);
            let group = group.map(Arc::from);
            *counts.entry((group, inner.into())).or_default() += 1;
        }
    }
    // Every recovered session is persistent.
    counts.into_iter().map(|(key, members)| InterestDelta { key, members, durable: members }).collect()
}

/// What `shardmq inspect` reports about one shard's log.
#[derive(Debug)]
pub struct ShardReport {
    pub shard: u16,
    pub log: shardmq_storage::InspectReport,
    /// Records by type name.
    pub by_name: BTreeMap<&'static str, u64>,
    pub sessions: usize,
    pub retained: usize,
    pub queued_messages: usize,
    /// Records that passed their checksum but do not decode.
    pub undecodable: Vec<String>,
}

impl ShardReport {
    pub fn is_clean(&self) -> bool {
        self.log.is_clean() && self.undecodable.is_empty()
    }
}

/// Reads a data directory without changing anything (no lock, no recovery cut).
pub fn inspect_node(dir: &Path, clock: WallClock) -> Result<Vec<ShardReport>, BootError> {
    let shards = match read_meta(dir)? {
        Some(n) => n,
        None if dir.is_dir() => {
            return Err(BootError::Meta {
                file: dir.join(META),
                reason: "missing: not a shardmq data directory".into(),
            })
        }
        None => {
            let source = std::io::Error::from(std::io::ErrorKind::NotFound);
            return Err(BootError::Dir { dir: dir.to_path_buf(), source });
        }
    };
    let mut out = Vec::new();
    for i in 0..shards {
        let mut replay = Replay::new(clock);
        let mut undecodable = Vec::new();
        let sdir = shard_dir(dir, i);
        let log = if sdir.is_dir() {
            shardmq_storage::inspect_records(&sdir, &mut |t, p| {
                if let Err(e) = replay.apply(t, p) {
                    if undecodable.len() < 20 {
                        undecodable.push(format!("type {t} ({}): {e}", type_name(t)));
                    }
                }
            })
            .map_err(|source| BootError::Storage { shard: i, source })?
        } else {
            shardmq_storage::InspectReport { dir: sdir, ..Default::default() }
        };
        let by_name = log.by_type.iter().map(|(t, n)| (type_name(*t), *n)).collect();
        let r = replay.finish();
        out.push(ShardReport {
            shard: i,
            by_name,
            sessions: r.sessions.len(),
            retained: r.retained.len(),
            queued_messages: r.queued_messages(),
            undecodable,
            log,
        });
    }
    Ok(out)
}
