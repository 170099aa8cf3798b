//! `qimg bitmap`: change an image's persistent dirty bitmaps (qemu-img bitmap): `--add`,
//! `--remove`, `--clear`, `--enable`, `--disable`, `--merge SOURCE [-b SOURCE_FILE [-F FMT]]`,
//! several in one command, applied in order. qemu-img's syntax, messages and exit status.

use crate::names::{check_objects, ImageName, NameArgs};
use crate::size::parse_size;
use anyhow::{anyhow, bail, Result};
use qcow2_engine::{BitmapAction, Image, ImageFormat, ImageOptions};
use std::path::Path;
use std::process::ExitCode;

/// The arguments of `qimg bitmap`, parsed in order (the order of the actions matters).
#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct BitmapArgs {
    /// `(--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
    /// [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILENAME BITMAP`
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

/// What the command line asks for.
#[derive(Default)]
struct Parsed {
    actions: Vec<BitmapAction>,
    granularity: Option<u64>,
    source_file: Option<String>,
    source_fmt: Option<String>,
    format: Option<String>,
    image_opts: bool,
    objects: Vec<String>,
    positional: Vec<String>,
}

/// Runs `qimg bitmap`: exit status 0, or 1 with qemu-img's message on stderr.
pub async fn run(args: BitmapArgs) -> ExitCode {
    let parsed = match parse(&args.args) {
        Ok(p) => p,
        Err(Usage(m)) if m.starts_with('\0') => {
            eprintln!("{}: {}", crate::util::program(), &m[1..]);
            return ExitCode::from(1);
        }
        Err(Usage(m)) => {
            let p = crate::util::program();
            eprintln!("{p} bitmap: {m}\nTry '{p} bitmap --help' for more info");
            return ExitCode::from(1);
        }
    };
    crate::util::exit(1, bitmap(parsed).await)
}

/// A getopt error (printed with the usage hint).
struct Usage(String);

fn parse(args: &[String]) -> std::result::Result<Parsed, Usage> {
    let mut p = Parsed::default();
    let mut it = args.iter();
    let value = |it: &mut std::slice::Iter<'_, String>, opt: &str| {
        it.next()
            .cloned()
            .ok_or_else(|| Usage(format!("option requires an argument -- '{opt}'")))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--add" => p.actions.push(BitmapAction::Add { granularity: None }),
            "--remove" => p.actions.push(BitmapAction::Remove),
            "--clear" => p.actions.push(BitmapAction::Clear),
            "--enable" => p.actions.push(BitmapAction::Enable),
            "--disable" => p.actions.push(BitmapAction::Disable),
            "--merge" => p.actions.push(BitmapAction::Merge(value(&mut it, "merge")?)),
            "--image-opts" => p.image_opts = true,
            "--object" => p.objects.push(value(&mut it, "object")?),
            "-g" | "--granularity" => p.granularity = Some(granularity(&value(&mut it, "g")?)?),
            "-b" | "--source-file" => p.source_file = Some(value(&mut it, "b")?),
            "-F" | "--source-format" => p.source_fmt = Some(value(&mut it, "F")?),
            s if s.starts_with("--granularity=") => {
                p.granularity = Some(granularity(&s["--granularity=".len()..])?);
            }
            s if s.starts_with("--source-file=") => {
                p.source_file = Some(s["--source-file=".len()..].into());
            }
            s if s.starts_with("--source-format=") => {
                p.source_fmt = Some(s["--source-format=".len()..].into());
            }
            "-f" => p.format = Some(value(&mut it, "f")?),
            s if s.starts_with("--merge=") => {
                p.actions.push(BitmapAction::Merge(s["--merge=".len()..].into()));
            }
            s if s.starts_with("-g") && s.len() > 2 => p.granularity = Some(granularity(&s[2..])?),
            s if s.starts_with("-f") && s.len() > 2 => p.format = Some(s[2..].into()),
            "-h" | "--help" => return Err(Usage("usage: qemu-img bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILENAME BITMAP".into())),
            s if s.starts_with("--") => return Err(Usage(format!("unrecognized option '{s}'"))),
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(Usage(format!("invalid option -- '{}'", &s[1..2])))
            }
            _ => p.positional.push(a.clone()),
        }
    }
    Ok(p)
}

