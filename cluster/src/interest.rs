//! Node-level interest: what a node tells its peers so that they forward a publish to it only when one
//! of its subscriptions may match, in space that does not grow with its subscriber count.
//!
//! The sender ([`LocalInterest`]) counts subscribers per filter and reports only 0 → 1 ([`Delta::Add`])
//! and 1 → 0 ([`Delta::Remove`]). Now and then it sends a [`Snapshot`]: the exact filters (no wildcard)
//! as a BinaryFuse8 summary of their topic keys (about 9 bits each, under 0.4% false positives, never a
//! false negative) and the wildcard filters as a list. Filters are immutable, so between snapshots the
//! deltas travel explicitly; each carries the generation of the snapshot it follows.
//!
//! Shared subscriptions (`$share/group/filter`) are announced apart, with their member count on every
//! change ([`Delta::Members`]): a publish goes to one member of a group in the whole zone, chosen by
//! member count across nodes, so every node needs the counts (see `router`).
//!
//! The receiver ([`PeerInterest`]) answers [`PeerInterest::may_match`]: the summary, the exact filters
//! added since it, and a trie of the wildcard filters. A removed exact filter stays in the summary until
//! the next snapshot (a false positive: the receiving node matches against its own index and counts
//! it); nothing that is subscribed is ever answered "no".

use std::collections::{HashMap, HashSet};

use shardmq_wire::topic;

use crate::bytes::{ReadError, Reader};
use xorf::{BinaryFuse8, Filter};

/// The key of a topic (or of an exact filter, which is a topic) in the summary: XXH3-64, seed 0.
pub fn topic_key(topic: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(topic.as_bytes(), 0)
}

fn is_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// A change of a node's interest, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// The first subscriber to this filter on the node.
    Add(Box<str>),
    /// The last one left.
    Remove(Box<str>),
    /// A shared subscription's (`$share/group/filter`) member count on the node changed (0: none left).
    Members { filter: Box<str>, count: u32 },
}

/// A node's whole interest at one generation.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub generation: u64,
    /// The exact filters' keys; `None` when there are none.
    pub exact: Option<BinaryFuse8>,
    /// Exact keys the summary could not take (its construction failed): sent as they are.
    pub exact_plain: Vec<u64>,
    pub wildcards: Vec<Box<str>>,
    /// Shared subscriptions and their member counts on the node.
    pub shared: Vec<(Box<str>, u32)>,
}

/// Why a snapshot from a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("interest snapshot truncated at byte {0}")]
    Truncated(usize),
    #[error("interest snapshot: summary descriptor inconsistent with its {0} fingerprints")]
    BadSummary(usize),
    #[error("interest snapshot: a filter is not valid UTF-8 or not a valid filter")]
    BadFilter,
    #[error("interest snapshot: {0} bytes left over")]
    Trailing(usize),
}

