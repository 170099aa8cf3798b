//! One set of cases, run against every backend: memory, tokio file (cached and O_DIRECT),
//! io_uring through tokio-uring (cached and O_DIRECT), io_uring with a ring per thread
//! (cached and O_DIRECT, on multi-thread, current-thread and tokio-uring runtimes) and the
//! fault injector.
//!
//! Cached backends (alignment 1) get deliberately unaligned offsets and lengths; O_DIRECT
//! backends get multiples of their alignment. O_DIRECT files live under the target directory
//! (a disk file system): if it refuses O_DIRECT the tests fail rather than skip.

use blockio::{
    read_zero_padded, Backend, FaultInjector, FileOpener, IoBuf, Keep, MemoryBackend, MemoryOpener,
    OpenOptions, Opener, RingFile, RingOpener, TokioFile, UringFile, UringOpener,
};
use futures::future::join_all;
use std::future::Future;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `cached` bytes on a cached backend, else `units` times the alignment.
fn at<B: Backend>(b: &B, cached: u64, units: u64) -> u64 {
    match b.alignment() {
        1 => cached,
        a => units * a as u64,
    }
}

fn sz<B: Backend>(b: &B, cached: u64, units: u64) -> usize {
    at(b, cached, units) as usize
}

/// A buffer of `n` bytes filled with `fill`, aligned for the backend.
fn buf<B: Backend>(b: &B, n: usize, fill: u8) -> IoBuf {
    let mut buf = IoBuf::with_alignment(n, b.alignment().max(blockio::DEFAULT_ALIGN));
    buf.fill(fill);
    buf
}

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
}

async fn write<B: Backend>(b: &B, offset: u64, data: &[u8]) {
    let mut w = buf(b, data.len(), 0);
    w.copy_from_slice(data);
    let (r, _) = b.write_at(w, offset).await;
    r.unwrap_or_else(|e| panic!("write {} at {offset}: {e}", data.len()));
}

async fn read<B: Backend>(b: &B, offset: u64, n: usize) -> Vec<u8> {
    let (r, out) = b.read_at(buf(b, n, 0xee), offset).await;
    assert_eq!(r.unwrap(), n, "short read of {n} at {offset}");
    out.to_vec()
}

/// Runs every case, each on a fresh empty backend from `make`.
async fn suite<B, F, Fut>(name: &str, mut make: F)
where
    B: Backend,
    F: FnMut() -> Fut,
    Fut: Future<Output = B>,
{
    macro_rules! cases {
        ($($case:ident),*) => {$(
            eprintln!("{name}: {}", stringify!($case));
            $case(make().await).await;
        )*};
    }
    cases!(
        write_read_back,
        read_past_eof,
        zero_padded,
        windowed,
        punch_hole,
        write_zeroes,
        set_len,
        flush,
        concurrent
    );
}

async fn write_read_back<B: Backend>(b: B) {
    assert!(b.is_writable());
    let (o1, l1) = (at(&b, 3, 0), sz(&b, 5000, 2));
    let (o2, l2) = (at(&b, 4099, 1), sz(&b, 1234, 2));
    let mut model = vec![0u8; (o2 as usize + l2).max(o1 as usize + l1)];
    let (p1, p2) = (pattern(1, l1), pattern(2, l2));
    write(&b, o1, &p1).await;
    write(&b, o2, &p2).await;
    model[o1 as usize..][..l1].copy_from_slice(&p1);
    model[o2 as usize..][..l2].copy_from_slice(&p2);
    assert_eq!(b.len().await.unwrap(), model.len() as u64);
    assert_eq!(read(&b, 0, model.len()).await, model);
    let (o3, l3) = (at(&b, 777, 1), sz(&b, 3001, 1));
    assert_eq!(read(&b, o3, l3).await, model[o3 as usize..][..l3]);
}

