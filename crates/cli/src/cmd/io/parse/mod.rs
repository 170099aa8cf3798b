//! Parsing `qimg io` commands: qemu-io's command lines into [`Cmd`] values.
//!
//! Everything here mirrors qemu-io 10.0 (`qemu-io-cmds.c`), checked by running it: a command
//! line is split at single spaces (empty pieces dropped, no quoting), the command name may be
//! an alias (`r`, `w`, `d`, `f`, `l`, `o`, `c`, `i`, `t`, `q`, `?`...), whether the command
//! needs an open image is checked first, then the argument count is checked before the options, the
//! options are parsed by GNU `getopt` (which permutes: `read 0 512 -q` is quiet), numbers by
//! `cvtnum` (qemu's `qemu_strtosz`: suffixes, hex, fractions) and pattern bytes by `strtol`.
//! Validation failures print the same message, on the same stream, as qemu-io.
//!
//! This module owns the parsed commands ([`Cmd`] and its parts), [`ParseError`] with what
//! qemu-io prints for each, the command table and [`parse`] itself; `getopt` parses options,
//! `numbers` the numeric arguments, `commands` the I/O commands' arguments, `session` those
//! of the commands that manage the image (`open`, `reopen`, `truncate`, `sleep`, `help`) and
//! `help` the commands' extended help.

mod commands;
mod getopt;
mod help;
mod numbers;
mod session;
#[cfg(test)]
mod tests;

use super::open::OpenSpec;
use super::{AioMode, CacheMode};
use commands::{
    parse_aio_read, parse_aio_write, parse_discard, parse_read, parse_readv, parse_write,
    parse_writev,
};
use qcow2_engine::Preallocation;
pub use session::{aio_mode, cache_mode, discard_ignored};
use session::{help, parse_open, parse_reopen, parse_sigraise, parse_sleep, parse_truncate};
use std::fmt;

/// qemu's `BDRV_REQUEST_MAX_BYTES`: the largest request length qemu-io accepts.
pub const MAX_REQUEST_BYTES: u64 = 2_147_483_136;

/// The byte `write` fills its buffer with when no `-P` is given.
pub const DEFAULT_WRITE_PATTERN: u8 = 0xcd;

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// `read` (alias `r`), `readv` (several buffers, read as one).
    Read(Read),
    /// `write` (alias `w`), `writev` (several buffers, written as one).
    Write(Write),
    /// `discard` (alias `d`).
    Discard(Discard),
    /// `flush` (alias `f`).
    Flush,
    /// `aio_read`: issued without waiting for it.
    AioRead(Read),
    /// `aio_write`: issued without waiting for it.
    AioWrite(Write),
    /// `aio_flush`: waits for every in-flight aio request, then flushes.
    AioFlush,
    /// `length` (alias `l`): prints the disk size.
    Length,
    /// `map`: the allocated and unallocated runs of the top layer.
    Map,
    /// `close` (alias `c`): closes the image; later commands find none.
    Close,
    /// `alloc` (alias `a`): how much of `count` bytes at `offset` the top layer allocates.
    Alloc {
        /// Guest offset.
        offset: u64,
        /// Bytes to look at (512 when not given).
        count: u64,
    },
    /// `open`: opens an image (when none is open).
    Open(Open),
    /// `reopen`: the open image with other options.
    Reopen(Reopen),
    /// `info` (alias `i`): the format, cluster size, VM state offset and format-specific
    /// information.
    Info,
    /// `truncate` (alias `t`): resizes the disk.
    Truncate {
        /// The new size in bytes.
        size: u64,
        /// `-m`: what a grow allocates.
        prealloc: Preallocation,
    },
    /// `sleep`: waits this many milliseconds.
    Sleep(u64),
    /// `quit` (alias `q`): ends the script.
    Quit,
    /// `help` (alias `?`): prints this text.
    Help(String),
    /// `sigraise`: raises this signal (a crash, for `SIGKILL`: nothing is written back).
    Sigraise(i32),
    /// `abort`: ends the process with `abort(3)`, as a crash.
    Abort,
    /// `aio_read -i` / `aio_write -i`: prints this line and does nothing (qemu-io only counts
    /// an invalid request in its statistics).
    Inject(&'static str),
}

/// A read: `read` or `aio_read`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Guest offset (of the VM state area with `vmstate`).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// `-b`: from the VM state area.
    pub vmstate: bool,
    /// `-P`: the bytes that must all equal a pattern.
    pub verify: Option<Verify>,
    /// `-q`: no report.
    pub quiet: bool,
    /// `-v`: hex dump of the data.
    pub dump: bool,
    /// `-C`: the report in qemu-io's comma-separated form.
    pub csv: bool,
}

