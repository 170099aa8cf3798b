//! Crash torture: random workloads through the fault-injecting backend, then the image as a
//! crash at many points could leave it (`blockio::CrashImage`: what was durable at the last
//! completed flush, any seeded subset of what was written since, sometimes one torn sector).
//! Every crash image must
//!
//! (a) show no corruption in `qemu-img check` (exit 0 or 3). A crash image with the dirty bit
//!     set (lazy refcounts) is repaired first with `qemu-img check -r all`, which must leave it
//!     clean (the repair a read-write open does, QEMU's or ours, which tests/check.rs covers);
//! (b) open read-only with our engine;
//! (c) hold every write acknowledged before the last completed flush. The model, per byte:
//!     the value after every request that returned before the last completed flush began,
//!     or the value of any later request covering the byte that had been issued by the crash
//!     (old or new data, nothing else: no garbage, no stale data from a reused cluster).
//!
//! Samples of the crash images are also read by QEMU (`qemu-img convert`, which must agree
//! with our engine) and opened read-write by our engine, written to and closed (the engine
//! must carry on from a crashed image: the result is checked again).
//!
//! A workload runs once per (configuration, run seed) against an in-memory copy of an image
//! made by `qemu-img create` (one configuration uses real files); the crash points are
//! positions in its request log: a crash after `at` requests completed, with the requests in
//! flight at that moment free to land or not. The image is dropped without `close`.
//!
//! Environment:
//! - `QCOW2_CRASH_SOAK=N`: N times more runs per configuration (`just soak`-style runs);
//! - `QCOW2_CRASH_BASE_SEED=S`: start the run seeds at S (default 0);
//! - `QCOW2_CRASH_CONFIG`, `QCOW2_CRASH_RUN`, `QCOW2_CRASH_POINT`, `QCOW2_CRASH_SEED` and
//!   `QCOW2_CRASH_TEAR`: the `repro` test checks that one crash image and says what it sees
//!   (a failure prints this command line); `QCOW2_CRASH_KEEP=DIR` keeps the failing images.

use blockio::{
    CrashImage, CrashSpec, FaultOpener, FileOpener, LogEntry, MemoryBackend, MemoryOpener, OpKind,
    Opener,
};
use qcow2_engine::{Image, ImageOptions};
use qcow2_format::Header;
use qcow2_tests::{path_str, qemu_img, qemu_img_status, Prng};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// One kind of image and workload.
#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    /// `qemu-img create -o` options.
    opts: &'static str,
    size: u64,
    cluster: u64,
    /// Workloads run on real files (`FaultOpener<FileOpener>`) instead of memory.
    files: bool,
    /// Open with O_DIRECT (real files only): metadata updates become read-modify-writes of
    /// whole blocks.
    direct: bool,
    /// Tasks running at once, each in its own slice of the disk (real files make them
    /// interleave at every request: tokio's file I/O runs on the blocking pool).
    tasks: u64,
    /// Runs in CI (times `QCOW2_CRASH_SOAK`).
    runs: u64,
    /// Operations per run (at most; a run stops after a random number of them).
    ops: usize,
    /// Crash points per run.
    points: usize,
    /// Longest operation, in bytes.
    max_len: u64,
    /// Instead of a new image, this fixture of the QEMU-interop library (`size` and
    /// `cluster` then come from it): images with snapshots, compressed clusters, zero
    /// clusters, preallocation, which the engine must rewrite crash-safely too.
    fixture: Option<&'static str>,
}

