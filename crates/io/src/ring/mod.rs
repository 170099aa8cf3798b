//! The `Send` io_uring backend: a ring per thread, on any tokio runtime.

mod driver;
mod op;

pub use driver::{RingUnavailable, RING_CQ_ENTRIES, RING_SQ_ENTRIES};

use crate::file::check_direct;
use crate::whole::{read_whole, write_whole};
use crate::{sys, Backend, BufResult, IoBuf, Keep, OpenOptions, Opener, TokioFile};
use io_uring::{opcode, types};
use op::{submit, Hold};
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

/// The most one request reads or writes (the kernel's count is 32 bits); longer windows go
/// in several requests. A multiple of every O_DIRECT alignment.
const MAX_REQUEST: usize = 1 << 30;

/// A file doing its reads, writes, flushes and fallocates through io_uring, with a ring for
/// each thread that polls them: `Send + Sync`, and so are its futures. One `RingFile` (or an
/// image over [`RingOpener`]) can be shared by the tasks of a multi-thread tokio runtime, each
/// worker thread submitting to its own ring; it also works on a current-thread runtime and
/// inside tokio-uring's.
///
/// A request goes to the ring of the thread that first polls it (set up then, once per
/// thread and runtime; [`RING_SQ_ENTRIES`], [`RING_CQ_ENTRIES`]). On a ring with nothing
/// else queued or in flight it is submitted at once. Otherwise it is queued and its task
/// yields once: the requests of the other tasks ready meanwhile queue theirs, and the first
/// one polled again submits them all in one system call (at once when 4 are queued), so a
/// busy device gets batches, as from tokio-uring, at the cost of one turn of the scheduler
/// (on a thread running [`RingOpener::park_hook`], without it: the thread submits what is
/// queued before it sleeps). Completions are reaped by a task of the runtime woken when the
/// ring's descriptor turns readable (tokio's I/O driver watches it), by the request's own poll when it finds its completion
/// already there, or by the park hook; the reaper wakes the request's task. The rarer
/// operations (length changes, preallocation, and the fallbacks of `punch_hole` and
/// `write_zeroes` on file systems without fallocate) run on tokio's blocking pool as
/// [`TokioFile`]'s do.
///
/// # Cancel safety
///
/// A request in flight owns its buffer, its [`Keep`] and a handle on the file (so the
/// descriptor stays open and QEMU's locks stay held) until the kernel completes it; dropping
/// its future drops none of them early. A flush whose future is dropped still counts its
/// failure in [`flush_failures`](Backend::flush_failures). When a runtime shuts down, the
/// rings its threads used close with the threads, or when a thread next sets up a ring (in a
/// new runtime): a closing ring asks the kernel to cancel what is still in it (a request
/// cancelled completes with ECANCELED, and a flush cancelled, which never ran, is no
/// failure) and waits for every completion before its buffers and keeps go. Until then, the
/// keeps of requests that completed after the shutdown stay held.
///
/// # Errors
///
/// Outside a tokio runtime, in a runtime without its I/O driver, or where the kernel refuses
/// io_uring (ENOSYS, EPERM when `kernel.io_uring_disabled` or a seccomp filter forbids it,
/// ENOMEM), opening fails with an [`io::Error`] holding a [`RingUnavailable`], never a
/// panic; a request polled on such a thread fails the same way.
#[derive(Clone, Debug)]
pub struct RingFile {
    /// The descriptor, locks, flags and counters (shared with the blocking-pool paths).
    file: TokioFile,
}

impl RingFile {
    /// Opens `path` (on tokio's blocking pool, taking QEMU's locks as [`TokioFile::open`]
    /// does), after setting up this thread's ring. Always readable; see [`OpenOptions`].
    ///
    /// # Errors
    /// As [`TokioFile::open`], and [`RingUnavailable`] (see the type's errors).
    ///
    /// # Cancel safety
    ///
    /// As [`TokioFile::open`]: dropping the future closes the file it opened.
    pub async fn open(path: impl AsRef<Path>, options: OpenOptions) -> io::Result<RingFile> {
        driver::current()?;
        let file = TokioFile::open(path, options).await?;
        Ok(RingFile { file })
    }

