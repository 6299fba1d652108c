//! Holding acknowledgements until what they acknowledge is durable: on this shard (the log's bound) and,
//! for a publish, on every shard it reached with persistent subscribers (their `Mesh::Stored` answers).
//! Acknowledgements of one connection leave in the order their requests came.

use std::time::Instant;

use shardmq_storage::Lsn;
use shardmq_wire::{Ack, Packet, PacketId, QoS, ReasonCode};

use super::super::{Mesh, PendingSubAck, ProtocolError, Shard};
use crate::{ConnId, ShardId};

/// An acknowledgement waiting for durability here (`lsn`) and, for a publish, for the other shards.
pub(super) struct Held {
    pub token: u64,
    pub lsn: Lsn,
    /// Shards the publish was sent to that have not answered.
    pub remote: u32,
    /// Answers from shards a message was passed on to, minus how many were announced (see `on_stored`).
    pub extra: i32,
    pub refused: bool,
    pub what: HeldAck,
}

pub(super) enum HeldAck {
    Bytes(Vec<u8>),
    SubAck(Box<PendingSubAck>),
    Publish { pid: u16, qos: QoS, reason: ReasonCode },
}

impl Held {
    pub fn ready(&self, durable: Lsn) -> bool {
        self.remote == 0 && self.extra == 0 && (self.refused || self.lsn <= durable)
    }
}

/// The publish being routed asks the shards it reaches to confirm durability to `reply`.
#[derive(Debug, Clone, Copy)]
pub(in crate::core) struct AckCtx {
    pub reply: (ShardId, u64),
    /// Deliver/Retain messages sent with this token so far.
    pub sends: u32,
    /// Where the log's head was when the publish started: whether it appended anything.
    pub start: Lsn,
}

impl Shard {
    /// Starts routing a publish whose acknowledgement must wait for the shards it reaches.
    pub(in crate::core) fn begin_ack(&mut self) -> Option<u64> {
        let st = self.store.as_deref_mut()?;
        st.failed = false;
        let token = st.next_token;
        st.next_token += 1;
        debug_assert!(self.ack_ctx.is_none(), "a publish is routed at a time");
        self.ack_ctx = Some(AckCtx { reply: (self.id, token), sends: 0, start: st.log.written_lsn() });
        Some(token)
    }

    /// The acknowledgement token to attach to a Deliver or Retain sent now, counting it.
    pub(in crate::core) fn ack_for_send(&mut self) -> Option<(ShardId, u64)> {
        self.ack_ctx.as_mut().map(|c| {
            c.sends += 1;
            c.reply
        })
    }

    /// Sends a PUBACK/PUBREC once the publish it acknowledges is durable everywhere it went.
    pub(in crate::core) fn ack_publish(
        &mut self,
        conn: ConnId,
        pid: PacketId,
        qos: QoS,
        reason: ReasonCode,
        token: Option<u64>,
        now: Instant,
    ) {
        let ctx = self.ack_ctx.take();
        let what = HeldAck::Publish { pid: pid.0, qos, reason };
        // A QoS 2 PUBREC also confirms the packet id is remembered (its record may be from an earlier
        // copy of this publish, in this same iteration).
        let qos2_stored = qos == QoS::ExactlyOnce && self.session_stored(conn);
        match (self.store.as_deref_mut(), token) {
            (Some(st), Some(token)) => {
                st.flush_batch();
                let refused = st.take_failed();
                let remote = ctx.map_or(0, |c| c.sends);
                let appended = ctx.is_none_or(|c| c.start != st.log.written_lsn());
                let queued = st.held.get(&conn).is_some_and(|q| !q.is_empty());
                if !appended && !qos2_stored && remote == 0 && !refused && !queued {
                    // Nothing of it needs the disk: acknowledged at once, like without a log.
                    self.emit(conn, what, false, now);
                    return;
                }
                let h = Held { token, lsn: st.log.written_lsn(), remote, extra: 0, refused, what };
                if remote > 0 {
                    st.tokens.insert(token, conn);
                }
                self.hold(conn, h, now);
            }
            _ => self.emit(conn, what, false, now),
        }
    }

