//! Exhaustive exploration of the lease rule under loom (with a preemption bound).
//!
//! Run by scripts/models.sh (`just loom`):
//! `RUSTFLAGS="--cfg loom" cargo test -p qcow2-alloc --features loom --test loom_model`.
//!
//! Every scenario runs the crate's own LeaseTable, Allocator and Gates (see model/mod.rs);
//! under `--cfg loom` the `sync` module hands them loom's Mutex and async-lock is built with
//! its `loom` feature, so loom schedules every lock operation *and* every atomic inside
//! async-lock's RwLock and its event listeners. The invariants are asserted in every state
//! the actors pass through, and the end state is checked once all of them have finished.
//!
//! The preemption bound (`LOOM_MAX_PREEMPTIONS`, default [`DEFAULT_BOUND`]) limits how many
//! times a schedule may switch away from a thread that could go on. Loom still explores
//! every schedule within it, and all switches at blocking points are free. Two preemptions
//! are enough for each race the model knows of (one to stop a request between its mapping
//! lookup and its I/O, one to stop a freer between freeing and punching); three cover, for
//! example, a request stopped twice plus a freer stopped once. Unbounded, the state space
//! of async-lock's internals makes the exploration run for hours.
#![cfg(loom)]

mod model;

use loom::future::block_on;
use loom::thread;
use model::World;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The default preemption bound.
const DEFAULT_BOUND: usize = 3;

/// Explores `scenario` and prints how many interleavings loom ran.
fn explore(name: &str, scenario: fn()) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(DEFAULT_BOUND);
    }
    let bound = builder.preemption_bound;
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let start = Instant::now();
    builder.check(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        scenario();
    });
    println!(
        "loom {name}: {} interleavings explored (preemption bound {}) in {:.1} s",
        runs.load(Ordering::Relaxed),
        bound.map_or("none".into(), |b| b.to_string()),
        start.elapsed().as_secs_f64()
    );
}

/// Runs `f` on a new loom thread as a future.
fn spawn<F, Fut>(w: &Arc<World>, f: F) -> thread::JoinHandle<()>
where
    F: FnOnce(Arc<World>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let w = w.clone();
    thread::spawn(move || block_on(f(w)))
}

/// The seed race: a write to guest 0's host cluster H is in flight; guest 0 is discarded
/// and the change written back; guest 1 allocates. H must not be freed under the write, nor
/// handed to guest 1 before the write is done.
#[test]
fn write_discard_reallocate() {
    explore("write_discard_reallocate", || {
        let w = World::new(2, 1);
        let writer = spawn(&w, |w| async move { w.write(0, 2).await });
        let freer = spawn(&w, |w| async move {
            w.discard(0).await;
            w.write_back(false);
        });
        let allocator = spawn(&w, |w| async move { w.write(1, 3).await });
        writer.join().unwrap();
        freer.join().unwrap();
        allocator.join().unwrap();
        w.check_final();
    });
}

/// The same with a read in flight: it must never see another guest's data.
#[test]
fn read_discard_reallocate() {
    explore("read_discard_reallocate", || {
        let w = World::new(2, 1);
        let reader = spawn(&w, |w| async move {
            let v = w.read(0).await;
            assert!(v == 0 || v == 1, "guest 0 read {v}");
        });
        let freer = spawn(&w, |w| async move {
            w.discard(0).await;
            w.write_back(false);
        });
        let allocator = spawn(&w, |w| async move { w.write(1, 3).await });
        reader.join().unwrap();
        freer.join().unwrap();
        allocator.join().unwrap();
        w.check_final();
    });
}

/// The same with the freed cluster punched after the write-back (I/O under the exclusive
/// lease): H must not be handed out before the punch is done.
#[test]
fn write_discard_punch_reallocate() {
    explore("write_discard_punch_reallocate", || {
        let w = World::new(2, 1);
        let writer = spawn(&w, |w| async move { w.write(0, 2).await });
        let freer = spawn(&w, |w| async move {
            w.discard(0).await;
            w.write_back(true);
        });
        let allocator = spawn(&w, |w| async move { w.write(1, 3).await });
        writer.join().unwrap();
        freer.join().unwrap();
        allocator.join().unwrap();
        w.check_final();
    });
}

/// I6: two writers of one unallocated guest cluster allocate once; meanwhile another guest
/// cluster is discarded and freed (its cluster must not be handed to the writers before its
/// punch is done).
#[test]
fn two_writers_one_cluster() {
    explore("two_writers_one_cluster", || {
        let w = World::new(2, 1);
        let a = spawn(&w, |w| async move { w.write(1, 2).await });
        let b = spawn(&w, |w| async move { w.write(1, 3).await });
        let freer = spawn(&w, |w| async move {
            w.discard(0).await;
            w.write_back(true);
        });
        a.join().unwrap();
        b.join().unwrap();
        freer.join().unwrap();
        assert_eq!(w.allocations(1), 1, "I6 violated: guest 1 allocated twice");
        w.check_final();
    });
}

/// I9, the seed race with cancellation: the writer's future is dropped while its write to
/// guest 0's host cluster H is in flight; guest 0 is discarded and written back; guest 1
/// allocates. H's lease travels with the write: H is not freed (nor reallocated) before it
/// lands.
#[test]
fn cancelled_write_discard_reallocate() {
    explore("cancelled_write_discard_reallocate", || {
        let w = World::new(2, 1);
        let writer = spawn(&w, |w| async move { w.cancelled_write(0, 2).await });
        let freer = spawn(&w, |w| async move {
            w.discard(0).await;
            w.write_back(false);
        });
        let allocator = spawn(&w, |w| async move { w.write(1, 3).await });
        writer.join().unwrap();
        freer.join().unwrap();
        allocator.join().unwrap();
        w.check_final();
    });
}

/// I9 and I6: an allocating write of guest 1 is cancelled while its data write is in flight.
/// Its new cluster stays reserved until the write lands (guest 2's allocation must not get
/// it), the gate keeps a second writer of guest 1 waiting as long, and the cluster comes
/// back afterwards (no leak).
#[test]
fn cancelled_allocation() {
    explore("cancelled_allocation", || {
        let w = World::new(3, 1);
        let cancelled = spawn(&w, |w| async move { w.cancelled_write(1, 2).await });
        let other = spawn(&w, |w| async move { w.write(2, 3).await });
        let second = spawn(&w, |w| async move { w.write(1, 4).await });
        cancelled.join().unwrap();
        other.join().unwrap();
        second.join().unwrap();
        w.check_final();
    });
}

/// I9 and I3: the write-back that frees guest 0's cluster is cancelled during its punch; the
/// exclusive lease travels with the punch, so the cluster is not handed to guest 1 before
/// the punch has landed.
#[test]
fn cancelled_punch_reallocate() {
    explore("cancelled_punch_reallocate", || {
        let w = World::new(2, 1);
        let freer = spawn(&w, |w| async move {
            w.discard(0).await;
            w.write_back_then(true, true);
        });
        let allocator = spawn(&w, |w| async move { w.write(1, 3).await });
        freer.join().unwrap();
        allocator.join().unwrap();
        w.check_final();
    });
}
