//! `qimg commit`: write an image's data into its backing file (qemu-img commit), then empty
//! the image (`-d` keeps it); with `-b`, the data of the chain above a deeper image into that
//! one. qemu-img's syntax, messages and exit status.

use crate::names::NameArgs;
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
    /// Report progress as qemu-img does.
    #[arg(short = 'p')]
    progress: bool,
    /// Cache mode (accepted; the files are flushed at the end).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Rate limit in bytes per second (accepted, not applied).
    #[arg(short = 'r')]
    rate: Option<String>,
    #[command(flatten)]
    pub names: NameArgs,
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
    let name = args.names.name(&args.image, args.format.as_deref())?;
    let image = name.path();
    if name.format() == Some(ImageFormat::Raw) {
        bail!("Image does not have a backing file");
    }
    // The whole chain first, read-only, as qemu-img opens it: a broken chain is reported as
    // qemu-img reports it, and the base is looked for in it.
    let read_only = ImageOptions::new().read_only(true);
    let chain = crate::util::open_disk_with(&name, read_only.clone()).await?;
    // qemu-img starts its report once the image is open, before it looks for the base.
    let p = progress.insert(Progress::start(args.progress && !args.quiet, 1.0));
    let found = find_base(&chain, image, args.base.as_deref());
    chain.close().await?;
    let (between, base_path, base_format) = found?;
    // Then the image alone (emptied unless -d, or -b, which implies it), the images between
    // it and the base alone, and the base for writing.
    let img =
        crate::util::open_image(&name, ImageOptions::new().backing(BackingChoice::None)).await?;
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
    let mut report = |done: u64, total: u64| {
        if total > 0 {
            p.set(done as f32 / total as f32 * 100.0);
        }
    };
    let empty = !args.keep && args.base.is_none();
    let refs: Vec<&Image<FileOpener>> = layers.iter().collect();
    let r = img
        .commit_chain_into(&refs, &base, empty, &mut report)
        .await;
    let closed = (base.close().await, img.close().await);
    r?;
    closed.0?;
    closed.1?;
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
