//! Whole nodes in one process: each node is S real `Shard` cores (in memory) and its cluster `Gateway`
//! with its `Zone`, the shards and the gateway exchanging mesh messages through one FIFO per (from, to)
//! pair (all the runtime guarantees) delivered in a random interleaving, the zones over the simulated
//! network of `support` (datagram loss, per-link delays, partitions, crashes and restarts), on a
//! virtual clock. MQTT clients are simulated connections on a shard: they encode packets with
//! `shardmq_wire`, decode what the shard sends and acknowledge QoS 1/2 as a real client does.
//!
//! Everything random comes from one seed; a failure prints it: `SHARDMQ_SIM_SEED=<seed> cargo test -p
//! shardmq-cluster --test node_sim` replays it exactly. `SHARDMQ_SIM_SEEDS=a..b` runs the ignored
//! `many_seeds` test over a range (what `scripts/sim` does).
//!
//! The invariants (checked at quiescence, per scenario): membership and links converge; a subscriber
//! whose SUBACK arrived before a publish gets it exactly once (and nobody gets a message twice, or one
//! no subscription of theirs matches); a shared group's message reaches exactly one member zone-wide,
//! spread by member count; retained messages converge to the same value on every shard of every node;
//! after a crash or a partition the others keep delivering among themselves, publishers are
//! acknowledged, every forward is received or counted, and the node comes back.

mod support;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_cluster::gateway::{Gateway, GatewayConfig, GatewayCounters};
use shardmq_cluster::{MembershipConfig, NodeIdentity, Zone, ZoneConfig, ZoneCounters};
use shardmq_shard::core::{open_node, owner_of, Config, Mesh, NodeShared, Shard, StorageConfig, WallClock};
use shardmq_shard::io::{Core, IoCmd};
use shardmq_shard::{ConnId, ShardId};
use shardmq_storage::FsyncPolicy;
use shardmq_wire::{
    decode, encode, Ack, Connect, Packet, PacketId, Properties, Protocol, Publish, QoS, ReasonCode,
    SubOptions, Subscribe, Will,
};

use support::{addr, name, Hosts, Rng, Wire};

/// Index of a client in `Nodes::clients`.
type C = usize;

/// A simulated MQTT 5 client, connected to one shard of one node's life.
struct Client {
    node: usize,
    life: u64,
    shard: u16,
    conn: ConnId,
    rx: Vec<u8>,
    /// Packets the client has to send (acknowledgements), sent when the interleaving picks it.
    outbox: VecDeque<Vec<u8>>,
    closed: bool,
    /// The shard paused reading: what the client sends waits here, as in a socket buffer.
    paused: bool,
    unread: Vec<u8>,
    connacked: bool,
    /// SUBACKs received: packet id → when.
    subacks: BTreeMap<u16, Duration>,
    /// Acknowledgements of its own QoS 1/2 publishes (PUBACK, PUBCOMP): packet id → when.
    acked: BTreeMap<u16, Duration>,
    /// Every PUBLISH received: (topic, payload, qos, retain).
    got: Vec<(String, Vec<u8>, QoS, bool)>,
    next_pid: u16,
    /// The reason of a DISCONNECT the broker sent.
    disconnected: Option<ReasonCode>,
    /// What its CONNACK said.
    session_present: bool,
}

struct Node {
    life: u64,
    /// A durable node's data directory (its shards' logs); a crash deletes it: all state is lost.
    _data: Option<tempfile::TempDir>,
    shards: Vec<Shard>,
    gateway: Gateway,
    /// Mesh messages in flight, one FIFO per (from, to) at `from * (S + 1) + to`; endpoint S is the
    /// gateway.
    mesh: Vec<VecDeque<Mesh>>,
}

impl Node {
    fn endpoints(&self) -> usize {
        self.shards.len() + 1
    }

    /// The earliest deadline of its shards, gateway and zone.
    fn next_timer(&mut self) -> Option<Instant> {
        let shards = self.shards.iter().filter_map(|s| s.poll_timeout()).min();
        [shards, self.gateway.poll_timeout(), self.gateway.zone_mut().poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }
}

#[derive(Clone, Copy)]
enum Step {
    Endpoint(usize),
    Pair(usize),
    Client(C),
}

/// Every node, every client, and the interleaving choices inside nodes.
struct Nodes {
    nodes: Vec<Option<Node>>,
    clients: Vec<Client>,
    rng: Rng,
    next_conn: u64,
    /// Counters of the nodes' past lives (a crash loses the node, not what the test saw it count).
    past: Vec<(GatewayCounters, ZoneCounters)>,
    /// Frames the nodes that crashed had sent and their peers had not acknowledged: lost with them.
    lost_in_crashes: u64,
}

impl Hosts for Nodes {
    fn life(&self, slot: usize) -> Option<u64> {
        self.nodes[slot].as_ref().map(|n| n.life)
    }

    fn zone(&mut self, slot: usize) -> &mut Zone {
        self.nodes[slot].as_mut().expect("a live node").gateway.zone_mut()
    }

