//! How to open an image: [`ImageOptions`], a builder.

use blockio::{LockRequest, Locking, Perms};
use std::path::PathBuf;

/// The format of an image in a backing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// qcow2.
    Qcow2,
    /// A raw disk image.
    Raw,
}

impl ImageFormat {
    /// The format's name as QEMU spells it (`qcow2`, `raw`).
    pub fn name(&self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }

    /// Parses a QEMU format name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "qcow2" => Some(ImageFormat::Qcow2),
            "raw" => Some(ImageFormat::Raw),
            _ => None,
        }
    }
}

/// Which backing file to use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BackingChoice {
    /// The one the image header names (default).
    #[default]
    FromHeader,
    /// None: unallocated clusters read as zeros.
    None,
    /// This file instead of the header's (format probed when `None`).
    File {
        /// Path of the backing file.
        path: PathBuf,
        /// Its format.
        format: Option<ImageFormat>,
    },
}

/// Options for [`crate::Image::open`]: read-only or read-write, O_DIRECT or cached I/O, cache
/// sizes, backing and data file overrides.
///
/// ```
/// use qcow2_engine::ImageOptions;
/// let opts = ImageOptions::new().read_only(true).direct(false).l2_cache_size(4 << 20);
/// assert!(opts.is_read_only());
/// ```
#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub(crate) read_only: bool,
    pub(crate) direct: bool,
    /// Whether every write is made durable before it completes, and whether flushes are
    /// skipped (the rest of the cache mode: `direct` is its other half).
    pub(crate) write_through: bool,
    pub(crate) no_flush: bool,
    pub(crate) l2_cache_bytes: u64,
    pub(crate) backing: BackingChoice,
    pub(crate) data_file: Option<PathBuf>,
    pub(crate) max_backing_depth: usize,
    pub(crate) lazy_refcounts: Option<bool>,
    pub(crate) locking: Locking,
    pub(crate) force_share: bool,
    /// Whether the image file itself is locked (the chain below it always is, as `locking`
    /// says): off only for a file another open of this process locks already.
    pub(crate) lock_image: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            direct: false,
            write_through: false,
            no_flush: false,
            l2_cache_bytes: 32 << 20,
            backing: BackingChoice::FromHeader,
            data_file: None,
            max_backing_depth: 64,
            lazy_refcounts: None,
            locking: Locking::Auto,
            force_share: false,
            lock_image: true,
        }
    }
}

/// How an image uses the host's page cache and flushes, by QEMU's names (`-t`, `--cache`,
/// `cache=`). Durability is the same in all but [`CacheMode::Unsafe`]: what
/// [`Image::flush`](crate::Image::flush) (or a write-through write) returned from is on
/// disk; they differ in what is durable before that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Through the page cache; a write is durable after the next flush (the default).
    #[default]
    Writeback,
    /// Through the page cache; each write (and write-zeroes, compressed write) is durable,
    /// with the metadata that maps it, before it completes, as with FUA.
    Writethrough,
    /// `O_DIRECT`: the page cache bypassed; durability as `Writeback` (the device may
    /// have a volatile cache of its own).
    None,
    /// `O_DIRECT` and each write durable before it completes.
    Directsync,
    /// Through the page cache, and flushes do not reach the disk: metadata is still written
    /// back to the file, but a crash (of the host) may lose anything. For scratch images.
    Unsafe,
}

impl CacheMode {
    /// The mode QEMU calls `name` (`writeback`, `writethrough`, `none`, `off`,
    /// `directsync`, `unsafe`).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "none" | "off" => CacheMode::None,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => return None,
        })
    }

    /// QEMU's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::None => "none",
            CacheMode::Directsync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }

    /// Whether the files are opened with `O_DIRECT`.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Whether each write is durable before it completes.
    pub fn writes_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
}

/// Flags of one write request ([`Image::write_at_with`](crate::Image::write_at_with)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteFlags {
    /// Force unit access: the write is durable, with the metadata that maps it, when it
    /// completes (virtio-blk's and NVMe's FUA, QEMU's `BDRV_REQ_FUA`).
    pub fua: bool,
}

impl WriteFlags {
    /// A write that is durable when it completes.
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// What an open file is to the image, for its locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileRole {
    /// A qcow2 image's own file (the image, or a qcow2 backing file).
    Qcow2,
    /// A raw image's file (the image, or a raw backing file).
    Raw,
    /// A qcow2 image's external data file.
    DataFile,
    /// A file opened to read its first bytes (format probing).
    Probe,
}

