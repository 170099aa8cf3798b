//! `qimg io` against `qemu-io`: the same scripts through both tools.
//!
//! Read side (runs now): on every fixture of the interop matrix, `read -P` over ranges that
//! qemu-io wrote succeeds, a wrong pattern fails with qemu-io's message and exit status, and
//! whole read-only scripts (dumps, `-s`/`-l`, bad syntax, out-of-range requests, aio reads,
//! every backend) print the same lines as qemu-io, timing lines aside.
//!
//! Write side: a seeded [`OpMix`] script (or a script of aio writes in flight together) run
//! by qemu-io on one copy of an image and by `qimg io` on another prints the same lines, leaves
//! `qemu-img compare` saying identical and `qemu-img check` clean, on fixtures and on images
//! fresh from `qemu-img create` with each option we support, on every backend. Where the
//! engine still differs from QEMU, the case is in an `#[ignore]`d test naming the bug.

use qcow2_tests::{
    fixture, matrix, path_str, qemu_check, qemu_img, qemu_img_status, IoRun as Run, OpMix, Prng,
};
use std::path::Path;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// `qemu-io ARGS -c CMD... IMAGE`, whatever its exit status.
fn qemu_io(args: &[&str], script: &[String], image: &Path) -> Run {
    Run::qemu_io(args, script, Some(image))
}

/// `qimg io ARGS -c CMD... IMAGE`, whatever its exit status.
fn qimg_io(args: &[&str], script: &[String], image: &Path) -> Run {
    Run::qimg_io(env!("CARGO_BIN_EXE_qimg"), args, script, Some(image))
}

/// Runs `script` read-only through both tools and asserts they printed the same and exited
/// alike; returns qemu-io's run.
fn same_read_only(what: &str, args: &[&str], script: &[String], image: &Path) -> Run {
    let mut a = vec!["-r"];
    a.extend_from_slice(args);
    let theirs = qemu_io(&a, script, image);
    let ours = qimg_io(&a, script, image);
    ours.assert_same(&theirs, &format!("{what}: {a:?} on {script:?}"));
    theirs
}

/// Runs of one repeated byte in `data`, `(offset, length, byte)`: every run of at least 64
/// bytes and a sample of the shorter ones (compressed random data has millions).
fn runs(data: &[u8]) -> Vec<(u64, u64, u8)> {
    let mut out = Vec::new();
    let mut short = 0u64;
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        let j = i + data[i..].iter().take_while(|&&x| x == b).count();
        let len = (j - i) as u64;
        if len >= 64 || {
            short += 1;
            short % 499 == 1
        } {
            out.push((i as u64, len, b));
        }
        i = j;
    }
    out
}

/// `read -P` commands over ranges of one byte that qemu-io wrote (or that read as zeros):
/// whole runs, pieces of runs at unaligned offsets, and reads reaching outside a run that
/// check only the run with `-s`/`-l`.
fn pattern_reads(seed: u64, data: &[u8]) -> Vec<(u64, u64, u8, String)> {
    const MAX: u64 = 4 * MIB;
    let all = runs(data);
    let nonzero: Vec<_> = all.iter().filter(|r| r.2 != 0 && r.1 >= 512).collect();
    let zero: Vec<_> = all.iter().filter(|r| r.2 == 0 && r.1 >= 512).collect();
    let short: Vec<_> = all.iter().filter(|r| r.1 < 512).collect();
    let mut r = Prng::new(seed);
    let mut cmds = Vec::new();
    for (pool, n) in [(&nonzero, 14), (&zero, 6), (&short, 6)] {
        if pool.is_empty() {
            continue;
        }
        for _ in 0..n {
            let &&(start, len, b) = r.pick(pool);
            let (off, n) = if r.chance(30) {
                (start, len.min(MAX))
            } else {
                let a = r.below(len);
                let n = r.range(1, (len - a).min(MAX));
                (start + a, n)
            };
            cmds.push((off, n, b, format!("read -P 0x{b:02x} {off} {n}")));
            // The same range inside a wider read, checked with -s and -l.
            let before = r.below(off.min(4096) + 1);
            let after = r.below(4097).min(data.len() as u64 - off - n);
            cmds.push((
                off,
                n,
                b,
                format!(
                    "read -q -P {b} -s {before} -l {n} {} {}",
                    off - before,
                    before + n + after
                ),
            ));
        }
    }
    cmds
}

