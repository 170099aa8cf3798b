//! Changing an existing image's qcow2 options (`qemu-img amend`): the version (`compat`),
//! lazy refcounts, the refcount width (`refcount_bits`), the external data file's name and
//! its raw flag; the backing file only as QEMU allows it (not at all: that is `rebase`'s
//! job).
//!
//! [`Image::amend`] checks everything first, in the order and with the words of QEMU 10's
//! `qcow2_amend_options`, so that a refused amendment changes nothing (but for QEMU's own
//! exception: an upgrade asked for with a too narrow refcount width is made, then the width
//! refused). Then:
//!
//! 1. the image is made clean (every metadata structure written back, refcounts included,
//!    the dirty bit cleared), since turning lazy refcounts off or going back to version 2
//!    needs it;
//! 2. for an upgrade, snapshots lacking the version 3 fields get them: the snapshot table is
//!    written anew (QEMU's `qcow2_upgrade`; switched by its own synced header write, and
//!    version 2 images may carry those fields). An upgrade with a new refcount width is
//!    written first as an amendment of its own, as QEMU upgrades first;
//! 3. for a new refcount width, a whole new refcount structure is built in new clusters,
//!    counted by the old one, written and synced while nothing refers to it, then named by
//!    one synced write of the header's refcount fields; the old structure is freed by the
//!    next write-back ([`refcounts`]);
//! 4. for version 2, which has no zero flag, every zero cluster of the active layer becomes
//!    unallocated (without a host cluster or backing file) or is written with zeros
//!    (QEMU's `qcow2_expand_zero_clusters`), and the metadata is written back again;
//! 5. cluster 0 is rewritten as QEMU's `qcow2_update_header` writes it (fixed fields, then
//!    the backing format, data file name, encryption, feature table (v3), bitmaps and unknown
//!    extensions, the end marker, the backing file name), in one write, then synced;
//! 6. the image is closed.
//!
//! Each step leaves a consistent image: a crash in 1, 2 or 4 leaves the old options over
//! consistent metadata (4's writes are ordinary writes: data before the L2 entry); a crash
//! in 3 leaves the old structure with the new one's clusters leaked, or the new structure
//! with the old one's clusters leaked; 5 is a single write of the first cluster (its first
//! sector holds every field that changes).
//!
//! Not done here: downgrading an image with internal snapshots (their zero clusters would
//! need expanding too; [`Error::Unsupported`]), and encryption, which the engine does not support.

use crate::error::AmendError;
use crate::image::Image;
use crate::meta::Meta;
use crate::options::Compat;
use crate::{Error, ExtentKind, Result};
use blockio::{IoBuf, Opener};
use qcow2_format::{features, CompressionType, Header, HeaderExtension, RefcountWidth, Snapshot};

mod refcounts;

/// What [`Image::amend`] changes: each option left unset keeps its value. The options are
/// qemu-img amend's for qcow2 (`-o compat=...,lazy_refcounts=...`).
///
/// ```
/// use qcow2_engine::{AmendOptions, Compat};
/// let opts = AmendOptions::new().compat(Compat::V3).lazy_refcounts(true);
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    compat: Option<Compat>,
    lazy_refcounts: Option<bool>,
    refcount_bits: Option<u64>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
}

impl AmendOptions {
    /// Nothing changed.
    pub fn new() -> Self {
        Self::default()
    }

    /// The version: [`Compat::V2`] (0.10) or [`Compat::V3`] (1.1).
    pub fn compat(mut self, compat: Compat) -> Self {
        self.compat = Some(compat);
        self
    }

    /// Lazy refcounts on or off (on needs version 3).
    pub fn lazy_refcounts(mut self, on: bool) -> Self {
        self.lazy_refcounts = Some(on);
        self
    }

    /// The refcount width in bits: a power of two from 1 to 64 (16 on version 2). A
    /// narrower width is refused when some refcount does not fit in it.
    pub fn refcount_bits(mut self, bits: u64) -> Self {
        self.refcount_bits = Some(bits);
        self
    }

    /// A new name for the external data file (images that have one); an empty name removes
    /// the name from the header, as QEMU does.
    pub fn data_file(mut self, name: impl Into<String>) -> Self {
        self.data_file = Some(name.into());
        self
    }

    /// The data file's raw flag: it can be cleared, and set only where it is set already.
    pub fn data_file_raw(mut self, on: bool) -> Self {
        self.data_file_raw = Some(on);
        self
    }

    /// The backing file name: accepted only when it is the image's own (QEMU refuses any
    /// change: use a rebase).
    pub fn backing_file(mut self, name: impl Into<String>) -> Self {
        self.backing_file = Some(name.into());
        self
    }

