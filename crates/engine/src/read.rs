//! The read path: map a guest range to pieces (zeros, backing file, data, compressed), take
//! shared leases on the host clusters under the metadata lock, then do the I/O without it.

use crate::aligned::{read_bytes, read_bytes_kept, read_data};
use crate::image::{Image, Meta};
use crate::inflight::{keep, Guards};
use crate::{Error, Result};
use blockio::{IoBuf, Keep, Opener};
use qcow2_alloc::SharedLease;
use qcow2_format::{
    CompressedDescriptor, GuestOffset, HostCluster, L2Entry, L2Mapping, SubclusterBitmap,
    SubclusterState,
};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

/// The outcome of a read into an owned buffer, and the buffer back.
pub type ReadResult = (Result<()>, IoBuf);

/// Where the bytes of one piece of a guest range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Reads as zeros.
    Zero,
    /// Falls through to the backing file.
    Backing,
    /// Data at this byte offset of the image file (or the data file).
    Data { host: u64, data_file: bool },
    /// Inside a compressed cluster: the descriptor, and the piece's offset in the cluster.
    Compressed {
        desc: CompressedDescriptor,
        in_cluster: u64,
    },
}

/// A contiguous guest range with one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) guest: u64,
    pub(crate) len: u64,
    pub(crate) source: Source,
}

