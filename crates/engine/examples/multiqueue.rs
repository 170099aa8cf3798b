//! One image served by several queues, as a VMM serves a virtio-blk device with several
//! virtqueues: a multi-thread tokio runtime, one `Image` shared in an `Arc`, a task per
//! queue taking requests from its channel and running each as a task of its own, each
//! worker thread submitting to its own io_uring (`RingOpener`) and polling it briefly before
//! it sleeps (`RingOpener::park_hook`). A "guest" writes through
//! one queue and reads back through another; at the end the image is closed and checked.
//!
//! ```sh
//! cargo run --release -p qcow2-engine --example multiqueue -- /tmp/multiqueue.qcow2
//! qemu-img check /tmp/multiqueue.qcow2
//! ```
//!
//! Where io_uring is not available (an old kernel, a seccomp filter), opening fails with
//! `blockio::RingUnavailable` inside the error, and the same program runs on
//! `blockio::FileOpener` instead.

use blockio::{IoBuf, RingOpener};
use qcow2_engine::{create, CacheMode, CreateOptions, Image, ImageOptions, WriteFlags};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

const QUEUES: usize = 4;
const SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;

/// A request as a device model hands it to its disk.
enum Request {
    Read {
        offset: u64,
        buf: IoBuf,
        done: oneshot::Sender<Result<IoBuf, i32>>,
    },
    Write {
        offset: u64,
        buf: IoBuf,
        fua: bool,
        done: oneshot::Sender<Result<(), i32>>,
    },
    Flush {
        done: oneshot::Sender<Result<(), i32>>,
    },
}

/// A queue: each request runs as a task of its own, so a queue has many in flight; an
/// error completes the request with its errno, as a device completes it.
async fn serve(img: Arc<Image<RingOpener>>, mut queue: mpsc::Receiver<Request>) {
    let mut running = tokio::task::JoinSet::new();
    while let Some(req) = queue.recv().await {
        let img = img.clone();
        running.spawn(async move {
            match req {
                Request::Read { offset, buf, done } => {
                    let (res, buf) = img.read_at(buf, offset).await;
                    let _ = done.send(res.map(|()| buf).map_err(|e| e.errno()));
                }
                Request::Write {
                    offset,
                    buf,
                    fua,
                    done,
                } => {
                    let flags = if fua {
                        WriteFlags::FUA
                    } else {
                        WriteFlags::default()
                    };
                    let (res, _) = img.write_at_with(buf, offset, flags).await;
                    let _ = done.send(res.map_err(|e| e.errno()));
                }
                Request::Flush { done } => {
                    let _ = done.send(img.flush().await.map_err(|e| e.errno()));
                }
            }
        });
    }
    // The queue is closed: its requests finish (and drop their clones of the image).
    while running.join_next().await.is_some() {}
}

fn block(n: u64) -> IoBuf {
    let mut buf = IoBuf::new(BLOCK);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (n as u8) ^ (i as u8);
    }
    buf
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Four worker threads, each polling its ring for up to 32 us before it sleeps with
    // requests in flight (lower latency at low depth, for some CPU time; optional).
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .on_thread_park(RingOpener::park_hook(std::time::Duration::from_micros(32)))
        .build()?
        .block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "multiqueue.qcow2".into());
    create(&RingOpener, &path, &CreateOptions::new().size(SIZE)).await?;
    let options = ImageOptions::new().cache(CacheMode::None);
    let img = Arc::new(Image::open(RingOpener, &path, options).await?);

    let mut queues = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..QUEUES {
        let (tx, rx) = mpsc::channel(128);
        queues.push(tx);
        servers.push(tokio::spawn(serve(img.clone(), rx)));
    }

    // The guest: 1024 blocks spread over the disk, written through queue n % QUEUES (every
    // 64th with FUA), then read back through the next queue.
    let blocks: Vec<u64> = (0..1024)
        .map(|n| (n * 7919) % (SIZE / BLOCK as u64))
        .collect();
    let mut writes = Vec::new();
    for (n, &b) in blocks.iter().enumerate() {
        let (done, wait) = oneshot::channel();
        let req = Request::Write {
            offset: b * BLOCK as u64,
            buf: block(b),
            fua: n % 64 == 0,
            done,
        };
        queues[n % QUEUES].send(req).await?;
        writes.push(wait);
    }
    for w in writes {
        w.await?.map_err(std::io::Error::from_raw_os_error)?;
    }
    let (done, wait) = oneshot::channel();
    queues[0].send(Request::Flush { done }).await?;
    wait.await?.map_err(std::io::Error::from_raw_os_error)?;
    for (n, &b) in blocks.iter().enumerate() {
        let (done, wait) = oneshot::channel();
        let req = Request::Read {
            offset: b * BLOCK as u64,
            buf: IoBuf::new(BLOCK),
            done,
        };
        queues[(n + 1) % QUEUES].send(req).await?;
        let got = wait.await?.map_err(std::io::Error::from_raw_os_error)?;
        assert!(
            got[..] == block(b)[..],
            "block {b} reads back what was written"
        );
    }

    drop(queues);
    for s in servers {
        s.await?;
    }
    // Every queue has finished its requests: the image is no longer shared.
    let img = Arc::into_inner(img).ok_or("the image is still shared")?;
    img.close().await?;
    println!(
        "{} blocks written and read back through {QUEUES} queues: {path}",
        blocks.len()
    );
    Ok(())
}
