//! SUBACKs waiting for the other mesh endpoints (shards, the cluster gateway) to acknowledge the interest
//! they add.
//!
//! A SUBSCRIBE that adds interest announces it with a token; its SUBACK leaves once every other endpoint
//! acknowledged the token. A later SUBSCRIBE to a filter whose announcement is still unacknowledged adds no
//! interest of its own (the count is already above 0), yet its SUBACK must not overtake the first one's:
//! the gateway acknowledges only once the zone's other nodes route the filter here, and a client that got
//! its SUBACK may rely on a publish anywhere reaching it. So it waits for the same token.

use std::collections::HashMap;

use std::sync::Arc;

use super::{PendingSubAck, SharedKey};

/// What waits for announcements to be acknowledged.
#[derive(Debug)]
pub(super) enum Waiter {
    SubAck(PendingSubAck),
    /// A session moved here from another node: once every endpoint routes its subscriptions here, the
    /// node it came from may stop forwarding what still reaches it (see `persist::transfer`).
    Settled(Arc<str>),
}

/// One announcement not yet acknowledged by every other endpoint.
#[derive(Debug)]
struct TokenWait {
    /// Invariant: > 0 (the entry goes at 0).
    acks_missing: usize,
    /// The interest it added; a later subscriber to one of them waits for this token.
    keys: Vec<SharedKey>,
    /// Waiters (ids in `subacks`) waiting for it.
    subacks: Vec<u64>,
}

#[derive(Debug, Default)]
pub(super) struct SubAckWaits {
    tokens: HashMap<u64, TokenWait>,
    /// For each key, the latest unacknowledged token that added it.
    keys: HashMap<SharedKey, u64>,
    /// A waiter and how many tokens it still waits for. Invariant: that count > 0.
    subacks: HashMap<u64, (Waiter, usize)>,
    next_id: u64,
}

impl SubAckWaits {
    /// An announcement of `keys` went out with `token` to `acks` other endpoints.
    pub fn announced(&mut self, token: u64, acks: usize, keys: Vec<SharedKey>) {
        debug_assert!(acks > 0);
        for k in &keys {
            self.keys.insert(k.clone(), token);
        }
        self.tokens.insert(token, TokenWait { acks_missing: acks, keys, subacks: Vec::new() });
    }

    /// The unacknowledged token a subscriber to `key` must wait for, if any.
    pub fn pending(&self, key: &SharedKey) -> Option<u64> {
        self.keys.get(key).copied()
    }

    /// Holds `p` until every token in `tokens` is acknowledged; hands it back when there is none.
    pub fn wait(&mut self, p: Waiter, mut tokens: Vec<u64>) -> Option<Waiter> {
        tokens.sort_unstable();
        tokens.dedup();
        tokens.retain(|t| self.tokens.contains_key(t));
        if tokens.is_empty() {
            return Some(p);
        }
        self.next_id += 1;
        let id = self.next_id;
        for t in &tokens {
            self.tokens.get_mut(t).expect("retained above").subacks.push(id);
        }
        self.subacks.insert(id, (p, tokens.len()));
        None
    }

    /// One endpoint acknowledged `token`; returns the SUBACKs that may leave now, in the order they came.
    pub fn acked(&mut self, token: u64) -> Vec<Waiter> {
        let Some(t) = self.tokens.get_mut(&token) else { return Vec::new() };
        t.acks_missing -= 1;
        if t.acks_missing > 0 {
            return Vec::new();
        }
        let t = self.tokens.remove(&token).expect("present above");
        for k in &t.keys {
            if self.keys.get(k) == Some(&token) {
                self.keys.remove(k);
            }
        }
        let mut ready = Vec::new();
        for id in t.subacks {
            let Some((_, left)) = self.subacks.get_mut(&id) else { continue };
            *left -= 1;
            if *left == 0 {
                ready.push(id);
            }
        }
        ready.sort_unstable();
        ready.into_iter().filter_map(|id| self.subacks.remove(&id).map(|(p, _)| p)).collect()
    }
}
