//! `qimg compare`: whether two images show the same guest contents, as qemu-img compare
//! decides it (the extra part of the larger image must read as zeros unless `-s`; with `-s`,
//! the images must also have the same size and the same block status throughout).

use crate::names::NameArgs;
use crate::util::{self, open_disk};
use anyhow::{Context, Result};
use blockio::FileOpener;
use blockio::IoBuf;
use qcow2_engine::{Disk, MapEntry};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const CHUNK: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// The arguments of `qimg compare`.
#[derive(clap::Args)]
pub struct CompareArgs {
    /// Format of the first image (probed when absent).
    #[arg(short = 'f', long = "a-format")]
    format_a: Option<String>,
    /// Format of the second image (probed when absent).
    #[arg(short = 'F', long = "b-format")]
    format_b: Option<String>,
    /// Strict mode: images of different sizes or block status differ.
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Quiet: nothing on standard output (the exit status says it; errors still print).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Progress (accepted; not drawn, only the line it would end is).
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Cache mode (accepted; the images are only read).
    #[arg(short = 'T', long = "cache")]
    cache: Option<String>,
    /// Open in shared mode (qemu-img's -U): coexist with writers of the images.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    pub names: NameArgs,
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

/// Runs `qimg compare`: exit status 0 identical, 1 different, 2 on an error (on stderr).
pub async fn run(args: CompareArgs) -> ExitCode {
    let code = match compare(&args).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => util::exit::<()>(2, Err(e)),
    };
    if args.progress && !args.quiet {
        // qemu-img ends its progress line whatever the outcome.
        println!();
    }
    code
}

/// Compares the images; the exit code (0 identical, 1 different).
async fn compare(args: &CompareArgs) -> Result<u8> {
    let say = |line: String| {
        if !args.quiet {
            println!("{line}");
        }
    };
    let a = args.names.name(&args.a, args.format_a.as_deref())?;
    let b = args.names.name(&args.b, args.format_b.as_deref())?;
    let da = open_disk(&a, args.force_share).await?;
    let db = open_disk(&b, args.force_share).await?;
    let (sa, sb) = (da.size(), db.size());
    if sa != sb && args.strict {
        say("Strict mode: Image size mismatch!".into());
        return Ok(1);
    }
    let common = sa.min(sb);
    // qemu-img walks both images a block-status run at a time and stops at the first run
    // whose status (strict) or contents differ: a content difference counts only before
    // the first status difference.
    let status_mismatch = match args.strict {
        true => first_status_mismatch(&da, &db).await?,
        false => None,
    };
    let end = status_mismatch.unwrap_or(common);
    if let Some(at) = first_difference(&da, a.path(), &db, b.path(), end).await? {
        say(format!("Content mismatch at offset {at}!"));
        return Ok(1);
    }
    if let Some(at) = status_mismatch {
        say(format!("Strict mode: Offset {at} block status mismatch!"));
        return Ok(1);
    }
    if sa != sb {
        say("Warning: Image size mismatch!".into());
        let (longer, path) = if sa > sb {
            (&da, a.path())
        } else {
            (&db, b.path())
        };
        if let Some(at) = first_nonzero(longer, path, common).await? {
            say(format!("Content mismatch at offset {at}!"));
            return Ok(1);
        }
    }
    say("Images are identical.".into());
    Ok(0)
}

/// The first sector in `[0, end)` where the images' contents differ.
async fn first_difference(
    da: &Disk<FileOpener>,
    a: &Path,
    db: &Disk<FileOpener>,
    b: &Path,
    end: u64,
) -> Result<Option<u64>> {
    let mut off = 0;
    while off < end {
        let n = CHUNK.min(end - off);
        let x = read(da, a, off, n).await?;
        let y = read(db, b, off, n).await?;
        if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
            return Ok(Some(off + i as u64 / SECTOR * SECTOR));
        }
        off += n;
    }
    Ok(None)
}

/// The first sector from `from` to the end of `d` that does not read as zeros.
async fn first_nonzero(d: &Disk<FileOpener>, path: &Path, from: u64) -> Result<Option<u64>> {
    let mut off = from;
    while off < d.size() {
        let n = CHUNK.min(d.size() - off);
        let x = read(d, path, off, n).await?;
        if let Some(i) = x.iter().position(|&p| p != 0) {
            return Ok(Some(off + i as u64 / SECTOR * SECTOR));
        }
        off += n;
    }
    Ok(None)
}

/// QEMU's block-status flags of a run of the chain's map (allocated, zero, data, offset
/// valid, compressed, and whether it reaches the end of the image).
fn status(e: &MapEntry, size: u64) -> [bool; 6] {
    [
        e.present,
        e.zero,
        e.data,
        e.offset.is_some(),
        e.compressed,
        e.start + e.length == size,
    ]
}

/// The first offset where the block status of two images of the same size differs.
async fn first_status_mismatch(
    da: &Disk<FileOpener>,
    db: &Disk<FileOpener>,
) -> Result<Option<u64>> {
    let size = da.size();
    let (ma, mb) = (da.map(0, size).await?, db.map(0, size).await?);
    let (mut ia, mut ib) = (ma.iter().peekable(), mb.iter().peekable());
    while let (Some(x), Some(y)) = (ia.peek(), ib.peek()) {
        let at = x.start.max(y.start);
        if status(x, size) != status(y, size) {
            return Ok(Some(at));
        }
        let (ex, ey) = (x.start + x.length, y.start + y.length);
        if ex <= ey {
            ia.next();
        }
        if ey <= ex {
            ib.next();
        }
    }
    Ok(None)
}

async fn read(d: &Disk<FileOpener>, path: &Path, off: u64, n: u64) -> Result<IoBuf> {
    d.read(off, n)
        .await
        .with_context(|| format!("error while reading '{}' at offset {off}", path.display()))
}
