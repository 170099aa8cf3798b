//! `qimg amend` against `qemu-img amend`: on two byte-identical copies of an image, the same
//! `-o` options must give the same messages and exit status and leave byte-identical files
//! (the header rewritten as QEMU writes it, zero clusters expanded for version 2 as QEMU
//! expands them), and `qemu-img check` must say the same of both. Images: plain, over a backing file, with
//! preallocated metadata, version 2, lazy refcounts, an external data file. Refcount width
//! changes rebuild the refcount structure: the files may differ in the freed clusters, so
//! they are compared by `check`, `compare`, `map`, `info` and length.

use qcow2_format::{Header, RefcountWidth};
use qcow2_tests::{
    path_str, qemu_check, qemu_img, qemu_img_status, qemu_info_json, qemu_io, qemu_map_json, said,
    strip_snapshot_extra_data,
};
use std::path::Path;
use std::process::Command;

/// Runs `amend ARGS IMAGE` with qemu-img on `image` and with qimg on a copy of it taken
/// before, in `dir`; both must say the same and leave the same bytes.
fn same_as_qemu_img(dir: &Path, image: &str, args: &[&str]) {
    let theirs = dir.join(image);
    let copy = format!("{image}.qimg");
    let ours = dir.join(&copy);
    std::fs::copy(&theirs, &ours).unwrap();
    let run = |program: &str, target: &str| {
        Command::new(program)
            .arg("amend")
            .args(args)
            .arg(target)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("run {program} (qemu-img: package qemu-utils): {e}"))
    };
    let q = run("qemu-img", image);
    let o = run(env!("CARGO_BIN_EXE_qimg"), &copy);
    assert_eq!(
        said(&o, "qimg: "),
        said(&q, "qemu-img: "),
        "amend {args:?} on {image}: qimg says otherwise (left: qimg)"
    );
    assert!(
        std::fs::read(&theirs).unwrap() == std::fs::read(&ours).unwrap(),
        "amend {args:?} on {image}: qimg's file differs from qemu-img's"
    );
    let check = |p: &Path| qemu_img_status(&["check", path_str(p)]).status.code();
    assert_eq!(
        check(&ours),
        check(&theirs),
        "amend {args:?} on {image}: qemu-img check"
    );
    std::fs::remove_file(&ours).unwrap();
}

/// Writes data, zeros over whole and partial clusters, and unmapping zeros.
fn fill(image: &Path) {
    qemu_io(
        "qcow2",
        image,
        &[
            "write -P 3 0 100k",
            "write -z 1M 128k",
            "write -z 3M 4k",
            "write -z -u 5M 64k",
        ],
    );
}

#[test]
fn options_amend_as_qemu_img_amends_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let create = |name: &str, opts: &str, size: &str| {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            path_str(&d.join(name)),
            size,
        ]);
    };
    create("base.qcow2", "compat=1.1", "64M");
    qemu_io("qcow2", &d.join("base.qcow2"), &["write -P 9 0 8M"]);
    create("plain.qcow2", "compat=1.1", "64M");
    create(
        "over.qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "64M",
    );
    create("prealloc.qcow2", "preallocation=metadata", "8M");
    create("old.qcow2", "compat=0.10", "64M");
    create(
        "oldover.qcow2",
        "compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2",
        "64M",
    );
    create("lazy.qcow2", "lazy_refcounts=on", "64M");
    create("ext.qcow2", "extended_l2=on", "8M");
    create("r8.qcow2", "refcount_bits=8", "8M");
    let data_file = d.join("df.raw");
    let df = path_str(&data_file);
    create(
        "df.qcow2",
        &format!("data_file={df},data_file_raw=on"),
        "8M",
    );
    for name in ["plain", "over", "prealloc", "old", "oldover", "lazy"] {
        fill(&d.join(format!("{name}.qcow2")));
    }

    let downgrade = ["-o", "compat=0.10"];
    for image in ["plain.qcow2", "over.qcow2", "prealloc.qcow2", "lazy.qcow2"] {
        same_as_qemu_img(d, image, &downgrade);
    }
    for image in ["old.qcow2", "oldover.qcow2"] {
        same_as_qemu_img(d, image, &["-o", "compat=1.1"]);
        same_as_qemu_img(d, image, &["-o", "lazy_refcounts=on"]);
    }
    for args in [
        &["-o", "lazy_refcounts=on"][..],
        &["-o", "compat=v3", "-o", "compat=v2"],
        &["-o", "compat=0.10,lazy_refcounts=on"],
        &["-o", "refcount_bits=16,backing_fmt=qcow2"],
        &["-q", "-o", "compat=1.1"],
    ] {
        same_as_qemu_img(d, "plain.qcow2", args);
    }
    same_as_qemu_img(d, "lazy.qcow2", &["-o", "lazy_refcounts=off"]);
    // Clusters of 4 KiB and less: QEMU writes no feature table.
    create("small.qcow2", "cluster_size=4k", "8M");
    same_as_qemu_img(d, "small.qcow2", &["-o", "lazy_refcounts=on"]);
    same_as_qemu_img(d, "ext.qcow2", &downgrade);
    same_as_qemu_img(d, "r8.qcow2", &downgrade);
    same_as_qemu_img(d, "df.qcow2", &downgrade);
    same_as_qemu_img(d, "df.qcow2", &["-o", "data_file_raw=off"]);
    same_as_qemu_img(d, "df.qcow2", &["-o", &format!("data_file={df}")]);
    same_as_qemu_img(d, "df.qcow2", &["-o", "data_file="]);
}

