//! `qimg`: the qcow2-engine command line. Commands and options follow `qemu-img` (and
//! `qemu-io` for `qimg io`), so the same scripts run against both.
//!
//! This file holds the command line's top level only: the subcommands (each one's arguments
//! and `run` are in [`cmd`]), the runtime they run on and the dispatch.
//!
//! One binary, several tools: invoked through a link named `qemu-img` it is `qimg` (its
//! commands are qemu-img's), through one named `qemu-io` it is `qimg io`; messages then start
//! with that name, as the tool's own do.

mod cmd;
mod names;
mod progress;
mod qopts;
mod size;
mod usage;
mod util;

use clap::{Parser, Subcommand};
use cmd::{
    amend, bench, bitmap, check, commit, compare, convert, create, dd, info, io, map, measure,
    rebase, resize, snapshot,
};
use std::process::ExitCode;

/// Work with qcow2 images.
#[derive(Parser)]
#[command(
    name = "qimg",
    version,
    // A repeated option: the last one wins, as with QEMU's getopt loops.
    args_override_self = true,
    about = "qcow2 images: info, convert, map, compare"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a qcow2 or raw image (qemu-img create).
    Create(create::CreateArgs),
    /// Copy part of an image into a new one, dd-style (qemu-img dd).
    Dd(dd::DdArgs),
    /// Show what an image is: format, sizes, features, backing file, snapshots, bitmaps.
    Info(info::InfoArgs),
    /// Show where each guest range's data lives (qemu-img map).
    Map(map::MapArgs),
    /// Convert images (several: concatenated) to a raw or qcow2 image, leaving runs of zeros
    /// unallocated (qemu-img convert).
    Convert(convert::ConvertArgs),
    /// Check an image's metadata for consistency, optionally repairing it (qemu-img check).
    Check(check::CheckArgs),
    /// Write an image's data into its backing file, then empty it (qemu-img commit).
    Commit(commit::CommitArgs),
    /// Compare the contents of two images.
    Compare(compare::CompareArgs),
    /// Change an image's backing file, keeping what it reads (qemu-img rebase).
    Rebase(rebase::RebaseArgs),
    /// Grow or shrink an image's virtual disk (qemu-img resize).
    Resize(resize::ResizeArgs),
    /// Run qemu-io commands on an image (qemu-io's syntax, output and exit status).
    Io(io::IoArgs),
    /// The file size a new image needs, for a size or an existing image (qemu-img measure).
    Measure(measure::MeasureArgs),
    /// Change an image's qcow2 options: compat, lazy_refcounts, data_file (qemu-img amend).
    Amend(amend::AmendArgs),
    /// Add, remove, clear, enable, disable, merge persistent dirty bitmaps (qemu-img bitmap).
    Bitmap(bitmap::BitmapArgs),
    /// List, create, apply or delete internal snapshots (qemu-img snapshot).
    Snapshot(snapshot::SnapshotArgs),
    /// Benchmark an image with qemu-img bench's workload and options.
    Bench(bench::BenchArgs),
}

impl Command {
    /// The `--object` options of the commands that take them as clap arguments (`bitmap`
    /// reads its own, in order).
    fn objects(&self) -> Option<&names::ObjectArgs> {
        let names = match self {
            Command::Create(a) => return Some(&a.objects),
            Command::Amend(a) => &a.names,
            Command::Check(a) => &a.names,
            Command::Compare(a) => &a.names,
            Command::Convert(a) => &a.names,
            Command::Dd(a) => &a.names,
            Command::Info(a) => &a.names,
            Command::Map(a) => &a.names,
            Command::Measure(a) => &a.names,
            Command::Resize(a) => &a.names,
            Command::Snapshot(a) => &a.names,
            Command::Rebase(a) => &a.names,
            Command::Commit(a) => &a.names,
            Command::Io(a) => &a.names,
            Command::Bitmap(_) | Command::Bench(_) => return None,
        };
        Some(&names.objects)
    }
}

/// Which tool the binary was invoked as (the file name of `argv[0]`).
fn tool_args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = std::env::args_os().collect();
    if let Some(a) = args.first() {
        util::set_invoked_as(a.to_string_lossy().into_owned());
    }
    let name = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("qimg");
    match name {
        "qemu-img" => util::set_program("qemu-img"),
        "qemu-io" => {
            util::set_program("qemu-io");
            args.insert(1, "io".into());
        }
        _ => {}
    }
    args
}

fn main() -> ExitCode {
    // Output into a closed pipe (`qimg info X | head -1`) ends the process quietly, as it
    // does QEMU's tools, instead of failing every print.
    // SAFETY: at start-up, before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = tool_args();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return usage::report(e, &args),
    };
    // Invoked as qimg (a no-op otherwise: the tool's name is set).
    util::set_program(match cli.command {
        Command::Io(_) => "qimg io",
        _ => "qimg",
    });
    // `--object` definitions are checked first, as QEMU's tools create the objects while
    // reading their options; `--object help` ends the command there.
    match cli.command.objects().map(names::ObjectArgs::check) {
        Some(Ok(true)) => return ExitCode::SUCCESS,
        Some(Err(e)) => return util::exit::<()>(1, Err(e)),
        _ => {}
    }
    // `qimg io` and `qimg bench` run on a runtime of their own choosing (tokio-uring for
    // io_uring); the other commands share a current-thread tokio runtime.
    let cli = match cli.command {
        Command::Io(args) => return io::run(args),
        Command::Bench(args) => return bench::run(args),
        command => Cli { command },
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", util::program());
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Create(args) => create::run(args).await,
            Command::Dd(args) => dd::run(args).await,
            Command::Info(args) => info::run(args).await,
            Command::Map(args) => map::run(args).await,
            Command::Measure(args) => measure::run(args).await,
            Command::Amend(args) => amend::run(args).await,
            Command::Bitmap(args) => bitmap::run(args).await,
            Command::Snapshot(args) => snapshot::run(args).await,
            Command::Convert(args) => convert::run(args).await,
            Command::Check(args) => check::run(args).await,
            Command::Commit(args) => commit::run(args).await,
            Command::Compare(args) => compare::run(args).await,
            Command::Rebase(args) => rebase::run(args).await,
            Command::Resize(args) => resize::run(args).await,
            Command::Io(_) | Command::Bench(_) => {
                unreachable!("qimg io and bench are dispatched before the runtime starts")
            }
        }
    })
}
