//! `peer-bench`: `qemu-img bench`'s workload through the other Rust qcow2 implementations, for
//! `just bench` (benches/bench.py) to put them beside qcow2-engine and QEMU.
//!
//! ```text
//! peer-bench imago|qcow2-rs [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET]
//!            [-t none|writeback] [-w] [--pattern BYTE] [--flush-interval N] IMAGE
//! ```
//!
//! The options mean what they mean to `qemu-img bench` (numbers in bytes, no suffixes): COUNT
//! requests of SIZE bytes, request `i` at `(OFFSET + i * STEP) mod image size`, DEPTH of them
//! in flight, taken in that order; writes of buffers filled with BYTE; `-t none` opens the
//! image with O_DIRECT. With `--flush-interval N` the queue drains and the image is flushed
//! after every N requests (qemu-img bench's default, draining mode). The output is qemu-img
//! bench's: "Sending ...", then "Run completed in N seconds." for the request loop alone (not
//! the open, not the final flush and close, as qemu-img bench measures).
//!
//! - **imago** (its native async API, `FormatAccess` over `Qcow2<File>`): imago's only file
//!   backend does blocking `preadv`/`pwritev` inside its futures, and its futures are not
//!   `Send`, so requests run in parallel only from separate threads: DEPTH threads, each with
//!   a current-thread tokio runtime, share the image (as QEMU's thread pool would), each taking
//!   the next request when its last one completes.
//! - **qcow2-rs** (its tokio-uring backend, `qcow2_setup_dev_uring`): one thread, one ring,
//!   DEPTH local tasks in flight.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::exit;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::Instant;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
struct Args {
    peer: String,
    count: u64,
    depth: u64,
    size: u64,
    step: Option<u64>,
    offset: u64,
    direct: bool,
    write: bool,
    pattern: u8,
    flush_interval: Option<u64>,
    image: PathBuf,
}

const USAGE: &str = "usage: peer-bench imago|qcow2-rs [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] \
                     [-o OFFSET] [-t none|writeback] [-w] [--pattern BYTE] \
                     [--flush-interval N] IMAGE";

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let peer = it.next().ok_or(USAGE)?;
    if peer != "imago" && peer != "qcow2-rs" {
        return Err(format!("unknown peer '{peer}'\n{USAGE}").into());
    }
    let mut a = Args {
        peer,
        count: 75_000,
        depth: 64,
        size: 4096,
        step: None,
        offset: 0,
        direct: false,
        write: false,
        pattern: 0,
        flush_interval: None,
        image: PathBuf::new(),
    };
    let mut image = None;
    while let Some(arg) = it.next() {
        let mut value = || -> Result<u64> {
            let v = it.next().ok_or_else(|| format!("{arg} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{arg}: not a number: '{v}'").into())
        };
        match arg.as_str() {
            "-c" => a.count = value()?,
            "-d" => a.depth = value()?.max(1),
            "-s" => a.size = value()?,
            "-S" => a.step = Some(value()?),
            "-o" => a.offset = value()?,
            "--pattern" => a.pattern = u8::try_from(value()?)?,
            "--flush-interval" => a.flush_interval = Some(value()?).filter(|&n| n > 0),
            "-w" => a.write = true,
            "-t" => {
                a.direct = match it.next().as_deref() {
                    Some("none") => true,
                    Some("writeback") => false,
                    other => return Err(format!("-t: unsupported cache mode {other:?}").into()),
                }
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}").into()),
            _ if image.is_none() => image = Some(PathBuf::from(arg)),
            _ => return Err(USAGE.into()),
        }
    }
    a.image = image.ok_or(USAGE)?;
    if a.size == 0 {
        return Err("the request size must not be 0".into());
    }
    Ok(a)
}

impl Args {
    /// Where request `i` goes: qemu-img bench's `offset += step; offset %= image_size`, kept
    /// inside the image as qimg bench does.
    fn offset_of(&self, i: u64, image_size: u64) -> u64 {
        let step = self.step.unwrap_or(self.size);
        let o = (u128::from(self.offset) + u128::from(i) * u128::from(step))
            % u128::from(image_size.max(1));
        (o as u64).min(image_size - self.size)
    }

