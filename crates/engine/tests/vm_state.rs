//! The VM state area (QEMU's `savevm` data, qemu-io's `write -b` / `read -b`) through the
//! API: what one writes, the other reads, across QEMU and us; a snapshot created with a VM
//! state size takes the area along and empties it in the active image, and applying the
//! snapshot brings it back; the image checks clean throughout.

use blockio::{FileOpener, IoBuf};
use qcow2_engine::{Error, Image, ImageOptions, SnapshotLookup, SnapshotOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, qemu_img_json, qemu_io};
use std::path::Path;

const K: u64 = 1024;
const M: u64 = 1024 * K;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn open(path: &Path) -> Image<FileOpener> {
    Image::open(FileOpener, path, ImageOptions::new())
        .await
        .unwrap()
}

async fn vm_read(img: &Image<FileOpener>, pos: u64, len: usize) -> Vec<u8> {
    let (r, buf) = img.vm_state_read_at(IoBuf::new(len), pos).await;
    r.unwrap();
    buf.to_vec()
}

async fn vm_write(img: &Image<FileOpener>, pos: u64, len: usize, byte: u8) {
    let mut buf = IoBuf::new(len);
    buf.fill(byte);
    img.vm_state_write_at(buf, pos).await.0.unwrap();
}

#[test]
fn vm_state_is_shared_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&p), "3M"]);
    // QEMU writes (past one L1 entry's span, so the L1 table grows), we read.
    qemu_io(
        "qcow2",
        &p,
        &["write -b -P 0x11 0 64k", "write -b -P 0x22 600M 4k"],
    );
    runtime().block_on(async {
        let img = open(&p).await;
        assert_eq!(vm_read(&img, 0, 64 * K as usize).await, vec![0x11; 65536]);
        assert_eq!(vm_read(&img, 600 * M, 4096).await, vec![0x22; 4096]);
        assert_eq!(vm_read(&img, 300 * M, 512).await, vec![0; 512]);
        // The guest disk is untouched, and ends where it did.
        assert_eq!(img.read(0, 3 * M).await.unwrap().to_vec(), vec![0; 3 << 20]);
        assert!(matches!(
            img.read(3 * M, 512).await,
            Err(Error::OutOfRange { .. })
        ));
        // We write (growing the L1 table further), QEMU reads.
        vm_write(&img, 2000 * M, 8 * K as usize, 0x33).await;
        vm_write(&img, 4 * K, 4 * K as usize, 0x44).await;
        img.close().await.unwrap();
    });
    qemu_check(&p);
    qemu_io(
        "qcow2",
        &p,
        &[
            "read -b -P 0x33 2000M 8k",
            "read -b -P 0x11 0 4k",
            "read -b -P 0x44 4k 4k",
            "read -b -P 0x11 8k 56k",
            "read -b -P 0x22 600M 4k",
        ],
    );
}

#[test]
fn a_snapshot_takes_the_vm_state_and_apply_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("savevm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&p), "1M"]);
    runtime().block_on(async {
        let img = open(&p).await;
        img.write(0, &[0x55; 4096]).await.unwrap();
        vm_write(&img, 0, 128 * K as usize, 0x66).await;
        let sn = img
            .snapshot_create_with(
                "vm1",
                SnapshotOptions::new()
                    .vm_state_size(100 * K)
                    .vm_clock_nsec(7_000_000_123),
            )
            .await
            .unwrap();
        assert_eq!(
            (sn.vm_state_size, sn.vm_clock_nsec),
            (100 * K, 7_000_000_123)
        );
        // The active image's copy of the first 100 KiB (two whole clusters) is gone; the
        // rest of the area stays.
        assert_eq!(vm_read(&img, 0, 128 * K as usize).await, vec![0; 131072]);
        img.close().await.unwrap();
    });
    qemu_check(&p);
    let info = qemu_img_json(&["info", "--output=json", path_str(&p)]);
    let snap = &info["snapshots"][0];
    assert_eq!(snap["vm-state-size"], 100 * K);
    assert_eq!(snap["vm-clock-sec"], 7);
    assert_eq!(snap["vm-clock-nsec"], 123);
    runtime().block_on(async {
        let img = open(&p).await;
        img.write(0, &[0x77; 4096]).await.unwrap();
        img.snapshot_apply(SnapshotLookup::Name("vm1"))
            .await
            .unwrap();
        assert_eq!(vm_read(&img, 0, 128 * K as usize).await, vec![0x66; 131072]);
        assert_eq!(img.read(0, 4096).await.unwrap().to_vec(), vec![0x55; 4096]);
        img.close().await.unwrap();
    });
    qemu_check(&p);
    qemu_io(
        "qcow2",
        &p,
        &["read -b -P 0x66 0 128k", "read -P 0x55 0 4k"],
    );
}
