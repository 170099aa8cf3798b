//! The cross-check a read-write open makes before anything can be allocated: every cluster the
//! image refers to (its metadata, and the data clusters of the active L2 tables) must have a
//! non-zero refcount.
//!
//! A referenced cluster with refcount 0 looks free to the allocator, which would hand it out
//! again: new data or a new L2 table would land over live data or metadata, and two guest
//! offsets would share one host cluster (QEMU leaves this to `qemu-img check`; its overlap
//! check catches only metadata writes). The walk reads each active L2 table once: 1/8192 of
//! the disk's allocated size with 64 KiB clusters (0.5 MiB for 4 GiB), so it is cheap next to
//! the open itself. The snapshots' L2 tables are walked too, those that differ from the active
//! ones (a snapshot whose data the allocator handed out again would be lost on revert). The
//! same walk of the active tables, made again only when the image has bitmaps to maintain,
//! keeps their clusters apart from guest data.
//!
//! A compressed cluster's sector count is an upper bound (the stream ends once its cluster is
//! complete, and other writers than QEMU round it up), so of its span only the first cluster
//! must be counted. The clusters the count runs into with refcount 0, in the file or past its
//! end, are accepted, as QEMU accepts them (it reads the cluster and checks no refcount at
//! open; `qemu-img check` reports the references): the check returns them, and the allocator
//! never hands them out while the image is open, in case the stream does reach them.

use crate::aligned::read_bytes;
use crate::meta::MetadataClusters;
use crate::{Error, Result};
use blockio::Backend;
use qcow2_alloc::Allocator;
use qcow2_format::{ClusterGeometry, Header, HostCluster, HostOffset, L1Entry, L2Entry, L2Mapping};
use std::collections::HashSet;
use std::path::Path;

/// Fails with [`Error::Corrupt`] (and writes nothing) when a cluster the image refers to has
/// refcount 0. Entries that are themselves invalid are left to the requests that meet them.
/// Returns the clusters with refcount 0 that only the sector count of a compressed cluster
/// runs into (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn references<B: Backend>(
    file: &B,
    path: &Path,
    geo: &ClusterGeometry,
    header: &Header,
    l1: &[L1Entry],
    data_file: bool,
    metadata: &MetadataClusters,
    alloc: &Allocator,
) -> Result<HashSet<u64>> {
    let corrupt = |what: String| Error::Corrupt {
        path: path.into(),
        what: format!("{what}; `qimg check -r all` repairs the refcounts"),
    };
    let free = |c: u64| alloc.get(HostCluster(c)).is_ok_and(|n| n == 0);
    if let Some(c) = metadata.clusters().find(|&c| free(c)) {
        return Err(corrupt(format!(
            "host cluster {c} holds metadata but its refcount is 0"
        )));
    }
    let mut tails = HashSet::new();
    if data_file {
        return Ok(tails);
    }
    let mut seen = HashSet::new();
    data_clusters(file, path, geo, l1, &mut seen, |guest, c, tail| {
        if tail && free(c) {
            tails.insert(c);
            return None;
        }
        free(c).then(|| {
            corrupt(format!(
                "host cluster {c} holds the data of guest offset {guest:#x} but its refcount \
                 is 0"
            ))
        })
    })
    .await?;

    // The snapshots' L2 tables and data, where they differ from the active ones (a broken
    // snapshot table or L1 table is reported by whatever reads the snapshot).
    let file_len = file_len(file, path).await?;
    let Ok(snapshots) = crate::meta::load::read_snapshot_table(file, header, file_len).await?
    else {
        return Ok(tails);
    };
    for s in snapshots {
        let len = u64::from(s.l1_size) * 8;
        // Past QEMU's limit or the file: the snapshot is broken, and reading it is left to
        // `check` (which reports it) rather than allocating what a hostile size asks for.
        if len > qcow2_format::limits::MAX_L1_BYTES
            || s.l1_table_offset
                .checked_add(len)
                .is_none_or(|end| end > file_len)
        {
            continue;
        }
        let raw = read_bytes(file, s.l1_table_offset, len, "snapshot L1 table").await?;
        let snap_l1: Vec<L1Entry> = (0..s.l1_size as usize)
            .map(|i| L1Entry::read(&raw, i))
            .collect();
        let name = &s.name;
        for e in &snap_l1 {
            if let Ok(Some(HostOffset(l2))) = e.l2_offset(geo) {
                let c = l2 >> geo.cluster_bits();
                if !seen.contains(&l2) && l2 < file_len && free(c) {
                    return Err(corrupt(format!(
                        "host cluster {c} holds an L2 table of snapshot '{name}' but its \
                         refcount is 0"
                    )));
                }
            }
        }
        data_clusters(file, path, geo, &snap_l1, &mut seen, |guest, c, tail| {
            if tail && free(c) {
                tails.insert(c);
                return None;
            }
            free(c).then(|| {
                corrupt(format!(
                    "host cluster {c} holds the data of guest offset {guest:#x} in snapshot \
                     '{name}' but its refcount is 0"
                ))
            })
        })
        .await?;
    }
    Ok(tails)
}

