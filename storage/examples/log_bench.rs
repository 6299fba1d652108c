//! Append throughput per fsync policy and group-commit batch size, and recovery time, as a markdown table.
//!
//! ```sh
//! cargo run --release -p shardmq-storage --example log_bench [-- --dir DIR] [--secs S]
//! ```
//!
//! Each append run lasts about `--secs` seconds (default 1) on a fresh log with 64 MiB segments, so the
//! long runs include segment rolls (allocation, sealing flush). The log lives in a temporary directory
//! under `--dir` (default: the system temp dir); the numbers are those of that filesystem and device.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shardmq_storage::{FsyncPolicy, Log, LogConfig, RecordType};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut base = std::env::temp_dir();
    let mut secs = 1.0f64;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => base = PathBuf::from(args.next().expect("--dir DIR")),
            "--secs" => secs = args.next().expect("--secs S").parse().expect("a number of seconds"),
            other => panic!("unknown argument {other}; use --dir DIR, --secs S"),
        }
    }
    let run_for = Duration::from_secs_f64(secs);
    println!("## append throughput ({} s per run, 64 MiB segments, dir under {})\n", secs, base.display());
    println!("| policy | commit every | record | records/s | MB/s | commits/s | records |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let interval = FsyncPolicy::Interval(Duration::from_millis(10));
    let runs: [(FsyncPolicy, usize); 5] = [
        (FsyncPolicy::Never, 256),
        (interval, 16),
        (FsyncPolicy::Always, 1),
        (FsyncPolicy::Always, 16),
        (FsyncPolicy::Always, 256),
    ];
    for size in [100usize, 1024] {
        for (policy, batch) in runs {
            let tmp = tempfile::tempdir_in(&base).unwrap();
            let r = append_run(tmp.path(), policy, batch, size, run_for);
            println!(
                "| {policy} | {batch} | {size} B | {:.0} | {:.1} | {:.0} | {} |",
                r.records as f64 / r.secs,
                (r.records * size as u64) as f64 / r.secs / 1e6,
                r.commits as f64 / r.secs,
                r.records
            );
        }
    }

    println!("\n## recovery of 1,000,000 records of 100 B\n");
    println!("| page cache | open (scan + CRC) | iterate all records | total | segments |");
    println!("|---|---:|---:|---:|---:|");
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let cfg = LogConfig { dir: tmp.path().to_path_buf(), segment_bytes: 64 << 20, fsync: FsyncPolicy::Never };
    {
        let (mut log, _) = Log::open(cfg.clone()).unwrap();
        let p = vec![0xabu8; 100];
        for _ in 0..1_000_000 {
            log.append(RecordType(1), &p).unwrap();
        }
        log.flush().unwrap();
    }
    for cold in [false, true] {
        if cold {
            drop_file_cache(tmp.path());
        }
        let t0 = Instant::now();
        let (_log, rec) = Log::open(cfg.clone()).unwrap();
        let t1 = Instant::now();
        let (mut n, mut bytes) = (0u64, 0u64);
        for (_, _, p) in rec.records() {
            n += 1;
            bytes += p.len() as u64;
        }
        let t2 = Instant::now();
        assert_eq!((n, bytes), (1_000_000, 100_000_000));
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
            if cold { "cold (fadvise DONTNEED)" } else { "warm" },
            ms(t1 - t0),
            ms(t2 - t1),
            ms(t2 - t0),
            rec.report.segments
        );
    }
}

struct RunResult {
    records: u64,
    commits: u64,
    secs: f64,
}

fn append_run(dir: &Path, policy: FsyncPolicy, batch: usize, size: usize, run_for: Duration) -> RunResult {
    let cfg = LogConfig { dir: dir.to_path_buf(), segment_bytes: 64 << 20, fsync: policy };
    let (mut log, _) = Log::open(cfg).unwrap();
    let payload = vec![0x5au8; size];
    let (mut records, mut commits) = (0u64, 0u64);
    let start = Instant::now();
    let mut now = start;
    while now - start < run_for && records < 20_000_000 {
        for _ in 0..batch {
            log.append(RecordType(1), &payload).unwrap();
        }
        records += batch as u64;
        now = Instant::now();
        log.commit(now).unwrap();
        commits += 1;
    }
    // What was acknowledged under Always is durable; for the others, count the time to make it so.
    log.flush().unwrap();
    RunResult { records, commits, secs: start.elapsed().as_secs_f64() }
}

/// Evicts the (clean, just flushed) pages of the log's files from the page cache, affecting nothing else.
fn drop_file_cache(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let f = std::fs::File::open(e.unwrap().path()).unwrap();
        // SAFETY: an advisory syscall on a descriptor we own.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
