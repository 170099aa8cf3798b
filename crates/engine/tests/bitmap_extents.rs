//! `Image::bitmap_dirty_extents` against QEMU: bitmaps added with `qemu-img bitmap`, written
//! through by `qemu-io`, then read by the engine. The expected set is the bitmap's
//! definition: each write's range rounded out to the granularity, merged.

use blockio::FileOpener;
use qcow2_engine::{Error, Image, ImageOptions};
use qcow2_tests::{path_str, qemu_img};
use std::path::Path;

const SIZE: u64 = 64 << 20;

/// The writes done by qemu-io (offset, length), some unaligned, some adjacent.
const WRITES: &[(u64, u64)] = &[
    (0, 512),
    (65536, 4096),
    (70000, 100),
    (1 << 20, 3 << 20),
    (10 << 20, 1),
    (SIZE - 1024, 1024),
];

/// The granules `WRITES` touch at `granularity`, as merged byte ranges clipped to the disk.
fn expected(writes: &[(u64, u64)], granularity: u64) -> Vec<(u64, u64)> {
    let mut set = std::collections::BTreeSet::new();
    for &(o, l) in writes {
        for g in o / granularity..=(o + l - 1) / granularity {
            set.insert(g);
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for g in set {
        let (start, len) = (g * granularity, granularity.min(SIZE - g * granularity));
        match out.last_mut() {
            Some((o, l)) if *o + *l == start => *l += len,
            _ => out.push((start, len)),
        }
    }
    out
}

fn qemu_write(image: &Path, writes: &[(u64, u64)]) {
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write -P 0x5a {o} {l}"))
        .collect();
    qcow2_tests::qemu_io("qcow2", image, &cmds);
}

async fn extents(
    image: &Path,
    read_only: bool,
    name: &str,
) -> qcow2_engine::Result<Vec<(u64, u64)>> {
    let img = Image::open(FileOpener, image, ImageOptions::new().read_only(read_only)).await?;
    let r = img.bitmap_dirty_extents(name).await;
    img.close().await?;
    r
}

#[tokio::test]
async fn extents_match_qemu_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("b.qcow2");
    let p = path_str(&image);
    qemu_img(&["create", "-q", "-f", "qcow2", p, &SIZE.to_string()]);
    let grans = [512u64, 65536, 1 << 20, 1 << 31];
    for g in grans {
        qemu_img(&["bitmap", "--add", "-g", &g.to_string(), p, &format!("g{g}")]);
    }
    qemu_img(&["bitmap", "--add", "--disable", p, "off"]);
    qemu_img(&["bitmap", "--add", p, "cleared"]);
    qemu_write(&image, WRITES);
    qemu_img(&["bitmap", "--clear", p, "cleared"]);
    for ro in [true, false] {
        for g in grans {
            let got = extents(&image, ro, &format!("g{g}")).await.unwrap();
            assert_eq!(got, expected(WRITES, g), "granularity {g}, read-only {ro}");
        }
        assert_eq!(extents(&image, ro, "off").await.unwrap(), vec![]);
        assert_eq!(extents(&image, ro, "cleared").await.unwrap(), vec![]);
    }
    match extents(&image, true, "nope").await {
        Err(Error::Bitmap(m)) => assert_eq!(m, "Dirty bitmap 'nope' not found"),
        other => panic!("{other:?}"),
    }
}

/// While the image is open read-write, the engine's own writes show at once (from memory),
/// and what it stores at close is what QEMU then adds to.
#[tokio::test]
async fn extents_while_open_then_qemu_adds() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("b.qcow2");
    let p = path_str(&image);
    qemu_img(&["create", "-q", "-f", "qcow2", p, &SIZE.to_string()]);
    qemu_img(&["bitmap", "--add", "-g", "4096", p, "b"]);
    let ours = [(8192u64, 10u64), (5 << 20, 70000)];
    let img = Image::open(FileOpener, &image, ImageOptions::new())
        .await
        .unwrap();
    assert_eq!(img.bitmap_dirty_extents("b").await.unwrap(), vec![]);
    for &(o, l) in &ours {
        img.write(o, &vec![1u8; l as usize]).await.unwrap();
    }
    assert_eq!(
        img.bitmap_dirty_extents("b").await.unwrap(),
        expected(&ours, 4096)
    );
    img.close().await.unwrap();
    qemu_write(&image, WRITES);
    let all: Vec<(u64, u64)> = ours.iter().chain(WRITES).copied().collect();
    assert_eq!(
        extents(&image, true, "b").await.unwrap(),
        expected(&all, 4096)
    );
}

