//! Header extensions.

use crate::be::{u32_at, u64_at};
use crate::header::need;
use crate::{limits, FormatError, Result};

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

impl FeatureKind {
    /// From the on-disk kind byte.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0 => Self::Incompatible,
            1 => Self::Compatible,
            2 => Self::Autoclear,
            n => Self::Other(n),
        }
    }

    /// The on-disk kind byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Incompatible => 0,
            Self::Compatible => 1,
            Self::Autoclear => 2,
            Self::Other(n) => n,
        }
    }
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

    /// Whether `kind` is one of the types above (decoded into its own variant, and given at
    /// most once in a header QEMU writes).
    pub fn is_known(kind: u32) -> bool {
        [
            Self::BACKING_FORMAT,
            Self::FEATURE_NAME_TABLE,
            Self::BITMAPS,
            Self::FULL_DISK_ENCRYPTION,
            Self::EXTERNAL_DATA_FILE,
        ]
        .contains(&kind)
    }

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

    /// Size of one feature name table entry on disk.
    pub const FEATURE_ENTRY_LEN: usize = 48;
    /// Longest feature name (the name field of an entry).
    pub const FEATURE_NAME_LEN: usize = 46;
    /// Size of the bitmaps extension's payload.
    pub const BITMAPS_LEN: usize = 24;
    /// Size of the full disk encryption extension's payload.
    pub const FULL_DISK_ENCRYPTION_LEN: usize = 16;

    /// The feature name table QEMU 10 writes (8 entries).
    pub fn qemu_feature_table() -> HeaderExtension {
        let entry = |kind, bit, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_owned(),
        };
        HeaderExtension::FeatureNameTable(vec![
            entry(FeatureKind::Incompatible, 0, "dirty bit"),
            entry(FeatureKind::Incompatible, 1, "corrupt bit"),
            entry(FeatureKind::Incompatible, 2, "external data file"),
            entry(FeatureKind::Incompatible, 3, "compression type"),
            entry(FeatureKind::Incompatible, 4, "extended L2 entries"),
            entry(FeatureKind::Compatible, 0, "lazy refcounts"),
            entry(FeatureKind::Autoclear, 0, "bitmaps"),
            entry(FeatureKind::Autoclear, 1, "raw external data"),
        ])
    }

    /// Decodes the payload (without padding) of an extension of type `kind`. Known types are
    /// checked (UTF-8 strings, 48-byte feature table entries, 24-byte bitmaps extension with a
    /// zero reserved field, 16-byte encryption pointer); unknown types are kept as they are.
    /// `kind` 0 (the end marker) is not an extension and is refused.
    pub fn decode(kind: u32, data: &[u8]) -> Result<HeaderExtension> {
        let bad = |reason: String| FormatError::BadExtension { kind, reason };
        Ok(match kind {
            0 => return Err(bad("type 0 is the end marker, not an extension".into())),
            Self::BACKING_FORMAT => HeaderExtension::BackingFormat(
                String::from_utf8(data.to_vec())
                    .map_err(|_| FormatError::NotUtf8("backing format name"))?,
            ),
            Self::EXTERNAL_DATA_FILE => HeaderExtension::ExternalDataFile(
                String::from_utf8(data.to_vec())
                    .map_err(|_| FormatError::NotUtf8("external data file name"))?,
            ),
            Self::FEATURE_NAME_TABLE => {
                // QEMU reads the table as it is, whatever its length (a last partial entry
                // is zero-padded) and whatever bytes the names hold: it is only ever used to
                // name unknown features in an error message.
                let mut padded = data.to_vec();
                padded.resize(
                    data.len().div_ceil(Self::FEATURE_ENTRY_LEN) * Self::FEATURE_ENTRY_LEN,
                    0,
                );
                let mut entries = Vec::with_capacity(padded.len() / Self::FEATURE_ENTRY_LEN);
                for e in padded.chunks_exact(Self::FEATURE_ENTRY_LEN) {
                    let field = &e[2..];
                    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
                    entries.push(FeatureName {
                        kind: FeatureKind::from_byte(e[0]),
                        bit: e[1],
                        name: String::from_utf8_lossy(&field[..end]).into_owned(),
                    });
                }
                HeaderExtension::FeatureNameTable(entries)
            }
            Self::BITMAPS => {
                if data.len() != Self::BITMAPS_LEN {
                    return Err(bad(format!(
                        "bitmaps extension is {} bytes, expected 24",
                        data.len()
                    )));
                }
                let reserved = u32_at(data, 4);
                if reserved != 0 {
                    return Err(FormatError::ReservedBits {
                        what: "bitmaps extension reserved field",
                        value: u64::from(reserved),
                    });
                }
                HeaderExtension::Bitmaps(BitmapsExtension {
                    nb_bitmaps: u32_at(data, 0),
                    directory_size: u64_at(data, 8),
                    directory_offset: u64_at(data, 16),
                })
            }
            Self::FULL_DISK_ENCRYPTION => {
                if data.len() != Self::FULL_DISK_ENCRYPTION_LEN {
                    return Err(bad(format!(
                        "full disk encryption extension is {} bytes, expected 16",
                        data.len()
                    )));
                }
                HeaderExtension::FullDiskEncryption {
                    offset: u64_at(data, 0),
                    length: u64_at(data, 8),
                }
            }
            _ => HeaderExtension::Unknown {
                kind,
                data: data.to_vec(),
            },
        })
    }

    /// Length of the payload on disk, without padding.
    pub fn payload_len(&self) -> usize {
        match self {
            Self::BackingFormat(s) | Self::ExternalDataFile(s) => s.len(),
            Self::FeatureNameTable(v) => v.len() * Self::FEATURE_ENTRY_LEN,
            Self::Bitmaps(_) => Self::BITMAPS_LEN,
            Self::FullDiskEncryption { .. } => Self::FULL_DISK_ENCRYPTION_LEN,
            Self::Unknown { data, .. } => data.len(),
        }
    }

    /// Bytes the extension takes in the header area: 8 bytes of type and length, the payload,
    /// and zero padding to a multiple of 8.
    pub fn encoded_len(&self) -> usize {
        8 + crate::be::pad8(self.payload_len())
    }

    /// Encodes the payload (without type, length or padding). Fails for feature names longer
    /// than 46 bytes or containing NUL, an `Unknown` extension of type 0 or of a known type,
    /// and payloads longer than `u32::MAX`.
    pub fn encode_payload(&self) -> Result<Vec<u8>> {
        let kind = self.kind();
        let bad = |reason: String| FormatError::BadExtension { kind, reason };
        let out = match self {
            Self::BackingFormat(s) | Self::ExternalDataFile(s) => s.as_bytes().to_vec(),
            Self::FeatureNameTable(entries) => {
                let mut out = Vec::with_capacity(entries.len() * Self::FEATURE_ENTRY_LEN);
                for e in entries {
                    let name = e.name.as_bytes();
                    if name.len() > Self::FEATURE_NAME_LEN {
                        return Err(bad(format!(
                            "feature name {:?} is longer than 46 bytes",
                            e.name
                        )));
                    }
                    if name.contains(&0) {
                        return Err(bad(format!("feature name {:?} contains NUL", e.name)));
                    }
                    out.push(e.kind.to_byte());
                    out.push(e.bit);
                    out.extend_from_slice(name);
                    out.resize(out.len() + Self::FEATURE_NAME_LEN - name.len(), 0);
                }
                out
            }
            Self::Bitmaps(b) => {
                let mut out = Vec::with_capacity(Self::BITMAPS_LEN);
                out.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes());
                out.extend_from_slice(&b.directory_size.to_be_bytes());
                out.extend_from_slice(&b.directory_offset.to_be_bytes());
                out
            }
            Self::FullDiskEncryption { offset, length } => {
                let mut out = Vec::with_capacity(Self::FULL_DISK_ENCRYPTION_LEN);
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
                out
            }
            Self::Unknown { kind, data } => {
                if *kind == 0 {
                    return Err(bad("type 0 is the end marker, not an extension".into()));
                }
                if matches!(
                    *kind,
                    Self::BACKING_FORMAT
                        | Self::FEATURE_NAME_TABLE
                        | Self::BITMAPS
                        | Self::FULL_DISK_ENCRYPTION
                        | Self::EXTERNAL_DATA_FILE
                ) {
                    return Err(bad("known extension type stored as Unknown".into()));
                }
                data.clone()
            }
        };
        if u32::try_from(out.len()).is_err() {
            return Err(bad(format!("payload of {} bytes is too long", out.len())));
        }
        Ok(out)
    }

    /// Appends the encoded extension (type, length, payload, zero padding) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        let payload = self.encode_payload()?;
        out.extend_from_slice(&self.kind().to_be_bytes());
        // encode_payload guarantees the length fits.
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        crate::be::pad_vec8(out);
        Ok(())
    }
}