const CONFIGS: &[Config] = &[
    Config {
        name: "64k",
        opts: "",
        size: 4 << 20,
        cluster: 65536,
        files: false,
        direct: false,
        tasks: 1,
        runs: 4,
        ops: 60,
        points: 60,
        max_len: 256 << 10,
        fixture: None,
    },
    Config {
        name: "4k-r1",
        opts: "cluster_size=4k,refcount_bits=1",
        size: 2 << 20,
        cluster: 4096,
        files: false,
        direct: false,
        tasks: 1,
        runs: 4,
        ops: 60,
        points: 60,
        max_len: 64 << 10,
        fixture: None,
    },
    Config {
        name: "4k-r8",
        opts: "cluster_size=4k,refcount_bits=8",
        size: 4 << 20,
        cluster: 4096,
        files: false,
        direct: false,
        tasks: 1,
        runs: 4,
        ops: 60,
        points: 60,
        max_len: 64 << 10,
        fixture: None,
    },
    Config {
        // Refcount blocks of 256 entries and a table that outgrows its first cluster.
        name: "512-r16",
        opts: "cluster_size=512",
        size: 2 << 20,
        cluster: 512,
        files: false,
        direct: false,
        tasks: 1,
        runs: 4,
        ops: 60,
        points: 60,
        max_len: 64 << 10,
        fixture: None,
    },
    Config {
        // 64 refcounts per block, 64 blocks per table cluster: the refcount table grows
        // (and moves) once 2 MiB of the file are in use.
        name: "512-r64",
        opts: "cluster_size=512,refcount_bits=64",
        size: 4 << 20,
        cluster: 512,
        files: false,
        direct: false,
        tasks: 1,
        runs: 4,
        ops: 100,
        points: 50,
        max_len: 256 << 10,
        fixture: None,
    },
    Config {
        name: "v2-64k",
        opts: "compat=0.10",
        size: 4 << 20,
        cluster: 65536,
        files: false,
        direct: false,
        tasks: 1,
        runs: 3,
        ops: 60,
        points: 40,
        max_len: 256 << 10,
        fixture: None,
    },
    Config {
        name: "extl2-32k",
        opts: "extended_l2=on,cluster_size=32k",
        size: 4 << 20,
        cluster: 32768,
        files: false,
        direct: false,
        tasks: 1,
        runs: 3,
        ops: 60,
        points: 40,
        max_len: 128 << 10,
        fixture: None,
    },
    Config {
        name: "lazy-64k",
        opts: "lazy_refcounts=on",
        size: 4 << 20,
        cluster: 65536,
        files: false,
        direct: false,
        tasks: 1,
        runs: 3,
        ops: 60,
        points: 40,
        max_len: 256 << 10,
        fixture: None,
    },
    Config {
        name: "lazy-512-r64",
        opts: "lazy_refcounts=on,cluster_size=512,refcount_bits=64",
        size: 4 << 20,
        cluster: 512,
        files: false,
        direct: false,
        tasks: 1,
        runs: 3,
        ops: 100,
        points: 40,
        max_len: 256 << 10,
        fixture: None,
    },
    Config {
        name: "2m",
        opts: "cluster_size=2M",
        size: 8 << 20,
        cluster: 2 << 20,
        files: false,
        direct: false,
        tasks: 1,
        runs: 2,
        ops: 24,
        points: 30,
        max_len: 3 << 20,
        fixture: None,
    },
    Config {
        name: "files-4k",
        opts: "cluster_size=4k",
        size: 4 << 20,
        cluster: 4096,
        files: true,
        direct: false,
        tasks: 4,
        runs: 2,
        ops: 40,
        points: 60,
        max_len: 64 << 10,
        fixture: None,
    },
    Config {
        name: "files-direct-64k",
        opts: "",
        size: 4 << 20,
        cluster: 65536,
        files: true,
        direct: true,
        tasks: 2,
        runs: 2,
        ops: 30,
        points: 40,
        max_len: 256 << 10,
        fixture: None,
    },
    Config {
        // Two internal snapshots: writes copy clusters and L2 tables shared with them.
        name: "fixture-snapshot",
        opts: "",
        size: 0,
        cluster: 0,
        files: false,
        direct: false,
        tasks: 1,
        runs: 2,
        ops: 40,
        points: 20,
        max_len: 256 << 10,
        fixture: Some("snapshot"),
    },
    Config {
        // Overwrites, zeroes and discards of compressed clusters (several per host cluster).
        name: "fixture-compressed",
        opts: "",
        size: 0,
        cluster: 0,
        files: false,
        direct: false,
        tasks: 1,
        runs: 2,
        ops: 40,
        points: 30,
        max_len: 256 << 10,
        fixture: Some("compressed-zlib-rewritten"),
    },
    Config {
        // Zero clusters, preallocated ones too.
        name: "fixture-zero-clusters",
        opts: "",
        size: 0,
        cluster: 0,
        files: false,
        direct: false,
        tasks: 1,
        runs: 2,
        ops: 40,
        points: 30,
        max_len: 256 << 10,
        fixture: Some("zero-clusters"),
    },
    Config {
        name: "fixture-prealloc-metadata",
        opts: "",
        size: 0,
        cluster: 0,
        files: false,
        direct: false,
        tasks: 1,
        runs: 2,
        ops: 40,
        points: 30,
        max_len: 256 << 10,
        fixture: Some("prealloc-metadata"),
    },
];

fn config(name: &str) -> Config {
    *CONFIGS
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no crash configuration {name:?}"))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Zero { unmap: bool },
    Discard,
    Flush,
}

/// A guest request, with where it stands among the others. `start_io`/`end_io`: how many
/// backend requests had completed when it was issued / when it returned (positions in the
/// log, which is what crash points are); `start_clk`/`end_clk`: a logical clock ticking at
/// every guest request's start and end, which orders requests of different tasks exactly.
#[derive(Clone, Copy, Debug)]
struct Op {
    /// Unique in the run (the data pattern depends on it).
    id: usize,
    kind: Kind,
    off: u64,
    len: u64,
    start_io: u64,
    end_io: u64,
    start_clk: u64,
    end_clk: u64,
}

