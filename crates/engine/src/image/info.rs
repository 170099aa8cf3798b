//! What an image says about itself beyond its header: its snapshots, its bitmaps' directory,
//! and whether it looks metadata-preallocated (for block status, as QEMU decides it).

use super::Image;
use crate::aligned::read_bytes;
use crate::meta::load;
use crate::{Error, Result};
use blockio::{Backend, Opener};

impl<O: Opener> Image<O> {
    /// The persistent dirty bitmaps' directory entries (empty without the bitmaps extension).
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    pub async fn bitmaps(&self) -> Result<Vec<qcow2_format::BitmapDirectoryEntry>> {
        // The header as it is now: a resize stores the bitmaps anew.
        let header = self.meta.lock().await.header.clone();
        load::read_bitmap_directory(self.files.image(), &header, self.file_len(), self.path()).await
    }

    /// The dirty extents of the persistent bitmap `name`: the guest byte ranges
    /// `(offset, length)` whose bits are set, adjacent granules merged, the last one clipped
    /// to the disk size. A bitmap this image maintains (enabled, in a read-write image) is
    /// answered from memory, with every write completed so far; any other from the file.
    ///
    /// # Errors
    ///
    /// [`Error::Bitmap`] when there is no bitmap `name` ("Dirty bitmap 'NAME' not found"), or
    /// when it is not maintained and marked in use on disk ("Bitmap 'NAME' is inconsistent
    /// and cannot be used", as QEMU refuses it) or of a kind this engine cannot read;
    /// [`Error::Corrupt`] / [`Error::Io`] when its table or data cannot be read.
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    pub async fn bitmap_dirty_extents(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        if let Some(b) = self.tracked.lock().await.as_ref() {
            if let Some(extents) = b.tracked_extents(name, self.size()) {
                return Ok(extents);
            }
        }
        let directory = self.bitmaps().await?;
        let Some(e) = directory.iter().find(|e| e.name == name) else {
            return Err(Error::Bitmap(format!("Dirty bitmap '{name}' not found")));
        };
        use qcow2_format::BitmapDirectoryEntry as D;
        if e.flags & D::IN_USE != 0 {
            return Err(Error::Bitmap(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            )));
        }
        if e.bitmap_type != D::TYPE_DIRTY_TRACKING
            || (!e.extra_data.is_empty() && e.flags & D::EXTRA_DATA_COMPATIBLE == 0)
        {
            return Err(Error::Bitmap(format!(
                "Bitmap '{name}' has a type or extra data this engine cannot read"
            )));
        }
        let data = crate::tracking::read_bitmap_data(
            self.files.image(),
            self.path(),
            e,
            self.cluster_size(),
            self.size(),
        )
        .await?;
        Ok(crate::tracking::dirty_extents(
            &data,
            u32::from(e.granularity_bits),
            self.size(),
        ))
    }

    /// Whether more clusters are in use than the file has blocks allocated: the sign of
    /// preallocated metadata, whose data clusters are holes in the file. QEMU decides the same
    /// way (and then asks the file whether a data cluster is a hole). Refcounts that cannot be
    /// read (a refcount block at an unaligned offset) answer no, as in QEMU's
    /// `qcow2_co_block_status`, which takes any failure of the detection as "not
    /// preallocated".
    pub(crate) async fn metadata_preallocated(&self) -> Result<bool> {
        self.metadata_prealloc
            .get_or_try_init(|| async {
                match self.detect_metadata_preallocation().await {
                    Err(e) if e.is_corruption() => Ok(false),
                    other => other,
                }
            })
            .await
            .copied()
    }

    async fn detect_metadata_preallocation(&self) -> Result<bool> {
        let cs = self.cluster_size();
        let allocated = self
            .files
            .image()
            .allocated_size()
            .await
            .map_err(|e| Error::io(format!("{}: allocated size", self.path().display()), e))?;
        let real_clusters = allocated / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = self.file_len().div_ceil(cs);
        let used = self.refcounts_until(end_cluster, threshold).await?;
        Ok(used >= threshold)
    }

    /// Counts clusters below `end` with a non-zero refcount, stopping at `limit`. A writable
    /// image counts in the allocator's refcounts (the table moves when it fills up, and its
    /// old clusters are reused: the header read at open may name a cluster of guest data by
    /// then); a read-only image's table stays where its header says.
    async fn refcounts_until(&self, end: u64, limit: u64) -> Result<u64> {
        {
            let meta = self.meta.lock().await;
            if let Some(alloc) = &meta.alloc {
                let mut used = 0;
                for c in 0..end {
                    if used >= limit {
                        break;
                    }
                    if alloc.get(qcow2_format::HostCluster(c)).unwrap_or(0) > 0 {
                        used += 1;
                    }
                }
                return Ok(used);
            }
        }
        let (table_offset, table_clusters) = (
            self.header.refcount_table_offset,
            self.header.refcount_table_clusters,
        );
        let h = &self.header;
        let cs = self.cluster_size();
        let table_len = u64::from(table_clusters) * cs;
        let raw = read_bytes(
            self.files.image(),
            table_offset,
            table_len,
            "refcount table",
        )
        .await?;
        let table = raw
            .chunks_exact(8)
            .map(|c| qcow2_format::ReftableEntry(u64::from_be_bytes(c.try_into().expect("8"))))
            .collect();
        let mut rc = qcow2_alloc::Refcounts::new(self.geo, h.refcount_width(), table);
        let per_block = rc.entries_per_block();
        let mut used = 0;
        let mut cluster = 0;
        while cluster < end && used < limit {
            let slot = rc.slot(qcow2_format::HostCluster(cluster));
            let block = rc
                .block_offset(slot.table_index)
                .map_err(|e| Error::Corrupt {
                    path: self.path().to_path_buf(),
                    what: format!("refcount table: {e}"),
                })?;
            let block_end = ((slot.table_index + 1) * per_block).min(end);
            let Some(block) = block else {
                cluster = block_end;
                continue;
            };
            if !rc.has_block(slot.table_index) {
                let bytes = read_bytes(self.files.image(), block.0, cs, "refcount block").await?;
                rc.insert_block(slot.table_index, bytes.to_vec());
            }
            while cluster < block_end && used < limit {
                let n = rc
                    .get(qcow2_format::HostCluster(cluster))
                    .map_err(|e| Error::Corrupt {
                        path: self.path().to_path_buf(),
                        what: format!("refcount: {e}"),
                    })?;
                if n > 0 {
                    used += 1;
                }
                cluster += 1;
            }
        }
        Ok(used)
    }
}
