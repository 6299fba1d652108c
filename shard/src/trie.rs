//! Per-shard subscription index: a topic-filter trie matched against published topic names.
//!
//! What it does: stores values (subscriptions) under MQTT topic filters, one trie level per topic
//! level, and for a published topic name calls back every value whose filter matches it, following
//! MQTT 5.0 §4.7: `+` matches exactly one level, a trailing `#` matches the parent level and any number
//! of levels below it, and a topic whose first level starts with `$` is not matched by a filter whose
//! first level is a wildcard. Matching allocates nothing unless a filter has more than
//! [`INLINE_STACK`] `+` levels on one path.
//!
//! What it does not do: validate filters or topics (the wire layer does; here a `#` that is not the
//! last level and a level such as `a+` are plain literals that no valid topic can match), understand
//! `$share/` (the caller strips the share prefix before inserting), deduplicate values, or cache
//! match results (subscriptions churn per shard; a cache would need invalidation on every change).

use std::collections::HashMap;

/// Children kept in a linear-scan vector up to this many; beyond it, a hash map. Measured on a
/// two-level match: scanning 8 ten-byte keys per level cost ~50 ns against ~31 ns hashed, while at
/// 2-4 keys the two were within noise. Most nodes have one or two children, and there the vector
/// saves the map's fixed cost (~100 bytes of table and hasher, plus a 4-bucket minimum).
const SMALL_MAX: usize = 4;

/// Frames of the match walk kept on the call stack before spilling to the heap. Only pending `+`
/// branches are pushed, so this is the number of `+` levels on one matching path.
pub const INLINE_STACK: usize = 16;

/// Levels up to this many bytes are stored inside the key, the rest on the heap.
const INLINE_LEVEL: usize = 22;

/// A level string as a map key. Short levels (most MQTT levels: ids, names) sit inline so that
/// comparing a key during a lookup does not chase a pointer to another cache line.
#[derive(Clone)]
pub(crate) enum Level {
    /// Invariant: `len <= INLINE_LEVEL`, and `bytes[..len]` is UTF-8 (copied from a `&str`).
    Inline { len: u8, bytes: [u8; INLINE_LEVEL] },
    /// Invariant: longer than `INLINE_LEVEL` bytes, so each level has exactly one representation.
    Heap(Box<str>),
}

impl Level {
    fn new(s: &str) -> Self {
        if s.len() <= INLINE_LEVEL {
            let mut bytes = [0; INLINE_LEVEL];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Level::Inline { len: s.len() as u8, bytes }
        } else {
            Level::Heap(s.into())
        }
    }

    #[inline]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Level::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Level::Heap(s) => s.as_bytes(),
        }
    }

    /// Validates UTF-8 again (cheap for a level) rather than reach for `unsafe`; only iteration
    /// paths use this, never the per-publish lookup.
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).expect("built from a str")
    }
}

impl PartialEq for Level {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Level {}

/// Hashes as the level's bytes, as `Borrow<[u8]>` requires, so maps are looked up by `&[u8]`.
impl std::hash::Hash for Level {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl std::borrow::Borrow<[u8]> for Level {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Map from a level string to a child node: a short unsorted vector when a node has few children,
/// a boxed ahash map when it has many (boxed so that the common small case keeps nodes compact).
///
/// The map holds its nodes boxed: a large level is typically one child per device (`dev/<id>/...`), and
/// hashbrown keeps 1.1-2.3 buckets per entry, so an inline ~64-byte node would cost ~90-200 bytes of table
/// per child where a pointer costs 35-75 (plus the node's own 64). Lookups there chase one pointer more.
pub(crate) enum LevelMap<N> {
    /// Invariant: keys are distinct and `len() <= SMALL_MAX`.
    Small(Vec<(Level, N)>),
    /// Invariant: `len() > SMALL_MAX / 2` (it shrinks back to `Small` below that; the gap between
    /// the two thresholds keeps a node hovering around the limit from converting on every change).
    #[allow(clippy::box_collection)] // 8 bytes in every node instead of ~64 (table + hasher)
    Large(Box<HashMap<Level, Box<N>, ahash::RandomState>>),
}

impl<N> Default for LevelMap<N> {
    fn default() -> Self {
        LevelMap::Small(Vec::new())
    }
}

impl<N> LevelMap<N> {
    #[inline]
    pub(crate) fn get(&self, key: &str) -> Option<&N> {
        match self {
            LevelMap::Small(v) => v.iter().find(|(k, _)| k.as_bytes() == key.as_bytes()).map(|(_, n)| n),
            LevelMap::Large(m) => m.get(key.as_bytes()).map(|n| &**n),
        }
    }

    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut N> {
        match self {
            LevelMap::Small(v) => v.iter_mut().find(|(k, _)| k.as_bytes() == key.as_bytes()).map(|(_, n)| n),
            LevelMap::Large(m) => m.get_mut(key.as_bytes()).map(|n| &mut **n),
        }
    }

