//! The epoll backend: readiness-based I/O with plain `recv`/`send` syscalls, used where io_uring is
//! unavailable (old kernels, seccomp, memory limits) or when asked for.
//!
//! Design: client sockets are nonblocking and registered edge-triggered for input and output once, so
//! backpressure never costs an `epoll_ctl`. All reads go into one shared per-shard buffer: an idle
//! connection owns no read buffer, only its table slot ([`EConn`], 16 bytes + 4 for its generation). Output
//! is written as soon as the core transmits; only what the socket refused is kept (`Pending`), and the core
//! is told (`handle_backpressure`) when that starts and when it drains.
//!
//! Pausing reads (`IoCmd::PauseRead`) needs no buffer either: a paused connection is simply not read, so its
//! bytes stay in the kernel and TCP flow control slows the peer. Since the socket is edge-triggered, resuming
//! reads until `EAGAIN` right away instead of waiting for an edge that may never come.
//!
//! It does not: read more than a bounded amount per connection per wakeup (fairness; the rest is picked up
//! on the next iteration), or keep reading a connection the core asked to close (its input is discarded).

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::driver::{drain_io, Ctx, EventLoop, Io};
use super::mesh::{Adopt, Outbox};
use super::slab::{pack, unpack, Slab, RESERVED_GEN};
use super::{sys, Core};
use shardmq_shard::io::Accepted;
use shardmq_shard::{ConnId, ShardId};

/// Reads per connection per wakeup before moving on to others (each up to the shared buffer's size).
const READS_PER_WAKEUP: usize = 16;
/// How long accepting pauses after the process ran out of fds or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const EVENTFD_INDEX: u32 = u32::MAX;

/// The runtime's state for one connection. Deliberately tiny: a socket and, only while output is pending,
/// a heap block.
pub(crate) struct EConn {
    fd: OwnedFd,
    /// The core asked not to be given reads (fits in the padding after `fd`).
    paused: bool,
    out: Option<Box<Pending>>,
}

/// Output the socket has not accepted yet.
struct Pending {
    buf: Vec<u8>,
    /// Invariant: `off < buf.len()` (an empty `Pending` is dropped).
    off: usize,
    /// The core asked to close: flush, then close; input is discarded meanwhile.
    closing: bool,
    /// The core was told `handle_backpressure(true)` and must hear `false` when this drains.
    told_blocked: bool,
}

impl Pending {
    fn append(&mut self, bytes: &[u8]) {
        // Compact once the written prefix dominates, so a long-lived backlog does not grow without bound.
        if self.off > 0 && self.off >= self.buf.len() / 2 {
            self.buf.drain(..self.off);
            self.off = 0;
        }
        self.buf.extend_from_slice(bytes);
    }
}

/// Outcome of writing pending output.
enum Flush {
    Drained,
    Blocked,
    Failed,
}

pub(crate) struct EpollLoop {
    ep: OwnedFd,
    listeners: Vec<RawFd>,
    wake_fd: RawFd,
    ctx: Arc<Ctx>,
    conns: Slab<EConn>,
    /// The shared read buffer. Taken out (`mem::take`) while a read is being handed to the core.
    buf: Box<[u8]>,
    events: Vec<libc::epoll_event>,
    /// Connections whose reads were cut short by `READS_PER_WAKEUP`, or that were resumed: edge-triggered
    /// epoll will not report them again, so they are read on the next iteration without waiting. The flag:
    /// read until `EAGAIN` (a hangup or a resume), not just until a short read.
    again: Vec<(ConnId, bool)>,
    /// Closing connections by deadline (FIFO: every close gets the same linger).
    closing: VecDeque<(Instant, ConnId)>,
    accepting: bool,
    accept_paused_until: Option<Instant>,
}

fn token(index: u32, gen: u32) -> u64 {
    pack(index, gen).0
}

