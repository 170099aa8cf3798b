//! `qimg bitmap` against `qemu-img bitmap`: the same commands on two copies of an image must
//! say the same (message, exit status), leave the same bitmaps (`qemu-img info` names,
//! granularities, flags) and, after further `qemu-io` writes to both, the same bits, which
//! must be those the writes define (each write rounded out to the granularity). `qemu-img
//! check` must find nothing wrong (no leak) in qimg's copy.

use qcow2_engine::{Image, ImageOptions};
use qcow2_tests::{path_str, qemu_img, qemu_img_json, qemu_img_status, qemu_io, said};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SIZE: u64 = 32 << 20;

/// stderr with the program's name taken off, QEMU's node name (which qimg cannot know)
/// replaced; stdout; exit status.
fn seen(o: &Output, program: &str) -> (String, String, Option<i32>) {
    let (out, err, status) = said(o, program);
    let err = err
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.replace("qemu-img bitmap: ", "qimg bitmap: "))
        .map(|l| match l.split_once("persistent in '") {
            Some((a, b)) => format!("{a}persistent in NODE{}", &b[b.find('\'').unwrap() + 1..]),
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    (out, err, status)
}

/// Two copies: qemu-img's and qimg's.
struct Pair {
    theirs: PathBuf,
    ours: PathBuf,
}

impl Pair {
    fn new(dir: &Path, name: &str, create: &[&str]) -> Pair {
        let theirs = dir.join(format!("{name}.qemu.qcow2"));
        let ours = dir.join(format!("{name}.qimg.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(create);
        let size = SIZE.to_string();
        args.extend_from_slice(&[path_str(&theirs), &size]);
        qemu_img(&args);
        std::fs::copy(&theirs, &ours).unwrap();
        Pair { theirs, ours }
    }

    /// `bitmap ARGS IMAGE BITMAP` with both programs: same messages and exit status, same
    /// bitmaps listed, qimg's copy clean.
    fn same(&self, args: &[&str], bitmap: &str) {
        let run = |program: &str, target: &Path| {
            Command::new(program)
                .arg("bitmap")
                .args(args)
                .arg(target)
                .arg(bitmap)
                .env("LC_ALL", "C")
                .output()
                .unwrap_or_else(|e| panic!("run {program} (qemu-img: package qemu-utils): {e}"))
        };
        let q = run("qemu-img", &self.theirs);
        let o = run(env!("CARGO_BIN_EXE_qimg"), &self.ours);
        assert_eq!(
            seen(&o, "qimg: "),
            seen(&q, "qemu-img: "),
            "bitmap {args:?} {bitmap}: qimg says otherwise (left: qimg)"
        );
        assert_eq!(
            bitmaps(&self.ours),
            bitmaps(&self.theirs),
            "bitmap {args:?} {bitmap}: bitmaps differ (left: qimg)"
        );
        let check = qemu_img_status(&["check", path_str(&self.ours)]);
        let text = String::from_utf8_lossy(&check.stdout).into_owned();
        assert!(
            check.status.success() && !text.contains("leaked"),
            "bitmap {args:?} {bitmap}: qemu-img check on qimg's copy:\n{text}{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    fn write(&self, writes: &[(u64, u64)]) {
        let cmds: Vec<String> = writes
            .iter()
            .map(|(o, l)| format!("write -P 0x33 {o} {l}"))
            .collect();
        qemu_io("qcow2", &self.theirs, &cmds);
        qemu_io("qcow2", &self.ours, &cmds);
    }

    /// The dirty extents of `bitmap` in both copies (read by the engine): equal, and returned.
    fn extents(&self, bitmap: &str) -> Vec<(u64, u64)> {
        let ours = extents(&self.ours, bitmap);
        assert_eq!(
            ours,
            extents(&self.theirs, bitmap),
            "bitmap {bitmap} (left: qimg)"
        );
        ours
    }
}

/// `qemu-img info`'s bitmaps: (name, granularity, flags).
fn bitmaps(image: &Path) -> Vec<(String, u64, Vec<String>)> {
    let info = qemu_img_json(&["info", "--output=json", path_str(image)]);
    let Some(list) = info["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            let flags = b["flags"].as_array().unwrap();
            (
                b["name"].as_str().unwrap().to_owned(),
                b["granularity"].as_u64().unwrap(),
                flags
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

fn extents(image: &Path, bitmap: &str) -> Vec<(u64, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = ImageOptions::new().read_only(true);
        let img = Image::open(blockio::FileOpener, image, opts).await.unwrap();
        let e = img.bitmap_dirty_extents(bitmap).await.unwrap();
        img.close().await.unwrap();
        e
    })
}

/// The granules `writes` touch, as merged byte ranges.
fn expected(writes: &[(u64, u64)], granularity: u64) -> Vec<(u64, u64)> {
    let mut set = std::collections::BTreeSet::new();
    for &(o, l) in writes {
        set.extend(o / granularity..=(o + l - 1) / granularity);
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for g in set {
        let (start, len) = (g * granularity, granularity.min(SIZE - g * granularity));
        match out.last_mut() {
            Some((o, l)) if *o + *l == start => *l += len,
            _ => out.push((start, len)),
        }
    }
    out
}

#[test]
fn actions_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pair::new(dir.path(), "a", &[]);
    p.same(&["--add"], "b");
    p.same(&["--add", "-g", "512"], "small");
    p.same(&["--add", "-g", "1M", "--disable"], "off");
    p.same(&["--add", "-g", "2G"], "huge");
    p.same(&["--add", "-g", "4k"], "gone");
    let first = [(0, 512), (70000, 100), (1 << 20, 3 << 20), (SIZE - 1, 1)];
    p.write(&first);
    assert_eq!(p.extents("b"), expected(&first, 65536));
    assert_eq!(p.extents("small"), expected(&first, 512));
    assert_eq!(p.extents("huge"), expected(&first, 1 << 31));
    assert_eq!(p.extents("off"), vec![]);
    p.same(&["--remove"], "gone");
    p.same(&["--clear"], "b");
    p.same(&["--enable"], "off");
    p.same(&["--disable"], "small");
    let second = [(8 << 20, 4096), (9 << 20, 65537)];
    p.write(&second);
    assert_eq!(p.extents("b"), expected(&second, 65536));
    assert_eq!(p.extents("off"), expected(&second, 1 << 20));
    assert_eq!(p.extents("small"), expected(&first, 512));
    // Merge across granularities, then into a new bitmap added by the same command.
    p.same(&["--merge", "small"], "b");
    let both: Vec<(u64, u64)> = first.iter().chain(&second).copied().collect();
    assert_eq!(p.extents("b"), expected(&both, 65536));
    p.same(
        &["--add", "-g", "4096", "--merge", "off", "--disable"],
        "copy",
    );
    // Each set bit of "off" covers 1 MiB: all of it is set in "copy".
    assert_eq!(
        p.extents("copy"),
        expected(&expected(&second, 1 << 20), 4096)
    );
    p.same(&["--remove", "--add"], "b");
    assert_eq!(p.extents("b"), vec![]);
    // `qimg info` lists them as `qemu-img info` does.
    let specific = |program: &str| {
        let out = Command::new(program)
            .args(["info", path_str(&p.theirs)])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let start = text.find("Format specific information:").unwrap();
        let end = text.find("Child node").unwrap_or(text.len());
        text[start..end].to_owned()
    };
    assert_eq!(specific(env!("CARGO_BIN_EXE_qimg")), specific("qemu-img"));
}

#[test]
fn refusals_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pair::new(dir.path(), "a", &[]);
    p.same(&["--add"], "b");
    p.same(&["--add"], "b");
    p.same(&["--add", "-g", "256"], "c");
    p.same(&["--add", "-g", "3000"], "c");
    p.same(&["--add", "-g", "4G"], "c");
    p.same(&["--add", "-g", "abc"], "c");
    p.same(&["--add"], "");
    p.same(&["--add"], &"x".repeat(1024));
    p.same(&["--add"], &"y".repeat(1023));
    for a in ["--remove", "--clear", "--enable", "--disable"] {
        p.same(&[a], "nope");
    }
    p.same(&["--merge", "nope"], "b");
    p.same(&["--merge", "b"], "nope");
    // The actions before a refused one are stored.
    p.same(&["--add", "--merge", "nope"], "n");
    p.same(&[], "b");
    p.same(&["--clear", "-g", "1024"], "b");
    p.same(&["--clear", "-F", "qcow2"], "b");
    p.same(&["--clear", "-b", "x"], "b");
    p.same(&["--bogus"], "b");
    let v2 = Pair::new(dir.path(), "v2", &["-o", "compat=0.10"]);
    v2.same(&["--add"], "b");
}

/// `--merge SOURCE -b SOURCE_FILE`: a bitmap of another image merged in, and the refusals
/// (missing file, missing bitmap, `-F raw`, different sizes).
#[test]
fn merge_from_another_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = Pair::new(dir.path(), "src", &[]).theirs;
    let s = path_str(&src);
    qemu_img(&["bitmap", "--add", "-g", "1M", s, "sb"]);
    let writes = [(5 << 20, 10), (20 << 20, 2 << 20)];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write {o} {l}"))
        .collect();
    qemu_io("qcow2", &src, &cmds);
    let p = Pair::new(dir.path(), "dst", &[]);
    p.same(&["--add", "-g", "64k"], "b");
    p.same(&["--merge", "sb", "-b", s], "b");
    assert_eq!(p.extents("b"), expected(&expected(&writes, 1 << 20), 65536));
    p.same(&["--merge", "sb", "-b", s, "-F", "qcow2"], "b");
    p.same(&["--add", "--merge", "nope", "-b", s], "c");
    p.same(&["--merge", "sb", "-b", "missing.qcow2"], "b");
    p.same(&["--merge", "sb", "-b", s, "-F", "raw"], "b");
    let big = Pair::new(dir.path(), "big", &[]);
    qemu_img(&["resize", "-q", path_str(&big.theirs), "64M"]);
    qemu_img(&["resize", "-q", path_str(&big.ours), "64M"]);
    big.same(&["--add"], "b");
    big.same(&["--merge", "sb", "-b", s], "b");
}

/// The default granularity follows the cluster size, between 4 KiB and 64 KiB, as QEMU's.
#[test]
fn default_granularity_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for cs in ["512", "8k", "2M"] {
        let opt = format!("cluster_size={cs}");
        let p = Pair::new(dir.path(), cs, &["-o", &opt]);
        p.same(&["--add"], "b");
        p.same(&["--add", "-g", "0"], "z");
    }
}

/// A bitmap left `in-use` by a crash (qemu-io aborted while it was maintained): every action
/// but `--remove` refused, with QEMU's hint.
#[test]
fn inconsistent_bitmap_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pair::new(dir.path(), "iu", &[]);
    p.same(&["--add"], "b");
    p.same(&["--add"], "ok");
    qcow2_tests::qemu_io_abort("qcow2", &p.theirs, &["write 0 4k"]);
    std::fs::copy(&p.theirs, &p.ours).unwrap();
    for a in ["--clear", "--enable", "--disable"] {
        p.same(&[a], "b");
    }
    p.same(&["--merge", "b"], "ok");
    p.same(&["--merge", "ok"], "b");
    p.same(&["--remove"], "b");
}
