//! A scenario's image: made once, then copied for every case; where its metadata lives (to
//! classify the backend requests); the guest requests run on it.

use super::{pattern, snapshot_name, BitmapOp, Class, Img, Scenario, Source, G, MIB};
use blockio::{FaultOpener, IoBuf, LogEntry, MemoryBackend, MemoryOpener, OpKind};
use qcow2_engine::{BitmapAction, Error, Image, ImageOptions, ResizeOptions, SnapshotLookup};
use qcow2_format::{Header, L1Entry, ReftableEntry, Snapshot};
use qcow2_tests::{path_str, qemu_img};
use std::collections::HashSet;
use std::ops::Range;
use std::path::PathBuf;

/// A scenario's image, ready to be copied for every case.
pub struct Prepared {
    /// Kept alive for the fixture's files.
    pub _fixture: Option<qcow2_tests::Fixture>,
    pub _dir: tempfile::TempDir,
    /// Where the image is (its backing files beside it).
    pub image: PathBuf,
    /// Every file of the image's directory, by path (the image itself included).
    pub files: Vec<(PathBuf, Vec<u8>)>,
    pub initial: Vec<u8>,
    pub cluster: u64,
}

pub fn prepare(source: Source) -> Prepared {
    match source {
        Source::Create(opts, size) => prepare(Source::Patched(opts, size, |_| {})),
        Source::Patched(opts, size, patch) => {
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("img.qcow2");
            let size_s = size.to_string();
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.extend([path_str(&image), &size_s]);
            qemu_img(&args);
            let mut bytes = std::fs::read(&image).unwrap();
            patch(&mut bytes);
            std::fs::write(&image, &bytes).unwrap();
            let cluster = Header::parse(&bytes).unwrap().geometry().cluster_size();
            Prepared {
                _fixture: None,
                _dir: dir,
                files: vec![(image.clone(), bytes)],
                image,
                initial: vec![0; size as usize],
                cluster,
            }
        }
        Source::Fixture(name) => {
            let fx = qcow2_tests::fixture(name).build();
            let initial = fx.raw_reference();
            let mut files = Vec::new();
            for e in std::fs::read_dir(fx.dir.path()).unwrap() {
                let p = e.unwrap().path();
                if p.is_file() {
                    files.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
            let dir = tempfile::tempdir().unwrap();
            Prepared {
                image: fx.image.clone(),
                cluster: fx.expect.cluster_size,
                initial,
                files,
                _dir: dir,
                _fixture: Some(fx),
            }
        }
    }
}

impl Prepared {
    pub fn base(&self) -> &[u8] {
        &self
            .files
            .iter()
            .find(|(p, _)| *p == self.image)
            .expect("the image")
            .1
    }

    /// A fresh in-memory copy of the image and its backing files.
    pub fn opener(&self) -> (FaultOpener<MemoryOpener>, MemoryBackend) {
        let mem = MemoryOpener::new();
        for (p, b) in &self.files {
            mem.insert(p, MemoryBackend::from_vec(b.clone()));
        }
        let file = mem.get(&self.image).unwrap();
        (FaultOpener::new(mem), file)
    }

    /// Writes `bytes` beside the image (so that its backing file resolves) for qemu-img.
    pub fn scratch(&self, bytes: &[u8], tag: &str) -> PathBuf {
        let p = self
            .image
            .with_file_name(format!("scratch-{tag}-{}.qcow2", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// Where the metadata of an image lives, to classify requests.
#[derive(Default)]
pub struct MetaMap {
    pub cluster: u64,
    pub l1: Vec<Range<u64>>,
    pub reftables: Vec<Range<u64>>,
    pub refblocks: HashSet<u64>,
    pub l2: HashSet<u64>,
    pub bitmaps: Vec<Range<u64>>,
    pub snapshot_tables: Vec<Range<u64>>,
}

impl MetaMap {
    pub fn add(&mut self, bytes: &[u8]) {
        let Ok(h) = Header::parse(&bytes[..bytes.len().min(2 * MIB as usize)]) else {
            return;
        };
        let geo = h.geometry();
        let cs = geo.cluster_size();
        self.cluster = cs;
        let u64s = |r: Range<u64>| -> Vec<u64> {
            let r = r.start as usize..(r.end as usize).min(bytes.len());
            bytes[r]
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect()
        };
        let l1 = h.l1_table_offset..h.l1_table_offset + u64::from(h.l1_size) * 8;
        for e in u64s(l1.clone()) {
            if let Ok(Some(o)) = L1Entry(e).l2_offset(&geo) {
                self.l2.insert(o.0);
            }
        }
        self.l1.push(l1);
        let rt = h.refcount_table_offset
            ..h.refcount_table_offset + u64::from(h.refcount_table_clusters) * cs;
        for e in u64s(rt.clone()) {
            if let Ok(Some(o)) = ReftableEntry(e).block_offset(cs) {
                self.refblocks.insert(o.0);
            }
        }
        self.reftables.push(rt);
        if h.nb_snapshots > 0 {
            let at = (h.snapshots_offset as usize).min(bytes.len());
            if let Ok(list) = Snapshot::parse_table(&bytes[at..], h.nb_snapshots) {
                let len: usize = list.iter().map(Snapshot::serialized_len).sum();
                self.snapshot_tables
                    .push(h.snapshots_offset..h.snapshots_offset + len as u64);
                for s in &list {
                    let l1 = s.l1_table_offset..s.l1_table_offset + u64::from(s.l1_size) * 8;
                    for e in u64s(l1.clone()) {
                        if let Ok(Some(o)) = L1Entry(e).l2_offset(&geo) {
                            self.l2.insert(o.0);
                        }
                    }
                    self.l1.push(l1);
                }
            }
        }
        if let Some(b) = h.bitmaps() {
            self.bitmaps
                .push(b.directory_offset..b.directory_offset + b.directory_size);
        }
    }

    pub fn classify(&self, e: &LogEntry) -> Class {
        let i = &e.info;
        if i.file != 0 {
            return Class::BackingRead;
        }
        let cs = self.cluster.max(1);
        let cluster = i.offset / cs * cs;
        let in_any = |v: &[Range<u64>]| {
            v.iter()
                .any(|r| i.offset < r.end && r.start < i.offset + i.len.max(1))
        };
        let write = i.op == OpKind::Write;
        match i.op {
            OpKind::Flush => Class::Flush,
            OpKind::PunchHole => Class::PunchHole,
            OpKind::WriteZeroes => Class::WriteZeroes,
            OpKind::SetLen => Class::SetLen,
            _ if i.offset < cs => {
                if write {
                    Class::HeaderWrite
                } else {
                    Class::MetadataRead
                }
            }
            _ if in_any(&self.l1) => {
                if write {
                    Class::L1Write
                } else {
                    Class::MetadataRead
                }
            }
            _ if in_any(&self.reftables) => {
                if write {
                    Class::ReftableWrite
                } else {
                    Class::MetadataRead
                }
            }
            _ if write && in_any(&self.bitmaps) => Class::BitmapWrite,
            _ if write && in_any(&self.snapshot_tables) => Class::SnapshotTableWrite,
            _ if self.refblocks.contains(&cluster) => {
                if write {
                    Class::RefblockWrite
                } else {
                    Class::MetadataRead
                }
            }
            _ if self.l2.contains(&cluster) => {
                if write {
                    Class::L2WriteBack
                } else {
                    Class::L2Load
                }
            }
            _ => {
                if write {
                    Class::DataWrite
                } else {
                    Class::DataRead
                }
            }
        }
    }
}

pub fn opts(scn: &Scenario) -> ImageOptions {
    let o = ImageOptions::new();
    match scn.l2_cache {
        Some(b) => o.l2_cache_size(b),
        None => o,
    }
}

pub async fn open(opener: &FaultOpener<MemoryOpener>, p: &Prepared, scn: &Scenario) -> Img {
    Image::open(opener.clone(), &p.image, opts(scn))
        .await
        .unwrap_or_else(|e| panic!("{}: open: {e}", scn.name))
}

/// Runs one guest request (not `Close`/`Reopen`); reads return their data.
pub async fn exec(img: &Img, g: G, id: usize) -> Result<Option<Vec<u8>>, Error> {
    let has = |list: &[Snapshot], n: u8| list.iter().any(|s| s.name == snapshot_name(n));
    match g {
        G::Write(off, len) => {
            let data: Vec<u8> = (off..off + len).map(|b| pattern(id, b)).collect();
            img.write_at(IoBuf::from_slice(&data), off).await.0?;
        }
        G::Compressed(off, len) => {
            let data: Vec<u8> = (off..off + len).map(|b| pattern(id, b)).collect();
            img.write_compressed(IoBuf::from_slice(&data), off)
                .await
                .0?;
        }
        G::Zero(off, len, unmap) => img.write_zeroes(off, len, unmap).await?,
        G::Discard(off, len) => img.discard(off, len).await?,
        G::Flush => img.flush().await?,
        G::Read(off, len) => return Ok(Some(img.read(off, len).await?.to_vec())),
        // Run again after a failure that took effect anyway: done already.
        G::SnapCreate(n) => {
            if !has(&img.snapshots().await?, n) {
                img.snapshot_create(&snapshot_name(n)).await?;
            }
        }
        G::SnapDelete(n) => {
            if has(&img.snapshots().await?, n) {
                let name = snapshot_name(n);
                img.snapshot_delete(SnapshotLookup::Name(&name)).await?;
            }
        }
        G::SnapApply(n) => {
            let name = snapshot_name(n);
            img.snapshot_apply(SnapshotLookup::Name(&name)).await?;
        }
        G::Resize(size) => {
            img.resize(size, ResizeOptions::new().shrink(true)).await?;
        }
        G::Close | G::Reopen | G::Bitmap(..) => unreachable!("handled by the caller"),
    }
    Ok(None)
}

/// Runs a request that consumes the image ([`G::closes`]).
pub async fn exec_closing(img: Img, g: G) -> Result<(), Error> {
    match g {
        G::Close => img.close().await,
        G::Bitmap(name, op) => {
            let action = match op {
                BitmapOp::Add => BitmapAction::Add { granularity: None },
                BitmapOp::Remove => BitmapAction::Remove,
                BitmapOp::Clear => BitmapAction::Clear,
                BitmapOp::Disable => BitmapAction::Disable,
            };
            img.bitmap_edit(name, &[action]).await
        }
        _ => unreachable!("{g:?} does not close the image"),
    }
}

pub async fn read_all(img: &Img, size: u64) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(MIB);
        out.extend_from_slice(&img.read(pos, n).await?);
        pos += n;
    }
    Ok(out)
}
