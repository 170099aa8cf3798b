//! Changing the persistent dirty bitmaps (`qemu-img bitmap`): add, remove, clear, enable,
//! disable, merge.
//!
//! [`Image::bitmap_edit`] applies the actions in order to the bitmaps in memory, checking each
//! as QEMU does (`block_dirty_bitmap_add`, `qcow2_co_can_store_new_dirty_bitmap`, with their
//! words). Then it stores them, never changing a structure the header refers to:
//!
//! 1. the bitmaps whose bits changed (added, cleared, merged into) get new data clusters
//!    (all-zero chunks need none) and a new table; the directory is written anew. Every new
//!    cluster is allocated and its refcount written and synced before anything is written
//!    into it, let alone referred to;
//! 2. cluster 0 is rewritten, as QEMU's `qcow2_update_header` lays it out, with the new
//!    bitmaps extension (or none, without bitmaps), in one write, then synced;
//! 3. only then the old directory and the tables and data clusters no entry names any more are
//!    freed (deferred decrements, applied by a full write-back).
//!
//! A crash before 2 leaves the old bitmaps and some leaked clusters; after it, the new ones.
//! A store that fails or is dropped before 2 gives its new clusters back (deferred
//! decrements); dropped during 2, it leaves a `BitmapSwitch` in `Meta` that the next store,
//! resize or clean-up resolves by reading the header back, so a store cut short leaks nothing.
//! As `qemu-img bitmap` does, the actions done before a refused one are stored.

use crate::image::Image;
use crate::{Error, Result};
use blockio::Opener;
use qcow2_format::{features, BitmapDirectoryEntry, BitmapsExtension, HeaderExtension};

/// One action of [`Image::bitmap_edit`] (`qemu-img bitmap`'s options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapAction {
    /// `--add [-g GRANULARITY]`: a new, enabled, empty bitmap. Without a granularity, QEMU's
    /// default: the cluster size, between 4 KiB and 64 KiB.
    Add {
        /// Bytes per bit: a power of two from 512 to 2^31.
        granularity: Option<u64>,
    },
    /// `--remove`.
    Remove,
    /// `--clear`: every bit cleared.
    Clear,
    /// `--enable`: the bitmap records writes again.
    Enable,
    /// `--disable`: the bitmap stops recording writes.
    Disable,
    /// `--merge SOURCE`: the bits of bitmap SOURCE (same image) set in this one too.
    Merge(String),
    /// `--merge SOURCE -b SOURCE_FILE`: the dirty extents of a bitmap of another image (as
    /// [`Image::bitmap_dirty_extents`] gives them) set in this one too.
    MergeExtents {
        /// The `(offset, length)` ranges to set.
        extents: Vec<(u64, u64)>,
        /// The size of the image they come from: it must be this image's.
        size: u64,
    },
}

impl BitmapAction {
    /// The action's name in qemu-img's messages ("add", "merge", ...).
    pub fn name(&self) -> &'static str {
        match self {
            BitmapAction::Add { .. } => "add",
            BitmapAction::Remove => "remove",
            BitmapAction::Clear => "clear",
            BitmapAction::Enable => "enable",
            BitmapAction::Disable => "disable",
            BitmapAction::Merge(_) | BitmapAction::MergeExtents { .. } => "merge",
        }
    }
}

/// A bitmap as edited: its entry, and its bits once they changed (then it needs new clusters).
pub(crate) struct Edited {
    entry: BitmapDirectoryEntry,
    data: Option<Vec<u8>>,
}

impl Edited {
    /// A bitmap to be stored anew with `bits` (its table and data in new clusters).
    pub(crate) fn changed(entry: BitmapDirectoryEntry, bits: Vec<u8>) -> Self {
        Edited {
            entry,
            data: Some(bits),
        }
    }
}

const MAX_NAME: usize = 1023;
/// QEMU's hint after refusing an inconsistent bitmap.
const REMOVE_HINT: &str = "Try block-dirty-bitmap-remove to delete this bitmap from disk";
const MAX_BITMAPS: usize = 65535;
/// QEMU's limit on the directory size (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
const MAX_DIRECTORY: usize = 64 << 20;

