//! The cluster gateway of a node, sans I/O: where the node's shards meet its zone.
//!
//! The gateway is a mesh endpoint beside the shards (`ShardId(shards)`): shards send it what they send each
//! other (interest announcements, retained updates, publishes), and it answers like a shard would. On the
//! other side it drives the [`Zone`] (membership and links) and speaks the link protocol with the peers:
//! - **interest**: it adds up the shards' announcements into node-level interest for the [`ZoneRouter`]
//!   (a plain filter counts once per node, a shared group by its members), and answers a shard's
//!   announcement only once every peer up acknowledged what it added, so a SUBACK leaves only after the
//!   whole zone would route to it ([`interest`]);
//! - **publishes**: shards send it every publish while it asks for them ([`Mesh::ForwardAll`]); it
//!   forwards each once to every peer whose interest may match, and to the one node chosen for each shared
//!   group. A publish from a peer is delivered to the shards with matching interest, never forwarded again
//!   ([`forward`]);
//! - **durability**: a QoS 1/2 publish whose acknowledgement waits (the node has a log) waits for every
//!   peer it went to to confirm it stored it; a peer that goes down or does not answer in time is not waited
//!   for (counted and logged: its subscribers did not get the message, and will not);
//! - **retained messages**: replicated to every peer, last writer wins by (hybrid logical clock, node
//!   name); a peer that comes up gets the whole replica ([`retained`]);
//! - **sessions**: it drives the node's session registrar: a CONNECT waits for its registration, a
//!   session another node's connection took over is exported by its shard and sent there, and a grant
//!   waits for the session it takes over ([`sessions`]).
//!
//! What it does not do: sockets and clocks (the runtime's cluster thread drives it), or remembering
//! retained messages restored from the log before the node joined (peers learn them when they are
//! published again).

mod congestion;
mod forward;
mod hold;
mod interest;
mod retained;
pub mod sessions;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_shard::core::{owner_of, Mesh, Msg, Origin, SessionKey};
use shardmq_shard::ShardId;

use crate::link::{self, Frame};
use crate::router::{Announce, ZoneRouter};
use crate::zone::{Zone, ZoneEvent};
use crate::{NodeIdentity, NodeName};

use self::congestion::Congestion;
use self::forward::{ForwardAcks, InjectAcks};
use self::interest::{InterestWaits, NodeView};
use self::retained::RetainedSync;

/// How long a publish's acknowledgement waits for a peer's answer before going without it.
pub const STORED_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames held for full links (all peers together) before the node stops taking its shards' messages.
pub const HELD_LIMIT: usize = 4 << 20;
/// How long a SUBACK waits for the peers to acknowledge new interest.
pub const INTEREST_ACK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This endpoint's mesh id: the number of shards.
    pub shards: u16,
    /// The node has a log: shards answer durability requests, so forwarded QoS 1/2 messages are
    /// confirmed to the publishing peer only once stored here.
    pub persistent: bool,
    /// The wall clock (ms since the Unix epoch) at `now` of [`Gateway::new`]: retained stamps are taken
    /// from it plus the monotonic time since.
    pub wall_ms_at_start: u64,
    /// What a CONNECT whose client id's owner is unreachable gets (`--partition-mode`).
    pub partition_mode: crate::registrar::PartitionMode,
}

