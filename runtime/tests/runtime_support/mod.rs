//! Test cores and client helpers for the runtime tests.
//!
//! [`TestCore`] speaks a line protocol, so a test can drive every runtime path from a plain `TcpStream`:
//! - `WHO` → `{shard}\n`;
//! - `HOP` → hands the connection to the next shard; the bytes after the line travel in the handoff state;
//! - `BIG n` → sends `n` pattern bytes in 256 KiB chunks, pausing while the runtime reports backpressure;
//! - `BYE n` → sends `n` pattern bytes, then asks the runtime to close;
//! - `PANIC` → panics on the shard's thread (the failure tests);
//! - anything else → echoed as `{shard}:{line}\n`.
//!
//! It also sends `mesh_per_target` numbered cross-core messages to every other shard, in bursts from
//! `handle_timeout`, and checks they arrive complete and in order. Everything it observes is counted in
//! [`Obs`].

#![allow(dead_code)]

pub mod pause;
pub mod stall;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_runtime::{BackendChoice, Core, IoCmd, RuntimeConfig};
use shardmq_shard::{ConnId, ShardId};

/// What the cores of one node observed, summed over shards.
#[derive(Default)]
pub struct Obs {
    pub accepts: AtomicU64,
    pub adopts: AtomicU64,
    pub closed: AtomicU64,
    /// `handle_closed` for a connection the core had closed or handed off: must stay 0.
    pub bad_closed: AtomicU64,
    /// `handle_read` for a connection already handed off: must stay 0.
    pub reads_after_handoff: AtomicU64,
    pub bp_true: AtomicU64,
    pub bp_false: AtomicU64,
    pub shutdowns: AtomicU64,
    pub mesh_recv: AtomicU64,
    pub mesh_out_of_order: AtomicU64,
}

impl Obs {
    pub fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Copy, Default)]
pub struct CoreCfg {
    pub mesh_per_target: u64,
    pub mesh_burst: u64,
}

pub struct Hop {
    buf: Vec<u8>,
}

#[derive(Default)]
struct Conn {
    buf: Vec<u8>,
    big_left: usize,
    big_off: usize,
    blocked: bool,
}

pub struct TestCore {
    me: ShardId,
    shards: usize,
    obs: Arc<Obs>,
    cfg: CoreCfg,
    conns: HashMap<ConnId, Conn>,
    gone: HashSet<ConnId>,
    out: HashMap<ConnId, Vec<u8>>,
    io: VecDeque<IoCmd<Hop>>,
    mesh_out: VecDeque<(ShardId, (u16, u64))>,
    mesh_sent: u64,
    mesh_expect: Vec<u64>,
    next_tick: Option<Instant>,
}

pub fn pattern(off: usize, len: usize) -> Vec<u8> {
    (off..off + len).map(|i| (i % 251) as u8).collect()
}

impl TestCore {
    pub fn new(me: ShardId, shards: usize, obs: Arc<Obs>, cfg: CoreCfg) -> Self {
        TestCore {
            me,
            shards,
            obs,
            cfg,
            conns: HashMap::new(),
            gone: HashSet::new(),
            out: HashMap::new(),
            io: VecDeque::new(),
            mesh_out: VecDeque::new(),
            mesh_sent: 0,
            mesh_expect: vec![0; shards],
            next_tick: (cfg.mesh_per_target > 0 && shards > 1).then(Instant::now),
        }
    }

    fn send(&mut self, conn: ConnId, bytes: &[u8]) {
        let q = self.out.entry(conn).or_default();
        if q.is_empty() {
            self.io.push_back(IoCmd::Transmit(conn));
        }
        q.extend_from_slice(bytes);
    }

    fn pump(&mut self, conn: ConnId) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else { return };
            if c.blocked || c.big_left == 0 {
                return;
            }
            let n = c.big_left.min(256 * 1024);
            let chunk = pattern(c.big_off, n);
            c.big_off += n;
            c.big_left -= n;
            self.send(conn, &chunk);
        }
    }

    /// Handles complete lines; stops at a handoff or close.
    fn process(&mut self, conn: ConnId) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else { return };
            let Some(pos) = c.buf.iter().position(|&b| b == b'\n') else { return };
            let line: Vec<u8> = c.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let mut words = line.split_whitespace();
            match (words.next(), words.next().and_then(|n| n.parse::<usize>().ok())) {
                (Some("WHO"), _) => {
                    let reply = format!("{}\n", self.me.0);
                    self.send(conn, reply.as_bytes());
                }
                (Some("HOP"), _) => {
                    let c = self.conns.remove(&conn).expect("present");
                    self.gone.insert(conn);
                    let to = ShardId(((self.me.index() + 1) % self.shards) as u16);
                    self.io.push_back(IoCmd::Handoff { conn, to, state: Hop { buf: c.buf } });
                    return;
                }
                (Some("BIG"), Some(n)) => {
                    c.big_left += n;
                    self.pump(conn);
                }
                (Some("PANIC"), _) => panic!("PANIC requested on shard {}", self.me.0),
                (Some("BYE"), Some(n)) => {
                    self.conns.remove(&conn);
                    self.gone.insert(conn);
                    self.send(conn, &pattern(0, n));
                    self.io.push_back(IoCmd::Close(conn));
                    return;
                }
                _ => {
                    let reply = format!("{}:{}\n", self.me.0, line);
                    self.send(conn, reply.as_bytes());
                }
            }
        }
    }
}

