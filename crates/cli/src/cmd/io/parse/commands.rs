//! The argument parsers of the commands that take arguments (`read`, `readv`, `write`,
//! `writev`, `discard`, `aio_read`, `aio_write`): their getopt options, positional arguments and qemu-io's checks,
//! in qemu-io's order.

use super::getopt::{getopt, Opt};
use super::numbers::{cvt, pattern_arg};
use super::{
    Cmd, Discard, ParseError, Read, Spec, Verify, Write, WriteData, AIO_READ, AIO_WRITE,
    DEFAULT_WRITE_PATTERN, DISCARD, MAX_REQUEST_BYTES, READ, READV, WRITE, WRITEV,
};

fn too_long(len: u64, arg: &str, suffix: &str) -> Result<(), ParseError> {
    if len > MAX_REQUEST_BYTES {
        return Err(ParseError::Invalid(format!(
            "length cannot exceed {MAX_REQUEST_BYTES}{suffix}, given {arg}"
        )));
    }
    Ok(())
}

fn unsupported(cmd: &str, what: &str) -> ParseError {
    ParseError::Unsupported(format!("{cmd}: {what} is not supported"))
}

fn bad_option(message: String, usage: &'static str) -> ParseError {
    ParseError::BadOption { message, usage }
}

pub(super) fn parse_read(typed: &str, args: &[&str]) -> Result<Read, ParseError> {
    let (opts, pos) = getopt(typed, args, "bCl:pP:qrs:v");
    let (mut csv, mut quiet, mut dump, mut vmstate) = (false, false, false, false);
    let (mut pattern, mut start, mut count) = (None, None, None);
    for o in opts {
        match o {
            Opt::Error(m) => return Err(bad_option(m, READ.usage)),
            Opt::Flag('b', _) => vmstate = true,
            Opt::Flag('C', _) => csv = true,
            Opt::Flag('l', Some(a)) => count = Some(cvt(a)?),
            Opt::Flag('P', Some(a)) => pattern = Some(pattern_arg(a)?),
            Opt::Flag('q', _) => quiet = true,
            Opt::Flag('s', Some(a)) => start = Some(cvt(a)?),
            Opt::Flag('v', _) => dump = true,
            // -p: ignored by qemu-io too; -r: registers the buffer (a hint only).
            Opt::Flag(_, _) => {}
        }
    }
    let [off, len] = pos[..] else {
        return Err(ParseError::Usage(READ.usage));
    };
    let offset = cvt(off)?;
    let len_v = cvt(len)?;
    too_long(len_v, len, "")?;
    if pattern.is_none() && (start.is_some() || count.is_some()) {
        return Err(ParseError::Usage(READ.usage));
    }
    let start = start.unwrap_or(0);
    let count = count.unwrap_or(len_v.wrapping_sub(start));
    if start > len_v || count > len_v - start {
        return Err(ParseError::Invalid(
            "pattern verification range exceeds end of read data".into(),
        ));
    }
    Ok(Read {
        offset,
        len: len_v,
        vmstate,
        verify: pattern.map(|pattern| Verify {
            pattern,
            start,
            len: count,
        }),
        quiet,
        dump,
        csv,
    })
}

