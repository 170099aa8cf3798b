//! The argument parsers of the commands that manage the open image rather than do I/O on it:
//! `open`, `reopen`, `truncate`, `sleep` and `help`, with qemu-io's checks and messages in its
//! order (an invalid `-t`, `-d` or `-i` is reported before the image is looked at).

use super::getopt::{getopt, Opt};
use super::numbers::{cvt, strtol};
use super::{Cmd, Open, ParseError, Reopen, Spec, COMMANDS, OPEN, REOPEN, TRUNCATE};
use crate::cmd::io::{AioMode, CacheMode};
use qcow2_engine::Preallocation;

fn bad_option(message: String, usage: &'static str) -> ParseError {
    ParseError::BadOption { message, usage }
}

/// A cache mode as QEMU names it (`bdrv_parse_cache_mode`: case-sensitive, `off` for `none`).
pub fn cache_mode(name: &str) -> Result<CacheMode, ParseError> {
    CacheMode::from_name(name)
        .ok_or_else(|| ParseError::Report(format!("Invalid cache option: {name}")))
}

/// An AIO mode as QEMU names it: the backend it runs on, and whether it is `native` (which
/// runs on threads here, and which QEMU allows only with O_DIRECT).
pub fn aio_mode(name: &str) -> Result<(AioMode, bool), ParseError> {
    match name {
        "threads" => Ok((AioMode::Threads, false)),
        "native" => Ok((AioMode::Threads, true)),
        "io_uring" => Ok((AioMode::IoUring, false)),
        _ => Err(ParseError::Report(format!("Invalid aio option: {name}"))),
    }
}

/// Whether a discard mode as QEMU names it (`bdrv_parse_discard_flags`) ignores discards:
/// `ignore` and `off` do, `unmap` and `on` pass them on.
pub fn discard_ignored(mode: &str) -> Result<bool, ParseError> {
    match mode {
        "ignore" | "off" => Ok(true),
        "unmap" | "on" => Ok(false),
        _ => Err(ParseError::Report(format!(
            "Invalid discard option: {mode}"
        ))),
    }
}

/// `-o key[=value][,key[=value]]...`: the block driver's options, in order (a key alone is
/// QEMU's deprecated short form of `key=on`). Checked when the image is opened.
fn driver_options(arg: &str, into: &mut Vec<(String, Option<String>)>) {
    for part in arg.split(',').filter(|p| !p.is_empty()) {
        into.push(match part.split_once('=') {
            Some((key, value)) => (key.to_string(), Some(value.to_string())),
            None => (part.to_string(), None),
        });
    }
}

/// `open [-rsCnkU] [-t cache] [-d discard] [-i aio] [-o options] [path]`.
pub(super) fn parse_open(typed: &str, args: &[&str]) -> Result<Cmd, ParseError> {
    let (opts, pos) = getopt(typed, args, "snCro:kt:d:i:U");
    let mut o = Open::default();
    for opt in opts {
        match opt {
            Opt::Error(m) => return Err(bad_option(m, OPEN.usage)),
            Opt::Flag('s', _) => o.spec.snapshot = true,
            Opt::Flag('n', _) => o.spec.cache = CacheMode::None,
            Opt::Flag('C', _) => o.spec.copy_on_read = true,
            Opt::Flag('r', _) => o.spec.read_only = true,
            Opt::Flag('k', _) => o.spec.native_aio = true,
            Opt::Flag('U', _) => o.spec.force_share = true,
            Opt::Flag('t', Some(a)) => o.spec.cache = cache_mode(a)?,
            Opt::Flag('d', Some(a)) => o.spec.discard_ignored = discard_ignored(a)?,
            Opt::Flag('i', Some(a)) => {
                let (aio, native) = aio_mode(a)?;
                o.aio = Some(aio);
                o.spec.native_aio |= native;
            }
            Opt::Flag('o', Some(a)) => driver_options(a, &mut o.spec.driver_options),
            Opt::Flag(_, _) => {}
        }
    }
    o.path = match pos[..] {
        [path] => Some(path.to_string()),
        [] => None,
        _ => return Err(ParseError::Usage(OPEN.usage)),
    };
    Ok(Cmd::Open(o))
}

