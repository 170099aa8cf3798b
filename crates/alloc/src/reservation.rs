//! Reservations: a cluster allocated for a write and not referenced yet.
//!
//! An allocating write takes a host cluster from the [`Allocator`](crate::Allocator)
//! (refcount 0 -> 1), writes its data there, and only then installs the L2 entry that refers
//! to it. If the request is dropped or fails on the way, nothing refers to the cluster and
//! it must go back; but not before its data write, which the kernel may still be carrying
//! out, has finished: otherwise the cluster could be handed to another guest offset and the
//! late write land on that offset's data (invariant I9).
//!
//! So the cluster is held by a [`Reservation`], a guard that travels with the write's I/O (in
//! its keep, see `blockio::Keep`) and drops when the last of the request and its I/O is gone.
//! Dropped without [`Reservation::commit`], it puts the cluster on the allocator's
//! [`Returns`] list; the allocator takes it back ([`Allocator::reclaim`](crate::Allocator::reclaim))
//! the next time it allocates or the engine writes refcounts back. Dropping needs no lock
//! the caller may hold: the list has its own mutex (a leaf, held for a push).
//!
//! A compressed write holds its references the same way, with one difference: the host
//! cluster its bytes go into may be shared with other compressed clusters (packed at byte
//! granularity, as QEMU packs them), so an uncommitted reservation of that kind gives back
//! one *reference* per cluster, as a deferred decrement: the count drops to 0 only if nothing
//! else uses the cluster, and then under its exclusive lease (invariant I3).

use crate::sync::{lock, Arc, Mutex};
use qcow2_format::HostCluster;
use std::sync::atomic::{AtomicBool, Ordering};

/// Clusters given back by uncommitted reservations, waiting for the allocator. Cheap to
/// clone; clones share the list.
#[derive(Clone, Default)]
pub struct Returns {
    inner: Arc<Mutex<Vec<Returned>>>,
}

/// A run given back by an uncommitted reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Returned {
    pub(crate) first: HostCluster,
    pub(crate) count: u64,
    /// One reference each, through the deferred decrements (a compressed write's bytes),
    /// rather than clusters nothing else can use.
    pub(crate) unref: bool,
}

impl Returns {
    /// Takes every run given back so far.
    pub(crate) fn take(&self) -> Vec<Returned> {
        std::mem::take(&mut *lock(&self.inner))
    }

    /// How many runs wait.
    pub fn len(&self) -> usize {
        lock(&self.inner).len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Returns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Returns")
            .field("runs", &self.len())
            .finish()
    }
}

/// Clusters allocated (refcount 1) for a write that has not referred to them yet. Dropped
/// uncommitted, they go back to the allocator; committed, they are the referrer's.
#[must_use = "dropping a reservation gives its clusters back"]
pub struct Reservation {
    first: HostCluster,
    count: u64,
    unref: bool,
    committed: AtomicBool,
    returns: Returns,
}

impl Reservation {
    pub(crate) fn new(first: HostCluster, count: u64, unref: bool, returns: Returns) -> Self {
        Reservation {
            first,
            count,
            unref,
            committed: AtomicBool::new(false),
            returns,
        }
    }

    /// The first cluster reserved.
    pub fn first(&self) -> HostCluster {
        self.first
    }

    /// How many clusters are reserved.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The clusters are referred to now (their L2 entry is in place): dropping the
    /// reservation no longer gives them back. Call it in the same critical section (under
    /// the metadata lock) that made the reference.
    pub fn commit(&self) {
        self.committed.store(true, Ordering::Release);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.committed.load(Ordering::Acquire) {
            lock(&self.returns.inner).push(Returned {
                first: self.first,
                count: self.count,
                unref: self.unref,
            });
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Reservation({}+{}{})",
            self.first.0,
            self.count,
            if self.committed.load(Ordering::Relaxed) {
                ", committed"
            } else {
                ""
            }
        )
    }
}
