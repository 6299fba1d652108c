//! Random operation sequences against real cores in the harness, with protocol invariants checked after
//! every step. Shared by the proptest (`random.rs`) and the cargo-fuzz target `fuzz/fuzz_targets/core.rs`,
//! which includes this file and `sim.rs` by path: the harness stays test code, not API of the crate.
//!
//! Invariants:
//! - no core panics, and every packet the broker sends decodes in the connection's protocol;
//! - the broker sends nothing but CONNACK before CONNACK, and CONNACK once;
//! - a PUBLISH to a client never uses a packet id still in flight on that connection (QoS 1 until the
//!   PUBACK, QoS 2 until the PUBCOMP);
//! - a PUBREL only for a QoS 2 delivery the client PUBREC'd;
//! - each QoS 1/2 PUBLISH (and SUBSCRIBE, UNSUBSCRIBE, PUBREL) of a client is answered at most once, and
//!   once everything settled, exactly once unless its connection closed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use shardmq_wire::{
    Ack, Disconnect, Packet, PacketId, Properties, Publish, QoS, ReasonCode, SubOptions, Subscribe,
    Unsubscribe, Will,
};

use super::sim::*;
use crate::core::*;

pub(super) const TOPICS: [&str; 5] = ["a", "a/b", "a/c", "b", "b/x"];
pub(super) const FILTERS: [&str; 8] = ["a", "a/+", "a/#", "#", "+/x", "$share/g/a/+", "$share/h/#", "b/x"];
/// Client ids "c0".."c3": few, so sessions are resumed and taken over often.
pub(super) const CLIENTS: u8 = 4;

#[derive(Debug, Clone)]
pub(super) enum Op {
    /// A new connection (a takeover when the client is connected); `will`: (topic, qos, retain).
    Connect {
        client: u8,
        shard: u8,
        v5: bool,
        clean: bool,
        keep_alive_s: u8,
        expiry_s: u8,
        will: Option<(u8, u8, bool)>,
    },
    Subscribe {
        client: u8,
        filter: u8,
        qos: u8,
    },
    Unsubscribe {
        client: u8,
        filter: u8,
    },
    Publish {
        client: u8,
        topic: u8,
        qos: u8,
        retain: bool,
    },
    /// Acks the client's `n` oldest deliveries (QoS 1: PUBACK; QoS 2: PUBREC, then PUBCOMP on PUBREL).
    Ack {
        client: u8,
        n: u8,
    },
    Ping {
        client: u8,
    },
    Disconnect {
        client: u8,
    },
    Drop {
        client: u8,
    },
    Advance {
        ms: u16,
    },
    /// Holds (true) or releases the mesh between shards.
    HoldMesh(bool),
    /// The process crashes and restarts (durable nodes only; a no-op otherwise).
    Crash,
}

impl Op {
    /// Reads one operation from the front of `data` (the fuzz target's encoding): a tag byte, then the
    /// fields' bytes; `None` once the input runs out.
    pub(super) fn take(data: &mut &[u8]) -> Option<Op> {
        let (&tag, rest) = data.split_first()?;
        *data = rest;
        let mut byte = || -> Option<u8> {
            let (&b, rest) = data.split_first()?;
            *data = rest;
            Some(b)
        };
        Some(match tag % 12 {
            0 => {
                let (client, shard, flags, keep_alive_s, expiry_s) =
                    (byte()?, byte()?, byte()?, byte()?, byte()?);
                Op::Connect {
                    client,
                    shard,
                    v5: flags & 1 != 0,
                    clean: flags & 2 != 0,
                    keep_alive_s,
                    expiry_s,
                    will: (flags & 4 != 0).then_some((flags >> 3, flags >> 5, flags & 0x80 != 0)),
                }
            }
            1 | 2 => Op::Subscribe { client: byte()?, filter: byte()?, qos: byte()? },
            3 => Op::Unsubscribe { client: byte()?, filter: byte()? },
            4 | 5 => {
                let (client, topic, flags) = (byte()?, byte()?, byte()?);
                Op::Publish { client, topic, qos: flags, retain: flags & 4 != 0 }
            }
            6 => Op::Ack { client: byte()?, n: byte()? },
            7 => Op::Ping { client: byte()? },
            8 => {
                let client = byte()?;
                if client & 0x80 != 0 {
                    Op::Drop { client }
                } else {
                    Op::Disconnect { client }
                }
            }
            9 => Op::Advance { ms: u16::from_le_bytes([byte()?, byte()?]) },
            10 => Op::HoldMesh(byte()? & 1 != 0),
            _ => Op::Crash,
        })
    }
}

