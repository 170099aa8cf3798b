//! Where an image's metadata lives, found by parsing the real file with `qcow2-format`: the
//! places a mutation is worth aiming at.

use qcow2_format::{
    BitmapDirectoryEntry, ClusterGeometry, CompressedDescriptor, Header, HostCluster, L1Entry,
    L2Entry, L2Mapping, RefcountWidth, ReftableEntry, Snapshot,
};

/// What a region of the file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The fixed header fields (0..header_length).
    Header,
    /// Header extensions and the backing file name.
    Extensions,
    /// The active L1 table.
    L1,
    /// An L2 table (active or a snapshot's).
    L2,
    /// The refcount table.
    Reftable,
    /// A refcount block.
    Refblock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    SnapshotL1,
    /// The bitmap directory.
    BitmapDirectory,
    /// A bitmap table.
    BitmapTable,
}

/// A metadata region: `[start, start+len)` of the file, made of `entry`-byte entries.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// What it holds.
    pub kind: Kind,
    /// First byte.
    pub start: u64,
    /// Length in bytes (clipped to the file).
    pub len: u64,
    /// Entry size (8, or 16 for extended L2 tables; 1 for unstructured areas).
    pub entry: u64,
}

/// An allocated L2 entry of the active L1's tables.
#[derive(Debug, Clone, Copy)]
pub struct MappedEntry {
    /// File offset of the entry's first word.
    pub pos: u64,
    /// The decoded mapping.
    pub mapping: L2Mapping,
}

/// An image's layout.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The parsed header.
    pub header: Header,
    /// Its geometry.
    pub geo: ClusterGeometry,
    /// The file's length.
    pub file_len: u64,
    /// Every metadata region found.
    pub regions: Vec<Region>,
    /// Active L2 entries that map something (normal, zero, compressed).
    pub mapped: Vec<MappedEntry>,
    /// Offsets of the active L2 tables.
    pub l2_tables: Vec<u64>,
    /// Offsets of the refcount blocks, by reftable index.
    pub refblocks: Vec<(u64, u64)>,
    /// Offset of the bitmaps extension's payload in the file, if any.
    pub bitmaps_ext: Option<u64>,
    /// Offsets of the snapshot table entries.
    pub snapshot_entries: Vec<u64>,
    /// Offsets of the bitmap directory entries.
    pub bitmap_entries: Vec<u64>,
}

