//! Connections: their (small) state, the read path that turns bytes into packets, and the dispatch of
//! packets from a connected client.
//!
//! An idle connection holds no read buffer: bytes are decoded straight from the runtime's buffer and only
//! the tail of an incomplete packet is copied into `Conn::rbuf`, which is freed once it is consumed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::HashMap;
use shardmq_wire::{
    decode, peek_protocol, topic, Ack, ConnAck, Disconnect, Packet, PacketId, Properties, Protocol, Publish,
    QoS, ReasonCode,
};

use super::{encode_into, Handoff, Msg, MsgProps, Origin, ProtocolError, ReadStep, SessionKey, Shard, Timer};
use crate::io::IoCmd;
use crate::ConnId;

/// Topic alias tables of one MQTT 5 connection, allocated on first use.
#[derive(Debug, Default)]
pub(super) struct Aliases {
    /// Client-to-server: alias - 1 → topic.
    inbound: Vec<Option<Box<str>>>,
    /// Server-to-client: topic → alias.
    outbound: HashMap<Box<str>, u16>,
}

#[derive(Debug)]
pub(super) struct Conn {
    pub id: ConnId,
    /// The session's key once CONNECT was accepted, 0 while waiting for it (session keys start at 1).
    /// A plain u64 rather than an enum, whose tag would cost 8 bytes with padding.
    session: u64,
    /// `Some` once CONNECT was decoded.
    pub protocol: Option<Protocol>,
    /// Bytes of an incomplete packet; `None` between packets. Boxed: an idle connection pays 8 bytes for
    /// it instead of an empty Vec's 24.
    #[allow(clippy::box_collection)] // the point: 8 bytes in every Conn, the Vec only while a tail waits
    rbuf: Option<Box<Vec<u8>>>,
    /// Encoded packets not yet taken by the runtime.
    out: Vec<u8>,
    /// A `Transmit` for this connection is queued and not yet served (avoids one command per packet).
    tx_queued: bool,
    /// The socket is not draining; see `Core::handle_backpressure`.
    pub blocked: bool,
    /// QoS 0 bytes added while `blocked` (reset when it drains); bounded by `backpressure::qos0_blocked_budget`.
    pub blocked_bytes: u32,
    /// 0 disables keep alive.
    pub keepalive_ms: u32,
    pub last_rx: Instant,
    /// Largest packet the client accepts (MQTT 5 Maximum Packet Size), else the protocol maximum.
    pub client_max_packet: u32,
    /// Aliases the client accepts from us (its Topic Alias Maximum, capped by our own limit).
    pub client_alias_max: u16,
    /// Flow control paused reading from this publisher (see `flow`); bytes the runtime delivered before
    /// the pause took effect wait in `rbuf`.
    pub paused: bool,
    aliases: Option<Box<Aliases>>,
}

impl Conn {
    pub fn new(id: ConnId, now: Instant) -> Conn {
        Conn {
            id,
            session: 0,
            protocol: None,
            rbuf: None,
            out: Vec::new(),
            tx_queued: false,
            blocked: false,
            blocked_bytes: 0,
            keepalive_ms: 0,
            last_rx: now,
            client_max_packet: shardmq_wire::MAX_REMAINING_LENGTH + 5,
            client_alias_max: 0,
            paused: false,
            aliases: None,
        }
    }

    pub fn has_buffered(&self) -> bool {
        self.rbuf.as_ref().is_some_and(|b| !b.is_empty())
    }

    pub fn is_active(&self) -> bool {
        self.session != 0
    }

    pub fn session(&self) -> Option<SessionKey> {
        (self.session != 0).then_some(SessionKey(self.session))
    }

    /// CONNECT accepted: the connection now serves session `key`.
    pub fn activate(&mut self, key: SessionKey) {
        assert_ne!(key.0, 0, "session keys start at 1 (0 marks a connection in its handshake)");
        self.session = key.0;
    }

    pub fn is_v5(&self) -> bool {
        self.protocol.is_some_and(Protocol::is_v5)
    }

