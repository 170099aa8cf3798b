//! The files under an image (layer 3): the image file and the external data file, their
//! flushes, and the image file's length as this session makes it, growing ahead of the
//! allocations.
//!
//! Knows backends and paths, nothing of qcow2's metadata; every layer above reaches the files
//! through [`Files`].

use crate::{Error, Result};
use blockio::{Backend, Keep};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The file grows ahead of the allocations by an eighth of its length, within these bounds.
const GROWTH_MIN: u64 = 1 << 20;
const GROWTH_MAX: u64 = 64 << 20;

/// The image file and its data file.
pub(crate) struct Files<B> {
    path: PathBuf,
    image: B,
    /// The image file's flushes.
    flushes: FlushState,
    data: Option<DataFile<B>>,
    /// The end of the image file as far as valid references go: allocations extend it before
    /// anything refers to their clusters.
    len: AtomicU64,
    /// The image file's length as this session made it: it grows ahead of the allocations
    /// ([`Files::grow_for`]), so that writes to new clusters overwrite reserved blocks.
    grown: AtomicU64,
    /// Serialises the growth of the file (one `preallocate` at a time).
    growth: async_lock::Mutex<()>,
    /// The length the file had at open (or a shrink cut it to): close trims the growth made
    /// ahead, never below this.
    opened_len: AtomicU64,
}

impl<B: Backend> Files<B> {
    /// The image file at `path` (`len` bytes long) and its data file.
    pub(crate) fn new(path: &Path, image: B, len: u64, data: Option<DataFile<B>>) -> Self {
        Files {
            path: path.into(),
            flushes: FlushState::new(&image),
            image,
            data,
            len: AtomicU64::new(len),
            grown: AtomicU64::new(len),
            growth: async_lock::Mutex::new(()),
            opened_len: AtomicU64::new(len),
        }
    }

    /// The image file's path, as opened.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The image file.
    pub(crate) fn image(&self) -> &B {
        &self.image
    }

    /// Replaces the image file (opened again for writing, for a repair).
    pub(crate) fn replace_image(&mut self, image: B) {
        self.flushes = FlushState::new(&image).skipping(self.flushes.skip);
        self.image = image;
    }

    /// Flushes of the files do not reach the disk ([`crate::CacheMode::Unsafe`]).
    pub(crate) fn skip_flushes(&mut self, yes: bool) {
        self.flushes.skip = yes;
        if let Some(d) = &mut self.data {
            d.flushes.skip = yes;
        }
    }

    /// The external data file, if the image has one.
    pub(crate) fn data(&self) -> Option<&DataFile<B>> {
        self.data.as_ref()
    }

    /// The backend guest data lives in: the data file when `data_file` and there is one.
    pub(crate) fn backend(&self, data_file: bool) -> &B {
        match (&self.data, data_file) {
            (Some(d), true) => &d.backend,
            _ => &self.image,
        }
    }

    /// The known end of the image file.
    pub(crate) fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// The file now ends at least at `end` (clusters were allocated up to there).
    pub(crate) fn extend_len(&self, end: u64) {
        self.len.fetch_max(end, Ordering::AcqRel);
    }

    /// Flushes the image file and the data file; after a failed flush of a file written
    /// through the page cache, every later one fails too (see [`FlushState`]).
    pub(crate) async fn sync(&self) -> Result<()> {
        self.flushes.flush(&self.image, &self.path).await?;
        if let Some(d) = &self.data {
            d.flushes.flush(&d.backend, &d.path).await?;
        }
        Ok(())
    }

    /// Makes the image file at least `end` bytes long, growing it ahead by a chunk (an
    /// eighth of its length, 1 to 64 MiB) reserved with [`Backend::preallocate`], in whole
    /// clusters of `cluster_size`: a write to a new cluster then overwrites reserved blocks
    /// instead of extending the file, which file systems serialise (ext4 takes the inode lock
    /// exclusively and O_DIRECT loses its concurrency). The growth reads as zeros, and a
    /// crash leaves it as free space. The preallocation carries `keep`.
    pub(crate) async fn grow_for(&self, end: u64, cluster_size: u64, keep: Keep) -> Result<()> {
        if self.grown.load(Ordering::Acquire) >= end {
            return Ok(());
        }
        let _growing = self.growth.lock().await;
        let cur = self.grown.load(Ordering::Acquire);
        if cur >= end {
            return Ok(());
        }
        let target = (end + (cur / 8).clamp(GROWTH_MIN, GROWTH_MAX)).next_multiple_of(cluster_size);
        self.image
            .preallocate(target, keep)
            .await
            .map_err(|e| Error::io(format!("{}: growing the file", self.path.display()), e))?;
        self.grown.store(target, Ordering::Release);
        Ok(())
    }

