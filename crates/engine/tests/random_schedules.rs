//! Seeded random schedules over the whole engine.
//!
//! Each seed builds an image (cluster size, extended L2, refcount width, lazy refcounts
//! chosen by the seed), then runs a few tasks of random writes, reads, write-zeroes,
//! discards and flushes on a handful of overlapping clusters, over the fault-injecting
//! backend on memory. Every backend request is held; the test releases them in a seeded
//! random order, keeping some held across many other events (a "delay" is a request held
//! while others complete). The tasks run on a single-threaded `LocalPool` and the memory
//! backend completes at once, so `run_until_stalled` says exactly when every task waits
//! for a held request: no sleep stands in for synchronisation, and a seed replays the same
//! run every time. A stall with nothing held is a deadlock, and fails the seed.
//!
//! The model allows any serial order of overlapping requests that real time permits: every
//! byte a read returns (and every byte of the final image) must come from a request that
//! covered it, began before the read ended, and was not certainly overwritten before the
//! read began (or be the initial zero if no covering request had certainly finished). The
//! final image must also pass `qemu-img check` (no corruption and no leak), and QEMU must
//! read it as the model says.
//!
//! Cancellation (I9): most seeds drop requests on the way, at whatever await point they
//! have reached, as an embedder's timeout or aborted task would: some requests get a
//! deadline (a number of scheduler steps), and the scheduler also drops a running request
//! at random. A request dropped while the backend holds one of its operations leaves an
//! orphan, which still completes when released (the fault injector's orphan driver runs
//! it, as the kernel would). A dropped change may have taken effect or not, per byte, at
//! any time after it began: the model treats it as never finishing.
//!
//! `QCOW2_SCHEDULE_SEEDS` (default 300) seeds from `QCOW2_SCHEDULE_FIRST_SEED` (default 0);
//! `QCOW2_SCHEDULE_SEED` runs one. A failing seed prints the command that replays it.

use blockio::{FaultController, FaultOpener, HeldRequest, MemoryBackend, MemoryOpener};
use futures::channel::oneshot;
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use qcow2_engine::{Image, ImageOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference, Prng};
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

type Img = Image<FaultOpener<MemoryOpener>>;

/// Clusters the guest operations touch (they overlap a lot).
const SPAN_CLUSTERS: u64 = 6;
/// The disk: a little more than the span, so that some tables and blocks move around.
const DISK_CLUSTERS: u64 = 8;

/// An image layout a seed can pick: qemu-img `-o` options, and the cluster size.
const LAYOUTS: &[(&str, u64)] = &[
    ("cluster_size=512", 512),
    ("cluster_size=4096", 4096),
    ("cluster_size=4096,refcount_bits=1", 4096),
    ("cluster_size=4096,lazy_refcounts=on", 4096),
    ("cluster_size=65536", 65536),
    ("cluster_size=65536,extended_l2=on", 65536),
];

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Flush,
}

/// A finished change: the bytes it set to `val`, and when it began and ended (ticks of
/// one clock that counts every start and end).
#[derive(Clone, Debug)]
struct Change {
    range: std::ops::Range<u64>,
    val: u8,
    start: u64,
    end: u64,
}

/// A finished read and what it returned.
struct ReadRec {
    off: u64,
    data: Vec<u8>,
    start: u64,
    end: u64,
    task: usize,
}

#[derive(Default)]
struct Log {
    changes: Vec<Change>,
    reads: Vec<ReadRec>,
}

/// The cancellation of the requests in progress: one slot per task, holding the sender that
/// drops its current request, and the number of scheduler steps it has left (a deadline) if
/// it has one.
#[derive(Default)]
struct Cancels {
    slots: Vec<Option<(oneshot::Sender<()>, Option<u64>)>>,
    /// Requests dropped, and of those, how many had a backend operation held (an orphan).
    dropped: u64,
    with_io_held: u64,
}