/// Snapshot layout (all integers little-endian):
/// `generation u64 | has_summary u8 | [seed u64 | segment_length u32 | mask u32 | segment_count_length u32 |
/// fingerprints u32-length-prefixed] | plain keys u32 count, u64 each | wildcards u32 count, each u16-length
/// UTF-8 | shared u32 count, each u16-length UTF-8 and u32 members`.
impl Snapshot {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.generation.to_le_bytes());
        match &self.exact {
            None => out.push(0),
            Some(f) => {
                out.push(1);
                let d = &f.descriptor;
                out.extend_from_slice(&d.seed.to_le_bytes());
                out.extend_from_slice(&d.segment_length.to_le_bytes());
                out.extend_from_slice(&d.segment_length_mask.to_le_bytes());
                out.extend_from_slice(&d.segment_count_length.to_le_bytes());
                out.extend_from_slice(&(f.fingerprints.len() as u32).to_le_bytes());
                out.extend_from_slice(&f.fingerprints);
            }
        }
        out.extend_from_slice(&(self.exact_plain.len() as u32).to_le_bytes());
        for k in &self.exact_plain {
            out.extend_from_slice(&k.to_le_bytes());
        }
        out.extend_from_slice(&(self.wildcards.len() as u32).to_le_bytes());
        for w in &self.wildcards {
            // Filters are at most 65,535 bytes (MQTT strings), so the length fits.
            out.extend_from_slice(&(w.len() as u16).to_le_bytes());
            out.extend_from_slice(w.as_bytes());
        }
        out.extend_from_slice(&(self.shared.len() as u32).to_le_bytes());
        for (f, n) in &self.shared {
            out.extend_from_slice(&(f.len() as u16).to_le_bytes());
            out.extend_from_slice(f.as_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
    }

    /// Decodes a peer's snapshot, refusing anything that could make a lookup read out of bounds.
    pub fn decode(b: &[u8]) -> Result<Snapshot, SnapshotError> {
        let mut r = Reader::new(b);
        let generation = r.u64()?;
        let exact = match r.u8()? {
            0 => None,
            _ => {
                let seed = r.u64()?;
                let segment_length = r.u32()?;
                let segment_length_mask = r.u32()?;
                let segment_count_length = r.u32()?;
                let n = r.u32()? as usize;
                let fingerprints: Box<[u8]> = r.take(n)?.into();
                // Lookups index up to segment_count_length + 2 * segment_length (see xorf's hash_of_hash):
                // check that against the fingerprints, and the shape the builder always gives.
                let need = segment_count_length as u64 + 2 * segment_length as u64;
                let sane = segment_length.is_power_of_two()
                    && segment_length_mask == segment_length - 1
                    && segment_count_length > 0
                    && segment_count_length % segment_length == 0
                    && need <= u32::MAX as u64
                    && need <= n as u64;
                if !sane {
                    return Err(SnapshotError::BadSummary(n));
                }
                let descriptor =
                    xorf::Descriptor { seed, segment_length, segment_length_mask, segment_count_length };
                Some(BinaryFuse8 { descriptor, fingerprints })
            }
        };
        let n = r.u32()? as usize;
        let mut exact_plain = Vec::with_capacity(n.min(b.len() / 8));
        for _ in 0..n {
            exact_plain.push(r.u64()?);
        }
        let n = r.u32()? as usize;
        let mut wildcards = Vec::with_capacity(n.min(b.len() / 2));
        for _ in 0..n {
            let len = r.u16()? as usize;
            let s = std::str::from_utf8(r.take(len)?).map_err(|_| SnapshotError::BadFilter)?;
            if !topic::valid_topic_filter(s) || topic::parse_shared(s).is_some() {
                return Err(SnapshotError::BadFilter);
            }
            wildcards.push(s.into());
        }
        let n = r.u32()? as usize;
        let mut shared = Vec::with_capacity(n.min(b.len() / 6));
        for _ in 0..n {
            let len = r.u16()? as usize;
            let s = std::str::from_utf8(r.take(len)?).map_err(|_| SnapshotError::BadFilter)?;
            if topic::parse_shared(s).is_none() {
                return Err(SnapshotError::BadFilter);
            }
            shared.push((s.into(), r.u32()?));
        }
        if !r.is_done() {
            return Err(SnapshotError::Trailing(b.len() - r.pos()));
        }
        Ok(Snapshot { generation, exact, exact_plain, wildcards, shared })
    }
}

impl From<ReadError> for SnapshotError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Short { at } => SnapshotError::Truncated(at),
            ReadError::VarintTooLong => SnapshotError::Truncated(0),
        }
    }
}

/// The sending side: this node's subscriber count per filter (full filters, `$share/...` included).
#[derive(Debug, Default)]
pub struct LocalInterest {
    counts: HashMap<Box<str>, u32>,
    generation: u64,
    pending: Vec<Delta>,
}