/// The fixtures small enough to hold their guest content in memory.
fn small_fixtures() -> Vec<qcow2_tests::FixtureSpec> {
    matrix()
        .into_iter()
        .filter(|s| s.name != "l2-span-64k")
        .collect()
}

#[test]
fn read_patterns_verify_like_qemu_io_on_every_fixture() {
    for spec in small_fixtures() {
        let f = spec.build();
        let name = &f.name;
        let data = f.raw_reference();
        let reads = pattern_reads(0x1015 ^ data.len() as u64, &data);
        assert!(reads.len() >= 20, "{name}: only {} reads", reads.len());

        // Right patterns: qimg io succeeds, printing what qemu-io prints.
        let script: Vec<String> = reads.iter().map(|r| r.3.clone()).collect();
        let run = same_read_only(name, &["-f", "qcow2"], &script, &f.image);
        assert_eq!(run.code, Some(0), "{name}: {run:#?}");
        assert!(
            !run.stdout.iter().any(|l| l.contains("verification failed")),
            "{name}: {run:#?}"
        );

        // Wrong patterns: the same failure message for each, and exit status 1.
        let wrong: Vec<String> = reads
            .iter()
            .take(12)
            .enumerate()
            .map(|(i, &(off, n, b, _))| {
                if i % 3 == 2 && n > 1 {
                    format!("read -P 0x{:02x} -s 1 -l {} {off} {n}", b ^ 0x5a, n - 1)
                } else {
                    format!("read -P 0x{:02x} {off} {n}", b ^ 0x5a)
                }
            })
            .collect();
        let run = same_read_only(name, &["-f", "qcow2"], &wrong, &f.image);
        assert_eq!(run.code, Some(1), "{name}: {run:#?}");
        let failures = run
            .stdout
            .iter()
            .filter(|l| l.starts_with("Pattern verification failed at offset "))
            .count();
        assert_eq!(failures, wrong.len(), "{name}: {run:#?}");
    }
}

/// A read-only script with a bit of everything qemu-io prints: dumps, quiet reads, sizes with
/// suffixes, the disk end, requests past it, syntax errors, refused writes, aio reads.
fn mixed_script(seed: u64, size: u64) -> Vec<String> {
    let mut r = Prng::new(seed);
    let mut s: Vec<String> = vec![
        "length".into(),
        "".into(),
        format!("read -v {} 40", r.below(size - 40)),
        format!("r -v {} 17", size - 17),
        format!("read -v -q {} 16", r.below(size - 16)),
        format!("read 0 {}", size.min(MIB)),
        "read 0x200 1k".into(),
        "read 1.5k 0.5k".into(),
        format!("read {size} 0"),
        format!("read {size} 1"),
        format!("read {} 2", size - 1),
        format!("read {} 1", size + 512),
        "read 0 3G".into(),
        "read -C 0 512".into(),
        "read -P 0x100 0 1".into(),
        "read -P 1 -s 2 -l 2 0 3".into(),
        "read -s 1 0 3".into(),
        "read 0".into(),
        "read x 1".into(),
        "read 0 1kb".into(),
        "read -x 0 1".into(),
        "read 0 1 -P".into(),
        "read 0 1 2".into(),
        "read -q -- -1 1".into(),
        "nonsense 1 2".into(),
        "flush".into(),
        "flush now".into(),
        "write 0 512".into(),
        "write -z 0 512".into(),
        "discard 0 512".into(),
        "write -u 0 1".into(),
        "aio_read -i 0 1".into(),
        "aio_read 0 3G".into(),
        "aio_read 0 1".into(),
        // Where an aio report lands among later commands' output depends on timing.
        "aio_flush".into(),
    ];
    for _ in 0..4 {
        s.push(format!("read -q {} {}", r.below(size), r.range(1, 4096)));
    }
    s.push("read 0 512 -v -C".into());
    s.push("read 0 512 -q".into());
    s
}

