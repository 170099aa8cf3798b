//! `qimg rebase`: change the backing file of an image (qemu-img rebase): safe mode copies
//! into the image what would read differently through the new backing file; `-u` only
//! rewrites the header. qemu-img's syntax, messages and exit status.

use crate::names::NameArgs;
use crate::progress::Progress;
use crate::util::invoked_as;
use anyhow::{anyhow, bail, Result};
use blockio::FileOpener;
use qcow2_engine::{Disk, ImageFormat, ImageOptions, NewBacking};
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
    /// Report progress as qemu-img does.
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
    #[command(flatten)]
    pub names: NameArgs,
    /// The image.
    image: PathBuf,
}

/// Runs `qimg rebase`: exit status 0, or 1 with qemu-img's message on stderr.
pub async fn run(args: RebaseArgs) -> ExitCode {
    let mut progress = None;
    let r = rebase(&args, &mut progress).await;
    let code = crate::util::exit(1, r.as_ref().map(|_| ()).map_err(|e| anyhow!("{e:#}")));
    if let Some(p) = progress {
        p.finish(r.is_ok());
    }
    code
}

/// Bytes qemu-img rebase compares per request.
const BUF: u64 = 2 << 20;

/// How a safe rebase moves the progress report, as qemu-img's does: one step (the same
/// share of 100%, by 2 MiB of the image) per request qemu-img would make of the ranges
/// the image does not allocate: 2 MiB at most, cut where the image allocates and at the
/// end of each backing file.
struct Steps<'a> {
    progress: &'a mut Progress,
    /// The share of each step.
    share: f32,
    /// Where requests are cut besides (the ends of the old and the new backing file).
    cuts: [Option<u64>; 2],
    /// The end of the last range compared, and of the last request.
    last_end: u64,
    request_end: u64,
}

impl Steps<'_> {
    fn new(progress: &mut Progress, size: u64, cuts: [Option<u64>; 2]) -> Steps<'_> {
        let share = match size {
            0 => 0.0,
            _ => 100.0 / (size / size.min(BUF)) as f32,
        };
        Steps {
            progress,
            share,
            cuts,
            last_end: 0,
            request_end: 0,
        }
    }

    /// The range `offset..offset+len` was compared.
    fn compared(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        if offset != self.last_end {
            self.request_end = offset;
        }
        let mut at = offset;
        while at < end {
            if at >= self.request_end {
                let cut = self.cuts.iter().flatten().filter(|&&c| c > at).min();
                self.request_end = (at + BUF).min(cut.copied().unwrap_or(u64::MAX));
                self.progress.advance(self.share, 100.0);
            }
            at = self.request_end.min(end);
        }
        self.last_end = end;
    }
}

fn format(name: Option<&str>) -> Result<Option<ImageFormat>> {
    name.map(|f| ImageFormat::from_name(f).ok_or_else(|| anyhow!("Unknown file format '{f}'")))
        .transpose()
}

/// Rebases the image; `progress` starts once the options are checked (as qemu-img's
/// does).
async fn rebase(args: &RebaseArgs, progress: &mut Option<Progress>) -> Result<()> {
    if !args.unsafe_mode && args.backing.is_none() {
        bail!(
            "Must specify backing file (-b) or use unsafe mode (-u)\n\
             Try '{} rebase --help' for more info",
            invoked_as()
        );
    }
    let p = progress.insert(Progress::start(args.progress && !args.quiet, 2.0));
    let name = args.names.name(&args.image, args.format.as_deref())?;
    let image = name.path();
    let new = match args.backing.as_deref().filter(|b| !b.is_empty()) {
        None => None,
        Some(name) => Some(NewBacking {
            name: name.to_owned(),
            format: format(args.backing_format.as_deref())?,
        }),
    };
    if name.format() == Some(ImageFormat::Raw) {
        bail!("Could not change the backing file: Operation not supported");
    }
    // Unsafe mode does not open the backing chain (it may be gone).
    let options = ImageOptions::new().backing(if args.unsafe_mode {
        qcow2_engine::BackingChoice::None
    } else {
        qcow2_engine::BackingChoice::FromHeader
    });
    let img = crate::util::open_image(&name, options).await?;
    if args.unsafe_mode {
        return Ok(img.rebase(new.as_ref(), None, &mut |_, _| {}).await?);
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
    let old_size = img.backing().map(|b| b.size());
    let new_size = backing.as_ref().map(|b| b.size());
    let mut steps = Steps::new(p, img.size(), [old_size, new_size]);
    let mut compared = |offset, len| steps.compared(offset, len);
    Ok(img
        .rebase(new.as_ref(), Some(backing.as_ref()), &mut compared)
        .await?)
}
