//! Mesh endpoints (`start_with_endpoints`): a thread that is not a shard exchanges mesh messages with the
//! shards through its own `poll(2)` loop on the endpoint's eventfd, run once per backend (`epoll::*`,
//! `uring::*`).

mod runtime_support;

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use runtime_support::config;
use shardmq_runtime::{self as runtime, BackendChoice, Core, IoCmd, MeshEndpoint, Node, RuntimeConfig};
use shardmq_shard::{ConnId, ShardId};

/// Sent by a shard to the endpoint when it accepts a connection; the low bits carry the shard.
const ACCEPT: u64 = 1 << 63;
/// Sent by the endpoint: the shard panics (the failure test).
const PANIC: u64 = 1 << 62;

/// Echoes every mesh message from an endpoint back to it, and tells the endpoint about each accept.
struct EchoCore {
    me: ShardId,
    shards: usize,
    endpoint: ShardId,
    mesh_out: VecDeque<(ShardId, u64)>,
}

impl Core for EchoCore {
    type Mesh = u64;
    type Handoff = ();

    fn handle_accept(&mut self, _conn: ConnId, _now: Instant) {
        self.mesh_out.push_back((self.endpoint, ACCEPT | self.me.0 as u64));
    }
    fn handle_adopt(&mut self, _conn: ConnId, _state: (), _now: Instant) {}
    fn handle_read(&mut self, _conn: ConnId, _data: &[u8], _now: Instant) {}
    fn handle_closed(&mut self, _conn: ConnId, _now: Instant) {}
    fn handle_backpressure(&mut self, _conn: ConnId, _blocked: bool, _now: Instant) {}

    fn handle_mesh(&mut self, from: ShardId, msg: u64, _now: Instant) {
        if msg == PANIC {
            panic!("PANIC requested on shard {}", self.me.0);
        }
        // Only endpoints are echoed; shards do not talk to each other in these tests.
        if from.index() >= self.shards {
            self.mesh_out.push_back((from, msg));
        }
    }

    fn handle_timeout(&mut self, _now: Instant) {}
    fn handle_shutdown(&mut self, _now: Instant) {}
    fn take_transmit(&mut self, _conn: ConnId) -> Vec<u8> {
        Vec::new()
    }
    fn poll_io(&mut self) -> Option<IoCmd<()>> {
        None
    }
    fn poll_mesh(&mut self) -> Option<(ShardId, u64)> {
        self.mesh_out.pop_front()
    }
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}

fn start(b: BackendChoice, shards: usize, mesh_capacity: usize) -> (Node, MeshEndpoint<u64>) {
    let cfg = RuntimeConfig { endpoints: 1, mesh_capacity, ..config(b, shards) };
    let endpoint = ShardId(shards as u16);
    let (node, mut eps) = runtime::start_with_endpoints(cfg, move |me, n| {
        assert_eq!(n, shards, "cores are told the number of shards, not of mesh members");
        EchoCore { me, shards: n, endpoint, mesh_out: VecDeque::new() }
    })
    .expect("start");
    assert_eq!(eps.len(), 1);
    let ep = eps.pop().expect("one endpoint");
    assert_eq!(ep.id(), endpoint);
    assert_eq!(ep.shards(), shards);
    (node, ep)
}

/// Waits up to `timeout` for `fd` to be readable.
fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    assert!(n >= 0, "poll: {}", io::Error::last_os_error());
    n > 0 && p.revents & libc::POLLIN != 0
}

/// What the endpoint thread saw.
#[derive(Default)]
struct Seen {
    /// Per shard: the next echo expected.
    next: Vec<u64>,
    /// Echoes that were not the next expected one (lost, duplicated or reordered): must stay 0.
    bad: u64,
    /// Shards that reported an accept.
    accepts: Vec<u16>,
}

impl Seen {
    fn take(&mut self, shards: usize, from: ShardId, m: u64) {
        if m & ACCEPT != 0 {
            assert_eq!((m & !ACCEPT) as u16, from.0, "accept announced for another shard");
            self.accepts.push(from.0);
        } else if from.index() >= shards || m != self.next[from.index()] {
            self.bad += 1;
        } else {
            self.next[from.index()] += 1;
        }
    }
}

