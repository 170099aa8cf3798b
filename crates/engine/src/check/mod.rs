//! Consistency check and repair of an image's metadata: what `qemu-img check [-r leaks|all]`
//! does for qcow2, with the same counts, verdicts and message lines.
//!
//! The check rebuilds, in memory, the number of references every host cluster should have by
//! walking all metadata (header, active and snapshot L1/L2 tables and the clusters they map,
//! compressed clusters, refcount table and blocks, snapshot table, bitmap directory, tables and
//! data), then compares it with the refcounts stored on disk:
//!
//! - stored > computed is a **leak** (harmless: the cluster is never reused);
//! - stored < computed is a **corruption** (the cluster may be handed out again while in use);
//! - so are COPIED flags that disagree with refcount == 1 in the active tables, reserved bits,
//!   misaligned offsets, refcount blocks whose own refcount is not 1 or that lie past the end
//!   of the file, compressed entries with COPIED, and references past the end of the file.
//!
//! Repair follows QEMU's algorithm (`qcow2_check_refcounts` in `block/qcow2-refcount.c`) and
//! the crash-safety rules of docs/DESIGN.md (I4): refcount increases are written and flushed
//! before any decrease; a stored refcount of 0 with references forces a rebuild of the whole
//! refcount structure into clusters nothing references (the old structure stays valid until
//! the header is switched to the new one in a single small write after a flush); COPIED flags
//! and the header's dirty/corrupt bits are written last.
//!
//! Repair works directly on the image file and is self-contained: it does not use the engine's
//! caches or allocator. **The image must not be used for any other I/O while a repair runs, and
//! should be dropped (and reopened) afterwards**: its in-memory metadata (L1/L2 caches,
//! refcounts, header) is not refreshed. [`Image::open_for_repair`](crate::Image::open_for_repair) opens an image for that
//! purpose, including images QEMU repairs but a read-write open refuses (dirty or corrupt bit).

use crate::aligned::read_bytes;
use crate::files::Files;
use crate::inflight::Tracker;
use crate::{Error, Result};
use blockio::{Backend, IoBuf, Keep};
use imrt::Imrt;
use qcow2_format::features::{AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use qcow2_format::{
    BitmapTableEntry, ClusterGeometry, CompressedDescriptor, Header, L1Entry, L2ClusterType,
    L2Entry, RefcountWidth, ReftableEntry, Snapshot, SubclusterBitmap, L2_COPIED, L2_ZERO,
};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Diagnostic lines a report keeps; further ones are only counted
/// ([`CheckReport::messages_suppressed`]): a garbage table yields a line per entry.
pub const MAX_MESSAGES: usize = 10_000;

/// Corruptions found (fixed or not) while walking the metadata (L1, L2, snapshot and bitmap
/// tables) after which a check or repair gives up ([`CheckLimit::Corruptions`]): the tables
/// are garbage, and a count of their entries says nothing more. A damaged image worth
/// repairing has far fewer.
pub const MAX_WALK_CORRUPTIONS: u64 = 100_000;

/// Adds a line to a checker's messages, formatted only while fewer than [`MAX_MESSAGES`]
/// are kept; afterwards only counts it.
macro_rules! msg {
    ($c:expr, $($arg:tt)*) => {{
        if $c.messages.len() < MAX_MESSAGES {
            let line = format!($($arg)*);
            $c.messages.push(line);
        } else {
            $c.messages_suppressed += 1;
        }
    }};
}

// After the macro: the parts use it.
mod imrt;
mod overlap;
mod refcounts;
mod repair;
mod snapshots;
mod walk;

/// What [`Image::repair`] may change (`qemu-img check -r leaks` / `-r all`).
///
/// [`Image::repair`]: crate::Image::repair
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only lower refcounts that are too high (leaks); COPIED flags are fixed too when nothing
    /// else is wrong. Never touches anything a reference depends on.
    Leaks,
    /// Everything that can be repaired: leaks, refcounts that are too low (rebuilding the whole
    /// refcount structure when a referenced cluster has refcount 0), COPIED flags, misaligned
    /// preallocated zero clusters, refcount blocks past the end of the file; then clears the
    /// dirty and corrupt bits if no corruption is left.
    All,
}

/// Why a check gave up before the end, on metadata too damaged to be worth walking in full:
/// the check then fails as `qemu-img check` fails when it cannot complete
/// ([`CheckReport::failure`] says why, exit status 1, no counts are reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckLimit {
    /// More corruptions than this were found while walking the metadata
    /// ([`MAX_WALK_CORRUPTIONS`]).
    Corruptions(u64),
    /// An L1 table references more L2 tables inside the file than the file has clusters
    /// (this many): no valid image does, each of its tables being a cluster of its own, so
    /// the same tables are named again and again and every walk would repeat the last.
    L2Tables(u64),
}