    /// The backing file's format: accepted only when it is the image's own.
    pub fn backing_fmt(mut self, name: impl Into<String>) -> Self {
        self.backing_fmt = Some(name.into());
        self
    }
}

/// What an amendment does to an image, decided from its header alone.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    /// The new header (cluster 0 as QEMU writes it).
    header: Header,
    /// Version 3 to 2: zero clusters must be expanded, compressed clusters looked for (zstd).
    downgrade: bool,
    /// A new refcount width: the refcount structure is rebuilt ([`refcounts`]).
    rewidth: Option<RefcountWidth>,
    /// Version 2 to 3 with snapshots that lack the version 3 fields (the disk size): the
    /// snapshot table is written anew with them first.
    snapshot_table: bool,
}

/// Decides the amendment of the image whose header is `old` and whose internal snapshots
/// are `snapshots`, checking in QEMU's order (`qcow2_amend_options`, `qcow2_downgrade`).
fn plan(
    old: &Header,
    snapshots: &[Snapshot],
    opts: &AmendOptions,
) -> std::result::Result<Plan, AmendError> {
    let old_version = old.version;
    let version = match opts.compat {
        None => old_version,
        Some(Compat::V2) => 2,
        Some(Compat::V3) => 3,
    };
    if opts.data_file.is_some() && !old.has_data_file() {
        return Err(AmendError::DataFileWithoutDataFile);
    }
    if opts.data_file_raw == Some(true) && !old.data_file_raw() {
        return Err(AmendError::DataFileRawOnExisting);
    }
    if let Some(bits) = opts.refcount_bits {
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            return Err(AmendError::RefcountBits(bits));
        }
    }
    let width = 1u64 << old.refcount_order;
    let mut refcount_order = old.refcount_order;
    if let Some(bits) = opts.refcount_bits.filter(|&b| b != width) {
        if version < 3 && bits != 16 {
            return Err(AmendError::RefcountBitsNeedV3);
        }
        refcount_order = bits.trailing_zeros();
    }
    let rewidth = (refcount_order != old.refcount_order)
        .then(|| RefcountWidth::from_order(refcount_order))
        .transpose()
        .map_err(|_| AmendError::RefcountBits(1 << refcount_order))?;
    let backing_changes = |given: &Option<String>, have: Option<&str>| {
        given.as_deref().is_some_and(|g| Some(g) != have)
    };
    if backing_changes(&opts.backing_file, old.backing_file.as_deref())
        || backing_changes(&opts.backing_fmt, old.backing_format())
    {
        return Err(AmendError::BackingFile);
    }
    let lazy = opts.lazy_refcounts.unwrap_or(old.lazy_refcounts());
    if lazy && !old.lazy_refcounts() && version < 3 {
        return Err(AmendError::LazyRefcountsNeedV3);
    }
    let downgrade = version < old_version;
    if downgrade {
        check_downgrade(old, refcount_order, snapshots)?;
    }
    // QEMU's `qcow2_upgrade`: snapshots without the version 3 fields get them.
    let snapshot_table = version > old_version && snapshots.iter().any(|s| s.disk_size.is_none());

    let mut header = old.clone();
    header.version = version;
    header.refcount_order = refcount_order;
    header.incompatible_features &= !features::INCOMPAT_DIRTY;
    if opts.data_file_raw == Some(false) {
        header.autoclear_features &= !features::AUTOCLEAR_DATA_FILE_RAW;
    }
    if lazy {
        header.compatible_features |= features::COMPAT_LAZY_REFCOUNTS;
    } else {
        header.compatible_features &= !features::COMPAT_LAZY_REFCOUNTS;
    }
    if version == 2 {
        header.incompatible_features = 0;
        header.compatible_features = 0;
        header.autoclear_features = 0;
        header.compression_type = CompressionType::Zlib;
    }
    let data_file = match &opts.data_file {
        Some(name) if name.is_empty() => None,
        Some(name) => Some(name.clone()),
        None => old.data_file_name().map(str::to_owned),
    };
    qemu_extensions(&mut header, data_file);
    Ok(Plan {
        header,
        downgrade,
        rewidth,
        snapshot_table,
    })
}

