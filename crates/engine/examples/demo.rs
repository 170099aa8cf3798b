//! Embedding qcow2-engine: open a qcow2 image, read it from many tasks at once, and check
//! every byte against QEMU's own view of the image.
//!
//! ```text
//! cargo run --release -p qcow2-engine --example demo            # builds a 1 GiB demo image
//! cargo run --release -p qcow2-engine --example demo -- IMG     # or reads yours
//! ```
//!
//! Without an argument it builds the default image with `qemu-img`/`qemu-io` (package
//! `qemu-utils`): 1 GiB virtual, 64 KiB clusters, 48 MiB of patterned data in extents of
//! assorted sizes, some zeroed ranges, and a compressed copy. It then reads each image with
//! the engine (sequential 1 MiB reads from 8 tasks, then random 4 KiB reads from 32 tasks),
//! compares the whole disk with `qemu-img convert -O raw`, and prints the throughput.

use blockio::FileOpener;
use qcow2_engine::{Image, ImageOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn run(cmd: &str, args: &[&str]) -> Res<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {cmd}: {e} (install the Debian package qemu-utils)"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// The default image: patterned extents written by qemu-io, so QEMU decides the layout.
fn build_default(dir: &Path) -> Res<Vec<PathBuf>> {
    let img = dir.join("demo.qcow2");
    let img_s = img.to_str().ok_or("non-UTF-8 temp dir")?;
    run("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "1G"])?;
    let mut cmds = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..384u64 {
        let len = [4096, 65536, 131_072, 200_704][(next() % 4) as usize];
        let off = (next() % ((1 << 30) - len)) / 512 * 512;
        if i % 16 == 15 {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            cmds.push(format!("write -P {} {off} {len}", (i % 251) + 1));
        }
    }
    for chunk in cmds.chunks(64) {
        let mut args = vec!["-f", "qcow2"];
        for c in chunk {
            args.extend(["-c", c.as_str()]);
        }
        args.push(img_s);
        run("qemu-io", &args)?;
    }
    let comp = dir.join("demo-compressed.qcow2");
    let comp_s = comp.to_str().ok_or("non-UTF-8 temp dir")?;
    run(
        "qemu-img",
        &["convert", "-c", "-f", "qcow2", "-O", "qcow2", img_s, comp_s],
    )?;
    Ok(vec![img, comp])
}

async fn exercise(path: &Path, raw: &Path) -> Res<()> {
    let img = Arc::new(Image::open(FileOpener, path, ImageOptions::new().read_only(true)).await?);
    let size = img.size();
    println!(
        "{}: {} MiB virtual, {} KiB clusters, file {} KiB",
        path.display(),
        size >> 20,
        img.cluster_size() >> 10,
        img.file_len() >> 10
    );

    // Sequential: 8 tasks, each a contiguous eighth of the disk in 1 MiB reads, checked
    // against QEMU's raw export as they go.
    let reference = Arc::new(std::fs::read(raw)?);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for part in 0..8u64 {
        let (img, reference) = (img.clone(), reference.clone());
        tasks.push(tokio::spawn(async move {
            let span = size / 8;
            let mut off = part * span;
            while off < (part + 1) * span {
                let buf = img.read(off, 1 << 20).await?;
                let o = off as usize;
                if buf[..] != reference[o..o + (1 << 20)] {
                    return Err(format!("mismatch in the MiB at {off:#x}").into());
                }
                off += 1 << 20;
            }
            Res::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  sequential 1 MiB reads, 8 tasks: {:.0} MiB/s, every byte equal to qemu-img convert",
        (size >> 20) as f64 / secs
    );

    // Random 4 KiB reads from 32 tasks.
    let ops = 20_000u64;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..32u64 {
        let (img, reference) = (img.clone(), reference.clone());
        tasks.push(tokio::spawn(async move {
            let mut x = 0x2545_f491_4f6c_dd1d ^ (task + 1);
            for _ in 0..ops / 32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (size / 4096)) * 4096;
                let buf = img.read(off, 4096).await?;
                let o = off as usize;
                if buf[..] != reference[o..o + 4096] {
                    return Err(format!("mismatch at {off:#x}").into());
                }
            }
            Res::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  random 4 KiB reads, 32 tasks: {:.0} IOPS ({ops} reads verified)",
        ops as f64 / secs
    );
    let (hits, misses) = img.l2_cache_stats().await;
    println!("  L2 cache: {hits} hits, {misses} misses");
    Ok(())
}

fn main() -> Res<()> {
    let dir = tempfile::tempdir()?;
    let images = match std::env::args().nth(1) {
        Some(p) => vec![PathBuf::from(p)],
        None => {
            println!("building the default image with qemu-img and qemu-io ...");
            build_default(dir.path())?
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    for (i, img) in images.iter().enumerate() {
        let raw = dir.path().join(format!("reference-{i}.raw"));
        run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                img.to_str().ok_or("non-UTF-8 path")?,
                raw.to_str().ok_or("non-UTF-8 path")?,
            ],
        )?;
        rt.block_on(exercise(img, &raw))?;
    }
    Ok(())
}
