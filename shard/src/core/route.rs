//! Routing: which local sessions and which other shards get a publish; SUBSCRIBE/UNSUBSCRIBE; the
//! interest announcements that keep every shard's view of the others current; shared-subscription member
//! choice; retained-message replication.

use std::sync::Arc;
use std::time::Instant;

use shardmq_wire::{
    topic, Packet, Properties, QoS, ReasonCode, SubAck, SubOptions, Subscribe, UnsubAck, Unsubscribe,
};

use super::backpressure::{shard_bit, Tally, Verdict};
use super::suback_wait::Waiter;
use super::{owner_of, Delivery, Mesh, Msg, PendingSubAck, ProtocolError, SessionKey, Shard, Timer};
use crate::{ConnId, ShardId};

/// A subscription group: `(Some(group), filter)` for `$share/group/filter`, `(None, filter)` otherwise.
pub type SharedKey = (Option<Arc<str>>, Arc<str>);

/// A full filter's group and the filter without its `$share/group/` prefix.
pub(super) fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match topic::parse_shared(filter) {
        Some(sh) => (Some(sh.group), sh.filter),
        None => (None, filter),
    }
}

/// A local subscription in the trie (keyed by the filter without the `$share/group/` prefix).
#[derive(Debug, Clone)]
pub(super) struct SubRef {
    pub session: SessionKey,
    pub opts: SubOptions,
    /// 0 = none.
    pub sub_id: u32,
    pub group: Option<Arc<str>>,
}

/// One shard's subscriber count for a filter and group, as last announced.
#[derive(Debug, Clone)]
pub(super) struct Interest {
    pub shard: ShardId,
    pub key: SharedKey,
    /// Invariant: > 0 (entries at 0 are removed).
    pub members: u32,
    /// How many of them belong to persistent sessions: a QoS 1/2 publish to that shard waits for it to
    /// store the message before it is acknowledged. Invariant: `<= members`.
    pub durable: u32,
}

/// The new count of a shard's subscribers for one filter and group (0: none left).
#[derive(Debug, Clone)]
pub struct InterestDelta {
    pub key: SharedKey,
    pub members: u32,
    pub durable: u32,
}

/// This shard's own subscriber counts for one filter and group (its entry in its interest view).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct LocalCount {
    pub members: u32,
    pub durable: u32,
}

/// Expired retained messages evicted per timer pass at most.
const RETAINED_EVICT_BATCH: usize = 1024;

/// Retained messages sent to a session per `pump_retained` call, and the most it may have queued (beyond
/// its in-flight window) for more to be sent: what bounds the memory a subscription to `#` over many
/// retained messages costs, and the burst it puts on the socket.
const RETAINED_BATCH: usize = 64;

/// A retained message owed to a session: the topic (looked up again when its turn comes, so a message
/// replaced or cleared meanwhile goes out as it is then, or not at all) and the subscription's terms.
#[derive(Debug)]
pub(super) struct OwedRetained {
    topic: Box<str>,
    qos: QoS,
    sub_id: u32,
}

/// A filter whose retained messages are sent after its SUBACK.
#[derive(Debug, Clone)]
pub(super) struct RetainedRequest {
    filter: Box<str>,
    opts: SubOptions,
    sub_id: u32,
}

