//! A zone of `Zone`s in one process: gossip datagrams (delays, reordering, loss) and TCP-like byte
//! streams per link (FIFO, delays; a connect to a dead or partitioned node fails; a partition silently
//! stops a stream; a crash resets its streams, or silently drops them when the host vanishes), on a
//! virtual clock driven by `poll_timeout`/`handle_timeout`. Everything random comes from one seed: set
//! `SHARDMQ_SIM_SEED` to replay a failing one (the seed is printed before each run).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shardmq_cluster::link::{self, Forward, Frame};
use shardmq_cluster::{
    LinkCmd, LinkId, MembershipConfig, NodeIdentity, NodeName, Zone, ZoneConfig, ZoneEvent,
};

/// SplitMix64: small, seedable, good enough to drive a simulation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("SHARDMQ_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SHARDMQ_SIM_SEED is a number")],
        Err(_) => vec![1, 2, 3],
    }
}

fn addr(slot: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 20_000 + slot as u16))
}

fn slot_of(a: SocketAddr) -> usize {
    (a.port() - 20_000) as usize
}

fn name(slot: usize) -> NodeName {
    NodeName(format!("node-{slot}").into())
}

struct Node {
    zone: Zone,
    life: u64,
}

/// One TCP connection: side 0 dialed, side 1 accepted.
struct Conn {
    ends: [(usize, u64, LinkId); 2],
    /// Bytes stop flowing (a partition cut it, or a reset): nothing more is delivered.
    broken: bool,
    /// The side closed (or was told it is closed): nothing more is written from or to it.
    closed: [bool; 2],
    /// FIFO: the latest delivery time per direction (towards side i).
    last_at: [Instant; 2],
}

enum Action {
    Datagram {
        to: usize,
        from: SocketAddr,
        data: Vec<u8>,
    },
    /// The connect of `conn`'s side 0 reaches side 1's node: accept there, connected here.
    Accept {
        conn: usize,
    },
    ConnectFailed {
        slot: usize,
        life: u64,
        link: LinkId,
    },
    Bytes {
        conn: usize,
        to: usize,
        data: Vec<u8>,
    },
    Eof {
        conn: usize,
        to: usize,
    },
}

struct Net {
    nodes: Vec<Option<Node>>,
    /// Every event each slot reported (all its lives), with when.
    events: Vec<Vec<(Duration, ZoneEvent)>>,
    start: Instant,
    now: Instant,
    actions: BTreeMap<(Instant, u64), Action>,
    seq: u64,
    rng: Rng,
    /// Per mille of datagrams lost.
    loss: u64,
    group: Vec<u8>,
    conns: Vec<Conn>,
    by_link: HashMap<(usize, u64, LinkId), (usize, usize)>,
    lives: u64,
}

impl Net {
    fn new(seed: u64, n: usize) -> Net {
        Net::with_wrong_secret(seed, n, None)
    }

