//! The model of the engine's request paths that loom_model.rs and shuttle_model.rs explore.
//!
//! It runs the crate's own [`LeaseTable`], [`Allocator`] (512-byte clusters, 16-bit
//! refcounts) and [`Gates`] under the primitives of `qcow2_alloc::sync`, which the test
//! build switches to loom's or shuttle's. Only what the engine keeps elsewhere is modelled
//! here: the metadata lock (a `sync::Mutex` over an L2 "table" mapping guest clusters to
//! host clusters, and the allocator) and the data I/O (an ownership array).
//!
//! A *ghost* state, under its own mutex, records what the actors believe and checks the
//! invariants at every step, so a violation panics in the very state where it happens:
//!
//! - **I1** `allocated`: the cluster `allocate` returned has no owner (no mapping, refcount
//!   was 0), no registered shared holder, and no freer holding its exclusive lease (punch).
//! - **I2** `io_write` / `io_read`: the host cluster a request does I/O on still belongs to
//!   the guest cluster whose mapping the request leased (not freed, not reallocated).
//! - **I3** `try_free`: when a decrement drops a cluster to 0, its exclusive lease is held,
//!   no shared holder is registered and no mapping to it is left.
//! - **I6** `allocated` / `installed`: at most one allocation of a guest cluster is in
//!   flight, and installing a mapping never replaces one.
//!
//! Shared holders are registered right after taking the lease (under the metadata lock) and
//! unregistered right before releasing it, so the ghost never claims a holder that the
//! lease table does not have. With `--cfg qcow2_no_lease` the lease is a no-op and these
//! checks must fire: scripts/models.sh asserts that.
//!
//! **Cancellation (I9).** A request whose future is dropped while its data I/O is in flight
//! is modelled by the `cancelled_*` actors: the request plans as usual, then its future is
//! gone, and the I/O it issued completes later ("the kernel finishes it"). Its guards (the
//! lease, the gate, the reservation of a new cluster; for a freer, the exclusive lease of
//! the cluster it punches) travel with the I/O and drop once it is done, as the engine's
//! `blockio::Keep` makes them. Built with `--cfg qcow2_no_keep` they drop with the future
//! instead, before the I/O lands, and the checks must fire (scripts/models.sh asserts that
//! for the cancellation scenarios). A cluster allocated by a cancelled write goes back
//! through its [`Reservation`] (dropped uncommitted) and the allocator's reclaim: the end
//! state must show no leak.
#![allow(dead_code)]

use qcow2_alloc::sync::{lock, Mutex};
use qcow2_alloc::{
    Allocator, ExclusiveLease, Gate, GateGuard, Gates, LeaseTable, Refcounts, Reservation,
    SharedLease,
};
use qcow2_format::{ClusterGeometry, HostCluster, HostOffset, RefcountWidth, ReftableEntry};
use std::sync::Arc;

/// 512-byte clusters: the smallest geometry qcow2 allows.
pub const CLUSTER_BITS: u32 = 9;
/// Host clusters the model tracks (cluster 0 holds the refcount table, 1 its only block).
pub const HOSTS: usize = 32;
/// The first host cluster that can hold data.
pub const FIRST_DATA: u64 = 2;

/// What the metadata lock protects.
pub struct Meta {
    /// Guest cluster -> host cluster (the L2 table).
    pub l2: Vec<Option<u64>>,
    /// Refcounts and allocation.
    pub alloc: Allocator,
}

/// What the actors believe, checked at every step.
pub struct Ghost {
    /// The guest cluster each host cluster was allocated to, from allocation until its
    /// refcount drops to 0.
    owner: Vec<Option<usize>>,
    /// Guest clusters holding (registered) shared leases on each host cluster.
    holders: Vec<Vec<usize>>,
    /// Host clusters a freer holds the exclusive lease of (freed, punch not done).
    exclusive: Vec<bool>,
    /// Who last wrote each host cluster, and what (None: zeros / punched).
    data: Vec<Option<(usize, u8)>>,
    /// Allocations in flight per guest cluster, and allocations made per guest cluster.
    allocating: Vec<usize>,
    allocations: Vec<usize>,
    /// Clusters freed, and punched.
    freed: usize,
    punched: usize,
}

