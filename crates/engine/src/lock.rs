//! The engine's async mutex for state shared by every request ([`Lock`]): the metadata
//! (`MetaLock`) and the maintained bitmaps.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};

/// An async mutex whose [`lock`](Lock::lock) first spins a little when the lock is held by
/// another thread. Most holders of the metadata lock keep it for a few hundred nanoseconds
/// (a mapping from the cached L2 tables), of the bitmaps' for less (a write marks them); a
/// task of another thread (another queue) that found it taken would otherwise sleep and be
/// woken through its runtime, which costs tens of times that. A holder on the caller's own
/// thread cannot release it while the caller spins (it waits for I/O, or for this very
/// thread): then the caller waits at once.
///
/// The lock is the one permit of a semaphore: a lock that is free is taken by whoever asks
/// first, a waiter woken or a task that just came. (`async_lock::Mutex` turns fair once a
/// waiter has waited 0.5 ms: every later lock then queues behind it and is handed over
/// through a wake-up of the waiter's thread. With more queue threads than CPUs a waiter's
/// thread is often not running for that long, and the queues then took turns at the pace
/// of thread wake-ups: 4k reads at depth 32 over 4 queues on 2 CPUs fell from ~125,000 to
/// ~52,000 IOPS in about half the runs.) A waiter cannot starve for long: requests hold the
/// locks for short steps, never across guest data I/O.
pub(crate) struct Lock<T> {
    /// One permit: held by the [`Guard`].
    permit: async_lock::Semaphore,
    /// The thread ([`thread_tag`]) that took the lock last.
    holder: AtomicU64,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is reached only through a `Guard`, which holds the one permit (or
// through `&mut Lock`): by one thread at a time, as with a mutex.
unsafe impl<T: Send> Sync for Lock<T> {}

/// The value of a [`Lock`], locked: the lock is released when the guard is dropped. `Send`
/// and `Sync` as `&mut T`.
pub(crate) struct Guard<'a, T> {
    lock: &'a Lock<T>,
    _permit: async_lock::SemaphoreGuard<'a>,
    _as: std::marker::PhantomData<&'a mut T>,
}

/// Attempts of [`Lock::lock`] before it waits: about a microsecond, the length of a
/// mapping from the cache.
const SPINS: u32 = 64;

/// A number for the calling thread, unique in the process (never 0).
fn thread_tag() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

impl<T> Lock<T> {
    pub(crate) fn new(value: T) -> Lock<T> {
        Lock {
            permit: async_lock::Semaphore::new(1),
            holder: AtomicU64::new(0),
            value: UnsafeCell::new(value),
        }
    }

    /// Locks the value (see the type).
    ///
    /// # Cancel safety
    ///
    /// As `async_lock::Semaphore::acquire`: dropping the future leaves the lock untaken.
    pub(crate) async fn lock(&self) -> Guard<'_, T> {
        let me = thread_tag();
        let permit = match self.permit.try_acquire() {
            Some(p) => p,
            None => {
                let mut spun = None;
                if self.holder.load(Ordering::Relaxed) != me {
                    for _ in 0..SPINS {
                        std::hint::spin_loop();
                        if let Some(p) = self.permit.try_acquire() {
                            spun = Some(p);
                            break;
                        }
                    }
                }
                match spun {
                    Some(p) => p,
                    None => self.permit.acquire().await,
                }
            }
        };
        self.holder.store(me, Ordering::Relaxed);
        Guard {
            lock: self,
            _permit: permit,
            _as: std::marker::PhantomData,
        }
    }

    pub(crate) fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock's one permit (see `Lock`'s `Sync`).
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock's one permit, and `&mut self` makes this the only
        // reference through it.
        unsafe { &mut *self.lock.value.get() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// One holder at a time: a second lock waits for the first guard.
    #[test]
    fn one_holder_at_a_time() {
        let lock = Lock::new(0u32);
        let first = lock.lock().now_or_never().expect("free");
        let mut second = Box::pin(lock.lock());
        assert!((&mut second).now_or_never().is_none(), "taken twice");
        drop(first);
        let mut second = (&mut second).now_or_never().expect("released");
        *second += 1;
        drop(second);
        assert_eq!(*lock.lock().now_or_never().expect("free"), 1);
    }

    /// A free lock is taken by whoever asks, even with a waiter that has waited long and
    /// lost the lock to another (`async_lock::Mutex` would keep it for that waiter, handing
    /// it over only through the waiter's wake-up).
    #[test]
    fn a_free_lock_is_taken_at_once_whoever_waits() {
        let lock = Lock::new(());
        let a = lock.lock().now_or_never().expect("free");
        let mut waiter = Box::pin(lock.lock());
        assert!((&mut waiter).now_or_never().is_none());
        // async_lock's threshold for a waiter's turn to come first is 0.5 ms of waiting.
        std::thread::sleep(std::time::Duration::from_millis(2));
        drop(a);
        // Another takes it before the waiter runs; the waiter, woken, finds it taken.
        let b = lock.lock().now_or_never().expect("free");
        assert!((&mut waiter).now_or_never().is_none());
        drop(b);
        assert!(
            lock.lock().now_or_never().is_some(),
            "a free lock kept for a waiter"
        );
        assert!((&mut waiter).now_or_never().is_some());
    }
}