/// What `read -P` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verify {
    /// The byte every checked byte must equal.
    pub pattern: u8,
    /// First checked byte, relative to the read's offset (`-s`).
    pub start: u64,
    /// Number of checked bytes (`-l`; default: to the end of the read).
    pub len: u64,
}

/// A write: `write` or `aio_write`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Guest offset (of the VM state area with `vmstate`).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// `-b`: to the VM state area.
    pub vmstate: bool,
    /// What is written.
    pub data: WriteData,
    /// `-q`: no report.
    pub quiet: bool,
    /// `-C`: the report in qemu-io's comma-separated form.
    pub csv: bool,
    /// `-f` (FUA): the write is durable when it completes (a flush follows it).
    pub fua: bool,
    /// `-c`: a compressed write (whole clusters, into unallocated clusters).
    pub compressed: bool,
}

/// The data of a [`Write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteData {
    /// Every byte is this one (`-P`, default 0xcd).
    Pattern(u8),
    /// `-z`: write zeroes; with `-u` whole clusters may be deallocated.
    Zeroes {
        /// `-u`.
        may_unmap: bool,
    },
}

/// An `open` command's options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Open {
    /// The image (qemu-io fails without one: the file driver needs a file name).
    pub path: Option<String>,
    /// `-i`: the backend named (`native`: threads, and `spec.native_aio`).
    pub aio: Option<AioMode>,
    /// `-r`, `-s`, `-C`, `-U`, `-k`, `-n`, `-t`, `-d`.
    pub spec: OpenSpec,
}

/// A `reopen` command's options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reopen {
    /// `-r` (`Some(true)`) or `-w` (`Some(false)`).
    pub read_only: Option<bool>,
    /// `-c`: the new cache mode.
    pub cache: Option<CacheMode>,
    /// `-o`: block driver options, in order (`None`: a key alone).
    pub driver_options: Vec<(String, Option<String>)>,
}

/// A `discard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discard {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// `-q`: no report.
    pub quiet: bool,
    /// `-C`: the report in qemu-io's comma-separated form.
    pub csv: bool,
}

/// Why a command line was rejected, and what qemu-io prints for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Unknown command name (stderr: `command "X" not found`).
    NotFound(String),
    /// Wrong number of arguments (stderr: `bad argument count ...`).
    ArgCount(String),
    /// getopt's complaint (stderr), followed by the command's usage line (stdout).
    BadOption {
        /// e.g. `read: invalid option -- 'x'`.
        message: String,
        /// The usage line.
        usage: &'static str,
    },
    /// The usage line alone (stdout): wrong number of positional arguments, `-s` without
    /// `-P`...
    Usage(&'static str),
    /// A validation message qemu-io prints on stdout (`Parsing error: ...`, `-u requires -z
    /// to be specified`...).
    Invalid(String),
    /// Something qemu-io has and `qimg io` does not implement (stderr).
    Unsupported(String),
    /// A message qemu-io reports on stderr after its name (`error_report`).
    Report(String),
}

impl ParseError {
    /// The line qemu-io prints on stdout for this error, if any.
    pub fn stdout(&self) -> Option<String> {
        match self {
            ParseError::BadOption { usage, .. } | ParseError::Usage(usage) => {
                Some(usage.to_string())
            }
            ParseError::Invalid(m) => Some(m.clone()),
            _ => None,
        }
    }

