//! Compressed writes: whole clusters compressed (zlib or zstd, per the image) and packed at
//! byte granularity into shared host clusters, as QEMU's `qcow2_co_pwritev_compressed`
//! does; a cluster that does not compress to less than a cluster is written normally.
//!
//! A step holds what an allocating write holds (I6 gate, I2 shared leases on the host
//! clusters its bytes touch, a reservation of its references: I9), writes the data, and only
//! then installs the compressed L2 entry (I5). The references a dropped step took go back as
//! deferred decrements, so a host cluster shared with other compressed clusters is freed
//! only when its last reference goes, under its exclusive lease (I3).

use crate::error::CompressedRefusal;
use crate::image::Image;
use crate::inflight::{keep, Guards};
use crate::meta::Meta;
use crate::{Error, Result, WriteResult};
use blockio::{IoBuf, Opener};
use qcow2_alloc::{Gate, GateGuard, Reservation, SharedLease};
use qcow2_format::{CompressedDescriptor, GuestOffset, HostCluster, L2Entry, L2Mapping};
use std::sync::atomic::Ordering;

/// A planned compressed write of one cluster.
struct Step {
    desc: CompressedDescriptor,
    /// Where the data's clusters end, when a new cluster was taken past everything written.
    grow_to: Option<u64>,
    new_entry: L2Entry,
    l2_offset: u64,
    l2_index: usize,
    gate: GateGuard,
    reservation: Reservation,
    leases: Vec<SharedLease>,
}

enum Plan {
    Write(Box<Step>),
    WaitGate(Gate),
    WaitLease(HostCluster),
}

impl<O: Opener> Image<O> {
    /// Writes the buffer's window compressed at guest offset `offset`, and gives the buffer
    /// back. What QEMU's compressed writes (`qemu-io -c 'write -c'`, `qemu-img convert -c`)
    /// do, cluster by cluster:
    ///
    /// - each cluster is compressed with the image's compression type (zlib: raw deflate, 4
    ///   KiB window, default level; zstd: default level), the last partial cluster of the
    ///   disk padded with zeros;
    /// - when the result is not smaller than a cluster, the cluster is written as an
    ///   ordinary write instead (as [`Image::write_at`]: this one may go to an allocated
    ///   cluster);
    /// - otherwise the data is packed after the previous compressed cluster (QEMU's
    ///   `qcow2_alloc_bytes`: byte granular, sharing host clusters; each host cluster it
    ///   touches holds one reference for it), and the cluster maps to it.
    ///
    /// The write is acknowledged once the data is in the file and mapped in memory; it is
    /// durable after [`Image::flush`].
    ///
    /// # Errors
    ///
    /// [`Error::CompressedWrite`] when `offset` is not at a cluster boundary or the length
    /// is not whole clusters and does not end at the end of the disk
    /// ([`CompressedRefusal::NotWholeClusters`]), when the image has an external data file
    /// ([`CompressedRefusal::DataFile`]), and when a cluster that compresses is allocated
    /// already ([`CompressedRefusal::Allocated`]: QEMU's EIO; the clusters before it are
    /// written). Otherwise as [`Image::write_at`]: read-only, out of range, I/O errors.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at`]: dropping the future abandons the write, each cluster reads
    /// old or new data, and nothing leaks. The gate, the leases and the references taken
    /// for the data travel with its I/O; references never installed go back once that I/O
    /// is over, as deferred decrements, so a host cluster shared with other compressed
    /// clusters stays theirs.
    pub async fn write_compressed(&self, mut buf: IoBuf, offset: u64) -> WriteResult {
        // No snapshot operation runs meanwhile (see `Image::writers`).
        let _writer = self.writers.token().await;
        let window = buf.window();
        let len = window.len() as u64;
        if let Err(e) = self.check_compressed(offset, len) {
            return (Err(e), buf);
        }
        if let Err(e) = self.before_first_write().await {
            return (Err(e), buf);
        }
        self.bitmap_ctx().bitmaps_mark(offset, len).await;
        let cs = self.cluster_size();
        let mut pos = offset;
        let end = offset + len;
        let mut result = Ok(());
        while pos < end {
            let n = cs.min(end - pos);
            let at = window.start + (pos - offset) as usize;
            let (res, b) = self.write_compressed_cluster(buf, at, pos, n).await;
            buf = b;
            if let Err(e) = res {
                result = Err(match e {
                    e @ Error::CompressedWrite { .. } => e,
                    e => self.on_error(e).await,
                });
                break;
            }
            pos += n;
        }
        buf.set_window(window);
        if result.is_ok() {
            self.acked.fetch_add(1, Ordering::AcqRel);
            result = self.durable_if(false).await;
        }
        (result, buf)
    }

    fn check_compressed(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(offset, len)?;
        let refuse = |reason| Err(Error::CompressedWrite { offset, reason });
        if self.files.data().is_some() {
            return refuse(CompressedRefusal::DataFile);
        }
        let cs = self.cluster_size();
        if offset % cs != 0 || (len % cs != 0 && offset + len != self.size()) {
            return refuse(CompressedRefusal::NotWholeClusters);
        }
        Ok(())
    }