#[test]
fn mistakes_are_refused_as_qemu_img_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path_str(&d.join("img.qcow2")),
        "8M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        path_str(&d.join("img.raw")),
        "8M",
    ]);
    for args in [
        &[][..],
        &["-o", "compat=0.9"],
        &["-o", "refcount_bits=3"],
        &["-o", "data_file=x"],
        &["-o", "data_file_raw=on"],
        &["-o", "backing_file=other.qcow2"],
        &["-o", "backing_fmt=raw"],
        &["-o", "cluster_size=4k"],
        &["-o", "extended_l2=on"],
        &["-o", "foo=1"],
        &["-o", "lazy_refcounts=maybe"],
        &["-o", "compat=0.10,refcount_bits=8"],
    ] {
        same_as_qemu_img(d, "img.qcow2", args);
    }
    same_as_qemu_img(d, "img.raw", &["-f", "raw", "-o", "compat=1.1"]);
}

/// `amend ARGS` with qemu-img on `image` and with qimg on a copy taken before, where the
/// files need not be byte-identical (a refcount width change: QEMU leaves the freed old
/// refcount table and blocks as they were, the engine punches them out). Both must say the
/// same; after a success ours must pass `qemu-img check` clean (no leak, no corruption),
/// read as theirs does, map the guest data to the same host offsets, show the same
/// refcount width and version in `qemu-img info`, and hold the same bytes in every cluster
/// in use.
fn same_result_as_qemu_img(dir: &Path, image: &str, args: &[&str]) {
    let base = dir.join(image);
    let theirs = dir.join("theirs.qcow2");
    let ours = dir.join("ours.qcow2");
    std::fs::copy(&base, &theirs).unwrap();
    std::fs::copy(&base, &ours).unwrap();
    let run = |program: &str, target: &Path| {
        Command::new(program)
            .arg("amend")
            .args(args)
            .arg(target)
            .output()
            .unwrap_or_else(|e| panic!("run {program} (qemu-img: package qemu-utils): {e}"))
    };
    let q = run("qemu-img", &theirs);
    let o = run(env!("CARGO_BIN_EXE_qimg"), &ours);
    let what = format!("amend {args:?} on {image}");
    assert_eq!(
        said(&o, "qimg: "),
        said(&q, "qemu-img: "),
        "{what}: qimg says otherwise (left: qimg)"
    );
    let unchanged = |p: &Path| std::fs::read(p).unwrap() == std::fs::read(&base).unwrap();
    if !q.status.success() && unchanged(&theirs) {
        assert!(unchanged(&ours), "{what}: refused, but the image changed");
        return;
    }
    // Success, or a refusal after QEMU changed something (it upgrades before it changes
    // the width, and changes the width before it downgrades): the same changes.
    let check = qemu_check(&ours);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{what}: qemu-img check on ours: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let cmp = qemu_img_status(&["compare", path_str(&ours), path_str(&theirs)]);
    assert_eq!(cmp.status.code(), Some(0), "{what}: qemu-img compare");
    let info = |p: &Path| {
        let v = qemu_info_json(p);
        let s = &v["format-specific"]["data"];
        (s["refcount-bits"].clone(), s["compat"].clone())
    };
    assert_eq!(info(&ours), info(&theirs), "{what}: qemu-img info");
    assert_eq!(
        qemu_map_json(&ours),
        qemu_map_json(&theirs),
        "{what}: qemu-img map"
    );
    let (o, t) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert_eq!(o.len(), t.len(), "{what}: file length");
    // Byte for byte in every cluster in use (QEMU leaves the old refcount structure's
    // clusters as they were when it frees them, the engine punches them out).
    let used = clusters_in_use(&t);
    let bits = u32::from_be_bytes(t[20..24].try_into().unwrap());
    let differ = (0..o.len())
        .find(|&i| o[i] != t[i] && used.contains(&((i as u64) >> bits)))
        .map(|i| i as u64);
    assert_eq!(
        differ, None,
        "{what}: first byte that differs in a cluster in use"
    );
}

