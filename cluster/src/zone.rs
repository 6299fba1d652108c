//! The transport of one node in its zone, sans I/O: gossip membership for discovery, one TCP link per
//! peer for everything else, and the application frames that travel over the links.
//!
//! The socket side (one UDP socket for gossip and a TCP listener on the same address, outgoing connects,
//! an event loop) drives a [`Zone`] and owns no protocol state:
//! - datagrams in: [`Zone::handle_datagram`]; out: [`Zone::poll_datagram`];
//! - links are named by [`LinkId`]s from [`Zone::next_link_id`]. An accepted connection: allocate an id,
//!   [`Zone::handle_accepted`]. [`Zone::poll_link`] asks for [`LinkCmd::Connect`] (report
//!   [`Zone::handle_connected`], or [`Zone::handle_link_closed`] if it failed) and [`LinkCmd::Close`]
//!   (write what [`Zone::take_link_transmit`] still returns for the link, best effort, then close it; no
//!   need to report it closed). Bytes read: [`Zone::handle_link_bytes`]; EOF or error:
//!   [`Zone::handle_link_closed`]. After each batch of calls, write [`Zone::take_link_transmit`] for the
//!   links [`Zone::poll_writable`] names;
//! - timers: call [`Zone::handle_timeout`] at [`Zone::poll_timeout`];
//! - the application (the broker's gateway) reads [`Zone::poll_event`] and sends with [`Zone::send`].
//!
//! Who connects: membership (foca) says who is in the zone; of two members, the one with the smaller name
//! dials the other, with backoff (100 ms doubling to 2 s, jittered) while the member is in the view. Should
//! two links to one peer both open (a half-open link the other side has not noticed yet, or a seed
//! probe), both sides keep the same one: the one dialed by the smaller name, and of those the newest.
//!
//! Opening a link: the handshake of [`crate::link::Handshake`] (version, identities, proof of the cluster
//! secret), then each side's first frame is its resume frame, `Received { seq }`: how many of the peer's
//! numbered frames it holds (0 when the peer is a new life, or the first link). On the peer's resume frame
//! the [`LinkSession`] resumes: the same life gets exactly what it missed, a new life ([`Resume::Resync`])
//! starts over and what was queued for the old one is counted as dropped. Only then is the peer up for the
//! application ([`ZoneEvent::PeerUp`]), which (re)sends it its snapshots (interest, retained).
//!
//! Failure detection is the link's: the peer is down ([`ZoneEvent::PeerDown`]) as soon as its link is lost
//! (EOF, error, refused) or silent for `link_timeout`; an idle link sends a heartbeat (`Received`) every
//! `heartbeat`, so a healthy link is never silent. Membership alone never puts a peer with a healthy link
//! down (gossip is lossy and slower); it only decides whom to dial.
//!
//! Identity: links always carry the node's configured (boot) identity. Membership may renew its own
//! incarnation after being declared down by a partition; that is not a restart (nothing was lost), so the
//! links keep resuming their sessions.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::frame::Secret;
use crate::link::{self, Frame, Handshake, HandshakeStep};
use crate::session::{Backlog, LinkSession, Resume};
use crate::{Membership, MembershipConfig, MembershipCounters, MembershipEvent, NodeIdentity, NodeName};

const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Acknowledge at least every this many frames received (besides the heartbeat): bounds how long the
/// sender's backlog holds frames under a steady one-way flow.
const ACK_EVERY: u64 = 32;

/// How one node takes part in its zone.
#[derive(Debug, Clone)]
pub struct ZoneConfig {
    /// This node; its `addr` is the cluster listen address (UDP gossip and TCP links).
    pub identity: NodeIdentity,
    /// The cluster secret: gossip datagrams and link handshakes are authenticated with it.
    pub secret: Option<Vec<u8>>,
    /// `--join` addresses: retried with backoff (up to 2 s) while the zone has no other member.
    pub seeds: Vec<SocketAddr>,
    pub membership: MembershipConfig,
    /// Per-peer [`LinkSession`] backlog budget.
    pub link_budget_bytes: usize,
    /// An idle link sends a heartbeat this often.
    pub heartbeat: Duration,
    /// Nothing received on a link for this long (or a connect or handshake that takes this long): the
    /// link is closed and the peer down.
    pub link_timeout: Duration,
}

