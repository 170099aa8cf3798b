//! The write path against an in-memory model: random writes, write-zeroes and discards
//! through the engine, then the image must read back exactly as the model says (through the
//! engine and through `qemu-img convert`), and `qemu-img check` must find nothing wrong.

use blockio::FileOpener;
use qcow2_engine::{Image, ImageOptions};
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference, Prng};
use std::path::Path;

/// One random operation.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

fn random_ops(seed: u64, size: u64, cluster: u64, n: usize) -> Vec<Op> {
    let mut r = Prng::new(seed);
    (0..n)
        .map(|i| {
            let unaligned = r.chance(33);
            let len = if unaligned {
                1 + r.below(3 * cluster)
            } else {
                (1 + r.below(4)) * cluster
            };
            let len = len.min(size);
            let mut off = r.below(size - len + 1);
            if !unaligned {
                off = off / cluster * cluster;
            }
            match r.below(10) {
                0..=5 => Op::Write {
                    off,
                    len,
                    pat: (i % 250 + 1) as u8,
                },
                6 | 7 => Op::Zero {
                    off,
                    len,
                    unmap: r.chance(50),
                },
                8 => Op::Discard { off, len },
                _ => Op::Flush,
            }
        })
        .collect()
}

/// What the disk reads after `ops`, given its contents before (QEMU's discard semantics:
/// only whole clusters change, to zeros; nothing changes in a v2 image over a backing file).
fn apply(model: &mut [u8], ops: &[Op], cluster: u64, v2_backing: bool) {
    let size = model.len() as u64;
    for op in ops {
        match *op {
            Op::Write { off, len, pat } => {
                model[off as usize..(off + len) as usize].fill(pat);
            }
            Op::Zero { off, len, .. } => model[off as usize..(off + len) as usize].fill(0),
            Op::Discard { off, len } => {
                let first = off.div_ceil(cluster) * cluster;
                let end = off + len;
                let last = if end == size {
                    end
                } else {
                    end / cluster * cluster
                };
                // A v2 image over a backing file keeps its data (it cannot hide the backing).
                if first < last && !v2_backing {
                    model[first as usize..last as usize].fill(0);
                }
            }
            Op::Flush => {}
        }
    }
}

async fn run_ops(path: &Path, ops: &[Op]) {
    let img = Image::open(FileOpener, path, ImageOptions::new())
        .await
        .unwrap();
    for op in ops {
        match *op {
            Op::Write { off, len, pat } => img
                .write(off, &vec![pat; len as usize])
                .await
                .unwrap_or_else(|e| panic!("{op:?}: {e}")),
            Op::Zero { off, len, unmap } => img
                .write_zeroes(off, len, unmap)
                .await
                .unwrap_or_else(|e| panic!("{op:?}: {e}")),
            Op::Discard { off, len } => img
                .discard(off, len)
                .await
                .unwrap_or_else(|e| panic!("{op:?}: {e}")),
            Op::Flush => img.flush().await.unwrap(),
        }
    }
    img.close().await.unwrap();
}