    fn settle(&mut self, slot: usize, wire: &mut Wire) {
        self.run_node(slot, wire, None);
    }
}

impl Nodes {
    /// Runs node `slot` until nothing moves inside it. Each step, chosen at random: one endpoint runs a
    /// loop iteration of its runtime (a shard: group commit, I/O commands, outgoing mesh messages; the
    /// gateway: zone events, what the zone sends goes on the wire, outgoing mesh messages), or one
    /// (from, to) pair delivers its oldest message, or a client sends what it has to. `dirty`: the
    /// endpoints given input (all, when `None`).
    fn run_node(&mut self, slot: usize, wire: &mut Wire, dirty: Option<usize>) {
        let now = wire.now;
        let lives: Vec<Option<u64>> = (0..self.nodes.len()).map(|s| self.life(s)).collect();
        let Some(node) = self.nodes[slot].as_mut() else { return };
        let life = node.life;
        let e = node.endpoints();
        let gw = e - 1;
        let mut dirty: Vec<bool> = (0..e).map(|i| dirty.is_none_or(|d| d == i)).collect();
        let mut choices = Vec::new();
        for step in 0.. {
            assert!(step < 10_000_000, "node {slot} never settles");
            let node = self.nodes[slot].as_mut().expect("live");
            choices.clear();
            choices.extend((0..e).filter(|&i| dirty[i]).map(Step::Endpoint));
            choices.extend((0..e * e).filter(|&p| !node.mesh[p].is_empty()).map(Step::Pair));
            choices.extend(
                (0..self.clients.len())
                    .filter(|&c| {
                        let cl = &self.clients[c];
                        cl.node == slot && cl.life == life && !cl.closed && !cl.outbox.is_empty()
                    })
                    .map(Step::Client),
            );
            if choices.is_empty() {
                break;
            }
            match choices[self.rng.below(choices.len() as u64) as usize] {
                Step::Endpoint(i) if i == gw => {
                    node.gateway.drive(now);
                    wire.collect(slot, life, node.gateway.zone_mut(), &lives);
                    while let Some((to, m)) = node.gateway.poll_mesh() {
                        node.mesh[gw * e + to.index()].push_back(m);
                    }
                    dirty[gw] = false;
                }
                Step::Endpoint(s) => {
                    node.shards[s].handle_commit(now);
                    let mut progressed = false;
                    while let Some(cmd) = node.shards[s].poll_io() {
                        progressed = true;
                        let shard = &mut node.shards[s];
                        io(&mut self.clients, shard, slot, life, s as u16, cmd, wire.elapsed());
                    }
                    while let Some((to, m)) = node.shards[s].poll_mesh() {
                        progressed = true;
                        node.mesh[s * e + to.index()].push_back(m);
                    }
                    dirty[s] = progressed;
                }
                Step::Pair(p) => {
                    let (from, to) = (p / e, p % e);
                    let m = node.mesh[p].pop_front().expect("non-empty");
                    if to == gw {
                        node.gateway.handle_mesh(ShardId(from as u16), m, now);
                    } else {
                        node.shards[to].handle_mesh(ShardId(from as u16), m, now);
                    }
                    dirty[to] = true;
                }
                Step::Client(c) => {
                    let bytes = self.clients[c].outbox.pop_front().expect("non-empty");
                    let cl = &mut self.clients[c];
                    if cl.paused {
                        cl.unread.extend_from_slice(&bytes);
                    } else {
                        node.shards[cl.shard as usize].handle_read(cl.conn, &bytes, now);
                        dirty[cl.shard as usize] = true;
                    }
                }
            }
        }
    }
}

/// Carries out a shard's I/O command for its clients, which read and answer what they got.
fn io(
    clients: &mut [Client],
    shard: &mut Shard,
    slot: usize,
    life: u64,
    s: u16,
    cmd: IoCmd<shardmq_shard::core::Handoff>,
    at: Duration,
) {
    let find = |clients: &[Client], conn: ConnId| {
        clients.iter().position(|c| c.node == slot && c.life == life && c.shard == s && c.conn == conn)
    };
    match cmd {
        IoCmd::Transmit(conn) | IoCmd::Close(conn) => {
            let bytes = shard.take_transmit(conn);
            if let Some(i) = find(clients, conn) {
                clients[i].rx.extend_from_slice(&bytes);
                clients[i].read(at);
                if matches!(cmd, IoCmd::Close(_)) {
                    clients[i].closed = true;
                }
            }
        }
        IoCmd::PauseRead(conn) => {
            if let Some(i) = find(clients, conn) {
                clients[i].paused = true;
            }
        }
        IoCmd::ResumeRead(conn) => {
            if let Some(i) = find(clients, conn) {
                clients[i].paused = false;
                let unread = std::mem::take(&mut clients[i].unread);
                if !unread.is_empty() {
                    clients[i].outbox.push_front(unread);
                }
            }
        }
        IoCmd::Handoff { .. } => panic!("clients connect on the shard that owns their id"),
    }
}

fn packet(p: &Packet<'_>) -> Vec<u8> {
    let mut buf = Vec::new();
    encode(p, Protocol::V5, &mut buf).expect("encodes");
    buf
}

impl Client {
    /// Decodes what arrived and answers as a client does: QoS 1/2 acknowledgements both ways.
    fn read(&mut self, at: Duration) {
        loop {
            let (reply, n) = {
                let Some((p, n)) =
                    decode(&self.rx, Some(Protocol::V5), u32::MAX).expect("the broker sends valid MQTT")
                else {
                    return;
                };
                let reply = match p {
                    Packet::ConnAck(a) => {
                        assert_eq!(a.reason, ReasonCode::SUCCESS, "CONNACK refused");
                        self.connacked = true;
                        self.session_present = a.session_present;
                        None
                    }
                    Packet::SubAck(a) => {
                        assert!(a.reasons.iter().all(|r| r.0 < 0x80), "SUBSCRIBE refused: {a:?}");
                        self.subacks.insert(a.packet_id.0, at);
                        None
                    }
                    Packet::Publish(p) => {
                        self.got.push((p.topic.to_string(), p.payload.to_vec(), p.qos, p.retain));
                        match (p.qos, p.packet_id) {
                            (QoS::AtLeastOnce, Some(id)) => {
                                Some(Packet::PubAck(Ack::new(id, ReasonCode::SUCCESS)))
                            }
                            (QoS::ExactlyOnce, Some(id)) => {
                                Some(Packet::PubRec(Ack::new(id, ReasonCode::SUCCESS)))
                            }
                            _ => None,
                        }
                    }
                    Packet::PubAck(a) | Packet::PubComp(a) => {
                        self.acked.insert(a.packet_id.0, at);
                        None
                    }
                    Packet::PubRec(a) => Some(Packet::PubRel(Ack::new(a.packet_id, ReasonCode::SUCCESS))),
                    Packet::PubRel(a) => Some(Packet::PubComp(Ack::new(a.packet_id, ReasonCode::SUCCESS))),
                    Packet::Disconnect(d) => {
                        self.disconnected = Some(d.reason);
                        None
                    }
                    Packet::UnsubAck(_) | Packet::PingResp => None,
                    other => panic!("unexpected packet from the broker: {other:?}"),
                };
                (reply.map(|r| packet(&r)), n)
            };
            self.rx.drain(..n);
            self.outbox.extend(reply);
        }
    }
}

/// `topic` matches `filter` (MQTT rules; no `$` topics here). The test's own oracle, independent of
/// the broker's tries.
fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A publish the test made: what it expects of it.
struct Pub {
    topic: String,
    qos: QoS,
    from: C,
    pid: u16,
    at: Duration,
    /// Subscribers whose SUBACK had arrived when it was published: each must get it exactly once.
    must: Vec<C>,
}

/// A subscription the test made (each client holds one filter, so a message reaches it once at most).
struct Sub {
    client: C,
    filter: String,
    pid: u16,
}

struct Sim {
    seed: u64,
    wire: Wire,
    hosts: Nodes,
    lives: u64,
    shards: Vec<u16>,
    incarnation: Vec<u64>,
    /// Wall-clock skew per slot (ms): retained stamps come from clocks that disagree.
    skew: Vec<u64>,
    pubs: Vec<Pub>,
    subs: Vec<Sub>,
    next_msg: u64,
    /// Nodes keep their shards' state in logs: a QoS 1/2 publish is acknowledged once stored, here and
    /// by every peer it was forwarded to (or given up on: `stored_unconfirmed`).
    durable: bool,
    /// Data directories of durable nodes that crashed keeping their logs ([`Sim::crash_keeping_log`]):
    /// the node's next boot restores from it.
    kept: Vec<Option<tempfile::TempDir>>,
    /// The shards answer clean connections without a will ahead of their registration (odd seeds), as a
    /// zone that prefers availability does.
    ahead: bool,
}

impl Drop for Sim {
    /// A failing test names the seed that replays it.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("node sim seed {} failed; replay with SHARDMQ_SIM_SEED={}", self.seed, self.seed);
        }
    }
}

impl Sim {
    /// `n` nodes of 1 to 3 shards each (chosen by the seed), booted at once.
    fn new(seed: u64, n: usize) -> Sim {
        Sim::build(seed, n, false)
    }

    fn durable(seed: u64, n: usize) -> Sim {
        Sim::build(seed, n, true)
    }

    fn build(seed: u64, n: usize, durable: bool) -> Sim {
        let mut rng = Rng(seed ^ 0x6e6f_6465);
        let shards = (0..n).map(|_| 1 + rng.below(3) as u16).collect();
        Sim::with_shards(seed, shards, durable)
    }

    /// Node i has `shards[i]` shards.
    fn with_shards(seed: u64, shards: Vec<u16>, durable: bool) -> Sim {
        let n = shards.len();
        let mut rng = Rng(seed ^ 0x6e6f_6465);
        let skew = (0..n).map(|_| rng.below(50)).collect();
        let mut sim = Sim {
            seed,
            wire: Wire::new(seed, n),
            hosts: Nodes {
                nodes: (0..n).map(|_| None).collect(),
                clients: Vec::new(),
                rng: Rng(seed ^ 0x1e4f),
                next_conn: 1,
                past: Vec::new(),
                lost_in_crashes: 0,
            },
            lives: 0,
            shards,
            incarnation: vec![0; n],
            skew,
            pubs: Vec::new(),
            subs: Vec::new(),
            next_msg: 1,
            durable,
            kept: (0..n).map(|_| None).collect(),
            ahead: seed % 2 == 1,
        };
        for slot in 0..n {
            sim.boot(slot);
        }
        sim
    }

    fn n(&self) -> usize {
        self.hosts.nodes.len()
    }

    fn elapsed(&self) -> Duration {
        self.wire.elapsed()
    }

    fn boot(&mut self, slot: usize) {
        let now = self.wire.now;
        self.incarnation[slot] += 1;
        let s = self.shards[slot];
        let id = NodeIdentity::new(&name(slot).0, addr(slot), "z1", "r1", self.incarnation[slot]);
        let mut cfg = ZoneConfig::new(id);
        cfg.secret = Some(b"zone secret".to_vec());
        cfg.seeds = vec![addr(if slot == 0 { 1 } else { 0 })];
        cfg.membership = MembershipConfig { expected_members: self.n() as u32, ..Default::default() };
        let zone = Zone::new(cfg, self.wire.rng.next(), now);
        let wall = 1_800_000_000_000 + self.elapsed().as_millis() as u64 + self.skew[slot];
        let gcfg = GatewayConfig {
            shards: s,
            persistent: self.durable,
            wall_ms_at_start: wall,
            partition_mode: Default::default(),
        };
        let mut gateway = Gateway::new(gcfg, zone, now);
        let e = s as usize + 1;
        let mut mesh: Vec<VecDeque<Mesh>> = (0..e * e).map(|_| VecDeque::new()).collect();
        while let Some((to, m)) = gateway.poll_mesh() {
            mesh[s as usize * e + to.index()].push_back(m);
        }
        let cfg = Arc::new(Config { cluster_gateway: true, register_ahead: self.ahead, ..Config::default() });
        let shared = Arc::new(NodeShared::new(s));
        let mut shards: Vec<Shard> =
            (0..s).map(|i| Shard::new(ShardId(i), s, cfg.clone(), shared.clone())).collect();
        for shard in &mut shards {
            // As the broker does: deadlines of sessions moved between nodes travel as Unix time.
            shard.set_wall_clock(WallClock { base: now, base_unix_ms: wall });
        }
        let kept = self.kept[slot].take();
        let data = self.durable.then(|| {
            let dir = kept.unwrap_or_else(|| tempfile::tempdir().expect("a temporary directory"));
            let sc = StorageConfig {
                dir: dir.path().join("data"),
                fsync: FsyncPolicy::Never,
                segment_bytes: 256 * 1024,
            };
            let boots = open_node(&sc, s, WallClock { base: now, base_unix_ms: wall })
                .expect("the data directory opens");
            for (shard, b) in shards.iter_mut().zip(boots) {
                shard.restore(b, now);
            }
            dir
        });
        self.lives += 1;
        self.hosts.nodes[slot] = Some(Node { life: self.lives, _data: data, shards, gateway, mesh });
        self.hosts.settle(slot, &mut self.wire);
    }

