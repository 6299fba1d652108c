//! Compaction driven by the shard's state: which records are still live, which are rewritten for the
//! sessions still holding them, and how fast (paced by appends and time, backing off on live data).

use std::sync::Arc;
use std::time::Instant;

use ahash::HashMap;
use shardmq_storage::{Keep, RecordType};

use super::records::{self, WallClock};
use super::{COMPACT_DEBT_CAP, COMPACT_PER_SECOND, COMPACT_STEP_BYTES};
use crate::core::msg::Msg;
use crate::core::session::Session;
use crate::core::{SessionKey, Shard};
use crate::retained::RetainedTree;

impl Shard {
    pub(in crate::core) fn compact(&mut self, now: Instant) {
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
        let sessions = &self.sessions.map;
        let retained = &self.retained.tree;
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
        // Live while the session record it builds on is the latest: a rewrite includes it.
        records::SUB => {
            let (Ok(sid), Ok(base)) = (d.u64(), d.u64()) else { return true };
            stored(sid).is_some_and(|s| s.stored_ver == base)
        }
        records::RELEASED => {
            let (Ok(sid), Ok(mid)) = (d.u64(), d.u64()) else { return true };
            stored(sid).is_some_and(|s| s.qos().inflight.iter().any(|f| f.d.mid == mid && f.released))
        }
        records::INBOUND_QOS2 => {
            let (Ok(sid), Ok(pid)) = (d.u64(), d.u16()) else { return true };
            stored(sid).is_some_and(|s| s.qos().holds_inbound_qos2(pid))
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