fn check_image(name: &str, opts: &str, size: u64, cluster: u64, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        let size_s = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([path_str(&path), &size_s]);
        qemu_img(&args);
        let ops = random_ops(seed, size, cluster, 60);
        let mut model = vec![0u8; size as usize];
        apply(&mut model, &ops, cluster, false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(run_ops(&path, &ops));
        let check = qemu_check(&path);
        assert!(
            check.status.success(),
            "{name} seed {seed}: qemu-img check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let got = raw_reference(&path, "qcow2");
        if got != model {
            let i = got.iter().zip(&model).position(|(a, b)| a != b).unwrap();
            panic!(
                "{name} seed {seed}: byte {i:#x} is {:#x}, the model says {:#x}; ops {ops:?}",
                got[i], model[i]
            );
        }
    }
}

#[test]
fn writes_zeroes_discards_64k() {
    check_image("64k", "", 8 << 20, 65536, 0..6);
}

#[test]
fn writes_zeroes_discards_512_byte_clusters() {
    // Small clusters: many L2 tables, refcount blocks and a growing refcount table.
    check_image("512", "cluster_size=512", 2 << 20, 512, 0..4);
}

#[test]
fn writes_zeroes_discards_v2() {
    check_image("v2", "compat=0.10", 4 << 20, 65536, 0..4);
}

#[test]
fn writes_zeroes_discards_extended_l2() {
    check_image(
        "extl2",
        "extended_l2=on,cluster_size=32k",
        4 << 20,
        32768,
        0..4,
    );
}

#[test]
fn writes_zeroes_discards_refcount_widths() {
    for bits in [1, 2, 4, 8, 32, 64] {
        check_image(
            &format!("refcount-{bits}"),
            &format!("refcount_bits={bits},cluster_size=4k"),
            1 << 20,
            4096,
            0..2,
        );
    }
}

/// Every fixture QEMU wrote, written further by the engine: backing files, compressed
/// clusters, snapshots (shared clusters), data files, preallocation, every cluster size.
#[test]
fn writes_over_every_fixture() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for spec in qcow2_tests::matrix() {
        let f = spec.build();
        let cluster = spec.expect.cluster_size;
        let before = f.raw_reference();
        let v2_backing = spec.expect.compat == "0.10" && spec.expect.backing_depth > 0;
        let ops = random_ops(
            f.name.len() as u64 * 977,
            f.virtual_size,
            cluster.max(4096),
            40,
        );
        let mut model = before.clone();
        apply(&mut model, &ops, cluster, v2_backing);
        rt.block_on(run_ops(&f.image, &ops));
        let check = qemu_check(&f.image);
        assert!(
            check.status.success(),
            "{}: qemu-img check after our writes: {}{}",
            f.name,
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let got = raw_reference(&f.image, "qcow2");
        if got != model {
            let i = got.iter().zip(&model).position(|(a, b)| a != b).unwrap();
            panic!(
                "{}: byte {i:#x} is {:#x}, the model says {:#x}",
                f.name, got[i], model[i]
            );
        }
    }
}

/// Persistent bitmaps stay true: the enabled bitmap gets the bits of the granules written
/// (and only those), the disabled one is untouched, neither is left in use, and QEMU finds
/// the image clean.
#[test]
fn writes_mark_the_enabled_bitmap() {
    use qcow2_format::{BitmapDirectoryEntry, BitmapTableEntry, Header};
    let f = qcow2_tests::fixture("bitmap").build();
    let read_bitmaps = |path: &Path| -> Vec<(String, u32, Vec<u8>)> {
        let data = std::fs::read(path).unwrap();
        let h = Header::parse(&data).unwrap();
        let ext = h.bitmaps().unwrap();
        let cs = h.geometry().cluster_size();
        let d = ext.directory_offset as usize;
        let dir = BitmapDirectoryEntry::parse_directory(
            &data[d..d + ext.directory_size as usize],
            ext.nb_bitmaps,
        )
        .unwrap();
        dir.iter()
            .map(|e| {
                let granules = h.size.div_ceil(1 << e.granularity_bits);
                let mut bits = vec![0u8; granules.div_ceil(8) as usize];
                let t = e.table_offset as usize;
                for i in 0..e.table_size as usize {
                    let entry = BitmapTableEntry::read(&data[t..t + 8 * e.table_size as usize], i);
                    let chunk = i * cs as usize..((i + 1) * cs as usize).min(bits.len());
                    match entry.decode(cs).unwrap() {
                        Ok(off) => {
                            let o = off.0 as usize;
                            let n = chunk.len();
                            bits[chunk].copy_from_slice(&data[o..o + n]);
                        }
                        Err(true) => bits[chunk].fill(0xff),
                        Err(false) => {}
                    }
                }
                (e.name.clone(), e.flags, bits)
            })
            .collect()
    };
    let before = read_bitmaps(&f.image);
    let mut model = f.raw_reference();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // 64 KiB granularity for bm0: these touch granules 0, 2 and 3, 16..=17.
    let ops = [
        Op::Write {
            off: 4096,
            len: 8192,
            pat: 0x77,
        },
        Op::Write {
            off: 3 * 65536 - 1,
            len: 2,
            pat: 0x78,
        },
        Op::Zero {
            off: 16 * 65536,
            len: 2 * 65536,
            unmap: true,
        },
    ];
    apply(&mut model, &ops, 65536, false);
    rt.block_on(run_ops(&f.image, &ops));
    let check = qemu_check(&f.image);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert_eq!(raw_reference(&f.image, "qcow2"), model);
    let after = read_bitmaps(&f.image);
    for ((name, flags_before, bits_before), (_, flags, bits)) in before.iter().zip(&after) {
        assert_eq!(
            flags, flags_before,
            "{name}: flags (in_use must be cleared at close)"
        );
        if flags & BitmapDirectoryEntry::AUTO == 0 {
            assert_eq!(bits, bits_before, "{name}: a disabled bitmap changed");
            continue;
        }
        let mut want = bits_before.clone();
        for g in [0u64, 2, 3, 16, 17] {
            want[(g / 8) as usize] |= 1 << (g % 8);
        }
        assert_eq!(bits, &want, "{name}: dirty bits");
    }
}

/// Lazy refcounts: after a flush the dirty bit is on disk and refcount blocks are not; a
/// crash (no close) leaves a dirty image that QEMU repairs with the data intact; a clean close
/// writes the refcounts and clears the bit.
#[test]
fn lazy_refcounts_dirty_bit_and_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for crash in [true, false] {
        let path = dir.path().join(format!("lazy-{crash}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            path_str(&path),
            "4M",
        ]);
        let ops = random_ops(if crash { 11 } else { 12 }, 4 << 20, 65536, 30);
        let mut model = vec![0u8; 4 << 20];
        apply(&mut model, &ops, 65536, false);
        rt.block_on(async {
            let img = Image::open(FileOpener, &path, ImageOptions::new())
                .await
                .unwrap();
            for op in &ops {
                match *op {
                    Op::Write { off, len, pat } => {
                        img.write(off, &vec![pat; len as usize]).await.unwrap()
                    }
                    Op::Zero { off, len, unmap } => {
                        img.write_zeroes(off, len, unmap).await.unwrap()
                    }
                    Op::Discard { off, len } => img.discard(off, len).await.unwrap(),
                    Op::Flush => img.flush().await.unwrap(),
                }
            }
            img.flush().await.unwrap();
            // The image is open for writing here: QEMU reads it in shared mode (-U).
            let info = qcow2_tests::qemu_img_json(&[
                "info",
                "-U",
                "--output=json",
                qcow2_tests::path_str(&path),
            ]);
            assert_eq!(info["dirty-flag"], true, "dirty bit on disk while open");
            if crash {
                drop(img); // no close: as if the process died after the flush
            } else {
                img.close().await.unwrap();
            }
        });
        if crash {
            let check = qemu_check(&path);
            assert_ne!(check.status.code(), Some(0), "stale refcounts are visible");
            let repair = qcow2_tests::qemu_img_status(&["check", "-r", "all", path_str(&path)]);
            assert!(
                repair.status.code() == Some(0),
                "{}",
                String::from_utf8_lossy(&repair.stdout)
            );
        }
        let check = qemu_check(&path);
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        assert_eq!(qcow2_tests::qemu_info_json(&path)["dirty-flag"], false);
        assert!(
            raw_reference(&path, "qcow2") == model,
            "crash={crash}: data differs"
        );
    }
}
