//! The read path: map a guest range to pieces (zeros, backing file, data, compressed), take
//! shared leases on the host clusters under the metadata lock, then do the I/O without it.

use crate::aligned::{read_buf, read_bytes_kept, read_data};
use crate::image::Image;
use crate::inflight::{keep, Guards};
use crate::map::{Mapper, Piece, Source};
use crate::meta::SnapshotL1;
use crate::{Error, ReadResult, Result};
use blockio::{IoBuf, Keep, Opener};
use qcow2_alloc::SharedLease;
use qcow2_format::{CompressedDescriptor, HostCluster};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

impl<O: Opener> Image<O> {
    /// Reads into the buffer's window from guest offset `offset`, and gives the buffer back.
    ///
    /// Any offset and length work (unaligned ones too); the range must lie inside the disk.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the read; the buffer is lost with it (the backend frees
    /// it once any read it accepted is done). The shared leases of the host clusters being
    /// read live until those reads complete, so no cluster is freed under them.
    pub async fn read_at(&self, buf: IoBuf, offset: u64) -> ReadResult {
        let range = buf.window();
        self.read_into(buf, range, offset).await
    }

    /// Reads `len` bytes at `offset` into a new buffer.
    ///
    /// The length is a `u64`, as every guest offset and length in the engine's API.
    ///
    /// # Errors
    ///
    /// [`Error::RequestTooLarge`] for a length longer than any buffer on this platform, then
    /// [`Error::OutOfRange`] for a range past the end of the disk, both before anything is
    /// allocated; then those of [`Image::read_at`].
    ///
    /// # Cancel safety
    ///
    /// As [`Image::read_at`]: dropping the future abandons the read and changes nothing.
    pub async fn read(&self, offset: u64, len: u64) -> Result<IoBuf> {
        let buf = read_buf(offset, len, Some(self.size()))?;
        let (res, buf) = self.read_at(buf, offset).await;
        res.map(|()| buf)
    }

    /// Reads guest `[offset, offset + range.len())` into `range` of the buffer's allocation;
    /// the buffer comes back with the window it had.
    pub(crate) async fn read_into(
        &self,
        buf: IoBuf,
        range: Range<usize>,
        offset: u64,
    ) -> ReadResult {
        self.read_through(buf, range, offset, None).await
    }

    /// [`Image::read_into`] through the L1 table of a snapshot (`view`) or the active one.
    pub(crate) async fn read_through(
        &self,
        buf: IoBuf,
        range: Range<usize>,
        offset: u64,
        view: Option<&SnapshotL1>,
    ) -> ReadResult {
        let len = range.len() as u64;
        let size = view.map_or(self.size(), |v| v.size);
        if let Err(e) = Error::check_range(offset, len, size) {
            return (Err(e), buf);
        }
        self.read_mapped(buf, range, offset, view).await
    }

    /// [`Image::read_through`] without the check against the disk's end: the VM state area
    /// lies past it.
    pub(super) async fn read_mapped(
        &self,
        mut buf: IoBuf,
        range: Range<usize>,
        offset: u64,
        view: Option<&SnapshotL1>,
    ) -> ReadResult {
        let window = buf.window();
        let len = range.len() as u64;
        let (plan, leases) = match self.plan_read(offset, len, view).await {
            Ok(p) => p,
            Err(e) => return (Err(self.on_error(e).await), buf),
        };
        let guards = Guards::new(&self.io, leases.into_values().collect()).await;
        let mut result = Ok(());
        for piece in plan {
            let start = range.start + (piece.guest - offset) as usize;
            let r = start..start + piece.len as usize;
            let (res, b) = self.read_piece(buf, r, piece, &guards).await;
            buf = b;
            if let Err(e) = res {
                result = Err(e);
                break;
            }
        }
        drop(guards);
        buf.set_window(window);
        (result, buf)
    }

    /// Reads one piece of a plan into `r` of the buffer's allocation; its I/O carries
    /// `guards`.
    pub(crate) async fn read_piece(
        &self,
        mut buf: IoBuf,
        r: Range<usize>,
        piece: Piece,
        guards: &Arc<Guards>,
    ) -> ReadResult {
        match piece.source {
            Source::Zero => {
                buf.as_full_mut_slice()[r].fill(0);
                (Ok(()), buf)
            }
            Source::Backing => self.read_backing(buf, r, piece.guest).await,
            Source::Data { host, data_file } => {
                let keep = keep(guards);
                let (res, buf) = match (self.files.data(), data_file) {
                    (Some(d), true) => read_data(&d.backend, buf, r, host, keep).await,
                    _ => read_data(self.files.image(), buf, r, host, keep).await,
                };
                (
                    res.map_err(|e| {
                        Error::io(format!("{}: reading data", self.path().display()), e)
                    }),
                    buf,
                )
            }
            Source::Compressed { desc, in_cluster } => {
                match self.read_compressed(desc, keep(guards)).await {
                    Ok(cluster) => {
                        let from = in_cluster as usize;
                        let n = r.len();
                        buf.as_full_mut_slice()[r].copy_from_slice(&cluster[from..from + n]);
                        (Ok(()), buf)
                    }
                    Err(e) => (Err(e), buf),
                }
            }
        }
    }

