//! Cluster allocation over the in-memory refcounts.
//!
//! The [`Allocator`] owns the refcount table and every refcount block (the engine loads them
//! all when it opens an image read-write, but for one at an unaligned offset, whose refcounts
//! are then errors as they are for QEMU) and decides which host clusters to hand out. It
//! records what changed (dirty blocks, a relocated table) for the engine to write back in
//! crash-safe order, and it keeps refcount *decrements* aside until the engine says that the
//! unmapping that caused them is on disk (invariant I4): until then the cluster keeps its
//! count and cannot be reallocated.
//!
//! A cluster is handed out only if its refcount is 0 and no lease on it is held or waited for
//! (invariant I1): the caller passes the lease test in.

use crate::refcount::{RefcountError, Refcounts};
use crate::reservation::{Reservation, Returns};
use qcow2_format::{ClusterGeometry, HostCluster, HostOffset, RefcountWidth, ReftableEntry};
use std::collections::BTreeSet;

mod area;
mod bytes;
mod rewidth;

pub use area::refcount_metadata_blocks;
pub use bytes::ByteAllocation;
pub use rewidth::NewRefcounts;

/// A contiguous run of newly allocated host clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// First cluster of the run.
    pub first: HostCluster,
    /// Number of clusters.
    pub count: u64,
    /// Whether the clusters lie past everything ever written since open, so that they still
    /// read as zeros (a copy-on-write from zeros may skip writing them).
    pub fresh: bool,
}

/// A refcount table that moved: the engine writes it whole, then switches the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableMove {
    /// Where the new table starts.
    pub offset: HostOffset,
    /// Its size in clusters.
    pub clusters: u64,
    /// Where the old table was.
    pub old_offset: HostOffset,
    /// Its size in clusters.
    pub old_clusters: u64,
}

/// Refcounts in memory and the allocation policy.
#[derive(Debug, Clone)]
pub struct Allocator {
    geo: ClusterGeometry,
    rc: Refcounts,
    dirty_blocks: BTreeSet<u64>,
    dirty_table_entries: BTreeSet<u64>,
    table_offset: HostOffset,
    table_move: Option<TableMove>,
    free_hint: u64,
    high_water: u64,
    pending: Vec<HostCluster>,
    /// Clusters holding refcount blocks.
    block_clusters: std::collections::HashSet<u64>,
    /// Clusters given back by dropped reservations, not reclaimed yet.
    returns: Returns,
    /// Where the next compressed cluster's bytes go (QEMU's `free_byte_offset`): inside a
    /// host cluster that already holds compressed data, never at a cluster boundary. Only in
    /// memory; forgotten when that cluster's count drops to 0.
    free_byte: Option<u64>,
}

impl Allocator {
    /// An allocator over a refcount table at `table_offset` whose blocks are all loaded in
    /// `rc`. `file_clusters` is the file's length in clusters: clusters at or past it have
    /// never been written.
    pub fn new(
        rc: Refcounts,
        geo: ClusterGeometry,
        table_offset: HostOffset,
        file_clusters: u64,
    ) -> Self {
        let block_clusters = rc
            .table()
            .iter()
            .filter(|e| e.0 & !0x1ff != 0)
            .map(|e| (e.0 & !0x1ff) >> geo.cluster_bits())
            .collect();
        Self {
            block_clusters,
            geo,
            rc,
            dirty_blocks: BTreeSet::new(),
            dirty_table_entries: BTreeSet::new(),
            table_offset,
            table_move: None,
            free_hint: 0,
            high_water: file_clusters,
            pending: Vec::new(),
            returns: Returns::default(),
            free_byte: None,
        }
    }

    /// A reservation of the clusters of `a` (just allocated, not referred to yet): see
    /// [`Reservation`].
    pub fn reserve(&self, a: &Allocation) -> Reservation {
        Reservation::new(a.first, a.count, false, self.returns.clone())
    }

