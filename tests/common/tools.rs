//! Locating and running the QEMU command-line tools.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Finds the QEMU tool `name` (`qemu-img`, `qemu-io`, `qemu-nbd`, ...) on `PATH`.
///
/// # Panics
///
/// Panics when the tool is not found, naming the Debian package `qemu-utils`
/// that provides it: the interop tests never skip silently.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return candidate;
        }
    }
    panic!(
        "`{name}` was not found on PATH; the QEMU interop tests need it. \
         Install the Debian package `qemu-utils` (apt-get install qemu-utils), \
         which provides qemu-img, qemu-io and qemu-nbd"
    );
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Builds a command for the QEMU tool `name` with a fixed, parseable locale.
fn command(name: &str) -> Command {
    let mut cmd = Command::new(tool(name));
    cmd.env("LC_ALL", "C");
    cmd
}

/// Renders a command line for error messages (shell-like, not exactly quoted).
fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!("(cd {} && ", dir.display()));
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    if cmd.get_current_dir().is_some() {
        s.push(')');
    }
    s
}

/// Runs `cmd`, panicking if it cannot be spawned at all.
fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)))
}

/// Runs `cmd` and panics with its command line, exit status, stdout and
/// stderr unless it exited with status 0.
fn checked(cmd: &mut Command) -> Output {
    let out = output(cmd);
    if !out.status.success() {
        panic!(
            "command failed ({}): {}\n--- stdout ---\n{}--- stderr ---\n{}",
            out.status,
            describe(cmd),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs `qemu-img ARGS...` and asserts that it succeeded.
///
/// # Panics
///
/// Panics with the command line, stdout and stderr if the exit status is not 0.
pub fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> Output {
    checked(command("qemu-img").args(args))
}

/// Like [`qemu_img`], but runs with `dir` as the current directory (used to
/// create images whose backing file name is relative).
pub fn qemu_img_in<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Output {
    checked(command("qemu-img").args(args).current_dir(dir))
}

/// Runs `qemu-img ARGS...` and returns its output whatever the exit status
/// (e.g. `qemu-img check`, whose exit code is the result: 0 clean,
/// 2 corruptions, 3 leaks only).
pub fn qemu_img_status<S: AsRef<OsStr>>(args: &[S]) -> Output {
    output(command("qemu-img").args(args))
}

/// Runs `qemu-img ARGS...` (which must include `--output=json`), asserts
/// success and parses stdout as JSON.
///
/// # Panics
///
/// Panics if the command fails or stdout is not valid JSON.
pub fn qemu_img_json<S: AsRef<OsStr>>(args: &[S]) -> serde_json::Value {
    let mut cmd = command("qemu-img");
    cmd.args(args);
    let out = checked(&mut cmd);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`{}` did not print JSON ({e}):\n{}",
            describe(&cmd),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs `qemu-io -f FMT -c CMD1 -c CMD2 ... IMAGE` in one process.
///
/// Asserts that qemu-io exited with status 0 and that neither stdout nor
/// stderr mentions a failure (`Pattern verification failed`,
/// `write failed: ...`, `error`, ...). Returns the output for inspection.
/// An empty `cmds` does nothing and returns an empty successful output.
///
/// # Panics
///
/// Panics with the command line and output on any failure.
pub fn qemu_io<S: AsRef<str>>(fmt: &str, image: &Path, cmds: &[S]) -> Output {
    let mut cmd = command("qemu-io");
    cmd.arg("-f").arg(fmt);
    for c in cmds {
        cmd.arg("-c").arg(c.as_ref());
    }
    cmd.arg(image);
    if cmds.is_empty() {
        return Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(0),
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
    }
    let out = checked(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lower = text.to_ascii_lowercase();
    if lower.contains("failed") || lower.contains("error") || lower.contains("qemu-io:") {
        panic!(
            "qemu-io reported a problem: {}\n--- output ---\n{}",
            describe(&cmd),
            text
        );
    }
    out
}

/// Runs `qemu-io -f FMT -c CMD... -c abort IMAGE` with core dumps disabled
/// and asserts that the process died from SIGABRT (used to leave an image in
/// a "crashed" state, e.g. with the lazy-refcounts dirty bit set).
pub fn qemu_io_abort<S: AsRef<str>>(fmt: &str, image: &Path, cmds: &[S]) -> Output {
    use std::os::unix::process::ExitStatusExt;
    // `ulimit -c 0` so that a crash does not litter the directory with cores.
    let mut cmd = Command::new("/bin/sh");
    cmd.env("LC_ALL", "C")
        .arg("-c")
        .arg("ulimit -c 0; exec \"$@\"")
        .arg("sh")
        .arg(tool("qemu-io"))
        .arg("-f")
        .arg(fmt);
    for c in cmds {
        cmd.arg("-c").arg(c.as_ref());
    }
    cmd.arg("-c").arg("abort").arg(image);
    let out = output(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.signal() != Some(6) || text.to_ascii_lowercase().contains("failed") {
        panic!(
            "expected qemu-io to abort cleanly after its commands ({}): {}\n{}",
            out.status,
            describe(&cmd),
            text
        );
    }
    out
}

/// Writes the guest-visible content of `image` (opened as format `fmt`,
/// including its backing chain / data file) to `dest` as a raw file, via
/// `qemu-img convert -f FMT -O raw` (the output is sparse).
pub fn raw_reference_file(image: &Path, fmt: &str, dest: &Path) {
    qemu_img(&[
        OsStr::new("convert"),
        OsStr::new("-f"),
        OsStr::new(fmt),
        OsStr::new("-O"),
        OsStr::new("raw"),
        image.as_os_str(),
        dest.as_os_str(),
    ]);
}

/// Returns the guest-visible content of `image` (format `fmt`): QEMU's own
/// reading of the image through `qemu-img convert -O raw` into a temporary
/// file, read back into memory. Its length is the virtual size.
pub fn raw_reference(image: &Path, fmt: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir for the raw reference");
    let dest = dir.path().join("reference.raw");
    raw_reference_file(image, fmt, &dest);
    std::fs::read(&dest).expect("read back the raw reference")
}

/// The guest-visible content of internal snapshot `snapshot` of the qcow2
/// `image` (`qemu-img convert -l snapshot.name=SNAPSHOT -O raw`).
pub fn raw_reference_snapshot(image: &Path, snapshot: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir for the raw reference");
    let dest = dir.path().join("snapshot.raw");
    let sel = format!("snapshot.name={snapshot}");
    qemu_img(&[
        OsStr::new("convert"),
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        OsStr::new("-l"),
        OsStr::new(&sel),
        OsStr::new("-O"),
        OsStr::new("raw"),
        image.as_os_str(),
        dest.as_os_str(),
    ]);
    std::fs::read(&dest).expect("read back the snapshot reference")
}

/// `qemu-img info --output=json IMAGE` (format probed; one object).
pub fn qemu_info_json(image: &Path) -> serde_json::Value {
    qemu_img_json(&[
        OsStr::new("info"),
        OsStr::new("--output=json"),
        image.as_os_str(),
    ])
}

/// `qemu-img info --output=json --backing-chain IMAGE`: an array with one
/// object per layer, top first.
pub fn qemu_info_chain_json(image: &Path) -> serde_json::Value {
    qemu_img_json(&[
        OsStr::new("info"),
        OsStr::new("--output=json"),
        OsStr::new("--backing-chain"),
        image.as_os_str(),
    ])
}

/// `qemu-img map --output=json IMAGE`: an array of extents
/// `{start, length, depth, present, zero, data, compressed, [offset]}`.
pub fn qemu_map_json(image: &Path) -> serde_json::Value {
    qemu_img_json(&[
        OsStr::new("map"),
        OsStr::new("--output=json"),
        image.as_os_str(),
    ])
}

/// `qemu-img check IMAGE` without repair; returns the output (exit code 0 =
/// clean, 2 = corruptions, 3 = leaks only).
pub fn qemu_check(image: &Path) -> Output {
    qemu_img_status(&[OsStr::new("check"), image.as_os_str()])
}

/// Converts `p` to `&str` for building argument lists (test paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", p.display()))
}

/// A `qemu-io` process with an image open until dropped: for tests of image locking.
pub struct QemuIoHolder(std::process::Child);

impl QemuIoHolder {
    /// Opens `image` in qemu-io with `flags` (`-r`, `-U`, `-f fmt`...) and returns once it
    /// has read from it (so its locks are taken).
    pub fn new(flags: &[&str], image: &Path) -> QemuIoHolder {
        // Line-buffered, so that its first line arrives before it sleeps.
        let mut child = std::process::Command::new("stdbuf")
            .arg("-oL")
            .arg(tool("qemu-io"))
            .args(flags)
            .args(["-c", "read 0 512", "-c", "sleep 600000"])
            .arg(image)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start qemu-io (package qemu-utils)");
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.starts_with("read 512/512") {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "qemu-io {flags:?} {} did not open the image: {line}{}",
                image.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        QemuIoHolder(child)
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a run of qemu-img or of qimg said, in a form the two can be compared in: stdout,
/// stderr with the program's name taken off each message (`program` is `"qemu-img: "` or
/// `"qimg: "`, and a "Try '...' hint naming either tool, as invoked, reads "Try 'qimg ..."),
/// and the exit status.
pub fn said(o: &Output, program: &str) -> (String, String, Option<i32>) {
    let err = String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(|l| l.strip_prefix(program).unwrap_or(l))
        .map(|l| match l.strip_prefix("Try '") {
            // The tools name themselves as invoked (argv[0], a path for a test's qimg).
            Some(rest) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                match name.rsplit('/').next() {
                    Some("qimg" | "qemu-img") => format!("Try 'qimg {tail}"),
                    _ => l.to_owned(),
                }
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        err,
        o.status.code(),
    )
}

/// A qemu-io run's output lines without what changes from run to run: the timing lines
/// (`... ops; ... ops/sec)`) go, and a `-C` report (`bytes,ops,H:MM:SS.ss,bytes/sec,ops/sec`)
/// keeps its counts only.
pub fn without_timings(text: &str) -> Vec<String> {
    let is_timing = |l: &str| l.contains(" ops; ") && l.ends_with(" ops/sec)");
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let csv_counts = |l: &str| {
        let f: Vec<&str> = l.split(',').collect();
        (f.len() == 5 && numeric(f[0]) && numeric(f[1]) && f[2].contains(':'))
            .then(|| format!("{},{},(timing)", f[0], f[1]))
    };
    text.lines()
        .filter(|l| !is_timing(l))
        .map(|l| csv_counts(l).unwrap_or_else(|| l.to_owned()))
        .collect()
}
