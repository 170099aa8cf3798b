//! Internal snapshots, as QEMU's block/qcow2-snapshot.c makes them: create
//! ([`Image::snapshot_create`]), delete ([`Image::snapshot_delete`]), apply
//! ([`Image::snapshot_apply`]), and read without applying ([`Image::snapshot_view`]); the
//! list is [`Image::snapshots`].
//!
//! Refcounts count references per L1 table, as QEMU (and `qemu-img check`) count them: a
//! snapshot adds one reference to each L2 table and each data cluster its L1 table reaches.
//! The active layer writes in place only where COPIED is set (refcount 1) and copies what it
//! shares with a snapshot first, so a snapshot's tables and data never change while it
//! exists.
//!
//! Crash order (I4): a snapshot's L1 copy and the refcount increments are durable before
//! the snapshot table that names them, the table before the header that names it, and
//! whatever is unreferenced (the old table, a deleted snapshot's clusters, the clusters only
//! the old active tables reached) is given a *deferred* decrement once its unmapping is on
//! disk: the write-back frees a cluster only under its exclusive lease (I3), so a read in
//! flight through a snapshot being deleted keeps its clusters until it is done.

mod tree;
mod view;

pub use view::SnapshotView;

use crate::image::Image;
use crate::meta::Meta;
use crate::options::SnapshotOptions;
use crate::{Error, Result};
use blockio::Opener;
use qcow2_alloc::ExclusiveLease;
use qcow2_format::{HostCluster, L1Entry, Snapshot};