    /// Takes back the clusters of reservations dropped uncommitted (their count drops to 0).
    /// [`allocate`](Self::allocate) does it first; the engine does it before writing the
    /// refcounts back. Returns how many runs came back.
    pub fn reclaim(&mut self) -> Result<usize, RefcountError> {
        let runs = self.returns.take();
        for r in &runs {
            if r.unref {
                for c in r.first.0..r.first.0 + r.count {
                    self.defer_decrement(HostCluster(c));
                }
            } else {
                self.release_unreferenced(r.first, r.count)?;
            }
        }
        Ok(runs.len())
    }

    /// Runs given back by dropped reservations that [`reclaim`](Self::reclaim) has not taken
    /// yet.
    pub fn returns(&self) -> &Returns {
        &self.returns
    }

    /// The refcount view.
    pub fn refcounts(&self) -> &Refcounts {
        &self.rc
    }

    /// The refcount width.
    pub fn width(&self) -> RefcountWidth {
        self.rc.width()
    }

    /// The refcount of `c`.
    pub fn get(&self, c: HostCluster) -> Result<u64, RefcountError> {
        self.rc.get(c)
    }

    fn is_free(
        &self,
        c: u64,
        leased: &impl Fn(HostCluster) -> bool,
    ) -> Result<bool, RefcountError> {
        Ok(self.rc.get(HostCluster(c))? == 0 && !leased(HostCluster(c)))
    }

    /// First cluster at or after `from` that is free.
    fn next_free(
        &self,
        from: u64,
        leased: &impl Fn(HostCluster) -> bool,
    ) -> Result<u64, RefcountError> {
        let mut c = from;
        while !self.is_free(c, leased)? {
            c += 1;
        }
        Ok(c)
    }

    /// Allocates `count` contiguous clusters (refcount 0 -> 1), creating refcount blocks and
    /// growing the refcount table as needed. `leased` tells whether a cluster's lease is held
    /// or waited for; such clusters are skipped.
    pub fn allocate(
        &mut self,
        count: u64,
        leased: impl Fn(HostCluster) -> bool,
    ) -> Result<Allocation, RefcountError> {
        assert!(count > 0, "allocate at least one cluster");
        self.reclaim()?;
        loop {
            let first = self.find_run(count, &leased)?;
            // Every cluster of the run needs its refcount block (and a table entry for it).
            if let Some(t) = self.missing_block(first, count) {
                self.create_block(t, first + count, &leased)?;
                continue;
            }
            let fresh = first >= self.high_water;
            for c in first..first + count {
                self.set(HostCluster(c), 1)?;
            }
            self.high_water = self.high_water.max(first + count);
            self.free_hint = first + count;
            return Ok(Allocation {
                first: HostCluster(first),
                count,
                fresh,
            });
        }
    }

    /// Whether allocating `count` clusters now would take clusters past the highest one in
    /// use (and so grow the file), `leased` as for [`Allocator::allocate`]. A caller with
    /// decrements pending can make them take effect first and reuse what they free.
    pub fn would_grow(
        &self,
        count: u64,
        leased: impl Fn(HostCluster) -> bool,
    ) -> Result<bool, RefcountError> {
        Ok(self.find_run(count, &leased)? + count > self.high_water)
    }

    fn find_run(
        &self,
        count: u64,
        leased: &impl Fn(HostCluster) -> bool,
    ) -> Result<u64, RefcountError> {
        let mut start = self.next_free(self.free_hint, leased)?;
        loop {
            let mut n = 0;
            while n < count && self.is_free(start + n, leased)? {
                n += 1;
            }
            if n == count {
                return Ok(start);
            }
            start = self.next_free(start + n + 1, leased)?;
        }
    }

    fn missing_block(&self, first: u64, count: u64) -> Option<u64> {
        let per = self.rc.entries_per_block();
        (first / per..=(first + count - 1) / per).find(|&t| !self.rc.has_block(t))
    }

