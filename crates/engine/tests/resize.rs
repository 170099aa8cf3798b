//! `Image::resize` as an API: what it refuses (typed, with QEMU's messages, and nothing
//! changed), what requests see around a shrink, and cancellation (I9): a resize whose future
//! is dropped at any of its backend requests leaves an image that closes clean (no
//! corruption, no leak in `qemu-img check`) and that a second resize finishes.
//! (qimg resize against qemu-img resize is crates/cli/tests/resize_cli.rs; the shrink racing
//! in-flight I/O is resize_race.rs.)

use blockio::{
    FaultController, FaultOpener, FileOpener, MemoryBackend, MemoryOpener, RequestFilter,
};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use qcow2_engine::{Error, Image, ImageOptions, Preallocation, ResizeError, ResizeOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, qemu_io, raw_reference};
use std::path::{Path, PathBuf};
use std::rc::Rc;

fn create(dir: &Path, opts: &str, size: &str) -> PathBuf {
    let path = dir.join("img.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        path_str(&path),
        size,
    ]);
    path
}

async fn open(path: &Path) -> Image<FileOpener> {
    Image::open(FileOpener, path, ImageOptions::new())
        .await
        .unwrap()
}

/// Resizes as asked, expecting `want`; the image (closed) must be byte for byte as before.
async fn refused(path: &Path, size: u64, options: ResizeOptions, want: ResizeError, msg: &str) {
    let before = std::fs::read(path).unwrap();
    let img = open(path).await;
    let old = img.size();
    match img.resize(size, options).await {
        Err(Error::Resize(e)) => {
            assert_eq!(e, want);
            assert_eq!(Error::Resize(e).to_string(), msg);
        }
        other => panic!("resize to {size}: {other:?}, expected {want:?}"),
    }
    assert_eq!(img.size(), old);
    img.close().await.unwrap();
    assert!(
        std::fs::read(path).unwrap() == before,
        "a refused resize wrote"
    );
}

#[test]
fn refusals_are_typed_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let d = dir.path();
        let p = create(d, "cluster_size=65536", "1M");
        qemu_io("qcow2", &p, &["write -P 0xab 0 1M"]);
        let grow = ResizeOptions::new();
        let shrink = ResizeOptions::new().shrink(true);
        let not = ResizeError::ShrinkNotAllowed {
            size: 1 << 20,
            new_size: 512 << 10,
        };
        let msg = "Use the --shrink option to perform a shrink operation.";
        refused(&p, 512 << 10, grow, not, msg).await;
        let msg = "The new size must be a multiple of 512";
        refused(
            &p,
            (2 << 20) + 1,
            grow,
            ResizeError::Unaligned((2 << 20) + 1),
            msg,
        )
        .await;
        let full = shrink.preallocation(Preallocation::Full);
        let msg = "Preallocation can't be used for shrinking an image";
        refused(&p, 512 << 10, full, ResizeError::PreallocationShrink, msg).await;

        let p = create(d, "cluster_size=512", "1M");
        let msg = "Failed to grow the L1 table: File too large";
        refused(&p, 200 << 30, grow, ResizeError::TooLarge(200 << 30), msg).await;

        let p = create(d, "compat=0.10", "1M");
        qemu_img(&["snapshot", "-c", "s1", path_str(&p)]);
        let msg = "Can't resize a v2 image which has snapshots";
        refused(&p, 2 << 20, grow, ResizeError::V2Snapshots, msg).await;

        let p = create(d, "cluster_size=65536", "1M");
        qemu_img(&["bitmap", "--add", path_str(&p), "b0"]);
        // Left in use by a crash: QEMU's words (crates/cli/tests/resize_cli.rs).
        qcow2_tests::qemu_io_abort("qcow2", &p, &["write 0 4k"]);
        let msg = "Bitmap 'b0' is inconsistent and cannot be used\n\
                   Try block-dirty-bitmap-remove to delete this bitmap from disk";
        let e = ResizeError::InconsistentBitmap("b0".into());
        refused(&p, 2 << 20, grow, e.clone(), msg).await;
        refused(&p, 512 << 10, shrink, e, msg).await;

        let base = d.join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "2M"]);
        let top = d.join("top.qcow2");
        let args = ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b"];
        qemu_img(
            &[
                &args[..],
                &[path_str(&base), "-F", "qcow2", path_str(&top), "1M"],
            ]
            .concat(),
        );
        let msg = "Failed to zero out new clusters: Operation not supported";
        refused(&top, 3 << 20, grow, ResizeError::CannotZeroNewArea, msg).await;

        let ro = Image::open(FileOpener, &top, ImageOptions::new().read_only(true))
            .await
            .unwrap();
        assert!(matches!(
            ro.resize(1 << 20, shrink).await,
            Err(Error::ReadOnly)
        ));
    });
}

