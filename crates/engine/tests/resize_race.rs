//! A shrink racing I/O on a cluster past the new end, replayed step by step over the
//! fault-injecting backend (the lease rule, I2 and I3): a read (or a write in place) of
//! host cluster H, which maps guest cluster FAR, is held in flight; the image shrinks below
//! FAR, which unmaps H, writes the change back, and cuts the file after the last cluster
//! still counted; another guest cluster is allocated; the held I/O is released.
//!
//! With leases, H stays counted (and in the file) until the I/O is over: the read returns
//! FAR's old data, the late write lands in a cluster nobody else uses, and the new cluster
//! goes elsewhere. Built with `--cfg qcow2_no_lease` the lease is a no-op: H is freed and
//! cut off at once, the new allocation gets H, and the read returns another guest's data (or
//! the late write overwrites it). scripts/must-fail.sh requires both tests to fail so.

use blockio::{FaultController, FaultOpener, FileOpener, OpKind, RequestFilter};
use qcow2_engine::{Image, ImageOptions, ResizeOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CS: u64 = 65536;
/// The guest cluster past the new end whose host cluster the held I/O touches.
const FAR: u64 = 2 << 20;
/// The new size.
const NEW: u64 = 1 << 20;
/// A guest cluster allocated after the shrink.
const G0: u64 = 0;

type Img = Image<FaultOpener<FileOpener>>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

/// A 4 MiB image whose only data is FAR's cluster (0xaa), open over the fault injector.
async fn setup(dir: &Path) -> (PathBuf, Arc<Img>, FaultController, u64) {
    let path = dir.join("race.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&path), "4M"]);
    let opener = FaultOpener::new(FileOpener);
    let ctl = opener.controller();
    let img = Image::open(opener, &path, ImageOptions::new())
        .await
        .unwrap();
    img.write(FAR, &vec![0xaa; CS as usize]).await.unwrap();
    img.flush().await.unwrap();
    let h = match img.block_status(FAR, CS).await.unwrap()[0].kind {
        qcow2_engine::ExtentKind::Data { host, .. } => host,
        other => panic!("FAR is not mapped to data: {other:?}"),
    };
    (path, Arc::new(img), ctl, h)
}

/// The shrink (H unmapped, freed when it can be, the file cut), then a new allocation.
async fn shrink_and_allocate(img: &Img) {
    img.resize(NEW, ResizeOptions::new().shrink(true))
        .await
        .unwrap();
    assert_eq!(img.size(), NEW);
    img.write(G0, &vec![0xcc; CS as usize]).await.unwrap();
    img.flush().await.unwrap();
}

/// Closes the image; the file must check clean (no leak either: H is freed once its I/O is
/// over) and read 0xcc at G0, at the new size.
async fn finish(img: Arc<Img>, path: &Path) {
    Arc::try_unwrap(img)
        .ok()
        .expect("no other user")
        .close()
        .await
        .unwrap();
    let check = qemu_check(path);
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let raw = raw_reference(path, "qcow2");
    assert_eq!(raw.len() as u64, NEW);
    assert!(
        raw[..CS as usize].iter().all(|&b| b == 0xcc),
        "G0 lost its data to a late I/O on a cluster the shrink freed"
    );
}

#[test]
fn held_read_past_the_new_end_keeps_its_cluster() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (path, img, ctl, h) = setup(dir.path()).await;
        ctl.hold(RequestFilter::op(OpKind::Read).in_range(h..h + CS));
        let reader = {
            let img = img.clone();
            tokio::spawn(async move { img.read(FAR, CS).await })
        };
        let held = ctl.next_held().await;
        ctl.stop_holding();
        shrink_and_allocate(&img).await;
        held.release_and_wait().await;
        let got = reader.await.unwrap().unwrap();
        assert!(
            got.iter().all(|&b| b == 0xaa),
            "a read that began before the shrink returned {:#04x}, not FAR's data",
            got.iter().find(|&&b| b != 0xaa).unwrap()
        );
        finish(img, &path).await;
    });
}

#[test]
fn held_write_past_the_new_end_lands_in_its_own_cluster() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (path, img, ctl, h) = setup(dir.path()).await;
        ctl.hold(RequestFilter::op(OpKind::Write).in_range(h..h + CS));
        let writer = {
            let img = img.clone();
            tokio::spawn(async move { img.write(FAR, &vec![0xbb; CS as usize]).await })
        };
        let held = ctl.next_held().await;
        ctl.stop_holding();
        shrink_and_allocate(&img).await;
        held.release_and_wait().await;
        // Accepted before the shrink, the write completes (into a cluster now unmapped).
        writer.await.unwrap().unwrap();
        assert!(
            img.read(G0, CS).await.unwrap().iter().all(|&b| b == 0xcc),
            "G0 reads another guest's data"
        );
        finish(img, &path).await;
    });
}
