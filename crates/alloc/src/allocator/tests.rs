//! The allocator's own placements: runs, refcount blocks, the area of a preallocation.

use super::*;

fn allocator(bits: u32) -> Allocator {
    let geo = ClusterGeometry::new(bits, false).unwrap();
    let width = RefcountWidth::from_order(4).unwrap();
    let cs = geo.cluster_size();
    let mut table = vec![ReftableEntry(0); (cs / 8) as usize];
    table[0] = ReftableEntry(2 * cs);
    let mut rc = Refcounts::new(geo, width, table);
    rc.insert_block(0, vec![0; cs as usize]);
    for c in 0..3 {
        rc.set(HostCluster(c), 1).unwrap();
    }
    Allocator::new(rc, geo, HostOffset(cs), 3)
}

#[test]
fn used_end_is_past_the_last_counted_cluster() {
    let mut a = allocator(16);
    assert_eq!(a.used_end().unwrap(), 3);
    let run = a.allocate(4, |_| false).unwrap();
    assert_eq!((run.first, run.count), (HostCluster(3), 4));
    assert_eq!(a.used_end().unwrap(), 7);
    // A deferred decrement keeps the cluster counted until it is applied.
    a.defer_decrement(HostCluster(6));
    a.defer_decrement(HostCluster(5));
    assert_eq!(a.used_end().unwrap(), 7);
    let freed = a.apply_decrements(|_| Some(())).unwrap();
    assert_eq!(freed.len(), 2);
    assert_eq!(a.used_end().unwrap(), 5);
    // Cut there, the clusters past the end are fresh again.
    a.truncated(5);
    assert_eq!(a.high_water(), 5);
    let again = a.allocate(1, |_| false).unwrap();
    assert_eq!(again.first, HostCluster(5));
    assert!(again.fresh, "a cluster past the cut reads as zeros");
}

#[test]
fn a_run_longer_than_a_block_counts_gets_its_blocks_after_it() {
    // 512-byte clusters: a block counts 256 clusters, and an L1 table of 1000 clusters
    // spans four blocks' ranges. (Blocks placed inside the run's ranges would split it
    // at every try.)
    let mut a = allocator(9);
    let run = a.allocate(1000, |_| false).unwrap();
    assert_eq!((run.first, run.count), (HostCluster(3), 1000));
    for t in 1..4 {
        let b = a.refcounts().block_offset(t).unwrap().unwrap().0 >> 9;
        assert!(b >= 1003, "block {t} at {b}, inside the run");
        assert_eq!(a.get(HostCluster(b)).unwrap(), 1);
    }
    for c in 3..1003 {
        assert_eq!(a.get(HostCluster(c)).unwrap(), 1);
    }
}

#[test]
fn empty_blocks_are_dropped_and_the_file_can_end_before_them() {
    // 512-byte clusters, 16-bit counts: a block counts 256 clusters.
    let mut a = allocator(9);
    let run = a.allocate(300, |_| false).unwrap();
    assert_eq!(run.first, HostCluster(3));
    // The run reached into the second block's range: its block went right after the
    // run (as QEMU places it), where it describes itself.
    let second = a.refcounts().block_offset(1).unwrap().unwrap();
    assert_eq!(second.0 >> 9, 303);
    assert_eq!(
        a.drop_empty_blocks().unwrap(),
        0,
        "both blocks count clusters"
    );
    for c in 200..a.high_water() {
        if !a.is_metadata(HostCluster(c)) {
            a.defer_decrement(HostCluster(c));
        }
    }
    a.apply_decrements(|_| Some(())).unwrap();
    assert_eq!(a.drop_empty_blocks().unwrap(), 1);
    assert_eq!(a.refcounts().block_offset(1).unwrap(), None);
    assert_eq!(a.dirty_table_entries(), vec![1]);
    assert!(!a.is_metadata(HostCluster(303)));
    assert_eq!(a.used_end().unwrap(), 200);
}

#[test]
fn a_preallocated_area_follows_new_refcount_structures() {
    // 64 KiB clusters: one block counts the whole file; the area's table moves to the first
    // cluster past the file (QEMU's qcow2_refcount_area), the data right after it.
    let mut a = allocator(16);
    a.allocate(18, |_| false).unwrap(); // L1, L2, 16 data clusters: the file ends at 21
    let end = a.refcount_area(21, 48 + 2).unwrap();
    assert_eq!(end, 22, "no new block, a one-cluster table at 21");
    let m = a.table_move().unwrap();
    assert_eq!(
        (m.offset.0 >> 16, m.clusters, m.old_offset.0 >> 16),
        (21, 1, 1)
    );
    assert_eq!(a.get(HostCluster(21)).unwrap(), 1);
    let run = a.allocate_at(HostCluster(22), 48, |_| false).unwrap();
    assert!(run.fresh);
    assert_eq!(a.used_end().unwrap(), 70);
    assert!(
        a.allocate_at(HostCluster(69), 2, |_| false).is_err(),
        "69 is in use"
    );
    // 512-byte clusters: the area needs blocks of its own, before the table.
    let mut b = allocator(9);
    let end = b.refcount_area(3, 600).unwrap();
    let m = b.table_move().unwrap();
    // Blocks for table indices 1 and 2 (clusters 3, 4), then the one-cluster table (5).
    assert_eq!((m.offset.0 >> 9, end), (5, 6));
    assert_eq!(b.refcounts().block_offset(1).unwrap().unwrap().0 >> 9, 3);
    b.allocate_at(HostCluster(6), 600, |_| false).unwrap();
    assert_eq!(b.used_end().unwrap(), 606);
}

