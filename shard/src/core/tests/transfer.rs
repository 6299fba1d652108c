//! Sessions moved between nodes (`persist::transfer`): two simulated nodes, a session exported from one
//! and imported by the other, then resumed there by its client.

use std::time::Instant;

use shardmq_wire::{Ack, Packet, PacketId, QoS, ReasonCode, SubOptions};

use super::sim::*;
use crate::core::*;

fn clock(sim: &Sim) -> WallClock {
    // Both nodes' wall clocks agree: the same Unix time at each sim's `now`.
    WallClock { base: sim.now, base_unix_ms: 1_900_000_000_000 }
}

/// Moves `id`'s session from node `a` to node `b` (through the encoded form the link carries).
fn move_session(a: &mut Sim, b: &mut Sim, id: &str) -> Exported {
    let n = a.shards.len() as u16;
    let (ca, cb) = (clock(a), clock(b));
    let (now_a, now_b): (Instant, Instant) = (a.now, b.now);
    let exported =
        a.shards[owner_of(id, n).index()].export_session(id, &ca, now_a).expect("a session to move");
    a.run();
    let bytes = exported.transfer.encode();
    let t = SessionTransfer::decode(&bytes).unwrap();
    let nb = b.shards.len() as u16;
    b.shards[owner_of(id, nb).index()].import_session(&t, &cb, now_b).unwrap();
    b.run();
    exported
}

fn sub_qos2(sim: &mut Sim, c: C, filter: &str) {
    sim.subscribe(c, filter, QoS::ExactlyOnce);
}

#[test]
fn an_offline_session_moves_with_its_subscriptions_and_queued_messages() {
    for protocol in [V3, V5] {
        let (mut a, mut b) = (Sim::new(2), Sim::new(3));
        let (c, _) = a.connect(0, protocol, "mover", false);
        sub_qos2(&mut a, c, "t/#");
        a.drop_conn(c);
        let (p, _) = a.connect(1, V5, "pub-a", true);
        a.publish(p, "t/1", b"one", QoS::AtLeastOnce, false, 1);
        a.publish(p, "t/2", b"two", QoS::ExactlyOnce, false, 2);
        a.publish(p, "t/0", b"zero", QoS::AtMostOnce, false, 0);

        let e = move_session(&mut a, &mut b, "mover");
        assert_eq!(e.transfer.len(), 3, "the session and its two QoS 1/2 messages");
        // QoS 0 to an offline 3.1.1/5 session is not queued at all here; nothing else was dropped.
        assert_eq!(e.dropped_qos0, 0);

        // Gone from A: a reconnect there finds no session.
        let (_, present) = a.connect(0, protocol, "mover", false);
        assert!(!present, "{protocol:?}: the exporting node ended its copy");

        // On B: session present, the queued messages with their QoS, and the subscription works there.
        let (c, present) = b.connect(2, protocol, "mover", false);
        assert!(present, "{protocol:?}");
        let first = b.pop_publish(c);
        assert_eq!((first.0.as_str(), first.1.as_slice(), first.2), ("t/1", &b"one"[..], QoS::AtLeastOnce));
        let second = b.pop_publish(c);
        assert_eq!((second.0.as_str(), second.2), ("t/2", QoS::ExactlyOnce));
        assert_ne!(first.5, second.5, "distinct packet ids");
        assert!(!b.has_packet(c));
        let (p, _) = b.connect(0, V5, "pub-b", true);
        b.publish(p, "t/3", b"three", QoS::AtMostOnce, false, 0);
        assert_eq!(b.pop_publish(c).0, "t/3", "{protocol:?}: the subscription routes on the new node");
    }
}

