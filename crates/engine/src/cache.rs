//! A small least-recently-used cache of metadata clusters (L2 tables, refcount blocks), keyed
//! by their host offset.

use blockio::IoBuf;
use std::collections::HashMap;

struct Slot {
    table: IoBuf,
    last_use: u64,
}

/// Metadata clusters by host offset, evicting the least recently used beyond `capacity`.
pub(crate) struct TableCache {
    slots: HashMap<u64, Slot>,
    capacity: usize,
    tick: u64,
    hits: u64,
    misses: u64,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            slots: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// The table at `offset`, if cached (marks it used).
    pub(crate) fn get(&mut self, offset: u64) -> Option<&IoBuf> {
        self.tick += 1;
        let tick = self.tick;
        match self.slots.get_mut(&offset) {
            Some(slot) => {
                self.hits += 1;
                slot.last_use = tick;
                Some(&slot.table)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Caches a table read from `offset`, evicting the least recently used one if full.
    pub(crate) fn insert(&mut self, offset: u64, table: IoBuf) -> &IoBuf {
        if self.slots.len() >= self.capacity && !self.slots.contains_key(&offset) {
            if let Some(victim) = self
                .slots
                .iter()
                .min_by_key(|(_, s)| s.last_use)
                .map(|(k, _)| *k)
            {
                self.slots.remove(&victim);
            }
        }
        self.tick += 1;
        let last_use = self.tick;
        let slot = self.slots.entry(offset).or_insert(Slot { table, last_use });
        &slot.table
    }

    /// (hits, misses) so far.
    pub(crate) fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = TableCache::new(2);
        c.insert(1, IoBuf::from_slice(&[1]));
        c.insert(2, IoBuf::from_slice(&[2]));
        assert_eq!(c.get(1).map(|b| b[0]), Some(1)); // 2 is now the oldest
        c.insert(3, IoBuf::from_slice(&[3]));
        assert!(c.get(2).is_none());
        assert_eq!(c.get(1).map(|b| b[0]), Some(1));
        assert_eq!(c.get(3).map(|b| b[0]), Some(3));

        assert_eq!(c.stats(), (3, 1));
    }
}
