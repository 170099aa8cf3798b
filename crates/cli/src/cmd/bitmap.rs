//! `qimg bitmap`: change an image's persistent dirty bitmaps (qemu-img bitmap): `--add`,
//! `--remove`, `--clear`, `--enable`, `--disable`, `--merge SOURCE`, several in one command,
//! applied in order. qemu-img's syntax, messages and exit status. Not done: `-b` (merging
//! from another file), `--object`, `--image-opts`.

use crate::size::parse_size;
use anyhow::{anyhow, bail, Result};
use blockio::FileOpener;
use qcow2_engine::{BitmapAction, Image, ImageFormat, ImageOptions};
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
            eprintln!("qimg: {}", &m[1..]);
            return ExitCode::from(1);
        }
        Err(Usage(m)) => {
            eprintln!("qimg bitmap: {m}\nTry 'qimg bitmap --help' for more info");
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
            "-g" => p.granularity = Some(granularity(&value(&mut it, "g")?)?),
            "-b" => p.source_file = Some(value(&mut it, "b")?),
            "-F" => p.source_fmt = Some(value(&mut it, "F")?),
            "-f" => p.format = Some(value(&mut it, "f")?),
            s if s.starts_with("--merge=") => {
                p.actions.push(BitmapAction::Merge(s["--merge=".len()..].into()));
            }
            s if s.starts_with("-g") && s.len() > 2 => p.granularity = Some(granularity(&s[2..])?),
            s if s.starts_with("-f") && s.len() > 2 => p.format = Some(s[2..].into()),
            "-h" | "--help" => return Err(Usage("usage: qimg bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILENAME BITMAP".into())),
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
    if p.source_file.is_some() || p.image_opts || !p.objects.is_empty() {
        bail!("qimg bitmap does not support -b, --image-opts or --object yet");
    }
    if let Some(f) = p.format.as_deref() {
        match ImageFormat::from_name(f) {
            None => bail!("Unknown file format '{f}'"),
            Some(ImageFormat::Raw) => {
                bail!("Operation {} on bitmap {name} failed: Can't store persistent bitmaps to {image}: Operation not supported", p.actions[0].name())
            }
            Some(_) => {}
        }
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
    let img = Image::open(FileOpener, image, ImageOptions::new())
        .await
        .map_err(|e| anyhow!("Could not open '{image}': {e}"))?;
    img.bitmap_edit(name, &actions).await?;
    Ok(())
}