impl Shard {
    /// Sends a message to every shard (this one included) with matching subscribers, choosing one member
    /// per shared group node-wide.
    /// Returns the shards the message went to (a bit per shard, this one included), for flow control.
    pub(super) fn route(&mut self, msg: Arc<Msg>, now: Instant) -> u64 {
        if msg.retain {
            self.own_retained(msg.clone());
        }
        let n = self.mesh_size() as usize;
        // Scratch buffers live in the shard so that routing a publish allocates nothing in the common case.
        let mut normal = std::mem::take(&mut self.routing.scratch.shards);
        normal.clear();
        normal.resize(n, false);
        let mut durable = std::mem::take(&mut self.routing.scratch.durable);
        durable.clear();
        durable.resize(n, false);
        let mut shared = std::mem::take(&mut self.routing.scratch.shared);
        shared.clear();
        self.routing.interest.for_each_match(&msg.topic, |i| match i.key.0 {
            None => {
                normal[i.shard.index()] = true;
                durable[i.shard.index()] |= i.durable > 0;
            }
            Some(_) => shared.push((i.key.clone(), i.shard, i.members, i.durable > 0)),
        });
        // Shards that added interest this one has not heard of yet get the message too, and match it
        // against their own index: a subscription processed there before this publish is not missed. The
        // new subscriber may be persistent, so a QoS 1/2 acknowledgement waits for that shard's answer.
        self.routing.seen.for_each_behind(&self.shared.interest, |s| {
            normal[s.index()] = true;
            durable[s.index()] = true;
        });
        // Peers' interest is matched by the cluster gateway (its summaries are not filters a shard could
        // hold): it gets every publish while some peer has interest, and asks its peers to store what
        // needs storing before it answers.
        // `$SYS` topics are this node's own (see `sys`): peers have theirs.
        if let Some(gw) =
            self.gateway().filter(|_| self.routing.forward_all && !super::sys::node_local(&msg.topic))
        {
            normal[gw.index()] = true;
            durable[gw.index()] = msg.qos != shardmq_wire::QoS::AtMostOnce;
        }
        let mut groups: Vec<Vec<SharedKey>> = Vec::new();
        if !shared.is_empty() {
            groups.resize(n, Vec::new());
            shared.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut i = 0;
            while i < shared.len() {
                let key = &shared[i].0;
                let mut j = i;
                let mut total = 0u64;
                while j < shared.len() && shared[j].0 == *key {
                    total += shared[j].2 as u64;
                    j += 1;
                }
                // Weighted round robin over shards by member count spreads messages evenly over members.
                let rr = self.routing.rr.shared.entry(key.clone()).or_insert(0);
                let mut pick = *rr % total.max(1);
                *rr = rr.wrapping_add(1);
                for (_, shard, members, persistent) in &shared[i..j] {
                    if pick < *members as u64 {
                        groups[shard.index()].push(key.clone());
                        durable[shard.index()] |= *persistent;
                        break;
                    }
                    pick -= *members as u64;
                }
                i = j;
            }
            shared.clear();
        }
        self.routing.scratch.shared = shared;
        let mut targets = 0u64;
        for (s, &to_all) in normal.iter().enumerate() {
            let shard_groups = groups.get_mut(s).map(std::mem::take).unwrap_or_default();
            if !to_all && shard_groups.is_empty() {
                continue;
            }
            let shard = ShardId(s as u16);
            targets |= shard_bit(shard);
            if shard.0 >= 64 {
                // Flow control tracks 64 shards; beyond that a publisher is never paused.
                targets = u64::MAX;
            }
            if shard == self.id {
                let tally = self.deliver_local(&msg, to_all, &shard_groups, false, now);
                if let Some(origin) = msg.origin {
                    self.report_congestion(origin, tally, now);
                }
            } else {
                // Only a shard with persistent subscribers stores the message; the others need not answer.
                let ack = if durable[s] { self.ack_for_send() } else { None };
                let m = Mesh::Deliver {
                    msg: msg.clone(),
                    normal: to_all,
                    groups: shard_groups,
                    rerouted: false,
                    ack,
                };
                self.send_mesh(shard, m);
            }
        }
        self.routing.scratch.shards = normal;
        self.routing.scratch.durable = durable;
        if targets == u64::MAX {
            0
        } else {
            targets
        }
    }

