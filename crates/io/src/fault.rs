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
//! ## The log, and crash images
//!
//! Every finished request is appended to the log in completion order as a [`LogEntry`], with
//! the bytes of each successful write and, for every request, `issued_after`: how many
//! entries had completed when it reached the inner backend. That is enough to build crash
//! images later: replaying the successful writes, zeroings, hole punches and length changes on
//! a copy of the initial contents reproduces the file; a write is durable once a `Flush` that
//! was issued after it completed (`write.seq < flush.issued_after` and the flush succeeded), and
//! a crash image is the durable prefix plus any subset (some torn) of the later writes.

use crate::{Backend, BufResult, IoBuf};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, Notify};

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
            range: None,
        }
    }

    /// Also requires an overlap with `range`.
    pub fn in_range(mut self, range: Range<u64>) -> Self {
        self.range = Some(range);
        self
    }

    /// Whether `req` is selected.
    pub fn matches(&self, req: &RequestInfo) -> bool {
        matches_request(self.op, self.range.as_ref(), req)
    }
}

fn matches_request(op: Option<OpKind>, range: Option<&Range<u64>>, req: &RequestInfo) -> bool {
    if op.is_some_and(|o| o != req.op) {
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
        matches_request(self.op, self.range.as_ref(), req)
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
    held: HashMap<u64, (RequestInfo, oneshot::Sender<Decision>)>,
    logging: bool,
    completed: u64,
    log: Vec<LogEntry>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a request becomes held.
    held_changed: Notify,
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
                logging: true,
                completed: 0,
                log: Vec::new(),
            }),
            held_changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock in a way that breaks the state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn decide(&self, id: u64, d: Decision) {
        let entry = self.lock().held.remove(&id);
        if let Some((_, tx)) = entry {
            // The request may have been dropped meanwhile: nothing to do then.
            let _ = tx.send(d);
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
        if self.logging {
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

/// Removes a held request from the shared state if its future is dropped while waiting.
struct HoldGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.held.remove(&self.id);
        st.unclaimed.retain(|&i| i != self.id);
    }
}

/// A request admitted to the inner backend.
struct Ticket {
    info: RequestInfo,
    issued_after: u64,
    ack: Option<oneshot::Sender<()>>,
}

/// Wraps a backend, failing, holding and logging its requests as a [`FaultController`] says.
///
/// Clones share the controller state (and the inner backend, if its clones share). It is
/// `Send` and `Sync`, and so are its futures, when the inner backend's are.
#[derive(Clone)]
pub struct FaultInjector<B> {
    inner: B,
    shared: Arc<Shared>,
}

impl<B: fmt::Debug> fmt::Debug for FaultInjector<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultInjector")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> FaultInjector<B> {
    /// Wraps `inner`; no rules, no holding, logging on.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared::new()),
        }
    }

    /// Wraps `inner` under an existing controller: several files (an image and its backing
    /// or data file) can then be driven by one controller.
    pub fn with_controller(inner: B, controller: &FaultController) -> Self {
        Self {
            inner,
            shared: controller.shared.clone(),
        }
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

    /// Admits a request: checks the rules, then holds it if asked. `Err` is an injected
    /// failure, already logged.
    async fn begin(&self, op: OpKind, offset: u64, len: u64) -> io::Result<Ticket> {
        let shared = &*self.shared;
        let (info, rx) = {
            let mut st = shared.lock();
            let info = RequestInfo {
                id: st.next_id,
                op,
                offset,
                len,
            };
            st.next_id += 1;
            if let Some(errno) = st.check_rules(&info) {
                let e = io::Error::from_raw_os_error(errno);
                let after = st.completed;
                st.record(info, after, None, Some(&e), true);
                return Err(e);
            }
            let rx = if st.holds.iter().any(|h| h.matches(&info)) {
                let (tx, rx) = oneshot::channel();
                st.held.insert(info.id, (info, tx));
                st.unclaimed.push_back(info.id);
                Some(rx)
            } else {
                None
            };
            (info, rx)
        };
        let mut ack = None;
        if let Some(rx) = rx {
            let _guard = HoldGuard {
                shared,
                id: info.id,
            };
            shared.held_changed.notify_waiters();
            tracing::trace!(?info, "request held");
            match rx.await {
                Ok(Decision::Release(a)) => ack = a,
                // Every sender gone means the state was torn down: let the request go.
                Err(_) => {}
                Ok(Decision::Fail(errno)) => {
                    let e = io::Error::from_raw_os_error(errno);
                    let mut st = shared.lock();
                    let after = st.completed;
                    st.record(info, after, None, Some(&e), true);
                    return Err(e);
                }
            }
        }
        let issued_after = shared.lock().completed;
        Ok(Ticket {
            info,
            issued_after,
            ack,
        })
    }

    /// Logs a request the inner backend has finished.
    fn finish(&self, t: Ticket, error: Option<&io::Error>, data: Option<&[u8]>) {
        {
            let mut st = self.shared.lock();
            let data = match (error, st.logging) {
                (None, true) => data.map(Bytes::copy_from_slice),
                _ => None,
            };
            st.record(t.info, t.issued_after, data, error, false);
        }
        if let Some(ack) = t.ack {
            let _ = ack.send(());
        }
    }

    /// Runs a request that has no buffer.
    async fn simple<F, Fut>(&self, op: OpKind, offset: u64, len: u64, f: F) -> io::Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = io::Result<()>>,
    {
        let t = self.begin(op, offset, len).await?;
        let r = f().await;
        self.finish(t, r.as_ref().err(), None);
        r
    }
}