impl LocalInterest {
    /// One more subscriber to `filter`; the first one is announced (every one, for a shared filter).
    pub fn add(&mut self, filter: &str) {
        let n = self.counts.entry(filter.into()).or_insert(0);
        *n += 1;
        let count = *n;
        if topic::parse_shared(filter).is_some() {
            self.pending.push(Delta::Members { filter: filter.into(), count });
        } else if count == 1 {
            self.pending.push(Delta::Add(filter.into()));
        }
    }

    /// One subscriber fewer; the last one is announced (every one, for a shared filter).
    pub fn remove(&mut self, filter: &str) {
        let Some(n) = self.counts.get_mut(filter) else { return };
        *n -= 1;
        let count = *n;
        if count == 0 {
            self.counts.remove(filter);
        }
        if topic::parse_shared(filter).is_some() {
            self.pending.push(Delta::Members { filter: filter.into(), count });
        } else if count == 0 {
            self.pending.push(Delta::Remove(filter.into()));
        }
    }

    /// This node's subscriber count for a filter.
    pub fn count(&self, filter: &str) -> u32 {
        self.counts.get(filter).copied().unwrap_or(0)
    }

    /// The shared subscriptions this node has members of, with their counts.
    pub fn shared(&self) -> impl Iterator<Item = (&str, u32)> {
        self.counts.iter().filter(|(f, _)| topic::parse_shared(f).is_some()).map(|(f, n)| (&**f, *n))
    }

    /// The changes since the last call, tagged with the generation they follow.
    /// The generation the next deltas will carry.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn take_deltas(&mut self) -> (u64, Vec<Delta>) {
        (self.generation, std::mem::take(&mut self.pending))
    }

    /// The whole interest as a new generation, for a peer that comes up. Take the deltas first: they
    /// carry the previous generation and the other peers still need them (a peer that gets this snapshot
    /// ignores them as older than it).
    pub fn snapshot(&mut self) -> Snapshot {
        debug_assert!(self.pending.is_empty(), "take_deltas before a snapshot: other peers need them");
        self.generation += 1;
        let shared: Vec<(Box<str>, u32)> = self.shared().map(|(f, n)| (f.into(), n)).collect();
        let (wild, exact): (Vec<&Box<str>>, Vec<&Box<str>>) =
            self.counts.keys().filter(|f| topic::parse_shared(f).is_none()).partition(|f| is_wildcard(f));
        let mut keys: Vec<u64> = exact.iter().map(|f| topic_key(f)).collect();
        keys.sort_unstable();
        keys.dedup(); // the filter needs distinct keys
        let (summary, plain) = match keys.len() {
            0 => (None, Vec::new()),
            _ => match BinaryFuse8::try_from(&keys) {
                Ok(f) => (Some(f), Vec::new()),
                Err(_) => (None, keys),
            },
        };
        Snapshot {
            generation: self.generation,
            exact: summary,
            exact_plain: plain,
            wildcards: wild.into_iter().cloned().collect(),
            shared,
        }
    }
}

/// The receiving side: what one peer announced.
#[derive(Default)]
pub struct PeerInterest {
    generation: u64,
    summary: Option<BinaryFuse8>,
    /// Exact keys outside the summary: added since the snapshot, or sent plain.
    exact: HashSet<u64>,
    /// Exact filters added since the snapshot, with their keys.
    exact_filters: HashMap<Box<str>, u64>,
    wildcards: WildcardSet,
    /// Shared subscriptions and the peer's member count of each.
    shared: HashMap<Box<str>, u32>,
}

impl PeerInterest {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn apply_snapshot(&mut self, s: Snapshot) {
        self.generation = s.generation;
        self.summary = s.exact;
        self.exact = s.exact_plain.into_iter().collect();
        self.exact_filters.clear();
        self.wildcards = WildcardSet::default();
        for w in &s.wildcards {
            self.wildcards.insert(w);
        }
        self.shared = s.shared.into_iter().filter(|(_, n)| *n > 0).collect();
    }

