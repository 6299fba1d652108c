//! Deterministic harness tests of the core (see `sim` for the harness).

mod auth;
mod driver;
mod durable;
mod gateway;
mod interleave;
mod memory;
mod pacing;
mod protocol;
mod qos0;
mod random;
mod register;
mod sim;
mod subrecords;
mod sys;
mod transfer;
mod visibility;

use std::time::Duration;

use shardmq_wire::{
    encode, Ack, Connect, Disconnect, Packet, PacketId, Properties, QoS, ReasonCode, SubOptions, Will,
};

use super::*;

use self::sim::*;

#[test]
fn connect_returns_connack_with_v5_limits() {
    let mut sim = Sim::new(1);
    let c = sim.connect_with(0, V5, |k| k.client_id = "a");
    sim.pop(c, |p| match p {
        Packet::ConnAck(a) => {
            assert_eq!(a.reason, ReasonCode::SUCCESS);
            assert!(!a.session_present);
            assert_eq!(a.properties.receive_maximum, Some(64));
            assert_eq!(a.properties.topic_alias_maximum, Some(64));
            assert_eq!(a.properties.maximum_packet_size, Some(1024 * 1024));
            assert_eq!(a.properties.server_keep_alive_s, Some(3600), "keep alive 0 is capped");
        }
        p => panic!("{p:?}"),
    });
}

#[test]
fn publish_crosses_shards_only_to_interested_ones() {
    let mut sim = Sim::new(2);
    let sub_id = id_on(1, 2, "sub");
    let pub_id = id_on(0, 2, "pub");
    // The subscriber lands on shard 0 and is handed to its owner, shard 1.
    let (s, _) = sim.connect(0, V3, &sub_id, true);
    assert_eq!(sim.clients[s].shard, ShardId(1));
    assert_eq!(sim.shards[0].counters().handoffs, 1);
    sim.subscribe(s, "a/+", QoS::AtLeastOnce);
    let (p, _) = sim.connect(0, V3, &pub_id, true);
    let before = sim.shards[0].counters().mesh_out;
    sim.publish(p, "b/x", b"nobody", QoS::AtMostOnce, false, 0);
    assert_eq!(sim.shards[0].counters().mesh_out, before, "no interest on shard 1 for b/x");
    sim.publish(p, "a/x", b"hello", QoS::AtLeastOnce, false, 7);
    sim.pop(p, |a| assert!(matches!(a, Packet::PubAck(a) if a.packet_id == PacketId(7))));
    let (topic, payload, qos, retain, _, _) = sim.pop_publish(s);
    assert_eq!(
        (topic.as_str(), payload.as_slice(), qos, retain),
        ("a/x", &b"hello"[..], QoS::AtLeastOnce, false)
    );
}

#[test]
fn suback_waits_for_every_shard_to_learn_the_interest() {
    let mut sim = Sim::new(3);
    let (s, _) = sim.connect(1, V5, &id_on(1, 3, "s"), true);
    sim.deliver_mesh = false;
    sim.subscribe_opts(s, "t", SubOptions::default(), None);
    assert!(!sim.has_packet(s), "SUBACK must wait for the other shards' acknowledgements");
    sim.deliver_mesh = true;
    sim.run();
    sim.pop(s, |p| assert!(matches!(p, Packet::SubAck(_))));
    // A second subscriber on the same shard and filter needs no new announcement.
    let (s2, _) = sim.connect(1, V5, &id_on(1, 3, "s2"), true);
    sim.deliver_mesh = false;
    sim.subscribe_opts(s2, "t", SubOptions::default(), None);
    sim.pop(s2, |p| assert!(matches!(p, Packet::SubAck(_))));
}

