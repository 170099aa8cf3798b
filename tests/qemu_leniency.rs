//! Odd images QEMU reads: reserved bits in L2 entries, a compressed entry with COPIED or a
//! subcluster bitmap, a refcount block at an unaligned offset, a header extension given twice,
//! a compressed cluster whose size field runs into clusters nobody counts. Each image is made
//! by qemu-img and qemu-io and then patched by hand; QEMU's tools say what QEMU does with it
//! (reads it, fails which request, marks it corrupt or not, what `qemu-img check` reports),
//! and the engine must do the same: never refuse or mark corrupt what QEMU accepts, and still
//! refuse what QEMU refuses.

use blockio::FileOpener;
use qcow2_engine::{Disk, Error, Image, ImageOptions};
use qcow2_format::FormatError;
use qcow2_tests::{
    path_str, qemu_img, qemu_img_status, qemu_info_json, qemu_io, qemu_map_json, raw_reference,
    tool,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

const CS: u64 = 65536;
/// Offset bits of an L2 entry.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `qemu-img create -f qcow2 [-o OPTS] DIR/NAME 1M`.
fn create(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path_str(&path), "1M"]);
    qemu_img(&args);
    path
}

fn get64(path: &Path, at: u64) -> u64 {
    let data = std::fs::read(path).unwrap();
    u64::from_be_bytes(data[at as usize..at as usize + 8].try_into().unwrap())
}

fn put64(path: &Path, at: u64, value: u64) {
    let mut data = std::fs::read(path).unwrap();
    data[at as usize..at as usize + 8].copy_from_slice(&value.to_be_bytes());
    std::fs::write(path, data).unwrap();
}

/// The offset of the L2 table of L1 entry 0.
fn first_l2_table(path: &Path) -> u64 {
    let l1 = get64(path, 40);
    get64(path, l1) & OFFSET_MASK
}

/// A copy of `path` beside it, named `name`.
fn copy(path: &Path, name: &str) -> PathBuf {
    let to = path.with_file_name(name);
    std::fs::copy(path, &to).unwrap();
    to
}

/// Runs qemu-io on a qcow2 image, returning whether every command worked, and its output.
fn qemu_io_outcome(path: &Path, cmds: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new(tool("qemu-io"));
    cmd.env("LC_ALL", "C").args(["-f", "qcow2"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(path).output().expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("failed"), text)
}

/// Whether `qemu-img info` says the corrupt bit is set.
fn marked_corrupt(path: &Path) -> bool {
    qemu_info_json(path)["format-specific"]["data"]["corrupt"]
        .as_bool()
        .expect("qemu-img info reports the corrupt bit")
}

/// Opens with the engine (read-only or read-write), reads the whole disk and closes.
fn engine_read_all(path: &Path, read_only: bool) -> Vec<u8> {
    rt().block_on(async {
        let opts = ImageOptions::new().read_only(read_only);
        let img = Image::open(FileOpener, path, opts)
            .await
            .unwrap_or_else(|e| panic!("{} (read_only={read_only}): {e}", path.display()));
        let data = img
            .read(0, img.size())
            .await
            .unwrap_or_else(|e| panic!("{}: read: {e}", path.display()))
            .to_vec();
        img.close().await.unwrap();
        data
    })
}

/// Reads the whole disk read-write, as QEMU's reading of it, and leaves the image as QEMU
/// leaves it after a read: not marked corrupt.
fn assert_read_write_reads_as_qemu(path: &Path, want: &[u8]) {
    assert!(
        engine_read_all(path, false) == want,
        "{}: the engine read differs from qemu-img convert",
        path.display()
    );
    assert!(
        !marked_corrupt(path),
        "{}: the engine marked an image corrupt that QEMU reads",
        path.display()
    );
}

/// `Image::check` says what `qemu-img check` says: exit status, diagnostic lines and counts.
fn assert_check_agrees(path: &Path) {
    let out = qemu_img_status(&["check", "--output=json", path_str(path)]);
    let code = out.status.code().expect("qemu-img exit status");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let messages: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("qemu-img:"))
        .map(str::to_string)
        .collect();
    let r = rt().block_on(async {
        let opts = ImageOptions::new().read_only(true);
        let img = Image::open(FileOpener, path, opts).await.unwrap();
        img.check().await.unwrap()
    });
    let what = path.display();
    assert_eq!(
        i32::from(r.exit_code()),
        code,
        "{what}: exit status ({r:#?})"
    );
    assert_eq!(r.messages, messages, "{what}: diagnostic lines");
    let n = |k: &str| json.get(k).and_then(Value::as_u64).unwrap_or(0);
    for (key, ours) in [
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("check-errors", r.check_errors),
        ("image-end-offset", r.image_end_offset),
    ] {
        if !json.is_null() {
            assert_eq!(ours, n(key), "{what}: {key} (qemu-img: {json})");
        }
    }
}

