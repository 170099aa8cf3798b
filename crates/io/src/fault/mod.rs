//! The fault-injecting backend: wraps any backend so that a test can fail, hold, release and
//! reorder its requests, and read back the log of what reached the file.
//!
//! A [`FaultInjector`] and its [`FaultController`]s share one state. Every request gets a
//! [`RequestInfo`]. When it arrives, the fault rules are checked first (a failing request
//! returns the rule's errno without reaching the inner backend), then the hold filters: a held
//! request waits until the test picks it with [`FaultController::next_held`] and decides with
//! [`HeldRequest::release`] or [`HeldRequest::fail`], in any order. Nothing here sleeps; the
//! waiting uses tokio's `Notify` and `oneshot`, which work on any tokio runtime, tokio-uring's
//! included, and without one.
//!
//! ## Requests whose futures are dropped
//!
//! The injector behaves as the kernel does: a request it has accepted completes even if the
//! future that issued it is dropped. A request dropped while held becomes an *orphan*: it
//! stays held (the test still picks it and decides), and once released it is run on the
//! inner backend by an orphan driver ([`FaultInjector::orphan_driver`],
//! [`FaultOpener::orphan_driver`]), a future the test spawns beside its work; its [`Keep`]
//! (in its buffer, or its argument) lives until then. A test that drops requests and releases
//! them must run a driver: releasing an orphan without one panics. A request dropped after
//! it reached the inner backend is the inner backend's to finish (it does, with its keep);
//! it is then not in the log (it counts as finished unlogged, so no crash image is built from
//! that log).
//!
//! ## The log, and crash images
//!
//! Every finished request is appended to the log in completion order as a [`LogEntry`], with
//! the bytes of each successful write and, for every request, `issued_after`: how many
//! entries had completed when it reached the inner backend. That is enough to build crash
//! images later: replaying the successful writes, zeroings, hole punches and length changes on
//! a copy of the initial contents reproduces the file; a write is durable once a `Flush` that
//! was issued after it completed (`write.seq < flush.issued_after` and the flush succeeded), and
//! a crash image is the durable prefix plus any subset (some torn) of the later writes.
//!
//! [`CrashImage::from_log`] builds one (and [`FaultController::crash`] /
//! [`crash_image`](FaultController::crash_image) from the controller's own log): a crash
//! after any number of completed requests ([`CrashSpec::at`]), the surviving subset and the
//! torn sector chosen by a seed. Note what `issued_after` means for a flush: a write that
//! completed while the flush was already running (`write.seq >= flush.issued_after`) is *not*
//! covered by it, even though it completed before the flush did; an fsync promises nothing
//! about writes it may have raced with. Requests on several files (an image and its data
//! file) are told apart by [`RequestInfo::file`]; a flush makes only its own file durable.

use crate::{Backend, BufResult, IoBuf, Keep};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, Notify};

mod crash;
pub use crash::{CrashImage, CrashSpec, TornSector, CRASH_SECTOR};

/// The kind of a backend request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// [`Backend::read_at`].
    Read,
    /// [`Backend::write_at`].
    Write,
    /// [`Backend::flush`].
    Flush,
    /// [`Backend::punch_hole`].
    PunchHole,
    /// [`Backend::write_zeroes`].
    WriteZeroes,
    /// [`Backend::set_len`].
    SetLen,
}

impl OpKind {
    /// Whether requests of this kind cover a byte range (all but `Flush` and `SetLen`).
    pub fn has_range(self) -> bool {
        !matches!(self, OpKind::Flush | OpKind::SetLen)
    }
}

/// What a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestInfo {
    /// Unique per injector, in arrival order (from 0).
    pub id: u64,
    /// Which file: 0 for an injector made by [`FaultInjector::new`]; files opened through one
    /// [`FaultOpener`] (or added with [`FaultInjector::with_controller`]) are numbered in the
    /// order they were first opened, the same path always getting the same number (see
    /// [`FaultController::file_id`]).
    pub file: u32,
    /// The kind of request.
    pub op: OpKind,
    /// The byte offset; for `SetLen` the new length, for `Flush` 0.
    pub offset: u64,
    /// The byte count (the buffer's window for reads and writes); 0 for `Flush` and `SetLen`.
    pub len: u64,
}

