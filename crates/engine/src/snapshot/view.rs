//! Reading a snapshot without applying it.

use super::SnapshotLookup;
use crate::aligned::read_buf;
use crate::image::Image;
use crate::map::Mapper;
use crate::meta::SnapshotL1;
use crate::{ReadResult, Result};
use blockio::{IoBuf, Opener};
use qcow2_format::Snapshot;

/// A read-only view of an internal snapshot: the disk as it was when the snapshot was taken
/// (what `qemu-img convert -l` reads), beside the active layer, which stays as it is.
///
/// Reads go through the image's read path over the snapshot's L1 table: under the metadata
/// lock, each read first makes sure the snapshot still exists, maps its range and takes a
/// shared lease on every host cluster it reads (I2). A snapshot deleted meanwhile
/// ([`Image::snapshot_delete`]) keeps the clusters a read in flight holds until that read is
/// done; later reads fail with [`Error::SnapshotNotFound`](crate::Error::SnapshotNotFound).
/// Unallocated clusters read from the backing file, as the active layer's do.
pub struct SnapshotView<'a, O: Opener> {
    image: &'a Image<O>,
    snapshot: Snapshot,
    l1: SnapshotL1,
}

impl<O: Opener> Image<O> {
    /// A read-only view of the snapshot `which` (`qemu-img convert -l` looks it up by ID,
    /// then by name: [`SnapshotLookup::IdOrName`]). Works on images opened read-only too.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotNotFound`](crate::Error::SnapshotNotFound); a malformed snapshot
    /// table or L1 table; I/O errors.
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    pub async fn snapshot_view(&self, which: SnapshotLookup<'_>) -> Result<SnapshotView<'_, O>> {
        let meta = self.meta.lock().await;
        let (list, i) = self.find_snapshot(&meta, which).await?;
        let snapshot = list[i].clone();
        let l1 = self.store().snapshot_l1(&snapshot).await?;
        let l1 = SnapshotL1 {
            name: which.text().to_owned(),
            size: snapshot.disk_size.unwrap_or(self.size()),
            offset: snapshot.l1_table_offset,
            l1,
            seen: meta.snapshot_deletions.into(),
        };
        Ok(SnapshotView {
            image: self,
            snapshot,
            l1,
        })
    }
}

impl<O: Opener> SnapshotView<'_, O> {
    /// The snapshot's table entry.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The snapshot's virtual disk size (its recorded disk size, else the image's).
    pub fn size(&self) -> u64 {
        self.l1.size
    }

    /// Reads into the buffer's window from the snapshot's guest offset `offset`, and gives
    /// the buffer back; as [`Image::read_at`].
    ///
    /// # Cancel safety
    ///
    /// As [`Image::read_at`]: the shared leases of the clusters being read live until those
    /// reads complete, so no cluster is freed under them, even by a delete of the snapshot.
    pub async fn read_at(&self, buf: IoBuf, offset: u64) -> ReadResult {
        let range = buf.window();
        self.image
            .read_through(buf, range, offset, Some(&self.l1))
            .await
    }

    /// The status of `[offset, offset+len)` in the snapshot (cut at its end), in this image
    /// alone, as [`Image::block_status`] gives the active layer's: maximal runs of one
    /// kind with contiguous host offsets.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotNotFound`](crate::Error::SnapshotNotFound) when the snapshot was
    /// deleted meanwhile; a corrupt L1 or L2 entry; I/O errors.
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<crate::Extent>> {
        let len = len.min(self.size().saturating_sub(offset));
        let mut meta = self.image.meta.lock().await;
        if !self
            .image
            .store()
            .snapshot_live(&mut meta, &self.l1)
            .await?
        {
            return Err(crate::Error::SnapshotNotFound {
                path: self.image.path().to_path_buf(),
                name: self.l1.name.clone(),
            });
        }
        let mapper = Mapper {
            l1: Some(self.l1.l1.as_slice()),
            ..self.image.mapper()
        };
        mapper.block_status(&mut meta, offset, len).await
    }

    /// Reads `len` bytes at the snapshot's guest offset `offset` into a new buffer.
    ///
    /// # Errors
    ///
    /// As [`Image::read`]: [`Error::RequestTooLarge`](crate::Error::RequestTooLarge) for a
    /// length longer than any buffer, [`Error::OutOfRange`](crate::Error::OutOfRange) for a
    /// range past the snapshot's disk size, both before anything is allocated; then those
    /// of [`SnapshotView::read_at`].
    ///
    /// # Cancel safety
    ///
    /// As [`SnapshotView::read_at`].
    pub async fn read(&self, offset: u64, len: u64) -> Result<IoBuf> {
        let buf = read_buf(offset, len, Some(self.size()))?;
        let (res, buf) = self.read_at(buf, offset).await;
        res.map(|()| buf)
    }
}
