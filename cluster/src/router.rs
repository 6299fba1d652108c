//! Interest routing in a zone, sans I/O: which peers a publish goes to, what this node announces, and
//! when a SUBACK may leave.
//!
//! Each node announces its node-level interest ([`crate::interest`]) to every peer that is up: a snapshot
//! when the peer comes up (or its link resyncs), then the 0 ↔ 1 deltas. A delta that adds interest carries
//! a token; every peer up in this node's view answers it once applied, and the SUBACK of the subscription
//! that caused it waits for all of them ([`ZoneRouter::poll_completed`]): so a publish started on any node
//! after the client got its SUBACK reaches it. A peer that goes down is not waited for; a peer that does
//! not answer within the timeout is not waited for either, and that is counted and logged.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use shardmq_wire::topic;

use crate::bytes::{ReadError, Reader};
use crate::interest::{Delta, LocalInterest, PeerInterest, Snapshot, SnapshotError};
use crate::NodeName;

/// What goes to a peer over its link.
#[derive(Debug, Clone)]
pub enum Announce {
    Snapshot(Snapshot),
    /// Deltas that follow snapshot `generation`; `token`: answer with [`Announce::Ack`] once applied.
    Deltas {
        generation: u64,
        deltas: Vec<Delta>,
        token: Option<u64>,
    },
    Ack {
        token: u64,
    },
}

/// Why an announcement from a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    #[error("announcement truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown announcement kind {0}")]
    UnknownKind(u8),
    #[error("unknown interest delta kind {0}")]
    UnknownDelta(u8),
    #[error("announcement: a filter is not valid UTF-8 or not a valid filter")]
    BadFilter,
    #[error("announcement: {0} bytes left over")]
    Trailing(usize),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl From<ReadError> for AnnounceError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Short { at } => AnnounceError::Truncated(at),
            ReadError::VarintTooLong => AnnounceError::Truncated(0),
        }
    }
}

const A_SNAPSHOT: u8 = 1;
const A_DELTAS: u8 = 2;
const A_ACK: u8 = 3;
const D_ADD: u8 = 1;
const D_REMOVE: u8 = 2;
const D_MEMBERS: u8 = 3;
const HAS_TOKEN: u8 = 1;

