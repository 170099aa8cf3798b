//! Cancellation must not reopen the race (invariant I9), replayed step by step.
//!
//! A request's future is dropped while the backend still holds an operation it accepted (the
//! fault injector behaves as the kernel does: a held request whose submitter is gone still
//! completes once released, run by the orphan driver). Each case then does what could reuse
//! what the dropped request was guarding, and lets the late operation land:
//!
//! 1. an in-place write dropped in flight, its cluster discarded and reallocated;
//! 2. an allocating write dropped in flight, its new cluster wanted by another write (and
//!    afterwards nothing may leak);
//! 3. a flush dropped during the punch-hole of a freed cluster, the cluster reallocated;
//! 4. a flush dropped during a metadata write, a later flush writing a newer version of the
//!    same refcount block.
//!
//! Each case runs twice: in `memory`, over an image in memory; in `ring`, over the image's
//! file through the io_uring backend (`RingOpener`, a tokio runtime reaping its rings). The
//! scene's tasks run on one thread (`LocalPool`): it is stalled when no task can go on
//! (`run_until_stalled`) and no call into the backend under the injector is still running
//! (`FaultController::running`), so every task waits for a held request: no sleeps. The
//! images end checked by `qemu-img check` (no corruption, no leak) and read by QEMU.
//!
//! Built with `--cfg qcow2_no_keep` a `blockio::Keep` holds nothing, so guards die with the
//! dropped future as they did before I9: every case here must then fail, on both backends
//! (scripts/must-fail.sh checks it).

use blockio::{
    FaultController, FaultOpener, MemoryBackend, MemoryOpener, OpKind, Opener, RequestFilter,
    RingOpener,
};
use futures::executor::LocalPool;
use futures::future::RemoteHandle;
use futures::task::LocalSpawnExt;
use qcow2_engine::{ExtentKind, Image, ImageOptions};
use qcow2_format::HostCluster;
use qcow2_tests::{path_str, qemu_check, qemu_img, raw_reference};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;

const CS: u64 = 65536;
/// The guest cluster whose request is dropped.
const G0: u64 = 0;
/// A guest cluster written afterwards.
const G1: u64 = 16 * CS;
/// A guest cluster written first, so that the first-write work is done before any hold.
const G2: u64 = 32 * CS;

/// Where the image lives, under the fault injector.
trait Medium: Sized {
    type Opener: Opener;
    /// Takes the image `qemu-img` created at `path`.
    fn new(path: &Path) -> (Self, Self::Opener);
    /// What the scene's steps run in (a runtime's context for the ring).
    fn enter(&self) -> Option<tokio::runtime::EnterGuard<'_>>;
    /// Leaves the image's contents at `path`, closed, for QEMU.
    fn save(&self, path: &Path);
}

/// The image in memory.
struct Memory(MemoryOpener);

impl Medium for Memory {
    type Opener = MemoryOpener;

    fn new(path: &Path) -> (Memory, MemoryOpener) {
        let mem = MemoryOpener::new();
        mem.insert(path, MemoryBackend::from_vec(std::fs::read(path).unwrap()));
        (Memory(mem.clone()), mem)
    }

    fn enter(&self) -> Option<tokio::runtime::EnterGuard<'_>> {
        None
    }

    fn save(&self, path: &Path) {
        let bytes = self.0.get(path).unwrap().snapshot();
        std::fs::write(path, bytes).unwrap();
    }
}

/// The image's file through io_uring: the scene's thread submits to its own ring, which a
/// task of this runtime (on its worker thread) reaps.
struct Ring(tokio::runtime::Runtime);

impl Medium for Ring {
    type Opener = RingOpener;

    fn new(_: &Path) -> (Ring, RingOpener) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        (Ring(rt), RingOpener)
    }

    fn enter(&self) -> Option<tokio::runtime::EnterGuard<'_>> {
        Some(self.0.enter())
    }

    fn save(&self, _: &Path) {}
}

type Img<M> = Image<FaultOpener<<M as Medium>::Opener>>;

/// An image over the fault injector, its tasks driven on one thread.
struct Scene<M: Medium> {
    _dir: tempfile::TempDir,
    path: PathBuf,
    ctl: FaultController,
    pool: LocalPool,
    img: Option<Rc<Img<M>>>,
    /// Last: the ring's runtime outlives the tasks and the image.
    medium: M,
}

