//! Cross-core plumbing: one bounded inbox per mesh member, the per-target batching and backlog on the sending
//! side, and the eventfd wakeup of a sleeping member.
//!
//! Mesh members are the shards (ids `0..shards`) and the extra endpoints (ids `shards..shards+endpoints`,
//! see [`MeshEndpoint`](super::endpoint::MeshEndpoint)): threads that are not shards (the cluster gateway,
//! with its own event loop over its own sockets) but exchange the same messages with the shards. Both use the
//! same inbox, outbox, wake and in-flight accounting; an endpoint has no sockets, so socket handoffs only
//! ever go to shards.
//!
//! What it guarantees: messages from one member to another arrive in the order they were produced (mesh
//! messages and socket handoffs share one FIFO per target), and nothing is dropped while the target runs: a
//! full inbox hands the item back, it stays in a per-target backlog and is retried on the next loop
//! iteration. What it does not do: deliver to a shard that already exited or an endpoint that was dropped
//! (items for it are dropped, which for shards only happens during node shutdown), or bound what a member
//! produces by itself. An inbox is bounded in
//! batches, not messages, and the backlog not at all; so the outbox counts every message it produced that
//! its target has not consumed yet, backlog and inbox together ([`Outbox::unconsumed`]: the sender adds
//! what an inbox accepted, the receiver subtracts what it handled), and the driver's read gate (`gate.rs`)
//! stops the shard reading its sockets while that count is too high, which is what bounds it.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::node::ShardCounters;
use super::sys;
use shardmq_shard::ShardId;

/// A socket moving between shards, with the core's state for it and the bytes that must come first.
pub(crate) struct Adopt<H> {
    /// `None` once the receiving runtime took it; see `Drop`.
    fd: Option<OwnedFd>,
    state: Option<H>,
    /// Output the source runtime had taken from its core but not written yet; written first by the target.
    unsent: Vec<u8>,
    /// Bytes the source runtime received after the read that triggered the handoff (io_uring's multishot
    /// recv may complete more reads before its cancellation lands). The target feeds them to its core right
    /// after `handle_adopt`, before reading the socket again.
    read_ahead: Vec<u8>,
    /// Node-wide open-socket count, released if this socket is dropped undelivered.
    open: Arc<AtomicUsize>,
}

impl<H> Adopt<H> {
    pub(crate) fn new(
        fd: OwnedFd,
        state: H,
        unsent: Vec<u8>,
        read_ahead: Vec<u8>,
        open: Arc<AtomicUsize>,
    ) -> Self {
        Adopt { fd: Some(fd), state: Some(state), unsent, read_ahead, open }
    }

    /// Takes everything; from here the caller owns the socket's slot in the node-wide count.
    pub(crate) fn into_parts(mut self) -> (OwnedFd, H, Vec<u8>, Vec<u8>) {
        let fd = self.fd.take().expect("adopted socket taken twice");
        let state = self.state.take().expect("adopted state taken twice");
        (fd, state, std::mem::take(&mut self.unsent), std::mem::take(&mut self.read_ahead))
    }
}

