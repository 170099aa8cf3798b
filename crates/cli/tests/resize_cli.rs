//! `qimg resize` against `qemu-img resize`.
//!
//! Every case builds one image (and its backing or data file) with qemu-img and qemu-io,
//! copies the directory, and runs the same steps in both copies: resizes (`qemu-img resize`
//! in one, `qimg resize` in the other, with the same arguments and the same relative names)
//! and qemu-io writes in between (on both). Each resize must give the same exit status, the
//! same stdout ("Image resized.") and the same stderr (after the program name). At the end:
//!
//! - `qemu-img compare` finds the two images identical;
//! - `qemu-img check` finds ours clean: no corruption, no leak (and QEMU's too);
//! - `qemu-img info --output=json` gives both the same virtual size;
//! - where QEMU's layout is deterministic and ours follows it, `qemu-img map --output=json`
//!   prints the same mappings (host offsets included); the cases where it does not are
//!   marked, with the reason.
//!
//! The matrix: grows by odd amounts, grows across L1 growth (512-byte clusters, so a small
//! image needs a bigger L1 table; up to an L1 table longer than a refcount block's range),
//! shrinks with and without data past the new end (cluster-aligned or not, and grown back:
//! the tail of a cut cluster shows again, as with QEMU), relative sizes, every
//! preallocation mode, backing files reaching past the old end (v3 hides them, v2 is
//! refused), extended L2, v2, other refcount widths, internal snapshots, external data
//! files, raw images, and qemu-img's error paths.
//!
//! `resize_with_bitmaps_agrees_with_qemu_img` resizes images with persistent dirty bitmaps
//! (enabled and disabled, several granularities, 512-byte clusters so that the bitmap tables
//! change length): the same messages, the same bitmaps in `qemu-img info`, a clean check, and
//! every bitmap's dirty extents the same in both files; a bitmap left in use by a crash is
//! refused by both.

use qcow2_tests::tool;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const IMG: &str = "img.qcow2";

