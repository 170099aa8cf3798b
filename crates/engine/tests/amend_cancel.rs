//! Amendments whose futures are dropped midway (invariant I9): a refcount width change
//! (widening, narrowing, and with a downgrade to version 2) runs with every write held, is
//! let through `k` writes and then dropped, for every `k` until it completes. The image
//! goes with the future (amend consumes it, so nothing closes it); the held writes land
//! afterwards, as the kernel would finish them. The file must pass `qemu-img check` without
//! corruption (a leak is allowed), read as before, and take the same amendment again.

use blockio::{FaultOpener, FileOpener, OpKind, RequestFilter};
use qcow2_engine::{AmendOptions, Compat, Image, ImageOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, qemu_io, raw_reference};
use std::path::Path;

/// Runs `opts` with writes held, letting `k` of them through before dropping it; whether it
/// completed first.
async fn dropped_after(path: &Path, opts: &AmendOptions, k: usize) -> bool {
    let opener = FaultOpener::new(FileOpener);
    let ctl = opener.controller();
    // Runs the held writes of the dropped future once they are released.
    let driver = tokio::task::spawn_local(opener.orphan_driver());
    let img = Image::open(opener, path, ImageOptions::new())
        .await
        .unwrap();
    ctl.hold(RequestFilter::op(OpKind::Write));
    let last = {
        let mut fut = std::pin::pin!(img.amend(opts));
        let mut released = 0;
        loop {
            tokio::select! {
                r = &mut fut => {
                    r.unwrap();
                    break None;
                }
                held = ctl.next_held() => {
                    if released == k {
                        break Some(held);
                    }
                    held.release();
                    released += 1;
                }
            }
        }
    };
    // The future, and the image with it, are gone. The amendment writes one request at a
    // time, so the write it waited for is the only one in flight: it lands now, as the
    // kernel would finish it.
    ctl.stop_holding();
    let completed = last.is_none();
    if let Some(held) = last {
        held.release_and_wait().await;
    }
    assert_eq!(ctl.held_count(), 0, "a request still held");
    driver.abort();
    completed
}

fn check_clean(path: &Path, what: &str) {
    let check = qemu_check(path);
    let code = check.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "{what}: qemu-img check exit {code:?}\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn dropped_width_changes_leave_a_consistent_image() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = AmendOptions::new;
    let cases = [
        ("refcount_bits=16", a().refcount_bits(64)),
        ("refcount_bits=64", a().refcount_bits(2)),
        ("refcount_bits=8", a().compat(Compat::V2).refcount_bits(16)),
    ];
    let mut points = 0;
    for (created, opts) in cases {
        for k in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.qcow2");
            let p = path_str(&path);
            let o = format!("cluster_size=512,{created}");
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, p, "256K"]);
            qemu_io("qcow2", &path, &["write -P 1 0 40k", "write -z 64k 4k"]);
            let before = raw_reference(&path, "qcow2");
            let completed = {
                // Dropped at the end of the block with the orphan driver and its file.
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, dropped_after(&path, &opts, k))
            };
            let what = format!("{opts:?} on {created}, dropped after {k} writes");
            check_clean(&path, &what);
            assert!(
                raw_reference(&path, "qcow2") == before,
                "{what}: the data changed"
            );
            rt.block_on(async {
                let img = Image::open(FileOpener, &path, ImageOptions::new())
                    .await
                    .unwrap();
                img.amend(&opts).await.unwrap();
            });
            check_clean(&path, &format!("{what}, then amended again"));
            assert!(
                raw_reference(&path, "qcow2") == before,
                "{what}, then amended again: the data changed"
            );
            points += 1;
            if completed {
                break;
            }
        }
    }
    eprintln!("amend cancel: {points} drop points");
    assert!(points > 20, "only {points} drop points");
}
