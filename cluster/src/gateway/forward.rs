//! Publishes across the zone: forwarding a shard's publish to the peers that may want it, delivering a
//! peer's forward to this node's shards, and the durability answers both ways.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use shardmq_shard::core::{AckRequest, Mesh, Msg, Origin, SharedKey};
use shardmq_shard::ShardId;
use shardmq_wire::QoS;

use super::interest::full_filter;
use super::{frame_properties, msg_from_frame, shared, Gateway, STORED_TIMEOUT};
use crate::link::{self, Forward, Frame, OriginRef};
use crate::NodeName;

/// Tokens on the wire stay below 2^28 so that they take at most 4 bytes of a forward's framing.
const TOKEN_LIMIT: u32 = 1 << 28;

/// A shard's publish forwarded to peers whose answers its acknowledgement waits for.
struct Waiting {
    reply: (ShardId, u64),
    /// The shard's Deliver was passed on by another shard: the answer says so (see `Mesh::Stored`).
    rerouted: bool,
    peers: Vec<NodeName>,
    ok: bool,
    deadline: Instant,
}

/// Publishes forwarded with a durability request, by wire token.
#[derive(Default)]
pub(super) struct ForwardAcks {
    next: u32,
    pending: HashMap<u32, Waiting>,
}

impl ForwardAcks {
    fn token(&mut self) -> u32 {
        loop {
            self.next = self.next % (TOKEN_LIMIT - 1) + 1;
            if !self.pending.contains_key(&self.next) {
                return self.next;
            }
        }
    }

    /// A peer's answer; the shard's answer when it was the last one awaited.
    pub fn answer(&mut self, token: u32, from: &NodeName, ok: bool) -> Option<(ShardId, Mesh)> {
        let w = self.pending.get_mut(&token)?;
        let before = w.peers.len();
        w.peers.retain(|p| p != from);
        if w.peers.len() == before {
            return None;
        }
        w.ok &= ok;
        if !w.peers.is_empty() {
            return None;
        }
        let w = self.pending.remove(&token)?;
        Some(stored(w.reply, w.ok, w.rerouted))
    }

    /// A peer went down: nothing more is awaited from it. Returns how many answers were given up.
    pub fn peer_down(&mut self, peer: &NodeName, out: &mut VecDeque<(ShardId, Mesh)>) -> u64 {
        let mut given_up = 0;
        let mut done = Vec::new();
        for (t, w) in self.pending.iter_mut() {
            let before = w.peers.len();
            w.peers.retain(|p| p != peer);
            given_up += (before - w.peers.len()) as u64;
            if w.peers.is_empty() {
                done.push(*t);
            }
        }
        done.sort_unstable();
        for t in done {
            if let Some(w) = self.pending.remove(&t) {
                out.push_back(stored(w.reply, w.ok, w.rerouted));
            }
        }
        given_up
    }

    /// Answers the shards whose peers did not answer in time. Returns how many answers were given up.
    pub fn expire(&mut self, now: Instant, out: &mut VecDeque<(ShardId, Mesh)>) -> u64 {
        let mut late: Vec<u32> =
            self.pending.iter().filter(|(_, w)| w.deadline <= now).map(|(t, _)| *t).collect();
        late.sort_unstable();
        let mut given_up = 0;
        for t in late {
            if let Some(w) = self.pending.remove(&t) {
                given_up += w.peers.len() as u64;
                out.push_back(stored(w.reply, w.ok, w.rerouted));
            }
        }
        given_up
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|w| w.deadline).min()
    }
}

/// The answer a shard waits for: its publish is as durable as it will get. A peer that went down
/// meanwhile counts as answered (its subscribers are not reachable; refusing the publish would only make
/// the publisher send it again to everyone else).
fn stored(reply: (ShardId, u64), ok: bool, rerouted: bool) -> (ShardId, Mesh) {
    (reply.0, Mesh::Stored { token: reply.1, ok, forwarded: 0, rerouted })
}

/// A peer's forward delivered to shards with a durability request: answered once they all answered.
struct Injected {
    peer: NodeName,
    token: u32,
    /// Answers still expected (the shards the message went to, plus those they passed it on to).
    remaining: i64,
    ok: bool,
}

#[derive(Default)]
pub(super) struct InjectAcks {
    next: u64,
    pending: HashMap<u64, Injected>,
}

impl InjectAcks {
    fn begin(&mut self, peer: NodeName, token: u32, shards: usize) -> u64 {
        self.next += 1;
        self.pending.insert(self.next, Injected { peer, token, remaining: shards as i64, ok: true });
        self.next
    }

    /// A shard's `Stored`; the answer for the peer when it was the last one.
    pub fn answer(
        &mut self,
        token: u64,
        ok: bool,
        forwarded: u32,
        _rerouted: bool,
    ) -> Option<(NodeName, u32, bool)> {
        let i = self.pending.get_mut(&token)?;
        // A shard that passed a group message on announces the answers to come (`forwarded`); each
        // answer, rerouted or not, is one of those expected.
        i.remaining += forwarded as i64 - 1;
        i.ok &= ok;
        if i.remaining > 0 {
            return None;
        }
        let i = self.pending.remove(&token)?;
        Some((i.peer, i.token, i.ok))
    }

    /// The peer is gone: its answers have nobody to go to.
    pub fn peer_down(&mut self, peer: &NodeName) {
        self.pending.retain(|_, i| i.peer != *peer);
    }
}