    /// Delivers to this shard's subscribers: every matching non-shared subscription (one copy each) and one
    /// member of each listed group.
    pub(super) fn deliver_local(
        &mut self,
        msg: &Arc<Msg>,
        normal: bool,
        groups: &[SharedKey],
        rerouted: bool,
        now: Instant,
    ) -> Tally {
        let mut tally = Tally::default();
        if normal {
            let me = self.id;
            let mut hits = std::mem::take(&mut self.routing.scratch.hits);
            hits.clear();
            self.routing.subs.for_each_match(&msg.topic, |s| {
                if s.group.is_some() {
                    return;
                }
                if s.opts.no_local && msg.origin.is_some_and(|o| o.shard == me && o.session == s.session) {
                    return;
                }
                let retain = s.opts.retain_as_published && msg.retain;
                hits.push((s.session, s.opts.qos.min(msg.qos), retain, s.sub_id));
            });
            // One copy per matching subscription, each with its own QoS, Retain As Published and
            // identifier, as Mosquitto does: MQTT 5 §3.3.4 allows a single merged copy too, but clients
            // and test suites that subscribe twice expect one copy per subscription.
            for &(key, qos, retain, sub_id) in hits.iter() {
                let d = Delivery::new(msg.clone(), qos, retain, sub_id_list(sub_id));
                let verdict = self.deliver(key, d, now);
                tally.add(verdict);
            }
            hits.clear();
            self.routing.scratch.hits = hits;
        }
        for key in groups {
            let verdict = self.deliver_shared(msg, key, rerouted, now);
            tally.add(verdict);
        }
        tally
    }

    /// One member of a shared group on this shard: round robin, preferring connected members with room.
    fn deliver_shared(&mut self, msg: &Arc<Msg>, key: &SharedKey, rerouted: bool, now: Instant) -> Verdict {
        // Indices of the group's members in the trie's list, in a buffer reused across messages.
        let mut members = std::mem::take(&mut self.routing.scratch.members);
        members.clear();
        let list: &[SubRef] = self.routing.subs.get(&key.1).unwrap_or(&[]);
        // Only members allowed to read the topic: a denied one would otherwise take the message from the
        // group (with no ACL file every member is).
        let acl_on = self.cfg.acl_on();
        let acls = &self.sessions.acls;
        let may_read = |s: &SubRef| !acl_on || acls.get(&s.session).is_some_and(|a| a.can_read(&msg.topic));
        members.extend(
            list.iter().enumerate().filter(|(_, s)| s.group == key.0 && may_read(s)).map(|(i, _)| i as u32),
        );
        if members.is_empty() {
            self.routing.scratch.members = members;
            // The last member here left after the sender chose this shard (its announcement is still on
            // the way). A QoS 1/2 message goes once more to a shard that has members; a second miss means
            // the group is empty node-wide as far as this shard knows.
            let me = self.id;
            let other = self.routing.interest.get(&key.1).and_then(|list| {
                list.iter().find(|i| i.key == *key && i.shard != me && i.members > 0).map(|i| i.shard)
            });
            match other {
                Some(to) if !rerouted && msg.qos != QoS::AtMostOnce => {
                    let groups = vec![key.clone()];
                    // Asked for a durability answer itself, this shard passes the request on (and tells
                    // the publisher's shard to wait for one more answer). Not asked (the publisher saw
                    // only non-persistent members here), it cannot extend a wait that is not happening:
                    // a persistent member elsewhere then stores the message without holding the PUBACK,
                    // a window as narrow as the group's last member here leaving mid-flight.
                    let ack = self.ack_for_send();
                    self.send_mesh(
                        to,
                        Mesh::Deliver { msg: msg.clone(), normal: false, groups, rerouted: true, ack },
                    );
                }
                _ => self.counters.dropped_no_member += 1,
            }
            return Verdict::Ignored;
        }
        let rr = self.routing.rr.member.entry(key.clone()).or_insert(0);
        let start = *rr as usize;
        *rr = rr.wrapping_add(1);
        let online = |s: &SubRef| {
            self.sessions
                .map
                .get(&s.session)
                .and_then(|x| x.conn)
                .and_then(|c| self.conns.get(&c))
                .is_some_and(|c| !c.blocked)
        };
        let n = members.len();
        let member = |i: usize| &list[members[i % n] as usize];
        let chosen = (0..n).map(|i| member(start + i)).find(|s| online(s)).unwrap_or(member(start));
        let d = Delivery::new(
            msg.clone(),
            chosen.opts.qos.min(msg.qos),
            chosen.opts.retain_as_published && msg.retain,
            sub_id_list(chosen.sub_id),
        );
        let session = chosen.session;
        self.routing.scratch.members = members;
        self.deliver(session, d, now)
    }

