//! The cluster thread: the sockets of a node's cluster gateway (one UDP socket for gossip, a TCP listener
//! for links from peers and the links this node dials, all on the cluster port) and its mesh endpoint,
//! driven by one epoll loop that feeds the sans-I/O [`Gateway`] and writes what it hands out.
//!
//! Why a thread of its own rather than a shard: the gateway matches every publish against the peers'
//! summaries and encodes forwards; on a shard, that work would delay the shard's own clients, and a shard
//! would need a second kind of socket in both backends. The thread costs one mesh hop per forwarded
//! publish (see the issue note for what it measured).
//!
//! What it does not do: anything protocol-shaped (that is the gateway and the zone, in `shardmq-cluster`).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shardmq_cluster::gateway::Gateway;
use shardmq_cluster::{LinkCmd, LinkId};
use shardmq_shard::core::Mesh;
use shardmq_shard::ShardId;

use crate::endpoint::MeshEndpoint;
use crate::sys;

/// The cluster port's sockets, bound before the node starts (the actual port is part of its identity).
pub struct ClusterSockets {
    udp: UdpSocket,
    listener: TcpListener,
    addr: SocketAddr,
}

impl ClusterSockets {
    /// Binds TCP first (port 0 resolves there), then UDP on the same port.
    pub fn bind(addr: SocketAddr) -> io::Result<ClusterSockets> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let udp = UdpSocket::bind(addr)?;
        listener.set_nonblocking(true)?;
        udp.set_nonblocking(true)?;
        Ok(ClusterSockets { udp, listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Mesh messages the gateway may leave unconsumed in the shards' inboxes before it stops reading links.
/// What waits beyond it stays in the link (the peer's backlog, which pauses its publishers): kept well
/// below a subscriber queue's headroom, so that what is already on its way when a subscriber congests
/// fits there.
const ENDPOINT_BACKLOG_LIMIT: usize = 2 * 1024;
/// Bytes read from one link per loop iteration at most (the others get their turn).
const READ_BUDGET: usize = 256 * 1024;

/// Mesh messages handled per loop iteration at most (one drain of the endpoint may bring far more).
const MESH_PER_ITERATION: usize = 4096;

/// An iteration that took longer (a flood on a slow host) has left the peers' heartbeats unread.
const BUSY_ITERATION: Duration = Duration::from_millis(200);

const TOKEN_UDP: u64 = u64::MAX;
const TOKEN_LISTENER: u64 = u64::MAX - 1;
const TOKEN_WAKE: u64 = u64::MAX - 2;

struct Link {
    stream: TcpStream,
    /// Bytes taken from the zone, not yet written.
    out: Vec<u8>,
    written: usize,
    connecting: bool,
    /// The interest registered with epoll (EPOLLOUT only while there is something to write).
    events: u32,
}

/// The cluster series the metrics endpoint exports: name, extra labels, counter (else gauge), help.
pub const CLUSTER_SERIES: [(&str, &str, bool, &str); 33] = [
    ("shardmq_cluster_links_up", "", false, "Peers this node has a link with."),
    ("shardmq_cluster_links_opened_total", "", true, "Links that completed their handshake."),
    ("shardmq_cluster_links_refused_total", "", true, "Link handshakes refused, by either side."),
    ("shardmq_cluster_forwarded_total", "", true, "Messages forwarded to peers (one per peer)."),
    ("shardmq_cluster_received_total", "", true, "Messages received from peers."),
    (
        "shardmq_cluster_dropped_total",
        "reason=\"not_connected\"",
        true,
        "Forwards or received messages dropped, by reason.",
    ),
    (
        "shardmq_cluster_dropped_total",
        "reason=\"backlog_full\"",
        true,
        "Forwards or received messages dropped, by reason.",
    ),
    (
        "shardmq_cluster_dropped_total",
        "reason=\"no_member\"",
        true,
        "Forwards or received messages dropped, by reason.",
    ),
    ("shardmq_cluster_malformed_total", "", true, "Frames from peers that did not decode."),
    ("shardmq_cluster_stored_unconfirmed_total", "", true, "Durability answers given up on."),
    ("shardmq_cluster_link_bytes_received_total", "", true, "Bytes read from cluster links."),
    ("shardmq_cluster_link_bytes_sent_total", "", true, "Bytes written to cluster links."),
    ("shardmq_cluster_registry_messages_sent_total", "", true, "Session registry messages sent to peers."),
    (
        "shardmq_cluster_registry_messages_received_total",
        "",
        true,
        "Session registry messages received from peers.",
    ),
    (
        "shardmq_cluster_registry_bytes_sent_total",
        "",
        true,
        "Bytes of session registry frames sent to peers.",
    ),
    (
        "shardmq_cluster_registry_bytes_received_total",
        "",
        true,
        "Bytes of session registry frames received from peers.",
    ),
    (
        "shardmq_cluster_sessions_sent_total",
        "",
        true,
        "Sessions sent to the node that took them over (frames).",
    ),
    (
        "shardmq_cluster_sessions_received_total",
        "",
        true,
        "Sessions received from the node that held them (frames).",
    ),
    ("shardmq_cluster_session_bytes_sent_total", "", true, "Bytes of session frames sent to peers."),
    (
        "shardmq_cluster_session_bytes_received_total",
        "",
        true,
        "Bytes of session frames received from peers.",
    ),
    (
        "shardmq_cluster_registrations_granted_total",
        "",
        true,
        "Connections of this node granted by their client id's owner.",
    ),
    (
        "shardmq_cluster_takeovers_total",
        "",
        true,
        "Registrations this node, as owner, gave to a node while another held the session.",
    ),
    (
        "shardmq_cluster_reregistrations_total",
        "",
        true,
        "Sessions this node re-registered with new owners after membership changes.",
    ),
    (
        "shardmq_cluster_registrations_handed_over_total",
        "",
        true,
        "Registrations this node handed to new owners after membership changes.",
    ),
    (
        "shardmq_cluster_registry_conflicts_resolved_total",
        "",
        true,
        "Conflicting registrations from elsewhere this node resolved.",
    ),
    (
        "shardmq_cluster_sessions_ended_total",
        "",
        true,
        "Sessions of this node ended because another node's registration superseded them.",
    ),
    (
        "shardmq_cluster_sessions_merged_total",
        "",
        true,
        "Sessions from another node whose messages were added to the session here (a conflict's loser, or late).",
    ),
    (
        "shardmq_cluster_messages_forwarded_after_move_total",
        "",
        true,
        "Messages that reached a session here after it moved, forwarded to its new node.",
    ),
    (
        "shardmq_cluster_sessions_dropped_total",
        "reason=\"late\"",
        true,
        "Sessions from or for another node dropped with their messages, by reason.",
    ),
    (
        "shardmq_cluster_sessions_dropped_total",
        "reason=\"not_linked\"",
        true,
        "Sessions from or for another node dropped with their messages, by reason.",
    ),
    (
        "shardmq_cluster_registrations",
        "",
        false,
        "Session registrations this node keeps as an owner or replica of their client ids.",
    ),
    (
        "shardmq_cluster_registry_tombstones",
        "",
        false,
        "Ended registrations this node keeps for a while (10 minutes, 524,288 at most), so that late copies stay ended.",
    ),
    (
        "shardmq_cluster_registry_tombstones_dropped_early_total",
        "",
        true,
        "Tombstones of ended registrations dropped before their 10 minutes because the node kept the most it keeps.",
    ),
];

/// The cluster thread's counters, published with relaxed stores once per loop iteration (at least once
/// a second) for the metrics thread, which only loads them.
#[derive(Debug)]
pub struct ClusterMetrics {
    values: [std::sync::atomic::AtomicU64; CLUSTER_SERIES.len()],
}

// Arrays of more than 32 elements have no derived `Default`.
impl Default for ClusterMetrics {
    fn default() -> Self {
        ClusterMetrics { values: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)) }
    }
}

impl ClusterMetrics {
    pub fn load(&self) -> [u64; CLUSTER_SERIES.len()] {
        std::array::from_fn(|i| self.values[i].load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Starts the cluster thread. It ends when the node shuts down (after telling the zone it leaves) or
/// when its loop fails; the join handle tells which.
pub fn spawn(
    sockets: ClusterSockets,
    gateway: Gateway,
    endpoint: MeshEndpoint<Mesh>,
    metrics: std::sync::Arc<ClusterMetrics>,
) -> io::Result<JoinHandle<io::Result<()>>> {
    std::thread::Builder::new().name("cluster".into()).spawn(move || {
        let mut lp = Loop::new(sockets, gateway, endpoint)?;
        lp.run(&metrics)
    })
}

struct Loop {
    ep: OwnedFd,
    sockets: ClusterSockets,
    gateway: Gateway,
    endpoint: MeshEndpoint<Mesh>,
    links: HashMap<LinkId, Link>,
    /// Reading links is paused while the shards have too much of the gateway's output unconsumed.
    reads_paused: bool,
    /// The shards' messages are left waiting while a peer is congested (see `Zone::congested`).
    mesh_paused: bool,
    /// Messages taken from the endpoint, handled [`MESH_PER_ITERATION`] at a time.
    inbox: VecDeque<(ShardId, Mesh)>,
    /// Times that happened (logged once, and in the counters at shutdown).
    congested_pauses: u64,
}

fn epoll_ctl(ep: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` lives across the call; fds are open.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Loop {
    fn new(sockets: ClusterSockets, gateway: Gateway, endpoint: MeshEndpoint<Mesh>) -> io::Result<Loop> {
        // SAFETY: plain epoll creation; owned right below.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nothing else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(raw) };
        let e = ep.as_raw_fd();
        let rd = libc::EPOLLIN as u32;
        epoll_ctl(e, libc::EPOLL_CTL_ADD, sockets.udp.as_raw_fd(), rd, TOKEN_UDP)?;
        epoll_ctl(e, libc::EPOLL_CTL_ADD, sockets.listener.as_raw_fd(), rd, TOKEN_LISTENER)?;
        epoll_ctl(e, libc::EPOLL_CTL_ADD, endpoint.wake_fd(), rd, TOKEN_WAKE)?;
        tracing::info!(addr = %sockets.addr, node = %gateway.identity().name, "cluster listening (TCP links, UDP gossip)");
        Ok(Loop {
            ep,
            sockets,
            gateway,
            endpoint,
            links: HashMap::new(),
            reads_paused: false,
            mesh_paused: false,
            inbox: VecDeque::new(),
            congested_pauses: 0,
        })
    }

    fn publish_metrics(&mut self, m: &ClusterMetrics) {
        let g = self.gateway.counters();
        let r = self.gateway.registrar_counters();
        let s = self.gateway.session_counters();
        let z = self.gateway.zone_mut();
        let up = z.peers_up().count() as u64;
        let z = z.counters();
        let values = [
            up,
            z.links_opened,
            z.links_refused,
            g.forwarded,
            g.received,
            g.dropped_not_connected,
            g.dropped_backlog_full,
            g.dropped_no_member,
            g.malformed,
            g.stored_unconfirmed,
            z.bytes_in,
            z.bytes_out,
            g.registry_out,
            g.registry_in,
            g.registry_bytes_out,
            g.registry_bytes_in,
            g.session_frames_out,
            g.session_frames_in,
            g.session_bytes_out,
            g.session_bytes_in,
            r.granted,
            r.takeovers,
            r.reregistrations,
            r.handed_over,
            r.conflicts_resolved,
            r.sessions_ended,
            s.sessions_merged,
            s.messages_forwarded,
            s.sessions_late,
            s.sessions_unsent,
            r.registrations,
            r.tombstones,
            r.tombstones_dropped_early,
        ];
        for (a, v) in m.values.iter().zip(values) {
            a.store(v, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn run(&mut self, metrics: &ClusterMetrics) -> io::Result<()> {
        let mut events: Vec<libc::epoll_event> = Vec::with_capacity(256);
        let mut buf = vec![0u8; 64 * 1024];
        // The last iteration handled messages from the shards.
        let mut took_mesh = false;
        loop {
            self.publish_metrics(metrics);
            let now = Instant::now();
            if self.endpoint.shutting_down() {
                self.leave(now);
                return Ok(());
            }
            let deadline = [self.gateway.zone_mut().poll_timeout(), self.gateway.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let mut ms =
                deadline.map_or(1000, |d| d.saturating_duration_since(now).as_millis().min(1000) as i32);
            if deadline.is_some_and(|d| d > now) && ms == 0 {
                ms = 1;
            }
            if self.endpoint.backlog() > 0 {
                ms = ms.min(1);
            }
            if !self.inbox.is_empty() && !self.mesh_paused {
                ms = 0;
            }
            // After a slice of the shards' messages more may come soon: a short sleep, during which those
            // that can wait (a registration answered ahead) do not wake this thread one by one.
            if took_mesh && ms > 0 {
                ms = ms.min(1);
                self.endpoint.sleep_briefly();
            } else if ms > 0 && !self.mesh_paused && !self.endpoint.sleep_deeply() {
                ms = 0;
            }
            // SAFETY: `events` has room for its capacity; the kernel writes at most that many.
            let n = unsafe {
                libc::epoll_wait(self.ep.as_raw_fd(), events.as_mut_ptr(), events.capacity() as i32, ms)
            };
            let woke = Instant::now();
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: epoll_wait initialised the first `n` entries.
            unsafe { events.set_len(n as usize) };
            let now = Instant::now();
            for ev in events.drain(..) {
                let (token, flags) = (ev.u64, ev.events);
                match token {
                    TOKEN_UDP => self.read_datagrams(&mut buf, now),
                    TOKEN_LISTENER => self.accept(now),
                    TOKEN_WAKE => {}
                    t => self.link_ready(LinkId(t), flags, &mut buf, now),
                }
            }
            // The mesh is drained every iteration (a wakeup may have been consumed by an earlier recv),
            // unless a peer is congested: then the shards' messages wait in their outboxes, which makes
            // them stop reading their publishers (the mesh's read gate), and the links keep draining.
            let congested = self.gateway.congested();
            if congested != self.mesh_paused {
                self.mesh_paused = congested;
                // The eventfd stays readable while its messages wait: not watched meanwhile, or the loop
                // would spin. Link writes (EPOLLOUT) and peers' acknowledgements wake the loop instead.
                let ev = if congested { 0 } else { libc::EPOLLIN as u32 };
                epoll_ctl(self.ep.as_raw_fd(), libc::EPOLL_CTL_MOD, self.endpoint.wake_fd(), ev, TOKEN_WAKE)?;
                if congested {
                    self.congested_pauses += 1;
                    if self.congested_pauses == 1 {
                        tracing::warn!("a cluster peer is slow: publishers paused until its link drains");
                    }
                }
            }
            took_mesh = false;
            if !self.mesh_paused {
                if self.inbox.is_empty() {
                    let inbox = &mut self.inbox;
                    self.endpoint.recv(|from, m| inbox.push_back((from, m)));
                }
                // A bounded slice per iteration, so that the links are served (heartbeats written, bytes
                // read) between slices however large a drain was; and it stops as soon as a peer's link
                // is congested, the rest waiting here.
                took_mesh = !self.inbox.is_empty();
                for _ in 0..MESH_PER_ITERATION {
                    let Some((from, m)) = self.inbox.pop_front() else { break };
                    // Driven once below, after the slice: what it produced for peers goes together.
                    self.gateway.take_mesh(from, m, now);
                    if self.gateway.congested() {
                        break;
                    }
                }
            }
            let now = Instant::now();
            // Links not read meanwhile say nothing about their peers: while reads are paused, or when
            // this iteration's work took long enough for heartbeats to wait in the kernel unread.
            if self.reads_paused || now.duration_since(woke) > BUSY_ITERATION {
                self.gateway.zone_mut().reading_paused(now);
            }
            if deadline.is_some_and(|d| d <= now) {
                self.gateway.zone_mut().handle_timeout(now);
                self.gateway.handle_timeout(now);
            }
            self.gateway.drive(now);
            self.flush_output(now);
        }
    }

    fn read_datagrams(&mut self, buf: &mut [u8], now: Instant) {
        for _ in 0..256 {
            match self.sockets.udp.recv_from(buf) {
                Ok((n, from)) => self.gateway.zone_mut().handle_datagram(from, &buf[..n], now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // ICMP errors from a peer that went away surface here; they are not fatal.
                    tracing::debug!(error = %e, "cluster UDP receive failed");
                    return;
                }
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            match self.sockets.listener.accept() {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nonblocking(true).and_then(|()| stream.set_nodelay(true)) {
                        tracing::warn!(%peer, error = %e, "cluster link not set up");
                        continue;
                    }
                    let id = self.gateway.zone_mut().next_link_id();
                    if self.register(id, stream, false).is_ok() {
                        self.gateway.zone_mut().handle_accepted(id, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster accept failed");
                    return;
                }
            }
        }
    }

    fn register(&mut self, id: LinkId, stream: TcpStream, connecting: bool) -> io::Result<()> {
        let events =
            if connecting { libc::EPOLLOUT as u32 } else { libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32 };
        epoll_ctl(self.ep.as_raw_fd(), libc::EPOLL_CTL_ADD, stream.as_raw_fd(), events, id.0)?;
        self.links.insert(id, Link { stream, out: Vec::new(), written: 0, connecting, events });
        Ok(())
    }

    fn link_ready(&mut self, id: LinkId, flags: u32, buf: &mut [u8], now: Instant) {
        let Some(link) = self.links.get_mut(&id) else { return };
        if link.connecting {
            link.connecting = false;
            match sys::take_socket_error(link.stream.as_raw_fd()) {
                Ok(()) => {
                    self.gateway.zone_mut().handle_connected(id, now);
                    self.set_events(id);
                }
                Err(e) => {
                    tracing::debug!(link = id.0, error = %e, "cluster connect failed");
                    self.close(id, now);
                }
            }
            return;
        }
        if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
            && !self.reads_paused
        {
            let mut read = 0;
            while read < READ_BUDGET {
                let Some(link) = self.links.get_mut(&id) else { return };
                match link.stream.read(buf) {
                    Ok(0) => {
                        self.close(id, now);
                        return;
                    }
                    Ok(n) => {
                        read += n;
                        self.gateway.zone_mut().handle_link_bytes(id, &buf[..n], now);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.close(id, now);
                        return;
                    }
                }
            }
        }
        if flags & libc::EPOLLOUT as u32 != 0 {
            self.write(id, now);
        }
    }

    /// Writes what `id` has pending; closes it on a write error.
    fn write(&mut self, id: LinkId, now: Instant) {
        let Some(link) = self.links.get_mut(&id) else { return };
        while link.written < link.out.len() {
            match link.stream.write(&link.out[link.written..]) {
                Ok(0) => break,
                Ok(n) => link.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(id, now);
                    return;
                }
            }
        }
        if link.written == link.out.len() {
            link.out.clear();
            link.written = 0;
        }
        self.set_events(id);
    }

    fn set_events(&mut self, id: LinkId) {
        let Some(link) = self.links.get_mut(&id) else { return };
        let mut want = libc::EPOLLRDHUP as u32;
        if !self.reads_paused {
            want |= libc::EPOLLIN as u32;
        }
        if link.connecting || link.written < link.out.len() {
            want |= libc::EPOLLOUT as u32;
        }
        if want != link.events {
            link.events = want;
            let _ = epoll_ctl(self.ep.as_raw_fd(), libc::EPOLL_CTL_MOD, link.stream.as_raw_fd(), want, id.0);
        }
    }

    fn close(&mut self, id: LinkId, now: Instant) {
        if let Some(link) = self.links.remove(&id) {
            let _ = epoll_ctl(self.ep.as_raw_fd(), libc::EPOLL_CTL_DEL, link.stream.as_raw_fd(), 0, 0);
            self.gateway.zone_mut().handle_link_closed(id, now);
        }
    }

    fn connect(&mut self, id: LinkId, addr: SocketAddr, now: Instant) {
        match sys::connect_nonblocking(addr) {
            Ok(fd) => {
                let stream = TcpStream::from(fd);
                if self.register(id, stream, true).is_err() {
                    self.gateway.zone_mut().handle_link_closed(id, now);
                }
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, "cluster connect failed");
                self.gateway.zone_mut().handle_link_closed(id, now);
            }
        }
    }

    /// Everything the gateway and zone produced: datagrams, link commands and bytes, mesh messages.
    fn flush_output(&mut self, now: Instant) {
        // Closing a link or failing a connect produces more zone output: loop until it settles.
        for _ in 0..16 {
            let mut progressed = false;
            while let Some((to, bytes)) = self.gateway.zone_mut().poll_datagram() {
                progressed = true;
                if let Err(e) = self.sockets.udp.send_to(&bytes, to) {
                    tracing::debug!(%to, error = %e, "cluster gossip send failed");
                }
            }
            while let Some(cmd) = self.gateway.zone_mut().poll_link() {
                progressed = true;
                match cmd {
                    LinkCmd::Connect { link, addr } => self.connect(link, addr, now),
                    LinkCmd::Close { link } => {
                        let last = self.gateway.zone_mut().take_link_transmit(link);
                        if let Some(l) = self.links.remove(&link) {
                            let _ = epoll_ctl(
                                self.ep.as_raw_fd(),
                                libc::EPOLL_CTL_DEL,
                                l.stream.as_raw_fd(),
                                0,
                                0,
                            );
                            // Best effort: what the zone queued last (a Refuse) goes before the FIN.
                            let mut s = l.stream;
                            if !l.connecting {
                                let _ = s.write(&l.out[l.written..]);
                                let _ = s.write(&last);
                            }
                            let _ = s.shutdown(std::net::Shutdown::Both);
                        }
                    }
                }
            }
            // Only the links the zone has bytes for. Those bytes are frames it keeps until acknowledged
            // (within the link's budget), so appending them behind what the socket has not taken yet
            // holds no more than that budget.
            while let Some(id) = self.gateway.zone_mut().poll_writable() {
                let bytes = self.gateway.zone_mut().take_link_transmit(id);
                let Some(link) = self.links.get_mut(&id) else { continue };
                if bytes.is_empty() {
                    continue;
                }
                progressed = true;
                if link.written == link.out.len() {
                    link.out = bytes;
                } else {
                    link.out.drain(..link.written);
                    link.out.extend_from_slice(&bytes);
                }
                link.written = 0;
                if link.connecting {
                    self.set_events(id);
                } else {
                    self.write(id, now);
                }
            }
            self.gateway.drive(now);
            if !progressed {
                break;
            }
        }
        while let Some((to, m)) = self.gateway.poll_mesh() {
            self.endpoint.send(to, m);
        }
        self.endpoint.flush();
        let pause = self.endpoint.backlog() > ENDPOINT_BACKLOG_LIMIT;
        if pause != self.reads_paused {
            self.reads_paused = pause;
            let ids: Vec<LinkId> = self.links.keys().copied().collect();
            for id in ids {
                self.set_events(id);
            }
        }
    }

    /// Leaves the zone (peers learn it at once instead of by probing) and writes what that produced.
    fn leave(&mut self, now: Instant) {
        // Operators (and `scripts/bench`) read what crossed the links here, until metrics exist.
        let g = self.gateway.counters();
        let z = self.gateway.zone_mut().counters();
        tracing::info!(
            forwarded = g.forwarded,
            forward_frame_bytes = g.forward_frame_bytes,
            forward_content_bytes = g.forward_content_bytes,
            received = g.received,
            false_positives = g.false_positives,
            dropped_not_connected = g.dropped_not_connected,
            dropped_backlog_full = g.dropped_backlog_full,
            dropped_no_member = g.dropped_no_member,
            stored_unconfirmed = g.stored_unconfirmed,
            malformed = g.malformed,
            retained_out = g.retained_out,
            retained_in = g.retained_in,
            congestion_out = g.congestion_out,
            congestion_in = g.congestion_in,
            link_bytes_out = z.bytes_out,
            link_bytes_in = z.bytes_in,
            links_opened = z.links_opened,
            links_refused = z.links_refused,
            congested_pauses = self.congested_pauses,
            "cluster counters at shutdown"
        );
        // Registry messages held back to go with others go now, ahead of the leave.
        self.gateway.flush_held();
        self.gateway.zone_mut().leave(now);
        let deadline = now + Duration::from_millis(200);
        self.flush_output(now);
        while Instant::now() < deadline && self.links.values().any(|l| l.written < l.out.len()) {
            std::thread::sleep(Duration::from_millis(5));
            let ids: Vec<LinkId> = self.links.keys().copied().collect();
            for id in ids {
                self.write(id, Instant::now());
            }
        }
    }
}
