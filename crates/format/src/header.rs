//! The image header (cluster 0): fixed fields, additional fields, extensions, backing name.

use crate::be::{u32_at, u64_at};
use crate::extension::{check_bitmaps_extension, last_of_each_kind, parse_extensions};
use crate::features::{
    AUTOCLEAR_BITMAPS, INCOMPAT_COMPRESSION, INCOMPAT_EXTENDED_L2, INCOMPAT_KNOWN,
};
use crate::limits;
use crate::units::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS};
use crate::{ClusterGeometry, FeatureKind, FormatError, HeaderExtension, RefcountWidth, Result};

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

impl CompressionType {
    /// From the header byte 104 (0 zlib, 1 zstd).
    pub fn from_byte(b: u8) -> Result<Self> {
        match b {
            0 => Ok(Self::Zlib),
            1 => Ok(Self::Zstd),
            n => Err(FormatError::CompressionType(n)),
        }
    }

    /// The header byte 104.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Zlib => 0,
            Self::Zstd => 1,
        }
    }
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
    /// Header extensions in file order (the end marker is implicit). As QEMU reads them, a
    /// known type given more than once counts once, where it was given last; unknown types
    /// are all kept.
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
}

impl Header {
    /// Length of a v2 header (and where its extensions start).
    pub const V2_LENGTH: u32 = 72;
    /// Smallest v3 header_length.
    pub const V3_MIN_LENGTH: u32 = 104;
    /// The header_length QEMU writes for v3 (fields through the compression type and its
    /// padding).
    pub const QEMU_V3_LENGTH: u32 = 112;
    /// Where the virtual size lies in the serialized header: a resize rewrites these bytes
    /// alone (one sector, as QEMU does).
    pub const SIZE_FIELD: std::ops::Range<usize> = 24..32;
    /// Where `l1_size` and `l1_table_offset` lie in the serialized header: a new L1 table
    /// takes effect by rewriting these bytes alone (one sector, as QEMU does).
    pub const L1_FIELDS: std::ops::Range<usize> = 36..48;
    /// From `refcount_table_offset` to `refcount_order` (version 3) in the serialized
    /// header: a refcount structure of another width takes effect by rewriting these bytes
    /// alone (one sector; the fields between them are written with their values).
    pub const REFCOUNT_FIELDS: std::ops::Range<usize> = 48..100;

    /// Reads just enough of the header (magic, version, cluster_bits; 24 bytes) to say how big
    /// cluster 0 is, so that the caller can read the whole cluster before calling
    /// [`Header::parse`].
    pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32> {
        check_magic_version(buf)?;
        need(buf, 24, "header")?;
        let bits = u32_at(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(FormatError::ClusterBits(bits));
        }
        Ok(bits)
    }

    /// Parses and validates the header from the start of the file (give it the whole first
    /// cluster, or as much of the file as there is if it is shorter).
    ///
    /// Checks, in this order: magic, version, the fixed fields being present, cluster_bits,
    /// header_length, refcount_order, crypt_method, the padding after the compression type,
    /// extension framing and contents, the backing file name, unknown incompatible features,
    /// the compression type and its feature bit, extended L2 against the cluster size.
    /// Unknown compatible and autoclear bits are kept (the engine decides what to clear).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let version = check_magic_version(buf)?;
        let fixed = if version == 2 {
            Self::V2_LENGTH
        } else {
            Self::V3_MIN_LENGTH
        };
        need(buf, fixed as usize, "header")?;

