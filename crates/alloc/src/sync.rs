//! The synchronisation primitives this crate is written against: std and async-lock in normal
//! builds. Model-checking builds swap them here and nowhere else.

pub use async_lock::{RwLock, RwLockReadGuardArc, RwLockWriteGuardArc};
pub use std::sync::{Arc, Mutex, MutexGuard};

/// Locks a std mutex, ignoring poisoning: every critical section in this crate leaves the
/// protected data consistent before anything that can panic.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
