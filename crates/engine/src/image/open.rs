//! Opening an image: its file (with QEMU's locks, I10), the header and layout validated
//! before anything else, the metadata loaded and checked (a read-write open), the data file
//! and the backing chain (loops and depth refused).

use super::{Disk, Image, RawImage};
use crate::aligned::{read_bytes, Aligned};
use crate::files::{DataFile, Files, FlushState};
use crate::meta::cache::TableCache;
use crate::meta::{load, Meta, MetadataClusters};
use crate::options::{BackingChoice, FileRole, ImageFormat, ImageOptions};
use crate::{Error, Result};
use blockio::{Backend, OpenOptions, Opener};
use qcow2_alloc::LeaseTable;
use qcow2_format::QCOW_MAGIC;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

impl<O: Opener> Image<O> {
    /// Opens the image at `path` with `opener` (which is also used for its backing chain and
    /// data file).
    ///
    /// Validates the header and the layout before anything else; an image that fails
    /// validation is never written to. An image with the corrupt bit opens read-only only.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future closes the files opened so far (their locks go with them) and
    /// leaves them as they were: nothing is written before the open has validated the image,
    /// except the repair of a dirty image (lazy refcounts after a crash), which writes in
    /// crash-safe order and can be interrupted like a crash.
    pub async fn open(opener: O, path: impl AsRef<Path>, options: ImageOptions) -> Result<Self> {
        let mut chain = Vec::new();
        Self::open_in_chain(&opener, path.as_ref(), &options, &mut chain).await
    }

    /// Opens the qcow2 image at `path` as the next member of `chain` (the canonical paths of
    /// the images above it, for loop detection), in steps: the file and header (validated
    /// before anything else), a repair if a read-write open finds the dirty bit, the L1 table,
    /// the data file, the backing chain, the metadata of a read-write image (checked against
    /// the refcounts), then the bitmaps.
    async fn open_in_chain(
        opener: &O,
        path: &Path,
        options: &ImageOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let depth = chain.len();
        enter_chain(chain, path)?;
        let role = if depth == 0 { "image" } else { "backing file" };
        if options.force_share && !options.read_only {
            return Err(Error::InvalidOptions(
                "force-share=on can only be used with read-only images".into(),
            ));
        }
        let (file, file_len) = open_file(opener, path, options, role, FileRole::Qcow2).await?;
        let header = load::read_header(&file, path, file_len).await?;
        // A read-only open leaves the snapshot table to what reads it (as QEMU's open for
        // `qemu-img check`, which repairs an oversized table); a writer needs it sound.
        let layout = if options.read_only {
            header.validate_layout_but_snapshots(file_len)
        } else {
            header.validate_layout(file_len)
        };
        layout.map_err(|source| Error::Format {
            path: path.into(),
            source,
        })?;
        let read_only = options.read_only;
        if !read_only && header.is_corrupt() {
            return Err(Error::MarkedCorrupt(path.into()));
        }
        if !read_only && header.is_dirty() {
            drop(file);
            Self::repair_dirty(opener, path, options).await?;
            chain.pop();
            return Box::pin(Self::open_in_chain(opener, path, options, chain)).await;
        }
        let l1 = load::read_l1(&file, &header).await?;
        let data_file = open_data_file(opener, path, options, &header).await?;
        let backing = Self::open_backing(opener, path, options, &header, chain).await?;
        let geo = header.geometry();
        let (metadata, alloc, compressed_tails) = if read_only {
            (MetadataClusters::default(), None, Default::default())
        } else {
            let metadata = load::metadata_clusters(&file, path, &header, &l1).await?;
            let alloc = load::load_allocator(&file, &header, path, file_len).await?;
            let tails = crate::meta::verify::references(
                &file,
                path,
                &geo,
                &header,
                &l1,
                data_file.is_some(),
                &metadata,
                &alloc,
            )
            .await?;
            (metadata, Some(alloc), tails)
        };
        let l2_tables = (options.l2_cache_bytes / geo.cluster_size()).max(1) as usize;
        let mut files = Files::new(path, file, file_len, data_file);
        files.skip_flushes(options.no_flush);
        let img = Image {
            files,
            write_through: options.write_through,
            aligned: Aligned::default(),
            geo,
            read_only,
            backing,
            size: AtomicU64::new(header.size),
            resizing: async_lock::Mutex::new(()),
            meta: crate::meta::MetaLock::new(Meta {
                disk_end: header.size,
                l1,
                l1_dirty: Default::default(),
                l2: TableCache::new(l2_tables),
                header: header.clone(),
                alloc,
                gates: qcow2_alloc::Gates::new(),
                barrier_owed: false,
                l1_switch: None,
                first_write_done: false,
                metadata,
                compressed_tails,
                snapshot_deletions: 0,
                bitmap_switch: None,
            }),
            leases: LeaseTable::new(),
            metadata_prealloc: async_lock::OnceCell::new(),
            marked_corrupt: std::sync::atomic::AtomicBool::new(false),
            io: Default::default(),
            meta_io: Default::default(),
            writers: Default::default(),
            acked: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            tracked: crate::lock::Lock::new(None),
            lazy_refcounts: !read_only
                && header.version >= 3
                && options.lazy_refcounts.unwrap_or(header.lazy_refcounts()),
            header,
        };
        if !read_only {
            // Once the overlap guard's map is complete: the bitmaps are checked against it.
            let bitmaps = img.bitmap_ctx().load_bitmaps().await?;
            *img.tracked.lock().await = bitmaps;
        }
        Ok(img)
    }

