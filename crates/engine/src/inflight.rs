//! What a request leaves behind when its future is dropped (invariant I9).
//!
//! An operation the backend has accepted completes even if the future that issued it is
//! dropped, so the guards it needs cannot live in that future alone. A request gathers its
//! guards in one [`Guards`] (shared leases, the allocation gate, the reserved cluster, a
//! [`Token`] of the image's I/O tracker) and hands a clone of it, as a [`blockio::Keep`], to
//! every backend operation it issues: the guards drop when the last of the request's future
//! and its operations is gone. Operations outside a request carry their own keep: a
//! punch-hole its exclusive lease, a metadata write a token of the metadata tracker.
//!
//! Two [`Tracker`]s count operations in flight. `close` waits until both are idle, so that
//! nothing a dropped request started can land after the image is closed (or keep a cluster
//! from being freed by the last write-back). Every metadata write first waits until no other
//! metadata write is in flight: the only way one can be is a write-back whose future was
//! dropped mid-write, and its stale version of a table must land before a newer one is
//! issued, never after it.

use async_lock::{RwLock, RwLockReadGuardArc};
use blockio::Keep;
use qcow2_alloc::{GateGuard, Reservation, SharedLease};
use std::sync::Arc;

/// Counts the operations in flight that carry one of its [`Token`]s.
#[derive(Clone, Default)]
pub(crate) struct Tracker(Arc<RwLock<()>>);

/// One operation (or request) in flight, counted by its [`Tracker`] until dropped.
pub(crate) struct Token(#[allow(dead_code)] RwLockReadGuardArc<()>);

impl Tracker {
    /// A token. Waits only while [`idle`](Self::idle) waits (so that a drain ends).
    pub(crate) async fn token(&self) -> Token {
        match self.0.try_read_arc() {
            Some(g) => Token(g),
            None => Token(self.0.read_arc().await),
        }
    }

    /// Waits until no token is left.
    ///
    /// # Cancel safety
    /// Dropping the wait leaves nothing behind.
    pub(crate) async fn idle(&self) {
        drop(self.0.write().await);
    }

    /// Waits until no token is left and keeps new ones waiting until the guard is dropped.
    ///
    /// # Cancel safety
    /// Dropping the wait leaves nothing behind.
    pub(crate) async fn exclusive(&self) -> async_lock::RwLockWriteGuard<'_, ()> {
        self.0.write().await
    }
}

/// The guards of one request: they live until the request's future and every backend
/// operation it issued are gone (see the module documentation).
pub(crate) struct Guards {
    /// Shared leases on the host clusters the request reads or writes (I2).
    _leases: Vec<SharedLease>,
    /// The allocation gate of the guest cluster an allocating write fills (I6).
    _gate: Option<GateGuard>,
    /// The host cluster an allocating write fills, given back unless committed.
    pub(crate) reservation: Option<Reservation>,
    _token: Token,
}

impl Guards {
    /// Guards of a request counted by `io`.
    pub(crate) async fn new(io: &Tracker, leases: Vec<SharedLease>) -> Arc<Guards> {
        Arc::new(Guards {
            _leases: leases,
            _gate: None,
            reservation: None,
            _token: io.token().await,
        })
    }

    /// Guards of an allocating write.
    pub(crate) async fn allocating(
        io: &Tracker,
        leases: Vec<SharedLease>,
        gate: GateGuard,
        reservation: Option<Reservation>,
    ) -> Arc<Guards> {
        Arc::new(Guards {
            _leases: leases,
            _gate: Some(gate),
            reservation,
            _token: io.token().await,
        })
    }
}

/// A keep holding `guards` (for one backend operation).
pub(crate) fn keep(guards: &Arc<Guards>) -> Keep {
    Keep::from_arc(guards.clone())
}
