//! Write-zeroes and discard: whole clusters change their L2 entries (zero flag, or
//! deallocated), partial ones are written with zeros; unmapped clusters are freed by a later
//! write-back, each under its exclusive lease (I3, I4).

use crate::image::Image;
use crate::{Error, Result};
use blockio::{Backend, IoBuf, Keep, Opener};
use qcow2_format::{GuestOffset, HostCluster, L2Entry, L2Mapping, SubclusterBitmap};
use std::sync::atomic::Ordering;

/// Largest explicit zero write, in bytes.
const ZERO_CHUNK: u64 = 1 << 20;

impl<O: Opener> Image<O> {
    /// Makes `[offset, offset+len)` read as zeros. With `may_unmap`, clusters wholly inside
    /// the range may be deallocated (qemu-io `write -z -u`).
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_at`]: each guest cluster of the range reads either its old data or
    /// zeros (the change is made one L2 table at a time, each step consistent), clusters it
    /// unmapped are freed by a later write-back, and nothing else is affected.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        // No snapshot operation runs meanwhile (see `Image::writers`).
        let _writer = self.writers.token().await;
        match self.write_zeroes_inner(offset, len, may_unmap).await {
            Ok(()) => {
                self.acked.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => Err(self.on_error(e).await),
        }
    }

    async fn write_zeroes_inner(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable(offset, len)?;
        self.before_first_write().await?;
        self.bitmap_ctx().bitmaps_mark(offset, len).await;
        if len == 0 {
            return Ok(());
        }
        if let (Some(d), true) = (self.files.data(), self.header.data_file_raw()) {
            // A raw data file must show the guest's view at all times.
            d.backend
                .write_zeroes(offset, len, Keep::new(self.io.token().await))
                .await
                .map_err(|e| Error::io(format!("{}: write zeroes", d.path.display()), e))?;
        }
        let cs = self.cluster_size();
        let end = offset + len;
        let first_full = offset.div_ceil(cs) * cs;
        let last_full = if end == self.size() {
            end
        } else {
            end / cs * cs
        };
        let v3 = self.header.version >= 3;
        let whole = if v3 || self.backing.is_none() {
            (first_full < last_full).then_some(first_full..last_full)
        } else {
            None
        };
        match whole {
            None => self.write_zero_bytes(offset, end).await,
            Some(w) => {
                self.write_zero_bytes(offset, w.start).await?;
                let mode = if v3 {
                    ZeroMode::Zero { unmap: may_unmap }
                } else {
                    ZeroMode::Deallocate
                };
                self.zero_clusters(w.clone(), mode).await?;
                self.write_zero_bytes(w.end, end).await
            }
        }
    }

    /// Writes real zeros over `[from, to)`.
    async fn write_zero_bytes(&self, from: u64, to: u64) -> Result<()> {
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(ZERO_CHUNK);
            self.write_at(IoBuf::new(n as usize), pos).await.0?;
            pos += n;
        }
        Ok(())
    }

    /// Discards `[offset, offset+len)`: clusters wholly inside it are deallocated and read as
    /// zeros afterwards (on v3 the zero flag hides a backing file). Partial clusters are left
    /// alone, and so is everything in a v2 image with a backing file (it could not hide the
    /// backing file), as QEMU does.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::write_zeroes`]: each whole cluster of the range is either discarded or
    /// left as it was; the clusters unmapped are freed by a later write-back, once no I/O is
    /// in flight on them.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // No snapshot operation runs meanwhile (see `Image::writers`).
        let _writer = self.writers.token().await;
        match self.discard_inner(offset, len).await {
            Ok(()) => {
                self.acked.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => Err(self.on_error(e).await),
        }
    }

    async fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(offset, len)?;
        self.before_first_write().await?;
        self.bitmap_ctx().bitmaps_mark(offset, len).await;
        if self.header.version < 3 && self.backing.is_some() {
            // A v2 image cannot hide its backing file: QEMU leaves the data in place.
            return Ok(());
        }
        let cs = self.cluster_size();
        let end = offset + len;
        let first = offset.div_ceil(cs) * cs;
        // The partial cluster at the end of an unaligned disk counts as whole.
        let last = if end == self.size() {
            end
        } else {
            end / cs * cs
        };
        if first >= last {
            return Ok(());
        }
        self.zero_clusters(first..last, ZeroMode::Discard).await
    }

    /// Makes the whole clusters of `range` unallocated, whatever they were: what a version 2
    /// image without a backing file reads as zeros (the amendment to version 2 uses it for
    /// zero clusters, which version 2 cannot express).
    pub(crate) async fn deallocate(&self, range: std::ops::Range<u64>) -> Result<()> {
        self.zero_clusters(range, ZeroMode::Deallocate).await
    }

    /// Changes the L2 entries of the whole clusters in `range` (cluster-aligned, or ending
    /// at the end of the disk) as `mode` says; old clusters are unreferenced (their counts
    /// drop at the next write-back).
    async fn zero_clusters(&self, range: std::ops::Range<u64>, mode: ZeroMode) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut pos = range.start;
        while pos < range.end {
            let mut meta = self.meta.lock().await;
            let l1_index = geo.l1_index(GuestOffset(pos));
            let table_end = range.end.min((l1_index + 1) * geo.l2_coverage());
            // Unallocated ranges without an L2 table: only the backing file may need hiding.
            let has_table = self.mapper().l2_offset(&meta, l1_index)?.is_some();
            let needs_table = has_table
                || (mode.hides_backing() && self.backing.is_some() && self.header.version >= 3);
            if !needs_table {
                pos = table_end;
                continue;
            }
            // Wait for allocations in flight in this table's part of the range.
            let gate = meta.gates.first_in(
                (pos..table_end)
                    .step_by(cs as usize)
                    .map(|c| c >> geo.cluster_bits()),
            );
            if let Some(g) = gate {
                drop(meta);
                g.wait().await;
                continue;
            }
            let l2 = self.writable_l2(&mut meta, l1_index).await?;
            let mut unref = Vec::new();
            {
                let has_backing = self.backing.is_some();
                let v3 = self.header.version >= 3;
                let data_file = self.files.data().is_some();
                let mut decoded = Vec::new();
                {
                    let table = self.store().l2_table(&mut meta, l2).await?;
                    let mut p = pos;
                    while p < table_end {
                        let idx = geo.l2_index(GuestOffset(p));
                        let e = L2Entry::read(table, &geo, idx);
                        decoded.push((idx, e));
                        p += cs;
                    }
                }
                let mut updates = Vec::new();
                for (idx, e) in decoded {
                    let guest = pos + (idx - geo.l2_index(GuestOffset(pos))) as u64 * cs;
                    let old = self.mapper().decode_entry(e, guest)?;
                    let new = mode.new_entry(old, e, &geo, has_backing, v3)?;
                    if new == e {
                        continue;
                    }
                    let old_host_dropped = new.word & L2Entry::OFFSET_MASK == 0
                        || matches!(old, L2Mapping::Compressed(_));
                    if old_host_dropped && !data_file {
                        match old {
                            L2Mapping::Compressed(d) => {
                                unref.extend(d.host_clusters(&geo).map(HostCluster))
                            }
                            L2Mapping::Normal { host, .. }
                            | L2Mapping::Zero {
                                preallocated: Some(host),
                                ..
                            } => unref.push(geo.host_cluster(host)),
                            _ => {}
                        }
                    }
                    updates.push((idx, new));
                }
                if !updates.is_empty() {
                    let table = self.store().l2_table_mut(&mut meta, l2).await?;
                    for (idx, new) in updates {
                        new.write(table, &geo, idx);
                    }
                }
            }
            if let Some(alloc) = meta.alloc.as_mut() {
                for c in unref {
                    alloc.defer_decrement(c);
                }
            }
            self.store().maybe_write_back(&mut meta).await?;
            pos = table_end;
        }
        Ok(())
    }
}

