//! The engine's error type: one enum a caller can match on.

use crate::options::{Preallocation, V3Feature};
use qcow2_format::FormatError;
use std::io;
use std::path::PathBuf;

/// Result type of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The outcome of a read into an owned buffer, and the buffer back.
pub type ReadResult = (Result<()>, blockio::IoBuf);

/// The outcome of a write from an owned buffer, and the buffer back.
pub type WriteResult = (Result<()>, blockio::IoBuf);

/// Why a compressed write is refused (each as QEMU refuses it; the errno qemu-io reports is
/// in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompressedRefusal {
    /// The request is not whole clusters (nor ends at the end of the disk) (EINVAL).
    #[error("compressed writes cover whole clusters (or end at the end of the disk)")]
    NotWholeClusters,
    /// The cluster is allocated: compressed data only goes to unallocated clusters (EIO).
    #[error("the cluster is allocated; compressed data only goes to unallocated clusters")]
    Allocated,
    /// The image has an external data file, which holds no compressed clusters (ENOTSUP).
    #[error("an image with an external data file cannot hold compressed clusters")]
    DataFile,
    /// The disk is raw (ENOTSUP).
    #[error("a raw disk cannot hold compressed clusters")]
    Raw,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error from the file (or backing / data file) underneath.
    #[error("{context}: {source}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// The error from the backend.
        #[source]
        source: io::Error,
    },
    /// The image's on-disk structures are invalid (found while opening). The message is the
    /// format's, QEMU's where QEMU refuses the image for the same reason.
    #[error("{source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// Metadata found inconsistent while running (an L2 entry pointing past the end of the
    /// file, a misaligned offset, metadata overlapping metadata...).
    #[error("{path}: image is corrupt: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// The image has the corrupt bit set and cannot be opened read/write.
    #[error("{0}: image is marked corrupt; it can be opened read-only only")]
    MarkedCorrupt(PathBuf),
    /// A request outside the virtual disk.
    #[error("request {offset:#x}+{len:#x} is beyond the end of the disk ({size:#x})")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// A read asked for more bytes than one buffer can hold on this platform: the `read`
    /// methods that allocate the buffer ([`Image::read`](crate::Image::read),
    /// [`Disk::read`](crate::Disk::read), [`SnapshotView::read`](crate::SnapshotView::read))
    /// take a `u64` length like every guest length, and refuse one over `max` (the largest
    /// page-aligned allocation: `isize::MAX` rounded down to a multiple of
    /// [`blockio::DEFAULT_ALIGN`]) before allocating anything. Nothing was read.
    #[error("request {offset:#x}+{len:#x} is longer than the largest buffer ({max:#x} bytes)")]
    RequestTooLarge {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// The longest buffer on this platform.
        max: u64,
    },
    /// A write to an image opened read-only.
    #[error("image is read-only")]
    ReadOnly,
    /// The backing chain is deeper than the configured limit.
    #[error("{path}: backing chain deeper than {limit} images")]
    BackingChainTooDeep {
        /// The image whose backing file would exceed the limit.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// A backing file refers back to an image already in the chain.
    #[error("{path}: backing chain loops back to {path}")]
    BackingLoop {
        /// The file met twice.
        path: PathBuf,
    },
    /// Another open of the file, in this process or another (QEMU, qemu-io), holds a lock
    /// this open conflicts with (invariant I10): usually, it has the image open for writing.
    /// The message is QEMU's.
    #[error("{conflict}\nIs another process using the image [{}]?", path.display())]
    Locked {
        /// "image", "backing file", "data file".
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// Which lock.
        conflict: blockio::LockConflict,
    },
    /// Options that cannot go together (the message is QEMU's where it has one).
    #[error("{0}")]
    InvalidOptions(String),
    /// A persistent dirty bitmap operation refused (the message is QEMU's where it has one).
    #[error("{0}")]
    Bitmap(String),
    /// One action of [`Image::bitmap_edit`](crate::Image::bitmap_edit) refused, in
    /// qemu-img bitmap's words.
    #[error("Operation {action} on bitmap {bitmap} failed: {message}")]
    BitmapAction {
        /// "add", "remove", "clear", "enable", "disable", "merge".
        action: &'static str,
        /// The bitmap acted on.
        bitmap: String,
        /// Why (QEMU's message).
        message: String,
    },
    /// A file could not be opened: QEMU's file driver's message (`Could not open 'PATH':
    /// REASON`, the reason as C's `strerror` words it).
    #[error("Could not open '{}': {}", path.display(), strerror(source))]
    OpenFile {
        /// "backing file", "data file", "image".
        role: &'static str,
        /// The path as resolved.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A backing file could not be opened (the error inside), in QEMU's words: `Could not
    /// open backing file: ` once for each level of the chain down to the image at fault.
    /// Lock conflicts, loops and too deep chains are reported as they are.
    #[error("Could not open backing file: {0}")]
    Backing(Box<Error>),
    /// A feature or format this engine does not handle (encryption, an unknown backing format,
    /// an image without its data file name...).
    #[error("{path}: unsupported: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        what: String,
    },
    /// No internal snapshot has this ID or name (or a snapshot being read was deleted).
    #[error("{path}: snapshot '{name}' not found")]
    SnapshotNotFound {
        /// The image.
        path: PathBuf,
        /// The ID or name asked for.
        name: String,
    },
    /// A compressed cluster that does not decompress to a full cluster.
    #[error("{path}: compressed cluster at host offset {host_offset:#x} is invalid: {reason}")]
    Decompress {
        /// The file.
        path: PathBuf,
        /// Where the compressed data starts.
        host_offset: u64,
        /// What the decoder said.
        reason: String,
    },
    /// A compressed write QEMU refuses as well: see
    /// [`Image::write_compressed`](crate::Image::write_compressed).
    #[error("compressed write at {offset:#x}: {reason}")]
    CompressedWrite {
        /// Guest offset of the request (or of the cluster refused).
        offset: u64,
        /// Why.
        reason: CompressedRefusal,
    },
    /// A refcount would exceed what the image's refcount width holds.
    #[error("{path}: refcount {value} does not fit in {bits} bits")]
    RefcountOverflow {
        /// The file.
        path: PathBuf,
        /// The refcount that does not fit.
        value: u64,
        /// The refcount width.
        bits: u32,
    },
    /// The options given to [`crate::create`] are invalid, or the image they describe
    /// cannot exist (the message is qemu-img's).
    #[error(transparent)]
    Create(CreateError),
    /// [`Image::amend`](crate::Image::amend) was asked for a change QEMU refuses (the message
    /// is qemu-img's).
    #[error(transparent)]
    Amend(AmendError),
    /// A resize was refused before anything changed (the message is QEMU's where it has
    /// one).
    #[error(transparent)]
    Resize(ResizeError),
}