    /// Creates the refcount block for table index `t`, as QEMU's `alloc_refcount_block`
    /// places it: in the first free cluster from `from` (the end of the run being allocated,
    /// which the run's retry then keeps). Inside `t`'s range the block describes itself;
    /// past it, the block of the range it lands in counts it, and is created first if
    /// missing (in the next free cluster after it, as QEMU's retry leaves it).
    fn create_block(
        &mut self,
        t: u64,
        from: u64,
        leased: &impl Fn(HostCluster) -> bool,
    ) -> Result<(), RefcountError> {
        let per = self.rc.entries_per_block();
        let at = self.next_free(from, leased)?;
        if t >= self.rc.table().len() as u64 {
            // The table grows past the run and the new block (QEMU puts it past both).
            self.grow_table(t + 1, at + 1, leased)?;
            if self.rc.has_block(t) {
                return Ok(());
            }
        }
        let home = at / per;

        if home != t && !self.rc.has_block(home) {
            self.create_block(home, at + 1, leased)?;
        }
        let offset = self.geo.cluster_offset(HostCluster(at));
        self.rc
            .add_block(t, offset, vec![0u8; self.geo.cluster_size() as usize]);
        self.block_clusters.insert(at);
        self.set(HostCluster(at), 1)?;
        self.dirty_blocks.insert(t);
        if self.table_move.is_none() {
            self.dirty_table_entries.insert(t);
        }
        self.high_water = self.high_water.max(at + 1);
        Ok(())
    }

    /// Moves the refcount table to fresh clusters past everything in use and past `from`
    /// (what is being allocated), with room for at least `entries` entries and for the
    /// blocks that describe the new table itself.
    fn grow_table(
        &mut self,
        entries: u64,
        from: u64,
        leased: &impl Fn(HostCluster) -> bool,
    ) -> Result<(), RefcountError> {
        let cs = self.geo.cluster_size();
        let per = self.rc.entries_per_block();
        let old_len = self.rc.table().len() as u64;
        let old_clusters = (old_len * 8).div_ceil(cs);
        // Clusters at or past the high-water mark have never been handed out: their refcount
        // is 0. They are free unless `leased` says otherwise (a read of a compressed span
        // reaching past the end of the file, a cluster the engine keeps out of use). The
        // table also goes past `from`, the run being allocated.
        let mut start = self.high_water.max(from);
        let mut want = entries.max(old_len * 2).max(1);
        let clusters = loop {
            let clusters = (want * 8).div_ceil(cs);
            // Room for the table, one block per table index it spans, and one spare.
            let end = start + clusters + clusters.div_ceil(per) + 2;
            let needed = end.div_ceil(per);
            if want < needed {
                want = needed;
                continue;
            }
            match (start..start + clusters)
                .rev()
                .find(|&c| leased(HostCluster(c)))
            {
                Some(c) => start = c + 1,
                None => break clusters,
            }
        };
        let new_len = clusters * cs / 8;
        let mut table = self.rc.table().to_vec();
        table.resize(new_len as usize, ReftableEntry(0));
        let old_offset = self.table_offset;
        self.rc.replace_table(table);
        self.table_offset = self.geo.cluster_offset(HostCluster(start));
        self.high_water = start + clusters;
        for c in start..start + clusters {
            let t = c / per;
            if !self.rc.has_block(t) {
                // The block describes itself: it goes in its own range, after the table.
                let at = self.next_free((t * per).max(start + clusters), leased)?;
                if at / per != t {
                    return Err(RefcountError::NoBlock {
                        cluster: HostCluster(c),
                    });
                }
                let offset = self.geo.cluster_offset(HostCluster(at));
                self.rc.add_block(t, offset, vec![0u8; cs as usize]);
                self.block_clusters.insert(at);
                self.rc.set(HostCluster(at), 1)?;
                self.high_water = self.high_water.max(at + 1);
            }
            self.set(HostCluster(c), 1)?;
        }
        let previous = self.table_move.take();
        self.table_move = Some(TableMove {
            offset: self.table_offset,
            clusters,
            old_offset: previous.map_or(old_offset, |m| m.old_offset),
            old_clusters: previous.map_or(old_clusters, |m| m.old_clusters),
        });
        if let Some(m) = previous {
            // A table never written anywhere can go at once: nothing on disk refers to it.
            let first = self.geo.host_cluster(m.offset).0;
            for c in first..first + m.clusters {
                self.set(HostCluster(c), 0)?;
            }
        }
        // The whole table is written when it moves.
        self.dirty_table_entries.clear();
        Ok(())
    }

