//! Durability under the harness: state written to real logs in a temporary directory, a crash simulated
//! by dropping every shard (connections and in-flight mesh messages are lost, the logs stay) and booting
//! new shards from the same directory.

use std::time::Duration;

use shardmq_wire::{Ack, Packet, PacketId, QoS, ReasonCode};

use super::sim::*;
use crate::core::*;

fn ack(sim: &mut Sim, c: C, pid: u16) {
    sim.send(c, &Packet::PubAck(Ack::new(PacketId(pid), ReasonCode::SUCCESS)));
}

/// Drains the PUBLISHes a client has received: (payload, qos, packet id).
fn publishes(sim: &mut Sim, c: C) -> Vec<(Vec<u8>, QoS, Option<u16>)> {
    let mut out = Vec::new();
    while sim.has_packet(c) {
        let (_, payload, qos, _, _, pid) = sim.pop_publish(c);
        out.push((payload, qos, pid));
    }
    out
}

fn expect_puback(sim: &mut Sim, c: C, pid: u16) {
    sim.pop(c, |p| match p {
        Packet::PubAck(a) => assert_eq!((a.packet_id, a.reason), (PacketId(pid), ReasonCode::SUCCESS)),
        other => panic!("expected PUBACK {pid}, got {other:?}"),
    });
}

/// An MQTT 5 connect that resumes (or starts) session `id` with the given expiry; returns the client and
/// whether the session was present.
fn connect_v5(sim: &mut Sim, id: &str, expiry_s: u32) -> (C, bool) {
    let c = sim.connect_with(0, V5, |k| {
        k.client_id = id;
        k.clean_start = false;
        k.properties.session_expiry_interval_s = Some(expiry_s);
    });
    let present = sim.pop_connack(c);
    (c, present)
}

fn records(sim: &Sim) -> u64 {
    let (_, sc) = sim.data.as_ref().unwrap();
    let clock = WallClock { base: sim.now, base_unix_ms: 1_800_000_000_000 };
    inspect_node(&sc.dir, clock).unwrap().iter().map(|r| r.log.records).sum()
}

#[test]
fn queued_messages_of_an_offline_session_survive_a_crash() {
    let mut sim = Sim::durable(2, Config::default());
    let sub = id_on(1, 2, "sub");
    let (s, present) = sim.connect(0, V3, &sub, false);
    assert!(!present);
    sim.subscribe(s, "t/#", QoS::AtLeastOnce);
    sim.drop_conn(s);
    let (p, _) = sim.connect(0, V3, &id_on(0, 2, "pub"), true);
    for i in 1..=5u16 {
        sim.publish(p, "t/x", format!("m{i}").as_bytes(), QoS::AtLeastOnce, false, i);
        expect_puback(&mut sim, p, i);
    }
    sim.crash_and_restart();
    let (s, present) = sim.connect(1, V3, &sub, false);
    assert!(present, "the persistent session came back");
    let got = publishes(&mut sim, s);
    let payloads: Vec<&[u8]> = got.iter().map(|(p, _, _)| p.as_slice()).collect();
    assert_eq!(payloads, [&b"m1"[..], b"m2", b"m3", b"m4", b"m5"]);
    // Acknowledged ones are not delivered again after another crash.
    for (_, _, pid) in &got {
        ack(&mut sim, s, pid.unwrap());
    }
    sim.crash_and_restart();
    let (s, present) = sim.connect(1, V3, &sub, false);
    assert!(present);
    assert!(publishes(&mut sim, s).is_empty());
}

#[test]
fn puback_waits_until_the_subscribers_shard_stored_the_message() {
    let mut sim = Sim::durable(2, Config::default());
    let sub = id_on(1, 2, "sub");
    let (s, _) = sim.connect(1, V3, &sub, false);
    sim.subscribe(s, "t", QoS::AtLeastOnce);
    sim.drop_conn(s);
    let (p, _) = sim.connect(0, V3, &id_on(0, 2, "pub"), true);
    sim.deliver_mesh = false;
    sim.publish(p, "t", b"x", QoS::AtLeastOnce, false, 3);
    assert!(!sim.has_packet(p), "no PUBACK before shard 1 has the message on disk");
    sim.deliver_mesh = true;
    sim.run();
    expect_puback(&mut sim, p, 3);
}

