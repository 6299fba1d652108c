//! The per-shard connection table: a slab whose keys are [`ConnId`]s made of a slot index and a generation.
//!
//! A [`ConnId`] is `generation << 32 | index`. Freeing a slot bumps its generation, so a stale id (held by a
//! timer in the core, or by an event that raced a close) never matches a newer connection in the same slot.
//! A slot whose generation would reach [`RESERVED_GEN`] is retired instead of reused, which is what makes ids
//! unique for the life of the process (a retired slot costs its few bytes, once every 2^32 reuses).
//!
//! The table knows nothing about sockets; each backend stores its own small per-connection value in it.

use shardmq_shard::ConnId;

/// A generation no connection ever has: backends use it for their own event tokens (listeners, eventfd).
pub(crate) const RESERVED_GEN: u32 = u32::MAX;

pub(crate) fn pack(index: u32, gen: u32) -> ConnId {
    ConnId(((gen as u64) << 32) | index as u64)
}

pub(crate) fn unpack(id: ConnId) -> (u32, u32) {
    (id.0 as u32, (id.0 >> 32) as u32)
}

pub(crate) struct Slab<T> {
    /// Slot values; `None` for a free (or retired) slot.
    vals: Vec<Option<T>>,
    /// Current generation of each slot: the one of its live value, or the next one to hand out.
    /// Invariant: `gens.len() == vals.len()` and no live slot has `RESERVED_GEN`.
    gens: Vec<u32>,
    /// Free slot indices, reused last-in first-out (warm cache lines).
    free: Vec<u32>,
    live: usize,
}

impl<T> Slab<T> {
    pub(crate) fn new() -> Self {
        Slab { vals: Vec::new(), gens: Vec::new(), free: Vec::new(), live: 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn insert(&mut self, val: T) -> ConnId {
        debug_assert_eq!(self.gens.len(), self.vals.len());
        self.live += 1;
        if let Some(index) = self.free.pop() {
            let i = index as usize;
            debug_assert!(self.vals[i].is_none() && self.gens[i] != RESERVED_GEN);
            self.vals[i] = Some(val);
            return pack(index, self.gens[i]);
        }
        let index = u32::try_from(self.vals.len()).expect("more than 2^32 connections on one shard");
        self.vals.push(Some(val));
        self.gens.push(0);
        pack(index, 0)
    }

    /// The live value of `id`, if `id` is still current.
    pub(crate) fn get(&self, id: ConnId) -> Option<&T> {
        let (index, gen) = unpack(id);
        match self.gens.get(index as usize) {
            Some(&g) if g == gen => self.vals[index as usize].as_ref(),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        let (index, gen) = unpack(id);
        match self.gens.get(index as usize) {
            Some(&g) if g == gen => self.vals[index as usize].as_mut(),
            _ => None,
        }
    }

    /// The current id of the live value at `index` (backends whose events carry only an index).
    pub(crate) fn id_at(&self, index: u32) -> Option<ConnId> {
        let i = index as usize;
        match self.vals.get(i) {
            Some(Some(_)) => Some(pack(index, self.gens[i])),
            _ => None,
        }
    }

    pub(crate) fn remove(&mut self, id: ConnId) -> Option<T> {
        let (index, gen) = unpack(id);
        let i = index as usize;
        if self.gens.get(i) != Some(&gen) {
            return None;
        }
        let val = self.vals[i].take()?;
        self.live -= 1;
        let next = gen.wrapping_add(1);
        self.gens[i] = next;
        if next != RESERVED_GEN {
            self.free.push(index);
        }
        Some(val)
    }

    /// Ids of every live value (a snapshot, so the caller may mutate the slab while walking it).
    pub(crate) fn ids(&self) -> Vec<ConnId> {
        self.vals
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .map(|(i, _)| pack(i as u32, self.gens[i]))
            .collect()
    }

    /// Bytes the table spends per slot (value plus generation), for reporting.
    pub(crate) const fn slot_bytes() -> usize {
        std::mem::size_of::<Option<T>>() + std::mem::size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_not_reused() {
        let mut s = Slab::new();
        let a = s.insert(1u8);
        assert_eq!(s.remove(a), Some(1));
        let b = s.insert(2u8);
        assert_ne!(a, b);
        assert_eq!(unpack(a).0, unpack(b).0, "slot reused");
        assert!(s.get(a).is_none());
        assert_eq!(s.get(b), Some(&2));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn slot_retires_at_reserved_generation() {
        let mut s = Slab::new();
        let a = s.insert(());
        s.gens[0] = RESERVED_GEN - 1;
        let a2 = pack(unpack(a).0, RESERVED_GEN - 1);
        assert!(s.remove(a2).is_some());
        let b = s.insert(());
        assert_ne!(unpack(b).0, 0, "retired slot must not be reused");
    }
}
