//! The [`Image`]: opening an image, its backing chain and data file, and what it knows about
//! itself.

use crate::aligned::{read_bytes, read_data, Aligned};
use crate::files::{DataFile, Files, FlushState};
use crate::map::Mapper;
use crate::meta::cache::TableCache;
use crate::meta::{load, Meta, MetadataClusters, Store};
use crate::options::{BackingChoice, FileRole, ImageFormat, ImageOptions};
use crate::{Error, Result};
use blockio::{Backend, IoBuf, Keep, OpenOptions, Opener};
use qcow2_alloc::LeaseTable;
use qcow2_format::{ClusterGeometry, FormatError, Header, QCOW_MAGIC};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An open qcow2 image.
///
/// All methods take `&self`: share the image between tasks with an `Arc` (or a reference on a
/// single-threaded runtime). The type parameter is the [`Opener`] that made the image's file
/// and is used for its backing chain and data file; pick [`blockio::FileOpener`] for a tokio
/// runtime of any flavour, or `blockio::UringOpener` inside a tokio-uring runtime.
///
/// A writable image is locked as QEMU locks it (see [`ImageOptions::force_share`]): no other
/// process (QEMU included), nor another open in this one, can write it meanwhile.
///
/// # Closing
///
/// End with [`Image::close`]: it waits for the I/O that dropped requests left in flight,
/// writes the metadata back and makes everything durable. An image dropped without it keeps
/// what is on disk consistent (as after a crash: a cluster may leak, none is corrupted), but
/// the changes acknowledged since the last successful [`flush`](Image::flush) may be lost, and
/// the drop reports it with a `tracing` error naming the image and what was not written back.
pub struct Image<O: Opener> {
    /// The image file and the data file.
    pub(crate) files: Files<O::Backend>,
    /// Aligned I/O and its read-modify-write lock.
    pub(crate) aligned: Aligned,
    pub(crate) header: Header,
    pub(crate) geo: ClusterGeometry,
    pub(crate) read_only: bool,
    /// Lazy refcounts in use: refcount blocks are written only at close, under the dirty bit.
    pub(crate) lazy_refcounts: bool,
    pub(crate) backing: Option<Box<Disk<O>>>,
    pub(crate) meta: async_lock::Mutex<Meta>,
    pub(crate) leases: LeaseTable,
    /// Whether the image looks like it was created with preallocation=metadata (computed on
    /// first use, as QEMU does, for block status).
    pub(crate) metadata_prealloc: async_lock::OnceCell<bool>,
    /// Requests and their backend operations in flight ([`crate::inflight`]): close waits
    /// until none is left.
    pub(crate) io: crate::inflight::Tracker,
    /// Metadata writes in flight: each waits until none is, and close too.
    pub(crate) meta_io: crate::inflight::Tracker,
    /// Acknowledged guest changes (writes, zeroings, discards), counted.
    pub(crate) acked: AtomicU64,
    /// `acked` as the last successful flush found it: what is not durable yet is the rest.
    pub(crate) flushed: AtomicU64,
    /// Set by a successful close: the drop has nothing to report.
    pub(crate) closed: std::sync::atomic::AtomicBool,
    /// The persistent bitmaps maintained while writing (read-write images with bitmaps).
    pub(crate) bitmaps: async_lock::Mutex<Option<crate::bitmaps::Bitmaps>>,
    /// Set once corruption was found and the corrupt bit written: writes stop.
    pub(crate) marked_corrupt: std::sync::atomic::AtomicBool,
}

