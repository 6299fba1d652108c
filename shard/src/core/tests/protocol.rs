//! Protocol details found by outside test suites: future protocol levels, client-sent Subscription
//! Identifiers, one copy per overlapping subscription, packet ids and the inbound QoS 2 limit.

use shardmq_wire::{Ack, Packet, PacketId, Properties, Publish, QoS, ReasonCode, SubOptions};

use super::sim::*;
use crate::core::*;

#[test]
fn a_future_protocol_level_gets_a_v5_connack_0x84_then_the_close() {
    let mut sim = Sim::new(1);
    let c = sim.open(0, V5);
    // CONNECT, protocol "MQTT" level 99, clean start, keep alive 60, client id "x".
    let body = [0, 4, b'M', b'Q', b'T', b'T', 99, 0x02, 0, 60, 0, 1, b'x'];
    let mut bytes = vec![0x10, body.len() as u8];
    bytes.extend_from_slice(&body);
    sim.send_bytes(c, &bytes);
    // A v5 CONNACK: flags, reason 0x84, then properties (a 3.1.1 one is exactly [0x20, 2, 0, 1]).
    let rx = &sim.clients[c].rx;
    assert!(rx.len() > 4 && rx[0] == 0x20 && rx[2] == 0 && rx[3] == 0x84, "{rx:x?}");
    sim.pop(c, |p| {
        assert!(matches!(p, Packet::ConnAck(a) if a.reason == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION))
    });
    assert!(sim.clients[c].closed);
    // Level 3 under the 3.1.1 name is older, not newer: the 3.1.1 return code 1.
    let c = sim.open(0, V3);
    let body = [0, 4, b'M', b'Q', b'T', b'T', 3, 0x02, 0, 60, 0, 1, b'y'];
    let mut bytes = vec![0x10, body.len() as u8];
    bytes.extend_from_slice(&body);
    sim.send_bytes(c, &bytes);
    assert_eq!(sim.clients[c].rx, [0x20, 2, 0, 1]);
    assert!(sim.clients[c].closed);
}

#[test]
fn a_publish_carrying_a_subscription_identifier_is_a_protocol_error() {
    let mut sim = Sim::new(1);
    let (s, _) = sim.connect(0, V5, "watcher", true);
    sim.subscribe(s, "t", QoS::AtMostOnce);
    let (c, _) = sim.connect(0, V5, "liar", true);
    let mut properties = Properties::default();
    properties.subscription_identifiers.push(5);
    let p = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t",
        packet_id: None,
        payload: b"x",
        properties,
    };
    sim.send(c, &Packet::Publish(p));
    sim.pop(c, |p| assert!(matches!(p, Packet::Disconnect(d) if d.reason == ReasonCode::PROTOCOL_ERROR)));
    assert!(sim.clients[c].closed);
    assert!(!sim.has_packet(s), "the refused publish must not be routed");
}

/// A client with two overlapping subscriptions (`ov/#` QoS 1 id 1, `ov/+` QoS 2 id 2) and a publisher.
fn overlapping(sim: &mut Sim, protocol: shardmq_wire::Protocol, id: &str, clean: bool) -> C {
    let (s, _) = sim.connect(0, protocol, id, clean);
    for (filter, qos, sub_id) in [("ov/#", QoS::AtLeastOnce, 1), ("ov/+", QoS::ExactlyOnce, 2)] {
        let id = protocol.is_v5().then_some(sub_id);
        sim.subscribe_opts(s, filter, SubOptions { qos, ..Default::default() }, id);
        sim.pop(s, |p| assert!(matches!(p, Packet::SubAck(_))));
    }
    s
}

/// Pops a PUBLISH with its subscription identifiers: (payload, qos, packet id, ids).
fn pop_with_ids(sim: &mut Sim, c: C) -> (Vec<u8>, QoS, Option<u16>, Vec<u32>) {
    sim.pop(c, |p| match p {
        Packet::Publish(p) => (
            p.payload.to_vec(),
            p.qos,
            p.packet_id.map(|i| i.0),
            p.properties.subscription_identifiers.clone(),
        ),
        p => panic!("expected PUBLISH, got {p:?}"),
    })
}

