//! Changing the refcount width (`refcount_bits`), as QEMU's `qcow2_change_refcount_order`
//! does: a whole new refcount structure in new clusters, then one header write.
//!
//! 1. Before anything is written, every refcount must fit the new width (QEMU's message
//!    names the first cluster, by offset, whose count does not).
//! 2. The new table and blocks get clusters through the current refcounts, repeating until
//!    the structure counts every cluster in use, its own included
//!    ([`qcow2_alloc::Allocator::allocate_refcounts`]). A write-back makes those counts
//!    durable: a crash from here on leaves the new clusters leaked, no more.
//! 3. The new blocks and table, filled from the counts as they are now on disk, are written
//!    and made durable (a barrier) while nothing refers to them.
//! 4. The header's `refcount_table_offset`, `refcount_table_clusters` and `refcount_order`
//!    are rewritten in one write inside the first sector ([`Header::REFCOUNT_FIELDS`]), and
//!    synced: a crash leaves the old structure, valid, or the new one, valid, which counts
//!    the old table and blocks as leaked clusters. The header is version 3 by then (an
//!    upgrade is written first, as QEMU does it first).
//! 5. Only then does the allocator switch to the new structure, with deferred decrements of
//!    the old table and blocks, which the next write-back applies.

use super::Image;
use crate::error::AmendError;
use crate::meta::Meta;
use crate::{Error, Result};
use blockio::Opener;
use qcow2_alloc::{NewRefcounts, Refcounts};
use qcow2_format::{ClusterGeometry, Header, RefcountWidth};

/// A new refcount structure written to disk, not yet named by the header.
struct Built {
    new: NewRefcounts,
    rc: Refcounts,
}

impl Built {
    /// Sets the header's refcount fields to the new structure's.
    fn name_in(
        &self,
        header: &mut Header,
        geo: ClusterGeometry,
    ) -> std::result::Result<(), String> {
        header.refcount_order = self.new.width.order();
        header.refcount_table_offset = geo.cluster_offset(self.new.table).0;
        header.refcount_table_clusters = u32::try_from(self.new.table_clusters)
            .map_err(|_| "the new refcount table is too large".to_string())?;
        Ok(())
    }

    /// Once the header names it on disk: the allocator uses the new structure, and the old
    /// one's clusters wait as deferred decrements.
    fn switch(self, meta: &mut Meta, geo: ClusterGeometry) {
        if let Some(alloc) = meta.alloc.as_mut() {
            alloc.switch_refcounts(self.rc, geo.cluster_offset(self.new.table));
        }
    }
}

impl<O: Opener> Image<O> {
    /// Changes the refcount width of a clean version 3 image (steps 2 to 5).
    pub(super) async fn change_width(&self, width: RefcountWidth) -> Result<()> {
        let store = self.store();
        let mut meta = self.meta.lock().await;
        let built = self.build_refcounts(&mut meta, width).await?;
        let mut header = meta.header.clone();
        built
            .name_in(&mut header, self.geo)
            .map_err(|e| store.corrupt_err(e))?;
        store
            .write_header_fields(&header, Header::REFCOUNT_FIELDS)
            .await?;
        meta.barrier_owed = true;
        store.barrier(&mut meta).await?;
        meta.header = header;
        built.switch(&mut meta, self.geo);
        Ok(())
    }

    /// Refuses a width some refcount does not fit in, before anything is written.
    pub(super) async fn check_width(&self, width: RefcountWidth) -> Result<()> {
        let meta = self.meta.lock().await;
        let alloc = meta.alloc.as_ref().ok_or(Error::ReadOnly)?;
        let over = alloc
            .first_overflow(width)
            .map_err(|e| self.store().alloc_err(e))?;
        match over {
            None => Ok(()),
            Some((c, refcount)) => Err(Error::Amend(AmendError::RefcountOverflow {
                bits: u64::from(width.bits()),
                offset: self.geo.cluster_offset(c).0,
                refcount,
            })),
        }
    }

    /// Steps 2 and 3: the new structure allocated, counted durably, written and synced. On
    /// failure its clusters are given back (nothing refers to them).
    async fn build_refcounts(&self, meta: &mut Meta, width: RefcountWidth) -> Result<Built> {
        let new = self.store().allocate_refcounts(meta, width)?;
        match self.write_refcounts_of(meta, &new).await {
            Ok(rc) => Ok(Built { new, rc }),
            Err(e) => {
                if let Some(alloc) = meta.alloc.as_mut() {
                    // Best effort: the error that stopped us is the one to report.
                    let _ = alloc.release_refcounts(&new);
                }
                Err(e)
            }
        }
    }

    async fn write_refcounts_of(&self, meta: &mut Meta, new: &NewRefcounts) -> Result<Refcounts> {
        let store = self.store();
        // The current structure counts the new clusters, on disk (and whatever the
        // allocation created or moved of it).
        drop(store.write_back_mode(meta, true).await?);
        if meta.alloc.as_ref().is_some_and(|a| a.has_pending()) {
            drop(store.write_back_mode(meta, true).await?);
        }
        let alloc = meta.alloc.as_ref().ok_or(Error::ReadOnly)?;
        let rc = alloc
            .encode_refcounts(new)
            .map_err(|e| store.alloc_err(e))?;
        for (&t, &c) in &new.blocks {
            let block = rc.block(t).expect("encode_refcounts loads every block");
            store
                .write_meta(self.geo.cluster_offset(c).0, block)
                .await?;
        }
        let table: Vec<u8> = rc.table().iter().flat_map(|e| e.0.to_be_bytes()).collect();
        store
            .write_meta(self.geo.cluster_offset(new.table).0, &table)
            .await?;
        meta.barrier_owed = true;
        store.barrier(meta).await?;
        Ok(rc)
    }
}