#[test]
fn read_only_scripts_print_what_qemu_io_prints() {
    for name in [
        "cluster-512",
        "compressed-zstd-rewritten",
        "chain-relative",
        "extl2-backing",
        "data-file",
        "snapshot",
        "lazy-refcounts-dirty",
        "resized",
    ] {
        let f = fixture(name).build();
        let script = mixed_script(0x5c41 ^ f.virtual_size, f.virtual_size);
        let run = same_read_only(name, &["-f", "qcow2"], &script, &f.image);
        assert_eq!(run.code, Some(1), "{name}: the script has failing commands");
        // Probed format.
        same_read_only(name, &[], &script[..8], &f.image);
    }
    // A raw image: qemu-io and qimg io agree on its size (rounded up to a sector) too.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0x61u8; 1_000_000]).unwrap();
    let script = mixed_script(7, 1_000_448);
    same_read_only("raw", &["-f", "raw"], &script, &raw);
    same_read_only("raw probed", &[], &script, &raw);
}

#[test]
fn aio_reads_and_backends_agree_with_qemu_io() {
    for name in ["cluster-4k", "compressed-zlib", "zero-clusters-backing"] {
        let f = fixture(name).build();
        let data = f.raw_reference();
        let reads = pattern_reads(0xa10 ^ data.len() as u64, &data);
        // Many reads in flight at once, then more after an aio_flush, then one left in
        // flight at the end of the script; plus one wrong pattern (reported, not a failure).
        let mut script: Vec<String> = Vec::new();
        for (i, &(off, n, b, _)) in reads.iter().enumerate() {
            script.push(format!("aio_read -P 0x{b:02x} {off} {n}"));
            if i % 9 == 8 {
                script.push("aio_flush".into());
            }
        }
        let (off, n, b, _) = reads[0];
        script.push(format!("aio_read -P 0x{:02x} {off} {n}", b ^ 1));
        script.push(format!("read -P 0x{b:02x} {off} {n}"));
        script.push(format!("aio_read -v {off} 16"));
        for args in [
            &["-f", "qcow2"][..],
            &["-f", "qcow2", "-i", "io_uring"],
            &["-f", "qcow2", "-t", "none"],
            &["-f", "qcow2", "-n", "-i", "io_uring"],
            &["-f", "qcow2", "-t", "writeback"],
        ] {
            let mut a = vec!["-r"];
            a.extend_from_slice(args);
            let theirs = qemu_io(&a, &script, &f.image).sorted();
            let ours = qimg_io(&a, &script, &f.image).sorted();
            ours.assert_same(&theirs, &format!("{name}: {a:?}"));
            assert_eq!(ours.code, Some(0), "{name} {a:?}: {ours:#?}");
        }
        // Synchronous reads give the same lines on every backend.
        let sync: Vec<String> = reads.iter().map(|r| r.3.clone()).collect();
        let want = qimg_io(&["-r"], &sync, &f.image);
        for args in [
            &["-i", "io_uring"][..],
            &["-t", "none"],
            &["-n", "-i", "io_uring"],
        ] {
            let mut a = vec!["-r"];
            a.extend_from_slice(args);
            assert_eq!(qimg_io(&a, &sync, &f.image), want, "{name}: {a:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Write side: differential against qemu-io.

/// Runs `script` through qemu-io on `theirs` and through `qimg io` on `ours` (two copies of
/// one image, format `fmt`), then checks: the same lines and exit status 0 from both,
/// `qemu-img compare` identical, `qemu-img check` clean for both copies. `aio`: the script
/// has aio requests, whose reports come in any order.
fn differential(
    what: &str,
    fmt: &str,
    args: &[&str],
    script: &[String],
    theirs: &Path,
    ours: &Path,
    aio: bool,
) -> Result<(), String> {
    let mut a = vec!["-f", fmt];
    a.extend_from_slice(args);
    let mut t = qemu_io(&a, script, theirs);
    let mut o = qimg_io(&a, script, ours);
    if aio {
        t = t.sorted();
        o = o.sorted();
    }
    let context = format!("{what} ({a:?}), script {script:?}");
    if t.code != Some(0) {
        return Err(format!("{context}: qemu-io failed: {t:#?}"));
    }
    if let Some(d) = o.diff(&t) {
        return Err(format!("{context}: qimg io differs from qemu-io: {d}"));
    }
    let cmp = qemu_img_status(&[
        "compare",
        "-f",
        fmt,
        "-F",
        fmt,
        path_str(theirs),
        path_str(ours),
    ]);
    if cmp.status.code() != Some(0) {
        return Err(format!(
            "{context}: qemu-img compare: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        ));
    }
    if fmt == "qcow2" {
        for (who, img) in [("qemu-io's", theirs), ("qimg io's", ours)] {
            let c = qemu_check(img);
            if c.status.code() != Some(0) {
                return Err(format!(
                    "{context}: qemu-img check of {who} copy: {}{}",
                    String::from_utf8_lossy(&c.stdout),
                    String::from_utf8_lossy(&c.stderr)
                ));
            }
        }
    }
    Ok(())
}

/// The failing cases of a test: each is reported, and the test fails at its end listing them
/// all (one engine bug should not hide the others).
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, case: Result<(), String>) {
        if let Err(e) = case {
            eprintln!("FAILED: {e}\n");
            self.0.push(e);
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} failing case(s):\n{}",
            self.0.len(),
            self.0.join("\n\n")
        );
    }
}

/// An OpMix script with a `flush` every few commands.
fn opmix_script(mix: &OpMix) -> Vec<String> {
    let mut out = Vec::new();
    for (i, c) in mix.script().into_iter().enumerate() {
        out.push(c);
        if i % 7 == 6 {
            out.push("flush".into());
        }
    }
    out
}

/// `qemu-img create` options exercised by the write-side tests: (options, size, cluster
/// size, extended L2).
const CREATED: &[(&str, u64, u64, bool)] = &[
    ("", 64 * MIB, 64 * KIB, false),
    ("cluster_size=512", 8 * MIB, 512, false),
    ("cluster_size=4096", 32 * MIB, 4 * KIB, false),
    ("cluster_size=2097152", 128 * MIB, 2 * MIB, false),
    ("compat=0.10", 32 * MIB, 64 * KIB, false),
    ("refcount_bits=1", 16 * MIB, 64 * KIB, false),
    ("refcount_bits=64", 16 * MIB, 64 * KIB, false),
    ("extended_l2=on", 32 * MIB, 64 * KIB, true),
    (
        "extended_l2=on,cluster_size=16384",
        16 * MIB,
        16 * KIB,
        true,
    ),
    ("preallocation=metadata", 16 * MIB, 64 * KIB, false),
    ("preallocation=full", 8 * MIB, 64 * KIB, false),
    ("compression_type=zstd", 16 * MIB, 64 * KIB, false),
];

fn create(dir: &Path, name: &str, fmt: &str, opts: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path_str(&p), size.as_str()]);
    qemu_img(&args);
    p
}

/// The same image made by `qimg create` (byte-identical to qemu-img's, which
/// crates/cli/tests/create_cli.rs checks).
fn qimg_create(dir: &Path, name: &str, opts: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path_str(&p), size.as_str()]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qimg"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qimg create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

fn mix_for(seed: u64, size: u64, cluster: u64, extl2: bool) -> OpMix {
    OpMix {
        ops: 60,
        subclusters: extl2,
        l2_entry_bytes: if extl2 { 16 } else { 8 },
        ..OpMix::new(seed, size, cluster)
    }
}

#[test]
fn opmix_scripts_match_qemu_io_on_created_images() {
    opmix_on_created(CREATED);
}

/// An image with lazy refcounts must be left clean by `close` (refcounts written, dirty bit
/// cleared), as QEMU leaves it.
#[test]
fn lazy_refcount_images_are_clean_after_close() {
    opmix_on_created(&[("lazy_refcounts=on", 16 * MIB, 64 * KIB, false)]);
    opmix_on_fixtures(&["lazy-refcounts"]);
}

/// [`differential`] with seeded OpMix scripts on pairs of images: QEMU's copy made by
/// `qemu-img create`, ours by `qemu-img create` (seed 1) or `qimg create` (seed 2).
fn opmix_on_created(images: &[(&str, u64, u64, bool)]) {
    let mut fails = Failures::default();
    for &(opts, size, cluster, extl2) in images {
        let i = CREATED.iter().position(|c| c.0 == opts).unwrap_or(99);
        for seed in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let theirs = create(dir.path(), "theirs.qcow2", "qcow2", opts, size);
            // Seed 1 on an image made by qemu-img create, seed 2 on one made by qimg create.
            let ours = if seed == 1 {
                create(dir.path(), "ours.qcow2", "qcow2", opts, size)
            } else {
                qimg_create(dir.path(), "ours.qcow2", opts, size)
            };
            let mix = mix_for(0xd1ff_0000 + 16 * i as u64 + seed, size, cluster, extl2);
            let what = format!("create -o {opts:?} seed {seed}");
            fails.check(differential(
                &what,
                "qcow2",
                &[],
                &opmix_script(&mix),
                &theirs,
                &ours,
                false,
            ));
        }
    }
    fails.assert_none();
}