impl<O: Opener> Image<O> {
    /// Applies `actions` in order to the persistent bitmap `name` as `qemu-img bitmap` does,
    /// stores the result and closes the image. See the module documentation of `bitmap_edit`
    /// for the order of the writes and their crash safety.
    ///
    /// # Errors
    ///
    /// [`Error::BitmapAction`] for an action QEMU refuses, with its words (the actions before
    /// it are stored); [`Error::ReadOnly`] for an image opened read-only; corruption and I/O
    /// errors while reading or writing the bitmaps.
    ///
    /// # Cancel safety
    ///
    /// The image is consumed. Dropping the future leaves the file consistent: before the
    /// header write, with the old bitmaps (the new clusters may leak, as the image is not
    /// closed); after it, with the new.
    pub async fn bitmap_edit(self, name: &str, actions: &[BitmapAction]) -> Result<()> {
        let r = self.bitmap_edit_inner(name, actions).await;
        let closed = self.close().await;
        r.and(closed)
    }

    /// Adds an empty persistent bitmap `name` (granularity in bytes, None for QEMU's
    /// default), enabled or not, then closes the image: [`bitmap_edit`](Self::bitmap_edit)
    /// with `--add` (and `--disable`).
    ///
    /// # Errors
    ///
    /// As [`bitmap_edit`](Self::bitmap_edit).
    ///
    /// # Cancel safety
    ///
    /// As [`bitmap_edit`](Self::bitmap_edit).
    pub async fn bitmap_add(
        self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<()> {
        let mut actions = vec![BitmapAction::Add { granularity }];
        if !enabled {
            actions.push(BitmapAction::Disable);
        }
        self.bitmap_edit(name, &actions).await
    }

    /// Removes the bitmap `name`, then closes the image ([`bitmap_edit`](Self::bitmap_edit)
    /// with `--remove`).
    ///
    /// # Errors
    ///
    /// As [`bitmap_edit`](Self::bitmap_edit).
    ///
    /// # Cancel safety
    ///
    /// As [`bitmap_edit`](Self::bitmap_edit).
    pub async fn bitmap_remove(self, name: &str) -> Result<()> {
        self.bitmap_edit(name, &[BitmapAction::Remove]).await
    }

    /// Clears every bit of the bitmap `name`, then closes the image
    /// ([`bitmap_edit`](Self::bitmap_edit) with `--clear`).
    ///
    /// # Errors
    ///
    /// As [`bitmap_edit`](Self::bitmap_edit).
    ///
    /// # Cancel safety
    ///
    /// As [`bitmap_edit`](Self::bitmap_edit).
    pub async fn bitmap_clear(self, name: &str) -> Result<()> {
        self.bitmap_edit(name, &[BitmapAction::Clear]).await
    }

    /// Enables (`true`) or disables the bitmap `name`, then closes the image
    /// ([`bitmap_edit`](Self::bitmap_edit) with `--enable` / `--disable`).
    ///
    /// # Errors
    ///
    /// As [`bitmap_edit`](Self::bitmap_edit).
    ///
    /// # Cancel safety
    ///
    /// As [`bitmap_edit`](Self::bitmap_edit).
    pub async fn bitmap_set_enabled(self, name: &str, enabled: bool) -> Result<()> {
        let a = if enabled {
            BitmapAction::Enable
        } else {
            BitmapAction::Disable
        };
        self.bitmap_edit(name, &[a]).await
    }

    /// Sets in bitmap `dst` every granule bitmap `src` (same image) has set, then closes the
    /// image ([`bitmap_edit`](Self::bitmap_edit) with `--merge`).
    ///
    /// # Errors
    ///
    /// As [`bitmap_edit`](Self::bitmap_edit).
    ///
    /// # Cancel safety
    ///
    /// As [`bitmap_edit`](Self::bitmap_edit).
    pub async fn bitmap_merge(self, dst: &str, src: &str) -> Result<()> {
        self.bitmap_edit(dst, &[BitmapAction::Merge(src.to_owned())])
            .await
    }

    async fn bitmap_edit_inner(&self, name: &str, actions: &[BitmapAction]) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        // The maintained bitmaps on disk first, then nothing maintains them any more.
        self.bitmap_ctx().bitmaps_store().await?;
        *self.tracked.lock().await = None;
        self.make_clean().await?;
        let old = self.bitmaps().await?;
        let mut edited: Vec<Edited> = old
            .iter()
            .map(|e| Edited {
                entry: e.clone(),
                data: None,
            })
            .collect();
        let mut refused = None;
        for a in actions {
            if let Err(message) = self.apply(&mut edited, name, a).await? {
                refused = Some(Error::BitmapAction {
                    action: a.name(),
                    bitmap: name.to_owned(),
                    message,
                });
                break;
            }
        }
        self.store_bitmaps(&old, edited).await?;
        refused.map_or(Ok(()), Err)
    }

