//! `qimg io`'s session commands against `qemu-io`: starting without an image, `open` (and its
//! options), `close`, `reopen`, `info`, `length`, `truncate`, `sleep`, `quit`, `help`,
//! copy-on-read (`-C`), compressed writes, and their error cases. Each script runs through
//! both tools on two copies of the same images (a qcow2 image over a qcow2 backing file
//! that qemu-io wrote); the output, the exit status and the images afterwards (content and
//! allocation, as `qemu-img map` sees them) must be the same.

use qcow2_tests::{path_str, qemu_img, qemu_map_json, IoRun};
use std::path::{Path, PathBuf};

/// Two copies of a top image over its backing file, `x/` for qemu-io and `y/` for qimg io.
struct Pair {
    _dir: tempfile::TempDir,
    theirs: PathBuf,
    ours: PathBuf,
}

/// The image of the differential tests: a 1 MiB qcow2 image over a qcow2 backing file with
/// 0x07 in its first 64 KiB and zeros written at 128 KiB.
fn make(dir: &Path) -> PathBuf {
    make_layers(
        dir,
        "compat=1.1",
        "1M",
        &[
            (
                "base.qcow2",
                None,
                &["write -P 7 0 64k", "write -P 0 128k 64k"],
            ),
            ("img.qcow2", Some("base.qcow2"), &[]),
        ],
    )
}

/// A chain of three images with `-o opts` (extended L2 entries, another cluster size...):
/// the base with data, zeros, compressed data and data of zeros, a middle image writing
/// over part of it, and a top image with a few small writes (partly allocated clusters).
fn make_chain(dir: &Path, opts: &str) -> PathBuf {
    make_layers(
        dir,
        opts,
        "1000k",
        &[
            (
                "b.qcow2",
                None,
                &[
                    "write -P 1 0 100k",
                    "write -z 200k 64k",
                    "write -c -P 3 256k 128k",
                    "write -P 0 400k 64k",
                    "write -P 9 990k 10k",
                ],
            ),
            (
                "m.qcow2",
                Some("b.qcow2"),
                &["write -P 5 50k 20k", "write -z 600k 64k"],
            ),
            (
                "t.qcow2",
                Some("m.qcow2"),
                &[
                    "write -P 6 700k 4k",
                    "write -P 6 130k 4k",
                    "write -z 140k 4k",
                ],
            ),
        ],
    )
}

/// Qcow2 images of `size` with `-o opts` in `dir`, each (name, backing file, what qemu-io
/// writes into it) over the one before; returns the last one's path.
fn make_layers(
    dir: &Path,
    opts: &str,
    size: &str,
    layers: &[(&str, Option<&str>, &[&str])],
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut top = PathBuf::new();
    for &(name, backing, script) in layers {
        top = dir.join(name);
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", opts];
        if let Some(b) = backing {
            args.extend(["-b", b, "-F", "qcow2"]);
        }
        args.extend([path_str(&top), size]);
        let created = qemu_img(&args);
        assert!(created.status.success(), "{created:?}");
        let script: Vec<String> = script.iter().map(|c| c.to_string()).collect();
        let w = IoRun::qemu_io(&[], &script, Some(&top));
        assert_eq!(w.code, Some(0), "{w:?}");
    }
    top
}

impl Pair {
    fn new(make: &dyn Fn(&Path) -> PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let theirs = make(&dir.path().join("x"));
        let ours = make(&dir.path().join("y"));
        Pair {
            _dir: dir,
            theirs,
            ours,
        }
    }
}

/// `map` of an image without host offsets (they may differ and mean the same).
fn layout(image: &Path) -> serde_json::Value {
    let mut map = qemu_map_json(image);
    for e in map.as_array_mut().unwrap() {
        e.as_object_mut().unwrap().remove("offset");
    }
    map
}

/// Runs `args` and `script` through both tools, `IMG` in either standing for the image and
/// `with_image` saying whether the command line names it; asserts the same output, exit
/// status and images afterwards. Returns qemu-io's run.
fn same(args: &[&str], script: &[&str], with_image: bool) -> IoRun {
    same_on(&make, args, script, with_image)
}

