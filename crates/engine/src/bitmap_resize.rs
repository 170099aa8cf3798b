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
use crate::tracking::Ctx;
use crate::{ResizeError, Result};
use blockio::Opener;
use qcow2_format::{features, BitmapDirectoryEntry as D};

/// The bitmaps of a resize under way.
pub(crate) struct ResizingBitmaps {
    /// The directory as it was before.
    old: Vec<D>,
    /// The bits of the bitmaps not maintained (read from the file at the old size), by
    /// directory index; None for the maintained ones, taken from memory at the end.
    read: Vec<Option<Vec<u8>>>,
}

impl<O: Opener> Image<O> {
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
