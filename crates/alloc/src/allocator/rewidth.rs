//! A refcount structure of another width (QEMU's `qcow2_change_refcount_order`): its
//! clusters are allocated through the current refcounts ([`Allocator::allocate_refcounts`]),
//! filled from the current counts ([`Allocator::encode_refcounts`]), and put in place once
//! the engine has written them and switched the header ([`Allocator::switch_refcounts`]).

use super::Allocator;
use crate::refcount::{RefcountError, Refcounts};
use qcow2_format::{HostCluster, HostOffset, RefcountWidth, ReftableEntry};
use std::collections::BTreeMap;

/// Where the clusters of a new refcount structure are: allocated (counted by the current
/// structure), not written yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRefcounts {
    /// The new entry width.
    pub width: RefcountWidth,
    /// The new table's first cluster.
    pub table: HostCluster,
    /// The new table's size in clusters.
    pub table_clusters: u64,
    /// The new blocks: table index -> cluster.
    pub blocks: BTreeMap<u64, HostCluster>,
}

impl NewRefcounts {
    /// Every cluster the new structure occupies (table and blocks).
    pub fn clusters(&self) -> impl Iterator<Item = HostCluster> + '_ {
        (self.table.0..self.table.0 + self.table_clusters)
            .map(HostCluster)
            .chain(self.blocks.values().copied())
    }
}

impl Allocator {
    /// The first cluster (by offset) whose refcount does not fit in `width`, with its
    /// refcount: QEMU refuses to narrow the width then.
    pub fn first_overflow(
        &self,
        width: RefcountWidth,
    ) -> Result<Option<(HostCluster, u64)>, RefcountError> {
        for c in 0..self.used_end()? {
            let v = self.rc.get(HostCluster(c))?;
            if v > width.max() {
                return Ok(Some((HostCluster(c), v)));
            }
        }
        Ok(None)
    }

    /// Allocates, through the current refcounts, the clusters of a refcount structure of
    /// `width` that counts every cluster in use: one block per range of `width`'s blocks
    /// that holds a cluster with a non-zero count, and a table naming them. The new clusters
    /// need counting themselves (and allocating them may create blocks of the current
    /// structure), so this repeats, as QEMU does, until an iteration allocates nothing.
    /// `leased` as for [`Allocator::allocate`].
    ///
    /// A crash before the header names the new structure leaves these clusters leaked, no
    /// more; [`release_refcounts`](Self::release_refcounts) gives them back on failure.
    pub fn allocate_refcounts(
        &mut self,
        width: RefcountWidth,
        leased: impl Fn(HostCluster) -> bool,
    ) -> Result<NewRefcounts, RefcountError> {
        let cs = self.geo.cluster_size();
        let per = width.entries_per_block(cs);
        let mut new = NewRefcounts {
            width,
            table: HostCluster(0),
            table_clusters: 0,
            blocks: BTreeMap::new(),
        };
        loop {
            // The ranges in order, each judged with the counts as they are when it comes up
            // (QEMU's walk over the old structure): a block allocated for one range may land
            // in a later one.
            let mut changed = false;
            let mut t = 0;
            loop {
                let end = self.used_end()?;
                if t * per >= end {
                    break;
                }
                if !new.blocks.contains_key(&t)
                    && self.any_counted(t * per..((t + 1) * per).min(end))?
                {
                    let a = self.allocate(1, &leased)?;
                    new.blocks.insert(t, a.first);
                    changed = true;
                }
                t += 1;
            }
            // After a round that allocated, the table goes anew (QEMU frees and allocates it
            // again, at the first free place, whatever its size).
            if changed || new.table_clusters == 0 {
                if new.table_clusters > 0 {
                    self.release_unreferenced(new.table, new.table_clusters)?;
                }
                let entries = new.blocks.keys().next_back().map_or(1, |&t| t + 1);
                let clusters = (entries * 8).div_ceil(cs);
                let a = self.allocate(clusters, &leased)?;
                new.table = a.first;
                new.table_clusters = clusters;
                changed = true;
            }
            if !changed {
                return Ok(new);
            }
        }
    }

    /// Whether a cluster of `range` has a non-zero count.
    fn any_counted(&self, range: std::ops::Range<u64>) -> Result<bool, RefcountError> {
        for c in range {
            if self.rc.get(HostCluster(c))? != 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Gives back the clusters of a new structure that will not be used (nothing refers to
    /// them).
    pub fn release_refcounts(&mut self, new: &NewRefcounts) -> Result<(), RefcountError> {
        for c in new.clusters().collect::<Vec<_>>() {
            self.release_unreferenced(c, 1)?;
        }
        Ok(())
    }

    /// The new structure filled with the current counts: its table and every block, loaded.
    /// A count that does not fit the new width is
    /// [`RefcountError::Format`]`(`[`RefcountOverflow`](qcow2_format::FormatError::RefcountOverflow)`)`.
    pub fn encode_refcounts(&self, new: &NewRefcounts) -> Result<Refcounts, RefcountError> {
        let cs = self.geo.cluster_size();
        let per = new.width.entries_per_block(cs);
        let mut table = vec![ReftableEntry(0); (new.table_clusters * cs / 8) as usize];
        for (&t, &c) in &new.blocks {
            table[t as usize] = ReftableEntry(self.geo.cluster_offset(c).0);
        }
        let end = self.used_end()?;
        let mut rc = Refcounts::new(self.geo, new.width, table);
        for &t in new.blocks.keys() {
            let mut block = vec![0u8; cs as usize];
            for c in t * per..((t + 1) * per).min(end) {
                let v = self.rc.get(HostCluster(c))?;
                new.width.set(&mut block, c - t * per, v)?;
            }
            rc.insert_block(t, block);
        }
        Ok(rc)
    }

    /// Puts the new structure `rc` (table at `table_offset`) in place of the current one,
    /// once the header names it on disk: the old table and blocks are unreferenced from then
    /// on and go through the deferred decrements, counted by the new structure (which counts
    /// them, having been filled from the counts before the switch). Everything the new
    /// structure holds is dirty for the next write-back (it is on disk already; the
    /// decrements will change it).
    pub fn switch_refcounts(&mut self, rc: Refcounts, table_offset: HostOffset) {
        let cs = self.geo.cluster_size();
        let old_first = self.geo.host_cluster(self.table_offset).0;
        let old_clusters = (self.rc.table().len() as u64 * 8).div_ceil(cs);
        let old_blocks: Vec<u64> = self.block_clusters.drain().collect();
        self.block_clusters = rc
            .table()
            .iter()
            .filter(|e| e.0 != 0)
            .map(|e| self.geo.host_cluster(HostOffset(e.0)).0)
            .collect();
        self.rc = rc;
        self.table_offset = table_offset;
        self.table_move = None;
        self.dirty_blocks.clear();
        self.dirty_table_entries.clear();
        self.free_hint = 0;
        for c in (old_first..old_first + old_clusters).chain(old_blocks) {
            self.pending.push(HostCluster(c));
        }
    }
}
