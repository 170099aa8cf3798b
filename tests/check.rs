//! `Image::check` and `Image::repair` against `qemu-img check [-r leaks|all]`.
//!
//! Every fixture of the matrix must get the same numbers, exit status and diagnostic lines as
//! from `qemu-img check --output=json`. Then images made by qemu-img are damaged by editing
//! their metadata (located with qcow2-format): leaked clusters, refcounts too low, wrong
//! COPIED flags, reserved bits, a refcount block counted twice, a crashed lazy-refcounts image.
//! The verdicts must agree with qemu-img; repairing one copy with the engine and another with
//! `qemu-img check -r` must end in the same state, clean where QEMU's is, with the guest
//! content QEMU keeps.

use blockio::FileOpener;
use qcow2_engine::{CheckReport, Error, Image, ImageOptions, RepairMode};
use qcow2_format::{
    ClusterGeometry, Header, L1Entry, L2ClusterType, L2Entry, RefcountWidth, ReftableEntry,
    L2_COPIED,
};
use qcow2_tests::{fixture, matrix, path_str, qemu_img, qemu_img_status, qemu_io};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// What `qemu-img check` said: its JSON (Null when it printed none), exit status, and the
/// diagnostic lines on stderr (without its own "qemu-img: ..." error lines).
struct Qemu {
    json: Value,
    code: i32,
    messages: Vec<String>,
}

fn qemu_check(image: &Path, repair: Option<&str>) -> Qemu {
    let mut args = vec!["check", "--output=json"];
    if let Some(mode) = repair {
        args.extend(["-r", mode]);
    }
    args.push(path_str(image));
    let out = qemu_img_status(&args);
    let json = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).expect("qemu-img check JSON")
    };
    let messages = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("qemu-img:"))
        .map(str::to_string)
        .collect();
    Qemu {
        json,
        code: out.status.code().expect("qemu-img exit status"),
        messages,
    }
}