impl Core for TestCore {
    type Mesh = (u16, u64);
    type Handoff = Hop;

    fn handle_accept(&mut self, conn: ConnId, _now: Instant) {
        self.obs.accepts.fetch_add(1, Ordering::SeqCst);
        self.conns.insert(conn, Conn::default());
    }

    fn handle_adopt(&mut self, conn: ConnId, state: Hop, _now: Instant) {
        self.obs.adopts.fetch_add(1, Ordering::SeqCst);
        self.conns.insert(conn, Conn { buf: state.buf, ..Conn::default() });
        self.process(conn);
    }

    fn handle_read(&mut self, conn: ConnId, data: &[u8], _now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            if self.gone.contains(&conn) {
                self.obs.reads_after_handoff.fetch_add(1, Ordering::SeqCst);
            }
            return;
        };
        c.buf.extend_from_slice(data);
        self.process(conn);
    }

    fn handle_closed(&mut self, conn: ConnId, _now: Instant) {
        if self.gone.contains(&conn) || !self.conns.contains_key(&conn) {
            self.obs.bad_closed.fetch_add(1, Ordering::SeqCst);
        }
        self.obs.closed.fetch_add(1, Ordering::SeqCst);
        self.conns.remove(&conn);
        self.out.remove(&conn);
    }

    fn handle_backpressure(&mut self, conn: ConnId, blocked: bool, _now: Instant) {
        let counter = if blocked { &self.obs.bp_true } else { &self.obs.bp_false };
        counter.fetch_add(1, Ordering::SeqCst);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.blocked = blocked;
        }
        if !blocked {
            self.pump(conn);
        }
    }

    fn handle_mesh(&mut self, from: ShardId, msg: (u16, u64), _now: Instant) {
        let expect = &mut self.mesh_expect[from.index()];
        if msg.0 != from.0 || msg.1 != *expect {
            self.obs.mesh_out_of_order.fetch_add(1, Ordering::SeqCst);
        }
        *expect = msg.1 + 1;
        self.obs.mesh_recv.fetch_add(1, Ordering::SeqCst);
    }

    fn handle_timeout(&mut self, now: Instant) {
        let burst = self.cfg.mesh_burst.max(1);
        let end = (self.mesh_sent + burst).min(self.cfg.mesh_per_target);
        for seq in self.mesh_sent..end {
            for t in (0..self.shards).filter(|&t| t != self.me.index()) {
                self.mesh_out.push_back((ShardId(t as u16), (self.me.0, seq)));
            }
        }
        self.mesh_sent = end;
        self.next_tick = (self.mesh_sent < self.cfg.mesh_per_target).then_some(now);
    }

    fn handle_shutdown(&mut self, _now: Instant) {
        self.obs.shutdowns.fetch_add(1, Ordering::SeqCst);
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.send(conn, b"shutdown\n");
            self.io.push_back(IoCmd::Close(conn));
        }
        self.conns.clear();
    }

    fn take_transmit(&mut self, conn: ConnId) -> Vec<u8> {
        self.out.remove(&conn).unwrap_or_default()
    }

    fn poll_io(&mut self) -> Option<IoCmd<Hop>> {
        self.io.pop_front()
    }

    fn poll_mesh(&mut self) -> Option<(ShardId, (u16, u64))> {
        self.mesh_out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }
}

pub fn config(backend: BackendChoice, shards: usize) -> RuntimeConfig {
    RuntimeConfig {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        shards,
        pin_threads: false,
        backend,
        mesh_capacity: 64,
        max_sockets: 10_000,
        close_linger: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(2),
        uring_buffers: 256,
        ..RuntimeConfig::default()
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A line-oriented client.
pub struct Client {
    pub r: BufReader<TcpStream>,
    pub w: TcpStream,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        let s = connect(addr);
        Client { w: s.try_clone().unwrap(), r: BufReader::new(s) }
    }

    pub fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).expect("write");
    }

    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("read line");
        assert!(l.ends_with('\n'), "connection ended early: {l:?}");
        l.pop();
        l
    }

    pub fn who(&mut self) -> u16 {
        self.send("WHO\n");
        self.line().parse().expect("shard id")
    }

    /// Reads exactly `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.r.read_exact(&mut v).expect("read bytes");
        v
    }

    /// Expects end of stream (or a reset) next.
    pub fn expect_eof(&mut self) {
        let mut b = [0u8; 1];
        match self.r.read(&mut b) {
            Ok(0) => {}
            Ok(_) => panic!("expected EOF, got data"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected EOF, got {e}"),
        }
    }
}

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}
