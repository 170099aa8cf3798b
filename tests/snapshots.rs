//! Internal snapshots through the engine's API: snapshots QEMU made read through
//! `Image::snapshot_view` as `qemu-img convert -l` reads them (read-only and read-write
//! opens, over a backing file too), and a view's snapshot deleted under it.

use blockio::FileOpener;
use qcow2_engine::{Error, ExtentKind, Image, ImageOptions, SnapshotLookup};
use qcow2_tests::{path_str, qemu_img, qemu_io, raw_reference_snapshot};
use std::path::Path;

/// Reads every byte of snapshot `name` of `img` through a view, in unaligned pieces.
async fn read_snapshot(img: &Image<FileOpener>, name: &str) -> Vec<u8> {
    let view = img
        .snapshot_view(SnapshotLookup::IdOrName(name))
        .await
        .unwrap();
    assert_eq!(view.snapshot().name, name);
    let mut out = Vec::new();
    let step = 65536 + 1536;
    let mut off = 0;
    while off < view.size() {
        let n = step.min(view.size() - off);
        out.extend_from_slice(&view.read(off, n).await.unwrap());
        off += n;
    }
    out
}

/// An image with snapshots a, b and c, qemu-io writing between them.
fn qemu_made(dir: &Path, backing: Option<&Path>) -> std::path::PathBuf {
    let image = dir.join("s.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"];
    let b;
    if let Some(backing) = backing {
        b = format!("backing_file={},backing_fmt=raw", path_str(backing));
        args.extend(["-o", &b]);
    }
    args.extend([path_str(&image), "1M"]);
    qemu_img(&args);
    qemu_io(
        "qcow2",
        &image,
        &["write -P 1 0 64k", "write -c -P 2 128k 4k"],
    );
    qemu_img(&["snapshot", "-c", "a", path_str(&image)]);
    qemu_io("qcow2", &image, &["write -P 3 4k 8k", "write -z 128k 4k"]);
    qemu_img(&["snapshot", "-c", "b", path_str(&image)]);
    qemu_io("qcow2", &image, &["discard 0 64k", "write -P 4 900k 3k"]);
    qemu_img(&["snapshot", "-c", "c", path_str(&image)]);
    qemu_io("qcow2", &image, &["write -P 5 0 1M"]);
    image
}

#[tokio::test]
async fn snapshots_qemu_made_read_as_qemu_img_convert_l() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("b.raw");
    std::fs::write(&backing, vec![0x6b; 1 << 20]).unwrap();
    for backing in [None, Some(backing.as_path())] {
        let image = qemu_made(dir.path(), backing);
        let expected: Vec<_> = ["a", "b", "c"]
            .map(|n| raw_reference_snapshot(&image, n))
            .into();
        for read_only in [true, false] {
            let opts = ImageOptions::new().read_only(read_only);
            let img = Image::open(FileOpener, &image, opts).await.unwrap();
            for (name, expected) in ["a", "b", "c"].iter().zip(&expected) {
                let ours = read_snapshot(&img, name).await;
                assert!(
                    &ours == expected,
                    "snapshot {name} (backing {backing:?}, read_only {read_only})"
                );
            }
            img.close().await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_view_of_a_deleted_snapshot_fails_and_the_others_read_on() {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_made(dir.path(), None);
    let expected_c = raw_reference_snapshot(&image, "c");
    let img = Image::open(FileOpener, &image, ImageOptions::new())
        .await
        .unwrap();
    let b = img.snapshot_view(SnapshotLookup::Name("b")).await.unwrap();
    let c = img.snapshot_view(SnapshotLookup::Name("c")).await.unwrap();
    let deleted = img
        .snapshot_delete(SnapshotLookup::Name("b"))
        .await
        .unwrap();
    assert_eq!(deleted.name, "b");
    assert!(matches!(
        b.read(0, 4096).await,
        Err(Error::SnapshotNotFound { .. })
    ));
    // Another snapshot's view looks again, finds its snapshot, and reads on.
    assert_eq!(&c.read(0, 1 << 20).await.unwrap()[..], &expected_c[..]);
    drop((b, c));
    // The engine's own check of the open image sees the header as it is now.
    img.snapshot_create("d").await.unwrap();
    img.flush().await.unwrap();
    let report = img.check().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    img.close().await.unwrap();
    let check = qcow2_tests::qemu_check(&image);
    assert!(check.status.success(), "{check:?}");
}

/// Runs of one kind (`'d'` data, `'z'` zeros, `'u'` unallocated), adjacent ones merged.
fn merged(runs: impl IntoIterator<Item = (u64, u64, char)>) -> Vec<(u64, u64, char)> {
    let mut out: Vec<(u64, u64, char)> = Vec::new();
    for (start, len, kind) in runs {
        match out.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == start => last.1 += len,
            _ => out.push((start, len, kind)),
        }
    }
    out
}

#[tokio::test]
async fn a_views_block_status_is_the_applied_snapshots_map() {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_made(dir.path(), None);
    let img = Image::open(FileOpener, &image, ImageOptions::new().read_only(true))
        .await
        .unwrap();
    for name in ["a", "b", "c"] {
        // QEMU's view: the snapshot applied to a copy, mapped.
        let copy = dir.path().join(format!("{name}.qcow2"));
        std::fs::copy(&image, &copy).unwrap();
        qemu_img(&["snapshot", "-a", name, path_str(&copy)]);
        let map = qcow2_tests::qemu_map_json(&copy);
        let theirs = merged(map.as_array().unwrap().iter().map(|e| {
            let kind = match (e["present"] == true, e["zero"] == true) {
                (false, _) => 'u',
                (true, true) => 'z',
                (true, false) => 'd',
            };
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                kind,
            )
        }));
        let view = img.snapshot_view(SnapshotLookup::Name(name)).await.unwrap();
        let ours = merged(
            view.block_status(0, 1 << 20)
                .await
                .unwrap()
                .iter()
                .map(|e| {
                    let kind = match e.kind {
                        ExtentKind::Unallocated { .. } => 'u',
                        ExtentKind::Zero { .. } => 'z',
                        ExtentKind::Data { .. } | ExtentKind::Compressed => 'd',
                    };
                    (e.offset, e.len, kind)
                }),
        );
        assert_eq!(ours, theirs, "snapshot {name}");
    }
    img.close().await.unwrap();
}
