//! The snapshot table as `qemu-img check` reads and repairs it (QEMU's
//! `qcow2_check_read_snapshot_table`, `qcow2_do_read_snapshots` in repair mode and
//! `qcow2_check_fix_snapshot_table`).
//!
//! A plain check refuses what QEMU's open refuses (more than 65536 snapshots, a table over
//! 64 MiB, more than 1 KiB of extra data in an entry): the check fails, naming the problem
//! and the repair. `-r all` instead drops the snapshots past either limit (the header's
//! count is lowered at once, which only leaks: the refcount pass then frees what they held)
//! and cuts extra data down to 1 KiB; v3 entries with less than 16 bytes of extra data are
//! corruptions too. After the refcount pass, cut or incomplete entries are fixed by
//! rewriting the whole table through the snapshot module's writer
//! ([`Store::write_snapshot_table`](crate::meta::Store)): new clusters, durable, then the
//! header, then the old table freed ([`Image::repair`](crate::Image::repair) does it, with
//! the allocator a read-write image has).
//!
//! Entries are read as QEMU reads them: bytes past the end of the file read as zeros.

use super::*;
use qcow2_format::limits::{MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES};

/// Bytes of the table read at a time.
const CHUNK: u64 = 1 << 20;

/// QEMU's bound on how far the read position may run from the table's start (`INT_MAX`).
const MAX_TABLE_SPAN: u64 = i32::MAX as u64;

/// What reading the snapshot table for a check found.
#[derive(Debug, Default)]
pub(super) struct TableRead {
    /// The snapshots kept (all of them, but for a repair past a limit).
    pub(super) snapshots: Vec<Snapshot>,
    /// Bytes from the table's start to the end of the last kept entry, as on disk (QEMU's
    /// `snapshots_size`: what the refcount pass counts).
    pub(super) size: u64,
    /// Snapshots dropped off the end (count).
    pub(super) reduced: u64,
    /// Entries whose extra data was cut to 1 KiB.
    pub(super) extra_dropped: u64,
}

/// Reads the file, bytes past its end as zeros, a chunk at a time.
struct ZeroPadded<'a, B> {
    file: &'a B,
    file_len: u64,
    start: u64,
    buf: Vec<u8>,
}

impl<B: Backend> ZeroPadded<'_, B> {
    async fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        let mut pos = offset;
        let end = offset.saturating_add(len);
        while pos < end {
            let cached_end = self.start + self.buf.len() as u64;
            if pos < self.start || pos >= cached_end {
                self.start = pos;
                let n = CHUNK.min(self.file_len.saturating_sub(pos));
                self.buf = if n == 0 {
                    Vec::new()
                } else {
                    read_bytes(self.file, pos, n, "snapshot table")
                        .await?
                        .to_vec()
                };
                if self.buf.is_empty() {
                    // Past the end of the file: zeros.
                    out.resize(out.len() + (end - pos) as usize, 0);
                    return Ok(out);
                }
            }
            let from = (pos - self.start) as usize;
            let take = ((end - pos) as usize).min(self.buf.len() - from);
            out.extend_from_slice(&self.buf[from..from + take]);
            pos += take as u64;
        }
        Ok(out)
    }
}