    /// One action on the bitmaps in memory: Ok(Err(message)) when QEMU refuses it.
    async fn apply(
        &self,
        edited: &mut Vec<Edited>,
        name: &str,
        action: &BitmapAction,
    ) -> Result<std::result::Result<(), String>> {
        let find = |edited: &Vec<Edited>, n: &str| edited.iter().position(|b| b.entry.name == n);
        let not_found = |n: &str| Ok(Err(format!("Dirty bitmap '{n}' not found")));
        if let BitmapAction::Add { granularity } = action {
            return Ok(self.add(edited, name, *granularity));
        }
        let Some(i) = find(edited, name) else {
            return not_found(name);
        };
        let in_use = edited[i].entry.flags & BitmapDirectoryEntry::IN_USE != 0;
        if in_use && *action != BitmapAction::Remove {
            return Ok(Err(format!(
                "Bitmap '{name}' is inconsistent and cannot be used\n{REMOVE_HINT}"
            )));
        }
        match action {
            BitmapAction::Add { .. } => unreachable!("handled above"),
            BitmapAction::Remove => {
                edited.remove(i);
            }
            BitmapAction::Clear => edited[i].data = Some(vec![0; self.bitmap_bytes(&edited[i])]),
            BitmapAction::Enable => edited[i].entry.flags |= BitmapDirectoryEntry::AUTO,
            BitmapAction::Disable => edited[i].entry.flags &= !BitmapDirectoryEntry::AUTO,
            BitmapAction::Merge(src) => {
                let Some(s) = find(edited, src) else {
                    return not_found(src);
                };
                if edited[s].entry.flags & BitmapDirectoryEntry::IN_USE != 0 {
                    return Ok(Err(format!(
                        "Bitmap '{src}' is inconsistent and cannot be used\n{REMOVE_HINT}"
                    )));
                }
                let src_bits = self.bits_of(&edited[s]).await?;
                let extents = crate::tracking::dirty_extents(
                    &src_bits,
                    u32::from(edited[s].entry.granularity_bits),
                    self.size(),
                );
                let dst = self.merged(&edited[i], &extents).await?;
                edited[i].data = Some(dst);
            }
            BitmapAction::MergeExtents { extents, size } => {
                if *size != self.size() {
                    return Ok(Err(format!(
                        "Bitmaps are of different sizes (destination size is {}, source size \
                         is {size}) and can't be merged",
                        self.size()
                    )));
                }
                let dst = self.merged(&edited[i], extents).await?;
                edited[i].data = Some(dst);
            }
        }
        Ok(Ok(()))
    }