#[test]
fn qos1_messages_arrive_in_order_within_the_receive_maximum() {
    let mut sim = Sim::new(2);
    let s = sim.connect_with(0, V5, |k| {
        k.client_id = "slow";
        k.properties.receive_maximum = Some(2);
    });
    sim.pop(s, |_| ());
    sim.subscribe(s, "q", QoS::AtLeastOnce);
    let (p, _) = sim.connect(1, V5, "fast", true);
    for i in 0..5u16 {
        sim.publish(p, "q", &[i as u8], QoS::AtLeastOnce, false, i + 1);
        sim.pop(p, |_| ());
    }
    let a = sim.pop_publish(s);
    let b = sim.pop_publish(s);
    assert_eq!((a.1[0], b.1[0]), (0, 1));
    assert!(!sim.has_packet(s), "only Receive Maximum (2) messages in flight");
    sim.send(s, &Packet::PubAck(Ack::new(PacketId(a.5.unwrap()), ReasonCode::SUCCESS)));
    assert_eq!(sim.pop_publish(s).1[0], 2);
    assert!(!sim.has_packet(s));
}

#[test]
fn qos2_duplicate_publish_is_routed_once() {
    let mut sim = Sim::new(1);
    let (s, _) = sim.connect(0, V3, "sub", true);
    sim.subscribe(s, "x", QoS::ExactlyOnce);
    let (p, _) = sim.connect(0, V3, "pub", true);
    sim.publish(p, "x", b"once", QoS::ExactlyOnce, false, 5);
    sim.publish(p, "x", b"once", QoS::ExactlyOnce, false, 5);
    sim.pop(p, |a| assert!(matches!(a, Packet::PubRec(_))));
    sim.pop(p, |a| assert!(matches!(a, Packet::PubRec(_))));
    sim.send(p, &Packet::PubRel(Ack::new(PacketId(5), ReasonCode::SUCCESS)));
    sim.pop(p, |a| assert!(matches!(a, Packet::PubComp(a) if a.reason == ReasonCode::SUCCESS)));
    let m = sim.pop_publish(s);
    assert_eq!(m.2, QoS::ExactlyOnce);
    assert!(!sim.has_packet(s), "the duplicate must not be delivered");
    // Outbound QoS 2: PUBREC → PUBREL → PUBCOMP completes the exchange.
    sim.send(s, &Packet::PubRec(Ack::new(PacketId(m.5.unwrap()), ReasonCode::SUCCESS)));
    sim.pop(s, |a| assert!(matches!(a, Packet::PubRel(_))));
    sim.send(s, &Packet::PubComp(Ack::new(PacketId(m.5.unwrap()), ReasonCode::SUCCESS)));
}

#[test]
fn unacked_messages_are_resent_with_dup_on_resume() {
    let mut sim = Sim::new(2);
    let id = id_on(1, 2, "persist");
    let (s, present) = sim.connect(1, V3, &id, false);
    assert!(!present);
    sim.subscribe(s, "r", QoS::AtLeastOnce);
    let (p, _) = sim.connect(0, V3, &id_on(0, 2, "p"), true);
    sim.publish(p, "r", b"1", QoS::AtLeastOnce, false, 1);
    let first = sim.pop_publish(s);
    sim.drop_conn(s);
    sim.publish(p, "r", b"2", QoS::AtLeastOnce, false, 2);
    let (s, present) = sim.connect(0, V3, &id, false);
    assert!(present);
    let again = sim.pop_publish(s);
    assert_eq!((again.1.as_slice(), again.4, again.5), (&b"1"[..], true, first.5));
    let queued = sim.pop_publish(s);
    assert_eq!((queued.1.as_slice(), queued.4), (&b"2"[..], false));
}

#[test]
fn retained_messages_replicate_to_every_shard_and_clear() {
    let mut sim = Sim::new(3);
    let (p, _) = sim.connect(0, V3, &id_on(0, 3, "p"), true);
    sim.publish(p, "cfg/a", b"v1", QoS::AtMostOnce, true, 0);
    sim.publish(p, "cfg/a", b"v2", QoS::AtMostOnce, true, 0);
    sim.publish(p, "cfg/b", b"b", QoS::AtMostOnce, true, 0);
    for shard in 0..3 {
        assert_eq!(sim.shards[shard].retained_count(), 2, "replica on shard {shard}");
    }
    let (s, _) = sim.connect(2, V3, &id_on(2, 3, "s"), true);
    sim.subscribe(s, "cfg/a", QoS::AtLeastOnce);
    let m = sim.pop_publish(s);
    assert_eq!((m.1.as_slice(), m.2, m.3), (&b"v2"[..], QoS::AtMostOnce, true));
    sim.publish(p, "cfg/a", b"", QoS::AtMostOnce, true, 0);
    let live = sim.pop_publish(s);
    assert_eq!((live.1.len(), live.3), (0, false), "an empty retained publish reaches subscribers");
    for shard in 0..3 {
        assert_eq!(sim.shards[shard].retained_count(), 1);
    }
}

