//! `qimg amend` against `qemu-img amend`: on two byte-identical copies of an image, the same
//! `-o` options must give the same messages and exit status and leave byte-identical files
//! (the header rewritten as QEMU writes it, zero clusters expanded for version 2 as QEMU
//! expands them), and `qemu-img check` must say the same of both. Images: plain, over a backing file, with
//! preallocated metadata, version 2, lazy refcounts, an external data file.

use qcow2_tests::{path_str, qemu_img, qemu_img_status, qemu_io, said};
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

/// What qimg cannot do yet it refuses by name, before writing anything.
#[test]
fn a_refcount_width_change_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&img), "8M"]);
    let before = std::fs::read(&img).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_qimg"))
        .args(["amend", "-o", "refcount_bits=8", path_str(&img)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refcount width"), "{err}");
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
}
