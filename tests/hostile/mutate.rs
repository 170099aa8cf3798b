//! Mutations of an image file's bytes, random (seeded, aimed at the metadata a [`Layout`]
//! found) and hand-crafted.

use super::layout::{Kind, Layout, MappedEntry, Region};
use qcow2_format::{HostCluster, L1Entry, L2Mapping, L2_COPIED, L2_ZERO};
use qcow2_tests::Prng;
use std::fmt;

/// One change to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Flip one bit.
    Flip {
        /// Byte offset.
        at: u64,
        /// Bit 0..=7.
        bit: u8,
    },
    /// Store `value` big-endian in `width` bytes (1, 2, 4, 8).
    Put {
        /// Byte offset.
        at: u64,
        /// Width in bytes.
        width: u8,
        /// The value (its low `width` bytes are stored).
        value: u64,
    },
    /// Fill a range with one byte.
    Fill {
        /// First byte.
        at: u64,
        /// Length.
        len: u64,
        /// The byte.
        byte: u8,
    },
    /// Copy `len` bytes from `from` to `to`.
    Copy {
        /// Source offset.
        from: u64,
        /// Destination offset.
        to: u64,
        /// Length.
        len: u64,
    },
    /// Cut the file to `len` bytes.
    Truncate {
        /// New length.
        len: u64,
    },
    /// Set a refcount (the slot located through the image's own refcount table).
    Refcount {
        /// Host cluster index.
        cluster: u64,
        /// New refcount.
        value: u64,
    },
}

impl fmt::Display for Mutation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mutation::Flip { at, bit } => write!(f, "flip bit {bit} of byte {at:#x}"),
            Mutation::Put { at, width, value } => {
                write!(f, "put u{} {value:#x} at {at:#x}", u32::from(*width) * 8)
            }
            Mutation::Fill { at, len, byte } => write!(f, "fill {at:#x}+{len:#x} with {byte:#04x}"),
            Mutation::Copy { from, to, len } => {
                write!(f, "copy {len:#x} bytes {from:#x} -> {to:#x}")
            }
            Mutation::Truncate { len } => write!(f, "truncate to {len:#x}"),
            Mutation::Refcount { cluster, value } => {
                write!(f, "refcount of host cluster {cluster} = {value}")
            }
        }
    }
}

impl Mutation {
    /// Applies the mutation (parts outside the file are ignored; a file never grows).
    pub fn apply(&self, bytes: &mut Vec<u8>, layout: &Layout) {
        let len = bytes.len() as u64;
        match *self {
            Mutation::Flip { at, bit } => {
                if at < len {
                    bytes[at as usize] ^= 1 << (bit & 7);
                }
            }
            Mutation::Put { at, width, value } => {
                let w = u64::from(width);
                let be = value.to_be_bytes();
                for k in 0..w {
                    let p = at.saturating_add(k);
                    if p < len {
                        bytes[p as usize] = be[(8 - w + k) as usize];
                    }
                }
            }
            Mutation::Fill { at, len: n, byte } => {
                let s = at.min(len) as usize;
                let e = at.saturating_add(n).min(len) as usize;
                bytes[s..e].fill(byte);
            }
            Mutation::Copy { from, to, len: n } => {
                let n = n.min(len.saturating_sub(from)).min(len.saturating_sub(to)) as usize;
                if n > 0 {
                    bytes.copy_within(from as usize..from as usize + n, to as usize);
                }
            }
            Mutation::Truncate { len: n } => bytes.truncate(n.min(len) as usize),
            Mutation::Refcount { cluster, value } => {
                layout.set_refcount(bytes, HostCluster(cluster), value);
            }
        }
    }
}

/// Header fields: (offset, width, name).
pub const HEADER_FIELDS: &[(u64, u8, &str)] = &[
    (4, 4, "version"),
    (8, 8, "backing_file_offset"),
    (16, 4, "backing_file_size"),
    (20, 4, "cluster_bits"),
    (24, 8, "size"),
    (32, 4, "crypt_method"),
    (36, 4, "l1_size"),
    (40, 8, "l1_table_offset"),
    (48, 8, "refcount_table_offset"),
    (56, 4, "refcount_table_clusters"),
    (60, 4, "nb_snapshots"),
    (64, 8, "snapshots_offset"),
    (72, 8, "incompatible_features"),
    (80, 8, "compatible_features"),
    (88, 8, "autoclear_features"),
    (96, 4, "refcount_order"),
    (100, 4, "header_length"),
    (104, 1, "compression_type"),
];

