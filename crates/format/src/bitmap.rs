//! The persistent dirty bitmap directory and bitmap tables.

use crate::be::{pad8, u16_at, u32_at, u64_at};
use crate::limits::{
    MAX_BITMAPS, MAX_BITMAP_DATA_BYTES, MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_GRANULARITY_BITS,
    MAX_BITMAP_NAME, MAX_BITMAP_TABLE_ENTRIES, MIN_BITMAP_GRANULARITY_BITS,
};
use crate::{FormatError, HostOffset, Result};

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

    /// Flag bits 3..=31, reserved.
    pub const RESERVED_FLAGS: u32 = !7;
    /// Type 1: dirty tracking bitmap (the only type defined).
    pub const TYPE_DIRTY_TRACKING: u8 = 1;
    /// Size of the fixed part of an entry (before extra data and name).
    pub const FIXED_LEN: usize = 24;

    /// Parses a directory of `count` entries. `buf` must be exactly the directory
    /// (`bitmap_directory_size` bytes): bytes after the last entry are an error, as in QEMU.
    ///
    /// Checks the framing (every entry and its padding inside the buffer), reserved flag bits,
    /// zero padding, names (1..=1023 bytes, UTF-8, unique), at most 65535 entries and
    /// 1024 * 65535 bytes. Table offsets, types and granularities are only checked by
    /// [`BitmapDirectoryEntry::validate`], since they need the image's geometry.
    pub fn parse_directory(buf: &[u8], count: u32) -> Result<Vec<BitmapDirectoryEntry>> {
        if count > MAX_BITMAPS {
            return Err(FormatError::TooLarge {
                what: "number of bitmaps",
                value: u64::from(count),
                limit: u64::from(MAX_BITMAPS),
            });
        }
        if buf.len() as u64 > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(FormatError::TooLarge {
                what: "bitmap directory (bytes)",
                value: buf.len() as u64,
                limit: MAX_BITMAP_DIRECTORY_BYTES,
            });
        }
        let count = count as usize;
        let mut out: Vec<BitmapDirectoryEntry> =
            Vec::with_capacity(count.min(buf.len() / Self::FIXED_LEN));
        let mut names = std::collections::HashSet::new();
        let mut pos = 0usize;
        for index in 0..count {
            let bad = |reason: String| FormatError::BadBitmap { index, reason };
            let e = buf.get(pos..).unwrap_or(&[]);
            if e.len() < Self::FIXED_LEN {
                return Err(FormatError::Truncated {
                    what: "bitmap directory",
                    need: (pos + Self::FIXED_LEN) as u64,
                    have: buf.len() as u64,
                });
            }
            let flags = u32_at(e, 12);
            let name_len = usize::from(u16_at(e, 18));
            let extra_len = u32_at(e, 20) as usize;
            // The directory is at most 64 MiB, so these sums cannot overflow.
            let len = Self::FIXED_LEN + extra_len.min(buf.len() + 1) + name_len;
            let padded = pad8(len);
            if e.len() < padded {
                return Err(FormatError::Truncated {
                    what: "bitmap directory",
                    need: (pos as u64)
                        + (Self::FIXED_LEN as u64 + extra_len as u64 + name_len as u64).div_ceil(8)
                            * 8,
                    have: buf.len() as u64,
                });
            }
            if flags & Self::RESERVED_FLAGS != 0 {
                return Err(bad(format!("reserved flag bits set: {flags:#x}")));
            }
            if name_len == 0 {
                return Err(bad("empty name".into()));
            }
            if name_len > MAX_BITMAP_NAME {
                return Err(bad(format!(
                    "name length {name_len} exceeds the limit of {MAX_BITMAP_NAME}"
                )));
            }
            if e[len..padded].iter().any(|&b| b != 0) {
                return Err(bad("non-zero padding after the name".into()));
            }
            let extra_end = Self::FIXED_LEN + extra_len;
            let name = String::from_utf8(e[extra_end..len].to_vec())
                .map_err(|_| bad("name is not valid UTF-8".into()))?;
            if !names.insert(name.clone()) {
                return Err(bad(format!("duplicate name {name:?}")));
            }
            out.push(BitmapDirectoryEntry {
                table_offset: u64_at(e, 0),
                table_size: u32_at(e, 8),
                flags,
                bitmap_type: e[16],
                granularity_bits: e[17],
                name,
                extra_data: e[Self::FIXED_LEN..extra_end].to_vec(),
            });
            pos += padded;
        }
        if pos != buf.len() {
            return Err(FormatError::BadBitmap {
                index: count,
                reason: format!(
                    "{} bytes after the last directory entry",
                    buf.len().saturating_sub(pos)
                ),
            });
        }
        Ok(out)
    }

    /// Bytes this entry takes in the directory, padding included.
    pub fn serialized_len(&self) -> usize {
        pad8(Self::FIXED_LEN + self.extra_data.len() + self.name.len())
    }

    /// Serializes a directory, checking what [`BitmapDirectoryEntry::parse_directory`] would
    /// refuse (reserved flags, empty, overlong or duplicate names, too many entries or bytes).
    pub fn try_serialize_directory(entries: &[BitmapDirectoryEntry]) -> Result<Vec<u8>> {
        if entries.len() > MAX_BITMAPS as usize {
            return Err(FormatError::TooLarge {
                what: "number of bitmaps",
                value: entries.len() as u64,
                limit: u64::from(MAX_BITMAPS),
            });
        }
        let mut names = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (index, e) in entries.iter().enumerate() {
            let bad = |reason: String| FormatError::BadBitmap { index, reason };
            if e.flags & Self::RESERVED_FLAGS != 0 {
                return Err(bad(format!("reserved flag bits set: {:#x}", e.flags)));
            }
            if e.name.is_empty() {
                return Err(bad("empty name".into()));
            }
            if e.name.len() > MAX_BITMAP_NAME {
                return Err(bad(format!(
                    "name length {} exceeds the limit of {MAX_BITMAP_NAME}",
                    e.name.len()
                )));
            }
            if !names.insert(e.name.as_str()) {
                return Err(bad(format!("duplicate name {:?}", e.name)));
            }
            let extra_len = u32::try_from(e.extra_data.len())
                .map_err(|_| bad("extra data longer than 4 GiB".into()))?;
            out.extend_from_slice(&e.table_offset.to_be_bytes());
            out.extend_from_slice(&e.table_size.to_be_bytes());
            out.extend_from_slice(&e.flags.to_be_bytes());
            out.push(e.bitmap_type);
            out.push(e.granularity_bits);
            out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
            out.extend_from_slice(&extra_len.to_be_bytes());
            out.extend_from_slice(&e.extra_data);
            out.extend_from_slice(e.name.as_bytes());
            crate::be::pad_vec8(&mut out);
            if out.len() as u64 > MAX_BITMAP_DIRECTORY_BYTES {
                return Err(FormatError::TooLarge {
                    what: "bitmap directory (bytes)",
                    value: out.len() as u64,
                    limit: MAX_BITMAP_DIRECTORY_BYTES,
                });
            }
        }
        Ok(out)
    }

    /// Serializes a directory.
    ///
    /// # Panics
    /// If the directory cannot be encoded (see
    /// [`BitmapDirectoryEntry::try_serialize_directory`]).
    pub fn serialize_directory(entries: &[BitmapDirectoryEntry]) -> Vec<u8> {
        match Self::try_serialize_directory(entries) {
            Ok(v) => v,
            Err(e) => panic!("cannot serialize bitmap directory: {e}"),
        }
    }

    /// QEMU's checks of one entry against the image (`check_dir_entry`): a non-empty,
    /// cluster-aligned, non-zero table of at most 2^27 entries and 512 MiB of data, type 1,
    /// granularity 2^9..=2^31, no reserved flags, and, unless the bitmap is in use, a table
    /// large enough to cover `disk_size` bytes. `index` is only used in error messages.
    pub fn validate(&self, index: usize, cluster_size: u64, disk_size: u64) -> Result<()> {
        let bad = |reason: String| FormatError::BadBitmap { index, reason };
        if self.table_offset == 0 || self.table_size == 0 {
            return Err(bad("empty or missing bitmap table".into()));
        }
        if cluster_size == 0 || self.table_offset % cluster_size != 0 {
            return Err(FormatError::Misaligned {
                what: "bitmap table",
                offset: self.table_offset,
            });
        }
        if u64::from(self.table_size) > MAX_BITMAP_TABLE_ENTRIES {
            return Err(bad(format!(
                "bitmap table of {} entries exceeds the limit of {MAX_BITMAP_TABLE_ENTRIES}",
                self.table_size
            )));
        }
        if !(MIN_BITMAP_GRANULARITY_BITS..=MAX_BITMAP_GRANULARITY_BITS)
            .contains(&self.granularity_bits)
        {
            return Err(bad(format!(
                "granularity bits {} outside {MIN_BITMAP_GRANULARITY_BITS}..={MAX_BITMAP_GRANULARITY_BITS}",
                self.granularity_bits
            )));
        }
        if self.flags & Self::RESERVED_FLAGS != 0 {
            return Err(bad(format!("reserved flag bits set: {:#x}", self.flags)));
        }
        if self.name.len() > MAX_BITMAP_NAME {
            return Err(bad("name too long".into()));
        }
        if self.bitmap_type != Self::TYPE_DIRTY_TRACKING {
            return Err(bad(format!("unknown bitmap type {}", self.bitmap_type)));
        }
        let data_bytes = u64::from(self.table_size).saturating_mul(cluster_size);
        if data_bytes > MAX_BITMAP_DATA_BYTES {
            return Err(bad(format!(
                "bitmap data of {data_bytes} bytes exceeds the limit of {MAX_BITMAP_DATA_BYTES}"
            )));
        }
        if self.flags & Self::IN_USE == 0 {
            // data_bytes <= 2^29, so * 8 << 31 fits in 64 bits.
            let covered = (data_bytes * 8) << self.granularity_bits;
            if disk_size > covered {
                return Err(bad(format!(
                    "bitmap table covers {covered} bytes, the disk has {disk_size}"
                )));
            }
        }
        Ok(())
    }
}

