//! The deterministic harness: several real `Shard` cores wired together by a simulated runtime that moves
//! bytes, mesh messages and handed-off connections, with a virtual clock. No sockets, no threads.
//!
//! `fuzz/fuzz_targets/core.rs` includes this file by path: it may use only the crate's public API.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_wire::{
    decode, encode, Connect, Packet, PacketId, Properties, Protocol, Publish, QoS, ReasonCode, SubOptions,
    Subscribe,
};

use crate::core::*;
use crate::io::{Core, IoCmd};
use crate::{ConnId, ShardId};

pub(super) struct Client {
    pub(super) shard: ShardId,
    pub(super) conn: ConnId,
    pub(super) protocol: Protocol,
    pub(super) rx: Vec<u8>,
    pub(super) closed: bool,
    /// The core paused reading: what the client sends waits here, as in a socket buffer.
    pub(super) paused: bool,
    pub(super) unread: Vec<u8>,
}

pub(super) struct Sim {
    pub(super) shards: Vec<Shard>,
    pub(super) clients: Vec<Client>,
    pub(super) now: Instant,
    started: Instant,
    pub(super) next_conn: u64,
    /// In-flight mesh messages, one FIFO per (from, to) pair at `from * n + to`: the runtime's channels
    /// keep order only per pair, so `run` picks which pair delivers next with `rng`.
    mesh: Vec<VecDeque<Mesh>>,
    /// When false, `run` leaves mesh messages queued (to observe barriers).
    pub(super) deliver_mesh: bool,
    /// Decides every interleaving choice of `run`; seeded, so a failure replays exactly.
    rng: SplitMix64,
    pub(super) seed: u64,
    cfg: Arc<Config>,
    /// The data directory of a durable node (`None`: in memory).
    pub(super) data: Option<(tempfile::TempDir, StorageConfig)>,
    /// What the shards sent to the cluster gateway (mesh id `n`, with `Config::cluster_gateway`): the
    /// test plays the gateway.
    pub(super) to_gateway: VecDeque<(ShardId, Mesh)>,
    /// What the shards of the current boot share (reloads go through it).
    pub(super) node: Arc<NodeShared>,
    /// The test's gateway grants every registration at once (a zone without other nodes); when false,
    /// `Mesh::Register` waits in `to_gateway` for the test to answer.
    pub(super) auto_register: bool,
}

pub(super) type C = usize;

impl Sim {
    pub(super) fn new(n: u16) -> Sim {
        Sim::with(n, Config::default())
    }

    /// With the seed of `SHARDMQ_SIM_SEED` if set (to replay any test under another interleaving), else
    /// [`DEFAULT_SEED`].
    pub(super) fn with(n: u16, cfg: Config) -> Sim {
        Sim::with_seed(n, cfg, env_seed().unwrap_or(DEFAULT_SEED))
    }

    pub(super) fn with_seed(n: u16, cfg: Config, seed: u64) -> Sim {
        let cfg = Arc::new(cfg);
        let node = Arc::new(NodeShared::new(n));
        let now = Instant::now();
        Sim {
            shards: (0..n).map(|i| Shard::new(ShardId(i), n, cfg.clone(), node.clone())).collect(),
            clients: Vec::new(),
            now,
            started: now,
            next_conn: 1,
            mesh: (0..n as usize * n as usize).map(|_| VecDeque::new()).collect(),
            deliver_mesh: true,
            rng: SplitMix64(seed),
            seed,
            cfg,
            data: None,
            to_gateway: VecDeque::new(),
            node,
            auto_register: true,
        }
    }

    /// A node whose shards keep their state in logs under a temporary directory (`--fsync always`).
    pub(super) fn durable(n: u16, cfg: Config) -> Sim {
        Sim::durable_with_seed(n, cfg, env_seed().unwrap_or(DEFAULT_SEED))
    }