/// [`same`] on the images `make` makes.
fn same_on(
    make: &dyn Fn(&Path) -> PathBuf,
    args: &[&str],
    script: &[&str],
    with_image: bool,
) -> IoRun {
    let p = Pair::new(make);
    let run = |image: &Path, qemu: bool| {
        let img = path_str(image);
        let script: Vec<String> = script.iter().map(|c| c.replace("IMG", img)).collect();
        let args: Vec<String> = args.iter().map(|a| a.replace("IMG", img)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let image = with_image.then_some(image);
        let mut run = if qemu {
            IoRun::qemu_io(&args, &script, image)
        } else {
            IoRun::qimg_io(env!("CARGO_BIN_EXE_qimg"), &args, &script, image)
        };
        for l in run.stdout.iter_mut().chain(run.stderr.iter_mut()) {
            *l = l.replace(img, "IMG");
        }
        run
    };
    let theirs = run(&p.theirs, true);
    let ours = run(&p.ours, false);
    ours.assert_same(&theirs, &format!("{args:?} {script:?}"));
    let cmp = qemu_img(&["compare", path_str(&p.theirs), path_str(&p.ours)]);
    assert!(cmp.status.success(), "{script:?}: images differ: {cmp:?}");
    assert_eq!(layout(&p.ours), layout(&p.theirs), "{script:?}: allocation");
    theirs
}

#[test]
fn commands_without_an_image_say_no_file_open() {
    let r = same(
        &[],
        &[
            "length",
            "read 0 1",
            "write",
            "info",
            "truncate 1M",
            "close",
        ],
        false,
    );
    assert_eq!(r.stderr.len(), 6, "{r:?}");
    assert_eq!(r.stderr[0], "no file open, try 'help open'");
    same(&[], &["reopen -r", "sleep 1", "map", "bogus"], false);
}

#[test]
fn open_then_commands() {
    same(
        &[],
        &["open IMG", "info", "length", "write 0 4k", "map"],
        false,
    );
    same(
        &[],
        &["o -r IMG", "read -P 7 0 512", "c", "c", "length"],
        false,
    );
    same(
        &[],
        &[
            "open -n IMG",
            "write -P 3 4k 4k",
            "close",
            "open -r IMG",
            "read -P 3 4k 4k",
        ],
        false,
    );
}

#[test]
fn open_errors_match_qemu_io() {
    let r = same(&[], &["open nonexist.qcow2", "length"], false);
    assert_eq!(r.code, Some(1));
    same(&[], &["open IMG", "open IMG", "length"], false);
    same(&[], &["open", "open -r", "open -o driver=qcow2"], false);
    same(
        &[],
        &["open -x IMG", "open IMG IMG", "open -f qcow2 IMG"],
        false,
    );
    same(
        &[],
        &[
            "open -d bogus IMG",
            "open -t bogus IMG",
            "open -t Writeback IMG",
            "open -i bogus IMG",
        ],
        false,
    );
    same(
        &[],
        &[
            "open -U IMG",
            "open -k IMG",
            "open -C -r IMG",
            "open -o driver=bogus IMG",
        ],
        false,
    );
    same(&[], &["open IMG"], true);
}

#[test]
fn open_options_match_qemu_io() {
    same(&[], &["open -r -U IMG", "read -P 7 0 512"], false);
    same(&[], &["open -n -k IMG", "info"], false);
    same(&[], &["open -t writethrough IMG", "write 0 4k"], false);
    same(&[], &["open -t off IMG", "write 0 4k"], false);
    same(&[], &["open -o driver=raw IMG", "info", "length"], false);
    same(
        &[],
        &["open -d ignore IMG", "write 0 64k", "discard 0 64k", "map"],
        false,
    );
    same(
        &[],
        &[
            "open -s IMG",
            "write 0 512",
            "read -P 0xcd 0 512",
            "close",
            "open -r IMG",
            "read -P 7 0 512",
        ],
        false,
    );
}

#[test]
fn driver_options_match_qemu_io() {
    same(
        &[],
        &[
            "open -o lazy-refcounts=bogus IMG",
            "open -o l2-cache-size=bogus IMG",
        ],
        false,
    );
    same(
        &[],
        &[
            "open -o l2-cache-size=1k,lazy-refcounts=on IMG",
            "write 0 4k",
            "info",
        ],
        false,
    );
    same(
        &[],
        &[
            "open -o lazy-refcounts IMG",
            "close",
            "open -o foo=bar IMG",
            "open -o foo IMG",
        ],
        false,
    );
    same(
        &[],
        &[
            "reopen -o l2-cache-size=2M",
            "reopen -o lazy-refcounts",
            "write 0 4k",
        ],
        true,
    );
    same(
        &[],
        &[
            "reopen -o driver=raw",
            "reopen -o driver=qcow2",
            "reopen -o foo=1",
            "info",
        ],
        true,
    );
}

#[test]
fn reopen_changes_the_mode() {
    same(
        &[
            "-c",
            "reopen -r",
            "-c",
            "write 0 512",
            "-c",
            "reopen -w",
            "-c",
            "write 0 512",
        ],
        &[],
        true,
    );
    same(
        &[],
        &[
            "reopen -r -w",
            "reopen x",
            "reopen -c bogus",
            "reopen -c none",
            "write 0 4k",
            "reopen",
        ],
        true,
    );
    same(
        &["-r"],
        &["reopen -w", "write -P 5 0 4k", "truncate 2M", "info"],
        true,
    );
    same(&[], &["open -r IMG", "reopen -w", "write 0 512"], false);
}

#[test]
fn command_line_values_are_checked_like_qemu_io() {
    same(&["-t", "bogus"], &["length"], true);
    same(&["-t", "off"], &["length"], true);
    same(&["-d", "bogus"], &["length"], true);
    same(
        &["-d", "ignore"],
        &["write 0 64k", "discard 0 64k", "map"],
        true,
    );
    same(&["-U"], &["length"], true);
    same(&["-k"], &["length"], true);
    same(&["-n", "-k"], &["length"], true);
    same(&["-i", "bogus"], &["length"], true);
    same(&["-i", "native"], &["length"], true);
    same(&["-i", "native", "-n"], &["write 0 4k"], true);
    same(
        &["-i", "io_uring"],
        &["write 0 4k", "open -i io_uring IMG"],
        true,
    );
    same(&["-m"], &["read 0 4k"], true);
    same(
        &["-i", "threads"],
        &["open -i native -t none IMG", "length"],
        false,
    );
    same(&[], &["open -i native IMG"], false);
}

#[test]
fn info_and_length_match_qemu_io() {
    same(&[], &["info", "i", "length", "l", "info x"], true);
    same(&["-f", "raw"], &["info", "length"], true);
    same(&["-r"], &["info"], true);
}

#[test]
fn info_shows_format_specific_information_like_qemu_io() {
    for opts in [
        "compat=0.10",
        "compression_type=zstd,extended_l2=on,refcount_bits=1",
    ] {
        let one = |dir: &Path| {
            let img = make_layers(dir, opts, "3M", &[("i.qcow2", None, &["write 0 4k"])]);
            if !opts.contains("0.10") {
                // Version 2 images have no bitmaps.
                qemu_img(&["bitmap", "--add", path_str(&img), "b0"]);
            }
            img
        };
        same_on(&one, &["-r"], &["info"], true);
        same_on(&one, &[], &["open -r -o driver=qcow2 IMG", "info"], false);
    }
}

#[test]
fn truncate_matches_qemu_io() {
    same(
        &[],
        &[
            "truncate 2M",
            "length",
            "truncate 512k",
            "length",
            "t 1000",
            "info",
        ],
        true,
    );
    same(
        &[],
        &[
            "truncate -m falloc 3M",
            "truncate -m full 4M",
            "truncate -m metadata 5M",
            "length",
        ],
        true,
    );
    same(
        &[],
        &[
            "truncate -m bogus 2M",
            "truncate -x 1",
            "truncate",
            "truncate abc",
            "truncate 1M 2M",
            "length",
        ],
        true,
    );
    same(&["-r"], &["truncate 2M", "length"], true);
    let raw = |dir: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        let img = dir.join("r.raw");
        qemu_img(&["create", "-q", "-f", "raw", path_str(&img), "1M"]);
        img
    };
    let script = [
        "write -P 3 0 1M",
        "truncate 1000",
        "length",
        "truncate -m full 2M",
        "length",
    ];
    same_on(&raw, &["-f", "raw"], &script, true);
    same_on(
        &raw,
        &["-f", "raw"],
        &["truncate -m metadata 3M", "truncate -m falloc 3M", "info"],
        true,
    );
}

