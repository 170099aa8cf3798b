//! What `qimg convert` reads: one or more source images (several are concatenated), or a
//! snapshot of one; and what qemu-img's block status says of them, which decides what is
//! written and how the progress report moves.

use anyhow::{bail, Result};
use blockio::{FileOpener, IoBuf};
use qcow2_engine::{Disk, Error, ExtentKind, ReadResult, SnapshotLookup, SnapshotView};

/// One source: a disk's active layer, or a snapshot of it (`backed`: the image has a
/// backing file, which the snapshot's unallocated clusters read from).
pub enum Reader<'a> {
    Disk(&'a Disk<FileOpener>),
    Snapshot {
        view: Box<SnapshotView<'a, FileOpener>>,
        backed: bool,
    },
}

impl Reader<'_> {
    fn size(&self) -> u64 {
        match self {
            Reader::Disk(d) => d.size(),
            Reader::Snapshot { view, .. } => view.size(),
        }
    }
}

/// The sources, one after the other: guest offset `start` of the concatenation is offset 0
/// of each part.
pub struct Sources<'a> {
    parts: Vec<(u64, Reader<'a>)>,
    size: u64,
}

impl<'a> Sources<'a> {
    /// The concatenation of `readers`.
    pub fn new(readers: Vec<Reader<'a>>) -> Sources<'a> {
        let mut parts = Vec::new();
        let mut size = 0;
        for r in readers {
            let n = r.size();
            parts.push((size, r));
            size += n;
        }
        Sources { parts, size }
    }

    /// The size of the concatenation.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The one source's disk (its active layer), when there is one source.
    pub fn single_disk(&self) -> Option<&'a Disk<FileOpener>> {
        match self.parts.as_slice() {
            [(_, Reader::Disk(d))] => Some(d),
            _ => None,
        }
    }

    /// Reads `buf`'s window at guest `offset`, from as many parts as it spans.
    pub async fn read_at(&self, mut buf: IoBuf, offset: u64) -> ReadResult {
        let window = buf.window();
        let mut at = window.start;
        while at < window.end {
            let pos = offset + (at - window.start) as u64;
            let i = self.parts.partition_point(|p| p.0 <= pos).max(1) - 1;
            let (start, part) = &self.parts[i];
            let n = (window.end - at).min((start + part.size() - pos) as usize);
            buf.set_window(at..at + n);
            let (res, b) = match part {
                Reader::Disk(d) => d.read_at(buf, pos - start).await,
                Reader::Snapshot { view, .. } => view.read_at(buf, pos - start).await,
            };
            buf = b;
            if res.is_err() {
                buf.set_window(window);
                return (res, buf);
            }
            at += n;
        }
        buf.set_window(window);
        (Ok(()), buf)
    }

    /// qemu-img's block status of the concatenation, in runs: with `top_only` (the new
    /// image has a backing file) what the source's backing chain provides is
    /// [`Status::Backing`], and zeros from `backing_size` on too (they read as zeros
    /// there anyway).
    pub async fn status(&self, top_only: bool, backing_size: u64) -> Result<Vec<Run>> {
        let mut runs = Vec::new();
        for (start, part) in &self.parts {
            let disk = match part {
                Reader::Disk(disk) => disk,
                Reader::Snapshot { view, backed } => {
                    for e in view.block_status(0, view.size()).await? {
                        let status = match e.kind {
                            ExtentKind::Unallocated { .. } if !backed => Status::Zero,
                            ExtentKind::Zero { .. } => Status::Zero,
                            _ => Status::Data,
                        };
                        runs.push(Run {
                            end: start + e.offset + e.len,
                            status,
                        });
                    }
                    continue;
                }
            };
            for e in disk.map(0, disk.size()).await? {
                let status = match (e.zero, e.data) {
                    _ if top_only && e.depth > 0 => Status::Backing,
                    (true, _) => Status::Zero,
                    (false, true) => Status::Data,
                    (false, false) if top_only => Status::Backing,
                    (false, false) => Status::Data,
                };
                let (s, end) = (start + e.start, start + e.start + e.length);
                if top_only && status == Status::Zero && s < backing_size && end > backing_size {
                    runs.push(Run {
                        end: backing_size,
                        status,
                    });
                    runs.push(Run {
                        end,
                        status: Status::Backing,
                    });
                    continue;
                }
                let status = match status {
                    Status::Zero if top_only && s >= backing_size => Status::Backing,
                    s => s,
                };
                runs.push(Run { end, status });
            }
        }
        Ok(runs)
    }
}

/// What qemu-img's block status says of a run of the source.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Status {
    /// Data to read and write.
    Data,
    /// Reads as zeros.
    Zero,
    /// Left to the new image's backing file.
    Backing,
}

/// A run of one [`Status`], up to guest offset `end` (from the previous run's end).
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub end: u64,
    pub status: Status,
}

/// The snapshot `sel` of `disk` (`-l`: `ID_OR_NAME`, `snapshot.id=ID` or
/// `snapshot.name=NAME`), with qemu-img's message when there is none.
pub async fn open_snapshot<'a>(disk: &'a Disk<FileOpener>, sel: &'a str) -> Result<Reader<'a>> {
    let lookup = if let Some(id) = sel.strip_prefix("snapshot.id=") {
        SnapshotLookup::Id(id)
    } else if let Some(name) = sel.strip_prefix("snapshot.name=") {
        SnapshotLookup::Name(name)
    } else {
        SnapshotLookup::IdOrName(sel)
    };
    if matches!(lookup, SnapshotLookup::Id(s) | SnapshotLookup::Name(s) if s.contains(',')) {
        bail!("-l with both snapshot.id and snapshot.name is not supported by qimg");
    }
    let Disk::Qcow2(img) = disk else {
        bail!("Failed to load snapshot: Block format 'raw' used by device '' does not support internal snapshots");
    };
    match img.snapshot_view(lookup).await {
        Ok(view) => Ok(Reader::Snapshot {
            view: Box::new(view),
            backed: img.backing().is_some(),
        }),
        Err(Error::SnapshotNotFound { .. }) => {
            bail!("Failed to load snapshot: Can't find snapshot")
        }
        Err(e) => bail!("Failed to load snapshot: {e}"),
    }
}