/// Once a shrink has begun nothing is written past the new end, and what lay there is gone
/// for good: grown back, the area reads zeros.
#[test]
fn requests_past_the_new_end_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let p = create(dir.path(), "cluster_size=65536", "4M");
        let img = open(&p).await;
        img.write(2 << 20, &[0xaa; 65536]).await.unwrap();
        img.resize(1 << 20, ResizeOptions::new().shrink(true))
            .await
            .unwrap();
        assert_eq!(img.size(), 1 << 20);
        let e = img.write(2 << 20, &[1; 512]).await.unwrap_err();
        assert!(
            matches!(e, Error::OutOfRange { size, .. } if size == 1 << 20),
            "{e}"
        );
        assert!(img.read(1 << 20, 512).await.is_err());
        img.resize(4 << 20, ResizeOptions::new()).await.unwrap();
        assert!(img
            .read(2 << 20, 65536)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        img.close().await.unwrap();
        assert!(qemu_check(&p).status.success());
    });
}

/// One resize, cut short: (image options, size, data, target size, options).
struct Cut {
    opts: &'static str,
    size: &'static str,
    fill: &'static str,
    target: u64,
    options: ResizeOptions,
    /// With persistent bitmaps (512-byte granules, one enabled, one disabled): a drop may
    /// leave them inconsistent, never sized for the wrong disk while clean.
    bitmaps: bool,
}

/// Resizes as `cut` asks; a bitmap a dropped resize left inconsistent is refused, as QEMU
/// refuses it: it is removed (`qemu-img bitmap --remove`) and the resize tried again.
async fn resize_again(path: &Path, cut: &Cut) {
    loop {
        let img = open(path).await;
        match img.resize(cut.target, cut.options).await {
            Ok(()) => return img.close().await.unwrap(),
            Err(Error::Resize(ResizeError::InconsistentBitmap(name))) if cut.bitmaps => {
                img.bitmap_remove(&name).await.unwrap();
            }
            Err(e) => panic!("resize again: {e}"),
        }
    }
}

/// Runs `cut`'s resize over memory, holding every backend request and dropping the resize's
/// future at request `k` (None: never); the held request lands afterwards, as the kernel
/// would let it. Returns whether the resize was dropped (false: it finished first).
fn cut_at(cut: &Cut, k: Option<usize>) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let path = create(dir.path(), cut.opts, cut.size);
    if cut.bitmaps {
        let p = path_str(&path);
        qemu_img(&["bitmap", "--add", "-g", "512", p, "on"]);
        qemu_img(&["bitmap", "--add", "-g", "512", "--disable", p, "off"]);
    }
    qemu_io("qcow2", &path, &[cut.fill]);
    let want = raw_reference(&path, "qcow2");
    let mem = MemoryOpener::new();
    mem.insert(
        &path,
        MemoryBackend::from_vec(std::fs::read(&path).unwrap()),
    );
    let opener = FaultOpener::new(mem.clone());
    let ctl: FaultController = opener.controller();
    let mut pool = LocalPool::new();
    pool.spawner().spawn_local(opener.orphan_driver()).unwrap();
    let img = Rc::new(
        pool.run_until(Image::open(opener, &path, ImageOptions::new()))
            .unwrap(),
    );
    ctl.hold(RequestFilter::any());
    let task = {
        let img = img.clone();
        let (target, options) = (cut.target, cut.options);
        pool.spawner()
            .spawn_local_with_handle(async move { img.resize(target, options).await })
            .unwrap()
    };
    pool.run_until_stalled();
    let mut n = 0;
    let mut dropped = false;
    let mut task = Some(task);
    while let Some(held) = ctl.try_next_held() {
        if Some(n) == k {
            drop(task.take());
            pool.run_until_stalled();
            assert!(held.is_orphan(), "the resize's future was not dropped");
            dropped = true;
        }
        held.release();
        pool.run_until_stalled();
        n += 1;
    }
    ctl.stop_holding();
    if let Some(t) = task {
        pool.run_until(t).unwrap();
    }
    // Closed (whatever was left half done is finished by its write-back), then resized again.
    let img = Rc::try_unwrap(img).ok().expect("no other user");
    pool.run_until(img.close()).unwrap();
    let check_path = dir.path().join("after.qcow2");
    std::fs::write(&check_path, mem.get(&path).unwrap().snapshot()).unwrap();
    let check = qemu_check(&check_path);
    assert!(
        check.status.success(),
        "{} -> {} dropped at request {k:?}: qemu-img check: {}",
        cut.size,
        cut.target,
        String::from_utf8_lossy(&check.stdout)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(resize_again(&check_path, cut));
    assert!(qemu_check(&check_path).status.success());
    let got = raw_reference(&check_path, "qcow2");
    assert_eq!(got.len() as u64, cut.target);
    let kept = want.len().min(got.len());
    assert!(
        got[..kept] == want[..kept],
        "dropped at {k:?}: data below the smaller end changed"
    );
    assert!(
        got[kept..].iter().all(|&b| b == 0),
        "dropped at {k:?}: the new area is not zeros"
    );
    dropped
}

