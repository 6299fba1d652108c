//! Publisher backpressure across nodes: the shards' rule (`shard/src/core/backpressure.rs`: a publisher
//! is paused while every target of its last message reports all its subscribers there congested),
//! carried over the links.
//!
//! - Receiving node: a peer's message is delivered with an origin naming the gateway and the remote
//!   publisher (packed into a [`SessionKey`]), so its shards report congestion for it to the gateway like
//!   to any shard. The gateway tracks, per remote publisher, the shards its last message went to and those
//!   reporting congestion, and tells the peer ([`Frame::Congestion`]) when all of them are congested, or
//!   no longer.
//! - Sending node: the gateway tracks, per local publisher, the peers its last message went to and those
//!   reporting congestion, and reports congestion to the publisher's shard (as a target shard would)
//!   while all of those peers are congested. The shard pauses the publisher only if its other targets
//!   are congested too, and lifts the pause after at most a second by itself.
//!
//! Peers are told apart by a slot (0..64, for bit masks); beyond 64 peers a publisher is never paused for
//! the extra ones. Entries are pruned when their maps grow large: a pruned publisher starts afresh.

use std::collections::BTreeMap;

use ahash::HashMap;

use shardmq_shard::core::{Origin, SessionKey};
use shardmq_shard::ShardId;

use crate::link::OriginRef;
use crate::NodeName;

/// Tracked publishers per direction before entries without congestion are dropped.
const PRUNE_AT: usize = 64 * 1024;

/// Bits of a packed remote origin: peer slot, the publisher's shard on the peer, its session key there.
const SHARD_BITS: u32 = 12;
const SESSION_BITS: u32 = 46;

#[derive(Debug, Default, Clone, Copy)]
struct Track {
    /// Bit per target (shard here, or peer slot) of the publisher's last message.
    last: u64,
    /// Bit per target reporting congestion for it.
    congested: u64,
    /// What was last reported for it.
    reported: bool,
}

impl Track {
    /// Re-evaluates; the new state when it changed.
    fn changed(&mut self) -> Option<bool> {
        self.changed_with(0)
    }

    /// Re-evaluates with the targets in `also` counted as congested too.
    fn changed_with(&mut self, also: u64) -> Option<bool> {
        let now = self.last != 0 && self.last & !(self.congested | also) == 0;
        (now != self.reported).then(|| {
            self.reported = now;
            now
        })
    }
}

fn prune<K: Eq + std::hash::Hash>(m: &mut HashMap<K, Track>) {
    if m.len() > PRUNE_AT {
        m.retain(|_, t| t.congested != 0 || t.reported);
    }
}

fn bit(i: usize) -> u64 {
    if i < 64 {
        1 << i
    } else {
        0
    }
}

#[derive(Default)]
pub(super) struct Congestion {
    slots: BTreeMap<NodeName, u8>,
    names: Vec<NodeName>,
    /// Remote publishers, by packed origin.
    inbound: HashMap<u64, Track>,
    /// Local publishers.
    outbound: HashMap<Origin, Track>,
    /// Peers (slot bits) whose link holds over half its budget: congested for every local publisher.
    links: u64,
}

impl Congestion {
    /// The peer's slot, assigned at first sight and kept for the process (a restarted peer keeps its
    /// name, so its slot). `None` past 64 peers.
    pub fn slot(&mut self, peer: &NodeName) -> Option<u8> {
        if let Some(s) = self.slots.get(peer) {
            return Some(*s);
        }
        let s = u8::try_from(self.names.len()).ok().filter(|s| *s < 64)?;
        self.slots.insert(peer.clone(), s);
        self.names.push(peer.clone());
        Some(s)
    }

    /// The session key a remote publisher's messages carry here, if it fits.
    pub fn pack(&mut self, peer: &NodeName, o: OriginRef) -> Option<SessionKey> {
        let slot = self.slot(peer)? as u64;
        if o.shard as u64 >= 1 << SHARD_BITS || o.session >= 1 << SESSION_BITS {
            return None;
        }
        Some(SessionKey(slot << (SHARD_BITS + SESSION_BITS) | (o.shard as u64) << SESSION_BITS | o.session))
    }

    fn unpack(&self, key: SessionKey) -> Option<(NodeName, OriginRef)> {
        let slot = (key.0 >> (SHARD_BITS + SESSION_BITS)) as usize;
        let shard = ((key.0 >> SESSION_BITS) & ((1 << SHARD_BITS) - 1)) as u16;
        let session = key.0 & ((1 << SESSION_BITS) - 1);
        Some((self.names.get(slot)?.clone(), OriginRef { shard, session }))
    }

    /// A remote publisher's message went to these shards here. Returns a report for its node, if due.
    pub fn delivered(&mut self, key: SessionKey, shards: u64) -> Option<(NodeName, OriginRef, bool)> {
        prune(&mut self.inbound);
        let t = self.inbound.entry(key.0).or_default();
        t.last = shards;
        let c = t.changed()?;
        let (peer, o) = self.unpack(key)?;
        Some((peer, o, c))
    }

    /// A shard here reports congestion (or its end) for a remote publisher.
    pub fn shard_reports(
        &mut self,
        key: SessionKey,
        shard: ShardId,
        congested: bool,
    ) -> Option<(NodeName, OriginRef, bool)> {
        let t = self.inbound.entry(key.0).or_default();
        if congested {
            t.congested |= bit(shard.index());
        } else {
            t.congested &= !bit(shard.index());
        }
        let c = t.changed()?;
        let (peer, o) = self.unpack(key)?;
        Some((peer, o, c))
    }

