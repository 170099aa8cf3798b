//! `qimg bench`: `qemu-img bench`'s options, workload and timing, so that the same cells run
//! side by side against QEMU's qcow2 driver.
//!
//! Request `i` goes to `(OFFSET + i * STEP) mod size` (QEMU's order), or to a seeded random
//! multiple of the request size with `--random`. `DEPTH` requests are in flight at a time.
//! With `--flush-interval N` a flush follows every `N` completions, after draining the queue
//! unless `--no-drain`. The time printed covers the request loop only (open and close
//! outside it), like qemu-img's; `--with-close` adds a second figure that includes the final
//! flush and close.

use crate::size::cvtnum_full;
use crate::util;
use anyhow::{bail, Context, Result};
use blockio::{IoBuf, Opener};
use qcow2_engine::{Disk, ImageFormat, ImageOptions};
use std::cell::Cell;
use std::path::PathBuf;
use std::process::ExitCode;
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
    /// The image.
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
    match args.aio.as_str() {
        "io_uring" => blockio::uring_builder().start(bench(blockio::UringOpener, args, direct)),
        "threads" | "native" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(bench(blockio::FileOpener, args, direct)),
        other => bail!("Invalid aio option: {other}"),
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

async fn bench<O: Opener>(opener: O, args: BenchArgs, direct: bool) -> Result<()> {
    let format = match args.format.as_deref() {
        None => None,
        Some(f) => {
            Some(ImageFormat::from_name(f).with_context(|| format!("Unknown file format '{f}'"))?)
        }
    };
    let opts = ImageOptions::new()
        .read_only(!args.write)
        .force_share(args.force_share)
        .direct(direct);
    let disk = Disk::open(opener, &args.image, format, opts)
        .await
        .with_context(|| format!("Could not open '{}'", args.image.display()))?;
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

    let next = Cell::new(0u64);
    let done = Cell::new(0u64);
    let start = Instant::now();
    let interval = args.flush_interval.filter(|&n| n > 0);
    // With a draining flush interval the run is a sequence of batches, each followed by a
    // flush once the queue is empty; otherwise one batch.
    let batch = match (interval, args.no_drain) {
        (Some(n), false) => n,
        _ => args.count,
    };
    let mut issued = 0u64;
    while issued < args.count {
        let end = (issued + batch).min(args.count);
        next.set(issued);
        let workers = (0..args.depth.min(end - issued)).map(|_| {
            let (disk, args, next, done) = (&disk, &args, &next, &done);
            async move {
                let mut buf = IoBuf::new(args.size as usize);
                buf.fill(args.pattern);
                loop {
                    let i = next.get();
                    if i >= end {
                        return Ok::<(), anyhow::Error>(());
                    }
                    next.set(i + 1);
                    let off = offset_of(args, i, size, step);
                    let off = off.min(size - args.size);
                    let (res, b) = if args.write {
                        disk.write_at(buf, off).await
                    } else {
                        disk.read_at(buf, off).await
                    };
                    buf = b;
                    res.with_context(|| format!("Failed request at offset {off}"))?;
                    let n = done.get() + 1;
                    done.set(n);
                    if let (Some(iv), true) = (interval, args.no_drain) {
                        if n % iv == 0 {
                            disk.flush().await.context("flush failed")?;
                        }
                    }
                }
            }
        });
        for r in futures::future::join_all(workers).await {
            r?;
        }
        issued = end;
        if interval.is_some() && !args.no_drain {
            disk.flush().await.context("flush failed")?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("Run completed in {secs:.3} seconds.");
    let iops = args.count as f64 / secs;
    println!(
        "{:.0} IOPS, {:.1} MiB/s",
        iops,
        iops * args.size as f64 / f64::from(1 << 20)
    );
    disk.close().await?;
    if args.with_close {
        println!(
            "Run completed in {:.3} seconds including close.",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
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
