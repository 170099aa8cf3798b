//! Header extensions.

/// Which feature bit set a feature-name-table entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// Incompatible (0).
    Incompatible,
    /// Compatible (1).
    Compatible,
    /// Autoclear (2).
    Autoclear,
    /// A kind byte the spec does not define, kept as is.
    Other(u8),
}

/// One entry of the feature name table (48 bytes on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// The bit set.
    pub kind: FeatureKind,
    /// Bit number 0..=63.
    pub bit: u8,
    /// The name (at most 46 bytes, zero padded on disk).
    pub name: String,
}

/// The bitmaps extension (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory (>= 1).
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// Offset of the directory (cluster aligned).
    pub directory_offset: u64,
}

/// A header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtension {
    /// 0xE2792ACA: backing file format name.
    BackingFormat(String),
    /// 0x6803F857: feature name table.
    FeatureNameTable(Vec<FeatureName>),
    /// 0x23852875: bitmaps.
    Bitmaps(BitmapsExtension),
    /// 0x0537BE77: full disk encryption header pointer.
    FullDiskEncryption {
        /// Offset of the encryption header.
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// 0x44415441: external data file name.
    ExternalDataFile(String),
    /// Any other type, kept byte for byte.
    Unknown {
        /// The type.
        kind: u32,
        /// The payload (without padding).
        data: Vec<u8>,
    },
}

impl HeaderExtension {
    /// Backing format type.
    pub const BACKING_FORMAT: u32 = 0xE279_2ACA;
    /// Feature name table type.
    pub const FEATURE_NAME_TABLE: u32 = 0x6803_F857;
    /// Bitmaps type.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer type.
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_BE77;
    /// External data file name type.
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

    /// The extension's type number.
    pub fn kind(&self) -> u32 {
        match self {
            Self::BackingFormat(_) => Self::BACKING_FORMAT,
            Self::FeatureNameTable(_) => Self::FEATURE_NAME_TABLE,
            Self::Bitmaps(_) => Self::BITMAPS,
            Self::FullDiskEncryption { .. } => Self::FULL_DISK_ENCRYPTION,
            Self::ExternalDataFile(_) => Self::EXTERNAL_DATA_FILE,
            Self::Unknown { kind, .. } => *kind,
        }
    }

    /// The feature name table QEMU 10 writes (8 entries).
    pub fn qemu_feature_table() -> HeaderExtension {
        todo!()
    }
}
