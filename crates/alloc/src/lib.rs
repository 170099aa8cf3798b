//! # qcow2-alloc
//!
//! Who owns which host cluster: the in-memory refcount view, cluster allocation, and the
//! **lease table** that makes freeing a cluster safe while guest I/O may still be in flight.
//!
//! The rule this crate exists for (docs/DESIGN.md §2): every data I/O on host cluster H holds a
//! shared lease on H; whatever drops H's refcount to zero first makes H unreachable, then takes
//! the exclusive lease, and only then lets H become allocatable. A cluster is free only when
//! its refcount is 0 *and* nobody holds or waits for its lease.
//!
//! [`Gates`] serialise allocations of one guest cluster (invariant I6). A [`Reservation`]
//! holds a cluster allocated for a write until the write refers to it, and gives it back
//! when dropped otherwise: only once the write's I/O is over, since it travels with that I/O
//! (invariant I9).
//!
//! This crate does no I/O: the engine reads and writes refcount blocks and hands their bytes
//! here. Synchronisation primitives come from [`sync`], so that the same code can be checked
//! under a model checker.
#![warn(missing_docs)]

pub mod allocator;
pub mod gates;
pub mod lease;
pub mod refcount;
pub mod reservation;
pub mod sync;

pub use allocator::{
    refcount_metadata_blocks, Allocation, Allocator, ByteAllocation, NewRefcounts, TableMove,
};
pub use gates::{Gate, GateGuard, Gates};
pub use lease::{ExclusiveLease, LeaseTable, SharedLease};
pub use refcount::{RefcountError, Refcounts};
pub use reservation::{Reservation, Returns};
