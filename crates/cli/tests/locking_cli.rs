//! qimg's commands lock images as qemu-img does (I10): with a qemu-io writing an image,
//! `info`, `map`, `check`, `compare`, `convert` and `io` are refused with qemu-img's message,
//! and `-U` (force share) lets the read-only ones through; `check -r -U` is refused.

use qcow2_tests::{path_str, qemu_img, QemuIoHolder};
use std::process::{Command, Output};

fn qimg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qimg"))
        .args(args)
        .output()
        .expect("run qimg")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn commands_respect_a_writers_lock_and_force_share_gets_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let p = path_str(&img);
    qemu_img(&["create", "-q", "-f", "qcow2", p, "1M"]);
    let out = dir.path().join("out.raw");
    let o = path_str(&out);
    let _writer = QemuIoHolder::new(&["-f", "qcow2"], &img);

    let refused = |args: &[&str], message: &str| {
        let r = qimg(args);
        assert!(!r.status.success(), "qimg {args:?} opened a locked image");
        let e = stderr(&r);
        assert!(e.contains(message), "qimg {args:?}: {e}");
    };
    let shared_write = format!(
        "Could not open '{p}': Failed to get shared \"write\" lock\nIs another process using \
         the image [{p}]?"
    );
    refused(&["info", p], &shared_write);
    refused(&["map", p], &shared_write);
    refused(&["check", p], &shared_write);
    refused(&["compare", p, p], &shared_write);
    refused(&["convert", "-O", "raw", p, o], &shared_write);
    refused(
        &["io", "-c", "write 0 512", p],
        "Failed to get \"write\" lock",
    );
    refused(
        &["check", "-r", "all", "-U", p],
        "force-share=on can only be used with read-only images",
    );

    for args in [
        &["info", "-U", p][..],
        &["map", "-U", p],
        &["check", "-U", p],
        &["compare", "-U", p, p],
        &["convert", "-U", "-O", "raw", p, o],
        &["io", "-r", "-U", "-c", "read 0 512", p],
    ] {
        let r = qimg(args);
        assert!(r.status.success(), "qimg {args:?}: {}", stderr(&r));
    }
}