    /// Node `wrong` (if any) has another cluster secret than the rest.
    fn with_wrong_secret(seed: u64, n: usize, wrong: Option<usize>) -> Net {
        eprintln!("zone sim seed {seed} ({n} nodes); replay with SHARDMQ_SIM_SEED={seed}");
        let now = Instant::now();
        let mut net = Net {
            nodes: (0..n).map(|_| None).collect(),
            events: vec![Vec::new(); n],
            start: now,
            now,
            actions: BTreeMap::new(),
            seq: 0,
            rng: Rng(seed),
            loss: 0,
            group: vec![0; n],
            conns: Vec::new(),
            by_link: HashMap::new(),
            lives: 0,
        };
        for slot in 0..n {
            let secret: &[u8] = if wrong == Some(slot) { b"another secret" } else { b"zone secret" };
            net.boot(slot, 1, Some(secret));
        }
        net
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn boot(&mut self, slot: usize, incarnation: u64, secret: Option<&[u8]>) {
        let id = NodeIdentity::new(&name(slot).0, addr(slot), "z1", "r1", incarnation);
        let mut cfg = ZoneConfig::new(id);
        cfg.secret = secret.map(|s| s.to_vec());
        cfg.seeds = vec![addr(if slot == 0 { 1 } else { 0 })];
        cfg.membership = MembershipConfig { expected_members: self.nodes.len() as u32, ..Default::default() };
        cfg.link_budget_bytes = 1 << 20;
        self.lives += 1;
        let zone = Zone::new(cfg, self.rng.next(), self.now);
        self.nodes[slot] = Some(Node { zone, life: self.lives });
        self.collect(slot);
    }

    /// `silent`: the host vanished (its streams stop); else the process died (its streams reset).
    fn crash(&mut self, slot: usize, silent: bool) {
        let Some(node) = self.nodes[slot].take() else { return };
        for c in 0..self.conns.len() {
            let Some(side) =
                (0..2).find(|&s| self.conns[c].ends[s].0 == slot && self.conns[c].ends[s].1 == node.life)
            else {
                continue;
            };
            self.conns[c].closed[side] = true;
            if silent {
                self.conns[c].broken = true;
            } else {
                self.schedule_eof(c, 1 - side);
            }
        }
    }

    /// Resets every connection between `a` and `b` (both sides see it closed; bytes in flight are lost).
    fn reset(&mut self, a: usize, b: usize) {
        for c in 0..self.conns.len() {
            let ends = self.conns[c].ends;
            if (ends[0].0 == a && ends[1].0 == b) || (ends[0].0 == b && ends[1].0 == a) {
                self.conns[c].broken = true;
                self.schedule_eof(c, 0);
                self.schedule_eof(c, 1);
            }
        }
    }

    fn schedule(&mut self, at: Instant, a: Action) {
        self.seq += 1;
        self.actions.insert((at, self.seq), a);
    }

    fn schedule_eof(&mut self, c: usize, to: usize) {
        let at = (self.now + Duration::from_micros(300)).max(self.conns[c].last_at[to]);
        self.conns[c].last_at[to] = at;
        self.schedule(at, Action::Eof { conn: c, to });
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.group[a] == self.group[b]
    }

    fn zone(&mut self, slot: usize) -> &mut Zone {
        &mut self.nodes[slot].as_mut().expect("a live node").zone
    }

    /// Takes everything `slot` wants done after a call.
    fn collect(&mut self, slot: usize) {
        let elapsed = self.elapsed();
        let Some(node) = self.nodes[slot].as_mut() else { return };
        let life = node.life;
        while let Some(e) = node.zone.poll_event() {
            self.events[slot].push((elapsed, e));
        }
        let mut datagrams = Vec::new();
        while let Some(d) = node.zone.poll_datagram() {
            datagrams.push(d);
        }
        let mut writes = Vec::new();
        while let Some(link) = node.zone.poll_writable() {
            writes.push((link, node.zone.take_link_transmit(link)));
        }
        let mut cmds = Vec::new();
        while let Some(c) = node.zone.poll_link() {
            let last = match c {
                LinkCmd::Close { link } => node.zone.take_link_transmit(link),
                LinkCmd::Connect { .. } => Vec::new(),
            };
            cmds.push((c, last));
        }
        for (to, d) in datagrams {
            let to_slot = slot_of(to);
            if to_slot >= self.nodes.len()
                || !self.reachable(slot, to_slot)
                || self.rng.below(1000) < self.loss
            {
                continue;
            }
            let at = self.now + Duration::from_micros(200 + self.rng.below(3_000));
            self.schedule(at, Action::Datagram { to: to_slot, from: addr(slot), data: d });
        }
        for (link, data) in writes {
            self.write(slot, life, link, data);
        }
        for (cmd, last) in cmds {
            match cmd {
                LinkCmd::Connect { link, addr } => {
                    let to = slot_of(addr);
                    let alive = to < self.nodes.len() && self.nodes[to].is_some();
                    if !alive || !self.reachable(slot, to) {
                        // Refused at once by a dead host's kernel; unreachable takes a while.
                        let d = if alive { Duration::from_millis(300) } else { Duration::from_millis(1) };
                        self.schedule(self.now + d, Action::ConnectFailed { slot, life, link });
                        continue;
                    }
                    let to_life = self.nodes[to].as_ref().expect("alive").life;
                    let c = self.conns.len();
                    self.conns.push(Conn {
                        ends: [(slot, life, link), (to, to_life, LinkId(u64::MAX))],
                        broken: false,
                        closed: [false; 2],
                        last_at: [self.now; 2],
                    });
                    self.by_link.insert((slot, life, link), (c, 0));
                    let at = self.now + Duration::from_micros(300 + self.rng.below(1_000));
                    self.schedule(at, Action::Accept { conn: c });
                }
                LinkCmd::Close { link } => {
                    self.write(slot, life, link, last);
                    let Some(&(c, side)) = self.by_link.get(&(slot, life, link)) else { continue };
                    if !self.conns[c].closed[side] {
                        self.conns[c].closed[side] = true;
                        self.schedule_eof(c, 1 - side);
                    }
                }
            }
        }
    }

    fn write(&mut self, slot: usize, life: u64, link: LinkId, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let Some(&(c, side)) = self.by_link.get(&(slot, life, link)) else { return };
        let to = 1 - side;
        let (a, b) = (self.conns[c].ends[0].0, self.conns[c].ends[1].0);
        if !self.reachable(a, b) {
            self.conns[c].broken = true;
        }
        if self.conns[c].broken || self.conns[c].closed[side] {
            return;
        }
        let at =
            (self.now + Duration::from_micros(200 + self.rng.below(2_000))).max(self.conns[c].last_at[to]);
        self.conns[c].last_at[to] = at;
        self.schedule(at, Action::Bytes { conn: c, to, data });
    }

    /// The live node at the `to` end of a connection, if it is still the life the connection was made to.
    fn end(&self, c: usize, to: usize) -> Option<(usize, LinkId)> {
        let (slot, life, link) = self.conns[c].ends[to];
        let alive = self.nodes[slot].as_ref().is_some_and(|n| n.life == life);
        (alive && !self.conns[c].closed[to]).then_some((slot, link))
    }

    fn apply(&mut self, a: Action) {
        let now = self.now;
        match a {
            Action::Datagram { to, from, data } => {
                if let Some(n) = self.nodes[to].as_mut() {
                    n.zone.handle_datagram(from, &data, now);
                    self.collect(to);
                }
            }
            Action::ConnectFailed { slot, life, link } => {
                if self.nodes[slot].as_ref().is_some_and(|n| n.life == life) {
                    self.zone(slot).handle_link_closed(link, now);
                    self.collect(slot);
                }
            }
            Action::Accept { conn } => {
                let (to, to_life, _) = self.conns[conn].ends[1];
                let ok = self.nodes[to].as_ref().is_some_and(|n| n.life == to_life)
                    && self.reachable(self.conns[conn].ends[0].0, to);
                if !ok {
                    self.conns[conn].closed[1] = true;
                    self.schedule_eof(conn, 0);
                    return;
                }
                let link = self.zone(to).next_link_id();
                self.conns[conn].ends[1].2 = link;
                self.by_link.insert((to, to_life, link), (conn, 1));
                self.zone(to).handle_accepted(link, now);
                self.collect(to);
                if let Some((from, link)) = self.end(conn, 0) {
                    self.zone(from).handle_connected(link, now);
                    self.collect(from);
                }
            }
            Action::Bytes { conn, to, data } => {
                let (a, b) = (self.conns[conn].ends[0].0, self.conns[conn].ends[1].0);
                if !self.reachable(a, b) {
                    self.conns[conn].broken = true;
                }
                if self.conns[conn].broken {
                    return;
                }
                if let Some((slot, link)) = self.end(conn, to) {
                    self.zone(slot).handle_link_bytes(link, &data, now);
                    self.collect(slot);
                }
            }
            Action::Eof { conn, to } => {
                let (a, b) = (self.conns[conn].ends[0].0, self.conns[conn].ends[1].0);
                if !self.reachable(a, b) {
                    return;
                }
                if let Some((slot, link)) = self.end(conn, to) {
                    self.conns[conn].closed[to] = true;
                    self.zone(slot).handle_link_closed(link, now);
                    self.collect(slot);
                }
            }
        }
    }

    /// Runs the zone for `d` of virtual time.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next_action = self.actions.keys().next().map(|(at, _)| *at);
            let next_timer = self.nodes.iter().flatten().filter_map(|n| n.zone.poll_timeout()).min();
            let Some(next) = [next_action, next_timer].into_iter().flatten().min() else { break };
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            while let Some(entry) = self.actions.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let a = entry.remove();
                self.apply(a);
            }
            for slot in 0..self.nodes.len() {
                let due = self.nodes[slot]
                    .as_ref()
                    .and_then(|n| n.zone.poll_timeout())
                    .is_some_and(|t| t <= self.now);
                if due {
                    let now = self.now;
                    self.zone(slot).handle_timeout(now);
                    self.collect(slot);
                }
            }
        }
        self.now = end;
    }

    /// Runs until `cond` holds (checked every 50 ms) or `limit` passes; returns the time it took.
    fn run_until(&mut self, limit: Duration, mut cond: impl FnMut(&mut Net) -> bool) -> Option<Duration> {
        let start = self.now;
        while self.now - start <= limit {
            if cond(self) {
                return Some(self.now - start);
            }
            self.run(Duration::from_millis(50));
        }
        None
    }

    fn up(&self, slot: usize, peer: usize) -> bool {
        self.nodes[slot].as_ref().is_some_and(|n| n.zone.peers_up().any(|p| p.name == name(peer)))
    }

    fn all_up(&self, slots: &[usize]) -> bool {
        slots.iter().all(|&a| slots.iter().all(|&b| a == b || self.up(a, b)))
    }

    /// When `slot` last saw `peer` go down, after `since`.
    fn down_at(&self, slot: usize, peer: usize, since: Duration) -> Option<Duration> {
        self.events[slot].iter().find_map(|(t, e)| match e {
            ZoneEvent::PeerDown { peer: p, .. } if p.name == name(peer) && *t >= since => Some(*t),
            _ => None,
        })
    }

    fn send_counter(&mut self, from: usize, to: usize, n: u64) -> bool {
        let mut frame = Vec::new();
        let payload = n.to_le_bytes();
        let fw = Forward {
            qos: 1,
            retain: false,
            topic: "sim/t",
            payload: &payload,
            properties: &[],
            ack_token: None,
            normal: true,
            groups: Vec::new(),
            expiry_s: None,
        };
        link::encode(&Frame::Forward(fw), &mut frame);
        let ok = self.zone(from).send(&name(to), frame).is_ok();
        self.collect(from);
        ok
    }

    /// The counters `slot` received from `from`, in order.
    fn counters_from(&self, slot: usize, from: usize) -> Vec<u64> {
        self.events[slot]
            .iter()
            .filter_map(|(_, e)| match e {
                ZoneEvent::Frame { from: f, frame } if *f == name(from) => match link::decode(frame) {
                    Ok(Some((Frame::Forward(fw), _))) => {
                        Some(u64::from_le_bytes(fw.payload.try_into().unwrap()))
                    }
                    other => panic!("unexpected frame {other:?}"),
                },
                _ => None,
            })
            .collect()
    }
}