impl<B: Backend> Checker<'_, B> {
    /// Reads the snapshot table as QEMU's check does, repairing the limits when `fix` allows
    /// errors to be fixed (snapshots dropped count as fixed corruptions at once); adds its
    /// lines to the messages. Returns the corruptions that only a rewrite of the table fixes
    /// (cut extra data, incomplete v3 entries), which the caller counts after the refcount
    /// pass (QEMU keeps them apart from it). An `Err` fails the check, as QEMU's does.
    pub(super) async fn read_snapshot_table(&mut self, fix: Fix) -> Step<u64> {
        let n = self.header.nb_snapshots;
        let offset = self.header.snapshots_offset;
        let mut count = u64::from(n);
        let mut read = TableRead::default();
        if count > u64::from(MAX_SNAPSHOTS) && fix.errors {
            let excess = count - u64::from(MAX_SNAPSHOTS);
            msg!(self, "Discarding {excess} overhanging snapshots");
            read.reduced += excess;
            count = u64::from(MAX_SNAPSHOTS);
        }
        // qcow2_validate_table.
        let invalid = if count > u64::from(MAX_SNAPSHOTS) {
            Some(("snapshot table too large", EFBIG))
        } else if (i64::MAX as u64) - count * (Snapshot::FIXED_LEN as u64) < offset
            || !self.is_aligned(offset)
        {
            Some(("snapshot table offset invalid", EINVAL))
        } else {
            None
        };
        if let Some((what, errno)) = invalid {
            self.res.check_errors += 1;
            msg!(self, "ERROR {what}");
            if count > u64::from(MAX_SNAPSHOTS) {
                msg!(
                    self,
                    "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                    count - u64::from(MAX_SNAPSHOTS)
                );
            }
            return Err(Abort(errno.into()));
        }
        if count > 0 {
            if let Err((line, hint, errno)) = self.read_entries(fix, count, &mut read).await? {
                self.res.check_errors += 1;
                msg!(self, "ERROR failed to read the snapshot table: {line}");
                if let Some(hint) = hint {
                    msg!(self, "{hint}");
                }
                return Err(Abort(errno.into()));
            }
        }
        if read.reduced > 0 {
            // The header's count now, before the refcount pass (which counts what the header
            // names): only leaks what the dropped snapshots held, which that pass frees.
            let mut header = self.header.clone();
            header.nb_snapshots = read.snapshots.len() as u32;
            // nb_snapshots, bytes 60..64.
            if let Err(Abort(e)) = self.write_header_fields(&header, 60..64).await {
                self.res.check_errors += 1;
                msg!(
                    self,
                    "ERROR failed to update the snapshot count in the image header: {e}"
                );
                return Err(Abort(e));
            }
            self.header = header;
            self.res.corruptions_fixed += read.reduced;
        }
        let mut rewrite = read.extra_dropped;
        if self.header.version >= 3 {
            let word = if fix.errors { "Repairing" } else { "ERROR" };
            let incomplete: Vec<usize> = (read.snapshots.iter().enumerate())
                .filter(|(_, s)| s.extra_data.len() < 16)
                .map(|(i, _)| i)
                .collect();
            for i in incomplete {
                msg!(self, "{word} snapshot table entry {i} is incomplete");
                rewrite += 1;
            }
        }
        self.snapshots_size = read.size;
        self.snapshots = Ok(read.snapshots);
        Ok(rewrite)
    }

    /// Reads `count` entries into `read` (qcow2_do_read_snapshots). The inner error is the
    /// line QEMU prints, its hint, and the errno text the check fails with.
    async fn read_entries(
        &mut self,
        fix: Fix,
        count: u64,
        read: &mut TableRead,
    ) -> Step<std::result::Result<(), (String, Option<String>, &'static str)>> {
        let start = self.header.snapshots_offset;
        let mut file = ZeroPadded {
            file: self.img.files.image(),
            file_len: self.file_len,
            start: 0,
            buf: Vec::new(),
        };
        let mut offset = start;
        let mut table_length = 0u64;
        for i in 0..count {
            let pre_offset = offset;
            table_length = table_length.div_ceil(8) * 8;
            offset = offset.div_ceil(8) * 8;
            let fixed = file.read(offset, Snapshot::FIXED_LEN as u64).await?;
            offset += Snapshot::FIXED_LEN as u64;
            let (id_len, name_len, extra_len) =
                Snapshot::declared_lengths(&fixed).map_err(|e| Abort(e.to_string()))?;
            let mut kept = extra_len;
            if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
                if !fix.errors {
                    return Ok(Err((
                        format!("Too much extra metadata in snapshot table entry {i}"),
                        Some(
                            "You can force-remove this extra metadata with qemu-img check -r all"
                                .into(),
                        ),
                        EFBIG,
                    )));
                }
                msg!(
                    self,
                    "Discarding too much extra metadata in snapshot table entry {i} \
                     ({extra_len} > {MAX_SNAPSHOT_EXTRA_DATA})"
                );
                read.extra_dropped += 1;
                kept = MAX_SNAPSHOT_EXTRA_DATA;
            }
            let extra = file.read(offset, u64::from(kept)).await?;
            offset += u64::from(extra_len);
            let id = file.read(offset, u64::from(id_len)).await?;
            offset += u64::from(id_len);
            let name = file.read(offset, u64::from(name_len)).await?;
            offset += u64::from(name_len);
            table_length += Snapshot::FIXED_LEN as u64
                + u64::from(kept)
                + u64::from(id_len)
                + u64::from(name_len);
            if table_length > MAX_SNAPSHOT_TABLE_BYTES || offset - start > MAX_TABLE_SPAN {
                let left = count - i;
                if !fix.errors {
                    return Ok(Err((
                        "Snapshot table is too big".into(),
                        Some(format!(
                            "You can force-remove all {left} overhanging snapshots with \
                             qemu-img check -r all"
                        )),
                        EFBIG,
                    )));
                }
                msg!(
                    self,
                    "Discarding {left} overhanging snapshots (snapshot table is too big)"
                );
                read.reduced += left;
                offset = pre_offset;
                break;
            }
            // QEMU keeps the id and name as C strings: up to their first NUL.
            let c_str = |b: &[u8]| b.iter().position(|&c| c == 0).unwrap_or(b.len());
            let (id, name) = (&id[..c_str(&id)], &name[..c_str(&name)]);
            let sn = Snapshot::parse_parts(&fixed, &extra, id, name, i as usize)
                .map_err(|e| Abort(e.to_string()));
            match sn {
                Ok(mut sn) => {
                    // QEMU takes a missing disk size for the disk's (and writes it when it
                    // rewrites the table, which makes an incomplete v3 entry complete).
                    sn.disk_size = sn.disk_size.or(Some(self.img.header.size / 512 * 512));
                    read.snapshots.push(sn);
                }
                Err(Abort(e)) => return Ok(Err((e, None, EINVAL))),
            }
        }
        read.size = offset - start;
        Ok(Ok(()))
    }
}
