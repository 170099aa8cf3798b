//! Flush and close: metadata written back in the crash-safe order, the files flushed, freed
//! clusters punched under their exclusive leases (I3, I8); close first waits for whatever
//! dropped requests left in flight (I9). And the header changes due before the first write.

use crate::image::Image;
use crate::Result;
use blockio::{Backend, Keep, Opener};
use qcow2_alloc::ExclusiveLease;
use qcow2_format::{features, HostCluster};
use std::sync::atomic::Ordering;

impl<O: Opener> Image<O> {
    /// Makes every acknowledged write durable (I8): metadata written back in order, then the
    /// file flushed. Freed clusters are punched out of the file afterwards.
    ///
    /// A failed flush is never followed by a successful one on an image opened through the
    /// page cache (not `O_DIRECT`): the kernel may have dropped the writes the failed fsync
    /// covered, so every later flush (and [`Image::close`]) fails with EIO, as QEMU's do, and
    /// the image must be reopened; what it then holds is what a crash would have left.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the image consistent: the metadata written so far was
    /// written in the crash-safe order, what was not stays dirty in memory for the next
    /// flush, and a metadata write or punch-hole the backend accepted still completes (with
    /// the exclusive lease of the punched cluster held until then; the next write-back waits
    /// for such a metadata write before writing the same structures again). Nothing is made
    /// durable that a completed flush would not have made durable. If the dropped flush's
    /// fsync fails, the next flush reports it.
    pub async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let acked = self.acked.load(Ordering::Acquire);
        self.flush_inner().await?;
        self.flushed.fetch_max(acked, Ordering::AcqRel);
        Ok(())
    }

    async fn flush_inner(&self) -> Result<()> {
        if self
            .marked_corrupt
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // Metadata known to be inconsistent is not written back; data already written
            // is made durable.
            return self.files.sync().await;
        }
        let freed = {
            let mut meta = self.meta.lock().await;
            let (freed, synced) = self
                .store()
                .write_back_synced(&mut meta, !self.lazy_refcounts)
                .await?;
            if !synced {
                // Nothing to write back: the barrier for the guest data alone (I8).
                self.files.sync().await?;
            }
            freed
        };
        self.punch(freed).await;
        Ok(())
    }

    /// Deallocates freed clusters in the file, under their exclusive leases (so that none of
    /// them is handed out again before the hole is punched). Each lease goes with its punch
    /// (I9): dropped, this leaves the rest unpunched and their leases released.
    pub(crate) async fn punch(&self, freed: Vec<(HostCluster, ExclusiveLease)>) {
        let cs = self.cluster_size();
        for (c, lease) in freed {
            let keep = Keep::new((lease, self.io.token().await));
            // Punching is an optimisation: a failure leaves stale bytes in a free cluster.
            let _ = self
                .files
                .image()
                .punch_hole(self.geo.cluster_offset(c).0, cs, keep)
                .await;
        }
    }

    /// Flushes and closes the image: every metadata structure written, the dirty bit of lazy
    /// refcounts cleared.
    ///
    /// First waits until every backend operation that dropped requests left in flight has
    /// completed: nothing this image started lands in the file after `close` returns, and
    /// no cluster stays allocated for a write that never installed it.
    ///
    /// # Cancel safety
    ///
    /// The image is consumed either way. Dropping the future before it completes is dropping
    /// an image that was not closed: acknowledged writes since the last successful flush may
    /// be lost, and the drop reports it (see [`Image`]); what is on disk is consistent, as
    /// after a crash.
    pub async fn close(self) -> Result<()> {
        let r = self.close_inner().await;
        if r.is_ok() {
            self.closed.store(true, Ordering::Release);
        }
        r
    }

    async fn close_inner(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.io.idle().await;
        self.meta_io.idle().await;
        if self
            .marked_corrupt
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return self.files.sync().await;
        }
        if let Err(e) = self.bitmap_ctx().bitmaps_store().await {
            return Err(self.on_error(e).await);
        }
        self.make_clean().await?;
        self.flushed
            .store(self.acked.load(Ordering::Acquire), Ordering::Release);
        Ok(())
    }

    /// Resolves a `BitmapSwitch` a dropped store left: once no metadata write is in flight,
    /// the header on disk names the new directory (the old structures are freed, the header
    /// in memory becomes the new one) or not (the new clusters are given back).
    pub(crate) async fn finish_bitmap_switch(&self) -> Result<()> {
        let mut meta = self.meta.lock().await;
        let Some(s) = meta.bitmap_switch.take() else {
            return Ok(());
        };
        self.meta_io.idle().await;
        let on_disk =
            crate::meta::load::read_header(self.files.image(), self.path(), self.file_len()).await;
        let on_disk = match on_disk {
            Ok(h) => h,
            Err(e) => {
                meta.bitmap_switch = Some(s);
                return Err(e);
            }
        };
        let named = on_disk.bitmaps().map_or(0, |e| e.directory_offset);
        let geo = self.geo;
        let (header, free) = if named == s.directory_offset {
            let old = s
                .old
                .iter()
                .map(|&c| geo.host_cluster(qcow2_format::HostOffset(c)));
            (Some(s.header), old.collect::<Vec<_>>())
        } else {
            (None, s.new)
        };
        if let Some(h) = header {
            meta.header = h;
        }
        if let Some(alloc) = meta.alloc.as_mut() {
            for c in free {
                alloc.defer_decrement(c);
            }
        }
        Ok(())
    }

    /// Writes every metadata structure back, refcounts included (lazy or not), clears the
    /// dirty bit and makes it all durable: the image on disk is clean, as `close` leaves it
    /// (QEMU's `qcow2_mark_clean` after a full cache flush). The clusters freed on the way are
    /// punched afterwards.
    pub(crate) async fn make_clean(&self) -> Result<()> {
        // A bitmaps store dropped midway: its clusters, old or new, are freed below.
        self.finish_bitmap_switch().await?;
        let freed = {
            let mut meta = self.meta.lock().await;
            let mut freed = self.store().write_back_mode(&mut meta, true).await?;
            if meta.alloc.as_ref().is_some_and(|a| a.has_pending()) {
                // Decrements freed by the first pass (none can be in flight here).
                freed.extend(self.store().write_back_mode(&mut meta, true).await?);
            }
            if meta.header.is_dirty() {
                meta.header.incompatible_features &= !features::INCOMPAT_DIRTY;
                self.store().write_header(&meta.header).await?;
            }
            if let Some(alloc) = meta.alloc.as_ref() {
                self.files
                    .trim_growth(alloc.high_water() * self.cluster_size())
                    .await?;
            }
            self.files.sync().await?;
            freed
        };
        self.punch(freed).await;
        Ok(())
    }

    /// Before the first write: clears unknown autoclear bits (and the bitmaps bit when the
    /// bitmaps cannot be maintained), and marks the maintained bitmaps in use.
    pub(crate) async fn before_first_write(&self) -> Result<()> {
        let mut meta = self.meta.lock().await;
        if meta.first_write_done {
            drop(meta);
            // Cheap when done; repeats the bitmaps' in_use marking if it failed before.
            return self.bitmap_ctx().bitmaps_in_use().await;
        }
        let maintained = self.tracked.lock().await.is_some();
        let mut known = features::AUTOCLEAR_DATA_FILE_RAW;
        if maintained {
            known |= features::AUTOCLEAR_BITMAPS;
        }
        let keep = meta.header.autoclear_features & known;
        if meta.header.autoclear_features != keep {
            let mut header = meta.header.clone();
            header.autoclear_features = keep;
            self.store().write_header(&header).await?;
            self.files.sync().await?;
            // Only once the cleared bits are on disk: a failure is retried by the next write.
            meta.header = header;
        }
        meta.first_write_done = true;
        drop(meta);
        self.bitmap_ctx().bitmaps_in_use().await
    }
}
