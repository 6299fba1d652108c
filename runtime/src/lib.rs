//! The socket runtime: one pinned thread per shard, each with its own `SO_REUSEPORT` listener and its own
//! event loop (io_uring, or epoll when io_uring cannot be set up), driving one sans-I/O [`Core`].
//!
//! This is the only crate that touches sockets, rings, file descriptors and clocks. Everything protocol-shaped
//! lives behind the [`Core`] trait (defined with the core, in `shardmq_shard::io`, which does not depend on
//! this crate), so the runtime can be tested with a trivial core and the core without sockets.

pub use shardmq_shard::io::{Core, IoCmd, WakeFn};

mod driver;
mod epoll;
mod gate;
mod mesh;
mod node;
mod slab;
mod sys;
mod uring;

pub use self::mesh::Waker;
pub use self::node::{start, Backend, BackendChoice, Node, RuntimeConfig, ShardFailure, ShardStats};
