//! Creating images: [`CreateOptions`] and [`create`] (`qemu-img create -f qcow2`), and
//! [`create_raw`] (`qemu-img create -f raw`).
//!
//! # The layout is QEMU's, to the byte
//!
//! QEMU does not compute a layout when it creates a qcow2 image: it writes a header, a one
//! cluster refcount table and an empty refcount block (clusters 0, 1 and 2), opens the result
//! as an image and *grows* it to the requested size with its normal allocator (the L1 table,
//! then, with preallocation, L2 tables and data clusters), which allocates refcount blocks and
//! grows the refcount table on the way as it needs them. Where everything lands therefore
//! depends on the allocator's exact behaviour: the free-cluster cursor, refcount blocks that
//! describe themselves, the retry after a new refcount block appears, the refcount table
//! growing 1.5 times at once (or exactly, for `falloc`/`full`), the old refcount table being
//! freed (and its stale bytes staying in the file) and then reused.
//!
//! Instead of guessing a closed formula, this module replays that sequence on an in-memory
//! model of QEMU 10's allocator (`Sim`: a port of `qcow2_co_create`, `qcow2_co_truncate`,
//! `preallocate_co`, `qcow2_alloc_host_offset`, `qcow2_alloc_clusters[_at]`,
//! `update_refcount`, `alloc_refcount_block` and `qcow2_refcount_area`, with refcounts kept as
//! a set of allocated cluster ranges), and then writes the final state. The result is
//! byte-identical to `qemu-img create`'s file, including file length, for every option
//! combination the tests compare (see `crates/cli/tests/create_cli.rs`).
//!
//! # Crash safety
//!
//! The file is created empty, every structure except cluster 0 is written (stale bytes,
//! refcount blocks, refcount table, L2 tables, L1 table), the data area is preallocated, the
//! data file is sized, everything is flushed, and only then is the header written (and
//! flushed). An interrupted create leaves a file without the qcow2 magic, never an image that
//! `qemu-img check` would call corrupt.
//!
//! # Differences from qemu-img
//!
//! - The options are validated before any file is touched; qemu-img creates (truncates) the
//!   file first and deletes it when the options turn out to be invalid.
//! - A size that is not a multiple of 512 is refused here, as QEMU's `blockdev-create` does;
//!   `qemu-img create` rounds it up silently (`qimg create` does that before calling in).
//! - Encryption is not supported.

use crate::image::{resolve_backing, Disk};
use crate::options::{ImageFormat, ImageOptions};
use crate::{Error, Image, Result};
use blockio::{Backend, IoBuf, Keep, LockRequest, OpenOptions, Opener, Perms};
use qcow2_format::{
    features, CompressionType, FormatError, Header, HeaderExtension, L1Entry, L2Entry,
    RefcountWidth, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS,
};
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The compatibility level (`compat=` in qemu-img, `version` in QMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// `compat=0.10`: a version 2 image (72-byte header, 16-bit refcounts, no feature bits).
    V2,
    /// `compat=1.1`: a version 3 image (the default).
    #[default]
    V3,
}

impl Compat {
    /// Parses qemu-img's spellings: `0.10` or `v2`, `1.1` or `v3`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "0.10" | "v2" => Some(Compat::V2),
            "1.1" | "v3" => Some(Compat::V3),
            _ => None,
        }
    }

    /// The header version number (2 or 3).
    pub fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
}

/// How much of the image to allocate up front (`preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing: a sparse image with just the L1 table (the default).
    #[default]
    Off,
    /// Every L2 table and data cluster is allocated (refcounts and COPIED L2 entries), and the
    /// file is extended to cover the data clusters, sparsely.
    Metadata,
    /// As `Metadata`, with the data area reserved on disk (`fallocate`).
    Falloc,
    /// As `Metadata`, with zeros written over the data area.
    Full,
}

impl Preallocation {
    /// Parses QEMU's names: `off`, `metadata`, `falloc`, `full`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "off" => Some(Preallocation::Off),
            "metadata" => Some(Preallocation::Metadata),
            "falloc" => Some(Preallocation::Falloc),
            "full" => Some(Preallocation::Full),
            _ => None,
        }
    }

    /// QEMU's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// A feature that a version 2 (`compat=0.10`) image cannot have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V3Feature {
    /// A refcount width other than 16 bits.
    RefcountBits,
    /// Lazy refcounts.
    LazyRefcounts,
    /// Extended L2 entries.
    ExtendedL2,
    /// A compression type other than zlib.
    CompressionType,
    /// An external data file.
    DataFile,
}

/// Why an image cannot be created with the given options. The messages are qemu-img's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// No size was given and there is no backing file to take it from.
    #[error("Image creation needs a size parameter")]
    MissingSize,
    /// The size is not a multiple of 512 bytes.
    #[error("Image size must be a multiple of 512 bytes")]
    SizeNotAligned(u64),
    /// The cluster size is not a power of two between 512 and 2 MiB.
    #[error("Cluster size must be a power of two between 512 and 2048k")]
    ClusterSize(u64),
    /// Extended L2 entries with clusters smaller than 16 KiB.
    #[error("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")]
    ExtendedL2ClusterSize(u64),
    /// The refcount width is not a power of two of at most 64 bits.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountBits(u64),
    /// A feature that needs compat=1.1 with compat=0.10.
    #[error("{}", v3_message(*.0))]
    NeedsV3(V3Feature),
    /// `data_file_raw` without `data_file`.
    #[error("data-file-raw requires data-file")]
    DataFileRawWithoutDataFile,
    /// A backing file together with `data_file_raw`.
    #[error("Backing file and data-file-raw cannot be used at the same time")]
    BackingWithDataFileRaw,
    /// A backing file together with preallocation, without extended L2 entries.
    #[error(
        "Backing file and preallocation can only be used at the same time if extended_l2 is on"
    )]
    BackingWithPreallocation,
    /// The backing file name is the image's own name.
    #[error("Error: Trying to create an image with the same filename as the backing file")]
    BackingIsImage,
    /// An empty backing file name.
    #[error("Expected backing file name, got empty string")]
    EmptyBackingName,
    /// The backing file could not be opened (to check it and take its size).
    #[error("{message}")]
    OpenBacking {
        /// The backing file as resolved against the image's directory.
        path: PathBuf,
        /// What went wrong, as qemu-img says it (`Could not open 'PATH': REASON`, or the
        /// format's complaint, e.g. `Image is not in qcow2 format`).
        message: String,
    },
    /// The backing file name is longer than 1023 bytes.
    #[error("Could not assign backing file '{name}' with format '{format}': Invalid argument")]
    BackingNameTooLong {
        /// The name.
        name: String,
        /// The backing format.
        format: &'static str,
    },
    /// The backing file name does not fit in cluster 0 after the header extensions.
    #[error(
        "Could not assign backing file '{name}' with format '{format}': No space left on device"
    )]
    BackingNameNoSpace {
        /// The name.
        name: String,
        /// The backing format.
        format: &'static str,
    },
    /// The header extensions (a long data file name) do not fit in cluster 0.
    #[error("Could not update qcow2 header: No space left on device")]
    HeaderNoSpace,
    /// The L1 or refcount table this size needs exceeds QEMU's limits.
    #[error(
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    )]
    TooLarge,
    /// A preallocation mode the format does not have (`metadata` for raw images).
    #[error("Unsupported preallocation mode: {}", .0.name())]
    UnsupportedPreallocation(Preallocation),
    /// The model of QEMU's allocator reached a state QEMU asserts against (a bug here).
    #[error("internal error while planning the image layout: {0}")]
    Internal(&'static str),
}

