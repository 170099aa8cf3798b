//! Hand-crafted hostile images: the cases the design names (an L2 entry past the end, into
//! the header, misaligned; compressed spans leaving the file; a refcount of 0 for a referenced
//! cluster; an L1 entry pointing at the refcount table; huge counts; truncations; backing
//! loops), each built from a real image's layout.

use super::layout::{Kind, Layout};
use super::mutate::Mutation;
use qcow2_format::{features, L1Entry, L2Mapping, L2_COMPRESSED, L2_COPIED, L2_ZERO};

/// A named case: the mutations to apply to one file.
#[derive(Debug, Clone)]
pub struct Crafted {
    /// Short name, unique per file.
    pub name: String,
    /// What to change.
    pub mutations: Vec<Mutation>,
}

fn put64(at: u64, value: u64) -> Mutation {
    Mutation::Put {
        at,
        width: 8,
        value,
    }
}

fn put32(at: u64, value: u64) -> Mutation {
    Mutation::Put {
        at,
        width: 4,
        value,
    }
}

/// Writes a backing file name into the header cluster after the extensions (and points the
/// header at it). `None` if it does not fit in the cluster.
fn set_backing_name(l: &Layout, name: &str) -> Option<Vec<Mutation>> {
    let at = l
        .header
        .extensions_end()
        .max(l.header.backing_file_offset + u64::from(l.header.backing_file_size));
    let at = at.div_ceil(8) * 8;
    if at + name.len() as u64 > l.cs().min(l.file_len) {
        return None;
    }
    let mut m = vec![put64(8, at), put32(16, name.len() as u64)];
    for (i, b) in name.bytes().enumerate() {
        m.push(Mutation::Put {
            at: at + i as u64,
            width: 1,
            value: u64::from(b),
        });
    }
    Some(m)
}

/// Every crafted case that applies to a file with layout `l`. `own` is the file's path and
/// `top` the path of the fixture's top image (for backing loops).
pub fn cases(l: &Layout, own: &str, top: &str) -> Vec<Crafted> {
    let mut out = Vec::new();
    let mut add = |name: &str, mutations: Vec<Mutation>| {
        out.push(Crafted {
            name: name.to_string(),
            mutations,
        })
    };
    l2_cases(l, &mut add);
    compressed_cases(l, &mut add);
    l1_and_refcount_cases(l, &mut add);
    reftable_cases(l, &mut add);
    header_cases(l, &mut add);
    feature_cases(l, &mut add);
    snapshot_cases(l, &mut add);
    bitmap_cases(l, &mut add);
    truncation_cases(l, &mut add);
    backing_cases(l, own, top, &mut add);
    whole_table_cases(l, &mut add);
    out
}

/// The file's length rounded up to whole clusters.
fn cluster_end(l: &Layout) -> u64 {
    l.file_len.div_ceil(l.cs()) * l.cs()
}

/// L2 entries of data clusters pointing where they must not.
fn l2_cases(l: &Layout, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    let cs = l.cs();
    let end = cluster_end(l);
    let h = &l.header;
    let normal = l
        .mapped
        .iter()
        .find(|m| matches!(m.mapping, L2Mapping::Normal { host, .. } if host.0 != 0));
    if let Some(m) = normal {
        let L2Mapping::Normal { host, .. } = m.mapping else {
            unreachable!()
        };
        let table = m.pos & !(cs - 1);
        add(
            "l2-past-eof",
            vec![put64(m.pos, (end + 16 * cs) | L2_COPIED)],
        );
        add("l2-at-eof", vec![put64(m.pos, end | L2_COPIED)]);
        add("l2-far-past-eof", vec![put64(m.pos, (1 << 50) | L2_COPIED)]);
        add(
            "l2-max-offset",
            vec![put64(m.pos, 0x00FF_FFFF_FFFF_FE00 | L2_COPIED)],
        );
        add("l2-into-header", vec![put64(m.pos, L2_COPIED)]);
        add(
            "l2-into-l1",
            vec![put64(m.pos, (h.l1_table_offset & !(cs - 1)) | L2_COPIED)],
        );
        add(
            "l2-into-reftable",
            vec![put64(m.pos, h.refcount_table_offset | L2_COPIED)],
        );
        add("l2-into-own-table", vec![put64(m.pos, table | L2_COPIED)]);
        if let Some(&(_, b)) = l.refblocks.first() {
            add("l2-into-refblock", vec![put64(m.pos, b | L2_COPIED)]);
        }
        if cs > 512 {
            add(
                "l2-misaligned",
                vec![put64(m.pos, (host.0 + 512) | L2_COPIED)],
            );
        }
        add(
            "l2-reserved-bits",
            vec![put64(m.pos, host.0 | L2_COPIED | 0x100)],
        );
        add(
            "l2-zero-flag-with-offset-v2",
            vec![put64(m.pos, host.0 | L2_ZERO)],
        );
        add(
            "l2-compressed-and-copied",
            vec![put64(m.pos, l.compressed_word(host.0, 1) | L2_COPIED)],
        );
        // Two entries sharing one cluster, both claiming to be its only user.
        if let Some(other) = l
            .mapped
            .iter()
            .find(|o| o.pos != m.pos && matches!(o.mapping, L2Mapping::Normal { .. }))
        {
            add(
                "l2-duplicate",
                vec![Mutation::Copy {
                    from: m.pos,
                    to: other.pos,
                    len: 8,
                }],
            );
        }
        add(
            "refcount-zero-data",
            vec![Mutation::Refcount {
                cluster: host.0 / cs,
                value: 0,
            }],
        );
        add(
            "refcount-max-data",
            vec![Mutation::Refcount {
                cluster: host.0 / cs,
                value: l.width().max(),
            }],
        );
        // A data cluster turned compressed, its span running off the end of the file.
        add(
            "compressed-span-leaves-file",
            vec![put64(m.pos, l.compressed_word(l.file_len - 16, u64::MAX))],
        );
    }
}

