//! Crash images of resizes (docs/DESIGN.md, "Resizing"): a workload of writes, flushes and
//! resizes (two grows across L1 growth, a shrink cutting data, a metadata-preallocated grow)
//! runs over the fault-injecting backend on 512-byte clusters; then, at every point of its
//! request log, the image as a crash there could leave it (what the last completed flush
//! made durable, a seeded subset of what came after, every other image with one torn
//! sector) must
//!
//! (a) show no corruption in `qemu-img check` (leaks are allowed: exit 0 or 3);
//! (b) open with our engine, with the size of the last resize that returned, or of the one
//!     in flight;
//! (c) read, everywhere, only what some write put there or zeros (no garbage, no other
//!     guest's data), and what a write acknowledged before a completed flush put there,
//!     unless a resize that returned since cut it; and what was cut reads zeros when grown
//!     back;
//! (d) read the same through QEMU (a sample), and carry on read-write: a write and a close
//!     leave it clean (a sample).

use blockio::{CrashImage, CrashSpec, FaultController, FaultOpener, MemoryBackend, MemoryOpener};
use qcow2_engine::{Image, ImageOptions, Preallocation, ResizeOptions};
use qcow2_tests::{path_str, qemu_img, qemu_img_status, raw_reference};
use std::path::Path;

const IMAGE: &str = "/crash/resize.qcow2";
const K: u64 = 1024;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Flush,
    Resize { size: u64, prealloc: Preallocation },
}

const A: Op = Op::Write {
    off: 0,
    len: 64 * K,
    byte: 0xa1,
};
const B: Op = Op::Write {
    off: 2048 * K,
    len: 64 * K,
    byte: 0xb2,
};
const C: Op = Op::Write {
    off: 512 * K,
    len: 4 * K,
    byte: 0xc3,
};
/// Where the shrink cuts.
const CUT: u64 = 40 * K;
const START: u64 = 64 * K;

const WORKLOAD: &[Op] = &[
    A,
    Op::Flush,
    // 2 L1 entries (one cluster) to 96: the table moves.
    Op::Resize {
        size: 3072 * K,
        prealloc: Preallocation::Off,
    },
    B,
    Op::Flush,
    Op::Resize {
        size: CUT,
        prealloc: Preallocation::Off,
    },
    Op::Flush,
    Op::Resize {
        size: 1024 * K,
        prealloc: Preallocation::Metadata,
    },
    C,
    Op::Flush,
    // 32 entries to 256 (four clusters): it moves again.
    Op::Resize {
        size: 8192 * K,
        prealloc: Preallocation::Off,
    },
    Op::Flush,
];

