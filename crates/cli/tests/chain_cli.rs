//! qimg as `qemu-img` over backing chains, against the real qemu-img: `map` of part of a
//! chain, `info --backing-chain`, `compare` and `commit -b`. The same arguments run in two
//! directories holding the same files print the same lines, exit with the same status and
//! leave the same images.

use qcow2_tests::{path_str, qemu_img, qemu_io, Pair};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

/// Runs qemu-io's `cmds` on `name` in both directories.
fn write(p: &Pair, name: &str, cmds: &[&str]) {
    for d in [&p.theirs, &p.ours] {
        let out = qemu_io("qcow2", &d.path().join(name), cmds);
        assert!(out.status.success(), "qemu-io {cmds:?}: {out:?}");
    }
}

/// Runs qemu-img with `args` in both directories (`{}` stands for the directory).
fn make(p: &Pair, args: &[&str]) {
    for d in [&p.theirs, &p.ours] {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{}", path_str(d.path())))
            .collect();
        let out = qemu_img(&args);
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    }
}

/// `b.qcow2` (4 MiB: data in the first MiB, a zero cluster at 2 MiB) under `t.qcow2` (data
/// at 512 KiB..1.5 MiB), both directories.
fn two_layers(p: &Pair) {
    make(p, &["create", "-q", "-f", "qcow2", "{}/b.qcow2", "4M"]);
    write(p, "b.qcow2", &["write -P 1 0 1M", "write -z 2M 64k"]);
    make(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            "{}/t.qcow2",
            "4M",
        ],
    );
    write(p, "t.qcow2", &["write -P 2 512k 1M"]);
}

#[test]
fn map_of_part_of_a_chain() {
    let p = Pair::new(QIMG);
    two_layers(&p);
    for range in [
        &["--start-offset=0", "--max-length=1M"][..],
        &["--start-offset=600k", "--max-length=100k"],
        &["--start-offset=600000"],
        &["--start-offset=1k"],
        &["--start-offset=1.5k"],
        &["--max-length=1000"],
        &["--max-length=0"],
        &["--start-offset=3M", "--max-length=10M"],
        &["--start-offset", "4M"],
        &["--start-offset=4194305"],
        &["--start-offset=5M", "--max-length=1"],
        &["--max-length=9223372036854775807"],
        &[
            "--start-offset=9223372036854775807",
            "--max-length=9223372036854775807",
        ],
    ] {
        for output in ["--output=human", "--output=json"] {
            let args = [&["map", output][..], range, &["t.qcow2"]].concat();
            let r = p.same("qemu-img", &args);
            assert_eq!(r.code, Some(0), "{args:?}: {r:?}");
        }
    }
}

#[test]
fn map_refuses_qemu_imgs_bad_ranges() {
    let p = Pair::new(QIMG);
    two_layers(&p);
    for range in [
        &["--start-offset=-1"][..],
        &["--max-length=-1"],
        &["--start-offset=abc"],
        &["--max-length=1x"],
        &["--max-length=9223372036854775808"],
        &["--start-offset=-512", "--max-length=1k"],
    ] {
        let args = [&["map"][..], range, &["t.qcow2"]].concat();
        let r = p.same("qemu-img", &args);
        assert_eq!(r.code, Some(1), "{args:?}: {r:?}");
        assert!(r.stderr[0].starts_with("qemu-img: Invalid "), "{r:?}");
    }
    // The range is checked before the image is opened.
    p.same("qemu-img", &["map", "--max-length=-1", "missing.qcow2"]);
}
