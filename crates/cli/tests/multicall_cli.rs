//! qimg invoked as `qemu-img` and `qemu-io` (through links with those names) against the real
//! tools: the same arguments, run in two directories holding the same files, print the same
//! lines (timing lines aside), exit with the same status and leave the same images. Messages
//! start with the tool's name; usage errors are worded and numbered as QEMU's getopt loops do
//! them; a repeated option is the last one given.

use qcow2_tests::{path_str, qemu_img, Pair};

const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

#[test]
fn usage_errors_are_qemu_imgs() {
    let p = Pair::new(QIMG);
    for args in [
        &[][..],
        &["frobnicate"],
        &["info", "-Z", "t.qcow2"],
        &["info", "--zork", "t.qcow2"],
        &["info"],
        &["check", "-Q", "t.qcow2"],
    ] {
        let r = p.same("qemu-img", args);
        assert_eq!(r.code, Some(1), "{args:?}");
        let first = &r.stderr[0];
        assert!(
            first.starts_with("qemu-img") || first.starts_with("PROG "),
            "{r:?}"
        );
    }
}

#[test]
fn qemu_img_commands_print_as_qemu_img() {
    let p = Pair::new(QIMG);
    p.same("qemu-img", &["create", "-f", "qcow2", "n.qcow2", "2M"]);
    let a = std::fs::read(p.theirs.path().join("n.qcow2")).unwrap();
    let b = std::fs::read(p.ours.path().join("n.qcow2")).unwrap();
    assert!(a == b, "qemu-img create made different files");
    p.same("qemu-img", &["info", "t.qcow2"]);
    p.same("qemu-img", &["check", "t.qcow2"]);
    p.same("qemu-img", &["map", "--output=json", "t.qcow2"]);
    // The last -f wins.
    p.same("qemu-img", &["info", "-f", "raw", "-f", "qcow2", "t.qcow2"]);
    let r = p.same("qemu-img", &["info", "missing.qcow2"]);
    assert_eq!(
        r.stderr,
        [
            "qemu-img: Could not open 'missing.qcow2': Could not open 'missing.qcow2': \
          No such file or directory"
        ]
    );
    p.same("qemu-img", &["resize", "t.qcow2", "+1M"]);
    p.same_image("t.qcow2");
}

#[test]
fn qemu_io_runs_as_qemu_io() {
    let p = Pair::new(QIMG);
    let r = p.same(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 4k 64k",
            "-c",
            "read -P 0xab 4k 64k",
            "-c",
            "write -z 512k 128k",
            "-c",
            "writev -P 0x11 8k 512 4k 1k",
            "-c",
            "readv -P 0x11 8k 5k 512",
            "-c",
            "readv -v 8k 16 16",
            "-c",
            "readv -P 0x12 8k 512",
            "-c",
            "readv -Z 8k 512",
            "-c",
            "write -b -P 0x21 0 64k",
            "-c",
            "write -b -P 0x22 700M 4k",
            "-c",
            "read -b -P 0x21 0 64k",
            "-c",
            "read -b -P 0x22 700M 4k",
            "-c",
            "read -b -P 0 300M 4k",
            "t.qcow2",
        ],
    );
    assert_eq!(
        r.code,
        Some(1),
        "the failed pattern check and the bad option"
    );
    p.same_image("t.qcow2");
    // The last -f wins; a read-only open refuses writes with QEMU's message.
    let r = p.same(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-f",
            "qcow2",
            "-r",
            "-c",
            "write 0 512",
            "t.qcow2",
        ],
    );
    assert_eq!(r.stderr, ["qemu-io: Block node is read-only"]);
    let r = p.same("qemu-io", &["-c", "read 0 512", "missing.qcow2"]);
    assert_eq!(
        r.stderr,
        [
            "qemu-io: can't open device missing.qcow2: Could not open 'missing.qcow2': \
          No such file or directory"
        ]
    );
    // An unknown option: the first line is getopt's (qemu-io prints its usage after it).
    let (theirs, ours) = p.both("qemu-io", &["-Z", "t.qcow2"]);
    assert_eq!((ours.code, &ours.stderr), (theirs.code, &theirs.stderr));
}