/// Asserts that a report says what qemu-img said.
fn assert_agrees(what: &str, r: &CheckReport, q: &Qemu) {
    assert_eq!(
        i32::from(r.exit_code()),
        q.code,
        "{what}: exit status (ours {r:#?})"
    );
    assert_eq!(r.messages, q.messages, "{what}: diagnostic lines");
    if q.json.is_null() {
        assert!(
            r.failure.is_some(),
            "{what}: qemu-img's check failed, ours did not"
        );
        return;
    }
    assert!(r.failure.is_none(), "{what}: our check failed: {r:#?}");
    let n = |k: &str| q.json.get(k).and_then(Value::as_u64).unwrap_or(0);
    let ours = [
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("check-errors", r.check_errors),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("image-end-offset", r.image_end_offset),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (key, value) in ours {
        assert_eq!(value, n(key), "{what}: {key} (qemu-img: {})", q.json);
    }
}

async fn engine_check(image: &Path) -> CheckReport {
    let img = Image::open(FileOpener, image, ImageOptions::new().read_only(true))
        .await
        .unwrap_or_else(|e| panic!("{}: open: {e}", image.display()));
    img.check()
        .await
        .unwrap_or_else(|e| panic!("{}: check: {e}", image.display()))
}

async fn engine_repair(image: &Path, mode: RepairMode) -> CheckReport {
    let img = Image::open_for_repair(FileOpener, image, ImageOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{}: open for repair: {e}", image.display()));
    img.repair(mode)
        .await
        .unwrap_or_else(|e| panic!("{}: repair: {e}", image.display()))
}

#[test]
fn every_fixture_checks_as_qemu_img_says() {
    let rt = runtime();
    for spec in matrix() {
        let f = spec.build();
        let ours = rt.block_on(engine_check(&f.image));
        let theirs = qemu_check(&f.image, None);
        assert_agrees(&f.name, &ours, &theirs);
        assert!(
            ours.repairable(),
            "{}: a fixture QEMU made is not repairable: {ours:#?}",
            f.name
        );
        if !f.expect.dirty {
            assert!(
                ours.is_clean(),
                "{}: a fixture QEMU made is not clean",
                f.name
            );
        }
    }
}

#[test]
fn repair_needs_a_writable_file() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let image = base_image(dir.path());
    rt.block_on(async {
        let img = Image::open(FileOpener, &image, ImageOptions::new().read_only(true))
            .await
            .unwrap();
        assert!(matches!(
            img.repair(RepairMode::All).await,
            Err(Error::ReadOnly)
        ));
        // Its locks keep a writer out (I10): closed, the repair can open the file.
        drop(img);
        // Opened for repair, a clean image stays untouched and clean.
        let before = std::fs::read(&image).unwrap();
        let r = engine_repair(&image, RepairMode::All).await;
        assert!(r.is_clean() && !r.repaired(), "{r:#?}");
        assert!(
            std::fs::read(&image).unwrap() == before,
            "a clean image was modified"
        );
    });
}

// ------------------------------------------------------------------------------------------
// Damaging images: the metadata located with qcow2-format, edited in place.

/// An image's metadata as qcow2-format reads it.
struct Layout {
    header: Header,
    geo: ClusterGeometry,
    width: RefcountWidth,
    reftable: Vec<ReftableEntry>,
    l1: Vec<L1Entry>,
}

fn layout(image: &Path) -> Layout {
    let bytes = std::fs::read(image).unwrap();
    let bits = Header::peek_cluster_bits(&bytes).unwrap();
    let cs = 1usize << bits;
    let header = Header::parse(&bytes[..cs.min(bytes.len())]).unwrap();
    let geo = header.geometry();
    let rt = header.refcount_table_offset as usize;
    let rt_len = header.refcount_table_clusters as usize * cs;
    let reftable = (0..rt_len / 8)
        .map(|i| ReftableEntry::read(&bytes[rt..rt + rt_len], i))
        .collect();
    let l1_off = header.l1_table_offset as usize;
    let l1_len = header.l1_size as usize * 8;
    let l1 = (0..header.l1_size as usize)
        .map(|i| L1Entry::read(&bytes[l1_off..l1_off + l1_len], i))
        .collect();
    Layout {
        width: header.refcount_width(),
        header,
        geo,
        reftable,
        l1,
    }
}

fn read_at(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn write_at(image: &Path, offset: u64, data: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
}

impl Layout {
    fn cs(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// (offset of the refcount block, index in it) for a host cluster.
    fn refcount_slot(&self, cluster: u64) -> (u64, u64) {
        let per_block = self.width.entries_per_block(self.cs());
        let block = self.reftable[(cluster / per_block) as usize].raw_offset();
        assert_ne!(block, 0, "cluster {cluster} has no refcount block");
        (block, cluster % per_block)
    }

    fn refcount(&self, image: &Path, cluster: u64) -> u64 {
        let (block, i) = self.refcount_slot(cluster);
        self.width
            .get(&read_at(image, block, self.cs() as usize), i)
    }

    fn set_refcount(&self, image: &Path, cluster: u64, value: u64) {
        let (block, i) = self.refcount_slot(cluster);
        let mut b = read_at(image, block, self.cs() as usize);
        self.width.set(&mut b, i, value).unwrap();
        write_at(image, block, &b);
    }

    /// Every entry of the active L2 tables of the given kind: (L2 table offset, index, entry).
    fn l2_entries(&self, image: &Path, kind: L2ClusterType) -> Vec<(u64, usize, L2Entry)> {
        let mut out = Vec::new();
        for l1 in &self.l1 {
            let l2 = l1.raw_offset();
            if l2 == 0 {
                continue;
            }
            let table = read_at(image, l2, self.cs() as usize);
            for i in 0..self.geo.l2_entries() as usize {
                let e = L2Entry::read(&table, &self.geo, i);
                if e.cluster_type(&self.geo, false) == kind {
                    out.push((l2, i, e));
                }
            }
        }
        out
    }

    fn write_l2_entry(&self, image: &Path, l2: u64, index: usize, entry: L2Entry) {
        let size = self.geo.l2_entry_size() as usize;
        let mut bytes = vec![0; size];
        entry.write(&mut bytes, &self.geo, 0);
        write_at(image, l2 + (index * size) as u64, &bytes);
    }
}

/// A qemu-made image with data, a compressed cluster, zero clusters and a discard.
fn base_image(dir: &Path) -> PathBuf {
    let image = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&image), "16M"]);
    qemu_io(
        "qcow2",
        &image,
        &[
            "write -P 0x11 0 192k",
            "write -c -P 0x22 1M 64k",
            "write -P 0x33 4M 128k",
            "write -z 4M 64k",
            "write -P 0x44 9M 64k",
            "discard 9M 64k",
            "write -P 0x55 12M 64k",
        ],
    );
    image
}