/// Errors that stop one request without saying anything about the image's consistency are
/// the variants above; the allocator's refusals come here.
impl From<(&std::path::Path, qcow2_alloc::RefcountError)> for Error {
    fn from((path, e): (&std::path::Path, qcow2_alloc::RefcountError)) -> Self {
        match e {
            qcow2_alloc::RefcountError::Format(FormatError::RefcountOverflow { value, bits }) => {
                Error::RefcountOverflow {
                    path: path.into(),
                    value,
                    bits,
                }
            }
            other => Error::Corrupt {
                path: path.into(),
                what: other.to_string(),
            },
        }
    }
}

/// An I/O error as C's `strerror` words it, as QEMU prints it (without Rust's " (os error N)").
pub fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

impl Error {
    /// `Ok` when the guest range `offset..offset+len` lies inside a disk of `size` bytes,
    /// else [`Error::OutOfRange`] (an end past `u64::MAX` too).
    pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> crate::Result<()> {
        match offset.checked_add(len).is_some_and(|end| end <= size) {
            true => Ok(()),
            false => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The error of a guest request (`what`: "write", "read", ...) on `offset..offset+len`:
    /// an I/O error's context starts with the request, so that a failure met while writing
    /// metadata for a guest write still says which guest data it was for. The variant and
    /// the errno stay what they were.
    pub(crate) fn in_request(self, what: &str, offset: u64, len: u64) -> Self {
        match self {
            Error::Io { context, source } => Error::Io {
                context: format!("guest {what} {offset:#x}+{len:#x}: {context}"),
                source,
            },
            other => other,
        }
    }

    /// Whether this error means the image is (or is marked) corrupt.
    pub fn is_corruption(&self) -> bool {
        match self {
            Error::Corrupt { .. } | Error::MarkedCorrupt(_) => true,
            Error::Backing(inner) => inner.is_corruption(),
            _ => false,
        }
    }

    /// The `errno` a block device would complete the request with, as QEMU's block layer
    /// chooses it: the system's own for I/O errors (`ENOSPC`, `EIO`, ...), `EIO` for
    /// corruption found and for requests past the end of the disk, `EPERM` for a write to a
    /// read-only image, `ENOTSUP` for what the engine does not do, `EINVAL` for refused
    /// arguments (a read longer than any buffer among them). A VMM completes a guest request
    /// with it (virtio-blk's `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`, an NVMe status)
    /// and [`std::io::Error::from_raw_os_error`] words it.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::OpenFile { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::Format { .. }
            | Error::Corrupt { .. }
            | Error::MarkedCorrupt(_)
            | Error::Decompress { .. }
            | Error::OutOfRange { .. } => libc::EIO,
            Error::Backing(inner) => inner.errno(),
            Error::ReadOnly => libc::EPERM,
            Error::Locked { .. } => libc::EAGAIN,
            Error::BackingLoop { .. } | Error::BackingChainTooDeep { .. } => libc::ELOOP,
            Error::Unsupported { .. } => libc::ENOTSUP,
            Error::SnapshotNotFound { .. } => libc::ENOENT,
            Error::RefcountOverflow { .. } => libc::ERANGE,
            Error::CompressedWrite { reason, .. } => match reason {
                CompressedRefusal::NotWholeClusters => libc::EINVAL,
                CompressedRefusal::Allocated => libc::EIO,
                CompressedRefusal::DataFile | CompressedRefusal::Raw => libc::ENOTSUP,
            },
            Error::InvalidOptions(_)
            | Error::RequestTooLarge { .. }
            | Error::Bitmap(_)
            | Error::BitmapAction { .. }
            | Error::Create(_)
            | Error::Amend(_)
            | Error::Resize(_) => libc::EINVAL,
        }
    }
}