#[test]
fn opmix_scripts_match_qemu_io_over_backing_files_and_data_files() {
    let mut fails = Failures::default();
    let size = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    // A shared backing file (opened read-only by both), with data of its own.
    let base = create(dir.path(), "base.qcow2", "qcow2", "", size);
    qcow2_tests::qemu_io(
        "qcow2",
        &base,
        &OpMix {
            zero_writes: false,
            discards: false,
            ..OpMix::new(0xba5e, size, 64 * KIB)
        }
        .script(),
    );
    let raw_base = create(dir.path(), "base.raw", "raw", "", size - 3 * MIB);
    for (n, (backing, bfmt, opts)) in [
        (&base, "qcow2", ""),
        (&base, "qcow2", "extended_l2=on"),
        (&raw_base, "raw", "cluster_size=4096"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut copies = Vec::new();
        for who in ["theirs", "ours"] {
            let p = dir.path().join(format!("{who}-{n}.qcow2"));
            let mut args = vec![
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                path_str(backing),
                "-F",
                bfmt,
            ];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            let size_s = size.to_string();
            args.extend([path_str(&p), size_s.as_str()]);
            qemu_img(&args);
            copies.push(p);
        }
        let extl2 = opts.contains("extended_l2");
        let cluster = if opts.contains("4096") {
            4 * KIB
        } else {
            64 * KIB
        };
        let mix = mix_for(0xbac0 + n as u64, size, cluster, extl2);
        let what = format!("over a {bfmt} backing file, -o {opts:?}");
        fails.check(differential(
            &what,
            "qcow2",
            &[],
            &opmix_script(&mix),
            &copies[0],
            &copies[1],
            false,
        ));
    }
    // External data files, each copy with its own.
    for raw in [false, true] {
        let mut copies = Vec::new();
        for who in ["theirs", "ours"] {
            let opts = format!(
                "data_file={},data_file_raw={}",
                path_str(&dir.path().join(format!("{who}-{raw}.data"))),
                if raw { "on" } else { "off" }
            );
            copies.push(create(
                dir.path(),
                &format!("{who}-{raw}.qcow2"),
                "qcow2",
                &opts,
                size,
            ));
        }
        let mix = mix_for(0xda7a + u64::from(raw), size, 64 * KIB, false);
        let what = format!("data file, raw {raw}");
        fails.check(differential(
            &what,
            "qcow2",
            &[],
            &opmix_script(&mix),
            &copies[0],
            &copies[1],
            false,
        ));
    }
    fails.assert_none();
}

#[test]
fn opmix_scripts_match_qemu_io_on_fixtures() {
    opmix_on_fixtures(&[
        "cluster-4k",
        "refcount-1",
        "extl2-32k",
        "compressed-zlib",
        "compressed-zstd-4k",
        "zero-clusters-backing",
        "chain",
        "backing-short",
        "snapshot",
        "data-file",
        "prealloc-metadata",
        "resized",
    ]);
}

#[test]
fn opmix_scripts_match_qemu_io_on_a_v2_image_over_a_backing_file() {
    opmix_on_fixtures(&["v2-zero-backing"]);
}

#[test]
fn opmix_scripts_match_qemu_io_on_an_image_with_bitmaps() {
    opmix_on_fixtures(&["bitmap"]);
}

/// [`differential`] with a seeded OpMix script on two builds of each fixture.
fn opmix_on_fixtures(names: &[&str]) {
    let mut fails = Failures::default();
    for &name in names {
        let spec = fixture(name);
        let (theirs, ours) = (spec.build(), spec.build());
        let e = theirs.expect;
        let mix = mix_for(
            0xf1c5 ^ theirs.virtual_size,
            theirs.virtual_size,
            e.cluster_size,
            e.extended_l2,
        );
        fails.check(differential(
            name,
            "qcow2",
            &[],
            &opmix_script(&mix),
            &theirs.image,
            &ours.image,
            false,
        ));
    }
    fails.assert_none();
}

#[test]
fn raw_images_take_the_same_writes() {
    let mut fails = Failures::default();
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB + 1536;
    let theirs = create(dir.path(), "theirs.raw", "raw", "", size);
    let ours = create(dir.path(), "ours.raw", "raw", "", size);
    let mix = mix_for(0x4a3, size, 4 * KIB, false);
    fails.check(differential(
        "raw",
        "raw",
        &[],
        &opmix_script(&mix),
        &theirs,
        &ours,
        false,
    ));
    fails.assert_none();
}

/// aio writes to disjoint ranges (several inside one cluster: concurrent allocations of the
/// same cluster), zero writes, reads checking them, an `aio_flush` in the middle and requests
/// still in flight at the end.
fn aio_script(seed: u64, size: u64, cluster: u64) -> Vec<String> {
    let mut r = Prng::new(seed);
    let mut s = Vec::new();
    let mut written = Vec::new();
    let slots = size / cluster;
    for round in 0..2 {
        let mut used = std::collections::BTreeSet::new();
        for _ in 0..12 {
            let c = r.below(slots);
            if !used.insert(c) {
                continue;
            }
            let base = c * cluster;
            if r.chance(50) {
                // Pieces of one cluster, written concurrently.
                let n = r.range(2, 4);
                let piece = cluster / n;
                for k in 0..n {
                    let p = 1 + r.below(255) as u8;
                    let len = r.range(1, piece);
                    s.push(format!("aio_write -P 0x{p:02x} {} {len}", base + k * piece));
                    written.push((base + k * piece, len, p));
                }
            } else if r.chance(30) {
                let u = if r.chance(50) { " -u" } else { "" };
                s.push(format!("aio_write -z{u} {base} {cluster}"));
                written.push((base, cluster, 0));
            } else {
                let p = 1 + r.below(255) as u8;
                s.push(format!("aio_write -P 0x{p:02x} {base} {cluster}"));
                written.push((base, cluster, p));
            }
        }
        if round == 0 {
            s.push("aio_flush".into());
            for &(off, len, p) in &written {
                s.push(format!("read -P 0x{p:02x} {off} {len}"));
            }
        }
    }
    s
}

#[test]
fn aio_writes_match_qemu_io_on_cached_backends() {
    aio_writes(&[&[], &["-i", "io_uring"]]);
}

#[test]
fn aio_writes_match_qemu_io_with_o_direct() {
    aio_writes(&[&["-t", "none"], &["-t", "none", "-i", "io_uring"]]);
}

/// [`differential`] with [`aio_script`]s over a few kinds of image, for each set of
/// backend options.
fn aio_writes(backends: &[&[&str]]) {
    let mut fails = Failures::default();
    for (opts, size, cluster) in [
        ("", 16 * MIB, 64 * KIB),
        ("cluster_size=4096", 4 * MIB, 4 * KIB),
        ("extended_l2=on", 16 * MIB, 64 * KIB),
    ] {
        for (n, &args) in backends.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let theirs = create(dir.path(), "theirs.qcow2", "qcow2", opts, size);
            let ours = create(dir.path(), "ours.qcow2", "qcow2", opts, size);
            let script = aio_script(0xa10 + n as u64, size, cluster);
            let what = format!("aio, -o {opts:?}, {args:?}");
            fails.check(differential(
                &what, "qcow2", args, &script, &theirs, &ours, true,
            ));
        }
    }
    fails.assert_none();
}