impl Gateway {
    /// A shard's publish: once to every peer whose interest may match, and to the peer chosen for each
    /// shared group the shard left to the zone. `rerouted`: a shard passed this Deliver on (its group had
    /// no member left there); the answer carries it, as the publisher's shard counts such answers apart.
    pub(super) fn forward(
        &mut self,
        msg: &Arc<Msg>,
        normal: bool,
        groups: &[SharedKey],
        rerouted: bool,
        ack: AckRequest,
        now: Instant,
    ) {
        let mut targets: Vec<(NodeName, bool, Vec<String>)> = Vec::new();
        if normal {
            targets.extend(self.router.route(&msg.topic).map(|p| (p.clone(), true, Vec::new())));
        }
        for key in groups {
            let full = full_filter(key);
            match self.router.pick_peer(&full) {
                Some(peer) => match targets.iter_mut().find(|(p, _, _)| *p == peer) {
                    Some((_, _, g)) => g.push(full),
                    None => targets.push((peer, false, vec![full])),
                },
                None => self.counters.dropped_no_member += 1,
            }
        }
        let want_ack = ack.filter(|_| msg.qos != QoS::AtMostOnce);
        let token = if want_ack.is_some() && !targets.is_empty() { Some(self.fwd.token()) } else { None };
        let (properties, expiry_s) =
            if targets.is_empty() { (Vec::new(), None) } else { frame_properties(msg, now) };
        let mut sent_to = Vec::new();
        let mut peer_mask = 0u64;
        // A message a peer sent here and a shard passed back (its group's member left) names this
        // gateway as origin: meaningless to the next peer.
        let origin = msg.origin.filter(|o| o.shard != self.id);
        let origin_ref = origin.map(|o| OriginRef { shard: o.shard.0, session: o.session.0 });
        for (peer, normal, groups) in targets {
            let f = Forward {
                qos: msg.qos as u8,
                retain: msg.retain,
                topic: &msg.topic,
                payload: &msg.payload,
                properties: &properties,
                ack_token: token,
                normal,
                groups: groups.iter().map(String::as_str).collect(),
                expiry_s,
                origin: origin_ref,
            };
            let mut buf = Vec::new();
            link::encode(&Frame::Forward(f), &mut buf);
            let content = msg.topic.len() + msg.payload.len() + properties.len();
            let len = buf.len();
            if self.send_bytes(&peer, buf) {
                self.counters.forwarded += 1;
                self.counters.forward_frame_bytes += len as u64;
                self.counters.forward_content_bytes += content as u64;
                if let Some(slot) = self.congestion.slot(&peer) {
                    peer_mask |= 1 << slot;
                }
                sent_to.push(peer);
            }
        }
        if let Some(o) = origin {
            if let Some(c) = self.congestion.forwarded(o, peer_mask) {
                self.out.push_back((o.shard, Mesh::Congestion { session: o.session, congested: c }));
            }
        }
        let Some(reply) = want_ack else { return };
        match token {
            Some(t) if !sent_to.is_empty() => {
                let w = Waiting { reply, rerouted, peers: sent_to, ok: true, deadline: now + STORED_TIMEOUT };
                self.fwd.pending.insert(t, w);
            }
            _ => self.out.push_back(stored(reply, true, rerouted)),
        }
    }

    /// A peer's forward: delivered to the shards with matching interest, never forwarded again.
    pub(super) fn receive_forward(&mut self, from: &NodeName, f: Forward<'_>, now: Instant) {
        let answer = |g: &mut Gateway, ok: bool| {
            if let Some(t) = f.ack_token {
                g.send_frame(from, &Frame::Stored { token: t, ok });
            }
        };
        let groups: Option<Vec<SharedKey>> = f
            .groups
            .iter()
            .map(|full| {
                let sh = shardmq_wire::topic::parse_shared(full)?;
                Some((Some(Arc::from(sh.group)), Arc::from(sh.filter)))
            })
            .collect();
        let mut msg = msg_from_frame(f.topic, f.payload, f.qos, f.retain, f.properties, f.expiry_s, now);
        // Shards report congestion for the remote publisher to this gateway, which tells its node.
        let key = f.origin.and_then(|o| self.congestion.pack(from, o));
        if let (Some(m), Some(k)) = (msg.as_mut(), key) {
            m.origin = Some(Origin { shard: self.id, session: k });
        }
        let (Some(msg), Some(groups)) = (msg, groups) else {
            self.counters.malformed += 1;
            tracing::warn!(node = %from, "invalid forwarded message from a cluster peer; refused");
            answer(self, false);
            return;
        };
        self.counters.received += 1;
        let (targets, missing) = self.view.targets(&msg.topic, f.normal, &groups);
        self.counters.dropped_no_member += missing as u64;
        if targets.is_empty() {
            if f.normal && groups.is_empty() {
                self.counters.false_positives += 1;
            }
            answer(self, true);
            return;
        }
        if let Some(k) = key {
            let shards =
                targets.iter().fold(0u64, |m, (s, _, _)| m | 1u64.checked_shl(s.0 as u32).unwrap_or(0));
            if let Some((peer, origin, c)) = self.congestion.delivered(k, shards) {
                self.counters.congestion_out += 1;
                self.send_frame(&peer, &Frame::Congestion { origin, congested: c });
            }
        }
        let msg = shared(msg);
        let local = match f.ack_token {
            Some(t) if self.cfg.persistent && msg.qos != QoS::AtMostOnce => {
                Some(self.inject.begin(from.clone(), t, targets.len()))
            }
            _ => {
                answer(self, true);
                None
            }
        };
        let ack = local.map(|t| (self.id, t));
        for (shard, normal, groups) in targets {
            let m = Mesh::Deliver { msg: msg.clone(), normal, groups, rerouted: false, ack };
            self.out.push_back((shard, m));
        }
    }
}
