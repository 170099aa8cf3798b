//! `qimg check` against `qemu-img check`: on every fixture of the interop matrix the same JSON
//! (`--output=json`), the same text (human output, byte for byte), the same diagnostic lines
//! on stderr and the same exit status; on damaged images the same verdicts, and `-r leaks` /
//! `-r all` repairs that print what qemu-img prints and leave images QEMU finds as clean as its
//! own repairs, with the guest content unchanged.

use qcow2_format::{Header, L1Entry, L2ClusterType, L2Entry, ReftableEntry, L2_COPIED};
use qcow2_tests::{fixture, matrix, path_str, qemu_img, qemu_img_status, qemu_io};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn qimg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qimg"))
        .args(args)
        .output()
        .expect("run qimg")
}

/// One run of a check command: exit status, stdout, and stderr with the program's own name
/// taken out of its error lines (`qemu-img: ` / `qimg: `).
#[derive(Debug, PartialEq, Eq)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(out: Output, program: &str) -> Run {
    let prefix = format!("{program}: ");
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| l.strip_prefix(&prefix).unwrap_or(l).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    Run {
        code: out.status.code().expect("exit status"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    }
}

fn both(args: &[&str]) -> (Run, Run) {
    (
        run(qimg(args), "qimg"),
        run(qemu_img_status(args), "qemu-img"),
    )
}

fn json(r: &Run, what: &str) -> Value {
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", r.stdout))
}

/// `qimg check` and `qemu-img check` agree on `image`, in both output formats.
fn assert_check_agrees(what: &str, image: &Path) -> i32 {
    let img = path_str(image);
    let (ours, theirs) = both(&["check", "--output=json", img]);
    assert_eq!(ours.code, theirs.code, "{what}: exit status\n{ours:#?}");
    assert_eq!(ours.stderr, theirs.stderr, "{what}: stderr");
    if theirs.stdout.is_empty() {
        assert!(ours.stdout.is_empty(), "{what}: qemu-img printed no result");
    } else {
        assert_eq!(
            json(&ours, what),
            json(&theirs, what),
            "{what}: check --output=json"
        );
        // Same key order and layout, too.
        assert_eq!(ours.stdout, theirs.stdout, "{what}: JSON text");
    }
    let (ours, theirs) = both(&["check", img]);
    assert_eq!(ours, theirs, "{what}: human output");
    theirs.code
}

#[test]
fn every_fixture_checks_as_qemu_img_says() {
    for spec in matrix() {
        let f = spec.build();
        let code = assert_check_agrees(&f.name, &f.image);
        let expected = if f.expect.dirty { 2 } else { 0 };
        assert_eq!(code, expected, "{}: qemu-img check's verdict", f.name);
    }
}

#[test]
fn format_option_and_raw_images() {
    let dir = tempfile::tempdir().unwrap();
    let image = base_image(dir.path());
    let img = path_str(&image);
    let (ours, theirs) = both(&["check", "-f", "qcow2", "--output=json", img]);
    assert_eq!(ours, theirs);
    // -q prints nothing on stdout and keeps the exit status.
    let quiet = run(qimg(&["check", "-q", img]), "qimg");
    assert_eq!((quiet.code, quiet.stdout.as_str()), (0, ""));

    // A raw image has no check: exit status 63, as qemu-img.
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    for args in [
        &["check", path_str(&raw)][..],
        &["check", "-f", "raw", path_str(&raw)][..],
    ] {
        let (ours, theirs) = both(args);
        assert_eq!((ours.code, theirs.code), (63, 63), "{args:?}");
        assert_eq!(ours.stderr, theirs.stderr, "{args:?}");
    }

    // An image that cannot be opened: exit status 1.
    let missing = dir.path().join("missing.qcow2");
    let ours = run(qimg(&["check", path_str(&missing)]), "qimg");
    assert_eq!(ours.code, 1);
    assert!(ours.stderr.contains("Could not open"), "{}", ours.stderr);
}

// ------------------------------------------------------------------------------------------
// Damaged images

/// A qemu-made image with data, a compressed cluster and zero clusters.
fn base_image(dir: &Path) -> PathBuf {
    let image = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&image), "16M"]);
    qemu_io(
        "qcow2",
        &image,
        &[
            "write -P 0x11 0 192k",
            "write -c -P 0x22 1M 64k",
            "write -P 0x33 4M 128k",
            "write -z 4M 64k",
            "write -P 0x55 12M 64k",
        ],
    );
    image
}

