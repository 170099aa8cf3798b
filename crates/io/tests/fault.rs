//! What only the fault injector does: failing, holding and reordering requests, and the log.

use blockio::{
    Backend, FaultInjector, FaultRule, IoBuf, Keep, MemoryBackend, OpKind, RequestFilter, TokioFile,
};
use common::witness;
use futures::FutureExt;
use std::sync::atomic::Ordering;

mod common;

async fn write<B: Backend>(b: &B, offset: u64, data: &[u8]) -> std::io::Result<()> {
    b.write_at(IoBuf::from_slice(data), offset).await.0
}

#[tokio::test]
async fn failing_rule_returns_errno_and_skips_the_backend() {
    let mem = MemoryBackend::new();
    let f = FaultInjector::new(mem.clone());
    let ctl = f.controller();
    // Let the first write in [100, 200) through, fail the next one, then pass again.
    ctl.add_rule(
        FaultRule::new(libc::ENOSPC)
            .op(OpKind::Write)
            .range(100..200)
            .nth(1)
            .times(1),
    );
    write(&f, 150, b"a").await.unwrap();
    write(&f, 0, b"outside").await.unwrap();
    let e = write(&f, 199, b"bb").await.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(
        mem.len().await.unwrap(),
        151,
        "the failed write reached the backend"
    );
    write(&f, 199, b"cc").await.unwrap();
    assert_eq!(mem.snapshot()[199..], *b"cc");

    ctl.add_rule(FaultRule::new(libc::EIO).op(OpKind::Flush));
    assert_eq!(f.flush().await.unwrap_err().raw_os_error(), Some(libc::EIO));
    let log = ctl.log();
    assert_eq!(log.len(), 5);
    assert!(log[2].injected && log[2].error == Some(libc::ENOSPC));
    assert!(log[4].injected && log[4].info.op == OpKind::Flush);
    ctl.clear_rules();
    f.flush().await.unwrap();
}

#[tokio::test]
async fn held_writes_released_in_reverse_order_keep_the_first() {
    let mem = MemoryBackend::new();
    let f = FaultInjector::new(mem.clone());
    let ctl = f.controller();
    ctl.hold(RequestFilter::op(OpKind::Write).in_range(0..10));
    let script = async {
        let first = ctl.next_held().await;
        let second = ctl.next_held().await;
        assert_eq!(ctl.held_count(), 2);
        assert!(first.info().id < second.info().id);
        assert_eq!(
            (first.info().op, first.info().offset, first.info().len),
            (OpKind::Write, 0, 4)
        );
        second.release_and_wait().await;
        assert_eq!(mem.snapshot(), b"BBBB");
        first.release_and_wait().await;
        assert_eq!(ctl.held_count(), 0);
    };
    let (a, b, ()) = tokio::join!(write(&f, 0, b"AAAA"), write(&f, 0, b"BBBB"), script);
    a.unwrap();
    b.unwrap();
    assert_eq!(
        mem.snapshot(),
        b"AAAA",
        "the first write, completed last, must win"
    );
    let log = ctl.log();
    assert_eq!(log[0].data.as_deref(), Some(&b"BBBB"[..]));
    assert_eq!(log[1].data.as_deref(), Some(&b"AAAA"[..]));
}

#[tokio::test]
async fn held_requests_fail_release_all_and_cancel() {
    let f = FaultInjector::new(MemoryBackend::new());
    let ctl = f.controller();
    ctl.hold_all();
    // Reads are held too; a held request can be failed.
    let script = async {
        ctl.next_held().await.fail(libc::EROFS);
    };
    let ((r, _), ()) = tokio::join!(f.read_at(IoBuf::new(1), 0), script);
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));

    // release_all frees held requests, even ones already picked.
    let script = async {
        let _picked = ctl.next_held().await;
        // join! polled both requests before this script: both are held.
        assert_eq!(ctl.held_count(), 2);
        ctl.stop_holding();
        ctl.release_all();
    };
    let (a, b, ()) = tokio::join!(f.set_len(10), f.punch_hole(0, 5, Keep::none()), script);
    a.unwrap();
    b.unwrap();
    assert_eq!(f.len().await.unwrap(), 10);

    // A held request whose future is dropped stays held, as an orphan; failed, it is gone.
    ctl.hold_all();
    assert!(f.flush().now_or_never().is_none());
    assert_eq!(ctl.held_count(), 1);
    let orphan = ctl.try_next_held().unwrap();
    assert!(orphan.is_orphan());
    orphan.fail(libc::EIO);
    assert_eq!(ctl.held_count(), 0);
    // Its failure counts, although nobody saw it.
    assert_eq!(f.flush_failures(), 1);
    // Dropping a picked request undecided releases it.
    let (r, ()) = tokio::join!(f.flush(), async { drop(ctl.next_held().await) });
    r.unwrap();
}

