//! The test's side: the controller and the held requests it hands out.

use super::state::{Decision, RuleState, Shared, Waiter};
use super::{FaultRule, LogEntry, RequestFilter, RequestInfo};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::oneshot;

/// The test's handle on a [`FaultInjector`]: cloneable, `Send` and `Sync`.
#[derive(Clone)]
pub struct FaultController {
    pub(super) shared: Arc<Shared>,
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

    /// How many calls into the inner backends (requests admitted, orphans run, and the
    /// queries passed through: `len`, `allocation`, `allocated_size`) are running: their
    /// futures are alive and have not finished. A call whose future is dropped stops counting
    /// (the inner backend may still finish it on its own, as the kernel does).
    ///
    /// With held requests, this tells a test driving its tasks on a local executor when
    /// every task waits for something held rather than for a backend that completes
    /// asynchronously (a real file, io_uring): stalled and [`running`](Self::running) 0.
    pub fn running(&self) -> usize {
        self.shared.lock().running
    }

    /// Waits until no call into the inner backends is running (see
    /// [`running`](Self::running)). The futures of the calls must be polled meanwhile.
    ///
    /// # Cancel safety
    ///
    /// Only waits: dropping the future changes nothing.
    pub async fn idle(&self) {
        loop {
            let mut notified = std::pin::pin!(self.shared.idle.notified());
            notified.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
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
