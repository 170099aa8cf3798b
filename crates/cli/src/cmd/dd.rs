//! `qimg dd`: copy part of an image into a new one, dd-style (qemu-img dd): `if=`, `of=`,
//! `bs=`, `count=`, `skip=`, with qemu-img's sizes, messages and exit status.

use crate::names::NameArgs;
use crate::size::cvtnum_full;
use crate::util::open_disk;
use anyhow::{anyhow, bail, Result};
use blockio::FileOpener;
use qcow2_engine::{Disk, ImageFormat, ImageOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The arguments of `qimg dd`.
#[derive(clap::Args)]
pub struct DdArgs {
    /// Input format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: raw (the default) or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    output_format: String,
    /// Open the input in shared mode.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    pub names: NameArgs,
    /// The operands: `if=INPUT`, `of=OUTPUT`, `bs=BYTES` (512), `count=BLOCKS`,
    /// `skip=BLOCKS`.
    operands: Vec<String>,
}

/// The operands, parsed.
struct Operands {
    input: PathBuf,
    output: PathBuf,
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
}

/// Runs `qimg dd`: exit status 0, or 1 with qemu-img's message on stderr.
pub async fn run(args: DdArgs) -> ExitCode {
    crate::util::exit(1, dd(&args).await)
}

fn operands(args: &DdArgs) -> Result<Operands> {
    let (mut input, mut output, mut bs, mut count, mut skip) = (None, None, 512, None, None);
    for op in &args.operands {
        let (key, value) = op.split_once('=').unwrap_or((op, ""));
        let number = |name: &str, min: u64, max: u64| cvtnum_full(name, value, min, max);
        match key {
            "if" => input = Some(PathBuf::from(value)),
            "of" => output = Some(PathBuf::from(value)),
            "bs" => bs = number("bs", 1, i32::MAX as u64).map_err(|e| anyhow!(e))?,
            "count" => count = Some(number("count", 0, i64::MAX as u64).map_err(|e| anyhow!(e))?),
            "skip" => skip = Some(number("skip", 0, i64::MAX as u64).map_err(|e| anyhow!(e))?),
            _ => bail!("unrecognized operand {key}"),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        bail!("Must specify both input and output files");
    };
    Ok(Operands {
        input,
        output,
        bs,
        count,
        skip,
    })
}

async fn dd(args: &DdArgs) -> Result<()> {
    let ops = operands(args)?;
    let out_format = ImageFormat::from_name(&args.output_format)
        .ok_or_else(|| anyhow!("Unknown file format '{}'", args.output_format))?;
    let input = args.names.name(&ops.input, args.format.as_deref())?;
    let source = open_disk(&input, args.force_share).await?;
    // qemu-img's arithmetic: count blocks from the start, then skip blocks of those.
    let mut size = source.size();
    if let Some(c) = ops.count.and_then(|c| c.checked_mul(ops.bs)) {
        size = size.min(c);
    }
    let start = match ops.skip {
        None => 0,
        Some(s) => match s.checked_mul(ops.bs).filter(|&o| o <= size) {
            Some(o) => o,
            None => {
                eprintln!(
                    "{}: {}: cannot skip to specified offset",
                    crate::util::program(),
                    ops.input.display()
                );
                size
            }
        },
    };
    super::create::create_for_convert(out_format.name(), &[], &ops.output, size - start).await?;
    let out = Disk::open(
        FileOpener,
        &ops.output,
        Some(out_format),
        ImageOptions::new(),
    )
    .await
    .map_err(|e| anyhow!("Could not open '{}': {e}", ops.output.display()))?;
    let copied = copy(&source, &out, start, size, ops.bs, &ops.input).await;
    let closed = out.close().await;
    copied?;
    Ok(closed?)
}

/// Copies `[start, end)` of `source` to the start of `out`, `bs` bytes a request (everything
/// written, zeros too, as qemu-img dd does).
async fn copy(
    source: &Disk<FileOpener>,
    out: &Disk<FileOpener>,
    start: u64,
    end: u64,
    bs: u64,
    input: &Path,
) -> Result<()> {
    // At least a MiB a request: bs only sets the arithmetic.
    let step = bs.max(1 << 20);
    let mut pos = start;
    while pos < end {
        let n = step.min(end - pos);
        let data = source
            .read(pos, n)
            .await
            .map_err(|e| anyhow!("{}: error while reading: {e}", input.display()))?;
        out.write_at(data, pos - start).await.0?;
        pos += n;
    }
    Ok(())
}
