//! Allocating writes: the step that gives a guest cluster a host cluster (a new one, held by
//! a reservation until its L2 entry is installed, or its own for new subclusters), with the
//! copy-on-write of the rest of the cluster read through the same pieces as a read (I5, I6).

use super::write::Step;
use crate::image::Image;
use crate::inflight::{keep, Guards};
use crate::map::{Piece, Source};
use crate::meta::Meta;
use crate::Result;
use blockio::{Backend, IoBuf, Opener};
use qcow2_alloc::{GateGuard, Reservation, SharedLease};
use qcow2_format::{
    ClusterGeometry, GuestOffset, HostCluster, HostOffset, L1Entry, L2Entry, L2Mapping,
    SubclusterBitmap, SubclusterState,
};
use std::sync::Arc;

/// An allocating write to one guest cluster.
pub(super) struct AllocStep {
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
    /// Makes sure the L2 table for `l1_index` exists and belongs to the active image alone
    /// (allocating it, or copying a table shared with a snapshot); returns its offset.
    pub(super) async fn writable_l2(&self, meta: &mut Meta, l1_index: u64) -> Result<u64> {
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
        let a = self.store().allocate_reusing(meta, 1).await?;
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
    pub(super) async fn plan_allocation(
        &self,
        meta: &mut Meta,
        pos: u64,
        end: u64,
    ) -> Result<Step> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cluster = geo.cluster_start(pos);
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
        let Target {
            reuse,
            bitmap,
            mut cow_from,
            mut cow_to,
        } = target(old, entry, &geo, data_file.then_some(cluster), from, to);

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
            let own = Source::Data { host: h, data_file };
            (cow_from, cow_to) =
                skip_own_bytes(&mut head, &mut tail, own, cluster, cow_from, cow_to);
        }
        let mut lease_clusters = self.mapper().lease_clusters(&head);
        lease_clusters.extend(self.mapper().lease_clusters(&tail));

        let unref = if data_file {
            Vec::new()
        } else {
            unreferenced(old, &geo)
        };

