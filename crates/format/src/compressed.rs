//! Compressed cluster descriptors.

use crate::{ClusterGeometry, FormatError, HostOffset, Result};

/// Where a compressed cluster's data lives: a byte offset and a sector count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Byte offset of the compressed stream (any alignment).
    pub host_offset: u64,
    /// Number of 512-byte sectors occupied beyond the one containing `host_offset`.
    pub additional_sectors: u64,
}

impl CompressedDescriptor {
    /// Bit position `x = 62 - (cluster_bits - 8)` where the sector count starts; bits below it
    /// hold the host offset.
    pub fn offset_bits(geo: &ClusterGeometry) -> u32 {
        62 - (geo.cluster_bits() - 8)
    }

    /// Width of the sector count field (`cluster_bits - 8`).
    pub fn count_bits(geo: &ClusterGeometry) -> u32 {
        geo.cluster_bits() - 8
    }

    /// Decodes bits 0..=61 of a compressed L2 entry (bits 62 and 63 of `word` are ignored).
    /// Rejects offset bits above 55.
    pub fn decode(word: u64, geo: &ClusterGeometry) -> Result<Self> {
        let x = Self::offset_bits(geo);
        let word = word & ((1u64 << 62) - 1);
        let host_offset = word & ((1u64 << x) - 1);
        let additional_sectors = word >> x;
        if host_offset >= crate::limits::HOST_OFFSET_LIMIT {
            return Err(FormatError::ReservedBits {
                what: "compressed cluster offset (bits above 55)",
                value: host_offset,
            });
        }
        Ok(Self {
            host_offset,
            additional_sectors,
        })
    }

    /// Decodes bits 0..=61 like [`CompressedDescriptor::decode`], but keeps offset bits above
    /// 55 instead of refusing them, as QEMU's `qcow2_parse_compressed_l2_entry` does (what
    /// `qemu-img check` counts references with).
    pub fn decode_unchecked(word: u64, geo: &ClusterGeometry) -> Self {
        let x = Self::offset_bits(geo);
        let word = word & ((1u64 << 62) - 1);
        Self {
            host_offset: word & ((1u64 << x) - 1),
            additional_sectors: word >> x,
        }
    }

    /// Encodes into bits 0..=61 (the caller sets bit 62). Errors if the offset or the count
    /// do not fit the geometry's split.
    pub fn encode(&self, geo: &ClusterGeometry) -> Result<u64> {
        let x = Self::offset_bits(geo);
        let offset_limit = (1u64 << x).min(crate::limits::HOST_OFFSET_LIMIT);
        if self.host_offset >= offset_limit {
            return Err(FormatError::TooLarge {
                what: "compressed cluster offset",
                value: self.host_offset,
                limit: offset_limit - 1,
            });
        }
        let count_limit = 1u64 << Self::count_bits(geo);
        if self.additional_sectors >= count_limit {
            return Err(FormatError::TooLarge {
                what: "compressed cluster sector count",
                value: self.additional_sectors,
                limit: count_limit - 1,
            });
        }
        Ok(self.host_offset | (self.additional_sectors << x))
    }

    /// A descriptor for `len` bytes of compressed data at `offset`, as QEMU computes it:
    /// `count = ((offset + len - 1) >> 9) - (offset >> 9)` (0 for `len` 0).
    pub fn for_range(offset: u64, len: u64) -> Self {
        let last = offset.saturating_add(len.max(1) - 1);
        Self {
            host_offset: offset,
            additional_sectors: (last >> 9) - (offset >> 9),
        }
    }

    /// The bytes to read: from `host_offset` to the end of its last sector,
    /// `(count + 1) * 512 - (offset & 511)`.
    pub fn read_len(&self) -> u64 {
        self.span_len() - (self.host_offset & 511)
    }

    /// Length of the sector span `[span_start, span_start + (count + 1) * 512)`.
    pub fn span_len(&self) -> u64 {
        self.additional_sectors
            .saturating_add(1)
            .saturating_mul(512)
    }

    /// The host clusters the descriptor's sector span touches (each holds one reference).
    pub fn host_clusters(&self, geo: &ClusterGeometry) -> std::ops::RangeInclusive<u64> {
        let start = self.span_start().0;
        let last = start.saturating_add(self.span_len() - 1);
        let bits = geo.cluster_bits();
        (start >> bits)..=(last >> bits)
    }

    /// The sector-aligned start of the span.
    pub fn span_start(&self) -> HostOffset {
        HostOffset(self.host_offset & !511)
    }
}
