//! Running parsed `qimg io` commands against an open [`Disk`], printing what qemu-io prints.
//!
//! Synchronous commands (`read`, `write`, `discard`, `flush`) complete before the next one
//! starts. `aio_read` and `aio_write` are spawned as local tasks (`spawn_local`: the io_uring
//! backend's futures are not `Send`, so the session runs inside a `LocalSet`, which both
//! runtimes provide) and report when they complete; `aio_flush` and the end of the script wait
//! for them. As in qemu-io, a failing synchronous command makes the exit status 1 and the
//! script goes on; an aio request counts as successful once issued, whatever its outcome.

use super::open::OpenSpec;
use super::parse::{self, Cmd, Discard, Read, Write, WriteData, MAX_REQUEST_BYTES};
use super::report;
use super::session;
use super::AioMode;
use crate::util::{program, strerror};
use blockio::{IoBuf, Opener};
use qcow2_engine::{Disk, WriteFlags};
use std::io::Write as _;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Prints to stdout, ignoring a closed pipe (qemu-io's `printf`).
pub fn out(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// Prints to stderr.
pub fn err(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// The open image (if any), how it was opened and the aio requests in flight on it.
pub struct Session<O: Opener> {
    /// What opens images.
    pub(super) opener: O,
    /// The backend the session runs on (`-i`).
    pub(super) aio: AioMode,
    /// The image (none before an `open` or after a `close`).
    pub(super) disk: Option<Rc<Disk<O>>>,
    /// The image's path and how it was opened, as `reopen` left it.
    pub(super) opened: Option<(PathBuf, OpenSpec)>,
    inflight: Vec<JoinHandle<()>>,
    /// See [`Serial`].
    serial: Rc<tokio::sync::Mutex<()>>,
    /// `quit` ran: the script ends.
    pub(super) quit: bool,
}

/// Whether `[offset, offset+len)` is a request qemu's block layer lets through
/// (`blk_check_byte_request`); qemu-io reports the others as EIO.
fn in_range(size: u64, offset: u64, len: u64) -> bool {
    len <= MAX_REQUEST_BYTES && offset <= size && size - offset >= len
}

const EIO: &str = "Input/output error";

/// With copy-on-read, the lock that serialises the requests that change the image with
/// those that copy into it (QEMU's serialising requests): a write overlapping a read in
/// flight must not be undone by that read's copy.
type Serial = Option<Rc<tokio::sync::Mutex<()>>>;

/// Holds `serial`'s lock, if there is one, while the guard lives.
pub(super) async fn hold(serial: &Serial) -> Option<tokio::sync::MutexGuard<'_, ()>> {
    match serial {
        Some(lock) => Some(lock.lock().await),
        None => None,
    }
}

/// Runs a read; the elapsed time and the data, or the error text. With `copy_on_read` (the
/// lock of [`Serial`]), what the read found in backing files is then written into the image
/// (see [`session::copy_on_read`]), the lock held from the read to the copy's end.
async fn do_read<O: Opener>(
    disk: &Disk<O>,
    r: &Read,
    copy_on_read: Serial,
) -> Result<(Duration, IoBuf), String> {
    let copy_on_read = copy_on_read.filter(|_| !r.vmstate);
    let _serial = hold(&copy_on_read).await;
    if !r.vmstate && !in_range(disk.size(), r.offset, r.len) {
        return Err(EIO.into());
    }
    // Bounded by MAX_REQUEST_BYTES above.
    let buf = IoBuf::new(r.len as usize);
    let start = Instant::now();
    if r.len == 0 {
        return Ok((start.elapsed(), buf));
    }
    let (res, buf) = match r.vmstate {
        true => disk.vm_state_read_at(buf, r.offset).await,
        false => disk.read_at(buf, r.offset).await,
    };
    res.map_err(|e| strerror(&e))?;
    if copy_on_read.is_some() {
        session::copy_on_read(disk, r.offset, r.len).await?;
    }
    Ok((start.elapsed(), buf))
}

/// Checks `read -P` and formats the report (and `-v` dump). Returns the text and whether the
/// pattern matched.
fn finish_read(r: &Read, t: Duration, data: &[u8]) -> (String, bool) {
    let mut text = String::new();
    let mut matched = true;
    if let Some(v) = r.verify {
        let range = v.start as usize..(v.start + v.len) as usize;
        if !data[range].iter().all(|&b| b == v.pattern) {
            matched = false;
            text.push_str(&format!(
                "Pattern verification failed at offset {}, {} bytes\n",
                r.offset + v.start,
                v.len
            ));
        }
    }
    if !r.quiet {
        if r.dump {
            text.push_str(&report::dump(data, r.offset));
        }
        text.push_str(&report::report("read", t, r.offset, r.len, r.csv));
    }
    (text, matched)
}

/// Runs a write (data, zeroes, then a flush for FUA); the elapsed time or the error text.
/// `serial`: see [`Serial`], held for the whole write.
async fn do_write<O: Opener>(
    disk: &Disk<O>,
    w: &Write,
    serial: Serial,
) -> Result<Duration, String> {
    let _serial = hold(&serial).await;
    if !w.vmstate && !in_range(disk.size(), w.offset, w.len) {
        return Err(EIO.into());
    }
    let start = Instant::now();
    let mut flush_after = w.fua;
    if w.len > 0 {
        match w.data {
            WriteData::Zeroes { may_unmap } => disk
                .write_zeroes(w.offset, w.len, may_unmap)
                .await
                .map_err(|e| strerror(&e))?,
            WriteData::Pattern(p) => {
                let mut buf = IoBuf::new(w.len as usize);
                buf.fill(p);
                let (res, _) = if w.vmstate {
                    disk.vm_state_write_at(buf, w.offset).await
                } else if w.compressed {
                    disk.write_compressed(buf, w.offset).await
                } else {
                    let flags = match w.fua {
                        true => WriteFlags::FUA,
                        false => WriteFlags::default(),
                    };
                    // The engine makes this write durable itself.
                    flush_after = false;
                    disk.write_at_with(buf, w.offset, flags).await
                };
                res.map_err(|e| strerror(&e))?;
            }
        }
    }
    // The other writes have no flags: FUA is a flush after them.
    if flush_after {
        disk.flush().await.map_err(|e| strerror(&e))?;
    }
    Ok(start.elapsed())
}

impl<O: Opener> Session<O> {
    /// A session without an image, on the backend `aio`, opening images with `opener`.
    pub fn new(opener: O, aio: AioMode) -> Self {
        Self {
            opener,
            aio,
            disk: None,
            opened: None,
            inflight: Vec::new(),
            serial: Rc::default(),
            quit: false,
        }
    }

    /// Whether `quit` ran.
    pub fn quitting(&self) -> bool {
        self.quit
    }

    /// How the open image was opened.
    fn spec(&self) -> Option<&OpenSpec> {
        self.opened.as_ref().map(|(_, s)| s)
    }

    /// Whether the image is read-only (qemu-io's `-r`): writes and discards are refused and
    /// flushes do nothing.
    pub(super) fn read_only(&self) -> bool {
        self.spec().is_some_and(|s| s.read_only)
    }

    /// Parses and runs one qemu-io command line; `false` if it failed (qemu-io then exits
    /// with status 1, after running the rest of the script).
    pub async fn run_line(&mut self, line: &str) -> bool {
        if self.disk.is_none() && parse::needs_image(line) {
            err("no file open, try 'help open'\n");
            return false;
        }
        if self.read_only() && parse::needs_write(line) {
            // qemu-io -r: the write permission is refused before the command parses.
            err(&format!("{}: Block node is read-only\n", program()));
            return false;
        }
        match parse::parse(line) {
            Ok(None) => true,
            Ok(Some(cmd)) => self.run(cmd).await,
            Err(e) => {
                if let Some(s) = e.stdout() {
                    out(&format!("{s}\n"));
                }
                if let Some(s) = e.stderr() {
                    err(&format!("{s}\n"));
                }
                false
            }
        }
    }

    /// The open image; the commands run only while there is one (see [`Session::run`]).
    pub(super) fn d(&self) -> &Rc<Disk<O>> {
        self.disk
            .as_ref()
            .expect("the commands run while an image is open")
    }

    /// Runs one command; `false` if it failed.
    pub async fn run(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Open(o) => return self.open_cmd(o).await,
            Cmd::Quit => {
                self.quit = true;
                return true;
            }
            Cmd::Help(text) => {
                out(&text);
                return true;
            }
            Cmd::Sleep(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                return true;
            }
            Cmd::Sigraise(sig) => {
                let _ = std::io::stdout().flush();
                let _ = std::io::stderr().flush();
                // SAFETY: raise(3) has no memory-safety preconditions; an invalid signal
                // number makes it fail, which qemu-io ignores too.
                unsafe { libc::raise(sig) };
                return true;
            }
            Cmd::Abort => {
                let _ = std::io::stdout().flush();
                std::process::abort();
            }
            _ => {}
        }
        if self.disk.is_none() {
            err("no file open, try 'help open'\n");
            return false;
        }
        let writes = matches!(
            cmd,
            Cmd::Write(_) | Cmd::Discard(_) | Cmd::AioWrite(_) | Cmd::Truncate { .. }
        );
        if self.read_only() && writes {
            err(&format!("{}: Block node is read-only\n", program()));
            return false;
        }
        match cmd {
            Cmd::Open(_)
            | Cmd::Quit
            | Cmd::Help(_)
            | Cmd::Sleep(_)
            | Cmd::Sigraise(_)
            | Cmd::Abort => {
                unreachable!("run without an image")
            }
            Cmd::Reopen(r) => self.reopen(r).await,
            Cmd::Info => self.info().await,
            Cmd::Truncate { size, prealloc } => self.truncate(size, prealloc).await,
            Cmd::Read(r) => self.read(&r).await,
            Cmd::Write(w) => self.write(&w).await,
            Cmd::Discard(d) => self.discard(&d).await,
            Cmd::Flush => self
                .flush()
                .await
                .map_err(|e| out(&format!("flush failed: {e}\n")))
                .is_ok(),
            Cmd::AioRead(r) => {
                self.aio_read(r);
                true
            }
            Cmd::AioWrite(w) => {
                self.aio_write(w);
                true
            }
            Cmd::AioFlush => {
                let drained = self.drain().await;
                match self.flush().await {
                    Ok(()) => drained,
                    Err(e) => {
                        out(&format!("aio_flush failed: {e}\n"));
                        false
                    }
                }
            }
            Cmd::Length => {
                out(&format!("{}\n", report::cvtstr(self.d().size() as f64)));
                true
            }
            Cmd::Map => self.map().await,
            Cmd::Close => self.close().await,
            Cmd::Alloc { offset, count } => self.alloc(offset, count).await,
            Cmd::Inject(line) => {
                out(&format!("{line}\n"));
                true
            }
        }
    }

    /// With copy-on-read (`-C`), the lock of [`Serial`].
    pub(super) fn serial(&self) -> Serial {
        let cor = self.spec().is_some_and(|s| s.copy_on_read);
        cor.then(|| Rc::clone(&self.serial))
    }

    async fn read(&mut self, r: &Read) -> bool {
        match do_read(self.d(), r, self.serial()).await {
            Ok((t, buf)) => {
                let (text, matched) = finish_read(r, t, &buf);
                out(&text);
                matched
            }
            Err(e) => {
                out(&format!("read failed: {e}\n"));
                false
            }
        }
    }

    async fn write(&mut self, w: &Write) -> bool {
        match do_write(self.d(), w, self.serial()).await {
            Ok(t) => {
                if !w.quiet {
                    out(&report::report("wrote", t, w.offset, w.len, w.csv));
                }
                true
            }
            Err(e) => {
                out(&format!("write failed: {e}\n"));
                false
            }
        }
    }

    async fn discard(&mut self, d: &Discard) -> bool {
        if !in_range(self.d().size(), d.offset, d.len) {
            out(&format!("discard failed: {EIO}\n"));
            return false;
        }
        let serial = self.serial();
        let _serial = hold(&serial).await;
        let start = Instant::now();
        let ignored = self.spec().is_some_and(|s| s.discard_ignored);
        let res = if d.len == 0 || ignored {
            Ok(())
        } else {
            self.d().discard(d.offset, d.len).await
        };
        let t = start.elapsed();
        match res {
            Ok(()) => {
                if !d.quiet {
                    out(&report::report("discard", t, d.offset, d.len, d.csv));
                }
                true
            }
            Err(e) => {
                out(&format!("discard failed: {}\n", strerror(&e)));
                false
            }
        }
    }

    /// qemu-io's `map`: the runs the top layer allocates (as data or zeros), and the others.
    async fn map(&self) -> bool {
        let size = self.d().size();
        let entries = match self.d().map(0, size).await {
            Ok(e) => e,
            Err(e) => {
                out(&format!(
                    "Failed to get allocation status: {}\n",
                    strerror(&e)
                ));
                return false;
            }
        };
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for e in entries {
            let allocated = e.present && e.depth == 0;
            match runs.last_mut() {
                Some(last) if last.2 == allocated => last.1 += e.length,
                _ => runs.push((e.start, e.length, allocated)),
            }
        }
        for (start, len, allocated) in runs {
            out(&format!(
                "{} ({len:#x}) bytes {} at offset {} ({start:#x})\n",
                report::cvtstr(len as f64),
                if allocated {
                    "    allocated"
                } else {
                    "not allocated"
                },
                report::cvtstr(start as f64),
            ));
        }
        true
    }

    /// qemu-io's `alloc`: how many of `count` bytes at `offset` the top layer allocates (as
    /// data or zeros); the count stops at the end of the disk.
    async fn alloc(&self, offset: u64, count: u64) -> bool {
        let count = count.min(self.d().size().saturating_sub(offset));
        let entries = match self.d().map(offset, count).await {
            Ok(e) => e,
            Err(e) => {
                out(&format!("alloc failed: {}\n", strerror(&e)));
                return false;
            }
        };
        let allocated: u64 = entries
            .iter()
            .filter(|e| e.present && e.depth == 0)
            .map(|e| e.length)
            .sum();
        out(&format!(
            "{allocated}/{count} bytes allocated at offset {}\n",
            report::cvtstr(offset as f64)
        ));
        true
    }

    /// Flushes the image (the engine does nothing for a read-only one, and with cache mode
    /// `unsafe` writes the metadata back without flushing the file, as QEMU does).
    async fn flush(&self) -> Result<(), String> {
        self.d().flush().await.map_err(|e| strerror(&e))
    }

    fn aio_read(&mut self, r: Read) {
        let disk = Rc::clone(self.d());
        let serial = self.serial();
        self.inflight.push(tokio::task::spawn_local(async move {
            match do_read(&disk, &r, serial).await {
                // A mismatch is reported but, as in qemu-io, does not fail the script.
                Ok((t, buf)) => out(&finish_read(&r, t, &buf).0),
                Err(e) => out(&format!("readv failed: {e}\n")),
            }
        }));
    }

    fn aio_write(&mut self, w: Write) {
        let disk = Rc::clone(self.d());
        let serial = self.serial();
        self.inflight.push(tokio::task::spawn_local(async move {
            match do_write(&disk, &w, serial).await {
                Ok(t) if !w.quiet => out(&report::report("wrote", t, w.offset, w.len, w.csv)),
                Ok(_) => {}
                Err(e) => out(&format!("aio_write failed: {e}\n")),
            }
        }));
    }

    /// Waits for every aio request in flight; `false` if one of them panicked.
    pub async fn drain(&mut self) -> bool {
        let mut ok = true;
        for task in std::mem::take(&mut self.inflight) {
            if let Err(e) = task.await {
                err(&format!("{}: an aio request failed: {e}\n", program()));
                ok = false;
            }
        }
        ok
    }

    /// Ends the script: waits for the aio requests in flight, then closes the image (see
    /// [`Session::close`]). `false` if anything failed; the reason is printed.
    pub async fn finish(mut self) -> bool {
        if self.disk.is_none() {
            return true;
        }
        self.close().await
    }

    /// qemu-io's `close`: waits for the aio requests in flight, then closes the image (a
    /// read-only image has nothing to write back and is just dropped); later commands find
    /// no image. `false` if anything failed; the reason is printed.
    pub(super) async fn close(&mut self) -> bool {
        let drained = self.drain().await;
        let Some(disk) = self.disk.take() else {
            return drained;
        };
        if self.opened.take().is_some_and(|(_, s)| s.read_only) {
            return drained;
        }
        let disk = match Rc::try_unwrap(disk) {
            Ok(d) => d,
            Err(_) => {
                err(&format!(
                    "{}: the image is still in use by a request; not closed\n",
                    program()
                ));
                return false;
            }
        };
        match disk.close().await {
            Ok(()) => drained,
            Err(e) => {
                err(&format!("{}: closing the image failed: {e}\n", program()));
                false
            }
        }
    }
}
