//! `qimg create`: qemu-img create for qcow2 and raw images, with qemu-img's option syntax,
//! its "Formatting ..." line and its error messages.
//!
//! The steps and their order are qemu-img's (`img_create` and `bdrv_img_create`), so the
//! same mistake gives the same message at the same point: option syntax and types first
//! (nothing printed), then the size and the backing file (opened to check it and to take its
//! size), then the "Formatting" line, then the format's own checks, then the image.

use crate::names::ObjectArgs;
use crate::qopts::{self, split_list};
use crate::size::cvtnum_full;
use blockio::FileOpener;
use qcow2_engine::{
    create, create_raw, probe_backing, AmendOptions, Compat, CreateOptions, ImageFormat,
    Preallocation,
};
use qcow2_format::CompressionType;
use std::path::Path;
use std::process::ExitCode;

/// Arguments of `qimg create`.
#[derive(clap::Args)]
pub struct CreateArgs {
    /// Image format: qcow2 or raw (default raw, as qemu-img).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Format options, `OPT=VAL[,OPT=VAL...]` (may be repeated): size, compat, cluster_size,
    /// refcount_bits, extended_l2, lazy_refcounts, compression_type, preallocation,
    /// backing_file, backing_fmt, data_file, data_file_raw.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file (stored as given; relative to the image's directory).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Do not open the backing file (a size must then be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet: do not print the "Formatting" line.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    pub objects: ObjectArgs,
    /// The image to create (none with `-o help`).
    image: Option<String>,
    /// Virtual size: bytes, or with a suffix k, M, G, T, P, E (powers of 1024).
    size: Option<String>,
}

/// An error and whether qemu-img prefixes it with the file name.
struct Failure {
    msg: String,
    with_name: bool,
}

fn fail<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        msg: msg.into(),
        with_name: true,
    })
}

/// Creates `image` as `qimg create -q -f FORMAT -o OPTIONS IMAGE SIZE` would (for
/// `qimg convert`): the same option parsing, checks and messages.
pub async fn create_for_convert(
    format: &str,
    options: &[String],
    image: &std::path::Path,
    size: u64,
) -> anyhow::Result<()> {
    let args = CreateArgs {
        format: Some(format.to_owned()),
        options: options.to_vec(),
        backing: None,
        backing_format: None,
        unsafe_backing: false,
        quiet: true,
        objects: Default::default(),
        image: Some(image.display().to_string()),
        size: Some(size.to_string()),
    };
    create_image(&args).await.map_err(|f| {
        if f.with_name {
            anyhow::anyhow!("{}: {}", args.image(), f.msg)
        } else {
            anyhow::anyhow!("{}", f.msg)
        }
    })
}

impl CreateArgs {
    /// The image to create (checked given by [`run`]).
    fn image(&self) -> &str {
        self.image.as_deref().unwrap_or_default()
    }
}

/// Runs `qimg create`; exit status 0 on success, 1 on any error.
pub async fn run(args: CreateArgs) -> ExitCode {
    if let Err(e) = qopts::check_lists(&args.options) {
        return crate::util::exit(1, Err::<(), _>(anyhow::anyhow!(e)));
    }
    if super::option_help::wants_help(&args.options) {
        let fmt = args.format.as_deref().unwrap_or("raw");
        let r = super::option_help::print_create_help(fmt, args.image.as_deref());
        return crate::util::exit(1, r);
    }
    if args.image.is_none() {
        eprintln!(
            "{}: Expecting image file name\nTry '{} create --help' for more info",
            crate::util::program(),
            crate::util::invoked_as()
        );
        return ExitCode::from(1);
    }
    match create_image(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if f.with_name {
                eprintln!("{}: {}: {}", crate::util::program(), args.image(), f.msg);
            } else {
                eprintln!("{}: {}", crate::util::program(), f.msg);
            }
            ExitCode::from(1)
        }
    }
}

/// The type of a create option, as QemuOpts parses it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    Size,
    Number,
}

