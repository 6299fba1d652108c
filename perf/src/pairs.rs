//! The epoll engine behind `pairs` and `fanout`: a few threads (by default one per CPU this process may run on, at most
//! four), each owning a subset of the publisher and subscriber connections over non-blocking sockets.
//!
//! With one blocking thread per client, hundreds of clients on a pinned load generator spend their time
//! waiting for the scheduler, and that wait dominates the tail latency. Here a thread sleeps in
//! `epoll_wait` until a socket is readable or the next send is due (a timerfd armed at the earliest
//! deadline of a min-heap of publisher deadlines), decodes whatever arrived incrementally, answers QoS 1/2
//! handshakes inline and sends what is due.
//!
//! Pacing is open-loop as in [`crate::engine`]: a publisher that falls behind (window full, slow socket)
//! sends its backlog at once. Publishers are spread evenly over one send period so that a hundred of them
//! at the same rate do not all fire in the same microsecond. Latency, loss and duplicates are measured
//! exactly as in the blocking engine, and the report is the same [`RunReport`].
//!
//! Over TLS each connection's session is driven sans I/O in its thread: bytes read from the socket go
//! through [`ClientConnection::read_tls`] and come out as plain text; output is encrypted into the session
//! and written from it as the socket takes it.

use crate::client::{encode_publish, Client, Parts};
use crate::conn::Epoll;
use crate::engine::{self, Counters, Hists, Plan, Probes, RunReport};
use crate::payload::{self, now_ns, Stamp};
use crate::stats::{self, Received, SeqSet};
use anyhow::{anyhow, bail, Result};
use rustls::ClientConnection;
use shardmq_wire::{decode, encode, Ack, Disconnect, Packet, PacketId, Protocol, QoS, ReasonCode};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::thread;
use std::time::Instant;

/// One thread per CPU in this process's affinity mask, at most four.
pub fn default_threads() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4)
}

const TIMER_TOKEN: u64 = u64::MAX;
/// Longest sleep in `epoll_wait`, so a stop request is noticed promptly.
const MAX_WAIT_MS: i32 = 10;

/// A non-blocking connection with an incremental read buffer and a pending-output buffer.
struct Conn {
    sock: TcpStream,
    /// The TLS session over `sock`, if any: `rbuf` and `wbuf` hold plain text.
    tls: Option<Box<ClientConnection>>,
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    wbuf: Vec<u8>,
    /// EPOLLOUT is registered (output is pending).
    want_out: bool,
    dead: bool,
    token: u64,
}

impl Conn {
    fn new(parts: Parts, ep: &Epoll, token: u64) -> Result<Conn> {
        let Parts { sock, tls, left } = parts;
        sock.set_nonblocking(true)?;
        let mut rbuf = vec![0; (64 * 1024).max(left.len() * 2)];
        rbuf[..left.len()].copy_from_slice(&left);
        ep.ctl(libc::EPOLL_CTL_ADD, &sock, libc::EPOLLIN as u32, token)?;
        let mut c = Conn {
            sock,
            tls,
            end: left.len(),
            rbuf,
            start: 0,
            wbuf: Vec::new(),
            want_out: false,
            dead: false,
            token,
        };
        // Plain text the session decrypted during the handshake but nobody read yet: level-triggered epoll
        // would not report it, the socket being empty.
        c.take_plain()?;
        c.flush(ep)?;
        Ok(c)
    }

