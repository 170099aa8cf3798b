//! Self-check of the QEMU fixture library: every fixture of the matrix
//! builds, is clean for `qemu-img check`, has the expected format features,
//! and holds real data (so the matrix cannot silently degrade).
//!
//! Run with `cargo test -p qcow2-tests --test fixtures_selfcheck -- --nocapture`
//! to see per-fixture build times.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use qcow2_tests::*;
use serde_json::Value;

fn all_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

/// Checks that the extents of `qemu-img map --output=json` tile the disk.
fn check_map_tiles(map: &Value, size: u64) -> Result<(), String> {
    let mut pos = 0;
    for e in map.as_array().ok_or("map is not an array")? {
        let start = e["start"].as_u64().ok_or("extent without start")?;
        let len = e["length"].as_u64().ok_or("extent without length")?;
        if start != pos || len == 0 {
            return Err(format!(
                "map extents do not tile: expected start {pos}, got {e}"
            ));
        }
        pos += len;
    }
    if pos != size {
        return Err(format!("map covers {pos} bytes, virtual size is {size}"));
    }
    Ok(())
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, expected {want:?}"))
    }
}

/// All the checks of one fixture; returns the build time.
fn check_fixture(spec: &FixtureSpec) -> Result<Duration, String> {
    let t = Instant::now();
    let fx = spec.build();
    let build_time = t.elapsed();
    check_qemu_check(&fx)?;
    check_info(&fx)?;
    check_map(&fx)?;
    let reference = check_reference(&fx)?;
    if fx.expect.data_file_raw {
        check_data_file_raw(&fx, &reference)?;
    }
    if fx.expect.snapshots > 0 {
        check_snapshots(&fx, &reference)?;
    }
    if fx.expect.dirty {
        check_repair(&fx, &reference)?;
    }
    Ok(build_time)
}

/// qemu-img check: clean, except the deliberately crashed image.
fn check_qemu_check(fx: &Fixture) -> Result<(), String> {
    let check = qemu_check(&fx.image);
    let want_rc = if fx.expect.dirty { 2 } else { 0 };
    if check.status.code() != Some(want_rc) {
        return Err(format!(
            "qemu-img check exit {:?} (want {want_rc}):\n{}{}",
            check.status.code(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        ));
    }
    Ok(())
}

/// qemu-img info: the format, sizes, features, snapshots and backing chain expected.
fn check_info(fx: &Fixture) -> Result<(), String> {
    let ex = fx.expect;
    let info = fx.info_json();
    expect_eq("format", info["format"].as_str(), Some("qcow2"))?;
    expect_eq(
        "virtual-size",
        info["virtual-size"].as_u64(),
        Some(fx.virtual_size),
    )?;
    expect_eq(
        "cluster-size",
        info["cluster-size"].as_u64(),
        Some(ex.cluster_size),
    )?;
    expect_eq("dirty-flag", info["dirty-flag"].as_bool(), Some(ex.dirty))?;
    check_format_specific(&info["format-specific"]["data"], &ex)?;
    let snaps = info["snapshots"].as_array().map_or(0, Vec::len);
    expect_eq("snapshots", snaps, ex.snapshots)?;
    expect_eq(
        "backing-filename present",
        info.get("backing-filename").is_some(),
        ex.backing_depth > 0,
    )?;
    if ex.backing_depth > 0 {
        let chain = qemu_info_chain_json(&fx.image);
        expect_eq(
            "backing chain length",
            chain.as_array().map(Vec::len),
            Some(ex.backing_depth + 1),
        )?;
    }
    Ok(())
}

/// The qcow2-specific part of qemu-img info (`format-specific.data`).
fn check_format_specific(fs: &Value, ex: &Expect) -> Result<(), String> {
    expect_eq("compat", fs["compat"].as_str(), Some(ex.compat))?;
    expect_eq(
        "refcount-bits",
        fs["refcount-bits"].as_u64(),
        Some(ex.refcount_bits),
    )?;
    expect_eq(
        "compression-type",
        fs["compression-type"].as_str(),
        Some(ex.compression_type),
    )?;
    if ex.compat == "1.1" {
        expect_eq(
            "extended-l2",
            fs["extended-l2"].as_bool(),
            Some(ex.extended_l2),
        )?;
        expect_eq(
            "lazy-refcounts",
            fs["lazy-refcounts"].as_bool(),
            Some(ex.lazy_refcounts),
        )?;
        expect_eq("corrupt", fs["corrupt"].as_bool(), Some(false))?;
    } else {
        expect_eq("v2 has no extended-l2 field", fs.get("extended-l2"), None)?;
    }
    expect_eq(
        "data-file present",
        fs.get("data-file").is_some(),
        ex.data_file,
    )?;
    if ex.data_file {
        expect_eq(
            "data-file-raw",
            fs["data-file-raw"].as_bool(),
            Some(ex.data_file_raw),
        )?;
    }
    let bitmaps: Vec<&str> = fs["bitmaps"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["name"].as_str()).collect())
        .unwrap_or_default();
    expect_eq("bitmaps", bitmaps.as_slice(), ex.bitmaps)
}

