//! A snapshot created while a guest write is in flight (issue 13): the creation waits for
//! it (guest changes hold a token of the image's writers tracker, and creation waits for the
//! I/O tracker too), so the snapshot holds the write and the write is not lost behind the
//! copy-on-write that follows. Not a proof that the writers tracker itself is needed: the
//! I/O tracker alone also keeps this schedule waiting (the gap the writers tracker closes, a
//! write between its plan and its I/O token, is not replayed here).

use blockio::{FaultOpener, FileOpener, OpKind, RequestFilter};
use qcow2_engine::{Image, ImageOptions, SnapshotLookup};
use qcow2_tests::{path_str, qemu_check, qemu_img};

const CS: u64 = 65536;
const G0: u64 = 0;

/// The snapshot waits for the held write, holds it, and the active layer changes on.
#[test]
fn create_waits_for_a_write_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("create.qcow2");
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
        // An in-place write, held in flight.
        ctl.hold(RequestFilter::op(OpKind::Write).in_range(0..u64::MAX));
        let writer = img.write(G0, &[0xbb; 4096]);
        let racer = async {
            let held = ctl.next_held().await;
            ctl.stop_holding();
            let mut create = std::pin::pin!(img.snapshot_create("s"));
            assert!(
                futures::poll!(create.as_mut()).is_pending(),
                "the snapshot did not wait for the write in flight"
            );
            held.release_and_wait().await;
            create.await.unwrap()
        };
        let (written, snapshot) = futures::join!(writer, racer);
        written.unwrap();
        assert_eq!(snapshot.id, "1");
        // The active layer changes on; the snapshot keeps what was acknowledged before it.
        img.write(G0, &[0xcc; 4096]).await.unwrap();
        let view = img.snapshot_view(SnapshotLookup::Name("s")).await.unwrap();
        let seen = view.read(G0, 8192).await.unwrap();
        assert!(seen[..4096].iter().all(|&b| b == 0xbb), "the held write");
        assert!(seen[4096..].iter().all(|&b| b == 0xaa), "the data before");
        drop(view);
        img.close().await.unwrap();
    });
    let check = qemu_check(&path);
    assert!(check.status.success(), "{check:?}");
}
