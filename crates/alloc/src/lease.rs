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

#[derive(Default)]
struct Inner {
    map: Mutex<HashMap<u64, Entry>>,
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

/// A shared lease on one host cluster: data I/O on the cluster may proceed while it is held.
#[must_use = "a lease protects I/O only while it is held"]
pub struct SharedLease {
    table: LeaseTable,
    cluster: u64,
    guard: Option<RwLockReadGuardArc<()>>,
}

/// The exclusive lease on one host cluster: no data I/O on it is in flight while it is held.
#[must_use = "a lease protects the cluster only while it is held"]
pub struct ExclusiveLease {
    table: LeaseTable,
    cluster: u64,
    guard: Option<RwLockWriteGuardArc<()>>,
}

impl LeaseTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&self, cluster: u64) -> Entry {
        lock(&self.inner.map)
            .entry(cluster)
            .or_insert_with(|| Arc::new(RwLock::new(())))
            .clone()
    }

    fn entry_ref(&self, cluster: u64) -> EntryRef<'_> {
        EntryRef {
            table: self,
            cluster,
            entry: Some(self.entry(cluster)),
        }
    }

    /// Drops the table's entry for `cluster` if nobody but the table refers to it.
    fn cleanup(&self, cluster: u64) {
        let mut map = lock(&self.inner.map);
        if let Some(e) = map.get(&cluster) {
            if Arc::strong_count(e) == 1 {
                map.remove(&cluster);
            }
        }
    }

    /// Takes a shared lease without waiting; `None` if an exclusive lease is held or waited
    /// for. Safe to call under the metadata lock.
    pub fn try_shared(&self, cluster: HostCluster) -> Option<SharedLease> {
        if cfg!(qcow2_no_lease) {
            return Some(self.noop_shared(cluster));
        }
        let entry = self.entry(cluster.0);
        let guard = entry.try_read_arc();
        drop(entry);
        match guard {
            Some(g) => Some(SharedLease {
                table: self.clone(),
                cluster: cluster.0,
                guard: Some(g),
            }),
            None => {
                self.cleanup(cluster.0);
                None
            }
        }
    }

    /// Takes a shared lease, waiting for an exclusive holder to finish. Never call this with
    /// the metadata lock held.
    pub async fn shared(&self, cluster: HostCluster) -> SharedLease {
        if cfg!(qcow2_no_lease) {
            return self.noop_shared(cluster);
        }
        let entry = self.entry_ref(cluster.0);
        let guard = entry.lock_arc_read().await;
        drop(entry);
        SharedLease {
            table: self.clone(),
            cluster: cluster.0,
            guard: Some(guard),
        }
    }

    /// Takes the exclusive lease, waiting for every shared holder. Never call this with the
    /// metadata lock held.
    pub async fn exclusive(&self, cluster: HostCluster) -> ExclusiveLease {
        if cfg!(qcow2_no_lease) {
            return ExclusiveLease {
                table: self.clone(),
                cluster: cluster.0,
                guard: None,
            };
        }
        let entry = self.entry_ref(cluster.0);
        let guard = entry.lock_arc_write().await;
        drop(entry);
        ExclusiveLease {
            table: self.clone(),
            cluster: cluster.0,
            guard: Some(guard),
        }
    }

    /// Takes the exclusive lease without waiting; `None` if any lease on the cluster is held or
    /// waited for. Safe to call under the metadata lock.
    pub fn try_exclusive(&self, cluster: HostCluster) -> Option<ExclusiveLease> {
        if cfg!(qcow2_no_lease) {
            return Some(ExclusiveLease {
                table: self.clone(),
                cluster: cluster.0,
                guard: None,
            });
        }
        let entry = self.entry(cluster.0);
        let guard = entry.try_write_arc();
        drop(entry);
        match guard {
            Some(g) => Some(ExclusiveLease {
                table: self.clone(),
                cluster: cluster.0,
                guard: Some(g),
            }),
            None => {
                self.cleanup(cluster.0);
                None
            }
        }
    }

    /// Whether a lease on `cluster` is held or waited for. The allocator never hands out such
    /// a cluster (invariant I1).
    pub fn is_leased(&self, cluster: HostCluster) -> bool {
        let map = lock(&self.inner.map);
        map.get(&cluster.0)
            .is_some_and(|e| Arc::strong_count(e) > 1)
    }

    /// Number of clusters with a live entry (held or waited for).
    pub fn len(&self) -> usize {
        let map = lock(&self.inner.map);
        map.values().filter(|e| Arc::strong_count(e) > 1).count()
    }

    /// Whether no lease is held or waited for.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn noop_shared(&self, cluster: HostCluster) -> SharedLease {
        SharedLease {
            table: self.clone(),
            cluster: cluster.0,
            guard: None,
        }
    }
}

/// A reference to a table entry held while waiting for its lock. Dropping it (after the wait,
/// or when the waiting future is cancelled) removes the entry if nobody else uses it.
struct EntryRef<'a> {
    table: &'a LeaseTable,
    cluster: u64,
    entry: Option<Entry>,
}

impl EntryRef<'_> {
    fn entry(&self) -> &Entry {
        self.entry.as_ref().expect("entry present until drop")
    }

    async fn lock_arc_read(&self) -> RwLockReadGuardArc<()> {
        self.entry().read_arc().await
    }

    async fn lock_arc_write(&self) -> RwLockWriteGuardArc<()> {
        self.entry().write_arc().await
    }
}

impl Drop for EntryRef<'_> {
    fn drop(&mut self) {
        self.entry.take();
        self.table.cleanup(self.cluster);
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

impl Drop for SharedLease {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.table.cleanup(self.cluster);
    }
}

impl Drop for ExclusiveLease {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.table.cleanup(self.cluster);
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