    fn set(&mut self, c: HostCluster, value: u64) -> Result<(), RefcountError> {
        self.rc.set(c, value)?;
        if value == 0
            && self
                .free_byte
                .is_some_and(|b| b >> self.geo.cluster_bits() == c.0)
        {
            // The cluster can be handed out again: nothing more may be packed into it.
            self.free_byte = None;
        }
        self.dirty_blocks.insert(self.rc.slot(c).table_index);
        Ok(())
    }

    /// Adds one reference to an allocated cluster (a compressed cluster shared further).
    pub fn increment(&mut self, c: HostCluster) -> Result<u64, RefcountError> {
        let v = self.rc.get(c)?;
        let n = v
            .checked_add(1)
            .filter(|&n| n <= self.width().max())
            .ok_or(RefcountError::Format(
                qcow2_format::FormatError::RefcountOverflow {
                    value: v.saturating_add(1),
                    bits: self.width().bits(),
                },
            ))?;
        self.set(c, n)?;
        Ok(n)
    }

    /// Gives back clusters that were allocated but never referenced (a failed write): their
    /// count drops to 0 at once, since nothing on disk can refer to them.
    pub fn release_unreferenced(
        &mut self,
        first: HostCluster,
        count: u64,
    ) -> Result<(), RefcountError> {
        for c in first.0..first.0 + count {
            let v = self.rc.get(HostCluster(c))?;
            self.set(HostCluster(c), v.saturating_sub(1))?;
        }
        self.free_hint = self.free_hint.min(first.0);
        Ok(())
    }

    /// Records that one reference to `c` was removed from metadata that is not on disk yet.
    /// The count drops only in [`Allocator::apply_decrements`].
    pub fn defer_decrement(&mut self, c: HostCluster) {
        self.pending.push(c);
    }

    /// Whether decrements wait for the next metadata write-back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Number of decrements waiting.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Applies the deferred decrements, now that the unmappings behind them are on disk.
    /// A decrement that would free a cluster happens only if `try_free(c)` agrees (the caller
    /// takes the exclusive lease there: no I/O may be in flight on a cluster that becomes
    /// free); the others stay pending. Returns the clusters freed.
    pub fn apply_decrements<L>(
        &mut self,
        mut try_free: impl FnMut(HostCluster) -> Option<L>,
    ) -> Result<Vec<(HostCluster, L)>, RefcountError> {
        let mut freed = Vec::new();
        let mut keep = Vec::new();
        for c in std::mem::take(&mut self.pending) {
            let v = self.rc.get(c)?;
            if v == 0 {
                // Already free (a repeated decrement would under-count): ignore.
                continue;
            }
            if v == 1 {
                match try_free(c) {
                    Some(lease) => {
                        self.set(c, 0)?;
                        self.free_hint = self.free_hint.min(c.0);
                        freed.push((c, lease));
                    }
                    None => keep.push(c),
                }
            } else {
                self.set(c, v - 1)?;
            }
        }
        self.pending = keep;
        Ok(freed)
    }

    /// Refcount blocks changed since the last write-back, with their offsets and bytes.
    pub fn dirty_blocks(&self) -> Vec<(u64, HostOffset, Vec<u8>)> {
        self.dirty_blocks
            .iter()
            .filter_map(|&t| {
                let off = self.rc.block_offset(t).ok().flatten()?;
                Some((t, off, self.rc.block(t)?.to_vec()))
            })
            .collect()
    }

    /// Marks blocks as written.
    pub fn blocks_written(&mut self, tables: impl IntoIterator<Item = u64>) {
        for t in tables {
            self.dirty_blocks.remove(&t);
        }
    }

    /// Table entries changed since the last write-back (the table itself did not move).
    pub fn dirty_table_entries(&self) -> Vec<u64> {
        self.dirty_table_entries.iter().copied().collect()
    }

    /// Marks table entries as written.
    pub fn table_entries_written(&mut self) {
        self.dirty_table_entries.clear();
    }

