//! Image locking as QEMU's file driver does it (invariant I10), so that QEMU and programs on
//! this crate exclude each other's writes to one file, and two of ours do too.
//!
//! QEMU describes what a user of a file does with it by *permissions* ([`Perms`]: consistent
//! read, write, write unchanged, resize) and which of them it lets others have (`shared`).
//! Its file driver publishes both as open-file-description (OFD) byte-range locks, shared
//! (read) locks of one byte each: byte `100 + i` for each permission `i` it holds, byte
//! `200 + i` for each permission it does *not* share. Opening, it takes its bytes, then
//! tests (`F_OFD_GETLK` with a write lock) whether any other open file description holds
//! byte `200 + i` for a permission `i` it wants ("Failed to get "write" lock") or byte
//! `100 + i` for a permission `i` it does not share ("Failed to get shared "write" lock").
//! OFD locks belong to the open file description, so two opens in one process conflict as
//! two processes do. They would go away when the last descriptor of the description closes,
//! but a copy of it can outlive ours (a child process between `fork` and `exec` holds a copy
//! of every descriptor of its parent): so an open releases its locks explicitly when it is
//! done (`HeldLocks`), and closing then reopening a file in a process that spawns children
//! never meets its own old locks.
//!
//! [`LockRequest`] says which locks an open takes; the engine chooses them per role as QEMU
//! does (see `qcow2_engine::ImageOptions`). [`LockConflict`] is the error, inside an
//! [`io::Error`] of kind [`io::ErrorKind::WouldBlock`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::io::RawFd;

/// A set of QEMU block permissions (`BLK_PERM_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Perms(u8);

impl Perms {
    /// None.
    pub const NONE: Perms = Perms(0);
    /// `BLK_PERM_CONSISTENT_READ`: the contents read are self-consistent.
    pub const CONSISTENT_READ: Perms = Perms(1);
    /// `BLK_PERM_WRITE`: writes that change the contents.
    pub const WRITE: Perms = Perms(2);
    /// `BLK_PERM_WRITE_UNCHANGED`: writes that leave the contents as they read.
    pub const WRITE_UNCHANGED: Perms = Perms(4);
    /// `BLK_PERM_RESIZE`: changing the file's length.
    pub const RESIZE: Perms = Perms(8);
    /// Every permission.
    pub const ALL: Perms = Perms(15);

    /// QEMU's names of the permissions, by bit.
    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    /// Both sets.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// This set without `other`'s permissions.
    pub const fn without(self, other: Perms) -> Perms {
        Perms(self.0 & !other.0)
    }

    /// Whether every permission of `other` is in this set.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// The permission bits, lowest first, as `(bit index, name)`.
    fn bits(self) -> impl Iterator<Item = (u64, &'static str)> {
        (0..4u64)
            .filter(move |i| self.0 & (1 << i) != 0)
            .map(|i| (i, Self::NAMES[i as usize]))
    }
}

impl std::ops::BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        self.union(rhs)
    }
}

/// Whether to lock, as QEMU's `locking` option of its file driver says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// Lock with OFD locks where the system has them, not at all otherwise (QEMU's default).
    #[default]
    Auto,
    /// Lock; without OFD locks, with process-wide POSIX locks (a warning says that those are
    /// lost when the process closes any descriptor of the file).
    On,
    /// Take no lock and test none.
    Off,
}

/// The locks an open takes: QEMU's permissions held, and those shared with others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRequest {
    /// The permissions this open holds.
    pub perm: Perms,
    /// The permissions it lets others hold.
    pub shared: Perms,
    /// Whether to lock at all.
    pub locking: Locking,
}

impl LockRequest {
    /// Holds `perm`, shares `shared`, with QEMU's default locking.
    pub fn new(perm: Perms, shared: Perms) -> Self {
        LockRequest {
            perm,
            shared,
            locking: Locking::Auto,
        }
    }

    /// The same with `locking`.
    pub fn locking(mut self, locking: Locking) -> Self {
        self.locking = locking;
        self
    }
}

