//! A shard that dies takes the node down with it: the other shards shut down and the node reports which
//! shard failed and why, so the process owning it can exit instead of serving with a hole in it.

mod runtime_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_support::*;
use shardmq_runtime::{self as runtime, BackendChoice};
use shardmq_shard::ShardId;

fn panicking_shard_stops_the_node(b: BackendChoice) {
    let shards = 3;
    let obs = Arc::new(Obs::default());
    let o = obs.clone();
    let node =
        runtime::start(config(b, shards), move |me, n| TestCore::new(me, n, o.clone(), CoreCfg::default()))
            .expect("start");
    let mut c = Client::new(node.local_addrs()[0]);
    let victim = c.who();
    assert_eq!(node.failure(), None, "{b:?}: a healthy node reports a failure");

    c.send("PANIC\n");
    assert!(wait_until(Duration::from_secs(2), || node.failure().is_some()), "{b:?}: no failure reported");
    let failure = node.failure().expect("failure");
    assert_eq!(failure.shard, ShardId(victim), "{b:?}: {failure}");
    assert!(failure.cause.contains("PANIC requested on shard"), "{b:?}: cause {:?}", failure.cause);
    // Every other shard was told to stop without anyone calling `shutdown`.
    assert!(
        wait_until(Duration::from_secs(2), || Obs::get(&obs.shutdowns) == shards as u64 - 1),
        "{b:?}: {} of the {} other shards shut down",
        Obs::get(&obs.shutdowns),
        shards - 1
    );

    // `join` returning means every thread ended; it reports the panic as its error.
    let t = Instant::now();
    let joined = node.join();
    assert!(joined.is_err(), "{b:?}: join hid the panic");
    assert!(t.elapsed() < Duration::from_secs(4), "{b:?}: join took {:?}", t.elapsed());
}

fn requested_shutdown_is_no_failure(b: BackendChoice) {
    let obs = Arc::new(Obs::default());
    let o = obs.clone();
    let node = runtime::start(config(b, 2), move |me, n| TestCore::new(me, n, o.clone(), CoreCfg::default()))
        .expect("start");
    node.shutdown();
    assert!(wait_until(Duration::from_secs(2), || Obs::get(&obs.shutdowns) == 2));
    // Let the shards' loops return before looking.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(node.failure(), None, "{b:?}");
    node.join().expect("join");
}

#[test]
fn epoll_panicking_shard_stops_the_node() {
    panicking_shard_stops_the_node(BackendChoice::Epoll);
}

#[test]
fn uring_panicking_shard_stops_the_node() {
    panicking_shard_stops_the_node(BackendChoice::Uring);
}

#[test]
fn epoll_requested_shutdown_is_no_failure() {
    requested_shutdown_is_no_failure(BackendChoice::Epoll);
}

#[test]
fn uring_requested_shutdown_is_no_failure() {
    requested_shutdown_is_no_failure(BackendChoice::Uring);
}
