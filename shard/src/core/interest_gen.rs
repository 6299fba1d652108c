//! Interest generations: subscription visibility inside a node without waiting for the mesh.
//!
//! A shard learns of other shards' subscriptions from their `Mesh::Interest` announcements, which take a
//! trip through the mesh. Until one arrives, a publish routed here would miss a subscription another shard
//! has already processed (a client that publishes right after another client's SUBSCRIBE, without waiting
//! for its SUBACK, sees no delivery; single-threaded brokers deliver it). So each shard also counts the
//! interest it has added in a shared atomic, its *generation*, bumped while it processes the SUBSCRIBE and
//! carried by the announcement. A routing shard compares every shard's generation with the one it last
//! applied; a shard it has not caught up with gets the publish anyway, and matches it against its own
//! index (a false positive costs one mesh message; a shard that is caught up has an exact view).
//!
//! One atomic load per publish in the common case: the node-wide total of all generations is compared with
//! the sum of those applied here, and the shards are only looked at one by one when it differs.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ShardId;

/// A counter alone on its cache line: a shard bumping its own must not slow the others' loads of theirs.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

/// Every shard's interest generation, shared by the shards of a node.
#[derive(Debug)]
pub struct InterestGens {
    per_shard: Box<[Padded]>,
    /// The sum of `per_shard`. Invariant: bumped after the shard's own counter, so a reader that sees the
    /// new total also sees the new per-shard value (both SeqCst).
    total: Padded,
}

impl InterestGens {
    pub fn new(shards: u16) -> InterestGens {
        InterestGens {
            per_shard: (0..shards.max(1)).map(|_| Padded::default()).collect(),
            total: Padded::default(),
        }
    }

    /// `shard` added interest; returns its new generation.
    pub(super) fn bump(&self, shard: ShardId) -> u64 {
        let g = self.per_shard[shard.index()].0.fetch_add(1, Ordering::SeqCst) + 1;
        self.total.0.fetch_add(1, Ordering::SeqCst);
        g
    }

    pub(super) fn get(&self, shard: ShardId) -> u64 {
        self.per_shard.get(shard.index()).map_or(0, |p| p.0.load(Ordering::SeqCst))
    }

    fn total(&self) -> u64 {
        self.total.0.load(Ordering::SeqCst)
    }
}

/// The generations one shard has applied, per shard (its own included: it applies its interest at once).
#[derive(Debug)]
pub(super) struct SeenGens {
    per_shard: Vec<u64>,
    /// Invariant: the sum of `per_shard`.
    total: u64,
}

impl SeenGens {
    pub fn new(shards: u16) -> SeenGens {
        SeenGens { per_shard: vec![0; shards.max(1) as usize], total: 0 }
    }

    /// An announcement carrying generation `gen` of `from` was applied (or this shard bumped its own).
    pub fn applied(&mut self, from: ShardId, gen: u64) {
        let Some(seen) = self.per_shard.get_mut(from.index()) else { return };
        if gen > *seen {
            self.total += gen - *seen;
            *seen = gen;
        }
        debug_assert_eq!(self.total, self.per_shard.iter().sum::<u64>());
    }

    /// Calls `f` with every shard that announced interest this shard has not applied yet.
    pub fn for_each_behind(&self, node: &InterestGens, mut f: impl FnMut(ShardId)) {
        if node.total() == self.total {
            return;
        }
        for (s, seen) in self.per_shard.iter().enumerate() {
            let shard = ShardId(s as u16);
            if node.get(shard) > *seen {
                f(shard);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_is_behind_until_it_applies_the_announced_generation() {
        let node = InterestGens::new(3);
        let mut seen = SeenGens::new(3);
        let behind = |seen: &SeenGens| {
            let mut m = [false; 3];
            seen.for_each_behind(&node, |s| m[s.index()] = true);
            m
        };
        assert_eq!(behind(&seen), [false; 3]);
        let g = node.bump(ShardId(2));
        node.bump(ShardId(1));
        let g1 = node.bump(ShardId(1));
        assert_eq!(behind(&seen), [false, true, true]);
        seen.applied(ShardId(2), g);
        seen.applied(ShardId(1), 1);
        assert_eq!(behind(&seen), [false, true, false], "one of shard 1's two additions is still unseen");
        seen.applied(ShardId(1), g1);
        // An older announcement arriving late changes nothing.
        seen.applied(ShardId(1), 1);
        assert_eq!(behind(&seen), [false; 3]);
    }
}
