//! A tokio runtime shut down while [`RingFile`] requests are in the kernel. The contract:
//!
//! - what a request lends the kernel (its buffer, its [`Keep`], its file) is not freed before
//!   the kernel completes the request: never a use-after-free;
//! - nothing waits forever for a request nobody waits for: a ring whose runtime is gone
//!   cancels what is still in its kernel when it closes (with its thread, or when the thread
//!   next sets up a ring), and frees it once the kernel has completed the cancellation;
//! - the thread then works in a new runtime, with a fresh ring.
//!
//! A read of a FIFO with nothing written stays in the kernel until the test writes to it:
//! "in the kernel" without sleeps. Each request's keep records when it is dropped. The
//! waits that would hang run under a watchdog, which fails the test rather than hanging it.
//!
//! Built with `--cfg qcow2_no_keep` a keep holds nothing, so every test here must then fail
//! (scripts/must-fail.sh checks it).

use blockio::{Backend, IoBuf, Keep, OpenOptions, RingFile};
use common::witness;
use std::ffi::CString;
use std::future::Future;
use std::io::Read as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

mod common;

/// A FIFO in `dir`.
fn fifo(dir: &Path) -> PathBuf {
    let path = dir.join("fifo");
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    path
}

/// Read and write (so that opening the FIFO waits for no writer).
fn rw(create: bool) -> OpenOptions {
    OpenOptions {
        write: true,
        create,
        ..Default::default()
    }
}

const DATA: &[u8] = b"late";

type Read = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A read of `fifo` carrying `keep`, polled once: its ring is idle, so it goes to the kernel
/// at once, where it waits for data. The future goes back, to hold or drop.
async fn read_in_the_kernel(fifo: &RingFile, keep: Keep) -> Read {
    let f = fifo.clone();
    let mut buf = IoBuf::new(DATA.len());
    buf.attach(keep);
    let mut read: Read = Box::pin(async move {
        let (r, b) = f.read_at(buf, 0).await;
        assert_eq!(r.unwrap(), DATA.len());
        assert_eq!(&b[..], DATA);
    });
    assert!(futures::poll!(read.as_mut()).is_pending(), "a FIFO read");
    read
}

/// The thread's ring, fresh in a new runtime: a write and a read of a regular file.
fn use_a_new_runtime(dir: &Path) {
    let rt = current_thread();
    rt.block_on(async {
        let f = RingFile::open(dir.join("file"), rw(true)).await.unwrap();
        f.write_at(IoBuf::from_slice(b"fresh"), 0).await.0.unwrap();
        let (n, b) = f.read_at(IoBuf::new(5), 0).await;
        assert_eq!(n.unwrap(), 5);
        assert_eq!(&b[..], b"fresh");
    });
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `f` on a thread of its own; fails if it has not returned within a minute (it hangs).
fn without_hanging(f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => t.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(t.join().expect_err("it did not finish"))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("hangs"),
    }
}

/// In a current-thread runtime, a read of a new FIFO in `dir` goes to the kernel; `leave`
/// gets its future (to drop, or to hand to a task), and the runtime shuts down. The read's
/// keep must still be there. Returns the FIFO and the keep's flag.
fn shut_down_with_a_read_in_the_kernel(
    dir: &Path,
    leave: impl FnOnce(Read),
) -> (PathBuf, Arc<AtomicBool>) {
    let path = fifo(dir);
    let (keep, dropped) = witness();
    let rt = current_thread();
    rt.block_on(async {
        let f = RingFile::open(&path, rw(false)).await.unwrap();
        leave(read_in_the_kernel(&f, keep).await);
    });
    drop(rt);
    assert!(
        !dropped.load(Ordering::SeqCst),
        "the keep of a read in the kernel went with its runtime"
    );
    (path, dropped)
}

/// A current-thread runtime shuts down with a task whose read is in the kernel: the read's
/// buffer and keep stay until the kernel completes it (here, when data comes), and go
/// when the thread sets up a ring again, in a new runtime.
#[test]
fn a_read_in_the_kernel_outlives_its_runtime() {
    without_hanging(|| {
        let dir = tempfile::tempdir().unwrap();
        let (path, dropped) = shut_down_with_a_read_in_the_kernel(dir.path(), |read| {
            tokio::spawn(read);
        });
        // The data comes: the kernel completes the read into its buffer.
        std::fs::write(&path, DATA).unwrap();
        use_a_new_runtime(dir.path());
        assert!(dropped.load(Ordering::SeqCst), "the keep outlived its read");
    });
}

/// A read that would never complete (nothing is written to the FIFO) does not make the
/// thread's next runtime wait for it: its old ring cancels it, then frees its buffer and keep.
#[test]
fn a_new_runtime_does_not_wait_for_a_read_of_the_old_one() {
    without_hanging(|| {
        let dir = tempfile::tempdir().unwrap();
        // Its future dropped rather than left to a task: it stays in the kernel all the same.
        let (path, dropped) = shut_down_with_a_read_in_the_kernel(dir.path(), drop);
        use_a_new_runtime(dir.path());
        assert!(
            dropped.load(Ordering::SeqCst),
            "the cancelled read kept its keep"
        );
        // Out of the kernel, not merely forgotten: it takes nothing written now.
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        std::fs::write(&path, DATA).unwrap();
        let mut got = [0u8; DATA.len()];
        assert_eq!(reader.read(&mut got).unwrap(), DATA.len());
        assert_eq!(got, DATA, "the cancelled read still waits in the kernel");
    });
}

/// A multi-thread runtime shuts down while a task of a worker has a read in the kernel that
/// would never complete: the shutdown does not hang (the worker's ring cancels the read as
/// the worker exits), and the keep goes only then.
#[test]
fn a_multi_thread_runtime_shuts_down_with_a_read_in_the_kernel() {
    without_hanging(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path());
        let (keep, dropped) = witness();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let f = rt.block_on(RingFile::open(&path, rw(false))).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        rt.spawn(async move {
            let read = read_in_the_kernel(&f, keep).await;
            tx.send(()).unwrap();
            read.await;
        });
        rt.block_on(rx).unwrap();
        assert!(
            !dropped.load(Ordering::SeqCst),
            "the keep of a read in the kernel went early"
        );
        drop(rt);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the read's keep outlived the runtime and its workers"
        );
    });
}