    /// The node in `slot` dies with all its state. `silent`: the host vanished (its streams stop);
    /// else the process died (its streams reset).
    fn crash(&mut self, slot: usize, silent: bool) {
        let Some(mut node) = self.hosts.nodes[slot].take() else { return };
        self.hosts.past.push((node.gateway.counters(), node.gateway.zone_mut().counters()));
        self.hosts.lost_in_crashes += node.gateway.zone_mut().frames_unacknowledged();
        self.wire.crash(slot, node.life, silent);
        for c in &mut self.hosts.clients {
            if c.node == slot && c.life == node.life {
                c.closed = true;
            }
        }
    }

    /// The node's process dies (`silent`: its host vanished) and its logs stay: its next boot
    /// ([`Sim::boot`]) restores from them, as a restarted broker does.
    fn crash_keeping_log(&mut self, slot: usize, silent: bool) {
        assert!(self.durable, "only a durable node has a log to keep");
        let data = self.hosts.nodes[slot].as_mut().and_then(|n| n._data.take());
        self.crash(slot, silent);
        self.kept[slot] = data;
    }

    fn node(&mut self, slot: usize) -> &mut Node {
        self.hosts.nodes[slot].as_mut().expect("a live node")
    }

    /// Runs the zone for `d` of virtual time.
    fn run(&mut self, d: Duration) {
        let end = self.wire.now + d;
        let mut same_instant = 0;
        loop {
            let timers = (0..self.n()).filter_map(|s| self.hosts.nodes[s].as_mut()?.next_timer()).min();
            let Some(next) = [self.wire.next_at(), timers].into_iter().flatten().min() else { break };
            if next > end {
                break;
            }
            same_instant = if next <= self.wire.now { same_instant + 1 } else { 0 };
            assert!(
                same_instant < 100_000,
                "seed {}: time stands still (a timer that never clears)",
                self.seed
            );
            self.wire.now = self.wire.now.max(next);
            let now = self.wire.now;
            while let Some(a) = self.wire.pop_due() {
                self.wire.apply(a, &mut self.hosts);
            }
            for slot in 0..self.n() {
                let Some(node) = self.hosts.nodes[slot].as_mut() else { continue };
                if node.next_timer().is_none_or(|t| t > now) {
                    continue;
                }
                // As the runtimes do: the cluster thread fires the zone's and the gateway's timers
                // together; each shard its own.
                let gw_due = [node.gateway.poll_timeout(), node.gateway.zone_mut().poll_timeout()]
                    .into_iter()
                    .flatten()
                    .any(|t| t <= now);
                if gw_due {
                    node.gateway.zone_mut().handle_timeout(now);
                    node.gateway.handle_timeout(now);
                }
                for s in &mut node.shards {
                    if s.poll_timeout().is_some_and(|t| t <= now) {
                        s.handle_timeout(now);
                    }
                }
                self.hosts.settle(slot, &mut self.wire);
            }
        }
        self.wire.now = end;
    }

    /// Runs until `cond` holds (checked every 20 ms) or `limit` passes; returns the time it took.
    fn run_until(&mut self, limit: Duration, mut cond: impl FnMut(&mut Sim) -> bool) -> Option<Duration> {
        let start = self.wire.now;
        while self.wire.now - start <= limit {
            if cond(self) {
                return Some(self.wire.now - start);
            }
            self.run(Duration::from_millis(20));
        }
        None
    }

    fn up(&mut self, slot: usize, peer: usize) -> bool {
        let Some(node) = self.hosts.nodes[slot].as_mut() else { return false };
        node.gateway.zone_mut().peers_up().any(|p| p.name == name(peer))
    }

    fn all_up(&mut self, slots: &[usize]) -> bool {
        slots.iter().all(|&a| slots.iter().all(|&b| a == b || self.up(a, b)))
    }

    fn live(&self) -> Vec<usize> {
        (0..self.n()).filter(|&s| self.hosts.nodes[s].is_some()).collect()
    }

    fn wait_all_up(&mut self, limit: Duration) {
        let live = self.live();
        let took = self.run_until(limit, |sim| sim.all_up(&live));
        assert!(took.is_some(), "seed {}: nodes {live:?} not all linked after {limit:?}", self.seed);
    }

    /// Connects a client on `shard` of node `slot` (with an id that shard owns) and waits for its CONNACK.
    fn connect(&mut self, slot: usize, shard: u16) -> C {
        let s = self.shards[slot];
        let c = self.hosts.clients.len();
        let id = (0..).map(|i| format!("c{c}-{i}")).find(|id| owner_of(id, s) == ShardId(shard)).unwrap();
        self.connect_id(slot, &id)
    }

    /// Connects a client with `id` on node `slot` (on the shard that owns it there) and waits for its
    /// CONNACK.
    fn connect_id(&mut self, slot: usize, id: &str) -> C {
        self.connect_with(slot, id, true, None)
    }

    /// As `connect_id`; `clean == false`: a persistent session (an hour's expiry).
    fn connect_with(&mut self, slot: usize, id: &str, clean: bool, will_topic: Option<&str>) -> C {
        let c = self.start_connect(slot, id, clean, will_topic);
        // The CONNACK waits for the zone's session registry: the id's owner may be another node (or,
        // unreachable, grant it here after its timeout).
        let took = self.run_until(Duration::from_secs(5), |sim| sim.hosts.clients[c].connacked);
        assert!(took.is_some(), "seed {}: no CONNACK within 5 s", self.seed);
        c
    }

    /// Opens a connection and sends its CONNECT, without waiting for the CONNACK.
    fn start_connect(&mut self, slot: usize, id: &str, clean: bool, will_topic: Option<&str>) -> C {
        let shard = owner_of(id, self.shards[slot]).0;
        let c = self.hosts.clients.len();
        let conn = ConnId(self.hosts.next_conn);
        self.hosts.next_conn += 1;
        let now = self.wire.now;
        let life = self.node(slot).life;
        self.node(slot).shards[shard as usize].handle_accept(conn, now);
        let properties = if clean {
            Properties::default()
        } else {
            Properties { session_expiry_interval_s: Some(3600), ..Default::default() }
        };
        let connect = Connect {
            protocol: Protocol::V5,
            clean_start: clean,
            keep_alive_s: 0,
            client_id: id,
            will: will_topic.map(|topic| Will {
                topic,
                payload: b"gone",
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
            }),
            username: None,
            password: None,
            properties,
        };
        self.hosts.clients.push(Client {
            node: slot,
            life,
            shard,
            conn,
            rx: Vec::new(),
            outbox: VecDeque::from([packet(&Packet::Connect(connect))]),
            closed: false,
            paused: false,
            unread: Vec::new(),
            connacked: false,
            subacks: BTreeMap::new(),
            acked: BTreeMap::new(),
            got: Vec::new(),
            next_pid: 1,
            disconnected: None,
            session_present: false,
        });
        self.hosts.settle(slot, &mut self.wire);
        c
    }

    /// The client closes its connection (a clean session: its subscription ends).
    fn disconnect(&mut self, c: C) {
        let cl = &mut self.hosts.clients[c];
        cl.closed = true;
        let (slot, shard, conn) = (cl.node, cl.shard, cl.conn);
        let now = self.wire.now;
        self.node(slot).shards[shard as usize].handle_closed(conn, now);
        self.hosts.run_node(slot, &mut self.wire, Some(shard as usize));
    }

    /// Queues `p` from client `c` and lets its node run.
    fn send(&mut self, c: C, p: &Packet<'_>) {
        let cl = &mut self.hosts.clients[c];
        assert!(!cl.closed, "client {c} is closed");
        cl.outbox.push_back(packet(p));
        let slot = cl.node;
        self.hosts.settle(slot, &mut self.wire);
    }

    fn pid(&mut self, c: C) -> u16 {
        let cl = &mut self.hosts.clients[c];
        let pid = cl.next_pid;
        cl.next_pid = cl.next_pid.checked_add(1).expect("fewer than 65535 packets per client");
        pid
    }

    /// Sends a SUBSCRIBE (QoS 2: a message arrives with its publisher's QoS); the SUBACK comes when the
    /// zone has the interest. One filter per client.
    fn subscribe(&mut self, c: C, filter: &str) -> u16 {
        assert!(self.subs.iter().all(|s| s.client != c), "one filter per client");
        let pid = self.pid(c);
        let opts = SubOptions { qos: QoS::ExactlyOnce, ..Default::default() };
        let s = Subscribe {
            packet_id: PacketId(pid),
            filters: vec![(filter, opts)],
            properties: Properties::default(),
        };
        self.send(c, &Packet::Subscribe(s));
        self.subs.push(Sub { client: c, filter: filter.to_string(), pid });
        pid
    }

    fn subacked(&self, c: C) -> bool {
        self.subs.iter().any(|s| s.client == c && self.hosts.clients[c].subacks.contains_key(&s.pid))
    }