/// Announcement layout (what a [`crate::link::Frame::Interest`] carries; integers little-endian):
/// `kind u8 | body`. Snapshot: the [`Snapshot`] encoding. Deltas: `generation u64 | has_token u8 |
/// [token u64] | count u32 | count × (kind u8 | filter u16-length UTF-8 | [members u32 for Members])`.
/// Ack: `token u64`. Filters are MQTT strings (at most 65,535 bytes), like the snapshot's.
impl Announce {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Announce::Snapshot(s) => {
                out.push(A_SNAPSHOT);
                s.encode(out);
            }
            Announce::Deltas { generation, deltas, token } => {
                out.push(A_DELTAS);
                out.extend_from_slice(&generation.to_le_bytes());
                match token {
                    Some(t) => {
                        out.push(HAS_TOKEN);
                        out.extend_from_slice(&t.to_le_bytes());
                    }
                    None => out.push(0),
                }
                out.extend_from_slice(&(deltas.len() as u32).to_le_bytes());
                for d in deltas {
                    let (kind, f, members) = match d {
                        Delta::Add(f) => (D_ADD, f, None),
                        Delta::Remove(f) => (D_REMOVE, f, None),
                        Delta::Members { filter, count } => (D_MEMBERS, filter, Some(*count)),
                    };
                    debug_assert!(f.len() <= u16::MAX as usize, "filters are MQTT strings");
                    out.push(kind);
                    out.extend_from_slice(&(f.len() as u16).to_le_bytes());
                    out.extend_from_slice(f.as_bytes());
                    if let Some(m) = members {
                        out.extend_from_slice(&m.to_le_bytes());
                    }
                }
            }
            Announce::Ack { token } => {
                out.push(A_ACK);
                out.extend_from_slice(&token.to_le_bytes());
            }
        }
    }

    /// Decodes a peer's announcement; refuses invalid filters (a shared one where a plain one belongs and
    /// the reverse) so that nothing invalid reaches the interest tables. Never panics.
    pub fn decode(b: &[u8]) -> Result<Announce, AnnounceError> {
        let mut r = Reader::new(b);
        let a = match r.u8()? {
            A_SNAPSHOT => return Ok(Announce::Snapshot(Snapshot::decode(&b[1..])?)),
            A_DELTAS => {
                let generation = r.u64()?;
                let token = match r.u8()? {
                    0 => None,
                    _ => Some(r.u64()?),
                };
                let n = r.u32()? as usize;
                // Each delta takes at least 3 bytes: a lying count cannot reserve much.
                let mut deltas = Vec::with_capacity(n.min(b.len() / 3));
                for _ in 0..n {
                    let kind = r.u8()?;
                    let len = r.u16()? as usize;
                    let f = std::str::from_utf8(r.take(len)?).map_err(|_| AnnounceError::BadFilter)?;
                    let shared = topic::parse_shared(f).is_some();
                    let d = match kind {
                        D_ADD | D_REMOVE if shared || !topic::valid_topic_filter(f) => {
                            return Err(AnnounceError::BadFilter)
                        }
                        D_ADD => Delta::Add(f.into()),
                        D_REMOVE => Delta::Remove(f.into()),
                        D_MEMBERS if !shared => return Err(AnnounceError::BadFilter),
                        D_MEMBERS => Delta::Members { filter: f.into(), count: r.u32()? },
                        k => return Err(AnnounceError::UnknownDelta(k)),
                    };
                    deltas.push(d);
                }
                Announce::Deltas { generation, deltas, token }
            }
            A_ACK => Announce::Ack { token: r.u64()? },
            k => return Err(AnnounceError::UnknownKind(k)),
        };
        if !r.is_done() {
            return Err(AnnounceError::Trailing(b.len() - r.pos()));
        }
        Ok(a)
    }
}

/// The node that gets a shared group's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedTarget {
    Local,
    Peer(NodeName),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RouterCounters {
    /// SUBACKs released because a peer did not acknowledge in time.
    pub ack_timeouts: u64,
    /// Announcements from a node that is not (or no longer) a peer.
    pub from_unknown: u64,
}

struct PendingAck {
    waiting: HashSet<NodeName>,
    deadline: Instant,
}

pub struct ZoneRouter {
    local: LocalInterest,
    peers: HashMap<NodeName, PeerInterest>,
    pending: BTreeMap<u64, PendingAck>,
    /// The token a filter's announcement waits for: a second subscriber to the filter meanwhile waits
    /// for the same one (its SUBACK must not overtake the first one's).
    pending_filters: HashMap<Box<str>, u64>,
    next_token: u64,
    ack_timeout: Duration,
    out: VecDeque<(NodeName, Announce)>,
    completed: VecDeque<u64>,
    /// Round-robin position per shared subscription; dropped when the group has no member left.
    shared_rr: HashMap<Box<str>, u64>,
    counters: RouterCounters,
}

impl ZoneRouter {
    pub fn new(ack_timeout: Duration) -> ZoneRouter {
        ZoneRouter {
            local: LocalInterest::default(),
            peers: HashMap::new(),
            pending: BTreeMap::new(),
            pending_filters: HashMap::new(),
            next_token: 1,
            ack_timeout,
            out: VecDeque::new(),
            completed: VecDeque::new(),
            shared_rr: HashMap::new(),
            counters: RouterCounters::default(),
        }
    }

    pub fn counters(&self) -> RouterCounters {
        self.counters
    }

    /// A peer is up (membership) and its link open, or its link resynced: it gets this node's whole
    /// interest, and starts from nothing of its own until it sends its snapshot.
    pub fn peer_up(&mut self, peer: NodeName) {
        let snap = self.local.snapshot();
        self.peers.insert(peer.clone(), PeerInterest::default());
        self.out.push_back((peer, Announce::Snapshot(snap)));
    }