    /// A read-write open found the dirty bit: lazy refcounts were in use and the image was
    /// not closed, so the refcounts on disk may be stale. They are rebuilt before anything can
    /// be allocated, as QEMU does; but the image is checked first, read-only, and repaired
    /// only if everything found is repairable: an open that fails leaves the file as it was
    /// (QEMU repairs whatever it can and fails after).
    async fn repair_dirty(opener: &O, path: &Path, options: &ImageOptions) -> Result<()> {
        let fixer = Box::pin(Image::open_for_repair(
            opener.clone(),
            path,
            options.clone(),
        ))
        .await?;
        let found = fixer.check().await?;
        if !found.repairable() {
            let why = match &found.failure {
                Some(why) => format!("the check failed: {why}"),
                None if found.check_errors > 0 => {
                    format!("{} internal errors in the check", found.check_errors)
                }
                None => format!("{} problems no repair can fix", found.unrepairable),
            };
            return Err(Error::Corrupt {
                path: path.into(),
                what: format!("the dirty image cannot be repaired ({why})"),
            });
        }
        let report = fixer.repair(crate::RepairMode::All).await?;
        drop(fixer);
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(Error::Corrupt {
                path: path.into(),
                what: format!(
                    "the dirty image could not be repaired ({} corruptions left)",
                    report.corruptions
                ),
            });
        }
        tracing::info!(path = %path.display(), "refcounts rebuilt after an unclean shutdown");
        Ok(())
    }

    /// Opens the backing file the options or the header name (none without one), refusing a
    /// chain deeper than the options allow.
    async fn open_backing(
        opener: &O,
        path: &Path,
        options: &ImageOptions,
        header: &qcow2_format::Header,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Option<Box<Disk<O>>>> {
        let spec = match &options.backing {
            BackingChoice::None => None,
            BackingChoice::File { path, format } => Some((path.clone(), *format)),
            BackingChoice::FromHeader => match &header.backing_file {
                None => None,
                Some(name) => {
                    let fmt = match header.backing_format() {
                        None => None,
                        Some(f) => {
                            Some(ImageFormat::from_name(f).ok_or_else(|| Error::Unsupported {
                                path: path.into(),
                                what: format!("backing file format '{f}'"),
                            })?)
                        }
                    };
                    Some((resolve_backing(path, name), fmt))
                }
            },
        };
        let Some((bpath, fmt)) = spec else {
            return Ok(None);
        };
        if chain.len() > options.max_backing_depth {
            return Err(Error::BackingChainTooDeep {
                path: path.into(),
                limit: options.max_backing_depth,
            });
        }
        let bopts = ImageOptions {
            read_only: true,
            backing: BackingChoice::FromHeader,
            data_file: None,
            lock_image: true,
            ..options.clone()
        };
        let disk = Self::open_disk(opener, &bpath, fmt, &bopts, chain, "backing file")
            .await
            .map_err(|e| match e {
                Error::Locked { .. }
                | Error::BackingLoop { .. }
                | Error::BackingChainTooDeep { .. } => e,
                e => Error::Backing(Box::new(e)),
            })?;
        Ok(Some(Box::new(disk)))
    }

    pub(crate) async fn open_disk(
        opener: &O,
        path: &Path,
        format: Option<ImageFormat>,
        options: &ImageOptions,
        chain: &mut Vec<PathBuf>,
        role: &'static str,
    ) -> Result<Disk<O>> {
        let format = match format {
            Some(f) => f,
            None => probe_format(opener, path, options, role).await?,
        };
        match format {
            ImageFormat::Qcow2 => {
                let img = Box::pin(Self::open_in_chain(opener, path, options, chain)).await?;
                Ok(Disk::Qcow2(img))
            }
            ImageFormat::Raw => {
                if chain.contains(&canonical(path)) {
                    return Err(Error::BackingLoop { path: path.into() });
                }
                let (backend, len) = open_file(opener, path, options, role, FileRole::Raw).await?;
                // Like QEMU, a raw image's size is its length rounded up to whole sectors (the
                // tail reads as zeros).
                let size = len.div_ceil(512) * 512;
                Ok(Disk::Raw(RawImage {
                    flushes: FlushState::new(&backend).skipping(options.no_flush),
                    write_through: options.write_through,
                    backend,
                    path: path.into(),
                    size: AtomicU64::new(size),
                }))
            }
        }
    }
}

