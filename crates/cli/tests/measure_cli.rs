//! `qimg measure` against `qemu-img measure`: the same arguments give the same output and
//! exit status (messages compared after the program name), for sizes, for sources of both
//! formats (a backing chain, zero clusters, a discard, persistent bitmaps, a raw file with
//! holes) measured as qcow2 images of several geometries and as raw, and for the mistakes
//! qemu-img reports.

use qcow2_tests::{path_str, qemu_img, qemu_img_status, qemu_io, said};
use std::path::Path;
use std::process::Command;

fn same_as_qemu_img(dir: &Path, args: &[&str]) {
    let qemu = qemu_img_status(&[&["measure"], args].concat());
    let ours = Command::new(env!("CARGO_BIN_EXE_qimg"))
        .arg("measure")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run qimg");
    assert_eq!(
        said(&ours, "qimg: "),
        said(&qemu, "qemu-img: "),
        "qimg measure {args:?} differs from qemu-img (left: qimg)"
    );
}

#[test]
fn sizes_and_options_measure_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--size", "1G"][..],
        &["--size", "1000"],
        &["-O", "qcow2", "--size", "0"],
        &["-O", "qcow2", "--size", "1G"],
        &["-O", "qcow2", "--size", "1G", "--output=json"],
        &["-O", "qcow2", "--size", "1G", "--size", "3G"],
        &["-O", "qcow2", "--size", "1G", "-o", "size=2G"],
        &[
            "-O",
            "qcow2",
            "--size",
            "77777777",
            "-o",
            "cluster_size=512",
        ],
        &["-O", "qcow2", "--size", "1G", "-o", "extended_l2=on"],
        &["-O", "qcow2", "--size", "2T", "-o", "cluster_size=2M"],
        &["-O", "qcow2", "--size", "5G", "-o", "refcount_bits=1"],
        &[
            "-O",
            "qcow2",
            "--size",
            "5G",
            "-o",
            "refcount_bits=64,cluster_size=4k",
        ],
        &["-O", "qcow2", "--size", "3G", "-o", "preallocation=full"],
        &["-O", "qcow2", "--size", "3G", "-o", "preallocation=falloc"],
        &[
            "-O",
            "qcow2",
            "--size",
            "3G",
            "-o",
            "preallocation=metadata",
        ],
        &[
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "compat=0.10,lazy_refcounts=off",
        ],
        &["-O", "raw", "--size", "1G", "-o", "preallocation=full"],
    ] {
        same_as_qemu_img(dir.path(), args);
    }
}

#[test]
fn mistakes_are_reported_as_qemu_img_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.qcow2");
    for args in [
        &["-O", "qcow2"][..],
        &["-O", "qcow2", "--size", "-5"],
        &["-O", "qcow2", "--size", "1G", path_str(&missing)],
        &["-O", "foo", "--size", "1G"],
        &["-O", "qcow2", "--size", "1G", "-o", "cluster_size=1000"],
        &[
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "cluster_size=4k,extended_l2=on",
        ],
        &["-O", "qcow2", "--size", "1G", "-o", "refcount_bits=3"],
        &[
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "compat=0.10,refcount_bits=8",
        ],
        &["-O", "qcow2", "--size", "1G", "-o", "compat=0.9"],
        &["-O", "qcow2", "--size", "1G", "-o", "preallocation=bad"],
        &[
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "preallocation=bad,cluster_size=1000",
        ],
        &["-O", "qcow2", "--size", "1G", "-o", "foo=1"],
        &["-O", "qcow2", "--size", "1G", "-o", "extended_l2=maybe"],
        &["-O", "qcow2", "--size", "100T", "-o", "cluster_size=512"],
        &["-O", "raw", "--size", "1G", "-o", "cluster_size=4k"],
    ] {
        same_as_qemu_img(dir.path(), args);
    }
}

#[test]
fn images_measure_as_qemu_img_measures_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    let bitmaps = d.join("bitmaps.qcow2");
    let raw = d.join("holes.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        path_str(&base),
        "64M",
    ]);
    qemu_io(
        "qcow2",
        &base,
        &["write 0 1M", "write 10M 100k", "write 40M 512"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    qemu_io(
        "qcow2",
        &top,
        &["write -z 0 64k", "write 20M 1k", "discard 10M 4k"],
    );
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&bitmaps), "100M"]);
    qemu_img(&["bitmap", "--add", "-g", "512", path_str(&bitmaps), "b1"]);
    qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "2M",
        path_str(&bitmaps),
        "a-longer-bitmap-name",
    ]);
    qemu_io(
        "qcow2",
        &bitmaps,
        &["write 0 3M", "write -z 8M 1M", "write 50M 1k"],
    );
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(10 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&file, b"data", 5_000_000).unwrap();
    std::os::unix::fs::FileExt::write_at(&file, b"tail", (10 << 20) - 4).unwrap();

    for image in [&top, &bitmaps, &base] {
        let p = path_str(image);
        for args in [
            &[p][..],
            &["-O", "qcow2", p],
            &["-O", "qcow2", "--output=json", p],
            &["-O", "qcow2", "-o", "cluster_size=512", p],
            &["-O", "qcow2", "-o", "cluster_size=2M", p],
            &["-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k", p],
            &["-O", "qcow2", "-o", "compat=0.10", p],
            &["-O", "qcow2", "-o", "backing_file=other.qcow2", p],
            &["-O", "qcow2", "-o", "preallocation=falloc", p],
            &["-O", "qcow2", "-f", "qcow2", "-o", "refcount_bits=8", p],
        ] {
            same_as_qemu_img(d, args);
        }
    }
    for args in [
        &["-f", "raw", path_str(&raw)][..],
        &["-O", "qcow2", "-f", "raw", path_str(&raw)],
        &[
            "-O",
            "qcow2",
            "-f",
            "raw",
            "-o",
            "cluster_size=4k",
            path_str(&raw),
        ],
    ] {
        same_as_qemu_img(d, args);
    }
}
