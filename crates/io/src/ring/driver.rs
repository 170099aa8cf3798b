//! The rings: one per thread and tokio runtime, created on first use, each reaped by a task
//! of its runtime woken when the ring's descriptor turns readable (a completion is waiting),
//! and by its submitters, for what completes during their submission.
//!
//! A ring closes when its runtime is gone and nothing uses it: with its thread, or when the
//! thread next looks for a ring (in any runtime). Whatever is still in its kernel then has no
//! future waiting for it; the ring asks the kernel to cancel all of it (a FIFO's read would
//! otherwise keep the thread, or a shutting-down runtime joining its workers, waiting
//! forever) and waits for every completion, cancelled or not: only then do the requests'
//! buffers and keeps go (invariant I9).

use super::op::{complete, Completion};
use io_uring::{opcode, squeue, types, IoUring};
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::runtime::{Handle, Id};

/// Entries of the submission queue of each ring. Requests are submitted as they are queued,
/// so the queue rarely holds more than a few.
pub const RING_SQ_ENTRIES: u32 = 64;
/// Entries of each ring's completion queue: requests that may complete before they are
/// reaped (more are buffered by the kernel, at a cost).
pub const RING_CQ_ENTRIES: u32 = 4096;

/// Why a [`RingFile`](crate::RingFile) cannot do I/O on this thread. It comes inside an
/// [`io::Error`]; [`RingUnavailable::from_io`] finds it.
#[derive(Debug, thiserror::Error)]
pub enum RingUnavailable {
    /// The operation ran outside a tokio runtime: the ring's completions are reaped by a task
    /// of the runtime.
    #[error("io_uring backend used outside a tokio runtime")]
    NoRuntime,
    /// The tokio runtime was built without its I/O driver (`enable_io`), which watches the
    /// ring's descriptor. (tokio says so by panicking; the panic is caught, but the panic hook
    /// has printed it.)
    #[error("io_uring backend needs a tokio runtime with I/O enabled (enable_io)")]
    NoIoDriver,
    /// The kernel refused to set up a ring: ENOSYS (no io_uring), EPERM (io_uring disabled
    /// by `kernel.io_uring_disabled` or a seccomp filter), ENOMEM (locked memory limit).
    #[error("cannot set up an io_uring: {0}")]
    Setup(#[source] io::Error),
}

impl RingUnavailable {
    /// The reason inside `e`, if `e` says the ring is unavailable.
    pub fn from_io(e: &io::Error) -> Option<&RingUnavailable> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<RingUnavailable>())
    }

    fn into_io(self) -> io::Error {
        let kind = match &self {
            RingUnavailable::Setup(e) => e.kind(),
            _ => io::ErrorKind::Unsupported,
        };
        io::Error::new(kind, self)
    }
}

/// One ring, shared by the thread that submits to it and the task that reaps it.
pub(crate) struct Ring {
    state: Mutex<State>,
    /// Cleared when the reaping task is gone (its runtime shut down): the thread then sets
    /// up a new ring for the next runtime.
    reaped: AtomicBool,
    /// Set once the thread ran [`RingOpener::park_hook`](crate::RingOpener::park_hook) for
    /// this ring: what is queued goes to the kernel when the thread parks, so a request
    /// need not yield for its batch (see [`Ring::waits_for_park`]).
    hooked: AtomicBool,
    /// Completions handed on by [`Ring::poll_before_park`].
    #[cfg(test)]
    pub(crate) polled: std::sync::atomic::AtomicU64,
}

struct State {
    uring: IoUring,
    /// Requests queued whose completion has not been reaped.
    in_flight: usize,
    /// Requests queued so far (the sequence number of the last).
    queued: u64,
    /// The last request handed to the kernel.
    submitted: u64,
}

