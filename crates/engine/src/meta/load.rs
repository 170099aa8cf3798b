//! Loading metadata: the header, the L1 table, the refcounts of a read-write image, the map of
//! clusters holding other metadata, and the snapshot table, each through `qcow2-format`.

use super::MetadataClusters;
use crate::aligned::read_bytes;
use crate::{Error, Result};
use blockio::Backend;
use qcow2_format::{FormatError, Header, L1Entry, QCOW_MAGIC};
use std::path::Path;

/// QEMU's limit on the snapshot table's size.
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;

/// Largest header area read at open: one cluster of the largest size QEMU accepts.
const MAX_CLUSTER: u64 = 2 << 20;

pub(crate) async fn read_header<B: Backend>(
    file: &B,
    path: &Path,
    file_len: u64,
) -> Result<Header> {
    let format_err = |source: FormatError| Error::Format {
        path: path.into(),
        source,
    };
    let peek = read_bytes(file, 0, 4096.min(file_len.max(1)), "header").await?;
    let avail = file_len.min(peek.len() as u64) as usize;
    if avail < 24 {
        // Too short to hold even the fields read below: let the parser say what is missing.
        return Header::parse(&peek[..avail]).map_err(format_err);
    }
    let magic = u32::from_be_bytes(peek[0..4].try_into().expect("4 bytes"));
    if magic != QCOW_MAGIC {
        return Err(format_err(FormatError::BadMagic(magic)));
    }
    let bits = u32::from_be_bytes(peek[20..24].try_into().expect("4 bytes"));
    let cluster = if (9..=21).contains(&bits) {
        1u64 << bits
    } else {
        4096
    };
    let want = cluster.min(file_len).min(MAX_CLUSTER);
    let buf = if want as usize > peek.len() {
        read_bytes(file, 0, want, "header").await?
    } else {
        peek
    };
    let avail = (want as usize).min(buf.len());
    Header::parse(&buf[..avail]).map_err(format_err)
}

/// Loads the refcount table and every refcount block of a read-write image.
///
/// A table entry naming a block at an unaligned offset is left unloaded: QEMU opens such an
/// image (`qcow2_refcount_init` reads the table only) and fails the requests that need a
/// refcount from that block, marking the image corrupt (`qcow2_get_refcount`); the
/// allocator answers those lookups with [`qcow2_alloc::RefcountError::UnalignedBlock`].
pub(crate) async fn load_allocator<B: Backend>(
    file: &B,
    header: &Header,
    path: &Path,
    file_len: u64,
) -> Result<qcow2_alloc::Allocator> {
    let geo = header.geometry();
    let cs = geo.cluster_size();
    let corrupt = |what: String| Error::Corrupt {
        path: path.into(),
        what,
    };
    let raw = read_bytes(
        file,
        header.refcount_table_offset,
        u64::from(header.refcount_table_clusters) * cs,
        "refcount table",
    )
    .await?;
    let table: Vec<qcow2_format::ReftableEntry> = raw
        .chunks_exact(8)
        .map(|c| qcow2_format::ReftableEntry(u64::from_be_bytes(c.try_into().expect("8"))))
        .collect();
    let mut rc = qcow2_alloc::Refcounts::new(geo, header.refcount_width(), table.clone());
    for (i, e) in table.iter().enumerate() {
        let off = match e.block_offset(cs) {
            Ok(Some(off)) => off,
            Ok(None) | Err(FormatError::Misaligned { .. }) => continue,
            Err(e) => return Err(corrupt(format!("refcount table entry {i}: {e}"))),
        };
        if off.0.saturating_add(cs) > file_len {
            return Err(corrupt(format!(
                "refcount block {i} at {off} lies past the end of the file"
            )));
        }
        let block = read_bytes(file, off.0, cs, "refcount block").await?;
        rc.insert_block(i as u64, block.to_vec());
    }
    Ok(qcow2_alloc::Allocator::new(
        rc,
        geo,
        qcow2_format::HostOffset(header.refcount_table_offset),
        file_len.div_ceil(cs),
    ))
}

