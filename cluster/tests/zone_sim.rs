//! A zone of `Zone`s in one process: gossip datagrams (delays, reordering, loss) and TCP-like byte
//! streams per link (FIFO, delays; a connect to a dead or partitioned node fails; a partition silently
//! stops a stream; a crash resets its streams, or silently drops them when the host vanishes), on a
//! virtual clock driven by `poll_timeout`/`handle_timeout`. Everything random comes from one seed: set
//! `SHARDMQ_SIM_SEED` to replay a failing one (the seed is printed before each run).

mod support;

use std::time::Duration;

use shardmq_cluster::link::{self, Forward, Frame};
use shardmq_cluster::{MembershipConfig, NodeIdentity, Zone, ZoneConfig, ZoneEvent};

use support::{addr, name, Hosts, Rng, Wire};

fn seeds() -> Vec<u64> {
    support::seeds(&[1, 2, 3])
}

struct Node {
    zone: Zone,
    life: u64,
}

/// The zones, one per slot, and what each reported.
struct Zones {
    nodes: Vec<Option<Node>>,
    /// Every event each slot reported (all its lives), with when.
    events: Vec<Vec<(Duration, ZoneEvent)>>,
}

impl Hosts for Zones {
    fn life(&self, slot: usize) -> Option<u64> {
        self.nodes[slot].as_ref().map(|n| n.life)
    }

    fn zone(&mut self, slot: usize) -> &mut Zone {
        &mut self.nodes[slot].as_mut().expect("a live node").zone
    }

    fn settle(&mut self, slot: usize, wire: &mut Wire) {
        let lives: Vec<Option<u64>> = (0..self.nodes.len()).map(|s| self.life(s)).collect();
        let elapsed = wire.elapsed();
        let Some(node) = self.nodes[slot].as_mut() else { return };
        while let Some(e) = node.zone.poll_event() {
            self.events[slot].push((elapsed, e));
        }
        wire.collect(slot, node.life, &mut node.zone, &lives);
    }
}

struct Net {
    wire: Wire,
    hosts: Zones,
    lives: u64,
}

impl Net {
    fn new(seed: u64, n: usize) -> Net {
        Net::with_wrong_secret(seed, n, None)
    }

    /// Node `wrong` (if any) has another cluster secret than the rest.
    fn with_wrong_secret(seed: u64, n: usize, wrong: Option<usize>) -> Net {
        eprintln!("zone sim seed {seed} ({n} nodes); replay with SHARDMQ_SIM_SEED={seed}");
        let mut net = Net {
            wire: Wire::new(seed, n),
            hosts: Zones { nodes: (0..n).map(|_| None).collect(), events: vec![Vec::new(); n] },
            lives: 0,
        };
        for slot in 0..n {
            let secret: &[u8] = if wrong == Some(slot) { b"another secret" } else { b"zone secret" };
            net.boot(slot, 1, Some(secret));
        }
        net
    }

    fn elapsed(&self) -> Duration {
        self.wire.elapsed()
    }

    fn boot(&mut self, slot: usize, incarnation: u64, secret: Option<&[u8]>) {
        let id = NodeIdentity::new(&name(slot).0, addr(slot), "z1", "r1", incarnation);
        let mut cfg = ZoneConfig::new(id);
        cfg.secret = secret.map(|s| s.to_vec());
        cfg.seeds = vec![addr(if slot == 0 { 1 } else { 0 })];
        cfg.membership =
            MembershipConfig { expected_members: self.hosts.nodes.len() as u32, ..Default::default() };
        cfg.link_budget_bytes = 1 << 20;
        self.lives += 1;
        let zone = Zone::new(cfg, self.wire.rng.next(), self.wire.now);
        self.hosts.nodes[slot] = Some(Node { zone, life: self.lives });
        self.hosts.settle(slot, &mut self.wire);
    }

    /// `silent`: the host vanished (its streams stop); else the process died (its streams reset).
    fn crash(&mut self, slot: usize, silent: bool) {
        let Some(node) = self.hosts.nodes[slot].take() else { return };
        self.wire.crash(slot, node.life, silent);
    }

    fn reset(&mut self, a: usize, b: usize) {
        self.wire.reset(a, b);
    }

    fn zone(&mut self, slot: usize) -> &mut Zone {
        self.hosts.zone(slot)
    }

    /// Runs the zone for `d` of virtual time.
    fn run(&mut self, d: Duration) {
        let end = self.wire.now + d;
        loop {
            let next_timer = self.hosts.nodes.iter().flatten().filter_map(|n| n.zone.poll_timeout()).min();
            let Some(next) = [self.wire.next_at(), next_timer].into_iter().flatten().min() else { break };
            if next > end {
                break;
            }
            self.wire.now = self.wire.now.max(next);
            while let Some(a) = self.wire.pop_due() {
                self.wire.apply(a, &mut self.hosts);
            }
            for slot in 0..self.hosts.nodes.len() {
                let due = self.hosts.nodes[slot]
                    .as_ref()
                    .and_then(|n| n.zone.poll_timeout())
                    .is_some_and(|t| t <= self.wire.now);
                if due {
                    let now = self.wire.now;
                    self.zone(slot).handle_timeout(now);
                    self.hosts.settle(slot, &mut self.wire);
                }
            }
        }
        self.wire.now = end;
    }