fn read_at(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn write_at(image: &Path, offset: u64, data: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
}

fn header(image: &Path) -> Header {
    let head = read_at(image, 0, 512);
    let cs = 1usize << Header::peek_cluster_bits(&head).unwrap();
    Header::parse(&read_at(image, 0, cs)).unwrap()
}

/// Sets the stored refcount of host cluster `cluster` (its refcount block must exist).
fn set_refcount(image: &Path, cluster: u64, value: u64) {
    let h = header(image);
    let cs = h.geometry().cluster_size();
    let width = h.refcount_width();
    let per_block = width.entries_per_block(cs);
    let entry = read_at(image, h.refcount_table_offset + cluster / per_block * 8, 8);
    let block = ReftableEntry::read(&entry, 0).raw_offset();
    let mut b = read_at(image, block, cs as usize);
    width.set(&mut b, cluster % per_block, value).unwrap();
    write_at(image, block, &b);
}

/// The first entry of the first active L2 table with a data cluster: (L2 offset, index, entry).
fn first_data_entry(image: &Path) -> (u64, usize, L2Entry) {
    let h = header(image);
    let geo = h.geometry();
    let l1 = read_at(image, h.l1_table_offset, h.l1_size as usize * 8);
    let l2 = L1Entry::read(&l1, 0).raw_offset();
    let table = read_at(image, l2, geo.cluster_size() as usize);
    (0..geo.l2_entries() as usize)
        .map(|i| (l2, i, L2Entry::read(&table, &geo, i)))
        .find(|(_, _, e)| e.cluster_type(&geo, false) == L2ClusterType::Normal)
        .expect("a data cluster")
}

fn write_l2_entry(image: &Path, l2: u64, index: usize, entry: L2Entry) {
    let geo = header(image).geometry();
    let size = geo.l2_entry_size() as usize;
    let mut bytes = vec![0; size];
    entry.write(&mut bytes, &geo, 0);
    write_at(image, l2 + (index * size) as u64, &bytes);
}

type Damage = (&'static str, fn(&Path));

fn damages() -> Vec<Damage> {
    vec![
        ("leaked cluster", |img| {
            let h = header(img);
            set_refcount(img, h.l1_table_offset >> h.cluster_bits, 2);
        }),
        ("data cluster with refcount 0", |img| {
            let (_, _, e) = first_data_entry(img);
            set_refcount(img, e.raw_offset() >> header(img).cluster_bits, 0);
        }),
        ("data cluster shared but COPIED", |img| {
            let (_, _, e) = first_data_entry(img);
            set_refcount(img, e.raw_offset() >> header(img).cluster_bits, 2);
        }),
        ("COPIED flag cleared", |img| {
            let (l2, i, e) = first_data_entry(img);
            let word = e.word & !L2_COPIED;
            write_l2_entry(img, l2, i, L2Entry { word, ..e });
        }),
        ("L2 entry with reserved bits", |img| {
            let (l2, i, e) = first_data_entry(img);
            let word = e.word | 0x2;
            write_l2_entry(img, l2, i, L2Entry { word, ..e });
        }),
        ("refcount block with refcount 2", |img| {
            let h = header(img);
            let rt = read_at(img, h.refcount_table_offset, 8);
            let block = ReftableEntry::read(&rt, 0).raw_offset();
            set_refcount(img, block >> h.cluster_bits, 2);
        }),
    ]
}

/// Checks a damaged image with both programs, then repairs a copy with each in both modes and
/// both output formats, comparing what they print and what they leave behind.
fn check_and_repair(what: &str, damaged: &Path, pristine: Option<&Path>) {
    let verdict = assert_check_agrees(what, damaged);
    assert_ne!(verdict, 0, "{what}: qemu-img did not notice the damage");
    let dir = damaged.parent().unwrap();
    for mode in ["leaks", "all"] {
        for output in ["human", "json"] {
            let what = format!("{what}: check -r {mode} --output={output}");
            let ours = dir.join("ours.qcow2");
            let theirs = dir.join("theirs.qcow2");
            std::fs::copy(damaged, &ours).unwrap();
            std::fs::copy(damaged, &theirs).unwrap();
            let out = format!("--output={output}");
            let a = run(qimg(&["check", "-r", mode, &out, path_str(&ours)]), "qimg");
            let b = run(
                qemu_img_status(&["check", "-r", mode, &out, path_str(&theirs)]),
                "qemu-img",
            );
            assert_eq!(a.code, b.code, "{what}: exit status\n{a:#?}\n{b:#?}");
            assert_eq!(a.stderr, b.stderr, "{what}: stderr");
            if output == "json" && !b.stdout.is_empty() {
                let mut ja = json(&a, &what);
                let mut jb = json(&b, &what);
                ja["filename"] = Value::Null;
                jb["filename"] = Value::Null;
                assert_eq!(ja, jb, "{what}: JSON");
            } else {
                assert_eq!(a.stdout, b.stdout, "{what}: stdout");
            }

            // Afterwards qemu-img finds both images in the same state.
            let after_a = run(qemu_img_status(&["check", path_str(&ours)]), "qemu-img");
            let after_b = run(qemu_img_status(&["check", path_str(&theirs)]), "qemu-img");
            assert_eq!(after_a, after_b, "{what}: qemu-img check after the repair");
            if after_b.code == 0 {
                let same = |x: &Path, y: &Path| {
                    qemu_img_status(&["compare", "-q", path_str(x), path_str(y)])
                        .status
                        .success()
                };
                assert!(same(&ours, &theirs), "{what}: content differs from QEMU's");
                if let Some(p) = pristine {
                    assert!(same(&ours, p), "{what}: content differs from the original");
                }
            }
        }
    }
}

#[test]
fn damaged_images_check_and_repair_as_qemu_img_does() {
    for (name, damage) in damages() {
        let dir = tempfile::tempdir().unwrap();
        let pristine = base_image(dir.path());
        let damaged = dir.path().join("damaged.qcow2");
        std::fs::copy(&pristine, &damaged).unwrap();
        damage(&damaged);
        check_and_repair(name, &damaged, Some(&pristine));
    }
}

#[test]
fn crashed_lazy_refcounts_image_repairs_as_qemu_img_does() {
    let f = fixture("lazy-refcounts-dirty").build();
    let reference = f.dir.path().join("reference.raw");
    qcow2_tests::raw_reference_file(&f.image, "qcow2", &reference);
    let damaged = f.dir.path().join("damaged.qcow2");
    std::fs::copy(&f.image, &damaged).unwrap();
    check_and_repair(&f.name, &damaged, None);
    // What the crashed image showed survives the repair.
    let ours = f.dir.path().join("ours.qcow2");
    let out = run(qimg(&["check", "-r", "all", path_str(&ours)]), "qimg");
    assert_eq!(out.code, 0);
    assert!(qemu_img_status(&[
        "compare",
        "-q",
        "-F",
        "raw",
        path_str(&ours),
        path_str(&reference)
    ])
    .status
    .success());
}
