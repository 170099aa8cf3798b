//! # blockio
//!
//! The I/O layer under qcow2-engine: a narrow [`Backend`] trait over a file-like object, with
//! owned buffers ([`IoBuf`]) so that a buffer can be handed to the kernel (io_uring, O_DIRECT)
//! without a copy and without unsoundness if a future is dropped mid-flight.
//!
//! Backends: [`TokioFile`] (positional I/O on tokio's blocking pool, any tokio runtime, O_DIRECT
//! capable), [`RingFile`] (io_uring with a ring per thread, on any tokio runtime; `Send`, so
//! one file or image serves the tasks of a multi-thread runtime), [`UringFile`] (io_uring
//! through tokio-uring; its futures are not `Send` and run on a tokio-uring runtime),
//! [`MemoryBackend`] (a growable byte vector, for tests), and, with
//! the `fault` feature (tests only), `FaultInjector` (wraps any backend; a test can hold,
//! release, reorder and fail requests, and build crash images from its log).
//!
//! This crate knows nothing about qcow2.
#![warn(missing_docs)]

mod buf;
mod cached;
#[cfg(feature = "fault")]
mod fault;
mod file;
pub mod lock;
mod memory;
#[cfg(target_os = "linux")]
mod ring;
mod sys;
#[cfg(target_os = "linux")]
mod uring;
mod whole;

pub use buf::{IoBuf, Keep, DEFAULT_ALIGN, HUGE_PAGE};
#[cfg(feature = "fault")]
pub use fault::{
    CrashImage, CrashSpec, FaultController, FaultInjector, FaultOpener, FaultRule, HeldRequest,
    LogEntry, OpKind, RequestFilter, RequestInfo, TornSector, CRASH_SECTOR,
};
pub use file::{FileOpener, TokioFile};
pub use lock::{LockConflict, LockRequest, Locking, Perms};
pub use memory::{MemoryBackend, MemoryOpener};
#[cfg(target_os = "linux")]
pub use ring::{RingFile, RingOpener, RingUnavailable, RING_CQ_ENTRIES, RING_SQ_ENTRIES};
#[cfg(target_os = "linux")]
pub use uring::{uring_builder, UringFile, UringOpener, URING_CQ_ENTRIES, URING_SQ_ENTRIES};

use std::future::Future;
use std::io;
use std::path::Path;

/// The result of an I/O on an owned buffer: the outcome, and the buffer back.
pub type BufResult<T> = (io::Result<T>, IoBuf);

/// How to open a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open for writing too.
    pub write: bool,
    /// Create the file if missing (implies `write`).
    pub create: bool,
    /// Truncate to zero length (implies `write`).
    pub truncate: bool,
    /// Bypass the page cache (`O_DIRECT`, QEMU's `cache=none`): buffers, offsets and lengths
    /// must then be multiples of [`Backend::alignment`].
    pub direct: bool,
    /// The locks to take on the file, as QEMU's file driver takes them (see [`lock`]); with
    /// `truncate`, the file is truncated only once they are held. `None`: no lock. Backends
    /// without a file descriptor (memory) ignore it.
    pub lock: Option<LockRequest>,
}

