//! Crash images of amendments (docs/DESIGN.md, "Amending: the refcount width"): a workload
//! of `Image::amend` calls (the refcount width widened from 16 to 64 bits and narrowed to 4,
//! lazy refcounts on, a write under them, lazy refcounts off, a downgrade to version 2 that
//! also goes back to 16 bits and expands zero clusters, an upgrade to version 3) runs over
//! the fault-injecting backend on 512-byte clusters (so the new refcount structures span
//! several blocks). The image starts with data, a compressed cluster and zero clusters
//! written by qemu-io. Then, at every point of the request log, the image as a crash there
//! could leave it (what the last completed flush made durable, a seeded subset of what came
//! after, every other image with one torn sector; four per point) must
//!
//! (a) show no corruption in `qemu-img check` (leaks are allowed: exit 0 or 3; a dirty image,
//!     from the lazy refcounts phase, is repaired with `check -r all` first, which must
//!     succeed);
//! (b) open with our engine;
//! (c) read, everywhere, the guest data qemu-io wrote (as `qemu-img convert` reads the
//!     image before the workload), and in the range the workload writes, old or new bytes
//!     until the close after that write returned, new ones after;
//! (d) carry on read-write (a sample): a write and a close leave it clean.
//!
//! A second workload upgrades a version 2 image whose snapshot lacks the version 3 fields
//! (the snapshot table is written anew) and changes its width in the same amendment; its
//! crash images must also keep the snapshot as it read.

use blockio::{CrashImage, CrashSpec, FaultOpener, MemoryBackend, MemoryOpener};
use qcow2_engine::{AmendOptions, Compat, Image, ImageOptions};
use qcow2_format::Header;
use qcow2_tests::{
    path_str, qemu_img, qemu_img_status, qemu_io, raw_reference, raw_reference_snapshot,
    strip_snapshot_extra_data,
};
use std::collections::HashSet;
use std::path::Path;

const IMAGE: &str = "/crash/amend.qcow2";
const K: u64 = 1024;
const SIZE: u64 = 256 * K;
/// Crash images per crash point: seeded subsets of the volatile writes, every other one
/// with a torn sector.
const VARIANTS: u64 = 4;
/// What the workload writes (under lazy refcounts), and its byte.
const WRITE: (u64, u64, u8) = (8 * K, 6 * K, 0x44);

#[derive(Clone, Debug)]
enum Op {
    Amend(AmendOptions),
    /// Open, write [`WRITE`], close.
    Write,
}

/// The workload over the image [`base_image`] makes.
fn workload() -> Vec<Op> {
    let a = AmendOptions::new;
    vec![
        Op::Amend(a().refcount_bits(64)),
        Op::Amend(a().refcount_bits(4)),
        Op::Amend(a().lazy_refcounts(true)),
        Op::Write,
        Op::Amend(a().lazy_refcounts(false)),
        Op::Amend(a().compat(Compat::V2).refcount_bits(16)),
        Op::Amend(a().compat(Compat::V3)),
    ]
}

/// An op and where it stands in the request log.
#[derive(Clone, Debug)]
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

/// Makes the image with qemu-img and qemu-io; returns its bytes and what it reads.
fn base_image(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let path = dir.join("base.qcow2");
    let size = SIZE.to_string();
    let args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
    qemu_img(&[&args[..], &[path_str(&path), &size]].concat());
    qemu_io(
        "qcow2",
        &path,
        &[
            "write -P 1 0 40k",
            "write -c -P 2 64k 2k",
            "write -z 96k 8k",
            "write -P 3 120k 4k",
            "write -z 4k 2k",
        ],
    );
    let disk = raw_reference(&path, "qcow2");
    (std::fs::read(&path).unwrap(), disk)
}

/// Runs `ops`; returns the log and the ops' places in it.
fn run_workload(base: &[u8], ops: Vec<Op>) -> (Vec<blockio::LogEntry>, Vec<Done>) {
    let mem = MemoryOpener::new();
    mem.insert(IMAGE, MemoryBackend::from_vec(base.to_vec()));
    let opener = FaultOpener::new(mem);
    let ctl = opener.controller();
    let done = runtime().block_on(async {
        let mut done = Vec::new();
        for op in ops {
            let start = ctl.completed();
            let img = Image::open(opener.clone(), IMAGE, ImageOptions::new())
                .await
                .unwrap();
            match &op {
                Op::Amend(opts) => img.amend(opts).await.unwrap(),
                Op::Write => {
                    let (off, len, byte) = WRITE;
                    img.write(off, &vec![byte; len as usize]).await.unwrap();
                    img.close().await.unwrap();
                }
            }
            done.push(Done {
                op,
                start,
                end: ctl.completed(),
            });
        }
        done
    });
    (ctl.log(), done)
}

/// What the disk must read after a crash at `at`, from `before` (the disk before the
/// workload).
fn check_content(disk: &[u8], before: &[u8], done: &[Done], at: u64) -> Result<(), String> {
    if disk.len() != before.len() {
        return Err(format!("size {} instead of {}", disk.len(), before.len()));
    }
    let (off, len, byte) = WRITE;
    let (written, w) = match done.iter().find(|d| matches!(d.op, Op::Write)) {
        Some(w) => (off as usize..(off + len) as usize, w),
        None => (0..0, &done[0]),
    };
    for (b, (&got, &old)) in disk.iter().zip(before).enumerate() {
        let ok = if !written.contains(&b) || w.start > at {
            got == old
        } else if w.end <= at {
            got == byte
        } else {
            got == old || got == byte
        };
        if !ok {
            return Err(format!(
                "byte {b:#x} reads {got:#04x} (before: {old:#04x}, the write: {byte:#04x})"
            ));
        }
    }
    Ok(())
}

