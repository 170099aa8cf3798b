//! `qimg commit`: write an image's data into its backing file (qemu-img commit), then empty
//! the image (`-d` keeps it). qemu-img's syntax, messages and exit status.

use crate::progress::Progress;
use anyhow::{anyhow, bail, Result};
use blockio::FileOpener;
use qcow2_engine::{resolve_backing, BackingChoice, Disk, Image, ImageFormat, ImageOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The arguments of `qimg commit`.
#[derive(clap::Args)]
pub struct CommitArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// The image to commit into: the backing file (the only one qimg commits into yet).
    #[arg(short = 'b')]
    base: Option<String>,
    /// Keep the image's data (do not empty it).
    #[arg(short = 'd')]
    keep: bool,
    /// Quiet: no "Image committed." line.
    #[arg(short = 'q')]
    quiet: bool,
    /// Report progress as qemu-img does.
    #[arg(short = 'p')]
    progress: bool,
    /// Cache mode (accepted; the files are flushed at the end).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Rate limit in bytes per second (accepted, not applied).
    #[arg(short = 'r')]
    rate: Option<String>,
    /// The image.
    image: PathBuf,
}

/// Runs `qimg commit`: exit status 0, or 1 with qemu-img's message on stderr.
pub async fn run(args: CommitArgs) -> ExitCode {
    let mut progress = None;
    let r = commit(&args, &mut progress).await;
    let code = crate::util::exit(1, r.as_ref().map(|_| ()).map_err(|e| anyhow!("{e:#}")));
    if let Some(p) = progress {
        p.finish(r.is_ok());
    }
    if r.is_ok() && !args.quiet {
        println!("Image committed.");
    }
    code
}

/// Commits the image; `progress` starts once the image is open (as qemu-img's does).
async fn commit(args: &CommitArgs, progress: &mut Option<Progress>) -> Result<()> {
    let image = args.image.as_path();
    if let Some(f) = args.format.as_deref() {
        if ImageFormat::from_name(f).is_none() {
            bail!("Unknown file format '{f}'");
        }
        if f == "raw" {
            bail!("Image does not have a backing file");
        }
    }
    // The image alone: its backing file is opened for writing below.
    let img = Image::open(
        FileOpener,
        image,
        ImageOptions::new().backing(BackingChoice::None),
    )
    .await
    .map_err(|e| anyhow!("Could not open '{}': {e}", image.display()))?;
    let p = progress.insert(Progress::start(args.progress && !args.quiet, 1.0));
    let header = img.header().clone();
    let Some(name) = header.backing_file.as_deref() else {
        img.close().await?;
        bail!("Image does not have a backing file");
    };
    let path = resolve_backing(image, name);
    if let Some(b) = args.base.as_deref() {
        // The name as the header has it, or a path to the same file (from here or from the
        // image's directory).
        let canonical = |p: &Path| std::fs::canonicalize(p).ok();
        let found = b == name
            || [Path::new(b).to_path_buf(), resolve_backing(image, b)]
                .iter()
                .any(|p| canonical(p).is_some() && canonical(p) == canonical(&path));
        if !found {
            img.close().await?;
            bail!(
                "Did not find '{b}' in the backing chain of '{}'",
                image.display()
            );
        }
    }
    let format = header
        .backing_format()
        .map(|f| ImageFormat::from_name(f).ok_or_else(|| anyhow!("Unknown file format '{f}'")))
        .transpose()?;
    let base = match Disk::open(FileOpener, &path, format, ImageOptions::new()).await {
        Ok(b) => b,
        Err(e) => {
            img.close().await?;
            bail!("Could not open backing file: {e}");
        }
    };
    let mut report = |done: u64, total: u64| {
        if total > 0 {
            p.set(done as f32 / total as f32 * 100.0);
        }
    };
    let r = img.commit_into(&base, !args.keep, &mut report).await;
    let closed = (base.close().await, img.close().await);
    r?;
    closed.0?;
    closed.1?;
    Ok(())
}