fn push(pieces: &mut Vec<Piece>, p: Piece) {
    if let Some(last) = pieces.last_mut() {
        let contiguous = last.guest + last.len == p.guest;
        let merge = contiguous
            && match (last.source, p.source) {
                (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
                (
                    Source::Data {
                        host: a,
                        data_file: fa,
                    },
                    Source::Data {
                        host: b,
                        data_file: fb,
                    },
                ) => fa == fb && a + last.len == b,
                _ => false,
            };
        if merge {
            last.len += p.len;
            return;
        }
    }
    pieces.push(p);
}

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
    /// # Cancel safety
    ///
    /// As [`Image::read_at`]: dropping the future abandons the read and changes nothing.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf> {
        let (res, buf) = self.read_at(IoBuf::new(len), offset).await;
        res.map(|()| buf)
    }

    /// Reads guest `[offset, offset + range.len())` into `range` of the buffer's allocation;
    /// the buffer comes back with the window it had.
    pub(crate) async fn read_into(
        &self,
        mut buf: IoBuf,
        range: Range<usize>,
        offset: u64,
    ) -> ReadResult {
        let window = buf.window();
        let len = range.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return (
                Err(Error::OutOfRange {
                    offset,
                    len,
                    size: self.size(),
                }),
                buf,
            );
        }
        let (plan, leases) = match self.plan_read(offset, len).await {
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
        backing
            .read_into(buf, r.start..r.start + inside, guest)
            .await
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
    async fn plan_read(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<Piece>, BTreeMap<u64, SharedLease>)> {
        let mut held: BTreeMap<u64, SharedLease> = BTreeMap::new();
        loop {
            let mut meta = self.meta.lock().await;
            let plan = self.map_range(&mut meta, offset, len).await?;
            let needed = self.lease_clusters(&plan);
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
    /// (`crates/engine/benches`), not part of the API.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the leases with it: nothing changes.
    #[doc(hidden)]
    pub async fn bench_plan_read(&self, offset: u64, len: u64) -> Result<usize> {
        let (plan, leases) = self.plan_read(offset, len).await?;
        drop(leases);
        Ok(plan.len())
    }

    /// The host clusters of the image file that a plan reads.
    pub(crate) fn lease_clusters(&self, plan: &[Piece]) -> Vec<u64> {
        let bits = self.geo.cluster_bits();
        let mut out = Vec::new();
        for p in plan {
            match p.source {
                Source::Data {
                    host,
                    data_file: false,
                } => out.extend((host >> bits)..=((host + p.len - 1) >> bits)),
                Source::Compressed { desc, .. } => out.extend(desc.host_clusters(&self.geo)),
                _ => {}
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn corrupt(&self, what: impl Into<String>) -> Error {
        Error::Corrupt {
            path: self.path().to_path_buf(),
            what: what.into(),
        }
    }

    /// Loads (or finds in the cache) the L2 table at `offset`.
    pub(crate) async fn l2_table<'m>(&self, meta: &'m mut Meta, offset: u64) -> Result<&'m IoBuf> {
        if meta.l2.get(offset).is_none() {
            let cs = self.cluster_size();
            if offset.saturating_add(cs) > self.files.len() {
                return Err(self.corrupt(format!(
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

    /// The L2 table offset for L1 index `i` (None = unallocated).
    pub(crate) fn l2_offset(&self, meta: &Meta, i: u64) -> Result<Option<u64>> {
        let Some(entry) = meta.l1.get(i as usize) else {
            return Ok(None);
        };
        entry
            .l2_offset(&self.geo)
            .map(|o| o.map(|h| h.0))
            .map_err(|e| self.corrupt(format!("L1 entry {i}: {e}")))
    }

    /// Decodes the L2 entry that maps guest cluster `guest_cluster_start`.
    pub(crate) fn decode_entry(&self, entry: L2Entry, guest: u64) -> Result<L2Mapping> {
        let zero_ok = self.header.version >= 3 && !self.geo.extended_l2();
        let mapping = entry
            .decode(&self.geo, zero_ok)
            .map_err(|e| self.corrupt(format!("L2 entry for guest offset {guest:#x}: {e}")))?;
        let file_len = self.files.len();
        if self.files.data().is_some() {
            // An external data file maps every cluster at its guest offset (QEMU refuses any
            // other host offset as corruption): nothing else may be read or written there.
            let host = match mapping {
                L2Mapping::Normal { host, .. } => Some(host),
                L2Mapping::Zero { preallocated, .. } => preallocated,
                _ => None,
            };
            let cluster = guest & !(self.geo.cluster_size() - 1);
            if let Some(host) = host.filter(|h| h.0 != cluster) {
                return Err(self.corrupt(format!(
                    "data file cluster for guest offset {cluster:#x} at {host}: an external \
                     data file maps guest clusters at their own offset"
                )));
            }
        }
        match mapping {
            L2Mapping::Normal { host, .. } if self.files.data().is_none() && host.0 >= file_len => {
                Err(self.corrupt(format!(
                    "data cluster for guest offset {guest:#x} at {host} lies past the end of the file"
                )))
            }
            L2Mapping::Normal { host, copied } if self.files.data().is_none() && host.0 == 0 => {
                let _ = copied;
                Err(self.corrupt(format!(
                    "data cluster for guest offset {guest:#x} points at the header"
                )))
            }
            L2Mapping::Compressed(d) if d.host_offset >= file_len => Err(self.corrupt(format!(
                "compressed cluster for guest offset {guest:#x} at {:#x} lies past the end of the file",
                d.host_offset
            ))),
            L2Mapping::Compressed(_) if self.files.data().is_some() => Err(self.corrupt(
                "compressed cluster in an image with an external data file",
            )),
            m => Ok(m),
        }
    }

    /// Visits the mapping of `[offset, offset+len)` cluster by cluster, loading L2 tables as
    /// needed: `f(range, cluster_start, mapping)` with `None` for ranges without an L2 table
    /// (then `range` may span many clusters).
    pub(crate) async fn walk<F>(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
        mut f: F,
    ) -> Result<()>
    where
        F: FnMut(Range<u64>, u64, Option<(L2Mapping, SubclusterBitmap)>) -> Result<()>,
    {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let l1_index = geo.l1_index(GuestOffset(pos));
            let table_end = end.min((l1_index + 1) * geo.l2_coverage());
            let Some(l2) = self.l2_offset(meta, l1_index)? else {
                f(pos..table_end, pos & !(cs - 1), None)?;
                pos = table_end;
                continue;
            };
            let table = self.l2_table(meta, l2).await?;
            while pos < table_end {
                let cluster_start = pos & !(cs - 1);
                let cluster_end = table_end.min(cluster_start + cs);
                let entry = L2Entry::read(table, &geo, geo.l2_index(GuestOffset(pos)));
                let mapping = self.decode_entry(entry, cluster_start)?;
                f(
                    pos..cluster_end,
                    cluster_start,
                    Some((mapping, entry.subclusters())),
                )?;
                pos = cluster_end;
            }
        }
        Ok(())
    }

    /// Maps a guest range to pieces, loading L2 tables as needed.
    pub(crate) async fn map_range(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Piece>> {
        let fallthrough = if self.backing.is_some() {
            Source::Backing
        } else {
            Source::Zero
        };
        let mut pieces = Vec::new();
        self.walk(meta, offset, len, |range, cluster_start, m| match m {
            None => {
                push(
                    &mut pieces,
                    Piece {
                        guest: range.start,
                        len: range.end - range.start,
                        source: fallthrough,
                    },
                );
                Ok(())
            }
            Some((mapping, bitmap)) => self.cluster_pieces(
                &mut pieces,
                range,
                cluster_start,
                mapping,
                bitmap,
                fallthrough,
            ),
        })
        .await?;
        Ok(pieces)
    }

    fn cluster_pieces(
        &self,
        pieces: &mut Vec<Piece>,
        range: Range<u64>,
        cluster_start: u64,
        mapping: L2Mapping,
        bitmap: SubclusterBitmap,
        fallthrough: Source,
    ) -> Result<()> {
        let data_file = self.files.data().is_some();
        let whole = |source| Piece {
            guest: range.start,
            len: range.end - range.start,
            source,
        };
        if !self.geo.extended_l2() {
            let source = match mapping {
                L2Mapping::Unallocated => fallthrough,
                L2Mapping::Zero { .. } => Source::Zero,
                L2Mapping::Normal { host, .. } => Source::Data {
                    host: host.0 + (range.start - cluster_start),
                    data_file,
                },
                L2Mapping::Compressed(desc) => Source::Compressed {
                    desc,
                    in_cluster: range.start - cluster_start,
                },
            };
            push(pieces, whole(source));
            return Ok(());
        }
        let host = match mapping {
            L2Mapping::Compressed(desc) => {
                push(
                    pieces,
                    whole(Source::Compressed {
                        desc,
                        in_cluster: range.start - cluster_start,
                    }),
                );
                return Ok(());
            }
            L2Mapping::Normal { host, .. } => Some(host.0),
            L2Mapping::Unallocated => None,
            L2Mapping::Zero { .. } => {
                return Err(self.corrupt("zero flag in an extended L2 entry"));
            }
        };
        let sc = self.geo.subcluster_size();
        let mut pos = range.start;
        while pos < range.end {
            let i = ((pos - cluster_start) / sc) as u32;
            let sc_end = range.end.min(cluster_start + (u64::from(i) + 1) * sc);
            let source = match bitmap.state(i) {
                SubclusterState::Unallocated => fallthrough,
                SubclusterState::Zero => Source::Zero,
                SubclusterState::Allocated => match host {
                    Some(h) => Source::Data {
                        host: h + (pos - cluster_start),
                        data_file,
                    },
                    None => {
                        return Err(self.corrupt(format!(
                            "subcluster {i} of guest cluster {cluster_start:#x} is allocated \
                             but the cluster has no host offset"
                        )))
                    }
                },
            };
            push(
                pieces,
                Piece {
                    guest: pos,
                    len: sc_end - pos,
                    source,
                },
            );
            pos = sc_end;
        }
        Ok(())
    }
}
