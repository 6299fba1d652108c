//! A zone of nodes in one process: every node's `Membership` wired through a simulated network with a
//! virtual clock, per-datagram delays (so datagrams overtake each other), loss, partitions, crashes and
//! restarts, all driven by a seed. A failing seed replays exactly.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shardmq_cluster::frame::Secret;
use shardmq_cluster::{Membership, MembershipConfig, MembershipEvent, NodeIdentity};

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

struct SimNode {
    m: Membership,
    /// Every event this life reported, with when.
    events: Vec<(Duration, MembershipEvent)>,
}

/// A datagram on the wire: (deliver at, sequence, to slot, from, bytes).
type InFlight = (Instant, u64, usize, SocketAddr, Vec<u8>);

struct Net {
    nodes: Vec<Option<SimNode>>,
    start: Instant,
    now: Instant,
    wire: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    rng: Rng,
    seed: u64,
    /// Per mille of datagrams lost.
    loss: u64,
    /// Partition group per slot: datagrams between different groups are lost.
    group: Vec<u8>,
    cfg: MembershipConfig,
}

fn addr(slot: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + slot as u16))
}

fn name(slot: usize) -> String {
    format!("node-{slot}")
}

impl Net {
    fn new(seed: u64, n: usize) -> Net {
        let now = Instant::now();
        let mut net = Net {
            nodes: (0..n).map(|_| None).collect(),
            start: now,
            now,
            wire: BinaryHeap::new(),
            seq: 0,
            rng: Rng(seed),
            seed,
            loss: 0,
            group: vec![0; n],
            cfg: MembershipConfig { expected_members: n as u32, ..MembershipConfig::default() },
        };
        for slot in 0..n {
            net.boot(slot, 1, None);
        }
        net
    }

    /// Starts `slot` (a new life with `incarnation`) and has it join slot 0 (slot 0 joins slot 1).
    fn boot(&mut self, slot: usize, incarnation: u64, secret: Option<&[u8]>) {
        let id = NodeIdentity::new(&name(slot), addr(slot), "z1", "r1", incarnation);
        let seed = self.rng.next();
        let mut m = Membership::new(id, &self.cfg, secret.map(Secret::new), seed, self.now);
        m.join(addr(if slot == 0 { 1 } else { 0 }), self.now);
        self.nodes[slot] = Some(SimNode { m, events: Vec::new() });
        self.collect(slot);
    }

    fn crash(&mut self, slot: usize) {
        self.nodes[slot] = None;
    }

    fn collect(&mut self, slot: usize) {
        let elapsed = self.now - self.start;
        let Some(node) = self.nodes[slot].as_mut() else { return };
        while let Some(e) = node.m.poll_event() {
            node.events.push((elapsed, e));
        }
        while let Some((to, d)) = node.m.poll_transmit() {
            let to_slot = (to.port() - 10_000) as usize;
            if to_slot >= self.group.len() || self.group[to_slot] != self.group[slot] {
                continue;
            }
            if self.rng.below(1000) < self.loss {
                continue;
            }
            let delay = Duration::from_micros(200 + self.rng.below(5_000));
            self.seq += 1;
            self.wire.push(Reverse((self.now + delay, self.seq, to_slot, addr(slot), d)));
        }
    }

    /// Runs the zone for `d` of virtual time.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next_wire = self.wire.peek().map(|Reverse((at, ..))| *at);
            let next_timer = self.nodes.iter().flatten().filter_map(|n| n.m.poll_timeout()).min();
            let Some(next) = [next_wire, next_timer].into_iter().flatten().min() else { break };
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            while self.wire.peek().is_some_and(|Reverse((at, ..))| *at <= self.now) {
                let Reverse((_, _, to, from, d)) = self.wire.pop().expect("peeked");
                if let Some(n) = self.nodes[to].as_mut() {
                    n.m.handle_datagram(from, &d, self.now);
                    self.collect(to);
                }
            }
            for slot in 0..self.nodes.len() {
                if let Some(n) = self.nodes[slot].as_mut() {
                    if n.m.poll_timeout().is_some_and(|t| t <= self.now) {
                        n.m.handle_timeout(self.now);
                        self.collect(slot);
                    }
                }
            }
        }
        self.now = end;
    }

    /// The names (with incarnations) `slot` believes up.
    fn view(&self, slot: usize) -> BTreeSet<(String, u64)> {
        let n = self.nodes[slot].as_ref().expect("a live node");
        n.m.members().map(|id| (id.name.to_string(), id.incarnation)).collect()
    }

    /// Every live node sees exactly the other live nodes of its partition group, in their current lives.
    fn converged(&self) -> Result<(), String> {
        for slot in self.live() {
            let want: BTreeSet<(String, u64)> = self
                .live()
                .filter(|o| *o != slot && self.group[*o] == self.group[slot])
                .map(|o| (name(o), self.nodes[o].as_ref().unwrap().m.identity().incarnation))
                .collect();
            let got = self.view(slot);
            if got != want {
                return Err(format!("seed {}: node {slot} sees {got:?}, want {want:?}", self.seed));
            }
        }
        Ok(())
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|s| self.nodes[*s].is_some())
    }

    /// Runs until converged, for at most `limit`; returns how long it took.
    fn until_converged(&mut self, limit: Duration) -> Duration {
        let t0 = self.now;
        while self.converged().is_err() {
            assert!(
                self.now - t0 < limit,
                "not converged after {limit:?}: {}",
                self.converged().unwrap_err()
            );
            self.run(Duration::from_millis(100));
        }
        self.now - t0
    }
}