    /// Returns the child under `key`, creating it with `make` if absent; `*created` is bumped when it
    /// was created so that the owner can keep its node count.
    pub(crate) fn get_or_insert_with(
        &mut self,
        key: &str,
        created: &mut usize,
        make: impl FnOnce() -> N,
    ) -> &mut N {
        // Look up first and borrow again to return: returning the borrow from inside the lookup
        // would hold it across the conversion below (a known limit of the borrow checker).
        if let LevelMap::Small(v) = self {
            match v.iter().position(|(k, _)| k.as_bytes() == key.as_bytes()) {
                Some(i) => {
                    let LevelMap::Small(v) = self else { unreachable!("matched above") };
                    return &mut v[i].1;
                }
                None if v.len() < SMALL_MAX => {
                    *created += 1;
                    // Grow one at a time: the default first allocation of four ~90-byte entries
                    // would mostly be wasted on the typical single-child node.
                    v.reserve_exact(1);
                    v.push((Level::new(key), make()));
                    let LevelMap::Small(v) = self else { unreachable!("matched above") };
                    return &mut v.last_mut().expect("just pushed").1;
                }
                None => {
                    let mut m = HashMap::with_capacity_and_hasher(v.len() * 2, ahash::RandomState::new());
                    m.extend(v.drain(..).map(|(k, n)| (k, Box::new(n))));
                    *self = LevelMap::Large(Box::new(m));
                }
            }
        }
        let LevelMap::Large(m) = self else { unreachable!("converted above") };
        if !m.contains_key(key.as_bytes()) {
            *created += 1;
            m.insert(Level::new(key), Box::new(make()));
        }
        m.get_mut(key.as_bytes()).expect("present")
    }

