//! `qimg bench`: `qemu-img bench`'s options, workload and timing, so that the same cells run
//! side by side against QEMU's qcow2 driver.
//!
//! Request `i` goes to `(OFFSET + i * STEP) mod size` (QEMU's order), or to a seeded random
//! multiple of the request size with `--random`. `DEPTH` requests are in flight at a time.
//! With `--flush-interval N` a flush follows every `N` completions, after draining the queue
//! unless `--no-drain`. The time printed covers the request loop only (open and close
//! outside it), like qemu-img's; `--with-close` adds a second figure that includes the final
//! flush and close.
//!
//! With `--queues N` the image is shared by N threads, each running a tokio runtime of its
//! own, as a VMM's I/O threads would (`-i io_uring`: the per-thread io_uring backend,
//! `blockio::RingOpener`, each thread polling its ring for up to 32 µs before it sleeps with
//! requests in flight, as QEMU's I/O threads poll, unless there are more queues than CPUs;
//! `-i threads`: the tokio file backend). They take requests from one
//! stream (request `i` goes where it would with one queue, to whichever thread is free first),
//! and the `-d` requests in flight are spread over them.

use crate::names::NameArgs;
use crate::size::cvtnum_full;
use crate::util;
use anyhow::{bail, Context, Result};
use blockio::{IoBuf, Opener};
use qcow2_engine::{Disk, ImageOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::Instant;

/// The options of `qimg bench` (qemu-img bench's, plus `--random` and `--with-close`).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    pub count: u64,
    /// Requests in flight.
    #[arg(short = 'd', default_value_t = 64)]
    pub depth: u64,
    /// Request size (k, M suffixes).
    #[arg(short = 's', default_value = "4096", value_parser = buffer_size)]
    pub size: u64,
    /// Distance between requests (default: the request size).
    #[arg(short = 'S', value_parser = step_size)]
    pub step: Option<u64>,
    /// Offset of the first request.
    #[arg(short = 'o', default_value = "0", value_parser = offset)]
    pub offset: u64,
    /// Write instead of read.
    #[arg(short = 'w')]
    pub write: bool,
    /// Open in shared mode (read-only benchmarks only): coexist with a writer.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Byte written by write requests.
    #[arg(long = "pattern", default_value_t = 0)]
    pub pattern: u8,
    /// Cache mode: `none` (O_DIRECT) or `writeback`.
    #[arg(short = 't', default_value = "writeback")]
    pub cache: String,
    /// I/O engine: `io_uring` or `threads`.
    #[arg(short = 'i', default_value = "threads")]
    pub aio: String,
    /// Accepted for compatibility (native AIO); the engine picks by `-i`.
    #[arg(short = 'n')]
    pub native: bool,
    /// Flush after every N completed requests.
    #[arg(long = "flush-interval")]
    pub flush_interval: Option<u64>,
    /// Do not drain the queue before a flush.
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Quiet (qemu-img prints the same lines either way; so does qimg).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Random offsets (multiples of the request size) from this seed, instead of the step.
    #[arg(long = "random")]
    pub random: Option<u64>,
    /// Also print the time including the final flush and close.
    #[arg(long = "with-close")]
    pub with_close: bool,
    /// Share the image among this many threads, each with its own runtime, splitting the
    /// requests and the depth among them. With it, `-i io_uring` runs on the `Send` io_uring
    /// backend (a ring per thread, each thread polling its ring for up to 32 µs before it
    /// sleeps with requests in flight, when there are no more queues than CPUs) rather than
    /// tokio-uring's.
    #[arg(long = "queues", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub queues: Option<u64>,
    /// The image.
    /// Read the image name as a list of block options (`driver=qcow2,file.filename=F`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    pub image: PathBuf,
}

/// `-s`, as qemu-img bench reads it: a size of 1 to `INT_MAX` bytes.
fn buffer_size(s: &str) -> Result<u64, String> {
    cvtnum_full("buffer size", s, 1, i32::MAX as u64)
}

/// `-S`, as qemu-img bench reads it: a size of 0 to `INT_MAX` bytes.
fn step_size(s: &str) -> Result<u64, String> {
    cvtnum_full("step size", s, 0, i32::MAX as u64)
}

/// `-o`, as qemu-img bench reads it: a size of 0 to `i64::MAX` bytes.
fn offset(s: &str) -> Result<u64, String> {
    cvtnum_full("offset", s, 0, i64::MAX as u64)
}

/// Runs `qimg bench`: exit status 0, or 1 with the error on stderr.
pub fn run(args: BenchArgs) -> ExitCode {
    util::exit(1, start(args))
}