    /// Runs until `cond` holds (checked every 50 ms) or `limit` passes; returns the time it took.
    fn run_until(&mut self, limit: Duration, mut cond: impl FnMut(&mut Net) -> bool) -> Option<Duration> {
        let start = self.wire.now;
        while self.wire.now - start <= limit {
            if cond(self) {
                return Some(self.wire.now - start);
            }
            self.run(Duration::from_millis(50));
        }
        None
    }

    fn up(&self, slot: usize, peer: usize) -> bool {
        self.hosts.nodes[slot].as_ref().is_some_and(|n| n.zone.peers_up().any(|p| p.name == name(peer)))
    }

    fn all_up(&self, slots: &[usize]) -> bool {
        slots.iter().all(|&a| slots.iter().all(|&b| a == b || self.up(a, b)))
    }

    /// When `slot` last saw `peer` go down, after `since`.
    fn down_at(&self, slot: usize, peer: usize, since: Duration) -> Option<Duration> {
        self.hosts.events[slot].iter().find_map(|(t, e)| match e {
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
            origin: None,
        };
        link::encode(&Frame::Forward(fw), &mut frame);
        let ok = self.zone(from).send(&name(to), frame).is_ok();
        self.hosts.settle(from, &mut self.wire);
        ok
    }

    /// The counters `slot` received from `from`, in order.
    fn counters_from(&self, slot: usize, from: usize) -> Vec<u64> {
        self.hosts.events[slot]
            .iter()
            .filter_map(|(_, e)| match e {
                ZoneEvent::Frames { from: f, frames } if *f == name(from) => Some(frames),
                _ => None,
            })
            .flat_map(|frames| link::frames(frames))
            .map(|f| match f {
                Ok(Frame::Forward(fw)) => u64::from_le_bytes(fw.payload.try_into().unwrap()),
                other => panic!("unexpected frame {other:?}"),
            })
            .collect()
    }
}

#[test]
fn every_pair_links_up_within_seconds() {
    for seed in seeds() {
        let n = 3 + (seed % 8) as usize;
        let mut net = Net::new(seed, n);
        net.wire.loss = 20;
        let all: Vec<usize> = (0..n).collect();
        let took = net.run_until(Duration::from_secs(5), |net| net.all_up(&all));
        assert!(took.is_some(), "seed {seed}: not all up after 5 s");
        // Exactly one link per pair, and it stays up.
        net.run(Duration::from_secs(3));
        assert!(net.all_up(&all), "seed {seed}");
        for slot in 0..n {
            let z = &net.hosts.nodes[slot].as_ref().unwrap().zone;
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
                let z = &net.hosts.nodes[slot].as_ref().unwrap().zone;
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
        net.wire.loss = 10;
        let all: Vec<usize> = (0..n).collect();
        net.run_until(Duration::from_secs(5), |net| net.all_up(&all)).expect("all up");
        let cut = net.elapsed();
        net.wire.group = vec![0, 0, 1, 1, 1];
        net.run(Duration::from_millis(2100));
        for a in 0..n {
            for b in (0..n).filter(|b| net.wire.group[*b] != net.wire.group[a]) {
                let at = net.down_at(a, b, cut);
                assert!(
                    at.is_some_and(|t| t - cut <= Duration::from_millis(2100)),
                    "seed {seed}: {a} saw {b} down at {at:?}, cut at {cut:?}"
                );
                assert!(!net.up(a, b), "seed {seed}");
            }
            for b in (0..n).filter(|b| *b != a && net.wire.group[*b] == net.wire.group[a]) {
                assert!(net.up(a, b), "seed {seed}: {a} lost {b} on its own side");
            }
        }
        net.wire.group = vec![0; n];
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
            let up = net.hosts.events[slot].iter().any(|(_, e)| match e {
                ZoneEvent::PeerUp { peer } => slot == 3 || peer.name == name(3),
                _ => false,
            });
            assert!(!up, "seed {seed}: node {slot} had the wrong-secret node up (or it had a peer up)");
        }
        let refused = |slot: usize| {
            net.hosts.events[slot].iter().filter(|(_, e)| matches!(e, ZoneEvent::Refused { .. })).count()
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
        net.wire.loss = 50;
        net.run(Duration::from_secs(2));
        net.crash(2, false);
        net.run(Duration::from_secs(2));
        format!("{:?}", net.hosts.events)
    };
    for seed in seeds() {
        assert_eq!(run(seed), run(seed), "seed {seed}");
    }
}
