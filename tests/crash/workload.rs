//! A workload: random guest requests on an image through the fault-injecting backend, and the
//! log of its backend requests (where crash points are).

use super::configs::Config;
use blockio::{FaultOpener, FileOpener, LogEntry, MemoryBackend, MemoryOpener, OpKind, Opener};
use qcow2_engine::{Image, ImageOptions};
use qcow2_tests::{path_str, qemu_img, Prng};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
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
pub struct Op {
    /// Unique in the run (the data pattern depends on it).
    pub id: usize,
    pub kind: Kind,
    pub off: u64,
    pub len: u64,
    pub start_io: u64,
    pub end_io: u64,
    pub start_clk: u64,
    pub end_clk: u64,
}

/// The byte op `id` writes at guest offset `off`: depends on both, so misplaced data shows.
pub fn pattern(id: usize, off: u64) -> u8 {
    let x = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ off.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    ((x >> 56) as u8).max(1)
}

/// The ops of a run, task by task (each task owns a cluster-aligned slice of the disk).
pub fn random_ops(cfg: &Config, seed: u64) -> Vec<Vec<Op>> {
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
pub fn changed(op: &Op, cfg: &Config) -> std::ops::Range<u64> {
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
pub fn value(op: &Op, cfg: &Config, b: u64) -> Option<u8> {
    if !changed(op, cfg).contains(&b) {
        return None;
    }
    Some(match op.kind {
        Kind::Write => pattern(op.id, b),
        _ => 0,
    })
}

pub fn apply(model: &mut [u8], op: &Op, cfg: &Config) {
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
pub struct Run {
    pub cfg: Config,
    pub seed: u64,
    /// The image file before the workload.
    pub base: Vec<u8>,
    /// The guest disk before the workload.
    pub initial: Vec<u8>,
    pub log: Vec<LogEntry>,
    /// The ops of each task, in the order the task ran them.
    pub ops: Vec<Vec<Op>>,
}

pub const IMAGE: &str = "/crash/img.qcow2";

pub fn create_image(cfg: &Config, dir: &Path) -> PathBuf {
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

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub async fn run_task<O: Opener>(
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

pub async fn drive<O: Opener>(
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

pub fn run_workload(cfg: &Config, seed: u64) -> Run {
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
pub fn crash_points(run: &Run) -> Vec<u64> {
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
