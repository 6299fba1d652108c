//! CONNECTs held for the zone's registry (`register`): the test plays the cluster gateway.

use std::sync::Arc;
use std::time::Duration;

use shardmq_wire::{Packet, PacketId, QoS, ReasonCode, SubOptions, Subscribe};

use super::sim::*;
use crate::auth::{passwd::PasswordHash, Auth, PasswordFile};
use crate::core::*;
use crate::ShardId;

fn clustered(n: u16) -> Sim {
    clustered_with(n, false)
}

fn clustered_with(n: u16, register_ahead: bool) -> Sim {
    let cfg = Config { cluster_gateway: true, connect_timeout_ms: 2000, register_ahead, ..Config::default() };
    let mut sim = Sim::with(n, cfg);
    sim.auto_register = false;
    for s in &mut sim.shards {
        s.set_wall_clock(WallClock { base: sim.now, base_unix_ms: 1_900_000_000_000 });
    }
    sim
}

/// The registrations the gateway received: (shard, token, client id, clean start).
fn registrations(sim: &mut Sim) -> Vec<(u16, u64, String, bool)> {
    let mut out = Vec::new();
    sim.to_gateway.retain(|(from, m)| match m {
        Mesh::Register { token, client, clean_start, .. } => {
            out.push((from.0, *token, client.to_string(), *clean_start));
            false
        }
        _ => true,
    });
    out
}

fn answer(sim: &mut Sim, shard: u16, token: u64, outcome: RegisterOutcome) {
    sim.gateway_sends(shard, Mesh::Registered { token, outcome });
}

fn granted() -> RegisterOutcome {
    RegisterOutcome::Granted { session: None, registration: ZoneRegistration { epoch: 1, stamp: 1 } }
}

#[test]
fn connack_waits_for_the_registration_and_later_packets_wait_behind_it() {
    let mut sim = clustered(2);
    let id = id_on(1, 2, "held");
    // CONNECT and a SUBSCRIBE in one write, through the shard that does not own the id.
    let c = sim.open(0, V5);
    let mut bytes = Vec::new();
    let connect = shardmq_wire::Connect {
        protocol: V5,
        clean_start: false,
        keep_alive_s: 0,
        client_id: &id,
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    };
    shardmq_wire::encode(&Packet::Connect(connect), V5, &mut bytes).unwrap();
    let sub = Subscribe {
        packet_id: PacketId(1),
        filters: vec![("r/#", SubOptions { qos: QoS::AtLeastOnce, ..Default::default() })],
        properties: Default::default(),
    };
    shardmq_wire::encode(&Packet::Subscribe(sub), V5, &mut bytes).unwrap();
    sim.send_bytes(c, &bytes);
    assert!(!sim.has_packet(c), "no CONNACK before the registry answers");
    let regs = registrations(&mut sim);
    assert_eq!(regs.len(), 1);
    let (shard, token, client, clean) = regs[0].clone();
    assert_eq!((shard, client.as_str(), clean), (1, id.as_str(), false), "the owner shard registers");
    answer(&mut sim, shard, token, granted());
    assert!(!sim.pop_connack(c), "no session anywhere: not present");
    // The SUBACK waits for the gateway to take the new interest, as on any clustered node.
    let acks: Vec<(u16, u64)> = sim
        .to_gateway
        .drain(..)
        .filter_map(|(from, m)| match m {
            Mesh::Interest { token: Some(t), .. } => Some((from.0, t)),
            _ => None,
        })
        .collect();
    assert!(!acks.is_empty());
    for (shard, token) in acks {
        sim.gateway_sends(shard, Mesh::InterestAck { token });
    }
    sim.pop(c, |p| assert!(matches!(p, Packet::SubAck(_)), "the SUBSCRIBE after it, then: {p:?}"));
    assert_eq!(sim.shards[1].counters().registrations, 1);
}

