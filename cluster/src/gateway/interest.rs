//! The node's interest as the gateway sees it: every shard's announcements (what a message from a peer is
//! delivered by, and what the node announces to the zone), the SUBACKs waiting for the peers, and the
//! zone's shared-group members announced to the shards.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use shardmq_shard::core::{InterestDelta, Mesh, SharedKey};
use shardmq_shard::trie::TopicTrie;
use shardmq_shard::ShardId;

use crate::router::ZoneRouter;

/// One shard's subscriber count for a filter and group, as it announced it.
#[derive(Debug, Clone)]
struct Entry {
    shard: ShardId,
    key: SharedKey,
    /// Invariant: > 0 (entries at 0 are removed).
    members: u32,
}

/// The full filter a group and filter stand for (`$share/group/filter`, or the filter).
pub(super) fn full_filter(key: &SharedKey) -> String {
    match &key.0 {
        Some(g) => format!("$share/{g}/{}", key.1),
        None => key.1.to_string(),
    }
}

/// Where a message from a peer goes in this node: per shard, whether to its plain subscribers and which
/// groups' one member.
pub(super) type Targets = Vec<(ShardId, bool, Vec<SharedKey>)>;

#[derive(Default)]
pub(super) struct NodeView {
    interest: TopicTrie<Entry>,
    /// Round-robin position per group when choosing the shard of a peer's group message.
    rr: HashMap<SharedKey, u64>,
    /// The zone's members of each shared group outside this node, as last announced to the shards.
    remote_shared: HashMap<SharedKey, u32>,
    /// Plain filters whose node-level announcement the peers have not all acknowledged yet: the
    /// router token a later shard's subscribers to the filter wait for too.
    unacked: HashMap<String, u64>,
}

impl NodeView {
    /// Applies a shard's announcement and tells the router what it changes at node level: a plain filter
    /// once per node (its first and last shard), a shared group by each member. Returns the router
    /// tokens the announcement's SUBACK waits for.
    pub fn apply_local(
        &mut self,
        from: ShardId,
        deltas: Vec<InterestDelta>,
        router: &mut ZoneRouter,
        now: Instant,
    ) -> Vec<u64> {
        let mut tokens = Vec::new();
        for d in deltas {
            let node_before = self.node_members(&d.key);
            self.set(from, &d.key, d.members);
            let node_after = self.node_members(&d.key);
            let full = full_filter(&d.key);
            if d.key.0.is_some() {
                // Every member counts: the zone spreads a group's messages by member count.
                for _ in node_before..node_after {
                    tokens.extend(router.subscribe(&full, now));
                }
                for _ in node_after..node_before {
                    router.unsubscribe(&full);
                }
            } else if node_before == 0 && node_after > 0 {
                let t = router.subscribe(&full, now);
                if let Some(t) = t {
                    self.unacked.insert(full, t);
                }
                tokens.extend(t);
            } else if node_after > node_before {
                // Another shard's subscribers made the node's interest already, and the peers may not
                // have acknowledged it yet: this shard's SUBACK must not overtake that one's.
                tokens.extend(self.unacked.get(&full).copied());
            } else if node_before > 0 && node_after == 0 {
                router.unsubscribe(&full);
            }
        }
        tokens.sort_unstable();
        tokens.dedup();
        tokens
    }

    /// Router token `t` completed: its filter's announcement is acknowledged (or given up on).
    pub fn announced(&mut self, t: u64) {
        self.unacked.retain(|_, x| *x != t);
    }

    /// Plain filters: how many shards have subscribers; shared groups: how many members in the node.
    fn node_members(&self, key: &SharedKey) -> u32 {
        let list = self.interest.get(&key.1).unwrap_or(&[]);
        let mine = list.iter().filter(|e| e.key == *key);
        if key.0.is_some() {
            mine.map(|e| e.members).sum()
        } else {
            mine.count() as u32
        }
    }

    fn set(&mut self, shard: ShardId, key: &SharedKey, members: u32) {
        if members == 0 {
            self.interest.remove(&key.1, |e| e.shard == shard && e.key == *key);
            if self.node_members(key) == 0 {
                self.rr.remove(key);
            }
            return;
        }
        if let Some(list) = self.interest.get_mut(&key.1) {
            if let Some(e) = list.iter_mut().find(|e| e.shard == shard && e.key == *key) {
                e.members = members;
                return;
            }
        }
        self.interest.insert(&key.1, Entry { shard, key: key.clone(), members });
    }