    /// The request batches: the whole run, or with a flush interval the stretches between two
    /// flushes (the queue drained before each flush).
    fn batches(&self) -> Vec<(u64, u64)> {
        let n = self.flush_interval.unwrap_or(self.count).max(1);
        (0..self.count.div_ceil(n))
            .map(|b| (b * n, ((b + 1) * n).min(self.count)))
            .collect()
    }

    fn banner(&self) {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            self.count,
            if self.write { "write" } else { "read" },
            self.size,
            self.depth,
            self.offset,
            self.step.unwrap_or(self.size)
        );
        if let Some(n) = self.flush_interval {
            println!("Sending flush every {n} requests");
        }
    }
}

fn report(secs: f64, args: &Args) {
    println!("Run completed in {secs:.3} seconds.");
    let iops = args.count as f64 / secs;
    println!(
        "{iops:.0} IOPS, {:.1} MiB/s",
        iops * args.size as f64 / f64::from(1 << 20)
    );
}

// --- imago ---------------------------------------------------------------------------------

mod peer_imago {
    use super::*;
    use imago::file::File;
    use imago::io_buffers::IoBuffer;
    use imago::qcow2::Qcow2;
    use imago::{
        FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate, StorageOpenOptions,
    };

    /// The image is opened (and flushed) on a current-thread runtime; each worker thread
    /// runs its own, on the one shared image (imago's futures are not `Send`, its image is
    /// `Sync`).
    pub fn run(args: Args) -> Result<()> {
        let rt = runtime()?;
        let disk = rt.block_on(open(&args))?;
        let size = disk.size();
        if args.size > size {
            return Err(format!("request size {} is larger than the image", args.size).into());
        }
        let align = disk.mem_align().max(4096);
        args.banner();
        let batches = args.batches();
        let next = AtomicU64::new(0);
        // The workers and this thread meet at the barrier before the run and twice after each
        // batch: once when the batch is done (then the flush), once to start the next one.
        let barrier = Barrier::new(args.depth as usize + 1);
        let start = std::thread::scope(|s| -> Result<Instant> {
            for _ in 0..args.depth {
                s.spawn(|| {
                    let res = worker(&disk, &args, &batches, &next, &barrier, size, align);
                    if let Err(e) = res {
                        // The others would wait at the barrier for ever.
                        eprintln!("peer-bench: {e}");
                        exit(1);
                    }
                });
            }
            barrier.wait();
            let start = Instant::now();
            for &(_, end) in &batches {
                barrier.wait();
                if args.flush_interval.is_some() {
                    rt.block_on(flush(&disk))?;
                }
                next.store(end, Ordering::Relaxed);
                barrier.wait();
            }
            Ok(start)
        })?;
        report(start.elapsed().as_secs_f64(), &args);
        // Async imago does not flush on drop: write its caches back (untimed, as qemu-img
        // bench's close).
        if args.write {
            rt.block_on(flush(&disk))?;
        }
        Ok(())
    }

    fn runtime() -> Result<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?)
    }

    async fn open(args: &Args) -> Result<FormatAccess<File>> {
        let qcow2 = Qcow2::<File>::builder_path(&args.image)
            .storage_open_options(StorageOpenOptions::new().direct(args.direct))
            .write(args.write)
            .open(PermissiveImplicitOpenGate::default())
            .await
            .map_err(|e| format!("Could not open '{}': {e}", args.image.display()))?;
        Ok(FormatAccess::new(qcow2))
    }

    async fn flush(disk: &FormatAccess<File>) -> Result<()> {
        disk.flush().await?;
        disk.sync().await?;
        Ok(())
    }

    /// One request in flight: in each batch, takes the next request number until the
    /// batch's end, then waits for the others (and the flush).
    fn worker(
        disk: &FormatAccess<File>,
        args: &Args,
        batches: &[(u64, u64)],
        next: &AtomicU64,
        barrier: &Barrier,
        size: u64,
        align: usize,
    ) -> Result<()> {
        let mut buf = IoBuffer::new(args.size as usize, align)?;
        buf.as_mut().into_slice().fill(args.pattern);
        let rt = runtime()?;
        barrier.wait();
        for &(_, end) in batches {
            rt.block_on(async {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        return Ok::<(), Error>(());
                    }
                    let off = args.offset_of(i, size);
                    let res = if args.write {
                        disk.write(&buf, off).await
                    } else {
                        disk.read(&mut buf, off).await
                    };
                    res.map_err(|e| format!("Failed request at offset {off}: {e}"))?;
                }
            })?;
            barrier.wait();
            barrier.wait();
        }
        Ok(())
    }
}

