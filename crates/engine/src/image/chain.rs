//! The allocation map of a whole backing chain, as `qemu-img map` reports it: for each guest
//! range, which layer provides it (depth), whether it reads as zeros, whether it holds data,
//! and where that data lives.

use crate::image::{Disk, Image};
use crate::map::status::ExtentKind;
use crate::Result;
use blockio::{Backend, Opener};
use std::path::PathBuf;

/// One run of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Index in the chain of the layer that decided the status (0 = top).
    pub depth: usize,
    /// Whether that layer allocates the range (as data or zeros).
    pub present: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether the range is backed by data in a file.
    pub data: bool,
    /// Whether the range is compressed.
    pub compressed: bool,
    /// Offset of the range in `filename`, when it has one.
    pub offset: Option<u64>,
    /// The file holding the range's bytes, when `offset` is set.
    pub filename: Option<PathBuf>,
}

impl MapEntry {
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// What one layer says about the start of a range (QEMU's block-status flags).
#[derive(Debug, Default)]
struct LayerStatus {
    len: u64,
    data: bool,
    zero: bool,
    allocated: bool,
    compressed: bool,
    offset: Option<u64>,
    filename: Option<PathBuf>,
}

/// What the file underneath says about a host range: data, or a hole (SEEK_DATA/SEEK_HOLE).
async fn file_status<B: Backend>(file: &B, offset: u64, len: u64) -> Result<(bool, u64)> {
    let a = file
        .allocation(offset, len)
        .await
        .map_err(|e| crate::Error::io("querying file allocation", e))?;
    Ok((a.data, a.len.clamp(1, len)))
}

impl<O: Opener> Disk<O> {
    /// The map of `[offset, offset+len)` through the whole chain, merged as `qemu-img map`
    /// merges it.
    ///
    /// # Cancel safety
    ///
    /// Reads metadata only: dropping the future changes nothing.
    pub async fn map(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        chain_map(Layer::Disk(self), offset, len).await
    }

