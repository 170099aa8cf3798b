//! `qimg convert`: write the guest view of an image to a raw file or a new qcow2 image,
//! leaving holes (unallocated clusters) where the source reads zeros.

mod copy;
mod source;

use crate::names::{ImageName, NameArgs};
use crate::progress::Progress;
use crate::size::cvtnum_full;
use crate::util::{self, open_disk};
use anyhow::{anyhow, bail, Context, Result};
use blockio::{Backend, FileOpener, LockRequest, OpenOptions, Opener, Perms};
use copy::{copy, requests, CopyOpts, Qcow2Sink, RawSink};
use qcow2_engine::ImageOptions;
use source::{open_snapshot, Reader, Sources};
use std::path::PathBuf;
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
    /// `-B`: the new image's backing file (as `-o backing_file=`): only what the source's
    /// top layer holds is written.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// `-F`: the backing file's format (as `-o backing_fmt=`).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// `-n`: the target exists: write into it instead of creating it (what the source reads
    /// as zeros is written as zeros).
    #[arg(short = 'n')]
    no_create: bool,
    /// `-c`: the new image's clusters compressed (qcow2 only, as qemu-img).
    #[arg(short = 'c')]
    compress: bool,
    /// Convert this internal snapshot of the source instead of its active layer:
    /// `ID_OR_NAME`, `snapshot.id=ID` or `snapshot.name=NAME` (qemu-img's -l).
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// `-p`: report progress as qemu-img does.
    #[arg(short = 'p')]
    progress: bool,
    /// `-q`: quiet (no progress report, no warnings).
    #[arg(short = 'q')]
    quiet: bool,
    /// `-S SIZE`: the shortest run of zeros left unallocated (a multiple of 512 up to
    /// 16 MiB; default 4 KiB); 0 writes everything.
    #[arg(short = 'S', allow_hyphen_values = true)]
    sparse: Option<String>,
    /// `--target-is-zero` (with `-n`): the existing target reads zeros; zeros are not
    /// written.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// `--salvage`: what cannot be read is written as zeros, with a warning.
    #[arg(long = "salvage")]
    salvage: bool,
    /// `-W`: out-of-order writes allowed (accepted: qimg writes in order).
    #[arg(short = 'W')]
    out_of_order: bool,
    /// `-m N`: parallel requests, 1 to 16 (accepted: qimg copies one request at a time).
    #[arg(short = 'm', allow_hyphen_values = true)]
    coroutines: Option<String>,
    /// `-C`: copy offloading (accepted: qimg reads and writes).
    #[arg(short = 'C')]
    copy_offload: bool,
    /// `-t CACHE`: the target's cache mode (accepted; the target is flushed at the end).
    #[arg(short = 't')]
    cache: Option<String>,
    /// `-T CACHE`: the sources' cache mode (accepted).
    #[arg(short = 'T')]
    source_cache: Option<String>,
    /// `-r RATE`: rate limit (accepted, not applied).
    #[arg(short = 'r')]
    rate: Option<String>,
    #[command(flatten)]
    pub names: NameArgs,
    /// The source images (concatenated), then the destination.
    files: Vec<PathBuf>,
}

/// Granularity of zero detection by default (qemu-img convert's `-S 4k`).
const SPARSE: u64 = 4096;
/// The largest `-S` (qemu-img's largest buffer, 16 MiB).
const MAX_SPARSE: u64 = 16 << 20;

/// What the options say, once checked.
struct Settings {
    /// `-S`: the unit of zero detection (`None`: `-S 0`, everything written).
    sparse: Option<u64>,
    /// The new image names a backing file (`-B`, `-o backing_file=`).
    backing: bool,
    /// `-o` with `-B` and `-F` folded in.
    options: Vec<String>,
}

/// Runs `qimg convert`: exit status 0, or 1 with the error on stderr.
pub async fn run(args: ConvertArgs) -> ExitCode {
    let settings = match settings(&args) {
        Ok(Some(s)) => s,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => return util::exit(1, Err::<(), _>(e)),
    };
    let mut progress = Progress::start(args.progress && !args.quiet, 1.0);
    let r = convert(&args, &settings, &mut progress).await;
    let code = util::exit(1, r.as_ref().map(|_| ()).map_err(|e| anyhow!("{e:#}")));
    progress.finish(r.is_ok());
    code
}

