//! Snapshot table and bitmap directory.

mod common;

use common::*;
use proptest::prelude::*;
use qcow2_format::{BitmapDirectoryEntry, BitmapTableEntry, FormatError, HostOffset, Snapshot};

// ---------------------------------------------------------------------------------------------
// Snapshots

#[test]
fn qemu_snapshot_table() {
    let bytes = hex(QEMU_SNAP_TABLE);
    let t = Snapshot::parse_table(&bytes, 2).unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(t[0].id, "1");
    assert_eq!(t[0].name, "first");
    assert_eq!(t[0].l1_table_offset, 0x40000);
    assert_eq!(t[0].l1_size, 1);
    assert_eq!(t[1].id, "2");
    assert_eq!(t[1].name, "second");
    assert_eq!(t[1].l1_table_offset, 0x60000);
    for s in &t {
        assert_eq!(s.extra_data.len(), 24);
        assert_eq!(s.vm_state_size, 0);
        assert_eq!(s.disk_size, Some(16 << 20));
        assert_eq!(s.icount, Some(0));
        assert_eq!(s.vm_clock_nsec, 0);
        assert_eq!(s.serialized_len(), 72);
    }
    assert_eq!(Snapshot::serialize_table(&t), bytes);
    // Entry by entry, as a reader that fetches the table progressively would.
    assert_eq!(Snapshot::entry_len(&bytes, 0), Ok(40 + 24 + 1 + 5));
    assert_eq!(Snapshot::entry_len(&bytes[72..], 1), Ok(40 + 24 + 1 + 6));
    // Only one entry requested; trailing bytes are ignored.
    assert_eq!(Snapshot::parse_table(&bytes, 1).unwrap(), t[..1]);
    assert_eq!(Snapshot::parse_table(&bytes, 0).unwrap(), vec![]);
}

#[test]
fn snapshot_entry_from_repaired_parts() {
    let bytes = hex(QEMU_SNAP_TABLE);
    let t = Snapshot::parse_table(&bytes, 2).unwrap();
    // The declared lengths, without QEMU's limit on extra data.
    let mut big = bytes[72..112].to_vec();
    big[36..40].copy_from_slice(&5000u32.to_be_bytes());
    assert_eq!(Snapshot::declared_lengths(&big), Ok((1, 6, 5000)));
    assert!(matches!(
        Snapshot::entry_len(&big, 1),
        Err(FormatError::SnapshotExtraData {
            index: 1,
            size: 5000,
            limit: 1024
        })
    ));
    assert!(matches!(
        Snapshot::declared_lengths(&big[..39]),
        Err(FormatError::Truncated { .. })
    ));
    // Rebuilt from its parts, with the extra data as kept: the same entry.
    let extra = &bytes[112..136];
    let s = Snapshot::parse_parts(&big, extra, b"2", b"second", 1).unwrap();
    assert_eq!(s, t[1]);
    // Cut to 1 KiB, unknown bytes kept.
    let mut kept = extra.to_vec();
    kept.resize(1024, 0xab);
    let s = Snapshot::parse_parts(&big, &kept, b"2", b"", 1).unwrap();
    assert_eq!((s.extra_data.len(), s.name.as_str()), (1024, ""));
    assert_eq!(s.disk_size, t[1].disk_size);
    assert!(matches!(
        Snapshot::parse_parts(&big, &vec![0; 1025], b"2", b"x", 1),
        Err(FormatError::SnapshotExtraData { index: 1, .. })
    ));
    assert!(matches!(
        Snapshot::parse_parts(&big, extra, b"\xff", b"x", 1),
        Err(FormatError::BadSnapshot { index: 1, .. })
    ));
}