    /// Publishes a new message (payload: its number) and records who must get it. Returns its number.
    fn publish(&mut self, c: C, topic: &str, qos: QoS) -> u64 {
        let id = self.next_msg;
        self.next_msg += 1;
        let pid = if qos == QoS::AtMostOnce { 0 } else { self.pid(c) };
        let must = self
            .subs
            .iter()
            .filter(|s| {
                !s.filter.starts_with("$share/")
                    && matches(&s.filter, topic)
                    && !self.hosts.clients[s.client].closed
                    && self.hosts.clients[s.client].subacks.contains_key(&s.pid)
            })
            .map(|s| s.client)
            .collect();
        let payload = id.to_string();
        self.pubs.push(Pub { topic: topic.to_string(), qos, from: c, pid, at: self.elapsed(), must });
        self.publish_raw(c, topic, payload.as_bytes(), qos, false, pid);
        id
    }

    fn publish_raw(&mut self, c: C, topic: &str, payload: &[u8], qos: QoS, retain: bool, pid: u16) {
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

    /// How often client `c` got message `id` (retained copies aside).
    fn got(&self, c: C, id: u64) -> usize {
        let payload = id.to_string();
        self.hosts.clients[c].got.iter().filter(|g| !g.3 && g.1 == payload.as_bytes()).count()
    }

    /// The invariants of plain subscriptions: every subscriber whose SUBACK came before a publish got
    /// it exactly once; nobody got a message twice, or one that none of its filters matches. `only`:
    /// the (publish, subscriber) pairs checked for the first.
    fn check_deliveries(&self, only: impl Fn(&Pub, C) -> bool) {
        let seed = self.seed;
        for (i, p) in self.pubs.iter().enumerate() {
            let id = i as u64 + 1;
            for &c in p.must.iter().filter(|&&c| only(p, c)) {
                let n = self.got(c, id);
                assert_eq!(
                    n, 1,
                    "seed {seed}: client {c} (node {}) got message {id} on {} (QoS {:?}, from node {} at {:?}) {n} times",
                    self.hosts.clients[c].node, p.topic, p.qos, self.hosts.clients[p.from].node, p.at
                );
            }
        }
        for (c, cl) in self.hosts.clients.iter().enumerate() {
            let mut seen = BTreeMap::new();
            for (topic, payload, _, retain) in &cl.got {
                if *retain {
                    continue;
                }
                let filter = self.subs.iter().find(|s| s.client == c).map(|s| s.filter.as_str());
                let plain =
                    filter.map(|f| f.strip_prefix("$share/").map_or(f, |r| r.split_once('/').unwrap().1));
                assert!(
                    plain.is_some_and(|f| matches(f, topic)),
                    "seed {seed}: client {c} got {topic} but subscribed to {filter:?}"
                );
                *seen.entry(payload.clone()).or_insert(0) += 1;
            }
            if let Some((m, n)) = seen.iter().find(|(_, n)| **n > 1) {
                panic!("seed {seed}: client {c} got message {} {n} times", String::from_utf8_lossy(m));
            }
        }
    }

    /// Everything the clients saw and the nodes counted: equal for two runs of one seed.
    fn fingerprint(&mut self) -> String {
        let clients: Vec<_> =
            self.hosts.clients.iter().map(|c| (&c.got, &c.acked, &c.subacks, c.closed)).collect();
        let mut counters = Vec::new();
        for n in self.hosts.nodes.iter_mut().flatten() {
            counters.push((n.gateway.counters(), n.gateway.zone_mut().counters()));
        }
        format!("{:?} {clients:?} {counters:?} {:?}", self.elapsed(), self.hosts.past)
    }

    /// Gateway counters summed over every node and past life.
    fn counters(&mut self) -> (GatewayCounters, ZoneCounters) {
        let mut all: Vec<(GatewayCounters, ZoneCounters)> = self.hosts.past.clone();
        for n in self.hosts.nodes.iter_mut().flatten() {
            all.push((n.gateway.counters(), n.gateway.zone_mut().counters()));
        }
        let mut g = GatewayCounters::default();
        let mut z = ZoneCounters::default();
        for (a, b) in all {
            g.forwarded += a.forwarded;
            g.received += a.received;
            g.dropped_not_connected += a.dropped_not_connected;
            g.dropped_backlog_full += a.dropped_backlog_full;
            g.dropped_no_member += a.dropped_no_member;
            g.stored_unconfirmed += a.stored_unconfirmed;
            g.malformed += a.malformed;
            g.false_positives += a.false_positives;
            z.dropped_resync += b.dropped_resync;
            z.frames_resent += b.frames_resent;
        }
        (g, z)
    }
}

const TOPICS: &[&str] = &["t/a/x", "t/a/y", "t/b/x", "t/b/y", "t/c/z", "u/a"];
const FILTERS: &[&str] = &["t/a/x", "t/b/y", "u/a", "t/+/x", "t/a/+", "t/#", "+/a/#", "#", "t/c/z"];
const QOS: &[QoS] = &[QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];

fn seeds() -> Vec<u64> {
    support::seeds(&[1, 2, 3])
}

/// Membership and links converge: every node has every other one up within a few simulated seconds,
/// with 2 % of the gossip lost, and they stay up.
fn membership_converges(seed: u64) {
    let n = 3 + (seed % 8) as usize;
    let mut sim = Sim::new(seed, n);
    sim.wire.loss = 20;
    // Ten nodes forming at 2% datagram loss take up to ~6.5 s in the slowest seeds (5055 of 5000..7000),
    // 8.5 s in the slowest of 150000..151500 (151431).
    sim.wait_all_up(Duration::from_secs(12));
    sim.run(Duration::from_secs(2));
    let all: Vec<usize> = (0..n).collect();
    assert!(sim.all_up(&all), "seed {seed}: a link went down on a healthy network");
    let (g, _) = sim.counters();
    assert_eq!(g.malformed, 0, "seed {seed}");
}

#[test]
fn membership_and_links_converge() {
    for seed in seeds() {
        membership_converges(seed);
    }
}

/// Random subscriptions (exact and wildcard) on random nodes and shards while publishes of every QoS
/// flow from random nodes: a subscriber gets every publish made after its SUBACK arrived, exactly once.
fn no_false_negatives(seed: u64) -> Sim {
    let n = 3 + (seed % 4) as usize;
    let mut sim = Sim::new(seed, n);
    sim.wire.loss = 20;
    // Some nodes sit behind slower links: frames of different links overtake each other.
    sim.wire.slow = (0..n).map(|s| if s % 2 == 1 { 8_000 } else { 0 }).collect();
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x5eed);
    let publishers: Vec<C> = (0..n).map(|s| sim.connect(s, (s as u16) % sim.shards[s])).collect();
    for round in 0..300 {
        match rng.below(4) {
            0 if round < 200 => {
                let slot = rng.below(n as u64) as usize;
                let shard = rng.below(sim.shards[slot] as u64) as u16;
                let c = sim.connect(slot, shard);
                sim.subscribe(c, rng.pick(FILTERS));
            }
            // A subscriber goes away (its interest leaves the zone while publishes are in flight).
            1 if rng.below(8) == 0 && !sim.subs.is_empty() => {
                let s = sim.subs[rng.below(sim.subs.len() as u64) as usize].client;
                if !sim.hosts.clients[s].closed {
                    sim.disconnect(s);
                }
            }
            _ => {
                let p = rng.pick(&publishers);
                sim.publish(p, rng.pick(TOPICS), rng.pick(QOS));
            }
        }
        sim.run(Duration::from_millis(rng.below(15)));
    }
    sim.run(Duration::from_secs(3));
    // (A subscriber that left before its SUBACK never gets one.)
    let waiting = sim.subs.iter().filter(|s| !sim.hosts.clients[s.client].closed && !sim.subacked(s.client));
    assert_eq!(waiting.count(), 0, "seed {seed}: a SUBACK never came");
    let checked: usize = sim.pubs.iter().map(|p| p.must.len()).sum();
    assert!(checked > 200, "seed {seed}: too few (subscriber, publish) pairs to check: {checked}");
    // A subscriber that left may miss what was in flight to it (its session ended); never twice.
    sim.check_deliveries(|_, c| !sim.hosts.clients[c].closed);
    // Every QoS 1/2 publish was acknowledged to its publisher.
    for p in sim.pubs.iter().filter(|p| p.qos != QoS::AtMostOnce) {
        assert!(
            sim.hosts.clients[p.from].acked.contains_key(&p.pid),
            "seed {seed}: a publish never acknowledged"
        );
    }
    let (g, _) = sim.counters();
    assert_eq!(g.forwarded, g.received, "seed {seed}: forwards lost on a healthy network: {g:?}");
    assert_eq!(g.dropped_not_connected + g.dropped_backlog_full + g.malformed, 0, "seed {seed}: {g:?}");
    sim
}

#[test]
fn subscribers_acknowledged_before_a_publish_get_it_exactly_once() {
    for seed in seeds() {
        drop(no_false_negatives(seed));
    }
}

