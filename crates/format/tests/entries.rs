//! L1/L2 entries, subcluster bitmaps, compressed descriptors, refcount entries.

use proptest::prelude::*;
use qcow2_format::{
    ClusterGeometry, CompressedDescriptor, FormatError, HostOffset, L1Entry, L2Entry, L2Mapping,
    RefcountWidth, ReftableEntry, SubclusterBitmap, SubclusterState, L2_COMPRESSED, L2_COPIED,
    L2_ZERO,
};

fn geo(bits: u32, ext: bool) -> ClusterGeometry {
    ClusterGeometry::new(bits, ext).unwrap()
}

// ---------------------------------------------------------------------------------------------
// L1

#[test]
fn l1_entries() {
    let g = geo(16, false);
    assert_eq!(L1Entry(0).l2_offset(&g), Ok(None));
    let e = L1Entry(0x8000_0000_0005_0000);
    assert_eq!(e.l2_offset(&g), Ok(Some(HostOffset(0x50000))));
    assert!(e.copied());
    assert_eq!(L1Entry::new(HostOffset(0x50000), true), e);
    for bad in [1u64, 0x100, 1 << 56, 1 << 62] {
        assert!(matches!(
            L1Entry(0x50000 | bad).l2_offset(&g),
            Err(FormatError::ReservedBits {
                what: "L1 entry",
                ..
            })
        ));
    }
    assert_eq!(
        L1Entry(0x50200).l2_offset(&g),
        Err(FormatError::Misaligned {
            what: "L2 table",
            offset: 0x50200
        })
    );
    assert_eq!(
        L1Entry(0x50200).l2_offset(&geo(9, false)),
        Ok(Some(HostOffset(0x50200)))
    );
    // Largest offset: bit 55.
    assert_eq!(
        L1Entry(0x00FF_FFFF_FFFF_0000).l2_offset(&g),
        Ok(Some(HostOffset(0x00FF_FFFF_FFFF_0000)))
    );
}

// ---------------------------------------------------------------------------------------------
// L2

#[test]
fn l2_read_write_layout() {
    let g = geo(16, false);
    let mut t = vec![0u8; 65536];
    let e = L2Entry {
        word: 0x8000_0000_0007_0000,
        bitmap: 0,
    };
    e.write(&mut t, &g, 3);
    assert_eq!(&t[24..32], &[0x80, 0, 0, 0, 0, 0x07, 0, 0]);
    assert_eq!(L2Entry::read(&t, &g, 3), e);
    e.write(&mut t, &g, 8191);
    assert_eq!(L2Entry::read(&t, &g, 8191), e);

    let g = geo(16, true);
    let mut t = vec![0u8; 65536];
    let e = L2Entry {
        word: 0x8000_0000_0007_0000,
        bitmap: 0x0000_0001_0000_0002,
    };
    e.write(&mut t, &g, 3);
    assert_eq!(&t[48..56], &[0x80, 0, 0, 0, 0, 0x07, 0, 0]);
    assert_eq!(&t[56..64], &[0, 0, 0, 1, 0, 0, 0, 2]);
    assert_eq!(L2Entry::read(&t, &g, 3), e);
    assert_eq!(L2Entry::read(&t, &g, 4095), L2Entry::default());
}

fn std_entry(word: u64) -> L2Entry {
    L2Entry { word, bitmap: 0 }
}

