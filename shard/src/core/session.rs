//! Sessions and outbound delivery: QoS 1/2 in-flight windows (Receive Maximum), the bounded queue behind
//! them, redelivery on resume, and the per-client rewrites of a PUBLISH (topic alias, subscription
//! identifiers, remaining expiry, maximum packet size).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use shardmq_wire::{Ack, Packet, PacketId, Protocol, Publish, QoS, ReasonCode};

use super::backpressure::Verdict;
use super::conn::Conn;
use super::{Delivery, MsgProps, SessionKey, Shard};

#[derive(Debug)]
pub(super) struct WillState {
    pub topic: Box<str>,
    pub payload: Box<[u8]>,
    pub qos: QoS,
    pub retain: bool,
    pub delay_s: u32,
    pub expiry_s: Option<u32>,
    pub props: Option<Box<MsgProps>>,
    /// Set while the (delayed) will is pending. Kept here rather than in `Session`, where it would cost
    /// every session 16 bytes (and push it past the 128-byte allocator class) for a rare state.
    pub at: Option<Instant>,
}

#[derive(Debug)]
pub(super) struct InFlight {
    /// Sent with `d.pid`.
    pub d: Delivery,
    /// PUBREC received and PUBREL sent (QoS 2 second half).
    pub released: bool,
}

/// A session's QoS 1/2 bookkeeping.
#[derive(Debug, Default)]
pub(super) struct QosState {
    /// QoS 1/2 messages sent and not yet completed, in send order.
    /// Invariant: `inflight.len() <= send_quota` except right after a resume with a smaller quota or a
    /// restart (released QoS 2 messages come back in flight).
    pub inflight: VecDeque<InFlight>,
    /// QoS 1/2 messages waiting for room in the window (or for the client to come back), packet ids
    /// already chosen. Invariant: packet ids are unique across `inflight` and `queue` (the queue cap keeps
    /// the two below the 65,535 ids).
    pub queue: VecDeque<Delivery>,
    /// Packet ids of QoS 2 publishes received and not yet released (duplicate suppression). Invariant:
    /// sorted and unique, at most `Config::max_inflight` long (the inbound limit, every protocol version).
    pub inbound_qos2: Vec<u16>,
    /// Topic + payload bytes of the messages in `queue`, kept as they come and go (never recounted).
    /// Invariant: 0 exactly when `queue` is empty (every message has a topic).
    queued_bytes: usize,
}

/// What a queued message counts against `max_queued_bytes`: the parts that vary with the message.
fn queued_size(d: &Delivery) -> usize {
    d.msg.topic.len() + d.msg.payload.len()
}

impl QosState {
    pub fn queued_bytes(&self) -> usize {
        debug_assert_eq!(self.queue.is_empty(), self.queued_bytes == 0);
        self.queued_bytes
    }

    /// Appends to the queue. Every addition goes through here, so `queued_bytes` stays exact.
    pub fn push_queued(&mut self, d: Delivery) {
        self.queued_bytes += queued_size(&d);
        self.queue.push_back(d);
    }

    /// Takes the oldest queued message. Every removal goes through here, so `queued_bytes` stays exact.
    pub fn pop_queued(&mut self) -> Option<Delivery> {
        let d = self.queue.pop_front()?;
        self.queued_bytes -= queued_size(&d);
        debug_assert_eq!(self.queue.is_empty(), self.queued_bytes == 0);
        Some(d)
    }

    pub fn holds_inbound_qos2(&self, pid: u16) -> bool {
        self.inbound_qos2.binary_search(&pid).is_ok()
    }

    /// Records an unreleased inbound QoS 2 id; false if it was already there.
    pub fn add_inbound_qos2(&mut self, pid: u16) -> bool {
        match self.inbound_qos2.binary_search(&pid) {
            Ok(_) => false,
            Err(i) => {
                self.inbound_qos2.insert(i, pid);
                true
            }
        }
    }

