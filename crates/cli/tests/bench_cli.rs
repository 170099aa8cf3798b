//! `qimg bench --queues N`: N threads share one image and split the request stream. The
//! writes must land where `qemu-img bench` (one queue; it has no `--queues`) puts them with
//! the same options: `qemu-img compare` says identical and `qemu-img check` finds our image
//! clean.

use qcow2_tests::{path_str, qemu_check, qemu_img, qemu_img_status};
use std::path::Path;
use std::process::Command;

/// Runs the same write benchmark through `qemu-img bench` and, with `queues`, through
/// `qimg bench`, each on a fresh image in `dir`; then compares as the module says.
fn same_writes_as_qemu(dir: &Path, opts: &[&str], queues: &[&str]) {
    let (ours, theirs) = (dir.join("ours.qcow2"), dir.join("theirs.qcow2"));
    for p in [&ours, &theirs] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            path_str(p),
            "8M",
        ]);
    }
    let mut args = vec!["bench", "-w", "-c", "3000"];
    args.extend_from_slice(opts);
    let o = qemu_img_status(&[&args[..], &[path_str(&theirs)]].concat());
    assert!(o.status.success(), "qemu-img bench: {o:?}");
    let o = Command::new(env!("CARGO_BIN_EXE_qimg"))
        .args(&args)
        .args(queues)
        .arg(&ours)
        .output()
        .unwrap();
    assert!(o.status.success(), "qimg bench {queues:?}: {o:?}");
    let sending = String::from_utf8_lossy(&o.stdout);
    assert!(
        sending.starts_with("Sending 3000 write requests"),
        "{sending}"
    );
    let o = qemu_img_status(&["compare", path_str(&ours), path_str(&theirs)]);
    assert!(o.status.success(), "qemu-img compare: {o:?}");
    let o = qemu_check(&ours);
    assert!(o.status.success(), "qemu-img check: {o:?}");
}

#[test]
fn queues_on_rings_write_what_qemu_writes() {
    let dir = tempfile::tempdir().unwrap();
    same_writes_as_qemu(
        dir.path(),
        &[
            "-d",
            "7",
            "-s",
            "1k",
            "-S",
            "2560",
            "--pattern",
            "171",
            "--flush-interval",
            "100",
        ],
        &["-i", "io_uring", "--queues", "3"],
    );
}

#[test]
fn queues_on_rings_with_o_direct_write_what_qemu_writes() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    same_writes_as_qemu(
        dir.path(),
        &[
            "-d",
            "16",
            "-s",
            "4k",
            "-S",
            "4k",
            "-t",
            "none",
            "--pattern",
            "5",
        ],
        &["-i", "io_uring", "--queues", "4"],
    );
}

#[test]
fn queues_on_threads_write_what_qemu_writes() {
    let dir = tempfile::tempdir().unwrap();
    same_writes_as_qemu(
        dir.path(),
        &[
            "-d",
            "5",
            "-s",
            "1k",
            "-S",
            "2560",
            "--pattern",
            "9",
            "--flush-interval",
            "64",
            "--no-drain",
        ],
        &["-i", "threads", "--queues", "2"],
    );
}
