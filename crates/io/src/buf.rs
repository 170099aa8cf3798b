//! The owned, aligned I/O buffer.

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;
use std::sync::Arc;

/// Default alignment of buffers: one page, enough for O_DIRECT on every device.
pub const DEFAULT_ALIGN: usize = 4096;

/// Buffers of at least this size (a transparent huge page on x86-64 and arm64 with 4 KiB
/// pages) are aligned to it and offered to transparent huge pages (`MADV_HUGEPAGE`) before
/// they are first touched. A request's buffer that is physically contiguous is one segment
/// for the block layer rather than one per 4 KiB page: fewer descriptors on a virtio queue
/// (a 1 MiB read in 4 KiB pages takes 256 and is split in two, and a queue of 256 holds one
/// such request at a time), fewer scatter-gather entries on any device.
pub const HUGE_PAGE: usize = 2 << 20;

/// An owned, zero-initialised, aligned heap buffer with a movable window.
///
/// I/O acts on the window `[start, end)` (initially the whole capacity), so one buffer can
/// receive several pieces of a request at different positions without a copy. The allocation
/// is aligned to [`DEFAULT_ALIGN`] unless asked otherwise, so it can be used with O_DIRECT.
/// `Deref` gives the window as a slice.
///
/// A buffer can carry a [`Keep`] ([`IoBuf::attach`]): whatever must stay alive while an
/// operation on the buffer may still touch the file. A backend drops the buffer it was
/// handed, and so the keep, only once the operation is over, even when the future that
/// started it is dropped first.
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    align: usize,
    start: usize,
    end: usize,
    keep: Keep,
    /// For memory the buffer does not own ([`IoBuf::from_raw_parts`]): what keeps it valid,
    /// dropped with the buffer instead of freeing the memory.
    external: Option<Box<dyn Send + Sync>>,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Vec<u8>, or has exclusive use of
