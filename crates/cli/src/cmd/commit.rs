//! `qimg commit`: write an image's data into its backing file (qemu-img commit), then empty
//! the image (`-d` keeps it); with `-b`, the data of the chain above a deeper image into that
//! one. qemu-img's syntax, messages and exit status.

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
    /// The image of the backing chain to commit into (default: the backing file); the data
    /// of every image above it is written into it, and the image is kept (as with `-d`).
    #[arg(short = 'b')]
    base: Option<String>,
    /// Keep the image's data (do not empty it).
    #[arg(short = 'd')]
    keep: bool,
    /// Quiet: no "Image committed." line.
    #[arg(short = 'q')]
    quiet: bool,
    /// Progress (accepted; the copy is not reported).
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
    crate::util::exit(1, commit(&args).await)
}

async fn commit(args: &CommitArgs) -> Result<()> {
    let image = args.image.as_path();
    if let Some(f) = args.format.as_deref() {
        if ImageFormat::from_name(f).is_none() {
            bail!("Unknown file format '{f}'");
        }
        if f == "raw" {
            bail!("Image does not have a backing file");
        }
    }
    // The whole chain first, read-only, as qemu-img opens it: a broken chain is reported as
    // qemu-img reports it, and the base is looked for in it.
    let format = args.format.as_deref().and_then(ImageFormat::from_name);
    let read_only = ImageOptions::new().read_only(true);
    let chain = Disk::open(FileOpener, image, format, read_only.clone())
        .await
        .map_err(|e| anyhow!("Could not open '{}': {e}", image.display()))?;
    let found = find_base(&chain, image, args.base.as_deref());
    chain.close().await?;
    let (between, base_path, base_format) = found?;
    // Then the image alone (emptied unless -d, or -b, which implies it), the images between
    // it and the base alone, and the base for writing.
    let img = Image::open(
        FileOpener,
        image,
        ImageOptions::new().backing(BackingChoice::None),
    )
    .await
    .map_err(|e| anyhow!("Could not open '{}': {e}", image.display()))?;
    let mut layers = Vec::new();
    for path in &between {
        let opened = Image::open(
            FileOpener,
            path,
            read_only.clone().backing(BackingChoice::None),
        )
        .await;
        match opened {
            Ok(layer) => layers.push(layer),
            Err(e) => {
                img.close().await?;
                bail!("Could not open '{}': {e}", path.display());
            }
        }
    }
    let base = match Disk::open(
        FileOpener,
        &base_path,
        Some(base_format),
        ImageOptions::new(),
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            img.close().await?;
            bail!("Could not open backing file: {e}");
        }
    };
    let empty = !args.keep && args.base.is_none();
    let refs: Vec<&Image<FileOpener>> = layers.iter().collect();
    let r = img.commit_chain_into(&refs, &base, empty).await;
    let closed = (base.close().await, img.close().await);
    r?;
    closed.0?;
    closed.1?;
    if !args.quiet {
        println!("Image committed.");
    }
    Ok(())
}

/// The images below `image` and above the base (`base`: `-b`, or the backing file), and the
/// base's path and format, found in the opened `chain`. `-b` names a backing file as its
/// parent's header does, or is a path (from here or from the parent's directory) to the same
/// file, as qemu-img matches it.
fn find_base(
    chain: &Disk<FileOpener>,
    image: &Path,
    base: Option<&str>,
) -> Result<(Vec<PathBuf>, PathBuf, ImageFormat)> {
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    let mut between = Vec::new();
    let mut layer = chain;
    loop {
        let (Disk::Qcow2(img), Some(below)) = (layer, layer.backing()) else {
            match base {
                Some(b) => bail!(
                    "Did not find '{b}' in the backing chain of '{}'",
                    image.display()
                ),
                None => bail!("Image does not have a backing file"),
            }
        };
        let name = img.header().backing_file.as_deref().unwrap_or_default();
        let found = base.is_none_or(|b| {
            b == name
                || [PathBuf::from(b), resolve_backing(layer.path(), b)]
                    .iter()
                    .any(|p| canonical(p).is_some() && canonical(p) == canonical(below.path()))
        });
        if found {
            return Ok((between, below.path().to_path_buf(), below.format()));
        }
        between.push(below.path().to_path_buf());
        layer = below;
    }
}