/// The options each format takes, in the order qemu-img prints them, with their defaults.
fn option_table(qcow2: bool) -> &'static [(&'static str, Kind, Option<&'static str>)] {
    if qcow2 {
        &[
            ("cluster_size", Kind::Size, Some("65536")),
            ("extended_l2", Kind::Bool, Some("off")),
            ("preallocation", Kind::Str, None),
            ("compression_type", Kind::Str, Some("zlib")),
            ("size", Kind::Size, None),
            ("compat", Kind::Str, None),
            ("backing_file", Kind::Str, None),
            ("backing_fmt", Kind::Str, None),
            ("data_file", Kind::Str, None),
            ("data_file_raw", Kind::Bool, None),
            ("lazy_refcounts", Kind::Bool, Some("off")),
            ("refcount_bits", Kind::Number, Some("16")),
            ("nocow", Kind::Bool, None),
            ("extent_size_hint", Kind::Size, None),
        ]
    } else {
        &[
            ("size", Kind::Size, None),
            ("nocow", Kind::Bool, None),
            ("preallocation", Kind::Str, None),
            ("extent_size_hint", Kind::Size, None),
        ]
    }
}

/// A parsed option value: the text as given and, for numbers, the number.
#[derive(Clone)]
struct Value {
    text: String,
    num: u64,
    flag: bool,
}

struct Opts {
    qcow2: bool,
    set: Vec<(&'static str, Value)>,
}

impl Opts {
    fn get(&self, key: &str) -> Option<&Value> {
        self.set
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    fn put(&mut self, key: &'static str, v: Value) {
        self.set.push((key, v));
    }

    /// The "Formatting" line's option list: every option that is set or has a default, in
    /// the table's order; strings and booleans as given (commas doubled), numbers parsed.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for &(key, kind, default) in option_table(self.qcow2) {
            let text = match (self.get(key), kind) {
                (Some(v), Kind::Size) => v.num.to_string(),
                (Some(v), Kind::Number) => (v.num as i64).to_string(),
                (Some(v), _) => v.text.replace(',', ",,"),
                (None, _) => match default {
                    Some(d) => d.to_owned(),
                    None => continue,
                },
            };
            parts.push(format!("{key}={text}"));
        }
        parts.join(" ")
    }
}

fn parse_options(qcow2: bool, lists: &[String]) -> Result<Opts, Failure> {
    let mut opts = Opts {
        qcow2,
        set: Vec::new(),
    };
    for list in lists {
        for item in split_list(list) {
            if item.is_empty() {
                continue;
            }
            let (key, text) = match item.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (item.clone(), "on".to_owned()),
            };
            if key.starts_with("encrypt") {
                return fail("encryption is not supported by qimg");
            }
            let Some(&(name, kind, _)) = option_table(qcow2).iter().find(|(k, _, _)| *k == key)
            else {
                return fail(format!("Invalid parameter '{key}'"));
            };
            let mut v = Value {
                text: text.clone(),
                num: 0,
                flag: false,
            };
            match kind {
                Kind::Str => {}
                Kind::Bool => v.flag = qopts::bool_value(name, &text).or_else(fail)?,
                Kind::Size => v.num = qopts::size_value(name, &text).or_else(fail)?,
                Kind::Number => v.num = qopts::number_value(name, &text).or_else(fail)?,
            }
            opts.put(name, v);
        }
    }
    Ok(opts)
}

/// The image format qemu-img names: `true` for qcow2, `false` for raw.
fn is_qcow2(fmt: &str) -> Result<bool, Failure> {
    match fmt {
        "qcow2" => Ok(true),
        "raw" => Ok(false),
        other => {
            if [
                "vmdk",
                "vdi",
                "vhdx",
                "vpc",
                "qcow",
                "qed",
                "parallels",
                "luks",
            ]
            .contains(&other)
            {
                return fail(format!("format '{other}' is not supported by qimg"));
            }
            fail(format!("Unknown file format '{other}'"))
        }
    }
}

