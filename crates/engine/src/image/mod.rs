//! The image facade (layer 7): [`Image`], the one type an embedder holds, with its parts
//! (files, aligned I/O, metadata, leases, trackers, bitmaps, backing chain); how an image is
//! opened ([`open`]); the [`Disk`] a backing chain is made of ([`disk`]); what an image says
//! about itself ([`info`]) and about a whole chain ([`chain`]).
//!
//! The request paths behind the facade's I/O methods are in `request`, which adds them to
//! [`Image`]; this module uses the layers below it and never `request`.

mod chain;
mod check;
mod disk;
mod info;
mod open;

pub use chain::MapEntry;
pub use disk::{Disk, RawImage};
pub(crate) use open::open_error;
pub use open::resolve_backing;

use crate::aligned::Aligned;
use crate::files::Files;
use crate::map::Mapper;
use crate::meta::Store;
use crate::Result;
use blockio::Opener;
use qcow2_alloc::LeaseTable;
use qcow2_format::{ClusterGeometry, Header};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// An open qcow2 image.
///
/// All methods take `&self`: share the image between tasks with an `Arc` (or a reference on a
/// single-threaded runtime). The type parameter is the [`Opener`] that made the image's file
/// and is used for its backing chain and data file; pick [`blockio::FileOpener`] for a tokio
/// runtime of any flavour, or `blockio::UringOpener` inside a tokio-uring runtime.
///
/// A writable image is locked as QEMU locks it (see [`ImageOptions::force_share`](crate::ImageOptions::force_share)): no other
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
    /// The header as read at open (its size and L1 fields change with a resize: the
    /// current ones are `size` and `meta.header`).
    pub(crate) header: Header,
    /// The virtual disk size: requests are checked against it on entry. A resize changes it
    /// under the metadata lock (see `Meta::disk_end` for the bound plans are checked against).
    pub(crate) size: AtomicU64,
    /// Serialises resizes (taken before the metadata lock, never under it).
    pub(crate) resizing: async_lock::Mutex<()>,
    pub(crate) geo: ClusterGeometry,
    pub(crate) read_only: bool,
    /// Each write is durable before it completes ([`crate::CacheMode::writes_through`]).
    pub(crate) write_through: bool,
    /// Lazy refcounts in use: refcount blocks are written only at close, under the dirty bit.
    pub(crate) lazy_refcounts: bool,
    pub(crate) backing: Option<Box<Disk<O>>>,
    pub(crate) meta: crate::meta::MetaLock,
    pub(crate) leases: LeaseTable,
    /// Whether the image looks like it was created with preallocation=metadata (computed on
    /// first use, as QEMU does, for block status).
    pub(crate) metadata_prealloc: async_lock::OnceCell<bool>,
    /// Requests and their backend operations in flight ([`crate::inflight`]): close waits
    /// until none is left.
    pub(crate) io: crate::inflight::Tracker,
    /// Metadata writes in flight: each waits until none is, and close too.
    pub(crate) meta_io: crate::inflight::Tracker,
    /// Guest changes in flight (writes, write-zeroes, discards): a snapshot operation holds
    /// it exclusively, so that none interleaves with it.
    pub(crate) writers: crate::inflight::Tracker,
    /// Acknowledged guest changes (writes, zeroings, discards), counted.
    pub(crate) acked: AtomicU64,
    /// `acked` as the last successful flush found it: what is not durable yet is the rest.
    pub(crate) flushed: AtomicU64,
    /// Set by a successful close: the drop has nothing to report.
    pub(crate) closed: std::sync::atomic::AtomicBool,
    /// The persistent bitmaps maintained while writing (read-write images with bitmaps).
    pub(crate) tracked: crate::lock::Lock<Option<crate::tracking::Bitmaps>>,
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
        let l1 = !meta.l1_dirty.is_empty() || meta.l1_switch.is_some();
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

impl<O: Opener> Image<O> {
    /// The path the image was opened with.
    pub fn path(&self) -> &Path {
        self.files.path()
    }

    /// The virtual disk size in bytes (as the last completed [`resize`](Image::resize)
    /// left it).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// The cluster geometry.
    pub fn geometry(&self) -> ClusterGeometry {
        self.geo
    }

    /// The header as read at open. A [`resize`](Image::resize) changes the size and may move
    /// the L1 table: [`Image::size`] is the size now. Snapshot operations
    /// ([`Image::snapshot_create`] and the others) change its snapshot fields on disk
    /// afterwards: [`Image::snapshots`] reads the table as it is now.
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

    /// What the persistent bitmaps work with (see [`crate::tracking::Ctx`]).
    pub(crate) fn bitmap_ctx(&self) -> crate::tracking::Ctx<'_, O::Backend> {
        crate::tracking::Ctx {
            store: self.store(),
            meta: &self.meta,
            header: &self.header,
            bitmaps: &self.tracked,
        }
    }

    /// The mapping layer of this image (see [`Mapper`]).
    pub(crate) fn mapper(&self) -> Mapper<'_, O::Backend> {
        Mapper {
            store: self.store(),
            version: self.header.version,
            backing: self.backing.is_some(),
            l1: None,
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

    /// The lease table: which clusters have I/O in flight (a test hook, with the `testing`
    /// feature).
    #[cfg(feature = "testing")]
    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }
}
