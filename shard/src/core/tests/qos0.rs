//! QoS 0 under overload: a subscriber whose socket is not draining gets its QoS 0 messages held (within a
//! budget) while its publishers are paused, instead of dropped.

use shardmq_wire::{Packet, QoS};

use super::sim::*;
use crate::core::*;
use crate::io::Core;

/// Marks the subscriber's socket as not draining (the runtime's backpressure report), or draining again.
fn set_blocked(sim: &mut Sim, c: C, blocked: bool) {
    let (shard, conn) = (sim.clients[c].shard, sim.clients[c].conn);
    let now = sim.now;
    sim.shards[shard.index()].handle_backpressure(conn, blocked, now);
    sim.run();
}

fn count_publishes(sim: &mut Sim, c: C) -> usize {
    let mut n = 0;
    while sim.has_packet(c) {
        sim.pop(c, |p| assert!(matches!(p, Packet::Publish(_)), "{p:?}"));
        n += 1;
    }
    n
}

fn dropped_qos0(sim: &Sim) -> u64 {
    sim.shards.iter().map(|s| s.counters().dropped_qos0).sum()
}

#[test]
fn qos0_to_a_subscriber_that_is_not_reading_is_held_while_its_publishers_pause() {
    for cross in [false, true] {
        let mut sim = Sim::new(2);
        let (s, _) = sim.connect(1, V5, &id_on(1, 2, "slow"), true);
        sim.subscribe(s, "f/#", QoS::AtMostOnce);
        let pub_shard = if cross { 0 } else { 1 };
        let pubs: Vec<C> = (0..5)
            .map(|i| sim.connect(pub_shard, V5, &id_on(pub_shard, 2, &format!("p{i}")), true).0)
            .collect();
        set_blocked(&mut sim, s, true);
        for i in 0..300u32 {
            sim.publish(pubs[i as usize % pubs.len()], "f/x", &i.to_be_bytes(), QoS::AtMostOnce, false, 0);
        }
        assert!(sim.clients.iter().any(|c| c.paused), "cross {cross}: the publishers are paused");
        assert_eq!(dropped_qos0(&sim), 0, "cross {cross}: nothing dropped within the budget");
        set_blocked(&mut sim, s, false);
        sim.advance(std::time::Duration::from_millis(1));
        assert_eq!(count_publishes(&mut sim, s), 300, "cross {cross}: every message arrives once it drains");
        assert!(sim.clients.iter().all(|c| !c.paused), "cross {cross}: publishers resume");
    }
}

#[test]
fn past_the_budget_qos0_messages_are_dropped_and_counted() {
    // The floor: 64 KiB of held QoS 0 output.
    let mut sim = Sim::with(1, Config { max_queued_bytes: 64 << 10, ..Config::default() });
    let (s, _) = sim.connect(0, V3, "slow", true);
    sim.subscribe(s, "f/#", QoS::AtMostOnce);
    set_blocked(&mut sim, s, true);
    // One message from each of many publishers: each is paused after its first, so only their number
    // can push past the budget (as a flat-out fan-in's messages in flight do).
    let payload = [7u8; 200];
    let n = 600;
    for i in 0..n {
        let (p, _) = sim.connect(0, V3, &format!("p{i}"), true);
        sim.publish(p, "f/x", &payload, QoS::AtMostOnce, false, 0);
    }
    let dropped = dropped_qos0(&sim);
    assert!(dropped > 0, "600 x 200 B is over the 64 KiB budget");
    set_blocked(&mut sim, s, false);
    let held = count_publishes(&mut sim, s);
    assert_eq!(held as u64 + dropped, n, "every message is delivered or counted");
    assert!(held * 200 <= (64 << 10) + 300, "held {held} messages, over the budget");
}
