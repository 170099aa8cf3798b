//! Cancellation as an embedder meets it (I9), on real files: eight tasks on disjoint stripes
//! of a 64 MiB image issue writes, discards, write-zeroes, reads and flushes; a third of the
//! requests run under a timeout of a few milliseconds, and the backend takes its time (each
//! operation starts after a random delay, in a task of its own, so an operation it accepted
//! completes after the request that issued it is gone, as the kernel's would). At the end the
//! image is closed, `qemu-img check` must find no corruption and no leak, and QEMU must read
//! every stripe as the model says.
//!
//! The model, per 4 KiB block (every request is aligned to it): a completed change makes the
//! block read its value; a dropped change may take effect at any time after it began, so its
//! value stays possible for ever. A block may read the value of the last completed change
//! covering it (or zero) or of any dropped change covering it.
//!
//! Run on the tokio file backend (a multi-thread runtime, delays up to 4 ms) and on io_uring
//! (its own thread's ring, no added delay: timeouts of a few hundred microseconds cut requests
//! while the kernel works on them).

use blockio::{
    Backend, BufResult, FileOpener, IoBuf, Keep, OpenOptions, Opener, TokioFile, UringOpener,
};
use qcow2_engine::{Image, ImageOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference, Prng};
use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TASKS: u64 = 8;
const REQUESTS: usize = 360;
const STRIPE: u64 = 8 << 20;
const BLOCK: u64 = 4096;
const CLUSTER: u64 = 65536;

/// The tokio file backend, each operation run after a random delay in a task of its own: an
/// accepted operation outlives its caller, with its buffer and keep.
#[derive(Clone, Debug)]
struct Slow {
    inner: TokioFile,
    seed: Arc<AtomicU64>,
}

impl Slow {
    fn delay(&self) -> Duration {
        let mut r = Prng::new(self.seed.fetch_add(1, Ordering::Relaxed));
        Duration::from_micros(r.below(4000))
    }

    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(TokioFile) -> std::pin::Pin<Box<dyn Future<Output = T> + Send>>,
    ) -> T {
        let d = self.delay();
        let fut = op(self.inner.clone());
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            fut.await
        })
        .await
        .expect("backend task")
    }
}

impl Backend for Slow {
    async fn read_at(&self, buf: IoBuf, offset: u64) -> BufResult<usize> {
        self.run(move |f| Box::pin(async move { f.read_at(buf, offset).await }))
            .await
    }

    async fn write_at(&self, buf: IoBuf, offset: u64) -> BufResult<()> {
        self.run(move |f| Box::pin(async move { f.write_at(buf, offset).await }))
            .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.run(|f| Box::pin(async move { f.flush().await })).await
    }

    fn flush_failures(&self) -> u64 {
        self.inner.flush_failures()
    }

    async fn punch_hole(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        self.run(move |f| Box::pin(async move { f.punch_hole(offset, len, keep).await }))
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        self.run(move |f| Box::pin(async move { f.write_zeroes(offset, len, keep).await }))
            .await
    }

    async fn preallocate(&self, len: u64, keep: Keep) -> io::Result<()> {
        self.run(move |f| Box::pin(async move { f.preallocate(len, keep).await }))
            .await
    }

    async fn len(&self) -> io::Result<u64> {
        self.inner.len().await
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.run(move |f| Box::pin(async move { f.set_len(len).await }))
            .await
    }

    fn alignment(&self) -> usize {
        self.inner.alignment()
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }
}

#[derive(Clone, Debug, Default)]
struct SlowOpener(Arc<AtomicU64>);

impl Opener for SlowOpener {
    type Backend = Slow;