    /// The line qemu-io prints on stderr for this error, if any.
    pub fn stderr(&self) -> Option<String> {
        match self {
            ParseError::NotFound(name) => Some(format!("command \"{name}\" not found")),
            ParseError::ArgCount(m) | ParseError::BadOption { message: m, .. } => Some(m.clone()),
            ParseError::Unsupported(m) | ParseError::Report(m) => {
                Some(format!("{}: {m}", crate::util::program()))
            }
            _ => None,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.stderr().or_else(|| self.stdout()).unwrap_or_default();
        f.write_str(&text)
    }
}

impl std::error::Error for ParseError {}

/// A command's table entry, as in qemu-io's `cmdinfo_t`.
struct Spec {
    name: &'static str,
    alias: Option<&'static str>,
    argmin: usize,
    /// `None`: no upper bound.
    argmax: Option<usize>,
    usage: &'static str,
    /// Needs write permission (qemu-io's `BLK_PERM_WRITE`).
    write: bool,
    /// Runs without an open image (qemu-io's `CMD_NOFILE_OK`, `CMD_FLAG_GLOBAL`).
    nofile: bool,
    /// What `help NAME` prints after the usage line.
    help: Option<&'static str>,
}

const READ: Spec = Spec {
    name: "read",
    alias: Some("r"),
    argmin: 2,
    argmax: None,
    usage: "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
    write: false,
    nofile: false,
    help: Some(help::READ),
};
const WRITE: Spec = Spec {
    name: "write",
    alias: Some("w"),
    argmin: 2,
    argmax: None,
    usage: "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset",
    write: true,
    nofile: false,
    help: Some(help::WRITE),
};
const READV: Spec = Spec {
    name: "readv",
    alias: None,
    argmin: 2,
    argmax: None,
    usage: "readv [-Cqrv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset",
    write: false,
    nofile: false,
    help: Some(help::READV),
};
const WRITEV: Spec = Spec {
    name: "writev",
    alias: None,
    argmin: 2,
    argmax: None,
    usage: "writev [-Cfqr] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset",
    write: true,
    nofile: false,
    help: Some(help::WRITEV),
};
const DISCARD: Spec = Spec {
    name: "discard",
    alias: Some("d"),
    argmin: 2,
    argmax: None,
    usage: "discard [-Cq] off len -- discards a number of bytes at a specified offset",
    write: true,
    nofile: false,
    help: Some(help::DISCARD),
};
const FLUSH: Spec = Spec {
    name: "flush",
    alias: Some("f"),
    argmin: 0,
    argmax: Some(0),
    usage: "flush -- flush all in-core file state to disk",
    write: false,
    nofile: false,
    help: None,
};
const AIO_READ: Spec = Spec {
    name: "aio_read",
    alias: None,
    argmin: 2,
    argmax: None,
    usage:
        "aio_read [-Ciqrv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes",
    write: false,
    nofile: false,
    help: Some(help::AIO_READ),
};
const AIO_WRITE: Spec = Spec {
    name: "aio_write",
    alias: None,
    argmin: 2,
    argmax: None,
    usage: "aio_write [-Cfiqruz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes",
    write: true,
    nofile: false,
    help: Some(help::AIO_WRITE),
};
const AIO_FLUSH: Spec = Spec {
    name: "aio_flush",
    alias: None,
    argmin: 0,
    argmax: Some(0),
    usage: "aio_flush -- completes all outstanding aio requests",
    write: false,
    nofile: false,
    help: None,
};
const LENGTH: Spec = Spec {
    name: "length",
    alias: Some("l"),
    argmin: 0,
    argmax: Some(0),
    usage: "length -- gets the length of the current file",
    write: false,
    nofile: false,
    help: None,
};

const MAP: Spec = Spec {
    name: "map",
    alias: None,
    argmin: 0,
    argmax: Some(0),
    usage: "map  -- prints the allocated areas of a file",
    write: false,
    nofile: false,
    help: None,
};
const ALLOC: Spec = Spec {
    name: "alloc",
    alias: Some("a"),
    argmin: 1,
    argmax: Some(2),
    usage: "alloc offset [count] -- checks if offset is allocated in the file",
    write: false,
    nofile: false,
    help: None,
};

const CLOSE: Spec = Spec {
    name: "close",
    alias: Some("c"),
    argmin: 0,
    argmax: Some(0),
    usage: "close -- close the current open file",
    write: false,
    nofile: false,
    help: None,
};

const OPEN: Spec = Spec {
    name: "open",
    alias: Some("o"),
    argmin: 1,
    argmax: None,
    usage: "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path",
    write: false,
    nofile: true,
    help: Some(help::OPEN),
};
const REOPEN: Spec = Spec {
    name: "reopen",
    alias: None,
    argmin: 0,
    argmax: None,
    usage: "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options",
    write: false,
    nofile: false,
    help: Some(help::REOPEN),
};
const INFO: Spec = Spec {
    name: "info",
    alias: Some("i"),
    argmin: 0,
    argmax: Some(0),
    usage: "info -- prints information about the current file",
    write: false,
    nofile: false,
    help: None,
};
const TRUNCATE: Spec = Spec {
    name: "truncate",
    alias: Some("t"),
    argmin: 1,
    argmax: Some(3),
    usage: "truncate [-m prealloc_mode] off -- truncates the current file at the given offset",
    write: true,
    nofile: false,
    help: None,
};
const SLEEP: Spec = Spec {
    name: "sleep",
    alias: None,
    argmin: 1,
    argmax: Some(1),
    usage: "sleep -- waits for the given value in milliseconds",
    write: false,
    nofile: true,
    help: None,
};
const QUIT: Spec = Spec {
    name: "quit",
    alias: Some("q"),
    argmin: 0,
    argmax: None,
    usage: "quit -- exit the program",
    write: false,
    nofile: true,
    help: None,
};
const HELP: Spec = Spec {
    name: "help",
    alias: Some("?"),
    argmin: 0,
    argmax: Some(1),
    usage: "help [command] -- help for one or all commands",
    write: false,
    nofile: true,
    help: None,
};

const SIGRAISE: Spec = Spec {
    name: "sigraise",
    alias: None,
    argmin: 1,
    argmax: Some(1),
    usage: "sigraise signal -- raises a signal",
    write: false,
    nofile: true,
    help: Some(help::SIGRAISE),
};
const ABORT: Spec = Spec {
    name: "abort",
    alias: None,
    argmin: 0,
    argmax: Some(0),
    usage: "abort -- simulate a program crash using abort(3)",
    write: false,
    nofile: true,
    help: None,
};

const COMMANDS: [&Spec; 22] = [
    &READ, &READV, &WRITE, &WRITEV, &DISCARD, &FLUSH, &AIO_READ, &AIO_WRITE, &AIO_FLUSH, &LENGTH,
    &MAP, &ALLOC, &CLOSE, &OPEN, &REOPEN, &INFO, &TRUNCATE, &SLEEP, &QUIT, &HELP, &SIGRAISE,
    &ABORT,
];

/// qemu-io's `breakline()`: split at single spaces, drop empty pieces.
fn words(line: &str) -> Vec<&str> {
    line.split(' ').filter(|w| !w.is_empty()).collect()
}

fn lookup(name: &str) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .copied()
        .find(|s| s.name == name || s.alias == Some(name))
}

