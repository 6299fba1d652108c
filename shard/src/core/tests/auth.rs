//! Authentication and ACLs under the harness: several shards, CONNECTs handed off to the owner shard,
//! deliveries across shards and a restart.

use std::sync::Arc;

use shardmq_wire::{Packet, QoS, ReasonCode};

use super::sim::*;
use crate::auth::{passwd::PasswordHash, Acl, Auth, PasswordFile};
use crate::core::*;

const ACL: &str =
    "user alice\ntopic read a/#\ntopic deny a/secret\nuser bob\ntopic write a/#\nuser dan\ntopic read a/#\n";

fn cfg() -> Config {
    let line = |u: &str, pw: &[u8]| format!("{u}:{}\n", PasswordHash::pbkdf2(pw, [3; 12], 101).encode());
    let passwords =
        PasswordFile::parse(&(line("alice", b"a-pw") + &line("bob", b"b-pw") + &line("dan", b"d-pw")))
            .unwrap();
    let auth =
        Auth { passwords: Some(passwords), acl: Some(Acl::parse(ACL).unwrap()), allow_anonymous: false };
    Config { auth: Some(Arc::new(auth)), ..Config::default() }
}

fn login(
    sim: &mut Sim,
    shard: u16,
    id: &'static str,
    user: &'static str,
    pw: &'static [u8],
) -> (C, ReasonCode) {
    let c = sim.connect_with(shard, V5, |k| {
        k.client_id = id;
        k.clean_start = false;
        k.properties.session_expiry_interval_s = Some(3600);
        k.username = Some(user);
        k.password = Some(pw);
    });
    let reason = sim.pop(c, |p| match p {
        Packet::ConnAck(a) => a.reason,
        other => panic!("expected CONNACK, got {other:?}"),
    });
    (c, reason)
}

fn topics(sim: &mut Sim, c: C) -> Vec<String> {
    let mut out = Vec::new();
    while sim.has_packet(c) {
        out.push(sim.pop_publish(c).0);
    }
    out
}

#[test]
fn credentials_are_checked_on_every_shard() {
    let mut sim = Sim::with(3, cfg());
    // Client ids owned by each of the shards, connecting through shard 0 (handed off or not).
    for id in ["c0", "c1", "c2", "c3", "c4"] {
        assert_eq!(login(&mut sim, 0, id, "alice", b"a-pw").1, ReasonCode::SUCCESS, "{id}");
        assert_eq!(login(&mut sim, 0, id, "alice", b"b-pw").1, ReasonCode::BAD_USER_NAME_OR_PASSWORD, "{id}");
    }
    let anon = sim.connect_with(1, V5, |k| k.client_id = "anon");
    sim.pop(anon, |p| assert!(matches!(p, Packet::ConnAck(a) if a.reason == ReasonCode::NOT_AUTHORIZED)));
}

#[test]
fn deliveries_across_shards_follow_the_readers_rules() {
    let mut sim = Sim::with(3, cfg());
    let (alice, _) = login(&mut sim, 0, "alice-1", "alice", b"a-pw");
    sim.subscribe(alice, "a/#", QoS::AtLeastOnce);
    for (i, id) in ["bob-1", "bob-2", "bob-3"].into_iter().enumerate() {
        let (bob, r) = login(&mut sim, i as u16, id, "bob", b"b-pw");
        assert_eq!(r, ReasonCode::SUCCESS);
        sim.publish(bob, "a/secret", b"x", QoS::AtMostOnce, false, 0);
        sim.publish(bob, &format!("a/{i}"), b"x", QoS::AtMostOnce, false, 0);
    }
    assert_eq!(topics(&mut sim, alice), ["a/0", "a/1", "a/2"]);
}

#[test]
fn a_restored_session_keeps_its_rights() {
    let mut sim = Sim::durable(1, cfg());
    let (alice, _) = login(&mut sim, 0, "alice-1", "alice", b"a-pw");
    sim.subscribe(alice, "a/#", QoS::AtLeastOnce);
    sim.subscribe(alice, "b/#", QoS::AtLeastOnce);
    sim.drop_conn(alice);
    sim.crash_and_restart();
    // The user name its rights were made for is stored with the session: while its client is away,
    // it is queued what alice may read, and only that.
    let (bob, _) = login(&mut sim, 0, "bob-1", "bob", b"b-pw");
    sim.publish(bob, "a/before", b"x", QoS::AtLeastOnce, false, 1);
    sim.publish(bob, "b/not-for-alice", b"x", QoS::AtLeastOnce, false, 2);
    let (alice, reason) = login(&mut sim, 0, "alice-1", "alice", b"a-pw");
    assert_eq!(reason, ReasonCode::SUCCESS);
    sim.publish(bob, "a/after", b"x", QoS::AtLeastOnce, false, 3);
    assert_eq!(topics(&mut sim, alice), ["a/before", "a/after"]);
}

