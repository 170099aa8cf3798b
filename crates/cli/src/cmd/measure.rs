//! `qimg measure`: the file size a new image needs (qemu-img measure), for a virtual size or
//! for the contents of an existing image, with qemu-img's options, output and messages.

use crate::cmd::create::measure_options;
use crate::names::NameArgs;
use crate::size::cvtnum_full;
use crate::util::{self, open_disk, OutputFormat};
use anyhow::{anyhow, bail, Result};
use blockio::FileOpener;
use qcow2_engine::{measure_disk, measure_size, Disk, MeasureTarget, Measurement};
use std::path::PathBuf;
use std::process::ExitCode;

/// The arguments of `qimg measure`. As in qemu-img, an option given twice takes the last value.
#[derive(clap::Args)]
#[command(args_override_self = true)]
pub struct MeasureArgs {
    /// Format of the source image (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Options of the new image, `OPT=VAL[,OPT=VAL...]` (may be repeated), as for `create`.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Format of the new image: qcow2 or raw (default raw, as qemu-img).
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Open the source in shared mode (qemu-img's -U): coexist with a writer of it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Measure a new, empty image of this virtual size instead of a source image.
    #[arg(long = "size", allow_hyphen_values = true)]
    size: Option<String>,
    #[command(flatten)]
    pub names: NameArgs,
    /// The source image.
    image: Option<PathBuf>,
}

/// Runs `qimg measure`: exit status 0, or 1 with qemu-img's message on stderr.
pub async fn run(args: MeasureArgs) -> ExitCode {
    util::exit(1, measure(&args).await)
}

/// What is measured: an existing image, or an empty one of a size.
enum Source {
    Image(Box<Disk<FileOpener>>),
    Size(u64),
}

async fn measure(args: &MeasureArgs) -> Result<()> {
    let output = match args.output.as_str() {
        "human" => OutputFormat::Human,
        "json" => OutputFormat::Json,
        other => bail!(
            "--output expects 'human' or 'json' not '{other}'\n\
             Try '{} measure --help' for more info",
            crate::util::invoked_as()
        ),
    };
    let size = match &args.size {
        Some(s) => Some(cvtnum_full("image size", s, 0, i64::MAX as u64).map_err(|e| anyhow!(e))?),
        None => None,
    };
    let source = match (&args.image, size) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename."),
        (None, None) => bail!("Either --size N or one filename must be specified."),
        (Some(path), None) => Source::Image(Box::new(
            open_disk(
                &args.names.name(path, args.format.as_deref())?,
                args.force_share,
            )
            .await?,
        )),
        (None, Some(size)) => Source::Size(size),
    };
    let opts = measure_options(&args.out_format, &args.options).map_err(|e| anyhow!(e))?;
    let target = match &opts {
        Some(co) => MeasureTarget::Qcow2(co),
        None => MeasureTarget::Raw,
    };
    let m = match source {
        Source::Image(disk) => {
            let m = measure_disk(target, &disk).await.map_err(|e| match e {
                qcow2_engine::Error::Create(c) => anyhow!(c),
                other => anyhow!(other),
            });
            disk.close().await?;
            m?
        }
        Source::Size(size) => measure_size(target, size)?,
    };
    print(&m, output);
    Ok(())
}

/// Prints the figures as qemu-img does (`img_measure`, `dump_json_block_measure_info`).
fn print(m: &Measurement, output: OutputFormat) {
    match output {
        OutputFormat::Human => {
            println!("required size: {}", m.required);
            println!("fully allocated size: {}", m.fully_allocated);
            if let Some(b) = m.bitmaps {
                println!("bitmaps size: {b}");
            }
        }
        OutputFormat::Json => {
            let mut fields = Vec::new();
            if let Some(b) = m.bitmaps {
                fields.push(format!("    \"bitmaps\": {b}"));
            }
            fields.push(format!("    \"required\": {}", m.required));
            fields.push(format!("    \"fully-allocated\": {}", m.fully_allocated));
            println!("{{\n{}\n}}", fields.join(",\n"));
        }
    }
}