    /// When the client is overdue: 1.5 × keep alive after the last packet (MQTT §3.1.2.10).
    pub fn keepalive_deadline(&self) -> Option<Instant> {
        (self.keepalive_ms > 0)
            .then(|| self.last_rx + Duration::from_millis(self.keepalive_ms as u64 * 3 / 2))
    }

    #[cfg(test)]
    pub fn rbuf_capacity(&self) -> usize {
        self.rbuf.as_ref().map_or(0, |b| b.capacity())
    }

    /// Bytes encoded and not yet taken by the runtime.
    pub fn out_len(&self) -> usize {
        self.out.len()
    }

    pub fn take_out(&mut self) -> Vec<u8> {
        self.tx_queued = false;
        std::mem::take(&mut self.out)
    }

    /// Appends an encoded packet and makes sure the runtime will be told to transmit.
    pub fn send(&mut self, pkt: &Packet<'_>, io: &mut super::IoQueue) {
        let protocol = self.protocol.unwrap_or(Protocol::V311);
        encode_into(&mut self.out, pkt, protocol);
        if !self.tx_queued {
            self.tx_queued = true;
            io.push_back(IoCmd::Transmit(self.id));
        }
    }

    /// Appends bytes encoded earlier (a SUBACK held back until other shards confirmed interest).
    pub fn send_raw(&mut self, bytes: &[u8], io: &mut super::IoQueue) {
        self.out.extend_from_slice(bytes);
        if !self.tx_queued {
            self.tx_queued = true;
            io.push_back(IoCmd::Transmit(self.id));
        }
    }

    /// Appends an encoded packet unless it exceeds `max` bytes (the client's Maximum Packet Size); returns
    /// whether it was appended. Encodes once: an oversized packet is cut back off the buffer.
    pub fn send_within(&mut self, pkt: &Packet<'_>, max: u32, io: &mut super::IoQueue) -> bool {
        let start = self.out.len();
        encode_into(&mut self.out, pkt, self.protocol.unwrap_or(Protocol::V311));
        if (self.out.len() - start) as u64 > max as u64 {
            self.out.truncate(start);
            return false;
        }
        if !self.tx_queued {
            self.tx_queued = true;
            io.push_back(IoCmd::Transmit(self.id));
        }
        true
    }

    /// The alias to use for `topic` towards this client: `(alias, topic already known to the client)`.
    /// A new alias is only a proposal until [`Conn::remember_alias`] records it, after the PUBLISH that
    /// introduces it was actually written.
    pub fn outbound_alias(&self, topic: &str) -> Option<(u16, bool)> {
        if self.client_alias_max == 0 {
            return None;
        }
        let known = self.aliases.as_ref().map_or(0, |a| a.outbound.len());
        if let Some(&n) = self.aliases.as_ref().and_then(|a| a.outbound.get(topic)) {
            return Some((n, true));
        }
        let next = known as u16 + 1;
        (next <= self.client_alias_max).then_some((next, false))
    }

    pub fn remember_alias(&mut self, topic: &str, alias: u16) {
        let a = self.aliases.get_or_insert_with(Default::default);
        debug_assert_eq!(alias as usize, a.outbound.len() + 1, "aliases are handed out in order");
        a.outbound.insert(topic.into(), alias);
    }

    /// Resolves an inbound topic alias (MQTT 5 §3.3.2.3.4), recording a new mapping when a topic is given.
    fn inbound_alias<'t>(
        &'t mut self,
        topic: &'t str,
        alias: u16,
        max: u16,
    ) -> Result<&'t str, ProtocolError> {
        if alias == 0 || alias > max {
            return Err(ProtocolError::TopicAlias(alias));
        }
        let a = self.aliases.get_or_insert_with(Default::default);
        let slot = alias as usize - 1;
        if a.inbound.len() <= slot {
            a.inbound.resize(slot + 1, None);
        }
        if topic.is_empty() {
            a.inbound[slot].as_deref().ok_or(ProtocolError::TopicAlias(alias))
        } else {
            a.inbound[slot] = Some(topic.into());
            Ok(topic)
        }
    }
}