/// Offsets worth pointing metadata at: past the end, at other metadata, misaligned, huge.
fn interesting_offsets(l: &Layout, r: &mut Prng) -> Vec<u64> {
    let cs = l.cs();
    let end = l.file_len.div_ceil(cs) * cs;
    let mut v = vec![
        0,
        cs,
        end,
        end + cs,
        end.saturating_sub(cs),
        l.file_len.saturating_sub(1),
        l.header.l1_table_offset,
        l.header.refcount_table_offset,
        l.header.snapshots_offset,
        (1 << 55) - cs,
        (1 << 56) - cs,
        1 << 40,
        0x00FF_FFFF_FFFF_FE00,
        u64::MAX,
        cs / 2 + 512 * r.below(2),
        r.next_u64(),
    ];
    if let Some(&t) = l
        .l2_tables
        .get(r.below(l.l2_tables.len().max(1) as u64) as usize)
    {
        v.push(t);
        v.push(t + 512);
    }
    if let Some(&(_, b)) = l
        .refblocks
        .get(r.below(l.refblocks.len().max(1) as u64) as usize)
    {
        v.push(b);
    }
    if let Some(m) = l.mapped.get(r.below(l.mapped.len().max(1) as u64) as usize) {
        if let L2Mapping::Normal { host, .. } = m.mapping {
            v.push(host.0);
            v.push(host.0 + 512);
        }
    }
    v
}

/// Values for a header field.
fn header_values(l: &Layout, r: &mut Prng, field: &str, width: u8) -> Vec<u64> {
    let cs = l.cs();
    let mut v: Vec<u64> = vec![0, 1, u64::MAX, r.next_u64()];
    let h = &l.header;
    match field {
        "version" => v.extend([1, 2, 3, 4]),
        "cluster_bits" => v.extend([8, 9, 12, 16, 21, 22, 31, 64]),
        "size" => v.extend([
            h.size + 1,
            h.size * 2,
            h.size.saturating_sub(cs),
            1 << 62,
            (i64::MAX as u64) & !511,
            1 << 50,
        ]),
        "l1_size" => v.extend([
            u64::from(h.l1_size) + 1,
            u64::from(h.l1_size).saturating_sub(1),
            qcow2_format::limits::MAX_L1_ENTRIES,
            qcow2_format::limits::MAX_L1_ENTRIES + 1,
            0x7fff_ffff,
            l.file_len / 8,
        ]),
        "refcount_table_clusters" => v.extend([
            u64::from(h.refcount_table_clusters) + 1,
            qcow2_format::limits::MAX_REFTABLE_BYTES / cs,
            qcow2_format::limits::MAX_REFTABLE_BYTES / cs + 1,
            0xffff_ffff,
        ]),
        "nb_snapshots" => v.extend([u64::from(h.nb_snapshots) + 1, 65536, 65537, 0xffff_ffff]),
        "incompatible_features" => v.extend([
            h.incompatible_features ^ 1,
            h.incompatible_features ^ 2,
            h.incompatible_features ^ 4,
            h.incompatible_features ^ 8,
            h.incompatible_features ^ 16,
            h.incompatible_features | 32,
        ]),
        "compatible_features" | "autoclear_features" => v.extend([1, 2, 3, 1 << 63]),
        "refcount_order" => v.extend(0..=7),
        "header_length" => v.extend([72, 96, 103, 104, 105, 112, 120, cs, cs + 8]),
        "compression_type" => v.extend([1, 2, 255]),
        "backing_file_size" => v.extend([1023, 1024, 4096, u64::from(h.backing_file_size) + 1]),
        _ => v.extend(interesting_offsets(l, r)),
    }
    if width < 8 {
        let mask = (1u64 << (u32::from(width) * 8)) - 1;
        for x in &mut v {
            *x &= mask;
        }
    }
    v
}

/// A value for a table entry of `kind`.
fn entry_value(l: &Layout, r: &mut Prng, kind: Kind) -> u64 {
    let cs = l.cs();
    let offs = interesting_offsets(l, r);
    let off = *r.pick(&offs);
    match kind {
        Kind::L1 | Kind::SnapshotL1 => match r.below(4) {
            0 => off,
            _ => off | L1Entry::COPIED,
        },
        Kind::L2 => match r.below(8) {
            0 => off,
            1..=3 => off | L2_COPIED,
            4 => (off & !(cs - 1)) | L2_ZERO,
            5 => L2_ZERO,
            _ => {
                // A compressed descriptor: somewhere near the end, or anywhere, spanning far.
                let host = match r.below(3) {
                    0 => l.file_len.saturating_sub(r.below(1024)),
                    1 => off,
                    _ => r.below(l.file_len.max(1)),
                };
                l.compressed_word(host, r.next_u64())
            }
        },
        Kind::Refblock => match r.below(3) {
            0 => 0,
            1 => u64::MAX,
            _ => r.below(4),
        },
        _ => off,
    }
}