    /// Compresses and writes the `n` bytes at buffer position `at` (one cluster, or the
    /// disk's last partial one) to guest `pos`.
    async fn write_compressed_cluster(
        &self,
        buf: IoBuf,
        at: usize,
        pos: u64,
        n: u64,
    ) -> (Result<()>, IoBuf) {
        let cs = self.cluster_size() as usize;
        let mut input = vec![0u8; cs];
        input[..n as usize].copy_from_slice(&buf.as_full_slice()[at..at + n as usize]);
        let compressed =
            match crate::compress::compress(self.header.compression_type, &input, cs - 1) {
                Ok(c) => c,
                Err(reason) => {
                    let e = Error::io(
                        format!("{}: compressing", self.path().display()),
                        std::io::Error::other(reason),
                    );
                    return (Err(e), buf);
                }
            };
        let Some(data) = compressed else {
            // It does not pay: an ordinary write, as QEMU falls back.
            return self.write_steps(buf, at, pos, pos + n).await;
        };
        let data = IoBuf::from_slice(&data);
        loop {
            let plan = {
                let mut meta = self.meta.lock().await;
                match self
                    .plan_compressed(&mut meta, pos, data.len() as u64)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => return (Err(e), buf),
                }
            };
            match plan {
                Plan::WaitGate(g) => g.wait().await,
                Plan::WaitLease(c) => drop(self.leases.shared(c).await),
                Plan::Write(step) => return (self.write_compressed_step(data, *step).await, buf),
            }
        }
    }

    /// Plans the compressed write of `size` bytes for the guest cluster at `pos`: QEMU's
    /// `qcow2_alloc_compressed_cluster_offset` (the L2 table made writable first, then the
    /// entry must have no offset, then the bytes).
    async fn plan_compressed(&self, meta: &mut Meta, pos: u64, size: u64) -> Result<Plan> {
        let geo = self.geo;
        if let Some(g) = meta.gates.get(pos >> geo.cluster_bits()) {
            return Ok(Plan::WaitGate(g));
        }
        let l2_offset = self
            .writable_l2(meta, geo.l1_index(GuestOffset(pos)))
            .await?;
        let l2_index = geo.l2_index(GuestOffset(pos));
        let entry = L2Entry::read(
            self.store().l2_table(meta, l2_offset).await?,
            &geo,
            l2_index,
        );
        if entry.word & L2Entry::OFFSET_MASK != 0 {
            return Err(Error::CompressedWrite {
                offset: pos,
                reason: CompressedRefusal::Allocated,
            });
        }
        let b = self.store().allocate_bytes(meta, size)?;
        // From here on, the references go back if the step does not install its entry.
        let reservation = meta
            .alloc
            .as_ref()
            .ok_or(Error::ReadOnly)?
            .reserve_bytes(&b);
        self.store().guard_overlap(meta, b.offset, size)?;
        let leases = match self.try_leases(b.first.0..b.first.0 + b.count) {
            Ok(l) => l,
            Err(c) => return Ok(Plan::WaitLease(c)),
        };
        let desc = CompressedDescriptor::for_range(b.offset, size);
        let new_entry = L2Entry::try_encode(L2Mapping::Compressed(desc), &geo, 0).map_err(|e| {
            self.store()
                .corrupt_err(format!("encoding a compressed L2 entry: {e}"))
        })?;
        let gate = match meta.gates.begin(pos >> geo.cluster_bits()) {
            Ok(g) => g,
            Err(g) => return Ok(Plan::WaitGate(g)),
        };
        let cs = geo.cluster_size();
        Ok(Plan::Write(Box::new(Step {
            desc,
            grow_to: b.fresh.then_some((b.first.0 + b.count) * cs),
            new_entry,
            l2_offset,
            l2_index,
            gate,
            reservation,
            leases,
        })))
    }

    /// Writes a planned step's data, then installs its entry and commits its references.
    async fn write_compressed_step(&self, data: IoBuf, s: Step) -> Result<()> {
        let len = data.len();
        let guards = Guards::allocating(&self.io, s.leases, s.gate, Some(s.reservation)).await;
        if let Some(end) = s.grow_to {
            self.files
                .grow_for(end, self.cluster_size(), keep(&guards))
                .await?;
        }
        let (res, _) = self
            .write_data(data, 0..len, s.desc.host_offset, false, keep(&guards))
            .await;
        res?;
        let mut meta = self.meta.lock().await;
        let table = self.store().l2_table_mut(&mut meta, s.l2_offset).await?;
        s.new_entry.write(table, &self.geo, s.l2_index);
        if let Some(r) = &guards.reservation {
            r.commit();
        }
        // The gate opens (after the entry is in place), the leases go.
        drop(guards);
        self.store().maybe_write_back(&mut meta).await
    }
}