fn run_in(program: &Path, dir: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .env("LC_ALL", "C")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn qimg(dir: &Path, args: &[&str]) -> Output {
    run_in(Path::new(env!("CARGO_BIN_EXE_qimg")), dir, args)
}

fn qemu(program: &str, dir: &Path, args: &[&str]) -> Output {
    run_in(&tool(program), dir, args)
}

fn qemu_ok(program: &str, dir: &Path, args: &[&str]) -> Output {
    let out = qemu(program, dir, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Exit status, stdout, and stderr without the program's name.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(out: Output, program: &str) -> Run {
    let prefix = format!("{program}: ");
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| l.strip_prefix(&prefix).unwrap_or(l).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    Run {
        code: out.status.code().expect("exit status"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    }
}

/// What an image starts as.
#[derive(Clone, Copy)]
enum Base {
    /// `qemu-img create -f qcow2 -o OPTS img SIZE`.
    Qcow2(&'static str, &'static str),
    /// Backed by a fully written qcow2 `base.qcow2` of the given size: (options, base size,
    /// top size).
    Backed(&'static str, &'static str, &'static str),
    /// A raw file of this size.
    Raw(&'static str),
    /// With the external data file `data.raw` (options appended to `data_file=data.raw`).
    DataFile(&'static str, &'static str),
}

/// One step, on both copies.
#[derive(Clone, Copy)]
enum Step {
    /// `resize ARGS... img SIZE` (the image name goes before the last argument).
    Resize(&'static [&'static str]),
    /// qemu-io commands (on both copies).
    Io(&'static [&'static str]),
    /// `qemu-img snapshot -c NAME` (on both).
    Snapshot(&'static str),
}

struct Case {
    name: &'static str,
    base: Base,
    /// qemu-io commands that fill the image first.
    fill: &'static [&'static str],
    steps: &'static [Step],
    /// Why the host layout may differ from QEMU's (`None`: `qemu-img map` must agree).
    map_differs: Option<&'static str>,
}

use Step::{Io, Resize, Snapshot};

fn cases() -> Vec<Case> {
    let mut v = grows();
    v.extend(shrinks());
    v.extend(preallocations());
    v.extend(backed_and_features());
    v.extend(refusals());
    v
}

fn grows() -> Vec<Case> {
    vec![
        Case {
            name: "grow by odd amounts",
            base: Base::Qcow2("cluster_size=65536", "1M"),
            fill: &["write -P 0xab 0 1M"],
            steps: &[
                Resize(&["+1536"]),
                Resize(&["+512"]),
                Io(&["write -P 0xcd 1048576 2048"]),
                Resize(&["2049K"]),
                Resize(&["+0"]),
            ],
            map_differs: None,
        },
        Case {
            name: "grow across L1 growth, 512-byte clusters",
            base: Base::Qcow2("cluster_size=512", "64K"),
            fill: &["write -P 0xab 0 64K"],
            steps: &[
                Resize(&["1M"]),
                Io(&["write -P 0x11 900K 8K"]),
                Resize(&["+3M"]),
                Io(&["write -P 0x22 3M 64K"]),
                Resize(&["64M"]),
            ],
            map_differs: None,
        },
        Case {
            // 8 GiB: an L1 table of 2 MiB, longer than the 128 KiB a refcount block counts.
            name: "grow to an L1 table longer than a refcount block's range",
            base: Base::Qcow2("cluster_size=512", "1M"),
            fill: &["write -P 0xab 0 1M"],
            steps: &[Resize(&["8G"]), Io(&["write -P 0x33 7G 4K"])],
            map_differs: None,
        },
        Case {
            name: "grow refcount_bits=1, 4k clusters",
            base: Base::Qcow2("cluster_size=4096,refcount_bits=1", "1M"),
            fill: &["write -P 0xab 0 1M"],
            steps: &[Resize(&["+300M"]), Io(&["write -P 0x44 200M 1M"])],
            map_differs: None,
        },
    ]
}

fn shrinks() -> Vec<Case> {
    vec![
        Case {
            name: "shrink cutting data, then grow back",
            base: Base::Qcow2("cluster_size=65536", "1M"),
            fill: &["write -P 0xab 0 1M"],
            steps: &[Resize(&["--shrink", "512K"]), Resize(&["1M"])],
            map_differs: None,
        },
        Case {
            // The tail of the cut cluster keeps its bytes, and shows again after the grow.
            name: "shrink to an unaligned end, then grow back",
            base: Base::Qcow2("cluster_size=65536", "1M"),
            fill: &["write -P 0xab 0 1M"],
            steps: &[Resize(&["--shrink", "524800"]), Resize(&["1M"])],
            map_differs: None,
        },
        Case {
            name: "shrink with nothing past the new end",
            base: Base::Qcow2("cluster_size=65536", "4M"),
            fill: &["write -P 0xab 0 256K"],
            steps: &[Resize(&["--shrink", "1M"]), Resize(&["--shrink", "-512K"])],
            map_differs: None,
        },
        Case {
            // Refcount blocks that count only themselves go, and the file is cut before them.
            name: "shrink 512-byte clusters, relative sizes, grow again",
            base: Base::Qcow2("cluster_size=512", "1M"),
            fill: &["write -P 0xcd 0 1M"],
            steps: &[
                Resize(&["--shrink", "100K"]),
                Resize(&["--shrink", "-512"]),
                Resize(&["+2M"]),
                Io(&["write -P 0x55 1M 64K"]),
            ],
            map_differs: None,
        },
        Case {
            name: "shrink v2",
            base: Base::Qcow2("compat=0.10,cluster_size=4096", "2M"),
            fill: &["write -P 0xab 0 2M"],
            steps: &[Resize(&["--shrink", "1M"]), Resize(&["3M"])],
            map_differs: None,
        },
        Case {
            name: "shrink extended L2",
            base: Base::Qcow2("extended_l2=on,refcount_bits=64", "2M"),
            fill: &["write -P 0xab 0 2M", "write -z 100K 50K"],
            steps: &[Resize(&["--shrink", "700K"]), Resize(&["2M"])],
            map_differs: None,
        },
        Case {
            name: "shrink and grow with an internal snapshot",
            base: Base::Qcow2("cluster_size=512", "256K"),
            fill: &["write -P 0x11 0 256K"],
            steps: &[
                Snapshot("s1"),
                Io(&["write -P 0x22 0 64K", "write -P 0x33 200K 40K"]),
                Resize(&["--shrink", "64K"]),
                Resize(&["2M"]),
            ],
            map_differs: None,
        },
    ]
}

fn preallocations() -> Vec<Case> {
    const META: &[Step] = &[Resize(&["--preallocation=metadata", "+3M"])];
    const FALLOC: &[Step] = &[Resize(&["--preallocation=falloc", "+3M"])];
    const FULL: &[Step] = &[Resize(&["--preallocation=full", "+3M"])];
    const META_SMALL: &[Step] = &[Resize(&["--preallocation=metadata", "2M"])];
    const FALLOC_SMALL: &[Step] = &[Resize(&["--preallocation=falloc", "2M"])];
    const FULL_SMALL: &[Step] = &[Resize(&["--preallocation=full", "2M"])];
    let mut v = Vec::new();
    for steps in [META, FALLOC, FULL] {
        v.push(Case {
            name: "preallocated grow, 64k clusters",
            base: Base::Qcow2("cluster_size=65536", "1M"),
            fill: &["write -P 0xab 0 1000K"],
            steps,
            map_differs: None,
        });
    }
    for steps in [META_SMALL, FALLOC_SMALL, FULL_SMALL] {
        v.push(Case {
            name: "preallocated grow, 512-byte clusters (new refcount blocks, a moved table)",
            base: Base::Qcow2("cluster_size=512", "1M"),
            fill: &["write -P 0xab 0 64K"],
            steps,
            map_differs: None,
        });
    }
    v.push(Case {
        name: "preallocated grow from an unaligned size",
        base: Base::Qcow2("cluster_size=65536", "1536"),
        fill: &["write -P 0xab 0 1536"],
        steps: &[
            Resize(&["--preallocation=falloc", "1M"]),
            Resize(&["--preallocation=metadata", "2M"]),
        ],
        map_differs: Some(
            "the cluster at an unaligned old end is allocated by a guest write here, where QEMU \
             makes it the first cluster of the preallocated run (the content is the same)",
        ),
    });
    v.push(Case {
        name: "external data file: grow, shrink, preallocate",
        base: Base::DataFile("", "1M"),
        fill: &["write -P 0xab 0 1M"],
        steps: &[
            Resize(&["3M"]),
            Resize(&["--shrink", "512K"]),
            Resize(&["--preallocation=full", "2M"]),
        ],
        map_differs: None,
    });
    v.push(Case {
        name: "raw external data file: the new area is mapped",
        base: Base::DataFile(",data_file_raw=on", "1000K"),
        fill: &["write -P 0xab 0 1000K"],
        steps: &[Resize(&["3M"]), Resize(&["--shrink", "1536K"])],
        map_differs: Some(
            "qemu-img map asks the data file for holes when the image looks metadata \
             preallocated, which it judges by the image file's allocated size: this engine \
             writes metadata clusters sparsely, QEMU whole",
        ),
    });
    v
}

fn backed_and_features() -> Vec<Case> {
    vec![
        Case {
            name: "backing file reaching past the old end: the new area reads zeros",
            base: Base::Backed("cluster_size=65536", "2M", "1M"),
            fill: &["write -P 0x11 0 4K"],
            steps: &[Resize(&["3M"])],
            map_differs: None,
        },
        Case {
            name: "backing file reaching past an unaligned old end",
            base: Base::Backed("cluster_size=65536", "2M", "1001K"),
            fill: &["write -P 0x11 0 4K"],
            steps: &[Resize(&["3M"])],
            map_differs: None,
        },
        Case {
            name: "backing file reaching past the old end, extended L2 (zero subclusters)",
            base: Base::Backed("extended_l2=on", "2M", "1000K"),
            fill: &["write -P 0x11 0 4K"],
            steps: &[Resize(&["3M"])],
            map_differs: None,
        },
        Case {
            name: "backing file reaching past the old end, preallocated",
            base: Base::Backed("cluster_size=65536", "2M", "1M"),
            fill: &["write -P 0x11 0 4K"],
            steps: &[
                Resize(&["--preallocation=metadata", "2M"]),
                Resize(&["--preallocation=full", "3M"]),
            ],
            map_differs: None,
        },
        Case {
            name: "shrink below the backing file's end, grow again",
            base: Base::Backed("cluster_size=65536", "2M", "2M"),
            fill: &["write -P 0x11 0 1M"],
            steps: &[Resize(&["--shrink", "512K"]), Resize(&["3M"])],
            map_differs: None,
        },
        Case {
            name: "raw grow, shrink, falloc, full",
            base: Base::Raw("1M"),
            fill: &[],
            steps: &[
                Resize(&["-f", "raw", "+1000"]),
                Resize(&["-f", "raw", "--shrink", "1000"]),
                Resize(&["-f", "raw", "--preallocation=falloc", "3M"]),
                Resize(&["-f", "raw", "--preallocation=full", "4M"]),
                Resize(&["-f", "raw", "--preallocation=metadata", "5M"]),
                Resize(&["-f", "raw", "2000"]),
            ],
            map_differs: None,
        },
    ]
}

fn refusals() -> Vec<Case> {
    vec![
        Case {
            name: "qemu-img's error paths",
            base: Base::Qcow2("cluster_size=65536", "1M"),
            fill: &["write -P 0xab 0 1M"],
            steps: &[
                Resize(&["512K"]),
                Resize(&["-512K"]),
                Resize(&["+1000"]),
                Resize(&["1000"]),
                Resize(&["--shrink", "-3M"]),
                Resize(&["0"]),
                Resize(&["8E"]),
                Resize(&["16E"]),
                Resize(&["+1G1"]),
                Resize(&["+-5"]),
                Resize(&["--preallocation=bogus", "3M"]),
                Resize(&["--preallocation=metadata", "1M"]),
                Resize(&["--preallocation=full", "--shrink", "512K"]),
                Resize(&["-q", "2M"]),
            ],
            map_differs: None,
        },
        Case {
            name: "an L1 table past QEMU's limit",
            base: Base::Qcow2("cluster_size=512", "1M"),
            fill: &[],
            steps: &[Resize(&["200G"])],
            map_differs: None,
        },
        Case {
            name: "a v2 image with snapshots",
            base: Base::Qcow2("compat=0.10", "1M"),
            fill: &["write -P 0xab 0 64K"],
            steps: &[Snapshot("s1"), Resize(&["2M"])],
            map_differs: None,
        },
        Case {
            // QEMU grows the L1 table first and then fails; nothing changes here.
            name: "a v2 image whose backing file reaches past the old end",
            base: Base::Backed("compat=0.10,cluster_size=4096", "2M", "1M"),
            fill: &[],
            steps: &[Resize(&["3M"])],
            map_differs: None,
        },
    ]
}

/// Builds the base in `dir`.
fn build(dir: &Path, case: &Case) -> (&'static str, &'static str) {
    match case.base {
        Base::Qcow2(opts, size) => {
            qemu_ok(
                "qemu-img",
                dir,
                &["create", "-q", "-f", "qcow2", "-o", opts, IMG, size],
            );
        }
        Base::Backed(opts, base_size, size) => {
            qemu_ok(
                "qemu-img",
                dir,
                &["create", "-q", "-f", "qcow2", "base.qcow2", base_size],
            );
            let fill = format!("write -P 0x5a 0 {base_size}");
            qemu_ok("qemu-io", dir, &["-f", "qcow2", "-c", &fill, "base.qcow2"]);
            let args = [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                IMG,
                size,
            ];
            qemu_ok("qemu-img", dir, &args);
        }
        Base::Raw(size) => {
            qemu_ok("qemu-img", dir, &["create", "-q", "-f", "raw", IMG, size]);
        }
        Base::DataFile(opts, size) => {
            let opts = format!("data_file=data.raw{opts}");
            qemu_ok(
                "qemu-img",
                dir,
                &["create", "-q", "-f", "qcow2", "-o", &opts, IMG, size],
            );
        }
    }
    let fmt = match case.base {
        Base::Raw(_) => "raw",
        _ => "qcow2",
    };
    io(dir, fmt, case.fill);
    (fmt, IMG)
}

fn io(dir: &Path, fmt: &str, cmds: &[&str]) {
    if cmds.is_empty() {
        return;
    }
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(IMG);
    let out = qemu_ok("qemu-io", dir, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// `resize ARGS... IMG SIZE`: the image name before the last argument.
fn resize_args<'a>(args: &'a [&'a str]) -> Vec<&'a str> {
    let (size, opts) = args.split_last().expect("a size");
    let mut v = vec!["resize"];
    v.extend(opts);
    v.extend([IMG, size]);
    v
}

fn info(dir: &Path, fmt: &str) -> Value {
    let out = qemu_ok("qemu-img", dir, &["info", "-f", fmt, "--output=json", IMG]);
    serde_json::from_slice(&out.stdout).expect("info JSON")
}

fn map(dir: &Path, fmt: &str) -> String {
    let out = qemu_ok("qemu-img", dir, &["map", "-f", fmt, "--output=json", IMG]);
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn run_case(case: &Case, root: &Path) {
    let theirs = root.join("qemu");
    let ours = root.join("ours");
    std::fs::create_dir_all(&theirs).unwrap();
    let (fmt, _) = build(&theirs, case);
    copy_dir(&theirs, &ours);
    for step in case.steps {
        match *step {
            Resize(args) => {
                let a = resize_args(args);
                let q = run(qemu("qemu-img", &theirs, &a), "qemu-img");
                let o = run(qimg(&ours, &a), "qimg");
                assert_eq!(o, q, "{}: {a:?}", case.name);
            }
            Io(cmds) => {
                io(&theirs, fmt, cmds);
                io(&ours, fmt, cmds);
            }
            Snapshot(name) => {
                qemu_ok("qemu-img", &theirs, &["snapshot", "-c", name, IMG]);
                qemu_ok("qemu-img", &ours, &["snapshot", "-c", name, IMG]);
            }
        }
    }
    check_result(case, fmt, &theirs, &ours);
}

fn check_result(case: &Case, fmt: &str, theirs: &Path, ours: &Path) {
    let name = case.name;
    if let Base::DataFile(..) = case.base {
        // The data file's name is relative to the current directory: each image is read in
        // its own.
        assert_eq!(raw(theirs), raw(ours), "{name}: the disks differ");
    } else {
        let cmp = qemu(
            "qemu-img",
            root_of(ours),
            &[
                "compare",
                "-f",
                fmt,
                "-F",
                fmt,
                "qemu/img.qcow2",
                "ours/img.qcow2",
            ],
        );
        assert!(
            cmp.status.success(),
            "{name}: qemu-img compare: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
    }
    if fmt == "qcow2" {
        for dir in [theirs, ours] {
            let out = qemu("qemu-img", dir, &["check", IMG]);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{name}: qemu-img check in {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let snapshots = info(theirs, fmt)["snapshots"].clone();
        assert_eq!(
            snapshots.is_array(),
            info(ours, fmt)["snapshots"].is_array()
        );
        if let Some(list) = snapshots.as_array() {
            for s in list {
                let tag = s["name"].as_str().expect("snapshot name");
                assert_eq!(
                    snapshot_raw(theirs, tag),
                    snapshot_raw(ours, tag),
                    "{name}: snapshot {tag} reads differently"
                );
            }
        }
    }
    assert_eq!(
        info(ours, fmt)["virtual-size"],
        info(theirs, fmt)["virtual-size"],
        "{name}: virtual size"
    );
    if case.map_differs.is_none() {
        assert_eq!(map(ours, fmt), map(theirs, fmt), "{name}: qemu-img map");
    }
}

fn root_of(dir: &Path) -> &Path {
    dir.parent().expect("case directory")
}

fn raw(dir: &Path) -> Vec<u8> {
    qemu_ok("qemu-img", dir, &["convert", "-O", "raw", IMG, "disk.raw"]);
    let bytes = std::fs::read(dir.join("disk.raw")).unwrap();
    std::fs::remove_file(dir.join("disk.raw")).unwrap();
    bytes
}

fn snapshot_raw(dir: &Path, tag: &str) -> Vec<u8> {
    let snap = format!("snapshot.name={tag}");
    qemu_ok(
        "qemu-img",
        dir,
        &["convert", "-l", &snap, "-O", "raw", IMG, "snap.raw"],
    );
    let bytes = std::fs::read(dir.join("snap.raw")).unwrap();
    std::fs::remove_file(dir.join("snap.raw")).unwrap();
    bytes
}

#[test]
fn resize_agrees_with_qemu_img() {
    for (i, case) in cases().iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let root: PathBuf = dir.path().join(format!("case{i}"));
        run_case(case, &root);
    }
}

/// `qemu-img info`'s bitmaps, as JSON.
fn info_bitmaps(dir: &Path) -> Value {
    info(dir, "qcow2")["format-specific"]["data"]["bitmaps"].clone()
}

/// The dirty extents of bitmap `name` of `dir/IMG`, read by the engine after close.
fn dirty_extents(dir: &Path, name: &str) -> Vec<(u64, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = qcow2_engine::ImageOptions::new().read_only(true);
        let img = qcow2_engine::Image::open(blockio::FileOpener, &dir.join(IMG), opts)
            .await
            .unwrap();
        let e = img.bitmap_dirty_extents(name).await.unwrap();
        img.close().await.unwrap();
        e
    })
}

/// Both copies (`qemu`, `ours` under `root`) of a 1 MiB image with 512-byte clusters and
/// three bitmaps: `b0` (enabled, 4 KiB granules), `b1` (disabled, 128 KiB), `b2` (enabled,
/// 512 bytes: a table of several entries once the disk passes 2 MiB), with bits set.
fn bitmap_pair(root: &Path) -> (PathBuf, PathBuf) {
    let theirs = root.join("qemu");
    let ours = root.join("ours");
    std::fs::create_dir_all(&theirs).unwrap();
    let create = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        IMG,
        "1M",
    ];
    qemu_ok("qemu-img", &theirs, &create);
    io(&theirs, "qcow2", &["write 0 64k"]);
    qemu_ok("qemu-img", &theirs, &["bitmap", "--add", IMG, "b0"]);
    qemu_ok(
        "qemu-img",
        &theirs,
        &["bitmap", "--add", "-g", "128k", IMG, "b1"],
    );
    let g512 = ["bitmap", "--add", "-g", "512", IMG, "b2"];
    qemu_ok("qemu-img", &theirs, &g512);
    io(&theirs, "qcow2", &["write 100k 8k", "write 900k 124k"]);
    qemu_ok("qemu-img", &theirs, &["bitmap", "--disable", IMG, "b1"]);
    io(&theirs, "qcow2", &["write 300k 4k"]);
    copy_dir(&theirs, &ours);
    (theirs, ours)
}

fn same_resize(theirs: &Path, ours: &Path, args: &[&str]) {
    let a = resize_args(args);
    let q = run(qemu("qemu-img", theirs, &a), "qemu-img");
    let o = run(qimg(ours, &a), "qimg");
    assert_eq!(o, q, "{a:?}");
}

fn same_bitmaps(theirs: &Path, ours: &Path, what: &str) {
    let list = info_bitmaps(theirs);
    assert_eq!(info_bitmaps(ours), list, "{what}: qemu-img info's bitmaps");
    let out = qemu("qemu-img", ours, &["check", IMG]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for b in list.as_array().expect("bitmaps") {
        let name = b["name"].as_str().unwrap();
        let want = dirty_extents(theirs, name);
        assert!(!want.is_empty(), "{what}: bitmap {name} has bits set");
        assert_eq!(
            dirty_extents(ours, name),
            want,
            "{what}: dirty extents of {name}"
        );
    }
    assert_eq!(
        info(ours, "qcow2")["virtual-size"],
        info(theirs, "qcow2")["virtual-size"],
        "{what}: virtual size"
    );
}

#[test]
fn resize_with_bitmaps_agrees_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (theirs, ours) = bitmap_pair(dir.path());
    // b2's table: 1 entry at 1 MiB, 2 at 3 MiB (its data needs a second cluster).
    same_resize(&theirs, &ours, &["3M"]);
    same_bitmaps(&theirs, &ours, "grown to 3M");
    for d in [&theirs, &ours] {
        io(d, "qcow2", &["write 2600k 8k"]);
    }
    same_bitmaps(&theirs, &ours, "written past the old end");
    // Cuts bits of every bitmap (b1's partial granule at the end stays).
    same_resize(&theirs, &ours, &["--shrink", "700K"]);
    same_bitmaps(&theirs, &ours, "shrunk to 700K");
    // What was cut comes back clear.
    same_resize(&theirs, &ours, &["+1M"]);
    same_bitmaps(&theirs, &ours, "grown back");
    let cmp = qemu(
        "qemu-img",
        dir.path(),
        &["compare", "qemu/img.qcow2", "ours/img.qcow2"],
    );
    assert!(cmp.status.success(), "qemu-img compare");
}

/// A bitmap left in use by a crash: QEMU refuses to resize, with its words.
#[test]
fn resize_with_an_inconsistent_bitmap_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (theirs, ours) = bitmap_pair(dir.path());
    qcow2_tests::qemu_io_abort("qcow2", &theirs.join(IMG), &["write 0 4k"]);
    std::fs::copy(theirs.join(IMG), ours.join(IMG)).unwrap();
    same_resize(&theirs, &ours, &["2M"]);
    same_resize(&theirs, &ours, &["--shrink", "512K"]);
    assert_eq!(info(&ours, "qcow2")["virtual-size"], 1 << 20);
    assert_eq!(info_bitmaps(&ours), info_bitmaps(&theirs));
}
