//! Write-zeroes and discard, as QEMU does them: a write-zeroes is split at subcluster
//! boundaries as QEMU's block layer splits it; whole clusters change their L2 entries (zero
//! flag, or deallocated), whole subclusters of a partial cluster their zero bits (extended
//! L2), a request covering part of a subcluster zeroes all of it when the rest already reads
//! as zeros, and what cannot be done with metadata is written with zeros. One place decides
//! what an entry becomes ([`ZeroMode::change`]). Unmapped clusters are freed by a later
//! write-back, each under its exclusive lease (I3, I4).

use crate::image::Image;
use crate::{Error, Result};
use blockio::{Backend, IoBuf, Keep, Opener};
use qcow2_format::{
    ClusterGeometry, GuestOffset, HostCluster, L2Entry, L2Mapping, SubclusterBitmap,
    SubclusterState,
};
use std::sync::atomic::Ordering;

/// Largest explicit zero write, in bytes.
const ZERO_CHUNK: u64 = 1 << 20;

impl<O: Opener> Image<O> {
    /// Makes `[offset, offset+len)` read as zeros. With `may_unmap`, clusters wholly inside
    /// the range may be deallocated (qemu-io `write -z -u`).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at`]: each guest cluster of the range reads either its old data or
    /// zeros (the change is made one L2 table at a time, each step consistent), clusters it
    /// unmapped are freed by a later write-back, and nothing else is affected.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        // No snapshot operation runs meanwhile (see `Image::writers`).
        let _writer = self.writers.token().await;
        match self.write_zeroes_inner(offset, len, may_unmap).await {
            Ok(()) => {
                self.acked.fetch_add(1, Ordering::AcqRel);
                self.durable_if(false).await
            }
            Err(e) => Err(self
                .on_error(e)
                .await
                .in_request("write-zeroes", offset, len)),
        }
    }

    async fn write_zeroes_inner(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable(offset, len)?;
        self.before_first_write().await?;
        self.bitmap_ctx().bitmaps_mark(offset, len).await;
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
        let end = offset + len;
        let v3 = self.header.version >= 3;
        if !v3 && self.backing.is_some() {
            // v2 has no zero flag to hide a backing file: QEMU's qcow2_subcluster_zeroize
            // refuses and the block layer writes zeros.
            return self.write_zero_bytes(offset, end).await;
        }
        let mode = if v3 {
            ZeroMode::Zero { unmap: may_unmap }
        } else {
            ZeroMode::Deallocate
        };
        let sc = self.geo.subcluster_size();
        let mut pos = offset;
        while pos < end {
            let n = next_request(pos, end, sc);
            let zeroed = match partial_subcluster(pos, pos + n, sc, self.size()) {
                Some(p) => self.zero_partial(&p, mode).await?,
                None => self.change_range(pos..pos + n, mode, false).await?,
            };
            let n = if zeroed {
                n
            } else {
                // As QEMU's bounce-buffer fallback: at most MAX_BOUNCE_BUFFER at a time, the
                // rest is tried again as a request of its own.
                let n = n.min(FALLBACK_MAX);
                self.write_zero_bytes(pos, pos + n).await?;
                n
            };
            pos += n;
        }
        Ok(())
    }

    /// A request covering part of a subcluster (QEMU's `qcow2_co_pwrite_zeroes` with a head
    /// or tail): when the rest of the subcluster already reads as zeros through the chain
    /// (`is_zero`), the whole subcluster is zeroed instead, provided that, under the metadata
    /// lock, it is still unallocated or zero in this image (a write may have come in since).
    /// Returns false when it was not (the caller writes zeros).
    async fn zero_partial(&self, p: &Partial, mode: ZeroMode) -> Result<bool> {
        if !self
            .reads_as_zeros(p.head.start, p.head.end - p.head.start)
            .await?
            || !self
                .reads_as_zeros(p.tail.start, p.tail.end - p.tail.start)
                .await?
        {
            return Ok(false);
        }
        self.change_range(p.subcluster.clone(), mode, true).await
    }

    /// Writes real zeros over `[from, to)`, as part of the request that holds the writer's
    /// token already (a second token could wait behind a snapshot operation that waits for
    /// the first).
    async fn write_zero_bytes(&self, from: u64, to: u64) -> Result<()> {
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(ZERO_CHUNK);
            self.write_steps(IoBuf::new(n as usize), 0, pos, pos + n)
                .await
                .0?;
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
        // No snapshot operation runs meanwhile (see `Image::writers`).
        let _writer = self.writers.token().await;
        match self.discard_inner(offset, len).await {
            Ok(()) => {
                self.acked.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => Err(self.on_error(e).await.in_request("discard", offset, len)),
        }
    }

    async fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(offset, len)?;
        self.before_first_write().await?;
        self.bitmap_ctx().bitmaps_mark(offset, len).await;
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
        self.change_range(first..last, ZeroMode::Discard, false)
            .await
            .map(|_| ())
    }

    /// Makes the whole clusters of `range` unallocated, whatever they were: what a version 2
    /// image without a backing file reads as zeros (the amendment to version 2 uses it for
    /// zero clusters, which version 2 cannot express).
    pub(crate) async fn deallocate(&self, range: std::ops::Range<u64>) -> Result<()> {
        self.change_range(range, ZeroMode::Deallocate, false)
            .await
            .map(|_| ())
    }

    /// Deallocates every cluster of the disk (QEMU's `bdrv_make_empty`, as `qemu-img commit`
    /// leaves the image it committed): reads fall through to the backing file.
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`]; I/O errors.
    pub(crate) async fn make_empty(&self) -> Result<()> {
        self.check_writable(0, 0)?;
        self.before_first_write().await?;
        let _writer = self.writers.token().await;
        self.change_range(0..self.size(), ZeroMode::Truncate, false)
            .await
            .map(|_| ())
    }

    /// Changes the L2 entries of the clusters in `range` as `mode` says (QEMU's
    /// `qcow2_subcluster_zeroize` and `qcow2_cluster_discard`): `range` is subcluster-aligned
    /// or ends at the end of the disk; whole clusters change their entries, the subclusters of
    /// a partial one their bits (extended L2). Old clusters are unreferenced (their counts drop
    /// at the next write-back, under their exclusive lease: I3, I4).
    ///
    /// Returns false, as QEMU's `-ENOTSUP`, when a cluster cannot take the change (the
    /// subclusters of a compressed cluster): the clusters before it keep theirs, as in QEMU,
    /// and the caller writes zeros instead. With `only_unset` (a partial request expanded to
    /// its subcluster) the first subcluster of `range` must still read through or as zeros
    /// in this image ([`unset`]), checked in the critical section that changes it.
    pub(super) async fn change_range(
        &self,
        range: std::ops::Range<u64>,
        mode: ZeroMode,
        only_unset: bool,
    ) -> Result<bool> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let size = self.size();
        let has_backing = self.backing.is_some();
        let v3 = self.header.version >= 3;
        let data_file = self.files.data().is_some();
        let mut pos = range.start;
        while pos < range.end {
            let mut meta = self.meta.lock().await;
            if range.end > meta.disk_end && mode != ZeroMode::Truncate {
                // A shrink came between the request's entry check and this step.
                return Err(Error::OutOfRange {
                    offset: pos,
                    len: range.end - pos,
                    size: meta.disk_end,
                });
            }
            let l1_index = geo.l1_index(GuestOffset(pos));
            let table_end = range.end.min((l1_index + 1) * geo.l2_coverage());
            let has_table = self.mapper().l2_offset(&meta, l1_index)?.is_some();
            if !has_table && !mode.needs_table(has_backing, v3) {
                pos = table_end;
                continue;
            }
            // Wait for allocations in flight in this table's part of the range.
            let gate = meta.gates.first_in(
                (geo.cluster_start(pos)..table_end)
                    .step_by(cs as usize)
                    .map(|c| c >> geo.cluster_bits()),
            );
            if let Some(g) = gate {
                drop(meta);
                g.wait().await;
                continue;
            }
            let l2 = self.writable_l2(&mut meta, l1_index).await?;
            let mut entries = Vec::new();
            {
                let table = self.store().l2_table(&mut meta, l2).await?;
                let mut c = geo.cluster_start(pos);
                while c < table_end {
                    let idx = geo.l2_index(GuestOffset(c));
                    entries.push((c, idx, L2Entry::read(table, &geo, idx)));
                    c += cs;
                }
            }
            let mut updates = Vec::new();
            let mut unref = Vec::new();
            let mut supported = true;
            for (c, idx, e) in entries {
                let old = self.mapper().decode_entry(e, c)?;
                let part = cluster_part(&geo, c, pos..table_end, size);
                let first_sc = ((pos.max(c) - c) / geo.subcluster_size()) as u32;
                let change = if only_unset && !unset(old, e.subclusters(), first_sc, &geo) {
                    Change::Unsupported
                } else {
                    mode.change(part, old, e, &geo, has_backing, v3)
                };
                match change {
                    Change::Keep => {}
                    Change::Set(new) => {
                        if !data_file {
                            unref.extend(dropped_clusters(old, new, &geo));
                        }
                        updates.push((idx, new));
                    }
                    Change::Unsupported => {
                        supported = false;
                        break;
                    }
                }
            }
            if !updates.is_empty() {
                let table = self.store().l2_table_mut(&mut meta, l2).await?;
                for (idx, new) in updates {
                    new.write(table, &geo, idx);
                }
            }
            if let Some(alloc) = meta.alloc.as_mut() {
                for c in unref {
                    alloc.defer_decrement(c);
                }
            }
            self.store().maybe_write_back(&mut meta).await?;
            if !supported {
                return Ok(false);
            }
            pos = table_end;
        }
        Ok(true)
    }
}

/// QEMU's largest bounce buffer (`MAX_BOUNCE_BUFFER`): a write-zeroes request the driver
/// cannot do with metadata is written with zeros this much at a time.
const FALLBACK_MAX: u64 = 16 << 20;

/// The length of the next request QEMU's block layer hands the qcow2 driver for a
/// write-zeroes of `[pos, end)` (`bdrv_co_do_pwrite_zeroes`, aligned to the subcluster size
/// `sc`): the unaligned head up to the first subcluster boundary, then the aligned middle,
/// then the unaligned tail.
fn next_request(pos: u64, end: u64, sc: u64) -> u64 {
    let left = end - pos;
    let head = pos % sc;
    let tail = end % sc;
    if head != 0 {
        left.min(FALLBACK_MAX).min(sc - head)
    } else if tail != 0 && left > sc {
        left - tail
    } else {
        left
    }
}

/// A request that covers part of one subcluster (QEMU's `qcow2_co_pwrite_zeroes` with a head
/// or tail): the subcluster, and the parts of it outside the request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Partial {
    /// The whole subcluster (up to the end of the disk).
    subcluster: std::ops::Range<u64>,
    /// What precedes the request in it.
    head: std::ops::Range<u64>,
    /// What follows the request in it (nothing when the request ends the disk).
    tail: std::ops::Range<u64>,
}

/// Whether the request `[from, to)` (one from [`next_request`]) covers only part of a
/// subcluster, and which. A request ending at the end of the disk has no tail.
fn partial_subcluster(from: u64, to: u64, sc: u64, size: u64) -> Option<Partial> {
    let head = from % sc;
    let tail = if to == size {
        0
    } else {
        to.next_multiple_of(sc) - to
    };
    if head == 0 && tail == 0 {
        return None;
    }
    let start = from - head;
    Some(Partial {
        subcluster: start..(start + sc).min(size),
        head: start..from,
        tail: to..(to + tail).min(size),
    })
}

/// Which part of the cluster at `cluster` a change of `range` covers: all of it (also when
/// it starts the cluster and reaches the end of the disk), or some of its subclusters (QEMU's
/// head and tail in `qcow2_subcluster_zeroize`).
fn cluster_part(
    geo: &ClusterGeometry,
    cluster: u64,
    range: std::ops::Range<u64>,
    size: u64,
) -> Part {
    let cs = geo.cluster_size();
    let sc = geo.subcluster_size();
    let from = range.start.max(cluster) - cluster;
    let to = range.end.min(cluster + cs) - cluster;
    if from == 0 && (to == cs || cluster + to >= size) {
        Part::Whole
    } else {
        Part::Subclusters((from / sc) as u32..to.div_ceil(sc) as u32)
    }
}

/// Whether subcluster `i` of a cluster mapping `old` (with `bitmap`, extended L2) reads
/// through to the backing file or as zeros in this image: QEMU's subcluster types
/// `UNALLOCATED_*` and `ZERO_*`, which alone let `qcow2_co_pwrite_zeroes` zero a whole
/// subcluster for part of it.
fn unset(old: L2Mapping, bitmap: SubclusterBitmap, i: u32, geo: &ClusterGeometry) -> bool {
    match old {
        L2Mapping::Unallocated | L2Mapping::Zero { .. } => true,
        L2Mapping::Compressed(_) => false,
        L2Mapping::Normal { .. } => {
            geo.extended_l2() && bitmap.state(i) != SubclusterState::Allocated
        }
    }
}

/// The part of one cluster a change covers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// The whole cluster.
    Whole,
    /// These subclusters (extended L2 only).
    Subclusters(std::ops::Range<u32>),
}

/// What a change does to one L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Nothing.
    Keep,
    /// Replace it.
    Set(L2Entry),
    /// It cannot be done with metadata (QEMU's `-ENOTSUP`).
    Unsupported,
}

/// The host clusters whose reference an entry's change from `old` to `new` drops: its host
/// cluster when the new entry has none, every cluster of a compressed one.
fn dropped_clusters(old: L2Mapping, new: L2Entry, geo: &ClusterGeometry) -> Vec<HostCluster> {
    let host_dropped =
        new.word & L2Entry::OFFSET_MASK == 0 || matches!(old, L2Mapping::Compressed(_));
    if !host_dropped {
        return Vec::new();
    }
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

/// How [`Image::change_range`] changes an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ZeroMode {
    /// Discard: deallocate; read zeros (v3, when needed) or the backing file (v2).
    Discard,
    /// Write zeroes on v3: the zero flag (zero bits); deallocate if `unmap` (always for
    /// compressed clusters).
    Zero { unmap: bool },
    /// Write zeroes on v2 without a backing file: deallocate.
    Deallocate,
    /// A shrink cutting the clusters past the new end: deallocate, whatever lies below
    /// (QEMU's full discard); the only mode allowed past [`Meta::disk_end`](crate::meta::Meta).
    Truncate,
}

impl ZeroMode {
    /// Whether clusters in a range without an L2 table change, so that the table must be
    /// allocated. Write-zeroes sets the zero flag on them as QEMU does (`zero_in_l2_slice`,
    /// whose `get_cluster_table` allocates the table): `qemu-img map` shows them present and
    /// zero, with or without a backing file. A discard only needs to hide a backing file
    /// (QEMU allocates the table there too, but leaves every entry as it was: nothing to see);
    /// deallocating finds nothing to deallocate.
    fn needs_table(&self, has_backing: bool, v3: bool) -> bool {
        match self {
            ZeroMode::Zero { .. } => true,
            ZeroMode::Discard => has_backing && v3,
            ZeroMode::Deallocate | ZeroMode::Truncate => false,
        }
    }

    /// What this mode does to `part` of a cluster whose entry `e` maps `old`.
    fn change(
        &self,
        part: Part,
        old: L2Mapping,
        e: L2Entry,
        geo: &ClusterGeometry,
        has_backing: bool,
        v3: bool,
    ) -> Change {
        let new = match part {
            Part::Whole => self.whole_cluster(old, e, geo, has_backing, v3),
            // QEMU's zero_l2_subclusters: the zero bits, the entry otherwise as it was; a
            // compressed cluster has no subclusters to mark.
            Part::Subclusters(r) => match (self, old) {
                (ZeroMode::Zero { .. }, L2Mapping::Compressed(_)) => return Change::Unsupported,
                (ZeroMode::Zero { .. }, _) if geo.extended_l2() => {
                    let mut b = e.subclusters();
                    b.set_range(r, SubclusterState::Zero);
                    L2Entry {
                        word: e.word,
                        bitmap: b.0,
                    }
                }
                // Discards change whole clusters only, and a cluster without subclusters is
                // never changed in part.
                _ => return Change::Unsupported,
            },
        };
        if new == e {
            Change::Keep
        } else {
            Change::Set(new)
        }
    }

    /// The new entry of a whole cluster (QEMU's `zero_in_l2_slice` and
    /// `discard_in_l2_slice`).
    fn whole_cluster(
        &self,
        old: L2Mapping,
        e: L2Entry,
        geo: &ClusterGeometry,
        has_backing: bool,
        v3: bool,
    ) -> L2Entry {
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
        match self {
            ZeroMode::Discard => {
                if !v3 {
                    L2Entry::default()
                } else if has_backing || allocated {
                    zero(false)
                } else {
                    e
                }
            }
            ZeroMode::Deallocate | ZeroMode::Truncate => L2Entry::default(),
            ZeroMode::Zero { unmap } => {
                let compressed = matches!(old, L2Mapping::Compressed(_));
                let keep = !(compressed || *unmap && allocated);
                zero(keep && allocated)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2_format::{CompressedDescriptor, HostOffset};

    const KIB: u64 = 1024;

    fn geo(extended: bool) -> ClusterGeometry {
        ClusterGeometry::new(16, extended).unwrap()
    }

    #[test]
    fn requests_are_split_at_subcluster_boundaries_as_the_block_layer_splits_them() {
        let sc = 4 * KIB;
        // Inside one subcluster: the whole request.
        assert_eq!(next_request(1000, 1100, sc), 100);
        // Unaligned head, up to the first boundary.
        assert_eq!(next_request(1000, 10000, sc), 3096);
        // Aligned middle, without the unaligned tail.
        assert_eq!(next_request(4096, 10000, sc), 4096);
        // The tail alone.
        assert_eq!(next_request(8192, 10000, sc), 1808);
        // Aligned at both ends, or ending inside the first subcluster: all of it.
        assert_eq!(next_request(8192, 8192 + 5 * sc, sc), 5 * sc);
        assert_eq!(next_request(8192, 8200, sc), 8);
        // A head is at most one bounce buffer.
        assert_eq!(next_request(1, 64 << 20, 32 << 20), FALLBACK_MAX);
    }

    #[test]
    fn a_partial_request_names_its_subcluster_and_the_rest_of_it() {
        let size = 64 * KIB;
        assert_eq!(
            partial_subcluster(1000, 1100, 4096, size),
            Some(Partial {
                subcluster: 0..4096,
                head: 0..1000,
                tail: 1100..4096,
            })
        );
        assert_eq!(partial_subcluster(4096, 8192, 4096, size), None);
        // Ending the disk: no tail, and the subcluster stops at the end.
        let size = 65000;
        assert_eq!(partial_subcluster(61440, 65000, 4096, size), None);
        assert_eq!(
            partial_subcluster(61500, 65000, 4096, size),
            Some(Partial {
                subcluster: 61440..65000,
                head: 61440..61500,
                tail: 65000..65000,
            })
        );
    }

    #[test]
    fn only_whole_clusters_change_whole_and_the_end_of_the_disk_counts_as_whole() {
        let g = geo(true);
        let c = 64 * KIB;
        let size = 1 << 20;
        assert_eq!(cluster_part(&g, c, c..2 * c, size), Part::Whole);
        assert_eq!(cluster_part(&g, c, 0..3 * c, size), Part::Whole);
        assert_eq!(
            cluster_part(&g, 0, 2048..6144, size),
            Part::Subclusters(1..3)
        );
        assert_eq!(
            cluster_part(&g, c, c - 4096..c + 8192, size),
            Part::Subclusters(0..4)
        );
        // A disk ending inside the cluster.
        assert_eq!(cluster_part(&g, 0, 0..2048, 2048), Part::Whole);
        assert_eq!(
            cluster_part(&g, 0, 2048..4096, 4096),
            Part::Subclusters(1..2)
        );
    }

    #[test]
    fn zeroing_subclusters_sets_their_zero_bits_and_keeps_the_host_cluster() {
        let g = geo(true);
        let old = L2Mapping::Normal {
            host: HostOffset(0x70000),
            copied: true,
        };
        let e = L2Entry::encode(old, &g, SubclusterBitmap::ALL_ALLOCATED.0);
        let mode = ZeroMode::Zero { unmap: true };
        let Change::Set(new) = mode.change(Part::Subclusters(1..3), old, e, &g, false, true) else {
            panic!("no change");
        };
        assert_eq!(new.word, e.word);
        let b = new.subclusters();
        assert_eq!(b.state(0), SubclusterState::Allocated);
        assert_eq!(b.state(1), SubclusterState::Zero);
        assert_eq!(b.state(2), SubclusterState::Zero);
        assert_eq!(b.state(3), SubclusterState::Allocated);
        assert!(dropped_clusters(old, new, &g).is_empty());
        // Already zero: nothing to do.
        assert_eq!(
            mode.change(Part::Subclusters(1..3), old, new, &g, false, true),
            Change::Keep
        );
        // A compressed cluster cannot take zero bits.
        let d = CompressedDescriptor {
            host_offset: 0x30000,
            additional_sectors: 0,
        };
        let c = L2Mapping::Compressed(d);
        assert_eq!(
            mode.change(
                Part::Subclusters(0..1),
                c,
                L2Entry::encode(c, &g, 0),
                &g,
                false,
                true
            ),
            Change::Unsupported
        );
    }

    #[test]
    fn zeroing_whole_clusters_sets_the_zero_flag_and_unmaps_only_when_allowed() {
        let g = geo(false);
        let old = L2Mapping::Normal {
            host: HostOffset(0x70000),
            copied: true,
        };
        let e = L2Entry::encode(old, &g, 0);
        let keep = ZeroMode::Zero { unmap: false };
        let unmap = ZeroMode::Zero { unmap: true };
        let Change::Set(kept) = keep.change(Part::Whole, old, e, &g, false, true) else {
            panic!("no change");
        };
        assert_eq!(kept.word, e.word | qcow2_format::L2_ZERO);
        assert!(dropped_clusters(old, kept, &g).is_empty());
        let Change::Set(freed) = unmap.change(Part::Whole, old, e, &g, false, true) else {
            panic!("no change");
        };
        assert_eq!(freed.word, qcow2_format::L2_ZERO);
        assert_eq!(dropped_clusters(old, freed, &g), vec![HostCluster(7)]);
        // Unallocated, with or without a backing file: the zero flag.
        let none = L2Entry::default();
        for backing in [false, true] {
            assert_eq!(
                keep.change(Part::Whole, L2Mapping::Unallocated, none, &g, backing, true),
                Change::Set(L2Entry {
                    word: qcow2_format::L2_ZERO,
                    bitmap: 0
                })
            );
        }
        assert!(ZeroMode::Zero { unmap: false }.needs_table(false, true));
        assert!(!ZeroMode::Discard.needs_table(false, true));
        assert!(!ZeroMode::Deallocate.needs_table(false, false));
    }

    #[test]
    fn a_partial_request_zeroes_its_subcluster_only_where_it_reads_through_or_as_zeros() {
        let std = geo(false);
        let ext = geo(true);
        let data = L2Mapping::Normal {
            host: HostOffset(0x70000),
            copied: true,
        };
        let none = SubclusterBitmap(0);
        assert!(unset(L2Mapping::Unallocated, none, 0, &std));
        assert!(unset(
            L2Mapping::Zero {
                preallocated: Some(HostOffset(0x70000)),
                copied: true
            },
            none,
            0,
            &std
        ));
        assert!(!unset(data, none, 0, &std));
        // Extended L2: the subcluster's own state decides.
        let mut b = SubclusterBitmap(0);
        b.set(1, SubclusterState::Allocated);
        b.set(2, SubclusterState::Zero);
        assert!(unset(data, b, 0, &ext));
        assert!(!unset(data, b, 1, &ext));
        assert!(unset(data, b, 2, &ext));
        let c = L2Mapping::Compressed(CompressedDescriptor {
            host_offset: 0x30000,
            additional_sectors: 0,
        });
        assert!(!unset(c, none, 0, &ext));
    }
}
