//! `qimg check` against `qemu-img check` on broken snapshot tables (issue 13): the cases
//! QEMU's `qcow2_check_read_snapshot_table` and `qcow2_check_fix_snapshot_table` handle.
//! Each image is made by qemu-img and then edited byte by byte; both programs check and
//! repair copies of it, and must print the same lines, exit with the same status and leave
//! images that qemu-img sees alike: the same `check`, the same `snapshot -l`, the same active
//! layer and the same content of every snapshot kept. A read-write open of such an image
//! is refused (as QEMU refuses it) and writes nothing.

use qcow2_format::{Header, Snapshot};
use qcow2_tests::{path_str, qemu_img, qemu_img_json, qemu_img_status, qemu_io, said};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn qimg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qimg"))
        .args(args)
        .output()
        .expect("run qimg")
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
    Header::parse(&read_at(image, 0, 4096)).unwrap()
}

/// Sets the header's snapshot count and table offset (bytes 60..72).
fn set_table_pointer(image: &Path, count: u32, offset: u64) {
    let mut b = count.to_be_bytes().to_vec();
    b.extend_from_slice(&offset.to_be_bytes());
    write_at(image, 60, &b);
}

/// A 4 MiB image (64 KiB clusters) with data and two snapshots, `s1` and `s2`, that differ.
fn base_image(dir: &Path, compat: &str) -> PathBuf {
    let image = dir.join("base.qcow2");
    let o = format!("compat={compat}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &o,
        path_str(&image),
        "4M",
    ]);
    qemu_io("qcow2", &image, &["write -P 0x11 0 64k"]);
    qemu_img(&["snapshot", "-c", "s1", path_str(&image)]);
    qemu_io("qcow2", &image, &["write -P 0x22 64k 64k"]);
    qemu_img(&["snapshot", "-c", "s2", path_str(&image)]);
    qemu_io("qcow2", &image, &["write -P 0x33 128k 64k"]);
    image
}

/// The raw bytes of each entry of the image's snapshot table.
fn raw_entries(image: &Path) -> Vec<Vec<u8>> {
    let h = header(image);
    let mut pos = h.snapshots_offset;
    (0..h.nb_snapshots)
        .map(|_| {
            let fixed = read_at(image, pos, Snapshot::FIXED_LEN);
            let (id, name, extra) = Snapshot::declared_lengths(&fixed).unwrap();
            let len = Snapshot::FIXED_LEN + extra as usize + usize::from(id) + usize::from(name);
            let entry = read_at(image, pos, len);
            pos += len.div_ceil(8) as u64 * 8;
            entry
        })
        .collect()
}

/// Gives entry `index` (if there is one) `extra` bytes of extra data (the known fields first,
/// as they were, then `0xab`), and writes the table anew in the first cluster past the end
/// of the file, which nothing counts: the damage comes with a refcount error, as in QEMU's
/// iotest 261.
fn resize_extra_data(image: &Path, index: usize, extra: u32) {
    let mut table = Vec::new();
    for (i, e) in raw_entries(image).into_iter().enumerate() {
        let mut e = e;
        if i == index {
            let (id, name, old) = Snapshot::declared_lengths(&e).unwrap();
            let names = e[e.len() - usize::from(id) - usize::from(name)..].to_vec();
            let mut data = e[Snapshot::FIXED_LEN..Snapshot::FIXED_LEN + old as usize].to_vec();
            data.resize(extra as usize, 0xab);
            e.truncate(Snapshot::FIXED_LEN);
            e[36..40].copy_from_slice(&extra.to_be_bytes());
            e.extend_from_slice(&data);
            e.extend_from_slice(&names);
        }
        table.extend_from_slice(&e);
        table.resize(table.len().div_ceil(8) * 8, 0);
    }
    let cs = header(image).geometry().cluster_size();
    let end = std::fs::metadata(image).unwrap().len().div_ceil(cs) * cs;
    write_at(image, end, &table);
    let n = header(image).nb_snapshots;
    set_table_pointer(image, n, end);
}

/// Exit status, stdout (the JSON's file name left out) and stderr (the program's name taken
/// off) of a run.
fn outcome(o: &Output, program: &str) -> (String, String, Option<i32>) {
    let (mut out, err, code) = said(o, program);
    if let Ok(mut v) = serde_json::from_str::<Value>(&out) {
        v["filename"] = Value::Null;
        out = v.to_string();
    }
    (out, err, code)
}