// Item: L2 entries QEMU reads as it finds them.

/// With extended L2 entries, QEMU reads a standard entry whatever its reserved bits say
/// (bit 0, the zero flag of standard L2, included) and a compressed entry whatever its
/// subcluster bitmap says: `qcow2_get_subcluster_type` returns COMPRESSED for any bitmap,
/// `qcow2_get_cluster_type` ignores the zero flag, and `qcow2_get_host_offset` never looks at
/// the reserved bits. Only `qemu-img check` reports them. A bitmap with a subcluster both
/// allocated and zero is INVALID: QEMU fails the read and marks the image corrupt, as we do.
#[test]
fn extended_l2_entries_with_reserved_bits_or_a_compressed_bitmap_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "extl2.qcow2", "extended_l2=on,cluster_size=64k");
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0x11 0 64k",
            "write -c -P 0x22 64k 64k",
            "write -P 0x33 128k 64k",
        ],
    );
    let l2 = first_l2_table(&img);
    let pristine = copy(&img, "pristine.qcow2");
    put64(&img, l2, get64(&img, l2) | 1);
    assert_ne!(get64(&img, l2 + 16) & (1 << 62), 0, "entry 1 is compressed");
    put64(&img, l2 + 16 + 8, 0xffff_ffff);
    put64(&img, l2 + 32, get64(&img, l2 + 32) | 0x3f00_0000_0000_01fe);

    let theirs = copy(&img, "qemu.qcow2");
    let reads = [
        "read -P 0x11 0 64k",
        "read -P 0x22 64k 64k",
        "read -P 0x33 128k 64k",
    ];
    qemu_io("qcow2", &theirs, &reads);
    assert!(!marked_corrupt(&theirs), "QEMU reads without marking");
    let want = raw_reference(&img, "qcow2");
    assert_read_write_reads_as_qemu(&img, &want);
    qemu_io("qcow2", &img, &reads);
    assert_check_agrees(&img);

    // Allocated and zero at once: corrupt for both.
    let invalid = copy(&pristine, "invalid.qcow2");
    put64(&invalid, l2 + 8, 0x0000_0001_0000_0001);
    let theirs = copy(&invalid, "invalid-qemu.qcow2");
    let (ok, out) = qemu_io_outcome(&theirs, &["read 0 64k"]);
    assert!(!ok && marked_corrupt(&theirs), "QEMU: {out}");
    let err = rt().block_on(async {
        let img = Image::open(FileOpener, &invalid, ImageOptions::new())
            .await
            .unwrap();
        img.read(0, 65536).await.unwrap_err()
    });
    assert!(err.is_corruption(), "{err}");
    assert!(
        marked_corrupt(&invalid),
        "QEMU marks it corrupt, and so do we"
    );
}

