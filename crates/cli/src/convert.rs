//! `qimg convert -O raw`: write the guest view of an image to a raw file, leaving holes where
//! the image reads zeros.

use crate::util::open_disk;
use anyhow::{bail, Context, Result};
use blockio::{Backend, FileOpener, IoBuf, OpenOptions, Opener};
use std::path::Path;

/// Bytes read per request.
const CHUNK: usize = 2 << 20;
/// Granularity of zero detection (qemu-img convert's default `-S 4k`).
const SPARSE: usize = 4096;

/// Runs `qimg convert`.
pub async fn run(source: &Path, format: Option<&str>, out_format: &str, dest: &Path) -> Result<()> {
    if out_format != "raw" {
        bail!("output format '{out_format}' is not supported yet (use -O raw)");
    }
    let disk = open_disk(source, format).await?;
    let out = FileOpener
        .open(
            dest,
            OpenOptions {
                write: true,
                create: true,
                truncate: true,
                direct: false,
            },
        )
        .await
        .with_context(|| format!("Could not create '{}'", dest.display()))?;
    let size = disk.size();
    let mut buf = IoBuf::new(CHUNK);
    let mut offset = 0u64;
    while offset < size {
        let n = CHUNK.min((size - offset) as usize);
        buf.set_window(0..n);
        let (res, b) = disk.read_at(buf, offset).await;
        buf = b;
        res.with_context(|| format!("error while reading '{}'", source.display()))?;
        // Write each run of non-zero granules; zero granules stay holes.
        let mut i = 0;
        while i < n {
            let g = SPARSE.min(n - i);
            if buf.as_full_slice()[i..i + g].iter().all(|&x| x == 0) {
                i += g;
                continue;
            }
            let start = i;
            while i < n {
                let g = SPARSE.min(n - i);
                if buf.as_full_slice()[i..i + g].iter().all(|&x| x == 0) {
                    break;
                }
                i += g;
            }
            buf.set_window(start..i);
            let (res, b) = out.write_at(buf, offset + start as u64).await;
            buf = b;
            res.with_context(|| format!("error while writing '{}'", dest.display()))?;
        }
        offset += n as u64;
    }
    out.set_len(size)
        .await
        .with_context(|| format!("error while writing '{}'", dest.display()))?;
    out.flush()
        .await
        .with_context(|| format!("error while writing '{}'", dest.display()))?;
    Ok(())
}
