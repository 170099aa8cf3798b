//! `qimg amend`: change an existing qcow2 image's options (qemu-img amend): `compat`,
//! `lazy_refcounts`, `refcount_bits`, `data_file`, `data_file_raw`;
//! `backing_file`/`backing_fmt` only as they are. qemu-img's syntax, messages and exit status.

use crate::cmd::create::amend_options;
use crate::names::NameArgs;
use anyhow::{anyhow, bail, Result};
use qcow2_engine::{AmendError, Error, ImageFormat, ImageOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// The arguments of `qimg amend`.
#[derive(clap::Args)]
pub struct AmendArgs {
    /// Image format (probed when absent); only qcow2 images can be amended.
    #[arg(short = 'f')]
    format: Option<String>,
    /// The options to change, `OPT=VAL[,OPT=VAL...]` (may be repeated; the last value of an
    /// option counts).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Quiet (nothing is printed on success anyway).
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for qemu-img's sake: it matters only for encryption, which qimg does not do.
    #[arg(long = "force")]
    force: bool,
    #[command(flatten)]
    pub names: NameArgs,
    /// The image.
    images: Vec<PathBuf>,
}

/// Runs `qimg amend`: exit status 0, or 1 with qemu-img's message on stderr.
pub async fn run(args: AmendArgs) -> ExitCode {
    crate::util::exit(1, amend(&args).await)
}

async fn amend(args: &AmendArgs) -> Result<()> {
    crate::qopts::check_lists(&args.options).map_err(|e| anyhow!(e))?;
    if args.options.is_empty() {
        bail!(
            "Must specify options (-o)\nTry '{} amend --help' for more info",
            crate::util::invoked_as()
        );
    }
    let format = match args.format.as_deref() {
        None => None,
        Some(f) => {
            Some(ImageFormat::from_name(f).ok_or_else(|| anyhow!("Unknown file format '{f}'"))?)
        }
    };
    if format == Some(ImageFormat::Raw) {
        bail!("Format driver 'raw' does not support option amendment");
    }
    if super::option_help::wants_help(&args.options) {
        // Without -f, the image says which format's options to list.
        if let (None, [image]) = (format, args.images.as_slice()) {
            let name = args.names.name(image, None)?;
            let img = crate::util::open_image(&name, ImageOptions::new().read_only(true)).await?;
            img.close().await?;
        }
        super::option_help::print_amend_help();
        return Ok(());
    }
    let [image] = args.images.as_slice() else {
        bail!("Expecting one image file name");
    };
    let name = args.names.name(image, args.format.as_deref())?;
    let img = crate::util::open_image(&name, ImageOptions::new()).await?;
    let (opts, size) = match amend_options(&args.options) {
        Ok(parsed) => parsed,
        Err(e) => {
            img.close().await?;
            bail!(e);
        }
    };
    if size.is_some_and(|s| s != img.size()) {
        img.close().await?;
        bail!("changing the size with amend is not supported by qimg (use resize)");
    }
    match img.amend(&opts).await {
        Ok(()) => Ok(()),
        Err(Error::Amend(AmendError::BackingFile)) => {
            bail!("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
        }
        Err(Error::Amend(e)) => bail!(e),
        Err(e) => Err(e.into()),
    }
}