/// The smallest case of the O_DIRECT bug above: three writes in flight into one 4 KiB block
/// (a new cluster, then an allocated one) must all land.
#[test]
fn concurrent_unaligned_o_direct_writes_into_one_block_all_land() {
    let mut fails = Failures::default();
    let script: Vec<String> = [
        "aio_write -P 0x61 0 352",
        "aio_write -P 0x62 1365 1280",
        "aio_write -P 0x63 2730 320",
        "aio_flush",
        "read -P 0x61 0 352",
        "read -P 0x62 1365 1280",
        "read -P 0x63 2730 320",
        "aio_write -P 0x71 0 352",
        "aio_write -P 0x72 1365 1280",
        "aio_write -P 0x73 2730 320",
        "aio_flush",
        "read -P 0x71 0 352",
        "read -P 0x72 1365 1280",
        "read -P 0x73 2730 320",
    ]
    .map(String::from)
    .to_vec();
    for round in 0..5 {
        for args in [&["-t", "none"][..], &["-t", "none", "-i", "io_uring"]] {
            let dir = tempfile::tempdir().unwrap();
            let opts = "cluster_size=4096";
            let theirs = create(dir.path(), "theirs.qcow2", "qcow2", opts, MIB);
            let ours = create(dir.path(), "ours.qcow2", "qcow2", opts, MIB);
            let what = format!("round {round}");
            fails.check(differential(
                &what, "qcow2", args, &script, &theirs, &ours, true,
            ));
        }
    }
    fails.assert_none();
}

