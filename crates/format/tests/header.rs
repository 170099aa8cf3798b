//! Header parsing, validation and serialization.

mod common;

use common::*;
use proptest::prelude::*;
use qcow2_format::features::*;
use qcow2_format::{
    BitmapsExtension, CompressionType, FeatureKind, FeatureName, FormatError, Header,
    HeaderExtension,
};

// ---------------------------------------------------------------------------------------------
// Samples written by qemu-img (see tests/common/mod.rs for how each was produced).

#[test]
fn qemu_1g_image() {
    let bytes = hex(QEMU_1G);
    assert_eq!(bytes.len(), 0x200);
    let h = Header::parse(&bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_bits, 16);
    assert_eq!(h.size, 1 << 30);
    assert_eq!(h.l1_size, 2);
    assert_eq!(h.l1_table_offset, 0x30000);
    assert_eq!(h.refcount_table_offset, 0x10000);
    assert_eq!(h.refcount_table_clusters, 1);
    assert_eq!(h.nb_snapshots, 0);
    assert_eq!(h.header_length, 112);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.refcount_width().bits(), 16);
    assert_eq!(h.compression_type, CompressionType::Zlib);
    assert_eq!(h.incompatible_features, 0);
    assert_eq!(h.backing_file, None);
    assert!(h.unknown_additional.is_empty());
    assert_eq!(h.extensions.len(), 1);
    match &h.extensions[0] {
        HeaderExtension::FeatureNameTable(t) => {
            assert_eq!(t.len(), 8);
            assert_eq!(t[0].name, "dirty bit");
            assert_eq!(t[4].name, "extended L2 entries");
            assert_eq!(t[7].kind, FeatureKind::Autoclear);
            assert_eq!(t[7].bit, 1);
        }
        e => panic!("unexpected extension {e:?}"),
    }
    assert_eq!(h.extensions[0], HeaderExtension::qemu_feature_table());
    assert_eq!(h, base_v3());
    assert_eq!(h.serialize().unwrap(), bytes);
    assert_eq!(h.extensions_end(), 0x200);

    // The engine hands over the whole cluster: same result.
    let mut cluster = bytes.clone();
    cluster.resize(65536, 0);
    assert_eq!(Header::parse(&cluster).unwrap(), h);

    // The file is 0x30010 bytes long: the L1 table (16 bytes at 0x30000) ends exactly there.
    h.validate_layout(0x30010).unwrap();
    assert!(matches!(
        h.validate_layout(0x3000f),
        Err(FormatError::PastEnd {
            what: "L1 table",
            ..
        })
    ));
    let geo = h.geometry();
    assert_eq!(geo.l2_entries(), 8192);
    assert_eq!(geo.l1_entries_for(h.size), 2);
}

#[test]
fn qemu_backing_image() {
    let bytes = hex(QEMU_BACKING);
    let h = Header::parse(&bytes).unwrap();
    assert_eq!(h.backing_file.as_deref(), Some("base.qcow2"));
    assert_eq!(h.backing_file_offset, 0x210);
    assert_eq!(h.backing_file_size, 10);
    assert_eq!(h.backing_format(), Some("qcow2"));
    assert_eq!(h.size, 64 << 20);
    assert_eq!(h.extensions.len(), 2);
    assert_eq!(h.serialize().unwrap(), bytes);
    let mut moved = h.clone();
    moved.fix_backing_location();
    assert_eq!(moved, h, "QEMU puts the name right after the end marker");
    h.validate_layout(196616).unwrap();
}

#[test]
fn qemu_extended_l2_zstd_image() {
    let bytes = hex(QEMU_EXT_ZSTD);
    let h = Header::parse(&bytes).unwrap();
    assert_eq!(h.cluster_bits, 14);
    assert!(h.extended_l2());
    assert_eq!(h.compression_type, CompressionType::Zstd);
    assert_eq!(
        h.incompatible_features,
        INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2
    );
    // 100 MiB, 16 KiB clusters, 1024 extended entries per L2 (16 MiB each): 7 L1 entries.
    assert_eq!(h.size, 100 << 20);
    assert_eq!(h.l1_size, 7);
    assert_eq!(h.geometry().l2_entries(), 1024);
    assert_eq!(h.geometry().l1_entries_for(h.size), 7);
    assert_eq!(h.serialize().unwrap(), bytes);
    h.validate_layout(49208).unwrap();
    // With standard L2 four entries would do; extended L2 needs seven.
    let mut small = h.clone();
    small.l1_size = 4;
    assert_eq!(
        small.validate_layout(1 << 20),
        Err(FormatError::L1TooSmall {
            l1_size: 4,
            needed: 7
        })
    );
}

#[test]
fn qemu_small_cluster_image() {
    let bytes = hex(QEMU_SMALL);
    let h = Header::parse(&bytes).unwrap();
    assert_eq!(h.cluster_bits, 9);
    assert!(
        h.extensions.is_empty(),
        "no feature table with 512 B clusters"
    );
    assert_eq!(h.refcount_table_offset, 0x200);
    assert_eq!(h.l1_table_offset, 0x600);
    assert_eq!(h.l1_size, 32);
    assert_eq!(h.serialize().unwrap(), bytes);
    h.validate_layout(1792).unwrap();
}

