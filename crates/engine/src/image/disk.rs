//! [`Disk`]: an image of either format, what a backing chain is made of and what `qimg`
//! opens when the format is given or probed, with its dispatch to the qcow2 [`Image`] or
//! the raw file.

use super::Image;
use crate::aligned::{read_buf, read_data, write_unaligned};
use crate::files::FlushState;
use crate::options::{ImageFormat, ImageOptions, Preallocation, ResizeOptions, WriteFlags};
use crate::WriteResult;
use crate::{Error, ResizeError, Result};
use blockio::{Backend, IoBuf, Keep, Opener};
use std::path::{Path, PathBuf};

/// A disk image of either format: what a backing chain is made of, and what `qimg` opens
/// when the format is given or probed.
// A chain holds a handful of disks for its whole life: boxing the large variant would only add
// an indirection to every read.
#[allow(clippy::large_enum_variant)]
pub enum Disk<O: Opener> {
    /// A qcow2 image (itself possibly backed).
    Qcow2(Image<O>),
    /// A raw image.
    Raw(RawImage<O::Backend>),
}

/// A raw disk image: the file's bytes are the disk.
pub struct RawImage<B> {
    pub(crate) backend: B,
    pub(crate) path: PathBuf,
    /// The size (see [`RawImage::size`]); a resize changes it.
    pub(crate) size: std::sync::atomic::AtomicU64,
    pub(crate) flushes: FlushState,
    /// Each write is flushed before it completes ([`crate::CacheMode::writes_through`]).
    pub(crate) write_through: bool,
}

impl<B: blockio::Backend> RawImage<B> {
    /// `res`, a write's outcome, once a successful write is flushed if `fua` asks for it
    /// or the disk writes through.
    async fn durable_after(&self, res: Result<()>, fua: bool) -> Result<()> {
        res?;
        if fua || self.write_through {
            self.flushes.flush(&self.backend, &self.path).await?;
        }
        Ok(())
    }
}

impl<B> RawImage<B> {
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size: the file's length when it was opened (or resized), rounded up to a
    /// multiple of 512 bytes as QEMU does.
    pub fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    fn no_vm_state(&self) -> Error {
        Error::Unsupported {
            path: self.path.clone(),
            what: "a VM state area (raw images have none)".into(),
        }
    }
}

impl<B: Backend> RawImage<B> {
    async fn resize(&self, new_size: u64, options: ResizeOptions) -> Result<()> {
        use std::sync::atomic::Ordering;
        let old = self.size();
        if new_size < old && !options.shrink {
            return Err(ResizeError::ShrinkNotAllowed {
                size: old,
                new_size,
            }
            .into());
        }
        let err = |e| Error::io(format!("{}: resizing", self.path.display()), e);
        let len = self.backend.len().await.map_err(err)?;
        match options.preallocation {
            Preallocation::Metadata => {
                return Err(ResizeError::UnsupportedPreallocation(Preallocation::Metadata).into())
            }
            p if p != Preallocation::Off && new_size < len => {
                return Err(ResizeError::PreallocationShrink.into())
            }
            Preallocation::Falloc => self.backend.preallocate(new_size, Keep::none()).await,
            Preallocation::Full => {
                let mut res = Ok(());
                let mut pos = len;
                while pos < new_size && res.is_ok() {
                    let n = (new_size - pos).min(1 << 20);
                    res = self.backend.write_at(IoBuf::new(n as usize), pos).await.0;
                    pos += n;
                }
                res
            }
            _ => self.backend.set_len(new_size).await,
        }
        .map_err(err)?;
        self.flushes.flush(&self.backend, &self.path).await?;
        self.size
            .store(new_size.div_ceil(512) * 512, Ordering::Release);
        Ok(())
    }
}

impl<O: Opener> Disk<O> {
    /// Opens `path` as `format`, probing the format when `None` (a file starting with the
    /// qcow2 magic is qcow2, anything else raw).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::open`]: dropping the future closes whatever it opened and writes nothing.
    pub async fn open(
        opener: O,
        path: impl AsRef<Path>,
        format: Option<ImageFormat>,
        options: ImageOptions,
    ) -> Result<Self> {
        let mut chain = Vec::new();
        Image::open_disk(
            &opener,
            path.as_ref(),
            format,
            &options,
            &mut chain,
            "image",
        )
        .await
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        match self {
            Disk::Qcow2(i) => i.path(),
            Disk::Raw(r) => r.path(),
        }
    }