async fn read_past_eof<B: Backend>(b: B) {
    let len = sz(&b, 1000, 2);
    write(&b, 0, &pattern(3, len)).await;
    let (off, n) = (at(&b, 700, 1), sz(&b, 600, 2));
    let (r, out) = b.read_at(buf(&b, n, 0xee), off).await;
    let got = r.unwrap();
    assert_eq!(got, len - off as usize);
    assert_eq!(out[..got], pattern(3, len)[off as usize..]);
    // Cached: untouched. O_DIRECT: zeroed (the device may have written whole blocks).
    let rest = if b.alignment() == 1 { 0xee } else { 0 };
    assert!(
        out[got..].iter().all(|&x| x == rest),
        "rest of the window after a short read"
    );
    let (r, _) = b.read_at(buf(&b, n, 0), at(&b, 5000, 4)).await;
    assert_eq!(r.unwrap(), 0);
}

async fn zero_padded<B: Backend>(b: B) {
    let len = sz(&b, 100, 1);
    write(&b, 0, &pattern(4, len)).await;
    let n = sz(&b, 300, 3);
    let (r, out) = read_zero_padded(&b, buf(&b, n, 0xee), 0).await;
    r.unwrap();
    assert_eq!(out[..len], pattern(4, len));
    assert!(out[len..].iter().all(|&x| x == 0));
}

async fn windowed<B: Backend>(b: B) {
    let u = sz(&b, 100, 1);
    let mut w = buf(&b, 4 * u, 0x11);
    w.set_window(u..3 * u);
    w.copy_from_slice(&pattern(5, 2 * u));
    let (r, w) = b.write_at(w, 0).await;
    r.unwrap();
    assert_eq!(w.window(), u..3 * u, "write changed the window");
    assert_eq!(b.len().await.unwrap(), 2 * u as u64);
    let mut rb = buf(&b, 4 * u, 0xee);
    rb.set_window(2 * u..4 * u);
    let (r, mut rb) = b.read_at(rb, 0).await;
    assert_eq!(r.unwrap(), 2 * u);
    assert_eq!(rb.window(), 2 * u..4 * u, "read changed the window");
    assert_eq!(rb[..], pattern(5, 2 * u));
    rb.reset_window();
    assert!(
        rb[..2 * u].iter().all(|&x| x == 0xee),
        "read outside the window"
    );
}

async fn punch_hole<B: Backend>(b: B) {
    let len = sz(&b, 10_000, 4);
    write(&b, 0, &[0xaa; 1].repeat(len)).await;
    let (off, n) = (at(&b, 1000, 1), at(&b, 2345, 2));
    b.punch_hole(off, n, Keep::none()).await.unwrap();
    b.punch_hole(at(&b, 9000, 3), at(&b, 5000, 4), Keep::none())
        .await
        .unwrap();
    assert_eq!(
        b.len().await.unwrap(),
        len as u64,
        "punch_hole changed the length"
    );
    let data = read(&b, 0, len).await;
    for (i, &x) in data.iter().enumerate() {
        let hole = (off..off + n).contains(&(i as u64)) || i as u64 >= at(&b, 9000, 3);
        assert_eq!(x, if hole { 0 } else { 0xaa }, "byte {i}");
    }
}

async fn write_zeroes<B: Backend>(b: B) {
    let len = sz(&b, 10_000, 4);
    write(&b, 0, &[0xbb; 1].repeat(len)).await;
    let (off, n) = (at(&b, 1001, 1), at(&b, 999, 1));
    b.write_zeroes(off, n, Keep::none()).await.unwrap();
    assert_eq!(b.len().await.unwrap(), len as u64);
    let (off2, n2) = (at(&b, 9500, 3), at(&b, 20_000, 3));
    b.write_zeroes(off2, n2, Keep::none()).await.unwrap();
    assert_eq!(
        b.len().await.unwrap(),
        off2 + n2,
        "write_zeroes past EOF must extend"
    );
    let data = read(&b, 0, (off2 + n2) as usize).await;
    for (i, &x) in data.iter().enumerate() {
        let i = i as u64;
        let zero = (off..off + n).contains(&i) || i >= off2;
        assert_eq!(x, if zero { 0 } else { 0xbb }, "byte {i}");
    }
}

