//! The io_uring backend: completion-based I/O with multishot accept, multishot recv into a ring of provided
//! buffers, sends that own their bytes until completion, and the mesh eventfd read through the ring.
//!
//! Design: each shard registers one provided-buffer ring; the kernel picks a buffer per received chunk, the
//! core sees it as a slice, and the buffer goes back to the ring right after `handle_read` returns. An idle
//! connection owns no buffer: only its table slot ([`UConn`]). At most one send is in flight per connection;
//! output produced meanwhile is queued behind it and sent when it completes.
//!
//! The fd rule: a socket is closed, reused or handed to another shard only once no operation on it is in
//! flight. Closing, handing off and peer errors therefore go through states: cancel what is armed, wait for
//! the terminal completions, then act (`settle`). Bytes a multishot recv completes after a handoff was
//! requested travel with the socket (`read_ahead`), so the target core sees the stream without a gap.
//!
//! Pausing reads (`IoCmd::PauseRead`) cancels the multishot recv, so the kernel stops reading the socket and
//! TCP flow control slows the peer. Completions that were already on their way are copied into a per-slot
//! [`Stash`] (their buffers go back to the ring at once) and handed to the core first when reads resume; the
//! recv is re-armed after that. A connection owns a stash only while paused with such bytes.
//!
//! Until its cancel lands, a multishot recv drains the whole socket receive buffer (megabytes for a
//! flat-out peer) into the stash. A connection paused once is therefore likely paused again (a publisher
//! whose subscribers are congested) and reads with single-shot recvs from then on (`F_ONESHOT`): one
//! provided buffer per submission, re-armed after each delivered completion. Pausing such a connection
//! needs no cancel: the runtime just does not re-arm, and the recv in flight, if any, completes at most
//! once, so the stash holds at most one buffer. A connection not paused for a second or two goes back to
//! multishot recvs (at its next re-arm).
//!
//! It does not use registered files, zero-copy send or incremental buffer consumption; those are
//! optimisations with more kernel-version constraints than this runtime wants to carry.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::{HashMap, HashMapExt};
use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};

use super::driver::{drain_io, Ctx, EventLoop, Io};
use super::mesh::{Adopt, Outbox};
use super::slab::{pack, unpack, Slab};
use super::{sys, Core};
use shardmq_shard::io::Accepted;
use shardmq_shard::{ConnId, ShardId};

/// Ring sizing, from `RuntimeConfig`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UringParams {
    pub(crate) buffers: u16,
    pub(crate) buffer_size: u32,
    pub(crate) entries: u32,
}

const BGID: u16 = 0;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Output queued behind an in-flight send beyond which the core is told to hold back.
const QUEUED_HIGH_WATER: usize = 256 * 1024;
/// How long teardown waits for cancelled operations before leaking their buffers instead.
const QUIESCE_LIMIT: Duration = Duration::from_secs(2);
/// A single-shot connection not paused for a whole sweep period (so 1 to 2 periods) goes back to multishot.
const ONESHOT_SWEEP: Duration = Duration::from_secs(1);

// user_data: kind in bits 56..64, low 24 bits of the connection generation in 32..56, slot index in 0..32.
// The generation keeps a stale cancel (or completion) from matching a newer connection in the same slot.
const K_ACCEPT: u64 = 1;
const K_RECV: u64 = 2;
const K_SEND: u64 = 3;
const K_WAKE: u64 = 4;
const K_CANCEL: u64 = 5;

fn ud(kind: u64, id: ConnId) -> u64 {
    let (index, gen) = unpack(id);
    (kind << 56) | (((gen & 0xFF_FFFF) as u64) << 32) | index as u64
}

fn ud_kind(ud: u64) -> u64 {
    ud >> 56
}

fn ud_id(ud: u64, slab_gen: u32) -> Option<ConnId> {
    let index = ud as u32;
    ((ud >> 32) as u32 & 0xFF_FFFF == slab_gen & 0xFF_FFFF).then(|| pack(index, slab_gen))
}

// Connection flags.
const F_RECV: u16 = 1 << 0; // multishot recv armed
const F_SEND: u16 = 1 << 1; // a send in flight
const F_CLOSING: u16 = 1 << 2; // core asked to close: flush, then close
const F_DYING: u16 = 1 << 3; // close as soon as nothing is in flight (core already told, or gave up)
const F_HANDOFF: u16 = 1 << 4; // ship to another shard as soon as nothing is in flight
const F_CANCEL_RECV: u16 = 1 << 5; // recv cancel submitted
const F_CANCEL_ALL: u16 = 1 << 6; // cancel-all submitted
const F_TOLD_BLOCKED: u16 = 1 << 7; // core told handle_backpressure(true)
const F_REARM: u16 = 1 << 8; // recv ended for lack of buffers; re-arm after this batch
const F_PAUSED: u16 = 1 << 9; // the core asked for no reads; recv cancelled (or being cancelled)
const F_ONESHOT: u16 = 1 << 10; // paused lately: recvs are single-shot (see `arm_recv`)
const F_PAUSED_LATELY: u16 = 1 << 11; // paused since the last `oneshot` sweep
const NOT_LIVE: u16 = F_CLOSING | F_DYING | F_HANDOFF;

