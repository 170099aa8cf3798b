//! `qemu-img convert`'s options (and `-p` of commit and rebase, `-o help` of create, convert
//! and amend) against the real qemu-img: the same arguments in two directories holding the
//! same files print the same (progress reports included), exit with the same status and
//! leave images that read the same.

use qcow2_tests::{path_str, qemu_img, qemu_io, Pair};
use std::path::Path;

/// The qimg under test and QEMU's tools, each in a directory of its own.
fn pair() -> Pair {
    Pair::new(Path::new(env!("CARGO_BIN_EXE_qimg")))
}

/// Each directory: `a.qcow2` (4 MiB: data, a zero cluster, more data), `b.qcow2` (3 MiB,
/// data in the middle), `r.raw` (1 MiB of a pattern) and `z.qcow2` (4 MiB, empty).
fn sources(p: &Pair) {
    for d in [&p.theirs, &p.ours] {
        let dir = d.path();
        let mk = |name: &str, fmt: &str, size: &str, cmds: &[&str]| {
            let path = dir.join(name);
            qemu_img(&["create", "-q", "-f", fmt, path_str(&path), size]);
            if !cmds.is_empty() {
                qemu_io(fmt, &path, cmds);
            }
        };
        mk(
            "a.qcow2",
            "qcow2",
            "4M",
            &["write -P 1 0 1M", "write -z 2M 64k", "write -P 2 3M 64k"],
        );
        mk("b.qcow2", "qcow2", "3M", &["write -P 5 512k 2560k"]);
        mk("r.raw", "raw", "1M", &["write -P 7 0 1M"]);
        mk("z.qcow2", "qcow2", "4M", &[]);
    }
}

#[test]
fn convert_progress_is_qemu_imgs() {
    let p = pair();
    sources(&p);
    for (args, out) in [
        (
            &["convert", "-p", "-O", "qcow2", "a.qcow2", "o1.qcow2"][..],
            "o1.qcow2",
        ),
        (
            &["convert", "-p", "-O", "raw", "a.qcow2", "o2.raw"],
            "o2.raw",
        ),
        (
            &[
                "convert", "-p", "-S", "0", "-O", "qcow2", "a.qcow2", "o3.qcow2",
            ],
            "o3.qcow2",
        ),
        (
            &["convert", "-p", "-c", "-O", "qcow2", "a.qcow2", "o4.qcow2"],
            "o4.qcow2",
        ),
        (
            &[
                "convert", "-p", "-O", "qcow2", "b.qcow2", "r.raw", "a.qcow2", "o5.qcow2",
            ],
            "o5.qcow2",
        ),
        (
            &["convert", "-p", "-q", "-O", "qcow2", "a.qcow2", "o6.qcow2"],
            "o6.qcow2",
        ),
        (
            &["convert", "-p", "-O", "qcow2", "z.qcow2", "o7.qcow2"],
            "o7.qcow2",
        ),
    ] {
        let r = p.same("qemu-img", args);
        assert_eq!(r.code, Some(0), "{args:?}");
        p.same_image(out);
    }
    // Onto a backing file, into an existing image, from a snapshot.
    for d in [&p.theirs, &p.ours] {
        let a = d.path().join("a.qcow2");
        qemu_img(&["snapshot", "-c", "s1", path_str(&a)]);
        qemu_io("qcow2", &a, &["write -P 9 1M 1M"]);
    }
    for args in [
        &[
            "convert", "-p", "-O", "qcow2", "-B", "z.qcow2", "-F", "qcow2", "a.qcow2", "o8.qcow2",
        ][..],
        &["convert", "-p", "-n", "-O", "qcow2", "b.qcow2", "o1.qcow2"],
        &[
            "convert", "-p", "-l", "s1", "-O", "qcow2", "a.qcow2", "o9.qcow2",
        ],
        &[
            "convert",
            "-p",
            "-l",
            "snapshot.name=s1",
            "-O",
            "raw",
            "a.qcow2",
            "r.raw",
            "o10.raw",
        ],
    ] {
        let r = p.same("qemu-img", args);
        assert_eq!(r.code, Some(0), "{args:?}");
    }
    for name in ["o8.qcow2", "o1.qcow2", "o9.qcow2", "o10.raw"] {
        p.same_image(name);
    }
    // A failure still ends the line of reports.
    let r = p.same(
        "qemu-img",
        &["convert", "-p", "-O", "qcow2", "missing.qcow2", "o.qcow2"],
    );
    assert_eq!(r.stdout, ["    (0.00/100%)"]);
}