/// Why [`Image::resize`](crate::Image::resize) refused a size. Nothing was changed. The
/// messages are QEMU's (qemu-img's, or its qcow2 driver's), but for
/// [`ResizeError::UnsupportedBitmap`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResizeError {
    /// A size below the current one without [`ResizeOptions::shrink`](crate::ResizeOptions).
    #[error("Use the --shrink option to perform a shrink operation.")]
    ShrinkNotAllowed {
        /// The size now.
        size: u64,
        /// The size asked for.
        new_size: u64,
    },
    /// The new size is not a multiple of 512 bytes (qcow2 images).
    #[error("The new size must be a multiple of 512")]
    Unaligned(u64),
    /// A version 2 image with internal snapshots: its snapshot table does not record their
    /// sizes.
    #[error("Can't resize a v2 image which has snapshots")]
    V2Snapshots,
    /// A persistent bitmap (named) is marked in use on disk by a program that did not close
    /// the image: its bits cannot be trusted, so it cannot be resized (QEMU's words). It can
    /// be removed.
    #[error(
        "Bitmap '{0}' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk"
    )]
    InconsistentBitmap(String),
    /// The image has persistent bitmaps this open did not load (a previous resize of it was
    /// dropped midway): they cannot be resized.
    #[error("Cannot resize qcow2 with persistent bitmaps that were not loaded")]
    BitmapsNotLoaded,
    /// A persistent bitmap (named) of a type, or with extra data, this engine cannot store.
    #[error("Bitmap '{0}' has a type or extra data this engine cannot resize")]
    UnsupportedBitmap(String),
    /// Preallocation asked for a shrink.
    #[error("Preallocation can't be used for shrinking an image")]
    PreallocationShrink,
    /// The L1 table the new size needs exceeds QEMU's limit (32 MiB).
    #[error("Failed to grow the L1 table: File too large")]
    TooLarge(u64),
    /// A grow of a version 2 image whose backing file reaches past the old end: the new area
    /// must read as zeros, and a version 2 image has no zero clusters to hide the backing
    /// file with. (QEMU grows the L1 table first and then fails with this message; nothing is
    /// changed here.)
    #[error("Failed to zero out new clusters: Operation not supported")]
    CannotZeroNewArea,
    /// A preallocation mode the format does not have (`metadata` for raw images).
    #[error("Unsupported preallocation mode: {}", .0.name())]
    UnsupportedPreallocation(Preallocation),
}