#[test]
fn a_session_moved_from_another_node_arrives_with_the_grant() {
    let mut other = Sim::new(1);
    let (c, _) = other.connect(0, V5, "roamer", false);
    other.subscribe(c, "m/#", QoS::AtLeastOnce);
    other.drop_conn(c);
    let (p, _) = other.connect(0, V5, "pub", true);
    other.publish(p, "m/1", b"queued", QoS::AtLeastOnce, false, 1);
    let clock = WallClock { base: other.now, base_unix_ms: 1_900_000_000_000 };
    let now = other.now;
    let moved = other.shards[0].export_session("roamer", &clock, now).unwrap().transfer;

    for protocol in [V3, V5] {
        let mut sim = clustered(2);
        let c = sim.connect_with(0, protocol, |k| {
            k.client_id = "roamer";
            k.clean_start = false;
            if protocol.is_v5() {
                k.properties.session_expiry_interval_s = Some(3600);
            }
        });
        let (shard, token, _, _) = registrations(&mut sim).pop().unwrap();
        answer(
            &mut sim,
            shard,
            token,
            RegisterOutcome::Granted {
                session: Some(Box::new(moved.clone())),
                registration: ZoneRegistration { epoch: 1, stamp: 1 },
            },
        );
        assert!(sim.pop_connack(c), "{protocol:?}: session present");
        assert_eq!(sim.pop_publish(c).0, "m/1", "{protocol:?}");
    }
}

#[test]
fn a_refused_registration_refuses_the_connect() {
    // 3.1.1's return code 3 decodes as 0x88 too.
    for (protocol, code) in [(V5, ReasonCode::SERVER_UNAVAILABLE), (V3, ReasonCode::SERVER_UNAVAILABLE)] {
        let mut sim = clustered(1);
        let c = sim.connect_with(0, protocol, |k| k.client_id = "nope");
        let (shard, token, _, _) = registrations(&mut sim).pop().unwrap();
        answer(&mut sim, shard, token, RegisterOutcome::Refused);
        sim.pop(c, |p| match p {
            Packet::ConnAck(a) => assert_eq!(a.reason, code, "{protocol:?}"),
            other => panic!("expected CONNACK, got {other:?}"),
        });
        assert_eq!(sim.shards[0].session_count(), 0);
        assert_eq!(sim.shards[0].counters().registrations_refused, 1);
    }
}

#[test]
fn without_an_answer_the_connect_goes_on_at_its_timeout() {
    let mut sim = clustered(1);
    let c = sim.connect_with(0, V5, |k| k.client_id = "lonely");
    assert_eq!(registrations(&mut sim).len(), 1);
    sim.advance(Duration::from_millis(1999));
    assert!(!sim.has_packet(c));
    sim.advance(Duration::from_millis(2));
    assert!(!sim.pop_connack(c));
    assert_eq!(sim.shards[0].counters().registrations_timed_out, 1);
    // A late answer finds nothing waiting and changes nothing.
    answer(&mut sim, 0, 1, granted());
    assert!(!sim.has_packet(c));
}

#[test]
fn only_authenticated_clients_and_their_own_ids_are_registered() {
    let line = format!("alice:{}\n", PasswordHash::pbkdf2(b"pw", [3; 12], 101).encode());
    let auth =
        Auth { passwords: Some(PasswordFile::parse(&line).unwrap()), acl: None, allow_anonymous: false };
    let cfg = Config { cluster_gateway: true, auth: Some(Arc::new(auth)), ..Config::default() };
    let mut sim = Sim::with(1, cfg);
    sim.auto_register = false;
    let c = sim.connect_with(0, V5, |k| {
        k.client_id = "victim";
        k.username = Some("alice");
        k.password = Some(b"wrong");
    });
    sim.pop(c, |p| {
        assert!(matches!(p, Packet::ConnAck(a) if a.reason == ReasonCode::BAD_USER_NAME_OR_PASSWORD))
    });
    assert!(
        registrations(&mut sim).is_empty(),
        "a client that failed to log in must not take a session over"
    );
    // An id the node assigns is its own: nothing to register.
    let c = sim.connect_with(0, V5, |k| {
        k.username = Some("alice");
        k.password = Some(b"pw");
    });
    sim.pop_connack(c);
    assert!(registrations(&mut sim).is_empty());
}

#[test]
fn a_client_that_leaves_while_held_leaves_nothing_behind() {
    let mut sim = clustered(1);
    let c = sim.connect_with(0, V5, |k| k.client_id = "gone");
    let (_, token, _, _) = registrations(&mut sim).pop().unwrap();
    sim.drop_conn(c);
    answer(&mut sim, 0, token, granted());
    assert_eq!(sim.shards[0].session_count(), 0);
    assert_eq!(sim.shards[0].connection_count(), 0);
}