    pub(crate) fn remove(&mut self, key: &str) -> Option<N> {
        match self {
            LevelMap::Small(v) => {
                let i = v.iter().position(|(k, _)| k.as_bytes() == key.as_bytes())?;
                let (_, n) = v.swap_remove(i);
                if v.is_empty() {
                    // Release the allocation: an empty child list is the common state of a leaf.
                    *v = Vec::new();
                }
                Some(n)
            }
            LevelMap::Large(m) => {
                let n = m.remove(key.as_bytes())?;
                if m.len() <= SMALL_MAX / 2 {
                    let small: Vec<_> = m.drain().map(|(k, n)| (k, *n)).collect();
                    *self = LevelMap::Small(small);
                }
                Some(*n)
            }
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        match self {
            LevelMap::Small(v) => v.len(),
            LevelMap::Large(m) => m.len(),
        }
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn iter(&self) -> LevelIter<'_, N> {
        match self {
            LevelMap::Small(v) => LevelIter::Small(v.iter()),
            LevelMap::Large(m) => LevelIter::Large(m.iter()),
        }
    }

    pub(crate) fn values_mut(&mut self) -> LevelValuesMut<'_, N> {
        match self {
            LevelMap::Small(v) => LevelValuesMut::Small(v.iter_mut()),
            LevelMap::Large(m) => LevelValuesMut::Large(m.values_mut()),
        }
    }
}

pub(crate) enum LevelIter<'a, N> {
    Small(std::slice::Iter<'a, (Level, N)>),
    Large(std::collections::hash_map::Iter<'a, Level, Box<N>>),
}

impl<'a, N> Iterator for LevelIter<'a, N> {
    type Item = (&'a Level, &'a N);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            LevelIter::Small(it) => it.next().map(|(k, n)| (k, n)),
            LevelIter::Large(it) => it.next().map(|(k, n)| (k, &**n)),
        }
    }
}

pub(crate) enum LevelValuesMut<'a, N> {
    Small(std::slice::IterMut<'a, (Level, N)>),
    Large(std::collections::hash_map::ValuesMut<'a, Level, Box<N>>),
}

impl<'a, N> Iterator for LevelValuesMut<'a, N> {
    type Item = &'a mut N;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            LevelValuesMut::Small(it) => it.next().map(|(_, n)| n),
            LevelValuesMut::Large(it) => it.next().map(|n| &mut **n),
        }
    }
}

/// Splits off the first level: `("a", Some("b/c"))` for `"a/b/c"`, `("a", None)` for `"a"`.
#[inline]
pub(crate) fn split_level(s: &str) -> (&str, Option<&str>) {
    match s.as_bytes().iter().position(|&b| b == b'/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

/// Splits a filter into the levels leading to its node (`None`: the root, i.e. no levels) and
/// whether it ends in `#` (then its values live in that node's `hash` slot).
fn split_filter(filter: &str) -> (Option<&str>, bool) {
    if filter == "#" {
        (None, true)
    } else if let Some(path) = filter.strip_suffix("/#") {
        (Some(path), true)
    } else {
        (Some(filter), false)
    }
}

/// Iterates the levels of an optional path (`None`: no levels at all, which `"".split('/')` cannot
/// express since it yields one empty level).
fn levels(path: Option<&str>) -> impl Iterator<Item = &str> {
    path.into_iter().flat_map(|p| p.split('/'))
}

struct Node<V> {
    /// Values of the filter that ends at this node (`a/b` for the node reached by `a` then `b`).
    /// Invariant: a `Vec` with no values holds no allocation.
    values: Vec<V>,
    /// Values of the filter this node's path followed by `/#` (`#` itself at the root): a dedicated
    /// slot rather than a child keyed `"#"` since `#` ends a filter, so it never needs a node, and
    /// matching reads it without a lookup. Boxed because few nodes have one (8 bytes, not 24).
    /// Invariant: `Some` holds at least one value.
    #[allow(clippy::box_collection)] // 8 bytes in every node instead of 24
    hash: Option<Box<Vec<V>>>,
    /// The child for a `+` level, kept out of `children` so matching never hashes or compares `"+"`.
    plus: Option<Box<Node<V>>>,
    /// Literal-level children. Invariant: no key is `"+"` (that is `plus`).
    children: LevelMap<Node<V>>,
}

impl<V> Node<V> {
    fn new() -> Self {
        Node { values: Vec::new(), hash: None, plus: None, children: LevelMap::default() }
    }

    /// Whether the node holds nothing and may be pruned (every non-root node in the trie is
    /// non-empty between public calls).
    fn is_empty(&self) -> bool {
        self.values.is_empty() && self.hash.is_none() && self.plus.is_none() && self.children.is_empty()
    }

    /// Whether the node holds anything besides the single child edge leading down a path, i.e.
    /// must survive when that child is pruned.
    fn holds_more_than_one_edge(&self) -> bool {
        !self.values.is_empty()
            || self.hash.is_some()
            || self.children.len() + usize::from(self.plus.is_some()) > 1
    }

    fn child(&self, level: &str) -> Option<&Node<V>> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.children.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<V>> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }

    fn child_or_insert(&mut self, level: &str, created: &mut usize) -> &mut Node<V> {
        if level == "+" {
            self.plus.get_or_insert_with(|| {
                *created += 1;
                Box::new(Node::new())
            })
        } else {
            self.children.get_or_insert_with(level, created, Node::new)
        }
    }

    /// Drops the child under `level`; returns whether there was one.
    fn remove_child(&mut self, level: &str) -> bool {
        if level == "+" {
            self.plus.take().is_some()
        } else {
            self.children.remove(level).is_some()
        }
    }
}

impl<V> Drop for Node<V> {
    /// Dismantles the subtree iteratively: the derived drop recurses once per level, and a valid
    /// MQTT filter can be 32k levels deep.
    fn drop(&mut self) {
        if self.plus.is_none() && self.children.is_empty() {
            return;
        }
        let mut stack = Vec::new();
        self.move_children_to(&mut stack);
        while let Some(mut node) = stack.pop() {
            node.move_children_to(&mut stack);
        }
    }
}

impl<V> Node<V> {
    fn move_children_to(&mut self, stack: &mut Vec<Node<V>>) {
        if let Some(plus) = self.plus.take() {
            stack.push(*plus);
        }
        match std::mem::take(&mut self.children) {
            LevelMap::Small(v) => stack.extend(v.into_iter().map(|(_, n)| n)),
            LevelMap::Large(m) => stack.extend(m.into_values().map(|n| *n)),
        }
    }
}

/// The match walk's pending-branch stack: inline up to [`INLINE_STACK`] frames, then a heap spill
/// (only a filter with that many `+` levels on one matching path gets there; MQTT allows filters of
/// 32k levels, which recursion could not survive).
struct WalkStack<'a, V> {
    inline: [(&'a Node<V>, Option<&'a str>); INLINE_STACK],
    /// Invariant: `len <= INLINE_STACK`, and `spill` is empty unless `len == INLINE_STACK`.
    len: usize,
    spill: Vec<(&'a Node<V>, Option<&'a str>)>,
}

impl<'a, V> WalkStack<'a, V> {
    #[inline]
    fn new(filler: &'a Node<V>) -> Self {
        WalkStack { inline: [(filler, None); INLINE_STACK], len: 0, spill: Vec::new() }
    }

