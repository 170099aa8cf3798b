//! Write-zeroes and extended-L2 subclusters laid out as QEMU lays them out.
//!
//! Each case builds an image with `qemu-img` and `qemu-io`, copies it, runs the same qemu-io
//! commands through qemu-io on one copy and through `qimg io` on the other, and then asks
//! QEMU's own tools about both: `qemu-img map --output=json` must show the same layout (the
//! present, zero, data and compressed flags and the depth of every byte; host offsets aside,
//! which each allocator picks for itself), `qemu-img compare` must say identical, and
//! `qemu-img check` must find both copies clean. What QEMU does is never derived from our own
//! code: it is whatever qemu-io leaves behind.

use qcow2_tests::{path_str, qemu_check, qemu_img, qemu_img_status, qemu_io, qemu_map_json, tool};
use std::path::{Path, PathBuf};
use std::process::Command;

const KIB: u64 = 1024;

/// One run of `qemu-img map --output=json`, reduced to what must match: (start, length,
/// depth, present, zero, data, compressed), with neighbours that differ only in their host
/// offsets merged.
fn layout(image: &Path) -> Vec<(u64, u64, u64, bool, bool, bool, bool)> {
    let map = qemu_map_json(image);
    let mut out: Vec<(u64, u64, u64, bool, bool, bool, bool)> = Vec::new();
    for e in map.as_array().expect("qemu-img map prints an array") {
        let n = |k: &str| {
            e[k].as_u64()
                .unwrap_or_else(|| panic!("map entry without {k}: {e}"))
        };
        let b = |k: &str| {
            e[k].as_bool()
                .unwrap_or_else(|| panic!("map entry without {k}: {e}"))
        };
        let row = (
            n("start"),
            n("length"),
            n("depth"),
            b("present"),
            b("zero"),
            b("data"),
            b("compressed"),
        );
        match out.last_mut() {
            Some(last)
                if last.0 + last.1 == row.0
                    && (last.2, last.3, last.4, last.5, last.6)
                        == (row.2, row.3, row.4, row.5, row.6) =>
            {
                last.1 += row.1
            }
            _ => out.push(row),
        }
    }
    out
}