#[test]
fn l2_decode_standard() {
    let g = geo(16, false);
    assert_eq!(std_entry(0).decode(&g, true), Ok(L2Mapping::Unallocated));
    assert_eq!(
        std_entry(0x8000_0000_0007_0000).decode(&g, true),
        Ok(L2Mapping::Normal {
            host: HostOffset(0x70000),
            copied: true
        })
    );
    assert_eq!(
        std_entry(0x70000).decode(&g, false),
        Ok(L2Mapping::Normal {
            host: HostOffset(0x70000),
            copied: false
        })
    );
    // Observed QEMU entries: `write -z` on an allocated cluster, and `write -z -u`.
    assert_eq!(
        std_entry(0x8000_0000_0007_0001).decode(&g, true),
        Ok(L2Mapping::Zero {
            preallocated: Some(HostOffset(0x70000)),
            copied: true
        })
    );
    assert_eq!(
        std_entry(1).decode(&g, true),
        Ok(L2Mapping::Zero {
            preallocated: None,
            copied: false
        })
    );
    // No ZERO flag in v2.
    assert!(matches!(
        std_entry(1).decode(&g, false),
        Err(FormatError::ReservedBits { .. })
    ));
    // External data file, guest cluster 0.
    assert_eq!(
        std_entry(1 << 63).decode(&g, true),
        Ok(L2Mapping::Normal {
            host: HostOffset(0),
            copied: true
        })
    );
    // Reserved bits are read past, as QEMU's qcow2_get_host_offset does (only
    // `qemu-img check` reports them).
    for reserved in [2u64, 0x100, 1 << 56, 1 << 61, 0x3F00_0000_0000_01FE] {
        assert_eq!(
            std_entry(0x8000_0000_0007_0000 | reserved).decode(&g, true),
            Ok(L2Mapping::Normal {
                host: HostOffset(0x70000),
                copied: true
            })
        );
    }
    assert_eq!(
        std_entry(0x70200).decode(&g, true),
        Err(FormatError::Misaligned {
            what: "data cluster",
            offset: 0x70200
        })
    );
    assert!(matches!(
        std_entry(0x70201).decode(&g, true),
        Err(FormatError::ReservedBits { .. }) | Err(FormatError::Misaligned { .. })
    ));
    // Compressed: COPIED is never set by QEMU, but QEMU reads the descriptor without it.
    let comp = (1u64 << 62) | (3u64 << 54) | 0x12345;
    let desc = Ok(L2Mapping::Compressed(CompressedDescriptor {
        host_offset: 0x12345,
        additional_sectors: 3,
    }));
    assert_eq!(std_entry(comp).decode(&g, true), desc);
    assert_eq!(std_entry(comp | (1 << 63)).decode(&g, true), desc);
}

#[test]
fn l2_decode_extended() {
    let g = geo(16, true);
    let e = |word, bitmap| L2Entry { word, bitmap };
    // Observed: fresh write of 1.5 KiB at +512 -> subcluster 0 allocated.
    assert_eq!(
        e(0x8000_0000_0005_0000, 1).decode(&g, true),
        Ok(L2Mapping::Normal {
            host: HostOffset(0x50000),
            copied: true
        })
    );
    // Observed: discard without backing -> offset 0, all zero bits.
    assert_eq!(
        e(0, SubclusterBitmap::ALL_ZERO.0).decode(&g, true),
        Ok(L2Mapping::Unallocated)
    );
    // The ZERO bit is reserved in extended L2, whatever the caller says: QEMU ignores it.
    assert_eq!(e(1, 0).decode(&g, true), Ok(L2Mapping::Unallocated));
    assert_eq!(
        e(0x8000_0000_0005_0001, 1).decode(&g, true),
        Ok(L2Mapping::Normal {
            host: HostOffset(0x50000),
            copied: true
        })
    );
    // Allocated and zero at once.
    assert!(matches!(
        e(0x50000, 0x0000_0004_0000_0004).decode(&g, true),
        Err(FormatError::BadSubclusterBitmap { .. })
    ));
    // Allocated subclusters without a host cluster.
    assert!(matches!(
        e(0, 0x10).decode(&g, true),
        Err(FormatError::BadSubclusterBitmap { .. })
    ));
    // Compressed: QEMU writes the bitmap word as 0, but reads the cluster whatever it says.
    let comp = (1u64 << 62) | 0x12345;
    for bitmap in [0, 1, u64::MAX] {
        assert!(matches!(
            e(comp, bitmap).decode(&g, true),
            Ok(L2Mapping::Compressed(_))
        ));
    }
}

