//! Opening the image of a `qimg io` session, from the command line's options or an `open`
//! command's: the format, read-only or read-write, the cache mode, `-U`, native AIO's
//! condition, copy-on-read's, and qemu-io's `-s` (a temporary overlay).

use super::CacheMode;
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
}

/// Opens the image at `path` as `spec` says; the error text is what qemu-io prints after
/// "can't open device PATH: ".
pub async fn open_disk<O: Opener>(
    opener: O,
    path: &Path,
    spec: &OpenSpec,
) -> Result<Disk<O>, String> {
    let format = match spec.format.as_deref() {
        None => None,
        Some(name) => {
            Some(ImageFormat::from_name(name).ok_or_else(|| format!("Unknown driver '{name}'"))?)
        }
    };
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
    let options = ImageOptions::new()
        .read_only(spec.read_only)
        .force_share(spec.force_share)
        .direct(spec.cache.direct());
    if spec.snapshot {
        return open_overlay(opener, path, format, options)
            .await
            .map_err(|e| e.to_string());
    }
    Disk::open(opener, path, format, options)
        .await
        .map_err(|e| e.to_string())
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