        let (host, allocation) = match reuse {
            Some(h) => (h, None),
            None => {
                let a = self.store().allocate_reusing(meta, 1).await?;
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
                self.give_back(meta, allocation.map(|_| host))?;
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
                self.give_back(meta, allocation.map(|_| host))?;
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

    /// Gives back the cluster at `host` that a step allocated and then did not take (it waits
    /// instead): nothing refers to it, nothing was written to it.
    fn give_back(&self, meta: &mut Meta, host: Option<u64>) -> Result<()> {
        let (Some(host), Some(alloc)) = (host, meta.alloc.as_mut()) else {
            return Ok(());
        };
        alloc
            .release_unreferenced(self.geo.host_cluster(HostOffset(host)), 1)
            .map_err(|e| self.store().alloc_err(e))
    }

    /// Performs a planned allocating write, then installs its L2 entry.
    pub(super) async fn write_allocating(
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
}

/// Where an allocating step writes and what it copies: see [`target`].
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// The host cluster written, when the cluster keeps its own (else a new one is allocated).
    reuse: Option<u64>,
    /// The subcluster bitmap of the new entry (extended L2).
    bitmap: SubclusterBitmap,
    /// The range written to the host cluster, relative to the guest cluster: it covers the
    /// write, and the rest of it is copied from the old view (copy-on-write).
    cow_from: u64,
    cow_to: u64,
}

/// Decides an allocating write of `[from, to)` (relative to its cluster) over the cluster's
/// `old` mapping (its raw `entry`): a cluster allocated with COPIED set keeps its host
/// cluster (extended L2: new subclusters in it), as does a preallocated zero cluster, and
/// with an external data file every cluster writes at `data_file_cluster`; anything else
/// goes to a new cluster. Standard L2 (and a compressed cluster) copies the whole cluster;
/// extended L2 copies to subcluster boundaries, and a cluster moving away from a host cluster
/// it shares (a snapshot's) from its first to its last allocated subcluster, as QEMU's
/// `calculate_l2_meta` does; the subclusters written or copied become allocated, the others
/// keep their state.
fn target(
    old: L2Mapping,
    entry: L2Entry,
    geo: &ClusterGeometry,
    data_file_cluster: Option<u64>,
    from: u64,
    to: u64,
) -> Target {
    let cs = geo.cluster_size();
    let sc = geo.subcluster_size();
    let extended = geo.extended_l2();
    let (reuse, mut bitmap) = match old {
        L2Mapping::Normal { host, copied: true } => (Some(host.0), entry.subclusters()),
        L2Mapping::Zero {
            preallocated: Some(h),
            copied: true,
        } => (Some(h.0), SubclusterBitmap(0)),
        _ => (None, entry.subclusters()),
    };
    let reuse = data_file_cluster.or(reuse);
    let compressed = matches!(old, L2Mapping::Compressed(_));
    let (cow_from, cow_to) = if !extended || compressed {
        (0, cs)
    } else if reuse.is_none() && matches!(old, L2Mapping::Normal { .. }) {
        // A cluster with data moving to a new host cluster (shared with a snapshot): as
        // QEMU's calculate_l2_meta, the copy reaches back to the first allocated subcluster
        // and on to the last one, and no further.
        let alloc = bitmap.allocated();
        let first = ((from / sc) as u32).min(alloc.trailing_zeros());
        let last = (to.div_ceil(sc) as u32).max(u32::BITS - alloc.leading_zeros());
        (u64::from(first) * sc, u64::from(last) * sc)
    } else {
        (from / sc * sc, to.div_ceil(sc) * sc)
    };
    if extended {
        if compressed {
            bitmap = SubclusterBitmap::ALL_ALLOCATED;
        } else {
            // As qcow2_alloc_cluster_link_l2: what was written or copied is allocated, every
            // other subcluster keeps its state (unallocated, or zero).
            bitmap.set_range(
                (cow_from / sc) as u32..(cow_to / sc) as u32,
                SubclusterState::Allocated,
            );
        }
    }
    Target {
        reuse,
        bitmap,
        cow_from,
        cow_to,
    }
}

/// Drops from the copy-on-write `head` and `tail` the pieces that are the reused cluster's
/// own bytes (`own`: its host offset, at guest offset `cluster`), narrowing `[cow_from,
/// cow_to)`: a write in place to them may be in flight (planned before this step's gate), and
/// copying them onto themselves would undo it. Returns the narrowed range.
fn skip_own_bytes(
    head: &mut Vec<Piece>,
    tail: &mut Vec<Piece>,
    own: Source,
    cluster: u64,
    mut cow_from: u64,
    mut cow_to: u64,
) -> (u64, u64) {
    let Source::Data { host: h, data_file } = own else {
        return (cow_from, cow_to);
    };
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
        !head.iter().chain(tail.iter()).any(in_place),
        "a copy of the reused cluster onto itself is left between other pieces"
    );
    (cow_from, cow_to)
}

/// The host clusters whose reference an allocating step's new entry drops: the old cluster
/// when the data moves (compressed, or shared with a snapshot: COPIED clear).
fn unreferenced(old: L2Mapping, geo: &ClusterGeometry) -> Vec<HostCluster> {
    match old {
        L2Mapping::Compressed(d) => d.host_clusters(geo).map(HostCluster).collect(),
        L2Mapping::Normal {
            host,
            copied: false,
        }
        | L2Mapping::Zero {
            preallocated: Some(host),
            copied: false,
        } => vec![geo.host_cluster(host)],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2_format::{CompressedDescriptor, HostOffset};

    fn geo(extended: bool) -> ClusterGeometry {
        ClusterGeometry::new(16, extended).unwrap()
    }

    fn entry(m: L2Mapping, g: &ClusterGeometry, bitmap: u64) -> L2Entry {
        L2Entry::try_encode(m, g, bitmap).unwrap()
    }

    #[test]
    fn standard_l2_copies_the_whole_cluster_to_a_new_one() {
        let g = geo(false);
        let t = target(
            L2Mapping::Unallocated,
            L2Entry::default(),
            &g,
            None,
            4096,
            8192,
        );
        assert_eq!((t.reuse, t.cow_from, t.cow_to), (None, 0, 65536));
        // Shared with a snapshot (COPIED clear): moves to a new cluster too, and drops it.
        let old = L2Mapping::Normal {
            host: HostOffset(0x50000),
            copied: false,
        };
        let t = target(old, entry(old, &g, 0), &g, None, 0, 512);
        assert_eq!((t.reuse, t.cow_from, t.cow_to), (None, 0, 65536));
        assert_eq!(unreferenced(old, &g), vec![HostCluster(5)]);
    }

    #[test]
    fn extended_l2_fills_subclusters_in_place() {
        let g = geo(true);
        let old = L2Mapping::Normal {
            host: HostOffset(0x70000),
            copied: true,
        };
        // Subcluster 0 allocated; a write of bytes 2048..2100 (subcluster 1) stays in place
        // and copies only to subcluster 1's bounds.
        let e = entry(old, &g, 1);
        let t = target(old, e, &g, None, 2048, 2100);
        assert_eq!(t.reuse, Some(0x70000));
        assert_eq!((t.cow_from, t.cow_to), (2048, 4096));
        assert_eq!(t.bitmap.state(0), SubclusterState::Allocated);
        assert_eq!(t.bitmap.state(1), SubclusterState::Allocated);
        assert_eq!(t.bitmap.state(2), SubclusterState::Unallocated);
        assert!(unreferenced(old, &g).is_empty());
    }

    #[test]
    fn extended_l2_copy_on_write_of_a_shared_cluster_spans_its_allocated_subclusters_only() {
        let g = geo(true);
        let sc = g.subcluster_size();
        let old = L2Mapping::Normal {
            host: HostOffset(0x70000),
            copied: false,
        };
        // Allocated: 4 and 10..12; zero: 7 and 20.
        let mut b = SubclusterBitmap(0);
        b.set(4, SubclusterState::Allocated);
        b.set_range(10..12, SubclusterState::Allocated);
        b.set(7, SubclusterState::Zero);
        b.set(20, SubclusterState::Zero);
        // A write into subcluster 6 copies 4..12 to the new cluster.
        let t = target(old, entry(old, &g, b.0), &g, None, 6 * sc, 6 * sc + 100);
        assert_eq!(t.reuse, None);
        assert_eq!((t.cow_from, t.cow_to), (4 * sc, 12 * sc));
        for i in 0..32 {
            let want = match i {
                4..12 => SubclusterState::Allocated,
                20 => SubclusterState::Zero,
                _ => SubclusterState::Unallocated,
            };
            assert_eq!(t.bitmap.state(i), want, "subcluster {i}");
        }
        assert_eq!(unreferenced(old, &g), vec![HostCluster(7)]);
        // Beyond the allocated ones on either side: from the write to them.
        let t = target(old, entry(old, &g, b.0), &g, None, 25 * sc, 25 * sc + 1);
        assert_eq!((t.cow_from, t.cow_to), (4 * sc, 26 * sc));
        assert_eq!(t.bitmap.state(20), SubclusterState::Allocated);
        assert_eq!(t.bitmap.state(26), SubclusterState::Unallocated);
        let t = target(old, entry(old, &g, b.0), &g, None, 0, 1);
        assert_eq!((t.cow_from, t.cow_to), (0, 12 * sc));
        assert_eq!(t.bitmap.state(20), SubclusterState::Zero);
    }

    #[test]
    fn compressed_clusters_move_whole_and_drop_every_host_cluster() {
        let g = geo(true);
        let d = CompressedDescriptor {
            host_offset: 0x30000 - 100,
            additional_sectors: 1,
        };
        let old = L2Mapping::Compressed(d);
        let t = target(old, entry(old, &g, 0), &g, None, 0, 512);
        assert_eq!((t.reuse, t.cow_from, t.cow_to), (None, 0, 65536));
        assert_eq!(t.bitmap, SubclusterBitmap::ALL_ALLOCATED);
        assert_eq!(unreferenced(old, &g), vec![HostCluster(2), HostCluster(3)]);
    }

    #[test]
    fn an_external_data_file_writes_every_cluster_at_its_guest_offset() {
        let g = geo(false);
        let t = target(
            L2Mapping::Unallocated,
            L2Entry::default(),
            &g,
            Some(0x90000),
            0,
            10,
        );
        assert_eq!(t.reuse, Some(0x90000));
    }

    #[test]
    fn own_bytes_are_not_copied_onto_themselves() {
        let piece = |guest, len, source| Piece { guest, len, source };
        let own = Source::Data {
            host: 0x70000,
            data_file: false,
        };
        let mut head = vec![
            piece(
                0x10000,
                1024,
                Source::Data {
                    host: 0x70000,
                    data_file: false,
                },
            ),
            piece(0x10400, 1024, Source::Zero),
        ];
        let mut tail = vec![piece(
            0x10c00,
            1024,
            Source::Data {
                host: 0x70c00,
                data_file: false,
            },
        )];
        let (from, to) = skip_own_bytes(&mut head, &mut tail, own, 0x10000, 0, 4096);
        assert_eq!((from, to), (1024, 3072));
        assert_eq!(head.len(), 1);
        assert!(tail.is_empty());
    }
}
