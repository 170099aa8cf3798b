//! Vectored requests: one guest range, several buffers, each buffer's window the next bytes
//! of the range (a virtio descriptor chain, an `iovec`). The buffers are used as they are,
//! without a gather copy: each is a request of its own on its part of the range, all in
//! flight at once.

use crate::image::Image;
use crate::options::WriteFlags;
use crate::{Error, Result};
use blockio::{IoBuf, Opener};

/// The outcome of a vectored request, and the buffers back in their order.
pub type VectoredResult = (Result<()>, Vec<IoBuf>);

impl<O: Opener> Image<O> {
    /// Reads guest `[offset, offset + total)` into the buffers' windows in order, `total`
    /// being the sum of their lengths; as [`Image::read_at`] on each part, all in flight at
    /// once. The first error (in buffer order) is the result; the other buffers may have
    /// been filled.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::read_at`]: dropping the future abandons the reads and changes nothing.
    pub async fn read_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> VectoredResult {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if let Err(e) = Error::check_range(offset, total, self.size()) {
            return (Err(e), bufs);
        }
        let parts = at_offsets(bufs, offset).map(|(b, o)| self.read_at(b, o));
        first_error(futures::future::join_all(parts).await)
    }

    /// Writes the buffers' windows in order at guest `offset`: as [`Image::write_at`] on
    /// each part, all in flight at once, then (with [`WriteFlags::FUA`] or a write-through
    /// image) one flush for them all. The first error (in buffer order) is the result;
    /// parts may have been written (as with one failed write).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at_with`]: each guest cluster of the range reads its old data or
    /// the new; nothing else is affected.
    pub async fn write_vectored_at(
        &self,
        bufs: Vec<IoBuf>,
        offset: u64,
        flags: WriteFlags,
    ) -> VectoredResult {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if let Err(e) = self.check_writable(offset, total) {
            return (Err(e), bufs);
        }
        let parts = at_offsets(bufs, offset).map(|(b, o)| self.write_acked(b, o));
        let (res, bufs) = first_error(futures::future::join_all(parts).await);
        match res {
            Ok(()) => (self.durable_if(flags.fua).await, bufs),
            Err(e) => (Err(e), bufs),
        }
    }
}

/// Each buffer with the guest offset its window starts at.
fn at_offsets(bufs: Vec<IoBuf>, offset: u64) -> impl Iterator<Item = (IoBuf, u64)> {
    let mut next = offset;
    bufs.into_iter().map(move |b| {
        let at = next;
        next += b.len() as u64;
        (b, at)
    })
}

/// The first error of `results`, and their buffers in order.
fn first_error(results: Vec<(Result<()>, IoBuf)>) -> VectoredResult {
    let mut first = Ok(());
    let mut bufs = Vec::with_capacity(results.len());
    for (res, buf) in results {
        if let (Ok(()), Err(e)) = (&first, res) {
            first = Err(e);
        }
        bufs.push(buf);
    }
    (first, bufs)
}