/// Selects requests by kind and byte range. An absent criterion matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFilter {
    /// Only requests of this kind.
    pub op: Option<OpKind>,
    /// Only requests whose bytes `[offset, offset+len)` overlap this range (a zero-length
    /// request matches if its offset lies in it). Requests without a byte range (`Flush`,
    /// `SetLen`) never match a filter with a range.
    pub range: Option<Range<u64>>,
    /// Only requests on this file (see [`RequestInfo::file`]).
    pub file: Option<u32>,
}

impl RequestFilter {
    /// Matches every request.
    pub fn any() -> Self {
        Self::default()
    }

    /// Matches requests of kind `op`.
    pub fn op(op: OpKind) -> Self {
        Self {
            op: Some(op),
            ..Self::default()
        }
    }

    /// Also requires an overlap with `range`.
    pub fn in_range(mut self, range: Range<u64>) -> Self {
        self.range = Some(range);
        self
    }

    /// Also requires the request to be on file `file`.
    pub fn on_file(mut self, file: u32) -> Self {
        self.file = Some(file);
        self
    }

    /// Whether `req` is selected.
    pub fn matches(&self, req: &RequestInfo) -> bool {
        matches_request(self.op, self.range.as_ref(), self.file, req)
    }
}

fn matches_request(
    op: Option<OpKind>,
    range: Option<&Range<u64>>,
    file: Option<u32>,
    req: &RequestInfo,
) -> bool {
    if op.is_some_and(|o| o != req.op) || file.is_some_and(|f| f != req.file) {
        return false;
    }
    match range {
        None => true,
        Some(_) if !req.op.has_range() => false,
        Some(r) if req.len == 0 => r.contains(&req.offset),
        Some(r) => req.offset < r.end && r.start < req.offset.saturating_add(req.len),
    }
}

/// A rule making matching requests fail: after letting `nth` matching requests through, the
/// next `times` matching ones (every later one if `None`) return `errno` without reaching the
/// inner backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    /// Only requests of this kind (any if `None`).
    pub op: Option<OpKind>,
    /// Only requests overlapping this byte range (see [`RequestFilter::range`]).
    pub range: Option<Range<u64>>,
    /// Only requests on this file (see [`RequestInfo::file`]).
    pub file: Option<u32>,
    /// The error returned (`io::Error::from_raw_os_error(errno)`).
    pub errno: i32,
    /// How many matching requests pass before the rule starts failing them.
    pub nth: u64,
    /// How many requests fail (then the rule is spent); `None` for all of them.
    pub times: Option<u64>,
}

impl Default for FaultRule {
    /// Every request fails with EIO, forever.
    fn default() -> Self {
        Self::new(libc::EIO)
    }
}

impl FaultRule {
    /// Every request fails with `errno`, forever.
    pub fn new(errno: i32) -> Self {
        Self {
            op: None,
            range: None,
            file: None,
            errno,
            nth: 0,
            times: None,
        }
    }

    /// Only requests of kind `op`.
    pub fn op(mut self, op: OpKind) -> Self {
        self.op = Some(op);
        self
    }

    /// Only requests overlapping `range`.
    pub fn range(mut self, range: Range<u64>) -> Self {
        self.range = Some(range);
        self
    }

    /// Only requests on file `file`.
    pub fn file(mut self, file: u32) -> Self {
        self.file = Some(file);
        self
    }

    /// Lets `n` matching requests pass first.
    pub fn nth(mut self, n: u64) -> Self {
        self.nth = n;
        self
    }

    /// Fails only `n` requests.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    /// Whether `req` is one this rule looks at (ignoring the counts).
    pub fn matches(&self, req: &RequestInfo) -> bool {
        matches_request(self.op, self.range.as_ref(), self.file, req)
    }
}