impl std::fmt::Display for CheckLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckLimit::Corruptions(n) => {
                write!(f, "more than {n} corruptions in the metadata; giving up")
            }
            CheckLimit::L2Tables(n) => write!(
                f,
                "an L1 table references more than {n} L2 tables inside the file, which has \
                 only {n} clusters; giving up"
            ),
        }
    }
}

/// The outcome of [`Image::check`] or [`Image::repair`], with `qemu-img check`'s numbers.
///
/// After a repair that fixed something, the counts are those of a second, read-only check of
/// the repaired image (as `qemu-img check -r` reports them), with the `*_fixed` counts of the
/// repair; `messages` holds the lines of both passes.
///
/// [`Image::check`]: crate::Image::check
/// [`Image::repair`]: crate::Image::repair
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that may lose or corrupt data (`corruptions`).
    pub corruptions: u64,
    /// Clusters with a refcount higher than their references (`leaks`).
    pub leaks: u64,
    /// Internal errors that kept part of the check from running (`check-errors`).
    pub check_errors: u64,
    /// Leaks fixed by a repair (`leaks-fixed`).
    pub leaks_fixed: u64,
    /// Corruptions fixed by a repair (`corruptions-fixed`).
    pub corruptions_fixed: u64,
    /// Problems no repair can fix (not a `qemu-img check` number): the corruptions that
    /// are reserved bits, misaligned or out-of-file references, overflowing refcounts,
    /// broken snapshot or bitmap entries; and clusters put to two uses (two kinds of
    /// metadata, or metadata also mapped as data) and bitmap structures a read-write open
    /// refuses (outside the file, overlapping other metadata or each other), which
    /// `qemu-img check` sees at most as a refcount below its references. Every other
    /// corruption is a refcount, COPIED flag or preallocation problem that
    /// [`RepairMode::All`] repairs.
    pub unrepairable: u64,
    /// End of the last cluster that is referenced or has a refcount (`image-end-offset`).
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk (`total-clusters`).
    pub total_clusters: u64,
    /// Allocated guest clusters of the active image (`allocated-clusters`).
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one in the same L2 table
    /// (`fragmented-clusters`; compressed clusters always count).
    pub fragmented_clusters: u64,
    /// Compressed guest clusters of the active image (`compressed-clusters`).
    pub compressed_clusters: u64,
    /// The diagnostic lines, worded as `qemu-img check` prints them on stderr
    /// (`Leaked cluster 5 refcount=2 reference=1`, `ERROR cluster 5 refcount=0 reference=1`,
    /// `ERROR OFLAG_COPIED data cluster: l2_entry=... refcount=...`, `Repairing ...`).
    /// At most [`MAX_MESSAGES`] of them.
    pub messages: Vec<String>,
    /// Lines beyond the first [`MAX_MESSAGES`], counted but not kept.
    pub messages_suppressed: u64,
    /// Why the check stopped before completing (`qemu-img check` says "Check failed: ..." and
    /// prints no result); `None` when it ran to the end.
    pub failure: Option<String>,
    /// Set when the check gave up on garbage metadata (then `failure` says so too).
    pub gave_up: Option<CheckLimit>,
}

impl CheckReport {
    /// Exit status: the image is clean.
    pub const EXIT_CLEAN: u8 = 0;
    /// Exit status: the check could not complete (or had internal errors).
    pub const EXIT_CHECK_FAILED: u8 = 1;
    /// Exit status: corruptions were found.
    pub const EXIT_CORRUPT: u8 = 2;
    /// Exit status: only leaks were found.
    pub const EXIT_LEAKS: u8 = 3;

    /// Whether the check ran to the end.
    pub fn completed(&self) -> bool {
        self.failure.is_none()
    }