#[test]
fn ids_a_clustered_node_assigns_carry_its_name() {
    let cfg = Config { cluster_gateway: true, assigned_id_scope: "node-a".into(), ..Config::default() };
    let mut sim = Sim::with(2, cfg);
    let c = sim.connect_with(1, V5, |k| k.clean_start = true);
    let id = sim.pop(c, |p| match p {
        Packet::ConnAck(a) => a.properties.assigned_client_identifier.unwrap().to_string(),
        other => panic!("expected CONNACK, got {other:?}"),
    });
    assert!(id.starts_with("shardmq-node-a-"), "{id}");
    assert_eq!(owner_of(&id, 2), ShardId(1), "still owned by the shard that assigned it");
}

/// Connects `id` (persistent, 600 s) on a clustered node and grants it `registration`.
fn registered(sim: &mut Sim, id: &str, will_delay_s: Option<u32>, registration: ZoneRegistration) -> C {
    let c = sim.connect_with(0, V5, |k| {
        k.client_id = id;
        k.clean_start = false;
        k.properties.session_expiry_interval_s = Some(600);
        if let Some(delay) = will_delay_s {
            let properties =
                shardmq_wire::Properties { will_delay_interval_s: Some(delay), ..Default::default() };
            k.will = Some(shardmq_wire::Will {
                topic: "gone/x",
                payload: b"bye",
                qos: QoS::AtLeastOnce,
                retain: false,
                properties,
            });
        }
    });
    let (shard, token, client, _) = registrations(sim).pop().expect("registered");
    assert_eq!(client, id);
    answer(sim, shard, token, RegisterOutcome::Granted { session: None, registration });
    assert!(!sim.pop_connack(c));
    c
}

/// A clustered node restarted with its log hands its gateway the sessions it restored, each with the
/// registration it had (so the zone's registry learns where they are and ends the ones that moved), before
/// it answers the gateway's first `ForwardAll`; the will of a client connected at the crash is left to
/// the id's owners, who saw the node go, and the session's end is reported under its restored epoch.
#[test]
fn a_restarted_node_hands_its_sessions_to_the_registry_as_they_were_registered() {
    let cfg = Config { cluster_gateway: true, connect_timeout_ms: 2000, ..Config::default() };
    let mut sim = Sim::durable(2, cfg);
    sim.auto_register = false;
    let kept_reg = ZoneRegistration { epoch: 7, stamp: 0xABCD_0001 };
    let live_reg = ZoneRegistration { epoch: 3, stamp: 0x55 };
    let kept = registered(&mut sim, "kept", None, kept_reg);
    sim.drop_conn(kept);
    let gone: Vec<_> =
        sim.to_gateway.drain(..).filter(|(_, m)| matches!(m, Mesh::Unregister { .. })).collect();
    assert!(
        matches!(&gone[..], [(_, Mesh::Unregister { client, registration, kept: true })] if &**client == "kept" && registration.epoch == 7),
        "{gone:?}"
    );
    let _live = registered(&mut sim, "live", Some(10), live_reg);
    sim.to_gateway.clear();

    sim.crash_and_restart();
    for s in 0..2 {
        sim.gateway_sends(s, Mesh::ForwardAll { on: true, token: Some(0) });
    }
    let mut held = Vec::new();
    for s in 0..2 {
        let from_s: Vec<&Mesh> =
            sim.to_gateway.iter().filter(|(from, _)| from.0 == s).map(|(_, m)| m).collect();
        let held_at = from_s.iter().position(|m| matches!(m, Mesh::SessionsHeld { .. })).expect("told");
        let acked_at =
            from_s.iter().position(|m| matches!(m, Mesh::InterestAck { token: 0 })).expect("acked");
        assert!(held_at < acked_at, "the sessions come before the answer: {from_s:?}");
        if let Mesh::SessionsHeld { sessions } = from_s[held_at] {
            held.extend(sessions.iter().map(|h| (h.client.to_string(), h.registration)));
        }
    }
    held.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(held, vec![("kept".to_string(), kept_reg), ("live".to_string(), live_reg)]);
    sim.to_gateway.clear();

    // The will's delay passes: the zone's owners publish it, not this node.
    sim.advance(Duration::from_secs(11));
    let published: Vec<_> = sim
        .to_gateway
        .iter()
        .filter(|(_, m)| matches!(m, Mesh::Deliver { msg, .. } if &*msg.topic == "gone/x"))
        .collect();
    assert!(published.is_empty(), "{published:?}");
    let left: u64 = sim.shards.iter().map(|s| s.counters().restored_wills_left_to_zone).sum();
    assert_eq!(left, 1);

    // The sessions expire: their ends are reported with the epochs they were registered with.
    sim.to_gateway.clear();
    sim.advance(Duration::from_secs(600));
    let mut ended: Vec<(String, u64, bool)> = sim
        .to_gateway
        .drain(..)
        .filter_map(|(_, m)| match m {
            Mesh::Unregister { client, registration, kept } => {
                Some((client.to_string(), registration.epoch, kept))
            }
            _ => None,
        })
        .collect();
    ended.sort();
    assert_eq!(ended, vec![("kept".to_string(), 7, false), ("live".to_string(), 3, false)]);
}