/// One finished request in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in completion order, from 0 (not reset by [`FaultController::clear_log`]).
    pub seq: u64,
    /// The request.
    pub info: RequestInfo,
    /// How many requests had completed when this one reached the inner backend: entries with
    /// a smaller `seq` finished before it started. A successful `Flush` makes durable every
    /// write with `seq < issued_after`.
    pub issued_after: u64,
    /// For a successful write, the bytes written.
    pub data: Option<Bytes>,
    /// The error number if the request failed (`EIO` for an error without one).
    pub error: Option<i32>,
    /// Whether the failure was injected (a rule or [`HeldRequest::fail`]), in which case the
    /// inner backend never saw the request.
    pub injected: bool,
}

impl LogEntry {
    /// Whether the request succeeded.
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

enum Decision {
    /// Go on; signal `ack` once the inner backend has finished.
    Release(Option<oneshot::Sender<()>>),
    Fail(i32),
}

/// What the inner backend needs to run a request, and what the request keeps alive.
enum Work {
    Read(IoBuf),
    Write(IoBuf),
    Flush,
    PunchHole(Keep),
    WriteZeroes(Keep),
    SetLen,
    Preallocate(Keep),
}

/// What running a request gave.
enum Outcome {
    Buf(io::Result<usize>, IoBuf),
    Done(io::Result<()>),
}

/// Who waits for a held request's decision.
enum Waiter {
    /// Its future, alive.
    Live(oneshot::Sender<Decision>),
    /// Nobody: its future was dropped; the request runs (on an orphan driver) when released.
    Orphan(Work),
}

struct Held {
    info: RequestInfo,
    waiter: Waiter,
}

/// A released orphan, waiting for a driver.
struct Orphan {
    info: RequestInfo,
    work: Work,
    ack: Option<oneshot::Sender<()>>,
}

struct RuleState {
    rule: FaultRule,
    seen: u64,
    failed: u64,
}

struct State {
    next_id: u64,
    rules: Vec<RuleState>,
    holds: Vec<RequestFilter>,
    /// Held requests nobody has picked yet, in arrival order.
    unclaimed: VecDeque<u64>,
    /// Every held request waiting for a decision.
    held: HashMap<u64, Held>,
    /// Released orphans not yet run, in release order.
    ready: VecDeque<Orphan>,
    /// Orphan drivers running.
    drivers: usize,
    /// Injected flush failures, by file.
    flush_failures: HashMap<u32, u64>,
    logging: bool,
    completed: u64,
    log: Vec<LogEntry>,
    /// Requests that finished unlogged since the log was last emptied (crash images cannot be
    /// built from a log with holes).
    unlogged: u64,
    /// The files, by number: the path a [`FaultOpener`] opened (`None` for other injectors).
    files: Vec<Option<PathBuf>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a request becomes held.
    held_changed: Notify,
    /// Signalled when an orphan is released.
    ready_changed: Notify,
}

impl Shared {
    fn new() -> Self {
        Shared {
            state: Mutex::new(State {
                next_id: 0,
                rules: Vec::new(),
                holds: Vec::new(),
                unclaimed: VecDeque::new(),
                held: HashMap::new(),
                ready: VecDeque::new(),
                drivers: 0,
                flush_failures: HashMap::new(),
                logging: true,
                completed: 0,
                log: Vec::new(),
                unlogged: 0,
                files: Vec::new(),
            }),
            held_changed: Notify::new(),
            ready_changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock in a way that breaks the state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides a held request. A live request learns the decision under the state lock, so
    /// that its future, if dropped meanwhile, finds either its entry or the decision.
    fn decide(&self, id: u64, d: Decision) {
        let mut st = self.lock();
        let Some(held) = st.held.remove(&id) else {
            return;
        };
        match held.waiter {
            Waiter::Live(tx) => {
                // The request may have been dropped meanwhile: nothing to do then.
                let _ = tx.send(d);
            }
            Waiter::Orphan(work) => {
                let dropped = st.orphan_decided(held.info, work, d);
                drop(st);
                // Whatever the request kept alive goes outside the lock.
                drop(dropped);
            }
        }
    }
}

impl State {
    /// Records a finished request.
    fn record(
        &mut self,
        info: RequestInfo,
        issued_after: u64,
        data: Option<Bytes>,
        error: Option<&io::Error>,
        injected: bool,
    ) {
        let seq = self.completed;
        self.completed += 1;
        if !self.logging {
            self.unlogged += 1;
        } else {
            self.log.push(LogEntry {
                seq,
                info,
                issued_after,
                data,
                error: error.map(|e| e.raw_os_error().unwrap_or(libc::EIO)),
                injected,
            });
        }
    }

    /// Records a request failed by the injector, without reaching the inner backend.
    fn injected_failure(&mut self, info: RequestInfo, errno: i32) -> io::Error {
        let e = io::Error::from_raw_os_error(errno);
        let after = self.completed;
        self.record(info, after, None, Some(&e), true);
        if info.op == OpKind::Flush {
            *self.flush_failures.entry(info.file).or_default() += 1;
        }
        e
    }

    /// Acts on the decision about an orphan: queues it for a driver, or fails it. Returns what
    /// the caller drops once the lock is released.
    fn orphan_decided(&mut self, info: RequestInfo, work: Work, d: Decision) -> Option<Work> {
        match d {
            Decision::Release(ack) => {
                if self.drivers == 0 {
                    // A panic here would poison nothing (no invariant is half-changed), but it
                    // may run in a drop: say it loudly instead, and leave the request queued.
                    tracing::error!(
                        ?info,
                        "an orphaned request was released but no orphan driver runs \
                         (spawn FaultInjector::orphan_driver or FaultOpener::orphan_driver)"
                    );
                }
                self.ready.push_back(Orphan { info, work, ack });
                None
            }
            Decision::Fail(errno) => {
                self.injected_failure(info, errno);
                Some(work)
            }
        }
    }

    /// The number of the file at `path` (a new one for `None`, or for a path not seen yet).
    fn file_number(&mut self, path: Option<&Path>) -> u32 {
        if let Some(i) = path.and_then(|p| self.files.iter().position(|f| f.as_deref() == Some(p)))
        {
            return i as u32;
        }
        self.files.push(path.map(Path::to_path_buf));
        (self.files.len() - 1) as u32
    }

    /// The errno of the first rule that fails `info`, counting it against every matching rule.
    fn check_rules(&mut self, info: &RequestInfo) -> Option<i32> {
        let mut fail = None;
        for rs in self.rules.iter_mut().filter(|rs| rs.rule.matches(info)) {
            rs.seen += 1;
            let spent = rs.rule.times.is_some_and(|t| rs.failed >= t);
            if fail.is_none() && rs.seen > rs.rule.nth && !spent {
                rs.failed += 1;
                fail = Some(rs.rule.errno);
            }
        }
        fail
    }
}

/// A held request's future waiting for its decision. If the future is dropped first, the
/// request becomes an orphan (or, decided already, goes where the decision says).
struct Waiting<'a> {
    shared: &'a Shared,
    info: RequestInfo,
    rx: oneshot::Receiver<Decision>,
    work: Option<Work>,
}

impl Waiting<'_> {
    async fn decision(&mut self) -> (Decision, Work) {
        let d = (&mut self.rx).await.unwrap_or(
            // Every sender gone means the state was torn down: let the request go.
            Decision::Release(None),
        );
        (d, self.work.take().expect("work present until decided"))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        let mut st = self.shared.lock();
        let dropped = if let Some(held) = st.held.get_mut(&self.info.id) {
            held.waiter = Waiter::Orphan(work);
            None
        } else {
            match self.rx.try_recv() {
                Ok(d) => st.orphan_decided(self.info, work, d),
                Err(_) => st.orphan_decided(self.info, work, Decision::Release(None)),
            }
        };
        drop(st);
        self.shared.ready_changed.notify_waiters();
        drop(dropped);
    }
}

/// A request admitted to the inner backend. Dropped unfinished (its future was dropped while
/// the inner backend ran it), it counts as finished unlogged.
struct Ticket<'a> {
    shared: &'a Shared,
    info: RequestInfo,
    issued_after: u64,
    ack: Option<oneshot::Sender<()>>,
    finished: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let mut st = self.shared.lock();
            st.completed += 1;
            st.unlogged += 1;
        }
    }
}

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
        self.inner.len().await
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        done(self.request(OpKind::SetLen, len, 0, Work::SetLen).await)
    }

    async fn preallocate(&self, len: u64, keep: Keep) -> io::Result<()> {
        // Recorded (and faulted) as the length change it is, when it is one.
        if self.inner.len().await? >= len {
            return Ok(());
        }
        done(
            self.request(OpKind::SetLen, len, 0, Work::Preallocate(keep))
                .await,
        )
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<crate::Allocation> {
        // A query about the file's layout, not its contents: passed straight through.
        self.inner.allocation(offset, len).await
    }

    async fn allocated_size(&self) -> io::Result<u64> {
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

/// The test's handle on a [`FaultInjector`]: cloneable, `Send` and `Sync`.
#[derive(Clone)]
pub struct FaultController {
    shared: Arc<Shared>,
}

impl fmt::Debug for FaultController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("FaultController")
            .field("rules", &st.rules.len())
            .field("holds", &st.holds)
            .field("held", &st.held.len())
            .field("completed", &st.completed)
            .finish()
    }
}