    /// A peer is down: nothing more is forwarded to it, and no SUBACK waits for it.
    pub fn peer_down(&mut self, peer: &NodeName) {
        self.peers.remove(peer);
        // What was still to be told to it is moot: it gets a whole snapshot when it is up again.
        self.out.retain(|(p, _)| p != peer);
        self.prune_shared_rr();
        let done: Vec<u64> = self
            .pending
            .iter_mut()
            .filter_map(|(t, p)| (p.waiting.remove(peer) && p.waiting.is_empty()).then_some(*t))
            .collect();
        for t in done {
            self.finish(t);
        }
    }

    fn finish(&mut self, token: u64) {
        self.pending.remove(&token);
        self.pending_filters.retain(|_, t| *t != token);
        self.completed.push_back(token);
    }

    /// A local subscriber to `filter`. Returns the token its SUBACK waits for (see
    /// [`ZoneRouter::poll_completed`]; several subscriptions may wait for one token), or `None` when it
    /// need not wait (the peers know the filter already, or there is no peer).
    pub fn subscribe(&mut self, filter: &str, now: Instant) -> Option<u64> {
        self.local.add(filter);
        let (generation, deltas) = self.local.take_deltas();
        if deltas.is_empty() {
            return self.pending_filters.get(filter).copied();
        }
        if self.peers.is_empty() {
            return None;
        }
        let token = self.await_every_peer(now);
        self.pending_filters.insert(filter.into(), token);
        self.broadcast(generation, deltas, Some(token));
        Some(token)
    }

    /// An announcement of nothing that every peer up acknowledges: when its token completes (see
    /// [`ZoneRouter::poll_completed`]), every frame a peer sent this node before it handled the barrier
    /// has arrived (links keep order), or the peer went down or timed out. `None` without peers.
    pub fn barrier(&mut self, now: Instant) -> Option<u64> {
        if self.peers.is_empty() {
            return None;
        }
        let token = self.await_every_peer(now);
        let generation = self.local.generation();
        for p in self.peers.keys() {
            let a = Announce::Deltas { generation, deltas: Vec::new(), token: Some(token) };
            self.out.push_back((p.clone(), a));
        }
        Some(token)
    }