    /// Whether the image was found clean: the check completed without internal errors,
    /// corruptions or leaks.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == Self::EXIT_CLEAN
    }

    /// Whether [`RepairMode::All`] can fix everything this check found: it completed
    /// without internal errors, and every corruption is a refcount, COPIED flag or
    /// preallocation problem (none is [`unrepairable`](Self::unrepairable)).
    pub fn repairable(&self) -> bool {
        self.completed() && self.check_errors == 0 && self.unrepairable == 0
    }

    /// Whether a repair fixed anything.
    pub fn repaired(&self) -> bool {
        self.leaks_fixed > 0 || self.corruptions_fixed > 0
    }

    /// `qemu-img check`'s exit status: 0 clean, 1 check failed or internal errors,
    /// 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> u8 {
        if self.failure.is_some() || self.check_errors > 0 {
            Self::EXIT_CHECK_FAILED
        } else if self.corruptions > 0 {
            Self::EXIT_CORRUPT
        } else if self.leaks > 0 {
            Self::EXIT_LEAKS
        } else {
            Self::EXIT_CLEAN
        }
    }
}

/// What a check reads and a repair writes: the image file (through its `Files`), the header
/// as the image was opened, the geometry, and the tracker of metadata writes in flight (a
/// repair's writes wait for older ones, I9).
pub(crate) struct Subject<'a, B> {
    pub(crate) files: &'a Files<B>,
    pub(crate) header: &'a Header,
    pub(crate) geo: ClusterGeometry,
    pub(crate) meta_io: &'a Tracker,
}

impl<B> Clone for Subject<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B> Copy for Subject<'_, B> {}

/// Checks `img` as `qemu-img check` does, without changing anything.
pub(crate) async fn check<B: Backend>(img: Subject<'_, B>) -> Result<CheckReport> {
    let mut c = Checker::new(img).await?;
    c.run(Fix::NONE).await;
    Ok(c.into_report())
}

/// Checks and repairs `img` as `qemu-img check -r` does (`mode`), then checks it again if
/// anything was fixed: the first pass, up to the point where QEMU rewrites the snapshot table
/// (`qcow2_check_fix_snapshot_table`). That needs an allocator, which the caller brings
/// ([`FirstPass::snapshot_rewrite`], [`FirstPass::snapshot_table_rewritten`]);
/// [`FirstPass::finish`] then completes the pass and checks the image again. The caller keeps
/// every other user of the image out meanwhile.
pub(crate) async fn repair_first<B: Backend>(
    img: Subject<'_, B>,
    mode: RepairMode,
) -> Result<FirstPass<'_, B>> {
    let fix = match mode {
        RepairMode::Leaks => Fix {
            leaks: true,
            errors: false,
        },
        RepairMode::All => Fix {
            leaks: true,
            errors: true,
        },
    };
    let mut first = Checker::new(img).await?;
    first.writable = true;
    first.run(fix).await;
    Ok(FirstPass {
        checker: first,
        fix,
    })
}

/// A repair's first pass that may wait for its snapshot table to be rewritten.
pub(crate) struct FirstPass<'a, B> {
    checker: Checker<'a, B>,
    fix: Fix,
}

/// What a snapshot table rewrite needs: the header as the repair left it on disk, the
/// snapshots to keep, and the extent of the old table (offset, bytes) to free.
pub(crate) struct SnapshotRewrite {
    pub(crate) header: Header,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) old: (u64, u64),
}

impl<B: Backend> FirstPass<'_, B> {
    /// The snapshot table rewrite the pass waits for, if any.
    pub(crate) fn snapshot_rewrite(&self) -> Option<SnapshotRewrite> {
        let c = &self.checker;
        if c.snapshot_rewrite == 0 || c.failure.is_some() {
            return None;
        }
        Some(SnapshotRewrite {
            header: c.header.clone(),
            snapshots: c.snapshots.clone().unwrap_or_default(),
            old: (c.header.snapshots_offset, c.snapshots_size),
        })
    }

    /// Records how the rewrite went (QEMU: "ERROR failed to update snapshot table"); the
    /// header it wrote is re-read by the next pass.
    pub(crate) fn snapshot_table_rewritten(&mut self, outcome: Result<()>) {
        let c = &mut self.checker;
        let n = std::mem::take(&mut c.snapshot_rewrite);
        match outcome {
            Ok(()) => {
                c.res.corruptions -= n;
                c.res.corruptions_fixed += n;
            }
            Err(e) => {
                c.res.check_errors += 1;
                msg!(c, "ERROR failed to update snapshot table: {e}");
                c.failure = Some(e.to_string());
            }
        }
    }

    /// Completes the pass and, when it fixed anything, checks the image again.
    pub(crate) async fn finish(self) -> Result<CheckReport> {
        let FirstPass { mut checker, fix } = self;
        let img = checker.img;
        if checker.snapshot_rewrite > 0 {
            // Nobody rewrote the table: its problems stay counted, and unrepairable here.
            checker.res.unrepairable += std::mem::take(&mut checker.snapshot_rewrite);
        }
        if checker.failure.is_none() {
            checker.finish(fix).await;
        }
        let signaled = checker.corruption_signaled;
        let first = checker.into_report();
        if first.failure.is_some() || !first.repaired() {
            return Ok(first);
        }
        let mut second = Checker::new(img).await?;
        second.writable = true;
        second.corruption_signaled = signaled;
        second.run(Fix::NONE).await;
        let mut report = second.into_report();
        report.leaks_fixed = first.leaks_fixed;
        report.corruptions_fixed = first.corruptions_fixed;
        let mut messages = first.messages;
        messages.append(&mut report.messages);
        report.messages_suppressed += first.messages_suppressed;
        if messages.len() > MAX_MESSAGES {
            report.messages_suppressed += (messages.len() - MAX_MESSAGES) as u64;
            messages.truncate(MAX_MESSAGES);
        }
        report.messages = messages;
        Ok(report)
    }
}

