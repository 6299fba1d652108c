//! The interface between a sans-I/O core and the runtime that drives it ([`Core`], [`IoCmd`]).
//!
//! It lives here, with the core, so that the runtime depends on the core's crate and never the other way
//! round: the core cannot reach a socket, a ring or a clock, because its crate has no way to (the
//! compiler keeps the boundary). The runtime is the `shardmq-runtime` crate.

use std::time::Instant;

use crate::{ConnId, ShardId};

/// Where an accepted connection came from (see [`Core::handle_accepted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The listener's index in the runtime's list of listen addresses.
    pub listener: u16,
    /// The peer's address, when the runtime could learn it.
    pub peer: Option<std::net::IpAddr>,
}

/// Wakes a shard's loop from another thread (see [`Core::set_waker`]).
pub type WakeFn = Box<dyn Fn() + Send + Sync>;

/// What a core asks its runtime to do with a connection. Returned by [`Core::poll_io`].
#[derive(Debug)]
pub enum IoCmd<H> {
    /// The core has bytes for `conn`: the runtime fetches them with [`Core::take_transmit`] and writes them.
    Transmit(ConnId),
    /// Flush what is pending for `conn` (best effort, bounded), then close it. The runtime does not call
    /// [`Core::handle_closed`] for a close the core asked for.
    Close(ConnId),
    /// Move the connection to shard `to`: the runtime stops watching the socket, ships it with `state` to
    /// the target runtime, which registers it under a fresh [`ConnId`] and calls [`Core::handle_adopt`].
    /// Output already taken by the runtime but not yet written travels with it and is written first.
    Handoff { conn: ConnId, to: ShardId, state: H },
    /// Stop reading from `conn` (publisher backpressure): the runtime makes no further `handle_read` calls
    /// for it until `ResumeRead`, so the kernel's receive buffer fills and TCP flow control slows the peer.
    /// Writes, closes and peer-close detection are unaffected.
    ///
    /// Takes effect as soon as the current `handle_*` call returns: bytes the runtime already holds for
    /// `conn` are kept, in order, and delivered after `ResumeRead`. Idempotent; ignored for unknown or
    /// closing connections. The end of the stream (peer close or read error) is only seen by reading, so a
    /// paused connection's `handle_closed` comes after `ResumeRead`, once the bytes before it are delivered;
    /// only a failed write reports it while paused. A handed-off connection arrives unpaused.
    PauseRead(ConnId),
    /// Read from `conn` again. Data that arrived while paused is delivered with `handle_read` as usual
    /// (from the event loop, not from within the call that returned this command). A no-op for a
    /// connection that is not paused.
    ResumeRead(ConnId),
}

/// A sans-I/O shard core: bytes, cross-core messages and `now` in; bytes, timers, I/O commands and cross-core
/// messages out. The runtime calls the `handle_*` methods as events arrive, then drains `poll_io` and
/// `poll_mesh` and sleeps until `poll_timeout` or the next event.
pub trait Core {
    /// A cross-core message between cores of the same kind.
    type Mesh: Send + 'static;
    /// Connection state carried with a socket moved to another shard.
    type Handoff: Send + 'static;

    /// A new connection was accepted on this shard's listener.
    fn handle_accept(&mut self, conn: ConnId, now: Instant);
    /// Where a connection just accepted came from (called right after `handle_accept`): the listener
    /// (what its transport is) and the peer's address (what a core needs to slow down password guessing
    /// from one address).
    fn handle_accepted(&mut self, _conn: ConnId, _from: Accepted) {}
    /// On a node that takes the user name from the transport (a TLS client certificate's subject CN):
    /// the name the connection's transport proved, or `None` when it proved none (a certificate without
    /// a CN), before the connection's first bytes are delivered. A connection without a name must not
    /// log in under the user name it claims.
    fn handle_peer_identity(&mut self, _conn: ConnId, _name: Option<&str>) {}
    /// A connection moved here from another shard.
    fn handle_adopt(&mut self, conn: ConnId, state: Self::Handoff, now: Instant);
    /// Bytes read from `conn`. The slice is the runtime's (shared) buffer: the core copies only what it must
    /// keep (an incomplete packet's bytes).
    fn handle_read(&mut self, conn: ConnId, data: &[u8], now: Instant);
    /// The peer closed the connection, or a read or write failed.
    fn handle_closed(&mut self, conn: ConnId, now: Instant);
    /// The socket of `conn` stopped accepting bytes (`blocked == true`: the runtime holds unsent output) or
    /// drained again. Lets the core stop producing for slow consumers.
    fn handle_backpressure(&mut self, conn: ConnId, blocked: bool, now: Instant);
    /// A batch element from another shard.
    fn handle_mesh(&mut self, from: ShardId, msg: Self::Mesh, now: Instant);
    /// The deadline from [`Core::poll_timeout`] has passed (the runtime may also call it early).
    fn handle_timeout(&mut self, now: Instant);
    /// The node is shutting down: tell clients (MQTT 5: DISCONNECT 0x8B) and ask to close every connection.
    fn handle_shutdown(&mut self, now: Instant);
    /// End of an event-loop iteration, before cross-core messages are sent and the loop sleeps: a core
    /// with a log commits what the iteration appended as one group and releases what waited for it.
    fn handle_commit(&mut self, _now: Instant) {}

    /// Takes the bytes queued for `conn` (leaving the core's buffer empty). Empty when there are none.
    fn take_transmit(&mut self, conn: ConnId) -> Vec<u8>;
    /// Gives an emptied buffer back so its allocation can be reused (optional for the runtime to call).
    fn recycle(&mut self, _buf: Vec<u8>) {}
    fn poll_io(&mut self) -> Option<IoCmd<Self::Handoff>>;
    fn poll_mesh(&mut self) -> Option<(ShardId, Self::Mesh)>;
    /// Whether a mesh message may wait a moment (a millisecond) before its target wakes for it: the
    /// runtime then does not wake a mesh endpoint that sleeps for a short while only (see the runtime's
    /// `Wake::wake_lazy`).
    fn mesh_can_wait(_m: &Self::Mesh) -> bool {
        false
    }
    /// The earliest instant at which `handle_timeout` must be called.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Called once before the loop starts with a function that wakes this shard's loop from any thread: a
    /// core may give it to work it runs off the loop (its log's flusher), whose completion the loop must
    /// see in its next iteration (`handle_commit`).
    fn set_waker(&mut self, _wake: WakeFn) {}
}