/// `reopen [(-r|-w)] [-c cache] [-o options]`.
pub(super) fn parse_reopen(typed: &str, args: &[&str]) -> Result<Cmd, ParseError> {
    let (opts, pos) = getopt(typed, args, "c:o:rw");
    let mut r = Reopen::default();
    for opt in opts {
        match opt {
            Opt::Error(m) => return Err(bad_option(m, REOPEN.usage)),
            Opt::Flag('c', Some(a)) => r.cache = Some(cache_mode(a)?),
            Opt::Flag(c @ ('r' | 'w'), _) => {
                if r.read_only.is_some() {
                    return Err(ParseError::Report(
                        "Only one -r/-w option may be given".into(),
                    ));
                }
                r.read_only = Some(c == 'r');
            }
            Opt::Flag('o', Some(a)) => driver_options(a, &mut r.driver_options),
            Opt::Flag(_, _) => {}
        }
    }
    if !pos.is_empty() {
        return Err(ParseError::Usage(REOPEN.usage));
    }
    Ok(Cmd::Reopen(r))
}

/// `truncate [-m prealloc_mode] off`.
pub(super) fn parse_truncate(typed: &str, args: &[&str]) -> Result<Cmd, ParseError> {
    let (opts, pos) = getopt(typed, args, "m:");
    let mut prealloc = Preallocation::Off;
    for opt in opts {
        match opt {
            Opt::Error(m) => return Err(bad_option(m, TRUNCATE.usage)),
            Opt::Flag('m', Some(a)) => {
                prealloc = Preallocation::from_name(a).ok_or_else(|| {
                    ParseError::Report(format!("Invalid preallocation mode '{a}'"))
                })?;
            }
            Opt::Flag(_, _) => {}
        }
    }
    // qemu-io takes the first positional argument and ignores any other.
    let Some(off) = pos.first() else {
        return Err(ParseError::Usage(TRUNCATE.usage));
    };
    Ok(Cmd::Truncate {
        size: cvt(off)?,
        prealloc,
    })
}

/// `sleep ms`: milliseconds as `strtol` reads them (decimal, `0x` hex, `0` octal), the whole
/// argument, not negative.
pub(super) fn parse_sleep(arg: &str) -> Result<Cmd, ParseError> {
    strtol(arg)
        .and_then(|ms| u64::try_from(ms).ok())
        .map(Cmd::Sleep)
        .ok_or_else(|| ParseError::Invalid(format!("{arg} is not a valid number")))
}

/// `sigraise signal`: a number as `cvtnum` reads it, at most `NSIG`.
pub(super) fn parse_sigraise(arg: &str) -> Result<Cmd, ParseError> {
    let sig = cvt(arg)?;
    let nsig = libc::SIGRTMAX() + 1;
    match i32::try_from(sig) {
        Ok(sig) if sig <= nsig => Ok(Cmd::Sigraise(sig)),
        _ => Err(ParseError::Invalid(format!(
            "signal argument '{arg}' is too large to be a valid signal"
        ))),
    }
}

/// `help [command]`: every command's line, or one command's line and extended help.
pub(super) fn help(args: &[&str]) -> Result<Cmd, ParseError> {
    let Some(&typed) = args.first() else {
        let mut specs: Vec<&Spec> = COMMANDS.to_vec();
        specs.sort_by_key(|s| s.name);
        let mut text: String = specs.iter().map(|s| format!("{}\n", s.usage)).collect();
        text.push_str("\nUse 'help commandname' for extended help.\n");
        return Ok(Cmd::Help(text));
    };
    let spec = super::lookup(typed)
        .ok_or_else(|| ParseError::Invalid(format!("command {typed} not found")))?;
    let line = format!("{typed}{}", &spec.usage[spec.name.len()..]);
    Ok(Cmd::Help(format!("{line}\n{}", spec.help.unwrap_or(""))))
}
