//! Image locking (invariant I10) against the real QEMU: a `qemu-io` holding an image open
//! (it reads a sector, says so, then sleeps) and the engine exclude each other's writes
//! both ways, read-only opens coexist, `-U` (force share) gets past a writer, and the
//! backing and data files are locked as QEMU locks them. Two engine opens in one process
//! exclude each other too (OFD locks belong to the open, not the process).

use blockio::{FileOpener, LockConflict, Locking};
use qcow2_engine::{create, CreateOptions, Error, Image, ImageOptions};
use qcow2_tests::{path_str, qemu_img, tool, QemuIoHolder as Holder};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn qemu_io_once(flags: &[&str], cmd: &str, image: &Path) -> Output {
    Command::new(tool("qemu-io"))
        .args(flags)
        .args(["-c", cmd])
        .arg(image)
        .output()
        .expect("run qemu-io (package qemu-utils)")
}

fn refused(out: &Output, message: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "QEMU opened a locked image: {err}");
    assert!(err.contains(message), "QEMU's error: {err}");
    assert!(err.contains("Is another process using the image"), "{err}");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn open(path: &Path, options: ImageOptions) -> qcow2_engine::Result<Image<FileOpener>> {
    Image::open(FileOpener, path, options).await
}

/// The lock conflict an open was refused with: (role, permission, shared).
fn conflict(r: qcow2_engine::Result<Image<FileOpener>>) -> (&'static str, &'static str, bool) {
    match r {
        Err(Error::Locked {
            role,
            conflict: LockConflict { perm, shared },
            ..
        }) => (role, perm, shared),
        Err(e) => panic!("refused, but not for a lock: {e}"),
        Ok(_) => panic!("opened an image another user has locked"),
    }
}

fn image(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[path_str(&p), "4M"]);
    qemu_img(&args);
    p
}

const RW: &[&str] = &["-f", "qcow2"];
const RO: &[&str] = &["-f", "qcow2", "-r"];
const RO_SHARED: &[&str] = &["-f", "qcow2", "-r", "-U"];

#[test]
fn qemu_writing_keeps_the_engine_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "img.qcow2", &[]);
    let _qemu = Holder::new(RW, &p);
    rt().block_on(async {
        let rw = open(&p, ImageOptions::new()).await;
        assert_eq!(conflict(rw), ("image", "write", false));
        let ro = open(&p, ImageOptions::new().read_only(true)).await;
        assert_eq!(conflict(ro), ("image", "write", true));
        let e = open(&p, ImageOptions::new().read_only(true))
            .await
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "Failed to get shared \"write\" lock\nIs another process using the image [{}]?",
                p.display()
            )
        );
        // Force share: a reader that lets the writer be.
        let shared = ImageOptions::new().read_only(true).force_share(true);
        let img = open(&p, shared).await.unwrap();
        img.read(0, 512).await.unwrap();
        // Only for read-only opens, as qemu-img says.
        let e = open(&p, ImageOptions::new().force_share(true))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::InvalidOptions(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "force-share=on can only be used with read-only images"
        );
        // Locking off: nothing is tested (the caller's risk).
        let unlocked = ImageOptions::new().read_only(true).locking(Locking::Off);
        open(&p, unlocked).await.unwrap();
    });
}

#[test]
fn qemu_reading_keeps_writers_out_but_not_readers() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "img.qcow2", &[]);
    let _qemu = Holder::new(RO, &p);
    rt().block_on(async {
        assert_eq!(
            conflict(open(&p, ImageOptions::new()).await),
            ("image", "write", false)
        );
        open(&p, ImageOptions::new().read_only(true)).await.unwrap();
    });
    drop(_qemu);
    // A sharing reader lets the engine write.
    let _qemu = Holder::new(RO_SHARED, &p);
    rt().block_on(async {
        let img = open(&p, ImageOptions::new()).await.unwrap();
        img.write(0, &[1; 512]).await.unwrap();
        img.close().await.unwrap();
    });
}