/// The snapshots as QEMU's `qcow2_write_snapshots` writes them for version 3: a snapshot
/// without a recorded disk size gets the current one (as `qcow2_read_snapshots` assumes),
/// one without icount gets -1 (none); the 64-bit VM state size with them.
fn with_v3_fields(snapshots: Vec<Snapshot>, size: u64) -> Vec<Snapshot> {
    snapshots
        .into_iter()
        .map(|mut s| {
            s.disk_size = Some(s.disk_size.unwrap_or(size));
            s.icount = Some(s.icount.unwrap_or(u64::MAX));
            if s.extra_data.len() < 24 {
                s.extra_data.resize(24, 0);
            }
            s
        })
        .collect()
}

/// `qcow2_downgrade`'s checks, before anything is changed; `refcount_order` is the one the
/// image has by then (QEMU changes the width first).
fn check_downgrade(
    old: &Header,
    refcount_order: u32,
    snapshots: &[Snapshot],
) -> std::result::Result<(), AmendError> {
    if refcount_order != 4 {
        return Err(AmendError::DowngradeRefcountBits);
    }
    if old.has_data_file() {
        return Err(AmendError::DowngradeDataFile);
    }
    if snapshots.iter().any(|s| {
        s.vm_state_size > u64::from(u32::MAX) || s.disk_size.unwrap_or(old.size) != old.size
    }) {
        return Err(AmendError::DowngradeSnapshots);
    }
    if !snapshots.is_empty() {
        return Err(AmendError::SnapshotTableRewrite);
    }
    let incompatible =
        old.incompatible_features & !(features::INCOMPAT_DIRTY | features::INCOMPAT_COMPRESSION);
    if incompatible != 0 {
        return Err(AmendError::DowngradeFeatures(incompatible));
    }
    Ok(())
}

/// Lays out `header`'s fixed part and extensions as `qcow2_update_header` writes them.
pub(crate) fn qemu_extensions(header: &mut Header, data_file: Option<String>) {
    let mut exts = Vec::new();
    if let Some(fmt) = header.backing_format() {
        exts.push(HeaderExtension::BackingFormat(fmt.to_owned()));
    }
    if let Some(name) = data_file {
        exts.push(HeaderExtension::ExternalDataFile(name));
    }
    for e in &header.extensions {
        if let HeaderExtension::FullDiskEncryption { .. } = e {
            exts.push(e.clone());
        }
    }
    // QEMU 10 leaves the feature table out for clusters of 4 KiB and less (there would be
    // too little room for the backing file name).
    if header.version >= 3 && header.cluster_bits > 12 {
        exts.push(HeaderExtension::qemu_feature_table());
    }
    for e in &header.extensions {
        if let HeaderExtension::Bitmaps(_) | HeaderExtension::Unknown { .. } = e {
            exts.push(e.clone());
        }
    }
    header.extensions = exts;
    if header.version == 2 {
        header.header_length = Header::V2_LENGTH;
        header.unknown_additional.clear();
    } else {
        header.header_length = Header::QEMU_V3_LENGTH;
        header.unknown_additional.clear();
    }
    header.fix_backing_location();
}

impl<O: Opener> Image<O> {
    /// Changes the image's qcow2 options as `qemu-img amend -o ...` does, then closes it.
    ///
    /// Everything is checked before anything is written: a refused amendment leaves the file
    /// as it was (and the image is still closed). The one exception is QEMU's: an upgrade
    /// to version 3 asked for with a refcount width too narrow for the image is made before
    /// the width is refused. See the module documentation of `amend`
    /// for the steps and their crash safety.
    ///
    /// # Errors
    ///
    /// [`Error::Amend`] for what QEMU refuses, with QEMU's words (a refcount too large for
    /// a narrower width among them); [`Error::Unsupported`] for what the engine cannot do
    /// yet (a version change that needs the snapshot table rewritten) and for an image
    /// opened read-only; I/O errors while writing.
    ///
    /// # Cancel safety
    ///
    /// The image is consumed. Dropping the future leaves the file consistent: before the
    /// header write, with the old options (and, during a refcount width change, the new
    /// structure's clusters leaked); after it, with the new ones (and the old structure's
    /// clusters leaked until a repair).
    pub async fn amend(self, opts: &AmendOptions) -> Result<()> {
        let r = self.amend_inner(opts).await;
        let closed = self.close().await;
        r.and(closed)
    }