/// What the gateway counted, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GatewayCounters {
    /// Messages forwarded to peers (one per peer).
    pub forwarded: u64,
    /// Bytes of forward frames, and of their topic, payload and properties: the difference is framing.
    pub forward_frame_bytes: u64,
    pub forward_content_bytes: u64,
    /// Forwards not sent: the peer's link went down in between, or its backlog was full.
    pub dropped_not_connected: u64,
    pub dropped_backlog_full: u64,
    /// Messages received from peers, and those no local subscription matched (the peer's summary said
    /// "maybe": a false positive).
    pub received: u64,
    pub false_positives: u64,
    /// Shared-group messages from a peer for a group with no member here any more.
    pub dropped_no_member: u64,
    /// Frames from peers that did not decode, or carried an invalid topic or properties.
    pub malformed: u64,
    /// Durability answers given up on: the peer went down or did not answer in time.
    pub stored_unconfirmed: u64,
    /// Retained updates sent to and applied from peers.
    pub retained_out: u64,
    pub retained_in: u64,
    /// Congestion reports sent to peers for their publishers, and received for this node's.
    pub congestion_out: u64,
    pub congestion_in: u64,
    /// Registry messages not sent: the peer's link was down.
    pub registry_not_sent: u64,
    /// Session registry messages ([`Frame::Registry`]) sent to and received from peers, and their bytes
    /// (whole frames: length, type and body).
    pub registry_out: u64,
    pub registry_bytes_out: u64,
    pub registry_in: u64,
    pub registry_bytes_in: u64,
    /// Moved sessions ([`Frame::Session`]) sent and received, and their bytes (whole frames).
    pub session_frames_out: u64,
    pub session_bytes_out: u64,
    pub session_frames_in: u64,
    pub session_bytes_in: u64,
}

/// A sessions frame sent to a peer, for the counters: a registry message or a moved session, and its bytes.
struct SentFrame {
    registry: Option<bool>,
    len: u64,
}

impl SentFrame {
    fn of(frame: &[u8]) -> SentFrame {
        let registry = match link::frames(frame).next() {
            Some(Ok(Frame::Registry(_))) => Some(true),
            Some(Ok(Frame::Session { .. })) => Some(false),
            _ => None,
        };
        SentFrame { registry, len: frame.len() as u64 }
    }

    fn count(&self, c: &mut GatewayCounters) {
        match self.registry {
            Some(true) => {
                c.registry_out += 1;
                c.registry_bytes_out += self.len;
            }
            Some(false) => {
                c.session_frames_out += 1;
                c.session_bytes_out += self.len;
            }
            None => {}
        }
    }
}

/// Frames for peers whose link budget is full, in order, until it drains.
#[derive(Default)]
struct HeldFrames {
    by_peer: BTreeMap<NodeName, VecDeque<Vec<u8>>>,
    /// Invariant: the bytes in `by_peer`.
    bytes: usize,
}

