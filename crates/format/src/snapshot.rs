//! The internal snapshot table.

use crate::Result;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest run time in ns.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit extra-data field when present, else the 32-bit one).
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time (extra data), if recorded.
    pub disk_size: Option<u64>,
    /// icount (extra data), if recorded.
    pub icount: Option<u64>,
    /// The whole extra data, kept byte for byte (known fields are also decoded above).
    pub extra_data: Vec<u8>,
}

impl Snapshot {
    /// Parses `count` entries from the table bytes. Bounds every length by the buffer.
    pub fn parse_table(buf: &[u8], count: u32) -> Result<Vec<Snapshot>> {
        let _ = (buf, count);
        todo!()
    }

    /// Serializes a table (entries padded to 8 bytes).
    pub fn serialize_table(snapshots: &[Snapshot]) -> Vec<u8> {
        let _ = snapshots;
        todo!()
    }
}