/// How [`Image::zero_clusters`] changes an entry.
#[derive(Clone, Copy)]
enum ZeroMode {
    /// Discard: deallocate; read zeros (v3, when needed) or the backing file (v2).
    Discard,
    /// Write zeroes on v3: the zero flag; deallocate if `unmap` (always for compressed).
    Zero { unmap: bool },
    /// Write zeroes on v2 without a backing file: deallocate.
    Deallocate,
}

impl ZeroMode {
    fn hides_backing(&self) -> bool {
        !matches!(self, ZeroMode::Deallocate)
    }

    fn new_entry(
        &self,
        old: L2Mapping,
        e: L2Entry,
        geo: &qcow2_format::ClusterGeometry,
        has_backing: bool,
        v3: bool,
    ) -> Result<L2Entry> {
        let allocated = !matches!(
            old,
            L2Mapping::Unallocated
                | L2Mapping::Zero {
                    preallocated: None,
                    ..
                }
        );
        let extended = geo.extended_l2();
        let zero = |keep_host: bool| -> L2Entry {
            let word = if keep_host {
                e.word & !qcow2_format::L2_ZERO
            } else {
                0
            };
            if extended {
                L2Entry {
                    word,
                    bitmap: SubclusterBitmap::ALL_ZERO.0,
                }
            } else {
                L2Entry {
                    word: word | qcow2_format::L2_ZERO,
                    bitmap: 0,
                }
            }
        };
        Ok(match self {
            ZeroMode::Discard => {
                if !v3 {
                    L2Entry::default()
                } else if has_backing || allocated {
                    zero(false)
                } else {
                    e
                }
            }
            ZeroMode::Deallocate => L2Entry::default(),
            ZeroMode::Zero { unmap } => {
                let compressed = matches!(old, L2Mapping::Compressed(_));
                let keep = !(compressed || *unmap && allocated);
                zero(keep && allocated)
            }
        })
    }
}
