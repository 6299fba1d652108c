//! Mesh endpoints: members of the mesh that are not shards.
//!
//! Why: the cluster gateway is a thread of its own, with its own event loop over its own UDP and TCP sockets,
//! that must exchange `Core::Mesh` messages with the shards exactly as another shard would. It has no
//! listeners, takes no sockets and runs no `Core`, so it is not a shard; it gets a [`MeshEndpoint`] instead:
//! the same bounded inbox, per-target outbox with backlog, eventfd wake and in-flight accounting as a shard,
//! driven by its owner's loop. Shards address endpoint `i` as `ShardId(shards + i)`.
//!
//! Wakeups: an endpoint counts as asleep whenever it is outside [`MeshEndpoint::recv`], since its owner may
//! block on [`MeshEndpoint::wake_fd`] at any moment after `recv` returns. So the first item sent after a
//! `recv` signals the eventfd and later ones do not (the flag is cleared by that signal): at most one
//! eventfd write per `recv`, and never a lost wakeup (`recv` re-checks the inbox after announcing sleep,
//! exactly as a shard does before it blocks).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::mesh::{Inbound, Inbox, Outbox};
use super::node::ShardCounters;
use super::sys;
use shardmq_shard::ShardId;

/// Inbox batches one `recv` takes at most, as a shard does per loop iteration: a flood must not keep the
/// owner from its sockets. When it stops there, the eventfd is left readable so the owner comes back.
const RECV_BATCHES: usize = 1024;

/// What an endpoint did so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointStats {
    pub endpoint: ShardId,
    /// Mesh messages (not batches) accepted by target inboxes.
    pub mesh_sent: u64,
    /// Mesh messages handed to the owner by `recv`.
    pub mesh_received: u64,
    /// Times a batch found the target inbox full and was kept for a retry.
    pub mesh_full_retries: u64,
    /// The most messages of this endpoint not yet handled by their targets at once, seen after a flush.
    pub mesh_backlog_max: u64,
    /// Messages addressed to an id that is no mesh member: dropped.
    pub unknown_target: u64,
    /// Socket handoffs that reached this endpoint (a bug of the sending shard's core): dropped, closing the
    /// socket.
    pub handoffs_dropped: u64,
}

/// A mesh member that is not a shard, owned and driven by one thread (see the module docs).
///
/// The owner's loop: wait for [`wake_fd`](Self::wake_fd) (and its own sockets); [`recv`](Self::recv) when it
/// is readable; [`send`](Self::send) what it has for shards or other endpoints, then [`flush`](Self::flush);
/// while `flush` returns true, retry within about a millisecond (or when the eventfd wakes it: a target
/// that drains a full inbox signals it); stop reading its sockets while [`backlog`](Self::backlog) is too
/// high; exit once [`shutting_down`](Self::shutting_down).
///
/// Nothing sent to an endpoint is dropped while it exists (shards discard what they have not sent yet
/// when the node shuts down, as they do for each other). Once it is dropped, what is sent to it is
/// dropped, as for a shard that exited, and no longer counts against the senders' read gates. What it
/// buffered and did not flush is dropped with it. Its eventfd belongs to the node and outlives it: the
/// owner removes it from its epoll set itself.
pub struct MeshEndpoint<M> {
    id: ShardId,
    shards: usize,
    /// The inbox and outbox, whose types name the shards' handoff type; hidden so that only `M` shows.
    link: Box<dyn Link<M> + Send>,
    shutdown: Arc<AtomicBool>,
}