#[test]
fn a_resize_dropped_at_any_request_leaves_a_clean_image() {
    let cuts = [
        Cut {
            opts: "cluster_size=512",
            size: "64K",
            fill: "write -P 0xab 0 64K",
            target: 3 << 20,
            options: ResizeOptions::new(),
            bitmaps: false,
        },
        Cut {
            opts: "cluster_size=512",
            size: "1M",
            fill: "write -P 0xcd 0 1M",
            target: 100 << 10,
            options: ResizeOptions::new().shrink(true),
            bitmaps: false,
        },
        Cut {
            opts: "cluster_size=4096",
            size: "1M",
            fill: "write -P 0xef 0 1000K",
            target: 2 << 20,
            options: ResizeOptions::new().preallocation(Preallocation::Metadata),
            bitmaps: false,
        },
        Cut {
            opts: "cluster_size=4096",
            size: "1M",
            fill: "write -P 0x12 0 1M",
            target: 2 << 20,
            options: ResizeOptions::new().preallocation(Preallocation::Falloc),
            bitmaps: false,
        },
        // The bitmaps' tables grow from one entry to two.
        Cut {
            opts: "cluster_size=512",
            size: "64K",
            fill: "write -P 0xab 0 64K",
            target: 3 << 20,
            options: ResizeOptions::new(),
            bitmaps: true,
        },
        // And shrink from two to one.
        Cut {
            opts: "cluster_size=512",
            size: "3M",
            fill: "write -P 0xcd 2M 16K",
            target: 100 << 10,
            options: ResizeOptions::new().shrink(true),
            bitmaps: true,
        },
    ];
    for cut in &cuts {
        assert!(!cut_at(cut, None), "nothing dropped");
        let mut k = 0;
        while cut_at(cut, Some(k)) {
            k += 1;
        }
        assert!(k > 5, "{} -> {}: only {k} requests", cut.size, cut.target);
    }
}

/// The enabled bitmaps go on recording writes after a resize of the open image, also past
/// the old end, and a shrink drops what lay past the new end; the disabled one keeps its
/// bits. Read back after close, as QEMU would store them.
#[test]
fn bitmaps_record_writes_across_resizes() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "cluster_size=512", "1M");
    qemu_img(&["bitmap", "--add", "-g", "512", path_str(&p), "on"]);
    qemu_img(&["bitmap", "--add", "-g", "512", path_str(&p), "off"]);
    qemu_io("qcow2", &p, &["write 900k 4k"]);
    qemu_img(&["bitmap", "--disable", path_str(&p), "off"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let img = open(&p).await;
        img.write(0, &[1; 4096]).await.unwrap();
        img.resize(3 << 20, ResizeOptions::new()).await.unwrap();
        img.write(2 << 20, &[2; 4096]).await.unwrap();
        let on = img.bitmap_dirty_extents("on").await.unwrap();
        assert_eq!(on, [(0, 4096), (900 << 10, 4096), (2 << 20, 4096)]);
        let shrink = ResizeOptions::new().shrink(true);
        img.resize(1536 << 10, shrink).await.unwrap();
        img.write(1 << 20, &[3; 512]).await.unwrap();
        img.close().await.unwrap();
        assert!(qemu_check(&p).status.success());
        let ro = Image::open(FileOpener, &p, ImageOptions::new().read_only(true))
            .await
            .unwrap();
        let on = ro.bitmap_dirty_extents("on").await.unwrap();
        assert_eq!(on, [(0, 4096), (900 << 10, 4096), (1 << 20, 512)]);
        let off = ro.bitmap_dirty_extents("off").await.unwrap();
        assert_eq!(off, [(900 << 10, 4096)]);
        ro.close().await.unwrap();
    });
}
