//! Writing an image's own data into its backing file, or the data of the images above a
//! deeper one into that one (`qemu-img commit [-b BASE]`).
//!
//! Every range the image (or the chain above the base) allocates is written into the
//! backing file (data as data, zero clusters as write-zeroes), and the backing file is
//! flushed; then, unless asked to keep it, the image is emptied (QEMU's `bdrv_make_empty`:
//! every cluster deallocated, so that reads fall through to the backing file, which now
//! holds the same data). A crash before the emptying is durable leaves the data in both (the
//! same contents); the image reads its own clusters until their deallocation lands.

use crate::image::{Disk, Image};
use crate::{ExtentKind, ResizeOptions, Result};
use blockio::Opener;

/// The bytes looked at (and copied) per step of a commit.
const STEP: u64 = 1 << 20;

impl<O: Opener> Image<O> {
    /// Writes what this image allocates into `base` (its backing file, opened for writing by
    /// the caller: the image itself should be opened without its backing chain) and flushes
    /// `base` (grown to this image's size first if smaller); then, with `empty`, deallocates
    /// every cluster of the image, as `qemu-img commit` does (`-d` keeps them). After each
    /// step of the copy, `progress` is called with the bytes looked at so far and the bytes
    /// to look at in all (for `-p`).
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`](crate::Error::ReadOnly) (of either); I/O errors. A failure leaves
    /// both consistent: what was committed reads the same through the chain.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the copy between writes; the image is emptied only after
    /// everything was copied and `base` flushed, so the chain reads the same either way.
    pub async fn commit_into(
        &self,
        base: &Disk<O>,
        empty: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        self.commit_chain_into(&[], base, empty, progress).await
    }

    /// [`Image::commit_into`] through intermediate images (`qemu-img commit -b` naming an
    /// image deeper in the chain): writes what the chain from this image down to the last
    /// of `between` allocates into `base`, each range as the topmost layer that allocates it
    /// has it, and flushes `base`; then, with `empty`, empties this image (not `between`).
    /// `progress` as for [`Image::commit_into`].
    ///
    /// `between` are the images below this one and above `base`, in chain order, each
    /// opened alone (without its backing chain; read-only is enough), as is this image; a
    /// range past the end of a layer shorter than this image reads as zeros, as in QEMU. A
    /// `base` smaller than this image is first grown to its size (QEMU's commit does so).
    ///
    /// # Errors
    ///
    /// As [`Image::commit_into`], and those of [`Disk::resize`] growing `base`.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::commit_into`]: dropping the future stops the copy between writes, and
    /// this image is emptied only after everything was copied and `base` flushed.
    pub async fn commit_chain_into(
        &self,
        between: &[&Image<O>],
        base: &Disk<O>,
        empty: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let layers: Vec<&Image<O>> = std::iter::once(self)
            .chain(between.iter().copied())
            .collect();
        let size = self.size();
        if base.size() < size {
            base.resize(size, ResizeOptions::new()).await?;
        }
        let mut off = 0;
        while off < size {
            let n = STEP.min(size - off);
            commit_step(&layers, base, off, n).await?;
            off += n;
            progress(off, size);
        }
        base.flush().await?;
        if empty {
            self.make_empty().await?;
        }
        Ok(())
    }
}

/// Copies `[off, off+len)` as the topmost of `layers` allocating each part of it has it into
/// `base`, up the guest offsets (so that `base` allocates in that order, as QEMU's does);
/// parts no layer allocates stay as `base` has them.
async fn commit_step<O: Opener>(
    layers: &[&Image<O>],
    base: &Disk<O>,
    off: u64,
    len: u64,
) -> Result<()> {
    /// What to do with a range: ask the layer at `depth`, copy from it, or write zeros.
    enum Step {
        Look(usize, u64, u64),
        Copy(usize, u64, u64),
        Zero(u64, u64),
    }
    let mut todo = vec![Step::Look(0, off, len)];
    while let Some(step) = todo.pop() {
        match step {
            Step::Zero(off, len) => base.write_zeroes(off, len, true).await?,
            Step::Copy(depth, off, len) => {
                let data = layers[depth].read(off, len).await?;
                base.write_at(data, off).await.0?;
            }
            Step::Look(depth, off, len) => {
                let Some(layer) = layers.get(depth) else {
                    continue;
                };
                let inside = len.min(layer.size().saturating_sub(off));
                let mut steps = Vec::new();
                for e in layer.block_status(off, inside).await? {
                    steps.push(match e.kind {
                        ExtentKind::Unallocated { .. } => Step::Look(depth + 1, e.offset, e.len),
                        ExtentKind::Zero { .. } => Step::Zero(e.offset, e.len),
                        ExtentKind::Data { .. } | ExtentKind::Compressed => {
                            Step::Copy(depth, e.offset, e.len)
                        }
                    });
                }
                // Past the end of a shorter layer: zeros (QEMU reads them so, and commits them).
                if inside < len {
                    steps.push(Step::Zero(off + inside, len - inside));
                }
                todo.extend(steps.into_iter().rev());
            }
        }
    }
    Ok(())
}