// external memory by the contract of `from_raw_parts` (whose owner is Send + Sync).
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes, page aligned.
    pub fn new(len: usize) -> Self {
        Self::with_alignment(len, DEFAULT_ALIGN)
    }

    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two), and to
    /// [`HUGE_PAGE`] from that size up (see there).
    pub fn with_alignment(len: usize, align: usize) -> Self {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        let huge = len >= HUGE_PAGE;
        let align = if huge { align.max(HUGE_PAGE) } else { align };
        let layout = Layout::from_size_align(len.max(1), align).expect("buffer size overflows");
        let raw = if huge {
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { alloc(layout) };
            if !raw.is_null() {
                // SAFETY: advice on the pages of our own allocation, which starts on a page
                // boundary; refused advice (no transparent huge pages) changes nothing.
                unsafe { libc::madvise(raw.cast(), len, libc::MADV_HUGEPAGE) };
                // SAFETY: `raw` is valid for writes of `len` bytes.
                unsafe { raw.write_bytes(0, len) };
            }
            raw
        } else {
            // SAFETY: the layout has a non-zero size.
            unsafe { alloc_zeroed(layout) }
        };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            ptr,
            cap: len,
            align,
            start: 0,
            end: len,
            keep: Keep::none(),
            external: None,
        }
    }

    /// A buffer over `len` bytes at `ptr` that it does not own (a guest's memory, a
    /// caller's mapping), for I/O without a copy. `owner` keeps the memory valid: the buffer
    /// drops it when it is dropped, which may be after the future of the request that used
    /// the buffer was dropped (the backend keeps the buffer until the kernel is done with
    /// it). The alignment is the largest power of two dividing `ptr`, at most
    /// [`DEFAULT_ALIGN`]; with O_DIRECT, a misaligned buffer costs the engine a bounce copy.
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads and writes of `len` initialised bytes for as long as
    /// `owner` is alive, and nothing else may write those bytes while the buffer exists (nor
    /// read them while a read into the buffer may be in progress).
    pub unsafe fn from_raw_parts(
        ptr: NonNull<u8>,
        len: usize,
        owner: impl Send + Sync + 'static,
    ) -> Self {
        let align = 1usize << (ptr.as_ptr() as usize).trailing_zeros();
        Self {
            ptr,
            cap: len,
            align: align.min(DEFAULT_ALIGN),
            start: 0,
            end: len,
            keep: Keep::none(),
            external: Some(Box::new(owner)),
        }
    }

    /// `count` zeroed buffers of `len` bytes each, carved out of one allocation (each
    /// starting on a [`DEFAULT_ALIGN`] boundary), which lives until the last of them is
    /// dropped. Where the allocation reaches [`HUGE_PAGE`] and the kernel grants it huge
    /// pages, a buffer's pages are physically contiguous within each huge page: what a
    /// request queue at depth N wants for its N buffers (1 MiB O_DIRECT reads at QD32 on a
    /// virtio disk: about twice the rate of 32 separate buffers, see docs/BENCHMARKS.md).
    pub fn slab(count: usize, len: usize) -> Vec<IoBuf> {
        let stride = len.max(1).next_multiple_of(DEFAULT_ALIGN);
        let mut region = IoBuf::new(stride.checked_mul(count).expect("slab size overflows"));
        let base = region.as_mut_ptr();
        let region = Arc::new(region);
        (0..count)
            .map(|i| {
                // SAFETY: buffer i is the region's bytes [i * stride, i * stride + len),
                // disjoint from the others' and inside the allocation, which the region
                // (owned by the buffers, reachable by nothing else) keeps valid.
                unsafe {
                    let ptr = NonNull::new_unchecked(base.add(i * stride));
                    IoBuf::from_raw_parts(ptr, len, region.clone())
                }
            })
            .collect()
    }

    /// Whether the buffer is memory it does not own ([`IoBuf::from_raw_parts`]).
    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    /// A page-aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::new(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Size of the whole allocation.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Alignment of the allocation.
    pub fn alignment(&self) -> usize {
        self.align
    }

    /// Length of the window.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The current window, as a range of the whole allocation.
    pub fn window(&self) -> Range<usize> {
        self.start..self.end
    }

    /// Moves the window to `range` (of the whole allocation).
    ///
    /// # Panics
    /// If the range is reversed or exceeds the capacity.
    pub fn set_window(&mut self, range: Range<usize>) {
        assert!(
            range.start <= range.end && range.end <= self.cap,
            "window {range:?} outside buffer of {} bytes",
            self.cap
        );
        self.start = range.start;
        self.end = range.end;
    }

    /// Makes the window the whole allocation.
    pub fn reset_window(&mut self) {
        self.start = 0;
        self.end = self.cap;
    }

    /// The whole allocation, ignoring the window.
    pub fn as_full_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    /// The whole allocation, mutably, ignoring the window.
    pub fn as_full_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap initialised bytes and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    /// Pointer to the start of the window.
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: start <= cap.
        unsafe { self.ptr.as_ptr().add(self.start) }
    }

    /// Mutable pointer to the start of the window.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: start <= cap.
        unsafe { self.ptr.as_ptr().add(self.start) }
    }

    /// Whether the window's address and length are multiples of `align` (O_DIRECT's rule).
    pub fn is_aligned_to(&self, align: usize) -> bool {
        (self.as_ptr() as usize) % align == 0 && self.len() % align == 0
    }

    /// Adds `keep` to what the buffer keeps alive (see [`Keep`]). It stays attached until
    /// [`take_keep`](Self::take_keep) or the buffer's drop.
    pub fn attach(&mut self, keep: Keep) {
        let old = std::mem::take(&mut self.keep);
        self.keep = old.and(keep);
    }

    /// Detaches everything the buffer keeps alive.
    pub fn take_keep(&mut self) -> Keep {
        std::mem::take(&mut self.keep)
    }

    /// Whether the buffer keeps something alive.
    pub fn has_keep(&self) -> bool {
        !self.keep.is_empty()
    }

    /// Converts the window into [`bytes::Bytes`] without copying.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(WindowOwner(self))
    }
}

struct WindowOwner(IoBuf);

impl AsRef<[u8]> for WindowOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.as_full_slice()[self.start..self.end]
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let (s, e) = (self.start, self.end);
        &mut self.as_full_mut_slice()[s..e]
    }
}

impl Clone for IoBuf {
    /// A copy of the bytes and the window; the copy keeps nothing alive.
    fn clone(&self) -> Self {
        let mut b = Self::with_alignment(self.cap, self.align);
        b.as_full_mut_slice().copy_from_slice(self.as_full_slice());
        b.start = self.start;
        b.end = self.end;
        b
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("capacity", &self.cap)
            .field("window", &(self.start..self.end))
            .field("keep", &!self.keep.is_empty())
            .finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.external.is_some() {
            // Not ours to free: `external` keeps the memory valid and drops after this.
            return;
        }
        let layout = Layout::from_size_align(self.cap.max(1), self.align).expect("valid layout");
        // SAFETY: allocated in with_alignment with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// What an I/O operation keeps alive until the backend is done with it: the guards of the
/// request that issued it (leases, gates, a reserved cluster, a count of operations in
/// flight).
///
/// Dropping a future is routine in async Rust, but an operation the backend has accepted
/// still completes: io_uring finishes it in the kernel, a blocking-pool task runs to its
/// end. So the guards of an operation cannot live in the future that issued it. Every
/// [`Backend`](crate::Backend) operation takes a `Keep` (reads and writes in their
/// [`IoBuf`], the others as an argument) and drops it only once the operation can no longer
/// touch the file: when it completes, fails, or was never started.
///
/// Cheap to clone (an `Arc`); clones share the guards, which drop with the last clone.
/// Built with `--cfg qcow2_no_keep` (a test-only switch) a keep holds nothing, so guards live
/// only as long as the futures that hold them: the cancellation tests must then fail.
#[derive(Clone, Default)]
pub struct Keep(Option<Arc<dyn Send + Sync>>);

impl Keep {
    /// Keeps nothing.
    pub fn none() -> Self {
        Keep(None)
    }

    /// Keeps `guard` alive.
    pub fn new<T: Send + Sync + 'static>(guard: T) -> Self {
        if cfg!(qcow2_no_keep) {
            // The switch that proves the cancellation tests can fail: the guard dies here,
            // and only the issuing future's own handle on it (if any) keeps it alive.
            drop(guard);
            return Keep(None);
        }
        Keep(Some(Arc::new(guard)))
    }

    /// Keeps what `shared` points to alive, sharing it (no new allocation: a request's guards
    /// go to each of its operations this way).
    pub fn from_arc<T: Send + Sync + 'static>(shared: Arc<T>) -> Self {
        if cfg!(qcow2_no_keep) {
            drop(shared);
            return Keep(None);
        }
        Keep(Some(shared))
    }