#[test]
fn snapshot_table_errors() {
    let bytes = hex(QEMU_SNAP_TABLE);
    // Truncated anywhere.
    for len in [0, 39, 40, 69, 72, 100, 142] {
        assert!(
            matches!(
                Snapshot::parse_table(&bytes[..len], 2),
                Err(FormatError::Truncated { .. })
            ),
            "len {len}"
        );
    }
    // The last entry's padding need not be there.
    assert_eq!(Snapshot::parse_table(&bytes[..143], 2).unwrap().len(), 2);
    // More entries than bytes.
    assert!(matches!(
        Snapshot::parse_table(&bytes, 3),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        Snapshot::parse_table(&bytes, 65537),
        Err(FormatError::TooLarge { .. })
    ));
    assert!(matches!(
        Snapshot::parse_table(&bytes, u32::MAX),
        Err(FormatError::TooLarge { .. })
    ));
    // Extra data above 1 KiB.
    let mut b = bytes.clone();
    put_u32(&mut b, 36, 1025);
    assert!(matches!(
        Snapshot::parse_table(&b, 2),
        Err(FormatError::SnapshotExtraData { index: 0, .. })
    ));
    // A huge extra data size in the second entry.
    let mut b = bytes.clone();
    put_u32(&mut b, 72 + 36, u32::MAX);
    assert!(matches!(
        Snapshot::parse_table(&b, 2),
        Err(FormatError::SnapshotExtraData { index: 1, .. })
    ));
    // A name running past the buffer.
    let mut b = bytes.clone();
    b[72 + 14] = 0xff;
    assert!(matches!(
        Snapshot::parse_table(&b, 2),
        Err(FormatError::Truncated { .. })
    ));
    // Not UTF-8.
    let mut b = bytes.clone();
    b[72 + 40 + 24] = 0xff;
    assert!(matches!(
        Snapshot::parse_table(&b, 2),
        Err(FormatError::BadSnapshot { index: 1, .. })
    ));
}

#[test]
fn snapshot_extra_data_variants() {
    let base = Snapshot::parse_table(&hex(QEMU_SNAP_TABLE), 1).unwrap()[0].clone();
    // No extra data (old v2 images): the 32-bit VM state size is all there is.
    let s = Snapshot {
        vm_state_size: 0x1234,
        disk_size: None,
        icount: None,
        extra_data: vec![],
        ..base.clone()
    };
    let b = Snapshot::serialize_table(std::slice::from_ref(&s));
    assert_eq!(b.len(), 48);
    assert_eq!(&b[32..40], &[0, 0, 0x12, 0x34, 0, 0, 0, 0]);
    assert_eq!(Snapshot::parse_table(&b, 1).unwrap(), vec![s.clone()]);
    // A VM state that does not fit 32 bits forces the 64-bit field; the legacy one is 0.
    let big = Snapshot {
        vm_state_size: 5 << 32,
        ..s.clone()
    };
    let b = Snapshot::serialize_table(std::slice::from_ref(&big));
    assert_eq!(&b[32..36], &[0, 0, 0, 0]);
    assert_eq!(&b[36..40], &[0, 0, 0, 8]);
    assert_eq!(&b[40..48], &(5u64 << 32).to_be_bytes());
    let parsed = Snapshot::parse_table(&b, 1).unwrap();
    assert_eq!(parsed[0].vm_state_size, 5 << 32);
    assert_eq!(parsed[0].extra_data.len(), 8);
    // Unknown trailing extra data is preserved byte for byte; known fields win.
    let mut extra = vec![0u8; 24];
    extra.extend_from_slice(b"future!!xy");
    let s = Snapshot {
        extra_data: extra,
        vm_state_size: 7,
        disk_size: Some(1 << 30),
        icount: Some(u64::MAX),
        ..base.clone()
    };
    let b = Snapshot::serialize_table(std::slice::from_ref(&s));
    let parsed = Snapshot::parse_table(&b, 1).unwrap();
    assert_eq!(&parsed[0].extra_data[24..], b"future!!xy");
    assert_eq!(parsed[0].vm_state_size, 7);
    assert_eq!(parsed[0].disk_size, Some(1 << 30));
    assert_eq!(parsed[0].icount, Some(u64::MAX));
    assert_eq!(Snapshot::serialize_table(&parsed), b);
    // Over the limit.
    let s = Snapshot {
        extra_data: vec![0; 1025],
        ..base
    };
    assert!(matches!(
        Snapshot::try_serialize_table(&[s]),
        Err(FormatError::BadSnapshot { .. })
    ));
}

fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (
        (any::<u64>(), any::<u32>(), "\\PC{0,8}", "\\PC{0,20}"),
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>()),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(
            |(
                (l1_table_offset, l1_size, id, name),
                (date_sec, date_nsec, vm_clock, legacy),
                extra,
            )| {
                // Decode the known fields from the extra data the way the format defines them.
                let field = |i: usize| {
                    (extra.len() >= i * 8 + 8)
                        .then(|| u64::from_be_bytes(extra[i * 8..i * 8 + 8].try_into().unwrap()))
                };
                Snapshot {
                    l1_table_offset,
                    l1_size,
                    id,
                    name,
                    date_sec,
                    date_nsec,
                    vm_clock_nsec: vm_clock,
                    vm_state_size: field(0).unwrap_or(u64::from(legacy)),
                    disk_size: field(1),
                    icount: field(2),
                    extra_data: extra,
                }
            },
        )
}

proptest! {
    #[test]
    fn snapshot_table_round_trip(t in prop::collection::vec(arb_snapshot(), 0..6)) {
        let b = Snapshot::serialize_table(&t);
        prop_assert_eq!(b.len() % 8, 0);
        prop_assert_eq!(b.len(), t.iter().map(|s| s.serialized_len()).sum::<usize>());
        let parsed = Snapshot::parse_table(&b, t.len() as u32).unwrap();
        prop_assert_eq!(&parsed, &t);
        prop_assert_eq!(Snapshot::serialize_table(&parsed), b);
    }
}

// ---------------------------------------------------------------------------------------------
// Bitmaps

#[test]
fn qemu_bitmap_directory() {
    let bytes = hex(QEMU_BITMAP_DIR);
    let d = BitmapDirectoryEntry::parse_directory(&bytes, 2).unwrap();
    assert_eq!(
        d,
        vec![
            BitmapDirectoryEntry {
                table_offset: 0x90000,
                table_size: 1,
                flags: BitmapDirectoryEntry::AUTO,
                bitmap_type: 1,
                granularity_bits: 16,
                name: "bm0".into(),
                extra_data: vec![],
            },
            BitmapDirectoryEntry {
                table_offset: 0xa0000,
                table_size: 1,
                flags: 0,
                bitmap_type: 1,
                granularity_bits: 12,
                name: "other".into(),
                extra_data: vec![],
            },
        ]
    );
    assert_eq!(BitmapDirectoryEntry::serialize_directory(&d), bytes);
    for (i, e) in d.iter().enumerate() {
        e.validate(i, 65536, 16 << 20).unwrap();
    }
    // One table cluster of 4 KiB granules covers 64 KiB * 8 * 4 KiB = 2 GiB.
    d[1].validate(1, 65536, 2 << 30).unwrap();
    assert!(matches!(
        d[1].validate(1, 65536, (2 << 30) + 1),
        Err(FormatError::BadBitmap { index: 1, .. })
    ));
}