    /// The peer's members of a shared subscription (`$share/group/filter`).
    pub fn members(&self, shared_filter: &str) -> u32 {
        self.shared.get(shared_filter).copied().unwrap_or(0)
    }

    /// The peer's shared subscriptions with members.
    pub fn shared(&self) -> impl Iterator<Item = (&str, u32)> {
        self.shared.iter().map(|(f, n)| (&**f, *n))
    }

    /// Applies a delta that follows snapshot `generation`. One for an older generation was sent before
    /// the snapshot applied since (a link keeps order), which already holds it: ignored (returns false).
    /// A newer one follows a snapshot made for another peer, and applies.
    pub fn apply_delta(&mut self, generation: u64, d: &Delta) -> bool {
        if generation < self.generation {
            return false;
        }
        match d {
            Delta::Members { filter, count: 0 } => {
                self.shared.remove(filter);
            }
            Delta::Members { filter, count } => {
                self.shared.insert(filter.clone(), *count);
            }
            Delta::Add(f) if is_wildcard(f) => self.wildcards.insert(f),
            Delta::Remove(f) if is_wildcard(f) => self.wildcards.remove(f),
            Delta::Add(f) => {
                let key = topic_key(f);
                self.exact_filters.insert(f.clone(), key);
                self.exact.insert(key);
            }
            Delta::Remove(f) => {
                // Only what was added since the snapshot can go; the summary keeps the rest until the
                // next one (a false positive, never a false negative).
                if let Some(key) = self.exact_filters.remove(f) {
                    self.exact.remove(&key);
                }
            }
        }
        true
    }

    /// Whether a publish to `topic` may match a (non-shared) subscription on the peer. Never false for a
    /// topic one of its announced filters matches.
    pub fn may_match(&self, topic: &str) -> bool {
        let key = topic_key(topic);
        self.summary.as_ref().is_some_and(|f| f.contains(&key))
            || self.exact.contains(&key)
            || self.wildcards.matches(topic)
    }
}

/// Wildcard filters as a trie of levels, counted (a filter announced twice must be withdrawn twice).
#[derive(Debug, Default)]
struct WildcardSet {
    root: Node,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Filters ending here.
    end: u32,
    /// Filters ending here with `/#` (or `#` at the root).
    hash: u32,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.end == 0 && self.hash == 0 && self.children.is_empty() && self.plus.is_none()
    }
}

impl WildcardSet {
    fn insert(&mut self, filter: &str) {
        let mut n = &mut self.root;
        for level in filter.split('/') {
            n = match level {
                "#" => {
                    n.hash += 1;
                    return;
                }
                "+" => n.plus.get_or_insert_with(Default::default),
                l => n.children.entry(l.into()).or_default(),
            };
        }
        n.end += 1;
    }

    fn remove(&mut self, filter: &str) {
        let levels: Vec<&str> = filter.split('/').collect();
        remove_at(&mut self.root, &levels);
    }

    fn matches(&self, topic: &str) -> bool {
        let levels: Vec<&str> = topic.split('/').collect();
        // MQTT §4.7.2: a filter starting with a wildcard does not match a `$` topic.
        let dollar = topic.starts_with('$');
        match_at(&self.root, &levels, dollar)
    }
}

/// Returns whether `n` is now empty (so its parent can drop it).
fn remove_at(n: &mut Node, levels: &[&str]) -> bool {
    match levels.split_first() {
        None => n.end = n.end.saturating_sub(1),
        Some((&"#", _)) => n.hash = n.hash.saturating_sub(1),
        Some((&"+", rest)) => {
            if let Some(child) = n.plus.as_mut() {
                if remove_at(child, rest) {
                    n.plus = None;
                }
            }
        }
        Some((l, rest)) => {
            if let Some(child) = n.children.get_mut(*l) {
                if remove_at(child, rest) {
                    n.children.remove(*l);
                }
            }
        }
    }
    n.is_empty()
}

