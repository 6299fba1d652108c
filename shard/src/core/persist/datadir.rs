//! A node's data directory: one log per shard in `DIR/shard-<i>/`, and `DIR/META`, which records the
//! shard count and the placement rule (a client id's owner shard depends on both, so a directory only
//! opens with the count and rule it was written with). Opening replays every shard's log before any shard starts, so that each shard boots
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
use crate::placement::PLACEMENT;
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
    #[error("data directory {dir} placed client ids and retained topics on shards with {found}, and this build places them with {PLACEMENT}: opening it would look for sessions on the wrong shards. Drain it with the build that wrote it (or move the directory aside and start empty)")]
    Placement { dir: PathBuf, found: String },
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
            BootError::Record { .. } | BootError::Meta { .. } | BootError::Placement { .. } => true,
            _ => false,
        }
    }
}

const META: &str = "META";
const META_HEADER: &str = "shardmq data directory";
/// Format 2 added the `placement` line. Format 1 directories placed keys with ahash (fixed seeds), whose
/// output is not specified and can differ between builds.
const META_FORMAT: u32 = 2;
const LEGACY_PLACEMENT: &str = "ahash-0.8-fixed-seeds";

fn shard_dir(dir: &Path, i: u16) -> PathBuf {
    dir.join(format!("shard-{i}"))
}

/// What a data directory's `META` file records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// A client id's (and retained topic's) owner shard depends on it.
    pub shards: u16,
    /// The rule that placed keys on shards ([`crate::placement::PLACEMENT`] for directories this build
    /// wrote).
    pub placement: String,
}

/// What a data directory's `META` records (`None`: a new directory).
pub fn read_meta(dir: &Path) -> Result<Option<Meta>, BootError> {
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
    let (mut format, mut shards, mut placement) = (None, None, None);
    for line in lines {
        match line.split_once(' ') {
            Some(("format", v)) => format = Some(v.parse::<u32>().map_err(|_| bad("invalid format"))?),
            Some(("shards", v)) => shards = Some(v.parse::<u16>().map_err(|_| bad("invalid shard count"))?),
            Some(("placement", v)) => placement = Some(v.to_string()),
            _ => {}
        }
    }
    match format {
        Some(f) if f > META_FORMAT => {
            return Err(bad(&format!("format {f} is newer than this build ({META_FORMAT})")))
        }
        Some(1) => placement = Some(LEGACY_PLACEMENT.to_string()),
        Some(_) if placement.is_none() => return Err(bad("no placement")),
        Some(_) => {}
        None => return Err(bad("no format")),
    }
    match (shards, placement) {
        (Some(n), Some(placement)) if n > 0 => Ok(Some(Meta { shards: n, placement })),
        _ => Err(bad("no shard count")),
    }
}

fn write_meta(dir: &Path, shards: u16) -> Result<(), BootError> {
    let err = |source| BootError::Dir { dir: dir.to_path_buf(), source };
    let tmp = dir.join("META.tmp");
    let mut f = fs::File::create(&tmp).map_err(err)?;
    write!(f, "{META_HEADER}\nformat {META_FORMAT}\nshards {shards}\nplacement {PLACEMENT}\n")
        .map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, dir.join(META)).map_err(err)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// Checks that `dir` was written with `shards` shards and this build's placement, recording both in a
/// new directory. A directory with one shard places every key on it whatever the rule, so its record is
/// brought up to date.
fn check_meta(dir: &Path, shards: u16) -> Result<(), BootError> {
    match read_meta(dir)? {
        None => write_meta(dir, shards),
        Some(m) if m.shards != shards => {
            Err(BootError::ShardCount { dir: dir.to_path_buf(), found: m.shards, want: shards })
        }
        Some(m) if m.placement == PLACEMENT => Ok(()),
        Some(_) if shards == 1 => write_meta(dir, shards),
        Some(m) => Err(BootError::Placement { dir: dir.to_path_buf(), found: m.placement }),
    }
}

/// Opens (creating it if needed) the data directory of a node with `shards` shards, recovers every
/// shard's log and returns what each shard boots with, in shard order.
pub fn open_node(cfg: &StorageConfig, shards: u16, clock: WallClock) -> Result<Vec<Boot>, BootError> {
    let dir = &cfg.dir;
    fs::create_dir_all(dir).map_err(|source| BootError::Dir { dir: dir.clone(), source })?;
    check_meta(dir, shards)?;
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
        Some(m) => m.shards,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_text(dir: &Path) -> String {
        fs::read_to_string(dir.join(META)).unwrap()
    }

    #[test]
    fn a_new_directory_records_shards_and_placement() {
        let d = tempfile::tempdir().unwrap();
        check_meta(d.path(), 3).unwrap();
        let m = read_meta(d.path()).unwrap().unwrap();
        assert_eq!(m, Meta { shards: 3, placement: PLACEMENT.to_string() });
        assert!(meta_text(d.path()).contains(&format!("\nplacement {PLACEMENT}\n")));
        check_meta(d.path(), 3).unwrap();
    }

    #[test]
    fn another_placement_is_refused_naming_both_rules() {
        let d = tempfile::tempdir().unwrap();
        for (text, found) in [
            (format!("{META_HEADER}\nformat 1\nshards 2\n"), LEGACY_PLACEMENT),
            (format!("{META_HEADER}\nformat 2\nshards 2\nplacement fnv\n"), "fnv"),
        ] {
            fs::write(d.path().join(META), &text).unwrap();
            let e = check_meta(d.path(), 2).unwrap_err();
            assert!(matches!(&e, BootError::Placement { found: f, .. } if f == found), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(found) && msg.contains(PLACEMENT), "{msg}");
            assert_eq!(meta_text(d.path()), text, "a refused directory is left as it was");
        }
    }

    #[test]
    fn a_one_shard_directory_of_another_placement_is_brought_up_to_date() {
        // One shard owns every key whatever the rule: nothing is misplaced.
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(META), format!("{META_HEADER}\nformat 1\nshards 1\n")).unwrap();
        check_meta(d.path(), 1).unwrap();
        assert_eq!(read_meta(d.path()).unwrap().unwrap().placement, PLACEMENT);
    }

    #[test]
    fn damaged_or_newer_meta_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for text in [
            "not meta\n".to_string(),
            format!("{META_HEADER}\nformat 3\nshards 2\nplacement {PLACEMENT}\n"),
            format!("{META_HEADER}\nformat 2\nshards 2\n"),
            format!("{META_HEADER}\nformat 2\nplacement {PLACEMENT}\n"),
            format!("{META_HEADER}\nshards 2\nplacement {PLACEMENT}\n"),
            format!("{META_HEADER}\nformat x\nshards 2\nplacement {PLACEMENT}\n"),
        ] {
            fs::write(d.path().join(META), &text).unwrap();
            assert!(matches!(read_meta(d.path()), Err(BootError::Meta { .. })), "{text:?}");
        }
    }
}