/// The snapshots as `qemu-img info` shows them, without the dates.
fn snapshot_list(image: &Path) -> Vec<Value> {
    let info = qemu_img_json(&["info", "--output=json", path_str(image)]);
    let mut list = info["snapshots"].as_array().cloned().unwrap_or_default();
    for s in &mut list {
        let s = s.as_object_mut().unwrap();
        s.remove("date-sec");
        s.remove("date-nsec");
    }
    list
}

fn same_content(a: &Path, b: &Path) -> bool {
    qemu_img_status(&["compare", "-q", path_str(a), path_str(b)])
        .status
        .success()
}

/// The guest content of snapshot `id` of `image`, as `qemu-img convert -l` reads it.
fn snapshot_content(image: &Path, id: &str) -> Vec<u8> {
    let raw = image.with_extension(format!("snap{id}.raw"));
    let l = format!("snapshot.id={id}");
    let o = qemu_img_status(&[
        "convert",
        "-l",
        &l,
        "-O",
        "raw",
        path_str(image),
        path_str(&raw),
    ]);
    assert!(o.status.success(), "convert -l {l}: {o:?}");
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    data
}

/// Checks `damaged` with both programs (`check`, `-r leaks`, `-r all`; human and JSON
/// output), on copies; then compares what qemu-img sees of the two repaired images. Returns
/// qemu-img's exit status of the plain check and of `-r all`.
fn check_and_repair_agree(what: &str, damaged: &Path) -> (Option<i32>, Option<i32>) {
    let codes = runs_agree(
        what,
        damaged,
        &[None, Some("leaks"), Some("all")],
        &["human", "json"],
    );
    (codes[0], codes[5])
}

/// [`check_and_repair_agree`] for images qemu-img is slow on (65537 snapshots take it
/// seconds per command): `check` and `check -r all`, human output.
fn check_and_repair_agree_quickly(what: &str, damaged: &Path) -> (Option<i32>, Option<i32>) {
    let codes = runs_agree(what, damaged, &[None, Some("all")], &["human"]);
    (codes[0], codes[1])
}

/// Runs each check `mode` with each `output` format on copies of `damaged` with both
/// programs, comparing what they print and leave; returns qemu-img's exit statuses.
fn runs_agree(
    what: &str,
    damaged: &Path,
    modes: &[Option<&str>],
    outputs: &[&str],
) -> Vec<Option<i32>> {
    let dir = damaged.parent().unwrap();
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    let mut codes = Vec::new();
    for &mode in modes {
        for &output in outputs {
            let what = format!("{what}: check -r {mode:?} --output={output}");
            std::fs::copy(damaged, &ours).unwrap();
            std::fs::copy(damaged, &theirs).unwrap();
            let out = format!("--output={output}");
            let run = |image: &Path| {
                let mut args = vec!["check", out.as_str()];
                if let Some(m) = mode {
                    args.extend(["-r", m]);
                }
                args.push(path_str(image));
                args.into_iter().map(String::from).collect::<Vec<_>>()
            };
            let a = qimg(&run(&ours).iter().map(String::as_str).collect::<Vec<_>>());
            let b = qemu_img_status(&run(&theirs));
            let (a, b) = (outcome(&a, "qimg: "), outcome(&b, "qemu-img: "));
            assert_eq!(a, b, "{what}");
            codes.push(b.2);
            if mode.is_none() {
                let original = std::fs::read(damaged).unwrap();
                assert!(
                    std::fs::read(&ours).unwrap() == original,
                    "{what}: qimg wrote"
                );
                assert!(
                    std::fs::read(&theirs).unwrap() == original,
                    "{what}: qemu-img wrote"
                );
            } else {
                compare_after(&what, &ours, &theirs);
            }
        }
    }
    codes
}

