//! The argument lists `qimg create` and `qemu-img create` are compared on, by group.

use super::{strings, IMG};

/// `-f qcow2 -o OPTS img.qcow2 SIZE` (no `-o` when OPTS is empty).
fn qcow2_case(opts: &str, size: &str) -> Vec<String> {
    let mut v = strings(&["-f", "qcow2"]);
    if !opts.is_empty() {
        v.push("-o".into());
        v.push(opts.into());
    }
    if size.starts_with('-') {
        v.push("--".into());
    }
    v.push(IMG.into());
    if !size.is_empty() {
        v.push(size.into());
    }
    v
}

/// `qcow2_case` of each `(OPTS, SIZE)`.
fn qcow2_cases(list: &[(&str, &str)]) -> Vec<Vec<String>> {
    list.iter()
        .map(|(opts, size)| qcow2_case(opts, size))
        .collect()
}

/// Every case, in order: qcow2 options, sizes and data files (good and bad), then backing
/// files, then raw images.
pub fn matrix() -> Vec<Vec<String>> {
    let groups = [
        refcount_cases(),
        preallocation_cases(),
        option_cases(),
        size_cases(),
        data_file_cases(),
        option_error_cases(),
        backing_cases(),
        backing_option_cases(),
        backing_name_cases(),
        raw_cases(),
    ];
    groups.into_iter().flatten().collect()
}

/// Every cluster size with every refcount width, small to huge (sparse).
fn refcount_cases() -> Vec<Vec<String>> {
    let mut cases = Vec::new();
    for cs in ["512", "4k", "64k", "2M"] {
        for bits in [1, 2, 4, 8, 16, 32, 64] {
            for size in ["1M", "1G", "4T"] {
                cases.push(qcow2_case(
                    &format!("cluster_size={cs},refcount_bits={bits}"),
                    size,
                ));
            }
        }
    }
    cases
}

/// Preallocation, with an unaligned size (a partial last cluster) and a larger one.
fn preallocation_cases() -> Vec<Vec<String>> {
    let mut cases = Vec::new();
    for cs in ["512", "4k", "64k", "2M"] {
        for mode in ["metadata", "falloc", "full"] {
            for size in ["1049088", "24M"] {
                cases.push(qcow2_case(
                    &format!("cluster_size={cs},preallocation={mode}"),
                    size,
                ));
            }
        }
    }
    cases
}

/// Preallocation with other options, compat 0.10 and 1.1, extended L2, zstd, lazy refcounts.
fn option_cases() -> Vec<Vec<String>> {
    qcow2_cases(&[
        (
            "cluster_size=512,refcount_bits=1,preallocation=metadata",
            "8M",
        ),
        (
            "cluster_size=512,refcount_bits=64,preallocation=metadata",
            "8M",
        ),
        (
            "cluster_size=512,refcount_bits=64,preallocation=falloc",
            "8M",
        ),
        ("cluster_size=4k,refcount_bits=2,preallocation=full", "16M"),
        (
            "cluster_size=2M,refcount_bits=1,preallocation=metadata",
            "1M",
        ),
        ("preallocation=metadata", "1G"),
        ("preallocation=off", "1M"),
        // compat 0.10
        ("compat=0.10", "1M"),
        ("compat=0.10", "4T"),
        ("compat=0.10,cluster_size=512", "1G"),
        ("compat=0.10,cluster_size=4k", "4T"),
        ("compat=0.10,cluster_size=2M", "4T"),
        ("compat=0.10,preallocation=metadata", "16M"),
        (
            "compat=0.10,cluster_size=512,preallocation=falloc",
            "1049088",
        ),
        ("compat=v2", "1M"),
        ("compat=1.1", "1M"),
        ("compat=v3", "1M"),
        // extended L2
        ("extended_l2=on", "1M"),
        ("extended_l2=on", "4T"),
        ("extended_l2=on,cluster_size=16k", "1G"),
        ("extended_l2=on,cluster_size=2M", "4T"),
        ("extended_l2=on,preallocation=metadata", "1049088"),
        (
            "extended_l2=on,cluster_size=16k,preallocation=metadata",
            "16M",
        ),
        (
            "extended_l2=on,cluster_size=16k,preallocation=falloc",
            "1049088",
        ),
        ("extended_l2=on,cluster_size=2M,preallocation=full", "3M"),
        (
            "extended_l2=on,refcount_bits=1,preallocation=metadata",
            "16M",
        ),
        // zstd, lazy refcounts
        ("compression_type=zstd", "1M"),
        ("compression_type=zlib", "1M"),
        ("compression_type=zstd,cluster_size=4k", "1G"),
        ("lazy_refcounts=on", "1M"),
        ("lazy_refcounts=on,preallocation=metadata", "16M"),
        (
            "lazy_refcounts=on,compression_type=zstd,extended_l2=on",
            "1G",
        ),
    ])
}