    /// Forgets a released inbound QoS 2 id; false if it was not there.
    pub fn remove_inbound_qos2(&mut self, pid: u16) -> bool {
        match self.inbound_qos2.binary_search(&pid) {
            Ok(i) => {
                self.inbound_qos2.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    fn is_empty(&self) -> bool {
        self.inflight.is_empty() && self.queue.is_empty() && self.inbound_qos2.is_empty()
    }
}

/// What a session without QoS 1/2 state reads.
static NO_QOS: QosState =
    QosState { inflight: VecDeque::new(), queue: VecDeque::new(), inbound_qos2: Vec::new(), queued_bytes: 0 };

/// A session's filters, unordered and unique. Most sessions hold a few, kept in a Vec (24 bytes when
/// empty, where a hash set costs 64) and scanned; past [`Subs::SMALL`] they move to a hash set, so that
/// checking a SUBSCRIBE for a duplicate stays O(1) however many a session holds.
#[derive(Debug, Clone)]
pub(super) enum Subs {
    /// Invariant: at most [`Subs::SMALL`] filters.
    Small(Vec<Box<str>>),
    /// Invariant: more than [`Subs::SMALL`] / 2 filters (fewer move back to a Vec).
    Large(Box<ahash::HashSet<Box<str>>>),
}

impl Default for Subs {
    fn default() -> Self {
        Subs::Small(Vec::new())
    }
}

impl Subs {
    const SMALL: usize = 16;

    pub fn len(&self) -> usize {
        match self {
            Subs::Small(v) => v.len(),
            Subs::Large(h) => h.len(),
        }
    }

    pub fn contains(&self, filter: &str) -> bool {
        match self {
            Subs::Small(v) => v.iter().any(|f| **f == *filter),
            Subs::Large(h) => h.contains(filter),
        }
    }

    /// Adds a filter known not to be there.
    pub fn insert(&mut self, filter: Box<str>) {
        debug_assert!(!self.contains(&filter));
        match self {
            Subs::Small(v) if v.len() < Self::SMALL => v.push(filter),
            Subs::Small(v) => {
                let mut h: ahash::HashSet<Box<str>> = std::mem::take(v).into_iter().collect();
                h.insert(filter);
                *self = Subs::Large(Box::new(h));
            }
            Subs::Large(h) => {
                h.insert(filter);
            }
        }
        debug_assert!(!matches!(self, Subs::Small(v) if v.len() > Self::SMALL));
    }

    /// Removes a filter; false if it was not there.
    pub fn remove(&mut self, filter: &str) -> bool {
        match self {
            Subs::Small(v) => match v.iter().position(|f| **f == *filter) {
                Some(i) => {
                    v.swap_remove(i);
                    true
                }
                None => false,
            },
            Subs::Large(h) => {
                let removed = h.remove(filter);
                if h.len() <= Self::SMALL / 2 {
                    // Back to the compact form once few are left (half, so that one filter coming and
                    // going at the boundary does not convert each time).
                    *self = Subs::Small(std::mem::take(&mut **h).into_iter().collect());
                }
                removed
            }
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = &Box<str>> + '_> {
        match self {
            Subs::Small(v) => Box::new(v.iter()),
            Subs::Large(h) => Box::new(h.iter()),
        }
    }
}

impl FromIterator<Box<str>> for Subs {
    fn from_iter<I: IntoIterator<Item = Box<str>>>(iter: I) -> Self {
        let mut s = Subs::default();
        for f in iter {
            if !s.contains(&f) {
                s.insert(f);
            }
        }
        s
    }
}

impl IntoIterator for Subs {
    type Item = Box<str>;
    type IntoIter = Box<dyn Iterator<Item = Box<str>>>;
    fn into_iter(self) -> Self::IntoIter {
        match self {
            Subs::Small(v) => Box::new(v.into_iter()),
            Subs::Large(h) => Box::new(h.into_iter()),
        }
    }
}

#[derive(Debug)]
pub(super) struct Session {
    pub client_id: Arc<str>,
    pub conn: Option<crate::ConnId>,
    pub protocol: Protocol,
    /// Full filters as subscribed (with any `$share/group/` prefix); options live in the trie.
    pub subs: Subs,
    /// 0: ends with the connection; `u32::MAX`: never expires.
    pub expiry_s: u32,
    /// Set while disconnected with a finite expiry.
    pub expires_at: Option<Instant>,
    /// Its `at` is set while a delayed will is pending.
    pub will: Option<Box<WillState>>,
    /// Version of this session's latest record in the shard's log; 0 when it is not stored (it ends with
    /// its connection, or there is no log). See `persist`.
    pub stored_ver: u64,
    pub(super) next_pid: u16,
    /// QoS 1/2 state, allocated on first use and freed when empty: an idle client pays one pointer.
    qos: Option<Box<QosState>>,
    /// The client's Receive Maximum, capped by ours.
    pub send_quota: u16,
    /// Flow control (see `flow`): shards the last message this session published went to, and shards
    /// that report all its subscribers there congested (bit per shard).
    pub last_targets: u64,
    pub congested_by: u64,
}

impl Session {
    pub fn new(client_id: Arc<str>) -> Session {
        Session {
            client_id,
            conn: None,
            protocol: Protocol::V311,
            subs: Subs::default(),
            expiry_s: 0,
            expires_at: None,
            will: None,
            stored_ver: 0,
            next_pid: 1,
            qos: None,
            send_quota: 1,
            last_targets: 0,
            congested_by: 0,
        }
    }

    pub fn qos(&self) -> &QosState {
        self.qos.as_deref().unwrap_or(&NO_QOS)
    }

    pub fn qos_mut(&mut self) -> &mut QosState {
        self.qos.get_or_insert_with(Default::default)
    }

    pub fn qos_opt_mut(&mut self) -> Option<&mut QosState> {
        self.qos.as_deref_mut()
    }

    /// Drops the QoS 1/2 state whatever it holds (the session moved away with it).
    pub fn take_qos(&mut self) {
        self.qos = None;
    }

    /// Frees the QoS 1/2 state once nothing is in flight, queued or awaiting PUBREL.
    pub fn trim(&mut self) {
        if self.qos.as_deref().is_some_and(QosState::is_empty) {
            self.qos = None;
        }
    }

    /// When the pending delayed will is due, if one is.
    pub fn will_at(&self) -> Option<Instant> {
        self.will.as_ref().and_then(|w| w.at)
    }

    pub fn will_due(&self, now: Instant) -> bool {
        self.will_at().is_some_and(|t| t <= now)
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// The next free packet id, in sequence. Ids are taken in order when a message is queued or sent, so
    /// the queue holds the most recently taken ones, and the queue cap (`flow::queue_cap`) keeps queue and
    /// window below 65,535 ids together: coming round again, an id can still be held only by a message
    /// in flight that the client never acknowledged (while later ones were), and that id is skipped.
    fn alloc_pid(&mut self) -> u16 {
        let f = self.qos();
        debug_assert!(f.inflight.len() + f.queue.len() < u16::MAX as usize, "every packet id is taken");
        loop {
            let pid = self.next_pid;
            self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
            if !self.qos().inflight.iter().any(|x| x.d.pid == pid) {
                return pid;
            }
        }
    }

    /// The `mid` of the message queued or sent last (the queue only fills while it is not empty or the
    /// window is full, so its back is newer than anything in flight).
    fn newest_mid(&self) -> Option<u64> {
        let f = self.qos();
        f.queue.back().or(f.inflight.back().map(|x| &x.d)).map(|d| d.mid)
    }

    /// Whether the session holds the message stored as `mid` (for log compaction). `mid`s ascend along
    /// the window then the queue.
    pub fn holds(&self, mid: u64) -> bool {
        let f = self.qos();
        f.inflight.iter().any(|x| x.d.mid == mid) || f.queue.binary_search_by_key(&mid, |d| d.mid).is_ok()
    }

    fn has_room(&self) -> bool {
        self.qos().inflight.len() < self.send_quota as usize
    }
}

/// Writes one PUBLISH for `d` to `conn`. Returns false if the client's Maximum Packet Size forbids it.
fn write_publish(conn: &mut Conn, d: &Delivery, dup: bool, now: Instant, io: &mut super::IoQueue) -> bool {
    let msg = &d.msg;
    let v5 = conn.is_v5();
    let mut props = if v5 { msg.wire_properties(now) } else { Default::default() };
    let mut topic: &str = &msg.topic;
    let mut new_alias = None;
    if v5 {
        props.subscription_identifiers = d.sub_ids.to_vec();
        if let Some((alias, known)) = conn.outbound_alias(&msg.topic) {
            props.topic_alias = Some(alias);
            if known {
                topic = "";
            } else {
                new_alias = Some(alias);
            }
        }
    }
    let pkt = Packet::Publish(Publish {
        dup: dup || d.dup,
        qos: d.qos,
        retain: d.retain,
        topic,
        packet_id: (d.qos != QoS::AtMostOnce).then_some(PacketId(d.pid)),
        payload: &msg.payload,
        properties: props,
    });
    let max = conn.client_max_packet;
    let sent = conn.send_within(&pkt, max, io);
    if let (true, Some(alias)) = (sent, new_alias) {
        // Only a PUBLISH that reached the client teaches it the alias.
        conn.remember_alias(&msg.topic, alias);
    }
    sent
}

impl Shard {
    /// Hands one message to a session: now, into its queue, or nowhere (QoS 0 to an absent or stalled
    /// client, expired messages, a full queue's oldest entry), counting every drop.
    pub(super) fn deliver(&mut self, key: SessionKey, mut d: Delivery, now: Instant) -> Verdict {
        debug_assert!(d.qos <= d.msg.qos, "a subscription can only lower a message's QoS");
        if d.msg.is_expired(now) {
            self.counters.dropped_expired += 1;
            return Verdict::Ignored;
        }
        if !self.sessions.registrations.stubs.is_empty()
            && self.sessions.registrations.stubs.contains_key(&key)
        {
            return self.forward_from_stub(key, d);
        }
        let high_water = self.queue_high_water();
        let bytes_high_water = self.queue_bytes_high_water();
        if self.cfg.acl_on() && !self.sessions.acls.get(&key).is_some_and(|a| a.can_read(&d.msg.topic)) {
            self.counters.denied_by_acl += 1;
            return Verdict::Ignored;
        }
        let Some(s) = self.sessions.map.get_mut(&key) else { return Verdict::Ignored };
        let conn = s.conn.and_then(|c| self.conns.get_mut(&c));
        if d.qos == QoS::AtMostOnce {
            let budget = super::backpressure::qos0_blocked_budget(&self.cfg);
            return match conn {
                Some(conn) if !conn.blocked || (conn.blocked_bytes as usize) < budget => {
                    let before = conn.out_len();
                    if write_publish(conn, &d, false, now, &mut self.out.io) {
                        self.counters.delivered(d.qos);
                        if conn.blocked {
                            // Held as output behind what the socket has not taken yet, while flow control
                            // pauses the publishers (the verdict), instead of being dropped.
                            let added = conn.out_len().saturating_sub(before);
                            conn.blocked_bytes = conn.blocked_bytes.saturating_add(added as u32);
                            Verdict::Congested
                        } else {
                            Verdict::Accepted
                        }
                    } else {
                        self.counters.dropped_too_large += 1;
                        Verdict::Ignored
                    }
                }
                Some(_) => {
                    self.counters.dropped_qos0 += 1;
                    Verdict::Congested
                }
                None => {
                    self.counters.dropped_qos0 += 1;
                    Verdict::Ignored
                }
            };
        }
        match conn {
            Some(conn) if !conn.blocked && s.qos().queue.is_empty() && s.has_room() => {
                d.pid = s.alloc_pid();
                if write_publish(conn, &d, false, now, &mut self.out.io) {
                    self.counters.delivered(d.qos);
                    if s.stored_ver != 0 {
                        if let Some(st) = self.store.as_deref_mut() {
                            d.mid = st.note_delivery(key, &d, s.newest_mid());
                        }
                    }
                    s.qos_mut().inflight.push_back(InFlight { d, released: false });
                    Verdict::Accepted
                } else {
                    self.counters.dropped_too_large += 1;
                    Verdict::Ignored
                }
            }
            conn => {
                let online = conn.is_some();
                let blocked = conn.is_some_and(|c| c.blocked);
                let cap = super::backpressure::queue_cap(&self.cfg, online);
                let bytes_cap = super::backpressure::queue_bytes_cap(&self.cfg, online);
                let size = queued_size(&d);
                let stored = s.stored_ver != 0;
                if self.cfg.max_queued > 0 {
                    d.pid = s.alloc_pid();
                    if stored {
                        if let Some(st) = self.store.as_deref_mut() {
                            d.mid = st.note_delivery(key, &d, s.newest_mid());
                        }
                    }
                }
                let flows = s.qos_mut();
                // An offline session's queue is bounded by `max_queued` and `max_queued_bytes`; an online
                // one's only overflows when far more arrives than flow control lets through (all counted).
                // The newest message is kept even if it alone exceeds the byte bound.
                loop {
                    let full = flows.queue.len() >= cap;
                    let over_bytes = !flows.queue.is_empty() && flows.queued_bytes() + size > bytes_cap;
                    if !full && !over_bytes {
                        break;
                    }
                    if let Some(old) = flows.pop_queued() {
                        if let (Some(st), true) = (self.store.as_deref_mut(), old.mid != 0) {
                            st.done(key, old.mid);
                        }
                    }
                    if full {
                        self.counters.dropped_queue_full += 1;
                    } else {
                        self.counters.dropped_queue_bytes += 1;
                    }
                    if flows.queue.is_empty() {
                        break;
                    }
                }
                if self.cfg.max_queued > 0 {
                    let queue = &flows.queue;
                    debug_assert!(queue.back().is_none_or(|b| b.mid < d.mid || d.mid == 0 || b.mid == 0));
                    flows.push_queued(d);
                }
                let (queued, queued_bytes) = (flows.queue.len(), flows.queued_bytes());
                s.trim();
                match online {
                    false => Verdict::Ignored,
                    true if blocked || queued >= high_water || queued_bytes >= bytes_high_water => {
                        Verdict::Congested
                    }
                    true => Verdict::Accepted,
                }
            }
        }
    }

    /// Moves queued messages into the in-flight window while there is room and the client reads.
    pub(super) fn pump(&mut self, key: SessionKey, now: Instant) {
        let low_water = self.queue_high_water() / 2;
        let bytes_low_water = self.queue_bytes_high_water() / 2;
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        let Some(conn) = s.conn.and_then(|c| self.conns.get_mut(&c)) else { return };
        while !conn.blocked && s.has_room() {
            let Some(d) = s.qos_mut().pop_queued() else { break };
            let sent = if d.msg.is_expired(now) {
                self.counters.dropped_expired += 1;
                false
            } else if write_publish(conn, &d, false, now, &mut self.out.io) {
                self.counters.delivered(d.qos);
                true
            } else {
                self.counters.dropped_too_large += 1;
                false
            };
            if sent {
                s.qos_mut().inflight.push_back(InFlight { d, released: false });
            } else if let (Some(st), true) = (self.store.as_deref_mut(), d.mid != 0) {
                st.done(key, d.mid);
            }
        }
        s.trim();
        let f = s.qos();
        if !conn.blocked && f.queue.len() <= low_water && f.queued_bytes() <= bytes_low_water {
            self.decongested(now);
        }
        self.pump_retained(key, now);
    }

    /// A client resumed its session: resend everything unacknowledged, in order, then the queue.
    pub(super) fn resume(&mut self, key: SessionKey, now: Instant) {
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        let Some(conn) = s.conn.and_then(|c| self.conns.get_mut(&c)) else { return };
        for f in s.qos().inflight.iter() {
            if f.released {
                conn.send(
                    &Packet::PubRel(Ack::new(PacketId(f.d.pid), ReasonCode::SUCCESS)),
                    &mut self.out.io,
                );
            } else {
                // MQTT 5 §4.4: unacknowledged PUBLISHes are resent with DUP; expiry does not apply to them.
                write_publish(conn, &f.d, true, now, &mut self.out.io);
            }
        }
        self.pump(key, now);
    }

    pub(super) fn on_puback(&mut self, key: SessionKey, pid: PacketId, now: Instant) {
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        if let Some(i) = s.qos().inflight.iter().position(|f| f.d.pid == pid.0 && f.d.qos == QoS::AtLeastOnce)
        {
            if let Some(f) = s.qos_mut().inflight.remove(i) {
                self.forget(key, f);
            }
            self.pump(key, now);
        }
    }

    pub(super) fn on_pubrec(&mut self, id: crate::ConnId, key: SessionKey, a: &Ack<'_>, now: Instant) {
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        let pos =
            s.qos().inflight.iter().position(|f| f.d.pid == a.packet_id.0 && f.d.qos == QoS::ExactlyOnce);
        let reason = match pos {
            Some(i) if a.reason.is_error() => {
                // The receiver refused the message: the exchange ends here (MQTT 5 §4.3.3).
                if let Some(f) = s.qos_mut().inflight.remove(i) {
                    self.forget(key, f);
                }
                self.pump(key, now);
                return;
            }
            Some(i) => {
                let f = &mut s.qos_mut().inflight[i];
                let first = !f.released;
                f.released = true;
                let mid = f.d.mid;
                if let (Some(st), true, true) = (self.store.as_deref_mut(), mid != 0, first) {
                    // Durable before the PUBREL goes out: once the client sees PUBREL it may forget the
                    // packet id, so a restart must not send the PUBLISH again.
                    if !st.released(key, mid) {
                        self.storage_failed(id, now);
                        return;
                    }
                }
                ReasonCode::SUCCESS
            }
            None => ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
        };
        let mut out = Vec::new();
        let protocol = self.conns.get(&id).and_then(|c| c.protocol).unwrap_or(Protocol::V311);
        super::encode_into(&mut out, &Packet::PubRel(Ack::new(a.packet_id, reason)), protocol);
        self.send_durable(id, out, now);
    }

    pub(super) fn on_pubcomp(&mut self, key: SessionKey, pid: PacketId, now: Instant) {
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        if let Some(i) = s.qos().inflight.iter().position(|f| f.d.pid == pid.0 && f.released) {
            if let Some(f) = s.qos_mut().inflight.remove(i) {
                self.forget(key, f);
            }
            self.pump(key, now);
        }
    }

    /// A message left a session's window for good (acknowledged or refused by the client).
    fn forget(&mut self, key: SessionKey, f: InFlight) {
        if let (Some(st), true) = (self.store.as_deref_mut(), f.d.mid != 0) {
            st.done(key, f.d.mid);
        }
    }
}
