//! The backend-independent half of a shard's event loop: the order in which the core is called, how its
//! commands (`poll_io`, `poll_mesh`) are drained, how the inbox is consumed, timers, and the shutdown sequence.
//!
//! A backend (epoll or io_uring) implements [`Io`] (what to do with one connection) and [`EventLoop`] (wait
//! for and dispatch events); [`run`] is the loop both share. The one rule every backend relies on: after each
//! `handle_*` call the core's I/O commands are drained before anything else is read from a socket, so a
//! handoff requested after `handle_read` sees no later bytes consumed by this shard.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::gate::Gate;
use super::mesh::{Inbound, Inbox, Outbox};
use super::node::ShardCounters;
use super::{Core, IoCmd};
use shardmq_shard::{ConnId, ShardId};

/// Everything a shard's loop needs besides its backend and core.
pub(crate) struct Ctx {
    pub(crate) id: ShardId,
    pub(crate) counters: Arc<ShardCounters>,
    /// Node-wide count of open client sockets. Invariant: `<= max_sockets` after every `try_open`.
    pub(crate) open: Arc<AtomicUsize>,
    pub(crate) max_sockets: usize,
    pub(crate) shutdown: Arc<AtomicBool>,
    /// How long a core-requested close may spend flushing.
    pub(crate) close_linger: Duration,
    /// How long the shutdown sequence may spend flushing.
    pub(crate) shutdown_grace: Duration,
    /// After an iteration that handled an event, the shard polls (non-blocking, yielding the CPU between
    /// polls) for this long before it sleeps. Waking a sleeping thread costs an interrupt to its CPU and a
    /// context switch, and on a virtual machine a halted vCPU's exit and re-entry on top; a shard that is
    /// still polling when the next packet or mesh batch arrives skips all of it, and a sender needs no
    /// eventfd signal ([`super::mesh::Wake`]). The price is CPU time: under steady traffic a polling
    /// shard looks busy. Zero (the default) sleeps at once.
    pub(crate) idle_poll: Duration,
    /// Mesh messages produced and not yet handled by their targets at which the shard stops reading its
    /// sockets (see `gate.rs`); 0: never.
    pub(crate) mesh_backlog_limit: usize,
}

