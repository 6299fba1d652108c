//! CONNECT: choosing the owner shard, session creation, resumption and takeover, CONNACK, wills and the
//! end of sessions (expiry, clean start).

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_wire::{topic, ConnAck, Connect, Packet, Properties, Protocol, ReasonCode};

use super::register::SessionOf;
use super::session::{Session, WillState};
use super::{owner_of, Mesh, Msg, MsgProps, Origin, ProtocolError, ReadStep, SessionKey, Shard, Timer};
use crate::auth::guard::Identity;
use crate::auth::Refusal;
use crate::ConnId;

impl Shard {
    /// The first CONNECT of a connection. `raw` holds it and every byte after it.
    pub(super) fn on_connect(&mut self, id: ConnId, c: &Connect<'_>, raw: &[u8], now: Instant) -> ReadStep {
        if c.client_id.is_empty() {
            if !c.clean_start && !c.protocol.is_v5() {
                // 3.1.1 §3.1.3.1: a zero-length id requires Clean Session.
                return self.refuse(id, c.protocol, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, now);
            }
            let assigned = self.assign_client_id();
            return self.accept_connect(id, c, Some(assigned), raw, now);
        }
        let owner = owner_of(c.client_id, self.shards);
        if owner != self.id {
            self.handoff(id, owner, raw);
            return ReadStep::Stop;
        }
        self.accept_connect(id, c, None, raw, now)
    }

    /// An id owned by this shard, so a client without one is never handed off, and used by no session
    /// here: the counter restarts with the process, while sessions restored from the log keep the ids
    /// assigned before.
    fn assign_client_id(&mut self) -> Arc<str> {
        loop {
            self.sessions.assigned_ids += 1;
            let scope = &self.cfg.assigned_id_scope;
            let id = if scope.is_empty() {
                format!("shardmq-{}-{:x}", self.id.0, self.sessions.assigned_ids)
            } else {
                format!("shardmq-{scope}-{}-{:x}", self.id.0, self.sessions.assigned_ids)
            };
            if owner_of(&id, self.shards) == self.id
                && self.sessions.by_client.get(&id, &self.sessions.map).is_none()
            {
                return id.into();
            }
        }
    }

