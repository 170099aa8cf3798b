//! The engine's error type: one enum a caller can match on.

use qcow2_format::FormatError;
use std::io;
use std::path::PathBuf;

/// Result type of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
    /// The image's on-disk structures are invalid (found while opening).
    #[error("{path}: {source}")]
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
    /// A backing or data file could not be opened.
    #[error("could not open {role} {path}: {source}")]
    OpenFile {
        /// "backing file", "data file", "image".
        role: &'static str,
        /// The path as resolved.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A feature or format this engine does not handle (encryption, an unknown backing format,
    /// an image without its data file name...).
    #[error("{path}: unsupported: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        what: String,
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
    Create(crate::CreateError),
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

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether this error means the image is (or is marked) corrupt.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::MarkedCorrupt(_))
    }
}
