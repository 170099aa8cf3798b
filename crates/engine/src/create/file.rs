//! Creating the files: the plan (QEMU's creation sequence replayed on the allocator model),
//! written in a crash-safe order, the header last; raw images; the backing file probed.

use super::sim::*;
use super::*;

/// Creates a qcow2 image at `path` (replacing any file there) with the layout `qemu-img
/// create` gives it, byte for byte, and flushes it. Returns nothing: open the image with
/// [`Image::open`](crate::Image::open) afterwards.
///
/// Steps, in qemu-img's order: backing file checks (an empty name, the image's own name, then
/// opening it through `opener`, relative to the image's directory, to take its size when none
/// was given), the size, [`CreateOptions::validate`], the header's space; only then are files
/// created. The external data file, if any, is created at its path as given.
///
/// Errors: [`Error::Create`] for invalid options, [`Error::Io`] for failed writes.
///
/// # Cancel safety
///
/// Dropping the future leaves a partly written file at `path` (as an interrupted
/// `qemu-img create` does): not an image to use. Create it again.
pub async fn create<O: Opener>(
    opener: &O,
    path: impl AsRef<Path>,
    options: &CreateOptions,
) -> Result<()> {
    let path = path.as_ref();
    let mut size = options.size;
    if let Some((name, fmt)) = &options.backing {
        if path.as_os_str() == std::ffi::OsStr::new(name) {
            return Err(CreateError::BackingIsImage.into());
        }
        if name.is_empty() {
            return Err(CreateError::EmptyBackingName.into());
        }
        if options.check_backing {
            let (backing_size, _) = probe_backing(opener, path, name, Some(*fmt)).await?;
            size.get_or_insert(backing_size);
        }
    }
    let size = size.ok_or(CreateError::MissingSize)?;
    let options = CreateOptions {
        size: Some(size),
        ..options.clone()
    };
    options.validate()?;
    options.check_header_space()?;
    let plan = plan(&options, size)?;
    write_plan(opener, path, &options, &plan).await
}

/// Opens the backing file `name` of an image to be created at `image` (relative names are
/// relative to the image's directory) read-only with its own backing chain, as `format` or,
/// when `None`, as whatever format it probes as. Returns its virtual size rounded up to 512
/// bytes (what qemu-img takes as the new image's size when none is given) and its format.
///
/// # Cancel safety
///
/// Reads only: dropping the future changes nothing.
pub async fn probe_backing<O: Opener>(
    opener: &O,
    image: &Path,
    name: &str,
    format: Option<ImageFormat>,
) -> Result<(u64, ImageFormat)> {
    let resolved = resolve_backing(image, name);
    let disk = Disk::open(
        opener.clone(),
        &resolved,
        format,
        ImageOptions::new().read_only(true),
    )
    .await
    .map_err(|e| CreateError::OpenBacking {
        message: match &e {
            Error::Format {
                source: FormatError::BadMagic(_),
                ..
            } => "Image is not in qcow2 format".to_owned(),
            other => other.to_string(),
        },
        path: resolved.clone(),
    })?;
    Ok((disk.size().div_ceil(512) * 512, disk.format()))
}

/// Creates a raw image of `size` bytes (rounded up to 512, as qemu-img does) at `path`,
/// replacing any file there: sparse (`Off`), allocated (`Falloc`) or written with zeros
/// (`Full`). `Metadata` is refused, as QEMU refuses it for raw files.
///
/// # Cancel safety
///
/// As [`create`]: a dropped creation leaves a partly written file.
pub async fn create_raw<O: Opener>(
    opener: &O,
    path: impl AsRef<Path>,
    size: u64,
    preallocation: Preallocation,
) -> Result<()> {
    let path = path.as_ref();
    if preallocation == Preallocation::Metadata {
        return Err(CreateError::UnsupportedPreallocation(preallocation).into());
    }
    let size = size.div_ceil(512) * 512;
    let file = open_new(opener, path, "image").await?;
    let ctx = || format!("could not create {}", path.display());
    fill(&file, 0, size, preallocation)
        .await
        .map_err(|e| Error::io(ctx(), e))?;
    file.set_len(size).await.map_err(|e| Error::io(ctx(), e))?;
    file.flush().await.map_err(|e| Error::io(ctx(), e))?;
    Ok(())
}