    async fn amend_inner(&self, opts: &AmendOptions) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::Unsupported {
                path: self.path().to_path_buf(),
                what: "amending an image opened read-only".into(),
            });
        }
        let snapshots = self.snapshots().await?;
        let current = self.meta.lock().await.header.clone();
        let first = plan(&current, &snapshots, opts).map_err(|e| self.amend_error(e))?;
        if first.rewidth.is_some() && first.header.version > current.version {
            // QEMU upgrades first, with a header write of its own (the width change needs the
            // version 3 header), and keeps the upgrade when the width is then refused.
            let upgrade = AmendOptions::new().compat(Compat::V3);
            Box::pin(self.amend_inner(&upgrade)).await?;
            return Box::pin(self.amend_inner(opts)).await;
        }
        if let Some(width) = first.rewidth {
            self.check_width(width).await?;
        }
        self.make_clean().await?;
        // QEMU's order: the upgrade (its snapshot table), the width, the downgrade.
        let snapshots = if first.snapshot_table {
            let list = with_v3_fields(snapshots, self.size());
            let mut meta = self.meta.lock().await;
            self.store().write_snapshot_table(&mut meta, &list).await?;
            list
        } else {
            snapshots
        };
        if let Some(width) = first.rewidth {
            self.change_width(width).await?;
        }
        if first.downgrade {
            self.expand_for_v2(&current).await?;
            self.make_clean().await?;
        }
        let mut meta = self.meta.lock().await;
        // Planned again over the header as the steps before left it (a moved refcount or L1
        // table, the new width); the checks passed already and depend on nothing they
        // change.
        let plan = plan(&meta.header, &snapshots, opts).map_err(|e| self.amend_error(e))?;
        // One write of cluster 0 switches everything, the refcount structure included.
        self.replace_header(&mut meta, plan.header, "the amended header")
            .await
    }

    /// Writes `header` as the whole of cluster 0 (what lay after it, old extensions and
    /// backing name, zeroed), syncs, and makes it the header in memory: one write switches
    /// everything it names. `what` names it in the error when it does not fit.
    pub(crate) async fn replace_header(
        &self,
        meta: &mut Meta,
        header: Header,
        what: &str,
    ) -> Result<()> {
        let mut bytes = header.serialize().map_err(|e| Error::Unsupported {
            path: self.path().to_path_buf(),
            what: format!("{what}: {e}"),
        })?;
        bytes.resize(self.cluster_size() as usize, 0);
        self.store().write_meta(0, &bytes).await?;
        self.files.sync().await?;
        meta.header = header;
        Ok(())
    }

    fn amend_error(&self, e: AmendError) -> Error {
        match e {
            AmendError::SnapshotTableRewrite => Error::Unsupported {
                path: self.path().to_path_buf(),
                what: "downgrading an image with internal snapshots (their zero clusters would \
                       need expanding)"
                    .into(),
            },
            other => Error::Amend(other),
        }
    }

    /// Before a downgrade: zero clusters, which version 2 cannot express, made unallocated
    /// where nothing shows through (no host cluster, no backing file) and written with zeros
    /// elsewhere (`qcow2_expand_zero_clusters`); then zstd-compressed clusters refused (the
    /// expansion stays, as in QEMU).
    async fn expand_for_v2(&self, old: &Header) -> Result<()> {
        let size = self.size();
        let cs = self.cluster_size();
        let extents = self.block_status(0, size).await?;
        let zstd = old.compression_type == CompressionType::Zstd
            && extents.iter().any(|e| e.kind == ExtentKind::Compressed);
        for e in extents {
            if let ExtentKind::Zero { host } = e.kind {
                if host.is_none() && self.backing().is_none() {
                    // Nothing shows through: unallocated reads as zeros in version 2 too.
                    self.deallocate(e.offset..e.offset + e.len).await?;
                    continue;
                }
                let mut off = e.offset;
                while off < e.offset + e.len {
                    let n = (e.offset + e.len - off).min(cs - off % cs);
                    let (r, _) = self.write_at(IoBuf::new(n as usize), off).await;
                    r?;
                    off += n;
                }
            }
        }
        if zstd {
            // After the expansion, as QEMU's `qcow2_downgrade` checks it.
            return Err(Error::Amend(AmendError::DowngradeZstd));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> Header {
        let mut h = Header::parse(&qemu_v3_header()).unwrap();
        h.fix_backing_location();
        h
    }

    /// A v3 header as qemu-img create lays it out (112 bytes, the feature name table); the
    /// bytes QEMU writes are compared with ours in crates/cli/tests/amend_cli.rs.
    fn qemu_v3_header() -> Vec<u8> {
        let mut h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 64 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: Header::QEMU_V3_LENGTH,
            compression_type: CompressionType::Zlib,
            unknown_additional: Vec::new(),
            extensions: vec![HeaderExtension::qemu_feature_table()],
            backing_file: None,
        };
        h.fix_backing_location();
        h.serialize().unwrap()
    }

    #[test]
    fn lazy_refcounts_need_version_3() {
        let mut v2 = v3();
        v2.version = 2;
        let on = AmendOptions::new().lazy_refcounts(true);
        assert_eq!(plan(&v2, &[], &on), Err(AmendError::LazyRefcountsNeedV3));
        let p = plan(&v3(), &[], &on).unwrap();
        assert!(p.header.lazy_refcounts());
        let both = AmendOptions::new().compat(Compat::V2).lazy_refcounts(true);
        assert_eq!(
            plan(&v3(), &[], &both),
            Err(AmendError::LazyRefcountsNeedV3)
        );
    }

    #[test]
    fn a_downgrade_drops_v3_fields_and_an_upgrade_adds_them() {
        let p = plan(&v3(), &[], &AmendOptions::new().compat(Compat::V2)).unwrap();
        assert!(p.downgrade);
        assert_eq!(p.header.version, 2);
        assert_eq!(p.header.header_length, Header::V2_LENGTH);
        assert!(p.header.extensions.is_empty());
        let back = plan(&p.header, &[], &AmendOptions::new().compat(Compat::V3)).unwrap();
        assert!(!back.downgrade);
        assert_eq!(back.header.serialize().unwrap(), qemu_v3_header());
    }

    #[test]
    fn an_upgrade_rewrites_snapshots_without_the_version_3_fields() {
        let mut v2 = v3();
        v2.version = 2;
        let old = Snapshot {
            l1_table_offset: 0x40000,
            l1_size: 1,
            id: "1".into(),
            name: "s".into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: None,
            icount: None,
            extra_data: Vec::new(),
        };
        let up = AmendOptions::new().compat(Compat::V3);
        assert!(
            plan(&v2, std::slice::from_ref(&old), &up)
                .unwrap()
                .snapshot_table
        );
        let new = with_v3_fields(vec![old], 5 << 20);
        assert_eq!(new[0].disk_size, Some(5 << 20));
        assert_eq!(new[0].icount, Some(u64::MAX));
        assert_eq!(new[0].encoded_extra_data().len(), 24);
        assert!(!plan(&v2, &new, &up).unwrap().snapshot_table);
        // No upgrade, no rewrite.
        let lazy = AmendOptions::new().lazy_refcounts(false);
        assert!(!plan(&v2, &new[..0], &lazy).unwrap().snapshot_table);
    }

    #[test]
    fn what_qemu_refuses_is_refused_before_anything_changes() {
        let h = v3();
        let o = AmendOptions::new;
        assert_eq!(
            plan(&h, &[], &o().refcount_bits(3)),
            Err(AmendError::RefcountBits(3))
        );
        assert_eq!(
            plan(&h, &[], &o().refcount_bits(16)).map(|p| p.downgrade),
            Ok(false)
        );
        let r8 = plan(&h, &[], &o().refcount_bits(8)).unwrap();
        assert_eq!(r8.rewidth.map(|w| w.bits()), Some(8));
        assert_eq!(r8.header.refcount_order, 3);
        let mut v2 = v3();
        v2.version = 2;
        assert_eq!(
            plan(&v2, &[], &o().refcount_bits(8)),
            Err(AmendError::RefcountBitsNeedV3)
        );
        // QEMU changes the width before it downgrades: 16 bits then is fine.
        let mut r8h = v3();
        r8h.refcount_order = 3;
        let down = plan(&r8h, &[], &o().compat(Compat::V2).refcount_bits(16)).unwrap();
        assert!(down.downgrade);
        assert_eq!(down.rewidth.map(|w| w.bits()), Some(16));
        assert_eq!(
            plan(&h, &[], &o().data_file("x")),
            Err(AmendError::DataFileWithoutDataFile)
        );
        assert_eq!(
            plan(&h, &[], &o().data_file_raw(true)),
            Err(AmendError::DataFileRawOnExisting)
        );
        assert_eq!(
            plan(&h, &[], &o().backing_file("")),
            Err(AmendError::BackingFile)
        );
        assert_eq!(
            plan(&h, &[], &o().backing_fmt("raw")),
            Err(AmendError::BackingFile)
        );
        let mut r8 = v3();
        r8.refcount_order = 3;
        assert_eq!(
            plan(&r8, &[], &o().compat(Compat::V2)),
            Err(AmendError::DowngradeRefcountBits)
        );
        let mut ext = v3();
        ext.incompatible_features |= features::INCOMPAT_EXTENDED_L2;
        assert_eq!(
            plan(&ext, &[], &o().compat(Compat::V2)),
            Err(AmendError::DowngradeFeatures(
                features::INCOMPAT_EXTENDED_L2
            ))
        );
    }
}
