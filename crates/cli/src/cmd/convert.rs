//! `qimg convert`: write the guest view of an image to a raw file or a new qcow2 image,
//! leaving holes (unallocated clusters) where the source reads zeros.

use crate::names::NameArgs;
use crate::util::{self, open_disk};
use anyhow::{bail, Context, Result};
use blockio::{Backend, FileOpener, IoBuf, LockRequest, OpenOptions, Opener, Perms};
use qcow2_engine::{Disk, Error, Image, ImageOptions, ReadResult, SnapshotLookup, SnapshotView};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The arguments of `qimg convert`.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Source format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    output_format: String,
    /// Options for the new image, as `qimg create -o` takes them (may be repeated).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Open in shared mode (qemu-img's -U): read the source while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// `-B`: the new image's backing file (as `-o backing_file=`): only what the source's
    /// top layer holds is written.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// `-F`: the backing file's format (as `-o backing_fmt=`).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// `-n`: the target exists: write into it instead of creating it (what the source reads
    /// as zeros is written as zeros).
    #[arg(short = 'n')]
    no_create: bool,
    /// `-c`: the new image's clusters compressed (qcow2 only, as qemu-img).
    #[arg(short = 'c')]
    compress: bool,
    /// Convert this internal snapshot of the source instead of its active layer:
    /// `ID_OR_NAME`, `snapshot.id=ID` or `snapshot.name=NAME` (qemu-img's -l).
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    #[command(flatten)]
    pub names: NameArgs,
    /// Source image.
    source: PathBuf,
    /// Destination file.
    dest: PathBuf,
}

/// Bytes read per request.
const CHUNK: usize = 2 << 20;
/// Granularity of zero detection (qemu-img convert's default `-S 4k`).
const SPARSE: usize = 4096;

/// Runs `qimg convert`: exit status 0, or 1 with the error on stderr.
pub async fn run(args: ConvertArgs) -> ExitCode {
    util::exit(1, convert(&args).await)
}

async fn convert(args: &ConvertArgs) -> Result<()> {
    let (source, dest) = (&args.source, &args.dest);
    // -B and -F are -o's backing_file and backing_fmt (commas doubled, as in -o values).
    let mut options = Vec::new();
    for (key, value) in [
        ("backing_file", &args.backing),
        ("backing_fmt", &args.backing_format),
    ] {
        if let Some(v) = value {
            options.push(format!("{key}={}", v.replace(',', ",,")));
        }
    }
    options.extend(args.options.iter().cloned());
    let options = &options;
    let disk = open_disk(
        &args.names.name(source, args.format.as_deref())?,
        args.force_share,
    )
    .await?;
    if args.backing.is_some() && args.output_format == "raw" {
        bail!("Backing file not supported for file format 'raw'");
    }
    if args.compress && args.output_format != "qcow2" {
        bail!("Compression not supported for this file format");
    }
    let reader = match &args.snapshot {
        None => Reader::Disk(&disk),
        Some(sel) => Reader::Snapshot(Box::new(open_snapshot(&disk, sel).await?)),
    };
    let size = reader.size();
    match args.output_format.as_str() {
        "raw" => {
            if !options.is_empty() && !args.no_create {
                super::create::create_for_convert("raw", options, dest, size).await?;
            }
            let out = FileOpener
                .open(
                    dest,
                    OpenOptions {
                        write: true,
                        create: !args.no_create,
                        truncate: !args.no_create,
                        direct: false,
                        // A raw image open for writing, as QEMU locks it.
                        lock: Some(LockRequest::new(
                            Perms::CONSISTENT_READ | Perms::WRITE,
                            Perms::ALL,
                        )),
                    },
                )
                .await
                .map_err(|e| match args.no_create {
                    true => anyhow::anyhow!(
                        "Could not open '{0}': Could not open '{0}': {1}",
                        dest.display(),
                        qcow2_engine::strerror(&e)
                    ),
                    false => anyhow::anyhow!("Could not create '{}': {e}", dest.display()),
                })?;
            if args.no_create && out.len().await? < size {
                bail!("output file is smaller than input file");
            }
            let sink = RawSink {
                file: &out,
                reads_zeros: !args.no_create,
            };
            copy(&reader, &[(0, size)], source, dest, &sink, SPARSE).await?;
            if !args.no_create {
                out.set_len(size)
                    .await
                    .with_context(|| format!("error while writing '{}'", dest.display()))?;
            }
            out.flush()
                .await
                .with_context(|| format!("error while writing '{}'", dest.display()))?;
        }
        "qcow2" => {
            if !args.no_create {
                super::create::create_for_convert("qcow2", options, dest, size).await?;
            }
            let out = Image::open(FileOpener, dest, ImageOptions::new())
                .await
                .map_err(|e| anyhow::anyhow!("Could not open '{}': {e}", dest.display()))?;
            if out.size() < size {
                out.close().await?;
                bail!("output file is smaller than input file");
            }
            let mut ranges = match (out.backing(), &reader) {
                // As qemu-img: with a backing file the new image takes what the source's top
                // layer says, and the backing file provides the rest.
                (Some(b), Reader::Disk(disk)) => top_layer(disk, b.size()).await?,
                _ => vec![(0, size)],
            };
            let sink = Qcow2Sink {
                img: &out,
                reads_zeros: out.backing().is_none() && !args.no_create,
                compress: args.compress,
            };
            let granule = if args.compress {
                // Compressed writes are whole clusters: so are the ranges and the zero test.
                let cs = out.cluster_size();
                ranges = whole_clusters(&ranges, cs, size);
                cs as usize
            } else {
                SPARSE
            };
            copy(&reader, &ranges, source, dest, &sink, granule).await?;
            out.close()
                .await
                .with_context(|| format!("error while writing '{}'", dest.display()))?;
        }
        other => bail!("output format '{other}' is not supported (use -O raw or -O qcow2)"),
    }
    Ok(())
}