async fn set_len<B: Backend>(b: B) {
    let len = sz(&b, 5000, 4);
    write(&b, 0, &pattern(6, len)).await;
    let short = at(&b, 1234, 2);
    b.set_len(short).await.unwrap();
    assert_eq!(b.len().await.unwrap(), short);
    let long = at(&b, 9999, 5);
    b.set_len(long).await.unwrap();
    assert_eq!(b.len().await.unwrap(), long);
    let data = read(&b, 0, long as usize).await;
    assert_eq!(data[..short as usize], pattern(6, len)[..short as usize]);
    assert!(data[short as usize..].iter().all(|&x| x == 0));
}

async fn flush<B: Backend>(b: B) {
    write(&b, 0, &pattern(7, sz(&b, 10, 1))).await;
    b.flush().await.unwrap();
    b.flush().await.unwrap();
}

async fn concurrent<B: Backend>(b: B) {
    let n = sz(&b, 3000, 1);
    let off = |i: usize| i as u64 * at(&b, 3001, 1);
    let data: Vec<_> = (0..16).map(|i| pattern(i as u8, n)).collect();
    join_all(data.iter().enumerate().map(|(i, d)| write(&b, off(i), d))).await;
    let reads = join_all((0..16).map(|i| read(&b, off(i), n))).await;
    for (i, data) in reads.into_iter().enumerate() {
        assert_eq!(data, pattern(i as u8, n), "request {i}");
    }
}

/// Open behaviour shared by every opener: create, read-only, missing, truncate.
async fn opener_cases<O: Opener>(o: O, dir: &Path) {
    let p = dir.join("opened");
    let rw = OpenOptions {
        write: true,
        ..Default::default()
    };
    let err = o.open(&p, rw).await.err().expect("opening a missing file");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let create = OpenOptions {
        create: true,
        ..Default::default()
    };
    let f = o.open(&p, create).await.unwrap();
    assert!(f.is_writable());
    write(&f, 0, b"hello").await;
    let ro = o.open(&p, OpenOptions::default()).await.unwrap();
    assert!(!ro.is_writable());
    assert_eq!(read(&ro, 0, 5).await, b"hello");
    let (r, _) = ro.write_at(IoBuf::from_slice(b"x"), 0).await;
    assert!(r.is_err(), "write through a read-only open");
    let trunc = OpenOptions {
        truncate: true,
        ..Default::default()
    };
    let t = o.open(&p, trunc).await.unwrap();
    assert_eq!(t.len().await.unwrap(), 0);
}

/// The file's contents, read without the backend (as a keep's drop can).
type Contents = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// Sends the file's contents when dropped: a keep that tells when it died and what the
/// file held then.
struct Witness {
    contents: Contents,
    tx: Option<tokio::sync::oneshot::Sender<Vec<u8>>>,
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.tx.take().expect("once").send((self.contents)());
    }
}

fn witness(contents: &Contents) -> (Keep, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let w = Witness {
        contents: contents.clone(),
        tx: Some(tx),
    };
    (Keep::new(w), rx)
}

/// Polls `fut` once (the backend accepts the operation) and drops it.
async fn start_and_drop<F: Future>(fut: F) {
    let mut fut = std::pin::pin!(fut);
    let _ = futures::poll!(fut.as_mut());
}

/// An operation whose future is dropped after the backend accepted it still completes, and
/// its keep dies only after the change is in the file.
async fn dropped_operations_finish<B: Backend>(b: B, contents: Contents) {
    let n = sz(&b, 5000, 2);
    write(&b, 0, &vec![0x11; n]).await;
    let (keep, seen) = witness(&contents);
    let mut w = buf(&b, n, 0x22);
    w.attach(keep);
    start_and_drop(b.write_at(w, 0)).await;
    let file = seen.await.unwrap();
    assert!(
        file[..n].iter().all(|&x| x == 0x22),
        "the keep died before the write"
    );

    let (keep, seen) = witness(&contents);
    start_and_drop(b.punch_hole(0, at(&b, 1000, 1), keep)).await;
    let file = seen.await.unwrap();
    assert!(
        file[..sz(&b, 1000, 1)].iter().all(|&x| x == 0),
        "the keep died before the punch"
    );

    let (keep, seen) = witness(&contents);
    let end = at(&b, 7000, 3);
    start_and_drop(b.write_zeroes(at(&b, 3000, 1), end - at(&b, 3000, 1), keep)).await;
    let file = seen.await.unwrap();
    assert_eq!(file.len() as u64, end.max(n as u64));
    assert!(file[sz(&b, 3000, 1)..].iter().all(|&x| x == 0));

    let (keep, seen) = witness(&contents);
    start_and_drop(b.preallocate(end + 100_000, keep)).await;
    assert!(seen.await.unwrap().len() as u64 >= end + 100_000);
}

