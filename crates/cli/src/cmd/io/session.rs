//! The `qimg io` commands that manage the image rather than do I/O on it: `open`, `reopen`,
//! `info`, `truncate`, and copy-on-read (`-C`), which follows reads.

use super::exec::{err, hold, out, Session};
use super::open::{open_disk, takes_option, OpenSpec};
use super::parse::{Open, Reopen};
use super::report::cvtstr;
use crate::util::program;
use crate::util::strerror;
use blockio::Opener;
use qcow2_engine::{Disk, Error, Preallocation, ResizeOptions};
use qcow2_format::{BitmapDirectoryEntry, CompressionType};
use std::path::PathBuf;
use std::rc::Rc;

/// The most copy-on-read reads at once (QEMU's `MAX_BOUNCE_BUFFER`): a run of clusters the
/// image does not allocate is copied in pieces of this size, each written as zeros if it
/// reads as zeros.
const MAX_BOUNCE_BUFFER: u64 = 32768 << 9;

fn report(msg: &str) {
    err(&format!("{}: {msg}\n", program()));
}

impl<O: Opener> Session<O> {
    /// Opens the image at `path` as `spec` says (when none is open); `false`, with
    /// qemu-io's message, if it cannot.
    pub async fn open(&mut self, path: PathBuf, spec: OpenSpec) -> bool {
        if self.disk.is_some() {
            report("file open already, try 'help close'");
            return false;
        }
        let shown = path.display().to_string();
        self.attach(path, spec)
            .await
            .map_err(|e| report(&format!("can't open device {shown}: {e}")))
            .is_ok()
    }

    /// Opens the image at `path` as `spec` says and makes it the session's; the reason it
    /// cannot be opened otherwise.
    async fn attach(&mut self, path: PathBuf, spec: OpenSpec) -> Result<(), String> {
        let disk = open_disk(self.opener.clone(), &path, &spec).await?;
        self.disk = Some(Rc::new(disk));
        self.opened = Some((path, spec));
        Ok(())
    }

    /// The `open` command.
    pub(super) async fn open_cmd(&mut self, o: Open) -> bool {
        if self.disk.is_some() {
            report("file open already, try 'help close'");
            return false;
        }
        let Some(path) = o.path else {
            report(
                if o.spec.driver_options.iter().any(|(k, _)| k == "driver") {
                    "can't open: A block device must be specified for \"file\""
                } else {
                    "can't open: Must specify either driver or file"
                },
            );
            return false;
        };
        if o.aio.is_some_and(|aio| aio != self.aio) {
            report("open: -i must name the backend of the command line's -i");
            return false;
        }
        self.open(path.into(), o.spec).await
    }

    /// `reopen`: the image opened again with `-r`/`-w` and `-c` changed (a temporary
    /// overlay of `-s` only changes what it accepts). If the new open fails, the image stays
    /// open as it was.
    pub(super) async fn reopen(&mut self, r: Reopen) -> bool {
        let Some((path, old)) = self.opened.clone() else {
            return false;
        };
        let format = self.d().format();
        for (key, value) in &r.driver_options {
            let same_driver = key == "driver" && value.as_deref() == Some(format.name());
            if !same_driver && (key == "driver" || !takes_option(format, key)) {
                report(&format!("Cannot change the option '{key}'"));
                return false;
            }
        }
        let mut driver_options = old.driver_options.clone();
        driver_options.extend(r.driver_options);
        let new = OpenSpec {
            read_only: r.read_only.unwrap_or(old.read_only),
            cache: r.cache.unwrap_or(old.cache),
            driver_options,
            ..old.clone()
        };
        if new.read_only && new.copy_on_read {
            report("Can't set node to r/o with copy-on-read enabled");
            return false;
        }
        if old.snapshot {
            self.opened = Some((path, new));
            return true;
        }
        if !self.close().await {
            return false;
        }
        match self.attach(path.clone(), new).await {
            Ok(()) => true,
            Err(e) => {
                report(&e);
                self.open(path, old).await;
                false
            }
        }
    }

    /// `info`: the format, cluster size, VM state offset and, for qcow2, the format-specific
    /// information, as qemu-io prints them.
    pub(super) async fn info(&self) -> bool {
        let disk = self.d();
        let Some(img) = disk.as_qcow2() else {
            out(&format!(
                "format name: {}\ncluster size: 0 bytes\nvm state offset: 0 bytes\n",
                disk.format().name()
            ));
            return true;
        };
        let h = img.header();
        let v3 = h.version >= 3;
        let mut text = format!(
            "format name: qcow2\ncluster size: {}\nvm state offset: {}\n\
             Format specific information:\n    compat: {}\n    compression type: {}\n",
            cvtstr(img.cluster_size() as f64),
            cvtstr(img.vm_state_offset() as f64),
            if v3 { "1.1" } else { "0.10" },
            match h.compression_type {
                CompressionType::Zlib => "zlib",
                CompressionType::Zstd => "zstd",
            },
        );
        if v3 {
            text.push_str(&format!("    lazy refcounts: {}\n", h.lazy_refcounts()));
            match img.bitmaps().await {
                Ok(bitmaps) => text.push_str(&bitmaps_info(&bitmaps)),
                Err(e) => {
                    report(&e.to_string());
                    return false;
                }
            }
        }
        text.push_str(&format!(
            "    refcount bits: {}\n",
            h.refcount_width().bits()
        ));
        if h.has_data_file() {
            if let Some(name) = h.data_file_name() {
                text.push_str(&format!("    data file: {name}\n"));
            }
            text.push_str(&format!("    data file raw: {}\n", h.data_file_raw()));
        }
        if v3 {
            text.push_str(&format!(
                "    corrupt: {}\n    extended l2: {}\n",
                h.is_corrupt(),
                h.extended_l2()
            ));
        }
        out(&text);
        true
    }