/// Unreleased inbound QoS 2 packet ids a 3.1.1 client may hold (at least; `max_inflight` if larger).
pub(super) const V311_INBOUND_QOS2_MAX: usize = 1024;

impl Shard {
    /// Decodes and handles every complete packet in `rbuf ++ data`, keeping an incomplete tail.
    pub(super) fn read(&mut self, id: ConnId, data: &[u8], now: Instant) {
        // Its CONNECT waits for the zone's registry (see `register`); what follows waits behind it.
        if self.sessions.registrations.hold_more(id, data) {
            return;
        }
        let Some(conn) = self.conns.get_mut(&id) else { return };
        conn.last_rx = now;
        if conn.paused {
            // Delivered before the runtime applied the pause; handled on resume, in order.
            conn.rbuf.get_or_insert_with(Default::default).extend_from_slice(data);
            return;
        }
        let mut buf = conn.rbuf.take().map(|b| *b).unwrap_or_default();
        let consumed;
        let stopped;
        if buf.is_empty() {
            (consumed, stopped) = self.read_packets(id, data, now);
            if !stopped && consumed < data.len() {
                buf.extend_from_slice(&data[consumed..]);
            }
        } else {
            buf.extend_from_slice(data);
            (consumed, stopped) = self.read_packets(id, &buf, now);
            buf.drain(..consumed);
        }
        if stopped {
            return;
        }
        if let Some(conn) = self.conns.get_mut(&id) {
            // Dropping an empty buffer frees it: an idle connection holds no read buffer.
            conn.rbuf = (!buf.is_empty()).then(|| Box::new(buf));
        }
    }

    /// Returns (bytes consumed, stopped).
    fn read_packets(&mut self, id: ConnId, buf: &[u8], now: Instant) -> (usize, bool) {
        let mut pos = 0;
        while pos < buf.len() {
            let Some(conn) = self.conns.get(&id) else { return (pos, true) };
            let protocol = conn.protocol;
            let rest = &buf[pos..];
            // `decode` refuses an oversized packet from its fixed header alone, before the body arrives.
            match decode(rest, protocol, self.cfg.max_packet_size) {
                Ok(None) => break,
                Ok(Some((pkt, n))) => {
                    let step = match pkt {
                        Packet::Connect(c) if protocol.is_none() => self.on_connect(id, &c, rest, now),
                        pkt => self.on_packet(id, pkt, now),
                    };
                    pos += n;
                    if let ReadStep::Stop = step {
                        return (pos, true);
                    }
                    if self.conns.get(&id).is_some_and(|c| c.paused) {
                        // Flow control paused this publisher: the rest waits in its buffer.
                        break;
                    }
                }
                Err(e) => {
                    self.decode_failed(id, rest, e.into(), now);
                    return (pos, true);
                }
            }
        }
        (pos, false)
    }