#[test]
fn sleep_quit_and_help_match_qemu_io() {
    same(
        &[],
        &[
            "sleep 5",
            "sleep abc",
            "sleep -1",
            "sleep 0x3",
            "sleep",
            "sleep 1 2",
        ],
        true,
    );
    let r = same(&[], &["quit", "length"], true);
    assert_eq!((r.code, r.stdout.len()), (Some(0), 0));
    same(&[], &["q 1 2", "length"], true);
    same(&[], &["read 0 1", "quit", "write 0 1"], true);
    same(
        &[],
        &[
            "help open",
            "help o",
            "help reopen",
            "help info",
            "help t",
            "help sleep",
            "help quit",
            "help bogus",
            "help a b",
        ],
        false,
    );
    same(
        &[],
        &["help length", "? map", "help close", "help read", "help r"],
        false,
    );
    let cmds = [
        "readv",
        "write",
        "writev",
        "discard",
        "aio_read",
        "aio_write",
        "flush",
        "alloc",
    ];
    let help: Vec<String> = cmds.iter().map(|c| format!("help {c}")).collect();
    let help: Vec<&str> = help.iter().map(String::as_str).collect();
    same(&[], &help, false);
}

#[test]
fn sigraise_and_abort_match_qemu_io() {
    let r = same(&[], &["sigraise 9", "length"], false);
    assert_eq!((r.code, r.stderr.len()), (None, 0), "{r:?}");
    same(
        &[],
        &[
            "sigraise 99",
            "sigraise abc",
            "sigraise 65",
            "sigraise 0",
            "length",
        ],
        false,
    );
    same(&[], &["abort 1", "help sigraise", "help abort"], false);
    // A crash after a flush: what was flushed is there (`abort` itself is left out: it may
    // leave a core file behind).
    let r = same(
        &[],
        &["write -P 5 0 64k", "flush", "sigraise 9", "write 0 1"],
        true,
    );
    assert_eq!(r.code, None);
}