impl ImageOptions {
    /// Read-write, cached I/O, 32 MiB of L2 cache, the header's backing file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens read-only: nothing is ever written to the file.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// Bypasses the page cache (O_DIRECT, QEMU's `cache=none`), leaving the rest of the
    /// cache mode as it was.
    pub fn direct(mut self, yes: bool) -> Self {
        self.direct = yes;
        self
    }

    /// The cache mode, as QEMU names them (see [`CacheMode`]): whether the files are read
    /// and written through the page cache, whether each write is durable when it completes,
    /// whether flushes reach the disk.
    pub fn cache(mut self, mode: CacheMode) -> Self {
        self.direct = mode.direct();
        self.write_through = mode.writes_through();
        self.no_flush = mode == CacheMode::Unsafe;
        self
    }

    /// The cache mode these options open with.
    pub fn cache_mode(&self) -> CacheMode {
        match (self.direct, self.write_through, self.no_flush) {
            (_, _, true) => CacheMode::Unsafe,
            (true, true, false) => CacheMode::Directsync,
            (true, false, false) => CacheMode::None,
            (false, true, false) => CacheMode::Writethrough,
            (false, false, false) => CacheMode::Writeback,
        }
    }

    /// Upper bound of memory for cached L2 tables, in bytes (at least one table is kept).
    pub fn l2_cache_size(mut self, bytes: u64) -> Self {
        self.l2_cache_bytes = bytes;
        self
    }

    /// Chooses the backing file.
    pub fn backing(mut self, choice: BackingChoice) -> Self {
        self.backing = choice;
        self
    }

    /// Uses this external data file instead of the name in the header.
    pub fn data_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.data_file = Some(path.into());
        self
    }

    /// Refuses backing chains deeper than `depth` images below the top one (default 64).
    pub fn max_backing_depth(mut self, depth: usize) -> Self {
        self.max_backing_depth = depth;
        self
    }

    /// Lazy refcounts: write refcount blocks only at close, keeping the dirty bit set while
    /// the image is open (a crash then costs a refcount rebuild at the next open). Default:
    /// what the image's lazy-refcounts bit says. Only v3 images can use it.
    pub fn lazy_refcounts(mut self, yes: bool) -> Self {
        self.lazy_refcounts = Some(yes);
        self
    }

    /// Whether to lock the files as QEMU does (invariant I10; QEMU's `locking` option of its
    /// file driver): `Auto` (the default) locks where the system has OFD locks. See
    /// [`ImageOptions::force_share`] for what the locks exclude.
    pub fn locking(mut self, locking: Locking) -> Self {
        self.locking = locking;
        self
    }

    /// Shares every permission with other users of the files (qemu-img's `-U`,
    /// `--force-share`): a read-only open then coexists with a writer, in this process or
    /// another (QEMU, qemu-io), and reads what it finds, consistent or not. Only for read-only
    /// opens: [`Image::open`](crate::Image::open) refuses it otherwise.
    ///
    /// Without it, the locks are QEMU's: a read-write open holds consistent read, write and
    /// resize and shares neither write nor resize, so it excludes any other writer and any
    /// reader that does not share; a read-only open excludes writers; read-only opens
    /// coexist. Backing files are locked as read-only opens; an external data file is locked
    /// against other resizers only (QEMU shares writes to it).
    pub fn force_share(mut self, yes: bool) -> Self {
        self.force_share = yes;
        self
    }

    /// The locks to take on a file of `role`, as QEMU's block layer asks its file driver for
    /// them (observed on QEMU 10 in /proc/locks).
    pub(crate) fn lock_request(&self, role: FileRole) -> Option<LockRequest> {
        const READ: Perms = Perms::CONSISTENT_READ;
        let write = !self.read_only;
        let (perm, shared) = match role {
            FileRole::Qcow2 => {
                let perm = match write {
                    true => READ | Perms::WRITE | Perms::RESIZE,
                    false => READ,
                };
                (perm, Perms::ALL.without(Perms::WRITE | Perms::RESIZE))
            }
            FileRole::DataFile => {
                let perm = match write {
                    true => READ | Perms::WRITE | Perms::RESIZE,
                    false => READ,
                };
                (perm, Perms::ALL.without(Perms::RESIZE))
            }
            FileRole::Raw => {
                let perm = match write {
                    true => READ | Perms::WRITE,
                    false => READ,
                };
                (perm, Perms::ALL)
            }
            FileRole::Probe => (READ, Perms::ALL),
        };
        let shared = if self.force_share { Perms::ALL } else { shared };
        Some(LockRequest::new(perm, shared).locking(self.locking))
    }

    /// Whether these options open read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether these options use O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Which backing file these options open.
    pub fn backing_choice(&self) -> &BackingChoice {
        &self.backing
    }
}

