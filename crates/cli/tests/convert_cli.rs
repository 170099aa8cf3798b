//! `qimg convert -O qcow2 -o backing_file=B` against `qemu-img convert`: the new image holds
//! what the source's top layer says (data, and zeros written as zeros so that the backing
//! file does not show through, except past B's end) and leaves the rest to B. The same conversion by both
//! tools must read the same (`qemu-img compare`), check clean, and map the same: which guest
//! ranges the new image allocates, as data or as zeros, and which come from B.

use qcow2_tests::{path_str, qemu_img, qemu_img_json, qemu_io};
use std::path::Path;
use std::process::Command;

/// `qemu-img map --output=json` without host offsets (where each tool put a cluster is its
/// own business): (start, length, depth, present, zero, data) per run.
fn layout(image: &Path) -> Vec<(u64, u64, u64, bool, bool, bool)> {
    let map = qemu_img_json(&["map", "--output=json", path_str(image)]);
    map.as_array()
        .expect("a JSON array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["depth"].as_u64().unwrap(),
                e["present"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Converts `source` with both tools (`-O qcow2 -o OPTIONS`) in `dir` and compares the results.
fn same_as_qemu_img(dir: &Path, source: &str, options: &str, what: &str) {
    let theirs = dir.join(format!("{what}.qemu.qcow2"));
    let ours = dir.join(format!("{what}.qimg.qcow2"));
    let args = |out: &Path| {
        vec![
            "convert".to_owned(),
            "-O".into(),
            "qcow2".into(),
            "-o".into(),
            options.into(),
            source.into(),
            path_str(out).into(),
        ]
    };
    let q = Command::new("qemu-img")
        .args(args(&theirs))
        .current_dir(dir)
        .status()
        .expect("run qemu-img (package qemu-utils)");
    assert!(q.success(), "{what}: qemu-img convert failed");
    let o = Command::new(env!("CARGO_BIN_EXE_qimg"))
        .args(args(&ours))
        .current_dir(dir)
        .output()
        .expect("run qimg");
    assert!(
        o.status.success(),
        "{what}: qimg convert failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    qemu_img(&["compare", path_str(&theirs), path_str(&ours)]);
    qemu_img(&["check", path_str(&ours)]);
    assert_eq!(
        layout(&ours),
        layout(&theirs),
        "{what}: qimg's image maps differently from qemu-img's (left: qimg)"
    );
}

#[test]
fn a_backing_file_receives_what_the_top_layer_does_not_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    let alone = d.join("alone.qcow2");
    let raw = d.join("source.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "8M"]);
    qemu_io("qcow2", &base, &["write -P 1 0 4M", "write -P 7 7M 4k"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 2 1M 64k",
            "write -z 2M 128k",
            "write -P 0 3M 64k",
            "write -P 3 6M 4k",
            "discard 3584k 64k",
            "write -P 4 7M 512",
        ],
    );
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&alone), "8M"]);
    qemu_io("qcow2", &alone, &["write -P 5 512k 96k", "write -z 5M 64k"]);
    qemu_img(&["create", "-q", "-f", "raw", path_str(&raw), "8M"]);
    qemu_io("raw", &raw, &["write -P 6 64k 4k", "write -P 0 1M 64k"]);

    let short = d.join("short.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&short), "3M"]);
    qemu_io("qcow2", &short, &["write -P 8 0 3M"]);

    let backing = "backing_file=base.qcow2,backing_fmt=qcow2";
    same_as_qemu_img(d, "top.qcow2", backing, "chain");
    same_as_qemu_img(d, "alone.qcow2", backing, "standalone");
    same_as_qemu_img(d, "source.raw", backing, "raw");
    same_as_qemu_img(
        d,
        "top.qcow2",
        &format!("{backing},cluster_size=4k"),
        "small",
    );
}
