//! State that must stay bounded by what is live: timers, round-robin positions, expired retained
//! messages, queued bytes, subscriptions ("Node hardening", memory that only grows).

use std::time::Duration;

use shardmq_wire::{Packet, PacketId, Properties, Publish, QoS, SubOptions, Subscribe, Unsubscribe, Will};

use super::sim::*;
use crate::core::Config;

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

/// A retained message with expiry 1 s, published to `topic`.
fn publish_expiring_retained(sim: &mut Sim, c: C, topic: &str) {
    let properties = Properties { message_expiry_interval_s: Some(1), ..Properties::default() };
    let p = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: true,
        topic,
        packet_id: None,
        payload: b"short-lived",
        properties,
    };
    sim.send(c, &Packet::Publish(p));
}

/// 1,000 retained messages that expire after 1 s are gone from every shard's replica 2 s later, without
/// anyone subscribing to them; one without expiry stays.
#[test]
fn expired_retained_messages_are_evicted_on_every_shard() {
    let mut sim = Sim::new(3);
    let (p, _) = sim.connect(0, V5, &id_on(0, 3, "pub"), true);
    for i in 0..1000 {
        publish_expiring_retained(&mut sim, p, &format!("r/{i}"));
    }
    sim.publish(p, "keep", b"forever", QoS::AtMostOnce, true, 0);
    for s in &sim.shards {
        assert_eq!(s.retained_count(), 1001);
    }
    sim.advance(Duration::from_secs(2));
    for s in &sim.shards {
        assert_eq!(s.retained_count(), 1, "shard {:?} keeps expired retained messages", s.id());
    }
}

/// An expired retained message evicted from memory does not come back from the log after a restart.
#[test]
fn evicted_retained_message_stays_gone_after_restart() {
    let mut sim = Sim::durable(2, Default::default());
    let (p, _) = sim.connect(0, V5, &id_on(0, 2, "pub"), true);
    for i in 0..10 {
        publish_expiring_retained(&mut sim, p, &format!("r/{i}"));
    }
    sim.advance(Duration::from_secs(2));
    // Before the first timer pass: not even briefly do the restarted shards hold them.
    sim.crash_and_boot_after(Duration::ZERO);
    for s in &sim.shards {
        assert_eq!(s.retained_count(), 0, "shard {:?} restored expired retained messages", s.id());
    }
}

/// Replacing one retained message (with an expiry) 10,000 times keeps one expiry entry live, and the
/// expiry index bounded.
#[test]
fn replaced_retained_messages_leave_no_expiry_entries() {
    let mut sim = Sim::new(1);
    let (p, _) = sim.connect(0, V5, "pub", true);
    for _ in 0..10_000 {
        publish_expiring_retained(&mut sim, p, "same");
    }
    assert_eq!(sim.shards[0].retained_count(), 1);
    let entries = sim.shards[0].retained_expiry_count();
    assert!(entries <= 64, "{entries} expiry entries for one retained message");
}

/// An offline session's queue holds at most `max_queued_bytes` of topic + payload: the oldest messages
/// are dropped first (counted apart from count-bound drops), the newest are delivered on reconnect.
#[test]
fn offline_queue_is_bounded_in_bytes() {
    let cfg = Config { max_queued_bytes: 10 * 1024, ..Config::default() };
    let mut sim = Sim::with(1, cfg);
    let (s, _) = sim.connect(0, V5, "sub", false);
    sim.subscribe(s, "t", QoS::AtLeastOnce);
    sim.drop_conn(s);
    let (p, _) = sim.connect(0, V5, "pub", true);
    // 100 messages of 1 KiB + the 1-byte topic: 10 fit.
    for i in 0..100u16 {
        let payload = [i as u8; 1024];
        sim.publish(p, "t", &payload, QoS::AtLeastOnce, false, i + 1);
        sim.pop(p, |_| ());
    }
    let c = sim.shards[0].counters();
    assert_eq!(c.dropped_queue_bytes, 91, "the oldest 91 dropped for bytes");
    assert_eq!(c.dropped_queue_full, 0, "the count bound (1000) was not reached");
    let (s, present) = sim.connect(0, V5, "sub", false);
    assert!(present);
    let mut got = Vec::new();
    while sim.has_packet(s) {
        got.push(sim.pop_publish(s).1[0]);
    }
    assert_eq!(got, (91..100).collect::<Vec<u8>>());
}

/// An online subscriber that stops reading congests its publisher once its queue holds half the byte
/// bound, though far below the message-count high-water mark: the publisher is paused.
#[test]
fn queued_bytes_pause_publishers_of_an_online_subscriber() {
    let cfg = Config { max_queued_bytes: 64 * 1024, ..Config::default() };
    let mut sim = Sim::with(1, cfg);
    let (s, _) = sim.connect(0, V5, "sub", true);
    sim.subscribe(s, "t", QoS::AtLeastOnce);
    let (p, _) = sim.connect(0, V5, "pub", true);
    // The subscriber never acknowledges: 64 fill its window, the rest queue.
    let payload = [7u8; 4096];
    let mut pid = 1;
    while !sim.clients[p].paused && pid < 200 {
        sim.publish(p, "t", &payload, QoS::AtLeastOnce, false, pid);
        pid += 1;
    }
    assert!(sim.clients[p].paused, "publisher not paused after {pid} messages");
    // 64 in flight + 8 queued (32 KiB, half the byte bound) + the one that congested.
    assert!(pid <= 64 + 10, "paused only after {pid} messages");
    assert_eq!(sim.shards[0].counters().publisher_pauses, 1);
}

