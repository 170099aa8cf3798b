//! `qimg map`: where each guest range's data lives, as qemu-img map prints it.

use crate::names::NameArgs;
use crate::util::{self, open_disk, OutputFormat};
use anyhow::{bail, Result};
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
    /// The image.
    image: PathBuf,
}

/// Runs `qimg map`: exit status 0, or 1 with the error on stderr.
pub async fn run(args: MapArgs) -> ExitCode {
    util::exit(1, map(&args).await)
}

async fn map(args: &MapArgs) -> Result<()> {
    let disk = open_disk(
        &args.names.name(&args.image, args.format.as_deref())?,
        args.force_share,
    )
    .await?;
    let entries = disk.map(0, disk.size()).await?;
    match args.output {
        OutputFormat::Json => {
            let lines: Vec<String> = entries
                .iter()
                .map(|e| {
                    let mut s = format!(
                        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
                    );
                    if let Some(o) = e.offset {
                        s.push_str(&format!(", \"offset\": {o}"));
                    }
                    s.push('}');
                    s
                })
                .collect();
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

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
