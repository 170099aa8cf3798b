//! Reads served from the page cache without a trip through io_uring or the blocking pool.

use crate::sys;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The page-cache fast path of a file opened without O_DIRECT: a read whose data the page
/// cache holds is copied by one `preadv2(RWF_NOWAIT)` on the calling thread, without the
/// trip through io_uring or the blocking pool (a memory copy, never a wait for the disk).
/// After [`CacheReads::COLD`] misses in a row the attempts stop but for one read in
/// [`CacheReads::PROBE`] (a file that is not in the cache pays little for the probe); a file
/// system that refuses RWF_NOWAIT turns it off. An O_DIRECT file never takes it (its reads
/// bypass the page cache).
#[derive(Debug, Default)]
pub(crate) struct CacheReads {
    /// Misses in a row (saturating at `COLD`).
    pub(crate) misses: AtomicU32,
    /// Reads while cold, to pick the probes.
    cold_reads: AtomicU32,
    /// O_DIRECT, or RWF_NOWAIT refused (EOPNOTSUPP): never again.
    pub(crate) off: AtomicBool,
}

impl CacheReads {
    pub(crate) const COLD: u32 = 8;
    pub(crate) const PROBE: u32 = 64;

    /// The fast path of a file opened with O_DIRECT (`direct`: off for good) or without.
    pub(crate) fn new(direct: bool) -> CacheReads {
        CacheReads {
            off: AtomicBool::new(direct),
            ..Default::default()
        }
    }

    /// Reads into `buf` what the page cache holds of the range of `fd` at `offset`, if this
    /// read should try: `Some(n)` when it read `n` bytes (fewer than asked when the rest is
    /// not cached; 0 at the end of the file), `None` when the caller must read the usual way
    /// (the first page is not cached, the attempts are off for now, or an error, which the
    /// usual read will report).
    pub(crate) fn read(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> Option<usize> {
        if buf.is_empty() || !self.attempt() {
            return None;
        }
        match sys::pread_nowait(fd, buf, offset) {
            Ok(n) => {
                self.note(true);
                Some(n)
            }
            Err(e) => {
                match sys::is_unsupported(&e) {
                    true => self.off.store(true, Ordering::Relaxed),
                    false => self.note(false),
                }
                None
            }
        }
    }

    /// Whether this read should try the page cache.
    pub(crate) fn attempt(&self) -> bool {
        if self.off.load(Ordering::Relaxed) {
            return false;
        }
        self.misses.load(Ordering::Relaxed) < Self::COLD
            || self.cold_reads.fetch_add(1, Ordering::Relaxed) % Self::PROBE == 0
    }

    /// Records a hit (`true`) or a miss.
    fn note(&self, hit: bool) {
        match hit {
            true => self.misses.store(0, Ordering::Relaxed),
            false => {
                let m = self.misses.load(Ordering::Relaxed);
                if m < Self::COLD {
                    self.misses.store(m + 1, Ordering::Relaxed);
                }
            }
        }
    }
}