    /// `truncate`: resizes the disk (shrinking allowed, as qemu-io's `blk_truncate`).
    pub(super) async fn truncate(&mut self, size: u64, prealloc: Preallocation) -> bool {
        let options = ResizeOptions::new().shrink(true).preallocation(prealloc);
        let serial = self.serial();
        let _serial = hold(&serial).await;
        match self.d().resize(size, options).await {
            Ok(()) => true,
            Err(e) => {
                report(&e.to_string());
                false
            }
        }
    }
}

/// The persistent bitmaps as `info` lists them (nothing when there are none).
fn bitmaps_info(bitmaps: &[BitmapDirectoryEntry]) -> String {
    if bitmaps.is_empty() {
        return String::new();
    }
    let mut text = String::from("    bitmaps:\n");
    for (i, b) in bitmaps.iter().enumerate() {
        text.push_str(&format!("        [{i}]:\n            flags:\n"));
        let flags = [
            (BitmapDirectoryEntry::IN_USE, "in-use"),
            (BitmapDirectoryEntry::AUTO, "auto"),
        ];
        let set = flags.iter().filter(|(bit, _)| b.flags & bit != 0);
        for (j, (_, name)) in set.enumerate() {
            text.push_str(&format!("                [{j}]: {name}\n"));
        }
        text.push_str(&format!(
            "            name: {}\n            granularity: {}\n",
            b.name,
            1u64 << b.granularity_bits.min(63)
        ));
    }
    text
}

/// Copy-on-read after a read of `[offset, offset+len)`: the (sub)clusters it touches that
/// the image does not allocate get what the backing chain has for them, run by run, each
/// piece of a run written as zeros if it reads as zeros (QEMU's
/// `bdrv_co_do_copy_on_readv`). Raw images have nothing to copy.
pub(super) async fn copy_on_read<O: Opener>(
    disk: &Disk<O>,
    offset: u64,
    len: u64,
) -> Result<(), String> {
    let Some(img) = disk.as_qcow2() else {
        return Ok(());
    };
    let size = disk.size();
    let cs = img.cluster_size();
    // QEMU aligns the copy to subclusters (clusters without extended L2 entries).
    let granule = if img.header().extended_l2() {
        cs / 32
    } else {
        cs
    };
    let start = offset / granule * granule;
    let end = (offset + len).next_multiple_of(granule).min(size);
    if len == 0 || start >= end {
        return Ok(());
    }
    // Whole clusters, to tell partly allocated ones.
    let (cstart, cend) = (start / cs * cs, end.next_multiple_of(cs).min(size));
    let entries = disk
        .map(cstart, cend - cstart)
        .await
        .map_err(|e| strerror(&e))?;
    let allocated: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| e.present && e.depth == 0)
        .map(|e| (e.start, e.start + e.length))
        .collect();
    // A cluster with allocated subclusters: its unallocated ones are a run of their own kind.
    let partial = |c: u64| {
        let (a, b) = (c, (c + cs).min(size));
        let n: u64 = allocated
            .iter()
            .map(|&(s, e)| e.min(b).saturating_sub(s.max(a)))
            .sum();
        n > 0 && n < b - a
    };
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for e in entries.iter().filter(|e| !(e.present && e.depth == 0)) {
        let (mut at, e_end) = (e.start.max(start), (e.start + e.length).min(end));
        while at < e_end {
            let c = at / cs * cs;
            let seg_end = (c + cs).min(e_end);
            let kind = partial(c);
            match runs.last_mut() {
                Some((_, last_end, k)) if *last_end == at && *k == kind => *last_end = seg_end,
                _ => runs.push((at, seg_end, kind)),
            }
            at = seg_end;
        }
    }
    for (mut at, end, _) in runs {
        while at < end {
            let n = (end - at).min(MAX_BOUNCE_BUFFER);
            copy_piece(disk, at, n).await.map_err(|e| strerror(&e))?;
            at += n;
        }
    }
    Ok(())
}

async fn copy_piece<O: Opener>(disk: &Disk<O>, at: u64, n: u64) -> Result<(), Error> {
    // At most MAX_BOUNCE_BUFFER.
    let buf = disk.read(at, n).await?;
    if buf.iter().all(|&b| b == 0) {
        return disk.write_zeroes(at, n, false).await;
    }
    let (res, _) = disk.write_at(buf, at).await;
    res
}
