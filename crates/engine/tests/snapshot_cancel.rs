//! Snapshot operations whose futures are dropped midway (invariant I9): each of create,
//! delete and apply runs with every write held, is let through `k` writes and then dropped,
//! for every `k` until it completes. The held writes land afterwards (as the kernel would
//! finish them); the image is closed and must pass `qemu-img check` without corruption
//! (a leak is allowed), list a snapshot table qemu-img reads, and take another snapshot.

use blockio::{FaultOpener, FileOpener, OpKind, RequestFilter};
use qcow2_engine::{Image, ImageOptions, SnapshotLookup};
use qcow2_tests::{path_str, qemu_check, qemu_img};
use std::path::Path;

type Img = Image<FaultOpener<FileOpener>>;

#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Delete,
    Apply,
}

async fn run(img: &Img, op: Op) {
    match op {
        Op::Create => drop(img.snapshot_create("new").await.unwrap()),
        Op::Delete => drop(
            img.snapshot_delete(SnapshotLookup::Name("a"))
                .await
                .unwrap(),
        ),
        Op::Apply => drop(img.snapshot_apply(SnapshotLookup::Name("a")).await.unwrap()),
    }
}

/// Runs `op` with writes held, letting `k` of them through before dropping it; whether it
/// completed first.
async fn dropped_after(path: &Path, op: Op, k: usize) -> bool {
    let opener = FaultOpener::new(FileOpener);
    let ctl = opener.controller();
    // Runs the held writes of the dropped future once they are released.
    let driver = tokio::task::spawn_local(opener.orphan_driver());
    let img = Image::open(opener, path, ImageOptions::new())
        .await
        .unwrap();
    ctl.hold(RequestFilter::op(OpKind::Write));
    let completed = {
        let mut fut = std::pin::pin!(run(&img, op));
        let mut released = 0;
        loop {
            tokio::select! {
                () = &mut fut => break true,
                held = ctl.next_held() => {
                    if released == k {
                        break false;
                    }
                    held.release();
                    released += 1;
                }
            }
        }
    };
    // The future is gone: what it left in flight lands now.
    ctl.stop_holding();
    ctl.release_all();
    img.close().await.unwrap();
    driver.abort();
    completed
}

#[test]
fn dropped_snapshot_operations_leave_a_consistent_image() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for op in [Op::Create, Op::Delete, Op::Apply] {
        for k in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.qcow2");
            let p = path_str(&path);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                p,
                "256K",
            ]);
            qcow2_tests::qemu_io("qcow2", &path, &["write -P 1 0 32k"]);
            qemu_img(&["snapshot", "-c", "a", p]);
            qcow2_tests::qemu_io("qcow2", &path, &["write -P 2 8k 16k"]);
            let completed = {
                // Dropped at the end of the block with the orphan driver and its file.
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, dropped_after(&path, op, k))
            };
            let check = qemu_check(&path);
            let code = check.status.code();
            assert!(
                code == Some(0) || code == Some(3),
                "{op:?} dropped after {k} writes: qemu-img check exit {code:?}\n{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            qemu_img(&["snapshot", "-l", p]);
            rt.block_on(async {
                let img = Image::open(FileOpener, &path, ImageOptions::new())
                    .await
                    .unwrap();
                img.snapshot_create("after").await.unwrap();
                img.close().await.unwrap();
            });
            let check = qemu_check(&path);
            assert!(
                matches!(check.status.code(), Some(0 | 3)),
                "{op:?} dropped after {k} writes, then a create: {check:?}"
            );
            if completed {
                break;
            }
        }
    }
}
