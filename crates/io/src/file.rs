//! The tokio file backend: positional I/O on tokio's blocking pool.

use crate::lock::HeldLocks;
use crate::{
    punch_by_writing, sys, zero_by_punching, Backend, BufResult, IoBuf, Keep, OpenOptions, Opener,
};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A file doing positional I/O (`pread`/`pwrite`) on tokio's blocking pool.
///
/// Works on any tokio runtime (current-thread or multi-thread) and its futures are `Send`.
/// The owned [`IoBuf`] moves into the blocking task and back, so there is no copy, and
/// with [`OpenOptions::direct`] the I/O bypasses the page cache (O_DIRECT). Clones share
/// the file. Dropping a future lets the blocking task finish on its own: it owns the buffer
/// and the [`Keep`], which drop when the system call returns.
#[derive(Clone, Debug)]
pub struct TokioFile {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    /// The locks the open took, held for their drop: they go when the last operation
    /// holding `Inner` is over.
    _locks: Option<HeldLocks>,
    writable: bool,
    direct: bool,
    align: usize,
    /// Set once `FALLOC_FL_PUNCH_HOLE` was refused: go straight to the fallback.
    no_punch: AtomicBool,
    /// Set once `FALLOC_FL_ZERO_RANGE` was refused.
    no_zero_range: AtomicBool,
    /// Failed flushes, counted by the blocking task (its future may be gone).
    flush_failures: AtomicU64,
}

impl TokioFile {
    /// Opens `path` (on the blocking pool). Always readable; see [`OpenOptions`] for the rest.
    ///
    /// With `direct`, a file system that refuses O_DIRECT gives an
    /// [`io::ErrorKind::InvalidInput`] error saying so.
    ///
    /// # Cancel safety
    ///
    /// The open runs on the blocking pool and finishes there; dropping the future closes the
    /// file it opened (and drops its locks).
    pub async fn open(path: impl AsRef<Path>, options: OpenOptions) -> io::Result<TokioFile> {
        let path = path.as_ref().to_path_buf();
        run_blocking(move || {
            let file = std_options(options)
                .open(&path)
                .map_err(|e| match options.direct {
                    true => sys::direct_open_error(&path, e),
                    false => e,
                })?;
            let locks = locked(file.as_raw_fd(), options)?;
            Ok(Self::with_file(
                file,
                writes(options),
                options.direct,
                locks,
            ))
        })
        .await?
    }

    /// Wraps an open file; whether it is writable and uses O_DIRECT is read from its flags.
    pub fn from_std(file: File) -> io::Result<TokioFile> {
        let flags = sys::status_flags(file.as_raw_fd())?;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let direct = flags & libc::O_DIRECT != 0;
        Ok(Self::with_file(file, writable, direct, None))
    }

    fn with_file(file: File, writable: bool, direct: bool, locks: Option<HeldLocks>) -> TokioFile {
        let align = match direct {
            true => sys::direct_alignment(file.as_raw_fd()),
            false => 1,
        };
        TokioFile {
            inner: Arc::new(Inner {
                file,
                _locks: locks,
                writable,
                direct,
                align,
                no_punch: AtomicBool::new(false),
                no_zero_range: AtomicBool::new(false),
                flush_failures: AtomicU64::new(0),
            }),
        }
    }