/// A file-like object doing positional I/O with owned buffers.
///
/// Reads and writes act on the buffer's current window (see [`IoBuf::set_window`]).
/// Implementations must be cheap to clone (a clone shares the same file).
///
/// # Cancel safety
///
/// Dropping an operation's future never leaves the kernel touching freed memory: the buffer
/// is owned by the operation until it completes. Nor does it end the operation early: an
/// operation the backend has accepted runs to its end (io_uring completes it in the kernel,
/// a blocking-pool task runs on), so whatever guards it must live as long. Each operation
/// takes a [`Keep`]: reads and writes carry it in their [`IoBuf`] ([`IoBuf::attach`]), the
/// other changes to the file take it as an argument. An implementation drops the keep only
/// once the operation can no longer touch the file (it completed, failed, or was never
/// started), whenever the future is dropped. A flush whose future is dropped still counts
/// its failure in [`flush_failures`](Self::flush_failures).
// `len` is the file's length, fetched asynchronously: an `is_empty` would add nothing.
#[allow(clippy::len_without_is_empty)]
pub trait Backend: Clone + 'static {
    /// Reads into the buffer's window from `offset`. Returns the number of bytes read, which is
    /// short only at the end of the file. The rest of the window is left untouched, except with
    /// O_DIRECT ([`alignment`](Self::alignment) > 1), where it is zeroed: the device transfers
    /// whole blocks, so the kernel may already have overwritten it.
    fn read_at(&self, buf: IoBuf, offset: u64) -> impl Future<Output = BufResult<usize>>;

    /// Writes the whole window at `offset`, extending the file if needed.
    fn write_at(&self, buf: IoBuf, offset: u64) -> impl Future<Output = BufResult<()>>;

    /// Makes every completed write durable (fdatasync or equivalent).
    fn flush(&self) -> impl Future<Output = io::Result<()>>;

    /// How many flushes of this file have failed so far, counting those whose futures were
    /// dropped before they completed (their caller never saw the error). A caller that must
    /// not miss a failure (Linux may drop the dirty pages a failed fsync covered and report
    /// success to the next one) compares it with the count it has seen.
    fn flush_failures(&self) -> u64;

    /// Deallocates `[offset, offset+len)`; afterwards the range reads as zeros. The file's
    /// length does not change. `keep` lives until the hole is punched (see the trait's
    /// cancel safety).
    fn punch_hole(&self, offset: u64, len: u64, keep: Keep)
        -> impl Future<Output = io::Result<()>>;

    /// Makes `[offset, offset+len)` read as zeros, extending the file if the range ends past
    /// it. `keep` lives until it is done.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        keep: Keep,
    ) -> impl Future<Output = io::Result<()>>;

    /// The file's length in bytes.
    fn len(&self) -> impl Future<Output = io::Result<u64>>;

    /// Sets the file's length (truncating or extending with zeros).
    fn set_len(&self, len: u64) -> impl Future<Output = io::Result<()>>;

    /// The alignment that buffers, offsets and lengths need (1 for cached I/O, the logical block
    /// size for O_DIRECT).
    fn alignment(&self) -> usize;

    /// Whether the backend was opened for writing.
    fn is_writable(&self) -> bool;

    /// Whether `[offset, offset+len)` begins with data or with a hole, and for how many bytes
    /// that lasts (at most `len`), as `SEEK_DATA`/`SEEK_HOLE` tell it. A backend without holes
    /// reports data. Past the end of the file is a hole.
    fn allocation(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<Allocation>> {
        let _ = offset;
        async move { Ok(Allocation { data: true, len }) }
    }

    /// Bytes of storage the file occupies (allocated blocks; the length for backends without
    /// holes).
    fn allocated_size(&self) -> impl Future<Output = io::Result<u64>> {
        self.len()
    }

    /// Makes the file at least `len` bytes long, reserving storage for the part added where
    /// the file system can (`fallocate` mode 0: unwritten extents that read as zeros). Never
    /// changes a byte the file holds and never shrinks it. The engine grows an image ahead of
    /// its allocations with it, so that new clusters are overwrites of reserved blocks rather
    /// than writes that extend the file (which ext4 and XFS serialise on the inode). `keep`
    /// lives until it is done.
    fn preallocate(&self, len: u64, keep: Keep) -> impl Future<Output = io::Result<()>> {
        async move {
            if self.len().await? < len {
                self.set_len(len).await?;
            }
            drop(keep);
            Ok(())
        }
    }
}

/// The answer of [`Backend::allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Data (true) or a hole (false).
    pub data: bool,
    /// How many bytes from the offset asked about have that state.
    pub len: u64,
}

/// Opens backends of one type by path: the engine uses it to open backing files and external
/// data files with the same kind of backend as the image itself.
pub trait Opener: Clone + 'static {
    /// The backend this opener makes.
    type Backend: Backend;

    /// Opens `path`.
    fn open(
        &self,
        path: &Path,
        options: OpenOptions,
    ) -> impl Future<Output = io::Result<Self::Backend>>;
}

/// The increment of a SplitMix64 sequence (the golden ratio in 64 bits).
pub const SPLITMIX64_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Steele, Lea and Flood): `splitmix64(seed + n *
/// SPLITMIX64_GAMMA)` is the n-th value of the sequence from `seed`, independent of the order
/// in which values are asked for. The project's one source of deterministic pseudo-random
/// numbers (crash images, benchmark offsets, test schedules); not for cryptography.
pub fn splitmix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Reads exactly the buffer's window, treating bytes past the end of the file as zeros
/// (how QEMU's file layer reads short files).
///
/// # Cancel safety
///
/// As [`Backend::read_at`]: dropping the future drops the buffer once the backend is done.
pub async fn read_zero_padded<B: Backend>(
    backend: &B,
    mut buf: IoBuf,
    offset: u64,
) -> BufResult<()> {
    let want = buf.len();
    let (res, b) = backend.read_at(buf, offset).await;
    buf = b;
    match res {
        Ok(n) if n < want => {
            buf[n..].fill(0);
            (Ok(()), buf)
        }
        Ok(_) => (Ok(()), buf),
        Err(e) => (Err(e), buf),
    }
}