    /// `--add`, checked as `block_dirty_bitmap_add` and `qcow2_co_can_store_new_dirty_bitmap`.
    fn add(
        &self,
        edited: &mut Vec<Edited>,
        name: &str,
        granularity: Option<u64>,
    ) -> std::result::Result<(), String> {
        if name.is_empty() {
            return Err("Bitmap name cannot be empty".into());
        }
        let g = granularity.unwrap_or_else(|| self.cluster_size().clamp(4096, 65536));
        if !g.is_power_of_two() || !(512..=1 << 31).contains(&g) {
            return Err("Granularity must be power of 2 and at least 512".into());
        }
        if edited.iter().any(|b| b.entry.name == name) {
            return Err(format!("Bitmap already exists: {name}"));
        }
        let persistent = |why: &str| {
            format!(
                "Can't make bitmap '{name}' persistent in '{}': {why}",
                self.path().display()
            )
        };
        if self.header.version < 3 {
            return Err(persistent("Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        if name.len() > MAX_NAME {
            return Err(persistent("Name length exceeds maximum (1023 characters)"));
        }
        if edited.len() >= MAX_BITMAPS {
            return Err(persistent(
                "Maximum number of persistent bitmaps is already reached",
            ));
        }
        let mut entry = BitmapDirectoryEntry {
            table_offset: 0,
            table_size: 0,
            flags: BitmapDirectoryEntry::AUTO,
            bitmap_type: BitmapDirectoryEntry::TYPE_DIRTY_TRACKING,
            granularity_bits: g.trailing_zeros() as u8,
            name: name.to_owned(),
            extra_data: Vec::new(),
        };
        let dir: usize = edited.iter().map(|b| b.entry.serialized_len()).sum();
        if dir + entry.serialized_len() > MAX_DIRECTORY {
            return Err(persistent("Not enough space in the bitmap directory"));
        }
        entry.table_size = 0;
        let mut b = Edited { entry, data: None };
        b.data = Some(vec![0; self.bitmap_bytes(&b)]);
        edited.push(b);
        Ok(())
    }

    /// The bits of `b` with those of every granule `extents` touch set too.
    async fn merged(&self, b: &Edited, extents: &[(u64, u64)]) -> Result<Vec<u8>> {
        let mut dst = self.bits_of(b).await?;
        let gb = u32::from(b.entry.granularity_bits);
        for &(o, l) in extents {
            if l == 0 || o >= self.size() {
                continue;
            }
            let end = (o + l).min(self.size());
            for g in (o >> gb)..=((end - 1) >> gb) {
                dst[(g / 8) as usize] |= 1 << (g % 8);
            }
        }
        Ok(dst)
    }

    /// The size of a bitmap's bits in bytes.
    fn bitmap_bytes(&self, b: &Edited) -> usize {
        self.size()
            .div_ceil(1 << b.entry.granularity_bits)
            .div_ceil(8) as usize
    }

    /// A bitmap's bits: as edited, or read from the file.
    async fn bits_of(&self, b: &Edited) -> Result<Vec<u8>> {
        if let Some(d) = &b.data {
            return Ok(d.clone());
        }
        crate::tracking::read_bitmap_data(
            self.files.image(),
            self.path(),
            &b.entry,
            self.cluster_size(),
            self.size(),
        )
        .await
    }
}

/// The metadata lock of a store, with the clusters it allocated: given back (deferred
/// decrements, applied by the next write-back) when the store fails or is dropped before the
/// header may name them, so that a store cut short leaks nothing. Dropped while the header
/// write is in flight, it leaves a `BitmapSwitch` to resolve.
struct Taken<'a> {
    meta: crate::meta::MetaGuard<'a>,
    clusters: Vec<qcow2_format::HostCluster>,
    /// Set while the header write is in flight.
    switch: Option<crate::meta::BitmapSwitch>,
}

impl Taken<'_> {
    /// Allocates `count` clusters; returns the first.
    fn allocate<B: blockio::Backend>(
        &mut self,
        store: crate::meta::Store<'_, B>,
        count: u64,
    ) -> Result<qcow2_format::HostCluster> {
        let a = store.allocate(&mut self.meta, count)?;
        self.clusters
            .extend((0..a.count).map(|i| qcow2_format::HostCluster(a.first.0 + i)));
        Ok(a.first)
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(mut s) = self.switch.take() {
            s.new = std::mem::take(&mut self.clusters);
            self.meta.bitmap_switch = Some(s);
            return;
        }
        if let Some(alloc) = self.meta.alloc.as_mut() {
            for c in self.clusters.drain(..) {
                alloc.defer_decrement(c);
            }
        }
    }
}

/// Where the stored bitmaps go: new clusters by purpose.
struct Layout {
    /// (offset, bytes) of each data cluster and table to write.
    writes: Vec<(u64, Vec<u8>)>,
    directory: Vec<BitmapDirectoryEntry>,
}

