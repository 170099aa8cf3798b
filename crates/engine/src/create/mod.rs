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

mod file;
mod options;
mod sim;
#[cfg(test)]
mod tests;

pub use file::{create, create_raw, probe_backing};
pub use options::CreateOptions;

use crate::image::{resolve_backing, Disk};
use crate::options::{ImageFormat, ImageOptions};
use crate::{Error, Result};
use blockio::{Backend, IoBuf, Keep, LockRequest, OpenOptions, Opener, Perms};
use qcow2_format::{
    features, CompressionType, FormatError, Header, HeaderExtension, L1Entry, L2Entry,
    RefcountWidth, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS,
};
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

impl fmt::Display for Compat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        })
    }
}
