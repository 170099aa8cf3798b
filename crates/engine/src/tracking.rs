//! Persistent dirty bitmaps: keeping QEMU's enabled ("auto") bitmaps true while the engine
//! writes.
//!
//! On a read-write open the enabled, consistent bitmaps are loaded into memory. Before the
//! first guest write they are marked `in_use` on disk (so that a crash leaves them marked
//! inconsistent, never silently stale); every write, write-zeroes and discard sets the bits
//! of the granules it touches; at close the bitmaps are stored back (data clusters written in
//! place, new ones allocated and counted before the bitmap table refers to them) and `in_use`
//! is cleared. Disabled bitmaps, bitmaps already in use, and bitmaps with extra data this
//! engine does not understand are left untouched, as the format demands.
//!
//! Every cluster a maintained bitmap will be written to (its table, its data clusters) must
//! lie inside the file, be named once, hold no other metadata (the overlap guard's view) and
//! no guest data (the active L2 tables are walked once more, only when a bitmap is
//! maintained): otherwise the read-write open fails, as QEMU's does for a bitmap it cannot
//! load. The writes at close go through the overlap guard again.

use crate::aligned::read_bytes;
use crate::meta::Store;
use crate::{Error, Result};
use blockio::Backend;
use qcow2_format::Header;
use qcow2_format::{BitmapDirectoryEntry, BitmapTableEntry};
use std::collections::HashSet;

/// One enabled bitmap held in memory.
struct Tracked {
    /// Index in the directory.
    index: usize,
    granularity_bits: u32,
    /// The table entries as read (offsets of data clusters; 0 = all zeros or all ones).
    table: Vec<BitmapTableEntry>,
    /// The whole bitmap: bit g is granule g, LSB first.
    data: Vec<u8>,
}

/// The bitmaps of a read-write image.
pub(crate) struct Bitmaps {
    directory: Vec<BitmapDirectoryEntry>,
    directory_offset: u64,
    tracked: Vec<Tracked>,
    /// Whether `in_use` has been written for the tracked bitmaps.
    marked_in_use: bool,
    /// Whether a resize marked every bitmap `in_use` and has not stored them anew: their
    /// tables may not fit the disk size any more, so they must stay marked (inconsistent).
    resizing: bool,
}

impl Bitmaps {
    /// Whether any bitmap is maintained.
    pub(crate) fn is_tracking(&self) -> bool {
        !self.tracked.is_empty()
    }

    /// Sets the bits of every granule `[offset, offset+len)` touches.
    pub(crate) fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for t in &mut self.tracked {
            let first = offset >> t.granularity_bits;
            let last = (offset + len - 1) >> t.granularity_bits;
            // A write past the end the bitmap was loaded for: the disk grew (a resize
            // stores the bitmaps at the new size).
            let needed = (last / 8 + 1) as usize;
            if t.data.len() < needed {
                t.data.resize(needed, 0);
            }
            for g in first..=last {
                if let Some(b) = t.data.get_mut((g / 8) as usize) {
                    *b |= 1 << (g % 8);
                }
            }
        }
    }

    /// The dirty extents of the maintained bitmap `name` (None if it is not maintained).
    pub(crate) fn tracked_extents(&self, name: &str, size: u64) -> Option<Vec<(u64, u64)>> {
        let t = self
            .tracked
            .iter()
            .find(|t| self.directory[t.index].name == name)?;
        Some(dirty_extents(&t.data, t.granularity_bits, size))
    }

    /// The directory as the engine knows it (flags included).
    pub(crate) fn directory(&self) -> &[BitmapDirectoryEntry] {
        &self.directory
    }

    /// The bits of the bitmap at directory `index`, if it is maintained.
    pub(crate) fn tracked_bits(&self, index: usize) -> Option<&[u8]> {
        self.tracked
            .iter()
            .find(|t| t.index == index)
            .map(|t| t.data.as_slice())
    }

    fn directory_bytes(&self) -> Result<Vec<u8>> {
        BitmapDirectoryEntry::try_serialize_directory(&self.directory).map_err(|e| Error::Corrupt {
            path: Default::default(),
            what: format!("bitmap directory: {e}"),
        })
    }
}

