//! `qimg compare`: whether two images show the same guest contents, as qemu-img compare
//! decides it (the extra part of the larger image must read as zeros unless `-s`).

use crate::util::open_disk;
use anyhow::{Context, Result};
use blockio::FileOpener;
use blockio::IoBuf;
use qcow2_engine::Disk;
use std::path::Path;

const CHUNK: usize = 1 << 20;
const SECTOR: u64 = 512;

/// Runs `qimg compare`; returns the exit code (0 identical, 1 different).
pub async fn run(
    a: &Path,
    fmt_a: Option<&str>,
    b: &Path,
    fmt_b: Option<&str>,
    strict: bool,
    force_share: bool,
) -> Result<u8> {
    let da = open_disk(a, fmt_a, force_share).await?;
    let db = open_disk(b, fmt_b, force_share).await?;
    let (sa, sb) = (da.size(), db.size());
    if sa != sb {
        if strict {
            println!("Strict mode: Image size mismatch!");
            return Ok(1);
        }
        println!("Warning: Image size mismatch!");
    }
    let common = sa.min(sb);
    let mut off = 0;
    while off < common {
        let n = CHUNK.min((common - off) as usize);
        let x = read(&da, a, off, n).await?;
        let y = read(&db, b, off, n).await?;
        if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
            println!(
                "Content mismatch at offset {}!",
                off + i as u64 / SECTOR * SECTOR
            );
            return Ok(1);
        }
        off += n as u64;
    }
    let (longer, path) = if sa > sb { (&da, a) } else { (&db, b) };
    while off < longer.size() {
        let n = CHUNK.min((longer.size() - off) as usize);
        let x = read(longer, path, off, n).await?;
        if let Some(i) = x.iter().position(|&p| p != 0) {
            println!(
                "Content mismatch at offset {}!",
                off + i as u64 / SECTOR * SECTOR
            );
            return Ok(1);
        }
        off += n as u64;
    }
    println!("Images are identical.");
    Ok(0)
}

async fn read(d: &Disk<FileOpener>, path: &Path, off: u64, n: usize) -> Result<IoBuf> {
    d.read(off, n)
        .await
        .with_context(|| format!("error while reading '{}' at offset {off}", path.display()))
}
