//! The overlap check on a repair's writes (QEMU's metadata overlap check), and corruption
//! found while repairing.

use super::*;

impl<B: Backend> Checker<'_, B> {
    /// Refuses a metadata write that would overwrite other live metadata, as QEMU's
    /// `qcow2_pre_write_overlap_check` does: the image is then marked corrupt (once), and the
    /// repair stops.
    pub(super) async fn guard_write(&mut self, offset: u64, len: u64, ignore: Overlap) -> Step {
        let Some(what) = self.overlaps_metadata(offset, len, ignore) else {
            return Ok(());
        };
        self.signal_corruption(format!(
            "Preventing invalid write on metadata (overlaps with {what})"
        ))
        .await;
        Err(Abort(EIO.into()))
    }

    /// Reports inconsistent metadata met on the way (qcow2_signal_corruption): once per open
    /// image; during a repair it is fatal and sets the corrupt bit, as QEMU does on a
    /// read-write image.
    pub(super) async fn signal_corruption(&mut self, what: String) {
        let fatal = self.writable;
        if self.corruption_signaled && (!fatal || self.header.is_corrupt()) {
            return;
        }
        self.corruption_signaled = true;
        if !fatal {
            msg!(
                self,
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be \
                 suppressed"
            );
            return;
        }
        msg!(
            self,
            "qcow2: Marking image as corrupt: {what}; further corruption events will be \
             suppressed"
        );
        let mut header = self.header.clone();
        header.incompatible_features |= INCOMPAT_CORRUPT;
        // Best effort (v3 only: v2 has no feature bits): the repair stops or fails anyway.
        if header.version >= 3 {
            let _ = self.write_header_fields(&header, 72..80).await;
        }
        self.header = header;
    }

    /// Which live metadata `[offset, offset+len)` would overwrite, if any (QEMU's overlap
    /// check in its default "cached" mode), ignoring the kind being written.
    pub(super) fn overlaps_metadata(
        &self,
        offset: u64,
        len: u64,
        ignore: Overlap,
    ) -> Option<&'static str> {
        if len == 0 {
            return None;
        }
        if offset < self.cs {
            return Some("qcow2_header");
        }
        let cs = self.cs;
        let start = offset / cs * cs;
        let end = (offset + len).div_ceil(cs) * cs;
        let hit = |o: u64, l: u64| l > 0 && o < end && start < o.saturating_add(l);
        let h = &self.header;
        if ignore != Overlap::ActiveL1 && hit(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            return Some("active L1 table");
        }
        if hit(h.refcount_table_offset, self.reftable.len() as u64 * 8) {
            return Some("refcount table");
        }
        let snapshots = self.snapshots.as_deref().unwrap_or_default();
        if hit(h.snapshots_offset, self.snapshots_size) {
            return Some("snapshot table");
        }
        if snapshots
            .iter()
            .any(|s| hit(s.l1_table_offset, u64::from(s.l1_size) * 8))
        {
            return Some("inactive L1 table");
        }
        if ignore != Overlap::ActiveL2 && self.l1.iter().any(|e| hit(e.raw_offset(), cs)) {
            return Some("active L2 table");
        }
        if ignore != Overlap::RefcountBlock && self.reftable.iter().any(|e| hit(e.raw_offset(), cs))
        {
            return Some("refcount block");
        }
        if h.autoclear_features & AUTOCLEAR_BITMAPS != 0 && ignore != Overlap::BitmapDirectory {
            if let Some(b) = h.bitmaps() {
                if hit(b.directory_offset, b.directory_size) {
                    return Some("bitmap directory");
                }
            }
        }
        // Inactive L2 tables are not part of QEMU's default ("cached") overlap set.
        None
    }
}