/// Compressed descriptors, and a preallocated zero cluster past the end of the file.
fn compressed_cases(l: &Layout, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    let cs = l.cs();
    let end = cluster_end(l);
    let h = &l.header;
    if let Some(m) = l
        .mapped
        .iter()
        .find(|m| matches!(m.mapping, L2Mapping::Compressed(_)))
    {
        let L2Mapping::Compressed(d) = m.mapping else {
            unreachable!()
        };
        add(
            "compressed-span-max",
            vec![put64(m.pos, l.compressed_word(d.host_offset, u64::MAX))],
        );
        add(
            "compressed-at-eof",
            vec![put64(m.pos, l.compressed_word(l.file_len, 0))],
        );
        add(
            "compressed-last-byte",
            vec![put64(m.pos, l.compressed_word(l.file_len - 1, 3))],
        );
        add(
            "compressed-far",
            vec![put64(m.pos, l.compressed_word(u64::MAX, u64::MAX))],
        );
        add(
            "compressed-into-header",
            vec![put64(m.pos, l.compressed_word(0, 7))],
        );
        add(
            "compressed-into-l1",
            vec![put64(m.pos, l.compressed_word(h.l1_table_offset, 1))],
        );
        add(
            "compressed-garbage-stream",
            vec![put64(m.pos, l.compressed_word(h.refcount_table_offset, 2))],
        );
        add(
            "refcount-zero-compressed",
            vec![Mutation::Refcount {
                cluster: d.host_offset / cs,
                value: 0,
            }],
        );
        add(
            "compressed-copied",
            vec![put64(
                m.pos,
                l.compressed_word(d.host_offset, d.additional_sectors) | L2_COPIED,
            )],
        );
    }
    if l.mapped
        .iter()
        .any(|m| matches!(m.mapping, L2Mapping::Zero { .. }))
    {
        let m = l
            .mapped
            .iter()
            .find(|m| matches!(m.mapping, L2Mapping::Zero { .. }))
            .unwrap();
        add(
            "zero-alloc-past-eof",
            vec![put64(m.pos, (end + cs) | L2_ZERO | L2_COPIED)],
        );
    }
}

