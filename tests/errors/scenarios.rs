//! The scenarios of the error-injection tests (`errors_*.rs`): an image, a setup, and the target
//! request whose backend requests fail one by one.

use super::Class::*;
use super::{BitmapOp, Scenario, Source, G, KIB, MIB};

/// An autoclear bit no one knows (bit 40).
const UNKNOWN_AUTOCLEAR: u64 = 1 << 40;

fn set_unknown_autoclear(bytes: &mut [u8]) {
    // autoclear_features: header bytes 88..96 (v3).
    let v = u64::from_be_bytes(bytes[88..96].try_into().unwrap()) | UNKNOWN_AUTOCLEAR;
    bytes[88..96].copy_from_slice(&v.to_be_bytes());
}

/// A writer must clear unknown autoclear bits on disk before it changes the image.
fn unknown_autoclear_clear(bytes: &[u8]) -> Result<(), String> {
    let v = u64::from_be_bytes(bytes[88..96].try_into().unwrap());
    if v & UNKNOWN_AUTOCLEAR != 0 {
        return Err(
            "the engine wrote to the image but left an unknown autoclear bit set on disk".into(),
        );
    }
    Ok(())
}

const C64: u64 = 64 * KIB;

/// Setup of a few allocations over one L2 table, flushed, and a cold cache.
const WRITTEN: &[G] = &[
    G::Write(0, 512 * KIB),
    G::Write(MIB + 100, 300 * KIB),
    G::Flush,
    G::Reopen,
];

/// Every scenario, in order.
pub fn scenarios() -> Vec<Scenario> {
    let groups = [
        write_scenarios(),
        flush_and_close_scenarios(),
        ordering_scenarios(),
        format_scenarios(),
        read_scenarios(),
        image_op_scenarios(),
    ];
    groups.into_iter().flatten().collect()
}

/// Guest writes (allocating, in place, copy-on-write), write-zeroes and discard.
fn write_scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "allocating-write",
            source: Source::Create("", 4 * MIB),
            l2_cache: None,
            setup: &[],
            target: G::Write(C64 + 100, 3 * C64),
            expect: &[DataWrite],
            after: None,
            bugs: &[],
        },
        Scenario {
            name: "in-place-write-l2-load",
            source: Source::Create("", 4 * MIB),
            l2_cache: Some(C64),
            setup: WRITTEN,
            target: G::Write(1000, 200 * KIB),
            expect: &[L2Load, DataWrite],
            after: None,
            bugs: &[],
        },
        Scenario {
            name: "cow-from-backing",
            source: Source::Fixture("chain"),
            l2_cache: None,
            setup: &[],
            target: G::Write(C64 + 4096 + 7, 2 * C64),
            expect: &[BackingRead, DataWrite],
            after: None,
            bugs: &[],
        },
        Scenario {
            // Clusters and L2 tables shared with internal snapshots: copy-on-write.
            name: "cow-snapshot",
            source: Source::Fixture("snapshot"),
            l2_cache: None,
            setup: &[],
            target: G::Write(4096 + 7, 6 * C64),
            expect: &[L2Load, DataRead, DataWrite],
            after: None,
            bugs: &[],
        },
        Scenario {
            name: "cow-compressed",
            source: Source::Fixture("compressed-zlib"),
            l2_cache: None,
            setup: &[],
            target: G::Write(5 * C64 + 99, 3 * C64),
            expect: &[L2Load, DataRead, DataWrite],
            after: None,
            bugs: &[],
        },
        Scenario {
            name: "write-zeroes",
            source: Source::Create("", 4 * MIB),
            l2_cache: Some(C64),
            setup: WRITTEN,
            target: G::Zero(1000, 300 * KIB, true),
            expect: &[L2Load, DataWrite],
            after: None,
            bugs: &[],
        },
        Scenario {
            name: "discard",
            source: Source::Create("", 4 * MIB),
            l2_cache: Some(C64),
            setup: WRITTEN,
            target: G::Discard(0, 700 * KIB),
            expect: &[L2Load],
            after: None,
            bugs: &[],
        },
    ]
}