#[test]
fn clean_sessions_write_nothing_and_are_not_held_back() {
    let mut sim = Sim::durable(2, Config::default());
    let (s, _) = sim.connect(1, V3, &id_on(1, 2, "sub"), true);
    sim.subscribe(s, "t", QoS::AtLeastOnce);
    let (p, _) = sim.connect(0, V3, &id_on(0, 2, "pub"), true);
    sim.deliver_mesh = false;
    sim.publish(p, "t", b"x", QoS::AtLeastOnce, false, 1);
    expect_puback(&mut sim, p, 1); // before shard 1 even saw the message: it has nothing to store
    sim.deliver_mesh = true;
    sim.run();
    assert_eq!(publishes(&mut sim, s).len(), 1);
    assert_eq!(records(&sim), 0, "clean sessions and their traffic stay in memory");
}

#[test]
fn outbound_qos2_resumes_at_the_right_stage_after_a_crash() {
    let mut sim = Sim::durable(1, Config::default());
    let (s, _) = sim.connect(0, V5, "sub", false);
    sim.subscribe(s, "t", QoS::ExactlyOnce);
    let (p, _) = sim.connect(0, V5, "pub", true);
    sim.publish(p, "t", b"one", QoS::ExactlyOnce, false, 1);
    sim.publish(p, "t", b"two", QoS::ExactlyOnce, false, 2);
    let got = publishes(&mut sim, s);
    assert_eq!(got.len(), 2);
    let (pid1, pid2) = (got[0].2.unwrap(), got[1].2.unwrap());
    // "one" is released (PUBREC → PUBREL); "two" was received but not acknowledged.
    sim.send(s, &Packet::PubRec(Ack::new(PacketId(pid1), ReasonCode::SUCCESS)));
    sim.pop(s, |p| assert!(matches!(p, Packet::PubRel(a) if a.packet_id.0 == pid1), "{p:?}"));
    sim.crash_and_restart();
    let (s, present) = sim.connect(0, V5, "sub", false);
    assert!(present);
    // PUBREL again for the released one, never its PUBLISH; the other is resent with the same id.
    sim.pop(s, |p| assert!(matches!(p, Packet::PubRel(a) if a.packet_id.0 == pid1), "{p:?}"));
    let again = publishes(&mut sim, s);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!((again[0].0.as_slice(), again[0].2), (&b"two"[..], Some(pid2)));
    sim.send(s, &Packet::PubComp(Ack::new(PacketId(pid1), ReasonCode::SUCCESS)));
    sim.send(s, &Packet::PubRec(Ack::new(PacketId(pid2), ReasonCode::SUCCESS)));
    sim.pop(s, |p| assert!(matches!(p, Packet::PubRel(a) if a.packet_id.0 == pid2), "{p:?}"));
    sim.send(s, &Packet::PubComp(Ack::new(PacketId(pid2), ReasonCode::SUCCESS)));
    sim.crash_and_restart();
    let (s, _) = sim.connect(0, V5, "sub", false);
    assert!(!sim.has_packet(s), "completed exchanges stay completed");
}

#[test]
fn inbound_qos2_is_not_routed_twice_across_a_crash() {
    let mut sim = Sim::durable(2, Config::default());
    let sub = id_on(1, 2, "sub");
    let (s, _) = sim.connect(1, V3, &sub, false);
    sim.subscribe(s, "t", QoS::ExactlyOnce);
    sim.drop_conn(s);
    let publisher = id_on(0, 2, "pub");
    let (p, _) = sim.connect(0, V5, &publisher, false);
    sim.publish(p, "t", b"once", QoS::ExactlyOnce, false, 9);
    sim.pop(p, |x| assert!(matches!(x, Packet::PubRec(a) if a.packet_id.0 == 9), "{x:?}"));
    sim.crash_and_restart();
    let (p, present) = sim.connect(0, V5, &publisher, false);
    assert!(present);
    // The publisher did not see the PUBREC (as far as it knows) and sends the message again.
    sim.publish(p, "t", b"once", QoS::ExactlyOnce, false, 9);
    sim.pop(p, |x| assert!(matches!(x, Packet::PubRec(a) if a.packet_id.0 == 9), "{x:?}"));
    sim.send(p, &Packet::PubRel(Ack::new(PacketId(9), ReasonCode::SUCCESS)));
    sim.pop(p, |x| {
        assert!(
            matches!(x, Packet::PubComp(a) if a.packet_id.0 == 9 && a.reason == ReasonCode::SUCCESS),
            "{x:?}"
        )
    });
    let (s, _) = sim.connect(1, V3, &sub, false);
    let got = publishes(&mut sim, s);
    assert_eq!(got.len(), 1, "exactly once: {got:?}");
    let first_pid = got[0].2;
    // After PUBCOMP the id is free: a new message with it is routed, even after a crash.
    sim.crash_and_restart();
    let (p, _) = sim.connect(0, V5, &publisher, false);
    let (s, _) = sim.connect(1, V3, &sub, false);
    sim.publish(p, "t", b"new", QoS::ExactlyOnce, false, 9);
    let got = publishes(&mut sim, s);
    // "once" again (the subscriber never completed it), then "new".
    let payloads: Vec<&[u8]> = got.iter().map(|g| g.0.as_slice()).collect();
    assert_eq!(payloads, [&b"once"[..], b"new"]);
    assert_eq!(got[0].2, first_pid, "resent with its packet id");
}

