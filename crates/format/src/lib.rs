//! # qcow2-format
//!
//! The qcow2 on-disk format, and nothing else: the header (v2 and v3, with its additional
//! fields and extensions), feature bits, L1 and L2 entries (standard and extended), compressed
//! cluster descriptors, refcount entries of every width, the snapshot table and the bitmap
//! directory. Everything here parses, validates and serializes plain byte slices.
//!
//! This crate must not do I/O, be async, or know about caches: the engine reads the bytes and
//! hands them here. Every number that comes from disk is checked before it is used to size an
//! allocation or compute an offset; a malformed structure is a [`FormatError`] that says what
//! is wrong, never a panic.
#![warn(missing_docs)]

mod be;
mod bitmap;
mod compressed;
mod error;
mod extension;
pub mod features;
mod header;
mod l1l2;
pub mod limits;
mod refcount;
mod snapshot;
mod units;

pub use bitmap::{BitmapDirectoryEntry, BitmapTableEntry};
pub use compressed::CompressedDescriptor;
pub use error::FormatError;
pub use extension::{BitmapsExtension, FeatureKind, FeatureName, HeaderExtension};
pub use header::{CompressionType, Header, QCOW_MAGIC};
pub use l1l2::{
    L1Entry, L2ClusterType, L2Entry, L2Mapping, SubclusterBitmap, SubclusterState, L2_COMPRESSED,
    L2_COPIED, L2_ZERO,
};
pub use refcount::{RefcountWidth, ReftableEntry};
pub use snapshot::Snapshot;
pub use units::{
    ClusterCount, ClusterGeometry, GuestOffset, HostCluster, HostOffset, MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS, SUBCLUSTERS,
};

/// Result type of this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