/// The runtime's state for one connection: the socket, its flags and, only while output is in flight,
/// a heap block.
pub(crate) struct UConn {
    fd: OwnedFd,
    flags: u16,
    /// Invariant: `Some` exactly while `F_SEND` is set, except inside the completion handler.
    out: Option<Box<Out>>,
}

struct Out {
    /// The bytes of the send in flight (from `off`). Never touched while the send is in flight: the kernel
    /// reads from this allocation.
    cur: Vec<u8>,
    off: usize,
    /// Output produced while `cur` is in flight.
    queued: Vec<u8>,
}

/// What a paused connection's recv completed before its cancel landed (or after it resumed, until the stash
/// is delivered): delivered, in order, before anything read later.
#[derive(Default)]
struct Stash {
    data: Vec<u8>,
    /// The recv's end of stream (0) or error (negative errno), reported after `data`.
    end: Option<i32>,
}

/// A handoff waiting for its socket's operations to finish.
struct PendingHandoff<H> {
    to: ShardId,
    ticket: u64,
    state: H,
    read_ahead: Vec<u8>,
}

/// The provided-buffer ring: `count` buffers of `size` bytes the kernel fills and we give back.
struct BufRing {
    ring: *mut io_uring::types::BufRingEntry,
    ring_bytes: usize,
    bufs: *mut u8,
    bufs_bytes: usize,
    size: usize,
    mask: u16,
    /// Our copy of the tail; published to the kernel with a release store after each refill.
    tail: u16,
}

fn mmap_anon(bytes: usize) -> io::Result<*mut u8> {
    // SAFETY: anonymous private mapping, no fd; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as *mut u8)
}

impl BufRing {
    fn new(count: u16, size: u32) -> io::Result<Self> {
        if count == 0 || size == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty provided-buffer ring"));
        }
        // Sized for the next power of two so indexing with the mask stays inside even for a count the
        // kernel will refuse (the refusal is what `Auto` falls back on).
        let entries = (count as usize).next_power_of_two();
        let ring_bytes = entries * std::mem::size_of::<io_uring::types::BufRingEntry>();
        let bufs_bytes = count as usize * size as usize;
        let ring = mmap_anon(ring_bytes)? as *mut io_uring::types::BufRingEntry;
        let bufs = match mmap_anon(bufs_bytes) {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: `ring` was mapped above with this size and nothing refers to it.
                unsafe { libc::munmap(ring as *mut libc::c_void, ring_bytes) };
                return Err(e);
            }
        };
        let mut br = BufRing {
            ring,
            ring_bytes,
            bufs,
            bufs_bytes,
            size: size as usize,
            mask: (entries - 1) as u16,
            tail: 0,
        };
        for bid in 0..count {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn push(&mut self, bid: u16) {
        let i = (self.tail & self.mask) as usize;
        // SAFETY: `i <= mask` indexes inside the ring mapping; the kernel does not read entries past the
        // published tail, and this one is not published yet.
        let e = unsafe { &mut *self.ring.add(i) };
        // SAFETY: bid < count, so the buffer lies inside the buffers mapping.
        e.set_addr(unsafe { self.bufs.add(bid as usize * self.size) } as u64);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field overlays entry 0's reserved field, inside the mapping, 2-byte aligned; the
        // kernel reads it concurrently, hence the atomic store.
        unsafe {
            let tail = io_uring::types::BufRingEntry::tail(self.ring) as *mut u16;
            (*(tail as *const AtomicU16)).store(self.tail, Ordering::Release);
        }
    }

    /// Gives buffer `bid` back to the kernel.
    fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    /// The first `len` bytes of buffer `bid`, which the kernel just filled.
    ///
    /// # Safety
    /// `bid` must come from a completion of this ring and not be recycled while the slice lives.
    unsafe fn slice<'a>(&self, bid: u16, len: usize) -> &'a [u8] {
        debug_assert!(len <= self.size);
        std::slice::from_raw_parts(self.bufs.add(bid as usize * self.size), len)
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both regions were mapped in `new` with these sizes; the owner made sure the kernel no
        // longer uses them (ring torn down or quiesced) before dropping, or leaked us instead.
        unsafe {
            libc::munmap(self.ring as *mut libc::c_void, self.ring_bytes);
            libc::munmap(self.bufs as *mut libc::c_void, self.bufs_bytes);
        }
    }
}

