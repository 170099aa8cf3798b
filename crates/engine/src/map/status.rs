//! Block status: what one layer of the chain says about a guest range (QEMU's
//! `bdrv_block_status` for qcow2), the base of `qimg map`.

use super::Mapper;
use crate::meta::Meta;
use crate::Result;
use blockio::Backend;
use qcow2_format::{L2Mapping, SubclusterState};

/// What one image (one layer of a chain) says about a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Not allocated in this layer: reads fall through to the backing file (or zeros). In an
    /// extended-L2 image, a cluster may keep its host space (`host`) while some of its
    /// subclusters are unallocated.
    Unallocated {
        /// Host offset of the range's first byte, when its cluster has one.
        host: Option<u64>,
    },
    /// Reads as zeros in this layer (zero flag / zero subclusters), possibly with space kept at
    /// `host`.
    Zero {
        /// The preallocated host offset of the range, if any.
        host: Option<u64>,
    },
    /// Data at `host` in the image file, or in the external data file.
    Data {
        /// Host offset of the range's first byte.
        host: u64,
        /// Whether `host` is an offset in the external data file.
        data_file: bool,
    },
    /// Compressed data.
    Compressed,
}

/// A guest range with one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Its status in this layer.
    pub kind: ExtentKind,
}

fn push(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        let merge = last.offset + last.len == e.offset
            && match (last.kind, e.kind) {
                (ExtentKind::Unallocated { host: a }, ExtentKind::Unallocated { host: b })
                | (ExtentKind::Zero { host: a }, ExtentKind::Zero { host: b }) => match (a, b) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a + last.len == b,
                    _ => false,
                },
                (
                    ExtentKind::Data {
                        host: a,
                        data_file: fa,
                    },
                    ExtentKind::Data {
                        host: b,
                        data_file: fb,
                    },
                ) => fa == fb && a + last.len == b,
                _ => false,
            };
        if merge {
            last.len += e.len;
            return;
        }
    }
    out.push(e);
}

impl<B: Backend> Mapper<'_, B> {
    /// The status of `[offset, offset+len)` in this image alone (not its backing chain),
    /// as maximal runs of one kind with contiguous host offsets.
    pub(crate) async fn block_status(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        let data_file = self.store.files.data().is_some();
        let geo = self.store.geo;
        let sc = geo.subcluster_size();
        let extended = geo.extended_l2();
        let mut out = Vec::new();
        self.walk(meta, offset, len, |range, cluster_start, m| {
            let ext = |kind, r: std::ops::Range<u64>| Extent {
                offset: r.start,
                len: r.end - r.start,
                kind,
            };
            let in_cluster = range.start - cluster_start;
            match m {
                None => push(&mut out, ext(ExtentKind::Unallocated { host: None }, range)),
                Some((L2Mapping::Unallocated, _)) if !extended => {
                    push(&mut out, ext(ExtentKind::Unallocated { host: None }, range))
                }
                Some((L2Mapping::Zero { preallocated, .. }, _)) => push(
                    &mut out,
                    ext(
                        ExtentKind::Zero {
                            host: preallocated.map(|h| h.0 + in_cluster),
                        },
                        range,
                    ),
                ),
                Some((L2Mapping::Compressed(_), _)) => {
                    push(&mut out, ext(ExtentKind::Compressed, range))
                }
                Some((L2Mapping::Normal { host, .. }, _)) if !extended => push(
                    &mut out,
                    ext(
                        ExtentKind::Data {
                            host: host.0 + in_cluster,
                            data_file,
                        },
                        range,
                    ),
                ),
                Some((mapping, bitmap)) => {
                    let host = match mapping {
                        L2Mapping::Normal { host, .. } => Some(host.0),
                        _ => None,
                    };
                    let mut pos = range.start;
                    while pos < range.end {
                        let i = ((pos - cluster_start) / sc) as u32;
                        let end = range.end.min(cluster_start + (u64::from(i) + 1) * sc);
                        let at = host.map(|h| h + (pos - cluster_start));
                        let kind = match (bitmap.state(i), at) {
                            (SubclusterState::Allocated, Some(host)) => {
                                ExtentKind::Data { host, data_file }
                            }
                            (SubclusterState::Zero, _) => ExtentKind::Zero { host: at },
                            _ => ExtentKind::Unallocated { host: at },
                        };
                        push(&mut out, ext(kind, pos..end));
                        pos = end;
                    }
                }
            }
            Ok(())
        })
        .await?;
        Ok(out)
    }
}
