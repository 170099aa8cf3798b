//! The io_uring backend, on tokio-uring 0.5.

use crate::cached::CacheReads;
use crate::file::{check_direct, writes};
use crate::lock::HeldLocks;
use crate::whole::{read_whole, write_whole};
use crate::{
    punch_by_writing, sys, zero_by_punching, Backend, BufResult, IoBuf, Keep, OpenOptions, Opener,
};
use std::cell::Cell;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

// SAFETY: the pointer is the start of the window of a heap allocation owned by the IoBuf, so
// it does not move when the IoBuf does, and stays valid until the IoBuf is dropped; the window
// is initialised (the allocation is zeroed) and `len()` bytes long.
unsafe impl tokio_uring::buf::IoBuf for IoBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.len()
    }

    fn bytes_total(&self) -> usize {
        self.len()
    }
}

// SAFETY: as above; the whole window is always initialised, so `set_init` has nothing to do.
unsafe impl tokio_uring::buf::IoBufMut for IoBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }

    unsafe fn set_init(&mut self, _pos: usize) {}
}

/// Entries of the submission queue of a ring set up by [`uring_builder`].
pub const URING_SQ_ENTRIES: u32 = 4;
/// Entries of its completion queue: requests that may complete before the thread reaps them
/// (more are buffered by the kernel, at a cost).
pub const URING_CQ_ENTRIES: u32 = 4096;

/// A tokio-uring runtime builder for a storage engine: a ring whose submission queue holds
/// [`URING_SQ_ENTRIES`] requests and whose completion queue holds [`URING_CQ_ENTRIES`].
///
/// tokio-uring hands the queued requests to the kernel when the thread goes idle, or when a
/// new request finds the submission queue full. With a large queue, a thread busy with many
/// completions holds back every request it makes until it has handled them all, and the
/// device runs with fewer requests than the callers have in flight (4k random reads at
/// depth 32 on an NVMe-backed VM: ~80,000 IOPS with tokio-uring's default of 256 entries,
/// ~120,000 with 4, where fio gets ~130,000; docs/BENCHMARKS.md). A small queue sends them in
/// batches of a few; the large completion queue keeps many requests in flight.
///
/// ```no_run
/// blockio::uring_builder().start(async {
///     // open UringFiles (or an image over UringOpener) and do I/O here
/// });
/// ```
pub fn uring_builder() -> tokio_uring::Builder {
    let mut ring = tokio_uring::uring_builder();
    ring.setup_cqsize(URING_CQ_ENTRIES);
    // Completions do not interrupt the thread while it runs (as RingFile's rings): where
    // the kernel takes the flag (5.19), which a throw-away ring finds out.
    if io_uring::IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .setup_coop_taskrun()
        .build(1)
        .is_ok()
    {
        ring.setup_coop_taskrun();
    }
    let mut b = tokio_uring::builder();
    b.entries(URING_SQ_ENTRIES).uring_builder(&ring);
    b
}

/// A file doing I/O through io_uring (tokio-uring 0.5).
///
/// It is not `Send`: open and use it inside a tokio-uring runtime, best one built by
/// [`uring_builder`] (one ring per thread; a
/// multi-queue user opens one `UringFile` per thread). Clones share the file. Buffers are
/// owned by the ring while an operation is in flight, so dropping a future is sound: the
/// buffer, and the [`Keep`] it carries, is dropped when the kernel is done with it. The
/// operations without a buffer (flush, punch, zeroing, preallocation) run in a task of their
/// own that owns their keep, so they too finish and count their failures after their future
/// is dropped. Dropping the last clone closes the file
/// descriptor synchronously once no operation uses it; [`UringFile::close`] closes it through
/// the ring and reports the error.
#[derive(Clone, Debug)]
pub struct UringFile {
    inner: Rc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: tokio_uring::fs::File,
    /// The locks the open took. A write whose future is dropped goes on in the kernel after
    /// this handle may be gone: each write's buffer keeps them too, so that they go only
    /// when no write of ours can still land.
    locks: Option<Arc<HeldLocks>>,
    writable: bool,
    direct: bool,
    align: usize,
    no_punch: Cell<bool>,
    no_zero_range: Cell<bool>,
    /// The page-cache fast path of reads (files without O_DIRECT).
    cached: CacheReads,
    /// Failed flushes, counted by the flush's own task.
    flush_failures: Cell<u64>,
}