/// Sizes, those QEMU cannot create included.
fn size_cases() -> Vec<Vec<String>> {
    qcow2_cases(&[
        // sizes
        ("", "0"),
        ("", "512"),
        ("", "1000"),
        ("", "1.5M"),
        ("", "0x100000"),
        ("", "4T"),
        ("cluster_size=512", "128G"),
        ("preallocation=metadata", "0"),
        ("preallocation=falloc", "0"),
        ("cluster_size=512,preallocation=full", "1000"),
        // sizes QEMU cannot create
        ("", "1E"),
        ("cluster_size=512", "4T"),
        ("cluster_size=512", "137438953984"),
        ("", "9223372036854775807"),
        ("", "-1"),
        ("", "1X"),
        ("", "512.5"),
        ("", ""),
    ])
}

/// External data files.
fn data_file_cases() -> Vec<Vec<String>> {
    qcow2_cases(&[
        // external data files
        ("data_file=img.data", "1M"),
        ("data_file=img.data", "0"),
        ("data_file=img.data", "4T"),
        ("data_file=img.data,preallocation=metadata", "1049088"),
        ("data_file=img.data,preallocation=falloc", "16M"),
        ("data_file=img.data,preallocation=full", "1049088"),
        ("data_file=img.data,data_file_raw=on", "16M"),
        (
            "data_file=img.data,data_file_raw=on,preallocation=falloc",
            "1049088",
        ),
        ("data_file=img.data,data_file_raw=on,cluster_size=512", "1M"),
        (
            "data_file=img.data,extended_l2=on,preallocation=metadata",
            "1049088",
        ),
        (
            "data_file=img.data,cluster_size=2M,preallocation=metadata",
            "3M",
        ),
    ])
}

/// Options qemu-img refuses.
fn option_error_cases() -> Vec<Vec<String>> {
    qcow2_cases(&[
        // option errors
        ("cluster_size=1000", "1M"),
        ("cluster_size=256", "1M"),
        ("cluster_size=4M", "1M"),
        ("cluster_size=abc", "1M"),
        ("cluster_size=1.5k", "1M"),
        ("cluster_size=-1", "1M"),
        ("refcount_bits=3", "1M"),
        ("refcount_bits=0", "1M"),
        ("refcount_bits=128", "1M"),
        ("refcount_bits=-1", "1M"),
        ("refcount_bits=abc", "1M"),
        ("refcount_bits=0x10", "1M"),
        ("compat=0.10,refcount_bits=8", "1M"),
        ("compat=0.10,lazy_refcounts=on", "1M"),
        ("compat=0.10,extended_l2=on", "1M"),
        ("compat=0.10,compression_type=zstd", "1M"),
        ("compat=0.10,data_file=img.data", "1M"),
        ("compat=0.9", "1M"),
        ("compat=", "1M"),
        ("extended_l2=on,cluster_size=4k", "1M"),
        ("compression_type=lz4", "1M"),
        ("data_file_raw=on", "1M"),
        ("preallocation=bogus", "1M"),
        ("lazy_refcounts=maybe", "1M"),
        ("lazy_refcounts", "1M"),
        ("extended_l2=yes,lazy_refcounts=true", "1M"),
        ("foo=bar", "1M"),
        ("size=2M", "1M"),
        ("size=2M", ""),
        ("size=abc", ""),
        ("cluster_size=65536,cluster_size=4096", "1M"),
        ("backing_fmt=qcow2", "1M"),
        ("cluster_size=4k,", "1M"),
        ("nocow=on,extent_size_hint=1M", "1M"),
    ])
}

