//! How to open an image: [`ImageOptions`], a builder.

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
    pub(crate) l2_cache_bytes: u64,
    pub(crate) refcount_cache_bytes: u64,
    pub(crate) backing: BackingChoice,
    pub(crate) data_file: Option<PathBuf>,
    pub(crate) max_backing_depth: usize,
    pub(crate) lazy_refcounts: Option<bool>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            direct: false,
            l2_cache_bytes: 32 << 20,
            refcount_cache_bytes: 8 << 20,
            backing: BackingChoice::FromHeader,
            data_file: None,
            max_backing_depth: 64,
            lazy_refcounts: None,
        }
    }
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

    /// Bypasses the page cache (O_DIRECT, QEMU's `cache=none`).
    pub fn direct(mut self, yes: bool) -> Self {
        self.direct = yes;
        self
    }

    /// Upper bound of memory for cached L2 tables, in bytes (at least one table is kept).
    pub fn l2_cache_size(mut self, bytes: u64) -> Self {
        self.l2_cache_bytes = bytes;
        self
    }

    /// Upper bound of memory for cached refcount blocks, in bytes.
    pub fn refcount_cache_size(mut self, bytes: u64) -> Self {
        self.refcount_cache_bytes = bytes;
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

    /// Whether these options open read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether these options use O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}
