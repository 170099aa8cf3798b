//! qimg as `qemu-img` over backing chains, against the real qemu-img: `map` of part of a
//! chain, `info --backing-chain`, `compare` and `commit -b`. The same arguments run in two
//! directories holding the same files print the same lines, exit with the same status and
//! leave the same images.

use qcow2_tests::{path_str, qemu_img, qemu_io, Pair, QemuIoHolder};

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
    let p = Pair::new(std::path::Path::new(QIMG));
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
    let p = Pair::new(std::path::Path::new(QIMG));
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
    let p = Pair::new(std::path::Path::new(QIMG));
    three_layers(&p);
    make(
        &p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "{}/\u{e9}\"\u{1f600}.qcow2",
            "1M",
        ],
    );
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
        // QEMU's JSON escapes what is not printable ASCII.
        &["info", "--output=json", "\u{e9}\"\u{1f600}.qcow2"],
    ] {
        let r = p.same("qemu-img", args);
        assert_eq!(r.code, Some(0), "{args:?}: {r:?}");
    }
}

#[test]
fn info_of_a_chain_in_use() {
    let p = Pair::new(std::path::Path::new(QIMG));
    three_layers(&p);
    // A writer of the top image in each directory: -U coexists with it, a plain open does
    // not.
    let _writers: Vec<QemuIoHolder> = [&p.theirs, &p.ours]
        .iter()
        .map(|d| QemuIoHolder::new(&["-f", "qcow2"], &d.path().join("top.qcow2")))
        .collect();
    for (args, code) in [
        (&["info", "-U", "-b", "top.qcow2"][..], 0),
        (&["info", "--force-share", "--output=json", "top.qcow2"], 0),
        (&["info", "top.qcow2"], 1),
        (&["info", "-b", "top.qcow2"], 1),
        (&["map", "-U", "--start-offset=256k", "top.qcow2"], 0),
        (&["compare", "-U", "top.qcow2", "mid.qcow2"], 1),
    ] {
        let (theirs, ours) = p.both("qemu-img", args);
        // 'disk size' changes while the writer runs; the rest must agree.
        let keep = |r: &qcow2_tests::Run| {
            let mut out = r.stdout.clone();
            out.retain(|l| !l.contains("disk size") && !l.contains("actual-size"));
            (out, r.stderr.clone(), r.code)
        };
        assert_eq!(keep(&ours), keep(&theirs), "{args:?}: ours, then QEMU's");
        assert_eq!(ours.code, Some(code), "{args:?}: {ours:?}");
    }
}

