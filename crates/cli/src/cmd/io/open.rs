//! Opening the image of a `qimg io` session, from the command line's options or an `open`
//! command's: the format, read-only or read-write, the cache mode, `-U`, native AIO's
//! condition, copy-on-read's, and qemu-io's `-s` (a temporary overlay).

use super::exec::err;
use super::CacheMode;
use crate::names::ImageName;
use crate::qopts::{bool_value, size_value};
use crate::util::program;
use blockio::Opener;
use qcow2_engine::{CreateOptions, Disk, ImageFormat, ImageOptions};
use std::path::Path;

/// How an image is opened (qemu-io's flags and options of `blk_new_open`); the defaults
/// are qemu-io's: read-write, writeback cache, the format probed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenSpec {
    /// The format's name (probed when `None`).
    pub format: Option<String>,
    /// `-r`: writes, discards and resizes are refused.
    pub read_only: bool,
    /// `-s`: writes go to a temporary overlay deleted at the end; the image is only read.
    pub snapshot: bool,
    /// `-C`: reads copy what they find in backing files into the image.
    pub copy_on_read: bool,
    /// `-U`: share every permission (read-only opens only).
    pub force_share: bool,
    /// `-k`: native AIO, which QEMU allows only with O_DIRECT (`qimg io` runs on the backend
    /// of `-i`, whatever this says).
    pub native_aio: bool,
    /// The cache mode (`-t`, `-n`).
    pub cache: CacheMode,
    /// `-d ignore`: discards succeed doing nothing.
    pub discard_ignored: bool,
    /// `-o`: block driver options, in order (`None`: a key alone, QEMU's short form of
    /// `key=on`). `driver` names the format; qcow2 takes `lazy-refcounts` and
    /// `l2-cache-size`.
    pub driver_options: Vec<(String, Option<String>)>,
    /// `--image-opts`: image names are option lists (`driver=qcow2,file.filename=F`).
    pub image_opts: bool,
}

impl OpenSpec {
    /// The format: `-o driver=` (the last one), else `-f`.
    fn format(&self) -> Option<&str> {
        let driver = self
            .driver_options
            .iter()
            .rev()
            .find(|(k, _)| k == "driver");
        match driver {
            Some((_, v)) => Some(v.as_deref().unwrap_or("on")),
            None => self.format.as_deref(),
        }
    }

    /// `options` with the qcow2 driver options applied.
    fn apply(&self, mut options: ImageOptions) -> Result<ImageOptions, String> {
        for (key, value) in &self.driver_options {
            let v = value.as_deref().unwrap_or("on");
            match key.as_str() {
                "lazy-refcounts" => options = options.lazy_refcounts(bool_value(key, v)?),
                "l2-cache-size" => options = options.l2_cache_size(size_value(key, v)?),
                _ => {}
            }
        }
        Ok(options)
    }

    /// The first option the open image's format does not take.
    fn unsupported_option(&self, format: ImageFormat) -> Option<&str> {
        self.driver_options
            .iter()
            .map(|(k, _)| k.as_str())
            .find(|&k| !takes_option(format, k))
    }
}

/// Whether images of `format` take the driver option `key`.
pub fn takes_option(format: ImageFormat, key: &str) -> bool {
    match key {
        "driver" => true,
        "lazy-refcounts" | "l2-cache-size" => format == ImageFormat::Qcow2,
        _ => false,
    }
}

/// QEMU's warning for options given as a key alone.
fn warn_short_booleans(options: &[(String, Option<String>)]) {
    for (key, _) in options.iter().filter(|(_, v)| v.is_none()) {
        err(&format!(
            "{}: warning: short-form boolean option '{key}' deprecated\n\
             Please use {key}=on instead\n",
            program()
        ));
    }
}

/// Opens the image at `path` as `spec` says; the error text is what qemu-io prints after
/// "can't open device PATH: ".
pub async fn open_disk<O: Opener>(
    opener: O,
    path: &Path,
    spec: &OpenSpec,
) -> Result<Disk<O>, String> {
    warn_short_booleans(&spec.driver_options);
    let name = ImageName::parse(path, spec.image_opts, None).map_err(|e| e.why)?;
    let format = match spec.format() {
        None => name.format(),
        Some(name) => {
            Some(ImageFormat::from_name(name).ok_or_else(|| format!("Unknown driver '{name}'"))?)
        }
    };
    let path = name.path();
    if spec.native_aio && !spec.cache.direct() {
        return Err(
            "aio=native was specified, but it requires cache.direct=on, which was not \
                    specified."
                .into(),
        );
    }
    if spec.copy_on_read && spec.read_only {
        return Err("Can't use copy-on-read on read-only device".into());
    }
    let options = spec.apply(
        ImageOptions::new()
            .read_only(spec.read_only)
            .force_share(spec.force_share)
            .cache(spec.cache),
    )?;
    let options = name.options(options).map_err(|e| e.why)?;
    let disk = if spec.snapshot {
        open_overlay(opener, path, format, options).await
    } else {
        Disk::open(opener, path, format, options).await
    }
    .map_err(|e| e.to_string())?;
    if let Some(key) = spec.unsupported_option(disk.format()) {
        return Err(format!(
            "Block format '{}' does not support the option '{key}'",
            disk.format().name()
        ));
    }
    Ok(disk)
}

/// Opens a temporary qcow2 overlay over `image` (qemu-io's `-s`): created in the temporary
/// directory with the image (opened read-only) as its backing file, and unlinked once open,
/// so that it goes with the process.
async fn open_overlay<O: Opener>(
    opener: O,
    image: &Path,
    format: Option<ImageFormat>,
    options: ImageOptions,
) -> qcow2_engine::Result<Disk<O>> {
    let (fmt, size) = {
        let base = Disk::open(
            opener.clone(),
            image,
            format,
            options.clone().read_only(true),
        )
        .await?;
        (base.format(), base.size())
    };
    let backing = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let overlay = std::env::temp_dir().join(format!(
        "qimg-snapshot-{}-{nanos}.qcow2",
        std::process::id()
    ));
    let create = CreateOptions::new()
        .size(size)
        .backing_file(backing.to_string_lossy(), fmt);
    qcow2_engine::create(&opener, &overlay, &create).await?;
    let disk = Disk::open(
        opener,
        &overlay,
        Some(ImageFormat::Qcow2),
        options.read_only(false),
    )
    .await;
    let _ = std::fs::remove_file(&overlay);
    disk
}