impl<M: Medium> Scene<M> {
    fn new() -> Scene<M> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cancel.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&path), "4M"]);
        let (medium, inner) = M::new(&path);
        let opener = FaultOpener::new(inner);
        let ctl = opener.controller();
        let mut pool = LocalPool::new();
        pool.spawner().spawn_local(opener.orphan_driver()).unwrap();
        let img = {
            let _cx = medium.enter();
            pool.run_until(Image::open(opener, &path, ImageOptions::new()))
                .unwrap()
        };
        let mut s = Scene {
            _dir: dir,
            path,
            ctl,
            pool,
            img: Some(Rc::new(img)),
            medium,
        };
        let img = s.img();
        s.run(async move { img.write(G2, &[0x22; 512]).await.unwrap() });
        s
    }

    fn img(&self) -> Rc<Img<M>> {
        self.img.clone().expect("open")
    }

    fn run<T>(&mut self, f: impl Future<Output = T>) -> T {
        let _cx = self.medium.enter();
        self.pool.run_until(f)
    }

    /// Runs every task until each waits for something held: until no task can go on and
    /// nothing they asked of the backend under the injector is still running.
    fn stall(&mut self) {
        let _cx = self.medium.enter();
        loop {
            self.pool.run_until_stalled();
            if self.ctl.running() == 0 {
                return;
            }
            self.pool.run_until(self.ctl.idle());
        }
    }

    /// Spawns a request; dropping the handle drops the request's future (at the next stall).
    fn spawn<T: 'static>(&mut self, f: impl Future<Output = T> + 'static) -> RemoteHandle<T> {
        let h = self.pool.spawner().spawn_local_with_handle(f).unwrap();
        self.stall();
        h
    }

    /// Drops a spawned request, and checks that what it left held is an orphan now.
    fn abort<T>(&mut self, task: RemoteHandle<T>, held: &blockio::HeldRequest) {
        drop(task);
        self.stall();
        assert!(held.is_orphan(), "the request's future was not dropped");
    }

    fn write(&mut self, at: u64, byte: u8) {
        let img = self.img();
        self.run(async move { img.write(at, &vec![byte; CS as usize]).await.unwrap() });
    }

    fn flush(&mut self) {
        let img = self.img();
        self.run(async move { img.flush().await.unwrap() });
    }

    fn read(&mut self, at: u64) -> Vec<u8> {
        let img = self.img();
        self.run(async move { img.read(at, CS).await.unwrap().to_vec() })
    }

    /// The host offset guest cluster `g` maps to.
    fn host(&mut self, g: u64) -> u64 {
        let img = self.img();
        let ext = self.run(async move { img.block_status(g, CS).await.unwrap() });
        match ext[0].kind {
            ExtentKind::Data { host, .. } => host,
            other => panic!("guest {g:#x} is not mapped to data: {other:?}"),
        }
    }

    fn is_leased(&self, host: u64) -> bool {
        self.img().leases().is_leased(HostCluster(host / CS))
    }

    /// Closes the image, checks the file with `qemu-img check` (clean: no corruption and
    /// no leak) and returns what QEMU reads.
    fn finish(mut self) -> Vec<u8> {
        let img = Rc::try_unwrap(self.img.take().unwrap())
            .ok()
            .expect("no other user");
        self.run(img.close()).unwrap();
        assert_eq!(self.ctl.held_count(), 0, "requests still held");
        // The orphan driver keeps every file the opener opened (and its locks): it goes.
        self.pool = LocalPool::new();
        self.medium.save(&self.path);
        let check = qemu_check(&self.path);
        assert!(
            check.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        raw_reference(&self.path, "qcow2")
    }
}

fn all(data: &[u8], byte: u8) -> bool {
    data.iter().all(|&b| b == byte)
}

fn cluster(raw: &[u8], g: u64) -> &[u8] {
    &raw[g as usize..(g + CS) as usize]
}

/// Runs each case on each medium, as `memory::CASE` and `ring::CASE`.
macro_rules! on_each_medium {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(#[test]
            fn $case() {
                super::$case::<super::Memory>();
            })*
        }
        mod ring {
            $(#[test]
            fn $case() {
                super::$case::<super::Ring>();
            })*
        }
    };
}

on_each_medium!(
    in_place_write_dropped_in_flight,
    allocating_write_dropped_in_flight,
    flush_dropped_during_punch,
    flush_dropped_during_metadata_write,
);

