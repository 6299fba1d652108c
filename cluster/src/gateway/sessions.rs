//! The gateway's side of cluster sessions: it drives the node's [`Registrar`] for the shards and moves
//! sessions between nodes.
//!
//! - A shard holding a CONNECT asks for a registration ([`Mesh::Register`]). A refusal goes back at once
//!   ([`Mesh::Registered`]); so does a grant when no other node held the session. When another node held
//!   it, the grant waits (at most [`TRANSFER_TIMEOUT`], or until that node goes down) for the session
//!   itself, which then arrives with it and is installed before the CONNECT runs: session present.
//! - A clean connection its shard answered ahead ([`Mesh::Register`] `ahead`) is registered with a token:
//!   its grant tells the shard its epoch ([`Mesh::RegisteredAhead`]), its loss to a newer connection ends
//!   it by that token, and its end, reported with the token while the shard does not know the epoch,
//!   reaches the registrar as the end of that request.
//! - When another node's connection supersedes a session of this node, the registrar says so
//!   ([`RegistrarEvent::EndSession`]): the session's shard ends it, exporting it unless the new
//!   connection started clean ([`Mesh::EndSession`]: DISCONNECT 0x8E to a connected client), and hands
//!   what it exported back ([`Mesh::Exported`]), which goes to the successor in a [`Frame::Session`].
//! - Shards report connections that went and sessions that ended, with their epoch
//!   ([`Mesh::Unregister`]).
//!
//! - A registration carries its client's will; when a node dies, the owners publish the wills of its
//!   clients ([`RegistrarEvent::PublishWill`]) through one of this node's shards ([`Mesh::PublishWill`]).
//!
//! - A session that comes for the session this node holds now without having been waited for (it came
//!   after its CONNECT went on without it, or it lost a conflict to this one when a partition healed)
//!   hands its undelivered QoS 1/2 messages to it ([`Mesh::MergeSession`]).
//! - Sessions a shard restored from its log ([`Mesh::SessionsHeld`]) are held by the registrar as they
//!   were registered, and re-registered with their owners as peers come up.
//!
//! - After a session left, its old node forwards what the zone still routes to it there (`Forwarding`),
//!   until the new node says every node routes the session to it ([`Frame::SessionSettled`]) and a
//!   barrier shows every earlier forward has arrived.
//!
//! What it does not do: keep a session the new node never stored (it dies with it in flight).

use ahash::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_shard::core::{
    owner_of, HeldRegistration, Mesh, RegisterOutcome, RegisteredWill, SessionOf, SessionTransfer,
    ZoneRegistration, FORWARDING_TIMEOUT,
};
use shardmq_shard::ShardId;

use super::hold::Hold;
use crate::link::registry as reg;
use crate::link::{self, Frame};
use crate::registrar::{Registrar, RegistrarConfig, RegistrarEvent, RegistryMsg, RequestId};
use crate::registry::WillInfo;
use crate::retained::HlcStamp;
use crate::NodeName;

/// How long a grant waits for the session from the node that held it before the CONNECT goes on with
/// a new session.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3);

/// A grant waiting for its session.
struct Awaiting {
    shard: ShardId,
    token: u64,
    registration: ZoneRegistration,
    from: NodeName,
    deadline: Instant,
}

/// How long a session for a successor whose link is not up is kept for it (after a partition heals, the
/// registry may tell this node of its successor before their link is back).
pub const UNSENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A session waiting for its successor's link.
struct Unsent {
    to: NodeName,
    client: Arc<str>,
    frame: Vec<u8>,
    deadline: Instant,
}

/// A session that came before its grant (the grant travels from the id's owner, the session from the
/// node that held it: two links, no order between them).
struct Early {
    from: NodeName,
    epoch: u64,
    transfer: Option<Box<SessionTransfer>>,
    /// Messages its old node forwarded after it (see [`Forwarding`]), in order.
    #[allow(clippy::vec_box)] // moved on as they are, boxed, in `Mesh::MergeSession`
    more: Vec<Box<SessionTransfer>>,
    deadline: Instant,
}

/// A session this node exported to a successor whose subscriptions still route here (the shard keeps a
/// forwarding stub): what reaches the stub follows the session there, until the successor says it routes
/// them itself ([`Frame::SessionSettled`]).
struct Forwarding {
    to: NodeName,
    epoch: u64,
    deadline: Instant,
    /// The successor said it routes the session itself: the stub ends after a barrier.
    settled: bool,
}

