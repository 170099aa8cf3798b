//! `qimg io`: a qemu-io work-alike, so that one script runs through `qemu-io` and `qimg io`
//! and the results can be compared (differential testing against QEMU).
//!
//! ```text
//! qimg io [-f FMT] [-r] [-s] [-C] [-U] [-k] [-n] [-t CACHE] [-d DISCARD] [-i threads|io_uring]
//!         [-c CMD]... [IMG]
//! ```
//!
//! The image, if given, is opened as the options say (see [`open::OpenSpec`]: read-write or
//! read-only, a temporary overlay with `-s`, copy-on-read with `-C`, the format probed unless
//! `-f` names it); if it cannot be, nothing runs. Without one, the commands run until an
//! `open`. Each `-c` command runs in order (without `-c`, one command per line of standard
//! input, without qemu-io's prompt); `quit` ends the script; at the end the aio requests
//! still in flight are waited for and the image is closed. Commands, their options, output
//! and messages are qemu-io 10.0's, see [`parse`]:
//!
//! - `read [-bCqv] [-P PAT [-s OFF] [-l LEN]] OFF LEN` (alias `r`), `readv`;
//! - `write [-bcCfq] [-P PAT | -z [-u]] OFF LEN` (alias `w`; default pattern 0xcd), `writev`;
//! - `discard [-Cq] OFF LEN` (alias `d`), `flush` (alias `f`), `length` (alias `l`), `map`,
//!   `alloc` (alias `a`);
//! - `aio_read [-Cqv] [-P PAT] OFF LEN [LEN..]`, `aio_write [-Cfq] [-P PAT | -z [-u]] OFF
//!   LEN [LEN..]`, `aio_flush`;
//! - `open [-rsCnkU] [-t CACHE] [-d DISCARD] [-i AIO] [-o OPTIONS] PATH` (alias `o`), `close`
//!   (alias `c`), `reopen [-r|-w] [-c CACHE] [-o OPTIONS]`, `info` (alias `i`), `truncate [-m
//!   PREALLOC] OFF` (alias `t`), `sleep MS`, `quit` (alias `q`), `help [CMD]` (alias `?`;
//!   without a command it lists the commands `qimg io` has, a subset of qemu-io's);
//! - `sigraise SIGNAL`, `abort`: a crash. What the image then holds is what the engine had
//!   written: everything up to the last flush, possibly not what QEMU, which writes its
//!   metadata sooner, would have left.
//!
//! The exit status is qemu-io's: 1 if the image could not be opened or any command failed
//! (bad syntax, an I/O error, a `read -P` mismatch), 0 otherwise; aio requests never fail the
//! script (qemu-io counts them successful once issued). Closing the image failing is a
//! failure too.

mod exec;
mod open;
mod parse;
mod report;
mod session;

use crate::names::NameArgs;
use crate::util::program;
use blockio::{FileOpener, Opener};
use exec::Session;
use open::OpenSpec;
pub use qcow2_engine::CacheMode;
use std::path::PathBuf;
use std::process::ExitCode;

/// I/O backends (`-i`, `--aio`; QEMU's `native` runs on threads, see [`parse::aio_mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AioMode {
    /// Positional I/O on tokio's blocking thread pool (any tokio runtime).
    Threads,
    /// io_uring through tokio-uring (Linux).
    IoUring,
}

/// The arguments of `qimg io` (qemu-io's, for the options it supports).
#[derive(clap::Args, Debug)]
pub struct IoArgs {
    /// Image format: qcow2 or raw (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// A command to run (repeatable; run in order). Without any, commands are read from
    /// standard input, one per line.
    #[arg(short = 'c', long = "cmd", allow_hyphen_values = true)]
    pub cmds: Vec<String>,
    /// Open the image read-only: writes and discards are refused.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Open in shared mode (with -r): coexist with a writer of the image.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Cache mode: none (or off: O_DIRECT), writeback, writethrough, directsync, unsafe.
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Disable the host cache (short for -t none).
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,
    /// I/O backend: threads, io_uring, or native (threads here; with -n or -t none only, as
    /// QEMU's).
    #[arg(short = 'i', long = "aio")]
    pub aio: Option<String>,
    /// Misalign buffers (qemu-io's test of O_DIRECT bounce buffers; nothing to do here).
    #[arg(short = 'm', long = "misalign")]
    pub misalign: bool,
    /// Writes go to a temporary overlay, deleted at the end (QEMU's `snapshot=on`): the
    /// image itself is only read.
    #[arg(short = 's', long = "snapshot")]
    pub snapshot: bool,
    /// Copy-on-read: what reads find in backing files is written into the image.
    #[arg(short = 'C', long = "copy-on-read")]
    pub copy_on_read: bool,
    /// Native AIO (QEMU allows it only with -n or -t none; the backend is -i's).
    #[arg(short = 'k', long = "native-aio")]
    pub native_aio: bool,
    /// Discard mode: unmap (on, the default) or ignore (off: discards do nothing).
    #[arg(short = 'd', long = "discard")]
    pub discard: Option<String>,
    #[command(flatten)]
    pub names: NameArgs,
    /// The image; without one, commands run until an `open`.
    pub image: Option<PathBuf>,
}