// The options of `create` (qemu-img create's `-o`), here because the errors name them.

/// The compatibility level (`compat=` in qemu-img, `version` in QMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// `compat=0.10`: a version 2 image (72-byte header, 16-bit refcounts, no feature bits).
    V2,
    /// `compat=1.1`: a version 3 image (the default).
    #[default]
    V3,
}

impl Compat {
    /// Parses qemu-img's spellings: `0.10` or `v2`, `1.1` or `v3`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "0.10" | "v2" => Some(Compat::V2),
            "1.1" | "v3" => Some(Compat::V3),
            _ => None,
        }
    }

    /// The header version number (2 or 3).
    pub fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
}

/// How much of the image to allocate up front (`preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing: a sparse image with just the L1 table (the default).
    #[default]
    Off,
    /// Every L2 table and data cluster is allocated (refcounts and COPIED L2 entries), and the
    /// file is extended to cover the data clusters, sparsely.
    Metadata,
    /// As `Metadata`, with the data area reserved on disk (`fallocate`).
    Falloc,
    /// As `Metadata`, with zeros written over the data area.
    Full,
}

impl Preallocation {
    /// Parses QEMU's names: `off`, `metadata`, `falloc`, `full`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "off" => Some(Preallocation::Off),
            "metadata" => Some(Preallocation::Metadata),
            "falloc" => Some(Preallocation::Falloc),
            "full" => Some(Preallocation::Full),
            _ => None,
        }
    }

    /// QEMU's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// How [`Image::resize`](crate::Image::resize) may change an image: whether it may shrink it,
/// and what it allocates for the area a grow adds (QEMU's `qemu-img resize` options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResizeOptions {
    /// A size below the current one is refused unless this is set (`--shrink`): shrinking
    /// deletes everything past the new end.
    pub shrink: bool,
    /// What a grow allocates for the new area (`--preallocation`); only `Off` may shrink.
    pub preallocation: Preallocation,
}

impl ResizeOptions {
    /// Grow only, nothing preallocated.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows (or not) a size below the current one.
    pub fn shrink(mut self, allow: bool) -> Self {
        self.shrink = allow;
        self
    }

    /// What a grow allocates for the new area.
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }
}

/// What [`Image::snapshot_create_with`](crate::Image::snapshot_create_with) records with a
/// snapshot besides the disk: the VM state saved with it, as QEMU's `savevm` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotOptions {
    /// Bytes of the VM state area (written with
    /// [`Image::vm_state_write_at`](crate::Image::vm_state_write_at)) that belong to the
    /// snapshot; the active image's copy of them is discarded once the snapshot holds them.
    pub vm_state_size: u64,
    /// The guest's clock at the snapshot, in nanoseconds.
    pub vm_clock_nsec: u64,
}

impl SnapshotOptions {
    /// No VM state, VM clock 0 (what `qemu-img snapshot -c` writes).
    pub fn new() -> Self {
        Self::default()
    }

    /// The VM state's size in bytes.
    pub fn vm_state_size(mut self, bytes: u64) -> Self {
        self.vm_state_size = bytes;
        self
    }

    /// The guest clock, in nanoseconds.
    pub fn vm_clock_nsec(mut self, nsec: u64) -> Self {
        self.vm_clock_nsec = nsec;
        self
    }
}

/// A feature that a version 2 (`compat=0.10`) image cannot have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V3Feature {
    /// A refcount width other than 16 bits.
    RefcountBits,
    /// Lazy refcounts.
    LazyRefcounts,
    /// Extended L2 entries.
    ExtendedL2,
    /// A compression type other than zlib.
    CompressionType,
    /// An external data file.
    DataFile,
}

impl std::fmt::Display for Compat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        })
    }
}