impl<O: Opener> Image<O> {
    /// Stores `edited` in place of `old` (module documentation, steps 1-3).
    pub(crate) async fn store_bitmaps(
        &self,
        old: &[BitmapDirectoryEntry],
        edited: Vec<Edited>,
    ) -> Result<()> {
        let unchanged = edited.len() == old.len()
            && edited
                .iter()
                .zip(old)
                .all(|(b, o)| b.data.is_none() && b.entry == *o);
        if unchanged {
            return Ok(());
        }
        // What the new directory no longer names: freed once the header is written.
        let mut freed = Vec::new();
        for o in old {
            let kept = edited
                .iter()
                .any(|b| b.data.is_none() && b.entry.table_offset == o.table_offset);
            if !kept {
                freed.extend(self.bitmap_clusters(o).await?);
            }
        }
        let cs = self.cluster_size();
        let geo = self.geo;
        self.finish_bitmap_switch().await?;
        let mut taken = Taken {
            meta: self.meta.lock().await,
            clusters: Vec::new(),
            switch: None,
        };
        if let Some(ext) = taken.meta.header.bitmaps() {
            let n = ext.directory_size.div_ceil(cs);
            freed.extend((0..n).map(|i| ext.directory_offset + i * cs));
        }
        let layout = self.allocate_bitmaps(&mut taken, edited)?;
        let dir_bytes = BitmapDirectoryEntry::try_serialize_directory(&layout.directory)
            .map_err(|e| self.store().corrupt_err(format!("bitmap directory: {e}")))?;
        let dir_offset = if dir_bytes.is_empty() {
            0
        } else {
            let clusters = (dir_bytes.len() as u64).div_ceil(cs);
            geo.cluster_offset(taken.allocate(self.store(), clusters)?)
                .0
        };
        let meta = &mut taken.meta;
        // 1. Counted and durable before anything is written into them.
        self.store().write_refcounts(meta).await?;
        self.files.sync().await?;
        for (off, bytes) in &layout.writes {
            self.store().write_meta(*off, bytes).await?;
        }
        if !dir_bytes.is_empty() {
            let mut d = dir_bytes.clone();
            d.resize((d.len() as u64).div_ceil(cs) as usize * cs as usize, 0);
            self.store().write_meta(dir_offset, &d).await?;
        }
        self.files.sync().await?;
        // 2. The header names the new directory.
        let mut h = meta.header.clone();
        h.extensions
            .retain(|e| !matches!(e, HeaderExtension::Bitmaps(_)));
        if layout.directory.is_empty() {
            h.autoclear_features &= !features::AUTOCLEAR_BITMAPS;
        } else {
            h.extensions
                .push(HeaderExtension::Bitmaps(BitmapsExtension {
                    nb_bitmaps: layout.directory.len() as u32,
                    directory_size: dir_bytes.len() as u64,
                    directory_offset: dir_offset,
                }));
            h.autoclear_features |= features::AUTOCLEAR_BITMAPS;
        }
        let data_file = h.data_file_name().map(str::to_owned);
        crate::amend::qemu_extensions(&mut h, data_file);
        let mut bytes = h.serialize().map_err(|e| Error::Unsupported {
            path: self.path().to_path_buf(),
            what: format!("the header with the new bitmaps: {e}"),
        })?;
        bytes.resize(cs as usize, 0);
        // From here the header may name the new clusters: a drop leaves the outcome to read.
        taken.switch = Some(crate::meta::BitmapSwitch {
            header: h,
            directory_offset: dir_offset,
            old: freed,
            new: Vec::new(),
        });
        let written = self.store().write_meta(0, &bytes).await;
        let switch = taken.switch.take().expect("set above");
        if let Err(e) = written {
            // It may have landed all the same: read it back before anything else.
            taken.meta.bitmap_switch = Some(crate::meta::BitmapSwitch {
                new: std::mem::take(&mut taken.clusters),
                ..switch
            });
            return Err(e);
        }
        taken.clusters.clear();
        let meta = &mut taken.meta;
        meta.header = switch.header;
        // 3. Nothing on disk refers to the old structures any more (the write-back that
        // frees them makes the header durable first).
        if let Some(alloc) = meta.alloc.as_mut() {
            for c in switch.old {
                alloc.defer_decrement(geo.host_cluster(qcow2_format::HostOffset(c)));
            }
        }
        self.files.sync().await?;
        drop(taken);
        self.make_clean().await
    }

    /// Allocates the data clusters and tables of the bitmaps whose bits changed (all-zero
    /// chunks need no cluster, as QEMU stores them) and lays out the new directory.
    fn allocate_bitmaps(&self, taken: &mut Taken<'_>, edited: Vec<Edited>) -> Result<Layout> {
        let cs = self.cluster_size();
        let geo = self.geo;
        let mut writes = Vec::new();
        let mut directory = Vec::new();
        for b in edited {
            let mut entry = b.entry;
            let Some(data) = b.data else {
                directory.push(entry);
                continue;
            };
            let mut table = Vec::new();
            for chunk in data.chunks(cs as usize) {
                if chunk.iter().all(|&x| x == 0) {
                    table.extend_from_slice(&0u64.to_be_bytes());
                    continue;
                }
                let off = geo.cluster_offset(taken.allocate(self.store(), 1)?).0;
                let mut full = chunk.to_vec();
                full.resize(cs as usize, 0);
                writes.push((off, full));
                table.extend_from_slice(&off.to_be_bytes());
            }
            let clusters = (table.len() as u64).div_ceil(cs);
            entry.table_offset = geo
                .cluster_offset(taken.allocate(self.store(), clusters)?)
                .0;
            entry.table_size = (table.len() / 8) as u32;
            table.resize((clusters * cs) as usize, 0);
            writes.push((entry.table_offset, table));
            directory.push(entry);
        }
        Ok(Layout { writes, directory })
    }

    /// The host offsets of a bitmap's table clusters and data clusters.
    async fn bitmap_clusters(&self, e: &BitmapDirectoryEntry) -> Result<Vec<u64>> {
        let cs = self.cluster_size();
        let len = u64::from(e.table_size) * 8;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut out: Vec<u64> = (0..len.div_ceil(cs))
            .map(|i| e.table_offset + i * cs)
            .collect();
        let raw =
            crate::aligned::read_bytes(self.files.image(), e.table_offset, len, "bitmap table")
                .await?;
        for i in 0..e.table_size as usize {
            let t = qcow2_format::BitmapTableEntry::read(&raw, i);
            if let Ok(Ok(off)) = t.decode(cs) {
                out.push(off.0);
            }
        }
        Ok(out)
    }
}