#[test]
fn a_run_that_outgrows_the_table_keeps_its_place_and_the_file_stays_compact() {
    // 512-byte clusters: a one-cluster table names 64 blocks (16384 clusters); an L1 table
    // of 32 MiB (65536 clusters) needs 256 more blocks, and the table must grow. It goes
    // past the run and its first new block (as QEMU's growth does), not into the run's
    // place, so the run is not pushed on and nothing lands far away.
    let mut a = allocator(9);
    a.allocate(2089, |_| false).unwrap();
    let r = a.allocate(65536, |_| false).unwrap();
    let end = r.first.0 + r.count;
    assert!(r.first.0 < 2200, "the run moved to {}", r.first.0);
    assert!(
        a.high_water() < end + 300,
        "blocks and table end at {}, the run at {end}",
        a.high_water()
    );
    let m = a.table_move().expect("the table grew");
    assert!(m.offset.0 >> 9 >= end, "the new table lies inside the run");
}

/// The refcount table moves to clusters past everything ever allocated, but never onto
/// a leased one there (invariant I1): a read of a compressed span past the end of the
/// file leases clusters nothing has allocated yet.
#[test]
fn a_growing_table_skips_leased_clusters_past_the_high_water_mark() {
    let geo = ClusterGeometry::new(9, false).unwrap();
    let width = RefcountWidth::from_order(4).unwrap();
    // One table entry (256 clusters): block at cluster 1, table at cluster 2.
    let mut rc = Refcounts::new(geo, width, vec![ReftableEntry(512)]);
    let mut block = vec![0u8; 512];
    for c in 0..3 {
        width.set(&mut block, c, 1).unwrap();
    }
    rc.insert_block(0, block);
    let mut a = Allocator::new(rc, geo, HostOffset(1024), 3);
    let first = a.allocate(253, |_| false).unwrap();
    assert_eq!((first.first, a.high_water()), (HostCluster(3), 256));
    let leased = |c: HostCluster| c.0 == 256;
    let next = a.allocate(1, leased).unwrap();
    let moved = a.table_move().expect("the table grew");
    assert_ne!(next.first, HostCluster(256));
    assert!(moved.offset.0 / 512 > 256, "{moved:?}");
    assert_eq!(a.get(HostCluster(256)), Ok(0));
}

#[test]
fn a_structure_of_another_width_counts_everything_and_itself() {
    // 512-byte clusters: at 1 bit a block counts 4096 clusters, at 64 bits 64.
    for bits in [1u32, 2, 8, 32, 64] {
        let mut a = allocator(9);
        a.allocate(300, |_| false).unwrap();
        a.increment(HostCluster(10)).unwrap();
        let width = RefcountWidth::from_bits(bits).unwrap();
        let over = a.first_overflow(width).unwrap();
        assert_eq!(
            over,
            (bits == 1).then_some((HostCluster(10), 2)),
            "{bits} bits"
        );
        if over.is_some() {
            continue;
        }
        let new = a.allocate_refcounts(width, |_| false).unwrap();
        let rc = a.encode_refcounts(&new).unwrap();
        let end = a.used_end().unwrap();
        // Every block of the new structure is counted, and counts itself as the old did.
        for c in new.clusters() {
            assert_eq!(a.get(c).unwrap(), 1, "{bits} bits: {c:?}");
            assert!(c.0 < end);
        }
        for c in 0..end + 64 {
            assert_eq!(
                rc.get(HostCluster(c)).unwrap(),
                a.get(HostCluster(c)).unwrap()
            );
        }
        let old_table = a.table_offset();
        let old_blocks = a.block_clusters.len();
        a.switch_refcounts(rc, a.geo.cluster_offset(new.table));
        assert_eq!(a.width(), width);
        assert!(a.is_metadata(new.table));
        assert!(!a.is_metadata(a.geo.host_cluster(old_table)));
        // The old table (one cluster) and blocks go once the decrements apply.
        let freed = a.apply_decrements(|_| Some(())).unwrap();
        assert_eq!(freed.len(), 1 + old_blocks, "{bits} bits");
        assert!(!a.dirty_blocks().is_empty());
    }
}
