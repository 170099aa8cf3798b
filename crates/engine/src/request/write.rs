//! Guest writes: a request cut into steps, each planned under the metadata lock (in place
//! when the cluster is allocated with COPIED set, else an allocating step: see [`allocate`](super::allocate)),
//! its data I/O done without the lock under shared leases that travel with the I/O (I2,
//! I7, I9).

use super::allocate::AllocStep;
use crate::image::Image;
use crate::inflight::{keep, Guards};
use crate::meta::Meta;
use crate::options::WriteFlags;
use crate::{Error, Result, WriteResult};
use blockio::{IoBuf, Keep, Opener};
use qcow2_alloc::{Gate, SharedLease};
use qcow2_format::{
    GuestOffset, HostCluster, L2Entry, L2Mapping, SubclusterBitmap, SubclusterState,
};
use std::sync::atomic::Ordering;

/// What one step of a write does.
pub(super) enum Step {
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

impl<O: Opener> Image<O> {
    pub(crate) fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self
            .marked_corrupt
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(Error::MarkedCorrupt(self.path().to_path_buf()));
        }
        Error::check_range(offset, len, self.size())
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
    pub async fn write_at(&self, buf: IoBuf, offset: u64) -> WriteResult {
        self.write_at_with(buf, offset, WriteFlags::default()).await
    }

    /// [`Image::write_at`] with flags: with [`WriteFlags::FUA`] (or on an image opened
    /// write-through, [`CacheMode::Writethrough`](crate::CacheMode)), the data and the
    /// metadata that maps it are durable when the write completes: the image is flushed
    /// after the write, as QEMU's block layer does for a driver without native FUA.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at`]; dropped during its flush, the write is done (each cluster
    /// reads the new data) but may not be durable, as a write without FUA, and the flush is
    /// as cancel safe as [`Image::flush`].
    pub async fn write_at_with(&self, buf: IoBuf, offset: u64, flags: WriteFlags) -> WriteResult {
        let (res, buf) = self.write_acked(buf, offset).await;
        match res {
            Ok(()) => (self.durable_if(flags.fua).await, buf),
            Err(e) => (Err(e), buf),
        }
    }

    /// Makes what completed durable when `fua` asks for it or the image writes through.
    pub(crate) async fn durable_if(&self, fua: bool) -> Result<()> {
        if fua || self.write_through {
            self.flush().await
        } else {
            Ok(())
        }
    }

    /// The write of [`Image::write_at`], acknowledged when done (not made durable).
    pub(super) async fn write_acked(&self, buf: IoBuf, offset: u64) -> WriteResult {
        // No snapshot operation runs meanwhile (see `Image::writers`).
        let _writer = self.writers.token().await;
        let len = buf.window().len() as u64;
        if let Err(e) = self.check_writable(offset, len) {
            return (Err(e), buf);
        }
        if let Err(e) = self.before_first_write().await {
            return (Err(e.in_request("write", offset, len)), buf);
        }
        self.bitmap_ctx().bitmaps_mark(offset, len).await;
        let (result, buf) = self.write_window(buf, offset).await;
        if result.is_ok() {
            self.acked.fetch_add(1, Ordering::AcqRel);
        }
        (result, buf)
    }

    /// Writes the buffer's window at `offset` step by step, checked only against the end
    /// of the disk for planning (a grow writes its new area with it before the size
    /// changes); an error goes through the corruption handling.
    pub(super) async fn write_window(&self, buf: IoBuf, offset: u64) -> WriteResult {
        let window = buf.window();
        let end = offset + window.len() as u64;
        let (res, mut buf) = self.write_steps(buf, window.start, offset, end).await;
        let result = match res {
            Ok(()) => Ok(()),
            Err(e) => Err(self
                .on_error(e)
                .await
                .in_request("write", offset, window.len() as u64)),
        };
        buf.set_window(window);
        (result, buf)
    }

    /// Writes `data` at `offset` (copies it into an aligned buffer first).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at`].
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_at(IoBuf::from_slice(data), offset).await.0
    }

    /// Writes guest `offset..end` from the buffer's allocation at `at`, step by step.
    pub(super) async fn write_steps(
        &self,
        mut buf: IoBuf,
        at: usize,
        offset: u64,
        end: u64,
    ) -> (Result<()>, IoBuf) {
        let mut pos = offset;
        while pos < end {
            let (res, b) = self
                .write_step(buf, at + (pos - offset) as usize, pos, end)
                .await;
            buf = b;
            match res {
                Ok(n) => pos += n,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
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
    pub(super) async fn write_data(
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
    pub(super) async fn plan_write(&self, meta: &mut Meta, pos: u64, end: u64) -> Result<Step> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cluster = geo.cluster_start(pos);
        if end > meta.disk_end && pos < self.vm_state_start(meta.disk_end) {
            // A shrink came between the request's entry check and this step (the VM state
            // area, past the disk, is written only by `vm_state_write_at`).
            return Err(Error::OutOfRange {
                offset: pos,
                len: end - pos,
                size: meta.disk_end,
            });
        }
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
                    let c = geo.cluster_start(p);
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
                let c = geo.cluster_start(p);
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
    pub(super) fn try_leases(
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
