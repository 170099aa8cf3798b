//! Changing an image's backing file (`qemu-img rebase`).
//!
//! In safe mode every range the image does not allocate itself, and that reads differently
//! through the old backing chain and the new backing file, is copied into the image first
//! (its guest contents stay what they were); then one header write names the new backing
//! file. The data and metadata are made durable before that write: a crash before it leaves
//! the old backing file named with some of its data copied (the same contents), after it the
//! new one. Unsafe mode (`-u`) only rewrites the header.

use crate::amend::qemu_extensions;
use crate::image::{Disk, Image};
use crate::options::ImageFormat;
use crate::{Error, Result};
use blockio::Opener;
use qcow2_format::HeaderExtension;

/// The bytes compared (and copied) per step of a safe rebase.
const STEP: u64 = 1 << 20;

/// The unit a safe rebase compares and copies in.
const SECTOR: u64 = 512;

/// The backing file an image is rebased onto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBacking {
    /// The name written into the header (relative names are relative to the image's
    /// directory, as QEMU resolves them).
    pub name: String,
    /// Its format, written into the header's backing-format extension. QEMU refuses to name
    /// a backing file without one, after a safe rebase copied what it had to (the contents
    /// are the same either way).
    pub format: Option<ImageFormat>,
}

impl<O: Opener> Image<O> {
    /// Changes the backing file to `new` (none: the image stands alone), then closes the
    /// image, as `qemu-img rebase` does. With `contents` (safe mode) the backing file as
    /// opened (`None` when `new` is `None`, or to read zeros) gives what the new chain
    /// would read, and every range that would read differently is copied into the image
    /// from the old chain first, so the guest sees the same disk; without it (`-u`) only
    /// the header changes. In safe mode `compared` is called with each range (offset,
    /// length) the image does not allocate, in order, once it was compared (and copied
    /// where it differs): what `-p` reports.
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`]; [`Error::Unsupported`] when the header cannot hold the name;
    /// [`Error::InvalidOptions`] for a backing file without a format; I/O errors. A failure leaves the old backing file named (data copied so far reads
    /// the same).
    ///
    /// # Cancel safety
    ///
    /// The image is consumed. Dropping the future is dropping an image that was not closed
    /// (see [`Image::close`]); the header names the old backing file unless its write
    /// landed, and either way the guest contents are the old chain's.
    pub async fn rebase(
        self,
        new: Option<&NewBacking>,
        contents: Option<Option<&Disk<O>>>,
        compared: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let r = self.rebase_inner(new, contents, compared).await;
        let closed = self.close().await;
        r.and(closed)
    }

    async fn rebase_inner(
        &self,
        new: Option<&NewBacking>,
        contents: Option<Option<&Disk<O>>>,
        compared: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        self.check_writable(0, 0)?;
        if let Some(backing) = contents {
            self.copy_differences(backing, compared).await?;
        }
        self.make_clean().await?;
        let format = match new {
            Some(NewBacking { name, format: None }) => {
                return Err(Error::InvalidOptions(format!(
                    "Could not change the backing file to '{name}': backing format must be \
                     specified"
                )))
            }
            Some(NewBacking {
                format: Some(f), ..
            }) => Some(f.name()),
            None => None,
        };
        let mut meta = self.meta.lock().await;
        let mut header = meta.header.clone();
        header
            .extensions
            .retain(|e| !matches!(e, HeaderExtension::BackingFormat(_)));
        header.backing_file = new.map(|n| n.name.clone());
        if let Some(f) = format {
            header
                .extensions
                .insert(0, HeaderExtension::BackingFormat(f.into()));
        }
        let data_file = header.data_file_name().map(str::to_owned);
        qemu_extensions(&mut header, data_file);
        self.replace_header(&mut meta, header, "a header naming the new backing file")
            .await
    }

    /// Copies into the image every range it does not allocate whose contents differ between
    /// the old chain and `new` (zeros past its end, or everywhere without one), cluster by
    /// cluster; `compared` is told of each range once done.
    async fn copy_differences(
        &self,
        new: Option<&Disk<O>>,
        compared: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let size = self.size();
        let cs = self.cluster_size();
        let mut off = 0;
        while off < size {
            let n = STEP.min(size - off);
            for e in self.block_status(off, n).await? {
                if !matches!(e.kind, crate::ExtentKind::Unallocated { .. }) {
                    continue;
                }
                let old = self.read(e.offset, e.len).await?;
                let mut theirs = vec![0u8; e.len as usize];
                if let Some(b) = new {
                    let end = (e.offset + e.len).min(b.size());
                    if e.offset < end {
                        let got = b.read(e.offset, end - e.offset).await?;
                        theirs[..got.len()].copy_from_slice(&got);
                    }
                }
                // Each run of differing sectors, cut at cluster boundaries (as QEMU writes
                // them: the rest of a cluster is copy-on-write from the old chain).
                let mut at = e.offset;
                while at < e.offset + e.len {
                    let next = ((at / SECTOR + 1) * SECTOR).min(e.offset + e.len);
                    let r = |a: u64, b: u64| (a - e.offset) as usize..(b - e.offset) as usize;
                    if old[r(at, next)] == theirs[r(at, next)] {
                        at = next;
                        continue;
                    }
                    let mut end = next;
                    while end < e.offset + e.len && end % cs != 0 {
                        let n = (end + SECTOR).min(e.offset + e.len);
                        if old[r(end, n)] == theirs[r(end, n)] {
                            break;
                        }
                        end = n;
                    }
                    self.write(at, &old[r(at, end)]).await?;
                    at = end;
                }
                compared(e.offset, e.len);
            }
            off += n;
        }
        Ok(())
    }
}
