//! `qimg`: the qcow2-engine command line. Commands and options follow `qemu-img` (and
//! `qemu-io` for `qimg io`), so the same scripts run against both.

mod cmd;
mod util;

use cmd::{bench, check, compare, convert, create, info, io, map};

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Work with qcow2 images.
#[derive(Parser)]
#[command(
    name = "qimg",
    version,
    about = "qcow2 images: info, convert, map, compare"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Output format of `info` and `map`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Text for people, as qemu-img prints it.
    Human,
    /// JSON with qemu-img's field names.
    Json,
}

/// What `check -r` repairs.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairArg {
    /// Leaked clusters only.
    Leaks,
    /// Every error that can be repaired.
    All,
}

#[derive(Subcommand)]
enum Command {
    /// Create a qcow2 or raw image (qemu-img create).
    Create(create::CreateArgs),
    /// Show what an image is: format, sizes, features, backing file, snapshots, bitmaps.
    Info {
        /// Image format (probed when absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format.
        #[arg(long = "output", value_enum, default_value = "human")]
        output: OutputFormat,
        /// Show every image of the backing chain.
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        /// Open in shared mode (qemu-img's -U): coexist with a writer of the image.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The image.
        image: PathBuf,
    },
    /// Show where each guest range's data lives (qemu-img map).
    Map {
        /// Image format (probed when absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format.
        #[arg(long = "output", value_enum, default_value = "human")]
        output: OutputFormat,
        /// Open in shared mode (qemu-img's -U): coexist with a writer of the image.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The image.
        image: PathBuf,
    },
    /// Convert an image to raw (sparse: holes where the image reads zeros).
    Convert {
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
        /// Source image.
        source: PathBuf,
        /// Destination file.
        dest: PathBuf,
    },
    /// Check an image's metadata for consistency, optionally repairing it (qemu-img check).
    Check {
        /// Image format (probed when absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Repair leaks only, or all errors that can be repaired (opens the image read-write).
        #[arg(short = 'r', long = "repair", value_enum)]
        repair: Option<RepairArg>,
        /// Output format.
        #[arg(long = "output", value_enum, default_value = "human")]
        output: OutputFormat,
        /// Print nothing on stdout (diagnostics still go to stderr).
        #[arg(short = 'q')]
        quiet: bool,
        /// Open in shared mode (qemu-img's -U): check an image another process writes (read-only checks only).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The image.
        image: PathBuf,
    },
    /// Compare the contents of two images.
    Compare {
        /// Format of the first image (probed when absent).
        #[arg(short = 'f')]
        format_a: Option<String>,
        /// Format of the second image (probed when absent).
        #[arg(short = 'F')]
        format_b: Option<String>,
        /// Strict mode: images of different sizes differ.
        #[arg(short = 's')]
        strict: bool,
        /// Open in shared mode (qemu-img's -U): coexist with writers of the images.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// First image.
        a: PathBuf,
        /// Second image.
        b: PathBuf,
    },
    /// Run qemu-io commands on an image (qemu-io's syntax, output and exit status).
    Io(io::IoArgs),
    /// Benchmark an image with qemu-img bench's workload and options.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `qimg io` runs on a runtime of its own choosing (tokio-uring for `--aio io_uring`).
    let cli = match cli.command {
        Command::Io(args) => return io::main(args),
        Command::Bench(args) => return util::exit(1, bench::run(args)),
        command => Cli { command },
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qimg: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Create(args) => create::run(args).await,
            Command::Info {
                format,
                output,
                backing_chain,
                force_share,
                image,
            } => util::exit(
                1,
                info::run(
                    &image,
                    format.as_deref(),
                    output,
                    backing_chain,
                    force_share,
                )
                .await,
            ),
            Command::Map {
                format,
                output,
                force_share,
                image,
            } => util::exit(
                1,
                map::run(&image, format.as_deref(), output, force_share).await,
            ),
            Command::Convert {
                format,
                output_format,
                options,
                force_share,
                source,
                dest,
            } => util::exit(
                1,
                convert::run(
                    &source,
                    format.as_deref(),
                    &output_format,
                    &options,
                    &dest,
                    force_share,
                )
                .await,
            ),
            Command::Check {
                format,
                repair,
                output,
                quiet,
                force_share,
                image,
            } => {
                let repair = repair.map(|r| match r {
                    RepairArg::Leaks => qcow2_engine::RepairMode::Leaks,
                    RepairArg::All => qcow2_engine::RepairMode::All,
                });
                ExitCode::from(
                    check::run(
                        &image,
                        format.as_deref(),
                        repair,
                        output,
                        quiet,
                        force_share,
                    )
                    .await,
                )
            }
            Command::Compare {
                format_a,
                format_b,
                strict,
                force_share,
                a,
                b,
            } => match compare::run(
                &a,
                format_a.as_deref(),
                &b,
                format_b.as_deref(),
                strict,
                force_share,
            )
            .await
            {
                Ok(code) => ExitCode::from(code),
                Err(e) => util::exit::<()>(2, Err(e)),
            },
            Command::Io(_) | Command::Bench(_) => {
                unreachable!("qimg io and bench are dispatched before the runtime starts")
            }
        }
    })
}
