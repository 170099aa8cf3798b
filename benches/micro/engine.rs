//! Microbenchmarks of the engine's mapping: the "L2 lookup" of the hot path is everything a
//! read does before its data I/O (`Image::bench_plan_read`): take the metadata lock, read the
//! L1 entry, find the L2 table in the table cache (or load it), decode each cluster's L2 entry
//! into pieces, take a shared lease per host cluster, and drop them. The image lives in
//! memory (`MemoryOpener`), so a cache miss costs a 64 KiB copy, not a disk read. Run with
//! `just microbench` (benches/microbench.sh).

use blockio::MemoryOpener;
use divan::{black_box, Bencher};
use qcow2_engine::{create, CreateOptions, Image, ImageOptions};
use std::future::Future;
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

fn main() {
    divan::main();
}

/// Polls a future that must not wait (everything is in memory and uncontended) to its end.
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the in-memory engine waited"),
    }
}

const PATH: &str = "bench.qcow2";
const CLUSTER: u64 = 64 << 10;
/// Guest bytes one L2 table maps (8192 entries of 64 KiB clusters).
const L2_SPAN: u64 = 512 << 20;
/// The first 16 MiB are written in full (one L2 table, 256 data clusters).
const DENSE: u64 = 16 << 20;
/// L2 tables with a mapped cluster: one more than the default cache holds (32 MiB of them).
const TABLES: u64 = 513;

/// A 1 TiB image (64 KiB clusters) written by the engine: the first 16 MiB in full, and the
/// first cluster of each of the first 513 L2 tables' ranges.
fn image() -> &'static MemoryOpener {
    static OPENER: OnceLock<MemoryOpener> = OnceLock::new();
    OPENER.get_or_init(|| {
        let opener = MemoryOpener::new();
        now(async {
            create(&opener, PATH, &CreateOptions::new().size(1 << 40))
                .await
                .expect("create");
            let img = Image::open(opener.clone(), PATH, ImageOptions::new())
                .await
                .expect("open read-write");
            let data = vec![0x5au8; 1 << 20];
            for off in (0..DENSE).step_by(data.len()) {
                img.write(off, &data).await.expect("write");
            }
            for t in 1..TABLES {
                img.write(t * L2_SPAN, &data[..4096]).await.expect("write");
            }
            img.close().await.expect("close");
        });
        opener
    })
}

/// The image opened read-only with an L2 cache of `tables` tables.
fn open(tables: u64) -> Image<MemoryOpener> {
    let options = ImageOptions::new()
        .read_only(true)
        .l2_cache_size(tables * CLUSTER);
    now(Image::open(image().clone(), PATH, options)).expect("open")
}

/// One cluster's mapping from a cached L2 table: a 4 KiB read's lookup, at offsets stepping
/// through the 256 written clusters (always an L2 cache hit).
#[divan::bench(args = [4096, 1 << 20])]
fn l2_lookup_hit(bencher: Bencher, len: u64) {
    let img = open(512);
    let mut off = 0u64;
    bencher.bench_local(|| {
        off = (off + 97 * CLUSTER) % (DENSE - len + 1) / 4096 * 4096;
        now(black_box(&img).bench_plan_read(off, len)).expect("mapped")
    });
}

/// A 4 KiB read's lookup that misses the L2 cache every time: the lookups cycle through one
/// more table than the cache holds (least recently used goes first), so each loads a 64 KiB
/// table and evicts one. The argument is the cache's size in tables (512: the default 32 MiB).
#[divan::bench(args = [1, 512])]
fn l2_lookup_miss(bencher: Bencher, cache_tables: u64) {
    let img = open(cache_tables);
    let mut t = 0u64;
    bencher.bench_local(|| {
        t = (t + 1) % (cache_tables + 1);
        now(black_box(&img).bench_plan_read(t * L2_SPAN, 4096)).expect("mapped")
    });
}

/// A whole 4 KiB read through the engine (lookup, lease, and the copy out of memory), for
/// scale: the lookup is the part above.
#[divan::bench]
fn read_4k_hit(bencher: Bencher) {
    let img = open(512);
    let mut off = 0u64;
    bencher.bench_local(|| {
        off = (off + 97 * CLUSTER + 4096) % DENSE / 4096 * 4096;
        now(black_box(&img).read(off, 4096)).expect("read")
    });
}
