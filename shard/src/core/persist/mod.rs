//! Durability: what a shard writes to its log, when it may acknowledge, how it rebuilds itself on start
//! and which records compaction keeps.
//!
//! What is stored: persistent sessions (expiry > 0) with their subscriptions and will, the QoS 1/2
//! messages queued or in flight to them (with their packet ids), the QoS 2 handshakes in both directions,
//! and the retained messages whose topic this shard owns. Connections, clean sessions and QoS 0 traffic
//! are memory only.
//!
//! The rule that makes it crash-safe: a response that acknowledges a change (PUBACK, PUBREC, PUBREL,
//! PUBCOMP, SUBACK, UNSUBACK) leaves only once the log is durable past the records of that change, on
//! this shard and on every shard the publish reached. Records are appended as the core works (a `memcpy`
//! into the mapped segment); [`Core::handle_commit`](crate::runtime::Core::handle_commit), called by the
//! runtime once per event-loop iteration, commits them as one group and releases what was held. A
//! publish that reached other shards carries a token; each of them answers [`Mesh::Stored`] once its own
//! records are durable, and the PUBACK waits for every answer. Acknowledgements of one connection leave in
//! the order their requests arrived.
//!
//! With no log (`--in-memory`) none of this runs and nothing is held.

mod node;
mod records;
mod replay;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::HashMap;
use shardmq_storage::{Keep, Log, Lsn, RecordType, StorageError};
use shardmq_wire::{topic, Ack, Packet, PacketId, QoS, ReasonCode};

pub use self::node::{inspect_node, open_node, read_meta, BootError, ShardReport, StorageConfig};
use self::records::Enc;
pub use self::records::{type_name, WallClock};
pub use self::replay::{Recovered, RecoveredSession, Replay, StoredSession};
use super::msg::{Delivery, Msg};
use super::route::{InterestDelta, SubRef};
use super::session::{InFlight, Session};
use super::{Mesh, PendingSubAck, ProtocolError, SessionKey, Shard, Timer};
use crate::retained::RetainedTree;
use crate::{ConnId, ShardId};

/// Bytes of the oldest segment compaction may walk per event-loop iteration: keeps every step well under
/// a millisecond.
const COMPACT_STEP_BYTES: u64 = 256 * 1024;
/// Compaction budget earned per byte appended (so that it keeps up with any write rate) and per second
/// of time (so that an idle log still sheds its garbage), capped.
const COMPACT_PER_APPENDED_BYTE: u64 = 2;
const COMPACT_PER_SECOND: u64 = 4 << 20;
const COMPACT_DEBT_CAP: u64 = 256 << 20;

/// A shard's log plus what it needs to use it.
pub struct Store {
    log: Log,
    clock: WallClock,
    /// Session versions, `mid`s and session ends, in one sequence (see `replay`).
    next_seq: u64,
    /// The MESSAGE record being assembled: every persistent session of this shard a message goes to is
    /// added before the record is written, so a message is stored once per shard however many sessions
    /// take it.
    batch: Option<Batch>,
    /// An append failed since the operation being handled started (a publish being routed, a Deliver
    /// being stored, a session record being written): it cannot be acknowledged.
    failed: bool,
    errors: u64,
    held: HashMap<ConnId, VecDeque<Held>>,
    /// Answers to other shards' publishes, sent once the log is durable past the given position.
    held_mesh: VecDeque<(Lsn, ShardId, Mesh)>,
    /// Token of a publish waiting for other shards → its connection.
    tokens: HashMap<u64, ConnId>,
    next_token: u64,
    compact_budget: u64,
    compact_at: Instant,
    /// The pass over the segment being compacted so far: bytes walked and bytes kept.
    pass_scanned: u64,
    pass_kept: u64,
    /// Bytes appended (not relocated) since the last pass that found the segment mostly live. Compaction
    /// waits for a segment's worth of them before it tries again: rewriting live data only moves it, and
    /// without this a log of live data would be copied round and round.
    fresh: u64,
    mostly_live: bool,
}

struct Batch {
    msg: Arc<Msg>,
    mid: u64,
    dests: Enc,
    n: u32,
}

