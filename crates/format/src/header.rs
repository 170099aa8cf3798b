//! The image header (cluster 0): fixed fields, additional fields, extensions, backing name.

use crate::{
    ClusterGeometry, FormatError, HeaderExtension, RefcountWidth, Result,
};

/// `QFI\xfb`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;

/// How compressed clusters are encoded (one type per image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate with a 4 KiB window (type 0, the default).
    #[default]
    Zlib,
    /// One zstd frame per cluster (type 1; needs incompatible bit 3).
    Zstd,
}

/// A parsed qcow2 header with its extensions and backing file name.
///
/// `parse` checks everything that can be checked without knowing the file (magic, version,
/// cluster size, header length, refcount order, feature bits, extension framing, backing name
/// bounds); [`Header::validate_layout`] checks what points into the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in cluster 0 (0 = none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// refcount_bits = 1 << refcount_order (4 in v2).
    pub refcount_order: u32,
    /// Header length in bytes (72 in v2, >= 104 in v3).
    pub header_length: u32,
    /// The compression type (additional field at byte 104).
    pub compression_type: CompressionType,
    /// Additional header bytes beyond the fields known here (from byte 112 up to
    /// header_length), kept byte for byte.
    pub unknown_additional: Vec<u8>,
    /// Header extensions in file order (the end marker is implicit).
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
}

impl Header {
    /// Parses and validates the header from the start of the file (give it the whole first
    /// cluster, or as much of the file as there is if it is shorter).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let _ = buf;
        todo!()
    }

    /// Checks the offsets and sizes of the header against the file length and QEMU's limits:
    /// L1 table, refcount table, snapshot table alignment and bounds; L1 large enough for the
    /// virtual size; L1 <= 32 MiB, reftable <= 8 MiB; virtual size representable.
    pub fn validate_layout(&self, file_len: u64) -> Result<()> {
        let _ = file_len;
        todo!()
    }

    /// Serializes header, extensions (with end marker) and backing file name into the bytes of
    /// cluster 0 (not padded to the cluster size). Updates nothing in `self`: the caller keeps
    /// `backing_file_offset`/`backing_file_size` consistent via [`Header::fix_backing_location`].
    pub fn serialize(&self) -> Result<Vec<u8>> {
        todo!()
    }

    /// Recomputes `backing_file_offset` and `backing_file_size` for the current extensions and
    /// backing name (the name goes right after the extension end marker, as QEMU does).
    pub fn fix_backing_location(&mut self) {
        todo!()
    }

    /// The cluster geometry.
    pub fn geometry(&self) -> ClusterGeometry {
        ClusterGeometry::new(self.cluster_bits, self.extended_l2())
            .expect("a parsed header has a valid geometry")
    }

    /// The refcount entry width.
    pub fn refcount_width(&self) -> RefcountWidth {
        RefcountWidth::from_order(self.refcount_order).expect("a parsed header has a valid order")
    }

    /// Incompatible bit 4.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & crate::features::INCOMPAT_EXTENDED_L2 != 0
    }

    /// Incompatible bit 0.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & crate::features::INCOMPAT_DIRTY != 0
    }

    /// Incompatible bit 1.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & crate::features::INCOMPAT_CORRUPT != 0
    }

    /// Incompatible bit 2.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & crate::features::INCOMPAT_DATA_FILE != 0
    }

    /// Autoclear bit 1.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & crate::features::AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Compatible bit 0.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & crate::features::COMPAT_LAZY_REFCOUNTS != 0
    }

    /// The backing format extension's value, if present.
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// The external data file name extension's value, if present.
    pub fn data_file_name(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::ExternalDataFile(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// The bitmaps extension, if present.
    pub fn bitmaps(&self) -> Option<&crate::BitmapsExtension> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::Bitmaps(b) => Some(b),
            _ => None,
        })
    }

    /// Builds an error for unknown incompatible bits, naming them from the feature name table.
    pub fn unknown_incompatible(&self) -> Option<FormatError> {
        todo!()
    }
}