/// Flushes and closes that write metadata back: refcount blocks and table, L2 and L1 tables,
/// the header of a lazy-refcounts image.
fn flush_and_close_scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            // Allocations, and freed clusters: refcount blocks, L2, L1, decrements, punches.
            name: "flush",
            source: Source::Create("cluster_size=4k", 4 * MIB),
            l2_cache: None,
            // The discard comes last: a write after it that needs new clusters would reuse
            // the discarded ones (a write-back of its own) and leave the flush nothing to punch.
            setup: &[
                G::Write(0, 512 * KIB),
                G::Flush,
                G::Write(2 * MIB, 128 * KIB),
                G::Discard(0, 64 * KIB),
            ],
            target: G::Flush,
            expect: &[RefblockWrite, L2WriteBack, L1Write, Flush, PunchHole],
            after: None,
            bugs: &[],
        },
        Scenario {
            // Two L2 tables of 4 KiB clusters, one cached: the second write writes back.
            name: "write-triggers-write-back",
            source: Source::Create("cluster_size=4k", 4 * MIB),
            l2_cache: Some(4 * KIB),
            setup: &[G::Write(0, 64 * KIB)],
            target: G::Write(2 * MIB + 512, 16 * KIB),
            expect: &[DataWrite, RefblockWrite, L2WriteBack, L1Write, Flush],
            after: None,
            bugs: &[],
        },
        Scenario {
            // 512-byte clusters, 64-bit refcounts: the refcount table covers 2 MiB of file,
            // and this flush moves it.
            name: "refcount-table-growth",
            source: Source::Create("cluster_size=512,refcount_bits=64", 4 * MIB),
            l2_cache: None,
            setup: &[
                G::Write(0, 1800 * KIB),
                G::Flush,
                G::Write(2 * MIB, 600 * KIB),
            ],
            target: G::Flush,
            expect: &[
                RefblockWrite,
                ReftableWrite,
                HeaderWrite,
                L2WriteBack,
                Flush,
            ],
            after: None,
            bugs: &[],
        },
        Scenario {
            // Lazy refcounts: the dirty bit goes to disk (and is flushed) before any L2
            // update that relies on it.
            name: "lazy-refcounts-flush",
            source: Source::Create("lazy_refcounts=on", 4 * MIB),
            l2_cache: None,
            setup: &[G::Write(0, 256 * KIB)],
            target: G::Flush,
            expect: &[HeaderWrite, L2WriteBack, Flush],
            after: None,
            bugs: &[],
        },
        Scenario {
            name: "lazy-refcounts-close",
            source: Source::Create("lazy_refcounts=on", 4 * MIB),
            l2_cache: None,
            setup: &[G::Write(0, 256 * KIB), G::Flush, G::Write(MIB, 128 * KIB)],
            target: G::Close,
            expect: &[HeaderWrite, RefblockWrite, L2WriteBack, Flush],
            after: None,
            bugs: &[],
        },
        Scenario {
            name: "close",
            source: Source::Create("", 4 * MIB),
            l2_cache: None,
            setup: &[
                G::Write(0, 512 * KIB),
                G::Flush,
                G::Discard(0, 128 * KIB),
                G::Write(MIB, 128 * KIB),
            ],
            target: G::Close,
            expect: &[RefblockWrite, L2WriteBack, Flush],
            after: None,
            bugs: &[],
        },
    ]
}

/// Metadata that must reach the disk before other writes: the header or bitmap directory
/// before the first write, the L2 update before a discard's refcount decrement.
fn ordering_scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            // The first write marks the persistent bitmaps in use (directory update + flush).
            name: "first-write-bitmaps",
            source: Source::Fixture("bitmap"),
            l2_cache: None,
            setup: &[],
            target: G::Write(4096, 8192),
            expect: &[BitmapWrite, Flush, DataWrite],
            after: None,
            bugs: &[],
        },
        Scenario {
            // An unknown autoclear bit: the first write clears it (header update + flush).
            name: "first-write-unknown-autoclear",
            source: Source::Patched("", 4 * MIB, set_unknown_autoclear),
            l2_cache: None,
            setup: &[],
            target: G::Write(4096, 8192),
            expect: &[HeaderWrite, Flush, DataWrite],
            after: Some(unknown_autoclear_clear),
            bugs: &[],
        },
        Scenario {
            // Discards only: the L2 update is the one write before the refcount decrement.
            name: "discard-flush",
            source: Source::Create("", 4 * MIB),
            l2_cache: None,
            setup: &[G::Write(0, 512 * KIB), G::Flush, G::Discard(0, 256 * KIB)],
            target: G::Flush,
            expect: &[L2WriteBack, RefblockWrite, Flush, PunchHole],
            after: None,
            bugs: &[],
        },
    ]
}