#[test]
fn the_engine_writing_keeps_qemu_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "img.qcow2", &[]);
    rt().block_on(async {
        let img = open(&p, ImageOptions::new()).await.unwrap();
        refused(
            &qemu_io_once(RW, "write 0 512", &p),
            "Failed to get \"write\" lock",
        );
        refused(
            &qemu_io_once(RO, "read 0 512", &p),
            "Failed to get shared \"write\" lock",
        );
        let info = Command::new(tool("qemu-img"))
            .args(["info", path_str(&p)])
            .output()
            .unwrap();
        refused(&info, "Failed to get shared \"write\" lock");
        let out = qemu_io_once(RO_SHARED, "read 0 512", &p);
        assert!(out.status.success(), "qemu-io -U: {out:?}");
        // A second writer in this process is refused as well, and a reader.
        assert_eq!(
            conflict(open(&p, ImageOptions::new()).await),
            ("image", "write", false)
        );
        assert_eq!(
            conflict(open(&p, ImageOptions::new().read_only(true)).await),
            ("image", "write", true)
        );
        img.close().await.unwrap();
        // Closed: QEMU gets in.
        let out = qemu_io_once(RW, "write 0 512", &p);
        assert!(out.status.success(), "{out:?}");
    });
}

#[test]
fn the_engine_reading_keeps_writers_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "img.qcow2", &[]);
    rt().block_on(async {
        let a = open(&p, ImageOptions::new().read_only(true)).await.unwrap();
        let b = open(&p, ImageOptions::new().read_only(true)).await.unwrap();
        refused(
            &qemu_io_once(RW, "write 0 512", &p),
            "Failed to get \"write\" lock",
        );
        let out = qemu_io_once(RO, "read 0 512", &p);
        assert!(out.status.success(), "two readers and QEMU's: {out:?}");
        drop((a, b));
        let out = qemu_io_once(RW, "write 0 512", &p);
        assert!(out.status.success(), "{out:?}");
    });
}

/// A backing file is locked as a read-only open: QEMU writing it keeps the engine from
/// opening an image above it; QEMU writing the image above keeps the engine from writing
/// the backing file (QEMU does not share writes to it), while reading it works.
#[test]
fn backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let base = image(dir.path(), "base.qcow2", &[]);
    let top = image(
        dir.path(),
        "top.qcow2",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    {
        let _qemu = Holder::new(RW, &base);
        rt().block_on(async {
            let r = open(&top, ImageOptions::new()).await;
            assert_eq!(conflict(r), ("backing file", "write", true));
        });
    }
    {
        let _qemu = Holder::new(RW, &top);
        rt().block_on(async {
            let r = open(&base, ImageOptions::new()).await;
            assert_eq!(conflict(r), ("image", "write", false));
            open(&base, ImageOptions::new().read_only(true))
                .await
                .unwrap();
        });
    }
    rt().block_on(async {
        let img = open(&top, ImageOptions::new()).await.unwrap();
        refused(
            &qemu_io_once(RW, "write 0 512", &base),
            "Failed to get \"write\" lock",
        );
        img.close().await.unwrap();
    });
}

/// An external data file: QEMU shares writes to it but not resizing, and so does the engine.
#[test]
fn data_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.raw");
    let p = image(
        dir.path(),
        "img.qcow2",
        &["-o", &format!("data_file={}", path_str(&data))],
    );
    rt().block_on(async {
        let img = open(&p, ImageOptions::new()).await.unwrap();
        let resize = Command::new(tool("qemu-img"))
            .args(["resize", "-f", "raw", path_str(&data), "8M"])
            .output()
            .unwrap();
        refused(&resize, "Failed to get \"resize\" lock");
        let out = qemu_io_once(&["-f", "raw"], "write 0 512", &data);
        assert!(
            out.status.success(),
            "QEMU shares writes to a data file: {out:?}"
        );
        img.close().await.unwrap();
    });
    // QEMU holding the image: the engine's open is refused on the image file already;
    // holding only the data file for resizing (a raw image open for writing does not
    // resize), it lets the engine in.
    let _qemu = Holder::new(&["-f", "raw"], &data);
    rt().block_on(async {
        let img = open(&p, ImageOptions::new()).await.unwrap();
        img.close().await.unwrap();
    });
}

/// `create` takes QEMU's creation locks before truncating: a file another open uses is
/// left alone.
#[test]
fn create_leaves_a_used_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "img.qcow2", &[]);
    let len = std::fs::metadata(&p).unwrap().len();
    let _qemu = Holder::new(RO, &p);
    rt().block_on(async {
        let e = create(&FileOpener, &p, &CreateOptions::new().size(1 << 20))
            .await
            .expect_err("create over a file in use");
        assert!(
            matches!(&e, Error::Locked { conflict, .. } if conflict.perm == "write"),
            "{e}"
        );
    });
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        len,
        "the file was truncated"
    );
}
