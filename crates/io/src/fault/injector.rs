//! The injector itself: the backend wrapper, its opener, and the orphan driver.

use super::state::{
    Decision, Held, Orphan, Outcome, Running, Shared, Ticket, Waiter, Waiting, Work,
};
use super::{FaultController, OpKind, RequestInfo};
use crate::{Backend, BufResult, IoBuf, Keep};
use bytes::Bytes;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Wraps a backend, failing, holding and logging its requests as a [`FaultController`] says.
///
/// Clones share the controller state (and the inner backend, if its clones share). It is
/// `Send` and `Sync`, and so are its futures, when the inner backend's are.
#[derive(Clone)]
pub struct FaultInjector<B> {
    inner: B,
    shared: Arc<Shared>,
    file: u32,
}

impl<B: fmt::Debug> fmt::Debug for FaultInjector<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultInjector")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> FaultInjector<B> {
    /// Wraps `inner`; no rules, no holding, logging on. Its requests are on file 0.
    pub fn new(inner: B) -> Self {
        let shared = Arc::new(Shared::new());
        let file = shared.lock().file_number(None);
        Self {
            inner,
            shared,
            file,
        }
    }

    /// Wraps `inner` under an existing controller: several files (an image and its backing
    /// or data file) can then be driven by one controller. The file gets the next number.
    pub fn with_controller(inner: B, controller: &FaultController) -> Self {
        let file = controller.shared.lock().file_number(None);
        Self {
            inner,
            shared: controller.shared.clone(),
            file,
        }
    }

    /// The number of the file in [`RequestInfo::file`] and in the log.
    pub fn file(&self) -> u32 {
        self.file
    }

    /// A controller for this injector (and its clones).
    pub fn controller(&self) -> FaultController {
        FaultController {
            shared: self.shared.clone(),
        }
    }

    /// The wrapped backend (requests made on it directly bypass the injector).
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Runs the released orphans of this injector's file (requests whose futures were dropped
    /// while they were held: see the module documentation), as the kernel would finish them.
    /// Never ends: spawn it beside the test's work and drop it with the runtime.
    pub fn orphan_driver(&self) -> impl Future<Output = ()> + 'static {
        let this = self.clone();
        drive_orphans(self.shared.clone(), move |file| {
            (file == this.file).then(|| this.clone())
        })
    }

    /// Admits a request: checks the rules, then holds it if asked. `Err` is an injected
    /// failure, already logged; the work (and what it keeps alive) is dropped with it.
    async fn admit(
        &self,
        op: OpKind,
        offset: u64,
        len: u64,
        work: Work,
    ) -> Result<(Ticket<'_>, Work), (io::Error, Work)> {
        let shared = &*self.shared;
        let (info, rx) = {
            let mut st = shared.lock();
            let info = RequestInfo {
                id: st.next_id,
                file: self.file,
                op,
                offset,
                len,
            };
            st.next_id += 1;
            if let Some(errno) = st.check_rules(&info) {
                return Err((st.injected_failure(info, errno), work));
            }
            let rx = if st.holds.iter().any(|h| h.matches(&info)) {
                let (tx, rx) = oneshot::channel();
                st.held.insert(
                    info.id,
                    Held {
                        info,
                        waiter: Waiter::Live(tx),
                    },
                );
                st.unclaimed.push_back(info.id);
                Some(rx)
            } else {
                None
            };
            (info, rx)
        };
        let mut ack = None;
        let mut work = work;
        if let Some(rx) = rx {
            let mut waiting = Waiting {
                shared,
                info,
                rx,
                work: Some(work),
            };
            shared.held_changed.notify_waiters();
            tracing::trace!(?info, "request held");
            let (decision, w) = waiting.decision().await;
            work = w;
            match decision {
                Decision::Release(a) => ack = a,
                Decision::Fail(errno) => {
                    let e = shared.lock().injected_failure(info, errno);
                    return Err((e, work));
                }
            }
        }
        let issued_after = shared.lock().completed;
        Ok((
            Ticket {
                shared,
                info,
                issued_after,
                ack,
                finished: false,
            },
            work,
        ))
    }

    /// Runs `work` on the inner backend.
    async fn execute(&self, info: RequestInfo, work: Work) -> Outcome {
        let (offset, len) = (info.offset, info.len);
        let _running = Running::new(&self.shared);
        match work {
            Work::Read(buf) => {
                let (r, b) = self.inner.read_at(buf, offset).await;
                Outcome::Buf(r, b)
            }
            Work::Write(buf) => {
                let (r, b) = self.inner.write_at(buf, offset).await;
                Outcome::Buf(r.map(|()| b.len()), b)
            }
            Work::Flush => Outcome::Done(self.inner.flush().await),
            Work::PunchHole(keep) => Outcome::Done(self.inner.punch_hole(offset, len, keep).await),
            Work::WriteZeroes(keep) => {
                Outcome::Done(self.inner.write_zeroes(offset, len, keep).await)
            }
            Work::SetLen => Outcome::Done(self.inner.set_len(offset).await),
            Work::Preallocate(keep) => Outcome::Done(self.inner.preallocate(offset, keep).await),
        }
    }

    /// Admits, runs and logs a request.
    async fn request(&self, op: OpKind, offset: u64, len: u64, work: Work) -> Outcome {
        let (ticket, work) = match self.admit(op, offset, len, work).await {
            Ok(t) => t,
            Err((e, Work::Read(b) | Work::Write(b))) => return Outcome::Buf(Err(e), b),
            Err((e, _)) => return Outcome::Done(Err(e)),
        };
        let out = self.execute(ticket.info, work).await;
        self.finish(ticket, &out);
        out
    }

    /// Logs a request the inner backend has finished.
    fn finish(&self, mut t: Ticket<'_>, out: &Outcome) {
        let (error, data) = match out {
            Outcome::Buf(Err(e), _) | Outcome::Done(Err(e)) => (Some(e), None),
            Outcome::Buf(Ok(_), b) if t.info.op == OpKind::Write => (None, Some(&b[..])),
            _ => (None, None),
        };
        {
            let mut st = self.shared.lock();
            let data = match (error, st.logging) {
                (None, true) => data.map(Bytes::copy_from_slice),
                _ => None,
            };
            st.record(t.info, t.issued_after, data, error, false);
        }
        t.finished = true;
        if let Some(ack) = t.ack.take() {
            let _ = ack.send(());
        }
    }

    /// Runs a released orphan and logs it.
    async fn run_orphan(&self, o: Orphan) {
        let issued_after = self.shared.lock().completed;
        let ticket = Ticket {
            shared: &self.shared,
            info: o.info,
            issued_after,
            ack: o.ack,
            finished: false,
        };
        let out = self.execute(o.info, o.work).await;
        self.finish(ticket, &out);
    }
}

