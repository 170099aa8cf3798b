//! The VM state area: where QEMU's `savevm` keeps a virtual machine's RAM and device state
//! with an internal snapshot (qemu-io's `write -b` / `read -b`).
//!
//! It lies in the active L1 table past the disk, from the first L1 entry that maps nothing of
//! the disk on (QEMU's `qcow2_vm_state_offset`): its clusters are allocated, mapped and
//! reference-counted as guest clusters are, so the same request paths serve it and a
//! snapshot's L1 copy takes it along. Writes grow the L1 table to cover it first (in the
//! crash-safe order of a resize); reads of what was never written read zeros.

use super::zero::ZeroMode;
use crate::image::Image;
use crate::{Error, ReadResult, Result, WriteResult};
use blockio::{IoBuf, Opener};
use qcow2_format::limits::MAX_L1_ENTRIES;
use std::sync::atomic::Ordering;

impl<O: Opener> Image<O> {
    /// The guest offset the VM state area starts at, for a disk of `disk_end` bytes.
    pub(crate) fn vm_state_start(&self, disk_end: u64) -> u64 {
        self.l1_entries(disk_end) * self.geo.l2_coverage()
    }

    /// The guest offset the VM state area starts at for the disk's current size: past the
    /// last L1 entry that maps any of the disk (QEMU's `vm_state_offset`, which qemu-io's
    /// `info` prints).
    pub fn vm_state_offset(&self) -> u64 {
        self.vm_state_start(self.size())
    }

    /// Where `len` bytes at `pos` of the VM state area are in guest offsets, if the L1 table
    /// can reach them.
    fn vm_state_range(&self, pos: u64, len: u64) -> Result<u64> {
        let start = self.vm_state_start(self.size());
        let offset = start.checked_add(pos);
        let end = offset.and_then(|o| o.checked_add(len));
        match (offset, end) {
            (Some(o), Some(e)) if self.l1_entries(e) <= MAX_L1_ENTRIES => Ok(o),
            _ => Err(Error::OutOfRange {
                offset: pos,
                len,
                size: (MAX_L1_ENTRIES * self.geo.l2_coverage()).saturating_sub(start),
            }),
        }
    }

    /// Writes the buffer's window at `pos` of the VM state area (qemu-io's `write -b`,
    /// QEMU's `bdrv_save_vmstate`) and gives the buffer back. The area belongs to the active
    /// image: [`Image::snapshot_create_with`] takes what was written into the snapshot.
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`], [`Error::MarkedCorrupt`]; [`Error::OutOfRange`] past what the
    /// largest L1 table can map; I/O errors.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at`]: each cluster reads old or new data; an L1 table grown for it
    /// stays grown (as after a dropped resize).
    pub async fn vm_state_write_at(&self, buf: IoBuf, pos: u64) -> WriteResult {
        // No resize moves the area meanwhile, and no snapshot operation runs.
        let _one_at_a_time = self.resizing.lock().await;
        let _writer = self.writers.token().await;
        let len = buf.window().len() as u64;
        let offset = match self.vm_state_range(pos, len) {
            Ok(o) => o,
            Err(e) => return (Err(e), buf),
        };
        if let Err(e) = self.check_writable(0, 0) {
            return (Err(e), buf);
        }
        if let Err(e) = self.before_first_write().await {
            return (Err(e), buf);
        }
        let grown = {
            let mut meta = self.meta.lock().await;
            self.grow_l1(&mut meta, self.l1_entries(offset + len)).await
        };
        match grown {
            Ok(freed) => self.punch(freed).await,
            Err(e) => return (Err(self.on_error(e).await), buf),
        }
        let (result, buf) = self.write_window(buf, offset).await;
        if result.is_ok() {
            self.acked.fetch_add(1, Ordering::AcqRel);
        }
        (result, buf)
    }

    /// Discards the first `len` bytes of the VM state area (rounded up to whole clusters), as
    /// QEMU does once a snapshot holds them.
    pub(crate) async fn vm_state_discard(&self, len: u64) -> Result<()> {
        let start = self.vm_state_start(self.size());
        let end = start + len.div_ceil(self.geo.cluster_size()) * self.geo.cluster_size();
        self.change_range(start..end, ZeroMode::Truncate, false)
            .await
            .map(|_| ())
    }

    /// Reads the buffer's window from `pos` of the VM state area (qemu-io's `read -b`,
    /// QEMU's `bdrv_load_vmstate`): what [`Image::vm_state_write_at`] wrote, or what
    /// [`Image::snapshot_apply`] brought back with a snapshot; zeros elsewhere.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] past what the largest L1 table can map; I/O errors.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::read_at`]: dropping the future abandons the read and changes nothing.
    pub async fn vm_state_read_at(&self, buf: IoBuf, pos: u64) -> ReadResult {
        let range = buf.window();
        let offset = match self.vm_state_range(pos, range.len() as u64) {
            Ok(o) => o,
            Err(e) => return (Err(e), buf),
        };
        self.read_mapped(buf, range, offset, None).await
    }
}