    /// Its format.
    pub fn format(&self) -> ImageFormat {
        match self {
            Disk::Qcow2(_) => ImageFormat::Qcow2,
            Disk::Raw(_) => ImageFormat::Raw,
        }
    }

    /// Its virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(i) => i.size(),
            Disk::Raw(r) => r.size(),
        }
    }

    /// The qcow2 image, if it is one.
    pub fn as_qcow2(&self) -> Option<&Image<O>> {
        match self {
            Disk::Qcow2(i) => Some(i),
            Disk::Raw(_) => None,
        }
    }

    /// The image below this one, if any.
    pub fn backing(&self) -> Option<&Disk<O>> {
        self.as_qcow2().and_then(|i| i.backing())
    }

    /// Reads into the buffer's window from `offset` (see [`Image::read_at`]); a raw image
    /// reads zeros past its end.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::read_at`]: the read is abandoned, nothing changes.
    pub async fn read_at(&self, buf: IoBuf, offset: u64) -> crate::ReadResult {
        let range = buf.window();
        self.read_into(buf, range, offset).await
    }

    /// Reads `len` bytes at `offset` into a new buffer (a raw image reads zeros past its
    /// end).
    ///
    /// # Errors
    ///
    /// As [`Image::read`]: [`Error::RequestTooLarge`] for a length longer than any buffer,
    /// [`Error::OutOfRange`] for a range past the end of a qcow2 image, both before
    /// anything is allocated; then those of [`Disk::read_at`].
    ///
    /// # Cancel safety
    ///
    /// As [`Image::read_at`]: the read is abandoned, nothing changes.
    pub async fn read(&self, offset: u64, len: u64) -> Result<IoBuf> {
        let size = match self {
            Disk::Qcow2(img) => Some(img.size()),
            Disk::Raw(_) => None,
        };
        let buf = read_buf(offset, len, size)?;
        let (res, buf) = self.read_at(buf, offset).await;
        res.map(|()| buf)
    }

    pub(crate) async fn read_into(
        &self,
        buf: IoBuf,
        range: std::ops::Range<usize>,
        offset: u64,
    ) -> crate::ReadResult {
        match self {
            Disk::Qcow2(img) => img.read_into(buf, range, offset).await,
            Disk::Raw(raw) => {
                let (res, buf) = read_data(&raw.backend, buf, range, offset, Keep::none()).await;
                (
                    res.map_err(|e| Error::io(format!("{}: reading", raw.path.display()), e)),
                    buf,
                )
            }
        }
    }
}

impl<O: Opener> Disk<O> {
    /// Writes the buffer's window at `offset` (see [`Image::write_at`]).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at`]; on a raw image, the range reads old or new data.
    pub async fn write_at(&self, buf: IoBuf, offset: u64) -> WriteResult {
        self.write_at_with(buf, offset, WriteFlags::default()).await
    }

    /// [`Disk::write_at`] with flags (see [`Image::write_at_with`]); on a raw image, FUA
    /// flushes the file after the write.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at_with`].
    pub async fn write_at_with(&self, buf: IoBuf, offset: u64, flags: WriteFlags) -> WriteResult {
        match self {
            Disk::Qcow2(img) => img.write_at_with(buf, offset, flags).await,
            Disk::Raw(raw) => {
                let len = buf.len() as u64;
                if let Err(e) = Error::check_range(offset, len, raw.size()) {
                    return (Err(e), buf);
                }
                let window = buf.window();
                let res = write_unaligned(&raw.backend, &buf, offset, Keep::none()).await;
                let mut buf = buf;
                buf.set_window(window);
                let res = res.map_err(|e| Error::io(format!("{}: write", raw.path.display()), e));
                (raw.durable_after(res, flags.fua).await, buf)
            }
        }
    }

