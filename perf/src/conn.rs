//! `conn`: many idle MQTT connections from one process. A few threads each run a level-triggered epoll
//! loop over non-blocking sockets: open at the requested pace, send CONNECT, wait for CONNACK, then hold
//! the connection open and watch for the broker dropping it. Nothing is published.

use crate::client::connect_packet;
use crate::net::{source_for, start_connect};
use crate::procfs;
use crate::stats::{self, LatencySummary};
use anyhow::{bail, Result};
use serde::Serialize;
use shardmq_wire::{decode, encode, Packet, Protocol};
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

pub struct ConnPlan {
    pub addr: SocketAddrV4,
    pub protocol: Protocol,
    pub count: u64,
    /// New connections per second, all threads together.
    pub rate: f64,
    pub hold: Duration,
    pub threads: usize,
    /// TCP handshake plus CONNACK must finish within this.
    pub timeout: Duration,
    pub broker_pid: Option<u32>,
    pub progress: bool,
    /// User name and password for every CONNECT (this engine speaks plain TCP only).
    pub username: Option<String>,
    pub password: Option<String>,
}

impl ConnPlan {
    fn credentials(&self) -> (Option<&str>, Option<&[u8]>) {
        (self.username.as_deref(), self.password.as_deref().map(str::as_bytes))
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ConnBroker {
    pub pid: u32,
    pub rss_before_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
    pub rss_bytes_per_conn: Option<f64>,
    /// Kernel slab is host-wide: it includes this tool's half of every socket too.
    pub slab_before_kb: Option<u64>,
    pub slab_after_kb: Option<u64>,
    pub slab_bytes_per_conn: Option<f64>,
    pub cpu_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnReport {
    pub scenario: String,
    pub protocol: u8,
    pub requested: u64,
    pub connected: u64,
    /// Seconds from the first connect to the last CONNACK.
    pub open_s: f64,
    pub connect_rate: f64,
    /// Failed attempts by reason: refused, timeout, reset, closed, connack_0xNN, local_errno_N, ...
    pub failures: BTreeMap<String, u64>,
    /// Established connections the broker closed while they were held.
    pub dropped_during_hold: u64,
    pub held_s: f64,
    /// From connect() to CONNACK.
    pub connect_latency_us: LatencySummary,
    pub broker: Option<ConnBroker>,
}

#[derive(Default)]
struct Shared {
    connected: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    /// Threads whose every attempt has succeeded or failed.
    settled: AtomicUsize,
    stop: AtomicBool,
    /// Microseconds after start of the last CONNACK.
    last_ack_us: AtomicU64,
}

#[derive(PartialEq)]
enum State {
    Connecting,
    AwaitAck,
    Up,
}

struct Conn {
    fd: OwnedFd,
    state: State,
    started: Instant,
    buf: Vec<u8>,
}

pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: plain epoll_create1; the fd is owned immediately.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Epoll(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    pub(crate) fn ctl(&self, op: libc::c_int, fd: &impl AsRawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: both fds are open and `ev` is valid for the call.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
        // SAFETY: `events` is a writable buffer of the stated length.
        let n = unsafe {
            libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, timeout_ms)
        };
        n.max(0) as usize
    }
}

fn errno_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ETIMEDOUT) => "timeout".into(),
        Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "local_out_of_fds".into(),
        Some(libc::EADDRNOTAVAIL) => "local_no_ports".into(),
        Some(n) => format!("errno_{n}"),
        None => "other".into(),
    }
}

struct Worker<'a> {
    t: usize,
    plan: &'a ConnPlan,
    shared: &'a Shared,
    ep: Epoll,
    conns: Vec<Option<Conn>>,
    failures: BTreeMap<String, u64>,
    latency: hdrhistogram::Histogram<u64>,
    pending: usize,
    t0: Instant,
}

