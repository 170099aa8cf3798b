//! The internal snapshot table.

use crate::be::{pad8, put_u64, u16_at, u32_at, u64_at};
use crate::limits::{MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES};
use crate::{FormatError, Result};

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
    /// Size of the fixed part of an entry (before extra data, id and name).
    pub const FIXED_LEN: usize = 40;

    /// Length on disk, without the padding to 8, of the entry whose fixed part starts `fixed`
    /// (at least [`Snapshot::FIXED_LEN`] bytes). Lets a reader fetch the table entry by entry;
    /// the next entry starts at the result rounded up to a multiple of 8. `index` is only used
    /// in error messages. Refuses extra data above 1 KiB, as QEMU does.
    pub fn entry_len(fixed: &[u8], index: usize) -> Result<usize> {
        if fixed.len() < Self::FIXED_LEN {
            return Err(FormatError::Truncated {
                what: "snapshot table entry",
                need: Self::FIXED_LEN as u64,
                have: fixed.len() as u64,
            });
        }
        let id_len = usize::from(u16_at(fixed, 12));
        let name_len = usize::from(u16_at(fixed, 14));
        let extra = u32_at(fixed, 36);
        if extra > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(FormatError::SnapshotExtraData {
                index,
                size: extra,
                limit: MAX_SNAPSHOT_EXTRA_DATA,
            });
        }
        Ok(Self::FIXED_LEN + extra as usize + id_len + name_len)
    }

    /// The lengths an entry's fixed part (at least [`Snapshot::FIXED_LEN`] bytes) declares,
    /// without any limit applied: `(id, name, extra data)`. For a checker that repairs what
    /// [`Snapshot::entry_len`] refuses.
    pub fn declared_lengths(fixed: &[u8]) -> Result<(u16, u16, u32)> {
        if fixed.len() < Self::FIXED_LEN {
            return Err(FormatError::Truncated {
                what: "snapshot table entry",
                need: Self::FIXED_LEN as u64,
                have: fixed.len() as u64,
            });
        }
        Ok((u16_at(fixed, 12), u16_at(fixed, 14), u32_at(fixed, 36)))
    }

    /// Parses one entry from its parts: the fixed part, the extra data *as kept* (its length
    /// replaces the declared one, as after QEMU's repair cuts extra data down to 1 KiB), the
    /// id and the name bytes. `index` is only used in error messages.
    pub fn parse_parts(
        fixed: &[u8],
        extra: &[u8],
        id: &[u8],
        name: &[u8],
        index: usize,
    ) -> Result<Snapshot> {
        let bad = |reason: String| FormatError::BadSnapshot { index, reason };
        let fixed = fixed.get(..Self::FIXED_LEN).ok_or(FormatError::Truncated {
            what: "snapshot table entry",
            need: Self::FIXED_LEN as u64,
            have: fixed.len() as u64,
        })?;
        let extra_len =
            u32::try_from(extra.len()).map_err(|_| bad("extra data too large".into()))?;
        let id_len = u16::try_from(id.len()).map_err(|_| bad("id too long".into()))?;
        let name_len = u16::try_from(name.len()).map_err(|_| bad("name too long".into()))?;
        let mut buf = fixed.to_vec();
        buf[12..14].copy_from_slice(&id_len.to_be_bytes());
        buf[14..16].copy_from_slice(&name_len.to_be_bytes());
        buf[36..40].copy_from_slice(&extra_len.to_be_bytes());
        buf.extend_from_slice(extra);
        buf.extend_from_slice(id);
        buf.extend_from_slice(name);
        let mut list = Self::parse_table(&buf, 1).map_err(|e| match e {
            FormatError::BadSnapshot { reason, .. } => bad(reason),
            FormatError::SnapshotExtraData { size, limit, .. } => {
                FormatError::SnapshotExtraData { index, size, limit }
            }
            other => other,
        })?;
        list.pop().ok_or_else(|| bad("empty entry".into()))
    }

    /// Parses `count` entries from the table bytes. Bounds every length by the buffer; the
    /// buffer may extend past the table (bytes after the last entry are ignored). Refuses more
    /// than 65536 entries, extra data above 1 KiB and tables above 64 MiB, as QEMU does.
    pub fn parse_table(buf: &[u8], count: u32) -> Result<Vec<Snapshot>> {
        if count > MAX_SNAPSHOTS {
            return Err(FormatError::TooLarge {
                what: "number of snapshots",
                value: u64::from(count),
                limit: u64::from(MAX_SNAPSHOTS),
            });
        }
        let count = count as usize;
        let mut out = Vec::with_capacity(count.min(buf.len() / Self::FIXED_LEN));
        let mut pos = 0usize;
        for index in 0..count {
            let e = buf.get(pos..).unwrap_or(&[]);
            if e.len() < Self::FIXED_LEN {
                return Err(FormatError::Truncated {
                    what: "snapshot table",
                    need: (pos + Self::FIXED_LEN) as u64,
                    have: buf.len() as u64,
                });
            }
            let len = Self::entry_len(e, index)?;
            if (pos + len) as u64 > MAX_SNAPSHOT_TABLE_BYTES {
                return Err(FormatError::TooLarge {
                    what: "snapshot table (bytes)",
                    value: (pos + len) as u64,
                    limit: MAX_SNAPSHOT_TABLE_BYTES,
                });
            }
            if e.len() < len {
                return Err(FormatError::Truncated {
                    what: "snapshot table",
                    need: (pos + len) as u64,
                    have: buf.len() as u64,
                });
            }
            let extra_len = u32_at(e, 36) as usize;
            let id_len = usize::from(u16_at(e, 12));
            let extra_end = Self::FIXED_LEN + extra_len;
            let id_end = extra_end + id_len;
            let extra_data = e[Self::FIXED_LEN..extra_end].to_vec();
            let text = |bytes: &[u8], what: &str| {
                String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::BadSnapshot {
                    index,
                    reason: format!("{what} is not valid UTF-8"),
                })
            };
            let id = text(&e[extra_end..id_end], "id")?;
            let name = text(&e[id_end..len], "name")?;
            let legacy_vm_state = u64::from(u32_at(e, 32));
            let vm_state_size = if extra_len >= 8 {
                u64_at(&extra_data, 0)
            } else {
                legacy_vm_state
            };
            out.push(Snapshot {
                l1_table_offset: u64_at(e, 0),
                l1_size: u32_at(e, 8),
                id,
                name,
                date_sec: u32_at(e, 16),
                date_nsec: u32_at(e, 20),
                vm_clock_nsec: u64_at(e, 24),
                vm_state_size,
                disk_size: (extra_len >= 16).then(|| u64_at(&extra_data, 8)),
                icount: (extra_len >= 24).then(|| u64_at(&extra_data, 16)),
                extra_data,
            });
            pos += pad8(len);
        }
        Ok(out)
    }

    /// The extra data as it will be written: `extra_data` (unknown bytes preserved), extended
    /// as far as needed for the known fields that are set, with the known fields written over
    /// it (the struct fields win over the bytes). An `icount` without `disk_size` is written
    /// with a disk size of 0.
    pub fn encoded_extra_data(&self) -> Vec<u8> {
        let mut extra = self.extra_data.clone();
        let needed = if self.icount.is_some() {
            24
        } else if self.disk_size.is_some() {
            16
        } else if self.vm_state_size > u64::from(u32::MAX) {
            8
        } else {
            0
        };
        if extra.len() < needed {
            extra.resize(needed, 0);
        }
        if extra.len() >= 8 {
            put_u64(&mut extra, 0, self.vm_state_size);
        }
        if let (true, Some(d)) = (extra.len() >= 16, self.disk_size) {
            put_u64(&mut extra, 8, d);
        }
        if let (true, Some(i)) = (extra.len() >= 24, self.icount) {
            put_u64(&mut extra, 16, i);
        }
        extra
    }

    /// Bytes this entry takes in the table, padding included.
    pub fn serialized_len(&self) -> usize {
        pad8(Self::FIXED_LEN + self.encoded_extra_data().len() + self.id.len() + self.name.len())
    }

    /// Serializes a table (entries padded to 8 bytes), checking what [`Snapshot::parse_table`]
    /// would refuse: id or name longer than 65535 bytes, extra data above 1 KiB, more than
    /// 65536 entries, a table above 64 MiB.
    pub fn try_serialize_table(snapshots: &[Snapshot]) -> Result<Vec<u8>> {
        if snapshots.len() > MAX_SNAPSHOTS as usize {
            return Err(FormatError::TooLarge {
                what: "number of snapshots",
                value: snapshots.len() as u64,
                limit: u64::from(MAX_SNAPSHOTS),
            });
        }
        let mut out = Vec::new();
        for (index, s) in snapshots.iter().enumerate() {
            let bad = |reason: String| FormatError::BadSnapshot { index, reason };
            let extra = s.encoded_extra_data();
            if extra.len() > MAX_SNAPSHOT_EXTRA_DATA as usize {
                return Err(bad(format!(
                    "extra data size {} exceeds the limit of {MAX_SNAPSHOT_EXTRA_DATA}",
                    extra.len()
                )));
            }
            let id_len =
                u16::try_from(s.id.len()).map_err(|_| bad("id longer than 65535 bytes".into()))?;
            let name_len = u16::try_from(s.name.len())
                .map_err(|_| bad("name longer than 65535 bytes".into()))?;
            // QEMU: a VM state that does not fit 32 bits is written as 0 in the legacy field,
            // so that old readers treat the snapshot as disk-only rather than truncate it.
            let legacy = u32::try_from(s.vm_state_size).unwrap_or(0);
            out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
            out.extend_from_slice(&s.l1_size.to_be_bytes());
            out.extend_from_slice(&id_len.to_be_bytes());
            out.extend_from_slice(&name_len.to_be_bytes());
            out.extend_from_slice(&s.date_sec.to_be_bytes());
            out.extend_from_slice(&s.date_nsec.to_be_bytes());
            out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
            out.extend_from_slice(&legacy.to_be_bytes());
            out.extend_from_slice(&(extra.len() as u32).to_be_bytes());
            out.extend_from_slice(&extra);
            out.extend_from_slice(s.id.as_bytes());
            out.extend_from_slice(s.name.as_bytes());
            if out.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
                return Err(FormatError::TooLarge {
                    what: "snapshot table (bytes)",
                    value: out.len() as u64,
                    limit: MAX_SNAPSHOT_TABLE_BYTES,
                });
            }
            crate::be::pad_vec8(&mut out);
        }
        Ok(out)
    }

    /// Serializes a table (entries padded to 8 bytes).
    ///
    /// # Panics
    /// If the table cannot be encoded (see [`Snapshot::try_serialize_table`]).
    pub fn serialize_table(snapshots: &[Snapshot]) -> Vec<u8> {
        match Self::try_serialize_table(snapshots) {
            Ok(v) => v,
            Err(e) => panic!("cannot serialize snapshot table: {e}"),
        }
    }
}