/// `bitmap_edit` on an image the engine has written to in the same session: the maintained
/// bitmap is stored first (with those writes), the edit applies on top, `qemu-img check`
/// finds no leak, and QEMU then keeps the new bitmap up to date.
#[tokio::test]
async fn edit_after_writes_in_the_same_session() {
    use qcow2_engine::BitmapAction;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("b.qcow2");
    let p = path_str(&image);
    qemu_img(&["create", "-q", "-f", "qcow2", p, &SIZE.to_string()]);
    let img = Image::open(FileOpener, &image, ImageOptions::new())
        .await
        .unwrap();
    let add = BitmapAction::Add {
        granularity: Some(65536),
    };
    img.bitmap_edit("a", std::slice::from_ref(&add))
        .await
        .unwrap();
    let img = Image::open(FileOpener, &image, ImageOptions::new())
        .await
        .unwrap();
    img.write(3 << 20, &[7u8; 100]).await.unwrap();
    assert_eq!(
        img.bitmap_dirty_extents("a").await.unwrap(),
        vec![(3 << 20, 65536)]
    );
    let actions = [add, BitmapAction::Merge("a".into()), BitmapAction::Disable];
    img.bitmap_edit("b", &actions).await.unwrap();
    let check = qcow2_tests::qemu_check(&image);
    assert!(check.status.success(), "{check:?}");
    assert!(!String::from_utf8_lossy(&check.stdout).contains("leaked"));
    qemu_write(&image, &[(0, 1)]);
    assert_eq!(
        extents(&image, true, "a").await.unwrap(),
        vec![(0, 65536), (3 << 20, 65536)]
    );
    assert_eq!(
        extents(&image, true, "b").await.unwrap(),
        vec![(3 << 20, 65536)]
    );
    let img = Image::open(FileOpener, &image, ImageOptions::new().read_only(true))
        .await
        .unwrap();
    match img.bitmap_edit("a", &[BitmapAction::Remove]).await {
        Err(Error::ReadOnly) => {}
        other => panic!("{other:?}"),
    }
}

/// The one-action helpers do what the actions do.
#[tokio::test]
async fn one_action_helpers() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("b.qcow2");
    let p = path_str(&image);
    qemu_img(&["create", "-q", "-f", "qcow2", p, &SIZE.to_string()]);
    let open = || Image::open(FileOpener, &image, ImageOptions::new());
    open()
        .await
        .unwrap()
        .bitmap_add("a", Some(4096), true)
        .await
        .unwrap();
    open()
        .await
        .unwrap()
        .bitmap_add("d", None, false)
        .await
        .unwrap();
    qemu_write(&image, &[(4096, 1)]);
    assert_eq!(extents(&image, true, "d").await.unwrap(), vec![]);
    open().await.unwrap().bitmap_merge("d", "a").await.unwrap();
    assert_eq!(extents(&image, true, "d").await.unwrap(), vec![(0, 65536)]);
    open().await.unwrap().bitmap_clear("a").await.unwrap();
    open()
        .await
        .unwrap()
        .bitmap_set_enabled("a", false)
        .await
        .unwrap();
    open()
        .await
        .unwrap()
        .bitmap_set_enabled("d", true)
        .await
        .unwrap();
    qemu_write(&image, &[(1 << 20, 1)]);
    assert_eq!(extents(&image, true, "a").await.unwrap(), vec![]);
    assert_eq!(
        extents(&image, true, "d").await.unwrap(),
        vec![(0, 65536), (1 << 20, 65536)]
    );
    open().await.unwrap().bitmap_remove("a").await.unwrap();
    let img = open().await.unwrap();
    let names: Vec<String> = img
        .bitmaps()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["d"]);
    img.close().await.unwrap();
    let check = qcow2_tests::qemu_check(&image);
    assert!(check.status.success(), "{check:?}");
}