    fn decode_failed(&mut self, id: ConnId, rest: &[u8], err: ProtocolError, now: Instant) {
        self.counters.protocol_errors += 1;
        let Some(conn) = self.conns.get_mut(&id) else { return };
        tracing::debug!(conn = id.0, error = %err, "closing connection on bad input");
        if conn.is_active() {
            self.close_conn(id, Some(err), now);
            return;
        }
        // Before CONNECT succeeded: answer with a CONNACK in the format the client speaks, if we can tell.
        use shardmq_wire::DecodeError as D;
        let level = match &err {
            ProtocolError::Decode(D::UnknownProtocolName { level }) => Some(*level),
            ProtocolError::Decode(D::UnsupportedProtocolLevel(level)) => Some(*level),
            _ => None,
        };
        let protocol = match (peek_protocol(rest), level) {
            (Some(p), _) => Some(p),
            // A level above 5 comes from a client newer than us: it reads a v5 CONNACK (0x84), as
            // MQTT 5 §3.1.2.2 asks; older or unknown levels get the 3.1.1 return code 1.
            (None, Some(level)) if level >= 5 => Some(Protocol::V5),
            (None, Some(_)) => Some(Protocol::V311),
            (None, None) => None,
        };
        if let Some(p) = protocol {
            let reason = match (&err, p) {
                (ProtocolError::Decode(D::NotConnect), _) => None,
                (_, Protocol::V5) => Some(err.reason_code()),
                // 3.1.1 has return codes for few errors; refusing the protocol is one of them.
                (_, _) if level.is_some() => Some(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
                _ => None,
            };
            if let Some(reason) = reason {
                conn.protocol = Some(p);
                let text = err.to_string();
                let properties = Properties { reason_string: Some(&text), ..Properties::default() };
                let ack = ConnAck { session_present: false, reason, properties };
                conn.send(&Packet::ConnAck(ack), &mut self.out.io);
            }
        }
        self.close_conn(id, None, now);
    }

    /// A packet from a client whose CONNECT has been handled.
    fn on_packet(&mut self, id: ConnId, pkt: Packet<'_>, now: Instant) -> ReadStep {
        let Some(conn) = self.conns.get(&id) else { return ReadStep::Stop };
        let Some(key) = conn.session() else {
            // Bytes after a CONNECT that is being refused or handed off never get here; anything else
            // before CONNECT is a protocol error that decode() already reports as NotConnect.
            return ReadStep::Stop;
        };
        let result = match pkt {
            Packet::Connect(_) => Err(ProtocolError::SecondConnect),
            Packet::Publish(p) => {
                let r = self.on_publish(id, key, p, now);
                if r.is_err() {
                    // Refused before its acknowledgement: nothing waits for the shards it may have reached.
                    self.ack_ctx = None;
                }
                r
            }
            Packet::PubAck(a) => {
                self.on_puback(key, a.packet_id, now);
                Ok(())
            }
            Packet::PubRec(a) => {
                self.on_pubrec(id, key, &a, now);
                Ok(())
            }
            Packet::PubRel(a) => {
                self.on_pubrel(id, key, a.packet_id, now);
                Ok(())
            }
            Packet::PubComp(a) => {
                self.on_pubcomp(key, a.packet_id, now);
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(id, key, s, now),
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(id, key, u, now);
                Ok(())
            }
            Packet::PingReq => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.send(&Packet::PingResp, &mut self.out.io);
                }
                Ok(())
            }
            Packet::Disconnect(d) => return self.on_disconnect(id, key, d, now),
            Packet::Auth(_) => Err(ProtocolError::AuthNotSupported),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(ProtocolError::WrongDirection)
            }
        };
        match result {
            Ok(()) => ReadStep::Continue,
            Err(e) => {
                self.counters.protocol_errors += 1;
                tracing::debug!(conn = id.0, error = %e, "closing connection on protocol error");
                self.close_conn(id, Some(e), now);
                ReadStep::Stop
            }
        }
    }

    fn on_publish(
        &mut self,
        id: ConnId,
        key: SessionKey,
        p: Publish<'_>,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        self.counters.publishes_in += 1;
        self.counters.publishes_in_qos[super::metrics::qos_index(p.qos)] += 1;
        let max_alias = self.cfg.max_topic_alias;
        let conn = self.conns.get_mut(&id).ok_or(ProtocolError::Violation("connection gone"))?;
        let v5 = conn.is_v5();
        if v5 && !p.properties.subscription_identifiers.is_empty() {
            // MQTT 5 §3.3.4: only the server sets Subscription Identifiers on a PUBLISH.
            return Err(ProtocolError::Violation("PUBLISH from a client carries a Subscription Identifier"));
        }
        let topic: Box<str> = match p.properties.topic_alias {
            Some(alias) if v5 => conn.inbound_alias(p.topic, alias, max_alias)?.into(),
            _ if p.topic.is_empty() => return Err(ProtocolError::TopicName("empty topic")),
            _ => p.topic.into(),
        };
        // Topic names are checked here as well as in the decoder because an alias can stand for one.
        if !topic::valid_topic_name(&topic) {
            return Err(ProtocolError::TopicName("wildcard in topic name"));
        }
        let too_deep = topic::levels(&topic) > self.cfg.max_topic_levels;
        let denied = !self.may_publish(key, &topic);
        if denied {
            self.counters.denied_by_acl += 1;
        }
        let pid = p.packet_id;
        let mut route = !too_deep && !denied;
        // With a log, the acknowledgement waits until the message is durable wherever it went.
        let token = if p.qos != QoS::AtMostOnce { self.begin_ack() } else { None };
        // A v5 PUBREC with 0x87 ends the exchange (no PUBREL follows), so no QoS 2 state is kept for it;
        // a 3.1.1 client is acknowledged as if the message went through (Mosquitto's behaviour: 3.1.1
        // has no way to say no), so its PUBREL must find the id.
        if p.qos == QoS::ExactlyOnce && !(denied && v5) {
            let pid = pid.ok_or(ProtocolError::Violation("QoS 2 without packet id"))?;
            let s = self.sessions.map.get_mut(&key).ok_or(ProtocolError::Violation("no session"))?;
            if s.qos().holds_inbound_qos2(pid.0) {
                // A resent QoS 2 PUBLISH before PUBREL: already routed once (exactly-once delivery).
                route = false;
            } else {
                // v5 clients were told the limit (Receive Maximum). 3.1.1 clients were not, and pipeline
                // more than that (their PUBRELs queue behind their next PUBLISHes, so reading cannot
                // pause): they get a looser bound, past which they are closed rather than allowed to hold
                // up to 65,535 ids.
                let limit = if v5 {
                    self.cfg.max_inflight as usize
                } else {
                    (self.cfg.max_inflight as usize).max(V311_INBOUND_QOS2_MAX)
                };
                if s.qos().inbound_qos2.len() >= limit {
                    return Err(ProtocolError::ReceiveMaximumExceeded);
                }
                s.qos_mut().add_inbound_qos2(pid.0);
                // A failure is remembered by the store and refuses the PUBREC.
                let _ = self.persist_inbound_qos2(key, pid.0, true);
            }
        }
        if route {
            let expires_at = p
                .properties
                .message_expiry_interval_s
                .filter(|_| v5)
                .map(|s| now + Duration::from_secs(s as u64));
            let msg = Arc::new(Msg {
                topic,
                payload: p.payload.into(),
                qos: p.qos,
                retain: p.retain,
                expires_at,
                props: if v5 { MsgProps::from_wire(&p.properties) } else { None },
                origin: Some(Origin { shard: self.id, session: key }),
            });
            let targets = self.route(msg, now);
            self.note_targets(key, targets, now);
        }
        let reason = if too_deep {
            ReasonCode::TOPIC_NAME_INVALID
        } else if denied && v5 {
            ReasonCode::NOT_AUTHORIZED
        } else {
            ReasonCode::SUCCESS
        };
        match pid {
            Some(pid) if p.qos != QoS::AtMostOnce => self.ack_publish(id, pid, p.qos, reason, token, now),
            _ => self.ack_ctx = None,
        }
        Ok(())
    }

    /// The ACL check of a PUBLISH (always allowed without an ACL file).
    fn may_publish(&self, key: SessionKey, topic_name: &str) -> bool {
        if !self.cfg.acl_on() {
            return true;
        }
        self.sessions.acls.get(&key).is_some_and(|a| a.can_publish(topic_name))
    }

    fn on_pubrel(&mut self, id: ConnId, key: SessionKey, pid: PacketId, now: Instant) {
        let found = self.sessions.map.get_mut(&key).is_some_and(|s| {
            let found = s.qos_opt_mut().is_some_and(|f| f.remove_inbound_qos2(pid.0));
            s.trim();
            found
        });
        // Durable before PUBCOMP: the client reuses the packet id once it has PUBCOMP, and a restart
        // that still remembered it would drop the next message sent with it as a duplicate.
        if found && !self.persist_inbound_qos2(key, pid.0, false) {
            self.storage_failed(id, now);
            return;
        }
        let reason = if found { ReasonCode::SUCCESS } else { ReasonCode::PACKET_IDENTIFIER_NOT_FOUND };
        let protocol = self.conns.get(&id).and_then(|c| c.protocol).unwrap_or(Protocol::V311);
        let mut out = Vec::new();
        encode_into(&mut out, &Packet::PubComp(Ack::new(pid, reason)), protocol);
        self.send_durable(id, out, now);
    }

    fn on_disconnect(&mut self, id: ConnId, key: SessionKey, d: Disconnect<'_>, now: Instant) -> ReadStep {
        if let Some(s) = self.sessions.map.get_mut(&key) {
            if let Some(exp) = d.properties.session_expiry_interval_s {
                if s.expiry_s == 0 && exp != 0 {
                    self.close_conn(id, Some(ProtocolError::SessionExpiryAfterZero), now);
                    return ReadStep::Stop;
                }
                s.expiry_s = exp.min(self.cfg.max_session_expiry_s);
            }
            if d.reason != ReasonCode::DISCONNECT_WITH_WILL {
                // A normal DISCONNECT discards the will (MQTT §3.14.4).
                s.will = None;
            }
        }
        self.out.io.push_back(IoCmd::Close(id));
        self.conn_gone(id, true, now);
        ReadStep::Stop
    }

    /// Closes a connection from the server side. MQTT 5 clients past CONNECT are told why.
    pub(super) fn close_conn(&mut self, id: ConnId, why: Option<ProtocolError>, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        if let (Some(e), true, true) = (&why, conn.is_v5(), conn.is_active()) {
            // A reason string is allowed on DISCONNECT whatever Request Problem Information says (§3.1.2.11.7).
            let text = e.to_string();
            let properties = Properties { reason_string: Some(&text), ..Properties::default() };
            let d = Disconnect { reason: e.reason_code(), properties };
            conn.send(&Packet::Disconnect(d), &mut self.out.io);
        }
        self.out.io.push_back(IoCmd::Close(id));
        // A server-side close is abnormal: the will is published (MQTT §3.1.2.5), except at shutdown,
        // where sessions end with the process.
        let will = !matches!(why, Some(ProtocolError::ShuttingDown));
        self.conn_gone(id, will, now);
    }

    /// The connection is gone (closed by either side): detach it from its session.
    pub(super) fn conn_gone(&mut self, id: ConnId, publish_will: bool, now: Instant) {
        let Some(mut conn) = self.conns.remove(&id) else { return };
        self.sessions.logins.take(id);
        self.sessions.registrations.forget(id);
        if conn.paused {
            self.pauses.paused_conns.remove(&id);
        }
        let last = conn.take_out();
        if !last.is_empty() {
            self.out.closing.insert(id, last);
        }
        if let Some(key) = conn.session() {
            super::dec(&self.shared.connections);
            self.session_detached(key, id, publish_will, now);
            // A congested subscriber that leaves no longer holds anyone back.
            self.decongested(now);
        }
    }

    /// Hands a connection whose client id belongs to another shard over to that shard.
    pub(super) fn handoff(&mut self, id: ConnId, to: crate::ShardId, bytes: &[u8]) {
        self.counters.handoffs += 1;
        self.conns.remove(&id);
        let peer = self.sessions.logins.take(id);
        self.out.io.push_back(IoCmd::Handoff {
            conn: id,
            to,
            state: Handoff { bytes: bytes.to_vec(), peer },
        });
    }

    pub(super) fn arm_keepalive(&mut self, id: ConnId) {
        if let Some(d) = self.conns.get(&id).and_then(|c| c.keepalive_deadline()) {
            self.arm(d, Timer::KeepAlive(id));
        }
    }
}
