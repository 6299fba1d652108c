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
//! into the mapped segment); [`Core::handle_commit`](crate::io::Core::handle_commit), called by the
//! runtime once per event-loop iteration, commits them as one group and releases what was held. A
//! publish that reached other shards carries a token; each of them answers [`Mesh::Stored`] once its own
//! records are durable, and the PUBACK waits for every answer. Acknowledgements of one connection leave in
//! the order their requests arrived.
//!
//! With no log (`--in-memory`) none of this runs and nothing is held.

mod acks;
mod compact;
mod datadir;
mod records;
mod replay;
mod transfer;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::HashMap;
use shardmq_storage::{Log, Lsn, RecordType, StorageError};
use shardmq_wire::QoS;

pub(super) use self::acks::AckCtx;
use self::acks::Held;
pub use self::datadir::{inspect_node, open_node, read_meta, BootError, Meta, ShardReport, StorageConfig};
use self::records::Enc;
pub use self::records::{type_name, WallClock};
pub use self::replay::{Recovered, RecoveredSession, Replay, StoredSession};
pub use self::transfer::{Exported, SessionTransfer, TransferError, FORWARDING_TIMEOUT};
use super::msg::{Delivery, Msg};
use super::route::{split_shared, InterestDelta, SubRef};
use super::session::{InFlight, Session};
use super::{Mesh, SessionKey, Shard, Timer};
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
    pub(super) clock: WallClock,
    /// Session versions, `mid`s and session ends, in one sequence (see `replay`).
    next_seq: u64,
    /// The MESSAGE record being assembled: every persistent session of this shard a message goes to is
    /// added before the record is written, so a message is stored once per shard however many sessions
    /// take it.
    batch: Option<Batch>,
    /// The batch's destination entries and the record being encoded: reused, so storing a message or a
    /// "done" mark allocates nothing.
    dests: Vec<u8>,
    rec: Vec<u8>,
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
    /// SUB records written per stored session since its latest SESSION record; past
    /// [`sub_deltas_max`] the whole record is written again (and they are dead for compaction).
    sub_deltas: HashMap<SessionKey, u32>,
}

/// How many SUB records a session's SESSION record may have on top before it is rewritten: as many as it
/// has subscriptions (so rewriting stays amortised O(1) per change), at least 32.
fn sub_deltas_max(subscriptions: usize) -> u32 {
    subscriptions.max(32).min(u32::MAX as usize) as u32
}

struct Batch {
    msg: Arc<Msg>,
    mid: u64,
    /// Destination entries in `Store::dests`.
    n: u32,
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
            dests: Vec::new(),
            rec: Vec::new(),
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
            sub_deltas: r
                .sessions
                .iter()
                .filter(|s| s.sub_deltas > 0)
                .map(|s| (SessionKey(s.session.sid), s.sub_deltas))
                .collect(),
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

    pub fn log_stats(&self) -> shardmq_storage::LogStats {
        self.log.stats()
    }

    /// Appends an encoded record after the pending MESSAGE record (session records: rare, built by the
    /// caller).
    fn append(&mut self, t: RecordType, payload: &[u8]) -> bool {
        self.flush_batch();
        self.append_now(t, payload)
    }

    /// Encodes a record with `f` in the reused buffer and appends it (after the pending MESSAGE record,
    /// so records stay in the order things happened).
    fn write(&mut self, t: RecordType, f: impl FnOnce(&mut Enc)) -> bool {
        self.flush_batch();
        self.write_now(t, f)
    }

