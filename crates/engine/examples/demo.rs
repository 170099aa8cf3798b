//! Embedding qcow2-engine: create an image, hammer it from many tasks at once with writes,
//! reads, write-zeroes, discards and flushes, then prove every byte and the metadata right.
//!
//! ```text
//! cargo run --release -p qcow2-engine --example demo                 # 1 GiB, 8 tasks, 5 s
//! cargo run --release -p qcow2-engine --example demo -- --seconds 20 --tasks 16
//! ```
//!
//! Each task owns a slice of the disk and keeps a model of it (one pattern byte per 512-byte
//! sector); it checks every read it makes against the model while the others run. At the
//! end the image is closed, reopened read-only and compared sector by sector with the
//! model; the engine's own check and `qemu-img check` (package `qemu-utils`) must both find
//! no corruption and no leak.

use blockio::FileOpener;
use qcow2_engine::{CreateOptions, Image, ImageOptions};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const SIZE: u64 = 1 << 30;
const SECTOR: u64 = 512;

struct Args {
    seconds: u64,
    tasks: u64,
}

fn args() -> Res<Args> {
    let mut a = Args {
        seconds: 5,
        tasks: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v: u64 = it.next().ok_or("missing value")?.parse()?;
        match k.as_str() {
            "--seconds" => a.seconds = v,
            "--tasks" => a.tasks = v.max(1),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    Ok(a)
}

#[derive(Default)]
struct Stats {
    writes: u64,
    written: u64,
    reads: u64,
    read: u64,
    zeroes: u64,
    discards: u64,
    flushes: u64,
}

/// One task: random operations inside `[base, base+span)`, every read checked against the
/// task's sector model.
async fn worker(
    img: Arc<Image<FileOpener>>,
    task: u64,
    base: u64,
    span: u64,
    deadline: Instant,
) -> Res<(Vec<u8>, Stats)> {
    let mut model = vec![0u8; (span / SECTOR) as usize];
    let mut st = Stats::default();
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (task + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut i = 0u64;
    while Instant::now() < deadline {
        i += 1;
        let sectors = [1, 8, 16, 128, 256, 512][rnd(6) as usize];
        let len = sectors * SECTOR;
        let off = rnd((span - len) / SECTOR + 1) * SECTOR;
        let m = (off / SECTOR) as usize..((off + len) / SECTOR) as usize;
        match rnd(20) {
            0..=8 => {
                let pat = (i % 251 + 1) as u8;
                img.write(base + off, &vec![pat; len as usize]).await?;
                model[m].fill(pat);
                st.writes += 1;
                st.written += len;
            }
            9..=15 => {
                let got = img.read(base + off, len).await?;
                for (k, s) in m.clone().enumerate() {
                    let sector = &got[k * SECTOR as usize..(k + 1) * SECTOR as usize];
                    if sector.iter().any(|&b| b != model[s]) {
                        return Err(format!(
                            "task {task}: sector at {:#x} reads wrong",
                            base + s as u64 * SECTOR
                        )
                        .into());
                    }
                }
                st.reads += 1;
                st.read += len;
            }
            16 | 17 => {
                img.write_zeroes(base + off, len, rnd(2) == 0).await?;
                model[m].fill(0);
                st.zeroes += 1;
            }
            18 => {
                // Discard frees whole clusters only.
                let cs = img.cluster_size();
                let first = (base + off).div_ceil(cs) * cs;
                let last = (base + off + len) / cs * cs;
                img.discard(base + off, len).await?;
                if first < last {
                    model[((first - base) / SECTOR) as usize..((last - base) / SECTOR) as usize]
                        .fill(0);
                }
                st.discards += 1;
            }
            _ => {
                img.flush().await?;
                st.flushes += 1;
            }
        }
    }
    Ok((model, st))
}

fn main() -> Res<()> {
    let args = args()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("demo.qcow2");
    let path_s = path.to_str().ok_or("non-UTF-8 temp dir")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let span = SIZE / args.tasks / SECTOR * SECTOR;
    println!(
        "{}: 1 GiB, {} tasks writing, reading, zeroing, discarding and flushing for {} s ...",
        path.display(),
        args.tasks,
        args.seconds
    );
    let (models, stats, secs) = rt.block_on(async {
        qcow2_engine::create(&FileOpener, &path, &CreateOptions::new().size(SIZE)).await?;
        let img = Arc::new(Image::open(FileOpener, &path, ImageOptions::new()).await?);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(args.seconds);
        let mut handles = Vec::new();
        for t in 0..args.tasks {
            handles.push(tokio::spawn(worker(
                img.clone(),
                t,
                t * span,
                span,
                deadline,
            )));
        }
        let mut models = Vec::new();
        let mut total = Stats::default();
        for h in handles {
            let (m, st) = h.await??;
            models.push(m);
            total.writes += st.writes;
            total.written += st.written;
            total.reads += st.reads;
            total.read += st.read;
            total.zeroes += st.zeroes;
            total.discards += st.discards;
            total.flushes += st.flushes;
        }
        let secs = start.elapsed().as_secs_f64();
        Arc::try_unwrap(img)
            .map_err(|_| "image still shared")?
            .close()
            .await?;
        Res::Ok((models, total, secs))
    })?;
    let ops = stats.writes + stats.reads + stats.zeroes + stats.discards + stats.flushes;
    println!(
        "  {ops} operations in {secs:.1} s ({:.0} ops/s): {} writes ({:.0} MiB/s), {} reads ({:.0} MiB/s), {} write-zeroes, {} discards, {} flushes; every read matched the model",
        ops as f64 / secs,
        stats.writes,
        stats.written as f64 / secs / (1 << 20) as f64,
        stats.reads,
        stats.read as f64 / secs / (1 << 20) as f64,
        stats.zeroes,
        stats.discards,
        stats.flushes,
    );

    // Reopen read-only and compare the whole disk with the models.
    rt.block_on(async {
        let img = Image::open(FileOpener, &path, ImageOptions::new().read_only(true)).await?;
        for (t, model) in models.iter().enumerate() {
            let base = t as u64 * span;
            let chunk = 1 << 20;
            let mut off = 0;
            while off < span {
                let n = chunk.min(span - off);
                let got = img.read(base + off, n).await?;
                for (k, sector) in got.chunks(SECTOR as usize).enumerate() {
                    let want = model[(off / SECTOR) as usize + k];
                    if sector.iter().any(|&b| b != want) {
                        return Err(format!(
                            "after reopening: sector {:#x} differs from the model",
                            base + off + k as u64 * SECTOR
                        )
                        .into());
                    }
                }
                off += n;
            }
        }
        let report = img.check().await?;
        if !report.is_clean() {
            return Err(format!("the engine's check found problems: {:?}", report.messages).into());
        }
        println!(
            "  engine check: no errors, {}/{} clusters allocated",
            report.allocated_clusters, report.total_clusters
        );
        Res::Ok(())
    })?;
    println!(
        "  reopened read-only: all {} sectors equal the model",
        SIZE / SECTOR
    );

    let check = Command::new("qemu-img").args(["check", path_s]).output()?;
    let text = String::from_utf8_lossy(&check.stdout);
    println!(
        "  qemu-img check: {}",
        text.lines().next().unwrap_or_default()
    );
    if !check.status.success() {
        return Err(format!("qemu-img check failed:\n{text}").into());
    }
    let len = std::fs::metadata(&path)?.len();
    println!("  file: {} MiB", len >> 20);
    Ok(())
}