/// The clusters with a non-zero refcount in the image `bytes`.
fn clusters_in_use(bytes: &[u8]) -> std::collections::HashSet<u64> {
    let h = Header::parse(bytes).unwrap();
    let cs = 1u64 << h.cluster_bits;
    let width = RefcountWidth::from_order(h.refcount_order).unwrap();
    let per = width.entries_per_block(cs);
    let table = h.refcount_table_offset as usize;
    let entries = (u64::from(h.refcount_table_clusters) * cs / 8) as usize;
    let mut used = std::collections::HashSet::new();
    for t in 0..entries {
        let at = table + 8 * t;
        let block = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap()) & !0x1ff;
        if block == 0 {
            continue;
        }
        let b = &bytes[block as usize..(block + cs) as usize];
        for i in 0..per {
            if width.get(b, i) != 0 {
                used.insert(t as u64 * per + i);
            }
        }
    }
    used
}

/// Makes `name`: `size` bytes, `opts` for qemu-img create, with data, a compressed cluster,
/// zero clusters and (`snapshot`) an internal snapshot under data written over since, so
/// that some clusters have a refcount of 2.
fn refcount_image(dir: &Path, name: &str, opts: &str, snapshot: bool) {
    let path = dir.join(name);
    let args = ["create", "-q", "-f", "qcow2", "-o", opts];
    qemu_img(&[&args[..], &[path_str(&path), "4M"]].concat());
    qemu_io(
        "qcow2",
        &path,
        &[
            "write -P 1 0 192k",
            "write -c -P 2 1M 64k",
            "write -z 2M 64k",
            "write -P 4 3M 8k",
        ],
    );
    if snapshot {
        qemu_img(&["snapshot", "-c", "s1", path_str(&path)]);
        qemu_io("qcow2", &path, &["write -P 5 64k 64k", "write -z 3M 4k"]);
    }
}

#[test]
fn refcount_widths_change_as_qemu_img_changes_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let all = &["1", "2", "4", "8", "16", "32", "64"][..];
    // (cluster size, created width, snapshot, widths to change to). Every width from 16
    // bits (1 refused where a snapshot makes a refcount of 2), narrowing from 64 and
    // widening from 1. QEMU takes seconds per change with 64 KiB clusters (and more from 1
    // bit, whose blocks count 32 GiB each), so fewer there.
    let cases: &[(&str, &str, bool, &[&str])] = &[
        ("512", "16", true, all),
        ("512", "64", true, &["1", "2", "8"]),
        ("512", "1", false, &["2", "16", "64"]),
        ("64k", "16", true, &["1", "4", "64"]),
        ("64k", "64", true, &["2", "32"]),
    ];
    for &(cs, bits, snapshot, widths) in cases {
        let opts = format!("cluster_size={cs},refcount_bits={bits}");
        refcount_image(d, "img.qcow2", &opts, snapshot);
        for n in widths {
            same_result_as_qemu_img(d, "img.qcow2", &["-o", &format!("refcount_bits={n}")]);
        }
    }
    // A new table of several clusters (10k clusters in use, 64 refcounts a block), whose
    // place depends on QEMU's order of allocation: the blocks range by range, then the table
    // anew after every round that allocated.
    let big = d.join("big.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        path_str(&big),
        "8M",
    ]);
    qemu_io("qcow2", &big, &["write -P 1 0 5M"]);
    same_result_as_qemu_img(d, "big.qcow2", &["-o", "refcount_bits=64"]);
}

