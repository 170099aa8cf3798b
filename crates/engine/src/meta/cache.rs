//! A least-recently-used cache of metadata clusters (L2 tables), keyed by their host offset,
//! with write-back: a table changed in memory is *dirty* until the engine writes it, and a
//! dirty table is never evicted.

use blockio::IoBuf;
use std::collections::{BTreeMap, HashMap};

struct Slot {
    table: IoBuf,
    last_use: u64,
    dirty: bool,
}

/// Metadata clusters by host offset, evicting the least recently used clean one beyond
/// `capacity` (dirty ones stay until written).
pub(crate) struct TableCache {
    slots: HashMap<u64, Slot>,
    /// The clean tables by last use (`last_use` -> offset; uses are unique ticks): the first
    /// is the one to evict. Dirty tables are not in it.
    clean: BTreeMap<u64, u64>,
    dirty: usize,
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
            clean: BTreeMap::new(),
            dirty: 0,
            capacity: capacity.max(1),
            tick: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// Marks the table at `offset` used now and, with `dirty`, dirty.
    fn touch(&mut self, offset: u64, dirty: bool) -> Option<&mut Slot> {
        self.tick += 1;
        let tick = self.tick;
        let Some(slot) = self.slots.get_mut(&offset) else {
            self.misses += 1;
            return None;
        };
        self.hits += 1;
        if !slot.dirty {
            self.clean.remove(&slot.last_use);
            if dirty {
                slot.dirty = true;
                self.dirty += 1;
            } else {
                self.clean.insert(tick, offset);
            }
        }
        slot.last_use = tick;
        Some(slot)
    }

    /// The table at `offset`, if cached (marks it used).
    pub(crate) fn get(&mut self, offset: u64) -> Option<&IoBuf> {
        self.touch(offset, false).map(|s| &s.table)
    }

    /// The table at `offset` for changing, if cached; it becomes dirty.
    pub(crate) fn get_mut(&mut self, offset: u64) -> Option<&mut IoBuf> {
        self.touch(offset, true).map(|s| &mut s.table)
    }

    /// Caches a table read from `offset` (clean), or a new one (dirty), evicting the least
    /// recently used clean table if the cache is full. A table already cached stays as it is.
    pub(crate) fn insert(&mut self, offset: u64, table: IoBuf, dirty: bool) -> &mut IoBuf {
        if !self.slots.contains_key(&offset) {
            if self.slots.len() >= self.capacity {
                if let Some((_, victim)) = self.clean.pop_first() {
                    self.slots.remove(&victim);
                }
            }
            self.tick += 1;
            let last_use = self.tick;
            if dirty {
                self.dirty += 1;
            } else {
                self.clean.insert(last_use, offset);
            }
            self.slots.insert(
                offset,
                Slot {
                    table,
                    last_use,
                    dirty,
                },
            );
        }
        &mut self.slots.get_mut(&offset).expect("just inserted").table
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
        self.dirty
    }

    /// The bytes of a cached table (without marking it used).
    pub(crate) fn peek(&self, offset: u64) -> Option<&IoBuf> {
        self.slots.get(&offset).map(|s| &s.table)
    }

    /// Marks a table as written.
    pub(crate) fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            if s.dirty {
                s.dirty = false;
                self.dirty -= 1;
                self.clean.insert(s.last_use, offset);
            }
        }
    }

    /// Forgets a table (its cluster was freed).
    pub(crate) fn remove(&mut self, offset: u64) {
        if let Some(s) = self.slots.remove(&offset) {
            if s.dirty {
                self.dirty -= 1;
            } else {
                self.clean.remove(&s.last_use);
            }
        }
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

    /// The cache against a model that scans every table for the least recently used clean
    /// one, over a seeded random sequence of every operation.
    #[test]
    fn matches_a_scanning_model() {
        struct Model {
            tables: Vec<(u64, u64, bool)>, // offset, last use, dirty
            tick: u64,
            capacity: usize,
        }
        impl Model {
            fn touch(&mut self, off: u64, dirty: bool) -> bool {
                self.tick += 1;
                let tick = self.tick;
                match self.tables.iter_mut().find(|t| t.0 == off) {
                    Some(t) => {
                        t.1 = tick;
                        t.2 |= dirty;
                        true
                    }
                    None => false,
                }
            }
            fn insert(&mut self, off: u64, dirty: bool) {
                if self.tables.iter().any(|t| t.0 == off) {
                    return;
                }
                if self.tables.len() >= self.capacity {
                    let victim = self
                        .tables
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| !t.2)
                        .min_by_key(|(_, t)| t.1)
                        .map(|(i, _)| i);
                    if let Some(i) = victim {
                        self.tables.remove(i);
                    }
                }
                self.tick += 1;
                self.tables.push((off, self.tick, dirty));
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for capacity in [1, 3, 8] {
            let mut c = TableCache::new(capacity);
            let mut m = Model {
                tables: Vec::new(),
                tick: 0,
                capacity,
            };
            for _ in 0..20_000 {
                let off = next(16);
                match next(6) {
                    0 => assert_eq!(c.get(off).is_some(), m.touch(off, false)),
                    1 => assert_eq!(c.get_mut(off).is_some(), m.touch(off, true)),
                    2 | 3 => {
                        let dirty = next(3) == 0;
                        c.insert(off, IoBuf::from_slice(&[off as u8]), dirty);
                        m.insert(off, dirty);
                    }
                    4 => {
                        c.mark_clean(off);
                        if let Some(t) = m.tables.iter_mut().find(|t| t.0 == off) {
                            t.2 = false;
                        }
                    }
                    _ => {
                        c.remove(off);
                        m.tables.retain(|t| t.0 != off);
                    }
                }
                let mut want: Vec<u64> = m.tables.iter().map(|t| t.0).collect();
                want.sort_unstable();
                let mut have: Vec<u64> = c.slots.keys().copied().collect();
                have.sort_unstable();
                assert_eq!(have, want, "cached tables");
                let mut dirty: Vec<u64> = m.tables.iter().filter(|t| t.2).map(|t| t.0).collect();
                dirty.sort_unstable();
                assert_eq!(c.dirty(), dirty, "dirty tables");
                assert_eq!(c.dirty_count(), dirty.len());
                for &o in &have {
                    assert_eq!(c.peek(o).map(|b| b[0]), Some(o as u8));
                }
            }
        }
    }
}
