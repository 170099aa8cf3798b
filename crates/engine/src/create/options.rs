//! [`CreateOptions`]: qemu-img create's qcow2 options as a builder, validated as QEMU
//! validates them.

use super::sim::Sim;
use super::*;

/// Options for [`create`]: the qcow2 options of `qemu-img create`, as a builder.
///
/// Defaults are qemu-img's: 64 KiB clusters, 16-bit refcounts, compat 1.1, zlib, no
/// preallocation, no backing or data file.
///
/// ```
/// use qcow2_engine::{CreateOptions, Preallocation};
/// let opts = CreateOptions::new()
///     .size(1 << 30)
///     .cluster_size(4096)
///     .refcount_bits(8)
///     .preallocation(Preallocation::Metadata);
/// assert!(opts.validate().is_ok());
/// assert!(CreateOptions::new().size(1 << 20).cluster_size(1000).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub(super) size: Option<u64>,
    pub(super) cluster_size: u64,
    pub(super) refcount_bits: u64,
    pub(super) compat: Compat,
    pub(super) extended_l2: bool,
    pub(super) backing: Option<(String, ImageFormat)>,
    pub(super) check_backing: bool,
    pub(super) lazy_refcounts: bool,
    pub(super) compression_type: CompressionType,
    pub(super) data_file: Option<String>,
    pub(super) data_file_raw: bool,
    pub(super) preallocation: Preallocation,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            size: None,
            cluster_size: 64 << 10,
            refcount_bits: 16,
            compat: Compat::V3,
            extended_l2: false,
            backing: None,
            check_backing: true,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
        }
    }
}

impl CreateOptions {
    /// qemu-img's defaults, without a size (set one, or a backing file to take it from).
    pub fn new() -> Self {
        Self::default()
    }