pub(crate) struct UringLoop<H> {
    /// Declared first: dropped before the buffers it may reference.
    ring: IoUring,
    bufs: Option<BufRing>,
    ctx: Arc<Ctx>,
    listeners: Vec<RawFd>,
    /// Whether listener `i` has a multishot accept armed.
    accept_armed: Vec<bool>,
    accepting: bool,
    accept_paused_until: Option<Instant>,
    wake_fd: RawFd,
    /// The eventfd read's destination; boxed so its address is stable while the read is in flight.
    wake_buf: Box<u64>,
    conns: Slab<UConn>,
    handoffs: HashMap<u32, PendingHandoff<H>>,
    /// Handoffs whose sockets became free (or that failed: `None`), to be placed in the outbox.
    ready: Vec<(ShardId, u64, Option<Adopt<H>>)>,
    closing: VecDeque<(Instant, ConnId)>,
    rearm: Vec<ConnId>,
    /// Bytes (and ends) held for live connections by slot index. An entry exists only while its connection
    /// is paused with such bytes, or resumed and waiting for them to be delivered (`resumed`).
    stash: HashMap<u32, Stash>,
    /// Connections resumed with a stash, delivered at the end of the next `poll`.
    resumed: Vec<ConnId>,
    /// Connections with `F_ONESHOT` (ids of gone ones are dropped by the sweep), and when to sweep them.
    oneshot: Vec<ConnId>,
    oneshot_sweep: Option<Instant>,
    /// Operations submitted whose final completion has not been seen. Invariant: 0 before the ring and
    /// buffers are released.
    inflight: usize,
    cqes: Vec<(u64, i32, u32)>,
    /// Completions taken off the queue outside `poll` (to make room, or during setup), handled first by the
    /// next `poll`, in order.
    deferred: Vec<(u64, i32, u32)>,
}