/// What the gateway keeps for the registrar.
pub(super) struct Sessions {
    pub(super) registrar: Registrar,
    me: NodeName,
    /// Registrations a shard waits for: its CONNECT's token.
    waiting: HashMap<RequestId, (ShardId, u64)>,
    /// The last registration of each client id whose connection a shard answered ahead, until its
    /// answer or the connection's end: the request, and the shard and token it came with.
    ahead: HashMap<Arc<str>, (RequestId, ShardId, u64)>,
    /// Grants waiting for the session from its previous node, by client id.
    awaiting: HashMap<Arc<str>, Awaiting>,
    /// Sessions waiting for their grant, by client id.
    early: HashMap<Arc<str>, Early>,
    /// Sessions this node's shards are ending for a successor: where to send what they export.
    ending: HashMap<Arc<str>, (NodeName, u64)>,
    /// Exported sessions whose successor's link was not up when they were sent.
    unsent: Vec<Unsent>,
    /// Sessions exported from here whose stubs still forward, by client id.
    forwarding: HashMap<Arc<str>, Forwarding>,
    /// Barriers (router tokens) whose completion ends a forwarding stub, with its client id.
    barriers: HashMap<u64, Arc<str>>,
    /// Sessions moved here whose old node forwards until this node routes them: to tell it when it does
    /// (the shard's [`Mesh::Settled`]), by client id.
    settling: HashMap<Arc<str>, (NodeName, u64, Instant)>,
    /// Registry messages that can wait, held for others to the same peer.
    pub(super) hold: Hold,
    shards: u16,
    pub(super) counters: SessionCounters,
}

/// What moving sessions counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionCounters {
    /// Sessions sent to the node that took them over, and received from the node that held them.
    pub sessions_sent: u64,
    pub sessions_received: u64,
    /// Grants that went on without the session: it did not come in time, or its node went down.
    pub sessions_not_received: u64,
    /// Sessions that came for a connection this node no longer has (dropped, logged).
    pub sessions_late: u64,
    /// Sessions that came for the session this node holds without having waited for them (late, or the
    /// loser of a conflict): their messages were handed to it.
    pub sessions_merged: u64,
    /// Exported sessions that could not be sent: their successor's link did not come up in
    /// [`UNSENT_TIMEOUT`] (dropped, logged).
    pub sessions_unsent: u64,
    /// Messages that reached a session here after it moved, forwarded to its new node.
    pub messages_forwarded: u64,
}

/// What the gateway must do after the registrar ran: frames for peers, messages for shards.
#[derive(Default)]
pub(super) struct Output {
    /// Whole frames for peers, with the registry messages each carries (0 for other frames).
    pub frames: Vec<(NodeName, Vec<u8>, u64)>,
    /// Sessions for their successors (`Frame::Session`): held when the link is not up
    /// ([`Sessions::hold_unsent`]), unlike registry frames, which are repeated after membership changes.
    pub sessions: Vec<(NodeName, Arc<str>, Vec<u8>)>,
    pub mesh: Vec<(ShardId, Mesh)>,
}

impl Sessions {
    pub(super) fn new(me: NodeName, cfg: RegistrarConfig, shards: u16, now: Instant) -> Sessions {
        Sessions {
            registrar: Registrar::new(me.clone(), cfg, now),
            me,
            waiting: HashMap::default(),
            ahead: HashMap::default(),
            awaiting: HashMap::default(),
            early: HashMap::default(),
            ending: HashMap::default(),
            unsent: Vec::new(),
            forwarding: HashMap::default(),
            barriers: HashMap::default(),
            settling: HashMap::default(),
            hold: Hold::default(),
            shards,
            counters: SessionCounters::default(),
        }
    }

    pub(super) fn register(
        &mut self,
        from: ShardId,
        token: u64,
        client: &str,
        clean_start: bool,
        will: Option<Box<RegisteredWill>>,
        now: Instant,
    ) {
        let will = will.map(|w| WillInfo {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            delay_s: w.delay_s,
        });
        let request = self.registrar.handle_connect(client, clean_start, will, now);
        self.waiting.insert(request, (from, token));
    }

    /// A shard answered a clean connection ahead of its registration ([`Mesh::Register`] `ahead`).
    pub(super) fn register_ahead(&mut self, from: ShardId, token: u64, client: Arc<str>, now: Instant) {
        let request = self.registrar.handle_connect_ahead(client.clone(), now);
        self.ahead.insert(client, (request, from, token));
    }