/// Sends `n` numbered messages to every shard and takes their echoes (and `accepts` accept reports), the
/// way a gateway's loop would: produce while the backlog allows, flush, wait on the eventfd (1 ms while a
/// backlog of its own remains), receive.
fn flood(ep: &mut MeshEndpoint<u64>, n: u64, accepts: usize) -> Seen {
    let shards = ep.shards();
    let mut seen = Seen { next: vec![0; shards], ..Seen::default() };
    let mut sent = vec![0u64; shards];
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.next.iter().any(|&e| e < n) || seen.accepts.len() < accepts {
        assert!(Instant::now() < deadline, "flood did not finish: {:?} of {n} echoes", seen.next);
        // Small flushes, so several batches per target are in flight and the tiny inboxes fill up.
        for _ in 0..8 {
            if ep.backlog() >= 4096 {
                break;
            }
            for (s, sent) in sent.iter_mut().enumerate() {
                let end = (*sent + 64).min(n);
                for seq in *sent..end {
                    ep.send(ShardId(s as u16), seq);
                }
                *sent = end;
            }
            ep.flush();
        }
        let own_backlog = ep.flush();
        let done_sending = sent.iter().all(|&s| s == n);
        let wait = if own_backlog || (!done_sending && ep.backlog() < 4096) {
            Duration::from_millis(1)
        } else {
            Duration::from_secs(5)
        };
        let woken = readable(ep.wake_fd(), wait);
        // Nothing of its own to retry: what it waits for are echoes, and each must signal the eventfd.
        assert!(woken || wait < Duration::from_secs(1), "lost wakeup: echoes {:?} of {n}", seen.next);
        ep.recv(|from, m| seen.take(shards, from, m));
        assert_eq!(seen.bad, 0, "echoes out of order");
    }
    seen
}