/// Two subscribers to one filter on one node, the second SUBSCRIBE while the first one's announcement
/// is on its way to a slow peer; a publish from that peer right after the second SUBACK reaches both.
/// `same_shard`: both on one shard, else on two.
fn second_subscriber(seed: u64, same_shard: bool) {
    let mut sim = Sim::with_shards(seed, vec![2, 1], false);
    sim.wire.slow = vec![0, 30_000];
    sim.wait_all_up(Duration::from_secs(5));
    let p = sim.connect(1, 0);
    let a = sim.connect(0, 0);
    let b = sim.connect(0, if same_shard { 0 } else { 1 });
    sim.subscribe(a, "f/x");
    sim.subscribe(b, "f/x");
    for _ in 0..3000 {
        if sim.subacked(b) {
            break;
        }
        sim.run(Duration::from_millis(1));
    }
    assert!(sim.subacked(b), "seed {seed}: no SUBACK");
    sim.publish(p, "f/x", QoS::AtLeastOnce);
    assert!(sim.pubs[0].must.contains(&b), "seed {seed}: b got its SUBACK, so it must get the message");
    sim.run(Duration::from_secs(2));
    assert!(sim.subacked(a), "seed {seed}: no SUBACK");
    sim.check_deliveries(|_, _| true);
}

/// Regression: the gateway acknowledged a second shard's announcement of a filter the node already
/// had (from another shard) at once, though the peers had not acknowledged the first one yet: the
/// second subscriber's SUBACK overtook the zone, and a publish from the peer right after it missed it.
#[test]
fn a_second_shards_subscriber_waits_for_the_zone_like_the_first() {
    for seed in seeds() {
        second_subscriber(seed, false);
    }
}

/// Regression, the same on one shard: the shard sent the second SUBACK without waiting for anything (it
/// had announced the filter already), so it overtook the zone; the gateway never hears of the second
/// subscriber. The shard now holds it for the first one's announcement (`shard/src/core/suback_wait.rs`).
#[test]
fn a_second_subscriber_on_one_shard_waits_for_the_zone_too() {
    for seed in seeds() {
        second_subscriber(seed, true);
    }
}

/// Waits until every subscription made so far has its SUBACK.
fn wait_subacks(sim: &mut Sim, limit: Duration) {
    let took = sim.run_until(limit, |sim| {
        sim.subs.iter().all(|s| sim.hosts.clients[s.client].closed || sim.subacked(s.client))
    });
    assert!(took.is_some(), "seed {}: SUBACKs missing after {limit:?}", sim.seed);
}

/// Members of one shared group on several nodes (1 to 3 each): every message reaches exactly one
/// member zone-wide, and each node's share follows its member count.
fn shared_groups(seed: u64) -> Sim {
    let n = 3 + (seed % 3) as usize;
    let mut sim = Sim::new(seed, n);
    sim.wire.loss = 20;
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x5a5e);
    let mut members: Vec<Vec<C>> = vec![Vec::new(); n];
    for (slot, m) in members.iter_mut().enumerate() {
        // Nodes 0 and 1 always have members (a group across nodes); the others may have none.
        let k = if slot < 2 { 1 + slot as u64 } else { rng.below(4) };
        for _ in 0..k {
            let shard = rng.below(sim.shards[slot] as u64) as u16;
            let c = sim.connect(slot, shard);
            sim.subscribe(c, "$share/g/s/+");
            m.push(c);
        }
    }
    wait_subacks(&mut sim, Duration::from_secs(3));
    sim.run(Duration::from_millis(200));
    let publishers: Vec<C> = (0..n).map(|s| sim.connect(s, 0)).collect();
    let first = sim.next_msg;
    let total_msgs = 400;
    for _ in 0..total_msgs {
        let p = rng.pick(&publishers);
        let topic = format!("s/{}", rng.below(4));
        sim.publish(p, &topic, rng.pick(QOS));
        sim.run(Duration::from_millis(rng.below(5)));
    }
    sim.run(Duration::from_secs(3));
    let mut per_node = vec![0usize; n];
    for id in first..sim.next_msg {
        let mut got = 0;
        for (slot, m) in members.iter().enumerate() {
            let k: usize = m.iter().map(|&c| sim.got(c, id)).sum();
            per_node[slot] += k;
            got += k;
        }
        assert_eq!(
            got, 1,
            "seed {seed}: shared message {id} delivered {got} times (per node so far {per_node:?})"
        );
    }
    sim.check_deliveries(|_, _| true);
    let all: usize = members.iter().map(Vec::len).sum();
    for (slot, m) in members.iter().enumerate() {
        let expected = total_msgs as f64 * m.len() as f64 / all as f64;
        let got = per_node[slot] as f64;
        assert!(
            (got - expected).abs() <= (expected * 0.35).max(15.0),
            "seed {seed}: node {slot} with {} of {all} members got {got} of {total_msgs} ({per_node:?})",
            m.len()
        );
    }
    sim
}

#[test]
fn a_shared_group_message_reaches_exactly_one_member_zone_wide() {
    for seed in seeds() {
        drop(shared_groups(seed));
    }
}

/// What a new subscriber got retained: topic → payload.
type Retained = BTreeMap<String, Vec<u8>>;

/// Concurrent retained updates and clears of the same topics from every node, over slow and fast links
/// (and, for odd seeds, across a partition that heals): at quiescence a new subscriber on any shard of
/// any node gets the same retained message (or none) for every topic.
fn retained_converges(seed: u64) {
    let n = 3 + (seed % 3) as usize;
    let mut sim = Sim::new(seed, n);
    sim.wire.loss = 20;
    sim.wire.slow = (0..n).map(|s| if s % 2 == 0 { 6_000 } else { 0 }).collect();
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x7e7a);
    let publishers: Vec<C> =
        (0..2 * n).map(|i| i % n).map(|s| sim.connect(s, (s as u16) % sim.shards[s])).collect();
    let mut written: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let partition = seed % 2 == 1;
    // Every third seed, the last node crashes (its replica lost) and comes back to the peers' snapshots.
    let crash = seed.is_multiple_of(3);
    let mut publishers = publishers;
    for round in 0..200 {
        if partition && round == 60 {
            sim.wire.group[0] = 1;
        }
        if partition && round == 140 {
            sim.wire.group[0] = 0;
        }
        if crash && round == 90 {
            sim.crash(n - 1, round % 2 == 0);
        }
        if crash && round == 150 {
            sim.boot(n - 1);
            for _ in 0..2 {
                publishers.push(sim.connect(n - 1, 0));
            }
        }
        publishers.retain(|&c| !sim.hosts.clients[c].closed);
        let p = rng.pick(&publishers);
        let topic = format!("r/{}", rng.below(5));
        let payload = if rng.below(5) == 0 { Vec::new() } else { format!("v{round}").into_bytes() };
        let qos = rng.pick(QOS);
        let pid = if qos == QoS::AtMostOnce { 0 } else { sim.pid(p) };
        sim.publish_raw(p, &topic, &payload, qos, true, pid);
        written.entry(topic).or_default().push(payload);
        sim.run(Duration::from_millis(rng.below(4)));
    }
    sim.wait_all_up(Duration::from_secs(15));
    sim.run(Duration::from_secs(2));
    // One last write once all is quiet, which no concurrent write can win over: the views must have it
    // (the writes above may all end in clears, for the last writer by clock need not be the last sent).
    let p = *publishers.first().expect("a publisher still connected");
    let pid = sim.pid(p);
    sim.publish_raw(p, "r/final", b"end", QoS::AtLeastOnce, true, pid);
    written.entry("r/final".into()).or_default().push(b"end".to_vec());
    sim.run(Duration::from_secs(1));
    let mut views: Vec<((usize, u16), Retained)> = Vec::new();
    for slot in 0..n {
        for shard in 0..sim.shards[slot] {
            let c = sim.connect(slot, shard);
            sim.subscribe(c, "r/#");
            views.push(((slot, shard), BTreeMap::new()));
        }
    }
    wait_subacks(&mut sim, Duration::from_secs(3));
    sim.run(Duration::from_secs(1));
    let first = sim.hosts.clients.len() - views.len();
    for (i, (_, view)) in views.iter_mut().enumerate() {
        for (topic, payload, _, retain) in &sim.hosts.clients[first + i].got {
            assert!(*retain, "seed {seed}: a live message after quiescence");
            assert!(
                view.insert(topic.clone(), payload.clone()).is_none(),
                "seed {seed}: {topic} retained twice"
            );
        }
    }
    let (at0, v0) = &views[0];
    for (at, v) in &views[1..] {
        assert_eq!(v, v0, "seed {seed}: retained differs between (node, shard) {at:?} and {at0:?}");
    }
    for (topic, payload) in v0 {
        assert!(written[topic].contains(payload), "seed {seed}: {topic} retains a value never written");
    }
    assert_eq!(v0.get("r/final").map(|p| &p[..]), Some(&b"end"[..]), "seed {seed}: the last write");
}

#[test]
fn retained_messages_converge_everywhere() {
    for seed in seeds() {
        retained_converges(seed);
    }
}

