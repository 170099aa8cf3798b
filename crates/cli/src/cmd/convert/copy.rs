//! The copy of `qimg convert`: what the sources read goes to the target, runs of zeros
//! (`-S`) left to read as zeros; and the progress report (`-p`), which moves as qemu-img's
//! does: by the requests qemu-img would make of what it copies.

use super::source::{Run, Sources, Status};
use crate::progress::{percent, Progress};
use crate::util::strerror;
use anyhow::{bail, Context, Result};
use blockio::{Backend, FileOpener, IoBuf};
use qcow2_engine::Image;
use std::path::Path;

/// Bytes read per request (qemu-img convert's buffer).
pub const CHUNK: usize = 2 << 20;

/// Where `copy` writes the bytes it read.
pub trait Sink {
    /// Writes `buf`'s window at `offset`.
    async fn write(&self, buf: IoBuf, offset: u64) -> (std::io::Result<()>, IoBuf);
    /// Makes `[offset, offset+len)` read as zeros, where a hole would not.
    async fn zeroes(&self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// A raw file: holes of a new one read as zeros (`reads_zeros`); an existing one (`-n`)
/// gets zeros written.
pub struct RawSink<'a, B> {
    pub file: &'a B,
    pub reads_zeros: bool,
}

impl<B: Backend> Sink for RawSink<'_, B> {
    async fn write(&self, buf: IoBuf, offset: u64) -> (std::io::Result<()>, IoBuf) {
        self.file.write_at(buf, offset).await
    }
    async fn zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.reads_zeros {
            return Ok(());
        }
        self.file
            .write_zeroes(offset, len, blockio::Keep::none())
            .await
    }
}

/// A qcow2 image: unallocated clusters of a new one without a backing file read as zeros
/// (`reads_zeros`); otherwise zeros are written.
pub struct Qcow2Sink<'a> {
    pub img: &'a Image<FileOpener>,
    pub reads_zeros: bool,
    /// `-c`: data goes in as compressed writes.
    pub compress: bool,
}

impl Sink for Qcow2Sink<'_> {
    async fn write(&self, buf: IoBuf, offset: u64) -> (std::io::Result<()>, IoBuf) {
        let (res, buf) = if self.compress {
            self.img.write_compressed(buf, offset).await
        } else {
            self.img.write_at(buf, offset).await
        };
        (res.map_err(std::io::Error::other), buf)
    }
    async fn zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.reads_zeros {
            return Ok(());
        }
        self.img
            .write_zeroes(offset, len, false)
            .await
            .map_err(std::io::Error::other)
    }
}

/// How `copy` goes about it.
pub struct CopyOpts<'a> {
    /// The target's name (for messages).
    pub dest: &'a Path,
    /// `-S` in bytes: the shortest run of zeros within data left to read as zeros; `None`
    /// (`-S 0`): everything is written, zeros too.
    pub sparse: Option<u64>,
    /// `-c`: each request is one cluster, written whole unless it is all zeros.
    pub compress: bool,
    /// `--salvage`: what cannot be read is written as zeros (with a warning).
    pub salvage: bool,
    /// `-q`: no warnings.
    pub quiet: bool,
}

/// Copies `src` to `sink` request by request, as qemu-img convert does (`requests`): data
/// is read and written but for runs of zeros (`-S`), zeros are left to read as zeros (or
/// written, with `-S 0`), what the backing file provides is left alone; the progress report
/// moves after each request it counts.
pub async fn copy(
    how: &CopyOpts<'_>,
    src: &Sources<'_>,
    requests: &[Request],
    sink: &impl Sink,
    progress: &mut Progress,
) -> Result<()> {
    let total: u64 = requests.iter().filter(|r| r.counted).map(|r| r.len).sum();
    let mut done = 0;
    let mut buf = IoBuf::new(CHUNK);
    let written = || format!("error while writing '{}'", how.dest.display());
    for r in requests {
        if r.counted {
            done += r.len;
            progress.set(percent(done, total));
        }
        let n = r.len as usize;
        match r.status {
            Status::Backing => continue,
            Status::Zero if how.sparse.is_some() => {
                sink.zeroes(r.start, r.len).await.with_context(written)?;
                continue;
            }
            Status::Zero => buf.as_full_mut_slice()[..n].fill(0),
            Status::Data => {
                buf.set_window(0..n);
                buf = read(how, src, buf, r.start).await?;
            }
        }
        let mut i = 0;
        while i < n {
            let (len, data) = match how.sparse {
                None => (n - i, true),
                Some(_) if how.compress => (n, buf.as_full_slice()[..n].iter().any(|&b| b != 0)),
                Some(min) => allocated_min(&buf.as_full_slice()[i..n], min, r.start + i as u64),
            };
            let at = r.start + i as u64;
            if data {
                buf.set_window(i..i + len);
                let (res, b) = sink.write(buf, at).await;
                buf = b;
                res.with_context(written)?;
            } else {
                sink.zeroes(at, len as u64).await.with_context(written)?;
            }
            i += len;
        }
    }
    Ok(())
}