fn echo_through_tiny_inboxes(b: BackendChoice) {
    let shards = 3;
    let (node, mut ep) = start(b, shards, 2);
    assert!(!readable(ep.wake_fd(), Duration::ZERO), "{b:?}: woken before anything was sent");

    // The endpoint's own inbox fills up: four echo batches, 30 ms apart, into room for two, without a
    // `recv`. Shard 0 keeps the rest in its backlog and is woken once the endpoint drains.
    for seq in 0..4 {
        ep.send(ShardId(0), seq);
        assert!(!ep.flush(), "{b:?}: shard 0's inbox is drained between sends");
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(node.stats()[0].mesh_full_retries >= 1, "{b:?}: the endpoint's inbox never was full");
    let mut seen = Seen { next: vec![0; shards], ..Seen::default() };
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.next[0] < 4 {
        assert!(
            readable(ep.wake_fd(), deadline - Instant::now()),
            "{b:?}: echoes stopped at {:?}",
            seen.next
        );
        ep.recv(|from, m| seen.take(shards, from, m));
    }
    assert_eq!((seen.next[0], seen.bad), (4, 0), "{b:?}");

    // The flood, from a thread of its own (an endpoint is Send), while clients connect: accepts reach it.
    let n = 100_000;
    let addr = node.local_addrs()[0];
    let flooder = std::thread::spawn(move || {
        let seen = flood(&mut ep, n, 3);
        (ep, seen)
    });
    let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    let (mut ep, seen) = flooder.join().expect("flood");
    assert_eq!(seen.next, vec![n; shards], "{b:?}");
    assert_eq!(seen.accepts.len(), 3, "{b:?}: accepts {:?}", seen.accepts);
    assert!(seen.accepts.iter().all(|&s| (s as usize) < shards));

    // Nothing more: every echo came exactly once.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ep.recv(|from, m| panic!("extra message {m} from {from:?}")), 0, "{b:?}");
    assert!(!readable(ep.wake_fd(), Duration::ZERO), "{b:?}: readable with nothing sent");
    let st = ep.stats();
    assert_eq!(st.mesh_sent, 4 + n * shards as u64, "{b:?}: {st:?}");
    assert_eq!(st.mesh_received, 4 + n * shards as u64 + 3, "{b:?}: {st:?}");
    assert_eq!((st.unknown_target, st.handoffs_dropped), (0, 0), "{b:?}: {st:?}");
    assert_eq!(ep.backlog(), 0, "{b:?}");
    assert!(node.stats().iter().all(|s| s.misaddressed_handoffs == 0));
    // Small flushes into inboxes of two batches: the endpoint's backlog was used (thousands of times).
    assert!(st.mesh_full_retries > 0, "{b:?}: the shards' inboxes never were full: {st:?}");

    // Shutdown wakes the endpoint's thread.
    assert!(!ep.shutting_down());
    let t = Instant::now();
    node.shutdown();
    assert!(readable(ep.wake_fd(), Duration::from_secs(2)), "{b:?}: shutdown did not wake the endpoint");
    assert!(ep.shutting_down(), "{b:?}");
    node.join().expect("join");
    assert!(t.elapsed() < Duration::from_secs(4), "{b:?}: shutdown took {:?}", t.elapsed());
    // Shards are gone: what it sends now is dropped, not kept forever.
    ep.send(ShardId(0), 1);
    assert!(!ep.flush(), "{b:?}");
    drop(clients);
}

fn failed_shard_wakes_endpoint(b: BackendChoice) {
    let (node, mut ep) = start(b, 2, 8);
    ep.send(ShardId(1), PANIC);
    assert!(!ep.flush());
    assert!(readable(ep.wake_fd(), Duration::from_secs(5)), "{b:?}: the failure did not wake the endpoint");
    assert!(ep.shutting_down(), "{b:?}");
    assert_eq!(node.failure().map(|f| f.shard), Some(ShardId(1)), "{b:?}");
    assert!(node.join().is_err(), "{b:?}: join hid the panic");
}

fn dropped_endpoint_does_not_hold_shards_back(b: BackendChoice) {
    // A gate limit so small that echoes nobody consumes would close shard 0's read gate for good.
    let cfg = RuntimeConfig { endpoints: 1, mesh_capacity: 4, mesh_backlog_limit: 8, ..config(b, 1) };
    let (node, mut eps) = runtime::start_with_endpoints(cfg, |me, n| EchoCore {
        me,
        shards: n,
        endpoint: ShardId(1),
        mesh_out: VecDeque::new(),
    })
    .expect("start");
    let mut ep = eps.pop().expect("endpoint");
    for seq in 0..64 {
        ep.send(ShardId(0), seq);
    }
    assert!(!ep.flush());
    assert!(readable(ep.wake_fd(), Duration::from_secs(5)), "{b:?}: no echo");
    let closed = runtime_support::wait_until(Duration::from_secs(2), || node.stats()[0].read_gate_closed);
    assert!(closed, "{b:?}: unconsumed echoes did not close the gate: {:?}", node.stats()[0]);
    drop(ep);
    // The echoes left in the dropped endpoint's inbox no longer count against shard 0: its gate opens.
    let open = runtime_support::wait_until(Duration::from_secs(2), || !node.stats()[0].read_gate_closed);
    assert!(open, "{b:?}: {:?}", node.stats()[0]);
    node.shutdown();
    node.join().expect("join");
}

macro_rules! backend_tests {
    ($name:ident, $choice:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn echo_through_tiny_inboxes() {
                super::echo_through_tiny_inboxes($choice);
            }
            #[test]
            fn failed_shard_wakes_endpoint() {
                super::failed_shard_wakes_endpoint($choice);
            }
            #[test]
            fn dropped_endpoint_does_not_hold_shards_back() {
                super::dropped_endpoint_does_not_hold_shards_back($choice);
            }
        }
    };
}

backend_tests!(epoll, BackendChoice::Epoll);
backend_tests!(uring, BackendChoice::Uring);

#[test]
fn plain_start_refuses_endpoints() {
    let cfg = RuntimeConfig { endpoints: 1, ..config(BackendChoice::Epoll, 1) };
    let res =
        runtime::start(cfg, |me, n| EchoCore { me, shards: n, endpoint: me, mesh_out: VecDeque::new() });
    assert_eq!(res.err().map(|e| e.kind()), Some(io::ErrorKind::InvalidInput));
    let too_many = RuntimeConfig { endpoints: u16::MAX as usize, ..config(BackendChoice::Epoll, 1) };
    let res = runtime::start_with_endpoints(too_many, |me, n| EchoCore {
        me,
        shards: n,
        endpoint: me,
        mesh_out: VecDeque::new(),
    });
    assert_eq!(res.err().map(|e| e.kind()), Some(io::ErrorKind::InvalidInput));
    // No endpoints: a plain node and an empty list.
    let (node, eps) = runtime::start_with_endpoints(config(BackendChoice::Epoll, 1), |me, n| EchoCore {
        me,
        shards: n,
        endpoint: me,
        mesh_out: VecDeque::new(),
    })
    .expect("start");
    assert!(eps.is_empty());
    node.shutdown();
    node.join().expect("join");
}