/// Answers every interest announcement the gateway was sent, as a zone whose peers all acknowledged.
fn zone_acknowledges(sim: &mut Sim) {
    loop {
        let acks: Vec<(u16, u64)> = sim
            .to_gateway
            .iter()
            .filter_map(|(from, m)| match m {
                Mesh::Interest { token: Some(t), .. } => Some((from.0, *t)),
                _ => None,
            })
            .collect();
        sim.to_gateway.retain(|(_, m)| !matches!(m, Mesh::Interest { .. }));
        if acks.is_empty() {
            return;
        }
        for (shard, token) in acks {
            sim.gateway_sends(shard, Mesh::InterestAck { token });
        }
    }
}

/// What the shards handed the gateway for another node: (client, records per transfer).
fn exported(sim: &mut Sim) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    sim.to_gateway.retain(|(_, m)| match m {
        Mesh::Exported { client, state } => {
            out.push((client.to_string(), state.as_ref().map_or(0, |t| t.len())));
            false
        }
        _ => true,
    });
    out
}

/// A session taken over by another node leaves a forwarding stub: what the zone still routes to it goes
/// after the session, one message per transfer, until the gateway ends the stub (or its timeout does). The
/// stub is nobody's session here: a CONNECT does not resume it. On the node the session moves to, the
/// shard says when every endpoint routes its subscriptions there (`Mesh::Settled`), which ends the stub.
#[test]
fn a_session_that_moved_away_leaves_a_stub_that_forwards_until_its_new_node_routes_it() {
    let mut sim = clustered(2);
    let id = id_on(1, 2, "mover");
    let c = registered(&mut sim, &id, None, ZoneRegistration { epoch: 1, stamp: 1 });
    sim.subscribe_opts(c, "m/#", SubOptions { qos: QoS::AtLeastOnce, ..Default::default() }, None);
    zone_acknowledges(&mut sim);
    sim.pop(c, |p| assert!(matches!(p, Packet::SubAck(_)), "{p:?}"));
    sim.drop_conn(c);
    sim.to_gateway.clear();

    sim.gateway_sends(
        1,
        Mesh::EndSession { client: id.as_str().into(), export: true, of: SessionOf::Epoch(1) },
    );
    assert_eq!(exported(&mut sim), vec![(id.clone(), 1)], "the session (no message queued)");
    let p = sim.connect_with(0, V5, |k| k.client_id = "pub");
    let (shard, token, _, _) = registrations(&mut sim).pop().unwrap();
    answer(&mut sim, shard, token, granted());
    assert!(!sim.pop_connack(p));
    sim.publish(p, "m/1", b"late", QoS::AtLeastOnce, false, 1);
    assert_eq!(exported(&mut sim), vec![(id.clone(), 2)], "forwarded: the stub's record and the message");
    assert_eq!(sim.shards[1].counters().forwarded_after_move, 1);

    // Its client comes back here meanwhile: a new session, not the stub.
    registered(&mut sim, &id, None, ZoneRegistration { epoch: 3, stamp: 3 });
    sim.gateway_sends(1, Mesh::EndForwarding { client: id.as_str().into() });
    sim.publish(p, "m/2", b"after", QoS::AtLeastOnce, false, 2);
    assert!(exported(&mut sim).is_empty(), "the stub ended");
    assert_eq!(sim.shards.iter().map(|s| s.session_count()).sum::<usize>(), 2, "pub and the new session");

    // The receiving side: a moved session with a subscription, installed with its grant; once every
    // endpoint routes it here, the gateway hears so.
    let mut other = Sim::new(1);
    let (m, _) = other.connect(0, V5, "roamer", false);
    other.subscribe(m, "r/#", QoS::AtLeastOnce);
    other.drop_conn(m);
    let clock = WallClock { base: other.now, base_unix_ms: 1_900_000_000_000 };
    let now = other.now;
    let moved = other.shards[0].export_session("roamer", &clock, now).unwrap().transfer;
    let mut b = clustered(2);
    let r = b.connect_with(0, V5, |k| {
        k.client_id = "roamer";
        k.clean_start = false;
        k.properties.session_expiry_interval_s = Some(600);
    });
    let (shard, token, _, _) = registrations(&mut b).pop().unwrap();
    let outcome = RegisterOutcome::Granted {
        session: Some(Box::new(moved)),
        registration: ZoneRegistration { epoch: 2, stamp: 2 },
    };
    answer(&mut b, shard, token, outcome);
    assert!(b.pop_connack(r), "session present");
    let settled = |sim: &Sim| {
        sim.to_gateway.iter().any(|(_, m)| matches!(m, Mesh::Settled { client } if &**client == "roamer"))
    };
    assert!(!settled(&b), "not before the zone routes its subscription here");
    zone_acknowledges(&mut b);
    assert!(settled(&b));
}