/// v2 images have no zero flag: QEMU does not deallocate a discarded cluster of a v2 image
/// with a backing file (the backing file's data would show through), so the guest still
/// reads what was written.
#[test]
fn discard_on_v2_images_over_a_backing_file_keeps_the_data() {
    let mut fails = Failures::default();
    let size = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "qcow2", "", size);
    qcow2_tests::qemu_io("qcow2", &base, &["write -P 0xbb 0 32M"]);
    let mut copies = Vec::new();
    for who in ["theirs", "ours"] {
        let p = dir.path().join(format!("{who}.qcow2"));
        let size_s = size.to_string();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            path_str(&base),
            "-F",
            "qcow2",
            path_str(&p),
            size_s.as_str(),
        ]);
        copies.push(p);
    }
    let mut script: Vec<String> = [
        "write -P 0x11 0 256k",
        "discard 0 64k",
        "discard 64k 100k",
        "read -P 0x11 0 256k",
        "write -z -u 128k 64k",
        "read -P 0 128k 64k",
    ]
    .map(String::from)
    .to_vec();
    script.extend(opmix_script(&mix_for(0xbac1, size, 64 * KIB, false)));
    fails.check(differential(
        "v2 over a backing file",
        "qcow2",
        &[],
        &script,
        &copies[0],
        &copies[1],
        false,
    ));
    fails.assert_none();
}

