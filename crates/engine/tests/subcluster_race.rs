//! A write in place to an allocated subcluster, still in flight, must survive a concurrent
//! write to the same guest cluster whose subcluster-aligned copy-on-write reaches it.
//!
//! With extended L2 entries, a write that ends inside a subcluster pads itself to the
//! subcluster's end. When that subcluster is already allocated in the same host cluster, the
//! padding's "old contents" are the bytes at the very place being written: copying them onto
//! themselves is a read-modify-write that undoes any write in place landing between the read
//! and the write. The replay holds the in-place write, lets the other write read its padding,
//! releases the in-place write, then the other: bytes outside the second request must hold
//! the first one's data.

use blockio::{FaultOpener, FileOpener, OpKind, RequestFilter};
use qcow2_engine::{Image, ImageOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference};
use std::sync::Arc;

const CS: u64 = 65536;
const SC: u64 = CS / 32;

#[test]
fn write_in_place_survives_a_neighbours_subcluster_padding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536,extended_l2=on",
        path_str(&path),
        "1M",
    ]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    // Subclusters 2.. allocated with 0x11; 0 and 1 stay unallocated.
    let first = (2 * SC, CS - 2 * SC);
    // In place, inside allocated subclusters 4 and 5.
    let in_place = (4 * SC, 2 * SC);
    // Writes subclusters 0..4 and the start of 4: allocates 0 and 1, pads to the end of 4.
    // (A data write: write-zeroes would set the zero bits of 0..4, as QEMU does, and write
    // the start of 4 in place, padding nothing.)
    let second = (0, 4 * SC + 100);
    rt.block_on(async {
        let opener = FaultOpener::new(FileOpener);
        let ctl = opener.controller();
        let img = Arc::new(
            Image::open(opener, &path, ImageOptions::new())
                .await
                .unwrap(),
        );
        img.write(first.0, &vec![0x11; first.1 as usize])
            .await
            .unwrap();
        let host = match img.block_status(first.0, 1).await.unwrap()[0].kind {
            qcow2_engine::ExtentKind::Data { host, .. } => host - first.0,
            other => panic!("not mapped to data: {other:?}"),
        };

        ctl.hold(RequestFilter::op(OpKind::Write).in_range(host..host + CS));
        let writer = {
            let img = img.clone();
            tokio::spawn(async move {
                img.write(in_place.0, &vec![0xbb; in_place.1 as usize])
                    .await
            })
        };
        let held_in_place = ctl.next_held().await;
        let padder = {
            let img = img.clone();
            tokio::spawn(async move { img.write(second.0, &vec![0x22; second.1 as usize]).await })
        };
        let held_second = ctl.next_held().await;
        ctl.stop_holding();
        held_in_place.release_and_wait().await;
        writer.await.unwrap().unwrap();
        held_second.release_and_wait().await;
        padder.await.unwrap().unwrap();
        Arc::try_unwrap(img)
            .ok()
            .expect("no other user")
            .close()
            .await
            .unwrap();
    });

    let check = qemu_check(&path);
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    // The expected contents, from the three requests applied in the order they completed.
    let mut model = vec![0u8; 1 << 20];
    for (range, val) in [(first, 0x11), (in_place, 0xbb), (second, 0x22)] {
        model[range.0 as usize..(range.0 + range.1) as usize].fill(val);
    }
    let raw = raw_reference(&path, "qcow2");
    if let Some(i) = (0..model.len()).find(|&i| raw[i] != model[i]) {
        panic!(
            "byte {i:#x} reads {:#04x}, expected {:#04x}: the padding copied stale bytes back",
            raw[i], model[i]
        );
    }
}
