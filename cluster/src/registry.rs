//! The session registry of a zone, sans I/O: which node owns the registration of a client id, and the
//! registrations an owner keeps (issue "Cluster sessions"; this is its data and rules, the protocol that
//! moves registrations between nodes is [`crate::registrar`]).
//!
//! **Ownership by rendezvous hashing.** The owner of a client id is the member with the highest weight
//! [`weight`]`(node, client)` among the members up in the zone; the one with the second highest keeps a
//! replica, so that a registration (and the will it carries) survives the loss of one node. A member
//! joining or leaving moves only the ids whose top two changed (about 2/N of them), and every node
//! computes the same owners from the same view, without coordination. The hash is specified and stable
//! ([`REGISTRY_HASH`]: XXH3-64 with seed 0 over the node name, a 0xFF byte, which UTF-8 never contains,
//! and the client id), the same on every build and CPU, so it can be named in the cluster protocol.
//!
//! **Registrations.** A registration says which node holds a client's session and with what epoch; the
//! epoch grows with every registration of that id (the owner's compare-and-swap: the newest connection
//! wins), and a holder with an older epoch may no longer deliver for the session (fencing). Two
//! registrations of one id made apart (a partition, or owners that changed meanwhile) are resolved
//! deterministically when they meet ([`RegistryTable::merge`]): by epoch, then by hybrid logical clock
//! (last writer wins between concurrent ones), then by node name. This is the seed design's "vector
//! clocks + last writer wins" kept per client id, without clocks keyed by node (a restarted node comes
//! back under a new identity, so per-node vectors would grow without bound).
//!
//! **Wills.** A registration carries its client's will ([`WillInfo`]) while the client is connected, so
//! that the owners can publish it when the holder node is lost. A will is only ever taken out of a
//! registration (the client disconnected and its holder dealt with the will, or an owner published it after
//! the holder's loss), never put back for the same epoch, so merging two copies of one registration keeps
//! the will only if both still have it.
//!
//! **Ended registrations** leave a tombstone for a while ([`RegistryTable::ended`], pruned by
//! [`RegistryTable::prune`]): a copy still in flight does not bring them back, and the epochs of the id
//! go on above them.
//!
//! What it does not do: messages between nodes, timers, session hand-over (the [`crate::registrar`], the
//! gateway and the shards do those); it is the table and the rules every node applies alike.

use std::collections::VecDeque;

use ahash::HashMap;
use std::sync::Arc;

use crate::retained::HlcStamp;
use crate::NodeName;

/// Names the hash of [`weight`] in the cluster protocol: a node with another rule must not join.
pub const REGISTRY_HASH: &str = "hrw-xxh3-64-seed0";

/// The rendezvous weight of `node` for `client`.
pub fn weight(node: &NodeName, client: &str) -> u64 {
    // One-shot over the joined bytes (what the streaming hasher gives too, at a fraction of its cost: it
    // sets up a state of several hundred bytes); on the stack for the usual lengths.
    let (n, c) = (node.0.as_bytes(), client.as_bytes());
    let len = n.len() + 1 + c.len();
    let mut stack = [0u8; 256];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    buf[..n.len()].copy_from_slice(n);
    buf[n.len()] = 0xFF;
    buf[n.len() + 1..].copy_from_slice(c);
    xxhash_rust::xxh3::xxh3_64(buf)
}

/// The owner of a client id's registration and the node that keeps its replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owners {
    pub primary: NodeName,
    pub replica: Option<NodeName>,
}

impl Owners {
    pub fn contains(&self, node: &NodeName) -> bool {
        self.primary == *node || self.replica.as_ref() == Some(node)
    }
}

/// The two members with the highest weights for `client` (ties, which take a 64-bit collision, go to the
/// greater name). `None` without members.
pub fn owners<'a>(client: &str, members: impl IntoIterator<Item = &'a NodeName>) -> Option<Owners> {
    let mut top: Option<(u64, &NodeName)> = None;
    let mut second: Option<(u64, &NodeName)> = None;
    for m in members {
        let w = (weight(m, client), m);
        if top.is_none_or(|t| w > t) {
            second = top;
            top = Some(w);
        } else if second.is_none_or(|s| w > s) && top.is_none_or(|t| t.1 != m) {
            second = Some(w);
        }
    }
    let (_, primary) = top?;
    Some(Owners { primary: primary.clone(), replica: second.map(|(_, n)| n.clone()) })
}