#[test]
fn every_pair_links_up_within_seconds() {
    for seed in seeds() {
        let n = 3 + (seed % 8) as usize;
        let mut net = Net::new(seed, n);
        net.loss = 20;
        let all: Vec<usize> = (0..n).collect();
        let took = net.run_until(Duration::from_secs(5), |net| net.all_up(&all));
        assert!(took.is_some(), "seed {seed}: not all up after 5 s");
        // Exactly one link per pair, and it stays up.
        net.run(Duration::from_secs(3));
        assert!(net.all_up(&all), "seed {seed}");
        for slot in 0..n {
            let z = &net.nodes[slot].as_ref().unwrap().zone;
            assert_eq!(z.peers_up().count(), n - 1, "seed {seed}: node {slot}");
            assert_eq!(z.counters().links_timed_out, 0, "seed {seed}: a healthy link timed out");
            assert!(z.counters().heartbeats_out > 0);
        }
    }
}

#[test]
fn frames_arrive_exactly_once_in_order_across_link_breaks() {
    for seed in seeds() {
        let mut net = Net::new(seed, 3);
        let all = [0, 1, 2];
        net.run_until(Duration::from_secs(5), |net| net.all_up(&all)).expect("all up");
        let (mut next01, mut next10) = (1u64, 1u64);
        let mut rng = Rng(seed ^ 0xabc);
        for round in 0..200 {
            for _ in 0..rng.below(20) {
                if net.send_counter(0, 1, next01) {
                    next01 += 1;
                }
                if net.send_counter(1, 0, next10) {
                    next10 += 1;
                }
            }
            if round % 50 == 25 {
                net.reset(0, 1);
            }
            net.run(Duration::from_millis(1 + rng.below(20)));
        }
        net.run_until(Duration::from_secs(5), |net| net.up(0, 1) && net.up(1, 0)).expect("back up");
        net.run(Duration::from_secs(1));
        assert!(next01 > 500 && next10 > 500, "seed {seed}: too little traffic went ({next01}, {next10})");
        assert_eq!(net.counters_from(1, 0), (1..next01).collect::<Vec<_>>(), "seed {seed}: 0 -> 1");
        assert_eq!(net.counters_from(0, 1), (1..next10).collect::<Vec<_>>(), "seed {seed}: 1 -> 0");
        let c = net.zone(0).counters();
        assert!(c.links_opened >= 5, "seed {seed}: the resets reconnected ({c:?})");
        assert_eq!(c.dropped_resync, 0, "seed {seed}");
    }
}