pub(super) async fn open_new<O: Opener>(
    opener: &O,
    path: &Path,
    role: &'static str,
) -> Result<O::Backend> {
    // QEMU's file driver creates under these locks, taken before the file is truncated: a
    // file another process uses (for reading or writing) is left alone.
    let lock = LockRequest::new(
        Perms::WRITE | Perms::RESIZE,
        Perms::ALL.without(Perms::RESIZE),
    );
    opener
        .open(
            path,
            OpenOptions {
                write: true,
                create: true,
                truncate: true,
                direct: false,
                lock: Some(lock),
            },
        )
        .await
        .map_err(|source| crate::image::open_error(role, path, source))
}

/// Allocates `[start, end)` as the preallocation mode asks: nothing for `Off`/`Metadata`
/// (the caller sets the length), zero-range allocation for `Falloc`, zero bytes for `Full`.
pub(super) async fn fill<B: Backend>(
    file: &B,
    start: u64,
    end: u64,
    mode: Preallocation,
) -> io::Result<()> {
    if end <= start {
        return Ok(());
    }
    match mode {
        Preallocation::Off | Preallocation::Metadata => Ok(()),
        Preallocation::Falloc => file.write_zeroes(start, end - start, Keep::none()).await,
        Preallocation::Full => {
            const CHUNK: u64 = 1 << 20;
            let mut buf = IoBuf::new(CHUNK.min(end - start) as usize);
            let mut off = start;
            while off < end {
                let n = (end - off).min(CHUNK) as usize;
                buf.set_window(0..n);
                let (r, b) = file.write_at(buf, off).await;
                buf = b;
                r?;
                off += n as u64;
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------
// The plan: QEMU's creation sequence replayed on a model of its allocator.
// ---------------------------------------------------------------------------------------

/// What to write: the allocator model's final state plus file lengths and preallocation.
pub(super) struct Plan {
    pub(super) sim: Sim,
    pub(super) header: Header,
    /// Final length of the image file.
    pub(super) file_len: u64,
    /// Area of the image file to preallocate (falloc/full without a data file).
    pub(super) data_area: Option<(u64, u64)>,
    /// Area of the data file to preallocate (falloc/full with a data file).
    pub(super) data_file_area: Option<(u64, u64)>,
    /// Final length of the data file (if any).
    pub(super) data_file_len: u64,
    /// The preallocation mode in effect.
    pub(super) mode: Preallocation,
}

pub(super) fn plan(options: &CreateOptions, size: u64) -> Result<Plan, CreateError> {
    let bits = options.cluster_size.trailing_zeros();
    let has_data_file = options.data_file.is_some();
    let mut sim = Sim::new(bits, options.width()?, options.extended_l2, has_data_file);
    let mode = options.effective_preallocation();
    let map = |e: SimErr| match e {
        SimErr::TooLarge => CreateError::TooLarge,
        SimErr::Again => CreateError::Internal("unhandled retry"),
        SimErr::Bug(what) => CreateError::Internal(what),
    };
    let out = sim.create_and_truncate(size, mode).map_err(map)?;
    let header = options.header(size, &sim)?;
    Ok(Plan {
        file_len: sim.file_len,
        data_area: out.data_area,
        data_file_area: out.data_file_area,
        data_file_len: sim.data_file_len,
        mode,
        header,
        sim,
    })
}

pub(super) async fn write_plan<O: Opener>(
    opener: &O,
    path: &Path,
    options: &CreateOptions,
    plan: &Plan,
) -> Result<()> {
    // The data file first: the image must never name a data file that is not there yet.
    if let Some(df) = &options.data_file {
        let df_path = Path::new(df);
        let data = open_new(opener, df_path, "data file").await?;
        let ctx = || format!("could not create data file {}", df_path.display());
        for &(in_data_file, off, len) in &plan.sim.zero_writes {
            if in_data_file {
                fill(&data, off, off + len, Preallocation::Full)
                    .await
                    .map_err(|e| Error::io(ctx(), e))?;
            }
        }
        if let Some((start, end)) = plan.data_file_area {
            fill(&data, start, end, plan.mode)
                .await
                .map_err(|e| Error::io(ctx(), e))?;
        }
        if plan.data_file_len > 0 {
            data.set_len(plan.data_file_len)
                .await
                .map_err(|e| Error::io(ctx(), e))?;
        }
        data.flush().await.map_err(|e| Error::io(ctx(), e))?;
    }

    let file = open_new(opener, path, "image").await?;
    let ctx = || format!("could not create {}", path.display());
    let sim = &plan.sim;
    let cs = sim.cs;

    // 1. Stale bytes QEMU leaves behind (old refcount tables), oldest first.
    for (off, bytes) in &sim.stale {
        write_bytes(&file, *off, bytes)
            .await
            .map_err(|e| Error::io(ctx(), e))?;
    }
    // ... and the zeros QEMU's copy-on-write puts in the tail of a last, partial data
    // cluster.
    for &(in_data_file, off, len) in &sim.zero_writes {
        if !in_data_file {
            fill(&file, off, off + len, Preallocation::Full)
                .await
                .map_err(|e| Error::io(ctx(), e))?;
        }
    }
    // 2. Live metadata, in file order: refcount blocks, refcount table, L1, L2 tables.
    let mut live: Vec<(u64, Live)> = Vec::new();
    for (i, &e) in sim.reftable.iter().enumerate() {
        if e != 0 {
            live.push((e, Live::Refblock(i as u64)));
        }
    }
    live.push((sim.reftable_offset, Live::Reftable));
    if !sim.l1.is_empty() {
        live.push((sim.l1_offset, Live::L1));
    }
    for (&l1_index, l2) in &sim.l2 {
        live.push((l2.offset, Live::L2(l1_index)));
    }
    live.sort_by_key(|&(off, _)| off);
    let mut cluster = IoBuf::new(cs as usize);
    for (off, what) in live {
        match what {
            Live::Refblock(i) => {
                cluster.set_window(0..cs as usize);
                sim.render_refblock(i, &mut cluster);
                let (r, b) = file.write_at(cluster, off).await;
                cluster = b;
                r.map_err(|e| Error::io(ctx(), e))?;
            }
            Live::L2(l1_index) => {
                cluster.set_window(0..cs as usize);
                sim.render_l2(l1_index, &mut cluster);
                let (r, b) = file.write_at(cluster, off).await;
                cluster = b;
                r.map_err(|e| Error::io(ctx(), e))?;
            }
            Live::Reftable => {
                let bytes: Vec<u8> = sim.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
                write_bytes(&file, off, &bytes)
                    .await
                    .map_err(|e| Error::io(ctx(), e))?;
            }
            Live::L1 => {
                let mut bytes = vec![0u8; sim.l1.len() * 8];
                for (i, &e) in sim.l1.iter().enumerate() {
                    L1Entry(e).write(&mut bytes, i);
                }
                write_bytes(&file, off, &bytes)
                    .await
                    .map_err(|e| Error::io(ctx(), e))?;
            }
        }
    }
    // 3. The data area, then the exact length QEMU leaves.
    if let Some((start, end)) = plan.data_area {
        fill(&file, start, end, plan.mode)
            .await
            .map_err(|e| Error::io(ctx(), e))?;
    }
    file.set_len(plan.file_len)
        .await
        .map_err(|e| Error::io(ctx(), e))?;
    file.flush().await.map_err(|e| Error::io(ctx(), e))?;

    // 4. The header, last: until it is on disk the file is not an image at all.
    let mut header = plan
        .header
        .serialize()
        .map_err(|_| CreateError::HeaderNoSpace)?;
    header.resize(cs as usize, 0);
    write_bytes(&file, 0, &header)
        .await
        .map_err(|e| Error::io(ctx(), e))?;
    file.flush().await.map_err(|e| Error::io(ctx(), e))?;
    Ok(())
}

pub(super) enum Live {
    Refblock(u64),
    Reftable,
    L1,
    L2(u64),
}

pub(super) async fn write_bytes<B: Backend>(file: &B, offset: u64, bytes: &[u8]) -> io::Result<()> {
    let (r, _) = file.write_at(IoBuf::from_slice(bytes), offset).await;
    r
}
