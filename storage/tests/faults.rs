//! Running out of disk, and being killed at a random point.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

use common::{cfg, index_of, payload, records, Tmpfs};
use shardmq_storage::{inspect, Fault, FsyncPolicy, Log, Lsn, RecordType, StorageError};

const T: RecordType = RecordType(4);

#[test]
fn disk_full_at_segment_creation_leaves_the_log_usable() {
    let Some(fs_) = Tmpfs::mount("size=1m") else { return };
    let dir = fs_.path().join("log");
    let c = cfg(&dir, 128 << 10, FsyncPolicy::Always);
    let (mut log, _) = Log::open(c.clone()).unwrap();
    // Leave room for a few segments only.
    let filler = fs_.path().join("filler");
    fs::write(&filler, vec![7u8; 600 << 10]).unwrap();

    let mut written: Vec<(Lsn, Vec<u8>)> = Vec::new();
    let err = loop {
        let p = payload(written.len() as u64, 1000);
        match log.append(T, &p) {
            Ok(lsn) => written.push((lsn, p)),
            Err(e) => break e,
        }
        assert!(written.len() < 10_000, "the filesystem never filled up");
    };
    assert_eq!(err.fault(), Fault::Resource, "{err}");
    assert!(matches!(&err, StorageError::DiskFull { path, .. } if path.starts_with(&dir)), "{err:?}");
    assert!(written.len() > 100, "some segments fitted: {}", written.len());
    let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!leftovers.iter().any(|n| n.to_string_lossy().ends_with(".tmp")), "{leftovers:?}");

    // Everything written so far is on disk and readable (inspect reads the files without the Log).
    let report = inspect(&dir).unwrap();
    assert_eq!((report.records, report.problems.len()), (written.len() as u64, 0), "{report}");
    // Still full: still an error, and nothing written so far is affected.
    assert!(matches!(log.append(T, &payload(0, 1000)), Err(StorageError::DiskFull { .. })));
    let durable = log.commit(Instant::now()).unwrap();
    assert!(written.last().unwrap().0 < durable);

    fs::remove_file(&filler).unwrap();
    let p = payload(written.len() as u64, 1000);
    let lsn = log.append(T, &p).expect("an append succeeds once space is freed");
    written.push((lsn, p));
    assert!(lsn < log.commit(Instant::now()).unwrap());
    drop(log);

    let (_log, rec) = Log::open(c).unwrap();
    let got: Vec<(Lsn, Vec<u8>)> = records(&rec).into_iter().map(|(l, _, p)| (l, p)).collect();
    assert!(got == written, "recovered {} records, wrote {}", got.len(), written.len());
}

const CHILD_ENV: &str = "SHARDMQ_STORAGE_CRASH_CHILD_DIR";

/// Not a test on its own: the body of the child process that `kill_9_never_loses_a_committed_record`
/// starts (and kills) with `--ignored --exact`. Ignored so that a normal run lists it as such instead of
/// counting a pass for nothing; run by hand without its parent, it fails.
#[test]
#[ignore = "the child process of kill_9_never_loses_a_committed_record, which runs it"]
fn crash_child_entry() {
    let dir = std::env::var(CHILD_ENV)
        .unwrap_or_else(|_| panic!("{CHILD_ENV} unset: run kill_9_never_loses_a_committed_record instead"));
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let (mut log, rec) = Log::open(cfg(dir.as_ref(), 64 << 10, FsyncPolicy::Always)).unwrap();
    let background = std::env::var("BACKGROUND").is_ok_and(|v| v == "1");
    if background {
        // Flushes and segment creation on the flusher thread; commit reports what completed.
        log.start_background_flush(Box::new(|| ())).unwrap();
    }
    let mut next = rec.report.records;
    drop(rec);
    let mut rng = XorShift(seed | 1);
    let mut out = std::io::stdout().lock();
    let mut pending = std::collections::VecDeque::new();
    loop {
        let batch = 1 + rng.next() % 8;
        for _ in 0..batch {
            let len = 8 + (rng.next() % 3000) as usize;
            pending.push_back((log.append(T, &payload(next, len)).unwrap(), next, len));
            next += 1;
        }
        let durable = log.commit(Instant::now()).unwrap();
        if !background {
            assert!(pending.iter().all(|(lsn, _, _)| *lsn < durable), "inline commit flushes everything");
        }
        while pending.front().is_some_and(|(lsn, _, _)| *lsn < durable) {
            let (lsn, i, len) = pending.pop_front().unwrap();
            writeln!(out, "COMMITTED {} {} {i} {len}", lsn.segment, lsn.offset).unwrap();
        }
        out.flush().unwrap();
    }
}

#[test]
fn kill_9_never_loses_a_committed_record() {
    kill_9_rounds(false);
}

#[test]
fn kill_9_never_loses_a_committed_record_with_background_flush() {
    kill_9_rounds(true);
}

fn kill_9_rounds(background: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = XorShift(seed | 1);
    let mut committed: HashMap<Lsn, (u64, usize)> = HashMap::new();
    for round in 0..5 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child_entry", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, tmp.path())
            .env("SEED", (seed + round).to_string())
            .env("BACKGROUND", if background { "1" } else { "0" })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let kill_after = 20 + rng.next() % 400;
        let mut seen = 0;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while seen < kill_after {
            let line = lines.next().expect("the child stopped writing").unwrap();
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.first() != Some(&"COMMITTED") {
                continue;
            }
            let p: Vec<u64> = f[1..].iter().map(|x| x.parse().unwrap()).collect();
            committed.insert(Lsn { segment: p[0], offset: p[1] }, (p[2], p[3] as usize));
            seen += 1;
        }
        child.kill().unwrap(); // SIGKILL, wherever the child is: mid-append, mid-flush, mid-roll
        child.wait().unwrap();

        let (_log, rec) = Log::open(cfg(tmp.path(), 64 << 10, FsyncPolicy::Always))
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
        eprintln!("round {round}: killed after {kill_after} committed records; recovered {}", rec.report);
        let got: HashMap<Lsn, Vec<u8>> = records(&rec).into_iter().map(|(l, _, p)| (l, p)).collect();
        for (lsn, (i, len)) in &committed {
            let p = got.get(lsn).unwrap_or_else(|| panic!("seed {seed}: committed record {i} at {lsn} lost"));
            assert!(*p == payload(*i, *len), "seed {seed}: record {i} at {lsn} damaged");
        }
        // Nothing but a tail can go, so the recovered records are numbered 0..n without a gap.
        for (k, (_, _, p)) in records(&rec).iter().enumerate() {
            assert_eq!(index_of(p), k as u64, "seed {seed}: recovered records out of sequence");
        }
    }
    assert!(committed.len() >= 100);
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
