//! Rebuilding a shard's durable state from its log, record by record in log order.
//!
//! Replay is idempotent and tolerates the duplicates compaction can leave behind (a record relocated to
//! the head of the log while its old copy survived a crash): sessions keep their highest version, a
//! message queued for a session is keyed by `(session, mid)` and `mid`s are never reused, and "done" and
//! "released" marks apply whichever side of the message record they are found on. Session versions,
//! `mid`s and session ends share one sequence, so an end cancels exactly what was stored before it (a
//! session can be stored again later under the same id, e.g. a takeover by a persistent CONNECT). Only inbound QoS 2
//! packet ids (which clients reuse) depend on order, and compaction keeps a copy of one only while it is
//! still pending, at the head of the log, after every record that could cancel it.

use ahash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::Arc;

use shardmq_storage::RecordType;
use shardmq_wire::{Protocol, QoS, SubOptions};

use super::records::{self, Dec, DecResult, WallClock};
use crate::core::msg::{Delivery, Msg};
use crate::core::session::WillState;
use crate::core::ZoneRegistration;

/// A persistent session as its latest record describes it.
#[derive(Debug)]
pub struct StoredSession {
    pub ver: u64,
    pub sid: u64,
    pub client_id: Box<str>,
    pub protocol: Protocol,
    pub expiry_s: u32,
    /// Unix ms when a disconnected session expires; 0 when it was connected (or never expires).
    pub expires_at_unix_ms: u64,
    pub(in crate::core) will: Option<Box<WillState>>,
    /// Unix ms when a delayed will is due; 0 when none is pending.
    pub will_at_unix_ms: u64,
    /// Full filters (with any `$share/group/` prefix), options, subscription identifier (0: none).
    pub subs: Vec<(Box<str>, SubOptions, u32)>,
    /// Under an ACL, the user name its client authenticated with (`Some(None)`: anonymous), so that the
    /// session gets the same rights when restored; `None` when not recorded (no ACL, older records).
    pub user: Option<Option<Box<str>>>,
    /// On a clustered node, the zone registration of the session's last connection (added after the
    /// first format: `None` in older records, and for sessions never registered).
    pub registration: Option<ZoneRegistration>,
}

/// What a session had: its record, its messages (in `mid` order, with whether a QoS 2 one was already
/// released) and the inbound QoS 2 packet ids awaiting PUBREL.
#[derive(Debug)]
pub struct RecoveredSession {
    pub session: StoredSession,
    pub messages: Vec<(Delivery, bool)>,
    pub inbound_qos2: Vec<u16>,
    /// SUB records applied on top of its SESSION record (they stay live until it is rewritten).
    pub sub_deltas: u32,
}

/// The durable state of one shard.
#[derive(Debug, Default)]
pub struct Recovered {
    pub sessions: Vec<RecoveredSession>,
    /// Retained messages this shard owns.
    pub retained: Vec<Arc<Msg>>,
    /// Above every id found in the log.
    pub next_sid: u64,
    /// Above every session version, `mid` and session end found in the log.
    pub next_seq: u64,
}

impl Recovered {
    pub fn queued_messages(&self) -> usize {
        self.sessions.iter().map(|s| s.messages.len()).sum()
    }
}

struct Entry {
    pid: u16,
    qos: QoS,
    retain: bool,
    sub_ids: Box<[u32]>,
}

pub struct Replay {
    clock: WallClock,
    sessions: HashMap<u64, StoredSession>,
    /// Session id → sequence of its latest end: what was stored for it before that is gone.
    ended: HashMap<u64, u64>,
    msgs: HashMap<u64, Arc<Msg>>,
    /// A hash table rather than a tree: one allocation, freed in one piece after the replay, so it leaves
    /// no holes between the messages that stay (a tree's nodes did: ~80 B per message after recovery).
    entries: HashMap<(u64, u64), Entry>,
    /// Done marks seen before their message (possible after compaction moved the message).
    done_early: HashSet<(u64, u64)>,
    released: HashSet<(u64, u64)>,
    inbound: HashMap<u64, Vec<u16>>,
    retained: HashMap<Box<str>, Option<Arc<Msg>>>,
    /// SUB records by session: (sequence, base version, filter, options and identifier; `None`: removed).
    sub_changes: HashMap<u64, Vec<SubChange>>,
    max_sid: u64,
    max_seq: u64,
}

type SubChange = (u64, u64, Box<str>, Option<(SubOptions, u32)>);