/// Which categories a pass may fix (QEMU's `BdrvCheckMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fix {
    leaks: bool,
    errors: bool,
}

impl Fix {
    const NONE: Fix = Fix {
        leaks: false,
        errors: false,
    };
    const LEAKS: Fix = Fix {
        leaks: true,
        errors: false,
    };

    fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// QEMU's `BdrvCheckResult`.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    corruptions_fixed: u64,
    /// Corruptions no repair fixes (counted in `corruptions` too).
    unrepairable: u64,
    leaks_fixed: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
}

/// Why a pass stopped (the text `qemu-img` puts after "Check failed: ").
#[derive(Debug)]
struct Abort(String);

impl From<Error> for Abort {
    fn from(e: Error) -> Self {
        Abort(e.to_string())
    }
}

type Step<T = ()> = std::result::Result<T, Abort>;

/// strerror(EIO), what QEMU's failures mostly say.
const EIO: &str = "Input/output error";
/// strerror(EINVAL).
const EINVAL: &str = "Invalid argument";
/// strerror(EFBIG).
const EFBIG: &str = "File too large";
/// strerror(ENOMEM).
const ENOMEM: &str = "Cannot allocate memory";

/// QEMU refuses to check images of more clusters than this (`INT_MAX`).
const MAX_CHECK_CLUSTERS: u64 = i32::MAX as u64;
/// Refcount blocks kept in memory before clean ones are dropped.
const BLOCK_CACHE: usize = 256;
/// Dirty refcount blocks gathered before they are written out during a repair phase.
const DIRTY_BATCH: usize = 64;

/// Metadata kinds the overlap check can be told to ignore (the one being written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overlap {
    None,
    ActiveL1,
    ActiveL2,
    InactiveL2,
    RefcountBlock,
    BitmapDirectory,
}

/// What a cluster of metadata holds (data clusters are what is left), for telling a cluster
/// put to two uses, which no repair untangles, from a refcount that is merely wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Header,
    L1,
    L2,
    Reftable,
    Refblock,
    SnapshotTable,
    BitmapDirectory,
    BitmapTable,
    BitmapData,
}

/// `qemu-img check`'s formatting of a value with `%#x` (no prefix for 0).
fn hash_x(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// One check (or check-and-repair) pass over an image.
struct Checker<'a, B> {
    img: Subject<'a, B>,
    geo: ClusterGeometry,
    cs: u64,
    width: RefcountWidth,
    data_file: bool,
    /// The header as on disk (kept up to date with what a repair writes).
    header: Header,
    file_len: u64,
    /// Refcount table, as read or as rebuilt.
    reftable: Vec<ReftableEntry>,
    /// Refcount blocks read from disk (or changed by a repair), by offset.
    blocks: HashMap<u64, Vec<u8>>,
    /// Blocks changed and not yet written.
    dirty: BTreeSet<u64>,
    /// The active L1 table (QEMU's in-memory copy, used for the COPIED check).
    l1: Vec<L1Entry>,
    /// The snapshot table as read by the pass (empty until then).
    snapshots: std::result::Result<Vec<Snapshot>, String>,
    /// The table's bytes on disk, up to the end of the last snapshot kept.
    snapshots_size: u64,
    /// Corruptions of the snapshot table that a rewrite of it fixes, when a repair pass
    /// left that rewrite to its caller ([`FirstPass`]).
    snapshot_rewrite: u64,
    res: Counts,
    messages: Vec<String>,
    messages_suppressed: u64,
    failure: Option<String>,
    gave_up: Option<CheckLimit>,
    /// Whether the image is open for repair: corruption found on the way is then fatal and
    /// marks the image corrupt, as in a read-write QEMU.
    writable: bool,
    /// Whether a corruption was signaled already (QEMU prints it once per open image).
    corruption_signaled: bool,
    /// The metadata clusters the walk met inside the file: their role and how many
    /// references to them came from metadata of that role.
    roles: HashMap<u64, (Role, u64)>,
}