#[test]
fn info_of_a_broken_backing_chain() {
    let p = Pair::new(std::path::Path::new(QIMG));
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

/// `a.qcow2` (2 MiB) and `b.qcow2` (3 MiB) with the same first 64 KiB, `r.raw` (2 MiB) the
/// same, both directories.
fn compare_images(p: &Pair) {
    make(p, &["create", "-q", "-f", "qcow2", "{}/a.qcow2", "2M"]);
    make(p, &["create", "-q", "-f", "qcow2", "{}/b.qcow2", "3M"]);
    make(p, &["create", "-q", "-f", "raw", "{}/r.raw", "2M"]);
    write(p, "a.qcow2", &["write -P 1 0 64k"]);
    write(p, "b.qcow2", &["write -P 1 0 64k"]);
    for d in [&p.theirs, &p.ours] {
        let out = qemu_io("raw", &d.path().join("r.raw"), &["write -P 1 0 64k"]);
        assert!(out.status.success(), "{out:?}");
    }
}

/// `qemu-img compare ARGS` in both directories must print the same and exit with `code`.
fn compare(p: &Pair, args: &[&str], code: i32) {
    let r = p.same("qemu-img", &[&["compare"][..], args].concat());
    assert_eq!(r.code, Some(code), "{args:?}: {r:?}");
}

#[test]
fn compare_sizes_formats_and_strict_mode() {
    let p = Pair::new(std::path::Path::new(QIMG));
    compare_images(&p);
    compare(&p, &["a.qcow2", "b.qcow2"], 0);
    compare(&p, &["b.qcow2", "a.qcow2"], 0);
    compare(&p, &["-s", "a.qcow2", "b.qcow2"], 1);
    compare(&p, &["--strict", "-q", "a.qcow2", "b.qcow2"], 1);
    compare(&p, &["a.qcow2", "r.raw"], 0);
    compare(&p, &["-f", "qcow2", "-F", "raw", "a.qcow2", "r.raw"], 0);
    // The raw file holds zeros where a.qcow2 has nothing: the same contents, not the same
    // block status.
    compare(&p, &["-s", "a.qcow2", "r.raw"], 1);
    compare(&p, &["-s", "-T", "none", "-U", "a.qcow2", "a.qcow2"], 0);
    // The qcow2 file read as raw: a content mismatch before the sizes are looked at.
    compare(&p, &["-f", "raw", "a.qcow2", "r.raw"], 1);
    // The extra part of the larger image must read as zeros.
    write(&p, "b.qcow2", &["write -P 7 2M 512"]);
    compare(&p, &["a.qcow2", "b.qcow2"], 1);
    compare(&p, &["-q", "b.qcow2", "a.qcow2"], 1);
    write(&p, "b.qcow2", &["write -z 2M 64k", "write -P 3 1000 1"]);
    compare(&p, &["a.qcow2", "b.qcow2"], 1);
    // Errors: exit status 2.
    compare(&p, &["a.qcow2", "missing.qcow2"], 2);
    compare(&p, &["-f", "foo", "a.qcow2", "r.raw"], 2);
    compare(&p, &["-F", "foo", "a.qcow2", "r.raw"], 2);
    compare(&p, &["a.qcow2"], 1);
}

#[test]
fn compare_a_chain_with_its_copy() {
    let p = Pair::new(std::path::Path::new(QIMG));
    three_layers(&p);
    make(
        &p,
        &["convert", "-O", "qcow2", "{}/top.qcow2", "{}/flat.qcow2"],
    );
    make(
        &p,
        &[
            "convert",
            "-O",
            "qcow2",
            "-S",
            "0",
            "{}/top.qcow2",
            "{}/full.qcow2",
        ],
    );
    for other in ["flat.qcow2", "full.qcow2", "mid.qcow2"] {
        for strict in [&[][..], &["-s"]] {
            let args = [strict, &["top.qcow2", other]].concat();
            let r = p.same("qemu-img", &[&["compare"][..], &args].concat());
            assert!(matches!(r.code, Some(0 | 1)), "{args:?}: {r:?}");
        }
    }
}

#[test]
fn compare_progress_is_accepted() {
    let p = Pair::new(std::path::Path::new(QIMG));
    compare_images(&p);
    for args in [
        &["-p", "a.qcow2", "r.raw"][..],
        &["-p", "a.qcow2", "b.qcow2"],
        &["-p", "-q", "a.qcow2", "b.qcow2"],
        &["-p", "a.qcow2", "missing.qcow2"],
    ] {
        let (mut theirs, mut ours) = p.both("qemu-img", &[&["compare"][..], args].concat());
        // qemu-img draws its progress with carriage returns; qimg does not draw it.
        for r in [&mut theirs, &mut ours] {
            for l in &mut r.stdout {
                *l = l.rsplit('\r').next().unwrap_or_default().to_owned();
            }
        }
        assert_eq!(ours, theirs, "{args:?}: ours, then QEMU's");
    }
}

/// `qemu-img commit ARGS` on a fresh three-image chain in both directories: the same output
/// and exit status (`code`), then the same contents and allocation in each image.
fn commit(args: &[&str], code: i32) {
    let p = Pair::new(std::path::Path::new(QIMG));
    three_layers(&p);
    let r = p.same("qemu-img", &[&["commit"][..], args].concat());
    assert_eq!(r.code, Some(code), "{args:?}: {r:?}");
    for name in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
        p.same_image(name);
        p.same_own_ranges(name);
    }
}