    #[inline]
    fn push(&mut self, frame: (&'a Node<V>, Option<&'a str>)) {
        if self.len < INLINE_STACK {
            self.inline[self.len] = frame;
            self.len += 1;
        } else {
            self.spill.push(frame);
        }
    }

    #[inline]
    fn pop(&mut self) -> Option<(&'a Node<V>, Option<&'a str>)> {
        if let Some(frame) = self.spill.pop() {
            return Some(frame);
        }
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        Some(self.inline[self.len])
    }
}

/// Topic-filter trie mapping MQTT filters to the values subscribed under them.
pub struct TopicTrie<V> {
    /// The node for the empty path: holds no `values` (every filter has at least one level) but may
    /// hold `hash` (the filter `#`).
    root: Node<V>,
    /// Number of non-root nodes. Invariant: equals a recount, and drops to 0 once the trie is empty.
    nodes: usize,
    /// Number of filters with at least one value (non-empty `values`/`hash` slots).
    filters: usize,
    /// Number of values across all filters.
    values: usize,
}

impl<V> Default for TopicTrie<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> TopicTrie<V> {
    pub fn new() -> Self {
        TopicTrie { root: Node::new(), nodes: 0, filters: 0, values: 0 }
    }

    /// Adds `value` under `filter`; returns true if the filter had no values before.
    pub fn insert(&mut self, filter: &str, value: V) -> bool {
        let (path, hash) = split_filter(filter);
        let mut created = 0;
        let mut node = &mut self.root;
        for level in levels(path) {
            node = node.child_or_insert(level, &mut created);
        }
        self.nodes += created;
        let slot =
            if hash { &mut **node.hash.get_or_insert_with(Default::default) } else { &mut node.values };
        let was_new = slot.is_empty();
        if was_new {
            // Most filters have a single subscriber per shard: allocate for one, not the default four.
            slot.reserve_exact(1);
        }
        slot.push(value);
        self.values += 1;
        self.filters += usize::from(was_new);
        was_new
    }

    /// Removes the first value under `filter` for which `pred` holds. Returns it, and whether the
    /// filter has no values after the call (also true when the filter had none to begin with, so
    /// "the filter just went away" is `removed.is_some() && now_empty`). Nodes left empty are freed.
    pub fn remove<F: FnMut(&V) -> bool>(&mut self, filter: &str, pred: F) -> (Option<V>, bool) {
        let (path, hash) = split_filter(filter);
        let Some(node) = self.node_mut(path) else {
            return (None, true);
        };
        let slot = match (hash, &mut node.hash) {
            (false, _) => &mut node.values,
            (true, Some(slot)) => &mut **slot,
            (true, None) => return (None, true),
        };
        let Some(i) = slot.iter().position(pred) else {
            return (None, slot.is_empty());
        };
        // `remove`, not `swap_remove`: finding the value already scanned the vector, and keeping
        // subscription order keeps delivery order stable for the remaining subscribers.
        let value = slot.remove(i);
        let now_empty = slot.is_empty();
        if now_empty {
            if hash {
                node.hash = None;
            } else {
                node.values = Vec::new();
            }
        }
        self.values -= 1;
        if now_empty {
            self.filters -= 1;
            self.prune(path);
        }
        (Some(value), now_empty)
    }

    /// The values under exactly `filter` (wildcards are literal here), `None` if it has none.
    pub fn get(&self, filter: &str) -> Option<&[V]> {
        let (path, hash) = split_filter(filter);
        let mut node = &self.root;
        for level in levels(path) {
            node = node.child(level)?;
        }
        let slot = if hash { node.hash.as_deref()? } else { &node.values };
        (!slot.is_empty()).then_some(slot.as_slice())
    }

    /// The values under exactly `filter`, `None` if it has none. The caller may edit values in place
    /// but must not change the vector's length: counts and pruning go through `insert`/`remove`.
    pub fn get_mut(&mut self, filter: &str) -> Option<&mut Vec<V>> {
        let (path, hash) = split_filter(filter);
        let node = self.node_mut(path)?;
        let slot = if hash { node.hash.as_deref_mut()? } else { &mut node.values };
        (!slot.is_empty()).then_some(slot)
    }

    fn node_mut(&mut self, path: Option<&str>) -> Option<&mut Node<V>> {
        let mut node = &mut self.root;
        for level in levels(path) {
            node = node.child_mut(level)?;
        }
        Some(node)
    }