/// A client's will as its registration carries it: what the owners publish if the holder node is lost
/// while the client is connected. Kept small (boxed in a registration) since most clients have none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillInfo {
    pub topic: Arc<str>,
    pub payload: Arc<[u8]>,
    /// 0, 1 or 2.
    pub qos: u8,
    pub retain: bool,
    /// The will delay interval (MQTT 5; 0 for 3.1.1): published this long after the loss.
    pub delay_s: u32,
}

/// Where a client's session lives, as its owner records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub client: Arc<str>,
    /// The node that holds the session (its client connected there last).
    pub holder: NodeName,
    /// Grows with every registration of this id. Invariant: ≥ 1.
    pub epoch: u64,
    /// When the holder registered it, on its hybrid logical clock.
    pub stamp: HlcStamp,
    /// The client is connected at the holder (an offline persistent session stays registered).
    pub connected: bool,
    /// The client's will, while it is connected, or while its publication is due after the holder's
    /// loss (`connected` false, will still there).
    pub will: Option<Box<WillInfo>>,
}

impl Registration {
    /// The order that decides between two registrations of one id: the greater wins.
    fn version(&self) -> (u64, HlcStamp, &NodeName) {
        (self.epoch, self.stamp, &self.holder)
    }
}

/// The answer to a registration: the epoch the new connection holds, and the registration it replaced
/// when another node held the session (that node must end its connection and hand the session over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub epoch: u64,
    pub previous: Option<Registration>,
}

/// What merging a registration from elsewhere did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merged {
    /// New to this table, or the same registration again.
    Recorded,
    /// It won over the registration this table had, held by another node: that one is superseded (its
    /// connection must end and its session go to the winner).
    Replaced { loser: Registration },
    /// The table's registration wins; the incoming one, held by another node, is superseded.
    Rejected { winner: Registration },
    /// The incoming registration (or a newer one of the same holder) ended here: nothing changed, the
    /// sender should forget it too.
    Ended { last: Registration },
}

/// What is left of an ended registration for a while, so that a copy of it still in flight (or a
/// later merge of an older one) does not bring it back, and new registrations of the id continue above
/// its epoch.
#[derive(Debug, Clone)]
struct Tombstone {
    /// Disconnected, without a will.
    last: Registration,
    /// When it ended, on the owner's clock: pruned after a horizon ([`RegistryTable::prune`]).
    at: HlcStamp,
}

/// How many tombstones a table keeps at most (the default of [`RegistryTable::with_max_tombstones`]):
/// some 150 MB of them, which is about 26 s of ended registrations at 20,000 clean connections a second
/// (10 minutes, their TTL, at 870 a second). Without a cap such a node kept 12 million, gigabytes, and
/// a table of millions stalls the cluster thread when it grows: on this host a zone lost its links at
/// 1.8 million (the table doubling), and the re-registration of the tombstones at every reconnection
/// kept it from coming back. Past the cap the oldest go first (`tombstones_dropped_early`): a copy of
/// one of them still in flight could then bring a registration back (as one that ended past its TTL
/// could): the registrar shows such a copy to its holder, which forgets it if it has no such session,
/// and the epochs are not lost (`epoch_floor`); but a will whose publication only the dropped
/// tombstone remembered can be published again if a copy from before (the other side of a partition)
/// comes back while its holder is still seen down.
pub const MAX_TOMBSTONES: usize = 1 << 19;

/// The registrations a node keeps: those it owns or replicates.
#[derive(Debug)]
pub struct RegistryTable {
    entries: HashMap<Arc<str>, Registration>,
    /// Invariant: at most `max_tombstones` entries (see [`MAX_TOMBSTONES`]).
    ended: HashMap<Arc<str>, Tombstone>,
    max_tombstones: usize,
    /// The highest epoch of a tombstone dropped here before its time (the oldest past the cap): every
    /// new registration goes above it, so an id whose tombstone went early still continues above its last
    /// epoch (epochs then grow over all ids, not each id alone; what matters is that they grow). Expiry
    /// does not raise it: past the TTL no copy is expected any more, and a node that is not flooded
    /// keeps 0 here (see `Registrar`'s check of copies at or below it, which costs a message).
    epoch_floor: u64,
    /// Tombstones dropped before their TTL because the table was full.
    dropped_early: u64,
    /// Every tombstone made, in the order it was made (its `at` grows with it: the owner's clock), so
    /// that pruning pops what expired instead of scanning every tombstone. An entry whose tombstone was
    /// replaced or removed since is skipped when it comes up. Invariant: every tombstone in `ended` has
    /// an entry here with its `at`.
    expiry: VecDeque<(HlcStamp, Arc<str>)>,
}