        let cluster_bits = u32_at(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;

        let (incompatible_features, compatible_features, autoclear_features);
        let (refcount_order, header_length);
        if version == 2 {
            incompatible_features = 0;
            compatible_features = 0;
            autoclear_features = 0;
            refcount_order = 4;
            header_length = Self::V2_LENGTH;
        } else {
            incompatible_features = u64_at(buf, 72);
            compatible_features = u64_at(buf, 80);
            autoclear_features = u64_at(buf, 88);
            refcount_order = u32_at(buf, 96);
            header_length = u32_at(buf, 100);
            if header_length < Self::V3_MIN_LENGTH
                || header_length % 8 != 0
                || u64::from(header_length) > cluster_size
            {
                return Err(FormatError::HeaderLength(header_length));
            }
            need(buf, header_length as usize, "header")?;
            if refcount_order > 6 {
                return Err(FormatError::RefcountOrder(refcount_order));
            }
        }

        let crypt_method = u32_at(buf, 32);
        if crypt_method != 0 {
            return Err(FormatError::Encrypted(crypt_method));
        }

        // Additional fields: the compression type byte, its padding, then unknown ones.
        let hl = header_length as usize;
        let compression_byte = if hl > 104 { buf[104] } else { 0 };
        let mut unknown_additional = Vec::new();
        if hl >= 112 {
            let pad = &buf[105..112];
            if pad.iter().any(|&b| b != 0) {
                let value = pad.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
                return Err(FormatError::ReservedBits {
                    what: "header padding (bytes 105..112)",
                    value,
                });
            }
            unknown_additional = buf[112..hl].to_vec();
        }

        let (extensions, _ext_end) = parse_extensions(buf, hl, cluster_size)?;
        let bitmaps_in_use = autoclear_features & AUTOCLEAR_BITMAPS != 0;
        let extensions = last_of_each_kind(extensions, bitmaps_in_use, cluster_size)?;

        let backing_file_offset = u64_at(buf, 8);
        let backing_file_size = u32_at(buf, 16);
        let backing_file = if backing_file_offset != 0 {
            Some(parse_backing_name(
                buf,
                backing_file_offset,
                backing_file_size,
                cluster_size,
            )?)
        } else {
            None
        };

        let mut header = Header {
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size: u64_at(buf, 24),
            crypt_method,
            l1_size: u32_at(buf, 36),
            l1_table_offset: u64_at(buf, 40),
            refcount_table_offset: u64_at(buf, 48),
            refcount_table_clusters: u32_at(buf, 56),
            nb_snapshots: u32_at(buf, 60),
            snapshots_offset: u64_at(buf, 64),
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
            compression_type: CompressionType::Zlib,
            unknown_additional,
            extensions,
            backing_file,
        };

        if let Some(err) = header.unknown_incompatible() {
            return Err(err);
        }

        header.compression_type = CompressionType::from_byte(compression_byte)?;
        let bit = incompatible_features & INCOMPAT_COMPRESSION != 0;
        if bit != (header.compression_type != CompressionType::Zlib) {
            return Err(FormatError::CompressionTypeBit(compression_byte));
        }

        if incompatible_features & INCOMPAT_EXTENDED_L2 != 0
            && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS
        {
            return Err(FormatError::ExtendedL2ClusterTooSmall(cluster_bits));
        }

        Ok(header)
    }

    /// Checks the offsets and sizes of the header against the file length and QEMU's limits:
    /// L1 table, refcount table, snapshot table alignment and bounds; L1 large enough for the
    /// virtual size; L1 <= 32 MiB, reftable <= 8 MiB; virtual size representable.
    ///
    /// Also checks, when autoclear bit 0 (bitmaps) is set and the bitmaps extension is present,
    /// the extension's contents (1..=65535 bitmaps, aligned directory inside the file and at
    /// most 1024 * 65535 bytes). An empty refcount table is refused, as QEMU does.
    pub fn validate_layout(&self, file_len: u64) -> Result<()> {
        self.validate_layout_but_snapshots(file_len)?;
        self.validate_snapshot_table(file_len)
    }