/// What the client waits for after sending a packet with this id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    PubAck,
    PubRec,
    PubComp,
    SubAck,
    UnsubAck,
}

/// One connection as its client sees it.
struct ConnModel {
    c: C,
    /// The client's connection before this one: its session state carries over when the session is
    /// present.
    prev: Option<usize>,
    connack: bool,
    /// QoS 1/2 deliveries not acked yet, oldest first.
    unacked: VecDeque<(u16, QoS)>,
    /// Packet ids of deliveries in flight (unacked, or PUBREC'd and not yet released).
    in_flight: BTreeSet<u16>,
    /// QoS 2 deliveries PUBREC'd, waiting for the PUBREL.
    recd: BTreeSet<u16>,
    /// Packets of this client waiting for their answer, by packet id.
    waiting: BTreeMap<u16, Answer>,
    next_pid: u16,
}

pub(super) struct Driver {
    pub(super) sim: Sim,
    durable: bool,
    conns: Vec<ConnModel>,
    /// The latest connection of each client id.
    current: [Option<usize>; CLIENTS as usize],
}

fn qos(q: u8) -> QoS {
    match q % 3 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Driver {
    pub(super) fn new(shards: u16, durable: bool, seed: u64) -> Driver {
        // A small queue, so publisher pauses and queue drops happen within a short sequence.
        let cfg = Config { max_queued: 8, max_inflight: 8, ..Config::default() };
        let sim = if durable {
            Sim::durable_with_seed(shards, cfg, seed)
        } else {
            Sim::with_seed(shards, cfg, seed)
        };
        Driver { sim, durable, conns: Vec::new(), current: [None; CLIENTS as usize] }
    }

    /// The open, CONNACKed connection of `client`, if any.
    fn live(&self, client: u8) -> Option<usize> {
        let i = self.current[(client % CLIENTS) as usize]?;
        (self.conns[i].connack && !self.sim.clients[self.conns[i].c].closed).then_some(i)
    }

    fn send(&mut self, i: usize, p: &Packet<'_>) {
        let c = self.conns[i].c;
        if !self.sim.clients[c].closed {
            self.sim.send(c, p);
        }
    }

    /// A packet id not waiting for an answer on connection `i`.
    fn pid(&mut self, i: usize, answer: Answer) -> PacketId {
        let m = &mut self.conns[i];
        loop {
            m.next_pid = m.next_pid.wrapping_add(1).max(1);
            if !m.waiting.contains_key(&m.next_pid) {
                m.waiting.insert(m.next_pid, answer);
                return PacketId(m.next_pid);
            }
        }
    }

    pub(super) fn apply(&mut self, op: &Op) {
        match *op {
            Op::Connect { client, shard, v5, clean, keep_alive_s, expiry_s, will } => {
                let id = format!("c{}", client % CLIENTS);
                let shard = shard as u16 % self.sim.shards.len() as u16;
                let protocol = if v5 { V5 } else { V3 };
                let c = self.sim.connect_with(shard, protocol, |k| {
                    k.client_id = &id;
                    k.clean_start = clean;
                    k.keep_alive_s = keep_alive_s as u16 % 30;
                    if v5 && expiry_s > 0 {
                        k.properties.session_expiry_interval_s = Some(expiry_s as u32);
                    }
                    k.will = will.map(|(topic, q, retain)| Will {
                        topic: TOPICS[topic as usize % TOPICS.len()],
                        payload: b"will",
                        qos: qos(q),
                        retain,
                        properties: Properties {
                            will_delay_interval_s: (v5 && expiry_s % 2 == 1).then_some(expiry_s as u32 / 16),
                            ..Properties::default()
                        },
                    });
                });
                let prev = self.current[(client % CLIENTS) as usize];
                self.conns.push(ConnModel {
                    c,
                    prev,
                    connack: false,
                    unacked: VecDeque::new(),
                    in_flight: BTreeSet::new(),
                    recd: BTreeSet::new(),
                    waiting: BTreeMap::new(),
                    next_pid: 0,
                });
                self.current[(client % CLIENTS) as usize] = Some(self.conns.len() - 1);
            }
            Op::Subscribe { client, filter, qos: q } => {
                let Some(i) = self.live(client) else { return };
                let packet_id = self.pid(i, Answer::SubAck);
                let opts = SubOptions { qos: qos(q), ..SubOptions::default() };
                let filters = vec![(FILTERS[filter as usize % FILTERS.len()], opts)];
                self.send(
                    i,
                    &Packet::Subscribe(Subscribe { packet_id, filters, properties: Properties::default() }),
                );
            }
            Op::Unsubscribe { client, filter } => {
                let Some(i) = self.live(client) else { return };
                let packet_id = self.pid(i, Answer::UnsubAck);
                let filters = vec![FILTERS[filter as usize % FILTERS.len()]];
                self.send(
                    i,
                    &Packet::Unsubscribe(Unsubscribe {
                        packet_id,
                        filters,
                        properties: Properties::default(),
                    }),
                );
            }
            Op::Publish { client, topic, qos: q, retain } => {
                let Some(i) = self.live(client) else { return };
                let qos = qos(q);
                let packet_id = match qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => Some(self.pid(i, Answer::PubAck)),
                    QoS::ExactlyOnce => Some(self.pid(i, Answer::PubRec)),
                };
                let p = Publish {
                    dup: false,
                    qos,
                    retain,
                    topic: TOPICS[topic as usize % TOPICS.len()],
                    packet_id,
                    payload: b"m",
                    properties: Properties::default(),
                };
                self.send(i, &Packet::Publish(p));
            }
            Op::Ack { client, n } => {
                let Some(i) = self.live(client) else { return };
                for _ in 0..n % 8 {
                    let Some((pid, qos)) = self.conns[i].unacked.pop_front() else { break };
                    if qos == QoS::AtLeastOnce {
                        self.conns[i].in_flight.remove(&pid);
                        self.send(i, &Packet::PubAck(Ack::new(PacketId(pid), ReasonCode::SUCCESS)));
                    } else {
                        self.conns[i].recd.insert(pid);
                        self.send(i, &Packet::PubRec(Ack::new(PacketId(pid), ReasonCode::SUCCESS)));
                    }
                }
            }
            Op::Ping { client } => {
                if let Some(i) = self.live(client) {
                    self.send(i, &Packet::PingReq);
                }
            }
            Op::Disconnect { client } => {
                if let Some(i) = self.live(client) {
                    self.send(i, &Packet::Disconnect(Disconnect::default()));
                }
            }
            Op::Drop { client } => {
                if let Some(i) = self.live(client) {
                    self.sim.drop_conn(self.conns[i].c);
                }
            }
            Op::Advance { ms } => self.sim.advance(Duration::from_millis(ms as u64 % 20_000)),
            Op::HoldMesh(hold) => {
                self.sim.deliver_mesh = !hold;
                self.sim.run();
            }
            Op::Crash => {
                if self.durable {
                    self.sim.crash_and_restart();
                }
            }
        }
        self.drain();
    }

    /// Reads everything every connection received, answering PUBREC/PUBREL as a client does, until
    /// nothing more arrives; checks the per-packet invariants.
    fn drain(&mut self) {
        loop {
            let mut read = false;
            for i in 0..self.conns.len() {
                while self.sim.has_packet(self.conns[i].c) {
                    read = true;
                    self.read_one(i);
                }
            }
            if !read {
                return;
            }
        }
    }

    fn read_one(&mut self, i: usize) {
        let c = self.conns[i].c;
        // Decoding is checked by `pop` (it panics on a malformed packet).
        let pkt = self.sim.pop(c, |p| match p {
            Packet::ConnAck(a) => Got::ConnAck(a.session_present),
            Packet::Publish(m) => Got::Publish(m.qos, m.packet_id.map(|p| p.0)),
            Packet::PubAck(a) => Got::Answer(Answer::PubAck, a.packet_id.0, a.reason),
            Packet::PubRec(a) => Got::Answer(Answer::PubRec, a.packet_id.0, a.reason),
            Packet::PubComp(a) => Got::Answer(Answer::PubComp, a.packet_id.0, a.reason),
            Packet::SubAck(a) => Got::Answer(Answer::SubAck, a.packet_id.0, ReasonCode::SUCCESS),
            Packet::UnsubAck(a) => Got::Answer(Answer::UnsubAck, a.packet_id.0, ReasonCode::SUCCESS),
            Packet::PubRel(a) => Got::PubRel(a.packet_id.0),
            Packet::PingResp | Packet::Disconnect(_) => Got::Other,
            other => panic!("the broker sent a client {other:?}"),
        });
        // A resumed session still holds the QoS 2 deliveries its client PUBREC'd (their PUBRELs are
        // resent, their ids still in use).
        let carried = match (pkt_session_present(&pkt), self.conns[i].prev) {
            (true, Some(p)) => self.conns[p].recd.clone(),
            _ => BTreeSet::new(),
        };
        let m = &mut self.conns[i];
        match pkt {
            Got::ConnAck(_) => {
                assert!(!m.connack, "connection {c}: a second CONNACK");
                m.connack = true;
                m.in_flight = carried.clone();
                m.recd = carried;
            }
            Got::Other => assert!(m.connack, "connection {c}: a packet before CONNACK"),
            Got::Publish(q, pid) => {
                assert!(m.connack, "connection {c}: PUBLISH before CONNACK");
                if let Some(pid) = pid {
                    assert!(
                        m.in_flight.insert(pid),
                        "connection {c}: PUBLISH with packet id {pid} still in flight"
                    );
                    m.unacked.push_back((pid, q));
                }
            }
            Got::PubRel(pid) => {
                assert!(m.recd.remove(&pid), "connection {c}: PUBREL {pid} for no PUBREC'd delivery");
                m.in_flight.remove(&pid);
                self.send(i, &Packet::PubComp(Ack::new(PacketId(pid), ReasonCode::SUCCESS)));
            }
            Got::Answer(answer, pid, reason) => {
                assert!(m.connack, "connection {c}: {answer:?} before CONNACK");
                let expected = m.waiting.remove(&pid);
                assert_eq!(
                    expected,
                    Some(answer),
                    "connection {c}: {answer:?} {pid} answers nothing it sent"
                );
                // A PUBREC with a failure code ends the exchange; otherwise the client releases.
                if answer == Answer::PubRec && !reason.is_error() {
                    m.waiting.insert(pid, Answer::PubComp);
                    self.send(i, &Packet::PubRel(Ack::new(PacketId(pid), ReasonCode::SUCCESS)));
                }
            }
        }
    }

    /// Releases the mesh, acks every delivery and lets time pass (publisher pauses end, timers fire) until
    /// nothing moves; then every packet of a connection still open has had its answer.
    pub(super) fn settle(&mut self) {
        self.sim.deliver_mesh = true;
        self.sim.run();
        self.drain();
        for _ in 0..20 {
            for client in 0..CLIENTS {
                self.apply(&Op::Ack { client, n: 7 });
                // Keeps connections with a keep alive open, so their answers are checked too.
                self.apply(&Op::Ping { client });
            }
            self.sim.advance(Duration::from_millis(1100));
            self.drain();
        }
        for m in &self.conns {
            if !self.sim.clients[m.c].closed {
                assert!(m.waiting.is_empty(), "connection {}: never answered: {:?}", m.c, m.waiting);
            }
        }
    }
}

fn pkt_session_present(g: &Got) -> bool {
    matches!(g, Got::ConnAck(true))
}

enum Got {
    ConnAck(bool),
    Publish(QoS, Option<u16>),
    Answer(Answer, u16, ReasonCode),
    PubRel(u16),
    Other,
}
