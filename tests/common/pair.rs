//! The differential harness of the qimg command-line tests: qimg, reached through links named
//! `qemu-img` and `qemu-io`, and the real tools run with the same arguments in two
//! directories holding the same files.

use crate::{path_str, qemu_img, qemu_img_status, tool, without_timings};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Links named `qemu-img` and `qemu-io` to the qimg under test, in a directory of their own.
struct Links {
    _dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Links {
    fn new(qimg: &str) -> Links {
        let dir = tempfile::tempdir().unwrap();
        for name in ["qemu-img", "qemu-io"] {
            std::os::unix::fs::symlink(qimg, dir.path().join(name)).unwrap();
        }
        Links {
            bin: dir.path().to_path_buf(),
            _dir: dir,
        }
    }
}

/// What a run printed and its exit status.
#[derive(Debug, PartialEq, Eq)]
pub struct Run {
    /// The exit status (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output, a line each, timings filtered out.
    pub stdout: Vec<String>,
    /// Standard error, the same way.
    pub stderr: Vec<String>,
}

/// Runs `program args` in `dir`; the program's path, where the output names it (as QEMU's
/// tools name themselves in usage errors), reads `PROG`.
fn run(program: &Path, dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let text =
        |b: &[u8]| without_timings(&String::from_utf8_lossy(b).replace(path_str(program), "PROG"));
    Run {
        code: out.status.code(),
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
    }
}

/// Two directories with the same files: one for QEMU's tools, one for ours.
pub struct Pair {
    links: Links,
    /// The directory QEMU's tools run in.
    pub theirs: tempfile::TempDir,
    /// The directory qimg runs in.
    pub ours: tempfile::TempDir,
}

impl Pair {
    /// Each directory gets `t.qcow2`, a 1 MiB image made by qemu-img; `qimg` is the binary
    /// under test (`env!("CARGO_BIN_EXE_qimg")`).
    pub fn new(qimg: &str) -> Pair {
        let pair = Pair {
            links: Links::new(qimg),
            theirs: tempfile::tempdir().unwrap(),
            ours: tempfile::tempdir().unwrap(),
        };
        for d in [&pair.theirs, &pair.ours] {
            let t = d.path().join("t.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", path_str(&t), "1M"]);
        }
        pair
    }

    /// Runs the tool with `args` in both directories; returns what QEMU's and ours did.
    pub fn both(&self, program: &str, args: &[&str]) -> (Run, Run) {
        let theirs = run(&tool(program), self.theirs.path(), args);
        let ours = run(&self.links.bin.join(program), self.ours.path(), args);
        (theirs, ours)
    }

    /// The same as [`Pair::both`], and the two runs must agree.
    pub fn same(&self, program: &str, args: &[&str]) -> Run {
        let (theirs, ours) = self.both(program, args);
        assert_eq!(ours, theirs, "{program} {args:?}: ours, then QEMU's");
        ours
    }

    /// [`Pair::same`] but for the lines that say how much of the file system the images take
    /// (`disk size`, `file length`): where qemu-img leaves unwritten blocks that qimg
    /// writes, or the other way round, the contents are the same but not the blocks.
    pub fn same_but_sizes(&self, program: &str, args: &[&str]) {
        let (mut theirs, mut ours) = self.both(program, args);
        for r in [&mut theirs, &mut ours] {
            r.stdout
                .retain(|l| !l.contains("disk size:") && !l.contains("file length:"));
        }
        assert_eq!(ours, theirs, "{program} {args:?}: ours, then QEMU's");
    }

    /// The ranges `name` allocates itself (`qemu-img map --output=json`, depth 0) are the same
    /// in both directories, as data or zeros, host offsets aside (where each allocator put
    /// the clusters).
    pub fn same_own_ranges(&self, name: &str) {
        let shape = |d: &tempfile::TempDir| {
            let v = crate::qemu_img_json(&["map", "--output=json", path_str(&d.path().join(name))]);
            // Without offsets, runs that only the host layout split are one.
            let mut out: Vec<serde_json::Value> = Vec::new();
            for e in v.as_array().unwrap().iter().filter(|e| e["depth"] == 0) {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("offset");
                let len = e["length"].as_u64().unwrap();
                if let Some(last) = out.last_mut() {
                    let mut a = last.clone();
                    let mut b = e.clone();
                    for x in [&mut a, &mut b] {
                        let o = x.as_object_mut().unwrap();
                        o.remove("start");
                        o.remove("length");
                    }
                    let adjacent = last["start"].as_u64().unwrap()
                        + last["length"].as_u64().unwrap()
                        == e["start"].as_u64().unwrap();
                    if a == b && adjacent {
                        let l = last["length"].as_u64().unwrap();
                        last["length"] = (l + len).into();
                        continue;
                    }
                }
                out.push(e);
            }
            out
        };
        assert_eq!(shape(&self.ours), shape(&self.theirs), "map of {name}");
    }

    /// The guest contents of `name` are the same in both directories.
    pub fn same_image(&self, name: &str) {
        let a = self.theirs.path().join(name);
        let b = self.ours.path().join(name);
        let out = qemu_img_status(&["compare", path_str(&a), path_str(&b)]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let check = qemu_img_status(&["check", path_str(&b)]);
        assert_eq!(check.status.code(), Some(0), "qemu-img check of ours");
    }
}
