//! Fuzzes the shard cores as a whole: arbitrary bytes are read as a sequence of client operations
//! (connect, subscribe, publish, ack, disconnect, time, held mesh, crash) against 1–3 real `Shard` cores
//! in the deterministic harness, with the protocol invariants of the harness's driver checked after every
//! step and once everything settled (see `shard/src/core/tests/driver.rs`; the proptest
//! `core::tests::random` runs the same driver).
//!
//! Input: one byte choosing the node (bits 0–1: shards, bit 2: durable with crashes, bits 3–7: the
//! harness's interleaving seed), then operations as `driver::Op::take` reads them.

#![no_main]

use libfuzzer_sys::fuzz_target;

// The harness and its driver are the shard crate's test code, included by path so they need not be
// public API of the crate. These items give them the paths they use inside it.
mod core {
    pub use shardmq_shard::core::*;
}
mod io {
    pub use shardmq_shard::io::*;
}
use shardmq_shard::{ConnId, ShardId};

#[path = "../../shard/src/core/tests/sim.rs"]
#[allow(dead_code)]
mod sim;

#[path = "../../shard/src/core/tests/driver.rs"]
#[allow(dead_code)]
mod driver;

fuzz_target!(|data: &[u8]| {
    let Some((&node, mut ops)) = data.split_first() else { return };
    let shards = 1 + (node & 3) as u16 % 3;
    let durable = node & 4 != 0;
    let mut d = driver::Driver::new(shards, durable, (node >> 3) as u64);
    while let Some(op) = driver::Op::take(&mut ops) {
        d.apply(&op);
    }
    d.settle();
});