/// L1 entries pointing where they must not, and the refcounts of the metadata zeroed or
/// saturated.
fn l1_and_refcount_cases(l: &Layout, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    let cs = l.cs();
    let end = cluster_end(l);
    let h = &l.header;
    let l1 = h.l1_table_offset;
    let first_l2 = l.l2_tables.first().copied();
    add(
        "l1-into-reftable",
        vec![put64(l1, h.refcount_table_offset | L1Entry::COPIED)],
    );
    add(
        "l1-into-l1",
        vec![put64(l1, (l1 & !(cs - 1)) | L1Entry::COPIED)],
    );
    add("l1-past-eof", vec![put64(l1, (end + cs) | L1Entry::COPIED)]);
    add(
        "l1-at-last-cluster",
        vec![put64(l1, (end - cs) | L1Entry::COPIED)],
    );
    add(
        "l1-far",
        vec![put64(l1, 0x00FF_FFFF_FFFF_0000 | L1Entry::COPIED)],
    );
    if cs > 512 {
        add(
            "l1-misaligned",
            vec![put64(l1, (l1 + 512) | L1Entry::COPIED)],
        );
    }
    if let Some(&(_, b)) = l.refblocks.first() {
        add("l1-into-refblock", vec![put64(l1, b | L1Entry::COPIED)]);
    }
    if let Some(t) = first_l2 {
        if h.l1_size >= 2 {
            add("l1-shared-l2", vec![put64(l1 + 8, t | L1Entry::COPIED)]);
        }
        add(
            "refcount-zero-l2",
            vec![Mutation::Refcount {
                cluster: t / cs,
                value: 0,
            }],
        );
    }
    add(
        "refcount-zero-l1",
        vec![Mutation::Refcount {
            cluster: l1 / cs,
            value: 0,
        }],
    );
    add(
        "refcount-zero-reftable",
        vec![Mutation::Refcount {
            cluster: h.refcount_table_offset / cs,
            value: 0,
        }],
    );
    add(
        "refcount-zero-header",
        vec![Mutation::Refcount {
            cluster: 0,
            value: 0,
        }],
    );
    add(
        "refcount-max-everywhere",
        l.refblocks
            .iter()
            .map(|&(_, b)| Mutation::Fill {
                at: b,
                len: cs,
                byte: 0xff,
            })
            .collect(),
    );
    add(
        "refblocks-zero",
        l.refblocks
            .iter()
            .map(|&(_, b)| Mutation::Fill {
                at: b,
                len: cs,
                byte: 0,
            })
            .collect(),
    );
}

/// Refcount table entries pointing into the L1 table, past the end, far away, misaligned, at
/// the table itself or nowhere.
fn reftable_cases(l: &Layout, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    let cs = l.cs();
    let end = cluster_end(l);
    let h = &l.header;
    let l1 = h.l1_table_offset;
    let rt = h.refcount_table_offset;
    add("reftable-into-l1", vec![put64(rt, l1 & !(cs - 1))]);
    add("reftable-past-eof", vec![put64(rt, end + cs)]);
    add("reftable-far", vec![put64(rt, 1 << 55)]);
    add("reftable-max", vec![put64(rt, !(cs - 1))]);
    add(
        "reftable-all-ones",
        vec![Mutation::Fill {
            at: rt,
            len: u64::from(h.refcount_table_clusters) * cs,
            byte: 0xff,
        }],
    );
    add("reftable-misaligned", vec![put64(rt, rt + 512)]);
    add("reftable-self", vec![put64(rt, rt)]);
    add("reftable-empty", vec![put64(rt, 0)]);
}

/// Huge counts and sizes in the header, and out-of-range cluster bits, refcount orders and
/// backing file name fields.
fn header_cases(l: &Layout, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    let cs = l.cs();
    let end = cluster_end(l);
    let h = &l.header;
    let l1 = h.l1_table_offset;
    let rt = h.refcount_table_offset;
    add(
        "l1-size-max",
        vec![put32(36, qcow2_format::limits::MAX_L1_ENTRIES)],
    );
    add(
        "l1-size-over-max",
        vec![put32(36, qcow2_format::limits::MAX_L1_ENTRIES + 1)],
    );
    add("l1-size-u32-max", vec![put32(36, 0xffff_ffff)]);
    add("l1-size-zero", vec![put32(36, 0)]);
    add("l1-size-to-eof", vec![put32(36, (l.file_len - l1) / 8)]);
    let max_size = (u64::from(h.l1_size) * l.geo.l2_coverage()).min((i64::MAX as u64) & !511);
    add("size-fills-l1", vec![put64(24, max_size)]);
    add("size-2-62", vec![put64(24, 1 << 62)]);
    add("size-max", vec![put64(24, u64::MAX)]);
    add("size-zero", vec![put64(24, 0)]);
    add("size-unaligned", vec![put64(24, h.size - 1)]);
    add(
        "size-and-l1-max",
        vec![
            put32(36, qcow2_format::limits::MAX_L1_ENTRIES),
            put64(
                24,
                (qcow2_format::limits::MAX_L1_ENTRIES * l.geo.l2_coverage())
                    .min((i64::MAX as u64) & !511),
            ),
        ],
    );
    add("reftable-clusters-max", vec![put32(56, 0xffff_ffff)]);
    add(
        "reftable-clusters-over-limit",
        vec![put32(56, qcow2_format::limits::MAX_REFTABLE_BYTES / cs + 1)],
    );
    add(
        "reftable-clusters-to-eof",
        vec![put32(56, (l.file_len - rt) / cs)],
    );
    add("nb-snapshots-65536", vec![put32(60, 65536)]);
    add("nb-snapshots-max", vec![put32(60, 0xffff_ffff)]);
    add(
        "nb-snapshots-without-table",
        vec![put32(60, 1000), put64(64, end - cs)],
    );
    add(
        "snapshots-offset-past-eof",
        vec![put32(60, 1), put64(64, end + cs)],
    );
    add("cluster-bits-22", vec![put32(20, 22)]);
    add("cluster-bits-9", vec![put32(20, 9)]);
    add("cluster-bits-21", vec![put32(20, 21)]);
    add("refcount-order-0", vec![put32(96, 0)]);
    add("refcount-order-6", vec![put32(96, 6)]);
    add(
        "backing-offset-past-cluster",
        vec![put64(8, cs - 4), put32(16, 100)],
    );
    add(
        "backing-size-huge",
        vec![put64(8, 0x200.min(cs - 8)), put32(16, 0xffff_ffff)],
    );
}