/// Standard L2 entries too: QEMU reads a data cluster whose entry has reserved bits set
/// (bits 1-8 and 56-61), and a compressed cluster whose entry has COPIED set
/// (`qcow2_get_host_offset` takes the descriptor with L2E_COMPRESSED_OFFSET_SIZE_MASK, which
/// leaves COPIED out); `qemu-img check` reports both as corruption.
#[test]
fn standard_l2_entries_with_reserved_bits_or_a_copied_compressed_cluster_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "std.qcow2", "");
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x11 0 64k", "write -c -P 0x22 64k 64k"],
    );
    let l2 = first_l2_table(&img);
    put64(&img, l2, get64(&img, l2) | 0x3f00_0000_0000_01fe);
    assert_ne!(get64(&img, l2 + 8) & (1 << 62), 0, "entry 1 is compressed");
    put64(&img, l2 + 8, get64(&img, l2 + 8) | (1 << 63));

    let theirs = copy(&img, "qemu.qcow2");
    let reads = ["read -P 0x11 0 64k", "read -P 0x22 64k 64k"];
    qemu_io("qcow2", &theirs, &reads);
    assert!(!marked_corrupt(&theirs), "QEMU reads without marking");
    let want = raw_reference(&img, "qcow2");
    assert_read_write_reads_as_qemu(&img, &want);
    assert_check_agrees(&img);
}

// Item: a refcount block at an unaligned offset.

/// QEMU opens an image whose refcount table names a refcount block at an unaligned offset,
/// reads it and writes in place; only a request that needs a refcount from that block fails
/// (`qcow2_get_refcount` and `alloc_refcount_block` call `qcow2_signal_corruption`, which
/// marks a writable image corrupt). The engine opens it, reads and writes in place, and fails
/// the first allocating write with QEMU's message, marking the image corrupt as QEMU does.
#[test]
fn unaligned_refcount_block_fails_only_the_writes_that_need_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "refblock.qcow2", "");
    qemu_io("qcow2", &img, &["write -P 0x11 0 64k"]);
    let reftable = get64(&img, 48);
    let block = get64(&img, reftable);
    put64(&img, reftable, block + 512);
    let message = format!(
        "Refblock offset {:#x} unaligned (reftable index: 0)",
        block + 512
    );

    let theirs = copy(&img, "qemu.qcow2");
    qemu_io(
        "qcow2",
        &theirs,
        &[
            "read -P 0x11 0 64k",
            "write -P 0x55 0 4k",
            "read -P 0x55 0 4k",
        ],
    );
    assert!(!marked_corrupt(&theirs), "QEMU writes in place");
    let (ok, out) = qemu_io_outcome(&theirs, &["write -P 0x66 64k 4k"]);
    assert!(!ok && out.contains(&message), "QEMU: {out}");
    assert!(marked_corrupt(&theirs), "QEMU marks it corrupt");

    let want = raw_reference(&img, "qcow2");
    assert_check_agrees(&img);
    assert!(engine_read_all(&img, true) == want, "read-only open");
    assert_map_agrees(&img);
    rt().block_on(async {
        let image = Image::open(FileOpener, &img, ImageOptions::new())
            .await
            .expect("a read-write open works");
        assert!(image.read(0, 1 << 20).await.unwrap()[..] == want[..]);
        image
            .write(0, &[0x55; 4096])
            .await
            .expect("a write in place");
        assert!(image
            .read(0, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0x55));
        let err = image
            .write(65536, &[0x66; 4096])
            .await
            .expect_err("an allocating write needs the refcount block");
        assert!(
            err.is_corruption() && err.to_string().contains(&message),
            "{err}"
        );
        let _ = image.close().await;
    });
    assert!(marked_corrupt(&img), "marked corrupt, as QEMU does");
    assert!(
        raw_reference(&img, "qcow2") == raw_reference(&theirs, "qcow2"),
        "the image reads as QEMU's copy does after the same requests"
    );
}

/// `Disk::map` says what `qemu-img map` says (QEMU maps the image although its refcounts
/// cannot all be read).
fn assert_map_agrees(path: &Path) {
    let theirs = qemu_map_json(path);
    let ours = rt().block_on(async {
        let opts = ImageOptions::new().read_only(true);
        let disk = Disk::open(FileOpener, path, None, opts).await.unwrap();
        disk.map(0, disk.size()).await.unwrap()
    });
    let theirs = theirs.as_array().unwrap();
    assert_eq!(ours.len(), theirs.len(), "{ours:?} / {theirs:?}");
    for (o, t) in ours.iter().zip(theirs) {
        let got = (o.start, o.length, o.present, o.zero, o.data, o.offset);
        let want = (
            t["start"].as_u64().unwrap(),
            t["length"].as_u64().unwrap(),
            t["present"].as_bool().unwrap(),
            t["zero"].as_bool().unwrap(),
            t["data"].as_bool().unwrap(),
            t["offset"].as_u64(),
        );
        assert_eq!(got, want);
    }
}