#[test]
fn l2_encode_examples() {
    let g = geo(16, false);
    let z = L2Entry::encode(
        L2Mapping::Zero {
            preallocated: Some(HostOffset(0x70000)),
            copied: true,
        },
        &g,
        0,
    );
    assert_eq!(z.word, 0x8000_0000_0007_0001);
    assert!(matches!(
        L2Entry::try_encode(
            L2Mapping::Normal {
                host: HostOffset(0x70200),
                copied: false
            },
            &g,
            0
        ),
        Err(FormatError::Misaligned { .. })
    ));
    assert!(matches!(
        L2Entry::try_encode(
            L2Mapping::Normal {
                host: HostOffset(1 << 56),
                copied: false
            },
            &g,
            0
        ),
        Err(FormatError::TooLarge { .. })
    ));
    // Extended: no ZERO bit; the bitmap carries the zeros.
    let g = geo(16, true);
    let z = L2Entry::encode(
        L2Mapping::Zero {
            preallocated: Some(HostOffset(0x70000)),
            copied: false,
        },
        &g,
        SubclusterBitmap::ALL_ZERO.0,
    );
    assert_eq!(
        z,
        L2Entry {
            word: 0x70000,
            bitmap: 0xFFFF_FFFF_0000_0000
        }
    );
}

fn arb_geometry() -> impl Strategy<Value = ClusterGeometry> {
    (9u32..=21, any::<bool>()).prop_map(|(bits, ext)| geo(bits, ext && bits >= 14))
}

fn arb_mapping(g: ClusterGeometry) -> impl Strategy<Value = (L2Mapping, u64)> {
    let bits = g.cluster_bits();
    // Host cluster 0 only appears as `Normal { copied: true }` (external data file).
    let host = (1u64..(1 << (56 - bits))).prop_map(move |c| HostOffset(c << bits));
    let x = 62 - (bits - 8);
    let off_limit = (1u64 << x).min(1 << 56);
    let desc = (0..off_limit, 0..(1u64 << (bits - 8))).prop_map(|(o, c)| CompressedDescriptor {
        host_offset: o,
        additional_sectors: c,
    });
    let ext = g.extended_l2();
    let bitmap = any::<u32>().prop_flat_map(move |alloc| {
        any::<u32>().prop_map(move |zero| {
            let zero = zero & !alloc;
            (u64::from(zero) << 32) | u64::from(alloc)
        })
    });
    (
        prop_oneof![
            Just(L2Mapping::Unallocated),
            Just(L2Mapping::Normal {
                host: HostOffset(0),
                copied: true
            }),
            (host.clone(), any::<bool>())
                .prop_map(|(host, copied)| L2Mapping::Normal { host, copied }),
            (prop::option::of(host), any::<bool>()).prop_map(|(preallocated, copied)| {
                L2Mapping::Zero {
                    preallocated,
                    copied,
                }
            }),
            desc.prop_map(L2Mapping::Compressed),
        ],
        bitmap,
    )
        .prop_map(move |(m, bm)| {
            if !ext {
                return (m, 0);
            }
            match m {
                // No ZERO flag in extended L2: express it as a normal mapping.
                L2Mapping::Zero {
                    preallocated: Some(h),
                    copied,
                } => (L2Mapping::Normal { host: h, copied }, bm),
                L2Mapping::Zero {
                    preallocated: None, ..
                }
                | L2Mapping::Unallocated => {
                    (L2Mapping::Unallocated, bm & SubclusterBitmap::ZERO_MASK)
                }
                L2Mapping::Normal { host, copied } => (L2Mapping::Normal { host, copied }, bm),
                L2Mapping::Compressed(d) => (L2Mapping::Compressed(d), 0),
            }
        })
}