/// Feature bits of v3 images set or flipped.
fn feature_cases(l: &Layout, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    let h = &l.header;
    if h.version >= 3 {
        let inc = h.incompatible_features;
        add("dirty-bit", vec![put64(72, inc | features::INCOMPAT_DIRTY)]);
        add(
            "corrupt-bit",
            vec![put64(72, inc | features::INCOMPAT_CORRUPT)],
        );
        add(
            "data-file-bit",
            vec![put64(72, inc ^ features::INCOMPAT_DATA_FILE)],
        );
        add(
            "extended-l2-bit",
            vec![put64(72, inc ^ features::INCOMPAT_EXTENDED_L2)],
        );
        add(
            "compression-bit",
            vec![put64(72, inc ^ features::INCOMPAT_COMPRESSION)],
        );
        add(
            "lazy-refcounts-bit",
            vec![put64(
                80,
                h.compatible_features ^ features::COMPAT_LAZY_REFCOUNTS,
            )],
        );
        add(
            "autoclear-bitmaps-bit",
            vec![put64(
                88,
                h.autoclear_features ^ features::AUTOCLEAR_BITMAPS,
            )],
        );
    }
}

/// The first snapshot table entry's fields, the snapshot count, and a snapshot's L1 table.
fn snapshot_cases(l: &Layout, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    let cs = l.cs();
    let end = cluster_end(l);
    let h = &l.header;
    let l1 = h.l1_table_offset;
    let rt = h.refcount_table_offset;
    if let Some(&e) = l.snapshot_entries.first() {
        add("snapshot-l1-size-huge", vec![put32(e + 8, 0xffff_ffff)]);
        add(
            "snapshot-l1-size-over-max",
            vec![put32(e + 8, qcow2_format::limits::MAX_L1_ENTRIES + 1)],
        );
        add("snapshot-l1-past-eof", vec![put64(e, end + cs)]);
        add("snapshot-l1-misaligned", vec![put64(e, l1 + 8)]);
        add("snapshot-extra-huge", vec![put32(e + 36, 0xffff_ffff)]);
        add("snapshot-extra-1025", vec![put32(e + 36, 1025)]);
        add(
            "snapshot-name-huge",
            vec![Mutation::Put {
                at: e + 14,
                width: 2,
                value: 0xffff,
            }],
        );
        add(
            "snapshot-id-huge",
            vec![Mutation::Put {
                at: e + 12,
                width: 2,
                value: 0xffff,
            }],
        );
        add(
            "snapshot-count-plus-one",
            vec![put32(60, u64::from(h.nb_snapshots) + 1)],
        );
        if let Some(s) = l.of(Kind::SnapshotL1).first() {
            add(
                "snapshot-l1-into-reftable",
                vec![put64(s.start, rt | L1Entry::COPIED)],
            );
        }
    }
}