/// The fallback of [`Backend::punch_hole`] where the file system cannot punch holes: zeros
/// written over the part of `[offset, offset+len)` inside the file; the length is unchanged.
pub(crate) async fn punch_by_writing<B: Backend>(
    backend: &B,
    offset: u64,
    len: u64,
    keep: Keep,
) -> io::Result<()> {
    let end = offset.saturating_add(len).min(backend.len().await?);
    if offset < end {
        write_zero_bytes(backend, offset, end - offset, keep).await?;
    }
    Ok(())
}

/// The fallback of [`Backend::write_zeroes`] where the file system cannot zero a range: the
/// part inside the file punched ([`Backend::punch_hole`]), then the file extended to the
/// range's end by `extend_to` (which never shortens it).
/// `keep` goes with each step (`extend_to` gets its own clone).
pub(crate) async fn zero_by_punching<B, F>(
    backend: &B,
    offset: u64,
    len: u64,
    keep: Keep,
    extend_to: impl FnOnce(u64, Keep) -> F,
) -> io::Result<()>
where
    B: Backend,
    F: Future<Output = io::Result<()>>,
{
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
    let flen = backend.len().await?;
    if offset < flen {
        backend
            .punch_hole(offset, end.min(flen) - offset, keep.clone())
            .await?;
    }
    if end > flen {
        extend_to(end, keep).await?;
    }
    Ok(())
}

/// Writes zero bytes over `[offset, offset+len)` through `backend.write_at`, in chunks of at
/// most 1 MiB: the fallback of backends whose file system cannot punch holes or zero ranges.
/// With O_DIRECT the range must be aligned (chunks stay multiples of the alignment). The
/// buffer carries `keep`.
pub(crate) async fn write_zero_bytes<B: Backend>(
    backend: &B,
    offset: u64,
    len: u64,
    keep: Keep,
) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let align = backend.alignment().max(DEFAULT_ALIGN);
    let chunk = CHUNK.min(len) as usize;
    let mut buf = IoBuf::with_alignment(chunk, align);
    buf.attach(keep);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        buf.set_window(0..n);
        let (r, b) = backend.write_at(buf, offset + done).await;
        buf = b;
        r?;
        done += n as u64;
    }
    Ok(())
}

/// A backend's file, opened with a writer's locks, releases them when the backend drops,
/// although a copy of its descriptor (made by `copy`, as a child process between `fork` and
/// `exec` holds one) is still open: the file opens again right away.
#[cfg(test)]
pub(crate) async fn check_locks_released<O: Opener>(
    opener: O,
    copy: impl Fn(&O::Backend) -> std::os::fd::OwnedFd,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let writer = LockRequest::new(Perms::ALL, Perms::CONSISTENT_READ);
    let o = OpenOptions {
        write: true,
        create: true,
        lock: Some(writer),
        ..Default::default()
    };
    let f = opener.open(&path, o).await.unwrap();
    let child = copy(&f);
    let e = opener
        .open(&path, o)
        .await
        .err()
        .expect("a second writer conflicts");
    assert!(LockConflict::from_io(&e).is_some(), "{e}");
    drop(f);
    opener
        .open(&path, o)
        .await
        .expect("the locks went with the backend");
    drop(child);
}

/// What the fallbacks of `punch_hole` and `write_zeroes` ([`punch_by_writing`],
/// [`zero_by_punching`]) must leave, on a writable backend whose fallocate is refused.
#[cfg(test)]
pub(crate) async fn check_fallbacks<B: Backend>(f: &B) {
    let (r, _) = f.write_at(IoBuf::from_slice(&[0xaa; 10_000]), 0).await;
    r.unwrap();
    f.punch_hole(100, 200, Keep::none()).await.unwrap();
    f.punch_hole(9_000, 5_000, Keep::none()).await.unwrap();
    assert_eq!(f.len().await.unwrap(), 10_000);
    f.write_zeroes(500, 100, Keep::none()).await.unwrap();
    f.write_zeroes(9_990, 3_000_000, Keep::none())
        .await
        .unwrap();
    assert_eq!(f.len().await.unwrap(), 3_009_990);
    let (r, b) = f.read_at(IoBuf::new(10_010), 0).await;
    assert_eq!(r.unwrap(), 10_010);
    let zero = |i: usize| (100..300).contains(&i) || (500..600).contains(&i) || i >= 9_000;
    for (i, &v) in b.iter().enumerate() {
        assert_eq!(v, if zero(i) { 0 } else { 0xaa }, "byte {i}");
    }
}