impl Replay {
    pub fn new(clock: WallClock) -> Replay {
        Replay {
            clock,
            sessions: HashMap::new(),
            ended: HashMap::new(),
            msgs: HashMap::new(),
            entries: HashMap::new(),
            done_early: HashSet::new(),
            released: HashSet::new(),
            inbound: HashMap::new(),
            retained: HashMap::new(),
            sub_changes: HashMap::new(),
            max_sid: 0,
            max_seq: 0,
        }
    }

    /// Applies one record. An error means a record that passed its checksum but does not decode: a bug or
    /// a log from an incompatible build, which the caller must not start on.
    pub fn apply(&mut self, t: RecordType, payload: &[u8]) -> DecResult<()> {
        let mut d = Dec::new(payload);
        match t {
            records::SESSION => {
                let s = decode_session(&mut d)?;
                self.max_sid = self.max_sid.max(s.sid);
                self.max_seq = self.max_seq.max(s.ver);
                let after_end = self.ended.get(&s.sid).is_none_or(|&end| s.ver > end);
                if after_end && self.sessions.get(&s.sid).is_none_or(|old| old.ver < s.ver) {
                    self.sessions.insert(s.sid, s);
                }
            }
            records::SUB => {
                let (sid, base, seq) = (id(&mut d)?, id(&mut d)?, id(&mut d)?);
                let filter: Box<str> = d.str()?.into();
                let change = match d.u8()? {
                    0 => None,
                    1 => Some((records::get_sub_options(&mut d)?, d.u32()?)),
                    op => return Err(format!("subscription change {op}")),
                };
                self.max_sid = self.max_sid.max(sid);
                self.max_seq = self.max_seq.max(seq);
                self.sub_changes.entry(sid).or_default().push((seq, base, filter, change));
            }
            records::SESSION_END => {
                let (sid, seq) = (id(&mut d)?, id(&mut d)?);
                self.max_sid = self.max_sid.max(sid);
                self.max_seq = self.max_seq.max(seq);
                if self.sessions.get(&sid).is_some_and(|s| s.ver < seq) {
                    self.sessions.remove(&sid);
                    self.inbound.remove(&sid);
                }
                let end = self.ended.entry(sid).or_default();
                *end = (*end).max(seq);
            }
            records::MESSAGE => {
                let mid = id(&mut d)?;
                self.max_seq = self.max_seq.max(mid);
                let msg = Arc::new(records::get_msg(&mut d, &self.clock)?);
                let n = d.count(16)?;
                let mut used = false;
                for _ in 0..n {
                    let sid = id(&mut d)?;
                    let pid = d.u16()?;
                    let qos = d.qos()?;
                    let retain = d.bool()?;
                    let k = d.count(4)?;
                    let mut sub_ids = Vec::with_capacity(k);
                    for _ in 0..k {
                        sub_ids.push(d.u32()?);
                    }
                    if pid == 0 || qos == QoS::AtMostOnce {
                        return Err(format!("message {mid}: QoS {qos:?} with packet id {pid}"));
                    }
                    if self.done_early.remove(&(sid, mid)) || self.ended.get(&sid).is_some_and(|&e| mid < e) {
                        continue;
                    }
                    used = true;
                    let e = Entry { pid, qos, retain, sub_ids: sub_ids.into_boxed_slice() };
                    self.entries.insert((sid, mid), e);
                }
                if used {
                    self.msgs.insert(mid, msg);
                }
            }
            records::DONE => {
                let (sid, mid) = (id(&mut d)?, id(&mut d)?);
                self.max_seq = self.max_seq.max(mid);
                if self.entries.remove(&(sid, mid)).is_none() {
                    self.done_early.insert((sid, mid));
                }
                self.released.remove(&(sid, mid));
            }
            records::RELEASED => {
                let (sid, mid) = (id(&mut d)?, id(&mut d)?);
                self.max_seq = self.max_seq.max(mid);
                self.released.insert((sid, mid));
            }
            records::INBOUND_QOS2 | records::INBOUND_QOS2_DONE => {
                let (sid, pid) = (id(&mut d)?, d.u16()?);
                let set = self.inbound.entry(sid).or_default();
                set.retain(|p| *p != pid);
                if t == records::INBOUND_QOS2 {
                    set.push(pid);
                }
            }
            records::RETAIN => {
                let mut m = records::get_msg(&mut d, &self.clock)?;
                m.retain = true;
                self.retained.insert(m.topic.clone(), Some(Arc::new(m)));
            }
            records::RETAIN_DELETE => {
                let topic: Box<str> = d.str()?.into();
                self.retained.insert(topic, None);
            }
            other => return Err(format!("unknown record type {other}")),
        }
        d.end()
    }