    /// Sessions a shard restored from its log, offline: held by this node as they were registered, and
    /// re-registered with their owners as peers come up (ended here if they moved meanwhile).
    pub(super) fn restored(&mut self, sessions: Vec<HeldRegistration>) {
        for s in sessions {
            let r = s.registration;
            self.registrar.restore(&s.client, r.epoch.max(1), HlcStamp(r.stamp));
        }
    }

    /// The connection of `registration` went (`kept`: the session stays here, offline) or the session
    /// ended. The registrar ignores an epoch it no longer holds (a connection since superseded).
    pub(super) fn unregister(
        &mut self,
        client: &str,
        registration: ZoneRegistration,
        kept: bool,
        now: Instant,
    ) {
        // The client's connection answered ahead, if it had one here, is gone (a later one registers
        // after this): its answer concerns no shard any more.
        let ahead = self.ahead.remove(client);
        match registration.ahead_token() {
            Some(token) => {
                debug_assert!(!kept, "a session registered ahead ends with its connection");
                // Not found: it lost to a newer connection already (`Superseded`).
                if let Some((request, ..)) = ahead.filter(|a| a.2 == token) {
                    self.registrar.handle_disconnect_ahead(client, request, now);
                }
            }
            None => self.registrar.handle_disconnect(client, registration.epoch, kept, now),
        }
    }

    /// Whether the registrar has messages or events not drained yet.
    pub(super) fn has_output(&self) -> bool {
        self.registrar.has_output()
    }

    /// The messages of a registry frame from `from`: how many were taken, and whether one (which ended
    /// the frame) could not be decoded.
    pub(super) fn receive(&mut self, from: &NodeName, body: &[u8], now: Instant) -> (u64, bool) {
        let mut n = 0;
        for m in reg::messages(body) {
            match m {
                Ok(m) => {
                    self.registrar.handle_message(from, m, now);
                    n += 1;
                }
                Err(_) => return (n, true),
            }
        }
        (n, false)
    }

    /// A shard exported (or ended) a session this node lost to a successor, or forwarded a message that
    /// reached the session's stub after it left: send it there.
    pub(super) fn exported(
        &mut self,
        client: &str,
        state: Option<Box<SessionTransfer>>,
        now: Instant,
        out: &mut Output,
    ) {
        let (successor, epoch) = match self.ending.remove(client) {
            Some((successor, epoch)) => {
                if state.is_some() {
                    // Past the stub's own end (its timer started a moment before), with room for what it
                    // forwarded just before it to come through the shard's queue.
                    let deadline = now + FORWARDING_TIMEOUT + Duration::from_secs(1);
                    let f = Forwarding { to: successor.clone(), epoch, deadline, settled: false };
                    self.forwarding.insert(client.into(), f);
                }
                (successor, epoch)
            }
            None => match self.forwarding.get(client) {
                Some(f) if state.is_some() => {
                    self.counters.messages_forwarded += 1;
                    (f.to.clone(), f.epoch)
                }
                Some(_) => return,
                None => {
                    if state.is_some() {
                        self.counters.sessions_unsent += 1;
                        tracing::warn!(%client, "an exported session with no node to go to; its messages are dropped");
                    }
                    return;
                }
            },
        };
        let bytes = state.map(|t| t.encode()).unwrap_or_default();
        let mut frame = Vec::with_capacity(bytes.len() + client.len() + 16);
        link::encode(&Frame::Session { client, epoch, state: &bytes }, &mut frame);
        self.counters.sessions_sent += !bytes.is_empty() as u64;
        out.sessions.push((successor, client.into(), frame));
    }

    /// `client`'s session, moved to `from`, is routed there by every node now: its stub here may end
    /// once what the other nodes sent here before they knew has arrived. `true`: wait for a barrier (see
    /// [`crate::router::ZoneRouter::barrier`]), then call [`Sessions::end_forwarding`].
    pub(super) fn settled_at(&mut self, from: &NodeName, client: &str) -> bool {
        match self.forwarding.get_mut(client) {
            Some(f) if f.to == *from && !f.settled => {
                f.settled = true;
                true
            }
            _ => false,
        }
    }

    /// Ends `client`'s forwarding stub: nothing more for it is on its way here. What its shard forwarded
    /// before it handles this still goes.
    pub(super) fn end_forwarding(&mut self, client: Arc<str>, out: &mut Output) {
        out.mesh.push((owner_of(&client, self.shards), Mesh::EndForwarding { client }));
    }

    /// `client`'s stub ends when barrier `token` completes.
    pub(super) fn await_barrier(&mut self, token: u64, client: Arc<str>) {
        self.barriers.insert(token, client);
    }