/// A node crashes (all its state lost; silently or with its connections reset) or is cut off by a
/// partition while publishes flow: the others keep delivering among themselves, QoS 1/2 publishes
/// on live nodes are acknowledged within 6 s, every forward is received or counted; after the restart
/// or the heal the node is back and its subscribers get what is published.
fn crash_or_partition(seed: u64, partition: bool) -> Sim {
    let n = 4;
    // Durable nodes: a publisher's acknowledgement waits for the peers its message went to.
    let mut sim = Sim::durable(seed, n);
    sim.wire.loss = 10;
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0xc7a5);
    for slot in 0..n {
        for f in ["c/#", "c/x", "c/+/y"] {
            let shard = rng.below(sim.shards[slot] as u64) as u16;
            let c = sim.connect(slot, shard);
            sim.subscribe(c, f);
        }
    }
    wait_subacks(&mut sim, Duration::from_secs(3));
    let mut publishers: Vec<C> = (0..n).map(|s| sim.connect(s, 0)).collect();
    let topics = ["c/x", "c/a/y", "c/b"];
    let victim = 1 + (seed as usize % (n - 1));
    let burst = |sim: &mut Sim, rng: &mut Rng, from: &[C], k: usize, gap: u64| {
        for _ in 0..k {
            let p = rng.pick(from);
            let qos = if rng.below(4) == 0 { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
            sim.publish(p, rng.pick(&topics), qos);
            sim.run(Duration::from_millis(rng.below(gap)));
        }
    };
    burst(&mut sim, &mut rng, &publishers, 40, 10);
    let cut = sim.elapsed();
    if partition {
        sim.wire.group[victim] = 1;
    } else {
        sim.crash(victim, seed.is_multiple_of(2));
    }
    let live: Vec<C> = publishers.iter().copied().filter(|&c| sim.hosts.clients[c].node != victim).collect();
    burst(&mut sim, &mut rng, &live, 20, 40);
    // A SUBACK during the outage waits for the peers up, not for the one that is gone (for long).
    let slot = (victim + 1) % n;
    let late = sim.connect(slot, 0);
    sim.subscribe(late, "c/#");
    burst(&mut sim, &mut rng, &live, 80, 40);
    let took = sim.hosts.clients[late].subacks.values().next().copied();
    assert!(
        took.is_some_and(|t| t <= cut + Duration::from_secs(4)),
        "seed {seed}: a SUBACK during the outage came at {took:?} (cut at {cut:?})"
    );
    sim.run(Duration::from_secs(6));
    for p in sim.pubs.iter().filter(|p| sim.hosts.clients[p.from].node != victim) {
        let acked = sim.hosts.clients[p.from].acked.get(&p.pid);
        assert!(
            acked.is_some_and(|t| *t - p.at <= Duration::from_secs(6)),
            "seed {seed}: publish at {:?} on node {} acknowledged at {acked:?}",
            p.at,
            sim.hosts.clients[p.from].node
        );
    }
    // Among the live nodes nothing is lost: a message from a live node (or the victim before the cut)
    // reaches every live subscriber that had its SUBACK.
    let victim_client = |sim: &Sim, c: C| sim.hosts.clients[c].node == victim;
    sim.check_deliveries(|p, c| {
        !victim_client(&sim, c) && (!victim_client(&sim, p.from) || p.at + Duration::from_millis(5) < cut)
    });
    // Back: the partition heals or the node restarts (a new incarnation, nothing of the old one).
    if partition {
        sim.wire.group[victim] = 0;
    } else {
        sim.boot(victim);
    }
    sim.wait_all_up(Duration::from_secs(15));
    let c = sim.connect(victim, rng.below(sim.shards[victim] as u64) as u16);
    sim.subscribe(c, "c/#");
    wait_subacks(&mut sim, Duration::from_secs(3));
    // The peers learn the healed node's older subscriptions from its snapshot, which follows the link.
    sim.run(Duration::from_millis(500));
    let resumed = sim.elapsed();
    publishers[victim] = sim.connect(victim, 0);
    burst(&mut sim, &mut rng, &publishers, 60, 20);
    sim.run(Duration::from_secs(3));
    sim.check_deliveries(|p, _| p.at >= resumed);
    let after: usize =
        sim.pubs.iter().filter(|p| p.at >= resumed).map(|p| p.must.iter().filter(|&&m| m == c).count()).sum();
    assert!(after >= 50, "seed {seed}: the victim's new subscriber was expected to get {after} messages");
    let (g, z) = sim.counters();
    if partition {
        // Same lives throughout: every forward was received once (resent after the heal if need be).
        assert_eq!(g.forwarded, g.received, "seed {seed}: {g:?} {z:?}");
    } else {
        // A forward to the dead life was received by it, or dropped (and counted) when the new life came;
        // one the dead life itself had sent and its peer had not acknowledged was lost with it (a bound:
        // those frames are not all forwards).
        let lost = sim.hosts.lost_in_crashes;
        assert!(
            g.forwarded <= g.received + z.dropped_resync + lost,
            "seed {seed}: forwards vanished: {g:?} {z:?}, {lost} frames lost with the crashed node"
        );
    }
    sim
}

#[test]
fn a_crashed_node_does_not_stop_the_others_and_comes_back() {
    for seed in seeds() {
        drop(crash_or_partition(seed, false));
    }
}

#[test]
fn a_partitioned_node_does_not_stop_the_others_and_comes_back() {
    for seed in seeds() {
        drop(crash_or_partition(seed, true));
    }
}

/// A seed replays exactly: the same deliveries, acknowledgements, timings and counters (two runs in one
/// process also differ in every hash map's keys, so no hash order may decide anything).
#[test]
fn a_seed_replays_exactly() {
    for seed in seeds() {
        assert_eq!(shared_groups(seed).fingerprint(), shared_groups(seed).fingerprint(), "seed {seed}");
        assert_eq!(
            crash_or_partition(seed, false).fingerprint(),
            crash_or_partition(seed, false).fingerprint(),
            "seed {seed}"
        );
    }
}

/// Every scenario over a range of seeds: `SHARDMQ_SIM_SEEDS=100..200` (what `scripts/sim` runs). A
/// failure names its seed; `SHARDMQ_SIM_SEED=<seed>` replays it in the scenario tests above.
#[test]
#[ignore = "long: run by scripts/sim"]
fn many_seeds() {
    let range = std::env::var("SHARDMQ_SIM_SEEDS").unwrap_or_else(|_| "1..20".into());
    let (a, b) = range.split_once("..").expect("SHARDMQ_SIM_SEEDS is a..b");
    let (a, b): (u64, u64) = (a.trim().parse().expect("a number"), b.trim().parse().expect("a number"));
    for seed in a..b {
        eprintln!("node sim seed {seed}");
        membership_converges(seed);
        drop(no_false_negatives(seed));
        drop(shared_groups(seed));
        retained_converges(seed);
        drop(crash_or_partition(seed, false));
        drop(crash_or_partition(seed, true));
        zone_reforms_after_a_cut(seed);
        one_session_per_id(seed);
        session_moves(seed);
        wills_of_a_lost_node(seed);
        restored_sessions(seed);
        split_brain(seed);
        takeover_across_a_broken_link(seed);
        takeover_under_publishes(seed);
        quick_reconnect_elsewhere(seed);
    }
}

/// A client leaves one node (its clean session ends there) and at once connects to another: the id's
/// owner can hear of the new connection before the end of the old one, and take the old node for the
/// session's holder. That node, with nothing to hand over, says so: the new CONNACK does not wait for
/// the hand-over's timeout (3 s), and finds no session.
fn quick_reconnect_elsewhere(seed: u64) {
    let n = 3;
    let mut sim = Sim::new(seed, n);
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x9e7);
    for round in 0..8 {
        let id = format!("hopper-{round}-{}", rng.below(1000));
        let from = rng.below(n as u64) as usize;
        let to = (from + 1 + rng.below(n as u64 - 1) as usize) % n;
        let c = sim.connect_with(from, &id, true, None);
        sim.disconnect(c);
        let persistent = rng.below(2) == 0;
        let d = sim.start_connect(to, &id, !persistent, None);
        let took = sim.run_until(Duration::from_secs(5), |sim| sim.hosts.clients[d].connacked);
        assert!(
            took.is_some_and(|t| t < Duration::from_millis(1500)),
            "seed {seed}: round {round} (persistent {persistent}): CONNACK after {took:?}"
        );
        assert!(!sim.hosts.clients[d].session_present, "seed {seed}: round {round}: no session to find");
        sim.disconnect(d);
    }
}

#[test]
fn a_quick_reconnect_elsewhere_does_not_wait_for_a_session_that_ended() {
    for seed in seeds() {
        quick_reconnect_elsewhere(seed);
    }
}

/// One client id connects on every node in turn: each connection takes the session over from the one
/// before it, which gets DISCONNECT 0x8E (Session taken over), and only the last stays connected.
fn one_session_per_id(seed: u64) {
    let n = 3;
    let mut sim = Sim::new(seed, n);
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x1d);
    let id = format!("roamer-{}", rng.below(1000));
    let mut conns = Vec::new();
    for round in 0..2 * n {
        let slot = (round + rng.below(n as u64) as usize) % n;
        if sim.ahead {
            // Answered ahead, a connection is ordered against the one before it by the clocks of their
            // nodes, which this simulation sets up to 50 ms apart: it comes later than that.
            sim.run_until(Duration::from_millis(60), |_| false);
        }
        conns.push(sim.connect_id(slot, &id));
        let earlier: Vec<C> = conns[..conns.len() - 1].to_vec();
        let took = sim.run_until(Duration::from_secs(3), |sim| {
            earlier
                .iter()
                .all(|&c| sim.hosts.clients[c].disconnected.is_some() || sim.hosts.clients[c].closed)
        });
        assert!(took.is_some(), "seed {seed}: an earlier connection of {id} is still live (round {round})");
    }
    for &c in &conns[..conns.len() - 1] {
        let reason = sim.hosts.clients[c].disconnected;
        assert_eq!(reason, Some(ReasonCode::SESSION_TAKEN_OVER), "seed {seed}");
    }
    let last = *conns.last().unwrap();
    assert!(sim.hosts.clients[last].disconnected.is_none(), "seed {seed}: the newest connection was ended");
}