fn v3_message(f: V3Feature) -> &'static str {
    match f {
        V3Feature::RefcountBits => {
            "Different refcount widths than 16 bits require compatibility level 1.1 or above \
             (use version=v3 or greater)"
        }
        V3Feature::LazyRefcounts => {
            "Lazy refcounts only supported with compatibility level 1.1 and above \
             (use version=v3 or greater)"
        }
        V3Feature::ExtendedL2 => {
            "Extended L2 entries are only supported with compatibility level 1.1 and above \
             (use version=v3 or greater)"
        }
        V3Feature::CompressionType => {
            "Non-zlib compression type is only supported with compatibility level 1.1 and \
             above (use version=v3 or greater)"
        }
        V3Feature::DataFile => {
            "External data files are only supported with compatibility level 1.1 and above \
             (use version=v3 or greater)"
        }
    }
}

impl From<CreateError> for Error {
    fn from(e: CreateError) -> Self {
        Error::Create(e)
    }
}

/// Options for [`create`]: the qcow2 options of `qemu-img create`, as a builder.
///
/// Defaults are qemu-img's: 64 KiB clusters, 16-bit refcounts, compat 1.1, zlib, no
/// preallocation, no backing or data file.
///
/// ```
/// use qcow2_engine::{CreateOptions, Preallocation};
/// let opts = CreateOptions::new()
///     .size(1 << 30)
///     .cluster_size(4096)
///     .refcount_bits(8)
///     .preallocation(Preallocation::Metadata);
/// assert!(opts.validate().is_ok());
/// assert!(CreateOptions::new().size(1 << 20).cluster_size(1000).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    size: Option<u64>,
    cluster_size: u64,
    refcount_bits: u64,
    compat: Compat,
    extended_l2: bool,
    backing: Option<(String, ImageFormat)>,
    check_backing: bool,
    lazy_refcounts: bool,
    compression_type: CompressionType,
    data_file: Option<String>,
    data_file_raw: bool,
    preallocation: Preallocation,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            size: None,
            cluster_size: 64 << 10,
            refcount_bits: 16,
            compat: Compat::V3,
            extended_l2: false,
            backing: None,
            check_backing: true,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
        }
    }
}

impl CreateOptions {
    /// qemu-img's defaults, without a size (set one, or a backing file to take it from).
    pub fn new() -> Self {
        Self::default()
    }

    /// The virtual disk size in bytes (a multiple of 512). Without it, the backing file's
    /// size is used, as qemu-img does.
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }

    /// The cluster size in bytes: a power of two from 512 to 2 MiB (default 64 KiB).
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    /// The refcount width in bits: 1, 2, 4, 8, 16 (default), 32 or 64; compat 1.1 only for
    /// anything but 16.
    pub fn refcount_bits(mut self, bits: u64) -> Self {
        self.refcount_bits = bits;
        self
    }

    /// The compatibility level (default [`Compat::V3`]).
    pub fn compat(mut self, compat: Compat) -> Self {
        self.compat = compat;
        self
    }

    /// Extended L2 entries (32 subclusters per cluster; clusters of at least 16 KiB).
    pub fn extended_l2(mut self, yes: bool) -> Self {
        self.extended_l2 = yes;
        self
    }

    /// A backing file, stored in the header as given (relative names are relative to the
    /// new image's directory when the image is opened), and its format (stored in the
    /// backing format extension; qemu-img requires it, and so does this API).
    pub fn backing_file(mut self, name: impl Into<String>, format: ImageFormat) -> Self {
        self.backing = Some((name.into(), format));
        self
    }

    /// Whether [`create`] opens the backing file to check that it exists and is readable as
    /// its format (default true). `false` is qemu-img's `-u`; then a size must be given.
    pub fn check_backing(mut self, yes: bool) -> Self {
        self.check_backing = yes;
        self
    }

    /// Sets the lazy refcounts compatible bit (compat 1.1 only).
    pub fn lazy_refcounts(mut self, yes: bool) -> Self {
        self.lazy_refcounts = yes;
        self
    }

    /// The compression type of compressed clusters (zstd needs compat 1.1).
    pub fn compression_type(mut self, ty: CompressionType) -> Self {
        self.compression_type = ty;
        self
    }

    /// An external data file: guest data lives there (at guest offsets) instead of in the
    /// image. The file is created (truncated) at this path, relative to the current
    /// directory, and the name is stored in the header as given.
    pub fn data_file(mut self, name: impl Into<String>) -> Self {
        self.data_file = Some(name.into());
        self
    }

    /// Marks the data file as a valid raw image of the disk (autoclear bit 1); implies at
    /// least metadata preallocation, as QEMU does.
    pub fn data_file_raw(mut self, yes: bool) -> Self {
        self.data_file_raw = yes;
        self
    }

    /// The preallocation mode (default [`Preallocation::Off`]).
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }

    /// The size, if one was given.
    pub fn get_size(&self) -> Option<u64> {
        self.size
    }

    /// The backing file name and format, if any.
    pub fn get_backing(&self) -> Option<(&str, ImageFormat)> {
        self.backing.as_ref().map(|(n, f)| (n.as_str(), *f))
    }

    /// Checks the options against each other, in the order QEMU does (so the first problem
    /// reported is the one qemu-img reports). A missing size is not checked here.
    pub fn validate(&self) -> Result<(), CreateError> {
        if let Some(size) = self.size {
            if size % 512 != 0 {
                return Err(CreateError::SizeNotAligned(size));
            }
        }
        let v2 = self.compat == Compat::V2;
        if self.extended_l2 && v2 {
            return Err(CreateError::NeedsV3(V3Feature::ExtendedL2));
        }
        let cs = self.cluster_size;
        let bits = cs.trailing_zeros();
        if !cs.is_power_of_two() || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(CreateError::ClusterSize(cs));
        }
        if self.extended_l2 && cs < 512 * 32 {
            return Err(CreateError::ExtendedL2ClusterSize(cs));
        }
        if self.backing.is_some() && self.preallocation != Preallocation::Off && !self.extended_l2 {
            return Err(CreateError::BackingWithPreallocation);
        }
        if self.lazy_refcounts && v2 {
            return Err(CreateError::NeedsV3(V3Feature::LazyRefcounts));
        }
        if self.refcount_bits > 64 || !self.refcount_bits.is_power_of_two() {
            return Err(CreateError::RefcountBits(self.refcount_bits));
        }
        if v2 && self.refcount_bits != 16 {
            return Err(CreateError::NeedsV3(V3Feature::RefcountBits));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(CreateError::DataFileRawWithoutDataFile);
        }
        if self.data_file_raw && self.backing.is_some() {
            return Err(CreateError::BackingWithDataFileRaw);
        }
        if self.data_file.is_some() && v2 {
            return Err(CreateError::NeedsV3(V3Feature::DataFile));
        }
        if self.compression_type != CompressionType::Zlib && v2 {
            return Err(CreateError::NeedsV3(V3Feature::CompressionType));
        }
        Ok(())
    }

    /// The refcount width (after [`CreateOptions::validate`]).
    fn width(&self) -> Result<RefcountWidth, CreateError> {
        u32::try_from(self.refcount_bits)
            .ok()
            .and_then(|b| RefcountWidth::from_bits(b).ok())
            .ok_or(CreateError::RefcountBits(self.refcount_bits))
    }

    /// The preallocation QEMU actually uses: data_file_raw turns `off` into `metadata`.
    fn effective_preallocation(&self) -> Preallocation {
        if self.data_file_raw && self.preallocation == Preallocation::Off {
            Preallocation::Metadata
        } else {
            self.preallocation
        }
    }

    /// The header as QEMU writes it at the end of creation, for the layout `sim` ended with.
    fn header(&self, size: u64, sim: &Sim) -> Result<Header, CreateError> {
        let v3 = self.compat == Compat::V3;
        let mut extensions = Vec::new();
        if let Some((_, fmt)) = &self.backing {
            extensions.push(HeaderExtension::BackingFormat(fmt.name().to_owned()));
        }
        if let Some(df) = &self.data_file {
            extensions.push(HeaderExtension::ExternalDataFile(df.clone()));
        }
        // QEMU omits the feature name table for clusters of 4 KiB and less (it would leave
        // too little room for a backing file name).
        if v3 && self.cluster_size > 4096 {
            extensions.push(HeaderExtension::qemu_feature_table());
        }
        let mut incompatible = 0;
        if self.data_file.is_some() {
            incompatible |= features::INCOMPAT_DATA_FILE;
        }
        if self.compression_type != CompressionType::Zlib {
            incompatible |= features::INCOMPAT_COMPRESSION;
        }
        if self.extended_l2 {
            incompatible |= features::INCOMPAT_EXTENDED_L2;
        }
        let mut header = Header {
            version: self.compat.version(),
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: sim.bits,
            size,
            crypt_method: 0,
            l1_size: sim.l1.len() as u32,
            l1_table_offset: sim.l1_offset,
            refcount_table_offset: sim.reftable_offset,
            refcount_table_clusters: (sim.reftable.len() as u64 * 8 / sim.cs) as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if self.lazy_refcounts {
                features::COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: if self.data_file_raw {
                features::AUTOCLEAR_DATA_FILE_RAW
            } else {
                0
            },
            refcount_order: self.refcount_bits.trailing_zeros(),
            header_length: if v3 {
                Header::QEMU_V3_LENGTH
            } else {
                Header::V2_LENGTH
            },
            compression_type: self.compression_type,
            unknown_additional: Vec::new(),
            extensions,
            backing_file: self.backing.as_ref().map(|(n, _)| n.clone()),
        };
        header.fix_backing_location();
        Ok(header)
    }

    /// Checks that the header (extensions and backing name) fits in cluster 0, with QEMU's
    /// errors. Uses a dummy layout: only names and extensions decide whether it fits.
    fn check_header_space(&self) -> Result<(), CreateError> {
        let cs = self.cluster_size;
        let sim = Sim::new(cs.trailing_zeros(), self.width()?, false, false);
        let mut header = self.header(0, &sim)?;
        // QEMU writes the header without the backing file first, then adds it.
        let backing = header.backing_file.take();
        header.fix_backing_location();
        // Anything that does not serialize here is a name too long for cluster 0.
        if header.serialize().is_err() {
            return Err(CreateError::HeaderNoSpace);
        }
        if let (Some(name), Some((_, fmt))) = (backing, &self.backing) {
            if name.len() > 1023 {
                return Err(CreateError::BackingNameTooLong {
                    name,
                    format: fmt.name(),
                });
            }
            header.backing_file = Some(name.clone());
            header.fix_backing_location();
            if header.serialize().is_err() {
                return Err(CreateError::BackingNameNoSpace {
                    name,
                    format: fmt.name(),
                });
            }
        }
        Ok(())
    }
}

