//! The shards' side of the cluster gateway (mesh id `shards`, with `Config::cluster_gateway`): the test
//! plays the gateway and checks what the shards send it and do with what it sends.

use std::sync::Arc;

use shardmq_wire::{Packet, QoS, SubOptions};

use super::sim::*;
use crate::core::*;
use crate::ShardId;

fn clustered(n: u16) -> Sim {
    let mut sim = Sim::with(n, Config { cluster_gateway: true, ..Config::default() });
    for s in 0..n {
        sim.gateway_sends(s, Mesh::ForwardAll { on: true, token: Some(0) });
    }
    let acks: Vec<_> = sim.to_gateway.drain(..).collect();
    // Each shard tells what sessions it restored (before its answer: the gateway serves peers only once
    // every shard answered), acknowledges, then tells what retained messages it holds (none here).
    assert_eq!(acks.len(), 3 * n as usize);
    for three in acks.chunks(3) {
        assert!(matches!(&three[0].1, Mesh::SessionsHeld { sessions } if sessions.is_empty()), "{acks:?}");
        assert!(matches!(three[1].1, Mesh::InterestAck { token: 0 }), "{acks:?}");
        assert!(matches!(&three[2].1, Mesh::RetainedHeld { msgs } if msgs.is_empty()), "{acks:?}");
    }
    sim
}

fn gateway_delivers(sim: &mut Sim) -> Vec<(ShardId, Arc<Msg>, bool, Vec<SharedKey>)> {
    let mut out = Vec::new();
    let mut rest = std::collections::VecDeque::new();
    while let Some((from, m)) = sim.to_gateway.pop_front() {
        match m {
            Mesh::Deliver { msg, normal, groups, .. } => out.push((from, msg, normal, groups)),
            other => rest.push_back((from, other)),
        }
    }
    sim.to_gateway = rest;
    out
}

#[test]
fn every_publish_goes_to_the_gateway_once_it_asks_and_not_after() {
    let mut sim = clustered(2);
    let (p, _) = sim.connect(1, V5, &id_on(1, 2, "pub"), true);
    sim.publish(p, "a/b", b"1", QoS::AtMostOnce, false, 0);
    let d = gateway_delivers(&mut sim);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!((d[0].0, &*d[0].1.topic, &*d[0].1.payload, d[0].2), (ShardId(1), "a/b", &b"1"[..], true));
    for s in 0..2 {
        sim.gateway_sends(s, Mesh::ForwardAll { on: false, token: None });
    }
    sim.publish(p, "a/b", b"2", QoS::AtMostOnce, false, 0);
    assert!(gateway_delivers(&mut sim).is_empty());
}

#[test]
fn a_suback_waits_for_the_gateway_and_a_message_from_it_reaches_the_subscriber() {
    let mut sim = clustered(2);
    let (s, _) = sim.connect(0, V5, &id_on(0, 2, "sub"), true);
    sim.subscribe_opts(s, "x/#", SubOptions { qos: QoS::AtLeastOnce, ..Default::default() }, None);
    assert!(!sim.has_packet(s), "the SUBACK left before the gateway acknowledged");
    let (from, m) = sim.to_gateway.pop_front().expect("the gateway hears the new interest");
    let Mesh::Interest { deltas, token: Some(token), .. } = m else { panic!("{m:?}") };
    assert_eq!(from, ShardId(0));
    assert_eq!((deltas.len(), &*deltas[0].key.1, deltas[0].members), (1, "x/#", 1));
    sim.gateway_sends(0, Mesh::InterestAck { token });
    sim.pop(s, |p| assert!(matches!(p, Packet::SubAck(_)), "{p:?}"));
    // A peer's message, delivered by the gateway: no origin, never sent back to the gateway.
    let msg = Arc::new(Msg {
        topic: "x/y".into(),
        payload: b"remote".to_vec().into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        expires_at: None,
        props: None,
        origin: None,
    });
    sim.gateway_sends(0, Mesh::Deliver { msg, normal: true, groups: Vec::new(), rerouted: false, ack: None });
    let (topic, payload, qos, ..) = sim.pop_publish(s);
    assert_eq!((topic.as_str(), payload.as_slice(), qos), ("x/y", &b"remote"[..], QoS::AtLeastOnce));
    assert!(gateway_delivers(&mut sim).is_empty());
}

/// The retained updates the shards fanned out to the gateway (everything else it was sent is dropped).
fn retained_fanout(sim: &mut Sim) -> Vec<Arc<Msg>> {
    sim.to_gateway
        .drain(..)
        .filter_map(|(_, m)| match m {
            Mesh::Retain { msg, apply: true, .. } => Some(msg),
            _ => None,
        })
        .collect()
}

