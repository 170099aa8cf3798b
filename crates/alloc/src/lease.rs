//! The lease table: one `async_lock::RwLock` per host cluster, created on demand and dropped
//! when nobody holds or waits for it.
//!
//! Data I/O on a host cluster holds a [`SharedLease`]; freeing a cluster takes an
//! [`ExclusiveLease`], which waits for every shared holder to finish. A cluster whose lease is
//! held or waited for is never allocatable ([`LeaseTable::is_leased`]).
//!
//! Never wait for a lease while holding the engine's metadata lock (async-lock's RwLock lets a
//! waiting writer block new readers, and the freer needs the metadata lock to finish): use
//! [`LeaseTable::try_shared`] under the lock and fall back to [`LeaseTable::shared`] after
//! dropping it, then re-validate the mapping.

use crate::sync::{lock, Arc, Mutex, RwLock, RwLockReadGuardArc, RwLockWriteGuardArc};
use qcow2_format::HostCluster;
use std::collections::HashMap;

type Entry = Arc<RwLock<()>>;

/// A cluster's lock and how many leases, waiters and tries use it. The count lives under the
/// table's mutex: every user takes its clone of the lock and gives it back through the mutex,
/// so the lock is dropped (by the last user, under the mutex) only after every other user's
/// last access to it. The count, not `Arc::strong_count`, decides: a model checker sees the
/// mutex, not std's reference counts.
struct Slot {
    lock: Entry,
    users: usize,
}

#[derive(Default)]
struct Inner {
    map: Mutex<HashMap<u64, Slot>>,
}

/// The per-host-cluster lease table. Cheap to clone; clones share the table.
#[derive(Clone, Default)]
pub struct LeaseTable {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LeaseTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseTable")
            .field("entries", &lock(&self.inner.map).len())
            .finish()
    }
}

/// One use of a cluster's slot: a clone of its lock, counted; dropping it drops the clone
/// and gives the use back (removing the slot when it was the last).
struct User {
    table: LeaseTable,
    cluster: u64,
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
        let mut map = lock(&self.table.inner.map);
        let slot = map
            .get_mut(&self.cluster)
            .expect("a used slot is in the table");
        slot.users -= 1;
        if slot.users == 0 {
            map.remove(&self.cluster);
        }
    }
}

/// A shared lease on one host cluster: data I/O on the cluster may proceed while it is held.
#[must_use = "a lease protects I/O only while it is held"]
pub struct SharedLease {
    cluster: u64,
    // Field order matters: the guard goes before the use is given back.
    _guard: Option<RwLockReadGuardArc<()>>,
    _user: Option<User>,
}

/// The exclusive lease on one host cluster: no data I/O on it is in flight while it is held.
#[must_use = "a lease protects the cluster only while it is held"]
pub struct ExclusiveLease {
    cluster: u64,
    _guard: Option<RwLockWriteGuardArc<()>>,
    _user: Option<User>,
}

impl LeaseTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// A counted use of `cluster`'s slot (created if absent).
    fn user(&self, cluster: u64) -> User {
        let mut map = lock(&self.inner.map);
        let slot = map.entry(cluster).or_insert_with(|| Slot {
            lock: Arc::new(RwLock::new(())),
            users: 0,
        });
        slot.users += 1;
        User {
            table: self.clone(),
            cluster,
            entry: Some(slot.lock.clone()),
        }
    }

    /// Takes a shared lease without waiting; `None` if an exclusive lease is held or waited
    /// for. Safe to call under the metadata lock.
    pub fn try_shared(&self, cluster: HostCluster) -> Option<SharedLease> {
        if cfg!(qcow2_no_lease) {
            return Some(self.noop_shared(cluster));
        }
        let user = self.user(cluster.0);
        let guard = user.entry().try_read_arc()?;
        Some(SharedLease {
            cluster: cluster.0,
            _guard: Some(guard),
            _user: Some(user),
        })
    }

    /// Takes a shared lease, waiting for an exclusive holder to finish. Never call this with
    /// the metadata lock held. Cancelling the wait leaves nothing behind.
    ///
    /// # Cancel safety
    ///
    /// Dropping the wait leaves no entry behind (the cluster is free again for the
    /// allocator's lease test once nobody else uses it).
    pub async fn shared(&self, cluster: HostCluster) -> SharedLease {
        if cfg!(qcow2_no_lease) {
            return self.noop_shared(cluster);
        }
        let user = self.user(cluster.0);
        let guard = user.entry().read_arc().await;
        SharedLease {
            cluster: cluster.0,
            _guard: Some(guard),
            _user: Some(user),
        }
    }

    /// Takes the exclusive lease, waiting for every shared holder. Never call this with the
    /// metadata lock held. Cancelling the wait leaves nothing behind.
    ///
    /// # Cancel safety
    ///
    /// As [`LeaseTable::shared`].
    pub async fn exclusive(&self, cluster: HostCluster) -> ExclusiveLease {
        if cfg!(qcow2_no_lease) {
            return self.noop_exclusive(cluster);
        }
        let user = self.user(cluster.0);
        let guard = user.entry().write_arc().await;
        ExclusiveLease {
            cluster: cluster.0,
            _guard: Some(guard),
            _user: Some(user),
        }
    }

    /// Takes the exclusive lease without waiting; `None` if any lease on the cluster is held or
    /// waited for. Safe to call under the metadata lock.
    pub fn try_exclusive(&self, cluster: HostCluster) -> Option<ExclusiveLease> {
        if cfg!(qcow2_no_lease) {
            return Some(self.noop_exclusive(cluster));
        }
        let user = self.user(cluster.0);
        let guard = user.entry().try_write_arc()?;
        Some(ExclusiveLease {
            cluster: cluster.0,
            _guard: Some(guard),
            _user: Some(user),
        })
    }

    /// Whether a lease on `cluster` is held or waited for. The allocator never hands out such
    /// a cluster (invariant I1).
    pub fn is_leased(&self, cluster: HostCluster) -> bool {
        lock(&self.inner.map).contains_key(&cluster.0)
    }

    /// Number of clusters with a live entry (held or waited for).
    pub fn len(&self) -> usize {
        lock(&self.inner.map).len()
    }

    /// Whether no lease is held or waited for.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn noop_shared(&self, cluster: HostCluster) -> SharedLease {
        SharedLease {
            cluster: cluster.0,
            _guard: None,
            _user: None,
        }
    }

    fn noop_exclusive(&self, cluster: HostCluster) -> ExclusiveLease {
        ExclusiveLease {
            cluster: cluster.0,
            _guard: None,
            _user: None,
        }
    }
}

impl SharedLease {
    /// The leased cluster.
    pub fn cluster(&self) -> HostCluster {
        HostCluster(self.cluster)
    }
}

impl ExclusiveLease {
    /// The leased cluster.
    pub fn cluster(&self) -> HostCluster {
        HostCluster(self.cluster)
    }
}

impl std::fmt::Debug for SharedLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedLease({})", self.cluster)
    }
}

impl std::fmt::Debug for ExclusiveLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExclusiveLease({})", self.cluster)
    }
}