/// Another open of the file holds a lock this one conflicts with: QEMU's message, with the
/// permission's name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Failed to get {}\"{perm}\" lock", if *.shared { "shared " } else { "" })]
pub struct LockConflict {
    /// The permission's name ("write", "resize", ...).
    pub perm: &'static str,
    /// `false`: another open does not share a permission this one wants; `true`: another
    /// open holds a permission this one does not share.
    pub shared: bool,
}

impl LockConflict {
    /// The conflict inside `e`, if `e` is one.
    pub fn from_io(e: &io::Error) -> Option<&LockConflict> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<LockConflict>())
    }
}

/// Byte of the lock for holding permission bit `i`.
const PERM_BASE: i64 = 100;
/// Byte of the lock for not sharing permission bit `i`.
const SHARED_BASE: i64 = 200;

/// The locks an open took, released when this drops. It holds its own descriptor of the
/// open file description (a `dup`), so it can release them whenever it drops: before or after
/// the file's descriptor closes, whoever else holds a copy of it.
#[derive(Debug)]
pub(crate) struct HeldLocks {
    fd: OwnedFd,
    setlk: libc::c_int,
}

impl Drop for HeldLocks {
    fn drop(&mut self) {
        // Every byte this crate may have locked; unlocking a byte not held is a no-op. With
        // POSIX locks (no OFD) this releases the process's locks on the file, as closing any
        // of its descriptors would anyway.
        let mut fl = one_byte(PERM_BASE, libc::F_UNLCK);
        fl.l_len = (SHARED_BASE - PERM_BASE) * 2;
        if let Err(e) = fcntl_lock(self.fd.as_raw_fd(), self.setlk, &mut fl) {
            tracing::warn!("releasing the file's locks failed: {e}");
        }
    }
}

/// Takes the locks `req` asks for on `fd` and tests for conflicts, as QEMU's
/// `raw_apply_lock_bytes` and `raw_check_lock_bytes` do. The locks are held until the
/// returned [`HeldLocks`] drops (`None`: `req` asked for none); on an error none are left.
pub(crate) fn lock(fd: RawFd, req: &LockRequest) -> io::Result<Option<HeldLocks>> {
    let ofd = match req.locking {
        Locking::Off => return Ok(None),
        Locking::Auto | Locking::On => has_ofd_locks(fd),
    };
    if !ofd {
        if req.locking == Locking::Auto {
            return Ok(None);
        }
        tracing::warn!(
            "file lock requested but OFD locking is unavailable, falling back to POSIX file \
             locks: they are lost when the process closes any descriptor of the file"
        );
    }
    let (setlk, getlk) = commands(ofd);
    // SAFETY: `fd` is open for the duration of the call (the caller's file).
    let copy = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    // From here on, an early return releases what was taken.
    let held = HeldLocks { fd: copy, setlk };
    for (i, _) in req.perm.bits() {
        set_read_lock(fd, setlk, PERM_BASE + i as i64)?;
    }
    for (i, _) in Perms::ALL.without(req.shared).bits() {
        set_read_lock(fd, setlk, SHARED_BASE + i as i64)?;
    }
    for (i, perm) in req.perm.bits() {
        if locked_by_another(fd, getlk, SHARED_BASE + i as i64)? {
            return Err(conflict(perm, false));
        }
    }
    for (i, perm) in Perms::ALL.without(req.shared).bits() {
        if locked_by_another(fd, getlk, PERM_BASE + i as i64)? {
            return Err(conflict(perm, true));
        }
    }
    Ok(Some(held))
}

fn conflict(perm: &'static str, shared: bool) -> io::Error {
    io::Error::new(io::ErrorKind::WouldBlock, LockConflict { perm, shared })
}

#[cfg(target_os = "linux")]
fn commands(ofd: bool) -> (libc::c_int, libc::c_int) {
    if ofd {
        (libc::F_OFD_SETLK, libc::F_OFD_GETLK)
    } else {
        (libc::F_SETLK, libc::F_GETLK)
    }
}

#[cfg(not(target_os = "linux"))]
fn commands(_ofd: bool) -> (libc::c_int, libc::c_int) {
    (libc::F_SETLK, libc::F_GETLK)
}

