//! Compressed writes against QEMU: the same `write -c` sequences through `qemu-io` and
//! `qimg io` on two copies of an image (the same output, `qemu-img compare` identical,
//! `qemu-img check` clean, the same `qemu-img map`, and where QEMU is deterministic the same
//! file), for zlib and zstd, 4 KiB and 64 KiB clusters, a partial last cluster; overwrites
//! and discards of compressed clusters sharing a host cluster; and `qimg convert -c` against
//! `qemu-img convert -c` (incompressible data falls back to ordinary clusters).

use qcow2_tests::{path_str, qemu_check, qemu_img, qemu_img_status, qemu_map_json, tool};
use std::path::Path;
use std::process::{Command, Output};

fn qimg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qimg"))
        .args(args)
        .output()
        .expect("run qimg")
}

/// Runs the commands through `program` (qemu-io or qimg io) and returns stdout and stderr
/// without the timing lines and program names.
fn run_io(qemu: bool, image: &Path, cmds: &[String]) -> String {
    let mut cmd = if qemu {
        Command::new(tool("qemu-io"))
    } else {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qimg"));
        c.arg("io");
        c
    };
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.arg(image).output().expect("run io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| {
            l.trim_start_matches("qemu-io: ")
                .trim_start_matches("qimg: ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn create(path: &Path, cluster: u64, ct: &str, size: u64) {
    let o = format!("cluster_size={cluster},compression_type={ct}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &o,
        path_str(path),
        &size.to_string(),
    ]);
}

fn assert_clean(what: &str, image: &Path) {
    let out = qemu_check(image);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "{what}: qemu-img check\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_identical(what: &str, a: &Path, b: &Path) {
    let out = qemu_img_status(&["compare", path_str(a), path_str(b)]);
    assert!(
        out.status.success(),
        "{what}: qemu-img compare\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The same commands through qemu-io and qimg io on two copies of a new image: the same
/// output, identical guest data, a clean check, the same map (compressed flags, offsets).
fn differential(dir: &Path, what: &str, cluster: u64, ct: &str, size: u64, cmds: &[String]) {
    let theirs = dir.join(format!("{what}-qemu.qcow2"));
    let ours = dir.join(format!("{what}-qimg.qcow2"));
    create(&theirs, cluster, ct, size);
    std::fs::copy(&theirs, &ours).unwrap();
    let t = run_io(true, &theirs, cmds);
    let o = run_io(false, &ours, cmds);
    assert_eq!(o, t, "{what}: output");
    assert_identical(what, &theirs, &ours);
    assert_clean(what, &ours);
    assert_eq!(qemu_map_json(&ours), qemu_map_json(&theirs), "{what}: map");
}

fn w(args: &str) -> String {
    format!("write {args}")
}

#[test]
fn write_c_sequences_match_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    for ct in ["zlib", "zstd"] {
        for cs in [4096u64, 65536] {
            // 16 clusters and a partial last one of three sectors.
            let size = 16 * cs + 1536;
            let last = 16 * cs;
            let cmds = vec![
                w(&format!("-c -P 0x11 0 {cs}")),
                w(&format!("-c -P 0x22 {} {}", 2 * cs, 3 * cs)),
                // Compressed over an allocated cluster: EIO; misaligned: EINVAL.
                w(&format!("-c -P 0x33 0 {cs}")),
                w(&format!("-c -P 0x33 512 {cs}")),
                w(&format!("-c -P 0x33 {} 1024", 6 * cs)),
                // The last, partial cluster of the disk.
                w(&format!("-c -P 0x44 {last} 1536")),
                // A normal cluster, then compressed over it (refused).
                w(&format!("-P 0x55 {} 512", 8 * cs)),
                w(&format!("-c -P 0x55 {} {cs}", 8 * cs)),
                w(&format!("-c -P 0x66 {} {}", 9 * cs, 2 * cs)),
                "read -P 0x22 ".to_string() + &format!("{} {}", 2 * cs, 3 * cs),
                format!("read -P 0x44 {last} 1536"),
                format!("read -P 0 {} 512", 8 * cs + 512),
            ];
            differential(dir.path(), &format!("{ct}-{cs}"), cs, ct, size, &cmds);
        }
    }
}

/// QEMU compresses the clusters of one request in parallel and packs them in the order
/// they finish; one cluster at a time its layout is deterministic, and with zstd (the same
/// library) the files come out byte for byte the same.
#[test]
fn single_cluster_writes_lay_out_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    for cs in [4096u64, 65536] {
        let mut cmds: Vec<String> = (0..6)
            .map(|i| w(&format!("-c -P {} {} {cs}", 0x21 + i, (i * 3 % 7) * cs)))
            .collect();
        cmds.push(w(&format!("-P 0x55 {} 512", 9 * cs)));
        cmds.push(format!("discard {} {cs}", 3 * cs));
        cmds.push(w(&format!("-c -P 0x31 {} {cs}", 10 * cs)));
        let what = format!("single-{cs}");
        differential(dir.path(), &what, cs, "zstd", 16 * cs, &cmds);
        let a = std::fs::read(dir.path().join(format!("{what}-qemu.qcow2"))).unwrap();
        let b = std::fs::read(dir.path().join(format!("{what}-qimg.qcow2"))).unwrap();
        assert!(a == b, "{what}: the files differ");
    }
}

#[test]
fn overwriting_and_discarding_shared_compressed_clusters_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for ct in ["zlib", "zstd"] {
        let cs = 4096u64;
        // Four compressed clusters packed into one host cluster; one overwritten (it moves to
        // a cluster of its own), the rest discarded; then compressed writes again (the freed
        // host cluster must not be packed into while referenced elsewhere).
        let mut cmds: Vec<String> = (0..4)
            .map(|i| w(&format!("-c -P {} {} {cs}", 0x10 + i, i * cs)))
            .collect();
        cmds.push(w(&format!("-P 0x77 {} 512", cs)));
        cmds.push(format!("discard 0 {cs}"));
        cmds.push(format!("discard {} {}", 2 * cs, 2 * cs));
        cmds.push(w(&format!("-c -P 0x88 {} {cs}", 5 * cs)));
        cmds.push(w(&format!("-c -P 0x99 0 {}", 2 * cs)));
        cmds.push(format!("read -P 0x77 {cs} 512"));
        cmds.push(format!("read -P 0x11 {} {}", cs + 512, cs - 512));
        differential(dir.path(), &format!("shared-{ct}"), cs, ct, 1 << 20, &cmds);
        // Everything gone: no leak either.
        let cmds = vec![
            w(&format!("-c -P 0x10 0 {}", 3 * cs)),
            format!("discard 0 {}", 3 * cs),
        ];
        differential(dir.path(), &format!("all-{ct}"), cs, ct, 1 << 20, &cmds);
    }
}