    /// Frees the chain of nodes along `path` that the removal of the last value at its end left
    /// empty: cut below the deepest node on the path that holds anything besides that path.
    fn prune(&mut self, path: Option<&str>) {
        // First pass, read-only: find the cut point and check that the end node is empty.
        let mut cut = 0usize; // index of the level whose edge gets removed from the node above it
        let mut node = &self.root;
        let mut depth = 0usize;
        for level in levels(path) {
            if depth == 0 || node.holds_more_than_one_edge() {
                cut = depth;
            }
            node = node.child(level).expect("pruned path exists");
            depth += 1;
        }
        if depth == 0 || !node.is_empty() {
            return;
        }
        // Second pass: walk to the node above the cut and drop the edge; everything below it held
        // only this path.
        let mut node = &mut self.root;
        let mut it = levels(path);
        for level in it.by_ref().take(cut) {
            node = node.child_mut(level).expect("pruned path exists");
        }
        let level = it.next().expect("cut is above the end of the path");
        let removed = node.remove_child(level);
        debug_assert!(removed);
        debug_assert!(self.nodes >= depth - cut);
        self.nodes -= depth - cut;
    }

    /// Calls `f` for every value of every filter matching `topic` (each value once per filter it is
    /// stored under). The order is unspecified.
    #[inline]
    pub fn for_each_match<F: FnMut(&V)>(&self, topic: &str, mut f: F) {
        self.walk(topic, |vs| {
            vs.iter().for_each(&mut f);
            true
        });
    }

    /// Whether any filter with a value matches `topic`.
    pub fn any_match(&self, topic: &str) -> bool {
        !self.walk(topic, |_| false)
    }

