//! The area a grow adds, prepared as `qemu-img resize --preallocation` asks (QEMU's
//! `preallocate_co` and the preallocating branches of `qcow2_co_truncate`): L2 tables and
//! data clusters allocated in guest order (an L2 table, then a run of data clusters for the
//! rest of its range), the file extended over them; `falloc` reserves their storage too,
//! `full` writes zeros over them. With an external data file the clusters are mapped at
//! their guest offsets and the data file is extended (and reserved or zeroed) instead.
//!
//! A run of clusters is allocated under the metadata lock and held by a reservation (I9)
//! while its storage is prepared without the lock (I7): a cluster that was in use before
//! (not fresh) is zeroed first, so that the new area never shows stale bytes. Then its L2
//! entries are installed (after their refcounts, by the write-back's order: I4).

use crate::image::Image;
use crate::options::Preallocation;
use crate::{Error, Result};
use blockio::{Backend, IoBuf, Keep, Opener};
use qcow2_alloc::Reservation;
use qcow2_format::{GuestOffset, HostCluster, HostOffset, L2Entry, L2Mapping, SubclusterBitmap};
use std::sync::Arc;

/// The longest run QEMU allocates at once (`BDRV_REQUEST_MAX_BYTES`).
const REQUEST_MAX_BYTES: u64 = 0x7FFF_FE00;
/// Largest zero write of a `full` preallocation.
const ZERO_CHUNK: u64 = 1 << 20;

/// A run of new data clusters for consecutive guest clusters of one L2 table.
struct Run {
    /// L2 index of the first guest cluster.
    index: usize,
    count: u64,
    host: u64,
    /// Still reads as zeros (never written since open).
    fresh: bool,
    /// Holds newly allocated clusters until their entries are in place (none with a data
    /// file, whose clusters are not refcounted).
    reservation: Option<Arc<Reservation>>,
}

impl<O: Opener> Image<O> {
    /// Prepares `[old, new)` as `mode` says (the L1 table already covers it). With
    /// `hides`, a falloc or full area's subclusters (extended L2) are all marked allocated,
    /// so that they read their zeros and not the backing file, as QEMU marks them.
    pub(super) async fn prepare_new_area(
        &self,
        old: u64,
        new: u64,
        mode: Preallocation,
        hides: bool,
    ) -> Result<()> {
        if mode == Preallocation::Off {
            // An external data file follows the disk's size exactly (QEMU's `exact`).
            if let Some(d) = self.files.data() {
                d.backend.set_len(new).await.map_err(|e| {
                    Error::io(format!("{}: resizing the data file", d.path.display()), e)
                })?;
            }
            return Ok(());
        }
        let cs = self.cluster_size();
        let head = self.geo.cluster_start(old);
        if head < old && !self.is_copied(head).await? {
            // The cluster at the old end: a write of its own first bytes allocates it (QEMU
            // copies them the same way, as the head of its allocation).
            let bytes = self.read(head, old - head).await?;
            self.write_window(bytes, head).await.0?;
        }
        if mode != Preallocation::Metadata && self.files.data().is_none() {
            return self
                .preallocate_area(old.next_multiple_of(cs), new, mode, hides)
                .await;
        }
        let mut pos = old.next_multiple_of(cs).min(new).max(old);
        let mut end = 0;
        while pos < new {
            let (next, run_end) = self.preallocate_table(pos, new, mode).await?;
            end = end.max(run_end);
            pos = next;
        }
        self.extend_for_preallocation(new, end, mode).await
    }

    /// Whether the guest cluster at `cluster` is allocated with COPIED set (nothing to
    /// preallocate there).
    async fn is_copied(&self, cluster: u64) -> Result<bool> {
        let mut meta = self.meta.lock().await;
        let l1_index = self.geo.l1_index(GuestOffset(cluster));
        let Some(l2) = self.mapper().l2_offset(&meta, l1_index)? else {
            return Ok(false);
        };
        let table = self.store().l2_table(&mut meta, l2).await?;
        let e = L2Entry::read(table, &self.geo, self.geo.l2_index(GuestOffset(cluster)));
        Ok(matches!(
            self.mapper().decode_entry(e, cluster)?,
            L2Mapping::Normal { copied: true, .. }
        ))
    }

