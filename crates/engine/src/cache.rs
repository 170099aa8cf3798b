//! A least-recently-used cache of metadata clusters (L2 tables), keyed by their host offset,
//! with write-back: a table changed in memory is *dirty* until the engine writes it, and a
//! dirty table is never evicted.

use blockio::IoBuf;
use std::collections::HashMap;

struct Slot {
    table: IoBuf,
    last_use: u64,
    dirty: bool,
}

/// Metadata clusters by host offset, evicting the least recently used clean one beyond
/// `capacity` (dirty ones stay until written).
pub(crate) struct TableCache {
    slots: HashMap<u64, Slot>,
    capacity: usize,
    tick: u64,
    hits: u64,
    misses: u64,
}

impl TableCache {
    /// A cache holding at most `capacity` clean tables (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            slots: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
            hits: 0,
            misses: 0,
        }
    }

    fn touch(&mut self, offset: u64) -> Option<&mut Slot> {
        self.tick += 1;
        let tick = self.tick;
        match self.slots.get_mut(&offset) {
            Some(slot) => {
                self.hits += 1;
                slot.last_use = tick;
                Some(slot)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// The table at `offset`, if cached (marks it used).
    pub(crate) fn get(&mut self, offset: u64) -> Option<&IoBuf> {
        self.touch(offset).map(|s| &s.table)
    }

    /// The table at `offset` for changing, if cached; it becomes dirty.
    pub(crate) fn get_mut(&mut self, offset: u64) -> Option<&mut IoBuf> {
        self.touch(offset).map(|s| {
            s.dirty = true;
            &mut s.table
        })
    }

    /// Caches a table read from `offset` (clean), or a new one (dirty), evicting the least
    /// recently used clean table if the cache is full.
    pub(crate) fn insert(&mut self, offset: u64, table: IoBuf, dirty: bool) -> &mut IoBuf {
        if self.slots.len() >= self.capacity && !self.slots.contains_key(&offset) {
            if let Some(victim) = self
                .slots
                .iter()
                .filter(|(_, s)| !s.dirty)
                .min_by_key(|(_, s)| s.last_use)
                .map(|(k, _)| *k)
            {
                self.slots.remove(&victim);
            }
        }
        self.tick += 1;
        let last_use = self.tick;
        let slot = self.slots.entry(offset).or_insert(Slot {
            table,
            last_use,
            dirty,
        });
        &mut slot.table
    }

    /// Offsets of the dirty tables.
    pub(crate) fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of dirty tables.
    pub(crate) fn dirty_count(&self) -> usize {
        self.slots.values().filter(|s| s.dirty).count()
    }

    /// The bytes of a cached table (without marking it used).
    pub(crate) fn peek(&self, offset: u64) -> Option<&IoBuf> {
        self.slots.get(&offset).map(|s| &s.table)
    }

    /// Marks a table as written.
    pub(crate) fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = false;
        }
    }

    /// Forgets a table (its cluster was freed).
    pub(crate) fn remove(&mut self, offset: u64) {
        self.slots.remove(&offset);
    }

    /// The configured capacity.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
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
    fn evicts_least_recently_used_clean_table() {
        let mut c = TableCache::new(2);
        c.insert(1, IoBuf::from_slice(&[1]), false);
        c.insert(2, IoBuf::from_slice(&[2]), false);
        assert_eq!(c.get(1).map(|b| b[0]), Some(1)); // 2 is now the oldest
        c.insert(3, IoBuf::from_slice(&[3]), false);
        assert!(c.get(2).is_none());
        assert_eq!(c.get(1).map(|b| b[0]), Some(1));
        assert_eq!(c.get(3).map(|b| b[0]), Some(3));
        assert_eq!(c.stats(), (3, 1));
    }

    #[test]
    fn dirty_tables_are_never_evicted() {
        let mut c = TableCache::new(1);
        c.insert(1, IoBuf::from_slice(&[1]), true);
        c.insert(2, IoBuf::from_slice(&[2]), false);
        assert_eq!(c.peek(1).map(|b| b[0]), Some(1), "dirty table kept");
        assert_eq!(c.dirty(), vec![1]);
        c.mark_clean(1);
        c.insert(3, IoBuf::from_slice(&[3]), false);
        assert_eq!(c.dirty_count(), 0);
        assert!(
            c.peek(1).is_none() || c.peek(2).is_none(),
            "a clean table was evicted"
        );
    }
}