/// `-g`, as qemu-img reads it (`cvtnum`; 0 means the default).
fn granularity(s: &str) -> std::result::Result<u64, Usage> {
    // qemu-img prints this one without the usage hint: passed on as a marker.
    parse_size(s).map_err(|_| Usage(format!("\0Invalid granularity specified: '{s}'.")))
}

async fn bitmap(p: Parsed) -> Result<()> {
    if check_objects(&p.objects)? {
        return Ok(());
    }
    if p.actions.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    let add = p
        .actions
        .iter()
        .any(|a| matches!(a, BitmapAction::Add { .. }));
    if p.granularity.is_some_and(|g| g != 0) && !add {
        bail!("granularity only supported with --add");
    }
    if p.source_fmt.is_some() && p.source_file.is_none() {
        bail!("-F only supported with -b");
    }
    let merge = p
        .actions
        .iter()
        .any(|a| matches!(a, BitmapAction::Merge(_)));
    if p.source_file.is_some() && !merge {
        bail!("Merge bitmap source file only supported with --merge");
    }
    let [image, name] = p.positional.as_slice() else {
        bail!("Expecting filename and bitmap name");
    };
    let names = NameArgs {
        image_opts: p.image_opts,
        objects: Default::default(),
    };
    let target = names.name(Path::new(image), p.format.as_deref())?;
    if target.format() == Some(ImageFormat::Raw) {
        bail!("Operation {} on bitmap {name} failed: Can't store persistent bitmaps to {image}: Operation not supported", p.actions[0].name())
    }
    let granularity = p.granularity.filter(|&g| g != 0);
    let actions: Vec<BitmapAction> = p
        .actions
        .into_iter()
        .map(|a| match a {
            BitmapAction::Add { .. } => BitmapAction::Add { granularity },
            other => other,
        })
        .collect();
    let img = crate::util::open_image(&target, ImageOptions::new()).await?;
    let (actions, stop) = match &p.source_file {
        None => (actions, None),
        Some(file) => from_source(file, p.source_fmt.as_deref(), name, actions).await,
    };
    img.bitmap_edit(name, &actions).await?;
    stop.map_or(Ok(()), Err)
}

/// With `-b FILE`, each `--merge SOURCE` takes bitmap SOURCE of FILE: its extents are read
/// here. At the first that cannot be read, the actions stop (those before it are still
/// done, as qemu-img does them) with qemu-img's message.
async fn from_source(
    file: &str,
    fmt: Option<&str>,
    name: &str,
    actions: Vec<BitmapAction>,
) -> (Vec<BitmapAction>, Option<anyhow::Error>) {
    let mut src = None;
    let mut out = Vec::new();
    for a in actions {
        let BitmapAction::Merge(source) = &a else {
            out.push(a);
            continue;
        };
        if src.is_none() {
            let raw = fmt.and_then(ImageFormat::from_name) == Some(ImageFormat::Raw);
            let opened = if raw {
                None
            } else {
                let opened = match ImageName::parse(Path::new(file), false, None) {
                    Ok(n) => crate::util::open_image(&n, ImageOptions::new().read_only(true)).await,
                    Err(e) => Err(e.into()),
                };
                match opened {
                    Ok(img) => Some(img),
                    Err(e) => return (out, Some(e)),
                }
            };
            src = Some(opened);
        }
        let img = src.as_ref().and_then(Option::as_ref);
        let extents = match img {
            None => Err(qcow2_engine::Error::Bitmap(format!(
                "Dirty bitmap '{source}' not found"
            ))),
            Some(img) => img.bitmap_dirty_extents(source).await,
        };
        match extents {
            Ok(extents) => out.push(BitmapAction::MergeExtents {
                extents,
                size: img.map_or(0, Image::size),
            }),
            Err(qcow2_engine::Error::Bitmap(m)) => {
                let e = anyhow!("Operation merge on bitmap {name} failed: {m}");
                return (out, Some(e));
            }
            Err(e) => return (out, Some(e.into())),
        }
    }
    (out, None)
}