    pub(super) fn refuse(
        &mut self,
        id: ConnId,
        protocol: Protocol,
        reason: ReasonCode,
        now: Instant,
    ) -> ReadStep {
        self.counters.connects_refused += 1;
        self.counters.refused[super::metrics::refusal_index(reason)] += 1;
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.protocol = Some(protocol);
            let ack = ConnAck { session_present: false, reason, properties: Properties::default() };
            conn.send(&Packet::ConnAck(ack), &mut self.out.io);
        }
        self.close_conn(id, None, now);
        ReadStep::Stop
    }

    fn accept_connect(
        &mut self,
        id: ConnId,
        c: &Connect<'_>,
        assigned: Option<Arc<str>>,
        raw: &[u8],
        now: Instant,
    ) -> ReadStep {
        let v5 = c.protocol.is_v5();
        if self.shutting_down {
            return self.refuse(id, c.protocol, ReasonCode::SERVER_UNAVAILABLE, now);
        }
        if v5 && c.properties.authentication_method.is_some() {
            return self.refuse(id, c.protocol, ProtocolError::AuthNotSupported.reason_code(), now);
        }
        // Checked by the owner shard only (a handed-off CONNECT arrives here whole): one check per
        // CONNECT, and the ACL ends up where the session lives.
        let mut acl = None;
        let peer = self.sessions.logins.take(id);
        // The node takes user names from client certificates, and this one has none: it may not log in
        // under the name it claims (Mosquitto's `use_identity_as_username` refuses it too).
        let identity = match peer.identity {
            Some(Identity::Missing) => {
                self.counters.auth_refused += 1;
                tracing::debug!(conn = id.0, "CONNECT refused: the client certificate has no CN");
                return self.refuse(id, c.protocol, ReasonCode::NOT_AUTHORIZED, now);
            }
            Some(Identity::Name(n)) => Some(n),
            None => None,
        };
        // A CONNECT run again once the zone registered it was checked the first time.
        let approved = self.sessions.registrations.take_approved(id);
        let registered = approved.is_some();
        let mut registration = None;
        if let Some(a) = approved {
            acl = a.acl;
            registration = a.registration;
        } else if let Some(auth) = self.sessions.auth.clone() {
            if peer.ip.is_some_and(|ip| self.sessions.logins.banned(ip, now)) {
                self.counters.auth_refused += 1;
                self.counters.logins_banned += 1;
                return self.refuse(id, c.protocol, ReasonCode::BANNED, now);
            }
            // A client certificate's name, where the node uses it as the user name, replaces the
            // CONNECT's and stands for the password (the certificate was verified in the handshake), as
            // Mosquitto's `use_identity_as_username` does.
            let username = identity.as_deref().or(c.username);
            let checked = if identity.is_some() { Ok(()) } else { auth.authenticate(c.username, c.password) };
            if let Err(refusal) = checked {
                self.counters.auth_refused += 1;
                if let (Refusal::BadCredentials, Some(ip)) = (refusal, peer.ip) {
                    if let Some(ban) = self.sessions.logins.failed(ip, now) {
                        tracing::warn!(%ip, ban_s = ban.as_secs(), "too many failed logins from one address; refused for a while");
                    }
                }
                let reason = match refusal {
                    Refusal::Anonymous => ReasonCode::NOT_AUTHORIZED,
                    Refusal::BadCredentials => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                };
                tracing::debug!(conn = id.0, user = c.username, ?refusal, "CONNECT refused");
                return self.refuse(id, c.protocol, reason, now);
            }
            let client_id = assigned.as_deref().unwrap_or(c.client_id);
            acl = auth.client_acl(client_id, username);
            // A will the client could not publish itself is refused up front, as Mosquitto does.
            if let (Some(a), Some(w)) = (&acl, &c.will) {
                if !a.can_publish(w.topic) {
                    self.counters.auth_refused += 1;
                    return self.refuse(id, c.protocol, ReasonCode::NOT_AUTHORIZED, now);
                }
            }
        }
        if let Some(w) = &c.will {
            if !topic::valid_topic_name(w.topic) || topic::levels(w.topic) > self.cfg.max_topic_levels {
                return self.refuse(id, c.protocol, ReasonCode::TOPIC_NAME_INVALID, now);
            }
        }
        // In a zone, the registry learns that this node holds the session first (see `register`). Ids
        // this node assigned are its own.
        // A clean connection with nothing for the zone to keep after it (no will, a session that ends
        // with it) is answered at once where the zone prefers availability; its registration follows.
        let ends_with_connection = if v5 {
            c.properties.session_expiry_interval_s.unwrap_or(0).min(self.cfg.max_session_expiry_s) == 0
        } else {
            c.clean_start
        };
        // Not while a CONNECT of the id waits for its registration here: this one would answer first, and
        // the registry would see them in the other order.
        let ahead = self.cfg.register_ahead
            && c.clean_start
            && c.will.is_none()
            && ends_with_connection
            && !self.sessions.registrations.holds_connect_of(c.client_id);
        if self.cfg.cluster_gateway && !registered && assigned.is_none() && !ahead {
            let will = c.will.as_ref().map(|w| {
                Box::new(super::register::RegisteredWill {
                    topic: w.topic.into(),
                    payload: w.payload.into(),
                    qos: w.qos as u8,
                    retain: w.retain,
                    delay_s: if v5 { w.properties.will_delay_interval_s.unwrap_or(0) } else { 0 },
                })
            });
            self.hold_for_registration(id, c.client_id, c.clean_start, will, c.protocol, raw, acl);
            return ReadStep::Stop;
        }
        if super::inc(&self.shared.connections) >= self.cfg.max_connections {
            super::dec(&self.shared.connections);
            let reason = if v5 { ReasonCode::QUOTA_EXCEEDED } else { ReasonCode::SERVER_UNAVAILABLE };
            return self.refuse(id, c.protocol, reason, now);
        }
        self.counters.connects += 1;
        let client_id: Arc<str> = assigned.clone().unwrap_or_else(|| c.client_id.into());

        // Timers fire once per loop iteration, but a read is stamped when it is dispatched, and handed-off
        // connections are served before the first timer pass after a restart: a session can be past its
        // expiry or will delay here with its timer not yet run. That happened then, not at this CONNECT.
        if let Some(key) = self.sessions.by_client.get(&client_id, &self.sessions.map) {
            self.settle_offline(key, now);
        }
        // Takeover: the old connection is closed as if it had dropped (its will applies).
        if let Some(key) = self.sessions.by_client.get(&client_id, &self.sessions.map) {
            if let Some(old) = self.sessions.map.get(&key).and_then(|s| s.conn) {
                self.close_conn(old, Some(ProtocolError::SessionTakenOver), now);
            }
        }
        let mut session_present = false;
        if let Some(key) = self.sessions.by_client.get(&client_id, &self.sessions.map) {
            if c.clean_start {
                self.end_session(key, now);
            } else {
                session_present = true;
            }
        }
        let requested_expiry = if v5 {
            c.properties.session_expiry_interval_s.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry_s = requested_expiry.min(self.cfg.max_session_expiry_s);
        let key = match self.sessions.by_client.get(&client_id, &self.sessions.map) {
            Some(k) => k,
            None => {
                let k = SessionKey(self.sessions.next_key);
                self.sessions.next_key += 1;
                self.sessions.map.insert(k, Box::new(Session::new(client_id.clone())));
                self.sessions.by_client.insert(k, &self.sessions.map);
                k
            }
        };
        let will = c.will.as_ref().map(|w| {
            Box::new(WillState {
                topic: w.topic.into(),
                payload: w.payload.into(),
                qos: w.qos,
                retain: w.retain,
                delay_s: if v5 { w.properties.will_delay_interval_s.unwrap_or(0) } else { 0 },
                expiry_s: w.properties.message_expiry_interval_s.filter(|_| v5),
                props: if v5 { MsgProps::from_wire(&w.properties) } else { None },
                at: None,
            })
        });
        let receive_max = c.properties.receive_maximum.unwrap_or(u16::MAX).min(self.cfg.max_inflight).max(1);
        {
            let s = self.sessions.map.get_mut(&key).expect("session inserted above");
            s.conn = Some(id);
            s.protocol = c.protocol;
            s.expiry_s = expiry_s;
            s.expires_at = None;
            // A reconnect before the will delay elapsed cancels the pending will (MQTT 5 §3.1.3.2.2).
            s.will = will;
            s.send_quota = receive_max;
            s.last_targets = 0;
            s.congested_by = 0;
        }
        match acl {
            Some(a) => self.sessions.acls.insert(key, a),
            None => self.sessions.acls.remove(&key),
        };
        // After the local takeover above: the gateway hears of the old connection's end first.
        if self.cfg.cluster_gateway && ahead && assigned.is_none() {
            registration = Some(self.register_ahead(client_id.clone()));
        }
        if let Some(r) = registration {
            self.sessions.registrations.current.insert(key, r);
        }

        let mut keepalive_s = c.keep_alive_s;
        let mut props = Properties::default();
        if v5 {
            let max_ka = self.cfg.max_keepalive_s;
            if max_ka > 0 && (keepalive_s == 0 || keepalive_s > max_ka) {
                keepalive_s = max_ka;
                props.server_keep_alive_s = Some(max_ka);
            }
            props.receive_maximum = Some(self.cfg.max_inflight);
            props.maximum_packet_size = Some(self.cfg.max_packet_size);
            props.topic_alias_maximum = Some(self.cfg.max_topic_alias);
            if requested_expiry != expiry_s {
                props.session_expiry_interval_s = Some(expiry_s);
            }
            props.assigned_client_identifier = assigned.as_deref();
        }
        let conn = self.conns.get_mut(&id).expect("connection present while handling its CONNECT");
        conn.activate(key);
        conn.protocol = Some(c.protocol);
        conn.keepalive_ms = keepalive_s as u32 * 1000;
        if v5 {
            conn.client_max_packet = c.properties.maximum_packet_size.unwrap_or(conn.client_max_packet);
            conn.client_alias_max =
                c.properties.topic_alias_maximum.unwrap_or(0).min(self.cfg.max_outbound_alias);
        }
        let ack = ConnAck { session_present, reason: ReasonCode::SUCCESS, properties: props };
        conn.send(&Packet::ConnAck(ack), &mut self.out.io);
        // Not a reason to refuse the client: the session works from memory, and the next change that
        // must be durable (a subscription, a publish) is refused if the log still fails.
        let _ = self.persist_session(key);
        self.arm_keepalive(id);
        self.resume(key, now);
        ReadStep::Continue
    }

    /// The session's connection went away.
    pub(super) fn session_detached(
        &mut self,
        key: SessionKey,
        conn: ConnId,
        publish_will: bool,
        now: Instant,
    ) {
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        if s.conn != Some(conn) {
            return;
        }
        s.conn = None;
        if !publish_will {
            s.will = None;
        }
        if let Some(w) = &mut s.will {
            if w.delay_s == 0 {
                self.publish_will(key, now);
            } else {
                let at = now + Duration::from_secs(w.delay_s as u64);
                w.at = Some(at);
                self.arm(at, Timer::Will(key));
            }
        }
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        match s.expiry_s {
            0 => self.end_session(key, now),
            u32::MAX => {
                let _ = self.persist_session(key);
                self.unregister(key, true);
            }
            secs => {
                let at = now + Duration::from_secs(secs as u64);
                s.expires_at = Some(at);
                self.arm(at, Timer::Expiry(key));
                let _ = self.persist_session(key);
                self.unregister(key, true);
            }
        }
    }

    /// Tells the zone's registry (through the gateway) that the session's connection went (`kept`) or
    /// that the session ended.
    fn unregister(&mut self, key: SessionKey, kept: bool) {
        let (Some(gateway), Some(s)) = (self.gateway(), self.sessions.map.get(&key)) else { return };
        let current = &mut self.sessions.registrations.current;
        let r = if kept { current.get(&key).copied() } else { current.remove(&key) };
        let Some(registration) = r else { return };
        let client = s.client_id.clone();
        self.send_mesh(gateway, Mesh::Unregister { client, registration, kept });
    }

    /// A connection on another node took this session over (the zone's registry says so): its client,
    /// if connected here, gets DISCONNECT 0x8E, and the session leaves: exported for the node that took
    /// it over (`export`), or ended (its new connection started clean). The gateway hears what left.
    pub(super) fn taken_over_elsewhere(
        &mut self,
        client: Arc<str>,
        export: bool,
        of: SessionOf,
        now: Instant,
    ) {
        let mut state = None;
        let current = self.sessions.by_client.get(&client, &self.sessions.map);
        if let Some(key) = current.filter(|k| self.ends_current(*k, of)) {
            self.counters.sessions_taken_elsewhere += 1;
            match (export, self.wall_clock()) {
                (true, Some(clock)) => {
                    state = self.export_forwarding(&client, &clock, now).map(|e| Box::new(e.transfer));
                }
                _ => {
                    if let Some(conn) = self.sessions.map.get(&key).and_then(|s| s.conn) {
                        self.close_conn(conn, Some(ProtocolError::SessionTakenOver), now);
                    }
                    self.end_session(key, now);
                }
            }
        }
        if let Some(gateway) = self.gateway() {
            self.send_mesh(gateway, Mesh::Exported { client, state });
        }
    }

    /// What an offline session's Will and Expiry timers do once due: publish the will when its delay has
    /// passed, end the session when its expiry has (which publishes a will still pending). Also run for a
    /// CONNECT that may arrive before those timers (see `accept_connect`).
    pub(super) fn settle_offline(&mut self, key: SessionKey, now: Instant) {
        let Some(s) = self.sessions.map.get(&key).filter(|s| s.conn.is_none()) else { return };
        let (will_due, expired) = (s.will_due(now), s.expired(now));
        if will_due {
            self.publish_will(key, now);
        }
        if expired {
            self.end_session(key, now);
        }
    }

    /// Publishes the session's will (once) and forgets it.
    pub(super) fn publish_will(&mut self, key: SessionKey, now: Instant) {
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        let Some(w) = s.will.take() else { return };
        let stored = s.stored_ver != 0;
        if stored {
            let _ = self.persist_session(key);
        }
        let msg = Msg {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            expires_at: w.expiry_s.map(|e| now + Duration::from_secs(e as u64)),
            props: w.props,
            origin: Some(Origin { shard: self.id, session: key }),
        };
        // A will has no connection to pause; where it went does not matter for flow control.
        let _targets = self.route(Arc::new(msg), now);
    }

    /// Ends a session: its pending will goes out, its subscriptions and queued messages are dropped.
    pub(super) fn end_session(&mut self, key: SessionKey, now: Instant) {
        if self.sessions.map.get(&key).is_some_and(|s| s.will.is_some()) {
            self.publish_will(key, now);
        }
        self.unregister(key, false);
        if let Some(s) = self.sessions.map.get_mut(&key) {
            s.expiry_s = 0;
            let _ = self.persist_session(key);
        }
        let Some(s) = self.sessions.map.remove(&key) else { return };
        self.sessions.registrations.stubs.remove(&key);
        self.sessions.acls.remove(&key);
        // Retained messages it was still owed go with it (a later session may get the same key).
        self.retained.owed.remove(&key);
        self.sessions.by_client.remove(&s.client_id, key);
        for filter in s.subs {
            self.remove_subscription(key, &filter, now);
        }
    }
}