/// Parses the extension list starting at `start` up to and including the end marker. Returns
/// the extensions and the offset just past the end marker.
pub(crate) fn parse_extensions(
    buf: &[u8],
    start: usize,
    cluster_size: u64,
) -> Result<(Vec<HeaderExtension>, usize)> {
    // Everything must lie in cluster 0 and in the buffer; `limit` is the cluster bound.
    let limit = usize::try_from(cluster_size).unwrap_or(usize::MAX);
    let mut exts: Vec<HeaderExtension> = Vec::new();
    let mut off = start;
    loop {
        if off + 8 > limit {
            return Err(FormatError::BadExtension {
                kind: 0,
                reason: format!(
                    "extension header at {off:#x} runs past the end of cluster 0 \
                     (no end marker)"
                ),
            });
        }
        need(buf, off + 8, "header extension")?;
        let kind = u32_at(buf, off);
        let len = u32_at(buf, off + 4) as usize;
        if kind == 0 {
            return Ok((exts, off + 8));
        }
        let data_start = off + 8;
        // `len` is at most u32::MAX, so these cannot overflow a 64-bit usize; use checked
        // arithmetic anyway for 32-bit targets.
        let data_end = data_start.checked_add(len);
        let padded_end = data_start.checked_add(crate::be::pad8(len));
        match (data_end, padded_end) {
            (Some(_), Some(p)) if p <= limit => {}
            _ => {
                return Err(FormatError::BadExtension {
                    kind,
                    reason: format!(
                        "length {len} at {off:#x} runs past the end of cluster 0 \
                         ({cluster_size:#x} bytes)"
                    ),
                })
            }
        }
        let data_end = data_start + len;
        need(buf, data_end, "header extension")?;
        exts.push(HeaderExtension::decode(kind, &buf[data_start..data_end])?);
        off = data_start + crate::be::pad8(len);
    }
}