/// Starts the runtime `-i` asks for and runs the benchmark on it.
fn start(args: BenchArgs) -> Result<()> {
    let direct = match args.cache.as_str() {
        "none" | "directsync" => true,
        "writeback" | "writethrough" | "unsafe" => false,
        other => bail!("Invalid cache option: {other}"),
    };
    if args.size == 0 || args.depth == 0 {
        bail!("request size and depth must be positive");
    }
    let queues = args.queues.unwrap_or(1);
    match (args.aio.as_str(), args.queues) {
        ("io_uring", None) => {
            blockio::uring_builder().start(bench(blockio::UringOpener, args, direct, None))
        }
        ("io_uring", Some(_)) => {
            queue_runtime(queues)?.block_on(bench(blockio::RingOpener, args, direct, Some(split)))
        }
        ("threads" | "native", _) => {
            queue_runtime(queues)?.block_on(bench(blockio::FileOpener, args, direct, Some(split)))
        }
        (other, _) => bail!("Invalid aio option: {other}"),
    }
}

/// How long a queue's thread polls its ring before it sleeps with requests in flight
/// (`blockio::RingOpener::park_hook`): QEMU's default for its I/O threads (`poll-max-ns`).
const QUEUE_POLL: std::time::Duration = std::time::Duration::from_micros(32);

/// The runtime of one of `queues` queues: a current-thread runtime whose thread polls its
/// ring ([`QUEUE_POLL`]) before it sleeps, as a VMM's I/O thread would (nothing else runs on
/// it), unless there are more queues than CPUs: polling threads would then take the CPUs
/// the others need.
fn queue_runtime(queues: u64) -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let mut b = tokio::runtime::Builder::new_current_thread();
    b.enable_all();
    if queues <= cpus {
        b.on_thread_park(blockio::RingOpener::park_hook(QUEUE_POLL));
    }
    b.build()
}

/// The request stream the queues share.
#[derive(Default)]
struct Stream {
    /// The next request to send.
    next: AtomicU64,
    /// Requests completed.
    done: AtomicU64,
    /// A queue failed: the others stop taking requests.
    failed: AtomicBool,
}

impl Stream {
    /// Takes the next request before `end`, if any is left.
    fn take(&self, end: u64) -> Option<u64> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        self.next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| {
                (i < end).then_some(i + 1)
            })
            .ok()
    }
}

/// Where request `i` goes.
fn offset_of(args: &BenchArgs, i: u64, size: u64, step: u64) -> u64 {
    match args.random {
        Some(seed) => {
            // The i-th value of a SplitMix64 sequence: independent of completion order.
            let z =
                blockio::splitmix64(seed.wrapping_add(i.wrapping_mul(blockio::SPLITMIX64_GAMMA)));
            let slots = (size / args.size).max(1);
            (z % slots) * args.size
        }
        None => {
            let o = (u128::from(args.offset) + u128::from(i) * u128::from(step))
                % u128::from(size.max(1));
            o as u64
        }
    }
}