#[test]
fn copy_on_read_copies_backing_data_into_the_image() {
    same(
        &["-C"],
        &["read 1000 512", "read 130k 1k", "read 300k 1k", "map"],
        true,
    );
    same(
        &[],
        &[
            "open -C IMG",
            "read 0 200k",
            "aio_read 500k 1k",
            "aio_flush",
            "map",
        ],
        false,
    );
    same(&["-C", "-r"], &["read 0 1"], true);
    same(
        &["-C"],
        &["write 64k 4k", "read 60k 72k", "read 1M 1", "map"],
        true,
    );
}

#[test]
fn copy_on_read_never_undoes_a_write_in_flight() {
    // QEMU serialises a copy-on-read with the writes overlapping it: whatever the order they
    // complete in, the writes' data stays.
    let script = [
        "aio_read -q 0 1M",
        "aio_write -q -P 9 0 64k",
        "aio_write -q -P 9 512k 4k",
        "aio_read -q 500k 100k",
        "aio_write -q -z 600k 64k",
        "aio_flush",
        "read -q -P 9 0 64k",
        "read -q -P 9 512k 4k",
        "read -q -P 0 600k 64k",
        "map",
    ];
    for backend in ["threads", "io_uring"] {
        same(&["-C", "-i", backend], &script, true);
    }
}

#[test]
fn copy_on_read_over_chains_copies_what_qemu_io_copies() {
    let reads = ["read 0 1000k"];
    let pieces = [
        "read 33k 1k",
        "read 131k 30k",
        "read 250k 300k",
        "read 997k 3k",
    ];
    for opts in [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=4k",
        "extended_l2=on",
        "extended_l2=on,cluster_size=128k",
    ] {
        let chain = |dir: &Path| make_chain(dir, opts);
        same_on(&chain, &["-C"], &reads, true);
        same_on(&chain, &["-C"], &pieces, true);
    }
}

#[test]
fn compressed_writes_match_qemu_io() {
    same(
        &[],
        &[
            "write -c -P 9 0 64k",
            "write -c 64k 4k",
            "write -c 256k 64k",
            "map",
        ],
        true,
    );
}
