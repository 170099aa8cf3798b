//! Microbenchmarks of the format crate's share of the hot path: every read and write looks up
//! the L1 entry of its guest range, then reads and decodes the L2 entry of each guest cluster
//! out of a cached L2 table. Run with `just microbench` (benches/microbench.sh).

use divan::{black_box, Bencher};
use qcow2_format::{
    ClusterGeometry, CompressedDescriptor, HostOffset, L1Entry, L2Entry, L2Mapping,
};

fn main() {
    divan::main();
}

/// 64 KiB clusters (QEMU's default), standard or extended L2 entries.
fn geometry(extended: bool) -> ClusterGeometry {
    ClusterGeometry::new(16, extended).expect("valid geometry")
}

/// An L2 table whose every entry maps a host cluster, as after the image was written in full:
/// `normal` entries with COPIED (extended: every subcluster allocated), or `compressed`
/// entries of one sector each.
fn l2_table(geo: &ClusterGeometry, kind: &str) -> Vec<u8> {
    let n = geo.l2_entries();
    let mut table = vec![0u8; (n * geo.l2_entry_size()) as usize];
    for i in 0..n {
        let host = (1 << 30) + i * geo.cluster_size();
        let (mapping, bitmap) = match kind {
            "compressed" => (
                L2Mapping::Compressed(CompressedDescriptor::for_range(host, 512)),
                0,
            ),
            _ if geo.extended_l2() => (
                L2Mapping::Normal {
                    host: HostOffset(host),
                    copied: true,
                },
                u64::from(u32::MAX),
            ),
            _ => (
                L2Mapping::Normal {
                    host: HostOffset(host),
                    copied: true,
                },
                0,
            ),
        };
        L2Entry::encode(mapping, geo, bitmap).write(&mut table, geo, i as usize);
    }
    table
}

/// One guest cluster's L2 entry: read it from the table and decode it (reserved bits,
/// alignment, subcluster bitmap), stepping through the table in an odd stride so that
/// consecutive lookups hit different entries.
#[divan::bench(args = ["standard", "extended", "compressed"])]
fn l2_entry_read_decode(bencher: Bencher, kind: &str) {
    let geo = geometry(kind == "extended");
    let table = l2_table(&geo, kind);
    let mask = geo.l2_entries() as usize - 1;
    let mut i = 0usize;
    bencher.bench_local(|| {
        i = (i + 97) & mask;
        let entry = L2Entry::read(black_box(&table), &geo, i);
        let mapping = entry.decode(&geo, true).expect("valid entry");
        black_box((mapping, entry.subclusters()))
    });
}

/// The L1 entry of a guest range: where its L2 table is.
#[divan::bench]
fn l1_entry_l2_offset(bencher: Bencher) {
    let geo = geometry(false);
    let l1: Vec<L1Entry> = (0..1024u64)
        .map(|i| L1Entry::new(HostOffset((1 << 20) + i * geo.cluster_size()), true))
        .collect();
    let mut i = 0usize;
    bencher.bench_local(|| {
        i = (i + 97) & 1023;
        black_box(&l1)[i].l2_offset(&geo).expect("valid entry")
    });
}