proptest! {
    #[test]
    fn l2_encode_decode((g, (m, bm)) in arb_geometry().prop_flat_map(|g| (Just(g), arb_mapping(g)))) {
        let e = L2Entry::try_encode(m, &g, bm).unwrap();
        prop_assert_eq!(e.bitmap, bm);
        prop_assert_eq!(e.decode(&g, true).unwrap(), m);
        // And through the table bytes.
        let mut t = vec![0u8; g.cluster_size() as usize];
        let idx = (g.l2_entries() - 1) as usize;
        e.write(&mut t, &g, idx);
        prop_assert_eq!(L2Entry::read(&t, &g, idx), e);
    }

    #[test]
    fn l2_decode_encode_any_word(g in arb_geometry(), word in any::<u64>(), bm in any::<u64>(), v3 in any::<bool>(), mask in any::<bool>()) {
        let bm = if g.extended_l2() { bm } else { 0 };
        // Masking off the reserved bits makes valid words likely.
        let word = if mask { word & 0xC0FF_FFFF_FFFF_FE01 } else { word };
        let e = L2Entry { word, bitmap: bm };
        // The bits decoding reads past (as QEMU does): they make no difference, and encoding
        // leaves them clear.
        let ignored = if word & L2_COMPRESSED != 0 {
            L2_COPIED
        } else {
            L2Entry::RESERVED_MASK | if g.extended_l2() { L2_ZERO } else { 0 }
        };
        let canonical = L2Entry { word: word & !ignored, bitmap: bm };
        if let Ok(m) = e.decode(&g, v3) {
            prop_assert_eq!(canonical.decode(&g, v3), Ok(m));
            prop_assert_eq!(L2Entry::try_encode(m, &g, bm).unwrap(), canonical);
        }
    }

    #[test]
    fn cluster_start_rounds_down(g in arb_geometry(), off in 0u64..(1 << 62)) {
        let cs = g.cluster_size();
        let start = g.cluster_start(off);
        prop_assert_eq!(start, off / cs * cs);
        prop_assert_eq!(start + g.offset_in_cluster(off), off);
        prop_assert!(g.is_aligned(start));
    }
}

// ---------------------------------------------------------------------------------------------
// Subcluster bitmaps

#[test]
fn subcluster_bitmap() {
    let mut b = SubclusterBitmap::default();
    assert_eq!(b.state(0), SubclusterState::Unallocated);
    b.set(0, SubclusterState::Allocated);
    b.set(31, SubclusterState::Zero);
    assert_eq!(b.0, 0x8000_0000_0000_0001);
    assert_eq!(b.state(0), SubclusterState::Allocated);
    assert_eq!(b.state(31), SubclusterState::Zero);
    b.set(31, SubclusterState::Allocated);
    assert_eq!(b.0, 0x0000_0000_8000_0001);
    b.set(0, SubclusterState::Unallocated);
    assert_eq!(b.0, 0x0000_0000_8000_0000);
    b.validate().unwrap();
    b.set_range(4..8, SubclusterState::Zero);
    assert_eq!(b.zero(), 0xF0);
    assert_eq!(b.allocated(), 0x8000_0000);
    assert!(SubclusterBitmap(0x0000_0001_0000_0001).validate().is_err());
    assert!(SubclusterBitmap::ALL_ALLOCATED.validate().is_ok());
    assert!(SubclusterBitmap::ALL_ZERO.validate().is_ok());
    assert!(SubclusterBitmap(u64::MAX).validate().is_err());
}

proptest! {
    #[test]
    fn subcluster_set_get(init in any::<u64>(), i in 0u32..32, s in 0u8..3) {
        let state = [SubclusterState::Unallocated, SubclusterState::Zero, SubclusterState::Allocated][s as usize];
        let mut b = SubclusterBitmap(init);
        b.set(i, state);
        prop_assert_eq!(b.state(i), state);
        let mask = (1u64 << i) | (1u64 << (32 + i));
        prop_assert_eq!(b.0 & !mask, init & !mask);
    }
}

