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

/// The offset of the bitmaps extension's payload, found by walking the raw extension area
/// from `start` to `end` (the last one if there are several).
fn bitmaps_ext(bytes: &[u8], start: u64, end: u64) -> Option<u64> {
    let mut found = None;
    let mut pos = start;
    while pos + 8 <= end {
        let (Some(kind), Some(len)) = (u32_at(bytes, pos), u32_at(bytes, pos + 4)) else {
            break;
        };
        if kind == 0 {
            break;
        }
        if kind == qcow2_format::HeaderExtension::BITMAPS {
            found = Some(pos + 8);
        }
        pos += 8 + u64::from(len).div_ceil(8) * 8;
    }
    found
}

impl Layout {
    /// Parses `bytes` (a whole qcow2 file). `None` if the header does not parse.
    pub fn parse(bytes: &[u8]) -> Option<Layout> {
        let file_len = bytes.len() as u64;
        let bits = Header::peek_cluster_bits(bytes).ok()?;
        let cs = 1u64 << bits;
        let header = Header::parse(&bytes[..(cs.min(file_len) as usize)]).ok()?;
        let geo = header.geometry();
        let mut l = Layout {
            header,
            geo,
            file_len,
            regions: Vec::new(),
            mapped: Vec::new(),
            l2_tables: Vec::new(),
            refblocks: Vec::new(),
            bitmaps_ext: None,
            snapshot_entries: Vec::new(),
            bitmap_entries: Vec::new(),
        };
        l.add_header(bytes);
        l.add_active_tables(bytes);
        l.add_refcounts(bytes);
        l.add_snapshots(bytes);
        l.add_bitmaps(bytes);
        l.regions.retain(|r| r.len > 0);
        Some(l)
    }

    /// `len` clipped to what the file holds from `start` on.
    fn clip(&self, start: u64, len: u64) -> u64 {
        len.min(self.file_len.saturating_sub(start))
    }

    /// The header and extension regions, and where the bitmaps extension's payload is.
    fn add_header(&mut self, bytes: &[u8]) {
        let cs = self.cs();
        let header = &self.header;
        let header_len = u64::from(header.header_length.max(Header::V2_LENGTH));
        let ext_start = if header.version == 2 {
            u64::from(Header::V2_LENGTH)
        } else {
            u64::from(header.header_length)
        };
        let ext_end = header
            .extensions_end()
            .max(header.backing_file_offset + u64::from(header.backing_file_size));
        let ext_len = self.clip(ext_start, ext_end.min(cs) - ext_start);
        self.regions.push(Region {
            kind: Kind::Header,
            start: 0,
            len: header_len,
            entry: 1,
        });
        self.regions.push(Region {
            kind: Kind::Extensions,
            start: ext_start,
            len: ext_len,
            entry: 1,
        });
        self.bitmaps_ext = bitmaps_ext(bytes, ext_start, cs.min(self.file_len));
    }

    /// The active L1 table, its L2 tables, and their entries that map something.
    fn add_active_tables(&mut self, bytes: &[u8]) {
        let cs = self.cs();
        let l1_offset = self.header.l1_table_offset;
        let l1_len = self.clip(l1_offset, u64::from(self.header.l1_size) * 8);
        self.regions.push(Region {
            kind: Kind::L1,
            start: l1_offset,
            len: l1_len,
            entry: 8,
        });
        let l1 = slice(bytes, l1_offset, l1_len).unwrap_or(&[]);
        let zero_ok = self.header.version >= 3;
        let geo = &self.geo;
        for i in 0..l1.len() / 8 {
            let Ok(Some(l2)) = L1Entry::read(l1, i).l2_offset(geo) else {
                continue;
            };
            let Some(table) = slice(bytes, l2.0, cs) else {
                continue;
            };
            self.l2_tables.push(l2.0);
            self.regions.push(Region {
                kind: Kind::L2,
                start: l2.0,
                len: cs,
                entry: geo.l2_entry_size(),
            });
            for j in 0..geo.l2_entries() as usize {
                let e = L2Entry::read(table, geo, j);
                if e.word == 0 && e.bitmap == 0 {
                    continue;
                }
                if let Ok(m) = e.decode(geo, zero_ok) {
                    if m != L2Mapping::Unallocated {
                        self.mapped.push(MappedEntry {
                            pos: l2.0 + j as u64 * geo.l2_entry_size(),
                            mapping: m,
                        });
                    }
                }
            }
        }
    }