impl<B: Backend> Backend for FaultInjector<B> {
    async fn read_at(&self, buf: IoBuf, offset: u64) -> BufResult<usize> {
        let t = match self.begin(OpKind::Read, offset, buf.len() as u64).await {
            Ok(t) => t,
            Err(e) => return (Err(e), buf),
        };
        let (r, buf) = self.inner.read_at(buf, offset).await;
        self.finish(t, r.as_ref().err(), None);
        (r, buf)
    }

    async fn write_at(&self, buf: IoBuf, offset: u64) -> BufResult<()> {
        let t = match self.begin(OpKind::Write, offset, buf.len() as u64).await {
            Ok(t) => t,
            Err(e) => return (Err(e), buf),
        };
        let (r, buf) = self.inner.write_at(buf, offset).await;
        self.finish(t, r.as_ref().err(), Some(&buf));
        (r, buf)
    }

    async fn flush(&self) -> io::Result<()> {
        self.simple(OpKind::Flush, 0, 0, || self.inner.flush())
            .await
    }

    async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.simple(OpKind::PunchHole, offset, len, || {
            self.inner.punch_hole(offset, len)
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.simple(OpKind::WriteZeroes, offset, len, || {
            self.inner.write_zeroes(offset, len)
        })
        .await
    }

    async fn len(&self) -> io::Result<u64> {
        // Not a request on the file's contents: passed straight through.
        self.inner.len().await
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.simple(OpKind::SetLen, len, 0, || self.inner.set_len(len))
            .await
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

/// Opens files with an inner [`Opener`](crate::Opener) and wraps each in a
/// [`FaultInjector`] driven by one shared [`FaultController`]; the files opened only for
/// reading (backing files) can be left unwrapped.
#[derive(Clone, Debug)]
pub struct FaultOpener<O> {
    inner: O,
    controller: FaultController,
}

impl<O: crate::Opener> FaultOpener<O> {
    /// Wraps `inner`; every file it opens is injected by a new controller.
    pub fn new(inner: O) -> Self {
        let shared = Arc::new(Shared::new());
        Self {
            inner,
            controller: FaultController { shared },
        }
    }

    /// The controller shared by every file opened.
    pub fn controller(&self) -> FaultController {
        self.controller.clone()
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
        Ok(FaultInjector::with_controller(inner, &self.controller))
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

    /// Releases every held request (including ones picked but not yet decided).
    pub fn release_all(&self) {
        let senders: Vec<_> = {
            let mut st = self.shared.lock();
            st.unclaimed.clear();
            st.held.drain().map(|(_, (_, tx))| tx).collect()
        };
        for tx in senders {
            let _ = tx.send(Decision::Release(None));
        }
    }

    /// The oldest held request not yet picked, if any.
    pub fn try_next_held(&self) -> Option<HeldRequest> {
        let mut st = self.shared.lock();
        while let Some(id) = st.unclaimed.pop_front() {
            if let Some((info, _)) = st.held.get(&id) {
                return Some(HeldRequest {
                    info: *info,
                    shared: self.shared.clone(),
                    decided: false,
                });
            }
        }
        None
    }

    /// Waits until a request is held and picks it (the oldest not yet picked).
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
        self.shared.lock().log.clear();
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

    /// Lets the request proceed to the inner backend.
    pub fn release(mut self) {
        self.decided = true;
        self.shared.decide(self.info.id, Decision::Release(None));
    }

    /// Lets the request proceed and waits until the inner backend has finished it (or the
    /// request was dropped). The request's own future must be polled meanwhile (by another
    /// task, or by the same `join`).
    pub async fn release_and_wait(mut self) {
        self.decided = true;
        let (tx, rx) = oneshot::channel();
        self.shared
            .decide(self.info.id, Decision::Release(Some(tx)));
        let _ = rx.await;
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
        }
    }
}