/// Writes to images with extended L2 entries, and to compat 0.10 images.
fn format_scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "extended-l2-write",
            source: Source::Create("extended_l2=on,cluster_size=32k", 4 * MIB),
            l2_cache: Some(32 * KIB),
            setup: &[
                G::Write(0, 4096),
                G::Write(40 * KIB, 1000),
                G::Flush,
                G::Reopen,
            ],
            target: G::Write(2048, 16 * KIB),
            expect: &[L2Load, DataWrite],
            after: None,
            bugs: &[],
        },
        Scenario {
            name: "v2-write-zeroes",
            source: Source::Create("compat=0.10", 4 * MIB),
            l2_cache: Some(C64),
            setup: WRITTEN,
            target: G::Zero(100, 400 * KIB, false),
            expect: &[L2Load, DataWrite],
            after: None,
            bugs: &[],
        },
    ]
}

/// Reads: of allocated, compressed and backing-file data.
fn read_scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "read",
            source: Source::Create("", 4 * MIB),
            l2_cache: Some(C64),
            setup: WRITTEN,
            target: G::Read(1000, 700 * KIB),
            expect: &[L2Load, DataRead],
            after: None,
            bugs: &[],
        },
        Scenario {
            name: "read-compressed",
            source: Source::Fixture("compressed-zlib"),
            l2_cache: None,
            setup: &[],
            target: G::Read(0, 512 * KIB),
            expect: &[L2Load, DataRead],
            after: None,
            bugs: &[],
        },
        Scenario {
            name: "read-backing",
            source: Source::Fixture("chain"),
            l2_cache: None,
            setup: &[],
            target: G::Read(0, 512 * KIB),
            expect: &[BackingRead],
            after: None,
            bugs: &[],
        },
    ]
}

/// A scenario with `target` after `setup` on a `qemu-img create -o opts` image of 4 MiB.
fn op(
    name: &'static str,
    opts: &'static str,
    setup: &'static [G],
    target: G,
    expect: &'static [super::Class],
) -> Scenario {
    Scenario {
        name,
        source: Source::Create(opts, 4 * MIB),
        l2_cache: None,
        setup,
        target,
        expect,
        after: None,
        bugs: &[],
    }
}

/// Image operations: compressed writes, internal snapshots, resize, persistent bitmaps.
fn image_op_scenarios() -> Vec<Scenario> {
    const SNAPSHOTTED: &[G] = &[
        G::Write(0, 512 * KIB),
        G::SnapCreate(1),
        G::Write(100 * KIB, 200 * KIB),
        G::Write(2 * MIB, 64 * KIB),
        G::SnapCreate(2),
        G::Write(0, 64 * KIB),
        G::Flush,
        G::Reopen,
    ];
    vec![
        // One cluster: QEMU refuses compressed writes to allocated clusters, so a write of
        // several that failed half way could not be run again.
        op(
            "compressed-write",
            "",
            WRITTEN,
            G::Compressed(2 * MIB, C64),
            &[L2Load, DataWrite],
        ),
        op(
            "compressed-write-new-l2",
            "",
            &[],
            G::Compressed(3 * C64, C64),
            &[DataWrite, SetLen],
        ),
        op(
            "snapshot-create",
            "",
            WRITTEN,
            G::SnapCreate(1),
            &[
                L1Write,
                RefblockWrite,
                SnapshotTableWrite,
                HeaderWrite,
                Flush,
            ],
        ),
        op(
            "snapshot-delete",
            "",
            SNAPSHOTTED,
            G::SnapDelete(1),
            &[RefblockWrite, SnapshotTableWrite, HeaderWrite, Flush],
        ),
        op(
            "snapshot-apply",
            "",
            SNAPSHOTTED,
            G::SnapApply(1),
            &[L1Write, RefblockWrite, Flush],
        ),
        Scenario {
            name: "resize-grow-l1",
            source: Source::Create("cluster_size=512", MIB),
            l2_cache: None,
            setup: &[G::Write(0, 64 * KIB), G::Write(MIB - 4 * KIB, 4 * KIB)],
            target: G::Resize(3 * MIB),
            expect: &[L1Write, HeaderWrite],
            after: None,
            bugs: &[],
        },
        op(
            "resize-shrink",
            "",
            WRITTEN,
            G::Resize(MIB + 64 * KIB),
            &[L2WriteBack, RefblockWrite, HeaderWrite],
        ),
        op(
            "bitmap-add",
            "",
            WRITTEN,
            G::Bitmap("b0", BitmapOp::Add),
            &[BitmapWrite, HeaderWrite, Flush],
        ),
        Scenario {
            name: "bitmap-clear",
            source: Source::Fixture("bitmap"),
            l2_cache: None,
            setup: &[],
            target: G::Bitmap("bm0", BitmapOp::Clear),
            expect: &[BitmapWrite, Flush],
            after: None,
            bugs: &[],
        },
    ]
}