/// How to open a file of `role` with `options`: access mode, O_DIRECT, QEMU's locks.
fn io_options(options: &ImageOptions, role: FileRole) -> OpenOptions {
    let own_file = matches!(role, FileRole::Qcow2 | FileRole::Raw);
    let lock = match own_file && !options.lock_image {
        true => None,
        false => options.lock_request(role),
    };
    OpenOptions {
        write: !options.read_only,
        direct: options.direct,
        lock,
        ..OpenOptions::default()
    }
}

/// The error of a failed open: a lock conflict as such (QEMU's message), others as they are.
pub(crate) fn open_error(role: &'static str, path: &Path, source: std::io::Error) -> Error {
    match blockio::LockConflict::from_io(&source) {
        Some(conflict) => Error::Locked {
            role,
            path: path.into(),
            conflict: conflict.clone(),
        },
        None => Error::OpenFile {
            role,
            path: path.into(),
            source,
        },
    }
}

async fn probe_format<O: Opener>(
    opener: &O,
    path: &Path,
    options: &ImageOptions,
    role: &'static str,
) -> Result<ImageFormat> {
    let (f, len) = open_file(opener, path, options, role, FileRole::Probe).await?;
    if len < 4 {
        return Ok(ImageFormat::Raw);
    }
    let head = read_bytes(&f, 0, 4, "backing file header").await?;
    Ok(if head[..4] == QCOW_MAGIC.to_be_bytes() {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Resolves a backing file name as QEMU does: relative names are relative to the directory
/// of the image that names them.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.into()
    } else {
        image.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// Resolves a data file name: QEMU takes a relative name relative to the current directory;
/// when nothing is there, the image's directory is tried too.
fn resolve_data_file(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() || name.exists() {
        return name.into();
    }
    let beside = image.parent().unwrap_or(Path::new("")).join(name);
    if beside.exists() {
        beside
    } else {
        name.into()
    }
}

/// Opens `path` with the options' access mode and returns it with its length; errors name
/// the file and its `role` ("image", "backing file", ...).
async fn open_file<O: Opener>(
    opener: &O,
    path: &Path,
    options: &ImageOptions,
    role: &'static str,
    file_role: FileRole,
) -> Result<(O::Backend, u64)> {
    let file = opener
        .open(path, io_options(options, file_role))
        .await
        .map_err(|source| open_error(role, path, source))?;
    let len = file
        .len()
        .await
        .map_err(|e| Error::io(format!("{}: size", path.display()), e))?;
    Ok((file, len))
}

/// The canonical form of `path` (itself when it cannot be resolved).
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Adds `path` to the chain being opened, refusing a loop.
fn enter_chain(chain: &mut Vec<PathBuf>, path: &Path) -> Result<()> {
    let canonical = canonical(path);
    if chain.contains(&canonical) {
        return Err(Error::BackingLoop { path: path.into() });
    }
    chain.push(canonical);
    Ok(())
}

/// Opens the external data file the options or the header name (none when the image has
/// none), with QEMU's locks for a data file.
async fn open_data_file<O: Opener>(
    opener: &O,
    path: &Path,
    options: &ImageOptions,
    header: &qcow2_format::Header,
) -> Result<Option<DataFile<O::Backend>>> {
    if !header.has_data_file() {
        return Ok(None);
    }
    let name = options
        .data_file
        .clone()
        .or_else(|| header.data_file_name().map(PathBuf::from))
        .ok_or_else(|| Error::Unsupported {
            path: path.into(),
            what: "the image uses an external data file but names none; give one in the open \
                   options"
                .into(),
        })?;
    let resolved = resolve_data_file(path, &name);
    let backend = opener
        .open(&resolved, io_options(options, FileRole::DataFile))
        .await
        .map_err(|source| open_error("data file", &resolved, source))?;
    Ok(Some(DataFile::new(backend, resolved)))
}