impl Default for RegistryTable {
    fn default() -> Self {
        RegistryTable::with_max_tombstones(MAX_TOMBSTONES)
    }
}

impl RegistryTable {
    /// A table that keeps at most `max` tombstones (at least 1).
    pub fn with_max_tombstones(max: usize) -> Self {
        RegistryTable {
            entries: HashMap::default(),
            ended: HashMap::default(),
            max_tombstones: max.max(1),
            epoch_floor: 0,
            dropped_early: 0,
            expiry: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, client: &str) -> Option<&Registration> {
        self.entries.get(client)
    }

    /// A client connected at `holder`: compare-and-swap on the epoch, the newest connection wins. The
    /// epoch is above every one this table knows of the id and above `known` (the highest the holder
    /// knows of: an owner that just took the id over may not have its registration yet).
    pub fn register(
        &mut self,
        client: &str,
        holder: &NodeName,
        stamp: HlcStamp,
        will: Option<Box<WillInfo>>,
        known: u64,
    ) -> Registered {
        let prev = self.entries.get(client).cloned();
        let floor = self.ended.remove(client).map_or(0, |t| t.last.epoch).max(known).max(self.epoch_floor);
        let epoch = prev.as_ref().map_or(floor, |p| p.epoch.max(floor)) + 1;
        let r = Registration {
            client: client.into(),
            holder: holder.clone(),
            epoch,
            stamp,
            connected: true,
            will,
        };
        self.entries.insert(r.client.clone(), r);
        Registered { epoch, previous: prev.filter(|p| p.holder != *holder) }
    }

    /// A registration made elsewhere (a replica's copy, a holder re-registering with a new owner, the
    /// other side of a healed partition). Converges whatever the order merges come in.
    pub fn merge(&mut self, r: Registration) -> Merged {
        debug_assert!(r.epoch >= 1);
        if let Some(t) = self.ended.get(&r.client) {
            // A copy of what ended here, or older: gone for good. Older from another holder (the other
            // side of a partition) loses to the ended one like to a live one.
            if r.version() == t.last.version()
                || (r.version() < t.last.version() && r.holder == t.last.holder)
            {
                return Merged::Ended { last: t.last.clone() };
            }
            if r.version() < t.last.version() {
                return Merged::Rejected { winner: t.last.clone() };
            }
            self.ended.remove(&r.client);
        }
        let Some(cur) = self.entries.get(&r.client) else {
            self.entries.insert(r.client.clone(), r);
            return Merged::Recorded;
        };
        if cur.version() == r.version() {
            // The same registration; only whether its client is connected and whether its will is still
            // due can have changed, and both only ever go away for an epoch.
            let cur = self.entries.get_mut(&r.client).expect("present");
            cur.connected &= r.connected;
            if r.will.is_none() {
                cur.will = None;
            }
            return Merged::Recorded;
        }
        if r.version() > cur.version() {
            let loser = self.entries.insert(r.client.clone(), r.clone()).expect("present");
            if loser.holder == r.holder {
                Merged::Recorded
            } else {
                Merged::Replaced { loser }
            }
        } else if cur.holder == r.holder {
            Merged::Recorded
        } else {
            Merged::Rejected { winner: cur.clone() }
        }
    }

    /// The client of epoch `epoch` disconnected; its session stays where it is (if it persists).
    /// Ignored for another epoch: a newer connection elsewhere already took it.
    /// The holder deals with the will of a client that disconnected, so the registration drops it.
    /// Returns whether it changed anything.
    pub fn disconnected(&mut self, client: &str, epoch: u64) -> bool {
        match self.entries.get_mut(client).filter(|r| r.epoch == epoch) {
            Some(r) if r.connected || r.will.is_some() => {
                r.connected = false;
                r.will = None;
                true
            }
            _ => false,
        }
    }

    /// The holder of epoch `epoch` was lost with its client connected: the client counts as
    /// disconnected, and its will (if any) stays, due for publication ([`RegistryTable::will_published`]
    /// once done). Returns the registration when it has a will due.
    pub fn holder_lost(&mut self, client: &str, epoch: u64) -> Option<&Registration> {
        let r = self.entries.get_mut(client).filter(|r| r.epoch == epoch)?;
        r.connected = false;
        r.will.is_some().then_some(&*r)
    }

    /// The word of the holder itself (or of the primary owner, to its replica) on whether the client of
    /// the registration (`epoch`, `stamp`) is connected: unlike a merge, it may say connected again
    /// (others took the connection for lost while they could not reach its holder). The will is left as
    /// it is: it only ever goes. Returns whether it changed anything.
    pub fn set_connected(&mut self, client: &str, epoch: u64, stamp: HlcStamp, connected: bool) -> bool {
        match self.entries.get_mut(client).filter(|r| (r.epoch, r.stamp) == (epoch, stamp)) {
            Some(r) if r.connected != connected => {
                r.connected = connected;
                true
            }
            _ => false,
        }
    }

    /// The will of epoch `epoch` was published: it must not be again.
    pub fn will_published(&mut self, client: &str, epoch: u64) {
        if let Some(r) = self.entries.get_mut(client).filter(|r| r.epoch == epoch) {
            r.will = None;
        }
    }

    /// Every registration kept here.
    pub fn iter(&self) -> impl Iterator<Item = &Registration> {
        self.entries.values()
    }

    /// The session of epoch `epoch` ended (clean session gone, expired) at `at`: the registration goes,
    /// leaving a tombstone until [`RegistryTable::prune`]. Ignored for another epoch.
    pub fn ended(&mut self, client: &str, epoch: u64, at: HlcStamp) {
        if self.entries.get(client).is_some_and(|r| r.epoch == epoch) {
            let last = self.entries.remove(client).expect("present");
            self.entomb(last, at);
        }
    }

    /// Leaves `last`'s tombstone, made at `at`.
    fn entomb(&mut self, mut last: Registration, at: HlcStamp) {
        last.connected = false;
        last.will = None;
        self.expiry.push_back((at, last.client.clone()));
        self.ended.insert(last.client.clone(), Tombstone { last, at });
        while self.ended.len() > self.max_tombstones {
            self.drop_oldest();
            self.dropped_early += 1;
        }
        // Entries of tombstones removed since (their id registered again) wait for their turn at the
        // front, each keeping its id's string alive: past twice the cap, only the current ones stay (at
        // most the cap, so this runs at most once per cap's worth of tombstones).
        if self.expiry.len() > 2 * self.max_tombstones {
            let ended = &self.ended;
            self.expiry.retain(|(at, c)| ended.get(c).is_some_and(|t| t.at == *at));
        }
        debug_assert!(self.ended.len() <= self.max_tombstones);
    }

    /// Drops the oldest tombstone before its time (skipping the stale entries of `expiry` in front of
    /// it); new registrations go above its epoch.
    fn drop_oldest(&mut self) {
        while let Some((at, client)) = self.expiry.pop_front() {
            if let Some(epoch) = self.drop_if_current(&client, at) {
                self.epoch_floor = self.epoch_floor.max(epoch);
                return;
            }
        }
    }

    /// Drops `client`'s tombstone if it is the one made at `at` (an `expiry` entry is stale once its
    /// tombstone was replaced or removed); returns its epoch if it did.
    fn drop_if_current(&mut self, client: &str, at: HlcStamp) -> Option<u64> {
        if self.ended.get(client).is_none_or(|t| t.at != at) {
            return None;
        }
        self.ended.remove(client).map(|t| t.last.epoch)
    }

    /// A registration ended elsewhere (another owner's word): it goes, and any older one of its id with
    /// it, leaving a tombstone. Ignored when this table has a newer one. Returns the older registration
    /// it removed, if any (held by another node, it is superseded: its session must end).
    pub fn ended_elsewhere(&mut self, last: Registration, at: HlcStamp) -> Option<Registration> {
        if self.entries.get(&last.client).is_some_and(|r| r.version() > last.version()) {
            return None;
        }
        if self.ended.get(&last.client).is_some_and(|t| t.last.version() >= last.version()) {
            return None;
        }
        let removed = self.entries.remove(&last.client);
        self.entomb(last, at);
        removed
    }

    /// Whether `client` has a tombstone here (its last registration ended).
    pub fn is_ended(&self, client: &str) -> bool {
        self.ended.contains_key(client) && !self.entries.contains_key(client)
    }

    /// Drops the tombstones of registrations ended before `horizon`: by then no copy of them is in
    /// flight (the horizon is chosen well past a link's delay and a membership change's round).
    /// Pops only what expired: the cost is in what goes, not in what is kept. A tombstone made out of
    /// order (a clock that went back) waits for those made before it, so goes late, never early.
    pub fn prune(&mut self, horizon: HlcStamp) {
        while let Some((at, _)) = self.expiry.front().filter(|(at, _)| *at < horizon) {
            let at = *at;
            let (_, client) = self.expiry.pop_front().expect("front");
            let _ = self.drop_if_current(&client, at);
        }
        if self.ended.is_empty() {
            self.expiry.clear();
        }
        debug_assert!(self.ended.len() <= self.expiry.len());
    }

    /// When the oldest tombstone was made (the next to expire), if any is kept.
    pub fn oldest_tombstone(&self) -> Option<HlcStamp> {
        if self.ended.is_empty() {
            None
        } else {
            self.expiry.front().map(|(at, _)| *at)
        }
    }

    /// Tombstones kept (see [`RegistryTable::prune`]).
    pub fn tombstones(&self) -> usize {
        self.ended.len()
    }

    /// The highest epoch of a tombstone dropped here early (0: none yet): a registration of an unknown id
    /// at or below it may be one that ended here.
    pub fn epoch_floor(&self) -> u64 {
        self.epoch_floor
    }

    /// Tombstones dropped before their time because the table kept its maximum (see [`MAX_TOMBSTONES`]).
    pub fn tombstones_dropped_early(&self) -> u64 {
        self.dropped_early
    }

    /// The registrations of sessions `node` held: what its loss leaves without a live holder (their
    /// wills are due; their clients will register elsewhere).
    pub fn held_by<'a>(&'a self, node: &'a NodeName) -> impl Iterator<Item = &'a Registration> + 'a {
        self.entries.values().filter(move |r| r.holder == *node)
    }