/// The guest ranges a new image over a backing file of `backing_size` bytes takes from
/// `disk`, one per run of block status as qemu-img convert asks for them: what the top layer
/// of `disk` says something about (data, or zeros: allocated zeros, or unallocated clusters
/// of an image without a backing file); zeros past the end of the new backing file are left
/// out, since they read as zeros there anyway. The runs are kept apart, as qemu-img writes
/// each one by itself (a partial cluster of zeros is then written as qemu-img writes it).
/// `ranges` (sorted) widened to cluster boundaries (and the end of the disk), merged.
fn whole_clusters(ranges: &[(u64, u64)], cs: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in ranges {
        let (s, e) = (s / cs * cs, e.next_multiple_of(cs).min(size));
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

async fn top_layer(disk: &Disk<FileOpener>, backing_size: u64) -> Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    for e in disk.map(0, disk.size()).await? {
        let mut end = e.start + e.length;
        if e.zero && !e.data {
            end = end.min(backing_size.max(e.start));
        }
        if e.depth == 0 && end > e.start {
            ranges.push((e.start, end));
        }
    }
    Ok(ranges)
}

/// What `copy` reads: a disk's active layer, or a snapshot of it.
enum Reader<'a> {
    Disk(&'a Disk<FileOpener>),
    Snapshot(Box<SnapshotView<'a, FileOpener>>),
}

impl Reader<'_> {
    fn size(&self) -> u64 {
        match self {
            Reader::Disk(d) => d.size(),
            Reader::Snapshot(v) => v.size(),
        }
    }

    async fn read_at(&self, buf: IoBuf, offset: u64) -> ReadResult {
        match self {
            Reader::Disk(d) => d.read_at(buf, offset).await,
            Reader::Snapshot(v) => v.read_at(buf, offset).await,
        }
    }
}

/// The snapshot `sel` of `disk` (`-l`: `ID_OR_NAME`, `snapshot.id=ID` or
/// `snapshot.name=NAME`), with qemu-img's message when there is none.
async fn open_snapshot<'a>(
    disk: &'a Disk<FileOpener>,
    sel: &'a str,
) -> Result<SnapshotView<'a, FileOpener>> {
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
        Ok(v) => Ok(v),
        Err(Error::SnapshotNotFound { .. }) => {
            bail!("Failed to load snapshot: Can't find snapshot")
        }
        Err(e) => bail!("Failed to load snapshot: {e}"),
    }
}

/// Where `copy` writes the bytes it read.
trait Sink {
    /// Writes `buf`'s window at `offset`.
    async fn write(&self, buf: IoBuf, offset: u64) -> (std::io::Result<()>, IoBuf);
    /// Makes `[offset, offset+len)` read as zeros, where a hole would not.
    async fn zeroes(&self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// A raw file: holes of a new one read as zeros (`reads_zeros`); an existing one (`-n`)
/// gets zeros written.
struct RawSink<'a, B> {
    file: &'a B,
    reads_zeros: bool,
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
struct Qcow2Sink<'a> {
    img: &'a Image<FileOpener>,
    reads_zeros: bool,
    /// `-c`: data goes in as compressed writes.
    compress: bool,
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

/// Copies `ranges` of `disk` to `sink`: runs of non-zero granules are written, runs of zero
/// granules are left to read as zeros (`Sink::zeroes`).
async fn copy(
    disk: &Reader<'_>,
    ranges: &[(u64, u64)],
    source: &Path,
    dest: &Path,
    sink: &impl Sink,
    granule: usize,
) -> Result<()> {
    let mut buf = IoBuf::new(CHUNK);
    let written = || format!("error while writing '{}'", dest.display());
    for &(start, end) in ranges {
        let mut offset = start;
        while offset < end {
            let n = CHUNK.min((end - offset) as usize);
            buf.set_window(0..n);
            let (res, b) = disk.read_at(buf, offset).await;
            buf = b;
            res.with_context(|| format!("error while reading '{}'", source.display()))?;
            let mut i = 0;
            while i < n {
                let zero = granule_is_zero(&buf, i, n, granule);
                let run = i;
                while i < n && granule_is_zero(&buf, i, n, granule) == zero {
                    i += granule.min(n - i);
                }
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
        }
    }
    Ok(())
}

/// Whether the granule of `buf` at `i` (cut at `n`) holds only zeros.
fn granule_is_zero(buf: &IoBuf, i: usize, n: usize, granule: usize) -> bool {
    let g = granule.min(n - i);
    buf.as_full_slice()[i..i + g].iter().all(|&x| x == 0)
}
