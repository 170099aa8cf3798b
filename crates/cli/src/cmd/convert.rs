//! `qimg convert`: write the guest view of an image to a raw file or a new qcow2 image,
//! leaving holes (unallocated clusters) where the source reads zeros.

use crate::util::{self, open_disk};
use anyhow::{bail, Context, Result};
use blockio::{Backend, FileOpener, IoBuf, LockRequest, OpenOptions, Opener, Perms};
use qcow2_engine::{Disk, Image, ImageOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The arguments of `qimg convert`.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Source format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    output_format: String,
    /// Options for the new image, as `qimg create -o` takes them (may be repeated).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Open in shared mode (qemu-img's -U): read the source while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image.
    source: PathBuf,
    /// Destination file.
    dest: PathBuf,
}

/// Bytes read per request.
const CHUNK: usize = 2 << 20;
/// Granularity of zero detection (qemu-img convert's default `-S 4k`).
const SPARSE: usize = 4096;

/// Runs `qimg convert`: exit status 0, or 1 with the error on stderr.
pub async fn run(args: ConvertArgs) -> ExitCode {
    util::exit(1, convert(&args).await)
}

async fn convert(args: &ConvertArgs) -> Result<()> {
    let (source, dest, options) = (&args.source, &args.dest, &args.options);
    let disk = open_disk(source, args.format.as_deref(), args.force_share).await?;
    match args.output_format.as_str() {
        "raw" => {
            if !options.is_empty() {
                super::create::create_for_convert("raw", options, dest, disk.size()).await?;
            }
            let out = FileOpener
                .open(
                    dest,
                    OpenOptions {
                        write: true,
                        create: true,
                        truncate: true,
                        direct: false,
                        // A raw image open for writing, as QEMU locks it.
                        lock: Some(LockRequest::new(
                            Perms::CONSISTENT_READ | Perms::WRITE,
                            Perms::ALL,
                        )),
                    },
                )
                .await
                .with_context(|| format!("Could not create '{}'", dest.display()))?;
            copy(&disk, source, dest, |buf, off| out.write_at(buf, off)).await?;
            out.set_len(disk.size())
                .await
                .with_context(|| format!("error while writing '{}'", dest.display()))?;
            out.flush()
                .await
                .with_context(|| format!("error while writing '{}'", dest.display()))?;
        }
        "qcow2" => {
            super::create::create_for_convert("qcow2", options, dest, disk.size()).await?;
            let out = Image::open(FileOpener, dest, ImageOptions::new())
                .await
                .with_context(|| format!("Could not open '{}'", dest.display()))?;
            let img = &out;
            copy(&disk, source, dest, move |buf, off| async move {
                let (res, buf) = img.write_at(buf, off).await;
                (res.map_err(std::io::Error::other), buf)
            })
            .await?;
            out.close()
                .await
                .with_context(|| format!("error while writing '{}'", dest.display()))?;
        }
        other => bail!("output format '{other}' is not supported (use -O raw or -O qcow2)"),
    }
    Ok(())
}

/// Copies every run of non-zero granules of `disk` through `write`.
async fn copy<F, Fut>(disk: &Disk<FileOpener>, source: &Path, dest: &Path, write: F) -> Result<()>
where
    F: Fn(IoBuf, u64) -> Fut,
    Fut: std::future::Future<Output = (std::io::Result<()>, IoBuf)>,
{
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
            let (res, b) = write(buf, offset + start as u64).await;
            buf = b;
            res.with_context(|| format!("error while writing '{}'", dest.display()))?;
        }
        offset += n as u64;
    }
    Ok(())
}
