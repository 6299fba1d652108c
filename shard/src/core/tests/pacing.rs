//! Retained messages after a SUBACK go out paced by flow control ("Node hardening", memory that only
//! grows): a subscription to `#` over many retained messages must not queue them all at once.

use std::collections::HashSet;
use std::time::Duration;

use shardmq_wire::{Ack, Packet, PacketId, QoS, ReasonCode};

use super::sim::*;
use crate::io::Core;

/// 50,000 retained messages, a subscriber to `#` with Receive Maximum 10 that acknowledges a window at a
/// time: the core never queues more than a batch beyond the window, and every retained message arrives
/// exactly once.
#[test]
fn retained_flood_is_paced_by_the_receive_window() {
    const N: usize = 50_000;
    let mut sim = Sim::new(1);
    let (p, _) = sim.connect(0, V5, "pub", true);
    for i in 0..N {
        sim.publish(
            p,
            &format!("r/{}/{}", i / 1000, i % 1000),
            &(i as u32).to_be_bytes(),
            QoS::AtLeastOnce,
            true,
            1,
        );
        sim.pop(p, |_| ());
    }
    assert_eq!(sim.shards[0].retained_count(), N);
    let s = sim.connect_with(0, V5, |k| {
        k.client_id = "slow";
        k.properties.receive_maximum = Some(10);
    });
    sim.pop(s, |_| ());
    sim.subscribe(s, "#", QoS::AtLeastOnce);
    let mut seen = HashSet::with_capacity(N);
    let mut max_queued = 0;
    let mut rounds = 0;
    while sim.has_packet(s) {
        rounds += 1;
        assert!(rounds <= N, "no progress");
        max_queued = max_queued.max(sim.shards[0].queued_for("slow"));
        let mut window = Vec::new();
        while sim.has_packet(s) {
            let (topic, payload, qos, retain, _, pid) = sim.pop_publish(s);
            assert!(retain && qos == QoS::AtLeastOnce);
            assert!(seen.insert(topic.clone()), "{topic} delivered twice");
            let i = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
            assert_eq!(topic, format!("r/{}/{}", i / 1000, i % 1000));
            window.push(pid.unwrap());
        }
        assert!(window.len() <= 10, "{} in flight past Receive Maximum 10", window.len());
        // A slow client: the window's acknowledgements come later, one at a time.
        sim.advance(Duration::from_millis(1));
        for pid in window {
            sim.send(s, &Packet::PubAck(Ack::new(PacketId(pid), ReasonCode::SUCCESS)));
        }
    }
    assert_eq!(seen.len(), N, "every retained message exactly once");
    assert!(max_queued <= 64, "{max_queued} queued at once");
    assert_eq!(sim.shards[0].retained_owed_for("slow"), 0);
    let c = sim.shards[0].counters();
    assert_eq!(c.dropped_queue_full + c.dropped_queue_bytes, 0);
}

/// QoS 0 retained messages to a socket that is full wait for it to drain rather than being dropped as
/// live QoS 0 traffic to a blocked socket is; then they go out a batch per loop iteration (timer).
#[test]
fn qos0_retained_wait_for_a_blocked_socket() {
    const N: usize = 1000;
    let mut sim = Sim::new(1);
    let (p, _) = sim.connect(0, V5, "pub", true);
    for i in 0..N {
        sim.publish(p, &format!("r/{i}"), b"x", QoS::AtMostOnce, true, 0);
    }
    let (s, _) = sim.connect(0, V5, "sub", true);
    let conn = sim.clients[s].conn;
    let now = sim.now;
    sim.shards[0].handle_backpressure(conn, true, now);
    sim.subscribe(s, "r/#", QoS::AtMostOnce);
    sim.advance(Duration::from_millis(1));
    assert!(!sim.has_packet(s), "sent to a blocked socket");
    assert_eq!(sim.shards[0].retained_owed_for("sub"), N);
    sim.shards[0].handle_backpressure(conn, false, now);
    let mut seen = HashSet::new();
    for _ in 0..N {
        sim.advance(Duration::from_millis(1));
        while sim.has_packet(s) {
            let (topic, ..) = sim.pop_publish(s);
            assert!(seen.insert(topic.clone()), "{topic} twice");
        }
        if seen.len() == N {
            break;
        }
    }
    assert_eq!(seen.len(), N);
    assert_eq!(sim.shards[0].counters().dropped_qos0, 0);
}