#[test]
fn shared_group_spreads_messages_evenly_across_shards() {
    let mut sim = Sim::new(2);
    let members: Vec<C> = (0..3)
        .map(|i| {
            let (c, _) = sim.connect(0, V5, &id_on(i % 2, 2, &format!("m{i}")), true);
            sim.subscribe(c, "$share/g/jobs/#", QoS::AtMostOnce);
            c
        })
        .collect();
    let (plain, _) = sim.connect(0, V5, "plain", true);
    sim.subscribe(plain, "jobs/#", QoS::AtMostOnce);
    let (p, _) = sim.connect(1, V5, &id_on(1, 2, "pub"), true);
    for i in 0..30u8 {
        sim.publish(p, "jobs/x", &[i], QoS::AtMostOnce, false, 0);
    }
    let mut counts = vec![0; 3];
    for (i, m) in members.iter().enumerate() {
        while sim.has_packet(*m) {
            sim.pop_publish(*m);
            counts[i] += 1;
        }
    }
    assert_eq!(counts.iter().sum::<i32>(), 30);
    assert_eq!(counts, vec![10, 10, 10], "weighted round robin over 3 members on 2 shards");
    let mut plain_count = 0;
    while sim.has_packet(plain) {
        sim.pop_publish(plain);
        plain_count += 1;
    }
    assert_eq!(plain_count, 30);
    // A member leaves: the others get everything.
    sim.drop_conn(members[0]);
    for i in 0..10u8 {
        sim.publish(p, "jobs/y", &[i], QoS::AtMostOnce, false, 0);
    }
    let mut rest = 0;
    for m in &members[1..] {
        while sim.has_packet(*m) {
            sim.pop_publish(*m);
            rest += 1;
        }
    }
    assert_eq!(rest, 10);
}

#[test]
fn takeover_closes_the_old_connection_with_0x8e() {
    let mut sim = Sim::new(2);
    let id = id_on(0, 2, "dup");
    let (old, _) = sim.connect(0, V5, &id, false);
    let (new, present) = sim.connect(1, V5, &id, false);
    assert!(present);
    sim.pop(old, |p| {
        assert!(matches!(p, Packet::Disconnect(d) if d.reason == ReasonCode::SESSION_TAKEN_OVER))
    });
    assert!(sim.clients[old].closed);
    assert!(!sim.clients[new].closed);
}

#[test]
fn will_is_published_on_abnormal_close_only() {
    let mut sim = Sim::new(2);
    let (s, _) = sim.connect(0, V3, &id_on(0, 2, "watch"), true);
    sim.subscribe(s, "will/#", QoS::AtLeastOnce);
    for (abnormal, name) in [(true, "w1"), (false, "w2")] {
        let c = sim.connect_with(1, V3, |k| {
            k.client_id = name;
            k.will = Some(Will {
                topic: "will/x",
                payload: name.as_bytes(),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
            });
        });
        sim.pop(c, |_| ());
        if abnormal {
            sim.drop_conn(c);
        } else {
            sim.send(c, &Packet::Disconnect(Disconnect::default()));
        }
    }
    assert_eq!(sim.pop_publish(s).1, b"w1");
    assert!(!sim.has_packet(s), "a normal DISCONNECT discards the will");
}

