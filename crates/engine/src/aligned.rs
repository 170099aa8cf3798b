//! Aligned I/O (layer 3): the one place that turns byte ranges into what the backend can do
//! (O_DIRECT needs whole aligned blocks), with bounce buffers for unaligned reads and a
//! read-modify-write for unaligned writes, under the read-modify-write lock that [`Aligned`]
//! owns. Every operation carries a [`Keep`] (I9).

use crate::{Error, Result};
use blockio::{Backend, IoBuf, Keep};
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;

/// The read-modify-write lock of one image: with O_DIRECT, an unaligned write is a
/// read-modify-write of whole blocks and holds it exclusively; aligned data writes hold it
/// shared; so no write lands between the read and the write-back of a block. The guard goes
/// with the write's I/O (I9).
#[derive(Default)]
pub(crate) struct Aligned {
    rmw: Arc<async_lock::RwLock<()>>,
}

impl Aligned {
    /// Writes `r` of the buffer's allocation at `host` of `backend` (bouncing through an
    /// aligned buffer, under the lock, when O_DIRECT's alignment demands it); the write
    /// carries `keep`. Gives the buffer back with its window as it was.
    pub(crate) async fn write_data<B: Backend>(
        &self,
        backend: &B,
        mut buf: IoBuf,
        r: Range<usize>,
        host: u64,
        keep: Keep,
    ) -> (std::io::Result<()>, IoBuf) {
        let window = buf.window();
        buf.set_window(r);
        let align = backend.alignment().max(1);
        let res = if align == 1 {
            let (res, b) = with_keep(buf, keep, |b| backend.write_at(b, host)).await;
            buf = b;
            res
        } else if buf.is_aligned_to(align) && host % align as u64 == 0 {
            let shared = Keep::new(self.rmw.read_arc().await);
            let (res, b) = with_keep(buf, keep.and(shared), |b| backend.write_at(b, host)).await;
            buf = b;
            res
        } else {
            let exclusive = Keep::new(self.rmw.write_arc().await);
            write_unaligned(backend, &buf, host, keep.and(exclusive)).await
        };
        buf.set_window(window);
        (res, buf)
    }

    /// Writes metadata `bytes` at `offset` of `backend` (a read-modify-write under the lock
    /// where O_DIRECT's alignment demands it); the write carries `keep`.
    pub(crate) async fn write_bytes<B: Backend>(
        &self,
        backend: &B,
        offset: u64,
        bytes: &[u8],
        keep: Keep,
    ) -> std::io::Result<()> {
        let align = backend.alignment().max(1) as u64;
        let keep = if offset % align != 0 || bytes.len() as u64 % align != 0 {
            keep.and(Keep::new(self.rmw.write_arc().await))
        } else {
            keep
        };
        write_unaligned(backend, bytes, offset, keep).await
    }
}

/// Reads `[offset, offset+len)` of a backend into a fresh buffer, zero padded past EOF, with
/// the alignment the backend needs.
pub(crate) async fn read_bytes<B: Backend>(
    backend: &B,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<IoBuf> {
    read_bytes_kept(backend, offset, len, what, Keep::none()).await
}

/// [`read_bytes`], the read carrying `keep`.
pub(crate) async fn read_bytes_kept<B: Backend>(
    backend: &B,
    offset: u64,
    len: u64,
    what: &str,
    keep: Keep,
) -> Result<IoBuf> {
    let align = backend.alignment().max(1) as u64;
    let start = offset / align * align;
    let end = offset
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(align))
        .ok_or_else(|| {
            Error::io(
                format!("reading {what}"),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("range {offset:#x}+{len:#x} overflows"),
                ),
            )
        })?;
    // Callers bound `len` (header area, validated table sizes, one cluster).
    let mut buf = IoBuf::with_alignment((end - start) as usize, align as usize);
    buf.attach(keep);
    let (res, b) = blockio::read_zero_padded(backend, buf, start).await;
    buf = b;
    drop(buf.take_keep());
    res.map_err(|e| Error::io(format!("reading {what}"), e))?;
    buf.set_window((offset - start) as usize..(offset - start + len) as usize);
    Ok(buf)
}