    /// Preallocates the unallocated clusters of `[pos, new)` within one L2 table: returns
    /// where the next table starts and the end of the last data cluster allocated (0 if
    /// none).
    async fn preallocate_table(
        &self,
        pos: u64,
        new: u64,
        mode: Preallocation,
    ) -> Result<(u64, u64)> {
        let geo = self.geo;
        let l1_index = geo.l1_index(GuestOffset(pos));
        let table_end = new.min((l1_index + 1) * geo.l2_coverage());
        let runs = self.plan_runs(pos, table_end).await?;
        for run in &runs {
            if self.files.data().is_none() {
                self.fill_run(run, mode).await?;
            }
        }
        let mut meta = self.meta.lock().await;
        let l2 = self.writable_l2(&mut meta, l1_index).await?;
        let store = self.store();
        let table = store.l2_table_mut(&mut meta, l2).await?;
        let mut end = 0;
        for run in &runs {
            for k in 0..run.count {
                let idx = run.index + k as usize;
                let host = HostOffset(run.host + k * geo.cluster_size());
                let bitmap = L2Entry::read(table, &geo, idx).bitmap;
                let entry =
                    L2Entry::try_encode(L2Mapping::Normal { host, copied: true }, &geo, bitmap)
                        .map_err(|e| store.corrupt_err(format!("encoding an L2 entry: {e}")))?;
                entry.write(table, &geo, idx);
            }
            if let Some(r) = &run.reservation {
                r.commit();
            }
            end = end.max(run.host + run.count * geo.cluster_size());
        }
        store.maybe_write_back(&mut meta).await?;
        Ok((table_end, end))
    }

    /// Under the metadata lock: the L2 table for `[pos, table_end)` (allocated first, as
    /// QEMU does), then a run of data clusters for each stretch of unallocated entries.
    async fn plan_runs(&self, pos: u64, table_end: u64) -> Result<Vec<Run>> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut meta = self.meta.lock().await;
        let l2 = self
            .writable_l2(&mut meta, geo.l1_index(GuestOffset(pos)))
            .await?;
        let first = geo.l2_index(GuestOffset(pos));
        let n = (table_end - pos).div_ceil(cs) as usize;
        let mut free = Vec::with_capacity(n);
        {
            let table = self.store().l2_table(&mut meta, l2).await?;
            for i in 0..n {
                let e = L2Entry::read(table, &geo, first + i);
                let guest = pos + i as u64 * cs;
                free.push(self.mapper().decode_entry(e, guest)? == L2Mapping::Unallocated);
            }
        }
        let max_run = (REQUEST_MAX_BYTES >> geo.cluster_bits()).max(1) as usize;
        let mut runs = Vec::new();
        let mut i = 0;
        while i < n {
            if !free[i] {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < n && free[j] && j - i < max_run {
                j += 1;
            }
            let count = (j - i) as u64;
            let run = if self.files.data().is_some() {
                // Data file clusters live at their guest offsets and are not counted.
                Run {
                    index: first + i,
                    count,
                    host: pos + i as u64 * cs,
                    fresh: true,
                    reservation: None,
                }
            } else {
                let a = self.store().allocate(&mut meta, count)?;
                let reservation = meta.alloc.as_ref().map(|al| Arc::new(al.reserve(&a)));
                Run {
                    index: first + i,
                    count,
                    host: geo.cluster_offset(a.first).0,
                    fresh: a.fresh,
                    reservation,
                }
            };
            runs.push(run);
            i = j;
        }
        Ok(runs)
    }

    /// The storage of a run of new clusters of the image file, prepared without the
    /// metadata lock: zeros over clusters that held something before, or (`full`) over all
    /// of it.
    async fn fill_run(&self, run: &Run, mode: Preallocation) -> Result<()> {
        let len = run.count * self.cluster_size();
        let keep = Keep::new(run.reservation.clone());
        let file = self.files.image();
        let err = |e| Error::io(format!("{}: preallocating", self.path().display()), e);
        if mode == Preallocation::Full {
            return write_zeros(file, run.host, len, keep).await.map_err(err);
        }
        if !run.fresh {
            file.write_zeroes(run.host, len, keep).await.map_err(err)?;
        }
        Ok(())
    }