/// The byte op `id` writes at guest offset `off`: depends on both, so misplaced data shows.
fn pattern(id: usize, off: u64) -> u8 {
    let x = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ off.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    ((x >> 56) as u8).max(1)
}

/// The ops of a run, task by task (each task owns a cluster-aligned slice of the disk).
fn random_ops(cfg: &Config, seed: u64) -> Vec<Vec<Op>> {
    let mut r = Prng::new(seed ^ 0xC4A5_4000);
    let cs = cfg.cluster;
    let span = cfg.size / cfg.tasks / cs * cs;
    assert!(span > 0, "{}: too many tasks for the disk", cfg.name);
    let mut id = 0;
    (0..cfg.tasks)
        .map(|task| {
            let n = r.range(cfg.ops as u64 / 2, cfg.ops as u64) as usize;
            let (lo, hi) = if task + 1 == cfg.tasks {
                (task * span, cfg.size)
            } else {
                (task * span, (task + 1) * span)
            };
            (0..n)
                .map(|_| {
                    let len = if r.chance(35) {
                        1 + r.below(cfg.max_len.min(3 * cs))
                    } else {
                        let max_clusters = (cfg.max_len / cs).max(1);
                        cs * r.range(1, max_clusters)
                    }
                    .min(hi - lo);
                    let mut off = lo + r.below(hi - lo - len + 1);
                    if r.chance(60) {
                        off = (off / cs * cs).max(lo);
                    }
                    let kind = match r.below(20) {
                        0..=11 => Kind::Write,
                        12..=13 => Kind::Zero {
                            unmap: r.chance(50),
                        },
                        14..=15 => Kind::Discard,
                        _ => Kind::Flush,
                    };
                    id += 1;
                    Op {
                        id,
                        kind,
                        off,
                        len,
                        start_io: 0,
                        end_io: 0,
                        start_clk: 0,
                        end_clk: 0,
                    }
                })
                .collect()
        })
        .collect()
}

/// The guest bytes `op` changes (a discard only changes whole clusters, and the partial one
/// at the end of the disk).
fn changed(op: &Op, cfg: &Config) -> std::ops::Range<u64> {
    match op.kind {
        Kind::Flush => 0..0,
        Kind::Discard => {
            let cs = cfg.cluster;
            let end = op.off + op.len;
            let first = op.off.div_ceil(cs) * cs;
            let last = if end == cfg.size { end } else { end / cs * cs };
            first..last.max(first)
        }
        _ => op.off..op.off + op.len,
    }
}

/// What `op` leaves at guest byte `b`, if it changes it.
fn value(op: &Op, cfg: &Config, b: u64) -> Option<u8> {
    if !changed(op, cfg).contains(&b) {
        return None;
    }
    Some(match op.kind {
        Kind::Write => pattern(op.id, b),
        _ => 0,
    })
}

fn apply(model: &mut [u8], op: &Op, cfg: &Config) {
    let r = changed(op, cfg);
    let r = r.start as usize..r.end as usize;
    match op.kind {
        Kind::Write => {
            for b in r {
                model[b] = pattern(op.id, b as u64);
            }
        }
        Kind::Flush => {}
        _ => model[r].fill(0),
    }
}

/// One workload, run and logged.
struct Run {
    cfg: Config,
    seed: u64,
    /// The image file before the workload.
    base: Vec<u8>,
    /// The guest disk before the workload.
    initial: Vec<u8>,
    log: Vec<LogEntry>,
    /// The ops of each task, in the order the task ran them.
    ops: Vec<Vec<Op>>,
}

const IMAGE: &str = "/crash/img.qcow2";

