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
    /// What QEMU refuses (qemu-img's shrink guard first, then its qcow2 driver's checks in
    /// their order; `bitmaps`: what `bitmaps_refusal` found).
    pub(crate) fn refuse(
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

    pub(crate) async fn grow(&self, old: u64, new: u64, mode: Preallocation) -> Result<()> {
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

    pub(crate) async fn shrink(&self, old: u64, new: u64) -> Result<()> {
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