    /// Extends the file the data lives in over the preallocated area: the image file up to
    /// `end` (sparsely for `metadata`, its storage reserved for `falloc`; `full` wrote it),
    /// or the data file up to `new`.
    async fn extend_for_preallocation(
        &self,
        new: u64,
        end: u64,
        mode: Preallocation,
    ) -> Result<()> {
        let (file, path, target) = match self.files.data() {
            Some(d) => (&d.backend, d.path.as_path(), new),
            None => (self.files.image(), self.path(), end),
        };
        let err = |e| Error::io(format!("{}: preallocating", path.display()), e);
        let len = file.len().await.map_err(err)?;
        if target <= len {
            return Ok(());
        }
        match mode {
            Preallocation::Falloc => file.preallocate(target, Keep::none()).await,
            Preallocation::Full if self.files.data().is_some() => {
                write_zeros(file, len, target - len, Keep::none()).await
            }
            _ => file.set_len(target).await,
        }
        .map_err(err)
        .map(|_| ())
    }
}

impl<O: Opener> Image<O> {
    /// `falloc` and `full` for the clusters of `[from, new)` (`from` cluster-aligned), laid
    /// out as QEMU lays them out: new refcount structures (a moved refcount table, and the
    /// blocks the area needs) right after the last cluster in use, sized for the area, then
    /// the data clusters in one contiguous run after them, their storage prepared, then the
    /// L2 entries (new L2 tables go wherever the allocator finds room, as QEMU's do: often
    /// in the old refcount table's place).
    async fn preallocate_area(
        &self,
        from: u64,
        new: u64,
        mode: Preallocation,
        hides: bool,
    ) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        if from >= new {
            return Ok(());
        }
        let count = (new.next_multiple_of(cs) - from) / cs;
        let (host, chunks) = self.allocate_area(from, count).await?;
        let keep = Keep::new(chunks.iter().map(|(_, _, r)| r.clone()).collect::<Vec<_>>());
        let file = self.files.image();
        let err = |e| Error::io(format!("{}: preallocating", self.path().display()), e);
        let end = host + count * cs;
        if mode == Preallocation::Full {
            write_zeros(file, host, count * cs, keep)
                .await
                .map_err(err)?;
        } else {
            // What lies inside the file may hold old bytes; the rest is reserved.
            let len = file.len().await.map_err(err)?;
            if len > host {
                file.write_zeroes(host, len.min(end) - host, keep.clone())
                    .await
                    .map_err(err)?;
            }
            file.preallocate(end, keep).await.map_err(err)?;
        }
        let mut meta = self.meta.lock().await;
        for (guest, n, reservation) in &chunks {
            let first_host = host + (guest - from);
            self.link_chunk(&mut meta, (*guest, *n), first_host, hides)
                .await?;
            // In the critical section that installed the entries (I9).
            reservation.commit();
        }
        let freed = self.store().write_back_mode(&mut meta, true).await?;
        drop(meta);
        self.punch(freed).await;
        Ok(())
    }

    /// Under the metadata lock: everything written back, the refcount structures for an area
    /// of `count` clusters placed and switched to, and the area allocated. Returns its first
    /// host offset and one reservation per L2 table's part of it (guest offset, clusters).
    async fn allocate_area(
        &self,
        from: u64,
        count: u64,
    ) -> Result<(u64, Vec<(u64, u64, Arc<Reservation>)>)> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let store = self.store();
        let mut meta = self.meta.lock().await;
        let mut freed = store.write_back_mode(&mut meta, true).await?;
        let alloc = meta.alloc.as_mut().ok_or(Error::ReadOnly)?;
        let start = alloc.used_end().map_err(|e| store.alloc_err(e))?;
        let tables = count.div_ceil(geo.l2_entries()) + 1;
        let first = alloc
            .refcount_area(start, count + tables)
            .map_err(|e| store.alloc_err(e))?;
        // The new table written whole, the header switched, the old table freed after.
        freed.extend(store.write_back_mode(&mut meta, true).await?);
        let leases = &self.leases;
        let alloc = meta.alloc.as_mut().ok_or(Error::ReadOnly)?;
        let a = alloc
            .allocate_at(HostCluster(first), count, |c| leases.is_leased(c))
            .map_err(|e| store.alloc_err(e))?;
        self.files.extend_len(alloc.high_water() * cs);
        let mut chunks = Vec::new();
        let mut guest = from;
        let mut left = count;
        while left > 0 {
            let index = geo.l2_index(GuestOffset(guest)) as u64;
            let n = left.min(geo.l2_entries() - index);
            let part = qcow2_alloc::Allocation {
                first: HostCluster(a.first.0 + (guest - from) / cs),
                count: n,
                fresh: a.fresh,
            };
            chunks.push((guest, n, Arc::new(alloc.reserve(&part))));
            guest += n * cs;
            left -= n;
        }
        drop(meta);
        self.punch(freed).await;
        Ok((geo.cluster_offset(a.first).0, chunks))
    }

    /// Maps `n` guest clusters from `guest` (in one L2 table) to the host clusters from
    /// `host`, replacing whatever was there (its clusters unreferenced, as QEMU's link does);
    /// with `allocate_all`, every subcluster is marked allocated (extended L2).
    async fn link_chunk(
        &self,
        meta: &mut crate::meta::Meta,
        (guest, n): (u64, u64),
        host: u64,
        allocate_all: bool,
    ) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let l2 = self
            .writable_l2(meta, geo.l1_index(GuestOffset(guest)))
            .await?;
        let store = self.store();
        let first = geo.l2_index(GuestOffset(guest));
        let mut unref = Vec::new();
        let mut entries = Vec::new();
        {
            let table = store.l2_table(meta, l2).await?;
            for k in 0..n as usize {
                let old = L2Entry::read(table, &geo, first + k);
                let mapping = self.mapper().decode_entry(old, guest + k as u64 * cs)?;
                if self.files.data().is_none() {
                    unref.extend(mapped_clusters(mapping, &geo));
                }
                let host = HostOffset(host + k as u64 * cs);
                let bitmap = match (allocate_all, geo.extended_l2()) {
                    (true, true) => SubclusterBitmap::ALL_ALLOCATED.0,
                    _ => old.bitmap,
                };
                let entry =
                    L2Entry::try_encode(L2Mapping::Normal { host, copied: true }, &geo, bitmap)
                        .map_err(|e| store.corrupt_err(format!("encoding an L2 entry: {e}")))?;
                entries.push(entry);
            }
        }
        let table = store.l2_table_mut(meta, l2).await?;
        for (k, e) in entries.iter().enumerate() {
            e.write(table, &geo, first + k);
        }
        if let Some(alloc) = meta.alloc.as_mut() {
            for c in unref {
                alloc.defer_decrement(c);
            }
        }
        Ok(())
    }
}

/// Writes real zeros over `[offset, offset+len)` (storage allocated, as QEMU's `full`).
async fn write_zeros<B: Backend>(
    file: &B,
    offset: u64,
    len: u64,
    keep: Keep,
) -> std::io::Result<()> {
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(ZERO_CHUNK);
        let mut buf = IoBuf::new(n as usize);
        buf.attach(keep.clone());
        file.write_at(buf, pos).await.0?;
        pos += n;
    }
    Ok(())
}

/// The host clusters an entry's replacement stops referring to.
fn mapped_clusters(old: L2Mapping, geo: &qcow2_format::ClusterGeometry) -> Vec<HostCluster> {
    match old {
        L2Mapping::Compressed(d) => d.host_clusters(geo).map(HostCluster).collect(),
        L2Mapping::Normal { host, .. }
        | L2Mapping::Zero {
            preallocated: Some(host),
            ..
        } => vec![geo.host_cluster(host)],
        _ => Vec::new(),
    }
}
