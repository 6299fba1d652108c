//! Retained messages across the zone: every update made on this node goes to every peer, stamped with the
//! node's hybrid logical clock; a peer's update that wins (last writer by stamp, then node name) is handed
//! to the topic's owner shard, which stores it and gives it to every shard, as a local one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_shard::core::{Mesh, Msg};

use super::{frame_properties, msg_from_frame, shared, Gateway};
use crate::link::{Frame, Retained};
use crate::retained::{Hlc, HlcStamp, RetainedReplica, RetainedUpdate};
use crate::NodeName;

#[derive(Default)]
pub(super) struct RetainedSync {
    replica: RetainedReplica<Arc<Msg>>,
    hlc: Hlc,
    /// Peers' updates handed to the owner shards, until their fan-out comes back to the gateway (the
    /// same `Arc`): that echo is not a new local update. Several per topic when updates follow each
    /// other faster than the owner echoes them (each echo must be recognised, not only the last).
    injected: HashMap<Arc<str>, Vec<Arc<Msg>>>,
    /// When tombstones were last pruned (`None`: not yet).
    pruned_at: Option<Instant>,
}

/// How long a deletion is remembered (as a tombstone that wins over older copies of the message): far
/// longer than any replication delay in a zone, while a node away for longer than this and coming back
/// with the deleted message brings it back. Pruned every [`PRUNE_EVERY`].
pub(super) const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl RetainedSync {
    pub fn len(&self) -> usize {
        self.replica.len()
    }

    pub fn next_prune_at(&self, started: Instant) -> Instant {
        self.pruned_at.unwrap_or(started) + PRUNE_EVERY
    }

    /// Forgets deletions older than [`TOMBSTONE_TTL`] (`wall_ms`: now, on the wall clock).
    pub fn prune(&mut self, wall_ms: u64, now: Instant) {
        let horizon = wall_ms.saturating_sub(TOMBSTONE_TTL.as_millis() as u64);
        self.replica.prune(HlcStamp::new(horizon, 0));
        self.pruned_at = Some(now);
    }
}

/// The frame that carries one replica entry.
fn frame<'a>(u: &'a RetainedUpdate<Arc<Msg>>, props: &'a [u8], expiry_s: Option<u32>) -> Frame<'a> {
    let (qos, payload) = match &u.message {
        Some(m) => (m.qos as u8, &m.payload[..]),
        None => (0, &[][..]),
    };
    Frame::Retained(Retained {
        stamp: u.stamp.0,
        node: &u.node.0,
        qos,
        topic: &u.topic,
        payload,
        properties: props,
        expiry_s,
        clear: u.message.is_none(),
    })
}

impl Gateway {
    /// A retained update made on this node (the owner shard's fan-out), or the echo of a peer's.
    pub(super) fn local_retained(&mut self, msg: Arc<Msg>, now: Instant) {
        let topic: Arc<str> = Arc::from(&*msg.topic);
        if let Some(list) = self.retained.injected.get_mut(&topic) {
            if let Some(i) = list.iter().position(|m| Arc::ptr_eq(m, &msg)) {
                list.remove(i);
                if list.is_empty() {
                    self.retained.injected.remove(&topic);
                }
                return;
            }
        }
        let stamp = self.retained.hlc.stamp(self.wall_ms(now));
        let node = self.zone.identity().name.clone();
        let message = (!msg.payload.is_empty()).then_some(msg);
        let u = RetainedUpdate { topic, stamp, node, message };
        self.retained.replica.apply(u.clone());
        let peers: Vec<NodeName> = self.zone.peers_up().map(|p| p.name.clone()).collect();
        for p in peers {
            self.send_update(&p, &u, now);
        }
    }

    /// The retained messages a shard held when the gateway started (restored from its log): stamped as
    /// older than any update (stamp 0; the node name breaks ties), so whatever the zone did meanwhile, an
    /// update or a deletion, wins over them; what nobody else has is kept and replicated.
    pub(super) fn held_retained(&mut self, msgs: Vec<Arc<Msg>>, now: Instant) {
        let node = self.zone.identity().name.clone();
        let peers: Vec<NodeName> = self.zone.peers_up().map(|p| p.name.clone()).collect();
        for msg in msgs {
            let topic: Arc<str> = Arc::from(&*msg.topic);
            let u =
                RetainedUpdate { topic, stamp: HlcStamp::default(), node: node.clone(), message: Some(msg) };
            if self.retained.replica.apply(u.clone()) {
                for p in &peers {
                    self.send_update(p, &u, now);
                }
            }
        }
    }

    fn send_update(&mut self, peer: &NodeName, u: &RetainedUpdate<Arc<Msg>>, now: Instant) {
        let (props, expiry_s) = match &u.message {
            Some(m) if m.is_expired(now) => return,
            Some(m) => frame_properties(m, now),
            None => (Vec::new(), None),
        };
        if self.send_frame(peer, &frame(u, &props, expiry_s)) {
            self.counters.retained_out += 1;
        }
    }

    /// Every retained message (and deletion) this node knows, to a peer that just linked: it keeps the
    /// newer of each.
    pub(super) fn send_retained_snapshot(&mut self, peer: &NodeName, now: Instant) {
        let all: Vec<RetainedUpdate<Arc<Msg>>> = self.retained.replica.entries().cloned().collect();
        for u in &all {
            self.send_update(peer, u, now);
        }
    }

    pub(super) fn receive_retained(&mut self, from: &NodeName, f: Retained<'_>, now: Instant) {
        let Retained { stamp, node, qos, topic, payload, properties, expiry_s, clear } = f;
        let msg =
            msg_from_frame(topic, if clear { &[] } else { payload }, qos, true, properties, expiry_s, now);
        let Some(msg) = msg.filter(|m| clear || !m.payload.is_empty()) else {
            self.counters.malformed += 1;
            tracing::warn!(node = %from, "invalid retained update from a cluster peer; ignored");
            return;
        };
        let stamp = HlcStamp(stamp);
        self.retained.hlc.observe(stamp);
        let msg = shared(msg);
        let topic: Arc<str> = Arc::from(topic);
        let u = RetainedUpdate {
            topic: topic.clone(),
            stamp,
            node: NodeName(Arc::from(node)),
            message: (!clear).then(|| msg.clone()),
        };
        if !self.retained.replica.apply(u) {
            return;
        }
        self.counters.retained_in += 1;
        self.retained.injected.entry(topic).or_default().push(msg.clone());
        let owner = self.owner_shard(&msg.topic);
        self.out.push_back((owner, Mesh::Retain { msg, apply: false, ack: None }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletions_are_remembered_for_the_tombstone_ttl_then_forgotten() {
        let mut r = RetainedSync::default();
        let now = Instant::now();
        let deleted_at_ms = 1_800_000_000_000;
        let u = RetainedUpdate {
            topic: Arc::from("t"),
            stamp: HlcStamp::new(deleted_at_ms, 0),
            node: NodeName("n1".into()),
            message: None,
        };
        assert!(r.replica.apply(u));
        let ttl = TOMBSTONE_TTL.as_millis() as u64;
        r.prune(deleted_at_ms + ttl - 1, now);
        assert_eq!(r.replica.entries().count(), 1, "still within the TTL");
        assert_eq!(r.next_prune_at(now), now + PRUNE_EVERY);
        r.prune(deleted_at_ms + ttl + 1, now);
        assert_eq!(r.replica.entries().count(), 0);
    }
}