/// How a snapshot is looked up, as qemu-img does it for each command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotLookup<'a> {
    /// The first snapshot with this name (`qemu-img snapshot -d`, `bdrv_snapshot_find`).
    Name(&'a str),
    /// The snapshot with this ID (`qemu-img convert -l snapshot.id=ID`).
    Id(&'a str),
    /// The first snapshot with this ID, else the first with this name (`qemu-img snapshot
    /// -a`, `qemu-img convert -l`: `find_snapshot_by_id_or_name`).
    IdOrName(&'a str),
}

impl SnapshotLookup<'_> {
    fn text(&self) -> &str {
        match self {
            Self::Name(s) | Self::Id(s) | Self::IdOrName(s) => s,
        }
    }

    /// The index of the snapshot in `list`.
    fn find(&self, list: &[Snapshot]) -> Option<usize> {
        let by_name = |n: &str| list.iter().position(|s| s.name == n);
        match *self {
            Self::Name(n) => by_name(n),
            Self::Id(i) => list.iter().position(|x| x.id == i),
            Self::IdOrName(s) => list.iter().position(|x| x.id == s).or_else(|| by_name(s)),
        }
    }
}

/// QEMU's `find_new_snapshot_id`: one more than the largest ID read as a number.
fn next_id(list: &[Snapshot]) -> String {
    let max = list
        .iter()
        .map(|s| leading_number(&s.id))
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

/// `strtoul(s, NULL, 10)`: the leading decimal digits (0 without any).
fn leading_number(s: &str) -> u64 {
    let digits: String = s
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if digits.is_empty() {
        0
    } else {
        digits.parse().unwrap_or(u64::MAX)
    }
}

type Freed = Vec<(HostCluster, ExclusiveLease)>;

impl<O: Opener> Image<O> {
    /// The internal snapshots, read from the snapshot table.
    ///
    /// # Errors
    ///
    /// I/O errors, and a malformed snapshot table ([`Error::Format`]).
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    pub async fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let meta = self.meta.lock().await;
        self.store().snapshot_table(&meta).await
    }

    /// Creates an internal snapshot of the active layer named `name`, as `qemu-img snapshot
    /// -c` does: the ID is one more than the largest (QEMU's `find_new_snapshot_id`), the
    /// date is the wall clock (microseconds), the VM clock, VM state size and icount are 0,
    /// the disk size is the image's, with QEMU 10's 24 bytes of extra data. Names need not be
    /// unique (QEMU does not ask either).
    ///
    /// Waits until no guest write, write-zeroes or discard is in flight (and keeps new ones
    /// waiting until it is done), and for the I/O of dropped requests to land, so that the
    /// snapshot holds exactly the writes acknowledged before it; reads go on meanwhile.
    /// Then, under the metadata lock: every dirty structure written back; the active L1
    /// table copied to new clusters; one reference added to every cluster the active tables
    /// reach and COPIED cleared where they are now shared; refcounts, then the tables,
    /// written and synced; the snapshot table rewritten to new clusters and synced; the
    /// header pointed at it (synced); the old table freed.
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`]; [`Error::Unsupported`] for images with an external data file (as
    /// QEMU); [`Error::MarkedCorrupt`]; [`Error::RefcountOverflow`] when a count would not
    /// fit the refcount width (checked before anything changes); I/O errors. A failure after the
    /// refcounts were raised leaves leaked clusters, never a corrupt image.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the file consistent at every step (the order above): at
    /// worst clusters leak, and the snapshot exists only if the header write landed. The
    /// in-memory changes that must go together (a refcount and its COPIED flags) are made
    /// in one step, so the next write-back completes them consistently
    /// (crates/engine/tests/snapshot_cancel.rs drops each operation after every write).
    pub async fn snapshot_create(&self, name: &str) -> Result<Snapshot> {
        self.snapshot_create_with(name, SnapshotOptions::new())
            .await
    }

    /// [`Image::snapshot_create`] with the VM state and clock of `options` recorded, as
    /// QEMU's `savevm` does: the snapshot takes the VM state area (written beforehand with
    /// [`Image::vm_state_write_at`]) with the rest of the active L1 table, and its first
    /// `vm_state_size` bytes are then discarded from the active image (QEMU's
    /// `qcow2_snapshot_create`: they belong to the snapshot).
    ///
    /// # Errors
    ///
    /// As [`Image::snapshot_create`].
    ///
    /// # Cancel safety
    ///
    /// As [`Image::snapshot_create`]; a drop after the snapshot was written leaves the VM
    /// state in the active image too (shared, still consistent).
    pub async fn snapshot_create_with(
        &self,
        name: &str,
        options: SnapshotOptions,
    ) -> Result<Snapshot> {
        self.snapshot_writable()?;
        self.before_first_write().await?;
        let _quiet = self.writers.exclusive().await;
        self.io.idle().await;
        let (snapshot, freed) = {
            let mut meta = self.meta.lock().await;
            self.create_locked(&mut meta, name, options).await?
        };
        self.punch(freed).await;
        if options.vm_state_size > 0 {
            self.vm_state_discard(options.vm_state_size).await?;
        }
        Ok(snapshot)
    }

    fn snapshot_writable(&self) -> Result<()> {
        self.check_writable(0, 0)?;
        if self.files.data().is_some() {
            return Err(Error::Unsupported {
                path: self.path().to_path_buf(),
                what: "internal snapshots of an image with an external data file".into(),
            });
        }
        Ok(())
    }

    async fn create_locked(
        &self,
        meta: &mut Meta,
        name: &str,
        options: SnapshotOptions,
    ) -> Result<(Snapshot, Freed)> {
        let store = self.store();
        let geo = self.geo;
        let mut freed = store.write_back_mode(meta, true).await?;
        let mut list = store.snapshot_table(meta).await?;
        let l1 = meta.l1.clone();
        // One more reference from the new L1 table to everything the active one reaches
        // (checked to fit first), and COPIED cleared where it is now shared: both in memory
        // in one step (the tables were just loaded, so nothing waits between them and a
        // dropped future cannot leave one without the other).
        let clusters = self.tree_clusters(meta, &l1).await?;
        self.increment_all(meta, &clusters)?;
        self.fix_copied(meta, &[]).await?;
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.0.to_be_bytes()).collect();
        let l1_offset = if l1_bytes.is_empty() {
            0
        } else {
            let a = store.allocate(meta, (l1_bytes.len() as u64).div_ceil(geo.cluster_size()))?;
            let off = geo.cluster_offset(a.first).0;
            store.write_meta(off, &l1_bytes).await?;
            meta.metadata.add_range(&geo, off, l1_bytes.len() as u64);
            off
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let snapshot = Snapshot {
            l1_table_offset: l1_offset,
            l1_size: meta.header.l1_size,
            id: next_id(&list),
            name: name.to_owned(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: options.vm_clock_nsec,
            vm_state_size: options.vm_state_size,
            disk_size: Some(self.size()),
            icount: Some(0),
            extra_data: vec![0; 24],
        };
        // Refcounts (and the L1 copy) durable, then the COPIED changes.
        freed.extend(store.write_back_mode(meta, true).await?);
        list.push(snapshot.clone());
        store.write_snapshot_table(meta, &list).await?;
        freed.extend(store.write_back_mode(meta, true).await?);
        Ok((snapshot, freed))
    }

    /// Deletes the snapshot `which` (`qemu-img snapshot -d` looks it up by name:
    /// [`SnapshotLookup::Name`]) and returns it, as QEMU's `qcow2_snapshot_delete` does:
    /// the snapshot table is rewritten without it (and the header pointed at the new table,
    /// synced); then one reference is dropped from each cluster its L1 table reaches and
    /// from the L1 table itself, through the deferred decrements (I3, I4): a cluster that only
    /// the snapshot reached is freed under its exclusive lease, so a read of the snapshot in
    /// flight ([`SnapshotView`]) keeps it until the read is done (a later write-back frees
    /// it). COPIED is then set on the active entries whose refcount came back to 1.
    ///
    /// Guest writes are held off as by [`Image::snapshot_create`]; reads go on.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotNotFound`]; as [`Image::snapshot_create`] otherwise. A failure after
    /// the table was rewritten leaks the snapshot's clusters (as QEMU).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::snapshot_create`]: the snapshot is gone only if the header write landed;
    /// a drop after it leaks what was not freed yet.
    pub async fn snapshot_delete(&self, which: SnapshotLookup<'_>) -> Result<Snapshot> {
        self.snapshot_writable()?;
        self.before_first_write().await?;
        let _quiet = self.writers.exclusive().await;
        let (snapshot, freed) = {
            let mut meta = self.meta.lock().await;
            self.delete_locked(&mut meta, which).await?
        };
        self.punch(freed).await;
        Ok(snapshot)
    }

    async fn find_snapshot(
        &self,
        meta: &Meta,
        which: SnapshotLookup<'_>,
    ) -> Result<(Vec<Snapshot>, usize)> {
        let list = self.store().snapshot_table(meta).await?;
        match which.find(&list) {
            Some(i) => Ok((list, i)),
            None => Err(Error::SnapshotNotFound {
                path: self.path().to_path_buf(),
                name: which.text().to_owned(),
            }),
        }
    }

    async fn delete_locked(
        &self,
        meta: &mut Meta,
        which: SnapshotLookup<'_>,
    ) -> Result<(Snapshot, Freed)> {
        let store = self.store();
        let geo = self.geo;
        let mut freed = store.write_back_mode(meta, true).await?;
        let (mut list, i) = self.find_snapshot(meta, which).await?;
        let snapshot = list.remove(i);
        let l1 = store.snapshot_l1(&snapshot).await?;
        // Read (and checked) before anything changes; the active tables loaded too, so that
        // the decrements and the COPIED flags change in one step below.
        let mut clusters = self.tree_clusters(meta, &l1).await?;
        self.tree_clusters(meta, &meta.l1.clone()).await?;
        store.write_snapshot_table(meta, &list).await?;
        // Unreachable now, on disk: readers of the snapshot look again before planning.
        meta.snapshot_deletions += 1;
        let l1_len = u64::from(snapshot.l1_size) * 8;
        if l1_len > 0 {
            meta.metadata
                .remove_range(&geo, snapshot.l1_table_offset, l1_len);
            let first = snapshot.l1_table_offset >> geo.cluster_bits();
            clusters.extend(
                (first..(snapshot.l1_table_offset + l1_len).div_ceil(geo.cluster_size()))
                    .map(HostCluster),
            );
        }
        let alloc = meta.alloc.as_mut().ok_or(Error::ReadOnly)?;
        for &c in &clusters {
            alloc.defer_decrement(c);
        }
        self.fix_copied(meta, &clusters).await?;
        freed.extend(store.write_back_mode(meta, true).await?);
        Ok((snapshot, freed))
    }

    /// Makes the snapshot `which` the active layer again (`qemu-img snapshot -a`, which
    /// looks it up by ID, then by name: [`SnapshotLookup::IdOrName`]), as QEMU's
    /// `qcow2_snapshot_goto` does: one reference added to everything the snapshot's L1 table
    /// reaches, made durable; the active L1 table overwritten with the snapshot's (synced);
    /// then one reference dropped, deferred (I3, I4), from everything the old active tables
    /// reached; COPIED set from the refcounts. The snapshot stays.
    ///
    /// Guest writes are held off, and dropped requests' I/O waited for, as by
    /// [`Image::snapshot_create`].
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotNotFound`]; [`Error::Unsupported`] for a snapshot of another disk
    /// size or with a larger L1 table (QEMU 10 resizes the disk); as
    /// [`Image::snapshot_create`] otherwise.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::snapshot_create`]: the active layer is the snapshot's only if the L1
    /// write landed; either way the refcounts never under-count.
    pub async fn snapshot_apply(&self, which: SnapshotLookup<'_>) -> Result<Snapshot> {
        self.snapshot_writable()?;
        self.before_first_write().await?;
        let _quiet = self.writers.exclusive().await;
        self.io.idle().await;
        let (snapshot, freed) = {
            let mut meta = self.meta.lock().await;
            self.apply_locked(&mut meta, which).await?
        };
        self.punch(freed).await;
        Ok(snapshot)
    }

    async fn apply_locked(
        &self,
        meta: &mut Meta,
        which: SnapshotLookup<'_>,
    ) -> Result<(Snapshot, Freed)> {
        let store = self.store();
        let geo = self.geo;
        let mut freed = store.write_back_mode(meta, true).await?;
        let (list, i) = self.find_snapshot(meta, which).await?;
        let snapshot = list[i].clone();
        if snapshot.disk_size.unwrap_or(self.size()) != self.size()
            || snapshot.l1_size > meta.header.l1_size
        {
            return Err(Error::Unsupported {
                path: self.path().to_path_buf(),
                what: "applying a snapshot of another disk size".into(),
            });
        }
        let mut l1 = store.snapshot_l1(&snapshot).await?;
        l1.resize(meta.l1.len(), L1Entry(0));
        // Every L2 table is shared with the snapshot from now on: written without COPIED, so
        // that no crash before the COPIED pass leaves one writable in place (QEMU writes the
        // snapshot's flags as they are).
        for e in &mut l1 {
            e.0 &= !L1Entry::COPIED;
        }
        let old = self.tree_clusters(meta, &meta.l1.clone()).await?;
        let new = self.tree_clusters(meta, &l1).await?;
        self.increment_all(meta, &new)?;
        freed.extend(store.write_back_mode(meta, true).await?);
        let bytes: Vec<u8> = l1.iter().flat_map(|e| e.0.to_be_bytes()).collect();
        store
            .write_meta(meta.header.l1_table_offset, &bytes)
            .await?;
        meta.barrier_owed = true;
        store.barrier(meta).await?;
        meta.metadata.l2 = l1
            .iter()
            .filter_map(|e| e.l2_offset(&geo).ok().flatten())
            .map(|o| o.0 >> geo.cluster_bits())
            .collect();
        meta.l1 = l1;
        meta.l1_dirty.clear();
        let alloc = meta.alloc.as_mut().ok_or(Error::ReadOnly)?;
        for &c in &old {
            alloc.defer_decrement(c);
        }
        self.fix_copied(meta, &old).await?;
        freed.extend(store.write_back_mode(meta, true).await?);
        Ok((snapshot, freed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, name: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 0,
            l1_size: 0,
            id: id.into(),
            name: name.into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: None,
            icount: None,
            extra_data: Vec::new(),
        }
    }

    #[test]
    fn ids_and_lookups_follow_qemu() {
        let list = vec![snap("1", "a"), snap("7x", "1"), snap("3", "b")];
        assert_eq!(next_id(&list), "8");
        assert_eq!(next_id(&[]), "1");
        assert_eq!(next_id(&[snap("abc", "x")]), "1");
        assert_eq!(SnapshotLookup::IdOrName("1").find(&list), Some(0));
        assert_eq!(SnapshotLookup::Name("1").find(&list), Some(1));
        assert_eq!(SnapshotLookup::IdOrName("b").find(&list), Some(2));
        assert_eq!(SnapshotLookup::Name("3").find(&list), None);
    }
}