    /// The client whose stub barrier `token` was for, if it was one.
    pub(super) fn barrier_done(&mut self, token: u64) -> Option<Arc<str>> {
        self.barriers.remove(&token)
    }

    /// The shard that installed `client`'s moved session routes it zone-wide now: the node it came from
    /// is told, and ends its stub.
    pub(super) fn settled_here(&mut self, client: &str, out: &mut Output) {
        if let Some((from, epoch, _)) = self.settling.remove(client) {
            self.settled_for(&from, client, epoch, out);
        }
    }

    /// A session for `to` that could not be sent (its link is not up): kept until the link comes up,
    /// for at most [`UNSENT_TIMEOUT`].
    pub(super) fn hold_unsent(&mut self, to: NodeName, client: Arc<str>, frame: Vec<u8>, now: Instant) {
        tracing::debug!(%client, node = %to, "a session for a node not linked yet; held until it is");
        self.unsent.push(Unsent { to, client, frame, deadline: now + UNSENT_TIMEOUT });
    }

    /// `peer`'s link is up: the sessions held for it go.
    pub(super) fn peer_up(&mut self, peer: &NodeName, out: &mut Output) {
        let (go, stay): (Vec<Unsent>, Vec<Unsent>) =
            std::mem::take(&mut self.unsent).into_iter().partition(|u| u.to == *peer);
        self.unsent = stay;
        out.sessions.extend(go.into_iter().map(|u| (u.to, u.client, u.frame)));
    }

    /// The session of `client` from the node that held it; `false` when its state did not decode.
    pub(super) fn session_from(
        &mut self,
        from: &NodeName,
        client: &str,
        epoch: u64,
        state: &[u8],
        now: Instant,
        out: &mut Output,
    ) -> bool {
        let transfer = if state.is_empty() {
            None
        } else {
            match SessionTransfer::decode(state) {
                Ok(t) if *t.client_id == *client => Some(Box::new(t)),
                _ => {
                    self.answer_without(client, out);
                    return false;
                }
            }
        };
        let matches =
            self.awaiting.get(client).is_some_and(|a| a.registration.epoch == epoch && a.from == *from);
        if !matches && self.registrar.holds_since(client, epoch) {
            // For the session this node holds now (with that epoch, or a later one it registered itself
            // meanwhile), whose CONNECT did not wait for it (it came late, or it lost a conflict to this
            // one after a partition): its messages go to that session.
            if let Some(t) = transfer {
                self.merge(t, out);
                // Merged into a session of this node's own (not one installed here, whose old node
                // forwards until every node routes it here: its shard says when): nothing to wait for.
                if !self.settling.contains_key(client) {
                    self.settled_for(from, client, epoch, out);
                }
            }
            return true;
        }
        if !matches {
            // Its grant may still be on its way: kept until it comes (or for as long as a grant waits).
            // Messages forwarded after it join it.
            if let Some(e) = self.early.get_mut(client).filter(|e| e.from == *from && e.epoch == epoch) {
                e.more.extend(transfer);
                return true;
            }
            let deadline = now + TRANSFER_TIMEOUT;
            let e = Early { from: from.clone(), epoch, transfer, more: Vec::new(), deadline };
            self.early.insert(client.into(), e);
            return true;
        }
        let a = self.awaiting.remove(client).expect("checked above");
        self.counters.sessions_received += transfer.is_some() as u64;
        if transfer.is_some() {
            self.settling.insert(client.into(), (from.clone(), epoch, now + FORWARDING_TIMEOUT));
        }
        let outcome = RegisterOutcome::Granted { session: transfer, registration: a.registration };
        out.mesh.push((a.shard, Mesh::Registered { token: a.token, outcome }));
        true
    }

    /// Tells `from`, which sent `client`'s session here, that it need not forward more of it: merged into
    /// the session here, its messages go where that one's are routed.
    fn settled_for(&mut self, from: &NodeName, client: &str, epoch: u64, out: &mut Output) {
        let mut frame = Vec::with_capacity(client.len() + 16);
        link::encode(&Frame::SessionSettled { client, epoch }, &mut frame);
        out.frames.push((from.clone(), frame, 0));
    }

    fn merge(&mut self, t: Box<SessionTransfer>, out: &mut Output) {
        self.counters.sessions_merged += 1;
        let shard = owner_of(&t.client_id, self.shards);
        out.mesh.push((shard, Mesh::MergeSession { transfer: t }));
    }

