//! Client id → session lookup of one shard.
//!
//! A `HashMap<Arc<str>, SessionKey>` costs 24 bytes per bucket (the id's fat pointer and the key) at a
//! load of 44–88%, i.e. up to ~55 bytes per session, for an id the session already holds. This table
//! keeps only the 8-byte key and hashes and compares through the session's own `client_id`, so the
//! index costs 8 bytes per bucket (plus hashbrown's control byte).

use ahash::HashMap;

use super::session::Session;
use super::SessionKey;

pub(super) struct ClientIndex {
    table: hashbrown::HashTable<SessionKey>,
    hasher: ahash::RandomState,
}

impl ClientIndex {
    pub fn new() -> ClientIndex {
        ClientIndex { table: hashbrown::HashTable::new(), hasher: ahash::RandomState::new() }
    }

    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    pub fn get(&self, id: &str, sessions: &HashMap<SessionKey, Box<Session>>) -> Option<SessionKey> {
        self.table.find(self.hash(id), |k| sessions.get(k).is_some_and(|s| &*s.client_id == id)).copied()
    }

    /// Records `key` for its session's client id, replacing the session recorded for that id before (as
    /// a map insert would). The session must be in `sessions` already: resizing rehashes every entry
    /// through `sessions`.
    pub fn insert(&mut self, key: SessionKey, sessions: &HashMap<SessionKey, Box<Session>>) {
        let id = &*sessions[&key].client_id;
        let hash = self.hasher.hash_one(id);
        let same_id = |k: &SessionKey| *k != key && sessions.get(k).is_some_and(|s| &*s.client_id == id);
        if let Some(k) = self.table.find_mut(hash, same_id) {
            *k = key;
            return;
        }
        let hasher = &self.hasher;
        let rehash = |k: &SessionKey| {
            // Every recorded key has its session (`Shard::end_session` removes both together); should
            // one not, its entry only becomes unreachable, which is no reason to stop the shard.
            debug_assert!(sessions.contains_key(k), "{k:?} indexed without a session");
            sessions.get(k).map_or(0, |s| hasher.hash_one(&*s.client_id))
        };
        self.table.insert_unique(hash, key, rehash);
    }

    /// Forgets `key`, recorded under `id` (the session itself may already be gone).
    pub fn remove(&mut self, id: &str, key: SessionKey) {
        if let Ok(e) = self.table.find_entry(self.hash(id), |&k| k == key) {
            e.remove();
        }
    }
}