#[test]
fn retained_updates_reach_the_gateway_and_its_own_come_back_as_the_same_message() {
    let mut sim = clustered(3);
    let (p, _) = sim.connect(2, V5, &id_on(2, 3, "pub"), true);
    sim.publish(p, "r/1", b"v", QoS::AtMostOnce, true, 0);
    let retains = retained_fanout(&mut sim);
    assert_eq!(retains.len(), 1, "exactly the owner's fan-out reaches the gateway");
    assert_eq!(&*retains[0].payload, b"v");
    // A peer's update, handed to the topic's owner: stored, given to every shard, and echoed to the
    // gateway with the very same message (how the gateway tells it from a local update).
    let remote = Arc::new(Msg {
        topic: "r/2".into(),
        payload: b"w".to_vec().into(),
        qos: QoS::AtMostOnce,
        retain: true,
        expires_at: None,
        props: None,
        origin: None,
    });
    let owner = owner_of("r/2", 3);
    sim.gateway_sends(owner.0, Mesh::Retain { msg: remote.clone(), apply: false, ack: None });
    let echoes = retained_fanout(&mut sim);
    assert_eq!(echoes.len(), 1);
    assert!(Arc::ptr_eq(&echoes[0], &remote));
    let (s, _) = sim.connect(0, V5, &id_on(0, 3, "late"), true);
    sim.subscribe_opts(s, "r/#", SubOptions::default(), None);
    let (_, Some(Mesh::Interest { token: Some(t), .. })) =
        sim.to_gateway.pop_front().map(|(f, m)| (f, Some(m))).unwrap_or((ShardId(0), None))
    else {
        panic!("no interest announcement")
    };
    sim.gateway_sends(0, Mesh::InterestAck { token: t });
    sim.pop(s, |p| assert!(matches!(p, Packet::SubAck(_)), "{p:?}"));
    let mut got: Vec<Vec<u8>> = (0..2).map(|_| sim.pop_publish(s).1).collect();
    got.sort();
    assert_eq!(got, [b"v".to_vec(), b"w".to_vec()]);
}

#[test]
fn shared_groups_weigh_the_zones_remote_members_against_the_local_ones() {
    let mut sim = clustered(1);
    let (m, _) = sim.connect(0, V5, "member", true);
    sim.subscribe_opts(m, "$share/g/t", SubOptions::default(), None);
    // Even on a one-shard node the SUBACK waits for the gateway (the only other mesh endpoint).
    while let Some((_, msg)) = sim.to_gateway.pop_front() {
        if let Mesh::Interest { token: Some(t), .. } = msg {
            sim.gateway_sends(0, Mesh::InterestAck { token: t });
        }
    }
    sim.pop(m, |p| assert!(matches!(p, Packet::SubAck(_)), "{p:?}"));
    let key: SharedKey = (Some("g".into()), "t".into());
    let delta = InterestDelta { key: key.clone(), members: 3, durable: 3 };
    sim.gateway_sends(0, Mesh::Interest { deltas: vec![delta], token: None, generation: 0 });
    let (p, _) = sim.connect(0, V5, "pub", true);
    for i in 0..8u8 {
        sim.publish(p, "t", &[i], QoS::AtMostOnce, false, 0);
    }
    let to_gw = gateway_delivers(&mut sim);
    let remote = to_gw.iter().filter(|(_, _, _, g)| g.contains(&key)).count();
    let mut local = 0;
    while sim.has_packet(m) {
        sim.pop_publish(m);
        local += 1;
    }
    assert_eq!((remote, local), (6, 2), "3 remote members to 1 local one");
}

#[test]
fn a_shard_tells_the_gateway_the_retained_messages_it_owns_when_the_gateway_starts() {
    let cfg = Config { cluster_gateway: true, ..Config::default() };
    let mut sim = Sim::with(2, cfg);
    let (p, _) = sim.connect(0, V5, &id_on(0, 2, "pub"), true);
    let topics: Vec<String> = (0..20).map(|i| format!("held/{i}")).collect();
    for t in &topics {
        sim.publish(p, t, b"v", QoS::AtMostOnce, true, 0);
    }
    sim.to_gateway.clear();
    for s in 0..2 {
        sim.gateway_sends(s, Mesh::ForwardAll { on: true, token: None });
    }
    let mut held: Vec<(ShardId, String)> = Vec::new();
    for (from, m) in sim.to_gateway.drain(..) {
        if let Mesh::RetainedHeld { msgs } = m {
            held.extend(msgs.iter().map(|m| (from, m.topic.to_string())));
        }
    }
    held.sort();
    let mut want: Vec<(ShardId, String)> = topics.iter().map(|t| (owner_of(t, 2), t.clone())).collect();
    want.sort();
    assert_eq!(held, want, "each retained message once, from its owner");
    // Asked again (already forwarding), a shard does not repeat them.
    sim.gateway_sends(0, Mesh::ForwardAll { on: true, token: None });
    assert!(sim.to_gateway.iter().all(|(_, m)| !matches!(m, Mesh::RetainedHeld { .. })));
}

#[test]
fn shards_keep_the_peers_the_gateway_announces() {
    let mut sim = clustered(2);
    let up: Vec<Arc<str>> = vec!["n2".into(), "n3".into()];
    sim.gateway_sends(1, Mesh::Peers { up: up.clone() });
    assert_eq!(sim.shards[1].cluster_peers(), &up[..]);
    assert!(sim.shards[0].cluster_peers().is_empty());
}

#[test]
fn sys_topics_stay_on_their_node() {
    let mut sim = clustered(2);
    let (p, _) = sim.connect(1, V5, &id_on(1, 2, "pub"), true);
    sim.publish(p, "$SYS/broker/x", b"1", QoS::AtMostOnce, true, 0);
    sim.publish(p, "a/b", b"2", QoS::AtMostOnce, true, 0);
    let topics: Vec<String> = sim
        .to_gateway
        .drain(..)
        .filter_map(|(_, m)| match m {
            Mesh::Retain { msg, .. } | Mesh::Deliver { msg, .. } => Some(msg.topic.to_string()),
            _ => None,
        })
        .collect();
    assert!(topics.iter().all(|t| t == "a/b"), "{topics:?}");
    assert!(!topics.is_empty(), "the other topic does reach the gateway");
    assert_eq!(sim.shards[0].retained_count(), 2, "$SYS is still replicated inside the node");
}