/// Runs `qimg io` on a runtime of its own (a tokio-uring one for `--aio io_uring`) and
/// returns the exit status.
pub fn run(args: IoArgs) -> ExitCode {
    // qemu-io checks these values as it reads its options, before anything else.
    let checked = open_spec(&args).and_then(|spec| {
        let (aio, native) = match args.aio.as_deref() {
            None => (AioMode::Threads, false),
            Some(name) => parse::aio_mode(name)?,
        };
        Ok((
            OpenSpec {
                native_aio: spec.native_aio || native,
                ..spec
            },
            aio,
        ))
    });
    let (spec, aio) = match checked {
        Ok(checked) => checked,
        Err(e) => {
            exec::err(&format!("{e}\n"));
            return ExitCode::from(1);
        }
    };
    let cmds = if args.cmds.is_empty() {
        std::io::stdin()
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    } else {
        args.cmds.clone()
    };
    let ok = match aio {
        AioMode::Threads => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(&format!("cannot start the runtime: {e}")),
            };
            tokio::task::LocalSet::new()
                .block_on(&rt, run_script(FileOpener, aio, &args, spec, &cmds))
        }
        #[cfg(target_os = "linux")]
        AioMode::IoUring => match tokio_uring::Runtime::new(&blockio::uring_builder()) {
            Ok(rt) => rt.block_on(run_script(blockio::UringOpener, aio, &args, spec, &cmds)),
            Err(e) => return fail(&format!("cannot start io_uring: {e}")),
        },
        #[cfg(not(target_os = "linux"))]
        AioMode::IoUring => return fail("io_uring is only available on Linux"),
    };
    let _ = std::io::Write::flush(&mut std::io::stdout());
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn fail(msg: &str) -> ExitCode {
    exec::err(&format!("{}: {msg}\n", program()));
    ExitCode::from(1)
}

/// How the command line says to open the image.
fn open_spec(args: &IoArgs) -> Result<OpenSpec, parse::ParseError> {
    if args.names.image_opts && args.format.is_some() {
        return Err(parse::ParseError::Report(
            "--image-opts and -f are mutually exclusive".into(),
        ));
    }
    let cache = match (args.nocache, args.cache.as_deref()) {
        (true, _) => CacheMode::None,
        (false, None) => CacheMode::Writeback,
        (false, Some(mode)) => parse::cache_mode(mode)?,
    };
    Ok(OpenSpec {
        format: args.format.clone(),
        read_only: args.read_only,
        snapshot: args.snapshot,
        copy_on_read: args.copy_on_read,
        force_share: args.force_share,
        native_aio: args.native_aio,
        cache,
        discard_ignored: args
            .discard
            .as_deref()
            .map(parse::discard_ignored)
            .transpose()?
            .unwrap_or(false),
        driver_options: Vec::new(),
        image_opts: args.names.image_opts,
    })
}

/// Opens the image (if the command line names one) and runs the script on the backend
/// `aio` (inside a `LocalSet`); `true` if everything succeeded.
async fn run_script<O: Opener>(
    opener: O,
    aio: AioMode,
    args: &IoArgs,
    spec: OpenSpec,
    cmds: &[String],
) -> bool {
    let mut session = Session::new(opener, aio);
    if let Some(image) = &args.image {
        if !session.open(image.clone(), spec).await {
            return false;
        }
    }
    let mut ok = true;
    for line in cmds {
        ok &= session.run_line(line).await;
        if session.quitting() {
            break;
        }
    }
    session.finish().await && ok
}