/// A size option's value.
fn size_value(n: u64) -> Value {
    Value {
        text: n.to_string(),
        num: n,
        flag: false,
    }
}

/// A string option's value.
fn text_value(t: &str) -> Value {
    Value {
        text: t.to_owned(),
        num: 0,
        flag: false,
    }
}

/// The options of the new image from the command line, as `img_create` gathers them: the
/// size argument, the `-o` lists, then `-b` and `-F`.
fn gather_options(args: &CreateArgs, qcow2: bool) -> Result<Opts, Failure> {
    // The size argument (qemu-img's cvtnum).
    let positional_size = match &args.size {
        None => None,
        Some(s) => match cvtnum_full("image size", s, 0, i64::MAX as u64) {
            Ok(n) => Some(n),
            Err(msg) => {
                return Err(Failure {
                    msg,
                    with_name: false,
                })
            }
        },
    };

    let mut opts = parse_options(qcow2, &args.options)?;
    match (opts.get("size").is_some(), positional_size) {
        (true, Some(_)) => return fail("The image size must be specified only once"),
        (false, Some(n)) => opts.put("size", size_value(n)),
        _ => {}
    }
    if let Some(b) = &args.backing {
        if !qcow2 {
            return fail("Backing file not supported for file format 'raw'");
        }
        opts.put("backing_file", text_value(b));
    }
    if let Some(f) = &args.backing_format {
        if !qcow2 {
            return fail("Backing file format not supported for file format 'raw'");
        }
        opts.put("backing_fmt", text_value(f));
    }
    Ok(opts)
}

/// The backing file's checks (`bdrv_img_create`): its name, and unless `-u`, that it opens
/// (as the format given, which must be given); the image's size defaults to its size.
async fn check_backing(args: &CreateArgs, opts: &mut Opts) -> Result<(), Failure> {
    let Some(name) = opts.get("backing_file").map(|v| v.text.clone()) else {
        return Ok(());
    };
    let backing_fmt = opts.get("backing_fmt").map(|v| v.text.clone());
    if name == args.image() {
        return fail("Error: Trying to create an image with the same filename as the backing file");
    }
    if name.is_empty() {
        return fail("Expected backing file name, got empty string");
    }
    if args.unsafe_backing {
        if backing_fmt.is_none() {
            return fail("Backing file specified without backing format");
        }
        return Ok(());
    }
    let format = match backing_fmt.as_deref() {
        None => None,
        Some(f) => match ImageFormat::from_name(f) {
            Some(f) => Some(f),
            None => {
                return fail(format!(
                    "Unknown driver '{f}'\nCould not open backing image."
                ))
            }
        },
    };
    let (size, detected) =
        match probe_backing(&FileOpener, Path::new(&args.image()), &name, format).await {
            Ok(r) => r,
            Err(e) => return fail(format!("{e}\nCould not open backing image.")),
        };
    if backing_fmt.is_none() {
        return fail(format!(
            "Backing file specified without backing format\nDetected format of {}.",
            detected.name()
        ));
    }
    if opts.get("size").is_none() {
        opts.put("size", size_value(size));
    }
    Ok(())
}

/// An engine error as qemu-img reports it (after the image's name).
fn engine_err(e: qcow2_engine::Error) -> Failure {
    Failure {
        msg: match e {
            qcow2_engine::Error::Create(c) => c.to_string(),
            other => other.to_string(),
        },
        with_name: true,
    }
}

/// Creates the image, in qemu-img's order of checks (see the module documentation).
async fn create_image(args: &CreateArgs) -> Result<(), Failure> {
    let fmt = args.format.as_deref().unwrap_or("raw");
    let qcow2 = is_qcow2(fmt)?;
    let mut opts = gather_options(args, qcow2)?;
    check_backing(args, &mut opts).await?;
    let Some(size) = opts.get("size").map(|v| v.num) else {
        return fail("Image creation needs a size parameter");
    };

    if !args.quiet {
        println!(
            "Formatting '{}', fmt={} {}",
            args.image(),
            fmt,
            opts.describe()
        );
    }

    let prealloc = match opts.get("preallocation") {
        None => Preallocation::Off,
        Some(v) => Preallocation::from_name(&v.text).ok_or(()).or_else(|_| {
            fail(format!(
                "Parameter 'preallocation' does not accept value '{}'",
                v.text
            ))
        })?,
    };
    if !qcow2 {
        return create_raw(&FileOpener, &args.image(), size, prealloc)
            .await
            .map_err(engine_err);
    }
    let co = qcow2_options(&opts, size, prealloc)?;
    create(&FileOpener, &args.image(), &co)
        .await
        .map_err(engine_err)
}

