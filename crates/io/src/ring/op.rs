//! One request in flight: the entry the kernel completes, owning what the request lends it
//! (buffer, keep, file) until its completion is reaped, whether or not its future is still
//! there.

use super::driver::{self, Ring};
use crate::{IoBuf, Keep, TokioFile};
use io_uring::squeue;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// What a request lends the kernel: dropped when the request completes (or never starts).
#[derive(Debug)]
pub(crate) struct Hold {
    /// The buffer read into or written from.
    pub(crate) buf: Option<IoBuf>,
    /// The guards of the request, held for their drop.
    pub(crate) _keep: Keep,
    /// The file: its descriptor stays open, and its locks held, until the request is over.
    pub(crate) file: TokioFile,
    /// A flush: a failure counts in the file's `flush_failures`, even with no one waiting.
    pub(crate) flush: bool,
}

impl Hold {
    pub(crate) fn new(file: &TokioFile, buf: Option<IoBuf>, keep: Keep) -> Hold {
        Hold {
            buf,
            _keep: keep,
            file: file.clone(),
            flush: false,
        }
    }
}

enum State {
    /// In the kernel; the future (if any) waits with `waker`.
    InFlight { waker: Option<Waker>, hold: Hold },
    /// Completed with `res`; the future has not taken it yet.
    Done { res: i32, hold: Hold },
    /// Taken by the future.
    Taken,
}

/// The shared state of one request: one reference is the entry's user data (the kernel's),
/// the other the future's.
struct Slot(Mutex<State>);

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A completion reaped from a ring, handed on outside the ring's lock.
pub(crate) struct Completion {
    slot: Arc<Slot>,
    res: i32,
}

impl Completion {
    /// Takes back the reference the entry carried.
    pub(crate) fn new(user_data: u64, res: i32) -> Completion {
        // SAFETY: every entry we submit carries a reference made by `Arc::into_raw` in
        // `Submit::start`, and each entry completes exactly once.
        let slot = unsafe { Arc::from_raw(user_data as usize as *const Slot) };
        Completion { slot, res }
    }
}