/// The extensions as QEMU keeps them: `qcow2_read_extensions` (block/qcow2.c) counts none,
/// so a known extension given again replaces the earlier one (the last counts), and unknown
/// ones are all kept (QEMU writes each back when it rewrites the header). A bitmaps
/// extension is checked when met, as QEMU checks it, even if a later one replaces it
/// (`bitmaps_in_use`: autoclear bit 0, without which QEMU ignores the extension).
pub(crate) fn last_of_each_kind(
    all: Vec<HeaderExtension>,
    bitmaps_in_use: bool,
    cluster_size: u64,
) -> Result<Vec<HeaderExtension>> {
    let mut kept: Vec<HeaderExtension> = Vec::with_capacity(all.len());
    for ext in all {
        if !matches!(ext, HeaderExtension::Unknown { .. }) {
            if let Some(i) = kept.iter().position(|e| e.kind() == ext.kind()) {
                if let (HeaderExtension::Bitmaps(b), true) = (kept.remove(i), bitmaps_in_use) {
                    check_bitmaps_extension(&b)?;
                    if b.directory_offset % cluster_size != 0 {
                        return Err(FormatError::Misaligned {
                            what: "bitmap directory",
                            offset: b.directory_offset,
                        });
                    }
                }
            }
        }
        kept.push(ext);
    }
    Ok(kept)
}

/// The checks of a bitmaps extension's fields that need no file: 1..=65535 bitmaps and a
/// directory of at most 1024 * 65535 bytes (its placement is checked against the file by
/// [`Header::validate_layout`](crate::Header::validate_layout)).
pub(crate) fn check_bitmaps_extension(b: &crate::BitmapsExtension) -> Result<()> {
    if b.nb_bitmaps == 0 {
        return Err(FormatError::BadExtension {
            kind: HeaderExtension::BITMAPS,
            reason: "bitmaps extension with zero bitmaps".into(),
        });
    }
    if b.nb_bitmaps > limits::MAX_BITMAPS {
        return Err(FormatError::TooLarge {
            what: "number of bitmaps",
            value: u64::from(b.nb_bitmaps),
            limit: u64::from(limits::MAX_BITMAPS),
        });
    }
    if b.directory_size > limits::MAX_BITMAP_DIRECTORY_BYTES {
        return Err(FormatError::TooLarge {
            what: "bitmap directory (bytes)",
            value: b.directory_size,
            limit: limits::MAX_BITMAP_DIRECTORY_BYTES,
        });
    }
    Ok(())
}