fn create_image(cfg: &Config, dir: &Path) -> PathBuf {
    let path = dir.join("img.qcow2");
    let size = cfg.size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !cfg.opts.is_empty() {
        args.extend(["-o", cfg.opts]);
    }
    args.extend([path_str(&path), &size]);
    qemu_img(&args);
    path
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn run_task<O: Opener>(
    img: &Image<O>,
    ctl: &blockio::FaultController,
    clock: &AtomicU64,
    ops: &mut [Op],
) {
    for op in ops {
        op.start_io = ctl.completed();
        op.start_clk = clock.fetch_add(1, Ordering::SeqCst);
        let res = match op.kind {
            Kind::Write => {
                let data: Vec<u8> = (op.off..op.off + op.len)
                    .map(|b| pattern(op.id, b))
                    .collect();
                img.write(op.off, &data).await
            }
            Kind::Zero { unmap } => img.write_zeroes(op.off, op.len, unmap).await,
            Kind::Discard => img.discard(op.off, op.len).await,
            Kind::Flush => img.flush().await,
        };
        res.unwrap_or_else(|e| panic!("{op:?}: {e}"));
        op.end_clk = clock.fetch_add(1, Ordering::SeqCst);
        op.end_io = ctl.completed();
    }
}

async fn drive<O: Opener>(
    opener: FaultOpener<O>,
    path: &Path,
    ops: &mut [Vec<Op>],
    direct: bool,
) -> Vec<LogEntry> {
    let ctl = opener.controller();
    let img = Image::open(opener, path, ImageOptions::new().direct(direct))
        .await
        .unwrap_or_else(|e| panic!("open: {e}"));
    let clock = AtomicU64::new(0);
    futures::future::join_all(
        ops.iter_mut()
            .map(|task_ops| run_task(&img, &ctl, &clock, task_ops)),
    )
    .await;
    // The crash: no close, no flush; nothing more reaches the file.
    let before = ctl.completed();
    drop(img);
    assert_eq!(ctl.completed(), before, "dropping the image issued I/O");
    ctl.log()
}

fn run_workload(cfg: &Config, seed: u64) -> Run {
    let mut cfg = *cfg;
    let (_dir, path, initial) = match cfg.fixture {
        Some(name) => {
            let fx = qcow2_tests::fixture(name).build();
            assert!(
                fx.expect.backing_depth == 0 && !fx.expect.data_file,
                "{name}: crash images are built for the image file alone"
            );
            cfg.size = fx.virtual_size;
            cfg.cluster = fx.expect.cluster_size;
            let initial = fx.raw_reference();
            (fx.dir, fx.image, initial)
        }
        None => {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = create_image(&cfg, dir.path());
            (dir, path, vec![0; cfg.size as usize])
        }
    };
    let base = std::fs::read(&path).expect("read the image");
    let mut ops = random_ops(&cfg, seed);
    let rt = runtime();
    let log = if cfg.files {
        let opener = FaultOpener::new(FileOpener);
        rt.block_on(drive(opener, &path, &mut ops, cfg.direct))
    } else {
        let mem = MemoryOpener::new();
        mem.insert(IMAGE, MemoryBackend::from_vec(base.clone()));
        rt.block_on(drive(
            FaultOpener::new(mem),
            Path::new(IMAGE),
            &mut ops,
            false,
        ))
    };
    Run {
        cfg,
        seed,
        base,
        initial,
        log,
        ops,
    }
}

/// The crash points of a run: the end; 40 % anywhere in the log; 40 % just around flushes
/// (where the write-back moves from one ordered step to the next); 20 % around header
/// writes (refcount table moves, the dirty bit).
fn crash_points(run: &Run) -> Vec<u64> {
    let total = run.log.len() as u64;
    let seqs = |f: &dyn Fn(&LogEntry) -> bool| -> Vec<u64> {
        run.log.iter().filter(|e| f(e)).map(|e| e.seq).collect()
    };
    let flushes = seqs(&|e| e.info.op == OpKind::Flush);
    let headers = seqs(&|e| e.info.op == OpKind::Write && e.info.offset == 0);
    let mut r = Prng::new(run.seed ^ 0x0070_0175);
    let mut pts = vec![total];
    for k in 0..run.cfg.points {
        let near = match k % 5 {
            1 | 3 if !flushes.is_empty() => Some(&flushes),
            4 if !headers.is_empty() => Some(&headers),
            _ => None,
        };
        let p = match near {
            Some(v) => (r.pick(v) + r.below(4)).min(total),
            None => r.below(total + 1),
        };
        pts.push(p);
    }
    pts.sort_unstable();
    pts.dedup();
    pts
}

/// What a crash image must hold at crash point `at`.
///
/// A flush completed before the crash when every backend request it made had (its `end_io`
/// is at most `at`); it guarantees every request that returned before it began
/// (`end_clk < flush.start_clk`). Those are a prefix of each task's list: `required` is the
/// disk after them. The task's later requests issued by the crash (`start_io <= at`) may or
/// may not have reached the disk, in part or whole.
struct Model {
    required: Vec<u8>,
    /// How many ops of each task `required` holds.
    applied: Vec<usize>,
}

impl Model {
    fn new(run: &Run) -> Self {
        Model {
            required: run.initial.clone(),
            applied: vec![0; run.cfg.tasks as usize],
        }
    }

    /// Moves the model to crash point `at` (never backwards); returns the ops whose data may
    /// or may not be there.
    fn at<'a>(&mut self, run: &'a Run, at: u64) -> Vec<&'a Op> {
        let since = run
            .ops
            .iter()
            .flatten()
            .filter(|o| o.kind == Kind::Flush && o.end_io <= at)
            .map(|o| o.start_clk)
            .max();
        let mut maybe = Vec::new();
        for (t, ops) in run.ops.iter().enumerate() {
            let guaranteed = since.map_or(0, |s| ops.iter().take_while(|o| o.end_clk < s).count());
            assert!(guaranteed >= self.applied[t], "crash points go forwards");
            for op in &ops[self.applied[t]..guaranteed] {
                apply(&mut self.required, op, &run.cfg);
            }
            self.applied[t] = guaranteed;
            maybe.extend(
                ops[guaranteed..]
                    .iter()
                    .filter(|o| o.start_io <= at && o.kind != Kind::Flush),
            );
        }
        maybe
    }
}