    /// A local publisher's message went to these peers. Returns a report for its shard, if due.
    pub fn forwarded(&mut self, origin: Origin, peers: u64) -> Option<bool> {
        if peers == 0 && !self.outbound.contains_key(&origin) {
            return None;
        }
        prune(&mut self.outbound);
        let t = self.outbound.entry(origin).or_default();
        t.last = peers;
        t.changed_with(self.links)
    }

    /// The peers whose links are congested now (slot bits). Returns the reports due to local
    /// publishers' shards: a publisher whose last message went only to congested peers is reported,
    /// as if those peers had reported every subscriber of it congested.
    pub fn links_congested(&mut self, mask: u64) -> Vec<(Origin, bool)> {
        if mask == self.links {
            return Vec::new();
        }
        self.links = mask;
        let mut out = Vec::new();
        for (o, t) in self.outbound.iter_mut() {
            if let Some(c) = t.changed_with(mask) {
                out.push((*o, c));
            }
        }
        out.sort_unstable_by_key(|(o, _)| (o.shard, o.session));
        out
    }

    /// The slot bit of a peer already seen (0 otherwise).
    pub fn bit_of(&self, peer: &NodeName) -> u64 {
        self.slots.get(peer).map_or(0, |s| bit(*s as usize))
    }

    /// A peer reports congestion (or its end) for a local publisher. Returns a report for its shard.
    pub fn peer_reports(&mut self, peer: &NodeName, origin: Origin, congested: bool) -> Option<bool> {
        let b = bit(self.slot(peer)? as usize);
        let t = self.outbound.entry(origin).or_default();
        if congested {
            t.congested |= b;
        } else {
            t.congested &= !b;
        }
        t.changed_with(self.links)
    }

    /// The peer went down: its reports no longer hold, nor do its publishers' entries here. Returns the
    /// reports due to local publishers' shards.
    pub fn peer_down(&mut self, peer: &NodeName) -> Vec<(Origin, bool)> {
        let Some(&slot) = self.slots.get(peer) else { return Vec::new() };
        let b = bit(slot as usize);
        self.links &= !b;
        let mut out = Vec::new();
        for (o, t) in self.outbound.iter_mut() {
            t.congested &= !b;
            t.last &= !b;
            if let Some(c) = t.changed_with(self.links) {
                out.push((*o, c));
            }
        }
        out.sort_unstable_by_key(|(o, _)| (o.shard, o.session));
        let shift = SHARD_BITS + SESSION_BITS;
        self.inbound.retain(|k, _| k >> shift != slot as u64);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> NodeName {
        NodeName(n.into())
    }

    #[test]
    fn a_remote_publisher_is_reported_while_every_shard_it_reached_is_congested() {
        let mut c = Congestion::default();
        let o = OriginRef { shard: 3, session: 42 };
        let key = c.pack(&name("p"), o).unwrap();
        assert_eq!(c.delivered(key, 0b11), None);
        assert_eq!(c.shard_reports(key, ShardId(0), true), None, "shard 1 still keeps up");
        assert_eq!(c.shard_reports(key, ShardId(1), true), Some((name("p"), o, true)));
        // Its next message reaches a shard that keeps up: no longer all congested.
        assert_eq!(c.delivered(key, 0b111), Some((name("p"), o, false)));
        assert_eq!(c.delivered(key, 0b011), Some((name("p"), o, true)));
        assert_eq!(c.shard_reports(key, ShardId(0), false), Some((name("p"), o, false)));
    }

    #[test]
    fn a_local_publisher_is_reported_while_every_peer_it_reached_is_congested_until_one_goes() {
        let mut c = Congestion::default();
        let (a, b) = (name("a"), name("b"));
        let (sa, sb) = (c.slot(&a).unwrap(), c.slot(&b).unwrap());
        let o = Origin { shard: ShardId(1), session: SessionKey(9) };
        assert_eq!(c.forwarded(o, bit(sa as usize) | bit(sb as usize)), None);
        assert_eq!(c.peer_reports(&a, o, true), None);
        assert_eq!(c.peer_reports(&b, o, true), Some(true));
        // b's bits go from both masks: a, the one target left, is still congested, so nothing changes.
        assert!(c.peer_down(&b).is_empty());
        assert_eq!(c.peer_reports(&a, o, false), Some(false));
    }

    #[test]
    fn a_congested_link_reports_the_publishers_that_reach_only_congested_peers() {
        let mut c = Congestion::default();
        let (a, b) = (name("a"), name("b"));
        let (ba, bb) = (bit(c.slot(&a).unwrap() as usize), bit(c.slot(&b).unwrap() as usize));
        let only_a = Origin { shard: ShardId(0), session: SessionKey(1) };
        let both = Origin { shard: ShardId(0), session: SessionKey(2) };
        assert_eq!(c.forwarded(only_a, ba), None);
        assert_eq!(c.forwarded(both, ba | bb), None);
        assert_eq!(c.links_congested(ba), vec![(only_a, true)], "b still takes `both`'s messages");
        assert_eq!(c.forwarded(both, ba), Some(true), "its next message went to a alone");
        assert_eq!(c.links_congested(0), vec![(only_a, false), (both, false)]);
        assert_eq!(c.links_congested(0), vec![], "no change, no report");
    }

    #[test]
    fn packing_round_trips_and_refuses_what_does_not_fit() {
        let mut c = Congestion::default();
        let o = OriginRef { shard: 4095, session: (1 << 46) - 1 };
        let k = c.pack(&name("x"), o).unwrap();
        assert_eq!(c.unpack(k), Some((name("x"), o)));
        assert_eq!(c.pack(&name("x"), OriginRef { shard: 4096, session: 1 }), None);
        assert_eq!(c.pack(&name("x"), OriginRef { shard: 1, session: 1 << 46 }), None);
        for i in 0..63 {
            c.slot(&name(&format!("p{i}")));
        }
        assert_eq!(c.slot(&name("one-too-many")), None);
    }
}
