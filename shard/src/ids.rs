//! Identifier newtypes shared by the core and the runtime.

/// Index of a shard (one per core), `0..shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(pub u16);

impl ShardId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A connection, unique within its shard for the life of the process: the runtime never reuses a value,
/// so a stale id held by the core (a timer, a pending handoff) can never address a newer connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);
