//! Hostile input: arbitrary and mutated bytes must give errors, never panics, and whatever
//! parses must serialize back to something that parses the same.

mod common;

use common::*;
use proptest::prelude::*;
use qcow2_format::{
    BitmapDirectoryEntry, ClusterGeometry, CompressedDescriptor, Header, HeaderExtension, L1Entry,
    L2Entry, Snapshot,
};

fn seeds() -> Vec<Vec<u8>> {
    let mut with_backing = base_v3();
    with_backing.backing_file = Some("backing.qcow2".into());
    with_backing
        .extensions
        .insert(0, HeaderExtension::BackingFormat("qcow2".into()));
    with_backing.extensions.push(HeaderExtension::Unknown {
        kind: 0xdead_beef,
        data: vec![1, 2, 3],
    });
    with_backing.header_length = 120;
    with_backing.unknown_additional = vec![9; 8];
    with_backing.fix_backing_location();
    let mut v = vec![
        hex(QEMU_1G),
        hex(QEMU_BACKING),
        hex(QEMU_EXT_ZSTD),
        hex(QEMU_SMALL),
        hex(QEMU_V2),
        hex(QEMU_SNAP_HEADER),
        with_backing.serialize().unwrap(),
    ];
    for b in &mut v {
        b.resize(b.len() + 64, 0);
    }
    v
}

/// Parses; if that works, exercises everything that works on a parsed header.
fn exercise_header(buf: &[u8], file_len: u64) -> Result<(), TestCaseError> {
    if let Ok(h) = Header::parse(buf) {
        let _ = h.geometry();
        let _ = h.refcount_width();
        let _ = h.validate_layout(file_len);
        let _ = h.extensions_end();
        prop_assert!(h.unknown_incompatible().is_none());
        if let Ok(b) = h.serialize() {
            prop_assert_eq!(Header::parse(&b).unwrap(), h.clone());
        }
        let mut fixed = h.clone();
        fixed.fix_backing_location();
        if let Ok(b) = fixed.serialize() {
            prop_assert_eq!(Header::parse(&b).unwrap(), fixed);
        }
    }
    Ok(())
}

fn mutate(mut b: Vec<u8>, muts: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let len = b.len();
    for &(i, v) in muts {
        b[i % len] = v;
    }
    if let Some(c) = cut {
        b.truncate(c % (len + 1));
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn header_arbitrary_bytes(buf in prop::collection::vec(any::<u8>(), 0..1024), file_len in any::<u64>()) {
        exercise_header(&buf, file_len)?;
    }

    #[test]
    fn header_arbitrary_bytes_with_magic(
        mut buf in prop::collection::vec(any::<u8>(), 8..1024),
        v3 in any::<bool>(),
        bits in 9u32..=12,
        file_len in any::<u64>(),
    ) {
        buf[..4].copy_from_slice(&0x5146_49fbu32.to_be_bytes());
        buf[4..8].copy_from_slice(&(if v3 { 3u32 } else { 2 }).to_be_bytes());
        if buf.len() >= 24 {
            buf[20..24].copy_from_slice(&bits.to_be_bytes());
        }
        exercise_header(&buf, file_len)?;
    }

    #[test]
    fn header_mutated(
        seed in 0usize..7,
        muts in prop::collection::vec((any::<usize>(), any::<u8>()), 0..12),
        cut in prop::option::of(any::<usize>()),
        file_len in any::<u64>(),
    ) {
        let b = mutate(seeds().swap_remove(seed), &muts, cut);
        exercise_header(&b, file_len)?;
    }

    #[test]
    fn header_mutated_fields(
        seed in 0usize..7,
        field in prop::sample::select(vec![8usize, 16, 20, 24, 36, 40, 48, 56, 60, 64, 72, 96, 100, 112, 116, 0x74, 0x78, 0x7c]),
        value in any::<u32>(),
    ) {
        // Small and boundary values in 32-bit fields reach more checks than random bytes.
        let mut b = seeds().swap_remove(seed);
        let value = match value % 4 { 0 => value % 1024, 1 => u32::MAX - value % 8, _ => value };
        if field + 4 <= b.len() {
            b[field..field + 4].copy_from_slice(&value.to_be_bytes());
        }
        exercise_header(&b, u64::from(value))?;
    }

    #[test]
    fn snapshot_table_arbitrary(buf in prop::collection::vec(any::<u8>(), 0..2048), count in any::<u32>()) {
        let count = if count % 2 == 0 { count % 8 } else { count };
        if let Ok(t) = Snapshot::parse_table(&buf, count) {
            let b = Snapshot::serialize_table(&t);
            prop_assert_eq!(Snapshot::parse_table(&b, count).unwrap(), t);
        }
        let _ = Snapshot::entry_len(&buf, 0);
    }

    #[test]
    fn snapshot_table_mutated(
        muts in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<usize>()),
        count in 0u32..4,
    ) {
        let b = mutate(hex(QEMU_SNAP_TABLE), &muts, cut);
        if let Ok(t) = Snapshot::parse_table(&b, count) {
            let b = Snapshot::serialize_table(&t);
            prop_assert_eq!(Snapshot::parse_table(&b, count).unwrap(), t);
        }
    }

    #[test]
    fn bitmap_directory_arbitrary(buf in prop::collection::vec(any::<u8>(), 0..2048), count in any::<u32>()) {
        let count = if count % 2 == 0 { count % 8 } else { count };
        if let Ok(d) = BitmapDirectoryEntry::parse_directory(&buf, count) {
            let b = BitmapDirectoryEntry::serialize_directory(&d);
            prop_assert_eq!(b, buf);
            for (i, e) in d.iter().enumerate() {
                let _ = e.validate(i, 65536, u64::MAX);
                let _ = e.validate(i, 512, 0);
            }
        }
    }

    #[test]
    fn bitmap_directory_mutated(
        muts in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<usize>()),
        count in 0u32..4,
        disk in any::<u64>(),
    ) {
        let b = mutate(hex(QEMU_BITMAP_DIR), &muts, cut);
        if let Ok(d) = BitmapDirectoryEntry::parse_directory(&b, count) {
            // The directory has no slack: what parses serializes to the same bytes.
            prop_assert_eq!(BitmapDirectoryEntry::serialize_directory(&d), b);
            for (i, e) in d.iter().enumerate() {
                let _ = e.validate(i, 65536, disk);
            }
        }
    }

    #[test]
    fn entries_arbitrary(bits in 9u32..=21, ext in any::<bool>(), word in any::<u64>(), bm in any::<u64>(), off in any::<u64>(), count in any::<u64>(), len in any::<u64>()) {
        let g = ClusterGeometry::new(bits, ext && bits >= 14).unwrap();
        let _ = L1Entry(word).l2_offset(&g);
        let _ = L2Entry { word, bitmap: bm }.decode(&g, true);
        if let Ok(d) = CompressedDescriptor::decode(word, &g) {
            prop_assert!(d.read_len() >= 1);
            let _ = d.host_clusters(&g);
        }
        // Descriptors built by hand with absurd values must not overflow either.
        let d = CompressedDescriptor { host_offset: off, additional_sectors: count };
        let _ = (d.read_len(), d.host_clusters(&g), d.span_start(), d.encode(&g));
        let d = CompressedDescriptor::for_range(off, len);
        let _ = (d.read_len(), d.host_clusters(&g));
    }
}