/// A raw source: text (compresses), random bytes (does not: the fallback), zeros.
fn source(path: &Path) {
    let mut data = vec![0u8; 3 << 20];
    let text: Vec<u8> = (0..4000)
        .flat_map(|i| format!("line {i} of a text that compresses well\n").into_bytes())
        .collect();
    data[100_000..100_000 + text.len().min(200_000)]
        .copy_from_slice(&text[..text.len().min(200_000)]);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut data[1_000_000..1_300_000] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn convert_c_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    source(&src);
    for ct in ["zlib", "zstd"] {
        for cs in ["4096", "65536"] {
            let o = format!("compression_type={ct},cluster_size={cs}");
            let theirs = dir.path().join(format!("{ct}-{cs}-qemu.qcow2"));
            let ours = dir.path().join(format!("{ct}-{cs}-qimg.qcow2"));
            let args = |dest: &Path| {
                vec![
                    "convert".to_string(),
                    "-c".into(),
                    "-O".into(),
                    "qcow2".into(),
                    "-o".into(),
                    o.clone(),
                    path_str(&src).into(),
                    path_str(dest).into(),
                ]
            };
            qemu_img(&args(&theirs));
            let a: Vec<String> = args(&ours);
            let out = qimg(&a.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(out.status.success(), "{:?}", out);
            let what = format!("convert -c {ct} {cs}");
            // QEMU reads ours as the source, and as its own.
            assert_identical(&what, &src, &ours);
            assert_identical(&what, &theirs, &ours);
            assert_clean(&what, &ours);
            assert_eq!(qemu_map_json(&ours), qemu_map_json(&theirs), "{what}: map");
            let (lo, lt) = (
                std::fs::metadata(&ours).unwrap().len(),
                std::fs::metadata(&theirs).unwrap().len(),
            );
            let cs: u64 = cs.parse().unwrap();
            assert!(
                lo <= lt + lt / 10 + cs && lo + lt / 10 + cs >= lt,
                "{what}: {lo} bytes against qemu-img's {lt}"
            );
        }
    }
}

#[test]
fn convert_c_is_for_qcow2_only() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![1u8; 65536]).unwrap();
    let dest = dir.path().join("out.raw");
    let theirs = qemu_img_status(&[
        "convert",
        "-c",
        "-O",
        "raw",
        path_str(&src),
        path_str(&dest),
    ]);
    let ours = qimg(&[
        "convert",
        "-c",
        "-O",
        "raw",
        path_str(&src),
        path_str(&dest),
    ]);
    assert_eq!(ours.status.code(), theirs.status.code());
    let strip = |o: &Output, p: &str| {
        String::from_utf8_lossy(&o.stderr)
            .trim()
            .trim_start_matches(p)
            .to_string()
    };
    assert_eq!(strip(&ours, "qimg: "), strip(&theirs, "qemu-img: "));
}
