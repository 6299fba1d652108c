//! Compaction keeps what the caller says is live, deletes the rest, and bounds disk use.

mod common;

use std::collections::HashMap;
use std::time::Instant;

use common::{cfg, index_of, payload, records, segment_files};
use shardmq_storage::{FsyncPolicy, Log, Lsn, RecordType};

const T: RecordType = RecordType(2);

#[test]
fn compaction_keeps_live_records_and_deletes_the_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 4096, FsyncPolicy::Always);
    let (mut log, _) = Log::open(c.clone()).unwrap();
    // Record i lives at where[i]; odd records are dead.
    let mut where_: HashMap<u64, Lsn> =
        (0..200).map(|i| (i, log.append(T, &payload(i, 100)).unwrap())).collect();
    log.commit(Instant::now()).unwrap();
    let before = log.segments();
    assert!(before.len() > 4);
    let sealed: Vec<u64> = before.iter().filter(|s| !s.active).map(|s| s.id).collect();
    let last_sealed = *sealed.last().unwrap();
    let to_offer = where_.values().filter(|l| l.segment <= last_sealed).count();

    let mut steps = 0;
    let mut offered = 0;
    while log.oldest_segment().is_some_and(|s| s.id <= last_sealed) {
        let p = log
            .compact_step(1000, &mut |lsn, t, p| {
                offered += 1;
                assert_eq!(t, T);
                let i = index_of(p);
                assert_eq!(where_[&i], lsn, "offered at the position the caller knows");
                i.is_multiple_of(2)
            })
            .unwrap();
        assert!(p.scanned_bytes <= 1000 + 109, "the budget bounds each step: {}", p.scanned_bytes);
        for r in &p.relocated {
            let i = where_.iter().find(|(_, l)| **l == r.from).map(|(i, _)| *i).unwrap();
            assert!(r.to > r.from);
            where_.insert(i, r.to);
        }
        if p.deleted {
            assert!(!p.segment.is_some_and(|id| segment_files(tmp.path())
                .iter()
                .any(|f| { f.file_name().unwrap().to_string_lossy().starts_with(&format!("{id:020}")) })));
        }
        steps += 1;
        assert!(steps < 1000);
    }
    assert!(steps > sealed.len(), "several bounded steps per segment");
    let live_left = where_.iter().filter(|(i, l)| *i % 2 == 0 && l.segment <= last_sealed).count();
    assert_eq!(live_left, 0, "every live record of the compacted segments moved");
    let files = segment_files(tmp.path());
    assert_eq!(files.len() as u64, log.written_lsn().segment - last_sealed, "compacted files are deleted");
    assert_eq!(offered, to_offer, "each record of a compacted segment is offered once");
    log.commit(Instant::now()).unwrap();
    drop(log);

    let (_log, rec) = Log::open(c).unwrap();
    let got: HashMap<Lsn, Vec<u8>> = records(&rec).into_iter().map(|(l, _, p)| (l, p)).collect();
    for i in (0..200).step_by(2) {
        assert_eq!(got[&where_[&i]], payload(i, 100), "live record {i} at its relocated position");
    }
    let dead_left = got.values().filter(|p| index_of(p) % 2 == 1).count();
    assert!(dead_left < 40, "dead records only survive in segments not compacted: {dead_left}");
    assert!(rec.report.segments < before.len() + 2);
}

#[test]
fn steady_load_with_compaction_keeps_disk_use_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 16 << 10, FsyncPolicy::Never);
    let (mut log, _) = Log::open(c.clone()).unwrap();
    const KEYS: u64 = 20;
    // key -> (position of its latest record, version); every overwrite kills the previous record.
    let mut latest: HashMap<u64, Lsn> = HashMap::new();
    let mut owner: HashMap<Lsn, u64> = HashMap::new();
    let mut max_files = 0;
    for n in 0..20_000u64 {
        let key = n % KEYS;
        let lsn = log.append(T, &payload(n, 200)).unwrap();
        if let Some(old) = latest.insert(key, lsn) {
            owner.remove(&old);
        }
        owner.insert(lsn, key);
        log.commit(Instant::now()).unwrap();
        while log.segments().len() > 3 {
            let p = log.compact_step(4096, &mut |lsn, _, _| owner.contains_key(&lsn)).unwrap();
            for r in p.relocated {
                let key = owner.remove(&r.from).unwrap();
                owner.insert(r.to, key);
                latest.insert(key, r.to);
            }
        }
        if n % 250 == 0 {
            max_files = max_files.max(segment_files(tmp.path()).len());
        }
    }
    assert!(max_files <= 5, "segment files grew to {max_files}");
    let written_segments = log.written_lsn().segment;
    assert!(written_segments > 200, "the load went through many segments: {written_segments}");
    drop(log);

    let (_log, rec) = Log::open(c).unwrap();
    let got: HashMap<Lsn, Vec<u8>> = records(&rec).into_iter().map(|(l, _, p)| (l, p)).collect();
    assert!(rec.report.segments <= 4);
    for (key, lsn) in &latest {
        let p = &got[lsn];
        assert_eq!(index_of(p) % KEYS, *key);
        assert!(index_of(p) >= 20_000 - KEYS, "the latest version of key {key}");
    }
}

#[test]
fn compaction_can_rewrite_a_record_smaller() {
    use shardmq_storage::Keep;
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 4096, FsyncPolicy::Always);
    let (mut log, _) = Log::open(c.clone()).unwrap();
    for i in 0..200u8 {
        log.append(T, &[i; 30]).unwrap();
    }
    log.commit(Instant::now()).unwrap();
    assert!(log.sealed_count() > 0);
    let first = log.oldest_segment().unwrap().id;
    // Records of the first segment come back trimmed to their first 3 bytes.
    for _ in 0..100 {
        if log.oldest_segment().is_none_or(|s| s.id != first) {
            break;
        }
        log.compact_with(1 << 20, &mut |_, _, p| Keep::Rewritten(p[..3].to_vec())).unwrap();
    }
    drop(log);
    let (_, rec) = Log::open(c).unwrap();
    let all: Vec<Vec<u8>> = rec.records().map(|(_, _, p)| p.to_vec()).collect();
    let trimmed = all.iter().filter(|p| p.len() == 3).count();
    assert!(trimmed > 0, "the first segment's records were rewritten");
    assert_eq!(all.len(), 200, "none lost");
    let mut firsts: Vec<u8> = all.iter().map(|p| p[0]).collect();
    firsts.sort();
    assert_eq!(firsts, (0..200).collect::<Vec<u8>>());
}