    async fn open(&self, path: &Path, options: OpenOptions) -> io::Result<Slow> {
        Ok(Slow {
            inner: FileOpener.open(path, options).await?,
            seed: self.0.clone(),
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Flush,
}

/// A task's requests, in its stripe; `Some(timeout)` for those run under a timeout.
fn requests(task: u64, max_timeout_us: u64) -> Vec<(Op, Option<Duration>)> {
    let mut r = Prng::new(0x1ce_0000 + task);
    let base = task * STRIPE;
    (0..REQUESTS)
        .map(|i| {
            let len = BLOCK * r.range(1, 48);
            let off = base + r.below((STRIPE - len) / BLOCK + 1) * BLOCK;
            let pat = (task * 32 + i as u64 % 31 + 1) as u8;
            let op = match r.below(12) {
                0..=5 => Op::Write { off, len, pat },
                6 => Op::Zero {
                    off,
                    len,
                    unmap: r.chance(50),
                },
                7 => {
                    let c = (off / CLUSTER * CLUSTER).max(base);
                    Op::Discard {
                        off: c,
                        len: CLUSTER * r.range(1, 4),
                    }
                }
                8..=10 => Op::Read { off, len },
                _ => Op::Flush,
            };
            let timeout = r
                .chance(33)
                .then(|| Duration::from_micros(r.below(max_timeout_us)));
            (op, timeout)
        })
        .collect()
}

/// What each 4 KiB block of a stripe may read: the last completed value, and every value of a
/// dropped change.
struct Model {
    last: Vec<u8>,
    dropped: Vec<BTreeSet<u8>>,
}

impl Model {
    fn new() -> Model {
        let blocks = (STRIPE / BLOCK) as usize;
        Model {
            last: vec![0; blocks],
            dropped: vec![BTreeSet::new(); blocks],
        }
    }

    fn blocks(base: u64, off: u64, len: u64) -> std::ops::Range<usize> {
        ((off - base) / BLOCK) as usize..((off + len - base) / BLOCK) as usize
    }

    fn apply(&mut self, base: u64, off: u64, len: u64, val: u8, completed: bool) {
        for b in Self::blocks(base, off, len) {
            if completed {
                self.last[b] = val;
            } else {
                self.dropped[b].insert(val);
            }
        }
    }

    fn check(&self, base: u64, off: u64, data: &[u8], what: &str) {
        for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
            let b = ((off - base) / BLOCK) as usize + i;
            for &v in chunk {
                assert!(
                    v == self.last[b] || self.dropped[b].contains(&v),
                    "{what}: block {:#x} reads {v:#04x}; allowed {:#04x} or {:?}",
                    base + b as u64 * BLOCK,
                    self.last[b],
                    self.dropped[b]
                );
            }
        }
    }
}

/// What a discard of `[off, off+len)` changes: whole clusters only, within the stripe.
fn discarded(base: u64, off: u64, len: u64) -> Option<(u64, u64)> {
    let end = (off + len).min(base + STRIPE);
    (end > off).then_some((off, end - off))
}

/// Counts of a run.
#[derive(Default, Debug)]
struct Counts {
    completed: u64,
    dropped: u64,
}

async fn run_task<O: Opener>(
    img: &Image<O>,
    task: u64,
    reqs: Vec<(Op, Option<Duration>)>,
) -> (Model, Counts) {
    let base = task * STRIPE;
    let mut model = Model::new();
    let mut counts = Counts::default();
    for (op, timeout) in reqs {
        let fut = async {
            match op {
                Op::Write { off, len, pat } => img
                    .write(off, &vec![pat; len as usize])
                    .await
                    .map(|()| None),
                Op::Zero { off, len, unmap } => {
                    img.write_zeroes(off, len, unmap).await.map(|()| None)
                }
                Op::Discard { off, len } => {
                    let (off, len) = discarded(base, off, len).expect("inside the stripe");
                    img.discard(off, len).await.map(|()| None)
                }
                Op::Read { off, len } => img.read(off, len).await.map(|b| Some(b.to_vec())),
                Op::Flush => img.flush().await.map(|()| None),
            }
        };
        let outcome = match timeout {
            Some(t) => tokio::time::timeout(t, fut).await.ok(),
            None => Some(fut.await),
        };
        let completed = outcome.is_some();
        if completed {
            counts.completed += 1;
        } else {
            counts.dropped += 1;
        }
        match (op, outcome) {
            (Op::Read { off, .. }, Some(r)) => {
                let data = r.expect("read").expect("data");
                model.check(base, off, &data, &format!("task {task} read at {off:#x}"));
            }
            (_, Some(r)) => {
                r.expect("request");
            }
            _ => {}
        }
        match op {
            Op::Write { off, len, pat } => model.apply(base, off, len, pat, completed),
            Op::Zero { off, len, .. } => model.apply(base, off, len, 0, completed),
            Op::Discard { off, len } => {
                let (off, len) = discarded(base, off, len).expect("inside the stripe");
                model.apply(base, off, len, 0, completed)
            }
            Op::Read { .. } | Op::Flush => {}
        }
    }
    (model, counts)
}

fn new_image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("cancel.qcow2");
    let size = (TASKS * STRIPE).to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&p), &size]);
    p
}

/// Checks the closed image: clean for `qemu-img check`, and each stripe as its model says.
fn check_image(path: &Path, models: &[Model], counts: &Counts, what: &str) {
    let check = qemu_check(path);
    assert!(
        check.status.success(),
        "{what}: qemu-img check (a leak is exit 3): {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let raw = raw_reference(path, "qcow2");
    for (t, m) in models.iter().enumerate() {
        let base = t as u64 * STRIPE;
        m.check(
            base,
            base,
            &raw[base as usize..(base + STRIPE) as usize],
            &format!("{what}: final image, stripe {t}"),
        );
    }
    println!(
        "{what}: {} requests completed, {} dropped by their timeout; qemu-img check clean",
        counts.completed, counts.dropped
    );
    assert!(
        counts.dropped > 100,
        "too few requests were dropped to test anything"
    );
}

#[test]
fn timeouts_on_the_tokio_file_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (models, counts) = rt.block_on(async {
        let img = Arc::new(
            Image::open(SlowOpener::default(), &path, ImageOptions::new())
                .await
                .unwrap(),
        );
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let img = img.clone();
                tokio::spawn(async move { run_task(&img, t, requests(t, 8000)).await })
            })
            .collect();
        let mut models = Vec::new();
        let mut counts = Counts::default();
        for t in tasks {
            let (m, c) = t.await.unwrap();
            models.push(m);
            counts.completed += c.completed;
            counts.dropped += c.dropped;
        }
        let img = Arc::try_unwrap(img).ok().expect("no other user");
        img.close().await.unwrap();
        (models, counts)
    });
    check_image(&path, &models, &counts, "tokio file backend");
}

#[test]
fn timeouts_on_io_uring() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let (models, counts) = blockio::uring_builder().start(async {
        let img = std::rc::Rc::new(
            Image::open(UringOpener, &path, ImageOptions::new())
                .await
                .unwrap(),
        );
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let img = img.clone();
                tokio_uring::spawn(async move { run_task(&img, t, requests(t, 400)).await })
            })
            .collect();
        let mut models = Vec::new();
        let mut counts = Counts::default();
        for t in tasks {
            let (m, c) = t.await.unwrap();
            models.push(m);
            counts.completed += c.completed;
            counts.dropped += c.dropped;
        }
        let img = std::rc::Rc::try_unwrap(img).ok().expect("no other user");
        img.close().await.unwrap();
        (models, counts)
    });
    check_image(&path, &models, &counts, "io_uring");
}
