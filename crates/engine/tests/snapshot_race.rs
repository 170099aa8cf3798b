//! A snapshot deleted while a read of it is in flight (issue 13, invariant I3), replayed
//! step by step over the fault-injecting backend: a read through a `SnapshotView` of a
//! cluster only the snapshot reaches is held in flight; the snapshot is deleted and the
//! change written back; new guest clusters are allocated; the held read is released. It must
//! read the snapshot's data (its cluster was not handed out under it), every new cluster
//! must read what was written there, and once the read is done the next write-back frees
//! the cluster: the image checks clean, without a leak.
//!
//! Built with `--cfg qcow2_no_lease` the lease is a no-op, and this test must fail
//! (scripts/must-fail.sh): the proof that it can see the race.

use blockio::{FaultOpener, FileOpener, OpKind, RequestFilter};
use qcow2_engine::{ExtentKind, Image, ImageOptions, SnapshotLookup};
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference};

const CS: u64 = 65536;
const G0: u64 = 0; // the guest cluster the snapshot keeps
const G1: u64 = 16 * CS; // guest clusters allocated after the delete
const NEW: u64 = 8;

#[test]
fn held_snapshot_read_delete_reallocate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&path), "4M"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opener = FaultOpener::new(FileOpener);
        let ctl = opener.controller();
        let img = Image::open(opener, &path, ImageOptions::new())
            .await
            .unwrap();
        img.write(G0, &vec![0xaa; CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        let h = match img.block_status(G0, CS).await.unwrap()[0].kind {
            ExtentKind::Data { host, .. } => host,
            other => panic!("G0 is not data: {other:?}"),
        };
        img.snapshot_create("s").await.unwrap();
        // The active layer copies G0 away: H is the snapshot's alone.
        img.write(G0, &vec![0xbb; CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        let view = img.snapshot_view(SnapshotLookup::Name("s")).await.unwrap();

        // 1. A read of the snapshot's H, held in flight.
        ctl.hold(RequestFilter::op(OpKind::Read).in_range(h..h + CS));
        let reader = view.read(G0, CS);
        let racer = async {
            let held = ctl.next_held().await;
            ctl.stop_holding();
            // 2. The snapshot is deleted; its unmapping is durable.
            img.snapshot_delete(SnapshotLookup::Name("s"))
                .await
                .unwrap();
            img.flush().await.unwrap();
            // 3. New allocations, enough to take every cluster that was freed.
            img.write(G1, &vec![0xcc; (NEW * CS) as usize])
                .await
                .unwrap();
            img.flush().await.unwrap();
            // 4. The late read.
            held.release_and_wait().await;
        };
        let (read, ()) = futures::join!(reader, racer);
        let read = read.unwrap();
        assert!(
            read.iter().all(|&b| b == 0xaa),
            "the read of the deleted snapshot saw its cluster reused"
        );
        drop(view);
        // 5. Nothing holds H any more: the next write-back frees it.
        img.flush().await.unwrap();
        img.close().await.unwrap();
    });
    let check = qemu_check(&path);
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let raw = raw_reference(&path, "qcow2");
    assert!(raw[..CS as usize].iter().all(|&b| b == 0xbb), "G0");
    assert!(
        raw[G1 as usize..(G1 + NEW * CS) as usize]
            .iter()
            .all(|&b| b == 0xcc),
        "the new clusters"
    );
}