impl<O: Opener> Drop for Image<O> {
    fn drop(&mut self) {
        if self.read_only || self.closed.load(Ordering::Acquire) {
            return;
        }
        let unflushed = self
            .acked
            .load(Ordering::Acquire)
            .saturating_sub(self.flushed.load(Ordering::Acquire));
        let meta = self.meta.get_mut();
        let l2_tables = meta.l2.dirty_count();
        let l1 = !meta.l1_dirty.is_empty();
        let refcounts = meta
            .alloc
            .as_ref()
            .is_some_and(|a| a.is_dirty() || a.has_pending());
        if unflushed == 0 && l2_tables == 0 && !l1 && !refcounts {
            return;
        }
        tracing::error!(
            path = %self.path().display(),
            unflushed_changes = unflushed,
            dirty_l2_tables = l2_tables,
            dirty_l1 = l1,
            dirty_refcounts = refcounts,
            "image dropped without close(): changes acknowledged since the last flush may be \
             lost (the file is left consistent, as after a crash)"
        );
    }
}

/// A disk image of either format: what a backing chain is made of, and what `qimg` opens
/// when the format is given or probed.
// A chain holds a handful of disks for its whole life: boxing the large variant would only add
// an indirection to every read.
#[allow(clippy::large_enum_variant)]
pub enum Disk<O: Opener> {
    /// A qcow2 image (itself possibly backed).
    Qcow2(Image<O>),
    /// A raw image.
    Raw(RawImage<O::Backend>),
}

/// A raw disk image: the file's bytes are the disk.
pub struct RawImage<B> {
    pub(crate) backend: B,
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    pub(crate) flushes: FlushState,
}

impl<B> RawImage<B> {
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size: the file's length when it was opened, rounded up to a multiple of 512 bytes
    /// as QEMU does.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl<O: Opener> Disk<O> {
    /// Opens `path` as `format`, probing the format when `None` (a file starting with the
    /// qcow2 magic is qcow2, anything else raw).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::open`]: dropping the future closes whatever it opened and writes nothing.
    pub async fn open(
        opener: O,
        path: impl AsRef<Path>,
        format: Option<ImageFormat>,
        options: ImageOptions,
    ) -> Result<Self> {
        let mut chain = Vec::new();
        Image::open_disk(
            &opener,
            path.as_ref(),
            format,
            &options,
            &mut chain,
            "image",
        )
        .await
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        match self {
            Disk::Qcow2(i) => i.path(),
            Disk::Raw(r) => r.path(),
        }
    }

    /// Its format.
    pub fn format(&self) -> ImageFormat {
        match self {
            Disk::Qcow2(_) => ImageFormat::Qcow2,
            Disk::Raw(_) => ImageFormat::Raw,
        }
    }