/// The metadata map of a read-write image (see [`MetadataClusters`]).
pub(crate) async fn metadata_clusters<B: Backend>(
    file: &B,
    path: &Path,
    header: &Header,
    l1: &[L1Entry],
) -> Result<MetadataClusters> {
    let geo = header.geometry();
    let mut m = MetadataClusters::default();
    m.add_range(&geo, 0, geo.cluster_size());
    m.add_range(&geo, header.l1_table_offset, u64::from(header.l1_size) * 8);
    for e in l1 {
        if let Ok(Some(off)) = e.l2_offset(&geo) {
            m.l2.insert(off.0 >> geo.cluster_bits());
        }
    }
    // The snapshot table's extent and the snapshots' L1 tables. A table over QEMU's limits
    // (too many snapshots, too large, too much extra data) is refused, as QEMU's open
    // refuses it and `qemu-img check -r all` repairs it: nothing is written to such an image.
    // Other breakage (QEMU reads on) is reported by the reads that need the table; the
    // guard works without it.
    let file_len = file.len().await.unwrap_or(0);
    match read_snapshot_table(file, header, file_len).await? {
        Ok(snaps) => {
            let len: u64 = snaps.iter().map(|s| s.serialized_len() as u64).sum();
            m.add_range(&geo, header.snapshots_offset, len);
            for s in snaps {
                let len = u64::from(s.l1_size) * 8;
                if geo.is_aligned(s.l1_table_offset) && len <= qcow2_format::limits::MAX_L1_BYTES {
                    m.add_range(&geo, s.l1_table_offset, len);
                } else {
                    m.add_claimed_range(&geo, s.l1_table_offset, len);
                }
            }
        }
        Err(source @ (FormatError::TooLarge { .. } | FormatError::SnapshotExtraData { .. })) => {
            return Err(Error::Format {
                path: path.into(),
                source,
            })
        }
        Err(_) => {}
    }
    // The bitmap directory is added by `tracking::Ctx::load_bitmaps`, once checked against
    // the rest.
    Ok(m)
}

/// Reads and parses the snapshot table (empty without snapshots). Entries have variable
/// length: a guess is read and grown while the parser says the table is truncated, up to
/// QEMU's 64 MiB limit and the end of the file. I/O errors are the outer error, a malformed
/// table the inner one.
pub(crate) async fn read_snapshot_table<B: Backend>(
    file: &B,
    header: &Header,
    file_len: u64,
) -> Result<std::result::Result<Vec<qcow2_format::Snapshot>, FormatError>> {
    let n = header.nb_snapshots;
    if n == 0 {
        return Ok(Ok(Vec::new()));
    }
    let off = header.snapshots_offset;
    let limit = file_len.saturating_sub(off).min(MAX_SNAPSHOT_TABLE);
    let mut want = (u64::from(n) * 64).max(4096).min(limit.max(1));
    loop {
        let buf = read_bytes(file, off, want.min(limit), "snapshot table").await?;
        match qcow2_format::Snapshot::parse_table(&buf, n) {
            Err(FormatError::Truncated { .. }) if want < limit => want = (want * 4).min(limit),
            other => return Ok(other),
        }
    }
}

/// Reads the active L1 table.
pub(crate) async fn read_l1<B: Backend>(file: &B, header: &Header) -> Result<Vec<L1Entry>> {
    let l1_bytes = u64::from(header.l1_size) * 8;
    let l1_buf = read_bytes(file, header.l1_table_offset, l1_bytes, "L1 table").await?;
    Ok(l1_buf
        .chunks_exact(8)
        .map(|c| L1Entry(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
        .collect())
}

/// Reads and parses the bitmap directory (empty without the bitmaps extension); a directory
/// past the end of the file or larger than QEMU allows is a format error.
pub(crate) async fn read_bitmap_directory<B: Backend>(
    file: &B,
    header: &Header,
    file_len: u64,
    path: &Path,
) -> Result<Vec<qcow2_format::BitmapDirectoryEntry>> {
    let Some(ext) = header.bitmaps() else {
        return Ok(Vec::new());
    };
    let format_err = |source| Error::Format {
        path: path.into(),
        source,
    };
    let end = ext.directory_offset.checked_add(ext.directory_size);
    if end.is_none_or(|e| e > file_len) || ext.directory_size > 1024 * 65535 {
        return Err(format_err(FormatError::PastEnd {
            what: "bitmap directory",
            offset: ext.directory_offset,
            len: ext.directory_size,
            file_len,
        }));
    }
    let buf = read_bytes(
        file,
        ext.directory_offset,
        ext.directory_size,
        "bitmap directory",
    )
    .await?;
    qcow2_format::BitmapDirectoryEntry::parse_directory(&buf, ext.nb_bitmaps).map_err(format_err)
}