/// The unit qemu-img looks for zeros in.
const SECTOR: usize = 512;

/// qemu-img's `is_allocated_sectors`: the bytes at the start of `buf` (at guest `offset`)
/// that are all data or all zeros, and which; a run that ends off the `align`ment is cut
/// back to it (zeros) or stretched to it (data), as the write would cover it anyway.
fn same_run(buf: &[u8], offset: u64, align: u64) -> (usize, bool) {
    let zero = |i: usize| buf[i..(i + SECTOR).min(buf.len())].iter().all(|&b| b == 0);
    let is_zero = zero(0);
    let mut i = SECTOR.min(buf.len());
    while i < buf.len() && zero(i) == is_zero {
        i = (i + SECTOR).min(buf.len());
    }
    if i == buf.len() {
        return (i, !is_zero);
    }
    let sectors = (i / SECTOR) as u64;
    let tail = ((offset / SECTOR as u64 + sectors) % align) as usize * SECTOR;
    if tail == 0 {
        return (i, !is_zero);
    }
    if !is_zero || i <= tail {
        (((i + align as usize * SECTOR) - tail).min(buf.len()), true)
    } else {
        (i - tail, false)
    }
}

/// qemu-img's `is_allocated_sectors_min`: the bytes at the start of `buf` (at guest
/// `offset`) to write as data (zero runs shorter than `min` within them included), or to
/// leave as zeros.
fn allocated_min(buf: &[u8], min: u64, offset: u64) -> (usize, bool) {
    // Requests are aligned to the largest power of two of sectors not above -S.
    let sectors = (min / SECTOR as u64).max(1);
    let align = 1 << sectors.ilog2();
    let min = (min as usize).min(buf.len());
    let (first, data) = same_run(buf, offset, align);
    if !data {
        return (first, false);
    }
    let (mut used, mut checked) = (first, first);
    while checked < buf.len() {
        let (n, data) = same_run(&buf[checked..], offset + checked as u64, align);
        checked += n;
        if data {
            used = checked;
        } else if n >= min {
            break;
        }
    }
    (used, true)
}

/// One request of qemu-img convert: guest bytes `start..start+len` of one [`Status`];
/// whether its progress report counts it (data; zeros too with `-S 0`).
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub start: u64,
    pub len: u64,
    pub status: Status,
    pub counted: bool,
}

/// The requests qemu-img convert makes of `runs` (of a source of `size` bytes), in
/// order: runs of data cut into buffers of 2 MiB, zeros too with `-S 0` (not `sparse`);
/// compressed (`cluster`), one cluster each, a run shorter than that taken whole as data.
pub fn requests(runs: &[Run], size: u64, sparse: bool, cluster: Option<u64>) -> Vec<Request> {
    // Compressed, qemu-img copies a cluster at a time.
    let buf = cluster.unwrap_or(CHUNK as u64);
    let mut out = Vec::new();
    let (mut at, mut next_status, mut status) = (0, 0, Status::Data);
    while at < size {
        if next_status <= at {
            let i = runs.partition_point(|r| r.end <= at);
            let Some(r) = runs.get(i) else { break };
            status = r.status;
            next_status = r.end;
        }
        let mut n = next_status - at;
        if status == Status::Data {
            n = n.min(buf);
        }
        if let Some(cs) = cluster {
            if n < cs {
                n = cs.min(size - at);
                status = Status::Data;
            } else {
                n = n / cs * cs;
            }
        }
        if !sparse && status == Status::Zero {
            n = n.min(buf);
        }
        out.push(Request {
            start: at,
            len: n,
            status,
            counted: status == Status::Data || (!sparse && status == Status::Zero),
        });
        at += n;
    }
    out
}

/// Reads `buf`'s window at `offset`; with `--salvage`, sector by sector after a failure,
/// the sectors that cannot be read left as zeros with qemu-img's warning.
async fn read(how: &CopyOpts<'_>, src: &Sources<'_>, buf: IoBuf, offset: u64) -> Result<IoBuf> {
    let window = buf.window();
    let (res, mut buf) = src.read_at(buf, offset).await;
    let Err(e) = res else { return Ok(buf) };
    if !how.salvage {
        bail!("error while reading at byte {offset}: {}", strerror(&e));
    }
    const SECTOR: usize = 512;
    let mut at = window.start;
    while at < window.end {
        let next = (at + SECTOR).min(window.end);
        buf.set_window(at..next);
        let pos = offset + (at - window.start) as u64;
        let (res, b) = src.read_at(buf, pos).await;
        buf = b;
        if let Err(e) = res {
            if !how.quiet {
                eprintln!(
                    "{}: warning: error while reading offset {pos}: {}",
                    crate::util::program(),
                    strerror(&e)
                );
            }
            buf.as_full_mut_slice()[at..next].fill(0);
        }
        at = next;
    }
    buf.set_window(window);
    Ok(buf)
}
