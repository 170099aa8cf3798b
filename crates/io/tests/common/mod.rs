//! What several of this crate's tests use.

use blockio::Keep;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set when dropped.
struct Witness(Arc<AtomicBool>);

impl Drop for Witness {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A keep, and the flag it sets when it goes.
pub fn witness() -> (Keep, Arc<AtomicBool>) {
    let dropped = Arc::new(AtomicBool::new(false));
    (Keep::new(Witness(dropped.clone())), dropped)
}
