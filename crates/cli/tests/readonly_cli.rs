//! The read-only `qimg` commands never modify an image: `info` (human, JSON, with
//! `--backing-chain`), `map` (human, JSON), `convert -O raw`, `compare`, and `check` without
//! `-r` (when this build of qimg has it) leave every file of every fixture — the image, its
//! backing files, its data file — with the same bytes and the same mtime. The same holds for
//! damaged copies of a few fixtures (corrupt and dirty bits, an L2 entry past the end, a
//! truncated file), where the commands may fail, but must fail without writing and without
//! panicking.

use qcow2_tests::{matrix, path_str};
use std::collections::BTreeMap;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

fn qimg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qimg"))
        .args(args)
        .output()
        .expect("run qimg")
}

/// Whether this qimg has a subcommand (`qimg <cmd> --help` succeeds).
fn has_command(cmd: &str) -> bool {
    qimg(&[cmd, "--help"]).status.success()
}

/// What must not change about a file: its length, a hash of its bytes, and its mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    len: u64,
    hash: u64,
    mtime: SystemTime,
}

fn state(p: &Path) -> State {
    let bytes = std::fs::read(p).unwrap();
    // Any change of content changes the hash (SipHash of the whole file).
    let mut h = std::hash::DefaultHasher::new();
    h.write(&bytes);
    State {
        len: bytes.len() as u64,
        hash: h.finish(),
        mtime: std::fs::metadata(p).unwrap().modified().unwrap(),
    }
}

/// Every file in `dir`, with its state. The mtimes are first set an hour back, so that a
/// write within the same clock tick as the fixture's creation still shows.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, State> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(3600))
                .unwrap();
            drop(f);
            out.insert(p.clone(), state(&p));
        }
    }
    out
}

/// The read-only command lines for `image` (converting into `out`).
fn commands(image: &str, out: &str, check: bool) -> Vec<Vec<String>> {
    let mut v: Vec<Vec<&str>> = vec![
        vec!["info", image],
        vec!["info", "--output=json", image],
        vec!["info", "--backing-chain", image],
        vec!["info", "--backing-chain", "--output=json", image],
        vec!["map", image],
        vec!["map", "--output=json", image],
        vec!["convert", "-O", "raw", image, out],
        vec!["compare", image, image],
        vec!["compare", image, out],
    ];
    if check {
        v.push(vec!["check", image]);
        v.push(vec!["check", "--output=json", image]);
    }
    v.into_iter()
        .map(|c| c.into_iter().map(String::from).collect())
        .collect()
}

/// Runs every read-only command on `image` (whose files are in `dir`) and returns the
/// problems: a changed file, or a command that crashed.
fn run_commands(name: &str, dir: &Path, image: &Path, check: bool) -> Vec<String> {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("converted.raw");
    let before = snapshot(dir);
    let mut problems = Vec::new();
    for cmd in commands(path_str(image), path_str(&out), check) {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let o = qimg(&args);
        // A panic exits with 101; a signal has no code.
        match o.status.code() {
            Some(101) | None => problems.push(format!(
                "{name}: qimg {} crashed ({}): {}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr)
            )),
            _ => {}
        }
        let after: BTreeMap<PathBuf, State> =
            before.keys().map(|p| (p.clone(), state(p))).collect();
        for (p, s) in &before {
            if after[p] != *s {
                problems.push(format!(
                    "{name}: qimg {} modified {} ({:?} -> {:?})",
                    args.join(" "),
                    p.display(),
                    s,
                    after[p]
                ));
            }
        }
        let listed: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !before.contains_key(p))
            .collect();
        if !listed.is_empty() {
            problems.push(format!(
                "{name}: qimg {} created {listed:?} next to the image",
                args.join(" ")
            ));
        }
    }
    problems
}

