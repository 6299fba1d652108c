//! Publisher backpressure: a publisher is paused (its socket is no longer read, so TCP flow control slows
//! it) only while *every* shard its last message went to reported that all the message's subscribers there
//! are congested — online but not reading (the runtime reported backpressure) or with their queue above
//! the high-water mark. Pausing it then delays nobody (nothing it sends could be delivered anyway) and
//! keeps QoS 1/2 messages that were already acknowledged from being dropped by full queues.
//!
//! One slow consumer never stalls the others: a publisher with at least one subscriber that keeps up is
//! never paused. Offline sessions do not count as congested: their queues keep the drop-oldest policy.
//!
//! Bookkeeping: the origin shard keeps, per publishing session, the shards its last message went to and the
//! shards that report congestion for it (bit masks; shards with index ≥ 64 never pause a publisher). A shard
//! that reports congestion for a publisher remembers it and reports clearing as soon as anything on that
//! shard decongests (a queue drains to the low-water mark, a socket drains, a subscriber leaves). A pause
//! also ends by itself after [`MAX_PAUSE`], so a lost clearing event costs one message, not a stall.

use std::time::{Duration, Instant};

use super::{Mesh, Origin, SessionKey, Shard, Timer};
use crate::io::IoCmd;
use crate::{ConnId, ShardId};

/// Upper bound of one pause; the publisher is re-evaluated on its next message.
pub(super) const MAX_PAUSE: Duration = Duration::from_secs(1);

/// An online session's queue may hold this many times `max_queued` before its oldest message is dropped.
/// Publishers are paused at half of `max_queued`, but what they sent before the pause took effect (up to
/// one read per publisher, and a mesh round trip when the subscriber is on another shard) still arrives;
/// this headroom absorbs it so that flow control, not the queue, decides. Offline sessions keep
/// `max_queued` exactly.
pub(super) const ONLINE_QUEUE_FACTOR: usize = 16;

/// How many messages a session may queue: `max_queued` offline, [`ONLINE_QUEUE_FACTOR`] times that
/// online, and never so many that queued and in-flight messages could run out of packet ids (they are
/// chosen when a message is queued).
pub(super) fn queue_cap(cfg: &super::Config, online: bool) -> usize {
    let cap = if online { cfg.max_queued.saturating_mul(ONLINE_QUEUE_FACTOR) } else { cfg.max_queued };
    cap.min((u16::MAX as usize - 1).saturating_sub(cfg.max_inflight as usize))
}

/// How many bytes (topic + payload) a session may queue: as [`queue_cap`] for `max_queued_bytes`.
pub(super) fn queue_bytes_cap(cfg: &super::Config, online: bool) -> usize {
    if online {
        cfg.max_queued_bytes.saturating_mul(ONLINE_QUEUE_FACTOR)
    } else {
        cfg.max_queued_bytes
    }
}

/// Encoded QoS 0 output held for a connected client whose socket is not draining, before further QoS 0
/// messages to it are dropped: a quarter of `max_queued_bytes` (16 MiB by default), at least 64 KiB. Its
/// publishers are paused at the first such message, but what they sent before the pause took effect
/// (a read per publisher, a mesh round trip) still arrives; dropping it would lose a quarter of a flat-out
/// fan-in that pausing alone handles (`scripts/fanin-loss`, 50 publishers flat out on 2 shards, with the
/// mesh backlog bound: 39-43% lost with no hold, 6-11% with 4 MiB, 0.1-0.9% with 16 MiB). The bound is
/// what one slow QoS 0 subscriber can cost.
pub(super) fn qos0_blocked_budget(cfg: &super::Config) -> usize {
    (cfg.max_queued_bytes / 4).max(64 << 10)
}

/// What one delivery to one session amounted to, for flow control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Sent, or queued below the high-water mark.
    Accepted,
    /// The session is online but not keeping up: dropped (QoS 0) or queued above the high-water mark.
    Congested,
    /// Nothing to say about flow: offline session, expired or oversized message, no such session.
    Ignored,
}

/// Tally of verdicts for one message on one shard.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    pub accepted: u32,
    pub congested: u32,
}

impl Tally {
    pub fn add(&mut self, v: Verdict) {
        match v {
            Verdict::Accepted => self.accepted += 1,
            Verdict::Congested => self.congested += 1,
            Verdict::Ignored => {}
        }
    }
    fn all_congested(self) -> bool {
        self.congested > 0 && self.accepted == 0
    }
}

pub(super) fn shard_bit(s: ShardId) -> u64 {
    if s.0 < 64 {
        1 << s.0
    } else {
        0
    }
}