/// The first byte of `got` the model does not allow.
fn model_mismatch(got: &[u8], model: &Model, maybe: &[&Op], cfg: &Config) -> Option<String> {
    // Sweep the guest bytes with the set of later requests covering each.
    let mut later: Vec<(std::ops::Range<u64>, &Op)> = maybe
        .iter()
        .map(|&op| (changed(op, cfg), op))
        .filter(|(r, _)| !r.is_empty())
        .collect();
    later.sort_by_key(|(r, _)| r.start);
    let mut next = 0;
    let mut active: Vec<(std::ops::Range<u64>, &Op)> = Vec::new();
    const CHUNK: usize = 4096;
    let chunks = got.chunks(CHUNK).zip(model.required.chunks(CHUNK));
    let bytes = chunks
        .enumerate()
        // Equal chunks (the common case) are skipped with one comparison.
        .filter(|(_, (g, w))| g != w)
        .flat_map(|(k, (g, w))| {
            g.iter()
                .zip(w)
                .enumerate()
                .map(move |(j, (&g, &w))| (k * CHUNK + j, g, w))
        });
    for (b, g, want) in bytes {
        if g == want {
            continue;
        }
        let b = b as u64;
        while next < later.len() && later[next].0.start <= b {
            active.push(later[next].clone());
            next += 1;
        }
        active.retain(|(r, _)| r.end > b);
        if active.iter().any(|(_, op)| value(op, cfg, b) == Some(g)) {
            continue;
        }
        let covering: Vec<String> = active
            .iter()
            .filter_map(|(_, op)| {
                value(op, cfg, b).map(|v| format!("op {} {:?}={v:#x}", op.id, op.kind))
            })
            .collect();
        return Some(format!(
            "guest byte {b:#x} is {g:#x}; flushed value {want:#x}, later writes {covering:?}"
        ));
    }
    None
}

#[derive(Default, Debug)]
struct Stats {
    runs: u64,
    ops: u64,
    requests: u64,
    points: u64,
    images: u64,
    distinct: u64,
    torn: u64,
    dirty_repaired: u64,
    qemu_reads: u64,
    recoveries: u64,
    /// Runs whose refcount table moved (grew).
    table_moves: u64,
}

/// Checks one crash image; `Err` says what is wrong.
struct Checker {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    seen: HashSet<(u64, u64)>,
    keep: Option<PathBuf>,
    stats: Stats,
    verbose: bool,
}

/// A fast 128-bit fingerprint of a crash image (to check each distinct image once).
fn digest(bytes: &[u8]) -> (u64, u64) {
    let (mut a, mut b) = (0x243F_6A88_85A3_08D3u64, bytes.len() as u64);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        a = (a ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        b = b.wrapping_add(x).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    }
    for &x in words.remainder() {
        a = (a ^ u64::from(x)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    (a, b)
}

async fn engine_read(bytes: Vec<u8>, size: u64) -> Result<Vec<u8>, String> {
    let mem = MemoryOpener::new();
    mem.insert(IMAGE, MemoryBackend::from_vec(bytes));
    let img = Image::open(mem, IMAGE, ImageOptions::new().read_only(true))
        .await
        .map_err(|e| format!("our engine cannot open it read-only: {e}"))?;
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(1 << 20);
        let buf = img
            .read(pos, n as usize)
            .await
            .map_err(|e| format!("our engine cannot read {pos:#x}+{n:#x}: {e}"))?;
        out.extend_from_slice(&buf);
        pos += n;
    }
    Ok(out)
}

/// Opens the crash image read-write, writes, closes: the image must stay consistent and
/// show the old contents with the new writes on top.
async fn recover(bytes: Vec<u8>, cfg: &Config, seed: u64, old: &[u8]) -> Result<Vec<u8>, String> {
    let mem = MemoryOpener::new();
    let file = MemoryBackend::from_vec(bytes);
    mem.insert(IMAGE, file.clone());
    let img = Image::open(mem, IMAGE, ImageOptions::new())
        .await
        .map_err(|e| format!("recovery: our engine cannot open it read-write: {e}"))?;
    let mut want = old.to_vec();
    let mut r = Prng::new(seed ^ 0x5eed);
    for k in 0..6 {
        let len = 1 + r.below(cfg.max_len.min(4 * cfg.cluster));
        let off = r.below(cfg.size - len + 1);
        let op = Op {
            id: 1_000_000 + k,
            kind: if k == 3 { Kind::Discard } else { Kind::Write },
            off,
            len,
            start_io: 0,
            end_io: 0,
            start_clk: 0,
            end_clk: 0,
        };
        let res = match op.kind {
            Kind::Write => {
                let data: Vec<u8> = (off..off + len).map(|b| pattern(op.id, b)).collect();
                img.write(off, &data).await
            }
            _ => img.discard(off, len).await,
        };
        res.map_err(|e| format!("recovery: {op:?}: {e}"))?;
        apply(&mut want, &op, cfg);
    }
    img.close()
        .await
        .map_err(|e| format!("recovery: close: {e}"))?;
    let got = engine_read(file.snapshot(), cfg.size).await?;
    if got != want {
        let b = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "recovery: after writing to the crashed image, byte {b:#x} is {:#x}, want {:#x}",
            got[b], want[b]
        ));
    }
    Ok(file.snapshot())
}