/// The model: metadata, leases, gates and the ghost.
pub struct World {
    pub meta: Mutex<Meta>,
    pub leases: LeaseTable,
    pub gates: Gates,
    pub ghost: Mutex<Ghost>,
}

/// Whether the guards of an I/O live until the I/O completes (I9), or die with the future
/// that issued it (the `--cfg qcow2_no_keep` build).
const KEEP: bool = !cfg!(qcow2_no_keep);

/// A request's future is dropped while `io` (its data I/O) is in flight: `io` still runs
/// (the kernel finishes it), and `guards` drop after it, or before it without the keep.
fn in_flight<G>(guards: G, io: impl FnOnce()) {
    if KEEP {
        io();
        drop(guards);
    } else {
        drop(guards);
        io();
    }
}

/// Host cluster `h` as the crate's type.
fn hc(h: u64) -> HostCluster {
    HostCluster(h)
}

impl World {
    /// `guests` guest clusters; the first `mapped` of them mapped to host clusters 2, 3, ...
    /// and holding data written by themselves (value 1).
    pub fn new(guests: usize, mapped: usize) -> Arc<World> {
        let geo = ClusterGeometry::new(CLUSTER_BITS, false).unwrap();
        let width = RefcountWidth::from_order(4).unwrap();
        let cs = geo.cluster_size();
        let mut table = vec![ReftableEntry(0); (cs / 8) as usize];
        table[0] = ReftableEntry(cs); // the block lives in cluster 1
        let mut rc = Refcounts::new(geo, width, table);
        rc.insert_block(0, vec![0; cs as usize]);
        rc.set(hc(0), 1).unwrap();
        rc.set(hc(1), 1).unwrap();
        let mut l2 = vec![None; guests];
        let mut owner = vec![None; HOSTS];
        let mut data = vec![None; HOSTS];
        for (g, slot) in l2.iter_mut().enumerate().take(mapped) {
            let h = FIRST_DATA + g as u64;
            rc.set(hc(h), 1).unwrap();
            *slot = Some(h);
            owner[h as usize] = Some(g);
            data[h as usize] = Some((g, 1));
        }
        let file_clusters = FIRST_DATA + mapped as u64;
        let alloc = Allocator::new(rc, geo, HostOffset(0), file_clusters);
        Arc::new(World {
            meta: Mutex::new(Meta { l2, alloc }),
            leases: LeaseTable::new(),
            gates: Gates::new(),
            ghost: Mutex::new(Ghost {
                owner,
                holders: vec![Vec::new(); HOSTS],
                exclusive: vec![false; HOSTS],
                data,
                allocating: vec![0; guests],
                allocations: vec![0; guests],
                freed: 0,
                punched: 0,
            }),
        })
    }

    /// Registers guest `g`'s shared lease on `h` (under the metadata lock, just taken).
    fn hold(&self, h: u64, g: usize) {
        let mut gh = lock(&self.ghost);
        assert_eq!(
            gh.owner[h as usize],
            Some(g),
            "model bug: guest {g} leased host cluster {h} through a mapping that is not its own"
        );
        gh.holders[h as usize].push(g);
    }

    /// Unregisters it (just before the lease is released).
    fn unhold(&self, h: u64, g: usize) {
        let mut gh = lock(&self.ghost);
        let v = &mut gh.holders[h as usize];
        let i = v.iter().position(|&x| x == g).expect("registered holder");
        v.swap_remove(i);
    }