impl FaultController {
    /// Adds a fault rule. Rules are checked in the order added; every matching rule counts
    /// the request, and the first one due fails it.
    pub fn add_rule(&self, rule: FaultRule) {
        self.shared.lock().rules.push(RuleState {
            rule,
            seen: 0,
            failed: 0,
        });
    }

    /// Removes every fault rule.
    pub fn clear_rules(&self) {
        self.shared.lock().rules.clear();
    }

    /// Holds every later request that `filter` selects (in addition to earlier filters).
    pub fn hold(&self, filter: RequestFilter) {
        self.shared.lock().holds.push(filter);
    }

    /// Holds every later request.
    pub fn hold_all(&self) {
        self.hold(RequestFilter::any());
    }

    /// Stops holding new requests. Requests already held stay held (see
    /// [`release_all`](Self::release_all)).
    pub fn stop_holding(&self) {
        self.shared.lock().holds.clear();
    }

    /// How many requests are held, waiting for a decision (picked by
    /// [`next_held`](Self::next_held) or not).
    pub fn held_count(&self) -> usize {
        self.shared.lock().held.len()
    }

    /// Releases every held request (including ones picked but not yet decided); released
    /// orphans go to the orphan driver.
    pub fn release_all(&self) {
        let ids: Vec<u64> = {
            let mut st = self.shared.lock();
            st.unclaimed.clear();
            st.held.keys().copied().collect()
        };
        for id in ids {
            self.shared.decide(id, Decision::Release(None));
        }
        self.shared.ready_changed.notify_waiters();
    }

