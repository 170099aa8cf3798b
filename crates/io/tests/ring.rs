//! The per-thread io_uring backend ([`RingFile`]) from the tasks of a multi-thread runtime:
//! one file shared by worker threads, its futures `Send`, and its typed errors where no ring
//! can be had. (The conformance cases run on it in conformance.rs.)

use blockio::{Backend, IoBuf, Keep, OpenOptions, RingFile, RingUnavailable};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

const TASKS: u64 = 4;
const ROUNDS: u64 = 100;
/// Chunks of each task.
const CHUNKS: u64 = 8;

fn new_file(direct: bool) -> OpenOptions {
    OpenOptions {
        write: true,
        create: true,
        truncate: true,
        direct,
        ..Default::default()
    }
}

/// A chunk of the file: task `t` owns the chunks `k` with `k % TASKS == t`, interleaved with
/// the others'.
fn chunk(align: u64) -> u64 {
    match align {
        1 => 3000,
        a => 3 * a,
    }
}

/// A write or read within `task`'s `nth` chunk, from the round's seed: (offset, length).
/// Cached: any bytes; O_DIRECT: whole blocks.
fn request(task: u64, round: u64, align: u64, nth: u64) -> (u64, u64) {
    let r = blockio::splitmix64(task << 32 | round);
    let c = chunk(align);
    let k = nth * TASKS + task;
    let unit = align.max(1);
    let units = c / unit;
    let start = (r >> 16) % units;
    let len = 1 + (r >> 32) % (units - start);
    (k * c + start * unit, len * unit)
}

fn fill(task: u64, round: u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (task as usize * 61 + round as usize * 7 + i % 253) as u8)
        .collect()
}

/// `TASKS` spawned tasks each write and read back their own chunks of one shared file, with
/// several requests of a task in flight at once; every read is checked against the task's
/// model, and at the end the whole file against the merged model.
async fn shared_file(direct: bool) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("shared");
    let file = Arc::new(RingFile::open(&path, new_file(direct)).await.unwrap());
    let align = file.alignment() as u64;
    let size = chunk(align) * CHUNKS * TASKS;
    let threads = Arc::new(Mutex::new(HashSet::new()));
    let tasks = (0..TASKS).map(|t| {
        let (file, threads) = (file.clone(), threads.clone());
        tokio::spawn(async move {
            let mut model = vec![0u8; size as usize];
            for round in 0..ROUNDS {
                threads.lock().unwrap().insert(std::thread::current().id());
                // Three writes of the task in flight together, in three of its chunks.
                let reqs: Vec<_> = (0..3)
                    .map(|j| (j, request(t, round * 3 + j, align, (round + j) % CHUNKS)))
                    .collect();
                let writes = reqs.iter().map(|&(j, (off, len))| {
                    let mut b = IoBuf::with_alignment(len as usize, 4096);
                    b.copy_from_slice(&fill(t, round * 3 + j, len as usize));
                    let file = file.clone();
                    async move { file.write_at(b, off).await.0 }
                });
                for r in futures::future::join_all(writes).await {
                    r.unwrap();
                }
                for &(j, (off, len)) in &reqs {
                    model[off as usize..][..len as usize].copy_from_slice(&fill(
                        t,
                        round * 3 + j,
                        len as usize,
                    ));
                }
                let (off, len) = request(t, round + 1000, align, round % CHUNKS);
                let (n, b) = file
                    .read_at(IoBuf::with_alignment(len as usize, 4096), off)
                    .await;
                let n = n.unwrap();
                let end = (off + len).min(file.len().await.unwrap());
                assert_eq!(n as u64, end.saturating_sub(off), "read of {len} at {off}");
                assert_eq!(b[..n], model[off as usize..][..n], "task {t} round {round}");
            }
            model
        })
    });
    let models = futures::future::join_all(tasks).await;
    let mut merged = vec![0u8; size as usize];
    for (t, m) in models.into_iter().enumerate() {
        let m = m.unwrap();
        for k in (t as u64..CHUNKS * TASKS).step_by(TASKS as usize) {
            let r = (k * chunk(align)) as usize..((k + 1) * chunk(align)) as usize;
            merged[r.clone()].copy_from_slice(&m[r]);
        }
    }
    file.flush().await.unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk[..], merged[..on_disk.len()]);
    assert!(merged[on_disk.len()..].iter().all(|&x| x == 0));
    eprintln!(
        "requests polled on {} threads",
        threads.lock().unwrap().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_share_one_file() {
    shared_file(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_share_one_file_direct() {
    shared_file(true).await;
}

#[test]
fn backend_and_futures_are_send() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let f = RingFile::open(dir.path().join("s"), new_file(false))
            .await
            .unwrap();
        send_sync(&f);
        send(&f.write_at(IoBuf::new(1), 0));
        send(&f.read_at(IoBuf::new(1), 0));
        send(&f.flush());
        send(&f.punch_hole(0, 1, Keep::none()));
        send(&f.write_zeroes(0, 1, Keep::none()));
        let g = f.clone();
        let (r, _) = tokio::spawn(async move { g.write_at(IoBuf::from_slice(b"x"), 0).await })
            .await
            .unwrap();
        r.unwrap();
    });
}

/// Outside a tokio runtime, opening and polling a request give a typed error, not a panic.
#[test]
fn outside_a_runtime_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let e = futures::executor::block_on(RingFile::open(&p, new_file(false)))
        .expect_err("opened outside a runtime");
    assert!(
        matches!(
            RingUnavailable::from_io(&e),
            Some(RingUnavailable::NoRuntime)
        ),
        "{e}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let f = rt.block_on(RingFile::open(&p, new_file(false))).unwrap();
    // Polled on a thread outside the runtime: the buffer comes back with the error.
    let (r, b) = std::thread::spawn(move || {
        futures::executor::block_on(f.write_at(IoBuf::from_slice(b"abc"), 0))
    })
    .join()
    .unwrap();
    let e = r.unwrap_err();
    assert!(RingUnavailable::from_io(&e).is_some(), "{e}");
    assert_eq!(&b[..], b"abc");
}

/// A runtime without its I/O driver cannot watch the ring: a typed error.
#[test]
fn a_runtime_without_io_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let e = rt
        .block_on(RingFile::open(dir.path().join("f"), new_file(false)))
        .expect_err("opened without an I/O driver");
    assert!(
        matches!(
            RingUnavailable::from_io(&e),
            Some(RingUnavailable::NoIoDriver)
        ),
        "{e}"
    );
}