/// qemu-img map: the extents tile the disk, show compressed clusters if expected, and data in
/// the top image.
fn check_map(fx: &Fixture) -> Result<(), String> {
    let map = fx.map_json();
    check_map_tiles(&map, fx.virtual_size)?;
    let extents = map.as_array().unwrap();
    let compressed = extents.iter().any(|e| e["compressed"] == Value::Bool(true));
    expect_eq(
        "map shows compressed clusters",
        compressed,
        fx.expect.compressed,
    )?;
    let own_data = extents
        .iter()
        .any(|e| e["depth"] == 0 && e["data"] == Value::Bool(true));
    expect_eq("map shows data in the top image", own_data, true)
}

/// QEMU's reading of the disk: as long as the disk, and not all zeros. Returns it.
fn check_reference(fx: &Fixture) -> Result<Vec<u8>, String> {
    let reference = fx.raw_reference();
    expect_eq(
        "raw reference length",
        reference.len() as u64,
        fx.virtual_size,
    )?;
    if all_zero(&reference) {
        return Err("raw reference is all zeros".into());
    }
    Ok(reference)
}

/// Raw mode: the data file alone is the disk.
fn check_data_file_raw(fx: &Fixture, reference: &[u8]) -> Result<(), String> {
    let data = std::fs::read(fx.dir.path().join("image.data")).map_err(|e| e.to_string())?;
    let n = data.len().min(reference.len());
    if data[..n] != reference[..n] || !all_zero(&reference[n..]) || !all_zero(&data[n..]) {
        return Err("data_file_raw: data file differs from the guest view".into());
    }
    Ok(())
}

/// Every internal snapshot reads differently from the active image, and not as all zeros.
fn check_snapshots(fx: &Fixture, reference: &[u8]) -> Result<(), String> {
    for s in 1..=fx.expect.snapshots {
        let snap = raw_reference_snapshot(&fx.image, &format!("snap{s}"));
        expect_eq("snapshot length", snap.len(), reference.len())?;
        if snap == reference {
            return Err(format!("snapshot snap{s} equals the active image"));
        }
        if all_zero(&snap) {
            return Err(format!("snapshot snap{s} is all zeros"));
        }
    }
    Ok(())
}

/// The dirty image: `check -r all` on a copy repairs the refcounts; data unchanged.
fn check_repair(fx: &Fixture, reference: &[u8]) -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("copy.qcow2");
    std::fs::copy(&fx.image, &copy).unwrap();
    qemu_img(&["check", "-q", "-r", "all", path_str(&copy)]);
    let after = qemu_check(&copy);
    expect_eq("check after repair", after.status.code(), Some(0))?;
    expect_eq(
        "dirty-flag after repair",
        qemu_info_json(&copy)["dirty-flag"].as_bool(),
        Some(false),
    )?;
    if raw_reference(&copy, "qcow2") != reference {
        return Err("repair changed the guest data".into());
    }
    Ok(())
}