/// An acknowledgement waiting for durability here (`lsn`) and, for a publish, for the other shards.
struct Held {
    token: u64,
    lsn: Lsn,
    /// Shards the publish was sent to that have not answered.
    remote: u32,
    /// Answers from shards a message was passed on to, minus how many were announced (see `on_stored`).
    extra: i32,
    refused: bool,
    what: HeldAck,
}

enum HeldAck {
    Bytes(Vec<u8>),
    SubAck(Box<PendingSubAck>),
    Publish { pid: u16, qos: QoS, reason: ReasonCode },
}

impl Held {
    fn ready(&self, durable: Lsn) -> bool {
        self.remote == 0 && self.extra == 0 && (self.refused || self.lsn <= durable)
    }
}

/// The publish being routed asks the shards it reaches to confirm durability to `reply`.
#[derive(Debug, Clone, Copy)]
pub(super) struct AckCtx {
    pub reply: (ShardId, u64),
    /// Deliver/Retain messages sent with this token so far.
    pub sends: u32,
    /// Where the log's head was when the publish started: whether it appended anything.
    pub start: Lsn,
}

/// Everything a shard gets at boot from the logs of the whole node.
pub struct Boot {
    pub store: Store,
    pub recovered: Recovered,
    /// Every other shard's recovered subscriber counts.
    pub interest: Vec<(ShardId, Vec<InterestDelta>)>,
    /// Every retained message of the node (each shard's log holds the topics it owns).
    pub retained: Arc<Vec<Arc<Msg>>>,
}

impl Store {
    /// Wraps an opened log; `r` is what replaying it gave (ids continue above it).
    pub fn new(log: Log, clock: WallClock, r: &Recovered) -> Store {
        Store {
            log,
            clock,
            next_seq: r.next_seq,
            batch: None,
            failed: false,
            errors: 0,
            held: HashMap::default(),
            held_mesh: VecDeque::new(),
            tokens: HashMap::default(),
            next_token: 1,
            compact_budget: 0,
            compact_at: clock.base,
            pass_scanned: 0,
            pass_kept: 0,
            fresh: 0,
            mostly_live: false,
        }
    }

    /// Replays a log's records into the state they describe.
    pub fn replay(
        recovery: &shardmq_storage::Recovery,
        clock: WallClock,
    ) -> Result<Recovered, (Lsn, RecordType, String)> {
        let mut r = Replay::new(clock);
        for (lsn, t, payload) in recovery.records() {
            r.apply(t, payload).map_err(|e| (lsn, t, e))?;
        }
        Ok(r.finish())
    }

    pub fn errors(&self) -> u64 {
        self.errors
    }

    fn append(&mut self, t: RecordType, payload: &[u8]) -> bool {
        if t != records::MESSAGE {
            self.flush_batch();
        }
        self.append_now(t, payload)
    }

    fn append_now(&mut self, t: RecordType, payload: &[u8]) -> bool {
        match self.log.append(t, payload) {
            Ok(_) => {
                self.fresh += payload.len() as u64 + 9;
                self.compact_budget = (self.compact_budget
                    + COMPACT_PER_APPENDED_BYTE * (payload.len() as u64 + 9))
                    .min(COMPACT_DEBT_CAP);
                true
            }
            Err(e) => {
                self.fail(&e);
                false
            }
        }
    }

    fn fail(&mut self, e: &StorageError) {
        self.failed = true;
        self.errors += 1;
        // One line per burst, not per message: a full disk refuses everything until space is freed.
        if self.errors.is_power_of_two() {
            tracing::error!(error = %e, errors = self.errors, "log write failed; requests that need it are refused");
        }
    }

    /// Adds a delivery to a persistent session to the message's record; returns its `mid`.
    pub(super) fn note_delivery(&mut self, key: SessionKey, d: &Delivery) -> u64 {
        debug_assert!(d.qos != QoS::AtMostOnce && d.pid != 0);
        if !self.batch.as_ref().is_some_and(|b| Arc::ptr_eq(&b.msg, &d.msg)) {
            self.flush_batch();
            let mid = self.seq();
            self.batch = Some(Batch { msg: d.msg.clone(), mid, dests: Enc::default(), n: 0 });
        }
        let b = self.batch.as_mut().expect("set above");
        b.dests.u64(key.0).u16(d.pid).u8(d.qos as u8).u8(d.retain as u8).u32(d.sub_ids.len() as u32);
        for id in d.sub_ids.iter() {
            b.dests.u32(*id);
        }
        b.n += 1;
        b.mid
    }