impl UringFile {
    /// Opens `path` through the ring. Always readable; see [`OpenOptions`] for the rest.
    ///
    /// # Panics
    /// Outside a tokio-uring runtime.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future closes the file once the ring's open completes.
    pub async fn open(path: impl AsRef<Path>, options: OpenOptions) -> io::Result<UringFile> {
        let path = path.as_ref();
        let mut uo = tokio_uring::fs::OpenOptions::new();
        uo.read(true)
            .write(writes(options))
            .create(options.create)
            .truncate(options.truncate && options.lock.is_none());
        if options.direct {
            uo.custom_flags(libc::O_DIRECT);
        }
        let file = uo.open(path).await.map_err(|e| match options.direct {
            true => sys::direct_open_error(path, e),
            false => e,
        })?;
        // Dropping the file on an error closes it (synchronously: no operation uses it yet).
        let locks = crate::file::locked(file.as_raw_fd(), options)?.map(Arc::new);
        let align = match options.direct {
            true => sys::direct_alignment(file.as_raw_fd()),
            false => 1,
        };
        Ok(UringFile {
            inner: Rc::new(Inner {
                file,
                locks,
                writable: writes(options),
                direct: options.direct,
                align,
                no_punch: Cell::new(false),
                no_zero_range: Cell::new(false),
                cached: CacheReads::new(options.direct),
                flush_failures: Cell::new(0),
            }),
        })
    }

    /// Whether the file was opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// Closes the file through the ring if this is the last clone (otherwise just drops this
    /// handle: the others keep the file open).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future still closes the descriptor (the ring finishes the close, or the
    /// last handle's drop does), without reporting an error.
    pub async fn close(self) -> io::Result<()> {
        match Rc::try_unwrap(self.inner) {
            Ok(inner) => inner.file.close().await,
            Err(_) => Ok(()),
        }
    }

    fn fd(&self) -> RawFd {
        self.inner.file.as_raw_fd()
    }

    /// Tries a fallocate mode unless known to be unsupported; `Ok(false)` means unsupported.
    async fn try_fallocate(&self, punch: bool, offset: u64, len: u64) -> io::Result<bool> {
        let (mode, known_bad) = match punch {
            true => (sys::PUNCH_HOLE, &self.inner.no_punch),
            false => (sys::ZERO_RANGE, &self.inner.no_zero_range),
        };
        if known_bad.get() {
            return Ok(false);
        }
        let (off, n) = (to_off(offset)?, to_off(len)?);
        match self.inner.file.fallocate(off, n, mode).await {
            Ok(()) => Ok(true),
            Err(e) if sys::is_unsupported(&e) => {
                tracing::debug!(mode, "fallocate unsupported, using the fallback: {e}");
                known_bad.set(true);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs `op` in a task of its own on the ring's thread, which owns `keep` and runs on to
    /// the end if this future is dropped (a request without a buffer has nothing the ring
    /// would keep for it).
    async fn detached<T: 'static>(
        &self,
        keep: Keep,
        op: impl std::future::Future<Output = io::Result<T>> + 'static,
    ) -> io::Result<T> {
        let task = tokio_uring::spawn(async move {
            let r = op.await;
            drop(keep);
            r
        });
        match task.await {
            Ok(r) => r,
            Err(e) => match e.try_into_panic() {
                Ok(p) => std::panic::resume_unwind(p),
                Err(_) => Err(io::Error::other(
                    "io_uring task cancelled: the runtime is shutting down",
                )),
            },
        }
    }

    /// Runs `f` on a duplicate of the descriptor on the blocking pool (for slow syscalls
    /// io_uring lacks, such as ftruncate), so the ring's thread does not stall.
    async fn blocking_fd<T: Send + 'static>(
        &self,
        f: impl FnOnce(RawFd) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        // SAFETY: the descriptor is open for as long as `self` lives (this call).
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd()) }.try_clone_to_owned()?;
        // The locks stay until the call is over, even if this future is dropped.
        let locks = self.inner.locks.clone();
        tokio::task::spawn_blocking(move || {
            let r = f(fd.as_raw_fd());
            drop(locks);
            r
        })
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(p) => std::panic::resume_unwind(p),
            Err(_) => io::Error::other("blocking task cancelled: the runtime is shutting down"),
        })?
    }
}

/// Byte positions for tokio-uring's fallocate, which takes u64 but hands them to the kernel
/// as signed.
fn to_off(v: u64) -> io::Result<u64> {
    match i64::try_from(v) {
        Ok(_) => Ok(v),
        Err(_) => Err(io::Error::from_raw_os_error(libc::EFBIG)),
    }
}

