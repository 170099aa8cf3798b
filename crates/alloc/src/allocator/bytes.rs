//! Byte-granular allocation for compressed clusters, as QEMU's `qcow2_alloc_bytes` does it:
//! compressed clusters are packed one after the other into a shared host cluster, from a
//! cursor kept in memory; each host cluster a compressed cluster's bytes touch holds one
//! reference for it.

use super::Allocator;
use crate::refcount::RefcountError;
use crate::reservation::Reservation;
use qcow2_format::HostCluster;

/// The bytes allocated for one compressed cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteAllocation {
    /// Byte offset of the data in the file.
    pub offset: u64,
    /// First host cluster the bytes touch.
    pub first: HostCluster,
    /// How many host clusters they touch (1 or 2): each got one more reference.
    pub count: u64,
    /// Whether a new cluster was taken that lies past everything written since open.
    pub fresh: bool,
}

impl Allocator {
    /// Allocates `size` bytes (1 to the cluster size) for a compressed cluster: after the
    /// previous compressed cluster when they fit in its host cluster, or run on into the
    /// next cluster when that is the one allocated next, else at the start of a new cluster
    /// (QEMU's `qcow2_alloc_bytes`). Every cluster touched gets one reference. `leased` as
    /// for [`allocate`](Self::allocate).
    ///
    /// # Panics
    ///
    /// If `size` is 0 or larger than a cluster.
    pub fn allocate_bytes(
        &mut self,
        size: u64,
        leased: impl Fn(HostCluster) -> bool,
    ) -> Result<ByteAllocation, RefcountError> {
        let cs = self.geo.cluster_size();
        let bits = self.geo.cluster_bits();
        assert!(
            size > 0 && size <= cs,
            "compressed size {size} out of range"
        );
        self.reclaim()?;
        let mut offset = self.free_byte.unwrap_or(0);
        if offset != 0 {
            let v = self.rc.get(HostCluster(offset >> bits))?;
            if v == 0 || v >= self.width().max() {
                offset = 0;
            }
        }
        let mut new = None;
        let mut fresh = false;
        if offset == 0 || cs - offset % cs < size {
            let a = self.allocate(1, &leased)?;
            fresh = a.fresh;
            new = Some(a.first.0);
            let start = self.geo.cluster_offset(a.first).0;
            if offset == 0 || offset.next_multiple_of(cs) != start {
                offset = start;
            }
        }
        let first = offset >> bits;
        let last = (offset + size - 1) >> bits;
        for c in first..=last {
            // A new cluster has its reference from `allocate`.
            if new != Some(c) {
                if let Err(e) = self.increment(HostCluster(c)) {
                    if let Some(n) = new {
                        self.release_unreferenced(HostCluster(n), 1)?;
                    }
                    return Err(e);
                }
            }
        }
        self.free_byte = Some(offset + size).filter(|b| b % cs != 0);
        Ok(ByteAllocation {
            offset,
            first: HostCluster(first),
            count: last - first + 1,
            fresh,
        })
    }

    /// A reservation of the references of `b` (not referred to yet): dropped uncommitted, it
    /// gives back one reference per cluster through the deferred decrements, so a cluster
    /// shared with other compressed clusters stays theirs.
    pub fn reserve_bytes(&self, b: &ByteAllocation) -> Reservation {
        Reservation::new(b.first, b.count, true, self.returns.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refcount::Refcounts;
    use qcow2_format::{ClusterGeometry, HostOffset, RefcountWidth, ReftableEntry};

    /// 4 KiB clusters: the refcount table in cluster 0, its block in cluster 1.
    fn allocator() -> Allocator {
        let geo = ClusterGeometry::new(12, false).unwrap();
        let cs = geo.cluster_size();
        let mut table = vec![ReftableEntry(0); (cs / 8) as usize];
        table[0] = ReftableEntry(cs);
        let mut rc = Refcounts::new(geo, RefcountWidth::from_bits(16).unwrap(), table);
        rc.insert_block(0, vec![0; cs as usize]);
        rc.set(HostCluster(0), 1).unwrap();
        rc.set(HostCluster(1), 1).unwrap();
        Allocator::new(rc, geo, HostOffset(0), 2)
    }

    fn rc(a: &Allocator, c: u64) -> u64 {
        a.get(HostCluster(c)).unwrap()
    }

    #[test]
    fn compressed_clusters_pack_into_one_host_cluster_and_run_on() {
        let mut a = allocator();
        let none = |_| false;
        let b1 = a.allocate_bytes(1000, none).unwrap();
        assert_eq!((b1.offset, b1.first.0, b1.count), (0x2000, 2, 1));
        assert!(b1.fresh);
        let b2 = a.allocate_bytes(3000, none).unwrap();
        assert_eq!((b2.offset, b2.count), (0x2000 + 1000, 1));
        assert_eq!(rc(&a, 2), 2);
        // 96 bytes left: the next one runs on into cluster 3, allocated next.
        let b3 = a.allocate_bytes(500, none).unwrap();
        assert_eq!((b3.offset, b3.first.0, b3.count), (0x2000 + 4000, 2, 2));
        assert_eq!((rc(&a, 2), rc(&a, 3)), (3, 1));
        // A cluster allocated elsewhere in between: the next one starts at a new cluster.
        let other = a.allocate(1, none).unwrap();
        assert_eq!(other.first.0, 4);
        let b4 = a.allocate_bytes(4000, none).unwrap();
        assert_eq!((b4.offset, b4.count), (0x5000, 1));
    }

    #[test]
    fn a_freed_cluster_is_not_packed_into_again() {
        let mut a = allocator();
        let none = |_| false;
        let b1 = a.allocate_bytes(100, none).unwrap();
        // Its write is dropped: the reference goes back through the deferred decrements.
        drop(a.reserve_bytes(&b1));
        a.reclaim().unwrap();
        assert_eq!(a.pending_len(), 1);
        let freed = a.apply_decrements(|_| Some(())).unwrap();
        assert_eq!(freed.len(), 1);
        let b2 = a.allocate_bytes(100, none).unwrap();
        assert_eq!(
            b2.offset, 0x2000,
            "a new cluster (the same one, free again)"
        );
        assert_eq!(rc(&a, 2), 1);
    }

    #[test]
    fn a_committed_reservation_keeps_its_references() {
        let mut a = allocator();
        let b1 = a.allocate_bytes(100, |_| false).unwrap();
        let r = a.reserve_bytes(&b1);
        r.commit();
        drop(r);
        a.reclaim().unwrap();
        assert!(!a.has_pending());
        assert_eq!(rc(&a, 2), 1);
    }
}