    /// Writes the pending MESSAGE record, if any.
    pub(super) fn flush_batch(&mut self) {
        let Some(b) = self.batch.take() else { return };
        let mut e = Enc(Vec::with_capacity(64 + b.msg.topic.len() + b.msg.payload.len() + b.dests.0.len()));
        e.u64(b.mid);
        records::put_msg(&mut e, &b.msg, &self.clock);
        e.u32(b.n);
        e.0.extend_from_slice(&b.dests.0);
        self.append_now(records::MESSAGE, &e.0);
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    pub(super) fn done(&mut self, key: SessionKey, mid: u64) -> bool {
        let mut e = Enc::default();
        e.u64(key.0).u64(mid);
        self.append(records::DONE, &e.0)
    }

    pub(super) fn released(&mut self, key: SessionKey, mid: u64) -> bool {
        let mut e = Enc::default();
        e.u64(key.0).u64(mid);
        self.append(records::RELEASED, &e.0)
    }

    fn inbound_qos2(&mut self, key: SessionKey, pid: u16, pending: bool) -> bool {
        let mut e = Enc::default();
        e.u64(key.0).u16(pid);
        self.append(if pending { records::INBOUND_QOS2 } else { records::INBOUND_QOS2_DONE }, &e.0)
    }

    fn retained(&mut self, msg: &Msg) -> bool {
        if msg.payload.is_empty() {
            let mut e = Enc::default();
            e.str(&msg.topic);
            self.append(records::RETAIN_DELETE, &e.0)
        } else {
            let rec = records::retain_record(msg, &self.clock);
            self.append(records::RETAIN, &rec)
        }
    }

    /// Up to where acknowledgements may be sent: the durable bound with `--fsync always`; with the other
    /// policies everything appended (it survives a process crash; see `FsyncPolicy`).
    fn ack_bound(&self) -> Lsn {
        match self.log.fsync_policy() {
            shardmq_storage::FsyncPolicy::Always => self.log.durable_lsn(),
            _ => self.log.written_lsn(),
        }
    }

    /// Something appended is not yet covered by `ack_bound`.
    fn pending(&self) -> bool {
        self.batch.is_some() || self.log.written_lsn() > self.ack_bound()
    }

    /// A sealed segment to walk, budget to walk it, and (after a pass that reclaimed under a quarter of
    /// its segment) a segment's worth of new records since.
    fn compaction_due(&self) -> bool {
        self.log.sealed_count() > 0
            && self.compact_budget > 0
            && (!self.mostly_live || self.fresh >= self.log.segment_bytes())
    }

    fn take_failed(&mut self) -> bool {
        std::mem::take(&mut self.failed)
    }
}

impl Shard {
    /// Installs the log and the state recovered from it (and from the other shards' logs). Call once,
    /// before the first event.
    pub fn restore(&mut self, boot: Boot, now: Instant) {
        let Boot { store, recovered, interest, retained } = boot;
        let clock = store.clock;
        self.next_session = self.next_session.max(recovered.next_sid);
        self.store = Some(Box::new(store));
        for m in retained.iter() {
            self.apply_retained(m.clone());
        }
        for (from, deltas) in interest {
            for d in deltas {
                self.apply_interest(from, d);
            }
        }
        for rs in recovered.sessions {
            self.restore_session(rs, &clock, now);
        }
    }