    /// I2, for a write: the data I/O of guest `g` on host cluster `h`.
    fn io_write(&self, h: u64, g: usize, val: u8) {
        let mut gh = lock(&self.ghost);
        assert!(
            gh.owner[h as usize] == Some(g) && !gh.exclusive[h as usize],
            "I2 violated: guest {g} writes host cluster {h} under its shared lease, but {h} \
             was freed or reallocated meanwhile (owner {:?}, being freed {})",
            gh.owner[h as usize],
            gh.exclusive[h as usize]
        );
        gh.data[h as usize] = Some((g, val));
    }

    /// I2, for a read: what guest `g` reads from host cluster `h` is its own data.
    fn io_read(&self, h: u64, g: usize) -> u8 {
        let gh = lock(&self.ghost);
        assert!(
            gh.owner[h as usize] == Some(g) && !gh.exclusive[h as usize],
            "I2 violated: guest {g} reads host cluster {h} under its shared lease, but {h} \
             was freed or reallocated meanwhile (owner {:?})",
            gh.owner[h as usize]
        );
        match gh.data[h as usize] {
            None => 0,
            Some((w, v)) => {
                assert_eq!(w, g, "I2 violated: guest {g} reads guest {w}'s data");
                v
            }
        }
    }

    /// I2, for the late write of a cancelled allocating write: nothing refers to `h` yet,
    /// but it must still be this write's (not handed to another guest, not being freed).
    fn io_write_unreferenced(&self, h: u64, g: usize, val: u8) {
        let mut gh = lock(&self.ghost);
        assert!(
            gh.owner[h as usize].is_none_or(|o| o == g) && !gh.exclusive[h as usize],
            "I2/I9 violated: the late write of guest {g}'s cancelled allocation lands on host \
             cluster {h}, which was handed out again (owner {:?}, being freed {})",
            gh.owner[h as usize],
            gh.exclusive[h as usize]
        );
        gh.data[h as usize] = Some((g, val));
    }

    /// A cancelled allocating write of guest `g` gives host cluster `h` up (its reservation
    /// drops uncommitted): the ghost forgets the owner; the count drops at the reclaim.
    fn abandoned(&self, h: u64, g: usize) {
        let mut gh = lock(&self.ghost);
        if gh.owner[h as usize] == Some(g) {
            gh.owner[h as usize] = None;
        }
        gh.allocating[g] -= 1;
    }

    /// I1 and I6: guest `g` was just handed host cluster `h` (under the metadata lock).
    fn allocated(&self, meta: &Meta, h: u64, g: usize) {
        let mut gh = lock(&self.ghost);
        let hu = h as usize;
        assert!(hu < HOSTS, "model too small: allocated {h}");
        assert!(
            gh.owner[hu].is_none() && !meta.l2.contains(&Some(h)),
            "I1 violated: allocate returned host cluster {h}, still referenced (owner {:?})",
            gh.owner[hu]
        );
        assert!(
            gh.holders[hu].is_empty(),
            "I1 violated: allocate returned host cluster {h}, leased by guests {:?}",
            gh.holders[hu]
        );
        assert!(
            !gh.exclusive[hu],
            "I1 violated: allocate returned host cluster {h} while its freer holds the \
             exclusive lease (punch pending)"
        );
        assert_eq!(
            gh.allocating[g], 0,
            "I6 violated: a second allocation of guest cluster {g} while one is in flight"
        );
        assert!(
            meta.l2[g].is_none(),
            "I6 violated: guest {g} is mapped already"
        );
        gh.allocating[g] += 1;
        gh.allocations[g] += 1;
        gh.owner[hu] = Some(g);
    }

    /// I6: guest `g`'s allocation installs its mapping (under the metadata lock).
    fn installed(&self, meta: &Meta, g: usize) {
        let mut gh = lock(&self.ghost);
        assert!(
            meta.l2[g].is_none(),
            "I6 violated: installing guest {g}'s mapping replaces another"
        );
        gh.allocating[g] -= 1;
    }

