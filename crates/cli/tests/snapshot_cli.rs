//! `qimg snapshot` and `qimg convert -l` against `qemu-img snapshot` and `qemu-img convert
//! -l`: the same steps on two copies of an image (qemu-img and qemu-io on one, qimg and
//! `qimg io` on the other), then `qemu-img snapshot -l` must list the same snapshots (dates
//! left out), `qemu-img check` must find both clean (no leak), `qemu-img compare` must find
//! the active layers equal, and every snapshot must read the same (`qemu-img convert -l`
//! of each copy, and `qimg convert -l` of ours).

use qcow2_tests::{path_str, qemu_check, qemu_img, qemu_io, raw_reference_snapshot, said};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Two copies of one new image: `theirs` for QEMU's tools, `ours` for qimg.
struct Pair {
    _dir: tempfile::TempDir,
    theirs: PathBuf,
    ours: PathBuf,
}

/// Two copies of one new image that qemu-io first wrote `init` to (what `qimg io` cannot
/// write: compressed clusters).
fn pair(create_opts: &str, size: &str, init: &[&str]) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs.qcow2");
    let ours = dir.path().join("ours.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        create_opts,
        path_str(&theirs),
        size,
    ]);
    qemu_io("qcow2", &theirs, init);
    std::fs::copy(&theirs, &ours).unwrap();
    Pair {
        _dir: dir,
        theirs,
        ours,
    }
}

fn qimg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qimg"))
        .args(args)
        .output()
        .unwrap()
}

/// `qemu-img snapshot -l` with the DATE column blanked (see [`blank_dates`]).
fn listing(image: &Path) -> String {
    let out = qemu_img(&["snapshot", "-l", path_str(image)]);
    blank_dates(&String::from_utf8_lossy(&out.stdout))
}

