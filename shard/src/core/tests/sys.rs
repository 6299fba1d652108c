//! `$SYS` topics and the published metrics: node-wide values from every shard, as retained messages.

use std::time::Duration;

use shardmq_wire::QoS;

use super::sim::*;
use crate::core::*;

/// The retained value of `$SYS/broker/<topic>`, as a new subscriber on `shard` gets it.
fn sys_value(sim: &mut Sim, shard: u16, topic: &str) -> String {
    let (c, _) = sim.connect(shard, V3, &id_on(shard, 2, "sys-reader"), true);
    sim.subscribe(c, &format!("$SYS/broker/{topic}"), QoS::AtMostOnce);
    let (t, payload, _, retain, _, _) = sim.pop_publish(c);
    assert_eq!(t, format!("$SYS/broker/{topic}"));
    assert!(retain, "a new subscriber gets the retained value");
    sim.drop_conn(c);
    String::from_utf8(payload).expect("text")
}

#[test]
fn sys_topics_carry_node_wide_values_and_are_refreshed() {
    let mut sim = Sim::with(2, Config { sys_interval_s: 5, ..Config::default() });
    let now = sim.now;
    for s in &mut sim.shards {
        s.start_sys(now);
    }
    sim.advance(Duration::from_millis(1));
    assert!(sys_value(&mut sim, 1, "version").starts_with("shardmq version "));
    assert_eq!(sys_value(&mut sim, 1, "messages/received"), "0");
    // Publishes on both shards count, whichever shard publishes $SYS.
    let (p0, _) = sim.connect(0, V3, &id_on(0, 2, "p0"), true);
    let (p1, _) = sim.connect(1, V3, &id_on(1, 2, "p1"), true);
    for _ in 0..3 {
        sim.publish(p0, "x", b"1", QoS::AtMostOnce, false, 0);
    }
    sim.publish(p1, "x", b"1", QoS::AtMostOnce, false, 0);
    // Not yet: the next publication is due 5 s after the first.
    sim.advance(Duration::from_secs(1));
    assert_eq!(sys_value(&mut sim, 0, "messages/received"), "0");
    sim.advance(Duration::from_secs(4));
    assert_eq!(sys_value(&mut sim, 0, "messages/received"), "4");
    assert_eq!(sys_value(&mut sim, 1, "uptime"), "5 seconds");
    assert_eq!(sys_value(&mut sim, 1, "clients/connected"), "2");
    // Four PUBLISH packets of 5 bytes (QoS 0, topic "x", payload "1") and more: CONNECTs and SUBSCRIBEs.
    let received: u64 = sys_value(&mut sim, 0, "bytes/received").parse().expect("a number");
    assert!(received > 4 * 5, "{received}");
    let sent: u64 = sys_value(&mut sim, 0, "bytes/sent").parse().expect("a number");
    assert!(sent > 0, "{sent}");
    let load: f64 = sys_value(&mut sim, 0, "load/messages/received/1min").parse().expect("a number");
    assert!(load > 0.0, "{load}");
}

#[test]
fn no_sys_topics_when_disabled() {
    let mut sim = Sim::with(1, Config { sys_interval_s: 0, ..Config::default() });
    let now = sim.now;
    sim.shards[0].start_sys(now);
    sim.advance(Duration::from_secs(20));
    assert_eq!(sim.shards[0].retained_count(), 0);
}

#[test]
fn metrics_are_published_to_the_shared_slots_within_their_period() {
    let mut sim = Sim::new(2);
    let (p, _) = sim.connect(1, V3, &id_on(1, 2, "p"), true);
    let received = |sim: &Sim| -> u64 {
        let v = sim.shards[1].shared.metrics[1].load();
        v[metrics::SERIES.iter().position(|s| s.name == "shardmq_messages_received_total").unwrap()]
    };
    sim.publish(p, "x", b"1", QoS::AtMostOnce, false, 0);
    sim.advance(metrics::PUBLISH_EVERY);
    assert_eq!(received(&sim), 1);
    sim.publish(p, "x", b"1", QoS::AtMostOnce, false, 0);
    // Held back within the period, but the shard asks to wake for it: an idle shard still publishes.
    assert!(sim.shards[1].poll_timeout().is_some());
    sim.advance(metrics::PUBLISH_EVERY);
    assert_eq!(received(&sim), 2);
}

#[test]
fn sys_topics_are_not_stored() {
    let mut sim = Sim::durable(2, Config { sys_interval_s: 1, ..Config::default() });
    let now = sim.now;
    sim.shards[0].start_sys(now);
    sim.advance(Duration::from_secs(2));
    assert!(sim.shards[1].retained_count() > 0, "replicated to the other shard");
    sim.crash_and_restart();
    // Nothing publishes $SYS after the restart here: whatever is held came from the log.
    assert_eq!(sim.shards.iter().map(|s| s.retained_count()).sum::<usize>(), 0);
}