/// Backing files: qcow2 and raw, with and without -F or -u, the size taken from the backing
/// file or given, missing or bogus backing files and formats.
fn backing_cases() -> Vec<Vec<String>> {
    [
        vec!["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", IMG],
        vec!["-f", "qcow2", "-b", "base3m.qcow2", "-F", "qcow2", IMG],
        vec!["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", IMG, "5M"],
        vec!["-f", "qcow2", "-b", "base.raw", "-F", "raw", IMG],
        vec!["-f", "qcow2", "-b", "base.qcow2", "-F", "raw", IMG],
        vec!["-f", "qcow2", "-b", "base.raw", IMG],
        vec!["-f", "qcow2", "-b", "base.qcow2", IMG, "1M"],
        vec!["-f", "qcow2", "-b", "base.raw", "-F", "qcow2", IMG],
        vec![
            "-f",
            "qcow2",
            "-b",
            "nonexistent.qcow2",
            "-F",
            "qcow2",
            IMG,
            "1M",
        ],
        vec![
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nonexistent.qcow2",
            "-F",
            "qcow2",
            IMG,
            "1M",
        ],
        vec![
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nonexistent.qcow2",
            "-F",
            "qcow2",
            IMG,
        ],
        vec!["-f", "qcow2", "-b", "base.qcow2", "-F", "bogus", IMG],
        vec!["-f", "qcow2", "-b", "", "-F", "qcow2", IMG, "1M"],
        vec!["-f", "qcow2", "-b", IMG, "-F", "qcow2", "-u", IMG, "1M"],
    ]
    .iter()
    .map(|args| strings(args))
    .collect()
}

/// Backing files with other options.
fn backing_option_cases() -> Vec<Vec<String>> {
    [
        vec![
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "compat=0.10",
            IMG,
        ],
        vec![
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=512",
            IMG,
        ],
        vec![
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=2M",
            IMG,
        ],
        vec![
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "preallocation=metadata",
            IMG,
        ],
        vec![
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "extended_l2=on,preallocation=metadata",
            IMG,
        ],
        vec![
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "extended_l2=on,preallocation=falloc",
            IMG,
            "1049088",
        ],
        vec![
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "data_file=img.data,data_file_raw=on",
            IMG,
        ],
        vec![
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "data_file=img.data",
            IMG,
        ],
    ]
    .iter()
    .map(|args| strings(args))
    .collect()
}

/// Backing files named in -o, and long backing file names.
fn backing_name_cases() -> Vec<Vec<String>> {
    let long400 = "x".repeat(400);
    let long1100 = "y".repeat(1100);
    [
        vec![
            "-f",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            IMG,
        ],
        vec![
            "-f",
            "qcow2",
            "-o",
            "backing_file=base.qcow2",
            "-F",
            "qcow2",
            IMG,
        ],
        vec![
            "-f",
            "qcow2",
            "-o",
            "backing_fmt=raw",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            IMG,
        ],
        vec![
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-u",
            "-b",
            &long400,
            "-F",
            "raw",
            IMG,
            "1M",
        ],
        vec!["-f", "qcow2", "-u", "-b", &long1100, "-F", "raw", IMG, "1M"],
    ]
    .iter()
    .map(|args| strings(args))
    .collect()
}

/// Raw images, an unknown format, -q and an empty -o.
fn raw_cases() -> Vec<Vec<String>> {
    [
        vec!["-f", "raw", IMG, "1M"],
        vec![IMG, "1M"],
        vec!["-f", "raw", IMG, "1000"],
        vec!["-f", "raw", "-o", "preallocation=falloc", IMG, "1M"],
        vec!["-f", "raw", "-o", "preallocation=full", IMG, "1M"],
        vec!["-f", "raw", "-o", "preallocation=metadata", IMG, "1M"],
        vec!["-f", "raw", "-o", "cluster_size=4k", IMG, "1M"],
        vec!["-f", "raw", "-b", "base.raw", IMG, "1M"],
        vec!["-f", "raw", IMG, "4T"],
        vec!["-f", "raw", IMG],
        vec!["-f", "bogus", IMG, "1M"],
        vec!["-q", "-f", "qcow2", IMG, "1M"],
        vec!["-f", "qcow2", "-o", "", IMG, "1M"],
    ]
    .iter()
    .map(|args| strings(args))
    .collect()
}