fn fixture_specific(name: &str, fx: &Fixture) -> Result<(), String> {
    let map = fx.map_json();
    let extents = map.as_array().unwrap();
    let has = |f: &dyn Fn(&Value) -> bool| extents.iter().any(f);
    match name {
        "zero-clusters" => {
            // zero-alloc (offset kept) and zero-plain (no offset) clusters.
            let zero = |e: &Value| {
                e["depth"] == 0 && e["present"] == true && e["zero"] == true && e["data"] == false
            };
            if !has(&|e| zero(e) && e.get("offset").is_some()) {
                return Err(format!("no zero-alloc extent in {map}"));
            }
            if !has(&|e| zero(e) && e.get("offset").is_none()) {
                return Err(format!("no zero-plain extent in {map}"));
            }
            if !has(&|e| e["present"] == false) {
                return Err("no unallocated extent".into());
            }
        }
        "chain" | "chain-relative" => {
            let info = fx.info_json();
            let b = info["backing-filename"].as_str().unwrap();
            let relative = name == "chain-relative";
            expect_eq("backing name is relative", !b.starts_with('/'), relative)?;
            for depth in 0..=2 {
                if !has(&|e| e["depth"] == depth && e["data"] == true) {
                    return Err(format!("no data at depth {depth}: {map}"));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[test]
fn every_fixture_builds_and_matches_expectations() {
    let specs = matrix();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let times = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(spec) = specs.get(i) else { break };
                let r = std::panic::catch_unwind(|| check_fixture(spec)).unwrap_or_else(|p| {
                    Err(p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into()))
                });
                match r {
                    Ok(d) => times.lock().unwrap().push((spec.name, d)),
                    Err(e) => failures.lock().unwrap().push(format!("{}: {e}", spec.name)),
                }
            });
        }
    });
    let wall = t0.elapsed();
    let mut times = times.into_inner().unwrap();
    times.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    let sum: Duration = times.iter().map(|(_, d)| *d).sum();
    for (name, d) in &times {
        eprintln!("  build {name:<28} {:>7.3}s", d.as_secs_f64());
    }
    eprintln!(
        "{} fixtures: builds took {:.2}s in total; whole self-check {:.2}s wall with {workers} workers",
        specs.len(),
        sum.as_secs_f64(),
        wall.as_secs_f64()
    );
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} fixture(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn fixture_specific_properties() {
    for name in ["zero-clusters", "chain", "chain-relative"] {
        let fx = fixture(name).build();
        if let Err(e) = fixture_specific(name, &fx) {
            panic!("{name}: {e}");
        }
    }
}

#[test]
fn fixture_names_are_unique_and_kebab_case() {
    let mut seen = BTreeSet::new();
    for f in matrix() {
        assert!(seen.insert(f.name), "duplicate fixture {}", f.name);
        assert!(
            f.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "bad fixture name {}",
            f.name
        );
        assert!(!f.description.is_empty());
    }
    for required in [
        "cluster-512",
        "cluster-4k",
        "cluster-64k",
        "cluster-2m",
        "refcount-1",
        "refcount-64",
        "v2",
        "v2-zero",
        "extl2-64k",
        "extl2-backing",
        "compressed-zlib",
        "compressed-zstd",
        "compressed-zlib-rewritten",
        "compressed-zlib-4k",
        "zero-clusters",
        "chain",
        "chain-relative",
        "backing-short",
        "snapshot",
        "bitmap",
        "data-file",
        "data-file-raw",
        "lazy-refcounts",
        "prealloc-metadata",
        "prealloc-full",
        "resized",
    ] {
        assert!(seen.contains(required), "fixture {required} missing");
    }
}

/// Guest content and allocation map do not depend on the run.
#[test]
fn fixtures_are_deterministic() {
    for name in [
        "cluster-512",
        "compressed-zstd-rewritten",
        "extl2-backing",
        "chain",
    ] {
        let a = fixture(name).build();
        let b = fixture(name).build();
        assert!(
            a.raw_reference() == b.raw_reference(),
            "{name}: content differs between builds"
        );
        // Offsets in the map are the same too, except for backing files
        // whose paths differ: compare the top layer only.
        let strip = |m: Value| -> Vec<Value> {
            m.as_array()
                .unwrap()
                .iter()
                .filter(|e| e["depth"] == 0)
                .cloned()
                .collect()
        };
        assert_eq!(
            strip(a.map_json()),
            strip(b.map_json()),
            "{name}: map differs between builds"
        );
    }
    // The crashed image is reproducible byte for byte.
    let a = fixture("lazy-refcounts-dirty").build();
    let b = fixture("lazy-refcounts-dirty").build();
    assert!(
        std::fs::read(&a.image).unwrap() == std::fs::read(&b.image).unwrap(),
        "dirty image differs"
    );
}

#[test]
fn op_mix_is_deterministic_and_in_bounds() {
    for (size, cluster, sub) in [
        (16 << 20, 512, false),
        (544 << 20, 65536, false),
        (24 << 20, 16384, true),
    ] {
        let mix = OpMix {
            subclusters: sub,
            l2_entry_bytes: if sub { 16 } else { 8 },
            ..OpMix::new(7, size, cluster)
        };
        let s = mix.script();
        assert_eq!(s, mix.script());
        assert_eq!(s.len(), mix.ops);
        let mut kinds = BTreeSet::new();
        let mut patterns = BTreeSet::new();
        let mut at_end = false;
        for c in &s {
            let parts: Vec<&str> = c.split(' ').collect();
            let n = parts.len();
            let (off, len): (u64, u64) =
                (parts[n - 2].parse().unwrap(), parts[n - 1].parse().unwrap());
            assert!(len >= 1 && off + len <= size, "{c} out of bounds");
            at_end |= off + len == size;
            kinds.insert(
                parts[..n - 2]
                    .iter()
                    .filter(|p| !p.starts_with("0x"))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            if let Some(i) = parts.iter().position(|p| *p == "-P") {
                assert!(patterns.insert(parts[i + 1]), "pattern reused in {c}");
                assert_ne!(parts[i + 1], "0x00");
            }
        }
        assert!(at_end, "no write at the end of the disk");
        for k in ["write -P", "write -z", "write -z -u", "discard"] {
            assert!(kinds.contains(k), "no `{k}` in {s:?}");
        }
    }
}

#[test]
fn random_ranges_cover_edges() {
    let size = 16 * 1024 * 1024 + 1536;
    let r = random_ranges(1, size, 200, 300_000);
    assert_eq!(r, random_ranges(1, size, 200, 300_000));
    assert_ne!(r, random_ranges(2, size, 200, 300_000));
    assert_eq!(r.len(), 200);
    assert!(r
        .iter()
        .all(|&(o, l)| (1..=300_000).contains(&l) && o + l <= size));
    assert!(r.iter().any(|&(o, l)| o + l == size && l > 1));
    assert!(r.contains(&(size - 1, 1)));
    assert!(r.iter().any(|&(o, l)| o % 512 != 0 && l % 512 != 0));
    assert!(r
        .iter()
        .any(|&(o, l)| o / 65536 != (o + l - 1) / 65536 && o % 65536 != 0));
    assert!(r.iter().any(|&(o, l)| o % 65536 == 0 && l % 4096 == 0));
    // Degenerate sizes.
    assert!(random_ranges(3, 1, 10, 100).iter().all(|&r| r == (0, 1)));
    assert!(random_ranges(3, 1000, 50, 1)
        .iter()
        .all(|&(o, l)| l == 1 && o < 1000));
}

#[test]
#[should_panic(expected = "qemu-utils")]
fn missing_tool_names_the_package() {
    tool("qemu-img-definitely-not-installed");
}

#[test]
#[should_panic(expected = "Pattern verification failed")]
fn qemu_io_catches_pattern_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&img), "1M"]);
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x11 0 4096", "read -P 0x22 0 4096"],
    );
}

#[test]
fn raw_reference_reads_back_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&img), "1M"]);
    qemu_io("qcow2", &img, &["write -P 0x11 1000 3000"]);
    let r = raw_reference(&img, "qcow2");
    assert_eq!(r.len(), 1 << 20);
    assert!(
        all_zero(&r[..1000]) && r[1000..4000].iter().all(|&b| b == 0x11) && all_zero(&r[4000..])
    );
}

/// Not a check: writes every fixture to `$QCOW2_FIXTURES_OUT/<name>/` for
/// manual inspection (`QCOW2_FIXTURES_OUT=/tmp/fx cargo test -p qcow2-tests
/// --test fixtures_selfcheck -- --ignored export_fixtures`).
#[test]
#[ignore = "manual: exports the fixtures to $QCOW2_FIXTURES_OUT"]
fn export_fixtures() {
    let out =
        std::env::var_os("QCOW2_FIXTURES_OUT").expect("set QCOW2_FIXTURES_OUT to a directory");
    let out = std::path::PathBuf::from(out);
    for spec in matrix() {
        let dir = out.join(spec.name);
        std::fs::create_dir_all(&dir).unwrap();
        let image = spec.build_in(&dir);
        eprintln!("{:<28} {}", spec.name, image.display());
    }
}