fn check_output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Checker {
    fn new() -> Self {
        let tmp = Path::new("/dev/shm");
        let dir = if tmp.is_dir() {
            tempfile::tempdir_in(tmp)
        } else {
            tempfile::tempdir()
        }
        .expect("tempdir");
        Checker {
            rt: runtime(),
            dir,
            seen: HashSet::new(),
            keep: std::env::var_os("QCOW2_CRASH_KEEP").map(PathBuf::from),
            stats: Stats::default(),
            verbose: false,
        }
    }

    /// `qemu-img check` (repairing a dirty image first): `Err` on corruption.
    fn qemu_check(&mut self, path: &Path, dirty: bool) -> Result<(), String> {
        if dirty {
            let out = qemu_img_status(&["check", "-r", "all", path_str(path)]);
            if out.status.code() != Some(0) {
                return Err(format!(
                    "dirty image: `qemu-img check -r all` exit {:?}: {}",
                    out.status.code(),
                    check_output(&out)
                ));
            }
            self.stats.dirty_repaired += 1;
        }
        let out = qemu_img_status(&["check", path_str(path)]);
        match out.status.code() {
            Some(0) | Some(3) => {
                if self.verbose {
                    eprintln!("qemu-img check: {}", check_output(&out));
                }
                Ok(())
            }
            code => Err(format!(
                "`qemu-img check`{} exit {code:?}: {}",
                if dirty { " after -r all" } else { "" },
                check_output(&out)
            )),
        }
    }

    fn check_image(
        &mut self,
        run: &Run,
        crash: &CrashImage,
        model: &Model,
        maybe: &[&Op],
        sample: u64,
    ) -> Result<(), String> {
        let cfg = &run.cfg;
        self.stats.images += 1;
        if crash.torn.is_some() {
            self.stats.torn += 1;
        }
        if !self.seen.insert(digest(&crash.bytes)) {
            return Ok(()); // the same bytes were checked already
        }
        self.stats.distinct += 1;
        let header = Header::parse(&crash.bytes[..crash.bytes.len().min(1 << 16)])
            .map_err(|e| format!("the header does not parse: {e}"))?;
        let dirty = header.is_dirty();
        // (b) and (c): our engine opens it read-only and reads what the model allows.
        let got = self
            .rt
            .block_on(engine_read(crash.bytes.clone(), cfg.size))?;
        if let Some(m) = model_mismatch(&got, model, maybe, cfg) {
            return Err(format!("(c) data: {m}"));
        }
        // (a) QEMU finds no corruption (after repairing a dirty image).
        let path = self.dir.path().join("crash.qcow2");
        std::fs::write(&path, &crash.bytes).expect("write the crash image");
        self.qemu_check(&path, dirty)?;
        let repaired = if dirty {
            let bytes = std::fs::read(&path).expect("read the repaired image");
            let after = self.rt.block_on(engine_read(bytes.clone(), cfg.size))?;
            if after != got {
                let b = after
                    .iter()
                    .zip(&got)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "the repair changed guest byte {b:#x} from {:#x} to {:#x}",
                    got[b], after[b]
                ));
            }
            bytes
        } else {
            crash.bytes.clone()
        };
        if sample % 16 == 0 {
            // QEMU reads what our engine reads.
            self.stats.qemu_reads += 1;
            let raw = self.dir.path().join("crash.raw");
            qemu_img(&[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                path_str(&path),
                path_str(&raw),
            ]);
            let theirs = std::fs::read(&raw).expect("read the raw image");
            if theirs != got {
                let b = theirs
                    .iter()
                    .zip(&got)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "QEMU reads guest byte {b:#x} as {:#x}, our engine as {:#x}",
                    theirs.get(b).copied().unwrap_or(0),
                    got[b]
                ));
            }
        }
        if sample % 8 == 3 {
            // Our engine carries on from the crashed (repaired) image.
            self.stats.recoveries += 1;
            let after = self.rt.block_on(recover(repaired, cfg, sample, &got))?;
            std::fs::write(&path, &after).expect("write the recovered image");
            self.qemu_check(&path, false)
                .map_err(|e| format!("after recovery writes: {e}"))?;
        }
        Ok(())
    }

    /// Checks the crash points of one run; failures are appended as reproduction lines.
    fn check_run(&mut self, run: &Run, only: Option<(u64, u64, bool)>, failures: &mut Vec<String>) {
        self.stats.runs += 1;
        self.stats.ops += run.ops.iter().map(Vec::len).sum::<usize>() as u64;
        self.stats.requests += run.log.len() as u64;
        let end = CrashImage::from_log(
            &run.log,
            &run.base,
            &CrashSpec::new(0).survival_percent(100),
        );
        let table = |b: &[u8]| {
            Header::parse(&b[..b.len().min(1 << 16)])
                .map(|h| h.refcount_table_offset)
                .ok()
        };
        if table(&end.bytes) != table(&run.base) {
            self.stats.table_moves += 1;
        }
        let points = match only {
            Some((at, _, _)) => vec![at],
            None => crash_points(run),
        };
        let mut model = Model::new(run);
        for at in points {
            self.stats.points += 1;
            let maybe = model.at(run, at);
            let specs: Vec<(u64, bool)> = match only {
                Some((_, seed, tear)) => vec![(seed, tear)],
                None => {
                    let s = run.seed.wrapping_mul(1_000_003) ^ at.wrapping_mul(7919);
                    vec![(s, false), (s + 1, true)]
                }
            };
            for (seed, tear) in specs {
                let spec = CrashSpec::new(seed).at(at).tear(tear);
                let crash = CrashImage::from_log(&run.log, &run.base, &spec);
                if self.verbose {
                    eprintln!("{crash:?}");
                }
                let sample = self.stats.images;
                if let Err(e) = self.check_image(run, &crash, &model, &maybe, sample) {
                    let repro = format!(
                        "QCOW2_CRASH_CONFIG={} QCOW2_CRASH_RUN={} QCOW2_CRASH_POINT={at} \
                         QCOW2_CRASH_SEED={seed} QCOW2_CRASH_TEAR={} cargo test -p qcow2-tests \
                         --test crash -- repro --nocapture",
                        run.cfg.name,
                        run.seed,
                        u8::from(tear)
                    );
                    if let Some(dir) = &self.keep {
                        let name = format!(
                            "{}-run{}-at{at}-seed{seed}-tear{}.qcow2",
                            run.cfg.name,
                            run.seed,
                            u8::from(tear)
                        );
                        std::fs::create_dir_all(dir).expect("QCOW2_CRASH_KEEP dir");
                        std::fs::write(dir.join(name), &crash.bytes).expect("keep the image");
                    }
                    failures.push(format!(
                        "{} run {} crash point {at}/{} (durable {}, {} survived, {} lost, torn {:?}): {e}\n  reproduce: {repro}",
                        run.cfg.name,
                        run.seed,
                        run.log.len(),
                        crash.durable,
                        crash.survived.len(),
                        crash.lost.len(),
                        crash.torn,
                    ));
                }
            }
        }
    }
}

