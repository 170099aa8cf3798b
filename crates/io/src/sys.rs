//! Thin libc helpers shared by the file backends (raw file descriptors, no async).

use std::io;
use std::os::unix::io::RawFd;

/// Returned by [`fallocate`] on systems without it.
#[cfg(not(target_os = "linux"))]
const UNSUPPORTED: i32 = libc::EOPNOTSUPP;

/// Whether `e` says the file system (or kernel) does not support the requested fallocate mode.
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == libc::EOPNOTSUPP || c == libc::ENOTSUP || c == libc::ENOSYS)
}

/// Converts a byte position for a syscall, refusing values past `off_t`'s range.
pub(crate) fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// `fallocate(2)`, retried on EINTR.
#[cfg(target_os = "linux")]
pub(crate) fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)?, to_off(len)?);
    loop {
        // SAFETY: plain syscall on a descriptor the caller keeps open.
        if unsafe { libc::fallocate(fd, mode, off, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `fallocate(2)` does not exist here: always "unsupported", so callers take their fallback.
#[cfg(not(target_os = "linux"))]
pub(crate) fn fallocate(_fd: RawFd, _mode: i32, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(UNSUPPORTED))
}

/// `preadv2(RWF_NOWAIT)`: reads what the page cache holds of the range without waiting for
/// the disk (EAGAIN when the first page is not there; a short count when a later one is not).
#[cfg(target_os = "linux")]
pub(crate) fn pread_nowait(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let off = to_off(offset)?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over `buf`, which outlives the call; plain syscall otherwise.
    let n = unsafe { libc::preadv2(fd, &iov, 1, off, libc::RWF_NOWAIT) };
    match n {
        n if n >= 0 => Ok(n as usize),
        _ => Err(io::Error::last_os_error()),
    }
}

/// No `preadv2` here: "unsupported", so callers read the usual way.
#[cfg(not(target_os = "linux"))]
pub(crate) fn pread_nowait(_fd: RawFd, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
    Err(io::Error::from_raw_os_error(UNSUPPORTED))
}

/// Mode bits for punching a hole without changing the file size.
#[cfg(target_os = "linux")]
pub(crate) const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// Mode bits for zeroing a range (extending the file when it ends past EOF).
#[cfg(target_os = "linux")]
pub(crate) const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;
#[cfg(not(target_os = "linux"))]
pub(crate) const PUNCH_HOLE: i32 = 0;
#[cfg(not(target_os = "linux"))]
pub(crate) const ZERO_RANGE: i32 = 0;

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value; fstat fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn is_block_device(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFBLK
}

/// The file's length: `st_size` for a regular file, the device size for a block device.
pub(crate) fn file_len(fd: RawFd) -> io::Result<u64> {
    let st = fstat(fd)?;
    if is_block_device(&st) {
        // Positional I/O ignores the file offset, so moving it is harmless.
        // SAFETY: plain syscall.
        let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(end as u64);
    }
    Ok(st.st_size as u64)
}

/// `ftruncate(2)`, retried on EINTR.
pub(crate) fn set_len(fd: RawFd, len: u64) -> io::Result<()> {
    let len = to_off(len)?;
    loop {
        // SAFETY: plain syscall.
        if unsafe { libc::ftruncate(fd, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// [`Backend::preallocate`](crate::Backend::preallocate) on a descriptor: `fallocate` mode 0
/// over what lies past the end of the file, or (without fallocate) an extension by
/// `ftruncate`. Concurrent writers can only lengthen the file meanwhile, and mode 0 leaves
/// the data it meets untouched.
pub(crate) fn preallocate(fd: RawFd, len: u64) -> io::Result<()> {
    let cur = file_len(fd)?;
    if cur >= len {
        return Ok(());
    }
    match fallocate(fd, 0, cur, len - cur) {
        Err(e) if is_unsupported(&e) => extend_to(fd, len),
        r => r,
    }
}

/// Extends the file to `len` if it is shorter (never shrinks). Not atomic against concurrent
/// writers; used only by the write-zeroes fallback.
pub(crate) fn extend_to(fd: RawFd, len: u64) -> io::Result<()> {
    if file_len(fd)? < len {
        set_len(fd, len)?;
    }
    Ok(())
}

/// Alignment used when nothing better can be learnt: a page, enough for every device.
const FALLBACK_ALIGN: usize = 4096;

/// The alignment O_DIRECT needs on `fd`: `statx(STATX_DIOALIGN)` (Linux 6.1+), else the
/// logical block size for a block device (`BLKSSZGET`), else 4096.
pub(crate) fn direct_alignment(fd: RawFd) -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if let Some(a) = statx_dio_align(fd) {
        return a;
    }
    #[cfg(target_os = "linux")]
    if let Ok(st) = fstat(fd) {
        if is_block_device(&st) {
            let mut size: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int.
            if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut size) } == 0 && size > 0 {
                let size = size as usize;
                if size.is_power_of_two() {
                    return size;
                }
            }
        }
    }
    let _ = fd;
    FALLBACK_ALIGN
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn statx_dio_align(fd: RawFd) -> Option<usize> {
    // SAFETY: an all-zero statx is a valid value; statx fills it in.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: empty path with AT_EMPTY_PATH queries the descriptor itself.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let a = stx.stx_dio_offset_align.max(stx.stx_dio_mem_align) as usize;
    // 0 means "O_DIRECT not supported on this file": let the I/O report it.
    (a > 0 && a.is_power_of_two()).then_some(a)
}

/// Turns an `open` failure with O_DIRECT into a message saying what went wrong.
pub(crate) fn direct_open_error(path: &std::path::Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::EINVAL) {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: the file system refuses O_DIRECT (cache=none); use cached I/O or another \
                 file system ({e})",
                path.display()
            ),
        )
    } else {
        e
    }
}

/// The error for an O_DIRECT request that breaks the alignment rule (the kernel would say
/// EINVAL without saying why).
pub(crate) fn misaligned(
    what: &str,
    offset: u64,
    buf_addr: usize,
    len: usize,
    align: usize,
) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "O_DIRECT {what} not aligned to {align}: offset {offset}, buffer address {buf_addr:#x}, \
             length {len}"
        ),
    )
}

/// Reads `fcntl(F_GETFL)`.
pub(crate) fn status_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Data or hole at `offset`, and for how long (at most `len`), from SEEK_DATA/SEEK_HOLE.
pub(crate) fn allocation(fd: RawFd, offset: u64, len: u64) -> io::Result<crate::Allocation> {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Ok(crate::Allocation { data: false, len });
    };
    // SAFETY: lseek on a valid fd has no memory effects.
    let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // No data from here to the end of the file: a trailing hole.
            Some(libc::ENXIO) => Ok(crate::Allocation { data: false, len }),
            // No hole support: all data.
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                Ok(crate::Allocation { data: true, len })
            }
            _ => Err(e),
        };
    }
    let data = data as u64;
    if data > offset {
        return Ok(crate::Allocation {
            data: false,
            len: (data - offset).min(len),
        });
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
    if hole < 0 {
        return Ok(crate::Allocation { data: true, len });
    }
    let run = (hole as u64).saturating_sub(offset);
    Ok(crate::Allocation {
        data: true,
        len: if run == 0 { len } else { run.min(len) },
    })
}

/// Bytes of storage the file occupies (st_blocks * 512).
pub(crate) fn allocated_size(fd: RawFd) -> io::Result<u64> {
    Ok(fstat(fd)?.st_blocks as u64 * 512)
}
