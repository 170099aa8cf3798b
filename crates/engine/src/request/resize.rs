//! Resizing the virtual disk, as QEMU's `qcow2_co_truncate` does, in the crash-safe order of
//! docs/DESIGN.md ("Resizing").
//!
//! A grow first grows the L1 table (the new table counted and written before the header
//! names it, the old one freed after), then prepares the new area (its preallocation, see
//! `prealloc`; zeros where a backing file would show through), and writes the new size last.
//! A shrink first lowers the bound that writes are planned against, unmaps every cluster past
//! the new end through the discard path (each freed by a write-back under its exclusive
//! lease, so a read still in flight keeps its cluster: I3), clears the L1 entries past the end
//! on disk before their L2 tables lose the reference, cuts the file after the last cluster
//! still counted, and writes the new size last.

use super::zero::ZeroMode;
use crate::image::Image;
use crate::meta::{L1Switch, Meta};
use crate::options::{Preallocation, ResizeOptions};
use crate::{Error, ResizeError, Result};
use blockio::{Backend, Opener};
use qcow2_alloc::ExclusiveLease;
use qcow2_format::limits::MAX_L1_ENTRIES;
use qcow2_format::{
    GuestOffset, Header, HostCluster, HostOffset, L1Entry, L2Entry, SubclusterState,
};
use std::sync::atomic::Ordering;

/// Clusters a write-back freed, with the exclusive leases their punch-holes carry.
pub(super) type Freed = Vec<(HostCluster, ExclusiveLease)>;

