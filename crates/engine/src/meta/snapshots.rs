//! The snapshot table as the metadata store reads and rewrites it, and the check a reader of
//! a snapshot makes that its snapshot still exists.

use super::{load, Meta, SnapshotL1, Store};
use crate::aligned::read_bytes;
use crate::{Error, Result};
use blockio::Backend;
use qcow2_format::{HostCluster, L1Entry, Snapshot};
use std::sync::atomic::Ordering;

impl<B: Backend> Store<'_, B> {
    /// The snapshot table the header in `meta` names.
    pub(crate) async fn snapshot_table(&self, meta: &Meta) -> Result<Vec<Snapshot>> {
        load::read_snapshot_table(self.files.image(), &meta.header, self.files.len())
            .await?
            .map_err(|source| Error::Format {
                path: self.files.path().to_path_buf(),
                source,
            })
    }

    /// Reads the L1 table of `snapshot`.
    pub(crate) async fn snapshot_l1(&self, snapshot: &Snapshot) -> Result<Vec<L1Entry>> {
        let len = u64::from(snapshot.l1_size) * 8;
        if snapshot.l1_table_offset.saturating_add(len) > self.files.len()
            || snapshot.l1_table_offset % self.geo.cluster_size() != 0
        {
            return Err(self.corrupt_err(format!(
                "the L1 table of snapshot '{}' at {:#x} is misaligned or past the end of the file",
                snapshot.id, snapshot.l1_table_offset
            )));
        }
        let bytes = read_bytes(
            self.files.image(),
            snapshot.l1_table_offset,
            len,
            "snapshot L1 table",
        )
        .await?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| L1Entry(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
            .collect())
    }

    /// Whether the snapshot `view` reads is still in the table (checked again only after a
    /// snapshot was deleted: a snapshot with the same L1 table, at the same place, with the
    /// same entries, maps every guest cluster as it did).
    pub(crate) async fn snapshot_live(&self, meta: &mut Meta, view: &SnapshotL1) -> Result<bool> {
        if view.seen.load(Ordering::Acquire) == meta.snapshot_deletions {
            return Ok(true);
        }
        for s in self.snapshot_table(meta).await? {
            if s.l1_table_offset == view.offset
                && s.l1_size as usize == view.l1.len()
                && self.snapshot_l1(&s).await? == view.l1
            {
                view.seen.store(meta.snapshot_deletions, Ordering::Release);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Replaces the snapshot table by `snapshots`, as QEMU's `qcow2_write_snapshots` does:
    /// the new table goes to new clusters, their refcounts and the table are made durable,
    /// then the header names the new table (one write, synced); the old table's clusters are
    /// only then given a deferred decrement (freed by the next write-back).
    pub(crate) async fn write_snapshot_table(
        &self,
        meta: &mut Meta,
        snapshots: &[Snapshot],
    ) -> Result<()> {
        let old_list = self.snapshot_table(meta).await?;
        let old_len: u64 = old_list.iter().map(|s| s.serialized_len() as u64).sum();
        let old = (meta.header.snapshots_offset, old_len);
        self.replace_snapshot_table(meta, snapshots, old).await
    }

    /// [`Store::write_snapshot_table`] with the old table's extent (offset, bytes) given:
    /// for a repair, whose old table may not parse.
    pub(crate) async fn replace_snapshot_table(
        &self,
        meta: &mut Meta,
        snapshots: &[Snapshot],
        old: (u64, u64),
    ) -> Result<()> {
        let geo = self.geo;
        let bytes = Snapshot::try_serialize_table(snapshots)
            .map_err(|e| self.corrupt_err(format!("the snapshot table: {e}")))?;
        let offset = if bytes.is_empty() {
            0
        } else {
            let count = (bytes.len() as u64).div_ceil(geo.cluster_size());
            let a = self.allocate(meta, count)?;
            let offset = geo.cluster_offset(a.first).0;
            self.write_meta(offset, &bytes).await?;
            meta.metadata.add_range(&geo, offset, bytes.len() as u64);
            offset
        };
        // The table's refcounts and the table itself before the header names it.
        self.write_refcounts(meta).await?;
        meta.barrier_owed = true;
        self.barrier(meta).await?;
        let mut header = meta.header.clone();
        header.nb_snapshots = u32::try_from(snapshots.len()).expect("checked by serialize");
        header.snapshots_offset = offset;
        self.write_header(&header).await?;
        meta.barrier_owed = true;
        self.barrier(meta).await?;
        meta.header = header;
        let old_len = old.1;
        if old_len > 0 {
            meta.metadata.remove_range(&geo, old.0, old_len);
            let alloc = meta.alloc.as_mut().ok_or(Error::ReadOnly)?;
            let first = old.0 >> geo.cluster_bits();
            for c in first..(old.0 + old_len).div_ceil(geo.cluster_size()) {
                alloc.defer_decrement(HostCluster(c));
            }
        }
        Ok(())
    }
}
