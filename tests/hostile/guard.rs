//! Resource guards for hostile-input cases: an allocator that measures what the engine
//! allocates while a case runs, and a backend wrapper that bounds how far the engine may grow
//! a file and records every write it attempts.

use blockio::{Allocation, Backend, BufResult, IoBuf, Keep, OpenOptions, Opener};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A single allocation above this while a case runs is a finding: nothing the engine reads
/// from a valid image of the fixtures' size needs that much at once, so it was sized by an
/// unchecked on-disk number.
pub const SINGLE_ALLOC_LIMIT: usize = 256 << 20;
/// Growth of the bytes live on a case's thread above this is a finding (the brief's 1 GiB).
pub const LIVE_GROWTH_LIMIT: isize = 1 << 30;
/// A single allocation above this is refused outright (the process then aborts, after saying
/// which case did it), to keep a shared machine alive.
const HARD_LIMIT: usize = 2 << 30;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static NET: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static CASE: Cell<u64> = const { Cell::new(0) };
    static OP: Cell<&'static str> = const { Cell::new("-") };
    static PEAK_OP: Cell<&'static str> = const { Cell::new("-") };
    static LARGEST_OP: Cell<&'static str> = const { Cell::new("-") };
}

/// Names the operation a case is running (for reports of hangs and of memory use).
pub fn set_op(op: &'static str) {
    let _ = OP.try_with(|o| o.set(op));
}

/// The operation a case is running.
pub fn op() -> &'static str {
    OP.with(|o| o.get())
}

/// The test binary's allocator: the system allocator, plus accounting on armed threads.
pub struct GuardAlloc;

fn grow(size: usize) -> bool {
    // `try_with` so that allocations during thread teardown are simply not counted.
    ARMED
        .try_with(|armed| {
            if !armed.get() {
                return true;
            }
            let net = NET.get() + size as isize;
            NET.set(net);
            if net > PEAK.get() {
                PEAK.set(net);
                PEAK_OP.set(OP.get());
            }
            if size > LARGEST.get() {
                LARGEST.set(size);
                LARGEST_OP.set(OP.get());
            }
            if size > HARD_LIMIT {
                let mut msg = [0u8; 160];
                let n = fmt_abort(&mut msg, size as u64, CASE.get());
                let _ = io::stderr().write_all(&msg[..n]);
                return false;
            }
            true
        })
        .unwrap_or(true)
}

fn shrink(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            NET.set(NET.get() - size as isize);
        }
    });
}

/// "hostile_images: refusing an allocation of N bytes in case seed 0xS\n", without allocating.
fn fmt_abort(out: &mut [u8; 160], size: u64, seed: u64) -> usize {
    let mut n = 0;
    let mut put = |s: &[u8]| {
        out[n..n + s.len()].copy_from_slice(s);
        n += s.len();
    };
    put(b"\nhostile_images: refusing an allocation of ");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = size;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" bytes in case seed 0x");
    let mut hex = [0u8; 16];
    for (k, h) in hex.iter_mut().enumerate() {
        let nib = (seed >> (60 - 4 * k)) & 0xf;
        *h = b"0123456789abcdef"[nib as usize];
    }
    put(&hex);
    put(b" (reproduce with HOSTILE_SEED)\n");
    n
}