impl Ctx {
    /// Claims a slot under the node-wide socket cap; `false` (and counted) when the node is full.
    pub(crate) fn try_open(&self) -> bool {
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_sockets {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.counters.refused_over_cap.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        debug_assert!(prev < self.max_sockets);
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        self.counters.open_sockets.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A socket of this shard was closed (for any reason).
    pub(crate) fn closed_one(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.counters.closed.fetch_add(1, Ordering::Relaxed);
        self.counters.open_sockets.fetch_sub(1, Ordering::Relaxed);
    }

    /// A socket left this shard for another one (the node-wide count does not change).
    pub(crate) fn handed_off_one(&self) {
        self.counters.handoffs.fetch_add(1, Ordering::Relaxed);
        self.counters.open_sockets.fetch_sub(1, Ordering::Relaxed);
    }

    /// A socket arrived from another shard (already counted node-wide).
    pub(crate) fn adopted_one(&self) {
        self.counters.open_sockets.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a backend does with one connection when the core asks.
pub(crate) trait Io<C: Core> {
    /// Writes `buf` to `conn` (or queues it behind output already pending). Unknown or closing: dropped.
    fn transmit(&mut self, core: &mut C, conn: ConnId, buf: Vec<u8>, now: Instant);
    /// Flushes pending output plus `buf` (bounded), then closes. The core is not told when it is closed.
    fn close(&mut self, core: &mut C, conn: ConnId, buf: Vec<u8>, now: Instant);
    /// Stops watching `conn` and ships it to shard `to` through `out` (possibly later, once in-flight
    /// operations on it have finished).
    fn handoff(
        &mut self,
        core: &mut C,
        conn: ConnId,
        to: ShardId,
        state: C::Handoff,
        out: &mut Outbox<C::Mesh, C::Handoff>,
        now: Instant,
    );
    /// Stops delivering reads of `conn` (see [`IoCmd::PauseRead`]). Unknown, closing or paused: ignored.
    fn pause_read(&mut self, conn: ConnId);
    /// Delivers reads of `conn` again, held bytes first, from the event loop ([`EventLoop::has_ready`]
    /// reports the pending delivery). Unknown, closing or not paused: ignored.
    fn resume_read(&mut self, conn: ConnId);
    /// Registers a socket moved here; `unsent` is queued before any output of the core. `None`: it could
    /// not be registered and was closed.
    fn adopt(&mut self, fd: OwnedFd, unsent: Vec<u8>, now: Instant) -> Option<ConnId>;
}

/// A backend's event source.
pub(crate) trait EventLoop<C: Core>: Io<C> {
    /// Waits up to `timeout` (`None`: forever) for events and dispatches them to the core; returns how many
    /// it dispatched (completions or readiness events, wakeups included).
    fn poll(
        &mut self,
        core: &mut C,
        out: &mut Outbox<C::Mesh, C::Handoff>,
        timeout: Option<Duration>,
        stopping: bool,
    ) -> io::Result<usize>;
    /// Backend deadlines (lingering closes, paused accepts) that have passed.
    fn on_tick(&mut self, core: &mut C, now: Instant);
    /// The earliest backend deadline.
    fn next_deadline(&self) -> Option<Instant>;
    /// Whether events are ready without waiting (reads cut short for fairness).
    fn has_ready(&self) -> bool;
    /// Shutdown, step 1: no new connections.
    fn stop_accepting(&mut self);
    /// Shutdown, step 2: every connection still open becomes a flush-then-close.
    fn close_all(&mut self, core: &mut C, now: Instant);
    /// Connections (or sockets still finishing a close or a handoff) this backend holds.
    fn open_count(&self) -> usize;
    /// Shutdown, last step: close whatever is left, in-flight operations included.
    fn force_close_all(&mut self);
}

/// Executes the core's I/O commands. While `stopping`, a handoff closes the connection instead (the
/// target is shutting down too).
pub(crate) fn drain_io<C: Core, I: Io<C>>(
    core: &mut C,
    io: &mut I,
    out: &mut Outbox<C::Mesh, C::Handoff>,
    now: Instant,
    stopping: bool,
) {
    while let Some(cmd) = core.poll_io() {
        match cmd {
            IoCmd::Transmit(conn) => {
                let buf = core.take_transmit(conn);
                if !buf.is_empty() {
                    io.transmit(core, conn, buf, now);
                }
            }
            IoCmd::Close(conn) => {
                let buf = core.take_transmit(conn);
                io.close(core, conn, buf, now);
            }
            IoCmd::Handoff { conn, to, state } => {
                if stopping || to.index() >= out.shards() {
                    if !stopping {
                        if to.index() < out.targets() {
                            out.misaddressed_handoff(to);
                        } else {
                            tracing::warn!(
                                ?conn,
                                to = to.0,
                                "handoff to a shard that does not exist; closing"
                            );
                        }
                    }
                    io.close(core, conn, Vec::new(), now);
                } else {
                    io.handoff(core, conn, to, state, out, now);
                }
            }
            IoCmd::PauseRead(conn) => io.pause_read(conn),
            IoCmd::ResumeRead(conn) => io.resume_read(conn),
        }
    }
}

/// Moves the core's cross-core messages into the outbox (sent by `Outbox::flush`).
fn drain_mesh<C: Core>(core: &mut C, out: &mut Outbox<C::Mesh, C::Handoff>) {
    while let Some((to, msg)) = core.poll_mesh() {
        // Shards and endpoints alike.
        if to.index() < out.targets() {
            let can_wait = C::mesh_can_wait(&msg);
            out.push_mesh(to, msg, can_wait);
        } else {
            tracing::warn!(to = to.0, "mesh message to a mesh member that does not exist; dropped");
        }
    }
}

/// Hands what other shards sent to the core. Bounded per call so a flood cannot starve sockets.
fn drain_inbox<C: Core, I: Io<C>>(
    core: &mut C,
    io: &mut I,
    inbox: &Inbox<C::Mesh, C::Handoff>,
    out: &mut Outbox<C::Mesh, C::Handoff>,
    now: Instant,
) -> usize {
    let mut n = 0;
    for _ in 0..1024 {
        let Ok(item) = inbox.rx.try_recv() else { break };
        n += 1;
        match item {
            Inbound::Mesh { from, batch } => {
                let msgs = batch.len();
                for msg in batch {
                    core.handle_mesh(from, msg, now);
                }
                inbox.consumed(from, msgs);
                drain_io(core, io, out, now, false);
            }
            Inbound::Adopt { from, adopt } => {
                tracing::trace!(from = from.0, "adopting a socket");
                let (fd, state, unsent, read_ahead) = adopt.into_parts();
                if let Some(conn) = io.adopt(fd, unsent, now) {
                    core.handle_adopt(conn, state, now);
                    // Before draining commands: bytes the source read past the handoff come next in the stream.
                    if !read_ahead.is_empty() {
                        core.handle_read(conn, &read_ahead, now);
                    }
                    drain_io(core, io, out, now, false);
                }
            }
        }
    }
    inbox.notify_drained();
    n
}

/// How long to wait for the backlog of a full inbox to clear (or a closed read gate to open) when nobody
/// wakes us.
const BACKLOG_RETRY: Duration = Duration::from_millis(1);

/// After a flush: lets the read gate see the backlog, feeds it the reads it held if it opened, and
/// publishes the figures.
fn gate_after_flush<C: Core, L: EventLoop<Gate<C>>>(
    ctx: &Ctx,
    core: &mut Gate<C>,
    lp: &mut L,
    out: &mut Outbox<C::Mesh, C::Handoff>,
    now: Instant,
) {
    core.after_flush(out.unconsumed());
    ctx.counters.mesh_backlog_max.fetch_max(out.unconsumed() as u64, Ordering::Relaxed);
    if core.release(now) > 0 {
        drain_io(core, lp, out, now, false);
        drain_mesh(core, out);
        out.flush();
        core.after_flush(out.unconsumed());
        ctx.counters.mesh_backlog_max.fetch_max(out.unconsumed() as u64, Ordering::Relaxed);
    }
    ctx.counters.read_gate_closings.store(core.closings, Ordering::Relaxed);
    ctx.counters.read_gate_held.store(core.held_reads, Ordering::Relaxed);
    ctx.counters.read_gate_closed.store(core.is_closed(), Ordering::Relaxed);
}

/// A shard's loop: runs until shutdown has flushed (or given up on) every connection.
pub(crate) fn run<C: Core, L: EventLoop<Gate<C>>>(
    ctx: &Ctx,
    core: &mut Gate<C>,
    lp: &mut L,
    inbox: &Inbox<C::Mesh, C::Handoff>,
    out: &mut Outbox<C::Mesh, C::Handoff>,
) -> io::Result<()> {
    let mut stop_deadline: Option<Instant> = None;
    // When the shard last handled something; it polls rather than sleeps until `ctx.idle_poll` after it
    // (never, with the default zero). Events of the previous `poll` are stamped with the next iteration's
    // `now`, which is taken right after it returns.
    let mut last_event = Instant::now();
    let mut polled_events = 0;
    loop {
        let now = Instant::now();
        if stop_deadline.is_none() && ctx.shutdown.load(Ordering::Acquire) {
            stop_deadline = Some(now + ctx.shutdown_grace);
            lp.stop_accepting();
            core.handle_shutdown(now);
            drain_io(core, lp, out, now, true);
            lp.close_all(core, now);
            out.discard();
        }
        let stopping = stop_deadline.is_some();
        if let Some(deadline) = stop_deadline {
            // Items still arriving are dropped: closes adopted sockets, releases their cap slots.
            while inbox.rx.try_recv().is_ok() {}
            if lp.open_count() == 0 || now >= deadline {
                lp.force_close_all();
                return Ok(());
            }
        } else if drain_inbox(core, lp, inbox, out, now) > 0 || polled_events > 0 {
            last_event = now;
        }
        // Commands queued by callbacks that are not followed by a drain of their own (backpressure,
        // closed) are executed before the shard sleeps.
        drain_io(core, lp, out, now, stopping);

        lp.on_tick(core, now);
        if core.poll_timeout().is_some_and(|t| t <= now) {
            core.handle_timeout(now);
            drain_io(core, lp, out, now, stopping);
        }
        if !stopping {
            core.handle_commit(now);
            drain_io(core, lp, out, now, stopping);
            drain_mesh(core, out);
            out.flush();
            gate_after_flush(ctx, core, lp, out, now);
        }

        let deadline = [core.poll_timeout(), lp.next_deadline(), stop_deadline].into_iter().flatten().min();
        let mut timeout = deadline.map(|d| d.saturating_duration_since(now));
        // A closed gate opens when targets handle what they were sent; they signal nobody when their inbox
        // was not full, so the shard looks again after the same short wait as for a backlog.
        if out.has_backlog() || (!stopping && core.is_closed()) {
            timeout = Some(timeout.map_or(BACKLOG_RETRY, |t| t.min(BACKLOG_RETRY)));
        }
        if lp.has_ready() || (!stopping && (!inbox.is_empty() || core.has_releasable())) {
            timeout = Some(Duration::ZERO);
        }
        if timeout != Some(Duration::ZERO) && !stopping && now.duration_since(last_event) < ctx.idle_poll {
            // Lets the load generator or another process on this CPU run; back at once when none wants to.
            std::thread::yield_now();
            timeout = Some(Duration::ZERO);
        }
        if timeout != Some(Duration::ZERO) {
            inbox.wake().prepare_sleep();
            if !inbox.is_empty() || ctx.shutdown.load(Ordering::Acquire) != stopping {
                timeout = Some(Duration::ZERO);
            }
        }
        let res = lp.poll(core, out, timeout, stopping);
        inbox.wake().awake();
        polled_events = res?;
    }
}
