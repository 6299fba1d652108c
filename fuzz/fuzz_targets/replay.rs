//! Fuzzes the shard's log replay: a record that passed its CRC but was written by a buggy or different
//! build must give an error, never a panic, and replay must still finish.
//!
//! Input: records as `type u8 | length u16 (LE) | payload`, applied in order.

#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use shardmq_shard::core::{Replay, WallClock};
use shardmq_storage::RecordType;

fuzz_target!(|data: &[u8]| {
    let mut r = Replay::new(WallClock { base: Instant::now(), base_unix_ms: 1_800_000_000_000 });
    let mut rest = data;
    while rest.len() >= 3 {
        let t = RecordType(rest[0] % 12);
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let _ = r.apply(t, &rest[3..3 + len]);
        rest = &rest[3 + len..];
    }
    let _ = r.finish();
});
