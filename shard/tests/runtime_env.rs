//! Runtime tests that touch process-wide state (the `SHARDMQ_RUNTIME` variable, per-thread CPU time), kept
//! in their own test binary and run one after the other inside a single test.

mod runtime_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use runtime_support::*;
use shardmq_shard::runtime::{self, Backend, BackendChoice, RuntimeConfig};

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

/// utime + stime of a thread, in clock ticks.
fn cpu_ticks(tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
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
        let t0: u64 = mine.iter().map(|&t| cpu_ticks(t)).sum();
        std::thread::sleep(Duration::from_millis(500));
        let t1: u64 = mine.iter().map(|&t| cpu_ticks(t)).sum();
        assert!(t1 - t0 <= 3, "{b:?}: idle shards used {} ticks in 500 ms", t1 - t0);
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
        let t0 = cpu_ticks(mine[0]);
        let start = std::time::Instant::now();
        let mut n = 0;
        while start.elapsed() < Duration::from_millis(400) {
            c.send(&format!("p{n}\n"));
            c.line();
            n += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        let busy = cpu_ticks(mine[0]) - t0;
        // Sleeping between lines costs a tick or two; polling costs most of the 40 ticks.
        assert!(busy >= 10, "{b:?}: a polling shard used only {busy} ticks in 400 ms of traffic");
        std::thread::sleep(Duration::from_millis(50));
        let t1 = cpu_ticks(mine[0]);
        std::thread::sleep(Duration::from_millis(500));
        let idle = cpu_ticks(mine[0]) - t1;
        assert!(idle <= 3, "{b:?}: the shard kept polling after traffic stopped: {idle} ticks in 500 ms");
        node.shutdown();
        node.join().unwrap();
    }
}
