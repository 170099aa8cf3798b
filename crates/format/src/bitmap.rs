//! The persistent dirty bitmap directory and bitmap tables.

use crate::{HostOffset, Result};

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirectoryEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags: bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible.
    pub flags: u32,
    /// Type (1 = dirty tracking).
    pub bitmap_type: u8,
    /// log2 of the granularity in bytes.
    pub granularity_bits: u8,
    /// Name.
    pub name: String,
    /// Extra data, kept byte for byte.
    pub extra_data: Vec<u8>,
}

impl BitmapDirectoryEntry {
    /// Flag bit 0.
    pub const IN_USE: u32 = 1;
    /// Flag bit 1.
    pub const AUTO: u32 = 2;
    /// Flag bit 2.
    pub const EXTRA_DATA_COMPATIBLE: u32 = 4;

    /// Parses a directory of `count` entries.
    pub fn parse_directory(buf: &[u8], count: u32) -> Result<Vec<BitmapDirectoryEntry>> {
        let _ = (buf, count);
        todo!()
    }

    /// Serializes a directory.
    pub fn serialize_directory(entries: &[BitmapDirectoryEntry]) -> Vec<u8> {
        let _ = entries;
        todo!()
    }
}

/// A bitmap table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapTableEntry(pub u64);

impl BitmapTableEntry {
    /// The data cluster's offset, or `None` with whether the cluster reads as all ones.
    pub fn decode(&self, cluster_size: u64) -> Result<std::result::Result<HostOffset, bool>> {
        let _ = cluster_size;
        todo!()
    }
}