impl<H> Drop for Adopt<H> {
    fn drop(&mut self) {
        // A handoff dropped in flight (target gone at shutdown) closes the socket: keep the cap honest.
        if self.fd.take().is_some() {
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// What travels through a shard's inbox.
pub(crate) enum Inbound<M, H> {
    Mesh { from: ShardId, batch: Vec<M> },
    Adopt { from: ShardId, adopt: Adopt<H> },
}

/// The wakeup side of a shard, shared with every other shard.
/// Wakes one shard's loop from any thread (see `Core::set_waker`).
#[derive(Clone)]
pub struct Waker {
    wakes: Arc<[Wake]>,
    shard: usize,
}

impl Waker {
    pub(crate) fn new(wakes: Arc<[Wake]>, shard: usize) -> Waker {
        debug_assert!(shard < wakes.len());
        Waker { wakes, shard }
    }

    /// Makes the shard run one more loop iteration soon. Always signals the eventfd: a lighter
    /// `Wake::wake` could be lost between the shard's last `handle_commit` and its sleep, since what this
    /// announces does not sit in the inbox that the shard checks before sleeping.
    pub fn wake(&self) {
        self.wakes[self.shard].force_wake();
    }
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker").field("shard", &self.shard).finish()
    }
}

pub(crate) struct Wake {
    fd: OwnedFd,
    /// Set by the owner right before it blocks; a sender that clears it owes the owner an eventfd signal.
    /// An endpoint keeps it set whenever it is not inside `recv` (its owner may block any time after).
    sleeping: AtomicBool,
    /// With `sleeping`: the owner may block for long, so that messages that can wait
    /// ([`Wake::wake_lazy`]) must signal it too. Endpoints only: clear while the owner works or blocks
    /// for a millisecond at most ([`Wake::sleep_briefly`]), when it finds them anyway, so that one
    /// wake-up takes many of them; set before a long sleep ([`Wake::sleep_deeply`]).
    deep: AtomicBool,
    /// Bit `i` set: member `i` found this inbox full and wants a wakeup once it is drained (ids 0..64;
    /// others rely on the backlog retry timer).
    drain_waiters: AtomicU64,
    /// By sender id: mesh messages its outbox handed to this inbox that this member has not handled yet.
    in_flight: Box<[AtomicUsize]>,
    /// This wake belongs to an endpoint, not a shard: drain notifications always signal its eventfd (see
    /// [`Inbox::notify_drained`]).
    endpoint: bool,
    /// The endpoint was dropped: nobody will ever consume its inbox, so what senders put there no longer
    /// counts against their read gates ([`Outbox::unconsumed`]). Never set for shards.
    gone: AtomicBool,
}

impl Wake {
    /// `members`: how many mesh members (shards and endpoints) may send to this one.
    pub(crate) fn new(members: usize) -> std::io::Result<Self> {
        Ok(Wake {
            fd: sys::eventfd()?,
            sleeping: AtomicBool::new(false),
            deep: AtomicBool::new(false),
            drain_waiters: AtomicU64::new(0),
            in_flight: (0..members).map(|_| AtomicUsize::new(0)).collect(),
            endpoint: false,
            gone: AtomicBool::new(false),
        })
    }

    /// The wake of an endpoint: asleep from the start, since its owner waits on the eventfd before it ever
    /// calls `recv`, and the first message must signal it.
    pub(crate) fn new_endpoint(members: usize) -> std::io::Result<Self> {
        let w = Wake { endpoint: true, ..Wake::new(members)? };
        w.prepare_sleep();
        w.sleep_deeply();
        Ok(w)
    }

    pub(crate) fn is_endpoint(&self) -> bool {
        self.endpoint
    }

    /// The endpoint owning this wake was dropped (see `gone`).
    pub(crate) fn set_gone(&self) {
        debug_assert!(self.endpoint, "only endpoints go away while the node runs");
        self.gone.store(true, Ordering::Release);
    }

    /// Signals the eventfd without touching `sleeping`: makes the owner call `recv` again (an endpoint that
    /// stopped draining early, or one waiting for room in another inbox).
    pub(crate) fn signal(&self) {
        sys::eventfd_signal(self.fd());
    }

    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// Wakes the owner if it is (about to be) asleep. Called after the item was made visible in the inbox.
    pub(crate) fn wake(&self) {
        // Pairs with the fence in `prepare_sleep`: either the owner sees our item, or we see `sleeping`.
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            sys::eventfd_signal(self.fd());
        }
    }

    /// [`Wake::wake`] for messages that can wait: an owner that works, or blocks briefly only
    /// ([`Wake::sleep_briefly`]), is not signalled; it finds them when its sleep ends.
    pub(crate) fn wake_lazy(&self) {
        // Pairs with the fence in `sleep_deeply`: either the owner sees our item, or we see `deep`.
        fence(Ordering::SeqCst);
        if self.deep.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    /// The owner (an endpoint, after `prepare_sleep`) will block for at most a millisecond: messages
    /// that can wait need not signal it.
    pub(crate) fn sleep_briefly(&self) {
        self.deep.store(false, Ordering::SeqCst);
    }

    /// The owner (an endpoint, after `prepare_sleep`) may block for long: messages that can wait must
    /// signal it. It must check its inbox after this and not block if the inbox is non-empty (what was
    /// sent before the flag was visible did not signal).
    pub(crate) fn sleep_deeply(&self) {
        self.deep.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Wakes the owner whatever it is doing (shutdown).
    pub(crate) fn force_wake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        sys::eventfd_signal(self.fd());
    }

    /// Announces that the owner will block. The owner must check its inbox after this and not block if the
    /// inbox is non-empty (an item sent before the flag was visible does not signal the eventfd).
    pub(crate) fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    pub(crate) fn awake(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }
}

/// The receiving side of a shard: its inbox and who waits for it to drain.
pub(crate) struct Inbox<M, H> {
    pub(crate) rx: Receiver<Inbound<M, H>>,
    /// The owner's id: its wake is `wakes[me]`.
    me: usize,
    wakes: Arc<[Wake]>,
}

impl<M, H> Inbox<M, H> {
    pub(crate) fn new(rx: Receiver<Inbound<M, H>>, me: ShardId, wakes: Arc<[Wake]>) -> Self {
        Inbox { rx, me: me.index(), wakes }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    pub(crate) fn wake(&self) -> &Wake {
        &self.wakes[self.me]
    }

    pub(crate) fn id(&self) -> ShardId {
        ShardId(self.me as u16)
    }

    /// `msgs` messages from `from`'s batch were handled: they no longer count against its gate.
    pub(crate) fn consumed(&self, from: ShardId, msgs: usize) {
        if let Some(n) = self.wakes[self.me].in_flight.get(from.index()) {
            n.fetch_sub(msgs, Ordering::Relaxed);
        }
    }

    /// Tells the members that found this inbox full that there is room again.
    pub(crate) fn notify_drained(&self) {
        let mut waiters = self.wakes[self.me].drain_waiters.swap(0, Ordering::AcqRel);
        while waiters != 0 {
            let i = waiters.trailing_zeros() as usize;
            waiters &= waiters - 1;
            match self.wakes.get(i) {
                // An endpoint may be inside `recv` (not "sleeping") and block right after in its owner's
                // loop: a plain `wake` would be skipped then, so it is always signalled. Rare (only after a
                // full inbox), so the extra syscall does not matter.
                Some(w) if w.endpoint => w.signal(),
                Some(w) => w.wake(),
                None => {}
            }
        }
    }
}

/// An entry of a per-target backlog.
enum Queued<M, H> {
    Item(Inbound<M, H>),
    /// The place of a handoff whose socket still has operations in flight (io_uring): later items for the
    /// same target wait behind it, so the target never sees a message about a connection before the
    /// connection itself.
    Reserved(u64),
}

/// The sending side of a mesh member: builds one batch per target per loop iteration, keeps what did not fit.
pub(crate) struct Outbox<M, H> {
    me: ShardId,
    /// One per mesh member, shards first: ids `0..shards` are shards, the rest endpoints.
    senders: Vec<Sender<Inbound<M, H>>>,
    /// Targets that can take a socket. Invariant: `shards <= senders.len()`.
    shards: usize,
    wakes: Arc<[Wake]>,
    counters: Arc<ShardCounters>,
    /// Mesh messages produced this iteration, per target; sealed into `backlog` by `flush`.
    open: Vec<Vec<M>>,
    /// Per target: something in `open` or `backlog` cannot wait (the target is woken at once when it
    /// is sent); cleared when the backlog empties.
    urgent: Vec<bool>,
    /// Items not yet accepted by the target's inbox, oldest first. Invariant: `pending` counts them.
    backlog: Vec<VecDeque<Queued<M, H>>>,
    pending: usize,
    /// Mesh messages (not batches) in `backlog`, all targets together.
    backlog_msgs: usize,
    /// Those of them for endpoints. Invariant: `<= backlog_msgs`.
    endpoint_backlog_msgs: usize,
    next_ticket: u64,
}

/// What a message waiting for an endpoint weighs in [`Outbox::unconsumed`], against 1 for a shard. The
/// cluster gateway's messages are on their way to other nodes, whose subscribers' queues must take
/// whatever is already under way when they congest and the publisher is paused: the read gate closes at
/// 1/64 of its mark for them (1,024 messages by default). Measured on a 2-node cross-node fan-in (50
/// QoS 1 publishers flat out on one node, the subscriber on the other): with the mark itself (64k) a third
/// of the messages were dropped in the subscriber's full queue, with 1/16 0.5-1%, with 1/64 none, at a
/// higher rate (238k/s against 188k/s).
pub(crate) const ENDPOINT_WEIGHT: usize = 64;

impl<M, H> Outbox<M, H> {
    /// `senders`: every mesh member's inbox, the `shards` shards first.
    pub(crate) fn new(
        me: ShardId,
        senders: Vec<Sender<Inbound<M, H>>>,
        shards: usize,
        wakes: Arc<[Wake]>,
        counters: Arc<ShardCounters>,
    ) -> Self {
        let n = senders.len();
        debug_assert!(shards <= n && n <= wakes.len());
        Outbox {
            me,
            senders,
            shards,
            wakes,
            counters,
            open: (0..n).map(|_| Vec::new()).collect(),
            urgent: vec![false; n],
            backlog: (0..n).map(|_| VecDeque::new()).collect(),
            pending: 0,
            backlog_msgs: 0,
            endpoint_backlog_msgs: 0,
            next_ticket: 0,
        }
    }

    /// Shards: the targets a socket may be handed to.
    pub(crate) fn shards(&self) -> usize {
        self.shards
    }

    /// Shards and endpoints: the targets of mesh messages.
    pub(crate) fn targets(&self) -> usize {
        self.senders.len()
    }

    /// The caller checked `to < targets()`. `can_wait`: an endpoint need not wake for it at once (see
    /// [`Wake::wake_lazy`]).
    pub(crate) fn push_mesh(&mut self, to: ShardId, msg: M, can_wait: bool) {
        self.open[to.index()].push(msg);
        self.urgent[to.index()] |= !can_wait;
    }

    /// A handoff to an endpoint (which has no sockets) was asked for: a bug of the caller's core, counted;
    /// the caller closes the socket instead.
    pub(crate) fn misaddressed_handoff(&self, to: ShardId) {
        debug_assert!(to.index() < self.shards, "handoff of a socket to mesh endpoint {}", to.0);
        self.counters.misaddressed_handoffs.fetch_add(1, Ordering::Relaxed);
        tracing::error!(to = to.0, "handoff to a mesh endpoint, which cannot take sockets; closing");
    }

    /// Queues a socket for `to`, after every mesh message already produced for it (order is per target).
    pub(crate) fn push_adopt(&mut self, to: ShardId, adopt: Adopt<H>) {
        let t = to.index();
        debug_assert!(t < self.shards, "sockets only go to shards");
        self.seal(t);
        self.backlog[t].push_back(Queued::Item(Inbound::Adopt { from: self.me, adopt }));
        self.pending += 1;
    }

    /// Holds the place of a socket that will be ready later; see [`Outbox::fill`].
    pub(crate) fn reserve(&mut self, to: ShardId) -> u64 {
        let t = to.index();
        debug_assert!(t < self.shards, "sockets only go to shards");
        self.seal(t);
        self.next_ticket += 1;
        self.backlog[t].push_back(Queued::Reserved(self.next_ticket));
        self.pending += 1;
        self.next_ticket
    }

    /// Puts the socket in its reserved place, or (`None`: the handoff failed) frees the place. A ticket no
    /// longer queued (discarded at shutdown) drops the socket.
    pub(crate) fn fill(&mut self, to: ShardId, ticket: u64, adopt: Option<Adopt<H>>) {
        let me = self.me;
        let queue = &mut self.backlog[to.index()];
        let Some(pos) = queue.iter().position(|q| matches!(q, Queued::Reserved(t) if *t == ticket)) else {
            return;
        };
        match adopt {
            Some(adopt) => queue[pos] = Queued::Item(Inbound::Adopt { from: me, adopt }),
            None => {
                queue.remove(pos);
                self.pending -= 1;
            }
        }
    }

    fn seal(&mut self, t: usize) {
        if self.open[t].is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.open[t]);
        self.backlog_msgs += batch.len();
        if t >= self.shards {
            self.endpoint_backlog_msgs += batch.len();
        }
        // Appending to a batch still waiting in the backlog keeps order and sends fewer, larger batches.
        if let Some(Queued::Item(Inbound::Mesh { batch: last, .. })) = self.backlog[t].back_mut() {
            last.extend(batch);
            return;
        }
        self.backlog[t].push_back(Queued::Item(Inbound::Mesh { from: self.me, batch }));
        self.pending += 1;
    }

    /// Sends what it can; returns whether something is left for a later retry.
    pub(crate) fn flush(&mut self) -> bool {
        for t in 0..self.senders.len() {
            self.seal(t);
            let mut sent = false;
            while let Some(Queued::Item(_)) = self.backlog[t].front() {
                let Some(Queued::Item(item)) = self.backlog[t].pop_front() else { unreachable!() };
                let msgs = match &item {
                    Inbound::Mesh { batch, .. } => batch.len() as u64,
                    Inbound::Adopt { .. } => 0,
                };
                match self.senders[t].try_send(item) {
                    Ok(()) => {
                        self.pending -= 1;
                        self.backlog_msgs -= msgs as usize;
                        if t >= self.shards {
                            self.endpoint_backlog_msgs -= msgs as usize;
                        }
                        if let Some(n) = self.wakes[t].in_flight.get(self.me.index()) {
                            // Relaxed: a gauge for the gate, not a synchronisation point; the target
                            // subtracts only after the channel handed it the batch, so it never underflows
                            // for long enough to matter (a wrapping dip is read as "large" for an instant).
                            n.fetch_add(msgs as usize, Ordering::Relaxed);
                        }
                        sent = true;
                        self.counters.mesh_sent.fetch_add(msgs, Ordering::Relaxed);
                    }
                    Err(TrySendError::Full(item)) => {
                        self.backlog[t].push_front(Queued::Item(item));
                        self.counters.mesh_full_retries.fetch_add(1, Ordering::Relaxed);
                        if self.me.index() < 64 {
                            self.wakes[t].drain_waiters.fetch_or(1 << self.me.index(), Ordering::AcqRel);
                        }
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        // Only at shutdown: the target exited. Dropping an Adopt closes its socket.
                        self.pending -= 1;
                        self.backlog_msgs -= msgs as usize;
                        if t >= self.shards {
                            self.endpoint_backlog_msgs -= msgs as usize;
                        }
                        tracing::debug!(target_shard = t, "mesh target gone, dropping item");
                    }
                }
            }
            if sent {
                // Shards always wake (they are not woken by time; sockets may come with the messages).
                if self.urgent[t] || t < self.shards {
                    self.wakes[t].wake();
                } else {
                    self.wakes[t].wake_lazy();
                }
            }
            if self.backlog[t].is_empty() {
                self.urgent[t] = false;
            }
        }
        debug_assert_eq!(self.pending, self.backlog.iter().map(VecDeque::len).sum::<usize>());
        self.pending > 0
    }

    pub(crate) fn has_backlog(&self) -> bool {
        self.pending > 0
    }

    /// Mesh messages this member produced that their targets have not handled yet: those no inbox accepted
    /// (after a `flush`: the backlog) plus those waiting in the target inboxes (except a dropped endpoint's,
    /// which nobody will consume).
    /// Messages for endpoints weigh [`ENDPOINT_WEIGHT`] each.
    pub(crate) fn unconsumed(&self) -> usize {
        let me = self.me.index();
        let shards = self.shards;
        let in_inboxes: usize = (0..self.senders.len())
            .filter_map(|t| self.wakes.get(t).map(|w| (t, w)))
            .filter(|(_, w)| !w.gone.load(Ordering::Acquire))
            .filter_map(|(t, w)| w.in_flight.get(me).map(|n| (t, n)))
            .map(|(t, n)| {
                let n = n.load(Ordering::Relaxed);
                if t >= shards {
                    n.saturating_mul(ENDPOINT_WEIGHT)
                } else {
                    n
                }
            })
            .fold(0, usize::saturating_add);
        let to_shards = self.backlog_msgs - self.endpoint_backlog_msgs;
        let to_endpoints = self.endpoint_backlog_msgs.saturating_mul(ENDPOINT_WEIGHT);
        to_shards.saturating_add(to_endpoints).saturating_add(in_inboxes)
    }

    /// Drops everything not yet sent (node shutdown).
    pub(crate) fn discard(&mut self) {
        self.open.iter_mut().for_each(Vec::clear);
        self.backlog.iter_mut().for_each(VecDeque::clear);
        self.pending = 0;
        self.backlog_msgs = 0;
        self.endpoint_backlog_msgs = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;

    type Rx = Receiver<Inbound<u32, u8>>;

    fn outbox(cap: usize) -> (Outbox<u32, u8>, Rx, Arc<AtomicUsize>) {
        let (tx, rx) = bounded(cap);
        let wakes: Arc<[Wake]> = vec![Wake::new(1).unwrap()].into();
        let out = Outbox::new(ShardId(0), vec![tx], 1, wakes, Arc::new(ShardCounters::default()));
        (out, rx, Arc::new(AtomicUsize::new(1)))
    }

    fn kinds(rx: &Rx) -> Vec<String> {
        rx.try_iter()
            .map(|i| match i {
                Inbound::Mesh { batch, .. } => format!("mesh{batch:?}"),
                Inbound::Adopt { adopt, .. } => format!("adopt{}", adopt.into_parts().1),
            })
            .collect()
    }

    #[test]
    fn full_inbox_keeps_order_and_loses_nothing() {
        let (mut out, rx, _) = outbox(1);
        out.push_mesh(ShardId(0), 1, false);
        assert!(!out.flush());
        out.push_mesh(ShardId(0), 2, false);
        assert!(out.flush(), "inbox of one is full: the batch stays in the backlog");
        out.push_mesh(ShardId(0), 3, false);
        assert!(out.flush());
        assert_eq!(out.counters.mesh_full_retries.load(Ordering::Relaxed), 2);
        assert_eq!(out.unconsumed(), 3, "one in the inbox, two in the backlog");
        assert_eq!(kinds(&rx), ["mesh[1]"]);
        assert!(!out.flush(), "backlogged batches were merged into one");
        assert_eq!(out.unconsumed(), 3, "all in the inbox, none handled");
        out.wakes[0].in_flight[0].fetch_sub(3, Ordering::Relaxed);
        assert_eq!(out.unconsumed(), 0);
        assert_eq!(kinds(&rx), ["mesh[2, 3]"]);
        assert_eq!(out.counters.mesh_sent.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn reserved_handoff_holds_later_messages_back() {
        let (mut out, rx, open) = outbox(8);
        out.push_mesh(ShardId(0), 1, false);
        let ticket = out.reserve(ShardId(0));
        out.push_mesh(ShardId(0), 2, false);
        assert!(out.flush());
        assert_eq!(kinds(&rx), ["mesh[1]"]);
        let fd = sys::eventfd().unwrap();
        out.fill(ShardId(0), ticket, Some(Adopt::new(fd, 7, Vec::new(), Vec::new(), open.clone())));
        assert!(!out.flush());
        assert_eq!(kinds(&rx), ["adopt7", "mesh[2]"]);

        let ticket = out.reserve(ShardId(0));
        out.push_mesh(ShardId(0), 3, false);
        assert!(out.flush());
        out.fill(ShardId(0), ticket, None);
        assert!(!out.flush());
        assert_eq!(kinds(&rx), ["mesh[3]"]);
    }

    #[test]
    fn dropped_adopt_releases_its_socket_slot() {
        let open = Arc::new(AtomicUsize::new(1));
        drop(Adopt::new(sys::eventfd().unwrap(), (), Vec::new(), Vec::new(), open.clone()));
        assert_eq!(open.load(Ordering::Relaxed), 0);
    }
}
