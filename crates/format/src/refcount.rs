//! Refcount entries (1 to 64 bits wide) and refcount table entries.

use crate::{FormatError, HostOffset, Result};

/// The width of refcount entries: `1 << order` bits, order 0..=6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountWidth {
    order: u32,
}

impl RefcountWidth {
    /// From `refcount_order`.
    pub fn from_order(order: u32) -> Result<Self> {
        if order > 6 {
            return Err(FormatError::RefcountOrder(order));
        }
        Ok(Self { order })
    }

    /// From a width in bits (1, 2, 4, ..., 64).
    pub fn from_bits(bits: u32) -> Result<Self> {
        if !bits.is_power_of_two() || bits > 64 {
            return Err(FormatError::RefcountOrder(bits));
        }
        Self::from_order(bits.trailing_zeros())
    }

    /// refcount_order.
    pub fn order(&self) -> u32 {
        self.order
    }

    /// Bits per entry.
    pub fn bits(&self) -> u32 {
        1 << self.order
    }

    /// The largest refcount this width holds.
    pub fn max(&self) -> u64 {
        if self.bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }

    /// Entries in one refcount block of `cluster_size` bytes.
    pub fn entries_per_block(&self, cluster_size: u64) -> u64 {
        cluster_size * 8 / u64::from(self.bits())
    }

    /// Entry `index` of a refcount block (big-endian for >= 8 bits, LSB-first packing below).
    pub fn get(&self, block: &[u8], index: u64) -> u64 {
        let _ = (block, index);
        todo!()
    }

    /// Sets entry `index`; errors if `value` exceeds [`RefcountWidth::max`].
    pub fn set(&self, block: &mut [u8], index: u64, value: u64) -> Result<()> {
        let _ = (block, index, value);
        todo!()
    }
}

/// A refcount table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReftableEntry(pub u64);

impl ReftableEntry {
    /// Reserved bits 0..=8.
    pub const RESERVED_MASK: u64 = 0x1FF;

    /// The refcount block's offset (None = not allocated). Checks reserved bits and alignment.
    pub fn block_offset(&self, cluster_size: u64) -> Result<Option<HostOffset>> {
        let _ = cluster_size;
        todo!()
    }
}