/// A snapshot list with the DATE column (19 characters at column 34: IDs under 8 and names
/// under 17 characters) blanked: two images' snapshots are taken at different times.
fn blank_dates(list: &str) -> String {
    list.lines()
        .map(|l| {
            let mut c: Vec<char> = l.chars().collect();
            if c.len() > 53 && l != "Snapshot list:" {
                c.splice(34..53, std::iter::repeat_n('.', 19));
            }
            c.into_iter().collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Pair {
    /// The same qemu-io commands: by qemu-io on theirs, by `qimg io` on ours.
    fn io(&self, cmds: &[&str]) {
        qemu_io("qcow2", &self.theirs, cmds);
        let mut args = vec!["io", "-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(path_str(&self.ours));
        let o = qimg(&args);
        assert!(o.status.success(), "qimg io {cmds:?}: {o:?}");
    }

    /// `snapshot ARGS` by qemu-img on theirs and qimg on ours: the same status and output.
    fn snapshot(&self, args: &[&str]) {
        let mut q = vec!["snapshot"];
        q.extend(args);
        let mut o = q.clone();
        q.push(path_str(&self.theirs));
        o.push(path_str(&self.ours));
        let theirs = qemu_tool("qemu-img", &q);
        let ours = qimg(&o);
        let blanked = |o: &Output, program: &str| {
            let (out, err, code) = said(o, program);
            (blank_dates(&out), err, code)
        };
        assert_eq!(
            blanked(&ours, "qimg: "),
            blanked(&theirs, "qemu-img: "),
            "snapshot {args:?}: qimg (left) differs from qemu-img"
        );
    }

    /// Everything that can be compared is the same, and both images are clean.
    fn same(&self, what: &str) {
        assert_eq!(
            listing(&self.ours),
            listing(&self.theirs),
            "{what}: snapshot -l"
        );
        for image in [&self.theirs, &self.ours] {
            let c = qemu_check(image);
            assert!(
                c.status.success() && String::from_utf8_lossy(&c.stdout).contains("No errors"),
                "{what}: qemu-img check {}: {c:?}",
                image.display()
            );
        }
        let cmp = qemu_tool(
            "qemu-img",
            &["compare", path_str(&self.theirs), path_str(&self.ours)],
        );
        assert!(
            cmp.status.success(),
            "{what}: active layers differ: {cmp:?}"
        );
        // qimg info prints the table as qemu-img info does, in text and JSON.
        let block = |o: Output| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let from = text.find("Snapshot list:");
            let to = text.find("Format specific information:");
            from.map(|f| text[f..to.unwrap_or(text.len())].to_owned())
        };
        let ours = path_str(&self.ours);
        assert_eq!(
            block(qimg(&["info", ours])),
            block(qemu_img(&["info", ours])),
            "{what}: qimg info's snapshot table"
        );
        let snaps = |o: Output| {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            v.get("snapshots").cloned()
        };
        assert_eq!(
            snaps(qimg(&["info", "--output=json", ours])),
            snaps(qemu_img(&["info", "--output=json", ours])),
            "{what}: qimg info --output=json's snapshots"
        );
        let names = qimg(&["snapshot", "-l", path_str(&self.ours)]);
        for line in String::from_utf8_lossy(&names.stdout).lines().skip(2) {
            let name = line.split_whitespace().nth(1).unwrap();
            let expected = raw_reference_snapshot(&self.theirs, name);
            assert!(
                raw_reference_snapshot(&self.ours, name) == expected,
                "{what}: snapshot {name} reads otherwise (qemu-img convert -l)"
            );
            let dir = tempfile::tempdir().unwrap();
            let raw = dir.path().join("s.raw");
            let sel = format!("snapshot.name={name}");
            let o = qimg(&[
                "convert",
                "-l",
                &sel,
                "-O",
                "raw",
                path_str(&self.ours),
                path_str(&raw),
            ]);
            assert!(o.status.success(), "{what}: qimg convert -l {name}: {o:?}");
            assert!(
                std::fs::read(&raw).unwrap() == expected,
                "{what}: qimg convert -l {name} reads otherwise"
            );
        }
    }
}

/// Runs a QEMU tool whatever its exit status (missing: package qemu-utils).
fn qemu_tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program} (Debian package qemu-utils): {e}"))
}

#[test]
fn create_and_list_as_qemu_img() {
    let p = pair("cluster_size=65536", "4M", &[]);
    p.snapshot(&["-l"]);
    p.io(&["write -P 1 0 128k", "write -P 2 1M 64k"]);
    p.snapshot(&["-c", "first"]);
    p.same("after the first snapshot");
    // Writes over shared clusters copy them; a discard drops the active layer's reference.
    p.io(&["write -P 3 64k 128k", "discard 1M 64k", "write -P 4 3M 4k"]);
    p.snapshot(&["-c", "second"]);
    p.snapshot(&["-c", "first"]);
    p.same("three snapshots, one name twice");
    p.snapshot(&["-l"]);
    p.snapshot(&["-l", "-c", "x"]);
}

#[test]
fn small_clusters_compressed_and_zero_clusters() {
    let p = pair("cluster_size=4096", "1M", &["write -c -P 6 64k 4k"]);
    p.io(&["write -P 5 0 64k", "write -z 128k 8k", "write -P 7 200k 1k"]);
    p.snapshot(&["-c", "a"]);
    p.io(&[
        "write -P 8 0 16k",
        "write -P 9 64k 4k",
        "write -z -u 200k 4k",
    ]);
    p.snapshot(&["-c", "b"]);
    p.same("4k clusters");
}

#[test]
fn delete_by_name_as_qemu_img() {
    let p = pair("cluster_size=65536", "4M", &[]);
    p.io(&["write -P 1 0 192k", "write -P 2 2M 64k"]);
    p.snapshot(&["-c", "a"]);
    p.io(&["write -P 3 64k 64k", "discard 2M 64k"]);
    p.snapshot(&["-c", "b"]);
    p.io(&["write -P 4 0 64k", "write -P 5 3M 64k"]);
    p.snapshot(&["-c", "1"]);
    p.same("three snapshots");
    // qemu-img snapshot -d looks names up only: "1" is the third snapshot's name.
    p.snapshot(&["-d", "2"]);
    p.snapshot(&["-d", "1"]);
    p.same("the snapshot named 1 deleted");
    // Clusters only snapshot a reached (2M: discarded since) are freed; COPIED comes back
    // where the active layer is alone again (qemu-img check would say otherwise).
    p.snapshot(&["-d", "a"]);
    p.same("a deleted");
    p.io(&["write -P 6 0 256k"]);
    p.snapshot(&["-d", "b"]);
    p.same("all deleted");
    p.snapshot(&["-l"]);
    p.snapshot(&["-d", "b"]);
}

#[test]
fn apply_by_id_or_name_as_qemu_img() {
    let p = pair("cluster_size=65536", "4M", &[]);
    p.io(&["write -P 1 0 128k", "write -P 2 1M 64k"]);
    p.snapshot(&["-c", "a"]);
    p.io(&["write -P 3 64k 128k", "discard 1M 64k", "write -P 4 3M 4k"]);
    p.snapshot(&["-c", "2"]);
    p.io(&["write -P 5 0 64k"]);
    // By ID first: "2" is snapshot 2; "a" by name.
    p.snapshot(&["-a", "1"]);
    p.same("snapshot 1 applied");
    p.io(&["write -P 6 0 64k", "write -P 7 2M 64k"]);
    p.snapshot(&["-a", "2"]);
    p.same("snapshot 2 applied");
    p.snapshot(&["-a", "nope"]);
    p.snapshot(&["-d", "a"]);
    p.snapshot(&["-a", "2"]);
    p.same("applied again after a delete");
}

#[test]
fn convert_l_selects_as_qemu_img() {
    let p = pair("cluster_size=65536", "1M", &[]);
    p.io(&["write -P 1 0 64k"]);
    p.snapshot(&["-c", "2"]);
    p.io(&["write -P 2 0 64k"]);
    p.snapshot(&["-c", "x"]);
    let dir = tempfile::tempdir().unwrap();
    for sel in ["1", "2", "x", "snapshot.id=2", "snapshot.name=2", "nope"] {
        let convert = |program: &str, image: &Path, out: &str| {
            let raw = dir.path().join(out);
            let args = [
                "convert",
                "-l",
                sel,
                "-O",
                "raw",
                path_str(image),
                path_str(&raw),
            ];
            let o = if program == "qimg" {
                qimg(&args)
            } else {
                qemu_tool(program, &args)
            };
            (o, std::fs::read(&raw).ok())
        };
        let (q, q_raw) = convert("qemu-img", &p.theirs, "q.raw");
        let (o, o_raw) = convert("qimg", &p.ours, "o.raw");
        assert_eq!(
            said(&o, "qimg: "),
            said(&q, "qemu-img: "),
            "convert -l {sel}"
        );
        assert!(o_raw == q_raw, "convert -l {sel}: the contents differ");
    }
}

#[test]
fn every_kind_of_image_as_qemu_img() {
    for opts in [
        "compat=0.10",
        "extended_l2=on,cluster_size=65536",
        "lazy_refcounts=on",
        "refcount_bits=64,cluster_size=4096",
    ] {
        let p = pair(opts, "2M", &[]);
        p.io(&["write -P 1 0 96k", "write -P 2 1M 8k"]);
        p.snapshot(&["-c", "a"]);
        p.io(&["write -P 3 32k 64k", "discard 1M 64k"]);
        p.snapshot(&["-c", "b"]);
        p.same(opts);
        p.snapshot(&["-a", "a"]);
        p.io(&["write -P 4 0 4k"]);
        p.snapshot(&["-d", "b"]);
        p.same(opts);
    }
}

#[test]
fn one_bit_refcounts_refuse_a_snapshot_as_qemu_img() {
    let p = pair("refcount_bits=1", "1M", &[]);
    p.io(&["write -P 1 0 96k"]);
    p.snapshot(&["-c", "a"]);
    p.snapshot(&["-l"]);
    // qemu-img leaks the clusters it allocated first (two); qimg checks before allocating.
    let c = qemu_check(&p.ours);
    assert!(c.status.success(), "qemu-img check of ours: {c:?}");
}

/// A snapshot refused because a data cluster's 64-bit refcount is at its maximum changes
/// no refcount: qemu-img's message, and `qemu-img check` finds only the leak the test made
/// (QEMU also leaks the new L1 table; the count past u64 must not wrap to a small one).
#[test]
fn snapshot_refused_on_a_maximal_64_bit_refcount_changes_nothing() {
    let p = pair("refcount_bits=64", "64M", &["write 0 512"]);
    for image in [&p.theirs, &p.ours] {
        let poke = |at: u64, bytes: &[u8]| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
            f.write_all_at(bytes, at).unwrap();
        };
        // The data cluster's refcount at u64::MAX, and its L2 entry without COPIED.
        poke(0x20028, &[0xff; 8]);
        poke(0x40000, &[0, 0, 0, 0, 0, 5, 0, 0]);
    }
    p.snapshot(&["-c", "foo"]);
    let check = qemu_check(&p.ours);
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(3), "leaks only: {out}");
    assert!(
        out.contains("1 leaked clusters were found"),
        "only the cluster the test made leak: {out}"
    );
}
