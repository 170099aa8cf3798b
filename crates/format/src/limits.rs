//! Limits of the format and of QEMU's implementation (which this crate enforces too, so that
//! every image it accepts is one QEMU accepts, and no on-disk number can size an unbounded
//! allocation).

/// Largest active or snapshot L1 table QEMU accepts, in bytes (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest L1 table, in entries.
pub const MAX_L1_ENTRIES: u64 = MAX_L1_BYTES / 8;
/// Largest refcount table QEMU accepts, in bytes (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table QEMU accepts, in bytes (64 MiB).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data of one snapshot table entry QEMU accepts, in bytes.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Most persistent bitmaps QEMU accepts.
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory QEMU accepts, in bytes.
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * 65535;
/// Longest bitmap name QEMU accepts, in bytes.
pub const MAX_BITMAP_NAME: usize = 1023;
/// Most bitmap table entries of one bitmap QEMU accepts.
pub const MAX_BITMAP_TABLE_ENTRIES: u64 = 0x800_0000;
/// Largest bitmap data (table entries times cluster size) QEMU accepts, in bytes (512 MiB).
pub const MAX_BITMAP_DATA_BYTES: u64 = 0x2000_0000;
/// Smallest bitmap granularity QEMU accepts (log2 bytes).
pub const MIN_BITMAP_GRANULARITY_BITS: u8 = 9;
/// Largest bitmap granularity QEMU accepts (log2 bytes).
pub const MAX_BITMAP_GRANULARITY_BITS: u8 = 31;
/// Longest backing file name QEMU accepts, in bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Host offsets in L1, L2 and bitmap table entries have 56 bits: they are below this.
pub const HOST_OFFSET_LIMIT: u64 = 1 << 56;
/// Largest virtual size accepted before the L1 limit is considered (QEMU keeps sizes below
/// `i64::MAX` rounded down to a sector).
pub const MAX_VIRTUAL_SIZE: u64 = (i64::MAX as u64) & !511;
