//! Metadata (layer 4): the state the metadata lock guards ([`Meta`]), how it is loaded
//! ([`load`]) and checked at open ([`verify`]), the L2 table cache ([`cache`]), and the
//! [`Store`] that reads tables into it and writes it back in the crash-safe order (I4, I5,
//! I8), allocates clusters and guards metadata against data writes.
//!
//! Uses the files and aligned I/O below it; knows nothing of guest requests, the mapping of
//! guest ranges (`map`) or the image facade.

pub(crate) mod cache;
pub(crate) mod load;
mod snapshots;
mod store;
pub(crate) mod verify;

pub(crate) use store::Store;

use cache::TableCache;
use qcow2_format::{ClusterGeometry, Header, L1Entry};

/// Metadata guarded by the metadata lock.
pub(crate) struct Meta {
    /// The active L1 table (authoritative; written back entry by entry).
    pub(crate) l1: Vec<L1Entry>,
    /// L1 indices changed since the last write-back.
    pub(crate) l1_dirty: std::collections::BTreeSet<u64>,
    pub(crate) l2: TableCache,
    /// The header as it is (or is about to be) on disk.
    pub(crate) header: Header,
    /// Refcounts and allocation (read-write images only).
    pub(crate) alloc: Option<qcow2_alloc::Allocator>,
    /// Guest clusters with an allocating write in flight (invariant I6): others wait on the
    /// gate, which opens when the allocating writer drops its guard (after its L2 entry is in
    /// place, or when it fails or is cancelled).
    pub(crate) gates: qcow2_alloc::Gates,
    /// Whether the header changes due before the first write were made.
    pub(crate) first_write_done: bool,
    /// Clusters holding metadata the allocator does not own (the overlap guard's map).
    pub(crate) metadata: MetadataClusters,
    /// Metadata was written since the last successful barrier (write-back must not order
    /// anything after it before a barrier succeeds).
    pub(crate) barrier_owed: bool,
    /// Snapshots deleted since open: a reader of a snapshot ([`SnapshotL1`]) checks that its
    /// snapshot still exists when this changed since it last looked.
    pub(crate) snapshot_deletions: u64,
}

/// A snapshot's L1 table as a reader of the snapshot holds it. The snapshot's L2 tables and
/// data clusters never change while it exists (the active layer copies whatever it shares
/// with a snapshot before writing), so a mapping read through this table is valid as long
/// as a snapshot with this L1 table is in the snapshot table ([`Store::snapshot_live`]).
pub(crate) struct SnapshotL1 {
    /// The snapshot's name (for messages).
    pub(crate) name: String,
    /// The snapshot's virtual disk size.
    pub(crate) size: u64,
    /// Where the table is.
    pub(crate) offset: u64,
    /// Its entries.
    pub(crate) l1: Vec<L1Entry>,
    /// `Meta::snapshot_deletions` when the snapshot was last known to exist.
    pub(crate) seen: std::sync::atomic::AtomicU64,
}

/// Where the image's metadata lives, apart from refcount structures (which the allocator
/// knows): the header, the active L1 table and its L2 tables, the snapshot table and the
/// snapshots' L1 tables, the bitmap directory (not the bitmap tables and data: QEMU's
/// default overlap check leaves them out too). Data is never written there (QEMU's "cached"
/// overlap check).
#[derive(Default)]
pub(crate) struct MetadataClusters {
    /// Ranges of clusters, `[start, end)`.
    ranges: Vec<(u64, u64)>,
    /// L2 tables of the active L1.
    pub(crate) l2: std::collections::HashSet<u64>,
}

impl MetadataClusters {
    pub(crate) fn add_range(&mut self, geo: &ClusterGeometry, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> geo.cluster_bits();
        let end = (offset.saturating_add(len)).div_ceil(geo.cluster_size());
        self.ranges.push((first, end));
    }

    /// Forgets a range added with the same `offset` and `len` (metadata that is going away).
    pub(crate) fn remove_range(&mut self, geo: &ClusterGeometry, offset: u64, len: u64) {
        let first = offset >> geo.cluster_bits();
        let end = (offset.saturating_add(len)).div_ceil(geo.cluster_size());
        if let Some(i) = self.ranges.iter().position(|&r| r == (first, end)) {
            self.ranges.swap_remove(i);
        }
    }

    /// Whether cluster `c` holds metadata.
    pub(crate) fn contains(&self, c: u64) -> bool {
        self.l2.contains(&c) || self.ranges.iter().any(|&(s, e)| (s..e).contains(&c))
    }

    /// Every cluster holding metadata (a range's clusters once each time it is listed).
    pub(crate) fn clusters(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .flat_map(|&(s, e)| s..e)
            .chain(self.l2.iter().copied())
    }
}
