//! Retained-message tree: topic names looked up by a (possibly wildcard) filter.
//!
//! What it does: stores one value (a retained message) per exact topic name, one tree level per topic
//! level, and for a subscription's filter calls back every stored topic the filter matches (MQTT 5.0
//! §4.7: `+` one level, trailing `#` the parent level and everything below, wildcard first levels skip
//! `$` topics) with the full topic name, which each entry keeps so that no name is rebuilt.
//!
//! What it does not do: validate topics or filters (a `+` or `#` inside a stored topic is a plain
//! literal; a `#` that is not a filter's last level is a literal too), decide what to retain (an empty
//! retained payload meaning "delete" is the caller's rule), or expire entries by itself (the caller
//! sweeps with [`RetainedTree::retain`]).

use crate::trie::{split_level, Level, LevelMap};

struct Node<V> {
    /// The retained entry for the topic ending at this node, with that topic's full name.
    entry: Option<(Box<str>, V)>,
    /// Children by level. Invariant (non-root nodes, between public calls): a node has an entry or
    /// at least one child; emptied nodes are pruned.
    children: LevelMap<Node<V>>,
}

impl<V> Node<V> {
    fn new() -> Self {
        Node { entry: None, children: LevelMap::default() }
    }

    fn is_empty(&self) -> bool {
        self.entry.is_none() && self.children.is_empty()
    }
}

impl<V> Drop for Node<V> {
    /// Dismantles the subtree iteratively: the derived drop recurses once per level, and a topic name
    /// can be 32k levels deep.
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut stack = Vec::new();
        let take = |node: &mut Node<V>, stack: &mut Vec<Node<V>>| match std::mem::take(&mut node.children) {
            LevelMap::Small(v) => stack.extend(v.into_iter().map(|(_, n)| n)),
            LevelMap::Large(m) => stack.extend(m.into_values().map(|n| *n)),
        };
        take(self, &mut stack);
        while let Some(mut node) = stack.pop() {
            take(&mut node, &mut stack);
        }
    }
}

/// One step of the match walk.
enum Frame<'t, 'f, V> {
    /// Match the remaining filter levels (`None`: all consumed) against the subtree at the node.
    Filter(&'t Node<V>, Option<&'f str>),
    /// Every entry in the subtree (below a `#`).
    All(&'t Node<V>),
}

/// Retained messages keyed by exact topic name.
pub struct RetainedTree<V> {
    /// The node for the empty path. Invariant: never has an entry (a topic has at least one level).
    root: Node<V>,
    /// Number of entries.
    len: usize,
    /// Number of non-root nodes. Invariant: equals a recount, and drops to 0 once the tree is empty.
    nodes: usize,
}

impl<V> Default for RetainedTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> RetainedTree<V> {
    pub fn new() -> Self {
        RetainedTree { root: Node::new(), len: 0, nodes: 0 }
    }

    /// Stores `value` as the retained entry of `topic`; returns the entry it replaced.
    pub fn insert(&mut self, topic: &str, value: V) -> Option<V> {
        let mut created = 0;
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_or_insert_with(level, &mut created, Node::new);
        }
        self.nodes += created;
        if let Some((_, old)) = &mut node.entry {
            return Some(std::mem::replace(old, value));
        }
        node.entry = Some((topic.into(), value));
        self.len += 1;
        None
    }