    /// The decrement's `try_free`: the exclusive lease without waiting, and I3. With
    /// `punch`, the freer goes on to do I/O on the cluster under that lease.
    fn try_free(&self, l2: &[Option<u64>], c: HostCluster, punch: bool) -> Option<ExclusiveLease> {
        let lease = self.leases.try_exclusive(c)?;
        let mut gh = lock(&self.ghost);
        let hu = c.0 as usize;
        assert!(
            gh.holders[hu].is_empty(),
            "I3 violated: host cluster {} drops to refcount 0 while guests {:?} hold shared \
             leases on it",
            c.0,
            gh.holders[hu]
        );
        assert!(
            !l2.contains(&Some(c.0)),
            "I3 violated: host cluster {} drops to refcount 0 while still mapped",
            c.0
        );
        gh.exclusive[hu] = punch;
        gh.owner[hu] = None;
        gh.freed += 1;
        Some(lease)
    }

    /// The end of a free: optionally punch `h` (I/O under the exclusive lease), then
    /// release the lease.
    fn end_free(&self, h: u64, lease: ExclusiveLease, punch: bool) {
        {
            let mut gh = lock(&self.ghost);
            let hu = h as usize;
            if punch {
                assert!(
                    gh.owner[hu].is_none() && gh.holders[hu].is_empty(),
                    "I1/I3 violated: punching freed host cluster {h}, which was handed out \
                     again (owner {:?}, holders {:?})",
                    gh.owner[hu],
                    gh.holders[hu]
                );
                gh.data[hu] = None;
                gh.punched += 1;
            }
            gh.exclusive[hu] = false;
        }
        drop(lease);
    }

    /// Plans a request on guest cluster `g` under the metadata lock, by the rule: wait if
    /// `g` is being allocated; if mapped, take the shared lease without waiting (or say which
    /// lease would wait); if unmapped and `allocate`, begin an allocating write: gate,
    /// allocate with the lease test, shared lease on the new cluster.
    fn plan(&self, meta: &mut Meta, g: usize, allocate: bool) -> Plan {
        if let Some(gate) = self.gates.get(g as u64) {
            return Plan::Wait(gate);
        }
        if let Some(h) = meta.l2[g] {
            return match self.leases.try_shared(hc(h)) {
                Some(l) => {
                    self.hold(h, g);
                    Plan::Mapped(h, l)
                }
                None => Plan::WaitLease(h),
            };
        }
        if !allocate {
            return Plan::Unmapped;
        }
        let guard = match self.gates.begin(g as u64) {
            Ok(guard) => guard,
            Err(gate) => return Plan::Wait(gate),
        };
        let leases = &self.leases;
        let a = meta
            .alloc
            .allocate(1, |c| leases.is_leased(c))
            .expect("allocate");
        let h = a.first.0;
        self.allocated(meta, h, g);
        let l = self
            .leases
            .try_shared(hc(h))
            .expect("I1 violated: a cluster just allocated is leased");
        self.hold(h, g);
        Plan::Allocating(h, l, guard, meta.alloc.reserve(&a))
    }

    /// After `plan` said the lease on `h` would wait: wait for it without the metadata
    /// lock, then take the lock again and re-validate the mapping `g -> h`.
    async fn wait_lease(&self, g: usize, h: u64) -> Option<SharedLease> {
        let l = self.leases.shared(hc(h)).await;
        let meta = lock(&self.meta);
        if meta.l2[g] == Some(h) && !self.gates.is_allocating(g as u64) {
            self.hold(h, g);
            Some(l)
        } else {
            None // the mapping changed while we waited: plan again
        }
    }