#[test]
fn a_client_id_has_one_live_session_in_the_zone() {
    for seed in seeds() {
        one_session_per_id(seed);
    }
}

/// A persistent session moves with its client: subscribed on one node, offline while QoS 1 messages are
/// published for it from a third, then reconnecting on another node: session present, every queued
/// message there, and its subscription routes to its new node.
fn session_moves(seed: u64) {
    let n = 3;
    let mut sim = Sim::new(seed, n);
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x5e55);
    let id = format!("mover-{}", rng.below(1000));
    let home = rng.below(n as u64) as usize;
    let away = (home + 1 + rng.below(n as u64 - 1) as usize) % n;
    let c = sim.connect_with(home, &id, false, None);
    let pid = sim.subscribe(c, "moved/#");
    assert!(sim
        .run_until(Duration::from_secs(3), |sim| sim.hosts.clients[c].subacks.contains_key(&pid))
        .is_some());
    sim.disconnect(c);
    let p = sim.connect((away + 1) % n, 0);
    for i in 0..5 {
        sim.publish_raw(p, &format!("moved/{i}"), b"queued", QoS::AtLeastOnce, false, i + 1);
    }
    sim.run(Duration::from_millis(500));
    let back = sim.connect_with(away, &id, false, None);
    assert!(sim.hosts.clients[back].session_present, "seed {seed}: session present on the new node");
    let got = sim.run_until(Duration::from_secs(3), |sim| sim.hosts.clients[back].got.len() >= 5);
    assert!(got.is_some(), "seed {seed}: queued messages: {:?}", sim.hosts.clients[back].got);
    sim.publish_raw(p, "moved/after", b"live", QoS::AtLeastOnce, false, 9);
    let live = sim.run_until(Duration::from_secs(3), |sim| {
        sim.hosts.clients[back].got.iter().any(|g| g.0 == "moved/after")
    });
    assert!(live.is_some(), "seed {seed}: the subscription routes to the new node");
}

#[test]
fn a_persistent_session_moves_to_the_node_its_client_reconnects_to() {
    for seed in seeds() {
        session_moves(seed);
    }
}

/// A node dies with connected clients that have wills: the owners of their ids publish each will once,
/// to subscribers on the nodes that are left.
fn wills_of_a_lost_node(seed: u64) {
    let n = 3;
    let mut sim = Sim::new(seed, n);
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x3111);
    let doomed = rng.below(n as u64) as usize;
    let watcher_node = (doomed + 1) % n;
    let watcher = sim.connect(watcher_node, 0);
    let pid = sim.subscribe(watcher, "will/#");
    assert!(sim
        .run_until(Duration::from_secs(3), |sim| sim.hosts.clients[watcher].subacks.contains_key(&pid))
        .is_some());
    let ids: Vec<String> = (0..6).map(|i| format!("w{i}-{}", rng.below(1000))).collect();
    for id in &ids {
        sim.connect_with(doomed, id, true, Some(&format!("will/{id}")));
    }
    sim.run(Duration::from_millis(300));
    sim.crash(doomed, rng.below(2) == 0);
    let want = ids.len();
    let got = sim.run_until(Duration::from_secs(10), |sim| {
        sim.hosts.clients[watcher].got.iter().filter(|g| g.0.starts_with("will/")).count() >= want
    });
    assert!(got.is_some(), "seed {seed}: wills {:?}", sim.hosts.clients[watcher].got);
    sim.run(Duration::from_secs(2));
    let mut topics: Vec<&str> = sim.hosts.clients[watcher]
        .got
        .iter()
        .filter(|g| g.0.starts_with("will/"))
        .map(|g| g.0.as_str())
        .collect();
    topics.sort_unstable();
    let mut expected: Vec<String> = ids.iter().map(|id| format!("will/{id}")).collect();
    expected.sort_unstable();
    assert_eq!(topics, expected, "seed {seed}: each will exactly once");
}

#[test]
fn the_wills_of_a_lost_nodes_clients_are_published_once() {
    for seed in seeds() {
        wills_of_a_lost_node(seed);
    }
}

/// A node restarts with its log. The persistent sessions it restored are registered with the zone again:
/// their client finds its session, with what was queued for it, from any node. A session whose client
/// connected elsewhere while the node was down is ended there once it is back, never kept as a second
/// session.
fn restored_sessions(seed: u64) {
    let n = 3;
    let mut sim = Sim::durable(seed, n);
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x7e57);
    let home = rng.below(n as u64) as usize;
    let away = (home + 1 + rng.below(n as u64 - 1) as usize) % n;
    let third = (0..n).find(|s| *s != home && *s != away).expect("three nodes");
    let kept = format!("kept-{}", rng.below(1000));
    let moved = format!("moved-{}", rng.below(1000));
    for id in [&kept, &moved] {
        let c = sim.connect_with(home, id, false, None);
        let pid = sim.subscribe(c, &format!("rest/{id}/#"));
        let acked =
            sim.run_until(Duration::from_secs(3), |sim| sim.hosts.clients[c].subacks.contains_key(&pid));
        assert!(acked.is_some(), "seed {seed}: SUBACK");
        sim.disconnect(c);
    }
    let p = sim.connect(third, 0);
    for i in 0..3u16 {
        sim.publish_raw(p, &format!("rest/{kept}/{i}"), b"queued", QoS::AtLeastOnce, false, i + 1);
    }
    let stored = sim.run_until(Duration::from_secs(3), |sim| sim.hosts.clients[p].acked.len() >= 3);
    assert!(stored.is_some(), "seed {seed}: the queued messages acknowledged");
    let held_before: usize = sim.node(home).shards.iter().map(|s| s.session_count()).sum();
    assert_eq!(held_before, 2, "seed {seed}");

    sim.crash_keeping_log(home, rng.below(2) == 0);
    sim.run(Duration::from_secs(3));
    // Its node down, `moved` connects elsewhere: a new session (the old one is out of reach).
    let m = sim.connect_with(away, &moved, false, None);
    assert!(!sim.hosts.clients[m].session_present, "seed {seed}: the session's node is down");
    sim.disconnect(m);

    sim.boot(home);
    sim.wait_all_up(Duration::from_secs(10));
    let settled = sim.run_until(Duration::from_secs(5), |sim| {
        sim.node(home).shards.iter().map(|s| s.session_count()).sum::<usize>() == 1
    });
    assert!(settled.is_some(), "seed {seed}: the session that moved meanwhile is ended on its old node");

    // The session that stayed is found from another node, with every queued message.
    let k = sim.connect_with(away, &kept, false, None);
    assert!(sim.hosts.clients[k].session_present, "seed {seed}: the restored session is found from {away}");
    let got = sim.run_until(Duration::from_secs(3), |sim| sim.hosts.clients[k].got.len() >= 3);
    assert!(got.is_some(), "seed {seed}: queued messages: {:?}", sim.hosts.clients[k].got);
    sim.run(Duration::from_millis(500));
    assert_eq!(sim.hosts.clients[k].got.len(), 3, "seed {seed}: each once");
    let left: usize = sim.node(home).shards.iter().map(|s| s.session_count()).sum();
    assert_eq!(left, 0, "seed {seed}: the restarted node handed it over");
}

#[test]
fn a_restarted_nodes_sessions_are_registered_again() {
    for seed in seeds() {
        restored_sessions(seed);
    }
}