    /// How many released orphans wait for a driver.
    pub fn orphans_waiting(&self) -> usize {
        self.shared.lock().ready.len()
    }

    /// The oldest held request not yet picked, if any.
    pub fn try_next_held(&self) -> Option<HeldRequest> {
        let mut st = self.shared.lock();
        while let Some(id) = st.unclaimed.pop_front() {
            if let Some(held) = st.held.get(&id) {
                return Some(HeldRequest {
                    info: held.info,
                    shared: self.shared.clone(),
                    decided: false,
                });
            }
        }
        None
    }

    /// Waits until a request is held and picks it (the oldest not yet picked).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future picks nothing: the request stays for the next call.
    pub async fn next_held(&self) -> HeldRequest {
        loop {
            let mut notified = std::pin::pin!(self.shared.held_changed.notified());
            notified.as_mut().enable();
            if let Some(h) = self.try_next_held() {
                return h;
            }
            notified.await;
        }
    }

    /// The log of finished requests, in completion order.
    pub fn log(&self) -> Vec<LogEntry> {
        self.shared.lock().log.clone()
    }

    /// Empties the log (sequence numbers go on counting).
    pub fn clear_log(&self) {
        let mut st = self.shared.lock();
        st.log.clear();
        st.unlogged = 0;
    }