/// 1. A rewrite of G0 at H is accepted and held; its task is aborted; G0 is discarded and
///    flushed; G1 is allocated; the held write lands. It must land on H while H is still
///    unallocatable, not on G1's data.
fn in_place_write_dropped_in_flight<M: Medium>() {
    let mut s = Scene::<M>::new();
    s.write(G0, 0xaa);
    s.flush();
    let h = s.host(G0);
    s.ctl
        .hold(RequestFilter::op(OpKind::Write).in_range(h..h + CS));
    let img = s.img();
    let task = s.spawn(async move { img.write(G0, &vec![0xbb; CS as usize]).await });
    let held = s.ctl.try_next_held().expect("the rewrite is held");
    s.ctl.stop_holding();
    s.abort(task, &held);
    let leased = s.is_leased(h);

    s.write(G0 + CS, 0x11);
    let img = s.img();
    s.run(async move { img.discard(G0, CS).await.unwrap() });
    s.flush();
    s.write(G1, 0xcc);
    s.flush();
    let h1 = s.host(G1);
    held.release();
    s.stall();
    assert!(all(&s.read(G1), 0xcc), "G1 reads the dropped write's data");
    assert!(leased, "the dropped write's lease died before its I/O");
    assert_ne!(h1, h, "H was reallocated while a write to it was in flight");
    assert!(!s.is_leased(h), "the lease outlived the write");
    let raw = s.finish();
    assert!(all(cluster(&raw, G1), 0xcc), "G1");
    assert!(all(cluster(&raw, G0), 0), "G0 was discarded");
}

/// 2. A write to unallocated G0 is accepted (its data write to a new cluster H held); its
///    task is aborted. H must not go to G1's write while the data write may land, and must
///    come back afterwards: nothing leaks.
fn allocating_write_dropped_in_flight<M: Medium>() {
    let mut s = Scene::<M>::new();
    s.ctl.hold(RequestFilter::op(OpKind::Write));
    let img = s.img();
    let task = s.spawn(async move { img.write(G0, &vec![0xbb; CS as usize]).await });
    let held = s.ctl.try_next_held().expect("the data write is held");
    s.ctl.stop_holding();
    let h = held.info().offset;
    s.abort(task, &held);
    let leased = s.is_leased(h);

    s.write(G1, 0xcc);
    s.flush();
    let h1 = s.host(G1);
    held.release();
    s.stall();
    assert!(all(&s.read(G1), 0xcc), "G1 reads the dropped write's data");
    assert!(leased, "the dropped write's guards died before its I/O");
    assert_ne!(h1, h, "the reserved cluster went to another write");
    // The dropped write never installed its mapping: G0 reads as before.
    assert!(all(&s.read(G0), 0), "G0");
    // H is free again: the next allocation may take it.
    s.write(G0 + CS, 0x33);
    let raw = s.finish();
    assert!(all(cluster(&raw, G1), 0xcc), "G1");
    assert!(all(cluster(&raw, G0), 0), "G0");
    assert!(all(cluster(&raw, G0 + CS), 0x33), "G0 + 1");
}

/// 3. G0 is discarded; the flush that frees H is aborted while its punch-hole of H is held.
///    H must stay unallocatable until the punch lands, so the punch cannot zero G1's data.
fn flush_dropped_during_punch<M: Medium>() {
    let mut s = Scene::<M>::new();
    s.write(G0, 0xaa);
    s.flush();
    let h = s.host(G0);
    let img = s.img();
    s.run(async move { img.discard(G0, CS).await.unwrap() });
    s.ctl
        .hold(RequestFilter::op(OpKind::PunchHole).in_range(h..h + CS));
    let img = s.img();
    let task = s.spawn(async move { img.flush().await });
    let held = s.ctl.try_next_held().expect("the punch is held");
    s.ctl.stop_holding();
    s.abort(task, &held);
    let leased = s.is_leased(h);

    s.write(G1, 0xcc);
    s.flush();
    let h1 = s.host(G1);
    held.release();
    s.stall();
    assert!(all(&s.read(G1), 0xcc), "a late punch zeroed G1");
    assert!(leased, "the exclusive lease died before the punch");
    assert_ne!(h1, h, "H was reallocated before its punch landed");
    let raw = s.finish();
    assert!(all(cluster(&raw, G1), 0xcc), "G1");
}

/// 4. A flush is aborted while its write of a refcount block is held; G1 is allocated (the
///    block changes again) and flushed. The newer version of the block must not be written
///    before the stale one has landed, or the stale one would end on disk.
fn flush_dropped_during_metadata_write<M: Medium>() {
    let mut s = Scene::<M>::new();
    s.write(G0, 0xaa);
    s.ctl.hold(RequestFilter::op(OpKind::Write));
    let img = s.img();
    let task = s.spawn(async move { img.flush().await });
    let held = s
        .ctl
        .try_next_held()
        .expect("the first write-back write is held");
    s.ctl.stop_holding();
    s.abort(task, &held);

    s.write(G1, 0xcc);
    let img = s.img();
    let second = s.spawn(async move { img.flush().await });
    // Whatever the second flush could do without the held write is done: now it lands.
    held.release();
    s.stall();
    s.run(second).unwrap();
    let raw = s.finish();
    assert!(all(cluster(&raw, G0), 0xaa), "G0");
    assert!(all(cluster(&raw, G1), 0xcc), "G1");
}
