//! The cross-check a read-write open makes before anything can be allocated: every cluster the
//! image refers to (its metadata, and the data clusters of the active L2 tables) must have a
//! non-zero refcount.
//!
//! A referenced cluster with refcount 0 looks free to the allocator, which would hand it out
//! again: new data or a new L2 table would land over live data or metadata, and two guest
//! offsets would share one host cluster (QEMU leaves this to `qemu-img check`; its overlap
//! check catches only metadata writes). The walk reads each active L2 table once: 1/8192 of
//! the disk's allocated size with 64 KiB clusters (0.5 MiB for 4 GiB), so it is cheap next to
//! the open itself. Snapshots' own L2 tables are not walked. The same walk, made again only
//! when the image has bitmaps to maintain, keeps their clusters apart from guest data.

use crate::image::{read_bytes, MetadataClusters};
use crate::{Error, Result};
use blockio::Backend;
use qcow2_alloc::Allocator;
use qcow2_format::{ClusterGeometry, HostCluster, HostOffset, L1Entry, L2Entry, L2Mapping};
use std::collections::HashSet;
use std::path::Path;

/// Fails with [`Error::Corrupt`] (and writes nothing) when a cluster the image refers to has
/// refcount 0. Entries that are themselves invalid are left to the requests that meet them.
pub(crate) async fn references<B: Backend>(
    file: &B,
    path: &Path,
    geo: &ClusterGeometry,
    l1: &[L1Entry],
    data_file: bool,
    metadata: &MetadataClusters,
    alloc: &Allocator,
) -> Result<()> {
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
    if data_file {
        return Ok(());
    }
    data_clusters(file, path, geo, l1, |guest, c| {
        free(c).then(|| {
            corrupt(format!(
                "host cluster {c} holds the data of guest offset {guest:#x} but its refcount \
                 is 0"
            ))
        })
    })
    .await
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
    data_clusters(file, path, geo, l1, |guest, c| {
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

/// Walks the data clusters of the active L2 tables (each table read once; entries that are
/// invalid or point past the end of the file skipped: the requests that meet them report
/// the corruption), calling `f(guest offset, host cluster)` for each host cluster of each
/// entry; the first error `f` returns ends the walk.
async fn data_clusters<B: Backend>(
    file: &B,
    path: &Path,
    geo: &ClusterGeometry,
    l1: &[L1Entry],
    mut f: impl FnMut(u64, u64) -> Option<Error>,
) -> Result<()> {
    let cs = geo.cluster_size();
    let file_len = file
        .len()
        .await
        .map_err(|e| Error::io(format!("{}: reading the file's length", path.display()), e))?;
    let mut seen = HashSet::new();
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
            if let Some(e) = hosts.into_iter().find_map(|c| f(guest, c)) {
                return Err(e);
            }
        }
    }
    Ok(())
}