    /// Writes the buffer's window compressed at `offset` (see [`Image::write_compressed`]).
    ///
    /// # Errors
    ///
    /// As [`Image::write_compressed`]; a raw disk refuses with
    /// [`CompressedRefusal::Raw`](crate::CompressedRefusal::Raw).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_compressed`].
    pub async fn write_compressed(&self, buf: IoBuf, offset: u64) -> WriteResult {
        match self {
            Disk::Qcow2(img) => img.write_compressed(buf, offset).await,
            Disk::Raw(_) => (
                Err(Error::CompressedWrite {
                    offset,
                    reason: crate::CompressedRefusal::Raw,
                }),
                buf,
            ),
        }
    }

    /// See [`Image::vm_state_write_at`]; a raw disk has no VM state area
    /// ([`Error::Unsupported`]).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::vm_state_write_at`].
    pub async fn vm_state_write_at(&self, buf: IoBuf, pos: u64) -> WriteResult {
        match self {
            Disk::Qcow2(img) => img.vm_state_write_at(buf, pos).await,
            Disk::Raw(raw) => (Err(raw.no_vm_state()), buf),
        }
    }

    /// See [`Image::vm_state_read_at`]; a raw disk has no VM state area
    /// ([`Error::Unsupported`]).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::vm_state_read_at`].
    pub async fn vm_state_read_at(&self, buf: IoBuf, pos: u64) -> crate::ReadResult {
        match self {
            Disk::Qcow2(img) => img.vm_state_read_at(buf, pos).await,
            Disk::Raw(raw) => (Err(raw.no_vm_state()), buf),
        }
    }

    /// See [`Image::write_zeroes`].
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_zeroes`].
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        match self {
            Disk::Qcow2(img) => img.write_zeroes(offset, len, may_unmap).await,
            Disk::Raw(raw) => {
                let res = raw
                    .backend
                    .write_zeroes(offset, len, Keep::none())
                    .await
                    .map_err(|e| Error::io(format!("{}: write zeroes", raw.path.display()), e));
                raw.durable_after(res, false).await
            }
        }
    }

    /// See [`Image::discard`]; on a raw image, punches a hole.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::discard`].
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Disk::Qcow2(img) => img.discard(offset, len).await,
            Disk::Raw(raw) => raw
                .backend
                .punch_hole(offset, len, Keep::none())
                .await
                .map_err(|e| Error::io(format!("{}: discard", raw.path.display()), e)),
        }
    }

    /// See [`Image::flush`].
    ///
    /// # Cancel safety
    ///
    /// As [`Image::flush`].
    pub async fn flush(&self) -> Result<()> {
        match self {
            Disk::Qcow2(img) => img.flush().await,
            Disk::Raw(raw) => raw.flushes.flush(&raw.backend, &raw.path).await,
        }
    }

    /// Resizes the disk to `new_size` bytes (see [`Image::resize`]); a raw image's file is
    /// cut or extended to that length, as QEMU's file driver does (`falloc` reserves the
    /// storage of what is added, `full` writes zeros over it; `metadata` does not apply), and
    /// then flushed.
    ///
    /// # Errors
    ///
    /// As [`Image::resize`]; for a raw image: [`ResizeError::ShrinkNotAllowed`] and
    /// [`ResizeError::PreallocationShrink`] as for qcow2,
    /// [`ResizeError::UnsupportedPreallocation`] for `metadata`, [`Error::Io`] when the file
    /// cannot be changed. Sizes need not be multiples of 512 (the size reads as the length
    /// rounded up to one, as QEMU has it).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::resize`]; for a raw image, dropping the future leaves the file at its old
    /// length or the new one (a `full` resize: part of the zeros written).
    pub async fn resize(&self, new_size: u64, options: ResizeOptions) -> Result<()> {
        match self {
            Disk::Qcow2(img) => img.resize(new_size, options).await,
            Disk::Raw(raw) => raw.resize(new_size, options).await,
        }
    }

    /// See [`Image::close`].
    ///
    /// # Cancel safety
    ///
    /// As [`Image::close`].
    pub async fn close(self) -> Result<()> {
        match self {
            Disk::Qcow2(img) => img.close().await,
            raw @ Disk::Raw(_) => raw.flush().await,
        }
    }
}