#[test]
fn qemu_v2_image() {
    let bytes = hex(QEMU_V2);
    let h = Header::parse(&bytes).unwrap();
    assert_eq!(h.version, 2);
    assert_eq!(h.header_length, 72);
    assert_eq!(h.refcount_order, 4);
    assert!(h.extensions.is_empty());
    assert_eq!(h.size, 16 << 20);
    assert_eq!(h.serialize().unwrap(), bytes);
    h.validate_layout(196616).unwrap();
}

#[test]
fn qemu_snapshot_and_bitmap_image_header() {
    let bytes = hex(QEMU_SNAP_HEADER);
    let h = Header::parse(&bytes).unwrap();
    assert_eq!(h.nb_snapshots, 2);
    assert_eq!(h.snapshots_offset, 0x70000);
    assert_eq!(h.autoclear_features, AUTOCLEAR_BITMAPS);
    assert_eq!(
        h.bitmaps(),
        Some(&BitmapsExtension {
            nb_bitmaps: 2,
            directory_size: 0x40,
            directory_offset: 0xb0000,
        })
    );
    assert_eq!(h.serialize().unwrap(), bytes);
    h.validate_layout(720960).unwrap();
    assert!(matches!(
        h.validate_layout(0xb0020),
        Err(FormatError::PastEnd {
            what: "bitmap directory",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Validation rules of `parse`.

fn parse_err(b: &[u8]) -> FormatError {
    Header::parse(b).expect_err("parse should fail")
}

#[test]
fn bad_magic() {
    let mut b = base_v3_bytes();
    b[3] = 0xfa;
    assert_eq!(parse_err(&b), FormatError::BadMagic(0x514649fa));
}

#[test]
fn unsupported_versions() {
    for v in [0, 1, 4, 0xffff_ffff] {
        let mut b = base_v3_bytes();
        put_u32(&mut b, 4, v);
        assert_eq!(parse_err(&b), FormatError::UnsupportedVersion(v));
    }
}

#[test]
fn cluster_bits_limits() {
    for bits in [0, 8, 22, 64] {
        let mut b = base_v3_bytes();
        put_u32(&mut b, 20, bits);
        assert_eq!(parse_err(&b), FormatError::ClusterBits(bits));
        assert_eq!(
            Header::peek_cluster_bits(&b),
            Err(FormatError::ClusterBits(bits))
        );
    }
    let mut b = base_v3_bytes();
    put_u32(&mut b, 20, 9);
    // 9 is legal, and header + feature table + end marker fill the 512 bytes exactly.
    assert_eq!(Header::parse(&b).unwrap().cluster_bits, 9);
    assert_eq!(Header::peek_cluster_bits(&b), Ok(9));
    // With a longer header the end marker no longer fits; with a longer one still, the table.
    let mut h = base_v3();
    h.header_length = 120;
    h.unknown_additional = vec![0; 8];
    let mut b = h.serialize().unwrap();
    put_u32(&mut b, 20, 9);
    assert!(matches!(
        parse_err(&b),
        FormatError::BadExtension { kind: 0, .. }
    ));
    h.header_length = 128;
    h.unknown_additional = vec![0; 16];
    let mut b = h.serialize().unwrap();
    put_u32(&mut b, 20, 9);
    assert!(matches!(
        parse_err(&b),
        FormatError::BadExtension {
            kind: HeaderExtension::FEATURE_NAME_TABLE,
            ..
        }
    ));
    put_u32(&mut b, 20, 21);
    assert_eq!(Header::parse(&b).unwrap().cluster_bits, 21);
}

#[test]
fn header_length_rules() {
    for hl in [0, 72, 100, 103, 108, 113] {
        let mut b = base_v3_bytes();
        put_u32(&mut b, 100, hl);
        assert_eq!(parse_err(&b), FormatError::HeaderLength(hl), "hl {hl}");
    }
    // Larger than the cluster.
    let mut h = base_v3();
    h.cluster_bits = 9;
    h.extensions.clear();
    let mut b = h.serialize().unwrap();
    b.resize(1024, 0);
    put_u32(&mut b, 100, 520);
    assert_eq!(parse_err(&b), FormatError::HeaderLength(520));
    // Exactly 104 is fine (no compression type byte); extensions start at 104.
    let mut h = base_v3();
    h.header_length = 104;
    let b = h.serialize().unwrap();
    assert_eq!(
        &b[104..108],
        &HeaderExtension::FEATURE_NAME_TABLE.to_be_bytes()
    );
    assert_eq!(Header::parse(&b).unwrap(), h);
}

#[test]
fn refcount_order_limit() {
    let mut b = base_v3_bytes();
    put_u32(&mut b, 96, 7);
    assert_eq!(parse_err(&b), FormatError::RefcountOrder(7));
    put_u32(&mut b, 96, 6);
    assert_eq!(Header::parse(&b).unwrap().refcount_width().bits(), 64);
    put_u32(&mut b, 96, 0);
    assert_eq!(Header::parse(&b).unwrap().refcount_width().bits(), 1);
}

#[test]
fn encrypted_refused() {
    for m in [1, 2, 3] {
        let mut b = base_v3_bytes();
        put_u32(&mut b, 32, m);
        assert_eq!(parse_err(&b), FormatError::Encrypted(m));
    }
}

#[test]
fn unknown_incompatible_named_from_table() {
    let mut h = base_v3();
    let mut table = match HeaderExtension::qemu_feature_table() {
        HeaderExtension::FeatureNameTable(t) => t,
        _ => unreachable!(),
    };
    table.push(FeatureName {
        kind: FeatureKind::Incompatible,
        bit: 5,
        name: "future feature".into(),
    });
    // Same bit, other kind: must not be picked.
    table.push(FeatureName {
        kind: FeatureKind::Compatible,
        bit: 6,
        name: "not me".into(),
    });
    h.extensions = vec![HeaderExtension::FeatureNameTable(table)];
    assert_eq!(h.unknown_incompatible(), None);
    h.incompatible_features = INCOMPAT_DIRTY | (1 << 5) | (1 << 6);
    let expected = FormatError::UnknownIncompatibleFeatures {
        bits: 0x60,
        names: vec!["future feature".into()],
        unnamed: 0x40,
    };
    assert_eq!(h.unknown_incompatible(), Some(expected.clone()));
    let b = h.serialize().unwrap();
    assert_eq!(parse_err(&b), expected);
    // QEMU's words: the names, then what the table does not name.
    assert_eq!(
        expected.to_string(),
        "Unsupported qcow2 feature(s): future feature, Unknown incompatible feature: 40"
    );

    // Without a table: no names.
    h.extensions.clear();
    let b = h.serialize().unwrap();
    assert_eq!(
        parse_err(&b),
        FormatError::UnknownIncompatibleFeatures {
            bits: 0x60,
            names: vec![],
            unnamed: 0x60,
        }
    );
}

#[test]
fn unknown_compatible_and_autoclear_bits_kept() {
    let mut h = base_v3();
    h.compatible_features = 0xff00_0000_0000_ff01;
    h.autoclear_features = 0xffff_ffff_ffff_fffc;
    let b = h.serialize().unwrap();
    assert_eq!(Header::parse(&b).unwrap(), h);
}

#[test]
fn backing_name_rules() {
    // Too long.
    let mut b = base_v3_bytes();
    put_u64(&mut b, 8, 0x300);
    put_u32(&mut b, 16, 1024);
    assert!(matches!(
        parse_err(&b),
        FormatError::TooLarge {
            what: "backing file name",
            value: 1024,
            limit: 1023
        }
    ));
    // 1023 is the limit, and fine.
    put_u32(&mut b, 16, 1023);
    b[0x300..0x300 + 1023].fill(b'a');
    assert_eq!(Header::parse(&b).unwrap().backing_file.unwrap().len(), 1023);
    // Not UTF-8.
    b[0x300] = 0xff;
    assert_eq!(parse_err(&b), FormatError::NotUtf8("backing file name"));
    // Outside the buffer.
    assert!(matches!(
        parse_err(&b[..0x400]),
        FormatError::Truncated {
            what: "backing file name",
            ..
        }
    ));
    // Outside the cluster.
    put_u64(&mut b, 8, 0xfff0);
    put_u32(&mut b, 16, 0x20);
    assert!(matches!(parse_err(&b), FormatError::InvalidHeader(_)));
    put_u64(&mut b, 8, u64::MAX);
    assert!(matches!(parse_err(&b), FormatError::InvalidHeader(_)));
    // backing_file_size without an offset is meaningless, and kept as is.
    put_u64(&mut b, 8, 0);
    put_u32(&mut b, 16, 77);
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.backing_file, None);
    assert_eq!(h.backing_file_size, 77);
    assert_eq!(&h.serialize().unwrap()[..], &b[..0x200]);
}

#[test]
fn extended_l2_needs_16k_clusters() {
    let mut h = base_v3();
    h.extensions.clear();
    h.incompatible_features = INCOMPAT_EXTENDED_L2;
    h.cluster_bits = 13;
    let b = h.serialize().unwrap();
    assert_eq!(parse_err(&b), FormatError::ExtendedL2ClusterTooSmall(13));
    h.cluster_bits = 14;
    let b = h.serialize().unwrap();
    assert!(Header::parse(&b).unwrap().extended_l2());
}

#[test]
fn compression_type_rules() {
    // Unknown type.
    let mut b = base_v3_bytes();
    b[104] = 2;
    put_u64(&mut b, 72, INCOMPAT_COMPRESSION);
    assert_eq!(parse_err(&b), FormatError::CompressionType(2));
    // zstd without the bit.
    let mut b = base_v3_bytes();
    b[104] = 1;
    assert_eq!(parse_err(&b), FormatError::CompressionTypeBit(1));
    // The bit with zlib.
    let mut b = base_v3_bytes();
    put_u64(&mut b, 72, INCOMPAT_COMPRESSION);
    assert_eq!(parse_err(&b), FormatError::CompressionTypeBit(0));
    // The bit with the field absent (header_length 104).
    let mut h = base_v3();
    h.header_length = 104;
    let mut b = h.serialize().unwrap();
    put_u64(&mut b, 72, INCOMPAT_COMPRESSION);
    assert_eq!(parse_err(&b), FormatError::CompressionTypeBit(0));
    // Both: fine.
    let mut b = base_v3_bytes();
    b[104] = 1;
    put_u64(&mut b, 72, INCOMPAT_COMPRESSION);
    assert_eq!(
        Header::parse(&b).unwrap().compression_type,
        CompressionType::Zstd
    );
}

#[test]
fn additional_field_padding_and_unknown_fields() {
    let mut b = base_v3_bytes();
    b[107] = 1;
    assert!(matches!(
        parse_err(&b),
        FormatError::ReservedBits {
            value: 0x1_0000_0000,
            ..
        }
    ));

    let mut h = base_v3();
    h.header_length = 128;
    h.unknown_additional = (1..=16).collect();
    let b = h.serialize().unwrap();
    assert_eq!(&b[112..128], &h.unknown_additional[..]);
    assert_eq!(Header::parse(&b).unwrap(), h);
}

#[test]
fn truncated_buffers() {
    let full = base_v3_bytes();
    for len in [0, 3, 4, 7, 8, 50, 71, 72, 103, 104, 111] {
        assert!(
            matches!(
                parse_err(&full[..len]),
                FormatError::Truncated { what: "header", .. }
            ),
            "len {len}"
        );
    }
    // Inside the extension header, inside the extension data, before the end marker.
    for len in [112, 115, 120, 200, 0x1f8, 0x1ff] {
        assert!(
            matches!(
                parse_err(&full[..len]),
                FormatError::Truncated {
                    what: "header extension",
                    ..
                }
            ),
            "len {len}"
        );
    }
    assert!(Header::parse(&full[..0x200]).is_ok());
    // A v2 header needs 72 bytes plus its end marker.
    let v2 = hex(QEMU_V2);
    assert!(matches!(
        parse_err(&v2[..71]),
        FormatError::Truncated { need: 72, .. }
    ));
    assert!(matches!(
        parse_err(&v2[..72]),
        FormatError::Truncated { need: 80, .. }
    ));
}

/// A v3 header (header_length 112, 64 KiB clusters) followed by raw extension bytes.
fn with_raw_extensions(raw: &[u8]) -> Vec<u8> {
    let mut h = base_v3();
    h.extensions.clear();
    let mut b = h.serialize().unwrap();
    b.truncate(112);
    b.extend_from_slice(raw);
    b.resize(65536, 0);
    b
}

fn ext(kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = kind.to_be_bytes().to_vec();
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(8) * 8, 0);
    v
}

#[test]
fn extension_rules() {
    // Unknown extension kept, padding dropped.
    let mut raw = ext(0x1234_5678, b"hello");
    raw.extend(ext(HeaderExtension::BACKING_FORMAT, b"raw"));
    let h = Header::parse(&with_raw_extensions(&raw)).unwrap();
    assert_eq!(
        h.extensions,
        vec![
            HeaderExtension::Unknown {
                kind: 0x1234_5678,
                data: b"hello".to_vec()
            },
            HeaderExtension::BackingFormat("raw".into()),
        ]
    );
    let mut expected = raw.clone();
    expected.extend_from_slice(&[0; 8]);
    assert_eq!(&h.serialize().unwrap()[112..], &expected[..]);
    // String padding need not be zero (QEMU never relies on it).
    let mut dirty = raw.clone();
    dirty[8 + 5] = 0xee;
    assert_eq!(Header::parse(&with_raw_extensions(&dirty)).unwrap(), h);

    // Given twice: QEMU's qcow2_read_extensions counts none. A known extension given again
    // replaces the earlier one; unknown ones are all kept, and written back.
    let mut raw = ext(HeaderExtension::BACKING_FORMAT, b"qcow2");
    raw.extend(ext(0x1234_5678, b"a"));
    raw.extend(ext(HeaderExtension::BACKING_FORMAT, b"raw"));
    raw.extend(ext(0x1234_5678, b"b"));
    let h = Header::parse(&with_raw_extensions(&raw)).unwrap();
    assert_eq!(
        h.extensions,
        vec![
            HeaderExtension::Unknown {
                kind: 0x1234_5678,
                data: b"a".to_vec()
            },
            HeaderExtension::BackingFormat("raw".into()),
            HeaderExtension::Unknown {
                kind: 0x1234_5678,
                data: b"b".to_vec()
            },
        ]
    );
    assert_eq!(h.backing_format(), Some("raw"));
    assert_eq!(Header::parse(&h.serialize().unwrap()).unwrap(), h);

    // Not UTF-8.
    let raw = ext(HeaderExtension::BACKING_FORMAT, &[0xc3]);
    assert_eq!(
        parse_err(&with_raw_extensions(&raw)),
        FormatError::NotUtf8("backing format name")
    );
    let raw = ext(HeaderExtension::EXTERNAL_DATA_FILE, &[0xff, 0xfe]);
    assert_eq!(
        parse_err(&with_raw_extensions(&raw)),
        FormatError::NotUtf8("external data file name")
    );

    // Feature table of a length that is not a multiple of 48: QEMU reads it, the last
    // entry zero-padded.
    let mut raw_table = vec![0u8; 50];
    raw_table[48] = 2;
    raw_table[49] = 7;
    let raw = ext(HeaderExtension::FEATURE_NAME_TABLE, &raw_table);
    let h = Header::parse(&with_raw_extensions(&raw)).unwrap();
    match &h.extensions[..] {
        [HeaderExtension::FeatureNameTable(t)] => {
            assert_eq!(t.len(), 2);
            assert_eq!((t[1].bit, t[1].name.as_str()), (7, ""));
        }
        other => panic!("{other:?}"),
    }
    // A 46-byte name without NUL.
    let mut entry = vec![2u8, 63];
    entry.extend(std::iter::repeat_n(b'x', 46));
    let h = Header::parse(&with_raw_extensions(&ext(
        HeaderExtension::FEATURE_NAME_TABLE,
        &entry,
    )))
    .unwrap();
    assert_eq!(
        h.extensions,
        vec![HeaderExtension::FeatureNameTable(vec![FeatureName {
            kind: FeatureKind::Autoclear,
            bit: 63,
            name: "x".repeat(46)
        }])]
    );

    // Bitmaps extension: exact length, reserved field zero.
    let raw = ext(HeaderExtension::BITMAPS, &[0; 16]);
    assert!(matches!(
        parse_err(&with_raw_extensions(&raw)),
        FormatError::BadExtension {
            kind: HeaderExtension::BITMAPS,
            ..
        }
    ));
    let mut data = [0u8; 24];
    data[3] = 1;
    data[7] = 1;
    let raw = ext(HeaderExtension::BITMAPS, &data);
    assert!(matches!(
        parse_err(&with_raw_extensions(&raw)),
        FormatError::ReservedBits { value: 1, .. }
    ));
    // Full disk encryption pointer: 16 bytes.
    let raw = ext(HeaderExtension::FULL_DISK_ENCRYPTION, &[0; 8]);
    assert!(matches!(
        parse_err(&with_raw_extensions(&raw)),
        FormatError::BadExtension {
            kind: HeaderExtension::FULL_DISK_ENCRYPTION,
            ..
        }
    ));
    let mut data = [0u8; 16];
    data[5] = 1;
    data[15] = 0x20;
    let h = Header::parse(&with_raw_extensions(&ext(
        HeaderExtension::FULL_DISK_ENCRYPTION,
        &data,
    )))
    .unwrap();
    assert_eq!(
        h.extensions,
        vec![HeaderExtension::FullDiskEncryption {
            offset: 0x10000,
            length: 0x20
        }]
    );
}

#[test]
fn extension_bounds_against_the_cluster() {
    // An extension longer than what is left of cluster 0.
    let mut raw = 0x1234u32.to_be_bytes().to_vec();
    raw.extend_from_slice(&65536u32.to_be_bytes());
    assert!(matches!(
        parse_err(&with_raw_extensions(&raw)),
        FormatError::BadExtension { kind: 0x1234, .. }
    ));
    raw[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        parse_err(&with_raw_extensions(&raw)),
        FormatError::BadExtension { kind: 0x1234, .. }
    ));
    // One that exactly fills cluster 0: no room for the end marker.
    let len = 65536 - 112 - 8;
    raw[4..8].copy_from_slice(&(len as u32).to_be_bytes());
    assert!(matches!(
        parse_err(&with_raw_extensions(&raw)),
        FormatError::BadExtension { kind: 0, .. }
    ));
    // Eight bytes less, and the end marker fits.
    raw[4..8].copy_from_slice(&(len as u32 - 8).to_be_bytes());
    let h = Header::parse(&with_raw_extensions(&raw)).unwrap();
    assert_eq!(h.extensions_end(), 65536);
    // A longer buffer does not let extensions cross into cluster 1.
    let mut b = with_raw_extensions(&raw);
    b[65536 - 8..65536].fill(0xff);
    b.resize(65536 * 2, 0);
    assert!(matches!(parse_err(&b), FormatError::BadExtension { .. }));
}

// ---------------------------------------------------------------------------------------------
// validate_layout.

#[test]
fn layout_l1_rules() {
    let h = base_v3();
    let file_len = 0x40000;
    h.validate_layout(file_len).unwrap();

    let mut m = h.clone();
    m.l1_table_offset = 0x30200;
    assert_eq!(
        m.validate_layout(file_len),
        Err(FormatError::Misaligned {
            what: "L1 table",
            offset: 0x30200
        })
    );
    let mut m = h.clone();
    m.l1_table_offset = 0x40000;
    assert!(matches!(
        m.validate_layout(file_len),
        Err(FormatError::PastEnd {
            what: "L1 table",
            offset: 0x40000,
            len: 16,
            ..
        })
    ));
    let mut m = h.clone();
    m.l1_table_offset = !0xffff;
    m.l1_size = 8192;
    assert!(matches!(
        m.validate_layout(u64::MAX),
        Err(FormatError::PastEnd {
            what: "L1 table",
            ..
        })
    ));
    let mut m = h.clone();
    m.l1_size = 1;
    assert_eq!(
        m.validate_layout(file_len),
        Err(FormatError::L1TooSmall {
            l1_size: 1,
            needed: 2
        })
    );
    // A larger L1 (VM state area) is fine.
    let mut m = h.clone();
    m.l1_size = 3;
    m.validate_layout(file_len).unwrap();
    // 32 MiB of L1 is the limit.
    let mut m = h.clone();
    m.l1_size = (32 << 20) / 8;
    m.validate_layout(u64::MAX).unwrap();
    m.l1_size += 1;
    assert!(matches!(
        m.validate_layout(u64::MAX),
        Err(FormatError::TooLarge {
            limit: 0x200_0000,
            ..
        })
    ));
    // No L1 at all for an empty disk: offset unchecked.
    let mut m = h.clone();
    m.size = 0;
    m.l1_size = 0;
    m.l1_table_offset = 0x123;
    m.validate_layout(file_len).unwrap();
}

#[test]
fn layout_virtual_size_limits() {
    let mut h = base_v3();
    // 64 KiB clusters: 4 Mi L1 entries of 512 MiB each = 2 PiB.
    let max = (1u64 << 22) << 29;
    h.size = max;
    h.l1_size = 1 << 22;
    h.validate_layout(u64::MAX).unwrap();
    h.size = max + 1;
    assert!(matches!(
        h.validate_layout(u64::MAX),
        Err(FormatError::L1TooSmall { .. })
    ));
    h.size = u64::MAX;
    let e = h.validate_layout(u64::MAX).unwrap_err();
    assert_eq!(e, FormatError::ImageTooBig(u64::MAX));
    assert_eq!(e.to_string(), "Image is too big");
    // Extended L2 halves the coverage of an L1 entry.
    let mut e = base_v3();
    e.incompatible_features = INCOMPAT_EXTENDED_L2;
    e.size = max;
    e.l1_size = 1 << 22;
    assert!(matches!(
        e.validate_layout(u64::MAX),
        Err(FormatError::L1TooSmall { .. })
    ));
    e.size = max / 2;
    e.validate_layout(u64::MAX).unwrap();
    e.l1_size -= 1;
    assert_eq!(
        e.validate_layout(u64::MAX),
        Err(FormatError::L1TooSmall {
            l1_size: (1 << 22) - 1,
            needed: 1 << 22
        })
    );
}

#[test]
fn layout_refcount_table_rules() {
    let h = base_v3();
    let mut m = h.clone();
    m.refcount_table_offset = 0x10008;
    assert_eq!(
        m.validate_layout(0x40000),
        Err(FormatError::Misaligned {
            what: "refcount table",
            offset: 0x10008
        })
    );
    let mut m = h.clone();
    m.refcount_table_clusters = 4;
    assert!(matches!(
        m.validate_layout(0x40000),
        Err(FormatError::PastEnd {
            what: "refcount table",
            ..
        })
    ));
    let mut m = h.clone();
    m.refcount_table_clusters = 128; // 8 MiB
    m.validate_layout(1 << 30).unwrap();
    m.refcount_table_clusters = 129;
    assert!(matches!(
        m.validate_layout(1 << 30),
        Err(FormatError::TooLarge {
            limit: 0x80_0000,
            ..
        })
    ));
    m.refcount_table_clusters = u32::MAX;
    m.cluster_bits = 21;
    m.l1_table_offset = 0x20_0000;
    assert!(matches!(
        m.validate_layout(u64::MAX),
        Err(FormatError::TooLarge { .. })
    ));
    let mut m = h.clone();
    m.refcount_table_clusters = 0;
    assert!(matches!(
        m.validate_layout(0x40000),
        Err(FormatError::InvalidHeader(_))
    ));
}

#[test]
fn layout_snapshot_table_rules() {
    let mut h = base_v3();
    h.snapshots_offset = 0x123;
    h.validate_layout(0x40000).unwrap(); // no snapshots: not checked
    h.nb_snapshots = 1;
    assert_eq!(
        h.validate_layout(0x40000),
        Err(FormatError::Misaligned {
            what: "snapshot table",
            offset: 0x123
        })
    );
    h.snapshots_offset = 0x40000;
    assert!(matches!(
        h.validate_layout(0x40000),
        Err(FormatError::PastEnd {
            what: "snapshot table",
            ..
        })
    ));
    h.validate_layout(0x40000 + 40).unwrap();
    h.nb_snapshots = 65537;
    assert!(matches!(
        h.validate_layout(u64::MAX),
        Err(FormatError::TooLarge { limit: 65536, .. })
    ));
}

#[test]
fn layout_bitmaps_extension_rules() {
    let mut h = base_v3();
    h.extensions
        .push(HeaderExtension::Bitmaps(BitmapsExtension {
            nb_bitmaps: 0,
            directory_size: 64,
            directory_offset: 0x30008,
        }));
    // Not declared consistent: not checked.
    h.validate_layout(0x40000).unwrap();
    h.autoclear_features = AUTOCLEAR_BITMAPS;
    assert!(matches!(
        h.validate_layout(0x40000),
        Err(FormatError::BadExtension { .. })
    ));
    if let Some(HeaderExtension::Bitmaps(b)) = h.extensions.last_mut() {
        b.nb_bitmaps = 1;
    }
    assert!(matches!(
        h.validate_layout(0x40000),
        Err(FormatError::Misaligned {
            what: "bitmap directory",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// serialize.

#[test]
fn serialize_errors() {
    // The feature table does not fit a 512-byte cluster after a longer header.
    let mut h = base_v3();
    h.cluster_bits = 9;
    h.header_length = 120;
    h.unknown_additional = vec![0; 8];
    assert!(matches!(
        h.serialize(),
        Err(FormatError::HeaderTooLarge {
            cluster_size: 512,
            ..
        })
    ));
    // A backing name that would overlap the extensions.
    let mut h = base_v3();
    h.backing_file = Some("base".into());
    h.backing_file_offset = 0x100;
    h.backing_file_size = 4;
    assert!(matches!(h.serialize(), Err(FormatError::InvalidHeader(_))));
    h.fix_backing_location();
    assert_eq!(h.backing_file_offset, 0x200);
    let b = h.serialize().unwrap();
    assert_eq!(&b[0x200..], b"base");
    assert_eq!(Header::parse(&b).unwrap(), h);
    // A backing name past the cluster.
    h.backing_file_offset = 65534;
    assert!(matches!(
        h.serialize(),
        Err(FormatError::HeaderTooLarge { need: 65538, .. })
    ));
    // Inconsistent size.
    h.fix_backing_location();
    h.backing_file_size = 3;
    assert!(matches!(h.serialize(), Err(FormatError::InvalidHeader(_))));
    // Duplicate extensions.
    let mut h = base_v3();
    h.extensions.push(HeaderExtension::qemu_feature_table());
    assert_eq!(
        h.serialize(),
        Err(FormatError::DuplicateExtension(
            HeaderExtension::FEATURE_NAME_TABLE
        ))
    );
    // v2 with v3 features.
    let mut h = base_v2();
    h.incompatible_features = INCOMPAT_DIRTY;
    assert!(matches!(h.serialize(), Err(FormatError::InvalidHeader(_))));
    // Overlong feature name.
    let mut h = base_v3();
    h.extensions = vec![HeaderExtension::FeatureNameTable(vec![FeatureName {
        kind: FeatureKind::Incompatible,
        bit: 0,
        name: "y".repeat(47),
    }])];
    assert!(matches!(
        h.serialize(),
        Err(FormatError::BadExtension { .. })
    ));
    // zstd needs the compression type byte.
    let mut h = base_v3();
    h.header_length = 104;
    h.compression_type = CompressionType::Zstd;
    assert!(matches!(h.serialize(), Err(FormatError::InvalidHeader(_))));
}

#[test]
fn v2_with_backing_file() {
    let mut h = base_v2();
    h.backing_file = Some("/images/base image.qcow2".into());
    h.extensions = vec![HeaderExtension::BackingFormat("qcow2".into())];
    h.fix_backing_location();
    assert_eq!(h.backing_file_offset, 72 + 16 + 8);
    let b = h.serialize().unwrap();
    assert_eq!(Header::parse(&b).unwrap(), h);
}

// ---------------------------------------------------------------------------------------------
// Round trips.

fn known_kind(k: u32) -> bool {
    matches!(
        k,
        0 | HeaderExtension::BACKING_FORMAT
            | HeaderExtension::FEATURE_NAME_TABLE
            | HeaderExtension::BITMAPS
            | HeaderExtension::FULL_DISK_ENCRYPTION
            | HeaderExtension::EXTERNAL_DATA_FILE
    )
}

fn arb_extension() -> impl Strategy<Value = HeaderExtension> {
    prop_oneof![
        "\\PC{0,12}".prop_map(HeaderExtension::BackingFormat),
        "\\PC{0,12}".prop_map(HeaderExtension::ExternalDataFile),
        prop::collection::vec((0u8..5, any::<u8>(), "[a-zA-Z0-9 _]{0,46}"), 0..10).prop_map(|v| {
            HeaderExtension::FeatureNameTable(
                v.into_iter()
                    .map(|(k, bit, name)| FeatureName {
                        kind: FeatureKind::from_byte(k),
                        bit,
                        name,
                    })
                    .collect(),
            )
        }),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(n, s, o)| {
            HeaderExtension::Bitmaps(BitmapsExtension {
                nb_bitmaps: n,
                directory_size: s,
                directory_offset: o,
            })
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, length)| HeaderExtension::FullDiskEncryption { offset, length }),
        (
            any::<u32>().prop_filter("unknown type", |k| !known_kind(*k)),
            prop::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(kind, data)| HeaderExtension::Unknown { kind, data }),
    ]
}

fn arb_header() -> impl Strategy<Value = Header> {
    let fields = (
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
    );
    let v3 = (
        any::<u64>(),
        any::<u64>(),
        0u32..=6,
        0usize..5,
        prop::collection::vec(any::<u8>(), 24),
        any::<bool>(),
        any::<bool>(),
        0u64..8,
    );
    let rest = (
        any::<bool>(),
        9u32..=21,
        prop::collection::vec(arb_extension(), 0..6),
        prop::option::of("\\PC{0,40}"),
        any::<u32>(),
    );
    (fields, v3, rest).prop_map(
        |(
            (size, l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off),
            (compat, autoclear, order, hl_choice, additional, zstd, ext_l2, basic_incompat),
            (is_v3, cluster_bits, exts, backing, stray_backing_size),
        )| {
            let mut extensions: Vec<HeaderExtension> = Vec::new();
            for e in exts {
                if !extensions.iter().any(|x| x.kind() == e.kind()) {
                    extensions.push(e);
                }
            }
            let mut h = Header {
                version: 2,
                backing_file_offset: 0,
                backing_file_size: stray_backing_size,
                cluster_bits,
                size,
                crypt_method: 0,
                l1_size,
                l1_table_offset: l1_off,
                refcount_table_offset: rt_off,
                refcount_table_clusters: rt_clusters,
                nb_snapshots: nb_snap,
                snapshots_offset: snap_off,
                incompatible_features: 0,
                compatible_features: 0,
                autoclear_features: 0,
                refcount_order: 4,
                header_length: 72,
                compression_type: CompressionType::Zlib,
                unknown_additional: Vec::new(),
                extensions,
                backing_file: backing,
            };
            if is_v3 {
                h.version = 3;
                h.compatible_features = compat;
                h.autoclear_features = autoclear;
                h.refcount_order = order;
                h.header_length = if hl_choice == 0 {
                    104
                } else {
                    112 + 8 * (hl_choice as u32 - 1)
                };
                h.unknown_additional =
                    additional[..(h.header_length as usize).saturating_sub(112)].to_vec();
                h.incompatible_features = basic_incompat; // dirty, corrupt, data file
                if zstd && h.header_length > 104 {
                    h.compression_type = CompressionType::Zstd;
                    h.incompatible_features |= INCOMPAT_COMPRESSION;
                }
                if ext_l2 && cluster_bits >= 14 {
                    h.incompatible_features |= INCOMPAT_EXTENDED_L2;
                }
            }
            if h.backing_file.is_some() {
                h.fix_backing_location();
            }
            h
        },
    )
}

proptest! {
    #[test]
    fn header_round_trip(h in arb_header()) {
        let r = h.serialize();
        prop_assume!(!matches!(r, Err(FormatError::HeaderTooLarge { .. })));
        let bytes = r.unwrap();
        let parsed = Header::parse(&bytes).unwrap();
        prop_assert_eq!(&parsed, &h);
        prop_assert_eq!(parsed.serialize().unwrap(), bytes.clone());
        // The whole cluster parses the same.
        let mut cluster = bytes.clone();
        cluster.resize(1 << h.cluster_bits, 0);
        prop_assert_eq!(Header::parse(&cluster).unwrap(), h.clone());
        // Any shorter prefix is an error, not a panic (and never a different header).
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            prop_assert!(Header::parse(&bytes[..cut]).is_err());
        }
    }
}

/// A resize rewrites the size, and an L1 table that moved takes effect, by writing these
/// byte ranges of the serialized header alone: they must hold exactly those fields.
#[test]
fn field_ranges_hold_the_size_and_the_l1_fields() {
    for mut h in [base_v3(), base_v2()] {
        h.size = 0x0102_0304_0506_0708;
        h.l1_size = 0x1112_1314;
        h.l1_table_offset = 0x2122_2324_2526_2728;
        let b = h.serialize().unwrap();
        assert_eq!(
            b[Header::SIZE_FIELD].to_vec(),
            h.size.to_be_bytes().to_vec()
        );
        let mut l1 = h.l1_size.to_be_bytes().to_vec();
        l1.extend(h.l1_table_offset.to_be_bytes());
        assert_eq!(b[Header::L1_FIELDS].to_vec(), l1);
        const { assert!(Header::SIZE_FIELD.end <= 512 && Header::L1_FIELDS.end <= 512) };
    }
}
