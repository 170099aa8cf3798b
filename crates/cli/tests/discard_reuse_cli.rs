//! Clusters freed by a discard (or an unmapping write-zeroes) are reused by later writes of
//! the same session, as QEMU reuses them, instead of new clusters at the end of the file:
//! the same qemu-io commands run by qemu-io and by `qimg io` on two copies must leave our
//! file no longer than QEMU's, the same contents, and a clean check (no leak).

use qcow2_tests::{path_str, qemu_img, qemu_io};
use std::process::Command;

#[test]
fn freed_clusters_are_reused_before_the_file_grows() {
    let dir = tempfile::tempdir().unwrap();
    for (i, cmds) in [
        &["write 0 1M", "discard 0 1M", "write 1M 1M"][..],
        &["write 0 256k", "write -z -u 0 256k", "write 1M 256k"],
        &["write 0 4M", "discard 1M 2M", "write 8M 1M", "write 4M 2M"],
        &["write 0 2M", "discard 0 2M", "write 0 512", "write 3M 1M"],
    ]
    .into_iter()
    .enumerate()
    {
        let theirs = dir.path().join(format!("{i}.qemu.qcow2"));
        let ours = dir.path().join(format!("{i}.qimg.qcow2"));
        for p in [&theirs, &ours] {
            qemu_img(&["create", "-q", "-f", "qcow2", path_str(p), "64M"]);
        }
        qemu_io("qcow2", &theirs, cmds);
        let mut qimg = Command::new(env!("CARGO_BIN_EXE_qimg"));
        qimg.args(["io", "-f", "qcow2"]);
        for c in cmds {
            qimg.args(["-c", c]);
        }
        let out = qimg.arg(&ours).output().expect("run qimg");
        assert!(out.status.success(), "{cmds:?}: {out:?}");
        qemu_img(&["compare", path_str(&theirs), path_str(&ours)]);
        qemu_img(&["check", path_str(&ours)]);
        let len = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
        assert!(
            len(&ours) <= len(&theirs),
            "{cmds:?}: our file has {} bytes, QEMU's {}",
            len(&ours),
            len(&theirs)
        );
    }
}