    /// Whether the file was opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.file.is_direct()
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.fd())
    }

    /// One read or write of (at most [`MAX_REQUEST`] bytes of) the window at `offset`.
    async fn rw(&self, write: bool, mut buf: IoBuf, offset: u64) -> BufResult<usize> {
        if let Err(e) = sys::to_off(offset) {
            return (Err(e), buf);
        }
        let n = buf.len().min(MAX_REQUEST) as u32;
        let entry = match write {
            true => opcode::Write::new(self.fd(), buf.as_ptr(), n),
            false => {
                if let Some(n) = self.file.read_cached(&mut buf[..n as usize], offset) {
                    return (Ok(n), buf);
                }
                let r = opcode::Read::new(self.fd(), buf.as_mut_ptr(), n);
                return self.finish_rw(r.offset(offset).build(), buf).await;
            }
        };
        self.finish_rw(entry.offset(offset).build(), buf).await
    }

    async fn finish_rw(&self, entry: io_uring::squeue::Entry, buf: IoBuf) -> BufResult<usize> {
        let (r, hold) = submit(entry, Hold::new(&self.file, Some(buf), Keep::none())).await;
        let buf = hold.buf.expect("the request's buffer");
        (r.map(|n| n as usize), buf)
    }

    /// fallocate through the ring; `keep` lives until it completes.
    async fn fallocate(&self, mode: i32, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        let (off, n) = (sys::to_off(offset)?, sys::to_off(len)?);
        let entry = opcode::Fallocate::new(self.fd(), n as u64)
            .offset(off as u64)
            .mode(mode)
            .build();
        submit(entry, Hold::new(&self.file, None, keep)).await.0?;
        Ok(())
    }

    /// Punches (`punch`) or zeroes a range with fallocate unless the file system is known to
    /// refuse it; `Ok(false)` means refused (and remembered, for the blocking-pool fallback).
    async fn try_fallocate(
        &self,
        punch: bool,
        offset: u64,
        len: u64,
        keep: Keep,
    ) -> io::Result<bool> {
        let (mode, known_bad) = self.file.fallocate_mode(punch);
        if known_bad.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match self.fallocate(mode, offset, len, keep).await {
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

impl Backend for RingFile {
    async fn read_at(&self, buf: IoBuf, offset: u64) -> BufResult<usize> {
        let (direct, align) = (self.is_direct(), self.alignment());
        if let Err(e) = check_direct(direct, align, "read", &buf, offset) {
            return (Err(e), buf);
        }
        let direct = direct.then_some(align);
        read_whole(buf, offset, direct, |b, o| self.rw(false, b, o)).await
    }

    async fn write_at(&self, buf: IoBuf, offset: u64) -> BufResult<()> {
        if let Err(e) = check_direct(self.is_direct(), self.alignment(), "write", &buf, offset) {
            return (Err(e), buf);
        }
        write_whole(buf, offset, |b, o| self.rw(true, b, o)).await
    }

    async fn flush(&self) -> io::Result<()> {
        let entry = opcode::Fsync::new(self.fd())
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        let mut hold = Hold::new(&self.file, None, Keep::none());
        hold.flush = true;
        submit(entry, hold).await.0?;
        Ok(())
    }

    fn flush_failures(&self) -> u64 {
        self.file.flush_failures()
    }

    async fn punch_hole(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.try_fallocate(true, offset, len, keep.clone()).await? {
            return Ok(());
        }
        // The flag is set: the tokio file goes straight to its fallback.
        self.file.punch_hole(offset, len, keep).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.try_fallocate(false, offset, len, keep.clone()).await? {
            return Ok(());
        }
        self.file.write_zeroes(offset, len, keep).await
    }

    async fn preallocate(&self, len: u64, keep: Keep) -> io::Result<()> {
        self.file.preallocate(len, keep).await
    }

    async fn len(&self) -> io::Result<u64> {
        self.file.len().await
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len).await
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<crate::Allocation> {
        self.file.allocation(offset, len).await
    }

    async fn allocated_size(&self) -> io::Result<u64> {
        self.file.allocated_size().await
    }

    fn alignment(&self) -> usize {
        self.file.alignment()
    }

    fn is_writable(&self) -> bool {
        self.file.is_writable()
    }
}

/// Opens [`RingFile`]s (inside a tokio runtime; see [`RingFile`]'s errors).
#[derive(Clone, Copy, Debug, Default)]
pub struct RingOpener;

impl RingOpener {
    /// A hook for tokio's [`on_thread_park`](tokio::runtime::Builder::on_thread_park) that
    /// trades CPU time for latency, as QEMU's I/O threads do by polling (`poll-max-ns`,
    /// 32 µs by default there): before a thread of the runtime sleeps while requests of its
    /// ring are in the kernel, it submits what is queued and polls the ring's completion
    /// queue for up to `max_poll`. A completion found hands its request on at once, without
    /// the thread (and, in a VM, its virtual CPU) going to sleep and being woken up again.
    /// At queue depth 1 on this project's reference VM this takes 4k O_DIRECT reads from
    /// about 22,000 to 29,000-32,000 IOPS and writes from 18,000 to 24,000-25,000
    /// (docs/BENCHMARKS.md); with many requests in flight the thread seldom parks, and it
    /// changes little.
    ///
    /// The cost: the thread keeps its CPU busy for up to `max_poll` each time it would have
    /// slept with I/O in flight, and what would wake it otherwise (a task woken from another
    /// thread, a timer, a socket) waits as long. Without the hook (or with a zero `max_poll`)
    /// the backend works the same, completions being reaped when the ring's descriptor turns
    /// readable.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// use std::time::Duration;
    /// let rt = tokio::runtime::Builder::new_current_thread()
    ///     .enable_all()
    ///     .on_thread_park(blockio::RingOpener::park_hook(Duration::from_micros(32)))
    ///     .build()?;
    /// # drop(rt);
    /// # Ok(())
    /// # }
    /// ```
    pub fn park_hook(max_poll: std::time::Duration) -> impl Fn() + Send + Sync + 'static {
        move || driver::before_park(max_poll)
    }
}

impl Opener for RingOpener {
    type Backend = RingFile;

    async fn open(&self, path: &Path, options: OpenOptions) -> io::Result<RingFile> {
        RingFile::open(path, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::BorrowedFd;
    use std::sync::Arc;

    /// The fallbacks taken when fallocate is refused, forced as in the tokio file backend's
    /// test.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fallbacks_without_fallocate() {
        let dir = tempfile::tempdir().unwrap();
        let o = OpenOptions {
            write: true,
            create: true,
            ..Default::default()
        };
        let f = RingFile::open(dir.path().join("f"), o).await.unwrap();
        for punch in [true, false] {
            f.file
                .fallocate_mode(punch)
                .1
                .store(true, Ordering::Relaxed);
        }
        crate::check_fallbacks(&f).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn locks_go_with_the_file() {
        crate::check_locks_released(RingOpener, |f| {
            // SAFETY: the descriptor is open while `f` lives.
            unsafe { BorrowedFd::borrow_raw(f.file.fd()) }
                .try_clone_to_owned()
                .unwrap()
        })
        .await;
    }

    /// A new file on a ring kept busy by a timeout in flight until one other request of the
    /// ring completes: what a test queues meanwhile waits for its batch.
    struct Busy {
        _dir: tempfile::TempDir,
        f: RingFile,
        ring: Arc<driver::Ring>,
        timeout: std::pin::Pin<Box<op::Submit>>,
        /// The timeout's time (600 s), which its entry points to.
        _ts: Box<types::Timespec>,
    }

    async fn busy_ring() -> Busy {
        let dir = tempfile::tempdir().unwrap();
        let create = OpenOptions {
            create: true,
            ..Default::default()
        };
        let f = RingFile::open(dir.path().join("f"), create).await.unwrap();
        let ts = Box::new(types::Timespec::new().sec(600));
        let mut timeout = Box::pin(op::submit(
            io_uring::opcode::Timeout::new(&*ts).count(1).build(),
            Hold::new(&f.file, None, Keep::none()),
        ));
        assert!(futures::poll!(timeout.as_mut()).is_pending());
        let ring = driver::current().unwrap();
        assert_eq!(ring.unsubmitted(), 0, "a lone request waits for a batch");
        Busy {
            _dir: dir,
            f,
            ring,
            timeout,
            _ts: ts,
        }
    }

    impl Busy {
        /// Waits for the timeout, which ends by its count (another request completed), not
        /// its time.
        async fn ends(self) {
            let (r, _) = self.timeout.await;
            assert_eq!(r.unwrap(), 0, "the timeout ends by its count, not its time");
        }
    }

    /// A request dropped while queued (waiting for its batch) is submitted by its drop: it
    /// completes and its keep goes, although nothing else comes to the ring.
    #[tokio::test]
    async fn a_request_dropped_while_queued_is_submitted() {
        use io_uring::opcode;
        let busy = busy_ring().await;
        let (f, ring) = (&busy.f, &busy.ring);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let nop = op::submit(
            opcode::Nop::new().build(),
            Hold::new(&f.file, None, Keep::new(tx)),
        );
        let mut nop = Box::pin(nop);
        assert!(futures::poll!(nop.as_mut()).is_pending());
        assert_eq!(
            ring.unsubmitted(),
            1,
            "the second request waits for its batch"
        );
        drop(nop);
        assert_eq!(ring.unsubmitted(), 0);
        let dropped = tokio::time::timeout(std::time::Duration::from_secs(60), rx).await;
        assert!(dropped.is_ok(), "the keep of a dropped request never went");
        busy.ends().await;
    }

    /// Requests queued behind a busy ring go to the kernel four at a time: the fourth
    /// submits the batch when it is queued, without a second poll or a park.
    #[tokio::test]
    async fn the_fourth_queued_request_submits_the_batch() {
        use io_uring::opcode;
        let busy = busy_ring().await;
        let (f, ring) = (&busy.f, &busy.ring);
        let mut nops = Vec::new();
        for queued in 1..=4u64 {
            let nop = op::submit(
                opcode::Nop::new().build(),
                Hold::new(&f.file, None, Keep::none()),
            );
            let mut nop = Box::pin(nop);
            assert!(futures::poll!(nop.as_mut()).is_pending());
            nops.push(nop);
            let waiting = if queued < 4 { queued } else { 0 };
            assert_eq!(ring.unsubmitted(), waiting, "after {queued} queued");
        }
        for nop in nops {
            nop.await.0.unwrap();
        }
        busy.ends().await;
    }

    /// A flush cancelled by its ring closing never ran: it is no flush failure. (A FIFO read
    /// marked as a flush stands for it: it stays in the kernel until the ring cancels it.)
    #[test]
    fn a_flush_cancelled_is_no_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let rw = OpenOptions {
            write: true,
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let f = rt.block_on(async {
            let f = RingFile::open(&path, rw).await.unwrap();
            let mut buf = IoBuf::new(4);
            let entry = opcode::Read::new(f.fd(), buf.as_mut_ptr(), 4).build();
            let mut hold = Hold::new(&f.file, Some(buf), Keep::none());
            hold.flush = true;
            let mut read = Box::pin(op::submit(entry, hold));
            assert!(futures::poll!(read.as_mut()).is_pending());
            f
        });
        drop(rt);
        // The thread's next ring closes the old one, which cancels the read.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { driver::current().unwrap() });
        assert_eq!(f.flush_failures(), 0);
    }

    /// Each thread has its own ring, set up once for each runtime; the ring of a runtime
    /// shut down is replaced.
    #[test]
    fn a_ring_per_thread_and_runtime() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let here = rt.block_on(async { driver::current().unwrap() });
        let again = rt.block_on(async { driver::current().unwrap() });
        assert!(Arc::ptr_eq(&here, &again), "a second ring on one thread");
        let handle = rt.handle().clone();
        let there = std::thread::spawn(move || {
            let _enter = handle.enter();
            driver::current().unwrap()
        })
        .join()
        .unwrap();
        assert!(!Arc::ptr_eq(&here, &there), "two threads share a ring");
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let other_ring = other.block_on(async { driver::current().unwrap() });
        assert!(
            !Arc::ptr_eq(&here, &other_ring),
            "two runtimes share a ring"
        );
        let other_weak = Arc::downgrade(&other_ring);
        drop((there, other_ring));
        // The runtime goes, and its reaper: the thread drops that ring at its next use.
        drop(other);
        let after = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let new_ring = after.block_on(async { driver::current().unwrap() });
        assert!(!Arc::ptr_eq(&here, &new_ring));
        assert!(other_weak.upgrade().is_none(), "the ring of a runtime gone");
        let here_weak = Arc::downgrade(&here);
        drop((here, again));
        drop(rt);
        let replaced = after.block_on(async { driver::current().unwrap() });
        assert!(Arc::ptr_eq(&new_ring, &replaced));
        assert!(here_weak.upgrade().is_none(), "the ring of a runtime gone");
    }

    /// With the park hook, a thread that would sleep with a request in the kernel polls for
    /// its completion and hands it on itself; with a zero poll it sleeps, and the reaper
    /// does. O_DIRECT reads of a file on the crate's own (disk) file system: each waits in
    /// the kernel for the device.
    #[test]
    fn the_park_hook_polls_for_completions() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        std::fs::write(
            &path,
            (0..=255u8).cycle().take(1 << 16).collect::<Vec<u8>>(),
        )
        .unwrap();
        let polls = [
            (std::time::Duration::from_secs(1), true),
            (std::time::Duration::ZERO, false),
        ];
        for (poll, expect_polled) in polls {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(RingOpener::park_hook(poll))
                .build()
                .unwrap();
            let polled = rt.block_on(async {
                let o = OpenOptions {
                    direct: true,
                    ..Default::default()
                };
                let f = RingFile::open(&path, o).await.unwrap();
                let ring = driver::current().unwrap();
                for i in 0..16u64 {
                    let buf = IoBuf::with_alignment(4096, f.alignment().max(4096));
                    let (r, buf) = f.read_at(buf, i * 4096).await;
                    assert_eq!(r.unwrap(), 4096);
                    assert!(buf.iter().enumerate().all(|(k, b)| *b == k as u8));
                }
                ring.polled.load(Ordering::Relaxed)
            });
            let what = format!("completions handed on by the hook: {polled}");
            assert_eq!(polled > 0, expect_polled, "{what}");
        }
    }
}
