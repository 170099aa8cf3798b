//! Resizing the persistent dirty bitmaps with the disk, as QEMU does (docs/DESIGN.md,
//! "Resizing"): every bitmap, enabled or not, is kept and truncated to the new size (a grow
//! adds clear bits, a shrink drops those past the new end), then stored with tables sized
//! for the new disk.
//!
//! In crash order: before the resize changes anything, every bitmap is marked `in_use` in
//! place (durable), so that a crash while the disk size and the bitmap tables disagree leaves
//! them inconsistent, which QEMU accepts whatever their size; after the new size is on disk
//! they are stored anew through `bitmap_edit`'s writer (new clusters counted and durable,
//! then the header names the new directory, then the old structures are freed): the disabled
//! ones clean, the maintained ones still `in_use` (they are maintained until close, as after
//! the first write of any open).

use crate::bitmap_edit::Edited;
use crate::image::Image;
use crate::options::ResizeOptions;
use crate::tracking::Ctx;
use crate::{Error, ResizeError, Result};
use blockio::Opener;
use qcow2_format::{features, BitmapDirectoryEntry as D};
use std::sync::atomic::Ordering;

/// The bitmaps of a resize under way.
pub(crate) struct ResizingBitmaps {
    /// The directory as it was before.
    old: Vec<D>,
    /// The bits of the bitmaps not maintained (read from the file at the old size), by
    /// directory index; None for the maintained ones, taken from memory at the end.
    read: Vec<Option<Vec<u8>>>,
}