#[test]
fn a_shared_group_member_that_may_not_read_is_passed_over() {
    let mut sim = Sim::with(1, cfg());
    let (alice, _) = login(&mut sim, 0, "alice-1", "alice", b"a-pw");
    let (dan, _) = login(&mut sim, 0, "dan-1", "dan", b"d-pw");
    sim.subscribe(alice, "$share/g/a/#", QoS::AtLeastOnce);
    sim.subscribe(dan, "$share/g/a/#", QoS::AtLeastOnce);
    let (bob, _) = login(&mut sim, 0, "bob-1", "bob", b"b-pw");
    for _ in 0..4 {
        sim.publish(bob, "a/secret", b"x", QoS::AtMostOnce, false, 0);
    }
    assert_eq!(topics(&mut sim, dan).len(), 4, "every message reaches the member allowed to read it");
    assert!(topics(&mut sim, alice).is_empty());
}

#[test]
fn a_reload_applies_new_passwords_to_new_logins_and_new_rules_to_every_session() {
    let mut sim = Sim::with(2, cfg());
    let (alice, _) = login(&mut sim, 0, "alice-1", "alice", b"a-pw");
    sim.subscribe(alice, "a/#", QoS::AtLeastOnce);
    let (bob, _) = login(&mut sim, 1, "bob-1", "bob", b"b-pw");
    sim.publish(bob, "a/1", b"x", QoS::AtMostOnce, false, 0);
    assert_eq!(topics(&mut sim, alice), ["a/1"]);
    // The operator edits the files (bob's password changes, alice may no longer read a/#) and reloads.
    let line = |u: &str, pw: &[u8]| format!("{u}:{}\n", PasswordHash::pbkdf2(pw, [5; 12], 101).encode());
    let passwords = PasswordFile::parse(&(line("alice", b"a-pw") + &line("bob", b"new-pw"))).unwrap();
    let acl = Acl::parse("user alice\ntopic read b/#\nuser bob\ntopic write a/#\n").unwrap();
    let auth = Auth { passwords: Some(passwords), acl: Some(acl), allow_anonymous: false };
    sim.node.auth.replace(Some(Arc::new(auth)));
    // Connections stay; the new rules apply to them from their next event on.
    sim.publish(bob, "a/2", b"x", QoS::AtMostOnce, false, 0);
    assert!(topics(&mut sim, alice).is_empty(), "alice may no longer read a/#");
    let (_, reason) = login(&mut sim, 1, "bob-2", "bob", b"b-pw");
    assert_eq!(reason, ReasonCode::BAD_USER_NAME_OR_PASSWORD, "the old password no longer works");
    let (_, reason) = login(&mut sim, 1, "bob-3", "bob", b"new-pw");
    assert_eq!(reason, ReasonCode::SUCCESS);
}

#[test]
fn a_certificate_name_stands_for_the_user_name_and_password_also_after_a_handoff() {
    let mut sim = Sim::with(3, cfg());
    // Client ids owned by each shard, all connecting through shard 0: the name travels with a handoff.
    for id in ["c0", "c1", "c2", "c3", "c4"] {
        let c = sim.open(0, V5);
        let conn = sim.clients[c].conn;
        crate::io::Core::handle_peer_identity(&mut sim.shards[0], conn, Some("alice"));
        let connect = shardmq_wire::Connect {
            protocol: V5,
            clean_start: true,
            keep_alive_s: 0,
            client_id: id,
            will: None,
            // Neither is checked: the certificate was.
            username: Some("bob"),
            password: Some(b"wrong"),
            properties: Default::default(),
        };
        sim.send(c, &Packet::Connect(connect));
        let reason = sim.pop(c, |p| match p {
            Packet::ConnAck(a) => a.reason,
            other => panic!("expected CONNACK, got {other:?}"),
        });
        assert_eq!(reason, ReasonCode::SUCCESS, "{id}");
        // Alice's rules apply, not bob's: she may read a/#, not write it.
        sim.subscribe_opts(c, "a/#", shardmq_wire::SubOptions::default(), None);
        sim.pop(c, |p| match p {
            Packet::SubAck(s) => assert_eq!(s.reasons, [ReasonCode::SUCCESS], "{id}"),
            other => panic!("expected SUBACK, got {other:?}"),
        });
        sim.publish(c, "a/x", b"x", QoS::AtLeastOnce, false, 1);
        sim.pop(c, |p| match p {
            Packet::PubAck(a) => assert_eq!(a.reason, ReasonCode::NOT_AUTHORIZED, "{id}"),
            other => panic!("expected PUBACK, got {other:?}"),
        });
    }
}

#[test]
fn a_certificate_without_a_name_may_not_log_in_under_the_name_it_claims() {
    for cfg in [cfg(), Config::default()] {
        let mut sim = Sim::with(2, cfg);
        let c = sim.open(0, V5);
        let conn = sim.clients[c].conn;
        crate::io::Core::handle_peer_identity(&mut sim.shards[0], conn, None);
        let connect = shardmq_wire::Connect {
            protocol: V5,
            clean_start: true,
            keep_alive_s: 0,
            client_id: "c1",
            will: None,
            username: Some("alice"),
            password: Some(b"a-pw"),
            properties: Default::default(),
        };
        sim.send(c, &Packet::Connect(connect));
        sim.pop(c, |p| match p {
            Packet::ConnAck(a) => assert_eq!(a.reason, ReasonCode::NOT_AUTHORIZED),
            other => panic!("expected CONNACK, got {other:?}"),
        });
    }
}