/// One kind of damage: what it does to an image, and whether it leaves the guest content as
/// it was (so that a repaired image must read like the undamaged one).
struct Damage {
    name: &'static str,
    apply: fn(&Path),
    keeps_content: bool,
}

fn first(image: &Path, kind: L2ClusterType) -> (Layout, u64, usize, L2Entry) {
    let l = layout(image);
    let (l2, i, e) = l.l2_entries(image, kind)[0];
    (l, l2, i, e)
}

/// Every kind of damage `damaged_images_check_and_repair_as_qemu_img_does` applies.
fn damages() -> Vec<Damage> {
    let mut all = refcount_and_flag_damages();
    all.extend(offset_damages());
    all
}

/// Refcounts that disagree with the references (leaks, a refcount of 0 for a used cluster),
/// and COPIED or reserved flags where they must not be.
fn refcount_and_flag_damages() -> Vec<Damage> {
    vec![
        Damage {
            name: "leaked L1 cluster (refcount 2, one reference)",
            apply: |img| {
                let l = layout(img);
                let c = l.header.l1_table_offset >> l.geo.cluster_bits();
                l.set_refcount(img, c, l.refcount(img, c) + 1);
            },
            keeps_content: true,
        },
        Damage {
            name: "leaked data cluster (refcount 2 with COPIED set)",
            apply: |img| {
                let (l, _, _, e) = first(img, L2ClusterType::Normal);
                let c = e.raw_offset() >> l.geo.cluster_bits();
                l.set_refcount(img, c, 2);
            },
            keeps_content: true,
        },
        Damage {
            name: "data cluster with refcount 0",
            apply: |img| {
                let (l, _, _, e) = first(img, L2ClusterType::Normal);
                l.set_refcount(img, e.raw_offset() >> l.geo.cluster_bits(), 0);
            },
            keeps_content: true,
        },
        Damage {
            name: "L2 table with refcount 0",
            apply: |img| {
                let l = layout(img);
                let c = l.l1[0].raw_offset() >> l.geo.cluster_bits();
                l.set_refcount(img, c, 0);
            },
            keeps_content: true,
        },
        Damage {
            name: "COPIED flag cleared on an exclusive data cluster",
            apply: |img| {
                let (l, l2, i, e) = first(img, L2ClusterType::Normal);
                let word = e.word & !L2_COPIED;
                l.write_l2_entry(img, l2, i, L2Entry { word, ..e });
            },
            keeps_content: true,
        },
        Damage {
            name: "COPIED flag cleared on an L2 table",
            apply: |img| {
                let l = layout(img);
                let e = L1Entry(l.l1[0].0 & !L1Entry::COPIED);
                let mut b = [0u8; 8];
                e.write(&mut b, 0);
                write_at(img, l.header.l1_table_offset, &b);
            },
            keeps_content: true,
        },
        Damage {
            name: "L2 entry with reserved bits set",
            apply: |img| {
                let (l, l2, i, e) = first(img, L2ClusterType::Normal);
                let word = e.word | 0x100;
                l.write_l2_entry(img, l2, i, L2Entry { word, ..e });
            },
            keeps_content: true,
        },
        Damage {
            name: "compressed entry with COPIED set",
            apply: |img| {
                let (l, l2, i, e) = first(img, L2ClusterType::Compressed);
                let word = e.word | L2_COPIED;
                l.write_l2_entry(img, l2, i, L2Entry { word, ..e });
            },
            keeps_content: true,
        },
        Damage {
            name: "refcount block with a stored refcount of 2",
            apply: |img| {
                let l = layout(img);
                let c = l.reftable[0].raw_offset() >> l.geo.cluster_bits();
                l.set_refcount(img, c, 2);
            },
            keeps_content: true,
        },
    ]
}

