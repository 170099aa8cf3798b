//! The walk over the metadata: every L1, L2, snapshot and bitmap table, each reference
//! counted in the in-memory refcount table, and the checks of each entry on the way.

use super::*;

impl<B: Backend> Checker<'_, B> {
    pub(super) async fn run(&mut self, fix: Fix) {
        // The snapshot table (qcow2_check_read_snapshot_table).
        let rewrite = match self.read_snapshot_table(fix).await {
            Ok(n) => n,
            Err(Abort(why)) => {
                self.failure = Some(why);
                return;
            }
        };
        if let Err(Abort(why)) = self.check_refcounts(fix).await {
            self.failure = Some(why);
            return;
        }
        self.res.corruptions += rewrite;
        if !fix.errors {
            // Only a repair rewrites the table; a dirty image's open does not.
            self.res.unrepairable += rewrite;
        } else if rewrite > 0 {
            // qcow2_check_fix_snapshot_table: the table is rewritten with an allocator
            // (`Image::repair`), then `finish` completes the pass.
            self.snapshot_rewrite = rewrite;
            return;
        }
        self.finish(fix).await;
    }

    /// The end of a pass: the dirty and corrupt bits cleared after a repair that left no
    /// corruption.
    pub(super) async fn finish(&mut self, fix: Fix) {
        if fix.any() && self.res.check_errors == 0 && self.res.corruptions == 0 {
            if let Err(Abort(why)) = self.mark_clean_and_consistent().await {
                self.failure = Some(why);
            }
        }
    }

    /// QEMU's qcow2_check_refcounts.
    pub(super) async fn check_refcounts(&mut self, fix: Fix) -> Step {
        let nb_clusters = self.file_len.div_ceil(self.cs);
        if nb_clusters > MAX_CHECK_CLUSTERS {
            self.res.check_errors += 1;
            return Err(Abort(EFBIG.into()));
        }
        let disk_size = self.img.header.size / 512 * 512;
        self.res.total_clusters = disk_size.div_ceil(self.cs);

        let mut imrt = Imrt::new(self.width, self.cs);
        if imrt.resize(nb_clusters).is_err() {
            self.res.check_errors += 1;
            return Err(Abort(ENOMEM.into()));
        }
        let mut rebuild = false;
        self.calculate_refcounts(fix, &mut rebuild, &mut imrt)
            .await?;

        let pre_compare = self.res;
        let mut highest = self
            .compare_refcounts(Fix::NONE, &mut rebuild, &imrt)
            .await?;

        if rebuild && fix.errors {
            let old = self.res;
            self.msg("Rebuilding refcount structure".into());
            self.rebuild_refcount_structure(&mut imrt).await?;
            self.res.corruptions = 0;
            self.res.unrepairable = 0;
            self.res.leaks = 0;
            rebuild = false;
            imrt.clear();
            self.calculate_refcounts(Fix::NONE, &mut rebuild, &mut imrt)
                .await?;
            let mut fresh_leaks = 0;
            if fix.leaks {
                // The old structure is now leaked: free it. Only leaks left over from this
                // count (they were made by the rebuild).
                let saved = self.res;
                self.res = Counts::default();
                highest = self
                    .compare_refcounts(Fix::LEAKS, &mut rebuild, &imrt)
                    .await?;
                if rebuild {
                    self.msg("ERROR rebuilt refcount structure is still broken".into());
                }
                fresh_leaks = self.res.leaks;
                self.res = saved;
            }
            if self.res.corruptions < old.corruptions {
                self.res.corruptions_fixed += old.corruptions - self.res.corruptions;
            }
            if self.res.leaks < old.leaks {
                self.res.leaks_fixed += old.leaks - self.res.leaks;
            }
            self.res.leaks += fresh_leaks;
        } else if fix.any() {
            if rebuild {
                self.msg("ERROR need to rebuild refcount structures".into());
                self.res.check_errors += 1;
                return Err(Abort(EIO.into()));
            }
            if self.res.leaks > 0 || self.res.corruptions > 0 {
                self.res = pre_compare;
                highest = self.compare_refcounts(fix, &mut rebuild, &imrt).await?;
            }
        }

        self.check_oflag_copied(fix).await?;
        self.res.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }

    /// Adds one reference to every cluster `[offset, offset+size)` touches
    /// (qcow2_inc_refcounts_imrt).
    pub(super) fn inc_refs(&mut self, imrt: &mut Imrt, offset: u64, size: u64) -> Step {
        if size == 0 {
            return Ok(());
        }
        // The last cluster may be partly past the end of the file, not more.
        let end = u128::from(offset) + u128::from(size);
        if end >= u128::from(self.file_len) + u128::from(self.cs) {
            msg!(
                self,
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            );
            self.unfixable();
            return Ok(());
        }
        let bits = self.cluster_bits();
        let first = offset >> bits;
        let last = (offset + size - 1) >> bits;
        for k in first..=last {
            if k >= imrt.len && imrt.resize(k + 1).is_err() {
                self.res.check_errors += 1;
                return Err(Abort(ENOMEM.into()));
            }
            let refcount = imrt.get(k);
            if refcount == self.width.max() {
                msg!(self, "ERROR: overflow cluster offset={:#x}", k << bits);
                self.msg(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img \
                     convert to create a clean copy if the image cannot be opened for writing"
                        .into(),
                );
                self.unfixable();
                continue;
            }
            imrt.set(k, refcount + 1);
        }
        Ok(())
    }

    /// Counts a reference from metadata to a metadata structure of `role` (see
    /// [`Checker::inc_refs`]), remembering the role of its clusters inside the file.
    pub(super) fn inc_meta(&mut self, imrt: &mut Imrt, role: Role, offset: u64, size: u64) -> Step {
        self.inc_refs(imrt, offset, size)?;
        if size == 0 || offset >= self.file_len {
            return Ok(());
        }
        let bits = self.cluster_bits();
        let last = (offset.saturating_add(size - 1)).min(self.file_len - 1) >> bits;
        for c in (offset >> bits)..=last {
            let (r, n) = self.roles.entry(c).or_insert((role, 0));
            if *r == role {
                *n += 1;
            } else {
                // One cluster, two kinds of metadata: whatever a repair writes to one
                // destroys the other.
                self.res.unrepairable += 1;
            }
        }
        Ok(())
    }

    /// Counts as unrepairable every metadata cluster that is referenced as data too (more
    /// references than its metadata role accounts for): a repair would count it twice and
    /// leave both uses writing over each other. `qemu-img check` sees only a refcount below
    /// its references, so nothing is reported.
    pub(super) fn metadata_used_as_data(&mut self, imrt: &Imrt) {
        let shared = self
            .roles
            .iter()
            .filter(|(&c, &(_, n))| imrt.get(c) > n)
            .count();
        self.res.unrepairable += shared as u64;
    }

    /// Counts every structure (QEMU's calculate_refcounts).
    pub(super) async fn calculate_refcounts(
        &mut self,
        fix: Fix,
        rebuild: &mut bool,
        imrt: &mut Imrt,
    ) -> Step {
        self.roles.clear();
        // Header.
        self.inc_meta(imrt, Role::Header, 0, self.cs)?;

        // The active L1 table and everything below it.
        let (l1_offset, l1_size) = (self.header.l1_table_offset, self.header.l1_size);
        self.check_l1(imrt, l1_offset, l1_size, true, fix, true)
            .await?;

        // Snapshots.
        let snapshots = self.snapshots.clone().unwrap_or_default();
        if self.data_file && !snapshots.is_empty() {
            msg!(
                self,
                "ERROR {} snapshots in image with data file",
                snapshots.len()
            );
            self.unfixable();
        }
        for sn in &snapshots {
            self.corruption_limit()?;
            if !self.is_aligned(sn.l1_table_offset) {
                msg!(
                    self,
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    hash_x(sn.l1_table_offset)
                );
                self.unfixable();
                continue;
            }
            if u64::from(sn.l1_size) > qcow2_format::limits::MAX_L1_ENTRIES {
                msg!(
                    self,
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot \
                     table entry corrupted",
                    sn.id,
                    sn.name,
                    hash_x(u64::from(sn.l1_size))
                );
                self.unfixable();
                continue;
            }
            self.check_l1(imrt, sn.l1_table_offset, sn.l1_size, false, fix, false)
                .await?;
        }
        let table_size = self.snapshots_size;
        self.inc_meta(
            imrt,
            Role::SnapshotTable,
            self.header.snapshots_offset,
            table_size,
        )?;

        // Refcount table.
        let rt_offset = self.header.refcount_table_offset;
        let rt_bytes = self.reftable.len() as u64 * 8;
        self.inc_meta(imrt, Role::Reftable, rt_offset, rt_bytes)?;

        // Bitmaps.
        self.check_bitmaps(imrt).await?;

        self.check_refblocks(fix, rebuild, imrt).await?;
        self.metadata_used_as_data(imrt);
        Ok(())
    }

    /// One L1 table, its L2 tables and what they map (check_refcounts_l1).
    pub(super) async fn check_l1(
        &mut self,
        imrt: &mut Imrt,
        l1_offset: u64,
        l1_size: u32,
        frag_info: bool,
        fix: Fix,
        active: bool,
    ) -> Step {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = u64::from(l1_size) * 8;
        self.inc_meta(imrt, Role::L1, l1_offset, bytes)?;
        // Entries past the end of the file read as 0 (unallocated): only read what is there,
        // so that a table pointing outside the file costs nothing.
        let in_file = self
            .file_len
            .saturating_sub(l1_offset)
            .div_ceil(8)
            .min(u64::from(l1_size));
        if in_file == 0 {
            return Ok(());
        }
        let table =
            match read_bytes(self.img.files.image(), l1_offset, in_file * 8, "L1 table").await {
                Ok(t) => t,
                Err(e) => {
                    self.msg("ERROR: I/O error in check_refcounts_l1".into());
                    self.res.check_errors += 1;
                    return Err(e.into());
                }
            };
        // No valid L1 table names more L2 tables inside the file than it has clusters (those
        // past its end read as zeros and are not walked): the bound on the work of the walk.
        let max_tables = self.file_len.div_ceil(self.cs).max(1);
        let mut walked = 0u64;
        for i in 0..in_file as usize {
            let entry = L1Entry::read(&table, i);
            if entry.0 == 0 {
                continue;
            }
            self.corruption_limit()?;
            if entry.0 & L1Entry::RESERVED_MASK != 0 {
                msg!(
                    self,
                    "ERROR found L1 entry with reserved bits set: {:x}",
                    entry.0
                );
                self.unfixable();
            }
            let l2_offset = entry.raw_offset();
            self.inc_meta(imrt, Role::L2, l2_offset, self.cs)?;
            if !self.is_aligned(l2_offset) {
                msg!(
                    self,
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry \
                     corrupted"
                );
                self.unfixable();
            }
            if l2_offset < self.file_len {
                walked += 1;
                if walked > max_tables {
                    return Err(self.give_up(CheckLimit::L2Tables(max_tables)));
                }
            }
            self.check_l2(imrt, l2_offset, frag_info, fix, active)
                .await?;
        }
        self.corruption_limit()
    }

    /// One L2 table (check_refcounts_l2).
    pub(super) async fn check_l2(
        &mut self,
        imrt: &mut Imrt,
        l2_offset: u64,
        frag_info: bool,
        fix: Fix,
        active: bool,
    ) -> Step {
        if l2_offset >= self.file_len {
            // Reads as zeros: unallocated entries, nothing to count or check.
            return Ok(());
        }
        let mut table =
            match read_bytes(self.img.files.image(), l2_offset, self.cs, "L2 table").await {
                Ok(t) => t,
                Err(e) => {
                    self.msg("ERROR: I/O error in check_refcounts_l2".into());
                    self.res.check_errors += 1;
                    return Err(e.into());
                }
            };
        let mut fixed = Vec::new();
        let walked = self
            .walk_l2(
                imrt, l2_offset, &mut table, &mut fixed, frag_info, fix, active,
            )
            .await;
        self.write_zero_fixes(l2_offset, &table, &fixed).await;
        walked
    }

    /// The entries of one L2 table (the loop of check_refcounts_l2). Entries fixed in `table`
    /// are listed in `fixed`, for the caller to write.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn walk_l2(
        &mut self,
        imrt: &mut Imrt,
        l2_offset: u64,
        table: &mut IoBuf,
        fixed: &mut Vec<usize>,
        frag_info: bool,
        fix: Fix,
        active: bool,
    ) -> Step {
        let geo = self.geo;
        let extended = geo.extended_l2();
        let mut next_contiguous = 0u64;
        for i in 0..geo.l2_entries() as usize {
            let entry = L2Entry::read(table, &geo, i);
            let bitmap = entry.bitmap;
            let kind = entry.cluster_type(&geo, self.data_file);
            if kind != L2ClusterType::Compressed && entry.word & L2Entry::RESERVED_MASK != 0 {
                msg!(
                    self,
                    "ERROR found l2 entry with reserved bits set: {:x}",
                    entry.word
                );
                self.unfixable();
            }
            match kind {
                L2ClusterType::Compressed => {
                    let mut word = entry.word;
                    if word & L2_COPIED != 0 {
                        let coffset =
                            CompressedDescriptor::decode_unchecked(word, &geo).host_offset;
                        msg!(
                            self,
                            "ERROR: coffset={coffset:#x}: copied flag must never be set for \
                             compressed clusters"
                        );
                        word &= !L2_COPIED;
                        self.unfixable();
                    }
                    if self.data_file {
                        msg!(
                            self,
                            "ERROR compressed cluster {i} with data file, entry={word:#x}"
                        );
                        self.unfixable();
                        continue;
                    }
                    if bitmap != 0 {
                        msg!(
                            self,
                            "ERROR compressed cluster {i} with non-zero subcluster allocation \
                             bitmap, entry={word:#x}"
                        );
                        self.unfixable();
                        continue;
                    }
                    let desc = CompressedDescriptor::decode_unchecked(word, &geo);
                    self.inc_refs(imrt, desc.host_offset, desc.read_len())?;
                    if frag_info {
                        // Compressed clusters count as fragmented: reading one means reading
                        // whole sectors shared with its neighbours.
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        self.res.fragmented_clusters += 1;
                    }
                }
                L2ClusterType::ZeroAlloc | L2ClusterType::Normal => {
                    let offset = entry.raw_offset();
                    let sub = SubclusterBitmap(bitmap);
                    if sub.allocated() & sub.zero() != 0 {
                        self.unfixable();
                        msg!(
                            self,
                            "ERROR offset={offset:x}: Allocated cluster has corrupted \
                             subcluster allocation bitmap"
                        );
                    }
                    if !self.is_aligned(offset) {
                        self.res.corruptions += 1;
                        let contains_data = if extended {
                            sub.allocated() != 0
                        } else {
                            entry.word & L2_ZERO == 0
                        };
                        if contains_data {
                            self.res.unrepairable += 1;
                            msg!(
                                self,
                                "ERROR offset={offset:x}: Data cluster is not properly \
                                 aligned; L2 entry corrupted."
                            );
                        } else {
                            let verb = if fix.errors { "Repairing" } else { "ERROR" };
                            msg!(
                                self,
                                "{verb} offset={offset:x}: Preallocated cluster is not \
                                 properly aligned; L2 entry corrupted."
                            );
                            if fix.errors {
                                self.fix_l2_entry_by_zero(l2_offset, table, i, active)
                                    .await?;
                                // The entry no longer references anything.
                                fixed.push(i);
                                continue;
                            }
                        }
                    }
                    if frag_info {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset.wrapping_add(self.cs);
                    }
                    if !self.data_file {
                        self.inc_refs(imrt, offset, self.cs)?;
                    }
                }
                L2ClusterType::ZeroPlain => {}
                L2ClusterType::Unallocated => {
                    if bitmap & SubclusterBitmap::ALLOC_MASK != 0 {
                        self.unfixable();
                        self.msg(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The bitmap directory, bitmap tables and their data clusters
    /// (qcow2_check_bitmaps_refcounts); only when the bitmaps are declared consistent.
    pub(super) async fn check_bitmaps(&mut self, imrt: &mut Imrt) -> Step {
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = self.header.bitmaps().cloned() else {
            return Ok(());
        };
        self.inc_meta(
            imrt,
            Role::BitmapDirectory,
            ext.directory_offset,
            ext.directory_size,
        )?;
        let mut claimed = HashSet::new();
        self.bitmap_placement(
            &mut claimed,
            ext.directory_offset,
            ext.directory_size,
            Overlap::BitmapDirectory,
        );
        let disk_size = self.img.header.size;
        let entries = match crate::meta::load::read_bitmap_directory(
            self.img.files.image(),
            self.img.header,
            self.file_len,
            self.img.files.path(),
        )
        .await
        {
            Ok(list) => list,
            Err(_) => {
                self.unfixable();
                return Err(Abort(EINVAL.into()));
            }
        };
        for (i, bm) in entries.iter().enumerate() {
            if bm.validate(i, self.cs, disk_size).is_err() {
                self.unfixable();
                return Err(Abort(EINVAL.into()));
            }
        }
        for bm in &entries {
            let bytes = u64::from(bm.table_size) * 8;
            self.inc_meta(imrt, Role::BitmapTable, bm.table_offset, bytes)?;
            self.bitmap_placement(&mut claimed, bm.table_offset, bytes, Overlap::None);
            let table = match read_bytes(
                self.img.files.image(),
                bm.table_offset,
                bytes,
                "bitmap table",
            )
            .await
            {
                Ok(t) => t,
                Err(e) => {
                    self.unfixable();
                    return Err(e.into());
                }
            };
            let mut data = Vec::with_capacity(bm.table_size as usize);
            for i in 0..bm.table_size as usize {
                match BitmapTableEntry::read(&table, i).decode(self.cs) {
                    Ok(Ok(off)) => data.push(off.0),
                    Ok(Err(_all_ones)) => {}
                    Err(_) => {
                        // The table does not load: QEMU gives up the check.
                        self.unfixable();
                        return Err(Abort(EINVAL.into()));
                    }
                }
            }
            for off in data {
                self.inc_meta(imrt, Role::BitmapData, off, self.cs)?;
                self.bitmap_placement(&mut claimed, off, self.cs, Overlap::None);
            }
        }
        Ok(())
    }

    /// Counts as unrepairable a bitmap structure that a read-write open refuses (the engine
    /// writes bitmaps back in place): one not wholly inside the file, overlapping other
    /// metadata, or sharing a cluster with another bitmap structure (`claimed` collects
    /// them). Not reported otherwise: `qemu-img check` sees such a cluster only as a refcount
    /// below its references, which a repair would "fix" by counting it twice.
    pub(super) fn bitmap_placement(
        &mut self,
        claimed: &mut HashSet<u64>,
        offset: u64,
        len: u64,
        ignore: Overlap,
    ) {
        if len == 0 {
            return;
        }
        let bad = offset
            .checked_add(len)
            .is_none_or(|end| end > self.file_len)
            || self.overlaps_metadata(offset, len, ignore).is_some()
            || {
                let bits = self.cluster_bits();
                let clusters = (offset >> bits)..=((offset + len - 1) >> bits);
                // Every cluster claimed, even after a repeat (so that later ones are seen).
                clusters.fold(false, |dup, c| !claimed.insert(c) | dup)
            };
        if bad {
            self.res.unrepairable += 1;
        }
    }
}
