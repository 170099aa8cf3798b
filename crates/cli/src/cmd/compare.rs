//! `qimg compare`: whether two images show the same guest contents, as qemu-img compare
//! decides it (the extra part of the larger image must read as zeros unless `-s`).

use crate::names::NameArgs;
use crate::util::{self, open_disk};
use anyhow::{Context, Result};
use blockio::FileOpener;
use blockio::IoBuf;
use qcow2_engine::Disk;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const CHUNK: usize = 1 << 20;
const SECTOR: u64 = 512;

/// The arguments of `qimg compare`.
#[derive(clap::Args)]
pub struct CompareArgs {
    /// Format of the first image (probed when absent).
    #[arg(short = 'f')]
    format_a: Option<String>,
    /// Format of the second image (probed when absent).
    #[arg(short = 'F')]
    format_b: Option<String>,
    /// Strict mode: images of different sizes differ.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet: nothing on standard output (the exit status says it; errors still print).
    #[arg(short = 'q')]
    quiet: bool,
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
    match compare(&args).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => util::exit::<()>(2, Err(e)),
    }
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
    if sa != sb {
        if args.strict {
            say("Strict mode: Image size mismatch!".into());
            return Ok(1);
        }
        say("Warning: Image size mismatch!".into());
    }
    let common = sa.min(sb);
    let mut off = 0;
    while off < common {
        let n = CHUNK.min((common - off) as usize);
        let x = read(&da, a.path(), off, n).await?;
        let y = read(&db, b.path(), off, n).await?;
        if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
            say(format!(
                "Content mismatch at offset {}!",
                off + i as u64 / SECTOR * SECTOR
            ));
            return Ok(1);
        }
        off += n as u64;
    }
    let (longer, path) = if sa > sb {
        (&da, a.path())
    } else {
        (&db, b.path())
    };
    while off < longer.size() {
        let n = CHUNK.min((longer.size() - off) as usize);
        let x = read(longer, path, off, n).await?;
        if let Some(i) = x.iter().position(|&p| p != 0) {
            say(format!(
                "Content mismatch at offset {}!",
                off + i as u64 / SECTOR * SECTOR
            ));
            return Ok(1);
        }
        off += n as u64;
    }
    say("Images are identical.".into());
    Ok(0)
}

async fn read(d: &Disk<FileOpener>, path: &Path, off: u64, n: usize) -> Result<IoBuf> {
    d.read(off, n)
        .await
        .with_context(|| format!("error while reading '{}' at offset {off}", path.display()))
}