    pub fn finish(mut self) -> Recovered {
        let mut out =
            Recovered { next_sid: self.max_sid + 1, next_seq: self.max_seq + 1, ..Recovered::default() };
        let mut sids: Vec<u64> = self.sessions.keys().copied().collect();
        sids.sort_unstable();
        let mut keys: Vec<(u64, u64)> = self.entries.keys().copied().collect();
        keys.sort_unstable();
        for sid in sids {
            let mut session = self.sessions.remove(&sid).expect("listed above");
            // Changes on top of the session's latest record, in the order they were made; those on top
            // of an older record are in this one already.
            let mut changes = self.sub_changes.remove(&sid).unwrap_or_default();
            changes.retain(|(seq, base, _, _)| *base == session.ver && *seq > session.ver);
            changes.sort_unstable_by_key(|c| c.0);
            let sub_deltas = changes.len() as u32;
            for (_, _, filter, change) in changes {
                session.subs.retain(|(f, _, _)| *f != filter);
                if let Some((opts, sub_id)) = change {
                    session.subs.push((filter, opts, sub_id));
                }
            }
            let end = self.ended.get(&sid).copied().unwrap_or(0);
            let from = keys.partition_point(|k| *k < (sid, end));
            let to = keys.partition_point(|k| k.0 <= sid);
            let mut messages = Vec::with_capacity(to.saturating_sub(from));
            for &(_, mid) in &keys[from..to.max(from)] {
                let e = &self.entries[&(sid, mid)];
                let Some(msg) = self.msgs.get(&mid) else { continue };
                let mut d = Delivery::new(msg.clone(), e.qos, e.retain, e.sub_ids.clone());
                d.mid = mid;
                d.pid = e.pid;
                // Whether it went out before the restart is not recorded: say it may have.
                d.dup = true;
                let released = e.qos == QoS::ExactlyOnce && self.released.contains(&(sid, mid));
                messages.push((d, released));
            }
            let inbound_qos2 = self.inbound.remove(&sid).unwrap_or_default();
            out.sessions.push(RecoveredSession { session, messages, inbound_qos2, sub_deltas });
        }
        out.retained = self.retained.into_values().flatten().collect();
        out
    }
}

/// Session ids, versions and message ids count up from 1 and never get near 2^62 (a shard writing a
/// million records a second would take 146,000 years): a larger one is damage, and refusing it keeps the
/// `+ 1` of the next id from overflowing.
const MAX_ID: u64 = 1 << 62;

fn id(d: &mut Dec<'_>) -> DecResult<u64> {
    let v = d.u64()?;
    if v >= MAX_ID {
        return Err(format!("implausible id {v}"));
    }
    Ok(v)
}