/// An op and where it stands in the request log: how many requests had completed when it
/// began and when it returned.
#[derive(Clone, Copy, Debug)]
struct Done {
    op: Op,
    start: u64,
    end: u64,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs the workload; returns the image before it, the log and the ops' places in it.
fn run_workload(dir: &Path) -> (Vec<u8>, Vec<blockio::LogEntry>, Vec<Done>) {
    let path = dir.join("base.qcow2");
    let size = START.to_string();
    let args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
    qemu_img(&[&args[..], &[path_str(&path), &size]].concat());
    let base = std::fs::read(&path).unwrap();
    let mem = MemoryOpener::new();
    mem.insert(IMAGE, MemoryBackend::from_vec(base.clone()));
    let opener = FaultOpener::new(mem);
    let ctl: FaultController = opener.controller();
    let done = runtime().block_on(async {
        let img = Image::open(opener, IMAGE, ImageOptions::new())
            .await
            .unwrap();
        let mut done = Vec::new();
        for &op in WORKLOAD {
            let start = ctl.completed();
            match op {
                Op::Write { off, len, byte } => {
                    img.write(off, &vec![byte; len as usize]).await.unwrap()
                }
                Op::Flush => img.flush().await.unwrap(),
                Op::Resize { size, prealloc } => {
                    let options = ResizeOptions::new().shrink(true).preallocation(prealloc);
                    img.resize(size, options).await.unwrap()
                }
            }
            done.push(Done {
                op,
                start,
                end: ctl.completed(),
            });
        }
        // The crash: no close.
        drop(img);
        done
    });
    (base, ctl.log(), done)
}

/// The sizes a crash at `at` may leave: the last resize's that returned, or the one in
/// flight's.
fn sizes_at(done: &[Done], at: u64) -> Vec<u64> {
    let mut sizes = vec![START];
    for d in done {
        if let Op::Resize { size, .. } = d.op {
            if d.end <= at {
                sizes = vec![size];
            } else if d.start <= at {
                sizes.push(size);
            }
        }
    }
    sizes
}

/// Whether `w` (a write) was made durable by a flush that completed by `at`.
fn durable(done: &[Done], i: usize, at: u64) -> bool {
    done[i + 1..]
        .iter()
        .any(|d| matches!(d.op, Op::Flush) && d.start >= done[i].end && d.end <= at)
}

/// Checks what a disk of `size` bytes holds after a crash at `at`.
fn check_content(disk: &[u8], done: &[Done], at: u64) -> Result<(), String> {
    let size = disk.len() as u64;
    // The shrink to CUT: what lay past CUT before it is gone once it returned, and may be
    // gone while it runs.
    let shrink = done
        .iter()
        .position(|d| matches!(d.op, Op::Resize { size, .. } if size == CUT))
        .expect("the workload shrinks");
    let cut_started = done[shrink].start <= at;
    let cut_done = done[shrink].end <= at;
    let mut allowed = vec![(0u8, false); size as usize]; // (the write's byte, must hold it)
    for (i, d) in done.iter().enumerate() {
        let Op::Write { off, len, byte } = d.op else {
            continue;
        };
        if d.start > at {
            continue;
        }
        let must = durable(done, i, at);
        for b in off..(off + len).min(size) {
            let cut = i < shrink && b >= CUT;
            if cut && cut_done {
                continue;
            }
            allowed[b as usize] = (byte, must && !(cut && cut_started));
        }
    }
    for (b, (&got, &(byte, must))) in disk.iter().zip(&allowed).enumerate() {
        let ok = got == byte || (!must && got == 0);
        if !ok {
            return Err(format!(
                "byte {b:#x} reads {got:#04x}, want {byte:#04x}{}",
                if must { "" } else { " or 0" }
            ));
        }
    }
    Ok(())
}

async fn engine_disk(path: &Path) -> Result<Vec<u8>, String> {
    let img = Image::open(
        blockio::FileOpener,
        path,
        ImageOptions::new().read_only(true),
    )
    .await
    .map_err(|e| format!("our engine cannot open it: {e}"))?;
    let size = img.size();
    let buf = img
        .read(0, size)
        .await
        .map_err(|e| format!("our engine cannot read it: {e}"))?;
    Ok(buf.to_vec())
}

/// Writes through our engine to the crashed image and closes it: it must stay clean.
async fn recover(path: &Path) -> Result<(), String> {
    let img = Image::open(blockio::FileOpener, path, ImageOptions::new())
        .await
        .map_err(|e| format!("recovery: open read-write: {e}"))?;
    let n = img.size().min(8 * K);
    img.write(0, &vec![0x77; n as usize])
        .await
        .map_err(|e| format!("recovery: write: {e}"))?;
    img.close()
        .await
        .map_err(|e| format!("recovery: close: {e}"))?;
    qemu_clean(path).map_err(|e| format!("recovery: {e}"))
}

fn qemu_clean(path: &Path) -> Result<(), String> {
    let out = qemu_img_status(&["check", path_str(path)]);
    match out.status.code() {
        Some(0) | Some(3) => Ok(()),
        code => Err(format!(
            "qemu-img check exit {code:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn check_crash(dir: &Path, crash: &CrashImage, done: &[Done], n: u64) -> Result<(), String> {
    let path = dir.join(format!("crash{}.qcow2", n % 2));
    std::fs::write(&path, &crash.bytes).unwrap();
    qemu_clean(&path)?;
    let disk = runtime().block_on(engine_disk(&path))?;
    let sizes = sizes_at(done, crash.at);
    if !sizes.contains(&(disk.len() as u64)) {
        return Err(format!("size {} is none of {sizes:?}", disk.len()));
    }
    check_content(&disk, done, crash.at)?;
    if n % 5 == 0 && raw_reference(&path, "qcow2") != disk {
        return Err("QEMU reads it differently".into());
    }
    if n % 7 == 0 {
        runtime().block_on(recover(&path))?;
    }
    Ok(())
}

#[test]
fn crashes_during_resizes_leave_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (base, log, done) = run_workload(dir.path());
    let total = log.iter().map(|e| e.seq + 1).max().unwrap_or(0);
    let mut failures = Vec::new();
    let mut n = 0;
    for at in 0..=total {
        for tear in [false, true] {
            let spec = CrashSpec::new(at * 2 + u64::from(tear)).at(at).tear(tear);
            let crash = CrashImage::from_log(&log, &base, &spec);
            if let Err(e) = check_crash(dir.path(), &crash, &done, n) {
                failures.push(format!("crash at {at} (tear {tear}): {e}\n  {crash:?}"));
            }
            n += 1;
        }
        if failures.len() >= 5 {
            break;
        }
    }
    eprintln!("crash resize: {} requests, {n} crash images", total);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(total > 100, "the workload issued only {total} requests");
}