pub(super) fn parse_write(typed: &str, args: &[&str]) -> Result<Write, ParseError> {
    let (opts, pos) = getopt(typed, args, "bcCfnpP:qrs:uz");
    let (mut vmstate, mut compressed, mut csv, mut fua, mut no_fallback) =
        (false, false, false, false, false);
    let (mut quiet, mut registered, mut unmap, mut zero) = (false, false, false, false);
    let (mut pattern, mut source) = (None, None);
    for o in opts {
        match o {
            Opt::Error(m) => return Err(bad_option(m, WRITE.usage)),
            Opt::Flag('b', _) => vmstate = true,
            Opt::Flag('c', _) => compressed = true,
            Opt::Flag('C', _) => csv = true,
            Opt::Flag('f', _) => fua = true,
            Opt::Flag('n', _) => no_fallback = true,
            Opt::Flag('P', Some(a)) => pattern = Some(pattern_arg(a)?),
            Opt::Flag('q', _) => quiet = true,
            Opt::Flag('r', _) => registered = true,
            Opt::Flag('s', Some(a)) => source = Some(a),
            Opt::Flag('u', _) => unmap = true,
            Opt::Flag('z', _) => zero = true,
            Opt::Flag(_, _) => {} // -p: ignored
        }
    }
    let [off, len] = pos[..] else {
        return Err(ParseError::Usage(WRITE.usage));
    };
    let invalid = |m: &str| Err(ParseError::Invalid(m.to_string()));
    if vmstate && zero {
        return invalid("-b and -z cannot be specified at the same time");
    }
    if fua && (vmstate || compressed) {
        return invalid("-f and -b or -c cannot be specified at the same time");
    }
    if no_fallback && !zero {
        return invalid("-n requires -z to be specified");
    }
    if unmap && !zero {
        return invalid("-u requires -z to be specified");
    }
    if u8::from(zero) + u8::from(pattern.is_some()) + u8::from(source.is_some()) > 1 {
        return invalid("Only one of -z, -P, and -s can be specified at the same time");
    }
    let offset = cvt(off)?;
    let len_v = cvt(len)?;
    if !no_fallback {
        too_long(len_v, len, " without -n")?;
    }
    if vmstate || compressed {
        for (v, what) in [(offset, "offset"), (len_v, "count")] {
            if v % 512 != 0 {
                return Err(ParseError::Invalid(format!(
                    "{v} is not a sector-aligned value for '{what}'"
                )));
            }
        }
    }
    if zero && registered {
        return invalid("cannot combine zero write with registered I/O buffer");
    }
    if no_fallback {
        return Err(unsupported("write", "-n (zero writes without fallback)"));
    }
    if source.is_some() {
        return Err(unsupported("write", "-s (data from a file)"));
    }
    Ok(Write {
        offset,
        len: len_v,
        vmstate,
        data: if zero {
            WriteData::Zeroes { may_unmap: unmap }
        } else {
            WriteData::Pattern(pattern.unwrap_or(DEFAULT_WRITE_PATTERN))
        },
        quiet,
        csv,
        fua,
        compressed,
    })
}

pub(super) fn parse_discard(typed: &str, args: &[&str]) -> Result<Discard, ParseError> {
    let (opts, pos) = getopt(typed, args, "Cq");
    let (mut csv, mut quiet) = (false, false);
    for o in opts {
        match o {
            Opt::Error(m) => return Err(bad_option(m, DISCARD.usage)),
            Opt::Flag('C', _) => csv = true,
            Opt::Flag('q', _) => quiet = true,
            Opt::Flag(_, _) => {}
        }
    }
    let [off, len] = pos[..] else {
        return Err(ParseError::Usage(DISCARD.usage));
    };
    let offset = cvt(off)?;
    let len_v = cvt(len)?;
    too_long(len_v, len, "")?;
    Ok(Discard {
        offset,
        len: len_v,
        quiet,
        csv,
    })
}

/// The total of an aio command's lengths (qemu-io's `create_iovec`).
fn iovec_len(lens: &[&str]) -> Result<u64, ParseError> {
    let mut total = 0u64;
    for &arg in lens {
        let len = cvt(arg)?;
        if len > MAX_REQUEST_BYTES {
            return Err(ParseError::Invalid(format!(
                "Argument '{arg}' exceeds maximum size {MAX_REQUEST_BYTES}"
            )));
        }
        if total > MAX_REQUEST_BYTES - len {
            return Err(ParseError::Invalid(format!(
                "The total number of bytes exceed the maximum size {MAX_REQUEST_BYTES}"
            )));
        }
        total += len;
    }
    Ok(total)
}

pub(super) fn parse_aio_read(typed: &str, args: &[&str]) -> Result<Cmd, ParseError> {
    Ok(match iovec_read(typed, args, &AIO_READ, "CiP:qrv")? {
        Some(r) => Cmd::AioRead(r),
        None => Cmd::Inject("injecting invalid read request"),
    })
}

pub(super) fn parse_readv(typed: &str, args: &[&str]) -> Result<Cmd, ParseError> {
    let r = iovec_read(typed, args, &READV, "CP:qrv")?;
    Ok(Cmd::Read(r.expect("readv has no -i")))
}