fn file_contents(path: PathBuf) -> Contents {
    Arc::new(move || std::fs::read(&path).unwrap())
}

/// Makes fresh file paths in a directory.
fn paths(dir: &Path) -> impl FnMut() -> PathBuf + '_ {
    let mut n = 0;
    move || {
        n += 1;
        dir.join(format!("f{n}"))
    }
}

fn new_file(direct: bool) -> OpenOptions {
    OpenOptions {
        write: true,
        create: true,
        truncate: true,
        direct,
        ..Default::default()
    }
}

/// QEMU's locks (I10): a writer keeps a second writer and a non-sharing reader out, also in
/// one process; a refused open that asked to truncate leaves the file alone; closing the
/// writer lets the others in.
async fn locking_cases<O: Opener>(o: O, dir: &Path) {
    use blockio::{LockConflict, LockRequest, Perms};
    let p = dir.join("locked");
    let rw = Perms::CONSISTENT_READ | Perms::WRITE | Perms::RESIZE;
    let metadata = Perms::ALL.without(Perms::WRITE | Perms::RESIZE);
    let writer = OpenOptions {
        write: true,
        create: true,
        lock: Some(LockRequest::new(rw, metadata)),
        ..Default::default()
    };
    let w = o.open(&p, writer).await.unwrap();
    write(&w, 0, b"kept").await;
    let e = o.open(&p, writer).await.err().expect("a second writer");
    let c = LockConflict::from_io(&e).expect("a lock conflict");
    assert_eq!((c.perm, c.shared), ("write", false));
    let truncating = OpenOptions {
        truncate: true,
        ..writer
    };
    assert!(o.open(&p, truncating).await.is_err());
    assert_eq!(
        read(&w, 0, 4).await,
        b"kept",
        "a refused open truncated the file"
    );
    let reader = OpenOptions {
        lock: Some(LockRequest::new(Perms::CONSISTENT_READ, metadata)),
        ..Default::default()
    };
    let e = o
        .open(&p, reader)
        .await
        .err()
        .expect("a reader that does not share write");
    assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
    let shared = OpenOptions {
        lock: Some(LockRequest::new(Perms::CONSISTENT_READ, Perms::ALL)),
        ..Default::default()
    };
    let s = o.open(&p, shared).await.unwrap();
    drop((w, s));
    let again = o.open(&p, truncating).await.unwrap();
    assert_eq!(again.len().await.unwrap(), 0);
}

/// A directory on the disk (the target dir), where O_DIRECT works.
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

#[tokio::test]
async fn memory() {
    suite("memory", || async { MemoryBackend::new() }).await;
    let m = MemoryBackend::new();
    let view = m.clone();
    dropped_operations_finish(m, Arc::new(move || view.snapshot())).await;
    let dir = tempfile::tempdir().unwrap();
    opener_cases(MemoryOpener::new(), dir.path()).await;
}