impl<M> MeshEndpoint<M> {
    pub(crate) fn new<H: Send + 'static>(
        shards: usize,
        inbox: Inbox<M, H>,
        outbox: Outbox<M, H>,
        counters: Arc<ShardCounters>,
        shutdown: Arc<AtomicBool>,
    ) -> Self
    where
        M: Send + 'static,
    {
        let id = inbox.id();
        debug_assert!(id.index() >= shards && inbox.wake().is_endpoint());
        let link = Ends { inbox, outbox, counters, received: 0, unknown_target: 0, handoffs_dropped: 0 };
        MeshEndpoint { id, shards, link: Box::new(link), shutdown }
    }

    /// This endpoint's mesh id: the shards' cores address it by this.
    pub fn id(&self) -> ShardId {
        self.id
    }

    /// How many shards the node runs (ids `0..shards`; endpoints follow).
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Readable when something was sent to this endpoint, when a full inbox it waits for was drained, or
    /// when the node shuts down. Nonblocking; [`recv`](Self::recv) clears it.
    pub fn wake_fd(&self) -> RawFd {
        self.link.wake_fd()
    }

    /// Clears the eventfd and hands every message waiting in the inbox to `f`, with its sender, in order per
    /// sender; returns how many. Stops after a bounded amount (leaving the eventfd readable) so a flood
    /// cannot starve the owner's sockets.
    pub fn recv(&mut self, mut f: impl FnMut(ShardId, M)) -> usize {
        self.link.recv(&mut f)
    }

    /// The owner will block for a millisecond at most (after a [`recv`](Self::recv)): messages the shards
    /// marked as able to wait (`Core::mesh_can_wait`) do not signal the eventfd meanwhile; it finds them
    /// when it wakes. Under a stream of such messages one wake-up takes a millisecond's worth.
    pub fn sleep_briefly(&self) {
        self.link.sleep_briefly();
    }

    /// The owner may block for long: every message signals the eventfd again. Returns `false` when
    /// messages arrived meanwhile that did not signal it: the owner must not block then.
    #[must_use]
    pub fn sleep_deeply(&self) -> bool {
        self.link.sleep_deeply()
    }

    /// Buffers `m` for `to` (a shard or another endpoint), sent by the next [`flush`](Self::flush). An id
    /// that is no mesh member is dropped and counted.
    pub fn send(&mut self, to: ShardId, m: M) {
        self.link.send(to, m);
    }

    /// Hands the buffered batches to their targets' inboxes and wakes the targets; what does not fit stays in
    /// a backlog, retried by the next flush. Returns whether a backlog remains.
    pub fn flush(&mut self) -> bool {
        self.link.flush()
    }

    /// Messages this endpoint produced that their targets have not handled yet: in its backlog or in their
    /// inboxes (what `send` buffered counts from the next `flush` on). The owner stops reading its sockets while
    /// this is too high, as the read gate does for a shard.
    pub fn backlog(&self) -> usize {
        self.link.backlog()
    }

    /// The node was asked to shut down, or a shard failed: the owner should finish and drop the endpoint.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> EndpointStats {
        self.link.stats(self.id)
    }
}

impl<M> std::fmt::Debug for MeshEndpoint<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshEndpoint").field("id", &self.id).field("shards", &self.shards).finish()
    }
}

/// [`MeshEndpoint`] without the handoff type.
trait Link<M> {
    fn wake_fd(&self) -> RawFd;
    fn recv(&mut self, f: &mut dyn FnMut(ShardId, M)) -> usize;
    fn sleep_briefly(&self);
    fn sleep_deeply(&self) -> bool;
    fn send(&mut self, to: ShardId, m: M);
    fn flush(&mut self) -> bool;
    fn backlog(&self) -> usize;
    fn stats(&self, id: ShardId) -> EndpointStats;
}

struct Ends<M, H> {
    inbox: Inbox<M, H>,
    outbox: Outbox<M, H>,
    /// Shared with the outbox, which counts what it sent; the rest below is the owner's alone.
    counters: Arc<ShardCounters>,
    received: u64,
    unknown_target: u64,
    handoffs_dropped: u64,
}

impl<M, H> Link<M> for Ends<M, H> {
    fn wake_fd(&self) -> RawFd {
        self.inbox.wake().fd()
    }

    fn sleep_briefly(&self) {
        self.inbox.wake().sleep_briefly();
    }

    fn sleep_deeply(&self) -> bool {
        self.inbox.wake().sleep_deeply();
        self.inbox.is_empty()
    }

    fn recv(&mut self, f: &mut dyn FnMut(ShardId, M)) -> usize {
        let wake = self.inbox.wake();
        // Cleared first: a signal for an item sent from here on leaves the eventfd readable (at worst one
        // spurious wakeup), and an item sent before is drained below.
        sys::eventfd_drain(wake.fd());
        let mut msgs = 0;
        let mut batches = 0;
        loop {
            // Senders need not signal while the inbox is being drained.
            wake.awake();
            while batches < RECV_BATCHES {
                let Ok(item) = self.inbox.rx.try_recv() else { break };
                batches += 1;
                debug_assert!(matches!(item, Inbound::Mesh { .. }), "a socket was handed to a mesh endpoint");
                match item {
                    Inbound::Mesh { from, batch } => {
                        let n = batch.len();
                        for m in batch {
                            f(from, m);
                        }
                        self.inbox.consumed(from, n);
                        msgs += n;
                    }
                    Inbound::Adopt { from, adopt } => {
                        // Dropping it closes the socket and releases its slot under the node's cap.
                        tracing::error!(from = from.0, "a socket was handed to a mesh endpoint; closing it");
                        self.handoffs_dropped += 1;
                        drop(adopt);
                    }
                }
            }
            if batches >= RECV_BATCHES {
                // More may wait: the owner comes back for it after its sockets had a turn.
                wake.signal();
                break;
            }
            // From here a sender signals the eventfd; what it sent before is seen by this check.
            wake.prepare_sleep();
            if self.inbox.is_empty() {
                break;
            }
        }
        self.inbox.notify_drained();
        self.received += msgs as u64;
        msgs
    }