/// Picks a region, weighted by how interesting its kind is.
fn pick_region(l: &Layout, r: &mut Prng) -> Region {
    let weight = |k: Kind| match k {
        Kind::Header => 20,
        Kind::Extensions => 6,
        Kind::L1 => 18,
        Kind::L2 => 5,
        Kind::Reftable => 10,
        Kind::Refblock => 4,
        Kind::SnapshotTable => 18,
        Kind::SnapshotL1 => 8,
        Kind::BitmapDirectory => 18,
        Kind::BitmapTable => 10,
    };
    // L2 tables and refcount blocks are many: weigh each kind, not each region.
    let kinds: Vec<Kind> = {
        let mut k: Vec<Kind> = l.regions.iter().map(|r| r.kind).collect();
        k.dedup();
        k.sort_by_key(|k| *k as u8);
        k.dedup();
        k
    };
    let total: u64 = kinds.iter().map(|k| weight(*k)).sum();
    let mut x = r.below(total);
    let mut kind = kinds[0];
    for k in &kinds {
        if x < weight(*k) {
            kind = *k;
            break;
        }
        x -= weight(*k);
    }
    let of = l.of(kind);
    *r.pick(&of)
}

/// An entry-aligned position inside a region.
fn entry_pos(region: &Region, r: &mut Prng) -> u64 {
    let n = (region.len / region.entry).max(1);
    region.start + r.below(n) * region.entry
}

/// A position in a region biased towards entries that are in use (non-zero).
fn used_entry_pos(bytes: &[u8], region: &Region, r: &mut Prng) -> u64 {
    for _ in 0..16 {
        let p = entry_pos(region, r);
        let s = p as usize;
        if bytes
            .get(s..s + 8)
            .is_some_and(|w| w.iter().any(|&b| b != 0))
        {
            return p;
        }
    }
    entry_pos(region, r)
}

/// One random mutation aimed at the metadata of `l`.
pub fn random_one(bytes: &[u8], l: &Layout, r: &mut Prng) -> Mutation {
    // Truncations: anywhere, or at a metadata boundary.
    if r.chance(7) {
        return random_truncation(l, r);
    }
    // Refcounts of referenced clusters: zero them, or set them to the width's maximum.
    if r.chance(6) && !l.refblocks.is_empty() {
        return random_refcount(l, r);
    }
    let region = pick_region(l, r);
    match region.kind {
        Kind::Header => header_mutation(l, r),
        Kind::Extensions => extensions_mutation(l, &region, r),
        Kind::SnapshotTable if !l.snapshot_entries.is_empty() && r.chance(70) => {
            snapshot_entry_mutation(l, r)
        }
        Kind::BitmapDirectory if !l.bitmap_entries.is_empty() && r.chance(70) => {
            bitmap_entry_mutation(l, r)
        }
        _ => table_mutation(bytes, l, &region, r),
    }
}

/// A truncation anywhere, or near the start or end of a metadata region.
fn random_truncation(l: &Layout, r: &mut Prng) -> Mutation {
    let len = if r.chance(50) {
        r.below(l.file_len)
    } else {
        let reg = *r.pick(&l.regions);
        let edge = if r.chance(50) {
            reg.start
        } else {
            reg.start + reg.len
        };
        let delta = *r.pick(&[0i64, 1, -1, 8, -8, 512, -512]);
        edge.saturating_add_signed(delta)
    };
    Mutation::Truncate { len }
}

/// The refcount of the L1 table, an L2 table, the refcount table or a data cluster set to 0,
/// 2 or the width's maximum (or one less).
fn random_refcount(l: &Layout, r: &mut Prng) -> Mutation {
    let cs = l.cs();
    let target = match r.below(4) {
        0 => l.header.l1_table_offset / cs,
        1 if !l.l2_tables.is_empty() => *r.pick(&l.l2_tables) / cs,
        2 => l.header.refcount_table_offset / cs,
        _ => match l.mapped.get(r.below(l.mapped.len().max(1) as u64) as usize) {
            Some(MappedEntry {
                mapping: L2Mapping::Normal { host, .. },
                ..
            }) => host.0 / cs,
            Some(MappedEntry {
                mapping: L2Mapping::Compressed(d),
                ..
            }) => d.host_offset / cs,
            _ => r.below(l.file_len / cs),
        },
    };
    let value = *r.pick(&[0, 0, 2, l.width().max(), l.width().max() - 1]);
    Mutation::Refcount {
        cluster: target,
        value,
    }
}