    /// After a membership change from `before` to `after`: the registrations this node (`me`) owned or
    /// replicated whose owners changed, with their new owners (the caller sends them there; merging is
    /// idempotent), and drops those it no longer owns nor replicates. A copy this node kept without
    /// being an owner (one that reached it while views differed) is not handed on: it may be stale, and
    /// the owners have their own. Sorted by client id.
    pub fn rebalance<'a>(
        &mut self,
        me: &NodeName,
        before: impl IntoIterator<Item = &'a NodeName> + Clone,
        after: impl IntoIterator<Item = &'a NodeName> + Clone,
    ) -> Vec<(Owners, Registration)> {
        rebalance_map(&mut self.entries, me, before, after, |r| r)
    }

    /// [`RegistryTable::rebalance`] for the tombstones: those this node kept as an owner whose owners
    /// changed, as the registrations that ended (the new owners must continue the epochs above them),
    /// and drops those it no longer owns nor replicates. Sorted by client id.
    pub fn rebalance_ended<'a>(
        &mut self,
        me: &NodeName,
        before: impl IntoIterator<Item = &'a NodeName> + Clone,
        after: impl IntoIterator<Item = &'a NodeName> + Clone,
    ) -> Vec<(Owners, Registration)> {
        rebalance_map(&mut self.ended, me, before, after, |t| &t.last)
    }
}

