//! `shardmq-shard`: the sans-I/O core of one MQTT shard per CPU core.
//!
//! What it does:
//! - [`core`]: the sans-I/O MQTT session core of one shard: connections, sessions, QoS flows, wills,
//!   retained messages, shared subscriptions, keepalive — bytes and `now` in, bytes, timers and cross-core
//!   messages out; with a log (`core::persist`, on `shardmq-storage`), it records persistent sessions,
//!   their messages and retained messages, holds acknowledgements until their records are durable, and
//!   rebuilds itself from the logs of every shard at boot;
//! - [`auth`]: Mosquitto-format password files and ACLs, parsed once and checked by the shard that owns
//!   the connection (rules compiled per client at CONNECT);
//! - [`placement`]: the specified, stable hash that decides which shard owns a client id or retained
//!   topic (recorded in the data directory, since the logs depend on it);
//! - [`trie`] and [`retained`]: the per-shard subscription index and retained-message tree;
//! - [`io`]: the interface a runtime drives a core through ([`io::Core`], [`io::IoCmd`]).
//!
//! What it does not do: sockets, rings and clocks (that is `shardmq-runtime`, which depends on this crate;
//! this one has no dependency that could reach a socket, so the compiler keeps the boundary), the log's
//! file format, flushing and compaction mechanics (that is
//! `shardmq-storage`; the core only decides what to write and what is still live), clustering across
//! nodes, or command-line parsing (that is the `broker` crate).

pub mod auth;
pub mod core;
mod ids;
pub mod io;
pub mod placement;
pub mod retained;
pub mod trie;

pub use ids::{ConnId, ShardId};
