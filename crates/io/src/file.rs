//! The tokio file backend: positional I/O on tokio's blocking pool.

use crate::cached::CacheReads;
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
    /// The page-cache fast path of reads (see [`TokioFile::read_cached`]).
    cached: CacheReads,
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
                cached: CacheReads::new(direct),
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

    /// Reads into `buf` what the page cache holds of the range at `offset`, without waiting
    /// for the disk: `Some(n)` when it read `n` bytes (fewer than asked when the rest is not
    /// cached; 0 at the end of the file), `None` when the caller must do the read itself (the
    /// first page is not cached, the file is O_DIRECT, the attempts are off for now, or any
    /// error, which the real read will report). See [`CacheReads`].
    pub(crate) fn read_cached(&self, buf: &mut [u8], offset: u64) -> Option<usize> {
        self.inner.cached.read(self.fd(), buf, offset)
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
        let mut buf = buf;
        let want = buf.len();
        // Only a whole read counts here; a part (or the end of the file) is read again below.
        if self.read_cached(&mut buf, offset) == Some(want) {
            return (Ok(want), buf);
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

    /// A new writable file in a directory of its own (kept alive by the caller).
    async fn new_file() -> (tempfile::TempDir, TokioFile) {
        let dir = tempfile::tempdir().unwrap();
        let o = OpenOptions {
            write: true,
            create: true,
            ..Default::default()
        };
        let f = TokioFile::open(dir.path().join("f"), o).await.unwrap();
        (dir, f)
    }

    /// The fallbacks taken when fallocate is refused (e.g. on file systems without
    /// ZERO_RANGE): forced here, since the test file system supports everything.
    #[tokio::test]
    async fn fallbacks_without_fallocate() {
        let (_dir, f) = new_file().await;
        f.inner.no_punch.store(true, Ordering::Relaxed);
        f.inner.no_zero_range.store(true, Ordering::Relaxed);
        crate::check_fallbacks(&f).await;
    }

    #[tokio::test]
    async fn locks_go_with_the_file() {
        crate::check_locks_released(FileOpener, |f| f.inner.file.try_clone().unwrap().into()).await;
    }

    /// Reads of a cached file take the page-cache path while the data is there, go the
    /// usual way when it is not, and stop probing after `COLD` misses in a row but for one
    /// read in `PROBE`.
    #[tokio::test]
    async fn cached_reads_take_the_page_cache_path() {
        let (_dir, f) = new_file().await;
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        let (r, _) = f.write_at(IoBuf::from_slice(&data), 0).await;
        r.unwrap();
        let mut buf = vec![0u8; 8192];
        let hit = f.read_cached(&mut buf, 4096);
        let c = &f.inner.cached;
        if c.off.load(Ordering::Relaxed) {
            // A file system without RWF_NOWAIT reads: the path turns itself off.
            assert_eq!(hit, None);
            return;
        }
        assert_eq!(hit, Some(8192), "data just written is in the page cache");
        assert_eq!(buf, data[4096..12288]);
        // Past the end: the end of the file, read from the cache too.
        assert_eq!(f.read_cached(&mut buf, 65536), Some(0));
        // Out of the page cache: a miss, and the usual read still returns the data.
        f.flush().await.unwrap();
        // SAFETY: plain syscall on an open descriptor.
        let r = unsafe { libc::posix_fadvise(f.fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        assert_eq!(f.read_cached(&mut buf, 0), None);
        assert_eq!(c.misses.load(Ordering::Relaxed), 1);
        let (r, back) = f.read_at(IoBuf::new(65536), 0).await;
        assert_eq!(r.unwrap(), 65536);
        assert_eq!(&back[..], &data[..]);
        // The usual read cached it again: a hit, and the misses start over.
        assert_eq!(f.read_cached(&mut buf, 0), Some(8192));
        assert_eq!(c.misses.load(Ordering::Relaxed), 0);
        // Cold: after COLD misses only one attempt in PROBE.
        c.misses.store(CacheReads::COLD, Ordering::Relaxed);
        let attempts = (0..CacheReads::PROBE * 2).filter(|_| c.attempt()).count();
        assert_eq!(attempts, 2);
    }
}
