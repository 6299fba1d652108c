//! The read gate: pauses every socket of a shard while its cross-shard backlog is too long.
//!
//! Why: a target shard that stops draining its inbox (stuck on the disk) makes its peers keep what they
//! produce for it in their [`Outbox`](super::mesh::Outbox) backlog. Nothing in the mesh may be dropped
//! (acks, interest updates, `Stored` answers and handoffs are control traffic; publishes carry QoS
//! promises), so the only way to bound that backlog is to stop producing: what produces mesh traffic at an
//! unbounded rate is client input, so the shard stops reading its sockets and TCP flow control pauses its
//! publishers. Everything else keeps running: writes to subscribers, timers, the shard's own inbox (its
//! replies to other shards are bounded by what those shards send, which their own gates bound), so two
//! shards backlogged on each other still make progress.
//!
//! How: [`Gate`] wraps the core between the runtime and the backend. The driver tells it after each flush
//! how many messages wait, in the backlog or in target inboxes ([`Outbox::unconsumed`](super::mesh::Outbox),
//! "the backlog" below: an inbox is bounded in batches, and a batch is as long as one iteration made it),
//! ([`Gate::after_flush`]); under the high-water mark the gate is open with a budget of `high - backlog`
//! new messages, counted as the core produces them in
//! `handle_read`, so one loop iteration's reads cannot overshoot the mark by more than one read. Once the
//! budget is spent (or the backlog is over the mark) the gate is closed: a read that arrives is held (the
//! bytes the backend already took from the kernel; at most one read per connection) and the connection is
//! paused with the backend's ordinary [`IoCmd::PauseRead`], so the kernel keeps the rest. The gate opens
//! again when the backlog falls to the low-water mark (half the high one, so it does not flap every
//! iteration), and [`Gate::release`] then feeds the held reads to the core, oldest first and within the
//! budget, and resumes their connections.
//!
//! The core's own pauses (publisher flow control, `IoCmd::PauseRead`) are tracked so that the gate never
//! resumes a connection the core wants paused, and a core `ResumeRead` of a connection the gate holds is
//! deferred until the gate releases it.

use std::collections::VecDeque;
use std::time::Instant;

use ahash::{HashMap, HashSet};

use super::{Core, IoCmd, WakeFn};
use shardmq_shard::{ConnId, ShardId};

pub(crate) struct Gate<C: Core> {
    inner: C,
    high: usize,
    low: usize,
    closed: bool,
    /// New mesh messages the core may still produce from reads before the gate closes.
    budget: usize,
    /// Reads taken from the backend while closed, by connection (one each: the connection is paused).
    held: HashMap<ConnId, Vec<u8>>,
    /// `held`'s connections in arrival order; may name connections already gone (skipped).
    order: VecDeque<ConnId>,
    /// Connections the core itself asked to pause (and has not resumed).
    core_paused: HashSet<ConnId>,
    /// Mesh messages taken from the core to count them; older than anything still in the core.
    mesh: VecDeque<(ShardId, C::Mesh)>,
    /// Commands of the gate that go before the core's (pauses).
    pre: VecDeque<IoCmd<C::Handoff>>,
    /// Connections released and to be resumed once the core's commands so far have been seen.
    resume: VecDeque<ConnId>,
    /// Times the gate closed, and reads it held; for [`super::ShardStats`].
    pub(crate) closings: u64,
    pub(crate) held_reads: u64,
}