/// The options checked as qemu-img checks them before it opens anything (`None`: `-o help`
/// was answered).
fn settings(args: &ConvertArgs) -> Result<Option<Settings>> {
    crate::qopts::check_lists(&args.options).map_err(|e| anyhow!(e))?;
    let sparse = match args.sparse.as_deref() {
        None => Some(SPARSE),
        Some(s) => {
            let v = cvtnum_full("buffer size for sparse output", s, 0, i64::MAX as u64)
                .map_err(|e| anyhow!(e))?;
            if v % 512 != 0 || v > MAX_SPARSE {
                bail!(
                    "Invalid buffer size for sparse output specified. Valid sizes are \
                     multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse \
                     detection (fully allocates output)."
                );
            }
            (v != 0).then_some(v)
        }
    };
    if let Some(m) = args.coroutines.as_deref() {
        cvtnum_full("number of coroutines", m, 1, 16).map_err(|e| anyhow!(e))?;
    }
    if args.compress && args.copy_offload {
        bail!("Cannot enable copy offloading when -c is used");
    }
    if args.sparse.is_some() && args.copy_offload {
        bail!("Cannot enable copy offloading when -S is used");
    }
    if args.copy_offload && args.salvage {
        bail!("Cannot use copy offloading in salvaging mode");
    }
    if args.no_create && !args.options.is_empty() {
        bail!("-o has no effect when skipping image creation");
    }
    if args.target_is_zero && !args.no_create {
        bail!("--target-is-zero requires use of -n flag");
    }
    if super::option_help::wants_help(&args.options) {
        let target =
            (args.files.len() >= 2).then(|| args.files[args.files.len() - 1].display().to_string());
        super::option_help::print_create_help(&args.output_format, target.as_deref())?;
        return Ok(None);
    }
    if args.files.len() < 2 {
        bail!("Must specify image file name");
    }
    if let Some(c) = args.source_cache.as_deref().filter(|c| !valid_cache(c)) {
        bail!("Invalid source cache option: {c}");
    }
    // -B and -F are -o's backing_file and backing_fmt (commas doubled, as in -o values).
    let mut options = Vec::new();
    for (key, value) in [
        ("backing_file", &args.backing),
        ("backing_fmt", &args.backing_format),
    ] {
        if let Some(v) = value {
            options.push(format!("{key}={}", v.replace(',', ",,")));
        }
    }
    options.extend(args.options.iter().cloned());
    let backing = options
        .iter()
        .flat_map(|o| o.split(','))
        .any(|o| o.starts_with("backing_file="));
    Ok(Some(Settings {
        sparse,
        backing,
        options,
    }))
}

async fn convert(args: &ConvertArgs, settings: &Settings, progress: &mut Progress) -> Result<()> {
    let (sources, dest) = args.files.split_at(args.files.len() - 1);
    let dest = &dest[0];
    let mut disks = Vec::new();
    for s in sources {
        let name = args.names.name(s, args.format.as_deref())?;
        disks.push(open_disk(&name, args.force_share).await?);
    }
    let mut readers: Vec<Reader> = disks.iter().map(Reader::Disk).collect();
    if let Some(sel) = &args.snapshot {
        if disks.len() > 1 && !sel.starts_with("snapshot.") {
            bail!("No support for concatenating multiple snapshot");
        }
        readers[0] = open_snapshot(&disks[0], sel).await?;
    }
    let src = Sources::new(readers);
    if args.target_is_zero && settings.backing {
        // qemu-img says so, and succeeds without converting anything.
        eprintln!(
            "{}: Cannot use --target-is-zero when the destination image has a backing file",
            util::program()
        );
        return Ok(());
    }
    if sources.len() > 1 && settings.backing {
        bail!(
            "Having a backing file for the target makes no sense when concatenating multiple \
             input images"
        );
    }
    if settings.backing && args.output_format == "raw" {
        bail!("Backing file not supported for file format 'raw'");
    }
    if args.compress && args.output_format != "qcow2" {
        bail!("Compression not supported for this file format");
    }
    let job = Job {
        args,
        settings,
        src: &src,
        how: CopyOpts {
            dest,
            sparse: settings.sparse,
            compress: args.compress,
            salvage: args.salvage,
            quiet: args.quiet,
        },
    };
    match args.output_format.as_str() {
        "raw" => to_raw(&job, progress).await,
        "qcow2" => to_qcow2(&job, progress).await,
        other => bail!("output format '{other}' is not supported (use -O raw or -O qcow2)"),
    }
}

