//! Writing an image's own data into its backing file (`qemu-img commit`).
//!
//! Every range the image allocates is written into the backing file (data as data, zero
//! clusters as write-zeroes), and the backing file is flushed; then, unless asked to keep it,
//! the image is emptied (QEMU's `bdrv_make_empty`: every cluster deallocated, so that reads
//! fall through to the backing file, which now holds the same data). A crash before the
//! emptying is durable leaves the data in both (the same contents); the image reads its
//! own clusters until their deallocation lands.

use crate::image::{Disk, Image};
use crate::{ExtentKind, Result};
use blockio::Opener;

/// The bytes looked at (and copied) per step of a commit.
const STEP: u64 = 1 << 20;

impl<O: Opener> Image<O> {
    /// Writes what this image allocates into `base` (its backing file, opened for writing by
    /// the caller: the image itself should be opened without its backing chain) and flushes
    /// `base`; then, with `empty`, deallocates every cluster of the image, as `qemu-img
    /// commit` does (`-d` keeps them). After each step of the copy, `progress` is called
    /// with the bytes looked at so far and the bytes to look at in all (for `-p`).
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
        let size = self.size().min(base.size());
        let mut off = 0;
        while off < size {
            let n = STEP.min(size - off);
            for e in self.block_status(off, n).await? {
                match e.kind {
                    ExtentKind::Unallocated { .. } => {}
                    ExtentKind::Zero { .. } => base.write_zeroes(e.offset, e.len, true).await?,
                    ExtentKind::Data { .. } | ExtentKind::Compressed => {
                        let data = self.read(e.offset, e.len as usize).await?;
                        base.write_at(data, e.offset).await.0?;
                    }
                }
            }
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