/// Runs the queues of `--queues` on threads of their own (see [`split`]); `None` for a
/// backend that cannot be shared between threads.
type Split<O> = Option<fn(&Run<'_, O>, u64) -> Result<()>>;

async fn bench<O: Opener>(opener: O, args: BenchArgs, direct: bool, split: Split<O>) -> Result<()> {
    let names = NameArgs {
        image_opts: args.image_opts,
        objects: Default::default(),
    };
    let name = names.name(&args.image, args.format.as_deref())?;
    let opts = ImageOptions::new()
        .read_only(!args.write)
        .force_share(args.force_share)
        .direct(direct);
    let disk = Disk::open(opener, name.path(), name.format(), name.options(opts)?)
        .await
        .map_err(|e| name.could_not_open(e))?;
    let size = disk.size();
    if args.size > size {
        bail!("request size {} is larger than the image", args.size);
    }
    let step = args.step.unwrap_or(args.size);
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        args.count,
        if args.write { "write" } else { "read" },
        args.size,
        args.depth,
        args.offset,
        step
    );
    if let Some(n) = args.flush_interval {
        println!("Sending flush every {n} requests");
    }

    let stream = Stream::default();
    let start = Instant::now();
    let queues = args.queues.unwrap_or(1);
    let run = Run {
        disk: &disk,
        args: &args,
        stream: &stream,
        size,
        step,
    };
    match split {
        Some(split) if queues > 1 => split(&run, queues)?,
        _ => run.queue(args.depth, None).await?,
    }
    let secs = start.elapsed().as_secs_f64();
    println!("Run completed in {secs:.3} seconds.");
    // qimg's own summary; as qemu-img, the tool prints what qemu-img prints.
    if crate::util::program() == "qimg" {
        let iops = args.count as f64 / secs;
        println!(
            "{:.0} IOPS, {:.1} MiB/s",
            iops,
            iops * args.size as f64 / f64::from(1 << 20)
        );
    }
    disk.close().await?;
    if args.with_close {
        println!(
            "Run completed in {:.3} seconds including close.",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// One benchmark run: the disk, the options and the shared request stream.
struct Run<'a, O: Opener> {
    disk: &'a Disk<O>,
    args: &'a BenchArgs,
    stream: &'a Stream,
    size: u64,
    step: u64,
}

impl<O: Opener> Run<'_, O> {
    /// The `--flush-interval`, if any.
    fn interval(&self) -> Option<u64> {
        self.args.flush_interval.filter(|&n| n > 0)
    }

    /// With a draining flush interval the run is a sequence of batches, each followed by a
    /// flush once the queues are empty; otherwise one batch.
    fn batch(&self) -> u64 {
        match (self.interval(), self.args.no_drain) {
            (Some(n), false) => n,
            _ => self.args.count,
        }
    }

    /// One queue: the batches, `depth` requests in flight. With several queues, `sync`
    /// brings them together after each batch, and the first flushes.
    async fn queue(&self, depth: u64, sync: Option<&Barrier>) -> Result<()> {
        let (count, batch) = (self.args.count, self.batch());
        let mut result = Ok(());
        let mut issued = 0;
        while issued < count {
            let end = (issued + batch).min(count);
            if result.is_ok() {
                result = self.batch_of(end, depth).await;
                if result.is_err() {
                    self.stream.failed.store(true, Ordering::Relaxed);
                }
            }
            issued = end;
            let leader = sync.is_none_or(|b| b.wait().is_leader());
            let failed = self.stream.failed.load(Ordering::Relaxed);
            if leader && !failed && self.interval().is_some() && !self.args.no_drain {
                if let Err(e) = self.disk.flush().await.context("flush failed") {
                    self.stream.failed.store(true, Ordering::Relaxed);
                    result = Err(e);
                }
            }
            if let Some(b) = sync {
                b.wait();
            }
        }
        result
    }

    /// Sends the stream's requests up to `end`, `depth` at a time, each of the `depth`
    /// workers with its buffer from one allocation (as qemu-img bench's one buffer of
    /// `depth` requests; see `IoBuf::slab`).
    async fn batch_of(&self, end: u64, depth: u64) -> Result<()> {
        let bufs = IoBuf::slab(depth as usize, self.args.size as usize);
        let workers = bufs.into_iter().map(|mut buf| async move {
            let args = self.args;
            buf.fill(args.pattern);
            while let Some(i) = self.stream.take(end) {
                let off = offset_of(args, i, self.size, self.step);
                let off = off.min(self.size - args.size);
                let (res, b) = if args.write {
                    self.disk.write_at(buf, off).await
                } else {
                    self.disk.read_at(buf, off).await
                };
                buf = b;
                res.with_context(|| format!("Failed request at offset {off}"))?;
                let n = self.stream.done.fetch_add(1, Ordering::Relaxed) + 1;
                if let (Some(iv), true) = (self.interval(), args.no_drain) {
                    if n % iv == 0 {
                        self.disk.flush().await.context("flush failed")?;
                    }
                }
            }
            Ok::<(), anyhow::Error>(())
        });
        for r in futures::future::join_all(workers).await {
            r?;
        }
        Ok(())
    }
}

/// `queues` threads, each with a runtime of its own, share the run's stream and depth.
fn split<O: Opener>(run: &Run<'_, O>, queues: u64) -> Result<()>
where
    Disk<O>: Sync,
{
    let sync = Barrier::new(queues as usize);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..queues)
            .map(|q| {
                let depth = queue_depth(run.args.depth, queues, q);
                let sync = &sync;
                scope.spawn(move || {
                    let rt = queue_runtime(queues)?;
                    rt.block_on(run.queue(depth, Some(sync)))
                })
            })
            .collect();
        let mut result = Ok(());
        for t in threads {
            let r = t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            result = result.and(r);
        }
        result
    })
}