fn decode_session(d: &mut Dec<'_>) -> DecResult<StoredSession> {
    let ver = id(d)?;
    let sid = id(d)?;
    let client_id = d.str()?.into();
    let protocol = records::get_protocol(d)?;
    let expiry_s = d.u32()?;
    let expires_at_unix_ms = d.u64()?;
    let (will, will_at_unix_ms) = match d.u8()? {
        0 => (None, 0),
        _ => {
            let topic = d.str()?.into();
            let payload = d.bytes()?.into();
            let qos = d.qos()?;
            let retain = d.bool()?;
            let delay_s = d.u32()?;
            let expiry_s = match d.u8()? {
                0 => None,
                _ => Some(d.u32()?),
            };
            let props = records::get_props(d)?;
            let at = d.u64()?;
            (
                Some(Box::new(WillState { topic, payload, qos, retain, delay_s, expiry_s, props, at: None })),
                at,
            )
        }
    };
    let n = d.count(9)?;
    let mut subs = Vec::with_capacity(n);
    for _ in 0..n {
        let filter = d.str()?.into();
        let opts = records::get_sub_options(d)?;
        let sub_id = d.u32()?;
        subs.push((filter, opts, sub_id));
    }
    // Added after the first format: a record may end before it.
    let user = if d.remaining() == 0 {
        None
    } else {
        match d.u8()? {
            0 => None,
            1 => Some(None),
            2 => Some(Some(d.str()?.into())),
            x => return Err(format!("session user flag {x}")),
        }
    };
    // Added after `user`: a record may end before it.
    let registration = if d.remaining() == 0 {
        None
    } else {
        match d.u8()? {
            0 => None,
            1 => {
                let epoch = d.u64()?;
                let stamp = d.u64()?;
                if epoch == 0 {
                    return Err("session registration with epoch 0".into());
                }
                Some(ZoneRegistration { epoch, stamp })
            }
            x => return Err(format!("session registration flag {x}")),
        }
    };
    Ok(StoredSession {
        ver,
        sid,
        client_id,
        protocol,
        expiry_s,
        expires_at_unix_ms,
        will,
        will_at_unix_ms,
        subs,
        user,
        registration,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;
    use crate::core::persist::records::{retain_record, Enc};

    fn clock() -> WallClock {
        WallClock { base: Instant::now(), base_unix_ms: 1_800_000_000_000 }
    }

    /// A valid record of each type, to mutate.
    fn samples() -> Vec<(RecordType, Vec<u8>)> {
        let msg = Msg {
            topic: "a/b".into(),
            payload: b"payload".to_vec().into(),
            qos: QoS::ExactlyOnce,
            retain: false,
            expires_at: None,
            props: None,
            origin: None,
        };
        let mut m = Enc::default();
        m.u64(7);
        records::put_msg(&mut m, &msg, &clock());
        m.u32(1).u64(3).u16(9).u8(2).u8(0).u32(1).u32(42);
        let mut s = Enc::default();
        s.u64(5).u64(3).str("client");
        records::put_protocol(&mut s, Protocol::V5);
        s.u32(60).u64(0).u8(0).u32(1).str("a/#");
        records::put_sub_options(&mut s, SubOptions::default());
        s.u32(0);
        let pair = |a: u64, b: u64| {
            let mut e = Enc::default();
            e.u64(a).u64(b);
            e.0
        };
        let mut q2 = Enc::default();
        q2.u64(3).u16(9);
        let mut del = Enc::default();
        del.str("a/b");
        let mut sub = Enc::default();
        sub.u64(3).u64(5).u64(6).str("a/+").u8(1);
        records::put_sub_options(&mut sub, SubOptions::default());
        sub.u32(4);
        vec![
            (records::SESSION, s.0),
            (records::SUB, sub.0),
            (records::SESSION_END, pair(3, 8)),
            (records::MESSAGE, m.0),
            (records::DONE, pair(3, 7)),
            (records::RELEASED, pair(3, 7)),
            (records::INBOUND_QOS2, q2.0.clone()),
            (records::INBOUND_QOS2_DONE, q2.0),
            (records::RETAIN, retain_record(&msg, &clock())),
            (records::RETAIN_DELETE, del.0),
        ]
    }

    #[test]
    fn the_samples_replay_cleanly() {
        let mut r = Replay::new(clock());
        for (t, p) in samples() {
            r.apply(t, &p).unwrap_or_else(|e| panic!("type {t}: {e}"));
        }
        let out = r.finish();
        assert_eq!(out.next_seq, 9);
    }

    #[test]
    fn implausible_ids_are_refused_not_overflowed() {
        let mut e = Enc::default();
        e.u64(u64::MAX).u64(u64::MAX);
        let mut r = Replay::new(clock());
        for t in [records::SESSION_END, records::DONE, records::RELEASED] {
            let err = r.apply(t, &e.0).unwrap_err();
            assert!(err.contains("implausible"), "{err}");
        }
        let out = r.finish();
        assert_eq!((out.next_sid, out.next_seq), (1, 1));
    }

    proptest! {
        /// Damaged records (bytes flipped, cut short, grown, or of the wrong type) are errors or
        /// harmless, never a panic, and replay still finishes.
        #[test]
        fn damaged_records_never_panic(
            edits in proptest::collection::vec((0usize..9, 0usize..512, any::<u8>(), 0u8..4), 1..40),
        ) {
            let samples = samples();
            let mut r = Replay::new(clock());
            for (which, pos, byte, how) in edits {
                let (t, mut p) = samples[which].clone();
                let t = match how {
                    0 => { let i = pos % p.len().max(1); if let Some(b) = p.get_mut(i) { *b ^= byte | 1; } t }
                    1 => { p.truncate(pos % (p.len() + 1)); t }
                    2 => { p.insert(pos % (p.len() + 1), byte); t }
                    _ => RecordType(byte % 12),
                };
                let _ = r.apply(t, &p);
            }
            let _ = r.finish();
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            recs in proptest::collection::vec((0u8..12, proptest::collection::vec(any::<u8>(), 0..128)), 0..30),
        ) {
            let mut r = Replay::new(clock());
            for (t, p) in recs {
                let _ = r.apply(RecordType(t), &p);
            }
            let _ = r.finish();
        }
    }
}
