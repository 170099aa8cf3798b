//! L1 and L2 entries, standard and extended.

use crate::{ClusterGeometry, CompressedDescriptor, HostOffset, Result};

/// An L1 table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Bits `qemu-img check` treats as reserved.
    pub const RESERVED_MASK: u64 = 0x7F00_0000_0000_01FF;
    /// Offset bits 9..=55.
    pub const OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;
    /// Bit 63.
    pub const COPIED: u64 = 1 << 63;

    /// Builds an entry for an L2 table at `offset`.
    pub fn new(offset: HostOffset, copied: bool) -> Self {
        Self((offset.0 & Self::OFFSET_MASK) | if copied { Self::COPIED } else { 0 })
    }

    /// The L2 table's offset, `None` when the range is unallocated. Checks reserved bits and
    /// cluster alignment.
    pub fn l2_offset(&self, geo: &ClusterGeometry) -> Result<Option<HostOffset>> {
        let _ = geo;
        todo!()
    }

    /// Bit 63.
    pub fn copied(&self) -> bool {
        self.0 & Self::COPIED != 0
    }
}

/// A raw L2 entry: the first word, and the subcluster bitmap (0 for standard entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    /// The descriptor word.
    pub word: u64,
    /// The subcluster bitmap (extended L2 only).
    pub bitmap: u64,
}

/// What a (decoded) L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Mapping {
    /// No data here: read the backing file, or zeros.
    Unallocated,
    /// ZERO flag (v3 standard L2 only): reads as zeros; the host cluster, if any, is
    /// preallocated space still owned by this entry.
    Zero {
        /// The preallocated host cluster, if any.
        preallocated: Option<HostOffset>,
        /// COPIED bit.
        copied: bool,
    },
    /// Data in a host cluster (for extended L2, the bitmap says which subclusters).
    Normal {
        /// The host cluster.
        host: HostOffset,
        /// COPIED bit.
        copied: bool,
    },
    /// Compressed data.
    Compressed(CompressedDescriptor),
}

/// One subcluster's state in an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    /// Falls through to the backing file (or zeros).
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data at the host cluster + index * subcluster size.
    Allocated,
}

/// The subcluster bitmap of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// State of subcluster `i` (0..32).
    pub fn state(&self, i: u32) -> SubclusterState {
        let _ = i;
        todo!()
    }

    /// Sets the state of subcluster `i`.
    pub fn set(&mut self, i: u32, state: SubclusterState) {
        let _ = (i, state);
        todo!()
    }

    /// Rejects a bitmap with a subcluster both allocated and zero.
    pub fn validate(&self) -> Result<()> {
        todo!()
    }
}

/// The COPIED bit of an L2 entry.
pub const L2_COPIED: u64 = 1 << 63;
/// The compressed bit of an L2 entry.
pub const L2_COMPRESSED: u64 = 1 << 62;
/// The ZERO bit of a standard L2 entry.
pub const L2_ZERO: u64 = 1;

impl L2Entry {
    /// Reserved bits of a standard descriptor (`qemu-img check`'s mask).
    pub const RESERVED_MASK: u64 = 0x3F00_0000_0000_01FE;
    /// Offset bits 9..=55.
    pub const OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;

    /// Reads entry `index` from an L2 table's bytes.
    pub fn read(table: &[u8], geo: &ClusterGeometry, index: usize) -> L2Entry {
        let _ = (table, geo, index);
        todo!()
    }

    /// Writes this entry as entry `index` of an L2 table's bytes.
    pub fn write(&self, table: &mut [u8], geo: &ClusterGeometry, index: usize) {
        let _ = (table, geo, index);
        todo!()
    }

    /// Decodes the entry. `zero_flag_allowed` is true for v3 images with standard L2 (the
    /// ZERO bit is reserved in v2 and in extended L2). Checks reserved bits, alignment of the
    /// host offset, compressed entries without COPIED and with a zero bitmap word, and the
    /// bitmap's own validity (allocated subclusters need a host cluster).
    pub fn decode(&self, geo: &ClusterGeometry, zero_flag_allowed: bool) -> Result<L2Mapping> {
        let _ = (geo, zero_flag_allowed);
        todo!()
    }

    /// Encodes a mapping (the bitmap word is left as given).
    pub fn encode(mapping: L2Mapping, geo: &ClusterGeometry, bitmap: u64) -> L2Entry {
        let _ = (mapping, geo, bitmap);
        todo!()
    }

    /// The subcluster bitmap.
    pub fn subclusters(&self) -> SubclusterBitmap {
        SubclusterBitmap(self.bitmap)
    }
}