#[test]
fn qemu_io_cache_modes() {
    let p = Pair::new(QIMG);
    for mode in ["writeback", "writethrough", "directsync", "unsafe", "none"] {
        // The last --cache wins.
        let r = p.same(
            "qemu-io",
            &[
                "--cache",
                "none",
                "--cache",
                mode,
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5a 64k 68k",
                "-c",
                "aio_write -P 0x5b 256k 4k",
                "-c",
                "aio_flush",
                "-c",
                "flush",
                "-c",
                "read -P 0x5a 64k 68k",
                "t.qcow2",
            ],
        );
        assert_eq!(r.code, Some(0), "{mode}");
        p.same_image("t.qcow2");
    }
    let (theirs, ours) = p.both("qemu-io", &["-t", "bogus", "-c", "flush", "t.qcow2"]);
    assert_eq!(ours.code, theirs.code);
}

#[test]
fn qemu_io_map_and_alloc() {
    let p = Pair::new(QIMG);
    // A backing file with data, and a top layer with data, zeros and nothing.
    for d in [&p.theirs, &p.ours] {
        let dir = d.path();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            path_str(&dir.join("base.qcow2")),
            "4M",
        ]);
        qcow2_tests::qemu_io(
            "qcow2",
            &dir.join("base.qcow2"),
            &["write 0 128k", "write 3M 1k"],
        );
        let top = dir.join("top.qcow2");
        let base = dir.join("base.qcow2");
        let args = ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"];
        qemu_img(&[&args[..], &[path_str(&base), path_str(&top)]].concat());
        qcow2_tests::qemu_io("qcow2", &top, &["write 64k 64k", "write -z 1M 64k"]);
    }
    for image in ["top.qcow2", "base.qcow2"] {
        let r = p.same(
            "qemu-io",
            &[
                "-c",
                "map",
                "-c",
                "alloc 0",
                "-c",
                "alloc 0 256k",
                "-c",
                "a 1M 128k",
                "-c",
                "alloc 1000",
                "-c",
                "alloc 3M 2M",
                "-c",
                "alloc 4M",
                "-c",
                "alloc",
                image,
            ],
        );
        assert!(
            r.stdout
                .iter()
                .any(|l| l.contains("    allocated at offset")),
            "{r:?}"
        );
    }
}

