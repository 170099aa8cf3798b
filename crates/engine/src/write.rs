//! The write path: in-place writes, allocating writes with copy-on-write, write-zeroes,
//! discard, flush and close.
//!
//! Every request plans under the metadata lock and does its data I/O without it, holding
//! shared leases on the host clusters it touches (I2, I7). An allocating write registers a
//! gate for its guest cluster, so that a second writer of the same cluster waits and then
//! writes in place (I6). New clusters are counted before anything refers to them, data is
//! written before the L2 entry that exposes it, and refcount decrements wait until the
//! unmapping that caused them is on disk (I4, I5): see [`Image::write_back`].

use crate::aligned::write_unaligned;
use crate::image::{Disk, Image};
use crate::inflight::{keep, Guards};
use crate::map::{Piece, Source};
use crate::meta::Meta;
use crate::{Error, Result};
use blockio::{Backend, IoBuf, Keep, Opener};
use qcow2_alloc::{ExclusiveLease, Gate, GateGuard, Reservation, SharedLease};
use qcow2_format::{
    features, GuestOffset, HostCluster, HostOffset, L1Entry, L2Entry, L2Mapping, SubclusterBitmap,
    SubclusterState,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The outcome of a write from an owned buffer, and the buffer back.
pub type WriteResult = (Result<()>, IoBuf);

/// Largest explicit zero write, in bytes.
const ZERO_CHUNK: u64 = 1 << 20;

/// What one step of a write does.
enum Step {
    /// Write `len` bytes in place at `host`.
    InPlace {
        host: u64,
        len: u64,
        data_file: bool,
        leases: Vec<SharedLease>,
    },
    /// Allocate (or re-use) a cluster and write into it with copy-on-write.
    Allocate(Box<AllocStep>),
    /// Wait for another request's allocation of this guest cluster, then plan again.
    WaitGate(Gate),
    /// Wait until this cluster's lease can be shared, then plan again.
    WaitLease(HostCluster),
}

/// An allocating write to one guest cluster.
struct AllocStep {
    /// Guest offset of the cluster.
    cluster: u64,
    /// The written range, relative to the cluster.
    from: u64,
    to: u64,
    /// The range written to the host cluster (covers `from..to`; the rest is copy-on-write).
    cow_from: u64,
    cow_to: u64,
    /// The old contents of `cow_from..from` and `to..cow_to`, as pieces to read.
    head: Vec<Piece>,
    tail: Vec<Piece>,
    /// Host offset of the cluster written.
    host: u64,
    /// `host`, when it was allocated for this write: given back unless the entry is installed
    /// (and only once the write's I/O is over, I9).
    reservation: Option<Reservation>,
    /// Whether the host cluster still reads as zeros (never written since open).
    fresh: bool,
    data_file: bool,
    /// The L2 entry to install.
    new_entry: L2Entry,
    /// Host clusters whose reference the new entry drops.
    unref: Vec<HostCluster>,
    /// Where the entry goes.
    l2_offset: u64,
    l2_index: usize,
    /// Taken into the step's [`Guards`] when it runs.
    gate: Option<GateGuard>,
    leases: Vec<SharedLease>,
}

impl<O: Opener> Image<O> {
    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self
            .marked_corrupt
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(Error::MarkedCorrupt(self.path().to_path_buf()));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            });
        }
        Ok(())
    }

    /// Writes the buffer's window at guest offset `offset` and gives the buffer back.
    ///
    /// Any offset and length inside the disk work. The write is acknowledged once the data
    /// is in the file and mapped in memory; it is durable after [`Image::flush`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the write; the buffer is lost with it (the backend frees
    /// it once any write it accepted is done). Each guest cluster of the range then reads
    /// either its old data or the new, and may change from old to new later, while a write
    /// the backend accepted is still on its way (as with any write not acknowledged). Nothing
    /// else is affected: the leases, the allocation gate and a newly allocated cluster live
    /// until the backend has finished the data write, so the cluster cannot be freed or
    /// handed to another guest offset under it; a cluster allocated for a write that never
    /// installs its mapping goes back to the free space (nothing leaks); the metadata is
    /// changed only in steps that leave it consistent.
    pub async fn write_at(&self, mut buf: IoBuf, offset: u64) -> WriteResult {
        let window = buf.window();
        let len = window.len() as u64;
        if let Err(e) = self.check_writable(offset, len) {
            return (Err(e), buf);
        }
        if let Err(e) = self.before_first_write().await {
            return (Err(e), buf);
        }
        self.bitmaps_mark(offset, len).await;
        let mut pos = offset;
        let end = offset + len;
        let mut result = Ok(());
        while pos < end {
            let at = window.start + (pos - offset) as usize;
            let (res, b) = self.write_step(buf, at, pos, end).await;
            buf = b;
            match res {
                Ok(n) => pos += n,
                Err(e) => {
                    result = Err(self.on_error(e).await);
                    break;
                }
            }
        }
        buf.set_window(window);
        if result.is_ok() {
            self.acked.fetch_add(1, Ordering::AcqRel);
        }
        (result, buf)
    }

    /// Corruption found while running marks the image corrupt on disk (like QEMU) and stops
    /// further writes; other errors pass through.
    pub(crate) async fn on_error(&self, e: Error) -> Error {
        if !matches!(e, Error::Corrupt { .. }) || self.read_only {
            return e;
        }
        if !self
            .marked_corrupt
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let mut meta = self.meta.lock().await;
            meta.header.incompatible_features |= features::INCOMPAT_CORRUPT;
            let header = meta.header.clone();
            // Best effort: the error the caller sees is the corruption itself.
            if self.store().write_header(&header).await.is_ok() {
                let _ = self.files.sync().await;
            }
            drop(meta);
            tracing::error!(path = %self.path().display(), error = %e, "image marked corrupt");
        }
        e
    }

    /// Writes `data` at `offset` (copies it into an aligned buffer first).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at`].
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_at(IoBuf::from_slice(data), offset).await.0
    }

    /// Plans and performs one step of a write starting at guest `pos` (buffer position `at`):
    /// returns how many bytes it wrote (0 after waiting).
    async fn write_step(&self, buf: IoBuf, at: usize, pos: u64, end: u64) -> (Result<u64>, IoBuf) {
        let step = {
            let mut meta = self.meta.lock().await;
            match self.plan_write(&mut meta, pos, end).await {
                Ok(s) => s,
                Err(e) => return (Err(e), buf),
            }
        };
        match step {
            Step::WaitGate(gate) => {
                gate.wait().await;
                (Ok(0), buf)
            }
            Step::WaitLease(c) => {
                drop(self.leases.shared(c).await);
                (Ok(0), buf)
            }
            Step::InPlace {
                host,
                len,
                data_file,
                leases,
            } => {
                let guards = Guards::new(&self.io, leases).await;
                let (res, buf) = self
                    .write_data(buf, at..at + len as usize, host, data_file, keep(&guards))
                    .await;
                (res.map(|()| len), buf)
            }
            Step::Allocate(a) => self.write_allocating(buf, at, *a).await,
        }
    }

    /// Writes `r` of the buffer's allocation at `host` (of the data file when `data_file`);
    /// the write carries `keep` (I9).
    async fn write_data(
        &self,
        buf: IoBuf,
        r: std::ops::Range<usize>,
        host: u64,
        data_file: bool,
        keep: Keep,
    ) -> (Result<()>, IoBuf) {
        let backend = self.files.backend(data_file);
        let (res, buf) = self.aligned.write_data(backend, buf, r, host, keep).await;
        (
            res.map_err(|e| Error::io(format!("{}: writing data", self.path().display()), e)),
            buf,
        )
    }

    /// Decides what to do at guest `pos` (for at most `end - pos` bytes).
    async fn plan_write(&self, meta: &mut Meta, pos: u64, end: u64) -> Result<Step> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cluster = pos & !(cs - 1);
        if let Some(g) = meta.gates.get(cluster >> geo.cluster_bits()) {
            return Ok(Step::WaitGate(g));
        }
        let l1_index = geo.l1_index(GuestOffset(pos));
        let data_file = self.files.data().is_some();

        // The in-place fast path: allocated, COPIED, (extended: every touched subcluster
        // allocated); coalesced over following clusters with contiguous host offsets.
        if let (Some(l2), true) = (
            self.mapper().l2_offset(meta, l1_index)?,
            meta.l1[l1_index as usize].copied(),
        ) {
            let table_end = end.min((l1_index + 1) * geo.l2_coverage());
            let entries: Vec<(u64, u64, L2Entry)> = {
                let table = self.store().l2_table(meta, l2).await?;
                let mut v = Vec::new();
                let mut p = pos;
                while p < table_end {
                    let c = p & !(cs - 1);
                    let c_end = table_end.min(c + cs);
                    v.push((
                        p,
                        c_end,
                        L2Entry::read(table, &geo, geo.l2_index(GuestOffset(p))),
                    ));
                    p = c_end;
                }
                v
            };
            let mut run: Option<(u64, u64)> = None; // (host start, len)
            for (p, c_end, entry) in entries {
                let c = p & !(cs - 1);
                if p > pos && meta.gates.is_allocating(p >> geo.cluster_bits()) {
                    break;
                }
                let host = match self.mapper().decode_entry(entry, c)? {
                    L2Mapping::Normal { host, copied: true }
                        if !geo.extended_l2()
                            || all_allocated(entry.subclusters(), &geo, p - c, c_end - c) =>
                    {
                        host.0 + (p - c)
                    }
                    _ => break,
                };
                match &mut run {
                    None => run = Some((host, c_end - p)),
                    Some((h, l)) if *h + *l == host => *l += c_end - p,
                    Some(_) => break,
                }
            }
            if let Some((host, len)) = run {
                if !data_file {
                    self.store().guard_overlap(meta, host, len)?;
                }
                let leases = if data_file {
                    Vec::new()
                } else {
                    let first = host >> geo.cluster_bits();
                    let last = (host + len - 1) >> geo.cluster_bits();
                    match self.try_leases(first..=last) {
                        Ok(l) => l,
                        Err(c) => return Ok(Step::WaitLease(c)),
                    }
                };
                return Ok(Step::InPlace {
                    host,
                    len,
                    data_file,
                    leases,
                });
            }
        }
        self.plan_allocation(meta, pos, end).await
    }

    /// Shared leases on every cluster of `clusters`, or the first one that would wait.
    fn try_leases(
        &self,
        clusters: impl IntoIterator<Item = u64>,
    ) -> std::result::Result<Vec<SharedLease>, HostCluster> {
        let mut out = Vec::new();
        for c in clusters {
            match self.leases.try_shared(HostCluster(c)) {
                Some(l) => out.push(l),
                None => return Err(HostCluster(c)),
            }
        }
        Ok(out)
    }

    /// Makes sure the L2 table for `l1_index` exists and belongs to the active image alone
    /// (allocating it, or copying a table shared with a snapshot); returns its offset.
    async fn writable_l2(&self, meta: &mut Meta, l1_index: u64) -> Result<u64> {
        let old = self.mapper().l2_offset(meta, l1_index)?;
        let copied = meta.l1[l1_index as usize].copied();
        if let (Some(off), true) = (old, copied) {
            return Ok(off);
        }
        let cs = self.cluster_size();
        let contents = match old {
            Some(off) => self.store().l2_table(meta, off).await?.clone(),
            None => IoBuf::new(cs as usize),
        };
        let a = self.store().allocate(meta, 1)?;
        let new_off = self.geo.cluster_offset(a.first).0;
        if let (Some(off), Some(alloc)) = (old, meta.alloc.as_mut()) {
            alloc.defer_decrement(self.geo.host_cluster(HostOffset(off)));
        }
        meta.l2.insert(new_off, contents, true);
        meta.metadata.l2.insert(new_off >> self.geo.cluster_bits());
        meta.l1[l1_index as usize] = L1Entry::new(HostOffset(new_off), true);
        meta.l1_dirty.insert(l1_index);
        Ok(new_off)
    }

    /// Plans an allocating write to the cluster at `pos`.
    async fn plan_allocation(&self, meta: &mut Meta, pos: u64, end: u64) -> Result<Step> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cluster = pos & !(cs - 1);
        let from = pos - cluster;
        let to = end.min(cluster + cs) - cluster;
        let l1_index = geo.l1_index(GuestOffset(pos));
        let l2_offset = self.writable_l2(meta, l1_index).await?;
        let l2_index = geo.l2_index(GuestOffset(pos));
        let entry = L2Entry::read(
            self.store().l2_table(meta, l2_offset).await?,
            &geo,
            l2_index,
        );
        let old = self.mapper().decode_entry(entry, cluster)?;
        let data_file = self.files.data().is_some();
        let extended = geo.extended_l2();
        let sc = geo.subcluster_size();

        // Which host cluster receives the data, and what the new entry says.
        let (reuse, mut bitmap) = match old {
            L2Mapping::Normal { host, copied: true } => (Some(host.0), entry.subclusters()),
            L2Mapping::Zero {
                preallocated: Some(h),
                copied: true,
            } => (Some(h.0), SubclusterBitmap(0)),
            _ => (None, entry.subclusters()),
        };
        let reuse = if data_file { Some(cluster) } else { reuse };
        let whole_cow = !extended
            || matches!(old, L2Mapping::Compressed(_))
            || (reuse.is_none() && matches!(old, L2Mapping::Normal { .. }));
        let (mut cow_from, mut cow_to) = if whole_cow {
            (0, cs)
        } else {
            (from / sc * sc, to.div_ceil(sc) * sc)
        };
        if extended {
            let first = (cow_from / sc) as u32;
            let last = (cow_to / sc) as u32;
            if whole_cow {
                // Everything that held data (or is being written) is copied to the new cluster.
                for i in 0..geo.subclusters() {
                    let touched = (first..last).contains(&i);
                    if touched || bitmap.state(i) == SubclusterState::Allocated {
                        bitmap.set(i, SubclusterState::Allocated);
                    }
                }
                if matches!(old, L2Mapping::Compressed(_)) {
                    bitmap = SubclusterBitmap::ALL_ALLOCATED;
                }
            } else {
                bitmap.set_range(first..last, SubclusterState::Allocated);
            }
        }

        // The old contents of the copy-on-write head and tail.
        let mut head = Vec::new();
        let mut tail = Vec::new();
        if cow_from < from {
            head = self
                .mapper()
                .map_range(meta, cluster + cow_from, from - cow_from)
                .await?;
        }
        if to < cow_to {
            tail = self
                .mapper()
                .map_range(meta, cluster + to, cow_to - to)
                .await?;
        }
        if let Some(h) = reuse {
            // Bytes of the reused cluster that already hold this cluster's data are not copied
            // onto themselves: a write in place to them may be in flight (it was planned before
            // this step's gate), and copying them back would undo it.
            let in_place = |p: &Piece| {
                p.source
                    == Source::Data {
                        host: h + (p.guest - cluster),
                        data_file,
                    }
            };
            while head.first().is_some_and(in_place) {
                let p = head.remove(0);
                cow_from = p.guest + p.len - cluster;
            }
            while tail.last().is_some_and(in_place) {
                let p = tail.pop().expect("checked");
                cow_to = p.guest - cluster;
            }
            debug_assert!(
                !head.iter().chain(&tail).any(in_place),
                "a copy of the reused cluster onto itself is left between other pieces"
            );
        }
        let mut lease_clusters = self.mapper().lease_clusters(&head);
        lease_clusters.extend(self.mapper().lease_clusters(&tail));

        // Unreferenced by the new entry: the old cluster when the data moves.
        let mut unref = Vec::new();
        if !data_file {
            match old {
                L2Mapping::Compressed(d) => {
                    unref.extend(d.host_clusters(&geo).map(HostCluster));
                }
                L2Mapping::Normal {
                    host,
                    copied: false,
                }
                | L2Mapping::Zero {
                    preallocated: Some(host),
                    copied: false,
                } => unref.push(geo.host_cluster(host)),
                _ => {}
            }
        }

        let (host, allocation) = match reuse {
            Some(h) => (h, None),
            None => {
                let a = self.store().allocate(meta, 1)?;
                (geo.cluster_offset(a.first).0, Some(a))
            }
        };
        let fresh = allocation.is_some_and(|a| a.fresh);
        if !data_file {
            self.store().guard_overlap(meta, host, cs)?;
            lease_clusters.push(host >> geo.cluster_bits());
        }
        lease_clusters.sort_unstable();
        lease_clusters.dedup();
        let leases = match self.try_leases(lease_clusters) {
            Ok(l) => l,
            Err(c) => {
                if allocation.is_some() {
                    let alloc = meta.alloc.as_mut().ok_or(Error::ReadOnly)?;
                    alloc
                        .release_unreferenced(geo.host_cluster(HostOffset(host)), 1)
                        .map_err(|e| self.store().alloc_err(e))?;
                }
                return Ok(Step::WaitLease(c));
            }
        };

        let new_entry = L2Entry::try_encode(
            L2Mapping::Normal {
                host: HostOffset(host),
                copied: true,
            },
            &geo,
            if extended { bitmap.0 } else { 0 },
        )
        .map_err(|e| {
            self.store()
                .corrupt_err(format!("encoding an L2 entry: {e}"))
        })?;

        let guard = match meta.gates.begin(cluster >> geo.cluster_bits()) {
            Ok(g) => g,
            Err(g) => {
                // Cannot happen (checked under this lock hold), but waiting is always safe.
                if allocation.is_some() {
                    let alloc = meta.alloc.as_mut().ok_or(Error::ReadOnly)?;
                    alloc
                        .release_unreferenced(geo.host_cluster(HostOffset(host)), 1)
                        .map_err(|e| self.store().alloc_err(e))?;
                }
                return Ok(Step::WaitGate(g));
            }
        };
        // From here on, a cluster allocated for this write goes back when its reservation
        // drops uncommitted: with the step, or (if its future is dropped) after its I/O.
        let reservation = match (&allocation, meta.alloc.as_ref()) {
            (Some(a), Some(alloc)) => Some(alloc.reserve(a)),
            _ => None,
        };
        Ok(Step::Allocate(Box::new(AllocStep {
            cluster,
            from,
            to,
            cow_from,
            cow_to,
            head,
            tail,
            host,
            reservation,
            fresh,
            data_file,
            new_entry,
            unref,
            l2_offset,
            l2_index,
            gate: Some(guard),
            leases,
        })))
    }

    /// Performs a planned allocating write, then installs its L2 entry.
    async fn write_allocating(
        &self,
        buf: IoBuf,
        at: usize,
        mut a: AllocStep,
    ) -> (Result<u64>, IoBuf) {
        let n = a.to - a.from;
        // The gate, the leases and the reservation go with every I/O of the step (I9).
        let guards = Guards::allocating(
            &self.io,
            std::mem::take(&mut a.leases),
            a.gate.take().expect("a planned step holds its gate"),
            a.reservation.take(),
        )
        .await;
        let (res, buf) = match (a.fresh, a.data_file) {
            (true, false) => match self
                .files
                .grow_for(
                    a.host + self.cluster_size(),
                    self.cluster_size(),
                    keep(&guards),
                )
                .await
            {
                Ok(()) => self.write_cluster(buf, at, &a, &guards).await,
                Err(e) => (Err(e), buf),
            },
            _ => self.write_cluster(buf, at, &a, &guards).await,
        };
        if let Err(e) = res {
            // Nothing refers to the cluster: the reservation gives it back with the guards.
            return (Err(e), buf);
        }
        let mut meta = self.meta.lock().await;
        let res = self.install(&mut meta, &a, &guards).await;
        // The gate opens (after the entry is in place), the leases go.
        debug_assert_eq!(
            Arc::strong_count(&guards),
            1,
            "an I/O still holds the guards"
        );
        drop(guards);
        let res = match res {
            Ok(()) => self.store().maybe_write_back(&mut meta).await,
            Err(e) => Err(e),
        };
        drop(meta);
        (res.map(|()| n), buf)
    }

    /// Installs the step's L2 entry and commits its reservation, in one critical section
    /// without an await between the two.
    async fn install(&self, meta: &mut Meta, a: &AllocStep, guards: &Guards) -> Result<()> {
        let geo = self.geo;
        let table = self.store().l2_table_mut(meta, a.l2_offset).await?;
        a.new_entry.write(table, &geo, a.l2_index);
        if let Some(r) = &guards.reservation {
            r.commit();
        }
        if let Some(alloc) = meta.alloc.as_mut() {
            for c in &a.unref {
                alloc.defer_decrement(*c);
            }
        }
        Ok(())
    }

    /// Writes the data of an allocating step: guest data plus copy-on-write head and tail.
    async fn write_cluster(
        &self,
        buf: IoBuf,
        at: usize,
        a: &AllocStep,
        guards: &Arc<Guards>,
    ) -> (Result<()>, IoBuf) {
        let data = at..at + (a.to - a.from) as usize;
        let backend = self.files.backend(a.data_file);
        let align = backend.alignment().max(1) as u64;
        let zeros_only = a
            .head
            .iter()
            .chain(&a.tail)
            .all(|p| p.source == Source::Zero);
        let aligned =
            align == 1 || ((a.host + a.from) % align == 0 && (a.to - a.from) % align == 0);
        if (a.head.is_empty() && a.tail.is_empty()) || (a.fresh && zeros_only && aligned) {
            // Nothing to copy (or the file already reads zeros there): the guest data alone.
            return self
                .write_data(buf, data, a.host + a.from, a.data_file, keep(guards))
                .await;
        }
        let span = (a.cow_to - a.cow_from) as usize;
        let mut tmp = IoBuf::new(span);
        let mut tmp_res = Ok(());
        for pieces in [&a.head, &a.tail] {
            for p in pieces.iter().copied() {
                let start = (p.guest - a.cluster - a.cow_from) as usize;
                let (res, t) = self
                    .read_piece(tmp, start..start + p.len as usize, p, guards)
                    .await;
                tmp = t;
                if let Err(e) = res {
                    tmp_res = Err(e);
                    break;
                }
            }
        }
        if let Err(e) = tmp_res {
            return (Err(e), buf);
        }
        let off = (a.from - a.cow_from) as usize;
        tmp.as_full_mut_slice()[off..off + data.len()].copy_from_slice(&buf.as_full_slice()[data]);
        let (res, _) = self
            .write_data(tmp, 0..span, a.host + a.cow_from, a.data_file, keep(guards))
            .await;
        (res, buf)
    }

    /// Before the first write: clears unknown autoclear bits (and the bitmaps bit when the
    /// bitmaps cannot be maintained), and marks the maintained bitmaps in use.
    async fn before_first_write(&self) -> Result<()> {
        let mut meta = self.meta.lock().await;
        if meta.first_write_done {
            drop(meta);
            // Cheap when done; repeats the bitmaps' in_use marking if it failed before.
            return self.bitmaps_in_use().await;
        }
        let maintained = self.bitmaps.lock().await.is_some();
        let mut known = features::AUTOCLEAR_DATA_FILE_RAW;
        if maintained {
            known |= features::AUTOCLEAR_BITMAPS;
        }
        let keep = meta.header.autoclear_features & known;
        if meta.header.autoclear_features != keep {
            let mut header = meta.header.clone();
            header.autoclear_features = keep;
            self.store().write_header(&header).await?;
            self.files.sync().await?;
            // Only once the cleared bits are on disk: a failure is retried by the next write.
            meta.header = header;
        }
        meta.first_write_done = true;
        drop(meta);
        self.bitmaps_in_use().await
    }

    /// Makes every acknowledged write durable (I8): metadata written back in order, then the
    /// file flushed. Freed clusters are punched out of the file afterwards.
    ///
    /// A failed flush is never followed by a successful one on an image opened through the
    /// page cache (not `O_DIRECT`): the kernel may have dropped the writes the failed fsync
    /// covered, so every later flush (and [`Image::close`]) fails with EIO, as QEMU's do, and
    /// the image must be reopened; what it then holds is what a crash would have left.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the image consistent: the metadata written so far was
    /// written in the crash-safe order, what was not stays dirty in memory for the next
    /// flush, and a metadata write or punch-hole the backend accepted still completes (with
    /// the exclusive lease of the punched cluster held until then; the next write-back waits
    /// for such a metadata write before writing the same structures again). Nothing is made
    /// durable that a completed flush would not have made durable. If the dropped flush's
    /// fsync fails, the next flush reports it.
    pub async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let acked = self.acked.load(Ordering::Acquire);
        self.flush_inner().await?;
        self.flushed.fetch_max(acked, Ordering::AcqRel);
        Ok(())
    }

    async fn flush_inner(&self) -> Result<()> {
        if self
            .marked_corrupt
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // Metadata known to be inconsistent is not written back; data already written
            // is made durable.
            return self.files.sync().await;
        }
        let freed = {
            let mut meta = self.meta.lock().await;
            let (freed, synced) = self
                .store()
                .write_back_synced(&mut meta, !self.lazy_refcounts)
                .await?;
            if !synced {
                // Nothing to write back: the barrier for the guest data alone (I8).
                self.files.sync().await?;
            }
            freed
        };
        self.punch(freed).await;
        Ok(())
    }

    /// Deallocates freed clusters in the file, under their exclusive leases (so that none of
    /// them is handed out again before the hole is punched). Each lease goes with its punch
    /// (I9): dropped, this leaves the rest unpunched and their leases released.
    async fn punch(&self, freed: Vec<(HostCluster, ExclusiveLease)>) {
        let cs = self.cluster_size();
        for (c, lease) in freed {
            let keep = Keep::new((lease, self.io.token().await));
            // Punching is an optimisation: a failure leaves stale bytes in a free cluster.
            let _ = self
                .files
                .image()
                .punch_hole(self.geo.cluster_offset(c).0, cs, keep)
                .await;
        }
    }

    /// Flushes and closes the image: every metadata structure written, the dirty bit of lazy
    /// refcounts cleared.
    ///
    /// First waits until every backend operation that dropped requests left in flight has
    /// completed: nothing this image started lands in the file after `close` returns, and
    /// no cluster stays allocated for a write that never installed it.
    ///
    /// # Cancel safety
    ///
    /// The image is consumed either way. Dropping the future before it completes is dropping
    /// an image that was not closed: acknowledged writes since the last successful flush may
    /// be lost, and the drop reports it (see [`Image`]); what is on disk is consistent, as
    /// after a crash.
    pub async fn close(self) -> Result<()> {
        let r = self.close_inner().await;
        if r.is_ok() {
            self.closed.store(true, Ordering::Release);
        }
        r
    }

    async fn close_inner(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.io.idle().await;
        self.meta_io.idle().await;
        if self
            .marked_corrupt
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return self.files.sync().await;
        }
        self.bitmaps_store().await?;
        let freed = {
            let mut meta = self.meta.lock().await;
            let mut freed = self.store().write_back_mode(&mut meta, true).await?;
            if meta.alloc.as_ref().is_some_and(|a| a.has_pending()) {
                // Decrements freed by the first pass (none can be in flight at close).
                freed.extend(self.store().write_back_mode(&mut meta, true).await?);
            }
            if meta.header.is_dirty() {
                meta.header.incompatible_features &= !features::INCOMPAT_DIRTY;
                self.store().write_header(&meta.header).await?;
            }
            if let Some(alloc) = meta.alloc.as_ref() {
                self.files
                    .trim_growth(alloc.high_water() * self.cluster_size())
                    .await?;
            }
            self.files.sync().await?;
            freed
        };
        self.punch(freed).await;
        self.flushed
            .store(self.acked.load(Ordering::Acquire), Ordering::Release);
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeros. With `may_unmap`, clusters wholly inside
    /// the range may be deallocated (qemu-io `write -z -u`).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at`]: each guest cluster of the range reads either its old data or
    /// zeros (the change is made one L2 table at a time, each step consistent), clusters it
    /// unmapped are freed by a later write-back, and nothing else is affected.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        match self.write_zeroes_inner(offset, len, may_unmap).await {
            Ok(()) => {
                self.acked.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => Err(self.on_error(e).await),
        }
    }

    async fn write_zeroes_inner(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable(offset, len)?;
        self.before_first_write().await?;
        self.bitmaps_mark(offset, len).await;
        if len == 0 {
            return Ok(());
        }
        if let (Some(d), true) = (self.files.data(), self.header.data_file_raw()) {
            // A raw data file must show the guest's view at all times.
            d.backend
                .write_zeroes(offset, len, Keep::new(self.io.token().await))
                .await
                .map_err(|e| Error::io(format!("{}: write zeroes", d.path.display()), e))?;
        }
        let cs = self.cluster_size();
        let end = offset + len;
        let first_full = offset.div_ceil(cs) * cs;
        let last_full = if end == self.size() {
            end
        } else {
            end / cs * cs
        };
        let v3 = self.header.version >= 3;
        let whole = if v3 || self.backing.is_none() {
            (first_full < last_full).then_some(first_full..last_full)
        } else {
            None
        };
        match whole {
            None => self.write_zero_bytes(offset, end).await,
            Some(w) => {
                self.write_zero_bytes(offset, w.start).await?;
                let mode = if v3 {
                    ZeroMode::Zero { unmap: may_unmap }
                } else {
                    ZeroMode::Deallocate
                };
                self.zero_clusters(w.clone(), mode).await?;
                self.write_zero_bytes(w.end, end).await
            }
        }
    }

    /// Writes real zeros over `[from, to)`.
    async fn write_zero_bytes(&self, from: u64, to: u64) -> Result<()> {
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(ZERO_CHUNK);
            self.write_at(IoBuf::new(n as usize), pos).await.0?;
            pos += n;
        }
        Ok(())
    }

    /// Discards `[offset, offset+len)`: clusters wholly inside it are deallocated and read as
    /// zeros afterwards (on v3 the zero flag hides a backing file). Partial clusters are left
    /// alone, and so is everything in a v2 image with a backing file (it could not hide the
    /// backing file), as QEMU does.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_zeroes`]: each whole cluster of the range is either discarded or
    /// left as it was; the clusters unmapped are freed by a later write-back, once no I/O is
    /// in flight on them.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self.discard_inner(offset, len).await {
            Ok(()) => {
                self.acked.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => Err(self.on_error(e).await),
        }
    }

    async fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(offset, len)?;
        self.before_first_write().await?;
        self.bitmaps_mark(offset, len).await;
        if self.header.version < 3 && self.backing.is_some() {
            // A v2 image cannot hide its backing file: QEMU leaves the data in place.
            return Ok(());
        }
        let cs = self.cluster_size();
        let end = offset + len;
        let first = offset.div_ceil(cs) * cs;
        // The partial cluster at the end of an unaligned disk counts as whole.
        let last = if end == self.size() {
            end
        } else {
            end / cs * cs
        };
        if first >= last {
            return Ok(());
        }
        self.zero_clusters(first..last, ZeroMode::Discard).await
    }

    /// Changes the L2 entries of the whole clusters in `range` (cluster-aligned, or ending
    /// at the end of the disk) as `mode` says; old clusters are unreferenced (their counts
    /// drop at the next write-back).
    async fn zero_clusters(&self, range: std::ops::Range<u64>, mode: ZeroMode) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut pos = range.start;
        while pos < range.end {
            let mut meta = self.meta.lock().await;
            let l1_index = geo.l1_index(GuestOffset(pos));
            let table_end = range.end.min((l1_index + 1) * geo.l2_coverage());
            // Unallocated ranges without an L2 table: only the backing file may need hiding.
            let has_table = self.mapper().l2_offset(&meta, l1_index)?.is_some();
            let needs_table = has_table
                || (mode.hides_backing() && self.backing.is_some() && self.header.version >= 3);
            if !needs_table {
                pos = table_end;
                continue;
            }
            // Wait for allocations in flight in this table's part of the range.
            let gate = meta.gates.first_in(
                (pos..table_end)
                    .step_by(cs as usize)
                    .map(|c| c >> geo.cluster_bits()),
            );
            if let Some(g) = gate {
                drop(meta);
                g.wait().await;
                continue;
            }
            let l2 = self.writable_l2(&mut meta, l1_index).await?;
            let mut unref = Vec::new();
            {
                let has_backing = self.backing.is_some();
                let v3 = self.header.version >= 3;
                let data_file = self.files.data().is_some();
                let mut decoded = Vec::new();
                {
                    let table = self.store().l2_table(&mut meta, l2).await?;
                    let mut p = pos;
                    while p < table_end {
                        let idx = geo.l2_index(GuestOffset(p));
                        let e = L2Entry::read(table, &geo, idx);
                        decoded.push((idx, e));
                        p += cs;
                    }
                }
                let mut updates = Vec::new();
                for (idx, e) in decoded {
                    let guest = pos + (idx - geo.l2_index(GuestOffset(pos))) as u64 * cs;
                    let old = self.mapper().decode_entry(e, guest)?;
                    let new = mode.new_entry(old, e, &geo, has_backing, v3)?;
                    if new == e {
                        continue;
                    }
                    let old_host_dropped = new.word & L2Entry::OFFSET_MASK == 0
                        || matches!(old, L2Mapping::Compressed(_));
                    if old_host_dropped && !data_file {
                        match old {
                            L2Mapping::Compressed(d) => {
                                unref.extend(d.host_clusters(&geo).map(HostCluster))
                            }
                            L2Mapping::Normal { host, .. }
                            | L2Mapping::Zero {
                                preallocated: Some(host),
                                ..
                            } => unref.push(geo.host_cluster(host)),
                            _ => {}
                        }
                    }
                    updates.push((idx, new));
                }
                if !updates.is_empty() {
                    let table = self.store().l2_table_mut(&mut meta, l2).await?;
                    for (idx, new) in updates {
                        new.write(table, &geo, idx);
                    }
                }
            }
            if let Some(alloc) = meta.alloc.as_mut() {
                for c in unref {
                    alloc.defer_decrement(c);
                }
            }
            self.store().maybe_write_back(&mut meta).await?;
            pos = table_end;
        }
        Ok(())
    }
}

