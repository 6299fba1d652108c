//! Subscriptions of a stored session are logged one change at a time (SUB records on top of its SESSION
//! record), and come back exactly after a crash.

use std::collections::BTreeMap;

use shardmq_wire::{Packet, PacketId, QoS, SubOptions, Unsubscribe};

use super::sim::*;
use crate::core::*;

fn by_name(sim: &Sim) -> BTreeMap<&'static str, u64> {
    let (_, sc) = sim.data.as_ref().unwrap();
    let clock = WallClock { base: sim.now, base_unix_ms: 1_800_000_000_000 };
    let mut out = BTreeMap::new();
    for r in inspect_node(&sc.dir, clock).unwrap() {
        for (n, c) in r.by_name {
            *out.entry(n).or_default() += c;
        }
    }
    out
}

fn subscribe(sim: &mut Sim, c: C, filter: &str, qos: QoS) {
    sim.subscribe_opts(c, filter, SubOptions { qos, ..Default::default() }, None);
    sim.pop(c, |p| assert!(matches!(p, Packet::SubAck(_)), "{p:?}"));
}

fn unsubscribe(sim: &mut Sim, c: C, filter: &str) {
    sim.send(
        c,
        &Packet::Unsubscribe(Unsubscribe {
            packet_id: PacketId(7),
            filters: vec![filter],
            properties: Default::default(),
        }),
    );
    sim.pop(c, |p| assert!(matches!(p, Packet::UnsubAck(_)), "{p:?}"));
}

fn reconnect(sim: &mut Sim, id: &str) -> C {
    let (c, present) = sim.connect(0, V3, id, false);
    assert!(present);
    c
}

#[test]
fn subscription_changes_come_back_exactly_after_a_crash() {
    let mut sim = Sim::durable(1, Config::default());
    let (c, _) = sim.connect(0, V3, "subs", false);
    for i in 0..10 {
        subscribe(&mut sim, c, &format!("f/{i}"), QoS::AtLeastOnce);
    }
    for i in [2, 5, 7] {
        unsubscribe(&mut sim, c, &format!("f/{i}"));
    }
    // A changed subscription: f/1 again at QoS 0.
    subscribe(&mut sim, c, "f/1", QoS::AtMostOnce);
    sim.crash_and_restart();
    let c = reconnect(&mut sim, "subs");
    let (p, _) = sim.connect(0, V3, "pub", true);
    for i in 0..10u16 {
        sim.publish(p, &format!("f/{i}"), &[i as u8], QoS::AtLeastOnce, false, i + 1);
        sim.pop(p, |_| ());
    }
    let mut got = BTreeMap::new();
    while sim.has_packet(c) {
        let (topic, _, qos, ..) = sim.pop_publish(c);
        got.insert(topic, qos);
    }
    let want: BTreeMap<String, QoS> = [0, 1, 3, 4, 6, 8, 9]
        .iter()
        .map(|i| (format!("f/{i}"), if *i == 1 { QoS::AtMostOnce } else { QoS::AtLeastOnce }))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn one_subscribe_writes_one_small_record_not_the_whole_session() {
    let mut sim = Sim::durable(1, Config::default());
    let (c, _) = sim.connect(0, V3, "many", false);
    for i in 0..200 {
        subscribe(&mut sim, c, &format!("dev/{i}/state"), QoS::AtLeastOnce);
    }
    // Bytes appended by the next 100 subscribes (64 KiB segments; compaction only adds to this).
    let appended = |(seg, off): (u64, u64)| seg * 64 * 1024 + off;
    let start = appended(sim.shards[0].log_written().unwrap());
    for i in 200..300 {
        subscribe(&mut sim, c, &format!("dev/{i}/state"), QoS::AtLeastOnce);
    }
    let bytes = appended(sim.shards[0].log_written().unwrap()) - start;
    // One ~50-byte record each, plus a rewrite when the changes reach max(32, subscriptions); the whole
    // record each time would be ~100 x 6 KB.
    assert!(bytes < 32 * 1024, "{bytes} bytes of log for 100 subscribes to a 200-subscription session");
    assert!(by_name(&sim).get("subscription").copied().unwrap_or(0) > 0);
    // And they replay: every filter is there after a crash.
    sim.crash_and_restart();
    let c = reconnect(&mut sim, "many");
    let (p, _) = sim.connect(0, V3, "pub", true);
    sim.publish(p, "dev/299/state", b"x", QoS::AtMostOnce, false, 0);
    sim.publish(p, "dev/0/state", b"y", QoS::AtMostOnce, false, 0);
    assert_eq!(sim.pop_publish(c).0, "dev/299/state");
    assert_eq!(sim.pop_publish(c).0, "dev/0/state");
}

#[test]
fn churn_with_rewrites_and_compaction_keeps_the_exact_set() {
    let mut sim = Sim::durable(1, Config::default());
    let (c, _) = sim.connect(0, V3, "churn", false);
    let mut live = std::collections::BTreeSet::new();
    for round in 0..400u32 {
        let f = format!("c/{}", round % 13);
        if live.contains(&f) && round % 3 != 0 {
            unsubscribe(&mut sim, c, &f);
            live.remove(&f);
        } else {
            subscribe(&mut sim, c, &f, QoS::AtLeastOnce);
            live.insert(f);
        }
        if round % 97 == 0 {
            // Time passes: compaction gets its budget.
            sim.advance(std::time::Duration::from_secs(5));
        }
    }
    sim.crash_and_restart();
    let c = reconnect(&mut sim, "churn");
    let (p, _) = sim.connect(0, V3, "pub", true);
    for i in 0..13u16 {
        sim.publish(p, &format!("c/{i}"), b"m", QoS::AtMostOnce, false, 0);
    }
    let mut got = std::collections::BTreeSet::new();
    while sim.has_packet(c) {
        got.insert(sim.pop_publish(c).0);
    }
    assert_eq!(got, live);
}