unsafe impl GlobalAlloc for GuardAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !grow(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !grow(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrink(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            if !grow(new_size - layout.size()) {
                return std::ptr::null_mut();
            }
        } else {
            shrink(layout.size() - new_size);
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// What the allocator saw while armed.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllocStats {
    /// Largest single allocation.
    pub largest: usize,
    /// The operation that made it.
    pub largest_op: &'static str,
    /// Peak growth of live bytes on the thread.
    pub peak_growth: isize,
    /// The operation running at the peak.
    pub peak_op: &'static str,
}

/// Starts accounting on this thread for case `seed`.
pub fn arm(seed: u64) {
    NET.set(0);
    PEAK.set(0);
    LARGEST.set(0);
    CASE.set(seed);
    OP.set("-");
    PEAK_OP.set("-");
    LARGEST_OP.set("-");
    ARMED.set(true);
}

/// Stops accounting and returns what was seen.
pub fn disarm() -> AllocStats {
    ARMED.set(false);
    AllocStats {
        largest: LARGEST.get(),
        largest_op: LARGEST_OP.get(),
        peak_growth: PEAK.get(),
        peak_op: PEAK_OP.get(),
    }
}

/// Runs `f` without accounting (for the harness's own allocations inside a case, such as a
/// file growing in memory).
pub fn unaccounted<T>(f: impl FnOnce() -> T) -> T {
    let was = ARMED.get();
    ARMED.set(false);
    let out = f();
    ARMED.set(was);
    out
}

/// Per-file record of what the engine did to a file.
#[derive(Debug, Default)]
pub struct FileLog {
    /// Write-like requests (write, write zeroes, punch hole, set_len) attempted.
    pub writes: AtomicU64,
    /// Requests refused because they reached past the cap.
    pub past_cap: AtomicU64,
    /// The furthest end offset of a refused request.
    pub past_cap_end: AtomicU64,
    /// The operation (see [`set_op`]) that made the furthest refused request.
    pub past_cap_op: Mutex<&'static str>,
    /// `set_len` requests past the cap (refused too, but never a finding: `qemu-img check -r`
    /// grows the file to hold a refcount block the table places outside it, and so does the
    /// engine's repair).
    pub set_len_past_cap: AtomicU64,
}

/// A backend that refuses to grow a file past `cap` bytes (EFBIG) and logs write attempts.
#[derive(Clone)]
pub struct Guarded<B> {
    inner: B,
    cap: u64,
    log: Arc<FileLog>,
}

impl<B: Backend> Guarded<B> {
    fn check(&self, end: Option<u64>) -> io::Result<()> {
        self.log.writes.fetch_add(1, Ordering::Relaxed);
        match end {
            Some(e) if e <= self.cap => Ok(()),
            _ => {
                self.log.past_cap.fetch_add(1, Ordering::Relaxed);
                let end = end.unwrap_or(u64::MAX);
                if self.log.past_cap_end.fetch_max(end, Ordering::Relaxed) < end {
                    *self.log.past_cap_op.lock().unwrap() = op();
                }
                Err(io::Error::from_raw_os_error(27)) // EFBIG
            }
        }
    }
}

impl<B: Backend> Backend for Guarded<B> {
    async fn read_at(&self, buf: IoBuf, offset: u64) -> BufResult<usize> {
        // The memory backend never yields: without this, a case in memory could not be
        // stopped by a timeout however long it ran.
        tokio::task::yield_now().await;
        self.inner.read_at(buf, offset).await
    }

    async fn write_at(&self, buf: IoBuf, offset: u64) -> BufResult<()> {
        tokio::task::yield_now().await;
        if let Err(e) = self.check(offset.checked_add(buf.len() as u64)) {
            return (Err(e), buf);
        }
        // The memory backend grows its vector here: the harness's allocation, not the engine's.
        let was = ARMED.get();
        ARMED.set(false);
        let r = self.inner.write_at(buf, offset).await;
        ARMED.set(was);
        r
    }

    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }

    fn flush_failures(&self) -> u64 {
        self.inner.flush_failures()
    }

    async fn punch_hole(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        self.log.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.punch_hole(offset, len, keep).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        self.check(offset.checked_add(len))?;
        let was = ARMED.get();
        ARMED.set(false);
        let r = self.inner.write_zeroes(offset, len, keep).await;
        ARMED.set(was);
        r
    }

    async fn len(&self) -> io::Result<u64> {
        self.inner.len().await
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.cap {
            self.log.writes.fetch_add(1, Ordering::Relaxed);
            self.log.set_len_past_cap.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::from_raw_os_error(27)); // EFBIG
        }
        self.check(Some(len))?;
        let was = ARMED.get();
        ARMED.set(false);
        let r = self.inner.set_len(len).await;
        ARMED.set(was);
        r
    }

    fn alignment(&self) -> usize {
        self.inner.alignment()
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Allocation> {
        self.inner.allocation(offset, len).await
    }

    async fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size().await
    }
}

/// Opens [`Guarded`] backends through an inner opener; every file gets the same growth
/// allowance above its length at open, and a [`FileLog`] kept by path.
#[derive(Clone)]
pub struct GuardedOpener<O> {
    inner: O,
    growth: u64,
    logs: Arc<Mutex<HashMap<PathBuf, Arc<FileLog>>>>,
}

impl<O: Opener> GuardedOpener<O> {
    /// Wraps `inner`; files may grow by `growth` bytes.
    pub fn new(inner: O, growth: u64) -> Self {
        Self {
            inner,
            growth,
            logs: Default::default(),
        }
    }

    /// Write attempts and refusals per path so far.
    pub fn logs(&self) -> Vec<(PathBuf, Arc<FileLog>)> {
        let m = self.logs.lock().unwrap();
        m.iter().map(|(p, l)| (p.clone(), l.clone())).collect()
    }
}

impl<O: Opener> Opener for GuardedOpener<O> {
    type Backend = Guarded<O::Backend>;

    async fn open(&self, path: &Path, options: OpenOptions) -> io::Result<Self::Backend> {
        let inner = self.inner.open(path, options).await?;
        let len = inner.len().await?;
        let log = self
            .logs
            .lock()
            .unwrap()
            .entry(path.to_path_buf())
            .or_default()
            .clone();
        Ok(Guarded {
            inner,
            cap: len.saturating_add(self.growth),
            log,
        })
    }
}
