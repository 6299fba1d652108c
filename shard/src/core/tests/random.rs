//! Random sequences of client operations on 1–3 shards, in memory or durable with crashes, under a random
//! harness seed; `driver` checks the protocol invariants after every step and once everything settled.

use proptest::prelude::*;

use super::driver::*;

fn connect(client: impl Strategy<Value = u8>) -> impl Strategy<Value = Op> {
    // Keep alive 0 (none) half the time, so most connections outlive the time steps.
    let keep_alive_s = prop_oneof![Just(0u8), 1u8..20];
    let will = proptest::option::of((any::<u8>(), 0u8..3, any::<bool>()));
    (client, any::<u8>(), any::<bool>(), any::<bool>(), keep_alive_s, any::<u8>(), will).prop_map(
        |(client, shard, v5, clean, keep_alive_s, expiry_s, will)| Op::Connect {
            client,
            shard,
            v5,
            clean,
            keep_alive_s,
            expiry_s,
            will,
        },
    )
}

/// Every client connected first (with random options), so most operations act on a live connection.
fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    let first: Vec<_> = (0..CLIENTS).map(|c| connect(Just(c))).collect();
    (first, proptest::collection::vec(op(), 1..max)).prop_map(|(mut first, ops)| {
        first.extend(ops);
        first
    })
}

fn op() -> impl Strategy<Value = Op> {
    let client = 0..CLIENTS;
    prop_oneof![
        4 => connect(client.clone()),
        4 => (client.clone(), any::<u8>(), 0u8..3).prop_map(|(client, filter, qos)| Op::Subscribe { client, filter, qos }),
        1 => (client.clone(), any::<u8>()).prop_map(|(client, filter)| Op::Unsubscribe { client, filter }),
        10 => (client.clone(), any::<u8>(), 0u8..3, any::<bool>())
            .prop_map(|(client, topic, qos, retain)| Op::Publish { client, topic, qos, retain }),
        3 => (client.clone(), 0u8..8).prop_map(|(client, n)| Op::Ack { client, n }),
        1 => client.clone().prop_map(|client| Op::Ping { client }),
        1 => client.clone().prop_map(|client| Op::Disconnect { client }),
        1 => client.prop_map(|client| Op::Drop { client }),
        1 => prop_oneof![3 => 0u16..100, 1 => 1000u16..20_000].prop_map(|ms| Op::Advance { ms }),
        1 => any::<bool>().prop_map(Op::HoldMesh),
        1 => Just(Op::Crash),
    ]
}

fn run(shards: u16, durable: bool, seed: u64, ops: &[Op]) {
    let mut d = Driver::new(shards, durable, seed);
    for op in ops {
        d.apply(op);
    }
    d.settle();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_protocol_invariants_in_memory(
        shards in 1u16..=3,
        seed in any::<u64>(),
        ops in ops(60),
    ) {
        run(shards, false, seed, &ops);
    }
}

proptest! {
    // Every write is fsynced: fewer, shorter cases.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_protocol_invariants_across_crashes(
        shards in 1u16..=3,
        seed in any::<u64>(),
        ops in ops(40),
    ) {
        run(shards, true, seed, &ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// The fuzz target's input: arbitrary bytes read as operations by `Op::take`.
    #[test]
    fn random_bytes_read_as_operations_keep_the_protocol_invariants(
        shards in 1u16..=3,
        seed in any::<u64>(),
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut d = Driver::new(shards, false, seed);
        let mut data = bytes.as_slice();
        while let Some(op) = Op::take(&mut data) {
            d.apply(&op);
        }
        d.settle();
    }
}
