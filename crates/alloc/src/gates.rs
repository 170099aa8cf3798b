//! Gates: one allocation per guest cluster (invariant I6).
//!
//! An allocating write registers a gate for its guest cluster while it plans under the
//! metadata lock, and keeps it until its L2 entry is in place. Any other request that would
//! change the same guest cluster meanwhile (a second allocating writer, a discard, a
//! write-zeroes) finds the gate, drops the metadata lock, waits on the gate and plans again:
//! by then the cluster is allocated and the second writer writes in place.
//!
//! [`Gates::begin`] both tests and registers; call it (and [`Gates::get`]) with the metadata
//! lock held, so that the test and the plan that follows see one state. The gate closes when
//! its [`GateGuard`] drops: the entry leaves the table first, then the waiters are woken, so a
//! woken waiter that plans again never finds the same gate. Dropping the guard anywhere
//! (including when the writing future is cancelled) closes the gate: nothing can wait forever
//! on an allocation that was abandoned.
//!
//! Lock order: the metadata lock, then the table's own mutex (held only for a map lookup,
//! never across an `.await`). Waiting on a gate happens without the metadata lock.

use crate::sync::{lock, Arc, Mutex, RwLock, RwLockWriteGuardArc};
use std::collections::HashMap;

type Entry = Arc<RwLock<()>>;

/// A gate's lock and how many guards and waiters use it. As in the lease table, the last
/// user drops the lock under the table's mutex, after every other user's last access.
struct Slot {
    lock: Entry,
    users: usize,
}

#[derive(Default)]
struct Table {
    /// Guest cluster -> the gate of the allocation in flight.
    open: HashMap<u64, u64>,
    /// Gate id -> its lock; a gate outlives its allocation while waiters still use it.
    slots: HashMap<u64, Slot>,
    next_id: u64,
}

#[derive(Default)]
struct Inner {
    table: Mutex<Table>,
}

/// The gates of the allocations in flight, keyed by guest cluster index (guest offset >>
/// cluster bits). Cheap to clone; clones share the table.
#[derive(Clone, Default)]
pub struct Gates {
    inner: Arc<Inner>,
}

/// One counted use of a gate's lock.
struct User {
    gates: Gates,
    id: u64,
    entry: Option<Entry>,
}

impl User {
    fn entry(&self) -> &Entry {
        self.entry.as_ref().expect("entry present until drop")
    }
}

impl Drop for User {
    fn drop(&mut self) {
        drop(self.entry.take());
        let mut t = lock(&self.gates.inner.table);
        let slot = t
            .slots
            .get_mut(&self.id)
            .expect("a used gate is in the table");
        slot.users -= 1;
        if slot.users == 0 {
            t.slots.remove(&self.id);
        }
    }
}

/// A gate to wait on: the allocation of a guest cluster by another request.
pub struct Gate {
    user: User,
}

/// The right to allocate one guest cluster. The gate stays closed (others wait) until this
/// guard drops.
#[must_use = "the gate opens as soon as the guard drops"]
pub struct GateGuard {
    guest_cluster: u64,
    guard: Option<RwLockWriteGuardArc<()>>,
    user: User,
}

impl Table {
    fn user(&mut self, gates: &Gates, id: u64) -> User {
        let slot = self.slots.get_mut(&id).expect("an open gate has a slot");
        slot.users += 1;
        User {
            gates: gates.clone(),
            id,
            entry: Some(slot.lock.clone()),
        }
    }
}

impl Gates {
    /// No allocation in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts allocating `guest_cluster`: `Ok(guard)` if no allocation of it is in flight
    /// (the caller is its only allocator until the guard drops), otherwise `Err(gate)`: drop
    /// the metadata lock, [`Gate::wait`], and plan again. Call it with the metadata lock held.
    pub fn begin(&self, guest_cluster: u64) -> Result<GateGuard, Gate> {
        let mut t = lock(&self.inner.table);
        if let Some(&id) = t.open.get(&guest_cluster) {
            return Err(Gate {
                user: t.user(self, id),
            });
        }
        let id = t.next_id;
        t.next_id += 1;
        t.slots.insert(
            id,
            Slot {
                lock: Arc::new(RwLock::new(())),
                users: 0,
            },
        );
        t.open.insert(guest_cluster, id);
        let user = t.user(self, id);
        let guard = user
            .entry()
            .try_write_arc()
            .expect("a new gate is locked by nobody");
        Ok(GateGuard {
            guest_cluster,
            guard: Some(guard),
            user,
        })
    }

    /// The gate of an allocation of `guest_cluster` in flight, if any.
    pub fn get(&self, guest_cluster: u64) -> Option<Gate> {
        self.first_in([guest_cluster])
    }

    /// The first gate found among `guest_clusters` (for a request over a range).
    pub fn first_in(&self, guest_clusters: impl IntoIterator<Item = u64>) -> Option<Gate> {
        let mut t = lock(&self.inner.table);
        if t.open.is_empty() {
            return None;
        }
        let id = guest_clusters
            .into_iter()
            .find_map(|c| t.open.get(&c).copied())?;
        Some(Gate {
            user: t.user(self, id),
        })
    }

    /// Whether an allocation of `guest_cluster` is in flight.
    pub fn is_allocating(&self, guest_cluster: u64) -> bool {
        lock(&self.inner.table).open.contains_key(&guest_cluster)
    }

    /// Number of allocations in flight.
    pub fn len(&self) -> usize {
        lock(&self.inner.table).open.len()
    }

    /// Whether no allocation is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Clone for Gate {
    fn clone(&self) -> Self {
        let gates = &self.user.gates;
        Gate {
            user: lock(&gates.inner.table).user(gates, self.user.id),
        }
    }
}

impl Gate {
    /// Waits until the allocation behind this gate has finished (its guard dropped). Never
    /// call it with the metadata lock held: the allocator needs the lock to finish.
    ///
    /// # Cancel safety
    ///
    /// Dropping the wait gives this use of the gate back: nothing is left behind.
    pub async fn wait(self) {
        drop(self.user.entry().read().await);
    }
}

impl GateGuard {
    /// The guest cluster being allocated.
    pub fn guest_cluster(&self) -> u64 {
        self.guest_cluster
    }
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        lock(&self.user.gates.inner.table)
            .open
            .remove(&self.guest_cluster);
        // Out of the table first, then the waiters go: none of them finds this gate again.
        // (`user` is given back after this, when the fields drop.)
        drop(self.guard.take());
    }
}

impl std::fmt::Debug for Gates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gates")
            .field("allocating", &self.len())
            .finish()
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gate({})", self.user.id)
    }
}

impl std::fmt::Debug for GateGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GateGuard({})", self.guest_cluster)
    }
}