impl Backend for UringFile {
    async fn read_at(&self, buf: IoBuf, offset: u64) -> BufResult<usize> {
        let i = &self.inner;
        if let Err(e) = check_direct(i.direct, i.align, "read", &buf, offset) {
            return (Err(e), buf);
        }
        let direct = i.direct.then_some(i.align);
        read_whole(buf, offset, direct, |mut b, o| async move {
            if let Some(n) = i.cached.read(i.file.as_raw_fd(), &mut b, o) {
                return (Ok(n), b);
            }
            i.file.read_at(b, o).await
        })
        .await
    }

    async fn write_at(&self, mut buf: IoBuf, offset: u64) -> BufResult<()> {
        let i = &self.inner;
        if let Err(e) = check_direct(i.direct, i.align, "write", &buf, offset) {
            return (Err(e), buf);
        }
        // The locks ride with the buffer while the write may be in the kernel.
        let prior = i.locks.as_ref().map(|l| {
            let prior = buf.take_keep();
            buf.attach(prior.clone().and(Keep::from_arc(l.clone())));
            prior
        });
        let (res, mut buf) = write_whole(buf, offset, |b, o| i.file.write_at(b, o).submit()).await;
        if let Some(prior) = prior {
            buf.take_keep();
            buf.attach(prior);
        }
        (res, buf)
    }

    async fn flush(&self) -> io::Result<()> {
        let this = self.clone();
        self.detached(Keep::none(), async move {
            let r = this.inner.file.sync_data().await;
            if r.is_err() {
                let f = &this.inner.flush_failures;
                f.set(f.get() + 1);
            }
            r
        })
        .await
    }

    fn flush_failures(&self) -> u64 {
        self.inner.flush_failures.get()
    }

    async fn punch_hole(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let this = self.clone();
        self.detached(keep, async move {
            if this.try_fallocate(true, offset, len).await? {
                return Ok(());
            }
            punch_by_writing(&this, offset, len, Keep::none()).await
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let this = self.clone();
        self.detached(keep, async move {
            if this.try_fallocate(false, offset, len).await? {
                return Ok(());
            }
            zero_by_punching(&this, offset, len, Keep::none(), |end, _| {
                this.blocking_fd(move |fd| sys::extend_to(fd, end))
            })
            .await
        })
        .await
    }

    async fn preallocate(&self, len: u64, keep: Keep) -> io::Result<()> {
        let cur = sys::file_len(self.fd())?;
        if cur >= len {
            return Ok(());
        }
        let (off, n) = (to_off(cur)?, to_off(len - cur)?);
        let this = self.clone();
        self.detached(keep, async move {
            match this.inner.file.fallocate(off, n, 0).await {
                Err(e) if sys::is_unsupported(&e) => {
                    this.blocking_fd(move |fd| sys::extend_to(fd, len)).await
                }
                r => r,
            }
        })
        .await
    }

    async fn len(&self) -> io::Result<u64> {
        sys::file_len(self.fd())
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.blocking_fd(move |fd| sys::set_len(fd, len)).await
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<crate::Allocation> {
        // Two lseek calls: quick, no trip to the blocking pool.
        sys::allocation(self.fd(), offset, len)
    }

    async fn allocated_size(&self) -> io::Result<u64> {
        sys::allocated_size(self.fd())
    }

    fn alignment(&self) -> usize {
        self.inner.align
    }

    fn is_writable(&self) -> bool {
        self.inner.writable
    }
}

/// Opens [`UringFile`]s (inside a tokio-uring runtime).
#[derive(Clone, Copy, Debug, Default)]
pub struct UringOpener;

impl Opener for UringOpener {
    type Backend = UringFile;

    async fn open(&self, path: &Path, options: OpenOptions) -> io::Result<UringFile> {
        UringFile::open(path, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallbacks taken when fallocate is refused, forced as in the tokio file backend's
    /// test.
    #[test]
    fn fallbacks_without_fallocate() {
        crate::uring_builder().start(async {
            let dir = tempfile::tempdir().unwrap();
            let o = OpenOptions {
                write: true,
                create: true,
                ..Default::default()
            };
            let f = UringFile::open(dir.path().join("f"), o).await.unwrap();
            f.inner.no_punch.set(true);
            f.inner.no_zero_range.set(true);
            crate::check_fallbacks(&f).await;
        });
    }

    #[test]
    fn locks_go_with_the_file() {
        crate::uring_builder().start(crate::check_locks_released(UringOpener, |f| {
            // SAFETY: the descriptor is open while `f` lives.
            unsafe { BorrowedFd::borrow_raw(f.fd()) }
                .try_clone_to_owned()
                .unwrap()
        }));
    }
}