/// What qemu-img sees of `ours` and `theirs` (the same image checked or repaired by qimg and
/// by qemu-img) is the same.
fn compare_after(what: &str, ours: &Path, theirs: &Path) {
    let check = |p: &Path| outcome(&qemu_img_status(&["check", path_str(p)]), "qemu-img: ");
    let after = check(theirs);
    assert_eq!(check(ours), after, "{what}: qemu-img check afterwards");
    if after.2 != Some(0) {
        return;
    }
    if header(theirs).nb_snapshots > 1000 {
        // Byte for byte, but for the dates (qemu-img lists them slowly).
        let undated = |p: &Path| {
            let mut t = raw_entries(p);
            for e in &mut t {
                e[16..24].fill(0);
            }
            t
        };
        assert_eq!(undated(ours), undated(theirs), "{what}: the snapshots");
        assert!(same_content(ours, theirs), "{what}: active layer");
        return;
    }
    let list = snapshot_list(theirs);
    assert_eq!(snapshot_list(ours), list, "{what}: the snapshots");
    assert!(same_content(ours, theirs), "{what}: active layer");
    let ids = list.iter().filter_map(|s| s["id"].as_str());
    for id in ids.filter(|id| !id.is_empty()).take(3) {
        assert_eq!(
            snapshot_content(ours, id),
            snapshot_content(theirs, id),
            "{what}: snapshot {id}"
        );
    }
}

/// A read-write open of `damaged` fails for both programs, and writes nothing.
fn writers_refuse(what: &str, damaged: &Path) {
    let dir = damaged.parent().unwrap();
    for (program, copy) in [("qimg", "rw-ours.qcow2"), ("qemu-img", "rw-theirs.qcow2")] {
        let copy = dir.join(copy);
        std::fs::copy(damaged, &copy).unwrap();
        let args = ["resize", path_str(&copy), "8M"];
        let o = if program == "qimg" {
            qimg(&args)
        } else {
            qemu_img_status(&args)
        };
        assert_eq!(o.status.code(), Some(1), "{what}: {program} resize: {o:?}");
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            std::fs::read(damaged).unwrap(),
            "{what}: {program} wrote to the image"
        );
    }
}

#[test]
fn too_much_extra_data_is_cut_to_1k_by_repair() {
    let dir = tempfile::tempdir().unwrap();
    let damaged = base_image(dir.path(), "1.1");
    resize_extra_data(&damaged, 1, 1100);
    let (check, repair) = check_and_repair_agree("extra data 1100", &damaged);
    assert_eq!((check, repair), (Some(1), Some(0)), "qemu-img's verdicts");
    writers_refuse("extra data 1100", &damaged);
}

#[test]
fn incomplete_v3_entries_are_rewritten_by_repair() {
    let dir = tempfile::tempdir().unwrap();
    let damaged = base_image(dir.path(), "1.1");
    // 8 bytes of extra data: the VM state size only, no disk size (valid in v2 only).
    resize_extra_data(&damaged, 0, 8);
    let (check, repair) = check_and_repair_agree("incomplete entry", &damaged);
    assert_eq!((check, repair), (Some(2), Some(0)), "qemu-img's verdicts");
}

/// A v2 image (where all-zero entries are valid snapshots, as in QEMU's iotest 261) whose
/// header claims 65537 snapshots; its table moved to the end of the file, so that what
/// follows the two real entries reads as zeros.
fn with_65537_snapshots(dir: &Path) -> PathBuf {
    let damaged = base_image(dir, "0.10");
    resize_extra_data(&damaged, usize::MAX, 0);
    let h = header(&damaged);
    set_table_pointer(&damaged, 65537, h.snapshots_offset);
    damaged
}

#[test]
fn more_than_65536_snapshots_are_cut_by_repair() {
    let dir = tempfile::tempdir().unwrap();
    let damaged = with_65537_snapshots(dir.path());
    // The zero entries inside the file.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&damaged)
        .unwrap();
    f.set_len(header(&damaged).snapshots_offset + 40 * 65537 + 100)
        .unwrap();
    drop(f);
    let (check, repair) = check_and_repair_agree_quickly("65537 snapshots", &damaged);
    assert_eq!((check, repair), (Some(1), Some(0)), "qemu-img's verdicts");
    writers_refuse("65537 snapshots", &damaged);
}

#[test]
fn more_than_65536_snapshots_past_the_end_of_the_file() {
    // The entries past the end read as zeros; QEMU's repair then leaves a table that runs
    // past the end of the file: still corrupt, and the same for both.
    let dir = tempfile::tempdir().unwrap();
    let damaged = with_65537_snapshots(dir.path());
    let (check, repair) = check_and_repair_agree_quickly("65537 snapshots past the end", &damaged);
    assert_eq!((check, repair), (Some(1), Some(2)), "qemu-img's verdicts");
}

