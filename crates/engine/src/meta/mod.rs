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
/// The metadata lock (see [`Lock`](crate::lock::Lock)).
pub(crate) type MetaLock = crate::lock::Lock<Meta>;
/// The metadata, locked.
pub(crate) type MetaGuard<'a> = crate::lock::Guard<'a, Meta>;
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
    /// The end of the disk for planning: writes, write-zeroes and discards plan only below
    /// it (checked under this lock, so that a shrink, which lowers it first, sees no new
    /// mapping appear beyond its new end). Equal to the size but while a grow prepares the
    /// new area, which only the grow itself may touch until its header is written.
    pub(crate) disk_end: u64,
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
    /// Clusters with refcount 0 at open that the sector count of a compressed cluster runs
    /// into ([`verify`]): never allocated, so that no new data lands where the compressed
    /// stream may still be.
    pub(crate) compressed_tails: std::collections::HashSet<u64>,
    /// Metadata was written since the last successful barrier (write-back must not order
    /// anything after it before a barrier succeeds).
    pub(crate) barrier_owed: bool,
    /// A grown L1 table waiting to be put in place by the next write-back (see
    /// [`L1Switch`]); `l1` already has its length.
    pub(crate) l1_switch: Option<L1Switch>,
    /// Snapshots deleted since open: a reader of a snapshot ([`SnapshotL1`]) checks that its
    /// snapshot still exists when this changed since it last looked.
    pub(crate) snapshot_deletions: u64,
    /// A bitmaps store dropped while its header write was in flight: resolved (by reading
    /// the header back) before the next store, resize or clean-up.
    pub(crate) bitmap_switch: Option<BitmapSwitch>,
}

/// A grown L1 table that is not in place yet: its clusters are allocated (and counted), and
/// the write-back's L1 step writes the whole table there, makes it durable, switches the
/// header's `l1_size` and `l1_table_offset` (one sector), makes that durable, and only then
/// unreferences the old table. A resize whose future is dropped midway, or whose write
/// fails, leaves it here for the next write-back to finish: the switch is never half made
/// in memory while the disk says otherwise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct L1Switch {
    /// Where the new table goes.
    pub(crate) offset: u64,
    /// Its entries.
    pub(crate) entries: u32,
    /// Where the old table is, and its length in bytes.
    pub(crate) old_offset: u64,
    pub(crate) old_bytes: u64,
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

/// A header write naming a new bitmap directory whose outcome is unknown (its store, in
/// `bitmap_edit`, was dropped): the new header, the old structures to free if it landed;
/// the new clusters are given back if it did not.
pub(crate) struct BitmapSwitch {
    pub(crate) header: qcow2_format::Header,
    /// The new directory's offset (0: no bitmaps left).
    pub(crate) directory_offset: u64,
    pub(crate) old: Vec<u64>,
    pub(crate) new: Vec<qcow2_format::HostCluster>,
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
    /// Ranges an invalid entry claims (a snapshot's L1 table that is unaligned or larger than
    /// QEMU allows): guarded as QEMU guards them, but not verified at open, since QEMU opens
    /// such an image (`qemu-img check` reports the entry).
    claimed: Vec<(u64, u64)>,
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

    /// Forgets a range added with [`MetadataClusters::add_range`] with the same `offset` and
    /// `len` (a table that moved, metadata that is going away).
    pub(crate) fn remove_range(&mut self, geo: &ClusterGeometry, offset: u64, len: u64) {
        let first = offset >> geo.cluster_bits();
        let end = (offset.saturating_add(len)).div_ceil(geo.cluster_size());
        if let Some(i) = self.ranges.iter().position(|&r| r == (first, end)) {
            self.ranges.swap_remove(i);
        }
    }

    /// Adds a range an invalid entry claims (see `claimed`): [`MetadataClusters::contains`]
    /// reports it, [`MetadataClusters::clusters`] does not.
    pub(crate) fn add_claimed_range(&mut self, geo: &ClusterGeometry, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> geo.cluster_bits();
        let end = (offset.saturating_add(len)).div_ceil(geo.cluster_size());
        self.claimed.push((first, end));
    }

    /// Whether cluster `c` holds metadata.
    pub(crate) fn contains(&self, c: u64) -> bool {
        self.l2.contains(&c)
            || (self.ranges.iter())
                .chain(&self.claimed)
                .any(|&(s, e)| (s..e).contains(&c))
    }

    /// Every cluster holding metadata (a range's clusters once each time it is listed).
    pub(crate) fn clusters(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .flat_map(|&(s, e)| s..e)
            .chain(self.l2.iter().copied())
    }
}