/// Offsets that are wrong: a cluster mapped twice, misaligned, past the end of the file, or
/// with reserved bits set in the L1 or refcount table.
fn offset_damages() -> Vec<Damage> {
    vec![
        Damage {
            name: "refcount block also mapped as guest data (referenced twice)",
            apply: |img| {
                let (l, l2, i, e) = first(img, L2ClusterType::Normal);
                let word = (e.word & !L2Entry::OFFSET_MASK) | l.reftable[0].raw_offset();
                l.write_l2_entry(img, l2, i, L2Entry { word, ..e });
            },
            keeps_content: false,
        },
        Damage {
            name: "preallocated zero cluster at a misaligned offset",
            apply: |img| {
                let (l, l2, i, e) = first(img, L2ClusterType::ZeroAlloc);
                let word = e.word + 0x200;
                l.write_l2_entry(img, l2, i, L2Entry { word, ..e });
            },
            keeps_content: true,
        },
        Damage {
            name: "L1 entry pointing past the end of the file",
            apply: |img| {
                let l = layout(img);
                let len = std::fs::metadata(img).unwrap().len();
                let past = (len / l.cs() + 100) * l.cs();
                let mut b = [0u8; 8];
                L1Entry::new(qcow2_format::HostOffset(past), true).write(&mut b, 0);
                write_at(img, l.header.l1_table_offset, &b);
            },
            keeps_content: false,
        },
        Damage {
            name: "L1 entry with reserved bits set",
            apply: |img| {
                let l = layout(img);
                let mut b = [0u8; 8];
                L1Entry(l.l1[0].0 | 0x1).write(&mut b, 0);
                write_at(img, l.header.l1_table_offset, &b);
            },
            keeps_content: true,
        },
        Damage {
            name: "refcount table entry with reserved bits set",
            apply: |img| {
                let l = layout(img);
                let mut b = [0u8; 8];
                ReftableEntry(l.reftable[0].0 | 0x10).write(&mut b, 0);
                write_at(img, l.header.refcount_table_offset, &b);
            },
            keeps_content: true,
        },
        Damage {
            name: "misaligned refcount block offset",
            apply: |img| {
                let l = layout(img);
                let mut b = [0u8; 8];
                ReftableEntry(l.reftable[0].0 + 0x200).write(&mut b, 0);
                write_at(img, l.header.refcount_table_offset, &b);
            },
            keeps_content: true,
        },
        Damage {
            name: "compressed cluster past the end of the file",
            apply: |img| {
                let (l, l2, i, e) = first(img, L2ClusterType::Compressed);
                let d = qcow2_format::CompressedDescriptor::decode(e.word, &l.geo).unwrap();
                let far = qcow2_format::CompressedDescriptor {
                    host_offset: d.host_offset + (64 << 20),
                    ..d
                };
                let word = qcow2_format::L2_COMPRESSED | far.encode(&l.geo).unwrap();
                l.write_l2_entry(img, l2, i, L2Entry { word, ..e });
            },
            keeps_content: false,
        },
        Damage {
            name: "refcount table entry pointing past the end of the file",
            apply: |img| {
                let l = layout(img);
                let len = std::fs::metadata(img).unwrap().len();
                let past = (len / l.cs() + 4) * l.cs();
                let mut b = [0u8; 8];
                ReftableEntry(past).write(&mut b, 0);
                write_at(img, l.header.refcount_table_offset + 8, &b);
            },
            keeps_content: true,
        },
    ]
}