#[test]
fn read_only_commands_never_modify_the_fixtures() {
    let check = has_command("check");
    let mut problems = Vec::new();
    let mut runs = 0;
    for spec in matrix() {
        let f = spec.build();
        // The commands must also succeed on a valid image (so that they did run).
        let info = qimg(&["info", path_str(&f.image)]);
        assert!(
            info.status.success(),
            "{}: qimg info failed: {}",
            f.name,
            String::from_utf8_lossy(&info.stderr)
        );
        problems.extend(run_commands(&f.name, f.dir.path(), &f.image, check));
        runs += commands("", "", check).len();
    }
    eprintln!("readonly_cli: {runs} command runs over the matrix (check: {check})");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn put(path: &Path, at: u64, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Damaged copies: the commands may fail, but never write or crash.
#[test]
fn read_only_commands_never_modify_damaged_images() {
    let check = has_command("check");
    let mut problems = Vec::new();
    for name in [
        "cluster-64k",
        "compressed-zlib",
        "snapshot",
        "bitmap",
        "chain",
    ] {
        type Damage = fn(&Path);
        let damages: &[(&str, Damage)] = &[
            ("corrupt-bit", |p| {
                let d = std::fs::read(p).unwrap();
                put(p, 72, &(be64(&d, 72) | 2).to_be_bytes());
            }),
            ("dirty-bit", |p| {
                let d = std::fs::read(p).unwrap();
                put(p, 72, &(be64(&d, 72) | 1).to_be_bytes());
            }),
            ("l2-entry-past-eof", |p| {
                // First L2 table's first non-zero entry -> far past the end, COPIED.
                let d = std::fs::read(p).unwrap();
                let cs = 1u64 << u32::from_be_bytes(d[20..24].try_into().unwrap());
                let l1 = be64(&d, 40) as usize;
                let l1_size = u32::from_be_bytes(d[36..40].try_into().unwrap()) as usize;
                for i in 0..l1_size {
                    let l2 = be64(&d, l1 + 8 * i) & 0x00FF_FFFF_FFFF_FE00;
                    if l2 == 0 {
                        continue;
                    }
                    for j in 0..(cs / 8) as usize {
                        let at = l2 as usize + 8 * j;
                        if be64(&d, at) != 0 {
                            put(p, at as u64, &((1u64 << 54) | (1 << 63)).to_be_bytes());
                            return;
                        }
                    }
                }
            }),
            ("l1-into-reftable", |p| {
                let d = std::fs::read(p).unwrap();
                let l1 = be64(&d, 40);
                let rt = be64(&d, 48);
                put(p, l1, &(rt | (1 << 63)).to_be_bytes());
            }),
            ("truncated", |p| {
                let len = std::fs::metadata(p).unwrap().len();
                let f = std::fs::File::options().write(true).open(p).unwrap();
                f.set_len(len / 2).unwrap();
            }),
        ];
        for (what, damage) in damages {
            let f = qcow2_tests::fixture(name).build();
            damage(&f.image);
            problems.extend(run_commands(
                &format!("{name}+{what}"),
                f.dir.path(),
                &f.image,
                check,
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `qimg info` (and `check`) on an image whose snapshot table starts less than 4 KiB before
/// the end of the file (here: cut 100 bytes into it) must report an error, not crash (exit
/// status 101): `Image::snapshots` once panicked there on a clamp whose minimum exceeded its
/// maximum (see snapshots_near_the_end_of_the_file in tests/hostile_images.rs).
#[test]
fn info_on_a_cut_snapshot_table_does_not_crash() {
    let f = qcow2_tests::fixture("snapshot").build();
    let d = std::fs::read(&f.image).unwrap();
    let snapshots_offset = be64(&d, 64);
    let file = std::fs::File::options().write(true).open(&f.image).unwrap();
    file.set_len(snapshots_offset + 100).unwrap();
    drop(file);
    let problems = run_commands("snapshot+cut-table", f.dir.path(), &f.image, true);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `qimg check` on an image whose refcount table entries are all ones (offsets near 2^64)
/// must report what it finds, not crash: the engine's `read_bytes` once overflowed on such
/// an offset (a panic in debug builds, wrapping arithmetic in release; see
/// check_refcount_block_offset_overflow in tests/hostile_images.rs).
#[test]
fn check_on_a_reftable_of_all_ones_does_not_crash() {
    let f = qcow2_tests::fixture("cluster-512").build();
    let d = std::fs::read(&f.image).unwrap();
    let rt = be64(&d, 48);
    let clusters = u32::from_be_bytes(d[56..60].try_into().unwrap()) as usize;
    put(&f.image, rt, &vec![0xff; clusters * 512]);
    let problems = run_commands("cluster-512+reftable-ones", f.dir.path(), &f.image, true);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
