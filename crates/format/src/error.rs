//! The one error type of the format crate.

/// What is wrong with a qcow2 structure. Every variant names the structure and the value;
/// where QEMU's qcow2 driver refuses an image for the same reason, the message is QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    #[error("{what} truncated: need {need} bytes, have {have}")]
    Truncated {
        /// The structure being parsed.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// The first four bytes are not `QFI\xfb`.
    #[error("Image is not in qcow2 format")]
    BadMagic(u32),
    /// Version other than 2 or 3.
    #[error("Unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// cluster_bits outside 9..=21.
    #[error("Unsupported cluster size: 2^{0}")]
    ClusterBits(u32),
    /// Extended L2 entries with clusters smaller than 16 KiB.
    #[error("Unsupported subcluster size: {}", (1u64 << .0) / 32)]
    ExtendedL2ClusterTooSmall(u32),
    /// header_length too small, not a multiple of 8, or larger than a cluster.
    #[error("invalid header length {0}")]
    HeaderLength(u32),
    /// refcount_order above 6.
    #[error("Reference count entry width too large; may not exceed 64 bits")]
    RefcountOrder(u32),
    /// A virtual size whose L1 table would have more than 2^31 - 1 entries (QEMU's limit).
    #[error("Image is too big")]
    ImageTooBig(u64),
    /// Incompatible feature bits this implementation does not know.
    #[error("Unsupported qcow2 feature(s): {}", unsupported_features(names, *unnamed))]
    UnknownIncompatibleFeatures {
        /// The unknown bits.
        bits: u64,
        /// The names the feature name table gives some of them, in the table's order.
        names: Vec<String>,
        /// The unknown bits the table does not name.
        unnamed: u64,
    },
    /// An encryption method other than none.
    #[error("encrypted images are not supported (crypt_method {0})")]
    Encrypted(u32),
    /// Compression type not known.
    #[error("qcow2: unknown compression type: {0}")]
    CompressionType(u8),
    /// Compression type set without the incompatible bit, or the other way round.
    #[error(
        "qcow2: Compression type incompatible feature bit must {}be set",
        if *.0 == 0 { "not " } else { "" }
    )]
    CompressionTypeBit(u8),
    /// A field that must be zero (or a reserved bit) is set.
    #[error("{what} has reserved bits set: {value:#x}")]
    ReservedBits {
        /// The structure or field.
        what: &'static str,
        /// The offending value (or the reserved bits).
        value: u64,
    },
    /// An offset that must be cluster aligned (or 512 aligned) is not.
    #[error("{what} offset {offset:#x} is not aligned")]
    Misaligned {
        /// The structure.
        what: &'static str,
        /// The offset.
        offset: u64,
    },
    /// A structure lies (partly) past the end of the file, or overflows 64 bits.
    #[error("{what} at {offset:#x} (+{len:#x}) lies past the end of the file ({file_len:#x})")]
    PastEnd {
        /// The structure.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A size beyond what the format or this implementation accepts.
    #[error("{what} too large: {value} (limit {limit})")]
    TooLarge {
        /// The structure or field.
        what: &'static str,
        /// The value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The L1 table has fewer entries than the virtual size needs.
    #[error("L1 table is too small")]
    L1TooSmall {
        /// Entries in the header.
        l1_size: u64,
        /// Entries needed.
        needed: u64,
    },
    /// A header extension is malformed.
    #[error("header extension {kind:#010x}: {reason}")]
    BadExtension {
        /// The extension type.
        kind: u32,
        /// What is wrong.
        reason: String,
    },
    /// A known extension type given twice to [`crate::Header::serialize`] (parsing keeps
    /// the last of each, as QEMU does).
    #[error("header extension {0:#010x} appears more than once")]
    DuplicateExtension(u32),
    /// A string field is not valid UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// A refcount does not fit its width.
    #[error("refcount {value} does not fit in {bits} bits")]
    RefcountOverflow {
        /// The value.
        value: u64,
        /// The width in bits.
        bits: u32,
    },
    /// A subcluster is marked both allocated and zero, or allocated without a host cluster.
    #[error("invalid subcluster bitmap {bitmap:#018x}: {reason}")]
    BadSubclusterBitmap {
        /// The bitmap word.
        bitmap: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A snapshot table entry declares more extra data than QEMU accepts (1 KiB): QEMU's
    /// open refuses the image, `qemu-img check -r all` cuts the extra data down.
    #[error("snapshot {index}: extra data size {size} exceeds the limit of {limit}")]
    SnapshotExtraData {
        /// Index in the table.
        index: usize,
        /// The declared size.
        size: u32,
        /// The limit.
        limit: u32,
    },
    /// A snapshot table entry is malformed.
    #[error("snapshot {index}: {reason}")]
    BadSnapshot {
        /// Index in the table.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A bitmap directory entry is malformed.
    #[error("bitmap {index}: {reason}")]
    BadBitmap {
        /// Index in the directory.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The header and its extensions do not fit in the first cluster.
    #[error(
        "header, extensions and backing name need {need} bytes, the cluster holds {cluster_size}"
    )]
    HeaderTooLarge {
        /// Bytes needed.
        need: u64,
        /// Cluster size.
        cluster_size: u64,
    },
    /// Other inconsistent header contents.
    #[error("invalid header: {0}")]
    InvalidHeader(String),
}

/// QEMU's list of unsupported features: the names, then the bits without one.
fn unsupported_features(names: &[String], unnamed: u64) -> String {
    let mut parts = names.to_vec();
    if unnamed != 0 {
        parts.push(format!("Unknown incompatible feature: {unnamed:x}"));
    }
    parts.join(", ")
}
