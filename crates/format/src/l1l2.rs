//! L1 and L2 entries, standard and extended.

use crate::be::{put_u64, u64_at};
use crate::{ClusterGeometry, CompressedDescriptor, FormatError, HostOffset, Result};

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
        if self.0 & Self::RESERVED_MASK != 0 {
            return Err(FormatError::ReservedBits {
                what: "L1 entry",
                value: self.0,
            });
        }
        let off = self.0 & Self::OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !geo.is_aligned(off) {
            return Err(FormatError::Misaligned {
                what: "L2 table",
                offset: off,
            });
        }
        Ok(Some(HostOffset(off)))
    }

    /// Bit 63.
    pub fn copied(&self) -> bool {
        self.0 & Self::COPIED != 0
    }

    /// The offset bits (9..=55) as they are, without checking reserved bits or alignment
    /// (what `qemu-img check` counts a reference to).
    pub fn raw_offset(&self) -> u64 {
        self.0 & Self::OFFSET_MASK
    }

    /// Reads entry `index` from an L1 table's bytes.
    ///
    /// # Panics
    /// If the entry lies outside `table`.
    pub fn read(table: &[u8], index: usize) -> L1Entry {
        L1Entry(u64_at(table, index * 8))
    }

    /// Writes this entry as entry `index` of an L1 table's bytes.
    ///
    /// # Panics
    /// If the entry lies outside `table`.
    pub fn write(&self, table: &mut [u8], index: usize) {
        put_u64(table, index * 8, self.0);
    }
}