#[test]
fn refcount_widths_and_versions_combine_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    refcount_image(d, "v2.qcow2", "compat=0.10", false);
    refcount_image(d, "r8.qcow2", "refcount_bits=8", false);
    // QEMU refuses the downgrade of zstd-compressed clusters after the width changed.
    refcount_image(
        d,
        "zstd.qcow2",
        "refcount_bits=8,compression_type=zstd",
        false,
    );
    // The downgrade writes zeros over the backing file after the width changed (the
    // order decides where the new clusters go).
    refcount_image(d, "base.qcow2", "compat=1.1", false);
    qemu_io("qcow2", &d.join("base.qcow2"), &["write -P 7 0 4M"]);
    let over = "refcount_bits=8,backing_file=base.qcow2,backing_fmt=qcow2";
    refcount_image(d, "over.qcow2", over, false);
    for (image, args) in [
        ("v2.qcow2", &["-o", "refcount_bits=8"][..]),
        ("v2.qcow2", &["-o", "refcount_bits=16"]),
        ("v2.qcow2", &["-o", "compat=1.1,refcount_bits=8"]),
        ("v2.qcow2", &["-o", "refcount_bits=2", "-o", "compat=1.1"]),
        ("r8.qcow2", &["-o", "compat=0.10"]),
        ("r8.qcow2", &["-o", "compat=0.10,refcount_bits=16"]),
        ("r8.qcow2", &["-o", "refcount_bits=128"]),
        ("r8.qcow2", &["-o", "refcount_bits=0"]),
        ("r8.qcow2", &["-o", "refcount_bits=4,lazy_refcounts=on"]),
        ("zstd.qcow2", &["-o", "compat=0.10,refcount_bits=16"]),
        ("over.qcow2", &["-o", "compat=0.10,refcount_bits=16"]),
    ] {
        same_result_as_qemu_img(d, image, args);
    }
}

/// QEMU's `qcow2_upgrade` writes the snapshot table anew when a snapshot lacks the version 3
/// fields: the same bytes here, alone or with other options.
#[test]
fn an_upgrade_adds_the_snapshots_version_3_fields_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = d.join("old.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        path_str(&path),
        "8M",
    ]);
    qemu_io("qcow2", &path, &["write -P 1 0 128k"]);
    qemu_img(&["snapshot", "-c", "s1", path_str(&path)]);
    qemu_io("qcow2", &path, &["write -P 3 0 64k"]);
    qemu_img(&["snapshot", "-c", "s2", path_str(&path)]);
    let with_extra = std::fs::read(&path).unwrap();
    assert_eq!(strip_snapshot_extra_data(&path), 2);
    assert!(
        std::fs::read(&path).unwrap() != with_extra,
        "nothing stripped"
    );
    let check = qemu_check(&path);
    assert_eq!(
        check.status.code(),
        Some(0),
        "the stripped image is not clean"
    );
    same_as_qemu_img(d, "old.qcow2", &["-o", "compat=1.1"]);
    same_as_qemu_img(d, "old.qcow2", &["-o", "compat=1.1,lazy_refcounts=on"]);
    same_result_as_qemu_img(d, "old.qcow2", &["-o", "compat=1.1,refcount_bits=8"]);
    // QEMU upgrades first and keeps the upgrade when the narrower width is refused.
    same_as_qemu_img(d, "old.qcow2", &["-o", "compat=1.1,refcount_bits=1"]);
    // Without an upgrade the table stays as it is.
    same_as_qemu_img(d, "old.qcow2", &["-o", "lazy_refcounts=off"]);
    let after = qemu_img(&["snapshot", "-l", path_str(&d.join("old.qcow2"))]);
    assert!(String::from_utf8_lossy(&after.stdout).contains("s2"));
}