    /// Moves the plain text the TLS session holds into `rbuf`, growing it as needed (what one `read_tls`
    /// brought in, so bounded).
    fn take_plain(&mut self) -> Result<()> {
        let Some(tls) = self.tls.as_mut() else { return Ok(()) };
        loop {
            if self.end == self.rbuf.len() {
                self.rbuf.resize(self.rbuf.len() * 2, 0);
            }
            match tls.reader().read(&mut self.rbuf[self.end..]) {
                Ok(0) => bail!("connection closed by broker (TLS close_notify)"),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads what the socket has, until it would block or the buffer is full (level-triggered epoll
    /// reports the rest).
    fn fill(&mut self) -> Result<()> {
        self.rbuf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.end == self.rbuf.len() {
            self.rbuf.resize(self.rbuf.len() * 2, 0);
        }
        if self.tls.is_some() {
            return self.fill_tls();
        }
        while self.end < self.rbuf.len() {
            match self.sock.read(&mut self.rbuf[self.end..]) {
                Ok(0) => bail!("connection closed by broker"),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// [`Conn::fill`] over TLS: a bounded number of socket reads per call (level-triggered epoll reports
    /// the rest), each decrypted and its plain text taken at once, so the session's buffer never fills.
    fn fill_tls(&mut self) -> Result<()> {
        for _ in 0..16 {
            let Some(tls) = self.tls.as_mut() else { return Ok(()) };
            match tls.read_tls(&mut self.sock) {
                Ok(0) => bail!("connection closed by broker"),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            tls.process_new_packets().map_err(|e| anyhow!("TLS: {e}"))?;
            self.take_plain()?;
        }
        Ok(())
    }

    /// Hands the next complete buffered packet to `f`; `None` when no complete packet is buffered.
    fn next<R>(&mut self, protocol: Protocol, f: impl FnOnce(&Packet<'_>) -> R) -> Result<Option<R>> {
        let (r, n) = match decode(
            &self.rbuf[self.start..self.end],
            Some(protocol),
            shardmq_wire::MAX_REMAINING_LENGTH,
        )? {
            Some((p, n)) => (f(&p), n),
            None => return Ok(None),
        };
        self.start += n;
        Ok(Some(r))
    }

    /// Writes as much pending output as the socket takes and (un)registers EPOLLOUT for the rest.
    fn flush(&mut self, ep: &Epoll) -> Result<()> {
        if self.tls.is_some() {
            self.flush_tls()?;
        } else {
            self.flush_plain()?;
        }
        let want = !self.wbuf.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write());
        if want != self.want_out {
            let events = libc::EPOLLIN as u32 | if want { libc::EPOLLOUT as u32 } else { 0 };
            ep.ctl(libc::EPOLL_CTL_MOD, &self.sock, events, self.token)?;
            self.want_out = want;
        }
        Ok(())
    }

    /// Encrypts `wbuf` into the TLS session as far as its buffer limit allows and writes the records out
    /// until the socket would block.
    fn flush_tls(&mut self) -> Result<()> {
        let Some(tls) = self.tls.as_mut() else { return Ok(()) };
        let mut off = 0;
        loop {
            if off < self.wbuf.len() {
                off += tls.writer().write(&self.wbuf[off..])?;
            }
            if !tls.wants_write() {
                break;
            }
            match tls.write_tls(&mut self.sock) {
                Ok(0) => bail!("write returned 0"),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.wbuf.drain(..off);
        Ok(())
    }

    fn flush_plain(&mut self) -> Result<()> {
        let mut off = 0;
        while off < self.wbuf.len() {
            match self.sock.write(&self.wbuf[off..]) {
                Ok(0) => bail!("write returned 0"),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.wbuf.drain(..off);
        Ok(())
    }

    fn ack(
        &mut self,
        kind: fn(Ack<'static>) -> Packet<'static>,
        id: PacketId,
        protocol: Protocol,
    ) -> Result<()> {
        encode(&kind(Ack::new(id, ReasonCode::SUCCESS)), protocol, &mut self.wbuf)?;
        Ok(())
    }

    fn kill(&mut self, ep: &Epoll) {
        if !self.dead {
            self.dead = true;
            let _ = ep.ctl(libc::EPOLL_CTL_DEL, &self.sock, 0, self.token);
        }
    }
}

struct Pub {
    id: u32,
    conn: Conn,
    topic: String,
    /// CLOCK_MONOTONIC ns of message 0, and ns between messages.
    start_ns: u64,
    period_ns: f64,
    max_msgs: Option<u64>,
    seq: u32,
    next_id: u16,
    window: usize,
    inflight: usize,
    /// Sequence number behind each packet id still in flight.
    seq_of: Vec<u32>,
    acked: SeqSet,
    body: Vec<u8>,
    out: Vec<u8>,
    /// Has a deadline in the heap.
    scheduled: bool,
    stopped: bool,
}

impl Pub {
    fn due_ns(&self) -> u64 {
        self.start_ns + (f64::from(self.seq) * self.period_ns) as u64
    }
}

struct Sub {
    /// Index into the plan's subscribers (and the histograms).
    index: usize,
    conn: Conn,
    received: Received,
    count: u64,
}

enum Ev {
    Msg(Option<Stamp>, QoS, Option<PacketId>),
    Rel(PacketId),
    Done(PacketId, ReasonCode),
    Rec(PacketId, ReasonCode),
    Disconnect(ReasonCode),
    Other,
}

fn event_of(p: &Packet<'_>) -> Ev {
    match p {
        Packet::Publish(m) => Ev::Msg(payload::decode(m.payload), m.qos, m.packet_id),
        Packet::PubRel(a) => Ev::Rel(a.packet_id),
        Packet::PubAck(a) | Packet::PubComp(a) => Ev::Done(a.packet_id, a.reason),
        Packet::PubRec(a) => Ev::Rec(a.packet_id, a.reason),
        Packet::Disconnect(d) => Ev::Disconnect(d.reason),
        _ => Ev::Other,
    }
}

/// A CLOCK_MONOTONIC timerfd armed at absolute deadlines.
struct Timer {
    fd: OwnedFd,
    armed_at: u64,
}

impl Timer {
    fn new() -> io::Result<Timer> {
        // SAFETY: plain timerfd_create; the fd is owned immediately.
        let fd =
            unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Timer { fd: unsafe { OwnedFd::from_raw_fd(fd) }, armed_at: 0 })
    }

    /// Arms the timer at `at_ns` (CLOCK_MONOTONIC); 0 disarms it.
    fn arm(&mut self, at_ns: u64) {
        if at_ns == self.armed_at {
            return;
        }
        self.armed_at = at_ns;
        let ts =
            libc::timespec { tv_sec: (at_ns / 1_000_000_000) as _, tv_nsec: (at_ns % 1_000_000_000) as _ };
        let spec = libc::itimerspec { it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 }, it_value: ts };
        // SAFETY: valid fd and itimerspec; the old value is not wanted.
        unsafe {
            libc::timerfd_settime(self.fd.as_raw_fd(), libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
    }

    fn clear(&mut self) {
        let mut n = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `n`; non-blocking, so an empty timer just fails.
        unsafe { libc::read(self.fd.as_raw_fd(), n.as_mut_ptr() as *mut libc::c_void, 8) };
        self.armed_at = 0;
    }
}

struct Worker<'a> {
    plan: &'a Plan,
    c: &'a Counters,
    hists: &'a [Mutex<Hists>],
    protocol: Protocol,
    ep: Epoll,
    timer: Timer,
    pubs: Vec<Pub>,
    subs: Vec<Sub>,
    /// (due ns, publisher slot), earliest first.
    deadlines: BinaryHeap<Reverse<(u64, usize)>>,
    pubs_stopped: bool,
}

/// A connection handed to a worker: plan index, the connection, Receive Maximum.
type Handoff = (usize, Parts, u16);

impl Worker<'_> {
    fn stop_pub(&mut self, k: usize) {
        let p = &mut self.pubs[k];
        if !p.stopped {
            p.stopped = true;
            self.c.publishers_done.fetch_add(1, Relaxed);
        }
    }

    /// Sends every message of publisher `k` that is due and fits the window, then schedules the next one.
    fn pump(&mut self, k: usize) -> Result<()> {
        let qos = self.plan.qos;
        let p = &mut self.pubs[k];
        let now = now_ns();
        while !p.stopped {
            if p.max_msgs.is_some_and(|m| u64::from(p.seq) >= m) {
                break;
            }
            let due = p.due_ns();
            if due > now {
                if !p.scheduled {
                    p.scheduled = true;
                    self.deadlines.push(Reverse((due, k)));
                }
                break;
            }
            let pid = if qos == QoS::AtMostOnce {
                None
            } else {
                if p.inflight >= p.window {
                    // An acknowledgement calls pump again.
                    break;
                }
                p.next_id = p.next_id % 65535 + 1;
                p.seq_of[usize::from(p.next_id)] = p.seq;
                p.inflight += 1;
                Some(PacketId(p.next_id))
            };
            payload::write_header(&mut p.body, Stamp { publisher: p.id, seq: p.seq, sent_ns: now_ns() });
            encode_publish(&mut p.out, self.protocol, &p.topic, qos, pid, &p.body)?;
            p.conn.wbuf.extend_from_slice(&p.out);
            p.seq += 1;
            self.c.sent.fetch_add(1, Relaxed);
        }
        let done = !p.stopped && p.max_msgs.is_some_and(|m| u64::from(p.seq) >= m);
        p.conn.flush(&self.ep)?;
        if done {
            self.stop_pub(k);
        }
        Ok(())
    }

    fn on_pub(&mut self, k: usize, events: u32) -> Result<()> {
        if events & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
            self.pubs[k].conn.fill()?;
            let mut freed = false;
            loop {
                let p = &mut self.pubs[k];
                let Some(ev) = p.conn.next(self.protocol, event_of)? else { break };
                let mut release = |p: &mut Pub, id: PacketId, ok: bool| {
                    p.inflight = p.inflight.saturating_sub(1);
                    if ok {
                        p.acked.insert(p.seq_of[usize::from(id.0)]);
                        self.c.acked.fetch_add(1, Relaxed);
                    }
                    freed = true;
                };
                match ev {
                    Ev::Done(id, reason) => release(p, id, !reason.is_error()),
                    Ev::Rec(id, reason) if reason.is_error() => release(p, id, false),
                    Ev::Rec(id, _) => p.conn.ack(Packet::PubRel, id, self.protocol)?,
                    Ev::Disconnect(r) => bail!("DISCONNECT from broker, reason 0x{:02x}", r.0),
                    _ => {}
                }
            }
            if freed {
                // pump flushes too.
                return self.pump(k);
            }
        }
        self.pubs[k].conn.flush(&self.ep)
    }

    fn on_sub(&mut self, k: usize, events: u32) -> Result<()> {
        if events & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
            let s = &mut self.subs[k];
            s.conn.fill()?;
            while let Some(ev) = s.conn.next(self.protocol, event_of)? {
                match ev {
                    Ev::Msg(stamp, qos, id) => {
                        let now = now_ns();
                        s.count += 1;
                        self.c.delivered.fetch_add(1, Relaxed);
                        if let Some(st) = stamp {
                            let us = now.saturating_sub(st.sent_ns) / 1000;
                            if let Ok(mut h) = self.hists[s.index].lock() {
                                stats::record(&mut h.total, us);
                                stats::record(&mut h.interval, us);
                            }
                            if !s.received.entry(st.publisher).or_default().insert(st.seq) {
                                self.c.dups.fetch_add(1, Relaxed);
                            }
                        }
                        match (qos, id) {
                            (QoS::AtLeastOnce, Some(id)) => s.conn.ack(Packet::PubAck, id, self.protocol)?,
                            (QoS::ExactlyOnce, Some(id)) => s.conn.ack(Packet::PubRec, id, self.protocol)?,
                            _ => {}
                        }
                    }
                    Ev::Rel(id) => s.conn.ack(Packet::PubComp, id, self.protocol)?,
                    Ev::Disconnect(r) => bail!("DISCONNECT from broker, reason 0x{:02x}", r.0),
                    _ => {}
                }
            }
        }
        self.subs[k].conn.flush(&self.ep)
    }

    fn run(&mut self) {
        for k in 0..self.pubs.len() {
            if let Err(e) = self.pump(k) {
                self.pub_failed(k, e);
            }
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        while !self.c.stop_read.load(Relaxed) {
            if !self.pubs_stopped && self.c.stop_pub.load(Relaxed) {
                self.pubs_stopped = true;
                for k in 0..self.pubs.len() {
                    self.stop_pub(k);
                }
                self.deadlines.clear();
            }
            let now = now_ns();
            while let Some(&Reverse((due, k))) = self.deadlines.peek() {
                if due > now {
                    break;
                }
                self.deadlines.pop();
                self.pubs[k].scheduled = false;
                if let Err(e) = self.pump(k) {
                    self.pub_failed(k, e);
                }
            }
            if let Some(&Reverse((due, _))) = self.deadlines.peek() {
                self.timer.arm(due);
            }
            let n = self.ep.wait(&mut events, MAX_WAIT_MS);
            for ev in &events[..n] {
                let (token, flags) = (ev.u64, ev.events);
                if token == TIMER_TOKEN {
                    self.timer.clear();
                    continue;
                }
                let k = (token >> 1) as usize;
                if token & 1 == 0 {
                    if self.pubs[k].conn.dead {
                        continue;
                    }
                    if let Err(e) = self.on_pub(k, flags) {
                        self.pub_failed(k, e);
                    }
                } else {
                    if self.subs[k].conn.dead {
                        continue;
                    }
                    if let Err(e) = self.on_sub(k, flags) {
                        self.c.error(&format!("subscriber {}", self.subs[k].index), e);
                        self.subs[k].conn.kill(&self.ep);
                    }
                }
            }
        }
        let disconnect = Packet::Disconnect(Disconnect::default());
        let conns =
            self.pubs.iter_mut().map(|p| &mut p.conn).chain(self.subs.iter_mut().map(|s| &mut s.conn));
        for conn in conns.filter(|c| !c.dead) {
            if encode(&disconnect, self.protocol, &mut conn.wbuf).is_ok() {
                if let Some(tls) = conn.tls.as_mut() {
                    // Behind the DISCONNECT once `wbuf` is encrypted: queue it after.
                    let _ = tls.writer().write_all(&conn.wbuf);
                    conn.wbuf.clear();
                    tls.send_close_notify();
                }
                let _ = conn.flush(&self.ep);
            }
        }
    }

    /// As in the blocking engine, a publisher error stops all publishing: nothing more is acknowledged on
    /// that connection, and the run is broken anyway.
    fn pub_failed(&mut self, k: usize, e: anyhow::Error) {
        self.c.error(&format!("publisher {}", self.pubs[k].id), e);
        self.pubs[k].conn.kill(&self.ep);
        self.stop_pub(k);
        self.c.stop_pub.store(true, Relaxed);
    }
}

/// Per-thread results: (publisher id, acknowledged sequence numbers) and (subscriber index, what it
/// received, how many messages).
type Results = (Vec<(u32, SeqSet)>, Vec<(usize, Received, u64)>);

#[allow(clippy::too_many_arguments)]
fn worker(
    plan: &Plan,
    c: &Counters,
    hists: &[Mutex<Hists>],
    pubs: Vec<Handoff>,
    subs: Vec<Handoff>,
    t0_ns: u64,
) -> Result<Results> {
    let ep = Epoll::new()?;
    let timer = Timer::new()?;
    ep.ctl(libc::EPOLL_CTL_ADD, &timer.fd, libc::EPOLLIN as u32, TIMER_TOKEN)?;
    let n_pubs = plan.publishers.len().max(1) as f64;
    let mut w = Worker {
        plan,
        c,
        hists,
        protocol: plan.protocol,
        ep,
        timer,
        pubs: Vec::new(),
        subs: Vec::new(),
        deadlines: BinaryHeap::new(),
        pubs_stopped: false,
    };
    for (k, (i, parts, recv_max)) in pubs.into_iter().enumerate() {
        let spec = &plan.publishers[i];
        let period_ns = spec.rate.map_or(0.0, |r| 1e9 / r);
        let conn = Conn::new(parts, &w.ep, (k as u64) << 1)?;
        w.pubs.push(Pub {
            id: i as u32,
            conn,
            topic: spec.topic.clone(),
            // Phases spread evenly over one period.
            start_ns: t0_ns + (period_ns * i as f64 / n_pubs) as u64,
            period_ns,
            max_msgs: spec.max_msgs,
            seq: 0,
            next_id: 0,
            window: usize::from(plan.window.min(recv_max).max(1)),
            inflight: 0,
            seq_of: vec![0; 65536],
            acked: SeqSet::default(),
            body: payload::encode(Stamp { publisher: i as u32, seq: 0, sent_ns: 0 }, plan.payload),
            out: Vec::new(),
            scheduled: false,
            stopped: false,
        });
    }
    for (k, (index, parts, _)) in subs.into_iter().enumerate() {
        let conn = Conn::new(parts, &w.ep, ((k as u64) << 1) | 1)?;
        w.subs.push(Sub { index, conn, received: Received::new(), count: 0 });
    }
    w.run();
    Ok((
        w.pubs.into_iter().map(|p| (p.id, p.acked)).collect(),
        w.subs.into_iter().map(|s| (s.index, s.received, s.count)).collect(),
    ))
}

/// Runs `plan` on `threads` epoll threads (0: [`default_threads`]).
pub fn run(plan: &Plan, threads: usize) -> Result<RunReport> {
    let c = Counters::default();
    let tag = format!("smq{}", std::process::id());
    let threads = if threads == 0 { default_threads() } else { threads };
    let threads = threads.clamp(1, plan.publishers.len().max(plan.subscribers.len()).max(1));
    let mut pubs: Vec<Vec<Handoff>> = (0..threads).map(|_| Vec::new()).collect();
    let mut subs: Vec<Vec<Handoff>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, filter) in plan.subscribers.iter().enumerate() {
        let mut cl = Client::connect(plan.sub_addr(i), &format!("{tag}-s{i}"), plan.protocol, &plan.dial)?;
        cl.subscribe(filter, plan.qos)?;
        let rm = cl.server_receive_max;
        subs[i % threads].push((i, cl.into_parts()?, rm));
    }
    for i in 0..plan.publishers.len() {
        let cl = Client::connect(plan.addr, &format!("{tag}-p{i}"), plan.protocol, &plan.dial)?;
        let rm = cl.server_receive_max;
        pubs[i % threads].push((i, cl.into_parts()?, rm));
    }
    let hists: Vec<Mutex<Hists>> = plan.subscribers.iter().map(|_| Hists::new()).collect();
    let probes = Probes::start(plan);
    let t0 = Instant::now();
    let t0_ns = now_ns();

    let (results, window, at_stop) = thread::scope(|s| {
        let c = &c;
        let hists = &hists;
        let handles: Vec<_> = pubs
            .into_iter()
            .zip(subs)
            .map(|(p, sb)| s.spawn(move || worker(plan, c, hists, p, sb, t0_ns)))
            .collect();
        engine::wait_for_end(plan, t0, c, hists);
        c.stop_pub.store(true, Relaxed);
        let window = t0.elapsed();
        let at_stop = (c.sent.load(Relaxed), c.delivered.load(Relaxed));
        engine::drain(plan, c);
        c.stop_read.store(true, Relaxed);
        let results: Vec<Result<Results>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("worker panicked"))))
            .collect();
        (results, window, at_stop)
    });

    let mut acked: HashMap<u32, SeqSet> =
        (0..plan.publishers.len() as u32).map(|i| (i, SeqSet::default())).collect();
    let mut received = vec![Received::new(); plan.subscribers.len()];
    let mut counts = vec![0u64; plan.subscribers.len()];
    for r in results {
        match r {
            Ok((ps, ss)) => {
                acked.extend(ps);
                for (i, rec, n) in ss {
                    received[i] = rec;
                    counts[i] = n;
                }
            }
            Err(e) => c.error("worker", e),
        }
    }
    Ok(engine::report(plan, c, &hists, &received, counts, &acked, window, at_stop, probes))
}
