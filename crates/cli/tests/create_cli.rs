//! `qimg create` against `qemu-img create`.
//!
//! Every case runs both tools with the same arguments, each in its own directory holding the
//! same backing files (so relative names and the "Formatting" line are the same), and then
//! requires:
//!
//! - the same exit status, the same stdout (qemu-img's "Formatting ..." line) and the same
//!   stderr (after the program name);
//! - for an image both created: `qemu-img check` finds ours clean (no corruption, no leak),
//!   `qemu-img info --output=json` says the same of both (but for `actual-size` and the
//!   directory), and the files (image and data file) are byte-identical, compared extent by
//!   extent so that sparse terabyte images cost nothing;
//! - qemu-io writes and reads back a pattern in ours, which stays clean, and the engine opens
//!   it and reads the same bytes.
//!
//! The matrix: every cluster size (512, 4k, 64k, 2M) with every refcount width and sizes from
//! 1M to 4T, compat 0.10 and 1.1, extended L2, zstd, lazy refcounts, every preallocation mode
//! (unaligned sizes included), backing files (qcow2 and raw, with and without -F, -u, size
//! taken from the backing file), external data files (raw or not, with each preallocation),
//! raw images, and qemu-img's error paths (option syntax, sizes, incompatible options).
//! Engine-level tests check the typed errors and that a creation cut short at any point
//! leaves either no image or a clean one.

mod create_cases;

use blockio::{
    Backend, CrashSpec, FaultOpener, FileOpener, IoBuf, MemoryOpener, OpenOptions, Opener,
};
use create_cases::matrix;
use qcow2_engine::{
    create, create_raw, Compat, CreateError, CreateOptions, Error, Image, ImageFormat,
    ImageOptions, Preallocation, V3Feature,
};
use qcow2_format::CompressionType;
use qcow2_tests::tool;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const IMG: &str = "img.qcow2";

fn run_in(program: &Path, dir: &Path, args: &[String]) -> Output {
    Command::new(program)
        .env("LC_ALL", "C")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn qimg(dir: &Path, args: &[String]) -> Output {
    run_in(Path::new(env!("CARGO_BIN_EXE_qimg")), dir, args)
}

fn qemu_img(dir: &Path, args: &[String]) -> Output {
    run_in(&tool("qemu-img"), dir, args)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The backing files every case directory holds.
fn setup(dir: &Path) {
    for args in [
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"][..],
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "base3m.qcow2",
            "3M",
        ],
        &["create", "-q", "-f", "raw", "base.raw", "1000"],
    ] {
        let out = qemu_img(dir, &strings(args));
        assert!(out.status.success(), "setup: {}", text(&out.stderr));
    }
}

/// What one case came to.
#[derive(Debug)]
enum Outcome {
    /// Both refused, with the same message.
    Refused(String),
    /// Both created; whether the files are byte-identical (else where they differ).
    Created(Result<(), String>),
}

/// Runs `create ARGS` with both tools and checks everything but byte identity (which it
/// reports). Panics with a description on any disagreement.
fn run_case(args: &[String]) -> Outcome {
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ours");
    let theirs = tmp.path().join("theirs");
    for d in [&ours, &theirs] {
        std::fs::create_dir(d).unwrap();
        setup(d);
    }
    let mut full = vec!["create".to_string()];
    full.extend_from_slice(args);
    let o = qimg(&ours, &full);
    let t = qemu_img(&theirs, &full);
    let what = args.join(" ");
    assert_eq!(
        o.status.code(),
        t.status.code(),
        "create {what}: exit status differs\nqimg: {}\nqemu-img: {}",
        text(&o.stderr),
        text(&t.stderr)
    );
    assert_eq!(
        text(&o.stdout),
        text(&t.stdout),
        "create {what}: stdout differs"
    );
    let o_err = text(&o.stderr).replace("qimg: ", "PROG: ");
    let t_err = text(&t.stderr).replace("qemu-img: ", "PROG: ");
    assert_eq!(o_err, t_err, "create {what}: stderr differs");
    if !t.status.success() {
        return Outcome::Refused(t_err.lines().next().unwrap_or("").to_owned());
    }

    // With -u the backing file may not exist: give both images one now, so that check,
    // info, qemu-io and the engine can open them.
    let arg_after = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone());
    if let (Some(b), Some(f)) = (arg_after("-b"), arg_after("-F")) {
        for d in [&ours, &theirs] {
            if !d.join(&b).exists() {
                let out = qemu_img(d, &strings(&["create", "-q", "-f", &f, &b, "1M"]));
                assert!(out.status.success(), "{}", text(&out.stderr));
            }
        }
    }
    let qcow2 = args.windows(2).any(|w| w[0] == "-f" && w[1] == "qcow2");
    if qcow2 {
        let check = qemu_img(&ours, &strings(&["check", IMG]));
        assert!(
            check.status.success() && text(&check.stdout).contains("No errors were found"),
            "create {what}: qemu-img check on ours: {}{}",
            text(&check.stdout),
            text(&check.stderr)
        );
    }
    let fmt = if qcow2 { "qcow2" } else { "raw" };
    let info = |dir: &Path| -> Value {
        let out = qemu_img(dir, &strings(&["info", "-f", fmt, "--output=json", IMG]));
        assert!(out.status.success(), "info: {}", text(&out.stderr));
        let mut v: Value = serde_json::from_slice(&out.stdout).unwrap();
        drop_actual_size(&mut v);
        let s = serde_json::to_string(&v)
            .unwrap()
            .replace(dir.to_str().unwrap(), "DIR");
        serde_json::from_str(&s).unwrap()
    };
    assert_eq!(
        info(&ours),
        info(&theirs),
        "create {what}: qemu-img info differs"
    );

    let mut identical = files_identical(&ours.join(IMG), &theirs.join(IMG));
    let data = theirs.join("img.data");
    if identical.is_ok() && data.exists() {
        identical =
            files_identical(&ours.join("img.data"), &data).map_err(|e| format!("data file: {e}"));
    }

    if qcow2 {
        use_created_image(&ours, &what);
    }
    Outcome::Created(identical)
}