#[test]
fn convert_sparse_size() {
    let p = pair();
    sources(&p);
    // Data holding runs of zeros of several lengths, some off 4k boundaries.
    for d in [&p.theirs, &p.ours] {
        let sp = d.path().join("sp.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&sp), "4M"]);
        qemu_io(
            "qcow2",
            &sp,
            &[
                "write -P 1 0 1M",
                "write -z 2M 64k",
                "write -P 2 3M 64k",
                "write -P 0 100k 8k",
                "write -P 0 400k 3k",
                "write -P 3 1200k 4k",
                "write -P 0 1204k 60k",
            ],
        );
    }
    for sparse in ["0", "512", "3k", "4k", "64k", "1M", "16M"] {
        for (src, fmt) in [
            ("sp.qcow2", "qcow2"),
            ("sp.qcow2", "raw"),
            ("z.qcow2", "qcow2"),
        ] {
            let out = format!("s{sparse}-{src}.{fmt}");
            p.same("qemu-img", &["convert", "-S", sparse, "-O", fmt, src, &out]);
            p.same_image(&out);
            p.same_own_ranges(&out);
        }
    }
}

#[test]
fn convert_option_errors_are_qemu_imgs() {
    let p = pair();
    sources(&p);
    for opts in [
        &["-S", "1000"][..],
        &["-S", "17M"],
        &["-S", "abc"],
        &["-S", "-1"],
        &["-m", "0"],
        &["-m", "17"],
        &["-m", "x"],
        &["-C", "-c"],
        &["-C", "-S", "4k"],
        &["-C", "--salvage"],
        &["--target-is-zero"],
        &["-n", "-o", "cluster_size=4k"],
        &["-n"],
        // qemu-img says it cannot, and exits with 0.
        &["-n", "--target-is-zero", "-B", "a.qcow2"],
        &["-T", "bogus"],
        &["-p", "-t", "bogus"],
        // Gone from qemu-img: -l takes snapshots.
        &["-s", "snap"],
    ] {
        let mut args = vec!["convert"];
        args.extend(opts);
        args.extend(["-O", "qcow2", "a.qcow2", "missing.qcow2"]);
        let r = p.same("qemu-img", &args);
        assert!(!r.stderr.is_empty(), "{args:?}");
    }
    for args in [
        &["convert", "-O", "qcow2"][..],
        &["convert", "-O", "qcow2", "a.qcow2"],
        &[
            "convert", "-O", "qcow2", "-B", "a.qcow2", "a.qcow2", "b.qcow2", "x.qcow2",
        ],
        &[
            "convert", "-O", "qcow2", "-l", "x", "a.qcow2", "b.qcow2", "x.qcow2",
        ],
    ] {
        let r = p.same("qemu-img", args);
        assert_eq!(r.code, Some(1), "{args:?}");
    }
}

#[test]
fn convert_accepts_tuning_options() {
    let p = pair();
    sources(&p);
    for (args, out) in [
        (
            &[
                "convert", "-W", "-m", "16", "-O", "qcow2", "a.qcow2", "t1.qcow2",
            ][..],
            "t1.qcow2",
        ),
        (
            &["convert", "-C", "-O", "qcow2", "a.qcow2", "t2.qcow2"],
            "t2.qcow2",
        ),
        (
            &[
                "convert", "-r", "1M", "-m", "1", "-O", "raw", "a.qcow2", "t3.raw",
            ],
            "t3.raw",
        ),
        (
            &["convert", "--salvage", "-O", "qcow2", "a.qcow2", "t4.qcow2"],
            "t4.qcow2",
        ),
        (
            &[
                "convert",
                "-t",
                "none",
                "-T",
                "writeback",
                "-O",
                "qcow2",
                "a.qcow2",
                "t5.qcow2",
            ],
            "t5.qcow2",
        ),
    ] {
        let r = p.same("qemu-img", args);
        assert_eq!(r.code, Some(0), "{args:?}");
        p.same_image(out);
    }
}

#[test]
fn convert_into_a_zeroed_target() {
    let p = pair();
    sources(&p);
    for d in [&p.theirs, &p.ours] {
        let path = d.path().join("n.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&path), "4M"]);
    }
    let args = [
        "convert",
        "-n",
        "--target-is-zero",
        "-O",
        "qcow2",
        "a.qcow2",
        "n.qcow2",
    ];
    let r = p.same("qemu-img", &args);
    assert_eq!(r.code, Some(0));
    p.same_image("n.qcow2");
    p.same_own_ranges("n.qcow2");
}

#[test]
fn convert_concatenates_sources() {
    let p = pair();
    sources(&p);
    for args in [
        &[
            "convert", "-O", "qcow2", "b.qcow2", "r.raw", "a.qcow2", "c.qcow2",
        ][..],
        &["info", "c.qcow2"],
        &["convert", "-O", "raw", "r.raw", "b.qcow2", "c.raw"],
        &[
            "convert", "-O", "qcow2", "-c", "a.qcow2", "b.qcow2", "cc.qcow2",
        ],
    ] {
        p.same_but_sizes("qemu-img", args);
    }
    for name in ["c.qcow2", "c.raw", "cc.qcow2"] {
        p.same_image(name);
    }
    p.same_own_ranges("c.qcow2");
}

#[test]
fn option_help_is_qemu_imgs() {
    let p = pair();
    for args in [
        &["create", "-f", "qcow2", "-o", "help"][..],
        &["create", "-f", "qcow2", "-o", "?", "x.qcow2", "1M"],
        &["create", "-f", "raw", "-o", "help"],
        &["create", "-f", "raw", "-o", "help", "x.raw"],
        &["create", "-o", "cluster_size=4k,help", "-f", "qcow2"],
        &["create", "-f", "nosuch", "-o", "help"],
        &["convert", "-O", "qcow2", "-o", "help"],
        &["convert", "-O", "qcow2", "-o", "help", "t.qcow2", "x.qcow2"],
        &["convert", "-o", "?"],
        &["amend", "-f", "qcow2", "-o", "help", "t.qcow2"],
        &["amend", "-o", "help", "t.qcow2"],
    ] {
        p.same("qemu-img", args);
    }
}

/// A chain in each directory: `base.qcow2` (4 MiB of a pattern), `top.qcow2` over it with
/// data of its own, `nb.qcow2` (4 MiB, empty) and `b8.qcow2` / `t8.qcow2` (8 MiB, empty).
fn chain(p: &Pair) {
    for d in [&p.theirs, &p.ours] {
        let dir = d.path();
        let mk = |name: &str, size: &str, backing: Option<&str>, cmds: &[&str]| {
            let path = dir.join(name);
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if let Some(b) = backing {
                args.extend(["-b", b, "-F", "qcow2"]);
            }
            args.extend([path_str(&path), size]);
            qemu_img(&args);
            if !cmds.is_empty() {
                qemu_io("qcow2", &path, cmds);
            }
        };
        mk("base.qcow2", "4M", None, &["write -P 1 0 4M"]);
        mk(
            "top.qcow2",
            "4M",
            Some("base.qcow2"),
            &["write -P 2 1M 64k", "write -P 3 3M 1M"],
        );
        mk("nb.qcow2", "4M", None, &[]);
        mk("b8.qcow2", "8M", None, &["write -P 4 1M 1M"]);
        mk("t8.qcow2", "8M", Some("b8.qcow2"), &[]);
    }
}

#[test]
fn rebase_progress_is_qemu_imgs() {
    let p = pair();
    chain(&p);
    for args in [
        &["rebase", "-p", "-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"][..],
        &[
            "rebase",
            "-p",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["rebase", "-p", "-b", "", "t8.qcow2"],
        &[
            "rebase",
            "-p",
            "-q",
            "-b",
            "nb.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["rebase", "-p", "-b", "missing", "-F", "qcow2", "top.qcow2"],
        &[
            "rebase",
            "-p",
            "-u",
            "-b",
            "nb.qcow2",
            "-F",
            "qcow2",
            "missing.qcow2",
        ],
    ] {
        p.same("qemu-img", args);
    }
    p.same_image("top.qcow2");
    p.same_image("t8.qcow2");
}

/// A commit's progress report, the intermediate figures aside: qemu-img's block job
/// reports as often as its event loop turns, which varies from run to run.
fn commit_report(r: &qcow2_tests::Run) -> Vec<String> {
    let mut out = Vec::new();
    for line in &r.stdout {
        let reports: Vec<&str> = line.split('\r').filter(|s| !s.is_empty()).collect();
        match reports.as_slice() {
            [first, .., last] if first.starts_with("    (") => {
                out.extend([first.to_string(), last.to_string()]);
            }
            _ => out.push(line.clone()),
        }
    }
    out
}

#[test]
fn commit_progress_is_qemu_imgs() {
    let p = pair();
    chain(&p);
    for args in [
        &["commit", "-p", "-d", "top.qcow2"][..],
        &["commit", "-p", "t8.qcow2"],
        &["commit", "-p", "-q", "top.qcow2"],
        &["commit", "-p", "nb.qcow2"],
        &["commit", "-p", "-b", "x", "top.qcow2"],
        &["commit", "-p", "missing.qcow2"],
    ] {
        let (theirs, ours) = p.both("qemu-img", args);
        assert_eq!(ours.code, theirs.code, "{args:?}");
        assert_eq!(ours.stderr, theirs.stderr, "{args:?}");
        assert_eq!(commit_report(&ours), commit_report(&theirs), "{args:?}");
    }
    p.same_image("top.qcow2");
    p.same_image("base.qcow2");
    p.same_own_ranges("top.qcow2");
}

#[test]
fn convert_salvages_what_it_cannot_read() {
    let p = pair();
    for d in [&p.theirs, &p.ours] {
        let (s, c) = (d.path().join("s.qcow2"), d.path().join("c.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&s), "1M"]);
        qemu_io("qcow2", &s, &["write -P 1 0 128k", "write -P 2 512k 64k"]);
        qemu_img(&["convert", "-c", "-O", "qcow2", path_str(&s), path_str(&c)]);
        // The first compressed cluster no longer inflates: reading it fails.
        let map = qcow2_tests::qemu_img_json(&["map", "--output=json", path_str(&c)]);
        assert_eq!(map[0]["compressed"], true, "{map}");
        let mut bytes = std::fs::read(&c).unwrap();
        // The compressed clusters are packed into the last (partial) host cluster.
        let data = (bytes.len() - 1) / 0x10000 * 0x10000;
        assert!(
            bytes[data..].iter().any(|&b| b != 0),
            "compressed data at the end"
        );
        bytes[data..data + 64].fill(0xaa);
        std::fs::write(&c, bytes).unwrap();
    }
    for args in [
        &["convert", "-O", "qcow2", "c.qcow2", "o1.qcow2"][..],
        &["convert", "--salvage", "-O", "qcow2", "c.qcow2", "o2.qcow2"],
        &[
            "convert",
            "--salvage",
            "-q",
            "-O",
            "raw",
            "c.qcow2",
            "o3.raw",
        ],
    ] {
        let r = p.same("qemu-img", args);
        assert!(r.stderr.iter().any(|l| l.contains("error while reading")) != args.contains(&"-q"));
    }
    p.same_image("o2.qcow2");
    p.same_image("o3.raw");
}

#[test]
fn convert_odd_sizes_and_backing_files() {
    let p = pair();
    for d in [&p.theirs, &p.ours] {
        let dir = d.path();
        let f = |n: &str| dir.join(n);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "raw",
            path_str(&f("odd.raw")),
            "1000k",
        ]);
        qemu_io("raw", &f("odd.raw"), &["write -P 3 0 1000k"]);
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&f("a.qcow2")), "1M"]);
        qemu_io(
            "qcow2",
            &f("a.qcow2"),
            &["write -P 1 0 100k", "write -z 512k 64k"],
        );
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            path_str(&f("bk.qcow2")),
            "2M",
        ]);
        qemu_io("qcow2", &f("bk.qcow2"), &["write -P 9 0 2M"]);
        let top = path_str(&f("top.qcow2")).to_owned();
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", "bk.qcow2", "-F", "qcow2", &top, "3M",
        ]);
        qemu_io(
            "qcow2",
            &f("top.qcow2"),
            &[
                "write -P 8 1M 64k",
                "write -z 100k 8k",
                "write -z 2560k 64k",
            ],
        );
    }
    let backing = ["-B", "bk.qcow2", "-F", "qcow2"];
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["-c", "odd.raw", "a.qcow2", "odd.raw"], "c1.qcow2"),
        (
            [&backing[..], &["-S", "0", "top.qcow2"]].concat(),
            "c2.qcow2",
        ),
        ([&backing[..], &["-c", "top.qcow2"]].concat(), "c3.qcow2"),
        (vec!["-o", "preallocation=metadata", "a.qcow2"], "c4.qcow2"),
        (vec!["top.qcow2"], "c5.qcow2"),
    ];
    for (opts, out) in cases {
        let mut args = vec!["convert", "-p", "-O", "qcow2"];
        args.extend(opts);
        args.push(out);
        p.same("qemu-img", &args);
        p.same_image(out);
        p.same_own_ranges(out);
    }
    p.same(
        "qemu-img",
        &["convert", "-p", "-S", "0", "odd.raw", "a.qcow2", "c6.raw"],
    );
    p.same_image("c6.raw");
}