/// `max_session_expiry_s` caps MQTT 3.1.1 persistent sessions too (which ask for no expiry), as
/// Mosquitto's `persistent_client_expiration` does.
#[test]
fn max_session_expiry_ends_v311_persistent_sessions() {
    let cfg = Config { max_session_expiry_s: 60, ..Config::default() };
    let mut sim = Sim::with(1, cfg);
    let (c, _) = sim.connect(0, V3, "old-client", false);
    sim.subscribe(c, "t", QoS::AtLeastOnce);
    sim.drop_conn(c);
    sim.advance(Duration::from_secs(59));
    assert_eq!(sim.shards[0].session_count(), 1, "kept within the cap");
    sim.advance(Duration::from_secs(2));
    assert_eq!(sim.shards[0].session_count(), 0, "ended after the cap");
    let (_, present) = sim.connect(0, V3, "old-client", false);
    assert!(!present);
}

/// A persistent session stored before `--max-session-expiry` was set (3.1.1: no expiry) gets the cap
/// when the node restarts with it, instead of living until its client comes back.
#[test]
fn max_session_expiry_applies_to_sessions_restored_from_the_log() {
    let mut sim = Sim::durable(1, Config::default());
    let (c, _) = sim.connect(0, V3, "old-client", false);
    sim.subscribe(c, "t", QoS::AtLeastOnce);
    sim.drop_conn(c);
    sim.set_config(Config { max_session_expiry_s: 60, ..Config::default() });
    sim.crash_and_restart();
    assert_eq!(sim.shards[0].session_count(), 1, "restored");
    sim.advance(Duration::from_secs(61));
    assert_eq!(sim.shards[0].session_count(), 0, "ended after the cap");
    sim.crash_and_restart();
    assert_eq!(sim.shards[0].session_count(), 0, "its end is in the log");
}

/// Sends one SUBSCRIBE with `filters` (QoS 1) and returns the SUBACK's reason codes.
fn subscribe_many(sim: &mut Sim, c: C, filters: &[&str]) -> Vec<u8> {
    let opts = SubOptions { qos: QoS::AtLeastOnce, ..Default::default() };
    let s = Subscribe {
        packet_id: PacketId(5),
        filters: filters.iter().map(|f| (*f, opts)).collect(),
        properties: Properties::default(),
    };
    sim.send(c, &Packet::Subscribe(s));
    sim.pop(c, |p| match p {
        Packet::SubAck(a) => a.reasons.iter().map(|r| r.0).collect(),
        other => panic!("expected SUBACK, got {other:?}"),
    })
}

/// `max_subscriptions` refuses new filters past the cap (0x97 for MQTT 5, 0x80 for 3.1.1) and nothing
/// is delivered for them; re-subscribing to a held filter and subscribing after an unsubscribe work.
#[test]
fn max_subscriptions_refuses_filters_past_the_cap() {
    let cfg = Config { max_subscriptions: 3, ..Config::default() };
    let mut sim = Sim::with(1, cfg);
    let (c, _) = sim.connect(0, V5, "v5", true);
    assert_eq!(subscribe_many(&mut sim, c, &["a", "b", "c", "d"]), [1, 1, 1, 0x97]);
    assert_eq!(subscribe_many(&mut sim, c, &["a", "e"]), [1, 0x97], "a is held: its options may change");
    let (p, _) = sim.connect(0, V5, "pub", true);
    sim.publish(p, "d", b"x", QoS::AtMostOnce, false, 0);
    assert!(!sim.has_packet(c), "nothing for a refused filter");
    sim.send(
        c,
        &Packet::Unsubscribe(Unsubscribe {
            packet_id: PacketId(6),
            filters: vec!["b"],
            properties: Properties::default(),
        }),
    );
    sim.pop(c, |_| ());
    assert_eq!(subscribe_many(&mut sim, c, &["d"]), [1]);
    let (v3, _) = sim.connect(0, V3, "v3", true);
    assert_eq!(subscribe_many(&mut sim, v3, &["a", "b", "c", "d"]), [1, 1, 1, 0x80]);
}

/// A session with many subscriptions (its filter set changes representation past a few): duplicates
/// are still recognised, unsubscribes find their filters, and deliveries are one per subscription.
#[test]
fn many_subscriptions_keep_duplicate_and_unsubscribe_semantics() {
    let mut sim = Sim::new(1);
    let (c, _) = sim.connect(0, V5, "many", true);
    let filters: Vec<String> = (0..40).map(|i| format!("f/{i}")).collect();
    let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
    assert_eq!(subscribe_many(&mut sim, c, &refs), vec![1; 40]);
    // Subscribing again to all: no second subscription (one copy per message).
    assert_eq!(subscribe_many(&mut sim, c, &refs), vec![1; 40]);
    let (p, _) = sim.connect(0, V5, "pub", true);
    sim.publish(p, "f/7", b"x", QoS::AtMostOnce, false, 0);
    sim.pop_publish(c);
    assert!(!sim.has_packet(c), "one copy");
    // Unsubscribe all but two (back below the threshold), then the rest still work.
    let gone: Vec<&str> = refs[2..].to_vec();
    sim.send(
        c,
        &Packet::Unsubscribe(Unsubscribe {
            packet_id: PacketId(7),
            filters: gone.clone(),
            properties: Properties::default(),
        }),
    );
    sim.pop(c, |p| match p {
        Packet::UnsubAck(a) => assert!(a.reasons.iter().all(|r| r.0 == 0), "{a:?}"),
        other => panic!("{other:?}"),
    });
    sim.publish(p, "f/7", b"x", QoS::AtMostOnce, false, 0);
    assert!(!sim.has_packet(c));
    sim.publish(p, "f/1", b"x", QoS::AtMostOnce, false, 0);
    sim.pop_publish(c);
    assert_eq!(subscribe_many(&mut sim, c, &["f/0", "f/1", "f/2"]), [1, 1, 1]);
}