/// `qcow2_co_create_opts`: the enumerations checked, then the size rounded up to a sector.
fn qcow2_options(
    opts: &Opts,
    size: u64,
    prealloc: Preallocation,
) -> Result<CreateOptions, Failure> {
    let mut co = CreateOptions::new();
    if let Some(v) = opts.get("compat") {
        co = co.compat(Compat::from_name(&v.text).ok_or(()).or_else(|_| {
            fail(format!(
                "Parameter 'version' does not accept value '{}'",
                v.text
            ))
        })?);
    }
    if let Some(v) = opts.get("compression_type") {
        co = co.compression_type(match v.text.as_str() {
            "zlib" => CompressionType::Zlib,
            "zstd" => CompressionType::Zstd,
            _ => {
                return fail(format!(
                    "Parameter 'compression-type' does not accept value '{}'",
                    v.text
                ))
            }
        });
    }
    let backing = opts.get("backing_file").map(|v| v.text.clone());
    let backing_format = match opts.get("backing_fmt").map(|v| v.text.as_str()) {
        None => None,
        Some(f) => Some(ImageFormat::from_name(f).ok_or(()).or_else(|_| {
            fail(format!(
                "Parameter 'backing-fmt' does not accept value '{f}'"
            ))
        })?),
    };
    match (backing, backing_format) {
        (Some(name), Some(f)) => co = co.backing_file(name, f),
        (None, Some(_)) => return fail("Backing format cannot be used without backing file"),
        _ => {}
    }
    if let Some(v) = opts.get("data_file") {
        co = co.data_file(v.text.clone());
    }
    if let Some(v) = opts.get("cluster_size") {
        co = co.cluster_size(v.num);
    }
    if let Some(v) = opts.get("refcount_bits") {
        co = co.refcount_bits(v.num);
    }
    co = co
        .extended_l2(opts.get("extended_l2").is_some_and(|v| v.flag))
        .lazy_refcounts(opts.get("lazy_refcounts").is_some_and(|v| v.flag))
        .data_file_raw(opts.get("data_file_raw").is_some_and(|v| v.flag))
        .preallocation(prealloc)
        // The backing file was checked above (or -u said not to).
        .check_backing(false);
    let Some(rounded) = size
        .checked_next_multiple_of(512)
        .filter(|&n| n <= i64::MAX as u64)
    else {
        return fail("Could not resize image: Image size cannot be negative");
    };
    Ok(co.size(rounded))
}