#[test]
fn opmix_scripts_match_qemu_io_with_io_uring_and_o_direct() {
    let mut fails = Failures::default();
    for (n, args) in [
        &["-i", "io_uring"][..],
        &["-t", "none"],
        &["-n", "-i", "io_uring"],
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let size = 32 * MIB;
        let theirs = create(
            dir.path(),
            "theirs.qcow2",
            "qcow2",
            "cluster_size=4096",
            size,
        );
        let ours = create(dir.path(), "ours.qcow2", "qcow2", "cluster_size=4096", size);
        let mix = mix_for(0x0d1 + n as u64, size, 4 * KIB, false);
        let what = format!("{args:?}");
        fails.check(differential(
            &what,
            "qcow2",
            args,
            &opmix_script(&mix),
            &theirs,
            &ours,
            false,
        ));
    }
    fails.assert_none();
}

#[test]
fn writes_read_back_and_failures_exit_like_qemu_io() {
    // Read-write sessions with reads of what was just written, FUA writes, the default
    // pattern, write failures past the end and a mismatching read: same lines, same status.
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let theirs = create(dir.path(), "theirs.qcow2", "qcow2", "", size);
    let ours = create(dir.path(), "ours.qcow2", "qcow2", "", size);
    let script: Vec<String> = [
        "write 0 4k",
        "read -P 0xcd 0 4k",
        "write -f -P 0x11 1 65535",
        "read -P 0x11 1 65535",
        "write -P 0x12 4M 0",
        "write -P 0x12 4095k 2k",
        "write -z 4095k 2k",
        "discard 4095k 2k",
        "read -P 0x12 0 1",
        "write -z -u 0 64k",
        "read -P 0 0 64k",
        "discard 64k 64k",
        "length",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let t = qemu_io(&["-f", "qcow2"], &script, &theirs);
    let o = qimg_io(&["-f", "qcow2"], &script, &ours);
    assert_eq!(t.code, Some(1));
    o.assert_same(&t, "read-write session");
    let cmp = qemu_img_status(&["compare", path_str(&theirs), path_str(&ours)]);
    assert_eq!(cmp.status.code(), Some(0));
    assert_eq!(qemu_check(&ours).status.code(), Some(0));
}