/// How [`Image::zero_clusters`] changes an entry.
#[derive(Clone, Copy)]
enum ZeroMode {
    /// Discard: deallocate; read zeros (v3, when needed) or the backing file (v2).
    Discard,
    /// Write zeroes on v3: the zero flag; deallocate if `unmap` (always for compressed).
    Zero { unmap: bool },
    /// Write zeroes on v2 without a backing file: deallocate.
    Deallocate,
}

impl ZeroMode {
    fn hides_backing(&self) -> bool {
        !matches!(self, ZeroMode::Deallocate)
    }

    fn new_entry(
        &self,
        old: L2Mapping,
        e: L2Entry,
        geo: &qcow2_format::ClusterGeometry,
        has_backing: bool,
        v3: bool,
    ) -> Result<L2Entry> {
        let allocated = !matches!(
            old,
            L2Mapping::Unallocated
                | L2Mapping::Zero {
                    preallocated: None,
                    ..
                }
        );
        let extended = geo.extended_l2();
        let zero = |keep_host: bool| -> L2Entry {
            let word = if keep_host {
                e.word & !qcow2_format::L2_ZERO
            } else {
                0
            };
            if extended {
                L2Entry {
                    word,
                    bitmap: SubclusterBitmap::ALL_ZERO.0,
                }
            } else {
                L2Entry {
                    word: word | qcow2_format::L2_ZERO,
                    bitmap: 0,
                }
            }
        };
        Ok(match self {
            ZeroMode::Discard => {
                if !v3 {
                    L2Entry::default()
                } else if has_backing || allocated {
                    zero(false)
                } else {
                    e
                }
            }
            ZeroMode::Deallocate => L2Entry::default(),
            ZeroMode::Zero { unmap } => {
                let compressed = matches!(old, L2Mapping::Compressed(_));
                let keep = !(compressed || *unmap && allocated);
                zero(keep && allocated)
            }
        })
    }
}

