//! Moving a session to another node (issue "Cluster sessions"): the session leaves as the log records that
//! would restore it (SESSION, one MESSAGE per queued or in-flight QoS 1/2 message with its packet id,
//! RELEASED for QoS 2 messages past PUBREC, INBOUND_QOS2 for packet ids awaiting PUBREL) and arrives by
//! replaying them, through the same code that restores sessions at boot. One encoding for the disk and the
//! wire means one decoder, already fuzzed and bounds-checked, for both.
//!
//! Deadlines (session expiry, a pending will, message expiry) travel as Unix milliseconds, so both
//! nodes' wall clocks are assumed to agree to within what those deadlines can tolerate (NTP).
//!
//! The messages of a session that lost a conflict (see [`Shard::merge_session`]) travel the same way and
//! join the winning session; so do messages that reach a session's old node after it left, through the
//! forwarding stub it leaves there ([`Shard::export_forwarding`]).
//!
//! What it does not do: decide who owns a session (the registry) or carry the bytes (the gateway);
//! QoS 0 messages queued for an offline session, and retained messages still owed after a SUBSCRIBE,
//! are not moved (counted in [`Exported::dropped_qos0`]). The exporting side ends its stored copy at once:
//! if the importer dies before it stores the transfer, the session is lost.

use std::time::Instant;

use shardmq_storage::RecordType;
use shardmq_wire::QoS;

use super::records::{self, Dec, Enc, WallClock};
use super::{Arrival, RecoveredSession, Replay};
use crate::core::backpressure::Verdict;
use crate::core::error::ProtocolError;
use crate::core::msg::Delivery;
use crate::core::suback_wait::Waiter;
use crate::core::{Mesh, Timer};
use crate::core::{SessionKey, Shard};

/// Format of [`SessionTransfer::encode`]; a node refuses another.
const TRANSFER_VERSION: u8 = 1;

/// A session on its way to another node: the records that restore it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTransfer {
    pub client_id: Box<str>,
    records: Vec<(RecordType, Vec<u8>)>,
}

/// What [`Shard::export_session`] hands over.
#[derive(Debug)]
pub struct Exported {
    pub transfer: SessionTransfer,
    /// QoS 0 messages that were queued for it and are not moved.
    pub dropped_qos0: usize,
}

/// Why a transfer was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("session transfer: {0}")]
    Malformed(String),
    #[error("session transfer: format {0}, this node reads {TRANSFER_VERSION}")]
    Version(u8),
    #[error("session transfer: the client id already has a session here")]
    AlreadyHere,
    #[error("session transfer: the log refused it")]
    Storage,
    #[error("session transfer: the client id has no session here to take its messages")]
    NoSession,
}

/// Record types a transfer may carry.
fn allowed(t: RecordType) -> bool {
    matches!(t, records::SESSION | records::MESSAGE | records::RELEASED | records::INBOUND_QOS2)
}