    pub(super) fn on_subscribe(
        &mut self,
        id: ConnId,
        key: SessionKey,
        s: Subscribe<'_>,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        let sub_id = s.properties.subscription_identifiers.first().copied().unwrap_or(0);
        let mut reasons = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let mut deltas = Vec::new();
        let mut changed: Vec<&str> = Vec::with_capacity(s.filters.len());
        // Unacknowledged announcements of interest this SUBSCRIBE relies on (see `suback_wait`).
        let mut waits = Vec::new();
        for (filter, opts) in &s.filters {
            let shared = topic::parse_shared(filter);
            let inner = shared.as_ref().map_or(*filter, |sh| sh.filter);
            if shared.is_some() && opts.no_local {
                // MQTT 5 §3.8.3.1.
                return Err(ProtocolError::Violation("No Local on a shared subscription"));
            }
            if !topic::valid_topic_filter(filter) || topic::levels(inner) > self.cfg.max_topic_levels {
                reasons.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            }
            if self.cfg.acl_on() && !self.sessions.acls.get(&key).is_some_and(|a| a.can_subscribe(inner)) {
                // 3.1.1 clients read it as 0x80 Failure (the encoder maps it).
                self.counters.denied_by_acl += 1;
                reasons.push(ReasonCode::NOT_AUTHORIZED);
                continue;
            }
            let group: Option<Arc<str>> = shared.as_ref().map(|sh| sh.group.into());
            let Some(sess) = self.sessions.map.get_mut(&key) else { return Ok(()) };
            let stored = sess.stored_ver != 0;
            let existed = sess.subs.contains(filter);
            if !existed && sess.subs.len() >= self.cfg.max_subscriptions {
                // 3.1.1 clients read any refusal as 0x80 Failure (the encoder maps it).
                reasons.push(ReasonCode::QUOTA_EXCEEDED);
                continue;
            }
            if !existed {
                sess.subs.insert((*filter).into());
            }
            if existed {
                if let Some(list) = self.routing.subs.get_mut(inner) {
                    if let Some(r) = list.iter_mut().find(|r| r.session == key && r.group == group) {
                        r.opts = *opts;
                        r.sub_id = sub_id;
                    }
                }
            } else {
                self.routing
                    .subs
                    .insert(inner, SubRef { session: key, opts: *opts, sub_id, group: group.clone() });
                if let Some(d) = self.count_interest((group.clone(), inner.into()), 1, stored as i32) {
                    deltas.push(d);
                }
            }
            waits.extend(self.routing.pending_subacks.pending(&(group.clone(), Arc::from(inner))));
            let send_retained =
                group.is_none() && (opts.retain_handling == 0 || (opts.retain_handling == 1 && !existed));
            if send_retained {
                retained.push(RetainedRequest { filter: inner.into(), opts: *opts, sub_id });
            }
            changed.push(filter);
            reasons.push(match opts.qos {
                QoS::AtMostOnce => ReasonCode::GRANTED_QOS_0,
                QoS::AtLeastOnce => ReasonCode::GRANTED_QOS_1,
                QoS::ExactlyOnce => ReasonCode::GRANTED_QOS_2,
            });
        }
        if !changed.is_empty() && !self.persist_subscriptions(key, &changed) {
            self.storage_failed(id, now);
            return Ok(());
        }
        let ack = SubAck { packet_id: s.packet_id, reasons, properties: Properties::default() };
        let mut packet = Vec::new();
        let protocol = self.conns.get(&id).and_then(|c| c.protocol).unwrap_or(shardmq_wire::Protocol::V311);
        super::encode_into(&mut packet, &Packet::SubAck(ack), protocol);
        let pending = PendingSubAck { conn: id, session: key, packet, retained };
        waits.extend(self.announce_awaited(deltas));
        if let Some(w) = self.routing.pending_subacks.wait(Waiter::SubAck(pending), waits) {
            self.waiter_done(w, now);
        }
        Ok(())
    }

    pub(super) fn interest_acked(&mut self, token: u64, now: Instant) {
        for w in self.routing.pending_subacks.acked(token) {
            self.waiter_done(w, now);
        }
    }

