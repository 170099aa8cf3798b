//! The in-memory refcount view: the refcount table and the refcount blocks the engine has
//! loaded, addressed by host cluster.

use qcow2_format::{
    ClusterGeometry, FormatError, HostCluster, HostOffset, RefcountWidth, ReftableEntry,
};
use std::collections::HashMap;

/// What went wrong looking up or changing a refcount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefcountError {
    /// The cluster's refcount block is allocated but not loaded: the engine must read it
    /// from `offset` and [`Refcounts::insert_block`] it.
    #[error("refcount block at {offset} for {cluster} is not loaded")]
    BlockNotLoaded {
        /// The cluster asked about.
        cluster: HostCluster,
        /// Table index of its block.
        table_index: u64,
        /// Where the block is on disk.
        offset: HostOffset,
    },
    /// The cluster lies beyond what the refcount table can describe.
    #[error("{cluster} is beyond the refcount table ({entries} entries)")]
    BeyondTable {
        /// The cluster.
        cluster: HostCluster,
        /// Entries in the table.
        entries: u64,
    },
    /// The cluster's refcount block is not allocated (its refcounts are all 0), so it cannot
    /// be changed without allocating the block.
    #[error("no refcount block allocated for {cluster}")]
    NoBlock {
        /// The cluster.
        cluster: HostCluster,
    },
    /// The cluster's refcount block is at an offset that is not cluster aligned, so none of
    /// the refcounts it should hold can be read or changed. The message is QEMU's
    /// (`qcow2_get_refcount`, `alloc_refcount_block`), which fails the request and marks the
    /// image corrupt the same way.
    #[error("Refblock offset {offset:#x} unaligned (reftable index: {})", c_hex(*table_index))]
    UnalignedBlock {
        /// Index in the refcount table.
        table_index: u64,
        /// The offset the table gives.
        offset: u64,
    },
    /// A cluster asked for by its place ([`Allocator::allocate_at`](crate::Allocator::allocate_at))
    /// is not free.
    #[error("{cluster} is in use")]
    InUse {
        /// The cluster.
        cluster: HostCluster,
    },
    /// A malformed table entry or an overflowing refcount.
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// `v` as C's `%#x` prints it (`0` without the prefix).
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// Where a cluster's refcount lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountSlot {
    /// Index in the refcount table.
    pub table_index: u64,
    /// Index inside the refcount block.
    pub block_index: u64,
}

/// The refcount table and the loaded refcount blocks.
#[derive(Debug, Clone)]
pub struct Refcounts {
    geo: ClusterGeometry,
    width: RefcountWidth,
    table: Vec<ReftableEntry>,
    blocks: HashMap<u64, Vec<u8>>,
}

impl Refcounts {
    /// A view over a refcount table (already read from disk); no blocks loaded yet.
    pub fn new(geo: ClusterGeometry, width: RefcountWidth, table: Vec<ReftableEntry>) -> Self {
        Self {
            geo,
            width,
            table,
            blocks: HashMap::new(),
        }
    }

    /// The entry width.
    pub fn width(&self) -> RefcountWidth {
        self.width
    }

    /// Refcounts per block.
    pub fn entries_per_block(&self) -> u64 {
        self.width.entries_per_block(self.geo.cluster_size())
    }

    /// The refcount table entries.
    pub fn table(&self) -> &[ReftableEntry] {
        &self.table
    }

    /// Number of host clusters the table can describe.
    pub fn capacity(&self) -> u64 {
        self.table.len() as u64 * self.entries_per_block()
    }

    /// Where the refcount of `cluster` lives.
    pub fn slot(&self, cluster: HostCluster) -> RefcountSlot {
        let per = self.entries_per_block();
        RefcountSlot {
            table_index: cluster.0 / per,
            block_index: cluster.0 % per,
        }
    }

    /// The on-disk offset of the block for table index `i` (None = not allocated).
    pub fn block_offset(&self, table_index: u64) -> Result<Option<HostOffset>, RefcountError> {
        match self.table.get(table_index as usize) {
            None => Ok(None),
            Some(e) => match e.block_offset(self.geo.cluster_size()) {
                Err(FormatError::Misaligned { offset, .. }) => Err(RefcountError::UnalignedBlock {
                    table_index,
                    offset,
                }),
                other => Ok(other?),
            },
        }
    }

    /// Adds a block read from disk for table index `i`.
    pub fn insert_block(&mut self, table_index: u64, bytes: Vec<u8>) {
        debug_assert_eq!(bytes.len() as u64, self.geo.cluster_size());
        self.blocks.insert(table_index, bytes);
    }

    /// Whether the block for table index `i` is loaded.
    pub fn has_block(&self, table_index: u64) -> bool {
        self.blocks.contains_key(&table_index)
    }

    /// The refcount of `cluster`.
    pub fn get(&self, cluster: HostCluster) -> Result<u64, RefcountError> {
        let slot = self.slot(cluster);
        if slot.table_index >= self.table.len() as u64 {
            return Ok(0);
        }
        match self.blocks.get(&slot.table_index) {
            Some(b) => Ok(self.width.get(b, slot.block_index)),
            None => match self.block_offset(slot.table_index)? {
                None => Ok(0),
                Some(offset) => Err(RefcountError::BlockNotLoaded {
                    cluster,
                    table_index: slot.table_index,
                    offset,
                }),
            },
        }
    }

    /// Sets the refcount of `cluster` in its (loaded) block.
    pub fn set(&mut self, cluster: HostCluster, value: u64) -> Result<(), RefcountError> {
        let slot = self.slot(cluster);
        if slot.table_index >= self.table.len() as u64 {
            return Err(RefcountError::BeyondTable {
                cluster,
                entries: self.table.len() as u64,
            });
        }
        let offset = self.block_offset(slot.table_index)?;
        match self.blocks.get_mut(&slot.table_index) {
            Some(b) => Ok(self.width.set(b, slot.block_index, value)?),
            None => match offset {
                None => Err(RefcountError::NoBlock { cluster }),
                Some(offset) => Err(RefcountError::BlockNotLoaded {
                    cluster,
                    table_index: slot.table_index,
                    offset,
                }),
            },
        }
    }

    /// Adds a new (zeroed) block at `offset` for table index `i`, pointing the table at it.
    pub fn add_block(&mut self, table_index: u64, offset: HostOffset, bytes: Vec<u8>) {
        self.table[table_index as usize] = ReftableEntry(offset.0);
        self.blocks.insert(table_index, bytes);
    }

    /// Drops the block of table index `i`: its table entry becomes 0 (every cluster it
    /// covered then counts 0).
    pub fn remove_block(&mut self, table_index: u64) {
        if let Some(e) = self.table.get_mut(table_index as usize) {
            *e = ReftableEntry(0);
        }
        self.blocks.remove(&table_index);
    }

    /// Replaces the table (a grown copy of the old one).
    pub fn replace_table(&mut self, table: Vec<ReftableEntry>) {
        self.table = table;
    }

    /// The bytes of a loaded block.
    pub fn block(&self, table_index: u64) -> Option<&[u8]> {
        self.blocks.get(&table_index).map(Vec::as_slice)
    }
}