    /// A guest write of `val` to guest cluster `g`: in place if mapped, otherwise an
    /// allocating write (gate, allocate, write, install the mapping, open the gate).
    pub async fn write(&self, g: usize, val: u8) {
        loop {
            let plan = self.plan(&mut lock(&self.meta), g, true);
            let (h, l) = match plan {
                Plan::Wait(gate) => {
                    gate.wait().await;
                    continue;
                }
                Plan::WaitLease(h) => match self.wait_lease(g, h).await {
                    Some(l) => (h, l),
                    None => continue,
                },
                Plan::Mapped(h, l) => (h, l),
                Plan::Unmapped => unreachable!("planned with allocate"),
                Plan::Allocating(h, l, guard, reservation) => {
                    self.io_write(h, g, val);
                    {
                        let mut meta = lock(&self.meta);
                        self.installed(&meta, g);
                        meta.l2[g] = Some(h);
                        reservation.commit();
                        drop(guard);
                    }
                    self.unhold(h, g);
                    drop(l);
                    return;
                }
            };
            self.io_write(h, g, val);
            self.unhold(h, g);
            drop(l);
            return;
        }
    }

    /// A write of `val` to guest cluster `g` whose future is dropped once its data I/O is
    /// issued: the I/O lands later, under the guards that travel with it (see the module
    /// documentation); an allocating one never installs its mapping, and its cluster goes
    /// back (reservation dropped uncommitted).
    pub async fn cancelled_write(&self, g: usize, val: u8) {
        loop {
            let plan = self.plan(&mut lock(&self.meta), g, true);
            match plan {
                Plan::Wait(gate) => {
                    gate.wait().await;
                    continue;
                }
                Plan::WaitLease(h) => match self.wait_lease(g, h).await {
                    Some(l) => in_flight(l, || {
                        self.io_write(h, g, val);
                        self.unhold(h, g);
                    }),
                    None => continue,
                },
                Plan::Mapped(h, l) => in_flight(l, || {
                    self.io_write(h, g, val);
                    self.unhold(h, g);
                }),
                Plan::Unmapped => unreachable!("planned with allocate"),
                Plan::Allocating(h, l, guard, reservation) => {
                    // The ghost learns of the abandon where the reservation goes: after the
                    // I/O with the keep, at the cancellation without.
                    let guards = (l, guard, reservation);
                    if KEEP {
                        self.io_write_unreferenced(h, g, val);
                        self.unhold(h, g);
                        self.abandoned(h, g);
                        drop(guards);
                    } else {
                        self.unhold(h, g);
                        self.abandoned(h, g);
                        drop(guards);
                        self.io_write_unreferenced(h, g, val);
                    }
                }
            }
            return;
        }
    }

    /// A guest read of guest cluster `g`: its value (0 if unmapped or never written).
    pub async fn read(&self, g: usize) -> u8 {
        loop {
            let plan = self.plan(&mut lock(&self.meta), g, false);
            let (h, l) = match plan {
                Plan::Wait(gate) => {
                    gate.wait().await;
                    continue;
                }
                Plan::WaitLease(h) => match self.wait_lease(g, h).await {
                    Some(l) => (h, l),
                    None => continue,
                },
                Plan::Mapped(h, l) => (h, l),
                Plan::Unmapped => return 0,
                Plan::Allocating(..) => unreachable!("planned without allocate"),
            };
            let v = self.io_read(h, g);
            self.unhold(h, g);
            drop(l);
            return v;
        }
    }

    /// A discard of guest cluster `g`: unmap under the metadata lock (after any allocation
    /// in flight) and defer the decrement.
    pub async fn discard(&self, g: usize) {
        loop {
            let gate = {
                let mut meta = lock(&self.meta);
                match self.gates.get(g as u64) {
                    Some(gate) => gate,
                    None => {
                        if let Some(h) = meta.l2[g].take() {
                            meta.alloc.defer_decrement(hc(h));
                        }
                        return;
                    }
                }
            };
            gate.wait().await;
        }
    }

    /// The write-back's last step: apply the deferred decrements, each free under the
    /// exclusive lease taken without waiting (`try_exclusive`); then, without the metadata
    /// lock, punch the freed clusters (if `punch`) and release their leases. Returns how many
    /// clusters were freed.
    pub fn write_back(&self, punch: bool) -> usize {
        self.write_back_then(punch, false)
    }