impl Worker<'_> {
    fn fail(&mut self, slot: usize, reason: String) {
        if let Some(c) = self.conns[slot].take() {
            if c.state == State::Up {
                self.shared.dropped.fetch_add(1, Relaxed);
                return;
            }
            self.pending -= 1;
        }
        *self.failures.entry(reason).or_default() += 1;
        self.shared.failed.fetch_add(1, Relaxed);
    }

    fn open(&mut self, index: u64) {
        let slot = self.conns.len();
        match start_connect(source_for(self.plan.addr, index), self.plan.addr, true) {
            Ok(fd) => {
                let events = (libc::EPOLLOUT | libc::EPOLLIN) as u32;
                if let Err(e) = self.ep.ctl(libc::EPOLL_CTL_ADD, &fd, events, slot as u64) {
                    self.conns.push(None);
                    *self.failures.entry(errno_reason(&e)).or_default() += 1;
                    self.shared.failed.fetch_add(1, Relaxed);
                    return;
                }
                self.pending += 1;
                let c = Conn { fd, state: State::Connecting, started: Instant::now(), buf: Vec::new() };
                self.conns.push(Some(c));
            }
            Err(e) => {
                self.conns.push(None);
                *self.failures.entry(errno_reason(&e)).or_default() += 1;
                self.shared.failed.fetch_add(1, Relaxed);
            }
        }
    }

    fn event(&mut self, slot: usize, events: u32) {
        let Some(c) = self.conns[slot].as_mut() else { return };
        match c.state {
            State::Connecting => {
                let mut err: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: `err`/`len` are valid out-parameters for SO_ERROR.
                unsafe {
                    libc::getsockopt(
                        c.fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        &mut err as *mut _ as *mut libc::c_void,
                        &mut len,
                    )
                };
                if err != 0 {
                    return self.fail(slot, errno_reason(&io::Error::from_raw_os_error(err)));
                }
                if events & libc::EPOLLOUT as u32 == 0 {
                    return;
                }
                let id = format!("smqc{}-{}-{slot}", std::process::id(), self.t);
                let mut out = Vec::with_capacity(64);
                let _ = encode(
                    &connect_packet(&id, self.plan.protocol, self.plan.credentials()),
                    self.plan.protocol,
                    &mut out,
                );
                // SAFETY: `out` is a valid buffer; a fresh socket's send buffer always fits ~40 bytes.
                let n =
                    unsafe { libc::write(c.fd.as_raw_fd(), out.as_ptr() as *const libc::c_void, out.len()) };
                if n != out.len() as isize {
                    return self.fail(slot, errno_reason(&io::Error::last_os_error()));
                }
                c.state = State::AwaitAck;
                let _ = self.ep.ctl(libc::EPOLL_CTL_MOD, &c.fd, libc::EPOLLIN as u32, slot as u64);
            }
            State::AwaitAck | State::Up => {
                let mut tmp = [0u8; 512];
                // SAFETY: `tmp` is a valid writable buffer.
                let n =
                    unsafe { libc::read(c.fd.as_raw_fd(), tmp.as_mut_ptr() as *mut libc::c_void, tmp.len()) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                        self.fail(slot, errno_reason(&e));
                    }
                    return;
                }
                if n == 0 {
                    return self.fail(slot, "closed".into());
                }
                if c.state == State::Up {
                    // Anything a held connection receives is ignored; only its closing matters.
                    return;
                }
                c.buf.extend_from_slice(&tmp[..n as usize]);
                let reason = match decode(&c.buf, Some(self.plan.protocol), 1 << 20) {
                    Ok(None) => return,
                    Ok(Some((Packet::ConnAck(a), _))) => a.reason,
                    Ok(Some(_)) => return self.fail(slot, "unexpected_packet".into()),
                    Err(_) => return self.fail(slot, "malformed".into()),
                };
                if reason.is_error() {
                    return self.fail(slot, format!("connack_0x{:02x}", reason.0));
                }
                c.state = State::Up;
                c.buf = Vec::new();
                stats::record(&mut self.latency, c.started.elapsed().as_micros() as u64);
                self.pending -= 1;
                self.shared.connected.fetch_add(1, Relaxed);
                self.shared.last_ack_us.fetch_max(self.t0.elapsed().as_micros() as u64, Relaxed);
            }
        }
    }

    fn expire(&mut self) {
        let timeout = self.plan.timeout;
        let late: Vec<usize> = (0..self.conns.len())
            .filter(|&i| {
                self.conns[i].as_ref().is_some_and(|c| c.state != State::Up && c.started.elapsed() > timeout)
            })
            .collect();
        for slot in late {
            self.fail(slot, "timeout".into());
        }
    }

    fn run(mut self) -> (BTreeMap<String, u64>, hdrhistogram::Histogram<u64>) {
        let k = self.plan.threads as u64;
        let mine = (self.plan.count + k - 1 - self.t as u64) / k;
        let rate = self.plan.rate / k as f64;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut opened = 0u64;
        let mut settled = false;
        let mut last_expire = Instant::now();
        while !self.shared.stop.load(Relaxed) {
            if opened < mine {
                let due = ((self.t0.elapsed().as_secs_f64() * rate) as u64 + 1).min(mine);
                while opened < due {
                    self.open(self.t as u64 + opened * k);
                    opened += 1;
                }
            } else if !settled && self.pending == 0 {
                settled = true;
                self.shared.settled.fetch_add(1, Relaxed);
            }
            let n = self.ep.wait(&mut events, if opened < mine { 1 } else { 50 });
            for ev in &events[..n] {
                let (slot, bits) = (ev.u64 as usize, ev.events);
                self.event(slot, bits);
            }
            if last_expire.elapsed() > Duration::from_millis(100) {
                last_expire = Instant::now();
                self.expire();
            }
        }
        // A polite goodbye so the broker counts a normal disconnect, not a network error.
        for c in self.conns.iter().flatten().filter(|c| c.state == State::Up) {
            let bye = [0xE0u8, 0x00];
            // SAFETY: `bye` is a valid 2-byte buffer.
            unsafe { libc::write(c.fd.as_raw_fd(), bye.as_ptr() as *const libc::c_void, 2) };
        }
        (self.failures, self.latency)
    }
}

