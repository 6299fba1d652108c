//! The socket runtime: one pinned thread per shard, each with its own `SO_REUSEPORT` listener and its own
//! event loop (io_uring, or epoll when io_uring cannot be set up), driving one sans-I/O [`Core`].
//!
//! This is the only crate that touches sockets, rings, file descriptors and clocks. Everything protocol-shaped
//! lives behind the [`Core`] trait (defined with the core, in `shardmq_shard::io`, which does not depend on
//! this crate), so the runtime can be tested with a trivial core and the core without sockets.
//!
//! Threads that are not shards but must talk to them (the cluster gateway) join the shards' mesh as
//! [`MeshEndpoint`]s ([`start_with_endpoints`]).

pub use shardmq_shard::io::{Core, IoCmd, WakeFn};

pub mod cluster;
mod driver;
mod endpoint;
mod epoll;
mod gate;
mod mesh;
mod node;
mod slab;
mod sys;
mod uring;

pub use self::endpoint::{EndpointStats, MeshEndpoint};
pub use self::mesh::Waker;
pub use self::node::{
    start, start_with_endpoints, Backend, BackendChoice, Node, RuntimeConfig, ShardFailure, ShardStats,
    StatsReader,
};
