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

/// `base.qcow2` <- `mid.qcow2` <- `top.qcow2` (2 MiB), each with data of its own, both
/// directories.
fn three_layers(p: &Pair) {
    make(p, &["create", "-q", "-f", "qcow2", "{}/base.qcow2", "2M"]);
    write(p, "base.qcow2", &["write -P 1 0 1M"]);
    for (name, backing) in [("mid", "base.qcow2"), ("top", "mid.qcow2")] {
        let path = format!("{{}}/{name}.qcow2");
        make(
            p,
            &[
                "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", &path,
            ],
        );
    }
    write(p, "mid.qcow2", &["write -P 2 256k 256k"]);
    write(
        p,
        "top.qcow2",
        &["write -P 3 384k 256k", "write -z 1536k 64k"],
    );
}

/// Removes (or replaces with `contents`) `name` in both directories.
fn replace(p: &Pair, name: &str, contents: Option<&[u8]>) {
    for d in [&p.theirs, &p.ours] {
        let path = d.path().join(name);
        match contents {
            Some(c) => std::fs::write(&path, c).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        }
    }
}

#[test]
fn info_of_a_backing_chain() {
    let p = Pair::new(QIMG);
    three_layers(&p);
    for args in [
        &["info", "--backing-chain", "top.qcow2"][..],
        &["info", "-b", "--output=json", "top.qcow2"],
        &[
            "info",
            "--backing-chain",
            "--output",
            "json",
            "-U",
            "mid.qcow2",
        ],
        &["info", "-U", "./top.qcow2"],
        &["info", "--output=json", "top.qcow2"],
        &["info", "-b", "-f", "qcow2", "./top.qcow2"],
        &["info", "-b", "--output=json", "base.qcow2"],
    ] {
        let r = p.same("qemu-img", args);
        assert_eq!(r.code, Some(0), "{args:?}: {r:?}");
    }
}

#[test]
fn info_of_a_broken_backing_chain() {
    let p = Pair::new(QIMG);
    three_layers(&p);
    replace(&p, "base.qcow2", Some(b"not an image"));
    for output in ["--output=human", "--output=json"] {
        // The backing file's format is qcow2 (the header says so).
        let r = p.same("qemu-img", &["info", "-b", output, "./top.qcow2"]);
        assert_eq!(r.code, Some(1), "{r:?}");
        assert!(r.stdout.is_empty(), "{r:?}");
    }
    replace(&p, "base.qcow2", None);
    for output in ["--output=human", "--output=json"] {
        let r = p.same("qemu-img", &["info", "-b", output, "top.qcow2"]);
        assert_eq!(r.code, Some(1), "{r:?}");
        // One image alone needs no backing file.
        let r = p.same("qemu-img", &["info", output, "top.qcow2"]);
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    // A chain that comes back to itself.
    make(
        &p,
        &[
            "rebase",
            "-u",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "{}/mid.qcow2",
        ],
    );
    let r = p.same("qemu-img", &["info", "--backing-chain", "top.qcow2"]);
    assert_eq!(r.code, Some(1), "{r:?}");
}