    fn waiter_done(&mut self, w: Waiter, now: Instant) {
        match w {
            Waiter::SubAck(p) => self.complete_suback(p, now),
            Waiter::Settled(client) => self.moved_session_routed(client),
        }
    }

    /// Sends the SUBACK, then the retained messages its filters asked for.
    pub(super) fn complete_suback_now(&mut self, p: PendingSubAck, now: Instant) {
        let Some(conn) = self.conns.get_mut(&p.conn) else { return };
        if conn.session() != Some(p.session) {
            return;
        }
        conn.send_raw(&p.packet, &mut self.out.io);
        if p.retained.is_empty() {
            return;
        }
        // Not delivered in one go: a `#` over 50,000 retained messages would queue them all at once.
        // Only their topics are kept, and `pump_retained` sends them as the window and socket allow.
        let owed = self.retained.owed.entry(p.session).or_default();
        for r in p.retained {
            self.retained.tree.for_each_match(&r.filter, |topic, m| {
                if !m.is_expired(now) {
                    owed.push_back(OwedRetained { topic: topic.into(), qos: r.opts.qos, sub_id: r.sub_id });
                }
            });
        }
        if owed.is_empty() {
            self.retained.owed.remove(&p.session);
            return;
        }
        self.pump_retained(p.session, now);
    }

    /// Sends owed retained messages: at most [`RETAINED_BATCH`] per call, and only while the client's
    /// socket takes bytes and its queue (beyond the in-flight window) is short. It is called again when
    /// the session can take more (`pump`: an acknowledgement, a drained socket, a resumed session) or, when
    /// only the batch bound stopped it, from a timer due at once, so the runtime writes the batch (and
    /// reports a full socket) first. QoS 0 messages therefore wait for a blocked socket instead of being
    /// dropped as a live QoS 0 publish to it would be. An offline session keeps what it is owed until it
    /// resumes; an ended one loses it.
    pub(super) fn pump_retained(&mut self, key: SessionKey, now: Instant) {
        if self.retained.owed.is_empty() {
            return;
        }
        for _ in 0..RETAINED_BATCH {
            let Some(s) = self.sessions.map.get(&key) else {
                self.retained.owed.remove(&key);
                return;
            };
            let Some(conn) = s.conn.and_then(|c| self.conns.get(&c)) else { return };
            if conn.blocked || s.qos().queue.len() >= RETAINED_BATCH {
                return;
            }
            let Some(owed) = self.retained.owed.get_mut(&key) else { return };
            let Some(item) = owed.pop_front() else {
                self.retained.owed.remove(&key);
                return;
            };
            let Some(m) = self.retained.tree.get(&item.topic).filter(|m| !m.is_expired(now)).cloned() else {
                continue;
            };
            let qos = item.qos.min(m.qos);
            let _ = self.deliver(key, Delivery::new(m, qos, true, sub_id_list(item.sub_id)), now);
        }
        if self.retained.owed.get(&key).is_some_and(|o| !o.is_empty()) {
            self.arm(now, Timer::Retained(key));
        } else {
            self.retained.owed.remove(&key);
        }
    }

    pub(super) fn on_unsubscribe(&mut self, id: ConnId, key: SessionKey, u: Unsubscribe<'_>, now: Instant) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        let mut removed: Vec<&str> = Vec::with_capacity(u.filters.len());
        for filter in &u.filters {
            let existed = self.sessions.map.get_mut(&key).is_some_and(|s| s.subs.remove(filter));
            if existed {
                self.remove_subscription(key, filter, now);
                removed.push(filter);
                reasons.push(ReasonCode::SUCCESS);
            } else {
                reasons.push(ReasonCode::NO_SUBSCRIPTION_EXISTED);
            }
        }
        if !removed.is_empty() && !self.persist_subscriptions(key, &removed) {
            self.storage_failed(id, now);
            return;
        }
        let protocol = self.conns.get(&id).and_then(|c| c.protocol).unwrap_or(shardmq_wire::Protocol::V311);
        let ack = UnsubAck { packet_id: u.packet_id, reasons, properties: Properties::default() };
        let mut out = Vec::new();
        super::encode_into(&mut out, &Packet::UnsubAck(ack), protocol);
        self.send_durable(id, out, now);
    }