#[test]
fn bitmap_directory_errors() {
    let bytes = hex(QEMU_BITMAP_DIR);
    let parse = |b: &[u8], n| BitmapDirectoryEntry::parse_directory(b, n);
    // Trailing bytes / missing entries.
    assert!(matches!(
        parse(&bytes, 1),
        Err(FormatError::BadBitmap { index: 1, .. })
    ));
    assert!(matches!(
        parse(&bytes, 3),
        Err(FormatError::Truncated { .. })
    ));
    for len in [0, 23, 24, 31, 56, 63] {
        assert!(
            matches!(parse(&bytes[..len], 2), Err(FormatError::Truncated { .. })),
            "len {len}"
        );
    }
    assert!(matches!(
        parse(&bytes, 65536),
        Err(FormatError::TooLarge { .. })
    ));
    // Reserved flags.
    let mut b = bytes.clone();
    b[15] |= 8;
    assert!(matches!(
        parse(&b, 2),
        Err(FormatError::BadBitmap { index: 0, .. })
    ));
    // Empty name.
    let mut b = bytes.clone();
    b[0x20 + 19] = 0;
    assert!(matches!(
        parse(&b, 2),
        Err(FormatError::BadBitmap { index: 1, .. })
    ));
    // Non-zero padding.
    let mut b = bytes.clone();
    b[0x1f] = 1;
    assert!(matches!(
        parse(&b, 2),
        Err(FormatError::BadBitmap { index: 0, .. })
    ));
    // Name not UTF-8.
    let mut b = bytes.clone();
    b[0x18] = 0xff;
    assert!(matches!(
        parse(&b, 2),
        Err(FormatError::BadBitmap { index: 0, .. })
    ));
    // Duplicate names.
    let mut d = parse(&bytes, 2).unwrap();
    d[1].name = "bm0".into();
    assert!(matches!(
        BitmapDirectoryEntry::try_serialize_directory(&d),
        Err(FormatError::BadBitmap { index: 1, .. })
    ));
    let mut b = bytes.clone();
    b[0x20 + 18..0x20 + 20].copy_from_slice(&3u16.to_be_bytes());
    b[0x38..0x3b].copy_from_slice(b"bm0");
    b[0x3b..0x40].fill(0);
    assert!(matches!(
        parse(&b, 2),
        Err(FormatError::BadBitmap { index: 1, .. })
    ));
    // Huge extra data size.
    let mut b = bytes.clone();
    put_u32(&mut b, 20, u32::MAX);
    assert!(matches!(parse(&b, 2), Err(FormatError::Truncated { .. })));
    // Semantic checks.
    let e = parse(&bytes, 2).unwrap()[0].clone();
    let bad = |f: &dyn Fn(&mut BitmapDirectoryEntry)| {
        let mut x = e.clone();
        f(&mut x);
        x.validate(0, 65536, 16 << 20)
    };
    assert!(bad(&|x| x.table_offset = 0).is_err());
    assert!(matches!(
        bad(&|x| x.table_offset = 0x90200),
        Err(FormatError::Misaligned { .. })
    ));
    assert!(bad(&|x| x.table_size = 0).is_err());
    assert!(bad(&|x| x.bitmap_type = 2).is_err());
    assert!(bad(&|x| x.granularity_bits = 8).is_err());
    assert!(bad(&|x| x.granularity_bits = 32).is_err());
    assert!(bad(&|x| x.table_size = 0x2001).is_err()); // > 512 MiB of data
}

#[test]
fn bitmap_table_entries() {
    let cs = 65536;
    assert_eq!(BitmapTableEntry(0).decode(cs), Ok(Err(false)));
    assert_eq!(BitmapTableEntry(1).decode(cs), Ok(Err(true)));
    assert_eq!(
        BitmapTableEntry(0x90000).decode(cs),
        Ok(Ok(HostOffset(0x90000)))
    );
    assert!(matches!(
        BitmapTableEntry(0x90001).decode(cs),
        Err(FormatError::ReservedBits { .. })
    ));
    for bad in [2u64, 0x100, 1 << 56, 1 << 63] {
        assert!(matches!(
            BitmapTableEntry(0x90000 | bad).decode(cs),
            Err(FormatError::ReservedBits { .. })
        ));
    }
    assert_eq!(
        BitmapTableEntry(0x90200).decode(cs),
        Err(FormatError::Misaligned {
            what: "bitmap data cluster",
            offset: 0x90200
        })
    );
}

fn arb_bitmap() -> impl Strategy<Value = BitmapDirectoryEntry> {
    (
        (
            any::<u64>(),
            any::<u32>(),
            0u32..8,
            any::<u8>(),
            any::<u8>(),
        ),
        "[a-zA-Z0-9_\\-\u{e9}\u{4e2d}]{1,30}",
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(
            |((table_offset, table_size, flags, bitmap_type, granularity_bits), name, extra)| {
                BitmapDirectoryEntry {
                    table_offset,
                    table_size,
                    flags,
                    bitmap_type,
                    granularity_bits,
                    name,
                    extra_data: extra,
                }
            },
        )
}

proptest! {
    #[test]
    fn bitmap_directory_round_trip(d in prop::collection::vec(arb_bitmap(), 0..8)) {
        let mut d = d;
        let mut seen = std::collections::HashSet::new();
        d.retain(|e| seen.insert(e.name.clone()));
        let b = BitmapDirectoryEntry::serialize_directory(&d);
        prop_assert_eq!(b.len(), d.iter().map(|e| e.serialized_len()).sum::<usize>());
        let parsed = BitmapDirectoryEntry::parse_directory(&b, d.len() as u32).unwrap();
        prop_assert_eq!(&parsed, &d);
        prop_assert_eq!(BitmapDirectoryEntry::serialize_directory(&parsed), b);
    }
}