/// The rebalancing of one of the table's maps (see [`RegistryTable::rebalance`]): what this node owned
/// whose owners changed goes out with its new owners; what it no longer owns nor replicates goes.
fn rebalance_map<'a, V>(
    map: &mut HashMap<Arc<str>, V>,
    me: &NodeName,
    before: impl IntoIterator<Item = &'a NodeName> + Clone,
    after: impl IntoIterator<Item = &'a NodeName> + Clone,
    registration: impl Fn(&V) -> &Registration,
) -> Vec<(Owners, Registration)> {
    let mut out = Vec::new();
    map.retain(|client, v| {
        let Some(now) = owners(client, after.clone()) else { return true };
        let was = owners(client, before.clone());
        if was.as_ref().is_some_and(|w| *w != now && w.contains(me)) {
            out.push((now.clone(), registration(v).clone()));
        }
        now.contains(me)
    });
    out.sort_by(|a, b| a.1.client.cmp(&b.1.client));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> NodeName {
        NodeName(s.into())
    }

    fn nodes(k: usize) -> Vec<NodeName> {
        (0..k).map(|i| n(&format!("node-{i}"))).collect()
    }

    #[test]
    fn the_weight_is_pinned() {
        // The protocol names this hash: its values must never change with a build or a dependency.
        assert_eq!(weight(&n("a"), "c"), xxhash_rust::xxh3::xxh3_64_with_seed(b"a\xffc", 0));
        // The specified value, whatever the implementation (short inputs, stack and heap paths alike).
        for client in ["c", &"x".repeat(300)] {
            let mut h = xxhash_rust::xxh3::Xxh3::with_seed(0);
            h.update(b"node-a\xff");
            h.update(client.as_bytes());
            assert_eq!(weight(&n("node-a"), client), h.digest());
        }
        assert_eq!(
            weight(&n("a"), "c"),
            0x9927_551d_aced_8cea,
            "XXH3-64, seed 0, of \"a\\xffc\" (the reference implementation)"
        );
        assert_ne!(weight(&n("ab"), "c"), weight(&n("a"), "bc"), "the separator keeps (ab, c) from (a, bc)");
    }

    #[test]
    fn owners_are_the_two_heaviest_and_every_node_agrees() {
        let ms = nodes(5);
        for i in 0..200 {
            let client = format!("client-{i}");
            let o = owners(&client, &ms).unwrap();
            let mut by_weight: Vec<&NodeName> = ms.iter().collect();
            by_weight.sort_by_key(|m| std::cmp::Reverse((weight(m, &client), (*m).clone())));
            assert_eq!(&o.primary, by_weight[0]);
            assert_eq!(o.replica.as_ref(), Some(by_weight[1]));
            let mut shuffled = ms.clone();
            shuffled.reverse();
            assert_eq!(owners(&client, &shuffled).unwrap(), o, "the order of the view does not matter");
        }
        assert_eq!(owners("x", &[n("only")]).unwrap(), Owners { primary: n("only"), replica: None });
        assert!(owners("x", &[]).is_none());
    }

    #[test]
    fn a_member_leaving_or_joining_moves_only_its_share() {
        let ms = nodes(10);
        let ids: Vec<String> = (0..10_000).map(|i| format!("dev-{i}")).collect();
        let before: Vec<Owners> = ids.iter().map(|c| owners(c, &ms).unwrap()).collect();
        let gone = n("node-3");
        let left: Vec<NodeName> = ms.iter().filter(|m| **m != gone).cloned().collect();
        let mut moved = 0;
        for (c, b) in ids.iter().zip(&before) {
            let a = owners(c, &left).unwrap();
            if a.primary != b.primary {
                moved += 1;
                assert_eq!(b.primary, gone, "only the leaver's ids change owner");
                assert_eq!(Some(&a.primary), b.replica.as_ref(), "its replica takes over");
            }
        }
        assert!((800..1200).contains(&moved), "about 1/10 moved: {moved}");
        let mut joined = ms.clone();
        joined.push(n("node-new"));
        let moved =
            ids.iter().zip(&before).filter(|(c, b)| owners(c, &joined).unwrap().primary != b.primary).count();
        assert!((700..1100).contains(&moved), "about 1/11 moved to the newcomer: {moved}");
    }

    #[test]
    fn the_newest_registration_wins_and_names_the_one_it_replaced() {
        let mut t = RegistryTable::default();
        let (a, b) = (n("a"), n("b"));
        let r1 = t.register("c", &a, HlcStamp(10), None, 0);
        assert_eq!(r1, Registered { epoch: 1, previous: None });
        let r2 = t.register("c", &a, HlcStamp(11), None, 0);
        assert_eq!(r2, Registered { epoch: 2, previous: None }, "a reconnect on the same node");
        let r3 = t.register("c", &b, HlcStamp(12), None, 0);
        assert_eq!(r3.epoch, 3);
        assert_eq!(r3.previous.map(|p| (p.holder, p.epoch)), Some((a.clone(), 2)));
        t.disconnected("c", 2);
        assert!(t.get("c").unwrap().connected, "an older epoch's disconnect changes nothing");
        t.disconnected("c", 3);
        assert!(!t.get("c").unwrap().connected);
        t.ended("c", 2, HlcStamp(20));
        assert!(t.get("c").is_some());
        let copy = t.get("c").unwrap().clone();
        t.ended("c", 3, HlcStamp(20));
        assert!(t.get("c").is_none());
        assert!(matches!(t.merge(copy), Merged::Ended { last } if last.epoch == 3));
        assert!(t.get("c").is_none(), "a copy still in flight does not bring it back");
        assert_eq!(t.register("c", &a, HlcStamp(30), None, 0).epoch, 4, "epochs go on above the ended one");
        t.ended("c", 4, HlcStamp(40));
        t.prune(HlcStamp(40));
        assert_eq!(t.tombstones(), 1, "not before the horizon");
        t.prune(HlcStamp(41));
        assert_eq!(t.tombstones(), 0);
    }

    #[test]
    fn pruning_takes_the_expired_tombstones_and_only_those() {
        let mut t = RegistryTable::default();
        let a = n("a");
        for (i, c) in ["c1", "c2", "c3"].into_iter().enumerate() {
            let e = t.register(c, &a, HlcStamp(1), None, 0).epoch;
            t.ended(c, e, HlcStamp(10 + i as u64));
        }
        assert_eq!(t.oldest_tombstone(), Some(HlcStamp(10)));
        // c1 registers again and ends later: its first tombstone's turn must not take the new one.
        let e = t.register("c1", &a, HlcStamp(20), None, 0).epoch;
        assert_eq!(e, 2, "above the tombstone");
        t.ended("c1", e, HlcStamp(30));
        t.prune(HlcStamp(12));
        assert_eq!(t.tombstones(), 2, "c2 (made at 11) went; c3 (12) and c1 (30) stay");
        assert!(t.is_ended("c1") && t.is_ended("c3") && !t.is_ended("c2"));
        assert_eq!(t.oldest_tombstone(), Some(HlcStamp(12)));
        t.prune(HlcStamp(30));
        assert!(t.is_ended("c1") && !t.is_ended("c3"));
        assert_eq!(t.register("c1", &a, HlcStamp(40), None, 0).epoch, 3, "c1's second tombstone counted");
        assert_eq!(t.oldest_tombstone(), None, "no tombstone left: no timer");
        t.prune(HlcStamp(1_000));
        assert!(t.expiry.is_empty(), "nothing is kept for tombstones that are gone");
        assert_eq!(t.epoch_floor(), 0, "expiry raises no floor: past the TTL no copy is expected");
        assert_eq!(t.register("c7", &a, HlcStamp(2_000), None, 0).epoch, 1);
    }

    #[test]
    fn past_the_cap_the_oldest_tombstones_go_and_epochs_still_grow() {
        let mut t = RegistryTable::with_max_tombstones(3);
        let a = n("a");
        // c0 reaches epoch 3 before it ends; the others end at epoch 1.
        for _ in 0..2 {
            t.register("c0", &a, HlcStamp(1), None, 0);
        }
        for i in 0..5u64 {
            let c = format!("c{i}");
            let e = t.register(&c, &a, HlcStamp(1), None, 0).epoch;
            // c0's tombstone (epoch 3) is dropped when c3's comes: c4 goes above it.
            let want = match i {
                0 => 3,
                4 => 4,
                _ => 1,
            };
            assert_eq!(e, want, "c{i}");
            t.ended(&c, e, HlcStamp(10 + i));
        }
        assert_eq!(t.tombstones(), 3);
        assert_eq!(t.tombstones_dropped_early(), 2);
        assert!(
            !t.is_ended("c0") && !t.is_ended("c1") && t.is_ended("c2") && t.is_ended("c4"),
            "the oldest went"
        );
        assert_eq!(t.oldest_tombstone(), Some(HlcStamp(12)));
        // c0's tombstone is gone, not its epoch: it continues above it.
        assert_eq!(t.epoch_floor(), 3);
        assert_eq!(t.register("c0", &a, HlcStamp(30), None, 0).epoch, 4);
        // An id that keeps coming back leaves stale expiry entries behind: they do not pile up.
        for i in 0..20u64 {
            let e = t.register("c9", &a, HlcStamp(40 + i), None, 0).epoch;
            t.ended("c9", e, HlcStamp(40 + i));
        }
        assert!(t.expiry.len() <= 2 * 3, "{}", t.expiry.len());
        assert!(t.tombstones() <= 3 && t.is_ended("c9"));
        // Expiry still takes what is old, and only that.
        t.prune(HlcStamp(59));
        assert!(t.is_ended("c9"), "made at 59");
        t.prune(HlcStamp(60));
        assert_eq!(t.tombstones(), 0);
    }

    #[test]
    fn a_will_stays_while_connected_or_due_and_never_comes_back() {
        let will = Some(Box::new(WillInfo {
            topic: "gone".into(),
            payload: Arc::from(&b"bye"[..]),
            qos: 1,
            retain: false,
            delay_s: 5,
        }));
        let mut t = RegistryTable::default();
        let e = t.register("c", &n("a"), HlcStamp(1), will.clone(), 0).epoch;
        let copy = t.get("c").unwrap().clone();
        assert!(t.holder_lost("c", e + 1).is_none(), "another epoch is not lost");
        assert!(t.holder_lost("c", e).is_some(), "due: the client was connected with a will");
        assert!(!t.get("c").unwrap().connected);
        assert_eq!(t.merge(copy.clone()), Merged::Recorded);
        assert!(!t.get("c").unwrap().connected, "a stale connected copy does not reconnect it");
        assert!(t.get("c").unwrap().will.is_some(), "still due");
        t.will_published("c", e);
        assert_eq!(t.merge(copy), Merged::Recorded);
        assert!(t.get("c").unwrap().will.is_none(), "a copy that still has the will does not bring it back");
        let e2 = t.register("c", &n("a"), HlcStamp(2), will, 9).epoch;
        assert_eq!(e2, 10, "above the epoch the holder knows of");
        t.disconnected("c", e2);
        assert!(t.get("c").unwrap().will.is_none(), "a disconnect leaves the will to the holder");
        assert!(t.holder_lost("c", e2).is_none());
    }

    #[test]
    fn partition_sides_resolve_by_epoch_then_clock_then_name() {
        let reg = |holder: &str, epoch, stamp| Registration {
            client: "c".into(),
            holder: n(holder),
            epoch,
            stamp: HlcStamp(stamp),
            connected: true,
            will: None,
        };
        let mut t = RegistryTable::default();
        assert_eq!(t.merge(reg("a", 5, 100)), Merged::Recorded);
        assert_eq!(t.merge(reg("b", 4, 900)), Merged::Rejected { winner: reg("a", 5, 100) });
        assert_eq!(t.merge(reg("b", 5, 101)), Merged::Replaced { loser: reg("a", 5, 100) });
        assert_eq!(
            t.merge(reg("a", 5, 101)),
            Merged::Rejected { winner: reg("b", 5, 101) },
            "names break ties"
        );
        assert_eq!(t.merge(reg("b", 5, 101)), Merged::Recorded, "the same registration again");
    }

    #[test]
    fn rebalance_hands_over_what_moved_and_keeps_what_it_still_owns() {
        let ms = nodes(4);
        let me = ms[0].clone();
        let mut t = RegistryTable::default();
        let mine: Vec<String> =
            (0..400).map(|i| format!("k{i}")).filter(|c| owners(c, &ms).unwrap().contains(&me)).collect();
        for c in &mine {
            t.register(c, &me, HlcStamp(1), None, 0);
        }
        let mut grown = ms.clone();
        grown.push(n("node-9"));
        let out = t.rebalance(&me, &ms, &grown);
        for (o, r) in &out {
            assert_eq!(o, &owners(&r.client, &grown).unwrap());
            assert_ne!(Some(o), owners(&r.client, &ms).as_ref(), "only what moved is handed over");
        }
        for c in &mine {
            let o = owners(c, &grown).unwrap();
            assert_eq!(t.get(c).is_some(), o.contains(&me), "{c}");
        }
        assert!(!out.is_empty() && out.len() < mine.len());
    }

    proptest! {
        #[test]
        fn merging_converges_in_any_order(
            regs in proptest::collection::vec((0u8..3, 1u64..4, 0u64..4), 1..8),
            seed in any::<u64>(),
        ) {
            let all: Vec<Registration> = regs
                .iter()
                .map(|(h, e, s)| Registration {
                    client: "c".into(),
                    holder: n(&format!("h{h}")),
                    epoch: *e,
                    stamp: HlcStamp(*s),
                    connected: true,
                    will: None,
                })
                .collect();
            let mut forward = RegistryTable::default();
            for r in &all {
                forward.merge(r.clone());
            }
            let mut order: Vec<usize> = (0..all.len()).collect();
            let mut x = seed | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut shuffled = RegistryTable::default();
            for i in order {
                shuffled.merge(all[i].clone());
            }
            let max = all.iter().max_by(|a, b| a.version().cmp(&b.version())).unwrap();
            prop_assert_eq!(forward.get("c").map(Registration::version), Some(max.version()));
            prop_assert_eq!(shuffled.get("c").map(Registration::version), Some(max.version()));
        }
    }
}