    /// The virtual disk size in bytes (a multiple of 512). Without it, the backing file's
    /// size is used, as qemu-img does.
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }

    /// The cluster size in bytes: a power of two from 512 to 2 MiB (default 64 KiB).
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    /// The refcount width in bits: 1, 2, 4, 8, 16 (default), 32 or 64; compat 1.1 only for
    /// anything but 16.
    pub fn refcount_bits(mut self, bits: u64) -> Self {
        self.refcount_bits = bits;
        self
    }

    /// The compatibility level (default [`Compat::V3`]).
    pub fn compat(mut self, compat: Compat) -> Self {
        self.compat = compat;
        self
    }

    /// Extended L2 entries (32 subclusters per cluster; clusters of at least 16 KiB).
    pub fn extended_l2(mut self, yes: bool) -> Self {
        self.extended_l2 = yes;
        self
    }

    /// A backing file, stored in the header as given (relative names are relative to the
    /// new image's directory when the image is opened), and its format (stored in the
    /// backing format extension; qemu-img requires it, and so does this API).
    pub fn backing_file(mut self, name: impl Into<String>, format: ImageFormat) -> Self {
        self.backing = Some((name.into(), format));
        self
    }

    /// Whether [`create`] opens the backing file to check that it exists and is readable as
    /// its format (default true). `false` is qemu-img's `-u`; then a size must be given.
    pub fn check_backing(mut self, yes: bool) -> Self {
        self.check_backing = yes;
        self
    }

    /// Sets the lazy refcounts compatible bit (compat 1.1 only).
    pub fn lazy_refcounts(mut self, yes: bool) -> Self {
        self.lazy_refcounts = yes;
        self
    }

    /// The compression type of compressed clusters (zstd needs compat 1.1).
    pub fn compression_type(mut self, ty: CompressionType) -> Self {
        self.compression_type = ty;
        self
    }

    /// An external data file: guest data lives there (at guest offsets) instead of in the
    /// image. The file is created (truncated) at this path, relative to the current
    /// directory, and the name is stored in the header as given.
    pub fn data_file(mut self, name: impl Into<String>) -> Self {
        self.data_file = Some(name.into());
        self
    }

    /// Marks the data file as a valid raw image of the disk (autoclear bit 1); implies at
    /// least metadata preallocation, as QEMU does.
    pub fn data_file_raw(mut self, yes: bool) -> Self {
        self.data_file_raw = yes;
        self
    }

    /// The preallocation mode (default [`Preallocation::Off`]).
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }

    /// The size, if one was given.
    pub fn get_size(&self) -> Option<u64> {
        self.size
    }

    /// The backing file name and format, if any.
    pub fn get_backing(&self) -> Option<(&str, ImageFormat)> {
        self.backing.as_ref().map(|(n, f)| (n.as_str(), *f))
    }

    /// Checks the options against each other, in the order QEMU does (so the first problem
    /// reported is the one qemu-img reports). A missing size is not checked here.
    pub fn validate(&self) -> Result<(), CreateError> {
        if let Some(size) = self.size {
            if size % 512 != 0 {
                return Err(CreateError::SizeNotAligned(size));
            }
        }
        let v2 = self.compat == Compat::V2;
        if self.extended_l2 && v2 {
            return Err(CreateError::NeedsV3(V3Feature::ExtendedL2));
        }
        let cs = self.cluster_size;
        let bits = cs.trailing_zeros();
        if !cs.is_power_of_two() || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(CreateError::ClusterSize(cs));
        }
        if self.extended_l2 && cs < 512 * 32 {
            return Err(CreateError::ExtendedL2ClusterSize(cs));
        }
        if self.backing.is_some() && self.preallocation != Preallocation::Off && !self.extended_l2 {
            return Err(CreateError::BackingWithPreallocation);
        }
        if self.lazy_refcounts && v2 {
            return Err(CreateError::NeedsV3(V3Feature::LazyRefcounts));
        }
        if self.refcount_bits > 64 || !self.refcount_bits.is_power_of_two() {
            return Err(CreateError::RefcountBits(self.refcount_bits));
        }
        if v2 && self.refcount_bits != 16 {
            return Err(CreateError::NeedsV3(V3Feature::RefcountBits));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(CreateError::DataFileRawWithoutDataFile);
        }
        if self.data_file_raw && self.backing.is_some() {
            return Err(CreateError::BackingWithDataFileRaw);
        }
        if self.data_file.is_some() && v2 {
            return Err(CreateError::NeedsV3(V3Feature::DataFile));
        }
        if self.compression_type != CompressionType::Zlib && v2 {
            return Err(CreateError::NeedsV3(V3Feature::CompressionType));
        }
        Ok(())
    }

    /// The refcount width (after [`CreateOptions::validate`]).
    pub(super) fn width(&self) -> Result<RefcountWidth, CreateError> {
        u32::try_from(self.refcount_bits)
            .ok()
            .and_then(|b| RefcountWidth::from_bits(b).ok())
            .ok_or(CreateError::RefcountBits(self.refcount_bits))
    }

    /// The preallocation QEMU actually uses: data_file_raw turns `off` into `metadata`.
    pub(super) fn effective_preallocation(&self) -> Preallocation {
        if self.data_file_raw && self.preallocation == Preallocation::Off {
            Preallocation::Metadata
        } else {
            self.preallocation
        }
    }

    /// The header as QEMU writes it at the end of creation, for the layout `sim` ended with.
    pub(super) fn header(&self, size: u64, sim: &Sim) -> Result<Header, CreateError> {
        let v3 = self.compat == Compat::V3;
        let mut extensions = Vec::new();
        if let Some((_, fmt)) = &self.backing {
            extensions.push(HeaderExtension::BackingFormat(fmt.name().to_owned()));
        }
        if let Some(df) = &self.data_file {
            extensions.push(HeaderExtension::ExternalDataFile(df.clone()));
        }
        // QEMU omits the feature name table for clusters of 4 KiB and less (it would leave
        // too little room for a backing file name).
        if v3 && self.cluster_size > 4096 {
            extensions.push(HeaderExtension::qemu_feature_table());
        }
        let mut incompatible = 0;
        if self.data_file.is_some() {
            incompatible |= features::INCOMPAT_DATA_FILE;
        }
        if self.compression_type != CompressionType::Zlib {
            incompatible |= features::INCOMPAT_COMPRESSION;
        }
        if self.extended_l2 {
            incompatible |= features::INCOMPAT_EXTENDED_L2;
        }
        let mut header = Header {
            version: self.compat.version(),
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: sim.bits,
            size,
            crypt_method: 0,
            l1_size: sim.l1.len() as u32,
            l1_table_offset: sim.l1_offset,
            refcount_table_offset: sim.reftable_offset,
            refcount_table_clusters: (sim.reftable.len() as u64 * 8 / sim.cs) as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if self.lazy_refcounts {
                features::COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: if self.data_file_raw {
                features::AUTOCLEAR_DATA_FILE_RAW
            } else {
                0
            },
            refcount_order: self.refcount_bits.trailing_zeros(),
            header_length: if v3 {
                Header::QEMU_V3_LENGTH
            } else {
                Header::V2_LENGTH
            },
            compression_type: self.compression_type,
            unknown_additional: Vec::new(),
            extensions,
            backing_file: self.backing.as_ref().map(|(n, _)| n.clone()),
        };
        header.fix_backing_location();
        Ok(header)
    }

    /// Checks that the header (extensions and backing name) fits in cluster 0, with QEMU's
    /// errors. Uses a dummy layout: only names and extensions decide whether it fits.
    pub(super) fn check_header_space(&self) -> Result<(), CreateError> {
        let cs = self.cluster_size;
        let sim = Sim::new(cs.trailing_zeros(), self.width()?, false, false);
        let mut header = self.header(0, &sim)?;
        // QEMU writes the header without the backing file first, then adds it.
        let backing = header.backing_file.take();
        header.fix_backing_location();
        // Anything that does not serialize here is a name too long for cluster 0.
        if header.serialize().is_err() {
            return Err(CreateError::HeaderNoSpace);
        }
        if let (Some(name), Some((_, fmt))) = (backing, &self.backing) {
            if name.len() > 1023 {
                return Err(CreateError::BackingNameTooLong {
                    name,
                    format: fmt.name(),
                });
            }
            header.backing_file = Some(name.clone());
            header.fix_backing_location();
            if header.serialize().is_err() {
                return Err(CreateError::BackingNameNoSpace {
                    name,
                    format: fmt.name(),
                });
            }
        }
        Ok(())
    }
}
