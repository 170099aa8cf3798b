//! A crash at any point of a resize of an image with persistent bitmaps (docs/DESIGN.md,
//! "Resizing") leaves an image QEMU and the engine open, that `qemu-img check` finds without
//! corruption (leaked clusters allowed), at the old size or the new one, with every bitmap as
//! before, as after, or marked in use (inconsistent, as QEMU treats a bitmap a crash left
//! in use): never a clean bitmap whose table does not fit the disk. For every crash point of
//! the resize's log, with a torn write and random surviving subsets of the volatile writes.

use blockio::{CrashSpec, FaultOpener, FileOpener};
use qcow2_engine::{Error, Image, ImageOptions, ResizeOptions};
use qcow2_tests::{path_str, qemu_img, qemu_img_status, qemu_io};
use std::path::Path;

const BITMAPS: [&str; 3] = ["fine", "coarse", "off"];

/// What a bitmap reads as: its dirty extents, or None when it is inconsistent.
type Seen = Option<Vec<(u64, u64)>>;

/// The image's size and its bitmaps, read by the engine (the open must succeed).
async fn state(image: &Path) -> (u64, Vec<Seen>) {
    let opts = ImageOptions::new().read_only(true);
    let img = Image::open(FileOpener, image, opts)
        .await
        .unwrap_or_else(|e| panic!("open: {e}"));
    let mut seen = Vec::new();
    for name in BITMAPS {
        seen.push(match img.bitmap_dirty_extents(name).await {
            Ok(e) => Some(e),
            Err(Error::Bitmap(m)) if m.contains("inconsistent") => None,
            Err(e) => panic!("bitmap {name}: {e}"),
        });
    }
    let size = img.size();
    img.close().await.unwrap();
    (size, seen)
}

async fn crash_resize(dir: &Path, new_size: u64, options: ResizeOptions) {
    let image = dir.join("b.qcow2");
    let p = path_str(&image);
    // 512-byte granules: 3M needs two bitmap data clusters, 5M three, 700K one.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p,
        "3M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "512", p, "fine"]);
    qemu_img(&["bitmap", "--add", "-g", "64k", p, "coarse"]);
    qemu_img(&["bitmap", "--add", "-g", "512", "--disable", p, "off"]);
    qemu_io(
        "qcow2",
        &image,
        &["write 0 8k", "write 900k 124k", "write 2600k 4k"],
    );
    qemu_img(&["bitmap", "--merge", "fine", p, "off"]);
    let base = std::fs::read(&image).unwrap();
    let before = state(&image).await;

    let opener = FaultOpener::new(FileOpener);
    let ctl = opener.controller();
    let img = Image::open(opener, &image, ImageOptions::new())
        .await
        .unwrap();
    ctl.clear_log();
    img.resize(new_size, options).await.unwrap();
    img.close().await.unwrap();
    let after = state(&image).await;
    assert_eq!(after.0, new_size);
    if new_size < before.0 {
        assert_ne!(after.1, before.1, "the shrink cuts bits");
    }
    assert!(after.1.iter().all(Option::is_some), "stored clean at close");
    let n = ctl.log().len() as u64;
    assert!(n > 10, "the resize logged {n} requests");
    let crashed = dir.join("crash.qcow2");
    for at in 0..=n {
        for seed in 0..3 {
            let spec = CrashSpec::new(seed).at(at).tear(seed == 2);
            let crash = ctl.crash(&base, &spec);
            std::fs::write(&crashed, &crash.bytes).unwrap();
            let check = qemu_img_status(&["check", path_str(&crashed)]);
            let code = check.status.code();
            assert!(
                code == Some(0) || code == Some(3),
                "crash {crash:?}: qemu-img check:\n{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            let (size, seen) = state(&crashed).await;
            assert!(
                size == before.0 || size == new_size,
                "crash {crash:?}: size {size}"
            );
            for (i, s) in seen.iter().enumerate() {
                assert!(
                    s.is_none() || *s == before.1[i] && size == before.0 || *s == after.1[i],
                    "crash {crash:?} (size {size}): bitmap {} reads {s:?}",
                    BITMAPS[i]
                );
            }
            // A read-write open loads the bitmaps (and would store them at close).
            let img = Image::open(FileOpener, &crashed, ImageOptions::new())
                .await
                .unwrap_or_else(|e| panic!("crash {crash:?}: read-write open: {e}"));
            img.close().await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_crash_in_a_grow_leaves_old_new_or_inconsistent_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    crash_resize(dir.path(), 5 << 20, ResizeOptions::new()).await;
}

#[tokio::test]
async fn a_crash_in_a_shrink_leaves_old_new_or_inconsistent_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    crash_resize(dir.path(), 700 << 10, ResizeOptions::new().shrink(true)).await;
}