/// How QEMU classifies an L2 entry (`qcow2_get_cluster_type`): by its bits alone, without
/// checking reserved bits, alignment or the subcluster bitmap. `qemu-img check` counts
/// references by this classification, so a checker needs it as well as the validating
/// [`L2Entry::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2ClusterType {
    /// Offset 0 and no ZERO flag (and, with a data file, no COPIED).
    Unallocated,
    /// ZERO flag without an offset (standard L2 only).
    ZeroPlain,
    /// ZERO flag with an offset: preallocated space (standard L2 only).
    ZeroAlloc,
    /// Data at [`L2Entry::raw_offset`] (with a data file, offset 0 and COPIED too).
    Normal,
    /// Compressed bit set.
    Compressed,
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
    /// Allocation bits (0..=31).
    pub const ALLOC_MASK: u64 = 0x0000_0000_FFFF_FFFF;
    /// Zero bits (32..=63).
    pub const ZERO_MASK: u64 = 0xFFFF_FFFF_0000_0000;
    /// Every subcluster allocated.
    pub const ALL_ALLOCATED: SubclusterBitmap = SubclusterBitmap(Self::ALLOC_MASK);
    /// Every subcluster reads as zeros.
    pub const ALL_ZERO: SubclusterBitmap = SubclusterBitmap(Self::ZERO_MASK);

    /// State of subcluster `i` (0..32). A subcluster with both bits set (invalid, see
    /// [`SubclusterBitmap::validate`]) reports `Zero`.
    ///
    /// # Panics
    /// If `i >= 32`.
    pub fn state(&self, i: u32) -> SubclusterState {
        assert!(i < crate::SUBCLUSTERS, "subcluster index {i} out of range");
        if self.0 & (1u64 << (32 + i)) != 0 {
            SubclusterState::Zero
        } else if self.0 & (1u64 << i) != 0 {
            SubclusterState::Allocated
        } else {
            SubclusterState::Unallocated
        }
    }

    /// Sets the state of subcluster `i`.
    ///
    /// # Panics
    /// If `i >= 32`.
    pub fn set(&mut self, i: u32, state: SubclusterState) {
        assert!(i < crate::SUBCLUSTERS, "subcluster index {i} out of range");
        self.0 &= !((1u64 << i) | (1u64 << (32 + i)));
        match state {
            SubclusterState::Unallocated => {}
            SubclusterState::Allocated => self.0 |= 1u64 << i,
            SubclusterState::Zero => self.0 |= 1u64 << (32 + i),
        }
    }

    /// Sets the state of subclusters `range` (a sub-range of 0..32).
    ///
    /// # Panics
    /// If the range reaches past 32.
    pub fn set_range(&mut self, range: std::ops::Range<u32>, state: SubclusterState) {
        for i in range {
            self.set(i, state);
        }
    }

    /// The allocation bits (bit `i` = subcluster `i` allocated).
    pub fn allocated(&self) -> u32 {
        self.0 as u32
    }

    /// The zero bits (bit `i` = subcluster `i` reads as zeros).
    pub fn zero(&self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Rejects a bitmap with a subcluster both allocated and zero.
    pub fn validate(&self) -> Result<()> {
        if self.allocated() & self.zero() != 0 {
            return Err(FormatError::BadSubclusterBitmap {
                bitmap: self.0,
                reason: "a subcluster is marked both allocated and zero",
            });
        }
        Ok(())
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

    /// Reads entry `index` from an L2 table's bytes (16-byte entries with the bitmap word
    /// second when the geometry has extended L2).
    ///
    /// # Panics
    /// If the entry lies outside `table`.
    pub fn read(table: &[u8], geo: &ClusterGeometry, index: usize) -> L2Entry {
        let size = geo.l2_entry_size() as usize;
        let pos = index * size;
        L2Entry {
            word: u64_at(table, pos),
            bitmap: if geo.extended_l2() {
                u64_at(table, pos + 8)
            } else {
                0
            },
        }
    }

    /// Writes this entry as entry `index` of an L2 table's bytes (the bitmap word only with
    /// extended L2).
    ///
    /// # Panics
    /// If the entry lies outside `table`.
    pub fn write(&self, table: &mut [u8], geo: &ClusterGeometry, index: usize) {
        let size = geo.l2_entry_size() as usize;
        let pos = index * size;
        put_u64(table, pos, self.word);
        if geo.extended_l2() {
            put_u64(table, pos + 8, self.bitmap);
        }
    }

    /// Decodes the entry as QEMU reads it (`qcow2_get_subcluster_type`,
    /// `qcow2_get_host_offset`). `zero_flag_allowed` is true for v3 images: the ZERO bit of a
    /// standard L2 entry in a v2 image is corruption (QEMU: "Zero cluster entry found in
    /// pre-v3 image"); with extended L2 the bit is reserved and, like the other reserved bits
    /// ([`L2Entry::RESERVED_MASK`]), ignored. A compressed entry is its descriptor: COPIED and
    /// the subcluster bitmap are not looked at. `qemu-img check` reports all of these (see
    /// [`L2Entry::cluster_type`]); reading does not refuse them.
    ///
    /// Refused: a host offset not cluster aligned, a compressed offset beyond 56 bits, and
    /// an invalid subcluster bitmap (a subcluster both allocated and zero, or allocated
    /// subclusters without a host cluster), which QEMU reads as corruption too.
    ///
    /// Offset 0 with COPIED set decodes as `Normal { host: 0, copied: true }`: that is guest
    /// cluster 0 of an external data file, and corrupt otherwise; the engine decides. With
    /// extended L2, `Unallocated` and `Normal` entries carry their per-subcluster state in
    /// [`L2Entry::subclusters`]; `Zero` is never returned for extended L2.
    pub fn decode(&self, geo: &ClusterGeometry, zero_flag_allowed: bool) -> Result<L2Mapping> {
        let word = self.word;
        let extended = geo.extended_l2();
        if word & L2_COMPRESSED != 0 {
            let desc = CompressedDescriptor::decode(word & !(L2_COPIED | L2_COMPRESSED), geo)?;
            return Ok(L2Mapping::Compressed(desc));
        }
        let zero = !extended && word & L2_ZERO != 0;
        if zero && !zero_flag_allowed {
            return Err(FormatError::ReservedBits {
                what: "L2 entry (the zero flag in a v2 image)",
                value: word,
            });
        }
        let copied = word & L2_COPIED != 0;
        let off = word & Self::OFFSET_MASK;
        if off != 0 && !geo.is_aligned(off) {
            return Err(FormatError::Misaligned {
                what: "data cluster",
                offset: off,
            });
        }
        if zero {
            return Ok(L2Mapping::Zero {
                preallocated: (off != 0).then_some(HostOffset(off)),
                copied,
            });
        }
        if extended {
            let bm = self.subclusters();
            bm.validate()?;
            if off == 0 && !copied && bm.allocated() != 0 {
                return Err(FormatError::BadSubclusterBitmap {
                    bitmap: self.bitmap,
                    reason: "allocated subclusters without a host cluster",
                });
            }
        }
        if off == 0 && !copied {
            return Ok(L2Mapping::Unallocated);
        }
        Ok(L2Mapping::Normal {
            host: HostOffset(off),
            copied,
        })
    }

    /// Encodes a mapping (the bitmap word is left as given). With extended L2 there is no ZERO
    /// bit: a `Zero` mapping is encoded as its host offset and COPIED bit, and the caller
    /// expresses "reads as zeros" through the bitmap (e.g. [`SubclusterBitmap::ALL_ZERO`]).
    ///
    /// # Panics
    /// If the mapping cannot be encoded (see [`L2Entry::try_encode`]); that is a caller bug.
    pub fn encode(mapping: L2Mapping, geo: &ClusterGeometry, bitmap: u64) -> L2Entry {
        match Self::try_encode(mapping, geo, bitmap) {
            Ok(e) => e,
            Err(e) => panic!("cannot encode L2 mapping {mapping:?}: {e}"),
        }
    }

    /// Encodes a mapping like [`L2Entry::encode`], but returns an error for a host offset that
    /// is not cluster aligned or not below 2^56, and for a compressed descriptor that does not
    /// fit the geometry.
    pub fn try_encode(mapping: L2Mapping, geo: &ClusterGeometry, bitmap: u64) -> Result<L2Entry> {
        let host_bits = |host: HostOffset| -> Result<u64> {
            if !geo.is_aligned(host.0) {
                return Err(FormatError::Misaligned {
                    what: "data cluster",
                    offset: host.0,
                });
            }
            if host.0 & !Self::OFFSET_MASK != 0 {
                return Err(FormatError::TooLarge {
                    what: "data cluster offset",
                    value: host.0,
                    limit: crate::limits::HOST_OFFSET_LIMIT - 1,
                });
            }
            Ok(host.0)
        };
        let copied_bit = |c: bool| if c { L2_COPIED } else { 0 };
        let word = match mapping {
            L2Mapping::Unallocated => 0,
            L2Mapping::Zero {
                preallocated,
                copied,
            } => {
                let off = match preallocated {
                    Some(h) => host_bits(h)?,
                    None => 0,
                };
                let zero = if geo.extended_l2() { 0 } else { L2_ZERO };
                off | zero | copied_bit(copied)
            }
            L2Mapping::Normal { host, copied } => host_bits(host)? | copied_bit(copied),
            L2Mapping::Compressed(desc) => L2_COMPRESSED | desc.encode(geo)?,
        };
        Ok(L2Entry { word, bitmap })
    }

    /// The subcluster bitmap.
    pub fn subclusters(&self) -> SubclusterBitmap {
        SubclusterBitmap(self.bitmap)
    }

    /// The offset bits (9..=55) of the descriptor word as they are (meaningless for
    /// compressed entries).
    pub fn raw_offset(&self) -> u64 {
        self.word & Self::OFFSET_MASK
    }

    /// QEMU's classification of the entry by its bits alone (see [`L2ClusterType`]); the ZERO
    /// bit is ignored with extended L2. `data_file` says whether the image has an external
    /// data file, where offset 0 with COPIED is guest cluster 0's data.
    pub fn cluster_type(&self, geo: &ClusterGeometry, data_file: bool) -> L2ClusterType {
        let word = self.word;
        if word & L2_COMPRESSED != 0 {
            L2ClusterType::Compressed
        } else if word & L2_ZERO != 0 && !geo.extended_l2() {
            if self.raw_offset() != 0 {
                L2ClusterType::ZeroAlloc
            } else {
                L2ClusterType::ZeroPlain
            }
        } else if self.raw_offset() == 0 && !(data_file && word & L2_COPIED != 0) {
            L2ClusterType::Unallocated
        } else {
            L2ClusterType::Normal
        }
    }
}
