//! How the command line names an image, in QEMU's filename syntax: a file name (with an
//! optional `file:` prefix), a `json:{...}` object of block options, or, with `--image-opts`,
//! a `key=value,...` list of the same options; and the `--object` definitions beside them.
//! Each name is reduced to what the engine opens: a file, a format and [`ImageOptions`].
//!
//! The options are QEMU's, with its words when one is wrong: the format driver's (`qcow2`,
//! `raw`) and its protocol's (`file`), nested (`{"file": {"filename": ...}}`) or dotted
//! (`file.filename=...`). Options that change how the engine opens the image take effect
//! (`read-only`, `force-share`, `file.locking`, `cache.direct`, `l2-cache-size`,
//! `lazy-refcounts`, `data-file.filename`, `backing` and `backing.file.filename`); QEMU's
//! tuning knobs the engine has no counterpart for (`discard`, `detect-zeroes`, the other
//! cache sizes, `overlap-check`, `aio`) are checked and accepted.

mod objects;
mod options;
#[cfg(test)]
mod tests;

pub use objects::check_objects;

use crate::util::program;
use anyhow::{anyhow, bail, Result};
use options::{Dict, Settings};
use qcow2_engine::{BackingChoice, ImageFormat, ImageOptions};
use std::path::{Path, PathBuf};

/// The options every command that opens images takes for naming them: `--image-opts` and
/// `--object`, as qemu-img and qemu-io take them.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NameArgs {
    /// Read each image name as a list of block options (`driver=qcow2,file.filename=F`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    #[command(flatten)]
    pub objects: ObjectArgs,
}

/// `--object`, alone: what `create` takes (it names no image to open).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ObjectArgs {
    /// Define an object (`secret,id=ID,data=...`), checked as QEMU checks it; `help` lists
    /// the object types.
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub objects: Vec<String>,
}

impl ObjectArgs {
    /// Checks the `--object` definitions; `Ok(true)` when one asked for help, which has
    /// been printed (the command then ends with status 0, as QEMU's do).
    pub fn check(&self) -> Result<bool> {
        check_objects(&self.objects)
    }
}

impl NameArgs {
    /// The image named `given`, with the format given by `-f` (refused with `--image-opts`,
    /// as qemu-img refuses it).
    pub fn name(&self, given: &Path, format: Option<&str>) -> Result<ImageName> {
        if self.image_opts && format.is_some() {
            let opt = if program() == "qemu-io" || program() == "qimg io" {
                "-f"
            } else {
                "--format"
            };
            bail!("--image-opts and {opt} are mutually exclusive");
        }
        Ok(ImageName::parse(given, self.image_opts, format)?)
    }
}

/// An image as the command line names it, reduced to what the engine opens.
#[derive(Clone, Debug)]
pub struct ImageName {
    /// The name as given, for messages ("Could not open '...'").
    given: String,
    /// The file the image is in.
    file: PathBuf,
    /// The format: `driver`, else `-f`; probed when neither says.
    format: Option<ImageFormat>,
    settings: Settings,
}

impl ImageName {
    /// Reads `given`: a `json:` object or, with `image_opts`, an option list; otherwise a
    /// file name, less a `file:` prefix. `format` is `-f`'s value.
    pub fn parse(
        given: &Path,
        image_opts: bool,
        format: Option<&str>,
    ) -> Result<ImageName, NameError> {
        let text = given.to_string_lossy().into_owned();
        let cli_format = match format {
            None => None,
            Some(f) => Some(
                ImageFormat::from_name(f)
                    .ok_or_else(|| NameError::of(&text, format!("Unknown driver '{f}'")))?,
            ),
        };
        let dict = if image_opts {
            Some(options::parse_keyval(&text))
        } else if let Some(json) = text.strip_prefix("json:") {
            Some(options::parse_json(json).map_err(|why| NameError::of(&text, why))?)
        } else {
            None
        };
        let Some(dict) = dict else {
            let file = match text.strip_prefix("file:") {
                Some(rest) => PathBuf::from(rest),
                None => given.to_path_buf(),
            };
            return Ok(ImageName {
                given: text,
                file,
                format: cli_format,
                settings: Settings::default(),
            });
        };
        let (file, format, settings) =
            Dict::resolve(dict, cli_format).map_err(|why| NameError::of(&text, why))?;
        Ok(ImageName {
            given: text,
            file,
            format,
            settings,
        })
    }

    /// The file the image is in (what qemu-img prints as `image:`).
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The format, when the name or `-f` gives one.
    pub fn format(&self) -> Option<ImageFormat> {
        self.format
    }

    /// `base` with what the name's options say; refused, as QEMU refuses it, when the name
    /// sets the backing file of an image `base` opens without one.
    pub fn options(&self, base: ImageOptions) -> Result<ImageOptions, NameError> {
        let s = &self.settings;
        if base.backing_choice() == &BackingChoice::None {
            if let Some(key) = &s.backing_key {
                let driver = self.format.unwrap_or(ImageFormat::Qcow2).name();
                let why = format!("Block format '{driver}' does not support the option '{key}'");
                return Err(NameError::of(&self.given, why));
            }
        }
        if let Some(why) = &s.backing_ref {
            let why = format!("Could not open backing file: {why}");
            return Err(NameError::of(&self.given, why));
        }
        Ok(s.apply(base))
    }

    /// QEMU's message for a failed open of this image: "Could not open 'NAME': why".
    pub fn could_not_open(&self, why: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(could_not_open(&self.given, why))
    }
}

fn could_not_open(given: &str, why: impl std::fmt::Display) -> String {
    format!("Could not open '{given}': {why}")
}

/// Why a name cannot be opened: `why` is QEMU's reason, which qemu-img prints after
/// "Could not open 'NAME': " (the Display) and qemu-io after "can't open device NAME: ".
#[derive(Debug)]
pub struct NameError {
    /// The name, when the reason is about it (not about `-f`).
    given: Option<String>,
    /// The reason.
    pub why: String,
}

impl NameError {
    fn of(given: &str, why: String) -> Self {
        NameError {
            given: Some(given.to_owned()),
            why,
        }
    }
}

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.given {
            Some(given) => f.write_str(&could_not_open(given, &self.why)),
            None => f.write_str(&self.why),
        }
    }
}

impl std::error::Error for NameError {}