#[test]
fn overlapping_subscriptions_get_one_copy_each_with_their_own_qos_and_identifier() {
    for protocol in [V3, V5] {
        let mut sim = Sim::new(2);
        let s = overlapping(&mut sim, protocol, &id_on(1, 2, "ov"), true);
        let (p, _) = sim.connect(0, protocol, &id_on(0, 2, "pub"), true);
        sim.publish(p, "ov/a", b"both", QoS::ExactlyOnce, false, 1);
        let mut got = [pop_with_ids(&mut sim, s), pop_with_ids(&mut sim, s)];
        assert!(!sim.has_packet(s), "{protocol:?}: two matching subscriptions, two copies");
        got.sort_by_key(|g| g.1);
        let ids = |n: u32| if protocol.is_v5() { vec![n] } else { vec![] };
        assert_eq!((got[0].1, &got[0].3), (QoS::AtLeastOnce, &ids(1)), "{protocol:?}");
        assert_eq!((got[1].1, &got[1].3), (QoS::ExactlyOnce, &ids(2)), "{protocol:?}");
        assert_ne!(got[0].2, got[1].2, "each copy has its own packet id");
        // A topic only `ov/#` matches arrives once.
        sim.publish(p, "ov/a/b", b"one", QoS::ExactlyOnce, false, 2);
        let one = pop_with_ids(&mut sim, s);
        assert_eq!((one.1, one.3), (QoS::AtLeastOnce, ids(1)));
        assert!(!sim.has_packet(s));
    }
}

#[test]
fn each_copy_of_a_message_for_a_persistent_session_is_acknowledged_on_its_own_across_a_crash() {
    let mut sim = Sim::durable(1, Config::default());
    let s = overlapping(&mut sim, V5, "ov-durable", false);
    let (p, _) = sim.connect(0, V5, "pub", true);
    sim.publish(p, "ov/a", b"both", QoS::AtLeastOnce, false, 1);
    let a = pop_with_ids(&mut sim, s);
    let b = pop_with_ids(&mut sim, s);
    assert_eq!((a.1, b.1), (QoS::AtLeastOnce, QoS::AtLeastOnce), "capped by the message's QoS 1");
    // Only the first copy is acknowledged: the second must come back after the crash, and only it.
    sim.send(s, &Packet::PubAck(Ack::new(PacketId(a.2.unwrap()), ReasonCode::SUCCESS)));
    sim.crash_and_restart();
    let c = sim.connect_with(0, V5, |k| {
        k.client_id = "ov-durable";
        k.clean_start = false;
        k.properties.session_expiry_interval_s = Some(3600);
    });
    assert!(sim.pop_connack(c));
    let again = pop_with_ids(&mut sim, c);
    assert_eq!((again.2, again.3), (b.2, b.3), "the unacknowledged copy, with its packet id and identifier");
    assert!(!sim.has_packet(c), "the acknowledged copy must not come back");
}

#[test]
fn a_packet_id_is_never_reused_while_its_message_is_in_flight() {
    let mut sim = Sim::with(1, Config { max_inflight: 2, max_queued: 4, ..Config::default() });
    let (s, _) = sim.connect(0, V3, "stuck", true);
    sim.subscribe(s, "t", QoS::AtLeastOnce);
    let (p, _) = sim.connect(0, V3, "pub", true);
    sim.publish(p, "t", b"never acked", QoS::AtLeastOnce, false, 1);
    sim.pop(p, |_| ());
    let stuck = sim.pop_publish(s).5.unwrap();
    // 70,000 more messages, each acknowledged: the id counter comes round past the stuck one.
    for i in 0..70_000u32 {
        sim.publish(p, "t", &i.to_be_bytes(), QoS::AtLeastOnce, false, 2);
        sim.pop(p, |_| ());
        let (_, payload, _, _, _, pid) = sim.pop_publish(s);
        assert_eq!(payload, i.to_be_bytes());
        let pid = pid.unwrap();
        assert_ne!(pid, stuck, "message {i} reused the packet id of a message still in flight");
        sim.send(s, &Packet::PubAck(Ack::new(PacketId(pid), ReasonCode::SUCCESS)));
    }
    assert!(!sim.has_packet(s));
}

#[test]
fn a_v311_client_cannot_hold_more_unreleased_qos2_ids_than_the_inbound_limit() {
    // 3.1.1 clients were never told a Receive Maximum: they get the looser bound, not max_inflight.
    let limit = crate::core::conn::V311_INBOUND_QOS2_MAX as u16;
    let mut sim = Sim::with(1, Config { max_inflight: 4, ..Config::default() });
    let (p, _) = sim.connect(0, V3, "hoarder", true);
    for pid in 1..=limit {
        sim.publish(p, "t", b"x", QoS::ExactlyOnce, false, pid);
        sim.pop(p, |a| assert!(matches!(a, Packet::PubRec(_))));
    }
    // A resend of a held id is not a new one.
    sim.publish(p, "t", b"x", QoS::ExactlyOnce, false, 2);
    sim.pop(p, |a| assert!(matches!(a, Packet::PubRec(_))));
    assert!(!sim.clients[p].closed);
    sim.publish(p, "t", b"x", QoS::ExactlyOnce, false, limit + 1);
    assert!(sim.clients[p].closed, "one unreleased id over the limit");
    assert!(!sim.has_packet(p), "3.1.1 has no packet to say why");
}
