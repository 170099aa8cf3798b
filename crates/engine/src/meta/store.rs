//! The metadata store: L2 tables read into the cache, metadata written back in the order
//! that keeps the image consistent at every instant, clusters allocated, and data writes kept
//! off metadata.

use super::Meta;
use crate::aligned::{read_bytes, Aligned};
use crate::files::Files;
use crate::inflight::Tracker;
use crate::{Error, Result};
use blockio::{Backend, IoBuf, Keep};
use qcow2_alloc::{ExclusiveLease, LeaseTable};
use qcow2_format::{features, ClusterGeometry, HostCluster};

/// Dirty L2 tables beyond this many times the cache capacity trigger a write-back.
const MAX_DIRTY_FACTOR: usize = 1;
/// Deferred refcount decrements beyond this trigger a write-back (so freed space is reused).
const MAX_PENDING_DECREMENTS: usize = 4096;

/// What the metadata operations of one image use: its files, aligned I/O, the tracker of
/// metadata writes in flight, the lease table (frees take exclusive leases, I3), and two
/// facts fixed at open.
pub(crate) struct Store<'a, B> {
    pub(crate) files: &'a Files<B>,
    pub(crate) aligned: &'a Aligned,
    pub(crate) meta_io: &'a Tracker,
    pub(crate) leases: &'a LeaseTable,
    pub(crate) geo: ClusterGeometry,
    /// Lazy refcounts in use: refcount blocks are written only at close, under the dirty bit.
    pub(crate) lazy_refcounts: bool,
}