/// Whether every subcluster touched by `[from, to)` (relative to the cluster) is allocated.
fn all_allocated(
    b: SubclusterBitmap,
    geo: &qcow2_format::ClusterGeometry,
    from: u64,
    to: u64,
) -> bool {
    let sc = geo.subcluster_size();
    ((from / sc) as u32..to.div_ceil(sc) as u32).all(|i| b.state(i) == SubclusterState::Allocated)
}

impl<O: Opener> Disk<O> {
    /// Writes the buffer's window at `offset` (see [`Image::write_at`]).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at`]; on a raw image, the range reads old or new data.
    pub async fn write_at(&self, buf: IoBuf, offset: u64) -> WriteResult {
        match self {
            Disk::Qcow2(img) => img.write_at(buf, offset).await,
            Disk::Raw(raw) => {
                let len = buf.len() as u64;
                if offset.checked_add(len).is_none_or(|e| e > raw.size) {
                    return (
                        Err(Error::OutOfRange {
                            offset,
                            len,
                            size: raw.size,
                        }),
                        buf,
                    );
                }
                let window = buf.window();
                let res = write_unaligned(&raw.backend, &buf, offset, Keep::none()).await;
                let mut buf = buf;
                buf.set_window(window);
                (
                    res.map_err(|e| Error::io(format!("{}: write", raw.path.display()), e)),
                    buf,
                )
            }
        }
    }