// ---------------------------------------------------------------------------------------------
// Compressed descriptors

#[test]
fn compressed_splits() {
    // From the spec: x = 62 - (cluster_bits - 8).
    for (bits, x) in [(9, 61), (12, 58), (16, 54), (21, 49)] {
        let g = geo(bits, false);
        assert_eq!(CompressedDescriptor::offset_bits(&g), x);
        let count_max = (1u64 << (bits - 8)) - 1;
        let d = CompressedDescriptor {
            host_offset: 0x1234_5677,
            additional_sectors: count_max,
        };
        let w = d.encode(&g).unwrap();
        assert_eq!(w, 0x1234_5677 | (count_max << x));
        assert_eq!(w >> 62, 0);
        assert_eq!(CompressedDescriptor::decode(w, &g), Ok(d));
        let too_many = CompressedDescriptor {
            additional_sectors: count_max + 1,
            ..d
        };
        assert!(matches!(
            too_many.encode(&g),
            Err(FormatError::TooLarge { .. })
        ));
    }
    // 2 MiB clusters: data must sit below 512 TiB.
    let g = geo(21, false);
    let d = CompressedDescriptor {
        host_offset: 1 << 49,
        additional_sectors: 0,
    };
    assert!(matches!(d.encode(&g), Err(FormatError::TooLarge { .. })));
    // 512 B clusters: offset bits above 55 are reserved.
    let g = geo(9, false);
    assert!(matches!(
        CompressedDescriptor::decode(1 << 56, &g),
        Err(FormatError::ReservedBits { .. })
    ));
    let d = CompressedDescriptor {
        host_offset: 1 << 56,
        additional_sectors: 0,
    };
    assert!(matches!(d.encode(&g), Err(FormatError::TooLarge { .. })));
}

#[test]
fn compressed_ranges() {
    let g = geo(16, false);
    // One sector, starting mid-sector.
    let d = CompressedDescriptor::for_range(0x10064, 100);
    assert_eq!(d.additional_sectors, 0);
    assert_eq!(d.read_len(), 512 - 0x64);
    assert_eq!(d.span_start(), HostOffset(0x10000));
    assert_eq!(d.host_clusters(&g), 1..=1);
    // Crossing a sector boundary: 510 + 4 bytes.
    let d = CompressedDescriptor::for_range(510, 4);
    assert_eq!(d.additional_sectors, 1);
    assert_eq!(d.read_len(), 514);
    // Exactly one aligned sector.
    let d = CompressedDescriptor::for_range(512, 512);
    assert_eq!(d.additional_sectors, 0);
    assert_eq!(d.read_len(), 512);
    // Crossing into the next host cluster.
    let d = CompressedDescriptor::for_range(0x1fff0, 0x20);
    assert_eq!(d.additional_sectors, 1);
    assert_eq!(d.span_start(), HostOffset(0x1fe00));
    assert_eq!(d.read_len(), 0x20200 - 0x1fff0);
    assert_eq!(d.host_clusters(&g), 1..=2);
    // Ending exactly at a cluster boundary does not touch the next cluster.
    let d = CompressedDescriptor::for_range(0x1fe00, 0x200);
    assert_eq!(d.host_clusters(&g), 1..=1);
    // A whole 64 KiB cluster's worth, unaligned: 129 sectors.
    let d = CompressedDescriptor::for_range(0x30100, 0x10000);
    assert_eq!(d.additional_sectors, 128);
    assert_eq!(d.host_clusters(&g), 3..=4);
    assert_eq!(CompressedDescriptor::for_range(7, 0).additional_sectors, 0);
}

