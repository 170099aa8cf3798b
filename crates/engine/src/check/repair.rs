//! What a repair writes: zeroed L2 entries, L1 entries, a rebuilt refcount structure, the
//! header's flags; every write after any older metadata write of the image (I9).

use super::*;

impl<B: Backend> Checker<'_, B> {
    /// Makes entry `index` of the L2 table at `l2_offset` a zero cluster without host space
    /// (fix_l2_entry_by_zero), in `table` only: the corruption counts as fixed, and
    /// [`Checker::write_zero_fixes`] writes the table's fixed entries at the end of its walk.
    /// (QEMU writes and flushes each entry at once: a garbage table made that one flush per
    /// entry.) Fails when the write would hit other metadata.
    pub(super) async fn fix_l2_entry_by_zero(
        &mut self,
        l2_offset: u64,
        table: &mut IoBuf,
        index: usize,
        active: bool,
    ) -> Step {
        let geo = self.geo;
        let size = geo.l2_entry_size();
        let entry_offset = l2_offset + index as u64 * size;
        let ignore = if active {
            Overlap::ActiveL2
        } else {
            Overlap::InactiveL2
        };
        if let Err(e) = self.guard_write(entry_offset, size, ignore).await {
            self.msg("ERROR: Overlap check failed".into());
            self.res.check_errors += 1;
            return Err(e);
        }
        let old = L2Entry::read(table, &geo, index);
        let new = if geo.extended_l2() {
            // Allocated subclusters become zero ones.
            let bm = (old.bitmap | (old.bitmap << 32)) & SubclusterBitmap::ZERO_MASK;
            L2Entry {
                word: 0,
                bitmap: bm,
            }
        } else {
            L2Entry {
                word: L2_ZERO,
                bitmap: 0,
            }
        };
        new.write(table, &geo, index);
        self.res.corruptions -= 1;
        self.res.corruptions_fixed += 1;
        Ok(())
    }

    /// Writes the entries of the L2 table at `l2_offset` that were fixed in `table`, durably.
    /// If that fails they count as corruptions again (though, unlike in QEMU, the clusters
    /// they named were not counted).
    pub(super) async fn write_zero_fixes(
        &mut self,
        l2_offset: u64,
        table: &IoBuf,
        fixed: &[usize],
    ) {
        let (Some(&first), Some(&last)) = (fixed.first(), fixed.last()) else {
            return;
        };
        let size = self.geo.l2_entry_size() as usize;
        let bytes = table[first * size..(last + 1) * size].to_vec();
        let written = match self
            .write_bytes(l2_offset + (first * size) as u64, &bytes)
            .await
        {
            Ok(()) => self.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            msg!(self, "ERROR: Failed to overwrite L2 table entry: {e}");
            self.res.check_errors += 1;
            let n = fixed.len() as u64;
            self.res.corruptions += n;
            self.res.corruptions_fixed -= n;
        }
    }

    /// Writes entry `i` of the active L1 table (qcow2_write_l1_entry), durably.
    pub(super) async fn write_l1_entry(&mut self, i: usize) -> Step {
        let offset = self.header.l1_table_offset + i as u64 * 8;
        self.guard_write(offset, 8, Overlap::ActiveL1).await?;
        let mut bytes = [0u8; 8];
        self.l1[i].write(&mut bytes, 0);
        self.write_bytes(offset, &bytes).await?;
        Ok(self.flush().await?)
    }

    /// Allocates `count` contiguous clusters in the in-memory table, at or after
    /// `*first_free` (which is moved to the first gap seen), growing the table past its end
    /// when needed (alloc_clusters_imrt). Returns the byte offset.
    pub(super) fn alloc_imrt(
        &mut self,
        imrt: &mut Imrt,
        count: u64,
        first_free: &mut u64,
    ) -> Step<u64> {
        let mut cluster = *first_free;
        let mut contiguous = 0;
        let mut first_gap = true;
        while cluster < imrt.len && contiguous < count {
            if imrt.get(cluster) == 0 {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                contiguous = 0;
            }
            cluster += 1;
        }
        if contiguous < count {
            let n = cluster + count - contiguous;
            if n > MAX_CHECK_CLUSTERS || imrt.resize(n).is_err() {
                return Err(Abort(ENOMEM.into()));
            }
        }
        cluster -= contiguous;
        for c in cluster..cluster + count {
            imrt.set(c, 1);
        }
        Ok(cluster << self.cluster_bits())
    }

    /// Writes the refcount blocks for the clusters `[first, end)` that are in use, allocating
    /// blocks (in the in-memory table) where the new refcount table has none yet
    /// (rebuild_refcounts_write_refblocks). Returns whether the refcount table grew.
    pub(super) async fn write_new_refblocks(
        &mut self,
        imrt: &mut Imrt,
        first: u64,
        mut end: u64,
        reftable: &mut Vec<u64>,
    ) -> Step<bool> {
        let epb = self.entries_per_block();
        let entries_per_cluster = self.cs / 8;
        let max_entries = qcow2_format::limits::MAX_REFTABLE_BYTES / 8;
        let mut first_free = 0;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if imrt.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster / epb;
            let block_start = index * epb;
            let existing = usize::try_from(index)
                .ok()
                .and_then(|i| reftable.get(i))
                .copied()
                .filter(|o| *o != 0);
            let offset = match existing {
                Some(o) => o,
                None => {
                    first_free = first_free.max(block_start);
                    let off = self.alloc_imrt(imrt, 1, &mut first_free)?;
                    let block_cluster = off >> self.cluster_bits();
                    if block_cluster >= end {
                        // The block describing this block must be written too.
                        end = block_cluster + 1;
                    }
                    if reftable.len() as u64 <= index {
                        let n = (index + 1).div_ceil(entries_per_cluster) * entries_per_cluster;
                        if n > max_entries {
                            self.res.check_errors += 1;
                            return Err(Abort(EFBIG.into()));
                        }
                        reftable.resize(n as usize, 0);
                        grown = true;
                    }
                    reftable[index as usize] = off;
                    off
                }
            };
            if let Err(e) = self.guard_write(offset, self.cs, Overlap::None).await {
                self.res.check_errors += 1;
                return Err(e);
            }
            let data = imrt.block(index).to_vec();
            self.write_bytes(offset, &data).await?;
            cluster = block_start + epb;
        }
        Ok(grown)
    }

    /// Writes a new refcount structure from the in-memory table into clusters nothing uses,
    /// then switches the header to it (rebuild_refcount_structure). The old structure stays
    /// valid until that switch; afterwards it is leaked (and freed by the caller).
    pub(super) async fn rebuild_refcount_structure(&mut self, imrt: &mut Imrt) -> Step {
        self.blocks.clear();
        self.dirty.clear();
        let mut reftable: Vec<u64> = Vec::new();
        let end = imrt.len;
        self.write_new_refblocks(imrt, 0, end, &mut reftable)
            .await?;
        let (rt_offset, rt_clusters) = loop {
            let rt_bytes = reftable.len() as u64 * 8;
            let rt_clusters = rt_bytes.div_ceil(self.cs);
            let mut first_free = 0;
            let rt_offset = self.alloc_imrt(imrt, rt_clusters, &mut first_free)?;
            let start = rt_offset >> self.cluster_bits();
            // The table's own clusters changed the in-memory counts: write their blocks again.
            let grown = self
                .write_new_refblocks(imrt, start, start + rt_clusters, &mut reftable)
                .await?;
            if !grown {
                break (rt_offset, rt_clusters);
            }
        };
        let mut table = vec![0u8; (rt_clusters * self.cs) as usize];
        for (i, off) in reftable.iter().enumerate() {
            ReftableEntry(*off).write(&mut table, i);
        }
        self.guard_write(rt_offset, table.len() as u64, Overlap::None)
            .await?;
        self.write_bytes(rt_offset, &table).await?;
        // Everything the new table points to is durable before the header points to it.
        self.flush().await?;
        let mut header = self.header.clone();
        header.refcount_table_offset = rt_offset;
        header.refcount_table_clusters =
            u32::try_from(rt_clusters).map_err(|_| Abort(EFBIG.into()))?;
        // refcount_table_offset and refcount_table_clusters, bytes 48..60.
        self.write_header_fields(&header, 48..60).await?;
        self.header = header;
        self.reftable = reftable.into_iter().map(ReftableEntry).collect();
        self.blocks.clear();
        Ok(())
    }

    /// Clears the dirty and corrupt bits after a repair that left no corruption
    /// (qcow2_mark_clean, qcow2_mark_consistent).
    pub(super) async fn mark_clean_and_consistent(&mut self) -> Step {
        let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        if self.header.version < 3 || self.header.incompatible_features & bits == 0 {
            return Ok(());
        }
        self.flush().await?;
        let mut header = self.header.clone();
        header.incompatible_features &= !bits;
        // incompatible_features, bytes 72..80.
        self.write_header_fields(&header, 72..80).await?;
        self.header = header;
        Ok(())
    }

    /// Writes bytes `range` of `header` as serialized, then flushes.
    pub(super) async fn write_header_fields(
        &mut self,
        header: &Header,
        range: std::ops::Range<usize>,
    ) -> Step {
        let bytes = header
            .serialize()
            .map_err(|e| Abort(format!("cannot serialize the header: {e}")))?;
        let part = bytes
            .get(range.clone())
            .ok_or_else(|| Abort("header too short".into()))?
            .to_vec();
        self.write_bytes(range.start as u64, &part).await?;
        Ok(self.flush().await?)
    }

    /// Writes `data` at `offset` of the image file (read-modify-write around it when the
    /// backend needs aligned I/O), keeping the known file length up to date.
    pub(super) async fn write_bytes(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let file = self.img.files.image();
        let align = file.alignment().max(1) as u64;
        let what = || format!("{}: writing metadata", self.img.files.path().display());
        let end = offset + data.len() as u64;
        let buf = if align == 1 {
            IoBuf::from_slice(data)
        } else {
            let start = offset / align * align;
            let aligned_end = end.div_ceil(align) * align;
            let mut b = read_bytes(file, start, aligned_end - start, "metadata").await?;
            b.reset_window();
            let from = (offset - start) as usize;
            b.as_full_mut_slice()[from..from + data.len()].copy_from_slice(data);
            b
        };
        let at = if align == 1 {
            offset
        } else {
            offset / align * align
        };
        // As every metadata write (I9): after any older one still in flight, and tracked.
        self.img.meta_io.idle().await;
        let mut buf = buf;
        buf.attach(Keep::new(self.img.meta_io.token().await));
        let (res, _) = file.write_at(buf, at).await;
        res.map_err(|e| Error::io(what(), e))?;
        if end > self.file_len {
            self.refresh_len().await?;
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self) -> Result<()> {
        self.img
            .files
            .image()
            .flush()
            .await
            .map_err(|e| Error::io(format!("{}: flush", self.img.files.path().display()), e))
    }

    pub(super) async fn refresh_len(&mut self) -> Result<()> {
        self.file_len = self
            .img
            .files
            .image()
            .len()
            .await
            .map_err(|e| Error::io(format!("{}: size", self.img.files.path().display()), e))?;
        Ok(())
    }
}