fn qemu_compare(a: &Path, b: &Path) -> bool {
    qemu_img_status(&["compare", "-q", path_str(a), path_str(b)])
        .status
        .success()
}

/// Checks a damaged image with both, repairs one copy with each in `mode`, and compares.
fn check_and_repair(
    rt: &tokio::runtime::Runtime,
    name: &str,
    damaged: &Path,
    pristine: Option<&Path>,
) {
    let ours = rt.block_on(engine_check(damaged));
    let theirs = qemu_check(damaged, None);
    assert_agrees(&format!("{name}: check"), &ours, &theirs);

    let dir = damaged.parent().unwrap();
    for (mode, arg) in [(RepairMode::Leaks, "leaks"), (RepairMode::All, "all")] {
        let what = format!("{name}: -r {arg}");
        let ours_img = dir.join(format!("ours-{arg}.qcow2"));
        let qemu_img_path = dir.join(format!("qemu-{arg}.qcow2"));
        std::fs::copy(damaged, &ours_img).unwrap();
        std::fs::copy(damaged, &qemu_img_path).unwrap();

        let repairable = rt.block_on(engine_check(damaged)).repairable();
        let ours = rt.block_on(engine_repair(&ours_img, mode));
        let theirs = qemu_check(&qemu_img_path, Some(arg));
        assert_agrees(&what, &ours, &theirs);
        if repairable && mode == RepairMode::All {
            // What a read-write open of a dirty image relies on.
            assert!(
                ours.completed() && ours.corruptions == 0 && ours.check_errors == 0,
                "{what}: the check called it repairable, the repair left {ours:#?}"
            );
        }

        // The state each repair leaves behind checks the same.
        let after_ours = qemu_check(&ours_img, None);
        let after_qemu = qemu_check(&qemu_img_path, None);
        assert_eq!(
            after_ours.code, after_qemu.code,
            "{what}: qemu-img check after the repair ({:?} vs QEMU's {:?})",
            after_ours.messages, after_qemu.messages
        );
        // QEMU's read-write open and close store persistent bitmaps anew (new clusters, old
        // ones freed), which moves the image end: that one number may differ for them.
        let has_bitmaps = layout(damaged).header.bitmaps().is_some();
        let comparable = |j: &Value| {
            let mut j = j.clone();
            if let Some(o) = j.as_object_mut() {
                o.remove("filename");
                if has_bitmaps {
                    o.remove("image-end-offset");
                }
            }
            j
        };
        assert_eq!(
            comparable(&after_ours.json),
            comparable(&after_qemu.json),
            "{what}: qemu-img check after the repair"
        );
        if after_qemu.code == 0 {
            assert!(
                qemu_compare(&ours_img, &qemu_img_path),
                "{what}: guest content differs from QEMU's repair"
            );
            if let Some(p) = pristine {
                assert!(
                    qemu_compare(&ours_img, p),
                    "{what}: guest content differs from the undamaged image"
                );
            }
        }
    }
}

#[test]
fn damaged_images_check_and_repair_as_qemu_img_does() {
    let rt = runtime();
    for d in damages() {
        let dir = tempfile::tempdir().unwrap();
        let pristine = base_image(dir.path());
        let damaged = dir.path().join("damaged.qcow2");
        std::fs::copy(&pristine, &damaged).unwrap();
        (d.apply)(&damaged);
        assert_ne!(
            qemu_check(&damaged, None).code,
            0,
            "{}: the damage went unnoticed by qemu-img",
            d.name
        );
        let pristine = d.keeps_content.then_some(pristine.as_path());
        check_and_repair(&rt, d.name, &damaged, pristine);
    }
}