proptest! {
    #[test]
    fn compressed_round_trip(bits in 9u32..=21, off in any::<u64>(), count in any::<u64>()) {
        let g = geo(bits, false);
        let x = 62 - (bits - 8);
        let off = off % (1u64 << x).min(1 << 56);
        let count = count % (1u64 << (bits - 8));
        let d = CompressedDescriptor { host_offset: off, additional_sectors: count };
        let w = d.encode(&g).unwrap();
        prop_assert_eq!(w & (3 << 62), 0);
        prop_assert_eq!(CompressedDescriptor::decode(w, &g).unwrap(), d);
        // Independent model of the span.
        let start = off & !511;
        let end = start + (count + 1) * 512;
        prop_assert_eq!(d.span_start().0, start);
        prop_assert_eq!(off + d.read_len(), end);
        prop_assert_eq!(d.host_clusters(&g), (start >> bits)..=((end - 1) >> bits));
    }

    #[test]
    fn compressed_for_range_covers(off in 0u64..(1 << 48), len in 1u64..(1 << 21)) {
        let d = CompressedDescriptor::for_range(off, len);
        // The read span covers the data and ends in the sector holding its last byte.
        prop_assert!(d.read_len() >= len);
        prop_assert_eq!((off + d.read_len() - 1) >> 9, (off + len - 1) >> 9);
    }
}

// ---------------------------------------------------------------------------------------------
// Refcounts