/// What the bitmaps work with: the metadata store, the metadata lock (for the overlap
/// guard's map and allocations), the header as the image was opened, and the bitmaps' own
/// lock.
pub(crate) struct Ctx<'a, B> {
    pub(crate) store: Store<'a, B>,
    pub(crate) meta: &'a crate::meta::MetaLock,
    pub(crate) header: &'a Header,
    pub(crate) bitmaps: &'a crate::lock::Lock<Option<Bitmaps>>,
}

impl<B: Backend> Ctx<'_, B> {
    /// Loads the directory and the enabled bitmaps of a read-write image at open (None
    /// without bitmaps), refusing bitmaps that would be written where they must not (see the
    /// module documentation). Then adds the directory to the overlap guard's map.
    pub(crate) async fn load_bitmaps(&self) -> Result<Option<Bitmaps>> {
        let header = self.header;
        let Some(ext) = header.bitmaps() else {
            return Ok(None);
        };
        let loaded = if header.autoclear_features & qcow2_format::features::AUTOCLEAR_BITMAPS == 0 {
            // The bitmaps were already marked untrustworthy: nothing to maintain.
            None
        } else {
            Some(self.read_bitmaps(ext, false).await?)
        };
        let mut meta = self.meta.lock().await;
        meta.metadata
            .add_range(&self.store.geo, ext.directory_offset, ext.directory_size);
        Ok(loaded)
    }

    /// Loads the bitmaps anew after a resize stored them (with `self.header`, the header that
    /// names them): as at open, except that the enabled bitmaps marked `in_use` are the ones
    /// the resize stored so, and are maintained (already marked). The new directory joins
    /// the overlap guard's map.
    pub(crate) async fn reload_bitmaps(&self) -> Result<Option<Bitmaps>> {
        let Some(ext) = self.header.bitmaps() else {
            return Ok(None);
        };
        let loaded = self.read_bitmaps(ext, true).await?;
        let mut meta = self.meta.lock().await;
        meta.metadata
            .add_range(&self.store.geo, ext.directory_offset, ext.directory_size);
        Ok(Some(loaded))
    }

    /// Reads the directory and the bitmaps to maintain; with `in_use_ours`, the enabled
    /// bitmaps marked `in_use` were marked by this engine and are maintained too.
    async fn read_bitmaps(
        &self,
        ext: &qcow2_format::BitmapsExtension,
        in_use_ours: bool,
    ) -> Result<Bitmaps> {
        let header = self.header;
        let format_err = |source| Error::Format {
            path: self.store.files.path().to_path_buf(),
            source,
        };
        let cs = self.store.geo.cluster_size();
        let mut claimed = HashSet::new();
        self.bitmap_clusters_ok(
            &mut claimed,
            "the bitmap directory",
            ext.directory_offset,
            ext.directory_size,
        )
        .await?;
        let buf = read_bytes(
            self.store.files.image(),
            ext.directory_offset,
            ext.directory_size,
            "bitmap directory",
        )
        .await?;
        let directory =
            BitmapDirectoryEntry::parse_directory(&buf, ext.nb_bitmaps).map_err(format_err)?;
        let mut tracked = Vec::new();
        for (index, e) in directory.iter().enumerate() {
            e.validate(index, cs, header.size).map_err(format_err)?;
            let enabled = e.flags & BitmapDirectoryEntry::AUTO != 0;
            let in_use = e.flags & BitmapDirectoryEntry::IN_USE != 0;
            let extra_ok = e.extra_data.is_empty()
                || e.flags & BitmapDirectoryEntry::EXTRA_DATA_COMPATIBLE != 0;
            if !enabled || (in_use && !in_use_ours) || !extra_ok || e.bitmap_type != 1 {
                continue;
            }
            let granularity_bits = u32::from(e.granularity_bits);
            let granules = header.size.div_ceil(1u64 << granularity_bits);
            let bytes = granules.div_ceil(8);
            // QEMU's limit on a bitmap's size in memory.
            if bytes > 512 << 20 {
                return Err(format_err(qcow2_format::FormatError::TooLarge {
                    what: "bitmap",
                    value: bytes,
                    limit: 512 << 20,
                }));
            }
            let table_len = u64::from(e.table_size);
            if table_len != bytes.div_ceil(cs) {
                return Err(format_err(qcow2_format::FormatError::BadBitmap {
                    index,
                    reason: format!(
                        "table has {table_len} entries, the bitmap needs {}",
                        bytes.div_ceil(cs)
                    ),
                }));
            }
            let name = &e.name;
            self.bitmap_clusters_ok(
                &mut claimed,
                &format!("the table of bitmap '{name}'"),
                e.table_offset,
                table_len * 8,
            )
            .await?;
            let raw = read_bytes(
                self.store.files.image(),
                e.table_offset,
                table_len * 8,
                "bitmap table",
            )
            .await?;
            let table: Vec<BitmapTableEntry> = (0..table_len as usize)
                .map(|i| BitmapTableEntry::read(&raw, i))
                .collect();
            let mut data = vec![0u8; bytes as usize];
            for (i, t) in table.iter().enumerate() {
                let chunk = i * cs as usize..((i + 1) * cs as usize).min(data.len());
                match t.decode(cs).map_err(format_err)? {
                    Ok(off) => {
                        self.bitmap_clusters_ok(
                            &mut claimed,
                            &format!("data cluster {i} of bitmap '{name}'"),
                            off.0,
                            cs,
                        )
                        .await?;
                        let c =
                            read_bytes(self.store.files.image(), off.0, cs, "bitmap data").await?;
                        let n = chunk.len();
                        data[chunk].copy_from_slice(&c[..n]);
                    }
                    Err(true) => data[chunk].fill(0xff),
                    Err(false) => {}
                }
            }
            tracked.push(Tracked {
                index,
                granularity_bits,
                table,
                data,
            });
        }
        if !tracked.is_empty() && self.store.files.data().is_none() {
            let l1 = self.meta.lock().await.l1.clone();
            crate::meta::verify::bitmaps_apart_from_data(
                self.store.files.image(),
                self.store.files.path(),
                &self.store.geo,
                &l1,
                &claimed,
            )
            .await?;
        }
        Ok(Bitmaps {
            directory,
            directory_offset: ext.directory_offset,
            marked_in_use: in_use_ours && !tracked.is_empty(),
            resizing: false,
            tracked,
        })
    }

    /// Refuses bitmap structures the engine would write to (at `[offset, offset+len)`) unless
    /// they lie inside the file, in clusters no other bitmap structure claimed before
    /// (`claimed` collects them) and where the overlap guard finds no other metadata.
    async fn bitmap_clusters_ok(
        &self,
        claimed: &mut HashSet<u64>,
        what: &str,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let file_len = self.store.files.len();
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(self.store.corrupt_err(format!(
                "{what} at {offset:#x} (+{len:#x}) lies past the end of the file \
                 ({file_len:#x} bytes)"
            )));
        }
        let meta = self.meta.lock().await;
        if self.store.guard_overlap(&meta, offset, len).is_err() {
            return Err(self
                .store
                .corrupt_err(format!("{what} at {offset:#x} overlaps other metadata")));
        }
        let bits = self.store.geo.cluster_bits();
        for c in (offset >> bits)..=((offset + len - 1) >> bits) {
            if !claimed.insert(c) {
                return Err(self.store.corrupt_err(format!(
                    "{what} at {offset:#x} shares host cluster {c} with other bitmap metadata"
                )));
            }
        }
        Ok(())
    }

    /// Writes bitmap bytes (a table or a data cluster) through the overlap guard: a hit means
    /// the refcounts handed out a cluster that holds metadata, and marks the image corrupt.
    async fn write_bitmap_meta(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let guarded = {
            let meta = self.meta.lock().await;
            self.store.guard_overlap(&meta, offset, bytes.len() as u64)
        };
        // A hit means the refcounts handed out a cluster that holds metadata: the caller
        // marks the image corrupt.
        guarded?;
        self.store.write_meta(offset, bytes).await
    }

    /// Marks the maintained bitmaps `in_use` on disk before the first write.
    pub(crate) async fn bitmaps_in_use(&self) -> Result<()> {
        let bytes = {
            let mut guard = self.bitmaps.lock().await;
            let Some(b) = guard.as_mut() else {
                return Ok(());
            };
            if b.marked_in_use || !b.is_tracking() {
                return Ok(());
            }
            for t in &b.tracked {
                b.directory[t.index].flags |= BitmapDirectoryEntry::IN_USE;
            }
            (b.directory_offset, b.directory_bytes()?)
        };
        self.store.write_meta(bytes.0, &bytes.1).await?;
        self.store.files.sync().await?;
        // Only once `in_use` is on disk: a failure is retried before the next write.
        if let Some(b) = self.bitmaps.lock().await.as_mut() {
            b.marked_in_use = true;
        }
        Ok(())
    }

    /// Marks every bitmap of `b` (maintained or not) `in_use` on disk, in place, and makes it
    /// durable: before a resize changes the disk size their tables are sized for. A crash
    /// before they are stored anew leaves them inconsistent, which QEMU accepts whatever their
    /// size (and refuses to use). They stay marked in memory, so a close after a failed resize
    /// leaves them so.
    pub(crate) async fn mark_all_in_use(&self, b: &mut Bitmaps) -> Result<()> {
        for e in &mut b.directory {
            e.flags |= BitmapDirectoryEntry::IN_USE;
        }
        // Set before the write: even a write that failed may have landed.
        b.resizing = true;
        let bytes = b.directory_bytes()?;
        self.store.write_meta(b.directory_offset, &bytes).await?;
        self.store.files.sync().await?;
        b.marked_in_use = true;
        Ok(())
    }

    /// Records a guest write (or zeroing, or discard) in the maintained bitmaps.
    pub(crate) async fn bitmaps_mark(&self, offset: u64, len: u64) {
        if let Some(b) = self.bitmaps.lock().await.as_mut() {
            b.mark(offset, len);
        }
    }

    /// Stores the maintained bitmaps and clears `in_use` (at close). Data clusters are
    /// written in place; a chunk that needs a cluster for the first time gets one, counted
    /// (and the count written) before the bitmap table names it.
    pub(crate) async fn bitmaps_store(&self) -> Result<()> {
        let mut guard = self.bitmaps.lock().await;
        let Some(b) = guard.as_mut() else {
            return Ok(());
        };
        // After a resize that did not store them, the bitmaps stay inconsistent.
        if !b.marked_in_use || b.resizing {
            return Ok(());
        }
        let cs = self.store.geo.cluster_size();
        let geo = self.store.geo;
        for t in &mut b.tracked {
            let mut table_changed = false;
            for i in 0..t.table.len() {
                let chunk = i * cs as usize..((i + 1) * cs as usize).min(t.data.len());
                let bytes = &t.data[chunk];
                let current = t.table[i]
                    .decode(cs)
                    .map_err(|e| self.store.corrupt_err(format!("bitmap table: {e}")))?;
                match current {
                    Ok(off) => {
                        let mut full = vec![0u8; cs as usize];
                        full[..bytes.len()].copy_from_slice(bytes);
                        self.write_bitmap_meta(off.0, &full).await?;
                    }
                    Err(all_ones) => {
                        let zeros = bytes.iter().all(|&x| x == 0);
                        let ones = bytes.iter().all(|&x| x == 0xff);
                        if (zeros && !all_ones) || (ones && all_ones) {
                            continue;
                        }
                        let mut meta = self.meta.lock().await;
                        let a = self.store.allocate(&mut meta, 1)?;
                        drop(meta);
                        let off = geo.cluster_offset(a.first).0;
                        let mut full = vec![0u8; cs as usize];
                        full[..bytes.len()].copy_from_slice(bytes);
                        self.write_bitmap_meta(off, &full).await?;
                        t.table[i] = BitmapTableEntry(off);
                        table_changed = true;
                    }
                }
            }
            if table_changed {
                // The new clusters are counted on disk before the table names them.
                let mut meta = self.meta.lock().await;
                self.store.write_refcounts(&mut meta).await?;
                drop(meta);
                self.store.files.sync().await?;
                let table: Vec<u8> = t.table.iter().flat_map(|e| e.0.to_be_bytes()).collect();
                let e = &b.directory[t.index];
                self.write_bitmap_meta(e.table_offset, &table).await?;
            }
        }
        self.store.files.sync().await?;
        for t in &b.tracked {
            b.directory[t.index].flags &= !BitmapDirectoryEntry::IN_USE;
        }
        let dir = b.directory_bytes()?;
        self.store.write_meta(b.directory_offset, &dir).await?;
        b.marked_in_use = false;
        Ok(())
    }
}