impl SessionTransfer {
    /// `[version u8][client id][count u32]([type u8][payload bytes])*`, in the records' own conventions.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u8(TRANSFER_VERSION).str(&self.client_id).u32(self.records.len() as u32);
        for (t, payload) in &self.records {
            e.u8(t.0).bytes(payload);
        }
        e.0
    }

    /// Bounds-checked; a bad transfer is an error, never a panic. The records' contents are checked
    /// when they are replayed ([`Shard::import_session`]).
    pub fn decode(bytes: &[u8]) -> Result<SessionTransfer, TransferError> {
        let bad = TransferError::Malformed;
        let mut d = Dec::new(bytes);
        let version = d.u8().map_err(bad)?;
        if version != TRANSFER_VERSION {
            return Err(TransferError::Version(version));
        }
        let client_id: Box<str> = d.str().map_err(bad)?.into();
        // Each record takes at least its type and length.
        let n = d.count(5).map_err(bad)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = RecordType(d.u8().map_err(bad)?);
            if !allowed(t) {
                return Err(bad(format!("record type {} in a transfer", t.0)));
            }
            out.push((t, d.bytes().map_err(bad)?.to_vec()));
        }
        d.end().map_err(bad)?;
        Ok(SessionTransfer { client_id, records: out })
    }

    /// Records carried (the SESSION record and one per message or QoS 2 mark).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl Shard {
    /// Takes the session of `client_id` off this shard for another node: a connected client is
    /// disconnected (MQTT 5: DISCONNECT 0x8E Session taken over), and the session, with its
    /// subscriptions, queued and in-flight QoS 1/2 messages (same packet ids), QoS 2 state, will and
    /// expiry, is returned as a transfer and ended here without publishing its will (the will moves with
    /// it). `None` when there is no such session, or it ended as it went offline (expiry 0).
    pub fn export_session(&mut self, client_id: &str, clock: &WallClock, now: Instant) -> Option<Exported> {
        self.export(client_id, clock, now, false)
    }

    /// [`Shard::export_session`] for a node of a zone: the session's subscriptions stay here as a
    /// forwarding stub until the node it goes to routes them itself (`Mesh::EndForwarding`, or
    /// [`FORWARDING_TIMEOUT`]): what the zone still routes here for it meanwhile (messages in flight
    /// from other nodes, or published before they learnt of the move) goes after the session, in
    /// transfers of its own that the new node adds to it ([`Shard::merge_session`]). So a message
    /// published while the session moves is not lost; one published just as the new node's routing
    /// takes effect can reach it twice (once directly, once through the stub).
    pub(in crate::core) fn export_forwarding(
        &mut self,
        client_id: &str,
        clock: &WallClock,
        now: Instant,
    ) -> Option<Exported> {
        self.export(client_id, clock, now, true)
    }

    fn export(&mut self, client_id: &str, clock: &WallClock, now: Instant, stub: bool) -> Option<Exported> {
        let key = self.sessions.by_client.get(client_id, &self.sessions.map)?;
        if let Some(conn) = self.sessions.map.get(&key).and_then(|s| s.conn) {
            self.close_conn(conn, Some(ProtocolError::SessionTakenOver), now);
        }
        // A will or expiry already due happens here, before the session leaves.
        self.settle_offline(key, now);
        let key = self.sessions.by_client.get(client_id, &self.sessions.map)?;
        let session = self.session_record(key, 1, clock)?;
        let mut recs = vec![(records::SESSION, session)];
        let mut dropped_qos0 = 0;
        let s = self.sessions.map.get(&key)?;
        let q = s.qos();
        let entries = q.inflight.iter().map(|x| (&x.d, x.released)).chain(q.queue.iter().map(|d| (d, false)));
        for (mid, (d, released)) in (2u64..).zip(entries) {
            if d.qos == QoS::AtMostOnce {
                dropped_qos0 += 1;
                continue;
            }
            recs.push((records::MESSAGE, message_record(key, mid, d, clock)));
            if released {
                let mut e = Enc::default();
                e.u64(key.0).u64(mid);
                recs.push((records::RELEASED, e.0));
            }
        }
        for pid in q.inbound_qos2.iter() {
            let mut e = Enc::default();
            e.u64(key.0).u16(*pid);
            recs.push((records::INBOUND_QOS2, e.0));
        }
        // It goes on elsewhere: its will is not this node's to publish any more.
        if let Some(s) = self.sessions.map.get_mut(&key) {
            s.will = None;
        }
        if stub {
            self.leave_forwarding_stub(key, clock, now);
        } else {
            self.end_session(key, now);
        }
        self.counters.sessions_exported += 1;
        Some(Exported {
            transfer: SessionTransfer { client_id: client_id.into(), records: recs },
            dropped_qos0,
        })
    }

    /// Hands the undelivered QoS 1/2 messages of a session of `t.client_id` that lost to this shard's
    /// session of the same id (the losing side of a partition, or a moved session that came after its
    /// CONNECT went on without it) to this one: each is queued (or sent) as a new delivery, with a packet
    /// id of this session, stored if this session is, and subject to its client's read rights. Messages
    /// its old client had received (QoS 2 past PUBREC) are not, nor its subscriptions, will or QoS 2
    /// state: this session's own win. Returns how many messages were handed over.
    pub fn merge_session(
        &mut self,
        t: &SessionTransfer,
        clock: &WallClock,
        now: Instant,
    ) -> Result<usize, TransferError> {
        let key =
            self.sessions.by_client.get(&t.client_id, &self.sessions.map).ok_or(TransferError::NoSession)?;
        let rs = replay_one(t, clock)?;
        let mut merged = 0;
        for (d, released) in rs.messages {
            if released || d.qos == QoS::AtMostOnce {
                continue;
            }
            merged += 1;
            let _ = self.deliver(key, Delivery::new(d.msg, d.qos, d.retain, d.sub_ids), now);
        }
        self.counters.sessions_merged += 1;
        self.counters.merged_messages += merged as u64;
        Ok(merged)
    }

    /// Installs a session moved here from another node (see [`Shard::export_session`]) under a new key,
    /// offline: its client's CONNECT (clean start 0) resumes it with session present. Stored in this
    /// shard's log before it returns, and its subscriptions announced to the other shards. Refused when
    /// the client id already has a session here (the caller decides which one wins).
    pub fn import_session(
        &mut self,
        t: &SessionTransfer,
        clock: &WallClock,
        now: Instant,
    ) -> Result<SessionKey, TransferError> {
        if self.sessions.by_client.get(&t.client_id, &self.sessions.map).is_some() {
            return Err(TransferError::AlreadyHere);
        }
        let mut rs = replay_one(t, clock)?;
        // The exporter's ids mean nothing here: the session gets a key of this shard, and its records
        // are written to this log as new ones.
        let key = SessionKey(self.sessions.next_key);
        self.sessions.next_key += 1;
        rs.session.sid = key.0;
        rs.session.ver = 0;
        for (d, _) in rs.messages.iter_mut() {
            d.mid = 0;
        }
        let waits = self.install_session(rs, clock, now, Arrival::Moved);
        if !self.persist_session(key) {
            // Not stored: it must not live here either, or a crash would lose what the exporter ended.
            if let Some(s) = self.sessions.map.get_mut(&key) {
                s.will = None;
            }
            self.end_session(key, now);
            return Err(TransferError::Storage);
        }
        self.counters.sessions_imported += 1;
        if self.gateway().is_some() {
            let client: std::sync::Arc<str> = t.client_id.as_ref().into();
            if let Some(w) = self.routing.pending_subacks.wait(Waiter::Settled(client), waits) {
                let Waiter::Settled(client) = w else { unreachable!("handed back as given") };
                self.moved_session_routed(client);
            }
        }
        Ok(key)
    }

    /// What is left of a session exported for another node (see [`Shard::export_forwarding`]): its log
    /// records end (the new node stores it), its messages and connection are gone with it, and its
    /// subscriptions stay, routing here what the zone still sends, which [`Shard::forward_from_stub`]
    /// passes on. Not found by its client id any more: a client coming back here gets its session from
    /// the node that has it.
    fn leave_forwarding_stub(&mut self, key: SessionKey, clock: &WallClock, now: Instant) {
        let Some(record) = self.session_record(key, 1, clock) else { return };
        self.sessions.registrations.current.remove(&key);
        self.retained.owed.remove(&key);
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        s.expiry_s = 0;
        let _ = self.persist_session(key);
        let Some(s) = self.sessions.map.get_mut(&key) else { return };
        s.take_qos();
        let client = s.client_id.clone();
        let at = now + FORWARDING_TIMEOUT;
        s.expires_at = Some(at);
        self.sessions.by_client.remove(&client, key);
        self.sessions.registrations.stubs.insert(key, record);
        self.arm(at, Timer::Expiry(key));
    }

    /// A message the zone still routed to a session that moved away: to the node it moved to, as a
    /// transfer of that one message (QoS 0 is dropped and counted, as for an offline session).
    pub(in crate::core) fn forward_from_stub(&mut self, key: SessionKey, d: Delivery) -> Verdict {
        if d.qos == QoS::AtMostOnce {
            self.counters.dropped_qos0 += 1;
            return Verdict::Ignored;
        }
        let (Some(clock), Some(gateway)) = (self.wall_clock(), self.gateway()) else {
            return Verdict::Ignored;
        };
        let (Some(session), Some(s)) =
            (self.sessions.registrations.stubs.get(&key), self.sessions.map.get(&key))
        else {
            return Verdict::Ignored;
        };
        let (session, client) = (session.clone(), s.client_id.clone());
        // The packet id means nothing: the new node gives the message one of its session's.
        let d = Delivery { pid: 1, ..d };
        let records =
            vec![(records::SESSION, session), (records::MESSAGE, message_record(key, 2, &d, &clock))];
        let t = SessionTransfer { client_id: client.as_ref().into(), records };
        self.counters.forwarded_after_move += 1;
        self.send_mesh(gateway, Mesh::Exported { client, state: Some(Box::new(t)) });
        Verdict::Accepted
    }
}

