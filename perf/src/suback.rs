//! `suback`: how long a broker takes to acknowledge a new subscription, SUBSCRIBE sent to SUBACK read, one
//! at a time over one connection, each to a filter no one has subscribed to yet. A clustered broker that
//! acknowledges only once every peer knows the new interest pays a round trip to its peers here; a single
//! node does not, which is what comparing the two shows.

use crate::client::{Client, Dial};
use crate::stats::{self, LatencySummary};
use anyhow::Result;
use serde::Serialize;
use shardmq_wire::{Protocol, QoS};
use std::net::SocketAddrV4;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct SubackReport {
    pub scenario: String,
    pub protocol: u8,
    pub qos: u8,
    pub subscribes: u64,
    pub latency_us: LatencySummary,
}

/// Subscribes `count` times to `bench/suback/<tag>/<i>`; fails on the first refused SUBACK.
pub fn run(
    addr: SocketAddrV4,
    protocol: Protocol,
    dial: &Dial,
    qos: QoS,
    count: u64,
) -> Result<SubackReport> {
    let tag = format!("smq{}", std::process::id());
    let mut cl = Client::connect(addr, &format!("{tag}-suback"), protocol, dial)?;
    let mut h = stats::new_histogram();
    for i in 0..count {
        let filter = format!("bench/suback/{tag}/{i}");
        let t = Instant::now();
        cl.subscribe(&filter, qos)?;
        stats::record(&mut h, t.elapsed().as_micros() as u64);
    }
    Ok(SubackReport {
        scenario: "suback".into(),
        protocol: protocol.level(),
        qos: qos as u8,
        subscribes: count,
        latency_us: LatencySummary::of(&h),
    })
}