/// Registers a running orphan driver.
struct DriverGuard(Arc<Shared>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        self.0.lock().drivers -= 1;
    }
}

/// Runs released orphans of the files `injector` knows, one at a time, forever.
fn drive_orphans<B: Backend>(
    shared: Arc<Shared>,
    injector: impl Fn(u32) -> Option<FaultInjector<B>> + 'static,
) -> impl Future<Output = ()> + 'static {
    shared.lock().drivers += 1;
    let guard = DriverGuard(shared);
    async move {
        let shared = &guard.0;
        loop {
            let mut notified = std::pin::pin!(shared.ready_changed.notified());
            notified.as_mut().enable();
            let next = {
                let mut st = shared.lock();
                let at = st
                    .ready
                    .iter()
                    .position(|o| injector(o.info.file).is_some());
                at.and_then(|i| st.ready.remove(i))
            };
            match next {
                Some(o) => {
                    let f = injector(o.info.file).expect("checked");
                    tracing::trace!(info = ?o.info, "orphan runs");
                    f.run_orphan(o).await;
                }
                None => notified.await,
            }
        }
    }
}

impl<B: Backend> Backend for FaultInjector<B> {
    async fn read_at(&self, buf: IoBuf, offset: u64) -> BufResult<usize> {
        let len = buf.len() as u64;
        match self
            .request(OpKind::Read, offset, len, Work::Read(buf))
            .await
        {
            Outcome::Buf(r, b) => (r, b),
            Outcome::Done(_) => unreachable!("a read gives its buffer back"),
        }
    }

