//! The state shared by an injector and its controllers: rules, held requests, orphans, the log.

use super::{FaultRule, LogEntry, OpKind, RequestFilter, RequestInfo};
use crate::{IoBuf, Keep};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use tokio::sync::{oneshot, Notify};

pub(super) enum Decision {
    /// Go on; signal `ack` once the inner backend has finished.
    Release(Option<oneshot::Sender<()>>),
    Fail(i32),
}

/// What the inner backend needs to run a request, and what the request keeps alive.
pub(super) enum Work {
    Read(IoBuf),
    Write(IoBuf),
    Flush,
    PunchHole(Keep),
    WriteZeroes(Keep),
    SetLen,
    Preallocate(Keep),
}

/// What running a request gave.
pub(super) enum Outcome {
    Buf(io::Result<usize>, IoBuf),
    Done(io::Result<()>),
}

/// Who waits for a held request's decision.
pub(super) enum Waiter {
    /// Its future, alive.
    Live(oneshot::Sender<Decision>),
    /// Nobody: its future was dropped; the request runs (on an orphan driver) when released.
    Orphan(Work),
}

pub(super) struct Held {
    pub(super) info: RequestInfo,
    pub(super) waiter: Waiter,
}

/// A released orphan, waiting for a driver.
pub(super) struct Orphan {
    pub(super) info: RequestInfo,
    pub(super) work: Work,
    pub(super) ack: Option<oneshot::Sender<()>>,
}

pub(super) struct RuleState {
    pub(super) rule: FaultRule,
    pub(super) seen: u64,
    pub(super) failed: u64,
}

pub(super) struct State {
    pub(super) next_id: u64,
    pub(super) rules: Vec<RuleState>,
    pub(super) holds: Vec<RequestFilter>,
    /// Held requests nobody has picked yet, in arrival order.
    pub(super) unclaimed: VecDeque<u64>,
    /// Every held request waiting for a decision.
    pub(super) held: HashMap<u64, Held>,
    /// Released orphans not yet run, in release order.
    pub(super) ready: VecDeque<Orphan>,
    /// Orphan drivers running.
    pub(super) drivers: usize,
    /// Injected flush failures, by file.
    pub(super) flush_failures: HashMap<u32, u64>,
    pub(super) logging: bool,
    pub(super) completed: u64,
    pub(super) log: Vec<LogEntry>,
    /// Requests that finished unlogged since the log was last emptied (crash images cannot be
    /// built from a log with holes).
    pub(super) unlogged: u64,
    /// The files, by number: the path a [`FaultOpener`] opened (`None` for other injectors).
    pub(super) files: Vec<Option<PathBuf>>,
    /// Calls into the inner backend whose futures are running (see [`Running`]).
    pub(super) running: usize,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Signalled when a request becomes held.
    pub(super) held_changed: Notify,
    /// Signalled when an orphan is released.
    pub(super) ready_changed: Notify,
    /// Signalled when the last running call into the inner backend ends.
    pub(super) idle: Notify,
}

impl Shared {
    pub(super) fn new() -> Self {
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
                running: 0,
            }),
            held_changed: Notify::new(),
            ready_changed: Notify::new(),
            idle: Notify::new(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock in a way that breaks the state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides a held request. A live request learns the decision under the state lock, so
    /// that its future, if dropped meanwhile, finds either its entry or the decision.
    pub(super) fn decide(&self, id: u64, d: Decision) {
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
    pub(super) fn record(
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
    pub(super) fn injected_failure(&mut self, info: RequestInfo, errno: i32) -> io::Error {
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
    pub(super) fn orphan_decided(
        &mut self,
        info: RequestInfo,
        work: Work,
        d: Decision,
    ) -> Option<Work> {
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
    pub(super) fn file_number(&mut self, path: Option<&Path>) -> u32 {
        if let Some(i) = path.and_then(|p| self.files.iter().position(|f| f.as_deref() == Some(p)))
        {
            return i as u32;
        }
        self.files.push(path.map(Path::to_path_buf));
        (self.files.len() - 1) as u32
    }

    /// The errno of the first rule that fails `info`, counting it against every matching rule.
    pub(super) fn check_rules(&mut self, info: &RequestInfo) -> Option<i32> {
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
pub(super) struct Waiting<'a> {
    pub(super) shared: &'a Shared,
    pub(super) info: RequestInfo,
    pub(super) rx: oneshot::Receiver<Decision>,
    pub(super) work: Option<Work>,
}

impl Waiting<'_> {
    pub(super) async fn decision(&mut self) -> (Decision, Work) {
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
pub(super) struct Ticket<'a> {
    pub(super) shared: &'a Shared,
    pub(super) info: RequestInfo,
    pub(super) issued_after: u64,
    pub(super) ack: Option<oneshot::Sender<()>>,
    pub(super) finished: bool,
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

/// A call into the inner backend, counted in [`State::running`] while its future lives.
pub(super) struct Running<'a>(&'a Shared);

impl<'a> Running<'a> {
    pub(super) fn new(shared: &'a Shared) -> Self {
        shared.lock().running += 1;
        Running(shared)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let idle = {
            let mut st = self.0.lock();
            st.running -= 1;
            st.running == 0
        };
        if idle {
            self.0.idle.notify_waiters();
        }
    }
}