    fn send(&mut self, to: ShardId, m: M) {
        if to.index() < self.outbox.targets() {
            self.outbox.push_mesh(to, m, false);
        } else {
            self.unknown_target += 1;
            tracing::warn!(to = to.0, "mesh message to a mesh member that does not exist; dropped");
        }
    }

    fn flush(&mut self) -> bool {
        let left = self.outbox.flush();
        self.counters.mesh_backlog_max.fetch_max(self.outbox.unconsumed() as u64, Ordering::Relaxed);
        left
    }

    fn backlog(&self) -> usize {
        self.outbox.unconsumed()
    }

    fn stats(&self, id: ShardId) -> EndpointStats {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        EndpointStats {
            endpoint: id,
            mesh_sent: get(&self.counters.mesh_sent),
            mesh_received: self.received,
            mesh_full_retries: get(&self.counters.mesh_full_retries),
            mesh_backlog_max: get(&self.counters.mesh_backlog_max),
            unknown_target: self.unknown_target,
            handoffs_dropped: self.handoffs_dropped,
        }
    }
}

impl<M, H> Drop for Ends<M, H> {
    fn drop(&mut self) {
        // Before the receiver goes (with the fields, after this): from here senders stop counting what they
        // put in this inbox, and once the receiver is gone their sends fail and are dropped.
        self.inbox.wake().set_gone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::Wake;
    use crossbeam_channel::{bounded, Receiver};

    /// Shard 0 (its inbox and outbox, driven by hand) and endpoint 1, with inboxes of `cap` batches.
    fn pair(cap: usize) -> (Inbox<u32, ()>, Outbox<u32, ()>, MeshEndpoint<u32>) {
        let wakes: Arc<[Wake]> = vec![Wake::new(2).unwrap(), Wake::new_endpoint(2).unwrap()].into();
        let (txs, mut rxs): (Vec<_>, Vec<Receiver<_>>) = (0..2).map(|_| bounded(cap)).unzip();
        let ep_rx = rxs.pop().unwrap();
        let shard_in = Inbox::new(rxs.pop().unwrap(), ShardId(0), wakes.clone());
        let shard_out = Outbox::new(ShardId(0), txs.clone(), 1, wakes.clone(), Arc::default());
        let counters = Arc::new(ShardCounters::default());
        let ep_out = Outbox::new(ShardId(1), txs, 1, wakes.clone(), counters.clone());
        let ep_in = Inbox::new(ep_rx, ShardId(1), wakes);
        let ep = MeshEndpoint::new(1, ep_in, ep_out, counters, Arc::new(AtomicBool::new(false)));
        (shard_in, shard_out, ep)
    }

    /// Takes the eventfd's counter: how many signals since the last read (0: not readable).
    fn signals(fd: RawFd) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; the eventfd is nonblocking.
        let n = unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    #[test]
    fn one_signal_per_recv_and_none_lost() {
        let (_shard_in, mut shard_out, mut ep) = pair(16);
        for round in 0..3 {
            for i in 0..3 {
                shard_out.push_mesh(ShardId(1), round * 10 + i, false);
                assert!(!shard_out.flush());
            }
            assert_eq!(signals(ep.wake_fd()), 1, "three batches after a recv signal once");
            let mut got = Vec::new();
            assert_eq!(ep.recv(|from, m| got.push((from.0, m))), 3);
            assert_eq!(got, [(0, round * 10), (0, round * 10 + 1), (0, round * 10 + 2)]);
            assert_eq!(shard_out.unconsumed(), 0, "recv gives the sender's in-flight count back");
        }
        assert_eq!(ep.stats().mesh_received, 9);
    }

    /// Messages that can wait do not signal an owner that sleeps briefly (it finds them when it
    /// wakes), but do one that may sleep long; any other message signals either.
    #[test]
    fn messages_that_can_wait_signal_only_an_owner_that_may_sleep_long() {
        let (_shard_in, mut shard_out, mut ep) = pair(16);
        shard_out.push_mesh(ShardId(1), 1, true);
        assert!(!shard_out.flush());
        assert_eq!(signals(ep.wake_fd()), 1, "a new endpoint sleeps long");
        assert_eq!(ep.recv(|_, _| {}), 1);
        ep.sleep_briefly();
        for i in 2..5 {
            shard_out.push_mesh(ShardId(1), i, true);
            assert!(!shard_out.flush());
        }
        assert_eq!(signals(ep.wake_fd()), 0, "asleep briefly: not signalled");
        assert!(!ep.sleep_deeply(), "what came meanwhile keeps it from sleeping long");
        let mut got = Vec::new();
        assert_eq!(ep.recv(|_, m| got.push(m)), 3);
        assert_eq!(got, [2, 3, 4]);
        assert!(ep.sleep_deeply(), "nothing waits");
        shard_out.push_mesh(ShardId(1), 5, true);
        assert!(!shard_out.flush());
        assert_eq!(signals(ep.wake_fd()), 1, "asleep long: signalled");
        assert_eq!(ep.recv(|_, _| {}), 1);
        ep.sleep_briefly();
        shard_out.push_mesh(ShardId(1), 6, true);
        shard_out.push_mesh(ShardId(1), 7, false);
        assert!(!shard_out.flush());
        assert_eq!(signals(ep.wake_fd()), 1, "a batch with one that cannot wait signals");
    }

    #[test]
    fn recv_is_bounded_and_leaves_the_eventfd_readable() {
        let n = RECV_BATCHES + 100;
        let (_shard_in, mut shard_out, mut ep) = pair(n);
        for i in 0..n {
            shard_out.push_mesh(ShardId(1), i as u32, false);
            assert!(!shard_out.flush());
        }
        let mut next = 0;
        assert_eq!(ep.recv(|_, m| next = m + 1), RECV_BATCHES);
        assert_eq!(signals(ep.wake_fd()), 1, "more is waiting: the owner must come back");
        assert_eq!(ep.recv(|_, m| assert_eq!(std::mem::replace(&mut next, m + 1), m)), 100);
        assert_eq!(signals(ep.wake_fd()), 0);
    }

    #[test]
    fn endpoint_waiting_for_room_is_signalled_when_the_inbox_drains() {
        let (shard_in, _shard_out, mut ep) = pair(1);
        ep.send(ShardId(0), 1);
        assert!(!ep.flush());
        ep.send(ShardId(0), 2);
        assert!(ep.flush(), "the shard's inbox of one batch is full");
        assert_eq!((ep.backlog(), ep.stats().mesh_full_retries), (2, 1));
        assert_eq!(signals(ep.wake_fd()), 0);
        // The shard handles its inbox, as `drain_inbox` does.
        while let Ok(Inbound::Mesh { from, batch }) = shard_in.rx.try_recv() {
            shard_in.consumed(from, batch.len());
        }
        shard_in.notify_drained();
        assert_eq!(signals(ep.wake_fd()), 1, "the endpoint was told there is room");
        assert_eq!(ep.backlog(), 1);
        assert!(!ep.flush());
        assert_eq!(ep.stats().mesh_sent, 2);
    }

    #[test]
    fn unknown_targets_are_dropped_and_counted() {
        let (_shard_in, _shard_out, mut ep) = pair(4);
        ep.send(ShardId(2), 1);
        assert!(!ep.flush());
        assert_eq!((ep.stats().unknown_target, ep.backlog()), (1, 0));
    }

    #[test]
    fn a_dropped_endpoint_no_longer_counts_against_its_senders() {
        let (_shard_in, mut shard_out, ep) = pair(4);
        shard_out.push_mesh(ShardId(1), 1, false);
        assert!(!shard_out.flush());
        assert_eq!(
            shard_out.unconsumed(),
            crate::mesh::ENDPOINT_WEIGHT,
            "one message, weighed as for an endpoint"
        );
        drop(ep);
        assert_eq!(shard_out.unconsumed(), 0);
        shard_out.push_mesh(ShardId(1), 2, false);
        assert!(!shard_out.flush(), "sends to it are dropped, not kept");
    }
}
