//! Crash images of a snapshot-table repair (issue 13, invariant I4): `Image::repair(All)`
//! of an image whose snapshot table QEMU refuses (an entry with 1100 bytes of extra data, in
//! a cluster no refcount counts) runs over the fault injector, so that the repair rebuilds
//! the refcounts and rewrites the snapshot table. At every crash point of its request log,
//! with a few choices of the volatile writes that survive (one torn sector or none), the
//! crash image must still be repairable by `qemu-img check -r all` to a clean image, with
//! the active layer and both snapshots reading as before: a crash during a repair never
//! leaves the image worse than it found it.

use blockio::{CrashSpec, FaultOpener, FileOpener};
use qcow2_engine::{Image, ImageOptions, RepairMode};
use qcow2_format::{Header, Snapshot};
use qcow2_tests::{path_str, qemu_img, qemu_img_status, qemu_io, raw_reference};
use qcow2_tests::{raw_reference_snapshot, said};
use std::path::Path;

/// Volatile subsets tried per crash point.
const SEEDS: u64 = 3;

fn read_at(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let data = std::fs::read(image).unwrap();
    data[offset as usize..offset as usize + len].to_vec()
}

/// A 256 KiB image (4 KiB clusters) with two snapshots; the table is rewritten at the end of
/// the file with 1100 bytes of extra data in entry 1 (the known fields kept).
fn damaged_image(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("d.qcow2");
    let p = path_str(&image);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p,
        "256K",
    ]);
    qemu_io("qcow2", &image, &["write -P 0x11 0 16k"]);
    qemu_img(&["snapshot", "-c", "s1", p]);
    qemu_io("qcow2", &image, &["write -P 0x22 8k 16k"]);
    qemu_img(&["snapshot", "-c", "s2", p]);
    qemu_io("qcow2", &image, &["write -P 0x33 64k 4k"]);
    let h = Header::parse(&read_at(&image, 0, 4096)).unwrap();
    let mut pos = h.snapshots_offset;
    let mut table = Vec::new();
    for i in 0..h.nb_snapshots {
        let fixed = read_at(&image, pos, Snapshot::FIXED_LEN);
        let (id, name, extra) = Snapshot::declared_lengths(&fixed).unwrap();
        let len = Snapshot::FIXED_LEN + extra as usize + usize::from(id) + usize::from(name);
        let mut e = read_at(&image, pos, len);
        pos += len.div_ceil(8) as u64 * 8;
        if i == 1 {
            let names = e[len - usize::from(id) - usize::from(name)..].to_vec();
            e.truncate(Snapshot::FIXED_LEN + extra as usize);
            e.resize(Snapshot::FIXED_LEN + 1100, 0xab);
            e[36..40].copy_from_slice(&1100u32.to_be_bytes());
            e.extend_from_slice(&names);
        }
        table.extend_from_slice(&e);
        table.resize(table.len().div_ceil(8) * 8, 0);
    }
    let mut data = std::fs::read(&image).unwrap();
    let end = (data.len() as u64).div_ceil(4096) * 4096;
    data.resize(end as usize, 0);
    data.extend_from_slice(&table);
    data[64..72].copy_from_slice(&end.to_be_bytes());
    std::fs::write(&image, &data).unwrap();
    image
}

#[test]
fn crash_during_snapshot_table_repair_never_makes_it_worse() {
    let dir = tempfile::tempdir().unwrap();
    let image = damaged_image(dir.path());
    // What QEMU's own repair leaves: the reference contents.
    let reference = dir.path().join("reference.qcow2");
    std::fs::copy(&image, &reference).unwrap();
    let out = qemu_img_status(&["check", "-r", "all", path_str(&reference)]);
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out, "qemu-img: "));
    let active = raw_reference(&reference, "qcow2");
    let snaps: Vec<Vec<u8>> = ["s1", "s2"]
        .iter()
        .map(|s| raw_reference_snapshot(&reference, s))
        .collect();

    let base = std::fs::read(&image).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let opener = FaultOpener::new(FileOpener);
    let ctl = opener.controller();
    let report = rt.block_on(async {
        let img = Image::open_for_repair(opener, &image, ImageOptions::new())
            .await
            .unwrap();
        img.repair(RepairMode::All).await.unwrap()
    });
    assert_eq!(report.exit_code(), 0, "{report:#?}");
    assert!(report.corruptions_fixed > 0, "{report:#?}");
    let file = ctl.file_id(&image).unwrap();
    let completed = ctl.completed();
    let crashed = dir.path().join("crash.qcow2");
    let mut seen = std::collections::HashSet::new();
    for at in 0..=completed {
        for seed in 0..SEEDS {
            let spec = CrashSpec::new(seed).file(file).at(at).tear(seed == 2);
            let bytes = ctl.crash(&base, &spec).bytes;
            if !seen.insert(bytes.clone()) {
                continue;
            }
            std::fs::write(&crashed, &bytes).unwrap();
            let out = qemu_img_status(&["check", "-r", "all", path_str(&crashed)]);
            let what = format!("crash at {at} (seed {seed})");
            assert_eq!(
                out.status.code(),
                Some(0),
                "{what}: qemu-img check -r all: {:?}",
                said(&out, "qemu-img: ")
            );
            assert!(
                raw_reference(&crashed, "qcow2") == active,
                "{what}: active layer"
            );
            for (s, want) in ["s1", "s2"].iter().zip(&snaps) {
                let got = raw_reference_snapshot(&crashed, s);
                assert!(&got == want, "{what}: snapshot {s}");
            }
        }
    }
    eprintln!(
        "{completed} crash points, {} distinct crash images",
        seen.len()
    );
    assert!(seen.len() > 5, "too few crash images: {}", seen.len());
}