impl<B: Backend> Store<'_, B> {
    pub(crate) fn alloc_err(&self, e: qcow2_alloc::RefcountError) -> Error {
        Error::from((self.files.path(), e))
    }
    pub(crate) fn corrupt_err(&self, what: String) -> Error {
        Error::Corrupt {
            path: self.files.path().to_path_buf(),
            what,
        }
    }
    /// Allocates `count` clusters and extends the known end of the file over them (entries
    /// pointing there are valid from now on).
    ///
    /// A cluster the refcounts call free but that holds live metadata (the header, an L1 or
    /// L2 table, the snapshot table, the bitmap directory) is never handed out: finding one
    /// means the refcounts are corrupt (QEMU's overlap check on metadata writes). Neither is a
    /// cluster a compressed cluster's sector count runs into ([`Meta::compressed_tails`]).
    pub(crate) fn allocate(&self, meta: &mut Meta, count: u64) -> Result<qcow2_alloc::Allocation> {
        self.allocate_with(meta, |alloc, taken| alloc.allocate(count, taken))
    }
    /// Runs one of the allocator's allocations with the one test of what it must not hand
    /// out (see [`Store::allocate`]), then reports a cluster that holds live metadata with a
    /// refcount of 0 as corruption and extends the file's known length.
    fn allocate_with<T>(
        &self,
        meta: &mut Meta,
        run: impl FnOnce(
            &mut qcow2_alloc::Allocator,
            &dyn Fn(HostCluster) -> bool,
        ) -> std::result::Result<T, qcow2_alloc::RefcountError>,
    ) -> Result<T> {
        let leases = &self.leases;
        let live = &meta.metadata;
        let tails = &meta.compressed_tails;
        let lying = std::cell::Cell::new(None);
        let alloc = meta.alloc.as_mut().ok_or(Error::ReadOnly)?;
        let taken = |c: HostCluster| {
            if tails.contains(&c.0) {
                return true;
            }
            if live.contains(c.0) {
                lying.set(Some(c.0));
                return true;
            }
            leases.is_leased(c)
        };
        let out = run(alloc, &taken).map_err(|e| self.alloc_err(e))?;
        if let Some(c) = lying.get() {
            return Err(self.corrupt_err(format!(
                "host cluster {c} holds metadata but its refcount is 0"
            )));
        }
        self.files
            .extend_len(alloc.high_water() * self.geo.cluster_size());
        Ok(out)
    }
    /// The clusters of a refcount structure of `width` bits
    /// ([`qcow2_alloc::Allocator::allocate_refcounts`]), with the tests of
    /// [`allocate`](Self::allocate).
    pub(crate) fn allocate_refcounts(
        &self,
        meta: &mut Meta,
        width: qcow2_format::RefcountWidth,
    ) -> Result<qcow2_alloc::NewRefcounts> {
        self.allocate_with(meta, |alloc, taken| alloc.allocate_refcounts(width, taken))
    }
    /// [`Store::allocate`], first reusing what discards freed: when the allocation would
    /// grow the file while refcount decrements wait for their unmapping to be durable, the
    /// metadata is written back (which makes the unmappings durable and applies the
    /// decrements, each cluster freed only under its exclusive lease, I3/I4), so that the
    /// freed clusters are handed out instead of new ones at the end of the file, as QEMU
    /// reuses them. Without pending decrements, or with free clusters below the end, it is
    /// just [`Store::allocate`].
    pub(crate) async fn allocate_reusing(
        &self,
        meta: &mut Meta,
        count: u64,
    ) -> Result<qcow2_alloc::Allocation> {
        let reuse = match meta.alloc.as_ref() {
            Some(alloc) if alloc.has_pending() => {
                let (live, tails) = (&meta.metadata, &meta.compressed_tails);
                alloc
                    .would_grow(count, |c| {
                        tails.contains(&c.0) || live.contains(c.0) || self.leases.is_leased(c)
                    })
                    .map_err(|e| self.alloc_err(e))?
            }
            _ => false,
        };
        if reuse {
            // The freed clusters' exclusive leases go at once: nothing is punched here (the
            // next allocation may take them), as in `maybe_write_back`.
            drop(self.write_back(meta).await?);
        }
        self.allocate(meta, count)
    }

    /// Allocates `size` bytes for a compressed cluster (packed after the previous one, as
    /// QEMU packs them: [`qcow2_alloc::Allocator::allocate_bytes`]), with the lease and
    /// metadata tests of [`allocate`](Self::allocate).
    pub(crate) fn allocate_bytes(
        &self,
        meta: &mut Meta,
        size: u64,
    ) -> Result<qcow2_alloc::ByteAllocation> {
        self.allocate_with(meta, |alloc, taken| alloc.allocate_bytes(size, taken))
    }

    /// The overlap guard: data must never be written over live metadata. A hit means the
    /// refcounts or the L2 tables are corrupt.
    pub(crate) fn guard_overlap(&self, meta: &Meta, host: u64, len: u64) -> Result<()> {
        let bits = self.geo.cluster_bits();
        for c in (host >> bits)..=((host + len - 1) >> bits) {
            let owned = meta
                .alloc
                .as_ref()
                .is_some_and(|a| a.is_metadata(HostCluster(c)));
            if owned || meta.metadata.contains(c) {
                return Err(self.corrupt_err(format!(
                    "a data write to host cluster {c} would overwrite metadata"
                )));
            }
        }
        Ok(())
    }
    /// Loads (or finds in the cache) the L2 table at `offset`.
    pub(crate) async fn l2_table<'m>(&self, meta: &'m mut Meta, offset: u64) -> Result<&'m IoBuf> {
        if meta.l2.get(offset).is_none() {
            let cs = self.geo.cluster_size();
            if offset.saturating_add(cs) > self.files.len() {
                return Err(self.corrupt_err(format!(
                    "L2 table at {offset:#x} lies past the end of the file"
                )));
            }
            let table = read_bytes(self.files.image(), offset, cs, "L2 table").await?;
            meta.l2.insert(offset, table, false);
        }
        Ok(meta.l2.get(offset).expect("just inserted"))
    }
    /// The L2 table at `offset`, loaded if needed, for changing (it becomes dirty).
    pub(crate) async fn l2_table_mut<'m>(
        &self,
        meta: &'m mut Meta,
        offset: u64,
    ) -> Result<&'m mut IoBuf> {
        self.l2_table(meta, offset).await?;
        Ok(meta.l2.get_mut(offset).expect("just loaded"))
    }
    /// Writes the header (cluster 0's used part).
    pub(crate) async fn write_header(&self, header: &qcow2_format::Header) -> Result<()> {
        let bytes = header
            .serialize()
            .map_err(|e| self.corrupt_err(format!("serializing the header: {e}")))?;
        self.write_meta(0, &bytes).await
    }
    /// Writes the bytes `fields` of the serialized header alone (a range inside the first
    /// sector, such as [`Header::SIZE_FIELD`](qcow2_format::Header::SIZE_FIELD)): a crash
    /// leaves them all old or all new.
    pub(crate) async fn write_header_fields(
        &self,
        header: &qcow2_format::Header,
        fields: std::ops::Range<usize>,
    ) -> Result<()> {
        let bytes = header
            .serialize()
            .map_err(|e| self.corrupt_err(format!("serializing the header: {e}")))?;
        self.write_meta(fields.start as u64, &bytes[fields]).await
    }
    /// Writes metadata bytes at `offset` of the image file (read-modify-write where O_DIRECT
    /// alignment demands it, under the read-modify-write lock).
    ///
    /// First waits until no other metadata write is in flight: one can be only if a
    /// write-back's future was dropped mid-write, and its stale version of a table must land
    /// before this one is issued (I9). The write carries a token of the metadata tracker.
    pub(crate) async fn write_meta(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.meta_io.idle().await;
        let keep = Keep::new(self.meta_io.token().await);
        self.aligned
            .write_bytes(self.files.image(), offset, bytes, keep)
            .await
            .map_err(|e| {
                Error::io(
                    format!("{}: writing metadata", self.files.path().display()),
                    e,
                )
            })
    }
    /// Writes dirty metadata back when too much has accumulated.
    pub(crate) async fn maybe_write_back(&self, meta: &mut Meta) -> Result<()> {
        let too_dirty = meta.l2.dirty_count() > meta.l2.capacity() * MAX_DIRTY_FACTOR;
        let too_pending = meta
            .alloc
            .as_ref()
            .is_some_and(|a| a.pending_len() > MAX_PENDING_DECREMENTS);
        if too_dirty || too_pending {
            let freed = self.write_back(meta).await?;
            drop(freed);
        }
        Ok(())
    }
    /// Writes every dirty metadata structure back, in the order that keeps the image
    /// consistent at every instant (I4, I5):
    ///
    /// 1. refcount blocks (new counts before anything refers to the clusters), then the
    ///    refcount table (a moved table whole, then the header switch), then a barrier that
    ///    also makes earlier guest data durable;
    /// 2. L2 tables, barrier; L1 entries, barrier;
    /// 3. only now that every unmapping is on disk, the deferred refcount decrements are
    ///    applied (a cluster is freed only under its exclusive lease) and their blocks
    ///    written, barrier.
    ///
    /// Returns the exclusive leases of the clusters freed, for the caller to punch holes
    /// with and release after dropping the metadata lock.
    pub(crate) async fn write_back(
        &self,
        meta: &mut Meta,
    ) -> Result<Vec<(HostCluster, ExclusiveLease)>> {
        self.write_back_mode(meta, !self.lazy_refcounts).await
    }
    /// [`Store::write_back`], writing the refcounts or (lazy refcounts) leaving them in memory
    /// under the dirty bit.
    pub(crate) async fn write_back_mode(
        &self,
        meta: &mut Meta,
        refcounts: bool,
    ) -> Result<Vec<(HostCluster, ExclusiveLease)>> {
        Ok(self.write_back_synced(meta, refcounts).await?.0)
    }
    /// [`Store::write_back_mode`], also saying whether it ended with a barrier (so that a
    /// flush need not add another).
    pub(crate) async fn write_back_synced(
        &self,
        meta: &mut Meta,
        refcounts: bool,
    ) -> Result<(Vec<(HostCluster, ExclusiveLease)>, bool)> {
        // 0. A write-back whose future was dropped may have left a write in flight: it lands
        //    first (I9). Clusters of dropped allocating writes come back.
        self.meta_io.idle().await;
        if let Some(alloc) = meta.alloc.as_mut() {
            alloc.reclaim().map_err(|e| self.alloc_err(e))?;
        }
        let l2_dirty =
            meta.l2.dirty_count() > 0 || !meta.l1_dirty.is_empty() || meta.l1_switch.is_some();
        let mut synced = false;
        // 1. Refcounts; with lazy refcounts, the dirty bit instead, before any L2 update
        //    that relies on it reaches the disk. The barrier after it also makes the guest
        //    data written so far durable before the L2 entries that expose it. A barrier
        //    owed by an earlier write-back that failed comes first of all.
        if refcounts {
            if self.write_refcounts(meta).await? {
                meta.barrier_owed = true;
            }
        } else if !meta.header.is_dirty() && l2_dirty {
            let mut header = meta.header.clone();
            header.incompatible_features |= features::INCOMPAT_DIRTY;
            self.write_header(&header).await?;
            meta.barrier_owed = true;
            self.barrier(meta).await?;
            // Only a dirty bit known to be on disk counts.
            meta.header = header;
            synced = true;
        }
        if meta.barrier_owed || l2_dirty {
            self.barrier(meta).await?;
            synced = true;
        }

        // 2. L2 tables, then L1.
        let dirty = meta.l2.dirty();
        if !dirty.is_empty() {
            for off in &dirty {
                let bytes = meta.l2.peek(*off).expect("dirty table is cached").to_vec();
                self.write_meta(*off, &bytes).await?;
                meta.l2.mark_clean(*off);
                meta.barrier_owed = true;
            }
            self.barrier(meta).await?;
        }
        if meta.l1_switch.is_some() {
            self.switch_l1(meta).await?;
        } else if let (Some(&lo), Some(&hi)) = (meta.l1_dirty.first(), meta.l1_dirty.last()) {
            let bytes: Vec<u8> = meta.l1[lo as usize..=hi as usize]
                .iter()
                .flat_map(|e| e.0.to_be_bytes())
                .collect();
            self.write_meta(meta.header.l1_table_offset + lo * 8, &bytes)
                .await?;
            meta.l1_dirty.clear();
            meta.barrier_owed = true;
            self.barrier(meta).await?;
        }

        // 3. Deferred decrements, now that every unmapping is on disk.
        let Some(alloc) = meta.alloc.as_mut() else {
            return Ok((Vec::new(), synced));
        };
        if !alloc.has_pending() {
            return Ok((Vec::new(), synced));
        }
        let leases = &self.leases;
        let freed = alloc
            .apply_decrements(|c| leases.try_exclusive(c))
            .map_err(|e| self.alloc_err(e))?;
        for (c, _) in &freed {
            // A freed L2 table must not linger in the cache, nor in the overlap map.
            meta.l2.remove(self.geo.cluster_offset(*c).0);
            meta.metadata.l2.remove(&c.0);
        }
        if refcounts && self.write_refcounts(meta).await? {
            meta.barrier_owed = true;
            self.barrier(meta).await?;
            synced = true;
        }
        Ok((freed, synced))
    }
    /// Puts a grown L1 table in place (see [`L1Switch`](super::L1Switch)): the whole table
    /// at its new place, durable; then the header's L1 fields, durable; then the old table's
    /// clusters unreferenced (the same write-back frees them, after this is on disk).
    async fn switch_l1(&self, meta: &mut Meta) -> Result<()> {
        let Some(s) = meta.l1_switch else {
            return Ok(());
        };
        let table: Vec<u8> = meta.l1.iter().flat_map(|e| e.0.to_be_bytes()).collect();
        self.write_meta(s.offset, &table).await?;
        meta.barrier_owed = true;
        self.barrier(meta).await?;
        let mut header = meta.header.clone();
        header.l1_size = s.entries;
        header.l1_table_offset = s.offset;
        self.write_header_fields(&header, qcow2_format::Header::L1_FIELDS)
            .await?;
        meta.barrier_owed = true;
        self.barrier(meta).await?;
        meta.header = header;
        meta.l1_dirty.clear();
        meta.l1_switch = None;
        let geo = self.geo;
        meta.metadata.remove_range(&geo, s.old_offset, s.old_bytes);
        if let Some(alloc) = meta.alloc.as_mut() {
            let first = s.old_offset >> geo.cluster_bits();
            for c in first..(s.old_offset + s.old_bytes).div_ceil(geo.cluster_size()) {
                alloc.defer_decrement(HostCluster(c));
            }
        }
        Ok(())
    }
    /// A barrier that pays what the metadata writes before it owe: only a successful one
    /// clears the debt, so a failed barrier is repeated before anything that depends on it.
    pub(crate) async fn barrier(&self, meta: &mut Meta) -> Result<()> {
        self.files.sync().await?;
        meta.barrier_owed = false;
        Ok(())
    }
    /// Writes dirty refcount blocks and the table (moving it if it grew).
    pub(crate) async fn write_refcounts(&self, meta: &mut Meta) -> Result<bool> {
        let Some(alloc) = meta.alloc.as_mut() else {
            return Ok(false);
        };
        let mut wrote = false;
        let blocks = alloc.dirty_blocks();
        wrote |= !blocks.is_empty();
        for (_, off, bytes) in &blocks {
            self.write_meta(off.0, bytes).await?;
        }
        alloc.blocks_written(blocks.iter().map(|(t, _, _)| *t));
        if let Some(m) = alloc.table_move() {
            // The new table, whole; then (after a barrier) the header points at it.
            let bytes = alloc.table_bytes();
            self.write_meta(m.offset.0, &bytes).await?;
            self.files.sync().await?;
            meta.header.refcount_table_offset = m.offset.0;
            meta.header.refcount_table_clusters = u32::try_from(m.clusters)
                .map_err(|_| self.corrupt_err("refcount table too large".into()))?;
            self.write_header(&meta.header).await?;
            self.files.sync().await?;
            meta.alloc.as_mut().expect("checked").table_moved();
            wrote = true;
        } else {
            let entries = alloc.dirty_table_entries();
            if !entries.is_empty() {
                let table = alloc.table_bytes();
                let table_off = alloc.table_offset().0;
                // Blocks first: a table entry never names a block that is not on disk.
                self.files.sync().await?;
                let lo = entries[0] as usize * 8;
                let hi = (*entries.last().expect("non-empty") as usize + 1) * 8;
                self.write_meta(table_off + lo as u64, &table[lo..hi])
                    .await?;
                meta.alloc
                    .as_mut()
                    .expect("checked")
                    .table_entries_written();
                wrote = true;
            }
        }
        Ok(wrote)
    }
}