/// The changes `qemu-img amend -o OPTIONS` asks of a qcow2 image, parsed as qemu-img parses
/// them (the create options' syntax and types; the options only creation takes are refused
/// with qemu-img's words), and the new size if one is given. Errors are qemu-img's messages.
pub fn amend_options(lists: &[String]) -> Result<(AmendOptions, Option<u64>), String> {
    const CREATION_ONLY: [&str; 6] = [
        "cluster_size",
        "extended_l2",
        "preallocation",
        "compression_type",
        "nocow",
        "extent_size_hint",
    ];
    for list in lists {
        for item in split_list(list) {
            let key = item.split_once('=').map_or(item.as_str(), |(k, _)| k);
            if CREATION_ONLY.contains(&key) || key.starts_with("encrypt") {
                return Err(format!(
                    "Invalid parameter '{key}'\nThis option is only supported for image creation"
                ));
            }
        }
    }
    let opts = parse_options(true, lists).map_err(|f| f.msg)?;
    let mut amend = AmendOptions::new();
    if let Some(v) = opts.get("compat") {
        let compat = Compat::from_name(&v.text)
            .ok_or_else(|| format!("Unknown compatibility level {}", v.text))?;
        amend = amend.compat(compat);
    }
    if let Some(v) = opts.get("backing_file") {
        amend = amend.backing_file(v.text.clone());
    }
    if let Some(v) = opts.get("backing_fmt") {
        amend = amend.backing_fmt(v.text.clone());
    }
    if let Some(v) = opts.get("data_file") {
        amend = amend.data_file(v.text.clone());
    }
    if let Some(v) = opts.get("data_file_raw") {
        amend = amend.data_file_raw(v.flag);
    }
    if let Some(v) = opts.get("lazy_refcounts") {
        amend = amend.lazy_refcounts(v.flag);
    }
    if let Some(v) = opts.get("refcount_bits") {
        amend = amend.refcount_bits(v.num);
    }
    Ok((amend, opts.get("size").map(|v| v.num)))
}

/// The new image `qemu-img measure -O FORMAT -o OPTIONS` describes, parsed as qemu-img parses
/// it: `None` for raw, else the qcow2 options measuring reads (`qcow2_measure`: the cluster
/// size, extended L2, version, refcount width, preallocation, and whether a backing file is
/// named; the rest are accepted and ignored). Errors are qemu-img's messages.
pub fn measure_options(format: &str, lists: &[String]) -> Result<Option<CreateOptions>, String> {
    let qcow2 = is_qcow2(format).map_err(|f| f.msg)?;
    let opts = parse_options(qcow2, lists)
        .map_err(|f| format!("{}\nInvalid options for file format '{format}'", f.msg))?;
    if !qcow2 {
        return Ok(None);
    }
    let mut co = CreateOptions::new()
        .extended_l2(opts.get("extended_l2").is_some_and(|v| v.flag))
        .size(opts.get("size").map_or(0, |v| v.num));
    if let Some(v) = opts.get("cluster_size") {
        co = co.cluster_size(v.num);
    }
    if let Some(v) = opts.get("compat") {
        let compat = Compat::from_name(&v.text)
            .ok_or_else(|| format!("Invalid compatibility level: '{}'", v.text))?;
        co = co.compat(compat);
    }
    if let Some(v) = opts.get("refcount_bits") {
        co = co.refcount_bits(v.num);
    }
    if let Some(v) = opts.get("backing_file") {
        // Measuring asks only whether there is a backing file; it never opens it, and
        // qemu-img does not look at backing_fmt there.
        co = co.backing_file(v.text.clone(), ImageFormat::Raw);
    }
    if let Some(v) = opts.get("preallocation") {
        // qcow2_measure checks the geometry before the preallocation mode.
        qcow2_engine::measure_size(qcow2_engine::MeasureTarget::Qcow2(&co), 0)
            .map_err(|e| e.to_string())?;
        let mode = Preallocation::from_name(&v.text)
            .ok_or_else(|| format!("invalid parameter value: {}", v.text))?;
        co = co.preallocation(mode);
    }
    Ok(Some(co))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::size::{parse_size, SizeError};

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size(" 1M"), Ok(1 << 20));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("1.5M"), Ok(1_572_864));
        assert_eq!(parse_size("0x10"), Ok(16));
        assert_eq!(parse_size("1b"), Ok(1));
        assert_eq!(parse_size("4T"), Ok(4 << 40));
        assert_eq!(parse_size("1000"), Ok(1000));
        for bad in [
            "1X", "512.5", "1.5", "1e3", "1MB", "0x1.8k", "", "abc", "1M,",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError::Invalid), "{bad}");
        }
        assert_eq!(parse_size("-1"), Err(SizeError::Negative));
    }

    #[test]
    fn option_lists_split_like_qemu() {
        assert_eq!(split_list("a=1,b=x,,y"), vec!["a=1", "b=x,y"]);
    }
}
