//! The simulated network the seeded simulations share (`zone_sim.rs`, `node_sim.rs`): gossip datagrams
//! (delays, reordering, loss) and TCP-like byte streams per link (FIFO, delays; a connect to a dead or
//! partitioned node fails; a partition silently stops a stream; a crash resets its streams, or silently
//! drops them when the host vanishes), on a virtual clock. What runs on each node (a bare `Zone`, or a
//! whole node) is the test's: it implements [`Hosts`], and [`Wire`] feeds the zones through it.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shardmq_cluster::{LinkCmd, LinkId, NodeName, Zone};

/// SplitMix64: small, seedable, good enough to drive a simulation.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

/// The seed in `SHARDMQ_SIM_SEED` (replays one run), else `default`.
pub fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("SHARDMQ_SIM_SEED") {
        Ok(s) => vec![s.trim().parse().expect("SHARDMQ_SIM_SEED is a number")],
        Err(_) => default.to_vec(),
    }
}

pub fn addr(slot: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 20_000 + slot as u16))
}

pub fn slot_of(a: SocketAddr) -> usize {
    (a.port() - 20_000) as usize
}

pub fn name(slot: usize) -> NodeName {
    NodeName(format!("node-{slot}").into())
}

/// The nodes on the wire, as the wire sees them.
pub trait Hosts {
    /// The life (a number unique to each boot) of the node running in `slot`, if one is.
    fn life(&self, slot: usize) -> Option<u64>;
    /// The zone of the live node in `slot`.
    fn zone(&mut self, slot: usize) -> &mut Zone;
    /// The zone of `slot` was given input: the node reacts, then puts what its zone wants sent on the
    /// wire ([`Wire::collect`]).
    fn settle(&mut self, slot: usize, wire: &mut Wire);
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

pub enum Action {
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

pub struct Wire {
    pub start: Instant,
    pub now: Instant,
    actions: BTreeMap<(Instant, u64), Action>,
    seq: u64,
    pub rng: Rng,
    /// Per mille of datagrams lost.
    pub loss: u64,
    /// Partition group per slot: nothing crosses between different groups.
    pub group: Vec<u8>,
    /// Extra stream delay per slot (µs, at most): some nodes sit behind slower links than others, so
    /// frames of different links overtake each other.
    pub slow: Vec<u64>,
    conns: Vec<Conn>,
    by_link: HashMap<(usize, u64, LinkId), (usize, usize)>,
}

impl Wire {
    pub fn new(seed: u64, n: usize) -> Wire {
        // The clock's origin is the only wall-clock reading; everything after it is virtual.
        let now = Instant::now();
        Wire {
            start: now,
            now,
            actions: BTreeMap::new(),
            seq: 0,
            rng: Rng(seed),
            loss: 0,
            group: vec![0; n],
            slow: vec![0; n],
            conns: Vec::new(),
            by_link: HashMap::new(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    pub fn reachable(&self, a: usize, b: usize) -> bool {
        self.group[a] == self.group[b]
    }

    /// When the next action is due.
    pub fn next_at(&self) -> Option<Instant> {
        self.actions.keys().next().map(|(at, _)| *at)
    }

    /// The next action due by `now`.
    pub fn pop_due(&mut self) -> Option<Action> {
        let entry = self.actions.first_entry()?;
        if entry.key().0 > self.now {
            return None;
        }
        Some(entry.remove())
    }

    /// The node in `slot` (life `life`) is gone. `silent`: the host vanished (its streams stop); else
    /// the process died (its streams reset).
    pub fn crash(&mut self, slot: usize, life: u64, silent: bool) {
        for c in 0..self.conns.len() {
            let Some(side) =
                (0..2).find(|&s| self.conns[c].ends[s].0 == slot && self.conns[c].ends[s].1 == life)
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
    pub fn reset(&mut self, a: usize, b: usize) {
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

    /// Puts on the wire what `zone` (the node in `slot`, life `life`) wants sent: datagrams, link
    /// writes, connects and closes. Its events stay in it. `lives`: every slot's live life.
    pub fn collect(&mut self, slot: usize, life: u64, zone: &mut Zone, lives: &[Option<u64>]) {
        let mut datagrams = Vec::new();
        while let Some(d) = zone.poll_datagram() {
            datagrams.push(d);
        }
        let mut writes = Vec::new();
        while let Some(link) = zone.poll_writable() {
            writes.push((link, zone.take_link_transmit(link)));
        }
        let mut cmds = Vec::new();
        while let Some(c) = zone.poll_link() {
            let last = match c {
                LinkCmd::Close { link } => zone.take_link_transmit(link),
                LinkCmd::Connect { .. } => Vec::new(),
            };
            cmds.push((c, last));
        }
        for (to, d) in datagrams {
            let to_slot = slot_of(to);
            if to_slot >= lives.len() || !self.reachable(slot, to_slot) || self.rng.below(1000) < self.loss {
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
                    let to_life = lives.get(to).copied().flatten();
                    let Some(to_life) = to_life.filter(|_| self.reachable(slot, to)) else {
                        // Refused at once by a dead host's kernel; unreachable takes a while.
                        let d = if to_life.is_some() {
                            Duration::from_millis(300)
                        } else {
                            Duration::from_millis(1)
                        };
                        self.schedule(self.now + d, Action::ConnectFailed { slot, life, link });
                        continue;
                    };
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
        let slow = self.slow[a].max(self.slow[b]);
        let jitter = 200 + self.rng.below(2_000) + if slow > 0 { self.rng.below(slow) } else { 0 };
        let at = (self.now + Duration::from_micros(jitter)).max(self.conns[c].last_at[to]);
        self.conns[c].last_at[to] = at;
        self.schedule(at, Action::Bytes { conn: c, to, data });
    }

    /// The live node at the `to` end of a connection, if it is still the life the connection was made to.
    fn end(&self, hosts: &impl Hosts, c: usize, to: usize) -> Option<(usize, LinkId)> {
        let (slot, life, link) = self.conns[c].ends[to];
        let alive = hosts.life(slot) == Some(life);
        (alive && !self.conns[c].closed[to]).then_some((slot, link))
    }

    /// Carries out one action on the hosts' zones.
    pub fn apply(&mut self, a: Action, hosts: &mut impl Hosts) {
        let now = self.now;
        match a {
            Action::Datagram { to, from, data } => {
                if hosts.life(to).is_some() {
                    hosts.zone(to).handle_datagram(from, &data, now);
                    hosts.settle(to, self);
                }
            }
            Action::ConnectFailed { slot, life, link } => {
                if hosts.life(slot) == Some(life) {
                    hosts.zone(slot).handle_link_closed(link, now);
                    hosts.settle(slot, self);
                }
            }
            Action::Accept { conn } => {
                let (to, to_life, _) = self.conns[conn].ends[1];
                let ok = hosts.life(to) == Some(to_life) && self.reachable(self.conns[conn].ends[0].0, to);
                if !ok {
                    self.conns[conn].closed[1] = true;
                    self.schedule_eof(conn, 0);
                    return;
                }
                let link = hosts.zone(to).next_link_id();
                self.conns[conn].ends[1].2 = link;
                self.by_link.insert((to, to_life, link), (conn, 1));
                hosts.zone(to).handle_accepted(link, now);
                hosts.settle(to, self);
                if let Some((from, link)) = self.end(hosts, conn, 0) {
                    hosts.zone(from).handle_connected(link, now);
                    hosts.settle(from, self);
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
                if let Some((slot, link)) = self.end(hosts, conn, to) {
                    hosts.zone(slot).handle_link_bytes(link, &data, now);
                    hosts.settle(slot, self);
                }
            }
            Action::Eof { conn, to } => {
                let (a, b) = (self.conns[conn].ends[0].0, self.conns[conn].ends[1].0);
                if !self.reachable(a, b) {
                    return;
                }
                if let Some((slot, link)) = self.end(hosts, conn, to) {
                    self.conns[conn].closed[to] = true;
                    hosts.zone(slot).handle_link_closed(link, now);
                    hosts.settle(slot, self);
                }
            }
        }
    }
}