impl ZoneConfig {
    /// The defaults for a LAN: 250 ms heartbeats, 1.5 s link timeout, 8 MiB backlog per peer.
    pub fn new(identity: NodeIdentity) -> ZoneConfig {
        ZoneConfig {
            identity,
            secret: None,
            seeds: Vec::new(),
            membership: MembershipConfig::default(),
            link_budget_bytes: 8 << 20,
            heartbeat: Duration::from_millis(250),
            link_timeout: Duration::from_millis(1500),
        }
    }
}

/// One TCP connection, as the socket side and the zone both name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

/// What the socket side is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkCmd {
    /// Open a TCP connection; report [`Zone::handle_connected`] or [`Zone::handle_link_closed`].
    Connect { link: LinkId, addr: SocketAddr },
    /// Write what [`Zone::take_link_transmit`] still has for it (best effort), then close it.
    Close { link: LinkId },
}

/// What the node learns about its zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneEvent {
    /// The membership view changed (for logs; links decide who is up).
    MemberUp(NodeIdentity),
    MemberDown(NodeIdentity),
    /// A link to the peer finished its handshake and resumed: (re)send it snapshots (interest, retained).
    PeerUp {
        peer: NodeIdentity,
    },
    /// The peer's link was lost, closed, timed out or refused: stop forwarding to it.
    PeerDown {
        peer: NodeIdentity,
        reason: &'static str,
    },
    /// Application frames from `from`: one or more whole encoded link frames back to back, in the order
    /// sent, each exactly once per life of the two nodes.
    Frames {
        from: NodeName,
        frames: Vec<u8>,
    },
    /// A link handshake was refused (wrong secret or version), by either side.
    Refused {
        addr: Option<SocketAddr>,
        reason: String,
    },
}

/// Why [`Zone::send`] did not queue a frame (counted either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the peer is not up")]
    NotConnected,
    #[error("the peer's link backlog is full")]
    Full,
}

/// Counters of one node's zone transport, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ZoneCounters {
    pub links_dialed: u64,
    pub links_accepted: u64,
    /// Connects that failed or timed out before the handshake.
    pub dial_failures: u64,
    /// Links that completed handshake and resume.
    pub links_opened: u64,
    pub links_closed: u64,
    /// Handshakes refused, by this side or the peer.
    pub links_refused: u64,
    /// Links closed for silence (or a connect or handshake that took too long).
    pub links_timed_out: u64,
    /// Links closed because another link to the same peer was kept.
    pub links_duplicate: u64,
    /// Links closed for a malformed or unexpected frame.
    pub links_malformed: u64,
    pub heartbeats_out: u64,
    /// Application frames received, and written (resent ones included).
    pub frames_in: u64,
    pub frames_out: u64,
    /// Frames written again after a reconnect to the same peer life.
    pub frames_resent: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// [`Zone::send`] refused: the peer was not up.
    pub send_not_connected: u64,
    /// [`Zone::send`] refused: the backlog was full.
    pub send_full: u64,
    /// Frames queued for a peer's old life, dropped when it came back as a new one.
    pub dropped_resync: u64,
    /// Rounds of `--join` retries.
    pub seed_rounds: u64,
    pub membership: MembershipCounters,
}

enum State {
    /// An outgoing connect in progress.
    Connecting,
    Handshaking(Box<Handshake>),
    /// The peer proved the secret; waiting for its resume frame.
    Resuming {
        peer: NodeIdentity,
    },
    Open {
        peer: NodeIdentity,
    },
}

struct Link {
    state: State,
    /// Where this side dialed (`None`: accepted), and the member it expected there (`None`: a seed).
    dialed: Option<(SocketAddr, Option<NodeName>)>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// When bytes last arrived (or the connect, accept or connection started).
    last_rx: Instant,
    /// When bytes were last queued for writing.
    last_tx: Instant,
}

impl Link {
    /// The peer's name, once known (or expected, for a link this side dialed to a member).
    fn peer_name(&self) -> Option<&NodeName> {
        match &self.state {
            State::Resuming { peer } | State::Open { peer } => Some(&peer.name),
            State::Connecting | State::Handshaking(_) => self.dialed.as_ref().and_then(|(_, n)| n.as_ref()),
        }
    }
}

/// What outlives a peer's links.
struct Peer {
    session: LinkSession,
    /// The link the peer is up on.
    up: Option<LinkId>,
}

/// When to dial a member next (kept for members this node dials, while in the view).
struct Dial {
    backoff: Duration,
    next_at: Instant,
}