/// The kernel's semantics: a request dropped while held still reaches the file once
/// released, run by the orphan driver, and what it keeps lives until then.
#[tokio::test]
async fn a_dropped_held_request_completes_when_released() {
    let mem = MemoryBackend::new();
    let f = FaultInjector::new(mem.clone());
    let ctl = f.controller();
    tokio::spawn(f.orphan_driver());
    ctl.hold_all();
    let (keep, dropped) = witness();
    let mut buf = IoBuf::from_slice(b"late");
    buf.attach(keep);
    assert!(f.write_at(buf, 2).now_or_never().is_none());
    let (punch_keep, punch_dropped) = witness();
    assert!(f.punch_hole(0, 1, punch_keep).now_or_never().is_none());
    // Both futures are gone; both requests are held, and keep what they carry.
    let (write, punch) = (ctl.next_held().await, ctl.next_held().await);
    assert!(write.is_orphan() && punch.is_orphan());
    assert!(!dropped.load(Ordering::SeqCst) && !punch_dropped.load(Ordering::SeqCst));
    assert!(mem.snapshot().is_empty());
    write.release_and_wait().await;
    assert_eq!(mem.snapshot(), b"\0\0late");
    assert!(
        dropped.load(Ordering::SeqCst),
        "the keep outlived its request"
    );
    assert!(!punch_dropped.load(Ordering::SeqCst));
    punch.release_and_wait().await;
    assert!(punch_dropped.load(Ordering::SeqCst));
    // Both are in the log, in completion order.
    let ops: Vec<_> = ctl.log().iter().map(|e| e.info.op).collect();
    assert_eq!(ops, [OpKind::Write, OpKind::PunchHole]);
}

/// An orphan decided before its future noticed the decision goes where the decision says.
#[tokio::test]
async fn a_request_dropped_after_its_release_still_runs() {
    let mem = MemoryBackend::new();
    let f = FaultInjector::new(mem.clone());
    let ctl = f.controller();
    tokio::spawn(f.orphan_driver());
    ctl.hold_all();
    let mut fut = Box::pin(write(&f, 0, b"x"));
    assert!((&mut fut).now_or_never().is_none());
    ctl.next_held().await.release();
    drop(fut);
    while mem.snapshot().is_empty() {
        tokio::task::yield_now().await;
    }
    assert_eq!(ctl.orphans_waiting(), 0);
}

#[tokio::test]
#[should_panic(expected = "no orphan driver runs")]
async fn releasing_an_orphan_without_a_driver_panics() {
    let f = FaultInjector::new(MemoryBackend::new());
    let ctl = f.controller();
    ctl.hold_all();
    assert!(f.flush().now_or_never().is_none());
    ctl.next_held().await.release();
}

#[tokio::test]
async fn log_records_writes_and_flush_boundaries() {
    let f = FaultInjector::new(MemoryBackend::new());
    let ctl = f.controller();
    write(&f, 0, b"one").await.unwrap();
    f.flush().await.unwrap();
    write(&f, 3, b"two").await.unwrap();
    f.write_zeroes(6, 4, Keep::none()).await.unwrap();
    let (r, _) = f.read_at(IoBuf::new(4), 0).await;
    r.unwrap();
    let log = ctl.log();
    let ops: Vec<_> = log
        .iter()
        .map(|e| (e.info.op, e.info.offset, e.info.len))
        .collect();
    use OpKind::*;
    assert_eq!(
        ops,
        [
            (Write, 0, 3),
            (Flush, 0, 0),
            (Write, 3, 3),
            (WriteZeroes, 6, 4),
            (Read, 0, 4)
        ]
    );
    assert_eq!(log[0].data.as_deref(), Some(&b"one"[..]));
    assert_eq!(log[2].data.as_deref(), Some(&b"two"[..]));
    assert!(log[1].data.is_none() && log.iter().all(|e| e.is_ok()));
    // The flush was issued after the first write completed: that write is durable.
    assert_eq!((log[1].seq, log[1].issued_after), (1, 1));
    assert_eq!(ctl.completed(), 5);
    ctl.clear_log();
    assert!(ctl.log().is_empty());
}

