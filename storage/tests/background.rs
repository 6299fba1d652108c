//! The background flusher: `commit` does not wait for the disk, the owner is woken when a flush lands, the
//! next segment is prepared ahead, and nothing is left behind.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{cfg, index_of, payload, records, segment_files};
use shardmq_storage::{FsyncPolicy, Log, RecordType};

const T: RecordType = RecordType(1);

fn with_flusher(log: &mut Log) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    log.start_background_flush(Box::new(move || {
        let _ = tx.send(());
    }))
    .unwrap();
    rx
}

/// Commits until the durable bound passes `lsn`, waiting for the flusher's wake-ups in between.
fn commit_until_durable(log: &mut Log, woken: &mpsc::Receiver<()>, lsn: shardmq_storage::Lsn) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.commit(Instant::now()).unwrap() <= lsn {
        assert!(Instant::now() < deadline, "the flush never completed");
        woken.recv_timeout(Duration::from_secs(10)).expect("the flusher wakes its owner after a flush");
    }
}

fn temp_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".seg.tmp"))
        .collect();
    v.sort();
    v
}

#[test]
fn commit_hands_the_flush_over_and_the_wake_up_brings_the_durable_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(cfg(tmp.path(), 1 << 20, FsyncPolicy::Always)).unwrap();
    let woken = with_flusher(&mut log);
    let lsn = log.append(T, &payload(0, 100)).unwrap();
    let first = log.commit(Instant::now()).unwrap();
    // The flush is the flusher's now: the owner sleeps until it is woken, with no deadline of its own.
    if first <= lsn {
        assert_eq!(log.poll_timeout(), None, "a flush in flight needs no timer");
    }
    commit_until_durable(&mut log, &woken, lsn);
    assert_eq!(log.poll_timeout(), None, "nothing left to flush");
    // Appends after the flush started are flushed by the next one.
    let later = log.append(T, &payload(1, 100)).unwrap();
    commit_until_durable(&mut log, &woken, later);
}

#[test]
fn the_next_segment_is_prepared_ahead_and_the_roll_uses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = 64 << 10;
    let (mut log, _) = Log::open(cfg(tmp.path(), seg, FsyncPolicy::Always)).unwrap();
    let woken = with_flusher(&mut log);
    let mut n = 0u64;
    // Past half of the first segment: the flusher creates the second one under its temporary name.
    let mut lsn = log.written_lsn();
    while log.written_lsn().offset < seg / 2 + 1000 {
        lsn = log.append(T, &payload(n, 1000)).unwrap();
        n += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while temp_files(tmp.path()).is_empty() {
        assert!(Instant::now() < deadline, "no segment prepared ahead");
        log.commit(Instant::now()).unwrap();
        let _ = woken.recv_timeout(Duration::from_millis(100));
    }
    assert_eq!(temp_files(tmp.path()), [format!("{:020}.seg.tmp", lsn.segment + 1)]);
    commit_until_durable(&mut log, &woken, lsn);
    // The roll renames it into place.
    while log.written_lsn().segment == lsn.segment {
        log.append(T, &payload(n, 1000)).unwrap();
        n += 1;
    }
    let last = log.append(T, &payload(n, 1000)).unwrap();
    n += 1;
    commit_until_durable(&mut log, &woken, last);
    assert!(temp_files(tmp.path()).iter().all(|t| !t.starts_with(&format!("{:020}", lsn.segment + 1))));
    assert_eq!(segment_files(tmp.path()).len(), 2);
    drop(log);
    assert_eq!(temp_files(tmp.path()), Vec::<String>::new(), "a log closed leaves no temporary segment");
    let (_, rec) = Log::open(cfg(tmp.path(), seg, FsyncPolicy::Always)).unwrap();
    let got = records(&rec);
    assert_eq!(got.len() as u64, n);
    assert!(got.iter().enumerate().all(|(i, (_, _, p))| index_of(p) == i as u64));
}

#[test]
fn interval_policy_flushes_in_the_background_when_the_interval_is_due() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) =
        Log::open(cfg(tmp.path(), 1 << 20, FsyncPolicy::Interval(Duration::from_millis(20)))).unwrap();
    let woken = with_flusher(&mut log);
    let lsn = log.append(T, &payload(0, 10)).unwrap();
    let at = log.poll_timeout().expect("a flush is due within the interval");
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
    commit_until_durable(&mut log, &woken, lsn);
}

#[test]
fn stats_count_appended_bytes_and_time_every_flush_inline_or_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(cfg(dir.path(), 1 << 20, FsyncPolicy::Always)).unwrap();
    log.append(T, b"12345").unwrap();
    assert_eq!(log.stats().bytes_appended, (shardmq_storage::RECORD_OVERHEAD + 5) as u64);
    log.flush().unwrap();
    assert_eq!(log.stats().flushes, 1, "an inline flush is timed");
    log.flush().unwrap();
    assert_eq!(log.stats().flushes, 1, "nothing to flush: not a flush");
    let woken = with_flusher(&mut log);
    let lsn = log.append(T, b"6").unwrap();
    commit_until_durable(&mut log, &woken, lsn);
    let s = log.stats();
    assert_eq!(s.flushes, 2, "the background flush is timed too");
    assert_eq!(s.flush_buckets.iter().sum::<u64>(), 2);
    assert!(s.flush_us_sum > 0 || s.flush_buckets[0] == 2);
}