async fn file_len<B: Backend>(file: &B, path: &Path) -> Result<u64> {
    file.len()
        .await
        .map_err(|e| Error::io(format!("{}: reading the file's length", path.display()), e))
}

/// Fails with [`Error::Corrupt`] (and writes nothing) when a cluster the engine would write
/// bitmap bytes to at close (`claimed`: the maintained bitmaps' directory, tables and data
/// clusters) holds the data of a guest offset: writing the bitmap would overwrite it.
pub(crate) async fn bitmaps_apart_from_data<B: Backend>(
    file: &B,
    path: &Path,
    geo: &ClusterGeometry,
    l1: &[L1Entry],
    claimed: &HashSet<u64>,
) -> Result<()> {
    if claimed.is_empty() {
        return Ok(());
    }
    data_clusters(file, path, geo, l1, &mut HashSet::new(), |guest, c, _| {
        claimed.contains(&c).then(|| Error::Corrupt {
            path: path.into(),
            what: format!(
                "host cluster {c} holds both bitmap data and the data of guest offset \
                 {guest:#x}"
            ),
        })
    })
    .await
}

/// Walks the data clusters of the L2 tables `l1` points to, skipping the tables in `seen`
/// (and adding the others: each table is read once), and entries that are invalid or point
/// past the end of the file (the requests that meet them report the corruption). Calls
/// `f(guest offset, host cluster, tail)` for each host cluster of each entry, `tail` telling
/// a cluster of a compressed span after its first; the first error `f` returns ends the walk.
async fn data_clusters<B: Backend>(
    file: &B,
    path: &Path,
    geo: &ClusterGeometry,
    l1: &[L1Entry],
    seen: &mut HashSet<u64>,
    mut f: impl FnMut(u64, u64, bool) -> Option<Error>,
) -> Result<()> {
    let cs = geo.cluster_size();
    let file_len = file_len(file, path).await?;
    for (i, e) in l1.iter().enumerate() {
        let Ok(Some(HostOffset(l2))) = e.l2_offset(geo) else {
            continue;
        };
        if !seen.insert(l2) || l2.saturating_add(cs) > file_len {
            continue;
        }
        let table = read_bytes(file, l2, cs, "L2 table").await?;
        for j in 0..geo.l2_entries() as usize {
            let hosts = match L2Entry::read(&table, geo, j).decode(geo, true) {
                Ok(L2Mapping::Normal { host, .. })
                | Ok(L2Mapping::Zero {
                    preallocated: Some(host),
                    ..
                }) if host.0 < file_len => {
                    let c = host.0 >> geo.cluster_bits();
                    c..=c
                }
                Ok(L2Mapping::Compressed(d)) if d.host_offset < file_len => d.host_clusters(geo),
                _ => continue,
            };
            let guest = (i as u64 * geo.l2_entries() + j as u64) * cs;
            let first = *hosts.start();
            if let Some(e) = hosts.into_iter().find_map(|c| f(guest, c, c != first)) {
                return Err(e);
            }
        }
    }
    Ok(())
}
