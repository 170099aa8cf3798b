//! Creating images: [`CreateOptions`] and [`create`] (`qemu-img create -f qcow2`), and
//! [`create_raw`] (`qemu-img create -f raw`); and measuring one before it exists
//! ([`measure_size`], [`measure_disk`]: `qemu-img measure`).
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

mod file;
mod measure;
mod options;
mod sim;
#[cfg(test)]
mod tests;

pub use crate::error::CreateError;
pub use crate::options::{Compat, Preallocation, V3Feature};
pub use file::{create, create_raw, probe_backing};
pub use measure::{measure_disk, measure_size, MeasureTarget, Measurement};
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
use std::io;
use std::path::Path;