/// A `flock` for one byte at `byte` of type `kind`.
fn one_byte(byte: i64, kind: libc::c_int) -> libc::flock {
    // SAFETY: an all-zero flock is a valid value (l_pid 0, as OFD locks require).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

fn fcntl_lock(fd: RawFd, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: fl is a valid flock for the duration of the call.
        if unsafe { libc::fcntl(fd, cmd, fl as *mut libc::flock) } != -1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn set_read_lock(fd: RawFd, setlk: libc::c_int, byte: i64) -> io::Result<()> {
    let mut fl = one_byte(byte, libc::F_RDLCK);
    fcntl_lock(fd, setlk, &mut fl).map_err(|e| {
        if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
            io::Error::new(e.kind(), format!("Failed to lock byte {byte}"))
        } else {
            e
        }
    })
}

/// Whether another open file description holds a lock on `byte` (a write lock there would
/// conflict with it).
fn locked_by_another(fd: RawFd, getlk: libc::c_int, byte: i64) -> io::Result<bool> {
    let mut fl = one_byte(byte, libc::F_WRLCK);
    fcntl_lock(fd, getlk, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether the system has OFD locks (asked on `fd` itself, as a test of one byte).
#[cfg(target_os = "linux")]
fn has_ofd_locks(fd: RawFd) -> bool {
    let mut fl = one_byte(0, libc::F_RDLCK);
    fcntl_lock(fd, libc::F_OFD_GETLK, &mut fl).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn has_ofd_locks(_fd: RawFd) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    fn open(path: &std::path::Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    const RW: Perms = Perms::CONSISTENT_READ
        .union(Perms::WRITE)
        .union(Perms::RESIZE);
    const METADATA: Perms = Perms::ALL.without(Perms::WRITE.union(Perms::RESIZE));

    /// Two opens in one process exclude each other as two processes do: a writer and any
    /// non-sharing reader conflict, readers coexist, and closing drops the locks.
    #[test]
    fn opens_conflict_as_qemus_do() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let writer = LockRequest::new(RW, METADATA);
        let reader = LockRequest::new(Perms::CONSISTENT_READ, METADATA);
        let shared_reader = LockRequest::new(Perms::CONSISTENT_READ, Perms::ALL);

        let w = open(&p);
        let w_locks = lock(w.as_raw_fd(), &writer).unwrap();
        let r = open(&p);
        let e = lock(r.as_raw_fd(), &reader).unwrap_err();
        assert_eq!(
            LockConflict::from_io(&e),
            Some(&LockConflict {
                perm: "write",
                shared: true
            })
        );
        assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
        drop(r);
        let s = open(&p);
        let _s_locks = lock(s.as_raw_fd(), &shared_reader).unwrap();
        let w2 = open(&p);
        let e = lock(w2.as_raw_fd(), &writer).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get \"write\" lock");
        drop(w2);
        drop((w_locks, w));
        let r1 = open(&p);
        let _r1_locks = lock(r1.as_raw_fd(), &reader).unwrap();
        let r2 = open(&p);
        let _r2_locks = lock(r2.as_raw_fd(), &reader).unwrap();
        let w3 = open(&p);
        assert!(
            lock(w3.as_raw_fd(), &writer).is_err(),
            "readers keep writers out"
        );
        assert!(lock(w3.as_raw_fd(), &writer.locking(Locking::Off)).is_ok());
    }

    /// A copy of the descriptor that outlives ours (here a `dup`, as a child process holds
    /// one between `fork` and `exec`) keeps no lock once ours are released: reopening the
    /// file right away succeeds. Neither does a failed lock attempt leave any.
    #[test]
    fn a_copy_of_the_descriptor_keeps_no_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let writer = LockRequest::new(RW, METADATA);

        let w = open(&p);
        let held = lock(w.as_raw_fd(), &writer).unwrap();
        let child_copy = w.try_clone().unwrap();
        let refused = open(&p);
        let refused_copy = {
            assert!(lock(refused.as_raw_fd(), &writer).is_err());
            refused.try_clone().unwrap()
        };
        drop((held, w, refused));
        let again = open(&p);
        let _locks = lock(again.as_raw_fd(), &writer).expect("the old open's locks are gone");
        drop((child_copy, refused_copy));
    }
}