/// How a seed cancels: the chance (percent) that a request gets a deadline, and that a
/// scheduler step drops a running request.
#[derive(Clone, Copy)]
struct CancelPlan {
    deadline_pct: u64,
    abort_pct: u64,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

fn random_ops(r: &mut Prng, cs: u64, pat_base: u8) -> Vec<Op> {
    let span = SPAN_CLUSTERS * cs;
    let n = r.range(4, 12);
    (0..n)
        .map(|i| {
            let len = match r.below(3) {
                0 => 1 + r.below(cs),
                1 => cs * r.range(1, 2),
                _ => 1 + r.below(2 * cs),
            };
            let mut off = r.below(span - len + 1);
            if r.chance(50) {
                off = (off / cs * cs).min(span - len);
            }
            let pat = pat_base.wrapping_add(i as u8).max(1);
            match r.below(12) {
                0..=4 => Op::Write { off, len, pat },
                5 => Op::Zero {
                    off,
                    len,
                    unmap: r.chance(50),
                },
                6..=7 => Op::Discard { off, len },
                8..=10 => Op::Read { off, len },
                _ => Op::Flush,
            }
        })
        .collect()
}

/// Whole clusters inside `[off, off+len)`: what a discard changes.
fn discard_range(off: u64, len: u64, cs: u64) -> std::ops::Range<u64> {
    let first = off.div_ceil(cs) * cs;
    let last = (off + len) / cs * cs;
    first..last.max(first)
}

/// Runs one request; `None` for a read means the request changed nothing.
async fn run_op(
    img: &Img,
    op: Op,
    cs: u64,
) -> (Option<(std::ops::Range<u64>, u8)>, Option<Vec<u8>>) {
    match op {
        Op::Write { off, len, pat } => {
            img.write(off, &vec![pat; len as usize]).await.unwrap();
            (Some((off..off + len, pat)), None)
        }
        Op::Zero { off, len, unmap } => {
            img.write_zeroes(off, len, unmap).await.unwrap();
            (Some((off..off + len, 0)), None)
        }
        Op::Discard { off, len } => {
            img.discard(off, len).await.unwrap();
            (Some((discard_range(off, len, cs), 0)), None)
        }
        Op::Read { off, len } => {
            let data = img.read(off, len).await.unwrap().to_vec();
            (None, Some(data))
        }
        Op::Flush => {
            img.flush().await.unwrap();
            (None, None)
        }
    }
}

/// What a request would change, whether it completes or is dropped.
fn change_of(op: Op, cs: u64) -> Option<(std::ops::Range<u64>, u8)> {
    match op {
        Op::Write { off, len, pat } => Some((off..off + len, pat)),
        Op::Zero { off, len, .. } => Some((off..off + len, 0)),
        Op::Discard { off, len } => Some((discard_range(off, len, cs), 0)),
        Op::Read { .. } | Op::Flush => None,
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_task(
    img: Rc<Img>,
    task: usize,
    ops: Vec<Op>,
    cs: u64,
    clock: Rc<Cell<u64>>,
    log: Rc<RefCell<Log>>,
    cancels: Rc<RefCell<Cancels>>,
    deadlines: Vec<Option<u64>>,
) {
    let tick = || {
        let t = clock.get();
        clock.set(t + 1);
        t
    };
    for (op, deadline) in ops.into_iter().zip(deadlines) {
        let start = tick();
        let (tx, rx) = oneshot::channel();
        cancels.borrow_mut().slots[task] = Some((tx, deadline));
        let run = std::pin::pin!(run_op(&img, op, cs));
        let outcome = futures::future::select(run, rx).await;
        cancels.borrow_mut().slots[task] = None;
        let (change, data) = match outcome {
            futures::future::Either::Left(((change, data), _)) => (change, data),
            futures::future::Either::Right(_) => {
                // Dropped: whatever it changes may take effect at any time from now on.
                if let Some((range, val)) = change_of(op, cs).filter(|(r, _)| !r.is_empty()) {
                    log.borrow_mut().changes.push(Change {
                        range,
                        val,
                        start,
                        end: u64::MAX,
                    });
                }
                continue;
            }
        };
        let end = tick();
        if let (Op::Read { off, .. }, Some(data)) = (op, data) {
            log.borrow_mut().reads.push(ReadRec {
                off,
                data,
                start,
                end,
                task,
            });
        }
        if let Some((range, val)) = change.filter(|(r, _)| !r.is_empty()) {
            log.borrow_mut().changes.push(Change {
                range,
                val,
                start,
                end,
            });
        }
    }
}

/// Checks `data` (the bytes at `off..`) as seen by a read over ticks `start..end`
/// (`u64::MAX` for the final image): each byte must be a value some change could have left.
fn check_bytes(changes: &[Change], off: u64, data: &[u8], start: u64, end: u64, what: &str) {
    let range = off..off + data.len() as u64;
    // Changes that may have taken effect, overlapping the range.
    let cands: Vec<&Change> = changes
        .iter()
        .filter(|c| c.start < end && c.range.start < range.end && range.start < c.range.end)
        .collect();
    let mut cuts: BTreeSet<u64> = BTreeSet::from([range.start, range.end]);
    for c in &cands {
        cuts.insert(c.range.start.clamp(range.start, range.end));
        cuts.insert(c.range.end.clamp(range.start, range.end));
    }
    let cuts: Vec<u64> = cuts.into_iter().collect();
    for seg in cuts.windows(2) {
        let (a, b) = (seg[0], seg[1]);
        if a == b {
            continue;
        }
        let covering: Vec<&&Change> = cands
            .iter()
            .filter(|c| c.range.start <= a && b <= c.range.end)
            .collect();
        let mut allowed = BTreeSet::new();
        if !covering.iter().any(|c| c.end < start) {
            allowed.insert(0u8);
        }
        for c in &covering {
            let overwritten = covering.iter().any(|d| c.end < d.start && d.end < start);
            if !overwritten {
                allowed.insert(c.val);
            }
        }
        for p in a..b {
            let v = data[(p - off) as usize];
            assert!(
                allowed.contains(&v),
                "{what}: byte {p:#x} is {v:#04x}, but only {allowed:02x?} may be there \
                 (changes covering it: {covering:?})"
            );
        }
    }
}

/// Creates the image file for `layout` and loads it into a memory backend.
fn make_image(dir: &Path, layout: &str, cs: u64) -> (PathBuf, MemoryOpener) {
    let path = dir.join("sched.qcow2");
    let size = (DISK_CLUSTERS * cs).to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        layout,
        path_str(&path),
        &size,
    ]);
    let bytes = std::fs::read(&path).unwrap();
    let mem = MemoryOpener::new();
    mem.insert(&path, MemoryBackend::from_vec(bytes));
    (path, mem)
}

/// Drops the request of task `t` (a timeout or an abort); counts it, and whether a backend
/// operation of it is held (it leaves an orphan).
fn cancel(pool: &mut LocalPool, cancels: &RefCell<Cancels>, held: &[(HeldRequest, u64)], t: usize) {
    let Some((tx, _)) = cancels.borrow_mut().slots[t].take() else {
        return;
    };
    let orphans = || held.iter().filter(|(h, _)| h.is_orphan()).count();
    let before = orphans();
    let _ = tx.send(());
    pool.run_until_stalled();
    let mut c = cancels.borrow_mut();
    c.dropped += 1;
    if orphans() > before {
        c.with_io_held += 1;
    }
}

/// One scheduler step of cancellation: deadlines count down (and expire), and a running
/// request may be dropped at random.
fn cancel_step(
    pool: &mut LocalPool,
    cancels: &RefCell<Cancels>,
    held: &[(HeldRequest, u64)],
    r: &mut Prng,
    plan: CancelPlan,
) {
    let tasks = cancels.borrow().slots.len();
    for t in 0..tasks {
        let expired = {
            let mut c = cancels.borrow_mut();
            match &mut c.slots[t] {
                Some((_, Some(left))) if *left == 0 => true,
                Some((_, Some(left))) => {
                    *left -= 1;
                    false
                }
                _ => false,
            }
        };
        if expired {
            cancel(pool, cancels, held, t);
        }
    }
    if r.chance(plan.abort_pct) {
        let running: Vec<usize> = (0..tasks)
            .filter(|&t| cancels.borrow().slots[t].is_some())
            .collect();
        if !running.is_empty() {
            let t = running[r.below(running.len() as u64) as usize];
            cancel(pool, cancels, held, t);
        }
    }
}

/// Releases held requests in a seeded random order until every task has finished and
/// nothing is held (orphans included), dropping requests as `plan` says.
fn drive(
    pool: &mut LocalPool,
    ctl: &FaultController,
    r: &mut Prng,
    done: &Cell<usize>,
    tasks: usize,
    cancels: &RefCell<Cancels>,
    plan: CancelPlan,
) -> u64 {
    let mut held: Vec<(HeldRequest, u64)> = Vec::new();
    let mut released = 0;
    loop {
        pool.run_until_stalled();
        while let Some(h) = ctl.try_next_held() {
            // Most requests may go at once; some are delayed across later events.
            let delay = if r.chance(30) { r.range(1, 8) } else { 0 };
            held.push((h, delay));
        }
        if done.get() == tasks && held.is_empty() {
            assert_eq!(
                ctl.held_count(),
                0,
                "requests held after every task finished"
            );
            return released;
        }
        assert!(
            !held.is_empty(),
            "deadlock: every task waits, and no request is held"
        );
        cancel_step(pool, cancels, &held, r, plan);
        let ready: Vec<usize> = (0..held.len()).filter(|&i| held[i].1 == 0).collect();
        if ready.is_empty() {
            // Time passes: nothing is due, so the least delayed request goes.
            let i = (0..held.len()).min_by_key(|&i| held[i].1).unwrap();
            held[i].1 = 0;
            continue;
        }
        // Release one due request (sometimes a few) chosen at random, in random order.
        let k = if r.chance(25) {
            r.range(1, ready.len() as u64)
        } else {
            1
        };
        let mut pick: Vec<usize> = ready;
        for j in 0..k as usize {
            let x = j + r.below((pick.len() - j) as u64) as usize;
            pick.swap(j, x);
        }
        let mut pick: Vec<usize> = pick[..k as usize].to_vec();
        pick.sort_unstable_by(|a, b| b.cmp(a));
        let mut go = Vec::new();
        for i in pick {
            go.push(held.swap_remove(i).0);
        }
        for h in go {
            h.release();
            released += 1;
        }
        for h in &mut held {
            h.1 = h.1.saturating_sub(1);
        }
    }
}

/// What one seed did.
#[derive(Default)]
struct SeedStats {
    /// Backend requests released in random order.
    released: u64,
    /// Requests dropped, and of those, dropped with a backend operation held.
    dropped: u64,
    with_io_held: u64,
}

/// One seed.
fn run_seed(seed: u64) -> SeedStats {
    let mut r = Prng::new(seed);
    let (layout, cs) = *r.pick(LAYOUTS);
    let dir = tempfile::tempdir().unwrap();
    let (path, mem) = make_image(dir.path(), layout, cs);
    let tasks = r.range(2, 6) as usize;
    let all: Vec<Vec<Op>> = (0..tasks)
        .map(|t| random_ops(&mut r, cs, (t as u8) * 40 + 1))
        .collect();

    // Two seeds in three drop requests: some with deadlines, some aborted at random.
    let plan = if r.chance(67) {
        CancelPlan {
            deadline_pct: r.range(5, 25),
            abort_pct: r.range(2, 12),
        }
    } else {
        CancelPlan {
            deadline_pct: 0,
            abort_pct: 0,
        }
    };
    let deadlines: Vec<Vec<Option<u64>>> = all
        .iter()
        .map(|ops| {
            ops.iter()
                .map(|_| r.chance(plan.deadline_pct).then(|| r.below(12)))
                .collect()
        })
        .collect();

    let opener = FaultOpener::new(mem.clone());
    let ctl = opener.controller();
    ctl.set_logging(false);
    let mut pool = LocalPool::new();
    pool.spawner().spawn_local(opener.orphan_driver()).unwrap();
    let img = Rc::new(
        pool.run_until(Image::open(opener, &path, ImageOptions::new()))
            .unwrap(),
    );
    let clock = Rc::new(Cell::new(0));
    let log = Rc::new(RefCell::new(Log::default()));
    let done = Rc::new(Cell::new(0));
    let cancels = Rc::new(RefCell::new(Cancels {
        slots: (0..tasks).map(|_| None).collect(),
        ..Cancels::default()
    }));
    ctl.hold_all();
    for (t, ops) in all.iter().cloned().enumerate() {
        let (img, clock, log, done) = (img.clone(), clock.clone(), log.clone(), done.clone());
        let (cancels, deadlines) = (cancels.clone(), deadlines[t].clone());
        pool.spawner()
            .spawn_local(async move {
                run_task(img, t, ops, cs, clock, log, cancels, deadlines).await;
                done.set(done.get() + 1);
            })
            .unwrap();
    }
    let released = drive(&mut pool, &ctl, &mut r, &done, tasks, &cancels, plan);
    ctl.stop_holding();
    assert!(img.leases().is_empty(), "leases left behind");
    let img = Rc::try_unwrap(img).ok().expect("no other user");
    pool.run_until(img.close()).unwrap();

    let log = log.borrow();
    for rd in &log.reads {
        check_bytes(
            &log.changes,
            rd.off,
            &rd.data,
            rd.start,
            rd.end,
            &format!("task {} read at {:#x}", rd.task, rd.off),
        );
    }
    let bytes = mem.get(&path).unwrap().snapshot();
    std::fs::write(&path, bytes).unwrap();
    let check = qemu_check(&path);
    assert!(
        check.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let raw = raw_reference(&path, "qcow2");
    check_bytes(&log.changes, 0, &raw, u64::MAX, u64::MAX, "final image");
    let c = cancels.borrow();
    SeedStats {
        released,
        dropped: c.dropped,
        with_io_held: c.with_io_held,
    }
}

#[test]
fn random_schedules() {
    let (first, count) = match env_u64("QCOW2_SCHEDULE_SEED") {
        Some(s) => (s, 1),
        None => (
            env_u64("QCOW2_SCHEDULE_FIRST_SEED").unwrap_or(0),
            env_u64("QCOW2_SCHEDULE_SEEDS").unwrap_or(300),
        ),
    };
    // QCOW2_SCHEDULE_KEEP_GOING=1 runs every seed and counts the failures (to measure how
    // often a broken build is caught) instead of stopping at the first.
    let keep_going = std::env::var_os("QCOW2_SCHEDULE_KEEP_GOING").is_some();
    let start = Instant::now();
    let mut total = SeedStats::default();
    let mut failed = Vec::new();
    for seed in first..first + count {
        let res = std::panic::catch_unwind(|| run_seed(seed));
        match res {
            Ok(s) => {
                total.released += s.released;
                total.dropped += s.dropped;
                total.with_io_held += s.with_io_held;
            }
            Err(e) => {
                // The build's flags (a --cfg qcow2_no_lease build, say) belong to the command.
                let env: String = ["RUSTFLAGS", "CARGO_TARGET_DIR"]
                    .iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v:?} ")))
                    .collect();
                eprintln!(
                    "random schedule seed {seed} failed; replay it with:\n  \
                     {env}QCOW2_SCHEDULE_SEED={seed} cargo test -p qcow2-engine --test random_schedules -- --nocapture"
                );
                if !keep_going {
                    std::panic::resume_unwind(e);
                }
                failed.push(seed);
            }
        }
    }
    println!(
        "random schedules: {count} seeds from {first}, {} requests released in random order, \
         {} requests dropped ({} with a backend operation held), {} failed, {:.1} s",
        total.released,
        total.dropped,
        total.with_io_held,
        failed.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "{} seeds failed: {failed:?}",
        failed.len()
    );
}
