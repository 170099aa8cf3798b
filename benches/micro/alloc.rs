//! Microbenchmarks of the allocation crate's hot paths: refcount lookups and updates in each
//! width, taking and releasing leases (every data I/O takes one per host cluster), and the
//! allocator's search for free clusters. Run with `just microbench` (benches/microbench.sh).

use divan::{black_box, Bencher};
use qcow2_alloc::{Allocator, LeaseTable, Refcounts};
use qcow2_format::{ClusterGeometry, HostCluster, HostOffset, RefcountWidth, ReftableEntry};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

fn main() {
    divan::main();
}

/// Polls a future that must not wait (an uncontended lease) to its end.
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an uncontended lease waited"),
    }
}

const CLUSTER_BITS: u32 = 16;

fn geo() -> ClusterGeometry {
    ClusterGeometry::new(CLUSTER_BITS, false).expect("valid geometry")
}

/// A refcount view of `blocks` loaded refcount blocks of `bits`-bit entries, placed after the
/// header (cluster 0) and the one-cluster refcount table (cluster 1), with `used(c)` telling
/// which other clusters have refcount 1. Returns it with the number of clusters it covers.
fn refcounts(bits: u32, blocks: u64, used: impl Fn(u64) -> bool) -> (Refcounts, u64) {
    let geo = geo();
    let cs = geo.cluster_size();
    let width = RefcountWidth::from_bits(bits).expect("valid width");
    let per = width.entries_per_block(cs);
    let table_len = (cs / 8) as usize;
    let mut table = vec![ReftableEntry(0); table_len];
    for (t, e) in table.iter_mut().enumerate().take(blocks as usize) {
        *e = ReftableEntry((2 + t as u64) * cs);
    }
    let mut rc = Refcounts::new(geo, width, table);
    let metadata = 2 + blocks;
    for t in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        for i in 0..per {
            let c = t * per + i;
            if c < metadata || used(c) {
                width.set(&mut block, i, 1).expect("1 fits every width");
            }
        }
        rc.insert_block(t, block);
    }
    (rc, blocks * per)
}

/// Refcount of one cluster (the allocator asks this for every cluster it considers).
#[divan::bench(args = [1, 4, 16, 64])]
fn refcount_get(bencher: Bencher, bits: u32) {
    let (rc, clusters) = refcounts(bits, 4, |c| c % 3 == 0);
    let mask = clusters - 1; // a power of two
    let mut c = 0u64;
    bencher.bench_local(|| {
        c = (c + 12_345) & mask;
        black_box(&rc).get(HostCluster(c)).expect("loaded")
    });
}

/// Setting one cluster's refcount in its loaded block (allocation, freeing, sharing).
#[divan::bench(args = [1, 4, 16, 64])]
fn refcount_set(bencher: Bencher, bits: u32) {
    let (mut rc, clusters) = refcounts(bits, 4, |c| c % 3 == 0);
    let mask = clusters - 1;
    let mut c = 0u64;
    bencher.bench_local(|| {
        c = (c + 12_345) & mask;
        black_box(&mut rc)
            .set(HostCluster(c), c & 1)
            .expect("loaded")
    });
}

/// The lease a read or write takes under the metadata lock and drops when its I/O is done,
/// on a cluster nobody else uses (the table entry is made and removed each time).
#[divan::bench]
fn lease_try_shared_release(bencher: Bencher) {
    let table = LeaseTable::new();
    bencher.bench_local(|| drop(black_box(&table).try_shared(HostCluster(7))));
}

/// The same while another reader holds the cluster (the entry exists already).
#[divan::bench]
fn lease_try_shared_release_joined(bencher: Bencher) {
    let table = LeaseTable::new();
    let _other = table.try_shared(HostCluster(7)).expect("free");
    bencher.bench_local(|| drop(black_box(&table).try_shared(HostCluster(7))));
}

/// The waiting form, after a contended try: uncontended here, so it does not wait.
#[divan::bench]
fn lease_shared_release(bencher: Bencher) {
    let table = LeaseTable::new();
    bencher.bench_local(|| drop(now(black_box(&table).shared(HostCluster(7)))));
}

/// The exclusive lease that freeing a cluster takes (try form: under the metadata lock).
#[divan::bench]
fn lease_try_exclusive_release(bencher: Bencher) {
    let table = LeaseTable::new();
    bencher.bench_local(|| drop(black_box(&table).try_exclusive(HostCluster(7))));
}

/// The exclusive lease, waiting form (uncontended).
#[divan::bench]
fn lease_exclusive_release(bencher: Bencher) {
    let table = LeaseTable::new();
    bencher.bench_local(|| drop(now(black_box(&table).exclusive(HostCluster(7)))));
}

/// A free that finds I/O in flight: the try fails, the decrement stays pending.
#[divan::bench]
fn lease_try_exclusive_contended(bencher: Bencher) {
    let table = LeaseTable::new();
    let _reader = table.try_shared(HostCluster(7)).expect("free");
    bencher.bench_local(|| {
        let l = black_box(&table).try_exclusive(HostCluster(7));
        assert!(l.is_none());
    });
}

/// A read that finds its cluster being freed: the try fails (then it waits without locks).
#[divan::bench]
fn lease_try_shared_contended(bencher: Bencher) {
    let table = LeaseTable::new();
    let _freer = table.try_exclusive(HostCluster(7)).expect("free");
    bencher.bench_local(|| {
        let l = black_box(&table).try_shared(HostCluster(7));
        assert!(l.is_none());
    });
}

/// An allocator over 16-bit refcounts in 2 blocks (65,536 clusters of 64 KiB: a 4 GiB file),
/// as the engine makes one when it opens an image: the search starts at cluster 0.
fn allocator(used: impl Fn(u64) -> bool) -> Allocator {
    let (rc, clusters) = refcounts(16, 2, &used);
    let file_clusters = (0..clusters).rev().find(|&c| used(c)).map_or(4, |c| c + 1);
    Allocator::new(rc, geo(), HostOffset(geo().cluster_size()), file_clusters)
}

/// Allocates `count` clusters in a copy of `state`, with the engine's lease test.
fn bench_allocate(bencher: Bencher, state: &Allocator, count: u64) {
    let leases = LeaseTable::new();
    bencher.with_inputs(|| state.clone()).bench_local_refs(|a| {
        a.allocate(count, |c| leases.is_leased(c))
            .expect("room to allocate")
    });
}

/// A fresh image: only the header, table and blocks are in use.
#[divan::bench(args = [1, 16])]
fn allocate_empty(bencher: Bencher, count: u64) {
    bench_allocate(bencher, &allocator(|_| false), count);
}

/// A fragmented image: of every 8 clusters 7 are in use, over the whole file. A single
/// cluster is found within 8; a run of 8 only past the end of the file.
#[divan::bench(args = [1, 8])]
fn allocate_fragmented(bencher: Bencher, count: u64) {
    bench_allocate(bencher, &allocator(|c| c % 8 != 5), count);
}

/// A nearly full image: every cluster but the last 16 of the 4 GiB in use, so the search
/// from the start looks at 65,520 refcounts first.
#[divan::bench(args = [1])]
fn allocate_nearly_full(bencher: Bencher, count: u64) {
    bench_allocate(bencher, &allocator(|c| c < 65_536 - 16), count);
}