    /// Removes a session's subscription (full filter) from the trie and announces the changed count.
    pub(super) fn remove_subscription(&mut self, key: SessionKey, filter: &str, now: Instant) {
        // A session that ends is no longer stored by the time its subscriptions go (see `end_session`).
        let stored = self.sessions.map.get(&key).is_some_and(|s| s.stored_ver != 0);
        let (group, inner) = split_shared(filter);
        let group: Option<Arc<str>> = group.map(Into::into);
        let (removed, _) = self.routing.subs.remove(inner, |r| r.session == key && r.group == group);
        if removed.is_some() {
            // A congested subscriber that leaves no longer holds publishers back.
            self.decongested(now);
            if let Some(d) = self.count_interest((group, inner.into()), -1, -(stored as i32)) {
                self.announce(vec![d], None);
            }
        }
    }

    /// Announces `deltas` with a token every other endpoint acknowledges once it applied them (see
    /// `suback_wait`); the token, or `None` when there is nothing to announce or nobody to tell.
    pub(super) fn announce_awaited(&mut self, deltas: Vec<InterestDelta>) -> Option<u64> {
        if deltas.is_empty() || self.mesh_size() <= 1 {
            return None;
        }
        let token = self.next_token;
        self.next_token += 1;
        let keys = deltas.iter().map(|d| d.key.clone()).collect();
        self.announce(deltas, Some(token));
        self.routing.pending_subacks.announced(token, self.mesh_size() as usize - 1, keys);
        Some(token)
    }

    /// Sends interest deltas to every other shard. One that adds interest first bumps this shard's
    /// interest generation, so that shards routing a publish before the announcement reaches them send it
    /// here anyway (see `interest_gen`).
    pub(super) fn announce(&mut self, deltas: Vec<InterestDelta>, token: Option<u64>) {
        let generation = if deltas.iter().any(|d| d.members > 0) {
            let g = self.shared.interest.bump(self.id);
            self.routing.seen.applied(self.id, g);
            g
        } else {
            self.shared.interest.get(self.id)
        };
        for to in self.other_shards() {
            self.send_mesh(to, Mesh::Interest { deltas: deltas.clone(), token, generation });
        }
    }

    /// Changes this shard's member (and persistent member) count for `key` and applies it to its own
    /// interest view. Returns the announcement other shards need: on every change for shared groups
    /// (their member counts weight the choice), only on 0 ↔ 1 of either count for plain filters.
    pub(super) fn count_interest(
        &mut self,
        key: SharedKey,
        change: i32,
        durable: i32,
    ) -> Option<InterestDelta> {
        // The shard's own entry in its interest view is its count (kept there by `apply_interest`
        // below): a separate map of it would cost another ~90 bytes per filter.
        let me = self.id;
        let before = self
            .routing
            .interest
            .get(&key.1)
            .and_then(|l| l.iter().find(|i| i.shard == me && i.key == key))
            .map_or(LocalCount::default(), |i| LocalCount { members: i.members, durable: i.durable });
        let add = |v: u32, d: i32| (v as i64 + d as i64).max(0) as u32;
        let members = add(before.members, change);
        let after = LocalCount { members, durable: add(before.durable, durable).min(members) };
        if after.members == 0 {
            // No member here to choose among: a later member starts a fresh rotation.
            self.routing.rr.member.remove(&key);
        }
        let flipped = |a: u32, b: u32| (a == 0) != (b == 0);
        let announce = key.0.is_some()
            || flipped(before.members, after.members)
            || flipped(before.durable, after.durable);
        let delta = InterestDelta { key, members: after.members, durable: after.durable };
        self.apply_interest(self.id, delta.clone());
        announce.then_some(delta)
    }

