//! Compressed cluster descriptors.

use crate::{ClusterGeometry, HostOffset, Result};

/// Where a compressed cluster's data lives: a byte offset and a sector count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Byte offset of the compressed stream (any alignment).
    pub host_offset: u64,
    /// Number of 512-byte sectors occupied beyond the one containing `host_offset`.
    pub additional_sectors: u64,
}

impl CompressedDescriptor {
    /// Decodes bits 0..=61 of a compressed L2 entry. Rejects offset bits above 55.
    pub fn decode(word: u64, geo: &ClusterGeometry) -> Result<Self> {
        let _ = (word, geo);
        todo!()
    }

    /// Encodes into bits 0..=61 (the caller sets bit 62). Errors if the offset or the count
    /// do not fit the geometry's split.
    pub fn encode(&self, geo: &ClusterGeometry) -> Result<u64> {
        let _ = geo;
        todo!()
    }

    /// A descriptor for `len` bytes of compressed data at `offset`, as QEMU computes it.
    pub fn for_range(offset: u64, len: u64) -> Self {
        let _ = (offset, len);
        todo!()
    }

    /// The bytes to read: from `host_offset` to the end of its last sector.
    pub fn read_len(&self) -> u64 {
        todo!()
    }

    /// The host clusters the descriptor's sector span touches (each holds one reference).
    pub fn host_clusters(&self, geo: &ClusterGeometry) -> std::ops::RangeInclusive<u64> {
        let _ = geo;
        todo!()
    }

    /// The sector-aligned start of the span.
    pub fn span_start(&self) -> HostOffset {
        todo!()
    }
}