    fn restore_session(&mut self, rs: RecoveredSession, clock: &WallClock, now: Instant) {
        let st = rs.session;
        let key = SessionKey(st.sid);
        let client_id: Arc<str> = st.client_id.into();
        let mut s = Session::new(client_id.clone());
        s.protocol = st.protocol;
        s.expiry_s = st.expiry_s;
        s.stored_ver = st.ver;
        s.will = st.will;
        // A session that was connected when the broker stopped lost its connection then: its expiry
        // and will delay start now.
        if st.expiry_s != u32::MAX {
            let at = if st.expires_at_unix_ms != 0 {
                clock.instant(st.expires_at_unix_ms)
            } else {
                now + Duration::from_secs(st.expiry_s as u64)
            };
            s.expires_at = Some(at);
            self.arm(at, Timer::Expiry(key));
        }
        if let Some(w) = &s.will {
            let at = if st.will_at_unix_ms != 0 {
                clock.instant(st.will_at_unix_ms)
            } else {
                now + Duration::from_secs(w.delay_s as u64)
            };
            s.will_at = Some(at);
            self.arm(at, Timer::Will(key));
        }
        if let Some((last, _)) = rs.messages.last() {
            s.next_pid = if last.pid == u16::MAX { 1 } else { last.pid + 1 };
        }
        if !rs.messages.is_empty() {
            let queued = rs.messages.iter().filter(|(_, released)| !released).count();
            s.flows_mut().queue.reserve_exact(queued);
        }
        for (d, released) in rs.messages {
            if released {
                s.flows_mut().inflight.push_back(InFlight { d, released: true });
            } else {
                s.flows_mut().queue.push_back(d);
            }
        }
        s.flows_mut().inbound_qos2 = rs.inbound_qos2;
        s.trim();
        let subs = st.subs;
        s.subs = subs.iter().map(|(f, _, _)| f.clone()).collect();
        self.sessions.insert(key, Box::new(s));
        self.by_client.insert(client_id, key);
        for (filter, opts, sub_id) in subs {
            let shared = topic::parse_shared(&filter);
            let inner = shared.as_ref().map_or(&*filter, |sh| sh.filter);
            let group: Option<Arc<str>> = shared.as_ref().map(|sh| sh.group.into());
            self.subs.insert(inner, SubRef { session: key, opts, sub_id, group: group.clone() });
            // Other shards learn these counts from the boot summary, not from announcements.
            let _ = self.count_interest((group, inner.into()), 1, 1);
        }
    }

    /// Writes the session's current record (or its end, once it is no longer persistent). Returns
    /// false if the log refused it.
    pub(super) fn persist_session(&mut self, key: SessionKey) -> bool {
        if !self.sessions.contains_key(&key) {
            return true;
        }
        let Some(st) = self.store.as_deref_mut() else { return true };
        // This call's own failures; a publish being routed around it keeps its verdict.
        let outer_failed = std::mem::take(&mut st.failed);
        let ok = self.persist_session_inner(key);
        if let Some(st) = self.store.as_deref_mut() {
            st.failed |= outer_failed;
        }
        ok
    }

    fn persist_session_inner(&mut self, key: SessionKey) -> bool {
        let Some(st) = self.store.as_deref_mut() else { return true };
        let Some(s) = self.sessions.get_mut(&key) else { return true };
        if s.expiry_s == 0 {
            if s.stored_ver != 0 {
                s.stored_ver = 0;
                let mut e = Enc::default();
                let seq = st.seq();
                e.u64(key.0).u64(seq);
                let ok = st.append(records::SESSION_END, &e.0);
                self.recount_durable(key, -1);
                return ok;
            }
            return true;
        }
        let clock = st.clock;
        let ver = st.seq();
        let mut e = Enc::default();
        e.u64(ver).u64(key.0).str(&s.client_id);
        records::put_protocol(&mut e, s.protocol);
        e.u32(s.expiry_s).u64(s.expires_at.map_or(0, |t| clock.unix_ms(t)));
        match &s.will {
            None => {
                e.u8(0);
            }
            Some(w) => {
                e.u8(1).str(&w.topic).bytes(&w.payload).u8(w.qos as u8).u8(w.retain as u8).u32(w.delay_s);
                match w.expiry_s {
                    Some(x) => e.u8(1).u32(x),
                    None => e.u8(0),
                };
                records::put_props(&mut e, w.props.as_deref());
                e.u64(s.will_at.map_or(0, |t| clock.unix_ms(t)));
            }
        }
        e.u32(s.subs.len() as u32);
        for filter in &s.subs {
            let shared = topic::parse_shared(filter);
            let inner = shared.as_ref().map_or(&**filter, |sh| sh.filter);
            let group = shared.as_ref().map(|sh| sh.group);
            let sub = self
                .subs
                .get(inner)
                .and_then(|l| l.iter().find(|r| r.session == key && r.group.as_deref() == group));
            let (opts, sub_id) = sub.map_or((Default::default(), 0), |r| (r.opts, r.sub_id));
            e.str(filter);
            records::put_sub_options(&mut e, opts);
            e.u32(sub_id);
        }
        if !st.append(records::SESSION, &e.0) {
            return false;
        }
        let newly = s.stored_ver == 0;
        s.stored_ver = ver;
        if newly {
            self.recount_durable(key, 1);
            let Some(st) = self.store.as_deref_mut() else { return true };
            let Some(s) = self.sessions.get_mut(&key) else { return true };
            // It holds messages from while it was not persistent (a takeover by a persistent CONNECT,
            // or stored, ended and stored again): all are stored now, with ids above the session's end.
            if let Some(f) = s.flows_opt_mut() {
                for d in f.inflight.iter_mut().map(|x| &mut x.d).chain(f.queue.iter_mut()) {
                    if d.qos != QoS::AtMostOnce {
                        d.mid = st.note_delivery(key, d);
                        st.flush_batch();
                    }
                }
                for x in f.inflight.iter().filter(|x| x.released) {
                    st.released(key, x.d.mid);
                }
                for pid in f.inbound_qos2.clone() {
                    st.inbound_qos2(key, pid, true);
                }
            }
        }
        self.store.as_deref_mut().is_none_or(|st| !st.take_failed())
    }

