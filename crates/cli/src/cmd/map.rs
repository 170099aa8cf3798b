//! `qimg map`: where each guest range's data lives, as qemu-img map prints it.

use crate::names::NameArgs;
use crate::size::cvtnum_full;
use crate::util::{self, open_disk, OutputFormat};
use anyhow::{anyhow, bail, Result};
use qcow2_engine::MapEntry;
use std::path::PathBuf;
use std::process::ExitCode;

/// The arguments of `qimg map`.
#[derive(clap::Args)]
pub struct MapArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value = "human")]
    output: OutputFormat,
    /// Open in shared mode (qemu-img's -U): coexist with a writer of the image.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    pub names: NameArgs,
    /// The first guest offset to map (any byte offset; past the end maps nothing).
    #[arg(long = "start-offset")]
    start_offset: Option<String>,
    /// The most bytes to map from the start offset.
    #[arg(long = "max-length")]
    max_length: Option<String>,
    /// The image.
    image: PathBuf,
}

/// Runs `qimg map`: exit status 0, or 1 with the error on stderr.
pub async fn run(args: MapArgs) -> ExitCode {
    util::exit(1, map(&args).await)
}

async fn map(args: &MapArgs) -> Result<()> {
    // qemu-img's cvtnum: any size within 0..=i64::MAX, checked before the image is opened.
    let bound = |name: &str, v: &Option<String>| {
        v.as_deref()
            .map(|s| cvtnum_full(name, s, 0, i64::MAX as u64).map_err(|e| anyhow!(e)))
            .transpose()
    };
    let start = bound("start offset", &args.start_offset)?.unwrap_or(0);
    let max_length = bound("max length", &args.max_length)?;
    let disk = open_disk(
        &args.names.name(&args.image, args.format.as_deref())?,
        args.force_share,
    )
    .await?;
    let end = max_length.map_or(disk.size(), |l| start.saturating_add(l).min(disk.size()));
    let mut entries = match start < end {
        true => disk.map(start, end - start).await?,
        false => Vec::new(),
    };
    match args.output {
        OutputFormat::Json => {
            if entries.is_empty() {
                // qemu-img still prints the (empty) run it started at the start offset.
                entries.push(MapEntry {
                    start,
                    length: 0,
                    depth: 0,
                    present: false,
                    zero: false,
                    data: false,
                    compressed: false,
                    offset: None,
                    filename: None,
                });
            }
            let lines: Vec<String> = entries.iter().map(json_line).collect();
            println!("[{}]", lines.join(",\n"));
        }
        OutputFormat::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in &entries {
                if e.data && e.offset.is_none() {
                    bail!("File contains external, encrypted or compressed clusters.");
                }
                if e.data && !e.zero {
                    println!(
                        "{:<16}{:<16}{:<16}{}",
                        hex(e.start),
                        hex(e.length),
                        hex(e.offset.unwrap_or(0)),
                        e.filename
                            .as_deref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

/// One run as `qemu-img map --output=json` prints it.
fn json_line(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