/// The requests in flight of queue `q` of `queues`: `depth` spread evenly (at least one).
fn queue_depth(depth: u64, queues: u64, q: u64) -> u64 {
    (depth / queues + u64::from(q < depth % queues)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(offset: u64, size: u64) -> BenchArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            a: BenchArgs,
        }
        let mut a = W::parse_from(["x", "img"]).a;
        a.offset = offset;
        a.size = size;
        a
    }

    #[test]
    fn offsets_follow_qemu_img_bench() {
        // qemu-img bench: offset += step; offset %= image_size.
        let a = args(4096, 4096);
        let size = 4 * 4096;
        let got: Vec<u64> = (0..6).map(|i| offset_of(&a, i, size, 8192)).collect();
        assert_eq!(got, vec![4096, 12288, 4096, 12288, 4096, 12288]);
    }

    #[test]
    fn random_offsets_are_aligned_and_in_range() {
        let mut a = args(0, 4096);
        a.random = Some(7);
        let size = 1 << 20;
        let offs: Vec<u64> = (0..1000).map(|i| offset_of(&a, i, size, 4096)).collect();
        assert!(offs.iter().all(|&o| o % 4096 == 0 && o < size));
        assert!(offs.iter().collect::<std::collections::BTreeSet<_>>().len() > 200);
    }

    #[test]
    fn sizes_parse_as_qemu_img_bench_parses_them() {
        // `qemu-img bench -c 1 -d 1 OPT VALUE img.qcow2` (qemu-img 10.0.2, 64 MiB qcow2): its
        // "Sending ..." line when it took the value, else its message.
        // -s 0x1000: "Sending 1 read requests, 4096 bytes each, ... step size 4096)"
        assert_eq!(buffer_size("0x1000"), Ok(4096));
        // -s 1.5k: "Sending 1 read requests, 1536 bytes each, ..."
        assert_eq!(buffer_size("1.5k"), Ok(1536));
        // -s 010: "Sending 1 read requests, 10 bytes each, ..."
        assert_eq!(buffer_size("010"), Ok(10));
        // -s ' 4k' and -s +4k: "Sending 1 read requests, 4096 bytes each, ..."
        assert_eq!(buffer_size(" 4k"), Ok(4096));
        assert_eq!(buffer_size("+4k"), Ok(4096));
        // -s 2147483647: "Sending 1 read requests, 2147483647 bytes each, ..."
        assert_eq!(buffer_size("2147483647"), Ok(2_147_483_647));
        for (s, printed) in [
            ("1.5", "qemu-img: Invalid buffer size specified: '1.5'."),
            ("4k ", "qemu-img: Invalid buffer size specified: '4k '."),
            ("-1k", "qemu-img: Invalid buffer size specified: '-1k'."),
            ("", "qemu-img: Invalid buffer size specified: ''."),
            ("4x", "qemu-img: Invalid buffer size specified: '4x'."),
            (
                "-1",
                "qemu-img: Invalid buffer size specified. Must be between 1 and 2147483647.",
            ),
            (
                "0",
                "qemu-img: Invalid buffer size specified. Must be between 1 and 2147483647.",
            ),
            (
                "2G",
                "qemu-img: Invalid buffer size specified. Must be between 1 and 2147483647.",
            ),
            (
                "2147483648",
                "qemu-img: Invalid buffer size specified. Must be between 1 and 2147483647.",
            ),
            (
                "8E",
                "qemu-img: Invalid buffer size specified. Must be between 1 and 2147483647.",
            ),
        ] {
            assert_eq!(buffer_size(s), Err(printed[10..].to_string()), "{s:?}");
        }
        // -S 0: "... (starting at offset 0, step size 4096)"; -S 1.5k: "... step size 1536)";
        // -S 2147483647: "... step size 2147483647)".
        assert_eq!(step_size("0"), Ok(0));
        assert_eq!(step_size("1.5k"), Ok(1536));
        assert_eq!(step_size("2147483647"), Ok(2_147_483_647));
        for (s, printed) in [
            ("1.5", "qemu-img: Invalid step size specified: '1.5'."),
            ("-1k", "qemu-img: Invalid step size specified: '-1k'."),
            (
                "-1",
                "qemu-img: Invalid step size specified. Must be between 0 and 2147483647.",
            ),
            (
                "2G",
                "qemu-img: Invalid step size specified. Must be between 0 and 2147483647.",
            ),
        ] {
            assert_eq!(step_size(s), Err(printed[10..].to_string()), "{s:?}");
        }
        // -o 0x1000: "... (starting at offset 4096, step size 4096)"; -o 1E: "... (starting
        // at offset 1152921504606846976, ..." (then "Failed request": past the end).
        assert_eq!(offset("0x1000"), Ok(4096));
        assert_eq!(offset("1.5k"), Ok(1536));
        assert_eq!(offset("1E"), Ok(1 << 60));
        for (s, printed) in [
            ("1.5", "qemu-img: Invalid offset specified: '1.5'."),
            ("4x", "qemu-img: Invalid offset specified: '4x'."),
            (
                "-1",
                "qemu-img: Invalid offset specified. Must be between 0 and 9223372036854775807.",
            ),
            (
                "8E",
                "qemu-img: Invalid offset specified. Must be between 0 and 9223372036854775807.",
            ),
            (
                "99999999999999999999",
                "qemu-img: Invalid offset specified. Must be between 0 and 9223372036854775807.",
            ),
        ] {
            assert_eq!(offset(s), Err(printed[10..].to_string()), "{s:?}");
        }
    }
}
