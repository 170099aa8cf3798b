//! Many tasks writing, reading, discarding and zeroing one image at once, on a multi-thread
//! runtime with the tokio-file backend and on the io_uring backend.
//!
//! The model: every task owns a private region, whose contents must come out exactly as a
//! serial run of that task's operations says; all tasks also write into a shared region,
//! where each byte must equal what some operation covering it left there (or its initial
//! value): any serial order of overlapping requests is allowed, nothing else. Reads of a
//! private region during the run must see exactly the task's own last writes.

use blockio::{FileOpener, Opener, UringOpener};
use qcow2_engine::{Image, ImageOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference, Prng};
use std::collections::BTreeSet;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

const TASKS: u64 = 8;
const OPS: usize = 120;
const CLUSTER: u64 = 65536;
const PRIVATE: u64 = 1 << 20; // per task
const SHARED: u64 = 1 << 20;

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Flush,
}

fn task_ops(task: u64) -> Vec<Op> {
    let mut r = Prng::new(0xc0ffee + task);
    let base = task * PRIVATE;
    let shared = TASKS * PRIVATE;
    (0..OPS)
        .map(|i| {
            let in_shared = r.chance(30);
            let (start, span) = if in_shared {
                (shared, SHARED)
            } else {
                (base, PRIVATE)
            };
            let len = if r.chance(50) {
                1 + r.below(2 * CLUSTER)
            } else {
                CLUSTER * (1 + r.below(3))
            };
            let len = len.min(span);
            let mut off = start + r.below(span - len + 1);
            if r.chance(50) {
                off = start + (off - start) / CLUSTER * CLUSTER;
                if off + len > start + span {
                    off = start + span - len;
                }
            }
            let pat = (task * 31 + i as u64 % 29 + 1) as u8;
            match r.below(12) {
                0..=5 => Op::Write { off, len, pat },
                6 => Op::Zero {
                    off,
                    len,
                    unmap: r.chance(50),
                },
                7 => Op::Discard { off, len },
                8..=10 if !in_shared => Op::Read { off, len },
                _ => Op::Flush,
            }
        })
        .collect()
}

/// Whole clusters inside `[off, off+len)` (what a discard changes).
fn discard_range(off: u64, len: u64) -> std::ops::Range<u64> {
    let first = off.div_ceil(CLUSTER) * CLUSTER;
    let last = (off + len) / CLUSTER * CLUSTER;
    first..last.max(first)
}

async fn run_task<O: Opener>(img: &Image<O>, task: u64, ops: &[Op]) {
    let base = task * PRIVATE;
    let mut mine = vec![0u8; PRIVATE as usize];
    for op in ops {
        let private = |off: u64| off >= base && off < base + PRIVATE;
        match *op {
            Op::Write { off, len, pat } => {
                img.write(off, &vec![pat; len as usize]).await.unwrap();
                if private(off) {
                    mine[(off - base) as usize..(off - base + len) as usize].fill(pat);
                }
            }
            Op::Zero { off, len, unmap } => {
                img.write_zeroes(off, len, unmap).await.unwrap();
                if private(off) {
                    mine[(off - base) as usize..(off - base + len) as usize].fill(0);
                }
            }
            Op::Discard { off, len } => {
                img.discard(off, len).await.unwrap();
                if private(off) {
                    let r = discard_range(off, len);
                    mine[(r.start - base) as usize..(r.end - base) as usize].fill(0);
                }
            }
            Op::Read { off, len } => {
                let got = img.read(off, len).await.unwrap();
                let o = (off - base) as usize;
                assert!(
                    got[..] == mine[o..o + len as usize],
                    "task {task}: read {off:#x}+{len:#x} does not show the task's own writes"
                );
            }
            Op::Flush => img.flush().await.unwrap(),
        }
    }
}

/// Checks the final image against the model.
fn check_final(path: &Path, all: &[Vec<Op>]) {
    let check = qemu_check(path);
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let got = raw_reference(path, "qcow2");
    for (task, ops) in all.iter().enumerate() {
        let base = task as u64 * PRIVATE;
        let mut mine = vec![0u8; PRIVATE as usize];
        for op in ops {
            match *op {
                Op::Write { off, len, pat } if off < base + PRIVATE && off >= base => {
                    mine[(off - base) as usize..(off - base + len) as usize].fill(pat)
                }
                Op::Zero { off, len, .. } if off < base + PRIVATE && off >= base => {
                    mine[(off - base) as usize..(off - base + len) as usize].fill(0)
                }
                Op::Discard { off, len } if off < base + PRIVATE && off >= base => {
                    let r = discard_range(off, len);
                    mine[(r.start - base) as usize..(r.end - base) as usize].fill(0)
                }
                _ => {}
            }
        }
        assert!(
            got[base as usize..(base + PRIVATE) as usize] == mine[..],
            "task {task}: private region differs from its serial model"
        );
    }
    // Shared region: every byte is its initial value (0) or left by an op covering it.
    let shared = TASKS * PRIVATE;
    let mut allowed: Vec<BTreeSet<u8>> = vec![BTreeSet::from([0u8]); SHARED as usize];
    for op in all.iter().flatten() {
        let (r, v) = match *op {
            Op::Write { off, len, pat } if off >= shared => (off..off + len, pat),
            Op::Zero { off, len, .. } if off >= shared => (off..off + len, 0),
            _ => continue,
        };
        for b in r {
            allowed[(b - shared) as usize].insert(v);
        }
    }
    for (i, set) in allowed.iter().enumerate() {
        let v = got[shared as usize + i];
        assert!(
            set.contains(&v),
            "shared byte {:#x} is {v:#x}, which no operation wrote there",
            shared + i as u64
        );
    }
}

fn new_image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("conc.qcow2");
    let size = (TASKS * PRIVATE + SHARED).to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&path), &size]);
    path
}

#[test]
fn many_tasks_on_a_multi_thread_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let all: Vec<Vec<Op>> = (0..TASKS).map(task_ops).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let img = Arc::new(
            Image::open(FileOpener, &path, ImageOptions::new())
                .await
                .unwrap(),
        );
        let mut handles = Vec::new();
        for (t, ops) in all.iter().cloned().enumerate() {
            let img = img.clone();
            handles.push(tokio::spawn(
                async move { run_task(&img, t as u64, &ops).await },
            ));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert!(img.leases().is_empty(), "leases left behind");
        Arc::try_unwrap(img).ok().unwrap().close().await.unwrap();
    });
    check_final(&path, &all);
}

#[test]
fn many_tasks_on_io_uring() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    let all: Vec<Vec<Op>> = (0..TASKS).map(task_ops).collect();
    blockio::uring_builder().start(async {
        let img = Rc::new(
            Image::open(UringOpener, &path, ImageOptions::new())
                .await
                .unwrap(),
        );
        let mut handles = Vec::new();
        for (t, ops) in all.iter().cloned().enumerate() {
            let img = img.clone();
            handles.push(tokio_uring::spawn(async move {
                run_task(&img, t as u64, &ops).await
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert!(img.leases().is_empty(), "leases left behind");
        Rc::try_unwrap(img).ok().unwrap().close().await.unwrap();
    });
    check_final(&path, &all);
}