    /// [`World::write_back`] whose future is dropped during its punches (with `cancelled`):
    /// each punch still lands, under the exclusive lease that travels with it.
    pub fn write_back_then(&self, punch: bool, cancelled: bool) -> usize {
        let freed = {
            let mut meta = lock(&self.meta);
            let Meta { l2, alloc } = &mut *meta;
            let freed = alloc
                .apply_decrements(|c| self.try_free(l2, c, punch))
                .expect("apply_decrements");
            for (c, _) in &freed {
                assert_eq!(alloc.get(*c).unwrap(), 0, "a freed cluster keeps its count");
            }
            freed
        };
        let n = freed.len();
        for (c, lease) in freed {
            if cancelled && punch {
                self.cancelled_punch(c.0, lease);
            } else {
                self.end_free(c.0, lease, punch);
            }
        }
        n
    }

    /// The punch of freed host cluster `h`, its future dropped: the punch lands later, and
    /// the exclusive lease goes with it (I3, I9).
    fn cancelled_punch(&self, h: u64, lease: ExclusiveLease) {
        let punch = || {
            let mut gh = lock(&self.ghost);
            let hu = h as usize;
            assert!(
                gh.owner[hu].is_none() && gh.holders[hu].is_empty(),
                "I3/I9 violated: a late punch of freed host cluster {h} lands after it was \
                 handed out again (owner {:?}, holders {:?})",
                gh.owner[hu],
                gh.holders[hu]
            );
            gh.data[hu] = None;
            gh.punched += 1;
            gh.exclusive[hu] = false;
        };
        in_flight(lease, punch);
    }

    /// Checks the end state once every actor has finished: no lease or gate left, every
    /// deferred decrement applied, refcounts equal to the mappings, every mapped guest
    /// cluster holding its own data, and no host cluster mapped twice.
    pub fn check_final(&self) {
        assert!(
            self.leases.is_empty(),
            "leases left behind: {:?}",
            self.leases
        );
        assert!(self.gates.is_empty(), "gates left behind");
        while self.write_back(true) > 0 {}
        let mut meta = lock(&self.meta);
        // Clusters of cancelled allocations come back: none may leak.
        meta.alloc.reclaim().expect("reclaim");
        let meta = meta;
        assert!(
            !meta.alloc.has_pending(),
            "decrements stuck after every actor finished"
        );
        let gh = lock(&self.ghost);
        for h in FIRST_DATA..HOSTS as u64 {
            let refs = meta.l2.iter().filter(|&&m| m == Some(h)).count() as u64;
            assert_eq!(
                meta.alloc.get(hc(h)).unwrap(),
                refs,
                "host cluster {h}: refcount differs from its mappings"
            );
            assert!(gh.holders[h as usize].is_empty() && !gh.exclusive[h as usize]);
        }
        for (g, m) in meta.l2.iter().enumerate() {
            if let Some(h) = *m {
                assert_eq!(
                    gh.owner[h as usize],
                    Some(g),
                    "guest {g}: host {h} owned by another"
                );
                assert!(
                    matches!(gh.data[h as usize], Some((w, _)) if w == g),
                    "guest {g} lost its data in host cluster {h}: {:?}",
                    gh.data[h as usize]
                );
            }
        }
    }

    /// Allocations made for guest cluster `g`.
    pub fn allocations(&self, g: usize) -> usize {
        lock(&self.ghost).allocations[g]
    }

    /// Clusters freed and punched so far.
    pub fn freed_punched(&self) -> (usize, usize) {
        let gh = lock(&self.ghost);
        (gh.freed, gh.punched)
    }
}

/// What a request does next.
enum Plan {
    /// Wait for the allocation of the guest cluster in flight, then plan again.
    Wait(Gate),
    /// Wait for the lease on this host cluster, then re-validate.
    WaitLease(u64),
    /// Mapped to this host cluster, leased.
    Mapped(u64, SharedLease),
    /// Not mapped (reads as zeros).
    Unmapped,
    /// An allocating write to this new host cluster, leased and reserved, with the gate held.
    Allocating(u64, SharedLease, GateGuard, Reservation),
}