/// A ring of [`RING_SQ_ENTRIES`] and [`RING_CQ_ENTRIES`] that keeps submitting the rest of a
/// batch when one request of it fails to start (IORING_SETUP_SUBMIT_ALL, Linux 5.18), and
/// whose completions do not interrupt the submitting thread while it runs
/// (IORING_SETUP_COOP_TASKRUN, 5.19: the kernel finishes them when the thread next enters it,
/// as it does at the latest when its runtime polls or sleeps; a sleeping thread is woken as
/// before; IORING_SETUP_TASKRUN_FLAG tells a thread polling the queue that it must enter).
/// Each flag is dropped where the kernel refuses it.
fn build_uring() -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(RING_CQ_ENTRIES);
    let mut with_all = b.clone();
    with_all.setup_submit_all();
    let mut with_coop = with_all.clone();
    with_coop.setup_coop_taskrun().setup_taskrun_flag();
    let mut last = None;
    for builder in [with_coop, with_all, b] {
        match builder.build(RING_SQ_ENTRIES) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            r => return r,
        }
    }
    Err(last.expect("three attempts"))
}

impl Ring {
    fn new(handle: &Handle) -> io::Result<Arc<Ring>> {
        let uring = build_uring().map_err(|e| RingUnavailable::Setup(e).into_io())?;
        let fd = RingFd(uring.as_raw_fd());
        // tokio panics when its I/O driver is disabled: turn that into an error.
        let watched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _enter = handle.enter();
            // SAFETY: the descriptor is the ring's; the reaper owning the `AsyncFd` drops it
            // before its reference to the ring, the last one of which closes the descriptor.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        }))
        .map_err(|_| RingUnavailable::NoIoDriver.into_io())?
        .map_err(|e| e.into_parts().1)?;
        let ring = Arc::new(Ring {
            state: Mutex::new(State {
                uring,
                in_flight: 0,
                queued: 0,
                submitted: 0,
            }),
            reaped: AtomicBool::new(true),
            hooked: AtomicBool::new(false),
            #[cfg(test)]
            polled: Default::default(),
        });
        handle.spawn(reap(Reaper {
            ready: watched,
            alive: ReaperAlive(ring.clone()),
        }));
        Ok(ring)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the queues inconsistent: go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `entry` without submitting it; returns its sequence number for
    /// [`submit_upto`](Self::submit_upto). A full queue is submitted first.
    ///
    /// # Safety
    /// The entry's user data must come from the request's slot (see `op`), and what the
    /// entry points to must live until its completion is reaped.
    pub(crate) unsafe fn push(&self, entry: &squeue::Entry) -> io::Result<u64> {
        let mut done = Vec::new();
        let r = {
            let mut st = self.lock();
            // SAFETY: as the caller promises.
            unsafe { st.push(entry, &mut done) }
        };
        complete(done);
        r
    }

    /// Submits what is queued unless the request `seq` was already submitted (with the
    /// batch of an earlier call); completions already there are handed on.
    pub(crate) fn submit_upto(&self, seq: u64) {
        let mut done = Vec::new();
        {
            let mut st = self.lock();
            if st.submitted < seq {
                st.submit(&mut done);
            }
        }
        complete(done);
    }

    /// Whether the request `seq`, just queued, should go to the kernel now rather than after
    /// a turn of the scheduler: it is alone (nothing else of this ring is queued or in the
    /// kernel, so no batch is coming that the wait would fill, and latency is all there
    /// is), or `batch` requests are waiting.
    pub(crate) fn submit_now(&self, seq: u64, batch: u64) -> bool {
        let st = self.lock();
        st.in_flight == 1 || seq - st.submitted >= batch
    }

    /// Whether a request queued behind others may leave its submission to the park hook:
    /// the thread submits what is queued before it sleeps, the reaper when a completion
    /// comes, and the batch when it is full; the request need not yield to find the batch.
    pub(crate) fn waits_for_park(&self) -> bool {
        self.hooked.load(Ordering::Relaxed)
    }

    /// How many requests are queued and not yet submitted.
    #[cfg(test)]
    pub(crate) fn unsubmitted(&self) -> u64 {
        let st = self.lock();
        st.queued - st.submitted
    }

    /// Before the thread parks: submits what is queued and, with requests in the kernel,
    /// polls the completion queue for up to `max` (the thread stays on its CPU, and a
    /// completion is handed on without the wake-up of a sleeping thread). Returns at the
    /// first completions (handed on), when nothing is in flight, or after `max`.
    fn poll_before_park(&self, max: Duration) {
        let start = Instant::now();
        loop {
            let mut done = Vec::new();
            {
                let mut st = self.lock();
                if !st.uring.submission().is_empty() {
                    st.submit(&mut done);
                }
                if st.uring.submission().taskrun() {
                    // Completions wait for this thread to enter the kernel
                    // (IORING_SETUP_COOP_TASKRUN): enter it, to get them, and nothing else.
                    // SAFETY: submits nothing, waits for nothing, passes no argument.
                    let _ = unsafe {
                        st.uring.submitter().enter::<libc::sigset_t>(
                            0,
                            0,
                            IORING_ENTER_GETEVENTS,
                            None,
                        )
                    };
                }
                // Handed on here; the ring's descriptor is readable only while completions
                // wait, so they do not wake the reaper afterwards.
                st.drain(&mut done);
                if done.is_empty() && (st.in_flight == 0 || start.elapsed() >= max) {
                    return;
                }
            }
            if !done.is_empty() {
                #[cfg(test)]
                self.polled.fetch_add(done.len() as u64, Ordering::Relaxed);
                complete(done);
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Hands on the completions waiting in the queue (the submitter's own reaping).
    pub(crate) fn reap_now(&self) {
        let mut done = Vec::new();
        if let Ok(mut st) = self.state.try_lock() {
            st.drain(&mut done);
        }
        complete(done);
    }
}

impl State {
    /// # Safety
    /// As [`Ring::submit`].
    unsafe fn push(
        &mut self,
        entry: &squeue::Entry,
        done: &mut Vec<Completion>,
    ) -> io::Result<u64> {
        loop {
            // SAFETY: as the caller promises.
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                self.in_flight += 1;
                self.queued += 1;
                return Ok(self.queued);
            }
            // Full: hand the queue to the kernel, which frees it.
            match self.uring.submit() {
                Ok(_) => self.note_submitted(),
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e),
            }
            self.drain(done);
        }
    }

    /// Once the kernel took every queued entry, all are submitted.
    fn note_submitted(&mut self) {
        if self.uring.submission().is_empty() {
            self.submitted = self.queued;
        }
    }

    /// Submits what is queued, retrying what is transient. An entry the kernel refuses to
    /// take stays queued (its buffer with it) and goes with the next submission.
    fn submit(&mut self, done: &mut Vec<Completion>) {
        loop {
            let r = self.uring.submit();
            self.drain(done);
            match r {
                Ok(n) => {
                    self.note_submitted();
                    if self.submitted == self.queued {
                        return;
                    }
                    if n == 0 {
                        tracing::error!("io_uring took none of the queued requests");
                        return;
                    }
                }
                Err(e) if retry(&e) => {}
                Err(e) => {
                    tracing::error!("io_uring submission failed, left queued: {e}");
                    return;
                }
            }
        }
    }

    fn drain(&mut self, done: &mut Vec<Completion>) {
        let before = done.len();
        done.extend(
            self.uring
                .completion()
                .filter(|c| c.user_data() != CANCEL_ALL)
                .map(|c| Completion::new(c.user_data(), c.result())),
        );
        self.in_flight -= done.len() - before;
    }
}

/// A submission failure that goes away: interrupted, out of resources for now, or a
/// completion queue to empty first (handled by the caller's drain).
fn retry(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

impl Drop for Ring {
    /// Cancels every request still in the kernel and waits for all of them: their buffers
    /// and keeps go only then. If waiting fails, they are leaked, never freed under the
    /// kernel.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.in_flight > 0 {
            st.cancel_all();
        }
        while st.in_flight > 0 {
            let mut done = Vec::new();
            match st.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if retry(&e) => {}
                Err(e) => {
                    tracing::error!(
                        "io_uring: cannot wait for {} requests, leaking their buffers: {e}",
                        st.in_flight
                    );
                    return;
                }
            }
            st.drain(&mut done);
            complete(done);
        }
    }
}

/// The user data of the request cancelling the others when a ring closes (a slot's is never
/// null): its completion is no request's.
const CANCEL_ALL: u64 = 0;

impl State {
    /// Queues a request cancelling every other one of the ring (IORING_ASYNC_CANCEL_ANY,
    /// Linux 5.19), submitted by the caller's next submission. A request cancelled completes
    /// with ECANCELED (a flush cancelled never ran: it is not counted as failed); one the
    /// kernel cannot stop (a disk I/O under way) completes as it would have. Older kernels
    /// fail the cancellation (EINVAL): the requests are then waited for.
    fn cancel_all(&mut self) {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_ALL);
        for _ in 0..2 {
            // SAFETY: the entry points to nothing; its completion is told apart by its user
            // data.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Full: hand the queue to the kernel, which frees it.
            if let Err(e) = self.uring.submit() {
                tracing::error!("io_uring: cannot cancel the requests of a closing ring: {e}");
                return;
            }
        }
    }
}