    fn write_now(&mut self, t: RecordType, f: impl FnOnce(&mut Enc)) -> bool {
        let mut e = Enc(std::mem::take(&mut self.rec));
        e.0.clear();
        f(&mut e);
        let ok = self.append_now(t, &e.0);
        self.rec = e.0;
        ok
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

    /// Adds a delivery to a persistent session to the message's record; returns its `mid`. `held_mid` is
    /// the `mid` of the session's newest queued or in-flight message: a second copy of one message for
    /// one session (overlapping subscriptions) gets a record and `mid` of its own, since a DONE record
    /// names a (session, `mid`) pair and must end exactly one copy.
    pub(super) fn note_delivery(&mut self, key: SessionKey, d: &Delivery, held_mid: Option<u64>) -> u64 {
        debug_assert!(d.qos != QoS::AtMostOnce && d.pid != 0);
        let same_msg = self.batch.as_ref().is_some_and(|b| Arc::ptr_eq(&b.msg, &d.msg));
        if !same_msg || self.batch.as_ref().map(|b| b.mid) == held_mid {
            self.flush_batch();
            let mid = self.seq();
            self.batch = Some(Batch { msg: d.msg.clone(), mid, n: 0 });
        }
        let b = self.batch.as_mut().expect("set above");
        let mut e = Enc(std::mem::take(&mut self.dests));
        e.u64(key.0).u16(d.pid).u8(d.qos as u8).u8(d.retain as u8).u32(d.sub_ids.len() as u32);
        for id in d.sub_ids.iter() {
            e.u32(*id);
        }
        self.dests = e.0;
        b.n += 1;
        b.mid
    }

    /// Writes the pending MESSAGE record, if any.
    pub(super) fn flush_batch(&mut self) {
        let Some(b) = self.batch.take() else { return };
        let dests = std::mem::take(&mut self.dests);
        let clock = self.clock;
        self.write_now(records::MESSAGE, |e| {
            e.u64(b.mid);
            records::put_msg(e, &b.msg, &clock);
            e.u32(b.n);
            e.0.extend_from_slice(&dests);
        });
        self.dests = dests;
        self.dests.clear();
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    pub(super) fn done(&mut self, key: SessionKey, mid: u64) -> bool {
        self.write(records::DONE, |e| {
            e.u64(key.0).u64(mid);
        })
    }

    pub(super) fn released(&mut self, key: SessionKey, mid: u64) -> bool {
        self.write(records::RELEASED, |e| {
            e.u64(key.0).u64(mid);
        })
    }

    fn inbound_qos2(&mut self, key: SessionKey, pid: u16, pending: bool) -> bool {
        let t = if pending { records::INBOUND_QOS2 } else { records::INBOUND_QOS2_DONE };
        self.write(t, |e| {
            e.u64(key.0).u16(pid);
        })
    }

    fn retained(&mut self, msg: &Msg) -> bool {
        if msg.payload.is_empty() {
            self.write(records::RETAIN_DELETE, |e| {
                e.str(&msg.topic);
            })
        } else {
            let clock = self.clock;
            self.write(records::RETAIN, |e| records::put_msg(e, msg, &clock))
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

/// Where a session being installed comes from (see [`Shard::install_session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arrival {
    Boot,
    Moved,
}

impl Shard {
    /// Installs the log and the state recovered from it (and from the other shards' logs). Call once,
    /// before the first event.
    pub fn restore(&mut self, boot: Boot, now: Instant) {
        let Boot { store, recovered, interest, retained } = boot;
        let clock = store.clock;
        self.sessions.next_key = self.sessions.next_key.max(recovered.next_sid);
        self.store = Some(Box::new(store));
        // A message that expired while the node was down (or was evicted before it stopped) stays gone.
        for m in retained.iter().filter(|m| !m.is_expired(now)) {
            self.apply_retained(m.clone());
        }
        for (from, deltas) in interest {
            for d in deltas {
                self.apply_interest(from, d);
            }
        }
        for rs in recovered.sessions {
            self.install_session(rs, &clock, now, Arrival::Boot);
        }
    }

    /// Installs a session rebuilt from records. At boot its interest reaches the other shards through the
    /// boot summary; a session moved here from another node announces its interest, and counts as
    /// durable only once it is stored here (`persist_session` does both then). Returns the announcement
    /// tokens whose acknowledgement means every other endpoint routes its subscriptions here (a moved
    /// session's, see `persist::transfer`).
    pub(super) fn install_session(
        &mut self,
        rs: RecoveredSession,
        clock: &WallClock,
        now: Instant,
        arrival: Arrival,
    ) -> Vec<u64> {
        let st = rs.session;
        let key = SessionKey(st.sid);
        let client_id: Arc<str> = st.client_id.into();
        let mut s = Session::new(client_id.clone());
        s.protocol = st.protocol;
        // The cap applies to sessions stored before it was set (or lowered), 3.1.1 ones without expiry
        // included: otherwise they would live until their client came back.
        let cap = self.cfg.max_session_expiry_s;
        s.expiry_s = st.expiry_s.min(cap);
        s.stored_ver = st.ver;
        s.will = st.will;
        if arrival == Arrival::Boot && self.gateway().is_some() {
            if let Some(r) = st.registration {
                self.sessions.registrations.current.insert(key, r);
            }
            // A client connected when the node stopped lost its connection with the node: the zone's
            // registry saw the node go, and the id's owners publish that will (once). Publishing it here
            // too would make it twice.
            if s.will.take().is_some() {
                self.counters.restored_wills_left_to_zone += 1;
            }
        }
        // The rights its client had, rebuilt under today's ACL; without a record of them (an older
        // record) it gets nothing until its client authenticates again.
        if let (Some(user), Some(auth)) = (&st.user, self.sessions.auth.as_deref()) {
            if let Some(acl) = auth.client_acl(&client_id, user.as_deref()) {
                self.sessions.acls.insert(key, acl);
            }
        }
        // A session that was connected when the broker stopped lost its connection then: its expiry
        // and will delay start now. A stored deadline (0: none) is kept.
        let due = |unix_ms: u64, after_s: u32| match unix_ms {
            0 => now + Duration::from_secs(after_s as u64),
            at => clock.instant(at),
        };
        if s.expiry_s != u32::MAX {
            let capped = now + Duration::from_secs(cap as u64);
            let at = due(st.expires_at_unix_ms, s.expiry_s).min(capped);
            s.expires_at = Some(at);
            self.arm(at, Timer::Expiry(key));
        }
        if let Some(w) = &mut s.will {
            let at = due(st.will_at_unix_ms, w.delay_s);
            w.at = Some(at);
            self.arm(at, Timer::Will(key));
        }
        if let Some((last, _)) = rs.messages.last() {
            s.next_pid = if last.pid == u16::MAX { 1 } else { last.pid + 1 };
        }
        if !rs.messages.is_empty() {
            let queued = rs.messages.iter().filter(|(_, released)| !released).count();
            s.qos_mut().queue.reserve_exact(queued);
        }
        for (d, released) in rs.messages {
            if released {
                s.qos_mut().inflight.push_back(InFlight { d, released: true });
            } else {
                s.qos_mut().push_queued(d);
            }
        }
        let mut inbound = rs.inbound_qos2;
        inbound.sort_unstable();
        inbound.dedup();
        s.qos_mut().inbound_qos2 = inbound;
        s.trim();
        let subs = st.subs;
        s.subs = subs.iter().map(|(f, _, _)| f.clone()).collect();
        self.sessions.map.insert(key, Box::new(s));
        self.sessions.by_client.insert(key, &self.sessions.map);
        let mut deltas = Vec::new();
        let mut waits = Vec::new();
        for (filter, opts, sub_id) in subs {
            let (group, inner) = split_shared(&filter);
            let group: Option<Arc<str>> = group.map(Into::into);
            if arrival == Arrival::Moved {
                // Announced by another subscriber and not yet acknowledged: routed here only once it is.
                waits.extend(self.routing.pending_subacks.pending(&(group.clone(), Arc::from(inner))));
            }
            self.routing.subs.insert(inner, SubRef { session: key, opts, sub_id, group: group.clone() });
            match arrival {
                // Other shards learn these counts from the boot summary, not from announcements.
                Arrival::Boot => {
                    let _ = self.count_interest((group, inner.into()), 1, 1);
                }
                Arrival::Moved => deltas.extend(self.count_interest((group, inner.into()), 1, 0)),
            }
        }
        waits.extend(self.announce_awaited(deltas));
        waits
    }

    /// Records changed subscriptions of a session: one SUB record per filter on top of its stored record
    /// when it is stored (the whole record when it is not yet, or when too many SUB records have piled
    /// up). `filters` are full filters; each is added (with its current options) if the session has it,
    /// removed otherwise. Returns false if the log refused a record.
    pub(super) fn persist_subscriptions(&mut self, key: SessionKey, filters: &[&str]) -> bool {
        let Some(st) = self.store.as_deref_mut() else { return true };
        let Some(s) = self.sessions.map.get(&key) else { return true };
        let base = s.stored_ver;
        let n = st.sub_deltas.get(&key).copied().unwrap_or(0);
        if base == 0 || s.expiry_s == 0 || n as usize + filters.len() > sub_deltas_max(s.subs.len()) as usize
        {
            return self.persist_session(key);
        }
        let outer_failed = std::mem::take(&mut st.failed);
        let mut ok = true;
        for filter in filters {
            let (group, inner) = split_shared(filter);
            let sub = s.subs.contains(filter).then(|| {
                self.routing
                    .subs
                    .get(inner)
                    .and_then(|l| l.iter().find(|r| r.session == key && r.group.as_deref() == group))
                    .map_or((Default::default(), 0), |r| (r.opts, r.sub_id))
            });
            let seq = st.seq();
            let mut e = Enc::default();
            e.u64(key.0).u64(base).u64(seq).str(filter);
            match sub {
                Some((opts, sub_id)) => {
                    e.u8(1);
                    records::put_sub_options(&mut e, opts);
                    e.u32(sub_id);
                }
                None => {
                    e.u8(0);
                }
            }
            ok &= st.append(records::SUB, &e.0);
        }
        *st.sub_deltas.entry(key).or_default() += filters.len() as u32;
        st.failed |= outer_failed;
        ok
    }

    /// Writes the session's current record (or its end, once it is no longer persistent). Returns
    /// false if the log refused it.
    pub(super) fn persist_session(&mut self, key: SessionKey) -> bool {
        if !self.sessions.map.contains_key(&key) {
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

    /// The SESSION record of a session, as version `ver`: client id, protocol, expiry, will,
    /// subscriptions with their options, and the user name its rights come from.
    pub(super) fn session_record(&self, key: SessionKey, ver: u64, clock: &WallClock) -> Option<Vec<u8>> {
        let s = self.sessions.map.get(&key)?;
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
                e.u64(w.at.map_or(0, |t| clock.unix_ms(t)));
            }
        }
        e.u32(s.subs.len() as u32);
        for filter in s.subs.iter() {
            let (group, inner) = split_shared(filter);
            let sub = self
                .routing
                .subs
                .get(inner)
                .and_then(|l| l.iter().find(|r| r.session == key && r.group.as_deref() == group));
            let (opts, sub_id) = sub.map_or((Default::default(), 0), |r| (r.opts, r.sub_id));
            e.str(filter);
            records::put_sub_options(&mut e, opts);
            e.u32(sub_id);
        }
        // The rights' user name (see `StoredSession::user`): 0 none recorded, 1 anonymous, 2 a name.
        match self.sessions.acls.get(&key).map(|a| a.username()) {
            None => e.u8(0),
            Some(None) => e.u8(1),
            Some(Some(u)) => e.u8(2).str(u),
        };
        // The zone registration of its last connection (see `StoredSession::registration`).
        match self.sessions.registrations.current.get(&key) {
            None => e.u8(0),
            Some(r) => e.u8(1).u64(r.epoch).u64(r.stamp),
        };
        Some(e.0)
    }

    fn persist_session_inner(&mut self, key: SessionKey) -> bool {
        let Some(st) = self.store.as_deref_mut() else { return true };
        let Some(s) = self.sessions.map.get_mut(&key) else { return true };
        st.sub_deltas.remove(&key);
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
        let Some(payload) = self.session_record(key, ver, &clock) else { return true };
        let Some(st) = self.store.as_deref_mut() else { return true };
        let Some(s) = self.sessions.map.get_mut(&key) else { return true };
        if !st.append(records::SESSION, &payload) {
            return false;
        }
        let newly = s.stored_ver == 0;
        s.stored_ver = ver;
        if newly {
            self.recount_durable(key, 1);
            let Some(st) = self.store.as_deref_mut() else { return true };
            let Some(s) = self.sessions.map.get_mut(&key) else { return true };
            // It holds messages from while it was not persistent (a takeover by a persistent CONNECT,
            // or stored, ended and stored again): all are stored now, with ids above the session's end.
            if let Some(f) = s.qos_opt_mut() {
                for d in f.inflight.iter_mut().map(|x| &mut x.d).chain(f.queue.iter_mut()) {
                    if d.qos != QoS::AtMostOnce {
                        // Flushed after each: every entry has its own record, whatever it shares.
                        d.mid = st.note_delivery(key, d, None);
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
        let Some(s) = self.sessions.map.get(&key) else { return };
        let mut deltas = Vec::new();
        for filter in s.subs.clone() {
            let (group, inner) = split_shared(&filter);
            let group: Option<Arc<str>> = group.map(Into::into);
            deltas.extend(self.count_interest((group, inner.into()), 0, change));
        }
        if !deltas.is_empty() {
            self.announce(deltas, None);
        }
    }

    pub(super) fn persist_inbound_qos2(&mut self, key: SessionKey, pid: u16, pending: bool) -> bool {
        let stored = self.sessions.map.get(&key).is_some_and(|s| s.stored_ver != 0);
        match self.store.as_deref_mut() {
            Some(st) if stored => st.inbound_qos2(key, pid, pending),
            _ => true,
        }
    }

    /// The owner shard of a retained topic stores its new value.
    pub(super) fn persist_retained(&mut self, msg: &Msg) -> bool {
        self.store.as_deref_mut().is_none_or(|st| st.retained(msg))
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

    /// How far the shard's log has been written: (segment, offset). For tests.
    #[cfg(test)]
    pub(crate) fn log_written(&self) -> Option<(u64, u64)> {
        self.store.as_deref().map(|st| {
            let l = st.log.written_lsn();
            (l.segment, l.offset)
        })
    }

    /// Moves the log's flushes and segment creation off the loop (see `shardmq_storage::Log::
    /// start_background_flush`): `waker` brings the loop round to `handle_commit` when a flush lands.
    pub(super) fn start_background_flush(&mut self, wake: crate::io::WakeFn) {
        let Some(st) = self.store.as_deref_mut() else { return };
        if let Err(e) = st.log.start_background_flush(wake) {
            // Still correct, only slower: flushes stay on the loop.
            tracing::warn!(shard = self.id.0, error = %e, "no flusher thread; flushing on the shard's loop");
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

    /// The log's bytes and flush latencies; all zero in memory.
    pub fn log_stats(&self) -> shardmq_storage::LogStats {
        self.store.as_deref().map(Store::log_stats).unwrap_or_default()
    }
}