    fn answer_without(&mut self, client: &str, out: &mut Output) {
        if let Some(a) = self.awaiting.remove(client) {
            self.counters.sessions_not_received += 1;
            let outcome = RegisterOutcome::Granted { session: None, registration: a.registration };
            out.mesh.push((a.shard, Mesh::Registered { token: a.token, outcome }));
        }
    }

    /// `peer` went down: grants waiting for a session from it go on without.
    pub(super) fn peer_down(&mut self, peer: &NodeName, out: &mut Output) {
        let lost: Vec<Arc<str>> =
            self.awaiting.iter().filter(|(_, a)| a.from == *peer).map(|(c, _)| c.clone()).collect();
        for c in lost {
            self.answer_without(&c, out);
        }
        // Sessions being exported for `peer` are not forgotten: a link that flaps (two nodes dialling each
        // other as a partition heals) comes back at once, and an exported session waits for it
        // (`hold_unsent`); one that does not come back is dropped and counted then.
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let grants = self.awaiting.values().map(|a| a.deadline).min();
        let early = self.early.values().map(|e| e.deadline).min();
        let unsent = self.unsent.iter().map(|u| u.deadline).min();
        let forwarding = self.forwarding.values().map(|f| f.deadline).min();
        let settling = self.settling.values().map(|s| s.2).min();
        [
            self.registrar.poll_timeout(),
            grants,
            early,
            unsent,
            forwarding,
            settling,
            self.hold.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub(super) fn handle_timeout(&mut self, now: Instant, out: &mut Output) {
        if self.registrar.poll_timeout().is_some_and(|t| t <= now) {
            self.registrar.handle_timeout(now);
        }
        // The stubs end by their own timer; the successor forgets who it would have told.
        self.forwarding.retain(|_, f| f.deadline > now);
        self.settling.retain(|_, s| s.2 > now);
        let (gone, stay): (Vec<Unsent>, Vec<Unsent>) =
            std::mem::take(&mut self.unsent).into_iter().partition(|u| u.deadline <= now);
        self.unsent = stay;
        for u in gone {
            self.counters.sessions_unsent += 1;
            tracing::warn!(client = %u.client, node = %u.to, "a session taken over by a node that never linked again; its messages are dropped");
        }
        let due: Vec<Arc<str>> =
            self.early.iter().filter(|(_, e)| e.deadline <= now).map(|(c, _)| c.clone()).collect();
        for client in due {
            let e = self.early.remove(&client).expect("listed above");
            let Some(t) = e.transfer else { continue };
            if self.registrar.holds_since(&client, e.epoch) {
                self.merge(t, out);
                for m in e.more {
                    self.merge(m, out);
                }
                self.settled_for(&e.from, &client, e.epoch, out);
            } else {
                self.counters.sessions_late += 1;
                tracing::warn!(%client, "a moved session whose connection never came here; dropped");
            }
        }
        let late: Vec<Arc<str>> =
            self.awaiting.iter().filter(|(_, a)| a.deadline <= now).map(|(c, _)| c.clone()).collect();
        for c in late {
            tracing::warn!(client = %c, "the session did not come from the node that held it in time; a new one starts");
            self.answer_without(&c, out);
        }
    }

    /// What the registrar has to send and say, turned into frames and shard messages.
    pub(super) fn drain(&mut self, now: Instant, out: &mut Output) {
        // The messages for one peer go together, in order, in as few frames as they fit; those that can
        // wait are held a moment for more (see `Hold`).
        let mut by_peer: Vec<(NodeName, Vec<RegistryMsg>, bool)> = Vec::new();
        while let Some((to, m, can_wait)) = self.registrar.poll_transmit_hinted() {
            match by_peer.iter_mut().find(|(p, ..)| *p == to) {
                Some((_, msgs, urgent)) => {
                    msgs.push(m);
                    *urgent |= !can_wait;
                }
                None => by_peer.push((to, vec![m], !can_wait)),
            }
        }
        for (to, msgs, urgent) in by_peer {
            if let Some(msgs) = self.hold.offer(&to, msgs, urgent, now) {
                for (frame, n) in reg::frames(&msgs) {
                    out.frames.push((to.clone(), frame, n));
                }
            }
        }
        for (to, msgs) in self.hold.take_due(now) {
            for (frame, n) in reg::frames(&msgs) {
                out.frames.push((to.clone(), frame, n));
            }
        }
        while let Some(ev) = self.registrar.poll_event() {
            match ev {
                RegistrarEvent::Granted { request, client, epoch, stamp, previous, provisional } => {
                    let registration = ZoneRegistration { epoch, stamp: stamp.0 };
                    if provisional {
                        tracing::debug!(%client, "registration granted here provisionally (owner unreachable)");
                    }
                    // A connection answered ahead: its shard learns the epoch (nothing waits for it, and a
                    // session it took over elsewhere is discarded there: it started clean).
                    // (Its entry stays: the shard may have reported the end of the connection before
                    // it hears of its epoch.)
                    if let Some(&(_, shard, token)) = self.ahead.get(&client).filter(|a| a.0 == request) {
                        out.mesh.push((shard, Mesh::RegisteredAhead { client, token, registration }));
                        continue;
                    }
                    let Some((shard, token)) = self.waiting.remove(&request) else { continue };
                    match previous {
                        Some(p) if p.holder != self.me => {
                            let came =
                                self.early.remove(&client).filter(|e| e.from == p.holder && e.epoch == epoch);
                            if let Some(e) = came {
                                self.counters.sessions_received += e.transfer.is_some() as u64;
                                if e.transfer.is_some() {
                                    let settle = now + FORWARDING_TIMEOUT;
                                    self.settling.insert(client.clone(), (e.from.clone(), epoch, settle));
                                }
                                let outcome = RegisterOutcome::Granted { session: e.transfer, registration };
                                out.mesh.push((shard, Mesh::Registered { token, outcome }));
                                for m in e.more {
                                    self.merge(m, out);
                                }
                                continue;
                            }
                            let deadline = now + TRANSFER_TIMEOUT;
                            let a = Awaiting { shard, token, registration, from: p.holder, deadline };
                            // A newer CONNECT of the same id supersedes an older one still waiting.
                            if let Some(old) = self.awaiting.insert(client, a) {
                                let outcome = RegisterOutcome::Granted {
                                    session: None,
                                    registration: old.registration,
                                };
                                out.mesh.push((old.shard, Mesh::Registered { token: old.token, outcome }));
                            }
                        }
                        _ => {
                            let outcome = RegisterOutcome::Granted { session: None, registration };
                            out.mesh.push((shard, Mesh::Registered { token, outcome }));
                        }
                    }
                }
                RegistrarEvent::Refused { request, client } => {
                    tracing::info!(%client, "CONNECT refused: the owner of its client id is unreachable");
                    if let Some((shard, token)) = self.waiting.remove(&request) {
                        out.mesh.push((shard, Mesh::Registered { token, outcome: RegisterOutcome::Refused }));
                    }
                }
                RegistrarEvent::EndSession { client, epoch, successor, successor_epoch, discard } => {
                    tracing::debug!(%client, %successor, discard, "session taken over by another node");
                    let shard = owner_of(&client, self.shards);
                    self.ending.insert(client.clone(), (successor, successor_epoch));
                    let of = SessionOf::Epoch(epoch);
                    out.mesh.push((shard, Mesh::EndSession { client, export: !discard, of }));
                }
                RegistrarEvent::Superseded { request, client, successor, successor_epoch } => {
                    let Some(&(_, shard, token)) = self.ahead.get(&client).filter(|a| a.0 == request) else {
                        continue;
                    };
                    tracing::debug!(%client, %successor, "a connection answered ahead lost to a newer one");
                    self.ahead.remove(&client);
                    self.ending.insert(client.clone(), (successor, successor_epoch));
                    let of = SessionOf::Ahead(token);
                    out.mesh.push((shard, Mesh::EndSession { client, export: false, of }));
                }
                RegistrarEvent::NoSession { client, successor, successor_epoch } => {
                    // What a shard with no session exports: nothing, which the successor may wait for.
                    let mut frame = Vec::with_capacity(client.len() + 16);
                    link::encode(
                        &Frame::Session { client: &client, epoch: successor_epoch, state: &[] },
                        &mut frame,
                    );
                    out.sessions.push((successor, client, frame));
                }
                RegistrarEvent::PublishWill { client, will, .. } => {
                    tracing::info!(%client, topic = %will.topic, "publishing the will of a client of a lost node");
                    let w = RegisteredWill {
                        topic: will.topic,
                        payload: will.payload,
                        qos: will.qos,
                        retain: will.retain,
                        delay_s: will.delay_s,
                    };
                    let shard = owner_of(&client, self.shards);
                    out.mesh.push((shard, Mesh::PublishWill { will: Box::new(w) }));
                }
            }
        }
    }
}
