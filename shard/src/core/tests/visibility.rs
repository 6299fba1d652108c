//! Subscription visibility inside a node: a SUBSCRIBE processed on one shard is matched by a publish routed
//! on another shard afterwards, even while the interest announcement is still in the mesh.

use shardmq_wire::{Packet, QoS, SubOptions};

use super::sim::*;
use crate::core::*;

/// Pops every packet a client has; returns (PUBLISH payloads, whether a SUBACK was among them).
fn drain(sim: &mut Sim, c: C) -> (Vec<Vec<u8>>, bool) {
    let (mut payloads, mut suback) = (Vec::new(), false);
    while sim.has_packet(c) {
        sim.pop(c, |p| match p {
            Packet::Publish(p) => payloads.push(p.payload.to_vec()),
            Packet::SubAck(_) => suback = true,
            p => panic!("unexpected {p:?}"),
        });
    }
    (payloads, suback)
}

#[test]
fn a_publish_right_after_a_subscribe_on_another_shard_reaches_it_before_the_announcement_does() {
    let mut sim = Sim::new(3);
    let (p, _) = sim.connect(0, V5, &id_on(0, 3, "pub"), true);
    let mut misses = Vec::new();
    for round in 0..1000u32 {
        let shard = 1 + (round % 2) as u16;
        let (s, _) = sim.connect(shard, V5, &id_on(shard, 3, &format!("s{round}")), true);
        let topic = format!("vis/{round}/x");
        let filter = match round % 3 {
            0 => topic.clone(),
            1 => format!("vis/{round}/+"),
            _ => format!("vis/{round}/#"),
        };
        let qos = if round % 2 == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        // The SUBSCRIBE is processed on its shard; its announcement stays in the mesh.
        sim.deliver_mesh = false;
        sim.subscribe_opts(s, &filter, SubOptions { qos, ..Default::default() }, None);
        sim.publish(p, &topic, &round.to_be_bytes(), qos, false, 1);
        sim.deliver_mesh = true;
        sim.run();
        if qos == QoS::AtLeastOnce {
            sim.pop(p, |a| assert!(matches!(a, Packet::PubAck(_)), "{a:?}"));
        }
        let (payloads, suback) = drain(&mut sim, s);
        assert!(suback, "round {round}: no SUBACK");
        if payloads != [round.to_be_bytes().to_vec()] {
            misses.push((round, payloads.len()));
        }
        sim.drop_conn(s);
    }
    assert!(
        misses.is_empty(),
        "{} of 1000 rounds missed or duplicated: {:?}",
        misses.len(),
        &misses[..5.min(misses.len())]
    );
    assert!(!sim.has_packet(p));
}

#[test]
fn a_shard_that_caught_up_gets_only_the_publishes_it_has_subscribers_for() {
    let mut sim = Sim::new(2);
    let (s, _) = sim.connect(1, V5, &id_on(1, 2, "s"), true);
    sim.subscribe(s, "a", QoS::AtMostOnce);
    let (p, _) = sim.connect(0, V5, &id_on(0, 2, "p"), true);
    let before = sim.shards[0].counters().mesh_out;
    sim.publish(p, "b", b"nobody", QoS::AtMostOnce, false, 0);
    assert_eq!(sim.shards[0].counters().mesh_out, before, "the announcement arrived: no forward for b");
}

#[test]
fn an_acknowledgement_waits_for_a_persistent_subscriber_not_yet_announced() {
    let mut sim = Sim::durable(2, Config::default());
    let sub = id_on(1, 2, "durable-sub");
    let (s, _) = sim.connect(1, V3, &sub, false);
    let (p, _) = sim.connect(0, V3, &id_on(0, 2, "pub"), true);
    sim.deliver_mesh = false;
    sim.subscribe_opts(s, "d/t", SubOptions { qos: QoS::AtLeastOnce, ..Default::default() }, None);
    sim.publish(p, "d/t", b"kept", QoS::AtLeastOnce, false, 7);
    assert!(!sim.has_packet(p), "PUBACK before the subscriber's shard stored the message");
    sim.deliver_mesh = true;
    sim.run();
    sim.pop(p, |a| assert!(matches!(a, Packet::PubAck(_)), "{a:?}"));
    sim.crash_and_restart();
    let (s, present) = sim.connect(0, V3, &sub, false);
    assert!(present);
    assert_eq!(drain(&mut sim, s).0, [b"kept".to_vec()], "the acknowledged message survives the crash");
}