    /// Depth-first walk over the nodes matching `topic`, calling `g` with each non-empty matching
    /// value slot until `g` returns false. Returns false if `g` stopped it.
    ///
    /// The literal child is followed in a loop and only `+` branches are pushed, so the stack holds
    /// one frame per pending `+` branch.
    #[inline]
    fn walk<'a>(&'a self, topic: &'a str, mut g: impl FnMut(&'a [V]) -> bool) -> bool {
        let root = &self.root;
        // MQTT 5.0 §4.7.2: a wildcard first level does not match a `$` topic.
        let dollar = topic.starts_with('$');
        let mut stack = WalkStack::new(root);
        if !dollar {
            if let Some(hash) = &root.hash {
                if !g(hash) {
                    return false;
                }
            }
            if let Some(plus) = &root.plus {
                stack.push((plus, split_level(topic).1));
            }
        }
        let (first, rest) = split_level(topic);
        if let Some(child) = root.children.get(first) {
            stack.push((child, rest));
        }
        while let Some((mut node, mut rest)) = stack.pop() {
            loop {
                // `#` below this node also matches this node's own level ("a/#" matches "a").
                if let Some(hash) = &node.hash {
                    if !g(hash) {
                        return false;
                    }
                }
                let Some(r) = rest else {
                    if !node.values.is_empty() && !g(&node.values) {
                        return false;
                    }
                    break;
                };
                let (level, next) = split_level(r);
                if let Some(plus) = &node.plus {
                    stack.push((plus, next));
                }
                match node.children.get(level) {
                    Some(child) => {
                        node = child;
                        rest = next;
                    }
                    None => break,
                }
            }
        }
        true
    }

    /// Number of filters with at least one value.
    pub fn filter_count(&self) -> usize {
        self.filters
    }

    /// Number of values across all filters.
    pub fn len(&self) -> usize {
        self.values
    }

    pub fn is_empty(&self) -> bool {
        self.values == 0
    }

    /// Number of nodes besides the root: 0 for an empty trie however much churn it has seen.
    pub fn node_count(&self) -> usize {
        self.nodes
    }

    /// Calls `f` with every filter that has values and its values, in unspecified order. Allocates
    /// (the filter string and a traversal stack); meant for diagnostics and tests.
    pub fn for_each_filter<F: FnMut(&str, &[V])>(&self, mut f: F) {
        let mut path = String::new();
        // (node, depth, length of `path` at its parent, its level)
        let mut stack: Vec<(&Node<V>, usize, usize, &str)> = vec![(&self.root, 0, 0, "")];
        while let Some((node, depth, base, level)) = stack.pop() {
            path.truncate(base);
            if depth > 1 {
                path.push('/');
            }
            path.push_str(level);
            if !node.values.is_empty() {
                f(&path, &node.values);
            }
            if let Some(hash) = &node.hash {
                let len = path.len();
                path.push_str(if depth == 0 { "#" } else { "/#" });
                f(&path, hash);
                path.truncate(len);
            }
            let base = path.len();
            if let Some(plus) = &node.plus {
                stack.push((plus, depth + 1, base, "+"));
            }
            for (level, child) in node.children.iter() {
                stack.push((child, depth + 1, base, level.as_str()));
            }
        }
    }

    /// Recounts everything and checks the structural invariants; panics on a violation.
    #[cfg(test)]
    fn check_invariants(&self) {
        let (mut nodes, mut filters, mut values) = (0, 0, 0);
        let mut stack = vec![(&self.root, true)];
        while let Some((node, is_root)) = stack.pop() {
            if is_root {
                assert!(node.values.is_empty(), "root holds no exact-filter values");
            } else {
                nodes += 1;
                assert!(!node.is_empty(), "empty node left unpruned");
            }
            assert!(node.hash.as_ref().is_none_or(|h| !h.is_empty()));
            for slot in [Some(&node.values), node.hash.as_deref()].into_iter().flatten() {
                if slot.is_empty() {
                    assert_eq!(slot.capacity(), 0, "empty slot holds an allocation");
                } else {
                    filters += 1;
                    values += slot.len();
                }
            }
            match &node.children {
                LevelMap::Small(v) => assert!(v.len() <= SMALL_MAX),
                LevelMap::Large(m) => assert!(m.len() > SMALL_MAX / 2),
            }
            if let Some(plus) = &node.plus {
                stack.push((plus, false));
            }
            for (level, child) in node.children.iter() {
                assert_ne!(level.as_str(), "+");
                let inline = matches!(level, Level::Inline { .. });
                assert_eq!(inline, level.as_bytes().len() <= INLINE_LEVEL);
                stack.push((child, false));
            }
        }
        assert_eq!(nodes, self.nodes, "node count");
        assert_eq!(filters, self.filters, "filter count");
        assert_eq!(values, self.values, "value count");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Brute-force MQTT matcher, the reference both structures are checked against.
    pub(crate) fn reference_matches(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        if t[0].starts_with('$') && (f[0] == "+" || f[0] == "#") {
            return false;
        }
        for i in 0.. {
            if i == f.len() {
                return i == t.len();
            }
            if f[i] == "#" && i == f.len() - 1 {
                return true; // we got here, so the topic has at least the `i` parent levels
            }
            if i == t.len() || (f[i] != "+" && f[i] != t[i]) {
                return false;
            }
        }
        unreachable!()
    }

    fn matches(trie: &TopicTrie<u32>, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        trie.for_each_match(topic, |v| out.push(*v));
        out.sort_unstable();
        out
    }

    fn single(filter: &str, topic: &str) -> bool {
        let mut trie = TopicTrie::new();
        trie.insert(filter, 1u32);
        let hit = matches(&trie, topic) == [1];
        assert_eq!(trie.any_match(topic), hit);
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
        assert!(single("sport/tennis/+", "sport/tennis/player1"));
        assert!(!single("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!single("sport/+", "sport"));
        assert!(!single("sport/+", "sport/tennis/player1"));
        assert!(single("sport/+", "sport/"));
        assert!(single("+/+", "/finance"));
        assert!(single("/+", "/finance"));
        assert!(!single("+", "/finance"));
        assert!(single("#", "/finance"));
        assert!(single("#", "a"));
        assert!(!single("#", "$SYS/monitor/Clients"));
        assert!(!single("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(single("$SYS/#", "$SYS/monitor/Clients"));
        assert!(single("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(single("$SYS/#", "$SYS"));
        assert!(single("a/+", "a/$x"), "the $ rule is about the first level only");
        assert!(single("a/#", "a/$x"));
    }

    #[test]
    fn empty_levels() {
        assert!(single("a//b", "a//b"));
        assert!(single("a/+/b", "a//b"));
        assert!(!single("a/b", "a//b"));
        assert!(single("/", "/"));
        assert!(single("+/+", "/"));
        assert!(!single("+", "/"));
        assert!(single("/#", "/"));
        assert!(single("/#", "/a/b"));
        assert!(!single("/#", "a"));
        assert!(single("a/", "a/"));
        assert!(!single("a/", "a"));
        assert!(single("a/#", "a/"));
        assert!(single("+/#", "/"));
        assert!(single("+/#", "a"));
    }

    #[test]
    fn insert_get_remove_prune() {
        let mut trie = TopicTrie::new();
        assert!(trie.insert("a/b", 1));
        assert!(!trie.insert("a/b", 2));
        assert!(trie.insert("a/#", 3));
        assert!(trie.insert("#", 4));
        assert!(trie.insert("a/+/c", 5));
        assert!(trie.insert("+", 6));
        assert_eq!((trie.filter_count(), trie.len()), (5, 6));
        trie.check_invariants();
        assert_eq!(trie.get("a/b"), Some(&[1, 2][..]));
        assert_eq!(trie.get("a/#"), Some(&[3][..]));
        assert_eq!(trie.get("#"), Some(&[4][..]));
        assert_eq!(trie.get("a"), None);
        assert_eq!(trie.get("a/+"), None);
        trie.get_mut("a/+/c").unwrap()[0] = 50;
        assert_eq!(matches(&trie, "a/x/c"), [3, 4, 50]);
        assert_eq!(matches(&trie, "a/b"), [1, 2, 3, 4]);
        assert_eq!(matches(&trie, "a"), [3, 4, 6]);

        assert_eq!(trie.remove("a/b", |v| *v == 9), (None, false));
        assert_eq!(trie.remove("nope/x", |_| true), (None, true));
        assert_eq!(trie.remove("a/b", |v| *v == 1), (Some(1), false));
        assert_eq!(trie.remove("a/b", |v| *v == 2), (Some(2), true));
        trie.check_invariants();
        assert_eq!(trie.remove("a/#", |_| true), (Some(3), true));
        assert_eq!(trie.remove("a/+/c", |_| true), (Some(50), true));
        trie.check_invariants();
        assert_eq!(trie.remove("#", |_| true), (Some(4), true));
        assert_eq!(trie.remove("+", |_| true), (Some(6), true));
        trie.check_invariants();
        assert!(trie.is_empty());
        assert_eq!((trie.node_count(), trie.filter_count()), (0, 0));
    }

    #[test]
    fn prune_keeps_shared_prefixes() {
        let mut trie = TopicTrie::new();
        trie.insert("a/b/c/d", 1);
        trie.insert("a/b", 2);
        trie.insert("a/b/x", 3);
        assert_eq!(trie.node_count(), 5);
        trie.remove("a/b/c/d", |_| true);
        trie.check_invariants();
        assert_eq!(trie.node_count(), 3);
        trie.remove("a/b", |_| true);
        trie.check_invariants();
        assert_eq!(trie.node_count(), 3);
        trie.remove("a/b/x", |_| true);
        assert_eq!(trie.node_count(), 0);
        trie.check_invariants();
    }

    #[test]
    fn many_children_switch_map_and_back() {
        let mut trie = TopicTrie::new();
        for i in 0..100u32 {
            trie.insert(&format!("d/{i}/t"), i);
        }
        trie.check_invariants();
        for i in 0..100u32 {
            assert_eq!(matches(&trie, &format!("d/{i}/t")), [i]);
        }
        for i in 0..100u32 {
            assert_eq!(trie.remove(&format!("d/{i}/t"), |_| true), (Some(i), true));
            trie.check_invariants();
        }
        assert_eq!(trie.node_count(), 0);
    }

    #[test]
    fn long_levels_live_on_the_heap() {
        // Around the inline-key limit, in both the small and the hashed child map.
        let mut trie = TopicTrie::new();
        let mut filters = Vec::new();
        for len in [0, 1, INLINE_LEVEL - 1, INLINE_LEVEL, INLINE_LEVEL + 1, 100] {
            for i in 0..12 {
                filters.push(format!("{}/x", "z".repeat(len) + &"+".repeat(i % 2) + &i.to_string()));
            }
        }
        for (i, f) in filters.iter().enumerate() {
            trie.insert(f, i as u32);
        }
        trie.check_invariants();
        for (i, f) in filters.iter().enumerate() {
            assert_eq!(trie.get(f), Some(&[i as u32][..]));
            assert_eq!(matches(&trie, f), [i as u32]);
            assert!(!trie.any_match(&format!("{f}/y")));
        }
        for (i, f) in filters.iter().enumerate() {
            assert_eq!(trie.remove(f, |_| true), (Some(i as u32), true));
        }
        trie.check_invariants();
        assert_eq!(trie.node_count(), 0);
    }

    #[test]
    fn deep_filters_do_not_recurse() {
        // 40k-level filters and topics: a recursive walk would overflow the test thread's stack.
        let n = 40_000;
        let plus = vec!["+"; n].join("/");
        let topic = vec![""; n].join("/");
        let mut trie = TopicTrie::new();
        trie.insert(&plus, 1u32);
        trie.insert(&topic, 2);
        trie.insert(&format!("{topic}/#"), 3);
        assert_eq!(matches(&trie, &topic), [1, 2, 3]);
        let mut filters = 0;
        trie.for_each_filter(|_, _| filters += 1);
        assert_eq!(filters, 3);
        trie.remove(&plus, |_| true);
        trie.remove(&topic, |_| true);
        trie.remove(&format!("{topic}/#"), |_| true);
        assert_eq!(trie.node_count(), 0);
    }

    #[test]
    fn plus_branches_spill_past_the_inline_stack() {
        // Filters "+/+/.../+" for every depth up to 3 * INLINE_STACK with a literal alternative at
        // each level: the walk holds one pending `+` frame per level.
        let mut trie = TopicTrie::new();
        let depth = 3 * INLINE_STACK;
        for d in 1..=depth {
            trie.insert(&vec!["+"; d].join("/"), d as u32);
            trie.insert(&vec!["a"; d].join("/"), 1000 + d as u32);
        }
        let topic = vec!["a"; depth].join("/");
        assert_eq!(matches(&trie, &topic), [depth as u32, 1000 + depth as u32]);
    }

    #[test]
    fn for_each_filter_lists_filters() {
        let mut trie = TopicTrie::new();
        for f in ["#", "a", "a/#", "/", "+/+", "a//b", "", "$x/+/#"] {
            trie.insert(f, f.to_string());
        }
        let mut seen = Vec::new();
        trie.for_each_filter(|f, vs| {
            assert_eq!(vs, [f.to_string()]);
            seen.push(f.to_string());
        });
        seen.sort();
        let mut want = vec!["#", "a", "a/#", "/", "+/+", "a//b", "", "$x/+/#"];
        want.sort();
        assert_eq!(seen, want);
    }

    const LEVELS: [&str; 4] = ["a", "b", "", "$x"];

    pub(crate) fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(&LEVELS[..]), 1..5).prop_map(|l| l.join("/"))
    }

    pub(crate) fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop::sample::select(&["a", "b", "", "$x", "+"][..]);
        (prop::collection::vec(level, 0..5), any::<bool>()).prop_map(|(mut l, hash)| {
            if hash || l.is_empty() {
                l.push("#");
            }
            l.join("/")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn matches_reference(
            filters in prop::collection::vec(filter_strategy(), 0..24),
            topics in prop::collection::vec(topic_strategy(), 1..12),
        ) {
            let mut trie = TopicTrie::new();
            for (i, f) in filters.iter().enumerate() {
                trie.insert(f, i as u32);
            }
            trie.check_invariants();
            for t in &topics {
                let want: Vec<u32> = (0..filters.len() as u32)
                    .filter(|&i| reference_matches(&filters[i as usize], t))
                    .collect();
                prop_assert_eq!(&matches(&trie, t), &want, "topic {:?}", t);
                prop_assert_eq!(trie.any_match(t), !want.is_empty());
            }
        }

        #[test]
        fn churn_matches_model(
            ops in prop::collection::vec((filter_strategy(), 0u32..3, any::<bool>()), 0..64),
            topics in prop::collection::vec(topic_strategy(), 1..8),
        ) {
            let mut trie = TopicTrie::new();
            let mut model: BTreeMap<String, Vec<u32>> = BTreeMap::new();
            for (filter, value, insert) in &ops {
                let vals = model.entry(filter.clone()).or_default();
                if *insert {
                    prop_assert_eq!(trie.insert(filter, *value), vals.is_empty());
                    vals.push(*value);
                } else {
                    let pos = vals.iter().position(|v| v == value);
                    let removed = pos.map(|i| vals.remove(i));
                    prop_assert_eq!(trie.remove(filter, |v| v == value), (removed, vals.is_empty()));
                }
                if vals.is_empty() {
                    model.remove(filter);
                }
                trie.check_invariants();
            }
            prop_assert_eq!(trie.filter_count(), model.len());
            prop_assert_eq!(trie.len(), model.values().map(Vec::len).sum::<usize>());
            for (f, vals) in &model {
                prop_assert_eq!(trie.get(f), Some(&vals[..]));
            }
            let mut listed = BTreeMap::new();
            trie.for_each_filter(|f, vs| { listed.insert(f.to_string(), vs.to_vec()); });
            prop_assert_eq!(&listed, &model);
            for t in &topics {
                let mut want: Vec<u32> = model
                    .iter()
                    .filter(|(f, _)| reference_matches(f, t))
                    .flat_map(|(_, vs)| vs.iter().copied())
                    .collect();
                want.sort_unstable();
                prop_assert_eq!(matches(&trie, t), want);
            }
            for (f, vals) in &model {
                for v in vals {
                    trie.remove(f, |x| x == v);
                }
            }
            trie.check_invariants();
            prop_assert_eq!(trie.node_count(), 0);
            prop_assert!(trie.is_empty());
        }
    }
}