/// A partition with one client id's persistent session on both sides, messages queued for it on each,
/// then the heal: one session remains in the zone, and the losing one's queued QoS 1 messages are handed
/// to the winner, so the client, reconnecting on any node, gets what both sides queued for it, each once.
fn split_brain(seed: u64) {
    let n = 3;
    let mut sim = Sim::new(seed, n);
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x5b1e);
    let cut = rng.below(n as u64) as usize;
    let (near, other) = ((cut + 1) % n, (cut + 2) % n);
    let id = format!("twin-{}", rng.below(1000));
    let subscribed = |sim: &mut Sim, slot: usize| {
        let c = sim.connect_with(slot, &id, false, None);
        let pid = sim.subscribe(c, "split/#");
        let acked =
            sim.run_until(Duration::from_secs(6), |sim| sim.hosts.clients[c].subacks.contains_key(&pid));
        assert!(acked.is_some(), "seed {seed}: SUBACK on node {slot}");
        sim.disconnect(c);
    };
    subscribed(&mut sim, near);
    sim.wire.group[cut] = 1;
    sim.run(Duration::from_secs(3));
    // The cut-off side grants the id too (available mode), and each side queues messages for it.
    subscribed(&mut sim, cut);
    let mut publishers = Vec::new();
    for (slot, side) in [(other, "near"), (cut, "far")] {
        let p = sim.connect(slot, 0);
        for i in 0..3u16 {
            sim.publish_raw(p, &format!("split/{side}/{i}"), side.as_bytes(), QoS::AtLeastOnce, false, i + 1);
        }
        publishers.push(p);
    }
    let acked = sim.run_until(Duration::from_secs(5), |sim| {
        publishers.iter().all(|&p| sim.hosts.clients[p].acked.len() >= 3)
    });
    assert!(acked.is_some(), "seed {seed}: each side stored its messages");
    for p in publishers {
        sim.disconnect(p);
    }

    sim.wire.group[cut] = 0;
    sim.wait_all_up(Duration::from_secs(15));
    let one = sim.run_until(Duration::from_secs(5), |sim| {
        (0..n).map(|s| sim.node(s).shards.iter().map(|x| x.session_count()).sum::<usize>()).sum::<usize>()
            == 1
    });
    assert!(one.is_some(), "seed {seed}: one session of {id} left in the zone after the heal");
    sim.run(Duration::from_millis(500));

    let x = sim.connect_with(other, &id, false, None);
    assert!(sim.hosts.clients[x].session_present, "seed {seed}");
    let got = sim.run_until(Duration::from_secs(3), |sim| sim.hosts.clients[x].got.len() >= 6);
    sim.run(Duration::from_millis(500));
    let mut topics: Vec<&str> = sim.hosts.clients[x].got.iter().map(|g| g.0.as_str()).collect();
    topics.sort_unstable();
    let want: Vec<String> =
        ["far", "near"].iter().flat_map(|side| (0..3).map(move |i| format!("split/{side}/{i}"))).collect();
    assert!(got.is_some(), "seed {seed}: got {topics:?}");
    assert_eq!(topics, want, "seed {seed}: what both sides queued, each once");
}

#[test]
fn after_a_split_brain_one_session_remains_with_both_sides_messages() {
    for seed in seeds() {
        split_brain(seed);
    }
}

/// A takeover while the old node's links break for a while (from nothing to past the point where it is
/// declared down): whatever the timing, the client's new connection gets every message queued for the
/// session on the old node (with the session, or handed to its new one afterwards), each once.
fn takeover_across_a_broken_link(seed: u64) {
    let n = 3;
    // Durable nodes: a publish is acknowledged once the old node stored it for the session.
    let mut sim = Sim::durable(seed, n);
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x7a4e);
    let old = rng.below(n as u64) as usize;
    let new = (old + 1 + rng.below(n as u64 - 1) as usize) % n;
    let third = (0..n).find(|s| *s != old && *s != new).expect("three nodes");
    let id = format!("flap-{}", rng.below(1000));
    let c = sim.connect_with(old, &id, false, None);
    let pid = sim.subscribe(c, "flap/#");
    let acked = sim.run_until(Duration::from_secs(3), |sim| sim.hosts.clients[c].subacks.contains_key(&pid));
    assert!(acked.is_some(), "seed {seed}: SUBACK");
    sim.disconnect(c);
    let p = sim.connect(third, 0);
    for i in 0..5u16 {
        sim.publish_raw(p, &format!("flap/{i}"), b"queued", QoS::AtLeastOnce, false, i + 1);
    }
    let stored = sim.run_until(Duration::from_secs(3), |sim| sim.hosts.clients[p].acked.len() >= 5);
    assert!(stored.is_some(), "seed {seed}: queued");

    // The CONNECT on the new node, and the old node cut off after a random moment, for a random while.
    let before_cut = Duration::from_millis(rng.below(40));
    let cut_for = Duration::from_millis(100 + rng.below(4000));
    let x = sim.start_connect(new, &id, false, None);
    sim.run(before_cut);
    sim.wire.group[old] = 1;
    sim.run(cut_for);
    sim.wire.group[old] = 0;
    let connacked = sim.run_until(Duration::from_secs(10), |sim| sim.hosts.clients[x].connacked);
    assert!(connacked.is_some(), "seed {seed}: no CONNACK");
    sim.wait_all_up(Duration::from_secs(15));
    let got = sim.run_until(Duration::from_secs(10), |sim| sim.hosts.clients[x].got.len() >= 5);
    sim.run(Duration::from_millis(500));
    let mut topics: Vec<&str> = sim.hosts.clients[x].got.iter().map(|g| g.0.as_str()).collect();
    topics.sort_unstable();
    assert!(
        got.is_some(),
        "seed {seed}: cut after {before_cut:?} for {cut_for:?}; present {}; got {topics:?}; disconnected {:?} closed {}; old {old} new {new}",
        sim.hosts.clients[x].session_present,
        sim.hosts.clients[x].disconnected,
        sim.hosts.clients[x].closed,
    );
    let want: Vec<String> = (0..5).map(|i| format!("flap/{i}")).collect();
    assert_eq!(topics, want, "seed {seed}: each once");
}

#[test]
fn a_takeover_across_a_broken_link_loses_nothing() {
    for seed in seeds() {
        takeover_across_a_broken_link(seed);
    }
    if std::env::var("SHARDMQ_SIM_SEED").is_err() {
        // The new node's registration, resent by its link after the cut to the owner it was first sent
        // to, was granted anew: a new epoch for a connection the node did not have, which ended the
        // session it did (the owner now answers a request it granted with the epoch it has).
        takeover_across_a_broken_link(150912);
    }
}

/// Publishes keep flowing while a session is taken over across nodes (durable nodes: a QoS 1 publish is
/// acknowledged once every node with a persistent subscriber stored it): every acknowledged message
/// reaches the client on its new node.
fn takeover_under_publishes(seed: u64) {
    let n = 3;
    let mut sim = Sim::durable(seed, n);
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0x0b5e);
    let old = rng.below(n as u64) as usize;
    let new = (old + 1 + rng.below(n as u64 - 1) as usize) % n;
    let third = (0..n).find(|s| *s != old && *s != new).expect("three nodes");
    let id = format!("busy-{}", rng.below(1000));
    let c = sim.connect_with(old, &id, false, None);
    let pid = sim.subscribe(c, "busy/#");
    let acked = sim.run_until(Duration::from_secs(3), |sim| sim.hosts.clients[c].subacks.contains_key(&pid));
    assert!(acked.is_some(), "seed {seed}: SUBACK");
    sim.disconnect(c);
    let p = sim.connect(third, 0);
    let x = sim.start_connect(new, &id, false, None);
    let mut sent = Vec::new();
    for i in 0..60u16 {
        let topic = format!("busy/{i}");
        sim.publish_raw(p, &topic, b"m", QoS::AtLeastOnce, false, i + 1);
        sent.push((i + 1, topic));
        sim.run(Duration::from_micros(200 + rng.below(800)));
    }
    let connacked = sim.run_until(Duration::from_secs(5), |sim| sim.hosts.clients[x].connacked);
    assert!(connacked.is_some(), "seed {seed}: no CONNACK");
    sim.run(Duration::from_secs(3));
    let got: Vec<&str> = sim.hosts.clients[x].got.iter().map(|g| g.0.as_str()).collect();
    let acked = &sim.hosts.clients[p].acked;
    let lost: Vec<&str> = sent
        .iter()
        .filter(|(pid, t)| acked.contains_key(pid) && !got.contains(&t.as_str()))
        .map(|(_, t)| t.as_str())
        .collect();
    assert!(
        lost.is_empty(),
        "seed {seed}: acknowledged but lost: {lost:?} (present {})",
        sim.hosts.clients[x].session_present
    );
    // A message published just as the zone's routing switches to the new node can reach it twice (once
    // directly, once forwarded by the old node's stub): at-least-once, as QoS 1 allows.
    let mut once: Vec<&str> = got.clone();
    once.sort_unstable();
    once.dedup();
    if std::env::var("SHARDMQ_SIM_DUPS").is_ok() {
        eprintln!("seed {seed}: {} delivered twice", got.len() - once.len());
    }
}

#[test]
fn a_takeover_under_publishes_loses_no_acknowledged_message() {
    for seed in seeds() {
        takeover_under_publishes(seed);
    }
}

/// A node cut off long enough that every node declares the others down and each rejoins as a new life:
/// foca then knows the others only by their old lives, and stops its own periodic work until someone
/// answers; the nodes announce themselves to every address they know until the zone has formed again.
fn zone_reforms_after_a_cut(seed: u64) {
    let n = 3;
    let mut sim = Sim::new(seed, n);
    sim.wait_all_up(Duration::from_secs(5));
    let mut rng = Rng(seed ^ 0xc07);
    // One node cut off, or every node from every other (then each declares the others down).
    let split = rng.below(2) == 0;
    let cut = rng.below(n as u64) as usize;
    for slot in 0..n {
        sim.wire.group[slot] = if split { slot as u8 + 1 } else { (slot == cut) as u8 };
    }
    sim.run(Duration::from_millis(1_500 + rng.below(4_000)));
    sim.wire.group.iter_mut().for_each(|g| *g = 0);
    sim.wait_all_up(Duration::from_secs(15));
}

#[test]
fn the_zone_reforms_after_a_cut_however_the_lives_renamed() {
    // Seed 128: every node rejoined as a new life and none announced itself again (stuck for good before).
    for seed in support::seeds(&[1, 2, 3, 128]) {
        zone_reforms_after_a_cut(seed);
    }
}