/// Whether `line` is a known command that needs an open image (all but `open`, `sleep`,
/// `quit`, `help`, `sigraise` and `abort`). qemu-io checks this before the argument count and the options.
pub fn needs_image(line: &str) -> bool {
    words(line)
        .first()
        .and_then(|name| lookup(name))
        .is_some_and(|s| !s.nofile)
}

/// Whether `line` is a command needing write permission (`write`, `discard`, `aio_write`)
/// with an acceptable number of arguments. qemu-io checks the permission at that point,
/// before the command parses its options: on a read-only image `write -u 0 1` says the
/// image is read-only, not that `-u` needs `-z`.
pub fn needs_write(line: &str) -> bool {
    let words = words(line);
    let Some((&name, args)) = words.split_first() else {
        return false;
    };
    lookup(name).is_some_and(|s| s.write && check_count(s, name, args.len()).is_ok())
}

/// Parses one qemu-io command line. `Ok(None)` for an empty line (qemu-io does nothing).
pub fn parse(line: &str) -> Result<Option<Cmd>, ParseError> {
    let words = words(line);
    let Some((&name, args)) = words.split_first() else {
        return Ok(None);
    };
    let spec = lookup(name).ok_or_else(|| ParseError::NotFound(name.to_string()))?;
    check_count(spec, name, args.len())?;
    let cmd = match spec.name {
        "read" => Cmd::Read(parse_read(name, args)?),
        "readv" => parse_readv(name, args)?,
        "write" => Cmd::Write(parse_write(name, args)?),
        "writev" => parse_writev(name, args)?,
        "discard" => Cmd::Discard(parse_discard(name, args)?),
        "flush" => Cmd::Flush,
        "aio_read" => parse_aio_read(name, args)?,
        "aio_write" => parse_aio_write(name, args)?,
        "aio_flush" => Cmd::AioFlush,
        "length" => Cmd::Length,
        "map" => Cmd::Map,
        "close" => Cmd::Close,
        "open" => parse_open(name, args)?,
        "reopen" => parse_reopen(name, args)?,
        "info" => Cmd::Info,
        "truncate" => parse_truncate(name, args)?,
        "sleep" => parse_sleep(args[0])?,
        "quit" => Cmd::Quit,
        "help" => help(args)?,
        "sigraise" => parse_sigraise(args[0])?,
        "abort" => Cmd::Abort,
        "alloc" => Cmd::Alloc {
            offset: numbers::cvt(args[0])?,
            count: args
                .get(1)
                .map(|a| numbers::cvt(a))
                .transpose()?
                .unwrap_or(512),
        },
        other => unreachable!("command table entry {other} without a parser"),
    };
    Ok(Some(cmd))
}

fn check_count(spec: &Spec, typed: &str, n: usize) -> Result<(), ParseError> {
    let min = spec.argmin;
    let msg = match spec.argmax {
        None if n < min => {
            format!("bad argument count {n} to {typed}, expected at least {min} arguments")
        }
        Some(max) if n < min || n > max => {
            if min == max {
                format!("bad argument count {n} to {typed}, expected {min} arguments")
            } else {
                format!(
                    "bad argument count {n} to {typed}, expected between {min} and {max} arguments"
                )
            }
        }
        _ => return Ok(()),
    };
    Err(ParseError::ArgCount(msg))
}
