//! Recovery rules, directory handling, group-commit bookkeeping and `inspect`.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{cfg, flip_byte, payload, records, segment_files, Tmpfs};
use proptest::prelude::*;
use shardmq_storage::{
    inspect, Fault, FsyncPolicy, Log, LogConfig, Lsn, RecordType, StorageError, RECORD_OVERHEAD,
};

const T: RecordType = RecordType(1);

/// Appends `n` records of `len` bytes (types cycling 1..=3) and commits; returns their positions.
fn fill(log: &mut Log, n: u64, len: usize) -> Vec<Lsn> {
    let v = (0..n).map(|i| log.append(RecordType(1 + (i % 3) as u8), &payload(i, len)).unwrap()).collect();
    log.commit(Instant::now()).unwrap();
    v
}

/// A log in a fresh directory holding `count` records of `len` bytes, closed (as after a crash: nothing
/// flushed beyond what `fill` committed); the directory, the config and the records' positions.
fn written_log(segment_bytes: u64, count: u64, len: usize) -> (tempfile::TempDir, LogConfig, Vec<Lsn>) {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), segment_bytes, FsyncPolicy::Always);
    let (mut log, _) = Log::open(c.clone()).unwrap();
    let lsns = fill(&mut log, count, len);
    (tmp, c, lsns)
}

#[test]
fn truncated_last_record_is_cut_and_appends_continue_there() {
    let (tmp, c, lsns) = written_log(64 << 10, 10, 100);
    let last = lsns[9];
    let file = &segment_files(tmp.path())[0];
    // Cut the file itself in the middle of the last record.
    fs::OpenOptions::new().write(true).open(file).unwrap().set_len(last.offset + 50).unwrap();

    let (mut log, rec) = Log::open(c.clone()).unwrap();
    let got = records(&rec);
    assert_eq!(got.len(), 9);
    assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), lsns[..9]);
    let cut = rec.report.cut.clone().expect("a cut is reported");
    assert_eq!((cut.file.as_path(), cut.offset, cut.bytes), (file.as_path(), last.offset, 50));
    assert_eq!(fs::metadata(file).unwrap().len(), 64 << 10, "allocation restored");
    drop(rec);

    let again = log.append(T, b"after the cut").unwrap();
    assert_eq!(again, last, "the next append goes where the torn record was");
    log.commit(Instant::now()).unwrap();
    drop(log);
    let (_log, rec) = Log::open(c).unwrap();
    let got = records(&rec);
    assert_eq!(got.len(), 10);
    assert_eq!(got[9], (last, T, b"after the cut".to_vec()));
    assert!(rec.report.cut.is_none());
}

#[test]
fn corrupt_last_record_is_cut_and_its_stale_tail_never_comes_back() {
    let (tmp, c, lsns) = written_log(64 << 10, 6, 200);
    let file = &segment_files(tmp.path())[0];
    // Damage record 3 of 6: records 3, 4 and 5 go, and must stay gone after a shorter record is
    // written where record 3 was (its old neighbours would otherwise parse again behind it).
    flip_byte(file, lsns[3].offset + RECORD_OVERHEAD as u64 + 20);
    let (mut log, rec) = Log::open(c.clone()).unwrap();
    assert_eq!(records(&rec).len(), 3);
    let cut = rec.report.cut.clone().unwrap();
    assert_eq!(cut.offset, lsns[3].offset);
    assert!(cut.reason.contains("CRC"), "{}", cut.reason);
    assert!(cut.bytes > 2 * 209, "the whole stale tail is counted: {}", cut.bytes);
    drop(rec);
    assert_eq!(log.append(T, b"x").unwrap(), lsns[3]);
    log.commit(Instant::now()).unwrap();
    drop(log);
    let (_log, rec) = Log::open(c).unwrap();
    let got = records(&rec);
    assert_eq!(got.len(), 4);
    assert_eq!(got[3].2, b"x");
    assert!(rec.report.cut.is_none());
}

#[test]
fn flipped_bytes_in_the_last_record_of_the_last_segment_truncate() {
    let (tmp, c, lsns) = written_log(4096, 100, 100);
    let files = segment_files(tmp.path());
    assert!(files.len() >= 3, "several segments: {}", files.len());
    let last = *lsns.last().unwrap();
    flip_byte(files.last().unwrap(), last.offset + RECORD_OVERHEAD as u64 + 50);
    let (_log, rec) = Log::open(c).unwrap();
    assert_eq!(records(&rec).len(), 99);
    assert_eq!(rec.report.cut.as_ref().unwrap().offset, last.offset);
    assert_eq!(rec.report.segments, files.len());
}

