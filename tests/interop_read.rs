//! Reading what QEMU writes: every fixture of the matrix, built at test time by qemu-img and
//! qemu-io, read by the engine over each backend and compared byte for byte with
//! `qemu-img convert -O raw`.

use blockio::{FileOpener, IoBuf, Opener, UringOpener};
use qcow2_engine::{Disk, Image, ImageOptions};
use qcow2_tests::{matrix, random_ranges, Fixture};
use std::path::Path;

/// Random ranges read per fixture and backend (plus the whole disk once).
const RANGES: usize = 150;

async fn check_reads<O: Opener>(opener: O, f: &Fixture, reference: &[u8], direct: bool) {
    let opts = ImageOptions::new().read_only(true).direct(direct);
    let img = Image::open(opener, &f.image, opts)
        .await
        .unwrap_or_else(|e| panic!("{}: open failed: {e}", f.name));
    assert_eq!(img.size(), f.virtual_size, "{}: virtual size", f.name);
    assert_eq!(reference.len() as u64, f.virtual_size);

    // The whole disk, in reads that are not cluster multiples.
    let step = 3 * 65536 + 4096;
    let mut off = 0;
    while off < img.size() {
        let n = step.min(img.size() - off);
        let buf = img
            .read(off, n)
            .await
            .unwrap_or_else(|e| panic!("{}: read {off:#x}+{n:#x}: {e}", f.name));
        let o = off as usize;
        if buf[..] != reference[o..o + buf.len()] {
            let i = buf
                .iter()
                .zip(&reference[o..])
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "{} (direct={direct}): byte {:#x} differs from qemu-img convert",
                f.name,
                off + i as u64
            );
        }
        off += n;
    }

    // Random ranges, unaligned, into a window in the middle of a larger buffer (the bytes
    // around the window must stay untouched).
    let seed = f
        .name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31) ^ u64::from(b));
    for (off, len) in random_ranges(seed, img.size(), RANGES, 300_000) {
        let len = len as usize;
        let mut buf = IoBuf::new(len + 1024);
        buf.as_full_mut_slice().fill(0xee);
        buf.set_window(512..512 + len);
        let (res, buf) = img.read_at(buf, off).await;
        res.unwrap_or_else(|e| panic!("{}: read {off:#x}+{len:#x}: {e}", f.name));
        assert_eq!(
            buf.window(),
            512..512 + len,
            "the window comes back as it was"
        );
        let o = off as usize;
        assert!(
            buf[..] == reference[o..o + len],
            "{} (direct={direct}): range {off:#x}+{len:#x} differs from qemu-img convert",
            f.name
        );
        let all = buf.as_full_slice();
        assert!(
            all[..512]
                .iter()
                .chain(&all[512 + len..])
                .all(|&b| b == 0xee),
            "{}: bytes outside the window were written",
            f.name
        );
    }
    assert!(img.leases().is_empty(), "{}: leases left behind", f.name);

    // Reading past the end is a typed error.
    let err = img.read(img.size() - 1, 2).await.unwrap_err();
    assert!(
        matches!(err, qcow2_engine::Error::OutOfRange { .. }),
        "{}: {err}",
        f.name
    );
}

#[test]
fn every_fixture_reads_like_qemu_on_every_backend() {
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    for spec in matrix() {
        let f = spec.build();
        let reference = f.raw_reference();
        multi.block_on(check_reads(FileOpener, &f, &reference, false));
        blockio::uring_builder().start(check_reads(UringOpener, &f, &reference, false));
        // O_DIRECT exercises the bounce path of unaligned guest reads and compressed data.
        if matches!(
            spec.name,
            "cluster-512" | "compressed-zstd-4k" | "chain" | "extl2-64k"
        ) {
            multi.block_on(check_reads(FileOpener, &f, &reference, true));
            blockio::uring_builder().start(check_reads(UringOpener, &f, &reference, true));
        }
    }
}

#[test]
fn concurrent_readers_see_qemus_bytes() {
    // Many tasks on a multi-thread runtime reading overlapping ranges of one image.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    for name in ["compressed-zlib-rewritten", "chain", "extl2-backing"] {
        let f = qcow2_tests::fixture(name).build();
        let reference = std::sync::Arc::new(f.raw_reference());
        rt.block_on(async {
            let img = std::sync::Arc::new(
                Image::open(FileOpener, &f.image, ImageOptions::new().read_only(true))
                    .await
                    .unwrap(),
            );
            let mut tasks = Vec::new();
            for t in 0..16u64 {
                let (img, reference) = (img.clone(), reference.clone());
                tasks.push(tokio::spawn(async move {
                    for (off, len) in random_ranges(t, img.size(), 60, 200_000) {
                        let buf = img.read(off, len).await.unwrap();
                        let o = off as usize;
                        assert!(buf[..] == reference[o..o + len as usize]);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            assert!(img.leases().is_empty());
        });
    }
}

#[test]
fn disk_probes_raw_and_qcow2() {
    let f = qcow2_tests::fixture("chain").build();
    let reference = f.raw_reference();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let d = Disk::open(
            FileOpener,
            &f.image,
            None,
            ImageOptions::new().read_only(true),
        )
        .await
        .unwrap();
        assert_eq!(d.format(), qcow2_engine::ImageFormat::Qcow2);
        // Walk to the bottom of the chain: the raw base.
        let mut layer = &d;
        let mut depth = 0;
        while let Some(b) = layer.backing() {
            layer = b;
            depth += 1;
        }
        assert_eq!(depth, 2);
        assert_eq!(layer.format(), qcow2_engine::ImageFormat::Raw);
        let raw = Disk::open(
            FileOpener,
            layer.path(),
            None,
            ImageOptions::new().read_only(true),
        )
        .await
        .unwrap();
        assert_eq!(raw.format(), qcow2_engine::ImageFormat::Raw);
        let top = d.read(0, reference.len() as u64).await.unwrap();
        assert!(top[..] == reference[..]);
    });
}

#[test]
fn backing_loop_and_depth_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    qcow2_tests::qemu_img(&["create", "-q", "-f", "qcow2", &s(&a), "1M"]);
    qcow2_tests::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &s(&a),
        "-F",
        "qcow2",
        &s(&b),
    ]);
    // Make a point back at b: qemu-img rebase -u edits the header without checking.
    qcow2_tests::qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        &s(&b),
        "-F",
        "qcow2",
        &s(&a),
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let err = Image::open(FileOpener, &b, ImageOptions::new().read_only(true))
            .await
            .err()
            .expect("a loop must be refused");
        assert!(
            matches!(err, qcow2_engine::Error::BackingLoop { .. }),
            "{err}"
        );

        // A chain deeper than the limit.
        let mut prev = a.clone();
        qcow2_tests::qemu_img(&["rebase", "-u", "-f", "qcow2", "-b", "", &s(&a)]);
        for i in 0..4 {
            let next = dir.path().join(format!("l{i}.qcow2"));
            qcow2_tests::qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &s(&prev),
                "-F",
                "qcow2",
                &s(&next),
            ]);
            prev = next;
        }
        let err = Image::open(
            FileOpener,
            &prev,
            ImageOptions::new().read_only(true).max_backing_depth(3),
        )
        .await
        .err()
        .expect("too deep");
        assert!(
            matches!(
                err,
                qcow2_engine::Error::BackingChainTooDeep { limit: 3, .. }
            ),
            "{err}"
        );
        Image::open(
            FileOpener,
            &prev,
            ImageOptions::new().read_only(true).max_backing_depth(4),
        )
        .await
        .expect("four levels below are within a limit of four");
    });
}
