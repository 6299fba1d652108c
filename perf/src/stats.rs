//! Latency histograms, per-publisher sequence tracking and loss accounting.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::HashMap;

/// Highest latency recorded, in µs (one minute); anything slower is clamped, not dropped, so it still
/// shows up as the max.
const MAX_LATENCY_US: u64 = 60_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid")
}

pub fn record(h: &mut Histogram<u64>, latency_us: u64) {
    // Clamped values are in range, so this cannot fail.
    let _ = h.record(latency_us.clamp(1, MAX_LATENCY_US));
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// A growable bit set indexed by sequence number.
#[derive(Debug, Clone, Default)]
pub struct SeqSet {
    words: Vec<u64>,
}

impl SeqSet {
    /// Returns false when `seq` was already present (a duplicate delivery).
    pub fn insert(&mut self, seq: u32) -> bool {
        let (w, b) = (seq as usize / 64, seq % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let fresh = self.words[w] & (1 << b) == 0;
        self.words[w] |= 1 << b;
        fresh
    }

    pub fn contains(&self, seq: u32) -> bool {
        self.words.get(seq as usize / 64).is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    pub fn union(&mut self, other: &SeqSet) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Members of `self` missing from `other`.
    pub fn missing_from(&self, other: &SeqSet) -> u64 {
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !other.words.get(i).copied().unwrap_or(0)).count_ones() as u64)
            .sum()
    }

    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one subscriber saw, keyed by publisher id.
pub type Received = HashMap<u32, SeqSet>;

/// Acknowledged messages that never arrived. `acked` is per publisher id. With `each_receiver` every
/// receiver must see every message (fan-out); otherwise the receivers together must (fan-in, pairs, shared
/// subscriptions, where each message goes to exactly one of them).
pub fn lost(acked: &HashMap<u32, SeqSet>, receivers: &[Received], each_receiver: bool) -> u64 {
    let empty = SeqSet::default();
    if each_receiver {
        return receivers
            .iter()
            .map(|r| acked.iter().map(|(id, a)| a.missing_from(r.get(id).unwrap_or(&empty))).sum::<u64>())
            .sum();
    }
    let mut all: Received = HashMap::new();
    for r in receivers {
        for (id, s) in r {
            all.entry(*id).or_default().union(s);
        }
    }
    acked.iter().map(|(id, a)| a.missing_from(all.get(id).unwrap_or(&empty))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_uniform_values() {
        let mut h = new_histogram();
        for v in 1..=1000 {
            record(&mut h, v);
        }
        record(&mut h, 0); // clamped to 1, not lost
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 1001);
        assert!((499..=501).contains(&s.p50_us), "{s:?}");
        assert!((899..=901).contains(&s.p90_us), "{s:?}");
        assert!((989..=991).contains(&s.p99_us), "{s:?}");
        assert_eq!(s.max_us, 1000);
        assert_eq!(LatencySummary::of(&new_histogram()), LatencySummary::default());
        record(&mut h, u64::MAX);
        assert!(LatencySummary::of(&h).max_us >= MAX_LATENCY_US);
    }

    #[test]
    fn seqset_and_loss() {
        let mut a = SeqSet::default();
        for s in [0, 1, 2, 63, 64, 200] {
            assert!(a.insert(s));
        }
        assert!(!a.insert(64));
        assert_eq!(a.len(), 6);
        let mut r1 = SeqSet::default();
        r1.insert(0);
        r1.insert(64);
        let mut r2 = SeqSet::default();
        r2.insert(1);
        r2.insert(2);
        r2.insert(63);
        let acked = HashMap::from([(5, a)]);
        let recv = [HashMap::from([(5, r1)]), HashMap::from([(5, r2)])];
        // Together the receivers miss only 200; each on its own misses far more.
        assert_eq!(lost(&acked, &recv, false), 1);
        assert_eq!(lost(&acked, &recv, true), 4 + 3);
        assert_eq!(lost(&acked, &[], false), 6);
    }
}