/// An image whose snapshot table, as QEMU's iotest 261 builds it, runs over 64 MiB: entries
/// of 1 KiB extra data and 65535-byte ids and names (zeros, in a sparse file). With
/// `big_extra`, the third-last entry has enough extra data to cross 64 MiB itself, and fits
/// once a repair cuts it to 1 KiB; the last entry always lies past the limit.
fn table_over_64m(dir: &Path, big_extra: bool) -> PathBuf {
    let damaged = dir.join("big.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&damaged), "4M"]);
    qemu_io("qcow2", &damaged, &["write -P 0x11 0 64k"]);
    let names = 65535 * 2u64;
    let entry = |extra: u32| {
        let mut e = vec![0u8; 40];
        e[12..16].copy_from_slice(&[0xff; 4]);
        e[36..40].copy_from_slice(&extra.to_be_bytes());
        e
    };
    let size = (40 + 1024 + names).div_ceil(8) * 8;
    let limit = 64u64 << 20;
    let mut pos = 1u64 << 20;
    let mut written = 0;
    let mut n = 0u32;
    let mut put = |extra: u32, pos: &mut u64, written: &mut u64| {
        write_at(&damaged, *pos, &entry(extra));
        let len = (40 + u64::from(extra) + names).div_ceil(8) * 8;
        *pos += len;
        *written += len;
        n += 1;
    };
    if big_extra {
        while written + 3 * size <= limit {
            put(1024, &mut pos, &mut written);
        }
        let extra = limit - written - (40 + names) + 100;
        put(u32::try_from(extra).unwrap(), &mut pos, &mut written);
        put(1024, &mut pos, &mut written);
        put(1024, &mut pos, &mut written);
    } else {
        while written <= limit {
            put(1024, &mut pos, &mut written);
        }
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&damaged)
        .unwrap();
    f.set_len(pos).unwrap();
    drop(f);
    set_table_pointer(&damaged, n, 1 << 20);
    damaged
}

#[test]
fn a_table_over_64m_loses_its_last_snapshots_by_repair() {
    let dir = tempfile::tempdir().unwrap();
    let damaged = table_over_64m(dir.path(), false);
    let (check, repair) = check_and_repair_agree("table over 64 MiB", &damaged);
    assert_eq!((check, repair), (Some(1), Some(0)), "qemu-img's verdicts");
}

#[test]
fn a_table_over_64m_by_extra_data_is_cut_and_rewritten_by_repair() {
    // The repair cuts the extra data, drops the last snapshot, and rewrites the table
    // (with the all-zero ids and names empty, as QEMU reads them).
    let dir = tempfile::tempdir().unwrap();
    let damaged = table_over_64m(dir.path(), true);
    let (check, repair) = check_and_repair_agree("table over 64 MiB by extra data", &damaged);
    assert_eq!((check, repair), (Some(1), Some(0)), "qemu-img's verdicts");
}

#[test]
fn a_snapshot_with_a_bad_l1_table_stays_as_in_qemu() {
    // QEMU reports these (and `-r all` fixes only the refcounts and COPIED flags around
    // them): the snapshot is not discarded, and the image opens read-write.
    for (what, at, bytes) in [
        ("unaligned L1 table", 0, 0x200u64.to_be_bytes().to_vec()),
        ("L1 table too large", 8, 0x40_0001u32.to_be_bytes().to_vec()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let damaged = base_image(dir.path(), "1.1");
        let h = header(&damaged);
        let first = raw_entries(&damaged)[0].len().div_ceil(8) as u64 * 8;
        let entry = h.snapshots_offset + first;
        let mut field = read_at(&damaged, entry + at, bytes.len());
        for (f, b) in field.iter_mut().zip(&bytes) {
            *f |= b;
        }
        write_at(&damaged, entry + at, &field);
        let (check, repair) = check_and_repair_agree(what, &damaged);
        assert_eq!(
            (check, repair),
            (Some(2), Some(2)),
            "{what}: qemu-img's verdicts"
        );
        // QEMU opens such an image read-write (only writes into the range the entry claims
        // fail): so does qimg.
        for (program, copy) in [("qimg", "rw-ours.qcow2"), ("qemu-img", "rw-theirs.qcow2")] {
            let copy = dir.path().join(copy);
            std::fs::copy(&damaged, &copy).unwrap();
            let args = ["resize", path_str(&copy), "8M"];
            let o = if program == "qimg" {
                qimg(&args)
            } else {
                qemu_img_status(&args)
            };
            assert!(o.status.success(), "{what}: {program} resize: {o:?}");
        }
    }
}