// Item: a header extension given twice.

const BACKING_FORMAT: u32 = 0xe279_2aca;
const FEATURE_TABLE: u32 = 0x6803_f857;
const DATA_FILE: u32 = 0x4441_5441;
const BITMAPS: u32 = 0x2385_2875;

/// The header extensions of a v3 image, in file order.
fn extensions(path: &Path) -> Vec<(u32, Vec<u8>)> {
    let d = std::fs::read(path).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(d[at..at + 4].try_into().unwrap());
    let mut at = be32(100) as usize;
    let mut out = Vec::new();
    loop {
        let (kind, len) = (be32(at), be32(at + 4) as usize);
        if kind == 0 {
            return out;
        }
        out.push((kind, d[at + 8..at + 8 + len].to_vec()));
        at += 8 + len.next_multiple_of(8);
    }
}

/// Replaces the header extensions of a v3 image by `exts` (and the end marker), moving the
/// backing file name to right after them.
fn set_extensions(path: &Path, exts: &[(u32, &[u8])]) {
    let mut d = std::fs::read(path).unwrap();
    let name_at = u64::from_be_bytes(d[8..16].try_into().unwrap()) as usize;
    let name_len = u32::from_be_bytes(d[16..20].try_into().unwrap()) as usize;
    let name = d[name_at..name_at + name_len].to_vec();
    let mut area = Vec::new();
    for (kind, payload) in exts {
        area.extend_from_slice(&kind.to_be_bytes());
        area.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        area.extend_from_slice(payload);
        area.resize(area.len().next_multiple_of(8), 0);
    }
    area.extend_from_slice(&[0; 8]);
    let start = u32::from_be_bytes(d[100..104].try_into().unwrap()) as usize;
    let end = start + area.len();
    d[start..end].copy_from_slice(&area);
    if name_at != 0 {
        d[end..end + name_len].copy_from_slice(&name);
        d[8..16].copy_from_slice(&(end as u64).to_be_bytes());
    }
    std::fs::write(path, d).unwrap();
}

fn payload(exts: &[(u32, Vec<u8>)], kind: u32) -> &[u8] {
    &exts.iter().find(|e| e.0 == kind).expect("extension").1
}

/// QEMU's `qcow2_read_extensions` keeps no count of the extensions it meets: a backing format
/// given twice is overwritten by the later one. Both orders, against a qcow2 backing file:
/// the last one names the format QEMU opens it with (as raw, the guest sees its header).
#[test]
fn backing_format_given_twice_the_last_counts() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "");
    qemu_io("qcow2", &base, &["write -P 0x5a 0 64k"]);
    for (first, last) in [("raw", "qcow2"), ("qcow2", "raw")] {
        let top = dir.path().join(format!("top-{last}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(&base),
            "-F",
            "qcow2",
            path_str(&top),
        ]);
        let table = extensions(&top);
        let table = payload(&table, FEATURE_TABLE);
        set_extensions(
            &top,
            &[
                (BACKING_FORMAT, first.as_bytes()),
                (BACKING_FORMAT, last.as_bytes()),
                (FEATURE_TABLE, table),
            ],
        );
        let info = qemu_info_json(&top);
        assert_eq!(info["backing-filename-format"], last, "QEMU uses the last");
        let want = raw_reference(&top, "qcow2");
        assert_read_write_reads_as_qemu(&top, &want);
    }
}