/// A header field: a bit flipped, or an interesting value stored.
fn header_mutation(l: &Layout, r: &mut Prng) -> Mutation {
    let (at, width, name) = *r.pick(HEADER_FIELDS);
    if r.chance(25) {
        return Mutation::Flip {
            at: at + r.below(u64::from(width)),
            bit: r.below(8) as u8,
        };
    }
    let values = header_values(l, r, name, width);
    let value = *r.pick(&values);
    Mutation::Put { at, width, value }
}

/// The bitmaps extension's fields, or a byte or word of the extension area.
fn extensions_mutation(l: &Layout, region: &Region, r: &mut Prng) -> Mutation {
    if let (Some(ext), true) = (l.bitmaps_ext, r.chance(50)) {
        // nb_bitmaps, reserved, directory size, directory offset.
        let (at, width) = *r.pick(&[(0u64, 4u8), (4, 4), (8, 8), (16, 8)]);
        let random = r.next_u64();
        let value = *r.pick(&[
            0,
            1,
            u64::MAX,
            65535,
            65536,
            1024 * 65535,
            1024 * 65535 + 8,
            l.file_len,
            l.file_len - 8,
            random,
        ]);
        return Mutation::Put {
            at: ext + at,
            width,
            value,
        };
    }
    let at = region.start + r.below(region.len);
    match r.below(3) {
        0 => Mutation::Flip {
            at,
            bit: r.below(8) as u8,
        },
        1 => Mutation::Put {
            at: at & !3,
            width: 4,
            value: *r.pick(&[
                0,
                0xffff_ffff,
                0x2385_2875,
                0x4441_5441,
                0xE279_2ACA,
                8,
                4096,
            ]),
        },
        _ => Mutation::Put {
            at,
            width: 1,
            value: r.next_u64() & 0xff,
        },
    }
}

/// A field of a snapshot table entry set to an interesting value.
fn snapshot_entry_mutation(l: &Layout, r: &mut Prng) -> Mutation {
    let e = *r.pick(&l.snapshot_entries);
    // l1_table_offset, l1_size, id_str_size, name_size, extra_data_size, extra data.
    let (at, width) = *r.pick(&[
        (0u64, 8u8),
        (8, 4),
        (12, 2),
        (14, 2),
        (36, 4),
        (40, 8),
        (48, 8),
    ]);
    let mut vals = interesting_offsets(l, r);
    vals.extend([
        0xffff,
        1024,
        1025,
        0xffff_ffff,
        qcow2_format::limits::MAX_L1_ENTRIES + 1,
    ]);
    let value = *r.pick(&vals);
    Mutation::Put {
        at: e + at,
        width,
        value,
    }
}

/// A field of a bitmap directory entry set to an interesting value.
fn bitmap_entry_mutation(l: &Layout, r: &mut Prng) -> Mutation {
    let e = *r.pick(&l.bitmap_entries);
    // table_offset, table_size, flags, type, granularity, name_size, extra_data_size.
    let (at, width) = *r.pick(&[
        (0u64, 8u8),
        (8, 4),
        (12, 4),
        (16, 1),
        (17, 1),
        (18, 2),
        (20, 4),
    ]);
    let mut vals = interesting_offsets(l, r);
    vals.extend([
        0,
        1,
        2,
        3,
        0xff,
        0x0800_0000,
        0x0800_0001,
        0xffff_ffff,
        1023,
        1024,
    ]);
    let value = *r.pick(&vals);
    Mutation::Put {
        at: e + at,
        width,
        value,
    }
}

/// A table: L1, L2, reftable, refcount block, snapshot/bitmap areas.
fn table_mutation(bytes: &[u8], l: &Layout, region: &Region, r: &mut Prng) -> Mutation {
    let pos = used_entry_pos(bytes, region, r);
    match r.below(20) {
        0..=5 => Mutation::Flip {
            at: pos + r.below(8),
            bit: r.below(8) as u8,
        },
        6..=7 => Mutation::Put {
            at: pos,
            width: 8,
            value: r.next_u64(),
        },
        8..=15 => Mutation::Put {
            at: pos,
            width: 8,
            value: entry_value(l, r, region.kind),
        },
        16 => Mutation::Fill {
            at: region.start,
            len: region.len,
            byte: *r.pick(&[0u8, 0xff]),
        },
        _ => {
            // Duplicate another entry of the same kind here (two references to one cluster).
            let other = *r.pick(&l.of(region.kind));
            let from = used_entry_pos(bytes, &other, r);
            Mutation::Copy {
                from,
                to: pos,
                len: region.entry.min(8),
            }
        }
    }
}

/// One to four random mutations.
pub fn random_set(bytes: &[u8], l: &Layout, r: &mut Prng) -> Vec<Mutation> {
    let n = match r.below(10) {
        0..=5 => 1,
        6..=7 => 2,
        8 => 3,
        _ => 4,
    };
    (0..n).map(|_| random_one(bytes, l, r)).collect()
}