// --- qcow2-rs ------------------------------------------------------------------------------

mod peer_qcow2_rs {
    use super::*;
    use qcow2_rs::dev::Qcow2DevParams;
    use qcow2_rs::helpers::Qcow2IoBuf;
    use qcow2_rs::utils::qcow2_setup_dev_uring;

    pub fn run(args: Args) -> Result<()> {
        let mut res = Ok(());
        tokio_uring::builder()
            .entries(256.max(2 * args.depth as u32).next_power_of_two())
            .start(async { res = bench(args).await });
        res
    }

    async fn bench(args: Args) -> Result<()> {
        // 512-byte blocks (its default), read-only unless writing.
        let params = Qcow2DevParams::new(9, None, None, !args.write, args.direct);
        let dev = qcow2_setup_dev_uring(Path::new(&args.image), &params)
            .await
            .map_err(|e| format!("Could not open '{}': {e:?}", args.image.display()))?;
        let dev = Rc::new(dev);
        let size = dev.info.virtual_size();
        if args.size > size {
            return Err(format!("request size {} is larger than the image", args.size).into());
        }
        let args = Rc::new(args);
        args.banner();
        let start = Instant::now();
        for (first, end) in args.batches() {
            let next = Rc::new(Cell::new(first));
            let mut tasks = Vec::new();
            for _ in 0..args.depth.min(end - first) {
                let (dev, args, next) = (Rc::clone(&dev), Rc::clone(&args), Rc::clone(&next));
                let mut buf = Qcow2IoBuf::<u8>::new(args.size as usize);
                buf.fill(args.pattern);
                tasks.push(tokio_uring::spawn(async move {
                    loop {
                        let i = next.get();
                        if i >= end {
                            return Ok::<(), Error>(());
                        }
                        next.set(i + 1);
                        let off = args.offset_of(i, size);
                        let res = if args.write {
                            dev.write_at(&buf, off).await
                        } else {
                            dev.read_at(&mut buf, off).await.map(|_| ())
                        };
                        res.map_err(|e| format!("Failed request at offset {off}: {e:?}"))?;
                    }
                }));
            }
            for t in tasks {
                t.await??;
            }
            if args.flush_interval.is_some() {
                flush(&dev, size).await?;
            }
        }
        report(start.elapsed().as_secs_f64(), &args);
        // qcow2-rs keeps metadata updates in memory until flush_meta (untimed, as qemu-img
        // bench's close).
        if args.write {
            flush(&dev, size).await?;
        }
        Ok(())
    }

    async fn flush<T: qcow2_rs::ops::Qcow2IoOps>(
        dev: &qcow2_rs::dev::Qcow2Dev<T>,
        size: u64,
    ) -> Result<()> {
        dev.flush_meta()
            .await
            .map_err(|e| format!("flush failed: {e:?}"))?;
        dev.fsync_range(0, size as usize)
            .await
            .map_err(|e| format!("flush failed: {e:?}"))?;
        Ok(())
    }
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("peer-bench: {e}");
            exit(1);
        }
    };
    let res = match args.peer.as_str() {
        "imago" => peer_imago::run(args),
        _ => peer_qcow2_rs::run(args),
    };
    if let Err(e) = res {
        eprintln!("peer-bench: {e}");
        exit(1);
    }
}