/// The `--join` retries.
struct Seeds {
    addrs: Vec<SocketAddr>,
    /// `None` while not retrying (the zone has another member).
    next_at: Option<Instant>,
    backoff: Duration,
    rounds: u32,
}

/// One node's link and membership transport. See the module documentation for how it is driven.
pub struct Zone {
    me: NodeIdentity,
    cfg: ZoneConfig,
    membership: Membership,
    rng: StdRng,
    members: BTreeMap<NodeName, NodeIdentity>,
    dials: BTreeMap<NodeName, Dial>,
    seeds: Seeds,
    links: BTreeMap<LinkId, Link>,
    peers: BTreeMap<NodeName, Peer>,
    /// Last bytes of links closed by this side, until the socket side takes them (or a timeout).
    closing: BTreeMap<LinkId, (Vec<u8>, Instant)>,
    writable: BTreeSet<LinkId>,
    next_link: u64,
    cmds: VecDeque<LinkCmd>,
    events: VecDeque<ZoneEvent>,
    counters: ZoneCounters,
    leaving: bool,
}

impl Zone {
    /// `rng_seed` feeds every random choice (membership, handshake nonces, jitter): a simulation passes
    /// its own, a node anything unpredictable.
    pub fn new(cfg: ZoneConfig, rng_seed: u64, now: Instant) -> Zone {
        let mut rng = StdRng::seed_from_u64(rng_seed);
        let secret = cfg.secret.as_deref().map(Secret::new);
        let membership = Membership::new(cfg.identity.clone(), &cfg.membership, secret, rng.next_u64(), now);
        let addrs: Vec<SocketAddr> = cfg.seeds.iter().copied().filter(|a| *a != cfg.identity.addr).collect();
        let mut z = Zone {
            me: cfg.identity.clone(),
            seeds: Seeds { addrs, next_at: None, backoff: DIAL_BACKOFF_MIN, rounds: 0 },
            cfg,
            membership,
            rng,
            members: BTreeMap::new(),
            dials: BTreeMap::new(),
            links: BTreeMap::new(),
            peers: BTreeMap::new(),
            closing: BTreeMap::new(),
            writable: BTreeSet::new(),
            next_link: 0,
            cmds: VecDeque::new(),
            events: VecDeque::new(),
            counters: ZoneCounters::default(),
            leaving: false,
        };
        z.after(now);
        z
    }

    /// This node's identity as its links carry it (the configured one).
    pub fn identity(&self) -> &NodeIdentity {
        &self.me
    }