    /// See [`Image::write_zeroes`].
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_zeroes`].
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        match self {
            Disk::Qcow2(img) => img.write_zeroes(offset, len, may_unmap).await,
            Disk::Raw(raw) => raw
                .backend
                .write_zeroes(offset, len, Keep::none())
                .await
                .map_err(|e| Error::io(format!("{}: write zeroes", raw.path.display()), e)),
        }
    }

    /// See [`Image::discard`]; on a raw image, punches a hole.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::discard`].
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Disk::Qcow2(img) => img.discard(offset, len).await,
            Disk::Raw(raw) => raw
                .backend
                .punch_hole(offset, len, Keep::none())
                .await
                .map_err(|e| Error::io(format!("{}: discard", raw.path.display()), e)),
        }
    }

    /// See [`Image::flush`].
    ///
    /// # Cancel safety
    ///
    /// As [`Image::flush`].
    pub async fn flush(&self) -> Result<()> {
        match self {
            Disk::Qcow2(img) => img.flush().await,
            Disk::Raw(raw) => raw.flushes.flush(&raw.backend, &raw.path).await,
        }
    }

    /// See [`Image::close`].
    ///
    /// # Cancel safety
    ///
    /// As [`Image::close`].
    pub async fn close(self) -> Result<()> {
        match self {
            Disk::Qcow2(img) => img.close().await,
            raw @ Disk::Raw(_) => raw.flush().await,
        }
    }
}