impl<O: Opener> Image<O> {
    /// Creates a qcow2 image at `path`: see [`create`].
    ///
    /// # Cancel safety
    ///
    /// As [`create`].
    pub async fn create(opener: &O, path: impl AsRef<Path>, options: &CreateOptions) -> Result<()> {
        create(opener, path, options).await
    }
}

/// Creates a qcow2 image at `path` (replacing any file there) with the layout `qemu-img
/// create` gives it, byte for byte, and flushes it. Returns nothing: open the image with
/// [`Image::open`] afterwards.
///
/// Steps, in qemu-img's order: backing file checks (an empty name, the image's own name, then
/// opening it through `opener`, relative to the image's directory, to take its size when none
/// was given), the size, [`CreateOptions::validate`], the header's space; only then are files
/// created. The external data file, if any, is created at its path as given.
///
/// Errors: [`Error::Create`] for invalid options, [`Error::Io`] for failed writes.
///
/// # Cancel safety
///
/// Dropping the future leaves a partly written file at `path` (as an interrupted
/// `qemu-img create` does): not an image to use. Create it again.
pub async fn create<O: Opener>(
    opener: &O,
    path: impl AsRef<Path>,
    options: &CreateOptions,
) -> Result<()> {
    let path = path.as_ref();
    let mut size = options.size;
    if let Some((name, fmt)) = &options.backing {
        if path.as_os_str() == std::ffi::OsStr::new(name) {
            return Err(CreateError::BackingIsImage.into());
        }
        if name.is_empty() {
            return Err(CreateError::EmptyBackingName.into());
        }
        if options.check_backing {
            let (backing_size, _) = probe_backing(opener, path, name, Some(*fmt)).await?;
            size.get_or_insert(backing_size);
        }
    }
    let size = size.ok_or(CreateError::MissingSize)?;
    let options = CreateOptions {
        size: Some(size),
        ..options.clone()
    };
    options.validate()?;
    options.check_header_space()?;
    let plan = plan(&options, size)?;
    write_plan(opener, path, &options, &plan).await
}

/// Opens the backing file `name` of an image to be created at `image` (relative names are
/// relative to the image's directory) read-only with its own backing chain, as `format` or,
/// when `None`, as whatever format it probes as. Returns its virtual size rounded up to 512
/// bytes (what qemu-img takes as the new image's size when none is given) and its format.
///
/// # Cancel safety
///
/// Reads only: dropping the future changes nothing.
pub async fn probe_backing<O: Opener>(
    opener: &O,
    image: &Path,
    name: &str,
    format: Option<ImageFormat>,
) -> Result<(u64, ImageFormat)> {
    let resolved = resolve_backing(image, name);
    let disk = Disk::open(
        opener.clone(),
        &resolved,
        format,
        ImageOptions::new().read_only(true),
    )
    .await
    .map_err(|e| CreateError::OpenBacking {
        message: match &e {
            Error::OpenFile { source, path, .. } => {
                format!("Could not open '{}': {}", path.display(), strerror(source))
            }
            Error::Format {
                source: FormatError::BadMagic(_),
                ..
            } => "Image is not in qcow2 format".to_owned(),
            other => other.to_string(),
        },
        path: resolved.clone(),
    })?;
    Ok((disk.size().div_ceil(512) * 512, disk.format()))
}

