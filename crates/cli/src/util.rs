//! What the commands share: opening images, the `--output` format, sizes printed in
//! qemu-img's style, exit codes.

use crate::names::ImageName;
use anyhow::Result;
use blockio::FileOpener;
use qcow2_engine::{BackingChoice, Disk, Image, ImageOptions};
use std::process::ExitCode;

/// Output format of `info`, `map` and `check` (`--output`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Text for people, as qemu-img prints it.
    Human,
    /// JSON with qemu-img's field names.
    Json,
}

/// Opens the image `name` names read-only, with its backing chain; with `force_share`
/// (`-U`), in shared mode, so that it coexists with a writer.
pub async fn open_disk(name: &ImageName, force_share: bool) -> Result<Disk<FileOpener>> {
    open_read_only(name, force_share, BackingChoice::FromHeader).await
}

/// [`open_disk`] without its backing chain (what `qemu-img info` shows of one image needs
/// none, and reads the header even when the backing file is gone).
pub async fn open_disk_alone(name: &ImageName, force_share: bool) -> Result<Disk<FileOpener>> {
    open_read_only(name, force_share, BackingChoice::None).await
}

async fn open_read_only(
    name: &ImageName,
    force_share: bool,
    backing: BackingChoice,
) -> Result<Disk<FileOpener>> {
    let options = ImageOptions::new()
        .read_only(true)
        .force_share(force_share)
        .backing(backing);
    open_disk_with(name, options).await
}

/// Opens the image `name` names, of either format, with `options` and what the name's own
/// options add to them.
pub async fn open_disk_with(name: &ImageName, options: ImageOptions) -> Result<Disk<FileOpener>> {
    let options = name.options(options)?;
    Disk::open(FileOpener, name.path(), name.format(), options)
        .await
        .map_err(|e| name.could_not_open(e))
}

/// Opens the qcow2 image `name` names with `options` and what the name's own options add.
pub async fn open_image(name: &ImageName, options: ImageOptions) -> Result<Image<FileOpener>> {
    let options = name.options(options)?;
    Image::open(FileOpener, name.path(), options)
        .await
        .map_err(|e| name.could_not_open(e))
}

/// C's `strerror` text for an engine error, as QEMU's block layer would report the same
/// failure: the OS error's text for I/O errors (without Rust's "(os error N)"), EIO's for
/// what the image holds corrupt, ENOTSUP's for what is not supported, the engine's message
/// otherwise.
pub fn strerror(e: &qcow2_engine::Error) -> String {
    use qcow2_engine::Error;
    match e {
        Error::Io { .. }
        | Error::OutOfRange { .. }
        | Error::Corrupt { .. }
        | Error::Decompress { .. }
        | Error::Unsupported { .. }
        | Error::CompressedWrite { .. } => {
            qcow2_engine::strerror(&std::io::Error::from_raw_os_error(e.errno()))
        }
        other => other.to_string(),
    }
}

/// The name messages start with: the tool qimg was invoked as (`qemu-img`, `qemu-io`, `qimg`),
/// with the subcommand for `qimg io` (`qimg io`), as QEMU's tools print their own name.
static PROGRAM: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// `argv[0]` as given: QEMU's tools name themselves so in getopt's messages and in "Try
/// '... --help'".
static INVOKED_AS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the name messages start with (once, at start-up).
pub fn set_program(name: &'static str) {
    let _ = PROGRAM.set(name);
}

/// Records `argv[0]` (once, at start-up).
pub fn set_invoked_as(argv0: String) {
    let _ = INVOKED_AS.set(argv0);
}

/// `argv[0]` as given (see [`set_invoked_as`]), or the program's name.
pub fn invoked_as() -> &'static str {
    INVOKED_AS.get().map_or_else(program, String::as_str)
}

/// The name messages start with (see [`set_program`]).
pub fn program() -> &'static str {
    PROGRAM.get().copied().unwrap_or("qimg")
}

/// Prints an error as one line and maps it to an exit code.
pub fn exit<T>(code: u8, res: Result<T>) -> ExitCode {
    match res {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e:#}", program());
            ExitCode::from(code)
        }
    }
}

/// A size as qemu-img prints it: `%0.3g` of the largest binary unit not above it.
pub fn size_to_str(bytes: u64) -> String {
    const SUFFIXES: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    let mut div = 1u128;
    while i + 1 < SUFFIXES.len() && u128::from(bytes) >= div * 1024 {
        i += 1;
        div *= 1024;
    }
    format!("{} {}", fmt_g3(bytes as f64 / div as f64), SUFFIXES[i])
}

/// C's `%0.3g`: three significant digits, trailing zeros dropped, scientific notation when
/// the exponent is below -4 or at least 3.
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let sci = format!("{v:.2e}"); // e.g. "9.99e2", "1.00e3"
    let (mantissa, exp) = sci.split_once('e').expect("scientific format");
    let exp: i32 = exp.parse().expect("exponent");
    let trim = |s: &str| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    } else {
        let decimals = (2 - exp).max(0) as usize;
        trim(&format!("{v:.decimals$}"))
    }
}

/// JSON as qemu-img prints it (QEMU's pretty printer): four spaces a level, every `[`/`{`
/// closed on a line of its own even when empty, characters outside printable ASCII as
/// `\uXXXX`.
pub fn qemu_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_json(&mut out, v, 0);
    out
}

fn write_json(out: &mut String, v: &serde_json::Value, depth: usize) {
    use serde_json::Value;
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"    ".repeat(depth));
    };
    match v {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                out.push_str(if i > 0 { "," } else { "" });
                newline(out, depth + 1);
                write_json(out, item, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(fields) => {
            out.push('{');
            for (i, (key, item)) in fields.iter().enumerate() {
                out.push_str(if i > 0 { "," } else { "" });
                newline(out, depth + 1);
                write_json_str(out, key);
                out.push_str(": ");
                write_json(out, item, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::String(s) => write_json_str(out, s),
        other => out.push_str(&other.to_string()),
    }
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::size_to_str;

    #[test]
    fn sizes_read_like_qemu_img() {
        // Figures printed by `qemu-img info` for files of these sizes.
        assert_eq!(size_to_str(331_776), "324 KiB");
        assert_eq!(size_to_str(8 << 20), "8 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1_572_864), "1.5 MiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1_023_488), "1e+03 KiB");
        assert_eq!(size_to_str(100_352), "98 KiB");
    }
}