    /// Its virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(i) => i.size(),
            Disk::Raw(r) => r.size,
        }
    }

    /// The qcow2 image, if it is one.
    pub fn as_qcow2(&self) -> Option<&Image<O>> {
        match self {
            Disk::Qcow2(i) => Some(i),
            Disk::Raw(_) => None,
        }
    }

    /// The image below this one, if any.
    pub fn backing(&self) -> Option<&Disk<O>> {
        self.as_qcow2().and_then(|i| i.backing())
    }

    /// Reads into the buffer's window from `offset` (see [`Image::read_at`]); a raw image
    /// reads zeros past its end.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::read_at`]: the read is abandoned, nothing changes.
    pub async fn read_at(&self, buf: IoBuf, offset: u64) -> crate::ReadResult {
        let range = buf.window();
        self.read_into(buf, range, offset).await
    }

    /// Reads `len` bytes at `offset` into a new buffer.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::read_at`]: the read is abandoned, nothing changes.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf> {
        let (res, buf) = self.read_at(IoBuf::new(len), offset).await;
        res.map(|()| buf)
    }

    pub(crate) async fn read_into(
        &self,
        buf: IoBuf,
        range: std::ops::Range<usize>,
        offset: u64,
    ) -> crate::ReadResult {
        match self {
            Disk::Qcow2(img) => Box::pin(img.read_into(buf, range, offset)).await,
            Disk::Raw(raw) => {
                let (res, buf) = read_data(&raw.backend, buf, range, offset, Keep::none()).await;
                (
                    res.map_err(|e| Error::io(format!("{}: reading", raw.path.display()), e)),
                    buf,
                )
            }
        }
    }
}

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

    async fn open_in_chain(
        opener: &O,
        path: &Path,
        options: &ImageOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let depth = chain.len();
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if chain.contains(&canonical) {
            return Err(Error::BackingLoop { path: path.into() });
        }
        chain.push(canonical);
        let role = if depth == 0 { "image" } else { "backing file" };
        if options.force_share && !options.read_only {
            return Err(Error::InvalidOptions(
                "force-share=on can only be used with read-only images".into(),
            ));
        }
        let (file, file_len) = open_file(opener, path, options, role, FileRole::Qcow2).await?;
        let header = load::read_header(&file, path, file_len).await?;
        let format_err = |source: FormatError| Error::Format {
            path: path.into(),
            source,
        };
        header.validate_layout(file_len).map_err(format_err)?;
        let read_only = options.read_only;
        if !read_only && header.is_corrupt() {
            return Err(Error::MarkedCorrupt(path.into()));
        }
        if !read_only && header.is_dirty() {
            // Lazy refcounts were in use and the image was not closed: the refcounts on disk
            // may be stale. Rebuild them before anything can be allocated, as QEMU does; but
            // check first, read-only, and repair only what a repair can fix: an open that
            // fails leaves the file as it was (QEMU repairs whatever it can and fails after).
            drop(file);
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
            chain.pop();
            return Box::pin(Self::open_in_chain(opener, path, options, chain)).await;
        }
        let geo = header.geometry();

        let l1 = load::read_l1(&file, &header).await?;

        // External data file.
        let data_file = if header.has_data_file() {
            let name = options
                .data_file
                .clone()
                .or_else(|| header.data_file_name().map(PathBuf::from))
                .ok_or_else(|| Error::Unsupported {
                    path: path.into(),
                    what: "the image uses an external data file but names none; give one in \
                           the open options"
                        .into(),
                })?;
            let resolved = resolve_data_file(path, &name);
            let backend = opener
                .open(&resolved, io_options(options, FileRole::DataFile))
                .await
                .map_err(|source| open_error("data file", &resolved, source))?;
            Some(DataFile::new(backend, resolved))
        } else {
            None
        };

        // Backing file.
        let backing_spec = match &options.backing {
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
        let backing = match backing_spec {
            None => None,
            Some((bpath, fmt)) => {
                if depth + 1 > options.max_backing_depth {
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
                let disk =
                    Self::open_disk(opener, &bpath, fmt, &bopts, chain, "backing file").await?;
                Some(Box::new(disk))
            }
        };

        let l2_tables = (options.l2_cache_bytes / geo.cluster_size()).max(1) as usize;
        let metadata = if read_only {
            MetadataClusters::default()
        } else {
            load::metadata_clusters(&file, &header, &l1).await?
        };
        let alloc = if read_only {
            None
        } else {
            Some(load::load_allocator(&file, &header, path, file_len).await?)
        };
        if let Some(alloc) = &alloc {
            let data_file = data_file.is_some();
            crate::meta::verify::references(
                &file, path, &geo, &header, &l1, data_file, &metadata, alloc,
            )
            .await?;
        }
        let img = Image {
            files: Files::new(path, file, file_len, data_file),
            aligned: Aligned::default(),
            geo,
            read_only,
            backing,
            meta: async_lock::Mutex::new(Meta {
                l1,
                l1_dirty: Default::default(),
                l2: TableCache::new(l2_tables),
                header: header.clone(),
                alloc,
                gates: qcow2_alloc::Gates::new(),
                barrier_owed: false,
                first_write_done: false,
                metadata,
            }),
            leases: LeaseTable::new(),
            metadata_prealloc: async_lock::OnceCell::new(),
            marked_corrupt: std::sync::atomic::AtomicBool::new(false),
            io: Default::default(),
            meta_io: Default::default(),
            acked: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            bitmaps: async_lock::Mutex::new(None),
            lazy_refcounts: !read_only
                && header.version >= 3
                && options.lazy_refcounts.unwrap_or(header.lazy_refcounts()),
            header,
        };
        if !read_only {
            // Once the overlap guard's map is complete: the bitmaps are checked against it.
            let bitmaps = img.load_bitmaps().await?;
            *img.bitmaps.lock().await = bitmaps;
        }
        Ok(img)
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
                let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
                if chain.contains(&canonical) {
                    return Err(Error::BackingLoop { path: path.into() });
                }
                let (backend, len) = open_file(opener, path, options, role, FileRole::Raw).await?;
                // Like QEMU, a raw image's size is its length rounded up to whole sectors (the
                // tail reads as zeros).
                let size = len.div_ceil(512) * 512;
                Ok(Disk::Raw(RawImage {
                    flushes: FlushState::new(&backend),
                    backend,
                    path: path.into(),
                    size,
                }))
            }
        }
    }

    /// The path the image was opened with.
    pub fn path(&self) -> &Path {
        self.files.path()
    }

    /// The virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// The cluster geometry.
    pub fn geometry(&self) -> ClusterGeometry {
        self.geo
    }

    /// The header as read at open.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether the image was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&Disk<O>> {
        self.backing.as_deref()
    }

    /// The external data file's path, if the image has one.
    pub fn data_file_path(&self) -> Option<&Path> {
        self.files.data().map(|d| d.path.as_path())
    }

    /// The image file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.files.len()
    }

    /// The image file's backend.
    pub fn file(&self) -> &O::Backend {
        self.files.image()
    }

    /// (hits, misses) of the L2 table cache so far.
    ///
    /// # Cancel safety
    ///
    /// Only waits for the metadata lock: dropping it changes nothing.
    pub async fn l2_cache_stats(&self) -> (u64, u64) {
        self.meta.lock().await.l2.stats()
    }

    /// The metadata store of this image (see [`Store`]).
    pub(crate) fn store(&self) -> Store<'_, O::Backend> {
        Store {
            files: &self.files,
            aligned: &self.aligned,
            meta_io: &self.meta_io,
            leases: &self.leases,
            geo: self.geo,
            lazy_refcounts: self.lazy_refcounts,
        }
    }

    /// The mapping layer of this image (see [`Mapper`]).
    pub(crate) fn mapper(&self) -> Mapper<'_, O::Backend> {
        Mapper {
            store: self.store(),
            version: self.header.version,
            backing: self.backing.is_some(),
        }
    }

    /// The status of `[offset, offset+len)` in this image alone (not its backing chain),
    /// as maximal runs of one kind with contiguous host offsets.
    ///
    /// # Cancel safety
    ///
    /// Reads metadata only: dropping the future changes nothing.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<crate::Extent>> {
        let len = len.min(self.size().saturating_sub(offset));
        let mut meta = self.meta.lock().await;
        self.mapper().block_status(&mut meta, offset, len).await
    }

    /// The lease table (for diagnostics and tests: which clusters have I/O in flight).
    pub fn leases(&self) -> &LeaseTable {
        &self.leases
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
pub(crate) fn resolve_backing(image: &Path, name: &str) -> PathBuf {
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

impl<O: Opener> Image<O> {
    /// The internal snapshots, read from the snapshot table.
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    pub async fn snapshots(&self) -> Result<Vec<qcow2_format::Snapshot>> {
        load::read_snapshot_table(self.files.image(), &self.header, self.file_len())
            .await?
            .map_err(|source| Error::Format {
                path: self.path().to_path_buf(),
                source,
            })
    }

    /// The persistent dirty bitmaps' directory entries (empty without the bitmaps extension).
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    pub async fn bitmaps(&self) -> Result<Vec<qcow2_format::BitmapDirectoryEntry>> {
        let Some(ext) = self.header.bitmaps() else {
            return Ok(Vec::new());
        };
        let end = ext.directory_offset.checked_add(ext.directory_size);
        if end.is_none_or(|e| e > self.file_len()) || ext.directory_size > 1024 * 65535 {
            return Err(Error::Format {
                path: self.path().to_path_buf(),
                source: FormatError::PastEnd {
                    what: "bitmap directory",
                    offset: ext.directory_offset,
                    len: ext.directory_size,
                    file_len: self.file_len(),
                },
            });
        }
        let buf = read_bytes(
            self.files.image(),
            ext.directory_offset,
            ext.directory_size,
            "bitmap directory",
        )
        .await?;
        qcow2_format::BitmapDirectoryEntry::parse_directory(&buf, ext.nb_bitmaps).map_err(
            |source| Error::Format {
                path: self.path().to_path_buf(),
                source,
            },
        )
    }
}

impl<O: Opener> Image<O> {
    /// Whether more clusters are in use than the file has blocks allocated: the sign of
    /// preallocated metadata, whose data clusters are holes in the file. QEMU decides the same
    /// way (and then asks the file whether a data cluster is a hole).
    pub(crate) async fn metadata_preallocated(&self) -> Result<bool> {
        self.metadata_prealloc
            .get_or_try_init(|| self.detect_metadata_preallocation())
            .await
            .copied()
    }

    async fn detect_metadata_preallocation(&self) -> Result<bool> {
        let cs = self.cluster_size();
        let allocated = self
            .files
            .image()
            .allocated_size()
            .await
            .map_err(|e| Error::io(format!("{}: allocated size", self.path().display()), e))?;
        let real_clusters = allocated / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = self.file_len().div_ceil(cs);
        let used = self.refcounts_until(end_cluster, threshold).await?;
        Ok(used >= threshold)
    }

    /// Counts clusters below `end` with a non-zero refcount, stopping at `limit`. A writable
    /// image counts in the allocator's refcounts (the table moves when it fills up, and its
    /// old clusters are reused: the header read at open may name a cluster of guest data by
    /// then); a read-only image's table stays where its header says.
    async fn refcounts_until(&self, end: u64, limit: u64) -> Result<u64> {
        {
            let meta = self.meta.lock().await;
            if let Some(alloc) = &meta.alloc {
                let mut used = 0;
                for c in 0..end {
                    if used >= limit {
                        break;
                    }
                    if alloc.get(qcow2_format::HostCluster(c)).unwrap_or(0) > 0 {
                        used += 1;
                    }
                }
                return Ok(used);
            }
        }
        let (table_offset, table_clusters) = (
            self.header.refcount_table_offset,
            self.header.refcount_table_clusters,
        );
        let h = &self.header;
        let cs = self.cluster_size();
        let table_len = u64::from(table_clusters) * cs;
        let raw = read_bytes(
            self.files.image(),
            table_offset,
            table_len,
            "refcount table",
        )
        .await?;
        let table = raw
            .chunks_exact(8)
            .map(|c| qcow2_format::ReftableEntry(u64::from_be_bytes(c.try_into().expect("8"))))
            .collect();
        let mut rc = qcow2_alloc::Refcounts::new(self.geo, h.refcount_width(), table);
        let per_block = rc.entries_per_block();
        let mut used = 0;
        let mut cluster = 0;
        while cluster < end && used < limit {
            let slot = rc.slot(qcow2_format::HostCluster(cluster));
            let block = rc
                .block_offset(slot.table_index)
                .map_err(|e| Error::Corrupt {
                    path: self.path().to_path_buf(),
                    what: format!("refcount table: {e}"),
                })?;
            let block_end = ((slot.table_index + 1) * per_block).min(end);
            let Some(block) = block else {
                cluster = block_end;
                continue;
            };
            if !rc.has_block(slot.table_index) {
                let bytes = read_bytes(self.files.image(), block.0, cs, "refcount block").await?;
                rc.insert_block(slot.table_index, bytes.to_vec());
            }
            while cluster < block_end && used < limit {
                let n = rc
                    .get(qcow2_format::HostCluster(cluster))
                    .map_err(|e| Error::Corrupt {
                        path: self.path().to_path_buf(),
                        what: format!("refcount: {e}"),
                    })?;
                if n > 0 {
                    used += 1;
                }
                cluster += 1;
            }
        }
        Ok(used)
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