/// How long a moved session's forwarding stub stays at most (its new node normally ends it sooner, once
/// every node routes the session's subscriptions there).
pub const FORWARDING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The MESSAGE record of delivery `d` of session `key` as message `mid`.
fn message_record(key: SessionKey, mid: u64, d: &Delivery, clock: &WallClock) -> Vec<u8> {
    let mut e = Enc::default();
    e.u64(mid);
    records::put_msg(&mut e, &d.msg, clock);
    e.u32(1).u64(key.0).u16(d.pid).u8(d.qos as u8).u8(d.retain as u8).u32(d.sub_ids.len() as u32);
    for id in d.sub_ids.iter() {
        e.u32(*id);
    }
    e.0
}

/// The one session a transfer carries, rebuilt through the boot path.
fn replay_one(t: &SessionTransfer, clock: &WallClock) -> Result<RecoveredSession, TransferError> {
    let bad = TransferError::Malformed;
    let mut replay = Replay::new(*clock);
    for (ty, payload) in &t.records {
        if !allowed(*ty) {
            return Err(bad(format!("record type {} in a transfer", ty.0)));
        }
        replay.apply(*ty, payload).map_err(bad)?;
    }
    let mut recovered = replay.finish();
    let rs = match (recovered.sessions.pop(), recovered.sessions.is_empty()) {
        (Some(rs), true) => rs,
        _ => return Err(bad("a transfer carries exactly one session".into())),
    };
    if *rs.session.client_id != *t.client_id {
        return Err(bad("the session's client id is not the transfer's".into()));
    }
    Ok(rs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_what_it_cannot_trust() {
        let t = SessionTransfer {
            client_id: "c".into(),
            records: vec![(records::SESSION, vec![1, 2, 3]), (records::INBOUND_QOS2, vec![])],
        };
        let bytes = t.encode();
        assert_eq!(SessionTransfer::decode(&bytes).unwrap(), t);
        for cut in 0..bytes.len() {
            assert!(SessionTransfer::decode(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        let mut v = bytes.clone();
        v[0] = 9;
        assert_eq!(SessionTransfer::decode(&v), Err(TransferError::Version(9)));
        let retain = SessionTransfer { client_id: "c".into(), records: vec![(records::RETAIN, vec![])] };
        assert!(matches!(SessionTransfer::decode(&retain.encode()), Err(TransferError::Malformed(_))));
        let mut trailing = bytes;
        trailing.push(0);
        assert!(SessionTransfer::decode(&trailing).is_err());
        // A count far beyond what the bytes can hold is refused before anything is allocated for it.
        let mut e = Enc::default();
        e.u8(TRANSFER_VERSION).str("c").u32(u32::MAX);
        assert!(SessionTransfer::decode(&e.0).is_err());
    }
}