/// Holding works across threads: the request runs on a worker of a multi-thread runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_on_a_multi_thread_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let opts = blockio::OpenOptions {
        create: true,
        ..Default::default()
    };
    let f = FaultInjector::new(TokioFile::open(dir.path().join("f"), opts).await.unwrap());
    let ctl = f.controller();
    ctl.hold(RequestFilter::op(OpKind::Write));
    let g = f.clone();
    let task = tokio::spawn(async move { write(&g, 0, b"xyz").await });
    let held = ctl.next_held().await;
    assert_eq!(held.info().len, 3);
    assert_eq!(f.len().await.unwrap(), 0);
    held.release();
    task.await.unwrap().unwrap();
    assert_eq!(f.len().await.unwrap(), 3);
}

/// The injector's waiting works on tokio-uring's runtime too.
#[test]
fn hold_on_tokio_uring() {
    let dir = tempfile::tempdir().unwrap();
    blockio::uring_builder().start(async {
        let opts = blockio::OpenOptions {
            create: true,
            ..Default::default()
        };
        let file = blockio::UringFile::open(dir.path().join("f"), opts);
        let f = FaultInjector::new(file.await.unwrap());
        let ctl = f.controller();
        ctl.hold(RequestFilter::op(OpKind::Write));
        let script = async {
            let (a, b) = (ctl.next_held().await, ctl.next_held().await);
            b.release_and_wait().await;
            a.release();
        };
        let (a, b, ()) = tokio::join!(write(&f, 0, b"1"), write(&f, 0, b"2"), script);
        a.unwrap();
        b.unwrap();
        let (r, buf) = f.read_at(IoBuf::new(1), 0).await;
        assert_eq!((r.unwrap(), &buf[..]), (1, &b"1"[..]));
    });
}

/// A `FaultOpener` numbers files by path; rules and crash images can pick one file.
#[tokio::test]
async fn opener_numbers_files_and_rules_pick_one() {
    use blockio::{CrashSpec, FaultOpener, MemoryOpener, OpenOptions, Opener};
    let mem = MemoryOpener::new();
    mem.insert("/a", MemoryBackend::from_vec(b"aaaa".to_vec()));
    mem.insert("/b", MemoryBackend::from_vec(b"bbbb".to_vec()));
    let opener = FaultOpener::new(mem.clone());
    let ctl = opener.controller();
    let rw = OpenOptions {
        write: true,
        ..Default::default()
    };
    let a = opener.open("/a".as_ref(), rw).await.unwrap();
    let b = opener.open("/b".as_ref(), rw).await.unwrap();
    let a2 = opener.open("/a".as_ref(), rw).await.unwrap();
    assert_eq!((a.file(), b.file(), a2.file()), (0, 1, 0));
    assert_eq!(ctl.file_id("/b"), Some(1));
    ctl.add_rule(FaultRule::new(libc::EIO).op(OpKind::Write).file(1));
    write(&a, 0, b"A").await.unwrap();
    assert_eq!(
        write(&b, 0, b"B").await.unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    ctl.clear_rules();
    write(&b, 1, b"B").await.unwrap();
    b.flush().await.unwrap();
    // b's flush made b's write durable, not a's.
    let a_img = ctl.crash(b"aaaa", &CrashSpec::new(0).survival_percent(0));
    assert_eq!(a_img.bytes, b"aaaa");
    let b_img = ctl.crash(b"bbbb", &CrashSpec::new(0).survival_percent(0).file(1));
    assert_eq!(b_img.bytes, b"bBbb");
}