    /// Reads from the backing file; the part past the backing file's end reads as zeros.
    async fn read_backing(&self, mut buf: IoBuf, r: Range<usize>, guest: u64) -> ReadResult {
        let Some(backing) = &self.backing else {
            buf.as_full_mut_slice()[r].fill(0);
            return (Ok(()), buf);
        };
        let bsize = backing.size();
        let inside = bsize.saturating_sub(guest).min(r.len() as u64) as usize;
        buf.as_full_mut_slice()[r.start + inside..r.end].fill(0);
        if inside == 0 {
            return (Ok(()), buf);
        }
        // Boxed: the backing file's read is this one's future again, one layer down (and a
        // read without a backing file carries no box).
        Box::pin(backing.read_into(buf, r.start..r.start + inside, guest)).await
    }

    /// Reads and inflates one compressed cluster; the read carries `keep`.
    async fn read_compressed(&self, desc: CompressedDescriptor, keep: Keep) -> Result<Vec<u8>> {
        let len = desc.read_len();
        let data = read_bytes_kept(
            self.files.image(),
            desc.host_offset,
            len,
            "compressed cluster",
            keep,
        )
        .await?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        crate::compress::decompress(self.header.compression_type, &data, &mut out).map_err(
            |reason| Error::Decompress {
                path: self.path().to_path_buf(),
                host_offset: desc.host_offset,
                reason,
            },
        )?;
        Ok(out)
    }

    /// Maps `[offset, offset+len)` and takes shared leases on every host cluster the plan
    /// reads, all under the metadata lock. When a lease is contended (a cluster is being
    /// freed), every lease is dropped, the metadata lock released, the contended lease waited
    /// for, and the mapping computed again: the plan returned is valid under the leases held.
    ///
    /// Through a snapshot's L1 table (`view`), the snapshot is first checked to exist still,
    /// in the same critical section: a deleted snapshot's clusters may be freed (I2, I3).
    async fn plan_read(
        &self,
        offset: u64,
        len: u64,
        view: Option<&SnapshotL1>,
    ) -> Result<(Vec<Piece>, BTreeMap<u64, SharedLease>)> {
        let mut held: BTreeMap<u64, SharedLease> = BTreeMap::new();
        loop {
            let mut meta = self.meta.lock().await;
            if let Some(v) = view {
                if !self.store().snapshot_live(&mut meta, v).await? {
                    return Err(Error::SnapshotNotFound {
                        path: self.path().to_path_buf(),
                        name: v.name.clone(),
                    });
                }
            }
            let mapper = Mapper {
                l1: view.map(|v| v.l1.as_slice()),
                ..self.mapper()
            };
            let plan = mapper.map_range(&mut meta, offset, len).await?;
            let needed = mapper.lease_clusters(&plan);
            held.retain(|c, _| needed.contains(c));
            let mut blocked = None;
            for c in needed {
                if held.contains_key(&c) {
                    continue;
                }
                match self.leases.try_shared(HostCluster(c)) {
                    Some(l) => {
                        held.insert(c, l);
                    }
                    None => {
                        blocked = Some(c);
                        break;
                    }
                }
            }
            let Some(c) = blocked else {
                return Ok((plan, held));
            };
            drop(meta);
            // Wait holding nothing else, so that no lease waits form a cycle.
            held.clear();
            let lease = self.leases.shared(HostCluster(c)).await;
            held.insert(c, lease);
        }
    }

    /// What a read of `[offset, offset + len)` does before its data I/O: the metadata lock,
    /// the L1 entry, the L2 table from the cache (loaded on a miss), each cluster's L2 entry
    /// decoded into pieces, and a shared lease taken on each host cluster; the leases are
    /// dropped again. Returns the number of pieces. For the microbenchmarks
    /// (benches/micro/engine.rs), not part of the API.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the leases with it: nothing changes.
    #[cfg(feature = "testing")]
    pub async fn bench_plan_read(&self, offset: u64, len: u64) -> Result<usize> {
        let (plan, leases) = self.plan_read(offset, len, None).await?;
        drop(leases);
        Ok(plan.len())
    }
}