fn torture(name: &str) {
    let cfg = config(name);
    let soak = env_u64("QCOW2_CRASH_SOAK").unwrap_or(1).max(1);
    let base_seed = env_u64("QCOW2_CRASH_BASE_SEED").unwrap_or(0);
    let t0 = Instant::now();
    let mut checker = Checker::new();
    let mut failures = Vec::new();
    for k in 0..cfg.runs * soak {
        let run = run_workload(&cfg, base_seed + k);
        checker.check_run(&run, None, &mut failures);
        if failures.len() >= 20 {
            break;
        }
    }
    let s = &checker.stats;
    eprintln!(
        "crash {name}: {} runs ({} moved the refcount table), {} guest ops, {} backend requests, \
         {} crash points, {} crash images ({} torn; {} distinct, each checked by qemu-img; {} \
         dirty ones repaired), {} read by QEMU too, {} recovered read-write, {:.1?}",
        s.runs,
        s.table_moves,
        s.ops,
        s.requests,
        s.points,
        s.images,
        s.torn,
        s.distinct,
        s.dirty_repaired,
        s.qemu_reads,
        s.recoveries,
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} failing crash images:\n{}",
        failures.len(),
        failures.join("\n")
    );
    if name == "512-r64" {
        assert!(s.table_moves > 0, "{name}: no run grew the refcount table");
    }
}