impl EpollLoop {
    pub(crate) fn new(
        ctx: Arc<Ctx>,
        listeners: &[OwnedFd],
        wake_fd: RawFd,
        read_buffer: usize,
    ) -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is checked before being wrapped.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd owned by nobody else.
        let ep = unsafe { OwnedFd::from_raw_fd(raw) };
        let lp = EpollLoop {
            ep,
            listeners: listeners.iter().map(|l| l.as_raw_fd()).collect(),
            wake_fd,
            ctx,
            conns: Slab::new(),
            buf: vec![0u8; read_buffer.max(4096)].into_boxed_slice(),
            events: Vec::with_capacity(256),
            again: Vec::new(),
            closing: VecDeque::new(),
            accepting: true,
            accept_paused_until: None,
        };
        // Level-triggered: accepting is capped per wakeup and the rest must be reported again.
        lp.ctl(libc::EPOLL_CTL_ADD, wake_fd, libc::EPOLLIN as u32, token(EVENTFD_INDEX, RESERVED_GEN))?;
        for (i, &l) in lp.listeners.iter().enumerate() {
            lp.ctl(libc::EPOLL_CTL_ADD, l, libc::EPOLLIN as u32, token(i as u32, RESERVED_GEN))?;
        }
        Ok(lp)
    }

    /// Bytes of runtime state per connection slot (value + generation), excluding pending output.
    pub(crate) const fn conn_state_bytes() -> usize {
        Slab::<EConn>::slot_bytes()
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: `ev` lives across the call; the epoll fd is ours.
        if unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn register_conn(&mut self, fd: OwnedFd, out: Option<Box<Pending>>) -> Option<ConnId> {
        let raw = fd.as_raw_fd();
        let id = self.conns.insert(EConn { fd, paused: false, out });
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if let Err(e) = self.ctl(libc::EPOLL_CTL_ADD, raw, events, id.0) {
            tracing::warn!(error = %e, "epoll_ctl ADD failed; closing socket");
            self.conns.remove(id);
            self.ctx.closed_one();
            return None;
        }
        Some(id)
    }

    fn set_listeners(&mut self, events: u32) {
        for (i, &l) in self.listeners.iter().enumerate() {
            let _ = self.ctl(libc::EPOLL_CTL_MOD, l, events, token(i as u32, RESERVED_GEN));
        }
    }

    fn on_accept<C: Core>(&mut self, core: &mut C, out: &mut Outbox<C::Mesh, C::Handoff>, li: usize) {
        let Some(&lfd) = self.listeners.get(li) else { return };
        for _ in 0..256 {
            match sys::accept(lfd, true) {
                Ok(fd) => {
                    if !self.ctx.try_open() {
                        drop(fd);
                        continue;
                    }
                    sys::prepare_client(fd.as_raw_fd());
                    let peer = sys::peer_addr(fd.as_raw_fd()).ok();
                    let Some(id) = self.register_conn(fd, None) else { continue };
                    let now = Instant::now();
                    core.handle_accept(id, now);
                    core.handle_accepted(id, Accepted { listener: li as u16, peer: peer.map(|p| p.ip()) });
                    drain_io(core, self, out, now, false);
                }
                Err(e) if sys::would_block(&e) => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ECONNABORTED)) => continue,
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS/ENOMEM: the listener stays readable, so pause it rather than spin.
                    tracing::warn!(error = %e, "accept failed; pausing accepts");
                    self.set_listeners(0);
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Reads until the socket is drained (or the fairness cap), handing every read to the core and draining
    /// its commands before the next read.
    fn on_readable<C: Core>(
        &mut self,
        core: &mut C,
        out: &mut Outbox<C::Mesh, C::Handoff>,
        id: ConnId,
        buf: &mut [u8],
        hup: bool,
    ) {
        for _ in 0..READS_PER_WAKEUP {
            let Some(c) = self.conns.get(id) else { return };
            if c.paused {
                // Left in the kernel; `resume_read` reads it.
                return;
            }
            let closing = c.out.as_ref().is_some_and(|p| p.closing);
            match sys::recv(c.fd.as_raw_fd(), buf) {
                Ok(0) => return self.gone(core, id, closing),
                Ok(n) => {
                    self.ctx.counters.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    if !closing {
                        let now = Instant::now();
                        core.handle_read(id, &buf[..n], now);
                        drain_io(core, self, out, now, false);
                    }
                    // A short read emptied the receive queue; later data raises a new edge. After a hangup
                    // keep reading, or the end of stream would never be seen.
                    if n < buf.len() && !hup {
                        return;
                    }
                }
                Err(e) if sys::would_block(&e) => return,
                Err(_) => return self.gone(core, id, closing),
            }
        }
        self.again.push((id, hup));
    }

    /// The peer closed or the socket failed. A live connection is reported to the core; one the core
    /// already closed is just finished.
    fn gone<C: Core>(&mut self, core: &mut C, id: ConnId, closing: bool) {
        let Some(c) = self.conns.remove(id) else { return };
        drop(c.fd);
        self.ctx.closed_one();
        if !closing {
            core.handle_closed(id, Instant::now());
        }
    }

    fn finish_close(&mut self, id: ConnId) {
        if let Some(c) = self.conns.remove(id) {
            sys::close_gracefully(c.fd);
            self.ctx.closed_one();
        }
    }

    /// Writes pending output of `id` until drained or the socket is full.
    fn flush(&mut self, id: ConnId) -> Flush {
        let Some(c) = self.conns.get_mut(id) else { return Flush::Failed };
        let fd = c.fd.as_raw_fd();
        let Some(p) = c.out.as_mut() else { return Flush::Drained };
        let mut written = 0u64;
        let res = loop {
            debug_assert!(p.off < p.buf.len());
            match sys::send(fd, &p.buf[p.off..]) {
                Ok(n) => {
                    written += n as u64;
                    p.off += n;
                    if p.off == p.buf.len() {
                        break Flush::Drained;
                    }
                }
                Err(e) if sys::would_block(&e) => break Flush::Blocked,
                Err(_) => break Flush::Failed,
            }
        };
        self.ctx.counters.bytes_written.fetch_add(written, Ordering::Relaxed);
        res
    }

    fn on_writable<C: Core>(&mut self, core: &mut C, id: ConnId) {
        let Some(c) = self.conns.get(id) else { return };
        let Some(p) = c.out.as_ref() else { return };
        let (closing, told) = (p.closing, p.told_blocked);
        match self.flush(id) {
            Flush::Drained if closing => self.finish_close(id),
            Flush::Drained => {
                if let Some(c) = self.conns.get_mut(id) {
                    c.out = None;
                }
                if told {
                    core.handle_backpressure(id, false, Instant::now());
                }
            }
            Flush::Blocked => {
                if !told && !closing {
                    if let Some(p) = self.conns.get_mut(id).and_then(|c| c.out.as_mut()) {
                        p.told_blocked = true;
                    }
                    core.handle_backpressure(id, true, Instant::now());
                }
            }
            Flush::Failed => self.gone(core, id, closing),
        }
    }

    fn begin_close(&mut self, id: ConnId, now: Instant) {
        let deadline = now + self.ctx.close_linger;
        if let Some(p) = self.conns.get_mut(id).and_then(|c| c.out.as_mut()) {
            p.closing = true;
            self.closing.push_back((deadline, id));
        } else {
            self.finish_close(id);
        }
    }
}

impl<C: Core> Io<C> for EpollLoop {
    fn transmit(&mut self, core: &mut C, conn: ConnId, buf: Vec<u8>, now: Instant) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if let Some(p) = c.out.as_mut() {
            if !p.closing {
                p.append(&buf);
            }
            // An EPOLLOUT edge is due: the last write hit EAGAIN.
            return;
        }
        c.out = Some(Box::new(Pending { buf, off: 0, closing: false, told_blocked: false }));
        match self.flush(conn) {
            Flush::Drained => {
                let buf = self.conns.get_mut(conn).and_then(|c| c.out.take()).map(|p| p.buf);
                if let Some(mut buf) = buf {
                    buf.clear();
                    core.recycle(buf);
                }
            }
            Flush::Blocked => {
                if let Some(p) = self.conns.get_mut(conn).and_then(|c| c.out.as_mut()) {
                    p.told_blocked = true;
                }
                core.handle_backpressure(conn, true, now);
            }
            Flush::Failed => self.gone(core, conn, false),
        }
    }

    fn close(&mut self, _core: &mut C, conn: ConnId, buf: Vec<u8>, now: Instant) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if mem::take(&mut c.paused) {
            // Closing discards input as usual; what arrived while paused raised no edge we acted on.
            self.again.push((conn, true));
        }
        match c.out.as_mut() {
            Some(p) if p.closing => return,
            Some(p) => p.append(&buf),
            None if buf.is_empty() => return self.finish_close(conn),
            None => {
                c.out = Some(Box::new(Pending { buf, off: 0, closing: false, told_blocked: false }));
                match self.flush(conn) {
                    Flush::Drained | Flush::Failed => return self.finish_close(conn),
                    Flush::Blocked => {}
                }
            }
        }
        self.begin_close(conn, now);
    }

    fn handoff(
        &mut self,
        _core: &mut C,
        conn: ConnId,
        to: ShardId,
        state: C::Handoff,
        out: &mut Outbox<C::Mesh, C::Handoff>,
        _now: Instant,
    ) {
        let Some(c) = self.conns.get(conn) else { return };
        if c.out.as_ref().is_some_and(|p| p.closing) {
            return;
        }
        let c = self.conns.remove(conn).expect("checked above");
        // Stop watching before anyone else can: the target registers it in its own epoll.
        let _ = self.ctl(libc::EPOLL_CTL_DEL, c.fd.as_raw_fd(), 0, 0);
        let unsent = c.out.map(|p| p.buf[p.off..].to_vec()).unwrap_or_default();
        self.ctx.handed_off_one();
        out.push_adopt(to, Adopt::new(c.fd, state, unsent, Vec::new(), self.ctx.open.clone()));
    }

    fn pause_read(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(conn) {
            if !c.out.as_ref().is_some_and(|p| p.closing) {
                c.paused = true;
            }
        }
    }

    fn resume_read(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(conn) {
            if mem::take(&mut c.paused) {
                self.again.push((conn, true));
            }
        }
    }

    fn adopt(&mut self, fd: OwnedFd, unsent: Vec<u8>, _now: Instant) -> Option<ConnId> {
        self.ctx.adopted_one();
        if let Err(e) = sys::set_nonblocking(fd.as_raw_fd(), true) {
            tracing::warn!(error = %e, "adopted socket unusable; closing");
            self.ctx.closed_one();
            return None;
        }
        // The EPOLLOUT edge raised by registering a writable socket flushes `unsent`.
        let out = (!unsent.is_empty())
            .then(|| Box::new(Pending { buf: unsent, off: 0, closing: false, told_blocked: false }));
        self.register_conn(fd, out)
    }
}

