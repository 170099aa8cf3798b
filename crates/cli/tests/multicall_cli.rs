//! qimg invoked as `qemu-img` and `qemu-io` (through links with those names) against the real
//! tools: the same arguments, run in two directories holding the same files, print the same
//! lines (timing lines aside), exit with the same status and leave the same images. Messages
//! start with the tool's name; usage errors are worded and numbered as QEMU's getopt loops do
//! them; a repeated option is the last one given.

use qcow2_tests::{path_str, qemu_img};
use std::path::Path;

/// The qimg under test and QEMU's tools, each in a directory of its own.
fn pair() -> qcow2_tests::Pair {
    qcow2_tests::Pair::new(Path::new(env!("CARGO_BIN_EXE_qimg")))
}

#[test]
fn usage_errors_are_qemu_imgs() {
    let p = pair();
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
    let p = pair();
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
    let p = pair();
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
    let p = pair();
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
    let p = pair();
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
    let p = pair();
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
fn rebase_setup(p: &qcow2_tests::Pair, opts: &str) {
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
        let p = pair();
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
    let p = pair();
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
        let p = pair();
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
    let p = pair();
    for d in [&p.theirs, &p.ours] {
        qcow2_tests::qemu_io("qcow2", &d.path().join("t.qcow2"), &["write -P 7 0 128k"]);
    }
    p.same(
        "qemu-io",
        &["--image-opts", "-f", "qcow2", "-c", "quit", "t.qcow2"],
    );
    p.same(
        "qemu-io",
        &["-c", "quit", r#"json:{"driver":"qcow2","file":"t.qcow2"}"#],
    );
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
    let p = pair();
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
    let p = pair();
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
    let p = pair();
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
    let p = pair();
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
    let p = pair();
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
    let p = pair();
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

/// `json:` filenames, `--image-opts` lists and the `file:` prefix name the same images as a
/// file name does, with the options taking effect (`backing: null` hides the backing file),
/// in every command that opens images.
#[test]
fn qemu_filename_syntax() {
    let p = pair();
    rebase_setup(&p, "cluster_size=65536");
    let json = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"}}"#;
    let alone = r#"json:{"driver":"qcow2","file.filename":"top.qcow2","backing":null}"#;
    let opts = "driver=qcow2,file.driver=file,file.filename=top.qcow2,cache.direct=off";
    for args in [
        &["info", json][..],
        &["info", "--backing-chain", "file:top.qcow2"],
        &[
            "info",
            "json:{'driver':'qcow2','file':{'filename':'top.qcow2'}}",
        ],
        &["info", "--image-opts", opts],
        &[
            "info",
            "-f",
            "qcow2",
            r#"json:{"file":{"filename":"top.qcow2"}}"#,
        ],
        &["map", "--output=json", json],
        &["map", "--output=json", alone],
        &["map", "--output=json", "--image-opts", opts],
        &["check", json],
        &["check", "--image-opts", opts],
        &["compare", json, "file:top.qcow2"],
        &["compare", alone, "top.qcow2"],
        &[
            "compare",
            "--image-opts",
            opts,
            "driver=qcow2,file.filename=b1.qcow2",
        ],
        &["measure", "-O", "qcow2", json],
        &["snapshot", "-l", json],
        &["convert", "-O", "raw", alone, "alone.raw"],
        &["convert", "--image-opts", "-O", "raw", opts, "top.raw"],
        &[
            "dd",
            "--image-opts",
            "if=driver=qcow2,file.filename=top.qcow2",
            "of=dd.raw",
        ],
        &[
            "resize",
            "--image-opts",
            "driver=qcow2,file.filename=b2.qcow2",
            "2M",
        ],
        &["snapshot", "-c", "s1", "file:b2.qcow2"],
        &["info", "b2.qcow2"],
        &[
            "rebase",
            "-u",
            "-b",
            "b2.qcow2",
            "-F",
            "qcow2",
            "file:top.qcow2",
        ],
        &["info", "top.qcow2"],
    ] {
        p.same_but_sizes("qemu-img", args);
    }
    for name in ["alone.raw", "top.raw", "dd.raw"] {
        let a = std::fs::read(p.theirs.path().join(name)).unwrap();
        let b = std::fs::read(p.ours.path().join(name)).unwrap();
        assert!(a == b, "{name} differs");
    }
    p.same("qemu-io", &["-c", "read -P 3 512k 64k", json]);
    p.same("qemu-io", &["-c", "read -P 0 0 64k", alone]);
    p.same(
        "qemu-io",
        &["--image-opts", "-c", "read -P 3 512k 64k", opts],
    );
    p.same(
        "qemu-io",
        &["-c", "open -r file:top.qcow2", "-c", "read -P 3 512k 64k"],
    );
}

/// Wrong names and options are refused with QEMU's words, before anything is written.
#[test]
fn qemu_filename_syntax_refusals() {
    let p = pair();
    let file = r#""file":{"driver":"file","filename":"t.qcow2"}"#;
    for name in [
        r#"json:{"driver":"qcow2""#.to_owned(),
        "json:[1]".into(),
        "json:{}".into(),
        r#"json:{"driver":"nosuch","file":"t.qcow2"}"#.into(),
        r#"json:{"driver":"qcow2","file":"t.qcow2"}"#.into(),
        r#"json:{"driver":"qcow2","file":{"driver":"file"}}"#.into(),
        r#"json:{"driver":"qcow2","file":{"filename":"t.qcow2","bar":1}}"#.into(),
        r#"json:{"driver":"qcow2","file":{"filename":"nonexist"}}"#.into(),
        format!(r#"json:{{"driver":"qcow2",{file},"foo":1}}"#),
        format!(r#"json:{{"driver":"qcow2",{file},"read-only":"maybe"}}"#),
        format!(r#"json:{{"driver":"qcow2",{file},"l2-cache-size":"abc"}}"#),
        format!(r#"json:{{"driver":"qcow2",{file},"discard":"x"}}"#),
        format!(r#"json:{{"driver":"qcow2",{file},"overlap-check":"x"}}"#),
        format!(r#"json:{{"driver":"qcow2",{file},"backing":"x"}}"#),
        r#"json:{"driver":"qcow2","file":{"filename":"t.qcow2","locking":"maybe"}}"#.into(),
    ] {
        p.same("qemu-img", &["info", &name]);
        p.same("qemu-img", &["check", &name]);
    }
    for opts in [
        "t.qcow2",
        "driver=qcow2",
        "driver=qcow2,file.filename=t.qcow2,foo=1",
    ] {
        p.same("qemu-img", &["info", "--image-opts", opts]);
    }
    p.same(
        "qemu-img",
        &["info", "--image-opts", "-f", "qcow2", "t.qcow2"],
    );
    p.same(
        "qemu-img",
        &[
            "compare",
            "--image-opts",
            "-f",
            "qcow2",
            "t.qcow2",
            "t.qcow2",
        ],
    );
    p.same(
        "qemu-io",
        &["--image-opts", "-f", "qcow2", "-c", "quit", "t.qcow2"],
    );
    p.same(
        "qemu-io",
        &["-c", "quit", r#"json:{"driver":"qcow2","file":"t.qcow2"}"#],
    );
    let before = std::fs::read(p.ours.path().join("t.qcow2")).unwrap();
    p.same(
        "qemu-img",
        &[
            "resize",
            r#"json:{"driver":"qcow2","file":{"filename":"t.qcow2"},"x":1}"#,
            "2M",
        ],
    );
    assert!(before == std::fs::read(p.ours.path().join("t.qcow2")).unwrap());
}

/// `--object`: definitions checked as QEMU checks them; `help` lists what there is.
#[test]
fn qemu_object_definitions() {
    let p = pair();
    for object in [
        "help",
        "secret,help",
        "secret,id=s0,data=abc",
        "secret,id=s0,data=YWJj,format=base64",
        "secret,id=s0,file=t.qcow2",
        "secret,data=abc",
        "secret,id=s0",
        "secret,id=s0,data=a,file=t.qcow2",
        "secret,id=s0,file=/nonexistent",
        "secret,id=s0,data=a,format=foo",
        "secret,id=s0,data=a,bogus=1",
        "qom-type=secret,id=s0,data=x",
        "id=s0,data=x",
        "foo,id=x",
        "iothread,id=io0",
    ] {
        p.same("qemu-img", &["info", "--object", object, "t.qcow2"]);
        p.same("qemu-img", &["map", "--object", object, "t.qcow2"]);
        p.same("qemu-io", &["--object", object, "-c", "quit", "t.qcow2"]);
    }
    p.same(
        "qemu-img",
        &[
            "info",
            "--object",
            "secret,id=s0,data=a",
            "--object",
            "secret,id=s0,data=b",
            "t.qcow2",
        ],
    );
    for object in ["secret,id=s0,data=x", "secret,id=s0", "help"] {
        p.same(
            "qemu-img",
            &["create", "-f", "qcow2", "--object", object, "o.qcow2", "1M"],
        );
    }
    p.same(
        "qemu-img",
        &["create", "--image-opts", "-f", "qcow2", "o.qcow2", "1M"],
    );
    p.same(
        "qemu-img",
        &["bench", "--object", "secret,id=s0", "-c", "1", "t.qcow2"],
    );
    p.same(
        "qemu-img",
        &[
            "bench",
            "--image-opts",
            "-c",
            "1",
            "-d",
            "1",
            "driver=qcow2,file.filename=t.qcow2",
        ],
    );
    p.same(
        "qemu-img",
        &[
            "bitmap",
            "--object",
            "secret,id=s0",
            "--add",
            "t.qcow2",
            "b0",
        ],
    );
    p.same(
        "qemu-img",
        &[
            "bitmap",
            "--object",
            "secret,id=s0,data=x",
            "--add",
            "t.qcow2",
            "b0",
        ],
    );
    p.same_but_sizes("qemu-img", &["info", "t.qcow2"]);
}