#[test]
fn subscriptions_and_retained_messages_survive_and_route_after_restart() {
    let mut sim = Sim::durable(3, Config::default());
    let sub = id_on(2, 3, "sub");
    let (s, _) = sim.connect(2, V5, &sub, false);
    sim.subscribe(s, "r/#", QoS::AtLeastOnce);
    sim.drop_conn(s);
    let (p, _) = sim.connect(0, V3, &id_on(0, 3, "pub"), true);
    for (i, topic) in ["r/a", "r/b", "r/c"].iter().enumerate() {
        sim.publish(p, topic, topic.as_bytes(), QoS::AtLeastOnce, true, i as u16 + 1);
        expect_puback(&mut sim, p, i as u16 + 1);
    }
    sim.publish(p, "r/b", b"", QoS::AtLeastOnce, true, 4); // clears r/b
    expect_puback(&mut sim, p, 4);
    sim.crash_and_restart();
    // A publish right after start reaches the offline subscriber on another shard: shard 0 knows
    // shard 2's subscriptions from the boot, not from announcements.
    let (p, _) = sim.connect(0, V3, &id_on(0, 3, "pub"), true);
    sim.publish(p, "r/new", b"after", QoS::AtLeastOnce, false, 1);
    expect_puback(&mut sim, p, 1);
    let (s, present) = sim.connect(2, V5, &sub, false);
    assert!(present);
    let got: Vec<Vec<u8>> = publishes(&mut sim, s).into_iter().map(|x| x.0).collect();
    assert_eq!(got, [&b"r/a"[..], b"r/b", b"r/c", b"", b"after"], "queued before and after the crash");
    // Retained state on every shard: r/a and r/c, not r/b.
    for shard in 0..3u16 {
        let (c, _) = sim.connect(shard, V3, &id_on(shard, 3, "fresh"), true);
        sim.subscribe(c, "r/#", QoS::AtMostOnce);
        let mut topics: Vec<Vec<u8>> = publishes(&mut sim, c).into_iter().map(|x| x.0).collect();
        topics.sort();
        assert_eq!(topics, [&b"r/a"[..], b"r/c"], "shard {shard}");
    }
}

#[test]
fn session_expiry_counts_across_a_restart() {
    let mut sim = Sim::durable(1, Config::default());
    let (c, _) = connect_v5(&mut sim, "e", 10);
    sim.subscribe(c, "t", QoS::AtLeastOnce);
    sim.drop_conn(c);
    sim.advance(Duration::from_secs(6));
    sim.crash_and_restart();
    assert_eq!(sim.shards[0].session_count(), 1);
    sim.advance(Duration::from_secs(5));
    assert_eq!(sim.shards[0].session_count(), 0, "expired 10 s after the disconnect, restart or not");
    sim.crash_and_restart();
    assert_eq!(sim.shards[0].session_count(), 0, "and the end is durable");
}

#[test]
fn a_session_that_expired_while_the_node_was_down_is_gone_at_start() {
    let mut sim = Sim::durable(1, Config::default());
    let (c, _) = connect_v5(&mut sim, "e", 2);
    sim.drop_conn(c);
    sim.crash_and_restart_after(Duration::from_secs(3));
    assert_eq!(sim.shards[0].session_count(), 0);
}

#[test]
fn a_connect_served_before_the_first_timer_pass_does_not_resume_an_expired_session() {
    let mut sim = Sim::durable(1, Config::default());
    let (c, _) = connect_v5(&mut sim, "e", 2);
    sim.subscribe(c, "t", QoS::AtLeastOnce);
    sim.drop_conn(c);
    sim.crash_and_boot_after(Duration::from_secs(3));
    let (c, present) = connect_v5(&mut sim, "e", 2);
    assert!(!present, "the session expired while the node was down");
    let (p, _) = sim.connect(0, V3, "pub", true);
    sim.publish(p, "t", b"x", QoS::AtLeastOnce, false, 1);
    expect_puback(&mut sim, p, 1);
    assert!(publishes(&mut sim, c).is_empty(), "its subscription ended with it");
    sim.drop_conn(c);
    sim.crash_and_restart();
    let (_, present) = connect_v5(&mut sim, "e", 2);
    assert!(present, "the new session is stored, not the expired one's end");
}