#[test]
fn refcount_layouts() {
    let w16 = RefcountWidth::from_order(4).unwrap();
    let mut b = vec![0u8; 512];
    w16.set(&mut b, 1, 0x1234).unwrap();
    assert_eq!(&b[..4], &[0, 0, 0x12, 0x34]);
    assert_eq!(w16.get(&b, 1), 0x1234);
    assert_eq!(w16.entries_per_block(65536), 32768);
    assert_eq!(
        w16.set(&mut b, 0, 0x10000),
        Err(FormatError::RefcountOverflow {
            value: 0x10000,
            bits: 16
        })
    );

    // Sub-byte widths are LSB first.
    let w1 = RefcountWidth::from_bits(1).unwrap();
    let mut b = vec![0u8; 512];
    w1.set(&mut b, 0, 1).unwrap();
    w1.set(&mut b, 9, 1).unwrap();
    assert_eq!(&b[..2], &[0x01, 0x02]);
    assert_eq!(w1.get(&b, 9), 1);
    assert_eq!(w1.get(&b, 8), 0);
    assert!(w1.set(&mut b, 3, 2).is_err());
    assert_eq!(w1.entries_per_block(512), 4096);

    let w4 = RefcountWidth::from_bits(4).unwrap();
    let mut b = vec![0u8; 512];
    w4.set(&mut b, 1, 0xA).unwrap();
    w4.set(&mut b, 2, 0x3).unwrap();
    assert_eq!(&b[..2], &[0xA0, 0x03]);

    let w2 = RefcountWidth::from_bits(2).unwrap();
    let mut b = vec![0u8; 512];
    w2.set(&mut b, 3, 2).unwrap();
    assert_eq!(b[0], 0x80);

    let w64 = RefcountWidth::from_bits(64).unwrap();
    let mut b = vec![0u8; 512];
    w64.set(&mut b, 1, u64::MAX - 1).unwrap();
    assert_eq!(&b[8..16], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
    assert_eq!(w64.max(), u64::MAX);

    assert!(RefcountWidth::from_bits(3).is_err());
    assert!(RefcountWidth::from_bits(128).is_err());
    assert!(RefcountWidth::from_order(7).is_err());
}

proptest! {
    #[test]
    fn refcount_set_get(order in 0u32..=6, block in prop::collection::vec(any::<u8>(), 512..1024), idx in any::<u64>(), value in any::<u64>()) {
        let w = RefcountWidth::from_order(order).unwrap();
        let entries = block.len() as u64 * 8 / u64::from(w.bits());
        let idx = idx % entries;
        let value = if w.bits() == 64 { value } else { value % (w.max() + 1) };
        let mut b = block.clone();
        w.set(&mut b, idx, value).unwrap();
        prop_assert_eq!(w.get(&b, idx), value);
        for i in 0..entries {
            if i != idx {
                prop_assert_eq!(w.get(&b, i), w.get(&block, i), "neighbour {} changed", i);
            }
        }
        if w.bits() < 64 {
            prop_assert!(w.set(&mut b, idx, w.max() + 1).is_err());
        }
    }
}

#[test]
fn reftable_entries() {
    assert_eq!(ReftableEntry(0).block_offset(65536), Ok(None));
    assert_eq!(
        ReftableEntry(0x20000).block_offset(65536),
        Ok(Some(HostOffset(0x20000)))
    );
    assert!(matches!(
        ReftableEntry(0x20001).block_offset(65536),
        Err(FormatError::ReservedBits { .. })
    ));
    assert_eq!(
        ReftableEntry(0x20200).block_offset(65536),
        Err(FormatError::Misaligned {
            what: "refcount block",
            offset: 0x20200
        })
    );
    assert_eq!(
        ReftableEntry(0x20200).block_offset(512),
        Ok(Some(HostOffset(0x20200)))
    );
    // No upper limit on reftable offsets (bits 9..=63).
    assert_eq!(
        ReftableEntry(1 << 63).block_offset(65536),
        Ok(Some(HostOffset(1 << 63)))
    );
}

// ---------------------------------------------------------------------------------------------
// Lenient views for `qemu-img check`

#[test]
fn cluster_type_classifies_by_bits_alone() {
    use qcow2_format::L2ClusterType as T;
    let std = geo(16, false);
    let ext = geo(16, true);
    let e = |word| L2Entry { word, bitmap: 0 };
    assert_eq!(e(0).cluster_type(&std, false), T::Unallocated);
    assert_eq!(e(1).cluster_type(&std, false), T::ZeroPlain);
    assert_eq!(e(0x5_0001).cluster_type(&std, false), T::ZeroAlloc);
    assert_eq!(
        e(0x8000_0000_0005_0000).cluster_type(&std, false),
        T::Normal
    );
    // Reserved and misaligned bits do not change the class.
    assert_eq!(e(0x5_0200).cluster_type(&std, false), T::Normal);
    assert_eq!(
        e(0x4000_0000_0000_1234).cluster_type(&std, false),
        T::Compressed
    );
    // Extended L2 has no ZERO bit.
    assert_eq!(e(1).cluster_type(&ext, false), T::Unallocated);
    // Offset 0 with COPIED is data only with an external data file.
    assert_eq!(e(1 << 63).cluster_type(&std, false), T::Unallocated);
    assert_eq!(e(1 << 63).cluster_type(&std, true), T::Normal);
    assert_eq!(e(0x8000_0000_0005_0000).raw_offset(), 0x5_0000);
}

#[test]
fn table_entries_read_and_write_big_endian() {
    let mut t = vec![0u8; 24];
    L1Entry(0x8000_0000_0003_0000).write(&mut t, 1);
    ReftableEntry(0x2_0000).write(&mut t, 2);
    assert_eq!(&t[8..16], &[0x80, 0, 0, 0, 0, 3, 0, 0]);
    assert_eq!(L1Entry::read(&t, 1), L1Entry(0x8000_0000_0003_0000));
    assert_eq!(ReftableEntry::read(&t, 2), ReftableEntry(0x2_0000));
    assert_eq!(L1Entry(0x8000_0000_0003_0001).raw_offset(), 0x3_0000);
    assert_eq!(ReftableEntry(0x2_0001).raw_offset(), 0x2_0000);
}

#[test]
fn compressed_decode_unchecked_keeps_high_offset_bits() {
    let g = geo(9, false);
    let word = (1u64 << 57) | 0x1234;
    assert!(CompressedDescriptor::decode(word, &g).is_err());
    let d = CompressedDescriptor::decode_unchecked(word, &g);
    assert_eq!(d.host_offset, (1 << 57) | 0x1234);
    assert_eq!(d.additional_sectors, 0);
}
