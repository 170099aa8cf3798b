//! Differential runs of qemu-io scripts: the same arguments and `-c` commands through
//! `qemu-io` and `qimg io` (or its `qemu-io` link), their output filtered of timings so
//! that the two compare line by line.

use crate::{tool, without_timings};
use std::path::Path;
use std::process::{Command, Output};

/// What a run of either tool printed, with the timing lines taken out (they differ from run
/// to run) and qemu-io's program-name prefix made ours.
#[derive(Debug, PartialEq, Eq)]
pub struct IoRun {
    /// The exit status.
    pub code: Option<i32>,
    /// Standard output's lines.
    pub stdout: Vec<String>,
    /// Standard error's lines.
    pub stderr: Vec<String>,
}

impl IoRun {
    /// What `out` printed, filtered.
    pub fn new(out: Output) -> Self {
        IoRun {
            code: out.status.code(),
            stdout: lines(&out.stdout),
            stderr: lines(&out.stderr),
        }
    }

    /// The first difference between `self` (qimg io's run) and `theirs` (qemu-io's), if any.
    pub fn diff(&self, theirs: &IoRun) -> Option<String> {
        if self == theirs {
            return None;
        }
        let first_diff = |a: &[String], b: &[String]| {
            (0..a.len().max(b.len()))
                .find(|&i| a.get(i) != b.get(i))
                .map(|i| format!("line {i}: qimg io {:?}, qemu-io {:?}", a.get(i), b.get(i)))
        };
        Some(format!(
            "\n  exit status: qimg io {:?}, qemu-io {:?}\n  stdout: {}\n  stderr: {}\n\
             --- qimg io ---\n{self:#?}\n--- qemu-io ---\n{theirs:#?}",
            self.code,
            theirs.code,
            first_diff(&self.stdout, &theirs.stdout).unwrap_or_else(|| "same".into()),
            first_diff(&self.stderr, &theirs.stderr).unwrap_or_else(|| "same".into()),
        ))
    }

    /// Panics, showing the first difference, unless `self` (qimg io's run) equals `theirs`
    /// (qemu-io's).
    pub fn assert_same(&self, theirs: &IoRun, what: &str) {
        if let Some(d) = self.diff(theirs) {
            panic!("{what}: qimg io differs from qemu-io: {d}");
        }
    }

    /// The same, with the lines sorted: aio requests complete in any order.
    pub fn sorted(mut self) -> Self {
        self.stdout.sort();
        self.stderr.sort();
        self
    }
}

/// Lines of `bytes` without timings, with qemu-io's prefix made qimg io's.
fn lines(bytes: &[u8]) -> Vec<String> {
    without_timings(&String::from_utf8_lossy(bytes))
        .into_iter()
        .map(|l| match l.strip_prefix("qemu-io: ") {
            Some(rest) => format!("qimg io: {rest}"),
            None => l,
        })
        .collect()
}

impl IoRun {
    /// `qemu-io ARGS -c CMD... [IMAGE]`, whatever its exit status.
    pub fn qemu_io(args: &[&str], script: &[String], image: Option<&Path>) -> Self {
        Self::new(with_script(
            Command::new(tool("qemu-io")),
            args,
            script,
            image,
        ))
    }

    /// `BIN io ARGS -c CMD... [IMAGE]` (`BIN` is qimg), whatever its exit status.
    pub fn qimg_io(bin: &str, args: &[&str], script: &[String], image: Option<&Path>) -> Self {
        let mut cmd = Command::new(bin);
        cmd.arg("io");
        Self::new(with_script(cmd, args, script, image))
    }
}

fn with_script(mut cmd: Command, args: &[&str], script: &[String], image: Option<&Path>) -> Output {
    cmd.env("LC_ALL", "C").args(args);
    for c in script {
        cmd.arg("-c").arg(c);
    }
    cmd.args(image).output().expect("run the tool")
}