/// An I/O error as C's `strerror` words it (without Rust's " (os error N)").
fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// Creates a raw image of `size` bytes (rounded up to 512, as qemu-img does) at `path`,
/// replacing any file there: sparse (`Off`), allocated (`Falloc`) or written with zeros
/// (`Full`). `Metadata` is refused, as QEMU refuses it for raw files.
///
/// # Cancel safety
///
/// As [`create`]: a dropped creation leaves a partly written file.
pub async fn create_raw<O: Opener>(
    opener: &O,
    path: impl AsRef<Path>,
    size: u64,
    preallocation: Preallocation,
) -> Result<()> {
    let path = path.as_ref();
    if preallocation == Preallocation::Metadata {
        return Err(CreateError::UnsupportedPreallocation(preallocation).into());
    }
    let size = size.div_ceil(512) * 512;
    let file = open_new(opener, path, "image").await?;
    let ctx = || format!("could not create {}", path.display());
    fill(&file, 0, size, preallocation)
        .await
        .map_err(|e| Error::io(ctx(), e))?;
    file.set_len(size).await.map_err(|e| Error::io(ctx(), e))?;
    file.flush().await.map_err(|e| Error::io(ctx(), e))?;
    Ok(())
}

async fn open_new<O: Opener>(opener: &O, path: &Path, role: &'static str) -> Result<O::Backend> {
    // QEMU's file driver creates under these locks, taken before the file is truncated: a
    // file another process uses (for reading or writing) is left alone.
    let lock = LockRequest::new(
        Perms::WRITE | Perms::RESIZE,
        Perms::ALL.without(Perms::RESIZE),
    );
    opener
        .open(
            path,
            OpenOptions {
                write: true,
                create: true,
                truncate: true,
                direct: false,
                lock: Some(lock),
            },
        )
        .await
        .map_err(|source| crate::image::open_error(role, path, source))
}