/// Removes every `actual-size` (blocks the file system allocated: with the same bytes and
/// the same allocated ranges, a more fragmented file still costs an extent block more).
fn drop_actual_size(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("actual-size");
            m.values_mut().for_each(drop_actual_size);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_actual_size),
        _ => {}
    }
}

/// qemu-io writes a pattern at both ends of the disk and reads it back; the image stays
/// clean; the engine opens it and reads the same.
fn use_created_image(dir: &Path, what: &str) {
    let rt = runtime();
    let img = dir.join(IMG);
    let size = rt.block_on(async {
        Image::open(FileOpener, &img, ImageOptions::new().read_only(true))
            .await
            .unwrap_or_else(|e| panic!("create {what}: engine cannot open ours: {e}"))
            .size()
    });
    if size == 0 {
        return;
    }
    // A pattern at the start and, when the disk is big enough, another one at its end.
    let head = size.min(64 << 10);
    let tail = (size >= 128 << 10).then_some(size - 512);
    let mut cmds = vec![format!("write -P 0xab 0 {head}")];
    if let Some(t) = tail {
        cmds.push(format!("write -P 0xcd {t} 512"));
        cmds.push(format!("read -P 0xcd {t} 512"));
    }
    cmds.push(format!("read -P 0xab 0 {head}"));
    let mut args = strings(&["-f", "qcow2"]);
    for c in &cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(IMG.into());
    let out = run_in(&tool("qemu-io"), dir, &args);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr)).to_lowercase();
    assert!(
        out.status.success() && !all.contains("fail") && !all.contains("error"),
        "create {what}: qemu-io on ours: {all}"
    );
    let check = qemu_img(dir, &strings(&["check", IMG]));
    assert!(
        check.status.success(),
        "create {what}: check after qemu-io: {}",
        text(&check.stdout)
    );
    rt.block_on(async {
        let img = Image::open(FileOpener, &img, ImageOptions::new().read_only(true))
            .await
            .unwrap();
        let first = img.read(0, head).await.unwrap();
        assert!(
            first.iter().all(|&b| b == 0xab),
            "create {what}: engine reads head"
        );
        if let Some(t) = tail {
            let last = img.read(t, 512).await.unwrap();
            assert!(
                last.iter().all(|&b| b == 0xcd),
                "create {what}: engine reads tail"
            );
        }
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Compares two files byte for byte (and their lengths), reading only where either has
/// data: holes read as zeros.
fn files_identical(a: &Path, b: &Path) -> Result<(), String> {
    runtime().block_on(async {
        let ro = OpenOptions::default();
        let fa = FileOpener.open(a, ro).await.map_err(|e| e.to_string())?;
        let fb = FileOpener.open(b, ro).await.map_err(|e| e.to_string())?;
        let (la, lb) = (fa.len().await.unwrap(), fb.len().await.unwrap());
        if la != lb {
            return Err(format!("lengths {la:#x} and {lb:#x}"));
        }
        const CHUNK: u64 = 4 << 20;
        let mut off = 0;
        let (mut ba, mut bb) = (IoBuf::new(CHUNK as usize), IoBuf::new(CHUNK as usize));
        while off < la {
            let left = la - off;
            let xa = fa.allocation(off, left).await.unwrap();
            let xb = fb.allocation(off, left).await.unwrap();
            if !xa.data && !xb.data {
                off += xa.len.min(xb.len).max(1);
                continue;
            }
            let n = left.min(CHUNK) as usize;
            ba.set_window(0..n);
            bb.set_window(0..n);
            let (r, x) = fa.read_at(ba, off).await;
            ba = x;
            r.unwrap();
            let (r, x) = fb.read_at(bb, off).await;
            bb = x;
            r.unwrap();
            if ba[..] != bb[..] {
                let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
                return Err(format!("first difference at {:#x}", off + i as u64));
            }
            off += n as u64;
        }
        Ok(())
    })
}

#[test]
fn qimg_create_matches_qemu_img_create() {
    let mut identical = Vec::new();
    let mut different = Vec::new();
    let mut refused = Vec::new();
    for args in matrix() {
        let what = args.join(" ");
        match run_case(&args) {
            Outcome::Refused(msg) => refused.push(format!("{what}: {msg}")),
            Outcome::Created(Ok(())) => identical.push(what),
            Outcome::Created(Err(e)) => different.push(format!("{what}: {e}")),
        }
    }
    println!("byte-identical to qemu-img create ({}):", identical.len());
    for w in &identical {
        println!("  {w}");
    }
    println!("refused by both, same message ({}):", refused.len());
    for w in &refused {
        println!("  {w}");
    }
    println!("different bytes ({}):", different.len());
    for w in &different {
        println!("  {w}");
    }
    assert!(
        different.is_empty(),
        "images that differ from qemu-img's:\n{}",
        different.join("\n")
    );
    assert!(identical.len() > 150, "too few images were created");
}

/// Creates an image with `opts`, which must fail, and returns the typed error.
fn create_error(opts: CreateOptions) -> CreateError {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("img.qcow2");
    let err = runtime()
        .block_on(create(&FileOpener, &path, &opts))
        .expect_err("creation should fail");
    assert!(!path.exists(), "a refused creation must not touch the file");
    match err {
        Error::Create(e) => e,
        other => panic!("not a create error: {other:?}"),
    }
}

#[test]
fn engine_refuses_bad_options_with_typed_errors() {
    let base = || CreateOptions::new().size(1 << 20);
    use CreateError as E;
    assert_eq!(create_error(base().size(1000)), E::SizeNotAligned(1000));
    assert_eq!(create_error(CreateOptions::new()), E::MissingSize);
    for cs in [0, 256, 1000, 4 << 20, 3 << 12] {
        assert_eq!(create_error(base().cluster_size(cs)), E::ClusterSize(cs));
    }
    assert_eq!(
        create_error(base().cluster_size(4096).extended_l2(true)),
        E::ExtendedL2ClusterSize(4096)
    );
    for bits in [0, 3, 128, 12] {
        assert_eq!(
            create_error(base().refcount_bits(bits)),
            E::RefcountBits(bits)
        );
    }
    let v2 = || base().compat(Compat::V2);
    assert_eq!(
        create_error(v2().refcount_bits(8)),
        E::NeedsV3(V3Feature::RefcountBits)
    );
    assert_eq!(
        create_error(v2().lazy_refcounts(true)),
        E::NeedsV3(V3Feature::LazyRefcounts)
    );
    assert_eq!(
        create_error(v2().extended_l2(true)),
        E::NeedsV3(V3Feature::ExtendedL2)
    );
    assert_eq!(
        create_error(v2().compression_type(CompressionType::Zstd)),
        E::NeedsV3(V3Feature::CompressionType)
    );
    assert_eq!(
        create_error(v2().data_file("x.data")),
        E::NeedsV3(V3Feature::DataFile)
    );
    assert_eq!(
        create_error(base().data_file_raw(true)),
        E::DataFileRawWithoutDataFile
    );
    let backed = || {
        base()
            .backing_file("base.qcow2", ImageFormat::Qcow2)
            .check_backing(false)
    };
    assert_eq!(
        create_error(backed().data_file("x.data").data_file_raw(true)),
        E::BackingWithDataFileRaw
    );
    assert_eq!(
        create_error(backed().preallocation(Preallocation::Metadata)),
        E::BackingWithPreallocation
    );
    assert_eq!(
        create_error(base().backing_file("", ImageFormat::Qcow2)),
        E::EmptyBackingName
    );
    assert!(matches!(
        create_error(base().backing_file("missing.qcow2", ImageFormat::Qcow2)),
        E::OpenBacking { .. }
    ));
    assert_eq!(
        create_error(base().size(4 << 40).cluster_size(512)),
        E::TooLarge
    );
    assert_eq!(create_error(base().size(1 << 60)), E::TooLarge);
    let long = "n".repeat(1100);
    assert!(matches!(
        create_error(
            base()
                .backing_file(long, ImageFormat::Raw)
                .check_backing(false)
        ),
        E::BackingNameTooLong { .. }
    ));
    assert!(matches!(
        create_error(
            base()
                .cluster_size(512)
                .backing_file("n".repeat(400), ImageFormat::Raw)
                .check_backing(false)
        ),
        E::BackingNameNoSpace { .. }
    ));
    // The messages are qemu-img's.
    assert_eq!(
        E::ClusterSize(1000).to_string(),
        "Cluster size must be a power of two between 512 and 2048k"
    );
    assert_eq!(
        E::TooLarge.to_string(),
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    );

    let tmp = tempfile::tempdir().unwrap();
    let err = runtime()
        .block_on(create_raw(
            &FileOpener,
            tmp.path().join("r.raw"),
            1 << 20,
            Preallocation::Metadata,
        ))
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Create(E::UnsupportedPreallocation(Preallocation::Metadata))
    ));
}