impl From<ResizeError> for Error {
    fn from(e: ResizeError) -> Self {
        Error::Resize(e)
    }
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
    /// `qemu-img measure`: refcounts other than 16 bits wide with compat 0.10 (the
    /// condition of `NeedsV3(V3Feature::RefcountBits)`, in the words of QEMU's option parser,
    /// which measuring uses).
    #[error(
        "Different refcount widths than 16 bits require compatibility level 1.1 or above \
         (use compat=1.1 or greater)"
    )]
    MeasureRefcountBitsNeedV3,
    /// `qemu-img measure`: the L1 table of the size measured would exceed QEMU's limit.
    #[error("The image size is too large (try using a larger cluster size)")]
    MeasureTooLarge,
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

/// Why [`Image::amend`](crate::Image::amend) refuses an amendment. The messages are
/// qemu-img amend's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AmendError {
    /// `refcount_bits` is not a power of two up to 64.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountBits(u64),
    /// `data_file` given for an image without an external data file.
    #[error("data-file can only be set for images that use an external data file")]
    DataFileWithoutDataFile,
    /// `data_file_raw=on` for an image whose data file is not raw already.
    #[error("data-file-raw cannot be set on existing images")]
    DataFileRawOnExisting,
    /// A refcount width other than 16 bits for a version 2 image.
    #[error(
        "Refcount widths other than 16 bits require compatibility level 1.1 or above \
         (use compat=1.1 or greater)"
    )]
    RefcountBitsNeedV3,
    /// A narrower refcount width than a cluster's refcount needs: the first such cluster
    /// (by offset) and its refcount.
    #[error(
        "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {offset:#x} \
         has a refcount of {refcount}"
    )]
    RefcountOverflow {
        /// The width asked for.
        bits: u64,
        /// The cluster's offset in the image file.
        offset: u64,
        /// Its refcount.
        refcount: u64,
    },
    /// A downgrade of an image with internal snapshots, which the engine does not do
    /// (their zero clusters would need expanding; reported as [`Error::Unsupported`]).
    #[error("downgrading an image with internal snapshots is not supported")]
    SnapshotTableRewrite,
    /// A different backing file or format: that is a rebase.
    #[error("Cannot amend the backing file")]
    BackingFile,
    /// Lazy refcounts for a version 2 image.
    #[error(
        "Lazy refcounts only supported with compatibility level 1.1 and above \
         (use compat=1.1 or greater)"
    )]
    LazyRefcountsNeedV3,
    /// Version 2 with refcounts other than 16 bits wide.
    #[error("compat=0.10 requires refcount_bits=16")]
    DowngradeRefcountBits,
    /// Version 2 with an external data file.
    #[error("Cannot downgrade an image with a data file")]
    DowngradeDataFile,
    /// Version 2 with snapshots that have a large VM state or another disk size.
    #[error("Internal snapshots prevent downgrade of image")]
    DowngradeSnapshots,
    /// Version 2 with incompatible features it cannot express (the bits).
    #[error("Cannot downgrade an image with incompatible features {0:#x} set")]
    DowngradeFeatures(u64),
    /// Version 2 with zstd-compressed clusters.
    #[error(
        "Cannot downgrade an image with zstd compression type and existing compressed clusters"
    )]
    DowngradeZstd,
}