fn u32_at(b: &[u8], at: u64) -> Option<u32> {
    let at = usize::try_from(at).ok()?;
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn slice(b: &[u8], start: u64, len: u64) -> Option<&[u8]> {
    let s = usize::try_from(start).ok()?;
    let e = usize::try_from(start.checked_add(len)?).ok()?;
    b.get(s..e)
}

impl Layout {
    /// Parses `bytes` (a whole qcow2 file). `None` if the header does not parse.
    pub fn parse(bytes: &[u8]) -> Option<Layout> {
        let file_len = bytes.len() as u64;
        let bits = Header::peek_cluster_bits(bytes).ok()?;
        let cs = 1u64 << bits;
        let header = Header::parse(&bytes[..(cs.min(file_len) as usize)]).ok()?;
        let geo = header.geometry();
        let clip = |start: u64, len: u64| len.min(file_len.saturating_sub(start));
        let mut regions = vec![Region {
            kind: Kind::Header,
            start: 0,
            len: u64::from(header.header_length.max(Header::V2_LENGTH)),
            entry: 1,
        }];
        let ext_start = if header.version == 2 {
            u64::from(Header::V2_LENGTH)
        } else {
            u64::from(header.header_length)
        };
        let ext_end = header
            .extensions_end()
            .max(header.backing_file_offset + u64::from(header.backing_file_size));
        regions.push(Region {
            kind: Kind::Extensions,
            start: ext_start,
            len: clip(ext_start, ext_end.min(cs) - ext_start),
            entry: 1,
        });
        // The bitmaps extension's payload, found by walking the raw extension area.
        let mut bitmaps_ext = None;
        let mut pos = ext_start;
        while pos + 8 <= cs.min(file_len) {
            let (Some(kind), Some(len)) = (u32_at(bytes, pos), u32_at(bytes, pos + 4)) else {
                break;
            };
            if kind == 0 {
                break;
            }
            if kind == qcow2_format::HeaderExtension::BITMAPS {
                bitmaps_ext = Some(pos + 8);
            }
            pos += 8 + u64::from(len).div_ceil(8) * 8;
        }

        // Active L1 and its L2 tables.
        let l1_len = clip(header.l1_table_offset, u64::from(header.l1_size) * 8);
        regions.push(Region {
            kind: Kind::L1,
            start: header.l1_table_offset,
            len: l1_len,
            entry: 8,
        });
        let mut l2_tables = Vec::new();
        let mut mapped = Vec::new();
        let l1 = slice(bytes, header.l1_table_offset, l1_len).unwrap_or(&[]);
        let zero_ok = header.version >= 3;
        for i in 0..l1.len() / 8 {
            let Ok(Some(l2)) = L1Entry::read(l1, i).l2_offset(&geo) else {
                continue;
            };
            let Some(table) = slice(bytes, l2.0, cs) else {
                continue;
            };
            l2_tables.push(l2.0);
            regions.push(Region {
                kind: Kind::L2,
                start: l2.0,
                len: cs,
                entry: geo.l2_entry_size(),
            });
            for j in 0..geo.l2_entries() as usize {
                let e = L2Entry::read(table, &geo, j);
                if e.word == 0 && e.bitmap == 0 {
                    continue;
                }
                if let Ok(m) = e.decode(&geo, zero_ok) {
                    if m != L2Mapping::Unallocated {
                        mapped.push(MappedEntry {
                            pos: l2.0 + j as u64 * geo.l2_entry_size(),
                            mapping: m,
                        });
                    }
                }
            }
        }

        // Refcount table and blocks.
        let rt_len = clip(
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * cs,
        );
        regions.push(Region {
            kind: Kind::Reftable,
            start: header.refcount_table_offset,
            len: rt_len,
            entry: 8,
        });
        let mut refblocks = Vec::new();
        let rt = slice(bytes, header.refcount_table_offset, rt_len).unwrap_or(&[]);
        for i in 0..rt.len() / 8 {
            if let Ok(Some(b)) = ReftableEntry::read(rt, i).block_offset(cs) {
                if b.0 + cs <= file_len {
                    refblocks.push((i as u64, b.0));
                    regions.push(Region {
                        kind: Kind::Refblock,
                        start: b.0,
                        len: cs,
                        entry: 8,
                    });
                }
            }
        }

        // Snapshot table, walked entry by entry on the raw bytes.
        let mut snapshot_entries = Vec::new();
        if header.nb_snapshots > 0 {
            let mut pos = header.snapshots_offset;
            for index in 0..header.nb_snapshots.min(1024) as usize {
                let Some(fixed) = slice(bytes, pos, Snapshot::FIXED_LEN as u64) else {
                    break;
                };
                let Ok(len) = Snapshot::entry_len(fixed, index) else {
                    break;
                };
                snapshot_entries.push(pos);
                pos += (len as u64).div_ceil(8) * 8;
            }
            regions.push(Region {
                kind: Kind::SnapshotTable,
                start: header.snapshots_offset,
                len: clip(header.snapshots_offset, pos - header.snapshots_offset),
                entry: 8,
            });
            let table = slice(
                bytes,
                header.snapshots_offset,
                pos - header.snapshots_offset,
            )
            .unwrap_or(&[]);
            if let Ok(snaps) = Snapshot::parse_table(table, header.nb_snapshots) {
                for s in snaps {
                    let len = clip(s.l1_table_offset, u64::from(s.l1_size) * 8);
                    regions.push(Region {
                        kind: Kind::SnapshotL1,
                        start: s.l1_table_offset,
                        len,
                        entry: 8,
                    });
                    let l1 = slice(bytes, s.l1_table_offset, len).unwrap_or(&[]);
                    for i in 0..l1.len() / 8 {
                        if let Ok(Some(l2)) = L1Entry::read(l1, i).l2_offset(&geo) {
                            if !l2_tables.contains(&l2.0) && l2.0 + cs <= file_len {
                                regions.push(Region {
                                    kind: Kind::L2,
                                    start: l2.0,
                                    len: cs,
                                    entry: geo.l2_entry_size(),
                                });
                            }
                        }
                    }
                }
            }
        }

        // Bitmap directory and tables.
        let mut bitmap_entries = Vec::new();
        if let Some(ext) = header.bitmaps() {
            if let Some(dir) = slice(bytes, ext.directory_offset, ext.directory_size) {
                regions.push(Region {
                    kind: Kind::BitmapDirectory,
                    start: ext.directory_offset,
                    len: ext.directory_size,
                    entry: 8,
                });
                if let Ok(entries) = BitmapDirectoryEntry::parse_directory(dir, ext.nb_bitmaps) {
                    let mut pos = ext.directory_offset;
                    for e in entries {
                        bitmap_entries.push(pos);
                        pos += e.serialized_len() as u64;
                        regions.push(Region {
                            kind: Kind::BitmapTable,
                            start: e.table_offset,
                            len: clip(e.table_offset, u64::from(e.table_size) * 8),
                            entry: 8,
                        });
                    }
                }
            }
        }
        regions.retain(|r| r.len > 0);
        Some(Layout {
            header,
            geo,
            file_len,
            regions,
            mapped,
            l2_tables,
            refblocks,
            bitmaps_ext,
            snapshot_entries,
            bitmap_entries,
        })
    }

    /// The cluster size.
    pub fn cs(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Regions of one kind.
    pub fn of(&self, kind: Kind) -> Vec<Region> {
        self.regions
            .iter()
            .filter(|r| r.kind == kind)
            .copied()
            .collect()
    }

    /// Where the refcount of host cluster `c` lives: the refcount block's file offset and the
    /// entry's index in it (None when its block is not allocated).
    pub fn refcount_slot(&self, c: HostCluster) -> Option<(u64, u64)> {
        let w = self.width();
        let per = w.entries_per_block(self.cs());
        let ti = c.0 / per;
        self.refblocks
            .iter()
            .find(|(i, _)| *i == ti)
            .map(|&(_, off)| (off, c.0 % per))
    }

    /// The refcount width.
    pub fn width(&self) -> RefcountWidth {
        self.header.refcount_width()
    }

    /// Sets the refcount of host cluster `c` in `bytes` (if its block exists).
    pub fn set_refcount(&self, bytes: &mut [u8], c: HostCluster, value: u64) -> bool {
        let Some((block, idx)) = self.refcount_slot(c) else {
            return false;
        };
        let cs = self.cs() as usize;
        let b = block as usize;
        let Some(block) = bytes.get_mut(b..b + cs) else {
            return false; // cut off by an earlier truncation
        };
        self.width()
            .set(block, idx, value & self.width().max())
            .is_ok()
    }

    /// A compressed L2 word (bit 62 set) for `host_offset` and `sectors` additional sectors,
    /// saturating the sector count to what the geometry holds.
    pub fn compressed_word(&self, host_offset: u64, sectors: u64) -> u64 {
        let max_sectors = (1u64 << CompressedDescriptor::count_bits(&self.geo)) - 1;
        let d = CompressedDescriptor {
            host_offset: host_offset & ((1u64 << CompressedDescriptor::offset_bits(&self.geo)) - 1),
            additional_sectors: sectors.min(max_sectors),
        };
        d.encode(&self.geo).unwrap_or(0) | qcow2_format::L2_COMPRESSED
    }
}
