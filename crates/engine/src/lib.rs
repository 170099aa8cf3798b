//! # qcow2-engine
//!
//! An async qcow2 block driver: open QEMU qcow2 images (v2 and v3, every cluster size and
//! refcount width, compressed clusters in zlib and zstd, extended L2 entries, external data
//! files, backing chains of qcow2 and raw images) and read them byte-for-byte as QEMU does.
//!
//! The engine is generic over the I/O backend ([`blockio::Opener`]): the tokio file backend
//! runs on any tokio runtime, the io_uring backend on a tokio-uring runtime (build it with
//! [`blockio::uring_builder`]).
//!
//! ## Concurrency
//!
//! Metadata (L1, cached L2 tables) sits behind one async metadata lock; data I/O never runs
//! under it. Every data read holds a shared lease on each host cluster it touches
//! ([`qcow2_alloc::LeaseTable`]), taken while the mapping is known to be valid, so a cluster
//! cannot be freed and reused under an in-flight request.
//!
//! ```no_run
//! # async fn demo() -> qcow2_engine::Result<()> {
//! use qcow2_engine::{Image, ImageOptions};
//! let img = Image::open(blockio::FileOpener, "disk.qcow2", ImageOptions::new().read_only(true)).await?;
//! let first_sector = img.read(0, 512).await?;
//! println!("{} bytes, starts with {:02x?}", img.size(), &first_sector[..4]);
//! # Ok(()) }
//! ```
//!
//! This crate must not parse on-disk bytes by hand (that is `qcow2-format`'s job) and never
//! holds the metadata lock across data I/O.
//!
//! ## Layers
//!
//! Each module uses only those above it in this list (crates/engine/tests/layers.rs checks
//! it): `options`, `compress`, `inflight` (what an I/O keeps alive, I9); `error`; `files` (the
//! image and data files, flushes, growth) and `aligned` (bounce buffers and read-modify-write,
//! owning its lock); `meta` (the state under the metadata lock, its loaders, the table cache,
//! the store that writes it back in I4/I5/I8 order, the open-time reference check); `map` (L2
//! lookup and decoding with one rule, the walk, block status) and `tracking` (the upkeep of
//! the persistent dirty bitmaps while writing); `check` (check
//! and repair over the files and metadata); `image` (the facade type, opening, the `Disk` of a
//! chain); `request` (the read, write, allocate, zero/discard, flush/close and resize paths
//! behind the facade); `create`, `amend` and `snapshot` (making and changing images, internal
//! snapshots); `bitmap_edit` (changing the persistent bitmaps, with amend's header layout).
//! docs/DESIGN.md has the invariants, docs/CONCURRENCY.md the lock table.
#![warn(missing_docs)]

mod aligned;
mod amend;
mod bitmap_edit;
mod bitmap_resize;
mod check;
mod commit;
mod compress;
mod create;
mod error;
mod files;
mod image;
mod inflight;
mod lock;
mod map;
mod meta;
mod options;
mod rebase;
mod request;
mod snapshot;
mod tracking;

pub use amend::AmendOptions;
pub use bitmap_edit::BitmapAction;
pub use check::{CheckLimit, CheckReport, RepairMode, MAX_MESSAGES, MAX_WALK_CORRUPTIONS};
pub use create::{
    create, create_raw, measure_disk, measure_size, probe_backing, Compat, CreateError,
    CreateOptions, MeasureTarget, Measurement, Preallocation, V3Feature,
};
pub use error::{
    strerror, AmendError, CompressedRefusal, Error, ReadResult, ResizeError, Result, WriteResult,
};
pub use image::MapEntry;
pub use image::{resolve_backing, Disk, Image, RawImage};
pub use map::status::{Extent, ExtentKind};
pub use options::{
    BackingChoice, CacheMode, ImageFormat, ImageOptions, ResizeOptions, SnapshotOptions, WriteFlags,
};
pub use rebase::NewBacking;
pub use request::VectoredResult;
pub use snapshot::{SnapshotLookup, SnapshotView};