#[test]
fn crashed_lazy_refcounts_image_checks_and_repairs_as_qemu_img_does() {
    let rt = runtime();
    let f = fixture("lazy-refcounts-dirty").build();
    let reference = f.dir.path().join("reference.raw");
    qcow2_tests::raw_reference_file(&f.image, "qcow2", &reference);
    let damaged = f.dir.path().join("damaged.qcow2");
    std::fs::copy(&f.image, &damaged).unwrap();
    check_and_repair(&rt, &f.name, &damaged, None);
    // The repaired image still holds what the crashed one showed.
    let ours = f.dir.path().join("ours-all.qcow2");
    assert!(qemu_img_status(&[
        "compare",
        "-q",
        "-F",
        "raw",
        path_str(&ours),
        path_str(&reference)
    ])
    .status
    .success());
}

/// A read-write open of the crashed lazy-refcounts image repairs it first (its only problems
/// are refcounts, which a repair fixes), as QEMU's open does: it opens, the repaired image is
/// clean for qemu-img, and the guest sees what the crashed image showed.
#[test]
fn read_write_open_repairs_a_crashed_lazy_refcounts_image() {
    let rt = runtime();
    let f = fixture("lazy-refcounts-dirty").build();
    let reference = f.dir.path().join("reference.raw");
    qcow2_tests::raw_reference_file(&f.image, "qcow2", &reference);
    let image = f.dir.path().join("reopened.qcow2");
    std::fs::copy(&f.image, &image).unwrap();
    rt.block_on(async {
        let found = engine_check(&image).await;
        assert!(found.corruptions > 0, "the fixture is dirty: {found:#?}");
        assert!(found.repairable(), "{found:#?}");
        let img = Image::open(FileOpener, &image, ImageOptions::new())
            .await
            .expect("a dirty image with stale refcounts opens read-write");
        img.close().await.unwrap();
    });
    let q = qemu_check(&image, None);
    assert_eq!(q.code, 0, "qemu-img check after the open: {:?}", q.messages);
    assert!(qemu_img_status(&[
        "compare",
        "-q",
        "-F",
        "raw",
        path_str(&image),
        path_str(&reference)
    ])
    .status
    .success());
}

#[test]
fn snapshot_l1_table_past_the_end_of_the_file() {
    let rt = runtime();
    let f = fixture("snapshot").build();
    let damaged = f.dir.path().join("damaged.qcow2");
    std::fs::copy(&f.image, &damaged).unwrap();
    let l = layout(&damaged);
    let h = &l.header;
    let bytes = std::fs::read(&damaged).unwrap();
    let table = &bytes[h.snapshots_offset as usize..];
    let mut snapshots = qcow2_format::Snapshot::parse_table(table, h.nb_snapshots).unwrap();
    snapshots[0].l1_table_offset = (bytes.len() as u64 / l.cs() + 50) * l.cs();
    write_at(
        &damaged,
        h.snapshots_offset,
        &qcow2_format::Snapshot::serialize_table(&snapshots),
    );
    check_and_repair(&rt, "snapshot L1 past EOF", &damaged, Some(&f.image));
}

#[test]
fn snapshot_and_bitmap_images_with_damage() {
    // Shared clusters (snapshots) and bitmap clusters must be counted: a leak on top of them is
    // the only finding, and repairing it keeps both intact.
    let rt = runtime();
    for name in [
        "snapshot",
        "bitmap",
        "compressed-zstd-rewritten",
        "extl2-64k",
        "refcount-1",
    ] {
        let f = fixture(name).build();
        let damaged = f.dir.path().join("damaged.qcow2");
        std::fs::copy(&f.image, &damaged).unwrap();
        let l = layout(&damaged);
        let c = l.header.refcount_table_offset >> l.geo.cluster_bits();
        if l.width.max() > 1 {
            l.set_refcount(&damaged, c, 2);
        } else {
            // 1-bit refcounts cannot over-count: lower an L2 table's refcount instead.
            let l2 =
                l.l1.iter()
                    .find(|e| e.raw_offset() != 0)
                    .unwrap()
                    .raw_offset();
            l.set_refcount(&damaged, l2 >> l.geo.cluster_bits(), 0);
        }
        check_and_repair(&rt, name, &damaged, Some(&f.image));
    }
}
