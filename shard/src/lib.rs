//! `shardmq-shard`: one MQTT shard per CPU core.
//!
//! What it does:
//! - [`core`]: the sans-I/O MQTT session core of one shard: connections, sessions, QoS flows, wills,
//!   retained messages, shared subscriptions, keepalive — bytes and `now` in, bytes, timers and cross-core
//!   messages out;
//! - [`trie`] and [`retained`]: the per-shard subscription index and retained-message tree;
//! - [`runtime`]: the only code that touches sockets: a pinned thread per shard, io_uring with an epoll
//!   fallback, bounded cross-core channels.
//!
//! What it does not do: persistence (sessions live in memory in this crate), clustering across nodes, or
//! command-line parsing (that is the `broker` crate).

pub mod core;
mod ids;
pub mod retained;
pub mod runtime;
pub mod trie;

pub use ids::{ConnId, ShardId};