    pub(super) fn apply_interest(&mut self, from: ShardId, d: InterestDelta) {
        let filter = d.key.1.clone();
        if d.members == 0 {
            self.routing.interest.remove(&filter, |i| i.shard == from && i.key == d.key);
            // The group has no member on any shard this one knows of: forget its rotation.
            let left = self.routing.interest.get(&filter).is_some_and(|l| l.iter().any(|i| i.key == d.key));
            if d.key.0.is_some() && !left {
                self.routing.rr.shared.remove(&d.key);
            }
            return;
        }
        if let Some(list) = self.routing.interest.get_mut(&filter) {
            if let Some(i) = list.iter_mut().find(|i| i.shard == from && i.key == d.key) {
                i.members = d.members;
                i.durable = d.durable;
                return;
            }
        }
        let i = Interest { shard: from, key: d.key, members: d.members, durable: d.durable };
        self.routing.interest.insert(&filter, i);
    }

    /// A retained update published on this shard or forwarded to it: the topic's owner applies it and fans
    /// it out; any other shard forwards it to the owner.
    pub(super) fn own_retained(&mut self, msg: Arc<Msg>) {
        let owner = owner_of(&msg.topic, self.shards);
        if owner != self.id {
            let ack = self.ack_for_send();
            self.send_mesh(owner, Mesh::Retain { msg, apply: false, ack });
            return;
        }
        // `$SYS` topics hold this node's own values (see `sys`): not stored (they would be stale after a
        // restart, and are rewritten every interval anyway), nor replicated to the zone through the
        // gateway (every node publishes its own).
        let node_local = super::sys::node_local(&msg.topic);
        if !node_local {
            // A failure is remembered by the store: the publish waiting for it is refused.
            let _ = self.persist_retained(&msg);
        }
        let gateway = self.gateway();
        for to in self.other_shards() {
            if node_local && Some(to) == gateway {
                continue;
            }
            self.send_mesh(to, Mesh::Retain { msg: msg.clone(), apply: true, ack: None });
        }
        self.apply_retained(msg);
    }

    pub(super) fn apply_retained(&mut self, msg: Arc<Msg>) {
        if msg.payload.is_empty() {
            self.retained.tree.remove(&msg.topic);
        } else {
            let topic = msg.topic.clone();
            let expires_at = msg.expires_at;
            // Inserted first: compaction keeps only entries of messages held.
            self.retained.tree.insert(&topic, msg);
            if let Some(at) = expires_at {
                self.retained.expiry.push(std::cmp::Reverse((at, topic)));
                if self.retained.expiry.len() > self.retained.expiry_compact_at {
                    self.compact_retained_expiry();
                }
            }
        }
    }

    /// Evicts the retained messages whose expiry has passed, at most [`RETAINED_EVICT_BATCH`] per call so
    /// that a burst of expiries does not stall the shard (the next deadline is then already due and the
    /// runtime calls again at once). Every replica does the same at the same instant, so they agree; the
    /// owner's log needs no record: replay drops a message already expired (see `restore`), and
    /// compaction drops a record whose message is no longer held.
    pub(super) fn evict_expired_retained(&mut self, now: Instant) {
        for _ in 0..RETAINED_EVICT_BATCH {
            match self.retained.expiry.peek() {
                Some(std::cmp::Reverse((at, _))) if *at <= now => {}
                _ => return,
            }
            let Some(std::cmp::Reverse((_, topic))) = self.retained.expiry.pop() else { return };
            // The topic may hold a newer message by now: evict only what has expired.
            if self.retained.tree.get(&topic).is_some_and(|m| m.is_expired(now)) {
                self.retained.tree.remove(&topic);
            }
        }
    }

    /// Drops entries of `retained_expiry` whose message was replaced or cleared (and duplicates).
    fn compact_retained_expiry(&mut self) {
        let mut v = std::mem::take(&mut self.retained.expiry).into_vec();
        let retained = &self.retained.tree;
        v.retain(|std::cmp::Reverse((at, topic))| {
            retained.get(topic).is_some_and(|m| m.expires_at == Some(*at))
        });
        v.sort_unstable();
        v.dedup();
        self.retained.expiry = std::collections::BinaryHeap::from(v);
        self.retained.expiry_compact_at = (self.retained.expiry.len() * 2).max(super::TIMER_COMPACT_MIN);
    }
}

/// The subscription identifiers of one subscription (0: none).
fn sub_id_list(sub_id: u32) -> Box<[u32]> {
    if sub_id != 0 {
        Box::new([sub_id])
    } else {
        Box::default()
    }
}