/// A v5 CONNECT that resumes session `id` (expiry `expiry_s`) with a QoS 0 will on "will", delayed
/// `delay_s`.
fn will_session(
    id: &'static str,
    expiry_s: u32,
    delay_s: u32,
    payload: &'static [u8],
) -> impl Fn(&mut Connect<'static>) + Copy {
    move |k| {
        k.client_id = id;
        k.clean_start = false;
        k.properties.session_expiry_interval_s = Some(expiry_s);
        let properties = Properties { will_delay_interval_s: Some(delay_s), ..Properties::default() };
        k.will = Some(Will { topic: "will", payload, qos: QoS::AtMostOnce, retain: false, properties });
    }
}

/// One shard with a "watch" client subscribed to "will", and the session of `connect` connected once and
/// dropped; returns the sim and the watcher.
fn watched_dropped_session(connect: impl Fn(&mut Connect<'static>)) -> (Sim, C) {
    let mut sim = Sim::new(1);
    let (s, _) = sim.connect(0, V5, "watch", true);
    sim.subscribe(s, "will", QoS::AtMostOnce);
    let c = sim.connect_with(0, V5, connect);
    sim.pop(c, |_| ());
    sim.drop_conn(c);
    (sim, s)
}

#[test]
fn a_connect_stamped_after_the_expiry_ends_the_session_before_its_timer_runs() {
    let session = will_session("e", 2, 60, b"ended");
    let (mut sim, s) = watched_dropped_session(session);
    // The clock passes the expiry and a CONNECT is read before the loop's timer pass.
    sim.now += Duration::from_secs(3);
    let c = sim.connect_with(0, V5, session);
    assert!(!sim.pop_connack(c), "a session past its expiry is not resumed");
    assert_eq!(sim.pop_publish(s).1, b"ended", "the session's end published its will");
    sim.advance(Duration::ZERO);
    assert!(!sim.has_packet(s), "the stale timer publishes nothing more");
    assert!(!sim.clients[c].closed);
}

#[test]
fn a_connect_stamped_after_the_will_delay_does_not_cancel_the_will_before_its_timer_runs() {
    let session = will_session("w", 100, 5, b"late");
    let (mut sim, s) = watched_dropped_session(session);
    sim.now += Duration::from_secs(6);
    let c = sim.connect_with(0, V5, session);
    assert!(sim.pop_connack(c), "the session is within its expiry");
    assert_eq!(sim.pop_publish(s).1, b"late", "the will delay had elapsed: the will was due");
    sim.advance(Duration::from_secs(10));
    assert!(!sim.has_packet(s), "published once; the new connection's will is pending while it is connected");
}

#[test]
fn will_delay_is_cancelled_by_a_reconnect_and_fires_otherwise() {
    let will_connect = will_session("w", 100, 5, b"gone");
    let (mut sim, s) = watched_dropped_session(will_connect);
    sim.advance(Duration::from_secs(3));
    assert!(!sim.has_packet(s));
    let c = sim.connect_with(0, V5, will_connect);
    sim.pop(c, |p| assert!(matches!(p, Packet::ConnAck(a) if a.session_present)));
    sim.advance(Duration::from_secs(10));
    assert!(!sim.has_packet(s), "reconnect cancelled the delayed will");
    sim.drop_conn(c);
    sim.advance(Duration::from_secs(6));
    assert_eq!(sim.pop_publish(s).1, b"gone");
}

#[test]
fn keepalive_timeout_closes_after_one_and_a_half_intervals() {
    let mut sim = Sim::new(1);
    let c = sim.connect_with(0, V5, |k| {
        k.client_id = "ka";
        k.keep_alive_s = 10;
    });
    sim.pop(c, |_| ());
    sim.advance(Duration::from_secs(14));
    assert!(!sim.clients[c].closed);
    sim.send(c, &Packet::PingReq);
    sim.pop(c, |p| assert!(matches!(p, Packet::PingResp)));
    sim.advance(Duration::from_secs(14));
    assert!(!sim.clients[c].closed, "the ping reset the timer");
    sim.advance(Duration::from_secs(2));
    assert!(sim.clients[c].closed);
    sim.pop(c, |p| assert!(matches!(p, Packet::Disconnect(d) if d.reason == ReasonCode::KEEP_ALIVE_TIMEOUT)));
}

#[test]
fn connection_without_connect_is_closed_after_the_timeout() {
    let mut sim = Sim::new(1);
    let c = sim.open(0, V3);
    sim.advance(Duration::from_millis(9_999));
    assert!(!sim.clients[c].closed);
    sim.advance(Duration::from_millis(2));
    assert!(sim.clients[c].closed);
}

#[test]
fn session_expiry_ends_an_offline_session() {
    let mut sim = Sim::new(1);
    let c = sim.connect_with(0, V5, |k| {
        k.client_id = "exp";
        k.clean_start = false;
        k.properties.session_expiry_interval_s = Some(10);
    });
    sim.pop(c, |_| ());
    sim.drop_conn(c);
    assert_eq!(sim.shards[0].session_count(), 1);
    sim.advance(Duration::from_secs(11));
    assert_eq!(sim.shards[0].session_count(), 0);
}

#[test]
fn bad_first_packet_and_oversized_header_close_the_connection() {
    let mut sim = Sim::with(1, Config { max_packet_size: 1000, ..Config::default() });
    let c = sim.open(0, V3);
    sim.send(c, &Packet::PingReq);
    assert!(sim.clients[c].closed);
    let (c, _) = sim.connect(0, V5, "big", true);
    // Only the fixed header of a 200 MB PUBLISH: refused before any body arrives.
    sim.send_bytes(c, &[0x30, 0x80, 0x80, 0x80, 0x60]);
    assert!(sim.clients[c].closed);
    sim.pop(c, |p| assert!(matches!(p, Packet::Disconnect(d) if d.reason == ReasonCode::PACKET_TOO_LARGE)));
    let (ok, _) = sim.connect(0, V5, "fine", true);
    assert!(!sim.clients[ok].closed);
}

#[test]
fn max_connections_refuses_cleanly() {
    let mut sim = Sim::with(2, Config { max_connections: 2, ..Config::default() });
    sim.connect(0, V3, "a", true);
    sim.connect(1, V3, "b", true);
    let c = sim.connect_with(0, V5, |k| k.client_id = "c");
    sim.pop(c, |p| assert!(matches!(p, Packet::ConnAck(a) if a.reason == ReasonCode::QUOTA_EXCEEDED)));
    assert!(sim.clients[c].closed);
}

#[test]
fn idle_connection_holds_no_read_buffer_between_packets() {
    let mut sim = Sim::new(1);
    let (c, _) = sim.connect(0, V3, "idle", true);
    let mut buf = Vec::new();
    encode(&Packet::PingReq, V3, &mut buf).unwrap();
    sim.send_bytes(c, &buf[..1]);
    let conn = sim.clients[c].conn;
    assert!(sim.shards[0].conns[&conn].rbuf_capacity() > 0, "a partial packet is kept");
    sim.send_bytes(c, &buf[1..]);
    assert_eq!(sim.shards[0].conns[&conn].rbuf_capacity(), 0, "and freed once complete");
    sim.pop(c, |p| assert!(matches!(p, Packet::PingResp)));
}

#[test]
fn per_connection_state_stays_small() {
    // Every connected client costs one Conn and one Session (plus map slots); keep both compact.
    let conn = std::mem::size_of::<super::conn::Conn>();
    let session = std::mem::size_of::<super::session::Session>();
    println!("Conn {conn} B, Session {session} B");
    // The allocator rounds up to its size classes (mimalloc: 80, 96, 112, 128, 160): 88 B takes a
    // 96-byte block and 128 B a 128-byte one; one field more would cost each 16 or 32 bytes.
    assert!(conn <= 96, "Conn grew to {conn} bytes");
    assert!(session <= 128, "Session grew to {session} bytes");
}

#[test]
fn protocol_errors_tell_v5_clients_why() {
    let mut sim = Sim::new(1);
    let (c, _) = sim.connect(0, V5, "bad", true);
    // A client must not send SUBACK.
    sim.send(
        c,
        &Packet::SubAck(shardmq_wire::SubAck {
            packet_id: PacketId(1),
            reasons: vec![ReasonCode::SUCCESS],
            properties: Properties::default(),
        }),
    );
    sim.pop(c, |p| match p {
        Packet::Disconnect(d) => {
            assert_eq!(d.reason, ReasonCode::PROTOCOL_ERROR);
            assert!(d.properties.reason_string.is_some_and(|r| r.contains("server-to-client")));
        }
        p => panic!("{p:?}"),
    });
    assert!(sim.clients[c].closed);
}

#[test]
fn shared_qos1_message_for_a_member_that_just_left_is_rerouted() {
    let mut sim = Sim::new(2);
    let (m0, _) = sim.connect(0, V5, &id_on(0, 2, "m0"), true);
    sim.subscribe(m0, "$share/g/job", QoS::AtLeastOnce);
    let (m1, _) = sim.connect(1, V5, &id_on(1, 2, "m1"), true);
    sim.subscribe(m1, "$share/g/job", QoS::AtLeastOnce);
    let (p, _) = sim.connect(1, V5, &id_on(1, 2, "p"), true);
    // Hold the mesh: shard 1 still believes shard 0 has a member while m0 unsubscribes.
    sim.deliver_mesh = false;
    let u = shardmq_wire::Unsubscribe {
        packet_id: PacketId(2),
        filters: vec!["$share/g/job"],
        properties: Properties::default(),
    };
    sim.send(m0, &Packet::Unsubscribe(u));
    for i in 1..=4u16 {
        sim.publish(p, "job", &[i as u8], QoS::AtLeastOnce, false, i);
    }
    sim.deliver_mesh = true;
    sim.run();
    let mut got = Vec::new();
    while sim.has_packet(m1) {
        got.push(sim.pop_publish(m1).1[0]);
    }
    got.sort_unstable();
    assert_eq!(got, vec![1, 2, 3, 4], "every QoS 1 message reaches the remaining member");
    assert_eq!(sim.shards[0].counters().dropped_no_member, 0);
}

/// Acks every QoS 1 PUBLISH the client has received; returns how many.
fn ack_all(sim: &mut Sim, c: C) -> usize {
    let mut n = 0;
    while sim.has_packet(c) {
        let pid = sim.pop_publish(c).5.expect("QoS 1");
        sim.send(c, &Packet::PubAck(Ack::new(PacketId(pid), ReasonCode::SUCCESS)));
        n += 1;
    }
    n
}

/// `cross`: publishers are owned by another shard than the subscriber.
fn fan_in_without_loss(shards: u16, cross: bool) {
    // A tiny queue: without publisher backpressure most of these messages would be dropped.
    let mut sim = Sim::with(shards, Config { max_queued: 8, ..Config::default() });
    let s = sim.connect_with(0, V5, |k| {
        k.client_id = "slow-sub";
        k.properties.receive_maximum = Some(2);
    });
    sim.pop(s, |_| ());
    let sub_shard = owner_of("slow-sub", shards).0;
    let pub_shard = if cross { (sub_shard + 1) % shards } else { sub_shard };
    sim.subscribe(s, "in/+", QoS::AtLeastOnce);
    let pubs: Vec<C> =
        (0..3).map(|i| sim.connect(0, V5, &id_on(pub_shard, shards, &format!("pub{i}")), true).0).collect();
    assert!(pubs.iter().all(|p| sim.clients[*p].shard == ShardId(pub_shard)));
    let total = 60u16;
    for i in 0..total {
        let p = pubs[i as usize % pubs.len()];
        // The publisher writes whether or not the broker reads (paused bytes wait in the "socket").
        sim.publish(p, &format!("in/{}", i % 3), &i.to_be_bytes(), QoS::AtLeastOnce, false, i + 1);
    }
    let paused = sim.shards.iter().map(|s| s.counters().publisher_pauses).sum::<u64>();
    assert!(paused > 0, "the publishers must have been paused");
    let mut received = 0;
    for _ in 0..1000 {
        received += ack_all(&mut sim, s);
        if received == total as usize {
            break;
        }
        sim.advance(Duration::from_millis(10));
    }
    assert_eq!(received, total as usize, "every acknowledged QoS 1 message arrives");
    let dropped: u64 = sim.shards.iter().map(|s| s.counters().dropped_queue_full).sum();
    assert_eq!(dropped, 0);
    assert!(sim.clients.iter().all(|c| !c.paused), "publishers resume once the subscriber catches up");
}

#[test]
fn publishers_are_paused_instead_of_losing_qos1_messages() {
    fan_in_without_loss(1, false);
}

#[test]
fn publishers_on_other_shards_are_paused_too() {
    fan_in_without_loss(2, true);
}

#[test]
fn a_publisher_with_one_keeping_up_subscriber_is_never_paused() {
    let mut sim = Sim::with(2, Config { max_queued: 8, ..Config::default() });
    let stalled = sim.connect_with(0, V5, |k| {
        k.client_id = "stalled";
        k.properties.receive_maximum = Some(1);
    });
    sim.pop(stalled, |_| ());
    sim.subscribe(stalled, "t", QoS::AtLeastOnce);
    let (good, _) = sim.connect(1, V5, "good", true);
    sim.subscribe(good, "t", QoS::AtLeastOnce);
    let (p, _) = sim.connect(0, V5, "p", true);
    // More than the stalled session's online headroom (16 × max_queued) can hold.
    for i in 0..200u16 {
        sim.publish(p, "t", &[0], QoS::AtLeastOnce, false, i + 1);
        assert_eq!(ack_all(&mut sim, good), 1, "the keeping-up subscriber gets every message at once");
    }
    assert_eq!(sim.shards.iter().map(|s| s.counters().publisher_pauses).sum::<u64>(), 0);
    assert!(!sim.clients[p].paused);
    let dropped: u64 = sim.shards.iter().map(|s| s.counters().dropped_queue_full).sum();
    assert!(dropped > 0, "the stalled subscriber alone pays: its oldest messages are dropped");
}

#[test]
fn a_pause_ends_by_itself_if_no_clearing_event_comes() {
    let mut sim = Sim::with(1, Config { max_queued: 2, ..Config::default() });
    let s = sim.connect_with(0, V5, |k| {
        k.client_id = "s";
        k.properties.receive_maximum = Some(1);
    });
    sim.pop(s, |_| ());
    sim.subscribe(s, "t", QoS::AtLeastOnce);
    let (p, _) = sim.connect(0, V5, "p", true);
    for i in 0..5u16 {
        sim.publish(p, "t", &[0], QoS::AtLeastOnce, false, i + 1);
    }
    assert!(sim.clients[p].paused);
    sim.advance(super::backpressure::MAX_PAUSE + Duration::from_millis(1));
    // Resumed, read the waiting publishes, and paused again (the subscriber still does not read).
    assert!(sim.shards[0].counters().publisher_pauses >= 2);
}

#[test]
fn an_oversized_publish_does_not_consume_a_topic_alias() {
    let mut sim = Sim::new(1);
    let s = sim.connect_with(0, V5, |k| {
        k.client_id = "small";
        k.properties.topic_alias_maximum = Some(4);
        k.properties.maximum_packet_size = Some(64);
    });
    sim.pop(s, |_| ());
    sim.subscribe(s, "alias/t", QoS::AtMostOnce);
    let (p, _) = sim.connect(0, V5, "p", true);
    sim.publish(p, "alias/t", &[7; 200], QoS::AtMostOnce, false, 0);
    assert!(!sim.has_packet(s), "larger than the client's Maximum Packet Size: not sent");
    sim.publish(p, "alias/t", b"ok", QoS::AtMostOnce, false, 0);
    // The client never saw the first PUBLISH, so this one must name the topic along with its new alias.
    sim.pop(s, |pkt| match pkt {
        Packet::Publish(m) => {
            assert_eq!(m.topic, "alias/t");
            assert_eq!(m.properties.topic_alias, Some(1));
        }
        other => panic!("{other:?}"),
    });
    sim.publish(p, "alias/t", b"ok", QoS::AtMostOnce, false, 0);
    sim.pop(s, |pkt| {
        assert!(
            matches!(pkt, Packet::Publish(m) if m.topic.is_empty() && m.properties.topic_alias == Some(1))
        )
    });
    assert_eq!(sim.shards[0].counters().dropped_too_large, 1);
}