    /// Removes the entry of `topic`, freeing nodes it leaves empty.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_mut(level)?;
        }
        let (_, value) = node.entry.take()?;
        let prune = node.children.is_empty();
        self.len -= 1;
        if prune {
            self.prune(topic);
        }
        Some(value)
    }

    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.entry.as_ref().map(|(_, v)| v)
    }

    /// Frees the chain of nodes along `topic` left empty by removing its entry: cut below the deepest
    /// node on the path holding anything besides that path. No-op if the end node is not empty.
    fn prune(&mut self, topic: &str) {
        let mut cut = 0usize;
        let mut depth = 0usize;
        let mut node = &self.root;
        for level in topic.split('/') {
            if depth == 0 || node.entry.is_some() || node.children.len() > 1 {
                cut = depth;
            }
            node = node.children.get(level).expect("pruned path exists");
            depth += 1;
        }
        if !node.is_empty() {
            return;
        }
        let mut node = &mut self.root;
        let mut levels = topic.split('/');
        for level in levels.by_ref().take(cut) {
            node = node.children.get_mut(level).expect("pruned path exists");
        }
        let level = levels.next().expect("cut is above the end of the path");
        let removed = node.children.remove(level);
        debug_assert!(removed.is_some());
        debug_assert!(self.nodes >= depth - cut);
        self.nodes -= depth - cut;
    }

    /// Calls `f` with the topic name and value of every entry whose topic `filter` matches, in
    /// unspecified order. Walks with a heap stack (this runs once per subscribe, not per publish).
    pub fn for_each_match<F: FnMut(&str, &V)>(&self, filter: &str, mut f: F) {
        let mut emit = |node: &Node<V>| {
            if let Some((topic, value)) = &node.entry {
                f(topic, value);
            }
        };
        // MQTT 5.0 §4.7.2: a wildcard first level does not match a `$` topic; skipping those root
        // children covers both `+` and `#` at the first level.
        let skip = |is_root: bool, level: &Level| is_root && level.as_bytes().first() == Some(&b'$');
        let root: *const Node<V> = &self.root;
        let mut stack = vec![Frame::Filter(&self.root, Some(filter))];
        while let Some(frame) = stack.pop() {
            match frame {
                Frame::All(node) => {
                    emit(node);
                    stack.extend(node.children.iter().map(|(_, c)| Frame::All(c)));
                }
                Frame::Filter(node, None) => emit(node),
                Frame::Filter(node, Some(rest)) => {
                    let is_root = std::ptr::eq(node, root);
                    match split_level(rest) {
                        ("#", None) => {
                            emit(node); // "a/#" matches "a"; the root has no entry
                            stack.extend(
                                node.children
                                    .iter()
                                    .filter(|(l, _)| !skip(is_root, l))
                                    .map(|(_, c)| Frame::All(c)),
                            );
                        }
                        ("+", next) => stack.extend(
                            node.children
                                .iter()
                                .filter(|(l, _)| !skip(is_root, l))
                                .map(|(_, c)| Frame::Filter(c, next)),
                        ),
                        (level, next) => {
                            if let Some(child) = node.children.get(level) {
                                stack.push(Frame::Filter(child, next));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Keeps only the entries for which `f(topic, value)` holds (e.g. drops expired messages),
    /// freeing nodes left empty.
    pub fn retain<F: FnMut(&str, &mut V) -> bool>(&mut self, mut f: F) {
        // Visit with a heap stack, then prune each dropped topic's path: pruning needs the parents,
        // which a one-pass walk of `&mut` children cannot revisit. The dropped names are reused from
        // their entries, so nothing is copied.
        let mut dropped: Vec<Box<str>> = Vec::new();
        let mut stack = vec![&mut self.root];
        while let Some(node) = stack.pop() {
            if let Some((topic, value)) = &mut node.entry {
                if !f(topic, value) {
                    let (topic, _) = node.entry.take().expect("checked above");
                    dropped.push(topic);
                }
            }
            stack.extend(node.children.values_mut());
        }
        self.len -= dropped.len();
        for topic in &dropped {
            self.prune(topic);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of nodes besides the root: 0 for an empty tree however much churn it has seen.
    pub fn node_count(&self) -> usize {
        self.nodes
    }

    /// Recounts everything and checks the structural invariants; panics on a violation.
    #[cfg(test)]
    fn check_invariants(&self) {
        assert!(self.root.entry.is_none());
        let (mut nodes, mut len) = (0, 0);
        let mut stack: Vec<(&Node<V>, String)> = vec![];
        for (l, c) in self.root.children.iter() {
            stack.push((c, l.as_str().to_string()));
        }
        while let Some((node, path)) = stack.pop() {
            nodes += 1;
            assert!(!node.is_empty(), "empty node left unpruned at {path:?}");
            if let Some((topic, _)) = &node.entry {
                assert_eq!(**topic, *path);
                len += 1;
            }
            for (l, c) in node.children.iter() {
                stack.push((c, format!("{path}/{}", l.as_str())));
            }
        }
        assert_eq!(nodes, self.nodes, "node count");
        assert_eq!(len, self.len, "entry count");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trie::tests::{filter_strategy, reference_matches, topic_strategy};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn matches(tree: &RetainedTree<u32>, filter: &str) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        tree.for_each_match(filter, |t, v| out.push((t.to_string(), *v)));
        out.sort();
        out
    }

    fn single(filter: &str, topic: &str) -> bool {
        let mut tree = RetainedTree::new();
        tree.insert(topic, 7u32);
        let got = matches(&tree, filter);
        let hit = got == [(topic.to_string(), 7)];
        assert!(hit || got.is_empty(), "{got:?}");
        assert_eq!(reference_matches(filter, topic), hit, "{filter} vs {topic}");
        hit
    }

    #[test]
    fn spec_examples() {
        let f = "sport/tennis/player1/#";
        assert!(single(f, "sport/tennis/player1"));
        assert!(single(f, "sport/tennis/player1/ranking"));
        assert!(single(f, "sport/tennis/player1/score/wimbledon"));
        assert!(!single(f, "sport/tennis/player2"));
        assert!(single("sport/#", "sport"));
        assert!(!single("sport/+", "sport"));
        assert!(!single("sport/+", "sport/tennis/player1"));
        assert!(single("sport/+", "sport/"));
        assert!(single("+/+", "/finance"));
        assert!(single("/+", "/finance"));
        assert!(!single("+", "/finance"));
        assert!(!single("#", "$SYS/monitor/Clients"));
        assert!(!single("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(single("$SYS/#", "$SYS/monitor/Clients"));
        assert!(single("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(single("a/+", "a/$x"));
        assert!(single("#", "a/$x"));
    }

    #[test]
    fn empty_levels() {
        assert!(single("a//b", "a//b"));
        assert!(single("a/+/b", "a//b"));
        assert!(!single("a/b", "a//b"));
        assert!(single("+/+", "/"));
        assert!(!single("+", "/"));
        assert!(single("/#", "/"));
        assert!(single("#", "/"));
        assert!(single("a/#", "a/"));
        assert!(!single("a/", "a"));
    }

    #[test]
    fn insert_replace_remove_prune() {
        let mut tree = RetainedTree::new();
        assert_eq!(tree.insert("a/b", 1), None);
        assert_eq!(tree.insert("a/b", 2), Some(1));
        assert_eq!(tree.insert("a", 3), None);
        assert_eq!(tree.insert("a/b/c/d", 4), None);
        assert_eq!(tree.insert("$SYS/x", 5), None);
        tree.check_invariants();
        assert_eq!(tree.len(), 4);
        assert_eq!(tree.get("a/b"), Some(&2));
        assert_eq!(tree.get("a/b/c"), None);
        assert_eq!(tree.get("z"), None);
        assert_eq!(matches(&tree, "a/#"), [("a".into(), 3), ("a/b".into(), 2), ("a/b/c/d".into(), 4)]);
        assert_eq!(matches(&tree, "#").len(), 3);
        assert_eq!(matches(&tree, "$SYS/#"), [("$SYS/x".into(), 5)]);
        assert_eq!(tree.remove("a/b/c"), None);
        assert_eq!(tree.remove("a/b/c/d"), Some(4));
        tree.check_invariants();
        assert_eq!(tree.node_count(), 4);
        assert_eq!(tree.remove("a"), Some(3));
        assert_eq!(tree.remove("a/b"), Some(2));
        assert_eq!(tree.remove("$SYS/x"), Some(5));
        tree.check_invariants();
        assert!(tree.is_empty());
        assert_eq!(tree.node_count(), 0);
    }

    #[test]
    fn retain_drops_and_prunes() {
        let mut tree = RetainedTree::new();
        for i in 0..50u32 {
            tree.insert(&format!("s/{}/{i}", i % 5), i);
        }
        tree.retain(|_, v| {
            *v += 100;
            *v % 2 == 0
        });
        tree.check_invariants();
        assert_eq!(tree.len(), 25);
        assert_eq!(tree.get("s/0/10"), Some(&110));
        assert_eq!(tree.get("s/1/11"), None);
        tree.retain(|_, _| false);
        tree.check_invariants();
        assert_eq!((tree.len(), tree.node_count()), (0, 0));
    }

    #[test]
    fn deep_topics_do_not_recurse() {
        let topic = vec!["a"; 40_000].join("/");
        let mut tree = RetainedTree::new();
        tree.insert(&topic, 1u32);
        tree.insert("a", 2);
        assert_eq!(matches(&tree, "#").len(), 2);
        assert_eq!(matches(&tree, &topic), [(topic.clone(), 1)]);
        tree.retain(|t, _| t == "a");
        assert_eq!((tree.len(), tree.node_count()), (1, 1));
        tree.insert(&topic, 1u32);
        // Dropping the tree with a deep entry in it must not recurse either.
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn matches_reference(
            ops in prop::collection::vec((topic_strategy(), 0u32..4, 0u8..3), 0..48),
            filters in prop::collection::vec(filter_strategy(), 1..12),
            keep in 0u32..4,
        ) {
            let mut tree = RetainedTree::new();
            let mut model: BTreeMap<String, u32> = BTreeMap::new();
            for (topic, value, op) in &ops {
                if *op == 0 {
                    prop_assert_eq!(tree.remove(topic), model.remove(topic));
                } else {
                    prop_assert_eq!(tree.insert(topic, *value), model.insert(topic.clone(), *value));
                }
                tree.check_invariants();
            }
            prop_assert_eq!(tree.len(), model.len());
            for (t, v) in &model {
                prop_assert_eq!(tree.get(t), Some(v));
            }
            for f in &filters {
                let want: Vec<(String, u32)> = model
                    .iter()
                    .filter(|(t, _)| reference_matches(f, t))
                    .map(|(t, v)| (t.clone(), *v))
                    .collect();
                prop_assert_eq!(matches(&tree, f), want, "filter {:?}", f);
            }
            tree.retain(|_, v| *v != keep);
            model.retain(|_, v| *v != keep);
            tree.check_invariants();
            prop_assert_eq!(matches(&tree, "#").len() + matches(&tree, "$x/#").len(), model.len());
            for t in model.keys() {
                prop_assert!(tree.remove(t).is_some());
            }
            tree.check_invariants();
            prop_assert_eq!(tree.node_count(), 0);
        }
    }
}