pub fn run(plan: &ConnPlan) -> Result<ConnReport> {
    let limit = crate::net::raise_nofile_limit();
    if plan.count + 64 > limit {
        bail!("--count {} needs more open files than the limit {limit} allows", plan.count);
    }
    if plan.rate <= 0.0 || plan.threads == 0 {
        bail!("--rate and --threads must be positive");
    }
    let shared = Shared::default();
    let before = (plan.broker_pid.and_then(procfs::read_rss_kb), procfs::read_slab_kb());
    let cpu_before = plan.broker_pid.and_then(procfs::read_cpu_s);
    let t0 = Instant::now();
    // Opening cannot legitimately take longer than its schedule plus one handshake timeout.
    let open_bound =
        Duration::from_secs_f64(plan.count as f64 / plan.rate) + plan.timeout + Duration::from_secs(1);
    let mut after = (None, None);
    let mut held = Duration::ZERO;
    let results = thread::scope(|s| {
        let handles: Vec<_> = (0..plan.threads)
            .map(|t| {
                let shared = &shared;
                s.spawn(move || -> Result<_> {
                    let w = Worker {
                        t,
                        plan,
                        shared,
                        ep: Epoll::new()?,
                        conns: Vec::new(),
                        failures: BTreeMap::new(),
                        latency: stats::new_histogram(),
                        pending: 0,
                        t0,
                    };
                    Ok(w.run())
                })
            })
            .collect();
        let _stop = crate::guard::StopOnDrop(&shared.stop);
        let mut last_line = Instant::now();
        let mut hold_start: Option<Instant> = None;
        loop {
            thread::sleep(Duration::from_millis(50));
            if hold_start.is_none()
                && (shared.settled.load(Relaxed) == plan.threads || t0.elapsed() > open_bound)
            {
                hold_start = Some(Instant::now());
            }
            if hold_start.is_some_and(|h| h.elapsed() >= plan.hold) {
                break;
            }
            if plan.progress && last_line.elapsed() >= Duration::from_secs(1) {
                last_line = Instant::now();
                crate::guard::progress(format_args!(
                    "[{:6.1}s] connected {:>7} failed {:>6} dropped {:>6}{}",
                    t0.elapsed().as_secs_f64(),
                    shared.connected.load(Relaxed),
                    shared.failed.load(Relaxed),
                    shared.dropped.load(Relaxed),
                    if hold_start.is_some() { " (holding)" } else { "" }
                ));
            }
        }
        held = hold_start.map(|h| h.elapsed()).unwrap_or_default();
        after = (plan.broker_pid.and_then(procfs::read_rss_kb), procfs::read_slab_kb());
        shared.stop.store(true, Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
            .collect::<Vec<_>>()
    });
    let mut failures = BTreeMap::new();
    let mut latency = stats::new_histogram();
    for r in results {
        let (f, h) = r?;
        for (k, v) in f {
            *failures.entry(k).or_default() += v;
        }
        let _ = latency.add(&h);
    }
    let connected = shared.connected.load(Relaxed);
    let open_s = shared.last_ack_us.load(Relaxed) as f64 / 1e6;
    let per_conn = |b: Option<u64>, a: Option<u64>| match (b, a) {
        (Some(b), Some(a)) if connected > 0 => Some((a as f64 - b as f64) * 1024.0 / connected as f64),
        _ => None,
    };
    let broker = plan.broker_pid.map(|pid| ConnBroker {
        pid,
        rss_before_kb: before.0,
        rss_after_kb: after.0,
        rss_bytes_per_conn: per_conn(before.0, after.0),
        slab_before_kb: before.1,
        slab_after_kb: after.1,
        slab_bytes_per_conn: per_conn(before.1, after.1),
        cpu_s: cpu_before.zip(procfs::read_cpu_s(pid)).map(|(b, a)| a - b),
    });
    Ok(ConnReport {
        scenario: "conn".into(),
        protocol: plan.protocol.level(),
        requested: plan.count,
        connected,
        open_s,
        connect_rate: if open_s > 0.0 { connected as f64 / open_s } else { 0.0 },
        failures,
        dropped_during_hold: shared.dropped.load(Relaxed),
        held_s: held.as_secs_f64(),
        connect_latency_us: LatencySummary::of(&latency),
        broker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_connections_are_counted_by_reason() {
        // A port that was just free: nothing listens, so every attempt is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let r = run(&ConnPlan {
            addr: SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port),
            protocol: Protocol::V311,
            count: 20,
            rate: 1000.0,
            hold: Duration::ZERO,
            threads: 2,
            timeout: Duration::from_secs(2),
            broker_pid: None,
            progress: false,
            username: None,
            password: None,
        })
        .unwrap();
        assert_eq!(r.connected, 0);
        assert_eq!(r.failures.get("refused"), Some(&20), "{r:?}");
        assert!(r.broker.is_none());
    }
}
