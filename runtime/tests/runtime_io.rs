//! Runtime tests over loopback, run once per backend (`epoll::*`, `uring::*`) with the line-protocol
//! [`TestCore`](runtime_support::TestCore), plus the backend-choice tests.

mod runtime_support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_support::pause::{PauseCore, PauseCtl, PauseMode};
use runtime_support::stall::{StallCore, StallCtl, Unstall};
use runtime_support::*;
use shardmq_runtime::{self as runtime, Backend, BackendChoice, Node, RuntimeConfig};

fn start(cfg: RuntimeConfig, core: CoreCfg) -> (Node, Arc<Obs>) {
    let obs = Arc::new(Obs::default());
    let o = obs.clone();
    let node =
        runtime::start(cfg, move |me, shards| TestCore::new(me, shards, o.clone(), core)).expect("start");
    (node, obs)
}

fn stop(node: Node) {
    let t = Instant::now();
    node.shutdown();
    node.join().expect("join");
    assert!(t.elapsed() < Duration::from_secs(4), "shutdown took {:?}", t.elapsed());
}

fn echo_many_clients(b: BackendChoice) {
    let (node, obs) = start(config(b, 2), CoreCfg::default());
    let addr = node.local_addrs()[0];
    let handles: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut clients: Vec<Client> = (0..25).map(|_| Client::new(addr)).collect();
                for round in 0..10 {
                    for (i, c) in clients.iter_mut().enumerate() {
                        c.send(&format!("t{t}-c{i}-r{round}\n"));
                    }
                    for (i, c) in clients.iter_mut().enumerate() {
                        let l = c.line();
                        let (_, text) = l.split_once(':').expect("shard prefix");
                        assert_eq!(text, format!("t{t}-c{i}-r{round}"));
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(Obs::get(&obs.accepts), 200);
    let stats = node.stats();
    assert_eq!(stats.iter().map(|s| s.accepted).sum::<u64>(), 200);
    assert!(stats.iter().map(|s| s.bytes_read).sum::<u64>() >= 200 * 10 * 9);
    stop(node);
}

fn large_write_backpressure(b: BackendChoice) {
    let (node, obs) = start(config(b, 1), CoreCfg::default());
    let mut c = Client::new(node.local_addrs()[0]);
    let half = 4 * 1024 * 1024;
    // The second request arrives while the core is (most likely) blocked: it must resume on `false`.
    c.send(&format!("BIG {half}\nBIG {half}\n"));
    let mut got = 0usize;
    while got < 2 * half {
        let chunk = c.bytes(64 * 1024);
        assert_eq!(chunk, pattern(got, chunk.len()), "bytes at offset {got}");
        got += chunk.len();
        if got < 1024 * 1024 {
            // A slow reader for the first MiB: the socket fills, the runtime must hold the rest.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert!(Obs::get(&obs.bp_true) >= 1, "backpressure never reported");
    assert!(
        wait_until(Duration::from_secs(2), || Obs::get(&obs.bp_false) >= 1),
        "backpressure never cleared"
    );
    c.send("after\n");
    assert_eq!(c.line(), "0:after");
    assert!(node.stats()[0].bytes_written >= 2 * half as u64);
    stop(node);
}

fn peer_close_reports_closed(b: BackendChoice) {
    let (node, obs) = start(config(b, 2), CoreCfg::default());
    for i in 0..3 {
        let mut c = Client::new(node.local_addrs()[0]);
        c.send(&format!("hello{i}\n"));
        assert!(c.line().ends_with(&format!(":hello{i}")));
    }
    assert!(
        wait_until(Duration::from_secs(3), || Obs::get(&obs.closed) == 3),
        "closed = {}",
        Obs::get(&obs.closed)
    );
    assert!(
        wait_until(Duration::from_secs(1), || node.stats().iter().map(|s| s.open_sockets).sum::<u64>() == 0)
    );
    assert_eq!(Obs::get(&obs.bad_closed), 0);
    stop(node);
}

fn core_close_flushes_then_eof(b: BackendChoice) {
    let (node, obs) = start(config(b, 2), CoreCfg::default());
    let n = 3 * 1024 * 1024 + 17;
    let mut c = Client::new(node.local_addrs()[0]);
    c.send(&format!("BYE {n}\n"));
    std::thread::sleep(Duration::from_millis(50)); // let the output back up before reading it
    assert_eq!(c.bytes(n), pattern(0, n));
    c.expect_eof();
    assert!(wait_until(Duration::from_secs(2), || node.stats().iter().map(|s| s.closed).sum::<u64>() == 1));
    assert_eq!(Obs::get(&obs.closed), 0, "a core-requested close must not be reported back");
    stop(node);
}

fn handoff_preserves_bytes(b: BackendChoice) {
    let (node, obs) = start(config(b, 2), CoreCfg::default());
    let addr = node.local_addrs()[0];
    let handles: Vec<_> = (0..4)
        .map(|client| {
            std::thread::spawn(move || {
                let mut c = Client::new(addr);
                let mut shard = c.who();
                for seg in 0..6 {
                    // HOP and then well over one receive buffer of lines in one write: the lines after HOP
                    // must all reach the next shard, in order, whatever the runtime had read already.
                    let mut msg = String::from("HOP\n");
                    for i in 0..1500 {
                        msg.push_str(&format!("c{client}-s{seg}-line-{i:05}\n"));
                    }
                    c.w.write_all(msg.as_bytes()).unwrap();
                    shard = (shard + 1) % 2;
                    for i in 0..1500 {
                        assert_eq!(c.line(), format!("{shard}:c{client}-s{seg}-line-{i:05}"));
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(Obs::get(&obs.adopts), 24);
    assert_eq!(Obs::get(&obs.reads_after_handoff), 0);
    assert_eq!(node.stats().iter().map(|s| s.handoffs).sum::<u64>(), 24);
    stop(node);
}

fn handoff_carries_unsent_output(b: BackendChoice) {
    let (node, obs) = start(config(b, 2), CoreCfg::default());
    let mut c = Client::new(node.local_addrs()[0]);
    let first = c.who();
    let n = 6 * 1024 * 1024;
    // The output of BIG cannot all be written before HOP is processed: the rest travels with the socket
    // and must come out of the next shard before that shard's own reply.
    c.send(&format!("BIG {n}\nHOP\nafter\n"));
    std::thread::sleep(Duration::from_millis(100));
    let mut got = 0;
    while got < n {
        let chunk = c.bytes((n - got).min(256 * 1024));
        assert_eq!(chunk, pattern(got, chunk.len()), "bytes at offset {got}");
        got += chunk.len();
    }
    assert_eq!(c.line(), format!("{}:after", (first + 1) % 2));
    assert_eq!(Obs::get(&obs.adopts), 1);
    stop(node);
}

fn close_gives_up_on_stalled_peer(b: BackendChoice) {
    let cfg = RuntimeConfig { close_linger: Duration::from_millis(300), ..config(b, 1) };
    let (node, _) = start(cfg, CoreCfg::default());
    let mut c = Client::new(node.local_addrs()[0]);
    c.send(&format!("BYE {}\n", 16 * 1024 * 1024));
    // Never read: the runtime must stop trying after the linger and free the socket.
    let closed = || node.stats()[0].closed == 1 && node.stats()[0].open_sockets == 0;
    assert!(wait_until(Duration::from_secs(3), closed), "{:?}", node.stats());
    stop(node);
}

fn mesh_tiny_capacity(b: BackendChoice) {
    let per_target = 100_000;
    let cfg = RuntimeConfig { mesh_capacity: 1, ..config(b, 2) };
    let (node, obs) = start(cfg, CoreCfg { mesh_per_target: per_target, mesh_burst: 64 });
    let addr = node.local_addrs()[0];
    // Socket traffic alongside, so the shards are busy with something else too.
    let mut clients: Vec<Client> = (0..4).map(|_| Client::new(addr)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut round = 0;
    while Obs::get(&obs.mesh_recv) < 2 * per_target && Instant::now() < deadline {
        for c in clients.iter_mut() {
            c.send(&format!("r{round}\n"));
            assert!(c.line().ends_with(&format!(":r{round}")));
        }
        round += 1;
    }
    assert_eq!(Obs::get(&obs.mesh_recv), 2 * per_target, "mesh messages lost");
    assert_eq!(Obs::get(&obs.mesh_out_of_order), 0);
    let stats = node.stats();
    assert_eq!(stats.iter().map(|s| s.mesh_sent).sum::<u64>(), 2 * per_target);
    assert!(stats.iter().map(|s| s.mesh_full_retries).sum::<u64>() > 0, "capacity 1 never filled up");
    stop(node);
}

/// With an idle-poll window the shards seldom sleep, so mesh batches usually find their target awake and
/// send no wakeup: echo and cross-shard traffic must behave exactly as without it.
fn idle_poll_echo_and_mesh(b: BackendChoice) {
    let per_target = 20_000;
    let cfg = RuntimeConfig { idle_poll: Duration::from_micros(500), mesh_capacity: 4, ..config(b, 2) };
    let (node, obs) = start(cfg, CoreCfg { mesh_per_target: per_target, mesh_burst: 16 });
    let addr = node.local_addrs()[0];
    let mut clients: Vec<Client> = (0..8).map(|_| Client::new(addr)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut round = 0;
    while (Obs::get(&obs.mesh_recv) < 2 * per_target || round < 50) && Instant::now() < deadline {
        for c in clients.iter_mut() {
            c.send(&format!("r{round}\n"));
            assert!(c.line().ends_with(&format!(":r{round}")));
        }
        round += 1;
        if round % 10 == 0 {
            // Gaps longer than the window: the shards go to sleep and must be woken again.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert_eq!(Obs::get(&obs.mesh_recv), 2 * per_target, "mesh messages lost");
    assert_eq!(Obs::get(&obs.mesh_out_of_order), 0);
    stop(node);
}

fn max_sockets_cap(b: BackendChoice) {
    let cfg = RuntimeConfig { max_sockets: 4, ..config(b, 2) };
    let (node, _obs) = start(cfg, CoreCfg::default());
    let addr = node.local_addrs()[0];
    let mut kept: Vec<Client> = (0..4).map(|_| Client::new(addr)).collect();
    for (i, c) in kept.iter_mut().enumerate() {
        c.send(&format!("k{i}\n"));
        assert!(c.line().ends_with(&format!(":k{i}")));
    }
    for _ in 0..3 {
        let mut extra = Client::new(addr);
        extra.expect_eof();
    }
    let refused = || node.stats().iter().map(|s| s.refused_over_cap).sum::<u64>();
    assert!(wait_until(Duration::from_secs(2), || refused() == 3), "refused = {}", refused());
    for (i, c) in kept.iter_mut().enumerate() {
        c.send(&format!("again{i}\n"));
        assert!(c.line().ends_with(&format!(":again{i}")));
    }
    // A slot freed is a slot usable again.
    drop(kept.pop());
    assert!(
        wait_until(Duration::from_secs(2), || node.stats().iter().map(|s| s.open_sockets).sum::<u64>() == 3)
    );
    let mut c = Client::new(addr);
    c.send("in\n");
    assert!(c.line().ends_with(":in"));
    stop(node);
}

fn shutdown_flushes_and_joins(b: BackendChoice) {
    let (node, obs) = start(config(b, 2), CoreCfg::default());
    let mut clients: Vec<Client> = (0..6).map(|_| Client::new(node.local_addrs()[0])).collect();
    for c in clients.iter_mut() {
        c.who();
    }
    stop(node);
    for c in clients.iter_mut() {
        assert_eq!(c.line(), "shutdown");
        c.expect_eof();
    }
    assert_eq!(Obs::get(&obs.shutdowns), 2);
}

fn start_pause(cfg: RuntimeConfig, mode: PauseMode) -> (Node, Arc<PauseCtl>) {
    let ctl = Arc::new(PauseCtl::default());
    let c = ctl.clone();
    let node = runtime::start(cfg, move |_, _| PauseCore::new(c.clone(), mode)).expect("start");
    (node, ctl)
}

/// Connects and writes the first `first` pattern bytes, then waits for the core to pause the connection.
fn connect_and_pause(node: &Node, ctl: &PauseCtl, first: usize) -> TcpStream {
    let mut s = connect(node.local_addrs()[0]);
    s.write_all(&pattern(0, first)).unwrap();
    assert!(wait_until(Duration::from_secs(3), || PauseCtl::get(&ctl.paused_now) == 1), "never paused");
    assert_eq!(PauseCtl::get(&ctl.received), first as u64);
    s
}

/// Nonblocking writes of `data[*off..]` until the socket refuses more; `false` if everything was written.
fn write_until_blocked(s: &mut TcpStream, data: &[u8], off: &mut usize) -> bool {
    s.set_nonblocking(true).unwrap();
    let blocked = loop {
        if *off == data.len() {
            break false;
        }
        match s.write(&data[*off..]) {
            Ok(n) => *off += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
            Err(e) => panic!("write: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    blocked
}

fn pause_blocks_peer_then_delivers_in_order(b: BackendChoice) {
    let (node, ctl) = start_pause(config(b, 1), PauseMode::Once { after: 1000 });
    let total = 8 * 1024 * 1024;
    let data = pattern(0, total);
    let mut s = connect_and_pause(&node, &ctl, 1000);
    let mut off = 1000;
    // TCP flow control: with nobody reading, the socket buffers fill (a few MiB at most) and writes block.
    assert!(write_until_blocked(&mut s, &data, &mut off), "all {total} bytes written while paused");
    std::thread::sleep(Duration::from_millis(100));
    assert!(write_until_blocked(&mut s, &data, &mut off), "writes unblocked while paused");
    assert!(off < total);
    assert_eq!(PauseCtl::get(&ctl.received), 1000, "bytes delivered while paused");
    PauseCtl::bump(&ctl.resume_req);
    s.write_all(&data[off..]).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || PauseCtl::get(&ctl.received) == total as u64),
        "received {} of {total}",
        PauseCtl::get(&ctl.received)
    );
    assert_eq!(PauseCtl::get(&ctl.mismatches), 0);
    assert_eq!(PauseCtl::get(&ctl.reads_while_paused), 0);
    assert_eq!(PauseCtl::get(&ctl.resumes), 1);
    drop(s);
    assert!(wait_until(Duration::from_secs(2), || PauseCtl::get(&ctl.closed) == 1));
    assert_eq!(*ctl.totals_at_close.lock().unwrap(), vec![total]);
    stop(node);
}

/// The peer's close of a paused connection is reported after `ResumeRead`, behind the bytes before it.
fn pause_then_peer_close(b: BackendChoice) {
    let (node, ctl) = start_pause(config(b, 1), PauseMode::Once { after: 1000 });
    let total = 1000 + 20_000;
    let mut s = connect_and_pause(&node, &ctl, 1000);
    s.write_all(&pattern(0, total)[1000..]).unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(PauseCtl::get(&ctl.closed), 0, "close of a paused connection reported before resume");
    assert_eq!(PauseCtl::get(&ctl.received), 1000);
    PauseCtl::bump(&ctl.resume_req);
    assert!(wait_until(Duration::from_secs(2), || PauseCtl::get(&ctl.closed) == 1), "close never reported");
    assert_eq!(*ctl.totals_at_close.lock().unwrap(), vec![total]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(PauseCtl::get(&ctl.closed), 1);
    assert_eq!(PauseCtl::get(&ctl.bad_closed), 0);
    assert_eq!(PauseCtl::get(&ctl.mismatches), 0);
    assert_eq!(PauseCtl::get(&ctl.reads_while_paused), 0);
    assert!(wait_until(Duration::from_secs(1), || node.stats()[0].open_sockets == 0));
    stop(node);
}

fn close_while_paused(b: BackendChoice) {
    let (node, ctl) = start_pause(config(b, 1), PauseMode::Once { after: 1000 });
    let mut s = connect_and_pause(&node, &ctl, 1000);
    let data = pattern(0, 1 << 20);
    let mut off = 1000;
    write_until_blocked(&mut s, &data, &mut off);
    PauseCtl::bump(&ctl.close_req);
    // The core's last words, then the end (a reset, when the runtime closes with our bytes unread).
    let mut got = Vec::new();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    assert!(b"bye\n".starts_with(&got), "{got:?}");
    let closed = || node.stats()[0].closed == 1 && node.stats()[0].open_sockets == 0;
    assert!(wait_until(Duration::from_secs(2), closed), "{:?}", node.stats());
    assert_eq!(PauseCtl::get(&ctl.closed), 0, "a core-requested close must not be reported back");
    assert_eq!(PauseCtl::get(&ctl.reads_after_close), 0);
    assert_eq!(PauseCtl::get(&ctl.received), 1000);
    stop(node);
}

/// Pauses and resumes after nearly every read, several connections at once: nothing lost, duplicated,
/// reordered or delivered while paused; every close reported once, after all of the connection's bytes.
fn pause_resume_churn(cfg: RuntimeConfig) {
    let (node, ctl) = start_pause(cfg, PauseMode::Churn);
    let addr = node.local_addrs()[0];
    let (clients, each) = (4, 2 * 1024 * 1024);
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = connect(addr);
                let data = pattern(0, each);
                for chunk in data.chunks(48 * 1024) {
                    s.write_all(chunk).unwrap();
                }
                s.shutdown(Shutdown::Write).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let done = || PauseCtl::get(&ctl.closed) == clients as u64;
    assert!(wait_until(Duration::from_secs(5), done), "closed {}", PauseCtl::get(&ctl.closed));
    assert_eq!(*ctl.totals_at_close.lock().unwrap(), vec![each; clients]);
    assert_eq!(PauseCtl::get(&ctl.mismatches), 0);
    assert_eq!(PauseCtl::get(&ctl.reads_while_paused), 0);
    assert_eq!(PauseCtl::get(&ctl.bad_closed), 0);
    let pauses = PauseCtl::get(&ctl.pauses);
    eprintln!("{pauses} pauses");
    assert!(pauses >= 16, "only {pauses} pauses");
    stop(node);
}

/// A peer writing flat out to a connection that is paused and resumed all the time: the runtime holds at most
/// a couple of receive buffers' worth of input for it (io_uring's stash), not the socket's receive buffer.
///
/// The connection is paused once while the peer is idle first: on io_uring the first pause of a connection
/// cancels a multishot recv, and what that recv completed in the same batch (bounded by the kernel's retry
/// limit, not by the socket buffer) is held once; the churn that follows must not hold more than a buffer.
fn pause_churn_holds_little(b: BackendChoice) {
    let cfg = RuntimeConfig { uring_buffer_size: 16 * 1024, ..config(b, 1) };
    let limit = 2 * cfg.uring_buffer_size as u64;
    let (node, ctl) = start_pause(cfg, PauseMode::OnceThenChurn { after: 1000 });
    let mut s = connect_and_pause(&node, &ctl, 1000);
    assert!(node.stats()[0].stash_bytes_max <= limit);
    let each = 32 * 1024 * 1024;
    let data = pattern(0, each);
    PauseCtl::bump(&ctl.resume_req);
    for chunk in data[1000..].chunks(256 * 1024) {
        s.write_all(chunk).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let done = || PauseCtl::get(&ctl.closed) == 1;
    assert!(wait_until(Duration::from_secs(10), done), "closed {}", PauseCtl::get(&ctl.closed));
    assert_eq!(*ctl.totals_at_close.lock().unwrap(), vec![each]);
    assert_eq!(PauseCtl::get(&ctl.mismatches), 0);
    assert_eq!(PauseCtl::get(&ctl.reads_while_paused), 0);
    let held = node.stats()[0].stash_bytes_max;
    let pauses = PauseCtl::get(&ctl.pauses);
    eprintln!("{pauses} pauses, at most {held} bytes held for a paused connection");
    assert!(pauses >= 100, "only {pauses} pauses");
    assert!(held <= limit, "held {held} bytes for a paused connection (limit {limit})");
    stop(node);
}

/// A connection paused, resumed, left unpaused for a few seconds (io_uring goes back to multishot recvs)
/// and paused again: nothing delivered while paused, little held, every byte in order after resuming.
fn pause_again_after_quiet_period(b: BackendChoice) {
    let cfg = config(b, 1);
    let limit = 2 * cfg.uring_buffer_size as u64;
    let (node, ctl) = start_pause(cfg, PauseMode::Once { after: 1000 });
    let total = 8 * 1024 * 1024;
    let data = pattern(0, total);
    let mut s = connect_and_pause(&node, &ctl, 1000);
    PauseCtl::bump(&ctl.resume_req);
    assert!(wait_until(Duration::from_secs(2), || PauseCtl::get(&ctl.paused_now) == 0));
    let mut off = 1000;
    for _ in 0..3 {
        s.write_all(&data[off..off + 1000]).unwrap();
        off += 1000;
        std::thread::sleep(Duration::from_millis(1100));
    }
    s.write_all(&data[off..off + 1000]).unwrap();
    off += 1000;
    assert!(wait_until(Duration::from_secs(2), || PauseCtl::get(&ctl.received) == off as u64));
    PauseCtl::bump(&ctl.pause_req);
    assert!(wait_until(Duration::from_secs(2), || PauseCtl::get(&ctl.paused_now) == 1), "never paused");
    assert!(write_until_blocked(&mut s, &data, &mut off), "all {total} bytes written while paused");
    std::thread::sleep(Duration::from_millis(100));
    assert!(write_until_blocked(&mut s, &data, &mut off), "writes unblocked while paused");
    let before = PauseCtl::get(&ctl.received);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(PauseCtl::get(&ctl.received), before, "bytes delivered while paused");
    assert!(node.stats()[0].stash_bytes_max <= limit, "{:?}", node.stats());
    PauseCtl::bump(&ctl.resume_req);
    s.write_all(&data[off..]).unwrap();
    let done = || PauseCtl::get(&ctl.received) == total as u64;
    assert!(wait_until(Duration::from_secs(3), done), "received {}", PauseCtl::get(&ctl.received));
    assert_eq!(PauseCtl::get(&ctl.mismatches), 0);
    assert_eq!(PauseCtl::get(&ctl.reads_while_paused), 0);
    drop(s);
    assert!(wait_until(Duration::from_secs(2), || PauseCtl::get(&ctl.closed) == 1));
    assert_eq!(*ctl.totals_at_close.lock().unwrap(), vec![total]);
    stop(node);
}

/// A shard whose peer stops draining its inbox stops reading its sockets once its backlog for that peer
/// reaches `mesh_backlog_limit`, instead of buffering without bound; everything arrives once the peer
/// resumes.
fn stalled_peer_bounds_backlog(b: BackendChoice) {
    const LIMIT: usize = 2000;
    const LINE: usize = 128;
    let cfg = RuntimeConfig {
        mesh_capacity: 4,
        mesh_backlog_limit: LIMIT,
        read_buffer_size: 16 * 1024,
        uring_buffer_size: 16 * 1024,
        ..config(b, 2)
    };
    let ctl = Arc::new(StallCtl::default());
    ctl.stall.store(true, std::sync::atomic::Ordering::SeqCst);
    let _unstall = Unstall(ctl.clone());
    let c = ctl.clone();
    let node = runtime::start(cfg, move |me, _| StallCore::new(me, c.clone())).expect("start");
    let addr = node.local_addrs()[0];
    // A producer on shard 0 (SO_REUSEPORT picks the shard).
    let mut s = (0..64)
        .find_map(|_| {
            let mut c = Client::new(addr);
            c.send("WHO\n");
            (c.line() == "0").then_some(c.w)
        })
        .expect("no connection landed on shard 0");
    let mut line = [b'x'; LINE];
    line[0] = b'M';
    line[LINE - 1] = b'\n';
    let chunk = line.repeat(64);
    // Bounded: 40 MB of lines or 20 s; a gate that works blocks the writer after a few MB (kernel buffers).
    let max_bytes = 40 * 1024 * 1024;
    let mut written = 0usize;
    let mut off = 0usize;
    let start = Instant::now();
    let mut blocked_since: Option<Instant> = None;
    s.set_nonblocking(true).unwrap();
    while written < max_bytes && start.elapsed() < Duration::from_secs(20) {
        match s.write(&chunk[off..]) {
            Ok(n) => {
                written += n;
                off = (off + n) % chunk.len();
                blocked_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    let stats = node.stats();
    assert!(ctl.stalled_now.load(std::sync::atomic::Ordering::SeqCst), "shard 1 never stalled");
    assert!(blocked_since.is_some(), "{written} bytes written and the producer never blocked");
    assert!(stats[0].read_gate_closed, "shard 0 still reads its sockets: {:?}", stats[0]);
    // The budget stops the core after the read that spends it: one read (16 KiB = 128 lines) past the
    // mark, plus a first io_uring pause's stash (what its multishot recv took before the cancel landed).
    let slack = if stats[0].stash_bytes_max > 0 { stats[0].stash_bytes_max as usize / LINE } else { 0 };
    let bound = (LIMIT + 16 * 1024 / LINE + slack) as u64;
    assert!(stats[0].mesh_backlog_max <= bound, "backlog {} over {bound}", stats[0].mesh_backlog_max);
    // Still bounded a moment later: nothing more is read.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(node.stats()[0].mesh_backlog_max, stats[0].mesh_backlog_max);

    ctl.stall.store(false, std::sync::atomic::Ordering::SeqCst);
    s.set_nonblocking(false).unwrap();
    // Finish the line cut short, so every byte written is whole lines.
    s.write_all(&chunk[off..]).unwrap();
    written += chunk.len() - off;
    let lines = (written / LINE) as u64;
    assert!(
        wait_until(Duration::from_secs(10), || ctl.received.load(std::sync::atomic::Ordering::SeqCst)
            == lines),
        "received {} of {lines}",
        ctl.received.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert_eq!(ctl.out_of_order.load(std::sync::atomic::Ordering::SeqCst), 0);
    let stats = node.stats();
    assert!(!stats[0].read_gate_closed);
    assert!(stats[0].read_gate_closings >= 1 && stats[0].read_gate_held >= 1, "{:?}", stats[0]);
    eprintln!("{written} bytes, backlog max {} (bound {bound}), {:?}", stats[0].mesh_backlog_max, stats[0]);
    drop(s);
    stop(node);
}

macro_rules! backend_tests {
    ($module:ident, $choice:expr) => {
        mod $module {
            use super::*;
            #[test]
            fn echo_many_clients() {
                super::echo_many_clients($choice);
            }
            #[test]
            fn large_write_backpressure() {
                super::large_write_backpressure($choice);
            }
            #[test]
            fn peer_close_reports_closed() {
                super::peer_close_reports_closed($choice);
            }
            #[test]
            fn core_close_flushes_then_eof() {
                super::core_close_flushes_then_eof($choice);
            }
            #[test]
            fn handoff_preserves_bytes() {
                super::handoff_preserves_bytes($choice);
            }
            #[test]
            fn handoff_carries_unsent_output() {
                super::handoff_carries_unsent_output($choice);
            }
            #[test]
            fn close_gives_up_on_stalled_peer() {
                super::close_gives_up_on_stalled_peer($choice);
            }
            #[test]
            fn mesh_tiny_capacity() {
                super::mesh_tiny_capacity($choice);
            }
            #[test]
            fn idle_poll_echo_and_mesh() {
                super::idle_poll_echo_and_mesh($choice);
            }
            #[test]
            fn max_sockets_cap() {
                super::max_sockets_cap($choice);
            }
            #[test]
            fn shutdown_flushes_and_joins() {
                super::shutdown_flushes_and_joins($choice);
            }
            #[test]
            fn pause_blocks_peer_then_delivers_in_order() {
                super::pause_blocks_peer_then_delivers_in_order($choice);
            }
            #[test]
            fn pause_then_peer_close() {
                super::pause_then_peer_close($choice);
            }
            #[test]
            fn close_while_paused() {
                super::close_while_paused($choice);
            }
            #[test]
            fn pause_again_after_quiet_period() {
                super::pause_again_after_quiet_period($choice);
            }
            #[test]
            fn pause_churn_holds_little() {
                super::pause_churn_holds_little($choice);
            }
            #[test]
            fn stalled_peer_bounds_backlog() {
                super::stalled_peer_bounds_backlog($choice);
            }
            #[test]
            fn pause_resume_churn() {
                // Small reads: many more pause/resume cycles per byte.
                super::pause_resume_churn(RuntimeConfig { read_buffer_size: 4096, ..config($choice, 2) });
            }
        }
    };
}

backend_tests!(epoll, BackendChoice::Epoll);
backend_tests!(uring, BackendChoice::Uring);

#[test]
fn uring_survives_provided_buffer_exhaustion() {
    // 4 buffers of 4 KiB for 16 clients sending 32 KiB at once: multishot recvs run dry (ENOBUFS) and must be
    // re-armed as buffers come back, without losing or reordering bytes.
    let cfg = RuntimeConfig { uring_buffers: 4, uring_buffer_size: 4096, ..config(BackendChoice::Uring, 2) };
    let (node, _) = start(cfg, CoreCfg::default());
    let addr = node.local_addrs()[0];
    let handles: Vec<_> = (0..16)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::new(addr);
                for round in 0..4 {
                    let lines: Vec<String> =
                        (0..16).map(|i| format!("{t}-{round}-{i}-{}", "x".repeat(2000))).collect();
                    c.send(&lines.iter().map(|l| format!("{l}\n")).collect::<String>());
                    for l in &lines {
                        let got = c.line();
                        assert_eq!(got.split_once(':').unwrap().1, l);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    stop(node);
}

#[test]
fn uring_pause_churn_with_few_provided_buffers() {
    // Paused connections' in-flight completions are stashed while buffers are scarce (ENOBUFS re-arms too).
    let cfg = RuntimeConfig { uring_buffers: 4, uring_buffer_size: 4096, ..config(BackendChoice::Uring, 2) };
    pause_resume_churn(cfg);
}

#[test]
fn explicit_backends_run_what_was_asked() {
    let (node, _) = start(config(BackendChoice::Epoll, 1), CoreCfg::default());
    assert_eq!(node.backend(), Backend::Epoll);
    stop(node);
    let (node, _) = start(config(BackendChoice::Uring, 1), CoreCfg::default());
    assert_eq!(node.backend(), Backend::Uring);
    stop(node);
}

#[test]
fn auto_falls_back_to_epoll_when_uring_setup_fails() {
    // 3 buffers: the kernel refuses a provided-buffer ring that is not a power of two.
    let cfg = RuntimeConfig { uring_buffers: 3, ..config(BackendChoice::Auto, 2) };
    let (node, _) = start(cfg, CoreCfg::default());
    assert_eq!(node.backend(), Backend::Epoll);
    let mut c = Client::new(node.local_addrs()[0]);
    c.send("x\n");
    assert!(c.line().ends_with(":x"));
    stop(node);
}

#[test]
fn forced_uring_reports_setup_failure() {
    let obs = Arc::new(Obs::default());
    let cfg = RuntimeConfig { uring_buffers: 3, ..config(BackendChoice::Uring, 2) };
    let res = runtime::start(cfg, move |me, n| TestCore::new(me, n, obs.clone(), CoreCfg::default()));
    assert!(res.is_err());
}

#[test]
fn pinned_threads_and_second_listener() {
    let mut cfg = config(BackendChoice::Auto, 2);
    cfg.pin_threads = true;
    cfg.listen.push("127.0.0.1:0".parse().unwrap());
    let (node, _) = start(cfg, CoreCfg::default());
    let addrs = node.local_addrs().to_vec();
    assert_eq!(addrs.len(), 2);
    assert!(addrs.iter().all(|a| a.port() != 0));
    for a in addrs {
        let mut c = Client::new(a);
        c.send("p\n");
        assert!(c.line().ends_with(":p"));
    }
    stop(node);
}

#[test]
fn conn_state_is_small() {
    for b in [Backend::Epoll, Backend::Uring] {
        let n = b.conn_state_bytes();
        eprintln!("{b}: {n} bytes of runtime state per connection");
        assert!(n <= 24, "{b}: {n} bytes");
    }
}
