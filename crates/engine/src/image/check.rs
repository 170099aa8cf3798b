//! The facade of the consistency check and repair (the work is in `crate::check`), and the
//! open that prepares an image for a repair.

use super::Image;
use crate::check::{CheckReport, RepairMode, Subject};
use crate::options::{FileRole, ImageOptions};
use crate::{Error, Result};
use blockio::{Backend, OpenOptions, Opener};
use std::path::Path;

impl<O: Opener> Image<O> {
    /// What the checker works on: the files, and the header as it is on disk now (a
    /// resize, a refcount table move or a snapshot operation may have changed it since the
    /// open).
    fn check_subject<'a>(&'a self, header: &'a qcow2_format::Header) -> Subject<'a, O::Backend> {
        Subject {
            files: &self.files,
            header,
            geo: self.geo,
            meta_io: &self.meta_io,
        }
    }

    /// Checks the image's metadata as `qemu-img check` does, without changing anything.
    ///
    /// Errors only when the check cannot start; a check that stops midway (an unreadable
    /// table, a bitmap directory that does not load) reports it in
    /// [`CheckReport::failure`].
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    pub async fn check(&self) -> Result<CheckReport> {
        let header = self.meta.lock().await.header.clone();
        crate::check::check(self.check_subject(&header)).await
    }

    /// Checks and repairs the image as `qemu-img check -r leaks|all` does, then checks it
    /// again if anything was fixed.
    ///
    /// Needs an image whose file is writable (see [`Image::open_for_repair`]); errors with
    /// [`Error::ReadOnly`] otherwise. Writes go straight to the image file in a crash-safe
    /// order (see the module documentation). The image must not be used for other I/O during
    /// the repair, and its cached metadata is stale afterwards: drop it and reopen the file.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the repair between two of its writes (a write the backend
    /// accepted still lands, before any later metadata write of this image): the image is
    /// then as a crash at that point would leave it, which the repair's order keeps no worse
    /// than before (refcount increases are on disk before any decrease; a rebuilt refcount
    /// structure takes effect in one small header write). Run it again to finish.
    pub async fn repair(&self, mode: RepairMode) -> Result<CheckReport> {
        if !self.files.image().is_writable() {
            return Err(Error::ReadOnly);
        }
        // Keep the engine's own request paths out while the metadata changes underneath.
        let mut meta = self.meta.lock().await;
        // A writable open clears the autoclear bits QEMU does not know (qcow2_do_open), and
        // `qemu-img check -r` opens the image writable.
        let unknown = meta.header.autoclear_features & !qcow2_format::features::AUTOCLEAR_KNOWN;
        if unknown != 0 {
            let mut header = meta.header.clone();
            header.autoclear_features &= !unknown;
            self.store().write_header(&header).await?;
            self.files.sync().await?;
            meta.header = header;
        }
        let header = meta.header.clone();
        let mut first = crate::check::repair_first(self.check_subject(&header), mode).await?;
        if let Some(rewrite) = first.snapshot_rewrite() {
            let outcome = self.rewrite_snapshot_table(&mut meta, rewrite).await;
            first.snapshot_table_rewritten(outcome);
        }
        first.finish().await
    }

    /// Rewrites the snapshot table for a repair (`qcow2_check_fix_snapshot_table`) with the
    /// snapshot module's writer, over refcounts loaded from the repaired file: the new table
    /// in new clusters, durable, then the header, then the old table freed. The image stays
    /// read-only for everything else (the allocator is dropped again).
    async fn rewrite_snapshot_table(
        &self,
        meta: &mut crate::meta::Meta,
        rewrite: crate::check::SnapshotRewrite,
    ) -> Result<()> {
        let file_len = self
            .files
            .image()
            .len()
            .await
            .map_err(|e| Error::io(format!("{}: size", self.path().display()), e))?;
        let alloc = crate::meta::load::load_allocator(
            self.files.image(),
            &rewrite.header,
            self.path(),
            file_len,
        )
        .await?;
        let saved = std::mem::replace(&mut meta.header, rewrite.header);
        meta.alloc = Some(alloc);
        let store = self.store();
        let outcome = match store
            .replace_snapshot_table(meta, &rewrite.snapshots, rewrite.old)
            .await
        {
            Ok(()) => store.write_back_mode(meta, true).await,
            Err(e) => Err(e),
        };
        meta.alloc = None;
        meta.header = saved;
        // The old table's clusters are discarded, as QEMU discards them.
        self.punch(outcome?).await;
        Ok(())
    }

    /// Opens an image for [`Image::repair`]: validated and opened like a read-only image
    /// (backing chain and data file too), but with the image file itself opened for writing.
    ///
    /// Unlike a read-write [`Image::open`], this accepts images with the dirty bit (lazy
    /// refcounts after a crash) or the corrupt bit set, as `qemu-img check -r` does. The image
    /// still counts as read-only for guest I/O: only the repair writes to it.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::open`]: dropping the future writes nothing.
    pub async fn open_for_repair(
        opener: O,
        path: impl AsRef<Path>,
        options: ImageOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        if options.force_share {
            return Err(Error::InvalidOptions(
                "force-share=on can only be used with read-only images".into(),
            ));
        }
        let direct = options.is_direct();
        // The image file gets the writer's locks on the descriptor that writes: the read-only
        // open below takes none on it (its lock would conflict with ours).
        let writer_lock = options
            .clone()
            .read_only(false)
            .lock_request(FileRole::Qcow2);
        let ro = ImageOptions {
            lock_image: false,
            ..options.read_only(true)
        };
        let mut img = Image::open(opener.clone(), path, ro).await?;
        let file = opener
            .open(
                path,
                OpenOptions {
                    write: true,
                    direct,
                    lock: writer_lock,
                    ..OpenOptions::default()
                },
            )
            .await
            .map_err(|source| crate::image::open_error("image", path, source))?;
        img.files.replace_image(file);
        Ok(img)
    }
}