#[test]
fn acknowledged_messages_are_compacted_away() {
    let mut sim = Sim::durable(1, Config::default());
    let (s, _) = sim.connect(0, V3, "sub", false);
    sim.subscribe(s, "t", QoS::AtLeastOnce);
    let (p, _) = sim.connect(0, V3, "pub", true);
    let payload = vec![7u8; 1000];
    let dir = sim.data.as_ref().unwrap().1.dir.join("shard-0");
    let mut most_files = 0;
    for i in 0..3000u32 {
        let pid = (i % 60000) as u16 + 1;
        sim.publish(p, "t", &payload, QoS::AtLeastOnce, false, pid);
        expect_puback(&mut sim, p, pid);
        for (_, _, spid) in publishes(&mut sim, s) {
            ack(&mut sim, s, spid.unwrap());
        }
        if i % 100 == 0 {
            sim.advance(Duration::from_millis(100));
            most_files = most_files.max(std::fs::read_dir(&dir).unwrap().count());
        }
    }
    // 3 MB went through 64 KiB segments: without compaction that is ~50 files.
    assert!(most_files <= 8, "{most_files} files in the log directory");
    sim.crash_and_restart();
    let (s, present) = sim.connect(0, V3, "sub", false);
    assert!(present);
    assert!(publishes(&mut sim, s).is_empty(), "nothing acknowledged comes back");
}

#[test]
fn a_stored_message_costs_its_delivery_slot_in_memory() {
    // The in-memory index of a stored message is its queue entry; the payload is shared, not copied.
    assert_eq!(std::mem::size_of::<Delivery>(), 40);
    let mut sim = Sim::durable(1, Config::default());
    let (s, _) = sim.connect(0, V3, "sub", false);
    sim.subscribe(s, "t", QoS::AtLeastOnce);
    let (s2, _) = sim.connect(0, V3, "sub2", false);
    sim.subscribe(s2, "t", QoS::AtLeastOnce);
    sim.drop_conn(s);
    sim.drop_conn(s2);
    let (p, _) = sim.connect(0, V3, "pub", true);
    sim.publish(p, "t", b"shared", QoS::AtLeastOnce, false, 1);
    expect_puback(&mut sim, p, 1);
    sim.crash_and_restart();
    // One MESSAGE record for both sessions, so after recovery both share one payload allocation.
    let (_, sc) = sim.data.as_ref().unwrap();
    let clock = WallClock { base: sim.now, base_unix_ms: 1_800_000_000_000 };
    let r = inspect_node(&sc.dir, clock).unwrap();
    assert_eq!(r[0].by_name.get("message"), Some(&1));
    assert_eq!(r[0].queued_messages, 2);
}

#[test]
fn a_session_resumed_with_expiry_zero_leaves_the_log() {
    let mut sim = Sim::durable(1, Config::default());
    let connect = |sim: &mut Sim, expiry: u32| connect_v5(sim, "flip", expiry).0;
    let c = connect(&mut sim, 3600);
    sim.subscribe(c, "t", QoS::AtLeastOnce);
    sim.drop_conn(c);
    let (p, _) = sim.connect(0, V3, "pub", true);
    sim.publish(p, "t", b"a", QoS::AtLeastOnce, false, 1);
    expect_puback(&mut sim, p, 1);
    // Resumed with expiry 0: the session now ends with its connection, so the log forgets it.
    let c = connect(&mut sim, 0);
    assert_eq!(publishes(&mut sim, c).len(), 1);
    sim.crash_and_restart();
    assert_eq!(sim.shards[0].session_count(), 0);
    assert!(records(&sim) > 0, "the session's end is a record too");
    let (c, present) = connect_v5(&mut sim, "flip", 3600);
    assert!(!present);
    assert!(publishes(&mut sim, c).is_empty());
}