#[test]
fn commit_into_a_deeper_base() {
    // The data of top and mid goes into base; top and mid stay as they were (-b implies
    // -d).
    commit(&["-b", "base.qcow2", "top.qcow2"], 0);
    commit(&["-b", "./base.qcow2", "-q", "top.qcow2"], 0);
    // -b naming the backing file keeps the image too.
    commit(&["-b", "mid.qcow2", "top.qcow2"], 0);
    commit(&["-b", "base.qcow2", "mid.qcow2"], 0);
    commit(&["top.qcow2"], 0);
    commit(&["-d", "top.qcow2"], 0);
}

#[test]
fn commit_refuses_what_qemu_img_refuses() {
    commit(&["-b", "nope.qcow2", "top.qcow2"], 1);
    commit(&["-b", "top.qcow2", "top.qcow2"], 1);
    commit(&["-b", "x", "base.qcow2"], 1);
    commit(&["base.qcow2"], 1);
    let p = Pair::new(std::path::Path::new(QIMG));
    three_layers(&p);
    replace(&p, "base.qcow2", None);
    // "Could not open backing file: " once for each level down to the missing file.
    for args in [
        &["commit", "top.qcow2"][..],
        &["commit", "-b", "base.qcow2", "top.qcow2"],
        &["commit", "-b", "nope", "top.qcow2"],
        &["map", "top.qcow2"],
        &["compare", "top.qcow2", "mid.qcow2"],
        &["commit", "mid.qcow2"],
        &["commit", "-b", "base.qcow2", "mid.qcow2"],
        &["commit", "-b", "nope", "mid.qcow2"],
    ] {
        let r = p.same("qemu-img", args);
        assert!(matches!(r.code, Some(1 | 2)), "{args:?}: {r:?}");
    }
    replace(&p, "base.qcow2", Some(b"not an image"));
    for args in [&["commit", "top.qcow2"][..], &["map", "mid.qcow2"]] {
        let r = p.same("qemu-img", args);
        assert_eq!(r.code, Some(1), "{args:?}: {r:?}");
    }
    // Both left as they were (both made alike by qemu-img).
    for name in ["top.qcow2", "mid.qcow2"] {
        let read = |d: &tempfile::TempDir| std::fs::read(d.path().join(name)).unwrap();
        assert!(read(&p.theirs) == read(&p.ours), "{name} changed");
    }
}

#[test]
fn commit_grows_a_smaller_base() {
    for args in [&["-b", "base.qcow2", "top.qcow2"][..], &["mid.qcow2"]] {
        let p = Pair::new(std::path::Path::new(QIMG));
        // base 1 MiB <- mid 1.5 MiB <- top 2 MiB: what top reads past mid's end is zeros.
        make(&p, &["create", "-q", "-f", "qcow2", "{}/base.qcow2", "1M"]);
        for (name, backing, size) in [("mid", "base.qcow2", "1536k"), ("top", "mid.qcow2", "2M")] {
            let path = format!("{{}}/{name}.qcow2");
            make(
                &p,
                &[
                    "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", &path, size,
                ],
            );
        }
        write(&p, "mid.qcow2", &["write -P 4 1M 64k"]);
        write(&p, "top.qcow2", &["write -P 3 1600k 64k"]);
        let r = p.same("qemu-img", &[&["commit"][..], args].concat());
        assert_eq!(r.code, Some(0), "{args:?}: {r:?}");
        p.same_but_sizes("qemu-img", &["info", "base.qcow2"]);
        // (Where QEMU's commit puts the clusters varies from run to run: not the offsets.)
        p.same_own_ranges("base.qcow2");
        p.same_image("base.qcow2");
    }
}
