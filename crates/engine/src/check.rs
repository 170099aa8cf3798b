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
//! refcounts, header) is not refreshed. [`Image::open_for_repair`] opens an image for that
//! purpose, including images QEMU repairs but a read-write open refuses (dirty or corrupt bit).

use crate::aligned::read_bytes;
use crate::image::Image;
use crate::options::{FileRole, ImageOptions};
use crate::{Error, Result};
use blockio::{Backend, IoBuf, Keep, OpenOptions, Opener};
use qcow2_format::features::{AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use qcow2_format::{
    BitmapTableEntry, ClusterGeometry, CompressedDescriptor, Header, L1Entry, L2ClusterType,
    L2Entry, RefcountWidth, ReftableEntry, Snapshot, SubclusterBitmap, L2_COPIED, L2_ZERO,
};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

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

/// What [`Image::repair`] may change (`qemu-img check -r leaks` / `-r all`).
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

impl<O: Opener> Image<O> {
    /// Checks the image's metadata as `qemu-img check` does, without changing anything.
    ///
    /// Errors only when the check cannot start; a check that stops midway (an unreadable
    /// table, a bitmap directory that does not load) reports it in
    /// [`CheckReport::failure`].
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping the future changes nothing.
    pub async fn check(&self) -> Result<CheckReport> {
        let mut c = Checker::new(self).await?;
        c.run(Fix::NONE).await;
        Ok(c.into_report())
    }

    /// Checks and repairs the image as `qemu-img check -r leaks|all` does, then checks it
    /// again if anything was fixed.
    ///
    /// Needs an image whose file is writable (see [`Image::open_for_repair`]); errors with
    /// [`Error::ReadOnly`] otherwise. Writes go straight to the image file in a crash-safe
    /// order (see the module documentation). The image must not be used for other I/O during
    /// the repair, and its cached metadata is stale afterwards: drop it and reopen the file.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the repair between two of its writes (a write the backend
    /// accepted still lands, before any later metadata write of this image): the image is
    /// then as a crash at that point would leave it, which the repair's order keeps no worse
    /// than before (refcount increases are on disk before any decrease; a rebuilt refcount
    /// structure takes effect in one small header write). Run it again to finish.
    pub async fn repair(&self, mode: RepairMode) -> Result<CheckReport> {
        if !self.files.image().is_writable() {
            return Err(Error::ReadOnly);
        }
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
        // Keep the engine's own request paths out while the metadata changes underneath.
        let _meta = self.meta.lock().await;
        let mut first = Checker::new(self).await?;
        first.writable = true;
        first.run(fix).await;
        let signaled = first.corruption_signaled;
        let first = first.into_report();
        if first.failure.is_some() || !first.repaired() {
            return Ok(first);
        }
        let mut second = Checker::new(self).await?;
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

    /// Opens an image for [`Image::repair`]: validated and opened like a read-only image
    /// (backing chain and data file too), but with the image file itself opened for writing.
    ///
    /// Unlike a read-write [`Image::open`], this accepts images with the dirty bit (lazy
    /// refcounts after a crash) or the corrupt bit set, as `qemu-img check -r` does. The image
    /// still counts as read-only for guest I/O: only the repair writes to it.
    ///
    /// # Cancel safety
    ///
    /// As [`Image::open`]: dropping the future writes nothing.
    pub async fn open_for_repair(
        opener: O,
        path: impl AsRef<Path>,
        options: ImageOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        if options.force_share {
            return Err(Error::InvalidOptions(
                "force-share=on can only be used with read-only images".into(),
            ));
        }
        let direct = options.is_direct();
        // The image file gets the writer's locks on the descriptor that writes: the read-only
        // open below takes none on it (its lock would conflict with ours).
        let writer_lock = options
            .clone()
            .read_only(false)
            .lock_request(FileRole::Qcow2);
        let ro = ImageOptions {
            lock_image: false,
            ..options.read_only(true)
        };
        let mut img = Image::open(opener.clone(), path, ro).await?;
        let file = opener
            .open(
                path,
                OpenOptions {
                    write: true,
                    direct,
                    lock: writer_lock,
                    ..OpenOptions::default()
                },
            )
            .await
            .map_err(|source| crate::image::open_error("image", path, source))?;
        img.files.replace_image(file);
        Ok(img)
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

/// The in-memory refcount table (QEMU's "IMRT"): one entry per host cluster, packed in the
/// image's refcount width so that a slice of it is a refcount block as it goes to disk.
struct Imrt {
    width: RefcountWidth,
    cluster_size: u64,
    bytes: Vec<u8>,
    len: u64,
}

impl Imrt {
    fn new(width: RefcountWidth, cluster_size: u64) -> Self {
        Self {
            width,
            cluster_size,
            bytes: Vec::new(),
            len: 0,
        }
    }

    /// Bytes for `n` entries, rounded up to whole clusters.
    fn byte_size(&self, n: u64) -> Option<usize> {
        let bits = n.checked_mul(u64::from(self.width.bits()))?;
        let bytes = bits.div_ceil(8).div_ceil(self.cluster_size) * self.cluster_size;
        usize::try_from(bytes).ok()
    }

    /// Makes room for `n` entries (new ones are 0).
    fn resize(&mut self, n: u64) -> std::result::Result<(), ()> {
        let want = self.byte_size(n).ok_or(())?;
        if self.bytes.is_empty() {
            // Zeroed by the allocator, page by page as it is touched: a sparse file's table
            // costs memory only where clusters are in use.
            self.bytes = vec![0; want];
        } else if want > self.bytes.len() {
            self.bytes
                .try_reserve_exact(want - self.bytes.len())
                .map_err(|_| ())?;
            self.bytes.resize(want, 0);
        }
        self.len = self.len.max(n);
        Ok(())
    }

    fn get(&self, i: u64) -> u64 {
        if i >= self.len {
            0
        } else {
            self.width.get(&self.bytes, i)
        }
    }

    /// Sets entry `i` (< len) to `v` (<= the width's maximum).
    fn set(&mut self, i: u64, v: u64) {
        debug_assert!(i < self.len);
        self.width
            .set(&mut self.bytes, i, v)
            .expect("value bounded by the refcount width");
    }

    fn clear(&mut self) {
        self.bytes.fill(0);
    }

    /// The bytes of refcount block `index` (within the table: callers only ask for blocks
    /// that describe an entry below `len`).
    fn block(&self, index: u64) -> &[u8] {
        let cs = self.cluster_size as usize;
        let start = index as usize * cs;
        &self.bytes[start..start + cs]
    }
}

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
struct Checker<'a, O: Opener> {
    img: &'a Image<O>,
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
    snapshots: std::result::Result<Vec<Snapshot>, String>,
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

impl<'a, O: Opener> Checker<'a, O> {
    async fn new(img: &'a Image<O>) -> Result<Self> {
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
        header.validate_layout(file_len).map_err(format_err)?;
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
        let snapshots = img.snapshots().await.map_err(|e| e.to_string());
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
            snapshots,
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

    async fn run(&mut self, fix: Fix) {
        // Snapshot table problems (qcow2_check_read_snapshot_table).
        let mut snapshot_corruptions = 0;
        match &self.snapshots {
            Err(e) => {
                let e = e.clone();
                self.res.check_errors += 1;
                msg!(self, "ERROR failed to read the snapshot table: {e}");
                self.failure = Some(EINVAL.into());
                return;
            }
            Ok(list) if self.header.version >= 3 => {
                let incomplete: Vec<usize> = list
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.extra_data.len() < 16)
                    .map(|(i, _)| i)
                    .collect();
                for i in incomplete {
                    // Rewriting the snapshot table needs the allocator: not repaired here.
                    msg!(self, "ERROR snapshot table entry {i} is incomplete");
                    snapshot_corruptions += 1;
                }
            }
            Ok(_) => {}
        }
        if let Err(Abort(why)) = self.check_refcounts(fix).await {
            self.failure = Some(why);
            return;
        }
        self.res.corruptions += snapshot_corruptions;
        self.res.unrepairable += snapshot_corruptions;
        if fix.any() && self.res.check_errors == 0 && self.res.corruptions == 0 {
            if let Err(Abort(why)) = self.mark_clean_and_consistent().await {
                self.failure = Some(why);
            }
        }
    }

    /// QEMU's qcow2_check_refcounts.
    async fn check_refcounts(&mut self, fix: Fix) -> Step {
        let nb_clusters = self.file_len.div_ceil(self.cs);
        if nb_clusters > MAX_CHECK_CLUSTERS {
            self.res.check_errors += 1;
            return Err(Abort(EFBIG.into()));
        }
        let disk_size = self.img.header.size / 512 * 512;
        self.res.total_clusters = disk_size.div_ceil(self.cs);

        let mut imrt = Imrt::new(self.width, self.cs);
        if imrt.resize(nb_clusters).is_err() {
            self.res.check_errors += 1;
            return Err(Abort(ENOMEM.into()));
        }
        let mut rebuild = false;
        self.calculate_refcounts(fix, &mut rebuild, &mut imrt)
            .await?;

        let pre_compare = self.res;
        let mut highest = self
            .compare_refcounts(Fix::NONE, &mut rebuild, &imrt)
            .await?;

        if rebuild && fix.errors {
            let old = self.res;
            self.msg("Rebuilding refcount structure".into());
            self.rebuild_refcount_structure(&mut imrt).await?;
            self.res.corruptions = 0;
            self.res.unrepairable = 0;
            self.res.leaks = 0;
            rebuild = false;
            imrt.clear();
            self.calculate_refcounts(Fix::NONE, &mut rebuild, &mut imrt)
                .await?;
            let mut fresh_leaks = 0;
            if fix.leaks {
                // The old structure is now leaked: free it. Only leaks left over from this
                // count (they were made by the rebuild).
                let saved = self.res;
                self.res = Counts::default();
                highest = self
                    .compare_refcounts(Fix::LEAKS, &mut rebuild, &imrt)
                    .await?;
                if rebuild {
                    self.msg("ERROR rebuilt refcount structure is still broken".into());
                }
                fresh_leaks = self.res.leaks;
                self.res = saved;
            }
            if self.res.corruptions < old.corruptions {
                self.res.corruptions_fixed += old.corruptions - self.res.corruptions;
            }
            if self.res.leaks < old.leaks {
                self.res.leaks_fixed += old.leaks - self.res.leaks;
            }
            self.res.leaks += fresh_leaks;
        } else if fix.any() {
            if rebuild {
                self.msg("ERROR need to rebuild refcount structures".into());
                self.res.check_errors += 1;
                return Err(Abort(EIO.into()));
            }
            if self.res.leaks > 0 || self.res.corruptions > 0 {
                self.res = pre_compare;
                highest = self.compare_refcounts(fix, &mut rebuild, &imrt).await?;
            }
        }

        self.check_oflag_copied(fix).await?;
        self.res.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Counting references

    /// Adds one reference to every cluster `[offset, offset+size)` touches
    /// (qcow2_inc_refcounts_imrt).
    fn inc_refs(&mut self, imrt: &mut Imrt, offset: u64, size: u64) -> Step {
        if size == 0 {
            return Ok(());
        }
        // The last cluster may be partly past the end of the file, not more.
        let end = u128::from(offset) + u128::from(size);
        if end >= u128::from(self.file_len) + u128::from(self.cs) {
            msg!(
                self,
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            );
            self.unfixable();
            return Ok(());
        }
        let bits = self.cluster_bits();
        let first = offset >> bits;
        let last = (offset + size - 1) >> bits;
        for k in first..=last {
            if k >= imrt.len && imrt.resize(k + 1).is_err() {
                self.res.check_errors += 1;
                return Err(Abort(ENOMEM.into()));
            }
            let refcount = imrt.get(k);
            if refcount == self.width.max() {
                msg!(self, "ERROR: overflow cluster offset={:#x}", k << bits);
                self.msg(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img \
                     convert to create a clean copy if the image cannot be opened for writing"
                        .into(),
                );
                self.unfixable();
                continue;
            }
            imrt.set(k, refcount + 1);
        }
        Ok(())
    }

    /// Counts a reference from metadata to a metadata structure of `role` (see
    /// [`Checker::inc_refs`]), remembering the role of its clusters inside the file.
    fn inc_meta(&mut self, imrt: &mut Imrt, role: Role, offset: u64, size: u64) -> Step {
        self.inc_refs(imrt, offset, size)?;
        if size == 0 || offset >= self.file_len {
            return Ok(());
        }
        let bits = self.cluster_bits();
        let last = (offset.saturating_add(size - 1)).min(self.file_len - 1) >> bits;
        for c in (offset >> bits)..=last {
            let (r, n) = self.roles.entry(c).or_insert((role, 0));
            if *r == role {
                *n += 1;
            } else {
                // One cluster, two kinds of metadata: whatever a repair writes to one
                // destroys the other.
                self.res.unrepairable += 1;
            }
        }
        Ok(())
    }

    /// Counts as unrepairable every metadata cluster that is referenced as data too (more
    /// references than its metadata role accounts for): a repair would count it twice and
    /// leave both uses writing over each other. `qemu-img check` sees only a refcount below
    /// its references, so nothing is reported.
    fn metadata_used_as_data(&mut self, imrt: &Imrt) {
        let shared = self
            .roles
            .iter()
            .filter(|(&c, &(_, n))| imrt.get(c) > n)
            .count();
        self.res.unrepairable += shared as u64;
    }

    /// Counts every structure (QEMU's calculate_refcounts).
    async fn calculate_refcounts(&mut self, fix: Fix, rebuild: &mut bool, imrt: &mut Imrt) -> Step {
        self.roles.clear();
        // Header.
        self.inc_meta(imrt, Role::Header, 0, self.cs)?;

        // The active L1 table and everything below it.
        let (l1_offset, l1_size) = (self.header.l1_table_offset, self.header.l1_size);
        self.check_l1(imrt, l1_offset, l1_size, true, fix, true)
            .await?;

        // Snapshots.
        let snapshots = self.snapshots.clone().unwrap_or_default();
        if self.data_file && !snapshots.is_empty() {
            msg!(
                self,
                "ERROR {} snapshots in image with data file",
                snapshots.len()
            );
            self.unfixable();
        }
        for sn in &snapshots {
            self.corruption_limit()?;
            if !self.is_aligned(sn.l1_table_offset) {
                msg!(
                    self,
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    hash_x(sn.l1_table_offset)
                );
                self.unfixable();
                continue;
            }
            if u64::from(sn.l1_size) > qcow2_format::limits::MAX_L1_ENTRIES {
                msg!(
                    self,
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot \
                     table entry corrupted",
                    sn.id,
                    sn.name,
                    hash_x(u64::from(sn.l1_size))
                );
                self.unfixable();
                continue;
            }
            self.check_l1(imrt, sn.l1_table_offset, sn.l1_size, false, fix, false)
                .await?;
        }
        let table_size = snapshot_table_size(&snapshots);
        self.inc_meta(
            imrt,
            Role::SnapshotTable,
            self.header.snapshots_offset,
            table_size,
        )?;

        // Refcount table.
        let rt_offset = self.header.refcount_table_offset;
        let rt_bytes = self.reftable.len() as u64 * 8;
        self.inc_meta(imrt, Role::Reftable, rt_offset, rt_bytes)?;

        // Bitmaps.
        self.check_bitmaps(imrt).await?;

        self.check_refblocks(fix, rebuild, imrt).await?;
        self.metadata_used_as_data(imrt);
        Ok(())
    }

    /// One L1 table, its L2 tables and what they map (check_refcounts_l1).
    async fn check_l1(
        &mut self,
        imrt: &mut Imrt,
        l1_offset: u64,
        l1_size: u32,
        frag_info: bool,
        fix: Fix,
        active: bool,
    ) -> Step {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = u64::from(l1_size) * 8;
        self.inc_meta(imrt, Role::L1, l1_offset, bytes)?;
        // Entries past the end of the file read as 0 (unallocated): only read what is there,
        // so that a table pointing outside the file costs nothing.
        let in_file = self
            .file_len
            .saturating_sub(l1_offset)
            .div_ceil(8)
            .min(u64::from(l1_size));
        if in_file == 0 {
            return Ok(());
        }
        let table =
            match read_bytes(self.img.files.image(), l1_offset, in_file * 8, "L1 table").await {
                Ok(t) => t,
                Err(e) => {
                    self.msg("ERROR: I/O error in check_refcounts_l1".into());
                    self.res.check_errors += 1;
                    return Err(e.into());
                }
            };
        // No valid L1 table names more L2 tables inside the file than it has clusters (those
        // past its end read as zeros and are not walked): the bound on the work of the walk.
        let max_tables = self.file_len.div_ceil(self.cs).max(1);
        let mut walked = 0u64;
        for i in 0..in_file as usize {
            let entry = L1Entry::read(&table, i);
            if entry.0 == 0 {
                continue;
            }
            self.corruption_limit()?;
            if entry.0 & L1Entry::RESERVED_MASK != 0 {
                msg!(
                    self,
                    "ERROR found L1 entry with reserved bits set: {:x}",
                    entry.0
                );
                self.unfixable();
            }
            let l2_offset = entry.raw_offset();
            self.inc_meta(imrt, Role::L2, l2_offset, self.cs)?;
            if !self.is_aligned(l2_offset) {
                msg!(
                    self,
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry \
                     corrupted"
                );
                self.unfixable();
            }
            if l2_offset < self.file_len {
                walked += 1;
                if walked > max_tables {
                    return Err(self.give_up(CheckLimit::L2Tables(max_tables)));
                }
            }
            self.check_l2(imrt, l2_offset, frag_info, fix, active)
                .await?;
        }
        self.corruption_limit()
    }

    /// One L2 table (check_refcounts_l2).
    async fn check_l2(
        &mut self,
        imrt: &mut Imrt,
        l2_offset: u64,
        frag_info: bool,
        fix: Fix,
        active: bool,
    ) -> Step {
        if l2_offset >= self.file_len {
            // Reads as zeros: unallocated entries, nothing to count or check.
            return Ok(());
        }
        let mut table =
            match read_bytes(self.img.files.image(), l2_offset, self.cs, "L2 table").await {
                Ok(t) => t,
                Err(e) => {
                    self.msg("ERROR: I/O error in check_refcounts_l2".into());
                    self.res.check_errors += 1;
                    return Err(e.into());
                }
            };
        let mut fixed = Vec::new();
        let walked = self
            .walk_l2(
                imrt, l2_offset, &mut table, &mut fixed, frag_info, fix, active,
            )
            .await;
        self.write_zero_fixes(l2_offset, &table, &fixed).await;
        walked
    }

    /// The entries of one L2 table (the loop of check_refcounts_l2). Entries fixed in `table`
    /// are listed in `fixed`, for the caller to write.
    #[allow(clippy::too_many_arguments)]
    async fn walk_l2(
        &mut self,
        imrt: &mut Imrt,
        l2_offset: u64,
        table: &mut IoBuf,
        fixed: &mut Vec<usize>,
        frag_info: bool,
        fix: Fix,
        active: bool,
    ) -> Step {
        let geo = self.geo;
        let extended = geo.extended_l2();
        let mut next_contiguous = 0u64;
        for i in 0..geo.l2_entries() as usize {
            let entry = L2Entry::read(table, &geo, i);
            let bitmap = entry.bitmap;
            let kind = entry.cluster_type(&geo, self.data_file);
            if kind != L2ClusterType::Compressed && entry.word & L2Entry::RESERVED_MASK != 0 {
                msg!(
                    self,
                    "ERROR found l2 entry with reserved bits set: {:x}",
                    entry.word
                );
                self.unfixable();
            }
            match kind {
                L2ClusterType::Compressed => {
                    let mut word = entry.word;
                    if word & L2_COPIED != 0 {
                        let coffset =
                            CompressedDescriptor::decode_unchecked(word, &geo).host_offset;
                        msg!(
                            self,
                            "ERROR: coffset={coffset:#x}: copied flag must never be set for \
                             compressed clusters"
                        );
                        word &= !L2_COPIED;
                        self.unfixable();
                    }
                    if self.data_file {
                        msg!(
                            self,
                            "ERROR compressed cluster {i} with data file, entry={word:#x}"
                        );
                        self.unfixable();
                        continue;
                    }
                    if bitmap != 0 {
                        msg!(
                            self,
                            "ERROR compressed cluster {i} with non-zero subcluster allocation \
                             bitmap, entry={word:#x}"
                        );
                        self.unfixable();
                        continue;
                    }
                    let desc = CompressedDescriptor::decode_unchecked(word, &geo);
                    self.inc_refs(imrt, desc.host_offset, desc.read_len())?;
                    if frag_info {
                        // Compressed clusters count as fragmented: reading one means reading
                        // whole sectors shared with its neighbours.
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        self.res.fragmented_clusters += 1;
                    }
                }
                L2ClusterType::ZeroAlloc | L2ClusterType::Normal => {
                    let offset = entry.raw_offset();
                    let sub = SubclusterBitmap(bitmap);
                    if sub.allocated() & sub.zero() != 0 {
                        self.unfixable();
                        msg!(
                            self,
                            "ERROR offset={offset:x}: Allocated cluster has corrupted \
                             subcluster allocation bitmap"
                        );
                    }
                    if !self.is_aligned(offset) {
                        self.res.corruptions += 1;
                        let contains_data = if extended {
                            sub.allocated() != 0
                        } else {
                            entry.word & L2_ZERO == 0
                        };
                        if contains_data {
                            self.res.unrepairable += 1;
                            msg!(
                                self,
                                "ERROR offset={offset:x}: Data cluster is not properly \
                                 aligned; L2 entry corrupted."
                            );
                        } else {
                            let verb = if fix.errors { "Repairing" } else { "ERROR" };
                            msg!(
                                self,
                                "{verb} offset={offset:x}: Preallocated cluster is not \
                                 properly aligned; L2 entry corrupted."
                            );
                            if fix.errors {
                                self.fix_l2_entry_by_zero(l2_offset, table, i, active)
                                    .await?;
                                // The entry no longer references anything.
                                fixed.push(i);
                                continue;
                            }
                        }
                    }
                    if frag_info {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset.wrapping_add(self.cs);
                    }
                    if !self.data_file {
                        self.inc_refs(imrt, offset, self.cs)?;
                    }
                }
                L2ClusterType::ZeroPlain => {}
                L2ClusterType::Unallocated => {
                    if bitmap & SubclusterBitmap::ALLOC_MASK != 0 {
                        self.unfixable();
                        self.msg(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes entry `index` of the L2 table at `l2_offset` a zero cluster without host space
    /// (fix_l2_entry_by_zero), in `table` only: the corruption counts as fixed, and
    /// [`Checker::write_zero_fixes`] writes the table's fixed entries at the end of its walk.
    /// (QEMU writes and flushes each entry at once: a garbage table made that one flush per
    /// entry.) Fails when the write would hit other metadata.
    async fn fix_l2_entry_by_zero(
        &mut self,
        l2_offset: u64,
        table: &mut IoBuf,
        index: usize,
        active: bool,
    ) -> Step {
        let geo = self.geo;
        let size = geo.l2_entry_size();
        let entry_offset = l2_offset + index as u64 * size;
        let ignore = if active {
            Overlap::ActiveL2
        } else {
            Overlap::InactiveL2
        };
        if let Err(e) = self.guard_write(entry_offset, size, ignore).await {
            self.msg("ERROR: Overlap check failed".into());
            self.res.check_errors += 1;
            return Err(e);
        }
        let old = L2Entry::read(table, &geo, index);
        let new = if geo.extended_l2() {
            // Allocated subclusters become zero ones.
            let bm = (old.bitmap | (old.bitmap << 32)) & SubclusterBitmap::ZERO_MASK;
            L2Entry {
                word: 0,
                bitmap: bm,
            }
        } else {
            L2Entry {
                word: L2_ZERO,
                bitmap: 0,
            }
        };
        new.write(table, &geo, index);
        self.res.corruptions -= 1;
        self.res.corruptions_fixed += 1;
        Ok(())
    }

    /// Writes the entries of the L2 table at `l2_offset` that were fixed in `table`, durably.
    /// If that fails they count as corruptions again (though, unlike in QEMU, the clusters
    /// they named were not counted).
    async fn write_zero_fixes(&mut self, l2_offset: u64, table: &IoBuf, fixed: &[usize]) {
        let (Some(&first), Some(&last)) = (fixed.first(), fixed.last()) else {
            return;
        };
        let size = self.geo.l2_entry_size() as usize;
        let bytes = table[first * size..(last + 1) * size].to_vec();
        let written = match self
            .write_bytes(l2_offset + (first * size) as u64, &bytes)
            .await
        {
            Ok(()) => self.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            msg!(self, "ERROR: Failed to overwrite L2 table entry: {e}");
            self.res.check_errors += 1;
            let n = fixed.len() as u64;
            self.res.corruptions += n;
            self.res.corruptions_fixed -= n;
        }
    }

    /// The bitmap directory, bitmap tables and their data clusters
    /// (qcow2_check_bitmaps_refcounts); only when the bitmaps are declared consistent.
    async fn check_bitmaps(&mut self, imrt: &mut Imrt) -> Step {
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = self.header.bitmaps().cloned() else {
            return Ok(());
        };
        self.inc_meta(
            imrt,
            Role::BitmapDirectory,
            ext.directory_offset,
            ext.directory_size,
        )?;
        let mut claimed = HashSet::new();
        self.bitmap_placement(
            &mut claimed,
            ext.directory_offset,
            ext.directory_size,
            Overlap::BitmapDirectory,
        );
        let disk_size = self.img.header.size;
        let entries = match self.img.bitmaps().await {
            Ok(list) => list,
            Err(_) => {
                self.unfixable();
                return Err(Abort(EINVAL.into()));
            }
        };
        for (i, bm) in entries.iter().enumerate() {
            if bm.validate(i, self.cs, disk_size).is_err() {
                self.unfixable();
                return Err(Abort(EINVAL.into()));
            }
        }
        for bm in &entries {
            let bytes = u64::from(bm.table_size) * 8;
            self.inc_meta(imrt, Role::BitmapTable, bm.table_offset, bytes)?;
            self.bitmap_placement(&mut claimed, bm.table_offset, bytes, Overlap::None);
            let table = match read_bytes(
                self.img.files.image(),
                bm.table_offset,
                bytes,
                "bitmap table",
            )
            .await
            {
                Ok(t) => t,
                Err(e) => {
                    self.unfixable();
                    return Err(e.into());
                }
            };
            let mut data = Vec::with_capacity(bm.table_size as usize);
            for i in 0..bm.table_size as usize {
                match BitmapTableEntry::read(&table, i).decode(self.cs) {
                    Ok(Ok(off)) => data.push(off.0),
                    Ok(Err(_all_ones)) => {}
                    Err(_) => {
                        // The table does not load: QEMU gives up the check.
                        self.unfixable();
                        return Err(Abort(EINVAL.into()));
                    }
                }
            }
            for off in data {
                self.inc_meta(imrt, Role::BitmapData, off, self.cs)?;
                self.bitmap_placement(&mut claimed, off, self.cs, Overlap::None);
            }
        }
        Ok(())
    }

    /// Counts as unrepairable a bitmap structure that a read-write open refuses (the engine
    /// writes bitmaps back in place): one not wholly inside the file, overlapping other
    /// metadata, or sharing a cluster with another bitmap structure (`claimed` collects
    /// them). Not reported otherwise: `qemu-img check` sees such a cluster only as a refcount
    /// below its references, which a repair would "fix" by counting it twice.
    fn bitmap_placement(
        &mut self,
        claimed: &mut HashSet<u64>,
        offset: u64,
        len: u64,
        ignore: Overlap,
    ) {
        if len == 0 {
            return;
        }
        let bad = offset
            .checked_add(len)
            .is_none_or(|end| end > self.file_len)
            || self.overlaps_metadata(offset, len, ignore).is_some()
            || {
                let bits = self.cluster_bits();
                let clusters = (offset >> bits)..=((offset + len - 1) >> bits);
                // Every cluster claimed, even after a repeat (so that later ones are seen).
                clusters.fold(false, |dup, c| !claimed.insert(c) | dup)
            };
        if bad {
            self.res.unrepairable += 1;
        }
    }

    /// Checks the refcount table's entries and counts the refcount blocks (check_refblocks).
    async fn check_refblocks(&mut self, fix: Fix, rebuild: &mut bool, imrt: &mut Imrt) -> Step {
        for i in 0..self.reftable.len() {
            let entry = self.reftable[i];
            let offset = entry.raw_offset();
            let cluster = offset >> self.cluster_bits();
            if entry.0 & ReftableEntry::RESERVED_MASK != 0 {
                msg!(self, "ERROR refcount table entry {i} has reserved bits set");
                // A rebuild is tried, but its new blocks may land on the cluster the entry
                // names (uncounted, so free), which the overlap check then refuses.
                self.unfixable();
                *rebuild = true;
                continue;
            }
            if !self.is_aligned(offset) {
                msg!(
                    self,
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                );
                self.unfixable();
                *rebuild = true;
                continue;
            }
            if cluster >= imrt.len {
                self.res.corruptions += 1;
                let verb = if fix.errors { "Repairing" } else { "ERROR" };
                msg!(self, "{verb} refcount block {i} is outside image");
                if fix.errors {
                    match self.grow_file_to(offset, imrt).await {
                        Ok(()) if cluster < imrt.len => {
                            self.res.corruptions -= 1;
                            self.res.corruptions_fixed += 1;
                            // A fresh, zeroed cluster: its refcount is exactly this one.
                            self.inc_meta(imrt, Role::Refblock, offset, self.cs)?;
                            continue;
                        }
                        Ok(()) => {
                            *rebuild = true;
                            msg!(self, "ERROR could not resize image: {EINVAL}");
                        }
                        Err(e) => {
                            *rebuild = true;
                            msg!(self, "ERROR could not resize image: {e}");
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc_meta(imrt, Role::Refblock, offset, self.cs)?;
                let n = imrt.get(cluster);
                if n != 1 {
                    msg!(self, "ERROR refcount block {i} refcount={n}");
                    self.res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Extends the file to hold the cluster at `offset` and the in-memory table with it.
    async fn grow_file_to(
        &mut self,
        offset: u64,
        imrt: &mut Imrt,
    ) -> std::result::Result<(), String> {
        let end = offset
            .checked_add(self.cs)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or_else(|| EINVAL.to_string())?;
        self.img
            .files
            .image()
            .set_len(end)
            .await
            .map_err(|e| e.to_string())?;
        self.refresh_len().await.map_err(|e| e.to_string())?;
        let n = self.file_len.div_ceil(self.cs);
        if n > MAX_CHECK_CLUSTERS {
            return Err(EFBIG.into());
        }
        imrt.resize(n).map_err(|()| ENOMEM.to_string())
    }

    // ---------------------------------------------------------------------------------------
    // Stored refcounts

    /// The stored refcount of a cluster (qcow2_get_refcount): 0 beyond the table or without a
    /// block; an error for a misaligned block.
    async fn disk_refcount(&mut self, cluster: u64) -> std::result::Result<u64, String> {
        let epb = self.entries_per_block();
        let index = cluster / epb;
        let Some(entry) = usize::try_from(index)
            .ok()
            .and_then(|i| self.reftable.get(i))
        else {
            return Ok(0);
        };
        let offset = entry.raw_offset();
        if offset == 0 {
            return Ok(0);
        }
        if !self.is_aligned(offset) {
            self.signal_corruption(format!(
                "Refblock offset {} unaligned (reftable index: {})",
                hash_x(offset),
                hash_x(index)
            ))
            .await;
            return Err(EIO.into());
        }
        let width = self.width;
        let block = self.block(offset).await.map_err(|e| e.to_string())?;
        Ok(width.get(block, cluster % epb))
    }

    /// The refcount block at `offset`, from memory or disk (zeros past the end of the file).
    async fn block(&mut self, offset: u64) -> Result<&mut Vec<u8>> {
        if !self.blocks.contains_key(&offset) {
            if self.blocks.len() >= BLOCK_CACHE {
                let dirty = &self.dirty;
                self.blocks.retain(|off, _| dirty.contains(off));
            }
            let b = read_bytes(self.img.files.image(), offset, self.cs, "refcount block").await?;
            self.blocks.insert(offset, b.to_vec());
        }
        Ok(self.blocks.get_mut(&offset).expect("just inserted"))
    }

    /// Sets the stored refcount of `cluster`, whose block exists (it had a non-zero refcount).
    async fn set_disk_refcount(&mut self, cluster: u64, value: u64) -> Step {
        let epb = self.entries_per_block();
        let index = cluster / epb;
        let offset = usize::try_from(index)
            .ok()
            .and_then(|i| self.reftable.get(i))
            .map(|e| e.raw_offset())
            .filter(|o| *o != 0)
            .ok_or_else(|| Abort(EIO.into()))?;
        let width = self.width;
        let block = self.block(offset).await?;
        width
            .set(block, cluster % epb, value)
            .map_err(|e| Abort(e.to_string()))?;
        self.dirty.insert(offset);
        if self.dirty.len() >= DIRTY_BATCH {
            self.write_dirty_blocks().await?;
        }
        Ok(())
    }

    async fn write_dirty_blocks(&mut self) -> Step {
        let dirty = std::mem::take(&mut self.dirty);
        for offset in dirty {
            if let Err(e) = self
                .guard_write(offset, self.cs, Overlap::RefcountBlock)
                .await
            {
                self.res.check_errors += 1;
                return Err(e);
            }
            let data = self.blocks.get(&offset).cloned().unwrap_or_default();
            self.write_bytes(offset, &data).await?;
        }
        Ok(())
    }

    /// Compares stored and computed refcounts, fixing what `fix` allows
    /// (compare_refcounts). Returns the highest cluster in use.
    async fn compare_refcounts(&mut self, fix: Fix, rebuild: &mut bool, imrt: &Imrt) -> Step<u64> {
        let mut highest = 0;
        // (cluster, new refcount, increase?)
        let mut updates: Vec<(u64, u64, bool)> = Vec::new();
        for i in 0..imrt.len {
            let stored = match self.disk_refcount(i).await {
                Ok(n) => n,
                Err(e) => {
                    msg!(self, "Can't get refcount for cluster {i}: {e}");
                    self.res.check_errors += 1;
                    continue;
                }
            };
            let computed = imrt.get(i);
            if stored > 0 || computed > 0 {
                highest = i;
            }
            if stored == computed {
                continue;
            }
            let fixable = if stored == 0 {
                *rebuild = true;
                false
            } else {
                (stored > computed && fix.leaks) || (stored < computed && fix.errors)
            };
            let what = if fixable {
                "Repairing"
            } else if stored < computed {
                "ERROR"
            } else {
                "Leaked"
            };
            msg!(
                self,
                "{what} cluster {i} refcount={stored} reference={computed}"
            );
            if fixable {
                updates.push((i, computed, computed > stored));
                if stored > computed {
                    self.res.leaks_fixed += 1;
                } else {
                    self.res.corruptions_fixed += 1;
                }
            } else if stored < computed {
                self.res.corruptions += 1;
            } else {
                self.res.leaks += 1;
            }
        }
        if !updates.is_empty() {
            self.apply_refcount_updates(&updates).await?;
        }
        Ok(highest)
    }

    /// Writes refcount changes in crash-safe order: every increase is on disk before any
    /// decrease; clusters freed are punched out last.
    async fn apply_refcount_updates(&mut self, updates: &[(u64, u64, bool)]) -> Step {
        for increase in [true, false] {
            for &(cluster, value, up) in updates {
                if up == increase {
                    self.set_disk_refcount(cluster, value).await?;
                }
            }
            self.write_dirty_blocks().await?;
            self.flush().await?;
        }
        for &(cluster, value, _) in updates {
            if value == 0 {
                // Like QEMU, give freed clusters back to the file system; failure is harmless.
                let _ = self
                    .img
                    .files
                    .image()
                    .punch_hole(cluster << self.cluster_bits(), self.cs, Keep::none())
                    .await;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // COPIED flags

    /// Checks (and with `fix`, repairs) COPIED in the active L1 and L2 tables
    /// (check_oflag_copied).
    async fn check_oflag_copied(&mut self, fix: Fix) -> Step {
        let repair = fix.errors
            || (fix.leaks
                && self.res.check_errors == 0
                && self.res.corruptions == 0
                && self.res.leaks == 0);
        let verb = if repair { "Repairing" } else { "ERROR" };
        let geo = self.geo;
        let bits = self.cluster_bits();
        for i in 0..self.l1.len() {
            let l1_entry = self.l1[i];
            let l2_offset = l1_entry.raw_offset();
            if l2_offset == 0 {
                continue;
            }
            if let Ok(refcount) = self.disk_refcount(l2_offset >> bits).await {
                if (refcount == 1) != l1_entry.copied() {
                    self.res.corruptions += 1;
                    msg!(
                        self,
                        "{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} \
                         refcount={refcount}",
                        l1_entry.0
                    );
                    if repair {
                        let fixed = if refcount == 1 {
                            L1Entry(l1_entry.0 | L1Entry::COPIED)
                        } else {
                            L1Entry(l1_entry.0 & !L1Entry::COPIED)
                        };
                        self.l1[i] = fixed;
                        if let Err(e) = self.write_l1_entry(i).await {
                            self.res.check_errors += 1;
                            return Err(e);
                        }
                        self.res.corruptions -= 1;
                        self.res.corruptions_fixed += 1;
                    }
                }
            }
            if l2_offset >= self.file_len {
                // Reads as zeros: no allocated entry to check.
                continue;
            }
            let mut table =
                match read_bytes(self.img.files.image(), l2_offset, self.cs, "L2 table").await {
                    Ok(t) => t,
                    Err(e) => {
                        msg!(self, "ERROR: Could not read L2 table: {e}");
                        self.res.check_errors += 1;
                        return Err(e.into());
                    }
                };
            let mut dirty = 0u64;
            for j in 0..geo.l2_entries() as usize {
                let entry = L2Entry::read(&table, &geo, j);
                let kind = entry.cluster_type(&geo, self.data_file);
                if !matches!(kind, L2ClusterType::Normal | L2ClusterType::ZeroAlloc) {
                    continue;
                }
                let refcount = if self.data_file {
                    1
                } else {
                    match self.disk_refcount(entry.raw_offset() >> bits).await {
                        Ok(n) => n,
                        Err(_) => continue,
                    }
                };
                let copied = entry.word & L2_COPIED != 0;
                if (refcount == 1) != copied {
                    self.res.corruptions += 1;
                    msg!(
                        self,
                        "{verb} OFLAG_COPIED data cluster: l2_entry={:x} refcount={refcount}",
                        entry.word
                    );
                    if repair {
                        let word = if refcount == 1 {
                            entry.word | L2_COPIED
                        } else {
                            entry.word & !L2_COPIED
                        };
                        L2Entry { word, ..entry }.write(&mut table, &geo, j);
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if let Err(e) = self
                    .guard_write(l2_offset, self.cs, Overlap::ActiveL2)
                    .await
                {
                    msg!(
                        self,
                        "ERROR: Could not write L2 table; metadata overlap check failed: {}",
                        e.0
                    );
                    self.res.check_errors += 1;
                    return Err(e);
                }
                let data = table.to_vec();
                if let Err(e) = self.write_bytes(l2_offset, &data).await {
                    msg!(self, "ERROR: Could not write L2 table: {e}");
                    self.res.check_errors += 1;
                    return Err(e.into());
                }
                self.res.corruptions -= dirty;
                self.res.corruptions_fixed += dirty;
            }
        }
        Ok(self.flush().await?)
    }

    /// Writes entry `i` of the active L1 table (qcow2_write_l1_entry), durably.
    async fn write_l1_entry(&mut self, i: usize) -> Step {
        let offset = self.header.l1_table_offset + i as u64 * 8;
        self.guard_write(offset, 8, Overlap::ActiveL1).await?;
        let mut bytes = [0u8; 8];
        self.l1[i].write(&mut bytes, 0);
        self.write_bytes(offset, &bytes).await?;
        Ok(self.flush().await?)
    }

    // ---------------------------------------------------------------------------------------
    // Rebuilding the refcount structure

    /// Allocates `count` contiguous clusters in the in-memory table, at or after
    /// `*first_free` (which is moved to the first gap seen), growing the table past its end
    /// when needed (alloc_clusters_imrt). Returns the byte offset.
    fn alloc_imrt(&mut self, imrt: &mut Imrt, count: u64, first_free: &mut u64) -> Step<u64> {
        let mut cluster = *first_free;
        let mut contiguous = 0;
        let mut first_gap = true;
        while cluster < imrt.len && contiguous < count {
            if imrt.get(cluster) == 0 {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                contiguous = 0;
            }
            cluster += 1;
        }
        if contiguous < count {
            let n = cluster + count - contiguous;
            if n > MAX_CHECK_CLUSTERS || imrt.resize(n).is_err() {
                return Err(Abort(ENOMEM.into()));
            }
        }
        cluster -= contiguous;
        for c in cluster..cluster + count {
            imrt.set(c, 1);
        }
        Ok(cluster << self.cluster_bits())
    }

    /// Writes the refcount blocks for the clusters `[first, end)` that are in use, allocating
    /// blocks (in the in-memory table) where the new refcount table has none yet
    /// (rebuild_refcounts_write_refblocks). Returns whether the refcount table grew.
    async fn write_new_refblocks(
        &mut self,
        imrt: &mut Imrt,
        first: u64,
        mut end: u64,
        reftable: &mut Vec<u64>,
    ) -> Step<bool> {
        let epb = self.entries_per_block();
        let entries_per_cluster = self.cs / 8;
        let max_entries = qcow2_format::limits::MAX_REFTABLE_BYTES / 8;
        let mut first_free = 0;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if imrt.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster / epb;
            let block_start = index * epb;
            let existing = usize::try_from(index)
                .ok()
                .and_then(|i| reftable.get(i))
                .copied()
                .filter(|o| *o != 0);
            let offset = match existing {
                Some(o) => o,
                None => {
                    first_free = first_free.max(block_start);
                    let off = self.alloc_imrt(imrt, 1, &mut first_free)?;
                    let block_cluster = off >> self.cluster_bits();
                    if block_cluster >= end {
                        // The block describing this block must be written too.
                        end = block_cluster + 1;
                    }
                    if reftable.len() as u64 <= index {
                        let n = (index + 1).div_ceil(entries_per_cluster) * entries_per_cluster;
                        if n > max_entries {
                            self.res.check_errors += 1;
                            return Err(Abort(EFBIG.into()));
                        }
                        reftable.resize(n as usize, 0);
                        grown = true;
                    }
                    reftable[index as usize] = off;
                    off
                }
            };
            if let Err(e) = self.guard_write(offset, self.cs, Overlap::None).await {
                self.res.check_errors += 1;
                return Err(e);
            }
            let data = imrt.block(index).to_vec();
            self.write_bytes(offset, &data).await?;
            cluster = block_start + epb;
        }
        Ok(grown)
    }

    /// Writes a new refcount structure from the in-memory table into clusters nothing uses,
    /// then switches the header to it (rebuild_refcount_structure). The old structure stays
    /// valid until that switch; afterwards it is leaked (and freed by the caller).
    async fn rebuild_refcount_structure(&mut self, imrt: &mut Imrt) -> Step {
        self.blocks.clear();
        self.dirty.clear();
        let mut reftable: Vec<u64> = Vec::new();
        let end = imrt.len;
        self.write_new_refblocks(imrt, 0, end, &mut reftable)
            .await?;
        let (rt_offset, rt_clusters) = loop {
            let rt_bytes = reftable.len() as u64 * 8;
            let rt_clusters = rt_bytes.div_ceil(self.cs);
            let mut first_free = 0;
            let rt_offset = self.alloc_imrt(imrt, rt_clusters, &mut first_free)?;
            let start = rt_offset >> self.cluster_bits();
            // The table's own clusters changed the in-memory counts: write their blocks again.
            let grown = self
                .write_new_refblocks(imrt, start, start + rt_clusters, &mut reftable)
                .await?;
            if !grown {
                break (rt_offset, rt_clusters);
            }
        };
        let mut table = vec![0u8; (rt_clusters * self.cs) as usize];
        for (i, off) in reftable.iter().enumerate() {
            ReftableEntry(*off).write(&mut table, i);
        }
        self.guard_write(rt_offset, table.len() as u64, Overlap::None)
            .await?;
        self.write_bytes(rt_offset, &table).await?;
        // Everything the new table points to is durable before the header points to it.
        self.flush().await?;
        let mut header = self.header.clone();
        header.refcount_table_offset = rt_offset;
        header.refcount_table_clusters =
            u32::try_from(rt_clusters).map_err(|_| Abort(EFBIG.into()))?;
        // refcount_table_offset and refcount_table_clusters, bytes 48..60.
        self.write_header_fields(&header, 48..60).await?;
        self.header = header;
        self.reftable = reftable.into_iter().map(ReftableEntry).collect();
        self.blocks.clear();
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Header, writes, overlaps

    /// Clears the dirty and corrupt bits after a repair that left no corruption
    /// (qcow2_mark_clean, qcow2_mark_consistent).
    async fn mark_clean_and_consistent(&mut self) -> Step {
        let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        if self.header.version < 3 || self.header.incompatible_features & bits == 0 {
            return Ok(());
        }
        self.flush().await?;
        let mut header = self.header.clone();
        header.incompatible_features &= !bits;
        // incompatible_features, bytes 72..80.
        self.write_header_fields(&header, 72..80).await?;
        self.header = header;
        Ok(())
    }

    /// Writes bytes `range` of `header` as serialized, then flushes.
    async fn write_header_fields(
        &mut self,
        header: &Header,
        range: std::ops::Range<usize>,
    ) -> Step {
        let bytes = header
            .serialize()
            .map_err(|e| Abort(format!("cannot serialize the header: {e}")))?;
        let part = bytes
            .get(range.clone())
            .ok_or_else(|| Abort("header too short".into()))?
            .to_vec();
        self.write_bytes(range.start as u64, &part).await?;
        Ok(self.flush().await?)
    }

    /// Writes `data` at `offset` of the image file (read-modify-write around it when the
    /// backend needs aligned I/O), keeping the known file length up to date.
    async fn write_bytes(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let file = self.img.files.image();
        let align = file.alignment().max(1) as u64;
        let what = || format!("{}: writing metadata", self.img.files.path().display());
        let end = offset + data.len() as u64;
        let buf = if align == 1 {
            IoBuf::from_slice(data)
        } else {
            let start = offset / align * align;
            let aligned_end = end.div_ceil(align) * align;
            let mut b = read_bytes(file, start, aligned_end - start, "metadata").await?;
            b.reset_window();
            let from = (offset - start) as usize;
            b.as_full_mut_slice()[from..from + data.len()].copy_from_slice(data);
            b
        };
        let at = if align == 1 {
            offset
        } else {
            offset / align * align
        };
        // As every metadata write (I9): after any older one still in flight, and tracked.
        self.img.meta_io.idle().await;
        let mut buf = buf;
        buf.attach(Keep::new(self.img.meta_io.token().await));
        let (res, _) = file.write_at(buf, at).await;
        res.map_err(|e| Error::io(what(), e))?;
        if end > self.file_len {
            self.refresh_len().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.img
            .files
            .image()
            .flush()
            .await
            .map_err(|e| Error::io(format!("{}: flush", self.img.files.path().display()), e))
    }

    async fn refresh_len(&mut self) -> Result<()> {
        self.file_len = self
            .img
            .files
            .image()
            .len()
            .await
            .map_err(|e| Error::io(format!("{}: size", self.img.files.path().display()), e))?;
        Ok(())
    }

    /// Refuses a metadata write that would overwrite other live metadata, as QEMU's
    /// `qcow2_pre_write_overlap_check` does: the image is then marked corrupt (once), and the
    /// repair stops.
    async fn guard_write(&mut self, offset: u64, len: u64, ignore: Overlap) -> Step {
        let Some(what) = self.overlaps_metadata(offset, len, ignore) else {
            return Ok(());
        };
        self.signal_corruption(format!(
            "Preventing invalid write on metadata (overlaps with {what})"
        ))
        .await;
        Err(Abort(EIO.into()))
    }

    /// Reports inconsistent metadata met on the way (qcow2_signal_corruption): once per open
    /// image; during a repair it is fatal and sets the corrupt bit, as QEMU does on a
    /// read-write image.
    async fn signal_corruption(&mut self, what: String) {
        let fatal = self.writable;
        if self.corruption_signaled && (!fatal || self.header.is_corrupt()) {
            return;
        }
        self.corruption_signaled = true;
        if !fatal {
            msg!(
                self,
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be \
                 suppressed"
            );
            return;
        }
        msg!(
            self,
            "qcow2: Marking image as corrupt: {what}; further corruption events will be \
             suppressed"
        );
        let mut header = self.header.clone();
        header.incompatible_features |= INCOMPAT_CORRUPT;
        // Best effort (v3 only: v2 has no feature bits): the repair stops or fails anyway.
        if header.version >= 3 {
            let _ = self.write_header_fields(&header, 72..80).await;
        }
        self.header = header;
    }

    /// Which live metadata `[offset, offset+len)` would overwrite, if any (QEMU's overlap
    /// check in its default "cached" mode), ignoring the kind being written.
    fn overlaps_metadata(&self, offset: u64, len: u64, ignore: Overlap) -> Option<&'static str> {
        if len == 0 {
            return None;
        }
        if offset < self.cs {
            return Some("qcow2_header");
        }
        let cs = self.cs;
        let start = offset / cs * cs;
        let end = (offset + len).div_ceil(cs) * cs;
        let hit = |o: u64, l: u64| l > 0 && o < end && start < o.saturating_add(l);
        let h = &self.header;
        if ignore != Overlap::ActiveL1 && hit(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            return Some("active L1 table");
        }
        if hit(h.refcount_table_offset, self.reftable.len() as u64 * 8) {
            return Some("refcount table");
        }
        let snapshots = self.snapshots.as_deref().unwrap_or_default();
        if hit(h.snapshots_offset, snapshot_table_size(snapshots)) {
            return Some("snapshot table");
        }
        if snapshots
            .iter()
            .any(|s| hit(s.l1_table_offset, u64::from(s.l1_size) * 8))
        {
            return Some("inactive L1 table");
        }
        if ignore != Overlap::ActiveL2 && self.l1.iter().any(|e| hit(e.raw_offset(), cs)) {
            return Some("active L2 table");
        }
        if ignore != Overlap::RefcountBlock && self.reftable.iter().any(|e| hit(e.raw_offset(), cs))
        {
            return Some("refcount block");
        }
        if h.autoclear_features & AUTOCLEAR_BITMAPS != 0 && ignore != Overlap::BitmapDirectory {
            if let Some(b) = h.bitmaps() {
                if hit(b.directory_offset, b.directory_size) {
                    return Some("bitmap directory");
                }
            }
        }
        // Inactive L2 tables are not part of QEMU's default ("cached") overlap set.
        None
    }
}

/// Bytes of the snapshot table as QEMU counts them: every entry padded to 8 bytes except the
/// last one.
fn snapshot_table_size(snapshots: &[Snapshot]) -> u64 {
    let mut size = 0u64;
    for s in snapshots {
        size = size.div_ceil(8) * 8;
        size += (Snapshot::FIXED_LEN + s.extra_data.len() + s.id.len() + s.name.len()) as u64;
    }
    size
}
