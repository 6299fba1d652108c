//! Runtime tests that touch process-wide state (the `SHARDMQ_RUNTIME` variable, per-thread CPU time), kept
//! in their own test binary and run one after the other inside a single test.

mod runtime_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use runtime_support::*;
use shardmq_runtime::{self as runtime, Backend, BackendChoice, RuntimeConfig};

fn shard_threads() -> HashSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|tid: &u32| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .is_ok_and(|c| c.starts_with("shard-"))
        })
        .collect()
}

/// CPU time a thread of this process has used, to the nanosecond. Clock ticks (utime + stime) are sampled
/// at 100 Hz and charge a whole tick to whoever runs when it fires, which is too coarse to tell an idle
/// thread from one that woke a few times on a busy host.
fn cpu_time(tid: u32) -> Duration {
    // The kernel's clock id for one thread's CPU time (MAKE_THREAD_CPUCLOCK: CPUCLOCK_PERTHREAD_MASK |
    // CPUCLOCK_SCHED in the low bits, the inverted tid above them); valid for any thread of the process.
    let clock = ((!(tid as libc::clockid_t)) << 3) | 6;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    // A thread that ended has no clock; it uses nothing more either.
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn cpu_sum(tids: &[u32]) -> Duration {
    tids.iter().map(|&t| cpu_time(t)).sum()
}

/// How many times a CPU-time measurement is taken before the test gives up on getting a clean one.
/// Another process on the host can make a sample look wrong (a shard preempted while it should poll, a
/// wake-up delayed), but not every one of several; a shard that really spins or really sleeps is wrong in
/// every sample.
const ATTEMPTS: usize = 5;

/// Most CPU time the idle shards may use in [`IDLE_WINDOW`]: a few wake-ups' worth. A shard that spins
/// uses nearly the whole window, or a large share of it on a crowded host.
const IDLE_LIMIT: Duration = Duration::from_millis(25);
const IDLE_WINDOW: Duration = Duration::from_millis(500);

/// Waits until `tids` use at most [`IDLE_LIMIT`] in one [`IDLE_WINDOW`]; the CPU time of every sample
/// when none does.
fn quiet_sample(tids: &[u32]) -> Result<Duration, Vec<Duration>> {
    let mut samples = Vec::new();
    for _ in 0..ATTEMPTS {
        let t0 = cpu_sum(tids);
        std::thread::sleep(IDLE_WINDOW);
        let used = cpu_sum(tids).saturating_sub(t0);
        if used <= IDLE_LIMIT {
            return Ok(used);
        }
        samples.push(used);
    }
    Err(samples)
}

#[test]
fn env_override_and_idle_shards_sleep() {
    // SHARDMQ_RUNTIME=epoll overrides Auto even where io_uring works...
    std::env::set_var("SHARDMQ_RUNTIME", "epoll");
    let obs = Arc::new(Obs::default());
    let o = obs.clone();
    let node = runtime::start(config(BackendChoice::Auto, 1), move |me, n| {
        TestCore::new(me, n, o.clone(), CoreCfg::default())
    })
    .unwrap();
    assert_eq!(node.backend(), Backend::Epoll);
    node.shutdown();
    node.join().unwrap();
    // ...but not an explicit choice.
    let o = obs.clone();
    let node = runtime::start(config(BackendChoice::Uring, 1), move |me, n| {
        TestCore::new(me, n, o.clone(), CoreCfg::default())
    })
    .unwrap();
    assert_eq!(node.backend(), Backend::Uring);
    node.shutdown();
    node.join().unwrap();
    std::env::remove_var("SHARDMQ_RUNTIME");

    // An idle shard blocks in the kernel: no busy polling, whichever backend.
    for b in [BackendChoice::Epoll, BackendChoice::Uring] {
        let before = shard_threads();
        let o = obs.clone();
        let node =
            runtime::start(config(b, 2), move |me, n| TestCore::new(me, n, o.clone(), CoreCfg::default()))
                .unwrap();
        let mut c = Client::new(node.local_addrs()[0]);
        c.send("idle\n");
        c.line();
        let mine: Vec<u32> = shard_threads().difference(&before).copied().collect();
        assert_eq!(mine.len(), 2);
        if let Err(samples) = quiet_sample(&mine) {
            panic!("{b:?}: idle shards never used under {IDLE_LIMIT:?} in {IDLE_WINDOW:?}: {samples:?}");
        }
        node.shutdown();
        node.join().unwrap();
    }

    // With an idle-poll window a shard polls while traffic keeps coming, and sleeps again once it stops.
    for b in [BackendChoice::Epoll, BackendChoice::Uring] {
        let before = shard_threads();
        let o = obs.clone();
        let cfg = RuntimeConfig { idle_poll: Duration::from_millis(5), ..config(b, 1) };
        let node =
            runtime::start(cfg, move |me, n| TestCore::new(me, n, o.clone(), CoreCfg::default())).unwrap();
        let mut c = Client::new(node.local_addrs()[0]);
        let mine: Vec<u32> = shard_threads().difference(&before).copied().collect();
        assert_eq!(mine.len(), 1);
        // A line every millisecond for 400 ms: the 5 ms window never runs out, the shard never sleeps.
        // Sleeping between lines costs well under 10% of the time; polling costs most of it, at least a
        // quarter even when the host is busy. Preemption or a late sleep on the client's side can spoil
        // one round, so the best of a few counts.
        let window = Duration::from_millis(400);
        let mut rounds = Vec::new();
        let mut n = 0;
        for _ in 0..ATTEMPTS {
            let t0 = cpu_time(mine[0]);
            let start = std::time::Instant::now();
            while start.elapsed() < window {
                c.send(&format!("p{n}\n"));
                c.line();
                n += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            rounds.push(cpu_time(mine[0]).saturating_sub(t0));
            if rounds.last().is_some_and(|&busy| busy >= window / 4) {
                break;
            }
        }
        assert!(
            rounds.iter().any(|&busy| busy >= window / 4),
            "{b:?}: a polling shard never used a quarter of {window:?} of traffic: {rounds:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
        if let Err(samples) = quiet_sample(&mine) {
            panic!("{b:?}: the shard kept polling after traffic stopped: {samples:?} in {IDLE_WINDOW:?}");
        }
        node.shutdown();
        node.join().unwrap();
    }
}