#[test]
fn qemu_img_compare_quiet_and_strict() {
    let p = Pair::new(QIMG);
    for d in [&p.theirs, &p.ours] {
        let other = d.path().join("u.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&other), "2M"]);
        qcow2_tests::qemu_io("qcow2", &other, &["write 1536k 4k"]);
    }
    for args in [
        &["compare", "t.qcow2", "u.qcow2"][..],
        &["compare", "-q", "t.qcow2", "u.qcow2"],
        &["compare", "-s", "t.qcow2", "u.qcow2"],
        &["compare", "-q", "-s", "t.qcow2", "u.qcow2"],
        &["compare", "-q", "t.qcow2", "t.qcow2"],
        &[
            "compare", "-q", "-f", "qcow2", "-F", "qcow2", "t.qcow2", "t.qcow2",
        ],
        &["compare", "-q", "t.qcow2", "missing.qcow2"],
    ] {
        p.same("qemu-img", args);
    }
}

/// Each directory: `b1.qcow2` and `b2.qcow2` with overlapping data, `top.qcow2` over `b1`
/// with data of its own (`opts` for all three).
fn rebase_setup(p: &Pair, opts: &str) {
    for d in [&p.theirs, &p.ours] {
        let dir = d.path();
        let mk = |name: &str, backing: Option<&str>| {
            let path = dir.join(name);
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o", opts];
            if let Some(b) = backing {
                args.extend(["-b", b, "-F", "qcow2"]);
            }
            args.extend([path_str(&path), "1M"]);
            qemu_img(&args);
            path
        };
        let b1 = mk("b1.qcow2", None);
        let b2 = mk("b2.qcow2", None);
        let top = mk("top.qcow2", Some("b1.qcow2"));
        qcow2_tests::qemu_io("qcow2", &b1, &["write -P 1 0 128k", "write -P 4 900k 3k"]);
        qcow2_tests::qemu_io("qcow2", &b2, &["write -P 2 64k 128k", "write -P 4 900k 3k"]);
        qcow2_tests::qemu_io("qcow2", &top, &["write -P 3 512k 64k", "write -P 5 70k 1k"]);
    }
}

#[test]
fn qemu_img_rebase_keeps_what_the_image_reads() {
    for opts in [
        "cluster_size=65536",
        "cluster_size=512",
        "extended_l2=on,cluster_size=64k",
    ] {
        let p = Pair::new(QIMG);
        rebase_setup(&p, opts);
        for args in [
            &["rebase", "-b", "b2.qcow2", "-F", "qcow2", "top.qcow2"][..],
            &["info", "top.qcow2"],
            &["rebase", "-b", "", "top.qcow2"],
            &["info", "top.qcow2"],
        ] {
            p.same_but_sizes("qemu-img", args);
            p.same_image("top.qcow2");
        }
    }
}

#[test]
fn qemu_img_rebase_unsafe_and_refusals() {
    let p = Pair::new(QIMG);
    rebase_setup(&p, "cluster_size=65536");
    for args in [
        &["rebase", "top.qcow2"][..],
        &["rebase", "-b", "b2.qcow2", "top.qcow2"],
        &["rebase", "-b", "gone.qcow2", "-F", "qcow2", "top.qcow2"],
        &[
            "rebase",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["info", "top.qcow2"],
        &["rebase", "-b", "b2.qcow2", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-u", "-b", "b2.qcow2", "-F", "qcow2", "top.qcow2"],
        &["info", "top.qcow2"],
        &["rebase", "-u", "top.qcow2"],
        &["info", "top.qcow2"],
    ] {
        // qemu-img copies before it finds -F missing (the contents stay the same).
        p.same_but_sizes("qemu-img", args);
    }
    // Unsafe mode changed the name only: both read what b2 and top say.
    p.same_image("top.qcow2");
}

#[test]
fn qemu_img_commit_writes_the_image_into_its_backing_file() {
    for opts in [
        "cluster_size=65536",
        "cluster_size=512",
        "extended_l2=on,cluster_size=64k",
    ] {
        let p = Pair::new(QIMG);
        rebase_setup(&p, opts);
        for d in [&p.theirs, &p.ours] {
            let top = d.path().join("top.qcow2");
            qcow2_tests::qemu_io("qcow2", &top, &["write -z 0 4k", "write -z 800k 64k"]);
        }
        for args in [
            &["commit", "b1.qcow2"][..],
            &["commit", "-b", "b2.qcow2", "top.qcow2"],
            &["commit", "-d", "-b", "b1.qcow2", "top.qcow2"],
            &["commit", "top.qcow2"],
            &["commit", "-q", "top.qcow2"],
        ] {
            p.same("qemu-img", args);
            p.same_image("top.qcow2");
            p.same_image("b1.qcow2");
            p.same_own_ranges("top.qcow2");
        }
    }
}

#[test]
fn qemu_io_snapshot_mode_leaves_the_image_alone() {
    let p = Pair::new(QIMG);
    for d in [&p.theirs, &p.ours] {
        qcow2_tests::qemu_io("qcow2", &d.path().join("t.qcow2"), &["write -P 7 0 128k"]);
    }
    let before = std::fs::read(p.ours.path().join("t.qcow2")).unwrap();
    let r = p.same(
        "qemu-io",
        &[
            "-s",
            "-c",
            "write -P 9 64k 128k",
            "-c",
            "read -P 7 0 64k",
            "-c",
            "read -P 9 64k 128k",
            "-c",
            "map",
            "t.qcow2",
        ],
    );
    assert_eq!(r.code, Some(0));
    assert!(
        std::fs::read(p.ours.path().join("t.qcow2")).unwrap() == before,
        "-s wrote to the image"
    );
    p.same_image("t.qcow2");
}

#[test]
fn qemu_io_close_drains_then_closes() {
    let p = Pair::new(QIMG);
    let r = p.same(
        "qemu-io",
        &[
            "-c",
            "aio_write -P 3 0 1M",
            "-c",
            "close",
            "-c",
            "read 0 512",
            "-c",
            "close",
            "t.qcow2",
        ],
    );
    assert_eq!(r.stderr.len(), 2, "{r:?}");
    p.same_image("t.qcow2");
}

#[test]
fn qemu_img_check_repair_clears_unknown_autoclear_bits() {
    let p = Pair::new(QIMG);
    for d in [&p.theirs, &p.ours] {
        let path = d.path().join("t.qcow2");
        let mut bytes = std::fs::read(&path).unwrap();
        // autoclear_features, header bytes 88..96: bit 63, which no one knows.
        bytes[88] |= 0x80;
        std::fs::write(&path, bytes).unwrap();
    }
    p.same("qemu-img", &["check", "t.qcow2"]);
    p.same("qemu-img", &["check", "-r", "all", "t.qcow2"]);
    let ours = std::fs::read(p.ours.path().join("t.qcow2")).unwrap();
    let theirs = std::fs::read(p.theirs.path().join("t.qcow2")).unwrap();
    assert_eq!(ours[88..96], theirs[88..96]);
    assert_eq!(ours[88..96], [0; 8]);
}

#[test]
fn qemu_img_bitmap_long_options() {
    let p = Pair::new(QIMG);
    for args in [
        &["bitmap", "--add", "--granularity", "128k", "t.qcow2", "b0"][..],
        &["bitmap", "--add", "--granularity=256k", "t.qcow2", "b1"],
        &[
            "bitmap",
            "--merge",
            "b0",
            "--source-file",
            "t.qcow2",
            "--source-format=qcow2",
            "t.qcow2",
            "b1",
        ],
        &["info", "t.qcow2"],
    ] {
        p.same_but_sizes("qemu-img", args);
    }
}

#[test]
fn qemu_img_convert_onto_a_backing_file() {
    let p = Pair::new(QIMG);
    rebase_setup(&p, "cluster_size=65536");
    for args in [
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "b1.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "new.qcow2",
        ][..],
        &["info", "new.qcow2"],
        &[
            "convert",
            "-O",
            "raw",
            "-B",
            "b1.qcow2",
            "top.qcow2",
            "new.raw",
        ],
    ] {
        p.same_but_sizes("qemu-img", args);
    }
    p.same_image("new.qcow2");
    p.same_own_ranges("new.qcow2");
}

#[test]
fn qemu_img_convert_into_an_existing_image() {
    let p = Pair::new(QIMG);
    rebase_setup(&p, "cluster_size=65536");
    for d in [&p.theirs, &p.ours] {
        let dir = d.path();
        // Targets full of another pattern: -n must overwrite what the source reads as zeros.
        for (name, fmt) in [("old.qcow2", "qcow2"), ("old.raw", "raw")] {
            let path = dir.join(name);
            qemu_img(&["create", "-q", "-f", fmt, path_str(&path), "1M"]);
            qcow2_tests::qemu_io(fmt, &path, &["write -P 0x77 0 1M"]);
        }
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            path_str(&dir.join("small.qcow2")),
            "512k",
        ]);
    }
    for args in [
        &["convert", "-n", "-O", "qcow2", "top.qcow2", "old.qcow2"][..],
        &["convert", "-n", "-O", "raw", "top.qcow2", "old.raw"],
        &["convert", "-n", "-O", "qcow2", "top.qcow2", "small.qcow2"],
        &["convert", "-n", "-O", "qcow2", "top.qcow2", "missing.qcow2"],
        &["compare", "top.qcow2", "old.qcow2"],
        &["compare", "-F", "raw", "top.qcow2", "old.raw"],
    ] {
        p.same("qemu-img", args);
    }
    p.same_image("old.qcow2");
}