impl<O: Opener> Image<O> {
    /// Resizes the virtual disk to `new_size` bytes, as `qemu-img resize` does.
    ///
    /// **Growing** adds zeros at the end: the L1 table grows if the new size needs more L2
    /// tables (a new table is written and counted before the header names it, and the old
    /// one is freed afterwards), the new area gets what [`ResizeOptions::preallocation`]
    /// asks for (`metadata`: L2 tables and data clusters allocated, the file extended
    /// sparsely; `falloc`: the data area reserved too; `full`: zeros written over it), and
    /// where a backing file reaches past the old end the new area is made to read as zeros.
    ///
    /// **Shrinking** (only with [`ResizeOptions::shrink`]) deletes everything past the new
    /// end: the clusters there are deallocated (QEMU's full discard), the L2 tables past it
    /// freed, and the file cut after the last cluster still in use. As with QEMU, the part of
    /// the last cluster past a new end that is not cluster-aligned keeps its bytes, and a
    /// later grow shows them again.
    ///
    /// **Persistent dirty bitmaps**, enabled or not, are kept and resized with the disk, as
    /// QEMU does: a grow adds clear bits, a shrink drops those past the new end. They are
    /// marked in use on disk before anything changes and stored anew, with tables for the
    /// new size, once the new size is on disk (see docs/DESIGN.md, "Resizing"); the enabled
    /// ones go on recording writes.
    ///
    /// The new size is written to the header last and made durable before this returns;
    /// with it, every metadata change made so far. Requests may run meanwhile: those past a
    /// new, smaller end fail with [`Error::OutOfRange`] once the shrink has begun, and a read
    /// already in flight on a cluster the shrink frees keeps that cluster (it is freed, and
    /// the file cut, only once no I/O is in flight on it). The area a grow adds is usable
    /// once this returns.
    ///
    /// # Errors
    ///
    /// - [`Error::Resize`] when the size is refused before anything changes (the variants
    ///   of [`ResizeError`], with QEMU's messages): a shrink without
    ///   [`ResizeOptions::shrink`], a size that is not a multiple of 512, a version 2 image
    ///   with snapshots, a persistent bitmap left in use by a crash (inconsistent) or of a
    ///   kind this engine cannot store, preallocation with a shrink, an
    ///   L1 table beyond QEMU's limit, a version 2 image whose backing file reaches past the
    ///   old end;
    /// - [`Error::ReadOnly`], [`Error::MarkedCorrupt`] for an image that cannot be written;
    /// - [`Error::Io`] when a write or flush fails midway, and [`Error::Corrupt`] when the
    ///   metadata it walks is (the image is then marked corrupt, as for any request). What
    ///   was done stays done, in the crash-safe order: at worst clusters leak.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the resize between two of its steps, each consistent: the
    /// metadata written so far was written in the crash-safe order (a new L1 table is in use
    /// only once the header names it; clusters are freed only by write-backs), and a write
    /// the backend accepted still lands before any later metadata write of this image. The
    /// size on disk is still the old one. A dropped grow leaves the size as it was (part of
    /// the new area may already be prepared); a dropped shrink leaves the image at the new
    /// size in memory, with part of what lay past it deallocated: resizing again finishes
    /// either. Persistent bitmaps are then left marked in use on disk, and kept so at close
    /// (inconsistent, as after a crash: a further resize refuses them), or, if the drop came
    /// while they were being stored, stored for the new size but no longer maintained by this
    /// open (a further resize is refused with [`ResizeError::BitmapsNotLoaded`]).
    pub async fn resize(&self, new_size: u64, options: ResizeOptions) -> Result<()> {
        let _one_at_a_time = self.resizing.lock().await;
        // No snapshot operation runs meanwhile (see `Image::writers`).
        let _writer = self.writers.token().await;
        match self.resize_inner(new_size, options).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.on_error(e).await),
        }
    }

    async fn resize_inner(&self, new_size: u64, options: ResizeOptions) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.marked_corrupt.load(Ordering::Acquire) {
            return Err(Error::MarkedCorrupt(self.path().to_path_buf()));
        }
        let old = self.size();
        let bitmaps = self.bitmaps_refusal().await;
        self.refuse(old, new_size, options, bitmaps)?;
        // The size on disk: a shrink dropped midway leaves it above the size in memory.
        let on_disk = self.meta.lock().await.header.size;
        if new_size == old && new_size == on_disk {
            return Ok(());
        }
        self.before_first_write().await?;
        let bitmaps = self.bitmaps_before_resize().await?;
        if new_size < on_disk {
            self.shrink(on_disk, new_size).await?;
        } else {
            self.grow(on_disk, new_size, options.preallocation).await?;
        }
        match bitmaps {
            Some(b) => self.bitmaps_after_resize(b).await,
            None => Ok(()),
        }
    }

    /// What QEMU's `qcow2_truncate_bitmaps_check` refuses: a bitmap left `in_use` by a crash
    /// (inconsistent), bitmaps that are not loaded; and bitmaps of a kind this engine
    /// cannot store. Bitmaps whose autoclear bit is clear are ignored, as QEMU ignores them.
    pub(crate) async fn bitmaps_refusal(&self) -> Result<(), ResizeError> {
        let guard = self.tracked.lock().await;
        let Some(b) = guard.as_ref() else {
            let meta = self.meta.lock().await;
            let ignored = meta.header.autoclear_features & features::AUTOCLEAR_BITMAPS == 0;
            if meta.header.bitmaps().is_some() && !ignored {
                return Err(ResizeError::BitmapsNotLoaded);
            }
            return Ok(());
        };
        for (i, e) in b.directory().iter().enumerate() {
            let maintained = b.tracked_bits(i).is_some();
            if e.flags & D::IN_USE != 0 && !maintained {
                return Err(ResizeError::InconsistentBitmap(e.name.clone()));
            }
            let extra_ok = e.extra_data.is_empty() || e.flags & D::EXTRA_DATA_COMPATIBLE != 0;
            if e.bitmap_type != D::TYPE_DIRTY_TRACKING || !extra_ok {
                return Err(ResizeError::UnsupportedBitmap(e.name.clone()));
            }
        }
        Ok(())
    }

    /// Before a resize changes anything (after [`bitmaps_refusal`](Self::bitmaps_refusal)):
    /// reads the bits of the bitmaps not maintained and marks every bitmap `in_use` on disk.
    /// None without bitmaps to resize.
    pub(crate) async fn bitmaps_before_resize(&self) -> Result<Option<ResizingBitmaps>> {
        let mut guard = self.tracked.lock().await;
        let Some(b) = guard.as_mut() else {
            return Ok(None);
        };
        let old = b.directory().to_vec();
        if old.is_empty() {
            return Ok(None);
        }
        let size = self.meta.lock().await.header.size;
        let mut read = Vec::with_capacity(old.len());
        for (i, e) in old.iter().enumerate() {
            read.push(match b.tracked_bits(i) {
                Some(_) => None,
                None => Some(
                    crate::tracking::read_bitmap_data(
                        self.files.image(),
                        self.path(),
                        e,
                        self.cluster_size(),
                        size,
                    )
                    .await?,
                ),
            });
        }
        self.bitmap_ctx().mark_all_in_use(b).await?;
        Ok(Some(ResizingBitmaps { old, read }))
    }

    /// Once the new size is on disk: every bitmap truncated to it and stored anew, and the
    /// enabled ones maintained again from their new structures. Nothing is maintained while
    /// this runs (writes wait for the bitmaps' lock); a drop midway leaves nothing
    /// maintained, and the bitmaps on disk old and `in_use`, or new.
    pub(crate) async fn bitmaps_after_resize(&self, r: ResizingBitmaps) -> Result<()> {
        let mut guard = self.tracked.lock().await;
        let Some(b) = guard.take() else {
            return Ok(());
        };
        let size = self.size();
        let mut edited = Vec::with_capacity(r.old.len());
        for (i, (e, read)) in r.old.iter().zip(r.read).enumerate() {
            let maintained = b.tracked_bits(i);
            let mut bits = match (maintained, read) {
                (Some(d), _) => d.to_vec(),
                (None, Some(d)) => d,
                (None, None) => Vec::new(),
            };
            fit(&mut bits, size, e.granularity_bits);
            let mut entry = e.clone();
            if maintained.is_some() {
                entry.flags |= D::IN_USE;
            } else {
                entry.flags &= !D::IN_USE;
            }
            edited.push(Edited::changed(entry, bits));
        }
        drop(b);
        let geo = self.geo;
        {
            // The old directory is freed by the store: no longer metadata to guard.
            let mut meta = self.meta.lock().await;
            if let Some(ext) = meta.header.bitmaps() {
                let (off, len) = (ext.directory_offset, ext.directory_size);
                meta.metadata.remove_range(&geo, off, len);
            }
        }
        self.store_bitmaps(&r.old, edited).await?;
        let header = self.meta.lock().await.header.clone();
        let ctx = Ctx {
            store: self.store(),
            meta: &self.meta,
            header: &header,
            bitmaps: &self.tracked,
        };
        *guard = ctx.reload_bitmaps().await?;
        Ok(())
    }
}

/// Truncates or extends `bits` to a disk of `size` bytes (granules of `2^granularity_bits`),
/// clearing the bits past its last granule, as QEMU's `hbitmap_truncate` does.
fn fit(bits: &mut Vec<u8>, size: u64, granularity_bits: u8) {
    let granules = size.div_ceil(1u64 << granularity_bits);
    bits.resize(granules.div_ceil(8) as usize, 0);
    if granules % 8 != 0 {
        if let Some(last) = bits.last_mut() {
            *last &= (1u8 << (granules % 8)) - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn fit_truncates_and_clears_past_the_end() {
        let mut b = vec![0xff, 0xff];
        fit(&mut b, 11 * 512, 9);
        assert_eq!(b, [0xff, 0x07]);
        fit(&mut b, 40 * 512, 9);
        assert_eq!(b, [0xff, 0x07, 0, 0, 0]);
        fit(&mut b, 512, 9);
        assert_eq!(b, [0x01]);
    }
}
