//! Retained messages across a zone: every node keeps a replica, and concurrent updates of one topic on
//! different nodes resolve the same way everywhere, last writer wins by (hybrid logical clock, node name).
//!
//! A hybrid logical clock ([`Hlc`]) stamps each update with the node's wall clock in milliseconds, pushed
//! past every stamp it has seen: stamps follow real time where clocks agree, and still order an update
//! after every update its node had seen, whatever the skew. Deletions (an empty retained payload) are kept
//! as tombstones, so an older update arriving late cannot bring a deleted message back; tombstones older
//! than a horizon are dropped ([`RetainedReplica::prune`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::NodeName;

/// A hybrid logical clock stamp: milliseconds since the Unix epoch in the high 48 bits, a counter in the
/// low 16. Ordered as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HlcStamp(pub u64);

impl HlcStamp {
    pub fn new(wall_ms: u64, counter: u16) -> HlcStamp {
        HlcStamp((wall_ms.min((1 << 48) - 1) << 16) | counter as u64)
    }

    pub fn wall_ms(self) -> u64 {
        self.0 >> 16
    }
}

/// A node's hybrid logical clock. The wall clock comes in as an argument: the core reads no clock.
#[derive(Debug, Default)]
pub struct Hlc {
    last: HlcStamp,
}

impl Hlc {
    /// A stamp for a local event, after every stamp issued or observed so far.
    pub fn stamp(&mut self, wall_ms: u64) -> HlcStamp {
        let physical = HlcStamp::new(wall_ms, 0);
        self.last = if physical > self.last { physical } else { HlcStamp(self.last.0 + 1) };
        self.last
    }

    /// A stamp seen on a message from another node: later local stamps come after it.
    pub fn observe(&mut self, seen: HlcStamp) {
        if seen > self.last {
            self.last = seen;
        }
    }
}

/// One retained update as replicated: the topic, who wrote it when, and the message (`None`: deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedUpdate<M> {
    pub topic: Arc<str>,
    pub stamp: HlcStamp,
    pub node: NodeName,
    pub message: Option<M>,
}

/// The order that decides between two updates of one topic.
fn version<M>(u: &RetainedUpdate<M>) -> (HlcStamp, &NodeName) {
    (u.stamp, &u.node)
}

/// A node's replica of the zone's retained messages.
#[derive(Debug)]
pub struct RetainedReplica<M> {
    topics: BTreeMap<Arc<str>, RetainedUpdate<M>>,
}

impl<M> Default for RetainedReplica<M> {
    fn default() -> Self {
        RetainedReplica { topics: BTreeMap::new() }
    }
}

impl<M: Clone> RetainedReplica<M> {
    /// Applies an update, local or from a peer; returns whether it won (and so changed the replica).
    /// (stamp, node) names one update: a node's clock never issues a stamp twice, so two updates with the
    /// same version are the same update, received twice.
    pub fn apply(&mut self, u: RetainedUpdate<M>) -> bool {
        match self.topics.get(&u.topic) {
            Some(cur) if version(cur) >= version(&u) => false,
            _ => {
                self.topics.insert(u.topic.clone(), u);
                true
            }
        }
    }

    /// The live retained message of a topic.
    pub fn get(&self, topic: &str) -> Option<&M> {
        self.topics.get(topic).and_then(|u| u.message.as_ref())
    }

    /// Every entry, tombstones included: what a joining node's snapshot carries.
    pub fn entries(&self) -> impl Iterator<Item = &RetainedUpdate<M>> {
        self.topics.values()
    }

    /// Live retained messages.
    pub fn len(&self) -> usize {
        self.topics.values().filter(|u| u.message.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops tombstones stamped before `horizon`: by then every update older than the deletion has
    /// reached every node (the horizon is chosen well past the zone's replication delay).
    pub fn prune(&mut self, horizon: HlcStamp) {
        self.topics.retain(|_, u| u.message.is_some() || u.stamp >= horizon);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(n: &str) -> NodeName {
        NodeName(n.into())
    }

    #[test]
    fn the_clock_orders_after_what_it_saw_whatever_the_skew() {
        let mut fast = Hlc::default();
        let mut slow = Hlc::default();
        let a = fast.stamp(10_000);
        slow.observe(a);
        let b = slow.stamp(5_000); // this node's wall clock is 5 s behind
        assert!(b > a, "{b:?} after {a:?}");
        assert_eq!(b.wall_ms(), 10_000);
        let c = slow.stamp(5_001);
        assert!(c > b);
        assert!(fast.stamp(10_000) > a, "same millisecond: the counter moves");
    }

    #[test]
    fn a_late_older_update_does_not_revive_a_deleted_message() {
        let mut r = RetainedReplica::default();
        let t: Arc<str> = "cfg".into();
        let set = RetainedUpdate {
            topic: t.clone(),
            stamp: HlcStamp::new(1, 0),
            node: name("a"),
            message: Some(1),
        };
        let del =
            RetainedUpdate { topic: t.clone(), stamp: HlcStamp::new(2, 0), node: name("b"), message: None };
        assert!(r.apply(del));
        assert!(!r.apply(set));
        assert_eq!(r.get("cfg"), None);
        r.prune(HlcStamp::new(3, 0));
        assert_eq!(r.entries().count(), 0);
    }

    proptest! {
        /// Replicas that receive the same updates in any order (duplicates included) end up identical,
        /// holding for each topic the update with the highest (stamp, node).
        #[test]
        fn replicas_converge_in_any_order(
            updates in proptest::collection::vec((0..4u8, 0..6u64, 0..3u8, proptest::option::of(0..100u32)), 1..40),
            orders in proptest::collection::vec(Just(()).prop_perturb(|_, mut rng| rng.random::<u64>()), 2..5),
        ) {
            // A node's clock never issues a stamp twice, so (stamp, node) names one update.
            let mut seen = std::collections::HashSet::new();
            let all: Vec<RetainedUpdate<u32>> = updates.iter()
                .filter(|(_, ms, n, _)| seen.insert((*ms, *n)))
                .map(|(t, ms, n, m)| RetainedUpdate {
                    topic: format!("t{t}").into(),
                    stamp: HlcStamp::new(*ms, 0),
                    node: name(&format!("n{n}")),
                    message: *m,
                })
                .collect();
            let mut states = Vec::new();
            for seed in orders {
                let mut order: Vec<usize> = (0..all.len()).chain(0..all.len() / 2).collect();
                let mut s = seed | 1;
                for i in (1..order.len()).rev() {
                    s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                    order.swap(i, (s % (i as u64 + 1)) as usize);
                }
                let mut r = RetainedReplica::default();
                for i in order {
                    r.apply(all[i].clone());
                }
                let snapshot: Vec<_> = r.entries().map(|u| (u.topic.clone(), u.stamp, u.node.clone(), u.message)).collect();
                states.push(snapshot);
            }
            for s in &states[1..] {
                prop_assert_eq!(s, &states[0]);
            }
        }
    }
}