/// The guest byte ranges `(offset, length)` of the set bits of `data` (bit g is granule g,
/// LSB first), adjacent granules merged, the last range clipped to the disk `size`.
pub(crate) fn dirty_extents(data: &[u8], granularity_bits: u32, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let g = 1u64 << granularity_bits;
    for (i, &byte) in data.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        for bit in 0..8 {
            if byte & (1 << bit) == 0 {
                continue;
            }
            let start = (i as u64 * 8 + bit) * g;
            if start >= size {
                return out;
            }
            let len = g.min(size - start);
            match out.last_mut() {
                Some((o, l)) if *o + *l == start => *l += len,
                _ => out.push((start, len)),
            }
        }
    }
    out
}

/// Reads a bitmap's bits from the file (its table, then its data clusters; all-zeros and
/// all-ones table entries need no cluster): `granules(size)/8` bytes, bit g is granule g.
pub(crate) async fn read_bitmap_data<B: Backend>(
    file: &B,
    path: &std::path::Path,
    e: &BitmapDirectoryEntry,
    cluster_size: u64,
    size: u64,
) -> Result<Vec<u8>> {
    let cs = cluster_size;
    let corrupt = |what: String| Error::Corrupt {
        path: path.to_path_buf(),
        what,
    };
    let bytes = size.div_ceil(1u64 << e.granularity_bits).div_ceil(8);
    let table_len = u64::from(e.table_size);
    if table_len != bytes.div_ceil(cs) {
        return Err(corrupt(format!(
            "bitmap '{}': table has {table_len} entries, the bitmap needs {}",
            e.name,
            bytes.div_ceil(cs)
        )));
    }
    let raw = read_bytes(file, e.table_offset, table_len * 8, "bitmap table").await?;
    let mut data = vec![0u8; bytes as usize];
    for i in 0..table_len as usize {
        let chunk = i * cs as usize..((i + 1) * cs as usize).min(data.len());
        let entry = BitmapTableEntry::read(&raw, i)
            .decode(cs)
            .map_err(|err| corrupt(format!("bitmap '{}' table: {err}", e.name)))?;
        match entry {
            Ok(off) => {
                let c = read_bytes(file, off.0, cs, "bitmap data").await?;
                let n = chunk.len();
                data[chunk].copy_from_slice(&c[..n]);
            }
            Err(true) => data[chunk].fill(0xff),
            Err(false) => {}
        }
    }
    Ok(data)
}