fn clustered_ahead(n: u16) -> Sim {
    clustered_with(n, true)
}

/// What the shards told the gateway of connections that went: (client id, registration).
fn unregistered(sim: &mut Sim) -> Vec<(String, ZoneRegistration)> {
    let mut out = Vec::new();
    sim.to_gateway.retain(|(_, m)| match m {
        Mesh::Unregister { client, registration, kept } => {
            assert!(!kept);
            out.push((client.to_string(), *registration));
            false
        }
        _ => true,
    });
    out
}

/// The registrations answered ahead the gateway received: (shard, token, client id).
fn ahead_registrations(sim: &mut Sim) -> Vec<(u16, u64, String)> {
    let mut out = Vec::new();
    sim.to_gateway.retain(|(from, m)| match m {
        Mesh::Register { token, client, ahead: true, clean_start, will } => {
            assert!(*clean_start && will.is_none());
            out.push((from.0, *token, client.to_string()));
            false
        }
        _ => true,
    });
    out
}

/// Where the zone prefers availability, a clean start with no will whose session ends with it is
/// answered at once; its registration goes to the gateway, which is told of its end with epoch 0 until
/// it said which epoch the connection got.
#[test]
fn a_clean_connection_without_a_will_is_answered_ahead_of_its_registration() {
    let mut sim = clustered_ahead(2);
    let id = id_on(1, 2, "quick");
    let (c, present) = sim.connect(0, V5, &id, true);
    assert!(!present);
    let regs = ahead_registrations(&mut sim);
    assert_eq!(regs.len(), 1);
    assert_eq!((regs[0].0, regs[0].2.as_str()), (1, id.as_str()), "from the shard that owns the id");
    assert!(registrations(&mut sim).is_empty(), "nothing else was registered");
    sim.drop_conn(c);
    let ahead = ZoneRegistration::ahead(regs[0].1);
    assert_eq!(
        unregistered(&mut sim),
        vec![(id.clone(), ahead)],
        "named by its token, its epoch unknown here"
    );

    // Told its epoch, the shard reports it at the end.
    let (c, _) = sim.connect(0, V3, &id, true);
    let (shard, token, _) = ahead_registrations(&mut sim).pop().unwrap();
    let registration = ZoneRegistration { epoch: 7, stamp: 9 };
    sim.gateway_sends(
        shard,
        Mesh::RegisteredAhead { client: id.as_str().into(), token: token + 1, registration },
    );
    sim.gateway_sends(shard, Mesh::RegisteredAhead { client: id.as_str().into(), token, registration });
    sim.drop_conn(c);
    assert_eq!(
        unregistered(&mut sim),
        vec![(id.clone(), registration)],
        "another token's epoch is not taken"
    );
}