#[test]
fn a_crashed_node_is_down_everywhere_within_2s_and_its_restart_comes_back_up() {
    for seed in seeds() {
        for silent in [false, true] {
            let n = 4;
            let mut net = Net::new(seed, n);
            let all: Vec<usize> = (0..n).collect();
            net.run_until(Duration::from_secs(5), |net| net.all_up(&all)).expect("all up");
            let victim = 1 + (seed as usize % (n - 1));
            // Frames queued for the old life are dropped when the new one comes.
            let other = (victim + 1) % n;
            let crashed_at = net.elapsed();
            net.crash(victim, silent);
            net.send_counter(other, victim, 1);
            net.run(Duration::from_millis(2000));
            for slot in (0..n).filter(|s| *s != victim) {
                let at = net.down_at(slot, victim, crashed_at);
                assert!(
                    at.is_some_and(|t| t - crashed_at <= Duration::from_secs(2)),
                    "seed {seed} silent {silent}: node {slot} saw {victim} down at {at:?}, crashed at {crashed_at:?}"
                );
                assert!(!net.up(slot, victim));
            }
            net.boot(victim, 2, Some(b"zone secret"));
            let took = net.run_until(Duration::from_secs(6), |net| net.all_up(&all));
            assert!(took.is_some(), "seed {seed} silent {silent}: the restarted node did not come back up");
            for slot in (0..n).filter(|s| *s != victim) {
                let z = &net.nodes[slot].as_ref().unwrap().zone;
                let p = z.peers_up().find(|p| p.name == name(victim)).unwrap();
                assert_eq!(p.incarnation, 2, "seed {seed}");
            }
            assert!(net.zone(other).counters().dropped_resync >= 1, "seed {seed} silent {silent}");
        }
    }
}