impl<C: Core> Gate<C> {
    /// `high`: backlog length (in messages) at which the shard stops reading; 0 disables the gate.
    pub(crate) fn new(inner: C, high: usize) -> Self {
        let high = if high == 0 { usize::MAX } else { high };
        Gate {
            inner,
            high,
            low: high / 2,
            closed: false,
            budget: high,
            held: HashMap::default(),
            order: VecDeque::new(),
            core_paused: HashSet::default(),
            mesh: VecDeque::new(),
            pre: VecDeque::new(),
            resume: VecDeque::new(),
            closings: 0,
            held_reads: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn inner(&self) -> &C {
        &self.inner
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// The backlog after the driver's flush: closes the gate at the high-water mark, opens it at the low one.
    pub(crate) fn after_flush(&mut self, backlog: usize) {
        if backlog >= self.high || (self.closed && backlog > self.low) {
            self.close();
        } else {
            self.closed = false;
            self.budget = self.high - backlog;
        }
    }

    fn close(&mut self) {
        if !self.closed {
            self.closings += 1;
        }
        self.closed = true;
        self.budget = 0;
    }

    /// Whether held reads wait for an open gate's [`Gate::release`].
    pub(crate) fn has_releasable(&self) -> bool {
        !self.closed && !self.held.is_empty()
    }

    /// Feeds held reads to the core while the gate is open; returns how many. The driver drains the core's
    /// commands right after.
    pub(crate) fn release(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while !self.closed {
            let Some(conn) = self.order.pop_front() else { break };
            let Some(data) = self.held.remove(&conn) else { continue };
            self.inner.handle_read(conn, &data, now);
            self.count_mesh();
            self.resume.push_back(conn);
            n += 1;
        }
        n
    }

    /// Takes what the core produced for other shards and charges it to the budget.
    fn count_mesh(&mut self) {
        while let Some(m) = self.inner.poll_mesh() {
            self.mesh.push_back(m);
            self.budget = self.budget.saturating_sub(1);
        }
        if self.budget == 0 {
            self.close();
        }
    }

    fn forget(&mut self, conn: ConnId) {
        self.held.remove(&conn);
        self.core_paused.remove(&conn);
    }
}

impl<C: Core> Core for Gate<C> {
    type Mesh = C::Mesh;

    fn mesh_can_wait(m: &Self::Mesh) -> bool {
        C::mesh_can_wait(m)
    }
    type Handoff = C::Handoff;

    fn handle_accept(&mut self, conn: ConnId, now: Instant) {
        self.inner.handle_accept(conn, now);
    }

    fn handle_accepted(&mut self, conn: ConnId, from: shardmq_shard::io::Accepted) {
        self.inner.handle_accepted(conn, from);
    }

    fn handle_peer_identity(&mut self, conn: ConnId, name: Option<&str>) {
        self.inner.handle_peer_identity(conn, name);
    }

    fn handle_adopt(&mut self, conn: ConnId, state: Self::Handoff, now: Instant) {
        self.inner.handle_adopt(conn, state, now);
    }

    fn handle_read(&mut self, conn: ConnId, data: &[u8], now: Instant) {
        if self.closed || self.held.contains_key(&conn) {
            // The backend read this before it heard of the pause: keep it for the release, in order.
            let held = self.held.entry(conn).or_default();
            if held.is_empty() {
                self.order.push_back(conn);
                self.pre.push_back(IoCmd::PauseRead(conn));
                self.held_reads += 1;
            }
            held.extend_from_slice(data);
            return;
        }
        self.inner.handle_read(conn, data, now);
        self.count_mesh();
    }

    fn handle_closed(&mut self, conn: ConnId, now: Instant) {
        // Only a failed write reports a paused connection gone; what it sent before still counts (a
        // DISCONNECT among it suppresses the will).
        if let Some(data) = self.held.remove(&conn) {
            self.inner.handle_read(conn, &data, now);
        }
        self.core_paused.remove(&conn);
        self.inner.handle_closed(conn, now);
    }

    fn handle_backpressure(&mut self, conn: ConnId, blocked: bool, now: Instant) {
        self.inner.handle_backpressure(conn, blocked, now);
    }

    fn handle_mesh(&mut self, from: ShardId, msg: Self::Mesh, now: Instant) {
        self.inner.handle_mesh(from, msg, now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
    }

    fn handle_shutdown(&mut self, now: Instant) {
        self.inner.handle_shutdown(now);
    }

    fn handle_commit(&mut self, now: Instant) {
        self.inner.handle_commit(now);
    }

    fn take_transmit(&mut self, conn: ConnId) -> Vec<u8> {
        self.inner.take_transmit(conn)
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        self.inner.recycle(buf);
    }

    fn poll_io(&mut self) -> Option<IoCmd<Self::Handoff>> {
        if let Some(cmd) = self.pre.pop_front() {
            return Some(cmd);
        }
        while let Some(cmd) = self.inner.poll_io() {
            match &cmd {
                IoCmd::PauseRead(conn) => {
                    self.core_paused.insert(*conn);
                }
                IoCmd::ResumeRead(conn) => {
                    self.core_paused.remove(conn);
                    if self.held.contains_key(conn) {
                        // The gate still holds it: resumed on release.
                        continue;
                    }
                }
                IoCmd::Close(conn) => self.forget(*conn),
                IoCmd::Handoff { conn, .. } => {
                    // A handoff follows the core reading a CONNECT, which a held connection has not had.
                    debug_assert!(!self.held.contains_key(conn), "handoff of a connection with held input");
                    self.forget(*conn);
                }
                IoCmd::Transmit(_) => {}
            }
            return Some(cmd);
        }
        // Only after the core's commands: a pause it asked for while reading the released bytes wins.
        while let Some(conn) = self.resume.pop_front() {
            if !self.core_paused.contains(&conn) && !self.held.contains_key(&conn) {
                return Some(IoCmd::ResumeRead(conn));
            }
        }
        None
    }

    fn poll_mesh(&mut self) -> Option<(ShardId, Self::Mesh)> {
        self.mesh.pop_front().or_else(|| self.inner.poll_mesh())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    fn set_waker(&mut self, wake: WakeFn) {
        self.inner.set_waker(wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte read becomes one mesh message; `p` pauses the connection, `r` resumes it.
    #[derive(Default)]
    struct Bytes {
        got: Vec<u8>,
        io: VecDeque<IoCmd<()>>,
        mesh: VecDeque<(ShardId, u8)>,
    }

    impl Core for Bytes {
        type Mesh = u8;
        type Handoff = ();
        fn handle_accept(&mut self, _: ConnId, _: Instant) {}
        fn handle_adopt(&mut self, _: ConnId, _: (), _: Instant) {}
        fn handle_read(&mut self, conn: ConnId, data: &[u8], _: Instant) {
            for &b in data {
                self.got.push(b);
                self.mesh.push_back((ShardId(1), b));
                match b {
                    b'p' => self.io.push_back(IoCmd::PauseRead(conn)),
                    b'r' => self.io.push_back(IoCmd::ResumeRead(conn)),
                    _ => {}
                }
            }
        }
        fn handle_closed(&mut self, _: ConnId, _: Instant) {}
        fn handle_backpressure(&mut self, _: ConnId, _: bool, _: Instant) {}
        fn handle_mesh(&mut self, _: ShardId, _: u8, _: Instant) {}
        fn handle_timeout(&mut self, _: Instant) {}
        fn handle_shutdown(&mut self, _: Instant) {}
        fn take_transmit(&mut self, _: ConnId) -> Vec<u8> {
            Vec::new()
        }
        fn poll_io(&mut self) -> Option<IoCmd<()>> {
            self.io.pop_front()
        }
        fn poll_mesh(&mut self) -> Option<(ShardId, u8)> {
            self.mesh.pop_front()
        }
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
    }

    fn cmds(g: &mut Gate<Bytes>) -> Vec<String> {
        std::iter::from_fn(|| g.poll_io())
            .map(|c| match c {
                IoCmd::PauseRead(c) => format!("pause{}", c.0),
                IoCmd::ResumeRead(c) => format!("resume{}", c.0),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn spent_budget_holds_reads_until_the_backlog_falls() {
        let now = Instant::now();
        let mut g = Gate::new(Bytes::default(), 4);
        let (a, b) = (ConnId(1), ConnId(2));
        g.handle_read(a, b"abcd", now);
        assert!(g.is_closed(), "four messages spend a budget of four");
        g.handle_read(b, b"xy", now);
        g.handle_read(a, b"e", now);
        assert_eq!(cmds(&mut g), ["pause2", "pause1"]);
        assert_eq!(g.inner().got, b"abcd");
        g.after_flush(3);
        assert!(g.is_closed(), "over the low-water mark (2): stays closed");
        assert_eq!(g.release(now), 0);
        g.after_flush(2);
        assert!(g.has_releasable());
        // Budget 2: `xy` spends it, `e` waits for the next opening.
        assert_eq!(g.release(now), 1);
        assert_eq!(cmds(&mut g), ["resume2"]);
        g.after_flush(0);
        assert_eq!(g.release(now), 1);
        assert_eq!(cmds(&mut g), ["resume1"]);
        assert_eq!(g.inner().got, b"abcdxye");
        assert_eq!(std::iter::from_fn(|| g.poll_mesh()).count(), 7, "every message reaches the outbox");
    }

    #[test]
    fn never_resumes_what_the_core_paused() {
        let now = Instant::now();
        let mut g = Gate::new(Bytes::default(), 2);
        let a = ConnId(1);
        g.after_flush(2);
        g.handle_read(a, b"p", now);
        assert_eq!(cmds(&mut g), ["pause1"]);
        g.after_flush(0);
        assert_eq!(g.release(now), 1);
        assert_eq!(cmds(&mut g), ["pause1"], "the core's pause, and no resume after it");
        // The core's own resume goes through once the gate no longer holds the connection.
        g.handle_read(a, b"r", now);
        assert_eq!(cmds(&mut g), ["resume1"]);
    }
}