/// While a CONNECT of the id waits for its registration here, another one waits too: answered ahead,
/// it would take the session before the registry heard of the first.
#[test]
fn a_connect_behind_a_held_one_of_its_id_waits_too() {
    let mut sim = clustered_ahead(1);
    let first = sim.connect_with(0, V5, |k| {
        k.client_id = "twice";
        k.properties.session_expiry_interval_s = Some(60);
    });
    let second = sim.connect_with(0, V5, |k| k.client_id = "twice");
    assert!(ahead_registrations(&mut sim).is_empty());
    let held = registrations(&mut sim);
    assert_eq!(held.len(), 2);
    assert!(!sim.has_packet(first) && !sim.has_packet(second));
}

/// A will, a session that outlives its connection, or a partial session: the CONNECT waits for its
/// registration as before.
#[test]
fn a_connection_the_zone_must_know_of_first_waits_for_its_registration() {
    let mut sim = clustered_ahead(1);
    let with_will = sim.connect_with(0, V5, |k| {
        k.client_id = "w";
        k.will = Some(shardmq_wire::Will {
            topic: "gone/w",
            payload: b"bye",
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        });
    });
    let expiring = sim.connect_with(0, V5, |k| {
        k.client_id = "e";
        k.properties.session_expiry_interval_s = Some(60);
    });
    let resuming = sim.connect_with(0, V3, |k| {
        k.client_id = "r";
        k.clean_start = false;
    });
    assert!(ahead_registrations(&mut sim).is_empty());
    let held = registrations(&mut sim);
    assert_eq!(held.len(), 3);
    for c in [with_will, expiring, resuming] {
        assert!(!sim.has_packet(c), "no CONNACK before the registration");
    }
}

/// The registry ends a session by the registration it names: a connection answered ahead, whose
/// registration the gateway had not seen when it ended an older one, stays; the end of its own
/// registration (its token, or the epoch it was told) closes it with 0x8E.
#[test]
fn the_registry_ends_only_the_registration_it_names() {
    let mut sim = clustered_ahead(1);
    let (c, _) = sim.connect(0, V5, "flip", true);
    let (_, token, _) = ahead_registrations(&mut sim).pop().unwrap();
    let end = |of| Mesh::EndSession { client: "flip".into(), export: false, of };
    sim.gateway_sends(0, end(SessionOf::Epoch(3)));
    sim.gateway_sends(0, end(SessionOf::Ahead(token + 1)));
    assert!(!sim.has_packet(c), "an older registration's end, and another connection's");
    assert_eq!(exported(&mut sim), vec![("flip".to_string(), 0), ("flip".to_string(), 0)], "each answered");
    sim.gateway_sends(0, end(SessionOf::Ahead(token)));
    sim.pop(c, |p| match p {
        Packet::Disconnect(d) => assert_eq!(d.reason, ReasonCode::SESSION_TAKEN_OVER),
        other => panic!("expected DISCONNECT, got {other:?}"),
    });
    assert_eq!(sim.shards[0].session_count(), 0);

    let (c, _) = sim.connect(0, V5, "flip", true);
    let (_, token, _) = ahead_registrations(&mut sim).pop().unwrap();
    let registration = ZoneRegistration { epoch: 5, stamp: 9 };
    sim.gateway_sends(0, Mesh::RegisteredAhead { client: "flip".into(), token, registration });
    sim.gateway_sends(0, end(SessionOf::Epoch(4)));
    assert!(!sim.has_packet(c), "an older epoch");
    sim.gateway_sends(0, end(SessionOf::Epoch(5)));
    sim.pop(c, |p| assert!(matches!(p, Packet::Disconnect(_)), "{p:?}"));
}

/// The registration of a connection answered ahead and its end may wait for the gateway's next wake-up;
/// a registration the CONNECT waits for may not.
#[test]
fn only_what_nothing_waits_for_may_wait_for_the_gateway() {
    use crate::io::Core;
    let mut sim = clustered_ahead(1);
    let (c, _) = sim.connect(0, V5, "a", true);
    sim.drop_conn(c);
    let _held = sim.connect_with(0, V5, |k| {
        k.client_id = "b";
        k.properties.session_expiry_interval_s = Some(60);
    });
    let kinds: Vec<(bool, bool)> = sim
        .to_gateway
        .iter()
        .filter(|(_, m)| matches!(m, Mesh::Register { .. } | Mesh::Unregister { .. }))
        .map(|(_, m)| (matches!(m, Mesh::Register { ahead: false, .. }), Shard::mesh_can_wait(m)))
        .collect();
    assert_eq!(kinds, vec![(false, true), (false, true), (true, false)]);
}