impl<O: Opener> Image<O> {
    /// Resizes the virtual disk to `new_size` bytes, as `qemu-img resize` does.
    ///
    /// **Growing** adds zeros at the end: the L1 table grows if the new size needs more L2
    /// tables (a new table is written and counted before the header names it, and the old
    /// one is freed afterwards), the new area gets what [`ResizeOptions::preallocation`]
    /// asks for (`metadata`: L2 tables and data clusters allocated, the file extended
    /// sparsely; `falloc`: the data area reserved too; `full`: zeros written over it), and
    /// where a backing file reaches past the old end the new area is made to read as zeros.
    ///
    /// **Shrinking** (only with [`ResizeOptions::shrink`]) deletes everything past the new
    /// end: the clusters there are deallocated (QEMU's full discard), the L2 tables past it
    /// freed, and the file cut after the last cluster still in use. As with QEMU, the part of
    /// the last cluster past a new end that is not cluster-aligned keeps its bytes, and a
    /// later grow shows them again.
    ///
    /// **Persistent dirty bitmaps**, enabled or not, are kept and resized with the disk, as
    /// QEMU does: a grow adds clear bits, a shrink drops those past the new end. They are
    /// marked in use on disk before anything changes and stored anew, with tables for the
    /// new size, once the new size is on disk (see docs/DESIGN.md, "Resizing"); the enabled
    /// ones go on recording writes.
    ///
    /// The new size is written to the header last and made durable before this returns;
    /// with it, every metadata change made so far. Requests may run meanwhile: those past a
    /// new, smaller end fail with [`Error::OutOfRange`] once the shrink has begun, and a read
    /// already in flight on a cluster the shrink frees keeps that cluster (it is freed, and
    /// the file cut, only once no I/O is in flight on it). The area a grow adds is usable
    /// once this returns.
    ///
    /// # Errors
    ///
    /// - [`Error::Resize`] when the size is refused before anything changes (the variants
    ///   of [`ResizeError`], with QEMU's messages): a shrink without
    ///   [`ResizeOptions::shrink`], a size that is not a multiple of 512, a version 2 image
    ///   with snapshots, a persistent bitmap left in use by a crash (inconsistent) or of a
    ///   kind this engine cannot store, preallocation with a shrink, an
    ///   L1 table beyond QEMU's limit, a version 2 image whose backing file reaches past the
    ///   old end;
    /// - [`Error::ReadOnly`], [`Error::MarkedCorrupt`] for an image that cannot be written;
    /// - [`Error::Io`] when a write or flush fails midway, and [`Error::Corrupt`] when the
    ///   metadata it walks is (the image is then marked corrupt, as for any request). What
    ///   was done stays done, in the crash-safe order: at worst clusters leak.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the resize between two of its steps, each consistent: the
    /// metadata written so far was written in the crash-safe order (a new L1 table is in use
    /// only once the header names it; clusters are freed only by write-backs), and a write
    /// the backend accepted still lands before any later metadata write of this image. The
    /// size on disk is still the old one. A dropped grow leaves the size as it was (part of
    /// the new area may already be prepared); a dropped shrink leaves the image at the new
    /// size in memory, with part of what lay past it deallocated: resizing again finishes
    /// either. Persistent bitmaps are then left marked in use on disk, and kept so at close
    /// (inconsistent, as after a crash: a further resize refuses them), or, if the drop came
    /// while they were being stored, stored for the new size but no longer maintained by this
    /// open (a further resize is refused with [`ResizeError::BitmapsNotLoaded`]).
    pub async fn resize(&self, new_size: u64, options: ResizeOptions) -> Result<()> {
        let _one_at_a_time = self.resizing.lock().await;
        // No snapshot operation runs meanwhile (see `Image::writers`).
        let _writer = self.writers.token().await;
        match self.resize_inner(new_size, options).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.on_error(e).await),
        }
    }

    async fn resize_inner(&self, new_size: u64, options: ResizeOptions) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.marked_corrupt.load(Ordering::Acquire) {
            return Err(Error::MarkedCorrupt(self.path().to_path_buf()));
        }
        let old = self.size();
        let bitmaps = self.bitmaps_refusal().await;
        self.refuse(old, new_size, options, bitmaps)?;
        // The size on disk: a shrink dropped midway leaves it above the size in memory.
        let on_disk = self.meta.lock().await.header.size;
        if new_size == old && new_size == on_disk {
            return Ok(());
        }
        self.before_first_write().await?;
        let bitmaps = self.bitmaps_before_resize().await?;
        if new_size < on_disk {
            self.shrink(on_disk, new_size).await?;
        } else {
            self.grow(on_disk, new_size, options.preallocation).await?;
        }
        match bitmaps {
            Some(b) => self.bitmaps_after_resize(b).await,
            None => Ok(()),
        }
    }

    /// What QEMU refuses (qemu-img's shrink guard first, then its qcow2 driver's checks in
    /// their order; `bitmaps`: what `bitmaps_refusal` found).
    fn refuse(
        &self,
        old: u64,
        new: u64,
        options: ResizeOptions,
        bitmaps: Result<(), ResizeError>,
    ) -> Result<(), ResizeError> {
        if new < old && !options.shrink {
            return Err(ResizeError::ShrinkNotAllowed {
                size: old,
                new_size: new,
            });
        }
        if new % 512 != 0 {
            return Err(ResizeError::Unaligned(new));
        }
        if self.header.version < 3 && self.header.nb_snapshots > 0 {
            return Err(ResizeError::V2Snapshots);
        }
        bitmaps?;
        if new < old {
            if options.preallocation != Preallocation::Off {
                return Err(ResizeError::PreallocationShrink);
            }
            return Ok(());
        }
        if self.l1_entries(new) > MAX_L1_ENTRIES {
            return Err(ResizeError::TooLarge(new));
        }
        let backing_reaches = self.backing.as_ref().is_some_and(|b| b.size() > old);
        if new > old && backing_reaches && self.header.version < 3 {
            return Err(ResizeError::CannotZeroNewArea);
        }
        Ok(())
    }

    /// L1 entries a disk of `size` bytes needs.
    pub(super) fn l1_entries(&self, size: u64) -> u64 {
        size.div_ceil(self.geo.l2_coverage())
    }

    async fn grow(&self, old: u64, new: u64, mode: Preallocation) -> Result<()> {
        let freed = {
            let mut meta = self.meta.lock().await;
            let freed = self.grow_l1(&mut meta, self.l1_entries(new)).await?;
            // From here the new area may be planned in, by this grow only: requests are
            // still checked against the old size on entry.
            meta.disk_end = new;
            freed
        };
        self.punch(freed).await;
        // A raw data file must show the guest's view: its clusters are mapped up front.
        let raw_data = self.files.data().is_some() && self.header.data_file_raw();
        let mode = match mode {
            Preallocation::Off if raw_data => Preallocation::Metadata,
            m => m,
        };
        // Where the backing file reaches past the old end the new area must read as zeros,
        // not as the backing file (QEMU's BDRV_REQ_ZERO_WRITE). A falloc or full area in
        // the image file is zeros already, and its entries say so (QEMU: the file's own
        // truncation took the flag); the rest gets zero flags.
        let hides = self.backing.as_ref().is_some_and(|b| b.size() > old);
        let area_zeroed = matches!(mode, Preallocation::Falloc | Preallocation::Full)
            && self.files.data().is_none();
        self.prepare_new_area(old, new, mode, hides).await?;
        if hides {
            self.zero_new_area(old, new, !area_zeroed).await?;
        }
        let freed = {
            let mut meta = self.meta.lock().await;
            // Everything the new area needs is on disk before the size exposes it.
            let freed = self.store().write_back_mode(&mut meta, true).await?;
            self.write_size(&mut meta, new).await?;
            freed
        };
        self.punch(freed).await;
        Ok(())
    }

    /// Makes `[old, new)` read as zeros although the backing file reaches into it (QEMU's
    /// `BDRV_REQ_ZERO_WRITE` on a grow): in the cluster at `old`, zero bits on its whole
    /// subclusters (extended L2) and explicit zeros over the rest; past it, with
    /// `whole_clusters`, zero flags (a falloc or full area reads as zeros already).
    async fn zero_new_area(&self, old: u64, new: u64, whole_clusters: bool) -> Result<()> {
        let cluster_end = old.next_multiple_of(self.cluster_size());
        let head_end = cluster_end.min(new);
        let mut zero_start = head_end;
        if self.geo.extended_l2() && old < head_end {
            zero_start = old
                .next_multiple_of(self.geo.subcluster_size())
                .min(head_end);
            self.zero_subclusters(zero_start, head_end).await?;
        }
        if whole_clusters && new > cluster_end {
            self.change_range(cluster_end..new, ZeroMode::Zero { unmap: false }, false)
                .await?;
        }
        if zero_start > old {
            let zeros = blockio::IoBuf::new((zero_start - old) as usize);
            self.write_window(zeros, old).await.0?;
        }
        Ok(())
    }

    /// Sets the zero bits of the subclusters of `[from, to)` (one cluster of an image with
    /// extended L2 entries, subcluster-aligned) and clears their allocation bits, as QEMU's
    /// `zero_l2_subclusters` does; a cluster without an L2 table gets one.
    async fn zero_subclusters(&self, from: u64, to: u64) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let geo = self.geo;
        let cluster = geo.cluster_start(from);
        let sc = geo.subcluster_size();
        let range = ((from - cluster) / sc) as u32..((to - cluster).div_ceil(sc)) as u32;
        let mut meta = self.meta.lock().await;
        let l2 = self
            .writable_l2(&mut meta, geo.l1_index(GuestOffset(from)))
            .await?;
        let table = self.store().l2_table_mut(&mut meta, l2).await?;
        let index = geo.l2_index(GuestOffset(from));
        let mut entry = L2Entry::read(table, &geo, index);
        let mut bitmap = entry.subclusters();
        bitmap.set_range(range, SubclusterState::Zero);
        entry.bitmap = bitmap.0;
        entry.write(table, &geo, index);
        Ok(())
    }

    async fn shrink(&self, old: u64, new: u64) -> Result<()> {
        {
            let mut meta = self.meta.lock().await;
            // From here no write plans past the new end: nothing new appears there.
            meta.disk_end = new;
            self.size.store(new, Ordering::Release);
        }
        let from = new.next_multiple_of(self.cluster_size());
        if from < old {
            self.change_range(from..old, ZeroMode::Truncate, false)
                .await?;
        }
        let freed = {
            let mut meta = self.meta.lock().await;
            // The unmappings on disk, then the decrements (each free under its exclusive
            // lease: a cluster with I/O in flight stays counted, and in the file).
            let mut freed = self.store().write_back_mode(&mut meta, true).await?;
            freed.extend(self.shrink_l1(&mut meta, self.l1_entries(new)).await?);
            freed.extend(self.shrink_reftable(&mut meta).await?);
            if let Some(end) = self.cut_file(&mut meta).await {
                // Punching past the end would be wasted: those clusters are gone.
                freed.retain(|(c, _)| c.0 < end);
            }
            if let Some(d) = self.files.data() {
                d.backend.set_len(new).await.map_err(|e| {
                    Error::io(format!("{}: resizing the data file", d.path.display()), e)
                })?;
            }
            self.write_size(&mut meta, new).await?;
            freed
        };
        self.punch(freed).await;
        Ok(())
    }

    /// Grows the active L1 table to `entries` (QEMU's `qcow2_grow_l1_table` with an exact
    /// size): everything written back first (what the new table copies is on disk), then
    /// its clusters allocated, and a write-back puts it in place in the crash-safe order
    /// (the refcounts, then the whole table, then the header's L1 fields, each durable, then
    /// the old table freed: see `L1Switch`). Returns what the write-backs freed.
    pub(super) async fn grow_l1(&self, meta: &mut Meta, entries: u64) -> Result<Freed> {
        if entries <= meta.l1.len() as u64 {
            return Ok(Vec::new());
        }
        let store = self.store();
        let geo = self.geo;
        // Also finishes the switch of a grow whose future was dropped.
        let mut freed = store.write_back_mode(meta, true).await?;
        let bytes = entries * 8;
        let a = store.allocate(meta, bytes.div_ceil(geo.cluster_size()))?;
        let offset = geo.cluster_offset(a.first).0;
        meta.metadata.add_range(&geo, offset, bytes);
        meta.l1_switch = Some(L1Switch {
            offset,
            entries: u32::try_from(entries)
                .map_err(|_| store.corrupt_err(format!("an L1 table of {entries} entries")))?,
            old_offset: meta.header.l1_table_offset,
            old_bytes: u64::from(meta.header.l1_size) * 8,
        });
        meta.l1.resize(entries as usize, L1Entry(0));
        freed.extend(store.write_back_mode(meta, true).await?);
        Ok(freed)
    }

    /// Clears the L1 entries from `entries` on (QEMU's `qcow2_shrink_l1_table`: the table
    /// keeps its size) and unreferences the L2 tables they named: in memory first, then a
    /// write-back puts the cleared entries on disk, durable, before it applies the
    /// decrements (I4). A drop midway leaves that to the next write-back.
    async fn shrink_l1(&self, meta: &mut Meta, entries: u64) -> Result<Freed> {
        let len = meta.l1.len() as u64;
        if entries >= len {
            return Ok(Vec::new());
        }
        let geo = self.geo;
        let mut tables = Vec::new();
        for i in entries..len {
            tables.push(self.mapper().l2_offset(meta, i)?);
        }
        for (i, l2) in (entries..len).zip(tables) {
            meta.l1[i as usize] = L1Entry(0);
            meta.l1_dirty.insert(i);
            if let Some(off) = l2 {
                meta.l2.remove(off);
                meta.metadata.l2.remove(&(off >> geo.cluster_bits()));
                if let Some(alloc) = meta.alloc.as_mut() {
                    alloc.defer_decrement(geo.host_cluster(HostOffset(off)));
                }
            }
        }
        self.store().write_back_mode(meta, true).await
    }

    /// Drops the refcount blocks that count only themselves (QEMU's
    /// `qcow2_shrink_reftable`), so that the file can be cut before them: their table
    /// entries are cleared on disk before anything is allocated in their place (the
    /// metadata lock is held throughout), and a block another block counts is freed after.
    async fn shrink_reftable(&self, meta: &mut Meta) -> Result<Freed> {
        let store = self.store();
        let dropped = match meta.alloc.as_mut() {
            Some(alloc) => alloc.drop_empty_blocks().map_err(|e| store.alloc_err(e))?,
            None => 0,
        };
        if dropped == 0 {
            return Ok(Vec::new());
        }
        store.write_back_mode(meta, true).await
    }

    /// Cuts the image file after the last cluster still counted, when that is shorter;
    /// returns the new end in clusters. As for QEMU a failure is only a warning: the file
    /// stays longer.
    async fn cut_file(&self, meta: &mut Meta) -> Option<u64> {
        let end = meta.alloc.as_ref()?.used_end().ok()?;
        let cs = self.cluster_size();
        let len = self.files.image().len().await.ok()?;
        if end * cs >= len {
            return None;
        }
        match self.files.truncate(end * cs).await {
            Ok(()) => {
                meta.alloc.as_mut()?.truncated(end);
                Some(end)
            }
            Err(e) => {
                tracing::warn!(path = %self.path().display(), error = %e,
                    "Failed to truncate the tail of the image");
                None
            }
        }
    }

    /// Writes the new size to the header (one sector) and makes it durable; from then on it
    /// is the disk's size.
    async fn write_size(&self, meta: &mut Meta, new: u64) -> Result<()> {
        let store = self.store();
        let mut header = meta.header.clone();
        header.size = new;
        store
            .write_header_fields(&header, Header::SIZE_FIELD)
            .await?;
        meta.barrier_owed = true;
        store.barrier(meta).await?;
        meta.header = header;
        meta.disk_end = new;
        self.size.store(new, Ordering::Release);
        Ok(())
    }
}