    /// Sends `bytes` (an acknowledgement) to `conn` once everything appended so far is durable.
    pub(in crate::core) fn send_durable(&mut self, conn: ConnId, bytes: Vec<u8>, now: Instant) {
        let stored = self.session_stored(conn);
        match self.store.as_deref_mut() {
            Some(st) if stored || st.held.contains_key(&conn) => {
                // Callers check their own appends: this only waits for them.
                st.flush_batch();
                let lsn = st.log.written_lsn();
                let h =
                    Held { token: 0, lsn, remote: 0, extra: 0, refused: false, what: HeldAck::Bytes(bytes) };
                self.hold(conn, h, now);
            }
            _ => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.send_raw(&bytes, &mut self.out.io);
                }
            }
        }
    }

    /// Whether the session of `conn` is in the log (what it acknowledges must be durable first).
    fn session_stored(&self, conn: ConnId) -> bool {
        let key = self.conns.get(&conn).and_then(|c| c.session());
        key.and_then(|k| self.sessions.map.get(&k)).is_some_and(|s| s.stored_ver != 0)
    }

    fn hold(&mut self, conn: ConnId, h: Held, now: Instant) {
        let st = self.store.as_deref_mut().expect("holding needs a store");
        let queue = st.held.entry(conn).or_default();
        queue.push_back(h);
        if !st.pending() {
            self.release(conn, now);
        }
    }

    /// Completes a SUBACK (and sends the retained messages it asked for) once the subscription is
    /// durable: retained messages must not overtake their SUBACK.
    pub(in crate::core) fn complete_suback(&mut self, p: PendingSubAck, now: Instant) {
        let stored = self.session_stored(p.conn);
        match self.store.as_deref_mut() {
            Some(st) if stored || st.held.contains_key(&p.conn) => {
                // `on_subscribe` already refused the SUBACK if its session record failed.
                st.flush_batch();
                let lsn = st.log.written_lsn();
                let conn = p.conn;
                let what = HeldAck::SubAck(Box::new(p));
                self.hold(conn, Held { token: 0, lsn, remote: 0, extra: 0, refused: false, what }, now);
            }
            _ => self.complete_suback_now(p, now),
        }
    }

    /// Sends the acknowledgements of `conn` that are ready, in order.
    fn release(&mut self, conn: ConnId, now: Instant) {
        let Some(st) = self.store.as_deref_mut() else { return };
        let durable = st.ack_bound();
        let Some(queue) = st.held.get_mut(&conn) else { return };
        let mut out = Vec::new();
        while queue.front().is_some_and(|h| h.ready(durable)) {
            let h = queue.pop_front().expect("checked");
            if h.token != 0 {
                st.tokens.remove(&h.token);
            }
            out.push((h.what, h.refused));
        }
        if queue.is_empty() {
            st.held.remove(&conn);
        }
        for (what, refused) in out {
            self.emit(conn, what, refused, now);
        }
    }

    fn emit(&mut self, conn: ConnId, what: HeldAck, refused: bool, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let v5 = c.is_v5();
        match what {
            // MQTT 3.1.1 cannot refuse a publish, and nothing can refuse a PUBREL/PUBCOMP/SUBACK: the
            // connection closes unacknowledged and the client retries after reconnecting.
            HeldAck::Publish { .. } if refused && !v5 => self.storage_failed(conn, now),
            HeldAck::Bytes(_) | HeldAck::SubAck(_) if refused => self.storage_failed(conn, now),
            HeldAck::Bytes(b) => c.send_raw(&b, &mut self.out.io),
            HeldAck::SubAck(p) => self.complete_suback_now(*p, now),
            HeldAck::Publish { pid, qos, reason } => {
                let reason = if refused { ReasonCode::QUOTA_EXCEEDED } else { reason };
                let ack = Ack::new(PacketId(pid), reason);
                match qos {
                    QoS::AtLeastOnce => c.send(&Packet::PubAck(ack), &mut self.out.io),
                    QoS::ExactlyOnce => c.send(&Packet::PubRec(ack), &mut self.out.io),
                    QoS::AtMostOnce => {}
                }
                if refused && qos == QoS::ExactlyOnce {
                    // An error PUBREC ends the exchange: the packet id is free again.
                    if let Some(key) = c.session() {
                        if let Some(s) = self.sessions.map.get_mut(&key) {
                            s.qos_mut().remove_inbound_qos2(pid);
                            s.trim();
                        }
                        self.persist_inbound_qos2(key, pid, false);
                    }
                }
            }
        }
    }

    /// The log cannot make a client's request durable: the connection is closed unacknowledged (MQTT 5:
    /// DISCONNECT 0x97) and the client retries after reconnecting; the shard keeps serving others.
    pub(in crate::core) fn storage_failed(&mut self, conn: ConnId, now: Instant) {
        self.close_conn(conn, Some(ProtocolError::StorageUnavailable), now);
    }

    /// A shard the publish went to stored what it had to (`ok`), having passed it on to `forwarded` more.
    pub(in crate::core) fn on_stored(
        &mut self,
        token: u64,
        ok: bool,
        forwarded: u32,
        rerouted: bool,
        now: Instant,
    ) {
        let Some(st) = self.store.as_deref_mut() else { return };
        let Some(&conn) = st.tokens.get(&token) else { return };
        let Some(h) = st.held.get_mut(&conn).and_then(|q| q.iter_mut().find(|h| h.token == token)) else {
            return;
        };
        if rerouted {
            h.extra -= 1;
        } else {
            h.remote = h.remote.saturating_sub(1);
        }
        h.extra += forwarded as i32;
        h.refused |= !ok;
        self.release(conn, now);
    }

    /// Answers a Deliver or Retain that asked for it, once this shard's records for it are durable.
    pub(in crate::core) fn answer_stored(
        &mut self,
        ack: Option<(ShardId, u64)>,
        rerouted: bool,
        now: Instant,
    ) {
        let Some((to, token)) = ack else { return };
        let ctx = self.ack_ctx.take();
        let forwarded = ctx.map_or(0, |c| c.sends);
        let Some(st) = self.store.as_deref_mut() else { return };
        st.flush_batch();
        let ok = !st.take_failed();
        let msg = Mesh::Stored { token, ok, forwarded, rerouted };
        if to == self.id {
            self.on_stored(token, ok, forwarded, rerouted, now);
        } else if st.pending() {
            st.held_mesh.push_back((st.log.written_lsn(), to, msg));
        } else {
            self.send_mesh(to, msg);
        }
    }

    /// Starts handling a Deliver/Retain that carries a token: what it forwards counts towards the answer.
    pub(in crate::core) fn begin_remote_ack(&mut self, ack: Option<(ShardId, u64)>) {
        if let (Some(reply), Some(st)) = (ack, self.store.as_deref_mut()) {
            st.failed = false;
            self.ack_ctx = Some(AckCtx { reply, sends: 0, start: st.log.written_lsn() });
        }
    }

    /// Group commit: called by the runtime once per event-loop iteration.
    pub(in crate::core) fn commit(&mut self, now: Instant) {
        let Some(st) = self.store.as_deref_mut() else { return };
        st.flush_batch();
        if let Err(e) = st.log.commit(now) {
            // The log stops after a failed flush; nothing pending can be confirmed any more.
            st.fail(&e);
            for q in st.held.values_mut() {
                for h in q.iter_mut() {
                    h.refused = true;
                }
            }
            for (lsn, _, m) in st.held_mesh.iter_mut() {
                *lsn = Lsn::default();
                if let Mesh::Stored { ok, .. } = m {
                    *ok = false;
                }
            }
        }
        let durable = st.ack_bound();
        let mut answers = Vec::new();
        while st.held_mesh.front().is_some_and(|(lsn, _, _)| *lsn <= durable) {
            answers.push(st.held_mesh.pop_front().expect("checked"));
        }
        let conns: Vec<ConnId> = st.held.keys().copied().collect();
        for (_, to, msg) in answers {
            self.send_mesh(to, msg);
        }
        for c in conns {
            self.release(c, now);
        }
        // Acknowledgements held for connections that are gone will never be sent.
        if let Some(st) = self.store.as_deref_mut().filter(|st| !st.held.is_empty() || !st.tokens.is_empty())
        {
            let conns = &self.conns;
            st.held.retain(|c, _| conns.contains_key(c));
            let held = &st.held;
            st.tokens.retain(|_, c| held.contains_key(c));
        }
        self.compact(now);
    }
}
