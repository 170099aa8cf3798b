//! The race this project exists to kill, replayed step by step over the fault-injecting
//! backend: I/O on host cluster H is held in flight; the guest cluster that maps to H is
//! discarded (or zeroed with unmap, or overwritten while compressed) and the change written
//! back; another guest cluster is allocated; the held I/O is released. Every other guest
//! offset must still read what was last written there, and the image must check clean.
//!
//! Built with `--cfg qcow2_no_lease` the lease is a no-op, and these tests must fail: that
//! is the proof that they can see the race.

use blockio::{FaultController, FaultOpener, FileOpener, OpKind, RequestFilter};
use qcow2_engine::{Image, ImageOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CS: u64 = 65536;
const G0: u64 = 0; // the guest cluster whose host cluster is freed
const G1: u64 = 16 * CS; // a guest cluster allocated afterwards

type Img = Image<FaultOpener<FileOpener>>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

fn new_image(dir: &Path) -> PathBuf {
    let path = dir.join("race.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&path), "4M"]);
    path
}

async fn open(path: &Path) -> (Arc<Img>, FaultController) {
    let opener = FaultOpener::new(FileOpener);
    let ctl = opener.controller();
    let img = Image::open(opener, path, ImageOptions::new())
        .await
        .unwrap();
    (Arc::new(img), ctl)
}

/// The host offset of the cluster that guest offset `g` maps to.
async fn host_of(img: &Img, g: u64) -> u64 {
    let ext = img.block_status(g, CS).await.unwrap();
    match ext[0].kind {
        qcow2_engine::ExtentKind::Data { host, .. } => host,
        other => panic!("guest {g:#x} is not mapped to data: {other:?}"),
    }
}

/// Closes the image and checks the file: clean, and reading as `expect` says at G0 and G1.
async fn finish(img: Arc<Img>, path: &Path, g0: u8, g1: u8) {
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
    assert!(
        raw[G1 as usize..(G1 + CS) as usize]
            .iter()
            .all(|&b| b == g1),
        "guest cluster G1 lost its data to a late I/O on a reused cluster"
    );
    assert!(
        raw[G0 as usize..(G0 + CS) as usize]
            .iter()
            .all(|&b| b == g0),
        "G0"
    );
}

#[test]
fn held_write_discard_reallocate() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    rt().block_on(async {
        let (img, ctl) = open(&path).await;
        img.write(G0, &vec![0xaa; CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        let h = host_of(&img, G0).await;

        // 1. A guest write to H, held in flight.
        ctl.hold(RequestFilter::op(OpKind::Write).in_range(h..h + CS));
        let writer = {
            let img = img.clone();
            tokio::spawn(async move { img.write(G0, &vec![0xbb; CS as usize]).await })
        };
        let held = ctl.next_held().await;
        ctl.stop_holding();
        // 2. The discard unmaps H; the write-back makes it durable.
        img.discard(G0, CS).await.unwrap();
        img.flush().await.unwrap();
        // 3. A new allocation.
        img.write(G1, &vec![0xcc; CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        // 4. The late write lands.
        held.release_and_wait().await;
        writer.await.unwrap().unwrap();
        assert!(
            img.read(G1, CS).await.unwrap().iter().all(|&b| b == 0xcc),
            "G1 reads another guest's data"
        );
        finish(img, &path, 0, 0xcc).await;
    });
}

#[test]
fn held_read_discard_reallocate() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    rt().block_on(async {
        let (img, ctl) = open(&path).await;
        img.write(G0, &vec![0xaa; CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        let h = host_of(&img, G0).await;

        ctl.hold(RequestFilter::op(OpKind::Read).in_range(h..h + CS));
        let reader = {
            let img = img.clone();
            tokio::spawn(async move { img.read(G0, CS).await })
        };
        let held = ctl.next_held().await;
        ctl.stop_holding();
        img.discard(G0, CS).await.unwrap();
        img.flush().await.unwrap();
        img.write(G1, &vec![0xcc; CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        held.release_and_wait().await;
        let got = reader.await.unwrap().unwrap();
        assert!(
            got.iter().all(|&b| b == 0xaa),
            "a read that started before the discard returned another guest's data"
        );
        finish(img, &path, 0, 0xcc).await;
    });
}

#[test]
fn held_write_zero_unmap_reallocate() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    rt().block_on(async {
        let (img, ctl) = open(&path).await;
        img.write(G0, &vec![0xaa; CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        let h = host_of(&img, G0).await;
        ctl.hold(RequestFilter::op(OpKind::Write).in_range(h..h + CS));
        let writer = {
            let img = img.clone();
            tokio::spawn(async move { img.write(G0 + 4096, &[0xbb; 4096]).await })
        };
        let held = ctl.next_held().await;
        ctl.stop_holding();
        img.write_zeroes(G0, CS, true).await.unwrap();
        img.flush().await.unwrap();
        img.write(G1, &vec![0xcc; CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        held.release_and_wait().await;
        writer.await.unwrap().unwrap();
        finish(img, &path, 0, 0xcc).await;
    });
}

#[test]
fn held_punch_hole_reallocate() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path());
    rt().block_on(async {
        let (img, ctl) = open(&path).await;
        img.write(G0, &vec![0xaa; CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        let h = host_of(&img, G0).await;
        img.discard(G0, CS).await.unwrap();
        // The write-back frees H and punches it; the punch is held in flight.
        ctl.hold(RequestFilter::op(OpKind::PunchHole).in_range(h..h + CS));
        let flusher = {
            let img = img.clone();
            tokio::spawn(async move { img.flush().await })
        };
        let held = ctl.next_held().await;
        ctl.stop_holding();
        // Meanwhile a new allocation: it must not get H while the punch is pending.
        img.write(G1, &vec![0xcc; CS as usize]).await.unwrap();
        held.release_and_wait().await;
        flusher.await.unwrap().unwrap();
        assert!(
            img.read(G1, CS).await.unwrap().iter().all(|&b| b == 0xcc),
            "a deferred punch hit a reused cluster"
        );
        finish(img, &path, 0, 0xcc).await;
    });
}

#[test]
fn held_read_of_compressed_cluster_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    // A compressed cluster at G0, made by QEMU.
    let src = dir.path().join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&src), "4M"]);
    qcow2_tests::qemu_io("qcow2", &src, &["write -P 0xaa 0 64k"]);
    let path = dir.path().join("race.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        path_str(&src),
        path_str(&path),
    ]);
    rt().block_on(async {
        let (img, ctl) = open(&path).await;
        assert!(matches!(
            img.block_status(G0, CS).await.unwrap()[0].kind,
            qcow2_engine::ExtentKind::Compressed
        ));
        // Hold the read of the compressed data (any read below the first data cluster QEMU
        // would allocate next is the compressed span).
        ctl.hold(RequestFilter::op(OpKind::Read));
        let reader = {
            let img = img.clone();
            tokio::spawn(async move { img.read(G0, CS).await })
        };
        let held = ctl.next_held().await;
        ctl.stop_holding();
        // Overwrite part of the compressed cluster: copy-on-write to a new cluster, and the
        // compressed cluster loses its reference.
        img.write(G0, &[0xbb; 4096]).await.unwrap();
        img.flush().await.unwrap();
        img.write(G1, &vec![0xcc; 4 * CS as usize]).await.unwrap();
        img.flush().await.unwrap();
        held.release_and_wait().await;
        let got = reader.await.unwrap().unwrap();
        assert!(
            got.iter().all(|&b| b == 0xaa) || got[..4096].iter().all(|&b| b == 0xbb),
            "a read of a compressed cluster returned another guest's data"
        );
        Arc::try_unwrap(img).ok().unwrap().close().await.unwrap();
    });
    let check = qemu_check(&path);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let raw = raw_reference(&path, "qcow2");
    assert!(raw[..4096].iter().all(|&b| b == 0xbb));
    assert!(raw[4096..CS as usize].iter().all(|&b| b == 0xaa));
    assert!(raw[G1 as usize..(G1 + 4 * CS) as usize]
        .iter()
        .all(|&b| b == 0xcc));
}
