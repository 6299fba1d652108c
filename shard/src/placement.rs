//! Placement: which shard owns a client id or a retained topic.
//!
//! A shard's log holds the sessions and retained messages it owns, so the owner of a key must be the same
//! in every process that opens a data directory: across restarts, rebuilds, `cargo update`s and CPUs. That
//! rules out hashers whose output is unspecified (`ahash` switches algorithm with the `aes` target feature
//! and may change between versions; `std`'s `DefaultHasher` says not to rely on it). The placement hash is
//! XXH3-64 with seed 0 (a published specification, with test vectors), and the data directory records
//! [`PLACEMENT`] so that a build that placed keys differently is refused instead of silently looking for
//! sessions on the wrong shards. The cluster's rendezvous hashing of client ids to nodes uses the same
//! [`stable_hash`].

use crate::ShardId;

/// The placement rule's name, as recorded in a data directory's `META`. Change it with the rule.
pub const PLACEMENT: &str = "xxh3-64-seed0-mod";

/// XXH3-64 of `bytes` with seed 0: the same value on every build and CPU.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, 0)
}

/// The shard that owns `key` (a client id or a retained topic) on a node of `shards` shards:
/// `stable_hash(key) mod shards`.
pub fn owner_of(key: &str, shards: u16) -> ShardId {
    ShardId((stable_hash(key.as_bytes()) % shards.max(1) as u64) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_xxh3_64_as_specified() {
        // Values of the reference C implementation (libxxhash 0.8, XXH3_64bits), covering the short,
        // mid-size and long (> 240 bytes) code paths.
        assert_eq!(stable_hash(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(stable_hash(b"a"), 0xe6c6_32b6_1e96_4e1f);
        assert_eq!(stable_hash(b"client-1"), 0x0b97_0b85_a12b_176e);
        assert_eq!(stable_hash(b"sensor/42/temp"), 0xba12_cfc3_a476_73a3);
        assert_eq!(stable_hash(&[b'x'; 300]), 0xa5d1_b460_7dc8_3554);
    }

    #[test]
    fn placement_is_pinned() {
        // Owners computed once with this rule. A different answer means keys move between shards and
        // every existing data directory would be misread: change PLACEMENT along with the rule.
        let got: Vec<u16> =
            ["client-1", "sensor/42/temp", "", "shardmq-0-1", "a"].iter().map(|k| owner_of(k, 7).0).collect();
        assert_eq!(got, PINNED);
    }

    const PINNED: [u16; 5] = [1, 4, 4, 1, 1];
}