    /// A table relocation waiting to be written.
    pub fn table_move(&self) -> Option<TableMove> {
        self.table_move
    }

    /// The relocated table is written and the header switched: its old clusters are no longer
    /// referenced once that is on disk, so they go through the deferred decrements.
    pub fn table_moved(&mut self) {
        if let Some(m) = self.table_move.take() {
            let first = self.geo.host_cluster(m.old_offset).0;
            for c in first..first + m.old_clusters {
                self.pending.push(HostCluster(c));
            }
        }
    }

    /// Where the refcount table is (in memory: possibly not yet on disk).
    pub fn table_offset(&self) -> HostOffset {
        self.table_offset
    }

    /// The table's entries as bytes (big-endian), for writing.
    pub fn table_bytes(&self) -> Vec<u8> {
        self.rc
            .table()
            .iter()
            .flat_map(|e| e.0.to_be_bytes())
            .collect()
    }

    /// Whether anything waits to be written back.
    pub fn is_dirty(&self) -> bool {
        !self.dirty_blocks.is_empty()
            || !self.dirty_table_entries.is_empty()
            || self.table_move.is_some()
    }

    /// Whether `c` holds the refcount table or a refcount block (metadata the allocator owns).
    pub fn is_metadata(&self, c: HostCluster) -> bool {
        let cs = self.geo.cluster_size();
        let table_first = self.geo.host_cluster(self.table_offset).0;
        let table_clusters = (self.rc.table().len() as u64 * 8).div_ceil(cs);
        if (table_first..table_first + table_clusters).contains(&c.0) {
            return true;
        }
        self.block_clusters.contains(&c.0)
    }

    /// One past the highest cluster handed out or present in the file.
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// One past the last cluster with a non-zero refcount (0 when none has one): where a
    /// shrink may cut the file (QEMU's `qcow2_get_last_cluster`). A cluster whose decrement
    /// is still deferred, or that a reservation holds, keeps its count and so stays inside.
    pub fn used_end(&self) -> Result<u64, RefcountError> {
        let mut c = self.high_water;
        while c > 0 && self.rc.get(HostCluster(c - 1))? == 0 {
            c -= 1;
        }
        Ok(c)
    }

    /// Drops the refcount blocks that count nothing but (perhaps) themselves, as QEMU's
    /// `qcow2_shrink_reftable` does after a shrink: their table entries become 0, to be
    /// written by the next write-back before anything is allocated in their place (the
    /// caller holds the metadata lock until then). A dropped block that another block counts
    /// gets a deferred decrement there, applied once the table is on disk. Does nothing while
    /// a moved table waits to be written. Returns how many blocks were dropped.
    pub fn drop_empty_blocks(&mut self) -> Result<usize, RefcountError> {
        if self.table_move.is_some() {
            return Ok(0);
        }
        let per = self.rc.entries_per_block();
        let width = self.rc.width();
        let mut dropped = 0;
        for t in 0..self.rc.table().len() as u64 {
            let (Some(offset), Some(bytes)) = (self.rc.block_offset(t)?, self.rc.block(t)) else {
                continue;
            };
            let own = self.geo.host_cluster(offset).0;
            let counts_itself = own / per == t;
            let mut rest = bytes.to_vec();
            if counts_itself {
                width.set(&mut rest, own % per, 0)?;
            }
            if rest.iter().any(|&b| b != 0) {
                continue;
            }
            self.rc.remove_block(t);
            self.block_clusters.remove(&own);
            self.dirty_blocks.remove(&t);
            self.dirty_table_entries.insert(t);
            if !counts_itself {
                self.pending.push(HostCluster(own));
            }
            self.free_hint = self.free_hint.min(own);
            dropped += 1;
        }
        Ok(dropped)
    }

    /// The file was cut at `clusters` (at or past [`used_end`](Self::used_end)): the clusters
    /// from there on read as zeros again, as if never written.
    pub fn truncated(&mut self, clusters: u64) {
        self.high_water = clusters;
    }
}

#[cfg(test)]
mod tests;