#[tokio::test]
async fn fault_injector_over_memory() {
    suite("fault", || async {
        FaultInjector::new(MemoryBackend::new())
    })
    .await;
    let m = MemoryBackend::new();
    let view = m.clone();
    let f = FaultInjector::new(m);
    dropped_operations_finish(f, Arc::new(move || view.snapshot())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_file_cached() {
    let dir = tempfile::tempdir().unwrap();
    let mut path = paths(dir.path());
    suite("tokio", || {
        let p = path();
        async move { TokioFile::open(p, new_file(false)).await.unwrap() }
    })
    .await;
    opener_cases(FileOpener, dir.path()).await;
    locking_cases(FileOpener, dir.path()).await;
    let p = path();
    let f = TokioFile::open(&p, new_file(false)).await.unwrap();
    dropped_operations_finish(f, file_contents(p)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_file_direct() {
    let dir = disk_dir();
    let mut path = paths(dir.path());
    let f = TokioFile::open(path(), new_file(true)).await.unwrap();
    direct_rules(&f).await;
    suite("tokio direct", || {
        let p = path();
        async move { TokioFile::open(p, new_file(true)).await.unwrap() }
    })
    .await;
    let p = path();
    let f = TokioFile::open(&p, new_file(true)).await.unwrap();
    dropped_operations_finish(f, file_contents(p)).await;
}

#[test]
fn uring_cached() {
    let dir = tempfile::tempdir().unwrap();
    blockio::uring_builder().start(async {
        let mut path = paths(dir.path());
        suite("uring", || {
            let p = path();
            async move { UringFile::open(p, new_file(false)).await.unwrap() }
        })
        .await;
        opener_cases(UringOpener, dir.path()).await;
        locking_cases(UringOpener, dir.path()).await;
        let p = path();
        let f = UringFile::open(&p, new_file(false)).await.unwrap();
        dropped_operations_finish(f, file_contents(p)).await;
    });
}

#[test]
fn uring_direct() {
    let dir = disk_dir();
    blockio::uring_builder().start(async {
        let mut path = paths(dir.path());
        let f = UringFile::open(path(), new_file(true)).await.unwrap();
        direct_rules(&f).await;
        f.close().await.unwrap();
        suite("uring direct", || {
            let p = path();
            async move { UringFile::open(p, new_file(true)).await.unwrap() }
        })
        .await;
        let p = path();
        let f = UringFile::open(&p, new_file(true)).await.unwrap();
        dropped_operations_finish(f, file_contents(p)).await;
    });
}

/// The cases of the per-thread ring backend, cached: suite, opens, locks, cancellation.
async fn ring_cases(dir: &Path) {
    let mut path = paths(dir);
    suite("ring", || {
        let p = path();
        async move { RingFile::open(p, new_file(false)).await.unwrap() }
    })
    .await;
    opener_cases(RingOpener, dir).await;
    locking_cases(RingOpener, dir).await;
    let p = path();
    let f = RingFile::open(&p, new_file(false)).await.unwrap();
    dropped_operations_finish(f, file_contents(p)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_cached() {
    let dir = tempfile::tempdir().unwrap();
    ring_cases(dir.path()).await;
}

#[tokio::test]
async fn ring_cached_current_thread() {
    let dir = tempfile::tempdir().unwrap();
    ring_cases(dir.path()).await;
}

#[test]
fn ring_cached_in_tokio_uring() {
    let dir = tempfile::tempdir().unwrap();
    blockio::uring_builder().start(ring_cases(dir.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_direct() {
    let dir = disk_dir();
    let mut path = paths(dir.path());
    let f = RingFile::open(path(), new_file(true)).await.unwrap();
    direct_rules(&f).await;
    suite("ring direct", || {
        let p = path();
        async move { RingFile::open(p, new_file(true)).await.unwrap() }
    })
    .await;
    let p = path();
    let f = RingFile::open(&p, new_file(true)).await.unwrap();
    dropped_operations_finish(f, file_contents(p)).await;
}

/// O_DIRECT reports a sane alignment and refuses misaligned requests with a clear error.
async fn direct_rules<B: Backend>(f: &B) {
    let a = f.alignment();
    eprintln!("O_DIRECT alignment: {a}");
    assert!(a >= 512 && a.is_power_of_two(), "alignment {a}");
    let (r, _) = f.write_at(IoBuf::new(100), 0).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("O_DIRECT"), "{e}");
    let (r, _) = f.read_at(IoBuf::new(a), 1).await;
    assert_eq!(r.unwrap_err().kind(), ErrorKind::InvalidInput);
}

#[test]
fn tokio_file_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let f = TokioFile::open(dir.path().join("s"), new_file(false))
            .await
            .unwrap();
        let f = FaultInjector::new(f);
        send(&f.write_at(IoBuf::new(1), 0));
        // Really run one on another worker.
        let g = f.clone();
        let (r, _) = tokio::spawn(async move { g.write_at(IoBuf::new(1), 0).await })
            .await
            .unwrap();
        r.unwrap();
        send(&f.flush());
    });
}
