//! Images as old QEMU versions wrote them, made from what today's QEMU writes.

use std::path::Path;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// Rewrites the snapshot table of the qcow2 image at `path` in place without extra data, as
/// QEMU before 1.1 wrote it (no 64-bit VM state size, no disk size, no icount). The table
/// gets shorter; the rest of its clusters read zeros. Returns how many snapshots it holds.
///
/// # Panics
///
/// If the file cannot be read or written, or its header or snapshot table is malformed.
pub fn strip_snapshot_extra_data(path: &Path) -> u32 {
    let mut bytes = std::fs::read(path).expect("read the image");
    // nb_snapshots and snapshots_offset: header bytes 60..72.
    let count = be32(&bytes, 60);
    let offset = u64::from_be_bytes(bytes[64..72].try_into().expect("8 bytes")) as usize;
    let mut table = Vec::new();
    let mut pos = offset;
    for _ in 0..count {
        // The fixed part: 40 bytes, id and name lengths at 12 and 14, extra data size at 36.
        let (id_len, name_len) = (
            be16(&bytes, pos + 12) as usize,
            be16(&bytes, pos + 14) as usize,
        );
        let extra = be32(&bytes, pos + 36) as usize;
        let mut entry = bytes[pos..pos + 40].to_vec();
        entry[36..40].copy_from_slice(&0u32.to_be_bytes());
        let names = pos + 40 + extra;
        entry.extend_from_slice(&bytes[names..names + id_len + name_len]);
        entry.resize(entry.len().next_multiple_of(8), 0);
        table.extend_from_slice(&entry);
        pos = (names + id_len + name_len).next_multiple_of(8);
    }
    let end = pos.min(bytes.len());
    table.resize(end - offset, 0);
    bytes[offset..end].copy_from_slice(&table);
    std::fs::write(path, bytes).expect("write the image");
    count
}