/// Allocates `[start, end)` as the preallocation mode asks: nothing for `Off`/`Metadata`
/// (the caller sets the length), zero-range allocation for `Falloc`, zero bytes for `Full`.
async fn fill<B: Backend>(file: &B, start: u64, end: u64, mode: Preallocation) -> io::Result<()> {
    if end <= start {
        return Ok(());
    }
    match mode {
        Preallocation::Off | Preallocation::Metadata => Ok(()),
        Preallocation::Falloc => file.write_zeroes(start, end - start, Keep::none()).await,
        Preallocation::Full => {
            const CHUNK: u64 = 1 << 20;
            let mut buf = IoBuf::new(CHUNK.min(end - start) as usize);
            let mut off = start;
            while off < end {
                let n = (end - off).min(CHUNK) as usize;
                buf.set_window(0..n);
                let (r, b) = file.write_at(buf, off).await;
                buf = b;
                r?;
                off += n as u64;
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------
// The plan: QEMU's creation sequence replayed on a model of its allocator.
// ---------------------------------------------------------------------------------------

/// What to write: the allocator model's final state plus file lengths and preallocation.
struct Plan {
    sim: Sim,
    header: Header,
    /// Final length of the image file.
    file_len: u64,
    /// Area of the image file to preallocate (falloc/full without a data file).
    data_area: Option<(u64, u64)>,
    /// Area of the data file to preallocate (falloc/full with a data file).
    data_file_area: Option<(u64, u64)>,
    /// Final length of the data file (if any).
    data_file_len: u64,
    /// The preallocation mode in effect.
    mode: Preallocation,
}

fn plan(options: &CreateOptions, size: u64) -> Result<Plan, CreateError> {
    let bits = options.cluster_size.trailing_zeros();
    let has_data_file = options.data_file.is_some();
    let mut sim = Sim::new(bits, options.width()?, options.extended_l2, has_data_file);
    let mode = options.effective_preallocation();
    let map = |e: SimErr| match e {
        SimErr::TooLarge => CreateError::TooLarge,
        SimErr::Again => CreateError::Internal("unhandled retry"),
        SimErr::Bug(what) => CreateError::Internal(what),
    };
    let out = sim.create_and_truncate(size, mode).map_err(map)?;
    let header = options.header(size, &sim)?;
    Ok(Plan {
        file_len: sim.file_len,
        data_area: out.data_area,
        data_file_area: out.data_file_area,
        data_file_len: sim.data_file_len,
        mode,
        header,
        sim,
    })
}

async fn write_plan<O: Opener>(
    opener: &O,
    path: &Path,
    options: &CreateOptions,
    plan: &Plan,
) -> Result<()> {
    // The data file first: the image must never name a data file that is not there yet.
    if let Some(df) = &options.data_file {
        let df_path = Path::new(df);
        let data = open_new(opener, df_path, "data file").await?;
        let ctx = || format!("could not create data file {}", df_path.display());
        for &(in_data_file, off, len) in &plan.sim.zero_writes {
            if in_data_file {
                fill(&data, off, off + len, Preallocation::Full)
                    .await
                    .map_err(|e| Error::io(ctx(), e))?;
            }
        }
        if let Some((start, end)) = plan.data_file_area {
            fill(&data, start, end, plan.mode)
                .await
                .map_err(|e| Error::io(ctx(), e))?;
        }
        if plan.data_file_len > 0 {
            data.set_len(plan.data_file_len)
                .await
                .map_err(|e| Error::io(ctx(), e))?;
        }
        data.flush().await.map_err(|e| Error::io(ctx(), e))?;
    }

    let file = open_new(opener, path, "image").await?;
    let ctx = || format!("could not create {}", path.display());
    let sim = &plan.sim;
    let cs = sim.cs;

    // 1. Stale bytes QEMU leaves behind (old refcount tables), oldest first.
    for (off, bytes) in &sim.stale {
        write_bytes(&file, *off, bytes)
            .await
            .map_err(|e| Error::io(ctx(), e))?;
    }
    // ... and the zeros QEMU's copy-on-write puts in the tail of a last, partial data
    // cluster.
    for &(in_data_file, off, len) in &sim.zero_writes {
        if !in_data_file {
            fill(&file, off, off + len, Preallocation::Full)
                .await
                .map_err(|e| Error::io(ctx(), e))?;
        }
    }
    // 2. Live metadata, in file order: refcount blocks, refcount table, L1, L2 tables.
    let mut live: Vec<(u64, Live)> = Vec::new();
    for (i, &e) in sim.reftable.iter().enumerate() {
        if e != 0 {
            live.push((e, Live::Refblock(i as u64)));
        }
    }
    live.push((sim.reftable_offset, Live::Reftable));
    if !sim.l1.is_empty() {
        live.push((sim.l1_offset, Live::L1));
    }
    for (&l1_index, l2) in &sim.l2 {
        live.push((l2.offset, Live::L2(l1_index)));
    }
    live.sort_by_key(|&(off, _)| off);
    let mut cluster = IoBuf::new(cs as usize);
    for (off, what) in live {
        match what {
            Live::Refblock(i) => {
                cluster.set_window(0..cs as usize);
                sim.render_refblock(i, &mut cluster);
                let (r, b) = file.write_at(cluster, off).await;
                cluster = b;
                r.map_err(|e| Error::io(ctx(), e))?;
            }
            Live::L2(l1_index) => {
                cluster.set_window(0..cs as usize);
                sim.render_l2(l1_index, &mut cluster);
                let (r, b) = file.write_at(cluster, off).await;
                cluster = b;
                r.map_err(|e| Error::io(ctx(), e))?;
            }
            Live::Reftable => {
                let bytes: Vec<u8> = sim.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
                write_bytes(&file, off, &bytes)
                    .await
                    .map_err(|e| Error::io(ctx(), e))?;
            }
            Live::L1 => {
                let mut bytes = vec![0u8; sim.l1.len() * 8];
                for (i, &e) in sim.l1.iter().enumerate() {
                    L1Entry(e).write(&mut bytes, i);
                }
                write_bytes(&file, off, &bytes)
                    .await
                    .map_err(|e| Error::io(ctx(), e))?;
            }
        }
    }
    // 3. The data area, then the exact length QEMU leaves.
    if let Some((start, end)) = plan.data_area {
        fill(&file, start, end, plan.mode)
            .await
            .map_err(|e| Error::io(ctx(), e))?;
    }
    file.set_len(plan.file_len)
        .await
        .map_err(|e| Error::io(ctx(), e))?;
    file.flush().await.map_err(|e| Error::io(ctx(), e))?;

    // 4. The header, last: until it is on disk the file is not an image at all.
    let mut header = plan
        .header
        .serialize()
        .map_err(|_| CreateError::HeaderNoSpace)?;
    header.resize(cs as usize, 0);
    write_bytes(&file, 0, &header)
        .await
        .map_err(|e| Error::io(ctx(), e))?;
    file.flush().await.map_err(|e| Error::io(ctx(), e))?;
    Ok(())
}

enum Live {
    Refblock(u64),
    Reftable,
    L1,
    L2(u64),
}

async fn write_bytes<B: Backend>(file: &B, offset: u64, bytes: &[u8]) -> io::Result<()> {
    let (r, _) = file.write_at(IoBuf::from_slice(bytes), offset).await;
    r
}

// ---------------------------------------------------------------------------------------
// The allocator model.
// ---------------------------------------------------------------------------------------

/// QEMU's `INV_OFFSET`.
const INV: u64 = u64::MAX;
/// `QCOW_MAX_L1_SIZE`.
const MAX_L1_SIZE: u64 = 32 << 20;
/// `QCOW_MAX_REFTABLE_SIZE` (QEMU compares entry counts against it).
const MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// `QCOW_MAX_CLUSTER_OFFSET`.
const MAX_CLUSTER_OFFSET: u64 = (1 << 56) - 1;
/// `BDRV_REQUEST_MAX_BYTES`.
const REQUEST_MAX_BYTES: u64 = 0x7FFF_FE00;
/// `INT_MAX`.
const INT_MAX: u64 = 0x7FFF_FFFF;

/// Why a modelled QEMU operation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimErr {
    /// `-EAGAIN`: a refcount block was allocated; the caller restarts its search.
    Again,
    /// `-EFBIG`.
    TooLarge,
    /// A state QEMU would assert against (never expected).
    Bug(&'static str),
}

type SimResult<T> = std::result::Result<T, SimErr>;

/// Disjoint, merged ranges of cluster indices `[start, end)`: the clusters whose refcount
/// is 1 (during creation a refcount is only ever 0 or 1).
#[derive(Debug, Default)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn contains(&self, c: u64) -> bool {
        self.0.range(..=c).next_back().is_some_and(|(_, &e)| e > c)
    }

    /// The first used cluster in `[a, b)` and the end of its run.
    fn first_in(&self, a: u64, b: u64) -> Option<(u64, u64)> {
        if let Some((_, &e)) = self.0.range(..=a).next_back() {
            if e > a {
                return Some((a, e));
            }
        }
        self.0
            .range(a..b)
            .next()
            .map(|(&s, &e)| (s, e))
            .filter(|&(s, _)| s < b)
    }

    /// Whether every cluster of `[a, b)` is used.
    fn covers(&self, a: u64, b: u64) -> bool {
        self.0.range(..=a).next_back().is_some_and(|(_, &e)| e >= b)
    }

    fn insert(&mut self, mut a: u64, mut b: u64) {
        if a >= b {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..=a).next_back() {
            if e >= a {
                a = s;
                b = b.max(e);
                self.0.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.0.range(a..=b).next() {
            b = b.max(e);
            self.0.remove(&s);
        }
        self.0.insert(a, b);
    }

    fn remove(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..a).next_back() {
            if e > a {
                self.0.insert(s, a);
                if e > b {
                    self.0.insert(b, e);
                }
            }
        }
        let inside: Vec<(u64, u64)> = self.0.range(a..b).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.0.remove(&s);
            if e > b {
                self.0.insert(b, e);
            }
        }
    }

    /// The highest used cluster below `n`.
    fn last_below(&self, n: u64) -> Option<u64> {
        self.0.range(..n).next_back().map(|(_, &e)| e.min(n) - 1)
    }

    /// The used runs clipped to `[a, b)`.
    fn runs_in(&self, a: u64, b: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self
            .0
            .range(..a)
            .next_back()
            .filter(|(_, &e)| e > a)
            .map(|(&s, &e)| (s, e));
        first
            .into_iter()
            .chain(self.0.range(a..b).map(|(&s, &e)| (s, e)))
            .map(move |(s, e)| (s.max(a), e.min(b)))
    }
}

/// An L2 table of the model: where it is and the runs of entries that are set
/// (`index, count, host offset of the first`; every entry is `host | COPIED`, subcluster
/// bitmap 0, as QEMU's preallocation leaves them).
#[derive(Debug)]
struct L2Plan {
    offset: u64,
    runs: Vec<(u64, u64, u64)>,
}

/// One `QCowL2Meta`: `n` clusters from guest `guest` mapped to host `host` onwards; the
/// request ends `end` bytes after `guest` (QEMU copies-on-write from there to the end of the
/// subcluster, writing zeros at creation, when there is no backing file yet).
#[derive(Debug, Clone, Copy)]
struct Meta {
    guest: u64,
    host: u64,
    n: u64,
    end: u64,
}

/// The preallocated areas truncation decided on, beyond the metadata.
struct TruncateOutcome {
    data_area: Option<(u64, u64)>,
    data_file_area: Option<(u64, u64)>,
}

/// The model of QEMU's qcow2 state during creation (`BDRVQcow2State`, reduced to what
/// creation touches).
#[derive(Debug)]
struct Sim {
    bits: u32,
    cs: u64,
    width: RefcountWidth,
    /// `refcount_block_bits`.
    rb_bits: u32,
    /// Entries per L2 table.
    l2_entries: u64,
    l2_bits: u32,
    extended_l2: bool,
    has_data_file: bool,
    reftable: Vec<u64>,
    reftable_offset: u64,
    max_reftable_index: u64,
    used: Ranges,
    free_cluster_index: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    l2: BTreeMap<u64, L2Plan>,
    /// Length of the image file as QEMU's writes and truncations leave it.
    file_len: u64,
    /// Superseded structures still in the file (old refcount tables), oldest first.
    stale: Vec<(u64, Vec<u8>)>,
    /// Length of the external data file.
    data_file_len: u64,
    /// Zeros written by copy-on-write: (in the data file?, offset, length).
    zero_writes: Vec<(bool, u64, u64)>,
}

impl Sim {
    /// The state right after `qcow2_co_create` wrote its minimal image (header, one-cluster
    /// refcount table pointing at an empty refcount block in cluster 2) and reopened it.
    fn new(bits: u32, width: RefcountWidth, extended_l2: bool, has_data_file: bool) -> Sim {
        let cs = 1u64 << bits;
        let l2_bits = bits - if extended_l2 { 4 } else { 3 };
        let mut reftable = vec![0u64; (cs / 8) as usize];
        reftable[0] = 2 * cs;
        Sim {
            bits,
            cs,
            width,
            rb_bits: bits + 3 - width.order(),
            l2_entries: 1 << l2_bits,
            l2_bits,
            extended_l2,
            has_data_file,
            reftable,
            reftable_offset: cs,
            max_reftable_index: 0,
            used: Ranges::default(),
            free_cluster_index: 0,
            l1: Vec::new(),
            l1_offset: 0,
            l2: BTreeMap::new(),
            file_len: 3 * cs,
            stale: Vec::new(),
            data_file_len: 0,
            zero_writes: Vec::new(),
        }
    }

    fn rb_size(&self) -> u64 {
        1 << self.rb_bits
    }

    fn written(&mut self, offset: u64, len: u64) {
        self.file_len = self.file_len.max(offset + len);
    }

    /// `qcow2_co_create` from the reopen on, and `qcow2_co_truncate(size, prealloc)`.
    fn create_and_truncate(
        &mut self,
        size: u64,
        mode: Preallocation,
    ) -> SimResult<TruncateOutcome> {
        // qcow2_alloc_clusters(3 clusters): header, refcount table, refcount block.
        let off = self.alloc_clusters(3 * self.cs)?;
        if off != 0 {
            return Err(SimErr::Bug("first cluster already in use"));
        }
        let l1_size = size.div_ceil(1u64 << (self.bits + self.l2_bits));
        self.grow_l1(l1_size)?;
        let mut out = TruncateOutcome {
            data_area: None,
            data_file_area: None,
        };
        match mode {
            Preallocation::Off => {
                if self.has_data_file {
                    self.data_file_len = size;
                }
            }
            Preallocation::Metadata => self.preallocate(size, mode, &mut out)?,
            Preallocation::Falloc | Preallocation::Full if self.has_data_file => {
                self.preallocate(size, mode, &mut out)?
            }
            Preallocation::Falloc | Preallocation::Full => {
                let file_size = self.file_len;
                let last = self
                    .used
                    .last_below(file_size.div_ceil(self.cs))
                    .ok_or(SimErr::Bug("no references in the refcount table"))?;
                let old_file_size = (last + 1) * self.cs;
                let nb_data = size.div_ceil(self.cs);
                let nb_l2 = nb_data.div_ceil(self.l2_entries) + 1;
                let start = self.refcount_area(old_file_size, nb_data + nb_l2, true, 0, 0)?;
                let got = self.alloc_clusters_at(start, nb_data)?;
                if got != nb_data {
                    return Err(SimErr::Bug("data clusters not allocated"));
                }
                let end = start + nb_data * self.cs;
                self.file_len = self.file_len.max(end);
                out.data_area = Some((start, end));
                let (mut guest, mut host, mut left) = (0u64, start, nb_data);
                while left > 0 {
                    let index = (guest >> self.bits) & (self.l2_entries - 1);
                    let n = left.min(self.l2_entries - index);
                    self.link_l2(Meta {
                        guest,
                        host,
                        n,
                        end: n * self.cs,
                    })?;
                    guest += n * self.cs;
                    host += n * self.cs;
                    left -= n;
                }
            }
        }
        Ok(out)
    }

    /// `preallocate_co(0, size)`: allocate L2 tables and data clusters in guest order, then
    /// extend the file holding the data (with `mode`'s preallocation) to cover them.
    fn preallocate(
        &mut self,
        size: u64,
        mode: Preallocation,
        out: &mut TruncateOutcome,
    ) -> SimResult<()> {
        let chunk = INT_MAX & !(self.cs - 1);
        let (mut offset, mut bytes) = (0u64, size);
        let (mut host, mut cur) = (0u64, 0u64);
        while bytes > 0 {
            cur = bytes.min(chunk);
            let (h, done, metas) = self.alloc_host_offset(offset, cur)?;
            host = h;
            cur = done;
            for m in metas {
                self.link_l2(m)?;
            }
            bytes -= cur;
            offset += cur;
        }
        if size == 0 {
            return Ok(());
        }
        let end = host + cur;
        if self.has_data_file {
            if end > self.data_file_len {
                if mode != Preallocation::Metadata {
                    out.data_file_area = Some((self.data_file_len, end));
                }
                self.data_file_len = end;
            }
        } else if end > self.file_len {
            self.file_len = end;
        }
        Ok(())
    }

    /// `qcow2_alloc_host_offset`: returns the host offset, the bytes covered, and the L2
    /// updates to make.
    fn alloc_host_offset(&mut self, offset: u64, bytes: u64) -> SimResult<(u64, u64, Vec<Meta>)> {
        let (mut start, mut remaining) = (offset, bytes);
        let mut cluster_offset = INV;
        let mut host = INV;
        let mut cur = 0u64;
        let mut metas = Vec::new();
        loop {
            if host == INV && cluster_offset != INV {
                host = cluster_offset;
            }
            start += cur;
            remaining -= cur;
            if cluster_offset != INV {
                cluster_offset += cur;
            }
            if remaining == 0 {
                break;
            }
            cur = remaining;
            // handle_copied: loads (allocating) the L2 table; nothing is allocated yet.
            self.get_cluster_table(start)?;
            // handle_alloc
            if !self.handle_alloc(start, &mut cluster_offset, &mut cur, &mut metas)? {
                break;
            }
        }
        let done = bytes - remaining;
        if done == 0 || host == INV {
            return Err(SimErr::Bug("nothing allocated"));
        }
        Ok((host, done, metas))
    }

    /// `handle_alloc`: false when the contiguous allocation cannot be extended.
    fn handle_alloc(
        &mut self,
        guest: u64,
        host: &mut u64,
        bytes: &mut u64,
        metas: &mut Vec<Meta>,
    ) -> SimResult<bool> {
        let cs = self.cs;
        let oic = guest & (cs - 1);
        let index = (guest >> self.bits) & (self.l2_entries - 1);
        let mut nb = (oic + *bytes).div_ceil(cs);
        nb = nb.min(self.l2_entries - index);
        nb = nb.min(REQUEST_MAX_BYTES >> self.bits);
        self.get_cluster_table(guest)?;
        let mut alloc = if *host == INV { INV } else { *host & !(cs - 1) };
        if self.has_data_file {
            alloc = guest & !(cs - 1);
        } else if alloc == INV {
            alloc = self.alloc_clusters(nb * cs)?;
        } else {
            nb = self.alloc_clusters_at(alloc, nb)?;
        }
        if nb == 0 {
            *bytes = 0;
            return Ok(false);
        }
        let requested = *bytes + oic;
        let avail = nb << self.bits;
        let nb_bytes = requested.min(avail);
        *host = alloc + oic;
        *bytes = (*bytes).min(nb_bytes - oic);
        metas.push(Meta {
            guest: guest & !(cs - 1),
            host: alloc,
            n: (oic + *bytes).div_ceil(cs),
            end: oic + *bytes,
        });
        Ok(true)
    }

    /// `qcow2_alloc_cluster_link_l2` for a preallocation: entries `host | COPIED`.
    fn link_l2(&mut self, m: Meta) -> SimResult<()> {
        self.get_cluster_table(m.guest)?;
        let l1_index = m.guest >> (self.bits + self.l2_bits);
        let index = (m.guest >> self.bits) & (self.l2_entries - 1);
        if index + m.n > self.l2_entries {
            return Err(SimErr::Bug("L2 update crosses a table"));
        }
        let l2 = self
            .l2
            .get_mut(&l1_index)
            .ok_or(SimErr::Bug("L2 table missing"))?;
        l2.runs.push((index, m.n, m.host));
        // perform_cow: the rest of the last subcluster the request touched.
        let sc = if self.extended_l2 {
            self.cs / 32
        } else {
            self.cs
        };
        let cow_to = m.end.div_ceil(sc) * sc;
        if cow_to > m.end {
            let off = m.host + m.end;
            let len = cow_to - m.end;
            self.zero_writes.push((self.has_data_file, off, len));
            if self.has_data_file {
                self.data_file_len = self.data_file_len.max(off + len);
            } else {
                self.written(off, len);
            }
        }
        Ok(())
    }

    /// `get_cluster_table`: allocates the L2 table for `guest` if there is none.
    fn get_cluster_table(&mut self, guest: u64) -> SimResult<()> {
        let l1_index = guest >> (self.bits + self.l2_bits);
        let entry = *self
            .l1
            .get(l1_index as usize)
            .ok_or(SimErr::Bug("L1 index beyond the table"))?;
        if entry & L1Entry::COPIED == 0 {
            self.l2_allocate(l1_index)?;
        }
        Ok(())
    }

    /// `l2_allocate` for an empty L1 entry.
    fn l2_allocate(&mut self, l1_index: u64) -> SimResult<()> {
        let off = self.alloc_clusters(self.cs)?;
        if off == 0 {
            return Err(SimErr::Bug("L2 table at offset 0"));
        }
        self.written(off, self.cs);
        self.l2.insert(
            l1_index,
            L2Plan {
                offset: off,
                runs: Vec::new(),
            },
        );
        self.l1[l1_index as usize] = off | L1Entry::COPIED;
        Ok(())
    }

    /// `qcow2_grow_l1_table(min_size, exact_size = true)` from an empty table.
    fn grow_l1(&mut self, min_size: u64) -> SimResult<()> {
        if min_size <= self.l1.len() as u64 {
            return Ok(());
        }
        if min_size > INT_MAX / 8 || min_size > MAX_L1_SIZE / 8 {
            return Err(SimErr::TooLarge);
        }
        let bytes = min_size * 8;
        let off = self.alloc_clusters(bytes)?;
        self.written(off, bytes);
        self.l1 = vec![0; min_size as usize];
        self.l1_offset = off;
        Ok(())
    }

    /// `qcow2_get_refcount` (0 or 1 during creation).
    fn refcount(&self, c: u64) -> u64 {
        let t = c >> self.rb_bits;
        match self.reftable.get(t as usize) {
            Some(&b) if b != 0 => u64::from(self.used.contains(c)),
            _ => 0,
        }
    }

    /// `alloc_clusters_noref`: the first run of `n` free clusters from the free cursor.
    fn alloc_clusters_noref(&mut self, n: u64, max: u64) -> SimResult<u64> {
        let mut p = self.free_cluster_index;
        while let Some((_, run_end)) = self.used.first_in(p, p + n) {
            p = run_end;
        }
        // Refcounts of clusters in unhooked refcount blocks read as 0: the model's `used`
        // set agrees except for a block that describes itself before it is hooked up,
        // which no search can meet.
        self.free_cluster_index = p + n;
        if self.free_cluster_index > 0 && self.free_cluster_index - 1 > (max >> self.bits) {
            return Err(SimErr::TooLarge);
        }
        Ok(p << self.bits)
    }

    /// `qcow2_alloc_clusters(size)`.
    fn alloc_clusters(&mut self, size: u64) -> SimResult<u64> {
        loop {
            let n = size.div_ceil(self.cs);
            let off = self.alloc_clusters_noref(n, MAX_CLUSTER_OFFSET)?;
            match self.update_refcount(off, size, false) {
                Ok(()) => return Ok(off),
                Err(SimErr::Again) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// `qcow2_alloc_clusters_at(offset, n)`: how many of the clusters from `offset` could be
    /// allocated (it stops at the first one in use).
    fn alloc_clusters_at(&mut self, offset: u64, n: u64) -> SimResult<u64> {
        if n == 0 {
            return Ok(0);
        }
        loop {
            let first = offset >> self.bits;
            let mut i = 0;
            while i < n && self.refcount(first + i) == 0 {
                i += 1;
            }
            match self.update_refcount(offset, i << self.bits, false) {
                Ok(()) => return Ok(i),
                Err(SimErr::Again) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// `update_refcount(offset, length, 1, decrease)`, with QEMU's undo of the clusters
    /// already updated when it fails (including with `Again`).
    fn update_refcount(&mut self, offset: u64, length: u64, decrease: bool) -> SimResult<()> {
        if length == 0 {
            return Ok(());
        }
        let start = offset >> self.bits;
        let last = (offset + length - 1) >> self.bits;
        let mut c = start;
        let mut old_table_index = None;
        let res = loop {
            if c > last {
                break Ok(());
            }
            let t = c >> self.rb_bits;
            if old_table_index != Some(t) {
                if let Err(e) = self.alloc_refcount_block(c) {
                    if e == SimErr::Again && self.free_cluster_index > start {
                        self.free_cluster_index = start;
                    }
                    break Err(e);
                }
            }
            old_table_index = Some(t);
            let seg_end = (last + 1).min((t + 1) << self.rb_bits);
            if decrease {
                if !self.used.covers(c, seg_end) {
                    break Err(SimErr::Bug("refcount would drop below zero"));
                }
                self.used.remove(c, seg_end);
                if c < self.free_cluster_index {
                    self.free_cluster_index = c;
                }
            } else {
                if self.used.first_in(c, seg_end).is_some() {
                    break Err(SimErr::Bug("allocating a cluster that is in use"));
                }
                self.used.insert(c, seg_end);
            }
            c = seg_end;
        };
        if res.is_err() && c > start {
            // Undo [offset, c): the clusters this call already changed.
            let _ = self.update_refcount(offset, (c << self.bits) - offset, !decrease);
        }
        res
    }

    /// `alloc_refcount_block(cluster_index)`: Ok when the block exists; otherwise allocates
    /// one (growing the refcount table if needed) and returns `Again`.
    fn alloc_refcount_block(&mut self, c: u64) -> SimResult<()> {
        let t = c >> self.rb_bits;
        if let Some(&b) = self.reftable.get(t as usize) {
            if b != 0 {
                return Ok(());
            }
        }
        let new_block = self.alloc_clusters_noref(1, i64::MAX as u64)?;
        if new_block == 0 {
            return Err(SimErr::Bug("refcount block at offset 0"));
        }
        let nb = new_block >> self.bits;
        if nb >> self.rb_bits == t {
            // The block describes itself.
            self.used.insert(nb, nb + 1);
        } else {
            self.update_refcount(new_block, self.cs, false)?;
        }
        self.written(new_block, self.cs);
        if (t as usize) < self.reftable.len() {
            self.reftable[t as usize] = new_block;
            self.max_reftable_index = self.max_reftable_index.max(t);
            return Err(SimErr::Again);
        }
        let blocks_used = (c + 1).max(nb + 1).div_ceil(self.rb_size());
        let meta_offset = blocks_used * self.rb_size() * self.cs;
        self.refcount_area(meta_offset, 0, false, t, new_block)?;
        Err(SimErr::Again)
    }

    /// `qcow2_refcount_area`: new refcount blocks and a new refcount table at `start`
    /// covering everything up to their own end plus `additional` clusters; switches to the
    /// new table and frees the old one. Returns the end of the new structures.
    fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_index: u64,
        new_offset: u64,
    ) -> SimResult<u64> {
        let cs = self.cs;
        let total =
            refcount_metadata_blocks(start / cs + additional, cs, self.width.order(), !exact);
        if total > MAX_REFTABLE_SIZE {
            return Err(SimErr::TooLarge);
        }
        let area_index = (start / cs) / self.rb_size();
        let mut table_size = if exact {
            total
        } else {
            total + total.div_ceil(2)
        };
        table_size = table_size.div_ceil(cs / 8) * (cs / 8);
        let table_clusters = table_size * 8 / cs;
        if table_size > MAX_REFTABLE_SIZE {
            return Err(SimErr::TooLarge);
        }
        let mut new_table = vec![0u64; table_size as usize];
        let keep = if table_size > self.max_reftable_index {
            self.max_reftable_index + 1
        } else {
            table_size
        } as usize;
        new_table[..keep].copy_from_slice(&self.reftable[..keep]);
        if new_offset != 0 {
            if new_index >= total {
                return Err(SimErr::Bug("new refcount block outside the new table"));
            }
            new_table[new_index as usize] = new_offset;
        }
        let additional_blocks = (area_index..total)
            .filter(|&i| new_table[i as usize] == 0)
            .count() as u64;
        let table_offset = start + additional_blocks * cs;
        let end_offset = table_offset + table_clusters * cs;
        let mut block_offset = start;
        for i in area_index..total {
            if new_table[i as usize] == 0 {
                new_table[i as usize] = block_offset;
                self.written(block_offset, cs);
                block_offset += cs;
            }
            let first = i * self.rb_size() * cs;
            if first < end_offset {
                let j = if first < start {
                    (start - first) / cs
                } else {
                    0
                };
                let end_index = ((end_offset - first) / cs).min(self.rb_size());
                let (a, b) = (first / cs + j, first / cs + end_index);
                if a < b {
                    if self.used.first_in(a, b).is_some() {
                        return Err(SimErr::Bug("refcount area not empty"));
                    }
                    self.used.insert(a, b);
                }
            }
        }
        if block_offset != table_offset {
            return Err(SimErr::Bug("refcount area miscounted"));
        }
        self.written(table_offset, table_size * 8);
        let old_offset = self.reftable_offset;
        let old = std::mem::replace(&mut self.reftable, new_table);
        self.stale.push((
            old_offset,
            old.iter().flat_map(|e| e.to_be_bytes()).collect(),
        ));
        self.reftable_offset = table_offset;
        self.max_reftable_index = self.reftable.iter().rposition(|&e| e != 0).unwrap_or(0) as u64;
        self.update_refcount(old_offset, old.len() as u64 * 8, true)?;
        Ok(end_offset)
    }

    /// The bytes of refcount block `index` (its clusters' refcounts, 0 or 1).
    fn render_refblock(&self, index: u64, out: &mut [u8]) {
        out.fill(0);
        let (a, b) = (index << self.rb_bits, (index + 1) << self.rb_bits);
        for (s, e) in self.used.runs_in(a, b) {
            for c in s..e {
                // Cannot fail: 1 fits every width.
                let _ = self.width.set(out, c - a, 1);
            }
        }
    }

    /// The bytes of the L2 table for L1 index `l1_index`.
    fn render_l2(&self, l1_index: u64, out: &mut [u8]) {
        out.fill(0);
        let geo = qcow2_format::ClusterGeometry::new(self.bits, self.extended_l2)
            .expect("validated geometry");
        if let Some(l2) = self.l2.get(&l1_index) {
            for &(index, n, host) in &l2.runs {
                for i in 0..n {
                    let entry = L2Entry {
                        word: (host + (i << self.bits)) | qcow2_format::L2_COPIED,
                        bitmap: 0,
                    };
                    entry.write(out, &geo, (index + i) as usize);
                }
            }
        }
    }
}

/// `qcow2_refcount_metadata_size`: how many refcount blocks cover `clusters` clusters plus
/// the refcount structures themselves (with `generous`, room for the table to grow by half).
fn refcount_metadata_blocks(mut clusters: u64, cs: u64, order: u32, mut generous: bool) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = (cs * 8) >> order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
        }
        if n == last {
            return blocks;
        }
    }
}

impl fmt::Display for Compat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_split() {
        let mut r = Ranges::default();
        r.insert(0, 3);
        r.insert(5, 7);
        r.insert(3, 5);
        assert_eq!(r.0.len(), 1);
        assert!(r.covers(0, 7));
        r.remove(2, 4);
        assert!(r.contains(1) && !r.contains(2) && !r.contains(3) && r.contains(4));
        assert_eq!(r.first_in(2, 10), Some((4, 7)));
        assert_eq!(r.last_below(100), Some(6));
        assert_eq!(r.last_below(5), Some(4));
        let runs: Vec<_> = r.runs_in(1, 6).collect();
        assert_eq!(runs, vec![(1, 2), (4, 6)]);
    }

    #[test]
    fn small_image_layout_matches_qemu() {
        // qemu-img create -f qcow2 img 1M: reftable at 0x10000, refblock at 0x20000, L1 at
        // 0x30000, file length 0x30008.
        let opts = CreateOptions::new().size(1 << 20);
        let p = plan(&opts, 1 << 20).unwrap();
        assert_eq!(p.sim.reftable_offset, 0x10000);
        assert_eq!(p.sim.reftable[0], 0x20000);
        assert_eq!(p.sim.l1_offset, 0x30000);
        assert_eq!(p.file_len, 0x30008);
    }

    #[test]
    fn limits_are_qemus() {
        let opts = CreateOptions::new().cluster_size(512);
        assert!(plan(&opts, 128 << 30).is_ok());
        assert_eq!(
            plan(&opts, (128 << 30) + 512).err(),
            Some(CreateError::TooLarge)
        );
    }

    #[tokio::test]
    async fn creates_in_memory_and_opens() {
        let opener = blockio::MemoryOpener::new();
        let opts = CreateOptions::new()
            .size(4 << 20)
            .preallocation(Preallocation::Metadata);
        create(&opener, "img", &opts).await.unwrap();
        let img = Image::open(opener.clone(), "img", ImageOptions::new().read_only(true))
            .await
            .unwrap();
        assert_eq!(img.size(), 4 << 20);
        assert_eq!(&img.read(0, 512).await.unwrap()[..], &[0u8; 512][..]);
    }
}