/// Marks the ring unreaped when the reaping task goes (with its runtime), whether or not it
/// ever ran.
struct ReaperAlive(Arc<Ring>);

impl Drop for ReaperAlive {
    fn drop(&mut self) {
        self.0.reaped.store(false, Ordering::Release);
    }
}

/// The ring's descriptor, watched by its reaper: readable while completions wait in the
/// ring (or, with IORING_SETUP_COOP_TASKRUN, once the kernel has finished them on this
/// thread, which a sleeping thread is woken to do).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The reaping task's state. Its fields drop in order: the descriptor leaves tokio's watch
/// before the last reference to the ring (which closes it) may go.
struct Reaper {
    ready: AsyncFd<RingFd>,
    alive: ReaperAlive,
}

/// The ring's reaper: waits until the ring's descriptor is readable, then hands the
/// completions on.
async fn reap(r: Reaper) {
    loop {
        let mut ready = match r.ready.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("io_uring reaper: {e}");
                return;
            }
        };
        // Completions that come after this are seen by the drain below or make the
        // descriptor readable again.
        ready.clear_ready();
        let mut done = Vec::new();
        {
            let mut st = r.alive.0.lock();
            if !st.uring.submission().is_empty() {
                st.submit(&mut done);
            }
            st.drain(&mut done);
        }
        complete(done);
    }
}