    /// The number a [`FaultOpener`] gave the file at `path` (as the engine passed it to
    /// [`Opener::open`](crate::Opener::open)), if it opened it.
    pub fn file_id(&self, path: impl AsRef<Path>) -> Option<u32> {
        let st = self.shared.lock();
        let path = path.as_ref();
        st.files
            .iter()
            .position(|f| f.as_deref() == Some(path))
            .map(|i| i as u32)
    }

    /// Turns logging on or off (on by default; off saves the copies of written data).
    pub fn set_logging(&self, on: bool) {
        self.shared.lock().logging = on;
    }

    /// How many requests have finished (logged or not).
    pub fn completed(&self) -> u64 {
        self.shared.lock().completed
    }
}

/// A held request, picked by [`FaultController::next_held`]. Decide its fate with
/// [`release`](Self::release), [`release_and_wait`](Self::release_and_wait) or
/// [`fail`](Self::fail); dropping it undecided releases it.
pub struct HeldRequest {
    info: RequestInfo,
    shared: Arc<Shared>,
    decided: bool,
}

impl fmt::Debug for HeldRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldRequest")
            .field("info", &self.info)
            .finish()
    }
}

impl HeldRequest {
    /// The request.
    pub fn info(&self) -> RequestInfo {
        self.info
    }

    /// Whether the request's future was dropped (it runs on an orphan driver once released).
    pub fn is_orphan(&self) -> bool {
        let st = self.shared.lock();
        matches!(
            st.held.get(&self.info.id).map(|h| &h.waiter),
            Some(Waiter::Orphan(_))
        )
    }

    /// Lets the request proceed to the inner backend.
    ///
    /// # Panics
    /// If the request is an orphan and no orphan driver runs.
    pub fn release(mut self) {
        self.decided = true;
        self.assert_driven();
        self.shared.decide(self.info.id, Decision::Release(None));
        self.shared.ready_changed.notify_waiters();
    }

    /// Lets the request proceed and waits until the inner backend has finished it. The
    /// request's own future (or, for an orphan, the orphan driver) must be polled meanwhile
    /// (by another task, or by the same `join`). Returns early if the request's future is
    /// dropped while the inner backend runs it.
    ///
    /// # Panics
    /// If the request is an orphan and no orphan driver runs.
    ///
    /// # Cancel safety
    ///
    /// The request is released when this is first polled; dropping the future later only
    /// stops the waiting.
    pub async fn release_and_wait(mut self) {
        self.decided = true;
        self.assert_driven();
        let (tx, rx) = oneshot::channel();
        self.shared
            .decide(self.info.id, Decision::Release(Some(tx)));
        self.shared.ready_changed.notify_waiters();
        let _ = rx.await;
    }

    fn assert_driven(&self) {
        let st = self.shared.lock();
        let orphan = matches!(
            st.held.get(&self.info.id).map(|h| &h.waiter),
            Some(Waiter::Orphan(_))
        );
        assert!(
            !orphan || st.drivers > 0,
            "request {:?} was dropped while held and is released, but no orphan driver runs \
             (spawn FaultInjector::orphan_driver or FaultOpener::orphan_driver)",
            self.info
        );
    }

    /// Fails the request with `errno` without it reaching the inner backend.
    pub fn fail(mut self, errno: i32) {
        self.decided = true;
        self.shared.decide(self.info.id, Decision::Fail(errno));
    }
}

impl Drop for HeldRequest {
    fn drop(&mut self) {
        if !self.decided {
            self.shared.decide(self.info.id, Decision::Release(None));
            self.shared.ready_changed.notify_waiters();
        }
    }
}
