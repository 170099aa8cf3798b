//! `qimg resize`: qemu-img resize for qcow2 and raw images, with its syntax (`[+|-]SIZE`,
//! `--shrink`, `--preallocation`), its checks in its order, its messages and its exit status
//! (0, or 1 with the message on stderr), and "Image resized." on stdout.

use crate::names::NameArgs;
use crate::qopts;
use blockio::FileOpener;
use qcow2_engine::{Disk, Error, ImageOptions, Preallocation, ResizeError, ResizeOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `qimg resize`.
#[derive(clap::Args)]
pub struct ResizeArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// What to allocate for the area a grow adds: off, metadata (qcow2), falloc, full.
    #[arg(long = "preallocation", value_name = "PREALLOC")]
    preallocation: Option<String>,
    /// Allow a size below the current one (everything past the new end is deleted).
    #[arg(long = "shrink")]
    shrink: bool,
    /// Quiet: do not print "Image resized.".
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[command(flatten)]
    pub names: NameArgs,
    /// The image.
    image: PathBuf,
    /// The new size, or with `+` or `-` the amount to grow or shrink by: bytes, or with a
    /// suffix k, M, G, T, P, E (powers of 1024).
    #[arg(allow_hyphen_values = true, value_name = "[+-]SIZE")]
    size: String,
}

/// Why qemu-img resize stops, and what it prints.
struct Failure(Vec<String>);

impl Failure {
    fn one(msg: impl Into<String>) -> Self {
        Failure(vec![msg.into()])
    }
}

/// Runs `qimg resize`: exit status 0, or 1 with the message(s) on stderr.
pub async fn run(args: ResizeArgs) -> ExitCode {
    match resize(&args).await {
        Ok(()) => {
            if !args.quiet {
                println!("Image resized.");
            }
            ExitCode::SUCCESS
        }
        Err(Failure(lines)) => {
            for l in lines {
                eprintln!("{}: {l}", crate::util::program());
            }
            ExitCode::from(1)
        }
    }
}

/// The size argument: how it changes the size, and by how much (qemu-img strips one sign,
/// then reads the rest as a QemuOpts size).
fn parse_new_size(arg: &str) -> Result<(i64, u64), Failure> {
    let (sign, text) = match arg.as_bytes().first() {
        Some(b'+') => (1, &arg[1..]),
        Some(b'-') => (-1, &arg[1..]),
        _ => (0, arg),
    };
    qopts::size_value("size", text)
        .map(|n| (sign, n))
        .map_err(Failure::one)
}

async fn resize(args: &ResizeArgs) -> Result<(), Failure> {
    let mode = match args.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(name) => Preallocation::from_name(name)
            .ok_or_else(|| Failure::one(format!("Invalid preallocation mode '{name}'")))?,
    };
    let (sign, n) = parse_new_size(&args.size)?;
    let name = (args.names)
        .name(&args.image, args.format.as_deref())
        .map_err(|e| Failure::one(format!("{e:#}")))?;
    let disk = crate::util::open_disk_with(&name, ImageOptions::new())
        .await
        .map_err(|e| Failure::one(format!("{e:#}")))?;
    let current = disk.size();
    // qemu-img's int64 arithmetic: anything at or past 2^63 is negative, hence not positive.
    let total = if sign == 0 {
        n as i64
    } else {
        (current as i64).wrapping_add((n as i64).wrapping_mul(sign))
    };
    let result = check_and_resize(&disk, current, total, args.shrink, mode).await;
    let closed = disk.close().await;
    result?;
    closed.map_err(|e| Failure::one(e.to_string()))
}

/// qemu-img's checks of the new size, in its order, then the resize itself.
async fn check_and_resize(
    disk: &Disk<FileOpener>,
    current: u64,
    total: i64,
    shrink: bool,
    mode: Preallocation,
) -> Result<(), Failure> {
    if total <= 0 {
        return Err(Failure::one("New image size must be positive"));
    }
    let total = total as u64;
    if total <= current && mode != Preallocation::Off {
        return Err(Failure::one(
            "Preallocation can only be used for growing images",
        ));
    }
    let options = ResizeOptions::new().shrink(shrink).preallocation(mode);
    match disk.resize(total, options).await {
        Ok(()) => Ok(()),
        Err(Error::Resize(e @ ResizeError::ShrinkNotAllowed { .. })) => Err(Failure(vec![
            e.to_string(),
            "warning: Shrinking an image will delete all data beyond the shrunken image's \
             end. Before performing such an operation, make sure there is no important data \
             there."
                .into(),
        ])),
        Err(e) => Err(Failure::one(e.to_string())),
    }
}
