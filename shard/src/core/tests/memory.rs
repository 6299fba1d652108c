//! State that must stay bounded by what is live: timers, round-robin positions, expired retained
//! messages, queued bytes, subscriptions ("Node hardening", memory that only grows).

use std::time::Duration;

use shardmq_wire::{Packet, PacketId, Properties, QoS, Unsubscribe, Will};

use super::sim::*;

/// A persistent session with a day of expiry and an hour of will delay that reconnects 10,000 times
/// leaves a bounded timer heap, and its will and expiry still fire on time after the last drop.
#[test]
fn reconnect_cycles_keep_the_timer_heap_bounded() {
    let mut sim = Sim::new(1);
    // 3.1.1 with keep alive 0: the watcher stays through the simulated day without pinging.
    let (watch, _) = sim.connect(0, V3, "watch", true);
    sim.subscribe(watch, "will", QoS::AtMostOnce);
    let base = sim.shards[0].timer_count();
    for _ in 0..10_000 {
        let c = sim.connect_with(0, V5, |k| {
            k.client_id = "cycler";
            k.clean_start = false;
            k.properties.session_expiry_interval_s = Some(86_400);
            let properties = Properties { will_delay_interval_s: Some(3600), ..Properties::default() };
            k.will = Some(Will {
                topic: "will",
                payload: b"gone",
                qos: QoS::AtMostOnce,
                retain: false,
                properties,
            });
        });
        sim.pop_connack(c);
        sim.drop_conn(c);
        sim.advance(Duration::from_millis(10));
    }
    let timers = sim.shards[0].timer_count();
    assert!(timers <= base + 64, "{timers} timers for one offline session (started with {base})");
    assert_eq!(sim.shards[0].session_count(), 2);
    // The will delay (1 h) passes: the will goes out once; the expiry (1 day) ends the session.
    sim.advance(Duration::from_secs(3600));
    let (topic, payload, ..) = sim.pop_publish(watch);
    assert_eq!((topic.as_str(), payload.as_slice()), ("will", &b"gone"[..]));
    assert!(!sim.has_packet(watch), "one will, not one per cycle");
    assert_eq!(sim.shards[0].session_count(), 2);
    sim.advance(Duration::from_secs(86_400 - 3600));
    assert_eq!(sim.shards[0].session_count(), 1, "the session expired");
    assert!(sim.shards[0].timer_count() <= base + 64);
}

/// 1,000 shared groups, each used once and left: no round-robin position outlives its group on any
/// shard (the publisher's shard keeps one per group it routed to, the member's shard one per group it
/// chose a member in).
#[test]
fn round_robin_positions_go_with_their_groups() {
    let mut sim = Sim::new(2);
    let (m, _) = sim.connect(0, V5, &id_on(0, 2, "member"), true);
    let (p, _) = sim.connect(1, V5, &id_on(1, 2, "pub"), true);
    for g in 0..1000 {
        let filter = format!("$share/g{g}/t");
        sim.subscribe(m, &filter, QoS::AtMostOnce);
        sim.publish(p, "t", b"x", QoS::AtMostOnce, false, 0);
        sim.pop_publish(m);
        sim.send(
            m,
            &Packet::Unsubscribe(Unsubscribe {
                packet_id: PacketId(1),
                filters: vec![&filter],
                properties: Properties::default(),
            }),
        );
        sim.pop(m, |p| assert!(matches!(p, Packet::UnsubAck(_)), "{p:?}"));
    }
    for s in &sim.shards {
        assert_eq!(s.round_robin_counts(), (0, 0), "shard {:?}", s.id());
    }
}
