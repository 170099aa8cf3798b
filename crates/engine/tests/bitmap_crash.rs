//! A crash at any point of `Image::bitmap_edit` leaves the old bitmaps or the new ones, never
//! a dangling reference: for every crash point of the edit's log (each with a torn write and
//! a random surviving subset of the volatile writes), `qemu-img check` finds no corruption
//! (leaked clusters allowed) and the bitmap reads as before or as after.

use blockio::{CrashSpec, FaultOpener, FileOpener};
use qcow2_engine::{BitmapAction, Image, ImageOptions};
use qcow2_tests::{path_str, qemu_img, qemu_img_status, qemu_io};
use std::path::Path;

async fn extents(image: &Path, name: &str) -> Option<Vec<(u64, u64)>> {
    let opts = ImageOptions::new().read_only(true);
    let img = Image::open(FileOpener, image, opts).await.ok()?;
    let e = img.bitmap_dirty_extents(name).await.ok();
    img.close().await.unwrap();
    e
}

#[tokio::test]
async fn a_crash_leaves_old_or_new_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("b.qcow2");
    let p = path_str(&image);
    qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"]);
    qemu_img(&["bitmap", "--add", "-g", "512", p, "a"]);
    qemu_img(&["bitmap", "--add", p, "keep"]);
    qemu_io("qcow2", &image, &["write 0 64k", "write 4M 1M"]);
    let base = std::fs::read(&image).unwrap();
    let before = extents(&image, "a").await.unwrap();
    let kept = extents(&image, "keep").await.unwrap();
    assert!(!before.is_empty());

    let opener = FaultOpener::new(FileOpener);
    let ctl = opener.controller();
    let img = Image::open(opener, &image, ImageOptions::new())
        .await
        .unwrap();
    ctl.clear_log();
    let actions = [BitmapAction::Clear, BitmapAction::Disable];
    img.bitmap_edit("a", &actions).await.unwrap();
    let after = extents(&image, "a").await.unwrap();
    assert_ne!(after, before);
    let n = ctl.log().len() as u64;
    assert!(n > 5, "the edit logged {n} requests");
    let crashed = dir.path().join("crash.qcow2");
    for at in 0..=n {
        for seed in 0..3 {
            let spec = CrashSpec::new(seed).at(at).tear(seed == 2);
            let crash = ctl.crash(&base, &spec);
            std::fs::write(&crashed, &crash.bytes).unwrap();
            let check = qemu_img_status(&["check", path_str(&crashed)]);
            let code = check.status.code();
            assert!(
                code == Some(0) || code == Some(3),
                "crash {crash:?}: qemu-img check:\n{}",
                String::from_utf8_lossy(&check.stdout)
            );
            let got = extents(&crashed, "a").await;
            assert!(
                got.as_ref() == Some(&before) || got.as_ref() == Some(&after),
                "crash {crash:?}: bitmap a reads {got:?}"
            );
            assert_eq!(extents(&crashed, "keep").await.as_ref(), Some(&kept));
        }
    }
}
