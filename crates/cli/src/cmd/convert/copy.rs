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
    /// The unit of zero detection: runs of zero granules are left to read as zeros; `None`
    /// (`-S 0`): everything is written.
    pub granule: Option<usize>,
    /// `--salvage`: what cannot be read is written as zeros (with a warning).
    pub salvage: bool,
    /// `-q`: no warnings.
    pub quiet: bool,
}

/// Copies `ranges` (within one source part each) of `src` to `sink`; `steps` (guest end
/// offset and bytes of each of qemu-img's counted requests, in order) move `progress`
/// as the copy passes them.
pub async fn copy(
    how: &CopyOpts<'_>,
    src: &Sources<'_>,
    ranges: &[(u64, u64)],
    sink: &impl Sink,
    steps: &[(u64, u64)],
    progress: &mut Progress,
) -> Result<()> {
    let total: u64 = steps.iter().map(|s| s.1).sum();
    let (mut step, mut done) = (0, 0);
    let mut advance = |upto: u64, progress: &mut Progress| {
        while step < steps.len() && steps[step].0 <= upto {
            done += steps[step].1;
            step += 1;
            progress.set(percent(done, total));
        }
    };
    let mut buf = IoBuf::new(CHUNK);
    let written = || format!("error while writing '{}'", how.dest.display());
    for &(start, end) in ranges {
        let mut offset = start;
        while offset < end {
            let n = CHUNK.min((end - offset) as usize);
            buf.set_window(0..n);
            buf = read(how, src, buf, offset).await?;
            let mut i = 0;
            while i < n {
                let run = i;
                let zero = match how.granule {
                    None => {
                        i = n;
                        false
                    }
                    Some(g) => {
                        let zero = granule_is_zero(&buf, i, n, g);
                        while i < n && granule_is_zero(&buf, i, n, g) == zero {
                            i += g.min(n - i);
                        }
                        zero
                    }
                };
                let at = offset + run as u64;
                if zero {
                    sink.zeroes(at, (i - run) as u64)
                        .await
                        .with_context(written)?;
                } else {
                    buf.set_window(run..i);
                    let (res, b) = sink.write(buf, at).await;
                    buf = b;
                    res.with_context(written)?;
                }
            }
            offset += n as u64;
            advance(offset, progress);
        }
    }
    advance(u64::MAX, progress);
    Ok(())
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

/// Whether the granule of `buf` at `i` (cut at `n`) holds only zeros.
fn granule_is_zero(buf: &IoBuf, i: usize, n: usize, granule: usize) -> bool {
    let g = granule.min(n - i);
    buf.as_full_slice()[i..i + g].iter().all(|&x| x == 0)
}

/// The requests qemu-img convert makes of `runs` that its progress report counts (data;
/// zeros too with `-S 0`), as (guest end offset, bytes), in order: runs of data cut into
/// buffers, zeros with `-S 0` too; with compression (`cluster`), whole clusters.
pub fn progress_steps(
    runs: &[Run],
    size: u64,
    sparse: bool,
    cluster: Option<u64>,
) -> Vec<(u64, u64)> {
    // Compressed, qemu-img copies a cluster at a time.
    let buf = cluster.unwrap_or(CHUNK as u64);
    let mut steps = Vec::new();
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
        let counted = status == Status::Data || (!sparse && status == Status::Zero);
        if !sparse && status == Status::Zero {
            n = n.min(buf);
        }
        at += n;
        if counted {
            steps.push((at, n));
        }
    }
    steps
}