    /// The status of one layer at `pos`, for at most `bytes`.
    async fn layer_status(&self, pos: u64, bytes: u64) -> Result<LayerStatus> {
        match self {
            Disk::Raw(raw) => {
                let len = bytes.min(raw.size().saturating_sub(pos));
                if len == 0 {
                    return Ok(LayerStatus {
                        len: bytes,
                        ..LayerStatus::default()
                    });
                }
                let (data, n) = file_status(&raw.backend, pos, len).await?;
                Ok(LayerStatus {
                    len: n,
                    data,
                    zero: !data,
                    allocated: true,
                    offset: Some(pos),
                    filename: Some(raw.path.clone()),
                    ..LayerStatus::default()
                })
            }
            Disk::Qcow2(img) => img.layer_status(pos, bytes).await,
        }
    }
}

/// A layer of a chain as the map walks it: the image an embedder holds, or a disk below it.
enum Layer<'a, O: Opener> {
    Image(&'a Image<O>),
    Disk(&'a Disk<O>),
}

// Copy without `O: Copy` (a derive would ask for it): the variants are references.
impl<O: Opener> Clone for Layer<'_, O> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<O: Opener> Copy for Layer<'_, O> {}

impl<'a, O: Opener> Layer<'a, O> {
    fn size(self) -> u64 {
        match self {
            Layer::Image(img) => img.size(),
            Layer::Disk(d) => d.size(),
        }
    }

    fn backing(self) -> Option<Layer<'a, O>> {
        match self {
            Layer::Image(img) => img.backing().map(Layer::Disk),
            Layer::Disk(d) => d.backing().map(Layer::Disk),
        }
    }

    async fn status(self, pos: u64, bytes: u64) -> Result<LayerStatus> {
        match self {
            Layer::Image(img) => img.layer_status(pos, bytes).await,
            Layer::Disk(d) => d.layer_status(pos, bytes).await,
        }
    }
}

/// The map of `[offset, offset+len)` from `top` down, merged as `qemu-img map` merges it.
async fn chain_map<O: Opener>(top: Layer<'_, O>, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
    let end = offset.saturating_add(len).min(top.size());
    let mut out: Vec<MapEntry> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let e = status_above(top, pos, end - pos).await?;
        pos += e.length;
        match out.last_mut() {
            Some(last) if last.mergeable(&e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(out)
}

/// Walks down the chain from `top` until a layer allocates the range's start.
async fn status_above<O: Opener>(top: Layer<'_, O>, pos: u64, bytes: u64) -> Result<MapEntry> {
    let mut layer = top;
    let mut depth = 0;
    let mut bytes = bytes;
    loop {
        let st = Box::pin(layer.status(pos, bytes)).await?;
        bytes = st.len;
        if st.data || st.zero {
            return Ok(entry(pos, depth, st));
        }
        match layer.backing() {
            Some(b) => {
                layer = b;
                depth += 1;
            }
            None => {
                return Ok(entry(
                    pos,
                    depth,
                    LayerStatus {
                        len: bytes,
                        ..LayerStatus::default()
                    },
                ))
            }
        }
    }
}

fn entry(start: u64, depth: usize, st: LayerStatus) -> MapEntry {
    MapEntry {
        start,
        length: st.len,
        depth,
        present: st.allocated,
        zero: st.zero,
        data: st.data,
        compressed: st.compressed,
        filename: st.offset.and(st.filename),
        offset: st.offset,
    }
}

impl<O: Opener> Image<O> {
    /// The map of `[offset, offset+len)` through the whole chain (this image, then its
    /// backing files), merged as `qemu-img map` merges it: what
    /// [`Disk::map`] says of a disk, for the image an embedder shares.
    ///
    /// # Cancel safety
    ///
    /// Reads metadata only: dropping the future changes nothing.
    pub async fn map(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        chain_map(Layer::Image(self), offset, len).await
    }

    async fn layer_status(&self, pos: u64, bytes: u64) -> Result<LayerStatus> {
        let extents = self.block_status(pos, bytes).await?;
        let Some(first) = extents.first() else {
            return Ok(LayerStatus {
                len: bytes,
                ..LayerStatus::default()
            });
        };
        let len = first.len;
        let image_file = || Some(self.path().to_path_buf());
        let st = match first.kind {
            ExtentKind::Unallocated { host } => {
                // Unallocated with nothing below (or below the backing file's end) reads zeros.
                let zero = match self.backing() {
                    None => true,
                    Some(b) => pos >= b.size(),
                };
                LayerStatus {
                    len,
                    zero,
                    offset: host,
                    filename: self.data_file_path().map(PathBuf::from).or_else(image_file),
                    ..LayerStatus::default()
                }
            }
            ExtentKind::Zero { host } => LayerStatus {
                len,
                zero: true,
                allocated: true,
                offset: host,
                filename: self.data_file_path().map(PathBuf::from).or_else(image_file),
                ..LayerStatus::default()
            },
            ExtentKind::Compressed => LayerStatus {
                len,
                data: true,
                allocated: true,
                compressed: true,
                ..LayerStatus::default()
            },
            ExtentKind::Data { host, data_file } => {
                let file_name = if data_file {
                    self.data_file_path().map(PathBuf::from)
                } else {
                    image_file()
                };
                let recurse = self.metadata_preallocated().await?;
                let mut st = LayerStatus {
                    len,
                    data: true,
                    allocated: true,
                    offset: Some(host),
                    filename: file_name,
                    ..LayerStatus::default()
                };
                if recurse {
                    // With preallocated metadata QEMU asks the file whether the host range
                    // is a hole: a hole reads as zeros.
                    let (file_data, n) = match (self.files.data(), data_file) {
                        (Some(d), true) => file_status(&d.backend, host, len).await?,
                        _ => file_status(self.files.image(), host, len).await?,
                    };
                    st.len = n;
                    st.zero = !file_data;
                }
                st
            }
        };
        Ok(st)
    }
}

impl<O: Opener> Image<O> {
    /// Whether `[offset, offset+len)` (clamped to the disk) reads as zeros by the block
    /// status of the whole chain from this image down, as QEMU's `is_zero` (block/qcow2.c)
    /// asks `bdrv_block_status_above`: every part of it zero in the layer that decides it (a
    /// zero cluster, unallocated with nothing below, past the end of a backing file, a hole in
    /// a raw file). Data that merely happens to be zero does not count. Takes the metadata
    /// lock of each layer it asks.
    ///
    /// # Cancel safety
    ///
    /// Reads metadata only: dropping the future changes nothing.
    pub(crate) async fn reads_as_zeros(&self, offset: u64, len: u64) -> Result<bool> {
        let end = offset.saturating_add(len).min(self.size());
        let mut pos = offset;
        while pos < end {
            let st = self.layer_status(pos, end - pos).await?;
            let (zero, n) = match self.backing() {
                Some(b) if !st.data && !st.zero => {
                    let e = status_above(Layer::Disk(b), pos, st.len).await?;
                    (e.zero, e.length)
                }
                _ => (st.zero, st.len),
            };
            if !zero || n == 0 {
                return Ok(false);
            }
            pos += n;
        }
        Ok(true)
    }
}