/// `io_uring_enter`'s flag to reap completions (linux/io_uring.h).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// The hook of [`RingOpener::park_hook`](crate::RingOpener::park_hook): the ring of this
/// thread for the current runtime, if it has one, polls before the thread parks.
pub(crate) fn before_park(max: Duration) {
    if max.is_zero() {
        return;
    }
    let Ok(handle) = Handle::try_current() else {
        return;
    };
    let id = handle.id();
    let ring = RINGS.with(|rings| {
        rings
            .borrow()
            .iter()
            .find(|(i, r)| *i == id && r.reaped.load(Ordering::Acquire))
            .map(|(_, r)| r.clone())
    });
    if let Some(ring) = ring {
        ring.hooked.store(true, Ordering::Relaxed);
        ring.poll_before_park(max);
    }
}

thread_local! {
    /// This thread's rings, one per tokio runtime it polled requests in.
    static RINGS: RefCell<Vec<(Id, Arc<Ring>)>> = const { RefCell::new(Vec::new()) };
}

/// The ring of this thread for the current tokio runtime, set up on first use.
pub(crate) fn current() -> io::Result<Arc<Ring>> {
    let handle = Handle::try_current().map_err(|_| RingUnavailable::NoRuntime.into_io())?;
    let id = handle.id();
    let (found, gone) = RINGS.with(|rings| {
        let mut rings = rings.borrow_mut();
        let mut gone = Vec::new();
        if rings.iter().any(|(_, r)| !r.reaped.load(Ordering::Acquire)) {
            let live;
            (live, gone) = std::mem::take(&mut *rings)
                .into_iter()
                .partition(|(_, r)| r.reaped.load(Ordering::Acquire));
            *rings = live;
        }
        let found = rings.iter().find(|(i, _)| *i == id).map(|(_, r)| r.clone());
        (found, gone)
    });
    // The rings of runtimes gone wait here for their last requests, outside the borrow.
    drop(gone);
    if let Some(ring) = found {
        return Ok(ring);
    }
    let ring = Ring::new(&handle)?;
    RINGS.with(|rings| rings.borrow_mut().push((id, ring.clone())));
    Ok(ring)
}