#[test]
fn compaction_keeps_a_message_only_for_the_sessions_still_holding_it() {
    let mut sim = Sim::durable(1, Config { max_queued: 10_000, ..Config::default() });
    let (a, _) = sim.connect(0, V5, "online", false);
    sim.subscribe(a, "t", QoS::ExactlyOnce);
    let (b, _) = sim.connect(0, V5, "offline", false);
    sim.subscribe(b, "t", QoS::AtLeastOnce);
    sim.drop_conn(b);
    let (p, _) = sim.connect(0, V3, "pub", true);
    let payload = vec![1u8; 500];
    for i in 0..600u16 {
        sim.publish(p, "t", &payload, QoS::AtLeastOnce, false, i + 1);
        expect_puback(&mut sim, p, i + 1);
        // The online session completes its QoS 1 exchange at once (granted QoS 1: min of 1 and 2).
        for (_, _, pid) in publishes(&mut sim, a) {
            ack(&mut sim, a, pid.unwrap());
        }
        if i % 50 == 0 {
            sim.advance(Duration::from_millis(100));
        }
    }
    sim.crash_and_restart();
    let (a, present) = sim.connect(0, V5, "online", false);
    assert!(present);
    assert!(publishes(&mut sim, a).is_empty(), "what the online session acknowledged stays acknowledged");
    let (b, _) = sim.connect(0, V5, "offline", false);
    let mut got = 0;
    loop {
        let batch = publishes(&mut sim, b);
        if batch.is_empty() {
            break;
        }
        got += batch.len();
        for (_, _, pid) in batch {
            ack(&mut sim, b, pid.unwrap());
        }
    }
    assert_eq!(got, 600, "the offline session still has every message");
}

#[test]
fn a_log_of_live_messages_is_not_rewritten_while_idle() {
    let mut sim = Sim::durable(1, Config { max_queued: 10_000, ..Config::default() });
    let (s, _) = sim.connect(0, V3, "keeper", false);
    sim.subscribe(s, "t", QoS::AtLeastOnce);
    sim.drop_conn(s);
    let (p, _) = sim.connect(0, V3, "pub", true);
    let payload = vec![3u8; 1000];
    for i in 0..300u16 {
        sim.publish(p, "t", &payload, QoS::AtLeastOnce, false, i + 1);
        expect_puback(&mut sim, p, i + 1);
    }
    let dir = sim.data.as_ref().unwrap().1.dir.join("shard-0");
    let newest = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".seg")?.parse::<u64>().ok())
            .max()
            .unwrap()
    };
    // Idle for ten minutes: a pass may move the live messages once, not over and over.
    sim.advance(Duration::from_secs(1));
    let before = newest(&dir);
    for _ in 0..600 {
        sim.advance(Duration::from_secs(1));
    }
    let after = newest(&dir);
    assert!(after <= before + 6, "segments {before} -> {after}: live data is being copied round");
    sim.crash_and_restart();
    let (s, _) = sim.connect(0, V3, "keeper", false);
    assert_eq!(publishes(&mut sim, s).len(), 64, "the first window of the 300 queued messages");
}

#[test]
fn a_record_that_passes_its_checksum_but_does_not_decode_refuses_the_start() {
    let mut sim = Sim::durable(1, Config::default());
    let (c, _) = sim.connect(0, V3, "s", false);
    sim.subscribe(c, "t", QoS::AtLeastOnce);
    let (_, sc) = sim.data.take().unwrap();
    sim.shards.clear(); // the process is gone; its logs are closed
    let lc = shardmq_storage::LogConfig {
        dir: sc.dir.join("shard-0"),
        segment_bytes: sc.segment_bytes,
        fsync: sc.fsync,
    };
    let (mut log, _) = shardmq_storage::Log::open(lc).unwrap();
    log.append(shardmq_storage::RecordType(3), &[1, 2, 3]).unwrap();
    drop(log);
    let clock = WallClock { base: sim.now, base_unix_ms: 1_800_000_000_000 };
    match open_node(&sc, 1, clock) {
        Err(e @ BootError::Record { .. }) => {
            assert!(e.is_data());
            let text = e.to_string();
            assert!(text.contains("message") && text.contains("shard 0"), "{text}");
        }
        Err(other) => panic!("expected an undecodable-record error, got {other}"),
        Ok(_) => panic!("started on an undecodable record"),
    }
}

#[test]
fn an_assigned_client_id_never_lands_on_a_restored_session() {
    let mut sim = Sim::durable(1, Config::default());
    let assigned = |sim: &mut Sim| {
        let c = sim.connect_with(0, V5, |k| {
            k.clean_start = false;
            k.properties.session_expiry_interval_s = Some(3600);
        });
        let id = sim.pop(c, |p| match p {
            Packet::ConnAck(a) => {
                assert!(!a.session_present, "a client without an id gets a new session");
                a.properties.assigned_client_identifier.unwrap().to_string()
            }
            other => panic!("{other:?}"),
        });
        (c, id)
    };
    let (c, first) = assigned(&mut sim);
    sim.subscribe(c, "t", QoS::AtLeastOnce);
    sim.drop_conn(c);
    sim.crash_and_restart();
    // The id counter starts again after a restart; the stored session keeps its id.
    let (_, second) = assigned(&mut sim);
    assert_ne!(first, second);
    assert_eq!(sim.shards[0].session_count(), 2);
}