/// A read into several buffers (`aio_read`, `readv`: one length per buffer); `None` for
/// `-i` (an invalid request injected, where `optstring` has it).
fn iovec_read(
    typed: &str,
    args: &[&str],
    spec: &Spec,
    optstring: &str,
) -> Result<Option<Read>, ParseError> {
    let (opts, pos) = getopt(typed, args, optstring);
    let (mut csv, mut quiet, mut dump, mut pattern) = (false, false, false, None);
    for o in opts {
        match o {
            Opt::Error(m) => return Err(bad_option(m, spec.usage)),
            Opt::Flag('C', _) => csv = true,
            Opt::Flag('i', _) => return Ok(None),
            Opt::Flag('P', Some(a)) => pattern = Some(pattern_arg(a)?),
            Opt::Flag('q', _) => quiet = true,
            Opt::Flag('v', _) => dump = true,
            Opt::Flag(_, _) => {} // -r: a hint only
        }
    }
    let Some((off, lens)) = pos.split_first().filter(|(_, l)| !l.is_empty()) else {
        return Err(ParseError::Usage(spec.usage));
    };
    let offset = cvt(off)?;
    let len = iovec_len(lens)?;
    Ok(Some(Read {
        offset,
        len,
        vmstate: false,
        verify: pattern.map(|pattern| Verify {
            pattern,
            start: 0,
            len,
        }),
        quiet,
        dump,
        csv,
    }))
}

pub(super) fn parse_aio_write(typed: &str, args: &[&str]) -> Result<Cmd, ParseError> {
    Ok(match iovec_write(typed, args, &AIO_WRITE, "CfiP:qruz")? {
        Some(w) => Cmd::AioWrite(w),
        None => Cmd::Inject("injecting invalid write request"),
    })
}

pub(super) fn parse_writev(typed: &str, args: &[&str]) -> Result<Cmd, ParseError> {
    let w = iovec_write(typed, args, &WRITEV, "CfP:qr")?;
    Ok(Cmd::Write(w.expect("writev has no -i")))
}

/// A write from several buffers (`aio_write`, `writev`); `None` for `-i`.
fn iovec_write(
    typed: &str,
    args: &[&str],
    spec: &Spec,
    optstring: &str,
) -> Result<Option<Write>, ParseError> {
    let (opts, pos) = getopt(typed, args, optstring);
    let (mut csv, mut fua, mut quiet, mut registered) = (false, false, false, false);
    let (mut unmap, mut zero, mut pattern) = (false, false, DEFAULT_WRITE_PATTERN);
    for o in opts {
        match o {
            Opt::Error(m) => return Err(bad_option(m, spec.usage)),
            Opt::Flag('C', _) => csv = true,
            Opt::Flag('f', _) => fua = true,
            Opt::Flag('i', _) => return Ok(None),
            Opt::Flag('P', Some(a)) => pattern = pattern_arg(a)?,
            Opt::Flag('q', _) => quiet = true,
            Opt::Flag('r', _) => registered = true,
            Opt::Flag('u', _) => unmap = true,
            Opt::Flag('z', _) => zero = true,
            Opt::Flag(_, _) => {}
        }
    }
    let Some((off, lens)) = pos.split_first().filter(|(_, l)| !l.is_empty()) else {
        return Err(ParseError::Usage(spec.usage));
    };
    let invalid = |m: &str| Err(ParseError::Invalid(m.to_string()));
    if zero && lens.len() != 1 {
        return invalid("-z supports only a single length parameter");
    }
    if unmap && !zero {
        return invalid("-u requires -z to be specified");
    }
    // qemu-io never rejects -z with -P here (its check looks at a flag aio_write never
    // sets): the pattern is ignored.
    if zero && registered {
        return invalid("cannot combine zero write with registered I/O buffer");
    }
    let offset = cvt(off)?;
    let (len, data) = if zero {
        // No length limit here in qemu-io: a longer request fails when it is issued.
        (cvt(lens[0])?, WriteData::Zeroes { may_unmap: unmap })
    } else {
        (iovec_len(lens)?, WriteData::Pattern(pattern))
    };
    Ok(Some(Write {
        offset,
        len,
        vmstate: false,
        data,
        quiet,
        csv,
        fua,
        compressed: false,
    }))
}
