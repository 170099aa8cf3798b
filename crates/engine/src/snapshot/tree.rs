//! What a snapshot operation does to a tree of tables: the clusters an L1 table references
//! (its L2 tables and their data clusters, each once per reference, as QEMU counts them),
//! and the COPIED flags of the active tables set from the refcounts
//! (`qcow2_update_snapshot_refcount` with addend 0).

use crate::image::Image;
use crate::meta::Meta;
use crate::{Error, Result};
use blockio::Opener;
use qcow2_format::{HostCluster, L1Entry, L2Entry, L2Mapping, L2_COPIED};

impl<O: Opener> Image<O> {
    /// Every cluster the tree of `l1` references: each L2 table, then each data cluster (a
    /// compressed cluster's every host cluster, a preallocated zero cluster's host cluster).
    pub(super) async fn tree_clusters(
        &self,
        meta: &mut Meta,
        l1: &[L1Entry],
    ) -> Result<Vec<HostCluster>> {
        let geo = self.geo;
        let mapper = self.mapper();
        let mut out = Vec::new();
        for (i, e) in l1.iter().enumerate() {
            let Some(l2) = e
                .l2_offset(&geo)
                .map_err(|err| mapper.corrupt(format!("L1 entry {i}: {err}")))?
            else {
                continue;
            };
            out.push(geo.host_cluster(l2));
            let table = self.store().l2_table(meta, l2.0).await?.to_vec();
            for j in 0..geo.l2_entries() {
                let entry = L2Entry::read(&table, &geo, j as usize);
                let guest = (i as u64 * geo.l2_entries() + j) << geo.cluster_bits();
                match mapper.decode_entry(entry, guest)? {
                    L2Mapping::Normal { host, .. }
                    | L2Mapping::Zero {
                        preallocated: Some(host),
                        ..
                    } => out.push(geo.host_cluster(host)),
                    L2Mapping::Compressed(d) => out.extend(d.host_clusters(&geo).map(HostCluster)),
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Adds one reference to each of `clusters`; checks first that every count fits the
    /// refcount width, so that a refused increment changes nothing.
    pub(super) fn increment_all(&self, meta: &mut Meta, clusters: &[HostCluster]) -> Result<()> {
        let store = self.store();
        let alloc = meta.alloc.as_mut().ok_or(Error::ReadOnly)?;
        let mut adds: std::collections::HashMap<HostCluster, u64> = Default::default();
        for &c in clusters {
            *adds.entry(c).or_default() += 1;
        }
        for (&c, &n) in &adds {
            // Past u64 (64-bit refcounts at their maximum) overflows as surely as past the
            // width: the error reports the largest count a u64 holds.
            let value = alloc.get(c).map_err(|e| store.alloc_err(e))?.checked_add(n);
            if value.is_none_or(|v| v > alloc.width().max()) {
                return Err(Error::RefcountOverflow {
                    path: self.path().to_path_buf(),
                    value: value.unwrap_or(u64::MAX),
                    bits: alloc.width().bits(),
                });
            }
        }
        for &c in clusters {
            alloc.increment(c).map_err(|e| store.alloc_err(e))?;
        }
        Ok(())
    }

    /// Sets COPIED on the active L1 entries and standard or preallocated-zero L2 entries
    /// whose cluster has refcount 1, and clears it elsewhere; only the tables that change
    /// become dirty. `pending` are decrements deferred but not applied yet, counted as
    /// applied (so that the flags change in the same step as the decrements are recorded,
    /// and a dropped future cannot leave one without the other).
    pub(super) async fn fix_copied(&self, meta: &mut Meta, pending: &[HostCluster]) -> Result<()> {
        let mut minus: std::collections::HashMap<HostCluster, u64> = Default::default();
        for &c in pending {
            *minus.entry(c).or_default() += 1;
        }
        let geo = self.geo;
        let store = self.store();
        let zero_ok = self.header.version >= 3 && !geo.extended_l2();
        let refcount = |meta: &Meta, c: HostCluster| -> Result<u64> {
            let alloc = meta.alloc.as_ref().ok_or(Error::ReadOnly)?;
            let n = alloc.get(c).map_err(|e| store.alloc_err(e))?;
            Ok(n.saturating_sub(minus.get(&c).copied().unwrap_or(0)))
        };
        for i in 0..meta.l1.len() {
            let Some(l2) = self.mapper().l2_offset(meta, i as u64)? else {
                continue;
            };
            let one = refcount(meta, HostCluster(l2 >> geo.cluster_bits()))? == 1;
            if meta.l1[i].copied() != one {
                meta.l1[i] = L1Entry::new(qcow2_format::HostOffset(l2), one);
                meta.l1_dirty.insert(i as u64);
            }
            let table = store.l2_table(meta, l2).await?.to_vec();
            let mut changes = Vec::new();
            for j in 0..geo.l2_entries() as usize {
                let entry = L2Entry::read(&table, &geo, j);
                let host = match entry.decode(&geo, zero_ok) {
                    Ok(L2Mapping::Normal { host, .. })
                    | Ok(L2Mapping::Zero {
                        preallocated: Some(host),
                        ..
                    }) => host,
                    _ => continue,
                };
                let one = refcount(meta, geo.host_cluster(host))? == 1;
                if (entry.word & L2_COPIED != 0) != one {
                    let mut e = entry;
                    e.word ^= L2_COPIED;
                    changes.push((j, e));
                }
            }
            if !changes.is_empty() {
                let t = store.l2_table_mut(meta, l2).await?;
                for (j, e) in changes {
                    e.write(t, &geo, j);
                }
            }
        }
        Ok(())
    }
}