impl<C: Core> EventLoop<C> for EpollLoop {
    fn poll(
        &mut self,
        core: &mut C,
        out: &mut Outbox<C::Mesh, C::Handoff>,
        timeout: Option<Duration>,
        _stopping: bool,
    ) -> io::Result<usize> {
        let ms = match timeout {
            None => -1,
            // Round up: waking before the deadline would just spin.
            Some(t) => t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32,
        };
        let mut events = mem::take(&mut self.events);
        events.clear();
        // SAFETY: `events` has capacity for `capacity()` entries; the kernel writes at most that many.
        let n = unsafe {
            libc::epoll_wait(self.ep.as_raw_fd(), events.as_mut_ptr(), events.capacity() as i32, ms)
        };
        if n < 0 {
            self.events = events;
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EINTR) { Ok(0) } else { Err(e) };
        }
        // SAFETY: epoll_wait initialised the first `n` entries.
        unsafe { events.set_len(n as usize) };
        let mut buf = mem::take(&mut self.buf);
        for ev in events.iter().map(|e| (e.u64, e.events)) {
            let (data, flags) = ev;
            let (index, gen) = unpack(ConnId(data));
            if gen == RESERVED_GEN {
                if index == EVENTFD_INDEX {
                    sys::eventfd_drain(self.wake_fd);
                } else if self.accepting {
                    self.on_accept(core, out, index as usize);
                }
                continue;
            }
            let id = ConnId(data);
            let err = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
            if flags & (libc::EPOLLOUT as u32 | err) != 0 {
                self.on_writable(core, id);
            }
            if flags & ((libc::EPOLLIN | libc::EPOLLRDHUP) as u32 | err) != 0 {
                let hup = flags & (libc::EPOLLRDHUP as u32 | err) != 0;
                self.on_readable(core, out, id, &mut buf, hup);
            }
        }
        // Full batch: there may be more; grow so one wait can return more next time.
        if events.len() == events.capacity() && events.capacity() < 4096 {
            events.reserve(events.capacity());
        }
        self.events = events;
        for (id, hup) in mem::take(&mut self.again) {
            self.on_readable(core, out, id, &mut buf, hup);
        }
        self.buf = buf;
        Ok(n as usize)
    }

    fn on_tick(&mut self, _core: &mut C, now: Instant) {
        while let Some(&(deadline, id)) = self.closing.front() {
            if deadline > now {
                break;
            }
            self.closing.pop_front();
            // Still here after the linger: the peer is not reading. Give up on the rest.
            if self.conns.get(id).is_some() {
                self.finish_close(id);
            }
        }
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            if self.accepting {
                self.set_listeners(libc::EPOLLIN as u32);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let closing = self.closing.front().map(|&(d, _)| d);
        closing.into_iter().chain(self.accept_paused_until).min()
    }

    fn has_ready(&self) -> bool {
        !self.again.is_empty()
    }

    fn stop_accepting(&mut self) {
        self.accepting = false;
        for &l in &self.listeners {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, l, 0, 0);
        }
    }

    fn close_all(&mut self, core: &mut C, now: Instant) {
        for id in self.conns.ids() {
            <Self as Io<C>>::close(self, core, id, Vec::new(), now);
        }
    }

    fn open_count(&self) -> usize {
        self.conns.len()
    }

    fn force_close_all(&mut self) {
        for id in self.conns.ids() {
            self.finish_close(id);
        }
    }
}
