//! The owned, aligned I/O buffer.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;

/// Default alignment of buffers: one page, enough for O_DIRECT on every device.
pub const DEFAULT_ALIGN: usize = 4096;

/// An owned, zero-initialised, aligned heap buffer with a movable window.
///
/// I/O acts on the window `[start, end)` (initially the whole capacity), so one buffer can
/// receive several pieces of a request at different positions without a copy. The allocation
/// is aligned to [`DEFAULT_ALIGN`] unless asked otherwise, so it can be used with O_DIRECT.
/// `Deref` gives the window as a slice.
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    align: usize,
    start: usize,
    end: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes, page aligned.
    pub fn new(len: usize) -> Self {
        Self::with_alignment(len, DEFAULT_ALIGN)
    }

    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    pub fn with_alignment(len: usize, align: usize) -> Self {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        let layout = Layout::from_size_align(len.max(1), align).expect("buffer size overflows");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            ptr,
            cap: len,
            align,
            start: 0,
            end: len,
        }
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
            .finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap.max(1), self.align).expect("valid layout");
        // SAFETY: allocated in with_alignment with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    #[should_panic(expected = "outside buffer")]
    fn window_past_capacity_panics() {
        IoBuf::new(4).set_window(2..5);
    }
}
