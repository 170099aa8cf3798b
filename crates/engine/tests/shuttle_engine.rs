//! The engine's own request paths under shuttle's schedulers: not a model of them (as
//! crates/alloc/tests/shuttle_model.rs is), but `Image` itself, over memory with a
//! scheduling point before and after every backend operation, so that shuttle may run any
//! other task between a request's planning and its I/O, and between its I/O and the rest.
//!
//! The scenarios are the races the project exists to kill: a write in place to host cluster
//! H while its guest cluster is discarded and written back and another guest cluster is
//! allocated (H must not be reallocated under the write), the same with a read, and two
//! writers of one unallocated cluster beside a freer (one allocation, I6). Every schedule
//! ends with the image read back (each guest cluster holds data some request wrote there)
//! and checked by the engine's own check (no corruption, no leak).
//!
//! Run by scripts/models.sh: `RUSTFLAGS="--cfg shuttle" cargo test -p qcow2-engine
//! --features shuttle,testing --test shuttle_engine`. Built with `--cfg qcow2_no_lease` for
//! qcow2-alloc as well, the lease is a no-op and these scenarios must fail.
#![cfg(shuttle)]

use blockio::{Backend, BufResult, IoBuf, Keep, MemoryBackend, MemoryOpener, OpenOptions, Opener};
use qcow2_engine::{create, CreateOptions, Image, ImageOptions};
use shuttle::future::{block_on, spawn, yield_now};
use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

const CS: u64 = 65536;
const G0: u64 = 0;
const G1: u64 = 16 * CS;
const PATH: &str = "/img.qcow2";

/// Memory, with a scheduling point around every operation.
#[derive(Clone, Debug)]
struct Yielding(MemoryBackend);

impl Backend for Yielding {
    async fn read_at(&self, buf: IoBuf, offset: u64) -> BufResult<usize> {
        yield_now().await;
        let r = self.0.read_at(buf, offset).await;
        yield_now().await;
        r
    }

    async fn write_at(&self, buf: IoBuf, offset: u64) -> BufResult<()> {
        yield_now().await;
        let r = self.0.write_at(buf, offset).await;
        yield_now().await;
        r
    }

    async fn flush(&self) -> io::Result<()> {
        yield_now().await;
        self.0.flush().await
    }

    fn flush_failures(&self) -> u64 {
        self.0.flush_failures()
    }

    async fn punch_hole(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        yield_now().await;
        let r = self.0.punch_hole(offset, len, Keep::none()).await;
        yield_now().await;
        drop(keep);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        yield_now().await;
        let r = self.0.write_zeroes(offset, len, Keep::none()).await;
        drop(keep);
        r
    }

    async fn len(&self) -> io::Result<u64> {
        self.0.len().await
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len).await
    }

    fn alignment(&self) -> usize {
        1
    }

    fn is_writable(&self) -> bool {
        self.0.is_writable()
    }
}

#[derive(Clone, Debug)]
struct YieldingOpener(MemoryOpener);

impl Opener for YieldingOpener {
    type Backend = Yielding;

    async fn open(&self, path: &Path, options: OpenOptions) -> io::Result<Yielding> {
        Ok(Yielding(self.0.open(path, options).await?))
    }
}

/// A 2 MiB image with G0 written (0xaa) and flushed, as bytes (made once).
fn base_image() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        futures_lite_block_on(async {
            let mem = MemoryOpener::new();
            mem.insert(PATH, MemoryBackend::new());
            create(&mem, PATH, &CreateOptions::new().size(2 << 20))
                .await
                .unwrap();
            let img = Image::open(mem.clone(), PATH, ImageOptions::new())
                .await
                .unwrap();
            img.write(G0, &vec![0xaa; CS as usize]).await.unwrap();
            img.close().await.unwrap();
            mem.get(PATH).unwrap().snapshot()
        })
    })
}

/// Polls a future that never waits (the memory backend outside shuttle) to its end.
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

type Img = Image<YieldingOpener>;

async fn open() -> Arc<Img> {
    let mem = MemoryOpener::new();
    mem.insert(PATH, MemoryBackend::from_vec(base_image().to_vec()));
    Arc::new(
        Image::open(YieldingOpener(mem), PATH, ImageOptions::new())
            .await
            .unwrap(),
    )
}

/// Every byte of `data` is one of `allowed`.
fn all_in(data: &[u8], allowed: &[u8]) -> bool {
    data.iter().all(|b| allowed.contains(b))
}