/// The checks have teeth: the same workloads with the log doctored as a broken engine would
/// have written it must fail. Without its flushes (an engine whose flush did not reach the
/// disk) acknowledged data goes missing; without its refcount block writes (an engine that
/// wrote L2 tables before refcounts, and crashed) `qemu-img check` finds corruption.
#[test]
fn broken_engines_are_caught() {
    let mut cfg = config("64k");
    cfg.points = 30;
    let mut lost_data = 0;
    let mut corrupt = 0;
    for seed in 0..2 {
        let mut run = run_workload(&cfg, seed);
        let full = run.log.clone();
        run.log.retain(|e| e.info.op != OpKind::Flush);
        let mut failures = Vec::new();
        Checker::new().check_run(&run, None, &mut failures);
        lost_data += failures.iter().filter(|f| f.contains("(c) data")).count();

        // The refcount block(s) of the new image: every write to them vanishes.
        let h = Header::parse(&run.base[..65536]).unwrap();
        let t = h.refcount_table_offset as usize;
        let cs = cfg.cluster;
        let blocks: Vec<u64> = run.base[t..t + cs as usize]
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .filter(|&o| o != 0)
            .collect();
        run.log = full;
        run.log.retain(|e| {
            !(e.info.op == OpKind::Write
                && blocks
                    .iter()
                    .any(|&b| e.info.offset < b + cs && b < e.info.offset + e.info.len))
        });
        let mut failures = Vec::new();
        Checker::new().check_run(&run, None, &mut failures);
        corrupt += failures
            .iter()
            .filter(|f| f.contains("`qemu-img check` exit Some(2)"))
            .count();
    }
    eprintln!("doctored logs: {lost_data} images lost flushed data, {corrupt} were corrupt");
    assert!(lost_data > 0, "dropping every flush went unnoticed");
    assert!(
        corrupt > 0,
        "dropping the refcount block writes went unnoticed"
    );
}

/// Reproduces one crash image from the environment (see the module documentation); without
/// `QCOW2_CRASH_CONFIG` it does nothing.
#[test]
fn repro() {
    let Ok(name) = std::env::var("QCOW2_CRASH_CONFIG") else {
        return;
    };
    let cfg = config(&name);
    let seed = env_u64("QCOW2_CRASH_RUN").expect("QCOW2_CRASH_RUN");
    let run = run_workload(&cfg, seed);
    let at = env_u64("QCOW2_CRASH_POINT").unwrap_or(run.log.len() as u64);
    let image_seed = env_u64("QCOW2_CRASH_SEED").unwrap_or(0);
    let tear = env_u64("QCOW2_CRASH_TEAR").unwrap_or(0) != 0;
    eprintln!("{} requests; ops:", run.log.len());
    for op in run.ops.iter().flatten() {
        eprintln!("  {op:?}");
    }
    let mut checker = Checker::new();
    checker.verbose = true;
    let mut failures = Vec::new();
    checker.check_run(&run, Some((at, image_seed, tear)), &mut failures);
    if let Ok(dir) = std::env::var("QCOW2_CRASH_KEEP") {
        let crash = CrashImage::from_log(
            &run.log,
            &run.base,
            &CrashSpec::new(image_seed).at(at).tear(tear),
        );
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join("repro.qcow2"), &crash.bytes).unwrap();
        let log: Vec<String> = run
            .log
            .iter()
            .map(|e| {
                format!(
                    "{} {:?} {:#x}+{:#x} after {}",
                    e.seq, e.info.op, e.info.offset, e.info.len, e.issued_after
                )
            })
            .collect();
        std::fs::write(Path::new(&dir).join("repro.log"), log.join("\n")).unwrap();
        eprintln!("kept {dir}/repro.qcow2 and repro.log");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn crash_64k() {
    torture("64k");
}

#[test]
fn crash_4k_refcount_1() {
    torture("4k-r1");
}

#[test]
fn crash_4k_refcount_8() {
    torture("4k-r8");
}

#[test]
fn crash_512_byte_clusters() {
    torture("512-r16");
}

#[test]
fn crash_512_byte_clusters_refcount_table_growth() {
    torture("512-r64");
}

#[test]
fn crash_v2() {
    torture("v2-64k");
}

#[test]
fn crash_extended_l2() {
    torture("extl2-32k");
}

#[test]
fn crash_lazy_refcounts() {
    torture("lazy-64k");
}

#[test]
fn crash_lazy_refcounts_512_byte_clusters() {
    torture("lazy-512-r64");
}

#[test]
fn crash_2m_clusters() {
    torture("2m");
}

#[test]
fn crash_on_real_files() {
    torture("files-4k");
}

#[test]
fn crash_over_snapshots() {
    torture("fixture-snapshot");
}

#[test]
fn crash_over_compressed_clusters() {
    torture("fixture-compressed");
}

#[test]
fn crash_over_zero_clusters() {
    torture("fixture-zero-clusters");
}

#[test]
fn crash_over_preallocated_metadata() {
    torture("fixture-prealloc-metadata");
}

#[test]
fn crash_on_real_files_with_o_direct() {
    torture("files-direct-64k");
}