    pub fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        self.membership.handle_datagram(from, data, now);
        self.after(now);
    }

    pub fn poll_datagram(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.membership.poll_transmit()
    }

    /// A fresh id for a link (the socket side's accepted connections, this side's connects).
    pub fn next_link_id(&mut self) -> LinkId {
        self.next_link += 1;
        LinkId(self.next_link)
    }

    /// The socket side accepted a TCP connection under `link` (from [`Zone::next_link_id`]).
    pub fn handle_accepted(&mut self, link: LinkId, now: Instant) {
        debug_assert!(!self.links.contains_key(&link), "link ids are not reused");
        if self.leaving {
            self.cmds.push_back(LinkCmd::Close { link });
            return;
        }
        self.counters.links_accepted += 1;
        let mut l = Link {
            state: State::Connecting,
            dialed: None,
            inbuf: Vec::new(),
            out: Vec::new(),
            last_rx: now,
            last_tx: now,
        };
        self.start_handshake(&mut l);
        self.links.insert(link, l);
        self.writable.insert(link);
        self.after(now);
    }

    /// A [`LinkCmd::Connect`] succeeded.
    pub fn handle_connected(&mut self, link: LinkId, now: Instant) {
        let Some(mut l) = self.links.remove(&link) else { return };
        if matches!(l.state, State::Connecting) {
            l.last_rx = now;
            self.start_handshake(&mut l);
            self.writable.insert(link);
        }
        self.links.insert(link, l);
        self.after(now);
    }

    fn start_handshake(&mut self, l: &mut Link) {
        // Nonces from the seeded rng: a simulation replays; a node seeds it unpredictably.
        let mut nonce = [0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        let mut hs = Handshake::new(self.me.clone(), self.cfg.secret.as_deref(), nonce);
        l.out.extend_from_slice(&hs.take_transmit());
        l.state = State::Handshaking(Box::new(hs));
    }

    /// EOF, an error, or a connect that failed; the socket side has closed the link.
    pub fn handle_link_closed(&mut self, link: LinkId, now: Instant) {
        self.closing.remove(&link);
        let reason = match self.links.get(&link).map(|l| &l.state) {
            Some(State::Connecting) => "connect failed",
            Some(_) => "link closed",
            None => return,
        };
        self.close(link, reason, false, now);
        self.after(now);
    }

    pub fn handle_link_bytes(&mut self, link: LinkId, data: &[u8], now: Instant) {
        let Some(l) = self.links.get_mut(&link) else { return };
        if data.is_empty() {
            return;
        }
        self.counters.bytes_in += data.len() as u64;
        l.last_rx = now;
        if let State::Handshaking(hs) = &mut l.state {
            let step = hs.handle_bytes(data);
            let out = hs.take_transmit();
            l.out.extend_from_slice(&out);
            self.writable.insert(link);
            match step {
                HandshakeStep::Continue => {}
                HandshakeStep::Refused(e) => self.refused(link, e.to_string(), now),
                HandshakeStep::Open(peer) => {
                    let leftover = hs.leftover();
                    l.inbuf = leftover;
                    self.opened(link, peer, now);
                    self.read_frames(link, now);
                }
            }
        } else if matches!(l.state, State::Resuming { .. } | State::Open { .. }) {
            l.inbuf.extend_from_slice(data);
            self.read_frames(link, now);
        }
        self.after(now);
    }

    /// The handshake of `link` completed with `peer`: apply the one-link rule, then send the resume frame.
    fn opened(&mut self, link: LinkId, peer: NodeIdentity, now: Instant) {
        if peer.name == self.me.name {
            self.refused(link, format!("peer has this node's name {}", peer.name), now);
            return;
        }
        let dialed_by_me = self.links.get(&link).is_some_and(|l| l.dialed.is_some());
        let preferred = |dialed_by_me: bool| {
            let dialer = if dialed_by_me { &self.me.name } else { &peer.name };
            let other = if dialed_by_me { &peer.name } else { &self.me.name };
            dialer < other
        };
        let new_preferred = preferred(dialed_by_me);
        let others: Vec<(LinkId, bool)> = self
            .links
            .iter()
            .filter_map(|(id, l)| match &l.state {
                State::Resuming { peer: p } | State::Open { peer: p }
                    if *id != link && p.name == peer.name =>
                {
                    // A link to an older life of the peer is dead whoever dialed it.
                    Some((*id, p == &peer && preferred(l.dialed.is_some())))
                }
                _ => None,
            })
            .collect();
        // Keep the link dialed by the smaller name; of those, the newest (an older one is half-open).
        if others.iter().any(|(_, keep)| *keep && !new_preferred) {
            self.counters.links_duplicate += 1;
            self.close(link, "duplicate link", true, now);
            return;
        }
        for (old, _) in others {
            self.counters.links_duplicate += 1;
            self.close(old, "replaced by a newer link", true, now);
        }
        let session = &mut self
            .peers
            .entry(peer.name.clone())
            .or_insert_with(|| Peer { session: LinkSession::new(self.cfg.link_budget_bytes), up: None })
            .session;
        // A new life of the peer numbers from 1 again: this side holds none of its frames.
        let received = if session.peer() == Some(&peer) { session.received() } else { 0 };
        let Some(l) = self.links.get_mut(&link) else { return };
        link::encode(&Frame::Received { seq: received }, &mut l.out);
        l.last_tx = now;
        l.state = State::Resuming { peer };
        self.writable.insert(link);
    }

    /// Reads the whole frames buffered on an open (or resuming) link.
    fn read_frames(&mut self, link: LinkId, now: Instant) {
        let Some(l) = self.links.get_mut(&link) else { return };
        let buf = std::mem::take(&mut l.inbuf);
        let (peer, mut resuming) = match &l.state {
            State::Resuming { peer } => (peer.clone(), true),
            State::Open { peer } => (peer.clone(), false),
            _ => return,
        };
        let mut at = 0;
        // Consecutive application frames go out as one event (one allocation, not one per frame).
        let mut batch: Vec<u8> = Vec::new();
        loop {
            let (frame, used) = match link::decode(&buf[at..]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(peer = %peer.name, error = %e, "malformed link frame; closing the link");
                    self.counters.links_malformed += 1;
                    self.emit_frames(&peer.name, &mut batch);
                    self.close(link, "malformed frame", true, now);
                    return;
                }
            };
            let bytes = &buf[at..at + used];
            at += used;
            let Some(p) = self.peers.get_mut(&peer.name) else { return };
            match frame {
                Frame::Received { seq } if resuming => {
                    match p.session.resume(&peer, seq) {
                        Resume::Continue { resent } => self.counters.frames_resent += resent as u64,
                        Resume::Resync { dropped } => self.counters.dropped_resync += dropped as u64,
                    }
                    p.up = Some(link);
                    let Some(l) = self.links.get_mut(&link) else { return };
                    l.state = State::Open { peer: peer.clone() };
                    resuming = false;
                    self.counters.links_opened += 1;
                    tracing::info!(peer = ?peer, link = link.0, "peer up");
                    self.events.push_back(ZoneEvent::PeerUp { peer: peer.clone() });
                    self.flush(&peer.name, now);
                }
                Frame::Received { seq } => {
                    p.session.handle_received(seq);
                    self.flush(&peer.name, now);
                }
                Frame::Refuse { reason } => {
                    let reason = format!("peer refused the link: {reason}");
                    self.emit_frames(&peer.name, &mut batch);
                    self.refused(link, reason, now);
                    return;
                }
                Frame::Hello { .. } | Frame::Proof { .. } => {
                    self.emit_frames(&peer.name, &mut batch);
                    self.protocol_error(link, &peer, "handshake frame on an open link", now);
                    return;
                }
                _ if resuming => {
                    self.protocol_error(link, &peer, "application frame before the resume frame", now);
                    return;
                }
                _ => {
                    p.session.handle_frame();
                    self.counters.frames_in += 1;
                    batch.extend_from_slice(bytes);
                }
            }
        }
        self.emit_frames(&peer.name, &mut batch);
        if let Some(l) = self.links.get_mut(&link) {
            l.inbuf = buf[at..].to_vec();
            if let State::Open { peer } = &l.state {
                let name = peer.name.clone();
                if let Some(seq) = self.peers.get(&name).and_then(|p| p.session.ack_due(ACK_EVERY)) {
                    self.send_received(link, &name, seq, now);
                }
            }
        }
    }

    /// Hands the application frames collected so far to the node, as one event.
    fn emit_frames(&mut self, from: &NodeName, batch: &mut Vec<u8>) {
        if !batch.is_empty() {
            self.events.push_back(ZoneEvent::Frames { from: from.clone(), frames: std::mem::take(batch) });
        }
    }

    fn protocol_error(&mut self, link: LinkId, peer: &NodeIdentity, what: &'static str, now: Instant) {
        tracing::warn!(peer = %peer.name, "{what}; closing the link");
        self.counters.links_malformed += 1;
        self.close(link, what, true, now);
    }

    fn send_received(&mut self, link: LinkId, peer: &NodeName, seq: u64, now: Instant) {
        let Some(l) = self.links.get_mut(&link) else { return };
        link::encode(&Frame::Received { seq }, &mut l.out);
        l.last_tx = now;
        self.writable.insert(link);
        if let Some(p) = self.peers.get_mut(peer) {
            p.session.acked(seq);
        }
    }

    /// Moves what the peer's session has to write onto its link.
    fn flush(&mut self, peer: &NodeName, now: Instant) {
        let Some(p) = self.peers.get_mut(peer) else { return };
        let Some(l) = p.up.and_then(|id| self.links.get_mut(&id)) else { return };
        let mut wrote = false;
        while let Some(b) = p.session.poll_write() {
            l.out.extend_from_slice(b);
            self.counters.frames_out += 1;
            wrote = true;
        }
        if wrote {
            l.last_tx = now;
            self.writable.insert(p.up.expect("checked"));
        }
    }

    /// A handshake refused by either side: logged, raised, the link closed.
    fn refused(&mut self, link: LinkId, reason: String, now: Instant) {
        let addr = self.links.get(&link).and_then(|l| {
            l.dialed.as_ref().map(|(a, _)| *a).or(match &l.state {
                State::Resuming { peer } | State::Open { peer } => Some(peer.addr),
                _ => None,
            })
        });
        self.counters.links_refused += 1;
        let dialed = self.links.get(&link).is_some_and(|l| l.dialed.is_some());
        // Links this side dials are paced by backoff; accepted ones could come in a flood: log those at
        // powers of two.
        if dialed || self.counters.links_refused.is_power_of_two() {
            tracing::warn!(?addr, %reason, refused = self.counters.links_refused, "cluster link refused");
        }
        self.events.push_back(ZoneEvent::Refused { addr, reason });
        self.close(link, "refused", true, now);
    }

    /// Closes `link` (telling the socket side when it did not close it itself), puts its peer down if it
    /// was up on it, and schedules the next dial.
    fn close(&mut self, link: LinkId, reason: &'static str, tell_socket: bool, now: Instant) {
        let Some(l) = self.links.remove(&link) else { return };
        self.writable.remove(&link);
        self.counters.links_closed += 1;
        if tell_socket {
            self.cmds.push_back(LinkCmd::Close { link });
            if !l.out.is_empty() {
                self.closing.insert(link, (l.out, now));
                self.writable.insert(link);
            }
        }
        let was_open = match l.state {
            State::Open { peer } => {
                if let Some(p) = self.peers.get_mut(&peer.name).filter(|p| p.up == Some(link)) {
                    p.up = None;
                    p.session.disconnected();
                    tracing::info!(peer = ?peer, reason, "peer down");
                    self.events.push_back(ZoneEvent::PeerDown { peer, reason });
                }
                true
            }
            State::Connecting => {
                self.counters.dial_failures += 1;
                false
            }
            _ => false,
        };
        // The next dial to a member: soon after a link that worked, later and later after failures.
        let Some((_, Some(name))) = l.dialed else { return };
        if let Some(d) = self.dials.get_mut(&name) {
            if was_open {
                d.backoff = DIAL_BACKOFF_MIN;
            }
            let wait = d.backoff;
            d.backoff = (d.backoff * 2).min(DIAL_BACKOFF_MAX);
            let wait = jitter(&mut self.rng, wait);
            if let Some(d) = self.dials.get_mut(&name) {
                d.next_at = now + wait;
            }
        }
    }

    pub fn poll_link(&mut self) -> Option<LinkCmd> {
        self.cmds.pop_front()
    }

    /// A link with bytes to write (then call [`Zone::take_link_transmit`]).
    pub fn poll_writable(&mut self) -> Option<LinkId> {
        self.writable.pop_first()
    }

    /// Bytes to write on `link` now (handshake, then frames); empty if none.
    pub fn take_link_transmit(&mut self, link: LinkId) -> Vec<u8> {
        self.writable.remove(&link);
        let out = match self.links.get_mut(&link) {
            // The next batch starts with the room this one needed: no chain of reallocations per batch.
            Some(l) => {
                let room = l.out.capacity().min(1 << 20);
                std::mem::replace(&mut l.out, Vec::with_capacity(room))
            }
            None => self.closing.remove(&link).map(|(b, _)| b).unwrap_or_default(),
        };
        self.counters.bytes_out += out.len() as u64;
        out
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.membership.handle_timeout(now);
        let ids: Vec<LinkId> = self.links.keys().copied().collect();
        for id in ids {
            let Some(l) = self.links.get(&id) else { continue };
            if now >= l.last_rx + self.cfg.link_timeout {
                self.counters.links_timed_out += 1;
                self.close(id, "timed out", true, now);
                continue;
            }
            if let State::Open { peer } = &l.state {
                if now >= l.last_tx + self.cfg.heartbeat {
                    let name = peer.name.clone();
                    let seq = self.peers.get(&name).map_or(0, |p| p.session.received());
                    self.counters.heartbeats_out += 1;
                    self.send_received(id, &name, seq, now);
                }
            }
        }
        // Bytes of closed links the socket side never took: nobody will.
        let stale = self.cfg.link_timeout;
        self.closing.retain(|_, (_, at)| now < *at + stale);
        if let Some(at) = self.seeds.next_at.filter(|at| *at <= now) {
            debug_assert!(at <= now);
            self.retry_seeds(now);
        }
        self.after(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let links = self.links.values().map(|l| {
            let dead = l.last_rx + self.cfg.link_timeout;
            match l.state {
                State::Open { .. } => dead.min(l.last_tx + self.cfg.heartbeat),
                _ => dead,
            }
        });
        let dials = self.dials.iter().filter(|(n, _)| !self.has_link_to(n)).map(|(_, d)| d.next_at);
        let closing = self.closing.values().map(|(_, at)| *at + self.cfg.link_timeout);
        links
            .chain(dials)
            .chain(closing)
            .chain(self.membership.poll_timeout())
            .chain(self.seeds.next_at)
            .min()
    }

    pub fn poll_event(&mut self) -> Option<ZoneEvent> {
        self.events.pop_front()
    }

    /// Queues an application frame (encoded with [`link::encode`]) to a peer that is up.
    pub fn send(&mut self, peer: &NodeName, frame: Vec<u8>) -> Result<(), SendError> {
        debug_assert!(
            matches!(link::decode(&frame), Ok(Some((f, n))) if n == frame.len()
                && !matches!(f, Frame::Hello { .. } | Frame::Proof { .. } | Frame::Refuse { .. } | Frame::Received { .. })),
            "one whole application frame"
        );
        let Some(p) = self.peers.get_mut(peer).filter(|p| p.up.is_some()) else {
            self.counters.send_not_connected += 1;
            return Err(SendError::NotConnected);
        };
        match p.session.queue(frame) {
            Ok(_) => {
                // `send` has no clock: the frame leaves at once and the heartbeat timer keeps running (a
                // heartbeat is a few bytes).
                let last_tx = p.up.and_then(|id| self.links.get(&id)).map(|l| l.last_tx);
                if let Some(t) = last_tx {
                    self.flush(peer, t);
                }
                Ok(())
            }
            Err(Backlog::Full) => {
                self.counters.send_full += 1;
                Err(SendError::Full)
            }
        }
    }

    /// The peers up for the application.
    /// Frames to peers not yet acknowledged by them, over every peer: what a crash of this node loses
    /// on its way (a simulation's accounting of forwards).
    pub fn frames_unacknowledged(&self) -> u64 {
        self.peers.values().map(|p| p.session.unacked_frames() as u64).sum()
    }

    pub fn peers_up(&self) -> impl Iterator<Item = &NodeIdentity> {
        self.links.values().filter_map(|l| match &l.state {
            State::Open { peer } => Some(peer),
            _ => None,
        })
    }

    /// Graceful shutdown: tells the zone (gossip) and closes every link; dials nothing more.
    pub fn leave(&mut self, now: Instant) {
        self.leaving = true;
        self.membership.leave(now);
        self.dials.clear();
        self.seeds.next_at = None;
        let ids: Vec<LinkId> = self.links.keys().copied().collect();
        for id in ids {
            self.close(id, "leaving", true, now);
        }
    }

    /// Whether a frame of `len` bytes fits the peer's backlog budget now (`Err(NotConnected)`: the peer
    /// is not up), so that a caller can hold it rather than have [`Zone::send`] refuse it.
    pub fn fits(&self, peer: &NodeName, len: usize) -> Result<bool, SendError> {
        let p = self.peers.get(peer).filter(|p| p.up.is_some()).ok_or(SendError::NotConnected)?;
        let backlog = p.session.backlog_bytes();
        Ok(backlog == 0 || backlog + len <= self.cfg.link_budget_bytes)
    }

    /// The socket side stopped reading the links for a while (its shards have too much of the links'
    /// traffic still to take): what the peers sent waits in the kernel, heartbeats included, so silence
    /// now says nothing about them. Counts every link as heard from, so that none times out for it.
    pub fn reading_paused(&mut self, now: Instant) {
        for l in self.links.values_mut() {
            l.last_rx = l.last_rx.max(now);
        }
    }

    /// Some peer up holds more than half its backlog budget of frames not yet acknowledged: a slow or
    /// stalled peer. The socket side then stops taking publishes from the shards (they pause their
    /// publishers, as for a slow shard) until it drains, instead of filling the budget and dropping.
    pub fn congested(&self) -> bool {
        self.peers.keys().any(|n| self.peer_congested(n))
    }

    /// The peer is up and holds more than half its backlog budget (see [`Zone::congested`]).
    pub fn peer_congested(&self, peer: &NodeName) -> bool {
        let half = self.cfg.link_budget_bytes / 2;
        self.peers.get(peer).is_some_and(|p| p.up.is_some() && p.session.backlog_bytes() > half)
    }

    pub fn counters(&self) -> ZoneCounters {
        ZoneCounters {
            membership: self.membership.counters(),
            seed_rounds: self.seeds.rounds as u64,
            ..self.counters
        }
    }

    fn has_link_to(&self, name: &NodeName) -> bool {
        self.links.values().any(|l| l.peer_name() == Some(name))
    }

    fn dial(&mut self, addr: SocketAddr, name: Option<NodeName>, now: Instant) {
        let link = self.next_link_id();
        self.counters.links_dialed += 1;
        self.links.insert(
            link,
            Link {
                state: State::Connecting,
                dialed: Some((addr, name)),
                inbuf: Vec::new(),
                out: Vec::new(),
                last_rx: now,
                last_tx: now,
            },
        );
        self.cmds.push_back(LinkCmd::Connect { link, addr });
    }

    /// One round of `--join` retries: gossip to every seed, and from the second round on a link to it
    /// too, so that a refused handshake (wrong secret or version) says why the gossip goes unanswered.
    fn retry_seeds(&mut self, now: Instant) {
        self.seeds.rounds += 1;
        // Members known, and peers linked, are alive or were: an announce at their address reaches
        // whatever life of them listens there (a zone whose nodes all rejoined as new lives at once, after
        // a partition, knows one another only by their old lives, and foca answers only announces then).
        let mut known: Vec<SocketAddr> =
            self.members.values().map(|m| m.addr).chain(self.peers_up().map(|p| p.addr)).collect();
        known.sort_unstable();
        known.dedup();
        for addr in known.into_iter().filter(|a| !self.seeds.addrs.contains(a)) {
            self.membership.join(addr, now);
        }
        for addr in self.seeds.addrs.clone() {
            self.membership.join(addr, now);
            let dialing = self.links.values().any(|l| l.dialed.as_ref().is_some_and(|(a, _)| *a == addr));
            if self.seeds.rounds > 1 && !dialing {
                self.dial(addr, None, now);
            }
        }
        let wait = jitter(&mut self.rng, self.seeds.backoff);
        self.seeds.backoff = (self.seeds.backoff * 2).min(DIAL_BACKOFF_MAX);
        self.seeds.next_at = Some(now + wait);
    }

    /// Applies what membership reported, keeps the seed retries and dials going.
    fn after(&mut self, now: Instant) {
        while let Some(e) = self.membership.poll_event() {
            match e {
                MembershipEvent::Up(id) if id.name != self.me.name => {
                    if !self.leaving && self.me.name < id.name {
                        self.dials
                            .entry(id.name.clone())
                            .or_insert(Dial { backoff: DIAL_BACKOFF_MIN, next_at: now });
                    }
                    self.members.insert(id.name.clone(), id.clone());
                    self.events.push_back(ZoneEvent::MemberUp(id));
                }
                MembershipEvent::Down(id) if id.name != self.me.name => {
                    // A restart reports the new life up before the old one down: only the current one goes.
                    if self.members.get(&id.name) == Some(&id) {
                        self.members.remove(&id.name);
                        self.dials.remove(&id.name);
                    }
                    self.events.push_back(ZoneEvent::MemberDown(id));
                }
                MembershipEvent::Renamed { old, new } => {
                    tracing::info!(
                        ?old,
                        ?new,
                        "declared down by the zone; rejoined as a new membership life"
                    );
                }
                _ => {}
            }
        }
        let linked = self.peers.values().any(|p| p.up.is_some());
        // Not known to any active member: alone, or rejoined as a new life that nobody answered yet.
        let alone = !self.membership.is_active() || self.members.is_empty() && !linked;
        let anyone = !self.seeds.addrs.is_empty() || !self.members.is_empty() || linked;
        if self.leaving || !alone || !anyone {
            self.seeds.next_at = None;
        } else if self.seeds.next_at.is_none() {
            self.seeds.backoff = DIAL_BACKOFF_MIN;
            self.retry_seeds(now);
        }
        let due: Vec<(NodeName, SocketAddr)> = self
            .dials
            .iter()
            .filter(|(n, d)| d.next_at <= now && !self.has_link_to(n))
            .filter_map(|(n, _)| self.members.get(n).map(|id| (n.clone(), id.addr)))
            .collect();
        for (name, addr) in due {
            self.dial(addr, Some(name), now);
        }
        self.counters.membership = self.membership.counters();
    }
}

/// Half of `d` plus a random part of the other half: nodes that failed together do not retry together.
fn jitter(rng: &mut StdRng, d: Duration) -> Duration {
    let half = d / 2;
    let nanos = half.as_nanos().min(u64::MAX as u128) as u64;
    half + Duration::from_nanos(rng.next_u64() % nanos.max(1))
}

impl std::fmt::Debug for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zone")
            .field("me", &self.me)
            .field("members", &self.members.len())
            .field("links", &self.links.len())
            .field("peers_up", &self.peers.values().filter(|p| p.up.is_some()).count())
            .finish()
    }
}

#[cfg(test)]
mod tests;