/// Runs `script` through qemu-io on a copy of `image` and through `qimg io` on another copy
/// (both next to it, so that a relative backing file name still resolves), then compares as
/// the module says. Returns a description of the first difference.
fn same_as_qemu(what: &str, image: &Path, script: &[&str]) -> Result<(), String> {
    let dir = image.parent().expect("an image in a directory");
    let theirs = dir.join(format!("{what}.theirs.qcow2"));
    let ours = dir.join(format!("{what}.ours.qcow2"));
    for copy in [&theirs, &ours] {
        std::fs::copy(image, copy).expect("copy the image");
    }
    let context = format!("{what}: script {script:?}");
    for (name, mut cmd, img) in [
        ("qemu-io", Command::new(tool("qemu-io")), &theirs),
        ("qimg io", Command::new(env!("CARGO_BIN_EXE_qimg")), &ours),
    ] {
        if name == "qimg io" {
            cmd.arg("io");
        }
        cmd.env("LC_ALL", "C").args(["-f", "qcow2"]);
        for c in script {
            cmd.arg("-c").arg(c);
        }
        let out = cmd.arg(img).output().expect("run the tool");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .to_lowercase();
        // qemu-io reports a bad command and goes on with exit status 0.
        if !out.status.success() || said.contains("error") || said.contains("failed") {
            return Err(format!(
                "{context}: {name} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let (t, o) = (layout(&theirs), layout(&ours));
    if t != o {
        let i = (0..t.len().max(o.len()))
            .find(|&i| t.get(i) != o.get(i))
            .unwrap_or(0);
        return Err(format!(
            "{context}: qemu-img map differs from entry {i} on (start, length, depth, present, \
             zero, data, compressed):\n  qemu-io: {:?}\n  qimg io: {:?}\n  whole maps:\n  \
             qemu-io {t:?}\n  qimg io {o:?}",
            t.get(i),
            o.get(i)
        ));
    }
    let cmp = qemu_img_status(&["compare", path_str(&theirs), path_str(&ours)]);
    if !cmp.status.success() {
        return Err(format!(
            "{context}: qemu-img compare: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        ));
    }
    for (who, img) in [("qemu-io's", &theirs), ("qimg io's", &ours)] {
        let c = qemu_check(img);
        if !c.status.success() {
            return Err(format!(
                "{context}: qemu-img check of {who} copy: {}{}",
                String::from_utf8_lossy(&c.stdout),
                String::from_utf8_lossy(&c.stderr)
            ));
        }
    }
    Ok(())
}

/// Runs every case and fails at the end listing all that differ.
fn all_same_as_qemu(cases: &[(&str, &Path, &[&str])]) {
    let fails: Vec<String> = cases
        .iter()
        .filter_map(|(what, image, script)| same_as_qemu(what, image, script).err())
        .collect();
    assert!(
        fails.is_empty(),
        "{} case(s) differ from QEMU:\n\n{}",
        fails.len(),
        fails.join("\n\n")
    );
}

/// `qemu-img create -f FMT [-o OPTS] [-b BACKING -F BFMT] DIR/NAME SIZE`.
fn create(
    dir: &Path,
    name: &str,
    fmt: &str,
    opts: &str,
    backing: Option<(&str, &str)>,
    size: u64,
) -> PathBuf {
    let p = dir.join(name);
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((b, bfmt)) = backing {
        args.extend(["-b", b, "-F", bfmt]);
    }
    args.extend([path_str(&p), size.as_str()]);
    qemu_img(&args);
    p
}

/// QEMU's `qcow2_co_pwrite_zeroes`: a request that covers only part of a cluster (subcluster)
/// becomes a zero cluster when the rest of it already reads as zeros (here: past the end of a
/// 512-byte backing file, or unallocated without one). Where the rest holds data, or the
/// cluster is allocated, qemu-io writes zeros instead.
#[test]
fn write_zeroes_in_part_of_a_cluster_that_otherwise_reads_zeros_makes_a_zero_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Backing files of 512 bytes with data: a raw one and a qcow2 one (QEMU's iotest 154).
    let raw = create(d, "b.raw", "raw", "", None, 512);
    qemu_io("raw", &raw, &["write -P 7 0 512"]);
    let qb = create(d, "b.qcow2", "qcow2", "", None, 512);
    qemu_io("qcow2", &qb, &["write -P 7 0 512"]);
    let over_raw = create(
        d,
        "over-raw.qcow2",
        "qcow2",
        "cluster_size=4096",
        Some(("b.raw", "raw")),
        64 * KIB,
    );
    let over_qcow2 = create(
        d,
        "over-qcow2.qcow2",
        "qcow2",
        "cluster_size=4096",
        Some(("b.qcow2", "qcow2")),
        64 * KIB,
    );
    let v3 = create(d, "v3.qcow2", "qcow2", "cluster_size=4096", None, 64 * KIB);
    let v2 = create(
        d,
        "v2.qcow2",
        "qcow2",
        "cluster_size=4096,compat=0.10",
        None,
        64 * KIB,
    );
    let extl2 = create(
        d,
        "extl2.qcow2",
        "qcow2",
        "extended_l2=on",
        None,
        1024 * KIB,
    );
    for img in [&over_raw, &over_qcow2, &v3, &v2] {
        // Cluster 5 holds data of the image itself.
        qemu_io("qcow2", img, &["write -P 5 20480 512"]);
    }
    qemu_io("qcow2", &extl2, &["write -P 5 200000 512"]);
    // Clusters 1..4 and 5 of a 4 KiB-cluster image: inside the backing file's end or past
    // it, crossing a cluster boundary, over the image's own data.
    let common = [
        "write -z 4096 100",
        "write -z 10000 500",
        "write -z 16383 2",
        "write -z 21000 100",
        "write -z -u 12400 10",
    ];
    let with = |first: &'static str| -> Vec<&'static str> {
        std::iter::once(first).chain(common).collect()
    };
    all_same_as_qemu(&[
        // The rest of cluster 0 lies past the backing file's end: reads zeros.
        ("over-raw", &over_raw, &with("write -z 0 512")),
        // The head of cluster 0 is the backing file's data: qemu-io writes zeros.
        ("over-qcow2", &over_qcow2, &with("write -z 256 256")),
        ("over-qcow2-tail", &over_qcow2, &with("write -z 0 512")),
        ("v3", &v3, &with("write -z 0 512")),
        // v2 has no zero flag: zeroing an unallocated cluster without a backing file
        // leaves it unallocated.
        ("v2", &v2, &with("write -z 0 512")),
        // Extended L2: the same, one subcluster (2 KiB) at a time.
        (
            "extl2",
            &extl2,
            &[
                "write -z 300000 5000",
                "write -z 199680 512",
                "write -z 1000 10",
            ],
        ),
    ]);
}

/// QEMU's `zero_in_l2_slice`: write-zeroes on a v3 image without a backing file sets the zero
/// flag on every whole cluster, unallocated ones too (allocating their L2 table); with `-u`
/// an allocated cluster is freed as well, without it the cluster keeps its host space.
#[test]
fn write_zeroes_without_a_backing_file_sets_the_zero_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let std = create(d, "std.qcow2", "qcow2", "", None, 4096 * KIB);
    let extl2 = create(
        d,
        "extl2.qcow2",
        "qcow2",
        "extended_l2=on",
        None,
        4096 * KIB,
    );
    let setup = [
        "write -P 1 1M 64k",
        "write -P 2 2M 128k",
        "write -P 3 3M 4k",
    ];
    for img in [&std, &extl2] {
        qemu_io("qcow2", img, &setup);
    }
    let script = [
        // Unallocated, no L2 table yet.
        "write -z 0 64k",
        "write -z -u 128k 128k",
        // Allocated: kept without -u, freed with it.
        "write -z 1M 64k",
        "write -z -u 2M 128k",
        // Allocated in part (extended L2: one subcluster), whole cluster zeroed.
        "write -z 3M 64k",
        // Unallocated in a table that exists.
        "write -z 1088k 64k",
        // The partial cluster at the end of the disk counts as whole.
        "write -z 4032k 64k",
    ];
    // Fresh images: no L2 table anywhere (512-byte clusters: one table per 32 KiB).
    let fresh = create(d, "fresh.qcow2", "qcow2", "", None, 4096 * KIB);
    let fresh_extl2 = create(
        d,
        "fresh-extl2.qcow2",
        "qcow2",
        "extended_l2=on",
        None,
        4096 * KIB,
    );
    let tiny = create(
        d,
        "tiny.qcow2",
        "qcow2",
        "cluster_size=512",
        None,
        256 * KIB,
    );
    qemu_io("qcow2", &tiny, &["write -P 1 0 512"]);
    let fresh_script = [
        "write -z 0 64k",
        "write -z -u 128k 128k",
        "write -z 4032k 64k",
    ];
    all_same_as_qemu(&[
        ("std", &std, &script),
        ("extl2", &extl2, &script),
        ("fresh", &fresh, &fresh_script),
        ("fresh-extl2", &fresh_extl2, &fresh_script),
        (
            "tiny",
            &tiny,
            &["write -z 64k 64k", "write -z -u 1k 40k", "write -z 255k 1k"],
        ),
    ]);
}

/// QEMU's `zero_l2_subclusters`: with extended L2 entries, write-zeroes sets the zero bits of
/// the whole subclusters it covers in a partial cluster (keeping the cluster's host space),
/// and writes zeros only where a compressed cluster cannot take zero bits.
#[test]
fn extended_l2_write_zeroes_sets_subcluster_zero_bits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = create(
        d,
        "extl2.qcow2",
        "qcow2",
        "extended_l2=on",
        None,
        1024 * KIB,
    );
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 1 64k 64k",
            "write -P 2 130k 4k",
            "write -c -P 3 256k 64k",
        ],
    );
    let small = create(
        d,
        "extl2-16k.qcow2",
        "qcow2",
        "extended_l2=on,cluster_size=16k",
        None,
        256 * KIB,
    );
    all_same_as_qemu(&[
        (
            "extl2",
            &img,
            &[
                // Unallocated cluster, whole subclusters.
                "write -z 2048 4096",
                // Allocated cluster: zero bits, the host cluster stays.
                "write -z 68k 8k",
                "write -z -u 96k 2k",
                // Partly allocated cluster, covering its data.
                "write -z 128k 8k",
                // Tail of cluster 2, all of 3, head of 4, which is compressed: QEMU zeroes 2 and
                // 3, stops at 4 and writes zeros over the whole request.
                "write -z 188k 72k",
                // A compressed cluster cannot hold zero bits.
                "write -z 258k 2k",
            ],
        ),
        (
            "extl2-16k",
            &small,
            &["write -z 1k 14k", "write -z 16k 1k", "write -z 33280 16k"],
        ),
    ]);
}

/// QEMU's `calculate_l2_meta` and `qcow2_alloc_cluster_link_l2`: writing to a cluster shared
/// with an internal snapshot copies it to a new cluster, but the new entry marks allocated only
/// the range written and copied, which runs from the first to the last allocated subcluster of
/// the old cluster (or the written ones, if wider): subclusters outside it keep their state
/// (unallocated stays unallocated, zero stays zero).
#[test]
fn copy_on_write_after_a_snapshot_keeps_the_state_of_unwritten_subclusters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = create(d, "base.qcow2", "qcow2", "", None, 1024 * KIB);
    qemu_io("qcow2", &base, &["write -P 0xbb 0 1M"]);
    let top = create(
        d,
        "top.qcow2",
        "qcow2",
        "extended_l2=on",
        Some(("base.qcow2", "qcow2")),
        1024 * KIB,
    );
    let alone = create(
        d,
        "alone.qcow2",
        "qcow2",
        "extended_l2=on",
        None,
        1024 * KIB,
    );
    const SC: u64 = 2048;
    let c = |n: u64, sc: u64| 64 * KIB * n + SC * sc;
    let setup = [
        // Cluster 0: data in subclusters 4 and 10..11, zeros in 7 and 20.
        format!("write -P 1 {} 2048", c(0, 4)),
        format!("write -P 2 {} 4096", c(0, 10)),
        format!("write -z {} 2048", c(0, 7)),
        format!("write -z {} 2048", c(0, 20)),
        // Cluster 1: all data.
        format!("write -P 3 {} 64k", c(1, 0)),
        // Cluster 2: data in 30..31 only.
        format!("write -P 4 {} 4096", c(2, 30)),
        // Cluster 3: data in 10, zeros in 20 and 28.
        format!("write -P 5 {} 2048", c(3, 10)),
        format!("write -z {} 2048", c(3, 20)),
        format!("write -z {} 2048", c(3, 28)),
    ];
    let script = [
        // Between allocated subclusters: 4..12 become allocated, 20 stays zero.
        format!("write -P 9 {} 100", c(0, 6)),
        format!("write -P 8 {} 512", c(1, 2)),
        // Before the only allocated ones: 0..32.
        format!("write -P 7 {} 512", c(2, 0)),
        // After the allocated one: 10..26, 28 stays zero.
        format!("write -P 6 {} 100", c(3, 25)),
    ];
    let script: Vec<&str> = script.iter().map(String::as_str).collect();
    for img in [&top, &alone] {
        qemu_io("qcow2", img, &setup);
        qemu_img(&["snapshot", "-c", "s1", path_str(img)]);
    }
    all_same_as_qemu(&[("over-backing", &top, &script), ("alone", &alone, &script)]);
}