#[test]
fn a_connected_client_is_taken_over_and_its_qos2_state_moves() {
    let (mut a, mut b) = (Sim::new(2), Sim::new(2));
    let (c, _) = a.connect(1, V5, "live", false);
    sub_qos2(&mut a, c, "q/#");
    let (p, _) = a.connect(0, V5, "pub", true);
    a.publish(p, "q/2", b"two", QoS::ExactlyOnce, false, 7);
    a.publish(p, "q/1", b"one", QoS::AtLeastOnce, false, 8);
    // The client receives both, acknowledges the QoS 2 one's first half (PUBREC) and nothing else.
    let (_, _, _, _, _, pid2) = a.pop_publish(c);
    let (_, _, _, _, _, pid1) = a.pop_publish(c);
    a.send(c, &Packet::PubRec(Ack::new(PacketId(pid2.unwrap()), ReasonCode::SUCCESS)));
    a.pop(c, |p| assert!(matches!(p, Packet::PubRel(_)), "{p:?}"));
    // It is publishing QoS 2 itself: PUBREC sent, PUBREL not yet received.
    a.publish(c, "other/x", b"in", QoS::ExactlyOnce, false, 42);
    a.pop(c, |p| assert!(matches!(p, Packet::PubRec(_)), "{p:?}"));

    move_session(&mut a, &mut b, "live");
    a.pop(c, |p| match p {
        Packet::Disconnect(d) => assert_eq!(d.reason, ReasonCode::SESSION_TAKEN_OVER),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    });

    let (c2, present) = b.connect(0, V5, "live", false);
    assert!(present);
    // MQTT 5 §4.4: on resumption, PUBREL for the released QoS 2 message, the QoS 1 one again with DUP.
    b.pop(c2, |p| match p {
        Packet::PubRel(r) => assert_eq!(Some(r.packet_id.0), pid2),
        other => panic!("expected PUBREL, got {other:?}"),
    });
    let again = b.pop_publish(c2);
    assert_eq!((again.0.as_str(), again.4, again.5), ("q/1", true, pid1));
    // The inbound QoS 2 packet id is still held: a resend is not routed twice, PUBREL completes it.
    b.publish(c2, "other/x", b"in", QoS::ExactlyOnce, false, 42);
    b.pop(c2, |p| assert!(matches!(p, Packet::PubRec(_)), "{p:?}"));
    b.send(c2, &Packet::PubRel(Ack::new(PacketId(42), ReasonCode::SUCCESS)));
    b.pop(c2, |p| assert!(matches!(p, Packet::PubComp(_)), "{p:?}"));
}

#[test]
fn a_moved_session_is_stored_by_the_importing_node() {
    let mut a = Sim::new(2);
    let mut b = Sim::durable(2, Config::default());
    let (c, _) = a.connect(0, V5, "kept", false);
    a.subscribe_opts(c, "k/#", SubOptions { qos: QoS::AtLeastOnce, ..Default::default() }, Some(5));
    a.pop(c, |p| assert!(matches!(p, Packet::SubAck(_))));
    a.drop_conn(c);
    let (p, _) = a.connect(1, V5, "pub", true);
    a.publish(p, "k/1", b"one", QoS::AtLeastOnce, false, 1);
    move_session(&mut a, &mut b, "kept");
    b.crash_and_restart();
    let (c, present) = b.connect(1, V5, "kept", false);
    assert!(present, "survives the importing node's crash");
    assert_eq!(b.pop_publish(c).0, "k/1");
}

#[test]
fn an_import_never_makes_a_second_session_and_bad_records_are_refused() {
    let (mut a, mut b) = (Sim::new(1), Sim::new(1));
    a.connect(0, V5, "twice", false);
    b.connect(0, V5, "twice", false);
    let (ca, cb) = (clock(&a), clock(&b));
    let now = a.now;
    let e = a.shards[0].export_session("twice", &ca, now).unwrap();
    assert_eq!(b.shards[0].import_session(&e.transfer, &cb, b.now), Err(TransferError::AlreadyHere));

    // A record of the right type whose contents are garbage (the SESSION record's last byte, the tag of
    // its user name): the transfer decodes, the import refuses it and installs nothing.
    let mut bytes = e.transfer.encode();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let t = SessionTransfer::decode(&bytes).expect("the framing is intact");
    let mut c = Sim::new(1);
    let now = c.now;
    assert!(matches!(c.shards[0].import_session(&t, &cb, now), Err(TransferError::Malformed(_))));
    assert_eq!(c.shards[0].session_count(), 0);
    assert!(SessionTransfer::decode(&bytes[..last]).is_err(), "truncated");
}

