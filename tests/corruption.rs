//! Corruption: refcounts that call live metadata free are refused by a read-write open
//! (nothing written); corruption found while running marks the image corrupt on disk (as QEMU
//! does), writes stop, and the image then opens read-only only.

use blockio::FileOpener;
use qcow2_engine::{Error, Image, ImageOptions};
use qcow2_format::{Header, L1Entry, RefcountWidth, ReftableEntry};
use qcow2_tests::{path_str, qemu_img, qemu_info_json, qemu_io};
use std::path::{Path, PathBuf};

fn image_with_data(dir: &Path) -> PathBuf {
    let path = dir.join("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&path), "64M"]);
    qemu_io("qcow2", &path, &["write -P 0x11 0 64k"]);
    path
}

/// (header, L2 table offset of L1 entry 0)
fn layout(path: &Path) -> (Header, u64) {
    let data = std::fs::read(path).unwrap();
    let h = Header::parse(&data).unwrap();
    let l1 = h.l1_table_offset as usize;
    let e = L1Entry(u64::from_be_bytes(data[l1..l1 + 8].try_into().unwrap()));
    let l2 = e.l2_offset(&h.geometry()).unwrap().unwrap().0;
    (h, l2)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// An L2 table whose refcount is 0 would be handed out by the allocator and overwritten: the
/// read-write open refuses the image as corrupt and writes nothing; it still opens read-only.
#[test]
fn uncounted_l2_table_is_refused_by_a_read_write_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = image_with_data(dir.path());
    let (h, l2) = layout(&path);
    // Damage: the L2 table's refcount drops to 0, so the allocator would hand it out.
    let mut data = std::fs::read(&path).unwrap();
    let rt_off = h.refcount_table_offset as usize;
    let block = ReftableEntry(u64::from_be_bytes(
        data[rt_off..rt_off + 8].try_into().unwrap(),
    ))
    .block_offset(h.geometry().cluster_size())
    .unwrap()
    .unwrap()
    .0 as usize;
    let width = RefcountWidth::from_order(h.refcount_order).unwrap();
    let cs = h.geometry().cluster_size() as usize;
    width
        .set(&mut data[block..block + cs], l2 / cs as u64, 0)
        .unwrap();
    std::fs::write(&path, &data).unwrap();

    rt().block_on(async {
        let err = Image::open(FileOpener, &path, ImageOptions::new())
            .await
            .err()
            .expect("a read-write open of an image with an uncounted L2 table");
        assert!(err.is_corruption(), "{err}");
        assert!(err.to_string().contains("metadata"), "{err}");
    });
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the refused open wrote to the image"
    );
    // The data QEMU wrote still reads.
    rt().block_on(async {
        let ro = Image::open(FileOpener, &path, ImageOptions::new().read_only(true))
            .await
            .unwrap();
        assert!(ro.read(0, 65536).await.unwrap().iter().all(|&b| b == 0x11));
    });
}

#[test]
fn l2_entry_past_the_end_found_by_a_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = image_with_data(dir.path());
    let (_, l2) = layout(&path);
    let mut data = std::fs::read(&path).unwrap();
    // Guest cluster 0 now points far past the end of the file.
    let entry = (1u64 << 63) | (1u64 << 40);
    data[l2 as usize..l2 as usize + 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(&path, &data).unwrap();
    let before = std::fs::read(&path).unwrap();
    rt().block_on(async {
        // Read-only: a typed error, nothing written.
        let ro = Image::open(FileOpener, &path, ImageOptions::new().read_only(true))
            .await
            .unwrap();
        let err = ro.read(0, 512).await.unwrap_err();
        assert!(err.is_corruption(), "{err}");
        assert!(err.to_string().contains("past the end"), "{err}");
    });
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "read-only open changed the file"
    );
    rt().block_on(async {
        let img = Image::open(FileOpener, &path, ImageOptions::new())
            .await
            .unwrap();
        assert!(img.read(0, 512).await.unwrap_err().is_corruption());
        let err = img.write(1 << 20, &[1; 512]).await.unwrap_err();
        assert!(matches!(err, Error::MarkedCorrupt(_)), "{err}");
    });
    assert_eq!(
        qemu_info_json(&path)["format-specific"]["data"]["corrupt"],
        true
    );
}