/// A data file name given twice: QEMU opens the later one.
#[test]
fn data_file_name_given_twice_the_last_counts() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.raw");
    let two = dir.path().join("two.raw");
    let img = create(
        dir.path(),
        "data.qcow2",
        &format!("data_file={}", path_str(&one)),
    );
    qemu_io("qcow2", &img, &["write -P 0x61 0 64k"]);
    std::fs::copy(&one, &two).unwrap();
    qemu_io("raw", &two, &["write -P 0x62 0 64k"]);
    let exts = extensions(&img);
    set_extensions(
        &img,
        &[
            (DATA_FILE, path_str(&one).as_bytes()),
            (FEATURE_TABLE, payload(&exts, FEATURE_TABLE)),
            (DATA_FILE, path_str(&two).as_bytes()),
        ],
    );
    qemu_io("qcow2", &img, &["read -P 0x62 0 64k"]);
    let want = raw_reference(&img, "qcow2");
    assert_read_write_reads_as_qemu(&img, &want);
}

/// Two feature name tables: QEMU names an unknown incompatible feature from the later one
/// (and refuses the image, as we do).
#[test]
fn feature_table_given_twice_names_from_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "features.qcow2", "");
    let entry = |name: &str| {
        let mut e = vec![0u8, 5];
        e.extend_from_slice(name.as_bytes());
        e.resize(48, 0);
        e
    };
    set_extensions(
        &img,
        &[
            (FEATURE_TABLE, &entry("first-name")),
            (FEATURE_TABLE, &entry("second-name")),
        ],
    );
    put64(&img, 72, 1 << 5);
    let out = qemu_img_status(&["info", path_str(&img)]);
    let qemu = String::from_utf8_lossy(&out.stderr);
    assert!(
        qemu.contains("Unsupported qcow2 feature(s): second-name"),
        "{qemu}"
    );
    let err = rt()
        .block_on(Image::open(FileOpener, &img, ImageOptions::new()))
        .err()
        .expect("an unknown incompatible feature is refused");
    match err {
        Error::Format {
            source: FormatError::UnknownIncompatibleFeatures { bits, names, .. },
            ..
        } => assert_eq!((bits, names), (1 << 5, vec!["second-name".to_string()])),
        other => panic!("{other}"),
    }
}

/// An unknown extension given twice: QEMU keeps both, and writes both back when it rewrites
/// the header (here to clear an unknown autoclear bit before the first write).
#[test]
fn unknown_extension_given_twice_is_kept_twice() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "unknown.qcow2", "");
    set_extensions(
        &img,
        &[(0x1234_5678, b"payload-one"), (0x1234_5678, b"payload-two")],
    );
    put64(&img, 88, 1 << 5);
    let theirs = copy(&img, "qemu.qcow2");
    qemu_io("qcow2", &theirs, &["write -P 0x11 0 64k"]);
    rt().block_on(async {
        let image = Image::open(FileOpener, &img, ImageOptions::new())
            .await
            .unwrap();
        image.write(0, &[0x11; 65536]).await.unwrap();
        image.close().await.unwrap();
    });
    for path in [&theirs, &img] {
        let kept: Vec<Vec<u8>> = extensions(path)
            .into_iter()
            .filter(|e| e.0 == 0x1234_5678)
            .map(|e| e.1)
            .collect();
        assert_eq!(kept.len(), 2, "{}: {kept:?}", path.display());
        assert!(kept.contains(&b"payload-one".to_vec()) && kept.contains(&b"payload-two".to_vec()));
        assert_eq!(get64(path, 88), 0, "{}: autoclear bits", path.display());
        qemu_io("qcow2", path, &["read -P 0x11 0 64k"]);
    }
}