/// The end of every schedule: G1 holds what was written there (never another guest's
/// data), G0 one of its allowed values, the engine's check finds nothing, the image closes.
async fn finish(img: Arc<Img>, g0: &[u8], g1: &[u8]) {
    let got = img.read(G1, CS).await.unwrap();
    assert!(
        all_in(&got, g1),
        "lease violated: guest cluster G1 reads another guest's data ({:#04x})",
        got.iter().find(|b| !g1.contains(b)).unwrap()
    );
    let got = img.read(G0, CS).await.unwrap();
    assert!(all_in(&got, g0), "G0 reads {:#04x}", got[0]);
    img.flush().await.unwrap();
    let report = img.check().await.unwrap();
    assert!(report.is_clean(), "the engine's check: {report:?}");
    assert!(img.leases().is_empty(), "leases left behind");
    Arc::try_unwrap(img)
        .ok()
        .expect("one user")
        .close()
        .await
        .unwrap();
}

/// Runs `scenario` under shuttle's random scheduler and its PCT scheduler (depth 3), each
/// from a fixed seed (so that a run replays, and the no-lease build fails the same way every
/// time): `QCOW2_SHUTTLE_ITERATIONS` schedules each (default 2,000), `QCOW2_SHUTTLE_SEED`
/// the seed (default 1).
fn explore(name: &str, scenario: fn()) {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("QCOW2_SHUTTLE_ITERATIONS", 2000) as usize;
    let seed = env("QCOW2_SHUTTLE_SEED", 1);
    let start = std::time::Instant::now();
    // The engine's futures nest deep (a close writes everything back, settling a bitmap
    // store first): more stack than shuttle's default 60 KiB per task.
    let mut config = shuttle::Config::new();
    config.stack_size = 1 << 20;
    let random = shuttle::scheduler::RandomScheduler::new_from_seed(seed, n);
    shuttle::Runner::new(random, config.clone()).run(scenario);
    let pct = shuttle::scheduler::PctScheduler::new_from_seed(seed, 3, n);
    shuttle::Runner::new(pct, config).run(scenario);
    println!(
        "shuttle engine {name}: {n} random and {n} PCT schedules in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

/// The seed race on the real engine: a write in place to G0's host cluster, G0 discarded and
/// written back, G1 allocated and written.
#[test]
fn write_discard_reallocate() {
    explore("write_discard_reallocate", || {
        block_on(async {
            let img = open().await;
            let w = {
                let img = img.clone();
                spawn(async move { img.write(G0, &vec![0xbb; CS as usize]).await.unwrap() })
            };
            let d = {
                let img = img.clone();
                spawn(async move {
                    img.discard(G0, CS).await.unwrap();
                    img.flush().await.unwrap();
                })
            };
            let a = {
                let img = img.clone();
                spawn(async move {
                    img.write(G1, &vec![0xcc; CS as usize]).await.unwrap();
                    img.flush().await.unwrap();
                })
            };
            w.await.unwrap();
            d.await.unwrap();
            a.await.unwrap();
            finish(img, &[0, 0xbb], &[0xcc]).await;
        })
    });
}

/// The same with a read of G0 in flight: it returns G0's data, never G1's.
#[test]
fn read_discard_reallocate() {
    explore("read_discard_reallocate", || {
        block_on(async {
            let img = open().await;
            let r = {
                let img = img.clone();
                spawn(async move { img.read(G0, CS).await.unwrap() })
            };
            let d = {
                let img = img.clone();
                spawn(async move {
                    img.discard(G0, CS).await.unwrap();
                    img.flush().await.unwrap();
                })
            };
            let a = {
                let img = img.clone();
                spawn(async move {
                    img.write(G1, &vec![0xcc; CS as usize]).await.unwrap();
                    img.flush().await.unwrap();
                })
            };
            let got = r.await.unwrap();
            assert!(
                all_in(&got, &[0xaa, 0]),
                "lease violated: a read of G0 returned another guest's data"
            );
            d.await.unwrap();
            a.await.unwrap();
            finish(img, &[0], &[0xcc]).await;
        })
    });
}

/// I6 on the real engine: two writers of the unallocated G1 allocate it once, while G0 is
/// discarded and freed (its cluster may be handed to them only once free).
#[test]
fn two_writers_one_cluster() {
    explore("two_writers_one_cluster", || {
        block_on(async {
            let img = open().await;
            let writers: Vec<_> = [0xc1u8, 0xc2]
                .into_iter()
                .map(|v| {
                    let img = img.clone();
                    spawn(async move { img.write(G1, &vec![v; CS as usize]).await.unwrap() })
                })
                .collect();
            let d = {
                let img = img.clone();
                spawn(async move {
                    img.discard(G0, CS).await.unwrap();
                    img.flush().await.unwrap();
                })
            };
            for w in writers {
                w.await.unwrap();
            }
            d.await.unwrap();
            finish(img, &[0], &[0xc1, 0xc2]).await;
        })
    });
}