/// A bitmap table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapTableEntry(pub u64);

impl BitmapTableEntry {
    /// Reserved bits 1..=8 and 56..=63.
    pub const RESERVED_MASK: u64 = 0xFF00_0000_0000_01FE;
    /// Offset bits 9..=55.
    pub const OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;
    /// Bit 0: without an offset, the cluster reads as all ones.
    pub const ALL_ONES: u64 = 1;

    /// Reads entry `index` from a bitmap table's bytes.
    ///
    /// # Panics
    /// If the entry lies outside `table`.
    pub fn read(table: &[u8], index: usize) -> BitmapTableEntry {
        BitmapTableEntry(u64_at(table, index * 8))
    }

    /// The data cluster's offset, or `None` with whether the cluster reads as all ones.
    ///
    /// Checks reserved bits (1..=8, 56..=63, and bit 0 when an offset is present) and the
    /// data cluster's alignment.
    pub fn decode(&self, cluster_size: u64) -> Result<std::result::Result<HostOffset, bool>> {
        if self.0 & Self::RESERVED_MASK != 0 {
            return Err(FormatError::ReservedBits {
                what: "bitmap table entry",
                value: self.0,
            });
        }
        let off = self.0 & Self::OFFSET_MASK;
        if off == 0 {
            return Ok(Err(self.0 & Self::ALL_ONES != 0));
        }
        if self.0 & Self::ALL_ONES != 0 {
            return Err(FormatError::ReservedBits {
                what: "bitmap table entry (all-ones flag with a data cluster)",
                value: self.0,
            });
        }
        if cluster_size == 0 || off % cluster_size != 0 {
            return Err(FormatError::Misaligned {
                what: "bitmap data cluster",
                offset: off,
            });
        }
        Ok(Ok(HostOffset(off)))
    }
}