#[test]
fn a_partition_puts_each_side_down_within_2s_and_heals() {
    for seed in seeds() {
        let n = 5;
        let mut net = Net::new(seed, n);
        net.loss = 10;
        let all: Vec<usize> = (0..n).collect();
        net.run_until(Duration::from_secs(5), |net| net.all_up(&all)).expect("all up");
        let cut = net.elapsed();
        net.group = vec![0, 0, 1, 1, 1];
        net.run(Duration::from_millis(2100));
        for a in 0..n {
            for b in (0..n).filter(|b| net.group[*b] != net.group[a]) {
                let at = net.down_at(a, b, cut);
                assert!(
                    at.is_some_and(|t| t - cut <= Duration::from_millis(2100)),
                    "seed {seed}: {a} saw {b} down at {at:?}, cut at {cut:?}"
                );
                assert!(!net.up(a, b), "seed {seed}");
            }
            for b in (0..n).filter(|b| *b != a && net.group[*b] == net.group[a]) {
                assert!(net.up(a, b), "seed {seed}: {a} lost {b} on its own side");
            }
        }
        net.group = vec![0; n];
        let took = net.run_until(Duration::from_secs(15), |net| net.all_up(&all));
        assert!(took.is_some(), "seed {seed}: the partition did not heal");
    }
}

#[test]
fn a_node_with_another_secret_never_comes_up_and_is_refused_on_both_sides() {
    for seed in seeds() {
        let n = 4;
        let mut net = Net::with_wrong_secret(seed, n, Some(3));
        net.run(Duration::from_secs(5));
        assert!(net.all_up(&[0, 1, 2]), "seed {seed}");
        for slot in 0..n {
            let up = net.events[slot].iter().any(|(_, e)| match e {
                ZoneEvent::PeerUp { peer } => slot == 3 || peer.name == name(3),
                _ => false,
            });
            assert!(!up, "seed {seed}: node {slot} had the wrong-secret node up (or it had a peer up)");
        }
        let refused = |slot: usize| {
            net.events[slot].iter().filter(|(_, e)| matches!(e, ZoneEvent::Refused { .. })).count()
        };
        assert!(refused(3) >= 1, "seed {seed}: the misconfigured node was never told");
        assert!(refused(0) >= 1, "seed {seed}: its seed never saw the refusal");
        assert!(net.zone(0).counters().membership.refused_secret > 0);
    }
}

#[test]
fn a_seed_replays_exactly() {
    let run = |seed| {
        let mut net = Net::new(seed, 4);
        net.loss = 50;
        net.run(Duration::from_secs(2));
        net.crash(2, false);
        net.run(Duration::from_secs(2));
        format!("{:?}", net.events)
    };
    for seed in seeds() {
        assert_eq!(run(seed), run(seed), "seed {seed}");
    }
}