    async fn write_at(&self, buf: IoBuf, offset: u64) -> BufResult<()> {
        let len = buf.len() as u64;
        match self
            .request(OpKind::Write, offset, len, Work::Write(buf))
            .await
        {
            Outcome::Buf(r, b) => (r.map(|_| ()), b),
            Outcome::Done(_) => unreachable!("a write gives its buffer back"),
        }
    }

    async fn flush(&self) -> io::Result<()> {
        done(self.request(OpKind::Flush, 0, 0, Work::Flush).await)
    }

    fn flush_failures(&self) -> u64 {
        let injected = self.shared.lock().flush_failures.get(&self.file).copied();
        injected.unwrap_or(0) + self.inner.flush_failures()
    }

    async fn punch_hole(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        done(
            self.request(OpKind::PunchHole, offset, len, Work::PunchHole(keep))
                .await,
        )
    }

    async fn write_zeroes(&self, offset: u64, len: u64, keep: Keep) -> io::Result<()> {
        done(
            self.request(OpKind::WriteZeroes, offset, len, Work::WriteZeroes(keep))
                .await,
        )
    }

    async fn len(&self) -> io::Result<u64> {
        // Not a request on the file's contents: passed straight through.
        let _running = Running::new(&self.shared);
        self.inner.len().await
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        done(self.request(OpKind::SetLen, len, 0, Work::SetLen).await)
    }

    async fn preallocate(&self, len: u64, keep: Keep) -> io::Result<()> {
        // Recorded (and faulted) as the length change it is, when it is one.
        if self.len().await? >= len {
            return Ok(());
        }
        done(
            self.request(OpKind::SetLen, len, 0, Work::Preallocate(keep))
                .await,
        )
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<crate::Allocation> {
        // A query about the file's layout, not its contents: passed straight through.
        let _running = Running::new(&self.shared);
        self.inner.allocation(offset, len).await
    }

    async fn allocated_size(&self) -> io::Result<u64> {
        let _running = Running::new(&self.shared);
        self.inner.allocated_size().await
    }

    fn alignment(&self) -> usize {
        self.inner.alignment()
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }
}

fn done(out: Outcome) -> io::Result<()> {
    match out {
        Outcome::Done(r) => r,
        Outcome::Buf(r, _) => r.map(|_| ()),
    }
}

/// Opens files with an inner [`Opener`](crate::Opener) and wraps each in a
/// [`FaultInjector`] driven by one shared [`FaultController`]; the files opened only for
/// reading (backing files) can be left unwrapped.
#[derive(Clone, Debug)]
pub struct FaultOpener<O: crate::Opener> {
    inner: O,
    controller: FaultController,
    /// Every file opened, by number (one backend each: any serves its orphans).
    opened: Arc<Mutex<HashMap<u32, FaultInjector<O::Backend>>>>,
}

impl<O: crate::Opener> FaultOpener<O> {
    /// Wraps `inner`; every file it opens is driven by one new controller. Files are numbered
    /// by path in the order first opened (the first one is file 0): see
    /// [`FaultController::file_id`].
    pub fn new(inner: O) -> Self {
        let shared = Arc::new(Shared::new());
        Self {
            inner,
            controller: FaultController { shared },
            opened: Arc::default(),
        }
    }

    /// The controller shared by every file opened.
    pub fn controller(&self) -> FaultController {
        self.controller.clone()
    }

    /// Runs the released orphans of every file this opener opened (see
    /// [`FaultInjector::orphan_driver`]). Never ends: spawn it beside the test's work.
    pub fn orphan_driver(&self) -> impl Future<Output = ()> + 'static {
        let opened = self.opened.clone();
        drive_orphans(self.controller.shared.clone(), move |file| {
            opened
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&file)
                .cloned()
        })
    }
}

impl<O: crate::Opener> crate::Opener for FaultOpener<O> {
    type Backend = FaultInjector<O::Backend>;

    async fn open(
        &self,
        path: &std::path::Path,
        options: crate::OpenOptions,
    ) -> std::io::Result<Self::Backend> {
        let inner = self.inner.open(path, options).await?;
        let file = self.controller.shared.lock().file_number(Some(path));
        let injector = FaultInjector {
            inner,
            shared: self.controller.shared.clone(),
            file,
        };
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(file)
            .or_insert_with(|| injector.clone());
        Ok(injector)
    }
}