const SEEDS: u64 = 8;

#[test]
fn a_zone_converges_from_one_join_each() {
    for seed in 0..SEEDS {
        let mut net = Net::new(seed, 10);
        let took = net.until_converged(Duration::from_secs(10));
        eprintln!("seed {seed}: converged after {took:?}");
        assert!(took <= Duration::from_secs(5), "seed {seed}: converged only after {took:?}");
    }
}

#[test]
fn fifty_nodes_converge() {
    let mut net = Net::new(7, 50);
    net.until_converged(Duration::from_secs(20));
}

#[test]
fn a_crashed_node_is_declared_down_by_every_other_within_seconds() {
    for seed in 0..SEEDS {
        let mut net = Net::new(seed, 8);
        net.until_converged(Duration::from_secs(10));
        let crashed_at = net.now - net.start;
        net.crash(3);
        net.until_converged(Duration::from_secs(6));
        for slot in net.live().collect::<Vec<_>>() {
            let n = net.nodes[slot].as_ref().unwrap();
            let down = n
                .events
                .iter()
                .find(|(_, e)| matches!(e, MembershipEvent::Down(id) if id.name.to_string() == name(3)))
                .map(|(t, _)| *t - crashed_at)
                .unwrap_or_else(|| panic!("seed {seed}: node {slot} never saw node 3 down"));
            // A probe round to notice, the probe RTT, then the suspicion period.
            eprintln!("seed {seed}: node {slot} saw node 3 down after {down:?}");
            assert!(
                down <= Duration::from_secs(4),
                "seed {seed}: node {slot} saw node 3 down after {down:?}"
            );
        }
    }
}

#[test]
fn a_restarted_node_is_a_new_member_and_its_old_life_goes_down() {
    for seed in 0..SEEDS {
        let mut net = Net::new(seed, 6);
        net.until_converged(Duration::from_secs(10));
        net.crash(2);
        net.run(Duration::from_millis(300)); // restarted before anyone noticed
        net.boot(2, 2, None);
        net.until_converged(Duration::from_secs(10));
        for slot in net.live().filter(|s| *s != 2).collect::<Vec<_>>() {
            assert!(
                net.view(slot).contains(&(name(2), 2)),
                "seed {seed}: node {slot} lacks node 2's new life"
            );
            assert!(!net.view(slot).contains(&(name(2), 1)), "seed {seed}: node {slot} keeps the old life");
        }
    }
}

#[test]
fn a_node_with_another_secret_cannot_join_and_is_counted() {
    let mut net = Net::new(3, 5);
    // Rebuild the zone with a secret, plus one node holding another.
    for slot in 0..4 {
        net.boot(slot, 2, Some(b"zone secret"));
    }
    net.boot(4, 2, Some(b"another secret"));
    net.run(Duration::from_secs(10));
    for slot in 0..4 {
        let view = net.view(slot);
        assert!(!view.iter().any(|(n, _)| *n == name(4)), "node {slot} let the stranger in: {view:?}");
        assert_eq!(view.len(), 3, "node {slot}: {view:?}");
    }
    assert!(net.view(4).is_empty(), "the stranger learned members: {:?}", net.view(4));
    let refused: u64 = (0..5).map(|s| net.nodes[s].as_ref().unwrap().m.counters().refused_secret).sum();
    assert!(refused > 0);
    // Without any secret, the stranger is refused the same way.
    net.boot(4, 3, None);
    net.run(Duration::from_secs(5));
    assert!(net.view(4).is_empty());
}

#[test]
fn a_partition_splits_the_zone_and_healing_merges_it_again() {
    for seed in 0..SEEDS {
        let mut net = Net::new(seed, 8);
        net.until_converged(Duration::from_secs(10));
        net.group = vec![0, 0, 0, 0, 1, 1, 1, 1];
        net.until_converged(Duration::from_secs(10));
        net.group = vec![0; 8];
        let took = net.until_converged(Duration::from_secs(20));
        eprintln!("seed {seed}: healed after {took:?}");
        assert!(took <= Duration::from_secs(12), "seed {seed}: healed only after {took:?}");
    }
}

#[test]
fn membership_converges_despite_lost_datagrams() {
    for seed in 0..SEEDS {
        let mut net = Net::new(seed, 10);
        net.loss = 100; // 10%
        net.until_converged(Duration::from_secs(20));
        net.crash(5);
        net.until_converged(Duration::from_secs(20));
    }
}

#[test]
fn a_node_that_leaves_is_down_everywhere_sooner_than_a_crash() {
    let mut took = Vec::new();
    for seed in 0..SEEDS {
        let mut net = Net::new(seed, 6);
        net.until_converged(Duration::from_secs(10));
        let now = net.now;
        net.nodes[4].as_mut().unwrap().m.leave(now);
        net.collect(4);
        net.run(Duration::from_millis(50)); // its goodbye is on the wire; then the process is gone
        net.crash(4);
        took.push(net.until_converged(Duration::from_secs(5)));
    }
    took.sort();
    eprintln!("leave seen everywhere after {took:?}");
    // The goodbye reaches a few members at once and spreads by gossip; a member it misses still finds
    // out by probing (as for a crash, about 2-4 s here).
    assert!(took[took.len() / 2] < Duration::from_secs(1), "median {:?}", took[took.len() / 2]);
}