/// Two bitmaps extensions: QEMU checks each one it meets (one with zero bitmaps is refused
/// wherever it stands) and keeps the last.
#[test]
fn bitmaps_extension_given_twice_each_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "bitmaps.qcow2", "");
    qemu_img(&["bitmap", "--add", path_str(&img), "b0"]);
    let exts = extensions(&img);
    let good = payload(&exts, BITMAPS).to_vec();
    let mut empty = good.clone();
    empty[..4].fill(0);
    let rest: Vec<(u32, &[u8])> = exts
        .iter()
        .filter(|e| e.0 != BITMAPS)
        .map(|e| (e.0, &e.1[..]))
        .collect();
    for (what, pair) in [
        ("empty first", [&empty, &good]),
        ("empty last", [&good, &empty]),
    ] {
        let path = copy(&img, &format!("{}.qcow2", what.replace(' ', "-")));
        let mut list = vec![(BITMAPS, &pair[0][..]), (BITMAPS, &pair[1][..])];
        list.extend(rest.iter().copied());
        set_extensions(&path, &list);
        let out = qemu_img_status(&["info", path_str(&path)]);
        let qemu = String::from_utf8_lossy(&out.stderr);
        assert!(
            qemu.contains("found bitmaps extension with zero bitmaps"),
            "{qemu}"
        );
        for read_only in [true, false] {
            let opts = ImageOptions::new().read_only(read_only);
            match rt().block_on(Image::open(FileOpener, &path, opts)) {
                Err(Error::Format {
                    source:
                        FormatError::BadExtension {
                            kind: BITMAPS,
                            reason,
                        },
                    ..
                }) => assert!(reason.contains("zero bitmaps"), "{what}: {reason}"),
                Err(e) => panic!("{what}: {e}"),
                Ok(_) => panic!("{what}: opened"),
            }
        }
    }
}

// Item: a compressed cluster whose size field runs into clusters nobody counts.

/// The sector count of a compressed descriptor is an upper bound (the stream ends where its
/// cluster is complete). QEMU reads such a cluster whatever the refcounts of the clusters the
/// count runs into, in the file or past its end, and its open checks no refcount;
/// `qemu-img check` reports the references. The engine opens such an image read-write, reads
/// QEMU's bytes, and does not hand those clusters out for new data.
#[test]
fn compressed_size_field_running_into_unreferenced_clusters() {
    for past_eof in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "span.qcow2", "");
        qemu_io(
            "qcow2",
            &img,
            &["write -P 0x44 128k 64k", "write -c -P 0x33 0 64k"],
        );
        let l2 = first_l2_table(&img);
        let entry = get64(&img, l2);
        assert_ne!(entry & (1 << 62), 0, "entry 0 is compressed");
        // 64 KiB clusters: the sector count is bits 54-61; all ones is 256 sectors.
        put64(&img, l2, entry | (0xff << 54));
        let span_start = entry & ((1 << 54) - 1) & !511;
        let span = span_start..span_start + 256 * 512;
        let last_cluster = (span.end - 1) / CS;
        let len = std::fs::metadata(&img).unwrap().len();
        assert!(
            len <= last_cluster * CS,
            "the span's last cluster is past the end"
        );
        if !past_eof {
            std::fs::File::options()
                .write(true)
                .open(&img)
                .unwrap()
                .set_len((last_cluster + 1) * CS)
                .unwrap();
        }
        let what = if past_eof {
            "past the end"
        } else {
            "in the file"
        };

        let theirs = copy(&img, "qemu.qcow2");
        let reads = ["read -P 0x33 0 64k", "read -P 0x44 128k 64k"];
        qemu_io("qcow2", &theirs, &reads);
        assert!(
            !marked_corrupt(&theirs),
            "{what}: QEMU reads without marking"
        );
        assert_check_agrees(&img);
        let want = raw_reference(&img, "qcow2");
        assert_read_write_reads_as_qemu(&img, &want);

        rt().block_on(async {
            let image = Image::open(FileOpener, &img, ImageOptions::new())
                .await
                .unwrap();
            image.write(256 << 10, &[0x77; 65536]).await.unwrap();
            image.close().await.unwrap();
        });
        qemu_io(
            "qcow2",
            &img,
            &["read -P 0x33 0 64k", "read -P 0x77 256k 64k"],
        );
        let map = qemu_map_json(&img);
        let placed = map
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["start"] == 256 << 10)
            .and_then(|e| e["offset"].as_u64())
            .expect("the new cluster's offset");
        assert!(
            !span.contains(&placed),
            "{what}: new data at {placed:#x}, inside the compressed span {span:x?}"
        );
    }
}
