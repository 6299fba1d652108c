//! `shardmq-shard`: one MQTT shard per CPU core.
//!
//! What it does:
//! - [`core`]: the sans-I/O MQTT session core of one shard: connections, sessions, QoS flows, wills,
//!   retained messages, shared subscriptions, keepalive — bytes and `now` in, bytes, timers and cross-core
//!   messages out; with a log (`core::persist`, on `shardmq-storage`), it records persistent sessions,
//!   their messages and retained messages, holds acknowledgements until their records are durable, and
//!   rebuilds itself from the logs of every shard at boot;
//! - [`placement`]: the specified, stable hash that decides which shard owns a client id or retained
//!   topic (recorded in the data directory, since the logs depend on it);
//! - [`trie`] and [`retained`]: the per-shard subscription index and retained-message tree;
//! - [`runtime`]: the only code that touches sockets: a pinned thread per shard, io_uring with an epoll
//!   fallback, bounded cross-core channels.
//!
//! What it does not do: the log's file format, flushing and compaction mechanics (that is
//! `shardmq-storage`; the core only decides what to write and what is still live), clustering across
//! nodes, or command-line parsing (that is the `broker` crate).

pub mod core;
mod ids;
pub mod placement;
pub mod retained;
pub mod runtime;
pub mod trie;

pub use ids::{ConnId, ShardId};