impl<H> UringLoop<H> {
    /// The full setup `Auto` relies on: ring, opcode probe, buffer ring, eventfd read and multishot accepts.
    /// Any error here means "use epoll".
    pub(crate) fn setup(
        ctx: Arc<Ctx>,
        listeners: &[OwnedFd],
        wake_fd: RawFd,
        p: &UringParams,
    ) -> io::Result<Self> {
        let entries = p.entries.clamp(64, 32768);
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 4).build(entries))
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring_setup: {e}")))?;
        if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_nodrop() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks EXT_ARG or NODROP"));
        }
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::AcceptMulti::CODE, "accept"),
            (opcode::RecvMulti::CODE, "recv"),
            (opcode::Send::CODE, "send"),
            (opcode::Read::CODE, "read"),
            (opcode::AsyncCancel2::CODE, "async_cancel"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring lacks {name}")));
            }
        }
        let bufs = BufRing::new(p.buffers, p.buffer_size)?;
        // SAFETY: the ring mapping stays valid until `bufs` is dropped, which happens only after the buffer
        // ring is unregistered or the io_uring is closed (see `Drop`).
        unsafe { ring.submitter().register_buf_ring_with_flags(bufs.ring as u64, p.buffers, BGID, 0) }
            .map_err(|e| {
                io::Error::new(e.kind(), format!("registering {} provided buffers: {e}", p.buffers))
            })?;
        let mut lp = UringLoop {
            ring,
            bufs: Some(bufs),
            ctx,
            listeners: listeners.iter().map(|l| l.as_raw_fd()).collect(),
            accept_armed: vec![false; listeners.len()],
            accepting: true,
            accept_paused_until: None,
            wake_fd,
            wake_buf: Box::new(0),
            conns: Slab::new(),
            handoffs: HashMap::new(),
            ready: Vec::new(),
            closing: VecDeque::new(),
            rearm: Vec::new(),
            stash: HashMap::new(),
            resumed: Vec::new(),
            oneshot: Vec::new(),
            oneshot_sweep: None,
            inflight: 0,
            cqes: Vec::with_capacity(256),
            deferred: Vec::new(),
        };
        lp.arm_wake();
        for i in 0..lp.listeners.len() {
            lp.arm_accept(i);
        }
        lp.ring.submit()?;
        // An opcode the probe lists can still refuse its multishot flavour: that fails right away.
        let ts = Timespec::new().nsec(1_000_000);
        match lp.ring.submitter().submit_with_args(1, &SubmitArgs::new().timespec(&ts)) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) => return Err(e),
        }
        // Kept for the first `poll`: an early completion may be a connection already accepted.
        lp.defer_completions();
        if let Some(&(_, res, _)) = lp.deferred.iter().find(|&&(u, res, _)| ud_kind(u) == K_ACCEPT && res < 0)
        {
            let err = io::Error::from_raw_os_error(-res);
            return Err(io::Error::new(err.kind(), format!("multishot accept: {err}")));
        }
        Ok(lp)
    }

    /// Bytes of runtime state per connection slot (value + generation), excluding output in flight.
    pub(crate) const fn conn_state_bytes() -> usize {
        Slab::<UConn>::slot_bytes()
    }

    fn push(&mut self, sqe: squeue::Entry) {
        self.inflight += 1;
        loop {
            // SAFETY: every SQE built in this file points only at memory that outlives the operation: send
            // buffers owned by the connection until its completion, the boxed eventfd buffer, the buffer
            // ring; see the invariants on `Out`, `wake_buf` and `inflight`.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            // Submission queue full: hand it to the kernel and try again. EBUSY means the completion side
            // is backed up: move completions aside (handled by the next `poll`) to make room.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.defer_completions(),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring submit failed while the queue was full");
                    self.defer_completions();
                    std::thread::yield_now();
                }
            }
        }
    }

    fn defer_completions(&mut self) {
        let ring = &mut self.ring;
        self.deferred.extend(ring.completion().map(|e| (e.user_data(), e.result(), e.flags())));
    }

    fn arm_wake(&mut self) {
        let buf = &mut *self.wake_buf as *mut u64 as *mut u8;
        let sqe = opcode::Read::new(Fd(self.wake_fd), buf, 8).build().user_data(K_WAKE << 56);
        self.push(sqe);
    }

    fn arm_accept(&mut self, i: usize) {
        if self.accept_armed[i] || !self.accepting || self.accept_paused_until.is_some() {
            return;
        }
        self.accept_armed[i] = true;
        let sqe = opcode::AcceptMulti::new(Fd(self.listeners[i]))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data((K_ACCEPT << 56) | i as u64);
        self.push(sqe);
    }

    fn arm_recv(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else { return };
        debug_assert!(c.flags & F_RECV == 0);
        c.flags = (c.flags | F_RECV) & !(F_REARM | F_CANCEL_RECV);
        let fd = Fd(c.fd.as_raw_fd());
        let sqe = if c.flags & F_ONESHOT != 0 {
            // One buffer per submission; the length comes from the selected buffer.
            opcode::Recv::new(fd, std::ptr::null_mut(), 0)
                .buf_group(BGID)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        } else {
            opcode::RecvMulti::new(fd, BGID).build()
        };
        self.push(sqe.user_data(ud(K_RECV, id)));
    }

    fn submit_send(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else { return };
        let Some(o) = c.out.as_ref() else { return };
        debug_assert!(c.flags & F_SEND == 0 && o.off < o.cur.len());
        c.flags |= F_SEND;
        let len = (o.cur.len() - o.off).min(u32::MAX as usize) as u32;
        // SAFETY (of the pointer's lifetime): `cur` is not touched until this send completes.
        let ptr = o.cur[o.off..].as_ptr();
        let sqe = opcode::Send::new(Fd(c.fd.as_raw_fd()), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(K_SEND, id));
        self.push(sqe);
    }

    fn cancel(&mut self, builder: CancelBuilder) {
        self.push(opcode::AsyncCancel2::new(builder).build().user_data(K_CANCEL << 56));
    }

    /// Moves a non-live connection forward: cancels what is armed, and closes or ships it once nothing is
    /// in flight.
    fn settle(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else { return };
        let flags = c.flags;
        if flags & NOT_LIVE == 0 {
            return;
        }
        let fd = c.fd.as_raw_fd();
        let busy = flags & (F_RECV | F_SEND) != 0;
        if flags & F_DYING != 0 {
            if busy {
                if flags & F_CANCEL_ALL == 0 {
                    c.flags |= F_CANCEL_ALL;
                    self.cancel(CancelBuilder::fd(Fd(fd)).all());
                }
                return;
            }
            let c = self.conns.remove(id).expect("present");
            self.stash.remove(&unpack(id).0);
            if flags & F_CLOSING != 0 {
                sys::close_gracefully(c.fd);
            }
            if flags & F_HANDOFF != 0 {
                // The reserved place in the outbox must be released, or that target's queue stalls.
                if let Some(h) = self.handoffs.remove(&unpack(id).0) {
                    self.ready.push((h.to, h.ticket, None));
                }
            }
            self.ctx.closed_one();
            return;
        }
        // Closing (flushing, recv cancelled) or handing off (recv cancelled, send finishing).
        if flags & F_RECV != 0 {
            if flags & F_CANCEL_RECV == 0 {
                c.flags |= F_CANCEL_RECV;
                self.cancel(CancelBuilder::user_data(ud(K_RECV, id)));
            }
            return;
        }
        if flags & F_SEND != 0 {
            return;
        }
        let c = self.conns.remove(id).expect("present");
        self.stash.remove(&unpack(id).0);
        if flags & F_HANDOFF != 0 {
            let (index, _) = unpack(id);
            let h = self.handoffs.remove(&index).expect("handoff state of a handing-off connection");
            let unsent = match c.out {
                Some(o) => {
                    let mut v = o.cur[o.off..].to_vec();
                    v.extend_from_slice(&o.queued);
                    v
                }
                None => Vec::new(),
            };
            self.ctx.handed_off_one();
            let adopt = Adopt::new(c.fd, h.state, unsent, h.read_ahead, self.ctx.open.clone());
            self.ready.push((h.to, h.ticket, Some(adopt)));
        } else {
            sys::close_gracefully(c.fd);
            self.ctx.closed_one();
        }
    }

    /// The peer went away (or an operation failed) on a live connection: tell the core once, then close.
    fn peer_gone<C: Core<Handoff = H>>(&mut self, core: &mut C, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else { return };
        let live = c.flags & NOT_LIVE == 0;
        c.flags |= F_DYING;
        // Bytes held for a paused connection are moot once it is gone.
        self.stash.remove(&unpack(id).0);
        if live {
            core.handle_closed(id, Instant::now());
        }
        self.settle(id);
    }

    /// Places handoffs whose sockets became free in the outbox, at the positions reserved for them.
    fn ship_ready<M>(&mut self, out: &mut Outbox<M, H>) {
        for (to, ticket, adopt) in self.ready.drain(..) {
            out.fill(to, ticket, adopt);
        }
    }

    /// The connection a completion belongs to, if its slot still holds the same generation.
    fn id_for(&self, user_data: u64) -> Option<ConnId> {
        let id = self.conns.id_at(user_data as u32)?;
        ud_id(user_data, unpack(id).1)
    }

    fn on_accept<C: Core<Handoff = H>>(
        &mut self,
        core: &mut C,
        out: &mut Outbox<C::Mesh, H>,
        user_data: u64,
        res: i32,
        more: bool,
        stopping: bool,
    ) {
        let i = (user_data as u32) as usize;
        if !more {
            self.inflight -= 1;
            self.accept_armed[i] = false;
        }
        if res >= 0 {
            // SAFETY: a successful accept completion carries a new fd that nothing else owns.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(res) };
            if stopping || !self.accepting || !self.ctx.try_open() {
                drop(fd);
            } else {
                sys::prepare_client(res);
                let peer = sys::peer_addr(res).ok();
                let id = self.conns.insert(UConn { fd, flags: 0, out: None });
                self.arm_recv(id);
                let now = Instant::now();
                core.handle_accept(id, now);
                core.handle_accepted(id, Accepted { listener: i as u16, peer: peer.map(|p| p.ip()) });
                drain_io(core, self, out, now, stopping);
            }
        } else if res != -libc::ECANCELED {
            // EMFILE/ENFILE/ENOMEM: back off instead of spinning on a listener that cannot deliver.
            tracing::warn!(error = %io::Error::from_raw_os_error(-res), "accept failed");
            if !more {
                self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
            }
        }
        if !more {
            self.arm_accept(i);
        }
    }

    fn on_recv<C: Core<Handoff = H>>(
        &mut self,
        core: &mut C,
        out: &mut Outbox<C::Mesh, H>,
        user_data: u64,
        res: i32,
        cflags: u32,
        stopping: bool,
    ) {
        let more = cqueue::more(cflags);
        if !more {
            self.inflight -= 1;
        }
        let bid = cqueue::buffer_select(cflags);
        let Some(id) = self.id_for(user_data) else {
            debug_assert!(false, "recv completion for a freed slot");
            if let (Some(bid), Some(b)) = (bid, self.bufs.as_mut()) {
                b.recycle(bid);
            }
            return;
        };
        let c = self.conns.get_mut(id).expect("id_for checked");
        if !more {
            c.flags &= !F_RECV;
        }
        let flags = c.flags;
        let live = flags & NOT_LIVE == 0;
        if live && (flags & F_PAUSED != 0 || self.stash.contains_key(&unpack(id).0)) {
            return self.stash_recv(id, res, bid);
        }
        if res > 0 {
            let bid = bid.expect("recv completion without a provided buffer");
            let bufs = self.bufs.as_mut().expect("buffer ring present while running");
            // SAFETY: the kernel filled `res` bytes of buffer `bid`; it is recycled below, after its last use.
            let data = unsafe { bufs.slice(bid, res as usize) };
            self.ctx.counters.bytes_read.fetch_add(res as u64, Ordering::Relaxed);
            if live {
                let now = Instant::now();
                core.handle_read(id, data, now);
                self.bufs.as_mut().expect("present").recycle(bid);
                // Before any further completion of this socket is looked at: a handoff requested now must
                // see the bytes that follow as read-ahead.
                drain_io(core, self, out, now, stopping);
                if !more {
                    self.rearm.push(id);
                }
            } else {
                if flags & F_HANDOFF != 0 {
                    if let Some(h) = self.handoffs.get_mut(&unpack(id).0) {
                        h.read_ahead.extend_from_slice(data);
                    }
                }
                bufs.recycle(bid);
            }
        } else if res == -libc::ENOBUFS && live {
            // Every buffer is out; they come back as this batch is processed.
            c.flags |= F_REARM;
            self.rearm.push(id);
        } else if res == -libc::ECANCELED && live {
            // The cancel of a pause that was lifted before it landed.
            self.rearm.push(id);
        } else if res == 0 || (res < 0 && res != -libc::ECANCELED && res != -libc::ENOBUFS) {
            // End of stream or a socket error. A handoff still ships: the target will see it for itself.
            if live {
                return self.peer_gone(core, id);
            }
            if flags & F_HANDOFF == 0 {
                c.flags |= F_DYING;
            }
        }
        if !live {
            self.settle(id);
        }
    }

    /// A recv completion of a paused connection (or of a resumed one whose stash is not delivered yet): its
    /// bytes are copied aside and the buffer goes straight back to the ring. The recv is not re-armed.
    fn stash_recv(&mut self, id: ConnId, res: i32, bid: Option<u16>) {
        let st = self.stash.entry(unpack(id).0).or_default();
        if res > 0 {
            let bid = bid.expect("recv completion without a provided buffer");
            let bufs = self.bufs.as_mut().expect("buffer ring present while running");
            // SAFETY: the kernel filled `res` bytes of buffer `bid`; it is recycled right after the copy.
            st.data.extend_from_slice(unsafe { bufs.slice(bid, res as usize) });
            bufs.recycle(bid);
            self.ctx.counters.bytes_read.fetch_add(res as u64, Ordering::Relaxed);
            self.ctx.counters.stash_bytes_max.fetch_max(st.data.len() as u64, Ordering::Relaxed);
        } else if res != -libc::ECANCELED && res != -libc::ENOBUFS && st.end.is_none() {
            // End of stream or an error: reported after the bytes before it, once resumed.
            st.end = Some(res);
        }
        if st.data.is_empty() && st.end.is_none() {
            self.stash.remove(&unpack(id).0);
        }
    }

    /// Connections not paused since the last sweep read with multishot recvs again, from their next re-arm
    /// (a single-shot recv in flight stays; pausing cancels it, harmlessly, if it has not completed).
    fn sweep_oneshot(&mut self, now: Instant) {
        let conns = &mut self.conns;
        self.oneshot.retain(|&id| {
            let Some(c) = conns.get_mut(id) else { return false };
            if c.flags & (F_PAUSED | F_PAUSED_LATELY) == 0 {
                c.flags &= !F_ONESHOT;
                return false;
            }
            c.flags &= !F_PAUSED_LATELY;
            true
        });
        self.oneshot_sweep = (!self.oneshot.is_empty()).then(|| now + ONESHOT_SWEEP);
    }

    /// Hands the bytes held for resumed connections to the core, then reports their end or reads on.
    fn deliver_resumed<C: Core<Handoff = H>>(
        &mut self,
        core: &mut C,
        out: &mut Outbox<C::Mesh, H>,
        stopping: bool,
    ) {
        for id in std::mem::take(&mut self.resumed) {
            let index = unpack(id).0;
            // Paused again before delivery: the stash waits for the next resume. Gone: it went with it.
            if self.conns.get(id).is_none_or(|c| c.flags & (NOT_LIVE | F_PAUSED) != 0) {
                continue;
            }
            let st = self.stash.remove(&index).unwrap_or_default();
            if !st.data.is_empty() {
                let now = Instant::now();
                core.handle_read(id, &st.data, now);
                drain_io(core, self, out, now, stopping);
            }
            // The core may have closed, handed off or paused it again meanwhile.
            let Some(c) = self.conns.get(id) else { continue };
            let flags = c.flags;
            if flags & NOT_LIVE != 0 {
                continue;
            }
            match st.end {
                Some(_) if flags & F_PAUSED != 0 => {
                    self.stash.insert(index, Stash { data: Vec::new(), end: st.end });
                }
                Some(_) => self.peer_gone(core, id),
                None if flags & (F_PAUSED | F_RECV) == 0 => self.arm_recv(id),
                // Paused: stays quiet. Still armed: a recv whose cancel had not landed reads on.
                None => {}
            }
        }
    }

    fn on_send<C: Core<Handoff = H>>(&mut self, core: &mut C, user_data: u64, res: i32) {
        self.inflight -= 1;
        let Some(id) = self.id_for(user_data) else {
            debug_assert!(false, "send completion for a freed slot");
            return;
        };
        let c = self.conns.get_mut(id).expect("id_for checked");
        c.flags &= !F_SEND;
        let live = c.flags & NOT_LIVE == 0;
        let may_continue = c.flags & (F_DYING | F_HANDOFF) == 0;
        if res < 0 {
            if res != -libc::ECANCELED && live {
                return self.peer_gone(core, id);
            }
            c.flags |= if c.flags & F_HANDOFF != 0 { 0 } else { F_DYING };
            return self.settle(id);
        }
        self.ctx.counters.bytes_written.fetch_add(res as u64, Ordering::Relaxed);
        let o = c.out.as_mut().expect("a send completed without output");
        o.off += res as usize;
        debug_assert!(o.off <= o.cur.len());
        if o.off < o.cur.len() {
            // A short send: the socket buffer is full, the peer is slower than the core.
            if live && c.flags & F_TOLD_BLOCKED == 0 {
                c.flags |= F_TOLD_BLOCKED;
                core.handle_backpressure(id, true, Instant::now());
            }
        } else if !o.queued.is_empty() {
            std::mem::swap(&mut o.cur, &mut o.queued);
            o.queued.clear();
            o.off = 0;
        } else {
            let o = c.out.take().expect("checked above");
            let told = c.flags & F_TOLD_BLOCKED != 0;
            c.flags &= !F_TOLD_BLOCKED;
            if live {
                let mut buf = o.cur;
                buf.clear();
                core.recycle(buf);
                if told {
                    core.handle_backpressure(id, false, Instant::now());
                }
            }
            return self.settle(id);
        }
        if may_continue {
            self.submit_send(id);
        } else {
            self.settle(id);
        }
    }

    /// Accounts for a completion seen while tearing down: nothing is delivered to the core any more.
    fn teardown_completion(&mut self, user_data: u64, res: i32, cflags: u32) {
        let multishot = matches!(ud_kind(user_data), K_ACCEPT | K_RECV);
        if !(multishot && cqueue::more(cflags)) {
            self.inflight -= 1;
        }
        if ud_kind(user_data) == K_ACCEPT && res >= 0 {
            // SAFETY: a connection accepted during teardown: we own the fd and close it.
            drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(res) });
        }
    }

    /// Cancels everything in flight and waits (bounded) for the completions. Returns whether the ring is
    /// quiet, i.e. the kernel no longer touches any of our memory.
    fn quiesce(&mut self, limit: Duration) -> bool {
        for (user_data, res, cflags) in std::mem::take(&mut self.deferred) {
            self.teardown_completion(user_data, res, cflags);
        }
        if self.inflight == 0 {
            return true;
        }
        self.cancel(CancelBuilder::any());
        let deadline = Instant::now() + limit;
        while self.inflight > 0 && Instant::now() < deadline {
            let ts = Timespec::new().nsec(10_000_000);
            match self.ring.submitter().submit_with_args(1, &SubmitArgs::new().timespec(&ts)) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring wait failed during teardown");
                    break;
                }
            }
            self.defer_completions();
            for (user_data, res, cflags) in std::mem::take(&mut self.deferred) {
                self.teardown_completion(user_data, res, cflags);
            }
        }
        self.inflight == 0
    }
}