    /// Whether the file was opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.inner.file.as_raw_fd()
    }

    /// Counts a failed flush (made by another backend on this file: the io_uring one).
    pub(crate) fn count_flush_failure(&self) {
        self.inner.flush_failures.fetch_add(1, Ordering::AcqRel);
    }

    /// The fallocate mode that punches a hole (`punch`) or zeroes a range, and the flag set
    /// once the file system refused it (then the fallbacks go straight to work).
    pub(crate) fn fallocate_mode(&self, punch: bool) -> (i32, &AtomicBool) {
        match punch {
            true => (sys::PUNCH_HOLE, &self.inner.no_punch),
            false => (sys::ZERO_RANGE, &self.inner.no_zero_range),
        }
    }

    fn check_aligned(&self, what: &str, buf: &IoBuf, offset: u64) -> io::Result<()> {
        check_direct(self.inner.direct, self.inner.align, what, buf, offset)
    }

    /// Runs `f` on the blocking pool with the file; `keep` drops when `f` returns.
    async fn with_file_blocking<T: Send + 'static>(
        &self,
        keep: Keep,
        f: impl FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let inner = self.inner.clone();
        run_blocking(move || {
            let r = f(&inner);
            drop(keep);
            r
        })
        .await?
    }

    /// Runs an I/O on `buf` on the blocking pool, giving the buffer back.
    async fn buf_blocking<T: Send + 'static>(
        &self,
        buf: IoBuf,
        f: impl FnOnce(&File, &mut IoBuf) -> io::Result<T> + Send + 'static,
    ) -> BufResult<T> {
        let inner = self.inner.clone();
        let shape = BufShape::of(&buf);
        let mut buf = buf;
        match tokio::task::spawn_blocking(move || {
            let r = f(&inner.file, &mut buf);
            (r, buf)
        })
        .await
        {
            Ok(r) => r,
            // The task never ran (the runtime is shutting down): the buffer is gone with it.
            Err(e) => (Err(join_error(e)), shape.rebuild()),
        }
    }

    /// Tries a fallocate mode unless it is known to be unsupported; `Ok(false)` means
    /// unsupported (and remembered).
    async fn try_fallocate(
        &self,
        punch: bool,
        offset: u64,
        len: u64,
        keep: Keep,
    ) -> io::Result<bool> {
        let (mode, known_bad) = self.fallocate_mode(punch);
        if known_bad.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let r = self
            .with_file_blocking(keep, move |i| {
                sys::fallocate(i.file.as_raw_fd(), mode, offset, len)
            })
            .await;
        match r {
            Ok(()) => Ok(true),
            Err(e) if sys::is_unsupported(&e) => {
                tracing::debug!(mode, "fallocate unsupported, using the fallback: {e}");
                known_bad.store(true, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// `std` open options for ours: always readable; create and truncate imply write. With
/// locks, the truncation waits until they are held ([`locked`]).
fn std_options(o: OpenOptions) -> std::fs::OpenOptions {
    let mut so = std::fs::OpenOptions::new();
    so.read(true)
        .write(writes(o))
        .create(o.create)
        .truncate(o.truncate && o.lock.is_none());
    if o.direct {
        so.custom_flags(libc::O_DIRECT);
    }
    so
}

/// Takes the locks `o` asks for on a file just opened, then truncates it if asked (after the
/// locks, so that a file another process uses is never emptied). The locks are held until
/// the result drops; on an error none are left.
pub(crate) fn locked(fd: RawFd, o: OpenOptions) -> io::Result<Option<HeldLocks>> {
    let Some(req) = &o.lock else {
        return Ok(None);
    };
    let held = crate::lock::lock(fd, req)?;
    if o.truncate {
        sys::set_len(fd, 0)?;
    }
    Ok(held)
}

/// Whether the options ask for a writable file.
pub(crate) fn writes(o: OpenOptions) -> bool {
    o.write || o.create || o.truncate
}

/// The O_DIRECT alignment rule, checked before the kernel says EINVAL without a reason.
pub(crate) fn check_direct(
    direct: bool,
    align: usize,
    what: &str,
    buf: &IoBuf,
    offset: u64,
) -> io::Result<()> {
    if direct && (!buf.is_aligned_to(align) || offset % align as u64 != 0) {
        return Err(sys::misaligned(
            what,
            offset,
            buf.as_ptr() as usize,
            buf.len(),
            align,
        ));
    }
    Ok(())
}

/// What is needed to hand back a same-shaped buffer when the original is lost.
struct BufShape {
    cap: usize,
    align: usize,
    window: std::ops::Range<usize>,
}

impl BufShape {
    fn of(b: &IoBuf) -> Self {
        BufShape {
            cap: b.capacity(),
            align: b.alignment(),
            window: b.window(),
        }
    }

    fn rebuild(self) -> IoBuf {
        let mut b = IoBuf::with_alignment(self.cap, self.align);
        b.set_window(self.window);
        b
    }
}

async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(join_error)
}

fn join_error(e: tokio::task::JoinError) -> io::Error {
    match e.try_into_panic() {
        Ok(p) => std::panic::resume_unwind(p),
        Err(_) => io::Error::other("blocking I/O task cancelled: the runtime is shutting down"),
    }
}

/// `pread` until the window is full or EOF. With O_DIRECT an unaligned count means EOF
/// (reading on from an unaligned position would fail), and the rest of the window is zeroed
/// (the kernel may have written past the count).
fn read_full(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    direct_align: Option<usize>,
) -> io::Result<usize> {
    let done = read_loop(file, buf, offset, direct_align)?;
    if direct_align.is_some() {
        buf[done..].fill(0);
    }
    Ok(done)
}

fn read_loop(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    direct_align: Option<usize>,
) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if direct_align.is_some_and(|a| n % a != 0) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Backend for TokioFile {
    async fn read_at(&self, buf: IoBuf, offset: u64) -> BufResult<usize> {
        if let Err(e) = self.check_aligned("read", &buf, offset) {
            return (Err(e), buf);
        }
        let direct = self.inner.direct.then_some(self.inner.align);
        self.buf_blocking(buf, move |f, b| read_full(f, b, offset, direct))
            .await
    }

    async fn write_at(&self, buf: IoBuf, offset: u64) -> BufResult<()> {
        if let Err(e) = self.check_aligned("write", &buf, offset) {
            return (Err(e), buf);
        }
        // write_all_at retries EINTR and short writes.
        self.buf_blocking(buf, move |f, b| f.write_all_at(b, offset))
            .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.with_file_blocking(Keep::none(), |i| loop {
            match i.file.sync_data() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    i.flush_failures.fetch_add(1, Ordering::AcqRel);
                    return Err(e);
                }
                r => return r,
            }
        })
        .await
    }

    fn flush_failures(&self) -> u64 {
        self.inner.flush_failures.load(Ordering::Acquire)
    }

    async fn punch_hole(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.try_fallocate(true, offset, len, keep.clone()).await? {
            return Ok(());
        }
        punch_by_writing(self, offset, len, keep).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.try_fallocate(false, offset, len, keep.clone()).await? {
            return Ok(());
        }
        zero_by_punching(self, offset, len, keep, |end, keep| {
            self.with_file_blocking(keep, move |i| sys::extend_to(i.file.as_raw_fd(), end))
        })
        .await
    }

    async fn preallocate(&self, len: u64, keep: Keep) -> io::Result<()> {
        if sys::file_len(self.fd())? >= len {
            return Ok(());
        }
        self.with_file_blocking(keep, move |i| sys::preallocate(i.file.as_raw_fd(), len))
            .await
    }

    async fn len(&self) -> io::Result<u64> {
        // fstat is quick: no trip to the blocking pool.
        sys::file_len(self.fd())
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.with_file_blocking(Keep::none(), move |i| sys::set_len(i.file.as_raw_fd(), len))
            .await
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

/// Opens [`TokioFile`]s.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileOpener;

impl Opener for FileOpener {
    type Backend = TokioFile;

    async fn open(&self, path: &Path, options: OpenOptions) -> io::Result<TokioFile> {
        TokioFile::open(path, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallbacks taken when fallocate is refused (e.g. on file systems without
    /// ZERO_RANGE): forced here, since the test file system supports everything.
    #[tokio::test]
    async fn fallbacks_without_fallocate() {
        let dir = tempfile::tempdir().unwrap();
        let o = OpenOptions {
            write: true,
            create: true,
            ..Default::default()
        };
        let f = TokioFile::open(dir.path().join("f"), o).await.unwrap();
        f.inner.no_punch.store(true, Ordering::Relaxed);
        f.inner.no_zero_range.store(true, Ordering::Relaxed);
        crate::check_fallbacks(&f).await;
    }

    #[tokio::test]
    async fn locks_go_with_the_file() {
        crate::check_locks_released(FileOpener, |f| f.inner.file.try_clone().unwrap().into()).await;
    }
}