/// `qemu-img check` finds no corruption (a dirty image repaired first).
fn qemu_clean(path: &Path) -> Result<(), String> {
    let head = std::fs::read(path).unwrap();
    let dirty = Header::parse(&head[..512])
        .map_err(|e| format!("the header does not parse: {e}"))?
        .is_dirty();
    let said = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    if dirty {
        let out = qemu_img_status(&["check", "-r", "all", path_str(path)]);
        if out.status.code() != Some(0) {
            return Err(format!("dirty image: check -r all: {}", said(&out)));
        }
    }
    let out = qemu_img_status(&["check", path_str(path)]);
    match out.status.code() {
        Some(0) | Some(3) => Ok(()),
        code => Err(format!("qemu-img check exit {code:?}: {}", said(&out))),
    }
}

async fn engine_disk(path: &Path) -> Result<Vec<u8>, String> {
    let img = Image::open(
        blockio::FileOpener,
        path,
        ImageOptions::new().read_only(true),
    )
    .await
    .map_err(|e| format!("our engine cannot open it: {e}"))?;
    let buf = img
        .read(0, img.size())
        .await
        .map_err(|e| format!("our engine cannot read it: {e}"))?;
    Ok(buf.to_vec())
}

/// Writes through our engine to the crashed image and closes it: it must stay clean.
async fn recover(path: &Path) -> Result<(), String> {
    let img = Image::open(blockio::FileOpener, path, ImageOptions::new())
        .await
        .map_err(|e| format!("recovery: open read-write: {e}"))?;
    img.write(0, &[0x77; 4096])
        .await
        .map_err(|e| format!("recovery: write: {e}"))?;
    img.close()
        .await
        .map_err(|e| format!("recovery: close: {e}"))?;
    qemu_clean(path).map_err(|e| format!("recovery: {e}"))
}

/// A further check of a crash image (its path).
type Extra<'a> = &'a dyn Fn(&Path) -> Result<(), String>;

fn check_crash(
    dir: &Path,
    crash: &CrashImage,
    before: &[u8],
    done: &[Done],
    n: u64,
    extra: Extra,
) -> Result<(), String> {
    let path = dir.join("crash.qcow2");
    std::fs::write(&path, &crash.bytes).unwrap();
    // Our engine reads it as the crash left it (a read-only open repairs nothing).
    let disk = runtime().block_on(engine_disk(&path))?;
    check_content(&disk, before, done, crash.at)?;
    qemu_clean(&path)?;
    extra(&path)?;
    if n % 7 == 0 {
        runtime().block_on(recover(&path))?;
    }
    Ok(())
}

/// Runs `ops` over `base` (whose disk reads `before`) and checks every crash image;
/// returns the number of requests and of distinct crash images.
fn crash_all(dir: &Path, base: &[u8], before: &[u8], ops: Vec<Op>, extra: Extra) -> (u64, u64) {
    let (log, done) = run_workload(base, ops);
    let total = log.iter().map(|e| e.seq + 1).max().unwrap_or(0);
    let mut seen = HashSet::new();
    let mut failures = Vec::new();
    let mut n = 0;
    for at in 0..=total {
        for variant in 0..VARIANTS {
            let tear = variant % 2 == 1;
            let spec = CrashSpec::new(at * VARIANTS + variant).at(at).tear(tear);
            let crash = CrashImage::from_log(&log, base, &spec);
            if !seen.insert(crash.bytes.clone()) {
                continue;
            }
            if let Err(e) = check_crash(dir, &crash, before, &done, n, extra) {
                failures.push(format!("crash at {at} (tear {tear}): {e}\n  {crash:?}"));
            }
            n += 1;
        }
        if failures.len() >= 5 {
            break;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    (total, n)
}

#[test]
fn crashes_during_amendments_leave_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (base, before) = base_image(dir.path());
    let (total, n) = crash_all(dir.path(), &base, &before, workload(), &|_| Ok(()));
    eprintln!("crash amend: {total} requests, {n} distinct crash images");
    assert!(total > 100, "the workload issued only {total} requests");
}

/// An upgrade of a version 2 image whose snapshot lacks the version 3 fields (the snapshot
/// table written anew), with a new refcount width: the snapshot, listed in every crash
/// image, reads as before.
#[test]
fn crashes_during_an_upgrade_with_snapshots_leave_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.qcow2");
    let size = SIZE.to_string();
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=512",
    ];
    qemu_img(&[&args[..], &[path_str(&path), &size]].concat());
    qemu_io("qcow2", &path, &["write -P 1 0 40k"]);
    qemu_img(&["snapshot", "-c", "s1", path_str(&path)]);
    qemu_io("qcow2", &path, &["write -P 3 4k 8k"]);
    assert_eq!(strip_snapshot_extra_data(&path), 1);
    let snapshot = raw_reference_snapshot(&path, "s1");
    let before = raw_reference(&path, "qcow2");
    let base = std::fs::read(&path).unwrap();
    let ops = vec![Op::Amend(
        AmendOptions::new()
            .compat(Compat::V3)
            .refcount_bits(8)
            .lazy_refcounts(true),
    )];
    let same_snapshot = |p: &Path| {
        if raw_reference_snapshot(p, "s1") == snapshot {
            Ok(())
        } else {
            Err("snapshot s1 reads otherwise".to_string())
        }
    };
    let (total, n) = crash_all(dir.path(), &base, &before, ops, &same_snapshot);
    eprintln!("crash amend (upgrade): {total} requests, {n} distinct crash images");
    assert!(total > 20, "the workload issued only {total} requests");
}