impl<H> Drop for UringLoop<H> {
    fn drop(&mut self) {
        if self.quiesce(QUIESCE_LIMIT) {
            let _ = self.ring.submitter().unregister_buf_ring(BGID);
            return;
        }
        // The kernel may still write into buffers or read send data: leak them rather than free memory in use.
        tracing::warn!(inflight = self.inflight, "io_uring operations did not finish; leaking their buffers");
        std::mem::forget(self.bufs.take());
        std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        for id in self.conns.ids() {
            if let Some(o) = self.conns.get_mut(id).and_then(|c| c.out.take()) {
                std::mem::forget(o);
            }
        }
    }
}

impl<C: Core> Io<C> for UringLoop<C::Handoff> {
    fn transmit(&mut self, core: &mut C, conn: ConnId, buf: Vec<u8>, now: Instant) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.flags & NOT_LIVE != 0 {
            return;
        }
        match c.out.as_mut() {
            Some(o) => {
                if o.queued.is_empty() {
                    o.queued = buf;
                } else {
                    o.queued.extend_from_slice(&buf);
                }
                // The send in flight may be parked on a full socket and never complete short: the queue
                // length is then the only sign of a slow consumer.
                if o.queued.len() > QUEUED_HIGH_WATER && c.flags & F_TOLD_BLOCKED == 0 {
                    c.flags |= F_TOLD_BLOCKED;
                    core.handle_backpressure(conn, true, now);
                }
            }
            None => {
                c.out = Some(Box::new(Out { cur: buf, off: 0, queued: Vec::new() }));
                self.submit_send(conn);
            }
        }
    }

    fn close(&mut self, _core: &mut C, conn: ConnId, buf: Vec<u8>, now: Instant) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.flags & NOT_LIVE != 0 {
            return;
        }
        c.flags |= F_CLOSING;
        // Input is discarded while closing, held bytes included.
        self.stash.remove(&unpack(conn).0);
        if !buf.is_empty() {
            match c.out.as_mut() {
                Some(o) => o.queued.extend_from_slice(&buf),
                None => {
                    c.out = Some(Box::new(Out { cur: buf, off: 0, queued: Vec::new() }));
                    self.submit_send(conn);
                }
            }
        }
        self.closing.push_back((now + self.ctx.close_linger, conn));
        self.settle(conn);
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
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.flags & NOT_LIVE != 0 {
            return;
        }
        c.flags |= F_HANDOFF;
        let ticket = out.reserve(to);
        // Bytes held while paused come first in the stream; the target starts unpaused. A held end of stream
        // is not carried: the target's own recv sees it again.
        let read_ahead = self.stash.remove(&unpack(conn).0).map(|s| s.data).unwrap_or_default();
        self.handoffs.insert(unpack(conn).0, PendingHandoff { to, ticket, state, read_ahead });
        self.settle(conn);
        self.ship_ready(out);
    }

    fn pause_read(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.flags & (NOT_LIVE | F_PAUSED) != 0 {
            return;
        }
        // With `F_ONESHOT` set, a multishot recv can only be armed with its cancel on the way; a single-shot
        // one is left to complete (into the stash, at most one buffer) or to wait. With it clear, the recv
        // is multishot (or a single-shot one armed before a sweep, which cancelling does not harm).
        let cancel = c.flags & (F_RECV | F_CANCEL_RECV | F_ONESHOT) == F_RECV;
        let first = c.flags & F_ONESHOT == 0;
        c.flags |= F_PAUSED | F_ONESHOT | F_PAUSED_LATELY;
        if first {
            self.oneshot.push(conn);
            if self.oneshot_sweep.is_none() {
                self.oneshot_sweep = Some(Instant::now() + ONESHOT_SWEEP);
            }
        }
        if cancel {
            c.flags |= F_CANCEL_RECV;
            self.cancel(CancelBuilder::user_data(ud(K_RECV, conn)));
        }
    }

    fn resume_read(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.flags & NOT_LIVE != 0 || c.flags & F_PAUSED == 0 {
            return;
        }
        c.flags &= !F_PAUSED;
        if self.stash.contains_key(&unpack(conn).0) {
            self.resumed.push(conn);
        } else if c.flags & F_RECV == 0 {
            self.arm_recv(conn);
        }
        // Otherwise the recv's cancel has not landed yet: its final completion re-arms it.
    }

    fn adopt(&mut self, fd: OwnedFd, unsent: Vec<u8>, _now: Instant) -> Option<ConnId> {
        self.ctx.adopted_one();
        let id = self.conns.insert(UConn { fd, flags: 0, out: None });
        self.arm_recv(id);
        if !unsent.is_empty() {
            self.conns.get_mut(id).expect("just inserted").out =
                Some(Box::new(Out { cur: unsent, off: 0, queued: Vec::new() }));
            self.submit_send(id);
        }
        Some(id)
    }
}