/// Records each completion and wakes its future. If the future is gone, the hold (buffer,
/// keep, file) drops here.
pub(crate) fn complete(done: Vec<Completion>) {
    for c in done {
        let mut st = c.slot.lock();
        let State::InFlight { waker, hold } = std::mem::replace(&mut *st, State::Taken) else {
            unreachable!("a request completed twice");
        };
        // A flush cancelled (by its ring closing) never ran: the next flush covers its
        // writes, and no error of theirs was consumed.
        if hold.flush && c.res < 0 && c.res != -libc::ECANCELED {
            hold.file.count_flush_failure();
        }
        *st = State::Done { res: c.res, hold };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Queued requests of a ring that make the request that finds them submit them at once,
/// rather than on its second poll or at the park. Small batches keep a busy device fed: a
/// request waits for at most three others, and each submission reaches the device while
/// it still works on the previous ones (4k O_DIRECT reads at depth 32 in a VM: ~130,000
/// IOPS with batches of 16, ~170,000 with 4, as tokio-uring with its 4-entry submission
/// queue from [`uring_builder`](crate::uring_builder); 3 to 6 do about as
/// well as 4).
const BATCH: u64 = 4;

/// The future of one request. When first polled it queues the request on this thread's ring
/// and, unless the ring was idle (then it submits at once: latency is all there is), yields
/// (waking itself): the other requests that are ready meanwhile queue theirs, and the first
/// to be polled again submits them all in one system call (the device sees a batch; a VM
/// exits once for it). [`BATCH`] queued requests are submitted at once. On a thread running
/// the park hook it does not yield: what is queued goes to the kernel when the thread parks
/// (the hook submits it), when the reaper hands on a completion, or with a full batch,
/// without a second turn of the scheduler for each request. Then it waits for its
/// completion. Its output is the kernel's result (a count) and the hold back.
/// `Send`: the request may be awaited on any thread.
pub(crate) struct Submit {
    entry: Option<squeue::Entry>,
    hold: Option<Hold>,
    slot: Option<Queued>,
}

/// A request queued on a ring.
struct Queued {
    slot: Arc<Slot>,
    ring: Arc<Ring>,
    /// Its sequence number on the ring, until it is known to be submitted.
    seq: Option<u64>,
}

/// Submits `entry` (which points into `hold`'s buffer, if any) and waits for it.
pub(crate) fn submit(entry: squeue::Entry, hold: Hold) -> Submit {
    Submit {
        entry: Some(entry),
        hold: Some(hold),
        slot: None,
    }
}

impl Submit {
    /// Queues the entry on this thread's ring. On an error nothing was queued and the hold
    /// comes back.
    fn start(&mut self, cx: &Context<'_>) -> Result<Queued, (io::Error, Hold)> {
        let hold = self.hold.take().expect("polled after completion");
        let ring = match driver::current() {
            Ok(r) => r,
            Err(e) => return Err((e, hold)),
        };
        let slot = Arc::new(Slot(Mutex::new(State::InFlight {
            waker: Some(cx.waker().clone()),
            hold,
        })));
        let user_data = Arc::into_raw(slot.clone()) as usize as u64;
        let entry = self
            .entry
            .take()
            .expect("started twice")
            .user_data(user_data);
        // SAFETY: the entry points only into the hold, which the slot owns until the
        // completion is reaped; the user data is the slot's reference for the kernel.
        match unsafe { ring.push(&entry) } {
            Ok(seq) => Ok(Queued {
                slot,
                ring,
                seq: Some(seq),
            }),
            Err(e) => {
                // Not queued: take back the kernel's reference, and the hold.
                // SAFETY: made by `into_raw` above and not given to the kernel.
                drop(unsafe { Arc::from_raw(user_data as usize as *const Slot) });
                let st = std::mem::replace(&mut *slot.lock(), State::Taken);
                let State::InFlight { hold, .. } = st else {
                    unreachable!("a request completed without being queued");
                };
                Err((e, hold))
            }
        }
    }
}

impl Future for Submit {
    type Output = (io::Result<u32>, Hold);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(q) = &mut this.slot else {
            let mut q = match this.start(cx) {
                Ok(q) => q,
                Err((e, hold)) => {
                    if hold.flush {
                        hold.file.count_flush_failure();
                    }
                    return Poll::Ready((Err(e), hold));
                }
            };
            let seq = q.seq.expect("queued");
            if q.ring.submit_now(seq, BATCH) {
                q.seq = None;
                q.ring.submit_upto(seq);
            } else if !q.ring.waits_for_park() {
                // Back after the other ready tasks, which may queue theirs.
                cx.waker().wake_by_ref();
            }
            this.slot = Some(q);
            return Poll::Pending;
        };
        if let Some(seq) = q.seq.take() {
            q.ring.submit_upto(seq);
        }
        for attempt in 0..2 {
            let mut st = q.slot.lock();
            match std::mem::replace(&mut *st, State::Taken) {
                State::Done { res, hold } => {
                    drop(st);
                    this.slot = None;
                    let r = match res {
                        n if n >= 0 => Ok(n as u32),
                        e => Err(io::Error::from_raw_os_error(-e)),
                    };
                    return Poll::Ready((r, hold));
                }
                State::InFlight { waker, hold } => {
                    let waker = match waker {
                        Some(w) if w.will_wake(cx.waker()) => w,
                        _ => cx.waker().clone(),
                    };
                    *st = State::InFlight {
                        waker: Some(waker),
                        hold,
                    };
                }
                State::Taken => unreachable!("polled after completion"),
            }
            drop(st);
            if attempt == 0 {
                // It may be in the completion queue already: reap it without the trip
                // through the reaper.
                q.ring.reap_now();
            }
        }
        Poll::Pending
    }
}

impl Drop for Submit {
    /// A request in flight keeps its hold in the slot until the kernel completes it; only
    /// the waker goes. One still queued is submitted now, so that it completes (and its
    /// keep goes) even if nothing else comes to this ring.
    fn drop(&mut self) {
        if let Some(q) = &mut self.slot {
            if let State::InFlight { waker, .. } = &mut *q.slot.lock() {
                *waker = None;
            }
            if let Some(seq) = q.seq.take() {
                q.ring.submit_upto(seq);
            }
        }
    }
}