    /// [`Header::validate_layout`] without the snapshot table, as QEMU opens an image for
    /// `qemu-img check` (which reads, and may repair, the table itself) and for reading.
    pub fn validate_layout_but_snapshots(&self, file_len: u64) -> Result<()> {
        let geo = ClusterGeometry::new(self.cluster_bits, self.extended_l2())?;
        let cs = geo.cluster_size();

        // The L1 table, then the virtual size it must map, in QEMU's order (a table within
        // the limit that maps the size bounds the size well below MAX_VIRTUAL_SIZE).
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > limits::MAX_L1_BYTES {
            return Err(FormatError::TooLarge {
                what: "L1 table (bytes)",
                value: l1_bytes,
                limit: limits::MAX_L1_BYTES,
            });
        }
        let needed = geo.l1_entries_for(self.size);
        if needed > i32::MAX as u64 {
            return Err(FormatError::ImageTooBig(self.size));
        }
        if u64::from(self.l1_size) < needed {
            return Err(FormatError::L1TooSmall {
                l1_size: u64::from(self.l1_size),
                needed,
            });
        }
        if self.l1_size > 0 {
            check_table("L1 table", self.l1_table_offset, l1_bytes, &geo, file_len)?;
        }

        // Refcount table.
        let rt_bytes = u64::from(self.refcount_table_clusters)
            .checked_mul(cs)
            .ok_or(FormatError::TooLarge {
                what: "refcount table (bytes)",
                value: u64::MAX,
                limit: limits::MAX_REFTABLE_BYTES,
            })?;
        if rt_bytes > limits::MAX_REFTABLE_BYTES {
            return Err(FormatError::TooLarge {
                what: "refcount table (bytes)",
                value: rt_bytes,
                limit: limits::MAX_REFTABLE_BYTES,
            });
        }
        if rt_bytes == 0 {
            return Err(FormatError::InvalidHeader(
                "the image has no refcount table (refcount_table_clusters is 0)".into(),
            ));
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            &geo,
            file_len,
        )?;

        // Bitmaps, when the extension is declared consistent.
        if self.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
            if let Some(b) = self.bitmaps() {
                check_bitmaps_extension(b)?;
                check_table(
                    "bitmap directory",
                    b.directory_offset,
                    b.directory_size,
                    &geo,
                    file_len,
                )?;
            }
        }
        Ok(())
    }

    /// The part of [`Header::validate_layout`] about the snapshot table: at most 65536
    /// snapshots, an aligned table whose entries' fixed parts lie inside the file.
    pub fn validate_snapshot_table(&self, file_len: u64) -> Result<()> {
        let geo = ClusterGeometry::new(self.cluster_bits, self.extended_l2())?;
        // Snapshot table: at least 40 bytes per entry.
        if self.nb_snapshots > limits::MAX_SNAPSHOTS {
            return Err(FormatError::TooLarge {
                what: "number of snapshots",
                value: u64::from(self.nb_snapshots),
                limit: u64::from(limits::MAX_SNAPSHOTS),
            });
        }
        if self.nb_snapshots > 0 {
            check_table(
                "snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * crate::Snapshot::FIXED_LEN as u64,
                &geo,
                file_len,
            )?;
        }

        Ok(())
    }

    /// Offset just past the extension end marker: where QEMU puts the backing file name.
    pub fn extensions_end(&self) -> u64 {
        let start = if self.version == 2 {
            Self::V2_LENGTH
        } else {
            self.header_length
        };
        let exts: usize = self.extensions.iter().map(|e| e.encoded_len()).sum();
        u64::from(start) + exts as u64 + 8
    }

    /// Serializes header, extensions (with end marker) and backing file name into the bytes of
    /// cluster 0 (not padded to the cluster size). Updates nothing in `self`: the caller keeps
    /// `backing_file_offset`/`backing_file_size` consistent via [`Header::fix_backing_location`].
    ///
    /// Fails (rather than write something that would not parse back to `self`) on: a bad
    /// version or cluster_bits; a v2 header with feature bits, a refcount order other than 4,
    /// header_length other than 72, zstd or additional fields; a v3 header_length that is
    /// invalid, too short for zstd, or disagrees with `unknown_additional`; a known extension
    /// given twice, or one that cannot be encoded; a backing name that is too long, disagrees with
    /// `backing_file_size`, or would overlap the extensions; a backing offset without a name;
    /// and [`FormatError::HeaderTooLarge`] when it all does not fit in one cluster.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(FormatError::ClusterBits(self.cluster_bits));
        }
        let cluster_size = 1u64 << self.cluster_bits;
        let invalid = |s: &str| Err(FormatError::InvalidHeader(s.to_owned()));

        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&QCOW_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        out.extend_from_slice(&self.backing_file_size.to_be_bytes());
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        match self.version {
            2 => {
                if self.incompatible_features != 0
                    || self.compatible_features != 0
                    || self.autoclear_features != 0
                {
                    return invalid("a v2 header cannot have feature bits");
                }
                if self.refcount_order != 4 {
                    return invalid("a v2 header implies refcount_order 4");
                }
                if self.header_length != Self::V2_LENGTH {
                    return Err(FormatError::HeaderLength(self.header_length));
                }
                if self.compression_type != CompressionType::Zlib
                    || !self.unknown_additional.is_empty()
                {
                    return invalid("a v2 header has no additional fields");
                }
            }
            3 => {
                let hl = self.header_length;
                if hl < Self::V3_MIN_LENGTH || hl % 8 != 0 || u64::from(hl) > cluster_size {
                    return Err(FormatError::HeaderLength(hl));
                }
                if hl <= 104 && self.compression_type != CompressionType::Zlib {
                    return invalid("a non-zlib compression type needs header_length > 104");
                }
                let extra = (hl as usize).saturating_sub(Self::QEMU_V3_LENGTH as usize);
                if self.unknown_additional.len() != extra {
                    return invalid("unknown_additional does not match header_length");
                }
                out.extend_from_slice(&self.incompatible_features.to_be_bytes());
                out.extend_from_slice(&self.compatible_features.to_be_bytes());
                out.extend_from_slice(&self.autoclear_features.to_be_bytes());
                out.extend_from_slice(&self.refcount_order.to_be_bytes());
                out.extend_from_slice(&hl.to_be_bytes());
                if hl > 104 {
                    out.push(self.compression_type.to_byte());
                    out.resize(Self::QEMU_V3_LENGTH as usize, 0);
                    out.extend_from_slice(&self.unknown_additional);
                }
            }
            v => return Err(FormatError::UnsupportedVersion(v)),
        }

        self.serialize_extensions(&mut out, cluster_size)?;
        self.serialize_backing_name(&mut out, cluster_size)?;
        if out.len() as u64 > cluster_size {
            return Err(FormatError::HeaderTooLarge {
                need: out.len() as u64,
                cluster_size,
            });
        }
        Ok(out)
    }

    /// Appends the header extensions and their end marker to `out`, refusing a known
    /// extension given twice (QEMU writes each once; unknown ones may repeat, as QEMU keeps
    /// and writes back every one it read) and anything past one cluster.
    fn serialize_extensions(&self, out: &mut Vec<u8>, cluster_size: u64) -> Result<()> {
        let mut seen: Vec<u32> = Vec::with_capacity(self.extensions.len());
        for ext in &self.extensions {
            let kind = ext.kind();
            let repeatable =
                matches!(ext, HeaderExtension::Unknown { .. }) && !HeaderExtension::is_known(kind);
            if seen.contains(&kind) && !repeatable {
                return Err(FormatError::DuplicateExtension(kind));
            }
            seen.push(kind);
            ext.encode_into(out)?;
            if out.len() as u64 > cluster_size {
                return Err(FormatError::HeaderTooLarge {
                    need: out.len() as u64,
                    cluster_size,
                });
            }
        }
        out.extend_from_slice(&[0u8; 8]);

        Ok(())
    }

    /// Appends the backing file name at its offset, refusing a name that is too long,
    /// disagrees with its size field, overlaps the extensions or passes one cluster.
    fn serialize_backing_name(&self, out: &mut Vec<u8>, cluster_size: u64) -> Result<()> {
        let invalid = |s: &str| Err(FormatError::InvalidHeader(s.to_owned()));
        match &self.backing_file {
            None => {
                if self.backing_file_offset != 0 {
                    return invalid("backing_file_offset is set but there is no backing file");
                }
            }
            Some(name) => {
                let len = name.len() as u64;
                if len > u64::from(limits::MAX_BACKING_NAME) {
                    return Err(FormatError::TooLarge {
                        what: "backing file name",
                        value: len,
                        limit: u64::from(limits::MAX_BACKING_NAME),
                    });
                }
                if u64::from(self.backing_file_size) != len {
                    return invalid("backing_file_size does not match the backing file name");
                }
                if self.backing_file_offset < out.len() as u64 {
                    return invalid(
                        "the backing file name would overlap the header extensions \
                         (call fix_backing_location)",
                    );
                }
                let end = self.backing_file_offset.saturating_add(len);
                if end > cluster_size {
                    return Err(FormatError::HeaderTooLarge {
                        need: end,
                        cluster_size,
                    });
                }
                out.resize(self.backing_file_offset as usize, 0);
                out.extend_from_slice(name.as_bytes());
            }
        }
        Ok(())
    }

    /// Recomputes `backing_file_offset` and `backing_file_size` for the current extensions and
    /// backing name (the name goes right after the extension end marker, as QEMU does). Without
    /// a backing file both become 0.
    pub fn fix_backing_location(&mut self) {
        match &self.backing_file {
            Some(name) => {
                self.backing_file_offset = self.extensions_end();
                self.backing_file_size = u32::try_from(name.len()).unwrap_or(u32::MAX);
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
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
    /// Returns `None` when every incompatible bit is known.
    pub fn unknown_incompatible(&self) -> Option<FormatError> {
        let bits = self.incompatible_features & !INCOMPAT_KNOWN;
        if bits == 0 {
            return None;
        }
        let table = self.extensions.iter().find_map(|e| match e {
            HeaderExtension::FeatureNameTable(t) => Some(t.as_slice()),
            _ => None,
        });
        // In the table's order, each bit once, as QEMU's report_unsupported_feature.
        let (mut names, mut unnamed) = (Vec::new(), bits);
        for f in table
            .unwrap_or(&[])
            .iter()
            .take_while(|f| !f.name.is_empty())
        {
            let bit = 1u64.checked_shl(u32::from(f.bit)).unwrap_or(0);
            if f.kind == FeatureKind::Incompatible && unnamed & bit != 0 {
                names.push(f.name.clone());
                unnamed &= !bit;
            }
        }
        Some(FormatError::UnknownIncompatibleFeatures {
            bits,
            names,
            unnamed,
        })
    }
}

/// Errors with `Truncated` unless `buf` has at least `len` bytes.
pub(crate) fn need(buf: &[u8], len: usize, what: &'static str) -> Result<()> {
    if buf.len() < len {
        return Err(FormatError::Truncated {
            what,
            need: len as u64,
            have: buf.len() as u64,
        });
    }
    Ok(())
}

/// Checks magic and version; returns the version.
fn check_magic_version(buf: &[u8]) -> Result<u32> {
    need(buf, 4, "header")?;
    let magic = u32_at(buf, 0);
    if magic != QCOW_MAGIC {
        return Err(FormatError::BadMagic(magic));
    }
    need(buf, 8, "header")?;
    let version = u32_at(buf, 4);
    if version != 2 && version != 3 {
        return Err(FormatError::UnsupportedVersion(version));
    }
    Ok(version)
}

/// Reads the backing file name at `offset` (non-zero).
fn parse_backing_name(buf: &[u8], offset: u64, size: u32, cluster_size: u64) -> Result<String> {
    if size > limits::MAX_BACKING_NAME {
        return Err(FormatError::TooLarge {
            what: "backing file name",
            value: u64::from(size),
            limit: u64::from(limits::MAX_BACKING_NAME),
        });
    }
    let end = offset.saturating_add(u64::from(size));
    if end > cluster_size {
        return Err(FormatError::InvalidHeader(format!(
            "backing file name at {offset:#x} (+{size}) lies outside cluster 0 \
             ({cluster_size:#x} bytes)"
        )));
    }
    // end <= cluster_size <= 2 MiB, so these casts are lossless.
    need(buf, end as usize, "backing file name")?;
    let bytes = &buf[offset as usize..end as usize];
    String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::NotUtf8("backing file name"))
}

/// Checks that a table at `offset` of `len` bytes is cluster aligned and inside the file.
fn check_table(
    what: &'static str,
    offset: u64,
    len: u64,
    geo: &ClusterGeometry,
    file_len: u64,
) -> Result<()> {
    if !geo.is_aligned(offset) {
        return Err(FormatError::Misaligned { what, offset });
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(FormatError::PastEnd {
            what,
            offset,
            len,
            file_len,
        }),
    }
}
