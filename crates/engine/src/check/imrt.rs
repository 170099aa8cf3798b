//! The in-memory refcount table a check builds (QEMU's IMRT).

use qcow2_format::RefcountWidth;

/// The in-memory refcount table (QEMU's "IMRT"): one entry per host cluster, packed in the
/// image's refcount width so that a slice of it is a refcount block as it goes to disk.
pub(super) struct Imrt {
    width: RefcountWidth,
    cluster_size: u64,
    bytes: Vec<u8>,
    pub(super) len: u64,
}

impl Imrt {
    pub(super) fn new(width: RefcountWidth, cluster_size: u64) -> Self {
        Self {
            width,
            cluster_size,
            bytes: Vec::new(),
            len: 0,
        }
    }

    /// Bytes for `n` entries, rounded up to whole clusters.
    pub(super) fn byte_size(&self, n: u64) -> Option<usize> {
        let bits = n.checked_mul(u64::from(self.width.bits()))?;
        let bytes = bits.div_ceil(8).div_ceil(self.cluster_size) * self.cluster_size;
        usize::try_from(bytes).ok()
    }

    /// Makes room for `n` entries (new ones are 0).
    pub(super) fn resize(&mut self, n: u64) -> std::result::Result<(), ()> {
        let want = self.byte_size(n).ok_or(())?;
        if self.bytes.is_empty() {
            // Zeroed by the allocator, page by page as it is touched: a sparse file's table
            // costs memory only where clusters are in use.
            self.bytes = vec![0; want];
        } else if want > self.bytes.len() {
            self.bytes
                .try_reserve_exact(want - self.bytes.len())
                .map_err(|_| ())?;
            self.bytes.resize(want, 0);
        }
        self.len = self.len.max(n);
        Ok(())
    }

    pub(super) fn get(&self, i: u64) -> u64 {
        if i >= self.len {
            0
        } else {
            self.width.get(&self.bytes, i)
        }
    }

    /// Sets entry `i` (< len) to `v` (<= the width's maximum).
    pub(super) fn set(&mut self, i: u64, v: u64) {
        debug_assert!(i < self.len);
        self.width
            .set(&mut self.bytes, i, v)
            .expect("value bounded by the refcount width");
    }

    pub(super) fn clear(&mut self) {
        self.bytes.fill(0);
    }

    /// The bytes of refcount block `index` (within the table: callers only ask for blocks
    /// that describe an entry below `len`).
    pub(super) fn block(&self, index: u64) -> &[u8] {
        let cs = self.cluster_size as usize;
        let start = index as usize * cs;
        &self.bytes[start..start + cs]
    }
}