fn match_at(n: &Node, levels: &[&str], first_is_dollar: bool) -> bool {
    // `a/#` matches `a` as well as everything below it.
    if n.hash > 0 && !first_is_dollar {
        return true;
    }
    let Some((level, rest)) = levels.split_first() else { return n.end > 0 };
    if let Some(child) = n.children.get(*level) {
        if match_at(child, rest, false) {
            return true;
        }
    }
    if let (Some(plus), false) = (&n.plus, first_is_dollar) {
        if match_at(plus, rest, false) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn deltas_are_the_zero_one_transitions() {
        let mut l = LocalInterest::default();
        l.add("a/b");
        l.add("a/b");
        l.add("x/+");
        l.remove("a/b");
        assert_eq!(l.take_deltas(), (0, vec![Delta::Add("a/b".into()), Delta::Add("x/+".into())]));
        l.remove("a/b");
        l.remove("never");
        assert_eq!(l.take_deltas(), (0, vec![Delta::Remove("a/b".into())]));
    }

    #[test]
    fn a_peer_matches_the_snapshot_then_the_deltas() {
        let mut l = LocalInterest::default();
        for f in ["s/1", "s/2", "w/+/t", "all/#", "$share/g/shared/x"] {
            l.add(f);
        }
        let mut p = PeerInterest::default();
        let _ = l.take_deltas(); // a fresh peer gets it all from the snapshot
        p.apply_snapshot(l.snapshot());
        for t in ["s/1", "s/2", "w/q/t", "all", "all/x/y"] {
            assert!(p.may_match(t), "{t}");
        }
        assert!(!p.may_match("shared/x"), "shared groups are routed by member count, not by may_match");
        assert_eq!(p.members("$share/g/shared/x"), 1);
        l.add("$share/g/shared/x");
        assert!(!p.may_match("w/q/t/u") && !p.may_match("w/t"));
        l.add("new/exact");
        l.add("new/+");
        l.remove("all/#");
        let (g, deltas) = l.take_deltas();
        for d in &deltas {
            assert!(p.apply_delta(g, d));
        }
        assert!(p.may_match("new/exact") && p.may_match("new/z"));
        assert!(!p.may_match("all/x/y"), "a withdrawn wildcard is gone at once");
        assert_eq!(p.members("$share/g/shared/x"), 2, "every member count change is announced");
        // A delta of an older generation is already in a newer snapshot.
        p.apply_snapshot(l.snapshot());
        assert!(!p.apply_delta(g, &Delta::Add("stale".into())));
        assert!(p.may_match("new/exact") && p.may_match("new/z") && p.may_match("s/1"));
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        let mut w = WildcardSet::default();
        w.insert("#");
        w.insert("+/x");
        assert!(!w.matches("$SYS/x") && !w.matches("$SYS"));
        assert!(w.matches("a/x"));
        w.insert("$SYS/#");
        assert!(w.matches("$SYS/x"));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("".to_string()),
            Just("$s".to_string())
        ]
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..4).prop_map(|v| v.join("/"))
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        let lvl = prop_oneof![4 => level(), 2 => Just("+".to_string())];
        (proptest::collection::vec(lvl, 1..4), any::<bool>(), any::<bool>()).prop_map(|(v, hash, shared)| {
            let mut f = v.join("/");
            if hash {
                f.push_str("/#");
            }
            if shared {
                f = format!("$share/g/{f}");
            }
            f
        })
    }

    #[test]
    fn a_snapshot_survives_its_encoding() {
        let mut l = LocalInterest::default();
        for i in 0..5000 {
            l.add(&format!("dev/{i}/state"));
        }
        l.add("dev/+/cmd");
        l.add("all/#");
        let _ = l.take_deltas(); // a fresh peer gets it all from the snapshot
        let s = l.snapshot();
        let mut b = Vec::new();
        s.encode(&mut b);
        // About 9 bits per exact filter for large sets, 10.7 at 5,000 (the size factor of small sets).
        assert!(b.len() < 5000 * 12 / 8 + 200, "{} bytes for 5,000 filters", b.len());
        let mut p = PeerInterest::default();
        p.apply_snapshot(Snapshot::decode(&b).unwrap());
        for i in 0..5000 {
            assert!(p.may_match(&format!("dev/{i}/state")));
        }
        assert!(p.may_match("dev/9/cmd") && p.may_match("all/x"));
        let fp = (0..10_000).filter(|i| p.may_match(&format!("other/{i}"))).count();
        assert!(fp < 100, "{fp} false positives in 10,000");
    }

    #[test]
    fn a_lying_descriptor_is_refused_not_trusted() {
        let mut l = LocalInterest::default();
        l.add("a/b");
        l.add("c/d");
        let mut b = Vec::new();
        let _ = l.take_deltas(); // a fresh peer gets it all from the snapshot
        l.snapshot().encode(&mut b);
        // segment_count_length (bytes 21..25) pushed past the fingerprints.
        let mut bad = b.clone();
        bad[21..25].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Snapshot::decode(&bad), Err(SnapshotError::BadSummary(_))));
        for cut in 0..b.len() {
            assert!(Snapshot::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(s) = Snapshot::decode(&b) {
                let mut p = PeerInterest::default();
                p.apply_snapshot(s);
                let _ = p.may_match("a/b");
            }
        }

        /// No false negatives, ever: through a snapshot, deltas (adds and removes) and a second snapshot.
        #[test]
        fn no_false_negatives(
            first in proptest::collection::vec(filter_strategy(), 0..40),
            later in proptest::collection::vec((filter_strategy(), any::<bool>()), 0..40),
            topics in proptest::collection::vec(topic_strategy(), 1..40),
        ) {
            let mut l = LocalInterest::default();
            let mut live: HashMap<String, u32> = HashMap::new();
            for f in &first {
                l.add(f);
                *live.entry(f.clone()).or_default() += 1;
            }
            let mut p = PeerInterest::default();
            let _ = l.take_deltas(); // a fresh peer gets it all from the snapshot
            p.apply_snapshot(l.snapshot());
            let check = |p: &PeerInterest, live: &HashMap<String, u32>| -> Result<(), TestCaseError> {
                for t in &topics {
                    let wanted = live.keys().any(|f| topic::parse_shared(f).is_none() && topic::matches(f, t));
                    prop_assert!(!wanted || p.may_match(t), "false negative for {} with {:?}", t, live.keys());
                }
                // Shared member counts are replicated exactly.
                let shared: HashMap<String, u32> =
                    live.iter().filter(|(f, _)| topic::parse_shared(f).is_some()).map(|(f, n)| (f.clone(), *n)).collect();
                let got: HashMap<String, u32> = p.shared().map(|(f, n)| (f.to_string(), n)).collect();
                prop_assert_eq!(got, shared);
                Ok(())
            };
            check(&p, &live)?;
            for (f, add) in &later {
                if *add {
                    l.add(f);
                    *live.entry(f.clone()).or_default() += 1;
                } else if let Some(n) = live.get_mut(f) {
                    l.remove(f);
                    *n -= 1;
                    if *n == 0 {
                        live.remove(f);
                    }
                }
                let (g, ds) = l.take_deltas();
                for d in &ds {
                    p.apply_delta(g, d);
                }
                check(&p, &live)?;
            }
            p.apply_snapshot(l.snapshot());
            check(&p, &live)?;
            // After a snapshot the wildcard part is exact: no wildcard false positives either.
            for t in &topics {
                let plain = |f: &&String| topic::parse_shared(f).is_none();
                let wanted = live.keys().filter(plain).any(|f| topic::matches(f, t));
                if !wanted {
                    let wild = p.wildcards.matches(t);
                    prop_assert!(!wild, "wildcard false positive for {}", t);
                }
            }
        }
    }
}
