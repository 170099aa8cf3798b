//! The mapping layer (layer 5): which bytes a guest range reads, cluster by cluster, from
//! the L1 and L2 tables (loaded through the metadata [`Store`]): an L2 entry decoded with one
//! rule ([`Mapper::decode_entry`]), the walk over a range ([`Mapper::walk`]), the pieces a read
//! or a copy-on-write is made of ([`Mapper::map_range`]), and the block status of a layer
//! ([`status`]).
//!
//! Reads metadata only, under the metadata lock its callers hold (the `&mut Meta` they pass
//! proves it); never does guest data I/O; knows nothing of requests or the image facade.

pub(crate) mod status;

use crate::meta::{Meta, Store};
use crate::{Error, Result};
use blockio::Backend;
use qcow2_format::{
    CompressedDescriptor, GuestOffset, L2Entry, L2Mapping, SubclusterBitmap, SubclusterState,
};
use std::ops::Range;

/// Where the bytes of one piece of a guest range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Reads as zeros.
    Zero,
    /// Falls through to the backing file.
    Backing,
    /// Data at this byte offset of the image file (or the data file).
    Data { host: u64, data_file: bool },
    /// Inside a compressed cluster: the descriptor, and the piece's offset in the cluster.
    Compressed {
        desc: CompressedDescriptor,
        in_cluster: u64,
    },
}

/// A contiguous guest range with one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) guest: u64,
    pub(crate) len: u64,
    pub(crate) source: Source,
}

fn push(pieces: &mut Vec<Piece>, p: Piece) {
    if let Some(last) = pieces.last_mut() {
        let contiguous = last.guest + last.len == p.guest;
        let merge = contiguous
            && match (last.source, p.source) {
                (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
                (
                    Source::Data {
                        host: a,
                        data_file: fa,
                    },
                    Source::Data {
                        host: b,
                        data_file: fb,
                    },
                ) => fa == fb && a + last.len == b,
                _ => false,
            };
        if merge {
            last.len += p.len;
            return;
        }
    }
    pieces.push(p);
}

/// The mapping of one image: its metadata store, and what decides how an entry reads.
pub(crate) struct Mapper<'a, B> {
    pub(crate) store: Store<'a, B>,
    /// The image's version (v3 knows the zero flag).
    pub(crate) version: u32,
    /// Whether unallocated ranges fall through to a backing file (else they read as zeros).
    pub(crate) backing: bool,
    /// The L1 table walked instead of the active one (a snapshot's), if any.
    pub(crate) l1: Option<&'a [qcow2_format::L1Entry]>,
}