    /// Cuts the image file at `len` (a shrink: nothing at or past it is referenced any more,
    /// and no I/O on it is in flight). The growth made ahead goes with it.
    pub(crate) async fn truncate(&self, len: u64) -> Result<()> {
        let _growing = self.growth.lock().await;
        self.image
            .set_len(len)
            .await
            .map_err(|e| Error::io(format!("{}: truncating the file", self.path.display()), e))?;
        self.len.store(len, Ordering::Release);
        self.grown.store(len, Ordering::Release);
        self.opened_len.fetch_min(len, Ordering::AcqRel);
        Ok(())
    }

    /// Gives back the growth made ahead and not used: the file ends at `used` (never shorter
    /// than it was at open).
    pub(crate) async fn trim_growth(&self, used: u64) -> Result<()> {
        let used = used.max(self.opened_len.load(Ordering::Acquire));
        if self.grown.load(Ordering::Acquire) <= used {
            return Ok(());
        }
        self.image
            .set_len(used)
            .await
            .map_err(|e| Error::io(format!("{}: trimming the file", self.path.display()), e))?;
        self.grown.store(used, Ordering::Release);
        Ok(())
    }
}

/// A file's flushes, failing for good after one failed on a file written through the page
/// cache, as QEMU's file-posix does (`page_cache_inconsistent`): Linux may drop the dirty
/// pages a failed fsync covered and report that once, so a later fsync would succeed without
/// them. With O_DIRECT the data never waited in the page cache, and a later flush may succeed.
///
/// A flush whose future was dropped still fails in the backend, unseen: every flush compares
/// the backend's count of failed flushes ([`Backend::flush_failures`]) with the count it has
/// accounted for, and fails (as if it had failed itself) when another flush failed since.
pub(crate) struct FlushState {
    /// Flushes succeed without reaching the file ([`crate::CacheMode::Unsafe`]).
    skip: bool,
    broken: std::sync::atomic::AtomicBool,
    /// Failed flushes of the file accounted for.
    seen: AtomicU64,
}

impl FlushState {
    /// The flushes of `backend`, accounting for the failures it had before.
    pub(crate) fn new<B: Backend>(backend: &B) -> Self {
        FlushState {
            skip: false,
            broken: Default::default(),
            seen: AtomicU64::new(backend.flush_failures()),
        }
    }

    /// The same, with flushes that do not reach the file when `yes`.
    pub(crate) fn skipping(mut self, yes: bool) -> Self {
        self.skip = yes;
        self
    }

    /// Flushes `backend` (the file at `path`).
    pub(crate) async fn flush<B: Backend>(&self, backend: &B, path: &Path) -> Result<()> {
        if self.skip {
            return Ok(());
        }
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::io(
                format!(
                    "{}: flush: an earlier flush failed, so writes made through the page cache \
                     may have been lost; reopen the image",
                    path.display()
                ),
                std::io::Error::from_raw_os_error(EIO),
            ));
        }
        let res = backend.flush().await;
        let failures = backend.flush_failures();
        let unseen = self.seen.fetch_max(failures, Ordering::AcqRel) < failures;
        let what = match (&res, unseen) {
            (Ok(()), true) => "flush: an earlier flush, whose caller went away, failed",
            _ => "flush",
        };
        let res = match res {
            Ok(()) if unseen => Err(std::io::Error::from_raw_os_error(EIO)),
            r => r,
        };
        res.map_err(|e| {
            if backend.alignment() <= 1 {
                self.broken.store(true, Ordering::Release);
            }
            Error::io(format!("{}: {what}", path.display()), e)
        })
    }
}

/// EIO (5 on every Unix), the errno of every flush after a failed one.
const EIO: i32 = 5;

/// An external data file.
pub(crate) struct DataFile<B> {
    pub(crate) backend: B,
    pub(crate) path: PathBuf,
    pub(crate) flushes: FlushState,
}

impl<B: Backend> DataFile<B> {
    /// The data file `backend` at `path`.
    pub(crate) fn new(backend: B, path: PathBuf) -> Self {
        DataFile {
            flushes: FlushState::new(&backend),
            backend,
            path,
        }
    }
}