pub struct Gateway {
    id: ShardId,
    cfg: GatewayConfig,
    started: Instant,
    zone: Zone,
    router: ZoneRouter,
    /// The shards' interest (what a message from a peer is delivered by) and node-level counts.
    view: NodeView,
    waits: InterestWaits,
    fwd: ForwardAcks,
    inject: InjectAcks,
    retained: RetainedSync,
    congestion: Congestion,
    /// Frames for peers whose link budget is full. Bounded: past [`HELD_LIMIT`] the socket side takes
    /// nothing more from the shards (`congested`).
    held: HeldFrames,
    /// Shards that have not yet acknowledged [`Mesh::ForwardAll`]; peers are served once it is 0.
    unready: usize,
    /// The session registry (see `sessions`).
    sessions: sessions::Sessions,
    out: VecDeque<(ShardId, Mesh)>,
    counters: GatewayCounters,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, zone: Zone, now: Instant) -> Gateway {
        let id = ShardId(cfg.shards);
        let registrar_cfg = crate::registrar::RegistrarConfig {
            partition_mode: cfg.partition_mode,
            wall_ms_at_start: cfg.wall_ms_at_start,
            ..Default::default()
        };
        let sessions = sessions::Sessions::new(zone.identity().name.clone(), registrar_cfg, cfg.shards, now);
        let mut g = Gateway {
            id,
            started: now,
            zone,
            router: ZoneRouter::new(INTEREST_ACK_TIMEOUT),
            view: NodeView::default(),
            waits: InterestWaits::default(),
            fwd: ForwardAcks::default(),
            inject: InjectAcks::default(),
            retained: RetainedSync::default(),
            congestion: Congestion::default(),
            held: HeldFrames::default(),
            unready: cfg.shards as usize,
            sessions,
            out: VecDeque::new(),
            counters: GatewayCounters::default(),
            cfg,
        };
        // Every publish comes here from now on; the peers are served once every shard applied that, so
        // that no publish routed after a peer's SUBACK can miss the gateway.
        for s in 0..g.cfg.shards {
            g.out.push_back((ShardId(s), Mesh::ForwardAll { on: true, token: Some(0) }));
        }
        g
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    pub fn identity(&self) -> &NodeIdentity {
        self.zone.identity()
    }

    /// The zone, for the socket side (datagrams, link bytes, link commands). Call [`Gateway::drive`]
    /// after feeding it.
    pub fn zone_mut(&mut self) -> &mut Zone {
        &mut self.zone
    }

    pub fn counters(&self) -> GatewayCounters {
        self.counters
    }

    pub fn router(&self) -> &ZoneRouter {
        &self.router
    }

    fn wall_ms(&self, now: Instant) -> u64 {
        self.cfg.wall_ms_at_start + now.saturating_duration_since(self.started).as_millis() as u64
    }

    /// A message from a shard, then [`Gateway::drive`].
    pub fn handle_mesh(&mut self, from: ShardId, m: Mesh, now: Instant) {
        self.take_mesh(from, m, now);
        self.drive(now);
    }

    /// A message from a shard, without [`Gateway::drive`]: for a caller that takes a batch of them and
    /// drives once after (what registrations produce for peers goes out then, together).
    pub fn take_mesh(&mut self, from: ShardId, m: Mesh, now: Instant) {
        match m {
            Mesh::Interest { deltas, token, .. } => {
                let tokens = self.view.apply_local(from, deltas, &mut self.router, now);
                self.flush_announcements();
                if let Some(token) = token {
                    if let Some(done) = self.waits.wait(from, token, tokens) {
                        self.out.push_back(done);
                    }
                }
                self.complete_interest();
            }
            Mesh::InterestAck { token } => {
                // The only token the gateway asks shards for: their answer to `ForwardAll`.
                if token == 0 && self.unready > 0 {
                    self.unready -= 1;
                    if self.unready == 0 {
                        tracing::debug!("every shard forwards publishes to the cluster gateway");
                    }
                }
            }
            Mesh::Deliver { msg, normal, groups, rerouted, ack } => {
                self.forward(&msg, normal, &groups, rerouted, ack, now);
            }
            Mesh::Retain { msg, apply, .. } => {
                // Only the owner shard's fan-out (`apply`) reaches the gateway.
                if apply {
                    self.local_retained(msg, now);
                }
            }
            Mesh::Stored { token, ok, forwarded, rerouted } => {
                if let Some((peer, t, ok)) = self.inject.answer(token, ok, forwarded, rerouted) {
                    self.send_frame(&peer, &Frame::Stored { token: t, ok });
                }
            }
            Mesh::RetainedHeld { msgs } => self.held_retained(msgs, now),
            Mesh::SessionsHeld { sessions } => self.sessions.restored(sessions),
            Mesh::Congestion { session, congested } => {
                if let Some((peer, origin, c)) = self.congestion.shard_reports(session, from, congested) {
                    self.counters.congestion_out += 1;
                    self.send_frame(&peer, &Frame::Congestion { origin, congested: c });
                }
            }
            // Drained by `drive`.
            Mesh::Register { token, client, clean_start, will, ahead } => {
                if ahead {
                    self.sessions.register_ahead(from, token, client, now);
                } else {
                    self.sessions.register(from, token, &client, clean_start, will, now);
                }
            }
            Mesh::Unregister { client, registration, kept } => {
                self.sessions.unregister(&client, registration, kept, now);
            }
            Mesh::Settled { client } => {
                let mut out = sessions::Output::default();
                self.sessions.settled_here(&client, &mut out);
                self.apply_sessions(out, now);
            }
            Mesh::Exported { client, state } => {
                let mut out = sessions::Output::default();
                self.sessions.exported(&client, state, now, &mut out);
                self.apply_sessions(out, now);
            }
            Mesh::ForwardAll { .. }
            | Mesh::Peers { .. }
            | Mesh::Registered { .. }
            | Mesh::PublishWill { .. }
            | Mesh::MergeSession { .. }
            | Mesh::EndForwarding { .. }
            | Mesh::EndSession { .. }
            | Mesh::RegisteredAhead { .. } => {}
        }
    }

    /// Handles what the zone produced (peers up and down, frames) and the router's completions. The
    /// socket side calls it after every batch of zone input.
    pub fn drive(&mut self, now: Instant) {
        if self.sessions.has_output() {
            self.drain_sessions(now);
        }
        if self.unready > 0 {
            return;
        }
        self.release_held();
        while let Some(ev) = self.zone.poll_event() {
            match ev {
                ZoneEvent::MemberUp(id) => {
                    tracing::info!(node = %id.name, addr = %id.addr, zone = %id.zone, "cluster member up")
                }
                ZoneEvent::MemberDown(id) => {
                    tracing::info!(node = %id.name, addr = %id.addr, "cluster member down")
                }
                ZoneEvent::PeerUp { peer } => self.peer_up(peer, now),
                ZoneEvent::PeerDown { peer, reason } => self.peer_down(peer, reason, now),
                ZoneEvent::Frames { from, frames } => {
                    for f in link::frames(&frames) {
                        match f {
                            Ok(f) => {
                                // What a run of registry frames produced goes out together, before
                                // anything else is handled (the order of the rest is kept).
                                if !matches!(f, Frame::Registry(_)) && self.sessions.has_output() {
                                    self.drain_sessions(now);
                                }
                                self.handle_frame(&from, f, now)
                            }
                            Err(_) => {
                                self.counters.malformed += 1;
                                tracing::warn!(node = %from, "undecodable frame from a cluster peer; ignored");
                                break;
                            }
                        }
                    }
                    if self.sessions.has_output() {
                        self.drain_sessions(now);
                    }
                }
                ZoneEvent::Refused { addr, reason } => {
                    tracing::warn!(?addr, %reason, "cluster link refused")
                }
            }
        }
        self.flush_announcements();
        self.complete_interest();
        self.sync_link_congestion();
    }

    fn peer_up(&mut self, peer: NodeIdentity, now: Instant) {
        // Zone events are handled after the fact: a link replaced meanwhile (two nodes dialling each
        // other at once) has its own PeerDown and PeerUp queued behind this one. Snapshots now would only
        // be refused; the later PeerUp sends them.
        if !self.zone.peers_up().any(|p| *p == peer) {
            return;
        }
        tracing::info!(node = %peer.name, addr = %peer.addr, "cluster peer linked");
        self.router.peer_up(peer.name.clone());
        self.sessions.registrar.handle_peer_up(&peer.name, now);
        let mut out = sessions::Output::default();
        self.sessions.peer_up(&peer.name, &mut out);
        self.apply_sessions(out, now);
        self.drain_sessions(now);
        self.tell_peers();
        self.flush_announcements();
        self.send_retained_snapshot(&peer.name, now);
        self.sync_remote_shared();
    }

    fn peer_down(&mut self, peer: NodeIdentity, reason: &str, now: Instant) {
        tracing::warn!(node = %peer.name, addr = %peer.addr, reason, "cluster peer unlinked");
        self.router.peer_down(&peer.name);
        self.sessions.registrar.handle_peer_down(&peer.name, now);
        // What was held for it goes, as it would have in its link (counted like a message not sent).
        self.counters.registry_not_sent += self.sessions.hold.drop_peer(&peer.name) as u64;
        let mut out = sessions::Output::default();
        self.sessions.peer_down(&peer.name, &mut out);
        self.apply_sessions(out, now);
        self.drain_sessions(now);
        self.tell_peers();
        let given_up = self.fwd.peer_down(&peer.name, &mut self.out);
        self.counters.stored_unconfirmed += given_up;
        self.inject.peer_down(&peer.name);
        if let Some(q) = self.held.by_peer.remove(&peer.name) {
            self.counters.dropped_not_connected += q.len() as u64;
            self.held.bytes -= q.iter().map(Vec::len).sum::<usize>();
        }
        for (o, c) in self.congestion.peer_down(&peer.name) {
            self.out.push_back((o.shard, Mesh::Congestion { session: o.session, congested: c }));
        }
        self.sync_remote_shared();
    }

    fn handle_frame(&mut self, from: &NodeName, frame: Frame<'_>, now: Instant) {
        match frame {
            Frame::Forward(f) => self.receive_forward(from, f, now),
            Frame::Stored { token, ok } => {
                if let Some((to, m)) = self.fwd.answer(token, from, ok) {
                    self.out.push_back((to, m));
                }
            }
            Frame::Interest(body) => match Announce::decode(body) {
                Ok(a) => {
                    self.router.handle(from, a);
                    self.flush_announcements();
                    self.sync_remote_shared();
                }
                Err(e) => {
                    self.counters.malformed += 1;
                    tracing::warn!(node = %from, error = %e, "bad interest announcement from a cluster peer");
                }
            },
            Frame::Retained(r) => self.receive_retained(from, r, now),
            Frame::Session { client, epoch, state } => {
                self.counters.session_frames_in += 1;
                let body = link::varint_len(client.len() as u64)
                    + client.len()
                    + link::varint_len(epoch)
                    + state.len();
                self.counters.session_bytes_in += link::framed_len(body) as u64;
                let mut out = sessions::Output::default();
                if !self.sessions.session_from(from, client, epoch, state, now, &mut out) {
                    self.counters.malformed += 1;
                    tracing::warn!(node = %from, %client, "a moved session that does not decode; a new one starts");
                }
                self.apply_sessions(out, now);
            }
            Frame::SessionSettled { client, .. } => {
                if self.sessions.settled_at(from, client) {
                    // Every node routes the session to its new node now; what they sent here before they
                    // did is ahead of their answers to a barrier on each link.
                    let client: Arc<str> = client.into();
                    match self.router.barrier(now) {
                        Some(token) => self.sessions.await_barrier(token, client),
                        None => {
                            let mut out = sessions::Output::default();
                            self.sessions.end_forwarding(client, &mut out);
                            self.apply_sessions(out, now);
                        }
                    }
                }
            }
            Frame::Registry(body) => {
                // Drained by `drive` once the run of registry frames ends.
                let (n, bad) = self.sessions.receive(from, body, now);
                self.counters.registry_in += n;
                self.counters.registry_bytes_in += link::framed_len(body.len()) as u64;
                if bad {
                    self.counters.malformed += 1;
                    tracing::warn!(node = %from, "bad session registry message from a cluster peer");
                }
            }
            Frame::Congestion { origin, congested } => {
                if origin.shard >= self.cfg.shards {
                    self.counters.malformed += 1;
                    return;
                }
                self.counters.congestion_in += 1;
                let o = Origin { shard: ShardId(origin.shard), session: SessionKey(origin.session) };
                if let Some(c) = self.congestion.peer_reports(from, o, congested) {
                    self.out.push_back((o.shard, Mesh::Congestion { session: o.session, congested: c }));
                }
            }
            _ => {
                self.counters.malformed += 1;
                tracing::warn!(node = %from, "unexpected frame from a cluster peer; ignored");
            }
        }
    }

    /// Sends what the registrar produced: registry messages to peers, answers and orders to shards.
    fn drain_sessions(&mut self, now: Instant) {
        let mut out = sessions::Output::default();
        self.sessions.drain(now, &mut out);
        self.apply_sessions(out, now);
    }

    fn apply_sessions(&mut self, out: sessions::Output, now: Instant) {
        for (peer, bytes, messages) in out.frames {
            self.send_registry_frame(&peer, bytes, messages);
        }
        for (peer, client, frame) in out.sessions {
            // Registry messages held for the peer go first (a session handed over comes after them).
            if let Some(msgs) = self.sessions.hold.take(&peer) {
                self.send_registry(&peer, &msgs);
            }
            if !self.zone.peers_up().any(|p| p.name == peer) {
                self.sessions.hold_unsent(peer, client, frame, now);
                continue;
            }
            let sent = SentFrame::of(&frame);
            if !self.send_bytes(&peer, frame) {
                self.counters.registry_not_sent += 1;
            } else {
                sent.count(&mut self.counters);
            }
        }
        self.out.extend(out.mesh);
    }

    /// A frame of `messages` registry messages (0: another frame of the sessions' protocol).
    fn send_registry_frame(&mut self, peer: &NodeName, bytes: Vec<u8>, messages: u64) {
        let len = bytes.len() as u64;
        if !self.send_bytes(peer, bytes) {
            self.counters.registry_not_sent += messages;
        } else if messages > 0 {
            self.counters.registry_out += messages;
            self.counters.registry_bytes_out += len;
        }
    }

    fn send_registry(&mut self, peer: &NodeName, msgs: &[crate::registrar::RegistryMsg]) {
        for (frame, n) in crate::link::registry::frames(msgs) {
            self.send_registry_frame(peer, frame, n);
        }
    }

    /// Sends the registry messages held back to go with others (see `hold`) at once: the node leaves.
    pub fn flush_held(&mut self) {
        for (peer, msgs) in self.sessions.hold.take_all() {
            self.send_registry(&peer, &msgs);
        }
    }

    /// What the session registry counted.
    pub fn registrar_counters(&self) -> crate::registrar::RegistrarCounters {
        self.sessions.registrar.counters()
    }

    /// What moving sessions between nodes counted.
    pub fn session_counters(&self) -> sessions::SessionCounters {
        self.sessions.counters
    }

    /// Tells the shards which nodes this one is linked with now.
    fn tell_peers(&mut self) {
        let mut up: Vec<Arc<str>> = self.zone.peers_up().map(|p| p.name.0.clone()).collect();
        up.sort_unstable();
        up.dedup();
        for s in 0..self.cfg.shards {
            self.out.push_back((ShardId(s), Mesh::Peers { up: up.clone() }));
        }
    }

    /// Sends what the router wants the peers to hear (snapshots, deltas, acknowledgements).
    fn flush_announcements(&mut self) {
        while let Some((peer, a)) = self.router.poll_announce() {
            let mut body = Vec::new();
            a.encode(&mut body);
            self.send_frame(&peer, &Frame::Interest(&body));
        }
    }

    /// Answers the shards' interest announcements whose peers all acknowledged.
    fn complete_interest(&mut self) {
        while let Some(t) = self.router.poll_completed() {
            if let Some(client) = self.sessions.barrier_done(t) {
                self.out.push_back((owner_of(&client, self.cfg.shards), Mesh::EndForwarding { client }));
                continue;
            }
            self.view.announced(t);
            self.waits.router_done(t, &mut self.out);
        }
    }

    fn send_frame(&mut self, peer: &NodeName, f: &Frame<'_>) -> bool {
        let mut buf = Vec::new();
        link::encode(f, &mut buf);
        self.send_bytes(peer, buf)
    }

    /// Sends a frame, or holds it behind the others held for that peer when the link's budget is full:
    /// the gateway takes what one drain of its inbox brings before it sees the congestion (see
    /// `held`), and frames keep their order. `false`: not sent and not held (counted).
    fn send_bytes(&mut self, peer: &NodeName, buf: Vec<u8>) -> bool {
        if let Some(q) = self.held.by_peer.get_mut(peer) {
            self.held.bytes += buf.len();
            q.push_back(buf);
            return true;
        }
        if let Ok(false) = self.zone.fits(peer, buf.len()) {
            self.held.bytes += buf.len();
            self.held.by_peer.entry(peer.clone()).or_default().push_back(buf);
            return true;
        }
        match self.zone.send(peer, buf) {
            Ok(()) => true,
            Err(crate::zone::SendError::NotConnected) => {
                self.counters.dropped_not_connected += 1;
                false
            }
            Err(crate::zone::SendError::Full) => {
                self.counters.dropped_backlog_full += 1;
                false
            }
        }
    }

    /// Moves held frames to their links as their budgets allow, in order.
    fn release_held(&mut self) {
        let peers: Vec<NodeName> = self.held.by_peer.keys().cloned().collect();
        for peer in peers {
            let Some(mut q) = self.held.by_peer.remove(&peer) else { continue };
            while let Some(f) = q.front() {
                match self.zone.fits(&peer, f.len()) {
                    Ok(true) => {
                        let f = q.pop_front().expect("checked");
                        self.held.bytes -= f.len();
                        if self.zone.send(&peer, f).is_err() {
                            self.counters.dropped_backlog_full += 1;
                        }
                    }
                    Ok(false) => break,
                    Err(_) => {
                        // Down meanwhile: what was held for it is lost with the link.
                        self.counters.dropped_not_connected += q.len() as u64;
                        self.held.bytes -= q.iter().map(Vec::len).sum::<usize>();
                        q.clear();
                    }
                }
            }
            if !q.is_empty() {
                self.held.by_peer.insert(peer, q);
            }
        }
    }

    /// Frames held for full links passed [`HELD_LIMIT`]: the socket side stops taking the shards'
    /// messages (the shards' read gate then pauses all their publishers) until they drain. Before that,
    /// only the publishers whose messages go to congested links alone are paused (`sync_link_congestion`).
    pub fn congested(&self) -> bool {
        self.held.bytes > HELD_LIMIT
    }

    /// Tells the shards which publishers reach only peers whose links are congested (over half their
    /// budget, or with frames held): their shards pause them as for congested subscribers.
    fn sync_link_congestion(&mut self) {
        let mut mask = 0u64;
        for p in self.zone.peers_up() {
            if self.zone.peer_congested(&p.name) {
                mask |= self.congestion.bit_of(&p.name);
            }
        }
        for name in self.held.by_peer.keys() {
            mask |= self.congestion.bit_of(name);
        }
        for (o, c) in self.congestion.links_congested(mask) {
            self.out.push_back((o.shard, Mesh::Congestion { session: o.session, congested: c }));
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.router.handle_timeout(now);
        let mut out = sessions::Output::default();
        self.sessions.handle_timeout(now, &mut out);
        self.apply_sessions(out, now);
        self.drain_sessions(now);
        self.complete_interest();
        let late = self.fwd.expire(now, &mut self.out);
        if late > 0 {
            self.counters.stored_unconfirmed += late;
            tracing::warn!(
                late,
                "peers did not confirm storing forwarded messages in time; acknowledged anyway"
            );
        }
        if now >= self.retained.next_prune_at(self.started) {
            let wall = self.wall_ms(now);
            self.retained.prune(wall, now);
        }
        self.drive(now);
    }

    /// The earliest deadline of the gateway's own timers (the zone's are its own: see `Zone::poll_timeout`).
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.router.poll_timeout(),
            self.fwd.next_deadline(),
            Some(self.retained.next_prune_at(self.started)),
            self.sessions.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_mesh(&mut self) -> Option<(ShardId, Mesh)> {
        self.out.pop_front()
    }

    /// Messages the gateway keeps (retained replica), for stats.
    pub fn retained_len(&self) -> usize {
        self.retained.len()
    }

    /// Tells the shards the zone's shared-group members outside this node, where they changed.
    fn sync_remote_shared(&mut self) {
        self.view.sync_remote_shared(&self.router, self.cfg.shards, &mut self.out);
    }

    fn owner_shard(&self, topic: &str) -> ShardId {
        shardmq_shard::core::owner_of(topic, self.cfg.shards)
    }
}

/// A message's properties as a link frame carries them: the PUBLISH property block without the expiry
/// (empty when there are none), and the expiry's remaining seconds apart.
fn frame_properties(msg: &Msg, now: Instant) -> (Vec<u8>, Option<u32>) {
    if msg.props.is_none() {
        // The common case, without building a (large) property set per message.
        return (Vec::new(), msg.expiry_interval_s(now));
    }
    let mut p = msg.wire_properties(now);
    let expiry_s = p.message_expiry_interval_s.take();
    let mut block = Vec::new();
    if !p.is_empty() {
        // Properties a shard accepted from a client always encode; an impossible failure sends none.
        let _ = shardmq_wire::encode_publish_properties(&p, &mut block);
    }
    (block, expiry_s)
}

/// Rebuilds a message from a peer's frame fields; `None` if the topic or properties are invalid.
fn msg_from_frame(
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    properties: &[u8],
    expiry_s: Option<u32>,
    now: Instant,
) -> Option<Msg> {
    if !shardmq_wire::topic::valid_topic_name(topic) {
        return None;
    }
    let qos = shardmq_wire::QoS::from_u8(qos)?;
    let props = if properties.is_empty() {
        None
    } else {
        let p = shardmq_wire::decode_publish_properties(properties).ok()?;
        shardmq_shard::core::MsgProps::from_wire(&p)
    };
    Some(Msg {
        topic: topic.into(),
        payload: payload.into(),
        qos,
        retain,
        expires_at: expiry_s.map(|s| now + Duration::from_secs(s as u64)),
        props,
        origin: None,
    })
}

/// Shards of a node get a shared `Arc` of a message.
fn shared(m: Msg) -> Arc<Msg> {
    Arc::new(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ZoneConfig;
    use shardmq_shard::core::SharedKey;
    use shardmq_wire::QoS;

    fn ready_gateway(shards: u16, now: Instant) -> Gateway {
        let id = NodeIdentity::new("n1", ([127, 0, 0, 1], 7001).into(), "z", "r", 1);
        let zone = Zone::new(ZoneConfig::new(id), 1, now);
        let cfg = GatewayConfig {
            shards,
            persistent: true,
            wall_ms_at_start: 1_800_000_000_000,
            partition_mode: Default::default(),
        };
        let mut g = Gateway::new(cfg, zone, now);
        let asks: Vec<_> = std::iter::from_fn(|| g.poll_mesh()).collect();
        assert_eq!(asks.len(), shards as usize, "ForwardAll to every shard");
        for s in 0..shards {
            g.handle_mesh(ShardId(s), Mesh::InterestAck { token: 0 }, now);
        }
        g
    }

    fn msg(topic: &str, qos: QoS) -> Arc<Msg> {
        Arc::new(Msg {
            topic: topic.into(),
            payload: b"p".to_vec().into(),
            qos,
            retain: false,
            expires_at: None,
            props: None,
            origin: None,
        })
    }

    #[test]
    fn a_publish_no_peer_wants_is_answered_at_once_and_a_rerouted_one_says_so() {
        let now = Instant::now();
        let mut g = ready_gateway(2, now);
        let key: SharedKey = (Some("g".into()), "t".into());
        for rerouted in [false, true] {
            let d = Mesh::Deliver {
                msg: msg("t", QoS::AtLeastOnce),
                normal: !rerouted,
                groups: vec![key.clone()],
                rerouted,
                ack: Some((ShardId(1), 7)),
            };
            g.handle_mesh(ShardId(1), d, now);
            let out: Vec<_> = std::iter::from_fn(|| g.poll_mesh()).collect();
            assert!(
                matches!(
                    out.as_slice(),
                    [(ShardId(1), Mesh::Stored { token: 7, ok: true, forwarded: 0, rerouted: r })] if *r == rerouted
                ),
                "{out:?}"
            );
        }
        // A QoS 0 publish asks for no answer.
        let d = Mesh::Deliver {
            msg: msg("t", QoS::AtMostOnce),
            normal: true,
            groups: Vec::new(),
            rerouted: false,
            ack: Some((ShardId(0), 8)),
        };
        g.handle_mesh(ShardId(0), d, now);
        assert!(g.poll_mesh().is_none());
    }

    #[test]
    fn interest_without_peers_is_acknowledged_at_once() {
        let now = Instant::now();
        let mut g = ready_gateway(2, now);
        let d = shardmq_shard::core::InterestDelta { key: (None, "a/#".into()), members: 1, durable: 0 };
        g.handle_mesh(ShardId(0), Mesh::Interest { deltas: vec![d], token: Some(3), generation: 1 }, now);
        let out: Vec<_> = std::iter::from_fn(|| g.poll_mesh()).collect();
        assert!(matches!(out.as_slice(), [(ShardId(0), Mesh::InterestAck { token: 3 })]), "{out:?}");
    }
}