/// The bitmaps extension, the first bitmap directory entry and the first bitmap table.
fn bitmap_cases(l: &Layout, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    let cs = l.cs();
    let end = cluster_end(l);
    let l1 = l.header.l1_table_offset;
    if let Some(ext) = l.bitmaps_ext {
        add("bitmaps-count-max", vec![put32(ext, 65535)]);
        add("bitmaps-count-u32-max", vec![put32(ext, 0xffff_ffff)]);
        add("bitmaps-dir-size-max", vec![put64(ext + 8, 1024 * 65535)]);
        add("bitmaps-dir-size-huge", vec![put64(ext + 8, u64::MAX)]);
        add("bitmaps-dir-past-eof", vec![put64(ext + 16, end + cs)]);
        add(
            "bitmaps-dir-misaligned",
            vec![put64(ext + 16, l.file_len - 7)],
        );
    }
    if let Some(&e) = l.bitmap_entries.first() {
        add("bitmap-table-size-huge", vec![put32(e + 8, 0x0800_0000)]);
        add("bitmap-table-size-max", vec![put32(e + 8, 0xffff_ffff)]);
        add("bitmap-table-past-eof", vec![put64(e, end + cs)]);
        add("bitmap-table-into-l1", vec![put64(e, l1 & !(cs - 1))]);
        add("bitmap-extra-huge", vec![put32(e + 20, 0xffff_ffff)]);
        add(
            "bitmap-granularity-63",
            vec![Mutation::Put {
                at: e + 17,
                width: 1,
                value: 63,
            }],
        );
        add(
            "bitmap-name-size-zero",
            vec![Mutation::Put {
                at: e + 18,
                width: 2,
                value: 0,
            }],
        );
    }
    if let Some(t) = l.of(Kind::BitmapTable).first() {
        add(
            "bitmap-table-entry-past-eof",
            vec![put64(t.start, end + cs)],
        );
        add("bitmap-table-entry-garbage", vec![put64(t.start, u64::MAX)]);
        add("bitmap-table-entry-far", vec![put64(t.start, 1 << 50)]);
        add(
            "bitmap-table-entry-into-l1",
            vec![put64(t.start, l1 & !(cs - 1))],
        );
    }
    if let Some(&e) = l.bitmap_entries.first() {
        add("bitmap-table-far", vec![put64(e, 1 << 50)]);
    }
}

/// The file cut at fixed lengths and inside each kind of metadata.
fn truncation_cases(l: &Layout, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    let cs = l.cs();
    let end = cluster_end(l);
    let h = &l.header;
    let l1 = h.l1_table_offset;
    let rt = h.refcount_table_offset;
    let first_l2 = l.l2_tables.first().copied();
    for (name, len) in [
        ("truncate-0", 0),
        ("truncate-50", 50),
        ("truncate-71", 71),
        ("truncate-103", 103),
        ("truncate-header-length", u64::from(h.header_length) - 1),
        (
            "truncate-in-extensions",
            h.extensions_end().saturating_sub(5),
        ),
        ("truncate-mid-l1", l1 + (u64::from(h.l1_size) * 8) / 2),
        ("truncate-at-l1", l1),
        ("truncate-before-reftable", rt),
        ("truncate-mid-reftable", rt + 4),
        ("truncate-last-cluster", end - cs),
        ("truncate-last-byte", l.file_len - 1),
        ("truncate-half", l.file_len / 2),
    ] {
        add(name, vec![Mutation::Truncate { len }]);
    }
    if let Some(t) = first_l2 {
        add(
            "truncate-mid-l2",
            vec![Mutation::Truncate { len: t + cs / 2 }],
        );
    }
    if h.nb_snapshots > 0 {
        add(
            "truncate-in-snapshot-table",
            vec![Mutation::Truncate {
                len: h.snapshots_offset + 100,
            }],
        );
    }
    if let Some(&(_, b)) = l.refblocks.first() {
        add(
            "truncate-mid-refblock",
            vec![Mutation::Truncate { len: b + cs / 2 }],
        );
    }
}

/// Backing files: the image itself, the top image (a loop), or a missing file.
fn backing_cases(l: &Layout, own: &str, top: &str, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    if let Some(m) = set_backing_name(l, own) {
        add("backing-self", m);
    }
    if own != top {
        if let Some(m) = set_backing_name(l, top) {
            add("backing-loop-to-top", m);
        }
    }
    if let Some(m) = set_backing_name(l, "/nonexistent/qcow2-hostile-backing") {
        add("backing-missing", m);
    }
}

/// Everything compressed and past the end at once (many failing clusters in one read).
fn whole_table_cases(l: &Layout, add: &mut impl FnMut(&str, Vec<Mutation>)) {
    let h = &l.header;
    let all: Vec<Mutation> = l
        .mapped
        .iter()
        .take(4096)
        .map(|m| put64(m.pos, (1u64 << 54) | L2_COPIED))
        .collect();
    if !all.is_empty() {
        add("every-l2-entry-past-eof", all);
    }
    let comp: Vec<Mutation> = l
        .mapped
        .iter()
        .take(4096)
        .map(|m| {
            put64(
                m.pos,
                L2_COMPRESSED | l.compressed_word(h.l1_table_offset, 1),
            )
        })
        .collect();
    if !comp.is_empty() {
        add("every-l2-entry-compressed-garbage", comp);
    }
}