    /// Keeps both alive.
    pub fn and(self, other: Keep) -> Keep {
        match (self.0, other.0) {
            (None, b) => Keep(b),
            (a, None) => Keep(a),
            (Some(a), Some(b)) => Keep(Some(Arc::new((a, b)))),
        }
    }

    /// Whether it keeps nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl std::fmt::Debug for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Keep(..)"
        } else {
            "Keep(none)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slab's buffers are zeroed, page aligned, disjoint, of the length asked, and the
    /// memory stays valid until the last of them goes.
    #[test]
    fn a_slab_hands_out_disjoint_buffers() {
        let mut bufs = IoBuf::slab(5, 5000);
        assert_eq!(bufs.len(), 5);
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.len(), 5000);
            assert_eq!(b.as_ptr() as usize % DEFAULT_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(i as u8 + 1);
        }
        let first = bufs.remove(0);
        drop(bufs.split_off(1));
        assert!(first.iter().all(|&x| x == 1));
        assert!(bufs[0].iter().all(|&x| x == 2));
        let starts: Vec<usize> = IoBuf::slab(3, 100)
            .iter()
            .map(|b| b.as_ptr() as usize)
            .collect();
        assert_eq!(starts[1] - starts[0], DEFAULT_ALIGN);
        assert_eq!(starts[2] - starts[1], DEFAULT_ALIGN);
    }

    /// A buffer of a huge page or more starts on a huge page, zeroed; a smaller one keeps the
    /// alignment asked.
    #[test]
    fn large_buffers_start_on_a_huge_page() {
        let big = IoBuf::new(HUGE_PAGE + 4096);
        assert_eq!(big.alignment(), HUGE_PAGE);
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(big.iter().all(|&x| x == 0));
        let slab = IoBuf::slab(4, HUGE_PAGE / 2);
        assert_eq!(slab[0].as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(slab[2].as_ptr() as usize % HUGE_PAGE, 0);
        let small = IoBuf::new(HUGE_PAGE / 2);
        assert_eq!(small.alignment(), DEFAULT_ALIGN);
    }

    #[test]
    fn window_moves_and_derefs() {
        let mut b = IoBuf::new(16);
        assert_eq!(b.as_ptr() as usize % DEFAULT_ALIGN, 0);
        b.set_window(4..8);
        b.fill(0xab);
        b.reset_window();
        assert_eq!(&b[..4], &[0; 4]);
        assert_eq!(&b[4..8], &[0xab; 4]);
        assert_eq!(&b[8..], &[0; 8]);
    }

    #[test]
    fn into_bytes_keeps_the_window() {
        let mut b = IoBuf::from_slice(b"hello world");
        b.set_window(6..11);
        assert_eq!(&b.into_bytes()[..], b"world");
    }

    #[test]
    fn a_keep_lives_while_the_buffer_or_a_clone_does() {
        let guard = Arc::new(());
        let mut b = IoBuf::new(8);
        b.attach(Keep::new(guard.clone()));
        b.attach(Keep::new(guard.clone()));
        let copy = b.clone();
        assert!(b.has_keep() && !copy.has_keep());
        let k = b.take_keep();
        assert!(!b.has_keep());
        let k2 = k.clone();
        drop(k);
        assert_eq!(Arc::strong_count(&guard), 3);
        drop(k2);
        assert_eq!(Arc::strong_count(&guard), 1);
        b.attach(Keep::new(guard.clone()));
        drop(b);
        assert_eq!(Arc::strong_count(&guard), 1);
    }

    #[test]
    #[should_panic(expected = "outside buffer")]
    fn window_past_capacity_panics() {
        IoBuf::new(4).set_window(2..5);
    }
}
