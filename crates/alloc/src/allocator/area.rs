//! The area of a preallocating grow, placed as QEMU places it (`qcow2_co_truncate` with
//! `falloc` or `full`): new refcount structures at the end of the file
//! ([`Allocator::refcount_area`], QEMU's `qcow2_refcount_area`), then the data clusters right
//! after them ([`Allocator::allocate_at`], QEMU's `qcow2_alloc_clusters_at`).

use super::{Allocation, Allocator, TableMove};
use crate::refcount::RefcountError;
use qcow2_format::{HostCluster, ReftableEntry};

/// QEMU's `qcow2_refcount_metadata_size` (in blocks): how many refcount blocks count
/// `clusters` clusters plus the refcount blocks and table themselves; with `generous`, room
/// for the table to grow by half.
pub fn refcount_metadata_blocks(mut clusters: u64, cs: u64, order: u32, mut generous: bool) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = (cs * 8) >> order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
        }
        if n == last {
            return blocks;
        }
    }
}

impl Allocator {
    /// QEMU's `qcow2_refcount_area` with an exact size: refcount blocks for the table
    /// indices from `start`'s on that have none, and after them a new refcount table (the
    /// old entries, and theirs), placed from cluster `start` on (which must be free, as
    /// everything past the last cluster in use is), covering everything up to their own end
    /// plus `additional` clusters. The table moves there: the engine writes it whole and
    /// switches the header at its next write-back, and the old table's clusters are freed
    /// after that. Returns the cluster after the new structures, where the area starts.
    pub fn refcount_area(&mut self, start: u64, additional: u64) -> Result<u64, RefcountError> {
        let cs = self.geo.cluster_size();
        let per = self.rc.entries_per_block();
        let total = refcount_metadata_blocks(start + additional, cs, self.width().order(), false);
        let area_index = start / per;
        let table_size = total.div_ceil(cs / 8) * (cs / 8);
        let table_clusters = table_size * 8 / cs;
        let old = self.rc.table().to_vec();
        let used = old.iter().rposition(|e| e.0 != 0).map_or(0, |i| i + 1);
        let mut table = vec![ReftableEntry(0); table_size as usize];
        let keep = used.min(table.len());
        table[..keep].copy_from_slice(&old[..keep]);
        let new_blocks = (area_index..total)
            .filter(|&i| table[i as usize].0 == 0)
            .count() as u64;
        let table_first = start + new_blocks;
        let end = table_first + table_clusters;
        let old_offset = self.table_offset;
        let old_clusters = (old.len() as u64 * 8).div_ceil(cs);
        self.rc.replace_table(table);
        let mut at = start;
        for i in area_index..total {
            if !self.rc.has_block(i) {
                let offset = self.geo.cluster_offset(HostCluster(at));
                self.rc.add_block(i, offset, vec![0u8; cs as usize]);
                self.block_clusters.insert(at);
                self.dirty_blocks.insert(i);
                at += 1;
            }
        }
        // The new structures count themselves: blocks and table, in the blocks that cover
        // them (new ones, or old ones with room).
        for c in start..end {
            self.set(HostCluster(c), 1)?;
        }
        self.table_offset = self.geo.cluster_offset(HostCluster(table_first));
        self.high_water = self.high_water.max(end);
        let previous = self.table_move.take();
        self.table_move = Some(TableMove {
            offset: self.table_offset,
            clusters: table_clusters,
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
        self.dirty_table_entries.clear();
        Ok(end)
    }

    /// Allocates exactly the clusters `first..first+count` (QEMU's
    /// `qcow2_alloc_clusters_at`): they must be free (refcount 0, no lease) and counted by
    /// existing refcount blocks, as [`refcount_area`](Self::refcount_area) leaves its area.
    pub fn allocate_at(
        &mut self,
        first: HostCluster,
        count: u64,
        leased: impl Fn(HostCluster) -> bool,
    ) -> Result<Allocation, RefcountError> {
        self.reclaim()?;
        for c in first.0..first.0 + count {
            if !self.is_free(c, &leased)? {
                return Err(RefcountError::InUse {
                    cluster: HostCluster(c),
                });
            }
            if !self.rc.has_block(c / self.rc.entries_per_block()) {
                return Err(RefcountError::NoBlock {
                    cluster: HostCluster(c),
                });
            }
        }
        let fresh = first.0 >= self.high_water;
        for c in first.0..first.0 + count {
            self.set(HostCluster(c), 1)?;
        }
        self.high_water = self.high_water.max(first.0 + count);
        Ok(Allocation {
            first,
            count,
            fresh,
        })
    }
}
