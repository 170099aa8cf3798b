//! An in-memory backend: a growable byte vector shared by clones.

use crate::{Backend, BufResult, IoBuf, Keep, OpenOptions, Opener};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A file held in memory. Clones share the same bytes. Flush is a no-op (nothing is volatile).
///
/// Every operation completes within its first poll, so a dropped future has either done all
/// of its work or none of it; keeps are dropped before the future returns.
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    data: Arc<Mutex<Vec<u8>>>,
    read_only: bool,
}

impl MemoryBackend {
    /// An empty, writable file.
    pub fn new() -> Self {
        Self::default()
    }

    /// A writable file holding `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self {
            data: Arc::new(Mutex::new(bytes)),
            read_only: false,
        }
    }

    /// A read-only view sharing the same bytes.
    pub fn read_only(&self) -> Self {
        Self {
            data: self.data.clone(),
            read_only: true,
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the Vec in a broken state.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EBADF))
        } else {
            Ok(())
        }
    }
}

fn end_of(offset: u64, len: u64) -> io::Result<usize> {
    offset
        .checked_add(len)
        .and_then(|e| usize::try_from(e).ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

impl Backend for MemoryBackend {
    async fn read_at(&self, mut buf: IoBuf, offset: u64) -> BufResult<usize> {
        let data = self.lock();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        drop(data);
        (Ok(n), buf)
    }

    async fn write_at(&self, buf: IoBuf, offset: u64) -> BufResult<()> {
        if let Err(e) = self.check_writable() {
            return (Err(e), buf);
        }
        let end = match end_of(offset, buf.len() as u64) {
            Ok(e) => e,
            Err(e) => return (Err(e), buf),
        };
        let mut data = self.lock();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(&buf);
        drop(data);
        (Ok(()), buf)
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn flush_failures(&self) -> u64 {
        0
    }

    async fn punch_hole(&self, offset: u64, len: u64, _keep: Keep) -> io::Result<()> {
        self.check_writable()?;
        let end = end_of(offset, len)?;
        let mut data = self.lock();
        let l = data.len();
        let (s, e) = ((offset as usize).min(l), end.min(l));
        data[s..e].fill(0);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _keep: Keep) -> io::Result<()> {
        self.check_writable()?;
        let end = end_of(offset, len)?;
        let mut data = self.lock();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].fill(0);
        Ok(())
    }

    async fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    async fn preallocate(&self, len: u64, _keep: Keep) -> io::Result<()> {
        // Grow-only under one lock: a write that lengthened the file meanwhile is never cut.
        self.check_writable()?;
        let len = end_of(0, len)?;
        let mut data = self.lock();
        if data.len() < len {
            data.resize(len, 0);
        }
        Ok(())
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let len = end_of(0, len)?;
        self.lock().resize(len, 0);
        Ok(())
    }

    fn alignment(&self) -> usize {
        1
    }

    fn is_writable(&self) -> bool {
        !self.read_only
    }
}

/// Opens [`MemoryBackend`]s by path from a shared map: a file system in memory, so that the
/// engine can open backing files in tests. Clones share the map.
///
/// `create` makes an empty file if the path is missing, `truncate` empties it, a missing path
/// without `create` is [`io::ErrorKind::NotFound`], and a file opened without write access
/// is a [`MemoryBackend::read_only`] view. `direct` is accepted and ignored.
#[derive(Clone, Debug, Default)]
pub struct MemoryOpener {
    files: Arc<Mutex<HashMap<PathBuf, MemoryBackend>>>,
}

impl MemoryOpener {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `backend` at `path` (replacing what was there); opening `path` then shares its
    /// bytes.
    pub fn insert(&self, path: impl Into<PathBuf>, backend: MemoryBackend) {
        self.lock().insert(path.into(), backend);
    }

    /// The file at `path`, if any (writable, sharing its bytes).
    pub fn get(&self, path: impl AsRef<Path>) -> Option<MemoryBackend> {
        self.lock().get(path.as_ref()).cloned()
    }

    /// Removes the file at `path`, returning it.
    pub fn remove(&self, path: impl AsRef<Path>) -> Option<MemoryBackend> {
        self.lock().remove(path.as_ref())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, MemoryBackend>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open_now(&self, path: &Path, options: OpenOptions) -> io::Result<MemoryBackend> {
        let write = crate::file::writes(options);
        let mut files = self.lock();
        let file = match files.get(path) {
            Some(f) => f.clone(),
            None if options.create => {
                let f = MemoryBackend::new();
                files.insert(path.to_path_buf(), f.clone());
                f
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: no such file in the memory opener", path.display()),
                ))
            }
        };
        drop(files);
        if options.truncate {
            file.lock().clear();
        }
        Ok(if write { file } else { file.read_only() })
    }
}

impl Opener for MemoryOpener {
    type Backend = MemoryBackend;

    async fn open(&self, path: &Path, options: OpenOptions) -> io::Result<MemoryBackend> {
        self.open_now(path, options)
    }
}