    pub(super) fn durable_with_seed(n: u16, cfg: Config, seed: u64) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let sc = StorageConfig {
            dir: dir.path().join("data"),
            fsync: shardmq_storage::FsyncPolicy::Always,
            segment_bytes: 64 * 1024,
        };
        let mut sim = Sim::with_seed(n, cfg, seed);
        sim.data = Some((dir, sc));
        sim.boot(n);
        sim
    }

    /// Replaces the shards with fresh ones restored from the data directory.
    fn boot(&mut self, n: u16) {
        let node = Arc::new(NodeShared::new(n));
        let (_, sc) = self.data.as_ref().expect("a durable sim");
        let clock = WallClock { base: self.now, base_unix_ms: 1_800_000_000_000 + self.elapsed_ms() };
        let boots = open_node(sc, n, clock).expect("the data directory opens");
        self.node = node.clone();
        self.shards = boots
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let mut s = Shard::new(ShardId(i as u16), n, self.cfg.clone(), node.clone());
                s.restore(b, self.now);
                s
            })
            .collect();
    }

    fn elapsed_ms(&self) -> u64 {
        self.now.duration_since(self.started).as_millis() as u64
    }

    /// The configuration the shards of the next boot start with (as if the operator changed flags).
    pub(super) fn set_config(&mut self, cfg: Config) {
        self.cfg = Arc::new(cfg);
    }

    /// The process dies: every connection and every byte in flight between shards is lost, the logs
    /// stay as they are (their pages survive a process crash), and a new process starts on them.
    pub(super) fn crash_and_restart(&mut self) {
        self.crash_and_restart_after(Duration::ZERO);
    }

    /// A crash, and `downtime` before the new process starts (no timer of the old one fires meanwhile).
    pub(super) fn crash_and_restart_after(&mut self, downtime: Duration) {
        self.crash_and_boot_after(downtime);
        // The runtime's first loop iteration handles what fell due while the node was down.
        for s in &mut self.shards {
            s.handle_timeout(self.now);
        }
        self.run();
    }

    /// A crash and a restart whose shards have not yet run their first timer pass (the runtime serves
    /// handed-off connections before it).
    pub(super) fn crash_and_boot_after(&mut self, downtime: Duration) {
        self.now += downtime;
        for c in &mut self.clients {
            c.closed = true;
        }
        self.mesh.iter_mut().for_each(VecDeque::clear);
        let n = self.shards.len() as u16;
        self.shards.clear(); // drops the logs (and their locks) without a final flush
        self.boot(n);
    }

    /// Opens a TCP-level connection on `shard`.
    pub(super) fn open(&mut self, shard: u16, protocol: Protocol) -> C {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.shards[shard as usize].handle_accept(conn, self.now);
        self.clients.push(Client {
            shard: ShardId(shard),
            conn,
            protocol,
            rx: Vec::new(),
            closed: false,
            paused: false,
            unread: Vec::new(),
        });
        self.run();
        self.clients.len() - 1
    }

    pub(super) fn connect_with<'a>(
        &mut self,
        shard: u16,
        protocol: Protocol,
        f: impl FnOnce(&mut Connect<'a>),
    ) -> C {
        let c = self.open(shard, protocol);
        let mut connect = Connect {
            protocol,
            clean_start: true,
            keep_alive_s: 0,
            client_id: "",
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        f(&mut connect);
        self.send(c, &Packet::Connect(connect));
        c
    }

    /// Connects and consumes the CONNACK, asserting success; returns (client, session present).
    pub(super) fn connect(&mut self, shard: u16, protocol: Protocol, id: &str, clean: bool) -> (C, bool) {
        let c = self.connect_with(shard, protocol, |k| {
            k.client_id = id;
            k.clean_start = clean;
            if protocol.is_v5() && !clean {
                k.properties.session_expiry_interval_s = Some(3600);
            }
        });
        let present = self.pop_connack(c);
        (c, present)
    }

    /// Pops a CONNACK, asserting success; returns session present.
    pub(super) fn pop_connack(&mut self, c: C) -> bool {
        self.pop(c, |p| match p {
            Packet::ConnAck(a) => {
                assert_eq!(a.reason, ReasonCode::SUCCESS);
                a.session_present
            }
            other => panic!("expected CONNACK, got {other:?}"),
        })
    }

    pub(super) fn send_bytes(&mut self, c: C, bytes: &[u8]) {
        let cl = &mut self.clients[c];
        assert!(!cl.closed, "client {c} is closed");
        if cl.paused {
            cl.unread.extend_from_slice(bytes);
            return;
        }
        let (shard, conn) = (cl.shard, cl.conn);
        self.shards[shard.index()].handle_read(conn, bytes, self.now);
        self.run();
    }

    pub(super) fn send(&mut self, c: C, p: &Packet<'_>) {
        let mut buf = Vec::new();
        encode(p, self.clients[c].protocol, &mut buf).unwrap();
        self.send_bytes(c, &buf);
    }

    pub(super) fn publish(&mut self, c: C, topic: &str, payload: &[u8], qos: QoS, retain: bool, pid: u16) {
        let p = Publish {
            dup: false,
            qos,
            retain,
            topic,
            packet_id: (qos != QoS::AtMostOnce).then_some(PacketId(pid)),
            payload,
            properties: Properties::default(),
        };
        self.send(c, &Packet::Publish(p));
    }

    pub(super) fn subscribe(&mut self, c: C, filter: &str, qos: QoS) {
        self.subscribe_opts(c, filter, SubOptions { qos, ..Default::default() }, None);
        self.pop(c, |p| assert!(matches!(p, Packet::SubAck(_)), "expected SUBACK, got {p:?}"));
    }

    pub(super) fn subscribe_opts(&mut self, c: C, filter: &str, opts: SubOptions, sub_id: Option<u32>) {
        let mut properties = Properties::default();
        properties.subscription_identifiers.extend(sub_id);
        let s = Subscribe { packet_id: PacketId(99), filters: vec![(filter, opts)], properties };
        self.send(c, &Packet::Subscribe(s));
    }

    /// Messages queued between shards and not delivered yet.
    pub(super) fn mesh_in_flight(&self) -> usize {
        self.mesh.iter().map(VecDeque::len).sum()
    }

    /// Drives every core until nothing moves. Each step, chosen at random: one shard runs a loop iteration
    /// of its runtime (group commit, then drains its I/O commands and outgoing mesh messages), or one
    /// (from, to) pair delivers its oldest message. So messages of different pairs, and a shard's output
    /// and its input, interleave in any order the real runtime allows.
    pub(super) fn run(&mut self) {
        let n = self.shards.len();
        // Shards that may have output: every shard was just given input by the caller (or nothing).
        let mut dirty = vec![true; n];
        let mut choices = Vec::with_capacity(n + n * n);
        loop {
            choices.clear();
            choices.extend((0..n).filter(|&s| dirty[s]).map(Step::Shard));
            if self.deliver_mesh {
                choices.extend((0..n * n).filter(|&p| !self.mesh[p].is_empty()).map(Step::Pair));
            }
            if choices.is_empty() {
                break;
            }
            match choices[self.rng.below(choices.len())] {
                Step::Shard(s) => {
                    // As the runtime does once per loop iteration: group commit, release what waited on it.
                    self.shards[s].handle_commit(self.now);
                    let mut progressed = false;
                    while let Some(cmd) = self.shards[s].poll_io() {
                        progressed = true;
                        if let Some(touched) = self.io(ShardId(s as u16), cmd) {
                            dirty[touched.index()] = true;
                        }
                    }
                    while let Some((to, m)) = self.shards[s].poll_mesh() {
                        progressed = true;
                        if let (true, true, Mesh::Register { token, .. }) =
                            (to.index() == n, self.auto_register, &m)
                        {
                            let outcome = RegisterOutcome::Granted {
                                session: None,
                                registration: ZoneRegistration { epoch: 1, stamp: 1 },
                            };
                            let answer = Mesh::Registered { token: *token, outcome };
                            self.shards[s].handle_mesh(to, answer, self.now);
                        } else if to.index() == n {
                            self.to_gateway.push_back((ShardId(s as u16), m));
                        } else {
                            self.mesh[s * n + to.index()].push_back(m);
                        }
                    }
                    // A step that moved something may have more to move (a resumed read fed it input); one
                    // that did not leaves the shard idle until new input.
                    dirty[s] = progressed;
                }
                Step::Pair(p) => {
                    let (from, to) = (p / n, p % n);
                    let m = self.mesh[p].pop_front().expect("a non-empty pair");
                    self.shards[to].handle_mesh(ShardId(from as u16), m, self.now);
                    dirty[to] = true;
                }
            }
        }
    }

    /// A message from the cluster gateway to `shard`, handled at once; then the node runs.
    pub(super) fn gateway_sends(&mut self, shard: u16, m: Mesh) {
        let gw = ShardId(self.shards.len() as u16);
        self.shards[shard as usize].handle_mesh(gw, m, self.now);
        self.run();
    }

    /// Carries out one I/O command; returns the shard it gave input to, if any.
    pub(super) fn io(&mut self, shard: ShardId, cmd: IoCmd<Handoff>) -> Option<ShardId> {
        let find = |clients: &Vec<Client>, conn: ConnId| {
            clients.iter().position(|c| c.shard == shard && c.conn == conn && !c.closed)
        };
        match cmd {
            IoCmd::Transmit(conn) => {
                let bytes = self.shards[shard.index()].take_transmit(conn);
                if let Some(i) = find(&self.clients, conn) {
                    self.clients[i].rx.extend_from_slice(&bytes);
                }
            }
            IoCmd::Close(conn) => {
                let bytes = self.shards[shard.index()].take_transmit(conn);
                if let Some(i) = find(&self.clients, conn) {
                    self.clients[i].rx.extend_from_slice(&bytes);
                    self.clients[i].closed = true;
                }
            }
            IoCmd::PauseRead(conn) => {
                if let Some(i) = find(&self.clients, conn) {
                    self.clients[i].paused = true;
                }
            }
            IoCmd::ResumeRead(conn) => {
                if let Some(i) = find(&self.clients, conn) {
                    self.clients[i].paused = false;
                    let unread = std::mem::take(&mut self.clients[i].unread);
                    if !unread.is_empty() {
                        self.shards[shard.index()].handle_read(conn, &unread, self.now);
                        return Some(shard);
                    }
                }
            }
            IoCmd::Handoff { conn, to, state } => {
                let i = find(&self.clients, conn).expect("handoff of an unknown connection");
                let new = ConnId(self.next_conn);
                self.next_conn += 1;
                self.clients[i].shard = to;
                self.clients[i].conn = new;
                self.shards[to.index()].handle_adopt(new, state, self.now);
                return Some(to);
            }
        }
        None
    }

    /// Pops the next packet the client received and hands it to `f`.
    pub(super) fn pop<R>(&mut self, c: C, f: impl FnOnce(&Packet<'_>) -> R) -> R {
        let cl = &mut self.clients[c];
        let (pkt, n) = decode(&cl.rx, Some(cl.protocol), u32::MAX)
            .expect("broker sent a malformed packet")
            .unwrap_or_else(|| panic!("client {c} has no packet (closed: {})", cl.closed));
        let r = f(&pkt);
        cl.rx.drain(..n);
        r
    }

    pub(super) fn has_packet(&self, c: C) -> bool {
        !self.clients[c].rx.is_empty()
    }

    /// Pops a PUBLISH: (topic, payload, qos, retain, dup, packet id, properties debug).
    pub(super) fn pop_publish(&mut self, c: C) -> (String, Vec<u8>, QoS, bool, bool, Option<u16>) {
        self.pop(c, |p| match p {
            Packet::Publish(p) => {
                (p.topic.to_string(), p.payload.to_vec(), p.qos, p.retain, p.dup, p.packet_id.map(|i| i.0))
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        })
    }

    pub(super) fn drop_conn(&mut self, c: C) {
        let cl = &mut self.clients[c];
        cl.closed = true;
        let (shard, conn) = (cl.shard, cl.conn);
        self.shards[shard.index()].handle_closed(conn, self.now);
        self.run();
    }

    pub(super) fn advance(&mut self, d: Duration) {
        self.now += d;
        for s in &mut self.shards {
            s.handle_timeout(self.now);
        }
        self.run();
    }
}

impl Drop for Sim {
    /// A failing test names the seed that replays it.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("sim seed {} (replay with SHARDMQ_SIM_SEED={})", self.seed, self.seed);
        }
    }
}

#[derive(Clone, Copy)]
enum Step {
    Shard(usize),
    Pair(usize),
}

/// The seed of `Sim::new`/`with`/`durable` unless `SHARDMQ_SIM_SEED` is set.
pub(super) const DEFAULT_SEED: u64 = 0x5eed;

fn env_seed() -> Option<u64> {
    let v = std::env::var("SHARDMQ_SIM_SEED").ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("SHARDMQ_SIM_SEED={v:?} is not a u64")))
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, seedable, and good enough to pick interleavings.
#[derive(Clone)]
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` (n > 0) for test scheduling; the modulo bias is below 2^-50 here.
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A client id owned by `shard` of `n`.
pub(super) fn id_on(shard: u16, n: u16, prefix: &str) -> String {
    (0..).map(|i| format!("{prefix}-{i}")).find(|id| owner_of(id, n) == ShardId(shard)).unwrap()
}

pub(super) const V3: Protocol = Protocol::V311;
pub(super) const V5: Protocol = Protocol::V5;
