//! Error injection: EIO and ENOSPC on every backend request of every request path.
//!
//! QEMU's iotests 026, 289 and 305 inject errors at named events of its qcow2 driver (L2
//! load, L2 update, COW read and write, refcount block load and update, refcount table
//! growth, cluster allocation, flush...). Here the checklist is systematic: each scenario sets
//! an image up, then runs one *target* request (a write, a copy-on-write, write-zeroes,
//! discard, flush, close, a read) that is first run once to list its backend requests, then
//! again for every one of them with that request failing: once with EIO, once with ENOSPC
//! (both transient, `times(1)`), and once with EIO from that request on until the test clears
//! the rules (a dead disk). Each failed request is classified (data read or write, L2 load or
//! write-back, L1 write, refcount block or table write, header update, flush, hole punch,
//! backing file read) from where the image's metadata lives, and every class of the
//! checklist must be hit.
//!
//! For every injected fault:
//! - the target fails with `qcow2_engine::Error::Io` whose source carries the errno, or, if it
//!   succeeds anyway, the failure was one the engine may ignore (punching holes in freed
//!   clusters) and the write is really there;
//! - while the fault is still set, a failed write's range reads old or new data, nothing else;
//! - once the rules are cleared, the same request works again, and so does a flush;
//! - that flush really wrote everything: the image as a crash right after it leaves it (only
//!   durable writes, see `blockio::CrashImage`) holds every acknowledged write and passes
//!   `qemu-img check` (exit 0 or 3: leaks at most; a dirty lazy-refcounts image after
//!   `qemu-img check -r all`);
//! - more requests work, `close` succeeds, and the closed image passes `qemu-img check` (0 or
//!   3) and reads as the model says.
//!
//! `open` is tested the same way (every request it makes fails once, then it works).
//!
//! This module is the harness; the tests are in `tests/errors_*.rs`, one file per kind of
//! failure: guest writes (`errors_write`), flushes and closes (`errors_flush`), metadata that
//! must reach the disk first (`errors_ordering`), reads (`errors_read`), `open`
//! (`errors_open`), image operations (`errors_image_ops`: compressed writes, snapshots,
//! resize, bitmap edits), and the checklist's coverage (`errors_checklist`). The pieces: the
//! scenarios ([`scenarios`]), the image they start from and the requests run on it
//! ([`image`]), the guest's view of it ([`model`]), the checks of what a fault leaves
//! ([`checks`]), one case with one fault ([`case`]), and every fault of a scenario
//! ([`torture`]).
// Each errors_*.rs binary uses a part of the harness.
#![allow(dead_code)]

pub mod case;
pub mod checks;
pub mod image;
pub mod model;
pub mod scenarios;
pub mod torture;

use blockio::{FaultOpener, MemoryOpener};
use qcow2_engine::{Error, Image};

pub type Img = Image<FaultOpener<MemoryOpener>>;

/// The name of snapshot `n` of [`G::SnapCreate`] and the others.
pub fn snapshot_name(n: u8) -> String {
    format!("s{n}")
}

/// Linux errno values (the tests package does not depend on libc).
pub const EIO: i32 = 5;
pub const ENOSPC: i32 = 28;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// A guest request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum G {
    Write(u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Read(u64, u64),
    Flush,
    Close,
    /// Close and open again (cold caches).
    Reopen,
    /// A compressed write of whole clusters.
    Compressed(u64, u64),
    /// Internal snapshot `s{n}` created, deleted, applied.
    SnapCreate(u8),
    SnapDelete(u8),
    SnapApply(u8),
    /// A resize to this size (shrinking allowed).
    Resize(u64),
    /// A persistent bitmap edited (`bitmap_edit`, which closes the image, as `Close` does).
    Bitmap(&'static str, BitmapOp),
}

/// The bitmap edits of [`G::Bitmap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapOp {
    Add,
    Remove,
    Clear,
    Disable,
}

impl G {
    /// Whether the request consumes the image (closes it).
    pub fn closes(self) -> bool {
        matches!(self, G::Close | G::Bitmap(..))
    }
}

/// Where the image comes from.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// `qemu-img create -f qcow2 -o OPTS` of this size.
    Create(&'static str, u64),
    /// A fixture of the interop library.
    Fixture(&'static str),
    /// Like `Create`, then the file's bytes edited.
    Patched(&'static str, u64, fn(&mut [u8])),
}

/// What kind of backend request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    DataRead,
    DataWrite,
    BackingRead,
    L2Load,
    L2WriteBack,
    L1Write,
    RefblockWrite,
    ReftableWrite,
    HeaderWrite,
    BitmapWrite,
    SnapshotTableWrite,
    MetadataRead,
    Flush,
    PunchHole,
    WriteZeroes,
    SetLen,
}

/// A check of image bytes.
pub type ImageCheck = fn(&[u8]) -> Result<(), String>;

pub struct Scenario {
    pub name: &'static str,
    pub source: Source,
    /// L2 cache size in bytes (small caches force loads and write-backs).
    pub l2_cache: Option<u64>,
    pub setup: &'static [G],
    pub target: G,
    /// Classes the target's requests must include (so the scenario tests what it says).
    pub expect: &'static [Class],
    /// Extra check of the closed image.
    pub after: Option<ImageCheck>,
    /// Target requests whose failure exposes a known engine bug: skipped by the scenario's
    /// test, run alone by an `#[ignore]`d test named after the bug.
    pub bugs: &'static [u64],
}

/// The byte request `id` writes at guest offset `off`.
pub fn pattern(id: usize, off: u64) -> u8 {
    let x = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ off.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    ((x >> 56) as u8).max(1)
}

/// The engine's error carries `errno` in its source chain, as `Error::Io`.
pub fn typed(e: &Error, errno: i32) -> Result<(), String> {
    // An error in a backing file comes inside Error::Backing, as QEMU words it.
    let mut e = e;
    while let Error::Backing(inner) = e {
        e = inner;
    }
    if !matches!(e, Error::Io { .. }) {
        return Err(format!("not Error::Io: {e:?}"));
    }
    if e.errno() != errno {
        return Err(format!("errno() is {}, not {errno}: {e:?}", e.errno()));
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(errno) {
                return Ok(());
            }
        }
        src = s.source();
    }
    Err(format!("errno {errno} not in the source chain of {e:?}"))
}