impl Shard {
    /// Queue length at which an online session counts as congested.
    pub(super) fn queue_high_water(&self) -> usize {
        (self.cfg.max_queued / 2).max(1)
    }

    /// Queued bytes at which an online session counts as congested.
    pub(super) fn queue_bytes_high_water(&self) -> usize {
        (self.cfg.max_queued_bytes / 2).max(1)
    }

    /// This shard's verdict on a message from `origin`: report a change of congestion to the origin.
    pub(super) fn report_congestion(&mut self, origin: Origin, tally: Tally, now: Instant) {
        if tally.all_congested() {
            if self.pauses.throttling.insert(origin) {
                self.congestion_changed(origin, true, now);
            }
        } else if tally.accepted > 0 && self.pauses.throttling.remove(&origin) {
            self.congestion_changed(origin, false, now);
        }
    }

    fn congestion_changed(&mut self, origin: Origin, congested: bool, now: Instant) {
        if origin.shard == self.id {
            self.set_congested(origin.session, self.id, congested, now);
        } else {
            self.send_mesh(origin.shard, Mesh::Congestion { session: origin.session, congested });
        }
    }

    /// Something on this shard stopped being congested: every publisher it throttles may go again (those
    /// still facing congestion are throttled again by their next message).
    pub(super) fn decongested(&mut self, now: Instant) {
        if self.pauses.throttling.is_empty() {
            return;
        }
        let origins: Vec<Origin> = self.pauses.throttling.drain().collect();
        for o in origins {
            self.congestion_changed(o, false, now);
        }
    }

    /// `from` reports (or stops reporting) congestion for a publishing session of this shard.
    pub(super) fn set_congested(&mut self, key: SessionKey, from: ShardId, congested: bool, now: Instant) {
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        if congested {
            s.congested_by |= shard_bit(from);
        } else {
            s.congested_by &= !shard_bit(from);
        }
        self.evaluate_pause(key, now);
    }

    /// Records where a publisher's message went (a bit per target shard).
    pub(super) fn note_targets(&mut self, key: SessionKey, targets: u64, now: Instant) {
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        s.last_targets = targets;
        self.evaluate_pause(key, now);
    }

    /// Pauses or resumes the publisher's connection to match its congestion state.
    fn evaluate_pause(&mut self, key: SessionKey, now: Instant) {
        let Some(s) = self.sessions.map.get(&key) else { return };
        let should_pause = s.last_targets != 0 && s.last_targets & !s.congested_by == 0;
        let Some(conn) = s.conn.and_then(|c| self.conns.get_mut(&c)) else { return };
        if conn.paused == should_pause {
            return;
        }
        conn.paused = should_pause;
        let id = conn.id;
        if should_pause {
            self.pauses.paused_conns.insert(id);
            self.counters.publisher_pauses += 1;
            self.out.io.push_back(IoCmd::PauseRead(id));
            self.arm(now + MAX_PAUSE, Timer::Unpause(id));
        } else {
            self.pauses.paused_conns.remove(&id);
            self.out.io.push_back(IoCmd::ResumeRead(id));
            // Bytes read before the pause took effect wait in the connection's buffer; they are handled
            // outside the current call stack (see `run_deferred`).
            self.pauses.to_resume.push(id);
        }
    }

    /// A pause ran for [`MAX_PAUSE`]: forget where the last message went and read again.
    pub(super) fn unpause_timer(&mut self, id: ConnId, now: Instant) {
        let Some(key) = self.conns.get(&id).filter(|c| c.paused).and_then(|c| c.session()) else { return };
        self.note_targets(key, 0, now);
    }

    /// New interest elsewhere may give a paused publisher an uncongested subscriber: re-evaluate them all.
    pub(super) fn interest_grew(&mut self, now: Instant) {
        if self.pauses.paused_conns.is_empty() {
            return;
        }
        let paused: Vec<SessionKey> = self
            .pauses
            .paused_conns
            .iter()
            .filter_map(|c| self.conns.get(c))
            .filter_map(|c| c.session())
            .collect();
        for key in paused {
            self.note_targets(key, 0, now);
        }
    }

    /// Handles bytes that resumed connections buffered while paused. Runs at the end of every entry point
    /// so that it never nests inside another connection's read loop.
    pub(super) fn run_deferred(&mut self, now: Instant) {
        while let Some(id) = self.pauses.to_resume.pop() {
            if self.conns.get(&id).is_some_and(|c| !c.paused && c.has_buffered()) {
                self.read(id, &[], now);
            }
        }
        self.publish_metrics(now);
    }
}