    /// A new token that completes once every peer up now acknowledged it (or went, or timed out).
    fn await_every_peer(&mut self, now: Instant) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        let waiting: HashSet<NodeName> = self.peers.keys().cloned().collect();
        self.pending.insert(token, PendingAck { waiting, deadline: now + self.ack_timeout });
        token
    }

    pub fn unsubscribe(&mut self, filter: &str) {
        self.local.remove(filter);
        self.prune_shared_rr();
        let (generation, deltas) = self.local.take_deltas();
        self.broadcast(generation, deltas, None);
    }

    fn broadcast(&mut self, generation: u64, deltas: Vec<Delta>, token: Option<u64>) {
        if deltas.is_empty() {
            return;
        }
        for p in self.peers.keys() {
            let a = Announce::Deltas { generation, deltas: deltas.clone(), token };
            self.out.push_back((p.clone(), a));
        }
    }

    /// An announcement from a peer.
    pub fn handle(&mut self, from: &NodeName, a: Announce) {
        match a {
            Announce::Ack { token } => {
                if let Some(p) = self.pending.get_mut(&token) {
                    p.waiting.remove(from);
                    if p.waiting.is_empty() {
                        self.finish(token);
                    }
                }
            }
            Announce::Snapshot(s) => match self.peers.get_mut(from) {
                Some(p) => p.apply_snapshot(s),
                None => self.counters.from_unknown += 1,
            },
            Announce::Deltas { generation, deltas, token } => {
                let Some(p) = self.peers.get_mut(from) else {
                    self.counters.from_unknown += 1;
                    return;
                };
                for d in &deltas {
                    p.apply_delta(generation, d);
                }
                if deltas.iter().any(|d| matches!(d, Delta::Members { count: 0, .. })) {
                    self.prune_shared_rr();
                }
                if let Some(token) = token {
                    self.out.push_back((from.clone(), Announce::Ack { token }));
                }
            }
        }
    }

    /// Releases SUBACKs whose peers did not answer in time (counted, logged).
    pub fn handle_timeout(&mut self, now: Instant) {
        let late: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(t, _)| *t).collect();
        for t in late {
            if let Some(p) = self.pending.get(&t) {
                self.counters.ack_timeouts += 1;
                tracing::warn!(token = t, waiting = ?p.waiting, "interest not acknowledged in time; SUBACK sent anyway");
                self.finish(t);
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    pub fn poll_announce(&mut self) -> Option<(NodeName, Announce)> {
        self.out.pop_front()
    }

    /// A SUBACK that may leave now.
    pub fn poll_completed(&mut self) -> Option<u64> {
        self.completed.pop_front()
    }

    /// For every shared subscription (`$share/group/filter`) matching `topic` with members anywhere in the
    /// zone, the one node that gets this message: weighted round robin over the nodes by their member
    /// counts, so messages spread evenly over members. Linear in the zone's shared subscriptions.
    pub fn shared_targets(&mut self, topic: &str) -> Vec<(Box<str>, SharedTarget)> {
        let mut filters: Vec<&str> = self
            .local
            .shared()
            .map(|(f, _)| f)
            .chain(self.peers.values().flat_map(|p| p.shared().map(|(f, _)| f)))
            .filter(|f| shardmq_wire::topic::matches(f, topic))
            .collect();
        filters.sort_unstable();
        filters.dedup();
        let mut out = Vec::with_capacity(filters.len());
        for f in filters {
            let mut nodes: Vec<(SharedTarget, u32)> = vec![(SharedTarget::Local, self.local.count(f))];
            let mut peers: Vec<(&NodeName, u32)> =
                self.peers.iter().map(|(n, p)| (n, p.members(f))).filter(|(_, m)| *m > 0).collect();
            peers.sort_unstable();
            nodes.extend(peers.into_iter().map(|(n, m)| (SharedTarget::Peer(n.clone()), m)));
            let total: u64 = nodes.iter().map(|(_, m)| *m as u64).sum();
            if total == 0 {
                continue;
            }
            let rr = self.shared_rr.entry(f.into()).or_insert(0);
            let mut pick = *rr % total;
            *rr = rr.wrapping_add(1);
            for (target, m) in nodes {
                if pick < m as u64 {
                    out.push((f.into(), target));
                    break;
                }
                pick -= m as u64;
            }
        }
        out
    }

    /// Members of a shared subscription in the zone, as this node knows them.
    pub fn shared_members(&self, filter: &str) -> u32 {
        self.local.count(filter) + self.peers.values().map(|p| p.members(filter)).sum::<u32>()
    }

    fn prune_shared_rr(&mut self) {
        let (local, peers) = (&self.local, &self.peers);
        self.shared_rr.retain(|f, _| local.count(f) > 0 || peers.values().any(|p| p.members(f) > 0));
    }

    /// Every shared subscription (`$share/group/filter`) with members on some peer, and their number in
    /// all peers together.
    pub fn peer_shared(&self) -> HashMap<Box<str>, u32> {
        let mut out: HashMap<Box<str>, u32> = HashMap::new();
        for p in self.peers.values() {
            for (f, m) in p.shared() {
                *out.entry(f.into()).or_default() += m;
            }
        }
        out
    }

    /// The peer that gets a shared group's message the node itself does not deliver: weighted round
    /// robin over the peers by their member counts. `None` when no peer has a member.
    pub fn pick_peer(&mut self, shared_filter: &str) -> Option<NodeName> {
        let mut peers: Vec<(&NodeName, u32)> =
            self.peers.iter().map(|(n, p)| (n, p.members(shared_filter))).filter(|(_, m)| *m > 0).collect();
        peers.sort_unstable();
        let total: u64 = peers.iter().map(|(_, m)| *m as u64).sum();
        if total == 0 {
            return None;
        }
        let rr = self.shared_rr.entry(shared_filter.into()).or_insert(0);
        let mut pick = *rr % total;
        *rr = rr.wrapping_add(1);
        for (n, m) in peers {
            if pick < m as u64 {
                return Some(n.clone());
            }
            pick -= m as u64;
        }
        None
    }

    /// The peers a publish to `topic` goes to: every one whose interest may match (never one fewer).
    pub fn route<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a NodeName> + 'a {
        self.peers.iter().filter(move |(_, p)| p.may_match(topic)).map(|(n, _)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn announcements_round_trip() {
        let mut local = LocalInterest::default();
        for f in ["a/b", "a/+", "$share/g/x/#", "c"] {
            local.add(f);
        }
        let _ = local.take_deltas();
        let snap = local.snapshot();
        let deltas = vec![
            Delta::Add("x/y".into()),
            Delta::Remove("x/#".into()),
            Delta::Members { filter: "$share/g/x".into(), count: 3 },
        ];
        let cases = vec![
            Announce::Deltas { generation: 7, deltas: deltas.clone(), token: Some(9) },
            Announce::Deltas { generation: 0, deltas: Vec::new(), token: None },
            Announce::Ack { token: u64::MAX },
        ];
        for a in cases {
            let mut out = Vec::new();
            a.encode(&mut out);
            let back = Announce::decode(&out).unwrap();
            assert_eq!(format!("{back:?}"), format!("{a:?}"));
            for cut in 0..out.len() {
                assert!(Announce::decode(&out[..cut]).is_err(), "cut at {cut}");
            }
        }
        let mut out = Vec::new();
        Announce::Snapshot(snap.clone()).encode(&mut out);
        let Ok(Announce::Snapshot(back)) = Announce::decode(&out) else { panic!("a snapshot") };
        let mut peer = PeerInterest::default();
        peer.apply_snapshot(back);
        assert!(peer.may_match("a/b") && peer.may_match("a/z") && peer.may_match("c"));
        assert_eq!(peer.members("$share/g/x/#"), 1);
        // A shared filter where a plain one belongs is refused.
        let mut out = Vec::new();
        Announce::Deltas { generation: 1, deltas: vec![Delta::Add("$share/g/x".into())], token: None }
            .encode(&mut out);
        assert_eq!(Announce::decode(&out).unwrap_err(), AnnounceError::BadFilter);
    }

    proptest! {
        #[test]
        fn arbitrary_announcements_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Announce::decode(&b);
            for kind in [A_SNAPSHOT, A_DELTAS, A_ACK] {
                let mut v = vec![kind];
                v.extend_from_slice(&b);
                let _ = Announce::decode(&v);
            }
        }
    }

    /// A few routers wired by per-pair FIFO links, with a seeded choice of which link delivers next.
    struct Zone {
        nodes: Vec<ZoneRouter>,
        names: Vec<NodeName>,
        links: BTreeMap<(usize, usize), VecDeque<Announce>>,
        up: Vec<bool>,
        rng: u64,
        now: Instant,
    }

    impl Zone {
        fn new(n: usize, seed: u64) -> Zone {
            let names: Vec<NodeName> = (0..n).map(|i| NodeName(format!("n{i}").into())).collect();
            let mut z = Zone {
                nodes: (0..n).map(|_| ZoneRouter::new(Duration::from_secs(2))).collect(),
                names,
                links: BTreeMap::new(),
                up: vec![true; n],
                rng: seed | 1,
                now: Instant::now(),
            };
            for a in 0..n {
                for b in 0..n {
                    if a != b {
                        let name = z.names[b].clone();
                        z.nodes[a].peer_up(name);
                    }
                }
            }
            z.pump();
            z
        }

        fn next(&mut self) -> u64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng
        }

        fn index(&self, n: &NodeName) -> usize {
            self.names.iter().position(|x| x == n).unwrap()
        }

        /// Moves announcements onto links, then delivers `steps` of them in a random link order (all if
        /// `None`).
        fn step(&mut self, steps: Option<usize>) {
            let mut delivered = 0;
            loop {
                for a in 0..self.nodes.len() {
                    while let Some((to, m)) = self.nodes[a].poll_announce() {
                        let b = self.index(&to);
                        if self.up[a] && self.up[b] {
                            self.links.entry((a, b)).or_default().push_back(m);
                        }
                    }
                }
                if steps.is_some_and(|s| delivered >= s) {
                    return;
                }
                let busy: Vec<(usize, usize)> =
                    self.links.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
                if busy.is_empty() {
                    return;
                }
                let (a, b) = busy[(self.next() % busy.len() as u64) as usize];
                let m = self.links.get_mut(&(a, b)).unwrap().pop_front().unwrap();
                let from = self.names[a].clone();
                self.nodes[b].handle(&from, m);
                delivered += 1;
            }
        }

        fn pump(&mut self) {
            self.step(None);
        }
    }

    #[test]
    fn a_barrier_completes_once_every_peer_answered_and_changes_nothing() {
        let mut z = Zone::new(3, 7);
        let now = z.now;
        assert!(Zone::new(1, 1).nodes[0].barrier(now).is_none(), "no peer: nothing to wait for");
        z.nodes[1].subscribe("keep/#", now);
        z.pump();
        while z.nodes[1].poll_completed().is_some() {}
        let token = z.nodes[0].barrier(now).expect("peers up");
        z.step(Some(3));
        assert!(z.nodes[0].poll_completed().is_none(), "answers still on their way");
        z.pump();
        assert_eq!(z.nodes[0].poll_completed(), Some(token));
        let routed: Vec<_> = z.nodes[0].route("keep/1").cloned().collect();
        assert_eq!(routed, vec![z.names[1].clone()], "the peers' interest is untouched");
    }

    #[test]
    fn a_suback_waits_for_every_peer_and_then_every_publish_reaches_the_subscriber() {
        for seed in 1..50u64 {
            let mut z = Zone::new(4, seed);
            let now = z.now;
            let token = z.nodes[2].subscribe("dev/+/state", now).expect("new interest with peers up");
            z.step(Some(2));
            // Three deltas out and three acknowledgements back take six deliveries.
            assert!(z.nodes[2].poll_completed().is_none());
            z.pump();
            assert_eq!(z.nodes[2].poll_completed(), Some(token));
            for n in [0, 1, 3] {
                let routed: Vec<_> = z.nodes[n].route("dev/7/state").cloned().collect();
                assert_eq!(routed, vec![z.names[2].clone()], "seed {seed}: node {n}");
            }
        }
    }

    #[test]
    fn random_subscriptions_never_miss_a_publish_after_their_suback() {
        for seed in 1..40u64 {
            let mut z = Zone::new(4, seed);
            // (node, filter) whose SUBACK was released, still subscribed.
            let mut acked: Vec<(usize, String)> = Vec::new();
            let mut tokens: HashMap<(usize, u64), Vec<String>> = HashMap::new();
            let filters = ["a/+", "a/b", "c/#", "$share/g/a/b", "d"];
            let topics = ["a/b", "a/x", "c", "c/d/e", "d", "e"];
            for _ in 0..200 {
                let r = z.next();
                let node = (r % 4) as usize;
                let f = filters[((r >> 8) % filters.len() as u64) as usize];
                match (r >> 16) % 4 {
                    0 => {
                        let now = z.now;
                        match z.nodes[node].subscribe(f, now) {
                            Some(t) => tokens.entry((node, t)).or_default().push(f.to_string()),
                            None => acked.push((node, f.to_string())),
                        }
                    }
                    1 => {
                        if let Some(i) = acked.iter().position(|(n, x)| *n == node && x == f) {
                            acked.swap_remove(i);
                            z.nodes[node].unsubscribe(f);
                        }
                    }
                    _ => z.step(Some(((r >> 24) % 5) as usize)),
                }
                for n in 0..4 {
                    while let Some(t) = z.nodes[n].poll_completed() {
                        acked.extend(tokens.remove(&(n, t)).unwrap().into_iter().map(|f| (n, f)));
                    }
                }
                // Every publish from any node reaches every node with an acknowledged matching filter.
                for t in topics {
                    for from in 0..4 {
                        let routed: HashSet<NodeName> = z.nodes[from].route(t).cloned().collect();
                        for (n, f) in &acked {
                            if shardmq_wire::topic::parse_shared(f).is_some() {
                                // Shared groups go by member counts: the publisher's node knows n's.
                                let known = if *n == from {
                                    z.nodes[from].local.count(f)
                                } else {
                                    z.nodes[from].peers.get(&z.names[*n]).map_or(0, |p| p.members(f))
                                };
                                assert!(known > 0, "seed {seed}: node {from} does not know {f} on {n}");
                                continue;
                            }
                            if *n != from && shardmq_wire::topic::matches(f, t) {
                                assert!(
                                    routed.contains(&z.names[*n]),
                                    "seed {seed}: {t} from {from} misses {f} on {n}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shared_messages_go_to_one_node_each_spread_by_member_count() {
        let mut z = Zone::new(3, 9);
        let now = z.now;
        let g = "$share/g/jobs/+";
        // Node 0 has one member, node 1 three, node 2 none.
        z.nodes[0].subscribe(g, now);
        for _ in 0..3 {
            z.nodes[1].subscribe(g, now);
        }
        z.pump();
        let mut per = HashMap::new();
        for _ in 0..400 {
            let t = z.nodes[2].shared_targets("jobs/x");
            assert_eq!(t.len(), 1, "exactly one node per message");
            *per.entry(format!("{:?}", t[0].1)).or_insert(0) += 1;
        }
        assert_eq!(per.get("Peer(\"n0\")"), Some(&100));
        assert_eq!(per.get("Peer(\"n1\")"), Some(&300));
        // Node 1 dies: the group keeps delivering, all to node 0.
        let n1 = z.names[1].clone();
        z.nodes[2].peer_down(&n1);
        let t = z.nodes[2].shared_targets("jobs/y");
        assert_eq!(t, vec![(g.into(), SharedTarget::Peer(z.names[0].clone()))]);
        // The last member leaves: no target, and no round-robin state left behind.
        z.nodes[0].unsubscribe(g);
        z.pump();
        assert!(z.nodes[2].shared_targets("jobs/z").is_empty());
        assert!(z.nodes[2].shared_rr.is_empty());
    }

    #[test]
    fn a_peer_that_goes_down_is_not_waited_for_and_a_silent_one_times_out() {
        let mut z = Zone::new(3, 5);
        let now = z.now;
        let t = z.nodes[0].subscribe("x", now).unwrap();
        // Node 2 dies before it answers; node 1 answers.
        z.up[2] = false;
        z.pump();
        assert_eq!(z.nodes[0].poll_completed(), None);
        let dead = z.names[2].clone();
        z.nodes[0].peer_down(&dead);
        assert_eq!(z.nodes[0].poll_completed(), Some(t));
        // Node 1 stops answering without being declared down: the timeout releases the SUBACK.
        z.up[1] = false;
        let t2 = z.nodes[0].subscribe("y", now).unwrap();
        z.pump();
        z.nodes[0].handle_timeout(now + Duration::from_secs(3));
        assert_eq!(z.nodes[0].poll_completed(), Some(t2));
        assert_eq!(z.nodes[0].counters().ack_timeouts, 1);
    }
}
