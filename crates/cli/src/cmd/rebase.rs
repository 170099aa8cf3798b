//! `qimg rebase`: change the backing file of an image (qemu-img rebase): safe mode copies
//! into the image what would read differently through the new backing file; `-u` only
//! rewrites the header. qemu-img's syntax, messages and exit status.

use crate::util::invoked_as;
use anyhow::{anyhow, bail, Result};
use blockio::FileOpener;
use qcow2_engine::{Disk, Image, ImageFormat, ImageOptions, NewBacking};
use std::path::PathBuf;
use std::process::ExitCode;

/// The arguments of `qimg rebase`.
#[derive(clap::Args)]
pub struct RebaseArgs {
    /// Image format (probed when absent); only qcow2 images have a backing file.
    #[arg(short = 'f')]
    format: Option<String>,
    /// The new backing file (an empty name: none; the image then stands alone).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// The new backing file's format (required with a backing file).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Unsafe mode: only the header changes; nothing is compared or copied.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Quiet (nothing is printed on success anyway).
    #[arg(short = 'q')]
    quiet: bool,
    /// Progress (accepted; the copy is not reported).
    #[arg(short = 'p')]
    progress: bool,
    /// Cache mode of the image (accepted; the image's writes are flushed at the end).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Cache mode of the backing files (accepted).
    #[arg(short = 'T')]
    source_cache: Option<String>,
    /// Open the backing files in shared mode.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    image: PathBuf,
}

/// Runs `qimg rebase`: exit status 0, or 1 with qemu-img's message on stderr.
pub async fn run(args: RebaseArgs) -> ExitCode {
    crate::util::exit(1, rebase(&args).await)
}

fn format(name: Option<&str>) -> Result<Option<ImageFormat>> {
    name.map(|f| ImageFormat::from_name(f).ok_or_else(|| anyhow!("Unknown file format '{f}'")))
        .transpose()
}

async fn rebase(args: &RebaseArgs) -> Result<()> {
    if !args.unsafe_mode && args.backing.is_none() {
        bail!(
            "Must specify backing file (-b) or use unsafe mode (-u)\n\
             Try '{} rebase --help' for more info",
            invoked_as()
        );
    }
    let image = args.image.as_path();
    let new = match args.backing.as_deref().filter(|b| !b.is_empty()) {
        None => None,
        Some(name) => Some(NewBacking {
            name: name.to_owned(),
            format: format(args.backing_format.as_deref())?,
        }),
    };
    if format(args.format.as_deref())? == Some(ImageFormat::Raw) {
        bail!("Could not change the backing file: Operation not supported");
    }
    // Unsafe mode does not open the backing chain (it may be gone).
    let options = ImageOptions::new().backing(if args.unsafe_mode {
        qcow2_engine::BackingChoice::None
    } else {
        qcow2_engine::BackingChoice::FromHeader
    });
    let img = Image::open(FileOpener, image, options)
        .await
        .map_err(|e| anyhow!("Could not open '{}': {e}", image.display()))?;
    if args.unsafe_mode {
        return Ok(img.rebase(new.as_ref(), None).await?);
    }
    let backing = match &new {
        None => None,
        Some(n) => {
            let path = qcow2_engine::resolve_backing(image, &n.name);
            let opts = ImageOptions::new()
                .read_only(true)
                .force_share(args.force_share);
            // Without -F the format is probed (and the header change refused after the copy,
            // as qemu-img does).
            let disk = Disk::open(FileOpener, &path, n.format, opts).await;
            match disk {
                Ok(d) => Some(d),
                Err(e) => {
                    img.close().await?;
                    bail!("Could not open new backing file '{}': {e}", n.name);
                }
            }
        }
    };
    Ok(img.rebase(new.as_ref(), Some(backing.as_ref())).await?)
}