/// The longest buffer [`IoBuf::new`] can allocate on this platform: the largest size whose
/// page-aligned layout fits in `isize::MAX` bytes.
pub(crate) const MAX_BUFFER_LEN: u64 = isize::MAX as u64 + 1 - blockio::DEFAULT_ALIGN as u64;

/// A new buffer for a guest read of `len` bytes at `offset`: [`Error::RequestTooLarge`]
/// for a length no buffer can have, then, when reads past the disk's end fail (`size` is
/// the disk's), [`Error::OutOfRange`] for a range past it, both before allocating.
pub(crate) fn read_buf(offset: u64, len: u64, size: Option<u64>) -> Result<IoBuf> {
    let n = usize::try_from(len)
        .ok()
        .filter(|_| len <= MAX_BUFFER_LEN)
        .ok_or(Error::RequestTooLarge {
            offset,
            len,
            max: MAX_BUFFER_LEN,
        })?;
    if let Some(size) = size {
        Error::check_range(offset, len, size)?;
    }
    Ok(IoBuf::new(n))
}

/// Runs `op` on `buf` with `keep` attached (so that it lives until the backend is done with
/// the operation, even if this future is dropped), and gives the buffer back carrying only
/// what it carried before.
pub(crate) async fn with_keep<T, F, Fut>(mut buf: IoBuf, keep: Keep, op: F) -> (T, IoBuf)
where
    F: FnOnce(IoBuf) -> Fut,
    Fut: Future<Output = (T, IoBuf)>,
{
    let theirs = buf.take_keep();
    buf.attach(theirs.clone().and(keep));
    let (r, mut buf) = op(buf).await;
    drop(buf.take_keep());
    buf.attach(theirs);
    (r, buf)
}

/// Reads `[host, host + r.len())` of `backend` into `r` of the buffer's allocation, zero
/// padded past EOF, bouncing through an aligned buffer when O_DIRECT's alignment demands it.
/// The read carries `keep`.
pub(crate) async fn read_data<B: Backend>(
    backend: &B,
    mut buf: IoBuf,
    r: Range<usize>,
    host: u64,
    keep: Keep,
) -> (std::io::Result<()>, IoBuf) {
    let align = backend.alignment().max(1);
    let window = buf.window();
    buf.set_window(r.clone());
    if align == 1 || (buf.is_aligned_to(align) && host % align as u64 == 0) {
        let (res, mut b) =
            with_keep(buf, keep, |b| blockio::read_zero_padded(backend, b, host)).await;
        b.set_window(window);
        return (res, b);
    }
    let a = align as u64;
    let start = host / a * a;
    let end = (host + r.len() as u64).div_ceil(a) * a;
    let mut bounce = IoBuf::with_alignment((end - start) as usize, align);
    bounce.attach(keep);
    let (res, bounce) = blockio::read_zero_padded(backend, bounce, start).await;
    if res.is_ok() {
        let from = (host - start) as usize;
        buf.copy_from_slice(&bounce[from..from + r.len()]);
    }
    buf.set_window(window);
    (res, buf)
}

/// Writes `bytes` at `offset`, reading and rewriting the surrounding aligned blocks when
/// the backend needs aligned I/O (O_DIRECT). The write carries `keep`.
pub(crate) async fn write_unaligned<B: Backend>(
    backend: &B,
    bytes: &[u8],
    offset: u64,
    keep: Keep,
) -> std::io::Result<()> {
    let align = backend.alignment().max(1) as u64;
    if align == 1 || (offset % align == 0 && bytes.len() as u64 % align == 0) {
        let mut buf = IoBuf::from_slice(bytes);
        buf.attach(keep);
        let (res, _) = backend.write_at(buf, offset).await;
        return res;
    }
    let start = offset / align * align;
    let end = (offset + bytes.len() as u64).div_ceil(align) * align;
    let mut buf = IoBuf::with_alignment((end - start) as usize, align as usize);
    buf.attach(keep);
    let (res, mut buf) = blockio::read_zero_padded(backend, buf, start).await;
    res?;
    let from = (offset - start) as usize;
    buf[from..from + bytes.len()].copy_from_slice(bytes);
    let (res, _) = backend.write_at(buf, start).await;
    res
}
