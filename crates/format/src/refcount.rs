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
    ///
    /// # Panics
    /// If the entry lies outside `block`.
    pub fn get(&self, block: &[u8], index: u64) -> u64 {
        let bits = self.bits();
        if bits >= 8 {
            let n = (bits / 8) as usize;
            block[entry_range(index, n)]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        } else {
            let per_byte = u64::from(8 / bits);
            let byte = block[to_usize(index / per_byte)];
            let shift = (index % per_byte) as u32 * bits;
            (u64::from(byte) >> shift) & self.max()
        }
    }

    /// Sets entry `index`; errors if `value` exceeds [`RefcountWidth::max`].
    ///
    /// # Panics
    /// If the entry lies outside `block`.
    pub fn set(&self, block: &mut [u8], index: u64, value: u64) -> Result<()> {
        let bits = self.bits();
        if value > self.max() {
            return Err(FormatError::RefcountOverflow { value, bits });
        }
        if bits >= 8 {
            let n = (bits / 8) as usize;
            block[entry_range(index, n)].copy_from_slice(&value.to_be_bytes()[8 - n..]);
        } else {
            let per_byte = u64::from(8 / bits);
            let byte = &mut block[to_usize(index / per_byte)];
            let shift = (index % per_byte) as u32 * bits;
            let mask = (self.max() as u8) << shift;
            *byte = (*byte & !mask) | ((value as u8) << shift);
        }
        Ok(())
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
        if self.0 & Self::RESERVED_MASK != 0 {
            return Err(FormatError::ReservedBits {
                what: "refcount table entry",
                value: self.0,
            });
        }
        if self.0 == 0 {
            return Ok(None);
        }
        if cluster_size == 0 || self.0 % cluster_size != 0 {
            return Err(FormatError::Misaligned {
                what: "refcount block",
                offset: self.0,
            });
        }
        Ok(Some(HostOffset(self.0)))
    }

    /// The offset bits (9..=63) as they are, without checking reserved bits or alignment (how
    /// QEMU looks refcounts up).
    pub fn raw_offset(&self) -> u64 {
        self.0 & !Self::RESERVED_MASK
    }

    /// Reads entry `index` from a refcount table's bytes.
    ///
    /// # Panics
    /// If the entry lies outside `table`.
    pub fn read(table: &[u8], index: usize) -> ReftableEntry {
        ReftableEntry(crate::be::u64_at(table, index * 8))
    }

    /// Writes this entry as entry `index` of a refcount table's bytes.
    ///
    /// # Panics
    /// If the entry lies outside `table`.
    pub fn write(&self, table: &mut [u8], index: usize) {
        crate::be::put_u64(table, index * 8, self.0);
    }
}

/// An index as `usize`; an index that does not fit cannot be inside any slice, so it maps to
/// `usize::MAX` and the slice access panics as documented.
fn to_usize(i: u64) -> usize {
    usize::try_from(i).unwrap_or(usize::MAX)
}

/// The byte range of entry `index` of `n` bytes (an overflowing range panics).
fn entry_range(index: u64, n: usize) -> std::ops::Range<usize> {
    let start = to_usize(index)
        .checked_mul(n)
        .expect("refcount index out of range");
    start..start.checked_add(n).expect("refcount index out of range")
}