/// The losing session of a conflict (the other side of a healed partition) hands its undelivered QoS 1/2
/// messages to the winning session of the same client id: queued there with packet ids of the winner,
/// stored with it; a QoS 2 message its old client had already received (past PUBREC) is not, nor its
/// subscriptions. Without a session to take them they are refused.
#[test]
fn a_losing_sessions_messages_are_handed_to_the_winning_one() {
    let mut a = Sim::new(2);
    let (c, _) = a.connect(0, V5, "twin", false);
    sub_qos2(&mut a, c, "q/#");
    let (p, _) = a.connect(1, V5, "pub", true);
    a.publish(p, "q/received", b"r", QoS::ExactlyOnce, false, 1);
    let (_, _, _, _, _, pid) = a.pop_publish(c);
    a.send(c, &Packet::PubRec(Ack::new(PacketId(pid.unwrap()), ReasonCode::SUCCESS)));
    a.pop(c, |p| assert!(matches!(p, Packet::PubRel(_)), "{p:?}"));
    a.publish(p, "q/inflight", b"i", QoS::AtLeastOnce, false, 2);
    assert_eq!(a.pop_publish(c).0, "q/inflight");
    a.drop_conn(c);
    a.publish(p, "q/queued", b"q", QoS::ExactlyOnce, false, 3);
    let ca = clock(&a);
    let now_a = a.now;
    let loser = a.shards[owner_of("twin", 2).index()].export_session("twin", &ca, now_a).unwrap().transfer;
    let t = SessionTransfer::decode(&loser.encode()).unwrap();

    // Nobody to take them: refused, nothing installed.
    let mut empty = Sim::new(2);
    let (ce, now_e) = (clock(&empty), empty.now);
    let refused = empty.shards[owner_of("twin", 2).index()].merge_session(&t, &ce, now_e);
    assert_eq!(refused, Err(TransferError::NoSession));
    assert_eq!(empty.shards.iter().map(|s| s.session_count()).sum::<usize>(), 0);

    let mut b = Sim::durable(2, Config::default());
    let (w, _) = b.connect(1, V5, "twin", false);
    b.subscribe(w, "other/#", QoS::AtLeastOnce);
    let (cb, now_b) = (clock(&b), b.now);
    let owner = owner_of("twin", 2).index();
    assert_eq!(b.shards[owner].merge_session(&t, &cb, now_b), Ok(2));
    b.run();
    let first = b.pop_publish(w);
    let second = b.pop_publish(w);
    assert_eq!((first.0.as_str(), first.2), ("q/inflight", QoS::AtLeastOnce));
    assert_eq!((second.0.as_str(), second.2), ("q/queued", QoS::ExactlyOnce));
    assert!(!b.has_packet(w), "not the message its old client had received");
    assert_eq!(b.shards[owner].counters().merged_messages, 2);
    // Stored with the winning session: unacknowledged, they come again after a crash.
    b.crash_and_restart();
    let (w, present) = b.connect(1, V5, "twin", false);
    assert!(present);
    let again: Vec<(String, bool, Option<u16>)> = (0..2)
        .map(|_| {
            let p = b.pop_publish(w);
            (p.0, p.4, p.5)
        })
        .collect();
    assert_eq!(again[0], ("q/inflight".to_string(), true, first.5));
    assert_eq!(again[1], ("q/queued".to_string(), true, second.5));
}