impl<B: Backend> Mapper<'_, B> {
    pub(crate) fn corrupt(&self, what: impl Into<String>) -> Error {
        Error::Corrupt {
            path: self.store.files.path().to_path_buf(),
            what: what.into(),
        }
    }
    /// The L2 table offset for L1 index `i` (None = unallocated).
    pub(crate) fn l2_offset(&self, meta: &Meta, i: u64) -> Result<Option<u64>> {
        let Some(entry) = self.l1.unwrap_or(&meta.l1).get(i as usize) else {
            return Ok(None);
        };
        entry
            .l2_offset(&self.store.geo)
            .map(|o| o.map(|h| h.0))
            .map_err(|e| self.corrupt(format!("L1 entry {i}: {e}")))
    }
    /// Decodes the L2 entry that maps guest cluster `guest_cluster_start`.
    pub(crate) fn decode_entry(&self, entry: L2Entry, guest: u64) -> Result<L2Mapping> {
        let zero_ok = self.version >= 3 && !self.store.geo.extended_l2();
        let mapping = entry
            .decode(&self.store.geo, zero_ok)
            .map_err(|e| self.corrupt(format!("L2 entry for guest offset {guest:#x}: {e}")))?;
        let file_len = self.store.files.len();
        if self.store.files.data().is_some() {
            // An external data file maps every cluster at its guest offset (QEMU refuses any
            // other host offset as corruption): nothing else may be read or written there.
            let host = match mapping {
                L2Mapping::Normal { host, .. } => Some(host),
                L2Mapping::Zero { preallocated, .. } => preallocated,
                _ => None,
            };
            let cluster = self.store.geo.cluster_start(guest);
            if let Some(host) = host.filter(|h| h.0 != cluster) {
                return Err(self.corrupt(format!(
                    "data file cluster for guest offset {cluster:#x} at {host}: an external \
                     data file maps guest clusters at their own offset"
                )));
            }
        }
        match mapping {
            L2Mapping::Normal { host, .. } if self.store.files.data().is_none() && host.0 >= file_len => {
                Err(self.corrupt(format!(
                    "data cluster for guest offset {guest:#x} at {host} lies past the end of the file"
                )))
            }
            L2Mapping::Normal { host, copied } if self.store.files.data().is_none() && host.0 == 0 => {
                let _ = copied;
                Err(self.corrupt(format!(
                    "data cluster for guest offset {guest:#x} points at the header"
                )))
            }
            L2Mapping::Compressed(d) if d.host_offset >= file_len => Err(self.corrupt(format!(
                "compressed cluster for guest offset {guest:#x} at {:#x} lies past the end of the file",
                d.host_offset
            ))),
            L2Mapping::Compressed(_) if self.store.files.data().is_some() => Err(self.corrupt(
                "compressed cluster in an image with an external data file",
            )),
            m => Ok(m),
        }
    }
    /// Visits the mapping of `[offset, offset+len)` cluster by cluster, loading L2 tables as
    /// needed: `f(range, cluster_start, mapping)` with `None` for ranges without an L2 table
    /// (then `range` may span many clusters).
    pub(crate) async fn walk<F>(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
        mut f: F,
    ) -> Result<()>
    where
        F: FnMut(Range<u64>, u64, Option<(L2Mapping, SubclusterBitmap)>) -> Result<()>,
    {
        let geo = self.store.geo;
        let cs = geo.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let l1_index = geo.l1_index(GuestOffset(pos));
            let table_end = end.min((l1_index + 1) * geo.l2_coverage());
            let Some(l2) = self.l2_offset(meta, l1_index)? else {
                f(pos..table_end, geo.cluster_start(pos), None)?;
                pos = table_end;
                continue;
            };
            let table = self.store.l2_table(meta, l2).await?;
            while pos < table_end {
                let cluster_start = geo.cluster_start(pos);
                let cluster_end = table_end.min(cluster_start + cs);
                let entry = L2Entry::read(table, &geo, geo.l2_index(GuestOffset(pos)));
                let mapping = self.decode_entry(entry, cluster_start)?;
                f(
                    pos..cluster_end,
                    cluster_start,
                    Some((mapping, entry.subclusters())),
                )?;
                pos = cluster_end;
            }
        }
        Ok(())
    }
    /// Maps a guest range to pieces, loading L2 tables as needed.
    pub(crate) async fn map_range(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Piece>> {
        let fallthrough = if self.backing {
            Source::Backing
        } else {
            Source::Zero
        };
        let mut pieces = Vec::new();
        self.walk(meta, offset, len, |range, cluster_start, m| match m {
            None => {
                push(
                    &mut pieces,
                    Piece {
                        guest: range.start,
                        len: range.end - range.start,
                        source: fallthrough,
                    },
                );
                Ok(())
            }
            Some((mapping, bitmap)) => self.cluster_pieces(
                &mut pieces,
                range,
                cluster_start,
                mapping,
                bitmap,
                fallthrough,
            ),
        })
        .await?;
        Ok(pieces)
    }
    pub(crate) fn cluster_pieces(
        &self,
        pieces: &mut Vec<Piece>,
        range: Range<u64>,
        cluster_start: u64,
        mapping: L2Mapping,
        bitmap: SubclusterBitmap,
        fallthrough: Source,
    ) -> Result<()> {
        let data_file = self.store.files.data().is_some();
        let whole = |source| Piece {
            guest: range.start,
            len: range.end - range.start,
            source,
        };
        if !self.store.geo.extended_l2() {
            let source = match mapping {
                L2Mapping::Unallocated => fallthrough,
                L2Mapping::Zero { .. } => Source::Zero,
                L2Mapping::Normal { host, .. } => Source::Data {
                    host: host.0 + (range.start - cluster_start),
                    data_file,
                },
                L2Mapping::Compressed(desc) => Source::Compressed {
                    desc,
                    in_cluster: range.start - cluster_start,
                },
            };
            push(pieces, whole(source));
            return Ok(());
        }
        let host = match mapping {
            L2Mapping::Compressed(desc) => {
                push(
                    pieces,
                    whole(Source::Compressed {
                        desc,
                        in_cluster: range.start - cluster_start,
                    }),
                );
                return Ok(());
            }
            L2Mapping::Normal { host, .. } => Some(host.0),
            L2Mapping::Unallocated => None,
            L2Mapping::Zero { .. } => {
                return Err(self.corrupt("zero flag in an extended L2 entry"));
            }
        };
        let sc = self.store.geo.subcluster_size();
        let mut pos = range.start;
        while pos < range.end {
            let i = ((pos - cluster_start) / sc) as u32;
            let sc_end = range.end.min(cluster_start + (u64::from(i) + 1) * sc);
            let source = match bitmap.state(i) {
                SubclusterState::Unallocated => fallthrough,
                SubclusterState::Zero => Source::Zero,
                SubclusterState::Allocated => match host {
                    Some(h) => Source::Data {
                        host: h + (pos - cluster_start),
                        data_file,
                    },
                    None => {
                        return Err(self.corrupt(format!(
                            "subcluster {i} of guest cluster {cluster_start:#x} is allocated \
                             but the cluster has no host offset"
                        )))
                    }
                },
            };
            push(
                pieces,
                Piece {
                    guest: pos,
                    len: sc_end - pos,
                    source,
                },
            );
            pos = sc_end;
        }
        Ok(())
    }
    /// The host clusters of the image file that a plan reads.
    pub(crate) fn lease_clusters(&self, plan: &[Piece]) -> Vec<u64> {
        let bits = self.store.geo.cluster_bits();
        let mut out = Vec::new();
        for p in plan {
            match p.source {
                Source::Data {
                    host,
                    data_file: false,
                } => out.extend((host >> bits)..=((host + p.len - 1) >> bits)),
                Source::Compressed { desc, .. } => out.extend(desc.host_clusters(&self.store.geo)),
                _ => {}
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}