/// Whether `mode` is a cache mode QEMU knows (`-t`, `-T`).
fn valid_cache(mode: &str) -> bool {
    qcow2_engine::CacheMode::from_name(mode).is_some()
}

/// qemu-img checks the target's cache mode (`-t`) once the target is created.
fn check_cache(args: &ConvertArgs) -> Result<()> {
    match args.cache.as_deref().filter(|c| !valid_cache(c)) {
        Some(c) => bail!("Invalid cache option: {c}"),
        None => Ok(()),
    }
}

/// A conversion, its options checked and its sources open.
struct Job<'a> {
    args: &'a ConvertArgs,
    settings: &'a Settings,
    src: &'a Sources<'a>,
    how: CopyOpts<'a>,
}

impl<'a> Job<'a> {
    fn parts(
        &self,
    ) -> (
        &'a ConvertArgs,
        &'a Settings,
        &'a Sources<'a>,
        &CopyOpts<'a>,
    ) {
        (self.args, self.settings, self.src, &self.how)
    }
}

async fn to_raw(job: &Job<'_>, progress: &mut Progress) -> Result<()> {
    let (args, settings, src, how) = job.parts();
    let (size, dest) = (src.size(), how.dest);
    if !settings.options.is_empty() && !args.no_create {
        super::create::create_for_convert("raw", &settings.options, dest, size).await?;
    }
    check_cache(args)?;
    let out = FileOpener
        .open(
            dest,
            OpenOptions {
                write: true,
                create: !args.no_create,
                truncate: !args.no_create,
                direct: false,
                // A raw image open for writing, as QEMU locks it.
                lock: Some(LockRequest::new(
                    Perms::CONSISTENT_READ | Perms::WRITE,
                    Perms::ALL,
                )),
            },
        )
        .await
        .map_err(|e| match args.no_create {
            true => anyhow!(
                "Could not open '{0}': Could not open '{0}': {1}",
                dest.display(),
                qcow2_engine::strerror(&e)
            ),
            false => anyhow!("Could not create '{}': {e}", dest.display()),
        })?;
    if args.no_create && out.len().await? < size {
        bail!("output file is smaller than input file");
    }
    let sink = RawSink {
        file: &out,
        reads_zeros: !args.no_create || args.target_is_zero,
    };
    let runs = src.status(false, 0).await?;
    let requests = requests(&runs, size, settings.sparse.is_some(), None);
    copy(how, src, &requests, &sink, progress).await?;
    let written = || format!("error while writing '{}'", dest.display());
    if !args.no_create {
        out.set_len(size).await.with_context(written)?;
    }
    out.flush().await.with_context(written)
}

async fn to_qcow2(job: &Job<'_>, progress: &mut Progress) -> Result<()> {
    let (args, settings, src, how) = job.parts();
    let (size, dest) = (src.size(), how.dest);
    if !args.no_create {
        super::create::create_for_convert("qcow2", &settings.options, dest, size).await?;
    }
    check_cache(args)?;
    let out = util::open_image(&ImageName::parse(dest, false, None)?, ImageOptions::new()).await?;
    if out.size() < size {
        out.close().await?;
        bail!("output file is smaller than input file");
    }
    // As qemu-img: with a backing file the new image takes what the source's top layer
    // says, and the backing file provides the rest.
    let top_only = out.backing().is_some() && src.single_disk().is_some();
    let backing_size = out.backing().map_or(0, |b| b.size());
    let runs = src.status(top_only, backing_size).await?;
    let sink = Qcow2Sink {
        img: &out,
        reads_zeros: (out.backing().is_none() && !args.no_create) || args.target_is_zero,
        compress: args.compress,
    };
    // Compressed, qemu-img copies whole clusters.
    let cluster = args.compress.then(|| out.cluster_size());
    let requests = requests(&runs, size, settings.sparse.is_some(), cluster);
    let r = copy(how, src, &requests, &sink, progress).await;
    let closed = out.close().await;
    r?;
    closed.with_context(|| format!("error while writing '{}'", dest.display()))
}