    /// The refcount table and the refcount blocks it points at (those inside the file).
    fn add_refcounts(&mut self, bytes: &[u8]) {
        let cs = self.cs();
        let rt_offset = self.header.refcount_table_offset;
        let rt_len = self.clip(
            rt_offset,
            u64::from(self.header.refcount_table_clusters) * cs,
        );
        self.regions.push(Region {
            kind: Kind::Reftable,
            start: rt_offset,
            len: rt_len,
            entry: 8,
        });
        let rt = slice(bytes, rt_offset, rt_len).unwrap_or(&[]);
        for i in 0..rt.len() / 8 {
            if let Ok(Some(b)) = ReftableEntry::read(rt, i).block_offset(cs) {
                if b.0 + cs <= self.file_len {
                    self.refblocks.push((i as u64, b.0));
                    self.regions.push(Region {
                        kind: Kind::Refblock,
                        start: b.0,
                        len: cs,
                        entry: 8,
                    });
                }
            }
        }
    }

    /// The snapshot table, walked entry by entry on the raw bytes, and the snapshots' tables.
    fn add_snapshots(&mut self, bytes: &[u8]) {
        let (start, count) = (self.header.snapshots_offset, self.header.nb_snapshots);
        if count == 0 {
            return;
        }
        let mut pos = start;
        for index in 0..count.min(1024) as usize {
            let Some(fixed) = slice(bytes, pos, Snapshot::FIXED_LEN as u64) else {
                break;
            };
            let Ok(len) = Snapshot::entry_len(fixed, index) else {
                break;
            };
            self.snapshot_entries.push(pos);
            pos += (len as u64).div_ceil(8) * 8;
        }
        let len = self.clip(start, pos - start);
        self.regions.push(Region {
            kind: Kind::SnapshotTable,
            start,
            len,
            entry: 8,
        });
        let table = slice(bytes, start, pos - start).unwrap_or(&[]);
        if let Ok(snaps) = Snapshot::parse_table(table, count) {
            for s in snaps {
                self.add_snapshot_tables(bytes, &s);
            }
        }
    }

    /// A snapshot's L1 table, and its L2 tables that the active L1 does not use.
    fn add_snapshot_tables(&mut self, bytes: &[u8], s: &Snapshot) {
        let cs = self.cs();
        let len = self.clip(s.l1_table_offset, u64::from(s.l1_size) * 8);
        self.regions.push(Region {
            kind: Kind::SnapshotL1,
            start: s.l1_table_offset,
            len,
            entry: 8,
        });
        let l1 = slice(bytes, s.l1_table_offset, len).unwrap_or(&[]);
        for i in 0..l1.len() / 8 {
            if let Ok(Some(l2)) = L1Entry::read(l1, i).l2_offset(&self.geo) {
                if !self.l2_tables.contains(&l2.0) && l2.0 + cs <= self.file_len {
                    self.regions.push(Region {
                        kind: Kind::L2,
                        start: l2.0,
                        len: cs,
                        entry: self.geo.l2_entry_size(),
                    });
                }
            }
        }
    }

    /// The bitmap directory and the bitmap tables it lists.
    fn add_bitmaps(&mut self, bytes: &[u8]) {
        let Some(ext) = self.header.bitmaps() else {
            return;
        };
        let Some(dir) = slice(bytes, ext.directory_offset, ext.directory_size) else {
            return;
        };
        self.regions.push(Region {
            kind: Kind::BitmapDirectory,
            start: ext.directory_offset,
            len: ext.directory_size,
            entry: 8,
        });
        if let Ok(entries) = BitmapDirectoryEntry::parse_directory(dir, ext.nb_bitmaps) {
            let mut pos = ext.directory_offset;
            for e in entries {
                self.bitmap_entries.push(pos);
                pos += e.serialized_len() as u64;
                let len = self.clip(e.table_offset, u64::from(e.table_size) * 8);
                self.regions.push(Region {
                    kind: Kind::BitmapTable,
                    start: e.table_offset,
                    len,
                    entry: 8,
                });
            }
        }
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