    /// The shards a message from a peer goes to: every shard with plain subscribers matching it (when
    /// `normal`), and for each listed group one shard, by weighted round robin over its members. Groups
    /// with no member here any more are returned apart.
    pub fn targets(&mut self, topic: &str, normal: bool, groups: &[SharedKey]) -> (Targets, usize) {
        let mut out: Targets = Vec::new();
        if normal {
            self.interest.for_each_match(topic, |e| {
                if e.key.0.is_none() && !out.iter().any(|(s, _, _)| *s == e.shard) {
                    out.push((e.shard, true, Vec::new()));
                }
            });
        }
        let mut missing = 0;
        for key in groups {
            let list: Vec<(ShardId, u32)> = self
                .interest
                .get(&key.1)
                .unwrap_or(&[])
                .iter()
                .filter(|e| e.key == *key)
                .map(|e| (e.shard, e.members))
                .collect();
            let total: u64 = list.iter().map(|(_, m)| *m as u64).sum();
            if total == 0 {
                missing += 1;
                continue;
            }
            let rr = self.rr.entry(key.clone()).or_insert(0);
            let mut pick = *rr % total;
            *rr = rr.wrapping_add(1);
            for (shard, m) in list {
                if pick < m as u64 {
                    match out.iter_mut().find(|(s, _, _)| *s == shard) {
                        Some((_, _, g)) => g.push(key.clone()),
                        None => out.push((shard, false, vec![key.clone()])),
                    }
                    break;
                }
                pick -= m as u64;
            }
        }
        (out, missing)
    }

    /// Announces to the shards the zone's shared-group members outside this node (as the gateway's own
    /// members: a shard then sends a group's message here in proportion to them), where they changed.
    pub fn sync_remote_shared(
        &mut self,
        router: &ZoneRouter,
        shards: u16,
        out: &mut VecDeque<(ShardId, Mesh)>,
    ) {
        let now: HashMap<SharedKey, u32> = router
            .peer_shared()
            .into_iter()
            .filter_map(|(full, members)| {
                let sh = shardmq_wire::topic::parse_shared(&full)?;
                let key: SharedKey = (Some(Arc::from(sh.group)), Arc::from(sh.filter));
                Some((key, members))
            })
            .filter(|(_, m)| *m > 0)
            .collect();
        let mut deltas = Vec::new();
        for (key, m) in &now {
            if self.remote_shared.get(key) != Some(m) {
                // Counted as persistent: a QoS 1/2 message to a remote member waits for its node's answer.
                deltas.push(InterestDelta { key: key.clone(), members: *m, durable: *m });
            }
        }
        for key in self.remote_shared.keys() {
            if !now.contains_key(key) {
                deltas.push(InterestDelta { key: key.clone(), members: 0, durable: 0 });
            }
        }
        self.remote_shared = now;
        if deltas.is_empty() {
            return;
        }
        for s in 0..shards {
            // No generation: the gateway is not a shard whose additions others track (`interest_gen`).
            out.push_back((
                ShardId(s),
                Mesh::Interest { deltas: deltas.clone(), token: None, generation: 0 },
            ));
        }
    }
}

/// Shards' interest announcements whose acknowledgement waits for the peers (a SUBACK behind each).
#[derive(Default)]
pub(super) struct InterestWaits {
    /// (shard, shard's token) → router tokens still pending.
    waiting: HashMap<(ShardId, u64), Vec<u64>>,
}

impl InterestWaits {
    /// The answer to send now, or `None` when it waits for `tokens`.
    pub fn wait(&mut self, from: ShardId, token: u64, tokens: Vec<u64>) -> Option<(ShardId, Mesh)> {
        if tokens.is_empty() {
            return Some((from, Mesh::InterestAck { token }));
        }
        self.waiting.insert((from, token), tokens);
        None
    }

    /// Router token `t` completed (every peer acknowledged, went down or timed out).
    pub fn router_done(&mut self, t: u64, out: &mut VecDeque<(ShardId, Mesh)>) {
        let mut done = Vec::new();
        for (k, tokens) in self.waiting.iter_mut() {
            tokens.retain(|x| *x != t);
            if tokens.is_empty() {
                done.push(*k);
            }
        }
        done.sort_unstable();
        for (shard, token) in done {
            self.waiting.remove(&(shard, token));
            out.push_back((shard, Mesh::InterestAck { token }));
        }
    }
}