#[test]
fn engine_creates_and_opens_in_memory() {
    runtime().block_on(async {
        let opener = MemoryOpener::new();
        let opts = CreateOptions::new()
            .size(64 << 20)
            .cluster_size(4096)
            .refcount_bits(64)
            .preallocation(Preallocation::Metadata);
        create(&opener, "m.qcow2", &opts).await.unwrap();
        let img = Image::open(
            opener.clone(),
            "m.qcow2",
            ImageOptions::new().read_only(true),
        )
        .await
        .unwrap();
        assert_eq!(img.size(), 64 << 20);
        assert_eq!(img.cluster_size(), 4096);
        assert!(img.read(0, 1 << 20).await.unwrap().iter().all(|&b| b == 0));
    });
}

/// Every point at which creation can be cut short (and any subset of the writes not yet
/// flushed) leaves a file that is either no qcow2 image at all (the header comes last) or a
/// complete, clean one.
#[test]
fn interrupted_creation_leaves_no_corrupt_image() {
    let cases = [
        CreateOptions::new().size(1 << 30),
        CreateOptions::new()
            .size(16 << 20)
            .cluster_size(4096)
            .preallocation(Preallocation::Metadata),
        // Refcount table growth: stale tables, refcount blocks describing themselves.
        CreateOptions::new()
            .size(64 << 20)
            .cluster_size(512)
            .refcount_bits(64),
        CreateOptions::new()
            .size(2 << 20)
            .cluster_size(512)
            .preallocation(Preallocation::Falloc),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("crash.qcow2");
    let mut checked = 0;
    for opts in cases {
        let fo = FaultOpener::new(MemoryOpener::new());
        runtime().block_on(create(&fo, "img", &opts)).unwrap();
        let ctl = fo.controller();
        let completed = ctl.log().iter().map(|e| e.seq + 1).max().unwrap_or(0);
        for at in 0..=completed {
            for seed in 0..3 {
                let image = ctl.crash(&[], &CrashSpec::new(seed).at(at)).bytes;
                if image.len() < 4 || image[..4] != *b"QFI\xfb" {
                    continue;
                }
                std::fs::write(&file, &image).unwrap();
                let check = qemu_img(tmp.path(), &strings(&["check", "crash.qcow2"]));
                assert!(
                    check.status.success(),
                    "{opts:?}: crash after {at} requests (seed {seed}): {}",
                    text(&check.stdout)
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no crash image had a header");
}

/// The helper itself: different files are reported as different.
#[test]
fn file_comparison_sees_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b): (PathBuf, PathBuf) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::write(&a, [0u8, 1, 2]).unwrap();
    std::fs::write(&b, [0u8, 1, 3]).unwrap();
    assert!(files_identical(&a, &b).is_err());
    std::fs::write(&b, [0u8, 1, 2]).unwrap();
    assert!(files_identical(&a, &b).is_ok());
    std::fs::write(&b, [0u8, 1, 2, 0]).unwrap();
    assert!(files_identical(&a, &b).is_err());
}