    /// A session became persistent (`+1`) or stopped being (`-1`): its subscriptions' persistent counts
    /// change, and other shards learn it (a publish to persistent subscribers waits for their shard).
    fn recount_durable(&mut self, key: SessionKey, change: i32) {
        let Some(s) = self.sessions.get(&key) else { return };
        let mut deltas = Vec::new();
        for filter in s.subs.clone() {
            let shared = topic::parse_shared(&filter);
            let inner = shared.as_ref().map_or(&*filter, |sh| sh.filter);
            let group: Option<Arc<str>> = shared.as_ref().map(|sh| sh.group.into());
            deltas.extend(self.count_interest((group, inner.into()), 0, change));
        }
        if !deltas.is_empty() {
            for to in self.other_shards() {
                self.send_mesh(to, Mesh::Interest { deltas: deltas.clone(), token: None });
            }
        }
    }

    pub(super) fn persist_inbound_qos2(&mut self, key: SessionKey, pid: u16, pending: bool) -> bool {
        let stored = self.sessions.get(&key).is_some_and(|s| s.stored_ver != 0);
        match self.store.as_deref_mut() {
            Some(st) if stored => st.inbound_qos2(key, pid, pending),
            _ => true,
        }
    }

    /// The owner shard of a retained topic stores its new value.
    pub(super) fn persist_retained(&mut self, msg: &Msg) -> bool {
        self.store.as_deref_mut().is_none_or(|st| st.retained(msg))
    }

    /// Starts routing a publish whose acknowledgement must wait for the shards it reaches.
    pub(super) fn begin_ack(&mut self) -> Option<u64> {
        let st = self.store.as_deref_mut()?;
        st.failed = false;
        let token = st.next_token;
        st.next_token += 1;
        debug_assert!(self.ack_ctx.is_none(), "a publish is routed at a time");
        self.ack_ctx = Some(AckCtx { reply: (self.id, token), sends: 0, start: st.log.written_lsn() });
        Some(token)
    }

    /// The acknowledgement token to attach to a Deliver or Retain sent now, counting it.
    pub(super) fn ack_for_send(&mut self) -> Option<(ShardId, u64)> {
        self.ack_ctx.as_mut().map(|c| {
            c.sends += 1;
            c.reply
        })
    }