impl<'a, B: Backend> Checker<'a, B> {
    async fn new(img: Subject<'a, B>) -> Result<Self> {
        let geo = img.geo;
        let cs = geo.cluster_size();
        let file_len = img
            .files
            .image()
            .len()
            .await
            .map_err(|e| Error::io(format!("{}: size", img.files.path().display()), e))?;
        // The header as it is now: a repair may have changed it since the image was opened.
        let raw = read_bytes(img.files.image(), 0, cs.min(file_len), "header").await?;
        let format_err = |source| Error::Format {
            path: img.files.path().to_path_buf(),
            source,
        };
        let header = Header::parse(&raw).map_err(format_err)?;
        header
            .validate_layout_but_snapshots(file_len)
            .map_err(format_err)?;
        let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
        let raw = read_bytes(
            img.files.image(),
            header.refcount_table_offset,
            rt_bytes,
            "refcount table",
        )
        .await?;
        let reftable = (0..raw.len() / 8)
            .map(|i| ReftableEntry::read(&raw, i))
            .collect();
        let l1_raw = read_bytes(
            img.files.image(),
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
            "L1 table",
        )
        .await?;
        let l1 = (0..l1_raw.len() / 8)
            .map(|i| L1Entry::read(&l1_raw, i))
            .collect();
        Ok(Self {
            img,
            geo,
            cs,
            width: header.refcount_width(),
            data_file: header.has_data_file(),
            header,
            file_len,
            reftable,
            blocks: HashMap::new(),
            dirty: BTreeSet::new(),
            l1,
            snapshots: Ok(Vec::new()),
            snapshots_size: 0,
            snapshot_rewrite: 0,
            res: Counts::default(),
            messages: Vec::new(),
            messages_suppressed: 0,
            failure: None,
            gave_up: None,
            writable: false,
            corruption_signaled: false,
            roles: HashMap::new(),
        })
    }

    fn into_report(self) -> CheckReport {
        let r = self.res;
        CheckReport {
            corruptions: r.corruptions,
            leaks: r.leaks,
            check_errors: r.check_errors,
            leaks_fixed: r.leaks_fixed,
            corruptions_fixed: r.corruptions_fixed,
            unrepairable: r.unrepairable,
            image_end_offset: r.image_end_offset,
            total_clusters: r.total_clusters,
            allocated_clusters: r.allocated_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
            messages: self.messages,
            messages_suppressed: self.messages_suppressed,
            failure: self.failure,
            gave_up: self.gave_up,
        }
    }

    fn msg(&mut self, line: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(line);
        } else {
            self.messages_suppressed += 1;
        }
    }

    /// Gives up the check (see [`CheckLimit`]).
    fn give_up(&mut self, limit: CheckLimit) -> Abort {
        self.gave_up = Some(limit);
        Abort(limit.to_string())
    }

    /// Gives up once the metadata walk found too many corruptions.
    fn corruption_limit(&mut self) -> Step {
        if self.res.corruptions + self.res.corruptions_fixed > MAX_WALK_CORRUPTIONS {
            return Err(self.give_up(CheckLimit::Corruptions(MAX_WALK_CORRUPTIONS)));
        }
        Ok(())
    }

    /// Counts a corruption that no repair fixes.
    fn unfixable(&mut self) {
        self.res.corruptions += 1;
        self.res.unrepairable += 1;
    }

    fn cluster_bits(&self) -> u32 {
        self.geo.cluster_bits()
    }

    fn entries_per_block(&self) -> u64 {
        self.width.entries_per_block(self.cs)
    }

    fn is_aligned(&self, off: u64) -> bool {
        self.geo.is_aligned(off)
    }

    // ---------------------------------------------------------------------------------------
    // The pass (QEMU's qcow2_co_check_locked)

    // ---------------------------------------------------------------------------------------
    // Counting references

    // ---------------------------------------------------------------------------------------
    // Stored refcounts

    // ---------------------------------------------------------------------------------------
    // COPIED flags

    // ---------------------------------------------------------------------------------------
    // Rebuilding the refcount structure

    // ---------------------------------------------------------------------------------------
    // Header, writes, overlaps
}