#[test]
fn flipped_bytes_in_an_earlier_segment_are_corruption_naming_the_file() {
    let (tmp, c, lsns) = written_log(4096, 100, 100);
    let files = segment_files(tmp.path());
    let victim = lsns.iter().filter(|l| l.segment == 1).nth(10).unwrap();
    flip_byte(&files[0], victim.offset + 40);
    let err = Log::open(c).unwrap_err();
    assert_eq!(err.fault(), Fault::Data);
    match &err {
        StorageError::Corrupt { file, offset, reason } => {
            assert_eq!(file, &files[0]);
            assert_eq!(*offset, victim.offset);
            assert!(reason.contains("CRC"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(err.to_string().contains(&files[0].display().to_string()), "{err}");
}

#[test]
fn bad_magic_is_corruption_even_in_the_last_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 4096, FsyncPolicy::Always);
    {
        let (mut log, _) = Log::open(c.clone()).unwrap();
        fill(&mut log, 5, 10);
    }
    let file = &segment_files(tmp.path())[0];
    flip_byte(file, 0);
    match Log::open(c.clone()).unwrap_err() {
        StorageError::Corrupt { file: f, offset: 0, reason } => {
            assert_eq!(&f, file);
            assert!(reason.contains("magic"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    fs::write(file, b"").unwrap();
    match Log::open(c).unwrap_err() {
        StorageError::Corrupt { file: f, reason, .. } => assert!(&f == file && reason.contains("shorter")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_earlier_segment_that_lost_its_tail_or_a_missing_segment_is_corruption() {
    let (tmp, c, lsns) = written_log(4096, 120, 100);
    let files = segment_files(tmp.path());
    assert!(files.len() >= 4);
    // Segment 1 as a power failure could leave it: its last pages, seal included, never written.
    let cut_at = lsns.iter().filter(|l| l.segment == 1).nth(20).unwrap().offset as usize;
    let mut bytes = fs::read(&files[0]).unwrap();
    bytes[cut_at..].fill(0);
    fs::write(&files[0], &bytes).unwrap();
    match Log::open(c.clone()).unwrap_err() {
        StorageError::Corrupt { file, offset, reason } => {
            assert_eq!((file, offset), (files[0].clone(), cut_at as u64));
            assert!(reason.contains("without a seal"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    fs::remove_file(&files[0]).unwrap(); // a missing oldest segment is what compaction leaves: fine
    Log::open(c.clone()).unwrap();
    fs::remove_file(&files[2]).unwrap(); // a missing one in the middle is not
    match Log::open(c).unwrap_err() {
        StorageError::Corrupt { file, reason, .. } => {
            assert_eq!(file, files[3]);
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_crash_between_sealing_and_naming_the_next_segment_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 4096, FsyncPolicy::Always);
    let mut kept = 0;
    {
        let (mut log, _) = Log::open(c.clone()).unwrap();
        while log.append(T, &payload(kept, 100)).unwrap().segment == 1 {
            kept += 1;
        }
        log.commit(Instant::now()).unwrap();
    }
    // As if segment 2 had been allocated but not renamed yet: segment 1 is sealed and last.
    let files = segment_files(tmp.path());
    fs::rename(&files[1], files[1].with_extension("seg.tmp")).unwrap();
    let (mut log, rec) = Log::open(c.clone()).unwrap();
    assert_eq!((rec.report.records, rec.report.removed_temp_files.len()), (kept, 1));
    assert!(rec.report.cut.is_none());
    drop(rec);
    assert_eq!(log.append(T, b"next").unwrap().segment, 2, "a sealed last segment takes no more records");
    log.commit(Instant::now()).unwrap();
    drop(log);
    let (_log, rec) = Log::open(c).unwrap();
    assert_eq!(rec.report.records, kept + 1);
}

#[test]
fn a_segment_from_a_newer_format_is_unsupported() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 4096, FsyncPolicy::Always);
    {
        let (mut log, _) = Log::open(c.clone()).unwrap();
        fill(&mut log, 5, 10);
    }
    let file = &segment_files(tmp.path())[0];
    let mut bytes = fs::read(file).unwrap();
    bytes[8..10].copy_from_slice(&7u16.to_le_bytes()); // the version field
    fs::write(file, bytes).unwrap();
    let err = Log::open(c).unwrap_err();
    assert_eq!(err.fault(), Fault::Data);
    match err {
        StorageError::UnsupportedVersion { file: f, found: 7, supported: 1 } => assert_eq!(&f, file),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_missing_data_dir_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/data");
    let (mut log, rec) = Log::open(cfg(&dir, 4096, FsyncPolicy::Always)).unwrap();
    assert_eq!(rec.report.records, 0);
    assert!(dir.is_dir());
    log.append(T, b"hello").unwrap();
    assert_eq!(segment_files(&dir).len(), 1);
}

#[test]
fn a_data_dir_that_cannot_be_created_is_a_clear_error() {
    // Below a regular file: meaningful even as root, which ignores permission bits.
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("file.txt"), b"not a directory").unwrap();
    let dir = tmp.path().join("file.txt/data");
    let err = Log::open(cfg(&dir, 4096, FsyncPolicy::Always)).unwrap_err();
    assert_eq!(err.fault(), Fault::Environment);
    assert!(matches!(&err, StorageError::DirNotWritable { path, .. } if path == &dir), "{err:?}");
    assert!(err.to_string().contains(&dir.display().to_string()), "{err}");
}

#[test]
fn a_read_only_data_dir_is_a_clear_error() {
    let Some(fs_) = Tmpfs::mount("ro,size=1m") else { return };
    let err = Log::open(cfg(fs_.path(), 4096, FsyncPolicy::Always)).unwrap_err();
    assert!(matches!(&err, StorageError::DirNotWritable { path, .. } if path == fs_.path()), "{err:?}");
    assert!(err.to_string().contains("Read-only"), "{err}");
}

#[test]
fn a_second_open_of_the_same_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 4096, FsyncPolicy::Always);
    let (_log, _) = Log::open(c.clone()).unwrap();
    assert!(matches!(Log::open(c), Err(StorageError::Locked { .. })));
}

#[test]
fn a_record_larger_than_a_segment_is_refused_and_the_largest_fits() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(cfg(tmp.path(), 4096, FsyncPolicy::Always)).unwrap();
    log.append(T, b"small").unwrap();
    let max = log.max_payload();
    let err = log.append(T, &vec![1; max + 1]).unwrap_err();
    assert_eq!(err.fault(), Fault::Caller);
    assert!(matches!(err, StorageError::RecordTooLarge { size, max: m } if size == max + 1 && m == max));
    let big = log.append(T, &vec![2; max]).unwrap();
    assert_eq!(big.segment, 2, "the largest record fills a fresh segment");
    log.append(T, b"after").unwrap();
    log.commit(Instant::now()).unwrap();
    drop(log);
    let (_log, rec) = Log::open(cfg(tmp.path(), 4096, FsyncPolicy::Always)).unwrap();
    let got = records(&rec);
    assert_eq!(got.len(), 3);
    assert_eq!(got[1].2.len(), max);
}

#[test]
fn commit_follows_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    {
        let (mut log, _) = Log::open(cfg(&tmp.path().join("a"), 4096, FsyncPolicy::Always)).unwrap();
        assert_eq!(log.poll_timeout(), None);
        let l = log.append(T, b"one").unwrap();
        assert!(log.durable_lsn() <= l);
        assert!(log.poll_timeout().is_some_and(|t| t <= Instant::now()), "due now");
        let d = log.commit(t0).unwrap();
        assert!(l < d && d == log.written_lsn() && d == log.durable_lsn());
        assert_eq!(log.poll_timeout(), None);
    }
    {
        let p = FsyncPolicy::Interval(Duration::from_millis(50));
        let (mut log, _) = Log::open(cfg(&tmp.path().join("b"), 4096, p)).unwrap();
        let start = Instant::now();
        log.append(T, b"one").unwrap();
        let l = log.append(T, b"two").unwrap();
        let due = log.poll_timeout().expect("a flush is pending");
        assert!(due >= start + Duration::from_millis(40));
        assert!(log.commit(due - Duration::from_millis(45)).unwrap() <= l, "not yet");
        assert!(log.commit(due).unwrap() > l);
        assert_eq!(log.poll_timeout(), None);
    }
    {
        let (mut log, _) = Log::open(cfg(&tmp.path().join("c"), 4096, FsyncPolicy::Never)).unwrap();
        let l = log.append(T, b"one").unwrap();
        assert_eq!(log.poll_timeout(), None);
        assert!(log.commit(Instant::now() + Duration::from_secs(3600)).unwrap() <= l);
        assert!(log.flush().unwrap() > l, "an explicit flush works whatever the policy");
    }
}

fn write_then_inspect() -> (tempfile::TempDir, Vec<Lsn>) {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(cfg(tmp.path(), 4096, FsyncPolicy::Always)).unwrap();
    let lsns = fill(&mut log, 90, 100);
    (tmp, lsns)
}

#[test]
fn inspect_a_clean_log() {
    let (tmp, lsns) = write_then_inspect();
    let r = inspect(tmp.path()).unwrap();
    assert!(r.is_clean() && r.would_open(), "{r}");
    assert_eq!(r.records, 90);
    assert_eq!(r.segments.len() as u64, lsns.last().unwrap().segment);
    assert_eq!(r.by_type.values().copied().collect::<Vec<_>>(), [30, 30, 30]);
    assert_eq!(r.payload_bytes, 9000);
    assert!(r.segments[..r.segments.len() - 1].iter().all(|s| s.sealed));
    assert_eq!(r.segments.iter().map(|s| s.records).sum::<u64>(), 90);
    let text = r.to_string();
    assert!(text.contains("no problems found") && text.contains("type 2: 30"), "{text}");
}

#[test]
fn inspect_a_corrupted_log_reports_without_modifying() {
    let (tmp, lsns) = write_then_inspect();
    let files = segment_files(tmp.path());
    flip_byte(&files[1], lsns.iter().find(|l| l.segment == 2).unwrap().offset + 30);
    flip_byte(files.last().unwrap(), lsns.last().unwrap().offset + 30);
    let before: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    let listing = |d: &std::path::Path| {
        let mut v: Vec<_> = fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    let names = listing(tmp.path());
    let r = inspect(tmp.path()).unwrap();
    assert!(!r.would_open(), "{r}");
    assert_eq!(r.problems.len(), 2, "{r}");
    assert!(r.problems[0].fatal && r.problems[0].file == files[1] && r.problems[0].what.contains("CRC"));
    assert!(!r.problems[1].fatal && r.problems[1].file == *files.last().unwrap());
    assert_eq!(r.segments[1].records, 0);
    let text = r.to_string();
    assert!(text.contains("FATAL") && text.contains("refuse"), "{text}");
    let after: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    assert!(before == after, "inspect changed a segment file");
    assert_eq!(listing(tmp.path()), names, "inspect created or removed files");
    assert!(inspect(&tmp.path().join("missing")).is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Append(u8, usize),
    Commit,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..4, prop_oneof![0usize..64, 64usize..1500]).prop_map(|(t, n)| Op::Append(t, n)),
        2 => Just(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the interleaving of appends, commits and reopens (with frequent segment rolls), a reopened
    /// log hands back exactly the records appended, at the positions `append` returned.
    #[test]
    fn reopen_returns_exactly_what_was_appended(ops in proptest::collection::vec(op(), 1..80)) {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 2048, FsyncPolicy::Never);
        let (mut log, _) = Log::open(c.clone()).unwrap();
        let mut model: Vec<(Lsn, RecordType, Vec<u8>)> = Vec::new();
        let mut n = 0u64;
        for op in ops.into_iter().chain([Op::Reopen]) {
            match op {
                Op::Append(t, len) => {
                    let p = payload(n, len);
                    n += 1;
                    let lsn = log.append(RecordType(t), &p).unwrap();
                    prop_assert!(model.last().is_none_or(|m| m.0 < lsn));
                    prop_assert!(lsn < log.written_lsn());
                    model.push((lsn, RecordType(t), p));
                }
                Op::Commit => {
                    log.commit(Instant::now()).unwrap();
                }
                Op::Reopen => {
                    drop(log);
                    let (l, rec) = Log::open(c.clone()).unwrap();
                    log = l;
                    prop_assert!(rec.report.cut.is_none());
                    prop_assert_eq!(rec.report.records, model.len() as u64);
                    prop_assert_eq!(records(&rec), model.clone());
                }
            }
        }
    }
}
