//! The synchronisation primitives this crate is written against, and the one switch between
//! the real ones and a model checker's:
//!
//! - normally: `std::sync::Mutex` and `async_lock::RwLock`;
//! - under `--cfg loom` (with the `loom` feature): loom's `Mutex`, and async-lock built with
//!   its own `loom` feature, so that loom sees every atomic inside the `RwLock` as well;
//! - under `--cfg shuttle` (with the `shuttle` feature): shuttle's `Mutex`; async-lock's
//!   `RwLock` is used as is: shuttle runs one task at a time and learns of blocking and
//!   wake-ups through the wakers, so each `RwLock` operation is one atomic step to it.
//!
//! `Arc` is std's in every build: async-lock's `read_arc`/`write_arc` take `std::sync::Arc`,
//! and loom and shuttle run one thread at a time, so its reference counts are sequentially
//! consistent under both. Nothing else in the crate names a primitive directly.

#[cfg(all(loom, not(feature = "loom")))]
compile_error!("--cfg loom needs the `loom` feature of qcow2-alloc (see scripts/models.sh)");
#[cfg(all(shuttle, not(feature = "shuttle")))]
compile_error!("--cfg shuttle needs the `shuttle` feature of qcow2-alloc (see scripts/models.sh)");
#[cfg(all(loom, shuttle))]
compile_error!("--cfg loom and --cfg shuttle exclude each other");

pub use async_lock::{RwLock, RwLockReadGuardArc, RwLockWriteGuardArc};
pub use std::sync::Arc;

#[cfg(loom)]
pub use loom::sync::{Mutex, MutexGuard};
#[cfg(all(shuttle, not(loom)))]
pub use shuttle::sync::{Mutex, MutexGuard};
#[cfg(not(any(loom, shuttle)))]
pub use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, ignoring poisoning: every critical section in this crate leaves the
/// protected data consistent before anything that can panic.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