    /// Sends a PUBACK/PUBREC once the publish it acknowledges is durable everywhere it went.
    pub(super) fn ack_publish(
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
    pub(super) fn send_durable(&mut self, conn: ConnId, bytes: Vec<u8>, now: Instant) {
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
                    c.send_raw(&bytes, &mut self.io);
                }
            }
        }
    }

    /// Whether the session of `conn` is in the log (what it acknowledges must be durable first).
    fn session_stored(&self, conn: ConnId) -> bool {
        let key = self.conns.get(&conn).and_then(|c| c.session());
        key.and_then(|k| self.sessions.get(&k)).is_some_and(|s| s.stored_ver != 0)
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
    pub(super) fn complete_suback(&mut self, p: PendingSubAck, now: Instant) {
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
            HeldAck::Bytes(b) => c.send_raw(&b, &mut self.io),
            HeldAck::SubAck(p) => self.complete_suback_now(*p, now),
            HeldAck::Publish { pid, qos, reason } => {
                let reason = if refused { ReasonCode::QUOTA_EXCEEDED } else { reason };
                let ack = Ack::new(PacketId(pid), reason);
                match qos {
                    QoS::AtLeastOnce => c.send(&Packet::PubAck(ack), &mut self.io),
                    QoS::ExactlyOnce => c.send(&Packet::PubRec(ack), &mut self.io),
                    QoS::AtMostOnce => {}
                }
                if refused && qos == QoS::ExactlyOnce {
                    // An error PUBREC ends the exchange: the packet id is free again.
                    if let Some(key) = c.session() {
                        if let Some(s) = self.sessions.get_mut(&key) {
                            s.flows_mut().inbound_qos2.retain(|p| *p != pid);
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
    pub(super) fn storage_failed(&mut self, conn: ConnId, now: Instant) {
        self.close_conn(conn, Some(ProtocolError::StorageUnavailable), now);
    }

    /// A shard the publish went to stored what it had to (`ok`), having passed it on to `forwarded` more.
    pub(super) fn on_stored(&mut self, token: u64, ok: bool, forwarded: u32, rerouted: bool, now: Instant) {
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
    pub(super) fn answer_stored(&mut self, ack: Option<(ShardId, u64)>, rerouted: bool, now: Instant) {
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
    pub(super) fn begin_remote_ack(&mut self, ack: Option<(ShardId, u64)>) {
        if let (Some(reply), Some(st)) = (ack, self.store.as_deref_mut()) {
            st.failed = false;
            self.ack_ctx = Some(AckCtx { reply, sends: 0, start: st.log.written_lsn() });
        }
    }

    /// Group commit: called by the runtime once per event-loop iteration.
    pub(super) fn commit(&mut self, now: Instant) {
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
        if let Some(st) = self.store.as_deref_mut() {
            let conns = &self.conns;
            st.held.retain(|c, _| conns.contains_key(c));
            let held = &st.held;
            st.tokens.retain(|_, c| held.contains_key(c));
        }
        self.compact(now);
    }

    fn compact(&mut self, now: Instant) {
        let Some(st) = self.store.as_deref_mut() else { return };
        let elapsed = now.saturating_duration_since(st.compact_at);
        st.compact_at = now;
        st.compact_budget = (st.compact_budget + (elapsed.as_secs_f64() * COMPACT_PER_SECOND as f64) as u64)
            .min(COMPACT_DEBT_CAP);
        if !st.compaction_due() {
            return;
        }
        let budget = st.compact_budget.min(COMPACT_STEP_BYTES);
        let clock = st.clock;
        let sessions = &self.sessions;
        let retained = &self.retained;
        let mut kept = 0u64;
        let res = st.log.compact_with(budget as usize, &mut |_, t, payload| {
            let k = live(sessions, retained, &clock, t, payload);
            kept += match &k {
                Keep::Whole => payload.len() as u64,
                Keep::Rewritten(p) => p.len() as u64,
                Keep::Drop => 0,
            };
            k
        });
        match res {
            Ok(p) => {
                st.compact_budget = st.compact_budget.saturating_sub(p.scanned_bytes.max(1));
                st.pass_scanned += p.scanned_bytes;
                st.pass_kept += kept;
                if p.deleted {
                    st.mostly_live = st.pass_kept * 4 >= st.pass_scanned * 3;
                    if st.mostly_live {
                        st.fresh = 0;
                    }
                    st.pass_scanned = 0;
                    st.pass_kept = 0;
                }
            }
            Err(e) => {
                st.compact_budget = 0;
                st.fail(&e);
            }
        }
    }

    /// Whether the runtime should come back without waiting: a flush the policy wants, compaction work.
    pub(super) fn store_deadline(&self) -> Option<Instant> {
        let st = self.store.as_deref()?;
        let compaction = st.compaction_due();
        let flush = st.log.poll_timeout();
        match (compaction, flush) {
            (true, _) => Some(st.compact_at),
            (false, f) => f,
        }
    }

    /// Shutdown: everything appended is flushed whatever the policy.
    pub(super) fn store_shutdown(&mut self) {
        let Some(st) = self.store.as_deref_mut() else { return };
        st.flush_batch();
        if let Err(e) = st.log.flush() {
            tracing::error!(shard = self.id.0, error = %e, "final log flush failed");
        }
    }

    pub fn storage_errors(&self) -> u64 {
        self.store.as_deref().map_or(0, Store::errors)
    }
}

/// Whether a record is still needed (compaction keeps it) given the shard's current state. A message
/// some of whose sessions are done with it is rewritten for the others only: copied whole, it would bring
/// the finished ones back once their "done" records are compacted away.
fn live(
    sessions: &HashMap<SessionKey, Box<Session>>,
    retained: &RetainedTree<Arc<Msg>>,
    clock: &WallClock,
    t: RecordType,
    payload: &[u8],
) -> Keep {
    if t == records::MESSAGE {
        return live_message(sessions, clock, payload);
    }
    if live_record(sessions, retained, clock, t, payload) {
        Keep::Whole
    } else {
        Keep::Drop
    }
}

fn live_message(sessions: &HashMap<SessionKey, Box<Session>>, clock: &WallClock, payload: &[u8]) -> Keep {
    let mut d = records::Dec::new(payload);
    let Ok(mid) = d.u64() else { return Keep::Whole };
    if records::get_msg(&mut d, clock).is_err() {
        return Keep::Whole;
    }
    let head = d.pos();
    let Ok(n) = d.count(16) else { return Keep::Whole };
    let mut kept: Vec<(usize, usize)> = Vec::new();
    for _ in 0..n {
        let start = d.pos();
        let Ok(sid) = d.u64() else { return Keep::Whole };
        let (Ok(_pid), Ok(_q), Ok(_r), Ok(k)) = (d.u16(), d.u8(), d.u8(), d.count(4)) else {
            return Keep::Whole;
        };
        for _ in 0..k {
            if d.u32().is_err() {
                return Keep::Whole;
            }
        }
        if sessions.get(&SessionKey(sid)).is_some_and(|s| s.stored_ver != 0 && s.holds(mid)) {
            kept.push((start, d.pos()));
        }
    }
    match kept.len() {
        0 => Keep::Drop,
        k if k == n => Keep::Whole,
        k => {
            let mut out = Vec::with_capacity(payload.len());
            out.extend_from_slice(&payload[..head]);
            out.extend_from_slice(&(k as u32).to_le_bytes());
            for (a, b) in kept {
                out.extend_from_slice(&payload[a..b]);
            }
            Keep::Rewritten(out)
        }
    }
}

fn live_record(
    sessions: &HashMap<SessionKey, Box<Session>>,
    retained: &RetainedTree<Arc<Msg>>,
    clock: &WallClock,
    t: RecordType,
    payload: &[u8],
) -> bool {
    let mut d = records::Dec::new(payload);
    let stored = |sid: u64| sessions.get(&SessionKey(sid)).filter(|s| s.stored_ver != 0);
    match t {
        records::SESSION => {
            let (Ok(ver), Ok(sid)) = (d.u64(), d.u64()) else { return true };
            stored(sid).is_some_and(|s| s.stored_ver == ver)
        }
        records::RELEASED => {
            let (Ok(sid), Ok(mid)) = (d.u64(), d.u64()) else { return true };
            stored(sid).is_some_and(|s| s.flows().inflight.iter().any(|f| f.d.mid == mid && f.released))
        }
        records::INBOUND_QOS2 => {
            let (Ok(sid), Ok(pid)) = (d.u64(), d.u16()) else { return true };
            stored(sid).is_some_and(|s| s.flows().inbound_qos2.contains(&pid))
        }
        records::RETAIN => {
            let Ok(topic) = d.str() else { return true };
            retained.get(topic).is_some_and(|m| records::same_retained(payload, m, clock))
        }
        // Tombstones: everything they cancel is older, so it went with an earlier segment or this one.
        records::SESSION_END | records::DONE | records::INBOUND_QOS2_DONE | records::RETAIN_DELETE => false,
        // Never written by this build; keep rather than lose what a newer one meant.
        _ => true,
    }
}
