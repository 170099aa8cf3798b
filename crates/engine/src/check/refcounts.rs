//! The refcounts on disk: the refcount blocks read and checked, compared with the counts the
//! walk found, and (repairing) set; the COPIED flags checked against them.

use super::*;

impl<B: Backend> Checker<'_, B> {
    /// The refcount block at `offset`, from memory or disk (zeros past the end of the file).
    pub(super) async fn block(&mut self, offset: u64) -> Result<&mut Vec<u8>> {
        if !self.blocks.contains_key(&offset) {
            if self.blocks.len() >= BLOCK_CACHE {
                let dirty = &self.dirty;
                self.blocks.retain(|off, _| dirty.contains(off));
            }
            let b = read_bytes(self.img.files.image(), offset, self.cs, "refcount block").await?;
            self.blocks.insert(offset, b.to_vec());
        }
        Ok(self.blocks.get_mut(&offset).expect("just inserted"))
    }

    /// Checks the refcount table's entries and counts the refcount blocks (check_refblocks).
    pub(super) async fn check_refblocks(
        &mut self,
        fix: Fix,
        rebuild: &mut bool,
        imrt: &mut Imrt,
    ) -> Step {
        for i in 0..self.reftable.len() {
            let entry = self.reftable[i];
            let offset = entry.raw_offset();
            let cluster = offset >> self.cluster_bits();
            if entry.0 & ReftableEntry::RESERVED_MASK != 0 {
                msg!(self, "ERROR refcount table entry {i} has reserved bits set");
                // A rebuild is tried, but its new blocks may land on the cluster the entry
                // names (uncounted, so free), which the overlap check then refuses.
                self.unfixable();
                *rebuild = true;
                continue;
            }
            if !self.is_aligned(offset) {
                msg!(
                    self,
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                );
                self.unfixable();
                *rebuild = true;
                continue;
            }
            if cluster >= imrt.len {
                self.res.corruptions += 1;
                let verb = if fix.errors { "Repairing" } else { "ERROR" };
                msg!(self, "{verb} refcount block {i} is outside image");
                if fix.errors {
                    match self.grow_file_to(offset, imrt).await {
                        Ok(()) if cluster < imrt.len => {
                            self.res.corruptions -= 1;
                            self.res.corruptions_fixed += 1;
                            // A fresh, zeroed cluster: its refcount is exactly this one.
                            self.inc_meta(imrt, Role::Refblock, offset, self.cs)?;
                            continue;
                        }
                        Ok(()) => {
                            *rebuild = true;
                            msg!(self, "ERROR could not resize image: {EINVAL}");
                        }
                        Err(e) => {
                            *rebuild = true;
                            msg!(self, "ERROR could not resize image: {e}");
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc_meta(imrt, Role::Refblock, offset, self.cs)?;
                let n = imrt.get(cluster);
                if n != 1 {
                    msg!(self, "ERROR refcount block {i} refcount={n}");
                    self.res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Extends the file to hold the cluster at `offset` and the in-memory table with it.
    pub(super) async fn grow_file_to(
        &mut self,
        offset: u64,
        imrt: &mut Imrt,
    ) -> std::result::Result<(), String> {
        let end = offset
            .checked_add(self.cs)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or_else(|| EINVAL.to_string())?;
        self.img
            .files
            .image()
            .set_len(end)
            .await
            .map_err(|e| e.to_string())?;
        self.refresh_len().await.map_err(|e| e.to_string())?;
        let n = self.file_len.div_ceil(self.cs);
        if n > MAX_CHECK_CLUSTERS {
            return Err(EFBIG.into());
        }
        imrt.resize(n).map_err(|()| ENOMEM.to_string())
    }

    /// The stored refcount of a cluster (qcow2_get_refcount): 0 beyond the table or without a
    /// block; an error for a misaligned block.
    pub(super) async fn disk_refcount(&mut self, cluster: u64) -> std::result::Result<u64, String> {
        let epb = self.entries_per_block();
        let index = cluster / epb;
        let Some(entry) = usize::try_from(index)
            .ok()
            .and_then(|i| self.reftable.get(i))
        else {
            return Ok(0);
        };
        let offset = entry.raw_offset();
        if offset == 0 {
            return Ok(0);
        }
        if !self.is_aligned(offset) {
            self.signal_corruption(format!(
                "Refblock offset {} unaligned (reftable index: {})",
                hash_x(offset),
                hash_x(index)
            ))
            .await;
            return Err(EIO.into());
        }
        let width = self.width;
        let block = self.block(offset).await.map_err(|e| e.to_string())?;
        Ok(width.get(block, cluster % epb))
    }

    /// Sets the stored refcount of `cluster`, whose block exists (it had a non-zero refcount).
    pub(super) async fn set_disk_refcount(&mut self, cluster: u64, value: u64) -> Step {
        let epb = self.entries_per_block();
        let index = cluster / epb;
        let offset = usize::try_from(index)
            .ok()
            .and_then(|i| self.reftable.get(i))
            .map(|e| e.raw_offset())
            .filter(|o| *o != 0)
            .ok_or_else(|| Abort(EIO.into()))?;
        let width = self.width;
        let block = self.block(offset).await?;
        width
            .set(block, cluster % epb, value)
            .map_err(|e| Abort(e.to_string()))?;
        self.dirty.insert(offset);
        if self.dirty.len() >= DIRTY_BATCH {
            self.write_dirty_blocks().await?;
        }
        Ok(())
    }

    pub(super) async fn write_dirty_blocks(&mut self) -> Step {
        let dirty = std::mem::take(&mut self.dirty);
        for offset in dirty {
            if let Err(e) = self
                .guard_write(offset, self.cs, Overlap::RefcountBlock)
                .await
            {
                self.res.check_errors += 1;
                return Err(e);
            }
            let data = self.blocks.get(&offset).cloned().unwrap_or_default();
            self.write_bytes(offset, &data).await?;
        }
        Ok(())
    }

    /// Compares stored and computed refcounts, fixing what `fix` allows
    /// (compare_refcounts). Returns the highest cluster in use.
    pub(super) async fn compare_refcounts(
        &mut self,
        fix: Fix,
        rebuild: &mut bool,
        imrt: &Imrt,
    ) -> Step<u64> {
        let mut highest = 0;
        // (cluster, new refcount, increase?)
        let mut updates: Vec<(u64, u64, bool)> = Vec::new();
        for i in 0..imrt.len {
            let stored = match self.disk_refcount(i).await {
                Ok(n) => n,
                Err(e) => {
                    msg!(self, "Can't get refcount for cluster {i}: {e}");
                    self.res.check_errors += 1;
                    continue;
                }
            };
            let computed = imrt.get(i);
            if stored > 0 || computed > 0 {
                highest = i;
            }
            if stored == computed {
                continue;
            }
            let fixable = if stored == 0 {
                *rebuild = true;
                false
            } else {
                (stored > computed && fix.leaks) || (stored < computed && fix.errors)
            };
            let what = if fixable {
                "Repairing"
            } else if stored < computed {
                "ERROR"
            } else {
                "Leaked"
            };
            msg!(
                self,
                "{what} cluster {i} refcount={stored} reference={computed}"
            );
            if fixable {
                updates.push((i, computed, computed > stored));
                if stored > computed {
                    self.res.leaks_fixed += 1;
                } else {
                    self.res.corruptions_fixed += 1;
                }
            } else if stored < computed {
                self.res.corruptions += 1;
            } else {
                self.res.leaks += 1;
            }
        }
        if !updates.is_empty() {
            self.apply_refcount_updates(&updates).await?;
        }
        Ok(highest)
    }

    /// Writes refcount changes in crash-safe order: every increase is on disk before any
    /// decrease; clusters freed are punched out last.
    pub(super) async fn apply_refcount_updates(&mut self, updates: &[(u64, u64, bool)]) -> Step {
        for increase in [true, false] {
            for &(cluster, value, up) in updates {
                if up == increase {
                    self.set_disk_refcount(cluster, value).await?;
                }
            }
            self.write_dirty_blocks().await?;
            self.flush().await?;
        }
        for &(cluster, value, _) in updates {
            if value == 0 {
                // Like QEMU, give freed clusters back to the file system; failure is harmless.
                let _ = self
                    .img
                    .files
                    .image()
                    .punch_hole(cluster << self.cluster_bits(), self.cs, Keep::none())
                    .await;
            }
        }
        Ok(())
    }

    /// Checks (and with `fix`, repairs) COPIED in the active L1 and L2 tables
    /// (check_oflag_copied).
    pub(super) async fn check_oflag_copied(&mut self, fix: Fix) -> Step {
        let repair = fix.errors
            || (fix.leaks
                && self.res.check_errors == 0
                && self.res.corruptions == 0
                && self.res.leaks == 0);
        let verb = if repair { "Repairing" } else { "ERROR" };
        let geo = self.geo;
        let bits = self.cluster_bits();
        for i in 0..self.l1.len() {
            let l1_entry = self.l1[i];
            let l2_offset = l1_entry.raw_offset();
            if l2_offset == 0 {
                continue;
            }
            if let Ok(refcount) = self.disk_refcount(l2_offset >> bits).await {
                if (refcount == 1) != l1_entry.copied() {
                    self.res.corruptions += 1;
                    msg!(
                        self,
                        "{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} \
                         refcount={refcount}",
                        l1_entry.0
                    );
                    if repair {
                        let fixed = if refcount == 1 {
                            L1Entry(l1_entry.0 | L1Entry::COPIED)
                        } else {
                            L1Entry(l1_entry.0 & !L1Entry::COPIED)
                        };
                        self.l1[i] = fixed;
                        if let Err(e) = self.write_l1_entry(i).await {
                            self.res.check_errors += 1;
                            return Err(e);
                        }
                        self.res.corruptions -= 1;
                        self.res.corruptions_fixed += 1;
                    }
                }
            }
            if l2_offset >= self.file_len {
                // Reads as zeros: no allocated entry to check.
                continue;
            }
            let mut table =
                match read_bytes(self.img.files.image(), l2_offset, self.cs, "L2 table").await {
                    Ok(t) => t,
                    Err(e) => {
                        msg!(self, "ERROR: Could not read L2 table: {e}");
                        self.res.check_errors += 1;
                        return Err(e.into());
                    }
                };
            let mut dirty = 0u64;
            for j in 0..geo.l2_entries() as usize {
                let entry = L2Entry::read(&table, &geo, j);
                let kind = entry.cluster_type(&geo, self.data_file);
                if !matches!(kind, L2ClusterType::Normal | L2ClusterType::ZeroAlloc) {
                    continue;
                }
                let refcount = if self.data_file {
                    1
                } else {
                    match self.disk_refcount(entry.raw_offset() >> bits).await {
                        Ok(n) => n,
                        Err(_) => continue,
                    }
                };
                let copied = entry.word & L2_COPIED != 0;
                if (refcount == 1) != copied {
                    self.res.corruptions += 1;
                    msg!(
                        self,
                        "{verb} OFLAG_COPIED data cluster: l2_entry={:x} refcount={refcount}",
                        entry.word
                    );
                    if repair {
                        let word = if refcount == 1 {
                            entry.word | L2_COPIED
                        } else {
                            entry.word & !L2_COPIED
                        };
                        L2Entry { word, ..entry }.write(&mut table, &geo, j);
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if let Err(e) = self
                    .guard_write(l2_offset, self.cs, Overlap::ActiveL2)
                    .await
                {
                    msg!(
                        self,
                        "ERROR: Could not write L2 table; metadata overlap check failed: {}",
                        e.0
                    );
                    self.res.check_errors += 1;
                    return Err(e);
                }
                let data = table.to_vec();
                if let Err(e) = self.write_bytes(l2_offset, &data).await {
                    msg!(self, "ERROR: Could not write L2 table: {e}");
                    self.res.check_errors += 1;
                    return Err(e.into());
                }
                self.res.corruptions -= dirty;
                self.res.corruptions_fixed += dirty;
            }
        }
        Ok(self.flush().await?)
    }
}