impl<C: Core> EventLoop<C> for UringLoop<C::Handoff> {
    fn poll(
        &mut self,
        core: &mut C,
        out: &mut Outbox<C::Mesh, C::Handoff>,
        timeout: Option<Duration>,
        stopping: bool,
    ) -> io::Result<usize> {
        let res = match timeout {
            Some(t) => {
                let ts = Timespec::from(t);
                self.ring.submitter().submit_with_args(1, &SubmitArgs::new().timespec(&ts))
            }
            None => self.ring.submit_and_wait(1),
        };
        match res {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.append(&mut self.deferred);
        cqes.extend(self.ring.completion().map(|e| (e.user_data(), e.result(), e.flags())));
        for &(user_data, res, cflags) in &cqes {
            match ud_kind(user_data) {
                K_RECV => self.on_recv(core, out, user_data, res, cflags, stopping),
                K_SEND => self.on_send(core, user_data, res),
                K_ACCEPT => self.on_accept(core, out, user_data, res, cqueue::more(cflags), stopping),
                K_WAKE => {
                    self.inflight -= 1;
                    if res != -libc::ECANCELED {
                        self.arm_wake();
                    }
                }
                K_CANCEL => self.inflight -= 1,
                k => debug_assert!(false, "unknown completion kind {k}"),
            }
        }
        let n = cqes.len();
        self.cqes = cqes;
        self.deliver_resumed(core, out, stopping);
        // Buffers used by this batch are back in the ring: connections that ran dry can read again.
        for id in std::mem::take(&mut self.rearm) {
            let idle = self.conns.get(id).is_some_and(|c| c.flags & (NOT_LIVE | F_RECV | F_PAUSED) == 0);
            if idle && !self.stash.contains_key(&unpack(id).0) {
                self.arm_recv(id);
            }
        }
        self.ship_ready(out);
        Ok(n)
    }

    fn on_tick(&mut self, _core: &mut C, now: Instant) {
        while let Some(&(deadline, id)) = self.closing.front() {
            if deadline > now {
                break;
            }
            self.closing.pop_front();
            // Still flushing after the linger: the peer is not reading. Give up on the rest.
            if let Some(c) = self.conns.get_mut(id) {
                c.flags |= F_DYING;
                self.settle(id);
            }
        }
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            for i in 0..self.listeners.len() {
                self.arm_accept(i);
            }
        }
        if self.oneshot_sweep.is_some_and(|t| t <= now) {
            self.sweep_oneshot(now);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let closing = self.closing.front().map(|&(d, _)| d);
        closing.into_iter().chain(self.accept_paused_until).chain(self.oneshot_sweep).min()
    }

    fn has_ready(&self) -> bool {
        !self.rearm.is_empty() || !self.deferred.is_empty() || !self.resumed.is_empty()
    }

    fn stop_accepting(&mut self) {
        self.accepting = false;
        for i in 0..self.listeners.len() {
            if self.accept_armed[i] {
                self.cancel(CancelBuilder::user_data((K_ACCEPT << 56) | i as u64));
            }
        }
    }

    fn close_all(&mut self, core: &mut C, now: Instant) {
        for id in self.conns.ids() {
            let Some(c) = self.conns.get_mut(id) else { continue };
            if c.flags & F_HANDOFF != 0 {
                // Its target is shutting down as well: close it here instead.
                c.flags = (c.flags & !F_HANDOFF) | F_CLOSING;
                self.handoffs.remove(&unpack(id).0);
                self.closing.push_back((now + self.ctx.close_linger, id));
                self.settle(id);
            } else {
                <Self as Io<C>>::close(self, core, id, Vec::new(), now);
            }
        }
    }

    fn open_count(&self) -> usize {
        self.conns.len()
    }

    fn force_close_all(&mut self) {
        self.quiesce(QUIESCE_LIMIT);
        self.stash.clear();
        for id in self.conns.ids() {
            if let Some(c) = self.conns.get_mut(id) {
                if self.inflight > 0 {
                    // Not quiet: the kernel may still read this output.
                    if let Some(o) = c.out.take() {
                        std::mem::forget(o);
                    }
                }
            }
            if self.conns.remove(id).is_some() {
                self.ctx.closed_one();
            }
        }
    }
}