#[test]
fn qemu_img_dd() {
    let p = Pair::new(QIMG);
    rebase_setup(&p, "cluster_size=65536");
    for args in [
        &[
            "dd",
            "if=top.qcow2",
            "of=a.raw",
            "bs=64k",
            "count=4",
            "skip=1",
        ][..],
        &["dd", "-O", "qcow2", "if=top.qcow2", "of=b.qcow2", "bs=1M"],
        &["info", "b.qcow2"],
        &["map", "--output=json", "b.qcow2"],
        &[
            "dd",
            "if=top.qcow2",
            "of=c.raw",
            "bs=3",
            "count=1000",
            "skip=7",
        ],
        &["dd", "if=top.qcow2", "of=d.raw", "count=1", "skip=100000"],
        &["dd", "if=top.qcow2"],
        &["dd", "if=top.qcow2", "of=x", "bs=0"],
        &["dd", "if=top.qcow2", "of=x", "bs=abc"],
        &["dd", "if=top.qcow2", "of=x", "foo=1"],
    ] {
        p.same_but_sizes("qemu-img", args);
    }
    for name in ["a.raw", "c.raw", "d.raw"] {
        let a = std::fs::read(p.theirs.path().join(name)).unwrap();
        let b = std::fs::read(p.ours.path().join(name)).unwrap();
        assert!(a == b, "{name} differs");
    }
    p.same_image("b.qcow2");
}
